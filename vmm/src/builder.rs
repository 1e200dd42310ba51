//! Turns a `VmConfig` into a ready-to-run microVM: guest memory, the kernel and initrd loaded
//! with their boot information, the VM with its devices, and configured vCPUs. Every input is
//! checked before guest memory is allocated where that is possible, and every failure is an
//! error naming the input, never a panic.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot::{self, BootError, BootInfo};
use crate::arch::x86_64::e820_map;
use crate::arch::x86_64::layout::{CMDLINE_START, HIMEM_START};
use crate::arch::x86_64::layout::{VIRTIO_FIRST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::arch::x86_64::mptable::{self, MpTableError};
use crate::arch::x86_64::regs::EntryMode;
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::i8042::{I8042_BASE, I8042_KBD_IRQ, I8042_LEN};
use crate::devices::legacy::{SerialConsole, SerialSaved, COM1_BASE, COM1_IRQ, COM1_LEN, I8042};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::virtio::block::handler::FileDisk;
use crate::devices::virtio::block::VirtioBlock;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::VirtioNet;
use crate::devices::virtio::rng::VirtioRng;
use crate::devices::virtio::vsock::{VirtioVsock, VsockError};
use crate::devices::virtio::{IrqLine, VirtioDevice};
use crate::devices::EventFdTrigger;
use crate::vstate::memory::{create_guest_memory, MemoryBacking, MemoryError};
use crate::vstate::vcpu::{BootEntry, Vcpu, VcpuError, VcpuWiring};
use crate::vstate::vm::{Vm, VmError};
use kvm_ioctls::IoEventAddress;
use shoal_vmm_config::{ConfigError, VmConfig};

/// The machine's shape, which a restore must reproduce.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    pub vcpus: u32,
    pub mem_mib: u64,
    pub track_dirty_pages: bool,
    /// The guest has ACPI tables, with the VM Generation ID device a restore changes.
    pub acpi: bool,
}

