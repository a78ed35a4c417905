//! The JSON-RPC 2.0 messages of docs/protocol.md v1: requests parsed strictly from a text frame,
//! results, events and errors.
//!
//! Checking order, which decides the reason when a message breaks several rules:
//! not JSON → `PARSE_ERROR`; any object key `pin`/`password`/`passwd` (any case, any depth, also
//! in a repeated member) → `PIN_FROM_PAGE_REFUSED`; an object with a repeated member, a numeric
//! id that is not an integer within ±(2^53 − 1), or not a request object → `INVALID_REQUEST`;
//! unknown method → `METHOD_NOT_FOUND`; params that do not fit → `INVALID_PARAMS`.

mod encoding;
mod error;
mod params;
mod results;
mod strict;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

pub use encoding::{Base64Bytes, Challenge, DialogText, Summary, Timestamp, Title};
pub use error::{Reason, RpcError};
pub use params::{
    AuthAlgorithm, AuthenticateParams, BatchItem, CancelParams, CertificateFilter,
    CertificatesImportParams, CertificatesListParams, ClientInfo, Digest, DigestAlgorithm, Display,
    EcdsaEncoding, EmptyParams, GenerateAlgorithm, HelloParams, KeyAlgorithm, KeyAlgorithmFilter,
    KeyFamily, KeyUsage, KeysGenerateParams, NowTag, SignBatchParams, SignFormat, SignInput,
    SignOptions, SignParams, SignatureAlgorithm, ValidAt, MAX_BATCH_ITEMS,
};
pub use results::{
    AuthenticateResult, BatchSignature, CancelResult, CertificateEntry, CertificatesImportResult,
    CertificatesListResult, Event, HelloResult, KeysGenerateResult, PinState, RequestAccessResult,
    SignBatchResult, SignProgress, SignResult, TokenEntry, TokensChanged, TokensListResult,
    CAPABILITIES,
};

/// Object keys a page may never send, compared case-insensitively.
const SECRET_KEYS: [&str; 3] = ["pin", "password", "passwd"];

/// A request a page may send, with its validated params.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Request {
    /// `hello`.
    Hello(HelloParams),
    /// `origin.requestAccess`.
    RequestAccess,
    /// `tokens.list`.
    TokensList,
    /// `certificates.list`.
    CertificatesList(CertificatesListParams),
    /// `sign`.
    Sign(SignParams),
    /// `sign.batch`.
    SignBatch(SignBatchParams),
    /// `authenticate`.
    Authenticate(AuthenticateParams),
    /// `keys.generate`.
    KeysGenerate(KeysGenerateParams),
    /// `certificates.import`.
    CertificatesImport(CertificatesImportParams),
    /// `cancel`: answered by the bridge itself, never passed to the backend.
    Cancel {
        /// The `id` of the request to cancel.
        request_id: Value,
    },
}

impl Request {
    /// Every method name of protocol v1.
    pub const METHODS: [&'static str; 10] = [
        "hello",
        "origin.requestAccess",
        "tokens.list",
        "certificates.list",
        "sign",
        "sign.batch",
        "authenticate",
        "keys.generate",
        "certificates.import",
        "cancel",
    ];

    /// Builds a request from a method name and its params object.
    pub fn from_parts(method: &str, params: Value) -> Result<Request, RpcError> {
        Request::build(method, params)
    }

    fn build(method: &str, params: impl Params) -> Result<Request, RpcError> {
        Ok(match method {
            "hello" => Request::Hello(params.typed()?),
            "origin.requestAccess" => {
                params.typed::<EmptyParams>()?;
                Request::RequestAccess
            }
            "tokens.list" => {
                params.typed::<EmptyParams>()?;
                Request::TokensList
            }
            "certificates.list" => Request::CertificatesList(params.typed()?),
            "sign" => Request::Sign(params.typed()?),
            "sign.batch" => Request::SignBatch(params.typed()?),
            "authenticate" => Request::Authenticate(params.typed()?),
            "keys.generate" => Request::KeysGenerate(params.typed()?),
            "certificates.import" => Request::CertificatesImport(params.typed()?),
            "cancel" => {
                let p: CancelParams = params.typed()?;
                Request::Cancel {
                    request_id: p.request_id,
                }
            }
            other => return Err(RpcError::method_not_found(other)),
        })
    }

