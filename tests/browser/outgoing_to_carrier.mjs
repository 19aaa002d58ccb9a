// 2: alice dials an external number; the carrier (SIPp, RTP echo) answers; media both ways; alice hangs up.
import { args, step, launch, openPhone, waitAttr, expectMediaFlowing } from './lib.mjs';

const { context, cleanup } = await launch();
try {
  const page = await openPhone(context, 'acme.localhost', 'alice@acme.localhost', 'alice-demo-pw');
  await waitAttr(page, 'reg', 'registered');
  step('registered');
  await page.fill('#number', args.number);
  await page.click('#call');
  await waitAttr(page, 'call', 'in-call', 20000);
  await expectMediaFlowing(page, 'alice');
  // DTMF keypad during the call (RFC 4733 through crossbar).
  await page.click('#keypad >> text=5');
  await page.click('#hangup');
  await waitAttr(page, 'call', 'idle');
  step('ended');
} finally {
  await cleanup();
}
