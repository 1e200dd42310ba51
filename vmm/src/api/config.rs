//! The microVM's configuration file (`--config FILE.json`): either our own layout (the flags'
//! names, `VmConfig` as serde reads it) or Firecracker's `--config-file` layout
//! (`boot-source`, `machine-config`, ...), so existing Firecracker configurations work
//! unchanged. The types and their checks are `shoal_vmm_config`'s; this module reads files.

use std::path::{Path, PathBuf};

pub use shoal_vmm_config::{
    ConfigError, DiskConfig, FirecrackerDrive, FirecrackerNet, NetConfig, VmConfig, VsockConfig, DEFAULT_CMDLINE,
    DEFAULT_MEM_MIB, DEFAULT_VCPUS,
};

/// Errors reading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("config file {path}: {message}")]
    Firecracker { path: PathBuf, message: String },
}

/// Reads a JSON configuration file, ours or Firecracker's; unknown fields are an error.
pub fn from_file(path: &Path) -> Result<VmConfig, ConfigFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read { path: path.to_owned(), source })?;
    let parse_err = |source| ConfigFileError::Parse { path: path.to_owned(), source };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(parse_err)?;
    if value.get("boot-source").is_some() {
        return from_firecracker(value)
            .map_err(|message| ConfigFileError::Firecracker { path: path.to_owned(), message });
    }
    serde_json::from_value(value).map_err(parse_err)
}

