//! One instance's directory on its node, `DATA_DIR/instances/<uid>/`, and the small files that
//! let an agent that restarted (or crashed) find and re-adopt what runs:
//!
//! ```text
//! meta.json     which instance this is, its jail uid, restarts, back-off (written by the agent)
//! shim.pid      the shim's pid and start time (written by the shim)
//! vmm.pid       shoal-vmm's pid and start time (the jail's outer process; written by the shim)
//! exit.json     how shoal-vmm ended (written by the shim when it does)
//! console.log   the guest's serial output; console.log.1 the previous MiB (bounded)
//! vmm.log       shoal-vmm's own messages (bounded)
//! console.sock  bytes written here are typed on the guest's console (served by the shim)
//! root/         the jail: kernel, initrd, rootfs.img, api.sock
//! ```
//!
//! Every file is written whole (temporary file, then rename), so a reader never sees half of one.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::objects::Millis;

/// Bytes of console output kept per file; two files are kept.
pub const CONSOLE_FILE_MAX: u64 = 1 << 20;
/// Bytes of shoal-vmm messages kept.
pub const VMM_LOG_MAX: u64 = 256 << 10;

/// What the agent keeps about an instance it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub tenant: String,
    pub id: String,
    pub uid: String,
    /// The unprivileged uid (and gid) its jail runs as.
    pub jail_uid: u32,
    pub restarts: u32,
    /// Failures in a row since the last run that lasted (the back-off exponent).
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default)]
    pub last_exit_code: Option<i32>,
    /// When the microVM last booted (InstanceStart answered), and when it last ended.
    #[serde(default)]
    pub started_at: Option<Millis>,
    #[serde(default)]
    pub finished_at: Option<Millis>,
    /// Not before this time is it started again (restart back-off).
    #[serde(default)]
    pub next_start_at: Option<Millis>,
    /// Why the last start failed, or how the last run ended.
    #[serde(default)]
    pub reason: String,
    /// It ended and its restart policy keeps it ended.
    #[serde(default)]
    pub done: bool,
}

/// A process the shim started, identified by pid and start time (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<ProcessId> {
        Some(ProcessId { pid, start_time: start_time(pid)? })
    }

    /// The same process still exists (a zombie counts as gone).
    pub fn is_alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else { return false };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return false };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is the state (3rd field of stat), fields[19] the start time (22nd).
        fields.first() != Some(&"Z") && fields.get(19).and_then(|t| t.parse().ok()) == Some(self.start_time)
    }
}

/// The start time of a process in clock ticks since boot (`/proc/PID/stat` field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How shoal-vmm ended, as the shim saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit status, or 128 + the signal that killed it.
    pub code: i32,
    pub at: Millis,
}

#[derive(Debug, Clone)]
pub struct InstanceDir {
    pub path: PathBuf,
}

impl InstanceDir {
    pub fn new(instances: &Path, uid: &str) -> InstanceDir {
        InstanceDir { path: instances.join(uid) }
    }

    pub fn root(&self) -> PathBuf {
        self.path.join("root")
    }

    pub fn api_socket(&self) -> PathBuf {
        self.root().join("api.sock")
    }

    pub fn console(&self) -> PathBuf {
        self.path.join("console.log")
    }

    pub fn console_previous(&self) -> PathBuf {
        self.path.join("console.log.1")
    }

    pub fn console_input(&self) -> PathBuf {
        self.path.join("console.sock")
    }

