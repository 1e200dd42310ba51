//! Snapshots of a paused microVM and restoring them in a new process.
//!
//! A snapshot is two files: the state file (`format`: versioned, checksummed; vCPUs, VM-wide
//! KVM state, devices, machine shape, the host CPU it was taken on) and the memory file
//! (`memfile`: the guest's RAM, sparse). Restoring maps the memory file private, so it costs
//! the same at any memory size and many clones can share one file; the guest's writes stay in
//! its own process.
//!
//! This module owns the state types' layout; the live objects (`Vm`, `Vcpu`, `SerialConsole`)
//! read and write their own parts.
//!
//! Trust model: a state file is configuration, not data from the guest. It names host paths
//! (disk images, taps, the vsock socket) that a restore opens with the VMM's rights, and it
//! holds vCPU and device state KVM will run. Load only state files the VMM's operator wrote
//! or vetted, into a jailed VMM (`--jail`) whose root holds only what that VM may open. What
//! the VMM does check, so that a damaged or careless file fails with an error and never
//! panics or overruns: both files are regular files, the state file is read through one
//! descriptor and at most `format::MAX_PAYLOAD` bytes, the envelope (magic, version, zero
//! reserved bytes, length, CRC), the payload's decoding, the machine's shape (vCPU count,
//! memory size, device count within the interrupt lines and MMIO windows), and each device's
//! saved queues against guest memory.

pub mod format;
pub mod memfile;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};

use crate::builder::{DeviceSpec, LegacyDevices, MicroVm};
use crate::devices::bus::Bus;
use crate::devices::legacy::{SerialConsole, SerialSaved};
use crate::devices::virtio::mmio::TransportSaved;
use crate::vstate::memory::{map_guest_memory_file, MemoryBacking, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuState, VcpuWiring};
use crate::vstate::vm::{Vm, VmError, VmState};
use format::FormatError;
use memfile::{MemFileError, Range};

/// Full: the whole guest memory. Diff: the pages written since the previous snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    Full,
    Diff,
}

/// The machine's shape (saved in every snapshot).
pub use crate::builder::MachineState;

/// Which CPU a snapshot was taken on: vendor and family/model/stepping (CPUID leaves 0 and 1).
/// Guest state holds CPU features and MSRs of that model; another model is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSignature {
    pub vendor: String,
    pub family_model_stepping: u32,
}

impl CpuSignature {
    /// This host's signature, from the CPUID instruction: KVM passes the vendor and the
    /// family/model/stepping through unchanged, and asking the CPU is much quicker than
    /// KVM_GET_SUPPORTED_CPUID (a restore's budget is a few milliseconds).
    pub fn host() -> CpuSignature {
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        CpuSignature::from_leaves([l0.ebx, l0.edx, l0.ecx], l1.eax)
    }

    fn from_leaves(vendor: [u32; 3], leaf1_eax: u32) -> CpuSignature {
        let bytes: Vec<u8> = vendor.iter().flat_map(|r| r.to_le_bytes()).collect();
        CpuSignature {
            vendor: String::from_utf8_lossy(&bytes).into_owned(),
            family_model_stepping: leaf1_eax & 0x0fff_3fff,
        }
    }

    /// The signature in a CPUID table.
    #[cfg(test)]
    fn of(cpuid: &kvm_bindings::CpuId) -> CpuSignature {
        let e = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f).copied().unwrap_or_default();
        let (l0, l1) = (e(0), e(1));
        CpuSignature::from_leaves([l0.ebx, l0.edx, l0.ecx], l1.eax)
    }
}

impl std::fmt::Display for CpuSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let eax = self.family_model_stepping;
        let family = ((eax >> 8) & 0xf) + ((eax >> 20) & 0xff);
        let model = ((eax >> 4) & 0xf) | ((eax >> 12) & 0xf0);
        write!(f, "{} family {family:#x} model {model:#x} stepping {}", self.vendor, eax & 0xf)
    }
}

