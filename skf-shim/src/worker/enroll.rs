//! The enrollment jobs on the worker thread: SM2 key generation and certificate import (what
//! they promise is in `crate::enroll` and on the `Library` methods).

use std::sync::Arc;

use crate::certificate::{CertificateId, CertificateInfo, KeyAlgorithm, ParsedCertificate};
use crate::enroll::{container_name, sm2_spki, GeneratedKey, ImportMode, NewContainer};
use crate::error::Error;
use crate::ffi::{
    ContainerHandle, ContainerType, Sar, SAR_CERTNOTFOUNTERR, SAR_FILE_ALREADY_EXIST,
    SAR_FILE_NOT_EXIST, SAR_USER_NOT_LOGGED_IN,
};
use crate::token::{ApplicationId, TokenId};

use super::{read_container, ContainerError, Worker};

/// How many fresh names [`NewContainer::Generated`] tries before giving up.
const NAME_TRIES: u32 = 8;

impl Worker {
    pub(super) fn generate_sm2(
        &mut self,
        app: &ApplicationId,
        container: &NewContainer,
        pin: &str,
    ) -> Result<GeneratedKey, Error> {
        if let NewContainer::Named(name) = container {
            if name.is_empty() || name.contains(&0) {
                return Err(Error::InvalidInput(
                    "a container name is non-empty and has no NUL byte".to_owned(),
                ));
            }
        }
        // Probes the key, then exactly one SKF_VerifyPIN (none when locked). Nothing exists
        // yet, so a wrong or locked PIN leaves the key as it was.
        self.verify_pin(app, pin)?;
        let skf = Arc::clone(&self.skf);
        let existing = {
            let handle = self.app(app)?;
            skf.containers(handle)
        }
        .map_err(|e| self.failed(app.token(), e))?;
        let (name, c, created) = match container {
            NewContainer::Named(name) if existing.contains(name) => {
                (name.clone(), self.open_empty(app, name)?, false)
            }
            NewContainer::Named(name) => (name.clone(), self.create(app, name)?, true),
            NewContainer::Generated => {
                let name = (0..NAME_TRIES)
                    .map(container_name)
                    .find(|n| !existing.contains(n))
                    .ok_or_else(|| Error::InvalidInput("no free container name".to_owned()))?;
                let c = self.create(app, &name)?;
                (name, c, true)
            }
        };
        let generated = skf.gen_sm2_key_pair(&c);
        skf.close_container(c);
        let id = CertificateId::from_raw(app.clone(), &name);
        let answer = match generated {
            Ok(point) => sm2_spki(&point).map(|public_key_der| GeneratedKey {
                id,
                public_key_der,
                created_container: created,
            }),
            Err(sar) => Err(self.enroll_failed(app, sar)),
        };
        if answer.is_err() && created {
            // Leave no empty or half-made container behind.
            self.remove_container(app, &name);
        }
        answer
    }

    pub(super) fn import_certificate(
        &mut self,
        id: &CertificateId,
        der: &[u8],
        mode: ImportMode,
    ) -> Result<CertificateInfo, Error> {
        let parsed = ParsedCertificate::parse(der).map_err(|e| match e {
            Error::Certificate(e) => {
                Error::InvalidInput(format!("not an X.509 certificate (DER): {e}"))
            }
            // A key type the shim does not sign with (P-256, Ed25519…): not this key's.
            Error::MechanismNotSupported { .. } => Error::CertificateNotForKey(id.clone()),
            other => other,
        })?;
        let app = id.application().clone();
        let token = app.token().clone();
        self.find(&token)?;
        let skf = Arc::clone(&self.skf);
        let names = {
            let handle = self.app(&app)?;
            skf.containers(handle)
        }
        .map_err(|e| self.failed(&token, e))?;
        if !names.iter().any(|n| n.as_slice() == id.raw_container()) {
            return Err(Error::ContainerNotFound(id.clone()));
        }
        let c = {
            let handle = self.app(&app)?;
            skf.open_container(handle, id.raw_container())
        }
        .map_err(|e| self.failed(&token, e))?;
        let result = self.import_into(&c, id, der, &parsed, mode);
        skf.close_container(c);
        result
    }

