//! vCPUs: configuration before the first run (CPUID, MSRs, LAPIC, and for the boot vCPU its
//! registers) and the run loop, one thread each. A vCPU thread ends by reporting why it
//! stopped (`VcpuStop`) over a channel and waking the VMM's event loop through an eventfd.
//! Application processors are left in KVM's wait-for-SIPI state: the guest starts them.
//!
//! While running, a vCPU takes commands (pause, resume) from its own channel. The commander
//! kicks the thread with `VCPU_KICK_SIGNAL`, whose handler sets `immediate_exit` in the
//! thread's kvm_run: KVM_RUN then returns at once even if the signal landed just before the
//! thread entered it, so no kick is lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_INTERNAL_ERROR_EMULATION, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::regs::{boot_fpu, boot_regs, setup_sregs, EntryMode};
use crate::arch::x86_64::{cpuid, msr};
use crate::devices::bus::Bus;
use crate::seccomp::{Seccomp, ThreadKind};

thread_local! {
    /// This thread's kvm_run, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // The pointer is this thread's own kvm_run mapping: `Vcpu::arm_kick` sets it on
            // the vCPU's thread and `Vcpu`'s Drop clears it before the mapping goes, so a
            // non-null pointer is mapped. A volatile byte store is async-signal-safe.
            // SAFETY: writing one byte of that live mapping.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn vcpu_kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (process-wide, once before vCPU threads start).
pub fn register_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(vcpu_kick_signal(), kick_handler)
        .map_err(|e| VcpuError::Signal(std::io::Error::from_raw_os_error(e.errno())))
}

/// A command for a running vCPU; `ack` gets one message once it is done.
#[derive(Debug)]
pub enum VcpuCommand {
    Pause {
        ack: Sender<u8>,
    },
    Resume {
        ack: Sender<u8>,
    },
    /// Read the vCPU's whole state; only while paused.
    Save {
        reply: Sender<Result<VcpuState, String>>,
    },
}

/// Everything KVM holds for one vCPU, as a snapshot keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot {what} of vCPU {index}")]
    Ioctl {
        what: &'static str,
        index: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index} accepted {set} of {want} boot MSRs")]
    Msrs { index: u8, set: usize, want: usize },
    #[error("cannot build the boot MSR list")]
    MsrList,
    #[error("cannot write the boot vCPU's tables")]
    Regs(#[source] crate::arch::x86_64::regs::RegsError),
    #[error("cannot start the thread of vCPU {0}")]
    Thread(u8, #[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    #[error("vCPU {index} refused MSR {msr:#x} from the snapshot")]
    RestoreMsr { index: u8, msr: u32 },
    #[error("the snapshot's CPUID has {0} entries, more than KVM takes")]
    CpuidList(usize),
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (KVM system event).
    Reset,
    /// The guest powered off (KVM system event) or halted with no irqchip wake-up possible.
    Shutdown,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault { rip: Option<u64> },
    /// KVM could not emulate an instruction or hit an internal error.
    InternalError { suberror: u32, rip: Option<u64> },
    /// Entering the guest failed.
    FailEntry { reason: u64 },
    /// An exit this VMM does not handle.
    Unhandled(String),
    /// KVM_RUN itself failed.
    RunFailed(String),
    /// The guest kernel panicked (seen on its console) and then reset.
    GuestPanic,
}

impl VcpuStop {
    /// True when the guest ended on purpose (reset or power-off), not by a fault.
    pub fn is_clean(&self) -> bool {
        matches!(self, VcpuStop::Reset | VcpuStop::Shutdown)
    }
}

impl std::fmt::Display for VcpuStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rip = |r: &Option<u64>| r.map(|r| format!(" at rip={r:#x}")).unwrap_or_default();
        match self {
            VcpuStop::Reset => f.write_str("guest reset"),
            VcpuStop::Shutdown => f.write_str("guest powered off"),
            VcpuStop::TripleFault { rip: r } => write!(f, "guest triple fault{}", rip(r)),
            VcpuStop::InternalError { suberror, rip: r } if *suberror == KVM_INTERNAL_ERROR_EMULATION => {
                write!(f, "KVM emulation failure{}", rip(r))
            }
            VcpuStop::InternalError { suberror, rip: r } => {
                write!(f, "KVM internal error (suberror {suberror}){}", rip(r))
            }
            VcpuStop::FailEntry { reason } => write!(f, "KVM failed to enter the guest (hardware reason {reason:#x})"),
            VcpuStop::Unhandled(what) => write!(f, "unhandled vCPU exit: {what}"),
            VcpuStop::RunFailed(e) => write!(f, "KVM_RUN failed: {e}"),
            VcpuStop::GuestPanic => {
                f.write_str("guest kernel panicked (\"Kernel panic - not syncing\" on its console), then reset")
            }
        }
    }
}

