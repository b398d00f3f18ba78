//! The agent's virtual networks: the network manager as the QEMU driver's [`VmNet`], the command
//! through which the controller programs remote VTEPs (and gateways), and the probe with which
//! it checks that another host's underlay address is reachable from this one.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use shoal_hv::VmNet;
use shoal_model::agent::{UnderlayProbe, UnderlayProbeResult, VmSpec};
use shoal_model::api::{ErrorBody, ErrorDetail};
use shoal_model::network::NetworkPeers;
use shoal_net::NetManager;

use crate::AgentState;

/// [`NetManager`] behind the QEMU driver's network hook.
pub struct HvNet(pub Arc<NetManager>);

#[async_trait::async_trait]
impl VmNet for HvNet {
    async fn netdev(&self, spec: &VmSpec) -> Result<Option<String>, String> {
        self.0.netdev(spec).await.map_err(|e| e.to_string())
    }
    async fn connect(&self, spec: &VmSpec) -> Result<(), String> {
        self.0.connect(spec).await.map_err(|e| e.to_string())
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

/// `POST /v1/underlay/probe`: does this host reach another host's underlay address?
pub(crate) async fn probe_underlay(Json(req): Json<UnderlayProbe>) -> Json<UnderlayProbeResult> {
    Json(shoal_client::probe_underlay(req.address, req.port, std::time::Duration::from_secs(3)).await)
}

/// `POST /v1/networks/peers`: the remote VTEPs of every network this host takes part in.
pub(crate) async fn set_peers(State(state): State<AgentState>, Json(req): Json<NetworkPeers>) -> Response {
    let Some(net) = &state.net else {
        return Json(()).into_response();
    };
    match net.set_peers(&req).await {
        Ok(()) => Json(()).into_response(),
        Err(e) => {
            let body = ErrorBody {
                error: ErrorDetail {
                    code: "network_failed".into(),
                    message: e.to_string(),
                },
            };
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
    }
}
