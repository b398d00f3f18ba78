//! The REST API: one module per resource, mirroring the CLI's nouns. Everything under `/v1/`
//! except the agents' endpoints needs the admin token when the listener is not loopback.

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::{auth, Controller};

pub mod agents;
pub mod checkpoints;
pub mod clusters;
pub mod hosts;
pub mod images;
pub mod migrations;
pub mod networks;
pub mod operations;
pub mod plan;
pub mod power;
pub mod profiles;
pub mod templates;
pub mod vms;

#[derive(OpenApi)]
#[openapi(
    info(title = "Shoal API", description = "Virtual clusters of QEMU VMs: hosts, templates, profiles, clusters, VMs, networks, operations and plans."),
    paths(
        hosts::list_hosts, hosts::create_join_token, plan::drain, plan::undrain, plan::enter_maintenance, plan::leave_maintenance,
        templates::import_template, templates::publish_template, templates::list_templates, templates::show_template, templates::delete_template,
        profiles::create_profile, profiles::list_profiles, profiles::show_profile, profiles::delete_profile,
        clusters::create_cluster, clusters::list_clusters, clusters::show_cluster, clusters::scale_cluster, clusters::delete_cluster, clusters::cluster_action,
        vms::list_vms, vms::show_vm, vms::vm_action, vms::console, vms::snapshot_vm,
        checkpoints::checkpoint_vm, checkpoints::vm_blocks, checkpoints::cluster_blocks,
        migrations::migrate_vm, migrations::migrate_cluster, migrations::preview, migrations::list,
        operations::list_operations, operations::show_operation,
        plan::snapshot, plan::place, plan::rebalance,
        power::energy_report, power::show_power, power::configure_power, power::switch_power, power::consolidate_plan,
        networks::create_network, networks::list_networks, networks::show_network, networks::update_network, networks::delete_network,
        agents::register, agents::heartbeat, agents::template_file,
        images::missing, images::upload_chunks, images::put_manifest, images::get_manifest, images::fetch_chunks,
        images::stats, images::gc, images::verify,
        images::agent_get_manifest, images::agent_fetch_chunks, images::agent_missing, images::agent_upload_chunks, images::agent_put_manifest,
    ),
    components(schemas(shoal_model::api::ErrorBody)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(c) = openapi.components.as_mut() {
            c.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// Which part of a list to return: every list endpoint takes `offset` and `limit`, and answers
/// with the total in the `X-Total-Count` header.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize, utoipa::IntoParams)]
pub struct Page {
    /// Items to skip (default 0).
    pub offset: Option<usize>,
    /// Most items to return (default: all).
    pub limit: Option<usize>,
}

/// One page of a list, with the list's total length.
pub struct Paged<T> {
    pub items: Vec<T>,
    pub total: usize,
}

impl Page {
    pub fn of<T>(self, items: Vec<T>) -> crate::error::ApiResult<Paged<T>> {
        if self.limit == Some(0) {
            return Err(crate::error::ApiError::Invalid(
                "invalid limit 0: ask for at least one item, or leave limit out for all".into(),
            ));
        }
        let total = items.len();
        let items = items
            .into_iter()
            .skip(self.offset.unwrap_or(0))
            .take(self.limit.unwrap_or(usize::MAX))
            .collect();
        Ok(Paged { items, total })
    }
}

impl<T: serde::Serialize> axum::response::IntoResponse for Paged<T> {
    fn into_response(self) -> axum::response::Response {
        let mut r = Json(self.items).into_response();
        r.headers_mut().insert("x-total-count", self.total.into());
        r
    }
}

/// The OpenAPI document, as served at `/openapi.json` and committed as `docs/openapi.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("OpenAPI document serialises")
}

pub fn router(ctl: Controller) -> Router {
    let operator = Router::new()
        .route("/v1/hosts", get(hosts::list_hosts))
        .route("/v1/hosts/join-tokens", post(hosts::create_join_token))
        .route("/v1/hosts/{name}/drain", post(plan::drain))
        .route("/v1/hosts/{name}/undrain", post(plan::undrain))
        .route(
            "/v1/hosts/{name}/maintenance",
            post(plan::enter_maintenance).delete(plan::leave_maintenance),
        )
        .route("/v1/plan/snapshot", get(plan::snapshot))
        .route("/v1/plan/place", post(plan::place))
        .route("/v1/plan/rebalance", post(plan::rebalance))
        .route("/v1/plan/consolidate", post(power::consolidate_plan))
        .route("/v1/energy", get(power::energy_report))
        .route(
            "/v1/hosts/{name}/power",
            get(power::show_power).put(power::configure_power),
        )
        .route("/v1/hosts/{name}/power/{state}", post(power::switch_power))
        .route(
            "/v1/templates",
            get(templates::list_templates)
                // Images are gigabytes; they stream to disk, so no size limit applies.
                .post(templates::import_template)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/templates/{name}",
            get(templates::show_template).delete(templates::delete_template),
        )
        .route(
            "/v1/profiles",
            get(profiles::list_profiles).post(profiles::create_profile),
        )
        .route(
            "/v1/profiles/{name}",
            get(profiles::show_profile).delete(profiles::delete_profile),
        )
        .route(
            "/v1/clusters",
            get(clusters::list_clusters).post(clusters::create_cluster),
        )
        .route(
            "/v1/clusters/{name}",
            get(clusters::show_cluster).delete(clusters::delete_cluster),
        )
        .route("/v1/clusters/{name}/scale", post(clusters::scale_cluster))
        .route("/v1/clusters/{name}/migrate", post(migrations::migrate_cluster))
        .route("/v1/clusters/{name}/{action}", post(clusters::cluster_action))
        .route("/v1/vms", get(vms::list_vms))
        .route("/v1/vms/{name}", get(vms::show_vm))
        .route("/v1/vms/{name}/console", get(vms::console))
        .route("/v1/vms/{name}/snapshot", post(vms::snapshot_vm))
        .route("/v1/vms/{name}/checkpoint", post(checkpoints::checkpoint_vm))
        .route("/v1/vms/{name}/blocks", get(checkpoints::vm_blocks))
        .route("/v1/clusters/{name}/blocks", get(checkpoints::cluster_blocks))
        .route("/v1/vms/{name}/migrate", post(migrations::migrate_vm))
        .route("/v1/plan/migrate", post(migrations::preview))
        .route("/v1/migrations", get(migrations::list))
        .route("/v1/templates/publish", post(templates::publish_template))
        .route("/v1/vms/{name}/{action}", post(vms::vm_action))
        .route(
            "/v1/networks",
            get(networks::list_networks).post(networks::create_network),
        )
        .route(
            "/v1/networks/{name}",
            get(networks::show_network)
                .patch(networks::update_network)
                .delete(networks::delete_network),
        )
        .route("/v1/operations", get(operations::list_operations))
        .route("/v1/operations/{id}", get(operations::show_operation))
        .route("/v1/images/missing", post(images::missing))
        .route("/v1/images/chunks", post(images::upload_chunks))
        .route("/v1/images/chunks/fetch", post(images::fetch_chunks))
        .route(
            "/v1/images/manifests/{id}",
            get(images::get_manifest).put(images::put_manifest),
        )
        .route("/v1/images/stats", get(images::stats))
        .route("/v1/images/gc", post(images::gc))
        .route("/v1/images/verify", post(images::verify))
        .layer(DefaultBodyLimit::max(images::MAX_BATCH * (64 << 10) + (16 << 20)))
        .layer(middleware::from_fn_with_state(ctl.clone(), auth::require_admin));
    let agents = Router::new()
        .route("/v1/agents/register", post(agents::register))
        .route("/v1/agents/{name}/heartbeat", post(agents::heartbeat))
        .route(
            "/v1/agents/{name}/templates/{template}/{file}",
            get(agents::template_file),
        )
        .route(
            "/v1/agents/{name}/images/manifests/{id}",
            get(images::agent_get_manifest).put(images::agent_put_manifest),
        )
        .route(
            "/v1/agents/{name}/images/chunks/fetch",
            post(images::agent_fetch_chunks),
        )
        .route("/v1/agents/{name}/images/chunks", post(images::agent_upload_chunks))
        .route("/v1/agents/{name}/images/missing", post(images::agent_missing))
        .layer(DefaultBodyLimit::max(images::MAX_BATCH * (64 << 10) + (16 << 20)));
    operator
        .merge(agents)
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(ctl)
}
