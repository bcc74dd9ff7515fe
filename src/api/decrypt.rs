//! Decrypt (spec §3.3): rebuilds the AAD from the request's AAD and ciphertext metadata, so any
//! change to either, or to the IV, ciphertext or tag, fails as InvalidCiphertextException.

use zeroize::Zeroizing;

use super::error::XksError;
use super::types::{DecryptResponse, base64, parse_decrypt};
use super::{ProxyKeystore, RequestLog};
use crate::crypto::key_manager_aad;
use crate::keystore::{KeyId, Sealed};
use crate::limits::Limits;

pub async fn handle(
    keystore: &ProxyKeystore,
    limits: &Limits,
    key_id: &KeyId,
    body: &[u8],
    log: &mut RequestLog,
) -> Result<Vec<u8>, XksError> {
    let request = parse_decrypt(body, limits).map_err(|(error, metadata)| {
        if let Some(metadata) = metadata {
            log.record_metadata(&metadata);
        }
        error
    })?;
    log.record_metadata(&request.metadata);
    keystore.authorize(key_id, &request.metadata, log)?;
    let aad = key_manager_aad(&request.aad, &request.ciphertext_metadata);
    let ciphertext_len = request.ciphertext.len();
    let sealed = Sealed {
        iv: request.iv,
        ciphertext: request.ciphertext,
        tag: request.tag,
    };
    let plaintext = keystore.store.decrypt(key_id, sealed, aad).await?;
    if plaintext.len() != ciphertext_len {
        return Err(XksError::Internal(
            "the key manager returned a plaintext of the wrong length",
        ));
    }
    let response = DecryptResponse {
        plaintext: Zeroizing::new(base64(&plaintext)),
    };
    serde_json::to_vec(&response).map_err(|_| XksError::Internal("could not encode the response"))
}
