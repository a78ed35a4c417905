//! The one place that calls into an SKF library: its C types (GM/T 0016-2012, written from the
//! standard's header), the functions KeyPort uses (resolved by name with `libloading`), and a
//! safe method for each that checks its buffers and turns a `SAR_` code into [`Sar`].
//!
//! Choices a vendor header leaves open, and what this module does about them:
//! - `ULONG` is 32 bits (`typedef UINT32 ULONG` in the Linux headers vendors ship and in
//!   GmSSL's); a library built with a 64-bit `unsigned long` would disagree on the structure
//!   layouts below, which nothing at run time can detect. Every ULONG *out*-parameter gets an
//!   8-byte zeroed slot, so a library that writes 8 bytes there cannot overwrite our stack.
//! - `BOOL` is `long` in some vendor headers (8 bytes on LP64 Linux) and 32 bits in others: the
//!   `pbDefaultPin` out-parameter gets the same 8-byte slot; `BOOL` arguments pass by value.
//! - Structures are `#pragma pack(1)`; values in the 64-byte ECC fields are right-aligned.
//! - Calling convention: `extern "system"` (stdcall on 32-bit Windows, where vendor headers
//!   declare `DEVAPI __stdcall`; the C convention everywhere else).
//!
//! Handles are raw pointers wrapped in types that are neither `Send` nor `Sync`: they stay on
//! the thread that opened them (the library's worker), a fact the compiler checks.
#![allow(unsafe_code)]

use std::ffi::{c_void, CString};
use std::path::Path;

use zeroize::Zeroizing;

pub(crate) type Ulong = u32;
type Bool = u32;
type RawHandle = *mut c_void;

/// A failed SKF call: the function's name and its return code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sar {
    pub(crate) function: &'static str,
    pub(crate) code: Ulong,
}

/// The return codes the shim itself tests for or reports (GM/T 0016-2012 Appendix A).
pub(crate) const SAR_OK: Ulong = 0;
pub(crate) const SAR_NOTSUPPORTYETERR: Ulong = 0x0A00_0003;
pub(crate) const SAR_INVALIDHANDLEERR: Ulong = 0x0A00_0005;
pub(crate) const SAR_INVALIDPARAMERR: Ulong = 0x0A00_0006;
pub(crate) const SAR_INDATALENERR: Ulong = 0x0A00_0010;
pub(crate) const SAR_INDATAERR: Ulong = 0x0A00_0011;
pub(crate) const SAR_CERTNOTFOUNTERR: Ulong = 0x0A00_001C;
pub(crate) const SAR_BUFFER_TOO_SMALL: Ulong = 0x0A00_0020;
pub(crate) const SAR_DEVICE_REMOVED: Ulong = 0x0A00_0023;
pub(crate) const SAR_PIN_INCORRECT: Ulong = 0x0A00_0024;
pub(crate) const SAR_PIN_LOCKED: Ulong = 0x0A00_0025;
pub(crate) const SAR_PIN_INVALID: Ulong = 0x0A00_0026;
pub(crate) const SAR_USER_NOT_LOGGED_IN: Ulong = 0x0A00_002D;
pub(crate) const SAR_APPLICATION_NOT_EXISTS: Ulong = 0x0A00_002E;
pub(crate) const SAR_FILE_NOT_EXIST: Ulong = 0x0A00_0031;
pub(crate) const SAR_FILE_ALREADY_EXIST: Ulong = 0x0A00_002F;

const TRUE: Bool = 1;
const FALSE: Bool = 0;
/// `ulPINType` of the user PIN.
const USER_TYPE: Ulong = 1;
/// SGD_SM2_1, the SM2 signature algorithm (GM/T 0006), SKF_GenECCKeyPair's `ulAlgId`.
const SGD_SM2_1: Ulong = 0x0002_0100;

/// SKF_GetContainerType's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ContainerType {
    Empty,
    Rsa,
    Ecc,
    Other(Ulong),
}

/// SKF_WaitForDevEvent's event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RawEvent {
    Inserted,
    Removed,
    Other(Ulong),
}

#[repr(C, packed(1))]
#[derive(Clone, Copy)]
struct Version {
    major: u8,
    minor: u8,
}

/// DEVINFO.
#[repr(C, packed(1))]
#[derive(Clone, Copy)]
struct DevInfo {
    version: Version,
    manufacturer: [u8; 64],
    issuer: [u8; 64],
    label: [u8; 32],
    serial_number: [u8; 32],
    hw_version: Version,
    firmware_version: Version,
    alg_sym_cap: Ulong,
    alg_asym_cap: Ulong,
    alg_hash_cap: Ulong,
    dev_auth_alg_id: Ulong,
    total_space: Ulong,
    free_space: Ulong,
    max_ecc_buffer_size: Ulong,
    max_buffer_size: Ulong,
    reserved: [u8; 64],
}

/// ECCPUBLICKEYBLOB.
#[repr(C, packed(1))]
#[derive(Clone, Copy)]
struct EccPublicKeyBlob {
    bit_len: Ulong,
    x: [u8; 64],
    y: [u8; 64],
}

