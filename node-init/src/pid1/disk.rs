//! The data disk: found by its GPT partition name (or named on the command line), formatted
//! when blank, mounted for the Raft log, images and snapshots. Anything else on it is left
//! alone: a disk that holds something we do not recognise is never formatted.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The GPT partition name (PARTLABEL) of the data partition `make image` writes.
pub const DATA_LABEL: &str = "shoal-data";

/// What a block device holds, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// Zeros where a file system would have its superblock: safe to format.
    Blank,
    /// An ext2/3/4 superblock.
    Ext4,
    /// Something else: not ours to format.
    Unknown,
}

/// The bytes read to classify a device (an ext4 superblock lies at 1024..2048).
pub const PROBE_BYTES: usize = 64 * 1024;

/// Classifies a device from its first [`PROBE_BYTES`].
pub fn classify(head: &[u8]) -> Contents {
    if head.len() >= 1082 && head[1080] == 0x53 && head[1081] == 0xEF {
        return Contents::Ext4;
    }
    if head.iter().all(|&b| b == 0) {
        return Contents::Blank;
    }
    Contents::Unknown
}

/// Reads a device's first bytes and classifies them.
pub fn probe(dev: &Path) -> std::io::Result<Contents> {
    let mut f = std::fs::File::open(dev)?;
    let mut head = vec![0u8; PROBE_BYTES];
    let mut n = 0;
    while n < head.len() {
        let r = f.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    head.truncate(n);
    Ok(classify(&head))
}

/// The device (`/dev/NAME`) of the partition named `label`, from the kernel's block devices
/// (`PARTNAME=` in their uevent files); `sys` is `/sys`.
pub fn find_by_label(sys: &Path, label: &str) -> Option<PathBuf> {
    // Two disks with the label (a copied image): the first by name.
    let mut found = all_by_label(sys, label);
    found.sort();
    found.into_iter().next()
}

/// Every partition whose GPT name is `label`.
pub fn all_by_label(sys: &Path, label: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let Ok(entries) = std::fs::read_dir(sys.join("class/block")) else { return found };
    for e in entries.flatten() {
        let Ok(uevent) = std::fs::read_to_string(e.path().join("uevent")) else { continue };
        let field = |k: &str| uevent.lines().find_map(|l| l.strip_prefix(k)).map(str::to_string);
        if field("PARTNAME=").as_deref() == Some(label) {
            if let Some(dev) = field("DEVNAME=") {
                found.push(PathBuf::from("/dev").join(dev));
            }
        }
    }
    found
}

/// Formats `dev` as ext4 with `mke2fs` (shipped in the image).
pub fn format(mke2fs: &Path, dev: &Path) -> Result<(), String> {
    let mut cmd = std::process::Command::new(mke2fs);
    super::unblocked_signals(&mut cmd);
    let out = cmd
        .args(["-q", "-F", "-t", "ext4", "-L", DATA_LABEL])
        .arg(dev)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", mke2fs.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed: {}",
            mke2fs.display(),
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_blank_a_superblock_is_ext4_anything_else_is_left_alone() {
        let mut head = vec![0u8; PROBE_BYTES];
        assert_eq!(classify(&head), Contents::Blank);
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert_eq!(classify(&head), Contents::Ext4);
        let mut other = vec![0u8; PROBE_BYTES];
        other[510] = 0x55;
        other[511] = 0xAA;
        assert_eq!(classify(&other), Contents::Unknown);
    }

    #[test]
    fn a_partition_is_found_by_its_name() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, uevent) in [
            ("vda", "MAJOR=254\nDEVNAME=vda\nDEVTYPE=disk\n"),
            ("vda1", "DEVNAME=vda1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=EFI System\n"),
            ("vda2", "DEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=shoal-data\n"),
        ] {
            let d = sys.path().join("class/block").join(dev);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("uevent"), uevent).unwrap();
        }
        assert_eq!(find_by_label(sys.path(), DATA_LABEL), Some(PathBuf::from("/dev/vda2")));
        assert_eq!(find_by_label(sys.path(), "other"), None);
    }

    #[test]
    fn a_real_ext4_image_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
        assert_eq!(probe(&img).unwrap(), Contents::Blank);
        // mke2fs is in e2fsprogs, which `make test` installs (the image ships its own).
        format(Path::new("mke2fs"), &img).unwrap();
        assert_eq!(probe(&img).unwrap(), Contents::Ext4);
    }
}
