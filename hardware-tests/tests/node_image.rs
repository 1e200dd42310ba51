//! The host image (`image-build/host/build-image.sh`) booted as a server boots it, in QEMU
//! under TCG with an AMD CPU model: the raw GPT disk under OVMF (UEFI, systemd-boot, the
//! unified kernel image), and the PXE files through QEMU's iPXE from a TFTP server. In both,
//! `shoal-node` is PID 1: it finds (and on first boot formats) the data partition, leases an
//! address over DHCP (QEMU's user network), and its API answers through a forwarded port. A
//! Ctrl+Alt+Del reboots in order and the node comes back with its identity and data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use shoal_hardware_tests::server::{build_image, Server, LIMIT};

const SECRET: &str = "node-image-test-secret";

/// Builds the image once per test binary, twice over: the two builds must be the same bytes
/// (the raw disk aside: mtools stamps two FAT directory entries with the time of the build).
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("shoal-image-test-{}", std::process::id()));
        let build = |out: &Path| build_image(out, &format!("shoal.min_voters=1 shoal.secret={SECRET}"));
        let (a, b) = (base.join("a"), base.join("b"));
        build(&a);
        build(&b);
        for f in ["vmlinuz", "initramfs.img", "shoal.ipxe", "shoal.efi"] {
            let read = |d: &Path| std::fs::read(d.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(read(&a) == read(&b), "two builds of {f} from the same inputs differ");
        }
        let size = |f: &str| std::fs::metadata(a.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(size("vmlinuz") + size("initramfs.img") < 40 << 20, "kernel + initramfs over 40 MiB");
        a
    })
}

