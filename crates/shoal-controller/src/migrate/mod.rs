//! The migration executor: one task per VM on the move, driving its `/migrations/<vm>` record
//! through prepare → copy → switch to the commit, or to a rollback. Each step is recorded
//! before the command that depends on it is sent, and every command is idempotent, so a
//! controller that restarts picks each migration up where its record says (the reconciler
//! resumes records without a task, [`resume`]). What to do after each answer is decided in
//! [`decide`].

use std::time::Duration;

use shoal_model::agent::{MigrateOut, PrepareIncoming, RemoveVms};
use shoal_model::{now_ms, HostState, Migration, MigrationStep, Operation, OperationState, StepState, VmState};

use crate::capacity::{Claim, ClaimChanges};
use crate::datastore::{HostRecord, Tx, Versioned};
use crate::domain::migrations::STEPS;
use crate::error::{ApiError, ApiResult};
use crate::Controller;

pub mod decide;
use decide::{Answer, Switched, Watch};

/// How long the source holds a progress request while its migration runs: it answers at once
/// when the migration ends, so the switch follows the copy within milliseconds.
const POLL: Duration = Duration::from_millis(1000);
/// How often progress is written to the operation.
const WRITE_EVERY: Duration = Duration::from_secs(1);
/// Pause before asking a host again that did not answer.
const RETRY: Duration = Duration::from_secs(1);

/// Starts the executor for `vm`'s migration unless one runs.
pub(crate) fn spawn(ctl: &Controller, vm: &str) {
    if !ctl.migrating.lock().expect("migrating lock").insert(vm.to_string()) {
        return;
    }
    let (ctl, vm) = (ctl.clone(), vm.to_string());
    let mut stop = ctl.stopped.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = run(&ctl, &vm) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        ctl.migrating.lock().expect("migrating lock").remove(&vm);
        ctl.wake.notify_one();
    });
}

/// Starts executors for recorded migrations that have none (after a controller restart).
pub(crate) fn resume(ctl: &Controller, migrations: &[Versioned<Migration>]) {
    for m in migrations {
        spawn(ctl, &m.value.vm);
    }
}

async fn run(ctl: &Controller, vm: &str) {
    loop {
        let m = match ctl.db.migration(vm).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%vm, "reading the migration: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let r = match &m.value.step {
            MigrationStep::Prepare => prepare(ctl, &m).await,
            MigrationStep::Copy => copy(ctl, &m).await,
            MigrationStep::Switch => switch(ctl, &m).await,
            MigrationStep::RollBack { .. } => roll_back(ctl, &m).await,
        };
        if let Err(e) = r {
            tracing::warn!(%vm, step = m.value.step.as_str(), "migration step: {e}");
            tokio::time::sleep(RETRY).await;
        }
    }
}

async fn host(ctl: &Controller, name: &str) -> ApiResult<HostRecord> {
    ctl.db.known_host(name).await
}

fn down(ctl: &Controller, host: &str) -> bool {
    ctl.host_state(host).0 != HostState::Up
}

/// The host was declared failed and is fenced: nothing of it runs any more.
async fn fenced(ctl: &Controller, host: &str) -> ApiResult<bool> {
    Ok(ctl.db.failure(host).await?.is_some_and(|f| f.value.fenced.is_some()))
}

fn timed_out(ctl: &Controller, m: &Migration) -> bool {
    now_ms().saturating_sub(m.started_unix_ms) > ctl.config.operation_timeout.as_millis() as u64
}

/// The address the destination listens on for the source: its underlay address, else the
/// address the controller reaches its agent on.
fn listen_address(h: &HostRecord) -> ApiResult<std::net::Ipv4Addr> {
    if let Some(ip) = h.underlay_ip {
        return Ok(ip);
    }
    let authority = h
        .address
        .split("://")
        .nth(1)
        .unwrap_or(&h.address)
        .split('/')
        .next()
        .unwrap_or_default();
    let ip = authority.rsplit_once(':').map_or(authority, |(ip, _)| ip);
    ip.parse().map_err(|_| {
        ApiError::Conflict(format!(
            "host {} has no underlay address and its agent's address {} is not an IPv4 address: \
             nowhere to receive a migration",
            h.name, h.address
        ))
    })
}

/// Moves the record to `step` (compared on the revision read); returns whether it was written.
async fn set_step(ctl: &Controller, m: &Versioned<Migration>, step: MigrationStep, tx: Tx) -> ApiResult<bool> {
    let mut new = m.value.clone();
    new.step = step;
    ctl.db.try_commit(tx.update_migration(m.mod_revision, &new)).await
}

