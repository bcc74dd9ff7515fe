//! The spec's byte layouts (§4.2, §4.3) on arbitrary inputs within the API's limits.
//!
//! Properties: `key_manager_aad` is `u16be(len AAD) || AAD || u8(len metadata) || metadata` and
//! decodes back to exactly its inputs (so two different (AAD, metadata) pairs never give the same
//! bytes, whatever the split); `cdiv` is SHA-256 of the plain concatenation.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use xks_proxy::crypto::{MAX_CIPHERTEXT_METADATA, cdiv, key_manager_aad};

#[derive(Arbitrary, Debug)]
struct Input {
    aad: Vec<u8>,
    metadata: Vec<u8>,
    other_aad: Vec<u8>,
    other_metadata: Vec<u8>,
    /// Pad the AAD to this length (up to the 16-bit limit) to reach long-length encodings.
    pad_to: u16,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
}

/// Splits a key-manager AAD back into (AAD, metadata); None if the bytes are not that layout.
fn decode(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = usize::from(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]));
    let aad = bytes.get(2..2 + len)?;
    let meta_len = usize::from(*bytes.get(2 + len)?);
    let metadata = bytes.get(3 + len..)?;
    (metadata.len() == meta_len).then_some((aad, metadata))
}

fn clamp(mut aad: Vec<u8>, mut metadata: Vec<u8>, pad_to: u16) -> (Vec<u8>, Vec<u8>) {
    if aad.len() < usize::from(pad_to) {
        let fill = aad.first().copied().unwrap_or(0);
        aad.resize(usize::from(pad_to), fill);
    }
    aad.truncate(usize::from(u16::MAX));
    metadata.truncate(MAX_CIPHERTEXT_METADATA);
    (aad, metadata)
}

fuzz_target!(|input: Input| {
    let (aad, metadata) = clamp(input.aad, input.metadata, input.pad_to);
    let layout = key_manager_aad(&aad, &metadata);
    assert_eq!(layout.len(), 3 + aad.len() + metadata.len());
    assert_eq!(decode(&layout), Some((aad.as_slice(), metadata.as_slice())));
    if aad.is_empty() && metadata.is_empty() {
        assert_eq!(layout, [0, 0, 0]);
    }

    let (other_aad, other_metadata) = clamp(input.other_aad, input.other_metadata, 0);
    let other = key_manager_aad(&other_aad, &other_metadata);
    assert_eq!(
        layout == other,
        (aad == other_aad && metadata == other_metadata),
        "the layout is not injective"
    );

    // Moving a byte across the AAD/metadata boundary (the "metadata in the AAD" ambiguity the
    // length fields prevent) changes the bytes.
    if let Some((first, rest)) = metadata.split_first()
        && aad.len() < usize::from(u16::MAX)
    {
        let mut moved = aad.clone();
        moved.push(*first);
        assert_ne!(key_manager_aad(&moved, rest), layout);
    }

    let value = cdiv(&aad, &metadata, &input.iv, &input.ciphertext, &input.tag);
    let mut all = Vec::new();
    for part in [&aad, &metadata, &input.iv, &input.ciphertext, &input.tag] {
        all.extend_from_slice(part);
    }
    assert_eq!(value.as_slice(), Sha256::digest(&all).as_slice());
});
