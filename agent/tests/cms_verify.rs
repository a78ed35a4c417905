//! The CMS builder's output, checked by tools that are not ours.
//!
//! Each case makes a CA and a leaf with the `openssl` CLI, builds the signed attributes with
//! `agent::cms`, signs `to_be_signed()` with `openssl` (standing in for the token), assembles,
//! and then verifies twice:
//! 1. `openssl cms -verify` against the CA: the whole CMS path (structure, messageDigest over the
//!    detached document, signature over the signed attributes, certificate chain).
//! 2. Python `cryptography`: it cannot parse CMS, so `openssl asn1parse` locates the fields
//!    (signed attributes, signature, embedded certificate) and Python checks the signature over
//!    the re-tagged signed attributes with the embedded certificate's public key, the
//!    messageDigest against its own hash of the document, and the ESS certHash against its own
//!    SHA-256 of the embedded certificate.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use agent::cms::{assemble, signed_attributes, CmsError, CmsSignatureAlg, DigestAlg};

const PY_CHECK: &str = r#"
import hashlib, re, subprocess, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding

sig_path, doc_path, alg, hname, work = sys.argv[1:6]
data = open(sig_path, "rb").read()
doc = open(doc_path, "rb").read()

def parse(path):
    out = subprocess.run(["openssl", "asn1parse", "-inform", "DER", "-in", path],
                         check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*(\d+):d=(\d+)\s+hl=(\d+)\s+l=\s*(\d+)\s+(prim|cons):\s*(.*)$", line)
        if m:
            rows.append(dict(off=int(m[1]), d=int(m[2]), hl=int(m[3]), l=int(m[4]), rest=m[6].strip()))
    return rows

def body(r):
    return data[r["off"]:r["off"] + r["hl"] + r["l"]]

rows = parse(sig_path)
# ContentInfo(d0) > [0](d1) > SignedData(d2) > certificates [0](d3) > Certificate(d4)
i = next(i for i, r in enumerate(rows) if r["d"] == 3 and r["rest"].startswith("cont [ 0 ]"))
cert_der = body(rows[i + 1])
assert rows[i + 1]["d"] == 4
# ... > signerInfos SET(d3) > SignerInfo(d4) > signedAttrs [0] IMPLICIT (d5), signature OCTET STRING (d5)
attrs_row = next(r for r in rows if r["d"] == 5 and r["rest"].startswith("cont [ 0 ]"))
sig_row = [r for r in rows if r["d"] == 5 and r["rest"].startswith("OCTET STRING")][-1]
signature = data[sig_row["off"] + sig_row["hl"]:sig_row["off"] + sig_row["hl"] + sig_row["l"]]
# RFC 5652 5.4: the signature covers the attributes with an explicit SET OF tag.
attrs = b"\x31" + body(attrs_row)[1:]

attrs_path = work + "/attrs-from-cms.der"
open(attrs_path, "wb").write(attrs)
arows = parse(attrs_path)
adata = attrs
def octets_after(name):
    k = next(k for k, r in enumerate(arows) if r["rest"].startswith("OBJECT") and name in r["rest"])
    r = next(r for r in arows[k + 1:] if r["rest"].startswith("OCTET STRING"))
    return adata[r["off"] + r["hl"]:r["off"] + r["hl"] + r["l"]]

want_md = hashlib.new(hname, doc).digest()
assert octets_after(":messageDigest") == want_md, "messageDigest mismatch"
assert octets_after("ertificateV2") == hashlib.sha256(cert_der).digest(), "ESS certHash mismatch"
assert any("pkcs7-data" in r["rest"] for r in arows), "contentType is not id-data"
assert any(r["rest"].startswith("UTCTIME") for r in arows), "signingTime is not UTCTime"

cert = x509.load_der_x509_certificate(cert_der)
pub = cert.public_key()
H = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}[hname]
if alg == "rsa-pkcs1":
    pub.verify(signature, attrs, padding.PKCS1v15(), H())
elif alg == "rsa-pss":
    pub.verify(signature, attrs, padding.PSS(mgf=padding.MGF1(H()), salt_length=padding.PSS.DIGEST_LENGTH), H())
elif alg == "ecdsa":
    pub.verify(signature, attrs, ec.ECDSA(H()))
elif alg == "ed25519":
    pub.verify(signature, attrs)
else:
    raise SystemExit("unknown alg " + alg)
