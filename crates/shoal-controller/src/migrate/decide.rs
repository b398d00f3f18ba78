//! What the migration executor does next, decided from what the hosts answered, with no I/O.
//! The rule that keeps a VM from running twice lives here: the source's guest is resumed only
//! once the destination's copy is known never to have run or known to be gone.

use shoal_model::agent::{MigrationPhase, MigrationProgress, VmStatus};
use shoal_model::VmState;

/// A host's answer to one command, as the executor classifies it.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer<T> {
    Ok(T),
    /// The host answered that it has no such VM (or no such migration).
    NotThere(String),
    /// The host answered with a refusal or a failure.
    Failed(String),
    /// The host did not answer: it may have done it or not.
    Unreachable(String),
}

impl<T> Answer<T> {
    pub fn from_client(r: Result<T, shoal_client::ClientError>) -> Answer<T> {
        match r {
            Ok(v) => Answer::Ok(v),
            Err(e) => match e.status() {
                Some(404) => Answer::NotThere(e.to_string()),
                Some(_) => Answer::Failed(e.to_string()),
                None => Answer::Unreachable(e.to_string()),
            },
        }
    }
}

/// While the source copies: go on watching, switch over, or undo.
#[derive(Clone, Debug, PartialEq)]
pub enum Watch {
    Continue,
    Switch,
    RollBack(String),
}

/// Decides from the source's report on its outgoing migration. `source_down`: the source host
/// has not been heard from within the host timeout; `dest_down`: the destination (named
/// `dest`) has not, whose copy never ran, so a stream that stalls on a cut link is undone;
/// `timed_out`: the migration ran past the operation timeout.
pub fn watch(
    host: &str,
    answer: &Answer<MigrationProgress>,
    source_down: bool,
    dest: (&str, bool),
    timed_out: bool,
) -> Watch {
    if let (Answer::Ok(p), (dest, true)) = (answer, dest) {
        if p.phase != MigrationPhase::Completed {
            return Watch::RollBack(format!(
                "host {dest}, the destination, stopped answering the controller"
            ));
        }
    }
    match answer {
        Answer::Ok(p) => match p.phase {
            MigrationPhase::Completed => Watch::Switch,
            MigrationPhase::Failed | MigrationPhase::Cancelled => Watch::RollBack(format!(
                "host {host} reports the migration {}: {}",
                p.phase.as_str(),
                p.error.as_deref().unwrap_or("no reason given")
            )),
            _ if timed_out => Watch::RollBack(format!(
                "timed out in the {} phase ({} of {} MiB of memory sent)",
                p.phase.as_str(),
                p.ram_sent_bytes >> 20,
                p.ram_total_bytes >> 20
            )),
            _ => Watch::Continue,
        },
        Answer::NotThere(e) => Watch::RollBack(format!("host {host} has no migration of the VM any more: {e}")),
        Answer::Failed(e) => Watch::RollBack(format!("host {host}: {e}")),
        Answer::Unreachable(e) if source_down || timed_out => {
            Watch::RollBack(format!("host {host} stopped answering during the migration: {e}"))
        }
        Answer::Unreachable(_) => Watch::Continue,
    }
}

/// After asking the destination to run the guest.
#[derive(Clone, Debug, PartialEq)]
pub enum Switched {
    /// It runs there: commit the move.
    Commit,
    /// It does not run there and never will: undo.
    RollBack(String),
    /// No answer: the guest may run there or not, so nothing may be undone; ask again.
    Wait(String),
}

pub fn switched(host: &str, answer: &Answer<VmStatus>) -> Switched {
    match answer {
        Answer::Ok(s) if s.state == VmState::Running => Switched::Commit,
        Answer::Ok(s) => Switched::RollBack(format!(
            "host {host} did not run the VM: it is {}{}",
            s.state.as_str(),
            s.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
        )),
        Answer::NotThere(e) => Switched::RollBack(format!("host {host} lost the incoming VM: {e}")),
        Answer::Failed(e) => Switched::RollBack(format!("host {host} could not run the VM: {e}")),
        Answer::Unreachable(e) => Switched::Wait(format!("waiting for host {host} to confirm the VM runs there: {e}")),
    }
}

/// Whether a rollback's removal of the destination's copy is settled. `may_have_run`: the
/// destination was told to run the guest, so only its own confirmation settles it; before
/// that its guest was paused from the start and never ran, and a host that cannot be reached
/// removes it as an orphan when it is back.
pub fn destination_settled(answer: &Answer<()>, may_have_run: bool) -> bool {
    match answer {
        Answer::Ok(()) | Answer::NotThere(_) => true,
        Answer::Failed(_) | Answer::Unreachable(_) => !may_have_run,
    }
}

/// Whether a rollback's resumption of the source is settled: it answered, or it is down (its
/// VM then shows `unknown` until it is back).
pub fn source_settled(answer: &Answer<VmStatus>, source_down: bool) -> bool {
    match answer {
        Answer::Ok(_) | Answer::NotThere(_) => true,
        Answer::Failed(_) | Answer::Unreachable(_) => source_down,
    }
}

/// The bandwidth a finished migration achieved, MiB/s (disk and memory sent over its time),
/// when it moved enough to tell.
pub fn bandwidth_mib_s(p: &MigrationProgress) -> Option<f64> {
    let bytes = p.disk_sent_bytes + p.ram_sent_bytes;
    (p.elapsed_ms >= 100 && bytes >= 1 << 20).then(|| bytes as f64 / 1048576.0 / (p.elapsed_ms as f64 / 1000.0))
}