    pub fn vmm_log(&self) -> PathBuf {
        self.path.join("vmm.log")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn read_meta(&self) -> Option<Meta> {
        read_json(&self.file("meta.json"))
    }

    pub fn write_meta(&self, meta: &Meta) -> std::io::Result<()> {
        write_json(&self.file("meta.json"), meta)
    }

    pub fn shim(&self) -> Option<ProcessId> {
        read_json(&self.file("shim.pid"))
    }

    pub fn vmm(&self) -> Option<ProcessId> {
        read_json(&self.file("vmm.pid"))
    }

    pub fn set_shim(&self, p: &ProcessId) -> std::io::Result<()> {
        write_json(&self.file("shim.pid"), p)
    }

    pub fn set_vmm(&self, p: &ProcessId) -> std::io::Result<()> {
        write_json(&self.file("vmm.pid"), p)
    }

    pub fn exit(&self) -> Option<ExitRecord> {
        read_json(&self.file("exit.json"))
    }

    pub fn set_exit(&self, e: &ExitRecord) -> std::io::Result<()> {
        write_json(&self.file("exit.json"), e)
    }

    /// Forgets the last run's processes and exit (before the next start).
    pub fn clear_run(&self) {
        for f in ["shim.pid", "vmm.pid", "exit.json"] {
            let _ = std::fs::remove_file(self.file(f));
        }
        let _ = std::fs::remove_file(self.api_socket());
    }

    /// The guest's console: the previous file, then the current one.
    pub fn read_console(&self) -> Vec<u8> {
        let mut out = std::fs::read(self.console_previous()).unwrap_or_default();
        out.extend(std::fs::read(self.console()).unwrap_or_default());
        out
    }

    /// The last line shoal-vmm wrote about itself (why it failed, usually).
    pub fn last_vmm_message(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.vmm_log()).ok()?;
        log.lines().rev().map(str::trim).find(|l| !l.is_empty()).map(|l| l.chars().take(300).collect())
    }

    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    crate::durable::write(path, &serde_json::to_vec(value).map_err(std::io::Error::other)?)
}

/// Appends to a file that is rotated once it reaches `max` bytes (the old file becomes
/// `<name>.1`), so one instance's output takes at most twice `max` on disk.
#[derive(Debug)]
pub struct BoundedLog {
    path: PathBuf,
    previous: Option<PathBuf>,
    max: u64,
    file: std::fs::File,
    len: u64,
}

impl BoundedLog {
    /// With `previous`, a full file is rotated there; without, it is truncated.
    pub fn open(path: &Path, previous: Option<&Path>, max: u64) -> std::io::Result<BoundedLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(BoundedLog { path: path.to_path_buf(), previous: previous.map(Path::to_path_buf), max, file, len })
    }

    pub fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.len >= self.max {
                match &self.previous {
                    Some(prev) => std::fs::rename(&self.path, prev)?,
                    None => std::fs::remove_file(&self.path)?,
                }
                self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
                self.len = 0;
            }
            let room = (self.max - self.len).min(bytes.len() as u64) as usize;
            self.file.write_all(&bytes[..room])?;
            self.len += room as u64;
            bytes = &bytes[room..];
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_bounded_to_two_files_and_reads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let inst = InstanceDir::new(dir.path(), "u1");
        std::fs::create_dir_all(&inst.path).unwrap();
        let mut log = BoundedLog::open(&inst.console(), Some(&inst.console_previous()), 10).unwrap();
        for i in 0..5u8 {
            log.write(&[b'a' + i; 7]).unwrap();
        }
        let all = inst.read_console();
        assert!(all.len() <= 20, "{}", all.len());
        assert!(all.ends_with(b"eeeeeee"), "{:?}", String::from_utf8_lossy(&all));
        assert!(std::fs::metadata(inst.console()).unwrap().len() <= 10);
    }

    #[test]
    fn records_round_trip_and_a_dead_pid_is_not_alive() {
        let dir = tempfile::tempdir().unwrap();
        let inst = InstanceDir::new(dir.path(), "u2");
        std::fs::create_dir_all(&inst.path).unwrap();
        let me = ProcessId::of(std::process::id() as i32).unwrap();
        assert!(me.is_alive());
        inst.set_vmm(&me).unwrap();
        assert_eq!(inst.vmm(), Some(me));
        let reused = ProcessId { start_time: me.start_time + 1, ..me };
        assert!(!reused.is_alive(), "a pid with another start time is another process");
        inst.set_exit(&ExitRecord { code: 2, at: 5 }).unwrap();
        assert_eq!(inst.exit().map(|e| e.code), Some(2));
        inst.clear_run();
        assert_eq!((inst.vmm(), inst.exit()), (None, None));
    }
}
