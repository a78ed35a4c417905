// Real-browser end-to-end test (issue 4): Debian's headless Chromium drives the demo portal that
// the real `keyport` agent serves, against a SoftHSM token, with the scripted pinentry as the
// user. Every wait is on DOM state or on the agent's stdout; nothing sleeps.
//
// Needs `cargo build -p agent -p keyport-e2e`, /usr/bin/chromium and `npm ci` here (run.sh).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate, verify as cryptoVerify } from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
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
let publicSite; // the demo over https://portal.test:PORT, which Chromium is told is a public address
let publicOrigin;
const pageLog = [];

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
  publicSite = await startPublicSite(dir);
  publicOrigin = `https://portal.test:${publicSite.port}`;
  // An SM2 USB key beside the SoftHSM token, through the soft SKF library (GM/T 0016).
  const skf = await step('provision the soft SKF key', () => rig.provisionSkf(dir));
  const config = rig.writeConfig(dir, { allowedOrigins: [demoOrigin, publicOrigin], unknownOrigins: 'unapproved', skfLibrary: skf.library });
  const env = { SOFTHSM2_CONF: token.conf, ...pinentry.env(), ...skf.env };
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
  publicSite?.server.close();
  await agent?.stop();
  if (timings.length) console.log(`timings (ms):\n${timings.map(([n, ms]) => `  ${String(ms).padStart(6)}  ${n}`).join('\n')}`);
  if (dir && !process.env.KEYPORT_KEEP_TMP) fs.rmSync(dir, { recursive: true, force: true });
});

/** The demo's files over https with a fresh self-signed certificate for portal.test. */
async function startPublicSite(workDir) {
  const key = path.join(workDir, 'portal.key');
  const cert = path.join(workDir, 'portal.pem');
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-out', cert,
    '-days', '2', '-subj', '/CN=portal.test', '-addext', 'subjectAltName=DNS:portal.test'], { encoding: 'utf8' });
  assert.equal(made.status, 0, made.stderr);
  const tls = { key: fs.readFileSync(key), cert: fs.readFileSync(cert) };
  return rig.serveDemoCopy({ createServer: (handler) => https.createServer(tls, handler) });
}

