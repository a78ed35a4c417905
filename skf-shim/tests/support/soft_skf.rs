//! The soft SKF token: a store provisioned per test by softhsm-config/provision-skf.sh, loaded
//! through a private copy of the soft SKF library (the library reads KEYPORT_SOFT_SKF_DIR once,
//! at its first SKF call; copies at different paths are independent instances).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use skf_shim::{ApplicationId, CertificateInfo, Library, LoadOptions, SecretPin, TokenId};

pub const USER_PIN: &str = "123456";
pub const MAX_RETRIES: u32 = 6;
pub const DEVICE: &str = "SKF-KEY-0";
pub const SPARE_DEVICE: &str = "SKF-KEY-1";
pub const APP: &str = "KEYPORT_APP";
pub const SM2_CONTAINER: &str = "SM2-SIGN";
pub const RSA_CONTAINER: &str = "RSA-SIGN";
/// "王五的签名" in GBK: a container name that is not UTF-8.
pub const GBK_CONTAINER: &[u8] = b"\xcd\xf5\xce\xe5\xb5\xc4\xc7\xa9\xc3\xfb";

/// Serialises "set the environment, then the library's first call".
static LOAD_LOCK: Mutex<()> = Mutex::new(());

/// Fields drop in order: the library (its worker closes its handles, logging the calls) before
/// the directory.
pub struct SoftSkf {
    pub library: Library,
    pub token: TokenId,
    pub dir: tempfile::TempDir,
}

impl SoftSkf {
    /// A fresh store with SKF-KEY-0 plugged in, loaded through a private library copy.
    pub fn new() -> SoftSkf {
        SoftSkf::with_options(LoadOptions::default())
    }

