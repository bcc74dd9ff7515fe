//! The behaviour settings type: what the emulator changes about the real
//! module, parsed from the JSON given by `XKS_EMULATOR_CONFIG` or by the
//! control socket's `set` / `patch`, and serialised back for `get`. Parsing
//! is strict (unknown fields, unknown function names and bad values are
//! errors) so a typo in a test cannot silently turn a fault off.

use crate::rv::Rv;
use crate::wrappers::Func;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How C_EncryptInit / C_Encrypt treat the IV of `CKM_AES_GCM`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IvMode {
    /// Forward unchanged (SoftHSM, Kryoptic, most non-FIPS HSMs).
    #[default]
    Passthrough,
    /// The caller passes 12 zero bytes; the HSM picks the IV and writes it
    /// back into the caller's `pIv` (CloudHSM Client SDK 5, nShield FIPS).
    HsmIntoParams,
    /// The caller passes 12 zero bytes; the HSM picks the IV and appends it
    /// to the ciphertext, after the tag (Luna 7 in FIPS mode).
    HsmAppended,
    /// Any caller IV is accepted but ignored; the HSM uses its own and
    /// overwrites the caller's `pIv` with it.
    OverwriteSilently,
}

/// A set of wrapped functions; `["*"]` (the default) means all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FnSet {
    all: bool,
    list: Vec<Func>,
}

impl FnSet {
    /// Every wrapped function.
    pub fn all() -> FnSet {
        FnSet {
            all: true,
            list: Vec::new(),
        }
    }

    /// Whether `f` is in the set.
    pub fn matches(&self, f: Func) -> bool {
        self.all || self.list.contains(&f)
    }

    fn parse(names: Vec<String>) -> Result<FnSet, String> {
        let mut set = FnSet {
            all: false,
            list: Vec::new(),
        };
        for n in names {
            if n == "*" {
                set.all = true;
            } else {
                let f = Func::from_name(&n)
                    .ok_or_else(|| format!("unknown or unwrapped PKCS#11 function {n:?}"))?;
                set.list.push(f);
            }
        }
        if set.all {
            set.list.clear();
        }
        Ok(set)
    }

    fn names(&self) -> Vec<&'static str> {
        if self.all {
            vec!["*"]
        } else {
            self.list.iter().map(|f| f.name()).collect()
        }
    }
}

impl<'de> Deserialize<'de> for FnSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        FnSet::parse(names).map_err(serde::de::Error::custom)
    }
}

impl Serialize for FnSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(s)
    }
}

/// How long a hung call is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HangKind {
    /// Sleep this many milliseconds, then proceed normally.
    Ms(u64),
    /// Block until a later `set`/`patch` clears the hang, then fail with
    /// CKR_DEVICE_ERROR without forwarding.
    Forever,
}

/// A hang applied to calls that start while it is set.
///
/// JSON: `"forever"`, `{"ms": N}`, `{"forever": true}`, the object forms
/// optionally with `"functions": [...]` (default all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hang {
    pub kind: HangKind,
    pub functions: FnSet,
}