async function openPage(url, ctx = context) {
  const page = await ctx.newPage();
  page.on('console', (m) => pageLog.push(`[${new URL(page.url() || url).origin}] ${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => pageLog.push(`[${url}] pageerror: ${e.message}`));
  page.on('requestfailed', (r) => pageLog.push(`[${url}] request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => r.status() >= 400 && pageLog.push(`[${url}] HTTP ${r.status()}: ${r.url()}`));
  await page.goto(url);
  return page;
}

/** On failure (or with KEYPORT_BROWSER_VERBOSE=1) prints the pages' console and the agent's log. */
function dumpOnFailure(t) {
  t.after(() => {
    if (t.passed !== false && !process.env.KEYPORT_BROWSER_VERBOSE) return;
    console.log(`--- page console\n${pageLog.join('\n')}\n--- keyport stderr (last 4000 characters)\n${agent?.stderr().slice(-4000)}`);
  });
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
function verifyInNode(cert, documentText, signatureBase64) {
  const signature = Buffer.from(signatureBase64, 'base64');
  const data = Buffer.from(documentText);
  if (cert.keyAlgorithm === 'SM2') return verifySm2WithOpenssl(cert, data, signature);
  // A key on the SKF key: its certificate from the listing (the container is not a file name).
  const pem = cert.tokenId.startsWith('skf-')
    ? new X509Certificate(Buffer.from(cert.certificate, 'base64')).publicKey
    : fs.readFileSync(path.join(token.certDir, `${cert.label}.pem`), 'utf8');
  if (cert.keyAlgorithm === 'Ed25519') return cryptoVerify(null, data, pem, signature);
  const hash = cert.keyAlgorithm === 'EC-P384' ? 'SHA384' : 'SHA256';
  const key = cert.keyAlgorithm.startsWith('EC-') ? { key: pem, dsaEncoding: 'ieee-p1363' } : pem;
  return cryptoVerify(hash, data, key, signature);
}

/** OpenSSL 3's SM2 verification (default user ID), as the demo page tells the user to run it. */
function verifySm2WithOpenssl(cert, data, signature) {
  const work = fs.mkdtempSync(path.join(dir, 'sm2-'));
  const file = (name, bytes) => {
    fs.writeFileSync(path.join(work, name), bytes);
    return path.join(work, name);
  };
  const der = file('cert.der', Buffer.from(cert.certificate, 'base64'));
  const pub = spawnSync('openssl', ['x509', '-inform', 'DER', '-in', der, '-pubkey', '-noout'], { encoding: 'utf8' });
  assert.equal(pub.status, 0, pub.stderr);
  const args = ['dgst', '-sm3', '-verify', file('pub.pem', pub.stdout), '-sigopt', 'distid:1234567812345678'];
  const run = spawnSync('openssl', [...args, '-signature', file('sig.der', signature), file('contract.txt', data)], { encoding: 'utf8' });
  return run.status === 0 && run.stdout.includes('Verified OK');
}

/** What the demo says it signed with, for each key algorithm of the test token. */
function schemeLabel(keyAlgorithm) {
  if (keyAlgorithm === 'SM2') return 'SM2 with SM3';
  if (keyAlgorithm === 'EC-P256') return 'ECDSA P-256 with SHA-256';
  if (keyAlgorithm === 'EC-P384') return 'ECDSA P-384 with SHA-384';
  if (keyAlgorithm === 'Ed25519') return 'Ed25519';
  return `${keyAlgorithm} PKCS#1 v1.5 with SHA-256`;
}

test('the demo portal lists, signs with every signing certificate, signs a batch of 10 and logs in, verified in the page', async (t) => {
  dumpOnFailure(t);
  // Every signing certificate of the token, the always-authenticate ones included; P-256 last,
  // so that the screenshot shows its result beside the certificate the page pre-selects.
  const signing = cliCerts
    .filter((c) => c.keyUsage.includes('nonRepudiation'))
    .sort((a, b) => (a.label === 'sign-p256') - (b.label === 'sign-p256') || a.label.localeCompare(b.label));
  assert.ok(signing.length >= 9, `signing certificates: ${signing.map((c) => c.label)}`);
  // The SKF key's SM2 certificates (one container named in GBK) and its RSA one are among them.
  assert.equal(signing.filter((c) => c.keyAlgorithm === 'SM2').length, 2, `signing certificates: ${signing.map((c) => c.label)}`);
  // One GETPIN per operation (pin_cache_seconds = 0, the demo origin is on the allowed list).
  for (let i = 0; i < signing.length + 2; i++) pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });

  const page = await step('open the demo and list certificates', async () => {
    const p = await openPage(demoUrl);
    await p.waitForSelector('#status[data-state=ready]', { timeout: 30_000 });
    return p;
  });
  // Loopback page → loopback agent: no Local Network Access check, so the fresh profile never
  // had to grant anything (the permission is still at its initial 'prompt').
  const lna = await page.evaluate(() => navigator.permissions.query({ name: 'loopback-network' }).then((p) => p.state, (e) => `unsupported: ${e.message}`));
  t.diagnostic(`loopback-network permission of ${demoOrigin}: ${lna}`);
  assert.notEqual(lna, 'granted');
  const shown = await page.$$eval('#certs option', (options) => options.map((o) => o.value));
  assert.deepEqual([...shown].sort(), cliCerts.map((c) => c.id).sort(), 'the page lists exactly what `keyport certs` lists');
  assert.match(await page.textContent('#status'), new RegExp(`Ready: ${cliCerts.length} certificate`));

  // What a clerk chooses by (issue 14, snag 9): holder, purpose and issuer, not key usage bits.
  const options = await page.$$eval('#certs option', (o) => o.map((x) => x.textContent));
  assert.ok(options.includes('Test Signer P-256 — signing documents — issued by KeyPort Test CA'), options.join('\n'));
  assert.ok(options.some((o) => o.startsWith('Test Client P-256 — logging in — ')), options.join('\n'));
  assert.ok(options.every((o) => !o.includes('CN=') && !o.includes('nonRepudiation')), options.join('\n'));
  assert.equal(await page.getAttribute('html', 'lang'), 'en');

  const contract = await page.textContent('#contract');
  for (const cert of signing) {
    const label = cert.label;
    const scheme = schemeLabel(cert.keyAlgorithm);
    await page.selectOption('#certs', cert.id);
    const result = await step(`sign with ${label}`, () => clickAndSettle(page, '#sign', 'verify-result'));
    assert.equal(result.error, null);
    assert.ok(result.ok, `page says: ${result.text}`);
    if (cert.keyAlgorithm === 'SM2') {
      // WebCrypto has no SM2: the page shows the OpenSSL command, which the test then runs.
      assert.match(result.text, /^Signed \(SM2 with SM3\)\. Browsers cannot verify SM2/);
      assert.match(await page.textContent('#verify-command'), /openssl dgst -sm3 -verify pub\.pem -sigopt distid:1234567812345678/);
    } else {
      assert.match(result.text, /^Signature verified ✓/);
    }
    assert.ok(result.text.includes(`(${scheme})`), result.text);
    const signature = await page.textContent('#signature');
    assert.ok(verifyInNode(cert, contract, signature), `Node's crypto also verifies the ${label} signature`);
  }

  // Batch of 10 with P-256; record every value the progress bar takes.
  await page.selectOption('#certs', certByLabel('sign-p256').id);
  await page.evaluate(() => {
    window.progressSeen = [];
    window.progressEvents = [];
    const bar = document.getElementById('batch-progress');
    new MutationObserver(() => window.progressSeen.push(`${bar.value}/${bar.max}`)).observe(bar, { attributes: true });
    // "Signing… d/t" is written only by onProgress, i.e. by the agent's sign.progress events.
    const text = document.getElementById('batch-result');
    new MutationObserver(() => {
      const m = /^Signing… (\d+\/\d+)$/.exec(text.textContent);
      if (m) window.progressEvents.push(m[1]);
    }).observe(text, { childList: true, characterData: true, subtree: true });
  });
  const batch = await step('batch of 10', () => clickAndSettle(page, '#batch', 'batch-result'));
  assert.equal(batch.error, null);
  assert.ok(batch.ok, `page says: ${batch.text}`);
  assert.equal(batch.text, '10/10 signed, 10 verified ✓');
  assert.deepEqual(await page.$eval('#batch-progress', (bar) => [bar.value, bar.max]), [10, 10]);
  const { progressSeen, progressEvents } = await page.evaluate(() => ({ progressSeen: window.progressSeen, progressEvents: window.progressEvents }));
  t.diagnostic(`progress bar values: ${progressSeen.join(' ')}; sign.progress events shown: ${progressEvents.join(' ') || 'none'}`);
  assert.equal(progressSeen.at(-1), '10/10');
  const done = progressEvents.map((e) => Number(e.split('/')[0]));
  assert.deepEqual(done, [...done].sort((a, b) => a - b), 'progress never goes back');
  assert.ok(progressEvents.every((e) => e.endsWith('/10')));

  // While a request is open (its dialog showing), every action waits: the click handler disables
  // them before its first await, so this reads their state right after the click.
  pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });
  const whileOpen = await page.evaluate(() => {
    document.getElementById('sign').click();
    return ['sign', 'batch', 'login', 'certs'].map((id) => document.getElementById(id).disabled);
  });
  assert.deepEqual(whileOpen, [true, true, true, true]);
  await page.waitForFunction(() => document.getElementById('verify-result').className !== '', null, { timeout: 30_000 });
  assert.equal(await page.isDisabled('#batch'), false, 'enabled again once the request is answered');
  assert.match(await page.textContent('#verify-result'), /^Signature verified ✓/);

  const login = await step('login (authenticate)', () => clickAndSettle(page, '#login', 'login-result'));
  assert.equal(login.error, null);
  assert.ok(login.ok, `page says: ${login.text}`);
  assert.match(login.text, /token verified ✓/);
  const webEid = JSON.parse(await page.textContent('#login-token'));
  assert.equal(webEid.format, 'web-eid:1.0');
  // The token's long base64 lines wrap: the page is no wider than the window.
  await page.evaluate(() => { document.querySelector('#login-token').closest('details').open = true; });
  const widths = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  assert.ok(widths[0] <= widths[1], `page ${widths[0]} px wide in a ${widths[1]} px window`);

  // The README screenshot: every section verified (the contract signed last with P-256).
  await step('screenshot', async () => {
    fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
  });

  // One dialog per signing certificate, the batch's, the sign made while checking the buttons,
  // and the login's: each a GETPIN for the demo origin answered with the PIN.
  const dialogs = pinentry.dialogs();
  assert.equal(dialogs.length, signing.length + 3, JSON.stringify(dialogs, null, 1));
  for (const d of dialogs) {
    assert.deepEqual(d.errors, []);
    assert.equal(d.command, 'GETPIN');
    assert.equal(d.answered, 'pin');
    assert.ok(d.description.includes(demoOrigin), d.description);
  }
  for (const d of dialogs.slice(0, signing.length)) assert.ok(d.description.includes('Loan contract 2026-114'));
  assert.ok(dialogs[signing.length].description.includes('Invoices March 2026'));
  assert.ok(dialogs[signing.length + 1].description.includes('Loan contract 2026-114'));
  await page.close();
});

