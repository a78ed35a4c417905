//! The C types, structures and return codes of GM/T 0016-2012 this library speaks, written from
//! the standard's header (its own transcription, independent of the one in `skf-shim`, so that a
//! layout mistake on either side shows up as a failing test rather than cancelling out).
//!
//! Widths: `ULONG` and `BOOL` are 32-bit here, as in the common Linux vendor headers
//! (`typedef UINT32 ULONG`); the structures are `#pragma pack(1)`.

#![allow(non_camel_case_types, clippy::upper_case_acronyms)]

use std::ffi::c_void;

pub type ULONG = u32;
pub type BOOL = u32;
pub type BYTE = u8;
pub type LPSTR = *mut u8;
pub type HANDLE = *mut c_void;

pub const TRUE: BOOL = 1;

pub const SAR_OK: ULONG = 0x0000_0000;
pub const SAR_FAIL: ULONG = 0x0A00_0001;
pub const SAR_NOTSUPPORTYETERR: ULONG = 0x0A00_0003;
pub const SAR_FILEERR: ULONG = 0x0A00_0004;
pub const SAR_INVALIDHANDLEERR: ULONG = 0x0A00_0005;
pub const SAR_INVALIDPARAMERR: ULONG = 0x0A00_0006;
pub const SAR_INDATALENERR: ULONG = 0x0A00_0010;
pub const SAR_GENRANDERR: ULONG = 0x0A00_0012;
pub const SAR_KEYNOTFOUNTERR: ULONG = 0x0A00_001B;
pub const SAR_CERTNOTFOUNTERR: ULONG = 0x0A00_001C;
pub const SAR_BUFFER_TOO_SMALL: ULONG = 0x0A00_0020;
pub const SAR_KEYINFOTYPEERR: ULONG = 0x0A00_0021;
pub const SAR_NOT_EVENTERR: ULONG = 0x0A00_0022;
pub const SAR_DEVICE_REMOVED: ULONG = 0x0A00_0023;
pub const SAR_PIN_INCORRECT: ULONG = 0x0A00_0024;
pub const SAR_PIN_LOCKED: ULONG = 0x0A00_0025;
pub const SAR_NAMELENERR: ULONG = 0x0A00_0009;
pub const SAR_USER_TYPE_INVALID: ULONG = 0x0A00_002A;
pub const SAR_APPLICATION_NAME_INVALID: ULONG = 0x0A00_002B;
pub const SAR_USER_NOT_LOGGED_IN: ULONG = 0x0A00_002D;
pub const SAR_APPLICATION_NOT_EXISTS: ULONG = 0x0A00_002E;
pub const SAR_FILE_ALREADY_EXIST: ULONG = 0x0A00_002F;
pub const SAR_FILE_NOT_EXIST: ULONG = 0x0A00_0031;

/// `ulPINType` of SKF_VerifyPIN / SKF_GetPINInfo.
pub const USER_TYPE: ULONG = 1;

/// SKF_GetContainerType answers.
pub const CONTAINER_EMPTY: ULONG = 0;
pub const CONTAINER_RSA: ULONG = 1;
pub const CONTAINER_ECC: ULONG = 2;

/// SKF_WaitForDevEvent event types.
pub const EVENT_INSERTED: ULONG = 1;
pub const EVENT_REMOVED: ULONG = 2;

/// SKF_GetDevState answers.
pub const DEV_ABSENT_STATE: ULONG = 0;
pub const DEV_PRESENT_STATE: ULONG = 1;

/// Algorithm identifiers (GM/T 0006) for DEVINFO's capability masks.
pub const SGD_SM3: ULONG = 0x0000_0001;
pub const SGD_SHA256: ULONG = 0x0000_0004;
pub const SGD_RSA: ULONG = 0x0001_0000;
pub const SGD_SM2_1: ULONG = 0x0002_0100;

/// The longest container name this library accepts, in bytes (the standard sets no number;
/// vendors' limits are 32 to 64 bytes, and 64 is the common one).
pub const MAX_CONTAINER_NAME_LEN: usize = 64;

pub const MAX_RSA_MODULUS_LEN: usize = 256;
pub const MAX_RSA_EXPONENT_LEN: usize = 4;
pub const ECC_MAX_COORDINATE_LEN: usize = 64;

#[repr(C, packed(1))]
#[derive(Clone, Copy, Debug)]
pub struct VERSION {
    pub major: BYTE,
    pub minor: BYTE,
}

#[repr(C, packed(1))]
#[derive(Clone, Copy, Debug)]
pub struct DEVINFO {
    pub version: VERSION,
    pub manufacturer: [u8; 64],
    pub issuer: [u8; 64],
    pub label: [u8; 32],
    pub serial_number: [u8; 32],
    pub hw_version: VERSION,
    pub firmware_version: VERSION,
    pub alg_sym_cap: ULONG,
    pub alg_asym_cap: ULONG,
    pub alg_hash_cap: ULONG,
    pub dev_auth_alg_id: ULONG,
    pub total_space: ULONG,
    pub free_space: ULONG,
    pub max_ecc_buffer_size: ULONG,
    pub max_buffer_size: ULONG,
    pub reserved: [BYTE; 64],
}

#[repr(C, packed(1))]
#[derive(Clone, Copy, Debug)]
pub struct ECCPUBLICKEYBLOB {
    pub bit_len: ULONG,
    pub x: [BYTE; ECC_MAX_COORDINATE_LEN],
    pub y: [BYTE; ECC_MAX_COORDINATE_LEN],
}

#[repr(C, packed(1))]
#[derive(Clone, Copy, Debug)]
pub struct ECCSIGNATUREBLOB {
    pub r: [BYTE; ECC_MAX_COORDINATE_LEN],
    pub s: [BYTE; ECC_MAX_COORDINATE_LEN],
}

#[repr(C, packed(1))]
#[derive(Clone, Copy, Debug)]
pub struct RSAPUBLICKEYBLOB {
    pub alg_id: ULONG,
    pub bit_len: ULONG,
    pub modulus: [BYTE; MAX_RSA_MODULUS_LEN],
    pub public_exponent: [BYTE; MAX_RSA_EXPONENT_LEN],
}

/// Copies `src` into the end of `dst` (the standard's right alignment of big-endian values).
/// `src` longer than `dst` keeps its last bytes (callers only pass values that fit).
pub fn right_align(dst: &mut [u8], src: &[u8]) {
    let src = &src[src.len().saturating_sub(dst.len())..];
    let start = dst.len() - src.len();
    dst.fill(0);
    dst[start..].copy_from_slice(src);
}

/// Copies `text` into a fixed, NUL-padded C character field (truncated to leave one NUL).
pub fn fixed_text(dst: &mut [u8], text: &str) {
    dst.fill(0);
    let n = text.len().min(dst.len().saturating_sub(1));
    dst[..n].copy_from_slice(&text.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_sizes_match_the_packed_header() {
        assert_eq!(
            std::mem::size_of::<DEVINFO>(),
            2 + 64 + 64 + 32 + 32 + 2 + 2 + 8 * 4 + 64
        );
        assert_eq!(std::mem::size_of::<ECCPUBLICKEYBLOB>(), 132);
        assert_eq!(std::mem::size_of::<ECCSIGNATUREBLOB>(), 128);
        assert_eq!(std::mem::size_of::<RSAPUBLICKEYBLOB>(), 268);
    }

    #[test]
    fn right_alignment_pads_on_the_left() {
        let mut field = [0xFFu8; 8];
        right_align(&mut field, &[1, 2, 3]);
        assert_eq!(field, [0, 0, 0, 0, 0, 1, 2, 3]);
    }
}