/// ECCSIGNATUREBLOB.
#[repr(C, packed(1))]
#[derive(Clone, Copy)]
struct EccSignatureBlob {
    r: [u8; 64],
    s: [u8; 64],
}

/// DEVINFO's text fields, decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DeviceInfo {
    pub(crate) manufacturer: String,
    pub(crate) issuer: String,
    pub(crate) label: String,
    pub(crate) serial: String,
}

/// An SM2 public key from ECCPUBLICKEYBLOB: `04 ‖ X ‖ Y`, 32-byte coordinates.
pub(crate) type Sm2Point = [u8; 65];

/// SKF_GetPINInfo's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PinInfo {
    pub(crate) max_retries: Ulong,
    pub(crate) remaining: Ulong,
    pub(crate) default_pin: bool,
}

/// SKF_VerifyPIN's answer.
#[derive(Debug)]
pub(crate) enum Verify {
    Ok,
    /// The call failed; the retry count it reported (meaningful for SAR_PIN_INCORRECT).
    Failed(Sar, Ulong),
}

macro_rules! functions {
    ($( $field:ident : $name:literal = fn($($arg:ty),*) ; )*) => {
        /// The library's functions KeyPort calls; `None` when the library lacks one.
        struct Functions {
            $( $field: Option<unsafe extern "system" fn($($arg),*) -> Ulong>, )*
        }

        impl Functions {
            fn resolve(lib: &libloading::Library) -> Functions {
                Functions {
                    $(
                        // SAFETY: the symbol is looked up by the standard's name and given the
                        // standard's signature for it (GM/T 0016-2012 §6–7); we copy the
                        // function pointer out and keep `lib` loaded for as long as it is used
                        // (both live in `Skf`).
                        $field: unsafe {
                            lib.get::<unsafe extern "system" fn($($arg),*) -> Ulong>(
                                concat!($name, "\0").as_bytes(),
                            )
                        }
                        .ok()
                        .map(|sym| *sym),
                    )*
                }
            }
        }
    };
}

functions! {
    enum_dev: "SKF_EnumDev" = fn(Bool, *mut u8, *mut Ulong);
    connect_dev: "SKF_ConnectDev" = fn(*const u8, *mut RawHandle);
    disconnect_dev: "SKF_DisConnectDev" = fn(RawHandle);
    get_dev_info: "SKF_GetDevInfo" = fn(RawHandle, *mut DevInfo);
    enum_application: "SKF_EnumApplication" = fn(RawHandle, *mut u8, *mut Ulong);
    open_application: "SKF_OpenApplication" = fn(RawHandle, *const u8, *mut RawHandle);
    close_application: "SKF_CloseApplication" = fn(RawHandle);
    enum_container: "SKF_EnumContainer" = fn(RawHandle, *mut u8, *mut Ulong);
    open_container: "SKF_OpenContainer" = fn(RawHandle, *const u8, *mut RawHandle);
    close_container: "SKF_CloseContainer" = fn(RawHandle);
    get_container_type: "SKF_GetContainerType" = fn(RawHandle, *mut Ulong);
    export_certificate: "SKF_ExportCertificate" = fn(RawHandle, Bool, *mut u8, *mut Ulong);
    export_public_key: "SKF_ExportPublicKey" = fn(RawHandle, Bool, *mut u8, *mut Ulong);
    get_pin_info: "SKF_GetPINInfo" = fn(RawHandle, Ulong, *mut Ulong, *mut Ulong, *mut Bool);
    verify_pin: "SKF_VerifyPIN" = fn(RawHandle, Ulong, *const u8, *mut Ulong);
    clear_secure_state: "SKF_ClearSecureState" = fn(RawHandle);
    ecc_sign_data: "SKF_ECCSignData" = fn(RawHandle, *const u8, Ulong, *mut EccSignatureBlob);
    rsa_sign_data: "SKF_RSASignData" = fn(RawHandle, *const u8, Ulong, *mut u8, *mut Ulong);
    wait_for_dev_event: "SKF_WaitForDevEvent" = fn(*mut u8, *mut Ulong, *mut Ulong);
    cancel_wait_for_dev_event: "SKF_CancelWaitForDevEvent" = fn();
    create_container: "SKF_CreateContainer" = fn(RawHandle, *const u8, *mut RawHandle);
    delete_container: "SKF_DeleteContainer" = fn(RawHandle, *const u8);
    gen_ecc_key_pair: "SKF_GenECCKeyPair" = fn(RawHandle, Ulong, *mut EccPublicKeyBlob);
    import_certificate: "SKF_ImportCertificate" = fn(RawHandle, Bool, *const u8, Ulong);
}

/// A loaded SKF library. `Send + Sync`: it holds only the library mapping and function
/// pointers; the handles it gives out are confined to the thread that opened them.
pub(crate) struct Skf {
    f: Functions,
    /// Keeps the library mapped while the function pointers in `f` are used.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Skf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Skf")
    }
}

