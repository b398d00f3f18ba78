//! Hosts as operators see them: what the agent registered, what is claimed on it, and its real
//! state, by the same rule placement uses (`capacity::service_state`).

use shoal_model::{Host, HostState};

use crate::capacity::{service_state, HostMarks};
use crate::error::ApiResult;
use crate::Controller;

/// `host list`.
pub async fn list(ctl: &Controller) -> ApiResult<Vec<Host>> {
    let hosts = ctl.db.hosts().await?;
    let powers = crate::domain::energy::power_records(ctl, &hosts).await?;
    let claims = ctl.db.claims().await?;
    let marks = HostMarks::read(ctl).await?;
    let failures: std::collections::HashMap<String, shoal_model::HostFailure> = ctl
        .db
        .failures()
        .await?
        .into_iter()
        .map(|f| (f.value.host.clone(), f.value))
        .collect();
    Ok(hosts
        .into_iter()
        .map(|h| {
            let power = powers.get(&h.name).map(|p| p.state).unwrap_or_default();
            let claim = claims.get(&h.name);
            let (_, seen) = ctl.host_state(&h.name);
            let state = match service_state(ctl, &h.name, &marks) {
                _ if marks.failed.contains(&h.name) => HostState::Failed,
                shoal_policy::HostState::Up => HostState::Up,
                shoal_policy::HostState::Draining => HostState::Draining,
                shoal_policy::HostState::Maintenance => HostState::Maintenance,
                shoal_policy::HostState::PoweredOff => HostState::Off,
                shoal_policy::HostState::Down if ctl.isolated(&h.name) => HostState::Isolated,
                shoal_policy::HostState::Down => HostState::Down,
            };
            let reason = match failures.get(&h.name) {
                Some(f) => Some(crate::failover::describe(f)),
                None if state == HostState::Isolated => Some(crate::failover::isolated_note(ctl, &h.name)),
                None if state != HostState::Down => None,
                None => ctl.host_notes.lock().expect("host notes").get(&h.name).cloned(),
            };
            Host {
                reason,
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
            }
        })
        .collect())
}