    /// The JSON-RPC method name.
    pub fn method(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::RequestAccess => "origin.requestAccess",
            Request::TokensList => "tokens.list",
            Request::CertificatesList(_) => "certificates.list",
            Request::Sign(_) => "sign",
            Request::SignBatch(_) => "sign.batch",
            Request::Authenticate(_) => "authenticate",
            Request::KeysGenerate(_) => "keys.generate",
            Request::CertificatesImport(_) => "certificates.import",
            Request::Cancel { .. } => "cancel",
        }
    }

    /// The params object.
    pub fn params(&self) -> Value {
        let value = match self {
            Request::Hello(p) => serde_json::to_value(p),
            Request::RequestAccess | Request::TokensList => Ok(Value::Object(Map::new())),
            Request::CertificatesList(p) => serde_json::to_value(p),
            Request::Sign(p) => serde_json::to_value(p),
            Request::SignBatch(p) => serde_json::to_value(p),
            Request::Authenticate(p) => serde_json::to_value(p),
            Request::KeysGenerate(p) => serde_json::to_value(p),
            Request::CertificatesImport(p) => serde_json::to_value(p),
            Request::Cancel { request_id } => Ok(serde_json::json!({ "requestId": request_id })),
        };
        // These types serialize to JSON by construction (string keys, no non-finite floats).
        value.unwrap_or(Value::Null)
    }

    /// The whole request message with `id`.
    pub fn to_message(&self, id: &Value) -> Value {
        serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": self.method(),
            "params": self.params(),
        })
    }
}

/// A request as it arrived: its `id` (a number or a string) and what it asks.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingRequest {
    /// The request `id`, echoed in the answer.
    pub id: Value,
    /// What is asked.
    pub request: Request,
}

/// A frame refused before reaching a backend: the error to answer, under `id` (null when the
/// frame had no usable id).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The id to answer under.
    pub id: Value,
    /// What to answer.
    pub error: RpcError,
}

/// Parses one text frame into a request, in the checking order of the module docs.
pub fn parse_request(text: &str) -> Result<IncomingRequest, Refusal> {
    let scan = strict::scan(text).map_err(not_json)?;
    // Valid JSON (the scan said so): reading its envelope cannot fail.
    let envelope = strict::envelope(text).map_err(not_json)?;
    checked(scan, envelope.map_params(|p| ParamsText(p.get())))
}

fn not_json(e: serde_json::Error) -> Refusal {
    Refusal {
        id: Value::Null,
        error: RpcError::parse_error(format!("not JSON: {e}")),
    }
}

/// The checks of a message read into `scan` and `envelope`, in the module docs' order, and
/// its typed params.
fn checked<P: Params>(
    scan: strict::Scan,
    envelope: strict::Envelope<P>,
) -> Result<IncomingRequest, Refusal> {
    // With a repeated key the message means two things; its `id` is not trusted either.
    let id = if envelope.object && !scan.duplicate_key {
        envelope.id.as_ref().filter(|v| is_valid_id(v)).cloned()
    } else {
        None
    }
    .unwrap_or(Value::Null);
    if scan.secret_key {
        return Err(Refusal {
            id,
            error: RpcError::pin_from_page_refused(),
        });
    }
    let refuse = |error: RpcError| Refusal {
        id: id.clone(),
        error,
    };
    if scan.duplicate_key {
        return Err(refuse(RpcError::invalid_request(
            "an object has the same member twice",
        )));
    }
    if envelope
        .id
        .as_ref()
        .is_some_and(|v| v.is_number() && !is_valid_id(v))
    {
        return Err(refuse(RpcError::invalid_request(
            "a numeric id must be an integer within ±(2^53 − 1)",
        )));
    }
    if !envelope.object {
        return Err(refuse(RpcError::invalid_request(
            "a request is one JSON object (batches are not supported)",
        )));
    }
    if envelope.jsonrpc.as_ref().and_then(Value::as_str) != Some("2.0") {
        return Err(refuse(RpcError::invalid_request("jsonrpc must be \"2.0\"")));
    }
    if id.is_null() {
        return Err(refuse(RpcError::invalid_request(
            "id must be a number or a string",
        )));
    }
    let Some(Value::String(method)) = envelope.method else {
        return Err(refuse(RpcError::invalid_request("method must be a string")));
    };
    if let Some(extra) = &envelope.unknown {
        let shown: String = extra.chars().take(64).collect();
        return Err(refuse(RpcError::invalid_request(format!(
            "unknown member {shown:?}"
        ))));
    }
    if !Request::METHODS.contains(&method.as_str()) {
        return Err(refuse(RpcError::method_not_found(&method)));
    }
    let params = envelope.params.unwrap_or_else(P::empty);
    if !params.is_object() {
        return Err(refuse(RpcError::invalid_params("params must be an object")));
    }
    let request = Request::build(&method, params).map_err(refuse)?;
    Ok(IncomingRequest { id, request })
}