/// A device handle (DEVHANDLE), confined to its thread.
#[derive(Debug)]
pub(crate) struct DevHandle(RawHandle);
/// An application handle (HAPPLICATION), confined to its thread.
#[derive(Debug)]
pub(crate) struct AppHandle(RawHandle);
/// A container handle (HCONTAINER), confined to its thread.
#[derive(Debug)]
pub(crate) struct ContainerHandle(RawHandle);

/// An 8-byte zeroed slot for a ULONG or BOOL out-parameter (see the module docs).
#[derive(Default)]
struct Out([u32; 2]);

impl Out {
    fn with(value: Ulong) -> Out {
        Out([value, 0])
    }
    fn ptr(&mut self) -> *mut Ulong {
        self.0.as_mut_ptr()
    }
    /// The value: the low half on little-endian hosts, which is what both widths write.
    fn get(&self) -> Ulong {
        if cfg!(target_endian = "little") || self.0[1] == 0 {
            self.0[0]
        } else {
            self.0[1]
        }
    }
}

/// The most bytes a name list, certificate or signature may take (larger answers are refused
/// as SAR_BUFFER_TOO_SMALL rather than allocated).
const MAX_BUFFER: Ulong = 1 << 20;

impl Skf {
    /// dlopen()s the library and resolves its functions.
    pub(crate) fn load(path: &Path) -> Result<Skf, libloading::Error> {
        // SAFETY: loading a shared library runs its initialisers. The path is an SKF library
        // the user configured or a well-known vendor path; such libraries are made to be
        // dlopen()ed by applications like this one.
        let lib = unsafe { libloading::Library::new(path) }?;
        let f = Functions::resolve(&lib);
        Ok(Skf { f, _lib: lib })
    }

    /// Names of the functions KeyPort needs that the library does not export.
    pub(crate) fn missing(&self) -> Vec<&'static str> {
        let f = &self.f;
        let all: [(&'static str, bool); 24] = [
            ("SKF_EnumDev", f.enum_dev.is_some()),
            ("SKF_ConnectDev", f.connect_dev.is_some()),
            ("SKF_DisConnectDev", f.disconnect_dev.is_some()),
            ("SKF_GetDevInfo", f.get_dev_info.is_some()),
            ("SKF_EnumApplication", f.enum_application.is_some()),
            ("SKF_OpenApplication", f.open_application.is_some()),
            ("SKF_CloseApplication", f.close_application.is_some()),
            ("SKF_EnumContainer", f.enum_container.is_some()),
            ("SKF_OpenContainer", f.open_container.is_some()),
            ("SKF_CloseContainer", f.close_container.is_some()),
            ("SKF_GetContainerType", f.get_container_type.is_some()),
            ("SKF_ExportCertificate", f.export_certificate.is_some()),
            ("SKF_ExportPublicKey", f.export_public_key.is_some()),
            ("SKF_GetPINInfo", f.get_pin_info.is_some()),
            ("SKF_VerifyPIN", f.verify_pin.is_some()),
            ("SKF_ClearSecureState", f.clear_secure_state.is_some()),
            ("SKF_ECCSignData", f.ecc_sign_data.is_some()),
            ("SKF_RSASignData", f.rsa_sign_data.is_some()),
            ("SKF_WaitForDevEvent", f.wait_for_dev_event.is_some()),
            (
                "SKF_CancelWaitForDevEvent",
                f.cancel_wait_for_dev_event.is_some(),
            ),
            ("SKF_CreateContainer", f.create_container.is_some()),
            ("SKF_DeleteContainer", f.delete_container.is_some()),
            ("SKF_GenECCKeyPair", f.gen_ecc_key_pair.is_some()),
            ("SKF_ImportCertificate", f.import_certificate.is_some()),
        ];
        all.into_iter()
            .filter_map(|(name, present)| (!present).then_some(name))
            .collect()
    }

    /// SKF_EnumDev(TRUE): the names of the devices present (raw bytes: vendors use ASCII,
    /// UTF-8 or GBK, and a name must go back to the library byte for byte).
    pub(crate) fn enum_dev(&self) -> Result<Vec<Vec<u8>>, Sar> {
        const NAME: &str = "SKF_EnumDev";
        let f = need(self.f.enum_dev, NAME)?;
        read_list(NAME, |buf, len| {
            // SAFETY: `f` has the standard's signature; `buf` is null or valid for `*len`
            // bytes and `len` points to a live 8-byte slot (read_list's contract).
            unsafe { f(TRUE, buf, len) }
        })
    }

    /// SKF_ConnectDev.
    pub(crate) fn connect_dev(&self, name: &[u8]) -> Result<DevHandle, Sar> {
        const NAME: &str = "SKF_ConnectDev";
        let f = need(self.f.connect_dev, NAME)?;
        let name = c_string(NAME, name)?;
        let mut h: RawHandle = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated and outlives the call; `h` is a valid out-pointer.
        check(NAME, unsafe { f(name.as_ptr().cast(), &mut h) })?;
        non_null(NAME, h).map(DevHandle)
    }

