//! Enrolment jobs (see `crate::keygen`): C_GenerateKeyPair and the key's CKA_ID, one signature
//! by a key that has no certificate yet, and C_CreateObject of the issued certificate beside its
//! key. Each logs in once with the job's credential, like a signing job.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeType, CertificateType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use der::{Decode as _, Encode as _};

use super::sign::{check_ecdsa_len, check_key, plan};
use super::{key_objects, Worker};
use crate::algorithm::{check_input, ecdsa_p1363_to_der, EcdsaEncoding, SignAlgorithm};
use crate::certificate::{CertificateId, KeyAlgorithm, ParsedCertificate};
use crate::error::{from_cryptoki, Error};
use crate::keygen::{
    ec_spki, key_id, rsa_spki, DeleteCertificateRequest, DeleteKeyRequest, EnrolJob,
    GenerateRequest, GeneratedKey, ImportMode, ImportRequest, Imported, KeySignRequest, KeySpec,
    Removed,
};
use crate::pin::{Credential, LoginKind};
use crate::token::TokenId;

impl Worker {
    pub(super) fn generate(
        &mut self,
        job: EnrolJob<GenerateRequest>,
    ) -> Result<GeneratedKey, Error> {
        let EnrolJob { req, credential } = job;
        let span = tracing::info_span!("generate", token = %req.token, key = %req.spec.wire_name());
        let _entered = span.enter();
        let result = self.generate_on(&req, &credential);
        drop(credential);
        self.end_job(&req.token, &result, req.logout_after);
        match &result {
            Ok(key) => tracing::info!(key = %key.id, "key pair generated"),
            Err(e) => tracing::info!(error = %e, "no key generated"),
        }
        result
    }

    pub(super) fn sign_with_key(
        &mut self,
        job: EnrolJob<KeySignRequest>,
    ) -> Result<Vec<u8>, Error> {
        let EnrolJob { req, credential } = job;
        let span =
            tracing::info_span!("sign_with_key", key = %req.key, algorithm = %req.algorithm.name());
        let _entered = span.enter();
        let token = req.key.token_id().clone();
        let result = self.sign_with_key_on(&token, &req, &credential);
        drop(credential);
        self.end_job(&token, &result, req.logout_after);
        result
    }

    pub(super) fn import(&mut self, job: EnrolJob<ImportRequest>) -> Result<Imported, Error> {
        let EnrolJob { req, credential } = job;
        let span = tracing::info_span!("import", token = %req.token);
        let _entered = span.enter();
        let result = self.import_on(&req, &credential);
        drop(credential);
        self.end_job(&req.token, &result, req.logout_after);
        match &result {
            Ok(i) => {
                tracing::info!(certificate = %i.certificate.id, stored = i.stored, replaced = i.replaced, "certificate imported")
            }
            Err(e) => tracing::info!(error = %e, "no certificate imported"),
        }
        result
    }

    pub(super) fn delete_certificate(
        &mut self,
        job: EnrolJob<DeleteCertificateRequest>,
    ) -> Result<Removed, Error> {
        let EnrolJob { req, credential } = job;
        let span = tracing::info_span!("delete_certificate", certificate = %req.certificate);
        let _entered = span.enter();
        let token = req.certificate.token_id().clone();
        let result = self.delete_certificate_on(&token, &req, &credential);
        drop(credential);
        self.end_job(&token, &result, req.logout_after);
        match &result {
            Ok(r) => tracing::info!(kept = %r.kept, "certificate deleted"),
            Err(e) => tracing::info!(error = %e, "no certificate deleted"),
        }
        result
    }

