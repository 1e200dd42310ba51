//! The configuration and request types of shoal-vmm's control API, on their own: serde and
//! the standard library only, so that a program that drives the VMM (the node agent's
//! supervisor, a test) speaks its API with the very types the VMM parses, without linking the
//! VMM. The field names are Firecracker's (`PUT /machine-config`, `/boot-source`, `/drives`,
//! `/network-interfaces`, `/vsock`, `/entropy`, `/balloon`, `/mmds/config`, `/snapshot/*`,
//! `/logger`, `/metrics`, `/actions`, `PATCH /vm`), and the limits a value must meet (rate
//! limiter bounds, MAC addresses, MMDS addresses, the CLI forms) are checked here, once.
//! `VmConfig` (in `vm.rs`) is a whole microVM as the VMM builds it, and `limits` the machine
//! bounds it is checked against.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod limits;
mod vm;
pub use vm::{ConfigError, DiskConfig, NetConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEM_MIB, DEFAULT_VCPUS};

// --- Rate limiters (Firecracker's TokenBucket and RateLimiter) ---

/// One bucket's configuration (Firecracker's `TokenBucket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: u64,
    pub refill_time: u64,
}

/// A device's limits (Firecracker's `RateLimiter`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default)]
    pub bandwidth: Option<BucketConfig>,
    #[serde(default)]
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// Parses the CLI form `bw=BYTES/MS[+BURST];ops=N/MS[+BURST]` (either part optional),
    /// e.g. `bw=10485760/1000` for 10 MiB/s.
    pub fn parse(text: &str) -> Result<RateLimitConfig, String> {
        let mut c = RateLimitConfig::default();
        for part in text.split([';', ',']).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or(format!("rate `{part}`: expected bw=... or ops=..."))?;
            let (rate, burst) = value.split_once('+').map_or((value, None), |(r, b)| (r, Some(b)));
            let (size, ms) = rate.split_once('/').ok_or(format!("rate `{part}`: expected TOKENS/MILLISECONDS"))?;
            let num = |s: &str| s.parse::<u64>().map_err(|_| format!("rate `{part}`: `{s}` is not a number"));
            let bucket = BucketConfig {
                size: num(size)?,
                one_time_burst: burst.map(num).transpose()?.unwrap_or(0),
                refill_time: num(ms)?,
            };
            bucket.validate()?;
            match key {
                "bw" => c.bandwidth = Some(bucket),
                "ops" => c.ops = Some(bucket),
                other => return Err(format!("rate: unknown limit `{other}` (bw or ops)")),
            }
        }
        Ok(c)
    }
}

impl RateLimitConfig {
    /// Firecracker's update rules for `PATCH /drives` and `PATCH /network-interfaces`: a
    /// bucket the patch leaves out stays as it is, one with size or refill_time 0 is removed,
    /// any other replaces it. `None`: no limit is left.
    pub fn patched(current: Option<RateLimitConfig>, patch: &RateLimitConfig) -> Option<RateLimitConfig> {
        let current = current.unwrap_or_default();
        let merge = |now: Option<BucketConfig>, new: Option<BucketConfig>| match new {
            None => now,
            Some(b) if b.size == 0 || b.refill_time == 0 => None,
            Some(b) => Some(b),
        };
        let c = RateLimitConfig {
            bandwidth: merge(current.bandwidth, patch.bandwidth),
            ops: merge(current.ops, patch.ops),
        };
        (c.bandwidth.is_some() || c.ops.is_some()).then_some(c)
    }

    /// Checks a patch: every bucket either removes one (size or refill_time 0) or is valid.
    pub fn validate_patch(&self) -> Result<(), String> {
        self.bandwidth
            .iter()
            .chain(self.ops.iter())
            .filter(|b| b.size != 0 && b.refill_time != 0)
            .try_for_each(BucketConfig::validate)
    }
}