/// Per-vCPU exit counters.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub exits: AtomicU64,
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio: AtomicU64,
}

/// What every vCPU of a VM shares: the device buses, the reset flag, the MSR save list.
#[derive(Debug, Clone)]
pub struct VcpuWiring {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// Set by a device (the i8042) when the guest asks for a reset.
    pub reset_requested: Arc<AtomicBool>,
    /// The MSRs a snapshot saves (KVM's list of MSRs to save and restore).
    pub msr_list: Arc<Vec<u32>>,
}

/// One vCPU, configured and ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    pub index: u8,
    fd: VcpuFd,
    wiring: VcpuWiring,
    pub counters: Arc<VcpuCounters>,
    /// Start the run loop paused (a snapshot loaded without resume_vm).
    pub start_paused: bool,
}

impl Drop for Vcpu {
    /// Disarms the kick handler before `fd` unmaps kvm_run (Firecracker does the same): a
    /// kick that lands after this finds a null pointer instead of a freed mapping.
    fn drop(&mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| {
            if p.get() == run_ptr {
                p.set(std::ptr::null_mut());
            }
        });
    }
}

/// Reads the MSRs of `list` through `read` (KVM_GET_MSRS) in batches of at most
/// KVM_MAX_MSR_ENTRIES. KVM stops a batch at the first MSR it cannot read and says how many it
/// read: that one is skipped and the next batch starts after it. A batch read whole goes on
/// from the next MSR.
fn read_msrs_batched(
    list: &[u32],
    mut read: impl FnMut(&mut Msrs) -> Result<usize, kvm_ioctls::Error>,
) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let mut saved = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> =
            batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        let n = read(&mut msrs)?.min(batch.len());
        saved.extend_from_slice(&msrs.as_slice()[..n]);
        let skip = usize::from(n < batch.len());
        rest = &rest[n + skip..];
    }
    Ok(saved)
}

/// The TSC-deadline timer's MSR (the guest arms its timer with it).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// `saved` in the order a restore writes them: the TSC deadline after everything else, so
/// that it is read against the restored TSC (written before it, the deadline would be taken
/// against the new VM's TSC and fire far too late or at once), and after the LAPIC, which
/// must already be in TSC-deadline mode for KVM to keep it.
fn restore_order(saved: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let mut ordered = saved.to_vec();
    ordered.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
    ordered
}

/// Why restoring MSRs failed.
#[derive(Debug)]
enum MsrWriteError {
    /// KVM refused this MSR.
    Refused(u32),
    Ioctl(kvm_ioctls::Error),
}

