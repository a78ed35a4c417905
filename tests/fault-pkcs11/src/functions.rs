//! The wrapped PKCS#11 functions. Each one runs through [`crate::call`], which logs it; the
//! rest of the target's function list is handed out unchanged.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cryptoki_sys::{
    CKF_PROTECTED_AUTHENTICATION_PATH, CKF_TOKEN_PRESENT, CKF_USER_PIN_COUNT_LOW,
    CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED, CKR_ARGUMENTS_BAD, CKR_BUFFER_TOO_SMALL,
    CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED, CKR_FUNCTION_CANCELED, CKR_FUNCTION_NOT_SUPPORTED,
    CKR_GENERAL_ERROR, CKR_MECHANISM_INVALID, CKR_OBJECT_HANDLE_INVALID, CKR_OK, CKR_PIN_LOCKED,
    CKR_TOKEN_NOT_PRESENT, CKU_CONTEXT_SPECIFIC, CKU_SO, CKU_USER, CK_ATTRIBUTE, CK_BBOOL, CK_BYTE,
    CK_FLAGS, CK_FUNCTION_LIST, CK_MECHANISM, CK_MECHANISM_INFO, CK_MECHANISM_TYPE, CK_NOTIFY,
    CK_OBJECT_HANDLE, CK_RV, CK_SESSION_HANDLE, CK_SESSION_INFO, CK_SLOT_ID, CK_SLOT_INFO,
    CK_TOKEN_INFO, CK_ULONG, CK_USER_TYPE,
};

use crate::control::{Control, PadEntry};
use crate::{call, call_noted, signature_fails, Call};

/// Set by `general_error=1`; cleared only by a successful C_Initialize (SoftHSM's behaviour
/// after descriptor exhaustion).
static GENERAL_ERROR_LATCHED: AtomicBool = AtomicBool::new(false);

/// Set by `unreadable_objects=1`; cleared only by a successful C_Initialize (SoftHSM's
/// behaviour for object files it could not open when it loaded the token).
static UNREADABLE_LATCHED: AtomicBool = AtomicBool::new(false);

/// How often a hanging C_Sign looks at the control file again.
const HANG_POLL: Duration = Duration::from_millis(50);

/// Returns `real` with the wrapped entries replaced by this module's functions.
pub(crate) fn wrap(real: CK_FUNCTION_LIST) -> CK_FUNCTION_LIST {
    CK_FUNCTION_LIST {
        C_Initialize: Some(initialize),
        C_Finalize: Some(finalize),
        C_GetSlotList: Some(get_slot_list),
        C_GetSlotInfo: Some(get_slot_info),
        C_GetTokenInfo: Some(get_token_info),
        C_GetMechanismList: Some(get_mechanism_list),
        C_GetMechanismInfo: Some(get_mechanism_info),
        C_OpenSession: Some(open_session),
        C_CloseSession: Some(close_session),
        C_GetSessionInfo: Some(get_session_info),
        C_Login: Some(login),
        C_Logout: Some(logout),
        C_GetAttributeValue: Some(get_attribute_value),
        C_FindObjectsInit: Some(find_objects_init),
        C_FindObjects: Some(find_objects),
        C_FindObjectsFinal: Some(find_objects_final),
        C_SignInit: Some(sign_init),
        C_Sign: Some(sign),
        C_SignUpdate: Some(sign_update),
        C_SignFinal: Some(sign_final),
        ..real
    }
}