    fn delete_certificate_on(
        &mut self,
        token: &TokenId,
        req: &DeleteCertificateRequest,
        credential: &Credential,
    ) -> Result<Removed, Error> {
        let found = self.find(token)?;
        let found = self.ensure_user_login(token, found, credential)?;
        if let Some(state) = self.tokens.get_mut(token) {
            state.entries = None;
        }
        let entries = self.entries_at(token, &found)?;
        let gone = entries
            .iter()
            .find(|e| req.certificate.names(&e.info.id, &e.info.der))
            .ok_or_else(|| Error::CertificateNotFound(req.certificate.clone()))?;
        let cka_id = gone.info.id.cka_id().unwrap_or_default();
        // Only a certificate another one of the same key stays beside: the key keeps one.
        let kept = entries
            .iter()
            .find(|e| {
                !cka_id.is_empty()
                    && e.info.id.key() == gone.info.id.key()
                    && e.info.der != gone.info.der
                    && e.private_key.is_some()
            })
            .ok_or_else(|| Error::OnlyCertificate(gone.info.id.clone()))?;
        let kept_id = CertificateId::exact(token, &cka_id, &kept.info.der);
        let (der, listed) = (gone.info.der.clone(), gone.info.id.clone());
        let rw = self
            .ctx
            .open_rw_session(found.slot)
            .map_err(from_cryptoki)?;
        let handles = rw
            .find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Id(cka_id.clone()),
            ])
            .map_err(from_cryptoki)?;
        let mut deleted = 0;
        for handle in handles {
            let value = rw
                .get_attributes(handle, &[AttributeType::Value])
                .map_err(from_cryptoki)?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(v),
                    _ => None,
                });
            if value.as_deref() == Some(der.as_slice()) {
                rw.destroy_object(handle).map_err(from_cryptoki)?;
                deleted += 1;
            }
        }
        drop(rw);
        if let Some(state) = self.tokens.get_mut(token) {
            state.entries = None;
        }
        if deleted == 0 {
            return Err(Error::CertificateNotFound(listed));
        }
        let found = self.find(token)?;
        let kept = self.entry_at(&kept_id, &found)?.info.id.clone();
        Ok(Removed {
            certificate: listed,
            kept,
        })
    }

    pub(super) fn delete_new_key(&mut self, job: EnrolJob<DeleteKeyRequest>) -> Result<(), Error> {
        let EnrolJob { req, credential } = job;
        let token = req.key.token_id().clone();
        let result = self.delete_new_key_on(&token, &req, &credential);
        drop(credential);
        self.end_job(&token, &result, req.logout_after);
        match &result {
            Ok(()) => tracing::info!(key = %req.key, "new key pair destroyed"),
            Err(e) => {
                tracing::warn!(key = %req.key, error = %e, "the new key pair could not be destroyed")
            }
        }
        result
    }

    fn delete_new_key_on(
        &mut self,
        token: &TokenId,
        req: &DeleteKeyRequest,
        credential: &Credential,
    ) -> Result<(), Error> {
        let cka_id = req
            .key
            .cka_id()
            .ok_or_else(|| Error::InvalidInput("a key is named by its CKA_ID".to_owned()))?;
        let found = self.find(token)?;
        let found = self.ensure_user_login(token, found, credential)?;
        let session = self
            .ctx
            .open_rw_session(found.slot)
            .map_err(from_cryptoki)?;
        let with_id = |class| {
            session
                .find_objects(&[Attribute::Class(class), Attribute::Id(cka_id.clone())])
                .map_err(from_cryptoki)
        };
        if !with_id(ObjectClass::CERTIFICATE)?.is_empty() {
            return Err(Error::CertificateExists {
                existing: req.key.clone(),
            });
        }
        let private = with_id(ObjectClass::PRIVATE_KEY)?;
        if private.is_empty() {
            return Err(Error::KeyNotFound);
        }
        for handle in private.into_iter().chain(with_id(ObjectClass::PUBLIC_KEY)?) {
            session.destroy_object(handle).map_err(from_cryptoki)?;
        }
        Ok(())
    }

    /// Whether the token in `slot` can generate `spec` keys: the mechanism is listed (or the
    /// list is unknown) and, for RSA, the size is within what C_GetMechanismInfo says.
    pub(super) fn check_generation(
        &mut self,
        token: &TokenId,
        slot: cryptoki::slot::Slot,
        spec: KeySpec,
    ) -> Result<(), Error> {
        let (_, mechanism_type) = generation_mechanism(spec);
        let cannot = || Error::MechanismNotSupported {
            algorithm: format!("{} key generation", spec.wire_name()),
            key: "no".to_owned(),
        };
        let mechanisms = self.mechanisms_at(token, slot)?;
        if !mechanisms.is_empty() && !mechanisms.contains(&mechanism_type) {
            return Err(cannot());
        }
        if let KeySpec::Rsa { bits } = spec {
            // A module that will not say is not held to it.
            if let Ok(info) = self.ctx.get_mechanism_info(slot, mechanism_type) {
                let bits = bits as usize;
                if bits < info.min_key_size()
                    || (info.max_key_size() > 0 && bits > info.max_key_size())
                {
                    return Err(cannot());
                }
            }
        }
        Ok(())
    }

    /// After an enrolment job: objects may have changed (the scan is dropped); a removal drops
    /// the token; another failure continues in a fresh session (an operation may be active);
    /// then the logout the job asked for.
    fn end_job<T>(&mut self, token: &TokenId, result: &Result<T, Error>, logout_after: bool) {
        if let Some(state) = self.tokens.get_mut(token) {
            state.entries = None;
        }
        if let Err(e) = result {
            if e.is_removal() {
                self.forget(token);
            } else if !matches!(
                e,
                Error::InvalidInput(_)
                    | Error::MechanismNotSupported { .. }
                    | Error::LoginRequired { .. }
                    | Error::Certificate(_)
            ) {
                self.renew_session(token);
            }
        }
        if logout_after {
            if let Err(e) = self.logout(token) {
                tracing::warn!(token = %token, error = %e, "C_Logout after the request failed");
            }
        }
    }

    fn generate_on(
        &mut self,
        req: &GenerateRequest,
        credential: &Credential,
    ) -> Result<GeneratedKey, Error> {
        let token = &req.token;
        if req.label.trim().is_empty() {
            return Err(Error::InvalidInput("a new key needs a label".to_owned()));
        }
        let found = self.find(token)?;
        let (mechanism, _) = generation_mechanism(req.spec);
        // Refused before any login when the token says it cannot.
        self.check_generation(token, found.slot, req.spec)?;
        let found = self.ensure_user_login(token, found, credential)?;
        let session = self
            .ctx
            .open_rw_session(found.slot)
            .map_err(from_cryptoki)?;

        let label = req.label.as_bytes().to_vec();
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Label(label.clone()),
        ];
        let mut private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label),
        ];
        if req.always_authenticate {
            private.push(Attribute::AlwaysAuthenticate(true));
        }
        match req.spec {
            KeySpec::Rsa { bits } => {
                public.push(Attribute::ModulusBits(Ulong::from(u64::from(bits))));
                public.push(Attribute::PublicExponent(vec![1, 0, 1]));
            }
            KeySpec::EcP256 | KeySpec::EcP384 => {
                let curve = req
                    .spec
                    .curve()
                    .ok_or_else(|| Error::InvalidInput("not an EC key".to_owned()))?;
                public.push(Attribute::EcParams(
                    curve.to_der().map_err(Error::Encoding)?,
                ));
            }
            KeySpec::Ed25519 => {
                // RFC 8410's OID as the curve (PKCS#11 3.0 also allows the printable name).
                public.push(Attribute::EcParams(
                    const_oid::db::rfc8410::ID_ED_25519
                        .to_der()
                        .map_err(Error::Encoding)?,
                ));
            }
        }
        let (pub_handle, priv_handle) = session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(from_cryptoki)?;
        // From here a failure leaves no half-made key behind.
        match finish_key_pair(&session, req.spec, pub_handle, priv_handle) {
            Ok((public_key_der, cka_id, always_authenticate)) => Ok(GeneratedKey {
                id: CertificateId::new(token, &cka_id, &public_key_der),
                public_key_der,
                cka_id,
                always_authenticate,
            }),
            Err(e) => {
                for handle in [priv_handle, pub_handle] {
                    if let Err(d) = session.destroy_object(handle) {
                        tracing::warn!(error = %d, "C_DestroyObject of a half-made key failed");
                    }
                }
                Err(e)
            }
        }
    }

    fn sign_with_key_on(
        &mut self,
        token: &TokenId,
        req: &KeySignRequest,
        credential: &Credential,
    ) -> Result<Vec<u8>, Error> {
        check_input(req.algorithm, &req.input)?;
        let cka_id = req
            .key
            .cka_id()
            .ok_or_else(|| Error::InvalidInput("a key is named by its CKA_ID".to_owned()))?;
        let found = self.find(token)?;
        let mechanisms = self.mechanisms_at(token, found.slot)?;
        let planned = plan(req.algorithm, &req.input, &mechanisms)?;
        let mut found = self.ensure_user_login(token, found, credential)?;
        let session = self.session_at(token, found.slot)?;
        let key = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Id(cka_id),
            ])
            .map_err(from_cryptoki)?
            .into_iter()
            .next()
            .ok_or(Error::KeyNotFound)?;
        let (key_alg, always_auth) = key_algorithm_of(session, key)?;
        check_key(req.algorithm, key_alg)?;
        let raw = if always_auth {
            if !credential.is_some() {
                return Err(Error::LoginRequired {
                    kind: LoginKind::ContextSpecific,
                    pin: super::pin_status(&found.info),
                    pin_pad: found.info.protected_authentication_path(),
                });
            }
            self.sign_always_authenticate(token, &mut found, key, &planned, credential)?
        } else {
            self.cached_session(token)?
                .sign(&planned.mech.to_cryptoki(), key, &planned.data)
                .map_err(from_cryptoki)?
        };
        match req.algorithm {
            SignAlgorithm::Ecdsa(_, EcdsaEncoding::Der) => {
                check_ecdsa_len(&raw, key_alg)?;
                ecdsa_p1363_to_der(&raw)
            }
            SignAlgorithm::Ecdsa(_, EcdsaEncoding::P1363) => {
                check_ecdsa_len(&raw, key_alg)?;
                Ok(raw)
            }
            _ => Ok(raw),
        }
    }

    fn import_on(
        &mut self,
        req: &ImportRequest,
        credential: &Credential,
    ) -> Result<Imported, Error> {
        let token = &req.token;
        // Everything about the certificate is checked before the token is touched.
        let parsed = ParsedCertificate::parse(&req.der)?;
        let cert = x509_cert::Certificate::from_der(&req.der).map_err(Error::Certificate)?;
        let tbs = cert.tbs_certificate();
        let subject = tbs.subject().to_der().map_err(Error::Encoding)?;
        let issuer = tbs.issuer().to_der().map_err(Error::Encoding)?;
        let serial = tbs.serial_number().to_der().map_err(Error::Encoding)?;

        let found = self.find(token)?;
        let found = self.ensure_user_login(token, found, credential)?;
        let session = self.session_at(token, found.slot)?;
        // The private key whose public key the certificate carries: by its own public material
        // (RSA private keys carry the modulus), else through the public key object of the pair
        // (EC private keys rarely carry CKA_EC_POINT).
        let private_keys = key_objects(session, ObjectClass::PRIVATE_KEY)?;
        let public_keys = key_objects(session, ObjectClass::PUBLIC_KEY)?;
        let paired_ids: Vec<&[u8]> = public_keys
            .iter()
            .filter(|k| !k.id.is_empty() && k.matches(&[], &parsed.public_key))
            .map(|k| k.id.as_slice())
            .collect();
        let key = private_keys
            .iter()
            .find(|k| k.matches(&[], &parsed.public_key))
            .or_else(|| {
                private_keys
                    .iter()
                    .find(|k| paired_ids.contains(&k.id.as_slice()))
            })
            .ok_or(Error::NoMatchingKey)?;
        let cka_id = key.id.clone();
        let label = session
            .get_attributes(key.handle, &[AttributeType::Label])
            .map_err(from_cryptoki)?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Label(l) => Some(l),
                _ => None,
            })
            .unwrap_or_default();

        // The key's certificates now: the same one again changes nothing; another one stays
        // beside the new one (both listed) unless the request says to replace it.
        let mut older = Vec::new();
        if !cka_id.is_empty() {
            for handle in session
                .find_objects(&[
                    Attribute::Class(ObjectClass::CERTIFICATE),
                    Attribute::Id(cka_id.clone()),
                ])
                .map_err(from_cryptoki)?
            {
                let value = session
                    .get_attributes(handle, &[AttributeType::Value])
                    .map_err(from_cryptoki)?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Value(v) => Some(v),
                        _ => None,
                    })
                    .unwrap_or_default();
                if value == req.der {
                    let certificate = self.imported_entry(token, &cka_id, &req.der)?;
                    return Ok(Imported {
                        certificate,
                        stored: false,
                        replaced: false,
                    });
                }
                older.push((handle, value));
            }
        }
        if req.mode == ImportMode::KeepExisting {
            older.clear();
        }

        let rw = self
            .ctx
            .open_rw_session(found.slot)
            .map_err(from_cryptoki)?;
        rw.create_object(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Label(label),
            Attribute::Id(cka_id.clone()),
            Attribute::Subject(subject),
            Attribute::Issuer(issuer),
            Attribute::SerialNumber(serial),
            Attribute::Value(req.der.clone()),
        ])
        .map_err(from_cryptoki)?;
        // The old certificate goes only once the new one is stored.
        for (handle, _) in &older {
            rw.destroy_object(*handle).map_err(from_cryptoki)?;
        }
        drop(rw);
        let certificate = self.imported_entry(token, &cka_id, &req.der)?;
        Ok(Imported {
            certificate,
            stored: true,
            replaced: !older.is_empty(),
        })
    }

    /// The certificate as `certificates` lists it, after the objects changed.
    fn imported_entry(
        &mut self,
        token: &TokenId,
        cka_id: &[u8],
        der: &[u8],
    ) -> Result<crate::certificate::CertificateInfo, Error> {
        if let Some(state) = self.tokens.get_mut(token) {
            state.entries = None;
        }
        // The exact id names it whether it is listed under the key's id or its own.
        let id = if cka_id.is_empty() {
            CertificateId::new(token, cka_id, der)
        } else {
            CertificateId::exact(token, cka_id, der)
        };
        let found = self.find(token)?;
        self.entry_at(&id, &found).map(|e| e.info.clone())
    }
}

