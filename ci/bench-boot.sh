#!/usr/bin/env bash
# make bench-boot: cold-start figures of shoal-vmm.
#  1. the boot probe on this machine's KVM (ci/bench-boot.py): spawn -> first serial byte,
#     spawn -> exit, VMM memory;
#  2. the Linux guest in the emulated server (or directly on a VMX/SVM host): spawn -> /init
#     and spawn -> exit, medians of LINUX_RUNS (default 7).
# Side by side with Firecracker: FIRECRACKER=/path/to/firecracker make bench-boot, with a
# statically linked Firecracker built outside this repository (nothing of it goes in), e.g.
#   git clone firecracker; git checkout v1.12.0; drop rust-toolchain.toml;
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p firecracker \
#     --target x86_64-unknown-linux-gnu     (needs cmake, clang, libseccomp-dev)
# Runs of the two alternate in one emulated server; the ratio is printed. BOOT_TRACE=1 adds a
# run of each whose guest prints its own printk timeline (BOOT_TRACE_ARGS=initcall_debug for
# what every initcall took).
# Usage: bench-boot.sh SHOAL_VMM BOOT_PROBE GUEST_DIR   (name=value lines come last)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
vmm=${1:?vmm}; probe=${2:?boot probe}; guest=${3:?guest dir}
"$here/ensure-packages.sh" python3 qemu-system-x86 busybox-static cpio
probe_figures=$(python3 "$here/bench-boot.py" "$vmm" "$probe")
linux_figures=$("$(dirname "$vmm")/shoal-bench-linux" "$vmm" "$guest" "${LINUX_RUNS:-7}")
printf '%s\n' "$probe_figures" | grep -v '=' || true
printf '%s\n' "$linux_figures" | grep -v '=' || true
printf '%s\n' "$probe_figures" | grep '='
printf '%s\n' "$linux_figures" | grep '='
