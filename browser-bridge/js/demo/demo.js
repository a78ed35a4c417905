// The KeyPort reference integration: connect, ask access, list certificates, sign and verify,
// sign a batch with progress, log in, enrol (a key and request made on the token, the issued
// certificate stored beside it). Copy what you need; each step is one short function.
import { KeyPort, KeyPortError, DEFAULT_URL, fromBase64, toBase64 } from '../src/keyport.js';
import { schemeFor, signInputFor, verifySignature, verifyWebEidToken } from './verify.js';
import { TEXTS, pickLanguage, translate } from './texts.js';

// The page's language: the browser's (any Chinese → zh-CN, else English), or ?lang=…
const LANG = pickLanguage(location.search, navigator.languages?.length ? navigator.languages : [navigator.language]);
const t = (key, vars) => translate(LANG, key, vars);

const $ = (id) => document.getElementById(id);
const subtle = globalThis.crypto.subtle;
const encoder = new TextEncoder();

// Tests run the agent on a random port: ?agent=ws://127.0.0.1:PORT/v1 overrides the default.
const agentUrl = new URL(location.href).searchParams.get('agent') || DEFAULT_URL;

let keyport = null;
let certificates = [];
// One request at a time: while KeyPort shows a dialog the buttons wait (a second click would
// only get BUSY, and its failure would be written over the first request's line).
let inFlight = false;

// ---- connection ----------------------------------------------------------------------------

async function start() {
  clearError();
  setStatus('connecting', t('connecting', { url: agentUrl }));
  try {
    if (!keyport) {
      keyport = await KeyPort.connect({ url: agentUrl });
      watchConnection();
    }
    const hello = await keyport.hello({ name: 'keyport-demo', version: '0.1.0' });
    setStatus('connected', t('connected', { agent: hello.agent, version: hello.version, origin: hello.origin }));
    if (!hello.originApproved) {
      setStatus('approving', t('approving'));
      await keyport.requestAccess();
    }
    await loadCertificates();
    $('connect').hidden = true;
  } catch (err) {
    fail(err);
    $('connect').hidden = false;
  }
}

function watchConnection() {
  keyport.onTokensChanged(() => loadCertificates().catch(fail)); // a token went in or out
  keyport.onStateChange((state) => {
    if (state === 'reconnecting') setStatus('reconnecting', t('reconnecting'));
    if (state === 'open') start(); // the agent is back: hello and reload (nothing is re-sent on its own)
  });
}

async function loadCertificates() {
  certificates = await keyport.listCertificates();
  const select = $('certs');
  const previous = select.value;
  // What a clerk chooses by: whose certificate, what it is for, who issued it.
  select.replaceChildren(
    ...certificates.map((c) => new Option(`${holder(c.subject)} — ${purpose(c)} — ${t('optionIssuedBy', { issuer: holder(c.issuer) })}`, c.id)),
  );
  // Keep the user's choice; else prefer a signing (non-repudiation) certificate.
  const preferred = certificates.find((c) => c.id === previous) ?? certificates.find((c) => c.keyUsage.includes('nonRepudiation'));
  if (preferred) select.value = preferred.id;
  setBusy(inFlight);
  showDetails();
  setStatus('ready', certificates.length ? t('ready', { n: certificates.length }) : t('noCertificates'));
}

function selected() {
  return certificates.find((c) => c.id === $('certs').value);
}

function showDetails() {
  const c = selected();
  const rows = c
    ? [
        [t('holder'), holder(c.subject)],
        ...(attribute(c.subject, 'O') ? [[t('organisation'), attribute(c.subject, 'O')]] : []),
        [t('purpose'), purpose(c)],
        [t('issuedBy'), holder(c.issuer)],
        [t('valid'), t('validRange', { from: day(c.notBefore), to: day(c.notAfter) })],
      ]
    : [];
  $('cert-details').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', k), el('dd', v)]));
  const technical = c
    ? [
        [t('subject'), c.subject],
        [t('issuer'), c.issuer],
        [t('key'), c.keyAlgorithm],
        [t('keyUsage'), c.keyUsage.join(', ') || t('notRestricted')],
      ]
    : [];
  $('cert-technical-list').replaceChildren(...technical.flatMap(([k, v]) => [el('dt', k), el('dd', v)]));
  $('cert-technical').hidden = !c;
}