/// One line of progress for the operation: what is sent, how fast the guest dirties memory,
/// and the pause QEMU expects.
pub fn progress_line(p: &MigrationProgress) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    let mut s = format!(
        "{} ({}): disk {} of {}, memory {} sent, {} left",
        p.phase.as_str(),
        p.mode.as_str(),
        mib(p.disk_sent_bytes),
        mib(p.disk_total_bytes),
        mib(p.ram_sent_bytes),
        mib(p.ram_remaining_bytes),
    );
    if p.dirty_pages_per_s > 0 {
        s.push_str(&format!(", {} pages/s dirtied", p.dirty_pages_per_s));
    }
    match (p.downtime_ms, p.expected_downtime_ms) {
        (Some(d), _) => s.push_str(&format!(", downtime {d} ms")),
        (None, Some(e)) => s.push_str(&format!(", expected downtime {e} ms")),
        _ => {}
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_model::agent::MigrationMode;

    fn progress(phase: MigrationPhase) -> MigrationProgress {
        MigrationProgress {
            phase,
            error: Some("stream cut".into()),
            ram_total_bytes: 128 << 20,
            ram_sent_bytes: 64 << 20,
            ..MigrationProgress::starting(MigrationMode::Pause)
        }
    }

    fn status(state: VmState) -> VmStatus {
        VmStatus {
            uuid: uuid::Uuid::nil(),
            name: "a-0".into(),
            state,
            reason: None,
            seq: 2,
            cpu_seconds: None,
            disk_bytes: None,
        }
    }

    #[test]
    fn watching_switches_only_on_completion_and_undoes_on_any_definite_failure() {
        let w = |a: Answer<MigrationProgress>, down, late| watch("h1", &a, down, ("h2", false), late);
        assert_eq!(
            w(Answer::Ok(progress(MigrationPhase::Memory)), false, false),
            Watch::Continue
        );
        assert_eq!(
            w(Answer::Ok(progress(MigrationPhase::Completed)), false, true),
            Watch::Switch
        );
        let Watch::RollBack(r) = w(Answer::Ok(progress(MigrationPhase::Failed)), false, false) else {
            panic!()
        };
        assert!(r.contains("h1") && r.contains("stream cut"), "{r}");
        let Watch::RollBack(r) = w(Answer::Ok(progress(MigrationPhase::Disk)), false, true) else {
            panic!()
        };
        assert!(r.contains("timed out") && r.contains("64 of 128 MiB"), "{r}");
        assert!(matches!(
            w(Answer::NotThere("gone".into()), false, false),
            Watch::RollBack(_)
        ));
        assert!(matches!(
            w(Answer::Failed("500".into()), false, false),
            Watch::RollBack(_)
        ));
        // A source that misses an answer or two is asked again, unless it is down.
        assert_eq!(w(Answer::Unreachable("refused".into()), false, false), Watch::Continue);
        assert!(matches!(
            w(Answer::Unreachable("refused".into()), true, false),
            Watch::RollBack(_)
        ));
    }

    #[test]
    fn a_switch_commits_only_on_the_destinations_own_word() {
        assert_eq!(switched("h2", &Answer::Ok(status(VmState::Running))), Switched::Commit);
        assert!(matches!(
            switched("h2", &Answer::Ok(status(VmState::Failed))),
            Switched::RollBack(_)
        ));
        assert!(matches!(
            switched("h2", &Answer::NotThere("x".into())),
            Switched::RollBack(_)
        ));
        assert!(matches!(
            switched("h2", &Answer::Failed("x".into())),
            Switched::RollBack(_)
        ));
        let Switched::Wait(why) = switched("h2", &Answer::Unreachable("timeout".into())) else {
            panic!()
        };
        assert!(why.contains("h2"), "{why}");
    }

    #[test]
    fn a_destination_that_may_have_run_the_guest_must_confirm_its_removal() {
        let silent = Answer::Unreachable("timeout".into());
        assert!(
            !destination_settled(&silent, true),
            "never resume the source on a guess"
        );
        assert!(destination_settled(&silent, false), "its guest never ran");
        assert!(destination_settled(&Answer::Ok(()), true));
        assert!(destination_settled(&Answer::NotThere("x".into()), true));
        assert!(!destination_settled(&Answer::Failed("busy".into()), true));
        assert!(source_settled(&Answer::Ok(status(VmState::Running)), false));
        assert!(!source_settled(&Answer::Unreachable("x".into()), false));
        assert!(source_settled(&Answer::Unreachable("x".into()), true));
    }

    #[test]
    fn bandwidth_is_what_was_sent_over_the_time_it_took() {
        let mut p = progress(MigrationPhase::Completed);
        p.elapsed_ms = 2000;
        p.disk_sent_bytes = 64 << 20;
        assert_eq!(bandwidth_mib_s(&p), Some(64.0));
        p.elapsed_ms = 10;
        assert_eq!(bandwidth_mib_s(&p), None, "too short to tell");
    }

    #[test]
    fn progress_reads_as_one_line() {
        let mut p = progress(MigrationPhase::Memory);
        p.expected_downtime_ms = Some(30);
        p.dirty_pages_per_s = 120;
        assert_eq!(
            progress_line(&p),
            "memory (pause): disk 0.0 MiB of 0.0 MiB, memory 64.0 MiB sent, 0.0 MiB left, 120 pages/s dirtied, expected downtime 30 ms"
        );
    }
}
