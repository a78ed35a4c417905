//! The params of every request method. Every struct refuses unknown fields; cross-field rules
//! (exactly one of `digest`/`data`, `hash` only with data, batch size) are checked while
//! deserializing, so a value of these types is always valid.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::encoding::{Base64Bytes, Challenge, DialogText, Summary, Timestamp, Title};

/// Most items a `sign.batch` may carry.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// `hello` params.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HelloParams {
    /// What the page says it runs (informational only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

/// `hello.client`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientInfo {
    /// Client library name.
    pub name: DialogText<100, true>,
    /// Client library version.
    pub version: DialogText<100, true>,
}

/// Params of methods that take none (`origin.requestAccess`, `tokens.list`): `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyParams {}

/// `certificates.list` params.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificatesListParams {
    /// Every member optional; absent means "all".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<CertificateFilter>,
}

/// `certificates.list.filter`. A certificate is listed when it matches every member given.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateFilter {
    /// The certificate has at least one of these key usages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_usage: Option<Vec<KeyUsage>>,
    /// Substring of the issuer's RFC 4514 string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Substring of the subject's RFC 4514 string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Valid at this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_at: Option<ValidAt>,
    /// The key is one of these algorithms or families.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_algorithm: Option<Vec<KeyAlgorithmFilter>>,
    /// On this token only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

/// `filter.validAt`: `"now"` or an RFC 3339 time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ValidAt {
    /// The agent's clock at the time of the request.
    Now(NowTag),
    /// A given time.
    At(Timestamp),
}

/// The literal string `"now"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NowTag {
    /// `"now"`.
    #[serde(rename = "now")]
    Now,
}

/// RFC 5280 key usage names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub enum KeyUsage {
    DigitalSignature,
    NonRepudiation,
    KeyEncipherment,
    DataEncipherment,
    KeyAgreement,
    KeyCertSign,
    #[serde(rename = "cRLSign")]
    CrlSign,
    EncipherOnly,
    DecipherOnly,
}

/// A certificate's key algorithm as `certificates.list` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum KeyAlgorithm {
    #[serde(rename = "RSA-2048")]
    Rsa2048,
    #[serde(rename = "RSA-3072")]
    Rsa3072,
    #[serde(rename = "RSA-4096")]
    Rsa4096,
    #[serde(rename = "EC-P256")]
    EcP256,
    #[serde(rename = "EC-P384")]
    EcP384,
    #[serde(rename = "EC-P521")]
    EcP521,
    Ed25519,
    /// SM2 (GM/T 0003), on Chinese USB keys.
    #[serde(rename = "SM2")]
    Sm2,
}

/// A `keyAlgorithm` filter entry: an exact algorithm or a family (`RSA`, `EC`; `Ed25519` is both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyAlgorithmFilter {
    /// `RSA` or `EC`.
    Family(KeyFamily),
    /// An exact algorithm, e.g. `RSA-3072` or `Ed25519`.
    Exact(KeyAlgorithm),
}

/// Key families a filter may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum KeyFamily {
    #[serde(rename = "RSA")]
    Rsa,
    #[serde(rename = "EC")]
    Ec,
}

impl KeyAlgorithmFilter {
    /// Whether a key of `algorithm` matches this entry.
    pub fn matches(self, algorithm: KeyAlgorithm) -> bool {
        use KeyAlgorithm::*;
        match self {
            KeyAlgorithmFilter::Exact(a) => a == algorithm,
            KeyAlgorithmFilter::Family(KeyFamily::Rsa) => {
                matches!(algorithm, Rsa2048 | Rsa3072 | Rsa4096)
            }
            KeyAlgorithmFilter::Family(KeyFamily::Ec) => {
                matches!(algorithm, EcP256 | EcP384 | EcP521)
            }
        }
    }
}

/// Digest algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum DigestAlgorithm {
    #[default]
    #[serde(rename = "SHA-256")]
    Sha256,
    #[serde(rename = "SHA-384")]
    Sha384,
    #[serde(rename = "SHA-512")]
    Sha512,
    /// SM3 (GM/T 0004). For a raw SM2 signature a `digest` with it is e = SM3(Z ‖ M).
    #[serde(rename = "SM3")]
    Sm3,
}

