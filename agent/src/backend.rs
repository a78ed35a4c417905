//! What a token back end is, to the rest of the agent: one small enum over the two shims, and
//! the vocabulary the service speaks whichever back end serves a token.
//!
//! - [`Backend`]: a loaded PKCS#11 module ([`pkcs11_shim::Module`]) or SKF library
//!   ([`skf_shim::Library`]). Every call blocks on the shim's worker thread (call it from
//!   `spawn_blocking`). A PKCS#11 module in a module host (`module_isolation`) is a hosted
//!   [`pkcs11_shim::Module`] inside [`Backend::Pkcs11`], answering the same calls.
//! - Ids, token and certificate descriptions, signing jobs, credentials and errors are the
//!   agent's own types; each shim's are translated here, once ([`TokenError`]'s `From`s are the
//!   one translation of shim errors into what the service acts on). The service never asks which
//!   back end it talks to.
//!
//! Plain PKCS#11-shim data types whose meaning is the same for both back ends (PIN flags,
//! login state, key usage bits, hashes, progress) are the agent's vocabulary as they are.
//!
//! SKF differences the translation absorbs: the PIN belongs to an application, not the token
//! (a certificate id names both); an SKF library reports exact retry counts, turned into the
//! count-low / final-try flags PKCS#11 tokens report; SKF has no PIN pad and no per-signature
//! login; SM2 signs e = SM3(Z ‖ M), which the agent computes (see [`sm2_e`]).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use time::OffsetDateTime;
use zeroize::Zeroizing;

pub use pkcs11_shim::{
    EcdsaEncoding, HashAlg, KeyUsage, LoginKind, LoginState, PinStatus, Progress, SignInput,
};
pub use skf_shim::DEFAULT_SM2_USER_ID;

/// Which kind of library a back end loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// A PKCS#11 module.
    Pkcs11,
    /// An SKF (GM/T 0016) library.
    Skf,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Pkcs11 => "PKCS#11 module",
            BackendKind::Skf => "SKF library",
        })
    }
}

/// A loaded token library. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Backend {
    Pkcs11(pkcs11_shim::Module),
    Skf(skf_shim::Library),
}

