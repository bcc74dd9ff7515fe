//! What differs between PKCS#11 modules and matters to this backend: where AES-GCM IVs come from
//! (a default [`IvSource`], or none to probe), which `C_Decrypt` return values mean "the tag does
//! not verify", and the largest buffer a module takes in one `C_Encrypt`/`C_Decrypt`.
//!
//! A profile is named in the config (`profile = "cloudhsm"`) or, by default (`auto`), chosen from
//! the token's manufacturer id: SoftHSM and Kryoptic are recognised, anything else is `generic`.
//! `iv_source` in the config overrides both the probe and the profile's IV source. The facts behind each vendor
//! profile come from the vendors' PKCS#11 notes; only SoftHSM and Kryoptic run here directly, the
//! others only through the PKCS#11 emulator (see the README).

use std::fmt;

use cryptoki::context::Function;
use cryptoki::error::{Error, RvError};
use serde::Deserialize;

use super::gcm::IvSource;

/// `CKR_AEAD_DECRYPT_FAILED` (PKCS#11 3.0), which cryptoki 0.12 does not name.
pub(crate) const CKR_AEAD_DECRYPT_FAILED: u64 = 0x42;

/// The `profile` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileName {
    /// From the token's manufacturer id.
    #[default]
    Auto,
    /// Any module: only the standard return values mean a bad tag; the IV source is probed.
    Generic,
    /// SoftHSM v2 (development and tests).
    Softhsm,
    /// Kryoptic (a PKCS#11 3.x soft token; development and tests).
    Kryoptic,
    /// AWS CloudHSM, Client SDK 5: the HSM writes the IV into a zeroed `pIv`; 16 KB buffers.
    Cloudhsm,
    /// Thales Luna 7, not in FIPS mode: the caller's IV is accepted.
    Luna,
    /// Thales Luna 7 in FIPS mode: the HSM appends the IV after the tag.
    LunaFips,
    /// Entrust nShield 5 in FIPS mode: the HSM writes the IV into a zeroed `pIv`; a bad tag is
    /// `CKR_FUNCTION_FAILED`.
    NshieldFips,
    /// Fortanix DSM through its PKCS#11 client.
    Fortanix,
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProfileName::Auto => "auto",
            ProfileName::Generic => "generic",
            ProfileName::Softhsm => "softhsm",
            ProfileName::Kryoptic => "kryoptic",
            ProfileName::Cloudhsm => "cloudhsm",
            ProfileName::Luna => "luna",
            ProfileName::LunaFips => "luna-fips",
            ProfileName::NshieldFips => "nshield-fips",
            ProfileName::Fortanix => "fortanix",
        })
    }
}

/// A module's behaviour as this backend relies on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Profile {
    pub name: ProfileName,
    /// The IV source the vendor documents. The source is still probed at start-up (unless the
    /// config names one): a disagreement is logged, and this is the fallback when probing fails.
    pub iv_source: Option<IvSource>,
    /// Return values of a failed `C_Decrypt` that mean a bad tag, beyond the standard ones
    /// (`CKR_ENCRYPTED_DATA_INVALID`, `CKR_ENCRYPTED_DATA_LEN_RANGE`, `CKR_AEAD_DECRYPT_FAILED`).
    pub bad_tag_extra: &'static [RvError],
    /// The largest input of one `C_Encrypt`/`C_Decrypt`, when the module has a limit.
    pub max_buffer_bytes: Option<usize>,
}

impl Profile {
    /// The profile for `name`; `Auto` looks at the token's manufacturer id.
    pub(crate) fn resolve(name: ProfileName, manufacturer: &str) -> Self {
        let name = match name {
            ProfileName::Auto if manufacturer.starts_with("SoftHSM") => ProfileName::Softhsm,
            ProfileName::Auto if manufacturer.to_ascii_lowercase().contains("kryoptic") => {
                ProfileName::Kryoptic
            }
            ProfileName::Auto => ProfileName::Generic,
            named => named,
        };
        let (iv_source, bad_tag_extra, max_buffer_bytes): (_, &'static [RvError], _) = match name {
            ProfileName::Softhsm => (None, &[RvError::GeneralError], None),
            ProfileName::Kryoptic => (None, &[], None),
            ProfileName::Cloudhsm => (Some(IvSource::HsmIntoParams), &[], Some(16 * 1024)),
            ProfileName::Luna => (Some(IvSource::ProxyRandom), &[], None),
            ProfileName::LunaFips => (Some(IvSource::HsmAppended), &[], None),
            ProfileName::NshieldFips => (
                Some(IvSource::HsmIntoParams),
                &[RvError::FunctionFailed],
                None,
            ),
            ProfileName::Fortanix | ProfileName::Generic | ProfileName::Auto => (None, &[], None),
        };
        Self {
            name,
            iv_source,
            bad_tag_extra,
            max_buffer_bytes,
        }
    }

