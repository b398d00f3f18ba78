//! Migrations through the controller with simulated hosts: where a VM goes, what is refused
//! (changing nothing), moves of whole clusters in waves, and a controller restarted in the
//! middle. Real QEMU migrations are tested in `crates/shoal-hv/tests/migrate.rs` and, between
//! hosts in namespaces, in `crates/shoal/tests/migrate.rs`.

mod common;

use std::time::Duration;

use common::{cluster, wait_for, Harness, Opts};
use shoal_model::agent::{MigrationMode, MigrationParams};
use shoal_model::{MigrateCluster, MigrateVm, OperationKind, OperationState, Vm, VmState};

/// Waits until a migration is in its copy step.
async fn copying(h: &Harness) {
    wait_for("the copy to start", Duration::from_secs(20), async || {
        let m = h.client.migrations().await.unwrap();
        m.iter()
            .any(|m| m.step == shoal_model::MigrationStep::Copy)
            .then_some(())
    })
    .await;
}

fn to(host: &str) -> MigrateVm {
    MigrateVm {
        to: Some(host.into()),
        params: MigrationParams::default(),
    }
}

async fn vm(h: &Harness, name: &str) -> Vm {
    h.client.vm(name).await.unwrap()
}

/// Every host's claimed vCPUs, in host order.
async fn claimed(h: &Harness) -> Vec<u32> {
    let mut hosts = h.client.hosts().await.unwrap();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    hosts.iter().map(|x| x.used_cpus).collect()
}

