//! The management console on the serial port (and the first VT where the kernel has one): a
//! status screen and a small fixed set of commands, not a shell. PID 1 runs one thread per
//! console; each reads keys itself (the terminal in non-canonical mode, echo done here), so the
//! status screen can redraw when what it shows changes while nothing is being typed.
//!
//! What the screen and the commands show comes from the node's own API (with the CA, endpoint
//! and token the agent writes to `DATA/node/shoalctl.yaml`), from PID 1's boot phases and the
//! agent's log (kept in memory), from netlink and from `/dev/kmsg`. Commands that change
//! anything (`reboot`, `poweroff`, `join`) ask for `yes` first.

use std::collections::VecDeque;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::AgentPlan;

/// Lines of the agent's output kept in memory for `logs`.
const LOG_LINES: usize = 2000;
/// The longest agent log line kept (characters).
const MAX_LOG_LINE: usize = 2048;
/// Lines `logs` and `dmesg` print.
const SHOWN_LINES: usize = 40;
/// How often an idle status screen looks for changes.
const REFRESH: Duration = Duration::from_secs(3);
/// The longest line the console takes.
const MAX_LINE: usize = 256;

static AGENT_LOG: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
/// What the agent runs with, once the boot got that far.
pub static PLAN: Mutex<Option<AgentPlan>> = Mutex::new(None);
/// In maintenance mode: the command that configures this node (it holds the one-time token).
pub static MAINTENANCE: Mutex<Option<String>> = Mutex::new(None);
/// Why the agent last stopped by itself, until it has run well again.
pub static AGENT_STOPPED: Mutex<Option<String>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps the agent's output (one of its pipes) in the in-memory log until the pipe closes.
pub fn collect_log(pipe: impl Read + Send + 'static) {
    let _ = std::thread::Builder::new().name("agent-log".into()).spawn(move || {
        let mut r = std::io::BufReader::new(pipe);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
            // Bounded lines, without terminal controls (colours aside, they would upset the
            // console when shown).
            let text = String::from_utf8_lossy(&buf);
            let line: String = text
                .trim_end()
                .chars()
                .filter(|c| *c == '\t' || *c == '\u{1b}' || !c.is_control())
                .take(MAX_LOG_LINE)
                .collect();
            let mut log = lock(&AGENT_LOG);
            if log.len() == LOG_LINES {
                log.pop_front();
            }
            log.push_back(line);
            buf.clear();
        }
    });
}

/// Starts a console on `/dev/console` and, when the kernel also writes to the VGA console, on
/// `/dev/tty1`. New agent plans (`join`) go to `plans`.
pub fn start(plans: mpsc::Sender<AgentPlan>) {
    let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let mut ttys = vec!["/dev/console"];
    // /dev/console is the last console named; tty0 elsewhere in the list is the VGA one.
    let words: Vec<&str> = active.split_whitespace().collect();
    if words.len() > 1 && words[..words.len() - 1].contains(&"tty0") {
        ttys.push("/dev/tty1");
    }
    for tty in ttys {
        let plans = plans.clone();
        let _ = std::thread::Builder::new().name("console".into()).spawn(move || {
            if let Err(e) = Console::open(tty, plans).map(Console::run) {
                super::say(&format!("no management console on {tty}: {e}"));
            }
        });
    }
}

/// A mutating command waiting for `yes`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Reboot,
    Poweroff,
    Join(String),
}

/// Where the input is within an escape sequence (arrow keys and the like are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Esc,
    Csi,
}

struct Console {
    tty: std::fs::File,
    line: String,
    escape: Escape,
    last_was_cr: bool,
    confirm: Option<Action>,
    /// The status screen is what is shown (not a command's output): it may redraw.
    showing_status: bool,
    last_screen: String,
    rt: tokio::runtime::Runtime,
    plans: mpsc::Sender<AgentPlan>,
}

