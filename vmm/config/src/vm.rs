//! A microVM's whole configuration (`VmConfig`: what `shoal-vmm`'s flags, its `--config` file and
//! an API-assembled instance all become), its disks and network interfaces, and its checks.
//! The builder turns a checked `VmConfig` into a machine; nothing here touches KVM or files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::limits::{
    check_cid, check_cmdline, CmdlineError, DISK_ID_MAX_LEN, MAX_MEM_MIB, MAX_VCPUS, VIRTIO_FIRST_IRQ,
    VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::{BalloonConfig, FirecrackerDrive, FirecrackerNet, MmdsConfig, RateLimitConfig, VsockConfig};

/// Command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEM_MIB: u64 = 128;

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
    pub balloon: Option<BalloonConfig>,
    /// MMDS on the network interfaces it names (the data comes from the API or `--metadata`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<MmdsConfig>,
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

/// What is wrong with a configuration.
#[derive(Debug)]
pub enum ConfigError {
    NoVcpus,
    TooManyVcpus { requested: u32, max: u32 },
    NoMemory,
    TooMuchMemory(u64),
    Cmdline(CmdlineError),
    Device(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::NoVcpus => write!(f, "vcpus must be at least 1"),
            ConfigError::TooManyVcpus { requested, max } => {
                write!(f, "vcpus {requested} is over the limit of {max} on this host")
            }
            ConfigError::NoMemory => write!(f, "mem_mib must be at least 1"),
            ConfigError::TooMuchMemory(m) => write!(f, "mem_mib {m} is over the limit of {MAX_MEM_MIB}"),
            ConfigError::Cmdline(_) => write!(f, "invalid command line"),
            ConfigError::Device(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Cmdline(e) => Some(e),
            _ => None,
        }
    }
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

    /// Takes Firecracker's machine configuration (`PUT /machine-config`, `machine-config`).
    pub fn set_machine(&mut self, machine: &crate::MachineConfig) {
        self.vcpus = machine.vcpu_count;
        self.mem_mib = machine.mem_size_mib;
        self.track_dirty_pages = machine.track_dirty_pages;
        self.acpi = machine.acpi;
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
            check_cid(v.guest_cid).map_err(|e| ConfigError::Device(format!("vsock: {e}")))?;
            if v.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::Device("vsock: uds_path is empty".into()));
            }
        }
        for n in &self.nets {
            if let Some(mac) = &n.mac {
                crate::parse_mac(mac).map_err(ConfigError::Device)?;
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
            crate::check_balloon_amount(b.amount_mib, self.mem_mib)
                .map_err(|e| ConfigError::Device(format!("balloon: {e}")))?;
        }
        if let Some(m) = &self.mmds {
            let ids: Vec<String> =
                self.nets.iter().enumerate().map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("eth{i}"))).collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            m.check(&ids).map_err(|e| ConfigError::Device(format!("mmds: {e}")))?;
        }
        if devices > VIRTIO_MAX_DEVICES {
            return Err(ConfigError::Device(format!(
                "{devices} virtio devices, more than the {} interrupt lines allow",
                VIRTIO_MAX_DEVICES
            )));
        }
        for d in &self.disks {
            if d.id.as_ref().is_some_and(|id| id.len() > DISK_ID_MAX_LEN) {
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
