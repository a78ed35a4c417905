//! The HTTP request before the WebSocket upgrade, read and judged by hand so that every refusal
//! is an exact, body-less status line: 404 for anything but `GET /v1`, 426 for a `/v1` request
//! that is not a WebSocket upgrade, 403 for a bad `Host` or `Origin`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Origin;

/// Longest request head read before giving up.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines accepted.
const MAX_HEADERS: usize = 48;

/// The one path served.
pub(crate) const PATH: &str = "/v1";

/// What a well-formed upgrade request to `/v1` asked for.
#[derive(Debug)]
pub(crate) struct Upgrade {
    pub origin: Origin,
    pub key: String,
}

/// The status a refused request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refuse {
    BadRequest,
    Forbidden,
    NotFound,
    UpgradeRequired,
    HeadersTooLarge,
    Unavailable,
}

impl Refuse {
    /// The numeric HTTP status.
    pub(crate) fn status(self) -> u16 {
        match self {
            Refuse::BadRequest => 400,
            Refuse::Forbidden => 403,
            Refuse::NotFound => 404,
            Refuse::UpgradeRequired => 426,
            Refuse::HeadersTooLarge => 431,
            Refuse::Unavailable => 503,
        }
    }

    fn status_line(self) -> &'static str {
        match self {
            Refuse::BadRequest => "400 Bad Request",
            Refuse::Forbidden => "403 Forbidden",
            Refuse::NotFound => "404 Not Found",
            Refuse::UpgradeRequired => "426 Upgrade Required",
            Refuse::HeadersTooLarge => "431 Request Header Fields Too Large",
            Refuse::Unavailable => "503 Service Unavailable",
        }
    }
}

/// Reads the request head. Returns the head's bytes and whatever followed it (frames a client
/// sent early), or the refusal for a head that is too large or not HTTP.
pub(crate) async fn read_head(stream: &mut TcpStream) -> std::io::Result<Result<Vec<u8>, Refuse>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Ok(buf));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(Err(Refuse::HeadersTooLarge));
        }
    }
}

/// Judges a request head against the path, the upgrade headers, `Host` and `Origin`. On success
/// also returns how many bytes the head took (the rest belongs to the WebSocket).
pub(crate) fn judge(
    buf: &[u8],
    port: u16,
    allow_insecure_localhost: bool,
) -> Result<(Upgrade, usize), Refuse> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(Refuse::BadRequest),
        Err(httparse::Error::TooManyHeaders) => return Err(Refuse::HeadersTooLarge),
        Err(_) => return Err(Refuse::BadRequest),
    };
    if req.method != Some("GET") || req.path != Some(PATH) {
        return Err(Refuse::NotFound);
    }
    let one = |name: &str| -> Result<Option<&str>, ()> {
        let mut found = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name));
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some(h), None) => std::str::from_utf8(h.value).map(Some).map_err(|_| ()),
            (Some(_), Some(_)) => Err(()),
        }
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let key = one("sec-websocket-key").ok().flatten();
    let key_ok = key.is_some_and(|k| STANDARD.decode(k.trim()).is_ok_and(|b| b.len() == 16));
    if req.version != Some(1)
        || !has_token("upgrade", "websocket")
        || !has_token("connection", "upgrade")
        || one("sec-websocket-version") != Ok(Some("13"))
        || !key_ok
    {
        return Err(Refuse::UpgradeRequired);
    }
    let host = one("host").map_err(|()| Refuse::Forbidden)?;
    if !host.is_some_and(|h| host_allowed(h, port)) {
        return Err(Refuse::Forbidden);
    }
    let origin = match one("origin") {
        Ok(Some(value)) => {
            Origin::parse(value, allow_insecure_localhost).map_err(|_| Refuse::Forbidden)?
        }
        _ => return Err(Refuse::Forbidden),
    };
    let key = key.map(|k| k.trim().to_owned()).unwrap_or_default();
    Ok((Upgrade { origin, key }, head_len))
}