    fn import_into(
        &mut self,
        c: &ContainerHandle,
        id: &CertificateId,
        der: &[u8],
        parsed: &ParsedCertificate,
        mode: ImportMode,
    ) -> Result<CertificateInfo, Error> {
        let skf = Arc::clone(&self.skf);
        let app = id.application();
        match skf.container_type(c) {
            Ok(ContainerType::Ecc) => {}
            Ok(ContainerType::Rsa) => {
                return Err(Error::MechanismNotSupported {
                    algorithm: "certificate import".to_owned(),
                    key: "RSA".to_owned(),
                })
            }
            // An empty container has no key a certificate could be for.
            Ok(_) => return Err(Error::CertificateNotForKey(id.clone())),
            Err(sar) => return Err(self.failed(app.token(), sar)),
        }
        if parsed.key_algorithm != KeyAlgorithm::Sm2 {
            return Err(Error::CertificateNotForKey(id.clone()));
        }
        let point = skf
            .sm2_public_key(c)
            .map_err(|sar| self.failed(app.token(), sar))?;
        if point.as_slice() != parsed.public_key.as_slice() {
            return Err(Error::CertificateNotForKey(id.clone()));
        }
        let already = match skf.certificate(c, true) {
            Ok(old) if !old.is_empty() => Some(old),
            Ok(_) => None,
            Err(sar) if sar.code == SAR_CERTNOTFOUNTERR || sar.code == SAR_FILE_NOT_EXIST => None,
            Err(sar) => return Err(self.failed(app.token(), sar)),
        };
        match already {
            Some(old) if old == der => {} // the same certificate: nothing to write
            Some(_) if mode == ImportMode::KeepExisting => {
                let existing = match read_container(&skf, c, id.clone()) {
                    Ok(listed) => listed.map(Box::new),
                    Err(ContainerError::Sar(sar)) => return Err(self.failed(app.token(), sar)),
                    Err(ContainerError::Other(_)) => None,
                };
                return Err(Error::CertificateSlotTaken {
                    container: id.clone(),
                    existing,
                });
            }
            _ => skf
                .import_certificate(c, true, der)
                .map_err(|sar| self.enroll_failed(app, sar))?,
        }
        match read_container(&skf, c, id.clone()) {
            Ok(Some(info)) => Ok(info),
            Ok(None) => Err(Error::Encoding(
                "the key did not keep the certificate it accepted".to_owned(),
            )),
            Err(ContainerError::Sar(sar)) => Err(self.failed(app.token(), sar)),
            Err(ContainerError::Other(e)) => Err(e),
        }
    }

    pub(super) fn key_container(
        &mut self,
        token: &TokenId,
        public_key: &[u8],
    ) -> Result<Option<CertificateId>, Error> {
        self.find(token)?;
        let apps = {
            let d = self.device(token)?;
            self.skf.applications(&d.handle)
        }
        .map_err(|e| self.failed(token, e))?;
        let skf = Arc::clone(&self.skf);
        for app_name in apps {
            let app = ApplicationId::from_raw(token.clone(), &app_name);
            let containers = {
                let handle = self.app(&app)?;
                skf.containers(handle)
            }
            .map_err(|e| self.failed(token, e))?;
            for name in containers {
                let c = {
                    let handle = self.app(&app)?;
                    skf.open_container(handle, &name)
                }
                .map_err(|e| self.failed(token, e))?;
                let point = match skf.container_type(&c) {
                    Ok(ContainerType::Ecc) => skf.sm2_public_key(&c).map(Some),
                    Ok(_) => Ok(None),
                    Err(sar) => Err(sar),
                };
                skf.close_container(c);
                match point {
                    Ok(Some(point)) if point.as_slice() == public_key => {
                        return Ok(Some(CertificateId::from_raw(app, &name)));
                    }
                    Ok(_) => {}
                    Err(sar) => {
                        let e = self.failed(token, sar);
                        if e.is_removal() {
                            return Err(e);
                        }
                        tracing::debug!(container = %String::from_utf8_lossy(&name), error = %e, "container skipped");
                    }
                }
            }
        }
        Ok(None)
    }

