//! `tokens.list` and `certificates.list`: the filter, and the protocol's entries for tokens and
//! certificates.

use crate::backend::{CertificateInfo, KeyAlgorithm, KeyUsage};
use browser_bridge::protocol::Answer;
use browser_bridge::protocol::{
    self, Base64Bytes, CertificateEntry, CertificateFilter, CertificatesListParams,
    CertificatesListResult, KeyUsage as WireKeyUsage, PinState as WirePinState, Timestamp,
    TokenEntry, TokensListResult, ValidAt,
};
use serde_json::Value;

use crate::tokens::TokenView;

use super::{blocking, Failure, Service};

impl Service {
    pub(super) async fn tokens_list(&self) -> Result<Answer, Failure> {
        let tokens = self.tokens.clone();
        let list = blocking(move || tokens.tokens()).await?;
        Ok(Answer::of(&TokensListResult {
            tokens: list.iter().map(token_entry).collect(),
        }))
    }

    pub(super) async fn certificates_list(
        &self,
        p: CertificatesListParams,
    ) -> Result<Answer, Failure> {
        let certs = self.certificates_cached().await?;
        let filter = p.filter.unwrap_or_default();
        let now = time::OffsetDateTime::now_utc();
        let certificates = certs
            .iter()
            .filter(|c| matches_filter(&c.info, &filter, now))
            .filter_map(|c| certificate_entry(&c.info))
            .collect();
        Ok(Answer::of(&CertificatesListResult { certificates }))
    }
}

impl Service {
    /// Every certificate, from the token set's cache when nothing changed since it was filled
    /// (no hop, no module call), else listed on a blocking thread (issue 12).
    pub(super) async fn certificates_cached(
        &self,
    ) -> Result<std::sync::Arc<Vec<crate::tokens::CertificateView>>, Failure> {
        if let Some(certs) = self.tokens.cached_certificates() {
            return Ok(certs);
        }
        let tokens = self.tokens.clone();
        blocking(move || tokens.certificates_cached()).await
    }
}

/// The protocol's entry for a certificate; `None` for a key size the protocol cannot name.
pub fn certificate_entry(c: &CertificateInfo) -> Option<CertificateEntry> {
    Some(CertificateEntry {
        id: c.id.to_string(),
        token_id: c.token_id.to_string(),
        certificate: Base64Bytes(c.der.clone()),
        subject: c.subject.clone(),
        issuer: c.issuer.clone(),
        serial_number: c.serial_hex.clone(),
        not_before: Timestamp(c.not_before),
        not_after: Timestamp(c.not_after),
        key_algorithm: wire_key_algorithm(c.key_algorithm)?,
        key_usage: c
            .key_usage
            .iter()
            .filter_map(|k| wire_key_usage(*k))
            .collect(),
        extended_key_usage: c.extended_key_usage.clone(),
    })
}

/// The protocol's entry for a token.
pub fn token_entry(t: &TokenView) -> TokenEntry {
    TokenEntry {
        id: t.info.id.to_string(),
        label: t.info.label.trim().to_owned(),
        manufacturer: t.info.manufacturer.trim().to_owned(),
        model: t.info.model.trim().to_owned(),
        serial: t.info.serial.trim().to_owned(),
        reader: t.reader.clone(),
        pin_pad: t.info.pin_pad,
        pin: WirePinState {
            initialized: t.info.pin.initialized,
            count_low: t.info.pin.count_low,
            final_try: t.info.pin.final_try,
            locked: t.info.pin.locked,
        },
    }
}

fn matches_filter(c: &CertificateInfo, f: &CertificateFilter, now: time::OffsetDateTime) -> bool {
    if let Some(wanted) = &f.key_usage {
        let have: Vec<Option<WireKeyUsage>> =
            c.key_usage.iter().map(|k| wire_key_usage(*k)).collect();
        if !wanted.iter().all(|w| have.contains(&Some(*w))) {
            return false;
        }
    }
    if let Some(issuer) = &f.issuer {
        if !c.issuer.contains(issuer.as_str()) {
            return false;
        }
    }
    if let Some(subject) = &f.subject {
        if !c.subject.contains(subject.as_str()) {
            return false;
        }
    }
    if let Some(at) = &f.valid_at {
        let t = match at {
            ValidAt::Now(_) => now,
            ValidAt::At(Timestamp(t)) => *t,
        };
        if t < c.not_before || t > c.not_after {
            return false;
        }
    }
    if let Some(algs) = &f.key_algorithm {
        let Some(alg) = wire_key_algorithm(c.key_algorithm) else {
            return false;
        };
        if !algs.iter().any(|a| a.matches(alg)) {
            return false;
        }
    }
    if let Some(token) = &f.token_id {
        if c.token_id.as_str() != token {
            return false;
        }
    }
    true
}

fn wire_key_usage(k: KeyUsage) -> Option<WireKeyUsage> {
    serde_json::from_value(Value::String(k.rfc5280_name().to_owned())).ok()
}

fn wire_key_algorithm(k: KeyAlgorithm) -> Option<protocol::KeyAlgorithm> {
    serde_json::from_value(Value::String(k.wire_name())).ok()
}