/// The largest `size` and `one_time_burst`: 2^53, the largest integer the bucket's f64
/// arithmetic holds exactly (8 PiB, far beyond any device's rate).
pub const MAX_TOKENS: u64 = 1 << 53;

/// The longest `refill_time`: one day, in milliseconds.
pub const MAX_REFILL_MS: u64 = 24 * 60 * 60 * 1000;

impl BucketConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.size == 0 || self.refill_time == 0 {
            return Err("rate limit size and refill_time must be above zero".into());
        }
        if self.size > MAX_TOKENS || self.one_time_burst > MAX_TOKENS {
            return Err(format!("rate limit size and one_time_burst must be at most {MAX_TOKENS}"));
        }
        if self.refill_time > MAX_REFILL_MS {
            return Err(format!("rate limit refill_time must be at most {MAX_REFILL_MS} ms (one day)"));
        }
        Ok(())
    }
}

// --- Machine, boot, actions, VM state ---

/// The Firecracker API release whose paths and fields this server follows (the newest
/// feature it takes is `network_overrides` on snapshot load, from Firecracker 1.12), as
/// `GET /version` reports it to clients that gate features on it.
pub const FIRECRACKER_API_VERSION: &str = "1.12.0";

/// `PUT/GET /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Shoal's extension: ACPI tables with a VM Generation ID device (see `VmConfig::acpi`).
    #[serde(default)]
    pub acpi: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig { vcpu_count: 1, mem_size_mib: 128, smt: false, track_dirty_pages: false, acpi: false }
    }
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    pub state: VmStateName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateName {
    Paused,
    Resumed,
}

// --- Devices ---

/// The vsock device, with Firecracker's field names (`PUT /vsock`, the `vsock` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to; guest connections to host port P reach
    /// `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Accepted for Firecracker clients (deprecated there); there is one vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

impl VsockConfig {
    /// Parses the CLI form `cid=N,uds=PATH`.
    pub fn parse(spec: &str) -> Result<VsockConfig, String> {
        let (mut cid, mut uds) = (None, None);
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("cid", c)) => {
                    cid = Some(c.parse::<u64>().map_err(|_| format!("--vsock: cid `{c}` is not a number"))?)
                }
                Some(("uds", u)) if !u.is_empty() => uds = Some(PathBuf::from(u)),
                _ => return Err(format!("--vsock: unknown part `{part}` (cid=N, uds=PATH)")),
            }
        }
        Ok(VsockConfig {
            guest_cid: cid.ok_or("--vsock: cid=N is required")?,
            uds_path: uds.ok_or("--vsock: uds=PATH is required")?,
            vsock_id: None,
        })
    }
}

/// A drive in Firecracker's API and config file (`PUT /drives/{id}`, `drives`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerDrive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimitConfig>,
    /// Accepted and ignored: shoal-vmm always does what Firecracker's "Unsafe" cache type does
    /// (flush on request) with synchronous I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

/// A network interface in Firecracker's API and config file (`PUT /network-interfaces/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerNet {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimitConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimitConfig>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("MAC `{text}` is not six hex bytes separated by colons"));
    }
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or(format!("MAC `{text}`: `{p}` is not a hex byte"))?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("MAC `{text}` is a multicast address"));
    }
    Ok(mac)
}

/// Writes `aa:bb:cc:dd:ee:ff` (what parse_mac reads).
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// `PATCH /drives/{id}` (Firecracker's PartialDrive): after the start, another backing file
/// and/or rate limiter for a drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimitConfig>,
}

/// `PATCH /network-interfaces/{id}` (Firecracker's PartialNetworkInterface): after the start,
/// other rate limiters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNet {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimitConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimitConfig>,
}

/// `PUT /entropy`: the virtio-rng device, optionally rate-limited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default)]
    pub rate_limiter: Option<RateLimitConfig>,
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

/// The balloon's settings (Firecracker's `PUT /balloon` body and config-file section).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Target size of the balloon: memory the guest should give back.
    pub amount_mib: u32,
    /// The guest may deflate the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0 turns statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
}