impl Backend {
    /// Loads the library at `path` as `kind`, on its own worker thread.
    pub fn load(
        kind: BackendKind,
        path: &Path,
        call_timeout: Duration,
    ) -> Result<Backend, TokenError> {
        Ok(match kind {
            BackendKind::Pkcs11 => Backend::Pkcs11(pkcs11_shim::Module::load_with(
                path,
                pkcs11_shim::LoadOptions { call_timeout },
            )?),
            BackendKind::Skf => Backend::Skf(skf_shim::Library::load_with(
                path,
                skf_shim::LoadOptions { call_timeout },
            )?),
        })
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Pkcs11(_) => BackendKind::Pkcs11,
            Backend::Skf(_) => BackendKind::Skf,
        }
    }

    /// The path the library was loaded from.
    pub fn path(&self) -> &Path {
        match self {
            Backend::Pkcs11(m) => m.path(),
            Backend::Skf(l) => l.path(),
        }
    }

    /// The longest wait for one of this library's answers.
    pub fn call_timeout(&self) -> Duration {
        match self {
            Backend::Pkcs11(m) => m.call_timeout(),
            Backend::Skf(l) => l.call_timeout(),
        }
    }

    /// True while the worker is still behind a request given up on (no library call).
    pub fn is_behind(&self) -> bool {
        match self {
            Backend::Pkcs11(m) => m.is_behind(),
            Backend::Skf(l) => l.is_behind(),
        }
    }

    /// One line about the library for `keyport doctor`: its own description (PKCS#11
    /// C_GetInfo), or the optional SKF functions it lacks.
    pub fn description(&self) -> Option<String> {
        match self {
            Backend::Pkcs11(m) => m
                .info()
                .ok()
                .map(|i| i.library_description.trim().to_owned()),
            Backend::Skf(l) => {
                let missing = l.missing_functions();
                Some(if missing.is_empty() {
                    "every SKF function KeyPort uses".to_owned()
                } else {
                    format!("lacks {}", missing.join(", "))
                })
            }
        }
    }

    /// The tokens present now. An SKF token's PIN state is its first application's.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, TokenError> {
        match self {
            Backend::Pkcs11(m) => Ok(m.tokens()?.into_iter().map(TokenInfo::from).collect()),
            Backend::Skf(l) => {
                let mut out = Vec::new();
                for t in l.tokens()? {
                    let pin = match l.applications(&t.id) {
                        Ok(apps) => apps.first().map(|a| pin_status(a.pin)).unwrap_or_default(),
                        // Pulled out since SKF_EnumDev: not listed (the others still are).
                        Err(
                            skf_shim::Error::TokenNotPresent | skf_shim::Error::TokenNotFound(_),
                        ) => continue,
                        Err(e @ skf_shim::Error::Busy { .. }) => return Err(e.into()),
                        Err(e) => {
                            tracing::debug!(token = %t.id, error = %e, "the key's PIN state is unknown");
                            PinStatus::default()
                        }
                    };
                    out.push(TokenInfo {
                        id: TokenId::Skf(t.id),
                        slot_description: t.device_name,
                        label: t.label,
                        manufacturer: t.manufacturer,
                        model: String::new(),
                        serial: t.serial,
                        pin_pad: false,
                        pin,
                        logged_in: false,
                    });
                }
                Ok(out)
            }
        }
    }

    /// Certificates with their key on a token of this library (all tokens, or one). A token of
    /// another back end is [`TokenError::TokenNotFound`].
    pub fn certificates(
        &self,
        token: Option<&TokenId>,
    ) -> Result<Vec<CertificateInfo>, TokenError> {
        match (self, token) {
            (Backend::Pkcs11(m), None) => Ok(convert(m.certificates(None)?)),
            (Backend::Pkcs11(m), Some(TokenId::Pkcs11(t))) => Ok(convert(m.certificates(Some(t))?)),
            (Backend::Skf(l), None) => Ok(convert(l.certificates(None)?)),
            (Backend::Skf(l), Some(TokenId::Skf(t))) => Ok(convert(l.certificates(Some(t))?)),
            (_, Some(other)) => Err(TokenError::TokenNotFound(other.clone())),
        }
    }

    /// Whether signing with this certificate's key needs a PIN now. SKF: the PIN state of the
    /// key's application; a verification is never kept between requests, so it is asked.
    pub fn login_state(&self, certificate: &CertificateId) -> Result<LoginState, TokenError> {
        match (self, certificate) {
            (Backend::Pkcs11(m), CertificateId::Pkcs11(c)) => Ok(m.login_state(c.token_id())?),
            (Backend::Skf(l), CertificateId::Skf(c)) => {
                let st = l.pin_status(c.application())?;
                Ok(if st.locked {
                    LoginState::Locked
                } else {
                    LoginState::NeedsPin(pin_status(st))
                })
            }
            (_, other) => Err(TokenError::TokenNotFound(other.token_id())),
        }
    }

    /// Signs the inputs in order, logging in with `credential` where needed (see
    /// [`pkcs11_shim::Module::sign`]: the same contract for both back ends). SKF: one
    /// SKF_VerifyPIN with the PIN given, then the signatures, then SKF_ClearSecureState;
    /// without a PIN the key answers "not logged in", which comes back as
    /// [`TokenError::LoginRequired`]. `progress` hears of the SKF signatures at the end.
    pub fn sign(
        &self,
        req: SignRequest,
        credential: Credential,
        progress: Option<mpsc::Sender<Progress>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        match (self, &req.certificate) {
            (Backend::Pkcs11(m), CertificateId::Pkcs11(c)) => {
                let algorithm =
                    req.algorithm
                        .pkcs11()
                        .ok_or_else(|| TokenError::MechanismNotSupported {
                            algorithm: req.algorithm.name(),
                            key: "PKCS#11".into(),
                        })?;
                let job = pkcs11_shim::SignRequest {
                    certificate: c.clone(),
                    algorithm,
                    inputs: req.inputs,
                    logout_after: req.logout_after,
                };
                m.sign(job, credential.into_pkcs11(), progress, cancel)
                    .map_err(SignFailure::from)
            }
            (Backend::Skf(l), CertificateId::Skf(c)) => {
                let c = c.clone();
                let total = req.inputs.len();
                skf_sign(l, &c, req, credential, cancel).inspect(|_| {
                    if let Some(p) = progress {
                        let _ = p.send(Progress { done: total, total });
                    }
                })
            }
            (_, other) => Err(TokenError::TokenNotFound(other.token_id()).into()),
        }
    }

    /// [`Self::certificates`] on an async runtime: a PKCS#11 module's worker answers the task
    /// itself; an SKF library's call waits on a blocking thread.
    pub async fn certificates_async(
        &self,
        token: Option<&TokenId>,
    ) -> Result<Vec<CertificateInfo>, TokenError> {
        match (self, token) {
            (Backend::Pkcs11(m), None) => Ok(convert(m.certificates_async(None).await?)),
            (Backend::Pkcs11(m), Some(TokenId::Pkcs11(t))) => {
                Ok(convert(m.certificates_async(Some(t)).await?))
            }
            (Backend::Skf(_), _) => {
                let (this, token) = (self.clone(), token.cloned());
                blocking(move || this.certificates(token.as_ref())).await
            }
            (_, Some(other)) => Err(TokenError::TokenNotFound(other.clone())),
        }
    }

    /// [`Self::login_state`] on an async runtime.
    pub async fn login_state_async(
        &self,
        certificate: &CertificateId,
    ) -> Result<LoginState, TokenError> {
        match (self, certificate) {
            (Backend::Pkcs11(m), CertificateId::Pkcs11(c)) => {
                Ok(m.login_state_async(c.token_id()).await?)
            }
            _ => {
                let (this, certificate) = (self.clone(), certificate.clone());
                blocking(move || this.login_state(&certificate)).await
            }
        }
    }

    /// [`Self::sign`] on an async runtime: no thread of ours waits on a PKCS#11 module's
    /// worker. The future owns what it needs, so it can be left to end in the background.
    pub fn sign_async(
        &self,
        req: SignRequest,
        credential: Credential,
        progress: Option<mpsc::Sender<Progress>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> SignFuture {
        match (self, &req.certificate) {
            (Backend::Pkcs11(m), CertificateId::Pkcs11(c)) => {
                let Some(algorithm) = req.algorithm.pkcs11() else {
                    let e = TokenError::MechanismNotSupported {
                        algorithm: req.algorithm.name(),
                        key: "PKCS#11".into(),
                    };
                    return Box::pin(std::future::ready(Err(e.into())));
                };
                let job = pkcs11_shim::SignRequest {
                    certificate: c.clone(),
                    algorithm,
                    inputs: req.inputs,
                    logout_after: req.logout_after,
                };
                let call = m.sign_async(job, credential.into_pkcs11(), progress, cancel);
                Box::pin(async move { call.await.map_err(SignFailure::from) })
            }
            _ => {
                let this = self.clone();
                Box::pin(async move {
                    match tokio::task::spawn_blocking(move || {
                        this.sign(req, credential, progress, cancel)
                    })
                    .await
                    {
                        Ok(r) => r,
                        Err(e) => Err(TokenError::NotWorking(Box::new(e)).into()),
                    }
                })
            }
        }
    }

    /// A card event (inserted, removed): a PKCS#11 module probes its tokens again before the
    /// next signature. SKF libraries keep no probe cache.
    pub fn token_event(&self) {
        if let Backend::Pkcs11(m) = self {
            m.token_event();
        }
    }

    /// Ends a cached login on the token (PKCS#11 C_Logout). SKF keys are logged out after each
    /// request already: nothing to do.
    pub fn logout(&self, token: &TokenId) -> Result<(), TokenError> {
        match (self, token) {
            (Backend::Pkcs11(m), TokenId::Pkcs11(t)) => Ok(m.logout(t)?),
            _ => Ok(()),
        }
    }
}

