//! What the failure detector concludes about a host, whether a failed host is fenced, and the
//! order its VMs restart in: pure functions of what the controller heard, so that the rule that
//! keeps a VM from running twice can be tested case by case (`docs/ha.md` states it).

use std::collections::HashSet;

use shoal_model::{Checkpoint, CheckpointChain, Fencing, HostFailure, Vm};

/// What the controller knows about one host that it may have to declare failed.
#[derive(Clone, Debug, Default)]
pub struct Evidence<'a> {
    /// A heartbeat arrived within the host timeout.
    pub heard: bool,
    /// The last heartbeat (unix ms), if any since the controller started.
    pub heartbeat_ms: Option<u64>,
    /// The last time a peer that is itself heard reported reaching the host (unix ms).
    pub peer_seen_ms: Option<u64>,
    /// The peers the host checks, as it last said; `None` when not heard since the start.
    pub peers: Option<&'a [String]>,
    /// The host has a power-off command to fence it with.
    pub power_off: bool,
}

/// The detector's conclusion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Up,
    /// Its heartbeats stopped but a peer still reaches it: its VMs are left alone.
    Isolated,
    /// Not heard from, and not (yet) known to be failed: why not.
    Silent(String),
    /// Failed: neither channel heard from it for the timeout, and it can be fenced.
    /// `lease_safe`: its own watchdog is certain to have stopped its VMs once its lease ran
    /// out, because every peer it counts on is heard and none reaches it.
    Failed {
        last_seen_ms: u64,
        lease_safe: bool,
    },
}

/// Classifies a host from its two channels. `heard_hosts`: the hosts heard now; `started_ms`:
/// when the controller started (a host may have been alive then, whatever it heard before).
pub fn classify(e: &Evidence, heard_hosts: &HashSet<&str>, now_ms: u64, timeout_ms: u64, started_ms: u64) -> Verdict {
    if e.heard {
        return Verdict::Up;
    }
    if e.peer_seen_ms.is_some_and(|t| now_ms.saturating_sub(t) <= timeout_ms) {
        return Verdict::Isolated;
    }
    let last_seen_ms = [e.heartbeat_ms, e.peer_seen_ms, Some(started_ms)]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(started_ms);
    let silent_for = now_ms.saturating_sub(last_seen_ms);
    if silent_for <= timeout_ms {
        return Verdict::Silent(format!("not heard from for {:.1} s", silent_for as f64 / 1000.0));
    }
    // Its watchdog stops its VMs unless it reaches a strict majority of its peers; if every
    // one of them is heard here and none reports reaching it, no such majority exists.
    let lease_safe = match e.peers {
        Some(peers) if !peers.is_empty() => peers.iter().all(|p| heard_hosts.contains(p.as_str())),
        _ => false,
    };
    if lease_safe || e.power_off {
        return Verdict::Failed {
            last_seen_ms,
            lease_safe,
        };
    }
    let why = match e.peers {
        None => "its peers are not known since the controller started".to_string(),
        Some([]) => "it has no peers to reach".to_string(),
        Some(peers) => {
            let unheard: Vec<&str> = peers
                .iter()
                .map(String::as_str)
                .filter(|p| !heard_hosts.contains(p))
                .collect();
            format!("its peers {} are not heard either", unheard.join(", "))
        }
    };
    Verdict::Silent(format!(
        "not heard from for {:.0} s; cannot tell a failed host from one cut off ({why}): set a power-off \
         command (`shoal host power NAME --off-command CMD`) to fence it",
        silent_for as f64 / 1000.0
    ))
}

/// What fencing a failed host needs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceStep {
    Done,
    /// Run its power-off command.
    PowerOff,
    /// Its lease runs out for certain at this time (unix ms); fenced then.
    WaitLease {
        at_ms: u64,
    },
    /// Nothing fences it: its power-off command failed and its lease is no guarantee.
    Stuck,
}

/// The power-off command first, unless it failed already. The lease guarantee holds
/// `lease + margin` after the last sign of life: the agent stops its VMs once `lease` passed
/// since its last answered heartbeat, or since it last reached a majority of its peers, and the
/// margin covers a peer's probe interval and the watchdog's period.
pub fn fencing(f: &HostFailure, power_off: bool, lease_ms: u64, margin_ms: u64) -> FenceStep {
    if f.fenced.is_some() {
        return FenceStep::Done;
    }
    if power_off && !f.power_off_failed {
        return FenceStep::PowerOff;
    }
    if f.lease_safe {
        return FenceStep::WaitLease {
            at_ms: f.last_seen_unix_ms + lease_ms + margin_ms,
        };
    }
    FenceStep::Stuck
}

/// A fenced host's fencing, recorded.
pub fn fenced(f: &HostFailure, how: Fencing, now_ms: u64) -> HostFailure {
    HostFailure {
        fenced: Some(how),
        fenced_unix_ms: Some(now_ms),
        waiting: None,
        ..f.clone()
    }
}

