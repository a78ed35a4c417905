// The KeyPort reference integration: connect, ask access, list certificates, sign and verify,
// sign a batch with progress, log in. Copy what you need; each step is one short function.
import { KeyPort, KeyPortError, DEFAULT_URL, fromBase64, toBase64 } from '../src/keyport.js';
import { schemeFor, signInputFor, verifySignature, verifyWebEidToken } from './verify.js';

// What to tell the user for each reason (match on err.reason, never on err.message).
const PLAIN_WORDS = {
  AGENT_NOT_RUNNING: 'The KeyPort app is not running on this computer. Start it (or install it) and try again.',
  LOOPBACK_BLOCKED: 'Your browser blocked this page from reaching the KeyPort app. Allow "local network" / "apps on this device" access for this site in the browser (the icon in the address bar), then try again.',
  CONNECTION_LOST: 'The connection to the KeyPort app was lost (it stopped or restarted). Try again in a moment.',
  ABORTED: 'The request was stopped before it finished.',
  CLOSED: 'The connection to KeyPort was closed by this page.',
  BAD_RESPONSE: 'KeyPort sent an answer this page does not understand. Update the KeyPort app.',
  ORIGIN_NOT_APPROVED: 'This site is not allowed to use your certificates yet.',
  ORIGIN_DENIED: 'This site was refused access to your certificates (by you or your organisation).',
  USER_CANCELLED: 'You cancelled the request.',
  PIN_INCORRECT: 'The PIN was wrong.',
  PIN_LOCKED: 'Your token’s PIN is locked. Unblock it with your PUK or ask your administrator.',
  TOKEN_NOT_PRESENT: 'Your token or smartcard is not inserted (or was removed). Insert it and try again.',
  CERTIFICATE_NOT_FOUND: 'That certificate is no longer on the token. Reload the list.',
  KEY_USAGE_NOT_ALLOWED: 'This certificate may not be used for that. Choose another one (signing needs a “non-repudiation” certificate).',
  ALGORITHM_NOT_SUPPORTED: 'Your token cannot sign this way.',
  BUSY: 'KeyPort is already asking you something for this site. Answer that first.',
  TIMEOUT: 'Nobody answered KeyPort’s question in time.',
  RATE_LIMITED: 'Too many requests at once. Wait a moment and try again.',
  PIN_FROM_PAGE_REFUSED: 'A web page may not send a PIN; KeyPort asks for it itself.',
  TOKEN_ERROR: 'The token reported an error.',
  INTERNAL: 'KeyPort hit an internal error.',
  INVALID_PARAMS: 'The request was not valid (a bug in this page).',
};

const $ = (id) => document.getElementById(id);
const subtle = globalThis.crypto.subtle;
const encoder = new TextEncoder();

// Tests run the agent on a random port: ?agent=ws://127.0.0.1:PORT/v1 overrides the default.
const agentUrl = new URL(location.href).searchParams.get('agent') || DEFAULT_URL;

let keyport = null;
let certificates = [];

// ---- connection ----------------------------------------------------------------------------

async function start() {
  clearError();
  setStatus('connecting', `Connecting to the KeyPort agent at ${agentUrl}…`);
  try {
    if (!keyport) {
      keyport = await KeyPort.connect({ url: agentUrl });
      watchConnection();
    }
    const hello = await keyport.hello({ name: 'keyport-demo', version: '0.1.0' });
    setStatus('connected', `Connected to ${hello.agent} ${hello.version} as ${hello.origin}`);
    if (!hello.originApproved) {
      setStatus('approving', 'Waiting for you to allow this site in the KeyPort dialog…');
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
    if (state === 'reconnecting') setStatus('reconnecting', 'Lost the KeyPort agent; reconnecting…');
    if (state === 'open') start(); // the agent is back: hello and reload (nothing is re-sent on its own)
  });
}

async function loadCertificates() {
  certificates = await keyport.listCertificates();
  const select = $('certs');
  const previous = select.value;
  select.replaceChildren(
    ...certificates.map((c) => new Option(`${holder(c.subject)} — ${c.keyAlgorithm} — ${c.keyUsage.join(', ') || 'any use'}`, c.id)),
  );
  // Keep the user's choice; else prefer a signing (non-repudiation) certificate.
  const preferred = certificates.find((c) => c.id === previous) ?? certificates.find((c) => c.keyUsage.includes('nonRepudiation'));
  if (preferred) select.value = preferred.id;
  select.disabled = certificates.length === 0;
  for (const id of ['sign', 'batch', 'login']) $(id).disabled = certificates.length === 0;
  showDetails();
  setStatus('ready', certificates.length ? `Ready: ${certificates.length} certificate(s) found` : 'Connected, but no certificate was found: insert your token');
}

function selected() {
  return certificates.find((c) => c.id === $('certs').value);
}

function showDetails() {
  const c = selected();
  const rows = c
    ? [
        ['Holder', holder(c.subject)],
        ['Subject', c.subject],
        ['Issuer', c.issuer],
        ['Key', c.keyAlgorithm],
        ['Valid', `${day(c.notBefore)} to ${day(c.notAfter)}`],
        ['Key usage', c.keyUsage.join(', ') || '(not restricted)'],
      ]
    : [];
  $('cert-details').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', k), el('dd', v)]));
}

// ---- 1. sign one document and verify the signature in the page ------------------------------

