#!/usr/bin/env python3
"""Second, independent SM2 verifier for the skf-shim tests (PyPI gmssl 3.2.2).

  gmssl_verify.py verify XY_HEX USER_ID der|raw DATA_HEX SIG_HEX   -> exit 0 valid, 1 invalid
  gmssl_verify.py e XY_HEX USER_ID DATA_HEX                        -> prints e = SM3(Z || M)

gmssl's own verify_with_sm3 only knows the default user ID, so Z is computed here from
gmssl's curve table and SM3 (GM/T 0003.2: Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA)).
"""
import sys

from gmssl import func, sm2, sm3


def e_hex(xy_hex, user_id, data):
    uid = user_id.encode("utf-8")
    table = sm2.default_ecc_table
    z_input = (
        (len(uid) * 8).to_bytes(2, "big")
        + uid
        + bytes.fromhex(table["a"] + table["b"] + table["g"] + xy_hex)
    )
    z = bytes.fromhex(sm3.sm3_hash(func.bytes_to_list(z_input)))
    return sm3.sm3_hash(func.bytes_to_list(z + data))


def main(argv):
    if len(argv) == 7 and argv[1] == "verify":
        _, _, xy_hex, user_id, encoding, data_hex, sig_hex = argv
        verifier = sm2.CryptSM2(private_key=None, public_key="00", asn1=(encoding == "der"))
        # Set the key directly: the constructor strips leading '0'/'4' characters, which
        # would corrupt an x coordinate that starts with them.
        verifier.public_key = xy_hex
        e = bytes.fromhex(e_hex(xy_hex, user_id, bytes.fromhex(data_hex)))
        return 0 if verifier.verify(sig_hex, e) else 1
    if len(argv) == 5 and argv[1] == "e":
        _, _, xy_hex, user_id, data_hex = argv
        print(e_hex(xy_hex, user_id, bytes.fromhex(data_hex)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