/// A free TCP port on the host's loopback for QEMU's forward.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// `GET path` on the node's API through the forward (the test trusts any certificate: it has
/// no copy of the cluster CA, which lives on the node).
fn api(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<serde_json::Value> {
    let token = shoal_node::cluster::secret::ClusterSecret::new(SECRET).default_api_token();
    let mut c = Command::new("curl");
    c.args(["-sk", "--max-time", "10", "-X", method, "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("https://127.0.0.1:{port}{path}"));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    let out = c.output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls the status until the node leads its one-node cluster; returns it.
fn wait_leader(server: &Server, port: u16) -> serde_json::Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(s) = api(port, "GET", "/v1/cluster/status", None) {
            if s["leader_id"].is_string() && s["leader_id"] == s["node_id"] {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "the API never answered with a leader; console:\n{}", server.console());
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn the_disk_image_boots_under_uefi_formats_its_data_disk_and_keeps_its_identity_over_a_reboot() {
    let (server, port, dir) = boot_disk("uefi", None, true);
    let first = wait_leader(&server, port);
    println!("image_uefi_power_on_to_api_s={:.1}", server.started.elapsed().as_secs_f64());
    assert_eq!(server.said("is blank: formatting it (first boot)"), 1, "{}", server.console());
    assert_eq!(server.said("/dev/vda2 mounted on /var/lib/shoal"), 1);
    // The management console: its status screen shows this node leading, and its commands
    // answer from the node's API.
    let me = first["node_id"].as_str().expect("node id").to_string();
    server.wait_console(&format!("leader     {me} (this node)"), 1);
    server.type_line("nodes");
    server.wait_console("NODE", 1);
    server.wait_console("(this node)", 1);
    assert!(
        server
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with(&me) && l.contains("leader") && l.contains("(this node)")),
        "`nodes` did not list this node as leader:\n{}",
        server.console()
    );
    server.type_line("instances");
    server.wait_console("no instances", 1);
    server.type_line("frobnicate");
    server.wait_console("unknown command \"frobnicate\"; type help", 1);
    // systemd-boot counted this boot against the entry's three tries; once the node has run for
    // a while PID 1 blesses it (drops the counter).
    server.wait_console("booted well: blessed EFI/Linux/shoal-a+2-1.efi is now EFI/Linux/shoal-a.efi", 1);
    // A write the reboot must keep.
    let put = api(port, "PUT", "/v1/kv/image-test", Some("\"kept over a reboot\""));
    assert!(put.is_some(), "the write was not answered; console:\n{}", server.console());

    // Ctrl+Alt+Del: PID 1 stops the agent, syncs, unmounts and reboots; QEMU boots again.
    server.sendkey("ctrl-alt-delete");
    server.wait_console("phase stopping: syncing and unmounting", 1);
    server.wait_console("/dev/vda2 mounted on /var/lib/shoal", 2);
    let second = wait_leader(&server, port);
    assert_eq!(second["node_id"], first["node_id"], "the node's identity changed over a reboot");
    assert_eq!(second["cluster_id"], first["cluster_id"]);
    assert_eq!(server.said("formatting it"), 1, "the data disk was formatted again:\n{}", server.console());
    let kept = api(port, "GET", "/v1/kv/image-test", None);
    assert!(
        kept.as_ref().is_some_and(|v| v.to_string().contains("kept over a reboot")),
        "the value written before the reboot: {kept:?}"
    );
    // A blessed entry is booted without counting: nothing to bless the second time.
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(server.count("booted well"), 1, "{}", server.console());
    assert_eq!(server.count("cannot bless"), 0, "{}", server.console());
    drop(server);
    assert_eq!(esp_entries(&image().join("shoal.raw")), ["shoal-a+3.efi"], "the image as built");
    assert_eq!(esp_entries(&dir.join("disk.raw")), ["shoal-a.efi"], "the disk after a blessed boot");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_pxe_files_boot_through_ipxe_to_an_answering_api() {
    let img = image();
    let port = free_port();
    let args: Vec<String> = [
        "-boot".into(),
        "n".into(),
        "-no-reboot".into(),
        "-netdev".into(),
        format!("user,id=n0,tftp={},bootfile=shoal.ipxe,hostfwd=tcp:127.0.0.1:{port}-:7400", img.display()),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ]
    .to_vec();
    let server = Server::start(&args, "pxe", None, 2, 1536);
    let status = wait_leader(&server, port);
    println!("image_pxe_power_on_to_api_s={:.1}", server.started.elapsed().as_secs_f64());
    assert!(server.count("shoal.ipxe") >= 1, "iPXE did not fetch the script:\n{}", server.console());
    assert_eq!(status["voters"].as_array().map(Vec::len), Some(1));
    // No disk: the node says it runs from RAM.
    assert_eq!(server.said("running from RAM"), 1, "{}", server.console());
    // The API shows the boot's phases.
    let phases: Vec<&str> =
        status["boot_phases"].as_array().into_iter().flatten().filter_map(|p| p["phase"].as_str()).collect();
    for p in ["init", "modules", "data", "network", "agent"] {
        assert!(phases.contains(&p), "no boot phase {p} in the API's status: {phases:?}");
    }
    // A typed reboot asks first: anything but yes cancels it; yes reboots in order (QEMU
    // runs with -no-reboot, so it exits).
    let mut server = server;
    server.type_line("reboot");
    server.type_line("no");
    server.wait_console("cancelled", 1);
    assert_eq!(
        server.count("Reboot this node (its microVMs move to other nodes)? Type yes to confirm: no"),
        1,
        "{}",
        server.console()
    );
    assert_eq!(server.count("phase stopping"), 0, "a cancelled reboot went ahead:\n{}", server.console());
    server.type_line("reboot");
    server.type_line("yes");
    server.wait_console("phase stopping: syncing and unmounting", 1);
    server.wait_exit();
}

/// The image's disk with the data partition's first MiB overwritten by `fill` (not zeros, not
/// ext4: what a disk that held something else looks like), booted under OVMF.
fn boot_disk(tag: &str, fill: Option<u8>, nic: bool) -> (Server, u16, PathBuf) {
    boot_disk_on(tag, fill, nic, false)
}

/// As [`boot_disk`]; `server_hardware`: the disk on the SATA (AHCI) controller and an Intel
/// e1000e NIC, the drivers of real servers, instead of virtio.
fn boot_disk_on(tag: &str, fill: Option<u8>, nic: bool, server_hardware: bool) -> (Server, u16, PathBuf) {
    let img = image();
    let dir = tempfile_dir(tag);
    let disk = dir.join("disk.raw");
    let vars = dir.join("vars.fd");
    assert!(Command::new("cp")
        .arg("--sparse=always")
        .arg(img.join("shoal.raw"))
        .arg(&disk)
        .status()
        .expect("cp the disk image")
        .success());
    if let Some(byte) = fill {
        // The data partition starts at sector 526336 (after the 256 MiB ESP at 1 MiB).
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk).expect("open the disk copy");
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(526336 * 512)).expect("seek to the data partition");
        f.write_all(&vec![byte; 1 << 20]).expect("fill the data partition");
    }
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).expect("OVMF (package ovmf)");
    let port = free_port();
    let mut args: Vec<String> = vec![
        "-drive".into(),
        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", vars.display()),
    ];
    if server_hardware {
        args.extend([
            "-drive".into(),
            format!("file={},format=raw,if=none,id=d0", disk.display()),
            "-device".into(),
            "ide-hd,drive=d0,bus=ide.0".into(),
        ]);
    } else {
        args.extend(["-drive".into(), format!("file={},format=raw,if=virtio", disk.display())]);
    }
    if nic {
        args.extend([
            "-netdev".into(),
            format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7400"),
            "-device".into(),
            format!("{},netdev=n0", if server_hardware { "e1000e" } else { "virtio-net-pci" }),
        ]);
    }
    (Server::start(&args, tag, None, 2, 1536), port, dir)
}

#[test]
fn the_disk_image_boots_on_a_sata_disk_and_an_intel_nic_as_real_servers_have() {
    let (server, port, dir) = boot_disk_on("sata", None, true, true);
    wait_leader(&server, port);
    println!("image_sata_e1000e_power_on_to_api_s={:.1}", server.started.elapsed().as_secs_f64());
    assert_eq!(server.said("/dev/sda2 is blank: formatting it (first boot)"), 1, "{}", server.console());
    assert_eq!(server.said("/dev/sda2 mounted on /var/lib/shoal"), 1);
    assert_eq!(server.said(" loaded, 0 failed"), 1, "a module did not load:\n{}", server.console());
    assert_eq!(server.said("phase failed"), 0, "{}", server.console());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_data_partition_holding_something_else_is_left_alone_and_the_node_runs_from_ram() {
    let (server, port, dir) = boot_disk("foreign", Some(0xa5), true);
    wait_leader(&server, port);
    assert_eq!(server.said("formatting it"), 0, "a foreign partition was formatted:\n{}", server.console());
    assert_eq!(server.said("holds something that is not ext4"), 1, "{}", server.console());
    assert_eq!(server.said("running from RAM"), 1);
    drop(server);
    // The partition still holds what it held.
    let mut f = std::fs::File::open(dir.join("disk.raw")).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(526336 * 512)).unwrap();
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(&mut f, &mut head).unwrap();
    assert!(head.iter().all(|&b| b == 0xa5), "the foreign partition was written to");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A provisioning server on the host's loopback that answers every GET with the secret; its
/// URL as the guest sees it, and how many times it answered.
fn serve_secret() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port for the secret");
    let port = listener.local_addr().expect("its address").port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut req = [0u8; 1024];
            let _ = std::io::Read::read(&mut conn, &mut req);
            let answer = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{SECRET}\n", SECRET.len() + 1);
            if conn.write_all(answer.as_bytes()).is_ok() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (format!("http://10.0.2.2:{port}/secret"), served)
}

/// The image's kernel and initramfs booted directly (as PXE hands them over) with `append` as
/// the command line, and the disk in `dir` (a copy of the raw image) as its disk.
fn boot_kernel_with_disk(dir: &Path, tag: &str, append: &str) -> (Server, u16) {
    let img = image();
    let port = free_port();
    let args: Vec<String> = vec![
        "-kernel".into(),
        img.join("vmlinuz").display().to_string(),
        "-initrd".into(),
        img.join("initramfs.img").display().to_string(),
        "-append".into(),
        format!("console=ttyS0,115200 panic=-1 quiet shoal.min_voters=1 {append}"),
        "-drive".into(),
        format!("file={},format=raw,if=virtio", dir.join("disk.raw").display()),
        "-netdev".into(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7400"),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ];
    (Server::start(&args, tag, None, 2, 1536), port)
}

#[test]
fn a_server_booted_with_another_secret_than_its_cluster_says_so_and_keeps_its_data() {
    let (mut server, port, dir) = boot_disk("secret", None, true);
    let first = wait_leader(&server, port);
    assert!(api(port, "PUT", "/v1/kv/secret-test", Some("\"still here\"")).is_some(), "{}", server.console());
    server.type_line("poweroff");
    server.type_line("yes");
    server.wait_exit();
    // The same disk, booted with another secret on the command line: the agent refuses to run
    // this node's cluster data under it, and the console says why and stays up.
    let (wrong, _) = boot_kernel_with_disk(&dir, "secret-wrong", "shoal.secret=not-the-secret-of-this-cluster");
    wrong.wait_console("the agent stopped: wrong cluster secret", 1);
    wrong.type_line("status");
    wrong.wait_console("agent      stopped: wrong cluster secret", 1);
    assert_eq!(wrong.count("Kernel panic"), 0, "{}", wrong.console());
    drop(wrong);
    // Booted with the cluster's secret again, fetched from a provisioning server this time
    // (shoal.secret_url=; QEMU's user network shows the host's loopback as 10.0.2.2), it is the
    // same node with its data.
    let (url, served) = serve_secret();
    let (right, port) = boot_kernel_with_disk(&dir, "secret-right", &format!("shoal.secret_url={url}"));
    let again = wait_leader(&right, port);
    assert_eq!(right.count(&format!("phase secret: fetched from {url}")), 1, "{}", right.console());
    assert!(served.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(again["node_id"], first["node_id"]);
    assert_eq!(again["cluster_id"], first["cluster_id"]);
    let kept = api(port, "GET", "/v1/kv/secret-test", None);
    assert!(kept.as_ref().is_some_and(|v| v.to_string().contains("still here")), "{kept:?}");
    drop(right);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `shoalctl` (the release build the image is made from) with its config in `dir`.
fn shoalctl(dir: &Path, args: &[&str]) -> std::process::Output {
    let bin = shoal_hardware_tests::repo_root().join("target/x86_64-unknown-linux-gnu/release/shoalctl");
    Command::new(bin)
        .args(args)
        .env("SHOAL_CONFIG", dir.join("shoalctl.config"))
        .env_remove("SHOAL_TOKEN")
        .output()
        .expect("run shoalctl")
}

#[test]
fn a_server_booted_with_no_secret_waits_in_maintenance_mode_until_shoalctl_configures_it() {
    let dir = tempfile_dir("maintenance");
    assert!(Command::new("cp")
        .arg("--sparse=always")
        .arg(image().join("shoal.raw"))
        .arg(dir.join("disk.raw"))
        .status()
        .expect("cp the disk image")
        .success());
    let (server, port) = boot_kernel_with_disk(&dir, "maintenance", "");
    server.wait_console("maintenance token ", 1);
    let line = server.lines.lock().unwrap().iter().find(|l| l.contains("maintenance token ")).cloned().unwrap();
    let token = line.split("maintenance token ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().to_string();
    assert_eq!(token.len(), 26 + 5, "{line}");
    // The status screen shows how to configure the node; the API says it is in maintenance.
    server.type_line("status");
    server.wait_console(&format!("shoalctl node configure --endpoint 10.0.2.15:7400 --token {token}"), 2);
    let other = Command::new("curl")
        .args(["-sk", "--max-time", "10"])
        .arg(format!("https://127.0.0.1:{port}/v1/cluster/status"))
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&other.stdout).contains("maintenance mode"), "{other:?}");
    let secret = dir.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let endpoint = format!("127.0.0.1:{port}");
    let configure = |token: &str| {
        shoalctl(
            &dir,
            &[
                "node",
                "configure",
                "--endpoint",
                &endpoint,
                "--token",
                token,
                "--secret-file",
                secret.to_str().unwrap(),
                "--min-voters",
                "1",
                "--set-context",
                "m",
            ],
        )
    };
    // A wrong token: the node cannot prove it, and the secret is never sent.
    let wrong = configure("aaaaa-bbbbb-ccccc-ddddd-eeeee-f");
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("could not prove that it holds this token"), "{wrong:?}");
    let ok = configure(&token);
    assert!(ok.status.success(), "{ok:?}\nconsole:\n{}", server.console());
    let first = wait_leader(&server, port);
    let nodes = shoalctl(&dir, &["get", "nodes"]);
    assert!(
        String::from_utf8_lossy(&nodes.stdout).contains(first["node_id"].as_str().unwrap()),
        "the saved context reaches the node: {nodes:?}"
    );
    // Used once: the token configures nothing more, and a reboot needs none of it.
    assert!(!configure(&token).status.success());
    server.sendkey("ctrl-alt-delete");
    server.wait_console("/dev/vda2 mounted on /var/lib/shoal", 2);
    let again = wait_leader(&server, port);
    assert_eq!(again["node_id"], first["node_id"]);
    assert_eq!(server.said("maintenance token "), 1, "{}", server.console());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_server_without_a_network_card_says_so_on_its_console_and_stays_up() {
    let (server, _port, dir) = boot_disk("nonet", None, false);
    server.wait_console("phase failed: no Ethernet link found", 1);
    // PID 1 did not exit (the kernel would have panicked) and did not reboot.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(server.count("Kernel panic"), 0, "{}", server.console());
    assert_eq!(server.count("phase init:"), 1, "the server rebooted:\n{}", server.console());
    // The console still takes commands: its status screen says what is wrong, and a confirmed
    // poweroff powers the server off.
    let mut server = server;
    server.type_line("status");
    server.wait_console("boot       failed: no Ethernet link found", 1);
    server.type_line("poweroff");
    server.type_line("yes");
    server.wait_console("phase stopping: powering off", 1);
    server.wait_exit();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The UKIs in `EFI/Linux` of a disk's ESP (read with mtools, which the image build installs).
fn esp_entries(disk: &Path) -> Vec<String> {
    let out = Command::new("mdir")
        .arg("-b")
        .arg("-i")
        .arg(format!("{}@@1M", disk.display()))
        .arg("::/EFI/Linux")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("mdir (mtools)");
    assert!(out.status.success(), "mdir: {}", String::from_utf8_lossy(&out.stderr));
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().rsplit('/').next().map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names
}

fn tempfile_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-image-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
