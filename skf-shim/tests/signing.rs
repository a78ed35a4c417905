//! SM2 and RSA signatures through the real C interface of the soft SKF library, each checked
//! by OpenSSL 3.0 and (SM2) Python gmssl over the same bytes.

#[path = "support/soft_skf.rs"]
mod soft_skf;
#[path = "support/verify.rs"]
mod verify;

use skf_shim::{
    Error, HashAlg, SignAlgorithm, SignInput, SignRequest, Sm2Encoding, DEFAULT_SM2_USER_ID,
};
use soft_skf::{SoftSkf, RSA_CONTAINER, SM2_CONTAINER};

const DOC: &[u8] = "合同 No. 42: the document to sign".as_bytes();

fn sm2_request(skf: &SoftSkf, algorithm: SignAlgorithm, inputs: Vec<SignInput>) -> SignRequest {
    SignRequest {
        certificate: skf.certificate(SM2_CONTAINER).id,
        algorithm,
        inputs,
        logout_after: false,
    }
}

#[test]
fn sm2_der_signature_verifies_with_openssl_and_gmssl() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let sigs = skf
        .library
        .sign(
            sm2_request(
                &skf,
                SignAlgorithm::sm2(Sm2Encoding::Der),
                vec![SignInput::Message(DOC.to_vec())],
            ),
            None,
        )
        .expect("sign");
    let public = skf.public_key_pem("sm2-sign");
    assert!(verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        DOC,
        &sigs[0]
    ));
    assert!(verify::gmssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        "der",
        DOC,
        &sigs[0]
    ));
    // Both verifiers can fail: the same signature over other bytes does not verify.
    assert!(!verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        b"other",
        &sigs[0]
    ));
    assert!(!verify::gmssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        "der",
        b"other",
        &sigs[0]
    ));
}

#[test]
fn sm2_raw_signature_is_r_and_s_and_verifies() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let sigs = skf
        .library
        .sign(
            sm2_request(
                &skf,
                SignAlgorithm::sm2(Sm2Encoding::Raw),
                vec![SignInput::Message(DOC.to_vec())],
            ),
            None,
        )
        .expect("sign");
    assert_eq!(sigs[0].len(), 64);
    let public = skf.public_key_pem("sm2-sign");
    let der = verify::raw_to_der_with_openssl(&sigs[0]);
    assert!(verify::openssl_sm2(&public, DEFAULT_SM2_USER_ID, DOC, &der));
    assert!(verify::gmssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        "raw",
        DOC,
        &sigs[0]
    ));
}

#[test]
fn a_non_default_user_id_verifies_only_with_that_id() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let id = "zhangsan@example.cn";
    let sigs = skf
        .library
        .sign(
            sm2_request(
                &skf,
                SignAlgorithm::Sm2 {
                    user_id: id.to_owned(),
                    encoding: Sm2Encoding::Der,
                },
                vec![SignInput::Message(DOC.to_vec())],
            ),
            None,
        )
        .expect("sign");
    let public = skf.public_key_pem("sm2-sign");
    assert!(verify::openssl_sm2(&public, id, DOC, &sigs[0]));
    assert!(verify::gmssl_sm2(&public, id, "der", DOC, &sigs[0]));
    assert!(!verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        DOC,
        &sigs[0]
    ));
    assert!(!verify::gmssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        "der",
        DOC,
        &sigs[0]
    ));
}

#[test]
fn a_given_e_is_signed_as_is() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let public = skf.public_key_pem("sm2-sign");
    // e computed by Python gmssl, not by the shim.
    let e = verify::gmssl_e(&public, DEFAULT_SM2_USER_ID, DOC);
    assert_eq!(e.len(), 32);
    let req = sm2_request(
        &skf,
        SignAlgorithm::sm2(Sm2Encoding::Der),
        vec![SignInput::Digest(e)],
    );
    let exports = skf.calls("SKF_ExportCertificate");
    let sigs = skf.library.sign(req, None).expect("sign");
    assert_eq!(
        skf.calls("SKF_ExportCertificate"),
        exports,
        "a given e needs no Z, so no certificate is read"
    );
    assert!(verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        DOC,
        &sigs[0]
    ));
    let short = skf
        .library
        .sign(
            sm2_request(
                &skf,
                SignAlgorithm::sm2(Sm2Encoding::Der),
                vec![SignInput::Digest(vec![0; 31])],
            ),
            None,
        )
        .expect_err("31 bytes are not an e");
    assert!(matches!(short.error, Error::InvalidInput(_)), "{short:?}");
}