impl DigestAlgorithm {
    /// Every digest algorithm.
    pub const ALL: [DigestAlgorithm; 4] = [
        DigestAlgorithm::Sha256,
        DigestAlgorithm::Sha384,
        DigestAlgorithm::Sha512,
        DigestAlgorithm::Sm3,
    ];

    /// The protocol's name (`SHA-256`), as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "SHA-256",
            DigestAlgorithm::Sha384 => "SHA-384",
            DigestAlgorithm::Sha512 => "SHA-512",
            DigestAlgorithm::Sm3 => "SM3",
        }
    }

    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 | DigestAlgorithm::Sm3 => 32,
            DigestAlgorithm::Sha384 => 48,
            DigestAlgorithm::Sha512 => 64,
        }
    }
}

/// Signature algorithms of `sign`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum SignatureAlgorithm {
    #[serde(rename = "RSASSA-PKCS1-v1_5")]
    RsaPkcs1v15,
    #[serde(rename = "RSA-PSS")]
    RsaPss,
    #[serde(rename = "ECDSA")]
    Ecdsa,
    Ed25519,
    /// SM2 with SM3 (SM3withSM2, GM/T 0003 and 0009).
    #[serde(rename = "SM2")]
    Sm2,
}

impl SignatureAlgorithm {
    /// Every signature algorithm.
    pub const ALL: [SignatureAlgorithm; 5] = [
        SignatureAlgorithm::RsaPkcs1v15,
        SignatureAlgorithm::RsaPss,
        SignatureAlgorithm::Ecdsa,
        SignatureAlgorithm::Ed25519,
        SignatureAlgorithm::Sm2,
    ];

    /// The protocol's name (`RSA-PSS`), as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureAlgorithm::RsaPkcs1v15 => "RSASSA-PKCS1-v1_5",
            SignatureAlgorithm::RsaPss => "RSA-PSS",
            SignatureAlgorithm::Ecdsa => "ECDSA",
            SignatureAlgorithm::Ed25519 => "Ed25519",
            SignatureAlgorithm::Sm2 => "SM2",
        }
    }
}

/// `sign.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignFormat {
    /// The bare signature.
    #[default]
    Raw,
    /// A detached DER CMS SignedData.
    Cms,
}

/// `sign.ecdsaEncoding` (raw ECDSA only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EcdsaEncoding {
    /// ASN.1 `ECDSA-Sig-Value`.
    #[default]
    Der,
    /// IEEE P1363 `r ‖ s`.
    P1363,
}

/// A digest the page computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    try_from = "RawDigest",
    into = "RawDigest"
)]
pub struct Digest {
    /// Which hash made it.
    pub algorithm: DigestAlgorithm,
    /// The digest; its length matches `algorithm`.
    pub value: Base64Bytes,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDigest {
    algorithm: DigestAlgorithm,
    value: Base64Bytes,
}

impl TryFrom<RawDigest> for Digest {
    type Error = String;
    fn try_from(raw: RawDigest) -> Result<Self, String> {
        let want = raw.algorithm.output_len();
        if raw.value.0.len() != want {
            return Err(format!(
                "a {} digest is {want} bytes, got {}",
                raw.algorithm.as_str(),
                raw.value.0.len()
            ));
        }
        Ok(Digest {
            algorithm: raw.algorithm,
            value: raw.value,
        })
    }
}

impl From<Digest> for RawDigest {
    fn from(d: Digest) -> Self {
        RawDigest {
            algorithm: d.algorithm,
            value: d.value,
        }
    }
}

/// What is signed: a digest the page made, or data the agent hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignInput {
    /// `"digest": {...}`.
    Digest(Digest),
    /// `"data": "<b64>"`.
    Data(Base64Bytes),
}

impl SignInput {
    fn from_pair(digest: Option<Digest>, data: Option<Base64Bytes>) -> Result<Self, String> {
        match (digest, data) {
            (Some(d), None) => Ok(SignInput::Digest(d)),
            (None, Some(d)) => Ok(SignInput::Data(d)),
            (Some(_), Some(_)) => Err("give either digest or data, not both".into()),
            (None, None) => Err("one of digest or data is required".into()),
        }
    }

