//! `shoalctl`: the Shoal cluster from the command line. It speaks the node API over HTTP (any
//! node answers) and links nothing of the agent: tables for people by default, `-o json` for
//! scripts, errors as one line and a non-zero exit status.

mod client;
mod config;
mod manifest;
mod table;
mod trust;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use client::{Client, ClientError};
use config::{ConfigFile, Context};
use manifest::Object;

const DEFAULT_ENDPOINT: &str = "https://127.0.0.1:7400";
const DEFAULT_TENANT: &str = "default";

/// Manage a Shoal cluster: tenants, images, deployments, instances and their consoles.
#[derive(Debug, Parser)]
#[command(name = "shoalctl", version, about)]
struct Cli {
    /// A node's API address (default: the context's, else $SHOAL_ENDPOINT, else 127.0.0.1:7400).
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// The bearer token (default: the context's, else $SHOAL_TOKEN).
    #[arg(long, global = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// Read the bearer token from a file (a node writes its own to DATA_DIR/api-token).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// The cluster CA to verify the node with (default: the context's, else $SHOAL_CA; a node
    /// writes it to DATA_DIR/tls/ca.crt, and a whole context to DATA_DIR/shoalctl.yaml).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// The context of ~/.config/shoal/config to use (default: its current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The tenant of deployments and instances (default: the context's, else "default").
    #[arg(long, short = 't', global = true)]
    tenant: Option<String>,
    /// How to print what was asked for.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    /// Names only, one per line (for scripts).
    Name,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    #[value(alias = "node", alias = "no")]
    Nodes,
    #[value(alias = "tenant", alias = "ns")]
    Tenants,
    #[value(alias = "deployment", alias = "deploy")]
    Deployments,
    #[value(alias = "instance", alias = "inst", alias = "pods")]
    Instances,
    #[value(alias = "image", alias = "img")]
    Images,
}

