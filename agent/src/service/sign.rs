//! `sign` and `sign.batch`: what a request turns into ([`SignPlan`]), consent and PIN, the
//! signatures on the token, `cancel` and `sign.progress`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use browser_bridge::protocol::{
    self, Base64Bytes, BatchSignature, DigestAlgorithm, EcdsaEncoding as WireEcdsa,
    SignBatchParams, SignBatchResult, SignFormat, SignInput as WireInput, SignOptions, SignParams,
    SignProgress, SignResult, SignatureAlgorithm,
};
use browser_bridge::RequestContext;
use pkcs11_shim::{
    EcdsaEncoding, HashAlg, KeyAlgorithm, KeyUsage, LoginState, PinAnswer, SecretPin,
    SignAlgorithm, SignFailure, SignInput, SignRequest,
};
use serde_json::Value;

use crate::audit::{AuditRecord, Operation, Outcome};
use crate::cms::{self, CmsSignatureAlg, DigestAlg};
use crate::config::{ConsentMode, SigningKeyUsage};
use crate::consent::{confirm_only, DialogBuilder, DialogOutcome, DialogPinProvider, PreAsked};
use crate::dialog::{Consent, Document, PinState, Signer, Unlock};
use crate::pinentry::DialogCancel;
use crate::purpose::{ConsentKind, SessionConsent};
use crate::tokens::CertificateView;

use super::failure::a_key;
use super::{blocking, common_name, run_cancellable, Failure, Service};

/// At most this many `sign.progress` events a second.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// After a `cancel` (or the connection's end) during a signature, how long the token gets to
/// stop before the page is told USER_CANCELLED anyway (a module may hang in C_Sign).
const CANCEL_GRACE: Duration = Duration::from_secs(2);

impl Service {
    pub(super) async fn sign(&self, ctx: &RequestContext, p: SignParams) -> Result<Value, Failure> {
        let items = vec![p.input];
        let (sigs, plan) = self
            .sign_items(ctx, &p.certificate_id, items, &p.options, false)
            .await?;
        let signature = sigs
            .into_iter()
            .next()
            .ok_or_else(|| Failure::Internal("the token returned no signature".into()))?;
        Ok(protocol::to_json(&SignResult {
            signature: Base64Bytes(signature),
            format: plan.format,
            signature_algorithm: plan.wire_algorithm,
            digest_algorithm: plan.digest_algorithm,
            certificate: Base64Bytes(plan.certificate),
        }))
    }

    pub(super) async fn sign_batch(
        &self,
        ctx: &RequestContext,
        p: SignBatchParams,
    ) -> Result<Value, Failure> {
        let items = p.items.into_iter().map(|i| i.input).collect();
        let (sigs, _plan) = self
            .sign_items(ctx, &p.certificate_id, items, &p.options, true)
            .await?;
        Ok(protocol::to_json(&SignBatchResult {
            results: sigs
                .into_iter()
                .map(|s| BatchSignature {
                    signature: Base64Bytes(s),
                })
                .collect(),
        }))
    }

    /// The heart of `sign` and `sign.batch`.
    async fn sign_items(
        &self,
        ctx: &RequestContext,
        certificate_id: &str,
        items: Vec<WireInput>,
        options: &SignOptions,
        batch: bool,
    ) -> Result<(Vec<Vec<u8>>, SignPlan), Failure> {
        let origin = ctx.origin.as_str().to_owned();
        let operation = if batch {
            Operation::SignBatch
        } else {
            Operation::Sign
        };
        // The origin's one dialog slot is claimed before anything reaches the token: the
        // token's worker may be blocked by this origin's open dialog, and a second request must
        // get BUSY at once rather than queue behind it.
        let _slot = self
            .claim_dialog(&origin)
            .map_err(|e| self.audit_failure(&origin, &operation, e))?;
        let cert = self
            .find_certificate(certificate_id)
            .await
            .map_err(|e| self.audit_failure(&origin, &operation, e))?;
        let result = self.sign_with(ctx, &cert, items, options, batch).await;
        let mut record = AuditRecord::new(origin, operation)
            .certificate(cert.info.subject.clone(), &cert.info.der);
        match &result {
            Ok((_, plan)) => {
                for d in &plan.message_digests {
                    record = record.digest(d);
                }
                record = record.outcome(Outcome::Granted);
            }
            Err((e, digests)) => {
                for d in digests {
                    record = record.digest(d);
                }
                record = record.outcome(e.outcome());
            }
        }
        if result.is_ok() {
            // Fails closed: no signature leaves without its durable audit record.
            self.audit_durable(record)?;
        } else {
            self.audit(record);
        }
        result.map_err(|(e, _)| e)
    }