impl BalloonConfig {
    /// Parses the CLI form `mib=N[,deflate-on-oom][,stats=SECONDS]`.
    pub fn parse(text: &str) -> Result<BalloonConfig, String> {
        let mut c = BalloonConfig { amount_mib: 0, deflate_on_oom: false, stats_polling_interval_s: 0 };
        let mut mib = None;
        for part in text.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("mib", v)) => mib = Some(v.parse().map_err(|_| format!("balloon: `{v}` is not a size in MiB"))?),
                Some(("stats", v)) => {
                    c.stats_polling_interval_s =
                        v.parse().map_err(|_| format!("balloon: `{v}` is not an interval in seconds (0-65535)"))?
                }
                None if part == "deflate-on-oom" => c.deflate_on_oom = true,
                _ => return Err(format!("balloon: unknown option `{part}` (mib=N, deflate-on-oom, stats=S)")),
            }
        }
        c.amount_mib = mib.ok_or("balloon: mib=N is required")?;
        Ok(c)
    }
}

// --- MMDS ---

/// Which MMDS protocol the guest speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// `PUT /mmds/config` (and the `mmds-config` section of a Firecracker config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    /// The network interfaces (by `iface_id`) on which the guest reaches MMDS.
    pub network_interfaces: Vec<String>,
    /// The address MMDS answers on; 169.254.169.254 by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
}

impl MmdsConfig {
    /// The address MMDS answers on.
    pub fn address(&self) -> Result<[u8; 4], String> {
        let text = self.ipv4_address.as_deref().unwrap_or("169.254.169.254");
        let ip: std::net::Ipv4Addr = text.parse().map_err(|_| format!("`{text}` is not an IPv4 address"))?;
        if ip.is_multicast() || ip.is_broadcast() || ip.is_unspecified() {
            return Err(format!("`{text}` is not a unicast address"));
        }
        Ok(ip.octets())
    }

    /// Checks the configuration against the network interfaces the VM has (by `iface_id`).
    pub fn check(&self, interfaces: &[&str]) -> Result<(), String> {
        self.address()?;
        if self.network_interfaces.is_empty() {
            return Err("network_interfaces is empty".into());
        }
        match self.network_interfaces.iter().find(|i| !interfaces.contains(&i.as_str())) {
            Some(missing) => Err(format!("the network interface `{missing}` does not exist")),
            None => Ok(()),
        }
    }
}

/// A balloon target must fit in the guest's memory.
pub fn check_balloon_amount(amount_mib: u32, mem_size_mib: u64) -> Result<(), String> {
    if u64::from(amount_mib) > mem_size_mib {
        return Err(format!("Amount of pages requested is too large: {amount_mib} MiB of {mem_size_mib} MiB"));
    }
    Ok(())
}

// --- Snapshots ---

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    #[serde(default)]
    pub snapshot_type: SnapshotTypeName,
    pub snapshot_path: String,
    pub mem_file_path: String,
    /// Sent by clients of Firecracker before 1.7; the format version is ours, so it is ignored.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotTypeName {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: String,
    /// Firecracker's older spelling of `mem_backend` with a File backend.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetOverride>,
    /// Shoal's extension: a new guest CID and/or host socket for the snapshot's vsock
    /// device, so that clones of one snapshot differ.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// A network interface of the snapshot (by `iface_id`) that gets another host tap and,
/// optionally, another guest MAC (Shoal's extension to Firecracker's `network_overrides`).
/// The device reports the new MAC from the restore on; a Linux guest reads it when its driver
/// probes the device again (unbind and bind `virtio_net`), e.g. when told it was cloned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetOverride {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default)]
    pub guest_mac: Option<String>,
}

/// What a restore changes of the vsock device; the guest learns the new CID from the
/// TRANSPORT_RESET event every restored vsock device sends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    #[serde(default)]
    pub guest_cid: Option<u64>,
    #[serde(default)]
    pub uds_path: Option<PathBuf>,
}

