//! AES-256-GCM through PKCS#11, for every way an HSM hands out the IV ([`IvSource`]), and the
//! start-up probe that finds out which way a token wants.
//!
//! - [`IvSource::ProxyRandom`]: the proxy passes a fresh IV from the HSM's RNG (`C_GenerateRandom`,
//!   batched per worker) in `CK_GCM_PARAMS.pIv` (SoftHSM, Kryoptic, Luna outside FIPS mode).
//! - [`IvSource::HsmIntoParams`]: the proxy passes 12 zero bytes and the HSM writes the IV it used
//!   into that buffer (AWS CloudHSM Client SDK 5, Entrust nShield in FIPS mode).
//! - [`IvSource::HsmAppended`]: the proxy passes 12 zero bytes and the HSM appends the IV to the
//!   `C_Encrypt` output, after the tag (Thales Luna 7 in FIPS mode).
//! - [`IvSource::MessageApi`]: PKCS#11 3.0 `C_MessageEncryptInit` / `C_EncryptMessage` with
//!   `CK_GCM_MESSAGE_PARAMS` and the token's random IV generator (`CKG_GENERATE_RANDOM`).
//!
//! Whatever the source, the IV in the reply is the one the HSM reports after the call (the `pIv`
//! buffer read back, or the appended bytes), and it is checked: 12 bytes, not all zero, not the
//! previous IV of that worker's session. Anything else is an error, never a ciphertext.
//! Decryption is always single-part `C_Decrypt` with the caller's 12- or 16-byte IV.

use std::fmt;
use std::sync::OnceLock;

use cryptoki::context::Pkcs11;
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::aead::{GcmMessageParams, GcmParams, GeneratorFunction};
use cryptoki::mechanism::{Mechanism, MechanismType, MessageParam};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::errors::describe;
use super::pool::{CallError, Worker};
use super::profile::Profile;
use crate::keystore::{IV_LEN, KeyId, Sealed, TAG_LEN};

/// Where the IV of an encryption comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IvSource {
    ProxyRandom,
    HsmIntoParams,
    HsmAppended,
    MessageApi,
}

impl fmt::Display for IvSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IvSource::ProxyRandom => "proxy-random",
            IvSource::HsmIntoParams => "hsm-into-params",
            IvSource::HsmAppended => "hsm-appended",
            IvSource::MessageApi => "message-api",
        })
    }
}

/// The `iv_source` setting: `auto` (the default) probes the token at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IvSetting {
    #[default]
    Auto,
    ProxyRandom,
    HsmIntoParams,
    HsmAppended,
    MessageApi,
}

impl IvSetting {
    fn fixed(self) -> Option<IvSource> {
        match self {
            IvSetting::Auto => None,
            IvSetting::ProxyRandom => Some(IvSource::ProxyRandom),
            IvSetting::HsmIntoParams => Some(IvSource::HsmIntoParams),
            IvSetting::HsmAppended => Some(IvSource::HsmAppended),
            IvSetting::MessageApi => Some(IvSource::MessageApi),
        }
    }
}

/// Why an AES-GCM call gave no usable answer.
#[derive(Debug)]
pub(crate) enum GcmError {
    Call(CallError),
    /// Decryption: the tag does not verify (per the module's [`Profile`]).
    BadTag,
    /// The HSM answered, but not with something this proxy can return: a wrong length, an
    /// all-zero or repeated IV, two different IVs.
    Malformed(String),
}

impl From<CallError> for GcmError {
    fn from(e: CallError) -> Self {
        GcmError::Call(e)
    }
}

/// What one encryption call gave back, before it is checked.
struct RawSeal {
    output: Vec<u8>,
    /// The `pIv` buffer after the call.
    iv_after: [u8; IV_LEN],
    /// The tag, when the HSM returns it apart (message API).
    tag: Option<[u8; TAG_LEN]>,
}

fn tag_bits() -> Ulong {
    Ulong::from((TAG_LEN * 8) as u64)
}