async fn roll_back_because(
    ctl: &Controller,
    m: &Versioned<Migration>,
    reason: String,
    switched: bool,
) -> ApiResult<()> {
    tracing::warn!(vm = %m.value.vm, "migration rolls back: {reason}");
    let op = op_update(ctl, m, |op| {
        if let Some(s) = op.steps.iter_mut().find(|s| s.state == StepState::Running) {
            s.state = StepState::Failed;
        }
        if let Some(s) = op.step_mut(STEPS[2]) {
            s.message = format!("rolling back: {reason}");
        }
    })
    .await?;
    set_step(ctl, m, MigrationStep::RollBack { reason, switched }, op).await?;
    Ok(())
}

/// The operation's update as part of a transaction (nothing if it is gone).
async fn op_update(ctl: &Controller, m: &Versioned<Migration>, f: impl FnOnce(&mut Operation)) -> ApiResult<Tx> {
    Ok(match ctl.db.operation(&m.value.operation).await? {
        Some(mut op) => {
            f(&mut op);
            Tx::new().put_operation(&op)
        }
        None => Tx::new(),
    })
}

fn step(op: &mut Operation, i: usize, state: StepState, message: String) {
    if let Some(s) = op.step_mut(STEPS[i]) {
        s.state = state;
        s.message = message;
    }
}

/// The destination prepares the incoming VM.
async fn prepare(ctl: &Controller, m: &Versioned<Migration>) -> ApiResult<()> {
    let mig = &m.value;
    let to = host(ctl, &mig.to).await?;
    let vm = ctl
        .db
        .vm(&mig.vm)
        .await?
        .ok_or_else(|| ApiError::not_found("VM", &mig.vm))?
        .value;
    let Some(spec) = crate::reconcile::spec_at(ctl, &vm, &mig.to).await? else {
        return roll_back_because(ctl, m, format!("VM {}'s cluster or template is gone", vm.name), false).await;
    };
    let req = PrepareIncoming {
        spec,
        listen: match listen_address(&to) {
            Ok(a) => a,
            Err(e) => return roll_back_because(ctl, m, e.to_string(), false).await,
        },
    };
    // Any copy of the VM the destination still has is an orphan (the VM's record is on the
    // source): an earlier copy not yet cleaned up, or a preparation a restart interrupted.
    let cleared = Answer::from_client(
        ctl.agent(&to.address)
            .remove(&RemoveVms { uuids: vec![mig.uuid] })
            .await
            .map(|_| ()),
    );
    let answer = match cleared {
        Answer::Ok(()) => Answer::from_client(ctl.agent(&to.address).prepare_incoming(&req).await),
        Answer::NotThere(e) | Answer::Failed(e) => Answer::Failed(e),
        Answer::Unreachable(e) => Answer::Unreachable(e),
    };
    match answer {
        Answer::Ok(incoming) => {
            let op = op_update(ctl, m, |op| {
                step(
                    op,
                    0,
                    StepState::Done,
                    format!("host {} is ready to receive {}", mig.to, mig.vm),
                );
                step(
                    op,
                    1,
                    StepState::Running,
                    format!("copying from {} to {}", mig.from, mig.to),
                );
            })
            .await?;
            let mut new = mig.clone();
            new.incoming = Some(incoming);
            new.step = MigrationStep::Copy;
            ctl.db.try_commit(op.update_migration(m.mod_revision, &new)).await?;
            Ok(())
        }
        Answer::Unreachable(e) if !down(ctl, &mig.to) && !timed_out(ctl, mig) => {
            tracing::debug!(vm = %mig.vm, "destination {} did not answer: {e}", mig.to);
            tokio::time::sleep(RETRY).await;
            Ok(())
        }
        Answer::Unreachable(e) | Answer::NotThere(e) | Answer::Failed(e) => {
            roll_back_because(ctl, m, format!("host {} could not prepare the VM: {e}", mig.to), false).await
        }
    }
}