print("python-verify-ok")
"#;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn openssl(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("openssl").current_dir(dir).args(args))
}

/// A CA (P-256) and a leaf with the given `genpkey` arguments; returns the leaf cert DER path.
fn make_pki(dir: &Path, leaf_key_args: &[&str]) -> PathBuf {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ca.key",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=KeyPort Test CA/O=KeyPort",
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let mut args = vec!["genpkey"];
    args.extend_from_slice(leaf_key_args);
    args.extend_from_slice(&["-out", "leaf.key"]);
    openssl(dir, &args);
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=Signer Person/O=KeyPort",
        ],
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "keyUsage=critical,digitalSignature,nonRepudiation\n",
    )
    .expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "0x5EED00C0FFEE",
            "-days",
            "30",
            "-extfile",
            "leaf.ext",
            "-outform",
            "DER",
            "-out",
            "leaf.der",
        ],
    );
    dir.join("leaf.der")
}

fn hash_name(d: DigestAlg) -> &'static str {
    match d {
        DigestAlg::Sha256 => "sha256",
        DigestAlg::Sha384 => "sha384",
        DigestAlg::Sha512 => "sha512",
        _ => unreachable!("no other digest in these tests"),
    }
}

/// Sign the to-be-signed bytes the way the token would, with openssl as the token.
fn token_sign(dir: &Path, alg: CmsSignatureAlg) -> Vec<u8> {
    match alg {
        CmsSignatureAlg::RsaPkcs1(d) => {
            openssl(
                dir,
                &[
                    "dgst",
                    &format!("-{}", hash_name(d)),
                    "-sign",
                    "leaf.key",
                    "-out",
                    "sig.bin",
                    "tbs.bin",
                ],
            );
        }
        CmsSignatureAlg::RsaPss(d) => {
            openssl(
                dir,
                &[
                    "dgst",
                    &format!("-{}", hash_name(d)),
                    "-sign",
                    "leaf.key",
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:digest",
                    "-sigopt",
                    &format!("rsa_mgf1_md:{}", hash_name(d)),
                    "-out",
                    "sig.bin",
                    "tbs.bin",
                ],
            );
        }
        CmsSignatureAlg::EcdsaWith(d) => {
            // Like CKM_ECDSA: the token gets the hash, not the data.
            let tbs = std::fs::read(dir.join("tbs.bin")).expect("read tbs");
            std::fs::write(dir.join("tbs.hash"), d.digest(&tbs)).expect("write hash");
            openssl(
                dir,
                &[
                    "pkeyutl", "-sign", "-inkey", "leaf.key", "-in", "tbs.hash", "-out", "sig.bin",
                ],
            );
        }
        CmsSignatureAlg::Ed25519 => {
            // Like CKM_EDDSA: the DER signed attributes are the message.
            openssl(
                dir,
                &[
                    "pkeyutl", "-sign", "-inkey", "leaf.key", "-rawin", "-in", "tbs.bin", "-out",
                    "sig.bin",
                ],
            );
        }
        _ => unreachable!("no other algorithm in these tests"),
    }
    std::fs::read(dir.join("sig.bin")).expect("read sig")
}

fn openssl_cms_verify(dir: &Path, content: &str) -> Output {
    Command::new("openssl")
        .current_dir(dir)
        .args([
            "cms",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-in",
            "sig.der",
            "-content",
            content,
            "-CAfile",
            "ca.pem",
            "-purpose",
            "any",
            "-out",
            "verified.out",
        ])
        .output()
        .expect("spawn openssl cms")
}

/// Build, sign, assemble; returns the temp dir holding sig.der, doc.bin, ca.pem.
fn sign_case(leaf_key_args: &[&str], alg: CmsSignatureAlg) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = std::fs::read(make_pki(dir.path(), leaf_key_args)).expect("read leaf");
    let doc: Vec<u8> = b"Loan contract 2026-114\n"
        .iter()
        .copied()
        .cycle()
        .take(10_000)
        .collect();
    std::fs::write(dir.path().join("doc.bin"), &doc).expect("write doc");

    let digest_alg = alg.digest_alg();
    let attrs = signed_attributes(
        digest_alg,
        &digest_alg.digest(&doc),
        time::OffsetDateTime::now_utc(),
        &leaf,
    )
    .expect("signed attributes");
    assert_eq!(
        attrs.to_be_signed()[0],
        0x31,
        "to_be_signed is a DER SET OF"
    );
    std::fs::write(dir.path().join("tbs.bin"), attrs.to_be_signed()).expect("write tbs");
    let signature = token_sign(dir.path(), alg);
    let cms = assemble(&attrs, &leaf, alg, &signature).expect("assemble");
    std::fs::write(dir.path().join("sig.der"), cms).expect("write cms");
    dir
}

