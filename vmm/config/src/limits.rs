//! The machine's fixed shape, as far as a configuration must know it to be checked: vCPU and
//! memory bounds, the command line's size, and where the virtio-mmio devices sit (their
//! windows and interrupt lines are named on the guest's command line). `shoal-vmm`'s
//! `arch::x86_64::layout` builds the machine from these same constants.

/// At most this many vCPUs (the MP table's 8-bit APIC ids, 255 being the broadcast id).
pub const MAX_VCPUS: u8 = 254;
/// Upper bound on guest memory (16 TiB), far above any host, to keep sizes from overflowing.
pub const MAX_MEM_MIB: u64 = 16 << 20;
/// Longest command line accepted, NUL included (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// virtio-mmio devices: one 4 KiB window each from here, in the 32-bit MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IOAPIC line for virtio-mmio devices (COM1 has 4); one line per device.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Lines 5..=22 of the IOAPIC: at most this many virtio devices (23 is the ACPI Generic
/// Event Device's).
pub const VIRTIO_MAX_DEVICES: usize = 18;
/// Longest disk serial id a guest can read (virtio-blk's VIRTIO_BLK_ID_BYTES).
pub const DISK_ID_MAX_LEN: usize = 20;

/// Why a command line cannot be given to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineError {
    TooLong { len: usize, max: usize },
    Nul,
}

impl std::fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmdlineError::TooLong { len, max } => write!(f, "command line is {len} bytes; at most {max} are allowed"),
            CmdlineError::Nul => write!(f, "command line contains a NUL byte"),
        }
    }
}

impl std::error::Error for CmdlineError {}

/// Checks a command line against the x86 limit before anything is loaded.
pub fn check_cmdline(cmdline: &str) -> Result<(), CmdlineError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(CmdlineError::Nul);
    }
    let max = CMDLINE_MAX_SIZE - 1;
    if cmdline.len() > max {
        return Err(CmdlineError::TooLong { len: cmdline.len(), max });
    }
    Ok(())
}

/// Checks a vsock guest context id: 0-2 are reserved (hypervisor, local, host), and
/// u32::MAX and above are not ids.
pub fn check_cid(cid: u64) -> Result<(), String> {
    if cid < 3 || cid >= u64::from(u32::MAX) {
        return Err(format!("guest CID {cid} is reserved (0, 1, 2 and u32::MAX are not guest CIDs)"));
    }
    Ok(())
}
