//! The soft token: devices, applications and containers as directories the test writes, PIN
//! retry counters persisted there, and the handles this library hands out. Everything here is
//! safe Rust; `lib.rs` does the C side.
//!
//! ```text
//! ROOT/devices/<device>/present            exists = the key is plugged in; its content names
//!                                          the insertion (handles die with it)
//! ROOT/devices/<device>/device.conf        label= serial= manufacturer= issuer=
//! ROOT/devices/<device>/remove_after_signs N: after N more signatures the key is "pulled"
//! ROOT/devices/<device>/hang_sign          exists = SKF_ECCSignData / SKF_RSASignData block
//!                                          until it is removed (first writing a line to the
//!                                          FIFO `hanging` beside it, if the test made one)
//! ROOT/fault.conf                        crash, hang or deadlock in named calls (fault.rs)
//! ROOT/devices/<device>/fail_keygen       exists = SKF_GenECCKeyPair answers SAR_GENRANDERR
//! ROOT/devices/<device>/fail_sign         exists = SKF_ECCSignData answers SAR_FAIL (a device
//!                                          error; the PIN stays verified)
//! ROOT/devices/<device>/apps/<app>/pin.conf                 user_pin= max_retries= remaining=
//! ROOT/devices/<device>/apps/<app>/containers/<name>/type   sm2 | rsa | empty
//! .../containers/<name>/sign.key.pem sign.cert.der [enc.key.pem enc.cert.der]
//! ROOT/calls.log                           one line per SKF call: `SKF_VerifyPIN rv=0x0A000024`
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rsa::pkcs8::DecodePrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use sm2::dsa::signature::hazmat::PrehashSigner as _;
use sm2::elliptic_curve::sec1::ToSec1Point as _;

use crate::abi::*;

/// How often a waiting SKF_WaitForDevEvent looks at the `present` files.
const EVENT_POLL: Duration = Duration::from_millis(20);

/// An SKF return code other than SAR_OK.
pub type Sar = ULONG;

/// What a handle stands for.
///
/// Every handle remembers the insertion it was opened in (the `present` file's content): once
/// the key is pulled its handles are dead, even after it is plugged in again (a USB device that
/// comes back is a new device to its driver).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handle {
    Device {
        dev: OsString,
        insertion: Vec<u8>,
    },
    App {
        dev: OsString,
        app: OsString,
        insertion: Vec<u8>,
    },
    Container {
        dev: OsString,
        app: OsString,
        name: OsString,
        insertion: Vec<u8>,
    },
}