/// A signature job's answer, owned by the caller (and left to end in the background after a
/// cancel).
pub type SignFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Vec<u8>>, SignFailure>> + Send + 'static>,
>;

/// Runs a library call that blocks on a thread of tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TokenError> + Send + 'static,
) -> Result<T, TokenError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(TokenError::NotWorking(Box::new(e))))
}

fn convert<T, U: From<T>>(v: Vec<T>) -> Vec<U> {
    v.into_iter().map(U::from).collect()
}

/// The SKF signing job: the PIN (if given), the signatures, the logout, as one sequence.
fn skf_sign(
    l: &skf_shim::Library,
    c: &skf_shim::CertificateId,
    req: SignRequest,
    credential: Credential,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<Vec<Vec<u8>>, SignFailure> {
    let algorithm = match req.algorithm {
        SignAlgorithm::Sm2(encoding) => skf_shim::SignAlgorithm::Sm2 {
            user_id: req
                .sm2_user_id
                .clone()
                .unwrap_or_else(|| skf_shim::DEFAULT_SM2_USER_ID.to_owned()),
            encoding: match encoding {
                EcdsaEncoding::Der => skf_shim::Sm2Encoding::Der,
                EcdsaEncoding::P1363 => skf_shim::Sm2Encoding::Raw,
            },
        },
        SignAlgorithm::RsaPkcs1v15(h) => skf_shim::SignAlgorithm::RsaPkcs1(match h {
            HashAlg::Sha256 => skf_shim::HashAlg::Sha256,
            HashAlg::Sha384 => skf_shim::HashAlg::Sha384,
            HashAlg::Sha512 => skf_shim::HashAlg::Sha512,
        }),
        other => {
            return Err(TokenError::MechanismNotSupported {
                algorithm: other.name(),
                key: "SKF".into(),
            }
            .into())
        }
    };
    let app = c.application();
    match credential {
        Credential::None => {}
        Credential::Pin(mut pin) => {
            l.verify_pin(app, skf_shim::SecretPin::from(std::mem::take(&mut *pin)))?;
        }
        Credential::PinPad => {
            return Err(TokenError::InvalidInput("an SKF key has no PIN pad".into()).into())
        }
    }
    let job = skf_shim::SignRequest {
        certificate: c.clone(),
        algorithm,
        inputs: req
            .inputs
            .into_iter()
            .map(|i| match i {
                SignInput::Data(m) => skf_shim::SignInput::Message(m),
                SignInput::Digest(d) => skf_shim::SignInput::Digest(d),
            })
            .collect(),
        // The verification is never kept: SKF has no way to ask whether it still holds.
        logout_after: true,
    };
    l.sign(job, cancel).map_err(|f| {
        let error = match f.error {
            skf_shim::Error::NotLoggedIn(app) => TokenError::LoginRequired {
                kind: LoginKind::User,
                pin: l.pin_status(&app).map(pin_status).unwrap_or_default(),
                pin_pad: false,
            },
            other => other.into(),
        };
        SignFailure {
            error,
            completed: f.completed,
        }
    })
}

pub(crate) fn pin_status(st: skf_shim::PinStatus) -> PinStatus {
    PinStatus {
        initialized: true,
        count_low: st.count_low,
        final_try: st.final_try,
        locked: st.locked,
    }
}

/// e = SM3(Z ‖ M) for an SM2 certificate's key and `user_id` (GM/T 0003.2, GM/T 0009): what an
/// SM2 key signs for the message `message`.
pub fn sm2_e(
    certificate_der: &[u8],
    user_id: &str,
    message: &[u8],
) -> Result<[u8; 32], TokenError> {
    use der::Decode as _;
    let cert = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|_| TokenError::InvalidInput("the certificate does not parse".into()))?;
    let point = cert
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| TokenError::InvalidInput("the certificate's key does not parse".into()))?
        .to_vec();
    Ok(skf_shim::sm2_e(&point, user_id, message)?)
}

