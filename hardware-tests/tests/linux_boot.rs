//! Full Linux under shoal-vmm: the project's guest kernel, as vmlinux (PVH entry) and as bzImage
//! (64-bit entry), on 1 and 2 vCPUs, boots the busybox initramfs to /init, which prints a
//! marker, `nproc` and /proc/cmdline, then reboots: shoal-vmm exits 0 each time. A guest that
//! triple-faults or panics makes shoal-vmm exit 2. A guest counting in a shell loop is
//! snapshotted and restored in new processes, and counts on. A guest with an ext4 root on
//! virtio-blk writes a file found in the image afterwards, cannot write its read-only disk,
//! reads the virtio rng, and on virtio-net (a tap bridged in the server) answers the server's
//! ping and takes a TCP message from it. A guest reads its metadata from MMDS (V2, with a
//! session token) and gives 128 MiB back through the balloon. All cases run in one
//! emulated-server boot (or directly on a VMX/SVM host).

use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_hardware_tests::{repo_root, run, Job, Mode, Run};

const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=1 shoal.test=1";

fn vmm_binary() -> PathBuf {
    let p = std::env::var_os("SHOAL_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/x86_64-unknown-linux-gnu/release/shoal-vmm"));
    assert!(p.exists(), "{} is missing: run `make test` (it builds shoal-vmm first)", p.display());
    p
}

fn guest(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("SHOAL_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/guest"));
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run `make guest-kernel`", p.display());
    p
}

/// Server side of the guest network: a bridge with an address and a tap on it.
const NET_SETUP: &str = "for m in llc stp bridge tun; do insmod /lib/modules/$m.ko 2>/dev/null; done
brctl addbr br0 && ip addr add 10.0.2.1/24 dev br0 && ip link set br0 up
for t in tap0 tap1; do tunctl -t $t >/dev/null && brctl addif br0 $t && ip link set $t up; done
";

/// The disk case: ext4 root, a read-only disk, the rng and a network link. While the guest
/// waits, the server pings it and then tells it to finish over TCP; then 4 MiB go each way
/// over TCP (with the checksum and segmentation offloads the guest negotiated).
const DISK_CASE: &str = "(sleep 300 | nc -l -p 8 > /tmp/bulk.in) &
./shoal-vmm --kernel vmlinux --cmdline 'console=ttyS0 quiet reboot=k panic=-1 root=/dev/vda rw init=/init shoal.test=disk' \\
  --disk path=root.img,id=root --disk path=ro.img,ro --rng --net tap=tap0,mac=02:00:00:00:00:02 > /tmp/disk-vm.out 2>&1 &
vm=$!
i=0; while ! grep -q 'net: eth0 up' /tmp/disk-vm.out 2>/dev/null && [ $i -lt 240 ] && kill -0 $vm 2>/dev/null; do sleep 0.5; i=$((i+1)); done
if ping -c 3 -W 10 10.0.2.2 > /tmp/ping.out 2>&1; then echo 'SHOAL-NET-CHECK ping=ok'; else echo 'SHOAL-NET-CHECK ping=failed'; cat /tmp/ping.out; fi
i=0; while ! echo done | timeout 5 nc 10.0.2.2 7 2>/dev/null && [ $i -lt 10 ] && kill -0 $vm 2>/dev/null; do sleep 0.5; i=$((i+1)); done
i=0; while ! grep -q 'net: sent to host' /tmp/disk-vm.out && [ $i -lt 240 ] && kill -0 $vm 2>/dev/null; do sleep 0.5; i=$((i+1)); done
echo \"SHOAL-NET-CHECK bulk-in=$(wc -c < /tmp/bulk.in)\"
i=0; while ! dd if=/dev/zero bs=1024 count=4096 2>/dev/null | timeout 60 nc 10.0.2.2 9 2>/dev/null && [ $i -lt 20 ] && kill -0 $vm 2>/dev/null; do sleep 0.5; i=$((i+1)); done
wait $vm; code=$?
cat /tmp/disk-vm.out
exit $code
";