    /// SKF_DisConnectDev (errors are only logged: the handle is gone either way).
    pub(crate) fn disconnect_dev(&self, dev: DevHandle) {
        const NAME: &str = "SKF_DisConnectDev";
        if let Some(f) = self.f.disconnect_dev {
            // SAFETY: `dev` came from SKF_ConnectDev of this library and is consumed here.
            let rv = unsafe { f(dev.0) };
            log_close(NAME, rv);
        }
    }

    /// SKF_GetDevInfo.
    pub(crate) fn dev_info(&self, dev: &DevHandle) -> Result<DeviceInfo, Sar> {
        const NAME: &str = "SKF_GetDevInfo";
        let f = need(self.f.get_dev_info, NAME)?;
        // A zeroed DEVINFO is a valid value: integers and byte arrays only.
        let mut info = DevInfo {
            version: Version { major: 0, minor: 0 },
            manufacturer: [0; 64],
            issuer: [0; 64],
            label: [0; 32],
            serial_number: [0; 32],
            hw_version: Version { major: 0, minor: 0 },
            firmware_version: Version { major: 0, minor: 0 },
            alg_sym_cap: 0,
            alg_asym_cap: 0,
            alg_hash_cap: 0,
            dev_auth_alg_id: 0,
            total_space: 0,
            free_space: 0,
            max_ecc_buffer_size: 0,
            max_buffer_size: 0,
            reserved: [0; 64],
        };
        // SAFETY: `dev` is a live handle of this library; `info` is a DEVINFO-sized,
        // writable, packed structure.
        check(NAME, unsafe { f(dev.0, &mut info) })?;
        Ok(DeviceInfo {
            manufacturer: fixed_text(&info.manufacturer),
            issuer: fixed_text(&info.issuer),
            label: fixed_text(&info.label),
            serial: fixed_text(&info.serial_number),
        })
    }

    /// SKF_EnumApplication.
    pub(crate) fn applications(&self, dev: &DevHandle) -> Result<Vec<Vec<u8>>, Sar> {
        const NAME: &str = "SKF_EnumApplication";
        let f = need(self.f.enum_application, NAME)?;
        read_list(NAME, |buf, len| {
            // SAFETY: `dev` is a live handle; buffers as in read_list's contract.
            unsafe { f(dev.0, buf, len) }
        })
    }

    /// SKF_OpenApplication.
    pub(crate) fn open_application(&self, dev: &DevHandle, name: &[u8]) -> Result<AppHandle, Sar> {
        const NAME: &str = "SKF_OpenApplication";
        let f = need(self.f.open_application, NAME)?;
        let name = c_string(NAME, name)?;
        let mut h: RawHandle = std::ptr::null_mut();
        // SAFETY: live device handle; NUL-terminated name; valid out-pointer.
        check(NAME, unsafe { f(dev.0, name.as_ptr().cast(), &mut h) })?;
        non_null(NAME, h).map(AppHandle)
    }

    /// SKF_CloseApplication (errors only logged).
    pub(crate) fn close_application(&self, app: AppHandle) {
        const NAME: &str = "SKF_CloseApplication";
        if let Some(f) = self.f.close_application {
            // SAFETY: `app` came from SKF_OpenApplication of this library and is consumed.
            log_close(NAME, unsafe { f(app.0) });
        }
    }

    /// SKF_EnumContainer.
    pub(crate) fn containers(&self, app: &AppHandle) -> Result<Vec<Vec<u8>>, Sar> {
        const NAME: &str = "SKF_EnumContainer";
        let f = need(self.f.enum_container, NAME)?;
        read_list(NAME, |buf, len| {
            // SAFETY: `app` is a live handle; buffers as in read_list's contract.
            unsafe { f(app.0, buf, len) }
        })
    }

    /// SKF_OpenContainer.
    pub(crate) fn open_container(
        &self,
        app: &AppHandle,
        name: &[u8],
    ) -> Result<ContainerHandle, Sar> {
        const NAME: &str = "SKF_OpenContainer";
        let f = need(self.f.open_container, NAME)?;
        let name = c_string(NAME, name)?;
        let mut h: RawHandle = std::ptr::null_mut();
        // SAFETY: live application handle; NUL-terminated name; valid out-pointer.
        check(NAME, unsafe { f(app.0, name.as_ptr().cast(), &mut h) })?;
        non_null(NAME, h).map(ContainerHandle)
    }

    /// SKF_CloseContainer (errors only logged).
    pub(crate) fn close_container(&self, c: ContainerHandle) {
        const NAME: &str = "SKF_CloseContainer";
        if let Some(f) = self.f.close_container {
            // SAFETY: `c` came from SKF_OpenContainer of this library and is consumed.
            log_close(NAME, unsafe { f(c.0) });
        }
    }

    /// SKF_GetContainerType.
    pub(crate) fn container_type(&self, c: &ContainerHandle) -> Result<ContainerType, Sar> {
        const NAME: &str = "SKF_GetContainerType";
        let f = need(self.f.get_container_type, NAME)?;
        let mut t = Out::default();
        // SAFETY: live container handle; `t` is an 8-byte writable slot.
        check(NAME, unsafe { f(c.0, t.ptr()) })?;
        Ok(match t.get() {
            0 => ContainerType::Empty,
            1 => ContainerType::Rsa,
            2 => ContainerType::Ecc,
            other => ContainerType::Other(other),
        })
    }

