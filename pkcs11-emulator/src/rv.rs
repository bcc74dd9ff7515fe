//! PKCS#11 return values as the behaviour JSON spells them: a small table of
//! names the emulator knows, plus plain numbers (`48`) and hex strings
//! (`"0x30"`) for everything else. Serialises back to the name when there is
//! one, else to a hex string, so `get` shows what a human would write.

use cryptoki_sys::*;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Names accepted in `rv` fields, with their values.
///
/// `CKR_AEAD_DECRYPT_FAILED` is a PKCS#11 3.0 code (0x42); it is listed so a
/// test can make a 2.40 module look like a 3.0 one on a failed tag check.
pub const NAMES: &[(&str, CK_RV)] = &[
    ("CKR_OK", CKR_OK),
    ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
    ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
    ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
    ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
    ("CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED),
    ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
    ("CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID),
    ("CKR_AEAD_DECRYPT_FAILED", CKR_AEAD_DECRYPT_FAILED),
    (
        "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_KEY_FUNCTION_NOT_PERMITTED,
    ),
    ("CKR_MECHANISM_PARAM_INVALID", CKR_MECHANISM_PARAM_INVALID),
    ("CKR_ENCRYPTED_DATA_INVALID", CKR_ENCRYPTED_DATA_INVALID),
    ("CKR_FUNCTION_NOT_SUPPORTED", CKR_FUNCTION_NOT_SUPPORTED),
    ("CKR_BUFFER_TOO_SMALL", CKR_BUFFER_TOO_SMALL),
];

/// A return value chosen by the behaviour (injected or substituted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rv(pub CK_RV);

impl Rv {
    /// Parses a name from [`NAMES`], a decimal number or a `0x` hex number.
    pub fn parse(s: &str) -> Result<Rv, String> {
        let t = s.trim();
        if let Some((_, v)) = NAMES.iter().find(|(n, _)| *n == t) {
            return Ok(Rv(*v));
        }
        let parsed = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            CK_RV::from_str_radix(hex, 16).ok()
        } else {
            t.parse::<CK_RV>().ok()
        };
        parsed
            .map(Rv)
            .ok_or_else(|| format!("unknown return value {t:?} (use a CKR_ name, 48 or \"0x30\")"))
    }

    /// The name from [`NAMES`], if the value has one.
    pub fn name(self) -> Option<&'static str> {
        NAMES.iter().find(|(_, v)| *v == self.0).map(|(n, _)| *n)
    }
}

impl fmt::Display for Rv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "0x{:X}", self.0),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RvRepr {
    Num(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Rv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RvRepr::deserialize(d)
            .map_err(|_| serde::de::Error::custom("rv must be a CKR_ name or a number"))?
        {
            RvRepr::Num(n) => CK_RV::try_from(n)
                .map(Rv)
                .map_err(|_| serde::de::Error::custom("rv out of range")),
            RvRepr::Text(s) => Rv::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Rv {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_hex() {
        assert_eq!(Rv::parse("CKR_DEVICE_ERROR"), Ok(Rv(0x30)));
        assert_eq!(Rv::parse("CKR_AEAD_DECRYPT_FAILED"), Ok(Rv(0x42)));
        assert_eq!(Rv::parse("CKR_DEVICE_MEMORY"), Ok(Rv(0x31)));
        assert_eq!(Rv::parse("0x30"), Ok(Rv(48)));
        assert_eq!(Rv::parse("48"), Ok(Rv(48)));
        assert!(Rv::parse("CKR_NOPE").is_err());
        assert!(Rv::parse("0xZZ").is_err());
    }

    #[test]
    fn json_round_trip() {
        let r: Rv = serde_json::from_str("48").unwrap();
        assert_eq!(r, Rv(CKR_DEVICE_ERROR));
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"CKR_DEVICE_ERROR\"");
        let r: Rv = serde_json::from_str("\"0x80000001\"").unwrap();
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"0x80000001\"");
        assert!(serde_json::from_str::<Rv>("true").is_err());
        assert!(serde_json::from_str::<Rv>("\"CKR_BOGUS\"").is_err());
    }
}
