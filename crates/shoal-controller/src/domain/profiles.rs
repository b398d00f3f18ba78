//! Profiles: reusable VM configurations that may inherit from a parent, resolved field by
//! field (the nearest definition wins) whenever a cluster is created from one.

use std::collections::HashMap;

use shoal_model::api::{CreateProfile, ProfileView};
use shoal_model::{now_ms, parse_size_mib, validate_name, ClusterState, Profile, VmShape};

use crate::datastore::Tx;
use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// Largest vCPU count a profile may ask for.
const MAX_CPUS: u32 = 1024;

/// Resolves a profile through its parents; the nearest definition of each field wins.
pub fn resolve_profile(profiles: &HashMap<String, Profile>, name: &str) -> ApiResult<VmShape> {
    let mut chain = Vec::new();
    let mut cur = Some(name.to_string());
    while let Some(n) = cur {
        if chain.iter().any(|p: &&Profile| p.name == n) {
            return Err(ApiError::Invalid(format!(
                "profile {name:?} inherits from itself through {n:?}"
            )));
        }
        let p = profiles
            .get(&n)
            .ok_or_else(|| ApiError::not_found("profile", n.clone()))?;
        chain.push(p);
        cur = p.parent.clone();
    }
    let pick = |f: &dyn Fn(&Profile) -> bool| chain.iter().find(|p| f(p)).copied();
    let missing = |what: &str| {
        ApiError::Invalid(format!(
            "profile {name:?} does not set {what}, nor does any profile it inherits from"
        ))
    };
    Ok(VmShape {
        template: pick(&|p| p.template.is_some())
            .and_then(|p| p.template.clone())
            .ok_or_else(|| missing("a template"))?,
        cpus: pick(&|p| p.cpus.is_some())
            .and_then(|p| p.cpus)
            .ok_or_else(|| missing("cpus"))?,
        memory_mib: pick(&|p| p.memory_mib.is_some())
            .and_then(|p| p.memory_mib)
            .ok_or_else(|| missing("memory"))?,
        disk_mib: pick(&|p| p.disk_mib.is_some()).and_then(|p| p.disk_mib),
        network: pick(&|p| p.network.is_some()).and_then(|p| p.network.clone()),
        user_data: pick(&|p| p.user_data.is_some()).and_then(|p| p.user_data.clone()),
        user: pick(&|p| p.user.is_some()).and_then(|p| p.user.clone()),
        // Keys add up along the chain, the farthest ancestor's first.
        ssh_keys: merge_keys(chain.iter().rev().flat_map(|p| p.ssh_keys.iter())),
        ha: shoal_model::HaSettings {
            checkpoint_interval_s: pick(&|p| p.checkpoint_interval_s.is_some())
                .and_then(|p| p.checkpoint_interval_s)
                .filter(|s| *s > 0),
            keep: pick(&|p| p.keep_checkpoints.is_some())
                .and_then(|p| p.keep_checkpoints)
                .unwrap_or(shoal_model::ha::DEFAULT_KEEP),
            priority: pick(&|p| p.ha_priority.is_some())
                .and_then(|p| p.ha_priority)
                .unwrap_or(0),
        },
    })
}

/// The HA settings a request gives, over `base`: an interval (`off` is off), a keep count, a
/// priority; each checked, naming what is wrong.
pub fn apply_ha(
    base: shoal_model::HaSettings,
    interval: Option<&str>,
    keep: Option<u32>,
    priority: Option<i32>,
) -> ApiResult<shoal_model::HaSettings> {
    let mut ha = base;
    if let Some(i) = interval {
        ha.checkpoint_interval_s = shoal_model::ha::parse_interval(i)?;
    }
    if let Some(k) = keep {
        ha.keep = shoal_model::ha::check_keep(k)?;
    }
    if let Some(p) = priority {
        ha.priority = p;
    }
    Ok(ha)
}

/// SSH keys without repeats, in the order given.
pub fn merge_keys<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in keys {
        if !out.contains(k) {
            out.push(k.clone());
        }
    }
    out
}

pub async fn profile_map(ctl: &Controller) -> ApiResult<HashMap<String, Profile>> {
    Ok(ctl
        .db
        .profiles()
        .await?
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect())
}

