// 3: alice calls 1002 (bob, a second page, phone-sized): WebRTC <-> WebRTC through crossbar.
import { step, launch, openPhone, waitAttr, expectMediaFlowing, screenshot } from './lib.mjs';

const { context, cleanup } = await launch();
try {
  const bob = await openPhone(context, 'acme.localhost', 'bob@acme.localhost', 'bob-demo-pw', { width: 390, height: 844 });
  const alice = await openPhone(context, 'acme.localhost', 'alice@acme.localhost', 'alice-demo-pw');
  await waitAttr(bob, 'reg', 'registered');
  await waitAttr(alice, 'reg', 'registered');
  step('registered');
  await alice.fill('#number', '1002');
  await alice.click('#call');
  await waitAttr(bob, 'call', 'ringing', 20000);
  await screenshot(bob, 'softphone-ringing-phone');
  await bob.click('#answer');
  await waitAttr(bob, 'call', 'in-call');
  await waitAttr(alice, 'call', 'in-call');
  await expectMediaFlowing(alice, 'alice');
  await expectMediaFlowing(bob, 'bob');
  // Hold and resume from alice's side (re-INVITE through the bridge).
  await alice.click('#hold');
  await alice.waitForTimeout(1000);
  await alice.click('#hold');
  await alice.waitForTimeout(1000);
  await alice.click('#hangup');
  await waitAttr(alice, 'call', 'idle');
  await waitAttr(bob, 'call', 'idle');
  step('ended');
} finally {
  await cleanup();
}