/// Everything in a state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub kind: SnapshotKind,
    pub machine: MachineState,
    pub cpu: CpuSignature,
    /// Size of the memory file this state goes with.
    pub memory_bytes: u64,
    /// For a diff: the memory file ranges it holds (what `merge` copies into the base).
    pub dirty: Vec<Range>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSaved,
    /// The virtio devices, in MMIO order: what each is (to open it again) and its transport.
    pub devices: Vec<(DeviceSpec, TransportSaved)>,
    /// How many restores lie between this state and a cold boot (0: taken from a cold-booted
    /// VM). A restore increments it; every clone of one snapshot gets the same value, so it
    /// tells a guest-visible "was restored" apart, not the clones from each other.
    pub generation: u64,
    /// Which interfaces serve MMDS (its data is not in a snapshot, as in Firecracker: the
    /// restoring VMM's store, filled through its API, is served).
    pub mmds: Option<crate::devices::virtio::net::mmds::store::MmdsConfig>,
}

/// Errors creating or restoring snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot state file {path}")]
    ReadState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state file {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("cannot write snapshot state file {path}")]
    WriteState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open snapshot memory file {path}")]
    MemoryOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("snapshot memory file {path} is {have} bytes but the snapshot's guest has {want} bytes of memory")]
    MemorySize { path: PathBuf, have: u64, want: u64 },
    #[error("snapshot was taken on a {snapshot}; this host is a {host}")]
    Cpu { snapshot: CpuSignature, host: CpuSignature },
    #[error("snapshot state is inconsistent: {0}")]
    Inconsistent(String),
    #[error("diff snapshots need dirty page tracking (machine-config track_dirty_pages)")]
    DiffWithoutTracking,
    #[error("snapshot {path} is a full snapshot; only a diff is merged into a base")]
    NotADiff { path: PathBuf },
    #[error("override: {0}")]
    Override(String),
    #[error("virtio device {index}: {why}")]
    Device { index: usize, why: String },
    #[error(transparent)]
    Build(#[from] crate::builder::BuildError),
    #[error("{path} is a diff snapshot: merge it into its base first (shoal-vmm --merge DIFF_DIR --into BASE_DIR)")]
    UnmergedDiff { path: PathBuf },
    #[error(transparent)]
    MemFile(#[from] MemFileError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// What a snapshot reads from a paused microVM besides its vCPUs.
#[derive(Debug)]
pub struct SnapshotSource<'a> {
    pub vm: &'a Vm,
    pub mmds: Option<&'a crate::devices::virtio::net::mmds::store::MmdsConfig>,
    pub devices: Vec<(DeviceSpec, TransportSaved)>,
    pub mem: &'a GuestMemoryMmap,
    pub backing: &'a MemoryBacking,
    pub serial: &'a Mutex<SerialConsole>,
    pub machine: &'a MachineState,
    pub generation: u64,
}

/// Writes a snapshot of a paused microVM: memory file first, then the state file (each under a
/// temporary name, renamed into place), so a state file never names a memory file that is not
/// complete.
pub fn create(
    src: &SnapshotSource,
    vcpus: Vec<VcpuState>,
    kind: SnapshotKind,
    state_path: &Path,
    mem_path: &Path,
) -> Result<(), SnapshotError> {
    if kind == SnapshotKind::Diff && !src.machine.track_dirty_pages {
        return Err(SnapshotError::DiffWithoutTracking);
    }
    let vm_state = src.vm.save_state()?;
    let serial = src.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
    let dirty = match kind {
        SnapshotKind::Full => {
            memfile::write_full(src.mem, src.backing, mem_path)?;
            if src.machine.track_dirty_pages {
                // The next diff starts from here.
                src.vm.take_dirty_log(src.mem)?;
            }
            crate::vstate::memory::take_device_dirty(src.mem);
            Vec::new()
        }
        SnapshotKind::Diff => {
            // vCPU writes are in KVM's dirty log; device writes (virtio buffers, used rings)
            // went through vm-memory, which marked them in the regions' bitmaps.
            let mut log = src.vm.take_dirty_log(src.mem)?;
            for (kvm, devices) in log.iter_mut().zip(crate::vstate::memory::take_device_dirty(src.mem)) {
                for (k, d) in kvm.iter_mut().zip(devices) {
                    *k |= d;
                }
            }
            memfile::write_diff(src.mem, &log, mem_path)?
        }
    };
    let state = SnapshotState {
        kind,
        machine: src.machine.clone(),
        cpu: CpuSignature::host(),
        memory_bytes: crate::vstate::memory::total_size(src.mem),
        dirty,
        vm: vm_state,
        vcpus,
        serial,
        devices: src.devices.clone(),
        generation: src.generation,
        mmds: src.mmds.cloned(),
    };
    let bytes =
        format::encode(&state).map_err(|source| SnapshotError::Format { path: state_path.to_owned(), source })?;
    write_atomically(state_path, &bytes)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let err = |source| SnapshotError::WriteState { path: path.to_owned(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = File::create(&tmp).and_then(|mut f| f.write_all(bytes)).and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Reads and checks a state file.
pub fn read_state(path: &Path) -> Result<SnapshotState, SnapshotError> {
    use std::io::Read;
    let err = |source| SnapshotError::ReadState { path: path.to_owned(), source };
    let file = File::open(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(SnapshotError::NotAFile { path: path.to_owned() });
    }
    let limit = format::MAX_PAYLOAD + 64;
    if meta.len() > limit {
        return Err(SnapshotError::Format { path: path.to_owned(), source: FormatError::TooLarge(meta.len()) });
    }
    // Read from the descriptor checked above, never more than the limit (a file that grows
    // while it is read is cut there, and then fails its length check).
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(err)?;
    let state: SnapshotState =
        format::decode(&bytes).map_err(|source| SnapshotError::Format { path: path.to_owned(), source })?;
    check_consistent(&state)?;
    Ok(state)
}

/// Checks what a decoded state promises about itself, before KVM sees any of it.
fn check_consistent(state: &SnapshotState) -> Result<(), SnapshotError> {
    let m = &state.machine;
    if m.vcpus == 0 || m.vcpus > 254 || state.vcpus.len() != m.vcpus as usize {
        return Err(SnapshotError::Inconsistent(format!("{} vCPU states for {} vCPUs", state.vcpus.len(), m.vcpus)));
    }
    let want = m.mem_mib.checked_mul(1 << 20).filter(|&b| b <= shoal_vmm_config::limits::MAX_MEM_MIB << 20);
    if want != Some(state.memory_bytes) {
        return Err(SnapshotError::Inconsistent(format!(
            "{} bytes of memory for {} MiB",
            state.memory_bytes, m.mem_mib
        )));
    }
    let max_devices = crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES;
    if state.devices.len() > max_devices {
        return Err(SnapshotError::Inconsistent(format!(
            "{} virtio devices, more than the {max_devices} interrupt lines and MMIO windows allow",
            state.devices.len()
        )));
    }
    if state.serial.in_buffer.len() > 64 {
        return Err(SnapshotError::Inconsistent("serial receive FIFO over its size".into()));
    }
    Ok(())
}

/// File names of a snapshot directory (`shoal-vmm --restore DIR`, `--merge`).
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Merges a diff snapshot into its base, in place: the diff's pages go into the base memory
/// file, then the base state file is replaced by the diff's state (as a full snapshot). The
/// base directory then holds a full snapshot of the moment the diff was taken.
pub fn merge(diff_state: &Path, diff_mem: &Path, base_state: &Path, base_mem: &Path) -> Result<(), SnapshotError> {
    let mut state = read_state(diff_state)?;
    if state.kind != SnapshotKind::Diff {
        return Err(SnapshotError::NotADiff { path: diff_state.to_owned() });
    }
    let base = read_state(base_state)?;
    if base.memory_bytes != state.memory_bytes || base.machine.vcpus != state.machine.vcpus {
        return Err(SnapshotError::Inconsistent(format!(
            "{} and {} are snapshots of different machines",
            diff_state.display(),
            base_state.display()
        )));
    }
    memfile::merge_diff(base_mem, diff_mem, &state.dirty)?;
    state.kind = SnapshotKind::Full;
    state.dirty.clear();
    let bytes =
        format::encode(&state).map_err(|source| SnapshotError::Format { path: base_state.to_owned(), source })?;
    write_atomically(base_state, &bytes)
}

/// `merge` for snapshot directories.
pub fn merge_dirs(diff: &Path, base: &Path) -> Result<(), SnapshotError> {
    merge(&diff.join(STATE_FILE), &diff.join(MEMORY_FILE), &base.join(STATE_FILE), &base.join(MEMORY_FILE))
}

pub use shoal_vmm_config::{NetOverride, VsockOverride};

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Run the vCPUs at once; otherwise they wait for a resume.
    pub resume: bool,
    /// Log dirty pages from now on (diff snapshots of the restored VM), even if the snapshot's
    /// VM did not.
    pub track_dirty_pages: bool,
    /// A new identity for the snapshot's vsock device (so that clones differ): its guest CID
    /// and/or its host socket.
    pub vsock_override: Option<VsockOverride>,
    /// Other taps for the snapshot's network interfaces (Firecracker's network_overrides).
    pub net_overrides: Vec<NetOverride>,
    /// The data the snapshot's MMDS interfaces serve (a fresh empty store if None).
    pub mmds_store: Option<crate::devices::virtio::net::mmds::SharedStore>,
}

/// Builds a microVM from a snapshot, ready to run. The guest console goes to `console`.
pub fn restore(
    state_path: &Path,
    mem_path: &Path,
    console: Box<dyn Write + Send>,
    options: RestoreOptions,
) -> Result<MicroVm, SnapshotError> {
    let mut state = read_state(state_path)?;
    if state.kind == SnapshotKind::Diff {
        return Err(SnapshotError::UnmergedDiff { path: state_path.to_owned() });
    }
    state.machine.track_dirty_pages |= options.track_dirty_pages;
    let file =
        File::open(mem_path).map_err(|source| SnapshotError::MemoryOpen { path: mem_path.to_owned(), source })?;
    let meta = file.metadata().map_err(|source| SnapshotError::MemoryOpen { path: mem_path.to_owned(), source })?;
    if !meta.is_file() {
        return Err(SnapshotError::NotAFile { path: mem_path.to_owned() });
    }
    let have = meta.len();
    if have != state.memory_bytes {
        return Err(SnapshotError::MemorySize { path: mem_path.to_owned(), have, want: state.memory_bytes });
    }

    let vm = Vm::new()?;
    let host = CpuSignature::host();
    if host != state.cpu {
        return Err(SnapshotError::Cpu { snapshot: state.cpu, host });
    }
    if state.vcpus.len() > Vm::max_vcpus(&vm.kvm) {
        return Err(SnapshotError::Inconsistent(format!("{} vCPUs, more than KVM allows here", state.vcpus.len())));
    }
    let mem = map_guest_memory_file(state.memory_bytes, &file)?;
    vm.register_memory(&mem, state.machine.track_dirty_pages)?;
    vm.setup_irqchip()?;
    vm.restore_state(&state.vm)?;

    let LegacyDevices { serial, reset_evt, reset_requested, guest_panicked, pio, i8042 } =
        crate::builder::attach_legacy(&vm, console, Some(&state.serial))?;

    let mut specs: Vec<DeviceSpec> = state.devices.iter().map(|(spec, _)| spec.clone()).collect();
    for o in &options.net_overrides {
        let Some(DeviceSpec::Net(n)) = specs.iter_mut().find(|s| matches!(s, DeviceSpec::Net(n) if n.id == o.iface_id))
        else {
            return Err(SnapshotError::Override(format!("the snapshot has no network interface `{}`", o.iface_id)));
        };
        n.tap = o.host_dev_name.clone();
        if let Some(mac) = &o.guest_mac {
            n.mac = crate::devices::virtio::net::parse_mac(mac)
                .map_err(|e| SnapshotError::Override(format!("network interface `{}`: {e}", o.iface_id)))?;
        }
    }
    if let Some(o) = &options.vsock_override {
        let Some(DeviceSpec::Vsock(v)) = specs.iter_mut().find(|s| matches!(s, DeviceSpec::Vsock(_))) else {
            return Err(SnapshotError::Override("the snapshot has no vsock device".into()));
        };
        if let Some(cid) = o.guest_cid {
            crate::devices::virtio::vsock::check_cid(cid)
                .map_err(|e| SnapshotError::Override(format!("vsock: {e}")))?;
            v.cid = cid;
        }
        if let Some(p) = &o.uds_path {
            v.uds_path = p.clone();
        }
    }
    let mut mmio = Bus::new();
    let store = options.mmds_store.clone().unwrap_or_else(|| {
        Arc::new(Mutex::new(crate::devices::virtio::net::mmds::store::MmdsStore::new(
            crate::devices::virtio::net::mmds::store::DEFAULT_SIZE_LIMIT,
        )))
    });
    let wiring = state.mmds.as_ref().map(|c| crate::builder::MmdsWiring { config: c, store: &store });
    let virtio = crate::builder::attach_virtio(&vm, &mem, &specs, &mut mmio, wiring)?;
    for (index, (slot, (_, saved))) in virtio.iter().zip(&state.devices).enumerate() {
        let mut t = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
        t.restore(saved).map_err(|why| SnapshotError::Device { index, why })?;
    }
    let mmio = Arc::new(mmio);
    let wiring = VcpuWiring {
        pio: pio.clone(),
        mmio: mmio.clone(),
        reset_requested: reset_requested.clone(),
        msr_list: Arc::new(vm.msrs_to_save()?),
    };
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (index, vs) in state.vcpus.iter().enumerate() {
        let mut vcpu = Vcpu::restore(&vm.fd, index as u8, vs, wiring.clone())?;
        vcpu.start_paused = !options.resume;
        vcpus.push(vcpu);
    }
    // Only now, with the LAPICs in their saved state, may a device interrupt: one raised
    // earlier would be delivered to no vCPU, or overwritten by the LAPIC's restore, and the
    // guest would wait for it for ever.
    for slot in &virtio {
        slot.transport.lock().unwrap_or_else(|p| p.into_inner()).resume_after_restore();
    }
    // An ACPI guest is told it is a new generation (a clone): a new ID, then its interrupt.
    if state.machine.acpi {
        crate::builder::renew_vmgenid(&mem)?;
        crate::builder::notify_vmgenid(&vm)?;
    }
    tracing::info!(
        vcpus = vcpus.len(),
        mem_mib = state.machine.mem_mib,
        generation = state.generation + 1,
        "microvm restored"
    );
    Ok(MicroVm {
        vm,
        mem,
        vcpus,
        serial,
        reset_evt,
        pio,
        mmio,
        virtio,
        guest_panicked,
        reset_requested,
        i8042,
        machine: state.machine,
        backing: MemoryBacking::File { path: mem_path.to_owned(), file },
        generation: state.generation + 1,
        mmds: state.mmds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_signature_is_the_one_kvm_reports() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let supported = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let host = CpuSignature::host();
        assert_eq!(host, CpuSignature::of(&supported));
        assert!(host.vendor.len() == 12 && host.vendor.is_ascii() && host.family_model_stepping != 0, "{host}");
    }
}
