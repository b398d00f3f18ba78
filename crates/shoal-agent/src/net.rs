//! The agent's virtual networks: the network manager as the QEMU driver's [`VmNet`], the command
//! through which the controller programs remote VTEPs (and gateways), and the probe with which
//! it checks that another host's underlay address is reachable from this one.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_hv::{VmNet, VmNetError};
use shoal_model::agent::{UnderlayProbe, UnderlayProbeResult, VmSpec};
use shoal_model::network::NetworkPeers;
use shoal_net::{NetError, NetManager};

use crate::{bad_request, error_response, AgentState};

/// [`NetManager`] behind the QEMU driver's network hook.
pub struct HvNet(pub Arc<NetManager>);

#[async_trait::async_trait]
impl VmNet for HvNet {
    async fn netdev(&self, spec: &VmSpec) -> Result<Option<String>, VmNetError> {
        self.0.netdev(spec).await.map_err(|e| vm_net_error(spec, e))
    }
    async fn connect(&self, spec: &VmSpec) -> Result<(), VmNetError> {
        self.0.connect(spec).await.map_err(|e| vm_net_error(spec, e))
    }
    async fn adopt(&self, spec: &VmSpec) {
        self.0.adopt(spec).await
    }
    async fn release(&self, uuid: uuid::Uuid) {
        if let Err(e) = self.0.release(uuid).await {
            tracing::error!(vm = %uuid, "removing the VM's network: {e}");
        }
    }
}

/// A tap that did not appear yet may appear on the next try; a host that cannot make the
/// network (no CAP_NET_ADMIN, a wrong underlay) will not until it is reconfigured.
fn vm_net_error(spec: &VmSpec, e: NetError) -> VmNetError {
    VmNetError {
        vm: spec.name.clone(),
        retryable: matches!(e, NetError::TapMissing(_)),
        source: e.into(),
    }
}

/// `POST /v1/underlay/probe`: does this host reach another host's underlay address?
pub(crate) async fn probe_underlay(req: Result<Json<UnderlayProbe>, JsonRejection>) -> Response {
    let Json(req) = match req {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let result: UnderlayProbeResult =
        shoal_client::probe_underlay(req.address, req.port, std::time::Duration::from_secs(3)).await;
    Json(result).into_response()
}

/// `POST /v1/networks/peers`: the remote VTEPs of every network this host takes part in.
pub(crate) async fn set_peers(
    State(state): State<AgentState>,
    req: Result<Json<NetworkPeers>, JsonRejection>,
) -> Response {
    let Json(req) = match req {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let Some(net) = &state.net else {
        return Json(()).into_response();
    };
    match net.set_peers(&req).await {
        Ok(()) => Json(()).into_response(),
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "network_failed", e.to_string()),
    }
}
