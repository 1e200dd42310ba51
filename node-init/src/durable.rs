//! Files the agent must find whole after a crash (its node id, an instance's metadata): written
//! to a temporary name, synced, renamed over the old one, and the directory synced, so a crash
//! leaves either the old file or the whole new one.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes`, durably.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_mode(path, bytes, 0o644)
}

/// [`write`] for a file only its owner may read (a secret, a token).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_mode(path, bytes, 0o600)
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_file_replaces_the_old_one_whole_and_only_its_owner_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-token");
        std::fs::write(&path, "an old, longer token").unwrap();
        // A temporary left by a crash mid-write does not get in the way.
        std::fs::write(path.with_extension("tmp"), "half").unwrap();
        super::write_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!path.with_extension("tmp").exists());
    }
}