    /// [`SoftSkf::new`] with the library loaded with `options`.
    pub fn with_options(options: LoadOptions) -> SoftSkf {
        let dir = tempfile::Builder::new()
            .prefix("skf-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("tempdir");
        provision(dir.path());
        let library = load(dir.path(), "libsoftskf.so", options);
        let tokens = library.tokens().expect("tokens");
        let token = tokens
            .iter()
            .find(|t| t.device_name == DEVICE)
            .expect("the provisioned key is present")
            .id
            .clone();
        SoftSkf {
            library,
            token,
            dir,
        }
    }

    /// The same store through another instance of the library (a restart).
    pub fn reload(&self, copy_name: &str) -> Library {
        let lib = load(self.dir.path(), copy_name, LoadOptions::default());
        lib.tokens().expect("first call of the new instance");
        lib
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("skf")
    }

    pub fn device_dir(&self, device: &str) -> PathBuf {
        self.state().join("devices").join(device)
    }

    pub fn app(&self) -> ApplicationId {
        ApplicationId::new(self.token.clone(), APP)
    }

    /// Plugs a device in or pulls it out (the library's `present` switch).
    pub fn set_present(&self, device: &str, present: bool) {
        let switch = self.device_dir(device).join("present");
        if present {
            // A new insertion: the switch's content names it, so old handles die.
            let insertion = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos();
            std::fs::write(&switch, insertion.to_string()).expect("plug in");
        } else {
            std::fs::remove_file(&switch).expect("pull out");
        }
    }

    /// The key is pulled out after `n` more signatures.
    pub fn remove_after_signs(&self, n: u32) {
        std::fs::write(
            self.device_dir(DEVICE).join("remove_after_signs"),
            n.to_string(),
        )
        .expect("write remove_after_signs");
    }

    /// Makes the key's signatures hang until [`SoftSkf::release_sign`]; returns what tells when
    /// one is inside the library (a FIFO the library writes a line to).
    pub fn hang_sign(&self) -> Hanging {
        let fifo = self.device_dir(DEVICE).join("hanging");
        let made = Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo failed");
        // The reader waits on its own thread: opening a FIFO blocks until the writer comes.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = std::fs::File::open(&fifo).and_then(|f| {
                std::io::BufRead::read_line(&mut std::io::BufReader::new(f), &mut line)
            });
            let _ = tx.send(read.map(|_| line));
        });
        std::fs::write(self.device_dir(DEVICE).join("hang_sign"), b"").expect("hang_sign");
        Hanging(rx)
    }

    pub fn release_sign(&self) {
        std::fs::remove_file(self.device_dir(DEVICE).join("hang_sign")).expect("release");
    }

    /// How many times `function` was called so far (the library's call log).
    pub fn calls(&self, function: &str) -> usize {
        let log = std::fs::read_to_string(self.state().join("calls.log")).unwrap_or_default();
        let prefix = format!("{function} ");
        log.lines().filter(|l| l.starts_with(&prefix)).count()
    }

    /// The certificate listed for `container`.
    pub fn certificate(&self, container: &str) -> CertificateInfo {
        self.library
            .certificates(Some(&self.token))
            .expect("certificates")
            .into_iter()
            .find(|c| c.id.raw_container() == container.as_bytes())
            .unwrap_or_else(|| panic!("no certificate for {container}"))
    }

    pub fn verify_right_pin(&self) {
        self.library
            .verify_pin(&self.app(), SecretPin::from(USER_PIN.to_owned()))
            .expect("right PIN");
    }

    /// The provisioned public key (PEM) of a certificate name ("sm2-sign", "rsa-sign").
    pub fn public_key_pem(&self, name: &str) -> PathBuf {
        self.dir.path().join("pub").join(format!("{name}.pem"))
    }

    pub fn cert_der(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("certs").join(format!("{name}.der"))).expect("der")
    }

    /// A DER SubjectPublicKeyInfo as a PEM file OpenSSL reads (converted by OpenSSL).
    pub fn spki_pem(&self, spki_der: &[u8], name: &str) -> PathBuf {
        let der = self.dir.path().join(format!("{name}.spki.der"));
        let pem = self.dir.path().join(format!("{name}.spki.pem"));
        std::fs::write(&der, spki_der).expect("write spki");
        openssl(&[
            "pkey".as_ref(),
            "-pubin".as_ref(),
            "-inform".as_ref(),
            "DER".as_ref(),
            "-in".as_ref(),
            der.as_os_str(),
            "-out".as_ref(),
            pem.as_os_str(),
        ]);
        pem
    }

    /// The test CA (provision-skf.sh's SM2 CA) issues a signing certificate for the public key
    /// in `public_pem`, DER (`openssl x509 -new -force_pubkey`, SM3withSM2, default user ID).
    /// ASCII subjects only: OpenSSL 3.0's `x509 -subj` has no `-utf8` and would mangle others.
    pub fn ca_issue_for_key(&self, public_pem: &Path, subject: &str, serial: u32) -> Vec<u8> {
        let out = self.dir.path().join(format!("issued-{serial}.der"));
        let (ca, key) = (
            self.dir.path().join("ca.pem"),
            self.dir.path().join("ca.key"),
        );
        let serial = serial.to_string();
        openssl(&[
            "x509".as_ref(),
            "-new".as_ref(),
            "-force_pubkey".as_ref(),
            public_pem.as_os_str(),
            "-subj".as_ref(),
            subject.as_ref(),
            "-CA".as_ref(),
            ca.as_os_str(),
            "-CAkey".as_ref(),
            key.as_os_str(),
            "-sm3".as_ref(),
            "-sigopt".as_ref(),
            "distid:1234567812345678".as_ref(),
            "-days".as_ref(),
            "30".as_ref(),
            "-set_serial".as_ref(),
            serial.as_ref(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-out".as_ref(),
            out.as_os_str(),
        ]);
        std::fs::read(out).expect("read issued certificate")
    }

    /// The test CA issues a certificate from a PKCS#10 request (DER), as a CA portal does:
    /// `openssl x509 -req` checks the request's SM2 signature (`-vfyopt distid:…`) first.
    pub fn ca_issue_from_request(&self, request_der: &[u8], serial: u32) -> Vec<u8> {
        let req = self.dir.path().join(format!("req-{serial}.der"));
        let out = self.dir.path().join(format!("issued-{serial}.der"));
        let ext = self.dir.path().join(format!("ext-{serial}.cnf"));
        std::fs::write(&req, request_der).expect("write request");
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,nonRepudiation\n",
        )
        .expect("write extensions");
        let (ca, key) = (
            self.dir.path().join("ca.pem"),
            self.dir.path().join("ca.key"),
        );
        let serial = serial.to_string();
        openssl(&[
            "x509".as_ref(),
            "-req".as_ref(),
            "-inform".as_ref(),
            "DER".as_ref(),
            "-in".as_ref(),
            req.as_os_str(),
            "-vfyopt".as_ref(),
            "distid:1234567812345678".as_ref(),
            "-CA".as_ref(),
            ca.as_os_str(),
            "-CAkey".as_ref(),
            key.as_os_str(),
            "-sm3".as_ref(),
            "-sigopt".as_ref(),
            "distid:1234567812345678".as_ref(),
            "-days".as_ref(),
            "30".as_ref(),
            "-set_serial".as_ref(),
            serial.as_ref(),
            "-extfile".as_ref(),
            ext.as_os_str(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-out".as_ref(),
            out.as_os_str(),
        ]);
        std::fs::read(out).expect("read issued certificate")
    }

    /// The container directories of the application in the library's state (what exists on
    /// the key, read behind the library's back).
    pub fn container_dirs(&self) -> Vec<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = self
            .device_dir(DEVICE)
            .join("apps")
            .join(APP)
            .join("containers");
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .expect("containers")
            .map(|e| e.expect("entry").file_name().as_bytes().to_vec())
            .collect();
        names.sort();
        names
    }

    /// A file of a container in the library's state.
    pub fn container_file(&self, container: &[u8], file: &str) -> PathBuf {
        use std::os::unix::ffi::OsStrExt as _;
        self.device_dir(DEVICE)
            .join("apps")
            .join(APP)
            .join("containers")
            .join(std::ffi::OsStr::from_bytes(container))
            .join(file)
    }
}