async fn deployed(h: &Harness, name: &str, size: u32) {
    h.template("t").await;
    h.profile("p", "t", 2, "1GiB").await;
    let op = h.client.create_cluster(&cluster(name, "p", size)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moves_where_asked_or_where_placement_says_and_its_old_host_lets_it_go() {
    let h = Harness::start(Opts::default()).await;
    deployed(&h, "a", 2).await;
    let before = vm(&h, "a-0").await;
    let on: Vec<String> = h
        .client
        .vms(Some("a"))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.host)
        .collect();
    let spare = ["host1", "host2", "host3"]
        .into_iter()
        .find(|x| !on.iter().any(|o| o == x))
        .unwrap()
        .to_string();
    let op = h.client.migrate_vm("a-0", &to(&spare)).await.unwrap();
    assert_eq!((op.kind, op.target.as_str()), (OperationKind::VmMigrate, "a-0"));
    let done = h.client.wait(op.id, |_| {}).await.unwrap();
    assert!(
        done.steps.iter().all(|s| s.state == shoal_model::StepState::Done),
        "{done:?}"
    );
    let after = vm(&h, "a-0").await;
    assert_eq!((after.host.as_str(), after.state), (spare.as_str(), VmState::Running));
    assert_eq!(
        (after.uuid, after.ip, after.mac),
        (before.uuid, before.ip, before.mac),
        "same identity"
    );
    assert!(h.client.migrations().await.unwrap().is_empty());
    assert!(h.keys("/migrations/").await.is_empty());
    // The claim followed the VM: 2 vCPUs on each host that holds one of the two VMs.
    let c = claimed(&h).await;
    assert_eq!(c.iter().sum::<u32>(), 4, "{c:?}");
    assert_eq!(c.iter().filter(|x| **x == 2).count(), 2, "{c:?}");
    // The old host removes its copy (an orphan now).
    let old = h.client.hosts().await.unwrap();
    let old_addr = &old.iter().find(|x| x.name == before.host).unwrap().address;
    let agent = shoal_client::AgentClient::new(old_addr, None, Duration::from_secs(5));
    wait_for("the old host to remove its copy", Duration::from_secs(10), async || {
        let l = agent.list().await.unwrap();
        l.vms.iter().all(|v| v.uuid != before.uuid).then_some(())
    })
    .await;

    // Without --to, placement chooses, never the VM's own host; the preview says why.
    let e = h.client.plan_migrate("a-0", None, true).await.unwrap();
    assert!(e.error.is_none(), "{e:?}");
    assert_eq!(e.plan.len(), 1);
    let chosen = e.plan[0].host.clone();
    assert_ne!(chosen, spare);
    assert!(
        e.hosts.iter().any(|v| v.host == spare && v.rejected.is_some()),
        "its own host is rejected: {:?}",
        e.hosts
    );
    let op = h.client.migrate_vm("a-0", &MigrateVm::default()).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(vm(&h, "a-0").await.host, chosen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migrations_are_refused_naming_the_value_and_change_nothing() {
    let h = Harness::start(Opts {
        hosts: 3,
        boot: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    deployed(&h, "b", 2).await;
    let b0 = vm(&h, "b-0").await;
    let other = if b0.host == "host1" { "host2" } else { "host1" };
    let claims = claimed(&h).await;
    let refused = async |name: &str, req: MigrateVm, status: u16, words: &[&str]| {
        let e = h.client.migrate_vm(name, &req).await.unwrap_err();
        assert_eq!(e.status(), Some(status), "{name} {req:?}: {e}");
        for w in words {
            assert!(e.to_string().contains(w), "{name} {req:?}: {e} lacks {w:?}");
        }
        assert!(h.keys("/migrations/").await.is_empty());
        assert_eq!(claimed(&h).await, claims);
    };
    refused("nope-0", to(other), 404, &["VM \"nope-0\" not found"]).await;
    refused("b-0", to("host9"), 404, &["host \"host9\" not found"]).await;
    refused("b-0", to(&b0.host), 400, &["already runs on host", &b0.host]).await;
    // A host in maintenance or draining takes nothing new; one too small has no room.
    h.client.host_maintenance(other, true).await.unwrap();
    refused("b-0", to(other), 409, &["host", other, "maintenance"]).await;
    h.client.host_maintenance(other, false).await.unwrap();
    // A stopped or suspended VM does not migrate.
    let op = h.client.vm_action("b-1", "stop", false).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    refused("b-1", to(other), 409, &["b-1", "stopped", "start it first"]).await;
    let op = h.client.vm_action("b-1", "start", false).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let op = h.client.vm_action("b-1", "suspend", false).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let claims_suspended = claimed(&h).await;
    let e = h.client.migrate_vm("b-1", &to(other)).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(
        e.to_string().contains("suspended") && e.to_string().contains("resume it first"),
        "{e}"
    );
    assert_eq!(claimed(&h).await, claims_suspended);

    // Two migrations of one VM at once: the second is refused while the first runs.
    let first = h
        .client
        .migrate_vm(
            "b-0",
            &MigrateVm {
                to: None,
                params: MigrationParams {
                    mode: MigrationMode::Pause,
                    ..Default::default()
                },
            },
        )
        .await
        .unwrap();
    let e = h.client.migrate_vm("b-0", &MigrateVm::default()).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("b-0"), "{e}");
    let m = h.client.migrations().await.unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].params.mode, MigrationMode::Pause);
    // Nor can the VM be stopped meanwhile.
    assert_eq!(
        h.client.vm_action("b-0", "stop", false).await.unwrap_err().status(),
        Some(409)
    );
    h.client.wait(first.id, |_| {}).await.unwrap();
    assert!(h.keys("/migrations/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_moves_off_its_hosts_in_waves() {
    let h = Harness::start(Opts {
        hosts: 4,
        ..Default::default()
    })
    .await;
    deployed(&h, "c", 2).await;
    let before: Vec<String> = h
        .client
        .vms(Some("c"))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.host)
        .collect();
    let op = h
        .client
        .migrate_cluster(
            "c",
            &MigrateCluster {
                params: Default::default(),
                max_concurrent: Some(1),
            },
        )
        .await
        .unwrap();
    assert_eq!(op.kind, OperationKind::ClusterMigrate);
    let done = h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(done.steps[0].done, 2, "{done:?}");
    let after = h.client.vms(Some("c")).await.unwrap();
    for v in &after {
        assert!(!before.contains(&v.host), "{} still on {}", v.name, v.host);
        assert_eq!(v.state, VmState::Running);
    }
    // Each VM's move is an operation of its own.
    let ops = h.client.operations().await.unwrap();
    assert_eq!(ops.iter().filter(|o| o.kind == OperationKind::VmMigrate).count(), 2);
    // No room elsewhere (the hosts it left are in maintenance): refused, nothing moves.
    for host in &before {
        h.client.host_maintenance(host, true).await.unwrap();
    }
    let e = h
        .client
        .migrate_cluster("c", &MigrateCluster::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("cannot take its 2 VMs"), "{e}");
    assert_eq!(h.client.vms(Some("c")).await.unwrap(), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_mid_migration_finishes_it_exactly_once() {
    let mut h = Harness::start(Opts {
        hosts: 2,
        boot: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    deployed(&h, "r", 1).await;
    let before = vm(&h, "r-0").await;
    let dest = if before.host == "host1" { "host2" } else { "host1" };
    let op = h.client.migrate_vm("r-0", &to(dest)).await.unwrap();
    copying(&h).await;
    h.restart_controller().await;
    let done = h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(done.state, OperationState::Succeeded);
    let after = vm(&h, "r-0").await;
    assert_eq!(after.host, dest);
    // Exactly once: 2 vCPUs claimed on the destination, none left on the source.
    let c = claimed(&h).await;
    assert_eq!(c.iter().sum::<u32>(), 2, "{c:?}");
    assert!(h.keys("/migrations/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_stops_answering_after_the_switch_is_waited_for_never_guessed() {
    let mut h = Harness::start(Opts {
        hosts: 2,
        boot: Duration::from_secs(2),
        // Not down before the copy completes: a destination lost during the copy is undone.
        host_timeout: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    deployed(&h, "w", 1).await;
    let before = vm(&h, "w-0").await;
    let (dest, di) = if before.host == "host1" {
        ("host2", 1)
    } else {
        ("host1", 0)
    };
    let op = h.client.migrate_vm("w-0", &to(dest)).await.unwrap();
    copying(&h).await;
    h.agents[di].take().unwrap().kill();
    // The simulated source completes on its own; the destination cannot say whether the guest
    // runs there, so the source is not resumed and the VM stays where its record says.
    let op = wait_for(
        "the executor to wait for the destination",
        Duration::from_secs(20),
        async || {
            let op = h.client.operation(op.id).await.unwrap();
            op.steps
                .iter()
                .any(|s| s.message.contains(&format!("waiting for host {dest}")))
                .then_some(op)
        },
    )
    .await;
    assert_eq!(op.state, OperationState::Running);
    assert_eq!(vm(&h, "w-0").await.host, before.host);
    assert_eq!(
        h.client.migrations().await.unwrap()[0].step,
        shoal_model::MigrationStep::Switch
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_lost_during_the_copy_is_undone_and_the_vm_stays() {
    let mut h = Harness::start(Opts {
        hosts: 2,
        boot: Duration::from_secs(6),
        host_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    deployed(&h, "l", 1).await;
    let before = vm(&h, "l-0").await;
    let (dest, di) = if before.host == "host1" {
        ("host2", 1)
    } else {
        ("host1", 0)
    };
    let op = h.client.migrate_vm("l-0", &to(dest)).await.unwrap();
    copying(&h).await;
    h.agents[di].take().unwrap().kill();
    let e = h.client.wait(op.id, |_| {}).await.unwrap_err().to_string();
    assert!(
        e.contains("rolled back") && e.contains(&format!("host {dest}, the destination")),
        "{e}"
    );
    let after = vm(&h, "l-0").await;
    assert_eq!(
        (after.host.as_str(), after.state),
        (before.host.as_str(), VmState::Running)
    );
    assert!(h.keys("/migrations/").await.is_empty());
    assert_eq!(
        claimed(&h).await.iter().sum::<u32>(),
        2,
        "the destination's claim was given back"
    );
}
