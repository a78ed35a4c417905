//! keyport-soft-skf: a test-only SKF library (GM/T 0016-2012, the "smart token crypto
//! application interface" of Chinese USB keys). It exports the SKF functions KeyPort calls with
//! the standard's C signatures and structures, and keeps its token in a directory the test
//! writes (layout in [`state`]): devices that can be plugged and pulled, applications with a user
//! PIN and a persisted retry counter, containers with an SM2 signing key and certificate plus an
//! encryption certificate (as dual-certificate keys have), and an RSA container. Keys are
//! RustCrypto `sm2` and `rsa`; `SKF_ECCSignData` signs the caller's e as the standard says.
//!
//! - `KEYPORT_SOFT_SKF_DIR`: the state directory, read **once**, at this library instance's
//!   first SKF call (load a private copy of the .so per test to get an instance per test).
//! - Every SKF call appends `SKF_Name rv=0x........` to `STATE/calls.log` (never an argument).
//! - `STATE/fault.conf` makes calls crash, hang or deadlock (see `fault`).
//!
//! This crate is a C ABI library, so unlike the rest of the workspace it uses `unsafe`; every
//! unsafe block states why it is sound (`clippy::undocumented_unsafe_blocks` is denied).
//! Handles are small integers disguised as pointers; nothing is ever dereferenced through them.

pub mod abi;
mod fault;
pub mod state;

use std::ffi::{c_void, CStr, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::abi::*;
use crate::state::{Sar, Soft};

/// Names the state directory.
pub const DIR_ENV: &str = "KEYPORT_SOFT_SKF_DIR";

/// The library's state, made at the first SKF call of this instance.
fn soft() -> Result<&'static Soft, Sar> {
    static SOFT: OnceLock<Option<Soft>> = OnceLock::new();
    SOFT.get_or_init(|| match std::env::var_os(DIR_ENV) {
        Some(dir) => Some(Soft::new(PathBuf::from(dir))),
        None => {
            eprintln!("keyport-soft-skf: {DIR_ENV} is not set");
            None
        }
    })
    .as_ref()
    .ok_or(SAR_FAIL)
}

/// Runs one SKF function: finds the state, runs `body`, logs `name rv=...`.
fn call(name: &'static str, body: impl FnOnce(&Soft) -> Result<(), Sar>) -> ULONG {
    match soft() {
        Ok(soft) => {
            fault::before(soft.root(), name, |line| soft.log_line(line));
            let rv = match body(soft) {
                Ok(()) => SAR_OK,
                Err(sar) => sar,
            };
            soft.log_call(name, rv);
            rv
        }
        Err(sar) => sar,
    }
}

fn handle_id(h: HANDLE) -> usize {
    h.addr()
}

fn make_handle(id: usize) -> HANDLE {
    std::ptr::without_provenance_mut::<c_void>(id)
}

/// Reads a NUL-terminated name argument, as the bytes it is (names are ASCII, UTF-8 or GBK on
/// real keys; they are file names here, which Unix keeps as bytes).
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string valid for the call.
unsafe fn name_arg<'a>(p: *const u8) -> Result<&'a OsStr, Sar> {
    if p.is_null() {
        return Err(SAR_INVALIDPARAMERR);
    }
    // SAFETY: non-null and, by the caller's contract, NUL-terminated and valid for the call.
    let text = unsafe { CStr::from_ptr(p.cast()) };
    Ok(OsStr::from_bytes(text.to_bytes()))
}

/// Writes `value` through an out-pointer.
///
/// # Safety
/// `p` must be null or valid for writing one `T`.
unsafe fn put<T>(p: *mut T, value: T) -> Result<(), Sar> {
    if p.is_null() {
        return Err(SAR_INVALIDPARAMERR);
    }
    // SAFETY: non-null and, by the caller's contract, valid for one write of `T`. The C side
    // gives no alignment promise for packed structures, hence the unaligned write.
    unsafe { p.write_unaligned(value) };
    Ok(())
}