/// The whole library's state: one per loaded copy of the library.
#[derive(Debug)]
pub struct Soft {
    root: PathBuf,
    handles: Mutex<HashMap<usize, Handle>>,
    next_handle: Mutex<usize>,
    /// Applications whose user PIN was verified (device, application).
    logged_in: Mutex<HashSet<(OsString, OsString)>>,
    /// The devices SKF_WaitForDevEvent last reported as present (starts as the set present at
    /// the library's first call, so no change is lost between two waits).
    known_present: Mutex<BTreeSet<OsString>>,
    /// Bumped by SKF_CancelWaitForDevEvent: ends the waits in progress (not later ones).
    cancel_generation: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Soft {
    pub fn new(root: PathBuf) -> Soft {
        let soft = Soft {
            root,
            handles: Mutex::new(HashMap::new()),
            next_handle: Mutex::new(0x1000),
            logged_in: Mutex::new(HashSet::new()),
            known_present: Mutex::new(BTreeSet::new()),
            cancel_generation: AtomicU64::new(0),
        };
        *lock(&soft.known_present) = soft.present_devices();
        soft
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Appends `SKF_Name rv=0x........` to ROOT/calls.log (never an argument: no PIN).
    pub fn log_call(&self, name: &str, rv: ULONG) {
        self.log_line(&format!("{name} rv=0x{rv:08X}"));
    }

    /// Appends one line to ROOT/calls.log.
    pub fn log_line(&self, line: &str) {
        let line = format!("{line}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("calls.log"))
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("keyport-soft-skf: cannot append to calls.log: {e}");
        }
    }

    // ---- devices ----

    fn devices_dir(&self) -> PathBuf {
        self.root.join("devices")
    }

    fn device_dir(&self, dev: &OsStr) -> PathBuf {
        self.devices_dir().join(dev)
    }

    /// Every provisioned device, present or not.
    pub fn all_devices(&self) -> BTreeSet<OsString> {
        list_dirs(&self.devices_dir())
    }

    pub fn present_devices(&self) -> BTreeSet<OsString> {
        self.all_devices()
            .into_iter()
            .filter(|d| self.is_present(d))
            .collect()
    }

    pub fn is_present(&self, dev: &OsStr) -> bool {
        self.device_dir(dev).join("present").exists()
    }

    /// The current insertion of `dev` (the `present` file's content), `None` when pulled out.
    fn insertion(&self, dev: &OsStr) -> Option<Vec<u8>> {
        std::fs::read(self.device_dir(dev).join("present")).ok()
    }

    /// Checks that a handle's insertion is the current one; if not, the key was pulled (and
    /// maybe plugged in again) since, and its logins are gone.
    fn live(&self, dev: &OsStr, insertion: &[u8]) -> Result<(), Sar> {
        if self.insertion(dev).as_deref() == Some(insertion) {
            Ok(())
        } else {
            lock(&self.logged_in).retain(|(d, _)| d != dev);
            Err(SAR_DEVICE_REMOVED)
        }
    }

    /// Checks that `dev` is plugged in; if not, its logins are gone (as on a real key).
    fn require_present(&self, dev: &OsStr) -> Result<(), Sar> {
        if self.is_present(dev) {
            Ok(())
        } else {
            lock(&self.logged_in).retain(|(d, _)| d != dev);
            Err(SAR_DEVICE_REMOVED)
        }
    }

    pub fn connect(&self, name: &OsStr) -> Result<usize, Sar> {
        if !self.all_devices().contains(name) {
            return Err(SAR_INVALIDPARAMERR);
        }
        self.require_present(name)?;
        let insertion = self.insertion(name).ok_or(SAR_DEVICE_REMOVED)?;
        Ok(self.new_handle(Handle::Device {
            dev: name.to_owned(),
            insertion,
        }))
    }

    pub fn device_info(&self, handle: usize) -> Result<DEVINFO, Sar> {
        let dev = self.device_of(handle)?;
        let conf = read_conf(&self.device_dir(&dev).join("device.conf"))?;
        let get = |k: &str| conf.get(k).map(String::as_str).unwrap_or("");
        let mut info = DEVINFO {
            version: VERSION { major: 1, minor: 0 },
            manufacturer: [0; 64],
            issuer: [0; 64],
            label: [0; 32],
            serial_number: [0; 32],
            hw_version: VERSION { major: 1, minor: 0 },
            firmware_version: VERSION { major: 1, minor: 0 },
            alg_sym_cap: 0,
            alg_asym_cap: SGD_SM2_1 | SGD_RSA,
            alg_hash_cap: SGD_SM3 | SGD_SHA256,
            dev_auth_alg_id: 0,
            total_space: 64 * 1024,
            free_space: 32 * 1024,
            max_ecc_buffer_size: 256,
            max_buffer_size: 2048,
            reserved: [0; 64],
        };
        fixed_text(&mut info.manufacturer, get("manufacturer"));
        fixed_text(&mut info.issuer, get("issuer"));
        fixed_text(&mut info.label, get("label"));
        fixed_text(&mut info.serial_number, get("serial"));
        Ok(info)
    }

    // ---- handles ----

    fn new_handle(&self, h: Handle) -> usize {
        let mut next = lock(&self.next_handle);
        *next += 1;
        lock(&self.handles).insert(*next, h);
        *next
    }

    pub fn close(&self, handle: usize) -> Result<Handle, Sar> {
        let h = lock(&self.handles)
            .remove(&handle)
            .ok_or(SAR_INVALIDHANDLEERR)?;
        // Closing an application (or its device) ends its login, as the standard says.
        match &h {
            Handle::Device { dev, .. } => lock(&self.logged_in).retain(|(d, _)| d != dev),
            Handle::App { dev, app, .. } => {
                lock(&self.logged_in).remove(&(dev.clone(), app.clone()));
            }
            Handle::Container { .. } => {}
        }
        Ok(h)
    }

    fn get(&self, handle: usize) -> Result<Handle, Sar> {
        lock(&self.handles)
            .get(&handle)
            .cloned()
            .ok_or(SAR_INVALIDHANDLEERR)
    }

    /// The device of a live device handle.
    fn device_of(&self, handle: usize) -> Result<OsString, Sar> {
        match self.get(handle)? {
            Handle::Device { dev, insertion } => {
                self.live(&dev, &insertion)?;
                Ok(dev)
            }
            _ => Err(SAR_INVALIDHANDLEERR),
        }
    }

    fn insertion_of(&self, handle: usize) -> Result<Vec<u8>, Sar> {
        match self.get(handle)? {
            Handle::Device { insertion, .. }
            | Handle::App { insertion, .. }
            | Handle::Container { insertion, .. } => Ok(insertion),
        }
    }

    fn app_of(&self, handle: usize) -> Result<(OsString, OsString), Sar> {
        match self.get(handle)? {
            Handle::App {
                dev,
                app,
                insertion,
            } => {
                self.live(&dev, &insertion)?;
                Ok((dev, app))
            }
            _ => Err(SAR_INVALIDHANDLEERR),
        }
    }

    fn container_of(&self, handle: usize) -> Result<Container, Sar> {
        match self.get(handle)? {
            Handle::Container {
                dev,
                app,
                name,
                insertion,
            } => {
                self.live(&dev, &insertion)?;
                let dir = self.app_dir(&dev, &app).join("containers").join(&name);
                Ok(Container { dev, app, dir })
            }
            _ => Err(SAR_INVALIDHANDLEERR),
        }
    }

    // ---- applications ----

    fn app_dir(&self, dev: &OsStr, app: &OsStr) -> PathBuf {
        self.device_dir(dev).join("apps").join(app)
    }

    pub fn applications(&self, handle: usize) -> Result<Vec<OsString>, Sar> {
        let dev = self.device_of(handle)?;
        Ok(list_dirs(&self.device_dir(&dev).join("apps"))
            .into_iter()
            .collect())
    }

    pub fn open_application(&self, handle: usize, app: &OsStr) -> Result<usize, Sar> {
        let dev = self.device_of(handle)?;
        if app.is_empty() {
            return Err(SAR_APPLICATION_NAME_INVALID);
        }
        if !self.app_dir(&dev, app).is_dir() {
            return Err(SAR_APPLICATION_NOT_EXISTS);
        }
        Ok(self.new_handle(Handle::App {
            dev,
            app: app.to_owned(),
            insertion: self.insertion_of(handle)?,
        }))
    }

    pub fn containers(&self, handle: usize) -> Result<Vec<OsString>, Sar> {
        let (dev, app) = self.app_of(handle)?;
        Ok(list_dirs(&self.app_dir(&dev, &app).join("containers"))
            .into_iter()
            .collect())
    }

    pub fn open_container(&self, handle: usize, name: &OsStr) -> Result<usize, Sar> {
        let (dev, app) = self.app_of(handle)?;
        if !self
            .app_dir(&dev, &app)
            .join("containers")
            .join(name)
            .is_dir()
        {
            return Err(SAR_INVALIDPARAMERR);
        }
        Ok(self.new_handle(Handle::Container {
            dev,
            app,
            name: name.to_owned(),
            insertion: self.insertion_of(handle)?,
        }))
    }

    /// SKF_CreateContainer: a new, empty container (its `type` file says `empty`).
    pub fn create_container(&self, handle: usize, name: &OsStr) -> Result<usize, Sar> {
        let (dev, app) = self.app_of(handle)?;
        self.require_app_login(&dev, &app)?;
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() > MAX_CONTAINER_NAME_LEN {
            return Err(SAR_NAMELENERR);
        }
        // Names are directory names here: no path separators, no `.`/`..`.
        if bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
            return Err(SAR_INVALIDPARAMERR);
        }
        let containers = self.app_dir(&dev, &app).join("containers");
        std::fs::create_dir_all(&containers).map_err(|_| SAR_FILEERR)?;
        let dir = containers.join(name);
        // create_dir (not _all): an existing name fails here, atomically.
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SAR_FILE_ALREADY_EXIST)
            }
            Err(_) => return Err(SAR_FILEERR),
        }
        write_atomically(&dir.join("type"), b"empty\n")?;
        Ok(self.new_handle(Handle::Container {
            dev,
            app,
            name: name.to_owned(),
            insertion: self.insertion_of(handle)?,
        }))
    }

    /// SKF_DeleteContainer: the container's directory, keys and certificates.
    pub fn delete_container(&self, handle: usize, name: &OsStr) -> Result<(), Sar> {
        let (dev, app) = self.app_of(handle)?;
        self.require_app_login(&dev, &app)?;
        if name.is_empty() || name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Err(SAR_INVALIDPARAMERR);
        }
        let dir = self.app_dir(&dev, &app).join("containers").join(name);
        if !dir.is_dir() {
            return Err(SAR_INVALIDPARAMERR);
        }
        std::fs::remove_dir_all(&dir).map_err(|_| SAR_FILEERR)
    }

    /// SKF_GenECCKeyPair: an SM2 signing key in an empty container. A container that already
    /// holds a key is refused (SAR_FILE_ALREADY_EXIST): this library never overwrites a key.
    pub fn gen_ecc_key_pair(&self, handle: usize, alg_id: ULONG) -> Result<ECCPUBLICKEYBLOB, Sar> {
        use sm2::elliptic_curve::Generate as _;
        use sm2::pkcs8::EncodePrivateKey as _;
        let c = self.container_of(handle)?;
        self.require_login(&c)?;
        if alg_id != SGD_SM2_1 {
            return Err(SAR_NOTSUPPORTYETERR);
        }
        if c.kind()? != Kind::Empty {
            return Err(SAR_FILE_ALREADY_EXIST);
        }
        if self.device_dir(&c.dev).join("fail_keygen").exists() {
            // A key whose generator fails (flash full, a chip fault): the test's switch.
            return Err(SAR_GENRANDERR);
        }
        let secret = sm2::SecretKey::try_generate().map_err(|_| SAR_GENRANDERR)?;
        let pem = secret
            .to_pkcs8_pem(sm2::pkcs8::LineEnding::LF)
            .map_err(|_| SAR_FAIL)?;
        write_atomically(&c.dir.join("sign.key.pem"), pem.as_bytes())?;
        write_atomically(&c.dir.join("type"), b"sm2\n")?;
        sm2_blob(&secret)
    }

    /// SKF_ImportCertificate: the bytes go to the slot as they are (the standard's single slot
    /// per kind; what was there is replaced, as on real keys). The container must hold a key.
    pub fn import_certificate(&self, handle: usize, sign: bool, der: &[u8]) -> Result<(), Sar> {
        let c = self.container_of(handle)?;
        self.require_login(&c)?;
        if c.kind()? == Kind::Empty {
            return Err(SAR_KEYNOTFOUNTERR);
        }
        if der.is_empty() {
            return Err(SAR_INDATALENERR);
        }
        let file = if sign {
            "sign.cert.der"
        } else {
            "enc.cert.der"
        };
        write_atomically(&c.dir.join(file), der)
    }

    // ---- PIN ----

    fn pin_file(&self, dev: &OsStr, app: &OsStr) -> PathBuf {
        self.app_dir(dev, app).join("pin.conf")
    }

    fn read_pin(&self, dev: &OsStr, app: &OsStr) -> Result<PinState, Sar> {
        let conf = read_conf(&self.pin_file(dev, app))?;
        let num = |k: &str| -> Result<u32, Sar> {
            conf.get(k).and_then(|v| v.parse().ok()).ok_or(SAR_FILEERR)
        };
        Ok(PinState {
            user_pin: conf.get("user_pin").cloned().ok_or(SAR_FILEERR)?,
            max_retries: num("max_retries")?,
            remaining: num("remaining")?,
            default_pin: conf.get("default_pin").is_some_and(|v| v == "1"),
        })
    }

    fn write_pin(&self, dev: &OsStr, app: &OsStr, pin: &PinState) -> Result<(), Sar> {
        let text = format!(
            "user_pin={}\nmax_retries={}\nremaining={}\ndefault_pin={}\n",
            pin.user_pin,
            pin.max_retries,
            pin.remaining,
            u8::from(pin.default_pin)
        );
        write_atomically(&self.pin_file(dev, app), text.as_bytes())
    }

    /// (max retries, remaining retries, default PIN)
    pub fn pin_info(&self, handle: usize, pin_type: ULONG) -> Result<(u32, u32, bool), Sar> {
        let (dev, app) = self.app_of(handle)?;
        if pin_type != USER_TYPE {
            return Err(SAR_USER_TYPE_INVALID);
        }
        let pin = self.read_pin(&dev, &app)?;
        Ok((pin.max_retries, pin.remaining, pin.default_pin))
    }

    /// Verifies the user PIN. `Err((code, retries left))`.
    pub fn verify_pin(
        &self,
        handle: usize,
        pin_type: ULONG,
        given: &[u8],
    ) -> Result<(), (Sar, u32)> {
        let (dev, app) = self.app_of(handle).map_err(|e| (e, 0))?;
        if pin_type != USER_TYPE {
            return Err((SAR_USER_TYPE_INVALID, 0));
        }
        let mut pin = self.read_pin(&dev, &app).map_err(|e| (e, 0))?;
        if pin.remaining == 0 {
            return Err((SAR_PIN_LOCKED, 0));
        }
        if given == pin.user_pin.as_bytes() {
            pin.remaining = pin.max_retries;
            self.write_pin(&dev, &app, &pin).map_err(|e| (e, 0))?;
            lock(&self.logged_in).insert((dev, app));
            Ok(())
        } else {
            pin.remaining -= 1;
            self.write_pin(&dev, &app, &pin)
                .map_err(|e| (e, pin.remaining))?;
            lock(&self.logged_in).remove(&(dev, app));
            Err((SAR_PIN_INCORRECT, pin.remaining))
        }
    }

    pub fn clear_secure_state(&self, handle: usize) -> Result<(), Sar> {
        let (dev, app) = self.app_of(handle)?;
        lock(&self.logged_in).remove(&(dev, app));
        Ok(())
    }

    // ---- containers ----

    pub fn container_type(&self, handle: usize) -> Result<ULONG, Sar> {
        Ok(match self.container_of(handle)?.kind()? {
            Kind::Empty => CONTAINER_EMPTY,
            Kind::Sm2 => CONTAINER_ECC,
            Kind::Rsa => CONTAINER_RSA,
        })
    }

    pub fn certificate(&self, handle: usize, sign: bool) -> Result<Vec<u8>, Sar> {
        let c = self.container_of(handle)?;
        let file = if sign {
            "sign.cert.der"
        } else {
            "enc.cert.der"
        };
        std::fs::read(c.dir.join(file)).map_err(|_| SAR_CERTNOTFOUNTERR)
    }

    /// The public key blob (ECCPUBLICKEYBLOB or RSAPUBLICKEYBLOB) as bytes.
    pub fn public_key(&self, handle: usize, sign: bool) -> Result<Vec<u8>, Sar> {
        let c = self.container_of(handle)?;
        let file = if sign { "sign.key.pem" } else { "enc.key.pem" };
        match c.kind()? {
            Kind::Sm2 => Ok(as_bytes(&sm2_blob(&load_sm2(&c.dir.join(file))?)?)),
            Kind::Empty => Err(SAR_KEYNOTFOUNTERR),
            Kind::Rsa => {
                let key = load_rsa(&c.dir.join(file))?;
                let bits = key.n().bit_width();
                let mut blob = RSAPUBLICKEYBLOB {
                    alg_id: SGD_RSA,
                    bit_len: bits,
                    modulus: [0; MAX_RSA_MODULUS_LEN],
                    public_exponent: [0; MAX_RSA_EXPONENT_LEN],
                };
                right_align(&mut blob.modulus, &strip_zeros(&key.n().to_be_bytes()));
                right_align(
                    &mut blob.public_exponent,
                    &strip_zeros(&key.e().to_be_bytes()),
                );
                Ok(as_bytes(&blob))
            }
        }
    }

    /// SM2 signature over the caller's e (32 bytes): no hashing inside, as GM/T 0016 says.
    pub fn ecc_sign(&self, handle: usize, e: &[u8]) -> Result<ECCSIGNATUREBLOB, Sar> {
        let c = self.container_of(handle)?;
        if c.kind()? != Kind::Sm2 {
            return Err(SAR_KEYINFOTYPEERR);
        }
        self.require_login(&c)?;
        if e.len() != 32 {
            return Err(SAR_INDATALENERR);
        }
        if self.device_dir(&c.dev).join("fail_sign").exists() {
            return Err(SAR_FAIL);
        }
        self.hang_while_asked(&c.dev);
        let secret = load_sm2(&c.dir.join("sign.key.pem"))?;
        // The distinguishing ID only matters for Z, which the caller already folded into e.
        let key = sm2::dsa::SigningKey::new("1234567812345678", &secret).map_err(|_| SAR_FAIL)?;
        let sig: sm2::dsa::Signature = key.sign_prehash(e).map_err(|_| SAR_FAIL)?;
        let mut blob = ECCSIGNATUREBLOB {
            r: [0; ECC_MAX_COORDINATE_LEN],
            s: [0; ECC_MAX_COORDINATE_LEN],
        };
        right_align(&mut blob.r, &sig.r_bytes());
        right_align(&mut blob.s, &sig.s_bytes());
        self.count_signature(&c.dev)?;
        Ok(blob)
    }

    /// RSA PKCS#1 v1.5 (block type 1) over the caller's data, typically a DigestInfo.
    pub fn rsa_sign(&self, handle: usize, data: &[u8]) -> Result<Vec<u8>, Sar> {
        let c = self.container_of(handle)?;
        if c.kind()? != Kind::Rsa {
            return Err(SAR_KEYINFOTYPEERR);
        }
        self.require_login(&c)?;
        self.hang_while_asked(&c.dev);
        let key = load_rsa(&c.dir.join("sign.key.pem"))?;
        if data.is_empty() || data.len() + 11 > key.size() {
            return Err(SAR_INDATALENERR);
        }
        let sig = key
            .sign(rsa::Pkcs1v15Sign::new_unprefixed(), data)
            .map_err(|_| SAR_FAIL)?;
        self.count_signature(&c.dev)?;
        Ok(sig)
    }

    /// The size of an RSA container's signature, for a length query.
    pub fn rsa_signature_len(&self, handle: usize) -> Result<usize, Sar> {
        let c = self.container_of(handle)?;
        Ok(load_rsa(&c.dir.join("sign.key.pem"))?.size())
    }

    fn require_login(&self, c: &Container) -> Result<(), Sar> {
        self.require_app_login(&c.dev, &c.app)
    }

    fn require_app_login(&self, dev: &OsStr, app: &OsStr) -> Result<(), Sar> {
        if lock(&self.logged_in).contains(&(dev.to_owned(), app.to_owned())) {
            Ok(())
        } else {
            Err(SAR_USER_NOT_LOGGED_IN)
        }
    }

    /// A device that hangs in a signature (a stuck driver, a key waiting for a button): blocks
    /// while `hang_sign` exists. If the test made a FIFO `hanging` beside it, one line is
    /// written to it first, so the test learns that the call is inside without polling.
    fn hang_while_asked(&self, dev: &OsStr) {
        let switch = self.device_dir(dev).join("hang_sign");
        if !switch.exists() {
            return;
        }
        let fifo = self.device_dir(dev).join("hanging");
        if fifo.exists() {
            // Opening a FIFO for writing waits for its reader: the test.
            let told = std::fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .and_then(|mut f| f.write_all(b"hanging\n"));
            if let Err(e) = told {
                eprintln!("keyport-soft-skf: cannot write {}: {e}", fifo.display());
            }
        }
        while switch.exists() {
            std::thread::sleep(EVENT_POLL);
        }
    }

    /// Counts down `remove_after_signs`; at zero the key is pulled (its `present` file goes).
    fn count_signature(&self, dev: &OsStr) -> Result<(), Sar> {
        let file = self.device_dir(dev).join("remove_after_signs");
        let Ok(text) = std::fs::read_to_string(&file) else {
            return Ok(());
        };
        let left: u64 = text.trim().parse().map_err(|_| SAR_FILEERR)?;
        let left = left.saturating_sub(1);
        if left == 0 {
            std::fs::remove_file(self.device_dir(dev).join("present")).map_err(|_| SAR_FILEERR)?;
            std::fs::remove_file(&file).map_err(|_| SAR_FILEERR)?;
        } else {
            write_atomically(&file, left.to_string().as_bytes())?;
        }
        Ok(())
    }

    // ---- events ----

    /// Blocks until a device is inserted or removed (compared with the last reported set), or
    /// the wait is cancelled. `Ok((device, event))`.
    pub fn wait_for_event(&self) -> Result<(OsString, ULONG), Sar> {
        let generation = self.cancel_generation.load(Ordering::SeqCst);
        loop {
            if self.cancel_generation.load(Ordering::SeqCst) != generation {
                return Err(SAR_NOT_EVENTERR);
            }
            if let Some(found) = self.next_event() {
                return Ok(found);
            }
            std::thread::sleep(EVENT_POLL);
        }
    }

    /// The first difference between the devices present now and the last reported set; it
    /// becomes part of the reported set.
    fn next_event(&self) -> Option<(OsString, ULONG)> {
        let now = self.present_devices();
        let mut known = lock(&self.known_present);
        if let Some(added) = now.difference(&known).next().cloned() {
            known.insert(added.clone());
            return Some((added, EVENT_INSERTED));
        }
        if let Some(gone) = known.difference(&now).next().cloned() {
            known.remove(&gone);
            lock(&self.logged_in).retain(|(d, _)| d != &gone);
            return Some((gone, EVENT_REMOVED));
        }
        None
    }

    /// Puts an event back (the caller's buffer was too small for its name).
    pub fn unreport(&self, dev: &OsStr, event: ULONG) {
        let mut known = lock(&self.known_present);
        if event == EVENT_INSERTED {
            known.remove(dev);
        } else {
            known.insert(dev.to_owned());
        }
    }

    pub fn cancel_wait(&self) {
        self.cancel_generation.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct PinState {
    user_pin: String,
    max_retries: u32,
    remaining: u32,
    default_pin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Made by SKF_CreateContainer, no key yet.
    Empty,
    Sm2,
    Rsa,
}

#[derive(Debug)]
struct Container {
    dev: OsString,
    app: OsString,
    dir: PathBuf,
}

impl Container {
    fn kind(&self) -> Result<Kind, Sar> {
        match std::fs::read_to_string(self.dir.join("type"))
            .map_err(|_| SAR_FILE_NOT_EXIST)?
            .trim()
        {
            "sm2" => Ok(Kind::Sm2),
            "rsa" => Ok(Kind::Rsa),
            "empty" => Ok(Kind::Empty),
            _ => Err(SAR_FILEERR),
        }
    }
}

/// The ECCPUBLICKEYBLOB of an SM2 key: 256 bits, X and Y right-aligned.
fn sm2_blob(key: &sm2::SecretKey) -> Result<ECCPUBLICKEYBLOB, Sar> {
    let point = key.public_key().to_sec1_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err(SAR_KEYINFOTYPEERR);
    };
    let mut blob = ECCPUBLICKEYBLOB {
        bit_len: 256,
        x: [0; ECC_MAX_COORDINATE_LEN],
        y: [0; ECC_MAX_COORDINATE_LEN],
    };
    right_align(&mut blob.x, x);
    right_align(&mut blob.y, y);
    Ok(blob)
}