    fn into_pair(self) -> (Option<Digest>, Option<Base64Bytes>) {
        match self {
            SignInput::Digest(d) => (Some(d), None),
            SignInput::Data(d) => (None, Some(d)),
        }
    }

    /// True for `data`.
    pub fn is_data(&self) -> bool {
        matches!(self, SignInput::Data(_))
    }
}

/// `sign.display`: what the consent dialog shows about the document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Display {
    /// Required, ≤ 200 characters.
    pub title: Title,
    /// Optional, ≤ 2000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
}

/// Options shared by `sign` and `sign.batch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignOptions {
    /// The hash the agent uses for `data` (None: SHA-256). Only allowed when every input is data.
    pub hash: Option<DigestAlgorithm>,
    /// None: the key's default.
    pub signature_algorithm: Option<SignatureAlgorithm>,
    /// None: raw.
    pub format: Option<SignFormat>,
    /// None: DER. Only with raw output and (if named) ECDSA or SM2.
    pub ecdsa_encoding: Option<EcdsaEncoding>,
    /// SM2's user ID for `data` (None: `1234567812345678`). Only with raw output and data.
    pub sm2_user_id: Option<String>,
    /// Dialog text.
    pub display: Display,
}

/// The longest `sm2UserId`, in UTF-8 bytes (Z's length field counts bits in 16 bits: 8191).
pub const MAX_SM2_USER_ID_BYTES: usize = 1024;

impl SignOptions {
    /// The hash applied to `data` inputs.
    pub fn data_hash(&self) -> DigestAlgorithm {
        self.hash.unwrap_or_default()
    }

    fn check(&self, all_data: bool) -> Result<(), String> {
        if self.hash.is_some() && !all_data {
            return Err("hash is only allowed with data".into());
        }
        if self.hash.is_some() && self.signature_algorithm == Some(SignatureAlgorithm::Ed25519) {
            return Err(
                "hash does not apply to Ed25519, which signs the data itself: leave hash out"
                    .into(),
            );
        }
        if self.ecdsa_encoding.is_some() {
            if self.format == Some(SignFormat::Cms) {
                return Err("ecdsaEncoding applies to raw output only".into());
            }
            if matches!(self.signature_algorithm, Some(a) if a != SignatureAlgorithm::Ecdsa && a != SignatureAlgorithm::Sm2)
            {
                return Err("ecdsaEncoding applies to ECDSA and SM2 only".into());
            }
        }
        if let Some(id) = &self.sm2_user_id {
            if !all_data || self.format == Some(SignFormat::Cms) {
                return Err("sm2UserId applies to raw signatures over data only".into());
            }
            if matches!(self.signature_algorithm, Some(a) if a != SignatureAlgorithm::Sm2) {
                return Err("sm2UserId applies to SM2 only".into());
            }
            if id.is_empty() || id.len() > MAX_SM2_USER_ID_BYTES {
                return Err(format!(
                    "sm2UserId must hold 1..={MAX_SM2_USER_ID_BYTES} bytes of UTF-8"
                ));
            }
        }
        Ok(())
    }
}