/// The standard's two-call buffer convention: a NULL buffer asks for the size; a buffer too
/// small gets SAR_BUFFER_TOO_SMALL and the size; otherwise the bytes and their length.
///
/// # Safety
/// `len` must be null or valid for reading and writing one ULONG; `buf` must be null or valid
/// for writing `*len` bytes.
unsafe fn put_bytes(bytes: &[u8], buf: *mut u8, len: *mut ULONG) -> Result<(), Sar> {
    if len.is_null() {
        return Err(SAR_INVALIDPARAMERR);
    }
    let needed = ULONG::try_from(bytes.len()).map_err(|_| SAR_FAIL)?;
    // SAFETY: `len` is non-null and valid for reads by the caller's contract.
    let capacity = unsafe { len.read_unaligned() };
    // SAFETY: as above, valid for writes.
    unsafe { len.write_unaligned(needed) };
    if buf.is_null() {
        return Ok(());
    }
    if capacity < needed {
        return Err(SAR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `buf` holds at least `capacity >= bytes.len()` writable bytes (caller's contract)
    // and cannot overlap our own `bytes`.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf, bytes.len()) };
    Ok(())
}

/// A name list: each name NUL-terminated, the list ended by a second NUL.
fn name_list<I: IntoIterator<Item = OsString>>(names: I) -> Vec<u8> {
    let mut out = Vec::new();
    for n in names {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
    }
    out.push(0);
    out
}

/// # Safety
/// `sz_name_list` null or valid for `*pul_size` bytes; `pul_size` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_EnumDev(
    b_present: BOOL,
    sz_name_list: LPSTR,
    pul_size: *mut ULONG,
) -> ULONG {
    call("SKF_EnumDev", |soft| {
        let names = if b_present != 0 {
            soft.present_devices()
        } else {
            soft.all_devices()
        };
        // SAFETY: the caller's contract is put_bytes' contract.
        unsafe { put_bytes(&name_list(names), sz_name_list, pul_size) }
    })
}

/// # Safety
/// `sz_name` NUL-terminated; `ph_dev` valid for one HANDLE.
#[no_mangle]
pub unsafe extern "system" fn SKF_ConnectDev(sz_name: LPSTR, ph_dev: *mut HANDLE) -> ULONG {
    call("SKF_ConnectDev", |soft| {
        // SAFETY: the caller passes a NUL-terminated device name.
        let name = unsafe { name_arg(sz_name) }?;
        let id = soft.connect(name)?;
        // SAFETY: `ph_dev` is valid for one HANDLE by the caller's contract.
        unsafe { put(ph_dev, make_handle(id)) }
    })
}

/// # Safety
/// Any handle value is accepted (unknown ones are SAR_INVALIDHANDLEERR).
#[no_mangle]
pub unsafe extern "system" fn SKF_DisConnectDev(h_dev: HANDLE) -> ULONG {
    call("SKF_DisConnectDev", |soft| {
        soft.close(handle_id(h_dev)).map(|_| ())
    })
}

/// # Safety
/// `sz_dev_name` NUL-terminated; `pul_dev_state` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_GetDevState(
    sz_dev_name: LPSTR,
    pul_dev_state: *mut ULONG,
) -> ULONG {
    call("SKF_GetDevState", |soft| {
        // SAFETY: the caller passes a NUL-terminated device name.
        let name = unsafe { name_arg(sz_dev_name) }?;
        let state = if soft.is_present(name) {
            DEV_PRESENT_STATE
        } else {
            DEV_ABSENT_STATE
        };
        // SAFETY: valid for one ULONG by the caller's contract.
        unsafe { put(pul_dev_state, state) }
    })
}

/// # Safety
/// `p_dev_info` valid for one DEVINFO.
#[no_mangle]
pub unsafe extern "system" fn SKF_GetDevInfo(h_dev: HANDLE, p_dev_info: *mut DEVINFO) -> ULONG {
    call("SKF_GetDevInfo", |soft| {
        let info = soft.device_info(handle_id(h_dev))?;
        // SAFETY: valid for one DEVINFO by the caller's contract.
        unsafe { put(p_dev_info, info) }
    })
}

/// # Safety
/// `sz_app_name` null or valid for `*pul_size` bytes; `pul_size` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_EnumApplication(
    h_dev: HANDLE,
    sz_app_name: LPSTR,
    pul_size: *mut ULONG,
) -> ULONG {
    call("SKF_EnumApplication", |soft| {
        let apps = soft.applications(handle_id(h_dev))?;
        // SAFETY: the caller's contract is put_bytes' contract.
        unsafe { put_bytes(&name_list(apps), sz_app_name, pul_size) }
    })
}