/// Largest integer a JavaScript number holds exactly (2^53 − 1).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// True for a JSON-RPC id this protocol accepts: a string, or an integer a JavaScript page can
/// hold exactly (within ±(2^53 − 1)), so the id echoed back is the id the page sent.
pub fn is_valid_id(id: &Value) -> bool {
    match id {
        Value::String(_) => true,
        Value::Number(n) => {
            n.as_u64().is_some_and(|v| v <= MAX_SAFE_INTEGER)
                || n.as_i64()
                    .is_some_and(|v| v.unsigned_abs() <= MAX_SAFE_INTEGER)
        }
        _ => false,
    }
}

/// True when any object at any depth has a key named like a PIN or password.
pub fn contains_secret_key(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| {
            SECRET_KEYS.iter().any(|s| k.eq_ignore_ascii_case(s)) || contains_secret_key(v)
        }),
        Value::Array(items) => items.iter().any(contains_secret_key),
        _ => false,
    }
}

/// A result's JSON text, serialised once from its typed struct: no `Value` tree is built for
/// an answer (a signature's certificate and signature are not copied into one and out again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer(String);

impl Answer {
    /// The JSON text of `value` (`null` if it cannot be serialised, which the result types here
    /// cannot fail to be).
    pub fn of<T: Serialize>(value: &T) -> Answer {
        Answer(serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned()))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Value> for Answer {
    fn from(value: Value) -> Answer {
        Answer(value.to_string())
    }
}

/// `{"jsonrpc":"2.0","id":id,"result":…}` as text, around an [`Answer`] already serialised.
pub fn response_text(id: &Value, result: &Answer) -> String {
    // `Value`'s Display is its compact JSON; the answer is JSON that serde_json wrote.
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{}}}",
        result.0
    )
}

/// `{"jsonrpc": "2.0", "id": id, "result": result}`.
pub fn response(id: &Value, result: Value) -> Value {
    serde_json::json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// `{"jsonrpc": "2.0", "id": id, "error": {...}}`.
pub fn error_response(id: &Value, error: &RpcError) -> Value {
    serde_json::json!({ "jsonrpc": "2.0", "id": id, "error": error.to_value() })
}

/// `{"jsonrpc": "2.0", "method": method, "params": params}` (no id).
pub fn notification(method: &str, params: Value) -> Value {
    serde_json::json!({ "jsonrpc": "2.0", "method": method, "params": params })
}

/// The notification message of an event.
pub fn event_message<E: Event>(event: &E) -> Value {
    notification(E::METHOD, to_json(event))
}

/// Serializes a result or event type. These types always serialize (string keys only); should
/// one ever fail, the page gets `null` rather than the agent panicking.
pub fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// A request's params, as a `Value` or as the text of a JSON value.
trait Params: Sized {
    /// The params of a request without any: an empty object.
    fn empty() -> Self;
    /// Whether the params are a JSON object.
    fn is_object(&self) -> bool;
    /// The params as `T`; INVALID_PARAMS with serde's words where they are not one.
    fn typed<T: DeserializeOwned>(self) -> Result<T, RpcError>;
}

impl Params for Value {
    fn empty() -> Self {
        Value::Object(Map::new())
    }
    fn is_object(&self) -> bool {
        Value::is_object(self)
    }
    fn typed<T: DeserializeOwned>(self) -> Result<T, RpcError> {
        serde_json::from_value(self).map_err(|e| RpcError::invalid_params(e.to_string()))
    }
}

/// The params' text, parsed straight into their type (no `Value` on the way).
struct ParamsText<'a>(&'a str);