impl Hang {
    fn from_value(v: Value) -> Result<Hang, String> {
        match v {
            Value::String(s) if s == "forever" => Ok(Hang {
                kind: HangKind::Forever,
                functions: FnSet::all(),
            }),
            Value::Object(map) => {
                let mut ms = None;
                let mut forever = false;
                let mut functions = FnSet::all();
                for (k, v) in map {
                    match k.as_str() {
                        "ms" => {
                            ms = Some(v.as_u64().ok_or("hang.ms must be a whole number")?);
                        }
                        "forever" => {
                            forever = v.as_bool().ok_or("hang.forever must be true or false")?;
                        }
                        "functions" => {
                            let names: Vec<String> = serde_json::from_value(v)
                                .map_err(|_| "hang.functions must be a list of names")?;
                            functions = FnSet::parse(names)?;
                        }
                        other => return Err(format!("unknown field hang.{other}")),
                    }
                }
                let kind = match (ms, forever) {
                    (Some(_), true) => return Err("hang: give either ms or forever".into()),
                    (Some(ms), false) => HangKind::Ms(ms),
                    (None, true) => HangKind::Forever,
                    (None, false) => return Err("hang needs ms or forever".into()),
                };
                Ok(Hang { kind, functions })
            }
            _ => Err(r#"hang must be null, "forever", {"ms": N} or {"forever": true}"#.into()),
        }
    }
}

impl<'de> Deserialize<'de> for Hang {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Hang::from_value(Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Hang {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = match (self.kind, self.functions.all) {
            (HangKind::Forever, true) => json!("forever"),
            (HangKind::Forever, false) => {
                json!({"forever": true, "functions": self.functions.names()})
            }
            (HangKind::Ms(ms), true) => json!({ "ms": ms }),
            (HangKind::Ms(ms), false) => json!({"ms": ms, "functions": self.functions.names()}),
        };
        v.serialize(s)
    }
}

/// One injected-return-value rule.
///
/// With `count`, the rule fires on at most that many matching calls (it is
/// used up as it fires; `get` shows what is left). With `fraction`, each
/// matching call fires with that probability, from a PRNG seeded by `seed`
/// (or the clock). With both, both limits apply; with neither, every
/// matching call fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectRule {
    #[serde(default = "FnSet::all")]
    pub functions: FnSet,
    pub rv: Rv,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// PRNG state (splitmix64), set by [`Behaviour::from_value`].
    #[serde(skip)]
    pub(crate) rng: u64,
}

impl InjectRule {
    /// Decides whether this rule fires for a call of `f`, consuming count
    /// and PRNG state as it goes.
    pub fn fire(&mut self, f: Func) -> bool {
        if !self.functions.matches(f) || self.count == Some(0) {
            return false;
        }
        if let Some(fraction) = self.fraction
            && self.next_unit() >= fraction
        {
            return false;
        }
        if let Some(c) = self.count.as_mut() {
            *c -= 1;
        }
        true
    }

    /// A uniform draw in [0, 1).
    fn next_unit(&mut self) -> f64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn prepare(&mut self) -> Result<(), String> {
        if let Some(fr) = self.fraction
            && !(fr.is_finite() && (0.0..=1.0).contains(&fr))
        {
            return Err(format!("inject.fraction must be within 0..=1, got {fr}"));
        }
        self.rng = match self.seed {
            Some(s) => s,
            None => clock_seed(),
        };
        Ok(())
    }
}

fn clock_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ N.fetch_add(0x2545_F491_4F6C_DD1D, Ordering::Relaxed)
}

/// Everything the emulator changes. The default changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Behaviour {
    pub iv_mode: IvMode,
    pub latency_us: u64,
    pub hang: Option<Hang>,
    pub inject: Vec<InjectRule>,
    pub decrypt_failure_rv: Option<Rv>,
}

impl Behaviour {
    /// Parses and validates a whole behaviour (the `set` form).
    pub fn from_value(v: Value) -> Result<Behaviour, String> {
        if !v.is_object() {
            return Err("behaviour must be a JSON object".into());
        }
        let mut b: Behaviour = serde_json::from_value(v).map_err(|e| e.to_string())?;
        for rule in &mut b.inject {
            rule.prepare()?;
        }
        Ok(b)
    }