    /// SKF_ExportCertificate: the signing (`sign`) or encryption certificate, DER.
    pub(crate) fn certificate(&self, c: &ContainerHandle, sign: bool) -> Result<Vec<u8>, Sar> {
        const NAME: &str = "SKF_ExportCertificate";
        let f = need(self.f.export_certificate, NAME)?;
        let flag = if sign { TRUE } else { FALSE };
        read_bytes(NAME, |buf, len| {
            // SAFETY: live container handle; buffers as in read_bytes' contract.
            unsafe { f(c.0, flag, buf, len) }
        })
    }

    /// SKF_ExportPublicKey of an ECC container's signing key, as an uncompressed point.
    pub(crate) fn sm2_public_key(&self, c: &ContainerHandle) -> Result<Sm2Point, Sar> {
        const NAME: &str = "SKF_ExportPublicKey";
        let f = need(self.f.export_public_key, NAME)?;
        let mut blob = EccPublicKeyBlob {
            bit_len: 0,
            x: [0; 64],
            y: [0; 64],
        };
        let mut len = Out::with(size_of_ulong::<EccPublicKeyBlob>());
        // SAFETY: live container handle; `blob` is writable for the size we pass in `len`.
        let rv = unsafe { f(c.0, TRUE, std::ptr::from_mut(&mut blob).cast(), len.ptr()) };
        check(NAME, rv)?;
        sm2_point(NAME, &blob)
    }

    /// SKF_CreateContainer: a new, empty container named `name`.
    pub(crate) fn create_container(
        &self,
        app: &AppHandle,
        name: &[u8],
    ) -> Result<ContainerHandle, Sar> {
        const NAME: &str = "SKF_CreateContainer";
        let f = need(self.f.create_container, NAME)?;
        let name = c_string(NAME, name)?;
        let mut h: RawHandle = std::ptr::null_mut();
        // SAFETY: live application handle; NUL-terminated name; valid out-pointer.
        check(NAME, unsafe { f(app.0, name.as_ptr().cast(), &mut h) })?;
        non_null(NAME, h).map(ContainerHandle)
    }

    /// SKF_DeleteContainer: the container and every key and certificate in it.
    pub(crate) fn delete_container(&self, app: &AppHandle, name: &[u8]) -> Result<(), Sar> {
        const NAME: &str = "SKF_DeleteContainer";
        let f = need(self.f.delete_container, NAME)?;
        let name = c_string(NAME, name)?;
        // SAFETY: live application handle; NUL-terminated name that outlives the call.
        check(NAME, unsafe { f(app.0, name.as_ptr().cast()) })
    }

    /// SKF_GenECCKeyPair(SGD_SM2_1): a new SM2 signing key pair in the container; its public
    /// key as an uncompressed point.
    pub(crate) fn gen_sm2_key_pair(&self, c: &ContainerHandle) -> Result<Sm2Point, Sar> {
        const NAME: &str = "SKF_GenECCKeyPair";
        let f = need(self.f.gen_ecc_key_pair, NAME)?;
        let mut blob = EccPublicKeyBlob {
            bit_len: 0,
            x: [0; 64],
            y: [0; 64],
        };
        // SAFETY: live container handle; `blob` is a writable ECCPUBLICKEYBLOB.
        check(NAME, unsafe { f(c.0, SGD_SM2_1, &mut blob) })?;
        sm2_point(NAME, &blob)
    }

    /// SKF_ImportCertificate into the signing (`sign`) or encryption slot.
    pub(crate) fn import_certificate(
        &self,
        c: &ContainerHandle,
        sign: bool,
        der: &[u8],
    ) -> Result<(), Sar> {
        const NAME: &str = "SKF_ImportCertificate";
        let f = need(self.f.import_certificate, NAME)?;
        let len = Ulong::try_from(der.len()).map_err(|_| Sar {
            function: NAME,
            code: SAR_INDATALENERR,
        })?;
        let flag = if sign { TRUE } else { FALSE };
        // SAFETY: live container handle; `der` is readable for `len` bytes during the call.
        check(NAME, unsafe { f(c.0, flag, der.as_ptr(), len) })
    }

    /// SKF_GetPINInfo for the user PIN.
    pub(crate) fn pin_info(&self, app: &AppHandle) -> Result<PinInfo, Sar> {
        const NAME: &str = "SKF_GetPINInfo";
        let f = need(self.f.get_pin_info, NAME)?;
        let (mut max, mut remaining, mut default_pin) =
            (Out::default(), Out::default(), Out::default());
        // SAFETY: live application handle; three 8-byte writable slots.
        let rv = unsafe {
            f(
                app.0,
                USER_TYPE,
                max.ptr(),
                remaining.ptr(),
                default_pin.ptr(),
            )
        };
        check(NAME, rv)?;
        Ok(PinInfo {
            max_retries: max.get(),
            remaining: remaining.get(),
            default_pin: default_pin.get() != 0,
        })
    }

