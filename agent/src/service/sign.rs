//! `sign` and `sign.batch`: what a request turns into ([`SignPlan`]), consent and PIN, the
//! signatures on the token, `cancel` and `sign.progress`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{
    Backend, CertificateInfo, Credential, EcdsaEncoding, HashAlg, KeyAlgorithm, KeyUsage,
    LoginKind, LoginState, Progress, SignAlgorithm, SignFailure, SignInput, SignRequest,
    TokenError, TokenId, DEFAULT_SM2_USER_ID,
};
use browser_bridge::protocol::Answer;
use browser_bridge::protocol::{
    Base64Bytes, BatchSignature, DigestAlgorithm, EcdsaEncoding as WireEcdsa, SignBatchParams,
    SignBatchResult, SignFormat, SignInput as WireInput, SignOptions, SignParams, SignProgress,
    SignResult, SignatureAlgorithm,
};
use browser_bridge::RequestContext;

use crate::audit::{AuditRecord, Operation, Outcome};
use crate::cms::{self, CmsSignatureAlg, DigestAlg};
use crate::config::{ConsentMode, SigningKeyUsage};
use crate::consent::{
    self, credential as credential_from, first_question, DialogBuilder, Next, Scope,
};
use crate::dialog::{BatchItem, Consent, Document, Signer, Unlock};
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
    pub(super) async fn sign(
        &self,
        ctx: &RequestContext,
        p: SignParams,
    ) -> Result<Answer, Failure> {
        let items = vec![p.input];
        let (sigs, plan) = self
            .sign_items(ctx, &p.certificate_id, items, Vec::new(), &p.options, false)
            .await?;
        let signature = sigs
            .into_iter()
            .next()
            .ok_or_else(|| Failure::Internal("the token returned no signature".into()))?;
        Ok(Answer::of(&SignResult {
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
    ) -> Result<Answer, Failure> {
        let labels = p
            .items
            .iter()
            .map(|i| {
                i.label
                    .as_ref()
                    .map(|l| l.as_str().to_owned())
                    .unwrap_or_default()
            })
            .collect();
        let items = p.items.into_iter().map(|i| i.input).collect();
        let (sigs, _plan) = self
            .sign_items(ctx, &p.certificate_id, items, labels, &p.options, true)
            .await?;
        Ok(Answer::of(&SignBatchResult {
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
        labels: Vec<String>,
        options: &SignOptions,
        batch: bool,
    ) -> Result<(Vec<Vec<u8>>, SignPlan), Failure> {
        let origin = ctx.origin.as_str().to_owned();
        let operation = if batch {
            Operation::SignBatch
        } else {
            Operation::Sign
        };
        // No dialog slot is held here: a request waits for its origin's dialog turn only when
        // it is about to show a dialog (`run_token`), so one that needs none never waits.
        let cert = match self.find_certificate(certificate_id).await {
            Ok(cert) => cert,
            Err(e) => return Err(self.audit_failure(&origin, &operation, e).await),
        };
        let result = self
            .sign_with(ctx, &cert, items, labels, options, batch)
            .await;
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
            self.audit_durable(record).await?;
        } else {
            self.audit(record).await;
        }
        result.map_err(|(e, _)| e)
    }

    async fn sign_with(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        items: Vec<WireInput>,
        labels: Vec<String>,
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
        let item_digests = digests.clone();
        let count = digests.len();
        let build: DialogBuilder = Arc::new(move |texts, unlock, scope| {
            let signer = Signer {
                origin: &origin,
                holder: &signer_holder,
                issuer: &signer_issuer,
                token_label: &token_label,
            };
            let index = match scope {
                Scope::Item { index, .. } => index,
                Scope::All => 0,
            };
            let doc = Document {
                title: &title,
                summary: summary.as_deref(),
                digest: item_digests.get(index).map_or(&[][..], Vec::as_slice),
            };
            match scope {
                Scope::Item {
                    index,
                    count,
                    announce,
                } if batch => {
                    let label = labels.get(index).map(String::as_str);
                    let item = BatchItem {
                        label,
                        index,
                        count,
                        announce,
                    };
                    texts.sign_batch_item(&signer, &doc, item, unlock)
                }
                _ if batch => texts.sign_batch(&signer, &doc, count, &labels, unlock),
                _ => texts.sign(&signer, &doc, unlock),
            }
        });

        let req = SignRequest {
            certificate: info.id.clone(),
            algorithm: plan.algorithm,
            inputs,
            logout_after: self.config.pin_cache_seconds == 0,
            sm2_user_id: None,
        };
        let sigs = self
            .run_token(ctx, cert, req, build, batch, ConsentKind::Documents)
            .await
            .map_err(|e| (e, digests.clone()))?;
        let sigs = plan
            .finish(sigs, &cms_attrs, info)
            .map_err(|e| (e, digests.clone()))?;
        Ok((sigs, plan))
    }

    /// Consent, PIN and signatures on the token, in one loop: ask (consent and PIN in one
    /// dialog, in the origin's dialog line) → sign with that answer → on a wrong PIN ask again
    /// with the token's warning, on a login the answer could not serve (the next signature of a
    /// key that asks for its PIN per signature) ask for that one → stop at anything else. The
    /// token layer never asks and never retries a PIN; neither does this loop. `progress`:
    /// send `sign.progress` events.
    pub(super) async fn run_token(
        &self,
        ctx: &RequestContext,
        cert: &CertificateView,
        req: SignRequest,
        build: DialogBuilder,
        progress: bool,
        kind: ConsentKind,
    ) -> Result<Vec<Vec<u8>>, Failure> {
        // A session consent covers this kind of operation with this certificate only.
        let this_consent = SessionConsent::new(kind, &cert.info);
        let module = cert.module.clone();
        let total = req.inputs.len();
        let card_mark = self.tokens.card_mark();
        let session_consent = self.config.consent_mode(ctx.origin.as_str()) == ConsentMode::Session
            && self.conn(ctx.connection).consented == Some(this_consent);
        // With this session's consent given, on a PKCS#11 token whose login is kept, the token
        // is most likely still logged in: sign at once and let the token say if it is not
        // (`LoginRequired`, before any signature, which asks for the PIN as below), rather than
        // ask it first: one call to the module less per signature (issue 12). A key that asks
        // for its PIN per signature, an SKF key (its verification is never kept) and a login
        // dropped after each request would always say so, and are asked first.
        let optimistic = session_consent
            && !cert.info.always_authenticate
            && !req.logout_after
            && matches!(module, Backend::Pkcs11(_));
        let state = if optimistic {
            LoginState::LoggedIn
        } else {
            match module.login_state_async(&cert.info.id).await {
                Ok(state) => state,
                Err(TokenError::TokenNotFound(_)) => return Err(self.certificate_gone(cert)),
                // A module host that failed while a card was pulled (OpenSC 0.23 deadlocks
                // so): the token is gone if a new host no longer lists it.
                Err(e @ TokenError::ModuleHost(_)) => {
                    let (tokens, token) = (self.tokens.clone(), cert.info.id.token_id());
                    if blocking(move || tokens.token_was_pulled(card_mark, &token))
                        .await
                        .unwrap_or(false)
                    {
                        tracing::info!(error = %e, "the card was removed while its module host failed");
                        self.tokens.certificates_changed();
                        return Err(Failure::Token(TokenError::TokenNotPresent));
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::debug!(?state, optimistic, "token login state");
        if state == LoginState::Locked {
            return Err(Failure::Token(TokenError::PinLocked));
        }
        // A key known to ask for its PIN per signature is asked per signature from the start
        // (the token tells the rest: `LoginRequired`).
        let mut per_signature = cert.info.always_authenticate;
        let mut question = if per_signature && state == LoginState::LoggedIn {
            None
        } else {
            first_question(state, session_consent)
        };
        let mut done: Vec<Vec<u8>> = Vec::with_capacity(total);
        let mut last: Option<Unlock> = None;
        // Whether a per-document dialog already told the user this key asks for each one.
        let mut announced = false;
        loop {
            let mut credential = Credential::None;
            if let Some(unlock) = question.take() {
                let scope = if per_signature && total > 1 {
                    let announce = !announced;
                    announced = true;
                    Scope::Item {
                        index: done.len(),
                        count: total,
                        announce,
                    }
                } else {
                    Scope::All
                };
                let consent = match self.ask(ctx, &build, unlock, scope).await {
                    Ok(consent) => consent,
                    Err(e) => return Err(with_done(e, done)),
                };
                credential = credential_from(consent, unlock);
                last = Some(unlock);
            }
            let rest = SignRequest {
                inputs: req.inputs[done.len()..].to_vec(),
                ..req.clone()
            };
            let pin_pad = matches!(credential, Credential::PinPad);
            // A login (and a logout after the request) can show or hide private keys, so
            // certificates.list lists again after it.
            let logs_in = !matches!(credential, Credential::None) || req.logout_after;
            let events = progress.then(|| progress_sender(ctx, done.len(), total));
            let signed = self
                .sign_on_token(ctx, module.clone(), rest, credential, events, pin_pad)
                .await;
            if logs_in || matches!(&signed, Err(TokenStop::Token(f)) if f.error.is_removal()) {
                self.tokens.certificates_changed();
            }
            match signed {
                Ok(sigs) => {
                    done.extend(sigs);
                    self.update_conn(ctx.connection, |c| c.consented = Some(this_consent));
                    return Ok(done);
                }
                Err(TokenStop::Other(failure)) => return Err(with_done(failure, done)),
                Err(TokenStop::Token(SignFailure {
                    error: TokenError::TokenNotFound(_),
                    completed,
                })) if optimistic && done.is_empty() && completed.is_empty() => {
                    // What the login state's answer would have said, had it been asked.
                    return Err(self.certificate_gone(cert));
                }
                Err(TokenStop::Token(SignFailure { error, completed })) => {
                    done.extend(completed);
                    // The token asks for the next signature's own PIN: from now on each
                    // dialog is for one document (a token that hid the key's flag before the
                    // login tells it here).
                    if matches!(
                        error,
                        TokenError::LoginRequired {
                            kind: LoginKind::ContextSpecific,
                            ..
                        }
                    ) {
                        per_signature = true;
                    }
                    match consent::after(error, last) {
                        Next::Ask(unlock) => question = Some(unlock),
                        Next::Stop(error) => return Err(with_done(Failure::Token(error), done)),
                    }
                }
            }
        }
    }

    /// The certificate came from the cache and its token is gone since: what a lookup on the
    /// token would have said, and the cache goes.
    fn certificate_gone(&self, cert: &CertificateView) -> Failure {
        self.tokens.certificates_changed();
        Failure::Token(TokenError::CertificateNotFound(cert.info.id.clone()))
    }

    /// Shows one consent dialog once it is this origin's turn; the request's cancel closes it
    /// (or ends the wait for the turn).
    pub(super) async fn ask(
        &self,
        ctx: &RequestContext,
        build: &DialogBuilder,
        unlock: Unlock,
        scope: Scope,
    ) -> Result<Consent, Failure> {
        let _turn = self.dialog_turn(ctx).await?;
        let dialog = build(&self.texts, unlock, scope);
        let pinentry = self.pinentry.clone();
        let cancel = DialogCancel::new();
        let c2 = cancel.clone();
        run_cancellable(ctx, &cancel, move || dialog.ask(&pinentry, &c2))
            .await?
            .map_err(|e| Failure::Dialog(Arc::new(e)))
    }

    /// One job on the token, answered by the module's worker; `cancel` honoured. `pin_pad`: the
    /// job logs in on the reader's PIN pad, which gets the dialog timeout to answer.
    async fn sign_on_token(
        &self,
        ctx: &RequestContext,
        module: Backend,
        req: SignRequest,
        credential: Credential,
        events: Option<ProgressEvents>,
        pin_pad: bool,
    ) -> Result<Vec<Vec<u8>>, TokenStop> {
        let flag = Arc::new(AtomicBool::new(false));
        let token_id = req.certificate.token_id();
        let card_mark = self.tokens.card_mark();
        let logout_after = req.logout_after;
        let (progress_tx, progress_rx) = std::sync::mpsc::channel();
        // Events stop once the request is answered (a job left to end in the background).
        let answered = Arc::new(AtomicBool::new(false));
        let job_ended = Arc::new(tokio::sync::Notify::new());
        let forward = events.map(|send| {
            tokio::spawn(forward_progress(
                progress_rx,
                send,
                Arc::clone(&answered),
                Arc::clone(&job_ended),
            ))
        });
        let progress_tx = forward.is_some().then_some(progress_tx);
        // The module's worker answers this task directly (no thread of ours waits on it): a
        // module that hangs in C_Sign holds up neither this answer (see the cancel below) nor
        // the runtime's shutdown.
        let mut call =
            Box::pin(module.sign_async(req, credential, progress_tx, Some(flag.clone())));
        let pad_deadline = self.config.dialog_timeout();
        let mut result = tokio::select! {
            r = &mut call => r,
            () = ctx.cancel.cancelled() => {
                flag.store(true, Ordering::SeqCst);
                match tokio::time::timeout(CANCEL_GRACE, &mut call).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            path = %module.path().display(),
                            token = %token_id,
                            "the token did not stop within {} s of the cancel; the signature is left to end in the background",
                            CANCEL_GRACE.as_secs()
                        );
                        answered.store(true, Ordering::SeqCst);
                        abandon(call, module, token_id, logout_after);
                        return Err(TokenStop::Token(TokenError::Cancelled.into()));
                    }
                }
            }
            () = tokio::time::sleep(pad_deadline), if pin_pad => {
                // The reader never answered the PIN-pad login: the page learns TIMEOUT, the job
                // ends in the background (and logs out if it logged in).
                flag.store(true, Ordering::SeqCst);
                answered.store(true, Ordering::SeqCst);
                tracing::warn!(token = %token_id, "no answer from the PIN pad within the dialog timeout");
                abandon(call, module, token_id, logout_after);
                return Err(TokenStop::Other(Failure::PinPadTimeout));
            }
        };
        // The job's events all precede its answer: a job the worker ran has dropped its sender,
        // so the forwarder ends; one it never started (BUSY) still holds it in the queue.
        let started = !matches!(&result, Err(f) if matches!(f.error, TokenError::Busy { .. }));
        job_ended.notify_one();
        match forward {
            Some(forward) if started => {
                let _ = forward.await;
            }
            Some(forward) => {
                answered.store(true, Ordering::SeqCst);
                forward.abort();
            }
            None => answered.store(true, Ordering::SeqCst),
        }
        if let Err(failure) = &mut result {
            // A device error may be a card pulled in the middle of a command; so may a module
            // host that failed (a module that deadlocked on the removal).
            if failure.error.failed_function().is_some()
                || matches!(failure.error, TokenError::ModuleHost(_))
            {
                let (tokens, m, t) = (self.tokens.clone(), module.clone(), token_id.clone());
                if blocking(move || tokens.card_was_pulled(card_mark, &m, &t))
                    .await
                    .unwrap_or(false)
                {
                    tracing::info!(error = %failure.error, "the card was removed during the operation");
                    failure.error = TokenError::TokenNotPresent;
                }
            }
        }
        if !logout_after {
            self.schedule_logout(module, token_id);
        }
        result.map_err(TokenStop::Token)
    }

    /// With `pin_cache_seconds`, logs the token out that long after its last use.
    pub(super) fn schedule_logout(&self, module: Backend, token: TokenId) {
        let after = Duration::from_secs(self.config.pin_cache_seconds);
        let tokens = self.tokens.clone();
        self.pin_cache.used(token.to_string(), after, async move {
            let _ = tokio::task::spawn_blocking(move || module.logout(&token)).await;
            tokens.certificates_changed();
            tracing::debug!("PIN cache expired; token logged out");
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
        info: &CertificateInfo,
        items: &[WireInput],
        options: &SignOptions,
    ) -> Result<SignPlan, Failure> {
        let format = options.format.unwrap_or_default();
        let key = info.key_algorithm;
        let ed = matches!(key, KeyAlgorithm::Ed25519);
        let sm2 = matches!(key, KeyAlgorithm::Sm2);
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
                    } else if sm2 {
                        options.hash.unwrap_or(DigestAlgorithm::Sm3)
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
        if sm2 != (digest_algorithm == DigestAlgorithm::Sm3) {
            return Err(Failure::Algorithm(if sm2 {
                "an SM2 key signs SM3 digests: send data, or an SM3 digest".into()
            } else {
                format!("SM3 is for SM2 keys, not {}", a_key(&key.wire_name()))
            }));
        }
        if options.sm2_user_id.is_some() && !sm2 {
            return Err(Failure::Algorithm(
                "sm2UserId applies to SM2 keys only".into(),
            ));
        }
        let encoding = match (format, options.ecdsa_encoding.unwrap_or_default()) {
            (SignFormat::Cms, _) | (_, WireEcdsa::Der) => EcdsaEncoding::Der,
            (_, WireEcdsa::P1363) => EcdsaEncoding::P1363,
        };
        let requested = options.signature_algorithm;
        let h = hash_alg(digest_algorithm);
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
            (KeyAlgorithm::Sm2, None | Some(SignatureAlgorithm::Sm2)) => {
                (SignAlgorithm::Sm2(encoding), SignatureAlgorithm::Sm2)
            }
            (key, asked) => return Err(cannot_sign(key, asked)),
        };
        if options.ecdsa_encoding.is_some()
            && !matches!(
                wire_algorithm,
                SignatureAlgorithm::Ecdsa | SignatureAlgorithm::Sm2
            )
        {
            return Err(Failure::InvalidParams(
                "ecdsaEncoding applies to ECDSA and SM2 only".into(),
            ));
        }
        // SM2 raw: what the key signs, e = SM3(Z ‖ M), is what the dialog and audit show. SM2
        // CMS: the messageDigest attribute is SM3 of the document (GM/T 0010).
        let user_id = options
            .sm2_user_id
            .as_deref()
            .unwrap_or(DEFAULT_SM2_USER_ID);
        let message_digests = items
            .iter()
            .map(|i| match i {
                WireInput::Digest(d) => Ok(d.value.0.clone()),
                WireInput::Data(data) if sm2 && format == SignFormat::Raw => {
                    crate::backend::sm2_e(&info.der, user_id, &data.0)
                        .map(|e| e.to_vec())
                        .map_err(Failure::Token)
                }
                WireInput::Data(data) => Ok(cms_digest(digest_algorithm).digest(&data.0)),
            })
            .collect::<Result<_, _>>()?;
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
        info: &CertificateInfo,
    ) -> Result<(Vec<SignInput>, Vec<cms::SignedAttributes>), Failure> {
        match self.format {
            // SM2: the agent computed e for each item.
            SignFormat::Raw if matches!(self.algorithm, SignAlgorithm::Sm2(_)) => Ok((
                self.message_digests
                    .iter()
                    .map(|e| SignInput::Digest(e.clone()))
                    .collect(),
                Vec::new(),
            )),
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
        info: &CertificateInfo,
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
            SignAlgorithm::Sm2(_) => CmsSignatureAlg::Sm2,
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

/// The hash of an RSA or ECDSA signature (checked before: SM3 goes with SM2 keys only).
fn hash_alg(d: DigestAlgorithm) -> HashAlg {
    match d {
        DigestAlgorithm::Sha256 | DigestAlgorithm::Sm3 => HashAlg::Sha256,
        DigestAlgorithm::Sha384 => HashAlg::Sha384,
        DigestAlgorithm::Sha512 => HashAlg::Sha512,
    }
}

fn cms_digest(d: DigestAlgorithm) -> DigestAlg {
    match d {
        DigestAlgorithm::Sha256 => DigestAlg::Sha256,
        DigestAlgorithm::Sha384 => DigestAlg::Sha384,
        DigestAlgorithm::Sha512 => DigestAlg::Sha512,
        DigestAlgorithm::Sm3 => DigestAlg::Sm3,
    }
}

/// Certificates may sign documents with nonRepudiation, or with no keyUsage at all, unless the
/// policy allows any.
pub(crate) fn signing_allowed(usage: &[KeyUsage], policy: SigningKeyUsage) -> bool {
    policy == SigningKeyUsage::Any || usage.is_empty() || usage.contains(&KeyUsage::NonRepudiation)
}

/// Sends `sign.progress` for one job's [`Progress`].
type ProgressEvents = Box<dyn FnMut(Progress) + Send>;

/// `sign.progress` at most ten times a second, and always the last one; a job that signs the
/// rest of a request (after a dialog) counts from `offset` of the request's `total`.
fn progress_sender(ctx: &RequestContext, offset: usize, total: usize) -> ProgressEvents {
    let notifier = ctx.notifier.clone();
    let request_id = ctx.request_id.clone();
    let mut last: Option<Instant> = None;
    Box::new(move |p: Progress| {
        let done = offset + p.done;
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

/// How often the progress forwarder looks at the job's progress (half the event interval, so
/// the events still come ten a second).
const PROGRESS_POLL: Duration = Duration::from_millis(50);

/// Forwards a job's progress to `send` until the job drops its sender: the channel is read
/// every [`PROGRESS_POLL`] and when the job ends (`job_ended`), the latest count only, so the
/// module's worker never wakes a thread of ours per signature (issue 12: a batch of 1000 made
/// 1000 thread wake-ups). Stops sending once the request is `answered`.
async fn forward_progress(
    rx: std::sync::mpsc::Receiver<Progress>,
    mut send: ProgressEvents,
    answered: Arc<AtomicBool>,
    job_ended: Arc<tokio::sync::Notify>,
) {
    use std::sync::mpsc::TryRecvError;
    // After the job's answer its sender may still be dropping: look again soon, not in 50 ms.
    let mut ended = false;
    loop {
        let mut latest = None;
        let closed = loop {
            match rx.try_recv() {
                Ok(p) => latest = Some(p),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if let Some(p) = latest {
            if !answered.load(Ordering::SeqCst) {
                send(p);
            }
        }
        if closed {
            return;
        }
        if ended {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(PROGRESS_POLL) => {}
            () = job_ended.notified() => ended = true,
        }
    }
}

/// A token job given up on (cancel, PIN-pad timeout) ends in the background; a login it made
/// is not left cached.
fn abandon(
    call: impl std::future::Future<Output = Result<Vec<Vec<u8>>, SignFailure>> + Send + 'static,
    module: Backend,
    token: TokenId,
    logout_after: bool,
) {
    tokio::spawn(async move {
        let _ = call.await;
        if !logout_after {
            let _ = tokio::task::spawn_blocking(move || module.logout(&token)).await;
        }
    });
}

/// Why one token job did not return its signatures.
enum TokenStop {
    /// The token layer's answer: the error and the signatures made before it.
    Token(SignFailure),
    /// The agent's own (a PIN pad that never answered, no thread to sign on).
    Other(Failure),
}

/// A request's failure, carrying the signatures finished before it (`data.results`).
fn with_done(failure: Failure, done: Vec<Vec<u8>>) -> Failure {
    if done.is_empty() {
        failure
    } else {
        Failure::Batch {
            error: Box::new(failure),
            completed: done,
        }
    }
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
            message(Failure::Token(TokenError::MechanismNotSupported {
                algorithm: "RSA-PSS-SHA256".into(),
                key: "EC-P384".into(),
            })),
            "RSA-PSS-SHA256 is not possible with an EC-P384 key on this token"
        );
    }
}