/// The jail on a host like the node image: cgroup v2 (mounted here if the server has not) and a
/// root that is the initramfs, which pivot_root refuses (the jail moves its directory over / and
/// chroots instead). A Linux guest counts inside; its cgroup's limits and its view are read from
/// outside, then SIGTERM ends it and the cgroup goes.
const JAIL_CASE: &str = r"set -u
grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts || { mkdir -p /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup; }
echo 'SHOAL-JAIL controllers='$(cat /sys/fs/cgroup/cgroup.controllers | tr ' ' ,)
mkdir -p /tmp/jail && cp vmlinux initramfs.cpio /tmp/jail/
./shoal-vmm --jail /tmp/jail --uid 65534 --gid 65534 --jail-id v2 --cgroup cpus=1,mem-mib=256,pids=64 --kernel /vmlinux --initrd /initramfs.cpio --mem-mib 128 --cmdline 'console=ttyS0 quiet reboot=k panic=-1 shoal.test=counter' > /tmp/jail.out 2>&1 &
vm=$!
i=0; while ! grep -q 'count=3' /tmp/jail.out && [ $i -lt 240 ] && kill -0 $vm 2>/dev/null; do sleep 0.5; i=$((i+1)); done
cg=/sys/fs/cgroup/shoal-vmm/v2
echo SHOAL-JAIL counting=$(grep -c count= /tmp/jail.out) memory.max=$(cat $cg/memory.max) pids.max=$(cat $cg/pids.max) cpu.max=$(tr ' ' / < $cg/cpu.max)
child=$(head -1 $cg/cgroup.procs)
echo SHOAL-JAIL uid=$(awk '/^Uid:/{print $2}' /proc/$child/status) root=$(ls /proc/$child/root | tr '\n' ,)
kill $vm; wait $vm; code=$?
echo SHOAL-JAIL exit=$code cgroup=$([ -d $cg ] && echo left || echo removed)
tail -3 /tmp/jail.out
";

fn boot_job() -> Job {
    let mut script = String::new();
    for (kernel, vcpus) in [("vmlinux", 1), ("vmlinux", 2), ("bzImage", 1), ("bzImage", 2)] {
        script.push_str(&format!(
            "run_case {kernel}-{vcpus} ./shoal-boot-timer SHOAL-GUEST-INIT -- ./shoal-vmm --kernel {kernel} --initrd initramfs.cpio --cmdline '{CMDLINE}' --vcpus {vcpus}\n"
        ));
    }
    script.push_str("run_case triple-fault ./shoal-vmm --kernel fault.elf\n");
    // virtio: an ext4 root disk the guest writes to, a read-only disk it cannot, the rng.
    script.push_str("dd if=/dev/zero of=ro.img bs=1024 count=1024 2>/dev/null; cp ro.img ro-before.img\n");
    // The guest's eth0 is on tap0, bridged with br0 (10.0.2.1) in the emulated server.
    script.push_str(NET_SETUP);
    script.push_str("cat > disk-case.sh <<'EOF'\n");
    script.push_str(DISK_CASE);
    script.push_str("EOF\n");
    script.push_str("run_case disk sh disk-case.sh\n");
    script.push_str("if grep -q SHOAL-WRITTEN-BY-GUEST root.img; then echo 'SHOAL-DISK-CHECK root-file=found'; else echo 'SHOAL-DISK-CHECK root-file=missing'; fi\n");
    script.push_str("if cmp -s ro.img ro-before.img; then echo 'SHOAL-DISK-CHECK ro-image=unchanged'; else echo 'SHOAL-DISK-CHECK ro-image=changed'; fi\n");
    // A Linux guest counting in a shell loop is snapshotted and restored in new processes.
    script.push_str("run_case snapshot ./shoal-snapshot-job ./shoal-vmm vmlinux initramfs.cpio /tmp/snapshot 5; rm -rf /tmp/snapshot\n");
    // The same with an ext4 root on virtio-blk, the rng and virtio-net on tap0: the disk and
    // the network work after the restore, where eth0 is moved to tap1 with a new MAC (network
    // overrides), which the guest takes when told to probe its NIC again.
    script.push_str("run_case snapshot-disk ./shoal-snapshot-job ./shoal-vmm vmlinux initramfs.cpio /tmp/snapshot-disk 2 root.img tap0 tap1; rm -rf /tmp/snapshot-disk\n");
    script.push_str("cat > jail-case.sh <<'EOF'\n");
    script.push_str(JAIL_CASE);
    script.push_str("EOF\n");
    script.push_str("run_case jail-v2 sh jail-case.sh\n");
    // MMDS V2 over the guest's eth0 (answered inside the VMM) and the balloon giving memory back.
    script.push_str(
        "run_case mmds ./shoal-snapshot-job mmds ./shoal-vmm vmlinux initramfs.cpio /tmp/mmds tap0; rm -rf /tmp/mmds\n",
    );
    // Ctrl+Alt+Del through the API reboots the guest, which ends the VMM with status 0.
    script.push_str("run_case cad ./shoal-snapshot-job cad ./shoal-vmm vmlinux initramfs.cpio /tmp/cad\n");
    // The same with ACPI: the keyboard controller is found through the DSDT.
    script
        .push_str("run_case cad-acpi ./shoal-snapshot-job cad ./shoal-vmm vmlinux initramfs.cpio /tmp/cad-acpi acpi\n");
    script.push_str("echo \"SHOAL-SERVER-MEMORY $(free -m | grep Mem:)\"\n");
    // panic=-1 reboots at once: panic=N's N-second wait is a guest busy-loop, which can run far
    // longer than N seconds where guest code is emulated.
    script.push_str("run_case panic ./shoal-boot-timer SHOAL-GUEST-INIT -- ./shoal-vmm --kernel vmlinux --initrd initramfs.cpio --cmdline 'console=ttyS0 reboot=k panic=-1 rdinit=/no-such-init'\n");
    Job {
        script,
        files: vec![
            (vmm_binary(), "shoal-vmm".into()),
            (PathBuf::from(env!("CARGO_BIN_EXE_shoal-boot-timer")), "shoal-boot-timer".into()),
            (PathBuf::from(env!("CARGO_BIN_EXE_shoal-snapshot-job")), "shoal-snapshot-job".into()),
            (guest("vmlinux"), "vmlinux".into()),
            (guest("bzImage"), "bzImage".into()),
            (guest("initramfs.cpio"), "initramfs.cpio".into()),
            (guest("rootfs.ext4"), "root.img".into()),
            (Path::new(shoal_probe_guest::FAULT).to_path_buf(), "fault.elf".into()),
        ],
        limit: Duration::from_secs(20 * 60),
        interactive: false,
    }
}

