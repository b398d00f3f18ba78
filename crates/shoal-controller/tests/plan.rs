//! Plans through the API: placement previews with explanations, rebalancing and drains
//! executed against simulated hosts.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{cluster, Harness, Opts};
use shoal_model::{Placement, VmState};
use shoal_policy::rebalance::RebalanceOptions;

/// VMs per host once every VM runs where the store places it.
async fn settled(h: &Harness) -> HashMap<String, usize> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let vms = h.client.vms(None).await.unwrap();
        if vms.iter().all(|v| v.state == VmState::Running) {
            let mut per: HashMap<String, usize> = HashMap::new();
            for v in vms {
                *per.entry(v.host).or_default() += 1;
            }
            return per;
        }
        assert!(Instant::now() < end, "VMs never settled: {vms:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_explains_every_host_and_creates_nothing() {
    let h = Harness::start(Opts {
        hosts: 3,
        cpus: 4,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 2, "512MiB").await;
    let mut req = cluster("lab", "p", 4);
    req.placement = Placement::Pack;
    let e = h.client.plan_place(&req, true).await.unwrap();
    assert_eq!(e.error, None);
    assert_eq!(e.plan.len(), 4);
    assert_eq!(e.hosts.len(), 3);
    assert!(e.hosts.iter().all(|v| v.score.is_some()), "{e:?}");
    assert!(h.client.clusters().await.unwrap().is_empty());
    assert!(h.keys("/vms/").await.is_empty());

    // Too large: the binding constraint, still nothing created.
    let e = h.client.plan_place(&cluster("big", "p", 7), false).await.unwrap();
    assert_eq!(
        e.error.as_deref(),
        Some("needs 2 vCPU more than free on 3 hosts (12 free, 14 needed)")
    );
    assert!(e.hosts.is_empty() && e.plan.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_plans_then_moves_vms_through_the_reconciler() {
    let h = Harness::start(Opts {
        hosts: 3,
        cpus: 8,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "1GiB").await;
    let mut req = cluster("packed", "p", 8);
    req.placement = Placement::Pack;
    let op = h.client.create_cluster(&req).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(settled(&h).await.values().copied().max(), Some(8));

    // At most two migrations at once: the plan comes in waves, executed one after the other.
    let opts = RebalanceOptions {
        max_concurrent: 2,
        ..Default::default()
    };
    let plan = h.client.rebalance(&opts, false).await.unwrap();
    assert!(plan.after.total < plan.before.total, "{plan:?}");
    assert!(plan.moves.len() >= 5, "{plan:?}");
    let waves = plan.moves.iter().map(|m| m.wave).max().unwrap() + 1;
    assert!(waves >= 3, "{} moves in {waves} waves of at most 2", plan.moves.len());
    for w in 0..waves {
        assert!(plan.moves.iter().filter(|m| m.wave == w).count() <= 2);
    }
    assert_eq!(
        settled(&h).await.values().copied().max(),
        Some(8),
        "a plan alone moves nothing"
    );

    let applied = h.client.rebalance(&opts, true).await.unwrap();
    assert_eq!(applied.moves, plan.moves);
    let per = settled(&h).await;
    let mut counts: Vec<usize> = per.values().copied().collect();
    counts.sort();
    assert_eq!(counts, vec![2, 3, 3], "{per:?}");
    // Claims follow the VMs.
    for host in h.client.hosts().await.unwrap() {
        assert_eq!(host.vms as usize, per.get(&host.name).copied().unwrap_or(0), "{host:?}");
        assert_eq!(host.used_cpus as usize, per.get(&host.name).copied().unwrap_or(0));
    }
    // Planning again on the balanced state finds nothing to do.
    assert!(h.client.rebalance(&opts, false).await.unwrap().moves.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_empties_a_host_and_nothing_new_lands_on_it() {
    let h = Harness::start(Opts {
        hosts: 3,
        cpus: 8,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "1GiB").await;
    let op = h.client.create_cluster(&cluster("web", "p", 6)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(settled(&h).await.get("host1"), Some(&2));

    let plan = h
        .client
        .drain_host("host1", &RebalanceOptions::default(), true)
        .await
        .unwrap();
    assert_eq!(plan.moves.len(), 2);
    assert!(plan.moves.iter().all(|m| m.from == "host1"));
    let per = settled(&h).await;
    assert_eq!(per.get("host1"), None, "{per:?}");

    // A new cluster avoids the draining host, and the explanation says why.
    let e = h.client.plan_place(&cluster("more", "p", 2), true).await.unwrap();
    let v = e.hosts.iter().find(|v| v.host == "host1").unwrap();
    assert_eq!(
        v.rejected.as_ref().map(|r| r.to_string()).as_deref(),
        Some("state: host is draining")
    );
    let op = h.client.create_cluster(&cluster("more", "p", 2)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(settled(&h).await.get("host1"), None);

    let e = h
        .client
        .drain_host("nope", &RebalanceOptions::default(), true)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));

    h.client.undrain_host("host1").await.unwrap();
    let e = h.client.plan_place(&cluster("again", "p", 1), true).await.unwrap();
    assert!(e.hosts.iter().find(|v| v.host == "host1").unwrap().rejected.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_prefers_the_host_that_caches_the_template() {
    let mut h = Harness::start(Opts {
        hosts: 3,
        cpus: 8,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "1GiB").await;
    let hash = h.client.templates().await.unwrap()[0].hash.clone();
    let manifest = hash
        .strip_prefix("manifest:")
        .expect("templates live in the image store")
        .to_string();
    // Silence the simulated agents (they cache nothing) and speak for the hosts instead.
    for a in h.agents.iter_mut() {
        a.take().unwrap().kill();
    }
    let ctl = h.controller().clone();
    for (host, images) in [("host1", vec![]), ("host2", vec![]), ("host3", vec![manifest])] {
        ctl.record_heartbeat(
            host,
            shoal_model::agent::Heartbeat {
                images,
                ..Default::default()
            },
        );
    }
    let e = h.client.plan_place(&cluster("near", "p", 1), true).await.unwrap();
    assert_eq!(e.plan[0].host, "host3", "{e:?}");
    assert_eq!(e.plan[0].score.locality, 1.0);
    let v1 = e.hosts.iter().find(|v| v.host == "host1").unwrap();
    assert_eq!(v1.score.unwrap().locality, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_in_maintenance_keeps_its_vms_and_takes_no_new_ones() {
    let h = Harness::start(Opts {
        hosts: 2,
        cpus: 8,
        ..Default::default()
    })
    .await;
    h.template("t").await;
    h.profile("p", "t", 1, "1GiB").await;
    let op = h.client.create_cluster(&cluster("web", "p", 2)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    h.client.host_maintenance("host1", true).await.unwrap();
    assert_eq!(settled(&h).await.get("host1"), Some(&1), "its VM stays");
    let e = h.client.plan_place(&cluster("more", "p", 2), true).await.unwrap();
    let v = e.hosts.iter().find(|v| v.host == "host1").unwrap();
    assert!(
        v.rejected
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default()
            .contains("maintenance"),
        "{v:?}"
    );
    let op = h.client.create_cluster(&cluster("more", "p", 2)).await.unwrap();
    h.client.wait(op.id, |_| {}).await.unwrap();
    assert_eq!(settled(&h).await.get("host1"), Some(&1), "nothing new on host1");
    h.client.host_maintenance("host1", false).await.unwrap();
    let e = h.client.plan_place(&cluster("again", "p", 1), true).await.unwrap();
    assert!(e.hosts.iter().find(|v| v.host == "host1").unwrap().rejected.is_none());
    assert_eq!(
        h.client.host_maintenance("nope", true).await.unwrap_err().status(),
        Some(404)
    );
}