/// Writes `entries` through `write` (KVM_SET_MSRS) in batches of at most
/// KVM_MAX_MSR_ENTRIES; every one must be accepted.
fn write_msrs_batched(
    entries: &[kvm_msr_entry],
    mut write: impl FnMut(&Msrs) -> Result<usize, kvm_ioctls::Error>,
) -> Result<(), MsrWriteError> {
    for batch in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(batch).map_err(|_| MsrWriteError::Ioctl(kvm_ioctls::Error::new(libc::EINVAL)))?;
        let set = write(&msrs).map_err(MsrWriteError::Ioctl)?;
        if set < batch.len() {
            return Err(MsrWriteError::Refused(batch[set].index));
        }
    }
    Ok(())
}

/// What the boot vCPU starts with.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub address: u64,
}

impl Vcpu {
    /// Creates vCPU `index` and applies the state every vCPU needs.
    pub fn new(
        vm: &VmFd,
        index: u8,
        count: u8,
        supported_cpuid: &CpuId,
        wiring: VcpuWiring,
    ) -> Result<Vcpu, VcpuError> {
        let io = |what| move |source| VcpuError::Ioctl { what, index, source };
        let fd = vm.create_vcpu(u64::from(index)).map_err(io("create"))?;

        let mut cpuid = supported_cpuid.clone();
        let tsc_deadline = vm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        cpuid::normalize(cpuid.as_mut_slice(), index, count, tsc_deadline);
        fd.set_cpuid2(&cpuid).map_err(io("set the CPUID"))?;

        let entries = msr::boot_msr_entries();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList)?;
        let set = fd.set_msrs(&msrs).map_err(io("set the MSRs"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs { index, set, want: entries.len() });
        }

        let mut lapic = fd.get_lapic().map_err(io("read the LAPIC"))?;
        let lvt0 = msr::lapic_reg(&lapic.regs, msr::APIC_LVT0);
        msr::set_lapic_reg(&mut lapic.regs, msr::APIC_LVT0, msr::set_apic_delivery_mode(lvt0, msr::APIC_MODE_EXTINT));
        let lvt1 = msr::lapic_reg(&lapic.regs, msr::APIC_LVT1);
        msr::set_lapic_reg(&mut lapic.regs, msr::APIC_LVT1, msr::set_apic_delivery_mode(lvt1, msr::APIC_MODE_NMI));
        fd.set_lapic(&lapic).map_err(io("set the LAPIC"))?;