    /// SKF_VerifyPIN for the user PIN: exactly one call. The PIN's C copy is zeroed after it.
    pub(crate) fn verify_pin(&self, app: &AppHandle, pin: &str) -> Result<Verify, Sar> {
        const NAME: &str = "SKF_VerifyPIN";
        let f = need(self.f.verify_pin, NAME)?;
        if pin.as_bytes().contains(&0) {
            return Err(Sar {
                function: NAME,
                code: SAR_PIN_INVALID,
            });
        }
        let mut c_pin: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::with_capacity(pin.len() + 1));
        c_pin.extend_from_slice(pin.as_bytes());
        c_pin.push(0);
        let mut retries = Out::default();
        // SAFETY: live application handle; `c_pin` is NUL-terminated and outlives the call;
        // `retries` is an 8-byte writable slot.
        let rv = unsafe { f(app.0, USER_TYPE, c_pin.as_ptr(), retries.ptr()) };
        Ok(if rv == SAR_OK {
            Verify::Ok
        } else {
            Verify::Failed(
                Sar {
                    function: NAME,
                    code: rv,
                },
                retries.get(),
            )
        })
    }

    /// SKF_ClearSecureState: forget the PIN verification of this application.
    pub(crate) fn clear_secure_state(&self, app: &AppHandle) -> Result<(), Sar> {
        const NAME: &str = "SKF_ClearSecureState";
        let f = need(self.f.clear_secure_state, NAME)?;
        // SAFETY: live application handle.
        check(NAME, unsafe { f(app.0) })
    }

    /// SKF_ECCSignData over `e` (32 bytes); returns r and s (32 bytes each).
    pub(crate) fn ecc_sign(
        &self,
        c: &ContainerHandle,
        e: &[u8; 32],
    ) -> Result<([u8; 32], [u8; 32]), Sar> {
        const NAME: &str = "SKF_ECCSignData";
        let f = need(self.f.ecc_sign_data, NAME)?;
        let mut blob = EccSignatureBlob {
            r: [0; 64],
            s: [0; 64],
        };
        // SAFETY: live container handle; `e` is readable for 32 bytes; `blob` is a writable
        // ECCSIGNATUREBLOB.
        check(NAME, unsafe { f(c.0, e.as_ptr(), 32, &mut blob) })?;
        let (r, s) = (blob.r, blob.s);
        if r[..32].iter().chain(&s[..32]).any(|&b| b != 0) {
            // A value wider than the SM2 order: not an SM2 signature.
            return Err(Sar {
                function: NAME,
                code: SAR_INDATAERR,
            });
        }
        let mut out = ([0u8; 32], [0u8; 32]);
        out.0.copy_from_slice(&r[32..]);
        out.1.copy_from_slice(&s[32..]);
        Ok(out)
    }

    /// SKF_RSASignData over `data` (a DigestInfo): PKCS#1 v1.5 signature.
    pub(crate) fn rsa_sign(&self, c: &ContainerHandle, data: &[u8]) -> Result<Vec<u8>, Sar> {
        const NAME: &str = "SKF_RSASignData";
        let f = need(self.f.rsa_sign_data, NAME)?;
        let data_len = Ulong::try_from(data.len()).map_err(|_| Sar {
            function: NAME,
            code: SAR_INDATALENERR,
        })?;
        // One call with a buffer for the largest RSA key the standard allows (4096 bits);
        // vendors differ on whether a NULL output is a length query.
        let mut sig = vec![0u8; 512];
        let mut len = Out::with(512);
        // SAFETY: live container handle; `data` readable for `data_len` bytes; `sig`
        // writable for the 512 bytes announced in `len`.
        let rv = unsafe { f(c.0, data.as_ptr(), data_len, sig.as_mut_ptr(), len.ptr()) };
        check(NAME, rv)?;
        let n = usize::try_from(len.get()).unwrap_or(usize::MAX);
        if n == 0 || n > sig.len() {
            return Err(Sar {
                function: NAME,
                code: SAR_BUFFER_TOO_SMALL,
            });
        }
        sig.truncate(n);
        Ok(sig)
    }

    /// SKF_WaitForDevEvent: blocks until a device comes or goes (or the wait is cancelled).
    pub(crate) fn wait_for_dev_event(&self) -> Result<(String, RawEvent), Sar> {
        const NAME: &str = "SKF_WaitForDevEvent";
        let f = need(self.f.wait_for_dev_event, NAME)?;
        let mut name = vec![0u8; 256];
        let mut len = Out::with(256);
        let mut event = Out::default();
        // SAFETY: `name` is writable for the 256 bytes announced in `len`; `len` and `event`
        // are 8-byte writable slots.
        check(NAME, unsafe {
            f(name.as_mut_ptr(), len.ptr(), event.ptr())
        })?;
        let event = match event.get() {
            1 => RawEvent::Inserted,
            2 => RawEvent::Removed,
            other => RawEvent::Other(other),
        };
        Ok((fixed_text(&name), event))
    }

    /// SKF_CancelWaitForDevEvent.
    pub(crate) fn cancel_wait_for_dev_event(&self) -> Result<(), Sar> {
        const NAME: &str = "SKF_CancelWaitForDevEvent";
        let f = need(self.f.cancel_wait_for_dev_event, NAME)?;
        // SAFETY: no arguments; the standard allows it from any thread.
        check(NAME, unsafe { f() })
    }
}

