//! A hosted [`Module`] (every call a serde job through a [`Transport`]) against a real SoftHSM
//! token: the async calls, enrolment, and the forwarding of token events. The transport here
//! encodes each job and reply with postcard, as the agent's frames do, and runs the job on an
//! in-process module with `remote::run`, as a module host does; the process boundary itself
//! (frames, supervisor, crashes) is tested in the agent (agent/tests/host_supervisor.rs,
//! tests/tests/daemon_isolation.rs).
#![allow(clippy::unwrap_used)]

#[path = "support/rig.rs"]
mod rig;

use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pkcs11_shim::remote::{self, Job, Reply, Transport, TransportError};
use pkcs11_shim::{
    Credential, DeleteKeyRequest, EcdsaEncoding, Error, GenerateRequest, HashAlg, ImportMode,
    ImportRequest, KeySignRequest, KeySpec, LoadOptions, LoginState, Module, SecretPin,
    SignAlgorithm, SignInput, SignRequest,
};
use rig::{openssl_verify, Rig, USER_PIN};

/// A module host without the process: each job and reply crosses as postcard bytes.
struct Loopback {
    module: Module,
    /// The names of the jobs run, in order.
    jobs: Arc<Mutex<Vec<&'static str>>>,
}

impl Transport for Loopback {
    fn run(
        &self,
        job: Job,
        _deadline: Duration,
        _cancel: Option<&AtomicBool>,
        interim: &mut dyn FnMut(Reply),
    ) -> Result<Reply, TransportError> {
        let bytes = postcard::to_stdvec(&job).map_err(|e| TransportError::Failed(e.to_string()))?;
        let job: Job = postcard::from_bytes(&bytes).unwrap();
        self.jobs.lock().unwrap().push(job.name());
        let (tx, rx) = std::sync::mpsc::channel();
        let reply = remote::run(
            &self.module,
            job,
            Some(tx),
            Arc::new(AtomicBool::new(false)),
        );
        for p in rx.try_iter() {
            interim(Reply::Progress(p));
        }
        let bytes = postcard::to_stdvec(&reply).unwrap();
        Ok(postcard::from_bytes(&bytes).unwrap())
    }
}

fn hosted(rig: &Rig) -> (Module, Arc<Mutex<Vec<&'static str>>>) {
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let module = Module::hosted(
        rig.module.path(),
        LoadOptions::default(),
        Duration::from_secs(60),
        Box::new(Loopback {
            module: rig.module.clone(),
            jobs: Arc::clone(&jobs),
        }),
    )
    .unwrap();
    assert!(module.is_hosted());
    (module, jobs)
}

fn pin() -> Credential {
    Credential::Pin(SecretPin::from(USER_PIN.to_owned()))
}

#[test]
fn a_hosted_module_generates_a_key_that_signs_before_its_certificate_then_undoes_it() {
    let rig = Rig::new();
    let (module, _) = hosted(&rig);
    module
        .check_generation(&rig.token, KeySpec::EcP256)
        .unwrap();
    let key = module
        .generate_key(
            GenerateRequest {
                token: rig.token.clone(),
                spec: KeySpec::EcP256,
                label: "hosted key".to_owned(),
                always_authenticate: false,
                logout_after: false,
            },
            pin(),
        )
        .unwrap();
    assert_eq!(key.id.token_id(), &rig.token);
    assert_eq!(key.cka_id.len(), 20);

    // The new key signs (no certificate yet); openssl checks it with the key the token gave.
    let message = b"a certificate request's info".to_vec();
    let sig = module
        .sign_with_key(
            KeySignRequest {
                key: key.id.clone(),
                algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
                input: SignInput::Data(message.clone()),
                logout_after: false,
            },
            Credential::None,
        )
        .unwrap();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(work.path().join("pub.der"), &key.public_key_der).unwrap();
    std::fs::write(work.path().join("msg"), &message).unwrap();
    std::fs::write(work.path().join("sig"), &sig).unwrap();
    let verified = Command::new("openssl")
        .current_dir(work.path())
        .args(["dgst", "-sha256", "-keyform", "DER", "-verify", "pub.der"])
        .args(["-signature", "sig", "msg"])
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "openssl rejects the hosted key's signature: {}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // The undo runs in the generation's login, through the host too.
    module
        .delete_new_key(DeleteKeyRequest {
            key: key.id.clone(),
            logout_after: true,
        })
        .unwrap();
    let undone = module.sign_with_key(
        KeySignRequest {
            key: key.id,
            algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
            input: SignInput::Data(message),
            logout_after: true,
        },
        pin(),
    );
    assert!(undone.is_err(), "the deleted key still signs");
}

