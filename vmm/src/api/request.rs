//! What the API thread asks of the VMM thread, and what comes back: the one vocabulary both
//! sides share. `routes` turns an HTTP request into a `VmmAction` (or answers it itself), the
//! server sends it over a `VmmLink`, and `controller::Controller` on the VMM thread decides it,
//! before the boot and after.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};

use shoal_vmm_config::{
    BalloonConfig, FirecrackerDrive, FirecrackerNet, MachineConfig, MmdsConfig, NetOverride, PartialDrive, PartialNet,
    RateLimitConfig, SnapshotTypeName, VmConfig, VsockConfig, VsockOverride,
};

use crate::metrics::MetricsSnapshot;

/// A change to a running device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePatch {
    Drive(PartialDrive),
    Net(PartialNet),
    Balloon { amount_mib: Option<u32>, stats_polling_interval_s: Option<u16> },
}

/// A checked snapshot load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLoad {
    pub state_path: PathBuf,
    pub mem_path: PathBuf,
    pub resume: bool,
    pub track_dirty_pages: bool,
    pub vsock_override: Option<VsockOverride>,
    pub net_overrides: Vec<NetOverride>,
}

/// Everything that needs the microVM, or the VMM process itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmAction {
    /// Build and start this configuration.
    Start(Box<VmConfig>),
    /// Build the microVM from a snapshot and start it (paused unless `resume`).
    LoadSnapshot(SnapshotLoad),
    /// Pause (true) or resume (false) the running microVM.
    SetPaused(bool),
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
    /// Write a snapshot of the paused microVM.
    CreateSnapshot { kind: SnapshotTypeName, state_path: PathBuf, mem_path: PathBuf },
    /// The counters, to be shown as Prometheus text (true) or JSON.
    Metrics { prometheus: bool },
    /// Open Firecracker's metrics file (before the start); FlushMetrics appends to it.
    MetricsFile(PathBuf),
    /// Append the counters to the metrics file.
    FlushMetrics,
    /// Change a running device (another backing file, other rate limiters, a balloon target).
    PatchDevice(DevicePatch),
    /// The balloon's state and the guest's statistics.
    BalloonStats,
    /// Change the log level and/or send logs to a file.
    Logger { level: Option<tracing_subscriber::filter::LevelFilter>, path: Option<PathBuf> },
}

/// What a machine restored from a snapshot is made of, in the API's shapes: what
/// `GET /vm/config` shows after a load (the API assembled none of it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restored {
    pub machine: MachineConfig,
    pub drives: Vec<FirecrackerDrive>,
    pub nets: Vec<FirecrackerNet>,
    pub vsock: Option<VsockConfig>,
    /// The entropy device and its rate limiter, if there is one.
    pub entropy: Option<Option<RateLimitConfig>>,
    pub balloon: Option<BalloonConfig>,
    pub mmds: Option<MmdsConfig>,
}

/// What a decided action gives back.
#[derive(Debug)]
pub enum VmmData {
    /// Done; nothing to show (204).
    Done,
    /// The microVM is built and runs (or waits paused). The API thread signals the sender once
    /// its 204 is on the wire, so that a guest which ends at once cannot end the process first.
    Started {
        written: Sender<()>,
        restored: Option<Box<Restored>>,
    },
    Metrics(MetricsSnapshot),
    /// A JSON document to show (200).
    Json(String),
}

/// The VMM thread's answer: the data, or why the action was refused (a 400 with that text).
pub type VmmReply = Result<VmmData, String>;

/// One action and where its answer goes.
#[derive(Debug)]
pub struct VmmRequest {
    pub action: VmmAction,
    pub reply: Sender<VmmReply>,
}

/// Why an action got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The VMM thread no longer takes requests.
    NotAccepting,
    /// It took the request and went away before answering.
    Stopped,
}

/// The API thread's line to the VMM thread: requests, and an eventfd that wakes the VMM's
/// event loop when one is queued.
#[derive(Debug)]
pub struct VmmLink {
    pub tx: Sender<VmmRequest>,
    pub wake: vmm_sys_util::eventfd::EventFd,
}

impl VmmLink {
    /// Sends `action` and waits for its answer.
    pub fn ask(&self, action: VmmAction) -> Result<VmmReply, Unanswered> {
        let (reply, answer) = channel();
        let sent = self.tx.send(VmmRequest { action, reply }).is_ok();
        let _ = self.wake.write(1);
        if !sent {
            return Err(Unanswered::NotAccepting);
        }
        answer.recv().map_err(|_| Unanswered::Stopped)
    }
}