#[test]
fn a_batch_signs_every_input_in_order() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let docs: Vec<Vec<u8>> = (0..3).map(|i| format!("doc {i}").into_bytes()).collect();
    let sigs = skf
        .library
        .sign(
            sm2_request(
                &skf,
                SignAlgorithm::sm2(Sm2Encoding::Der),
                docs.iter().cloned().map(SignInput::Message).collect(),
            ),
            None,
        )
        .expect("sign");
    assert_eq!(sigs.len(), 3);
    let public = skf.public_key_pem("sm2-sign");
    for (doc, sig) in docs.iter().zip(&sigs) {
        assert!(verify::openssl_sm2(&public, DEFAULT_SM2_USER_ID, doc, sig));
    }
    assert_eq!(skf.calls("SKF_ECCSignData"), 3);
}

#[test]
fn rsa_container_signs_pkcs1_and_openssl_verifies() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let cert = skf.certificate(RSA_CONTAINER);
    let sigs = skf
        .library
        .sign(
            SignRequest {
                certificate: cert.id,
                algorithm: SignAlgorithm::RsaPkcs1(HashAlg::Sha256),
                inputs: vec![SignInput::Message(DOC.to_vec())],
                logout_after: false,
            },
            None,
        )
        .expect("sign");
    assert_eq!(sigs[0].len(), 256);
    let public = skf.public_key_pem("rsa-sign");
    assert!(verify::openssl_rsa_sha256(&public, DOC, &sigs[0]));
    assert!(!verify::openssl_rsa_sha256(&public, b"other", &sigs[0]));
    assert_eq!(skf.calls("SKF_RSASignData"), 1);
}

#[test]
fn signing_without_a_verified_pin_is_not_logged_in() {
    let skf = SoftSkf::new();
    let failure = skf
        .library
        .sign(
            sm2_request(
                &skf,
                SignAlgorithm::sm2(Sm2Encoding::Der),
                vec![SignInput::Message(DOC.to_vec())],
            ),
            None,
        )
        .expect_err("no PIN verified");
    assert!(
        matches!(failure.error, Error::NotLoggedIn(ref app) if *app == skf.app()),
        "{failure:?}"
    );
    assert!(failure.completed.is_empty());
}

#[test]
fn logout_after_ends_the_verification() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let mut req = sm2_request(
        &skf,
        SignAlgorithm::sm2(Sm2Encoding::Der),
        vec![SignInput::Message(DOC.to_vec())],
    );
    req.logout_after = true;
    skf.library.sign(req.clone(), None).expect("first batch");
    assert_eq!(skf.calls("SKF_ClearSecureState"), 1);
    let failure = skf.library.sign(req, None).expect_err("PIN needed again");
    assert!(
        matches!(failure.error, Error::NotLoggedIn(_)),
        "{failure:?}"
    );
}

#[test]
fn sm2_with_an_rsa_key_is_refused_before_signing() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let failure = skf
        .library
        .sign(
            SignRequest {
                certificate: skf.certificate(RSA_CONTAINER).id,
                algorithm: SignAlgorithm::sm2(Sm2Encoding::Der),
                inputs: vec![SignInput::Message(DOC.to_vec())],
                logout_after: false,
            },
            None,
        )
        .expect_err("SM2 with RSA");
    assert!(
        matches!(failure.error, Error::MechanismNotSupported { .. }),
        "{failure:?}"
    );
    assert_eq!(
        skf.calls("SKF_RSASignData") + skf.calls("SKF_ECCSignData"),
        0
    );
}

#[test]
fn a_gbk_named_container_signs_through_its_exact_name() {
    let skf = SoftSkf::new();
    skf.verify_right_pin();
    let cert = skf
        .library
        .certificates(Some(&skf.token))
        .expect("certificates")
        .into_iter()
        .find(|c| c.id.raw_container() == soft_skf::GBK_CONTAINER)
        .expect("listed");
    // Through the id's string form, as the agent will hold it.
    let id = cert.id.to_string().parse().expect("id parses");
    let sigs = skf
        .library
        .sign(
            SignRequest {
                certificate: id,
                algorithm: SignAlgorithm::sm2(Sm2Encoding::Der),
                inputs: vec![SignInput::Message(DOC.to_vec())],
                logout_after: false,
            },
            None,
        )
        .expect("sign");
    let public = skf.public_key_pem("gbk-sm2-sign");
    assert!(verify::openssl_sm2(
        &public,
        DEFAULT_SM2_USER_ID,
        DOC,
        &sigs[0]
    ));
}