/// Firecracker's `--config-file` layout. Sections for devices and services shoal-vmm does
/// not have yet are refused by name rather than ignored.
pub fn from_firecracker(value: serde_json::Value) -> Result<VmConfig, String> {
    use shoal_vmm_config::{BootSource, EntropyConfig, MachineConfig};
    let serde_json::Value::Object(sections) = value else { return Err("expected a JSON object".into()) };
    let mut config = None;
    let mut machine = MachineConfig::default();
    let (mut drives, mut rng): (Vec<FirecrackerDrive>, bool) = (Vec::new(), false);
    let mut net_configs = Vec::new();
    let mut vsock = None;
    let mut rng_rate = None;
    let mut balloon = None;
    let mut mmds = None;
    for (name, section) in sections {
        match name.as_str() {
            "boot-source" => {
                let b: BootSource = serde_json::from_value(section).map_err(|e| format!("boot-source: {e}"))?;
                let mut c = VmConfig::new(b.kernel_image_path);
                c.initrd = b.initrd_path.map(PathBuf::from);
                if let Some(args) = b.boot_args {
                    c.cmdline = args;
                }
                config = Some(c);
            }
            "machine-config" => {
                machine = serde_json::from_value(section).map_err(|e| format!("machine-config: {e}"))?;
                if machine.smt {
                    return Err("machine-config: smt is not supported by shoal-vmm".into());
                }
            }
            "drives" => drives = serde_json::from_value(section).map_err(|e| format!("drives: {e}"))?,
            "entropy" if !section.is_null() => {
                let e: EntropyConfig = serde_json::from_value(section).map_err(|e| format!("entropy: {e}"))?;
                rng = true;
                rng_rate = e.rate_limiter;
            }
            "entropy" => {}
            "network-interfaces" => {
                let nets: Vec<FirecrackerNet> =
                    serde_json::from_value(section).map_err(|e| format!("network-interfaces: {e}"))?;
                net_configs = nets.into_iter().map(NetConfig::from).collect();
            }
            "vsock" => vsock = serde_json::from_value(section).map_err(|e| format!("vsock: {e}"))?,
            "mmds-config" if !section.is_null() => {
                mmds = Some(serde_json::from_value(section).map_err(|e| format!("mmds-config: {e}"))?);
            }
            "balloon" if !section.is_null() => {
                balloon = Some(serde_json::from_value(section).map_err(|e| format!("balloon: {e}"))?);
            }
            "logger" | "metrics" | "balloon" | "mmds-config" | "cpu-config" => {
                if !section.is_null() {
                    return Err(format!("{name} is not supported by shoal-vmm yet"));
                }
            }
            other => return Err(format!("unknown section `{other}`")),
        }
    }
    let mut config = config.ok_or("boot-source is required")?;
    config.set_machine(&machine);
    config.rng = rng;
    config.rng_rate_limiter = rng_rate;
    config.nets = net_configs;
    config.vsock = vsock;
    config.balloon = balloon;
    config.mmds = mmds;
    config.set_firecracker_drives(drives)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_config_file_layout_is_understood() {
        // The layout of Firecracker's docs/getting-started.md example, our paths.
        let fc = serde_json::json!({
            "boot-source": {"kernel_image_path": "vmlinux.bin", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off", "initrd_path": null},
            "drives": [],
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false},
            "network-interfaces": []
        });
        let c = from_firecracker(fc).unwrap();
        assert_eq!(
            c,
            VmConfig {
                vcpus: 2,
                mem_mib: 1024,
                cmdline: "console=ttyS0 reboot=k panic=1 pci=off".into(),
                ..VmConfig::new("vmlinux.bin")
            }
        );
        // Firecracker's rootfs drive: /dev/vda, named on the command line; entropy: an rng.
        let with_disks = serde_json::json!({
            "boot-source": {"kernel_image_path": "k", "boot_args": "console=ttyS0"},
            "drives": [
                {"drive_id": "scratch", "path_on_host": "scratch.img", "is_root_device": false, "is_read_only": false},
                {"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": true}
            ],
            "entropy": {}
        });
        let c = from_firecracker(with_disks).unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(
            c.disks.iter().map(|d| d.path.to_str().unwrap()).collect::<Vec<_>>(),
            ["rootfs.ext4", "scratch.img"]
        );
        assert!(c.disks[0].read_only && c.rng);
        let only_boot = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
        assert_eq!(from_firecracker(only_boot).unwrap(), VmConfig::new("k"));
    }

    #[test]
    fn firecracker_sections_we_lack_are_refused_by_name() {
        let with = |k: &str, v: serde_json::Value| {
            let mut j = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
            j[k] = v;
            from_firecracker(j).unwrap_err()
        };
        assert_eq!(with("drives", serde_json::json!([{"drive_id": "rootfs"}])), "drives: missing field `path_on_host`");
        let two_roots = serde_json::json!([
            {"drive_id": "a", "path_on_host": "a.img", "is_root_device": true},
            {"drive_id": "b", "path_on_host": "b.img", "is_root_device": true}
        ]);
        assert_eq!(with("drives", two_roots), "only one drive can be the root device");
        assert_eq!(with("vsock", serde_json::json!({"guest_cid": 3})), "vsock: missing field `uds_path`");
        assert_eq!(with("balloon", serde_json::json!({"amount_mib": 3})), "balloon: missing field `deflate_on_oom`");
        assert_eq!(
            with("mmds-config", serde_json::json!({"version": "V2"})),
            "mmds-config: missing field `network_interfaces`"
        );
        assert_eq!(with("cpu-config", serde_json::json!({})), "cpu-config is not supported by shoal-vmm yet");
        let mut m = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
        m["mmds-config"] = serde_json::json!({"version": "V2", "network_interfaces": ["eth0"]});
        let c = from_firecracker(m.clone()).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("mmds: the network interface `eth0` does not exist"));
        m["network-interfaces"] = serde_json::json!([{"iface_id": "eth0", "host_dev_name": "tap0"}]);
        m["mmds-config"]["ipv4_address"] = serde_json::json!("224.0.0.1");
        let c = from_firecracker(m.clone()).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("not a unicast address"));
        m["mmds-config"]["ipv4_address"] = serde_json::json!("169.254.170.2");
        let c = from_firecracker(m).unwrap();
        assert!(c.validate().is_ok() && c.mmds.unwrap().address() == Ok([169, 254, 170, 2]));
        let mut b = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
        b["balloon"] = serde_json::json!({"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 2});
        let c = from_firecracker(b).unwrap();
        assert_eq!(c.balloon.map(|b| (b.amount_mib, b.stats_polling_interval_s)), Some((16, 2)));
        assert!(c.validate().is_ok() && c.device_count() == 1);
        let mut big = c.clone();
        big.balloon = big.balloon.map(|b| shoal_vmm_config::BalloonConfig { amount_mib: 4096, ..b });
        assert!(big.validate().unwrap_err().to_string().contains("too large: 4096 MiB of 128 MiB"));
        let mut j = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
        j["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": "./v.sock"});
        let c = from_firecracker(j).unwrap();
        assert_eq!(c.vsock.as_ref().map(|v| (v.guest_cid, v.uds_path.clone())), Some((3, "./v.sock".into())));
        assert!(c.full_cmdline().contains("virtio_mmio.device=4K@0xd0000000:5"));
        // With ACPI the guest finds its devices in the DSDT: on its command line too, it
        // would find each twice.
        let mut acpi = serde_json::json!({"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "acpi": true}});
        acpi["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": "./v.sock"});
        let a = from_firecracker(acpi).unwrap();
        assert!(a.acpi && a.device_count() == 1 && !a.full_cmdline().contains("virtio_mmio"), "{}", a.full_cmdline());
        assert!(VmConfig { vsock: Some(VsockConfig { guest_cid: 2, ..c.vsock.clone().unwrap() }), ..c.clone() }
            .validate()
            .is_err());
        assert_eq!(VsockConfig::parse("cid=9,uds=/run/v.sock").map(|v| v.guest_cid), Ok(9));
        for bad in ["cid=9", "uds=/x", "cid=x,uds=/x", "cid=9,uds=/x,port=3"] {
            assert!(VsockConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(with("frobnicator", serde_json::json!({})), "unknown section `frobnicator`");
        assert!(with("machine-config", serde_json::json!({"vcpu_count": 1})).contains("missing field `mem_size_mib`"));
        assert!(from_firecracker(serde_json::json!({"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}))
            .unwrap_err()
            .contains("boot-source is required"));
    }
}