/// One encryption as `source` wants it, with `start` in the IV buffer.
fn raw_encrypt(
    session: &Session,
    source: IvSource,
    start: [u8; IV_LEN],
    key: ObjectHandle,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<RawSeal, Error> {
    let mut iv = start;
    if source == IvSource::MessageApi {
        let mut tag = [0u8; TAG_LEN];
        let params = GcmMessageParams::new(
            &mut iv,
            Ulong::from(0u64),
            GeneratorFunction::GenerateRandom,
            &mut tag,
        )?;
        session.message_encrypt_init(&Mechanism::AesGcmMessage(params), key)?;
        let output = session.encrypt_message(&MessageParam::AesGcmMessage(params), aad, plaintext);
        let finished = session.message_encrypt_final();
        let output = output?;
        finished?;
        return Ok(RawSeal {
            output,
            iv_after: iv,
            tag: Some(tag),
        });
    }
    let output = session.encrypt(
        &Mechanism::AesGcm(GcmParams::new(&mut iv, aad, tag_bits())?),
        key,
        plaintext,
    )?;
    Ok(RawSeal {
        output,
        iv_after: iv,
        tag: None,
    })
}

/// Splits and checks an encryption's output; the IV is the one the HSM reported.
fn interpret(
    source: IvSource,
    start: [u8; IV_LEN],
    plaintext_len: usize,
    raw: RawSeal,
) -> Result<Sealed, String> {
    let RawSeal {
        mut output,
        iv_after,
        tag,
    } = raw;
    let sealed_len = plaintext_len + TAG_LEN;
    let wrong_length = |got: usize, want: usize| {
        format!(
            "AES-GCM ({source}) returned {got} bytes for {plaintext_len} bytes of plaintext, not {want}"
        )
    };
    let iv = match (source, tag) {
        (IvSource::MessageApi, Some(tag)) => {
            if output.len() != plaintext_len {
                return Err(wrong_length(output.len(), plaintext_len));
            }
            check_iv(&iv_after)?;
            return Ok(Sealed {
                iv: iv_after.to_vec(),
                ciphertext: output,
                tag,
            });
        }
        (IvSource::HsmAppended, _) => {
            if output.len() != sealed_len + IV_LEN {
                return Err(wrong_length(output.len(), sealed_len + IV_LEN));
            }
            let mut appended = [0u8; IV_LEN];
            appended.copy_from_slice(&output[sealed_len..]);
            if iv_after != start && iv_after != appended {
                return Err("the HSM reported two different IVs (in pIv and after the tag)".into());
            }
            output.truncate(sealed_len);
            appended
        }
        _ => {
            if output.len() != sealed_len {
                return Err(wrong_length(output.len(), sealed_len));
            }
            iv_after
        }
    };
    check_iv(&iv)?;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&output[plaintext_len..]);
    output.truncate(plaintext_len);
    Ok(Sealed {
        iv: iv.to_vec(),
        ciphertext: output,
        tag,
    })
}

/// An IV is never all zero: that is the buffer the HSM was meant to fill.
fn check_iv(iv: &[u8; IV_LEN]) -> Result<(), String> {
    if iv.iter().all(|b| *b == 0) {
        return Err("the HSM reported an all-zero IV".into());
    }
    Ok(())
}

/// Encrypts on the worker's session with the IV source `source`.
pub(crate) fn encrypt(
    worker: &mut Worker,
    source: IvSource,
    key: ObjectHandle,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Sealed, GcmError> {
    let start = match source {
        IvSource::ProxyRandom => worker.next_iv()?,
        _ => [0u8; IV_LEN],
    };
    let raw = worker.call(|s| raw_encrypt(s, source, start, key, aad, plaintext))?;
    let sealed = interpret(source, start, plaintext.len(), raw).map_err(GcmError::Malformed)?;
    worker.accept_iv(&sealed.iv).map_err(GcmError::Malformed)?;
    Ok(sealed)
}

/// Single-part `C_Decrypt` of ciphertext || tag with the caller's IV.
fn raw_decrypt(
    session: &Session,
    key: ObjectHandle,
    sealed: &Sealed,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let mut input = Vec::with_capacity(sealed.ciphertext.len() + TAG_LEN);
    input.extend_from_slice(&sealed.ciphertext);
    input.extend_from_slice(&sealed.tag);
    let mut iv = sealed.iv.clone();
    session
        .decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, aad, tag_bits())?),
            key,
            &input,
        )
        .map(Zeroizing::new)
}

