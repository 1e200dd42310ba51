//! `shoal-node`: the Shoal host agent. `shoal-node agent` runs the cluster agent as an ordinary
//! process (development, tests, and under the host image's PID 1). Started as PID 1 (the host
//! image's `/init`) it is that init: see `shoal_node::pid1`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use shoal_node::cluster::agent::AgentConfig;
use shoal_node::cluster::gossip::GossipTiming;
use shoal_node::cluster::raft_node::RaftTiming;
use shoal_node::cluster::secret::{self, ClusterSecret};
use shoal_node::images::ImageStore;
use shoal_node::local::LocalNode;
use shoal_node::state::network::NO_NETWORK_LABEL;
use shoal_node::state::objects::Resources;
use shoal_node::supervisor::{self, SupervisorConfig};
use shoal_node::{api, cluster, leader};
use std::sync::Arc;

/// How long the agent of a node that is shutting down waits for its microVMs to stop and its
/// instances to be placed elsewhere (PID 1 waits a little longer for it).
const NODE_SHUTDOWN_LIMIT: Duration = Duration::from_secs(25);

#[derive(Parser, Debug)]
#[command(name = "shoal-node", version, about = "Shoal host agent: gossip membership, Raft-replicated state, HTTP API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the cluster agent.
    Agent(AgentArgs),
    /// (Internal) Detach and supervise one shoal-vmm for the agent: `shim --dir DIR --vmm PATH -- ARGS`.
    #[command(hide = true)]
    Shim(ShimArgs),
}

#[derive(clap::Args, Debug)]
struct ShimArgs {
    /// The instance directory.
    #[arg(long)]
    dir: PathBuf,
    /// The shoal-vmm binary.
    #[arg(long)]
    vmm: PathBuf,
    /// shoal-vmm's arguments.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// Directory for the node's id, Raft log and snapshots.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address of the HTTP API (TCP) and gossip (UDP); Raft uses the next port. Must be an address
    /// other nodes can reach.
    #[arg(long)]
    listen: SocketAddr,
    /// Gossip address of a node to join through (repeatable).
    #[arg(long = "seed")]
    seeds: Vec<String>,
    /// Find the other nodes on the LAN segment: broadcast this node's gossip address (tagged
    /// with a key of the cluster secret) and take other nodes' as seeds. For servers booted
    /// with no seed; every node of the cluster should announce.
    #[arg(long)]
    discover: bool,
    /// The UDP port of LAN discovery.
    #[arg(long, default_value_t = shoal_node::cluster::discovery::DEFAULT_PORT)]
    discovery_port: u16,
    /// Labels published with this node, `k=v,...` (zone=... spreads voters across zones).
    #[arg(long, default_value = "")]
    labels: String,
    /// Resources this node offers, `vcpus=N,mem-mib=M` (default: detected from the host).
    #[arg(long)]
    capacity: Option<String>,
    /// Nodes that must see each other before a fresh cluster bootstraps (1 for a one-node dev cluster).
    #[arg(long, default_value_t = 3)]
    min_voters: usize,
    /// File holding the cluster secret (default: $SHOAL_CLUSTER_SECRET, else a secret generated
    /// into DATA_DIR/secret on first start).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// File holding the API bearer token (default: derived from the secret and written to
    /// DATA_DIR/api-token).
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Seconds a voter must stay dead before the leader gives its seat to another node.
    #[arg(long, default_value_t = 30.0)]
    dead_voter_timeout: f64,
    /// Raft tick in milliseconds (heartbeats every 2 ticks; the election timeout is 6 ticks,
    /// randomized up to 12).
    #[arg(long, default_value_t = 50)]
    raft_tick_ms: u64,
    /// Applied entries between state snapshots (and log compactions).
    #[arg(long, default_value_t = 2000)]
    snapshot_every: u64,
    /// Log entries kept before each snapshot, so a follower briefly behind catches up from the
    /// log instead of receiving the whole state (etcd keeps 5000).
    #[arg(long, default_value_t = 5000)]
    log_tail: u64,
    /// Gossip interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    gossip_interval_ms: u64,
    /// Never sync the Raft log (as etcd's flag of this name): a power cut then loses writes
    /// the cluster acknowledged. Only for tests that show that it does.
    #[arg(long)]
    unsafe_no_fsync: bool,
    /// The shoal-vmm binary that runs this node's microVMs (default: $SHOAL_VMM, else the one
    /// beside shoal-node, else `shoal-vmm` on PATH).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Serve the API as plain HTTP instead of TLS (only with a loopback --listen address: a
    /// one-node development cluster). Raft between nodes is always TLS.
    #[arg(long)]
    plain_http: bool,
    /// Run microVMs without network interfaces and wire nothing on this host: for several
    /// nodes sharing one network namespace (a cluster on one machine's loopback addresses),
    /// whose taps, bridges and rules would collide. The node says so with the label
    /// shoal.io/instance-network=off, and the cluster gives its instances no addresses.
    #[arg(long)]
    no_instance_network: bool,
}

