//! What the command line does with tokens: list them, list certificates, sign a file. The same
//! planning, PIN dialog and output code as the WebSocket service, without a page.

use std::path::Path;

use browser_bridge::protocol::{
    Base64Bytes, DigestAlgorithm, Display, EcdsaEncoding as WireEcdsa, SignFormat,
    SignInput as WireInput, SignOptions, SignatureAlgorithm, Title,
};
use pkcs11_shim::{CertificateId, SignRequest};
use serde_json::Value;

use crate::config::Config;
use crate::consent::{DialogBuilder, DialogOutcome, DialogPinProvider};
use crate::dialog::{Document, Signer, Texts};
use crate::pinentry::{DialogCancel, Pinentry};
use crate::service::{
    certificate_entry, common_name, signing_allowed, token_entry, Failure, SignPlan,
};
use crate::tokens::TokenSet;

/// What `keyport sign` was asked.
#[derive(Debug, Clone)]
pub struct SignFileRequest<'a> {
    pub certificate: &'a str,
    pub input: &'a Path,
    pub output: &'a Path,
    pub format: SignFormat,
    pub hash: Option<DigestAlgorithm>,
    pub ecdsa_encoding: Option<WireEcdsa>,
    pub signature_algorithm: Option<SignatureAlgorithm>,
}

/// The `tokens.list` entries, as JSON.
pub fn tokens_json(tokens: &TokenSet) -> Value {
    Value::Array(
        tokens
            .tokens()
            .iter()
            .map(|t| browser_bridge::protocol::to_json(&token_entry(t)))
            .collect(),
    )
}

/// The `certificates.list` entries with `label` (CKA_LABEL) added, as JSON.
pub fn certificates_json(tokens: &TokenSet) -> Value {
    Value::Array(
        tokens
            .certificates()
            .iter()
            .filter_map(|c| {
                let mut v = browser_bridge::protocol::to_json(&certificate_entry(&c.info)?);
                if let Value::Object(m) = &mut v {
                    m.insert("label".into(), Value::String(c.info.label.clone()));
                }
                Some(v)
            })
            .collect(),
    )
}

/// Signs a file with a certificate's key, asking the PIN through pinentry, and writes the
/// signature (raw or CMS) to the output file. Nothing is written on failure.
pub fn sign_file(
    config: &Config,
    tokens: &TokenSet,
    pinentry: &Pinentry,
    texts: Texts,
    req: &SignFileRequest<'_>,
) -> Result<(), SignFileError> {
    let id: CertificateId = req.certificate.parse().map_err(|_| {
        SignFileError::Usage(format!(
            "{:?} is not a certificate id (see `keyport certs`)",
            req.certificate
        ))
    })?;
    let data = std::fs::read(req.input).map_err(|e| SignFileError::Io {
        path: req.input.display().to_string(),
        source: e,
    })?;
    let cert = tokens
        .certificate(&id)
        .map_err(|e| SignFileError::Failure(Failure::Token(e)))?;
    if !signing_allowed(&cert.info.key_usage, config.signing_key_usage) {
        return Err(SignFileError::Failure(Failure::KeyUsage(
            "this certificate is not for document signatures (keyUsage lacks nonRepudiation); \
             `signing_key_usage = \"any\"` in the configuration allows it"
                .into(),
        )));
    }
    let name = req.input.file_name().map_or_else(
        || req.input.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let title = Title::parse(name.chars().take(200).filter(|c| !c.is_control()).collect())
        .map_err(|e| SignFileError::Usage(format!("file name: {e}")))?;
    let options = SignOptions {
        hash: req.hash,
        signature_algorithm: req.signature_algorithm,
        format: Some(req.format),
        ecdsa_encoding: req.ecdsa_encoding,
        display: Display {
            title,
            summary: None,
        },
    };
    let items = vec![WireInput::Data(Base64Bytes(data))];
    let plan = SignPlan::new(&cert.info, &items, &options).map_err(SignFileError::Failure)?;
    let digest = plan.message_digests.first().cloned().unwrap_or_default();
    let (inputs, attrs) = plan
        .token_inputs(items, &cert.info)
        .map_err(SignFileError::Failure)?;

    let token_label = tokens
        .token(&cert.info.token_id)
        .map(|t| t.info.label.trim().to_owned())
        .unwrap_or_default();
    let holder = cert.info.holder.clone();
    let issuer = common_name(&cert.info.issuer);
    let build: DialogBuilder = Box::new(move |texts, unlock| {
        texts.sign(
            &Signer {
                origin: "keyport sign (command line)",
                holder: &holder,
                issuer: &issuer,
                token_label: &token_label,
            },
            &Document {
                title: &name,
                summary: None,
                digest: &digest,
            },
            unlock,
        )
    });
    let outcome = DialogOutcome::default();
    let provider = DialogPinProvider::new(
        pinentry.clone(),
        DialogCancel::new(),
        texts,
        build,
        outcome.clone(),
    );
    let sign_req = SignRequest {
        certificate: cert.info.id.clone(),
        algorithm: plan.algorithm,
        inputs,
        logout_after: true,
    };
    let sigs = cert
        .module
        .sign(sign_req, Box::new(provider), None, None)
        .map_err(|f| match (&f.error, outcome.error()) {
            (pkcs11_shim::Error::UserCancelled, Some(dialog)) => {
                SignFileError::Failure(Failure::Dialog(dialog))
            }
            _ => SignFileError::Failure(Failure::Token(f.error)),
        })?;
    let out = plan
        .finish(sigs, &attrs, &cert.info)
        .map_err(SignFileError::Failure)?;
    let sig = out
        .into_iter()
        .next()
        .ok_or_else(|| SignFileError::Failure(Failure::Internal("no signature".into())))?;
    write_new(req.output, &sig).map_err(|e| SignFileError::Io {
        path: req.output.display().to_string(),
        source: e,
    })
}

/// Writes through a temporary file and a rename, so a failed run leaves no partial output.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("keyport-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[derive(Debug, thiserror::Error)]
pub enum SignFileError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", describe(.0))]
    Failure(Failure),
}

/// A one-line description for the terminal: the protocol's reason and what it means here.
fn describe(f: &Failure) -> String {
    let rpc = f.to_rpc();
    format!("{} ({})", rpc.message, rpc.reason.as_str())
}