    /// Whether a failed decryption call means "the tag does not verify" on this module. Only
    /// `C_Decrypt` (or `C_DecryptMessage`) itself counts, never the `Init` call.
    pub(crate) fn is_bad_tag(&self, err: &Error) -> bool {
        let Error::Pkcs11(rv, Function::Decrypt | Function::DecryptMessage) = err else {
            return false;
        };
        match rv {
            RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => true,
            RvError::UnknownErrorCode(code) => *code == CKR_AEAD_DECRYPT_FAILED,
            other => self.bad_tag_extra.contains(other),
        }
    }

    /// Refuses an input larger than the module takes in one call.
    pub(crate) fn check_buffer(&self, len: usize) -> Result<(), String> {
        match self.max_buffer_bytes {
            Some(max) if len > max => Err(format!(
                "{len} bytes exceed the {max}-byte buffer limit of profile {}",
                self.name
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decrypt_error(rv: RvError) -> Error {
        Error::Pkcs11(rv, Function::Decrypt)
    }

    #[test]
    fn auto_follows_the_manufacturer() {
        let softhsm = Profile::resolve(ProfileName::Auto, "SoftHSM project");
        assert_eq!(softhsm.name, ProfileName::Softhsm);
        assert_eq!(
            softhsm.iv_source, None,
            "probed, so the emulator's modes are found"
        );
        let kryoptic = Profile::resolve(ProfileName::Auto, "Kryoptic Project");
        assert_eq!(kryoptic.name, ProfileName::Kryoptic);
        assert_eq!(
            Profile::resolve(ProfileName::Auto, "Some Vendor").name,
            ProfileName::Generic
        );
        assert_eq!(
            Profile::resolve(ProfileName::Cloudhsm, "SoftHSM project").name,
            ProfileName::Cloudhsm
        );
    }

    #[test]
    fn bad_tag_codes_follow_the_profile() {
        let generic = Profile::resolve(ProfileName::Generic, "");
        let softhsm = Profile::resolve(ProfileName::Softhsm, "");
        let nshield = Profile::resolve(ProfileName::NshieldFips, "");
        let aead = decrypt_error(RvError::UnknownErrorCode(CKR_AEAD_DECRYPT_FAILED));
        for profile in [generic, softhsm, nshield] {
            assert!(profile.is_bad_tag(&aead));
            assert!(profile.is_bad_tag(&decrypt_error(RvError::EncryptedDataInvalid)));
            assert!(!profile.is_bad_tag(&decrypt_error(RvError::DeviceError)));
            assert!(!profile.is_bad_tag(&Error::Pkcs11(
                RvError::EncryptedDataInvalid,
                Function::DecryptInit
            )));
        }
        assert!(!generic.is_bad_tag(&decrypt_error(RvError::GeneralError)));
        assert!(softhsm.is_bad_tag(&decrypt_error(RvError::GeneralError)));
        assert!(!softhsm.is_bad_tag(&decrypt_error(RvError::FunctionFailed)));
        assert!(nshield.is_bad_tag(&decrypt_error(RvError::FunctionFailed)));
        assert!(!nshield.is_bad_tag(&decrypt_error(RvError::GeneralError)));
    }

    #[test]
    fn cloudhsm_limits_buffers_to_16_kib() {
        let cloudhsm = Profile::resolve(ProfileName::Cloudhsm, "");
        assert!(cloudhsm.check_buffer(16 * 1024).is_ok());
        assert!(cloudhsm.check_buffer(16 * 1024 + 1).is_err());
        assert!(
            Profile::resolve(ProfileName::Generic, "")
                .check_buffer(1 << 20)
                .is_ok()
        );
    }
}