    async fn sign_with(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        items: Vec<WireInput>,
        options: &SignOptions,
        batch: bool,
    ) -> Result<(Vec<Vec<u8>>, SignPlan), (Failure, Vec<Vec<u8>>)> {
        let info = &cert.info;
        if !crate::purpose::may_sign_documents(info, &self.config) {
            return Err((
                Failure::KeyUsage(
                    "this certificate is for logging in, not for document signatures".into(),
                ),
                Vec::new(),
            ));
        }
        let plan = SignPlan::new(info, &items, options).map_err(|e| (e, Vec::new()))?;
        let digests = plan.message_digests.clone();
        let (inputs, cms_attrs) = plan
            .token_inputs(items, info)
            .map_err(|e| (e, digests.clone()))?;

        let signer_holder = info.holder.clone();
        let signer_issuer = common_name(&info.issuer);
        let token_label = self.token_label(&info.token_id).await.unwrap_or_default();
        let origin = ctx.origin.as_str().to_owned();
        let title = options.display.title.as_str().to_owned();
        let summary = options
            .display
            .summary
            .as_ref()
            .map(|s| s.as_str().to_owned());
        let first_digest = digests.first().cloned().unwrap_or_default();
        let count = digests.len();
        let build: DialogBuilder = Arc::new(move |texts, unlock| {
            let signer = Signer {
                origin: &origin,
                holder: &signer_holder,
                issuer: &signer_issuer,
                token_label: &token_label,
            };
            let doc = Document {
                title: &title,
                summary: summary.as_deref(),
                digest: &first_digest,
            };
            if batch {
                texts.sign_batch(&signer, &doc, count, unlock)
            } else {
                texts.sign(&signer, &doc, unlock)
            }
        });

        let progress = batch.then(|| progress_sender(ctx));
        let req = SignRequest {
            certificate: info.id.clone(),
            algorithm: plan.algorithm,
            inputs,
            logout_after: self.config.pin_cache_seconds == 0,
        };
        let kind = if batch {
            ConsentKind::SignBatch
        } else {
            ConsentKind::Sign
        };
        let sigs = self
            .run_token(ctx, cert, req, build, progress, kind)
            .await
            .map_err(|e| (e, digests.clone()))?;
        let sigs = plan
            .finish(sigs, &cms_attrs, info)
            .map_err(|e| (e, digests.clone()))?;
        Ok((sigs, plan))
    }

