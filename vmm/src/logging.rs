//! Structured logs (tracing) to stderr or, after `PUT /logger`, to a file, at a level that can
//! change at run time. Anything a guest can make happen is logged through `guest_warn!`, which
//! lets at most `GUEST_LOGS_PER_SECOND` lines through per call site and counts the rest, so a
//! guest cannot flood the host's logs.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::Layer;
use tracing_subscriber::reload;

/// Where log lines go: stderr until a log file is set.
static SINK: Mutex<Option<std::fs::File>> = Mutex::new(None);
type Handle = reload::Handle<
    LevelFilter,
    tracing_subscriber::fmt::Subscriber<
        tracing_subscriber::fmt::format::DefaultFields,
        tracing_subscriber::fmt::format::Format,
        LevelFilter,
        fn() -> LogWriter,
    >,
>;
static LEVEL: OnceLock<Handle> = OnceLock::new();

/// Writes one log line to the current sink.
#[derive(Debug)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut sink = SINK.lock().unwrap_or_else(|p| p.into_inner());
        match sink.as_mut() {
            Some(f) => f.write(buf),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn writer() -> LogWriter {
    LogWriter
}

/// Installs the process's logger at `level` (once, at start-up).
pub fn init(level: tracing::Level) {
    let fmt = tracing_subscriber::fmt()
        .with_writer(writer as fn() -> LogWriter)
        .with_max_level(LevelFilter::TRACE)
        .with_target(false)
        .finish();
    let (filter, handle) = reload::Layer::new(LevelFilter::from_level(level));
    if tracing::subscriber::set_global_default(filter.with_subscriber(fmt)).is_ok() {
        let _ = LEVEL.set(handle);
    }
}

/// Changes the level and/or sends lines to `path` (appended to) from now on.
pub fn configure(level: Option<LevelFilter>, path: Option<&std::path::Path>) -> Result<(), String> {
    if let Some(path) = path {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("Cannot open the log file {}: {e}", path.display()))?;
        *SINK.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }
    if let (Some(level), Some(handle)) = (level, LEVEL.get()) {
        handle.modify(|f| *f = level).map_err(|e| format!("Cannot change the log level: {e}"))?;
    }
    Ok(())
}

/// Firecracker's level names (`Error`, `Warning`, `Info`, `Debug`, `Trace`, `Off`), any case.
pub fn parse_level(name: &str) -> Result<LevelFilter, String> {
    match name.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::OFF),
        "error" => Ok(LevelFilter::ERROR),
        "warning" | "warn" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        other => Err(format!("Invalid log level: {other} (Error, Warning, Info, Debug, Trace or Off)")),
    }
}

/// Lines a guest can cause, per call site per second.
pub const GUEST_LOGS_PER_SECOND: u64 = 10;

/// A call site's budget for guest-caused log lines.
#[derive(Debug)]
pub struct GuestLogBudget {
    window: AtomicU64,
    used: AtomicU64,
    pub suppressed: AtomicU64,
}

impl GuestLogBudget {
    pub const fn new() -> Self {
        GuestLogBudget { window: AtomicU64::new(0), used: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// True if one more line may be logged now.
    pub fn allow(&self) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < GUEST_LOGS_PER_SECOND {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

impl Default for GuestLogBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for events a guest can trigger, rate-limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static BUDGET: $crate::logging::GuestLogBudget = $crate::logging::GuestLogBudget::new();
        if BUDGET.allow() {
            tracing::warn!($($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_guest_events_is_cut_to_the_budget() {
        let b = GuestLogBudget::new();
        let allowed = (0..1000).filter(|_| b.allow()).count() as u64;
        // The burst may straddle a second boundary: at most two windows' worth.
        assert!((GUEST_LOGS_PER_SECOND..=2 * GUEST_LOGS_PER_SECOND).contains(&allowed), "{allowed}");
        assert_eq!(b.suppressed.load(Ordering::Relaxed), 1000 - allowed);
    }
}
