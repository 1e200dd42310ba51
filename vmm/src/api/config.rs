//! The microVM configuration, from CLI flags or `--config FILE.json`: either our own layout
//! (the flags' names) or Firecracker's `--config-file` layout (`boot-source`,
//! `machine-config`, ...), so existing Firecracker configurations work unchanged.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
pub use shoal_vmm_config::{FirecrackerDrive, FirecrackerNet, VsockConfig};

use crate::devices::rate_limiter::RateLimitConfig;

use crate::arch::x86_64::boot::{check_cmdline, BootError};
use crate::arch::x86_64::mptable::MAX_VCPUS;

/// Command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Upper bound on guest memory (16 TiB), far above any host, to keep sizes from overflowing.
pub const MAX_MEM_MIB: u64 = 16 << 20;

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_vcpus() -> u32 {
    DEFAULT_VCPUS
}
fn default_mem_mib() -> u64 {
    DEFAULT_MEM_MIB
}

/// What a microVM is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
    /// Log the pages the guest writes, so that diff snapshots can be taken.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Describe the machine with ACPI tables (hardware-reduced), including a VM Generation ID
    /// device that every restore changes. The guest kernel then finds its virtio devices in
    /// the DSDT rather than on its command line, so it needs CONFIG_ACPI.
    #[serde(default)]
    pub acpi: bool,
    /// virtio-blk disks, in order: the first is /dev/vda in a Linux guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces on existing taps, in order (eth0 first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng entropy device.
    #[serde(default)]
    pub rng: bool,
    /// The entropy device's rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_rate_limiter: Option<RateLimitConfig>,
    /// A virtio-vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device (the last virtio device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<crate::devices::virtio::balloon::BalloonConfig>,
    /// MMDS on the network interfaces it names (the data comes from the API or `--metadata`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<crate::devices::virtio::net::mmds::store::MmdsConfig>,
}

/// One virtio-net interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The interface's name in the API and in snapshots (`iface_id`); `eth<N>` by position if
    /// not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// An existing tap device's name.
    pub tap: String,
    /// The guest's MAC (`aa:bb:cc:dd:ee:ff`); a random locally administered one if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimitConfig>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimitConfig>,
}

impl NetConfig {
    /// Parses the CLI form `tap=NAME[,id=ID][,mac=MAC][,rate=R][,rx-rate=R][,tx-rate=R]` (`rate` limits
    /// each direction; R as for --disk).
    pub fn parse(spec: &str) -> Result<NetConfig, String> {
        let mut net =
            NetConfig { id: None, tap: String::new(), mac: None, rx_rate_limiter: None, tx_rate_limiter: None };
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) => net.tap = t.to_string(),
                Some(("id", i)) if !i.is_empty() => net.id = Some(i.to_string()),
                Some(("mac", m)) => net.mac = Some(m.to_string()),
                Some(("rate", r)) => {
                    let r = RateLimitConfig::parse(r)?;
                    (net.rx_rate_limiter, net.tx_rate_limiter) = (Some(r), Some(r));
                }
                Some(("rx-rate", r)) => net.rx_rate_limiter = Some(RateLimitConfig::parse(r)?),
                Some(("tx-rate", r)) => net.tx_rate_limiter = Some(RateLimitConfig::parse(r)?),
                _ => {
                    return Err(format!(
                        "--net: unknown part `{part}` (tap=NAME, id=ID, mac=MAC, rate=, rx-rate=, tx-rate=)"
                    ))
                }
            }
        }
        if net.tap.is_empty() {
            return Err("--net: tap=NAME is required".into());
        }
        Ok(net)
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw disk image file.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Serial id the guest reads (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimitConfig>,
}

impl DiskConfig {
    /// Parses the CLI form `path=FILE[,ro][,id=ID][,rate=bw=BYTES/MS[+BURST][;ops=N/MS[+BURST]]]`.
    pub fn parse(spec: &str) -> Result<DiskConfig, String> {
        let mut path = None;
        let mut disk = DiskConfig { path: PathBuf::new(), read_only: false, id: None, rate_limiter: None };
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("id", id)) => disk.id = Some(id.to_string()),
                Some(("rate", r)) => disk.rate_limiter = Some(RateLimitConfig::parse(r)?),
                None if part == "ro" => disk.read_only = true,
                _ => return Err(format!("--disk: unknown part `{part}` (path=FILE, ro, id=ID, rate=...)")),
            }
        }
        disk.path = path.ok_or("--disk: path=FILE is required")?;
        Ok(disk)
    }
}

