//! Host failure with simulated hosts: detection on two channels, fencing, restarts elsewhere
//! keeping each VM's identity, capacity running short, a host that comes back, an isolated host
//! left alone, two hosts at once, and a controller restarted in the middle of an evacuation.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{agent_config, cluster, wait_for, Agent, Harness, Opts};
use shoal_model::power::HostPowerConfig;
use shoal_model::{HostState, Operation, OperationKind, OperationState, Vm, VmState};

fn opts(hosts: usize) -> Opts {
    Opts {
        hosts,
        host_timeout: Duration::from_millis(1500),
        persistent: true,
        ..Default::default()
    }
}

async fn deploy(h: &Harness, name: &str, size: u32, cpus: u32) -> Vec<Vm> {
    h.profile(&format!("p{cpus}"), "t", cpus, "256MiB").await;
    let op = h
        .client
        .create_cluster(&cluster(name, &format!("p{cpus}"), size))
        .await
        .unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    h.wait_peers().await;
    h.client.vms(Some(name)).await.unwrap()
}

fn index(host: &str) -> usize {
    host.trim_start_matches("host").parse::<usize>().unwrap() - 1
}

async fn host_state(h: &Harness, name: &str) -> HostState {
    h.client
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.name == name)
        .unwrap()
        .state
}

async fn evacuation(h: &Harness, host: &str) -> Option<Operation> {
    h.client
        .operations()
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.kind == OperationKind::HostEvacuate && o.target == host)
}