/// # Safety
/// `sz_app_name` NUL-terminated; `ph_application` valid for one HANDLE.
#[no_mangle]
pub unsafe extern "system" fn SKF_OpenApplication(
    h_dev: HANDLE,
    sz_app_name: LPSTR,
    ph_application: *mut HANDLE,
) -> ULONG {
    call("SKF_OpenApplication", |soft| {
        // SAFETY: the caller passes a NUL-terminated application name.
        let name = unsafe { name_arg(sz_app_name) }?;
        let id = soft.open_application(handle_id(h_dev), name)?;
        // SAFETY: valid for one HANDLE by the caller's contract.
        unsafe { put(ph_application, make_handle(id)) }
    })
}

/// # Safety
/// Any handle value is accepted.
#[no_mangle]
pub unsafe extern "system" fn SKF_CloseApplication(h_application: HANDLE) -> ULONG {
    call("SKF_CloseApplication", |soft| {
        soft.close(handle_id(h_application)).map(|_| ())
    })
}

/// # Safety
/// `sz_container_name` null or valid for `*pul_size` bytes; `pul_size` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_EnumContainer(
    h_application: HANDLE,
    sz_container_name: LPSTR,
    pul_size: *mut ULONG,
) -> ULONG {
    call("SKF_EnumContainer", |soft| {
        let names = soft.containers(handle_id(h_application))?;
        // SAFETY: the caller's contract is put_bytes' contract.
        unsafe { put_bytes(&name_list(names), sz_container_name, pul_size) }
    })
}

/// # Safety
/// `sz_container_name` NUL-terminated; `ph_container` valid for one HANDLE.
#[no_mangle]
pub unsafe extern "system" fn SKF_OpenContainer(
    h_application: HANDLE,
    sz_container_name: LPSTR,
    ph_container: *mut HANDLE,
) -> ULONG {
    call("SKF_OpenContainer", |soft| {
        // SAFETY: the caller passes a NUL-terminated container name.
        let name = unsafe { name_arg(sz_container_name) }?;
        let id = soft.open_container(handle_id(h_application), name)?;
        // SAFETY: valid for one HANDLE by the caller's contract.
        unsafe { put(ph_container, make_handle(id)) }
    })
}

/// # Safety
/// Any handle value is accepted.
#[no_mangle]
pub unsafe extern "system" fn SKF_CloseContainer(h_container: HANDLE) -> ULONG {
    call("SKF_CloseContainer", |soft| {
        soft.close(handle_id(h_container)).map(|_| ())
    })
}

/// # Safety
/// `pul_container_type` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_GetContainerType(
    h_container: HANDLE,
    pul_container_type: *mut ULONG,
) -> ULONG {
    call("SKF_GetContainerType", |soft| {
        let kind = soft.container_type(handle_id(h_container))?;
        // SAFETY: valid for one ULONG by the caller's contract.
        unsafe { put(pul_container_type, kind) }
    })
}