impl From<FirecrackerDrive> for DiskConfig {
    fn from(d: FirecrackerDrive) -> DiskConfig {
        DiskConfig {
            path: d.path_on_host.into(),
            read_only: d.is_read_only,
            id: Some(d.drive_id),
            rate_limiter: d.rate_limiter,
        }
    }
}

impl From<FirecrackerNet> for NetConfig {
    fn from(n: FirecrackerNet) -> NetConfig {
        NetConfig {
            id: Some(n.iface_id),
            tap: n.host_dev_name,
            mac: n.guest_mac,
            rx_rate_limiter: n.rx_rate_limiter,
            tx_rate_limiter: n.tx_rate_limiter,
        }
    }
}

/// Errors in a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
    #[error("vcpus must be at least 1")]
    NoVcpus,
    #[error("vcpus {requested} is over the limit of {max} on this host")]
    TooManyVcpus { requested: u32, max: u32 },
    #[error("mem_mib must be at least 1")]
    NoMemory,
    #[error("mem_mib {0} is over the limit of {max}", max = MAX_MEM_MIB)]
    TooMuchMemory(u64),
    #[error("invalid command line")]
    Cmdline(#[source] BootError),
    #[error("{0}")]
    Device(String),
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            track_dirty_pages: false,
            acpi: false,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            rng_rate_limiter: None,
            vsock: None,
            balloon: None,
            mmds: None,
        }
    }

    /// Reads a JSON configuration file, ours or Firecracker's; unknown fields are an error.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let parse_err = |source| ConfigError::Parse { path: path.to_owned(), source };
        let value: serde_json::Value = serde_json::from_str(&text).map_err(parse_err)?;
        if value.get("boot-source").is_some() {
            return Self::from_firecracker(value)
                .map_err(|message| ConfigError::Firecracker { path: path.to_owned(), message });
        }
        serde_json::from_value(value).map_err(parse_err)
    }

    /// Firecracker's `--config-file` layout. Sections for devices and services shoal-vmm does
    /// not have yet are refused by name rather than ignored.
    pub fn from_firecracker(value: serde_json::Value) -> Result<Self, String> {
        use super::routes::{BootSource, MachineConfig};
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
                    let e: super::routes::EntropyConfig =
                        serde_json::from_value(section).map_err(|e| format!("entropy: {e}"))?;
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
        config.vcpus = machine.vcpu_count;
        config.mem_mib = machine.mem_size_mib;
        config.track_dirty_pages = machine.track_dirty_pages;
        config.acpi = machine.acpi;
        config.rng = rng;
        config.rng_rate_limiter = rng_rate;
        config.nets = net_configs;
        config.vsock = vsock;
        config.balloon = balloon;
        config.mmds = mmds;
        config.set_firecracker_drives(drives)?;
        Ok(config)
    }

    /// Takes Firecracker drives as disks: the root device first (/dev/vda), named on the
    /// command line as Firecracker does (`root=/dev/vda rw|ro`).
    pub fn set_firecracker_drives(&mut self, drives: Vec<FirecrackerDrive>) -> Result<(), String> {
        let (root, rest): (Vec<_>, Vec<_>) = drives.into_iter().partition(|d| d.is_root_device);
        if root.len() > 1 {
            return Err("only one drive can be the root device".into());
        }
        if let Some(r) = root.first() {
            self.cmdline.push_str(if r.is_read_only { " root=/dev/vda ro" } else { " root=/dev/vda rw" });
        }
        self.disks = root.into_iter().chain(rest).map(DiskConfig::from).collect();
        Ok(())
    }

    /// Checks everything that can be checked without KVM or the files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > u32::from(MAX_VCPUS) {
            return Err(ConfigError::TooManyVcpus { requested: self.vcpus, max: u32::from(MAX_VCPUS) });
        }
        if self.mem_mib == 0 {
            return Err(ConfigError::NoMemory);
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::TooMuchMemory(self.mem_mib));
        }
        let devices = self.device_count();
        if let Some(v) = &self.vsock {
            crate::devices::virtio::vsock::check_cid(v.guest_cid)
                .map_err(|e| ConfigError::Device(format!("vsock: {e}")))?;
            if v.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::Device("vsock: uds_path is empty".into()));
            }
        }
        for n in &self.nets {
            if let Some(mac) = &n.mac {
                crate::devices::virtio::net::parse_mac(mac).map_err(ConfigError::Device)?;
            }
            for r in n.rx_rate_limiter.iter().chain(n.tx_rate_limiter.iter()) {
                for b in r.bandwidth.iter().chain(r.ops.iter()) {
                    b.validate().map_err(|e| ConfigError::Device(format!("net {}: {e}", n.tap)))?;
                }
            }
        }
        if let Some(r) = &self.rng_rate_limiter {
            for b in r.bandwidth.iter().chain(r.ops.iter()) {
                b.validate().map_err(|e| ConfigError::Device(format!("entropy: {e}")))?;
            }
        }
        if let Some(b) = &self.balloon {
            shoal_vmm_config::check_balloon_amount(b.amount_mib, self.mem_mib)
                .map_err(|e| ConfigError::Device(format!("balloon: {e}")))?;
        }
        if let Some(m) = &self.mmds {
            let ids: Vec<String> =
                self.nets.iter().enumerate().map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("eth{i}"))).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            m.check(&ids).map_err(|e| ConfigError::Device(format!("mmds: {e}")))?;
        }
        if devices > crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES {
            return Err(ConfigError::Device(format!(
                "{devices} virtio devices, more than the {} interrupt lines allow",
                crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES
            )));
        }
        for d in &self.disks {
            if d.id.as_ref().is_some_and(|id| id.len() > 20) {
                return Err(ConfigError::Device(format!("disk {}: id is longer than 20 bytes", d.path.display())));
            }
            if let Some(r) = &d.rate_limiter {
                for b in r.bandwidth.iter().chain(r.ops.iter()) {
                    b.validate().map_err(|e| ConfigError::Device(format!("disk {}: {e}", d.path.display())))?;
                }
            }
        }
        check_cmdline(&self.full_cmdline()).map_err(ConfigError::Cmdline)
    }

    /// The command line the guest gets: the configured one plus a `virtio_mmio.device=` entry
    /// per virtio device (disks, then network interfaces, the rng, vsock, the balloon), so a
    /// Linux guest finds them.
    pub fn full_cmdline(&self) -> String {
        use crate::arch::x86_64::layout::{VIRTIO_FIRST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
        let mut c = self.cmdline.clone();
        // With ACPI the devices are in the DSDT; on the command line as well, a guest would
        // find each twice.
        let on_cmdline = if self.acpi { 0 } else { self.device_count() };
        for i in 0..on_cmdline {
            c.push_str(&format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
                VIRTIO_FIRST_IRQ + i as u32
            ));
        }
        c
    }

    /// How many virtio devices the guest gets.
    pub fn device_count(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
    }

    /// Checks the vCPU count against what KVM on this host allows.
    pub fn validate_for_host(&self, kvm_max_vcpus: usize) -> Result<(), ConfigError> {
        let max = u32::try_from(kvm_max_vcpus).unwrap_or(u32::MAX).min(u32::from(MAX_VCPUS));
        if self.vcpus > max {
            return Err(ConfigError::TooManyVcpus { requested: self.vcpus, max });
        }
        Ok(())
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_and_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "vcpus": 2}"#).unwrap();
        assert_eq!(c, VmConfig { vcpus: 2, ..VmConfig::new("/k") });
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "vcpu_count": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpu_count`"), "{err}");
    }

    #[test]
    fn firecracker_config_file_layout_is_understood() {
        // The layout of Firecracker's docs/getting-started.md example, our paths.
        let fc = serde_json::json!({
            "boot-source": {"kernel_image_path": "vmlinux.bin", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off", "initrd_path": null},
            "drives": [],
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false},
            "network-interfaces": []
        });
        let c = VmConfig::from_firecracker(fc).unwrap();
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
        let c = VmConfig::from_firecracker(with_disks).unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(
            c.disks.iter().map(|d| d.path.to_str().unwrap()).collect::<Vec<_>>(),
            ["rootfs.ext4", "scratch.img"]
        );
        assert!(c.disks[0].read_only && c.rng);
        let only_boot = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
        assert_eq!(VmConfig::from_firecracker(only_boot).unwrap(), VmConfig::new("k"));
    }

    #[test]
    fn firecracker_sections_we_lack_are_refused_by_name() {
        let with = |k: &str, v: serde_json::Value| {
            let mut j = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
            j[k] = v;
            VmConfig::from_firecracker(j).unwrap_err()
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
        let c = VmConfig::from_firecracker(m.clone()).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("mmds: the network interface `eth0` does not exist"));
        m["network-interfaces"] = serde_json::json!([{"iface_id": "eth0", "host_dev_name": "tap0"}]);
        m["mmds-config"]["ipv4_address"] = serde_json::json!("224.0.0.1");
        let c = VmConfig::from_firecracker(m.clone()).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("not a unicast address"));
        m["mmds-config"]["ipv4_address"] = serde_json::json!("169.254.170.2");
        let c = VmConfig::from_firecracker(m).unwrap();
        assert!(c.validate().is_ok() && c.mmds.unwrap().address() == Ok([169, 254, 170, 2]));
        let mut b = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
        b["balloon"] = serde_json::json!({"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 2});
        let c = VmConfig::from_firecracker(b).unwrap();
        assert_eq!(c.balloon.map(|b| (b.amount_mib, b.stats_polling_interval_s)), Some((16, 2)));
        assert!(c.validate().is_ok() && c.device_count() == 1);
        let mut big = c.clone();
        big.balloon = big.balloon.map(|b| crate::devices::virtio::balloon::BalloonConfig { amount_mib: 4096, ..b });
        assert!(big.validate().unwrap_err().to_string().contains("too large: 4096 MiB of 128 MiB"));
        let mut j = serde_json::json!({"boot-source": {"kernel_image_path": "k"}});
        j["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": "./v.sock"});
        let c = VmConfig::from_firecracker(j).unwrap();
        assert_eq!(c.vsock.as_ref().map(|v| (v.guest_cid, v.uds_path.clone())), Some((3, "./v.sock".into())));
        assert!(c.full_cmdline().contains("virtio_mmio.device=4K@0xd0000000:5"));
        // With ACPI the guest finds its devices in the DSDT: on its command line too, it
        // would find each twice.
        let mut acpi = serde_json::json!({"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "acpi": true}});
        acpi["vsock"] = serde_json::json!({"guest_cid": 3, "uds_path": "./v.sock"});
        let a = VmConfig::from_firecracker(acpi).unwrap();
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
        assert!(VmConfig::from_firecracker(
            serde_json::json!({"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}})
        )
        .unwrap_err()
        .contains("boot-source is required"));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let base = VmConfig::new("/k");
        assert!(matches!(VmConfig { vcpus: 0, ..base.clone() }.validate(), Err(ConfigError::NoVcpus)));
        assert!(matches!(VmConfig { vcpus: 255, ..base.clone() }.validate(), Err(ConfigError::TooManyVcpus { .. })));
        assert!(matches!(VmConfig { mem_mib: 0, ..base.clone() }.validate(), Err(ConfigError::NoMemory)));
        assert!(matches!(
            VmConfig { mem_mib: u64::MAX, ..base.clone() }.validate(),
            Err(ConfigError::TooMuchMemory(_))
        ));
        assert!(matches!(
            VmConfig { cmdline: "x".repeat(4096), ..base.clone() }.validate(),
            Err(ConfigError::Cmdline(_))
        ));
        let err = VmConfig { vcpus: 64, ..base }.validate_for_host(8).unwrap_err();
        assert_eq!(err.to_string(), "vcpus 64 is over the limit of 8 on this host");
    }
}
