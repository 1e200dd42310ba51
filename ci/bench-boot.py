#!/usr/bin/env python3
"""Cold-start benchmark for shoal-vmm (make bench-boot).

Each run spawns `shoal-vmm --kernel <boot probe> --stats` and measures, from just before the
spawn: the first byte the guest writes on its serial console (stdout), and the process exit.
The VMM's own memory is its peak RSS minus the guest memory resident at exit (both reported
by --stats). Prints medians over RUNS runs (after WARMUP unmeasured runs) as name=value lines.
"""
import json
import os
import statistics
import sys
import time

RUNS = int(os.environ.get("RUNS", "30"))
WARMUP = int(os.environ.get("WARMUP", "3"))


def one_run(vmm, kernel):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    argv = [vmm, "--kernel", kernel, "--cmdline", "bench", "--stats"]
    actions = [
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
        (os.POSIX_SPAWN_CLOSE, out_r),
        (os.POSIX_SPAWN_CLOSE, err_r),
    ]
    t0 = time.perf_counter()
    pid = os.posix_spawn(vmm, argv, os.environ, file_actions=actions)
    os.close(out_w)
    os.close(err_w)
    first = None
    out = b""
    while True:
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter()
        out += chunk
    _, status, _ = os.wait4(pid, 0)
    t_exit = time.perf_counter()
    err = b""
    while True:
        chunk = os.read(err_r, 65536)
        if not chunk:
            break
        err += chunk
    os.close(out_r)
    os.close(err_r)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or first is None or b"SHOAL-PROBE boot: ok" not in out:
        sys.exit(f"bench-boot: run failed (exit {code}):\n{out.decode(errors='replace')}\n{err.decode(errors='replace')}")
    stats = json.loads(err.decode().strip().splitlines()[-1])
    return (first - t0) * 1000, (t_exit - t0) * 1000, stats


def main():
    vmm, kernel = sys.argv[1], sys.argv[2]
    for _ in range(WARMUP):
        one_run(vmm, kernel)
    first, total, overhead, peak, exits = [], [], [], [], []
    for _ in range(RUNS):
        f, t, s = one_run(vmm, kernel)
        first.append(f)
        total.append(t)
        peak.append(s["peak_rss_kib"] / 1024)
        overhead.append((s["peak_rss_kib"] - s["guest_resident_kib"]) / 1024)
        exits.append(sum(s["vcpu_exits"]))
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
    print(f"{RUNS} runs (after {WARMUP} warm-up runs), boot probe, 1 vCPU, 128 MiB")
    print(f"spawn to first serial byte: median {statistics.median(first):.2f} ms, p90 {q(first, 0.9):.2f} ms")
    print(f"spawn to exit:              median {statistics.median(total):.2f} ms, p90 {q(total, 0.9):.2f} ms")
    print(f"vcpu exits per run: median {statistics.median(exits):.0f}")
    print(f"peak rss: median {statistics.median(peak):.2f} MiB; minus guest memory resident: median {statistics.median(overhead):.2f} MiB")
    print(f"cold_start_ms_median={statistics.median(first):.2f}")
    print(f"cold_start_to_exit_ms_median={statistics.median(total):.2f}")
    print(f"rss_overhead_mib={statistics.median(overhead):.2f}")


if __name__ == "__main__":
    main()
