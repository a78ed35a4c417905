#!/usr/bin/env python3
"""Issue the KeyPort test CA and one certificate per exported token public key.

Called by provision.sh: issue_certs.py DIR LABEL:PUBFILE:SUBJECT_CN:PROFILE ...
PUBFILE holds a SubjectPublicKeyInfo in DER or PEM (pkcs11-tool writes either), or,
named *.ecpoint, the hex CKA_EC_PARAMS and CKA_EC_POINT of a NIST-curve key.
PROFILE is "sign" (nonRepudiation + digitalSignature) or "auth" (digitalSignature,
clientAuth). Writes DIR/ca.key, DIR/ca.pem, DIR/certs/LABEL.pem and DIR/certs/LABEL.der.
"""
import datetime
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORG = "KeyPort Test"


CURVES = {
    "06082a8648ce3d030107": ec.SECP256R1,
    "06052b81040022": ec.SECP384R1,
}


def load_public_key(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".ecpoint"):
        # Two lines: "params HEX" (DER OID) and "point HEX" (DER OCTET STRING, short form).
        fields = dict(line.split() for line in data.decode().splitlines())
        curve = CURVES[fields["params"].lower()]
        point = bytes.fromhex(fields["point"])
        if point[0] != 0x04 or point[1] != len(point) - 2:
            raise ValueError(f"{path}: CKA_EC_POINT is not a short-form OCTET STRING")
        return ec.EllipticCurvePublicKey.from_encoded_point(curve(), point[2:])
    if data.lstrip().startswith(b"-----BEGIN"):
        return serialization.load_pem_public_key(data)
    return serialization.load_der_public_key(data)


def key_usage(digital_signature, content_commitment=False, cert_sign=False):
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def main():
    out_dir = sys.argv[1]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    not_before = now - datetime.timedelta(days=1)
    not_after = not_before + datetime.timedelta(days=731)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    # RDNs in the usual order, most general first: RFC 4514 strings then read "CN=…,O=…".
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, "KeyPort Test CA"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(False, cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = ca_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(os.path.join(out_dir, "ca.key"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(os.path.join(out_dir, "ca.pem"), "wb") as f:
        f.write(ca_cert.public_bytes(serialization.Encoding.PEM))

    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    certs_dir = os.path.join(out_dir, "certs")
    os.makedirs(certs_dir, exist_ok=True)
    for spec in sys.argv[2:]:
        label, pub_path, cn, profile = spec.split(":", 3)
        pub = load_public_key(pub_path)
        subject = x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CN"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(aki, critical=False)
        )
        if profile == "sign":
            builder = builder.add_extension(key_usage(True, content_commitment=True), critical=True)
        elif profile == "auth":
            builder = builder.add_extension(key_usage(True), critical=True).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        else:
            sys.exit(f"issue_certs.py: unknown profile {profile!r} for {label}")
        cert = builder.sign(ca_key, hashes.SHA256())
        with open(os.path.join(certs_dir, label + ".pem"), "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(os.path.join(certs_dir, label + ".der"), "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.DER))


if __name__ == "__main__":
    main()
