//! `/v1/networks`: virtual networks that clusters join by name.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use shoal_model::network::{CreateNetwork, NetworkView, UpdateNetwork};
use shoal_model::Network;
use shoal_store::{Compare, Op, Txn};

use crate::db::Versioned;
use crate::error::{ApiError, ApiResult};
use crate::network::{self, network_key, vni_key};
use crate::{db, Controller};

/// Creates a network; its subnet and VNI are allocated when not given.
#[utoipa::path(post, path = "/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses((status = 201, body = NetworkView), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn create_network(
    State(ctl): State<Controller>,
    Json(req): Json<CreateNetwork>,
) -> ApiResult<(StatusCode, Json<NetworkView>)> {
    let _guard = ctl.write_lock.lock().await;
    let (net, txn) = network::plan_network(&ctl, &req, None, 1).await?;
    if !ctl.db.store.txn(txn).await?.succeeded {
        return Err(ApiError::Conflict(format!(
            "network {:?}, its subnet {} or its VNI {} was taken meanwhile; nothing was changed",
            net.name, net.subnet, net.vni
        )));
    }
    // A new network has no VMs yet, so no hosts and no gateway.
    let none = network::Topology::new(|_| None, &[], &Default::default());
    Ok((StatusCode::CREATED, Json(network::view(net, &[], &[], &none))))
}

#[utoipa::path(get, path = "/v1/networks", tag = "networks", responses((status = 200, body = [NetworkView])))]
pub async fn list_networks(State(ctl): State<Controller>) -> ApiResult<Json<Vec<NetworkView>>> {
    let (clusters, vms, topo) = network::topology_now(&ctl).await?;
    Ok(Json(
        network::networks(&ctl)
            .await?
            .into_iter()
            .map(|n| network::view(n, &clusters, &vms, &topo))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network name")),
    responses((status = 200, body = NetworkView), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_network(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<NetworkView>> {
    let net = stored(&ctl, &name).await?.value;
    let (clusters, vms, topo) = network::topology_now(&ctl).await?;
    Ok(Json(network::view(net, &clusters, &vms, &topo)))
}

/// Changes a network's settings: `nat` switches its outbound access on or off (the reconciler
/// then sets up or removes the gateway on its host); `dns` replaces the guests' DNS servers,
/// which VMs created from then on get in their seeds.
#[utoipa::path(patch, path = "/v1/networks/{name}", tag = "networks", request_body = UpdateNetwork,
    params(("name" = String, Path, description = "Network name")),
    responses((status = 200, body = NetworkView), (status = 404, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn update_network(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<UpdateNetwork>,
) -> ApiResult<Json<NetworkView>> {
    let _guard = ctl.write_lock.lock().await;
    let key = network_key(&name);
    let v = stored(&ctl, &name).await?;
    let mut net = v.value;
    if let Some(nat) = req.nat {
        net.nat = nat;
    }
    if let Some(dns) = &req.dns {
        net.dns = shoal_model::network::parse_dns(dns).map_err(ApiError::Invalid)?;
    }
    let txn = Txn::new()
        .when(Compare::ModRevision(key.clone(), v.mod_revision))
        .then(db::put(key, &net));
    if !ctl.db.store.txn(txn).await?.succeeded {
        return Err(ApiError::Conflict(format!(
            "network {name:?} changed meanwhile; nothing was changed"
        )));
    }
    ctl.wake.notify_one();
    let (clusters, vms, topo) = network::topology_now(&ctl).await?;
    Ok(Json(network::view(net, &clusters, &vms, &topo)))
}

/// Deletes a network no cluster is on.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "Network name")),
    responses((status = 200), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn delete_network(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<()>> {
    let _guard = ctl.write_lock.lock().await;
    let key = network_key(&name);
    let v = stored(&ctl, &name).await?;
    network::check_deletable(&v.value, &ctl.db.clusters().await?)?;
    let txn = Txn::new()
        .when(Compare::ModRevision(key.clone(), v.mod_revision))
        .then(Op::Delete(key))
        .then(Op::Delete(db::subnet_key(&v.value.subnet)))
        .then(Op::Delete(vni_key(v.value.vni)));
    if !ctl.db.store.txn(txn).await?.succeeded {
        return Err(ApiError::Conflict(format!(
            "network {name:?} changed meanwhile; nothing was changed"
        )));
    }
    Ok(Json(()))
}

/// Network `name` as stored, or not found.
async fn stored(ctl: &Controller, name: &str) -> ApiResult<Versioned<Network>> {
    ctl.db
        .get::<Network>(&network_key(name))
        .await?
        .ok_or_else(|| ApiError::not_found("network", name))
}
