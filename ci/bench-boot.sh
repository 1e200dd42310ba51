#!/usr/bin/env bash
# make bench-boot: cold-start figures of shoal-vmm.
#  1. the boot probe on this machine's KVM (ci/bench-boot.py): spawn -> first serial byte,
#     spawn -> exit, VMM memory;
#  2. the Linux guest in the emulated server (or directly on a VMX/SVM host): spawn -> /init.
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