/// `profile create`: refused if its template or parent does not exist, or its chain does not
/// resolve; compared on both so that neither disappears meanwhile.
pub async fn create(ctl: &Controller, req: &CreateProfile) -> ApiResult<ProfileView> {
    validate_name("profile", &req.name)?;
    if let Some(c) = req.cpus {
        if c == 0 || c > MAX_CPUS {
            return Err(ApiError::Invalid(format!(
                "invalid cpus {c}: must be between 1 and {MAX_CPUS}"
            )));
        }
    }
    shoal_model::guest::check_guest_settings(req.user_data.as_deref(), req.user.as_deref(), &req.ssh_keys)?;
    let ha = apply_ha(
        Default::default(),
        req.checkpoint_interval.as_deref(),
        req.keep_checkpoints,
        req.ha_priority,
    )?;
    let profile = Profile {
        name: req.name.clone(),
        parent: req.parent.clone(),
        template: req.template.clone(),
        cpus: req.cpus,
        memory_mib: req.memory.as_deref().map(parse_size_mib).transpose()?,
        disk_mib: req.disk.as_deref().map(parse_size_mib).transpose()?,
        network: req.network.clone(),
        user_data: req.user_data.clone(),
        user: req.user.clone(),
        ssh_keys: merge_keys(req.ssh_keys.iter()),
        created_unix_ms: now_ms(),
        // `off` is kept as 0, so that it overrides a parent's interval.
        checkpoint_interval_s: req
            .checkpoint_interval
            .as_ref()
            .map(|_| ha.checkpoint_interval_s.unwrap_or(0)),
        keep_checkpoints: req.keep_checkpoints.map(|_| ha.keep),
        ha_priority: req.ha_priority,
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
    if let Some(p) = &profile.parent {
        let rec = ctl
            .db
            .profile(p)
            .await?
            .ok_or_else(|| ApiError::not_found("parent profile", p.clone()))?;
        tx = tx.require_profile(p, rec.mod_revision);
    }
    let mut profiles = profile_map(ctl).await?;
    profiles.insert(profile.name.clone(), profile.clone());
    let effective = resolve_profile(&profiles, &profile.name)?;
    if !ctl.db.try_commit(tx).await? {
        return Err(ApiError::Conflict(format!(
            "profile {:?} or its template changed while it was created; nothing was changed, try again",
            req.name
        )));
    }
    Ok(ProfileView { profile, effective })
}

/// `profile list`, by name.
pub async fn list(ctl: &Controller) -> ApiResult<Vec<ProfileView>> {
    let profiles = profile_map(ctl).await?;
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
    Ok(out)
}

/// `profile show`: the profile and what it resolves to.
pub async fn show(ctl: &Controller, name: &str) -> ApiResult<ProfileView> {
    let profiles = profile_map(ctl).await?;
    let p = profiles.get(name).ok_or_else(|| ApiError::not_found("profile", name))?;
    Ok(ProfileView {
        profile: p.clone(),
        effective: resolve_profile(&profiles, name)?,
    })
}

/// `profile delete`: only a profile no cluster and no other profile uses.
pub async fn delete(ctl: &Controller, name: &str) -> ApiResult<()> {
    let _guard = ctl.db.lock().await;
    let rev = ctl
        .db
        .profile(name)
        .await?
        .ok_or_else(|| ApiError::not_found("profile", name))?
        .mod_revision;
    let children: Vec<String> = ctl
        .db
        .profiles()
        .await?
        .into_iter()
        .filter(|p| p.parent.as_deref() == Some(name))
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
    super::refuse_in_use("profile", name, &[("clusters", clusters), ("child profiles", children)])?;
    if !ctl.db.try_commit(Tx::new().delete_profile(name, rev)).await? {
        return Err(ApiError::Conflict(format!(
            "profile {name:?} changed while being deleted; try again"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_model::Profile;

    fn profile(name: &str, parent: Option<&str>) -> Profile {
        Profile {
            name: name.into(),
            parent: parent.map(Into::into),
            template: None,
            cpus: None,
            memory_mib: None,
            disk_mib: None,
            network: None,
            user_data: None,
            user: None,
            ssh_keys: Vec::new(),
            created_unix_ms: 0,
            checkpoint_interval_s: None,
            keep_checkpoints: None,
            ha_priority: None,
        }
    }

    #[test]
    fn child_overrides_parent_and_inherits_the_rest() {
        let mut base = profile("base", None);
        base.template = Some("debian".into());
        base.cpus = Some(1);
        base.memory_mib = Some(512);
        base.user_data = Some("#cloud-config\n".into());
        let mut big = profile("big", Some("base"));
        big.cpus = Some(4);
        let map: HashMap<_, _> = [base, big].into_iter().map(|p| (p.name.clone(), p)).collect();
        let s = resolve_profile(&map, "big").unwrap();
        assert_eq!((s.template.as_str(), s.cpus, s.memory_mib), ("debian", 4, 512));
        assert_eq!(s.user_data.as_deref(), Some("#cloud-config\n"));
    }

    #[test]
    fn missing_fields_and_cycles_are_errors() {
        let a = profile("a", Some("b"));
        let b = profile("b", Some("a"));
        let map: HashMap<_, _> = [a, b].into_iter().map(|p| (p.name.clone(), p)).collect();
        assert!(resolve_profile(&map, "a")
            .unwrap_err()
            .to_string()
            .contains("inherits from itself"));
        let lone: HashMap<_, _> = [("c".to_string(), profile("c", None))].into();
        assert!(resolve_profile(&lone, "c")
            .unwrap_err()
            .to_string()
            .contains("template"));
        assert!(matches!(resolve_profile(&lone, "zz"), Err(ApiError::NotFound { .. })));
    }
}
