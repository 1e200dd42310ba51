//! `shoal-snapshot-job VMM KERNEL INITRD WORKDIR [RESTORES] [ROOT_IMAGE [TAP [RESTORE_TAP]]]`: runs inside the
//! emulated server (or on a VMX/SVM host). Boots the Linux guest with the counter loop
//! (`shoal.test=counter`) under `VMM --api-sock` (with ROOT_IMAGE: from that ext4 image on
//! virtio-blk, plus the rng, and the loop syncs a file to the disk every 10 counts; with TAP,
//! also virtio-net on that tap, the guest at 10.0.2.2, pinged after the first restore; with
//! RESTORE_TAP, the restored guests' eth0 is moved to that tap with a new MAC, which the first
//! restored guest takes when told to probe its NIC again; with ROOT_IMAGE also a vsock device,
//! each restore a clone with its own CID and socket, which the guest learns and answers on),
//! pauses it, takes a full snapshot through the API, kills it, then
//! restores the snapshot RESTORES times (default 5) in new `VMM --restore` processes. Checks
//! that the first restored guest's console carries on the count (no reset, no skip), and
//! prints `snapshot_job ...` figures: create time, spawn -> the restored guest's next output.
//! Last line: `snapshot_job result=ok` or `snapshot_job result=FAIL: why`.
//!
//! `shoal-snapshot-job cad VMM KERNEL INITRD WORKDIR [acpi]`: boots the same guest under the API
//! (described by ACPI with `acpi`),
//! presses Ctrl+Alt+Del through `PUT /actions {"action_type": "SendCtrlAltDel"}` and expects
//! the guest kernel to reboot, which ends the VMM with status 0. Last line: `cad_job result=ok`
//! or `cad_job result=FAIL: why`.
//!
//! `shoal-snapshot-job mmds VMM KERNEL INITRD WORKDIR TAP`: boots the guest with
//! `shoal.test=mmds` under the API with virtio-net on TAP, MMDS V2 on eth0 (its data put
//! through the API) and a balloon with statistics. The guest reads its instance id over HTTP
//! with a session token, then fills and frees 160 MiB; the job inflates the balloon to 128 MiB
//! with `PATCH /balloon` and checks the VMM's resident memory drops and the guest's statistics
//! arrive. Prints `mmds_job ...` figures; last line `mmds_job result=ok` or `... FAIL: why`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CMDLINE: &str = "console=ttyS0 quiet reboot=k panic=-1 shoal.test=counter";

/// Console bytes with the time the first one arrived, and whether the VMM closed it (exited).
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    first: Option<Instant>,
    closed: bool,
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Captured>>);

impl Console {
    fn capture(child: &mut Child) -> Console {
        let console = Console::default();
        if let Some(mut out) = child.stdout.take() {
            let c = console.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = out.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    let mut g = c.0.lock().unwrap_or_else(|p| p.into_inner());
                    g.first.get_or_insert_with(Instant::now);
                    g.bytes.extend_from_slice(&chunk[..n]);
                }
                c.0.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            });
        }
        console
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner()).bytes).into_owned()
    }

    fn first_byte(&self) -> Option<Instant> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).first
    }

    fn counts(&self) -> Vec<u64> {
        let text = self.text();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("count=")?.parse().ok()).collect()
    }

    /// The value of the first complete `disk-sync=N` line.
    fn disk_sync(&self) -> Option<u64> {
        let text = self.text();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix("disk-sync=")?.parse().ok())
    }

    fn closed(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// Waits until `done` holds, `limit` passes or the VMM exits (nothing more can come).
    fn wait(&self, limit: Duration, done: impl Fn(&Console) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            if self.closed() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        done(self)
    }
}

/// One API request; Ok(the answer's body) on a 2xx.
fn request(sock: &Path, method: &str, path: &str, body: &str) -> Result<String, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    match (resp.split(' ').nth(1), resp.split_once("\r\n\r\n")) {
        (Some(code), Some((_, body))) if code.starts_with('2') => Ok(body.to_string()),
        _ => Err(format!("{method} {path}: {resp}")),
    }
}