fn python_check(dir: &Path, content: &str, alg: CmsSignatureAlg, py_alg: &str) -> Output {
    let script = dir.join("check.py");
    std::fs::write(&script, PY_CHECK).expect("write script");
    Command::new("python3")
        .arg(&script)
        .args([
            dir.join("sig.der").as_os_str(),
            dir.join(content).as_os_str(),
            py_alg.as_ref(),
            hash_name(alg.digest_alg()).as_ref(),
            dir.as_os_str(),
        ])
        .output()
        .expect("spawn python3")
}

/// How the whole CMS is checked by OpenSSL.
enum OpensslCheck {
    /// `openssl cms -verify`: full verification.
    Verify,
    /// OpenSSL 3.0 cannot sign or verify Ed25519 CMS at all (its own `openssl cms -sign` fails
    /// with "eddsa_digest_signverify_init: invalid digest"; openssl/openssl#11915, #32248), so
    /// it only parses and prints the structure; the signature is checked by Python and by
    /// `openssl pkeyutl -verify` over the extracted attributes.
    ParseOnly,
}

fn check(leaf_key_args: &[&str], alg: CmsSignatureAlg, py_alg: &str, how: OpensslCheck) {
    let dir = sign_case(leaf_key_args, alg);
    let d = dir.path();
    match how {
        OpensslCheck::Verify => {
            let out = openssl_cms_verify(d, "doc.bin");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "openssl cms -verify failed for {alg:?}: {stderr}"
            );
            assert!(
                stderr.contains("Verification successful"),
                "openssl said: {stderr}"
            );
        }
        OpensslCheck::ParseOnly => {
            let out = openssl(
                d,
                &[
                    "cms", "-cmsout", "-print", "-inform", "DER", "-in", "sig.der", "-noout",
                ],
            );
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("ED25519"), "{text}");
            assert!(text.contains("sha512"), "{text}");
            assert!(text.contains("eContent: <ABSENT>"), "{text}");
        }
    }

    let out = python_check(d, "doc.bin", alg, py_alg);
    assert!(
        out.status.success(),
        "python check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "python-verify-ok"
    );

    // The same signature over a changed document must fail.
    let mut doc = std::fs::read(d.join("doc.bin")).expect("read doc");
    doc[5000] ^= 1;
    std::fs::write(d.join("tampered.bin"), doc).expect("write tampered");
    if let OpensslCheck::Verify = how {
        let out = openssl_cms_verify(d, "tampered.bin");
        assert!(
            !out.status.success(),
            "a tampered document verified for {alg:?}"
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains("Verification successful"));
    }
    let out = python_check(d, "tampered.bin", alg, py_alg);
    assert!(!out.status.success(), "python accepted a tampered document");
    assert!(String::from_utf8_lossy(&out.stderr).contains("messageDigest mismatch"));
}

const RSA2048: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
const P256: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
const P384: &[&str] = &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"];
const ED25519: &[&str] = &["-algorithm", "ED25519"];

#[test]
fn rsa_pkcs1_sha256_verifies() {
    check(
        RSA2048,
        CmsSignatureAlg::RsaPkcs1(DigestAlg::Sha256),
        "rsa-pkcs1",
        OpensslCheck::Verify,
    );
}

#[test]
fn rsa_pkcs1_sha512_verifies() {
    check(
        RSA2048,
        CmsSignatureAlg::RsaPkcs1(DigestAlg::Sha512),
        "rsa-pkcs1",
        OpensslCheck::Verify,
    );
}

#[test]
fn rsa_pss_sha256_verifies() {
    check(
        RSA2048,
        CmsSignatureAlg::RsaPss(DigestAlg::Sha256),
        "rsa-pss",
        OpensslCheck::Verify,
    );
}

#[test]
fn rsa_pss_sha384_verifies() {
    check(
        RSA2048,
        CmsSignatureAlg::RsaPss(DigestAlg::Sha384),
        "rsa-pss",
        OpensslCheck::Verify,
    );
}

