// 4: carol (globex) is refused on acme; a wrong password gets 401 invalid_credentials;
// a call to globex's DID never rings alice.
import { args, step, fail, launch, openPhone, login, waitAttr, screenshot } from './lib.mjs';

const { context, cleanup } = await launch();
try {
  const page = await openPhone(context, 'acme.localhost', null, null);
  const loginStatus = async (user, pw) => {
    const r = await page.evaluate(async ([u, p]) => {
      const resp = await fetch('/api/v1/softphone/login', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ username: u, password: p }) });
      return { status: resp.status, body: await resp.json() };
    }, [user, pw]);
    return r;
  };
  let r = await loginStatus('carol@globex.localhost', 'carol-demo-pw');
  if (r.status !== 401 || r.body.error.code !== 'invalid_credentials') fail(`carol on acme: ${JSON.stringify(r)}`);
  r = await loginStatus('alice@acme.localhost', 'not-her-password');
  if (r.status !== 401 || r.body.error.code !== 'invalid_credentials') fail(`wrong password: ${JSON.stringify(r)}`);
  // The page shows the refusal.
  await login(page, 'carol@globex.localhost', 'carol-demo-pw');
  await page.waitForFunction(() => document.getElementById('login-error').dataset.code === 'invalid_credentials', null, { timeout: 10000 });
  await screenshot(page, 'softphone-login-refused');
  step('refused');
  await login(page, 'alice@acme.localhost', 'alice-demo-pw');
  await waitAttr(page, 'reg', 'registered');
  step('registered');
  // The test calls globex's DID now; alice's page must stay idle.
  const until = Date.now() + (args.watchMs || 6000);
  while (Date.now() < until) {
    const call = await page.evaluate(() => document.body.dataset.call);
    if (call !== 'idle') fail(`alice's page went ${call} on a call for globex`);
    await page.waitForTimeout(200);
  }
  step('never-rang');
} finally {
  await cleanup();
}
