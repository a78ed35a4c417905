//! The web origin of a connection, taken from its `Origin` header and validated strictly.

/// A validated web origin in its canonical serialization: `https://host[:port]`, or with
/// `allow_insecure_localhost` also `http://localhost[:port]` / `http://127.0.0.1[:port]`.
/// No path, query, user info or trailing slash; lowercase host; no explicit default port.
/// Two origins are the same only when their text is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin(String);

/// Why an origin was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidOrigin {
    /// `null` (sandboxed frames, file: pages, …).
    #[error("the null origin is refused")]
    Null,
    /// Not `https://` (or not an allowed insecure localhost origin).
    #[error("scheme not allowed")]
    Scheme,
    /// Host missing, not lowercase, or with characters a browser would not send.
    #[error("bad host")]
    Host,
    /// Port not a canonical number in 1..=65535, or the scheme's default given explicitly.
    #[error("bad port")]
    Port,
}

impl Origin {
    /// Validates an `Origin` header value (or an origin from configuration).
    pub fn parse(value: &str, allow_insecure_localhost: bool) -> Result<Origin, InvalidOrigin> {
        if value == "null" {
            return Err(InvalidOrigin::Null);
        }
        let (rest, https) = if let Some(rest) = value.strip_prefix("https://") {
            (rest, true)
        } else if let Some(rest) = value.strip_prefix("http://") {
            (rest, false)
        } else {
            return Err(InvalidOrigin::Scheme);
        };
        let (host, port) = split_host_port(rest)?;
        if let Some(port) = port {
            let default = if https { "443" } else { "80" };
            let canonical = !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && !port.starts_with('0')
                && port.len() <= 5
                && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
            if !canonical || port == default {
                return Err(InvalidOrigin::Port);
            }
        }
        if https {
            if !valid_host(host) {
                return Err(InvalidOrigin::Host);
            }
        } else if !(allow_insecure_localhost && matches!(host, "localhost" | "127.0.0.1")) {
            return Err(InvalidOrigin::Scheme);
        }
        Ok(Origin(value.to_owned()))
    }

    /// The origin text, e.g. `https://portal.example`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Splits `host[:port]` (host may be a bracketed IPv6 literal). Anything after the authority
/// (path, query, fragment, user info) is refused.
fn split_host_port(rest: &str) -> Result<(&str, Option<&str>), InvalidOrigin> {
    if rest.is_empty() {
        return Err(InvalidOrigin::Host);
    }
    if let Some(after_bracket) = rest.strip_prefix('[') {
        let close = after_bracket.find(']').ok_or(InvalidOrigin::Host)?;
        let host = &rest[..close + 2];
        let tail = &after_bracket[close + 1..];
        return match tail {
            "" => Ok((host, None)),
            t => t
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or(InvalidOrigin::Host),
        };
    }
    match rest.rsplit_once(':') {
        Some((host, port)) => Ok((host, Some(port))),
        None => Ok((rest, None)),
    }
}

/// A host as a browser serializes it: lowercase DNS name (IDNs as punycode), IPv4, or `[IPv6]`.
fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok()
            && inner.bytes().all(|b| !b.is_ascii_uppercase());
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_origins() {
        for ok in [
            "https://portal.example",
            "https://portal.example:8443",
            "https://127.0.0.1",
            "https://[::1]:4443",
            "https://xn--bcher-kva.example",
        ] {
            assert_eq!(Origin::parse(ok, false).unwrap().as_str(), ok);
        }
        assert!(Origin::parse("http://localhost:3000", true).is_ok());
        assert!(Origin::parse("http://127.0.0.1", true).is_ok());
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "null",
            "",
            "https://",
            "https://portal.example/",
            "https://portal.example/path",
            "https://Portal.example",
            "https://portal.example:443",
            "https://portal.example:0",
            "https://portal.example:08443",
            "https://portal.example:65536",
            "https://user@portal.example",
            "https://portal.example?x",
            "https://portal.example#x",
            "https://portal..example",
            "https://portal.example.",
            "wss://portal.example",
            "file://",
            "http://portal.example",
            "http://localhost:3000",
            "https://[::1",
            "https://[::1]x",
            " https://portal.example",
        ] {
            assert!(Origin::parse(bad, false).is_err(), "{bad:?} accepted");
        }
        for bad in [
            "http://localhost.evil.test",
            "http://localhost:80",
            "http://[::1]:3000",
        ] {
            assert!(Origin::parse(bad, true).is_err(), "{bad:?} accepted");
        }
    }
}
