//! `shoal network create|list|show|delete`.

use shoal_client::Client;
use shoal_model::network::{CreateNetwork, NetworkView};

use crate::cli::{NetworkCmd, Output};
use crate::output::{emit, table};

pub async fn run(client: &Client, out: Output, cmd: NetworkCmd) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create { name, subnet, vni } => {
            let n = client.create_network(&CreateNetwork { name, subnet, vni }).await?;
            emit(out, &n, show);
        }
        NetworkCmd::List => emit(out, &client.networks().await?, list),
        NetworkCmd::Show { name } => emit(out, &client.network(&name).await?, show),
        NetworkCmd::Delete { name } => {
            client.delete_network(&name).await?;
            eprintln!("network {name} deleted");
        }
    }
    Ok(())
}

#[allow(clippy::ptr_arg)] // `emit` hands over the value as it was deserialised.
fn list(ns: &Vec<NetworkView>) -> String {
    rows(ns)
}

fn rows(ns: &[NetworkView]) -> String {
    table(
        &["name", "subnet", "vni", "owner", "clusters", "vms", "hosts"],
        ns.iter()
            .map(|n| {
                vec![
                    n.network.name.clone(),
                    n.network.subnet.to_string(),
                    n.network.vni.to_string(),
                    n.network.owner.clone().unwrap_or_else(|| "-".into()),
                    n.clusters.join(","),
                    n.vms.to_string(),
                    n.hosts.join(","),
                ]
            })
            .collect(),
    )
}

fn show(n: &NetworkView) -> String {
    rows(std::slice::from_ref(n))
}