    /// Consent, PIN and signatures on the token (the caller holds the origin's dialog slot),
    /// `cancel` honoured, and the PIN cache kept.
    pub(super) async fn run_token(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        req: SignRequest,
        build: DialogBuilder,
        progress: Option<pkcs11_shim::Progress>,
        kind: ConsentKind,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let this_consent = SessionConsent::new(kind, &cert.info);
        let module = cert.module.clone();
        let token_id = cert.info.token_id.clone();
        let dialog_cancel = DialogCancel::new();

        let state = {
            let module = module.clone();
            let token_id = token_id.clone();
            blocking(move || module.login_state(&token_id)).await??
        };
        let session_consent = self.config.consent_mode(ctx.origin.as_str()) == ConsentMode::Session
            && self.conn(ctx.connection).consented == Some(this_consent);
        tracing::debug!(?state, session_consent, "token login state");
        if state == LoginState::Locked {
            return Err(Failure::Token(pkcs11_shim::Error::PinLocked));
        }
        if state == LoginState::LoggedIn {
            if !session_consent {
                let pinentry = self.pinentry.clone();
                let texts = self.texts;
                let c2 = dialog_cancel.clone();
                let b2 = Arc::clone(&build);
                let answer = run_cancellable(ctx, &dialog_cancel, move || {
                    confirm_only(&pinentry, &c2, &texts, &b2)
                })
                .await?;
                answer.map_err(|e| Failure::Dialog(Arc::new(e)))?;
            }
            // Consent is given (now, or once for this connection); the token is logged in. A
            // key that wants its own PIN per signature, or a cache that expired just now, asks
            // with the same text.
            let outcome = DialogOutcome::default();
            let provider = DialogPinProvider::new(
                self.pinentry.clone(),
                dialog_cancel.clone(),
                self.texts,
                build,
                outcome.clone(),
            );
            let result = self
                .sign_on_token(
                    ctx,
                    module,
                    req,
                    dialog_cancel,
                    Box::new(provider),
                    progress,
                )
                .await;
            return match (result, outcome.error()) {
                (Err(Failure::Token(pkcs11_shim::Error::UserCancelled)), Some(e)) => {
                    Err(Failure::Dialog(e))
                }
                (other, _) => {
                    if other.is_ok() {
                        self.update_conn(ctx.connection, |c| c.consented = Some(this_consent));
                    }
                    other
                }
            };
        }
        // The consent and PIN dialog is shown here, off the module's worker thread; the token
        // work starts only with the user's answer. A wrong PIN comes back here for the next
        // dialog, with the token's warning.
        let protected = state == LoginState::ProtectedPath;
        let mut pin_state = match state {
            LoginState::NeedsPin(st) => PinState {
                wrong_pin: false,
                count_low: st.count_low,
                final_try: st.final_try,
            },
            _ => PinState::default(),
        };
        let mut progress = progress;
        loop {
            let unlock = if protected {
                Unlock::PinPad(pin_state)
            } else {
                Unlock::Pin(pin_state)
            };
            let dialog = build(&self.texts, unlock);
            let pinentry = self.pinentry.clone();
            let c2 = dialog_cancel.clone();
            let answer = run_cancellable(ctx, &dialog_cancel, move || dialog.ask(&pinentry, &c2))
                .await?
                .map_err(|e| Failure::Dialog(Arc::new(e)))?;
            let first = match answer {
                Consent::Pin(mut pin) => PinAnswer::Pin(SecretPin::from(std::mem::take(&mut *pin))),
                Consent::Confirmed => PinAnswer::Confirmed,
            };
            let wrong = Arc::new(Mutex::new(None));
            let outcome = DialogOutcome::default();
            let fallback = DialogPinProvider::new(
                self.pinentry.clone(),
                dialog_cancel.clone(),
                self.texts,
                Arc::clone(&build),
                outcome.clone(),
            );
            let provider = PreAsked::new(first, Arc::clone(&wrong), fallback);
            // `Module::sign` takes the request; a wrong PIN sends it again, so each attempt
            // gets a copy of the inputs (at most `max_message_bytes`, next to a human dialog).
            let result = self
                .sign_on_token(
                    ctx,
                    module.clone(),
                    req.clone(),
                    dialog_cancel.clone(),
                    Box::new(provider),
                    progress.take(),
                )
                .await;
            // (A batch cancelled before its first signature is a `Failure::Token`: see
            // `sign_on_token`.)
            if matches!(
                &result,
                Err(Failure::Token(pkcs11_shim::Error::UserCancelled))
            ) {
                if let Some(flags) = wrong.lock().ok().and_then(|w| *w) {
                    // A wrong PIN: the user may try again, in a new dialog that says so.
                    pin_state = PinState {
                        wrong_pin: true,
                        count_low: flags.count_low,
                        final_try: flags.final_try,
                    };
                    if progress.is_none() && req.inputs.len() > 1 {
                        progress = Some(progress_sender(ctx));
                    }
                    continue;
                }
                if let Some(e) = outcome.error() {
                    return Err(Failure::Dialog(e));
                }
            }
            if result.is_ok() {
                self.update_conn(ctx.connection, |c| c.consented = Some(this_consent));
            }
            return result;
        }
    }