impl Kind {
    fn singular(self) -> &'static str {
        match self {
            Kind::Nodes => "node",
            Kind::Tenants => "tenant",
            Kind::Deployments => "deployment",
            Kind::Instances => "instance",
            Kind::Images => "image",
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List objects of a kind, or show one by name.
    Get {
        kind: Kind,
        name: Option<String>,
        /// With instances: only this deployment's.
        #[arg(long, short = 'd')]
        deployment: Option<String>,
        /// After the list, print each change as it is committed (Ctrl+C to stop).
        #[arg(long, short = 'w', conflicts_with = "name")]
        watch: bool,
    },
    /// Rollouts: `rollout status NAME` waits until every replica of the deployment runs its
    /// current template.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Create or update the tenants and deployments in a YAML or JSON file ('-': stdin). Image
    /// fields that name files instead of digests are pushed first.
    Apply {
        #[arg(long, short = 'f')]
        file: String,
    },
    /// Delete a deployment, tenant or image by name, or every object of a file. Waits until a
    /// deployment's instances have stopped and it is gone, unless --no-wait.
    Delete {
        kind: Option<Kind>,
        name: Option<String>,
        #[arg(long, short = 'f', conflicts_with_all = ["kind", "name"])]
        file: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Set a deployment's replicas.
    Scale { name: String, replicas: u32 },
    /// An instance's console; with -f, keep following it.
    Logs {
        instance: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Attach this terminal to an instance's console: what it prints appears here, what you type
    /// is typed on it. Ctrl+] detaches; it ends by itself when the instance ends.
    Attach { instance: String },
    /// Images: push a file.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// What applying the deployments of a file would do, without doing it.
    Plan {
        #[arg(long, short = 'f')]
        file: String,
    },
    /// Cordon a node and move its instances off, one at a time within their disruption budgets;
    /// --cancel stops draining (it stays cordoned).
    Drain {
        node: String,
        #[arg(long)]
        cancel: bool,
    },
    /// Set node labels (`key=value`) or remove them (`key-`); they win over the node's own.
    Label {
        node: String,
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Set node taints (`key=value:no_schedule|no_execute`) or remove them (`key-`).
    Taint {
        node: String,
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Stop placing new instances on a node.
    Cordon { node: String },
    /// Place new instances on a node again.
    Uncordon { node: String },
    /// Tenant-scoped tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// A node by itself: `node configure` gives a node in maintenance mode (booted with no
    /// cluster secret) its configuration.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Contexts in ~/.config/shoal/config.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Wait until the deployment's replicas all run its current template.
    Status {
        name: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Upload a kernel, initrd or disk image; prints its digest.
    Push {
        file: PathBuf,
        /// Print only the digest (no progress bar).
        #[arg(long, short = 'q')]
        quiet: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// A new token for the tenant (shown once).
    Create { tenant: Option<String> },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Configure a node in maintenance mode: --endpoint is its address (ADDRESS:7400) and
    /// --token the one-time token its console shows. The node stores the configuration and
    /// starts its agent with it: it joins the cluster of this secret (through --seed, or found
    /// on its LAN), or forms one.
    Configure {
        /// The cluster secret (16 characters at least).
        #[arg(long)]
        secret_file: PathBuf,
        /// Gossip addresses of nodes to join through (HOST[:PORT]; repeat for more).
        #[arg(long = "seed")]
        seeds: Vec<String>,
        /// Labels published with the node (k=v,...).
        #[arg(long)]
        labels: Option<String>,
        /// Nodes that must see each other before a new cluster bootstraps (default 3).
        #[arg(long)]
        min_voters: Option<usize>,
        /// The node's hostname.
        #[arg(long)]
        hostname: Option<String>,
        /// Then wait for the node to be up and save a context of this name for it (as
        /// `config set-context NAME --secret-file`).
        #[arg(long)]
        set_context: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Add or replace a named context.
    SetContext {
        name: String,
        #[arg(long)]
        endpoint: String,
        /// The token, or read it from --token-file (the global flags).
        #[arg(long)]
        tenant: Option<String>,
        /// Trust the cluster from its secret alone: the token is derived from it, and the CA is
        /// fetched from the node, kept only if the node proves it holds the secret (for a node
        /// booted from the host image, whose CA is on the node).
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// Make a context the current one.
    UseContext { name: String },
    /// Print the config (tokens elided).
    View,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

fn usage(s: impl Into<String>) -> CliError {
    CliError::Usage(s.into())
}

struct Session {
    client: Client,
    tenant: String,
    output: Output,
}

fn token(cli: &Cli, ctx: Option<&Context>) -> Result<String, CliError> {
    if let Some(t) = &cli.token {
        return Ok(t.clone());
    }
    if let Some(f) = &cli.token_file {
        // A node that has just started writes its token file within moments.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !f.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let t = std::fs::read_to_string(f)
            .map_err(|source| CliError::Io { what: format!("reading {}", f.display()), source })?;
        return Ok(t.trim().to_string());
    }
    if let Ok(t) = std::env::var("SHOAL_TOKEN") {
        return Ok(t);
    }
    Ok(ctx.and_then(|c| c.token.clone()).unwrap_or_default())
}

fn session(cli: &Cli) -> Result<Session, CliError> {
    let file = ConfigFile::load()?;
    let ctx = file.context(cli.context.as_deref())?;
    let endpoint = cli
        .endpoint
        .clone()
        .or_else(|| std::env::var("SHOAL_ENDPOINT").ok())
        .or_else(|| ctx.map(|c| c.endpoint.clone()))
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let tenant =
        cli.tenant.clone().or_else(|| ctx.and_then(|c| c.tenant.clone())).unwrap_or_else(|| DEFAULT_TENANT.into());
    let ca = match ca_file(cli)? {
        Some(pem) => Some(pem),
        None => ctx.and_then(|c| c.ca.clone()),
    };
    Ok(Session { client: Client::new(&endpoint, &token(cli, ctx)?, ca.as_deref())?, tenant, output: cli.output })
}

/// The CA named by --ca or $SHOAL_CA, read.
fn ca_file(cli: &Cli) -> Result<Option<String>, CliError> {
    let Some(path) = cli.ca.clone().or_else(|| std::env::var_os("SHOAL_CA").map(PathBuf::from)) else {
        return Ok(None);
    };
    // A node writes its CA once it has joined (or formed) the cluster: moments after it starts.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::read_to_string(&path)
        .map(Some)
        .map_err(|source| CliError::Io { what: format!("reading the CA file {}", path.display()), source })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// The rows of one kind's table.
fn render(kind: Kind, v: &Value, now: SystemTime) -> String {
    match kind {
        Kind::Nodes => table::nodes(v, now),
        Kind::Tenants => table::tenants(v, now),
        Kind::Deployments => table::deployments(v, now),
        Kind::Instances => table::instances(v, now),
        Kind::Images => table::images(v, now),
    }
}

/// The names of a list's (or one object's) objects.
fn names(kind: Kind, v: &Value) -> Vec<String> {
    let (list, field) = match kind {
        Kind::Nodes => ("nodes", "id"),
        Kind::Tenants => ("tenants", "name"),
        Kind::Deployments => ("deployments", "name"),
        Kind::Instances => ("instances", "id"),
        Kind::Images => ("images", "digest"),
    };
    let items: Vec<&Value> = match v.get(list).and_then(Value::as_array) {
        Some(a) => a.iter().collect(),
        None => vec![v],
    };
    items.iter().filter_map(|i| i[field].as_str().map(str::to_string)).collect()
}

fn get(s: &Session, kind: Kind, name: Option<&str>, deployment: Option<&str>, watch: bool) -> Result<(), CliError> {
    let t = &s.tenant;
    let path = match (kind, name) {
        (Kind::Nodes, None) => "/v1/nodes".to_string(),
        (Kind::Nodes, Some(n)) => format!("/v1/nodes/{n}"),
        (Kind::Tenants, None) => "/v1/tenants".to_string(),
        (Kind::Tenants, Some(n)) => format!("/v1/tenants/{n}"),
        (Kind::Deployments, None) => format!("/v1/tenants/{t}/deployments"),
        (Kind::Deployments, Some(n)) => format!("/v1/tenants/{t}/deployments/{n}"),
        (Kind::Instances, None) => match deployment {
            Some(d) => format!("/v1/tenants/{t}/instances?deployment={d}"),
            None => format!("/v1/tenants/{t}/instances"),
        },
        (Kind::Instances, Some(n)) => format!("/v1/tenants/{t}/instances/{n}"),
        (Kind::Images, None) => "/v1/images".to_string(),
        (Kind::Images, Some(n)) => format!("/v1/images/{n}"),
    };
    let v = s.client.get(&path)?;
    match s.output {
        Output::Json => print_json(&v),
        Output::Name => names(kind, &v).iter().for_each(|n| println!("{n}")),
        Output::Table => println!("{}", render(kind, &v, SystemTime::now())),
    }
    if !watch {
        return Ok(());
    }
    if kind == Kind::Images {
        return Err(usage("images cannot be watched"));
    }
    let from = v["revision"].as_u64().unwrap_or(0);
    let sep = if path.contains('?') { '&' } else { '?' };
    let reader = s.client.stream(&format!("{path}{sep}watch=true&from_revision={from}"))?;
    let mut out = std::io::stdout().lock();
    for line in std::io::BufRead::lines(std::io::BufReader::new(reader)) {
        let Ok(line) = line else { return Ok(()) };
        let Some(data) = line.strip_prefix("data:") else { continue };
        let Ok(event) = serde_json::from_str::<Value>(data.trim()) else { continue };
        let text = match s.output {
            Output::Json => event.to_string(),
            Output::Name => format!("{} {}", event["type"].as_str().unwrap_or(""), event["key"].as_str().unwrap_or("")),
            Output::Table if event["type"] == "delete" => format!("deleted {}", event["key"].as_str().unwrap_or("")),
            // One row, without the header.
            Output::Table => {
                render(kind, &event["object"], SystemTime::now()).lines().skip(1).collect::<Vec<_>>().join("\n")
            }
        };
        if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Waits until the deployment runs every replica on its current template.
fn rollout_status(s: &Session, name: &str, timeout: u64) -> Result<(), CliError> {
    let path = format!("/v1/tenants/{}/deployments/{name}", s.tenant);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let mut last = String::new();
    loop {
        let d = s.client.get(&path)?;
        let (want, running, updated) = (
            d["replicas"].as_u64().unwrap_or(0),
            d["status"]["running"].as_u64().unwrap_or(0),
            d["status"]["updated"].as_u64().unwrap_or(0),
        );
        let line = format!("deployment/{name}: {running} of {want} running, {updated} updated");
        if line != last {
            println!("{line}");
            last = line;
        }
        if running == want && updated == want {
            println!("deployment/{name} rolled out");
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let why = d["status"]["message"].as_str().map(|m| format!(": {m}")).unwrap_or_default();
            return Err(usage(format!("deployment {name} did not roll out within {timeout} s{why}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

/// Uploads a file, with a progress bar on a terminal; returns its digest.
fn push(s: &Session, file: &Path, quiet: bool) -> Result<String, CliError> {
    let f = std::fs::File::open(file)
        .map_err(|source| CliError::Io { what: format!("opening {}", file.display()), source })?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = if quiet || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default());
        bar
    };
    let v = s.client.upload("/v1/images", bar.wrap_read(f), len)?;
    bar.finish_and_clear();
    v["digest"].as_str().map(str::to_string).ok_or_else(|| usage(format!("the node answered without a digest: {v}")))
}

fn apply(s: &Session, file: &str) -> Result<(), CliError> {
    let (objects, base) = manifest::read(file)?;
    if objects.is_empty() {
        return Err(usage(format!("{file} holds no objects")));
    }
    for obj in objects {
        let what = obj.describe(&s.tenant);
        let (path, body) = match obj {
            Object::Tenant { name, body } => (format!("/v1/tenants/{name}"), body),
            Object::Deployment { tenant, name, mut body } => {
                for (field, path) in manifest::image_files(&body, &base) {
                    let digest = push(s, &path, false)?;
                    eprintln!("image {} pushed as {digest}", path.display());
                    body["template"][field] = json!(digest);
                }
                (format!("/v1/tenants/{}/deployments/{name}", tenant.as_deref().unwrap_or(&s.tenant)), body)
            }
        };
        let (status, _) = s.client.call("PUT", &path, Some(&body))?;
        println!("{what} {}", if status == 201 { "created" } else { "configured" });
    }
    Ok(())
}

/// Waits until GET `path` answers 404.
fn wait_gone(s: &Session, what: &str, path: &str) -> Result<(), CliError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match s.client.get(path) {
            Err(e) if e.status() == Some(404) => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(_) if std::time::Instant::now() > deadline => {
                return Err(usage(format!("{what} is still being deleted after 120 s")));
            }
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(300)),
        }
    }
}

fn delete(s: &Session, kind: Option<Kind>, name: Option<&str>, file: Option<&str>, wait: bool) -> Result<(), CliError> {
    let mut targets: Vec<(String, String)> = Vec::new();
    if let Some(f) = file {
        let (objects, _) = manifest::read(f)?;
        // Deployments before the tenants that hold them.
        for obj in objects.iter().rev() {
            let what = obj.describe(&s.tenant);
            let path = match obj {
                Object::Tenant { name, .. } => format!("/v1/tenants/{name}"),
                Object::Deployment { tenant, name, .. } => {
                    format!("/v1/tenants/{}/deployments/{name}", tenant.as_deref().unwrap_or(&s.tenant))
                }
            };
            targets.push((what, path));
        }
    } else {
        let (Some(kind), Some(name)) = (kind, name) else {
            return Err(usage("delete needs a kind and a name, or -f FILE"));
        };
        let path = match kind {
            Kind::Deployments => format!("/v1/tenants/{}/deployments/{name}", s.tenant),
            Kind::Tenants => format!("/v1/tenants/{name}"),
            Kind::Images => format!("/v1/images/{name}"),
            Kind::Nodes | Kind::Instances => return Err(usage(
                "nodes leave the cluster and instances go with their deployment: delete a deployment, tenant or image",
            )),
        };
        targets.push((format!("{}/{name}", kind.singular()), path));
    }
    for (what, path) in targets {
        s.client.call("DELETE", &path, None)?;
        // A deployment goes once its instances have stopped (and only then may its tenant go).
        if wait && path.contains("/deployments/") {
            wait_gone(s, &what, &path)?;
        }
        println!("{what} deleted");
    }
    Ok(())
}

fn scale(s: &Session, name: &str, replicas: u32) -> Result<(), CliError> {
    let path = format!("/v1/tenants/{}/deployments/{name}", s.tenant);
    for _ in 0..5 {
        let d = s.client.get(&path)?;
        let mut spec = json!({});
        for k in ["labels", "template", "placement"] {
            spec[k] = d[k].clone();
        }
        spec["replicas"] = json!(replicas);
        let rev = d["mod_revision"].as_u64().unwrap_or(0);
        match s.client.call("PUT", &format!("{path}?prev_revision={rev}"), Some(&spec)) {
            Ok(_) => {
                println!("deployment/{name} scaled to {replicas}");
                return Ok(());
            }
            // Changed meanwhile (its status moves as instances start): read it again.
            Err(e) if e.status() == Some(409) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(usage(format!("deployment {name} kept changing; try again")))
}

fn logs(s: &Session, instance: &str, follow: bool) -> Result<(), CliError> {
    let path = format!("/v1/tenants/{}/instances/{instance}/console?follow={follow}", s.tenant);
    let mut reader = s.client.stream(&path)?;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 8192];
    loop {
        let n = reader.read(&mut buf).map_err(|source| CliError::Io { what: "reading the console".into(), source })?;
        if n == 0 {
            return Ok(());
        }
        if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
            return Ok(()); // The reader went away (a closed pipe).
        }
    }
}

/// The terminal in raw mode (keys go through as typed, Ctrl+C included) until dropped.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: termios is plain data; tcgetattr fills it for descriptor 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the structure it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: sets the attributes of descriptor 0 from a valid structure.
        (unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } == 0).then_some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved from descriptor 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

/// Ctrl+] (what telnet and QEMU's monitor use to escape).
const DETACH_KEY: u8 = 0x1d;

fn attach(s: &Session, instance: &str) -> Result<(), CliError> {
    let base = format!("/v1/tenants/{}/instances/{instance}/console", s.tenant);
    let mut output = s.client.stream(&format!("{base}?follow=true&tail_bytes=4096"))?;
    let tty = std::io::stdin().is_terminal();
    let how = if tty { "Ctrl+] detaches" } else { "it ends with the instance" };
    eprintln!("shoalctl: attached to {instance} (tenant {}); {how}", s.tenant);
    let raw = if tty { RawTerminal::enter() } else { None };
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended_out = ended.clone();
    std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 8192];
        while let Ok(n) = output.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
        ended_out.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mut stdin_open = true;
    let mut detached = false;
    let mut buf = [0u8; 1024];
    while !ended.load(std::sync::atomic::Ordering::SeqCst) {
        if !stdin_open {
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let mut fds = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one valid pollfd structure.
        if unsafe { libc::poll(&mut fds, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: reads into a buffer of the length given.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            stdin_open = false; // Input ended: keep showing the console until the instance ends.
            continue;
        }
        let mut typed = &buf[..n as usize];
        if let Some(at) = typed.iter().position(|b| *b == DETACH_KEY) {
            typed = &typed[..at];
            detached = true;
        }
        if !typed.is_empty() {
            s.client.post_bytes(&base, typed)?;
        }
        if detached {
            break;
        }
    }
    drop(raw);
    if detached {
        eprintln!("\r\nshoalctl: detached from {instance}");
    }
    Ok(())
}

fn plan(s: &Session, file: &str) -> Result<(), CliError> {
    let (objects, base) = manifest::read(file)?;
    let mut any = false;
    for obj in objects {
        let Object::Deployment { tenant, name, mut body } = obj else { continue };
        any = true;
        for (field, path) in manifest::image_files(&body, &base) {
            let digest = push(s, &path, true)?;
            body["template"][field] = json!(digest);
        }
        let tenant = tenant.unwrap_or_else(|| s.tenant.clone());
        let (_, v) = s.client.call("POST", &format!("/v1/tenants/{tenant}/deployments/{name}/plan"), Some(&body))?;
        if s.output == Output::Json {
            print_json(&json!({"deployment": name, "tenant": tenant, "plan": v}));
            continue;
        }
        let placed: u64 = v["placements"].as_array().into_iter().flatten().filter_map(|p| p["count"].as_u64()).sum();
        let pending: u64 = v["pending"].as_array().into_iter().flatten().filter_map(|p| p["count"].as_u64()).sum();
        println!(
            "deployment/{name} (tenant {tenant}): {placed} placed, {pending} pending, {} preempted",
            v["preemptions"].as_array().map_or(0, |a| a.len())
        );
        for p in v["placements"].as_array().into_iter().flatten() {
            println!("  node {}  {}", p["node"].as_str().unwrap_or("-"), p["count"]);
        }
        for p in v["pending"].as_array().into_iter().flatten() {
            println!("  pending {}: {}", p["count"], p["reason"].as_str().unwrap_or(""));
        }
        for p in v["preemptions"].as_array().into_iter().flatten() {
            println!(
                "  preempts {}/{} on node {}",
                p["tenant"].as_str().unwrap_or(""),
                p["instance"].as_str().unwrap_or(""),
                p["node"].as_str().unwrap_or("")
            );
        }
    }
    if !any {
        return Err(usage(format!("{file} holds no deployments")));
    }
    Ok(())
}

/// Applies `key=value` / `key-` changes to a node's operator labels or taints.
fn edit_node(s: &Session, node: &str, changes: &[String], taints: bool) -> Result<(), CliError> {
    let path = format!("/v1/nodes/{node}");
    let n = s.client.get(&path)?;
    let mut labels: serde_json::Map<String, Value> = n["api_labels"].as_object().cloned().unwrap_or_default();
    let mut list: Vec<Value> = n["taints"].as_array().cloned().unwrap_or_default();
    for c in changes {
        if let Some(key) = c.strip_suffix('-') {
            if taints {
                list.retain(|t| t["key"] != key);
            } else {
                labels.remove(key);
            }
            continue;
        }
        let Some((key, rest)) = c.split_once('=') else {
            return Err(usage(format!("{c:?}: expected key=value or key-")));
        };
        if taints {
            let Some((value, effect)) = rest.rsplit_once(':') else {
                return Err(usage(format!("{c:?}: a taint is key=value:no_schedule or key=value:no_execute")));
            };
            list.retain(|t| t["key"] != key);
            list.push(json!({"key": key, "value": value, "effect": effect}));
        } else {
            labels.insert(key.to_string(), json!(rest));
        }
    }
    let (_, v) = s.client.call("PUT", &path, Some(&json!({"labels": labels, "taints": list})))?;
    if s.output == Output::Json {
        print_json(&v);
    } else {
        println!("node/{node} {}", if taints { "tainted" } else { "labeled" });
    }
    Ok(())
}

/// `node configure`.
fn configure_node(cli: &Cli, command: &NodeCommand) -> Result<(), CliError> {
    let NodeCommand::Configure { secret_file, seeds, labels, min_voters, hostname, set_context } = command;
    let endpoint = cli.endpoint.as_deref().ok_or_else(|| usage("node configure needs --endpoint ADDRESS:7400"))?;
    let token =
        cli.token.as_deref().ok_or_else(|| usage("node configure needs --token (it is on the node's console)"))?;
    let secret = std::fs::read_to_string(secret_file)
        .map_err(|source| CliError::Io { what: format!("reading {}", secret_file.display()), source })?;
    let mut body = json!({ "secret": secret.trim(), "seeds": seeds });
    for (key, value) in [("labels", labels.clone().map(Value::from)), ("hostname", hostname.clone().map(Value::from))] {
        if let Some(v) = value {
            body[key] = v;
        }
    }
    if let Some(n) = min_voters {
        body["min_voters"] = json!(n);
    }
    let name = trust::configure(endpoint, token, &body).map_err(CliError::Usage)?;
    println!("{name} is configured: it starts its agent with this secret now");
    match set_context {
        Some(ctx) => {
            let ca = trust::fetch_ca(endpoint, &secret).map_err(CliError::Usage)?;
            let mut file = ConfigFile::load()?;
            let context = Context {
                name: ctx.clone(),
                endpoint: endpoint.into(),
                token: Some(trust::api_token(&secret)),
                tenant: None,
                ca: Some(ca),
            };
            file.set(context);
            file.save()?;
            println!("context {ctx} set in {}", config::path().display());
        }
        None => println!(
            "once it is up: shoalctl config set-context NAME --endpoint {endpoint} --secret-file {}",
            secret_file.display()
        ),
    }
    Ok(())
}

fn run(cli: &Cli) -> Result<(), CliError> {
    if let Command::Node { command } = &cli.command {
        return configure_node(cli, command);
    }
    if let Command::Config { command } = &cli.command {
        let mut file = ConfigFile::load()?;
        match command {
            ConfigCommand::SetContext { name, endpoint, tenant, secret_file } => {
                let mut token = match (&cli.token, &cli.token_file) {
                    (None, None) => None,
                    _ => Some(token(cli, None)?),
                };
                let mut ca = ca_file(cli)?;
                if let Some(f) = secret_file {
                    if ca.is_some() {
                        return Err(CliError::Usage("--secret-file fetches the CA: give it or --ca, not both".into()));
                    }
                    let secret = std::fs::read_to_string(f)
                        .map_err(|source| CliError::Io { what: format!("reading {}", f.display()), source })?;
                    ca = Some(trust::fetch_ca(endpoint, &secret).map_err(CliError::Usage)?);
                    token = token.or_else(|| Some(trust::api_token(&secret)));
                }
                file.set(Context { name: name.clone(), endpoint: endpoint.clone(), token, tenant: tenant.clone(), ca });
                file.save()?;
                println!("context {name} set in {}", config::path().display());
            }
            ConfigCommand::UseContext { name } => {
                file.context(Some(name))?;
                file.current_context = Some(name.clone());
                file.save()?;
                println!("using context {name}");
            }
            ConfigCommand::View => {
                for c in &mut file.contexts {
                    if c.token.is_some() {
                        c.token = Some("(set)".into());
                    }
                }
                print!("{}", yaml_serde::to_string(&file).unwrap_or_default());
            }
        }
        return Ok(());
    }
    let s = session(cli)?;
    match &cli.command {
        Command::Get { kind, name, deployment, watch } => {
            get(&s, *kind, name.as_deref(), deployment.as_deref(), *watch)
        }
        Command::Rollout { command: RolloutCommand::Status { name, timeout } } => rollout_status(&s, name, *timeout),
        Command::Apply { file } => apply(&s, file),
        Command::Delete { kind, name, file, no_wait } => delete(&s, *kind, name.as_deref(), file.as_deref(), !no_wait),
        Command::Scale { name, replicas } => scale(&s, name, *replicas),
        Command::Logs { instance, follow } => logs(&s, instance, *follow),
        Command::Attach { instance } => attach(&s, instance),
        Command::Plan { file } => plan(&s, file),
        Command::Drain { node, cancel } => {
            let method = if *cancel { "DELETE" } else { "POST" };
            let (_, v) = s.client.call(method, &format!("/v1/nodes/{node}/drain"), None)?;
            if s.output == Output::Json {
                print_json(&v);
            } else if *cancel {
                println!("node/{node} no longer draining (still cordoned)");
            } else {
                let left = v["node"]["drain"]["remaining"].as_u64().unwrap_or(0);
                println!("node/{node} draining: {left} instances to move (shoalctl get nodes shows the progress)");
            }
            Ok(())
        }
        Command::Label { node, changes } => edit_node(&s, node, changes, false),
        Command::Taint { node, changes } => edit_node(&s, node, changes, true),
        Command::Image { command: ImageCommand::Push { file, quiet } } => {
            let digest = push(&s, file, *quiet)?;
            if s.output == Output::Json {
                print_json(&json!({"digest": digest}));
            } else {
                println!("{digest}");
            }
            Ok(())
        }
        Command::Cordon { node } | Command::Uncordon { node } => {
            let method = if matches!(cli.command, Command::Cordon { .. }) { "PUT" } else { "DELETE" };
            let (_, v) = s.client.call(method, &format!("/v1/nodes/{node}/cordon"), None)?;
            if s.output == Output::Json {
                print_json(&v);
            } else {
                println!("node/{node} {}", if method == "PUT" { "cordoned" } else { "uncordoned" });
            }
            Ok(())
        }
        Command::Token { command: TokenCommand::Create { tenant } } => {
            let tenant = tenant.clone().unwrap_or_else(|| s.tenant.clone());
            let (_, v) = s.client.call("POST", &format!("/v1/tenants/{tenant}/tokens"), None)?;
            if s.output == Output::Json {
                print_json(&v);
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        Command::Config { .. } | Command::Node { .. } => Ok(()),
    }
}

fn main() -> ExitCode {
    // A closed stdout (`shoalctl logs -f | head`) ends the program quietly instead of panicking.
    // SAFETY: restoring the default disposition of SIGPIPE installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "shoalctl: {e}");
            ExitCode::from(1)
        }
    }
}