// ---- ids ----

/// A token's stable id: `tok-…` (PKCS#11) or `skf-…` (SKF).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenId {
    Pkcs11(pkcs11_shim::TokenId),
    Skf(skf_shim::TokenId),
}

impl TokenId {
    pub fn as_str(&self) -> &str {
        match self {
            TokenId::Pkcs11(t) => t.as_str(),
            TokenId::Skf(t) => t.as_str(),
        }
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is no id of this agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed id: {0:?}")]
pub struct ParseIdError(pub String);

impl FromStr for TokenId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError(s.to_owned());
        if s.starts_with("skf-") {
            s.parse().map(TokenId::Skf).map_err(|_| bad())
        } else {
            s.parse().map(TokenId::Pkcs11).map_err(|_| bad())
        }
    }
}

/// A certificate's stable id: `tok-…/<CKA_ID>` (PKCS#11) or `skf-…/<application>/<container>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertificateId {
    Pkcs11(pkcs11_shim::CertificateId),
    Skf(skf_shim::CertificateId),
}

impl CertificateId {
    /// Whether this id names the listed certificate: its id, or (PKCS#11, a key with several
    /// certificates) its exact id, which names it however it is listed.
    pub fn names(&self, listed: &CertificateInfo) -> bool {
        match (self, &listed.id) {
            (CertificateId::Pkcs11(asked), CertificateId::Pkcs11(id)) => {
                asked.names(id, &listed.der)
            }
            (asked, id) => asked == id,
        }
    }