#[test]
fn enrolment_errors_cross_the_host_typed() {
    let rig = Rig::new();
    let (module, _) = hosted(&rig);
    // The certificate the token holds already: nothing written, and the answer says so.
    let stored = rig.cert_der("sign-p256");
    let again = module
        .import_certificate(
            ImportRequest {
                token: rig.token.clone(),
                der: stored,
                mode: ImportMode::KeepExisting,
                logout_after: true,
            },
            pin(),
        )
        .unwrap();
    assert!(!again.stored, "the token held this certificate already");

    // A certificate of a key the token does not hold.
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let made = Command::new("openssl")
        .current_dir(work.path())
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-keyout", "k.pem"])
        .args(["-subj", "/CN=foreign", "-days", "1", "-outform", "DER"])
        .args(["-out", "c.der"])
        .output()
        .unwrap();
    assert!(made.status.success());
    let foreign = module.import_certificate(
        ImportRequest {
            token: rig.token.clone(),
            der: std::fs::read(work.path().join("c.der")).unwrap(),
            mode: ImportMode::KeepExisting,
            logout_after: true,
        },
        pin(),
    );
    assert!(matches!(foreign, Err(Error::NoMatchingKey)), "{foreign:?}");
}

#[test]
fn the_async_calls_answer_through_the_host() {
    let rig = Rig::new();
    let (module, jobs) = hosted(&rig);
    let cert = rig.certificate("sign-p256");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let state = runtime
        .block_on(module.login_state_async(&rig.token))
        .unwrap();
    assert!(matches!(state, LoginState::NeedsPin(_)), "{state:?}");
    let listed = runtime
        .block_on(module.certificates_async(Some(&rig.token)))
        .unwrap();
    assert!(listed.iter().any(|c| c.id == cert.id));
    let data = b"signed through the host, awaited".to_vec();
    let (progress, seen) = std::sync::mpsc::channel();
    let sigs = runtime
        .block_on(module.sign_async(
            SignRequest {
                certificate: cert.id.clone(),
                algorithm: SignAlgorithm::Ecdsa(HashAlg::Sha256, EcdsaEncoding::Der),
                inputs: vec![SignInput::Data(data.clone())],
                logout_after: true,
            },
            pin(),
            Some(progress),
            None,
        ))
        .unwrap();
    assert_eq!(sigs.len(), 1);
    assert!(openssl_verify(
        &rig.cert_pem("sign-p256"),
        "ecdsa",
        "sha256",
        &data,
        &sigs[0]
    ));
    assert_eq!(seen.try_iter().last().map(|p| p.done), Some(1));
    // Outside a runtime the async calls still answer (on a thread of their own).
    let state = futures_lite_block_on(module.login_state_async(&rig.token));
    assert!(state.is_ok(), "{state:?}");
    assert!(jobs.lock().unwrap().contains(&"sign"));
}

#[test]
fn token_events_reach_the_host_once_before_the_next_job() {
    let rig = Rig::new();
    let (module, jobs) = hosted(&rig);
    module.tokens().unwrap();
    module.token_event();
    module.token_event();
    module.tokens().unwrap();
    module.tokens().unwrap();
    let seen = jobs.lock().unwrap().clone();
    // info (Module::hosted), tokens, then the events told once, then two listings.
    assert_eq!(
        seen,
        ["info", "tokens", "token_event", "tokens", "tokens"],
        "{seen:?}"
    );
}

/// Polls a future to its end on this thread, with no async runtime around it.
fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park(),
        }
    }
}