/// `sign` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSignParams", into = "RawSignParams")]
pub struct SignParams {
    /// From `certificates.list`.
    pub certificate_id: String,
    /// Digest or data.
    pub input: SignInput,
    /// Algorithm, format and dialog text.
    pub options: SignOptions,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSignParams {
    certificate_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<Base64Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<DigestAlgorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature_algorithm: Option<SignatureAlgorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<SignFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ecdsa_encoding: Option<EcdsaEncoding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sm2_user_id: Option<String>,
    display: Display,
}

impl TryFrom<RawSignParams> for SignParams {
    type Error = String;
    fn try_from(raw: RawSignParams) -> Result<Self, String> {
        let input = SignInput::from_pair(raw.digest, raw.data)?;
        let options = SignOptions {
            hash: raw.hash,
            signature_algorithm: raw.signature_algorithm,
            format: raw.format,
            ecdsa_encoding: raw.ecdsa_encoding,
            sm2_user_id: raw.sm2_user_id,
            display: raw.display,
        };
        options.check(input.is_data())?;
        Ok(SignParams {
            certificate_id: raw.certificate_id,
            input,
            options,
        })
    }
}

impl From<SignParams> for RawSignParams {
    fn from(p: SignParams) -> Self {
        let (digest, data) = p.input.into_pair();
        RawSignParams {
            certificate_id: p.certificate_id,
            digest,
            data,
            hash: p.options.hash,
            signature_algorithm: p.options.signature_algorithm,
            format: p.options.format,
            ecdsa_encoding: p.options.ecdsa_encoding,
            sm2_user_id: p.options.sm2_user_id,
            display: p.options.display,
        }
    }
}

/// One document of a `sign.batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBatchItem", into = "RawBatchItem")]
pub struct BatchItem {
    /// Digest or data.
    pub input: SignInput,
    /// Shown in the dialog's list.
    pub label: Option<Title>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBatchItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<Base64Bytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<Title>,
}

impl TryFrom<RawBatchItem> for BatchItem {
    type Error = String;
    fn try_from(raw: RawBatchItem) -> Result<Self, String> {
        Ok(BatchItem {
            input: SignInput::from_pair(raw.digest, raw.data)?,
            label: raw.label,
        })
    }
}

impl From<BatchItem> for RawBatchItem {
    fn from(item: BatchItem) -> Self {
        let (digest, data) = item.input.into_pair();
        RawBatchItem {
            digest,
            data,
            label: item.label,
        }
    }
}

/// `sign.batch` params: 1 to [`MAX_BATCH_ITEMS`] items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSignBatchParams", into = "RawSignBatchParams")]
pub struct SignBatchParams {
    /// From `certificates.list`.
    pub certificate_id: String,
    /// The documents, in order.
    pub items: Vec<BatchItem>,
    /// Algorithm, format and dialog text.
    pub options: SignOptions,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSignBatchParams {
    certificate_id: String,
    items: Vec<BatchItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<DigestAlgorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature_algorithm: Option<SignatureAlgorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    format: Option<SignFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ecdsa_encoding: Option<EcdsaEncoding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sm2_user_id: Option<String>,
    display: Display,
}

impl TryFrom<RawSignBatchParams> for SignBatchParams {
    type Error = String;
    fn try_from(raw: RawSignBatchParams) -> Result<Self, String> {
        if raw.items.is_empty() || raw.items.len() > MAX_BATCH_ITEMS {
            return Err(format!(
                "items must hold 1..={MAX_BATCH_ITEMS} entries, got {}",
                raw.items.len()
            ));
        }
        let options = SignOptions {
            hash: raw.hash,
            signature_algorithm: raw.signature_algorithm,
            format: raw.format,
            ecdsa_encoding: raw.ecdsa_encoding,
            sm2_user_id: raw.sm2_user_id,
            display: raw.display,
        };
        options.check(raw.items.iter().all(|i| i.input.is_data()))?;
        Ok(SignBatchParams {
            certificate_id: raw.certificate_id,
            items: raw.items,
            options,
        })
    }
}

impl From<SignBatchParams> for RawSignBatchParams {
    fn from(p: SignBatchParams) -> Self {
        RawSignBatchParams {
            certificate_id: p.certificate_id,
            items: p.items,
            hash: p.options.hash,
            signature_algorithm: p.options.signature_algorithm,
            format: p.options.format,
            ecdsa_encoding: p.options.ecdsa_encoding,
            sm2_user_id: p.options.sm2_user_id,
            display: p.options.display,
        }
    }
}

/// Web eID token algorithms (`authenticate.algorithm` asks; the result names what was used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum AuthAlgorithm {
    ES256,
    ES384,
    ES512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    EdDSA,
    /// SM2 with SM3 (r ‖ s), for SM2 keys: outside Web eID's list, like EdDSA.
    SM2,
}

impl AuthAlgorithm {
    /// Every Web eID token algorithm.
    pub const ALL: [AuthAlgorithm; 11] = [
        AuthAlgorithm::ES256,
        AuthAlgorithm::ES384,
        AuthAlgorithm::ES512,
        AuthAlgorithm::RS256,
        AuthAlgorithm::RS384,
        AuthAlgorithm::RS512,
        AuthAlgorithm::PS256,
        AuthAlgorithm::PS384,
        AuthAlgorithm::PS512,
        AuthAlgorithm::EdDSA,
        AuthAlgorithm::SM2,
    ];

