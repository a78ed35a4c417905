//! The error half of a JSON-RPC response: the stable `reason` a page matches on, and its code.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::results::BatchSignature;

/// The stable error reasons of docs/protocol.md's error table. Pages match on these names, never on
/// the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Reason {
    /// -32700: the frame is not JSON.
    ParseError,
    /// -32600: JSON, but not a JSON-RPC 2.0 request object.
    InvalidRequest,
    /// -32601: no such method.
    MethodNotFound,
    /// -32602: the params do not fit the method.
    InvalidParams,
    /// 1000: origin not approved and the dialog was not allowed.
    OriginNotApproved,
    /// 1001: the user or policy denied this origin.
    OriginDenied,
    /// 1002: the user said no, closed the dialog, or the page sent `cancel`.
    UserCancelled,
    /// 1003: wrong PIN; `data.countLow` and `data.finalTry` say what the token reports.
    PinIncorrect,
    /// 1004: the user PIN is blocked.
    PinLocked,
    /// 1005: the token is absent or was removed during the request.
    TokenNotPresent,
    /// 1006: no such certificate, or its key is gone.
    CertificateNotFound,
    /// 1007: the certificate may not be used for this.
    KeyUsageNotAllowed,
    /// 1008: the key or token cannot do what was asked.
    AlgorithmNotSupported,
    /// 1009: a dialog for this origin is already open, or the token is busy.
    Busy,
    /// 1010: the user did not answer in time.
    Timeout,
    /// 1011: over the request rate.
    RateLimited,
    /// 1012: a message carried a PIN.
    PinFromPageRefused,
    /// 1013: the PKCS#11 module failed; `data.function` names the call.
    TokenError,
    /// 1014: a bug.
    Internal,
}

impl Reason {
    /// Every reason, in the order of the error table.
    pub const ALL: [Reason; 19] = [
        Reason::ParseError,
        Reason::InvalidRequest,
        Reason::MethodNotFound,
        Reason::InvalidParams,
        Reason::OriginNotApproved,
        Reason::OriginDenied,
        Reason::UserCancelled,
        Reason::PinIncorrect,
        Reason::PinLocked,
        Reason::TokenNotPresent,
        Reason::CertificateNotFound,
        Reason::KeyUsageNotAllowed,
        Reason::AlgorithmNotSupported,
        Reason::Busy,
        Reason::Timeout,
        Reason::RateLimited,
        Reason::PinFromPageRefused,
        Reason::TokenError,
        Reason::Internal,
    ];

    /// The numeric JSON-RPC error code of this reason.
    pub fn code(self) -> i32 {
        match self {
            Reason::ParseError => -32700,
            Reason::InvalidRequest => -32600,
            Reason::MethodNotFound => -32601,
            Reason::InvalidParams => -32602,
            Reason::OriginNotApproved => 1000,
            Reason::OriginDenied => 1001,
            Reason::UserCancelled => 1002,
            Reason::PinIncorrect => 1003,
            Reason::PinLocked => 1004,
            Reason::TokenNotPresent => 1005,
            Reason::CertificateNotFound => 1006,
            Reason::KeyUsageNotAllowed => 1007,
            Reason::AlgorithmNotSupported => 1008,
            Reason::Busy => 1009,
            Reason::Timeout => 1010,
            Reason::RateLimited => 1011,
            Reason::PinFromPageRefused => 1012,
            Reason::TokenError => 1013,
            Reason::Internal => 1014,
        }
    }

    /// The wire name, e.g. `"PIN_INCORRECT"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ParseError => "PARSE_ERROR",
            Reason::InvalidRequest => "INVALID_REQUEST",
            Reason::MethodNotFound => "METHOD_NOT_FOUND",
            Reason::InvalidParams => "INVALID_PARAMS",
            Reason::OriginNotApproved => "ORIGIN_NOT_APPROVED",
            Reason::OriginDenied => "ORIGIN_DENIED",
            Reason::UserCancelled => "USER_CANCELLED",
            Reason::PinIncorrect => "PIN_INCORRECT",
            Reason::PinLocked => "PIN_LOCKED",
            Reason::TokenNotPresent => "TOKEN_NOT_PRESENT",
            Reason::CertificateNotFound => "CERTIFICATE_NOT_FOUND",
            Reason::KeyUsageNotAllowed => "KEY_USAGE_NOT_ALLOWED",
            Reason::AlgorithmNotSupported => "ALGORITHM_NOT_SUPPORTED",
            Reason::Busy => "BUSY",
            Reason::Timeout => "TIMEOUT",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::PinFromPageRefused => "PIN_FROM_PAGE_REFUSED",
            Reason::TokenError => "TOKEN_ERROR",
            Reason::Internal => "INTERNAL",
        }
    }

    /// The reason with this wire name, if any.
    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A JSON-RPC error object: `{"code", "message", "data": {"reason", ...extra}}`.
