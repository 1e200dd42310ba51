//! Servers booted from the host image (`image-build/host/build-image.sh`) in QEMU under TCG with
//! an AMD CPU model (so each has a real KVM inside), with their serial console read line by line
//! and typed on as a user would, and their keyboard reached through QEMU's monitor.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one wait on a server may take.
pub const LIMIT: Duration = Duration::from_secs(240);

/// Builds the host image into `out` from the release binaries, with `cmdline` added to the
/// kernel command line; prints the build's report.
pub fn build_image(out: &Path, cmdline: &str) {
    let bin = crate::repo_root().join("target/x86_64-unknown-linux-gnu/release");
    let o = Command::new(crate::repo_root().join("image-build/host/build-image.sh"))
        .arg(&bin)
        .arg(out)
        .env("SHOAL_IMAGE_CMDLINE", cmdline)
        .output()
        .expect("run build-image.sh");
    assert!(o.status.success(), "build-image.sh failed: {}", String::from_utf8_lossy(&o.stderr));
    print!("{}", String::from_utf8_lossy(&o.stdout));
}

/// A QEMU server and its console lines.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// What is typed on the serial console.
    keys: Mutex<ChildStdin>,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub started: Instant,
    monitor: PathBuf,
}

impl Server {
    /// Starts QEMU (q35, TCG, EPYC, `cpus` vCPUs, `mem_mib`) with `args` added, in network
    /// namespace `netns` when one is given.
    pub fn start(args: &[String], tag: &str, netns: Option<&str>, cpus: u32, mem_mib: u32) -> Server {
        let monitor = std::env::temp_dir().join(format!("shoal-image-{tag}-{}.mon", std::process::id()));
        let _ = std::fs::remove_file(&monitor);
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let mut child = c
            .args(["-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "EPYC"])
            .args(["-smp", &cpus.to_string(), "-m", &mem_mib.to_string()])
            .args(["-nographic", "-nodefaults", "-serial", "stdio"])
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let keys = Mutex::new(child.stdin.take().expect("console input pipe"));
        let out = child.stdout.take().expect("console pipe");
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
                let text = String::from_utf8_lossy(&buf).trim_end().to_string();
                if let Ok(mut l) = sink.lock() {
                    l.push(text);
                }
                buf.clear();
            }
        });
        Server { child, keys, lines, started: Instant::now(), monitor }
    }

    pub fn console(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    pub fn count(&self, part: &str) -> usize {
        self.lines.lock().map(|l| l.iter().filter(|x| x.contains(part)).count()).unwrap_or(0)
    }

    /// Lines where PID 1 said `part` (after its `shoal: ` prefix), not counting the status
    /// screen, which repeats the current boot phase whenever it is redrawn.
    pub fn said(&self, part: &str) -> usize {
        let said = |l: &String| l.find("shoal: ").is_some_and(|i| l[i..].contains(part));
        self.lines.lock().map(|l| l.iter().filter(|x| said(x)).count()).unwrap_or(0)
    }

    /// Waits until the console has shown `part` `times` times.
    pub fn wait_console(&self, part: &str, times: usize) {
        let deadline = Instant::now() + LIMIT;
        while self.count(part) < times {
            assert!(Instant::now() < deadline, "no {part:?} (x{times}) on the console:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types a line on the serial console, as a user would (Enter is a carriage return).
    pub fn type_line(&self, text: &str) {
        let mut keys = self.keys.lock().expect("console input");
        for b in text.bytes().chain([b'\r']) {
            keys.write_all(&[b]).expect("type on the console");
            keys.flush().expect("type on the console");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until QEMU exits (the server powered off, or rebooted under `-no-reboot`).
    pub fn wait_exit(&mut self) {
        let deadline = Instant::now() + LIMIT;
        while self.child.try_wait().expect("qemu status").is_none() {
            assert!(Instant::now() < deadline, "the server did not go down; console:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Cuts the server's power (QEMU killed: no shutdown of any kind).
    pub fn power_cut(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Types a key combination on the server's keyboard (QEMU's monitor).
    pub fn sendkey(&self, keys: &str) {
        let mut s = std::os::unix::net::UnixStream::connect(&self.monitor).expect("QEMU monitor");
        std::thread::sleep(Duration::from_millis(300));
        writeln!(s, "sendkey {keys}").expect("monitor write");
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.power_cut();
        let _ = std::fs::remove_file(&self.monitor);
    }
}