    /// The token holding the key.
    pub fn token_id(&self) -> TokenId {
        match self {
            CertificateId::Pkcs11(c) => TokenId::Pkcs11(c.token_id().clone()),
            CertificateId::Skf(c) => TokenId::Skf(c.token_id().clone()),
        }
    }
}

impl fmt::Display for CertificateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertificateId::Pkcs11(c) => c.fmt(f),
            CertificateId::Skf(c) => c.fmt(f),
        }
    }
}

impl FromStr for CertificateId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError(s.to_owned());
        if s.starts_with("skf-") {
            s.parse().map(CertificateId::Skf).map_err(|_| bad())
        } else {
            s.parse().map(CertificateId::Pkcs11).map_err(|_| bad())
        }
    }
}

// ---- descriptions ----

/// One present token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: TokenId,
    /// The slot's description (PKCS#11: the reader, for smartcards; SKF: the device name).
    pub slot_description: String,
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    /// The PIN is entered on a PIN pad, not given to us.
    pub pin_pad: bool,
    pub pin: PinStatus,
    /// This process is logged in to the token (the PIN cache is warm).
    pub logged_in: bool,
}

impl From<pkcs11_shim::TokenInfo> for TokenInfo {
    fn from(t: pkcs11_shim::TokenInfo) -> Self {
        TokenInfo {
            id: TokenId::Pkcs11(t.id),
            slot_description: t.slot_description,
            label: t.label,
            manufacturer: t.manufacturer,
            model: t.model,
            serial: t.serial,
            pin_pad: t.pin_pad,
            pin: t.pin,
            logged_in: t.logged_in,
        }
    }
}

/// The key pair's algorithm, from the certificate's SubjectPublicKeyInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    Rsa {
        bits: u32,
    },
    EcP256,
    EcP384,
    EcP521,
    Ed25519,
    /// SM2 (GM/T 0003) on its 256-bit curve.
    Sm2,
}

impl KeyAlgorithm {
    /// The protocol's name: "RSA-2048", "EC-P256", "Ed25519", "SM2".
    pub fn wire_name(self) -> String {
        match self {
            KeyAlgorithm::Rsa { bits } => format!("RSA-{bits}"),
            KeyAlgorithm::EcP256 => "EC-P256".to_owned(),
            KeyAlgorithm::EcP384 => "EC-P384".to_owned(),
            KeyAlgorithm::EcP521 => "EC-P521".to_owned(),
            KeyAlgorithm::Ed25519 => "Ed25519".to_owned(),
            KeyAlgorithm::Sm2 => "SM2".to_owned(),
        }
    }
}

impl From<pkcs11_shim::KeyAlgorithm> for KeyAlgorithm {
    fn from(k: pkcs11_shim::KeyAlgorithm) -> Self {
        use pkcs11_shim::KeyAlgorithm as K;
        match k {
            K::Rsa { bits } => KeyAlgorithm::Rsa { bits },
            K::EcP256 => KeyAlgorithm::EcP256,
            K::EcP384 => KeyAlgorithm::EcP384,
            K::EcP521 => KeyAlgorithm::EcP521,
            K::Ed25519 => KeyAlgorithm::Ed25519,
        }
    }
}

/// A certificate whose private key is on a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub id: CertificateId,
    pub token_id: TokenId,
    /// PKCS#11: the certificate's CKA_LABEL; SKF: the container's name.
    pub label: String,
    pub der: Vec<u8>,
    /// Subject, RFC 4514.
    pub subject: String,
    /// Issuer, RFC 4514.
    pub issuer: String,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub key_algorithm: KeyAlgorithm,
    /// Key usage bits (empty when the extension is absent).
    pub key_usage: Vec<KeyUsage>,
    /// "clientAuth", "serverAuth", … or the dotted OID.
    pub extended_key_usage: Vec<String>,
    /// A PIN for every signature (PKCS#11 CKA_ALWAYS_AUTHENTICATE; never on SKF).
    pub always_authenticate: bool,
    /// The subject's CN, else the full subject.
    pub holder: String,
}