    /// The JWA name (`PS256`), as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthAlgorithm::ES256 => "ES256",
            AuthAlgorithm::ES384 => "ES384",
            AuthAlgorithm::ES512 => "ES512",
            AuthAlgorithm::RS256 => "RS256",
            AuthAlgorithm::RS384 => "RS384",
            AuthAlgorithm::RS512 => "RS512",
            AuthAlgorithm::PS256 => "PS256",
            AuthAlgorithm::PS384 => "PS384",
            AuthAlgorithm::PS512 => "PS512",
            AuthAlgorithm::EdDSA => "EdDSA",
            AuthAlgorithm::SM2 => "SM2",
        }
    }
}

/// `authenticate` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthenticateParams {
    /// The relying party's nonce, as received.
    pub challenge: Challenge,
    /// None: the agent picks (or asks the user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    /// E.g. `PS256` for an RSA key; None: the key's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<AuthAlgorithm>,
}

/// `keys.generate.algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum GenerateAlgorithm {
    #[serde(rename = "EC-P256")]
    EcP256,
    #[serde(rename = "EC-P384")]
    EcP384,
    #[serde(rename = "RSA-2048")]
    Rsa2048,
    #[serde(rename = "RSA-3072")]
    Rsa3072,
    /// Where the token offers Ed25519 key generation.
    Ed25519,
    /// SM2 (GM/T 0003), on SKF keys.
    #[serde(rename = "SM2")]
    Sm2,
}

/// `keys.generate` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeysGenerateParams {
    /// From `tokens.list`.
    pub token_id: String,
    /// Key type.
    pub algorithm: GenerateAlgorithm,
    /// The key's label on the token (shown in the dialog).
    pub label: Title,
    /// The CSR subject, RFC 4514 (shown in the dialog).
    pub subject: DialogText<1024, false>,
    /// Ask for a key that wants the PIN for every signature (CKA_ALWAYS_AUTHENTICATE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub always_authenticate: Option<bool>,
}

/// `certificates.import` params.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificatesImportParams {
    /// From `tokens.list`.
    pub token_id: String,
    /// DER certificate.
    pub certificate: Base64Bytes,
    /// Replace the certificate the key already has (a renewal for the same key); without it
    /// the new one is stored beside it and both are listed (an SKF container, which has one
    /// slot, refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace: Option<bool>,
}

/// `cancel` params: the `id` of a pending request of this connection (number or string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CancelParams {
    /// The id to cancel.
    #[serde(deserialize_with = "deserialize_id")]
    pub request_id: Value,
}

fn deserialize_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    let v = Value::deserialize(d)?;
    if super::is_valid_id(&v) {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(
            "requestId must be a number or a string",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire<T: Serialize>(value: T) -> Value {
        serde_json::to_value(value).unwrap()
    }

    #[test]
    fn algorithm_names_are_the_wire_names() {
        for d in DigestAlgorithm::ALL {
            assert_eq!(wire(d), Value::from(d.as_str()));
        }
        for s in SignatureAlgorithm::ALL {
            assert_eq!(wire(s), Value::from(s.as_str()));
        }
        for a in AuthAlgorithm::ALL {
            assert_eq!(wire(a), Value::from(a.as_str()));
        }
    }

    #[test]
    fn a_digest_of_the_wrong_length_is_named_as_on_the_wire() {
        let v = serde_json::json!({"algorithm": "SHA-384", "value": "AAEC"});
        let err = serde_json::from_value::<Digest>(v).unwrap_err().to_string();
        assert!(err.contains("a SHA-384 digest is 48 bytes, got 3"), "{err}");
    }
}