/// An ECCPUBLICKEYBLOB holding a 256-bit point, as `04 ‖ X ‖ Y` (each right-aligned in its
/// 64-byte field); any other blob is SAR_INDATAERR from `function`.
fn sm2_point(function: &'static str, blob: &EccPublicKeyBlob) -> Result<Sm2Point, Sar> {
    let bit_len = blob.bit_len;
    if bit_len != 256 || blob.x[..32].iter().chain(&blob.y[..32]).any(|&b| b != 0) {
        return Err(Sar {
            function,
            code: SAR_INDATAERR,
        });
    }
    let mut point = [0u8; 65];
    point[0] = 0x04;
    point[1..33].copy_from_slice(&blob.x[32..]);
    point[33..].copy_from_slice(&blob.y[32..]);
    Ok(point)
}

fn need<F>(f: Option<F>, function: &'static str) -> Result<F, Sar> {
    // The library does not export the function.
    f.ok_or(Sar {
        function,
        code: SAR_NOTSUPPORTYETERR,
    })
}

fn check(function: &'static str, rv: Ulong) -> Result<(), Sar> {
    if rv == SAR_OK {
        Ok(())
    } else {
        Err(Sar { function, code: rv })
    }
}

fn non_null(function: &'static str, h: RawHandle) -> Result<RawHandle, Sar> {
    if h.is_null() {
        // Success with no handle.
        Err(Sar {
            function,
            code: SAR_INVALIDHANDLEERR,
        })
    } else {
        Ok(h)
    }
}

fn log_close(function: &'static str, rv: Ulong) {
    if rv != SAR_OK {
        tracing::debug!(
            function,
            rv = format_args!("0x{rv:08X}"),
            "closing a handle failed"
        );
    }
}

fn c_string(function: &'static str, s: &[u8]) -> Result<CString, Sar> {
    CString::new(s).map_err(|_| Sar {
        function,
        code: SAR_INVALIDPARAMERR,
    })
}

fn size_of_ulong<T>() -> Ulong {
    // Our structures are a few hundred bytes.
    Ulong::try_from(std::mem::size_of::<T>()).unwrap_or(Ulong::MAX)
}

/// The standard's two-call convention for variable-length output: ask for the size with a
/// NULL buffer, then fetch. `call(buf, len)` must call the SKF function with `buf` (null or
/// writable for `*len` bytes) and `len` (a live, 8-byte, read-write slot).
fn read_bytes(
    function: &'static str,
    mut call: impl FnMut(*mut u8, *mut Ulong) -> Ulong,
) -> Result<Vec<u8>, Sar> {
    let too_big = Sar {
        function,
        code: SAR_BUFFER_TOO_SMALL,
    };
    let mut len = Out::default();
    check(function, call(std::ptr::null_mut(), len.ptr()))?;
    // A library may change its mind between the two calls (a device changed): retry once.
    for _ in 0..2 {
        let want = len.get();
        if want > MAX_BUFFER {
            return Err(too_big);
        }
        let mut buf = vec![0u8; usize::try_from(want).map_err(|_| too_big)?];
        let mut got = Out::with(want);
        match call(buf.as_mut_ptr(), got.ptr()) {
            SAR_OK => {
                let n = usize::try_from(got.get()).map_err(|_| too_big)?;
                if n > buf.len() {
                    return Err(too_big);
                }
                buf.truncate(n);
                return Ok(buf);
            }
            SAR_BUFFER_TOO_SMALL => len = got,
            rv => return Err(Sar { function, code: rv }),
        }
    }
    Err(too_big)
}

/// [`read_bytes`] for a name list (`a\0b\0\0`).
fn read_list(
    function: &'static str,
    call: impl FnMut(*mut u8, *mut Ulong) -> Ulong,
) -> Result<Vec<Vec<u8>>, Sar> {
    let bytes = read_bytes(function, call)?;
    Ok(split_list(&bytes))
}

