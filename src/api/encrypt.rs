//! Encrypt (spec §3.2): AES-256-GCM in the key manager over the spec's AAD layout, and the CDIV
//! procedure of spec §4.3 when KMS asks for it (hash first, then a verification decrypt).

use super::error::XksError;
use super::types::{EncryptResponse, base64, parse_encrypt};
use super::{ProxyKeystore, RequestLog};
use crate::crypto::{CIPHERTEXT_METADATA, cdiv, key_manager_aad};
use crate::keystore::{CryptoOp, IV_LEN, KeyId, KeyStoreError};
use crate::limits::Limits;

pub async fn handle(
    keystore: &ProxyKeystore,
    limits: &Limits,
    key_id: &KeyId,
    body: &[u8],
    log: &mut RequestLog,
) -> Result<Vec<u8>, XksError> {
    let request = parse_encrypt(body, limits).map_err(|(error, metadata)| {
        if let Some(metadata) = metadata {
            log.record_metadata(&metadata);
        }
        error
    })?;
    log.record_metadata(&request.metadata);
    keystore.authorize(key_id, &request.metadata, log)?;
    let store = &keystore.store;

    if request.want_cdiv {
        // The CDIV needs a verification decrypt: a key that cannot decrypt cannot give one.
        let info = store.key_info(key_id).await?;
        info.require(CryptoOp::Encrypt)?;
        info.require(CryptoOp::Decrypt)?;
    }

    let aad = key_manager_aad(&request.aad, &CIPHERTEXT_METADATA);
    let plaintext_len = request.plaintext.len();
    let verify_against = request.want_cdiv.then(|| request.plaintext.clone());
    let charge = keystore
        .iv_budget
        .charge(&keystore.uri_path, key_id.as_str());
    let sealed = store.encrypt(key_id, request.plaintext, aad.clone()).await;
    charge.settle(&sealed);
    let sealed = sealed?;
    if sealed.ciphertext.len() != plaintext_len || sealed.iv.len() != IV_LEN {
        return Err(XksError::Internal(
            "the key manager returned a malformed ciphertext",
        ));
    }

    let integrity_value = match verify_against {
        None => None,
        Some(plaintext) => {
            // Spec §4.3: compute the CDIV over the encrypt output first, then prove it decrypts.
            let value = cdiv(
                &request.aad,
                &CIPHERTEXT_METADATA,
                &sealed.iv,
                &sealed.ciphertext,
                &sealed.tag,
            );
            let opened = store
                .decrypt(key_id, sealed.clone(), aad)
                .await
                .map_err(|e| match e {
                    KeyStoreError::AuthenticationFailed => {
                        XksError::Internal("the verification decrypt failed")
                    }
                    other => other.into(),
                })?;
            if opened.as_slice() != plaintext.as_slice() {
                return Err(XksError::Internal(
                    "the verification decrypt returned other bytes",
                ));
            }
            Some(base64(&value))
        }
    };

    let response = EncryptResponse {
        authentication_tag: base64(&sealed.tag),
        ciphertext: base64(&sealed.ciphertext),
        ciphertext_data_integrity_value: integrity_value,
        ciphertext_metadata: Some(base64(&CIPHERTEXT_METADATA)),
        initialization_vector: base64(&sealed.iv),
    };
    serde_json::to_vec(&response).map_err(|_| XksError::Internal("could not encode the response"))
}
