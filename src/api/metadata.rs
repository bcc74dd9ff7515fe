//! GetKeyMetadata (spec §3.1): what KMS checks at CreateKey.

use super::error::XksError;
use super::types::{KeyMetadataResponse, parse_key_metadata};
use super::{ProxyKeystore, RequestLog};
use crate::keystore::KeyId;

pub async fn handle(
    keystore: &ProxyKeystore,
    key_id: &KeyId,
    body: &[u8],
    log: &mut RequestLog,
) -> Result<Vec<u8>, XksError> {
    let metadata = parse_key_metadata(body)?;
    log.record_metadata(&metadata);
    keystore.authorize(key_id, &metadata, log)?;
    let info = keystore.store.key_info(key_id).await?;
    let response = KeyMetadataResponse {
        key_spec: "AES_256",
        key_usage: info.usage.names(),
        key_status: info.state.as_str(),
    };
    serde_json::to_vec(&response).map_err(|_| XksError::Internal("could not encode the response"))
}