    /// Parses a behaviour from JSON text.
    pub fn from_json(text: &str) -> Result<Behaviour, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Behaviour::from_value(v)
    }

    /// This behaviour with the top-level fields of `patch` replaced (the
    /// `patch` form). Fields not named keep their current state, including
    /// what is left of inject counts.
    pub fn patched(&self, patch: Value) -> Result<Behaviour, String> {
        let Value::Object(fields) = patch else {
            return Err("patch must be a JSON object".into());
        };
        let mut out = self.clone();
        for (k, v) in fields {
            let mut one = Map::new();
            one.insert(k.clone(), v);
            let part = Behaviour::from_value(Value::Object(one))?;
            match k.as_str() {
                "iv_mode" => out.iv_mode = part.iv_mode,
                "latency_us" => out.latency_us = part.latency_us,
                "hang" => out.hang = part.hang,
                "inject" => out.inject = part.inject,
                "decrypt_failure_rv" => out.decrypt_failure_rv = part.decrypt_failure_rv,
                other => return Err(format!("unknown field `{other}`")),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki_sys::*;

    #[test]
    fn empty_is_default() {
        assert_eq!(Behaviour::from_json("{}").unwrap(), Behaviour::default());
        let b = Behaviour::from_json(r#"{"hang": null, "decrypt_failure_rv": null}"#).unwrap();
        assert_eq!(b, Behaviour::default());
    }

    #[test]
    fn full_example_parses() {
        let b = Behaviour::from_json(
            r#"{
              "iv_mode": "hsm_appended",
              "latency_us": 250,
              "hang": {"ms": 500, "functions": ["C_Encrypt"]},
              "inject": [
                {"functions": ["C_Encrypt"], "rv": "CKR_DEVICE_ERROR", "count": 3},
                {"functions": ["*"], "rv": "0x30", "fraction": 0.1, "seed": 7},
                {"rv": 48}
              ],
              "decrypt_failure_rv": "CKR_AEAD_DECRYPT_FAILED"
            }"#,
        )
        .unwrap();
        assert_eq!(b.iv_mode, IvMode::HsmAppended);
        assert_eq!(b.latency_us, 250);
        let h = b.hang.clone().unwrap();
        assert_eq!(h.kind, HangKind::Ms(500));
        assert!(h.functions.matches(Func::C_Encrypt));
        assert!(!h.functions.matches(Func::C_Decrypt));
        assert_eq!(b.inject.len(), 3);
        assert_eq!(b.inject[0].rv, Rv(CKR_DEVICE_ERROR));
        assert_eq!(b.inject[1].rv, Rv(CKR_DEVICE_ERROR));
        assert!(b.inject[2].functions.matches(Func::C_Login));
        assert_eq!(b.decrypt_failure_rv, Some(Rv(CKR_AEAD_DECRYPT_FAILED)));

        // get shows it back in the same shape
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["hang"], json!({"ms": 500, "functions": ["C_Encrypt"]}));
        assert_eq!(v["inject"][1]["functions"], json!(["*"]));
        assert_eq!(v["decrypt_failure_rv"], json!("CKR_AEAD_DECRYPT_FAILED"));
        let again = Behaviour::from_value(v).unwrap();
        assert_eq!(again.inject[0].count, Some(3));
        assert_eq!(again.hang, b.hang);
    }

    #[test]
    fn hang_forms() {
        let b = Behaviour::from_json(r#"{"hang": "forever"}"#).unwrap();
        assert_eq!(b.hang.as_ref().unwrap().kind, HangKind::Forever);
        assert_eq!(serde_json::to_value(&b).unwrap()["hang"], json!("forever"));
        let b = Behaviour::from_json(r#"{"hang": {"forever": true, "functions": ["C_Sign"]}}"#)
            .unwrap();
        let h = b.hang.unwrap();
        assert_eq!(h.kind, HangKind::Forever);
        assert!(h.functions.matches(Func::C_Sign));
        assert!(!h.functions.matches(Func::C_Encrypt));
        for bad in [
            r#"{"hang": "sometimes"}"#,
            r#"{"hang": {"ms": -1}}"#,
            r#"{"hang": {}}"#,
            r#"{"hang": {"ms": 1, "forever": true}}"#,
            r#"{"hang": {"ms": 1, "extra": 2}}"#,
            r#"{"hang": {"ms": 1, "functions": ["C_Nope"]}}"#,
            r#"{"hang": 5}"#,
        ] {
            assert!(Behaviour::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn strict_fields_and_values() {
        for bad in [
            r#"{"iv_mode": "random"}"#,
            r#"{"latency": 5}"#,
            r#"{"latency_us": "5"}"#,
            r#"{"inject": [{"functions": ["C_Encrypt"]}]}"#,
            r#"{"inject": [{"rv": "CKR_DEVICE_ERROR", "counts": 1}]}"#,
            r#"{"inject": [{"rv": "CKR_WHATEVER"}]}"#,
            r#"{"inject": [{"rv": 48, "fraction": 1.5}]}"#,
            r#"{"inject": [{"rv": 48, "functions": ["C_GetFunctionList"]}]}"#,
            r#"[]"#,
            r#"not json"#,
        ] {
            assert!(Behaviour::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patch_merges_top_level() {
        let base = Behaviour::from_json(
            r#"{"iv_mode": "hsm_into_params", "inject": [{"rv": 48, "count": 2}]}"#,
        )
        .unwrap();
        let mut used = base.clone();
        assert!(used.inject[0].fire(Func::C_Encrypt));
        let p = used.patched(json!({"latency_us": 10})).unwrap();
        assert_eq!(p.iv_mode, IvMode::HsmIntoParams);
        assert_eq!(p.latency_us, 10);
        assert_eq!(p.inject[0].count, Some(1), "patch keeps what is left");
        let p = p.patched(json!({"inject": [], "hang": "forever"})).unwrap();
        assert!(p.inject.is_empty());
        assert!(p.hang.is_some());
        let p = p.patched(json!({"hang": null})).unwrap();
        assert!(p.hang.is_none());
        assert!(p.patched(json!({"bogus": 1})).is_err());
        assert!(p.patched(json!({"iv_mode": "nope"})).is_err());
        assert!(p.patched(json!(3)).is_err());
    }

    #[test]
    fn count_rules_are_used_up() {
        let mut b = Behaviour::from_json(
            r#"{"inject": [{"functions": ["C_Encrypt"], "rv": 48, "count": 2}]}"#,
        )
        .unwrap();
        let r = &mut b.inject[0];
        assert!(!r.fire(Func::C_Decrypt), "other functions do not match");
        assert!(r.fire(Func::C_Encrypt));
        assert!(r.fire(Func::C_Encrypt));
        assert!(!r.fire(Func::C_Encrypt));
        assert_eq!(r.count, Some(0));
    }

    #[test]
    fn fraction_rules_are_seeded_and_roughly_right() {
        let text = r#"{"inject": [{"rv": 48, "fraction": 0.25, "seed": 42}]}"#;
        let mut a = Behaviour::from_json(text).unwrap();
        let mut b = Behaviour::from_json(text).unwrap();
        let fa: Vec<bool> = (0..4000).map(|_| a.inject[0].fire(Func::C_Sign)).collect();
        let fb: Vec<bool> = (0..4000).map(|_| b.inject[0].fire(Func::C_Sign)).collect();
        assert_eq!(fa, fb, "same seed, same sequence");
        let hits = fa.iter().filter(|x| **x).count();
        assert!((800..1200).contains(&hits), "{hits} hits of 4000 at 0.25");

        let mut zero = Behaviour::from_json(r#"{"inject": [{"rv": 48, "fraction": 0}]}"#).unwrap();
        assert!((0..1000).all(|_| !zero.inject[0].fire(Func::C_Sign)));
        let mut one = Behaviour::from_json(r#"{"inject": [{"rv": 48, "fraction": 1}]}"#).unwrap();
        assert!((0..1000).all(|_| one.inject[0].fire(Func::C_Sign)));
    }

    #[test]
    fn count_and_fraction_together() {
        let mut b = Behaviour::from_json(
            r#"{"inject": [{"rv": 48, "fraction": 0.5, "count": 3, "seed": 1}]}"#,
        )
        .unwrap();
        let hits = (0..1000).filter(|_| b.inject[0].fire(Func::C_Sign)).count();
        assert_eq!(hits, 3);
    }
}