/// One VM of a failed host to restart: the checkpoint it restarts from (`None`: its template),
/// and the newer safe ones passed over because their image is damaged.
#[derive(Clone, Debug, PartialEq)]
pub struct Restart<'a> {
    pub vm: &'a Vm,
    pub from: Option<&'a Checkpoint>,
    pub damaged: Vec<u64>,
    pub priority: i32,
}

/// The VMs of a failed host in the order they restart: higher HA priority first, then by name.
/// Each restarts from its newest checkpoint held in two places whose image is `intact`, or its
/// template.
pub fn restarts<'a>(
    vms: impl IntoIterator<Item = &'a Vm>,
    priority: impl Fn(&Vm) -> i32,
    chain: impl Fn(&Vm) -> Option<&'a CheckpointChain>,
    intact: impl Fn(&Checkpoint) -> bool,
) -> Vec<Restart<'a>> {
    let mut out: Vec<Restart> = vms
        .into_iter()
        .map(|vm| {
            let mut damaged = Vec::new();
            let from = chain(vm).filter(|c| c.uuid == vm.uuid).and_then(|c| {
                c.checkpoints.iter().rev().filter(|k| k.safe()).find(|k| {
                    let ok = intact(k);
                    if !ok {
                        damaged.push(k.seq);
                    }
                    ok
                })
            });
            Restart {
                vm,
                from,
                damaged,
                priority: priority(vm),
            }
        })
        .collect();
    out.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.vm.name.cmp(&b.vm.name)));
    out
}

/// Where a restarted VM's disk comes from, as its record keeps it.
pub fn disk_base(r: &Restart) -> Option<String> {
    r.from.map(|c| format!("manifest:{}", c.manifest))
}

