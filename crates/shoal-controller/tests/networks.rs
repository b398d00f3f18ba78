//! Virtual networks through the API: allocation, refusals, clusters on their own network or a
//! shared one, and what deleting gives back.

mod common;

use common::{cluster, Harness, Opts};
use shoal_model::network::CreateNetwork;
use shoal_model::OperationState;

fn net(name: &str, subnet: Option<&str>, vni: Option<u32>) -> CreateNetwork {
    CreateNetwork {
        name: name.into(),
        subnet: subnet.map(Into::into),
        vni,
        nat: false,
        dns: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn networks_get_a_subnet_and_vni_and_refuse_overlaps_and_duplicates() {
    let h = Harness::start(Opts {
        hosts: 1,
        ..Default::default()
    })
    .await;
    let a = h.client.create_network(&net("a", None, None)).await.unwrap();
    assert_eq!(
        (a.network.subnet.to_string().as_str(), a.network.vni),
        ("10.200.0.0/24", 10_000)
    );
    let b = h
        .client
        .create_network(&net("b", Some("10.50.0.0/24"), Some(42)))
        .await
        .unwrap();
    assert_eq!(
        (
            b.network.subnet.to_string().as_str(),
            b.network.vni,
            b.network.owner.clone()
        ),
        ("10.50.0.0/24", 42, None)
    );

    // Overlapping subnets, a VNI in use, a name in use: refused, naming the value, nothing written.
    let before = h.keys("/").await;
    let e = h
        .client
        .create_network(&net("c", Some("10.50.0.128/25"), None))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(
        e.to_string().contains("10.50.0.128/25") && e.to_string().contains("10.50.0.0/24"),
        "{e}"
    );
    let e = h
        .client
        .create_network(&net("c", Some("10.0.0.0/8"), None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");
    let e = h.client.create_network(&net("c", None, Some(42))).await.unwrap_err();
    assert!(e.to_string().contains("VNI 42 is in use by network \"b\""), "{e}");
    let e = h.client.create_network(&net("b", None, None)).await.unwrap_err();
    assert_eq!(e.code(), Some("already_exists"));
    for (bad, what) in [
        (net("c", None, Some(0)), "VNI 0"),
        (net("c", None, Some(1 << 24)), "VNI 16777216"),
        (net("c", Some("10.1.2.3/24"), None), "host bits"),
        (net("c", Some("10.1.2.0/30"), None), "too small"),
    ] {
        let e = h.client.create_network(&bad).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{bad:?}: {e}");
        assert!(e.to_string().contains(what), "{e}");
    }
    assert_eq!(h.keys("/").await, before);

    let list = h.client.networks().await.unwrap();
    assert_eq!(
        list.iter().map(|n| n.network.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    h.client.delete_network("a").await.unwrap();
    assert_eq!(h.client.network("a").await.unwrap_err().status(), Some(404));
    // Its subnet and VNI are free again.
    let again = h.client.create_network(&net("a2", None, None)).await.unwrap();
    assert_eq!(
        (again.network.subnet.to_string().as_str(), again.network.vni),
        ("10.200.0.0/24", 10_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_get_their_own_network_or_share_a_named_one() {
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    h.profile("small", "t", 1, "256MiB").await;

    // Its own network: named after it, owned by it, deleted with it.
    let op = h.client.create_cluster(&cluster("solo", "small", 2)).await.unwrap();
    assert_eq!(
        h.client.wait(op.id, |_| {}).await.unwrap().state,
        OperationState::Succeeded
    );
    let solo = h.client.network("solo").await.unwrap();
    assert_eq!(solo.network.owner.as_deref(), Some("solo"));
    assert_eq!((solo.clusters.clone(), solo.vms), (vec!["solo".to_string()], 2));
    assert_eq!(
        h.client.cluster("solo").await.unwrap().cluster.network.as_deref(),
        Some("solo")
    );
    let e = h.client.delete_network("solo").await.unwrap_err();
    assert_eq!(e.code(), Some("in_use"));
    assert!(e.to_string().contains("belongs to cluster \"solo\""), "{e}");

    // Two clusters on one shared network: distinct addresses in its subnet.
    h.client
        .create_network(&net("shared", Some("10.77.0.0/24"), Some(77)))
        .await
        .unwrap();
    let mut req = cluster("x", "small", 3);
    req.network = Some("shared".into());
    h.client
        .wait(h.client.create_cluster(&req).await.unwrap().id, |_| {})
        .await
        .unwrap();
    let mut req = cluster("y", "small", 2);
    req.network = Some("shared".into());
    let op = h
        .client
        .wait(h.client.create_cluster(&req).await.unwrap().id, |_| {})
        .await
        .unwrap();
    assert_eq!(op.state, OperationState::Succeeded, "{op:?}");
    let mut ips: Vec<String> = h
        .client
        .vms(Some("x"))
        .await
        .unwrap()
        .iter()
        .chain(h.client.vms(Some("y")).await.unwrap().iter())
        .map(|v| v.ip.to_string())
        .collect();
    ips.sort();
    assert_eq!(ips, ["10.77.0.2", "10.77.0.3", "10.77.0.4", "10.77.0.5", "10.77.0.6"]);
    let shared = h.client.network("shared").await.unwrap();
    assert_eq!((shared.clusters.len(), shared.vms), (2, 5));

    // A network in use cannot be deleted; one that does not exist cannot be joined.
    let e = h.client.delete_network("shared").await.unwrap_err();
    assert_eq!(e.code(), Some("in_use"));
    assert!(e.to_string().contains("x, y"), "{e}");
    let mut req = cluster("z", "small", 1);
    req.network = Some("nope".into());
    let e = h.client.create_cluster(&req).await.unwrap_err();
    assert!(e.to_string().contains("network \"nope\" does not exist"), "{e}");
    // A cluster whose own network's name is taken by another network is refused.
    let e = h
        .client
        .create_cluster(&cluster("shared", "small", 1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--network shared"), "{e}");

    // Deleting a cluster keeps the shared network; deleting both frees it.
    for c in ["x", "y", "solo"] {
        let op = h.client.delete_cluster(c).await.unwrap();
        h.client.wait(op.id, |_| {}).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !h.keys("/clusters/").await.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(h.client.network("shared").await.unwrap().vms, 0);
    assert_eq!(h.client.network("solo").await.unwrap_err().status(), Some(404));
    h.client.delete_network("shared").await.unwrap();
    assert!(h.keys("/ipam/").await.is_empty(), "{:?}", h.keys("/ipam/").await);
    assert!(h.keys("/networks/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_is_a_setting_of_the_network_and_a_joining_cluster_cannot_ask_for_it() {
    use shoal_model::network::UpdateNetwork;
    let h = Harness::start(Opts::default()).await;
    h.template("t").await;
    h.profile("small", "t", 1, "256MiB").await;

    let out = h
        .client
        .create_network(&CreateNetwork {
            nat: true,
            ..net("out", Some("10.60.0.0/24"), None)
        })
        .await
        .unwrap();
    assert!(out.network.nat);
    assert_eq!(out.gateway_ip, Some("10.60.0.1".parse().unwrap()));
    h.client
        .create_network(&net("plain", Some("10.61.0.0/24"), None))
        .await
        .unwrap();

    // Joining a network without NAT while asking for NAT: refused, naming it, nothing written.
    let before = h.keys("/").await;
    let mut req = cluster("j", "small", 1);
    req.network = Some("plain".into());
    req.nat = true;
    let e = h.client.create_cluster(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(
        e.to_string().contains("\"plain\"") && e.to_string().contains("--nat true"),
        "{e}"
    );
    assert_eq!(h.keys("/").await, before);
    // Joining one with NAT is fine, and so is a cluster's own network with NAT.
    req.network = Some("out".into());
    assert_eq!(
        h.client
            .wait(h.client.create_cluster(&req).await.unwrap().id, |_| {})
            .await
            .unwrap()
            .state,
        OperationState::Succeeded
    );
    let mut own = cluster("own", "small", 2);
    own.nat = true;
    assert_eq!(
        h.client
            .wait(h.client.create_cluster(&own).await.unwrap().id, |_| {})
            .await
            .unwrap()
            .state,
        OperationState::Succeeded
    );
    let v = h.client.network("own").await.unwrap();
    assert!(v.network.nat && v.gateway_ip.is_some(), "{v:?}");
    // These simulated hosts have no bridge driver: nobody can be the gateway yet.
    assert_eq!(v.gateway_host, None, "{v:?}");

    // Switched on and off later; a network that does not exist is not found.
    let v = h
        .client
        .update_network(
            "plain",
            &UpdateNetwork {
                nat: Some(true),
                dns: None,
            },
        )
        .await
        .unwrap();
    assert!(v.network.nat);
    assert!(h.client.network("plain").await.unwrap().network.nat, "stored");
    let v = h
        .client
        .update_network(
            "plain",
            &UpdateNetwork {
                nat: Some(false),
                dns: None,
            },
        )
        .await
        .unwrap();
    assert!(!v.network.nat && v.gateway_ip.is_none());
    let e = h
        .client
        .update_network(
            "nope",
            &UpdateNetwork {
                nat: Some(true),
                dns: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_servers_are_checked_replaced_and_cleared() {
    use shoal_model::network::UpdateNetwork;
    let h = Harness::start(Opts {
        hosts: 1,
        ..Default::default()
    })
    .await;
    let dns = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let n = h
        .client
        .create_network(&CreateNetwork {
            dns: dns(&["10.1.1.1", " 9.9.9.9"]),
            ..net("d", None, None)
        })
        .await
        .unwrap();
    assert_eq!(
        n.network.dns,
        vec![
            "10.1.1.1".parse::<std::net::Ipv4Addr>().unwrap(),
            "9.9.9.9".parse().unwrap()
        ]
    );

    // Not an address, too many: refused naming them, nothing written or changed.
    let before = h.keys("/").await;
    for (bad, what) in [
        (dns(&["1.1.1.1", "dns.example"]), "\"dns.example\""),
        (dns(&["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"]), "8.8.4.4"),
    ] {
        let e = h
            .client
            .create_network(&CreateNetwork {
                dns: bad.clone(),
                ..net("e", None, None)
            })
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "{bad:?}: {e}");
        assert!(e.to_string().contains(what), "{e}");
        let e = h
            .client
            .update_network(
                "d",
                &UpdateNetwork {
                    nat: Some(true),
                    dns: Some(bad),
                },
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    assert_eq!(h.keys("/").await, before);
    let d = h.client.network("d").await.unwrap();
    assert!(
        !d.network.nat && d.network.dns.len() == 2,
        "a refused change changes nothing: {d:?}"
    );

    // Replaced, then cleared.
    let v = h
        .client
        .update_network(
            "d",
            &UpdateNetwork {
                nat: None,
                dns: Some(dns(&["10.2.2.2"])),
            },
        )
        .await
        .unwrap();
    assert_eq!(v.network.dns, vec!["10.2.2.2".parse::<std::net::Ipv4Addr>().unwrap()]);
    let v = h
        .client
        .update_network(
            "d",
            &UpdateNetwork {
                nat: None,
                dns: Some(Vec::new()),
            },
        )
        .await
        .unwrap();
    assert!(v.network.dns.is_empty());
}