fn call(sock: &Path, method: &str, path: &str, body: &str) -> Result<(), String> {
    request(sock, method, path, body).map(|_| ())
}

fn fetch(sock: &Path, path: &str) -> Result<String, String> {
    request(sock, "GET", path, "")
}

/// A number field of a flat JSON object, without a JSON parser in this small binary.
fn json_u64(body: &str, field: &str) -> Option<u64> {
    let at = body.find(&format!("\"{field}\":"))? + field.len() + 3;
    let digits: String = body[at..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// MMDS V2 and the balloon with a Linux guest (see the module comment).
fn mmds_job(vmm: &Path, kernel: &Path, initrd: &Path, work: &Path, tap: &str) -> Result<(), String> {
    let (mut child, console, sock) = spawn_api_vmm(vmm, work, "mmds.sock")?;
    let result = (|| {
        wait_for_socket(&sock)?;
        call(&sock, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 256}"#)?;
        let boot = format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "console=ttyS0 quiet reboot=k panic=-1 shoal.test=mmds"}}"#,
            kernel.display(),
            initrd.display()
        );
        call(&sock, "PUT", "/boot-source", &boot)?;
        let net = format!(r#"{{"iface_id": "eth0", "host_dev_name": "{tap}", "guest_mac": "02:00:00:00:00:05"}}"#);
        call(&sock, "PUT", "/network-interfaces/eth0", &net)?;
        call(&sock, "PUT", "/mmds/config", r#"{"version": "V2", "network_interfaces": ["eth0"]}"#)?;
        call(&sock, "PUT", "/mmds", r#"{"latest": {"meta-data": {"instance-id": "i-shoal-emulated"}}}"#)?;
        call(&sock, "PUT", "/balloon", r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#)?;
        call(&sock, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)?;
        if !console.wait(Duration::from_secs(240), |c| c.text().contains("balloon: filled and freed")) {
            return Err(format!("the guest never filled its memory; console: {}", console.text()));
        }
        for want in [
            "mmds: token-length=48",
            "mmds: no-token=HTTP/1.1 401 Unauthorized",
            "mmds: instance-id=i-shoal-emulated",
            "balloon: driver=1",
        ] {
            if !console.text().lines().any(|l| l.trim_end_matches('\r') == want) {
                return Err(format!("`{want}` not on the console: {}", console.text()));
            }
        }
        let before = rss_kib(child.id()).ok_or("no VmRSS")?;
        let first = fetch(&sock, "/balloon/statistics")?;
        println!("mmds_job stats_before={first}");
        call(&sock, "PATCH", "/balloon", r#"{"amount_mib": 128}"#)?;
        let inflated = Instant::now();
        let mut actual = 0;
        while inflated.elapsed() < Duration::from_secs(120) {
            actual = json_u64(&fetch(&sock, "/balloon/statistics")?, "actual_mib").unwrap_or(0);
            if actual >= 128 {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let after = rss_kib(child.id()).ok_or("no VmRSS")?;
        let stats = fetch(&sock, "/balloon/statistics")?;
        println!(
            "mmds_job rss_before_kib={before} rss_after_kib={after} actual_mib={actual} inflate_ms={}",
            inflated.elapsed().as_millis()
        );
        println!("mmds_job stats_after={stats}");
        if actual < 128 {
            return Err(format!("the balloon reached {actual} of 128 MiB"));
        }
        if before.saturating_sub(after) < 64 << 10 {
            return Err(format!("the VMM's RSS went from {before} KiB to {after} KiB, less than 64 MiB back"));
        }
        if json_u64(&stats, "free_memory").is_none() || json_u64(&stats, "total_memory").is_none() {
            return Err(format!("no memory statistics from the guest: {stats}"));
        }
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Pings the guest (10.0.2.2) from this host: the guest's network works.
fn ping_guest() -> bool {
    Command::new("ping")
        .args(["-c", "2", "-W", "10", "10.0.2.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The MAC the restores give the guest's eth0 (it booted with 02:00:00:00:00:02).
const RESTORE_MAC: &str = "02:00:00:00:00:12";

/// The MAC in this host's neighbour entry for the guest (10.0.2.2).
fn guest_neighbour_mac() -> Option<String> {
    let out = Command::new("ip").args(["neigh", "show", "10.0.2.2"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let words: Vec<&str> = text.split_whitespace().collect();
    words.iter().position(|w| *w == "lladdr").and_then(|i| words.get(i + 1)).map(|w| w.to_string())
}

/// The restored guest answers a ping; told to probe its NIC again (the `rebind` command of
/// the guest init), it takes the MAC the restore gave it, and this host reaches it there.
fn check_restored_network(console: &Console, new_mac: bool) -> Result<(), String> {
    if !ping_guest() {
        return Err("the guest does not answer ping on 10.0.2.2".into());
    }
    println!("snapshot_job ping_after_restore=ok");
    if !new_mac {
        return Ok(());
    }
    let mut agent =
        std::net::TcpStream::connect_timeout(&"10.0.2.2:7".parse().expect("address"), Duration::from_secs(10))
            .map_err(|e| format!("connect to the guest's port 7: {e}"))?;
    agent.write_all(b"rebind").map_err(|e| format!("send rebind: {e}"))?;
    drop(agent);
    let reported = |c: &Console| {
        let text = c.text();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix("net: eth0 mac=").map(str::to_string))
    };
    if !console.wait(Duration::from_secs(30), |c| reported(c).is_some()) {
        return Err("the guest did not report its MAC after probing its NIC again".into());
    }
    let mac = reported(console).unwrap_or_default();
    if mac != RESTORE_MAC {
        return Err(format!("after probing its NIC again the guest has MAC {mac}, not {RESTORE_MAC}"));
    }
    // Forget the old MAC (the guest's announcement may fall in the neighbour entry's lock
    // time), then reach the guest again: ARP must answer with the new one.
    let _ = Command::new("ip").args(["neigh", "flush", "to", "10.0.2.2"]).stdout(Stdio::null()).status();
    if !ping_guest() {
        return Err(format!("the guest does not answer ping with its new MAC {mac}"));
    }
    match guest_neighbour_mac() {
        Some(seen) if seen == RESTORE_MAC => {
            println!("snapshot_job guest_mac_after_reprobe={mac} host_sees={seen}");
            Ok(())
        }
        other => Err(format!("this host's neighbour entry for the guest is {other:?}, not {RESTORE_MAC}")),
    }
}

/// The guest's vsock CID at boot, and the first clone's (each later clone's is one more).
const BOOT_CID: u32 = 3;
const CLONE_CID_BASE: u32 = 42;

/// The restored clone learned its new CID (the guest's vsock agent prints it when it changes,
/// which it does on the device's TRANSPORT_RESET event), and a host program that connects to
/// the clone's socket reaches the agent, which answers with that CID.
fn check_clone_vsock(console: &Console, cid: u32, uds: &Path) -> Result<(), String> {
    let line = format!("vsock: cid={cid}");
    if !console.wait(Duration::from_secs(30), |c| c.text().lines().any(|l| l.trim_end_matches('\r') == line)) {
        return Err(format!("the clone's vsock agent never printed `{line}`"));
    }
    let mut host = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    host.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    host.write_all(b"CONNECT 52\n").map_err(|e| format!("vsock CONNECT: {e}"))?;
    let mut reply = String::new();
    host.read_to_string(&mut reply).map_err(|e| format!("vsock reply: {e} (got {reply:?})"))?;
    // `OK <host port>` from the VMM, then the agent's line; the agent closes the connection.
    let answer = reply.lines().nth(1).unwrap_or_default();
    if !reply.starts_with("OK ") || answer != format!("cid={cid}") {
        return Err(format!("the clone's vsock port 52 answered {reply:?}, not OK and cid={cid}"));
    }
    println!("snapshot_job clone_vsock={answer}");
    Ok(())
}

/// The guest's VM Generation ID driver was bound at boot, did not report a fork before the
/// snapshot, and the restored clone reports one (Linux reseeds its RNG on the notification).
fn check_vm_fork(before: &str, console: &Console) -> Result<(), String> {
    const FORKED: &str = "vmgenid: crng reseeded after a VM fork";
    if !before.lines().any(|l| l.trim_end_matches('\r') == "vmgenid: driver bound") {
        return Err("the guest's VM Generation ID driver was not bound at boot".into());
    }
    if before.contains(FORKED) {
        return Err("the guest reported a VM fork before any restore".into());
    }
    if !console.wait(Duration::from_secs(30), |c| c.text().contains(FORKED)) {
        return Err(
            "the restored clone never reported the VM fork (no reseed after the VM Generation ID changed)".into()
        );
    }
    println!("snapshot_job clone_vm_fork=reseeded");
    Ok(())
}

/// Starts `VMM --api-sock WORK/SOCK_NAME` with its console captured; the socket is ready when
/// `wait_for_socket` returns.
fn spawn_api_vmm(vmm: &Path, work: &Path, sock_name: &str) -> Result<(Child, Console, PathBuf), String> {
    std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
    let sock = work.join(sock_name);
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(vmm)
        .arg("--api-sock")
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let console = Console::capture(&mut child);
    Ok((child, console, sock))
}

fn wait_for_socket(sock: &Path) -> Result<(), String> {
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            return Err("API socket never appeared".to_string());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn job(
    vmm: &Path,
    kernel: &Path,
    initrd: &Path,
    work: &Path,
    restores: usize,
    root: Option<&Path>,
    taps: (Option<&str>, Option<&str>),
) -> Result<(), String> {
    // The tap the guest boots on, and the one its restores are moved to.
    let (tap, restore_tap) = taps;
    let (mut child, console, sock) = spawn_api_vmm(vmm, work, "api.sock")?;
    let result = (|| {
        wait_for_socket(&sock)?;
        // With a disk, the machine is described by ACPI (its devices too), with a VM Generation
        // ID: the restored clones must learn they were forked.
        let acpi = root.is_some();
        call(&sock, "PUT", "/machine-config", &format!(r#"{{"vcpu_count": 1, "mem_size_mib": 256, "acpi": {acpi}}}"#))?;
        let boot = match root {
            None => format!(
                r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{CMDLINE}"}}"#,
                kernel.display(),
                initrd.display()
            ),
            Some(image) => {
                let drive = format!(
                    r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
                    image.display()
                );
                call(&sock, "PUT", "/drives/rootfs", &drive)?;
                call(&sock, "PUT", "/entropy", "{}")?;
                let vsock =
                    format!(r#"{{"guest_cid": {BOOT_CID}, "uds_path": "{}"}}"#, work.join("vsock.sock").display());
                call(&sock, "PUT", "/vsock", &vsock)?;
                if let Some(tap) = tap {
                    let net = format!(
                        r#"{{"iface_id": "eth0", "host_dev_name": "{tap}", "guest_mac": "02:00:00:00:00:02"}}"#
                    );
                    call(&sock, "PUT", "/network-interfaces/eth0", &net)?;
                }
                format!(r#"{{"kernel_image_path": "{}", "boot_args": "{CMDLINE} init=/init"}}"#, kernel.display())
            }
        };
        call(&sock, "PUT", "/boot-source", &boot)?;
        call(&sock, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)?;
        if !console.wait(Duration::from_secs(120), |c| c.counts().last().is_some_and(|n| *n >= 5)) {
            return Err(format!("the guest never counted to 5: {}", console.text()));
        }
        call(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let create = format!(
            r#"{{"snapshot_type": "Full", "snapshot_path": "{0}/state", "mem_file_path": "{0}/memory"}}"#,
            work.display()
        );
        call(&sock, "PUT", "/snapshot/create", &create)?;
        println!("snapshot_job snapshot_create_ms={:.1}", t.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result?;
    let before = console.text();
    let last = console.counts().last().copied().ok_or("no count before the snapshot")?;
    println!("snapshot_job last_count_before_snapshot={last}");

    let mut to_output = Vec::new();
    for run in 0..restores {
        let t = Instant::now();
        let mut cmd = Command::new(vmm);
        cmd.arg("--restore").arg(work);
        if let Some(t) = restore_tap {
            // The restored guest's eth0 moves to another tap, with another MAC (network_overrides).
            cmd.arg("--net").arg(format!("id=eth0,tap={t},mac={RESTORE_MAC}"));
        }
        // With a disk there is a vsock device too: each clone gets its own CID and socket.
        let clone_cid = CLONE_CID_BASE + run as u32;
        let clone_uds = work.join(format!("clone-{run}.sock"));
        if root.is_some() {
            cmd.arg("--vsock").arg(format!("cid={clone_cid},uds={}", clone_uds.display()));
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().map_err(|e| format!("spawn: {e}"))?;
        let restored = Console::capture(&mut child);
        // With a disk, wait for a sync to it after the restore as well.
        let ok = restored
            .wait(Duration::from_secs(60), |c| c.counts().len() >= 3 && (root.is_none() || c.disk_sync().is_some()));
        // With a network interface, the restored guest's network works, with its new MAC once
        // it probes the NIC again (first restore only).
        let network = if run == 0 && ok && tap.is_some() {
            check_restored_network(&restored, restore_tap.is_some())
        } else {
            Ok(())
        };
        // With vsock, the clone knows its new CID and answers on its new socket.
        let vsock = if ok && root.is_some() { check_clone_vsock(&restored, clone_cid, &clone_uds) } else { Ok(()) };
        // With ACPI, the clone's kernel was told it is a new VM generation and reseeded its RNG.
        let forked = if ok && root.is_some() { check_vm_fork(&before, &restored) } else { Ok(()) };
        // A VMM that ended by itself says how (a restored guest should run until killed).
        let ended = child.try_wait().ok().flatten();
        let _ = child.kill();
        let _ = child.wait();
        if !ok {
            let how = ended.map_or("still running".to_string(), |s| format!("VMM ended: {s}"));
            return Err(format!("restore {run}: the guest did not count on ({how}): {:?}", restored.text()));
        }
        if let Some(first) = restored.first_byte() {
            to_output.push(first.duration_since(t).as_secs_f64() * 1000.0);
        }
        if let Err(why) = network.and(vsock).and(forked) {
            return Err(format!("restore {run}: {why}: {:?}", restored.text()));
        }
        if run == 0 {
            // The console up to the snapshot, then the restored guest's: one unbroken count.
            let joined = format!("{before}{}", restored.text());
            let complete = &joined[..joined.rfind('\n').map_or(0, |i| i + 1)];
            let counts: Vec<u64> = complete
                .lines()
                .filter_map(|l| l.trim_end_matches('\r').strip_prefix("count=")?.parse().ok())
                .collect();
            let after: Vec<u64> = counts.iter().copied().skip_while(|n| *n <= last).collect();
            let continues = after.first() == Some(&(last + 1)) && after.windows(2).all(|w| w[1] == w[0] + 1);
            if !continues {
                return Err(format!("count does not continue from {last}: {after:?}"));
            }
            println!("snapshot_job restored_counts={after:?}");
            if root.is_some() {
                // A sync of a count taken after the snapshot: the disk works in the restored guest.
                match restored.disk_sync() {
                    Some(n) if n > last => println!("snapshot_job disk_sync_after_restore={n}"),
                    other => return Err(format!("no disk sync after the restore (saw {other:?})")),
                }
            }
        }
    }
    println!(
        "snapshot_job restores={} restore_spawn_to_output_ms_median={:.1}",
        to_output.len(),
        median(&mut to_output)
    );
    Ok(())
}

/// Boots the counter guest, sends Ctrl+Alt+Del, and waits for the VMM to exit 0.
fn cad_job(vmm: &Path, kernel: &Path, initrd: &Path, work: &Path, acpi: bool) -> Result<(), String> {
    let (mut child, console, sock) = spawn_api_vmm(vmm, work, "cad.sock")?;
    let result = (|| {
        wait_for_socket(&sock)?;
        call(&sock, "PUT", "/machine-config", &format!(r#"{{"vcpu_count": 1, "mem_size_mib": 256, "acpi": {acpi}}}"#))?;
        let boot = format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{CMDLINE}"}}"#,
            kernel.display(),
            initrd.display()
        );
        call(&sock, "PUT", "/boot-source", &boot)?;
        call(&sock, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)?;
        if !console.wait(Duration::from_secs(120), |c| c.counts().len() >= 3) {
            return Err(format!("the guest never counted; console: {}", console.text()));
        }
        let pressed = Instant::now();
        call(&sock, "PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#)?;
        while pressed.elapsed() < Duration::from_secs(120) {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                let ms = pressed.elapsed().as_secs_f64() * 1000.0;
                println!("cad_job vmm_exit={:?} press_to_exit_ms={ms:.0}", status.code());
                return if status.code() == Some(0) { Ok(()) } else { Err(format!("the VMM exited with {status}")) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the guest did not reboot within 120 s; console tail: {}",
            console.text().lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        ))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("mmds") {
        if args.len() != 6 {
            eprintln!("usage: shoal-snapshot-job mmds VMM KERNEL INITRD WORKDIR TAP");
            return ExitCode::from(2);
        }
        let p = |i: usize| PathBuf::from(&args[i]);
        return match mmds_job(&p(1), &p(2), &p(3), &p(4), &args[5]) {
            Ok(()) => {
                println!("mmds_job result=ok");
                ExitCode::SUCCESS
            }
            Err(why) => {
                println!("mmds_job result=FAIL: {why}");
                ExitCode::from(1)
            }
        };
    }
    if args.first().map(String::as_str) == Some("cad") {
        let acpi = args.get(5).map(String::as_str) == Some("acpi");
        if args.len() != 5 && !acpi {
            eprintln!("usage: shoal-snapshot-job cad VMM KERNEL INITRD WORKDIR [acpi]");
            return ExitCode::from(2);
        }
        let p = |i: usize| PathBuf::from(&args[i]);
        return match cad_job(&p(1), &p(2), &p(3), &p(4), acpi) {
            Ok(()) => {
                println!("cad_job result=ok");
                ExitCode::SUCCESS
            }
            Err(why) => {
                println!("cad_job result=FAIL: {why}");
                ExitCode::from(1)
            }
        };
    }
    if args.len() < 4 {
        eprintln!("usage: shoal-snapshot-job VMM KERNEL INITRD WORKDIR [RESTORES] [ROOT_IMAGE [TAP [RESTORE_TAP]]]");
        return ExitCode::from(2);
    }
    let restores = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(5);
    let p = |i: usize| PathBuf::from(&args[i]);
    let root = args.get(5).map(PathBuf::from);
    let tap = args.get(6).map(String::as_str);
    let restore_tap = args.get(7).map(String::as_str);
    match job(&p(0), &p(1), &p(2), &p(3), restores, root.as_deref(), (tap, restore_tap)) {
        Ok(()) => {
            println!("snapshot_job result=ok");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("snapshot_job result=FAIL: {why}");
            ExitCode::from(1)
        }
    }
}
