#!/usr/bin/env bash
# Create a fresh soft SKF token store (for tests/soft-skf) with an SM2 test PKI made by OpenSSL.
#
#   softhsm-config/provision-skf.sh [-v] DIR
#
# Writes DIR/ca.{pem,key} (an SM2 test CA, SM3withSM2 with the default user ID
# 1234567812345678; its key stays in DIR so that enrollment tests can issue certificates for
# keys generated on the soft key, from a request with `openssl x509 -req -vfyopt distid:...`),
# DIR/certs/<container>.{pem,der} (signing certificates),
# DIR/certs/<container>-enc.{pem,der} (encryption certificates), DIR/pub/<container>.pem (the
# signing public keys, for `openssl dgst -verify`), and the library's state in DIR/skf
# (use it with KEYPORT_SOFT_SKF_DIR=DIR/skf; layout in tests/soft-skf/src/state.rs):
#
#   device SKF-KEY-0 (plugged in)  label "KeyPort SM2 Key", serial KP-SKF-0001
#     application KEYPORT_APP, user PIN 123456, 6 tries
#       container SM2-SIGN   SM2 signing key + certificate (CN 张三), SM2 encryption certificate
#       container RSA-SIGN   RSA-2048 signing key + certificate (issued by the same SM2 CA)
#       container 王五的签名 (its name in GBK bytes, as some vendors' tools write it): SM2 signing
#                            key + certificate (CN 王五), no encryption certificate
#   device SKF-KEY-1 (not plugged in) label "KeyPort Spare Key", serial KP-SKF-0002
#     application KEYPORT_APP, user PIN 123456, 6 tries
#       container SM2-SIGN   SM2 signing key + certificate (CN 李四), SM2 encryption certificate
#
# Silent except for errors unless -v is given.
set -euo pipefail

readonly USER_PIN="123456"
readonly MAX_RETRIES=6
readonly APP="KEYPORT_APP"
readonly DISTID="1234567812345678"

verbose=0
die() {
    echo "provision-skf.sh: $*" >&2
    exit 1
}
usage() {
    echo "usage: $0 [-v] DIR" >&2
    exit 2
}
# run DESCRIPTION CMD...: quiet unless -v; on failure show the command's output and stop.
run() {
    local what=$1 out
    shift
    if [[ $verbose == 1 ]]; then
        echo "== $what"
        "$@" || die "failed: $what"
    else
        out=$("$@" 2>&1) || {
            printf '%s\n' "$out" >&2
            die "failed: $what"
        }
    fi
}

while getopts ":vh" opt; do
    case $opt in
    v) verbose=1 ;;
    *) usage ;;
    esac
