#!/usr/bin/env python3
"""Device benchmark for shoal-vmm (make bench-devices), on this machine's KVM.

A rate-limited virtio-blk disk: the virtio probe writes WRITES x 64 KiB to a disk limited to
LIMIT bytes/s (bucket refilled every 10 ms, so the initial burst is small); the time from the
probe's `bench start` line to its `bench done` line gives the throughput. Prints it, the limit
and their ratio (target: within 10%), median over RUNS runs, as name=value lines last.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("RUNS", "5"))
LIMIT = int(os.environ.get("LIMIT", str(4 << 20)))
WRITES = int(os.environ.get("WRITES", "96"))


def one(vmm, probe, disk):
    size = LIMIT // 100
    p = subprocess.Popen([vmm, "--kernel", probe, "--cmdline", f"virtio.bench={WRITES}", "--disk", f"path={disk},rate=bw={size}/10"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    start = done = None
    for line in p.stdout:
        if line.startswith(b"bench start"):
            start = time.perf_counter()
        elif line.startswith(b"bench done"):
            done = time.perf_counter()
            if b"failed=0" not in line:
                sys.exit(f"bench-devices: {line!r}")
    if p.wait() != 0 or start is None or done is None:
        sys.exit("bench-devices: the probe run failed")
    # The first write fits the initial bucket; the rest are paced.
    return (WRITES - 1) * 65536 / (done - start)


def main():
    vmm, probe = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as d:
        disk = os.path.join(d, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(16 << 20)
        rates = [one(vmm, probe, disk) for _ in range(RUNS)]
    med = statistics.median(rates)
    print(f"rate-limited disk: limit {LIMIT / (1 << 20):.2f} MiB/s, measured {' '.join(f'{r / (1 << 20):.3f}' for r in rates)} MiB/s ({RUNS} runs of {WRITES} x 64 KiB writes)")
    print(f"disk_rate_limit_mib_s={LIMIT / (1 << 20):.2f}")
    print(f"disk_rate_measured_mib_s_median={med / (1 << 20):.3f}")
    print(f"disk_rate_ratio_median={med / LIMIT:.3f}")


if __name__ == "__main__":
    main()
