// Checking KeyPort's answers in the page with WebCrypto — the part of the demo a portal copies
// when it wants to see a signature is good before it uploads it. No dependencies.
//
// The public key comes out of the certificate with a tiny DER walker: a certificate is
//   SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
//              issuer, validity, subject, subjectPublicKeyInfo, ... }, ... }
// and WebCrypto imports the SubjectPublicKeyInfo as is ('spki').

/** One DER element at `offset`: its tag, where its content starts and where it ends. */
export function readTlv(bytes, offset = 0) {
  if (offset + 2 > bytes.length) throw new Error('DER: truncated');
  const tag = bytes[offset];
  if ((tag & 0x1f) === 0x1f) throw new Error('DER: multi-byte tags are not used in certificates');
  let length = bytes[offset + 1];
  let contentStart = offset + 2;
  if (length & 0x80) {
    const n = length & 0x7f;
    if (n === 0 || n > 4) throw new Error('DER: indefinite or oversized length');
    length = 0;
    for (let i = 0; i < n; i++) length = length * 256 + bytes[contentStart + i];
    contentStart += n;
  }
  const end = contentStart + length;
  if (end > bytes.length) throw new Error('DER: element runs past the end');
  return { tag, start: offset, contentStart, end };
}

/** The elements inside a constructed element. */
export function children(bytes, tlv) {
  const out = [];
  for (let at = tlv.contentStart; at < tlv.end; at = out[out.length - 1].end) out.push(readTlv(bytes, at));
  return out;
}

/** The SubjectPublicKeyInfo (DER bytes) of an X.509 certificate (DER bytes). */
export function spkiFromCertificate(der) {
  const cert = readTlv(der);
  if (cert.tag !== 0x30) throw new Error('not a certificate: no outer SEQUENCE');
  const tbs = children(der, cert)[0];
  const fields = children(der, tbs);
  const skip = fields[0].tag === 0xa0 ? 1 : 0; // explicit [0] version is present in v3 certificates
  const spki = fields[skip + 5];
  if (!spki || spki.tag !== 0x30) throw new Error('not a certificate: no SubjectPublicKeyInfo');
  return der.slice(spki.start, spki.end);
}

/**
 * How the demo signs and verifies for each key algorithm the agent reports:
 * `digest` is the hash the page computes (null: the agent is given the data, as Ed25519 needs),
 * `importAlg` / `verifyAlg` are WebCrypto's parameters, `ecdsaEncoding` asks r‖s for WebCrypto.
 */
export function schemeFor(keyAlgorithm) {
  const ec = (curve, hash) => ({
    digest: hash,
    importAlg: { name: 'ECDSA', namedCurve: curve },
    verifyAlg: { name: 'ECDSA', hash },
    ecdsaEncoding: 'p1363',
    label: `ECDSA ${curve} with ${hash}`,
  });
  if (keyAlgorithm === 'EC-P256') return ec('P-256', 'SHA-256');
  if (keyAlgorithm === 'EC-P384') return ec('P-384', 'SHA-384');
  if (keyAlgorithm === 'EC-P521') return ec('P-521', 'SHA-512');
  if (keyAlgorithm.startsWith('RSA-')) {
    return {
      digest: 'SHA-256',
      importAlg: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' },
      verifyAlg: { name: 'RSASSA-PKCS1-v1_5' },
      signatureAlgorithm: 'RSASSA-PKCS1-v1_5',
      label: `${keyAlgorithm} PKCS#1 v1.5 with SHA-256`,
    };
  }
  if (keyAlgorithm === 'Ed25519') {
    return { digest: null, importAlg: { name: 'Ed25519' }, verifyAlg: { name: 'Ed25519' }, label: 'Ed25519' };
  }
  // WebCrypto has no SM2: the agent is given the data (it computes e = SM3(Z ‖ M)), and the page
  // shows the OpenSSL command that verifies the signature instead of verifying it.
  if (keyAlgorithm === 'SM2') return { digest: null, webCrypto: false, label: 'SM2 with SM3' };
  throw new Error(`the demo does not know key algorithm ${keyAlgorithm}`);
}

/**
 * The `sign` options (minus certificateId and display) for `document` (bytes) with a key of
 * `keyAlgorithm`: the page hashes, except for Ed25519 where the agent is given the data.
 */
