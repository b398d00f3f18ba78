//! Host power and energy: power models and commands, switching hosts, the energy account, and
//! the consolidator's plan.

use axum::extract::{Path, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use shoal_model::power::{ConsolidationPlan, EnergyReport, HostPower, HostPowerConfig};
use utoipa::ToSchema;

use crate::domain::{consolidate, energy};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Each host's power draw now and energy used, and the totals.
#[utoipa::path(get, path = "/v1/energy", tag = "power", responses((status = 200, body = EnergyReport)))]
pub async fn energy_report(State(ctl): State<Controller>) -> ApiResult<Json<EnergyReport>> {
    Ok(Json(energy::report(&ctl).await?))
}

/// A host's power model, commands and state.
#[utoipa::path(get, path = "/v1/hosts/{name}/power", tag = "power",
    params(("name" = String, Path, description = "Host name")),
    responses((status = 200, body = HostPower), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_power(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<HostPower>> {
    Ok(Json(energy::power_record(&ctl, &name).await?))
}

/// Sets a host's power model and the commands that switch it on and off.
#[utoipa::path(put, path = "/v1/hosts/{name}/power", tag = "power", request_body = HostPowerConfig,
    params(("name" = String, Path, description = "Host name")),
    responses((status = 200, body = HostPower), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn configure_power(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(config): Json<HostPowerConfig>,
) -> ApiResult<Json<HostPower>> {
    Ok(Json(energy::configure(&ctl, &name, config).await?))
}

/// Switches a host `on` or `off` with its power command (off only when it holds no VMs).
#[utoipa::path(post, path = "/v1/hosts/{name}/power/{state}", tag = "power",
    params(("name" = String, Path, description = "Host name"), ("state" = String, Path, description = "`on` or `off`")),
    responses((status = 200, body = HostPower), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 409, body = shoal_model::api::ErrorBody), (status = 503, body = shoal_model::api::ErrorBody)))]
pub async fn switch_power(
    State(ctl): State<Controller>,
    Path((name, state)): Path<(String, String)>,
) -> ApiResult<Json<HostPower>> {
    let on = match state.as_str() {
        "on" => true,
        "off" => false,
        other => return Err(ApiError::Invalid(format!("power state {other:?}: use on or off"))),
    };
    Ok(Json(consolidate::switch(&ctl, &name, on).await?))
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ConsolidateRequest {
    /// Carry the plan out; otherwise only return it.
    #[serde(default)]
    pub apply: bool,
}

/// What the consolidator would do now from the demand measured so far: hosts to switch on,
/// live migrations, hosts to switch off; with `apply`, does it.
#[utoipa::path(post, path = "/v1/plan/consolidate", tag = "plan", request_body = ConsolidateRequest,
    responses((status = 200, body = ConsolidationPlan), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn consolidate_plan(
    State(ctl): State<Controller>,
    Json(req): Json<ConsolidateRequest>,
) -> ApiResult<Json<ConsolidationPlan>> {
    let p = consolidate::plan(&ctl, req.apply).await?;
    if req.apply {
        consolidate::apply(&ctl, &p).await?;
    }
    Ok(Json(p))
}
