//! Files the agent must find whole after a crash (its node id, an instance's metadata): written
//! to a temporary name, synced, renamed over the old one, and the directory synced, so a crash
//! leaves either the old file or the whole new one.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`, durably.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