    pub(super) fn delete_new_container(&mut self, id: &CertificateId) -> Result<(), Error> {
        let app = id.application().clone();
        let token = app.token().clone();
        self.find(&token)?;
        let skf = Arc::clone(&self.skf);
        let c = {
            let handle = self.app(&app)?;
            skf.open_container(handle, id.raw_container())
        }
        .map_err(|e| self.failed(&token, e))?;
        let existing = match skf.certificate(&c, true) {
            Ok(old) => !old.is_empty(),
            Err(sar) if sar.code == SAR_CERTNOTFOUNTERR || sar.code == SAR_FILE_NOT_EXIST => false,
            Err(sar) => {
                skf.close_container(c);
                return Err(self.failed(&token, sar));
            }
        };
        skf.close_container(c);
        if existing {
            return Err(Error::CertificateSlotTaken {
                container: id.clone(),
                existing: None,
            });
        }
        let deleted = {
            let handle = self.app(&app)?;
            skf.delete_container(handle, id.raw_container())
        };
        deleted.map_err(|sar| self.enroll_failed(&app, sar))
    }

    /// SKF_CreateContainer; a name the key says exists is [`Error::ContainerExists`].
    fn create(&mut self, app: &ApplicationId, name: &[u8]) -> Result<ContainerHandle, Error> {
        let skf = Arc::clone(&self.skf);
        let made = {
            let handle = self.app(app)?;
            skf.create_container(handle, name)
        };
        made.map_err(|sar| {
            if sar.code == SAR_FILE_ALREADY_EXIST {
                Error::ContainerExists(CertificateId::from_raw(app.clone(), name))
            } else {
                self.enroll_failed(app, sar)
            }
        })
    }

    /// Opens an existing container for a new key: only an empty one.
    fn open_empty(&mut self, app: &ApplicationId, name: &[u8]) -> Result<ContainerHandle, Error> {
        let skf = Arc::clone(&self.skf);
        let c = {
            let handle = self.app(app)?;
            skf.open_container(handle, name)
        }
        .map_err(|sar| self.failed(app.token(), sar))?;
        match skf.container_type(&c) {
            Ok(ContainerType::Empty) => Ok(c),
            Ok(_) => {
                skf.close_container(c);
                Err(Error::ContainerExists(CertificateId::from_raw(
                    app.clone(),
                    name,
                )))
            }
            Err(sar) => {
                skf.close_container(c);
                Err(self.failed(app.token(), sar))
            }
        }
    }

    /// SKF_DeleteContainer after a failed generation; a failure is only logged (the caller
    /// reports the generation's error).
    fn remove_container(&mut self, app: &ApplicationId, name: &[u8]) {
        let skf = Arc::clone(&self.skf);
        let deleted = match self.app(app) {
            Ok(handle) => skf
                .delete_container(handle, name)
                .map_err(crate::error::from_sar),
            Err(e) => Err(e),
        };
        if let Err(e) = deleted {
            tracing::warn!(
                container = %String::from_utf8_lossy(name),
                error = %e,
                "a container made for a failed key generation could not be deleted"
            );
        }
    }

    /// A failed enrollment call: a PIN the key no longer counts as verified is
    /// [`Error::NotLoggedIn`]; anything else as every other call.
    fn enroll_failed(&mut self, app: &ApplicationId, sar: Sar) -> Error {
        if sar.code == SAR_USER_NOT_LOGGED_IN {
            Error::NotLoggedIn(app.clone())
        } else {
            self.failed(app.token(), sar)
        }
    }
}
