use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use shoal_model::api::{CreateProfile, ProfileView};
use shoal_model::{now_ms, parse_size_mib, validate_name, ClusterState, Profile};

use crate::datastore::Tx;
use crate::deploy::{profile_map, resolve_profile};
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Largest vCPU count a profile may ask for.
const MAX_CPUS: u32 = 1024;

#[utoipa::path(post, path = "/v1/profiles", tag = "profiles", request_body = CreateProfile,
    responses((status = 201, body = ProfileView), (status = 400, body = shoal_model::api::ErrorBody),
              (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn create_profile(
    State(ctl): State<Controller>,
    Json(req): Json<CreateProfile>,
) -> ApiResult<(StatusCode, Json<ProfileView>)> {
    validate_name("profile", &req.name)?;
    if let Some(c) = req.cpus {
        if c == 0 || c > MAX_CPUS {
            return Err(ApiError::Invalid(format!(
                "invalid cpus {c}: must be between 1 and {MAX_CPUS}"
            )));
        }
    }
    let profile = Profile {
        name: req.name.clone(),
        parent: req.parent.clone(),
        template: req.template.clone(),
        cpus: req.cpus,
        memory_mib: req.memory.as_deref().map(parse_size_mib).transpose()?,
        disk_mib: req.disk.as_deref().map(parse_size_mib).transpose()?,
        network: req.network.clone(),
        user_data: req.user_data.clone(),
        created_unix_ms: now_ms(),
    };
    let _guard = ctl.db.lock().await;
    if ctl.db.profile(&req.name).await?.is_some() {
        return Err(ApiError::exists("profile", &req.name));
    }
    let mut tx = Tx::new().create_profile(&profile);
    if let Some(t) = &profile.template {
        let rec = ctl
            .db
            .template(t)
            .await?
            .ok_or_else(|| ApiError::not_found("template", t.clone()))?;
        tx = tx.require_template(t, rec.mod_revision);
    }
    let mut profiles = profile_map(&ctl).await?;
    if let Some(p) = &profile.parent {
        if !profiles.contains_key(p) {
            return Err(ApiError::not_found("parent profile", p.clone()));
        }
    }
    profiles.insert(profile.name.clone(), profile.clone());
    let effective = resolve_profile(&profiles, &profile.name)?;
    if !ctl.db.try_commit(tx).await? {
        return Err(ApiError::Conflict(format!(
            "profile {:?} or its template changed while it was created; nothing was changed, try again",
            req.name
        )));
    }
    Ok((StatusCode::CREATED, Json(ProfileView { profile, effective })))
}

#[utoipa::path(get, path = "/v1/profiles", tag = "profiles", params(crate::api::Page), responses((status = 200, body = [ProfileView])))]
pub async fn list_profiles(
    State(ctl): State<Controller>,
    axum::extract::Query(page): axum::extract::Query<crate::api::Page>,
) -> ApiResult<crate::api::Paged<ProfileView>> {
    let profiles = profile_map(&ctl).await?;
    let mut out: Vec<ProfileView> = profiles
        .values()
        .map(|p| {
            Ok(ProfileView {
                profile: p.clone(),
                effective: resolve_profile(&profiles, &p.name)?,
            })
        })
        .collect::<ApiResult<_>>()?;
    out.sort_by(|a, b| a.profile.name.cmp(&b.profile.name));
    page.of(out)
}

#[utoipa::path(get, path = "/v1/profiles/{name}", tag = "profiles",
    params(("name" = String, Path, description = "Profile name")),
    responses((status = 200, body = ProfileView), (status = 404, body = shoal_model::api::ErrorBody)))]
pub async fn show_profile(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<ProfileView>> {
    let profiles = profile_map(&ctl).await?;
    let p = profiles
        .get(&name)
        .ok_or_else(|| ApiError::not_found("profile", &name))?;
    Ok(Json(ProfileView {
        profile: p.clone(),
        effective: resolve_profile(&profiles, &name)?,
    }))
}

/// Deletes a profile no cluster and no other profile uses.
#[utoipa::path(delete, path = "/v1/profiles/{name}", tag = "profiles",
    params(("name" = String, Path, description = "Profile name")),
    responses((status = 200), (status = 404, body = shoal_model::api::ErrorBody), (status = 409, body = shoal_model::api::ErrorBody)))]
pub async fn delete_profile(State(ctl): State<Controller>, Path(name): Path<String>) -> ApiResult<Json<()>> {
    let _guard = ctl.db.lock().await;
    let rev = ctl
        .db
        .profile(&name)
        .await?
        .ok_or_else(|| ApiError::not_found("profile", &name))?
        .mod_revision;
    let children: Vec<String> = ctl
        .db
        .profiles()
        .await?
        .into_iter()
        .filter(|p| p.parent.as_deref() == Some(name.as_str()))
        .map(|p| p.name)
        .collect();
    let clusters: Vec<String> = ctl
        .db
        .clusters()
        .await?
        .into_iter()
        .filter(|c| c.profile == name && c.state != ClusterState::Deleting)
        .map(|c| c.name)
        .collect();
    if !children.is_empty() || !clusters.is_empty() {
        return Err(ApiError::InUse(format!(
            "profile {name:?} is in use by clusters [{}] and child profiles [{}]",
            clusters.join(", "),
            children.join(", ")
        )));
    }
    if !ctl.db.try_commit(Tx::new().delete_profile(&name, rev)).await? {
        return Err(ApiError::Conflict(format!(
            "profile {name:?} changed while being deleted; try again"
        )));
    }
    Ok(Json(()))
}