/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors building a microVM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0} virtio devices, more than the interrupt lines and MMIO windows allow")]
    TooManyDevices(usize),
    #[error(transparent)]
    Acpi(#[from] crate::arch::x86_64::acpi::AcpiError),
    #[error("cannot read random bytes for the VM generation ID")]
    VmGenId(#[source] std::io::Error),
    #[error("cannot open kernel {path}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(PathBuf),
    #[error("cannot load kernel {path}: {source}")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path}: {source}")]
    KernelHeader {
        path: PathBuf,
        #[source]
        source: BootError,
    },
    #[error("cannot open initrd {path}")]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path}: {source}")]
    InitrdPlace {
        path: PathBuf,
        #[source]
        source: BootError,
    },
    #[error("cannot read initrd {0} into guest memory")]
    InitrdLoad(PathBuf),
    #[error("cannot restore the serial port: {0}")]
    Serial(String),
    #[error("cannot open tap {tap}")]
    TapOpen {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock")]
    Vsock(#[source] VsockError),
    #[error("cannot open disk {path}")]
    DiskOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the command line to guest memory")]
    Cmdline,
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot read the CPUID KVM supports")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A kernel in guest memory and how to enter it.
#[derive(Debug)]
pub struct LoadedKernel {
    pub entry: BootEntry,
    /// First guest byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, if the kernel was a bzImage.
    pub setup_header: Option<setup_header>,
}

/// The kernel formats we recognise by their magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Recognises an ELF by `\x7fELF` and a bzImage by `HdrS` at 0x202.
pub fn detect_kernel_format<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0))?;
    if image.read_exact(&mut magic).is_ok() && &magic == b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    image.seek(SeekFrom::Start(0x202))?;
    if image.read_exact(&mut magic).is_ok() && &magic == b"HdrS" {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path` into `mem`. ELF kernels with a PVH note are entered through it
/// (as Firecracker does); other ELF kernels and bzImages through the 64-bit Linux entry.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BuildError> {
    let mut file = File::open(path).map_err(|source| BuildError::KernelOpen { path: path.to_owned(), source })?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(BuildError::KernelFormat(path.to_owned()));
    }
    let format =
        detect_kernel_format(&mut file).map_err(|source| BuildError::KernelOpen { path: path.to_owned(), source })?;
    let load_err = |source| BuildError::KernelLoad { path: path.to_owned(), source };
    match format {
        Some(KernelFormat::Elf) => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry { mode: EntryMode::Pvh, address: addr.0 },
                _ => BootEntry { mode: EntryMode::Linux64, address: r.kernel_load.0 },
            };
            Ok(LoadedKernel { entry, end: r.kernel_end, setup_header: None })
        }
        Some(KernelFormat::BzImage) => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let hdr = r.setup_header.ok_or(BuildError::KernelFormat(path.to_owned()))?;
            boot::check_bzimage_header(&hdr)
                .map_err(|source| BuildError::KernelHeader { path: path.to_owned(), source })?;
            let address = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            Ok(LoadedKernel {
                entry: BootEntry { mode: EntryMode::Linux64, address },
                end: r.kernel_end,
                setup_header: Some(hdr),
            })
        }
        None => Err(BuildError::KernelFormat(path.to_owned())),
    }
}

/// Places and reads the initrd; returns its (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<(u64, u64), BuildError> {
    let mut file = File::open(path).map_err(|source| BuildError::InitrdOpen { path: path.to_owned(), source })?;
    let size = file.metadata().map_err(|source| BuildError::InitrdOpen { path: path.to_owned(), source })?.len();
    let addr_max = kernel.setup_header.map(|h| h.initrd_addr_max);
    let addr = boot::place_initrd(size, kernel.end, mem_size, addr_max)
        .map_err(|source| BuildError::InitrdPlace { path: path.to_owned(), source })?;
    let len = usize::try_from(size).map_err(|_| BuildError::InitrdLoad(path.to_owned()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|_| BuildError::InitrdLoad(path.to_owned()))?;
    Ok((addr, size))
}

/// Writes the boot information for the loaded kernel.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u64)>,
) -> Result<(), BuildError> {
    let full = config.full_cmdline();
    let mut cmdline = full.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START)).map_err(|_| BuildError::Cmdline)?;
    let vcpus = u8::try_from(config.vcpus).map_err(|_| MpTableError::TooManyCpus(u8::MAX))?;
    mptable::write(mem, vcpus)?;
    let e820 = e820_map(config.mem_bytes());
    match kernel.entry.mode {
        EntryMode::Pvh => boot::write_pvh_start_info(mem, CMDLINE_START, initrd, &e820)?,
        EntryMode::Linux64 => {
            let params = boot::build_boot_params(&BootInfo {
                setup_header: kernel.setup_header,
                cmdline_addr: CMDLINE_START,
                cmdline_len: full.len(),
                initrd,
                e820: &e820,
            })?;
            boot::write_boot_params(mem, &params)?;
        }
    }
    Ok(())
}

/// What a virtio device is, as configured (and as a snapshot records it to rebuild it). Plain
/// fields only: snapshots encode it with postcard, which has no room for skipped fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceSpec {
    Block(DiskSpec),
    Net(NetSpec),
    Rng(RngSpec),
    Vsock(VsockSpec),
    /// Appended last: snapshots of the variants above decode as before.
    Balloon(crate::devices::virtio::balloon::BalloonConfig),
}

/// The entropy device in a `DeviceSpec`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngSpec {
    pub rate_limiter: Option<crate::devices::rate_limiter::RateLimitConfig>,
}

/// The vsock device in a `DeviceSpec`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockSpec {
    pub cid: u64,
    pub uds_path: PathBuf,
}

/// A network interface in a `DeviceSpec`: the tap and the MAC the guest was given.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    /// The interface's id (`iface_id`), which snapshot loads use to give it another tap.
    pub id: String,
    pub tap: String,
    pub mac: [u8; 6],
    pub rx_rate_limiter: Option<crate::devices::rate_limiter::RateLimitConfig>,
    pub tx_rate_limiter: Option<crate::devices::rate_limiter::RateLimitConfig>,
}

/// A random locally administered unicast MAC.
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    let _ = crate::devices::virtio::rng::Entropy::fill(&mut crate::devices::virtio::rng::HostEntropy, &mut mac);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// Gives an ACPI guest a new random VM Generation ID (at boot, and on every restore: then
/// `notify_vmgenid` tells the guest to read it).
pub fn renew_vmgenid(mem: &GuestMemoryMmap) -> Result<(), BuildError> {
    use crate::arch::x86_64::acpi;
    let mut id = [0u8; acpi::VMGENID_LEN];
    crate::devices::virtio::rng::Entropy::fill(&mut crate::devices::virtio::rng::HostEntropy, &mut id)
        .map_err(BuildError::VmGenId)?;
    Ok(acpi::write_vmgenid(mem, &id)?)
}

/// Raises the Generic Event Device's interrupt, whose handler makes an ACPI guest re-read its
/// VM Generation ID (Linux then reseeds its RNG). Call once the vCPUs and irqchip are in
/// their restored state, or the interrupt is lost.
pub fn notify_vmgenid(vm: &Vm) -> Result<(), BuildError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irq(&evt, crate::arch::x86_64::acpi::GED_IRQ)?;
    evt.write(1).map_err(BuildError::EventFd)
}

/// A disk's configuration in a `DeviceSpec`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
    pub rate_limiter: Option<crate::devices::rate_limiter::RateLimitConfig>,
}

impl DeviceSpec {
    /// The devices `config` asks for, in their MMIO order: disks, network interfaces, the
    /// rng, vsock, the balloon.
    pub fn from_config(config: &VmConfig) -> Vec<DeviceSpec> {
        let mut specs: Vec<DeviceSpec> = config
            .disks
            .iter()
            .map(|d| {
                DeviceSpec::Block(DiskSpec {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    id: d.id.clone(),
                    rate_limiter: d.rate_limiter,
                })
            })
            .collect();
        for (i, n) in config.nets.iter().enumerate() {
            // validate() has checked the MAC.
            let mac = n
                .mac
                .as_deref()
                .and_then(|m| crate::devices::virtio::net::parse_mac(m).ok())
                .unwrap_or_else(random_mac);
            let id = n.id.clone().unwrap_or_else(|| format!("eth{i}"));
            specs.push(DeviceSpec::Net(NetSpec {
                id,
                tap: n.tap.clone(),
                mac,
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            }));
        }
        if config.rng {
            specs.push(DeviceSpec::Rng(RngSpec { rate_limiter: config.rng_rate_limiter }));
        }
        if let Some(v) = &config.vsock {
            specs.push(DeviceSpec::Vsock(VsockSpec { cid: v.guest_cid, uds_path: v.uds_path.clone() }));
        }
        if let Some(b) = config.balloon {
            specs.push(DeviceSpec::Balloon(b));
        }
        specs
    }
}

/// A virtio device as the event loop sees it: its transport and the eventfds KVM signals when
/// the guest notifies one of its queues.
pub struct VirtioSlot {
    pub name: String,
    pub spec: DeviceSpec,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue_evts: Vec<EventFd>,
    /// Signalled by the transport when the driver's register writes left device work for the
    /// VMM thread (activation, reset).
    pub wake: EventFd,
}

impl std::fmt::Debug for VirtioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSlot").field("name", &self.name).finish()
    }
}

/// The port-I/O devices every microVM has and what the rest of the VMM holds of them.
#[derive(Debug)]
pub struct LegacyDevices {
    pub serial: Arc<Mutex<SerialConsole>>,
    /// Signalled when the guest resets through the i8042.
    pub reset_evt: EventFd,
    pub reset_requested: Arc<AtomicBool>,
    pub guest_panicked: Arc<AtomicBool>,
    pub pio: Arc<Bus>,
    /// The keyboard controller, for `SendCtrlAltDel`.
    pub i8042: Arc<Mutex<I8042>>,
}

/// Creates COM1 (fresh, or continuing from `serial_state`) and the i8042 on the port bus, with
/// the serial interrupt wired to the in-kernel irqchip.
pub fn attach_legacy(
    vm: &Vm,
    console: Box<dyn Write + Send>,
    serial_state: Option<&SerialSaved>,
) -> Result<LegacyDevices, BuildError> {
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irq(&serial_irq, COM1_IRQ)?;
    let guest_panicked = Arc::new(AtomicBool::new(false));
    let serial = match serial_state {
        None => SerialConsole::new(EventFdTrigger(serial_irq), console, guest_panicked.clone()),
        Some(saved) => SerialConsole::restore(EventFdTrigger(serial_irq), console, guest_panicked.clone(), saved)
            .map_err(BuildError::Serial)?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let reset_requested = Arc::new(AtomicBool::new(false));
    let i8042_evt = EventFdTrigger(reset_evt.try_clone().map_err(BuildError::EventFd)?);
    let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irq(&kbd_irq, I8042_KBD_IRQ)?;
    let i8042 =
        Arc::new(Mutex::new(I8042::new(i8042_evt, reset_requested.clone()).with_kbd_irq(EventFdTrigger(kbd_irq))));
    let mut bus = Bus::new();
    bus.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
    bus.insert(i8042.clone(), I8042_BASE, I8042_LEN)?;
    Ok(LegacyDevices { serial, reset_evt, reset_requested, guest_panicked, pio: Arc::new(bus), i8042 })
}

/// Creates the virtio devices `specs` describes, each in its own MMIO window (in order) with
/// its own interrupt line, and wires the queue notifications through ioeventfds.
/// MMDS for the devices being attached: which interfaces serve it, and the data they serve.
#[derive(Debug, Clone, Copy)]
pub struct MmdsWiring<'a> {
    pub config: &'a crate::devices::virtio::net::mmds::store::MmdsConfig,
    pub store: &'a crate::devices::virtio::net::mmds::SharedStore,
}

pub fn attach_virtio(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    specs: &[DeviceSpec],
    mmio: &mut Bus,
    mmds: Option<MmdsWiring>,
) -> Result<Vec<VirtioSlot>, BuildError> {
    let mmds_ip = match mmds {
        Some(m) => {
            m.store.lock().unwrap_or_else(|p| p.into_inner()).set_version(m.config.version);
            Some(m.config.address().map_err(|e| BuildError::Config(ConfigError::Device(format!("mmds: {e}"))))?)
        }
        None => None,
    };
    if specs.len() > crate::arch::x86_64::layout::VIRTIO_MAX_DEVICES {
        return Err(BuildError::TooManyDevices(specs.len()));
    }
    let mut slots = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let (name, device): (String, Box<dyn VirtioDevice>) = match spec {
            DeviceSpec::Block(d) => {
                let open_err = |source| BuildError::DiskOpen { path: d.path.clone(), source };
                let file =
                    std::fs::OpenOptions::new().read(true).write(!d.read_only).open(&d.path).map_err(open_err)?;
                let disk = FileDisk::new(file).map_err(open_err)?;
                let id = d.id.clone().unwrap_or_else(|| format!("disk{i}"));
                let limiter = d.rate_limiter.as_ref().map(RateLimiter::new);
                (format!("block {id}"), Box::new(VirtioBlock::new(Box::new(disk), d.read_only, &id, limiter)))
            }
            DeviceSpec::Net(n) => {
                let tap = Tap::open(&n.tap).map_err(|source| BuildError::TapOpen { tap: n.tap.clone(), source })?;
                let backend: Box<dyn crate::devices::virtio::net::tap::NetBackend> = match (mmds, mmds_ip) {
                    (Some(m), Some(ip)) if m.config.network_interfaces.contains(&n.id) => Box::new(
                        crate::devices::virtio::net::mmds::MmdsBackend::new(Box::new(tap), ip, m.store.clone()),
                    ),
                    _ => Box::new(tap),
                };
                let limiters = (
                    n.rx_rate_limiter.as_ref().map(RateLimiter::new),
                    n.tx_rate_limiter.as_ref().map(RateLimiter::new),
                );
                (
                    format!("net {}", n.tap),
                    Box::new(VirtioNet::new(backend, n.mac).with_limiters(limiters.0, limiters.1)),
                )
            }
            DeviceSpec::Rng(r) => {
                ("rng".into(), Box::new(VirtioRng::new().with_limiter(r.rate_limiter.as_ref().map(RateLimiter::new))))
            }
            DeviceSpec::Vsock(v) => {
                ("vsock".into(), Box::new(VirtioVsock::new(v.cid, &v.uds_path).map_err(BuildError::Vsock)?))
            }
            DeviceSpec::Balloon(b) => {
                ("balloon".into(), Box::new(crate::devices::virtio::balloon::VirtioBalloon::new(*b)))
            }
        };
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irq(&irq_evt, VIRTIO_FIRST_IRQ + i as u32)?;
        let mut queue_evts = Vec::new();
        for q in 0..device.queue_max_sizes().len() {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
            vm.fd
                .register_ioevent(&evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), q as u32)
                .map_err(|e| VmError::Ioctl("register a queue notification eventfd", e))?;
            queue_evts.push(evt);
        }
        let wake = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        let transport = MmioTransport::new(device, mem.clone(), Arc::new(IrqLine::new(irq_evt)))
            .with_wake(wake.try_clone().map_err(BuildError::EventFd)?);
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        slots.push(VirtioSlot { name, spec: spec.clone(), transport, queue_evts, wake });
    }
    Ok(slots)
}

/// A microVM ready to run: nothing has executed guest code yet.
#[derive(Debug)]
pub struct MicroVm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub serial: Arc<Mutex<SerialConsole>>,
    /// Signalled when the guest resets through the i8042.
    pub reset_evt: EventFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// The virtio devices, for the event loop.
    pub virtio: Vec<VirtioSlot>,
    /// Set when the guest's console shows a kernel panic.
    pub guest_panicked: Arc<AtomicBool>,
    /// Set when the guest asked for a reset through the i8042.
    pub reset_requested: Arc<AtomicBool>,
    /// The keyboard controller, for `SendCtrlAltDel`.
    pub i8042: Arc<Mutex<I8042>>,
    /// The machine's shape, as a snapshot records it.
    pub machine: MachineState,
    /// Where guest memory comes from (a snapshot of a restored guest needs to know).
    pub backing: MemoryBacking,
    /// Restores since the last cold boot (see `SnapshotState::generation`).
    pub generation: u64,
    /// Which interfaces serve MMDS, as a snapshot records it.
    pub mmds: Option<crate::devices::virtio::net::mmds::store::MmdsConfig>,
}

/// Builds the microVM described by `config`, with the guest console written to `console`;
/// its MMDS interfaces (if any) serve `mmds`.
pub fn build_microvm(
    config: &VmConfig,
    console: Box<dyn Write + Send>,
    mmds: &crate::devices::virtio::net::mmds::SharedStore,
) -> Result<MicroVm, BuildError> {
    config.validate()?;
    // Fail on unreadable inputs before any memory is mapped or KVM is opened.
    File::open(&config.kernel).map_err(|source| BuildError::KernelOpen { path: config.kernel.clone(), source })?;
    if let Some(initrd) = &config.initrd {
        File::open(initrd).map_err(|source| BuildError::InitrdOpen { path: initrd.clone(), source })?;
    }

    let vm = Vm::new()?;
    config.validate_for_host(Vm::max_vcpus(&vm.kvm))?;
    let mem = create_guest_memory(config.mem_bytes())?;
    vm.register_memory(&mem, config.track_dirty_pages)?;
    vm.setup_irqchip()?;
    let kernel = load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(&mem, path, &kernel, config.mem_bytes())?),
        None => None,
    };
    write_boot_info(&mem, config, &kernel, initrd)?;

    let LegacyDevices { serial, reset_evt, reset_requested, guest_panicked, pio, i8042 } =
        attach_legacy(&vm, console, None)?;
    let mut mmio = Bus::new();
    let wiring = config.mmds.as_ref().map(|c| MmdsWiring { config: c, store: mmds });
    let virtio = attach_virtio(&vm, &mem, &DeviceSpec::from_config(config), &mut mmio, wiring)?;

    let supported = vm.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(BuildError::Cpuid)?;
    let mmio = Arc::new(mmio);
    let wiring = VcpuWiring {
        pio: pio.clone(),
        mmio: mmio.clone(),
        reset_requested: reset_requested.clone(),
        msr_list: Arc::new(vm.msrs_to_save()?),
    };
    let count = config.vcpus as u8; // validated: 1..=254
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        vcpus.push(Vcpu::new(&vm.fd, index, count, &supported, wiring.clone())?);
    }
    vcpus[0].setup_boot(&mem, kernel.entry)?;
    if config.acpi {
        let layout = crate::arch::x86_64::acpi::AcpiLayout { vcpus: count, virtio_devices: config.device_count() };
        crate::arch::x86_64::acpi::write_tables(&mem, &layout)?;
        renew_vmgenid(&mem)?;
    }
    tracing::info!(entry = format_args!("{:#x}", kernel.entry.address), mode = ?kernel.entry.mode, vcpus = count, mem_mib = config.mem_mib, "microvm built");
    let machine = MachineState {
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        track_dirty_pages: config.track_dirty_pages,
        acpi: config.acpi,
    };
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
        machine,
        backing: MemoryBacking::Anonymous,
        generation: 0,
        mmds: config.mmds.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn device_specs_survive_the_snapshot_encoding() {
        use crate::devices::rate_limiter::{BucketConfig, RateLimitConfig};
        let specs = vec![
            DeviceSpec::Block(DiskSpec {
                path: "/img/root.ext4".into(),
                read_only: false,
                id: None,
                rate_limiter: None,
            }),
            DeviceSpec::Block(DiskSpec {
                path: "d.raw".into(),
                read_only: true,
                id: Some("data".into()),
                rate_limiter: Some(RateLimitConfig {
                    bandwidth: None,
                    ops: Some(BucketConfig { size: 10, one_time_burst: 0, refill_time: 100 }),
                }),
            }),
            DeviceSpec::Rng(RngSpec { rate_limiter: None }),
        ];
        let bytes = crate::snapshot::format::encode(&specs).unwrap();
        assert_eq!(crate::snapshot::format::decode::<Vec<DeviceSpec>>(&bytes).unwrap(), specs);
    }

    #[test]
    fn kernel_formats_are_told_apart_by_magic() {
        let mut elf = Cursor::new(b"\x7fELF\x02\x01\x01".to_vec());
        assert_eq!(detect_kernel_format(&mut elf).unwrap(), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_kernel_format(&mut Cursor::new(bz)).unwrap(), Some(KernelFormat::BzImage));
        assert_eq!(detect_kernel_format(&mut Cursor::new(b"#!/bin/sh\necho hi\n".to_vec())).unwrap(), None);
        assert_eq!(detect_kernel_format(&mut Cursor::new(Vec::new())).unwrap(), None);
    }

    #[test]
    fn bad_kernels_give_errors_naming_the_file() {
        let mem = create_guest_memory(32 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("shoal-kernel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.txt");
        std::fs::write(&text, "just some text\n").unwrap();
        let err = load_kernel(&mem, &text).unwrap_err();
        assert_eq!(err.to_string(), format!("kernel {} is neither an ELF vmlinux nor a bzImage", text.display()));
        let truncated = dir.join("truncated.elf");
        std::fs::write(&truncated, b"\x7fELF\x02\x01\x01\x00").unwrap();
        let err = load_kernel(&mem, &truncated).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot load kernel {}", truncated.display())), "{err}");
        let missing = dir.join("missing");
        assert!(matches!(load_kernel(&mem, &missing), Err(BuildError::KernelOpen { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
