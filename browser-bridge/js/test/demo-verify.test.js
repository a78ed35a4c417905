// The demo's in-page verification (demo/verify.js) against certificates made by OpenSSL and
// signatures made by Node's crypto: an independent signer, so a bug in the walker or in the
// WebCrypto parameters shows.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { X509Certificate, createHash, createPrivateKey, sign as nodeSign } from 'node:crypto';
import { spkiFromCertificate, signInputFor, verifySignature, verifyWebEidToken } from '../demo/verify.js';
import { fromBase64 } from '../src/keyport.js';

const subtle = globalThis.crypto.subtle;
const hasOpenssl = spawnSync('openssl', ['version']).status === 0;

// keyAlgorithm (as the agent names it) → openssl req -newkey argument and its options
const KEYS = {
  'EC-P256': ['ec', '-pkeyopt', 'ec_paramgen_curve:P-256'],
  'EC-P384': ['ec', '-pkeyopt', 'ec_paramgen_curve:P-384'],
  'EC-P521': ['ec', '-pkeyopt', 'ec_paramgen_curve:P-521'],
  'RSA-2048': ['rsa:2048'],
  Ed25519: ['ed25519'],
};

function makeCertificate(keyAlgorithm) {
  const dir = mkdtempSync(join(tmpdir(), 'keyport-demo-'));
  try {
    const [newkey, ...opts] = KEYS[keyAlgorithm];
    const r = spawnSync('openssl', [
      'req', '-x509', '-newkey', newkey, ...opts, '-nodes', '-keyout', join(dir, 'key.pem'),
      '-out', join(dir, 'cert.der'), '-outform', 'DER', '-subj', '/CN=Alice Example/O=Example', '-days', '2',
      '-addext', 'keyUsage=critical,nonRepudiation,digitalSignature',
    ]);
    assert.equal(r.status, 0, r.stderr.toString());
    return { der: new Uint8Array(readFileSync(join(dir, 'cert.der'))), key: createPrivateKey(readFileSync(join(dir, 'key.pem'))) };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const HASH = { 'EC-P256': 'sha256', 'EC-P384': 'sha384', 'EC-P521': 'sha512', 'RSA-2048': 'sha256', Ed25519: null };
const document = new TextEncoder().encode('Loan contract 2026-114: 12 000 EUR over 5 years.');

for (const keyAlgorithm of Object.keys(KEYS)) {
  test(`${keyAlgorithm}: SPKI from the DER walker equals OpenSSL's; a signature over the document verifies, a forged one not`, { skip: !hasOpenssl && 'no openssl' }, async () => {
    const { der, key } = makeCertificate(keyAlgorithm);
    const expectedSpki = new X509Certificate(der).publicKey.export({ type: 'spki', format: 'der' });
    assert.deepEqual(spkiFromCertificate(der), new Uint8Array(expectedSpki));

    // What the page would send: a digest it made (and p1363 for ECDSA), or the data for Ed25519.
    const input = await signInputFor(subtle, keyAlgorithm, document);
    const hash = HASH[keyAlgorithm];
    if (hash) {
      assert.deepEqual(input.digest.value, new Uint8Array(createHash(hash).update(document).digest()));
    } else {
      assert.equal(input.data, document);
    }
    assert.equal(input.ecdsaEncoding, keyAlgorithm.startsWith('EC-') ? 'p1363' : undefined);

    // What the token would answer: Node signs the same way (r‖s for ECDSA).
    const signature = nodeSign(hash, document, keyAlgorithm.startsWith('EC-') ? { key, dsaEncoding: 'ieee-p1363' } : key);
    assert.equal(await verifySignature(subtle, { certificate: der, keyAlgorithm, signature, document }), true);
    const forged = new Uint8Array(signature);
    forged[forged.length - 1] ^= 1;
    assert.equal(await verifySignature(subtle, { certificate: der, keyAlgorithm, signature: forged, document }), false);
    const otherDocument = new TextEncoder().encode('Loan contract 2026-115');
    assert.equal(await verifySignature(subtle, { certificate: der, keyAlgorithm, signature, document: otherDocument }), false);
  });
}

// Web eID: the token signs H(H(origin) ‖ H(challenge)); for EdDSA the 64 bytes themselves.
for (const [keyAlgorithm, algorithm, hash] of [['EC-P256', 'ES256', 'sha256'], ['EC-P384', 'ES384', 'sha384'], ['RSA-2048', 'RS256', 'sha256'], ['Ed25519', 'EdDSA', 'sha256']]) {
  test(`Web eID token ${algorithm} verifies for its origin and challenge only`, { skip: !hasOpenssl && 'no openssl' }, async () => {
    const { der, key } = makeCertificate(keyAlgorithm);
    const origin = 'http://127.0.0.1:47334';
    const challenge = Buffer.from(globalThis.crypto.getRandomValues(new Uint8Array(32))).toString('base64');
    const h = (s) => createHash(hash).update(s, 'utf8').digest();
    const message = Buffer.concat([h(origin), h(challenge)]);
    const signature =
      algorithm === 'EdDSA'
        ? nodeSign(null, message, key)
        : nodeSign(hash, message, algorithm.startsWith('ES') ? { key, dsaEncoding: 'ieee-p1363' } : key);
    const token = {
      unverifiedCertificate: Buffer.from(der).toString('base64'),
      algorithm,
      signature: signature.toString('base64'),
      format: 'web-eid:1.0',
      appVersion: 'urn:keyport:0.1.0',
    };
    assert.equal(await verifyWebEidToken(subtle, { token, origin, challenge, fromBase64 }), true);
    assert.equal(await verifyWebEidToken(subtle, { token, origin: 'https://evil.example', challenge, fromBase64 }), false);
    const otherChallenge = Buffer.from(new Uint8Array(32)).toString('base64');
    assert.equal(await verifyWebEidToken(subtle, { token, origin, challenge: otherChallenge, fromBase64 }), false);
  });
}

test('the DER walker refuses what is not a certificate', () => {
  assert.throws(() => spkiFromCertificate(new Uint8Array([0x04, 0x01, 0x00])));
  assert.throws(() => spkiFromCertificate(new Uint8Array([0x30, 0x82, 0x10])));
  assert.throws(() => spkiFromCertificate(new Uint8Array([0x30, 0x03, 0x30, 0x01, 0x02])));
});
