#!/usr/bin/env bash
# Create a fresh SoftHSM token store for KeyPort tests.
#
#   softhsm-config/provision.sh [-v] DIR
#
# Writes DIR/softhsm2.conf (use it with SOFTHSM2_CONF=DIR/softhsm2.conf), DIR/tokens/,
# DIR/ca.pem + DIR/ca.key (a fresh test CA) and DIR/certs/<label>.{pem,der}.
# The token "KeyPort Test" (user PIN 123456, SO PIN 12345678) holds ten key pairs generated
# on the token, each with a certificate from the test CA under the same CKA_ID and CKA_LABEL.
# Silent except for errors unless -v is given.
set -euo pipefail

readonly MODULE="${KEYPORT_SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"
readonly TOKEN_LABEL="KeyPort Test"
readonly USER_PIN="123456"
readonly SO_PIN="12345678"

# label id key-type profile subject-CN (profile "sign", "auth"; "sign-always" = sign + always-auth)
readonly KEYS=(
    "sign-rsa2048     01 rsa:2048          sign        Test Signer RSA-2048"
    "sign-rsa3072     02 rsa:3072          sign        Test Signer RSA-3072"
    "sign-p256        03 EC:prime256v1     sign        Test Signer P-256"
    "sign-p384        04 EC:secp384r1      sign        Test Signer P-384"
    "sign-ed25519     05 EC:edwards25519   sign        Test Signer Ed25519"
    "auth-p256        06 EC:prime256v1     auth        Test Client P-256"
    "sign-p256-always 07 EC:prime256v1     sign-always Test Signer P-256 Always-Auth"
    "sign-rsa2048-always 08 rsa:2048       sign-always Test Signer RSA-2048 Always-Auth"
    "sign-ed25519-always 09 EC:edwards25519 sign-always Test Signer Ed25519 Always-Auth"
    "sign-p384-always 0a EC:secp384r1      sign-always Test Signer P-384 Always-Auth"
)

verbose=0
die() {
    echo "provision.sh: $*" >&2
    exit 1
}
usage() {
    echo "usage: $0 [-v] DIR" >&2
    exit 2
}
log() {
    if [[ $verbose == 1 ]]; then echo "$@"; fi
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

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for tool in softhsm2-util pkcs11-tool python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install softhsm2 opensc python3-cryptography)"
done
[[ -r $MODULE ]] || die "PKCS#11 module $MODULE not found (apt-get install softhsm2)"

mkdir -p "$1" || die "cannot create $1"
dir=$(cd "$1" && pwd)
if [[ -d $dir/tokens ]] && [[ -n $(ls -A "$dir/tokens") ]]; then
    die "$dir/tokens already holds a token store; use an empty directory"
fi
mkdir -p "$dir/tokens" "$dir/certs" "$dir/pub"
[[ $dir != *"|"* ]] || die "directory name must not contain '|'"
sed "s|@TOKENDIR@|$dir/tokens|" "$script_dir/softhsm2.conf.in" >"$dir/softhsm2.conf"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
log "SOFTHSM2_CONF=$SOFTHSM2_CONF"

run "initialise token '$TOKEN_LABEL'" \
    softhsm2-util --init-token --free --label "$TOKEN_LABEL" --so-pin "$SO_PIN" --pin "$USER_PIN"

p11() {
    pkcs11-tool --module "$MODULE" --token-label "$TOKEN_LABEL" "$@"
}

cert_specs=()
for entry in "${KEYS[@]}"; do
    read -r label id key_type profile cn <<<"$entry"
    extra=()
    if [[ $profile == sign-always ]]; then
        extra=(--always-auth)
        profile=sign
    fi
    keygen_out=$(p11 --login --pin "$USER_PIN" --keypairgen --key-type "$key_type" \
        --id "$id" --label "$label" --usage-sign "${extra[@]}" 2>&1) || {
        printf '%s\n' "$keygen_out" >&2
        die "failed: generate $key_type key pair $label (id $id)"
    }
    log "== generated $key_type key pair $label (id $id)"
    log "$keygen_out"
    if [[ $key_type == EC:prime256v1 || $key_type == EC:secp384r1 ]]; then
        # pkcs11-tool 0.23 cannot export P-384 public keys ("cannot create EVP_PKEY"), so for
        # NIST curves take CKA_EC_PARAMS and CKA_EC_POINT from the key generation listing.
        pub_file="$dir/pub/$label.ecpoint"
        awk '/^Public Key Object/ { pub = 1 }
             pub && $1 == "EC_PARAMS:" { print "params " $2 }
             pub && $1 == "EC_POINT:" { print "point " $2 }' <<<"$keygen_out" >"$pub_file"
        [[ $(wc -l <"$pub_file") == 2 ]] || die "no EC_POINT/EC_PARAMS in key generation output for $label"
    else
        pub_file="$dir/pub/$label.key"
        run "export public key $label" \
            p11 --read-object --type pubkey --id "$id" --output-file "$pub_file"
    fi
    cert_specs+=("$label:$pub_file:$cn:$profile")
done

run "issue certificates" python3 "$script_dir/issue_certs.py" "$dir" "${cert_specs[@]}"

for entry in "${KEYS[@]}"; do
    read -r label id _ <<<"$entry"
    run "store certificate $label (id $id)" \
        p11 --login --pin "$USER_PIN" --write-object "$dir/certs/$label.der" --type cert \
        --id "$id" --label "$label"
done

log "token '$TOKEN_LABEL' ready in $dir"