        Ok(Vcpu { index, fd, wiring, counters: Arc::new(VcpuCounters::default()), start_paused: false })
    }

    /// Creates vCPU `index` with the state a snapshot saved.
    pub fn restore(vm: &VmFd, index: u8, state: &VcpuState, wiring: VcpuWiring) -> Result<Vcpu, VcpuError> {
        let io = |what| move |source| VcpuError::Ioctl { what, index, source };
        let fd = vm.create_vcpu(u64::from(index)).map_err(io("create"))?;
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::CpuidList(state.cpuid.len()))?;
        fd.set_cpuid2(&cpuid).map_err(io("restore the CPUID"))?;
        if let Some(khz) = state.tsc_khz {
            // Same frequency on the same host model; a different one is set if KVM can scale.
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(io("set the TSC frequency"))?;
            }
        }
        fd.set_mp_state(state.mp_state).map_err(io("restore the MP state"))?;
        fd.set_regs(&state.regs).map_err(io("restore the registers"))?;
        fd.set_sregs(&state.sregs).map_err(io("restore the special registers"))?;
        // SAFETY: a kvm_xsave read by KVM_GET_XSAVE is the 4 KiB legacy layout this ioctl
        // takes; no larger XSAVE area (AMX) is enabled for our guests.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(io("restore the XSAVE area"))?;
        fd.set_xcrs(&state.xcrs).map_err(io("restore the XCRs"))?;
        fd.set_debug_regs(&state.debugregs).map_err(io("restore the debug registers"))?;
        fd.set_lapic(&state.lapic).map_err(io("restore the LAPIC"))?;
        write_msrs_batched(&restore_order(&state.msrs), |msrs| fd.set_msrs(msrs)).map_err(|e| match e {
            MsrWriteError::Refused(msr) => VcpuError::RestoreMsr { index, msr },
            MsrWriteError::Ioctl(source) => VcpuError::Ioctl { what: "restore the MSRs", index, source },
        })?;
        fd.set_vcpu_events(&state.events).map_err(io("restore the vCPU events"))?;
        Ok(Vcpu { index, fd, wiring, counters: Arc::new(VcpuCounters::default()), start_paused: false })
    }

    /// Reads the whole vCPU state. Call on the vCPU's own thread while it is out of KVM_RUN.
    fn save_state(&mut self) -> Result<VcpuState, String> {
        // An exit handled just before the pause may still owe KVM its completion (the data of
        // a port read): a KVM_RUN with immediate_exit completes it without entering the guest,
        // so the registers saved are those after the instruction.
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let index = self.index;
        let e =
            |what: &'static str| move |err: kvm_ioctls::Error| format!("cannot read the {what} of vCPU {index}: {err}");
        // The order is KVM's (and Firecracker's): KVM_GET_MP_STATE first, as it accepts pending
        // INIT/SIPI events and may change the registers and the LAPIC; the LAPIC before the
        // MSRs; the events (a pending interrupt or exception) last.
        let mp_state = self.fd.get_mp_state().map_err(e("MP state"))?;
        let regs = self.fd.get_regs().map_err(e("registers"))?;
        let sregs = self.fd.get_sregs().map_err(e("special registers"))?;
        let xsave = self.fd.get_xsave().map_err(e("XSAVE area"))?;
        let xcrs = self.fd.get_xcrs().map_err(e("XCRs"))?;
        let debugregs = self.fd.get_debug_regs().map_err(e("debug registers"))?;
        let lapic = self.fd.get_lapic().map_err(e("LAPIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(e("CPUID"))?.as_slice().to_vec();
        let msrs = self.save_msrs().map_err(e("MSRs"))?;
        let events = self.fd.get_vcpu_events().map_err(e("events"))?;
        Ok(VcpuState { cpuid, msrs, regs, sregs, xsave, xcrs, debugregs, lapic, mp_state, events, tsc_khz })
    }

    /// Reads every MSR on KVM's save list that this vCPU has.
    fn save_msrs(&self) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
        read_msrs_batched(&self.wiring.msr_list, |msrs| self.fd.get_msrs(msrs))
    }

    /// Puts the boot vCPU at the kernel's entry point.
    pub fn setup_boot(&self, mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), VcpuError> {
        let index = self.index;
        let io = |what| move |source| VcpuError::Ioctl { what, index, source };
        let mut sregs = self.fd.get_sregs().map_err(io("read the special registers"))?;
        setup_sregs(mem, entry.mode, &mut sregs).map_err(VcpuError::Regs)?;
        self.fd.set_sregs(&sregs).map_err(io("set the special registers"))?;
        self.fd.set_regs(&boot_regs(entry.mode, entry.address)).map_err(io("set the registers"))?;
        self.fd.set_fpu(&boot_fpu()).map_err(io("set the FPU"))?;
        Ok(())
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }

    /// Runs the guest until it stops (Some) or the thread is kicked (None), handling port I/O.
    fn run_until_kicked(&mut self) -> Option<VcpuStop> {
        loop {
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    return None;
                }
                Err(e) => return Some(VcpuStop::RunFailed(e.to_string())),
            };
            self.counters.exits.fetch_add(1, Ordering::Relaxed);
            let stop = match exit {
                VcpuExit::IoIn(port, data) => {
                    self.counters.io_in.fetch_add(1, Ordering::Relaxed);
                    self.wiring.pio.read(u64::from(port), data);
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    self.counters.io_out.fetch_add(1, Ordering::Relaxed);
                    self.wiring.pio.write(u64::from(port), data);
                    self.wiring.reset_requested.load(Ordering::SeqCst).then_some(VcpuStop::Reset)
                }
                VcpuExit::MmioRead(addr, data) => {
                    // Unclaimed MMIO reads as zero (the bus fills it).
                    self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    self.wiring.mmio.read(addr, data);
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.counters.mmio.fetch_add(1, Ordering::Relaxed);
                    self.wiring.mmio.write(addr, data);
                    None
                }
                VcpuExit::Intr => {
                    self.fd.set_kvm_immediate_exit(0);
                    return None;
                }
                VcpuExit::Hlt => Some(VcpuStop::Shutdown),
                VcpuExit::Shutdown => Some(VcpuStop::TripleFault { rip: None }),
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Some(VcpuStop::Reset),
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Some(VcpuStop::Shutdown),
                VcpuExit::SystemEvent(kind, _) => Some(VcpuStop::Unhandled(format!("system event {kind}"))),
                VcpuExit::InternalError => Some(VcpuStop::InternalError { suberror: 0, rip: None }),
                VcpuExit::FailEntry(reason, _) => Some(VcpuStop::FailEntry { reason }),
                other => Some(VcpuStop::Unhandled(format!("{other:?}"))),
            };
            match stop {
                None => continue,
                Some(VcpuStop::InternalError { .. }) => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal`
                    // member of the exit union, so reading it reads initialised data.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return Some(VcpuStop::InternalError { suberror, rip: self.rip() });
                }
                Some(VcpuStop::TripleFault { .. }) => return Some(VcpuStop::TripleFault { rip: self.rip() }),
                Some(stop) => return Some(stop),
            }
        }
    }

    /// Points this thread's kick handler at this vCPU's kvm_run (on the vCPU's own thread).
    fn arm_kick(&mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
    }

    /// Runs the guest until it stops, obeying pause/resume commands in between. Returns None
    /// when the commander went away (the VMM is ending).
    pub fn run(&mut self, commands: &Receiver<VcpuCommand>) -> Option<VcpuStop> {
        self.arm_kick();
        let mut paused = self.start_paused;
        loop {
            if !paused {
                if let Some(stop) = self.run_until_kicked() {
                    return Some(stop);
                }
            }
            // Kicked, or paused: take commands; while paused, wait for them.
            let next = if paused { commands.recv().ok() } else { commands.try_recv().ok() };
            match next {
                Some(VcpuCommand::Pause { ack }) => {
                    paused = true;
                    let _ = ack.send(self.index);
                }
                Some(VcpuCommand::Resume { ack }) => {
                    paused = false;
                    let _ = ack.send(self.index);
                }
                Some(VcpuCommand::Save { reply }) if paused => {
                    let _ = reply.send(self.save_state());
                }
                Some(VcpuCommand::Save { reply }) => {
                    let _ = reply.send(Err("the vCPU is not paused".into()));
                }
                None if paused => return None,
                None => {}
            }
        }
    }

    /// Starts the run loop on its own thread, taking commands from `commands`. When it ends,
    /// `(index, why)` goes to `stopped` and `wake` is signalled.
    pub fn start(
        mut self,
        stopped: Sender<(u8, VcpuStop)>,
        wake: EventFd,
        commands: Receiver<VcpuCommand>,
        seccomp: Seccomp,
    ) -> Result<std::thread::JoinHandle<()>, VcpuError> {
        let index = self.index;
        std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let why = match crate::seccomp::install(ThreadKind::Vcpu, seccomp) {
                    Ok(()) => self.run(&commands),
                    Err(e) => Some(VcpuStop::RunFailed(crate::error_chain(&e))),
                };
                let Some(why) = why else { return };
                tracing::debug!(vcpu = index, reason = %why, "vcpu stopped");
                // The receiver may already be gone if another vCPU stopped the VM first.
                let _ = stopped.send((index, why));
                let _ = wake.write(1);
            })
            .map_err(|e| VcpuError::Thread(index, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake KVM_GET_MSRS over MSRs 0..: those in `unreadable` stop a batch there.
    fn fake_read(unreadable: &'static [u32]) -> impl FnMut(&mut Msrs) -> Result<usize, kvm_ioctls::Error> {
        move |msrs| {
            let mut n = 0;
            for e in msrs.as_mut_slice() {
                if unreadable.contains(&e.index) {
                    break;
                }
                e.data = u64::from(e.index) * 3;
                n += 1;
            }
            Ok(n)
        }
    }

    #[test]
    fn every_readable_msr_is_saved_across_full_batches() {
        let list: Vec<u32> = (0..700).collect();
        let saved = read_msrs_batched(&list, fake_read(&[10, 300])).unwrap();
        let indices: Vec<u32> = saved.iter().map(|e| e.index).collect();
        let want: Vec<u32> = (0..700).filter(|i| ![10, 300].contains(i)).collect();
        assert_eq!(indices, want, "MSRs after a full batch of 256 must not be skipped");
        assert!(saved.iter().all(|e| e.data == u64::from(e.index) * 3));
        // Exactly one full batch, then the end: nothing read twice, nothing lost.
        let list: Vec<u32> = (0..256).collect();
        assert_eq!(read_msrs_batched(&list, fake_read(&[])).unwrap().len(), 256);
    }

    #[test]
    fn the_tsc_deadline_is_restored_after_the_tsc_and_nothing_else_moves() {
        let msr = |index| kvm_msr_entry { index, data: u64::from(index), ..Default::default() };
        let saved =
            [msr(MSR_IA32_TSC_DEADLINE), msr(0x174), msr(crate::arch::x86_64::msr::MSR_IA32_TSC), msr(0xc000_0080)];
        let order: Vec<u32> = restore_order(&saved).iter().map(|e| e.index).collect();
        assert_eq!(order, [0x174, crate::arch::x86_64::msr::MSR_IA32_TSC, 0xc000_0080, MSR_IA32_TSC_DEADLINE]);
    }

    #[test]
    fn more_than_one_batch_of_msrs_restores_and_a_refused_one_is_named() {
        let entries: Vec<kvm_msr_entry> =
            (0..600).map(|index| kvm_msr_entry { index, data: 7, ..Default::default() }).collect();
        let mut written = Vec::new();
        write_msrs_batched(&entries, |m| {
            written.extend(m.as_slice().iter().map(|e| e.index));
            Ok(m.as_slice().len())
        })
        .unwrap();
        assert_eq!(written, (0..600).collect::<Vec<u32>>());
        let refused = write_msrs_batched(&entries, |m| {
            Ok(m.as_slice().iter().position(|e| e.index == 400).unwrap_or(m.as_slice().len()))
        });
        assert!(matches!(refused, Err(MsrWriteError::Refused(400))), "{refused:?}");
    }

    #[test]
    fn a_kick_after_the_vcpu_is_dropped_touches_no_freed_mapping() {
        let Ok(vm) = crate::vstate::vm::Vm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        vm.setup_irqchip().unwrap();
        register_kick_handler().unwrap();
        let supported = vm.kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let wiring = VcpuWiring {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            reset_requested: Arc::default(),
            msr_list: Arc::new(Vec::new()),
        };
        std::thread::spawn(move || {
            let mut vcpu = Vcpu::new(&vm.fd, 0, 1, &supported, wiring).unwrap();
            vcpu.arm_kick();
            assert!(!KVM_RUN_PTR.with(Cell::get).is_null());
            drop(vcpu);
            assert!(KVM_RUN_PTR.with(Cell::get).is_null(), "the kick handler still points at kvm_run");
            // A kick arriving now, as one racing the vCPU's end would.
            // SAFETY: raise() signals this thread; the handler is installed above.
            assert_eq!(unsafe { libc::raise(vcpu_kick_signal()) }, 0);
        })
        .join()
        .unwrap();
    }
}
