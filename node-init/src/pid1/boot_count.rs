//! A/B boot counting with systemd-boot's scheme: the image's UKI is written as
//! `EFI/Linux/shoal-a+3.efi` (three tries). systemd-boot counts a try down before it starts an
//! entry (`shoal-a+2-1.efi`), sorts an entry with no tries left after the others (so a second
//! image, B, boots instead once A has failed three times), and tells the booted system which file
//! it counted in the `LoaderBootCountPath` EFI variable. Once the node has booted well (its agent
//! has kept running for a while), PID 1 blesses the entry: it renames the file to its name
//! without the counter (`shoal-a.efi`), which systemd-boot then boots with no more counting.

use std::path::{Path, PathBuf};

/// Tries an image gets before systemd-boot prefers another.
pub const TRIES: u32 = 3;
/// systemd-boot's vendor GUID for its EFI variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// The GPT name of the image's EFI system partition.
const ESP_LABEL: &str = "EFI System";
const EFIVARS: &str = "/sys/firmware/efi/efivars";
const ESP_MOUNT: &str = "/run/shoal/esp";

/// `shoal-a+2-1.efi` → `shoal-a.efi`; None for a name without a counter.
pub fn blessed_name(file: &str) -> Option<String> {
    let (stem, ext) = file.rsplit_once('.')?;
    let (base, counter) = stem.rsplit_once('+')?;
    let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(left) && digits(done) && !base.is_empty()).then(|| format!("{base}.{ext}"))
}

/// The path in an EFI string variable (4 bytes of attributes, then UTF-16LE up to a NUL):
/// `\EFI\Linux\shoal-a+2-1.efi` → `EFI/Linux/shoal-a+2-1.efi`.
pub fn efi_path(var: &[u8]) -> Option<String> {
    let units: Vec<u16> = var.get(4..)?.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    let s = String::from_utf16(&units[..end]).ok()?;
    let p = s.replace('\\', "/").trim_start_matches('/').to_string();
    (!p.is_empty() && !p.split('/').any(|c| c == ".." || c.is_empty())).then_some(p)
}

/// Blesses the entry this boot was counted against; what it did, or None where there was
/// nothing to bless (no UEFI, no counting, already blessed).
pub fn bless() -> Result<Option<String>, String> {
    if !Path::new("/sys/firmware/efi").exists() {
        return Ok(None);
    }
    match super::mount("efivarfs", EFIVARS, "efivarfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "") {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => return Err(format!("cannot mount efivarfs: {e}")),
    }
    let Ok(var) = std::fs::read(format!("{EFIVARS}/LoaderBootCountPath-{LOADER_GUID}")) else { return Ok(None) };
    let counted = efi_path(&var).ok_or("LoaderBootCountPath does not hold a path")?;
    let (dir, file) = counted.rsplit_once('/').unwrap_or(("", &counted));
    let Some(blessed) = blessed_name(file) else { return Ok(None) };
    let mut partitions = super::disk::all_by_label(Path::new("/sys"), ESP_LABEL);
    partitions.sort();
    for dev in partitions {
        if super::mount(&dev.display().to_string(), ESP_MOUNT, "vfat", libc::MS_NOSUID | libc::MS_NODEV, "").is_err() {
            continue;
        }
        let from = PathBuf::from(ESP_MOUNT).join(&counted);
        let r = from.exists().then(|| std::fs::rename(&from, PathBuf::from(ESP_MOUNT).join(dir).join(&blessed)));
        super::sync();
        let target = super::c(ESP_MOUNT);
        // SAFETY: a NUL-terminated path of a file system this process mounted.
        unsafe { libc::umount2(target.as_ptr(), 0) };
        match r {
            Some(Ok(())) => return Ok(Some(format!("{counted} is now {dir}/{blessed} on {}", dev.display()))),
            Some(Err(e)) => return Err(format!("renaming {counted} on {}: {e}", dev.display())),
            None => {}
        }
    }
    Err(format!("no EFI system partition holds {counted}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_names_lose_their_counter_and_others_are_left_alone() {
        assert_eq!(blessed_name("shoal-a+2-1.efi").as_deref(), Some("shoal-a.efi"));
        assert_eq!(blessed_name("shoal-b+3.efi").as_deref(), Some("shoal-b.efi"));
        assert_eq!(blessed_name("shoal-a+0-3.efi").as_deref(), Some("shoal-a.efi"));
        assert_eq!(blessed_name("shoal-a.efi"), None);
        assert_eq!(blessed_name("shoal-a+x-1.efi"), None);
        assert_eq!(blessed_name("+2-1.efi"), None);
        assert_eq!(blessed_name("noext+1"), None);
    }

    #[test]
    fn the_loader_variable_reads_as_a_relative_path() {
        let mut var = vec![7, 0, 0, 0];
        for u in "\\EFI\\Linux\\shoal-a+2-1.efi".encode_utf16().chain([0]) {
            var.extend(u.to_le_bytes());
        }
        assert_eq!(efi_path(&var).as_deref(), Some("EFI/Linux/shoal-a+2-1.efi"));
        let mut evil = vec![7, 0, 0, 0];
        for u in "\\EFI\\..\\..\\etc".encode_utf16() {
            evil.extend(u.to_le_bytes());
        }
        assert_eq!(efi_path(&evil), None, "no way out of the ESP");
        assert_eq!(efi_path(&[1, 2]), None);
    }
}