    async fn sign_on_token(
        &self,
        ctx: &RequestContext,
        module: pkcs11_shim::Module,
        req: SignRequest,
        dialog_cancel: DialogCancel,
        provider: Box<dyn pkcs11_shim::PinProvider>,
        progress: Option<pkcs11_shim::Progress>,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        let flag = Arc::new(AtomicBool::new(false));
        let token_id = req.certificate.token_id().clone();
        let card_mark = self.tokens.card_mark();
        let f2 = Arc::clone(&flag);
        let (m2, t2) = (module.clone(), token_id.clone());
        let logout_after = req.logout_after;
        // A thread of its own rather than a blocking task: a module that hangs in C_Sign must
        // hold up neither this answer (see the cancel below) nor the runtime's shutdown.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("keyport-sign".into())
            .spawn(move || {
                let result = m2.sign(req, provider, progress, Some(f2));
                if tx.send(result).is_err() && !logout_after {
                    // Given up on after a cancel; a login it made is not left cached.
                    let _ = m2.logout(&t2);
                }
            })
            .map_err(|e| Failure::Internal(format!("cannot start a signing thread: {e}")))?;
        let joined = tokio::select! {
            r = &mut rx => r,
            () = ctx.cancel.cancelled() => {
                flag.store(true, Ordering::SeqCst);
                dialog_cancel.cancel();
                match tokio::time::timeout(CANCEL_GRACE, &mut rx).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            path = %module.path().display(),
                            token = %token_id,
                            "the token did not stop within {} s of the cancel; the signature is left to end in the background",
                            CANCEL_GRACE.as_secs()
                        );
                        return Err(Failure::Token(pkcs11_shim::Error::Cancelled));
                    }
                }
            }
        };
        let mut result = joined
            .map_err(|_| Failure::Internal("the signing thread ended without an answer".into()))?;
        if let Err(failure) = &mut result {
            // A device error may be a card pulled in the middle of a command.
            if matches!(failure.error, pkcs11_shim::Error::Pkcs11 { .. }) {
                let (tokens, m, t) = (self.tokens.clone(), module.clone(), token_id.clone());
                if blocking(move || tokens.card_was_pulled(card_mark, &m, &t))
                    .await
                    .unwrap_or(false)
                {
                    tracing::info!(error = %failure.error, "the card was removed during the operation");
                    failure.error = pkcs11_shim::Error::TokenNotPresent;
                }
            }
        }
        if !logout_after {
            self.schedule_logout(module, token_id);
        }
        result.map_err(|SignFailure { error, completed }| {
            if completed.is_empty() {
                Failure::Token(error)
            } else {
                Failure::Batch { error, completed }
            }
        })
    }

    /// With `pin_cache_seconds`, logs the token out that long after its last use.
    fn schedule_logout(&self, module: pkcs11_shim::Module, token: pkcs11_shim::TokenId) {
        let secs = self.config.pin_cache_seconds;
        let cache = Arc::clone(&self.pin_cache);
        let key = token.to_string();
        let generation = match cache.lock() {
            Ok(mut c) => {
                let g = c.entry(key.clone()).or_insert(0);
                *g += 1;
                *g
            }
            Err(_) => return,
        };
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let current = cache.lock().ok().and_then(|c| c.get(&key).copied());
            if current == Some(generation) {
                let _ = tokio::task::spawn_blocking(move || module.logout(&token)).await;
                tracing::debug!("PIN cache expired; token logged out");
            }
        });
    }
}

/// What a signing request turned into: algorithm, digests, output format.
#[derive(Debug, Clone)]
pub(crate) struct SignPlan {
    pub(crate) algorithm: SignAlgorithm,
    pub(crate) wire_algorithm: SignatureAlgorithm,
    digest_algorithm: DigestAlgorithm,
    format: SignFormat,
    /// The digest of each document (what the dialog and audit show).
    pub(crate) message_digests: Vec<Vec<u8>>,
    certificate: Vec<u8>,
}