/// What the operation says of a restart.
pub fn restart_note(r: &Restart, to: &str) -> String {
    let from = match r.from {
        Some(c) => format!("{} on {to} from checkpoint #{}", r.vm.name, c.seq),
        None if r.damaged.is_empty() => {
            format!(
                "{} on {to} from its template (no checkpoint held in two places)",
                r.vm.name
            )
        }
        None => format!("{} on {to} from its template", r.vm.name),
    };
    if r.damaged.is_empty() {
        return from;
    }
    let seqs: Vec<String> = r.damaged.iter().map(|s| format!("#{s}")).collect();
    format!(
        "{from} (checkpoint {} damaged in the image store: passed over)",
        seqs.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 10_000;

    fn ev<'a>(peers: Option<&'a [String]>) -> Evidence<'a> {
        Evidence {
            heard: false,
            heartbeat_ms: Some(100_000),
            peer_seen_ms: None,
            peers,
            power_off: false,
        }
    }

    #[test]
    fn a_host_is_failed_only_when_both_channels_are_silent_and_it_can_be_fenced() {
        let peers = vec!["b".to_string(), "c".to_string()];
        let heard: HashSet<&str> = ["b", "c"].into();
        let now = 100_000 + T + 1;
        assert_eq!(
            classify(
                &Evidence {
                    heard: true,
                    ..ev(None)
                },
                &heard,
                now,
                T,
                0
            ),
            Verdict::Up
        );
        // A peer reached it a moment ago: isolated, whatever the heartbeats say.
        let e = Evidence {
            peer_seen_ms: Some(now - 500),
            ..ev(Some(&peers))
        };
        assert_eq!(classify(&e, &heard, now, T, 0), Verdict::Isolated);
        // Within the timeout: silent, not failed.
        assert!(matches!(
            classify(&ev(Some(&peers)), &heard, 100_000 + T, T, 0),
            Verdict::Silent(_)
        ));
        // Past it, every peer heard and none reaching it: failed, and the lease is a guarantee.
        assert_eq!(
            classify(&ev(Some(&peers)), &heard, now, T, 0),
            Verdict::Failed {
                last_seen_ms: 100_000,
                lease_safe: true
            }
        );
        // A peer's report is a sign of life too: the timeout counts from it.
        let e = Evidence {
            peer_seen_ms: Some(105_000),
            ..ev(Some(&peers))
        };
        assert!(matches!(classify(&e, &heard, now, T, 0), Verdict::Isolated));
        assert!(matches!(
            classify(&e, &heard, 105_000 + T + 1, T, 0),
            Verdict::Failed {
                last_seen_ms: 105_000,
                ..
            }
        ));
    }

    #[test]
    fn without_a_guarantee_a_silent_host_stays_silent_unless_its_power_can_be_cut() {
        let peers = vec!["b".to_string(), "c".to_string()];
        let only_b: HashSet<&str> = ["b"].into();
        let now = 100_000 + T + 1;
        // c is not heard: c may be what it still reaches, so its watchdog may not fire.
        match classify(&ev(Some(&peers)), &only_b, now, T, 0) {
            Verdict::Silent(why) => assert!(why.contains("its peers c are not heard"), "{why}"),
            v => panic!("{v:?}"),
        }
        // No peers (a single host), or peers unknown after a restart: no guarantee either.
        assert!(matches!(
            classify(&ev(Some(&[])), &only_b, now, T, 0),
            Verdict::Silent(_)
        ));
        assert!(matches!(classify(&ev(None), &only_b, now, T, 0), Verdict::Silent(_)));
        // With a power-off command it can be fenced anyway.
        let e = Evidence {
            power_off: true,
            ..ev(Some(&peers))
        };
        assert_eq!(
            classify(&e, &only_b, now, T, 0),
            Verdict::Failed {
                last_seen_ms: 100_000,
                lease_safe: false
            }
        );
        // After a controller restart, the start counts as a sign of life.
        let e = Evidence {
            heartbeat_ms: None,
            ..ev(Some(&peers))
        };
        let heard: HashSet<&str> = ["b", "c"].into();
        assert!(matches!(classify(&e, &heard, 200_000, T, 195_000), Verdict::Silent(_)));
        assert!(matches!(
            classify(&e, &heard, 200_000, T, 185_000),
            Verdict::Failed {
                last_seen_ms: 185_000,
                ..
            }
        ));
    }

    #[test]
    fn fencing_tries_power_first_then_waits_out_the_lease_and_never_guesses() {
        let f = HostFailure {
            host: "a".into(),
            detected_unix_ms: 111_000,
            last_seen_unix_ms: 100_000,
            fenced: None,
            fenced_unix_ms: None,
            lease_safe: true,
            power_off_failed: false,
            waiting: None,
            operation: None,
        };
        assert_eq!(fencing(&f, true, T, 3000), FenceStep::PowerOff);
        let failed = HostFailure {
            power_off_failed: true,
            ..f.clone()
        };
        assert_eq!(fencing(&failed, true, T, 3000), FenceStep::WaitLease { at_ms: 113_000 });
        assert_eq!(fencing(&f, false, T, 3000), FenceStep::WaitLease { at_ms: 113_000 });
        let unsafe_lease = HostFailure {
            lease_safe: false,
            ..failed
        };
        assert_eq!(fencing(&unsafe_lease, true, T, 3000), FenceStep::Stuck);
        let done = fenced(&f, Fencing::Lease, 113_000);
        assert_eq!(fencing(&done, false, T, 3000), FenceStep::Done);
        assert_eq!(done.fenced_unix_ms, Some(113_000));
    }

    #[test]
    fn restarts_go_by_priority_then_name_each_from_its_newest_safe_checkpoint() {
        let vm = |name: &str| Vm {
            host: "a".into(),
            ..Vm::example(name)
        };
        let (x, y, z) = (vm("x"), vm("y"), vm("z"));
        let cp = |seq: u64, replicas: &[&str]| Checkpoint {
            seq,
            manifest: format!("{seq:064x}"),
            parent: String::new(),
            incremental: true,
            host: "a".into(),
            taken_unix_ms: 0,
            disk_bytes: 0,
            changed_bytes: 0,
            read_bytes: 0,
            bytes_sent: 0,
            seconds: 0.0,
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
        };
        let chain_y = CheckpointChain {
            vm: "y".into(),
            uuid: y.uuid,
            last_seq: 2,
            checkpoints: vec![cp(1, &["controller", "b"]), cp(2, &["controller"])],
        };
        // A chain of an earlier VM of the same name does not count.
        let stale_z = CheckpointChain {
            vm: "z".into(),
            uuid: uuid::Uuid::new_v4(),
            last_seq: 1,
            checkpoints: vec![cp(1, &["controller", "b"])],
        };
        let order = restarts(
            [&x, &y, &z],
            |v| if v.name == "z" { 5 } else { 0 },
            |v| match v.name.as_str() {
                "y" => Some(&chain_y),
                "z" => Some(&stale_z),
                _ => None,
            },
            |_| true,
        );
        let names: Vec<&str> = order.iter().map(|r| r.vm.name.as_str()).collect();
        assert_eq!(names, ["z", "x", "y"]);
        assert_eq!(order[2].from.map(|c| c.seq), Some(1), "the unsafe #2 is passed over");
        assert_eq!(disk_base(&order[2]), Some(format!("manifest:{:064x}", 1)));
        assert!(order[0].from.is_none() && order[1].from.is_none());
        assert!(restart_note(&order[0], "b").contains("from its template"));

        // A damaged newest checkpoint is passed over for the one before, and said so.
        let chain = CheckpointChain {
            vm: "y".into(),
            uuid: y.uuid,
            last_seq: 3,
            checkpoints: vec![cp(2, &["controller", "b"]), cp(3, &["controller", "c"])],
        };
        let order = restarts([&y], |_| 0, |_| Some(&chain), |c| c.seq != 3);
        assert_eq!(order[0].from.map(|c| c.seq), Some(2));
        assert_eq!(order[0].damaged, [3]);
        let note = restart_note(&order[0], "b");
        assert!(
            note.contains("from checkpoint #2") && note.contains("#3 damaged"),
            "{note}"
        );
        let order = restarts([&y], |_| 0, |_| Some(&chain), |_| false);
        assert!(order[0].from.is_none());
        assert_eq!(order[0].damaged, [3, 2]);
        assert!(restart_note(&order[0], "b").contains("from its template (checkpoint #3, #2 damaged"));
    }
}
