//! Disk checkpoints with simulated hosts: on demand and on schedule, two copies before a
//! checkpoint is safe, retention and its image names, block profiles, refusals that change
//! nothing, and a failed host's VM restarting from its checkpoint.

mod common;

use std::time::Duration;

use common::{cluster, wait_for, Harness, Opts};
use shoal_model::{OperationKind, OperationState, VmState};

/// Three hosts whose VMs outlive their agents, declared failed 1.5 s after their last sign of
/// life; template `t` and profile `p` (1 vCPU, 256 MiB).
async fn failing_pool() -> Harness {
    let h = Harness::start(Opts {
        hosts: 3,
        host_timeout: Duration::from_millis(1500),
        persistent: true,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    h
}

/// The first host evacuation to succeed.
async fn evacuated(h: &Harness) -> shoal_model::Operation {
    wait_for("the evacuation to succeed", Duration::from_secs(20), async || {
        h.client
            .operations()
            .await
            .unwrap()
            .into_iter()
            .find(|o| o.kind == OperationKind::HostEvacuate && o.state == OperationState::Succeeded)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_taken_kept_in_two_places_profiled_and_pruned() {
    let h = Harness::start(Opts {
        hosts: 3,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let mut req = cluster("web", "p", 2);
    req.keep_checkpoints = Some(2);
    let op = h.client.create_cluster(&req).await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    let vm = h.client.vms(Some("web")).await.unwrap().remove(0);

    let first = h.client.checkpoint_vm(&vm.name).await.unwrap();
    assert_eq!(first.checkpoint.seq, 1);
    assert!(!first.checkpoint.incremental, "the first is full");
    assert_eq!(first.checkpoint.host, vm.host);
    assert!(first.safe, "{first:?}");
    assert_eq!(first.checkpoint.replicas[0], "controller");
    assert_ne!(first.checkpoint.replicas[1], vm.host, "the copy is on another host");
    // The sim writes nothing: the disk is its template's, every block shared.
    let t = h
        .client
        .templates()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name == "t")
        .unwrap();
    assert_eq!(format!("manifest:{}", first.checkpoint.manifest), t.hash);
    assert_eq!(first.blocks.own_bytes, 0);
    assert!(first.blocks.template_bytes > 0);
    let second = h.client.checkpoint_vm(&vm.name).await.unwrap();
    assert!(second.checkpoint.incremental);
    let third = h.client.checkpoint_vm(&vm.name).await.unwrap();
    assert_eq!(third.checkpoint.seq, 3);

    // Two kept; the dropped one's image name is gone, the kept ones' are there.
    let blocks = h.client.vm_blocks(&vm.name).await.unwrap();
    let seqs: Vec<u64> = blocks.checkpoints.iter().map(|c| c.checkpoint.seq).collect();
    assert_eq!(seqs, [2, 3]);
    assert_eq!(blocks.keep, 2);
    let refs = h.controller().images.refs().unwrap();
    assert!(!refs.contains_key(&format!("checkpoint/{}/1", vm.name)), "{refs:?}");
    assert!(refs.contains_key(&format!("checkpoint/{}/3", vm.name)), "{refs:?}");

    let cb = h.client.cluster_blocks("web").await.unwrap();
    assert_eq!(cb.vms.len(), 2);
    let other = cb.vms.iter().find(|v| v.vm != vm.name).unwrap();
    assert!(other.latest.is_none() && other.checkpoints == 0);
    assert_eq!(cb.total.template_bytes, third.blocks.template_bytes);

    // Refusals name what is wrong and change nothing.
    let e = h.client.checkpoint_vm("nosuch-0").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(e.to_string().contains("nosuch-0"), "{e}");
    let e = h.client.vm_blocks("nosuch-0").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let e = h.client.cluster_blocks("nosuch").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    let stopped = h.client.vm_action(&other.vm, "stop", false).await.unwrap();
    h.client.wait(stopped.id, |_| {}).await.unwrap();
    let e = h.client.checkpoint_vm(&other.vm).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("stopped"), "{e}");
    assert!(h.controller().db.checkpoints(&other.vm).await.unwrap().is_none());

    for (interval, why) in [("1s", "the shortest is 5s"), ("soon", "expected `off` or a number")] {
        let mut bad = cluster("bad", "p", 1);
        bad.checkpoint_interval = Some(interval.into());
        let e = h.client.create_cluster(&bad).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        assert!(e.to_string().contains(interval) && e.to_string().contains(why), "{e}");
    }
    let mut bad = cluster("bad", "p", 1);
    bad.keep_checkpoints = Some(0);
    let e = h.client.create_cluster(&bad).await.unwrap_err();
    assert!(e.to_string().contains("invalid checkpoint count 0"), "{e}");
    assert!(h.client.cluster("bad").await.is_err());

    // Deleting the cluster forgets its checkpoints and their image names.
    let op = h.client.delete_cluster("web").await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    wait_for("the checkpoints to be forgotten", Duration::from_secs(20), async || {
        let gone = h.keys("/checkpoints/").await.is_empty()
            && !h
                .controller()
                .images
                .refs()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("checkpoint/"));
        gone.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_checkpoints_each_vm_at_its_interval_and_a_failed_hosts_vm_restarts_from_it() {
    let mut h = failing_pool().await;
    let mut req = cluster("ha", "p", 3);
    req.checkpoint_interval = Some("5s".into());
    let op = h.client.create_cluster(&req).await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    let shown = h.client.cluster("ha").await.unwrap();
    assert_eq!(shown.cluster.shape.ha.checkpoint_interval_s, Some(5));
    // Each VM's first checkpoint comes at once, the next one interval later.
    let vms = h.client.vms(Some("ha")).await.unwrap();
    for v in &vms {
        wait_for("two scheduled checkpoints", Duration::from_secs(20), async || {
            let b = h.client.vm_blocks(&v.name).await.unwrap();
            (b.checkpoints.len() >= 2).then_some(())
        })
        .await;
    }
    let b = h.client.vm_blocks(&vms[0].name).await.unwrap();
    let gap = b.checkpoints[1].checkpoint.taken_unix_ms - b.checkpoints[0].checkpoint.taken_unix_ms;
    assert!((4500..9000).contains(&gap), "{gap} ms between scheduled checkpoints");

    h.wait_peers().await;
    let victim = vms[0].host.clone();
    let i: usize = victim.trim_start_matches("host").parse::<usize>().unwrap() - 1;
    let kept = h.client.vm_blocks(&vms[0].name).await.unwrap().checkpoints.len();
    h.agents[i].take().unwrap().kill();
    // A checkpoint asked of a dead host is refused and records nothing.
    let e = h.client.checkpoint_vm(&vms[0].name).await.unwrap_err();
    assert!(matches!(e.status(), Some(409 | 503)), "{e}");
    assert_eq!(h.client.vm_blocks(&vms[0].name).await.unwrap().checkpoints.len(), kept);
    let op = evacuated(&h).await;
    assert!(op.steps[1].message.contains("from checkpoint #"), "{op:?}");
    let after = h.client.vm(&vms[0].name).await.unwrap();
    assert_eq!(after.state, VmState::Running);
    assert_ne!(after.host, victim);
    let t = h
        .client
        .templates()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.name == "t")
        .unwrap();
    assert_eq!(
        after.disk_base.as_deref(),
        Some(t.hash.as_str()),
        "restarted on its checkpoint"
    );
    // Its checkpoints go on from its new host, numbered on.
    let next = h.client.checkpoint_vm(&vms[0].name).await.unwrap();
    assert_eq!(next.checkpoint.host, after.host);
    assert!(next.checkpoint.seq > kept as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_latest_checkpoint_is_passed_over_for_the_one_before_and_said_so() {
    let mut h = failing_pool().await;
    let op = h.client.create_cluster(&cluster("cc", "p", 1)).await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    let vm = h.client.vm("cc-0").await.unwrap();
    // Two checkpoints of distinct disks, as a real host would have sent them.
    let mut manifests = Vec::new();
    for (name, fill) in [("img1", 1u8), ("img2", 2u8)] {
        let f = h.dir.path().join(format!("{name}.img"));
        let mut disk = vec![fill; 1 << 20];
        disk[510..512].copy_from_slice(&[0x55, 0xAA]);
        std::fs::write(&f, disk).unwrap();
        h.client
            .import_template(name, &shoal_client::TemplateFiles::disk(&f))
            .await
            .unwrap();
        let t = h
            .client
            .templates()
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap();
        manifests.push(t.hash.trim_start_matches("manifest:").to_string());
    }
    let cp = |seq: u64, manifest: &str, copy: &str| shoal_model::Checkpoint {
        seq,
        manifest: manifest.to_string(),
        parent: String::new(),
        incremental: seq > 1,
        host: vm.host.clone(),
        taken_unix_ms: shoal_model::now_ms(),
        disk_bytes: 1 << 20,
        changed_bytes: 0,
        read_bytes: 0,
        bytes_sent: 0,
        seconds: 0.0,
        replicas: vec!["controller".into(), copy.into()],
    };
    let chain = shoal_model::CheckpointChain {
        vm: vm.name.clone(),
        uuid: vm.uuid,
        last_seq: 2,
        checkpoints: vec![cp(1, &manifests[0], "x"), cp(2, &manifests[1], "y")],
    };
    let ctl = h.controller().clone();
    ctl.db
        .commit(shoal_controller::datastore::Tx::new().put_checkpoints(0, &chain))
        .await
        .unwrap();
    // A chunk of #2's image is corrupt in the controller's store.
    let id: shoal_image::ManifestId = manifests[1].parse().unwrap();
    let chunk = ctl.images.manifest(&id).unwrap().distinct_chunks()[0];
    ctl.images.backend().remove(&[chunk]).unwrap();
    let mut w = ctl.images.backend().writer().unwrap();
    w.put(&chunk, b"not the chunk it claims to be").unwrap();
    w.commit().unwrap();
    assert_eq!(ctl.images.damaged(&id).unwrap(), vec![chunk]);

    h.wait_peers().await;
    let i: usize = vm.host.trim_start_matches("host").parse::<usize>().unwrap() - 1;
    h.agents[i].take().unwrap().kill();
    let op = evacuated(&h).await;
    let msg = &op.steps[1].message;
    assert!(
        msg.contains("from checkpoint #1") && msg.contains("#2 damaged"),
        "{msg}"
    );
    let after = h.client.vm("cc-0").await.unwrap();
    assert_eq!(after.disk_base, Some(format!("manifest:{}", manifests[0])));
    assert_eq!(after.state, VmState::Running);
}
