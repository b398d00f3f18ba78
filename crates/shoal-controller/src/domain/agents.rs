//! Agents joining and reporting: registration (with a one-time join token or the host's own
//! credential, after its underlay address is checked) and heartbeats.

use shoal_model::agent::{Heartbeat, HeartbeatReply, PeerAddress, RegisterRequest, RegisterResponse};
use shoal_model::{now_ms, validate_name};

use crate::auth::{self, TokenKind, TokenRecord};
use crate::datastore::{HostRecord, Tx};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// An agent joins or re-registers; `presented` is the bearer token it sent, if any.
pub async fn register(ctl: &Controller, presented: Option<&str>, req: RegisterRequest) -> ApiResult<RegisterResponse> {
    validate_name("host", &req.name)?;
    if req.cpus == 0 || req.memory_mib == 0 {
        return Err(ApiError::Invalid(format!(
            "host {:?} reports {} vCPU and {} MiB: both must be positive",
            req.name, req.cpus, req.memory_mib
        )));
    }
    req.allocation
        .check(req.cpus, req.memory_mib)
        .map_err(|e| ApiError::Invalid(format!("host {:?}: {e}", req.name)))?;
    let existing = ctl.db.host(&req.name).await?;
    let record = HostRecord {
        name: req.name.clone(),
        address: req.address.clone(),
        driver: req.driver.clone(),
        cpus: req.cpus,
        memory_mib: req.memory_mib,
        joined_unix_ms: existing.as_ref().map(|e| e.joined_unix_ms).unwrap_or_else(now_ms),
        labels: req.labels.clone(),
        allocation: req.allocation.clone(),
        underlay_ip: req.underlay_ip,
        guest_mtu: req.guest_mtu,
        network_driver: req.network_driver.clone(),
    };
    let mut tx = Tx::new().put_host(&record);
    let mut credential = None;
    if ctl.auth_required() {
        let by_credential = match presented {
            Some(t) => !t.is_empty() && auth::check_agent(ctl, Some(t), &req.name).await.is_ok(),
            None => false,
        };
        if !by_credential {
            // A join token is spent in the same transaction that admits the host.
            let Some(join) = &req.join_token else {
                return Err(ApiError::Unauthorized(format!(
                    "host {:?} must join with a join token (shoal host join-token) or its credential",
                    req.name
                )));
            };
            let (rec, rev) = match auth::lookup(&ctl.db, join).await? {
                Some((r, rev)) if r.kind == TokenKind::Join => (r, rev),
                _ => return Err(ApiError::Unauthorized("invalid or already used join token".into())),
            };
            let _ = rec;
            let cred = auth::new_token();
            let agent_rec = TokenRecord {
                kind: TokenKind::Agent,
                host: Some(req.name.clone()),
                created_unix_ms: now_ms(),
            };
            tx = tx
                .spend_token(&auth::hash(join), rev)
                .create_token(&auth::hash(&cred), &agent_rec);
            credential = Some(cred);
        }
    }
    if let (Some(ip), Some(port)) = (req.underlay_ip, req.underlay_port) {
        // Before anything is written: a refused host joins nothing and keeps its join token.
        crate::domain::networks::check_underlay(ctl, &req.name, ip, port).await?;
    }
    if !ctl.db.try_commit(tx).await? {
        return Err(ApiError::Unauthorized("invalid or already used join token".into()));
    }
    ctl.record_heartbeat(
        &req.name,
        Heartbeat {
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            vms: Vec::new(),
            images: Vec::new(),
            reached: Default::default(),
            peers: Vec::new(),
        },
    );
    // A restarted agent has forgotten its networks' peers: send them again.
    ctl.peers_sent.lock().expect("peers_sent lock").remove(&req.name);
    tracing::info!(host = %req.name, address = %req.address, "host registered");
    ctl.wake.notify_one();
    Ok(RegisterResponse {
        credential,
        controller_token: Some(ctl.controller_token().to_string()),
    })
}

/// A heartbeat: what the host runs now, and the images its cache holds.
/// Records a heartbeat and answers with the agent's lease and the peers it checks: every other
/// host that is switched on and not failed.
pub async fn heartbeat(
    ctl: &Controller,
    presented: Option<&str>,
    name: &str,
    hb: Heartbeat,
) -> ApiResult<HeartbeatReply> {
    auth::check_agent(ctl, presented, name).await?;
    ctl.db.known_host(name).await?;
    ctl.record_heartbeat(name, hb);
    let peers = peers_of(name, &ctl.peer_candidates().await?);
    Ok(HeartbeatReply {
        lease_ms: ctl.config.host_timeout.as_millis() as u64,
        peers,
    })
}

/// The most peers a host checks: enough that a majority of them tells a cut-off host from a
/// dead one, few enough that a pool of thousands does not probe itself quadratically.
pub const PEERS: usize = 8;

/// The peers `host` checks among `candidates` (name, `host:port`): up to [`PEERS`], those that
/// rank first for it by rendezvous hashing, so that its set changes only when one of them
/// comes or goes, and every host is some other hosts' peer.
pub fn peers_of(host: &str, candidates: &[(String, String)]) -> Vec<PeerAddress> {
    let mut ranked: Vec<(blake3::Hash, &(String, String))> = candidates
        .iter()
        .filter(|(name, _)| name != host)
        .map(|c| (blake3::hash(format!("{host}/{}", c.0).as_bytes()), c))
        .collect();
    ranked.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    ranked
        .into_iter()
        .take(PEERS)
        .map(|(_, (name, address))| PeerAddress {
            host: name.clone(),
            address: address.clone(),
        })
        .collect()
}

/// `host:port` of an agent's base URL (`http://10.0.0.2:7701` → `10.0.0.2:7701`): where its
/// peers connect to check it is reachable.
pub(crate) fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_checks_a_stable_bounded_set_of_peers_never_itself() {
        let hosts: Vec<(String, String)> = (0..50).map(|i| (format!("h{i}"), format!("10.0.0.{i}:7701"))).collect();
        let p = peers_of("h7", &hosts);
        assert_eq!(p.len(), PEERS);
        assert!(p.iter().all(|x| x.host != "h7"));
        assert_eq!(p, peers_of("h7", &hosts), "deterministic");
        // One host leaving changes at most one peer.
        let fewer: Vec<(String, String)> = hosts.iter().filter(|h| h.0 != p[0].host).cloned().collect();
        let q = peers_of("h7", &fewer);
        assert_eq!(q.iter().filter(|x| p.contains(x)).count(), PEERS - 1);
        // Small pools: everyone else.
        assert_eq!(peers_of("h1", &hosts[..3]).len(), 2);
        assert_eq!(authority("http://10.0.0.2:7701/"), "10.0.0.2:7701");
    }
}