done
shift $((OPTIND - 1))
[[ $# == 1 ]] || usage
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"

mkdir -p "$1" || die "cannot create $1"
dir=$(cd "$1" && pwd)
[[ ! -e $dir/skf ]] || die "$dir/skf already exists; use an empty directory"
mkdir -p "$dir/certs" "$dir/pub" "$dir/skf/devices"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

sm2_key() { run "SM2 key $1" openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:SM2 -out "$1"; }

# The CA: self-signed, SM3withSM2 over the default user ID.
sm2_key "$dir/ca.key"
run "CA certificate" openssl req -new -x509 -key "$dir/ca.key" -sm3 -sigopt "distid:$DISTID" \
    -utf8 -subj "/C=CN/O=KeyPort 测试/CN=KeyPort SM2 Test CA" -days 3650 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$dir/ca.pem"

serial=4096
# issue KEYFILE SUBJECT KEYUSAGE OUT_BASENAME: a certificate for KEYFILE's public key.
issue() {
    local key=$1 subject=$2 usage=$3 out=$4
    serial=$((serial + 1))
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,%s\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' \
        "$usage" >"$work/ext"
    # The request's self-signature: SM3withSM2 for SM2 keys, SHA-256 for RSA (OpenSSL refuses
    # RSA with SM3). The certificate itself is always SM3withSM2 by the CA.
    local reqsig=(-sha256) reqcheck=()
    if openssl pkey -in "$key" -noout -text 2>/dev/null | grep -q 'ASN1 OID: SM2'; then
        reqsig=(-sm3 -sigopt "distid:$DISTID")
        reqcheck=(-vfyopt "distid:$DISTID")
    fi
    run "request $subject" openssl req -new -key "$key" "${reqsig[@]}" -utf8 -subj "$subject" \
        -out "$work/req.csr"
    run "certificate $subject" openssl x509 -req -in "$work/req.csr" -CA "$dir/ca.pem" \
        -CAkey "$dir/ca.key" -sm3 -sigopt "distid:$DISTID" "${reqcheck[@]}" \
        -days 825 -set_serial "$serial" -extfile "$work/ext" -out "$out.pem"
    run "DER of $out" openssl x509 -in "$out.pem" -outform DER -out "$out.der"
}

# device NAME LABEL SERIAL PRESENT(0/1)
device() {
    local d="$dir/skf/devices/$1"
    mkdir -p "$d/apps/$APP/containers"
    printf 'label=%s\nserial=%s\nmanufacturer=KeyPort Soft SKF\nissuer=KeyPort Test\n' "$2" "$3" >"$d/device.conf"
    printf 'user_pin=%s\nmax_retries=%s\nremaining=%s\ndefault_pin=0\n' \
        "$USER_PIN" "$MAX_RETRIES" "$MAX_RETRIES" >"$d/apps/$APP/pin.conf"
    if [[ $4 == 1 ]]; then : >"$d/present"; fi
}

# sm2_container DEVICE CONTAINER CERTNAME CN [sign-only]: SM2 signing + encryption pair (only
# the signing one with "sign-only", as single-certificate keys have).
sm2_container() {
    local c="$dir/skf/devices/$1/apps/$APP/containers/$2" name=$3 cn=$4 only=${5:-}
    mkdir -p "$c"
    echo sm2 >"$c/type"
    sm2_key "$c/sign.key.pem"
    issue "$c/sign.key.pem" "/C=CN/O=KeyPort 测试/CN=$cn" "digitalSignature,nonRepudiation" "$dir/certs/$name"
    cp "$dir/certs/$name.der" "$c/sign.cert.der"
    run "public key $name" openssl pkey -in "$c/sign.key.pem" -pubout -out "$dir/pub/$name.pem"
    if [[ $only == sign-only ]]; then return; fi
    sm2_key "$c/enc.key.pem"
    issue "$c/enc.key.pem" "/C=CN/O=KeyPort 测试/CN=$cn" "keyEncipherment,dataEncipherment,keyAgreement" \
        "$dir/certs/$name-enc"
    cp "$dir/certs/$name-enc.der" "$c/enc.cert.der"
}

rsa_container() {
    local c="$dir/skf/devices/$1/apps/$APP/containers/$2" name=$3 cn=$4
    mkdir -p "$c"
    echo rsa >"$c/type"
    run "RSA key $name" openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$c/sign.key.pem"
    issue "$c/sign.key.pem" "/C=CN/O=KeyPort 测试/CN=$cn" "digitalSignature,nonRepudiation" "$dir/certs/$name"
    cp "$dir/certs/$name.der" "$c/sign.cert.der"
    run "public key $name" openssl pkey -in "$c/sign.key.pem" -pubout -out "$dir/pub/$name.pem"
}

device SKF-KEY-0 "KeyPort SM2 Key" KP-SKF-0001 1
sm2_container SKF-KEY-0 SM2-SIGN sm2-sign "张三"
rsa_container SKF-KEY-0 RSA-SIGN rsa-sign "张三 RSA"
sm2_container SKF-KEY-0 $'\xcd\xf5\xce\xe5\xb5\xc4\xc7\xa9\xc3\xfb' gbk-sm2-sign "王五" sign-only
device SKF-KEY-1 "KeyPort Spare Key" KP-SKF-0002 0
sm2_container SKF-KEY-1 SM2-SIGN spare-sm2-sign "李四"

if [[ $verbose == 1 ]]; then echo "soft SKF store ready: KEYPORT_SOFT_SKF_DIR=$dir/skf"; fi
