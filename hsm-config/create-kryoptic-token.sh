#!/usr/bin/env bash
# Creates a Kryoptic soft token for xks-proxy development and tests, holding the conformance keys.
#
#   hsm-config/create-kryoptic-token.sh DIR [LABEL] [PIN]
#
# DIR receives kryoptic.conf (slot 1, sqlite storage) and the database token.sql. LABEL defaults
# to "xks-proxy" and the user PIN to "1234"; the SO PIN is taken from XKS_HSM_SO_PIN (default
# "87654321"). The module comes from KRYOPTIC_MODULE, or else from hsm-config/build-kryoptic.sh
# (which builds it on first use). The keys, all AES-256 token objects that are private,
# sensitive and never extractable:
#   foo               encrypt + decrypt
#   encrypt_only_key  encrypt only
#   decrypt_only_key  decrypt only
#   impotent_key      neither
#   xks-health-check  encrypt + decrypt (health checks only, not a KMS key)
# The last line on stdout is "export KRYOPTIC_CONF=DIR/kryoptic.conf".
#
# Kryoptic exports only C_GetFunctionList/C_GetInterface(List), not the C_* functions themselves,
# so hsm-config/p11-set-usage.py (which calls C_Initialize & co. by symbol) cannot load it. The keys
# are therefore generated in one C_GenerateKey call with their final usage by gen_key() below
# (python3 + ctypes, no packages), and checked afterwards by check_key().
# Development only: the PINs are weak and the SO/user PINs pass through command lines.
set -euo pipefail

die() { echo "create-kryoptic-token: $*" >&2; exit 1; }