/// What every live agent runs, by VM uuid: each VM must be on exactly one host.
async fn running_copies(h: &Harness) -> HashMap<uuid::Uuid, Vec<String>> {
    let mut out: HashMap<uuid::Uuid, Vec<String>> = HashMap::new();
    for (i, a) in h.agents.iter().enumerate() {
        let Some(a) = a else { continue };
        let c = shoal_client::AgentClient::new(&a.address, None, Duration::from_secs(5));
        for v in c.list().await.unwrap().vms {
            if v.state == VmState::Running {
                out.entry(v.uuid).or_default().push(format!("host{}", i + 1));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_vms_restart_elsewhere_as_themselves_and_it_rejoins_empty() {
    let mut h = Harness::start(opts(3)).await;
    h.template("t").await;
    let before = deploy(&h, "web", 6, 1).await;
    let victim = before[0].host.clone();
    let on_victim: Vec<&Vm> = before.iter().filter(|v| v.host == victim).collect();
    assert!(!on_victim.is_empty());
    h.agents[index(&victim)].take().unwrap().kill();

    // Failed (both channels silent, its peers heard), fenced by its lease, then evacuated.
    wait_for("the host to be declared failed", Duration::from_secs(10), async || {
        (host_state(&h, &victim).await == HostState::Failed).then_some(())
    })
    .await;
    let hosts = h.client.hosts().await.unwrap();
    let reason = hosts
        .iter()
        .find(|x| x.name == victim)
        .unwrap()
        .reason
        .clone()
        .unwrap_or_default();
    assert!(reason.starts_with("failed "), "{reason}");
    let op = wait_for("the evacuation to succeed", Duration::from_secs(20), async || {
        evacuation(&h, &victim)
            .await
            .filter(|o| o.state == OperationState::Succeeded)
    })
    .await;
    let fence = &op.steps[0];
    assert!(fence.message.contains("lease"), "{op:?}");
    let restart = &op.steps[1];
    assert_eq!(
        (restart.done, restart.total),
        (on_victim.len() as u64, on_victim.len() as u64)
    );
    assert!(restart.message.contains("from its template"), "{}", restart.message);
    let after = h.client.vms(Some("web")).await.unwrap();
    for v in &on_victim {
        let now = after.iter().find(|a| a.name == v.name).unwrap();
        assert_eq!((now.uuid, now.ip, now.mac), (v.uuid, v.ip, v.mac), "identity kept");
        assert_ne!(now.host, victim);
        assert_eq!(now.state, VmState::Running);
    }
    let copies = running_copies(&h).await;
    assert!(copies.values().all(|hosts| hosts.len() == 1), "{copies:?}");
    assert_eq!(copies.len(), 6);
    assert_eq!(h.client.cluster("web").await.unwrap().vms_running, 6);

    // It comes back with its old VMs (they outlived the agent): they are removed, never run.
    let i = index(&victim);
    let url = h.ctl.as_ref().unwrap().url.clone();
    h.agents[i] =
        Some(Agent::start_persistent(agent_config(&url, h.dir.path(), i + 1, &opts(3)), Default::default()).await);
    wait_for("the host to rejoin empty", Duration::from_secs(15), async || {
        (host_state(&h, &victim).await == HostState::Up).then_some(())
    })
    .await;
    let c = shoal_client::AgentClient::new(&h.agents[i].as_ref().unwrap().address, None, Duration::from_secs(5));
    assert!(c.list().await.unwrap().vms.is_empty());
    assert!(h.keys("/failures/").await.is_empty());
    let copies = running_copies(&h).await;
    assert!(copies.values().all(|hosts| hosts.len() == 1), "{copies:?}");
    let hosts = h.client.hosts().await.unwrap();
    let back = hosts.iter().find(|x| x.name == victim).unwrap();
    assert_eq!((back.vms, back.used_cpus), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_that_fit_nowhere_wait_unplaced_until_capacity_returns_by_priority() {
    let mut h = Harness::start(Opts { cpus: 4, ..opts(2) }).await;
    h.template("t").await;
    // 2 × 4 vCPU: each host full with one 2-vCPU VM of each cluster.
    h.profile("p2", "t", 2, "256MiB").await;
    for (name, priority) in [("low", 0), ("high", 10)] {
        let mut req = cluster(name, "p2", 2);
        req.ha_priority = Some(priority);
        req.anti_affinity = shoal_model::AntiAffinity::Host;
        let op = h.client.create_cluster(&req).await.unwrap();
        assert_eq!(
            h.client.wait(op.id, |_| {}).await.unwrap().state,
            OperationState::Succeeded
        );
    }
    h.wait_peers().await;
    h.agents[0].take().unwrap().kill();
    let op = wait_for(
        "the evacuation to report unplaced VMs",
        Duration::from_secs(20),
        async || {
            evacuation(&h, "host1")
                .await
                .filter(|o| o.steps[1].message.contains("unplaced"))
        },
    )
    .await;
    assert_eq!(op.state, OperationState::Running);
    // Anti-affinity keeps each cluster's second VM off host2: nothing moves.
    assert!(
        op.steps[1].message.contains("low-") && op.steps[1].message.contains("high-"),
        "{op:?}"
    );

    // A new host joins: the high-priority VM goes first, and it is the one that fits.
    let url = h.ctl.as_ref().unwrap().url.clone();
    let mut o = opts(3);
    o.cpus = 2;
    h.agents.push(Some(
        Agent::start_persistent(agent_config(&url, h.dir.path(), 3, &o), Default::default()).await,
    ));
    let high = wait_for(
        "the high-priority VM to run on host3",
        Duration::from_secs(20),
        async || {
            h.client
                .vms(Some("high"))
                .await
                .unwrap()
                .into_iter()
                .find(|v| v.host == "host3" && v.state == VmState::Running)
        },
    )
    .await;
    assert!(high.name.starts_with("high-"));
    let op = evacuation(&h, "host1").await.unwrap();
    assert_eq!(op.state, OperationState::Running, "low's VM still waits: {op:?}");
    assert!(
        op.steps[1].message.contains("unplaced") && op.steps[1].message.contains("low-"),
        "{op:?}"
    );
}

/// A TCP relay the test can cut: the one path from an agent to the controller.
struct Relay {
    url: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(to: &str) -> Relay {
        let to = to.trim_start_matches("http://").to_string();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = cut.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut a, _)) = l.accept().await else { return };
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let (to, c) = (to.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(mut b) = tokio::net::TcpStream::connect(&to).await else {
                        return;
                    };
                    // Copies until either side closes, or the relay is cut (checked each 100 ms).
                    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
                    let watch = async {
                        while !c.load(std::sync::atomic::Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, _ = watch => {} }
                });
            }
        });
        Relay { url, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_the_controller_only_is_isolated_and_keeps_its_vms() {
    let mut h = Harness::start(opts(2)).await;
    h.template("t").await;
    // host3 reaches the controller through a relay the test cuts.
    let url = h.ctl.as_ref().unwrap().url.clone();
    let relay = Relay::start(&url).await;
    h.agents.push(Some(
        Agent::start_persistent(agent_config(&relay.url, h.dir.path(), 3, &opts(3)), Default::default()).await,
    ));
    let vms = deploy(&h, "web", 3, 1).await;
    let on3: Vec<&Vm> = vms.iter().filter(|v| v.host == "host3").collect();
    assert!(!on3.is_empty(), "{vms:?}");
    relay.set_cut(true);
    wait_for("host3 to be isolated", Duration::from_secs(10), async || {
        (host_state(&h, "host3").await == HostState::Isolated).then_some(())
    })
    .await;
    let hosts = h.client.hosts().await.unwrap();
    let reason = hosts
        .iter()
        .find(|x| x.name == "host3")
        .unwrap()
        .reason
        .clone()
        .unwrap_or_default();
    assert!(reason.contains("its peers reach it"), "{reason}");
    // Well past its lease and the fence margin: still isolated, nothing restarted or fenced.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(host_state(&h, "host3").await, HostState::Isolated);
    assert!(evacuation(&h, "host3").await.is_none());
    assert!(h.keys("/failures/").await.is_empty());
    let copies = running_copies(&h).await;
    for v in &on3 {
        assert_eq!(copies.get(&v.uuid), Some(&vec!["host3".to_string()]), "{copies:?}");
    }
    relay.set_cut(false);
    wait_for("host3 to be up again", Duration::from_secs(10), async || {
        (host_state(&h, "host3").await == HostState::Up).then_some(())
    })
    .await;
    let after = h.client.vms(Some("web")).await.unwrap();
    assert!(after.iter().all(|v| v.state == VmState::Running), "{after:?}");
    assert_eq!(after.iter().filter(|v| v.host == "host3").count(), on3.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_failing_at_once_are_fenced_by_power_and_a_restarted_controller_finishes_the_job() {
    let mut h = Harness::start(opts(4)).await;
    h.template("t").await;
    let log = h.dir.path().join("power.log");
    for i in 1..=4 {
        h.client
            .configure_host_power(
                &format!("host{i}"),
                &HostPowerConfig {
                    power_off_command: Some(format!("echo off $SHOAL_HOST >> {}", log.display())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let vms = deploy(&h, "web", 8, 1).await;
    h.agents[0].take().unwrap().kill();
    h.agents[1].take().unwrap().kill();
    // Each one's peers include the other dead one: no lease guarantee, but power cuts them.
    wait_for("both to be fenced", Duration::from_secs(15), async || {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        (log.contains("off host1") && log.contains("off host2")).then_some(())
    })
    .await;
    h.restart_controller().await;
    for host in ["host1", "host2"] {
        let op = wait_for("the evacuation to succeed", Duration::from_secs(30), async || {
            evacuation(&h, host)
                .await
                .filter(|o| o.state == OperationState::Succeeded)
        })
        .await;
        assert!(op.steps[0].message.contains("power-off"), "{op:?}");
    }
    let after = h.client.vms(Some("web")).await.unwrap();
    assert_eq!(after.len(), vms.len());
    assert!(
        after
            .iter()
            .all(|v| v.state == VmState::Running && (v.host == "host3" || v.host == "host4")),
        "{after:?}"
    );
    let copies = running_copies(&h).await;
    assert_eq!(copies.len(), vms.len());
    assert!(copies.values().all(|hosts| hosts.len() == 1), "{copies:?}");
    // A restart may run a power-off again (its outcome was not recorded yet): never a host
    // that did not fail.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.lines().all(|l| l == "off host1" || l == "off host2"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_that_cannot_be_fenced_is_not_restarted_and_says_why() {
    let mut h = Harness::start(opts(3)).await;
    h.template("t").await;
    deploy(&h, "web", 3, 1).await;
    h.agents[0].take().unwrap().kill();
    h.agents[1].take().unwrap().kill();
    // host1's peers are host2 (dead too) and host3: host1 may still reach host2, so its lease
    // proves nothing, and there is no power command.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(h.keys("/failures/").await.is_empty());
    assert_eq!(host_state(&h, "host1").await, HostState::Down);
    let hosts = h.client.hosts().await.unwrap();
    let reason = hosts
        .iter()
        .find(|x| x.name == "host1")
        .unwrap()
        .reason
        .clone()
        .unwrap_or_default();
    assert!(
        reason.contains("cannot tell a failed host from one cut off") && reason.contains("host2"),
        "{reason}"
    );
    let vms = h.client.vms(Some("web")).await.unwrap();
    let v = vms.iter().find(|v| v.host == "host1").unwrap();
    assert_eq!(v.state, VmState::Unknown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_returns_while_its_vms_restart_elsewhere_rejoins_empty() {
    let mut h = Harness::start(Opts {
        boot: Duration::from_secs(2),
        ..opts(3)
    })
    .await;
    h.template("t").await;
    let before = deploy(&h, "web", 6, 1).await;
    let victim = before[0].host.clone();
    let i = index(&victim);
    h.agents[i].take().unwrap().kill();
    wait_for("the evacuation to start", Duration::from_secs(15), async || {
        evacuation(&h, &victim).await
    })
    .await;
    // Back at once, with its old VMs, while theirs are still booting elsewhere.
    let url = h.ctl.as_ref().unwrap().url.clone();
    let o = Opts {
        boot: Duration::from_secs(2),
        ..opts(3)
    };
    h.agents[i] = Some(Agent::start_persistent(agent_config(&url, h.dir.path(), i + 1, &o), o.boot).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let copies = running_copies(&h).await;
        assert!(
            copies.values().all(|hosts| hosts.len() == 1),
            "a VM runs twice: {copies:?}"
        );
        let done = evacuation(&h, &victim).await.unwrap().state == OperationState::Succeeded;
        if done && host_state(&h, &victim).await == HostState::Up && copies.len() == 6 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not settled: {copies:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let vms = h.client.vms(Some("web")).await.unwrap();
    assert!(
        vms.iter().all(|v| v.state == VmState::Running && v.host != victim),
        "{vms:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_dies_mid_migration_is_undone_then_evacuated() {
    let mut h = Harness::start(Opts {
        boot: Duration::from_secs(3),
        ..opts(3)
    })
    .await;
    h.template("t").await;
    let before = deploy(&h, "m", 2, 1).await;
    let to = |host: &str| shoal_model::MigrateVm {
        to: Some(host.into()),
        params: Default::default(),
    };
    let copying = async |h: &Harness| {
        wait_for("the copy to start", Duration::from_secs(20), async || {
            let m = h.client.migrations().await.unwrap();
            m.iter()
                .any(|m| m.step == shoal_model::MigrationStep::Copy)
                .then_some(())
        })
        .await
    };
    // The source dies during the copy: the move is undone, then the VM is evacuated.
    let v = &before[0];
    let dest = ["host1", "host2", "host3"].into_iter().find(|x| *x != v.host).unwrap();
    let op = h.client.migrate_vm(&v.name, &to(dest)).await.unwrap();
    copying(&h).await;
    h.agents[index(&v.host)].take().unwrap().kill();
    let e = h.client.wait(op.id, |_| {}).await.unwrap_err().to_string();
    assert!(e.contains("rolled back"), "{e}");
    wait_for("the evacuation to succeed", Duration::from_secs(30), async || {
        evacuation(&h, &v.host)
            .await
            .filter(|o| o.state == OperationState::Succeeded)
    })
    .await;
    let now = h.client.vm(&v.name).await.unwrap();
    assert!(now.state == VmState::Running && now.host != v.host, "{now:?}");
    assert!(h.keys("/migrations/").await.is_empty());
    let copies = running_copies(&h).await;
    assert_eq!(copies.get(&v.uuid).map(Vec::len), Some(1), "{copies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_fenced_after_the_switch_gives_the_vm_back_to_its_source() {
    // The copy completes before the destination is missed (2 s < 4 s): the switch is asked of
    // a destination that is gone, and only its fencing settles where the guest runs.
    let mut h = Harness::start(Opts {
        boot: Duration::from_secs(2),
        host_timeout: Duration::from_secs(4),
        ..opts(3)
    })
    .await;
    h.template("t").await;
    let before = deploy(&h, "m", 1, 1).await;
    let w = &before[0];
    let dest = ["host1", "host2", "host3"].into_iter().find(|x| *x != w.host).unwrap();
    let to = shoal_model::MigrateVm {
        to: Some(dest.into()),
        params: Default::default(),
    };
    let op = h.client.migrate_vm(&w.name, &to).await.unwrap();
    wait_for("the copy to start", Duration::from_secs(20), async || {
        let m = h.client.migrations().await.unwrap();
        m.iter()
            .any(|m| m.step == shoal_model::MigrationStep::Copy)
            .then_some(())
    })
    .await;
    h.agents[index(dest)].take().unwrap().kill();
    let e = h.client.wait(op.id, |_| {}).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "host {dest}, the destination, failed after the switch and was fenced"
        )),
        "{e}"
    );
    let after = h.client.vm(&w.name).await.unwrap();
    assert_eq!((after.host.as_str(), after.state), (w.host.as_str(), VmState::Running));
    assert!(h.keys("/migrations/").await.is_empty());
    let copies = running_copies(&h).await;
    assert_eq!(copies.get(&w.uuid), Some(&vec![w.host.clone()]), "{copies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_failing_one_after_the_other_each_rejoin_empty() {
    let mut h = Harness::start(Opts { cpus: 16, ..opts(3) }).await;
    h.template("t").await;
    let before = deploy(&h, "web", 6, 1).await;
    // The first dies; its VMs go to the other two.
    let first = before[0].host.clone();
    h.agents[index(&first)].take().unwrap().kill();
    wait_for("the first evacuation", Duration::from_secs(20), async || {
        evacuation(&h, &first)
            .await
            .filter(|o| o.state == OperationState::Succeeded)
    })
    .await;
    // Then one that took some of them: the same VMs, on a second failed host.
    let moved = h.client.vm(&before[0].name).await.unwrap();
    let second = moved.host.clone();
    h.agents[index(&second)].take().unwrap().kill();
    wait_for("the second evacuation", Duration::from_secs(20), async || {
        evacuation(&h, &second)
            .await
            .filter(|o| o.state == OperationState::Succeeded)
    })
    .await;
    // The first comes back holding its stale copies: removed, and it rejoins, while the second
    // (which listed some of the same VMs when it died) stays failed.
    let i = index(&first);
    let url = h.ctl.as_ref().unwrap().url.clone();
    h.agents[i] =
        Some(Agent::start_persistent(agent_config(&url, h.dir.path(), i + 1, &opts(3)), Default::default()).await);
    wait_for("the first host to rejoin", Duration::from_secs(20), async || {
        (host_state(&h, &first).await == HostState::Up).then_some(())
    })
    .await;
    assert_eq!(host_state(&h, &second).await, HostState::Failed);
    let copies = running_copies(&h).await;
    assert_eq!(copies.len(), 6, "{copies:?}");
    assert!(copies.values().all(|hosts| hosts.len() == 1), "{copies:?}");
}