impl From<pkcs11_shim::CertificateInfo> for CertificateInfo {
    fn from(c: pkcs11_shim::CertificateInfo) -> Self {
        CertificateInfo {
            id: CertificateId::Pkcs11(c.id),
            token_id: TokenId::Pkcs11(c.token_id),
            label: c.label,
            der: c.der,
            subject: c.subject,
            issuer: c.issuer,
            serial_hex: c.serial_hex,
            not_before: c.not_before,
            not_after: c.not_after,
            key_algorithm: c.key_algorithm.into(),
            key_usage: c.key_usage,
            extended_key_usage: c.extended_key_usage,
            always_authenticate: c.always_authenticate,
            holder: c.holder,
        }
    }
}

impl From<skf_shim::CertificateInfo> for CertificateInfo {
    fn from(c: skf_shim::CertificateInfo) -> Self {
        use skf_shim::KeyUsage as S;
        let key_usage = c
            .key_usage
            .iter()
            .map(|k| match k {
                S::DigitalSignature => KeyUsage::DigitalSignature,
                S::NonRepudiation => KeyUsage::NonRepudiation,
                S::KeyEncipherment => KeyUsage::KeyEncipherment,
                S::DataEncipherment => KeyUsage::DataEncipherment,
                S::KeyAgreement => KeyUsage::KeyAgreement,
                S::KeyCertSign => KeyUsage::KeyCertSign,
                S::CrlSign => KeyUsage::CrlSign,
                S::EncipherOnly => KeyUsage::EncipherOnly,
                S::DecipherOnly => KeyUsage::DecipherOnly,
            })
            .collect();
        CertificateInfo {
            token_id: TokenId::Skf(c.id.token_id().clone()),
            label: c.id.container(),
            id: CertificateId::Skf(c.id),
            der: c.der,
            subject: c.subject,
            issuer: c.issuer,
            serial_hex: c.serial_hex,
            not_before: c.not_before,
            not_after: c.not_after,
            key_algorithm: match c.key_algorithm {
                skf_shim::KeyAlgorithm::Sm2 => KeyAlgorithm::Sm2,
                skf_shim::KeyAlgorithm::Rsa { bits } => KeyAlgorithm::Rsa { bits },
            },
            key_usage,
            extended_key_usage: c.extended_key_usage,
            always_authenticate: false,
            holder: c.holder,
        }
    }
}

// ---- signing jobs ----

/// A signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignAlgorithm {
    RsaPkcs1v15(HashAlg),
    RsaPss(HashAlg),
    Ecdsa(HashAlg, EcdsaEncoding),
    Ed25519,
    /// SM2 with SM3 over e = SM3(Z ‖ M); DER `SEQUENCE { r, s }` or r ‖ s (`P1363`).
    Sm2(EcdsaEncoding),
}

impl SignAlgorithm {
    /// The PKCS#11 shim's algorithm, when it has it.
    fn pkcs11(self) -> Option<pkcs11_shim::SignAlgorithm> {
        use pkcs11_shim::SignAlgorithm as P;
        Some(match self {
            SignAlgorithm::RsaPkcs1v15(h) => P::RsaPkcs1v15(h),
            SignAlgorithm::RsaPss(h) => P::RsaPss(h),
            SignAlgorithm::Ecdsa(h, e) => P::Ecdsa(h, e),
            SignAlgorithm::Ed25519 => P::Ed25519,
            SignAlgorithm::Sm2(_) => return None,
        })
    }

    /// A short name for errors and logs, e.g. "RSA-PSS-SHA256" or "SM2".
    pub fn name(self) -> String {
        match self.pkcs11() {
            Some(p) => p.name(),
            None => "SM2".to_owned(),
        }
    }
}

/// A signing job: one certificate's key, one algorithm, N inputs, one login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignRequest {
    pub certificate: CertificateId,
    pub algorithm: SignAlgorithm,
    /// SM2: a `Digest` is e = SM3(Z ‖ M) itself; `Data` is hashed with Z from the key and
    /// `sm2_user_id`.
    pub inputs: Vec<SignInput>,
    /// Log out when the request ends (success or not).
    pub logout_after: bool,
    /// SM2's user ID for `Data` inputs; `None`: `1234567812345678`.
    pub sm2_user_id: Option<String>,
}

