// Real-browser end-to-end test (issue 4): Debian's headless Chromium drives the demo portal that
// the real `keyport` agent serves, against a SoftHSM token, with the scripted pinentry as the
// user. Every wait is on DOM state or on the agent's stdout; nothing sleeps.
//
// Needs `cargo build -p agent -p keyport-e2e`, /usr/bin/chromium and `npm ci` here (run.sh).
import assert from 'node:assert/strict';
import { createVerify } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import * as rig from './rig.mjs';

const SCREENSHOT = path.join(rig.ROOT, 'docs', 'demo-portal.png');
const timings = [];

/** Runs one step and records how long it took (printed at the end). */
async function step(name, fn) {
  const started = performance.now();
  try {
    return await fn();
  } finally {
    timings.push([name, Math.round(performance.now() - started)]);
  }
}

let dir;
let token; // { conf, certDir }
let pinentry;
let agent;
let demoOrigin;
let wsUrl;
let demoUrl;
let cliCerts;
let otherSite;
let context;
let pageLog = [];

before(async () => {
  rig.requireBuilt();
  dir = rig.tempDir('keyport-browser-');
  token = await step('provision SoftHSM token', () => rig.provisionToken(dir));
  pinentry = new rig.PinentryScript(dir);
  // The demo's origin must be on the agent's list before the agent starts: pick its port now.
  const demoPort = await rig.freePort();
  demoOrigin = `http://127.0.0.1:${demoPort}`;
  // unknown_origins = "unapproved": an origin off the list connects and says hello, and every
  // other call fails with ORIGIN_NOT_APPROVED without a dialog ("reject" would refuse the
  // WebSocket handshake with a 403, which a page can only see as a failed connection).
  const config = rig.writeConfig(dir, { allowedOrigins: [demoOrigin], unknownOrigins: 'unapproved' });
  const env = { SOFTHSM2_CONF: token.conf, ...pinentry.env() };
  cliCerts = rig.listCertificatesCli(config, env);
  agent = rig.startAgent({ config, demoPort, env });
  ({ wsUrl, demoUrl } = await step('start keyport (until both stdout lines)', () => agent.ready));
  assert.equal(new URL(demoUrl).origin, demoOrigin);
  assert.equal(new URL(demoUrl).searchParams.get('agent'), wsUrl);
  otherSite = await rig.serveDemoCopy();
  context = await step('launch Chromium', () =>
    chromium.launchPersistentContext(path.join(dir, 'chromium-profile'), {
      executablePath: rig.CHROMIUM,
      headless: false, // the flags below carry --headless=new themselves
      args: rig.CHROMIUM_ARGS,
      viewport: { width: 1100, height: 900 },
    }),
  );
});

after(async () => {
  await context?.close();
  otherSite?.server.close();
  await agent?.stop();
  if (timings.length) console.log(`timings (ms):\n${timings.map(([n, ms]) => `  ${String(ms).padStart(6)}  ${n}`).join('\n')}`);
  if (dir && !process.env.KEYPORT_KEEP_TMP) fs.rmSync(dir, { recursive: true, force: true });
});