fn check(run: &Run) -> Vec<String> {
    let mut failures = Vec::new();
    for (kernel, vcpus) in [("vmlinux", 1), ("vmlinux", 2), ("bzImage", 1), ("bzImage", 2)] {
        let name = format!("{kernel}-{vcpus}");
        let c = run.case(&name);
        let mut want = vec![
            "SHOAL-GUEST-INIT ok".to_string(),
            format!("nproc: {vcpus}"),
            format!("cmdline: {CMDLINE}"),
            // The VMM offers the TSC-deadline timer, which KVM emulates but does not list.
            "timer: tsc_deadline_timer".to_string(),
            "boot_timer exit=0".to_string(),
        ];
        want.retain(|w| !(c.has_line(w) || (w.starts_with("boot_timer") && c.has(w))));
        if c.exit.is_none() || !want.is_empty() {
            failures.push(format!("{name}: missing {want:?} (case exit {:?})", c.exit));
        }
    }
    let fault = run.case("triple-fault");
    if fault.exit != Some(2) || !fault.has("shoal-vmm: guest triple fault") {
        failures.push(format!("triple-fault: exit {:?}, output {:?}", fault.exit, fault.output));
    }
    let disk = run.case("disk");
    let want = [
        "disk: root ext4 rw vda=yes",
        "disk: wrote /from-guest.txt",
        "disk: ro-write=failed",
        "disk: rng=virtio_rng.0 bytes=64",
        "net: eth0 up mac=02:00:00:00:00:02",
        "SHOAL-NET-CHECK ping=ok",
        "net: offloads=111111",
        "net: host says done",
        "SHOAL-NET-CHECK bulk-in=4194304",
        "net: host-to-guest bytes=4194304",
    ];
    let missing: Vec<_> = want.iter().filter(|w| !disk.has_line(w)).collect();
    if disk.exit != Some(0) || !missing.is_empty() {
        failures.push(format!("disk: exit {:?}, missing {missing:?}, output {:?}", disk.exit, disk.output));
    }
    for check in ["SHOAL-DISK-CHECK root-file=found", "SHOAL-DISK-CHECK ro-image=unchanged"] {
        if !run.lines.iter().any(|l| l.text == check) {
            failures.push(format!("disk: {check} not seen"));
        }
    }
    let snapshot = run.case("snapshot");
    if snapshot.exit != Some(0) || !snapshot.has_line("snapshot_job result=ok") {
        failures.push(format!("snapshot: exit {:?}, output {:?}", snapshot.exit, snapshot.output));
    }
    let snapshot_disk = run.case("snapshot-disk");
    let synced = snapshot_disk
        .output
        .iter()
        .any(|l| l.strip_prefix("snapshot_job disk_sync_after_restore=").is_some_and(|v| !v.is_empty()));
    let pinged = snapshot_disk.has_line("snapshot_job ping_after_restore=ok");
    // The restore gave eth0 a new MAC: the guest takes it when its driver probes the NIC again.
    let new_mac =
        snapshot_disk.has_line("snapshot_job guest_mac_after_reprobe=02:00:00:00:00:12 host_sees=02:00:00:00:00:12");
    // Both clones learned their own vsock CID and answered on their own socket.
    // ... and, described by ACPI, learned from the VM Generation ID that they were forked.
    let clones = snapshot_disk.has_line("snapshot_job clone_vsock=cid=42")
        && snapshot_disk.has_line("snapshot_job clone_vsock=cid=43")
        && snapshot_disk.output.iter().filter(|l| *l == "snapshot_job clone_vm_fork=reseeded").count() == 2;
    if snapshot_disk.exit != Some(0)
        || !snapshot_disk.has_line("snapshot_job result=ok")
        || !synced
        || !pinged
        || !new_mac
        || !clones
    {
        failures.push(format!("snapshot-disk: exit {:?}, output {:?}", snapshot_disk.exit, snapshot_disk.output));
    }
    let jail = run.case("jail-v2");
    let want = [
        "memory.max=268435456 pids.max=64 cpu.max=100000/100000",
        "uid=65534 root=dev,initramfs.cpio,proc,vmlinux,",
        "exit=143 cgroup=removed",
    ];
    let counting = jail.output.iter().any(|l| {
        l.strip_prefix("SHOAL-JAIL counting=")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= 3)
    });
    let missing: Vec<_> =
        want.iter().filter(|w| !jail.output.iter().any(|l| l.starts_with("SHOAL-JAIL ") && l.contains(*w))).collect();
    if !counting || !missing.is_empty() {
        failures.push(format!("jail-v2: counting {counting}, missing {missing:?}, output {:?}", jail.output));
    }
    let mmds = run.case("mmds");
    if mmds.exit != Some(0) || !mmds.has_line("mmds_job result=ok") {
        failures.push(format!("mmds: exit {:?}, output {:?}", mmds.exit, mmds.output));
    }
    for name in ["cad", "cad-acpi"] {
        let cad = run.case(name);
        if cad.exit != Some(0) || !cad.has_line("cad_job result=ok") {
            failures.push(format!("{name}: exit {:?}, output {:?}", cad.exit, cad.output));
        }
    }
    let panic = run.case("panic");
    if !panic.has("boot_timer exit=2") || !panic.has("shoal-vmm: guest kernel panicked") {
        failures.push(format!("panic: output {:?}", panic.output.iter().rev().take(5).collect::<Vec<_>>()));
    }
    failures
}

