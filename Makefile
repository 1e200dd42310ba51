# Shoal: the two commands a newcomer needs are `make run` and `make test` (see README.md).
# Every target installs what it needs (Debian packages through ci/ensure-packages.sh).

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo
GUEST_DIR := target/guest
PROBE_DIR := target/probes
TARGET_DIR := target/x86_64-unknown-linux-gnu/release
VMM := $(TARGET_DIR)/shoal-vmm

.PHONY: run run-probes test lint build probes guest-kernel bench-boot bench-snapshot bench-devices bench-cluster bench-workloads bench-net bench-scheduler fuzz deps clean-cache image

deps:
	@ci/ensure-deps.sh

build: deps
	$(CARGO) build --release --workspace --locked

# Probe guests: tiny freestanding ELF guests the KVM tests boot (vmm/probe-guest).
probes: build
	$(CARGO) run --release --locked -q -p shoal-probe-guest --bin shoal-probes -- $(PROBE_DIR) >/dev/null
	@ls $(PROBE_DIR)/*.elf

# Guest kernel (vmlinux, bzImage) and busybox initramfs, cached in ~/.cache/shoal.
guest-kernel: deps
	image-build/guest/build-kernel.sh $(GUEST_DIR)
	image-build/guest/build-initramfs.sh $(GUEST_DIR)

# The host image in target/image/: vmlinuz + initramfs.img + shoal.ipxe (PXE), shoal.efi (a
# unified kernel image) and shoal.raw (a GPT disk to flash). SHOAL_IMAGE_CMDLINE adds to the
# kernel command line (shoal.seed=, shoal.secret=, shoal.min_voters=, ...).
image: build
	@image-build/host/build-image.sh $(TARGET_DIR) target/image

# The main job: the host image booted in QEMU (KVM on VMX/SVM hosts, else TCG), a Linux microVM
# deployed on its node and this terminal attached to the microVM's console.
run: build guest-kernel
	@ci/ensure-packages.sh qemu-system-x86 busybox-static cpio
	@echo "make run: building the host image (target/image), then booting it with a Linux microVM on its node"
	@image-build/host/build-image.sh $(TARGET_DIR) target/image >/dev/null
	@$(TARGET_DIR)/shoal-run-image target/image $(GUEST_DIR)

# The probe guests on this machine's KVM (what works on the nested development machines).
run-probes: probes
	@ci/run-local.sh $(VMM) $(PROBE_DIR)

# Formatting and lints; clippy is what enforces the workspace lints (a // SAFETY: comment on
# every unsafe block, ...).
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

test: lint probes guest-kernel
	@ci/ensure-packages.sh qemu-system-x86 busybox-static cpio tmux iproute2 python3 curl e2fsprogs dnsmasq-base ovmf
	SHOAL_GUEST_DIR=$(CURDIR)/$(GUEST_DIR) SHOAL_PROBE_DIR=$(CURDIR)/$(PROBE_DIR) SHOAL_VMM=$(CURDIR)/$(VMM) \
	  ci/test-summary.sh $(CARGO) test --workspace --locked --release --no-fail-fast

bench-boot: probes guest-kernel
	@ci/bench-boot.sh $(VMM) $(PROBE_DIR)/boot.elf $(GUEST_DIR)

# Snapshot create and restore figures: the spin probe on this machine's KVM (128 MiB and
# 2 GiB guests), then a Linux guest in the emulated server (or directly on VMX/SVM hosts).
bench-snapshot: probes guest-kernel
	@ci/ensure-packages.sh python3 qemu-system-x86 busybox-static cpio
	@python3 ci/bench-snapshot.py $(VMM) $(PROBE_DIR)/spin.elf
	@$(TARGET_DIR)/shoal-bench-linux-restore $(VMM) $(GUEST_DIR) $${LINUX_RESTORES:-20}
	@# The userfaultfd experiment: loading memory through userfaultfd (on demand, or with the
	@# working set prefetched) against MAP_PRIVATE, hot and cold page cache (needs root).
	$(CARGO) bench --locked -p shoal-vmm --bench uffd

# Device figures on this machine's KVM: a rate-limited disk's throughput against its limit.
bench-devices: probes
	@ci/ensure-packages.sh python3
	@python3 ci/bench-devices.py $(VMM) $(PROBE_DIR)/virtio.elf

# Cluster figures: real shoal-node processes in network namespaces (as root).
bench-cluster: deps
	@ci/ensure-packages.sh iproute2
	$(CARGO) bench --locked -p shoal-node --bench cluster

# Workload figures: real shoal-node processes in network namespaces running probe guests (as root).
bench-workloads: probes
	@ci/ensure-packages.sh iproute2
	SHOAL_VMM=$(CURDIR)/$(VMM) $(CARGO) bench --locked -p shoal-node --bench workloads

# Network figures (as root): time to wire an instance, TCP through the overlay against the
# underlay, DHCP time to a lease from dnsmasq.
bench-net: deps
	@ci/ensure-packages.sh iproute2 dnsmasq-base
	$(CARGO) bench --locked -p shoal-netstack --bench net

# Placement at fleet scale on one core: 5,000 nodes, 1,000,000 instances (no root, no KVM).
bench-scheduler: deps
	$(CARGO) bench --locked -p shoal-node --bench scheduler

# Fuzz the API parser, the virtio queue paths and snapshot decoding (RUNS executions each).
fuzz: deps
	@ci/fuzz.sh $${RUNS:-1000000}

clean-cache:
	rm -rf $${SHOAL_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/shoal}
