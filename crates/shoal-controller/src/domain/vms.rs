//! VMs as operators see them. A VM's record keeps the last state its host reported; when that
//! host is not heard from, the record's state would be a guess, so every view of a VM (`vm
//! list`, `vm show`, the counts of `cluster list`) shows `unknown` instead, with the reason.

use shoal_model::{HostState, Vm, VmState};

use crate::error::{ApiError, ApiResult};
use crate::Controller;

/// The VM as shown: `unknown` when its host is down and its state is one the host reports.
pub fn observed(ctl: &Controller, mut vm: Vm) -> Vm {
    if let Some(reason) = unknown_because(ctl, &vm) {
        vm.state = VmState::Unknown;
        vm.reason = Some(reason);
    }
    vm
}

/// Why the VM's state is not known, if it is not: its host is down. A VM still pending (not
/// yet on any host) or being deleted is what the store says it is.
pub fn unknown_because(ctl: &Controller, vm: &Vm) -> Option<String> {
    if matches!(vm.state, VmState::Pending | VmState::Deleting) {
        return None;
    }
    match ctl.host_state(&vm.host) {
        (HostState::Up, _) => None,
        (_, Some(seen)) => Some(format!(
            "host {} is down: not heard from for {} s; last reported {}",
            vm.host,
            shoal_model::now_ms().saturating_sub(seen) / 1000,
            vm.state.as_str()
        )),
        (_, None) => Some(format!(
            "host {} is down: not heard from since the controller started; last reported {}",
            vm.host,
            vm.state.as_str()
        )),
    }
}

/// `vm list`, optionally of one cluster.
pub async fn list(ctl: &Controller, cluster: Option<&str>) -> ApiResult<Vec<Vm>> {
    let vms = match cluster {
        Some(c) => {
            if ctl.db.cluster(c).await?.is_none() {
                return Err(ApiError::not_found("cluster", c));
            }
            ctl.db.cluster_vms(c).await?.into_iter().map(|v| v.value).collect()
        }
        None => ctl.db.vms().await?,
    };
    Ok(vms.into_iter().map(|v| observed(ctl, v)).collect())
}

/// `vm show`.
pub async fn show(ctl: &Controller, name: &str) -> ApiResult<Vm> {
    let vm = ctl.db.vm(name).await?.ok_or_else(|| ApiError::not_found("VM", name))?;
    Ok(observed(ctl, vm.value))
}