impl SignPlan {
    pub(crate) fn new(
        info: &pkcs11_shim::CertificateInfo,
        items: &[WireInput],
        options: &SignOptions,
    ) -> Result<SignPlan, Failure> {
        let format = options.format.unwrap_or_default();
        let key = info.key_algorithm;
        let ed = matches!(key, KeyAlgorithm::Ed25519);
        if ed && options.hash.is_some() {
            return Err(Failure::InvalidParams(
                "hash does not apply to Ed25519, which signs the data itself: leave hash out"
                    .into(),
            ));
        }
        // One hash for the whole request.
        let mut hash: Option<DigestAlgorithm> = None;
        for item in items {
            let h = match item {
                WireInput::Digest(d) => d.algorithm,
                WireInput::Data(_) => {
                    if ed {
                        DigestAlgorithm::Sha512
                    } else {
                        options.data_hash()
                    }
                }
            };
            if hash.is_some_and(|x| x != h) {
                return Err(Failure::InvalidParams(
                    "every item of a batch must use the same digest algorithm".into(),
                ));
            }
            hash = Some(h);
        }
        let digest_algorithm = hash.unwrap_or_default();
        if ed {
            let has_digest = items.iter().any(|i| matches!(i, WireInput::Digest(_)));
            if has_digest
                && (format == SignFormat::Raw || digest_algorithm != DigestAlgorithm::Sha512)
            {
                return Err(Failure::InvalidParams(
                    "Ed25519 signs the document itself: send data, not a digest".into(),
                ));
            }
        }
        let h = hash_alg(digest_algorithm);
        let encoding = match (format, options.ecdsa_encoding.unwrap_or_default()) {
            (SignFormat::Cms, _) | (_, WireEcdsa::Der) => EcdsaEncoding::Der,
            (_, WireEcdsa::P1363) => EcdsaEncoding::P1363,
        };
        let requested = options.signature_algorithm;
        let (algorithm, wire_algorithm) = match (key, requested) {
            (KeyAlgorithm::Rsa { .. }, None | Some(SignatureAlgorithm::RsaPkcs1v15)) => (
                SignAlgorithm::RsaPkcs1v15(h),
                SignatureAlgorithm::RsaPkcs1v15,
            ),
            (KeyAlgorithm::Rsa { .. }, Some(SignatureAlgorithm::RsaPss)) => {
                (SignAlgorithm::RsaPss(h), SignatureAlgorithm::RsaPss)
            }
            (
                KeyAlgorithm::EcP256 | KeyAlgorithm::EcP384 | KeyAlgorithm::EcP521,
                None | Some(SignatureAlgorithm::Ecdsa),
            ) => (SignAlgorithm::Ecdsa(h, encoding), SignatureAlgorithm::Ecdsa),
            (KeyAlgorithm::Ed25519, None | Some(SignatureAlgorithm::Ed25519)) => {
                (SignAlgorithm::Ed25519, SignatureAlgorithm::Ed25519)
            }
            (key, asked) => return Err(cannot_sign(key, asked)),
        };
        if options.ecdsa_encoding.is_some() && wire_algorithm != SignatureAlgorithm::Ecdsa {
            return Err(Failure::InvalidParams(
                "ecdsaEncoding applies to ECDSA only".into(),
            ));
        }
        let message_digests = items
            .iter()
            .map(|i| match i {
                WireInput::Digest(d) => d.value.0.clone(),
                WireInput::Data(data) => h.digest(&data.0),
            })
            .collect();
        Ok(SignPlan {
            algorithm,
            wire_algorithm,
            digest_algorithm,
            format,
            message_digests,
            certificate: info.der.clone(),
        })
    }