/// The key-pair generation mechanism for a key type.
fn generation_mechanism(spec: KeySpec) -> (Mechanism<'static>, MechanismType) {
    match spec {
        KeySpec::EcP256 | KeySpec::EcP384 => {
            (Mechanism::EccKeyPairGen, MechanismType::ECC_KEY_PAIR_GEN)
        }
        KeySpec::Rsa { .. } => (
            Mechanism::RsaPkcsKeyPairGen,
            MechanismType::RSA_PKCS_KEY_PAIR_GEN,
        ),
        KeySpec::Ed25519 => (
            Mechanism::EccEdwardsKeyPairGen,
            MechanismType::ECC_EDWARDS_KEY_PAIR_GEN,
        ),
    }
}

/// After C_GenerateKeyPair: the public key (SPKI), its CKA_ID set on both halves, and whether
/// the token kept CKA_ALWAYS_AUTHENTICATE.
fn finish_key_pair(
    session: &Session,
    spec: KeySpec,
    public: ObjectHandle,
    private: ObjectHandle,
) -> Result<(Vec<u8>, Vec<u8>, bool), Error> {
    let spki = match spec {
        KeySpec::Rsa { .. } => {
            let (mut n, mut e) = (Vec::new(), Vec::new());
            for a in session
                .get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(from_cryptoki)?
            {
                match a {
                    Attribute::Modulus(v) => n = v,
                    Attribute::PublicExponent(v) => e = v,
                    _ => {}
                }
            }
            rsa_spki(&n, &e)?
        }
        _ => {
            let point = session
                .get_attributes(public, &[AttributeType::EcPoint])
                .map_err(from_cryptoki)?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcPoint(p) => Some(p),
                    _ => None,
                })
                .ok_or_else(|| Error::InvalidInput("the new key has no CKA_EC_POINT".to_owned()))?;
            ec_spki(spec, &point)?
        }
    };
    let cka_id = key_id(&spki)?;
    for handle in [public, private] {
        session
            .update_attributes(handle, &[Attribute::Id(cka_id.clone())])
            .map_err(from_cryptoki)?;
    }
    let always_authenticate = session
        .get_attributes(private, &[AttributeType::AlwaysAuthenticate])
        .map_err(from_cryptoki)?
        .into_iter()
        .any(|a| matches!(a, Attribute::AlwaysAuthenticate(true)));
    Ok((spki, cka_id, always_authenticate))
}

