//! `shoal network create|list|show|set|delete`.

use shoal_client::Client;
use shoal_model::network::{CreateNetwork, NetworkView, UpdateNetwork};

use crate::cli::{NetworkCmd, Output};
use crate::output::{deleted, emit, sheet, table};

pub async fn run(client: &Client, out: Output, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create {
            name,
            subnet,
            vni,
            nat,
            dns,
        } => {
            let n = client
                .create_network(&CreateNetwork {
                    name,
                    subnet,
                    vni,
                    nat,
                    dns,
                })
                .await?;
            emit(out, &n, show);
        }
        NetworkCmd::Set { name, nat, dns } => {
            if nat.is_none() && dns.is_none() {
                anyhow::bail!("network set {name}: nothing to change (give --nat true|false or --dns)");
            }
            let dns = dns.map(|d| if d == ["none"] { Vec::new() } else { d });
            emit(
                out,
                &client.update_network(&name, &UpdateNetwork { nat, dns }).await?,
                show,
            );
        }
        NetworkCmd::List => emit(out, &client.networks().await?, list),
        NetworkCmd::Show { name } => emit(out, &client.network(&name).await?, show),
        NetworkCmd::Delete { name } => {
            client.delete_network(&name).await?;
            deleted(out, "network", &name);
        }
    }
    Ok(())
}

#[allow(clippy::ptr_arg)] // `emit` hands over the value as it was deserialised.
fn list(ns: &Vec<NetworkView>) -> String {
    table(
        &[
            "name", "subnet", "vni", "owner", "nat", "dns", "clusters", "vms", "hosts",
        ],
        ns.iter()
            .map(|n| {
                vec![
                    n.network.name.clone(),
                    n.network.subnet.to_string(),
                    n.network.vni.to_string(),
                    n.network.owner.clone().unwrap_or_else(|| "-".into()),
                    nat(n),
                    dns(n, ","),
                    n.clusters.join(","),
                    n.vms.to_string(),
                    n.hosts.join(","),
                ]
            })
            .collect(),
    )
}

/// `no`, or where the network's traffic goes out: `via h1 (10.200.0.1)`, or that no host of it
/// can be its gateway yet.
fn nat(n: &NetworkView) -> String {
    match (n.network.nat, &n.gateway_host, n.gateway_ip) {
        (false, _, _) => "no".into(),
        (true, Some(h), Some(ip)) => format!("via {h} ({ip})"),
        (true, _, _) => "no gateway host yet".into(),
    }
}

fn dns(n: &NetworkView, sep: &str) -> String {
    if n.network.dns.is_empty() {
        return "-".into();
    }
    n.network
        .dns
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(sep)
}

/// Names, comma-separated, or `-` for none.
fn names(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// One network, `key: value` lines like `cluster show`.
fn show(n: &NetworkView) -> String {
    let w = &n.network;
    sheet(vec![
        ("name", w.name.clone()),
        ("subnet", w.subnet.to_string()),
        ("vni", w.vni.to_string()),
        (
            "owner",
            match &w.owner {
                Some(c) => format!("cluster {c} (deleted with it)"),
                None => "-".into(),
            },
        ),
        ("nat", nat(n)),
        ("dns", dns(n, ", ")),
        ("clusters", names(&n.clusters)),
        ("vms", n.vms.to_string()),
        ("hosts", names(&n.hosts)),
    ])
}
