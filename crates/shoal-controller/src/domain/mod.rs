//! The domain layer: one function per operation, the rules of each, over typed requests and
//! results. HTTP handlers (`crate::api`) only parse, call these and map errors; the state is
//! read and written only through the datastore layer (`crate::datastore`).

pub mod agents;
pub mod checkpoints;
pub mod clusters;
pub mod consolidate;
pub mod energy;
pub mod hosts;
pub mod lifecycle;
pub mod migrations;
pub mod networks;
pub mod operations;
pub mod plans;
pub mod profiles;
pub mod templates;
pub mod vms;

/// Refuses to delete `kind` `name` while anything in `users` (label, names) still uses it,
/// naming only the kinds of user there are.
pub(crate) fn refuse_in_use(kind: &str, name: &str, users: &[(&str, Vec<String>)]) -> crate::error::ApiResult<()> {
    let named: Vec<String> = users
        .iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(label, names)| format!("{label} [{}]", names.join(", ")))
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    Err(crate::error::ApiError::InUse(format!(
        "{kind} {name:?} is in use by {}",
        named.join(" and ")
    )))
}
