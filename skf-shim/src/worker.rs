//! The worker thread that owns one SKF library's device and application handles. Nothing else
//! opens a handle (the handle types are not `Send`, so the compiler keeps them here).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::algorithm::{digest_info, sm2_e, sm2_signature, SignAlgorithm, SignInput, SignRequest};
use crate::certificate::{CertificateId, CertificateInfo, KeyAlgorithm, ParsedCertificate};
use crate::error::{from_sar, pin_failure, Error, SignFailure};
use crate::ffi::{
    AppHandle, ContainerHandle, ContainerType, DevHandle, DeviceInfo, Sar, Skf, Verify,
    SAR_APPLICATION_NOT_EXISTS, SAR_CERTNOTFOUNTERR, SAR_FILE_NOT_EXIST, SAR_INVALIDHANDLEERR,
    SAR_USER_NOT_LOGGED_IN,
};
use crate::library::{Pace, Request};

mod enroll;
use crate::token::{ApplicationId, ApplicationInfo, PinStatus, TokenId, TokenInfo};

pub(crate) struct Spawned {
    pub(crate) tx: mpsc::Sender<Request>,
    pub(crate) skf: Arc<Skf>,
    pub(crate) thread: JoinHandle<()>,
    pub(crate) finished: mpsc::Receiver<()>,
}