/// What a job may log in with: the user's one answer to one dialog (see
/// [`pkcs11_shim::Credential`] for how far one goes). The PIN is wiped on drop.
#[derive(Default)]
pub enum Credential {
    #[default]
    None,
    Pin(Zeroizing<String>),
    PinPad,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Credential::None => "None",
            Credential::Pin(_) => "Pin(***)",
            Credential::PinPad => "PinPad",
        })
    }
}

impl Credential {
    pub fn into_pkcs11(self) -> pkcs11_shim::Credential {
        match self {
            Credential::None => pkcs11_shim::Credential::None,
            Credential::Pin(mut pin) => pkcs11_shim::Credential::Pin(pkcs11_shim::SecretPin::from(
                std::mem::take(&mut *pin),
            )),
            Credential::PinPad => pkcs11_shim::Credential::PinPad,
        }
    }
}

// ---- errors ----

/// What a token back end can answer, shaped so the service can act on it. The first variants
/// mean the same for both back ends; a failure only one back end has keeps its shim's error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("incorrect PIN (count low: {count_low}, final try: {final_try})")]
    PinIncorrect { count_low: bool, final_try: bool },
    #[error("the user PIN is locked")]
    PinLocked,
    #[error("the user PIN of the token is not initialised")]
    PinNotInitialized,
    /// Ask the user, then send the rest as a new job.
    #[error("the token asks for a {kind:?} login")]
    LoginRequired {
        kind: LoginKind,
        pin: PinStatus,
        pin_pad: bool,
    },
    #[error("the PIN entry was cancelled on the reader (or it timed out)")]
    CancelledOnReader,
    #[error("cancelled by the user")]
    UserCancelled,
    #[error("cancelled")]
    Cancelled,
    #[error("the token is not present")]
    TokenNotPresent,
    #[error("token {0} not found")]
    TokenNotFound(TokenId),
    #[error("certificate {0} not found")]
    CertificateNotFound(CertificateId),
    #[error("the private key of the certificate was not found on the token")]
    KeyNotFound,
    #[error("mechanism not supported: {algorithm} with a {key} key")]
    MechanismNotSupported { algorithm: String, key: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The library did not answer within the call timeout.
    #[error("the token's library did not answer within {} s", waited.as_secs_f64())]
    Busy { waited: Duration },
    /// The library's module host failed (crashed, hung past its deadline and was stopped, or
    /// is being restarted: `module_isolation`).
    #[error("the token's module host failed: {0}")]
    ModuleHost(String),
    /// The library's worker is gone, or the library did not load.
    #[error("the token's library is not working")]
    NotWorking(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Any other PKCS#11 failure (names the `C_` function).
    #[error(transparent)]
    Pkcs11(pkcs11_shim::Error),
    /// Any other SKF failure (names the `SKF_` function and the `SAR_` code).
    #[error(transparent)]
    Skf(skf_shim::Error),
}

impl TokenError {
    /// True when the error means the token went away.
    pub fn is_removal(&self) -> bool {
        matches!(self, TokenError::TokenNotPresent)
    }

    /// A device-level failure of a call: the function that failed, for the page.
    pub fn failed_function(&self) -> Option<&'static str> {
        match self {
            TokenError::Pkcs11(pkcs11_shim::Error::Pkcs11 { function, .. })
            | TokenError::Skf(skf_shim::Error::Skf { function, .. }) => Some(function),
            _ => None,
        }
    }
}

impl From<pkcs11_shim::Error> for TokenError {
    fn from(e: pkcs11_shim::Error) -> Self {
        use pkcs11_shim::Error as E;
        match e {
            E::PinIncorrect {
                count_low,
                final_try,
            } => TokenError::PinIncorrect {
                count_low,
                final_try,
            },
            E::PinLocked => TokenError::PinLocked,
            E::PinNotInitialized => TokenError::PinNotInitialized,
            E::LoginRequired { kind, pin, pin_pad } => {
                TokenError::LoginRequired { kind, pin, pin_pad }
            }
            E::CancelledOnReader => TokenError::CancelledOnReader,
            E::UserCancelled => TokenError::UserCancelled,
            E::Cancelled => TokenError::Cancelled,
            E::TokenNotPresent => TokenError::TokenNotPresent,
            E::TokenNotFound(t) => TokenError::TokenNotFound(TokenId::Pkcs11(t)),
            E::CertificateNotFound(c) => TokenError::CertificateNotFound(CertificateId::Pkcs11(c)),
            E::KeyNotFound => TokenError::KeyNotFound,
            E::MechanismNotSupported { algorithm, key } => {
                TokenError::MechanismNotSupported { algorithm, key }
            }
            E::InvalidInput(m) => TokenError::InvalidInput(m),
            E::Busy { waited } => TokenError::Busy { waited },
            E::ModuleHost(how) => TokenError::ModuleHost(how),
            e @ (E::ModuleLoad { .. } | E::WorkerGone) => TokenError::NotWorking(Box::new(e)),
            other => TokenError::Pkcs11(other),
        }
    }
}

