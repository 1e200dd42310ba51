//! Kernel modules, loaded as `modprobe` would: each after the modules it needs (from the
//! `modules.dep` that `depmod` wrote when the image was built), with `finit_module`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The modules a node loads at boot (those missing from the kernel are skipped): virtual
/// and common physical hardware (virtio, NVMe, AHCI, Intel NICs), what the node's microVM
/// networking uses (taps, bridges, VXLAN, nf_tables with NAT) and the data disk's file system.
/// The image carries the same list (`image-build/host/modules.txt`, one file for both). KVM's
/// vendor module is chosen from the CPU.
pub fn node_modules() -> Vec<&'static str> {
    list().map(|(name, _)| name).collect()
}

/// The list's lines: each module's name and whether it is a driver loaded only for hardware
/// that is present (`if-present`).
fn list() -> impl Iterator<Item = (&'static str, bool)> {
    include_str!("../../../image-build/host/modules.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("kvm_"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            Some((words.next()?, words.next() == Some("if-present")))
        })
}

/// The drivers of the list that are loaded only when a device matches them.
pub fn if_present() -> Vec<&'static str> {
    list().filter(|(_, p)| *p).map(|(name, _)| name).collect()
}

/// Whether `pattern` (a modules.alias glob) matches `modalias`.
fn glob(pattern: &str, modalias: &str) -> bool {
    let (Ok(p), Ok(m)) = (std::ffi::CString::new(pattern), std::ffi::CString::new(modalias)) else {
        return false;
    };
    // SAFETY: two NUL-terminated strings valid for the call.
    unsafe { libc::fnmatch(p.as_ptr(), m.as_ptr(), 0) == 0 }
}

/// The modules of `aliases` (modules.alias) that claim one of `devices` (modaliases).
pub fn matching(aliases: &str, devices: &[String]) -> BTreeSet<String> {
    aliases
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("alias")).then_some(())?;
            Some((w.next()?, w.next()?))
        })
        .filter(|(pattern, _)| devices.iter().any(|d| glob(pattern, d)))
        .map(|(_, module)| module.replace('-', "_"))
        .collect()
}