/// Runs OpenSSL; panics with its output when it fails.
fn openssl(args: &[&std::ffi::OsStr]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Tells when a signature is inside the library and hanging.
pub struct Hanging(std::sync::mpsc::Receiver<std::io::Result<String>>);

impl Hanging {
    /// Waits for the library's line; `bound` only limits a failure.
    pub fn wait(&self, bound: std::time::Duration) {
        let line = self
            .0
            .recv_timeout(bound)
            .expect("the signature reached the library")
            .expect("read the FIFO");
        assert_eq!(line, "hanging\n");
    }
}

fn provision(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../softhsm-config/provision-skf.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run provision-skf.sh");
    assert!(
        out.status.success(),
        "provision-skf.sh failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies the built soft SKF library into `dir` as `name` and loads it over `dir/skf`.
fn load(dir: &Path, name: &str, options: LoadOptions) -> Library {
    let copy = dir.join(name);
    std::fs::copy(soft_skf_library(), &copy).expect("copy the soft SKF library");
    let _turn = LOAD_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    std::env::set_var("KEYPORT_SOFT_SKF_DIR", dir.join("skf"));
    let library = Library::load_with(&copy, options).expect("load the soft SKF library");
    // The first SKF call fixes this instance's state directory; make it under the lock.
    library.tokens().expect("first SKF call");
    library
}

/// The soft SKF library cargo built as our dev-dependency.
pub fn soft_skf_library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe
        .parent()
        .expect("test binary lives in target/<profile>/deps");
    [
        deps.to_path_buf(),
        deps.parent().unwrap_or(deps).to_path_buf(),
    ]
    .iter()
    .map(|d| d.join("libkeyport_soft_skf.so"))
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("libkeyport_soft_skf.so not found near {}", exe.display()))
}