impl From<skf_shim::Error> for TokenError {
    fn from(e: skf_shim::Error) -> Self {
        use skf_shim::Error as E;
        match e {
            E::PinIncorrect {
                count_low,
                final_try,
                ..
            } => TokenError::PinIncorrect {
                count_low,
                final_try,
            },
            E::PinLocked => TokenError::PinLocked,
            E::NotLoggedIn(_) => TokenError::LoginRequired {
                kind: LoginKind::User,
                pin: PinStatus::default(),
                pin_pad: false,
            },
            E::Cancelled => TokenError::Cancelled,
            E::TokenNotPresent => TokenError::TokenNotPresent,
            E::TokenNotFound(t) => TokenError::TokenNotFound(TokenId::Skf(t)),
            E::CertificateNotFound(c) => TokenError::CertificateNotFound(CertificateId::Skf(c)),
            E::ApplicationNotFound(_) | E::ContainerNotFound(_) => TokenError::KeyNotFound,
            E::MechanismNotSupported { algorithm, key } => {
                TokenError::MechanismNotSupported { algorithm, key }
            }
            E::InvalidInput(m) => TokenError::InvalidInput(m),
            E::Busy { waited } => TokenError::Busy { waited },
            E::ModuleHost(how) => TokenError::ModuleHost(how),
            e @ (E::LibraryLoad { .. }
            | E::FunctionsMissing { .. }
            | E::HostedLoad(_)
            | E::WorkerGone) => TokenError::NotWorking(Box::new(e)),
            other => TokenError::Skf(other),
        }
    }
}

/// A failed job: the error, and the signatures finished before it (in input order).
#[derive(Debug, thiserror::Error)]
#[error("{error} (after {} completed signatures)", completed.len())]
pub struct SignFailure {
    #[source]
    pub error: TokenError,
    pub completed: Vec<Vec<u8>>,
}

impl From<TokenError> for SignFailure {
    fn from(error: TokenError) -> Self {
        SignFailure {
            error,
            completed: Vec::new(),
        }
    }
}

impl From<skf_shim::Error> for SignFailure {
    fn from(e: skf_shim::Error) -> Self {
        TokenError::from(e).into()
    }
}

impl From<pkcs11_shim::SignFailure> for SignFailure {
    fn from(f: pkcs11_shim::SignFailure) -> Self {
        SignFailure {
            error: f.error.into(),
            completed: f.completed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_both_back_ends_parse_back_to_their_kind() {
        let p = pkcs11_shim::TokenId::derive(Path::new("/m.so"), "1", "", "");
        let s = skf_shim::TokenId::derive(Path::new("/l.so"), "1", "", "");
        assert_eq!(p.to_string().parse(), Ok(TokenId::Pkcs11(p.clone())));
        assert_eq!(s.to_string().parse(), Ok(TokenId::Skf(s.clone())));
        let sc = skf_shim::CertificateId::new(skf_shim::ApplicationId::new(s, "APP"), "SM2-SIGN");
        let parsed: CertificateId = sc.to_string().parse().expect("parse");
        assert_eq!(parsed, CertificateId::Skf(sc));
        assert!("skf-00/zz".parse::<CertificateId>().is_err());
        assert!("nope".parse::<TokenId>().is_err());
    }

    #[test]
    fn a_wrong_skf_pin_reads_like_a_pkcs11_one() {
        let e: TokenError = skf_shim::Error::PinIncorrect {
            retries_left: 1,
            count_low: true,
            final_try: true,
        }
        .into();
        assert!(matches!(
            e,
            TokenError::PinIncorrect {
                count_low: true,
                final_try: true
            }
        ));
    }
}