/// $SHOAL_VMM, else shoal-vmm beside this program, else on PATH.
fn default_vmm() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_VMM") {
        return PathBuf::from(p);
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("shoal-vmm")));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return p;
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("shoal-vmm")).find(|p| p.is_file()))
        .unwrap_or_else(|| PathBuf::from("shoal-vmm"))
}

fn parse_kv(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else { bail!("{part:?} is not key=value") };
        if k.is_empty() {
            bail!("{part:?} has an empty key");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn parse_capacity(s: &str) -> anyhow::Result<Resources> {
    let kv = parse_kv(s)?;
    let mut r = detect_capacity();
    for (k, v) in kv {
        let n: u64 = v.parse().with_context(|| format!("capacity {k}={v:?} is not a number"))?;
        match k.as_str() {
            "vcpus" => r.vcpus = n,
            "mem-mib" => r.mem_mib = n,
            _ => bail!("unknown capacity {k:?} (vcpus, mem-mib)"),
        }
    }
    Ok(r)
}

fn detect_capacity() -> Resources {
    let vcpus = std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0);
    Resources { vcpus, mem_mib }
}

/// Writes a file only the owner may read, durably: a power cut right after leaves the old file or
/// the whole new one (a truncated token or secret would lock the node out).
fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    shoal_node::durable::write_private(path, contents.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn load_secret(args: &AgentArgs) -> anyhow::Result<ClusterSecret> {
    if let Some(f) = &args.secret_file {
        let s = std::fs::read_to_string(f).with_context(|| format!("reading the secret file {}", f.display()))?;
        secret::check_strength(&s).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        return Ok(ClusterSecret::new(&s));
    }
    if let Ok(s) = std::env::var("SHOAL_CLUSTER_SECRET") {
        secret::check_strength(&s).map_err(|e| anyhow::anyhow!("SHOAL_CLUSTER_SECRET: {e}"))?;
        return Ok(ClusterSecret::new(&s));
    }
    let path = args.data_dir.join("secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(ClusterSecret::new(&s));
    }
    let s = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, &s)?;
    tracing::info!(path = %path.display(), "generated a cluster secret; give it to joining nodes with --secret-file");
    Ok(ClusterSecret::new(&s))
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    if args.listen.ip().is_unspecified() {
        bail!("--listen must be an address other nodes can reach, not {}", args.listen.ip());
    }
    if args.min_voters == 0 {
        bail!("--min-voters must be at least 1");
    }
    if args.plain_http && !args.listen.ip().is_loopback() {
        bail!("--plain-http is only allowed on a loopback --listen address (the API carries tokens)");
    }
    let secret = load_secret(&args)?;
    // Before anything is written under the new secret (the API token).
    shoal_node::cluster::pki::check_secret(&args.data_dir, &secret)?;
    let api_token = match &args.api_token_file {
        Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_string(),
        None => {
            let t = secret.default_api_token();
            write_private(&args.data_dir.join("api-token"), &t)?;
            t
        }
    };
    if api_token.is_empty() {
        bail!("the API token is empty");
    }
    let capacity = match &args.capacity {
        Some(c) => parse_capacity(c)?,
        None => detect_capacity(),
    };
    if !args.dead_voter_timeout.is_finite() || args.dead_voter_timeout < 0.0 {
        bail!("--dead-voter-timeout must be a number of seconds");
    }
    let mut labels = parse_kv(&args.labels).context("--labels")?;
    if args.no_instance_network {
        labels.insert(NO_NETWORK_LABEL.0.into(), NO_NETWORK_LABEL.1.into());
    } else if labels.get(NO_NETWORK_LABEL.0).is_some_and(|v| v == NO_NETWORK_LABEL.1) {
        bail!(
            "the label {}={} is what --no-instance-network sets: use the flag",
            NO_NETWORK_LABEL.0,
            NO_NETWORK_LABEL.1
        );
    }
    let config = AgentConfig {
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        seeds: args.seeds.clone(),
        discovery_port: args.discover.then_some(args.discovery_port),
        labels,
        capacity,
        min_voters: args.min_voters,
        secret,
        api_token,
        dead_voter_timeout: Duration::from_secs_f64(args.dead_voter_timeout),
        raft: RaftTiming {
            tick: Duration::from_millis(args.raft_tick_ms.max(1)),
            snapshot_every: args.snapshot_every.max(1),
            log_tail: args.log_tail,
            ..RaftTiming::default()
        },
        gossip: GossipTiming {
            interval: Duration::from_millis(args.gossip_interval_ms.max(1)),
            ..GossipTiming::default()
        },
        unsafe_no_fsync: args.unsafe_no_fsync,
    };
    let vmm = args.vmm.clone().unwrap_or_else(default_vmm);
    let shim_exe = std::env::current_exe().context("finding this program (it runs the shims)")?;
    let images = ImageStore::open(&args.data_dir.join("images")).context("opening the image store")?;
    let peer_token = config.secret.peer_token();
    let http = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding the API on {}", config.listen))?;
    let (agent, _gossip) = cluster::agent::start(config).await?;
    let node = Arc::new(LocalNode {
        agent: agent.clone(),
        images,
        instances_dir: args.data_dir.join("instances"),
        metrics: Default::default(),
        peer_token,
    });
    let network = !args.no_instance_network;
    tokio::spawn(supervisor::run(node.clone(), SupervisorConfig { vmm, shim_exe, network }));
    tokio::spawn(leader::run(node.clone()));
    let handover = node.clone();
    let app = api::router(node);
    tokio::spawn(write_client_config(agent.clone()));
    let tls = agent.tls.clone();
    let plain = args.plain_http;
    let server = async move {
        if plain {
            axum::serve(http, app).await
        } else {
            axum::serve(api::tls_listener::TlsListener::spawn(http, tls)?, app).await
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut node_down = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let server = tokio::spawn(server);
    tokio::select! {
        r = server => r.context("API server")?.context("API server")?,
        // The agent alone stops (a restart, a new plan): the microVMs keep running.
        _ = term.recv() => tracing::info!("terminating"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        // The whole node goes down (PID 1's ordered shutdown): hand everything over first,
        // the API still serving.
        _ = node_down.recv() => {
            tracing::info!("the node is shutting down: moving its microVMs and its leadership to other nodes");
            supervisor::hand_over(&handover, NODE_SHUTDOWN_LIMIT).await;
        }
    }
    let _ = agent.inbox.send(cluster::raft_node::Input::Shutdown);
    Ok(())
}

/// Once this node holds its cluster certificate, writes `DATA_DIR/shoalctl.yaml`: a shoalctl
/// config (as Talos writes a talosconfig) with this node's endpoint, the cluster token and the
/// CA to verify it with. `SHOAL_CONFIG=DATA_DIR/shoalctl.yaml shoalctl nodes` then works, as
/// does `curl --cacert DATA_DIR/tls/ca.crt -H "Authorization: Bearer $(cat DATA_DIR/api-token)"`.
async fn write_client_config(agent: Arc<cluster::agent::Agent>) {
    let configs = loop {
        if let Some(c) = agent.tls.configs() {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let config = serde_json::json!({
        "current-context": "shoal",
        "contexts": [{
            "name": "shoal",
            "endpoint": format!("https://{}", agent.config.listen),
            "token": agent.config.api_token,
            "ca": configs.identity.ca_pem,
        }],
    });
    let path = agent.config.data_dir.join("shoalctl.yaml");
    // JSON is YAML; the file holds the cluster token: private.
    if let Err(e) = write_private(&path, &format!("{config:#}\n")) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the shoalctl config");
    }
}

fn main() {
    // The host image's /init: the kernel passes init the command line's bare words, not ours.
    if std::process::id() == 1 {
        shoal_node::pid1::main();
    }
    let cli = Cli::parse();
    if let Command::Shim(args) = &cli.command {
        // Before any thread exists: the shim forks.
        std::process::exit(supervisor::shim::run(&args.dir, &args.vmm, &args.args));
    }
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shoal-node: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = match cli.command {
        Command::Agent(args) => rt.block_on(agent(args)),
        Command::Shim(_) => Ok(()),
    };
    if let Err(e) = result {
        eprintln!("shoal-node: {e:#}");
        std::process::exit(1);
    }
}