/** What KeyPort lets the certificate do, in words: a key has one purpose (a nonRepudiation
 *  certificate signs documents, a digitalSignature-only one logs in). */
function purpose(c) {
  if (c.keyUsage.length === 0) return t('forAny');
  if (c.keyUsage.includes('nonRepudiation')) return t('forSigning');
  if (c.keyUsage.includes('digitalSignature')) return t('forLogin');
  return t('forAny');
}

/** Disables every action while a request runs (and when there is no certificate). */
function setBusy(busy) {
  inFlight = busy;
  const none = certificates.length === 0;
  for (const id of ['sign', 'batch', 'login']) $(id).disabled = busy || none;
  $('certs').disabled = busy || none;
  // Enrolment needs a token, not a certificate.
  for (const id of ['generate', 'import']) $(id).disabled = busy || !keyport;
}

/** Runs one user action: one at a time, a fresh line and no stale error when it starts. */
async function action(resultId, waitingText, fn) {
  if (inFlight) return;
  setBusy(true);
  clearError();
  $(resultId).className = '';
  $(resultId).textContent = waitingText;
  try {
    await fn();
  } finally {
    setBusy(false);
  }
}

// ---- 1. sign one document and verify the signature in the page ------------------------------

function signContract() {
  return action('verify-result', t('waitingDialog'), async () => {
    const cert = selected();
    const contract = encoder.encode($('contract').textContent);
    try {
      // P-256 → SHA-256 digest, P-384 → SHA-384, RSA → SHA-256 (made here with WebCrypto and sent as
      // `digest`); ECDSA asks for r‖s (p1363) because WebCrypto verifies that form; Ed25519 sends data.
      const input = await signInputFor(subtle, cert.keyAlgorithm, contract);
      const result = await keyport.sign({
        certificateId: cert.id,
        ...input,
        display: { title: t('contractTitle'), summary: t('contractSummary') },
      });
      $('signature').textContent = result.signatureBase64;
      const ok = await verifySignature(subtle, {
        certificate: cert.certificate,
        keyAlgorithm: cert.keyAlgorithm,
        signature: result.signature,
        document: contract,
      });
      if (ok === null) {
        // SM2: the browser cannot verify; say how to, with OpenSSL 3 (the default user ID).
        setResult('verify-result', true, t('verifyWithOpenssl', { scheme: schemeFor(cert.keyAlgorithm).label }));
        $('verify-command').textContent =
          'openssl x509 -pubkey -noout -in cert.pem > pub.pem\n' +
          'base64 -d signature.b64 > signature.der\n' +
          'openssl dgst -sm3 -verify pub.pem -sigopt distid:1234567812345678 -signature signature.der contract.txt';
      } else {
        $('verify-command').textContent = '';
        setResult('verify-result', ok, ok ? t('verified', { scheme: schemeFor(cert.keyAlgorithm).label }) : t('notVerified'));
      }
    } catch (err) {
      setResult('verify-result', false, t('notSigned'));
      fail(err);
    }
  });
}

// ---- 2. sign a batch with a progress bar ----------------------------------------------------

