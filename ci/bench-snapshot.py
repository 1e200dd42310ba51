#!/usr/bin/env python3
"""Snapshot benchmark for shoal-vmm (make bench-snapshot), on this machine's KVM.

For each guest memory size: boot the spin probe (prints all the time) through the API, pause,
and time PUT /snapshot/create (full) RUNS times; then spawn `shoal-vmm --restore DIR` RUNS times
(after WARMUP unmeasured runs) and time spawn -> the restored guest's first serial byte. The
guest's memory file stays in the page cache between runs, as on a node that restores replicas
of one snapshot. Prints medians and p90 as name=value lines last.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = int(os.environ.get("RUNS", "20"))
WARMUP = int(os.environ.get("WARMUP", "3"))
SIZES = [int(s) for s in os.environ.get("SIZES_MIB", "128,2048").split(",")]


def call(sock, method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    data = json.dumps(body) if body is not None else ""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n{data}".encode())
    resp = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        resp += chunk
    s.close()
    status = int(resp.split(b" ", 2)[1])
    if status >= 300:
        sys.exit(f"bench-snapshot: {method} {path} -> {resp.decode(errors='replace')}")


def take_snapshots(vmm, probe, mem_mib, snap):
    sock = os.path.join(snap, "api.sock")
    out = open(os.path.join(snap, "console"), "wb")
    p = subprocess.Popen([vmm, "--api-sock", sock], stdout=out, stderr=subprocess.PIPE)
    try:
        while not os.path.exists(sock):
            time.sleep(0.005)
        call(sock, "PUT", "/boot-source", {"kernel_image_path": probe})
        call(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mem_mib})
        call(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        time.sleep(0.3)
        call(sock, "PATCH", "/vm", {"state": "Paused"})
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            call(sock, "PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": os.path.join(snap, "state"), "mem_file_path": os.path.join(snap, "memory")})
            times.append((time.perf_counter() - t0) * 1000)
        return times
    finally:
        p.kill()
        p.wait()
        out.close()


def one_restore(vmm, snap):
    out_r, out_w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    argv = [vmm, "--restore", snap]
    actions = [(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, devnull, 2), (os.POSIX_SPAWN_CLOSE, out_r)]
    t0 = time.perf_counter()
    pid = os.posix_spawn(vmm, argv, os.environ, file_actions=actions)
    os.close(out_w)
    os.close(devnull)
    chunk = os.read(out_r, 4096)
    t1 = time.perf_counter()
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(out_r)
    # The guest may be mid-line at the snapshot; anything but its own characters is wrong.
    if not chunk or not set(chunk) <= set(b"spin=0123456789\n"):
        sys.exit(f"bench-snapshot: restored guest printed {chunk!r}")
    return (t1 - t0) * 1000


def main():
    vmm, probe = sys.argv[1], sys.argv[2]
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
    lines, figures = [], []
    for mib in SIZES:
        snap = tempfile.mkdtemp(prefix=f"shoal-bench-snap-{mib}-")
        try:
            create = take_snapshots(vmm, probe, mib, snap)
            alloc = os.stat(os.path.join(snap, "memory")).st_blocks * 512 / (1 << 20)
            for _ in range(WARMUP):
                one_restore(vmm, snap)
            restore = [one_restore(vmm, snap) for _ in range(RUNS)]
        finally:
            shutil.rmtree(snap, ignore_errors=True)
        lines.append(f"{mib} MiB guest (spin probe, 1 vCPU), {RUNS} runs; memory file {alloc:.1f} MiB allocated")
        lines.append(f"  snapshot create (API request, full):    median {statistics.median(create):.2f} ms, p90 {q(create, 0.9):.2f} ms")
        lines.append(f"  spawn to restored guest's first byte:   median {statistics.median(restore):.2f} ms, p90 {q(restore, 0.9):.2f} ms")
        figures.append(f"snapshot_create_ms_median_{mib}mib={statistics.median(create):.2f}")
        figures.append(f"restore_spawn_to_output_ms_median_{mib}mib={statistics.median(restore):.2f}")
    print("\n".join(lines))
    print("\n".join(figures))


if __name__ == "__main__":
    main()
