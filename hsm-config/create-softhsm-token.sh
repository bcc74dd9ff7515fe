#!/usr/bin/env bash
# Creates a SoftHSM v2 token for xks-proxy development and tests, with the conformance keys.
#
#   hsm-config/create-softhsm-token.sh DIR [LABEL] [PIN]
#
# DIR gets softhsm2.conf and tokens/. LABEL defaults to "xks-proxy", the user PIN to "1234"
# (the SO PIN comes from XKS_HSM_SO_PIN, default "87654321"). Keys, all AES-256, token objects,
# private, sensitive, not extractable:
#   foo               encrypt + decrypt
#   encrypt_only_key  encrypt only
#   decrypt_only_key  decrypt only
#   impotent_key      neither
#   xks-health-check  encrypt + decrypt (the proxy's health-check key, not a KMS key)
# Keys are generated with pkcs11-tool (OpenSC); pkcs11-tool cannot clear CKA_ENCRYPT/CKA_DECRYPT on
# an AES key, so p11-set-usage.py (python3 + ctypes, no packages) sets the usage flags afterwards.
# Development only: the PINs are weak and pass through command lines.
set -euo pipefail

die() { echo "create-softhsm-token: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 3 ] || die "usage: $0 DIR [LABEL] [PIN]"
DIR=$1
LABEL=${2:-xks-proxy}
PIN=${3:-1234}
SO_PIN=${XKS_HSM_SO_PIN:-87654321}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

MODULE=${SOFTHSM2_MODULE:-}
if [ -z "$MODULE" ]; then
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/local/lib/softhsm/libsofthsm2.so /opt/homebrew/lib/softhsm/libsofthsm2.so; do
    [ -f "$m" ] && MODULE=$m && break
  done
fi
[ -n "$MODULE" ] || die "libsofthsm2.so not found (apt-get install softhsm2, or set SOFTHSM2_MODULE)"
command -v softhsm2-util >/dev/null || die "softhsm2-util not found (apt-get install softhsm2)"
command -v pkcs11-tool >/dev/null || die "pkcs11-tool not found (apt-get install opensc)"
command -v python3 >/dev/null || die "python3 not found (needed by p11-set-usage.py)"

mkdir -p "$DIR/tokens"
DIR=$(cd "$DIR" && pwd)
sed "s|@TOKENDIR@|$DIR/tokens|" "$HERE/softhsm2.conf.template" > "$DIR/softhsm2.conf"
export SOFTHSM2_CONF=$DIR/softhsm2.conf

if softhsm2-util --show-slots 2>/dev/null | grep -q "Label:[[:space:]]*$LABEL[[:space:]]*$"; then
  die "a token labelled \"$LABEL\" already exists in $DIR/tokens (use a fresh DIR)"
fi
softhsm2-util --init-token --free --label "$LABEL" --so-pin "$SO_PIN" --pin "$PIN" >/dev/null

p11() { pkcs11-tool --module "$MODULE" --token-label "$LABEL" --login --pin "$PIN" "$@"; }

make_key() { # label usage
  p11 --keygen --key-type AES:32 --label "$1" --private --sensitive >/dev/null 2>&1 \
    || die "pkcs11-tool could not generate key $1"
  XKS_HSM_PIN=$PIN python3 "$HERE/p11-set-usage.py" "$MODULE" "$LABEL" "$1" "$2"
}

make_key foo encrypt,decrypt
make_key encrypt_only_key encrypt
make_key decrypt_only_key decrypt
make_key impotent_key none
make_key xks-health-check encrypt,decrypt

echo "token \"$LABEL\" created in $DIR/tokens with keys foo, encrypt_only_key, decrypt_only_key, impotent_key, xks-health-check" >&2
echo "export SOFTHSM2_CONF=$DIR/softhsm2.conf"