function signBatch() {
  return action('batch-result', t('waitingShort'), async () => {
    const cert = selected();
    const bar = $('batch-progress');
    const documents = Array.from({ length: 10 }, (_, i) => encoder.encode(`Invoice 2026-${String(i + 1).padStart(3, '0')}: 1 200 EUR`));
    bar.value = 0;
    bar.max = documents.length;
    try {
      const items = await Promise.all(
        documents.map(async (doc, i) => ({ ...(await signInputFor(subtle, cert.keyAlgorithm, doc)), label: t('invoiceLabel', { n: i + 1 }) })),
      );
      // One dialog and one PIN for all; ecdsaEncoding etc. are batch-wide, so lift them out of the items.
      const { ecdsaEncoding, signatureAlgorithm } = items[0];
      const results = await keyport.signBatch({
        certificateId: cert.id,
        items: items.map(({ digest, data, label }) => ({ digest, data, label })),
        ecdsaEncoding,
        signatureAlgorithm,
        display: { title: t('batchTitle'), summary: t('batchSummary') },
        onProgress: ({ done, total }) => {
          bar.max = total;
          bar.value = done;
          $('batch-result').textContent = t('signing', { done, total });
        },
      });
      bar.value = results.length; // the last progress event may be skipped when the batch is quick
      const checks = await Promise.all(
        results.map((r, i) =>
          verifySignature(subtle, { certificate: cert.certificate, keyAlgorithm: cert.keyAlgorithm, signature: r.signature, document: documents[i] }),
        ),
      );
      const good = checks.filter(Boolean).length;
      if (checks.every((c) => c === null)) {
        setResult('batch-result', true, t('batchSignedOnly', { signed: results.length, total: documents.length }));
        return;
      }
      const all = good === documents.length;
      setResult('batch-result', all, t('batchDone', { signed: results.length, total: documents.length, good, mark: all ? '✓' : '✗' }));
    } catch (err) {
      const done = err instanceof KeyPortError && err.results ? t('batchSignedBefore', { n: err.results.length }) : '';
      setResult('batch-result', false, t('batchStopped', { done }));
      fail(err);
    }
  });
}

// ---- 3. log in: sign a fresh server challenge (Web eID token) -------------------------------

function logIn() {
  return action('login-result', t('waitingShort'), async () => {
    // In a real portal the challenge (nonce) comes from your server and the token goes back to it,
    // which validates it with a Web eID library. Here the page makes one and checks the token itself.
    const challenge = toBase64(crypto.getRandomValues(new Uint8Array(32)));
    const cert = loginCertificate();
    try {
      const token = await keyport.authenticate({ challenge, certificateId: cert?.id });
      $('login-token').textContent = JSON.stringify(token, null, 2);
      const ok = await verifyWebEidToken(subtle, { token, origin: location.origin, challenge, fromBase64 });
      const who = cert ? holder(cert.subject) : t('you');
      setResult('login-result', ok, ok ? t('loggedIn', { who, algorithm: token.algorithm }) : t('loginNotVerified'));
    } catch (err) {
      setResult('login-result', false, t('notLoggedIn'));
      fail(err);
    }
  });
}

// Login needs digitalSignature: the selected certificate if it allows it, else the first that does.
// A certificate either signs documents or logs in (docs/protocol.md, "One key, one
// purpose"): login certificates have the clientAuth usage, or digitalSignature without
// nonRepudiation. The selected one is used when it is such a certificate, else the first one.
function loginCertificate() {
  const ok = (c) =>
    c &&
    ((c.extendedKeyUsage ?? []).includes('clientAuth') ||
      (c.keyUsage.includes('digitalSignature') && !c.keyUsage.includes('nonRepudiation')));
  return ok(selected()) ? selected() : certificates.find(ok);
}

// ---- 4. enrolment: a key and its request made on the token, the issued certificate stored ----

let enrolToken = null; // the token the key was made on: its certificate goes there