/// # Safety
/// `pb_cert` null or valid for `*pul_cert_len` bytes; `pul_cert_len` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_ExportCertificate(
    h_container: HANDLE,
    b_sign_flag: BOOL,
    pb_cert: *mut BYTE,
    pul_cert_len: *mut ULONG,
) -> ULONG {
    call("SKF_ExportCertificate", |soft| {
        let der = soft.certificate(handle_id(h_container), b_sign_flag != 0)?;
        // SAFETY: the caller's contract is put_bytes' contract.
        unsafe { put_bytes(&der, pb_cert, pul_cert_len) }
    })
}

/// # Safety
/// `pb_blob` null or valid for `*pul_blob_len` bytes; `pul_blob_len` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_ExportPublicKey(
    h_container: HANDLE,
    b_sign_flag: BOOL,
    pb_blob: *mut BYTE,
    pul_blob_len: *mut ULONG,
) -> ULONG {
    call("SKF_ExportPublicKey", |soft| {
        let blob = soft.public_key(handle_id(h_container), b_sign_flag != 0)?;
        // SAFETY: the caller's contract is put_bytes' contract.
        unsafe { put_bytes(&blob, pb_blob, pul_blob_len) }
    })
}

/// # Safety
/// `sz_pin` NUL-terminated; `pul_retry_count` null or valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_VerifyPIN(
    h_application: HANDLE,
    ul_pin_type: ULONG,
    sz_pin: LPSTR,
    pul_retry_count: *mut ULONG,
) -> ULONG {
    call("SKF_VerifyPIN", |soft| {
        if sz_pin.is_null() {
            return Err(SAR_INVALIDPARAMERR);
        }
        // SAFETY: non-null and NUL-terminated by the caller's contract.
        let pin = unsafe { CStr::from_ptr(sz_pin.cast()) }.to_bytes();
        match soft.verify_pin(handle_id(h_application), ul_pin_type, pin) {
            Ok(()) => Ok(()),
            Err((sar, retries)) => {
                if !pul_retry_count.is_null() {
                    // SAFETY: non-null and valid for one ULONG by the caller's contract.
                    unsafe { pul_retry_count.write_unaligned(retries) };
                }
                Err(sar)
            }
        }
    })
}

/// # Safety
/// Each out-pointer valid for one ULONG (BOOL is a 32-bit ULONG here).
#[no_mangle]
pub unsafe extern "system" fn SKF_GetPINInfo(
    h_application: HANDLE,
    ul_pin_type: ULONG,
    pul_max_retry_count: *mut ULONG,
    pul_remain_retry_count: *mut ULONG,
    pb_default_pin: *mut BOOL,
) -> ULONG {
    call("SKF_GetPINInfo", |soft| {
        let (max, remaining, default_pin) = soft.pin_info(handle_id(h_application), ul_pin_type)?;
        // SAFETY: each pointer is valid for one ULONG by the caller's contract.
        unsafe {
            put(pul_max_retry_count, max)?;
            put(pul_remain_retry_count, remaining)?;
            put(pb_default_pin, BOOL::from(default_pin))
        }
    })
}

/// # Safety
/// Any handle value is accepted.
#[no_mangle]
pub unsafe extern "system" fn SKF_ClearSecureState(h_application: HANDLE) -> ULONG {
    call("SKF_ClearSecureState", |soft| {
        soft.clear_secure_state(handle_id(h_application))
    })
}

/// # Safety
/// `pb_data` valid for `ul_data_len` bytes; `p_signature` valid for one ECCSIGNATUREBLOB.
#[no_mangle]
pub unsafe extern "system" fn SKF_ECCSignData(
    h_container: HANDLE,
    pb_data: *mut BYTE,
    ul_data_len: ULONG,
    p_signature: *mut ECCSIGNATUREBLOB,
) -> ULONG {
    call("SKF_ECCSignData", |soft| {
        if pb_data.is_null() {
            return Err(SAR_INVALIDPARAMERR);
        }
        let len = usize::try_from(ul_data_len).map_err(|_| SAR_INDATALENERR)?;
        // SAFETY: `pb_data` is non-null and valid for `ul_data_len` bytes (caller's contract);
        // we only read it during this call.
        let e = unsafe { std::slice::from_raw_parts(pb_data.cast_const(), len) };
        let blob = soft.ecc_sign(handle_id(h_container), e)?;
        // SAFETY: valid for one ECCSIGNATUREBLOB by the caller's contract.
        unsafe { put(p_signature, blob) }
    })
}