[ $# -ge 1 ] && [ $# -le 3 ] || die "usage: $0 DIR [LABEL] [PIN]"
DIR=$1
LABEL=${2:-xks-proxy}
PIN=${3:-1234}
SO_PIN=${XKS_HSM_SO_PIN:-87654321}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

command -v pkcs11-tool >/dev/null || die "pkcs11-tool not found (apt-get install opensc)"
command -v python3 >/dev/null || die "python3 not found"

MODULE=${KRYOPTIC_MODULE:-}
if [ -z "$MODULE" ]; then
  MODULE=$("$HERE/build-kryoptic.sh" | tail -n 1) || die "build-kryoptic.sh failed"
fi
[ -f "$MODULE" ] || die "Kryoptic module $MODULE not found"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
[ -e "$DIR/token.sql" ] && die "$DIR/token.sql already exists (use a fresh DIR)"
cat > "$DIR/kryoptic.conf" <<EOF
# Kryoptic configuration written by hsm-config/create-kryoptic-token.sh
[[slots]]
slot = 1
dbtype = "sqlite"
dbargs = "$DIR/token.sql"
EOF
export KRYOPTIC_CONF=$DIR/kryoptic.conf

p11() { pkcs11-tool --module "$MODULE" "$@"; }
p11 --slot 1 --init-token --label "$LABEL" --so-pin "$SO_PIN" >/dev/null 2>&1 \
  || die "pkcs11-tool --init-token failed"
p11 --token-label "$LABEL" --login --login-type so --so-pin "$SO_PIN" --init-pin --pin "$PIN" >/dev/null 2>&1 \
  || die "pkcs11-tool --init-pin failed"

# PKCS#11 through ctypes and C_GetFunctionList. Usage:
#   python3 - MODULE TOKEN_LABEL gen|check LABEL USAGE     (user PIN in XKS_HSM_PIN)
# "gen" creates the AES-256 key with exactly that usage; "check" verifies an existing key.
p11_py() {
  XKS_HSM_PIN=$PIN python3 - "$MODULE" "$LABEL" "$@" <<'PY'
import ctypes, os, sys

UL, BB = ctypes.c_ulong, ctypes.c_ubyte
class Attr(ctypes.Structure):
    _fields_ = [("type", UL), ("pValue", ctypes.c_void_p), ("ulValueLen", UL)]
class Mech(ctypes.Structure):
    _fields_ = [("mechanism", UL), ("pParameter", ctypes.c_void_p), ("ulParameterLen", UL)]
# CK_FUNCTION_LIST: CK_VERSION then the v2.40 function pointers, in this order.
NAMES = ("Initialize Finalize GetInfo GetFunctionList GetSlotList GetSlotInfo GetTokenInfo "
         "GetMechanismList GetMechanismInfo InitToken InitPIN SetPIN OpenSession CloseSession "
         "CloseAllSessions GetSessionInfo GetOperationState SetOperationState Login Logout "
         "CreateObject CopyObject DestroyObject GetObjectSize GetAttributeValue SetAttributeValue "
         "FindObjectsInit FindObjects FindObjectsFinal EncryptInit Encrypt EncryptUpdate EncryptFinal "
         "DecryptInit Decrypt DecryptUpdate DecryptFinal DigestInit Digest DigestUpdate DigestKey "
         "DigestFinal SignInit Sign SignUpdate SignFinal SignRecoverInit SignRecover VerifyInit Verify "
         "VerifyUpdate VerifyFinal VerifyRecoverInit VerifyRecover DigestEncryptUpdate "
         "DecryptDigestUpdate SignEncryptUpdate DecryptVerifyUpdate GenerateKey").split()
class FnList(ctypes.Structure):
    _fields_ = [("version", BB * 2)] + [(n, ctypes.c_void_p) for n in NAMES]

CKA = dict(CLASS=0x0, TOKEN=0x1, PRIVATE=0x2, LABEL=0x3, KEY_TYPE=0x100, SENSITIVE=0x103,
           ENCRYPT=0x104, DECRYPT=0x105, WRAP=0x106, UNWRAP=0x107, SIGN=0x108, VERIFY=0x10A,
           DERIVE=0x10C, VALUE_LEN=0x161, EXTRACTABLE=0x162, NEVER_EXTRACTABLE=0x164,
           ALWAYS_SENSITIVE=0x165)
CKO_SECRET_KEY, CKK_AES, CKM_AES_KEY_GEN = 4, 0x1F, 0x1080

def die(msg):
    sys.exit(f"create-kryoptic-token: {msg}")

module, token_label, cmd, label, usage = sys.argv[1:6]
wanted = {u.strip() for u in usage.split(",")} - {"none", ""}
if not wanted <= {"encrypt", "decrypt"}:
    die(f"unknown usage {usage!r}")
lib = ctypes.CDLL(module)
lib.C_GetFunctionList.restype = UL
fl_p = ctypes.POINTER(FnList)()
if lib.C_GetFunctionList(ctypes.byref(fl_p)) != 0:
    die("C_GetFunctionList failed")
fl = fl_p.contents
def fn(name):
    f = ctypes.CFUNCTYPE(UL)(getattr(fl, name))  # no argtypes: wrap integers in CK_ULONG
    return lambda *a: f(*[UL(x) if isinstance(x, int) else x for x in a])
def call(name, *args, ok=(0,)):
    rv = fn(name)(*args)
    if rv not in ok:
        die(f"C_{name} failed: CKR 0x{rv:x}")
    return rv

keep = []
def attrs(pairs):
    arr = (Attr * len(pairs))()
    for i, (t, v) in enumerate(pairs):
        if isinstance(v, bool):
            b = BB(1 if v else 0); keep.append(b)
            arr[i] = Attr(CKA[t], ctypes.addressof(b), 1)
        elif isinstance(v, int):
            u = UL(v); keep.append(u)
            arr[i] = Attr(CKA[t], ctypes.addressof(u), ctypes.sizeof(u))
        else:
            s = ctypes.create_string_buffer(v, len(v)); keep.append(s)
            arr[i] = Attr(CKA[t], ctypes.addressof(s), len(v))
    return arr

call("Initialize", None, ok=(0, 0x191))
n = UL(0)
call("GetSlotList", 1, None, ctypes.byref(n))
slots = (UL * max(n.value, 1))()
call("GetSlotList", 1, slots, ctypes.byref(n))
slot = None
for s in slots[: n.value]:
    info = ctypes.create_string_buffer(512)  # CK_TOKEN_INFO begins with label[32]
    if fn("GetTokenInfo")(s, info) == 0 and info.raw[:32].decode("utf-8", "replace").rstrip(" \0") == token_label:
        slot = s
        break
if slot is None:
    die(f"no token labelled {token_label!r}")
sess = UL(0)
call("OpenSession", slot, 6, None, None, ctypes.byref(sess))  # CKF_SERIAL_SESSION | CKF_RW_SESSION
pin = os.environ["XKS_HSM_PIN"].encode()
call("Login", sess, 1, pin, len(pin), ok=(0, 0x100))
lbl = label.encode()
find = [("CLASS", CKO_SECRET_KEY), ("KEY_TYPE", CKK_AES), ("LABEL", lbl)]
def find_keys():
    t = attrs(find)
    call("FindObjectsInit", sess, t, len(find))
    h, cnt = (UL * 4)(), UL(0)
    call("FindObjects", sess, h, 4, ctypes.byref(cnt))
    call("FindObjectsFinal", sess)
    return list(h[: cnt.value])

usage_attrs = dict(ENCRYPT="encrypt" in wanted, DECRYPT="decrypt" in wanted, WRAP=False,
                   UNWRAP=False, SIGN=False, VERIFY=False, DERIVE=False)
if cmd == "gen":
    if find_keys():
        die(f"an AES key labelled {label!r} already exists")
    tmpl = find + [("VALUE_LEN", 32), ("TOKEN", True), ("PRIVATE", True), ("SENSITIVE", True),
                   ("EXTRACTABLE", False)] + list(usage_attrs.items())
    t = attrs(tmpl)
    mech = Mech(CKM_AES_KEY_GEN, None, 0)
    h = UL(0)
    call("GenerateKey", sess, ctypes.byref(mech), t, len(tmpl), ctypes.byref(h))
elif cmd == "check":
    keys = find_keys()
    if len(keys) != 1:
        die(f"expected one AES key labelled {label!r}, found {len(keys)}")
    expect = dict(TOKEN=True, PRIVATE=True, SENSITIVE=True, ALWAYS_SENSITIVE=True, EXTRACTABLE=False,
                  NEVER_EXTRACTABLE=True, VALUE_LEN=32, **usage_attrs)
    names = list(expect)
    bufs = [UL(0) if n == "VALUE_LEN" else BB(0) for n in names]
    t = (Attr * len(names))(*[Attr(CKA[n], ctypes.addressof(b), ctypes.sizeof(b)) for n, b in zip(names, bufs)])
    call("GetAttributeValue", sess, keys[0], t, len(names))
    got = {n: (b.value if n == "VALUE_LEN" else bool(b.value)) for n, b in zip(names, bufs)}
    bad = {n: got[n] for n in names if got[n] != expect[n]}
    if bad:
        die(f"key {label!r} has wrong attributes: {bad}")
else:
    die(f"unknown command {cmd!r}")
fn("CloseSession")(sess)
fn("Finalize")(None)
PY
}

make_key() { # label usage
  p11_py gen "$1" "$2" || die "could not generate key $1"
  p11_py check "$1" "$2" || die "key $1 failed its attribute check"
}

make_key foo encrypt,decrypt
make_key encrypt_only_key encrypt
make_key decrypt_only_key decrypt
make_key impotent_key none
make_key xks-health-check encrypt,decrypt

echo "token \"$LABEL\" created in $DIR with keys foo, encrypt_only_key, decrypt_only_key, impotent_key, xks-health-check" >&2
echo "export KRYOPTIC_CONF=$DIR/kryoptic.conf"