test('the demo portal speaks Chinese to a Chinese browser (issue 14, snag 9)', async (t) => {
  dumpOnFailure(t);
  pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });
  const zhContext = await step('launch Chromium in zh-CN', () =>
    chromium.launchPersistentContext(path.join(dir, 'chromium-profile-zh'), {
      executablePath: rig.CHROMIUM,
      headless: false,
      args: [...rig.CHROMIUM_ARGS, '--lang=zh-CN'],
      locale: 'zh-CN',
      viewport: { width: 1100, height: 900 },
    }),
  );
  try {
    const page = await openPage(demoUrl, zhContext);
    await page.waitForSelector('#status[data-state=ready]', { timeout: 30_000 });
    assert.equal(await page.getAttribute('html', 'lang'), 'zh-CN');
    assert.equal(await page.title(), 'KeyPort 演示门户');
    assert.match(await page.textContent('#status'), new RegExp(`^就绪：找到 ${cliCerts.length} 张证书$`));
    await page.selectOption('#certs', certByLabel('sign-p256').id);
    const option = await page.$eval('#certs', (s) => s.selectedOptions[0].textContent);
    assert.equal(option, 'Test Signer P-256 — 签署文件 — 颁发者：KeyPort Test CA');
    assert.match(await page.textContent('#contract'), /^借款合同 2026-114/);
    const result = await step('sign in Chinese', () => clickAndSettle(page, '#sign', 'verify-result'));
    assert.equal(result.error, null);
    assert.ok(result.ok, result.text);
    assert.match(result.text, /^签名已验证 ✓（ECDSA P-256 with SHA-256）$/);
    const shown = pinentry.dialogs().at(-1);
    assert.ok(shown.description.includes('借款合同 2026-114'), shown.description);
    await page.screenshot({ path: path.join(rig.ROOT, 'docs', 'demo-portal-zh.png'), fullPage: true });
  } finally {
    await zhContext.close();
  }
});

