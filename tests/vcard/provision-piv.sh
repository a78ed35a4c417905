#!/usr/bin/env bash
# Provision the rig's emulated PIV card through OpenSC.
#
#   provision-piv.sh DIR CA_DIR
#
# DIR is a running rig (tests/vcard/rig.sh start DIR). CA_DIR holds the test CA
# (ca.pem + ca.key, as softhsm-config/provision.sh writes them); if it has none,
# a fresh P-256 test CA is created there.
# Generates P-256 keys on the card in slot 9A (PIV authentication) and 9C
# (digital signature; OpenSC marks it CKA_ALWAYS_AUTHENTICATE), issues their
# certificates from the CA, loads them onto the card and writes
# DIR/certs/piv-9a.{pem,der} and DIR/certs/piv-9c.{pem,der}; loads a CHUID so
# the token has a serial (written to DIR/piv-serial). Token label (OpenSC takes
# the CN of the 9A certificate): "KeyPort PIV Test". PIN 123456 (jcecard default).
# The keys live in the bridge's memory: they survive remove/insert and
# rig.sh restart-pcscd, not rig.sh stop.
set -euo pipefail

die() { echo "provision-piv.sh: $*" >&2; exit 1; }
[ $# -eq 2 ] || { echo "usage: $0 DIR CA_DIR" >&2; exit 2; }
DIR=$(realpath -m "$1")
CA_DIR=$(realpath -m "$2")
PYTHON=${PYTHON:-python3}
[ -f "$DIR/env" ] || die "no rig in $DIR (run rig.sh start $DIR first)"
# shellcheck source=/dev/null
. "$DIR/env"

MODULE=${OPENSC_PKCS11:-/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so}
WORK="$DIR/provision"
mkdir -p "$WORK" "$DIR/certs" "$CA_DIR"

# PIV default management key (3DES 010203040506070801020304050607080102030405060708),
# in the text form piv-tool reads from PIV_EXT_AUTH_KEY.
printf '01:02:03:04:05:06:07:08:01:02:03:04:05:06:07:08:01:02:03:04:05:06:07:08' >"$WORK/admin.key"
export PIV_EXT_AUTH_KEY="$WORK/admin.key"

if [ ! -f "$CA_DIR/ca.pem" ] || [ ! -f "$CA_DIR/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$CA_DIR/ca.key" -out "$CA_DIR/ca.pem" -days 3650 \
    -subj "/O=KeyPort Tests/CN=KeyPort Test CA (vcard)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# gen SLOT: generate a P-256 key pair in SLOT (GENERATE ASYMMETRIC KEY PAIR,
# algorithm 0x11) after management-key mutual auth, and write the public key
# to $WORK/SLOT.pub.pem. (piv-tool -G would do both, but OpenSC 0.23's
# piv-tool fails to decode the EC answer under OpenSSL 3: "invalid curve".)
gen() {
  local slot=$1
  piv-tool -A M:9B:03 -s "00:47:00:$slot:05:AC:03:80:01:11" >"$WORK/$slot.gen.txt" 2>&1 \
    || die "key generation in slot $slot failed: $(cat "$WORK/$slot.gen.txt")"
  "$PYTHON" - "$WORK/$slot.gen.txt" "$WORK/$slot.pub.pem" <<'EOF'
import sys
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization

lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith("Received (SW1=0x90, SW2=0x00)"))
raw = bytearray()
for line in lines[start + 1:]:
    hexpart = line[:48].split()   # piv-tool dumps 16 bytes a line, then ASCII
    if not hexpart or any(len(t) != 2 for t in hexpart):
        break
    raw += bytes(int(t, 16) for t in hexpart)
# 7F49 len 86 41 04||X||Y
i = raw.index(b"\x86\x41\x04")
point = bytes(raw[i + 2:i + 2 + 65])
key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
open(sys.argv[2], "wb").write(key.public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
EOF
}

# issue SLOT CN KEYUSAGE EKU: certificate over the card's public key, signed by the CA.
issue() {
  local slot=$1 cn=$2 ku=$3 eku=$4 lower
  lower=$(echo "$slot" | tr 'A-Z' 'a-z')
  cat >"$WORK/$slot.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,$ku
extendedKeyUsage=$eku
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
  openssl x509 -new -subj "/O=KeyPort Tests/CN=$cn" -force_pubkey "$WORK/$slot.pub.pem" \
    -CA "$CA_DIR/ca.pem" -CAkey "$CA_DIR/ca.key" -days 365 -set_serial "0x$(openssl rand -hex 8)" \
    -extfile "$WORK/$slot.ext" -out "$DIR/certs/piv-$lower.pem" 2>"$WORK/$slot.x509.err" \
    || die "issuing the $slot certificate failed: $(cat "$WORK/$slot.x509.err")"
  openssl x509 -in "$DIR/certs/piv-$lower.pem" -outform DER -out "$DIR/certs/piv-$lower.der"
  # piv-tool -C exits with (bytes written & 0xFF) on success in OpenSC 0.23, so
  # its status is useless: the read-back below is the check.
  piv-tool -A M:9B:03 -C "$slot" -i "$DIR/certs/piv-$lower.pem" >"$WORK/$slot.load.txt" 2>&1 || true
}

# readback ID FILE: the certificate OpenSC reads from the card must be ours.
readback() {
  local id=$1 want=$2
  pkcs11-tool --module "$MODULE" --read-object --type cert --id "$id" -o "$WORK/readback-$id.der" \
    >/dev/null 2>&1 || die "OpenSC cannot read the certificate with ID $id: $(cat "$WORK"/*.load.txt)"
  cmp -s "$WORK/readback-$id.der" "$want" || die "certificate $id on the card differs from $want"
}

# CHUID (PIV object 5FC102, container 3000) with a GUID, so the token has a
# serial: OpenSC 0.23 shows the GUID's last 8 bytes in hex as the token serial.
# Ours are "KP" + 6 random bytes, so the serial is 4b50xxxxxxxxxxxx.
serial=$("$PYTHON" - "$WORK/chuid.bin" <<'EOF'
import os, sys
fascn = bytes.fromhex("D4E739DA739CED39CE739D836858210842108421C84210C3EB")  # test FASC-N
tail = b"KP" + os.urandom(6)
guid = b"KeyPortT" + tail
body = b"\x30\x19" + fascn + b"\x34\x10" + guid + b"\x35\x08" + b"20991231" + b"\x3e\x00\xfe\x00"
open(sys.argv[1], "wb").write(b"\x53" + bytes([len(body)]) + body)
print(tail.hex())
EOF
)
# piv-tool -O also exits with a byte count on success; the serial check below is the test.
piv-tool -A M:9B:03 -O 3000 -i "$WORK/chuid.bin" >"$WORK/chuid.load.txt" 2>&1 || true
echo "$serial" >"$DIR/piv-serial"

gen 9A
issue 9A "KeyPort PIV Test" digitalSignature clientAuth
gen 9C
issue 9C "PIV Signer P-256" "digitalSignature,nonRepudiation" emailProtection

# Check: OpenSC exposes both certificates (PIV object IDs: 01 = slot 9A, 02 = slot 9C).
readback 01 "$DIR/certs/piv-9a.der"
readback 02 "$DIR/certs/piv-9c.der"
pkcs11-tool --module "$MODULE" -L 2>/dev/null | grep "serial num *: $serial" >/dev/null \
  || die "token serial is not $serial (CHUID load: $(cat "$WORK/chuid.load.txt"))"