impl Console {
    fn open(path: &str, plans: mpsc::Sender<AgentPlan>) -> Result<Console, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .map_err(|e| e.to_string())?;
        raw_mode(&tty);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        Ok(Console {
            tty,
            line: String::new(),
            escape: Escape::None,
            last_was_cr: false,
            confirm: None,
            showing_status: true,
            last_screen: String::new(),
            rt,
            plans,
        })
    }

    fn write(&mut self, s: &str) {
        let _ = self.tty.write_all(s.as_bytes());
        let _ = self.tty.flush();
    }

    fn prompt(&mut self) {
        let p = match &self.confirm {
            Some(a) => format!("{}? Type yes to confirm: ", a.question()),
            None => format!("{}> ", hostname()),
        };
        self.write(&p);
    }

    fn run(mut self) {
        self.status(true);
        let mut buf = [0u8; 256];
        loop {
            let mut pfd = libc::pollfd { fd: self.tty.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, REFRESH.as_millis() as libc::c_int) };
            if n == 0 {
                if self.showing_status && self.line.is_empty() && self.confirm.is_none() {
                    self.status(false);
                }
                continue;
            }
            match self.tty.read(&mut buf) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_secs(1)),
                Ok(n) => {
                    for &b in &buf[..n] {
                        self.key(b);
                    }
                }
            }
        }
    }

    /// One byte typed.
    fn key(&mut self, b: u8) {
        match (self.escape, b) {
            (Escape::Esc, b'[') | (Escape::Esc, b'O') => self.escape = Escape::Csi,
            (Escape::Esc, _) => self.escape = Escape::None,
            (Escape::Csi, 0x40..=0x7e) => self.escape = Escape::None,
            (Escape::Csi, _) => {}
            (Escape::None, 0x1b) => self.escape = Escape::Esc,
            (Escape::None, b'\n') if self.last_was_cr => {}
            (Escape::None, b'\r' | b'\n') => {
                self.write("\n");
                let line = std::mem::take(&mut self.line);
                self.submit(line.trim());
            }
            (Escape::None, 0x7f | 0x08) if !self.line.is_empty() => {
                self.line.pop();
                self.write("\x08 \x08");
            }
            // Ctrl+C and Ctrl+U: drop the line (and a pending confirmation).
            (Escape::None, 0x03 | 0x15) => {
                self.line.clear();
                if self.confirm.take().is_some() {
                    self.write("\ncancelled");
                }
                self.write("\n");
                self.prompt();
            }
            // Ctrl+L: the status screen.
            (Escape::None, 0x0c) => self.status(true),
            (Escape::None, 0x20..=0x7e) if self.line.len() < MAX_LINE => {
                self.line.push(b as char);
                self.write(&(b as char).to_string());
            }
            _ => {}
        }
        self.last_was_cr = b == b'\r';
    }

    fn submit(&mut self, line: &str) {
        if let Some(action) = self.confirm.take() {
            if line == "yes" {
                let out = self.act(action);
                self.write(&format!("{out}\n"));
            } else {
                self.write("cancelled\n");
            }
            self.prompt();
            return;
        }
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg = words.next();
        let out = match (cmd, arg) {
            ("" | "status", None) => return self.status(true),
            ("help" | "?", None) => HELP.to_string(),
            ("nodes", None) => self.with_api(nodes),
            ("instances", None) => self.with_api(instances),
            ("logs", None) => agent_log(),
            ("logs", Some(inst)) => {
                let inst = inst.to_string();
                self.with_api(move |api| Box::pin(async move { instance_log(api, &inst).await }))
            }
            ("dmesg", None) => kernel_log(),
            ("net", None) => self.rt.block_on(net()),
            ("reboot", None) => return self.ask(Action::Reboot),
            ("poweroff", None) => return self.ask(Action::Poweroff),
            ("join", Some(seed)) => {
                // A bare IPv6 address would take `:7400` as part of itself: build the pair.
                let addr = match seed.parse::<std::net::IpAddr>() {
                    Ok(ip) => Some(std::net::SocketAddr::new(ip, super::cmdline::API_PORT)),
                    Err(_) => seed.parse::<std::net::SocketAddr>().ok(),
                };
                match addr {
                    Some(a) => return self.ask(Action::Join(a.to_string())),
                    None => format!("{seed:?} is not an address (join 10.0.0.5 or join 10.0.0.5:7400)"),
                }
            }
            ("join", None) => "join takes the address of a node of the cluster: join 10.0.0.5".into(),
            _ => {
                let shown: String = line.chars().take(40).collect();
                format!("unknown command {shown:?}; type help for the commands")
            }
        };
        self.showing_status = false;
        self.write(&format!("{}\n", out.trim_end()));
        self.prompt();
    }

    fn ask(&mut self, action: Action) {
        self.confirm = Some(action);
        self.showing_status = false;
        self.prompt();
    }

    /// Carries out a confirmed action; what to say.
    fn act(&mut self, action: Action) -> String {
        match action {
            Action::Reboot | Action::Poweroff => {
                let sig = if action == Action::Reboot { libc::SIGTERM } else { libc::SIGUSR2 };
                // SAFETY: a signal to this process (PID 1), which waits for it with sigtimedwait.
                unsafe { libc::kill(1, sig) };
                if action == Action::Reboot { "rebooting" } else { "powering off" }.into()
            }
            Action::Join(seed) => {
                let Some(mut plan) = lock(&PLAN).clone() else {
                    return "the node has not finished booting: it cannot start its agent yet".into();
                };
                if plan.data_dir.join("node/tls/ca.crt").exists() {
                    return "this node already belongs to a cluster: it keeps it (join is for a node that has none)"
                        .into();
                }
                plan.config.seeds = vec![seed.clone()];
                let json = serde_json::to_vec_pretty(&plan.config).unwrap_or_default();
                if let Err(e) = crate::durable::write_private(&plan.data_dir.join(super::BOOT_FILE), &json) {
                    return format!("cannot store the seed: {e}");
                }
                let kept = if plan.data_dir == std::path::Path::new(super::RAM_DATA) {
                    "this node runs from RAM: a reboot forgets it"
                } else {
                    "kept for later boots"
                };
                let _ = self.plans.send(plan);
                format!("joining through {seed}: the agent restarts with it ({kept})")
            }
        }
    }

    fn with_api(
        &mut self,
        f: impl FnOnce(Api) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>>>>,
    ) -> String {
        match Api::local() {
            Ok(api) => self.rt.block_on(f(api)).unwrap_or_else(|e| e),
            Err(e) => e,
        }
    }

    /// Draws the status screen: always when `force`, else only when what it shows changed.
    fn status(&mut self, force: bool) {
        let screen = self.rt.block_on(status_screen());
        if force || screen != self.last_screen {
            self.write(&format!("\x1b[H\x1b[2J{screen}"));
            self.last_screen = screen;
            self.showing_status = true;
            self.prompt();
            let line = self.line.clone();
            self.write(&line);
        }
    }
}