/// A private key's algorithm (from CKA_KEY_TYPE and CKA_EC_PARAMS or CKA_MODULUS) and its
/// CKA_ALWAYS_AUTHENTICATE.
fn key_algorithm_of(session: &Session, key: ObjectHandle) -> Result<(KeyAlgorithm, bool), Error> {
    let mut key_type = None;
    let mut always = false;
    for a in session
        .get_attributes(
            key,
            &[AttributeType::KeyType, AttributeType::AlwaysAuthenticate],
        )
        .map_err(from_cryptoki)?
    {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::AlwaysAuthenticate(b) => always = b,
            _ => {}
        }
    }
    let unsupported = || Error::MechanismNotSupported {
        algorithm: "a signature".to_owned(),
        key: "this kind of".to_owned(),
    };
    let alg = match key_type {
        Some(KeyType::RSA) => {
            let n = session
                .get_attributes(key, &[AttributeType::Modulus])
                .map_err(from_cryptoki)?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Modulus(n) => Some(n),
                    _ => None,
                })
                .unwrap_or_default();
            let significant = n.iter().skip_while(|b| **b == 0).count();
            let bits = u32::try_from(significant * 8).map_err(|_| unsupported())?;
            KeyAlgorithm::Rsa { bits }
        }
        Some(KeyType::EC) => {
            let params = session
                .get_attributes(key, &[AttributeType::EcParams])
                .map_err(from_cryptoki)?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::EcParams(p) => Some(p),
                    _ => None,
                })
                .unwrap_or_default();
            match const_oid::ObjectIdentifier::from_der(&params) {
                Ok(const_oid::db::rfc5912::SECP_256_R_1) => KeyAlgorithm::EcP256,
                Ok(const_oid::db::rfc5912::SECP_384_R_1) => KeyAlgorithm::EcP384,
                Ok(const_oid::db::rfc5912::SECP_521_R_1) => KeyAlgorithm::EcP521,
                _ => return Err(unsupported()),
            }
        }
        Some(KeyType::EC_EDWARDS) => KeyAlgorithm::Ed25519,
        _ => return Err(unsupported()),
    };
    Ok((alg, always))
}
