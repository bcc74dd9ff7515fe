//! The spec's byte layouts: the AAD handed to the key manager and the Ciphertext Data Integrity
//! Value (CDIV). Pure functions over decoded bytes; nothing here talks to a key manager.

use sha2::{Digest, Sha256};

/// The `ciphertextMetadata` this proxy returns: one version byte naming the AAD construction
/// (`1` = the spec's length-prefixed layout, [`key_manager_aad`]). Decrypt binds whatever metadata
/// it is given into the AAD, so a changed byte fails authentication; a future construction would be
/// chosen by this byte.
pub const CIPHERTEXT_METADATA: [u8; 1] = [1];

/// Longest `ciphertextMetadata` KMS accepts, in decoded bytes.
pub const MAX_CIPHERTEXT_METADATA: usize = 20;

/// `u16be(len AAD) || AAD || u8(len metadata) || metadata` (spec §4.2). An absent value is empty.
///
/// The caller guarantees `aad.len() <= 65535` and `metadata.len() <= 255` (the API layer enforces
/// far tighter limits); longer inputs are truncated in the length field, which the API never lets
/// happen.
pub fn key_manager_aad(aad: &[u8], metadata: &[u8]) -> Vec<u8> {
    debug_assert!(aad.len() <= usize::from(u16::MAX) && metadata.len() <= usize::from(u8::MAX));
    let mut out = Vec::with_capacity(3 + aad.len() + metadata.len());
    out.extend_from_slice(&(aad.len() as u16).to_be_bytes());
    out.extend_from_slice(aad);
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// `SHA-256(AAD || metadata || IV || ciphertext || tag)` with no length prefixes (spec §4.3).
pub fn cdiv(aad: &[u8], metadata: &[u8], iv: &[u8], ciphertext: &[u8], tag: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in [aad, metadata, iv, ciphertext, tag] {
        hash.update(part);
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    const AAD: &[u8] = b"project=nile,department=marketing";
    const METADATA: &[u8] = b"key_version=1";

    #[test]
    fn aad_layout_matches_the_spec_example() {
        let expected = hex::decode(
            "0021\
             70726f6a6563743d6e696c652c6465706172746d656e743d6d61726b6574696e67\
             0d\
             6b65795f76657273696f6e3d31",
        )
        .unwrap();
        let got = key_manager_aad(AAD, METADATA);
        assert_eq!(got.len(), 49);
        assert_eq!(got, expected);
    }

    #[test]
    fn absent_values_have_zero_lengths() {
        assert_eq!(key_manager_aad(b"", b""), vec![0, 0, 0]);
        assert_eq!(key_manager_aad(b"", &[1]), vec![0, 0, 1, 1]);
        assert_eq!(key_manager_aad(&[7; 300], b"")[..2], [0x01, 0x2c]);
    }

    #[test]
    fn moving_metadata_into_the_aad_changes_the_layout() {
        let split = key_manager_aad(b"ab", b"c");
        let joined = key_manager_aad(b"abc", b"");
        assert_ne!(split, joined);
    }

    #[test]
    fn cdiv_matches_the_spec_example() {
        let iv = STANDARD.decode("HMrlRw85cAJUd5Ax").unwrap();
        let ciphertext = STANDARD.decode("ghxkK1txeDNn3q8Y").unwrap();
        let tag = STANDARD.decode("vBxN2ncH1oEkR8WVXpmyYQ==").unwrap();
        let value = cdiv(AAD, METADATA, &iv, &ciphertext, &tag);
        assert_eq!(
            hex::encode(value),
            "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
        );
        assert_eq!(
            STANDARD.encode(value),
            "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
        );
    }
}
