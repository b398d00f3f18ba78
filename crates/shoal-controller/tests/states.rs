//! What the controller reports is what is true: VM, cluster and host states after a host dies,
//! while hosts are drained or in maintenance, and the rules that keep bad requests from
//! changing anything (scale to zero, resume past a host's placement capacity, drains that are
//! refused).

mod common;

use std::time::Duration;

use common::{cluster, wait_for, Harness, Opts};
use shoal_model::agent::RegisterRequest;
use shoal_model::{ClusterState, HostState, OperationState, VmState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_a_dead_host_show_unknown_and_their_cluster_degraded() {
    // Its lease fences it only after a minute here: until then its VMs are not restarted.
    let mut h = Harness::start(Opts {
        hosts: 3,
        host_timeout: Duration::from_millis(1500),
        fence_margin: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let op = h.client.create_cluster(&cluster("web", "p", 3)).await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    h.wait_peers().await;
    let victim = h.client.vms(Some("web")).await.unwrap()[0].host.clone();
    let i: usize = victim.trim_start_matches("host").parse::<usize>().unwrap() - 1;
    h.agents[i].take().unwrap().kill();

    let vms = wait_for(
        "the dead host's VMs to show unknown",
        Duration::from_secs(15),
        async || {
            let vms = h.client.vms(Some("web")).await.unwrap();
            vms.iter().any(|v| v.state == VmState::Unknown).then_some(vms)
        },
    )
    .await;
    for v in &vms {
        if v.host == victim {
            assert_eq!(v.state, VmState::Unknown, "{v:?}");
            let reason = v.reason.as_deref().unwrap_or_default();
            assert!(reason.contains(&victim) && reason.contains("down"), "{reason}");
        } else {
            assert_eq!(v.state, VmState::Running, "{v:?}");
        }
    }
    let shown = h
        .client
        .vm(&vms.iter().find(|v| v.host == victim).unwrap().name)
        .await
        .unwrap();
    assert_eq!(shown.state, VmState::Unknown);
    let c = wait_for("the cluster to be degraded", Duration::from_secs(10), async || {
        let c = h.client.cluster("web").await.unwrap();
        (c.cluster.state == ClusterState::Degraded).then_some(c)
    })
    .await;
    assert_eq!(c.vms_running, 2, "{c:?}");
    let hosts = h.client.hosts().await.unwrap();
    let state = hosts.iter().find(|x| x.name == victim).unwrap().state;
    assert!(matches!(state, HostState::Down | HostState::Failed), "{state:?}");
    // Both channels silent and its peers heard: failed (and being fenced) within a pass.
    wait_for("the host to be failed", Duration::from_secs(5), async || {
        let hosts = h.client.hosts().await.unwrap();
        (hosts.iter().find(|x| x.name == victim).unwrap().state == HostState::Failed).then_some(())
    })
    .await;
    let vms = h.client.vms(Some("web")).await.unwrap();
    assert!(
        vms.iter()
            .filter(|v| v.host == victim)
            .all(|v| v.state == VmState::Unknown),
        "not restarted before it is fenced: {vms:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_list_shows_draining_and_maintenance_and_unknown_hosts_are_refused() {
    let h = Harness::start(Opts::default()).await;
    let e = h.client.undrain_host("nosuch").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(e.to_string().contains("nosuch"), "{e}");
    let e = h.client.host_maintenance("nosuch", true).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");

    h.client.host_maintenance("host2", true).await.unwrap();
    h.client.drain_host("host3", &Default::default(), true).await.unwrap();
    let state = |hosts: &[shoal_model::Host], n: &str| hosts.iter().find(|x| x.name == n).unwrap().state;
    let hosts = h.client.hosts().await.unwrap();
    assert_eq!(state(&hosts, "host1"), HostState::Up);
    assert_eq!(state(&hosts, "host2"), HostState::Maintenance);
    assert_eq!(state(&hosts, "host3"), HostState::Draining);
    h.client.undrain_host("host3").await.unwrap();
    h.client.host_maintenance("host2", false).await.unwrap();
    let hosts = h.client.hosts().await.unwrap();
    assert!(hosts.iter().all(|x| x.state == HostState::Up), "{hosts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_drain_leaves_the_host_in_service() {
    let h = Harness::start(Opts::default()).await;
    // A host that never answers: its VM stays pending, and a VM not running cannot migrate.
    h.client
        .register_agent(&RegisterRequest {
            name: "qhost".into(),
            address: "http://127.0.0.1:9".into(),
            driver: "qemu/tcg".into(),
            cpus: 64,
            memory_mib: 1 << 20,
            underlay_ip: None,
            network_driver: None,
            underlay_port: None,
            guest_mtu: None,
            join_token: None,
            labels: Default::default(),
            allocation: Default::default(),
        })
        .await
        .unwrap();
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let mut req = cluster("big", "p", 1);
    req.placement = shoal_model::Placement::Pack;
    h.client.create_cluster(&req).await.unwrap();
    let vm = &h.client.vms(Some("big")).await.unwrap()[0];
    assert_eq!(vm.host, "qhost", "pack puts the VM on the largest host");
    let e = h
        .client
        .drain_host("qhost", &Default::default(), true)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot migrate VM big-0: it is still being created; nothing was moved"),
        "{e}"
    );
    let hosts = h.client.hosts().await.unwrap();
    assert_ne!(
        hosts.iter().find(|x| x.name == "qhost").unwrap().state,
        HostState::Draining
    );
    assert!(h.keys("/draining/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_to_zero_is_refused_like_creating_zero() {
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let op = h.client.create_cluster(&cluster("c", "p", 2)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let before = h.controller().db.revision().await.unwrap();
    for e in [
        h.client.scale_cluster("c", 0).await.unwrap_err(),
        h.client.create_cluster(&cluster("d", "p", 0)).await.unwrap_err(),
    ] {
        assert_eq!(e.status(), Some(400), "{e}");
        assert!(e.to_string().contains("invalid cluster size 0"), "{e}");
    }
    assert_eq!(
        h.controller().db.revision().await.unwrap(),
        before,
        "nothing was written"
    );
    assert_eq!(h.client.vms(Some("c")).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_obeys_the_same_capacity_rule_as_placement() {
    // One host of 4 vCPU with 1 held back: placement may hand out 3.
    let h = Harness::start(Opts {
        hosts: 1,
        cpus: 4,
        allocation: shoal_model::Allocation {
            reserved_cpus: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("one", "t", 1, "256MiB").await;
    h.profile("two", "t", 2, "256MiB").await;
    let op = h.client.create_cluster(&cluster("a", "one", 2)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let op = h.client.cluster_action("a", "suspend").await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    let op = h.client.create_cluster(&cluster("b", "two", 1)).await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    // 2 used + 2 to resume = 4: within the raw cores, beyond what placement hands out.
    let e = h.client.cluster_action("a", "resume").await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(
        e.to_string().contains("host1") && e.to_string().contains("resume"),
        "{e}"
    );
    let vms = h.client.vms(Some("a")).await.unwrap();
    assert!(
        vms.iter().all(|v| v.state == VmState::Suspended && !v.claimed),
        "{vms:?}"
    );
    // With room again, it resumes.
    let op = h.client.delete_cluster("b").await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let op = h.client.cluster_action("a", "resume").await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_operations_are_pruned_and_lists_are_paged() {
    let mut h = Harness::start(Opts::default()).await;
    h.config.operations_kept = 2;
    h.restart_controller().await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    for name in ["a", "b", "c", "d"] {
        let op = h.client.create_cluster(&cluster(name, "p", 1)).await.unwrap();
        h.client.wait(op.id, |_| {}).await.unwrap();
    }
    // Pruned within one pruning interval (10 s) of the controller's start.
    let ops = wait_for("pruning down to 2 operations", Duration::from_secs(20), async || {
        let ops = h.client.operations().await.unwrap();
        (ops.len() <= 2).then_some(ops)
    })
    .await;
    let targets: Vec<&str> = ops.iter().map(|o| o.target.as_str()).collect();
    assert_eq!(targets, vec!["c", "d"], "the newest stay");

    let http = reqwest::Client::new();
    let url = |q: &str| format!("http://{}/v1/clusters{q}", h.config.listen);
    let r = http.get(url("?offset=1&limit=2")).send().await.unwrap();
    assert_eq!(r.headers()["x-total-count"], "4");
    let page: Vec<serde_json::Value> = r.json().await.unwrap();
    let names: Vec<&str> = page.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["b", "c"]);
    let r = http.get(url("?limit=0")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid limit 0"));
}