export async function signInputFor(subtle, keyAlgorithm, document) {
  const scheme = schemeFor(keyAlgorithm);
  const input = {};
  if (scheme.digest) {
    input.digest = { algorithm: scheme.digest, value: new Uint8Array(await subtle.digest(scheme.digest, document)) };
  } else {
    input.data = document;
  }
  if (scheme.ecdsaEncoding) input.ecdsaEncoding = scheme.ecdsaEncoding;
  if (scheme.signatureAlgorithm) input.signatureAlgorithm = scheme.signatureAlgorithm;
  return input;
}

/**
 * True when `signature` over `document` verifies with the certificate's public key; null when
 * the browser cannot check this algorithm (SM2).
 */
export async function verifySignature(subtle, { certificate, keyAlgorithm, signature, document }) {
  const scheme = schemeFor(keyAlgorithm);
  if (scheme.webCrypto === false) return null;
  const key = await subtle.importKey('spki', spkiFromCertificate(certificate), scheme.importAlg, false, ['verify']);
  // WebCrypto hashes `document` itself with the same hash the page used for the digest.
  return subtle.verify(scheme.verifyAlg, key, signature, document);
}

const WEB_EID_ALGORITHMS = {
  ES256: { hash: 'SHA-256', importAlg: { name: 'ECDSA', namedCurve: 'P-256' }, verifyAlg: { name: 'ECDSA', hash: 'SHA-256' } },
  ES384: { hash: 'SHA-384', importAlg: { name: 'ECDSA', namedCurve: 'P-384' }, verifyAlg: { name: 'ECDSA', hash: 'SHA-384' } },
  ES512: { hash: 'SHA-512', importAlg: { name: 'ECDSA', namedCurve: 'P-521' }, verifyAlg: { name: 'ECDSA', hash: 'SHA-512' } },
  RS256: { hash: 'SHA-256', importAlg: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' }, verifyAlg: { name: 'RSASSA-PKCS1-v1_5' } },
  RS384: { hash: 'SHA-384', importAlg: { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-384' }, verifyAlg: { name: 'RSASSA-PKCS1-v1_5' } },
  PS256: { hash: 'SHA-256', importAlg: { name: 'RSA-PSS', hash: 'SHA-256' }, verifyAlg: { name: 'RSA-PSS', saltLength: 32 } },
  PS384: { hash: 'SHA-384', importAlg: { name: 'RSA-PSS', hash: 'SHA-384' }, verifyAlg: { name: 'RSA-PSS', saltLength: 48 } },
  EdDSA: { hash: 'SHA-256', importAlg: { name: 'Ed25519' }, verifyAlg: { name: 'Ed25519' } },
};

/**
 * Checks a Web eID authentication token the way a relying party does (minus the certificate
 * chain, which only the server can judge): the signature covers H(H(origin) ‖ H(challenge)),
 * i.e. WebCrypto verifies over the 2·|H| bytes H(origin) ‖ H(challenge) and hashes once more
 * itself; for EdDSA those 64 bytes are the message. `challenge` is the nonce string as sent.
 */
export async function verifyWebEidToken(subtle, { token, origin, challenge, fromBase64 }) {
  const alg = WEB_EID_ALGORITHMS[token.algorithm];
  if (!alg) throw new Error(`unknown Web eID algorithm ${token.algorithm}`);
  if (token.format !== 'web-eid:1.0') throw new Error(`unexpected token format ${token.format}`);
  const utf8 = (s) => new TextEncoder().encode(s);
  const hOrigin = new Uint8Array(await subtle.digest(alg.hash, utf8(origin)));
  const hChallenge = new Uint8Array(await subtle.digest(alg.hash, utf8(challenge)));
  const message = new Uint8Array(hOrigin.length + hChallenge.length);
  message.set(hOrigin);
  message.set(hChallenge, hOrigin.length);
  const spki = spkiFromCertificate(fromBase64(token.unverifiedCertificate));
  const key = await subtle.importKey('spki', spki, alg.importAlg, false, ['verify']);
  return subtle.verify(alg.verifyAlg, key, fromBase64(token.signature), message);
}