///
/// `data.reason` is always written; `data` holds the extra members only (never `reason`).
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// What went wrong, as the page matches on it.
    pub reason: Reason,
    /// Human text. Never contains a PIN, key or data being signed.
    pub message: String,
    /// Extra members of `data` beside `reason` (e.g. `countLow`, `completed`).
    pub data: Map<String, Value>,
}

impl RpcError {
    /// An error with no extra data.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        RpcError {
            reason,
            message: message.into(),
            data: Map::new(),
        }
    }

    /// Adds one member to `data` (a `reason` key is ignored: the reason field wins).
    #[must_use]
    pub fn with_data(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        let key = key.into();
        if key != "reason" {
            self.data.insert(key, value.into());
        }
        self
    }

    /// -32700.
    pub fn parse_error(message: impl Into<String>) -> Self {
        Self::new(Reason::ParseError, message)
    }

    /// -32600.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(Reason::InvalidRequest, message)
    }

    /// -32601.
    pub fn method_not_found(method: &str) -> Self {
        // The method name comes from the page: cap what is echoed back.
        let shown: String = method.chars().take(64).collect();
        Self::new(Reason::MethodNotFound, format!("unknown method: {shown}"))
    }

    /// -32602.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(Reason::InvalidParams, message)
    }

    /// 1002.
    pub fn user_cancelled() -> Self {
        Self::new(Reason::UserCancelled, "the request was cancelled")
    }

    /// 1003 with what the token reports about the remaining tries.
    pub fn pin_incorrect(count_low: bool, final_try: bool) -> Self {
        Self::new(Reason::PinIncorrect, "the PIN is incorrect")
            .with_data("countLow", count_low)
            .with_data("finalTry", final_try)
    }

    /// 1011.
    pub fn rate_limited() -> Self {
        Self::new(Reason::RateLimited, "too many requests")
    }

    /// 1012.
    pub fn pin_from_page_refused() -> Self {
        Self::new(
            Reason::PinFromPageRefused,
            "a PIN or password must never be sent by the page; the agent asks the user itself",
        )
    }

    /// 1013 naming the PKCS#11 function that failed (e.g. `"C_Sign"`).
    pub fn token_error(function: &str, message: impl Into<String>) -> Self {
        Self::new(Reason::TokenError, message).with_data("function", function)
    }

    /// INTERNAL (1014). The bridge never lets this message reach a page: it logs it, and the
    /// page gets [`RpcError::internal_for`] instead.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Reason::Internal, message)
    }

    /// INTERNAL (1014) as a page sees it: a fixed text naming the request, no detail, no `data` beyond
    /// `reason`.
    pub fn internal_for(request_id: &Value) -> Self {
        Self::new(
            Reason::Internal,
            format!("internal error in the agent (request {request_id}); its log has the details"),
        )
    }

    /// A `sign.batch` that failed part-way: `data.completed` and the finished `data.results`.
    pub fn batch_failed(self, results: &[BatchSignature]) -> Self {
        let results: Vec<Value> = results
            .iter()
            .map(|r| serde_json::json!({ "signature": r.signature }))
            .collect();
        self.with_data("completed", results.len())
            .with_data("results", results)
    }

    /// The JSON value of this error object.
    pub fn to_value(&self) -> Value {
        let mut data = Map::with_capacity(self.data.len() + 1);
        data.insert("reason".into(), Value::from(self.reason.as_str()));
        for (k, v) in &self.data {
            data.insert(k.clone(), v.clone());
        }
        serde_json::json!({
            "code": self.reason.code(),
            "message": self.message,
            "data": Value::Object(data),
        })
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.reason,
            self.reason.code(),
            self.message
        )
    }
}

impl std::error::Error for RpcError {}

impl Serialize for RpcError {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RpcError {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            code: i32,
            message: String,
            data: Map<String, Value>,
        }
        let mut raw = Raw::deserialize(deserializer)?;
        let reason = match raw.data.remove("reason") {
            Some(Value::String(name)) => Reason::from_name(&name)
                .ok_or_else(|| D::Error::custom(format!("unknown reason {name}")))?,
            _ => return Err(D::Error::custom("data.reason missing")),
        };
        if reason.code() != raw.code {
            return Err(D::Error::custom(format!(
                "code {} does not match reason {reason}",
                raw.code
            )));
        }
        Ok(RpcError {
            reason,
            message: raw.message,
            data: raw.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_are_unique_and_round_trip() {
        let mut codes = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(codes.insert(r.code()), "duplicate code {}", r.code());
            assert_eq!(Reason::from_name(r.as_str()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), Value::from(r.as_str()));
        }
    }

    #[test]
    fn reason_key_in_data_cannot_override_the_reason() {
        let e = RpcError::internal("x").with_data("reason", "USER_CANCELLED");
        assert_eq!(e.to_value()["data"]["reason"], "INTERNAL");
    }

    #[test]
    fn code_must_match_reason() {
        let v = serde_json::json!({"code": 1000, "message": "m", "data": {"reason": "BUSY"}});
        assert!(serde_json::from_value::<RpcError>(v).is_err());
    }
}