/// The source sends the disk and memory; progress goes to the operation until it completes.
async fn copy(ctl: &Controller, m: &Versioned<Migration>) -> ApiResult<()> {
    let mig = &m.value;
    let from = host(ctl, &mig.from).await?;
    let Some(incoming) = mig.incoming.clone() else {
        return roll_back_because(ctl, m, "the destination's endpoints were not recorded".into(), false).await;
    };
    let agent = ctl.agent(&from.address);
    let req = MigrateOut {
        to: incoming,
        params: mig.params,
    };
    // Idempotent on the source: after a controller restart this answers with the progress of
    // the migration already running.
    let mut answer = Answer::from_client(agent.migrate_out(mig.uuid, &req).await);
    let mut m = m.clone();
    let mut written = std::time::Instant::now();
    loop {
        let dest_down = (mig.to.as_str(), down(ctl, &mig.to));
        match decide::watch(&mig.from, &answer, down(ctl, &mig.from), dest_down, timed_out(ctl, mig)) {
            Watch::Continue => {}
            Watch::Switch => {
                let p = match &answer {
                    Answer::Ok(p) => Some(p.clone()),
                    _ => None,
                };
                let line = p.as_ref().map(decide::progress_line).unwrap_or_default();
                let sent_mib = p.as_ref().map_or(0, |p| (p.disk_sent_bytes + p.ram_sent_bytes) >> 20);
                let op = op_update(ctl, &m, |op| {
                    op.migration = p.clone();
                    step(op, 1, StepState::Done, line);
                    if let Some(s) = op.step_mut(STEPS[1]) {
                        (s.done, s.total) = (sent_mib, sent_mib);
                    }
                    step(op, 2, StepState::Running, format!("host {} takes over", mig.to));
                })
                .await?;
                let mut new = m.value.clone();
                new.progress = p;
                new.step = MigrationStep::Switch;
                ctl.db.try_commit(op.update_migration(m.mod_revision, &new)).await?;
                return Ok(());
            }
            Watch::RollBack(reason) => return roll_back_because(ctl, &m, reason, false).await,
        }
        if let Answer::Ok(p) = &answer {
            if written.elapsed() >= WRITE_EVERY {
                written = std::time::Instant::now();
                let line = decide::progress_line(p);
                // In MiB, as the progress bar shows them.
                let (done, total) = (
                    (p.disk_sent_bytes + p.ram_sent_bytes) >> 20,
                    (p.disk_total_bytes + p.ram_total_bytes.max(p.ram_sent_bytes + p.ram_remaining_bytes))
                        .div_ceil(1 << 20),
                );
                let op = op_update(ctl, &m, |op| {
                    op.migration = Some(p.clone());
                    if let Some(s) = op.step_mut(STEPS[1]) {
                        s.done = done;
                        s.total = total.max(done);
                        s.message = line;
                    }
                })
                .await?;
                let mut new = m.value.clone();
                new.progress = Some(p.clone());
                if ctl.db.try_commit(op.update_migration(m.mod_revision, &new)).await? {
                    m = ctl
                        .db
                        .migration(&mig.vm)
                        .await?
                        .ok_or_else(|| ApiError::not_found("migration", &mig.vm))?;
                }
            }
        }
        let asked = std::time::Instant::now();
        answer = Answer::from_client(agent.migration(mig.uuid, POLL).await);
        if !matches!(answer, Answer::Ok(_)) {
            // A source that did not hold the request is not asked again at once.
            tokio::time::sleep(POLL.saturating_sub(asked.elapsed())).await;
        }
    }
}

/// The destination runs the guest; the move is committed on its word only.
async fn switch(ctl: &Controller, m: &Versioned<Migration>) -> ApiResult<()> {
    let mig = &m.value;
    let to = host(ctl, &mig.to).await?;
    let answer = Answer::from_client(ctl.agent(&to.address).finish_incoming(mig.uuid).await);
    match decide::switched(&mig.to, &answer) {
        Switched::Commit => {
            let seq = match &answer {
                Answer::Ok(s) => s.seq,
                _ => 0,
            };
            commit(ctl, m, seq).await
        }
        Switched::RollBack(reason) => roll_back_because(ctl, m, reason, true).await,
        // The destination failed and was fenced: the guest no longer runs there, so the source's
        // copy (as of the switch) runs on.
        Switched::Wait(_) if fenced(ctl, &mig.to).await? => {
            let reason = format!(
                "host {}, the destination, failed after the switch and was fenced; the VM runs on from the source",
                mig.to
            );
            roll_back_because(ctl, m, reason, true).await
        }
        Switched::Wait(why) => {
            let tx = op_update(ctl, m, |op| {
                if let Some(s) = op.step_mut(STEPS[2]) {
                    s.message = why.clone();
                }
            })
            .await?;
            ctl.db.try_commit(tx).await?;
            tokio::time::sleep(RETRY * 2).await;
            Ok(())
        }
    }
}