/// `Host` must name the loopback agent itself, with the port actually bound (DNS rebinding).
fn host_allowed(host: &str, port: u16) -> bool {
    ["127.0.0.1", "localhost", "[::1]"]
        .iter()
        .any(|name| host == format!("{name}:{port}"))
}

/// Writes a body-less refusal and closes the write side.
pub(crate) async fn refuse(stream: &mut TcpStream, refuse: Refuse) {
    let extra = if refuse == Refuse::UpgradeRequired {
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let response = format!(
        "HTTP/1.1 {}\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n",
        refuse.status_line()
    );
    // The peer may already be gone; there is nobody left to tell.
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Writes the 101 answer completing the upgrade.
pub(crate) async fn switch_protocols(stream: &mut TcpStream, key: &str) -> std::io::Result<()> {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn head(lines: &[&str]) -> Vec<u8> {
        let mut s = lines.join("\r\n");
        s.push_str("\r\n\r\n");
        s.into_bytes()
    }

    fn upgrade(path: &str, host: &str, origin: Option<&str>) -> Vec<u8> {
        let mut lines = vec![
            format!("GET {path} HTTP/1.1"),
            format!("Host: {host}"),
            "Upgrade: websocket".into(),
            "Connection: keep-alive, Upgrade".into(),
            "Sec-WebSocket-Version: 13".into(),
            format!("Sec-WebSocket-Key: {KEY}"),
        ];
        if let Some(o) = origin {
            lines.push(format!("Origin: {o}"));
        }
        head(&lines.iter().map(String::as_str).collect::<Vec<_>>())
    }

    #[test]
    fn accepts_a_good_upgrade() {
        for host in ["127.0.0.1:4000", "localhost:4000", "[::1]:4000"] {
            let buf = upgrade("/v1", host, Some("https://portal.example"));
            let (u, n) = judge(&buf, 4000, false).unwrap();
            assert_eq!(u.origin.as_str(), "https://portal.example");
            assert_eq!(n, buf.len());
        }
    }

    #[test]
    fn refusals() {
        let o = Some("https://portal.example");
        assert_eq!(
            judge(&upgrade("/", "localhost:4000", o), 4000, false).unwrap_err(),
            Refuse::NotFound
        );
        assert_eq!(
            judge(&upgrade("/v1/", "localhost:4000", o), 4000, false).unwrap_err(),
            Refuse::NotFound
        );
        assert_eq!(
            judge(&upgrade("/v1", "localhost:4001", o), 4000, false).unwrap_err(),
            Refuse::Forbidden
        );
        assert_eq!(
            judge(&upgrade("/v1", "evil.test:4000", o), 4000, false).unwrap_err(),
            Refuse::Forbidden
        );
        assert_eq!(
            judge(&upgrade("/v1", "localhost:4000", None), 4000, false).unwrap_err(),
            Refuse::Forbidden
        );
        assert_eq!(
            judge(&upgrade("/v1", "localhost:4000", Some("null")), 4000, false).unwrap_err(),
            Refuse::Forbidden
        );
        let plain = head(&["GET /v1 HTTP/1.1", "Host: localhost:4000"]);
        assert_eq!(
            judge(&plain, 4000, false).unwrap_err(),
            Refuse::UpgradeRequired
        );
        let post = head(&["POST /v1 HTTP/1.1", "Host: localhost:4000"]);
        assert_eq!(judge(&post, 4000, false).unwrap_err(), Refuse::NotFound);
        let mut two_origins = upgrade("/v1", "localhost:4000", o);
        two_origins.truncate(two_origins.len() - 2);
        two_origins.extend_from_slice(b"Origin: https://other.example\r\n\r\n");
        assert_eq!(
            judge(&two_origins, 4000, false).unwrap_err(),
            Refuse::Forbidden
        );
    }
}