impl Action {
    fn question(&self) -> String {
        match self {
            Action::Reboot => "Reboot this node (its microVMs move to other nodes)".into(),
            Action::Poweroff => "Power this node off (its microVMs move to other nodes)".into(),
            Action::Join(seed) => format!("Join the cluster of {seed}"),
        }
    }
}

const HELP: &str = "\
status          this node's status screen (also: Enter, Ctrl+L)
nodes           the cluster's nodes
instances       the cluster's instances (microVMs), every tenant
logs            the agent's log (the last lines)
logs INSTANCE   an instance's console output (ID or TENANT/ID)
dmesg           the kernel's log (the last lines)
net             network links and addresses
reboot          reboot this node (asks first)
poweroff        power this node off (asks first)
join SEED       join the cluster of the node at SEED (asks first)
help            this list";

/// Puts the terminal into non-canonical mode without echo (keys are read one by one and echoed
/// here) and without signals from keys; output keeps newline translation.
fn raw_mode(tty: &std::fs::File) {
    // SAFETY: termios is plain data filled by tcgetattr before use.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a termios to fill.
    if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) } != 0 {
        return;
    }
    t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::ISIG | libc::IEXTEN);
    t.c_iflag &= !(libc::IXON | libc::INLCR | libc::IGNCR);
    t.c_iflag |= libc::ICRNL;
    t.c_oflag |= libc::OPOST | libc::ONLCR;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: as above, with the termios just read and changed.
    unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t) };
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "shoal".into())
}

/// The node's own API, as the agent's client config names it.
struct Api {
    addr: String,
    token: String,
    tls: Arc<rustls::ClientConfig>,
}

impl Api {
    fn local() -> Result<Api, String> {
        let plan = lock(&PLAN).clone().ok_or("the agent has not been started yet (see the boot phase)")?;
        let file = plan.data_dir.join("node/shoalctl.yaml");
        let text = std::fs::read(&file)
            .map_err(|_| "the agent has no cluster certificate yet (waiting for its cluster to form)".to_string())?;
        let cfg: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let ctx = &cfg["contexts"][0];
        let addr = ctx["endpoint"].as_str().unwrap_or("").trim_start_matches("https://").to_string();
        let token = ctx["token"].as_str().unwrap_or("").to_string();
        let tls = crate::cluster::tls::client_trusting(ctx["ca"].as_str().unwrap_or(""))
            .map_err(|e| format!("the cluster CA in {}: {e:#}", file.display()))?;
        Ok(Api { addr, token, tls: Arc::new(tls) })
    }