/// One transaction: the VM is on its new host, the source's claim is given back, the record
/// is gone and the operation succeeded. The reconciler then removes the source's paused copy
/// as an orphan. `seq` is the destination's sequence number of the VM running, so that a
/// heartbeat sent before the switch (the VM still arriving) never overwrites it.
async fn commit(ctl: &Controller, m: &Versioned<Migration>, seq: u64) -> ApiResult<()> {
    let mig = &m.value;
    let _guard = ctl.db.lock().await;
    let v = ctl
        .db
        .vm(&mig.vm)
        .await?
        .ok_or_else(|| ApiError::not_found("VM", &mig.vm))?;
    let mut vm = v.value.clone();
    vm.host = mig.to.clone();
    vm.state = VmState::Running;
    vm.reason = None;
    vm.observed_seq = seq;
    let mut claims = ClaimChanges::default();
    claims.give_back(&mig.from, Claim::of(&v.value));
    let summary = match &mig.progress {
        Some(p) => format!(
            "{} runs on {} ({} mode, {:.1} s, downtime {} ms)",
            mig.vm,
            mig.to,
            p.mode.as_str(),
            p.elapsed_ms as f64 / 1000.0,
            p.downtime_ms.map_or("?".into(), |d| d.to_string())
        ),
        None => format!("{} runs on {}", mig.vm, mig.to),
    };
    let op = op_update(ctl, m, |op| {
        step(op, 2, StepState::Done, summary);
        op.state = OperationState::Succeeded;
        op.finished_unix_ms = Some(now_ms());
    })
    .await?;
    let tx = claims.write(
        &ctl.db.claims().await?,
        op.update_vm(v.mod_revision, &vm)
            .delete_migration(&mig.vm, m.mod_revision),
    );
    if ctl.db.try_commit(tx).await? {
        tracing::info!(vm = %mig.vm, from = %mig.from, to = %mig.to, "migration committed");
        if let Some(bw) = mig.progress.as_ref().and_then(decide::bandwidth_mib_s) {
            let mut measured = ctl.migration_mib_s.lock().expect("bandwidth lock");
            measured.insert(mig.from.clone(), bw);
            measured.insert(mig.to.clone(), bw);
        }
        ctl.wake.notify_one();
    }
    Ok(())
}

/// Undoes a migration: the destination's copy goes first, then the source's guest runs on,
/// then the record goes, with the destination's claim; the VM's record never changed.
async fn roll_back(ctl: &Controller, m: &Versioned<Migration>) -> ApiResult<()> {
    let mig = &m.value;
    let MigrationStep::RollBack { reason, switched } = &mig.step else {
        return Ok(());
    };
    let to = host(ctl, &mig.to).await?;
    let removed = Answer::from_client(
        ctl.agent(&to.address)
            .remove(&RemoveVms { uuids: vec![mig.uuid] })
            .await
            .map(|_| ()),
    );
    if !decide::destination_settled(&removed, *switched && !fenced(ctl, &mig.to).await?) {
        tracing::warn!(vm = %mig.vm, "waiting for host {} to remove the VM's copy: {removed:?}", mig.to);
        tokio::time::sleep(RETRY * 2).await;
        return Ok(());
    }
    let from = host(ctl, &mig.from).await?;
    let resumed = Answer::from_client(ctl.agent(&from.address).cancel_migration(mig.uuid).await);
    if !decide::source_settled(&resumed, down(ctl, &mig.from)) {
        tracing::warn!(vm = %mig.vm, "waiting for host {} to resume the VM: {resumed:?}", mig.from);
        tokio::time::sleep(RETRY * 2).await;
        return Ok(());
    }
    let _guard = ctl.db.lock().await;
    let vm = ctl.db.vm(&mig.vm).await?;
    let mut claims = ClaimChanges::default();
    if let Some(v) = &vm {
        claims.give_back(&mig.to, Claim::of(&v.value));
    }
    let error = format!(
        "migration of {} from {} to {} rolled back: {reason}",
        mig.vm, mig.from, mig.to
    );
    let op = op_update(ctl, m, |op| {
        op.state = OperationState::Failed;
        op.error = Some(error.clone());
        op.finished_unix_ms = Some(now_ms());
    })
    .await?;
    let tx = claims.write(&ctl.db.claims().await?, op.delete_migration(&mig.vm, m.mod_revision));
    if ctl.db.try_commit(tx).await? {
        tracing::warn!(vm = %mig.vm, "{error}");
        ctl.wake.notify_one();
    }
    Ok(())
}
