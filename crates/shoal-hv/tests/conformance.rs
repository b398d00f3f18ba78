//! What every `Hypervisor` must do, written once ([`suite`]) and run against each driver: the
//! simulated one, and QEMU under TCG with the demo template (slow: each boot takes 5-25 s, so
//! the QEMU runs go through the whole lifecycle with one VM, and boot two VMs only to check
//! that the list tells them apart).

mod common;

use std::sync::Arc;
use std::time::Duration;

use shoal_hv::{ErrorKind, HvError, Hypervisor, SimDriver};
use shoal_model::agent::{CheckpointDisk, VmSpec};
use shoal_model::{Power, VmState};
use uuid::Uuid;

/// One driver under test.
pub struct Subject {
    pub hv: Arc<dyn Hypervisor>,
    /// A spec for a new VM named `name` that this driver can run.
    pub spec: Box<dyn Fn(&str) -> VmSpec + Send + Sync>,
    /// How long any one transition may take.
    pub timeout: Duration,
    /// The image (manifest hex) the specs' disks sit on, as the controller names it.
    pub disk_base: String,
}

mod suite {
    use super::*;

    /// Waits until the VM is in `want`; fails at once if it fails instead.
    pub async fn reach(s: &Subject, uuid: Uuid, want: VmState) -> shoal_model::agent::VmStatus {
        let end = tokio::time::Instant::now() + s.timeout;
        loop {
            let st =
                s.hv.list()
                    .await
                    .into_iter()
                    .find(|v| v.uuid == uuid)
                    .expect("VM listed");
            if st.state == want {
                return st;
            }
            assert!(st.state != VmState::Failed, "VM failed on its way to {want:?}: {st:?}");
            assert!(
                tokio::time::Instant::now() < end,
                "VM not {want:?} after {:?}: {st:?}",
                s.timeout
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn with_power(spec: &VmSpec, power: Power) -> VmSpec {
        VmSpec { power, ..spec.clone() }
    }

    /// `ensure` brings a new VM to running; asking again changes nothing and adds no VM.
    pub async fn ensure_runs_and_is_idempotent(s: &Subject, spec: &VmSpec) {
        let first = s.hv.ensure(spec).await.expect("ensure");
        assert_eq!((first.uuid, first.name.as_str()), (spec.uuid, spec.name.as_str()));
        assert!(matches!(first.state, VmState::Creating | VmState::Running), "{first:?}");
        let running = reach(s, spec.uuid, VmState::Running).await;
        assert_eq!(running.reason, None);
        let again = s.hv.ensure(spec).await.expect("ensure again");
        assert_eq!((again.state, again.seq), (VmState::Running, running.seq), "{again:?}");
        let listed: Vec<_> = s.hv.list().await.into_iter().filter(|v| v.uuid == spec.uuid).collect();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].seq, running.seq);
    }

    /// The console reads from any offset, at most `max` bytes, and says where to go on. (It may
    /// grow between reads: a running guest keeps printing.)
    pub async fn console_is_readable(s: &Subject, spec: &VmSpec) {
        let all = s.hv.console(spec.uuid, 0, 1 << 20).await.expect("console");
        assert!(!all.data.is_empty(), "an empty console for a running VM");
        assert!(all.offset == 0 && all.next > 0, "{all:?}");
        let head = s.hv.console(spec.uuid, 0, 4).await.unwrap();
        assert_eq!((head.offset, head.next), (0, 4));
        assert!(all.data.starts_with(&head.data), "{head:?} is not where {all:?} starts");
        let rest = s.hv.console(spec.uuid, 4, 1 << 20).await.unwrap();
        assert!(rest.offset == 4 && rest.next >= all.next, "{rest:?} after {all:?}");
        let past = s.hv.console(spec.uuid, u64::MAX / 2, 16).await.unwrap();
        assert!(past.data.is_empty() && past.next == past.offset, "{past:?}");
    }

    /// Stop, start, suspend and resume each reach their state, and `list` shows it.
    pub async fn power_transitions(s: &Subject, spec: &VmSpec) {
        let mut seq = reach(s, spec.uuid, VmState::Running).await.seq;
        for (power, state) in [
            (Power::Stopped, VmState::Stopped),
            (Power::Running, VmState::Running),
            (Power::Suspended, VmState::Suspended),
            (Power::Running, VmState::Running),
        ] {
            s.hv.ensure(&with_power(spec, power)).await.expect("ensure");
            let st = reach(s, spec.uuid, state).await;
            assert!(
                st.seq > seq,
                "seq did not grow past {seq} on the way to {state:?}: {st:?}"
            );
            assert_eq!(st.reason, None, "{st:?}");
            seq = st.seq;
        }
    }

    /// A forced stop is a stop.
    pub async fn forced_stop(s: &Subject, spec: &VmSpec) {
        let forced = VmSpec {
            force_stop: true,
            ..with_power(spec, Power::Stopped)
        };
        s.hv.ensure(&forced).await.expect("ensure");
        reach(s, spec.uuid, VmState::Stopped).await;
    }

    /// Removing takes the VM off the list; removing it again, or a VM never seen, succeeds.
    pub async fn remove_is_idempotent(s: &Subject, spec: &VmSpec) {
        s.hv.remove(spec.uuid).await.expect("remove");
        assert!(s.hv.list().await.iter().all(|v| v.uuid != spec.uuid));
        s.hv.remove(spec.uuid).await.expect("remove again");
        s.hv.remove(Uuid::new_v4()).await.expect("remove unknown");
    }

    /// A VM the host does not have is a typed not-found, naming the VM.
    pub async fn unknown_vms_are_not_found(s: &Subject) {
        let ghost = Uuid::new_v4();
        match s.hv.console(ghost, 0, 10).await {
            Err(e @ HvError::NotFound(u)) if u == ghost => {
                assert_eq!(e.kind(), ErrorKind::NotFound);
                assert!(e.to_string().contains(&ghost.to_string()), "{e}");
            }
            other => panic!("console of an unknown VM: {other:?}"),
        }
        match s.hv.checkpoint(ghost, &checkpoint(s, None)).await {
            Err(HvError::NotFound(u)) if u == ghost => {}
            other => panic!("checkpoint of an unknown VM: {other:?}"),
        }
        assert!(s.hv.list().await.iter().all(|v| v.uuid != ghost));
    }

    fn checkpoint(s: &Subject, since: Option<&str>) -> CheckpointDisk {
        CheckpointDisk {
            base: s.disk_base.clone(),
            since: since.map(str::to_string),
        }
    }

    /// A running VM's disk is checkpointed: the first time whole, laid over its base; then
    /// incrementally, laid over the checkpoint before.
    pub async fn checkpoints_a_running_vm(s: &Subject, spec: &VmSpec) {
        let first =
            s.hv.checkpoint(spec.uuid, &checkpoint(s, None))
                .await
                .expect("checkpoint");
        assert!(!first.incremental && first.parent == s.disk_base, "{first:?}");
        assert!(!first.manifest.is_empty(), "{first:?}");
        let next =
            s.hv.checkpoint(spec.uuid, &checkpoint(s, Some(&first.manifest)))
                .await
                .expect("checkpoint since the first");
        assert!(next.incremental && next.parent == first.manifest, "{next:?}");
        assert!(next.changed_bytes <= next.disk_bytes.max(first.disk_bytes), "{next:?}");
    }

    /// A VM that is not running is not checkpointed, and says why.
    pub async fn only_a_running_vm_is_checkpointed(s: &Subject, spec: &VmSpec) {
        match s.hv.checkpoint(spec.uuid, &checkpoint(s, None)).await {
            Err(e @ HvError::NotCheckpointable { vm, .. }) if vm == spec.uuid => {
                assert_eq!(e.kind(), ErrorKind::Invalid);
                assert!(e.to_string().contains("stopped"), "{e}");
            }
            other => panic!("checkpoint of a stopped VM: {other:?}"),
        }
    }

    /// `list` holds every VM the host has, each once, in its own state.
    pub async fn list_reflects_every_vm(s: &Subject, a: &VmSpec, b: &VmSpec) {
        s.hv.ensure(a).await.unwrap();
        s.hv.ensure(&with_power(b, Power::Running)).await.unwrap();
        reach(s, a.uuid, VmState::Running).await;
        reach(s, b.uuid, VmState::Running).await;
        s.hv.ensure(&with_power(b, Power::Stopped)).await.unwrap();
        reach(s, b.uuid, VmState::Stopped).await;
        let list = s.hv.list().await;
        let mine: Vec<_> = list.iter().filter(|v| v.uuid == a.uuid || v.uuid == b.uuid).collect();
        assert_eq!(mine.len(), 2, "{list:?}");
        let state = |u: Uuid| mine.iter().find(|v| v.uuid == u).unwrap().state;
        assert_eq!((state(a.uuid), state(b.uuid)), (VmState::Running, VmState::Stopped));
        for v in [a, b] {
            s.hv.remove(v.uuid).await.unwrap();
        }
    }

    /// The whole lifecycle of one VM, for drivers where each boot is expensive. Returns the
    /// VM's uuid.
    pub async fn lifecycle(s: &Subject) -> Uuid {
        unknown_vms_are_not_found(s).await;
        let spec = (s.spec)("conf-0");
        ensure_runs_and_is_idempotent(s, &spec).await;
        console_is_readable(s, &spec).await;
        checkpoints_a_running_vm(s, &spec).await;
        power_transitions(s, &spec).await;
        forced_stop(s, &spec).await;
        only_a_running_vm_is_checkpointed(s, &spec).await;
        remove_is_idempotent(s, &spec).await;
        spec.uuid
    }
}

// --- the simulated driver ---------------------------------------------------------------------------

fn sim() -> Subject {
    Subject {
        hv: Arc::new(SimDriver::ephemeral(Duration::ZERO)),
        spec: Box::new(VmSpec::example),
        timeout: Duration::from_secs(5),
        disk_base: "0".repeat(64),
    }
}

#[tokio::test]
async fn sim_lifecycle() {
    suite::lifecycle(&sim()).await;
}

#[tokio::test]
async fn sim_list_reflects_every_vm() {
    let s = sim();
    let (a, b) = ((s.spec)("a-0"), (s.spec)("a-1"));
    suite::list_reflects_every_vm(&s, &a, &b).await;
}

// --- QEMU under TCG ---------------------------------------------------------------------------------

fn qemu(f: &common::Fixture, d: Arc<shoal_hv::QemuDriver>) -> Subject {
    let template = f.template.clone();
    Subject {
        hv: d,
        spec: Box::new(move |name| common::spec(&template, name)),
        timeout: Duration::from_secs(180),
        disk_base: common::disk_id(&f.template),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_lifecycle() {
    let f = common::fixture();
    let store = Arc::new(common::ImageStore::new(f.template.clone(), &f.root.join("store")));
    // The demo guest powers off on the ACPI button: a stop that needs `quit` would take this long.
    let d = common::driver_with(&f, store, |c| c.stop_timeout = Duration::from_secs(60)).await;
    let s = qemu(&f, d);
    let uuid = suite::lifecycle(&s).await;
    common::nothing_left(&f.root, uuid);
    assert!(!f.root.join("vms").join(uuid.to_string()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_list_reflects_every_vm() {
    let f = common::fixture();
    let d = common::driver(&f, |_| {}).await;
    let s = qemu(&f, d);
    let (a, b) = ((s.spec)("a-0"), (s.spec)("a-1"));
    suite::list_reflects_every_vm(&s, &a, &b).await;
    for v in [a, b] {
        common::nothing_left(&f.root, v.uuid);
    }
}
