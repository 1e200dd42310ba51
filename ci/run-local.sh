#!/usr/bin/env bash
# `make run`: boots microVMs on this machine's KVM with shoal-vmm. For now these are the probe
# guests (Linux cannot boot to user space on the development machines' nested KVM; see
# ../shared/ENVIRONMENT.md): the boot probe with a command line, then the smp probe on 4 vCPUs.
set -euo pipefail
vmm=${1:?vmm binary}
probes=${2:?probe dir}
echo "== shoal-vmm: boot probe, 1 vCPU, 128 MiB, --cmdline \"hello shoal\""
"$vmm" --kernel "$probes/boot.elf" --cmdline "hello shoal"
echo "== shoal-vmm exited $?"
echo "== shoal-vmm: smp probe, 4 vCPUs"
"$vmm" --kernel "$probes/smp.elf" --vcpus 4
echo "== shoal-vmm exited $?"