async function openPage(url) {
  const page = await context.newPage();
  page.on('console', (m) => pageLog.push(`[${new URL(page.url() || url).origin}] ${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => pageLog.push(`[${url}] pageerror: ${e.message}`));
  page.on('requestfailed', (r) => pageLog.push(`[${url}] request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => r.status() >= 400 && pageLog.push(`[${url}] HTTP ${r.status()}: ${r.url()}`));
  await page.goto(url);
  return page;
}

function certByLabel(label) {
  const cert = cliCerts.find((c) => c.label === label);
  assert.ok(cert, `the token has no certificate labelled ${label}`);
  return cert;
}

/** Clicks a button and waits until the result paragraph leaves its "Waiting…" text. */
async function clickAndSettle(page, button, resultId) {
  await page.click(button);
  await page.waitForFunction(
    (id) => {
      const el = document.getElementById(id);
      return el.className !== '' && !el.textContent.startsWith('Waiting') && !el.textContent.startsWith('Signing');
    },
    resultId,
    { timeout: 30_000 },
  );
  const result = await page.$eval(`#${resultId}`, (el) => ({ text: el.textContent, ok: el.className === 'ok' }));
  const error = await page.$eval('#error', (el) => (el.hidden ? null : `${el.dataset.reason}: ${el.textContent}`));
  return { ...result, error };
}

/** Checks the page's signature again outside the browser, with Node's crypto and the CA-issued PEM. */
function verifyInNode(label, documentText, signatureBase64, ecdsa) {
  const pem = fs.readFileSync(path.join(token.certDir, `${label}.pem`), 'utf8');
  const verifier = createVerify('SHA256');
  verifier.update(documentText);
  const key = ecdsa ? { key: pem, dsaEncoding: 'ieee-p1363' } : pem;
  return verifier.verify(key, Buffer.from(signatureBase64, 'base64'));
}

test('the demo portal lists, signs (ECDSA, RSA), signs a batch of 10 and logs in, verified in the page', async (t) => {
  t.after(() => {
    if (t.passed === false || process.env.KEYPORT_BROWSER_VERBOSE) console.log(pageLog.join('\n'));
  });
  // One GETPIN per operation (pin_cache_seconds = 0, the demo origin is on the allowed list).
  for (let i = 0; i < 4; i++) pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });

  const page = await step('open the demo and list certificates', async () => {
    const p = await openPage(demoUrl);
    await p.waitForSelector('#status[data-state=ready]', { timeout: 30_000 });
    return p;
  });
  const shown = await page.$$eval('#certs option', (options) => options.map((o) => o.value));
  assert.deepEqual([...shown].sort(), cliCerts.map((c) => c.id).sort(), 'the page lists exactly what `keyport certs` lists');
  assert.match(await page.textContent('#status'), new RegExp(`Ready: ${cliCerts.length} certificate`));

  const contract = await page.textContent('#contract');
  for (const [label, scheme, ecdsa] of [
    ['sign-p256', 'ECDSA P-256 with SHA-256', true],
    ['sign-rsa2048', 'RSA-2048 PKCS#1 v1.5 with SHA-256', false],
  ]) {
    const cert = certByLabel(label);
    await page.selectOption('#certs', cert.id);
    const result = await step(`sign with ${label}`, () => clickAndSettle(page, '#sign', 'verify-result'));
    assert.equal(result.error, null);
    assert.ok(result.ok, `page says: ${result.text}`);
    assert.match(result.text, /^Signature verified ✓/);
    assert.ok(result.text.includes(`(${scheme})`), result.text);
    const signature = await page.textContent('#signature');
    assert.ok(verifyInNode(label, contract, signature, ecdsa), `Node's crypto also verifies the ${label} signature`);
  }

  // The README screenshot: the page right after a verified (RSA) signature.
  await step('screenshot', async () => {
    fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
  });

  // Batch of 10 with P-256; record every value the progress bar takes.
  await page.selectOption('#certs', certByLabel('sign-p256').id);
  await page.evaluate(() => {
    window.progressSeen = [];
    const bar = document.getElementById('batch-progress');
    new MutationObserver(() => window.progressSeen.push(`${bar.value}/${bar.max}`)).observe(bar, { attributes: true });
  });
  const batch = await step('batch of 10', () => clickAndSettle(page, '#batch', 'batch-result'));
  assert.equal(batch.error, null);
  assert.ok(batch.ok, `page says: ${batch.text}`);
  assert.equal(batch.text, '10/10 signed, 10 verified ✓');
  assert.deepEqual(await page.$eval('#batch-progress', (bar) => [bar.value, bar.max]), [10, 10]);
  const progressSeen = await page.evaluate(() => window.progressSeen);
  t.diagnostic(`progress bar values: ${progressSeen.join(' ')}`);
  assert.equal(progressSeen.at(-1), '10/10');

  const login = await step('login (authenticate)', () => clickAndSettle(page, '#login', 'login-result'));
  assert.equal(login.error, null);
  assert.ok(login.ok, `page says: ${login.text}`);
  assert.match(login.text, /token verified ✓/);
  const webEid = JSON.parse(await page.textContent('#login-token'));
  assert.equal(webEid.format, 'web-eid:1.0');

  // Four dialogs, each a GETPIN for the demo origin answered with the PIN.
  const dialogs = pinentry.dialogs();
  assert.equal(dialogs.length, 4, JSON.stringify(dialogs, null, 1));
  for (const d of dialogs) {
    assert.deepEqual(d.errors, []);
    assert.equal(d.command, 'GETPIN');
    assert.equal(d.answered, 'pin');
    assert.ok(d.description.includes(demoOrigin), d.description);
  }
  assert.ok(dialogs[0].description.includes('Loan contract 2026-114'));
  assert.ok(dialogs[2].description.includes('Invoices March 2026'));
  await page.close();
});

test('a page from an origin off the list gets ORIGIN_NOT_APPROVED and no dialog', async (t) => {
  const otherOrigin = `http://127.0.0.1:${otherSite.port}`;
  const dialogsBefore = pinentry.dialogs().length;
  const consumedBefore = pinentry.consumed();
  const page = await step('open the demo from another origin', async () => {
    const p = await openPage(`${otherOrigin}/?agent=${encodeURIComponent(wsUrl)}`);
    await p.waitForSelector('#error[data-reason]', { timeout: 30_000 });
    return p;
  });
  const reason = await page.getAttribute('#error', 'data-reason');
  t.diagnostic(`other origin: #error says ${reason}: ${await page.textContent('#error')}`);
  assert.ok(['ORIGIN_NOT_APPROVED', 'ORIGIN_DENIED'].includes(reason), reason);
  assert.equal(reason, 'ORIGIN_NOT_APPROVED');
  // It did connect: hello answered with its own origin, not approved; nothing was listed.
  assert.equal(await page.getAttribute('#status', 'data-state'), 'approving');
  assert.equal(await page.$$eval('#certs option', (o) => o.length), 0);
  assert.ok(await page.isDisabled('#sign'));
  // The agent answered after any dialog would have ended, so the transcript is final here.
  assert.equal(pinentry.dialogs().length, dialogsBefore, 'no pinentry dialog for the other origin');
  assert.equal(pinentry.consumed(), consumedBefore);
  const log = fs.readFileSync(pinentry.log, 'utf8');
  assert.ok(!log.includes(otherOrigin), 'the other origin never reached a dialog');
  await page.close();
});