    async fn bytes(&self, path: &str) -> Result<bytes::Bytes, String> {
        use http_body_util::BodyExt;
        let r = crate::peer::get(&self.addr, path, &self.token, &self.tls)
            .await
            .map_err(|e| format!("the agent's API does not answer: {e}"))?;
        let status = r.status();
        let body = http_body_util::Limited::new(r.into_body(), 16 << 20);
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
            .await
            .map_err(|_| "the agent's API did not answer in time".to_string())?
            .map_err(|e| format!("reading the agent's answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let msg = v["error"].as_str().map(str::to_string).unwrap_or_else(|| status.to_string());
            return Err(format!("the agent answered {}: {msg}", status.as_u16()));
        }
        Ok(body)
    }

    async fn json(&self, path: &str) -> Result<Value, String> {
        let b = self.bytes(path).await?;
        serde_json::from_slice(&b).map_err(|e| format!("the agent's answer to {path}: {e}"))
    }

    /// Every instance of every tenant.
    async fn all_instances(&self) -> Result<Vec<Value>, String> {
        let tenants = self.json("/v1/tenants?stale=true").await?;
        let mut out = Vec::new();
        for t in tenants["tenants"].as_array().into_iter().flatten() {
            let name = t["name"].as_str().unwrap_or("");
            let list = self.json(&format!("/v1/tenants/{name}/instances?stale=true")).await?;
            out.extend(list["instances"].as_array().into_iter().flatten().cloned());
        }
        Ok(out)
    }
}

fn short(id: &Value) -> String {
    id.as_str().map(|s| s.chars().take(8).collect()).unwrap_or_else(|| "-".into())
}

/// Lines padded into columns.
fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn nodes(api: Api) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>>>> {
    Box::pin(async move {
        let status = api.json("/v1/cluster/status").await?;
        let list = api.json("/v1/nodes?stale=true").await?;
        let role = |id: &str| {
            let has = |k: &str| status[k].as_array().is_some_and(|a| a.iter().any(|v| v == id));
            match (status["leader_id"].as_str() == Some(id), has("voters"), has("learners")) {
                (true, _, _) => "leader",
                (_, true, _) => "voter",
                (_, _, true) => "learner",
                _ => "-",
            }
        };
        let mut rows =
            vec![["NODE", "API", "ROLE", "ALIVE", "CPUS", "MEM MiB", "INSTANCES", ""].map(String::from).to_vec()];
        for n in list["nodes"].as_array().into_iter().flatten() {
            let id = n["id"].as_str().unwrap_or("");
            let me = if status["node_id"].as_str() == Some(id) { "(this node)" } else { "" };
            let cordoned = if n["cordoned"] == true { "cordoned " } else { "" };
            rows.push(vec![
                id.to_string(),
                n["api_addr"].as_str().unwrap_or("").to_string(),
                role(id).to_string(),
                if n["alive"] == true { "yes" } else { "no" }.into(),
                format!("{}/{}", n["allocated"]["vcpus"], n["capacity"]["vcpus"]),
                format!("{}/{}", n["allocated"]["mem_mib"], n["capacity"]["mem_mib"]),
                n["instances"].to_string(),
                format!("{cordoned}{me}"),
            ]);
        }
        Ok(table(rows))
    })
}

fn instances(api: Api) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>>>> {
    Box::pin(async move {
        let all = api.all_instances().await?;
        if all.is_empty() {
            return Ok("no instances".into());
        }
        let mut rows =
            vec![["TENANT", "INSTANCE", "STATE", "NODE", "ADDRESS", "RESTARTS", "REASON"].map(String::from).to_vec()];
        for i in all {
            let s = |k: &str| i[k].as_str().unwrap_or("-").to_string();
            rows.push(vec![
                s("tenant"),
                s("id"),
                s("state"),
                short(&i["node"]),
                s("address"),
                i["restarts"].to_string(),
                {
                    let r: String = i["reason"].as_str().unwrap_or("").chars().take(60).collect();
                    r
                },
            ]);
        }
        Ok(table(rows))
    })
}

/// The end of an instance's console output; `which` is `ID` or `TENANT/ID`.
async fn instance_log(api: Api, which: &str) -> Result<String, String> {
    let (tenant, id) = match which.split_once('/') {
        Some((t, i)) => (t.to_string(), i.to_string()),
        None => {
            let all = api.all_instances().await?;
            let found: Vec<&Value> = all.iter().filter(|i| i["id"] == which).collect();
            match found.as_slice() {
                [one] => (one["tenant"].as_str().unwrap_or("").to_string(), which.to_string()),
                [] => return Err(format!("no instance {which:?} (see instances)")),
                _ => return Err(format!("{which:?} is an instance of several tenants: name it TENANT/{which}")),
            }
        }
    };
    let ok =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok(&tenant) || !ok(&id) {
        return Err(format!("{which:?} is not an instance name"));
    }
    let body = api.bytes(&format!("/v1/tenants/{tenant}/instances/{id}/console?tail_bytes=4096")).await?;
    // What the guest printed, without the terminal controls that would upset this screen.
    let text: String =
        String::from_utf8_lossy(&body).chars().filter(|c| *c == '\n' || *c == '\t' || !c.is_control()).collect();
    Ok(if text.trim().is_empty() { format!("{tenant}/{id} has printed nothing") } else { text })
}

/// The agent's last words before it exited: its fatal error, once its pipes have drained
/// (`shoal-node: ...`), else its last line.
pub fn agent_last_error() -> Option<String> {
    let deadline = std::time::Instant::now() + Duration::from_millis(500);
    loop {
        let found =
            lock(&AGENT_LOG).iter().rev().take(5).find_map(|l| l.strip_prefix("shoal-node: ").map(str::to_string));
        if found.is_some() || std::time::Instant::now() > deadline {
            return found.or_else(|| lock(&AGENT_LOG).back().cloned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn agent_log() -> String {
    let log = lock(&AGENT_LOG);
    if log.is_empty() {
        return "the agent has written nothing yet".into();
    }
    let skip = log.len().saturating_sub(SHOWN_LINES);
    log.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
}

/// The kernel's last records, from /dev/kmsg (`[seconds] message`).
fn kernel_log() -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg") else {
        return "cannot open /dev/kmsg".into();
    };
    let mut lines = VecDeque::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if lines.len() == SHOWN_LINES {
                    lines.pop_front();
                }
                lines.push_back(kmsg_line(&String::from_utf8_lossy(&buf[..n])));
            }
            // A record overwritten while reading: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(_) => break,
        }
    }
    lines.into_iter().collect::<Vec<_>>().join("\n")
}