/// Calls the real module's function with the arguments our caller gave us.
macro_rules! forward {
    ($call:expr, $name:ident ( $($arg:expr),* $(,)? )) => {
        match $call.real.$name {
            // SAFETY: the pointer comes from the target's own function list and the target stays
            // loaded for the life of the process. The arguments are the ones our caller passed
            // to this same PKCS#11 function, so the caller's contract is the callee's contract.
            Some(real_fn) => unsafe { real_fn($($arg),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}

/// Session calls on a removed token fail with CKR_DEVICE_REMOVED; otherwise they pass through.
macro_rules! session_call {
    ($name:literal, $field:ident ( $($arg:expr),* $(,)? )) => {
        call($name, |c| {
            if c.control.token_removed {
                CKR_DEVICE_REMOVED
            } else {
                forward!(c, $field($($arg),*))
            }
        })
    };
}

unsafe extern "C" fn initialize(args: *mut c_void) -> CK_RV {
    call("C_Initialize", |c| {
        let rv = forward!(c, C_Initialize(args));
        if rv == CKR_OK {
            GENERAL_ERROR_LATCHED.store(false, Ordering::SeqCst);
            UNREADABLE_LATCHED.store(false, Ordering::SeqCst);
        }
        rv
    })
}

unsafe extern "C" fn finalize(reserved: *mut c_void) -> CK_RV {
    call("C_Finalize", |c| forward!(c, C_Finalize(reserved)))
}

unsafe extern "C" fn get_slot_list(
    token_present: CK_BBOOL,
    slots: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    call("C_GetSlotList", |c| {
        if c.control.token_removed && token_present != 0 {
            if count.is_null() {
                return CKR_ARGUMENTS_BAD;
            }
            // SAFETY: `count` is non-null and the caller must pass a writable CK_ULONG.
            unsafe { *count = 0 };
            CKR_OK
        } else {
            forward!(c, C_GetSlotList(token_present, slots, count))
        }
    })
}

unsafe extern "C" fn get_slot_info(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    call("C_GetSlotInfo", |c| {
        let rv = forward!(c, C_GetSlotInfo(slot, info));
        if rv == CKR_OK && c.control.token_removed && !info.is_null() {
            // SAFETY: the real module just filled `*info` successfully, so it is valid.
            unsafe { (*info).flags &= !CKF_TOKEN_PRESENT };
        }
        rv
    })
}

unsafe extern "C" fn get_token_info(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    call("C_GetTokenInfo", |c| {
        if c.control.token_removed {
            return CKR_TOKEN_NOT_PRESENT;
        }
        if c.control.general_error {
            GENERAL_ERROR_LATCHED.store(true, Ordering::SeqCst);
        }
        if GENERAL_ERROR_LATCHED.load(Ordering::SeqCst) {
            return CKR_GENERAL_ERROR;
        }
        let rv = forward!(c, C_GetTokenInfo(slot, info));
        if rv == CKR_OK && !info.is_null() {
            let extra = pin_flags(&c.control);
            // SAFETY: the real module just filled `*info` successfully, so it is valid.
            unsafe { (*info).flags |= extra };
        }
        rv
    })
}

fn pin_flags(control: &Control) -> CK_FLAGS {
    let mut flags = 0;
    if control.pin_locked {
        flags |= CKF_USER_PIN_LOCKED;
    }
    if control.pin_count_low {
        flags |= CKF_USER_PIN_COUNT_LOW;
    }
    if control.pin_final_try {
        flags |= CKF_USER_PIN_FINAL_TRY;
    }
    if control.pin_pad {
        flags |= CKF_PROTECTED_AUTHENTICATION_PATH;
    }
    flags
}

unsafe extern "C" fn get_mechanism_list(
    slot: CK_SLOT_ID,
    mechanisms: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    call("C_GetMechanismList", |c| {
        if c.control.token_removed {
            CKR_TOKEN_NOT_PRESENT
        } else if c.control.hide_mechanisms.is_empty() {
            forward!(c, C_GetMechanismList(slot, mechanisms, count))
        } else {
            mechanism_list_without(c, slot, mechanisms, count)
        }
    })
}

/// C_GetMechanismList of the real module less the hidden mechanisms, by the two-call rule
/// (a null list asks for the count; a list too short is CKR_BUFFER_TOO_SMALL).
fn mechanism_list_without(
    c: &mut Call,
    slot: CK_SLOT_ID,
    mechanisms: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    if count.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    let mut n: CK_ULONG = 0;
    let rv = forward!(c, C_GetMechanismList(slot, std::ptr::null_mut(), &mut n));
    if rv != CKR_OK {
        return rv;
    }
    let mut all: Vec<CK_MECHANISM_TYPE> = vec![0; n as usize];
    let rv = forward!(c, C_GetMechanismList(slot, all.as_mut_ptr(), &mut n));
    if rv != CKR_OK {
        return rv;
    }
    all.truncate(n as usize);
    all.retain(|m| !c.control.hide_mechanisms.contains(m));
    // SAFETY: `count` is the caller's non-null out pointer (checked above).
    let room = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = all.len() as CK_ULONG };
    if mechanisms.is_null() {
        return CKR_OK;
    }
    if room < all.len() {
        return CKR_BUFFER_TOO_SMALL;
    }
    // SAFETY: the caller's list has room for `room` entries (the PKCS#11 contract of *count on
    // entry), at least `all.len()`; the two buffers cannot overlap (`all` is ours).
    unsafe { std::ptr::copy_nonoverlapping(all.as_ptr(), mechanisms, all.len()) };
    CKR_OK
}

unsafe extern "C" fn get_mechanism_info(
    slot: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    call("C_GetMechanismInfo", |c| {
        if c.control.token_removed {
            CKR_TOKEN_NOT_PRESENT
        } else if c.control.hide_mechanisms.contains(&mechanism) {
            CKR_MECHANISM_INVALID
        } else {
            forward!(c, C_GetMechanismInfo(slot, mechanism, info))
        }
    })
}

unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    application: *mut c_void,
    notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    call("C_OpenSession", |c| {
        if c.control.token_removed {
            CKR_TOKEN_NOT_PRESENT
        } else {
            forward!(c, C_OpenSession(slot, flags, application, notify, session))
        }
    })
}

/// Always passes through, so that callers can release sessions of a "removed" token.
unsafe extern "C" fn close_session(session: CK_SESSION_HANDLE) -> CK_RV {
    call("C_CloseSession", |c| forward!(c, C_CloseSession(session)))
}

unsafe extern "C" fn get_session_info(
    session: CK_SESSION_HANDLE,
    info: *mut CK_SESSION_INFO,
) -> CK_RV {
    session_call!("C_GetSessionInfo", C_GetSessionInfo(session, info))
}

unsafe extern "C" fn login(
    session: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    pin: *mut CK_BYTE,
    pin_len: CK_ULONG,
) -> CK_RV {
    let who = match user_type {
        CKU_USER => "CKU_USER",
        CKU_CONTEXT_SPECIFIC => "CKU_CONTEXT_SPECIFIC",
        CKU_SO => "CKU_SO",
        _ => "CKU_(other)",
    };
    let note = format!("{who} {}", if pin.is_null() { "null-pin" } else { "pin" });
    call_noted("C_Login", &note, |c| {
        if c.control.token_removed {
            CKR_DEVICE_REMOVED
        } else if c.control.pin_locked
            && (user_type == CKU_USER || user_type == CKU_CONTEXT_SPECIFIC)
        {
            CKR_PIN_LOCKED
        } else if c.control.pin_pad && pin.is_null() {
            pin_pad_login(c, session, user_type)
        } else {
            forward!(c, C_Login(session, user_type, pin, pin_len))
        }
    })
}

/// The reader's PIN pad: the user takes `pin_pad_delay_ms`, then cancels or types the PIN the
/// control file names, which goes to the real module as an ordinary login (so a wrong one counts
/// against the token as on a real card).
fn pin_pad_login(c: &Call, session: CK_SESSION_HANDLE, user_type: CK_USER_TYPE) -> CK_RV {
    std::thread::sleep(Duration::from_millis(c.control.pin_pad_delay_ms));
    match &c.control.pin_pad_entry {
        PadEntry::Cancel => CKR_FUNCTION_CANCELED,
        PadEntry::Pin(typed) => {
            let mut typed = typed.clone().into_bytes();
            let len = CK_ULONG::try_from(typed.len()).unwrap_or(0);
            forward!(c, C_Login(session, user_type, typed.as_mut_ptr(), len))
        }
    }
}

unsafe extern "C" fn logout(session: CK_SESSION_HANDLE) -> CK_RV {
    session_call!("C_Logout", C_Logout(session))
}

unsafe extern "C" fn get_attribute_value(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    call("C_GetAttributeValue", |c| {
        if c.control.token_removed {
            return CKR_DEVICE_REMOVED;
        }
        if c.control.unreadable_objects {
            UNREADABLE_LATCHED.store(true, Ordering::SeqCst);
        }
        if UNREADABLE_LATCHED.load(Ordering::SeqCst) {
            return CKR_OBJECT_HANDLE_INVALID;
        }
        forward!(c, C_GetAttributeValue(session, object, template, count))
    })
}

unsafe extern "C" fn find_objects_init(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    session_call!(
        "C_FindObjectsInit",
        C_FindObjectsInit(session, template, count)
    )
}

unsafe extern "C" fn find_objects(
    session: CK_SESSION_HANDLE,
    objects: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    found: *mut CK_ULONG,
) -> CK_RV {
    session_call!("C_FindObjects", C_FindObjects(session, objects, max, found))
}

unsafe extern "C" fn find_objects_final(session: CK_SESSION_HANDLE) -> CK_RV {
    session_call!("C_FindObjectsFinal", C_FindObjectsFinal(session))
}

unsafe extern "C" fn sign_init(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    session_call!("C_SignInit", C_SignInit(session, mechanism, key))
}

unsafe extern "C" fn sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    call("C_Sign", |c| {
        produce_signature(c, signature.is_null(), |c| {
            forward!(c, C_Sign(session, data, data_len, signature, signature_len))
        })
    })
}

unsafe extern "C" fn sign_update(
    session: CK_SESSION_HANDLE,
    part: *mut CK_BYTE,
    part_len: CK_ULONG,
) -> CK_RV {
    session_call!("C_SignUpdate", C_SignUpdate(session, part, part_len))
}

unsafe extern "C" fn sign_final(
    session: CK_SESSION_HANDLE,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    call("C_SignFinal", |c| {
        produce_signature(c, signature.is_null(), |c| {
            forward!(c, C_SignFinal(session, signature, signature_len))
        })
    })
}

/// The faults of C_Sign / C_SignFinal: hang, removal, and failure after N signatures.
///
/// A length query (`signature` null) is not a signature and is not counted. An injected
/// CKR_DEVICE_ERROR is returned *after* the real call, so the real operation ends as it would
/// on a device that failed mid-signature.
fn produce_signature(
    c: &mut Call,
    length_query: bool,
    real_call: impl FnOnce(&Call) -> CK_RV,
) -> CK_RV {
    if c.control.hang_sign {
        c.control = wait_while_hanging();
    }
    if c.control.token_removed {
        return CKR_DEVICE_REMOVED;
    }
    let rv = real_call(c);
    if rv == CKR_OK && !length_query && signature_fails(&c.control) {
        CKR_DEVICE_ERROR
    } else {
        rv
    }
}

/// Blocks until the control file no longer says `hang_sign=1`; returns the control then in force.
fn wait_while_hanging() -> Control {
    loop {
        std::thread::sleep(HANG_POLL);
        match Control::load() {
            Ok(control) if control.hang_sign => {}
            Ok(control) => return control,
            // A broken control file ends the hang; the next call reports it.
            Err(_) => return Control::default(),
        }
    }
}