/// # Safety
/// `pb_data` valid for `ul_data_len` bytes; `pb_signature` null or valid for `*pul_sign_len`
/// bytes; `pul_sign_len` valid for one ULONG.
#[no_mangle]
pub unsafe extern "system" fn SKF_RSASignData(
    h_container: HANDLE,
    pb_data: *mut BYTE,
    ul_data_len: ULONG,
    pb_signature: *mut BYTE,
    pul_sign_len: *mut ULONG,
) -> ULONG {
    call("SKF_RSASignData", |soft| {
        let handle = handle_id(h_container);
        if pb_signature.is_null() {
            let len = soft.rsa_signature_len(handle)?;
            let len = ULONG::try_from(len).map_err(|_| SAR_FAIL)?;
            // SAFETY: valid for one ULONG by the caller's contract.
            return unsafe { put(pul_sign_len, len) };
        }
        if pb_data.is_null() {
            return Err(SAR_INVALIDPARAMERR);
        }
        let len = usize::try_from(ul_data_len).map_err(|_| SAR_INDATALENERR)?;
        // SAFETY: non-null and valid for `ul_data_len` bytes by the caller's contract.
        let data = unsafe { std::slice::from_raw_parts(pb_data.cast_const(), len) };
        let sig = soft.rsa_sign(handle, data)?;
        // SAFETY: the caller's contract is put_bytes' contract.
        unsafe { put_bytes(&sig, pb_signature, pul_sign_len) }
    })
}

/// Blocks until a device is inserted (event 1) or removed (event 2), or the wait is cancelled
/// (SAR_NOT_EVENTERR).
///
/// # Safety
/// `sz_dev_name` valid for `*pul_dev_name_len` bytes; the two ULONG pointers valid.
#[no_mangle]
pub unsafe extern "system" fn SKF_WaitForDevEvent(
    sz_dev_name: LPSTR,
    pul_dev_name_len: *mut ULONG,
    pul_event: *mut ULONG,
) -> ULONG {
    call("SKF_WaitForDevEvent", |soft| {
        if sz_dev_name.is_null() || pul_event.is_null() {
            return Err(SAR_INVALIDPARAMERR);
        }
        let (dev, event) = soft.wait_for_event()?;
        let mut name = dev.clone().into_vec();
        name.push(0);
        // SAFETY: the caller's contract is put_bytes' contract.
        if let Err(e) = unsafe { put_bytes(&name, sz_dev_name, pul_dev_name_len) } {
            soft.unreport(&dev, event);
            return Err(e);
        }
        // SAFETY: non-null and valid for one ULONG by the caller's contract.
        unsafe { put(pul_event, event) }
    })
}

/// Makes the SKF_WaitForDevEvent calls in progress return SAR_NOT_EVENTERR (later ones wait).
///
/// # Safety
/// No arguments; always safe to call.
#[no_mangle]
pub unsafe extern "system" fn SKF_CancelWaitForDevEvent() -> ULONG {
    call("SKF_CancelWaitForDevEvent", |soft| {
        soft.cancel_wait();
        Ok(())
    })
}

