//! The `result` of every method, and the two events.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::encoding::{Base64Bytes, Timestamp};
use super::params::{
    AuthAlgorithm, DigestAlgorithm, KeyAlgorithm, KeyUsage, SignFormat, SignatureAlgorithm,
};

/// Capabilities a v1 agent announces in `hello`.
pub const CAPABILITIES: [&str; 7] = [
    "certificates",
    "sign",
    "sign.batch",
    "cms",
    "authenticate",
    "keys.generate",
    "events",
];

/// `hello` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HelloResult {
    /// `"keyport"`.
    pub agent: String,
    /// The agent's version, e.g. `"0.1.0"`.
    pub version: String,
    /// `1`.
    pub protocol: u32,
    /// The Origin header of this connection.
    pub origin: String,
    /// Whether the origin may use the other methods without asking.
    pub origin_approved: bool,
    /// See [`CAPABILITIES`].
    pub capabilities: Vec<String>,
}

impl HelloResult {
    /// Protocol version of this crate.
    pub const PROTOCOL: u32 = 1;

    /// A result for `agent`/`version`, announcing every v1 capability.
    pub fn new(
        agent: impl Into<String>,
        version: impl Into<String>,
        origin: &crate::Origin,
        approved: bool,
    ) -> Self {
        HelloResult {
            agent: agent.into(),
            version: version.into(),
            protocol: Self::PROTOCOL,
            origin: origin.as_str().to_owned(),
            origin_approved: approved,
            capabilities: CAPABILITIES.iter().map(|c| (*c).to_owned()).collect(),
        }
    }
}

/// `origin.requestAccess` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAccessResult {
    /// Always true (a refusal is an error).
    pub approved: bool,
    /// True for "allow always".
    pub remembered: bool,
}

/// `tokens.list` result, and the params of the `tokens.changed` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokensListResult {
    /// Present tokens.
    pub tokens: Vec<TokenEntry>,
}

/// One token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenEntry {
    /// Stable across reinsertion (module + serial).
    pub id: String,
    /// CKA token label.
    pub label: String,
    /// Token manufacturer.
    pub manufacturer: String,
    /// Token model.
    pub model: String,
    /// Token serial number.
    pub serial: String,
    /// PC/SC reader name, null for a soft token.
    pub reader: Option<String>,
    /// Protected authentication path.
    pub pin_pad: bool,
    /// What the token says about its user PIN.
    pub pin: PinState,
}

/// A token's user-PIN state (never the PIN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PinState {
    /// CKF_USER_PIN_INITIALIZED.
    pub initialized: bool,
    /// CKF_USER_PIN_COUNT_LOW.
    pub count_low: bool,
    /// CKF_USER_PIN_FINAL_TRY.
    pub final_try: bool,
    /// CKF_USER_PIN_LOCKED.
    pub locked: bool,
}

/// `certificates.list` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificatesListResult {
    /// Certificates whose private key is on a token.
    pub certificates: Vec<CertificateEntry>,
}

/// One certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateEntry {
    /// Used by `sign` and `authenticate`.
    pub id: String,
    /// The token holding the key.
    pub token_id: String,
    /// DER.
    pub certificate: Base64Bytes,
    /// RFC 4514.
    pub subject: String,
    /// RFC 4514.
    pub issuer: String,
    /// Hex.
    pub serial_number: String,
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
    /// Key type and size.
    pub key_algorithm: KeyAlgorithm,
    /// Key usage bits set (empty: no extension).
    pub key_usage: Vec<KeyUsage>,
    /// Extended key usages: short names (`clientAuth`) or dotted OIDs.
    pub extended_key_usage: Vec<String>,
}

/// `sign` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignResult {
    /// The signature, or the DER CMS SignedData for `format: "cms"`.
    pub signature: Base64Bytes,
    /// As asked.
    pub format: SignFormat,
    /// As used.
    pub signature_algorithm: SignatureAlgorithm,
    /// As used.
    pub digest_algorithm: DigestAlgorithm,
    /// The signer's DER certificate.
    pub certificate: Base64Bytes,
}

/// `sign.batch` result: one signature per item, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignBatchResult {
    /// In item order.
    pub results: Vec<BatchSignature>,
}

/// One signature of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BatchSignature {
    /// Raw signature or CMS, as the batch asked.
    pub signature: Base64Bytes,
}

/// `authenticate` result: a Web eID authentication token, format `web-eid:1.0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthenticateResult {
    /// The login certificate, DER.
    pub unverified_certificate: Base64Bytes,
    /// JWA name of what was signed with.
    pub algorithm: AuthAlgorithm,
    /// Over H(H(origin) ‖ H(challenge)); ECDSA in r ‖ s form.
    pub signature: Base64Bytes,
    /// `"web-eid:1.0"`.
    pub format: String,
    /// `"urn:keyport:<version>"`.
    pub app_version: String,
}

impl AuthenticateResult {
    /// The token format this crate speaks.
    pub const FORMAT: &'static str = "web-eid:1.0";

    /// A `web-eid:1.0` token from agent version `version`.
    pub fn new(
        certificate: Vec<u8>,
        algorithm: AuthAlgorithm,
        signature: Vec<u8>,
        version: &str,
    ) -> Self {
        AuthenticateResult {
            unverified_certificate: Base64Bytes(certificate),
            algorithm,
            signature: Base64Bytes(signature),
            format: Self::FORMAT.to_owned(),
            app_version: format!("urn:keyport:{version}"),
        }
    }
}

/// `keys.generate` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeysGenerateResult {
    /// The new key.
    pub key_id: String,
    /// PKCS#10 DER, signed by the new key.
    pub csr: Base64Bytes,
}

/// `certificates.import` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificatesImportResult {
    /// Usable with `sign`.
    pub certificate_id: String,
}

/// `cancel` result: whether a pending request of this connection had that id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CancelResult {
    /// False when nothing was pending under that id.
    pub cancelled: bool,
}

/// An agent → page notification.
pub trait Event: Serialize {
    /// The JSON-RPC method name.
    const METHOD: &'static str;
}

/// `tokens.changed` params (sent to approved origins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokensChanged {
    /// The tokens present now.
    pub tokens: Vec<TokenEntry>,
}

impl Event for TokensChanged {
    const METHOD: &'static str = "tokens.changed";
}

/// `sign.progress` params (on the connection running the batch, ≤ 10 a second).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignProgress {
    /// The `id` of the `sign.batch` request.
    pub request_id: Value,
    /// Signatures made so far.
    pub done: u32,
    /// Items in the batch.
    pub total: u32,
}

impl Event for SignProgress {
    const METHOD: &'static str = "sign.progress";
}