fn load_sm2(path: &Path) -> Result<sm2::SecretKey, Sar> {
    use sm2::pkcs8::DecodePrivateKey as _;
    let pem = std::fs::read_to_string(path).map_err(|_| SAR_KEYNOTFOUNTERR)?;
    sm2::SecretKey::from_pkcs8_pem(&pem).map_err(|_| SAR_KEYINFOTYPEERR)
}

fn load_rsa(path: &Path) -> Result<rsa::PrivateKey, Sar> {
    let pem = std::fs::read_to_string(path).map_err(|_| SAR_KEYNOTFOUNTERR)?;
    rsa::PrivateKey::from_pkcs8_pem(&pem).map_err(|_| SAR_KEYINFOTYPEERR)
}

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b[first..].to_vec()
}

/// The bytes of a packed C structure (plain integers and byte arrays: no padding, no pointers).
fn as_bytes<T: Copy>(value: &T) -> Vec<u8> {
    let size = std::mem::size_of::<T>();
    let mut out = vec![0u8; size];
    // SAFETY: `T` is one of this crate's `repr(C, packed)` structures of integers and byte
    // arrays (no padding, every byte initialised); `out` has exactly `size` bytes and does not
    // overlap `value`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            std::ptr::from_ref(value).cast::<u8>(),
            out.as_mut_ptr(),
            size,
        );
    }
    out
}

fn list_dirs(dir: &Path) -> BTreeSet<OsString> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name())
        .collect()
}

fn read_conf(path: &Path) -> Result<HashMap<String, String>, Sar> {
    let text = std::fs::read_to_string(path).map_err(|_| SAR_FILEERR)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Sar> {
    let tmp = path.with_extension("next");
    std::fs::write(&tmp, bytes).map_err(|_| SAR_FILEERR)?;
    std::fs::rename(&tmp, path).map_err(|_| SAR_FILEERR)
}