test('a page from an origin off the list gets ORIGIN_NOT_APPROVED and no dialog', async (t) => {
  dumpOnFailure(t);
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

// Local Network Access (Chromium 142+; WebSockets from 147): a page from a PUBLIC address that
// opens ws://127.0.0.1 needs the user's `loopback-network` permission. Here the page is
// https://portal.test:PORT, resolved to 127.0.0.1 by --host-resolver-rules and declared public
// with --ip-address-space-overrides (without it 127.0.0.1 counts as loopback and no check runs);
// --ignore-certificate-errors accepts its self-signed certificate. Headless Chromium cannot show
// the prompt, so an ungranted permission reads as denied.
test('Local Network Access: a public https page is blocked (LOOPBACK_BLOCKED) until the loopback permission is granted', async (t) => {
  const lnaContext = await step('launch Chromium with portal.test as a public address', () =>
    chromium.launchPersistentContext(path.join(dir, 'chromium-profile-lna'), {
      executablePath: rig.CHROMIUM,
      headless: false,
      args: [
        ...rig.CHROMIUM_ARGS,
        '--host-resolver-rules=MAP portal.test 127.0.0.1',
        '--ignore-certificate-errors',
        `--ip-address-space-overrides=127.0.0.1:${publicSite.port}=public`,
      ],
    }),
  );
  t.after(() => lnaContext.close());
  dumpOnFailure(t);
  const url = `${publicOrigin}/?agent=${encodeURIComponent(wsUrl)}`;
  const permissions = () =>
    Promise.all(
      ['loopback-network', 'local-network-access'].map((name) =>
        navigator.permissions.query({ name }).then((p) => `${name}=${p.state}`, () => `${name}=unknown`),
      ),
    );

  const blocked = await step('public page without the permission', async () => {
    const p = await openPage(url, lnaContext);
    await p.waitForSelector('#error[data-reason]', { timeout: 30_000 });
    return p;
  });
  const states = await blocked.evaluate(permissions);
  t.diagnostic(`without permission: ${await blocked.textContent('#error')} (${states.join(', ')}, secure context: ${await blocked.evaluate(() => isSecureContext)})`);
  assert.equal(await blocked.getAttribute('#error', 'data-reason'), 'LOOPBACK_BLOCKED');
  assert.equal(await blocked.getAttribute('#status', 'data-state'), 'error');
  assert.ok(pageLog.some((l) => l.includes('ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS')), 'Chromium reports the LNA block');
  await blocked.close();

  await lnaContext.grantPermissions(['local-network-access'], { origin: publicOrigin });
  const allowed = await step('public page with the permission granted', async () => {
    const p = await openPage(url, lnaContext);
    await p.waitForSelector('#status[data-state=ready]', { timeout: 30_000 });
    return p;
  });
  t.diagnostic(`granted: ${await allowed.textContent('#status')} (${(await allowed.evaluate(permissions)).join(', ')})`);
  assert.equal(await allowed.$$eval('#certs option', (o) => o.length), cliCerts.length);
  await allowed.close();
});

// Enrolment (issue 13): the demo makes a key and its request on the token, the test CA issues a
// certificate from the request with OpenSSL, the page stores it, lists it and signs with it.
test('the demo portal enrols: a key and request made on the token, the issued certificate stored and used', async (t) => {
  dumpOnFailure(t);
  const page = await openPage(demoUrl);
  await page.waitForSelector('#status[data-state=ready]', { timeout: 30_000 });
  const before = await page.$$eval('#certs option', (o) => o.length);

  pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });
  await page.selectOption('#enrol-algorithm', 'EC-P256');
  await page.fill('#enrol-subject', 'CN=Demo Enrolee,O=Example Bank,C=CN');
  const generated = await step('generate a key and a request', () => clickAndSettle(page, '#generate', 'generate-result'));
  assert.equal(generated.error, null);
  assert.ok(generated.ok, generated.text);
  const dialog = pinentry.dialogs().at(-1);
  assert.equal(dialog.title, 'KeyPort: create a key');
  assert.ok(dialog.description.includes(`${demoOrigin} asks to create a new key on your token.`), dialog.description);
  assert.ok(dialog.description.includes('CN=Demo Enrolee,O=Example Bank,C=CN'), dialog.description);

  // The request the page shows verifies with OpenSSL; the test CA issues from it.
  const csr = await page.inputValue('#csr');
  assert.match(csr, /^-----BEGIN CERTIFICATE REQUEST-----\n/);
  const work = fs.mkdtempSync(path.join(dir, 'enrol-'));
  fs.writeFileSync(path.join(work, 'req.pem'), csr);
  const verified = spawnSync('openssl', ['req', '-verify', '-in', 'req.pem', '-noout', '-subject'], { cwd: work, encoding: 'utf8' });
  assert.equal(verified.status, 0, verified.stderr);
  assert.match(verified.stdout + verified.stderr, /verify OK/);
  assert.match(verified.stdout, /CN = Demo Enrolee/);
  fs.writeFileSync(path.join(work, 'ext.cnf'), '[ext]\nkeyUsage=critical,digitalSignature,nonRepudiation\n');
  const hsm = path.dirname(token.certDir);
  const issued = spawnSync('openssl', ['x509', '-req', '-in', 'req.pem', '-CA', path.join(hsm, 'ca.pem'), '-CAkey', path.join(hsm, 'ca.key'),
    '-days', '30', '-extfile', 'ext.cnf', '-extensions', 'ext', '-out', 'cert.pem'], { cwd: work, encoding: 'utf8' });
  assert.equal(issued.status, 0, issued.stderr);

  // A paste that is not a certificate is refused in the page, without a dialog.
  const dialogsBefore = pinentry.dialogs().length;
  await page.fill('#cert-pem', 'hello');
  await page.click('#import');
  await page.waitForFunction(() => document.getElementById('import-result').className === 'bad');
  assert.equal(pinentry.dialogs().length, dialogsBefore);

  pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });
  await page.fill('#cert-pem', fs.readFileSync(path.join(work, 'cert.pem'), 'utf8'));
  const stored = await step('store the issued certificate', () => clickAndSettle(page, '#import', 'import-result'));
  assert.equal(stored.error, null);
  assert.ok(stored.ok, stored.text);
  assert.match(stored.text, /Demo Enrolee/);
  assert.equal(pinentry.dialogs().at(-1).title, 'KeyPort: store a certificate');
  assert.equal(await page.$$eval('#certs option', (o) => o.length), before + 1);
  const option = await page.$eval('#certs', (s) => s.selectedOptions[0].textContent);
  assert.equal(option, 'Demo Enrolee — signing documents — issued by KeyPort Test CA');

  // The new key signs the contract, verified in the page and again with Node's crypto.
  pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });
  const signed = await step('sign with the enrolled key', () => clickAndSettle(page, '#sign', 'verify-result'));
  assert.equal(signed.error, null);
  assert.ok(signed.ok, signed.text);
  const signature = Buffer.from(await page.textContent('#signature'), 'base64');
  const contract = Buffer.from(await page.textContent('#contract'));
  const pemText = fs.readFileSync(path.join(work, 'cert.pem'), 'utf8');
  assert.ok(cryptoVerify('SHA256', contract, { key: pemText, dsaEncoding: 'ieee-p1363' }, signature));

  // The same section with the SM2 key type makes the key on the USB key (SKF, PIN 123456): an
  // SM3withSM2 request over the default user ID, issued by the SM2 test CA, stored and listed.
  pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });
  await page.selectOption('#enrol-algorithm', 'SM2');
  await page.fill('#enrol-subject', 'CN=演示用户,O=示例银行,C=CN');
  const sm2 = await step('generate an SM2 key and request on the USB key', () => clickAndSettle(page, '#generate', 'generate-result'));
  assert.equal(sm2.error, null);
  assert.ok(sm2.ok, sm2.text);
  const sm2Dialog = pinentry.dialogs().at(-1);
  assert.ok(sm2Dialog.description.includes('«SM2»') && sm2Dialog.description.includes('Container: «演示用户»'), sm2Dialog.description);
  fs.writeFileSync(path.join(work, 'sm2-req.pem'), await page.inputValue('#csr'));
  const distid = 'distid:1234567812345678';
  const sm2Verified = spawnSync('openssl', ['req', '-verify', '-in', 'sm2-req.pem', '-noout', '-vfyopt', distid], { cwd: work, encoding: 'utf8' });
  assert.match(sm2Verified.stdout + sm2Verified.stderr, /verify OK/);
  const skfStore = path.join(dir, 'skf-key');
  const sm2Issued = spawnSync('openssl', ['x509', '-req', '-in', 'sm2-req.pem', '-vfyopt', distid, '-CA', path.join(skfStore, 'ca.pem'),
    '-CAkey', path.join(skfStore, 'ca.key'), '-sm3', '-sigopt', distid, '-days', '30', '-extfile', 'ext.cnf', '-extensions', 'ext',
    '-out', 'sm2-cert.pem'], { cwd: work, encoding: 'utf8' });
  assert.equal(sm2Issued.status, 0, sm2Issued.stderr);
  pinentry.push({ pin: rig.USER_PIN, expect: 'GETPIN' });
  await page.fill('#cert-pem', fs.readFileSync(path.join(work, 'sm2-cert.pem'), 'utf8'));
  const sm2Stored = await step('store the SM2 certificate', () => clickAndSettle(page, '#import', 'import-result'));
  assert.equal(sm2Stored.error, null);
  assert.ok(sm2Stored.ok, sm2Stored.text);
  assert.equal(await page.$$eval('#certs option', (o) => o.length), before + 2);
  const sm2Option = await page.$eval('#certs', (s) => s.selectedOptions[0].textContent);
  assert.equal(sm2Option, '演示用户 — signing documents — issued by KeyPort SM2 Test CA');
  await page.close();
});