#[test]
fn linux_guests_boot_to_init_and_faults_exit_nonzero() {
    let mode = Mode::detect();
    let run = run(&boot_job(), mode).expect("run the job");
    let failures = check(&run);
    for name in ["vmlinux-1", "vmlinux-2", "bzImage-1", "bzImage-2", "panic"] {
        if let Some(ms) =
            run.case(name).output.iter().find_map(|l| l.strip_prefix("boot_timer marker_ms=").map(str::to_string))
        {
            println!("{name}: spawn to /init marker {ms} ms ({mode:?})");
        }
    }
    // Restarted servers and retried cases (the emulator's faults), with why, on every run,
    // passing or not: libtest captures print! and eprint!, not writes to the stderr handle, so
    // CI logs keep the emulator's fault rate.
    let faults: Vec<&str> = run
        .lines
        .iter()
        .map(|l| l.text.as_str())
        .filter(|t| t.starts_with("SHOAL-HARNESS attempt") || t.starts_with("SHOAL-HWTEST-RETRY"))
        .collect();
    let restarts = faults.iter().filter(|t| t.starts_with("SHOAL-HARNESS attempt")).count();
    let retried = faults.len() - restarts;
    let mut summary = format!("linux_boot ({mode:?}): server restarts={restarts} retried cases={retried}\n");
    for line in &faults {
        summary.push_str(&format!("  {line}\n"));
    }
    let _ = std::io::Write::write_all(&mut std::io::stderr(), summary.as_bytes());
    for line in run.case("jail-v2").output.iter().filter(|l| l.starts_with("SHOAL-JAIL")) {
        println!("{line} ({mode:?})");
    }
    for line in run.case("mmds").output.iter().filter(|l| l.starts_with("mmds_job")) {
        println!("{line} ({mode:?})");
    }
    for line in
        run.case("cad").output.iter().chain(run.case("cad-acpi").output.iter()).filter(|l| l.starts_with("cad_job"))
    {
        println!("{line} ({mode:?})");
    }
    for line in run
        .case("snapshot")
        .output
        .iter()
        .chain(run.case("snapshot-disk").output.iter())
        .filter(|l| l.starts_with("snapshot_job"))
    {
        println!("{line} ({mode:?})");
    }
    assert!(run.finished, "the job did not finish in time; console:\n{}", run.text());
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}\n\nconsole ({mode:?}):\n{}",
        failures.len(),
        failures.join("\n"),
        run.text()
    );
}
