// Helpers for the softphone tests: real headless Chromium (Debian's) driven by
// playwright-core, fake media devices, a fresh profile per run. Every wait is bounded.
import { createRequire } from 'node:module';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, '../../web/package.json'));
const { chromium } = require('playwright-core');

export const args = JSON.parse(process.argv[2] || '{}');
export const step = (name, extra = '') => console.log(`STEP ${name}${extra ? ' ' + extra : ''}`);

export function fail(msg) {
  console.error('FAIL ' + msg);
  process.exit(1);
}

export async function launch() {
  const profile = mkdtempSync(join(tmpdir(), 'crossbar-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    timeout: 30000,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
      // Only loopback exists for these tests: let WebRTC use it.
      '--allow-loopback-in-peer-connection',
    ],
    viewport: { width: 1280, height: 800 },
  });
  const cleanup = async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, cleanup };
}

/// Opens the softphone of `tenant` (e.g. acme.localhost) and logs in.
export async function openPhone(context, tenantHost, user, password, viewport) {
  const page = await context.newPage();
  if (viewport) await page.setViewportSize(viewport);
  page.on('websocket', (ws) => { ws.on('close', () => console.error(`[${user}] websocket closed`)); ws.on('socketerror', (e) => console.error(`[${user}] websocket error ${e}`)); ws.on('framereceived', (f) => { if (process.env.DEBUG_SIP) console.error('<< ' + String(f.payload).slice(0, 1500)); }); ws.on('framesent', (f) => { if (process.env.DEBUG_SIP) console.error('>> ' + String(f.payload).slice(0, 1500)); }); });
  page.on('console', (m) => { if (m.type() === 'error') console.error(`[${user} console] ${m.text()}`); });
  await page.goto(`http://${tenantHost}:${args.httpPort}/phone`, { timeout: 15000 });
  if (user) await login(page, user, password);
  return page;
}

export async function login(page, user, password) {
  await page.fill('#username', user);
  await page.fill('#password', password);
  await page.click('#login-form button[type=submit]');
}

export async function waitAttr(page, name, value, timeout = 15000) {
  try {
    await page.waitForFunction(([n, v]) => document.body.dataset[n] === v, [name, value], { timeout });
  } catch (e) {
    const now = await page.evaluate((n) => document.body.dataset[n], name);
    const reg = await page.textContent('#reg').catch(() => '');
    fail(`waiting for ${name}=${value}, it is ${now} (${reg})`);
  }
}

/// Audio RTP counters of the page's call (RTCPeerConnection.getStats()).
export async function rtpStats(page) {
  return page.evaluate(async () => {
    const pc = window.phone.session && window.phone.session.connection;
    if (!pc) return { inbound: 0, outbound: 0 };
    const r = await pc.getStats();
    let inbound = 0, outbound = 0;
    r.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'audio') inbound += s.packetsReceived || 0;
      if (s.type === 'outbound-rtp' && s.kind === 'audio') outbound += s.packetsSent || 0;
    });
    return { inbound, outbound };
  });
}

/// Media flows both ways on the page: inbound-rtp grows, outbound-rtp grows.
export async function expectMediaFlowing(page, who) {
  const deadline = Date.now() + 15000;
  let first = await rtpStats(page);
  while (first.inbound === 0 && Date.now() < deadline) {
    await page.waitForTimeout(250);
    first = await rtpStats(page);
  }
  await page.waitForTimeout(2000);
  const second = await rtpStats(page);
  if (!(second.inbound > first.inbound && first.inbound > 0)) fail(`${who}: inbound RTP not growing (${first.inbound} -> ${second.inbound})`);
  if (!(second.outbound > first.outbound)) fail(`${who}: outbound RTP not growing (${first.outbound} -> ${second.outbound})`);
  step('media', `${who} inbound=${second.inbound} outbound=${second.outbound}`);
  return second;
}

export async function screenshot(page, name) {
  if (!args.screenshots) return;
  mkdirSync(args.screenshots, { recursive: true });
  await page.screenshot({ path: join(args.screenshots, `${name}.png`) });
  step('screenshot', name);
}
