//! Compiles each probe guest in `src/probes/` into a freestanding x86_64 ELF that shoal-vmm
//! boots like a vmlinux. The probes need codegen and link flags that differ from the rest of
//! the workspace (no std, panic=abort, static relocation, fixed image base), so they are
//! built here with rustc directly rather than as workspace binaries.

use std::path::PathBuf;
use std::process::Command;

const PROBES: &[&str] =
    &["boot", "smp", "timer", "fault", "panic", "counter", "spin", "virtio", "workload", "vsockreset", "balloon"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    println!("cargo:rerun-if-changed=src/probes");
    for probe in PROBES {
        let src = format!("src/probes/{probe}.rs");
        let elf = out.join(format!("{probe}.elf"));
        let status = Command::new(&rustc)
            .args(["--edition", "2021", "--crate-type", "bin", "--crate-name", &format!("probe_{probe}")])
            .args([
                "-C",
                "panic=abort",
                "-C",
                "opt-level=2",
                "-C",
                "relocation-model=static",
                "-C",
                "debuginfo=0",
                "-C",
                "strip=symbols",
            ])
            // No SSE: the nested KVM of the development machines cannot execute it in guest
            // supervisor mode (rustc warns that this changes the float ABI; probes use no floats).
            .args([
                "-C",
                "target-cpu=x86-64",
                "-C",
                "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
            ])
            .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-static", "-C", "link-arg=-nostdlib"])
            .args(["-C", "link-arg=-Wl,--image-base=0x1000000", "-C", "link-arg=-Wl,--build-id=none"])
            .arg("-o")
            .arg(&elf)
            .arg(&src)
            .status()
            .expect("run rustc for a probe guest");
        assert!(status.success(), "probe guest {probe} failed to build");
        println!("cargo:rustc-env=SHOAL_PROBE_{}={}", probe.to_uppercase(), elf.display());
    }
}
