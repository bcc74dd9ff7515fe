//! GetHealthStatus (spec §3.4, §6): answered from the cached deep check, never waiting on the key
//! manager, and never subject to secondary authorization. A key store with a key past its
//! random-IV budget warning level reports its ACTIVE key managers as DEGRADED (see
//! [`crate::iv_budget`]).

use super::error::XksError;
use super::types::{EkmFleetMember, HealthResponse, parse_health};
use super::{ProxyKeystore, RequestLog};
use crate::keystore::EkmHealth;

/// At most this many `ekmFleetDetails` entries (spec: 1 to 10).
const MAX_FLEET_DETAILS: usize = 10;

pub fn handle(
    keystore: &ProxyKeystore,
    fleet_size: u32,
    body: &[u8],
    log: &mut RequestLog,
) -> Result<Vec<u8>, XksError> {
    let metadata = parse_health(body)?;
    log.record_metadata(&metadata);
    let keys_past_iv_warning = keystore.iv_budget.keys_over_warning(&keystore.uri_path);
    if keys_past_iv_warning > 0 {
        log.detail = Some(format!(
            "DEGRADED: {keys_past_iv_warning} key(s) past the random-IV budget warning level"
        ));
    }
    let ekm_fleet_details: Vec<EkmFleetMember> = keystore
        .health
        .current()
        .into_iter()
        .take(MAX_FLEET_DETAILS)
        .map(|status| EkmFleetMember {
            id: status.id,
            model: status.model,
            health_status: match status.health {
                EkmHealth::Active if keys_past_iv_warning > 0 => EkmHealth::Degraded,
                other => other,
            },
        })
        .collect();
    if ekm_fleet_details.is_empty() {
        return Err(XksError::Internal("the key manager reported no instances"));
    }
    let response = HealthResponse {
        xks_proxy_fleet_size: fleet_size,
        xks_proxy_vendor: "xks-proxy",
        xks_proxy_model: concat!("xks-proxy ", env!("CARGO_PKG_VERSION")).to_string(),
        ekm_vendor: keystore.store.describe().ekm_vendor,
        ekm_fleet_details,
    };
    serde_json::to_vec(&response).map_err(|_| XksError::Internal("could not encode the response"))
}
