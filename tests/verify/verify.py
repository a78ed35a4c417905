#!/usr/bin/env python3
"""Signature checks for KeyPort's end-to-end tests, with Python's `cryptography` package.

  verify.py raw CERT_PEM ALG HASH (data|digest) INPUT SIG
      ALG: rsa-pkcs1 | rsa-pss | ecdsa-der | ecdsa-p1363 | ed25519; HASH: sha256|sha384|sha512.
      The certificate's public key checks SIG over INPUT (a digest is checked as prehashed).
  verify.py cms SIG_DER DOC CERT_PEM
      A detached CMS SignedData over DOC: the signer certificate inside equals CERT_PEM, the
      signed attributes hold contentType (id-data), messageDigest = H(DOC), signingTime and
      signingCertificateV2 (whose hash is the certificate's), and the signature over the DER
      SET OF attributes verifies with the certificate's key.
  verify.py webeid TOKEN_JSON ORIGIN CHALLENGE CERT_PEM
      A Web eID web-eid:1.0 token, checked as a relying party does: format, certificate,
      algorithm for the key, and the signature over H(origin) || H(challenge) (JWA r||s for
      ECDSA; EdDSA over SHA-256(origin) || SHA-256(challenge)).
Prints OK and exits 0 when the check passes; prints why and exits 1 otherwise.
"""
import base64
import hashlib
import json
import sys

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def load_cert(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def check(pub, alg, hash_name, sig, message, prehashed):
    h = HASHES[hash_name]()
    chosen = utils.Prehashed(h) if prehashed else h
    if alg == "rsa-pkcs1":
        pub.verify(sig, message, padding.PKCS1v15(), chosen)
    elif alg == "rsa-pss":
        pss = padding.PSS(mgf=padding.MGF1(HASHES[hash_name]()), salt_length=h.digest_size)
        pub.verify(sig, message, pss, chosen)
    elif alg == "ecdsa-der":
        pub.verify(sig, message, ec.ECDSA(chosen))
    elif alg == "ecdsa-p1363":
        half = len(sig) // 2
        if len(sig) % 2 or half != (pub.curve.key_size + 7) // 8:
            fail(f"P1363 signature of {len(sig)} bytes for {pub.curve.name}")
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
        pub.verify(der, message, ec.ECDSA(chosen))
    elif alg == "ed25519":
        if prehashed:
            fail("Ed25519 signs data, not a digest")
        pub.verify(sig, message)
    else:
        fail(f"unknown algorithm {alg}")


def cmd_raw(cert_pem, alg, hash_name, kind, input_path, sig_path):
    pub = load_cert(cert_pem).public_key()
    with open(input_path, "rb") as f:
        message = f.read()
    with open(sig_path, "rb") as f:
        sig = f.read()
    check(pub, alg, hash_name, sig, message, kind == "digest")


# --- a minimal DER reader, enough for a CMS SignedData -------------------------------------

def tlv(buf, pos):
    """(tag, header_len, value_start, value_end) of the TLV at pos."""
    tag = buf[pos]
    length = buf[pos + 1]
    start = pos + 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(buf[start:start + n], "big")
        start += n
    return tag, start, start + length


def children(buf, start, end):
    out = []
    pos = start
    while pos < end:
        tag, vs, ve = tlv(buf, pos)
        out.append((tag, pos, vs, ve))
        pos = ve
    return out


def oid_text(value):
    first = value[0]
    parts = [first // 40, first % 40]
    n = 0
    for b in value[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(str(p) for p in parts)


OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_DATA = "1.2.840.113549.1.7.1"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNING_TIME = "1.2.840.113549.1.9.5"
OID_SIGNING_CERT_V2 = "1.2.840.113549.1.9.16.2.47"
DIGEST_OIDS = {"2.16.840.1.101.3.4.2.1": "sha256", "2.16.840.1.101.3.4.2.2": "sha384",
               "2.16.840.1.101.3.4.2.3": "sha512"}
SIG_OIDS = {
    "1.2.840.113549.1.1.1": "rsa-pkcs1", "1.2.840.113549.1.1.11": "rsa-pkcs1",
    "1.2.840.113549.1.1.12": "rsa-pkcs1", "1.2.840.113549.1.1.13": "rsa-pkcs1",
    "1.2.840.113549.1.1.10": "rsa-pss",
    "1.2.840.10045.4.3.2": "ecdsa-der", "1.2.840.10045.4.3.3": "ecdsa-der",
    "1.2.840.10045.4.3.4": "ecdsa-der", "1.2.840.10045.2.1": "ecdsa-der",
    "1.3.101.112": "ed25519",
}


def cmd_cms(sig_path, doc_path, cert_pem):
    with open(sig_path, "rb") as f:
        buf = f.read()
    with open(doc_path, "rb") as f:
        doc = f.read()
    cert = load_cert(cert_pem)
    cert_der = cert.public_bytes(serialization.Encoding.DER)

    _, s, e = tlv(buf, 0)
    ci = children(buf, s, e)
    if oid_text(buf[ci[0][2]:ci[0][3]]) != OID_SIGNED_DATA:
        fail("not a SignedData")
    _, s, e = tlv(buf, ci[1][2])  # [0] EXPLICIT -> SignedData SEQUENCE
    sd = children(buf, s, e)
    # version, digestAlgorithms, encapContentInfo, [0] certificates?, [1] crls?, signerInfos
    encap = children(buf, sd[2][2], sd[2][3])
    if oid_text(buf[encap[0][2]:encap[0][3]]) != OID_DATA:
        fail("eContentType is not id-data")
    if len(encap) != 1:
        fail("content is not detached")
    certs = [c for c in sd if c[0] == 0xA0]
    if not certs:
        fail("no certificates in the SignedData")
    embedded = [buf[c[1]:c[3]] for c in children(buf, certs[0][2], certs[0][3])]
    if cert_der not in embedded:
        fail("the signer certificate is not in the SignedData")
    signer_infos = children(buf, sd[-1][2], sd[-1][3])
    if len(signer_infos) != 1:
        fail(f"{len(signer_infos)} signer infos")
    si = children(buf, signer_infos[0][2], signer_infos[0][3])
    digest_alg = DIGEST_OIDS[oid_text(buf[children(buf, si[2][2], si[2][3])[0][2]:
                                          children(buf, si[2][2], si[2][3])[0][3]])]
    attrs_node = si[3]
    if attrs_node[0] != 0xA0:
        fail("no signed attributes")
    attrs = {}
    for (_, _, vs, ve) in children(buf, attrs_node[2], attrs_node[3]):
        parts = children(buf, vs, ve)
        oid = oid_text(buf[parts[0][2]:parts[0][3]])
        values = children(buf, parts[1][2], parts[1][3])
        attrs[oid] = buf[values[0][1]:values[0][3]]
    for needed in (OID_CONTENT_TYPE, OID_MESSAGE_DIGEST, OID_SIGNING_TIME, OID_SIGNING_CERT_V2):
        if needed not in attrs:
            fail(f"signed attribute {needed} missing")
    _, vs, ve = tlv(attrs[OID_CONTENT_TYPE], 0)
    if oid_text(attrs[OID_CONTENT_TYPE][vs:ve]) != OID_DATA:
        fail("contentType attribute is not id-data")
    _, vs, ve = tlv(attrs[OID_MESSAGE_DIGEST], 0)
    if attrs[OID_MESSAGE_DIGEST][vs:ve] != hashlib.new(digest_alg, doc).digest():
        fail("messageDigest does not match the document")
    # signingCertificateV2: the certificate's hash (SHA-256 unless an algorithm is named).
    if hashlib.sha256(cert_der).digest() not in attrs[OID_SIGNING_CERT_V2] and \
            hashlib.new(digest_alg, cert_der).digest() not in attrs[OID_SIGNING_CERT_V2]:
        fail("signingCertificateV2 does not hold the certificate's hash")
    # The signature covers the attributes as a DER SET OF (tag 0x31 instead of [0]).
    signed = b"\x31" + buf[attrs_node[1] + 1:attrs_node[3]]
    sig_alg_oid = oid_text(buf[children(buf, si[4][2], si[4][3])[0][2]:
                               children(buf, si[4][2], si[4][3])[0][3]])
    alg = SIG_OIDS.get(sig_alg_oid)
    if alg is None:
        fail(f"unknown signature algorithm {sig_alg_oid}")
    _, vs, ve = tlv(buf, si[5][1])
    sig = buf[vs:ve]
    check(cert.public_key(), alg, digest_alg, sig, signed, False)


def cmd_webeid(token_path, origin, challenge, cert_pem):
    with open(token_path) as f:
        token = json.load(f)
    expected = {"unverifiedCertificate", "algorithm", "signature", "format", "appVersion"}
    if set(token) != expected:
        fail(f"token fields {sorted(token)}")
    if token["format"] != "web-eid:1.0":
        fail(f"format {token['format']}")
    if not token["appVersion"].startswith("urn:"):
        fail(f"appVersion {token['appVersion']}")
    cert_der = base64.b64decode(token["unverifiedCertificate"], validate=True)
    cert = x509.load_der_x509_certificate(cert_der)
    if cert != load_cert(cert_pem):
        fail("unverifiedCertificate is not the expected certificate")
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    if not ku.digital_signature:
        fail("certificate lacks digitalSignature")
    pub = cert.public_key()
    alg = token["algorithm"]
    sig = base64.b64decode(token["signature"], validate=True)
    if alg == "EdDSA":
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            fail("EdDSA with a non-Ed25519 key")
        message = hashlib.sha256(origin.encode()).digest() + \
            hashlib.sha256(challenge.encode()).digest()
        pub.verify(sig, message)
        return
    bits = alg[2:]
    hash_name = {"256": "sha256", "384": "sha384", "512": "sha512"}[bits]
    message = hashlib.new(hash_name, origin.encode()).digest() + \
        hashlib.new(hash_name, challenge.encode()).digest()
    if alg.startswith("ES"):
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            fail(f"{alg} with a non-EC key")
        want = {"256": "secp256r1", "384": "secp384r1", "512": "secp521r1"}[bits]
        if pub.curve.name != want:
            fail(f"{alg} with curve {pub.curve.name}")
        check(pub, "ecdsa-p1363", hash_name, sig, message, False)
    elif alg.startswith("RS"):
        if not isinstance(pub, rsa.RSAPublicKey):
            fail(f"{alg} with a non-RSA key")
        check(pub, "rsa-pkcs1", hash_name, sig, message, False)
    elif alg.startswith("PS"):
        if not isinstance(pub, rsa.RSAPublicKey):
            fail(f"{alg} with a non-RSA key")
        check(pub, "rsa-pss", hash_name, sig, message, False)
    else:
        fail(f"unknown algorithm {alg}")


def main():
    if len(sys.argv) < 2:
        fail(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    try:
        {"raw": cmd_raw, "cms": cmd_cms, "webeid": cmd_webeid}[cmd](*args)
    except InvalidSignature:
        fail("signature does not verify")
    print("OK")


if __name__ == "__main__":
    main()