/// Creates an empty container (SAR_FILE_ALREADY_EXIST for a name in use). Needs the user PIN.
///
/// # Safety
/// `sz_container_name` NUL-terminated; `ph_container` valid for one HANDLE.
#[no_mangle]
pub unsafe extern "system" fn SKF_CreateContainer(
    h_application: HANDLE,
    sz_container_name: LPSTR,
    ph_container: *mut HANDLE,
) -> ULONG {
    call("SKF_CreateContainer", |soft| {
        if ph_container.is_null() {
            return Err(SAR_INVALIDPARAMERR);
        }
        // SAFETY: the caller passes a NUL-terminated container name.
        let name = unsafe { name_arg(sz_container_name) }?;
        let id = soft.create_container(handle_id(h_application), name)?;
        // SAFETY: non-null and valid for one HANDLE by the caller's contract.
        unsafe { put(ph_container, make_handle(id)) }
    })
}

/// Deletes a container with its keys and certificates. Needs the user PIN.
///
/// # Safety
/// `sz_container_name` NUL-terminated.
#[no_mangle]
pub unsafe extern "system" fn SKF_DeleteContainer(
    h_application: HANDLE,
    sz_container_name: LPSTR,
) -> ULONG {
    call("SKF_DeleteContainer", |soft| {
        // SAFETY: the caller passes a NUL-terminated container name.
        let name = unsafe { name_arg(sz_container_name) }?;
        soft.delete_container(handle_id(h_application), name)
    })
}

/// Generates an SM2 signing key pair (`ul_alg_id` SGD_SM2_1) in an empty container and writes
/// its public key. Needs the user PIN.
///
/// # Safety
/// `p_blob` valid for one ECCPUBLICKEYBLOB.
#[no_mangle]
pub unsafe extern "system" fn SKF_GenECCKeyPair(
    h_container: HANDLE,
    ul_alg_id: ULONG,
    p_blob: *mut ECCPUBLICKEYBLOB,
) -> ULONG {
    call("SKF_GenECCKeyPair", |soft| {
        if p_blob.is_null() {
            return Err(SAR_INVALIDPARAMERR);
        }
        let blob = soft.gen_ecc_key_pair(handle_id(h_container), ul_alg_id)?;
        // SAFETY: non-null and valid for one ECCPUBLICKEYBLOB by the caller's contract.
        unsafe { put(p_blob, blob) }
    })
}

/// Stores a certificate in the container's signing (`b_sign_flag` TRUE) or encryption slot,
/// replacing what was there, as the standard's single slot does. Needs the user PIN.
///
/// # Safety
/// `pb_cert` valid for `ul_cert_len` bytes.
#[no_mangle]
pub unsafe extern "system" fn SKF_ImportCertificate(
    h_container: HANDLE,
    b_sign_flag: BOOL,
    pb_cert: *mut BYTE,
    ul_cert_len: ULONG,
) -> ULONG {
    call("SKF_ImportCertificate", |soft| {
        if pb_cert.is_null() {
            return Err(SAR_INVALIDPARAMERR);
        }
        let len = usize::try_from(ul_cert_len).map_err(|_| SAR_INDATALENERR)?;
        // SAFETY: non-null and valid for `ul_cert_len` bytes by the caller's contract; read
        // only during this call.
        let der = unsafe { std::slice::from_raw_parts(pb_cert.cast_const(), len) };
        soft.import_certificate(handle_id(h_container), b_sign_flag != 0, der)
    })
}

/// Not used by KeyPort; present because every vendor library has it and tools probe for it.
///
/// # Safety
/// Never touches its arguments.
#[no_mangle]
pub unsafe extern "system" fn SKF_ChangePIN(
    _h_application: HANDLE,
    _ul_pin_type: ULONG,
    _sz_old_pin: LPSTR,
    _sz_new_pin: LPSTR,
    _pul_retry_count: *mut ULONG,
) -> ULONG {
    call("SKF_ChangePIN", |_| Err(SAR_NOTSUPPORTYETERR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_lists_end_with_a_double_nul() {
        assert_eq!(
            name_list([OsString::from("a"), OsString::from("bc")]),
            b"a\0bc\0\0"
        );
        assert_eq!(name_list(Vec::<OsString>::new()), b"\0");
    }
}
