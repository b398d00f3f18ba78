use axum::extract::State;
use axum::Json;
use shoal_model::Host;

use crate::db::{Claim, HostRecord};
use crate::error::ApiResult;
use crate::Controller;

/// Every host, with its liveness and what is claimed on it.
#[utoipa::path(get, path = "/v1/hosts", tag = "hosts", responses((status = 200, body = [Host])))]
pub async fn list_hosts(State(ctl): State<Controller>) -> ApiResult<Json<Vec<Host>>> {
    let mut out = Vec::new();
    let hosts: Vec<HostRecord> = ctl.db.values("/hosts/").await?;
    let powers = crate::energy::power_records(&ctl, &hosts).await?;
    for h in hosts {
        let power = powers.get(&h.name).map(|p| p.state).unwrap_or_default();
        let claim: Claim = ctl
            .db
            .get(&crate::db::claim_key(&h.name))
            .await?
            .map(|v| v.value)
            .unwrap_or_default();
        let (state, seen) = ctl.host_state(&h.name);
        out.push(Host {
            name: h.name,
            state,
            address: h.address,
            driver: h.driver,
            cpus: h.cpus,
            memory_mib: h.memory_mib,
            used_cpus: claim.cpus,
            used_memory_mib: claim.memory_mib,
            vms: claim.vms,
            joined_unix_ms: h.joined_unix_ms,
            last_heartbeat_unix_ms: seen,
            labels: h.labels,
            allocation: h.allocation,
            underlay_ip: h.underlay_ip,
            power,
        });
    }
    Ok(Json(out))
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JoinToken {
    /// Shown once; good for one agent registration.
    pub token: String,
}

/// A one-time token with which a new agent joins (`shoal agent --join-token`).
#[utoipa::path(post, path = "/v1/hosts/join-tokens", tag = "hosts", responses((status = 200, body = JoinToken)))]
pub async fn create_join_token(State(ctl): State<Controller>) -> ApiResult<Json<JoinToken>> {
    Ok(Json(JoinToken {
        token: ctl.mint_join_token().await?,
    }))
}