impl Params for ParamsText<'_> {
    fn empty() -> Self {
        ParamsText("{}")
    }
    fn is_object(&self) -> bool {
        // The text of a JSON value (no space around it) starts with `{` exactly when it is
        // an object.
        self.0.starts_with('{')
    }
    fn typed<T: DeserializeOwned>(self) -> Result<T, RpcError> {
        serde_json::from_str(self.0).map_err(|e| {
            // The same words as from a `Value`: a position inside the params says nothing to
            // the page, whose text had other lines.
            let text = e.to_string();
            let position = format!(" at line {} column {}", e.line(), e.column());
            let message = match text.strip_suffix(&position) {
                Some(message) if e.line() > 0 => message.to_owned(),
                _ => text,
            };
            RpcError::invalid_params(message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parse_request` as it was before the params were parsed from their text (issue 12):
    /// the message read as a whole `Value`, then the same checks.
    fn parse_request_through_value(text: &str) -> Result<IncomingRequest, Refusal> {
        let (value, scan) = strict::reference::parse(text).map_err(not_json)?;
        let envelope = match value {
            Value::Object(mut members) => strict::Envelope {
                object: true,
                jsonrpc: members.remove("jsonrpc"),
                id: members.remove("id"),
                method: members.remove("method"),
                params: members.remove("params"),
                // What is left, in the map's sorted order.
                unknown: members.keys().next().cloned(),
            },
            _ => strict::Envelope::default(),
        };
        checked(scan, envelope)
    }

    /// Every golden message, cut, with a byte left out, or with a token put in at each place:
    /// the text reader and the `Value` reader accept the same requests and refuse the rest for
    /// the same reason, under the same id.
    #[test]
    fn reading_the_params_from_their_text_changes_no_answer() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut texts = Vec::new();
        for sub in [dir.clone(), dir.join("invalid")] {
            for entry in std::fs::read_dir(&sub).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "json") {
                    texts.push(std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        assert!(texts.len() > 50, "{} fixtures", texts.len());
        let tokens = [
            "\"pin\"",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "null",
            "1.5",
            "\"id\":2,",
            "\"x\":1,",
            "\"params\":{},",
            "\"a\\u0062\"",
        ];
        let mut compared = 0;
        let mut accepted = 0;
        for base in &texts {
            let bytes = base.as_bytes();
            let mut variants = vec![base.clone()];
            for at in 0..=bytes.len() {
                if !base.is_char_boundary(at) {
                    continue;
                }
                variants.push(base[..at].to_owned());
                if let Some(c) = base[at..].chars().next() {
                    variants.push(format!("{}{}", &base[..at], &base[at + c.len_utf8()..]));
                }
                let token = tokens[at % tokens.len()];
                variants.push(format!("{}{token}{}", &base[..at], &base[at..]));
            }
            for text in &variants {
                let new = parse_request(text);
                let old = parse_request_through_value(text);
                match (&new, &old) {
                    (Ok(n), Ok(o)) => {
                        assert_eq!(n, o, "{text}");
                        accepted += 1;
                    }
                    (Err(n), Err(o)) => {
                        assert_eq!((&n.id, n.error.reason), (&o.id, o.error.reason), "{text}");
                    }
                    _ => panic!("{text}\nnow: {new:?}\nbefore: {old:?}"),
                }
                compared += 1;
            }
        }
        assert!(
            compared > 10_000 && accepted > 100,
            "{compared} compared, {accepted} accepted"
        );
    }

    #[test]
    fn a_response_text_is_the_response_value() {
        let result = SignBatchResult {
            results: vec![BatchSignature {
                signature: Base64Bytes(vec![1, 2, 3]),
            }],
        };
        for id in [Value::from(7), Value::from("a\"b")] {
            let text = response_text(&id, &Answer::of(&result));
            let parsed: Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(parsed, response(&id, to_json(&result)));
        }
    }

    #[test]
    fn secret_keys_found_at_any_depth_and_case() {
        let v: Value = serde_json::from_str(r#"{"a":[{"b":{"PassWd":1}}],"pinned":true}"#).unwrap();
        assert!(contains_secret_key(&v));
        let v: Value = serde_json::from_str(r#"{"a":"pin","pinPad":true,"x":["pin"]}"#).unwrap();
        assert!(
            !contains_secret_key(&v),
            "values and look-alike keys are fine"
        );
    }

    #[test]
    fn params_default_to_empty_object() {
        let r = parse_request(r#"{"jsonrpc":"2.0","id":1,"method":"tokens.list"}"#).unwrap();
        assert_eq!(r.request, Request::TokensList);
    }

    #[test]
    fn refusal_keeps_a_valid_id() {
        let r = parse_request(r#"{"jsonrpc":"2.0","id":"a","method":"nope"}"#).unwrap_err();
        assert_eq!(r.id, Value::from("a"));
        assert_eq!(r.error.reason, Reason::MethodNotFound);
    }
}