/// The modaliases of this server's PCI devices.
fn pci_devices() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else { return Vec::new() };
    dir.flatten()
        .filter_map(|d| std::fs::read_to_string(d.path().join("modalias")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

/// A module's name as the kernel knows it: the file's stem with `-` as `_`.
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// `modules.dep`: module name → (its path, the paths it needs), paths relative to the
/// modules directory.
#[derive(Debug, Default)]
pub struct Deps {
    by_name: BTreeMap<String, (String, Vec<String>)>,
}

impl Deps {
    pub fn parse(text: &str) -> Deps {
        let mut by_name = BTreeMap::new();
        for line in text.lines() {
            let Some((module, deps)) = line.split_once(':') else { continue };
            let module = module.trim();
            if module.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(str::to_string).collect();
            by_name.insert(name_of(module), (module.to_string(), deps));
        }
        Deps { by_name }
    }

    /// The files to load for `wanted`, each after what it needs, each once; and the wanted
    /// names this kernel has no module for (built in, or not built).
    pub fn order(&self, wanted: &[&str]) -> (Vec<String>, Vec<String>) {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for w in wanted {
            let name = w.replace('-', "_");
            match self.by_name.get(&name) {
                Some((path, _)) => self.visit(path, &mut seen, &mut out, 0),
                None => missing.push(name),
            }
        }
        (out, missing)
    }

    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, out: &mut Vec<String>, depth: usize) {
        // A cycle (a corrupt modules.dep) must not recurse for ever.
        if depth > 64 || !seen.insert(path.to_string()) {
            return;
        }
        if let Some((_, deps)) = self.by_name.get(&name_of(path)) {
            for d in deps {
                self.visit(d, seen, out, depth + 1);
            }
        }
        out.push(path.to_string());
    }
}

/// Loads one module file; a module already loaded is fine.
pub fn load(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(path)?;
    let params = c"";
    // SAFETY: finit_module reads the open descriptor and a NUL-terminated parameter string,
    // both valid for the call; it does not keep either.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(e)
}

/// What loading the node's modules did.
#[derive(Debug, Default)]
pub struct Loaded {
    pub loaded: usize,
    pub failed: Vec<(String, String)>,
    /// `if-present` drivers no device of this server needs.
    pub skipped: usize,
}

/// Loads `wanted` (and KVM for this CPU's vendor) from `dir` (`/lib/modules/<release>`).
pub fn load_node_modules(dir: &Path, wanted: &[&str]) -> std::io::Result<Loaded> {
    let deps = Deps::parse(&std::fs::read_to_string(dir.join("modules.dep"))?);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut all: Vec<&str> = Vec::new();
    // Only the vendor's module: the other one refuses to load on this CPU.
    if cpuinfo.contains(" svm") {
        all.push("kvm_amd");
    } else if cpuinfo.contains(" vmx") {
        all.push("kvm_intel");
    }
    // Device drivers only for devices that are there (without an alias list: all of them).
    let mut done = Loaded::default();
    let conditional = if_present();
    let needed = std::fs::read_to_string(dir.join("modules.alias")).ok().map(|a| matching(&a, &pci_devices()));
    for m in wanted {
        match &needed {
            Some(n) if conditional.contains(m) && !n.contains(*m) => done.skipped += 1,
            _ => all.push(m),
        }
    }
    let (files, _) = deps.order(&all);
    for f in files {
        let path: PathBuf = dir.join(&f);
        match load(&path) {
            Ok(()) => done.loaded += 1,
            Err(e) => done.failed.push((name_of(&f), e.to_string())),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/llc/llc.ko:
";

    #[test]
    fn each_module_comes_after_what_it_needs_and_once() {
        let d = Deps::parse(DEP);
        let (files, missing) = d.order(&["kvm-amd", "virtio_net", "bridge", "kvm", "ext4"]);
        let names: Vec<String> = files.iter().map(|f| name_of(f)).collect();
        assert_eq!(
            names,
            ["irqbypass", "kvm", "kvm_amd", "failover", "net_failover", "virtio_net", "llc", "stp", "bridge"]
        );
        assert_eq!(missing, ["ext4"]);
    }

    #[test]
    fn the_image_list_is_read_without_comments_and_kvm_is_left_to_the_cpu() {
        let m = node_modules();
        assert!(m.contains(&"virtio_net") && m.contains(&"vxlan") && m.contains(&"ext4"));
        assert!(!m.iter().any(|n| n.starts_with('#') || n.starts_with("kvm")));
    }

    #[test]
    fn drivers_are_chosen_by_the_devices_their_aliases_match() {
        let aliases = "# Aliases extracted from modules themselves.
alias pci:v*d*sv*sd*bc01sc06i01* ahci
alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e
alias pci:v000015B3d00001017sv*sd*bc*sc*i* mlx5_core
alias pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio-pci
alias fs-ext4 ext4
";
        let devices = [
            "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00".to_string(),
            "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01".to_string(),
        ];
        let m = matching(aliases, &devices);
        assert_eq!(m.into_iter().collect::<Vec<_>>(), ["ahci", "e1000e"]);
        assert!(matching(aliases, &[]).is_empty());
        let p = if_present();
        assert!(p.contains(&"mlx5_core") && p.contains(&"ahci") && !p.contains(&"ext4") && !p.contains(&"virtio_net"));
        assert!(node_modules().contains(&"mlx5_core"), "the image carries them all");
    }

    #[test]
    fn a_cycle_in_a_corrupt_list_ends() {
        let d = Deps::parse("a.ko: b.ko\nb.ko: a.ko\n: junk\nnot a line\n");
        let (files, _) = d.order(&["a"]);
        assert_eq!(files, ["b.ko", "a.ko"]);
    }
}
