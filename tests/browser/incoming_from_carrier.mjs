// 1 (and 5): alice logs in on acme, registers; the carrier calls the DID; the page
// rings with caller id and DID; she answers; media flows both ways; the carrier hangs up.
import { args, step, fail, launch, openPhone, waitAttr, expectMediaFlowing, screenshot } from './lib.mjs';

const { context, cleanup } = await launch();
try {
  const page = await openPhone(context, 'acme.localhost', 'alice@acme.localhost', 'alice-demo-pw');
  await waitAttr(page, 'reg', 'registered');
  await screenshot(page, 'softphone-idle');
  step('registered');
  await waitAttr(page, 'call', 'ringing', 20000);
  const caller = await page.textContent('#caller');
  const did = await page.getAttribute('#did', 'data-did');
  if (!caller.includes(args.callerId)) fail(`caller id ${caller} does not show ${args.callerId}`);
  if (did !== args.did) fail(`DID shown is ${did}, expected ${args.did}`);
  step('ringing', `caller=${caller} did=${did}`);
  await screenshot(page, 'softphone-ringing');
  await page.click('#answer');
  await waitAttr(page, 'call', 'in-call');
  await expectMediaFlowing(page, 'alice');
  await screenshot(page, 'softphone-in-call');
  // Mobile layout of the same call.
  await page.setViewportSize({ width: 390, height: 844 });
  await screenshot(page, 'softphone-in-call-phone');
  await waitAttr(page, 'call', 'idle', 30000); // the carrier hangs up
  step('ended');
} finally {
  await cleanup();
}