async function signContract() {
  clearError();
  const cert = selected();
  const contract = encoder.encode($('contract').textContent);
  $('verify-result').textContent = 'Waiting for your confirmation and PIN in the KeyPort dialog…';
  try {
    // P-256 → SHA-256 digest, P-384 → SHA-384, RSA → SHA-256 (made here with WebCrypto and sent as
    // `digest`); ECDSA asks for r‖s (p1363) because WebCrypto verifies that form; Ed25519 sends data.
    const input = await signInputFor(subtle, cert.keyAlgorithm, contract);
    const result = await keyport.sign({
      certificateId: cert.id,
      ...input,
      display: { title: 'Loan contract 2026-114', summary: '12 000 EUR over 5 years' },
    });
    $('signature').textContent = result.signatureBase64;
    const ok = await verifySignature(subtle, {
      certificate: cert.certificate,
      keyAlgorithm: cert.keyAlgorithm,
      signature: result.signature,
      document: contract,
    });
    setResult('verify-result', ok, ok ? `Signature verified ✓ (${schemeFor(cert.keyAlgorithm).label})` : 'Signature did NOT verify ✗');
  } catch (err) {
    setResult('verify-result', false, 'Not signed.');
    fail(err);
  }
}

// ---- 2. sign a batch with a progress bar ----------------------------------------------------

async function signBatch() {
  clearError();
  const cert = selected();
  const bar = $('batch-progress');
  const documents = Array.from({ length: 10 }, (_, i) => encoder.encode(`Invoice 2026-${String(i + 1).padStart(3, '0')}: 1 200 EUR`));
  bar.value = 0;
  bar.max = documents.length;
  $('batch-result').textContent = 'Waiting for your confirmation and PIN…';
  try {
    const items = await Promise.all(
      documents.map(async (doc, i) => ({ ...(await signInputFor(subtle, cert.keyAlgorithm, doc)), label: `Invoice ${i + 1}` })),
    );
    // One dialog and one PIN for all; ecdsaEncoding etc. are batch-wide, so lift them out of the items.
    const { ecdsaEncoding, signatureAlgorithm } = items[0];
    const results = await keyport.signBatch({
      certificateId: cert.id,
      items: items.map(({ digest, data, label }) => ({ digest, data, label })),
      ecdsaEncoding,
      signatureAlgorithm,
      display: { title: 'Invoices March 2026', summary: '10 invoices of 1 200 EUR' },
      onProgress: ({ done, total }) => {
        bar.max = total;
        bar.value = done;
        $('batch-result').textContent = `Signing… ${done}/${total}`;
      },
    });
    bar.value = results.length; // the last progress event may be skipped when the batch is quick
    const checks = await Promise.all(
      results.map((r, i) =>
        verifySignature(subtle, { certificate: cert.certificate, keyAlgorithm: cert.keyAlgorithm, signature: r.signature, document: documents[i] }),
      ),
    );
    const good = checks.filter(Boolean).length;
    setResult('batch-result', good === documents.length, `${results.length}/${documents.length} signed, ${good} verified ${good === documents.length ? '✓' : '✗'}`);
  } catch (err) {
    const done = err instanceof KeyPortError && err.results ? ` (${err.results.length} were signed before it stopped)` : '';
    setResult('batch-result', false, `Batch not finished${done}.`);
    fail(err);
  }
}

// ---- 3. log in: sign a fresh server challenge (Web eID token) -------------------------------

async function logIn() {
  clearError();
  // In a real portal the challenge (nonce) comes from your server and the token goes back to it,
  // which validates it with a Web eID library. Here the page makes one and checks the token itself.
  const challenge = toBase64(crypto.getRandomValues(new Uint8Array(32)));
  const cert = loginCertificate();
  $('login-result').textContent = 'Waiting for your confirmation and PIN…';
  try {
    const token = await keyport.authenticate({ challenge, certificateId: cert?.id });
    $('login-token').textContent = JSON.stringify(token, null, 2);
    const ok = await verifyWebEidToken(subtle, { token, origin: location.origin, challenge, fromBase64 });
    const who = cert ? holder(cert.subject) : 'you';
    setResult('login-result', ok, ok ? `Logged in as ${who}: token verified ✓ (${token.algorithm})` : 'Login token did NOT verify ✗');
  } catch (err) {
    setResult('login-result', false, 'Not logged in.');
    fail(err);
  }
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

// ---- display helpers ------------------------------------------------------------------------

function fail(err) {
  const reason = err instanceof KeyPortError ? err.reason : 'INTERNAL';
  let text = PLAIN_WORDS[reason] ?? err.message;
  if (reason === 'PIN_INCORRECT' && err.data.finalTry) text += ' One try is left before the PIN locks.';
  else if (reason === 'PIN_INCORRECT' && err.data.countLow) text += ' Few tries are left.';
  const box = $('error');
  box.dataset.reason = reason;
  box.textContent = `${text} [${reason}]`;
  box.hidden = false;
  if (reason === 'AGENT_NOT_RUNNING' || reason === 'LOOPBACK_BLOCKED') setStatus('error', 'Not connected');
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

function holder(subject) {
  return /(?:^|,)CN=((?:\\.|[^,])*)/.exec(subject)?.[1].replace(/\\(.)/g, '$1') ?? subject;
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

$('certs').addEventListener('change', showDetails);
$('sign').addEventListener('click', signContract);
$('batch').addEventListener('click', signBatch);
$('login').addEventListener('click', logIn);
$('connect').addEventListener('click', start);
start();