// --- Logger and metrics ---

/// `PUT /logger` (Firecracker's fields; `show_level`, `show_log_origin` and `module` are
/// accepted and ignored: lines always carry their level).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design
    use super::*;

    #[test]
    fn cli_form_parses_and_bad_forms_are_refused() {
        let c = RateLimitConfig::parse("bw=1048576/1000+4096;ops=100/1000").unwrap();
        assert_eq!(c.bandwidth, Some(BucketConfig { size: 1 << 20, one_time_burst: 4096, refill_time: 1000 }));
        assert_eq!(c.ops, Some(BucketConfig { size: 100, one_time_burst: 0, refill_time: 1000 }));
        for bad in [
            "bw=10",
            "bw=0/1000",
            "iops=1/1",
            "bw=x/1000",
            "bw=10/0",
            "bw=1/18446744073709551615",
            "bw=18446744073709551615/1000",
            "ops=1/1000+18446744073709551615",
        ] {
            assert!(RateLimitConfig::parse(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn a_patch_keeps_replaces_or_removes_each_bucket() {
        let b = |size| Some(BucketConfig { size, one_time_burst: 0, refill_time: 1000 });
        let both = RateLimitConfig { bandwidth: b(100), ops: b(10) };
        let only_ops = RateLimitConfig { bandwidth: None, ops: b(20) };
        assert_eq!(
            RateLimitConfig::patched(Some(both), &only_ops),
            Some(RateLimitConfig { bandwidth: b(100), ops: b(20) })
        );
        let remove_bw = RateLimitConfig { bandwidth: b(0), ops: None };
        assert_eq!(
            RateLimitConfig::patched(Some(both), &remove_bw),
            Some(RateLimitConfig { bandwidth: None, ops: b(10) })
        );
        let remove_all = RateLimitConfig { bandwidth: b(0), ops: b(0) };
        assert_eq!(RateLimitConfig::patched(Some(both), &remove_all), None);
        assert_eq!(RateLimitConfig::patched(None, &only_ops), Some(only_ops));
        assert!(remove_all.validate_patch().is_ok());
        let too_slow = RateLimitConfig {
            bandwidth: Some(BucketConfig { size: 1, one_time_burst: 0, refill_time: u64::MAX }),
            ops: None,
        };
        assert!(too_slow.validate_patch().is_err());
    }
    #[test]
    fn the_cli_form_parses_and_bad_forms_are_refused() {
        let c = BalloonConfig::parse("mib=64,deflate-on-oom,stats=5").unwrap();
        assert_eq!(c, BalloonConfig { amount_mib: 64, deflate_on_oom: true, stats_polling_interval_s: 5 });
        for bad in ["", "deflate-on-oom", "mib=x", "mib=1,stats=70000", "mib=1,bogus"] {
            assert!(BalloonConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_and_mmds_addresses_are_checked() {
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Ok([2, 0, 0, 0, 0, 10]));
        assert_eq!(format_mac(&[2, 0, 0xab, 0, 0, 10]), "02:00:ab:00:00:0a");
        assert_eq!(parse_mac(&format_mac(&[6, 1, 2, 3, 4, 0xff])), Ok([6, 1, 2, 3, 4, 0xff]));
        for bad in ["02:00:00:00:00", "01:00:00:00:00:00", "02:00:00:00:00:zz", "2:0:0:0:0:0"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let c = |ip: Option<&str>| MmdsConfig {
            version: MmdsVersion::V2,
            network_interfaces: vec!["eth0".into()],
            ipv4_address: ip.map(Into::into),
        };
        assert_eq!(c(None).address(), Ok([169, 254, 169, 254]));
        for bad in ["224.0.0.1", "255.255.255.255", "0.0.0.0", "300.1.1.1"] {
            assert!(c(Some(bad)).address().is_err(), "{bad}");
        }
    }
}
