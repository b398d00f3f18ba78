//! The NoCloud seed: a small vfat volume labelled CIDATA holding `meta-data`, `user-data` and
//! `network-config` (netplan v2), which cloud-init (and the demo guest) read at boot. Built with
//! dosfstools and mtools, so no mount is needed.

use std::path::Path;

use shoal_model::agent::VmSpec;
use tokio::process::Command;

use super::disk::run;
use crate::HvError;

pub fn meta_data(spec: &VmSpec) -> String {
    format!("instance-id: {}\nlocal-hostname: {}\n", spec.uuid, spec.name)
}

pub fn network_config(spec: &VmSpec) -> String {
    format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    set-name: eth0\n    addresses:\n      - {ip}/{prefix}\n    routes:\n      - to: default\n        via: {gw}\n    mtu: {mtu}\n{dns}",
        mtu = spec.network.as_ref().map_or(1500, |n| n.mtu),
        dns = match spec.network.as_ref().map(|n| &n.dns) {
            Some(d) if !d.is_empty() => format!(
                "    nameservers:\n      addresses: [{}]\n",
                d.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            ),
            _ => String::new(),
        },
        mac = spec.mac,
        ip = spec.ip,
        prefix = spec.prefix_len,
        gw = spec.gateway
    )
}

/// Writes the seed image for `spec` to `path`.
pub async fn write_seed(spec: &VmSpec, path: &Path) -> Result<(), HvError> {
    let dir = path.with_extension("d");
    let _ = tokio::fs::remove_dir_all(&dir).await;
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(HvError::file("creating", &dir))?;
    let files = [
        ("meta-data", meta_data(spec)),
        ("user-data", spec.user_data.clone().unwrap_or_default()),
        ("network-config", network_config(spec)),
    ];
    for (name, content) in &files {
        let file = dir.join(name);
        tokio::fs::write(&file, content)
            .await
            .map_err(HvError::file("writing seed file", &file))?;
    }
    let _ = tokio::fs::remove_file(path).await;
    // 1 MiB is enough for any user data we accept and is the smallest FAT12 mkfs takes happily.
    let kib = (1024 + spec.user_data.as_ref().map_or(0, |u| u.len() / 1024 * 2)).to_string();
    run(
        Command::new("mkfs.vfat")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-C", "-n", "CIDATA"])
            .arg(path)
            .arg(&kib),
        "mkfs.vfat (dosfstools)",
    )
    .await?;
    for (name, _) in &files {
        run(
            Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(path)
                .arg(dir.join(name))
                .arg(format!("::{name}")),
            "mcopy (mtools)",
        )
        .await?;
    }
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_model::VmNetwork;

    fn spec(network: Option<VmNetwork>) -> VmSpec {
        VmSpec {
            uuid: uuid::Uuid::nil(),
            name: "c-0".into(),
            cpus: 1,
            memory_mib: 128,
            disk_mib: None,
            template: "t".into(),
            template_hash: String::new(),
            template_format: shoal_model::DiskFormat::Raw,
            kernel_boot: None,
            ready_pattern: None,
            power: Default::default(),
            force_stop: false,
            ip: "10.60.0.2".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.60.0.1".parse().unwrap(),
            mac: shoal_model::MacAddr::qemu(1),
            user_data: None,
            network,
        }
    }

    #[test]
    fn network_config_carries_the_networks_mtu_and_dns_servers() {
        let plain = network_config(&spec(None));
        assert!(plain.contains("mtu: 1500") && !plain.contains("nameservers"), "{plain}");
        let net = VmNetwork {
            name: "n".into(),
            vni: 7,
            mtu: 1450,
            peers: Vec::new(),
            gateway: None,
            dns: vec!["10.1.1.1".parse().unwrap(), "9.9.9.9".parse().unwrap()],
        };
        let c = network_config(&spec(Some(net)));
        assert!(c.contains("mtu: 1450"), "{c}");
        // After the interface's own addresses: the demo guest takes the first `addresses:` as
        // its own and the list under `nameservers:` as its resolvers.
        let own = c.find("- 10.60.0.2/24").unwrap();
        let ns = c
            .find("    nameservers:\n      addresses: [10.1.1.1, 9.9.9.9]\n")
            .expect(&c);
        assert!(own < ns, "{c}");
    }
}
