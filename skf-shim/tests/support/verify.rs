//! Independent verifiers: the OpenSSL 3.0 command line and Python `gmssl` (gmssl_verify.py).
//! Nothing here uses the shim's own SM2 code.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp")
}

/// `openssl dgst -sm3 -verify PUB -sigopt distid:ID -signature SIG FILE` (DER signature).
pub fn openssl_sm2(public_key_pem: &Path, user_id: &str, data: &[u8], der_sig: &[u8]) -> bool {
    let work = scratch();
    let (data_path, sig_path) = (work.path().join("data"), work.path().join("sig"));
    std::fs::write(&data_path, data).expect("write data");
    std::fs::write(&sig_path, der_sig).expect("write sig");
    let out = Command::new("openssl")
        .args(["dgst", "-sm3", "-verify"])
        .arg(public_key_pem)
        .args(["-sigopt", &format!("distid:{user_id}"), "-signature"])
        .arg(&sig_path)
        .arg(&data_path)
        .output()
        .expect("run openssl");
    out.status.success()
}

/// `openssl dgst -sha256 -verify PUB -signature SIG FILE` (RSA PKCS#1 v1.5).
pub fn openssl_rsa_sha256(public_key_pem: &Path, data: &[u8], sig: &[u8]) -> bool {
    let work = scratch();
    let (data_path, sig_path) = (work.path().join("data"), work.path().join("sig"));
    std::fs::write(&data_path, data).expect("write data");
    std::fs::write(&sig_path, sig).expect("write sig");
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(public_key_pem)
        .arg("-signature")
        .arg(&sig_path)
        .arg(&data_path)
        .output()
        .expect("run openssl");
    out.status.success()
}

/// Re-encodes an r‖s signature as DER with OpenSSL's own ASN.1 generator, so that raw output
/// is checked without the shim's encoder.
pub fn raw_to_der_with_openssl(sig: &[u8]) -> Vec<u8> {
    assert_eq!(sig.len(), 64, "an SM2 r||s signature is 64 bytes");
    let work = scratch();
    let conf = work.path().join("sig.cnf");
    std::fs::write(
        &conf,
        format!(
            "asn1=SEQUENCE:sig\n[sig]\nr=INTEGER:0x{}\ns=INTEGER:0x{}\n",
            hex::encode_upper(&sig[..32]),
            hex::encode_upper(&sig[32..])
        ),
    )
    .expect("write conf");
    let der = work.path().join("sig.der");
    let out = Command::new("openssl")
        .args(["asn1parse", "-noout", "-genconf"])
        .arg(&conf)
        .arg("-out")
        .arg(&der)
        .output()
        .expect("openssl asn1parse");
    assert!(
        out.status.success(),
        "asn1parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(der).expect("read der")
}

/// The public key's x‖y, as OpenSSL exports it (the end of the SubjectPublicKeyInfo DER).
fn sm2_point_xy(public_key_pem: &Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(public_key_pem)
        .output()
        .expect("openssl pkey");
    assert!(out.status.success(), "openssl pkey failed");
    let der = out.stdout;
    assert!(
        der.len() > 65 && der[der.len() - 65] == 0x04,
        "uncompressed point at the end"
    );
    der[der.len() - 64..].to_vec()
}

/// The gmssl verifier, compiled in and fed to `python3 -` on stdin, so this file works from any
/// crate that includes it (skf-shim's tests and keyport-e2e's).
const GMSSL_VERIFY_PY: &str = include_str!("gmssl_verify.py");

fn gmssl(args: &[&str]) -> std::process::Output {
    use std::io::Write as _;
    let mut child = Command::new("python3")
        .arg("-")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python3 (gmssl_verify.py; pip install gmssl==3.2.2)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(GMSSL_VERIFY_PY.as_bytes())
        .expect("feed gmssl_verify.py");
    child.wait_with_output().expect("python3 gmssl_verify.py")
}

/// Python gmssl's SM2 verification of `sig` ("der" or "raw") over `data` with `user_id`.
pub fn gmssl_sm2(
    public_key_pem: &Path,
    user_id: &str,
    encoding: &str,
    data: &[u8],
    sig: &[u8],
) -> bool {
    let out = gmssl(&[
        "verify",
        &hex::encode(sm2_point_xy(public_key_pem)),
        user_id,
        encoding,
        &hex::encode(data),
        &hex::encode(sig),
    ]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "gmssl_verify.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// e = SM3(Z ‖ M) as Python gmssl computes it.
pub fn gmssl_e(public_key_pem: &Path, user_id: &str, data: &[u8]) -> Vec<u8> {
    let out = gmssl(&[
        "e",
        &hex::encode(sm2_point_xy(public_key_pem)),
        user_id,
        &hex::encode(data),
    ]);
    assert!(
        out.status.success(),
        "gmssl e: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    hex::decode(String::from_utf8_lossy(&out.stdout).trim()).expect("hex e")
}