function generateKey() {
  return action('generate-result', t('waitingShort'), async () => {
    try {
      // The selected certificate's token, else the first token present; SM2 keys are made on
      // a USB key reached through SKF (ids `skf-…`), the other types on PKCS#11 tokens.
      const algorithm = $('enrol-algorithm').value;
      const fits = (tk) => tk.id.startsWith('skf-') === (algorithm === 'SM2');
      const tokens = (await keyport.listTokens()).filter(fits);
      const token = tokens.find((tk) => tk.id === selected()?.tokenId) ?? tokens[0];
      if (!token) {
        setResult('generate-result', false, t('noToken'));
        return;
      }
      const subject = $('enrol-subject').value.trim();
      const { csrBase64 } = await keyport.generateKey({
        tokenId: token.id,
        algorithm,
        label: holder(subject),
        subject,
      });
      enrolToken = token;
      $('csr').value = pem('CERTIFICATE REQUEST', csrBase64);
      setResult('generate-result', true, t('generated', { token: token.label }));
    } catch (err) {
      setResult('generate-result', false, t('notGenerated'));
      fail(err);
    }
  });
}

function importCertificate() {
  return action('import-result', t('waitingShort'), async () => {
    const m = /-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----/.exec($('cert-pem').value);
    if (!m) {
      setResult('import-result', false, t('notPem'));
      return;
    }
    try {
      const tokenId = enrolToken?.id ?? (await keyport.listTokens())[0]?.id;
      const { certificateId } = await keyport.importCertificate({ tokenId, certificate: m[1].replace(/\s+/g, '') });
      await loadCertificates();
      $('certs').value = certificateId;
      showDetails();
      setResult('import-result', true, t('imported', { holder: holder(selected()?.subject ?? '') }));
    } catch (err) {
      setResult('import-result', false, t('notImported'));
      fail(err);
    }
  });
}

/** Base64 DER as PEM, 64 characters a line. */
function pem(label, base64) {
  return `-----BEGIN ${label}-----\n${base64.match(/.{1,64}/g).join('\n')}\n-----END ${label}-----\n`;
}

// ---- display helpers ------------------------------------------------------------------------

function fail(err) {
  const reason = err instanceof KeyPortError ? err.reason : 'INTERNAL';
  let text = TEXTS[LANG].reasons[reason] ?? err.message;
  if (reason === 'PIN_INCORRECT' && err.data.finalTry) text += t('finalTry');
  else if (reason === 'PIN_INCORRECT' && err.data.countLow) text += t('countLow');
  const box = $('error');
  box.dataset.reason = reason;
  box.textContent = `${text} [${reason}]`;
  box.hidden = false;
  if (reason === 'AGENT_NOT_RUNNING' || reason === 'LOOPBACK_BLOCKED') setStatus('error', t('notConnected'));
  console.error(err);
}

function clearError() {
  $('error').hidden = true;
  $('error').textContent = '';
  delete $('error').dataset.reason;
}

function setStatus(state, text) {
  $('status').dataset.state = state;
  $('status').textContent = text;
}

function setResult(id, ok, text) {
  $(id).textContent = text;
  $(id).className = ok ? 'ok' : 'bad';
}

function holder(name) {
  return attribute(name, 'CN') ?? name;
}

/** One attribute (CN, O, …) of an RFC 4514 name, unescaped. */
function attribute(name, type) {
  const m = new RegExp(`(?:^|,)${type}=((?:\\\\.|[^,])*)`).exec(name);
  return m ? m[1].replace(/\\(.)/g, '$1') : null;
}

function day(rfc3339) {
  return rfc3339.slice(0, 10);
}

function el(tag, text) {
  const e = document.createElement(tag);
  e.textContent = text;
  return e;
}

// ---- wiring ---------------------------------------------------------------------------------

document.documentElement.lang = LANG;
for (const node of document.querySelectorAll('[data-t]')) node.textContent = t(node.dataset.t);
$('contract').textContent = t('contract');

$('certs').addEventListener('change', showDetails);
$('sign').addEventListener('click', signContract);
$('batch').addEventListener('click', signBatch);
$('login').addEventListener('click', logIn);
$('generate').addEventListener('click', generateKey);
$('import').addEventListener('click', importCertificate);
$('connect').addEventListener('click', start);
start();
