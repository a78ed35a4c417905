//! The one PKCS#11 call `cryptoki` 0.12 cannot make: a lone single-part `C_Sign` after
//! `C_SignInit` and a context-specific `C_Login`, as a `CKA_ALWAYS_AUTHENTICATE` key demands.
//!
//! `Session::sign` does `C_SignInit` + `C_Sign` with nothing between them, and the multi-part
//! calls (`C_SignUpdate`/`C_SignFinal`) are refused for the raw mechanisms a portal's digest
//! needs (`CKM_ECDSA`, `CKM_RSA_PKCS`, `CKM_RSA_PKCS_PSS`, `CKM_EDDSA` are single-part only).
//! So this module opens the same library a second time (the dynamic loader hands back the
//! handle cryptoki already holds: one module instance, one state), takes `C_Sign` from the
//! module's own `C_GetFunctionList`, and calls it on the raw handle of cryptoki's session
//! (`Session::handle()`).
//!
//! This is the only `unsafe` in the crate. It goes when `cryptoki` offers a signature on an
//! operation already initialised (a `Session::sign_single(data)`, i.e. a bare `C_Sign`).
#![allow(unsafe_code)]

use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv};
use cryptoki::session::Session;
use cryptoki_sys::{CKR_OK, CK_FUNCTION_LIST, CK_RV, CK_SESSION_HANDLE, CK_ULONG};

/// `C_Sign` of one loaded module.
pub(crate) struct RawSign {
    /// Keeps the library mapped while `c_sign` may be called.
    _library: libloading::Library,
    c_sign:
        unsafe extern "C" fn(CK_SESSION_HANDLE, *mut u8, CK_ULONG, *mut u8, *mut CK_ULONG) -> CK_RV,
}

impl std::fmt::Debug for RawSign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawSign")
    }
}

/// Why the module's `C_Sign` could not be found (the module then still signs ordinary keys).
#[derive(Debug)]
pub(crate) struct RawLoadError(pub(crate) String);

impl RawSign {
    /// Finds `C_Sign` in the module at `path`, which cryptoki has loaded already.
    pub(crate) fn load(path: &Path) -> Result<RawSign, RawLoadError> {
        // SAFETY: the library is the PKCS#11 module cryptoki loaded from this same path a moment
        // ago; the loader returns the handle it already holds (reference counted), so no
        // initialiser runs a second time and no second instance of the module exists.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| RawLoadError(format!("dlopen: {e}")))?;
        type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
        // SAFETY: every PKCS#11 module exports C_GetFunctionList with exactly this signature.
        let get_function_list = unsafe { library.get::<GetFunctionList>(b"C_GetFunctionList\0") }
            .map_err(|e| RawLoadError(format!("no C_GetFunctionList: {e}")))?;
        let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
        // SAFETY: `list` is a valid out-pointer for the duration of the call.
        let rv = unsafe { get_function_list(&mut list) };
        if rv != CKR_OK || list.is_null() {
            return Err(RawLoadError(format!("C_GetFunctionList: rv=0x{rv:08X}")));
        }
        // SAFETY: the module returned a non-null pointer to its function list, valid while the
        // library stays loaded (we keep it loaded); the one entry is copied out at once.
        let c_sign = unsafe { (*list).C_Sign }
            .ok_or_else(|| RawLoadError("the module has no C_Sign".to_owned()))?;
        Ok(RawSign {
            _library: library,
            c_sign,
        })
    }

    /// A single-part `C_Sign` of `data` in `session`, whose signing operation the caller has
    /// initialised (`C_SignInit`, then the context-specific login). Two calls, as PKCS#11
    /// prescribes: the length, then the signature. Either failure ends the operation.
    pub(crate) fn sign(&self, session: &Session, data: &[u8]) -> Result<Vec<u8>, CkError> {
        let handle = session.handle();
        let data_len = CK_ULONG::try_from(data.len())
            .map_err(|_| CkError::Pkcs11(cryptoki::error::RvError::DataLenRange, Function::Sign))?;
        let mut signature_len: CK_ULONG = 0;
        // SAFETY: `handle` is the live session `session` borrows (it outlives this call, and
        // `Session` is not `Sync`, so no other thread uses it meanwhile). `data` is valid for
        // `data_len` bytes; PKCS#11 takes it as `CK_BYTE_PTR` but only reads it. A null output
        // buffer asks for the length, written to `signature_len`, a valid local.
        let rv = unsafe {
            (self.c_sign)(
                handle,
                data.as_ptr().cast_mut(),
                data_len,
                std::ptr::null_mut(),
                &mut signature_len,
            )
        };
        Rv::from(rv).into_result(Function::Sign)?;
        let len = usize::try_from(signature_len)
            .map_err(|_| CkError::Pkcs11(cryptoki::error::RvError::GeneralError, Function::Sign))?;
        let mut signature = vec![0u8; len];
        // SAFETY: as above; `signature` is a buffer of exactly `signature_len` writable bytes,
        // and the module writes at most that many (it updates `signature_len` to what it wrote).
        let rv = unsafe {
            (self.c_sign)(
                handle,
                data.as_ptr().cast_mut(),
                data_len,
                signature.as_mut_ptr(),
                &mut signature_len,
            )
        };
        Rv::from(rv).into_result(Function::Sign)?;
        let written = usize::try_from(signature_len).unwrap_or(len).min(len);
        signature.truncate(written);
        Ok(signature)
    }
}