/// `a\0bc\0\0` → ["a", "bc"]; stops at the first empty name. Names stay bytes.
pub(crate) fn split_list(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|&b| b == 0)
        .take_while(|name| !name.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// A fixed C character field: up to the first NUL, trimmed.
fn fixed_text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake SKF output function: answers a size query with `sizes[call]`, and a fetch with
    /// `data` if it fits, as the standard says — or lies, as `lie` says.
    struct Fake {
        sizes: Vec<Ulong>,
        data: Vec<u8>,
        calls: usize,
        lie: Option<Ulong>,
    }

    impl Fake {
        fn call(&mut self, buf: *mut u8, len: *mut Ulong) -> Ulong {
            let size = self.sizes[self.calls.min(self.sizes.len() - 1)];
            self.calls += 1;
            // SAFETY: `len` is read_bytes' live slot, valid for reads and writes of a ULONG.
            let capacity = unsafe { len.read() };
            // SAFETY: as above.
            unsafe { len.write(self.lie.unwrap_or(size)) };
            if buf.is_null() {
                return SAR_OK;
            }
            if capacity < size {
                return SAR_BUFFER_TOO_SMALL;
            }
            let n = self.data.len().min(size as usize);
            // SAFETY: read_bytes made `buf` writable for `capacity >= size >= n` bytes.
            unsafe { std::ptr::copy_nonoverlapping(self.data.as_ptr(), buf, n) };
            SAR_OK
        }
    }

    fn fake(sizes: &[Ulong], data: &[u8], lie: Option<Ulong>) -> Fake {
        Fake {
            sizes: sizes.to_vec(),
            data: data.to_vec(),
            calls: 0,
            lie,
        }
    }

    #[test]
    fn the_two_call_convention_reads_exactly_the_answer() {
        let mut f = fake(&[4], b"abcd", None);
        assert_eq!(
            read_bytes("SKF_T", |b, l| f.call(b, l)),
            Ok(b"abcd".to_vec())
        );
        assert_eq!(f.calls, 2);
    }

    #[test]
    fn an_answer_that_grew_between_the_calls_is_fetched_again() {
        // Size query says 2, the fetch finds 4 (a device changed meanwhile).
        let mut f = fake(&[2, 4, 4], b"abcd", None);
        assert_eq!(
            read_bytes("SKF_T", |b, l| f.call(b, l)),
            Ok(b"abcd".to_vec())
        );
        assert_eq!(f.calls, 3);
    }

    #[test]
    fn a_library_claiming_more_than_it_was_given_is_refused() {
        // It answers OK but says it wrote 100 bytes into a 4-byte buffer: never read past it.
        let mut f = fake(&[4], b"abcd", None);
        let mut first = true;
        let result = read_bytes("SKF_T", |b, l| {
            let rv = f.call(b, l);
            if !b.is_null() && first {
                first = false;
                // SAFETY: `l` is read_bytes' live slot.
                unsafe { l.write(100) };
            }
            rv
        });
        assert_eq!(
            result,
            Err(Sar {
                function: "SKF_T",
                code: SAR_BUFFER_TOO_SMALL
            })
        );
    }

    #[test]
    fn a_huge_or_ever_growing_answer_is_refused_not_allocated() {
        let mut f = fake(&[MAX_BUFFER + 1], b"", None);
        assert!(read_bytes("SKF_T", |b, l| f.call(b, l)).is_err());
        // Grows at every call: gives up after one retry.
        let mut f = fake(&[2, 4, 8, 16], b"abcdefghijklmnop", None);
        assert!(read_bytes("SKF_T", |b, l| f.call(b, l)).is_err());
        assert_eq!(f.calls, 3);
    }

    #[test]
    fn an_out_slot_written_as_64_bits_reads_back() {
        let mut slot = Out::default();
        // SAFETY: the slot is 8 bytes, as a library with a 64-bit ULONG would write.
        unsafe { slot.ptr().cast::<u64>().write_unaligned(300) };
        assert_eq!(slot.get(), 300);
    }

    #[test]
    fn name_lists_split_at_nul_and_stop_at_the_double_nul() {
        assert_eq!(
            split_list(b"dev0\0\xd5\xc5\0\0junk"),
            vec![b"dev0".to_vec(), b"\xd5\xc5".to_vec()],
            "a GBK name stays as it was"
        );
        assert_eq!(split_list(b"\0"), Vec::<Vec<u8>>::new());
        assert_eq!(split_list(b""), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn structures_have_the_packed_sizes_of_the_header() {
        assert_eq!(std::mem::size_of::<DevInfo>(), 294);
        assert_eq!(std::mem::size_of::<EccPublicKeyBlob>(), 132);
        assert_eq!(std::mem::size_of::<EccSignatureBlob>(), 128);
    }

    #[test]
    fn only_a_256_bit_right_aligned_blob_is_an_sm2_point() {
        let mut blob = EccPublicKeyBlob {
            bit_len: 256,
            x: [0; 64],
            y: [0; 64],
        };
        blob.x[32..].fill(0x11);
        blob.y[32..].fill(0x22);
        let point = sm2_point("SKF_GenECCKeyPair", &blob).expect("a point");
        assert_eq!(point[0], 0x04);
        assert_eq!(&point[1..33], &[0x11; 32]);
        assert_eq!(&point[33..], &[0x22; 32]);
        let refused = Err(Sar {
            function: "SKF_GenECCKeyPair",
            code: SAR_INDATAERR,
        });
        blob.bit_len = 384;
        assert_eq!(
            sm2_point("SKF_GenECCKeyPair", &blob),
            refused,
            "not 256 bits"
        );
        blob.bit_len = 256;
        blob.x[31] = 1;
        assert_eq!(
            sm2_point("SKF_GenECCKeyPair", &blob),
            refused,
            "a coordinate wider than 32 bytes"
        );
    }

    #[test]
    fn fixed_text_stops_at_nul() {
        assert_eq!(fixed_text(b"KP-0001\0\0garbage"), "KP-0001");
        assert_eq!(fixed_text(b"  padded  "), "padded");
    }
}