/// Decrypts on the worker's session; a bad tag is told apart per the module's profile.
pub(crate) fn decrypt(
    worker: &mut Worker,
    profile: &Profile,
    key: ObjectHandle,
    sealed: &Sealed,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, GcmError> {
    match worker.call(|s| raw_decrypt(s, key, sealed, aad)) {
        Ok(plaintext) if plaintext.len() == sealed.ciphertext.len() => Ok(plaintext),
        Ok(_) => Err(GcmError::Malformed(
            "AES-GCM decryption returned a wrong length".into(),
        )),
        Err(CallError::Hsm(e)) if profile.is_bad_tag(&e) => Err(GcmError::BadTag),
        Err(e) => Err(GcmError::Call(e)),
    }
}

/// Return values with which a token refuses a way of passing the IV (rather than failing).
fn is_refusal(err: &Error) -> bool {
    matches!(
        err,
        Error::Pkcs11(
            RvError::MechanismParamInvalid
                | RvError::MechanismInvalid
                | RvError::ArgumentsBad
                | RvError::FunctionNotSupported
                | RvError::OperationNotInitialized
                | RvError::DataLenRange,
            _
        ) | Error::NullFunctionPointer
            | Error::NotSupported
    )
}

/// Finds out which [`IvSource`] the token accepts, with the key `key` (the health-check key):
/// first the proxy's own IV, then a zeroed `pIv` (written back or appended), then the message
/// API when the token lists it for `CKM_AES_GCM`. Each candidate must decrypt back.
pub(crate) fn probe(
    ctx: &Pkcs11,
    slot: Slot,
    session: &Session,
    key: ObjectHandle,
) -> Result<IvSource, String> {
    let hsm = |e: Error| describe(&e);
    let mut plaintext = [0u8; 32];
    session.generate_random_slice(&mut plaintext).map_err(hsm)?;
    let mut own_iv = [0u8; IV_LEN];
    session.generate_random_slice(&mut own_iv).map_err(hsm)?;
    let aad = b"xks-proxy IV-source probe";
    let verify =
        |source: IvSource, start: [u8; IV_LEN], raw: RawSeal| -> Result<IvSource, String> {
            let sealed = interpret(source, start, plaintext.len(), raw)?;
            let opened = raw_decrypt(session, key, &sealed, aad).map_err(|e| {
                format!(
                    "{source}: the probe does not decrypt back: {}",
                    describe(&e)
                )
            })?;
            if opened.as_slice() != plaintext {
                return Err(format!("{source}: the probe decrypts to other bytes"));
            }
            Ok(source)
        };
    let appended_len = plaintext.len() + TAG_LEN + IV_LEN;
    let mut refused = Vec::new();
    for (source, start) in [
        (IvSource::ProxyRandom, own_iv),
        (IvSource::HsmIntoParams, [0u8; IV_LEN]),
    ] {
        match raw_encrypt(session, source, start, key, aad, &plaintext) {
            Ok(raw) if raw.output.len() == appended_len => {
                return verify(IvSource::HsmAppended, start, raw);
            }
            Ok(raw) => return verify(source, start, raw),
            Err(e) if is_refusal(&e) => refused.push(format!("{source}: {}", describe(&e))),
            Err(e) => return Err(format!("{source}: {}", describe(&e))),
        }
    }
    let offers_message_api = ctx
        .get_mechanism_info(slot, MechanismType::AES_GCM)
        .is_ok_and(|info| info.message_encrypt());
    if offers_message_api {
        let source = IvSource::MessageApi;
        match raw_encrypt(session, source, [0u8; IV_LEN], key, aad, &plaintext) {
            Ok(raw) => return verify(source, [0u8; IV_LEN], raw),
            Err(e) => refused.push(format!("{source}: {}", describe(&e))),
        }
    } else {
        refused.push("message-api: not offered for CKM_AES_GCM".into());
    }
    Err(format!(
        "the token accepts no known way of passing the GCM IV ({})",
        refused.join("; ")
    ))
}

/// A token's IV source: fixed by the config, or probed once and kept.
pub(crate) struct IvChoice {
    setting: IvSetting,
    /// The vendor profile's IV source, used when probing fails.
    documented: Option<IvSource>,
    probed: OnceLock<IvSource>,
    health_key: KeyId,
}

impl IvChoice {
    pub(crate) fn new(setting: IvSetting, profile: &Profile, health_key: KeyId) -> Self {
        Self {
            setting,
            documented: profile.iv_source,
            probed: OnceLock::new(),
            health_key,
        }
    }

    /// The source in use, if known yet, and how it was chosen.
    pub(crate) fn current(&self) -> Option<(IvSource, &'static str)> {
        if let Some(fixed) = self.setting.fixed() {
            return Some((fixed, "set by iv_source"));
        }
        self.probed.get().map(|source| (*source, "probed"))
    }

    /// Probes with `session` unless the source is set or already known, logging the outcome.
    pub(crate) fn probe_with(
        &self,
        ctx: &Pkcs11,
        slot: Slot,
        session: &Session,
        key: ObjectHandle,
    ) {
        if self.current().is_some() {
            return;
        }
        match probe(ctx, slot, session, key) {
            Ok(source) => {
                if self.documented.is_some_and(|d| d != source) {
                    tracing::warn!(probed = %source, documented = ?self.documented.map(|d| d.to_string()), "the token takes GCM IVs otherwise than its profile says; using what the probe found");
                }
                if self.probed.set(source).is_ok() {
                    tracing::info!(iv_source = %source, key = %self.health_key, "pkcs11 GCM IV source probed");
                }
            }
            Err(why) => {
                tracing::warn!(key = %self.health_key, error = %why, "cannot probe the GCM IV source yet");
            }
        }
    }

    /// The source for an encryption on `worker`: probes on the worker's session the first time
    /// if start-up could not; falls back to the profile's documented source.
    pub(crate) fn resolve(&self, worker: &mut Worker) -> Result<IvSource, GcmError> {
        if let Some((source, _)) = self.current() {
            return Ok(source);
        }
        let key = super::keys::find_key(worker, &self.health_key)
            .map(|entry| entry.handle)
            .map_err(|e| GcmError::Malformed(format!("cannot probe the GCM IV source: {e}")));
        match key {
            Ok(key) => {
                worker
                    .with_session(|ctx, slot, session| self.probe_with(ctx, slot, session, key))?;
            }
            Err(e) if self.documented.is_none() => return Err(e),
            Err(_) => {}
        }
        self.current()
            .map(|(source, _)| source)
            .or(self.documented)
            .ok_or_else(|| {
                GcmError::Malformed(
                    "the GCM IV source is not known yet (see the probe warning in the log)".into(),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(output: Vec<u8>, iv_after: [u8; IV_LEN]) -> RawSeal {
        RawSeal {
            output,
            iv_after,
            tag: None,
        }
    }

    #[test]
    fn the_reply_carries_the_iv_the_hsm_reported() {
        let ours = [7u8; IV_LEN];
        let theirs = [9u8; IV_LEN];
        let sealed = interpret(IvSource::ProxyRandom, ours, 4, raw(vec![1; 20], theirs)).unwrap();
        assert_eq!(sealed.iv, theirs.to_vec(), "an overwritten pIv wins");
        assert_eq!(sealed.ciphertext, vec![1; 4]);
        let sealed = interpret(
            IvSource::HsmIntoParams,
            [0; IV_LEN],
            4,
            raw(vec![1; 20], theirs),
        )
        .unwrap();
        assert_eq!(sealed.iv, theirs.to_vec());
    }

    #[test]
    fn appended_ivs_are_cut_from_the_output() {
        let mut output = vec![1u8; 4 + TAG_LEN];
        output.extend_from_slice(&[5u8; IV_LEN]);
        let sealed = interpret(
            IvSource::HsmAppended,
            [0; IV_LEN],
            4,
            raw(output, [0; IV_LEN]),
        )
        .unwrap();
        assert_eq!(sealed.iv, vec![5u8; IV_LEN]);
        assert_eq!(sealed.ciphertext, vec![1u8; 4]);
        assert_eq!(sealed.tag, [1u8; TAG_LEN]);
    }

    #[test]
    fn zero_missing_or_conflicting_ivs_are_errors() {
        let zero = [0u8; IV_LEN];
        assert!(interpret(IvSource::HsmIntoParams, zero, 4, raw(vec![1; 20], zero)).is_err());
        assert!(
            interpret(
                IvSource::ProxyRandom,
                [3; IV_LEN],
                4,
                raw(vec![1; 19], [3; IV_LEN])
            )
            .is_err()
        );
        let mut output = vec![1u8; 4 + TAG_LEN];
        output.extend_from_slice(&[5u8; IV_LEN]);
        assert!(
            interpret(
                IvSource::HsmAppended,
                zero,
                4,
                raw(output.clone(), [6; IV_LEN])
            )
            .is_err()
        );
        assert!(
            interpret(
                IvSource::HsmAppended,
                zero,
                4,
                raw(output[..20].to_vec(), zero)
            )
            .is_err()
        );
        let message = RawSeal {
            output: vec![1; 4],
            iv_after: zero,
            tag: Some([2; TAG_LEN]),
        };
        assert!(interpret(IvSource::MessageApi, zero, 4, message).is_err());
    }
}