#[test]
fn ecdsa_p256_sha256_verifies() {
    check(
        P256,
        CmsSignatureAlg::EcdsaWith(DigestAlg::Sha256),
        "ecdsa",
        OpensslCheck::Verify,
    );
}

#[test]
fn ecdsa_p384_sha384_verifies() {
    check(
        P384,
        CmsSignatureAlg::EcdsaWith(DigestAlg::Sha384),
        "ecdsa",
        OpensslCheck::Verify,
    );
}

#[test]
fn ed25519_verifies() {
    check(
        ED25519,
        CmsSignatureAlg::Ed25519,
        "ed25519",
        OpensslCheck::ParseOnly,
    );
    // And OpenSSL's own Ed25519 over the attributes the Python check extracted from the CMS,
    // with the leaf's chain checked by `openssl verify`.
    let dir = sign_case(ED25519, CmsSignatureAlg::Ed25519);
    let d = dir.path();
    let out = python_check(d, "doc.bin", CmsSignatureAlg::Ed25519, "ed25519");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    openssl(
        d,
        &[
            "x509", "-inform", "DER", "-in", "leaf.der", "-out", "leaf.pem",
        ],
    );
    openssl(
        d,
        &[
            "x509", "-in", "leaf.pem", "-pubkey", "-noout", "-out", "leaf.pub",
        ],
    );
    openssl(
        d,
        &["verify", "-CAfile", "ca.pem", "-purpose", "any", "leaf.pem"],
    );
    let out = Command::new("openssl")
        .current_dir(d)
        .args([
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "leaf.pub",
            "-rawin",
            "-in",
            "attrs-from-cms.der",
            "-sigfile",
            "sig.bin",
        ])
        .output()
        .expect("spawn");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Signature Verified Successfully"),
        "{out:?}"
    );
}

#[test]
fn signature_by_another_key_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let leaf = std::fs::read(make_pki(d, P256)).expect("leaf");
    let doc = b"contract".to_vec();
    std::fs::write(d.join("doc.bin"), &doc).expect("write doc");
    let alg = CmsSignatureAlg::EcdsaWith(DigestAlg::Sha256);
    let attrs = signed_attributes(
        DigestAlg::Sha256,
        &DigestAlg::Sha256.digest(&doc),
        time::OffsetDateTime::now_utc(),
        &leaf,
    )
    .expect("attrs");
    std::fs::write(d.join("tbs.bin"), attrs.to_be_signed()).expect("write tbs");
    // Another P-256 key takes the leaf key's place: a well-formed signature by the wrong key.
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "leaf.key",
        ],
    );
    let forged = token_sign(d, alg);
    let cms = assemble(&attrs, &leaf, alg, &forged).expect("assemble");
    std::fs::write(d.join("sig.der"), cms).expect("write");
    let out = openssl_cms_verify(d, "doc.bin");
    assert!(!out.status.success(), "a signature by another key verified");
}

#[test]
fn mismatches_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = std::fs::read(make_pki(dir.path(), P256)).expect("leaf");
    let attrs = signed_attributes(
        DigestAlg::Sha256,
        &[7; 32],
        time::OffsetDateTime::now_utc(),
        &leaf,
    )
    .expect("attrs");
    // Ed25519 needs SHA-512 attributes (RFC 8419).
    assert!(matches!(
        assemble(&attrs, &leaf, CmsSignatureAlg::Ed25519, &[1; 64]),
        Err(CmsError::DigestMismatch { .. })
    ));
    assert!(matches!(
        assemble(
            &attrs,
            &leaf,
            CmsSignatureAlg::EcdsaWith(DigestAlg::Sha384),
            &[1; 64]
        ),
        Err(CmsError::DigestMismatch { .. })
    ));
    // A raw (P1363) ECDSA signature is not DER.
    assert!(matches!(
        assemble(
            &attrs,
            &leaf,
            CmsSignatureAlg::EcdsaWith(DigestAlg::Sha256),
            &[0x42; 64]
        ),
        Err(CmsError::EcdsaSignature(_))
    ));
    let ca_der = run(Command::new("openssl")
        .current_dir(dir.path())
        .args(["x509", "-in", "ca.pem", "-outform", "DER"]))
    .stdout;
    assert!(matches!(
        assemble(
            &attrs,
            &ca_der,
            CmsSignatureAlg::EcdsaWith(DigestAlg::Sha256),
            &[0x30, 0]
        ),
        Err(CmsError::CertificateMismatch)
    ));
}