    /// What the token signs for each item: the digest or data itself (raw), or the DER signed
    /// attributes (CMS), which are kept to assemble the SignedData afterwards.
    pub(crate) fn token_inputs(
        &self,
        items: Vec<WireInput>,
        info: &pkcs11_shim::CertificateInfo,
    ) -> Result<(Vec<SignInput>, Vec<cms::SignedAttributes>), Failure> {
        match self.format {
            SignFormat::Raw => Ok((
                items
                    .into_iter()
                    .map(|i| match i {
                        WireInput::Digest(d) => SignInput::Digest(d.value.0),
                        WireInput::Data(d) => SignInput::Data(d.0),
                    })
                    .collect(),
                Vec::new(),
            )),
            SignFormat::Cms => {
                let now = time::OffsetDateTime::now_utc();
                let attrs = self
                    .message_digests
                    .iter()
                    .map(|md| {
                        cms::signed_attributes(
                            cms_digest(self.digest_algorithm),
                            md,
                            now,
                            &info.der,
                        )
                        .map_err(|e| Failure::Internal(format!("CMS: {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let inputs = attrs
                    .iter()
                    .map(|a| SignInput::Data(a.to_be_signed().to_vec()))
                    .collect();
                Ok((inputs, attrs))
            }
        }
    }

    /// Turns the token's signatures into the requested output.
    pub(crate) fn finish(
        &self,
        sigs: Vec<Vec<u8>>,
        attrs: &[cms::SignedAttributes],
        info: &pkcs11_shim::CertificateInfo,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        if self.format == SignFormat::Raw {
            return Ok(sigs);
        }
        let h = cms_digest(self.digest_algorithm);
        let alg = match self.algorithm {
            SignAlgorithm::RsaPkcs1v15(_) => CmsSignatureAlg::RsaPkcs1(h),
            SignAlgorithm::RsaPss(_) => CmsSignatureAlg::RsaPss(h),
            SignAlgorithm::Ecdsa(..) => CmsSignatureAlg::EcdsaWith(h),
            SignAlgorithm::Ed25519 => CmsSignatureAlg::Ed25519,
        };
        sigs.iter()
            .zip(attrs)
            .map(|(sig, a)| {
                cms::assemble(a, &info.der, alg, sig)
                    .map_err(|e| Failure::Internal(format!("CMS: {e}")))
            })
            .collect()
    }
}

/// ALGORITHM_NOT_SUPPORTED for a key asked for a signature it cannot make, in the protocol's
/// names: "an EC-P256 key cannot sign RSA-PSS".
fn cannot_sign(key: KeyAlgorithm, asked: Option<SignatureAlgorithm>) -> Failure {
    let key = a_key(&key.wire_name());
    Failure::Algorithm(match asked {
        Some(asked) => format!("{key} cannot sign {}", asked.as_str()),
        None => format!("{key} cannot sign here"),
    })
}

fn hash_alg(d: DigestAlgorithm) -> HashAlg {
    match d {
        DigestAlgorithm::Sha256 => HashAlg::Sha256,
        DigestAlgorithm::Sha384 => HashAlg::Sha384,
        DigestAlgorithm::Sha512 => HashAlg::Sha512,
    }
}

fn cms_digest(d: DigestAlgorithm) -> DigestAlg {
    match d {
        DigestAlgorithm::Sha256 => DigestAlg::Sha256,
        DigestAlgorithm::Sha384 => DigestAlg::Sha384,
        DigestAlgorithm::Sha512 => DigestAlg::Sha512,
    }
}

/// Certificates may sign documents with nonRepudiation, or with no keyUsage at all, unless the
/// policy allows any.
pub(crate) fn signing_allowed(usage: &[KeyUsage], policy: SigningKeyUsage) -> bool {
    policy == SigningKeyUsage::Any || usage.is_empty() || usage.contains(&KeyUsage::NonRepudiation)
}

/// `sign.progress` at most ten times a second, and always the last one.
fn progress_sender(ctx: &RequestContext) -> pkcs11_shim::Progress {
    let notifier = ctx.notifier.clone();
    let request_id = ctx.request_id.clone();
    let mut last: Option<Instant> = None;
    Box::new(move |done, total| {
        let now = Instant::now();
        let due = last.is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL);
        if due || done == total {
            last = Some(now);
            notifier.send_event(&SignProgress {
                request_id: request_id.clone(),
                done: u32::try_from(done).unwrap_or(u32::MAX),
                total: u32::try_from(total).unwrap_or(u32::MAX),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_algorithm_mismatch_is_told_in_the_protocols_names() {
        let message = |f: Failure| f.to_rpc().message;
        assert_eq!(
            message(cannot_sign(
                KeyAlgorithm::EcP256,
                Some(SignatureAlgorithm::RsaPss)
            )),
            "an EC-P256 key cannot sign RSA-PSS"
        );
        assert_eq!(
            message(cannot_sign(
                KeyAlgorithm::Rsa { bits: 2048 },
                Some(SignatureAlgorithm::Ed25519)
            )),
            "an RSA-2048 key cannot sign Ed25519"
        );
        assert_eq!(
            message(cannot_sign(
                KeyAlgorithm::Ed25519,
                Some(SignatureAlgorithm::RsaPkcs1v15)
            )),
            "an Ed25519 key cannot sign RSASSA-PKCS1-v1_5"
        );
        assert_eq!(
            message(Failure::Token(pkcs11_shim::Error::MechanismNotSupported {
                algorithm: "RSA-PSS-SHA256".into(),
                key: "EC-P384".into(),
            })),
            "RSA-PSS-SHA256 is not possible with an EC-P384 key on this token"
        );
    }
}
