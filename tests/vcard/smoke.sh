#!/usr/bin/env bash
# End-to-end smoke test of the virtual smartcard rig through the real PC/SC
# stack and OpenSC's PKCS#11 module. Exits non-zero on the first failure.
#
#   smoke.sh [CA_DIR]     (default: a fresh CA inside the rig dir)
#
# Env: KEEP=1 keeps the rig dir; RIG_DEBUG=1 traces APDUs into DIR/logs/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODULE=${OPENSC_PKCS11:-/usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so}
PIN=123456
DIR=$(mktemp -d /tmp/vcard-smoke.XXXXXX)
CA_DIR=${1:-$DIR/ca}
RIG="$HERE/rig.sh"
T0=$(date +%s%3N)

cleanup() {
  local rc=$?
  "$RIG" stop "$DIR" >/dev/null 2>&1 || true
  if [ $rc -ne 0 ]; then
    echo "smoke: FAILED (rc=$rc); logs:" >&2
    tail -n 30 "$DIR"/logs/*.log >&2 2>/dev/null || true
  fi
  [ "${KEEP:-0}" = 1 ] || [ $rc -ne 0 ] || rm -rf "$DIR"
  exit $rc
}
trap cleanup EXIT

step() { echo "smoke: [$(( $(date +%s%3N) - T0 )) ms] $*"; }
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
p11() { pkcs11-tool --module "$MODULE" "$@"; }

# The token in slot 0 shows up under pkcs11-tool -L with its label.
token_present() { p11 -L 2>/dev/null | grep 'token label *: KeyPort PIV Test' >/dev/null ; }

sign_and_verify() {  # sign a fresh digest with the 9C key (always-auth), verify with openssl
  local tag=$1
  head -c 64 /dev/urandom >"$DIR/msg.$tag"
  openssl dgst -sha256 -binary "$DIR/msg.$tag" >"$DIR/digest.$tag"
  # pkcs11-tool sees CKA_ALWAYS_AUTHENTICATE on ID 02 and does the
  # context-specific C_Login itself with the same --pin.
  p11 --sign --id 02 -m ECDSA --login --pin "$PIN" --signature-format openssl \
    -i "$DIR/digest.$tag" -o "$DIR/sig.$tag" >"$DIR/sign.$tag.log" 2>&1 \
    || fail "signing ($tag): $(cat "$DIR/sign.$tag.log")"
  openssl x509 -in "$DIR/certs/piv-9c.pem" -pubkey -noout >"$DIR/9c.pub"
  openssl dgst -sha256 -verify "$DIR/9c.pub" -signature "$DIR/sig.$tag" "$DIR/msg.$tag" >/dev/null \
    || fail "signature ($tag) does not verify against certs/piv-9c.pem"
  # and it must not verify against the 9A certificate
  openssl x509 -in "$DIR/certs/piv-9a.pem" -pubkey -noout >"$DIR/9a.pub"
  if openssl dgst -sha256 -verify "$DIR/9a.pub" -signature "$DIR/sig.$tag" "$DIR/msg.$tag" >/dev/null 2>&1; then
    fail "signature ($tag) verifies against the wrong certificate"
  fi
}

step "start rig in $DIR"
"$RIG" start "$DIR" >/dev/null
# shellcheck source=/dev/null
. "$DIR/env"

step "provision PIV (9A, 9C) with CA in $CA_DIR"
"$HERE/provision-piv.sh" "$DIR" "$CA_DIR"
for f in "$DIR/certs/piv-9a.pem" "$DIR/certs/piv-9c.pem"; do
  openssl verify -CAfile "$CA_DIR/ca.pem" "$f" >/dev/null || fail "$f does not chain to the CA"
done

step "list slots and objects"
p11 -L -O --login --pin "$PIN" >"$DIR/objects.txt" 2>&1 || fail "pkcs11-tool -L -O: $(cat "$DIR/objects.txt")"
grep -q 'token label *: KeyPort PIV Test' "$DIR/objects.txt" || fail "token label not 'KeyPort PIV Test'"
grep -q 'serial num *: 4b50' "$DIR/objects.txt" || fail "token serial not from the provisioned CHUID"
for id in 01 02; do
  grep -A6 '^Private Key Object; EC' "$DIR/objects.txt" | grep "ID: *$id" >/dev/null || fail "no EC private key with ID $id"
  grep -A6 '^Certificate Object' "$DIR/objects.txt" | grep "ID: *$id" >/dev/null || fail "no certificate with ID $id"
done
grep -A6 '^Private Key Object; EC' "$DIR/objects.txt" | grep -A3 'ID: *02' | grep 'always authenticate' >/dev/null \
  || fail "the 9C key (ID 02) is not CKA_ALWAYS_AUTHENTICATE"
if grep -A6 '^Private Key Object; EC' "$DIR/objects.txt" | grep -A3 'ID: *01' | grep 'always authenticate' >/dev/null; then
  fail "the 9A key (ID 01) is CKA_ALWAYS_AUTHENTICATE"
fi

step "sign with 9A (ID 01, no always-auth) and verify"
head -c 64 /dev/urandom >"$DIR/msg.9a"
openssl dgst -sha256 -binary "$DIR/msg.9a" >"$DIR/digest.9a"
p11 --sign --id 01 -m ECDSA --login --pin "$PIN" --signature-format openssl \
  -i "$DIR/digest.9a" -o "$DIR/sig.9a" >"$DIR/sign.9a.log" 2>&1 || fail "signing with 9A: $(cat "$DIR/sign.9a.log")"
openssl x509 -in "$DIR/certs/piv-9a.pem" -pubkey -noout >"$DIR/9a.pub"
openssl dgst -sha256 -verify "$DIR/9a.pub" -signature "$DIR/sig.9a" "$DIR/msg.9a" >/dev/null \
  || fail "9A signature does not verify against certs/piv-9a.pem"

step "sign with 9C (ID 02) and verify"
sign_and_verify first

step "remove the card"
"$RIG" remove "$DIR"
token_present && fail "token still present after remove"
p11 -L 2>/dev/null | grep -A1 '^Slot 0' | grep '(empty)' >/dev/null || fail "slot 0 not empty after remove"

step "insert the card"
"$RIG" insert "$DIR"
token_present || fail "token not back after insert"
sign_and_verify after-insert

step "restart pcscd"
"$RIG" restart-pcscd "$DIR"
token_present || fail "token not back after pcscd restart"
sign_and_verify after-restart

step "stop"
"$RIG" stop "$DIR"
token_present && fail "token still present after stop"
step "OK"