/// One /dev/kmsg record (`PRI,SEQ,USEC,FLAGS;message\n continuation`) as dmesg prints it.
fn kmsg_line(record: &str) -> String {
    let Some((head, msg)) = record.split_once(';') else { return record.trim_end().to_string() };
    let usec: u64 = head.split(',').nth(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    let msg = unescape(msg.lines().next().unwrap_or(""));
    format!("[{:5}.{:06}] {msg}", usec / 1_000_000, usec % 1_000_000)
}

/// Undoes /dev/kmsg's `\xHH` escapes; a newline within a message becomes a space.
fn unescape(msg: &str) -> String {
    let mut out = String::new();
    let mut rest = msg;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        let hex = rest.get(i + 2..i + 4).and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(if b == b'\n' || !(b as char).is_ascii_graphic() { ' ' } else { b as char });
                rest = &rest[i + 4..];
            }
            None => {
                out.push_str("\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Links, their state and IPv4 addresses.
async fn net() -> String {
    let nl = match shoal_netstack::netlink::Netlink::connect() {
        Ok(nl) => nl,
        Err(e) => return format!("netlink: {e}"),
    };
    let links = match nl.links().await {
        Ok(l) => l,
        Err(e) => return format!("netlink: {e}"),
    };
    let mut rows = vec![["LINK", "STATE", "MAC", "ADDRESSES"].map(String::from).to_vec()];
    for l in links {
        let addrs = nl.addresses(l.index).await.unwrap_or_default();
        let state = match (l.up, l.carrier) {
            (true, true) => "up",
            (true, false) => "no-carrier",
            _ => "down",
        };
        let mac = l.mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"));
        rows.push(vec![
            l.name,
            state.into(),
            mac.unwrap_or_else(|| "-".into()),
            addrs.iter().map(|(a, p)| format!("{a}/{p}")).collect::<Vec<_>>().join(" "),
        ]);
    }
    table(rows)
}

/// The status screen's text (what is compared to decide a redraw: nothing in it ticks).
async fn status_screen() -> String {
    let mut s = format!("Shoal node {} (shoal-node {})\n\n", hostname(), env!("CARGO_PKG_VERSION"));
    let (phase, detail) = super::current_phase();
    s += &format!("  boot       {phase}: {detail}\n");
    if let Some(how) = lock(&MAINTENANCE).clone() {
        s += &format!("  maintenance  no cluster secret; configure this node from a client:\n    {how}\n");
    }
    if let Some(why) = lock(&AGENT_STOPPED).clone() {
        s += &format!("  agent      stopped: {why}\n");
    }
    let addrs = local_addresses().await;
    s += &format!("  addresses  {}\n", if addrs.is_empty() { "none".into() } else { addrs.join(", ") });
    let plan = lock(&PLAN).clone();
    if let Some(p) = &plan {
        s += &format!("  API        https://{}  (data in {})\n", p.listen, p.data_dir.display());
    }
    match Api::local() {
        Err(e) => s += &format!("  cluster    {e}\n"),
        Ok(api) => match cluster_lines(&api).await {
            Ok(lines) => s += &lines,
            Err(e) => s += &format!("  cluster    {e}\n"),
        },
    }
    s += "\n  Enter: this screen   help: the commands\n";
    s
}

async fn cluster_lines(api: &Api) -> Result<String, String> {
    let st = api.json("/v1/cluster/status").await?;
    let me = st["node_id"].as_str().unwrap_or("").to_string();
    let leader = match st["leader_id"].as_str() {
        None => "none yet (an election is under way, or the cluster waits for voters)".to_string(),
        Some(l) if l == me => format!("{l} (this node)"),
        Some(l) => l.to_string(),
    };
    let members = st["members"].as_array().cloned().unwrap_or_default();
    let alive = members.iter().filter(|m| m["state"] == "alive").count();
    let count = |k: &str| st[k].as_array().map(Vec::len).unwrap_or(0);
    let mut s = format!("  node id    {me}\n");
    s += &format!("  cluster    {}\n", st["cluster_id"].as_str().unwrap_or("not formed yet"));
    s += &format!("  leader     {leader}\n");
    s += &format!(
        "  members    {} ({alive} alive): {} voters, {} learners\n",
        members.len(),
        count("voters"),
        count("learners")
    );
    let nodes = api.json("/v1/nodes?stale=true").await.unwrap_or(Value::Null);
    if let Some(n) = nodes["nodes"].as_array().into_iter().flatten().find(|n| n["id"] == me.as_str()) {
        s += &format!(
            "  resources  {} of {} vCPUs, {} of {} MiB allocated\n",
            n["allocated"]["vcpus"], n["capacity"]["vcpus"], n["allocated"]["mem_mib"], n["capacity"]["mem_mib"]
        );
    }
    if let Ok(all) = api.all_instances().await {
        let here = all.iter().filter(|i| i["node"] == me.as_str());
        let running = here.clone().filter(|i| i["state"] == "running").count();
        s += &format!(
            "  instances  {running} running here ({} placed here), {} in the cluster\n",
            here.count(),
            all.len()
        );
    }
    Ok(s)
}

/// `eth0 10.0.2.15/24`, for every link but lo that has an address.
async fn local_addresses() -> Vec<String> {
    let Ok(nl) = shoal_netstack::netlink::Netlink::connect() else { return Vec::new() };
    let mut out = Vec::new();
    for l in nl.links().await.unwrap_or_default() {
        if l.name == "lo" {
            continue;
        }
        for (a, p) in nl.addresses(l.index).await.unwrap_or_default() {
            out.push(format!("{} {a}/{p}", l.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_records_print_as_dmesg_does() {
        assert_eq!(
            kmsg_line("6,339,5140900,-;NET: Registered protocol family 10\n"),
            "[    5.140900] NET: Registered protocol family 10"
        );
        assert_eq!(
            kmsg_line("4,1,12,-;line one\n SUBSYSTEM=acpi\n"),
            "[    0.000012] line one",
            "continuation lines (the record's dictionary) are left out"
        );
        assert_eq!(kmsg_line("garbage"), "garbage");
        assert_eq!(
            kmsg_line("6,2,3,-;ACPI: \\x5c_SB_.GSIF\\x0anext \\xzz\n"),
            "[    0.000003] ACPI: \\_SB_.GSIF next \\xzz"
        );
    }

    #[test]
    fn tables_pad_every_column_to_its_widest_cell() {
        let t = table(vec![vec!["A".into(), "BB".into()], vec!["ccc".into(), "d".into()]]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}