/// Starts the worker for the library at `path`; returns once it is loaded (or failed to), or
/// [`Error::Busy`] when that takes longer than `load_timeout`.
pub(crate) fn spawn(
    path: PathBuf,
    pace: Arc<Pace>,
    load_timeout: Duration,
) -> Result<Spawned, Error> {
    let (tx, rx) = mpsc::channel::<Request>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<Skf>, Error>>();
    let (finished_tx, finished) = mpsc::channel::<()>();
    let name = format!("skf:{}", path.display());
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let _finished = finished_tx;
            let skf = match open(&path) {
                Ok(skf) => Arc::new(skf),
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(Arc::clone(&skf)));
            let mut worker = Worker {
                skf,
                path,
                devices: HashMap::new(),
            };
            worker.run(rx, &pace);
        })
        .map_err(|_| Error::WorkerGone)?;
    match ready_rx.recv_timeout(load_timeout) {
        Ok(Ok(skf)) => Ok(Spawned {
            tx,
            skf,
            thread,
            finished,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Busy {
            waited: load_timeout,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::WorkerGone),
    }
}

/// Functions a library may lack and still be used: events then come from polling the token
/// list, RSA containers cannot sign, and keys cannot be enrolled (generate and import answer
/// the missing function's SAR_NOTSUPPORTYETERR).
const OPTIONAL_FUNCTIONS: [&str; 7] = [
    "SKF_WaitForDevEvent",
    "SKF_CancelWaitForDevEvent",
    "SKF_RSASignData",
    "SKF_CreateContainer",
    "SKF_DeleteContainer",
    "SKF_GenECCKeyPair",
    "SKF_ImportCertificate",
];

fn open(path: &Path) -> Result<Skf, Error> {
    let skf = Skf::load(path).map_err(|source| Error::LibraryLoad {
        path: path.to_path_buf(),
        source,
    })?;
    let missing: Vec<&'static str> = skf
        .missing()
        .into_iter()
        .filter(|f| !OPTIONAL_FUNCTIONS.contains(f))
        .collect();
    if missing.is_empty() {
        Ok(skf)
    } else {
        Err(Error::FunctionsMissing {
            path: path.to_path_buf(),
            missing,
        })
    }
}

/// A connected device and the applications opened on it.
struct Device {
    /// SKF_EnumDev's name, as bytes (it goes back to SKF_ConnectDev as is).
    name: Vec<u8>,
    handle: DevHandle,
    info: DeviceInfo,
    apps: HashMap<Vec<u8>, AppHandle>,
}

struct Worker {
    skf: Arc<Skf>,
    path: PathBuf,
    devices: HashMap<TokenId, Device>,
}

impl Worker {
    fn run(&mut self, rx: mpsc::Receiver<Request>, pace: &Pace) {
        while let Ok(req) = rx.recv() {
            self.handle(req);
            pace.finished_one();
        }
        let ids: Vec<TokenId> = self.devices.keys().cloned().collect();
        for id in ids {
            self.forget(&id);
        }
    }

    fn handle(&mut self, req: Request) {
        // A send fails only when the caller stopped waiting; nothing to do then.
        match req {
            Request::Tokens(reply) => {
                let _ = reply.send(self.tokens());
            }
            Request::Applications { token, reply } => {
                let _ = reply.send(self.applications(&token));
            }
            Request::Certificates { token, reply } => {
                let _ = reply.send(self.certificates(token.as_ref()));
            }
            Request::PinStatus { application, reply } => {
                let answer = self
                    .find(application.token())
                    .and_then(|()| self.pin_status(&application));
                let _ = reply.send(answer);
            }
            Request::VerifyPin {
                application,
                pin,
                reply,
            } => {
                let _ = reply.send(self.verify_pin(&application, pin.expose()));
            }
            Request::Sign {
                req,
                cancel,
                progress,
                started,
                reply,
            } => {
                if started.send(()).is_err() {
                    tracing::debug!("a signing request given up on before it started is dropped");
                    return;
                }
                let _ = reply.send(self.sign(&req, cancel.as_deref(), progress.as_ref()));
            }
            Request::Logout { application, reply } => {
                let _ = reply.send(self.logout(&application));
            }
            Request::GenerateSm2 {
                application,
                container,
                pin,
                reply,
            } => {
                let answer = self.generate_sm2(&application, &container, pin.expose());
                let _ = reply.send(answer);
            }
            Request::ImportCertificate {
                container,
                der,
                mode,
                reply,
            } => {
                let _ = reply.send(self.import_certificate(&container, &der, mode));
            }
            Request::KeyContainer {
                token,
                public_key,
                reply,
            } => {
                let _ = reply.send(self.key_container(&token, &public_key));
            }
            Request::DeleteNewContainer { container, reply } => {
                let _ = reply.send(self.delete_new_container(&container));
            }
        }
    }

    // ---- operations ----

    fn tokens(&mut self) -> Result<Vec<TokenInfo>, Error> {
        let names = self.skf.enum_dev().map_err(from_sar)?;
        // Probe what we hold; drop what is gone or renamed.
        let held: Vec<TokenId> = self.devices.keys().cloned().collect();
        for id in held {
            let keep = self
                .devices
                .get(&id)
                .is_some_and(|d| names.contains(&d.name) && self.skf.dev_info(&d.handle).is_ok());
            if !keep {
                self.forget(&id);
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some((id, d)) = self.devices.iter().find(|(_, d)| d.name == name) {
                out.push(describe(id, d));
                continue;
            }
            match self.connect(&name) {
                Ok(id) => {
                    if let Some(d) = self.devices.get(&id) {
                        out.push(describe(&id, d));
                    }
                }
                // Pulled between SKF_EnumDev and SKF_ConnectDev, or not a usable device.
                Err(e) => tracing::debug!(device = %show(&name), error = %e, "device skipped"),
            }
        }
        Ok(out)
    }

    fn applications(&mut self, token: &TokenId) -> Result<Vec<ApplicationInfo>, Error> {
        self.find(token)?;
        let names = {
            let d = self.device(token)?;
            self.skf.applications(&d.handle)
        }
        .map_err(|e| self.failed(token, e))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let id = ApplicationId::from_raw(token.clone(), &name);
            let pin = self.pin_status(&id)?;
            out.push(ApplicationInfo { id, pin });
        }
        Ok(out)
    }

    fn certificates(&mut self, token: Option<&TokenId>) -> Result<Vec<CertificateInfo>, Error> {
        let ids: Vec<TokenId> = match token {
            Some(id) => vec![id.clone()],
            None => self.tokens()?.into_iter().map(|t| t.id).collect(),
        };
        let mut out = Vec::new();
        for id in ids {
            match self.token_certificates(&id) {
                Ok(certs) => out.extend(certs),
                // Listing every token: one pulled meanwhile is simply not listed.
                Err(Error::TokenNotPresent | Error::TokenNotFound(_)) if token.is_none() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn token_certificates(&mut self, token: &TokenId) -> Result<Vec<CertificateInfo>, Error> {
        self.find(token)?;
        let apps = {
            let d = self.device(token)?;
            self.skf.applications(&d.handle)
        }
        .map_err(|e| self.failed(token, e))?;
        let skf = Arc::clone(&self.skf);
        let mut out = Vec::new();
        for app_name in apps {
            let app = ApplicationId::from_raw(token.clone(), &app_name);
            let containers = {
                let handle = self.app(&app)?;
                skf.containers(handle)
            }
            .map_err(|e| self.failed(token, e))?;
            for name in containers {
                match self.container_certificate(&app, &name) {
                    Ok(Some(info)) => out.push(info),
                    Ok(None) => {}
                    Err(e) if e.is_removal() => return Err(e),
                    Err(e) => {
                        tracing::debug!(container = %show(&name), error = %e, "container skipped");
                    }
                }
            }
        }
        Ok(out)
    }

    /// The container's signing certificate, if it has a usable one.
    fn container_certificate(
        &mut self,
        app: &ApplicationId,
        name: &[u8],
    ) -> Result<Option<CertificateInfo>, Error> {
        let token = app.token().clone();
        let skf = Arc::clone(&self.skf);
        let c = {
            let handle = self.app(app)?;
            skf.open_container(handle, name)
        }
        .map_err(|e| self.failed(&token, e))?;
        let result = read_container(&skf, &c, CertificateId::from_raw(app.clone(), name));
        skf.close_container(c);
        result.map_err(|e| match e {
            ContainerError::Sar(sar) => self.failed(&token, sar),
            ContainerError::Other(e) => e,
        })
    }

    fn pin_status(&mut self, app: &ApplicationId) -> Result<PinStatus, Error> {
        let skf = Arc::clone(&self.skf);
        let info = {
            let handle = self.app(app)?;
            skf.pin_info(handle)
        }
        .map_err(|e| self.failed(app.token(), e))?;
        Ok(PinStatus::from_counts(
            info.max_retries,
            info.remaining,
            info.default_pin,
        ))
    }

    fn verify_pin(&mut self, app: &ApplicationId, pin: &str) -> Result<(), Error> {
        // Probe first: a key pulled and plugged in again has new handles, not an error.
        self.find(app.token())?;
        let skf = Arc::clone(&self.skf);
        let info = {
            let handle = self.app(app)?;
            skf.pin_info(handle)
        }
        .map_err(|e| self.failed(app.token(), e))?;
        if info.remaining == 0 {
            return Err(Error::PinLocked);
        }
        let answer = {
            let handle = self.app(app)?;
            skf.verify_pin(handle, pin)
        }
        .map_err(|e| self.failed(app.token(), e))?;
        match answer {
            Verify::Ok => Ok(()),
            Verify::Failed(sar, retries) => {
                let e = pin_failure(sar, retries, info.max_retries);
                if matches!(e, Error::Skf { .. }) {
                    // Not a PIN answer: maybe the key is gone.
                    return Err(self.failed(app.token(), sar));
                }
                Err(e)
            }
        }
    }

    fn logout(&mut self, app: &ApplicationId) -> Result<(), Error> {
        if !self.devices.contains_key(app.token()) {
            return Ok(()); // no handle, so no verified state of ours
        }
        let skf = Arc::clone(&self.skf);
        let result = {
            let handle = self.app(app)?;
            skf.clear_secure_state(handle)
        };
        match result {
            Ok(()) => Ok(()),
            Err(sar) => match self.failed(app.token(), sar) {
                // Pulled out: the verification is gone with it.
                Error::TokenNotPresent => Ok(()),
                e => Err(e),
            },
        }
    }

    fn sign(
        &mut self,
        req: &SignRequest,
        cancel: Option<&AtomicBool>,
        progress: Option<&mpsc::Sender<usize>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        if req.inputs.is_empty() {
            return Err(Error::InvalidInput("nothing to sign".to_owned()).into());
        }
        let app = req.certificate.application().clone();
        let token = app.token().clone();
        let skf = Arc::clone(&self.skf);
        self.find(&token)?;
        let c = {
            let handle = self.app(&app)?;
            skf.open_container(handle, req.certificate.raw_container())
        }
        .map_err(|e| self.failed(&token, e))?;
        let result = self.sign_in(&c, req, cancel, progress);
        skf.close_container(c);
        if req.logout_after {
            if let Err(e) = self.logout(&app) {
                tracing::warn!(error = %e, "SKF_ClearSecureState after the batch failed");
            }
        }
        result
    }

    fn sign_in(
        &mut self,
        c: &ContainerHandle,
        req: &SignRequest,
        cancel: Option<&AtomicBool>,
        progress: Option<&mpsc::Sender<usize>>,
    ) -> Result<Vec<Vec<u8>>, SignFailure> {
        let skf = Arc::clone(&self.skf);
        let app = req.certificate.application().clone();
        let token = app.token().clone();
        let kind = skf.container_type(c).map_err(|e| self.failed(&token, e))?;
        let key = match kind {
            ContainerType::Ecc => KeyAlgorithm::Sm2,
            ContainerType::Rsa => KeyAlgorithm::Rsa { bits: 0 },
            _ => return Err(Error::CertificateNotFound(req.certificate.clone()).into()),
        };
        let needs_z = req
            .inputs
            .iter()
            .any(|i| matches!(i, SignInput::Message(_)));
        let public_key = match (&req.algorithm, key) {
            (SignAlgorithm::Sm2 { .. }, KeyAlgorithm::Sm2) if !needs_z => None,
            // Z is over the key that signs: the container's own public key (listed containers'
            // certificates match it; a key just generated has no certificate yet).
            (SignAlgorithm::Sm2 { .. }, KeyAlgorithm::Sm2) => Some(
                skf.sm2_public_key(c)
                    .map_err(|e| self.failed(&token, e))?
                    .to_vec(),
            ),
            (SignAlgorithm::RsaPkcs1(_), KeyAlgorithm::Rsa { .. }) => None,
            (alg, key) => {
                return Err(Error::MechanismNotSupported {
                    algorithm: match alg {
                        SignAlgorithm::Sm2 { .. } => "SM2".to_owned(),
                        SignAlgorithm::RsaPkcs1(h) => format!("RSA-PKCS1-{h:?}"),
                    },
                    key: match key {
                        KeyAlgorithm::Sm2 => "SM2".to_owned(),
                        KeyAlgorithm::Rsa { .. } => "RSA".to_owned(),
                    },
                }
                .into())
            }
        };
        let mut completed = Vec::with_capacity(req.inputs.len());
        for input in &req.inputs {
            if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                return Err(SignFailure {
                    error: Error::Cancelled,
                    completed,
                });
            }
            let one = self.sign_one(c, &req.algorithm, public_key.as_deref(), input, &app);
            match one {
                Ok(sig) => {
                    completed.push(sig);
                    if let Some(p) = progress {
                        // The listener may be gone; the batch goes on.
                        let _ = p.send(completed.len());
                    }
                }
                Err(error) => return Err(SignFailure { error, completed }),
            }
        }
        Ok(completed)
    }

    fn sign_one(
        &mut self,
        c: &ContainerHandle,
        algorithm: &SignAlgorithm,
        public_key: Option<&[u8]>,
        input: &SignInput,
        app: &ApplicationId,
    ) -> Result<Vec<u8>, Error> {
        let skf = Arc::clone(&self.skf);
        let sign_failed = |w: &mut Worker, sar: Sar| {
            if sar.code == SAR_USER_NOT_LOGGED_IN {
                Error::NotLoggedIn(app.clone())
            } else {
                w.failed(app.token(), sar)
            }
        };
        match algorithm {
            SignAlgorithm::Sm2 { user_id, encoding } => {
                let e: [u8; 32] = match input {
                    SignInput::Message(m) => {
                        let pk = public_key
                            .ok_or_else(|| Error::Encoding("no SM2 public key".to_owned()))?;
                        sm2_e(pk, user_id, m)?
                    }
                    SignInput::Digest(d) => d.as_slice().try_into().map_err(|_| {
                        Error::InvalidInput(format!("an SM2 e is 32 bytes, got {}", d.len()))
                    })?,
                };
                let (r, s) = skf.ecc_sign(c, &e).map_err(|sar| sign_failed(self, sar))?;
                sm2_signature(&r, &s, *encoding)
            }
            SignAlgorithm::RsaPkcs1(hash) => {
                let digest = match input {
                    SignInput::Message(m) => hash.digest(m),
                    SignInput::Digest(d) => d.clone(),
                };
                let info = digest_info(*hash, &digest)?;
                skf.rsa_sign(c, &info).map_err(|sar| sign_failed(self, sar))
            }
        }
    }

    // ---- handles ----

    /// Connects device `name` and remembers it under its token id.
    fn connect(&mut self, name: &[u8]) -> Result<TokenId, Error> {
        let handle = self.skf.connect_dev(name).map_err(from_sar)?;
        let info = match self.skf.dev_info(&handle) {
            Ok(info) => info,
            Err(sar) => {
                self.skf.disconnect_dev(handle);
                return Err(from_sar(sar));
            }
        };
        let id = TokenId::derive(&self.path, &info.serial, &info.label, &info.manufacturer);
        if let Some(old) = self.devices.remove(&id) {
            self.close_device(old);
        }
        self.devices.insert(
            id.clone(),
            Device {
                name: name.to_vec(),
                handle,
                info,
                apps: HashMap::new(),
            },
        );
        Ok(id)
    }

    /// The health probe, once per request: the cached device answers SKF_GetDevInfo with the
    /// same serial, or the devices are enumerated again.
    fn find(&mut self, id: &TokenId) -> Result<(), Error> {
        if let Some(d) = self.devices.get(id) {
            match self.skf.dev_info(&d.handle) {
                Ok(info) if info.serial == d.info.serial => return Ok(()),
                _ => self.forget(id),
            }
        }
        let names = self.skf.enum_dev().map_err(from_sar)?;
        for name in names {
            if self.devices.values().any(|d| d.name == name) {
                continue;
            }
            if let Ok(found) = self.connect(&name) {
                if &found == id {
                    return Ok(());
                }
            }
        }
        Err(Error::TokenNotFound(id.clone()))
    }

    fn device(&self, id: &TokenId) -> Result<&Device, Error> {
        self.devices
            .get(id)
            .ok_or_else(|| Error::TokenNotFound(id.clone()))
    }

    /// The application's handle, opened on first use (the device must be held).
    fn app(&mut self, app: &ApplicationId) -> Result<&AppHandle, Error> {
        if !self.devices.contains_key(app.token()) {
            self.find(app.token())?;
        }
        let skf = Arc::clone(&self.skf);
        let d = self
            .devices
            .get_mut(app.token())
            .ok_or_else(|| Error::TokenNotFound(app.token().clone()))?;
        if !d.apps.contains_key(app.raw_name()) {
            let handle = skf
                .open_application(&d.handle, app.raw_name())
                .map_err(|sar| {
                    if sar.code == SAR_APPLICATION_NOT_EXISTS {
                        Error::ApplicationNotFound(app.clone())
                    } else {
                        from_sar(sar)
                    }
                })?;
            d.apps.insert(app.raw_name().to_vec(), handle);
        }
        d.apps
            .get(app.raw_name())
            .ok_or_else(|| Error::ApplicationNotFound(app.clone()))
    }

    /// Translates a failed call on `token`'s handles. A removal, a dead handle, or any failure
    /// after which the device no longer answers SKF_GetDevInfo means the key is gone: its
    /// handles are dropped and the answer is [`Error::TokenNotPresent`].
    fn failed(&mut self, token: &TokenId, sar: Sar) -> Error {
        let e = from_sar(sar);
        let gone = e.is_removal()
            || sar.code == SAR_INVALIDHANDLEERR
            || self
                .devices
                .get(token)
                .is_some_and(|d| self.skf.dev_info(&d.handle).is_err());
        if gone {
            self.forget(token);
            Error::TokenNotPresent
        } else {
            e
        }
    }

    fn forget(&mut self, id: &TokenId) {
        if let Some(d) = self.devices.remove(id) {
            tracing::debug!(token = %id, "device handles dropped");
            self.close_device(d);
        }
    }

    fn close_device(&self, d: Device) {
        for (_, app) in d.apps {
            self.skf.close_application(app);
        }
        self.skf.disconnect_dev(d.handle);
    }
}

/// A name for display and logs.
fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

fn describe(id: &TokenId, d: &Device) -> TokenInfo {
    TokenInfo {
        id: id.clone(),
        device_name: show(&d.name),
        label: d.info.label.clone(),
        manufacturer: d.info.manufacturer.clone(),
        issuer: d.info.issuer.clone(),
        serial: d.info.serial.clone(),
    }
}

enum ContainerError {
    Sar(Sar),
    Other(Error),
}

impl From<Sar> for ContainerError {
    fn from(sar: Sar) -> Self {
        ContainerError::Sar(sar)
    }
}

impl From<Error> for ContainerError {
    fn from(e: Error) -> Self {
        ContainerError::Other(e)
    }
}

/// Reads an open container's signing certificate; `None` for an empty container or one
/// without a signing certificate, or an SM2 one whose certificate is not for its key.
fn read_container(
    skf: &Skf,
    c: &ContainerHandle,
    id: CertificateId,
) -> Result<Option<CertificateInfo>, ContainerError> {
    let kind = skf.container_type(c)?;
    if !matches!(kind, ContainerType::Ecc | ContainerType::Rsa) {
        return Ok(None);
    }
    let der = match skf.certificate(c, true) {
        Ok(der) if !der.is_empty() => der,
        Ok(_) => return Ok(None),
        Err(sar) if sar.code == SAR_CERTNOTFOUNTERR || sar.code == SAR_FILE_NOT_EXIST => {
            return Ok(None)
        }
        Err(sar) => return Err(sar.into()),
    };
    let parsed = ParsedCertificate::parse(&der)?;
    match (kind, parsed.key_algorithm) {
        (ContainerType::Ecc, KeyAlgorithm::Sm2) => {
            let point = skf.sm2_public_key(c)?;
            if point.as_slice() != parsed.public_key.as_slice() {
                tracing::debug!(container = %id.container(), "signing certificate is not for the container's key");
                return Ok(None);
            }
        }
        (ContainerType::Rsa, KeyAlgorithm::Rsa { .. }) => {}
        _ => return Ok(None),
    }
    let encryption_certificate = match skf.certificate(c, false) {
        Ok(der) if !der.is_empty() => Some(der),
        _ => None,
    };
    Ok(Some(CertificateInfo {
        id,
        der,
        subject: parsed.subject,
        issuer: parsed.issuer,
        serial_hex: parsed.serial_hex,
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        key_algorithm: parsed.key_algorithm,
        key_usage: parsed.key_usage,
        extended_key_usage: parsed.extended_key_usage,
        holder: parsed.holder,
        encryption_certificate,
    }))
}
