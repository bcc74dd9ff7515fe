#!/usr/bin/env python3
"""Restricts the usage of an AES secret key on a PKCS#11 token (no third-party packages: ctypes only).

pkcs11-tool cannot generate an AES key that may encrypt but not decrypt (or neither), so
create-softhsm-token.sh generates the key with pkcs11-tool and then calls this helper to set
CKA_ENCRYPT / CKA_DECRYPT as asked and CKA_WRAP / CKA_UNWRAP / CKA_SIGN / CKA_VERIFY to false.

usage: p11-set-usage.py MODULE TOKEN_LABEL LABEL encrypt,decrypt|encrypt|decrypt|none
The user PIN is read from the environment variable XKS_HSM_PIN (never from the command line).
"""
import ctypes
import os
import sys

CK_ULONG = ctypes.c_ulong
CK_BBOOL = ctypes.c_ubyte


class Attribute(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG)]


CKA_CLASS, CKA_LABEL, CKA_KEY_TYPE = 0x0, 0x3, 0x100
CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY = 0x104, 0x105, 0x106, 0x107, 0x108, 0x10A
CKO_SECRET_KEY, CKK_AES = 4, 0x1F
CKF_RW_SESSION, CKF_SERIAL_SESSION, CKU_USER = 2, 4, 1
CKR_USER_ALREADY_LOGGED_IN, CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x100, 0x191


def check(what, rv, ok=(0,)):
    if rv not in ok:
        sys.exit(f"p11-set-usage: {what} failed: CKR 0x{rv:x}")


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    module, token_label, label, usage = sys.argv[1:]
    pin = os.environ.get("XKS_HSM_PIN")
    if not pin:
        sys.exit("p11-set-usage: set XKS_HSM_PIN to the user PIN")
    wanted = {p.strip() for p in usage.split(",")} - {"none", ""}
    if not wanted <= {"encrypt", "decrypt"}:
        sys.exit(f"p11-set-usage: unknown usage {usage!r}")

    lib = ctypes.CDLL(module)
    for name in ("C_Initialize", "C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login",
                 "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal", "C_SetAttributeValue",
                 "C_CloseSession", "C_Finalize"):
        getattr(lib, name).restype = CK_ULONG
    check("C_Initialize", lib.C_Initialize(None), (0, CKR_CRYPTOKI_ALREADY_INITIALIZED))

    count = CK_ULONG(0)
    check("C_GetSlotList", lib.C_GetSlotList(CK_BBOOL(1), None, ctypes.byref(count)))
    slots = (CK_ULONG * count.value)()
    check("C_GetSlotList", lib.C_GetSlotList(CK_BBOOL(1), slots, ctypes.byref(count)))
    slot = None
    for s in slots[: count.value]:
        info = ctypes.create_string_buffer(512)  # CK_TOKEN_INFO starts with label[32]
        if lib.C_GetTokenInfo(CK_ULONG(s), info) == 0:
            if info.raw[:32].decode("utf-8", "replace").rstrip(" \0") == token_label:
                slot = s
                break
    if slot is None:
        sys.exit(f"p11-set-usage: no token labelled {token_label!r}")

    session = CK_ULONG(0)
    check("C_OpenSession", lib.C_OpenSession(CK_ULONG(slot), CK_ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION),
                                             None, None, ctypes.byref(session)))
    pin_bytes = pin.encode()
    check("C_Login", lib.C_Login(session, CK_ULONG(CKU_USER), ctypes.c_char_p(pin_bytes), CK_ULONG(len(pin_bytes))),
          (0, CKR_USER_ALREADY_LOGGED_IN))

    cls, ktype, lbl = CK_ULONG(CKO_SECRET_KEY), CK_ULONG(CKK_AES), label.encode()
    find = (Attribute * 3)(
        Attribute(CKA_CLASS, ctypes.cast(ctypes.byref(cls), ctypes.c_void_p), ctypes.sizeof(cls)),
        Attribute(CKA_KEY_TYPE, ctypes.cast(ctypes.byref(ktype), ctypes.c_void_p), ctypes.sizeof(ktype)),
        Attribute(CKA_LABEL, ctypes.cast(ctypes.c_char_p(lbl), ctypes.c_void_p), len(lbl)),
    )
    check("C_FindObjectsInit", lib.C_FindObjectsInit(session, find, CK_ULONG(3)))
    handles, found = (CK_ULONG * 2)(), CK_ULONG(0)
    check("C_FindObjects", lib.C_FindObjects(session, handles, CK_ULONG(2), ctypes.byref(found)))
    check("C_FindObjectsFinal", lib.C_FindObjectsFinal(session))
    if found.value != 1:
        sys.exit(f"p11-set-usage: expected one AES key labelled {label!r}, found {found.value}")

    flags = {CKA_ENCRYPT: "encrypt" in wanted, CKA_DECRYPT: "decrypt" in wanted,
             CKA_WRAP: False, CKA_UNWRAP: False, CKA_SIGN: False, CKA_VERIFY: False}
    values = [CK_BBOOL(1 if v else 0) for v in flags.values()]
    template = (Attribute * len(flags))(*[
        Attribute(t, ctypes.cast(ctypes.byref(v), ctypes.c_void_p), 1) for t, v in zip(flags, values)
    ])
    check("C_SetAttributeValue", lib.C_SetAttributeValue(session, handles[0], template, CK_ULONG(len(flags))))
    lib.C_CloseSession(session)
    lib.C_Finalize(None)


if __name__ == "__main__":
    main()
