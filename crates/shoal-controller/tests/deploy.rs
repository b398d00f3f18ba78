//! Deployment, scaling and deletion of virtual clusters through the API, against an in-process
//! controller and simulated hosts talking real HTTP.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{cluster, Harness, Opts};
use shoal_model::{AntiAffinity, OperationState, Placement, VmState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_a_cluster_with_fresh_identities_in_four_steps() {
    let h = Harness::start(Opts::default()).await;
    h.template("debian").await;
    h.profile("small", "debian", 1, "512MiB").await;
    let op = h.client.create_cluster(&cluster("web", "small", 7)).await.unwrap();
    let names: Vec<&str> = op.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["prepare_images", "configure_vms", "choose_hosts", "execute"]);
    let op = h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded);
    assert!(op.steps.iter().all(|s| s.done == 7 && s.total == 7), "{op:?}");

    let vms = h.client.vms(Some("web")).await.unwrap();
    assert_eq!(vms.len(), 7);
    let c = h.client.cluster("web").await.unwrap();
    assert_eq!(c.vms_running, 7);
    let mut names = HashSet::new();
    let (mut ips, mut macs, mut uuids) = (HashSet::new(), HashSet::new(), HashSet::new());
    for vm in &vms {
        assert_eq!(vm.state, VmState::Running);
        assert_eq!(vm.name, format!("web-{}", vm.index));
        assert!(
            c.cluster.subnet.contains(vm.ip),
            "{} outside {}",
            vm.ip,
            c.cluster.subnet
        );
        assert_ne!(vm.ip, c.cluster.subnet.gateway());
        assert!(vm.mac.to_string().starts_with("52:54:00:"));
        names.insert(vm.name.clone());
        ips.insert(vm.ip);
        macs.insert(vm.mac);
        uuids.insert(vm.uuid);
    }
    assert_eq!((names.len(), ips.len(), macs.len(), uuids.len()), (7, 7, 7, 7));
    // Spread over three hosts: 3, 2, 2.
    let hosts = h.client.hosts().await.unwrap();
    let mut per: Vec<u32> = hosts.iter().map(|x| x.vms).collect();
    per.sort();
    assert_eq!(per, vec![2, 2, 3]);
    assert_eq!(hosts.iter().map(|x| x.used_cpus).sum::<u32>(), 7);
    assert_eq!(hosts.iter().map(|x| x.used_memory_mib).sum::<u64>(), 7 * 512);

    // A second cluster gets its own subnet; no address is shared.
    let op = h.client.create_cluster(&cluster("db", "small", 2)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let db = h.client.cluster("db").await.unwrap();
    assert!(!db.cluster.subnet.overlaps(&c.cluster.subnet));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_fills_hosts_and_anti_affinity_spreads_one_per_host() {
    let h = Harness::start(Opts {
        hosts: 4,
        cpus: 4,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let mut req = cluster("packed", "p", 6);
    req.placement = Placement::Pack;
    let op = h.client.create_cluster(&req).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let used: HashSet<String> = h
        .client
        .vms(Some("packed"))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.host)
        .collect();
    assert_eq!(used.len(), 2, "pack should use 2 hosts of 4 vCPU for 6 VMs: {used:?}");

    // One host is now full: three can take a VM each.
    let mut req = cluster("aa", "p", 3);
    req.anti_affinity = AntiAffinity::Host;
    let op = h.client.create_cluster(&req).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let used: HashSet<String> = h
        .client
        .vms(Some("aa"))
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.host)
        .collect();
    assert_eq!(used.len(), 3);

    let mut req = cluster("aa2", "p", 4);
    req.anti_affinity = AntiAffinity::Host;
    let e = h.client.create_cluster(&req).await.unwrap_err();
    assert_eq!(e.code(), Some("insufficient_capacity"));
    assert!(
        e.to_string().contains("anti-affinity by host: needs 4 hosts") && e.to_string().contains("only 3 have"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_larger_than_free_capacity_creates_nothing() {
    let h = Harness::start(Opts {
        hosts: 4,
        cpus: 4,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 2, "512MiB").await;
    let before_ipam = h.keys("/ipam/").await;
    let e = h.client.create_cluster(&cluster("big", "p", 14)).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert_eq!(e.code(), Some("insufficient_capacity"));
    assert!(e.to_string().contains("needs 12 vCPU more than free on 4 hosts"), "{e}");
    assert!(h.client.clusters().await.unwrap().is_empty());
    assert!(h.client.vms(None).await.unwrap().is_empty());
    assert_eq!(h.keys("/ipam/").await, before_ipam);
    assert!(h.keys("/operations/").await.is_empty());
    assert!(h.client.hosts().await.unwrap().iter().all(|x| x.used_cpus == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_overcommit() {
    let h = Harness::start(Opts {
        hosts: 3,
        cpus: 4,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    // 12 vCPU in all; eight requests of 5 each: at most two can fit.
    let results = futures::future::join_all((0..8).map(|i| {
        let c = h.client.clone();
        async move { c.create_cluster(&cluster(&format!("c{i}"), "p", 5)).await }
    }))
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 2, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), Some("insufficient_capacity"), "{r}");
    }
    for h in h.client.hosts().await.unwrap() {
        assert!(h.used_cpus <= h.cpus, "{h:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_down_and_delete_free_everything() {
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let op = h.client.create_cluster(&cluster("web", "p", 3)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let first: Vec<_> = h.client.vms(Some("web")).await.unwrap();

    let op = h.client.scale_cluster("web", 6).await.unwrap();
    assert_eq!(op.vms, vec!["web-3", "web-4", "web-5"]);
    h.client.wait(op.id, |_| {}).await.unwrap();
    let grown = h.client.vms(Some("web")).await.unwrap();
    assert_eq!(grown.len(), 6);
    // Existing VMs keep their identity.
    for vm in &first {
        assert!(grown
            .iter()
            .any(|g| g.uuid == vm.uuid && g.ip == vm.ip && g.mac == vm.mac));
    }

    let op = h.client.scale_cluster("web", 2).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let shrunk = h.client.vms(Some("web")).await.unwrap();
    let names: Vec<&str> = shrunk.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["web-0", "web-1"]);
    assert_eq!(h.keys("/ipam/ips/").await.len(), 2);
    assert_eq!(
        h.client.hosts().await.unwrap().iter().map(|x| x.used_cpus).sum::<u32>(),
        2
    );

    let op = h.client.delete_cluster("web").await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(h.client.cluster("web").await.unwrap_err().status(), Some(404));
    assert!(h.keys("/ipam/").await.is_empty(), "{:?}", h.keys("/ipam/").await);
    assert!(h.keys("/vms/").await.is_empty());
    assert!(h
        .client
        .hosts()
        .await
        .unwrap()
        .iter()
        .all(|x| x.used_cpus == 0 && x.vms == 0));
    // The agents no longer run anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in h.agents.iter().flatten() {
        let c = shoal_client::AgentClient::new(&a.address, None, Duration::from_secs(5));
        assert!(c.list().await.unwrap().vms.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_value_and_changes_nothing() {
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let rev = h.controller().db.revision().await.unwrap();
    let c = &h.client;

    let e = c.create_cluster(&cluster("Bad_Name", "p", 1)).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(400), Some("invalid")));
    assert!(e.to_string().contains("\"Bad_Name\""), "{e}");
    let e = c.create_cluster(&cluster("ok", "p", 0)).await.unwrap_err();
    assert!(e.to_string().contains("invalid cluster size 0"), "{e}");
    let e = c.create_cluster(&cluster("ok", "nope", 1)).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert!(e.to_string().contains("profile \"nope\" not found"), "{e}");
    let e = c.scale_cluster("ghost", 3).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    let e = c.vm("ghost-0").await.unwrap_err();
    assert_eq!(e.status(), Some(404));

    let mut bad = shoal_model::api::CreateProfile {
        name: "q".into(),
        template: Some("nope".into()),
        cpus: Some(1),
        memory: Some("1GiB".into()),
        ..Default::default()
    };
    let e = c.create_profile(&bad).await.unwrap_err();
    assert!(e.to_string().contains("template \"nope\" not found"), "{e}");
    bad.template = Some("t".into());
    bad.memory = Some("12XB".into());
    let e = c.create_profile(&bad).await.unwrap_err();
    assert!(e.to_string().contains("invalid size \"12XB\""), "{e}");
    bad.memory = Some("1GiB".into());
    bad.cpus = Some(0);
    assert!(c
        .create_profile(&bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("invalid cpus 0"));
    bad.cpus = Some(1);
    bad.parent = Some("nope".into());
    assert!(c
        .create_profile(&bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("parent profile \"nope\" not found"));
    bad.parent = None;
    bad.name = "p".into();
    let e = c.create_profile(&bad).await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(409), Some("already_exists")));

    let f = h.dir.path().join("x.img");
    std::fs::write(&f, b"x").unwrap();
    let e = c
        .import_template("t", &shoal_client::TemplateFiles::disk(&f))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("already_exists"));
    let e = c
        .import_template("Bad", &shoal_client::TemplateFiles::disk(&f))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("invalid"));
    std::fs::write(&f, b"").unwrap();
    let e = c
        .import_template("empty", &shoal_client::TemplateFiles::disk(&f))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");

    assert_eq!(
        h.controller().db.revision().await.unwrap(),
        rev,
        "a refused request wrote to the store"
    );
    // Nothing stray in the template directory (disks go to the image store) nor in the store.
    let files: Vec<_> = std::fs::read_dir(h.config.data_dir.join("templates"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 0, "{files:?}");
    let refs = h.controller().images.refs().unwrap();
    assert_eq!(refs.keys().collect::<Vec<_>>(), vec!["template/t"], "{refs:?}");
}

const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK5l a@example";
const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GK5l b@example";

/// A profile's login user, keys and user data reach its clusters; a cluster adds keys and may
/// bring its own user data and user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_settings_flow_from_profiles_to_clusters() {
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    let c = &h.client;
    let p = c
        .create_profile(&shoal_model::api::CreateProfile {
            name: "p".into(),
            template: Some("t".into()),
            cpus: Some(1),
            memory: Some("256MiB".into()),
            user: Some("ops".into()),
            ssh_keys: vec![KEY_A.into()],
            user_data: Some("#cloud-config\npackages: [htop]\n".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(p.effective.user.as_deref(), Some("ops"));
    assert_eq!(p.effective.ssh_keys, vec![KEY_A.to_string()]);
    // A child inherits the user and adds its keys to its parent's.
    let child = c
        .create_profile(&shoal_model::api::CreateProfile {
            name: "child".into(),
            parent: Some("p".into()),
            ssh_keys: vec![KEY_B.into(), KEY_A.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(child.effective.ssh_keys, vec![KEY_A.to_string(), KEY_B.to_string()]);
    assert_eq!(child.effective.user.as_deref(), Some("ops"));

    let mut req = cluster("web", "p", 1);
    req.ssh_keys = vec![KEY_B.into()];
    req.user_data = Some("#!/bin/sh\necho hi\n".into());
    c.create_cluster(&req).await.unwrap();
    let web = c.cluster("web").await.unwrap().cluster;
    assert_eq!(web.shape.ssh_keys, vec![KEY_A.to_string(), KEY_B.to_string()]);
    assert_eq!(web.shape.user.as_deref(), Some("ops"));
    assert_eq!(web.shape.user_data.as_deref(), Some("#!/bin/sh\necho hi\n"));
}

/// Bad guest settings are refused naming the value, on profiles and clusters, and nothing is
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_guest_settings_are_refused_and_change_nothing() {
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let rev = h.controller().db.revision().await.unwrap();
    let c = &h.client;
    let too_big = format!("#!/bin/sh\n{}", "#".repeat(shoal_model::guest::MAX_USER_DATA));
    // (user data, user, SSH keys, what the error must say)
    type Case<'a> = (Option<&'a str>, Option<&'a str>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (
            Some("packages: [htop]\n"),
            None,
            vec![],
            "is not a format cloud-init reads",
        ),
        (Some("#cloud-config\nruncmd: [oops\n"), None, vec![], "not valid YAML"),
        (Some("#cloud-config\n- a\n"), None, vec![], "not a mapping"),
        (Some(&too_big), None, vec![], "over the limit of 65536 bytes"),
        (None, Some("Root"), vec![], "invalid user name \"Root\""),
        (None, Some("root"), vec![], "invalid user name \"root\""),
        (None, None, vec!["ssh-ed25519 notbase64!"], "invalid SSH public key"),
        (None, None, vec!["hello world"], "unknown key type"),
    ];
    for (user_data, user, keys, want) in cases {
        let keys: Vec<String> = keys.into_iter().map(String::from).collect();
        let e = c
            .create_profile(&shoal_model::api::CreateProfile {
                name: "q".into(),
                template: Some("t".into()),
                cpus: Some(1),
                memory: Some("256MiB".into()),
                user_data: user_data.map(String::from),
                user: user.map(String::from),
                ssh_keys: keys.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(400), Some("invalid")), "{e}");
        assert!(e.to_string().contains(want), "profile: want {want:?}: {e}");
        let mut req = cluster("web", "p", 1);
        req.user_data = user_data.map(String::from);
        req.user = user.map(String::from);
        req.ssh_keys = keys;
        let e = c.create_cluster(&req).await.unwrap_err();
        assert_eq!((e.status(), e.code()), (Some(400), Some("invalid")), "{e}");
        assert!(e.to_string().contains(want), "cluster: want {want:?}: {e}");
    }
    assert_eq!(
        h.controller().db.revision().await.unwrap(),
        rev,
        "a refused request wrote to the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_use_profiles_and_templates_cannot_be_deleted() {
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    h.client
        .create_profile(&shoal_model::api::CreateProfile {
            name: "child".into(),
            parent: Some("p".into()),
            cpus: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    let op = h.client.create_cluster(&cluster("web", "child", 1)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();

    let e = h.client.delete_template("t").await.unwrap_err();
    assert_eq!(e.code(), Some("in_use"));
    assert!(
        e.to_string().contains("profiles [p]") && e.to_string().contains("clusters [web]"),
        "{e}"
    );
    let e = h.client.delete_profile("p").await.unwrap_err();
    assert!(e.to_string().contains("child profiles [child]"), "{e}");
    let e = h.client.delete_profile("child").await.unwrap_err();
    assert!(e.to_string().contains("clusters [web]"), "{e}");

    let op = h.client.delete_cluster("web").await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    h.client.delete_profile("child").await.unwrap();
    h.client.delete_profile("p").await.unwrap();
    h.client.delete_template("t").await.unwrap();
    assert!(h.client.templates().await.unwrap().is_empty());
    let files: Vec<_> = std::fs::read_dir(h.config.data_dir.join("templates"))
        .unwrap()
        .collect();
    assert!(files.is_empty(), "template file left behind: {files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_of_a_host_that_vanishes_mid_deployment_are_placed_elsewhere() {
    let mut h = Harness::start(Opts {
        hosts: 3,
        boot: Duration::from_millis(1500),
        host_timeout: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let op = h.client.create_cluster(&cluster("web", "p", 6)).await.unwrap();
    // host1 dies while its VMs are booting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.agents[0].take().unwrap().kill();
    let op = h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded);
    let vms = h.client.vms(Some("web")).await.unwrap();
    assert_eq!(vms.len(), 6);
    assert!(
        vms.iter().all(|v| v.state == VmState::Running && v.host != "host1"),
        "{vms:?}"
    );
    let hosts = h.client.hosts().await.unwrap();
    let h1 = hosts.iter().find(|x| x.name == "host1").unwrap();
    // Down, or failed once its peers confirm it: either way it takes nothing.
    assert!(
        matches!(h1.state, shoal_model::HostState::Down | shoal_model::HostState::Failed),
        "{h1:?}"
    );
    assert_eq!((h1.used_cpus, h1.vms), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_that_cannot_finish_is_rolled_back_without_leaks() {
    let mut h = Harness::start(Opts {
        hosts: 2,
        cpus: 3,
        boot: Duration::from_millis(1500),
        host_timeout: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    // 6 vCPU needed, 6 available: when a host dies its VMs have nowhere to go.
    let op = h.client.create_cluster(&cluster("web", "p", 6)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.agents[0].take().unwrap().kill();
    let e = h.client.wait(op.id, |_| {}).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("went down before the VM started") && msg.contains("rolled back"),
        "{msg}"
    );
    // The rollback removes every VM and then the cluster itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while h.client.cluster("web").await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "cluster not rolled back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        h.keys("/ipam/").await.is_empty(),
        "leaked: {:?}",
        h.keys("/ipam/").await
    );
    assert!(h.keys("/vms/").await.is_empty());
    let alive = h
        .client
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.name == "host2")
        .unwrap();
    assert_eq!((alive.used_cpus, alive.vms), (0, 0));
    // And the surviving host runs nothing.
    let a = h.agents[1].as_ref().unwrap();
    let c = shoal_client::AgentClient::new(&a.address, None, Duration::from_secs(5));
    assert!(c.list().await.unwrap().vms.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_mid_deployment_finishes_the_job() {
    let mut h = Harness::start(Opts {
        hosts: 2,
        boot: Duration::from_millis(1000),
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let op = h.client.create_cluster(&cluster("web", "p", 4)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.restart_controller().await;
    let op = h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(op.state, OperationState::Succeeded);
    let vms = h.client.vms(Some("web")).await.unwrap();
    assert_eq!(vms.len(), 4);
    assert!(vms.iter().all(|v| v.state == VmState::Running));
    // Profiles, templates and the operation history survived.
    assert_eq!(h.client.profiles().await.unwrap().len(), 1);
    assert_eq!(h.client.templates().await.unwrap().len(), 1);
    assert_eq!(h.client.operations().await.unwrap().len(), 1);
    // Each agent runs exactly the VMs placed on it: no duplicates from the re-sent commands.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut total = 0;
    for a in h.agents.iter().flatten() {
        let c = shoal_client::AgentClient::new(&a.address, None, Duration::from_secs(5));
        total += c.list().await.unwrap().vms.len();
    }
    assert_eq!(total, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_anti_affinity_puts_one_vm_per_zone_and_names_the_rule_when_zones_run_out() {
    let h = Harness::start(Opts {
        hosts: 4,
        zones: 2,
        ..Default::default()
    })
    .await;
    h.template("debian").await;
    h.profile("small", "debian", 1, "512MiB").await;
    let hosts = h.client.hosts().await.unwrap();
    assert!(
        hosts.iter().all(|x| x.labels.contains_key("zone")),
        "hosts register their labels: {hosts:?}"
    );
    let zone_of: std::collections::HashMap<String, String> = hosts
        .iter()
        .map(|x| (x.name.clone(), x.labels["zone"].clone()))
        .collect();
    let mut req = cluster("ha", "small", 2);
    req.anti_affinity = AntiAffinity::Zone;
    let op = h.client.create_cluster(&req).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let zones: HashSet<String> = h
        .client
        .vms(Some("ha"))
        .await
        .unwrap()
        .iter()
        .map(|v| zone_of[&v.host].clone())
        .collect();
    assert_eq!(zones.len(), 2, "one VM per zone");
    // A third VM has no zone left: refused, naming the rule; nothing created.
    let rev = h.controller().db.revision().await.unwrap();
    let mut req = cluster("ha3", "small", 3);
    req.anti_affinity = AntiAffinity::Zone;
    let e = h.client.create_cluster(&req).await.unwrap_err();
    assert!(e.to_string().contains("zone"), "{e}");
    assert_eq!(h.controller().db.revision().await.unwrap(), rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overcommit_and_reservations_registered_by_hosts_bound_placement() {
    // Two hosts of 4 vCPU: 2x CPU overcommit less 1 reserved vCPU makes 7 placeable on each.
    let h = Harness::start(Opts {
        hosts: 2,
        cpus: 4,
        allocation: shoal_model::Allocation {
            cpu_overcommit: 2.0,
            reserved_cpus: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "256MiB").await;
    let op = h.client.create_cluster(&cluster("fourteen", "p", 14)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    let e = h.client.create_cluster(&cluster("one-more", "p", 1)).await.unwrap_err();
    assert!(e.to_string().contains("vCPU"), "{e}");
    let hosts = h.client.hosts().await.unwrap();
    assert!(
        hosts
            .iter()
            .all(|x| x.allocation.cpu_overcommit == 2.0 && x.allocation.reserved_cpus == 1),
        "{hosts:?}"
    );
    // A host claiming nonsense is refused when it registers.
    let bad = shoal_model::agent::RegisterRequest {
        name: "odd".into(),
        address: "http://127.0.0.1:9".into(),
        driver: "sim".into(),
        cpus: 4,
        memory_mib: 1024,
        join_token: None,
        labels: Default::default(),
        allocation: shoal_model::Allocation {
            cpu_overcommit: 0.5,
            ..Default::default()
        },
        underlay_ip: None,
        underlay_port: None,
        network_driver: None,
        guest_mtu: None,
    };
    let e = h.client.register_agent(&bad).await.unwrap_err();
    assert!(e.to_string().contains("cpu overcommit 0.5"), "{e}");
}
