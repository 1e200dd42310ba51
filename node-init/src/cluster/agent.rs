//! The cluster agent: starts the Raft thread, its listener, gossip and the control loop that joins
//! gossip and Raft (publishes this node's facts, bootstraps a fresh cluster, and on the leader
//! admits nodes and replaces dead voters). The HTTP API is served by `crate::api` over [`Agent`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, ProtocolVersion};
use tracing::info;

use super::gossip::{self, GossipTiming, PeerInfo, Resources, SignedUdpTransport};
use super::pki::{self, Identity};
use super::policy::{self, Formation, FormingPeer, MemberView, VoterChange};
use super::raft_node::{InboxSender, Input, MembershipChange, RaftParts, RaftThread, RaftTiming, Shared};
use super::secret::ClusterSecret;
use super::storage::RaftStore;
use super::tls::Tls;
use super::transport::{self, AddressBook, ListenerParts, RaftTransport};
use crate::state::{NodeRecord, Pki, State};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
const CONTROL_INTERVAL: Duration = Duration::from_millis(200);
/// How long another live member must carry this node's Raft id before this one stops.
const DUPLICATE_GRACE: Duration = Duration::from_secs(5);
/// How long a leader leads before it hands over to a node with more room.
const LEADER_SETTLE: Duration = Duration::from_secs(2);
/// Between join attempts of a node that has no certificate yet.
const JOIN_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// API (TCP) and gossip (UDP) address; Raft listens on the next port.
    pub listen: SocketAddr,
    pub seeds: Vec<String>,
    /// Announce this node and find others on the LAN by broadcast on this UDP port
    /// (`--discover`; for nodes booted with no seed).
    pub discovery_port: Option<u16>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub min_voters: usize,
    pub secret: ClusterSecret,
    pub api_token: String,
    /// How long a voter must stay dead before the leader replaces it.
    pub dead_voter_timeout: Duration,
    pub raft: RaftTiming,
    pub gossip: GossipTiming,
    /// Open the Raft log unsynced (`--unsafe-no-fsync`).
    pub unsafe_no_fsync: bool,
}

impl AgentConfig {
    pub fn raft_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen.ip(), self.listen.port().wrapping_add(1))
    }
}

/// A running agent: what the API needs to answer requests.
#[derive(Debug)]
pub struct Agent {
    pub id: u64,
    pub config: AgentConfig,
    pub shared: Arc<Shared>,
    pub inbox: InboxSender,
    pub peers: RwLock<Vec<(PeerInfo, bool)>>,
    pub tls: Arc<Tls>,
    /// The node is shutting down: gossip says so, it hands its leadership over at once and the
    /// leader moves its instances elsewhere.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Agent {
    pub fn record(&self) -> NodeRecord {
        NodeRecord {
            id: self.id,
            raft_addr: self.config.raft_addr().to_string(),
            api_addr: self.config.listen.to_string(),
            labels: self.config.labels.clone(),
            capacity: self.config.capacity,
        }
    }

    /// Gossip's view: every node it has heard of, with whether it is live now.
    pub fn peers(&self) -> Vec<(PeerInfo, bool)> {
        self.peers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The nodes shutting down in order: this one if it is, and the live peers gossip says are.
    pub fn stopping_nodes(&self) -> std::collections::BTreeSet<u64> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers
            .iter()
            .filter(|(p, live)| *live && p.stopping)
            .map(|(p, _)| p.id)
            .chain(self.is_stopping().then_some(self.id))
            .collect()
    }
}

/// The file in the data directory that names the cluster the node was part of.
const CLUSTER_MARK: &str = "cluster-id";

/// This node's Raft id, created on first start and kept in the data directory.
fn node_id(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join("node-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return u64::from_str_radix(s.trim(), 16).with_context(|| format!("{} is corrupt", path.display()));
    }
    let id = loop {
        let id: u64 = rand::random();
        if id != 0 {
            break id;
        }
    };
    crate::durable::write(&path, format!("{id:016x}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// A live gossip member other than this process that carries this node's Raft id: a copy of
/// this node's data directory running elsewhere. Two processes with one Raft id would vote and
/// acknowledge as one node. The one that started later (higher gossip generation; the higher
/// address on a tie) is the copy and stops.
fn duplicate_of_self(c: &chitchat::Chitchat, id: u64) -> Option<String> {
    let me = c.self_chitchat_id().clone();
    let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
    c.node_states().iter().find_map(|(cid, st)| {
        let same_id = PeerInfo::from_state(cid, st).is_some_and(|p| p.id == id);
        let other = cid.gossip_advertise_addr != me.gossip_advertise_addr;
        let i_am_younger = (me.generation_id, me.gossip_advertise_addr.to_string())
            > (cid.generation_id, cid.gossip_advertise_addr.to_string());
        (same_id && other && live.contains(cid) && i_am_younger).then(|| cid.gossip_advertise_addr.to_string())
    })
}

pub async fn start(config: AgentConfig) -> anyhow::Result<(Arc<Agent>, ChitchatHandle)> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let id = node_id(&config.data_dir)?;
    let raft_dir = config.data_dir.join("raft");
    let store = if config.unsafe_no_fsync {
        tracing::warn!("--unsafe-no-fsync: the raft log is never synced; a power cut loses acknowledged writes");
        RaftStore::open_unsynced(&raft_dir)
    } else {
        RaftStore::open(&raft_dir)
    }
    .context("opening the raft log")?;
    let shared = Shared::new(State::default());
    let addrs: AddressBook = Arc::new(RwLock::new(HashMap::new()));
    let (inbox_tx, inbox_rx) = super::raft_node::inbox();
    let tls = Arc::new(Tls::open(&config.data_dir, id, vec![config.listen.ip()]).context("this node's TLS identity")?);

    let raft_listener = tokio::net::TcpListener::bind(config.raft_addr())
        .await
        .with_context(|| format!("binding the raft listener on {}", config.raft_addr()))?;
    // A peer may speak while its certificate's key is the one registered for its id and it has
    // not been removed.
    let admitting = shared.clone();
    let admit: transport::Admit = Arc::new(move |node, key| admitting.state().pki.admits(node, key));
    tokio::spawn(transport::serve(
        raft_listener,
        ListenerParts { tls: tls.clone(), me: id, admit, inbox: inbox_tx.clone() },
    ));
    let transport = RaftTransport::new(tls.clone(), addrs.clone(), tokio::runtime::Handle::current(), inbox_tx.clone());
    let priority = config.capacity.mem_mib as i64;
    let raft = RaftThread::new(RaftParts {
        id,
        priority,
        timing: config.raft,
        store,
        transport,
        shared: shared.clone(),
        addrs: addrs.clone(),
        inbox: inbox_rx,
    })?;
    std::thread::Builder::new().name("raft".into()).spawn(move || raft.run())?;

    let chitchat_id = ChitchatId::new(
        format!("{id:016x}"),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        config.listen,
    );
    let initial = vec![
        (gossip::KEY_RAFT_ID.to_string(), format!("{id:016x}")),
        (gossip::KEY_API.to_string(), config.listen.to_string()),
        (gossip::KEY_RAFT.to_string(), config.raft_addr().to_string()),
        (gossip::KEY_LABELS.to_string(), serde_json::to_string(&config.labels)?),
        (gossip::KEY_CAPACITY.to_string(), serde_json::to_string(&config.capacity)?),
        (gossip::KEY_FREE.to_string(), serde_json::to_string(&config.capacity)?),
        (gossip::KEY_VERSION.to_string(), VERSION.to_string()),
        (gossip::KEY_FORMAT.to_string(), crate::state::command::BINARY_FORMAT.to_string()),
    ];
    let chitchat_config = ChitchatConfig {
        chitchat_id,
        cluster_id: "shoal".into(),
        gossip_interval: config.gossip.interval,
        listen_addr: config.listen,
        seed_nodes: config.seeds.clone(),
        failure_detector_config: gossip::failure_detector(&config.gossip),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    let transport = SignedUdpTransport::new(config.secret.key("gossip"), id);
    let chitchat = spawn_chitchat(chitchat_config, initial, &transport).await.context("starting gossip")?;
    if let Some(port) = config.discovery_port {
        let seeds = chitchat.seed_adder();
        let key = config.secret.key("discovery");
        tokio::spawn(super::discovery::run(key, id, config.listen, port, move |addr| seeds.add(addr)));
    }

    let agent = Arc::new(Agent {
        id,
        config,
        shared,
        inbox: inbox_tx,
        peers: RwLock::new(Vec::new()),
        tls,
        stopping: Default::default(),
    });
    info!(node = %format!("{id:016x}"), listen = %agent.config.listen, raft = %agent.config.raft_addr(), "agent started");
    tokio::spawn(control_loop(agent.clone(), chitchat.chitchat(), addrs));
    Ok((agent, chitchat))
}

/// Reads gossip into `(peer, live)` pairs, one per Raft id (a restarted node's old generation
/// counts as the same node).
async fn read_gossip(chitchat: &tokio::sync::Mutex<chitchat::Chitchat>) -> Vec<(PeerInfo, bool)> {
    let c = chitchat.lock().await;
    let live: std::collections::HashSet<ChitchatId> = c.live_nodes().cloned().collect();
    let mut by_id: BTreeMap<u64, (PeerInfo, bool, u64)> = BTreeMap::new();
    for (cid, st) in c.node_states() {
        let Some(info) = PeerInfo::from_state(cid, st) else { continue };
        let is_live = live.contains(cid);
        let newer =
            by_id.get(&info.id).is_none_or(|(_, l, generation)| (is_live, cid.generation_id) > (*l, *generation));
        if newer {
            by_id.insert(info.id, (info, is_live, cid.generation_id));
        }
    }
    by_id.into_values().map(|(p, l, _)| (p, l)).collect()
}

async fn control_loop(agent: Arc<Agent>, chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>, addrs: AddressBook) {
    let started = Instant::now();
    let mut last_seen: HashMap<u64, Instant> = HashMap::new();
    let mut bootstrap_votes = 0u32;
    // When this node last became leader: leadership moves only after it has settled.
    let mut leading_since: Option<Instant> = None;
    let mut interval = tokio::time::interval(CONTROL_INTERVAL);
    let mut duplicate_since: Option<Instant> = None;
    let mut joining: Option<tokio::task::JoinHandle<()>> = None;
    let mut last_join: Option<Instant> = None;
    // The cluster this data directory was part of, kept outside the Raft log (see below).
    let mark = agent.config.data_dir.join(CLUSTER_MARK);
    let mut remembered = std::fs::read_to_string(&mark).unwrap_or_default().trim().to_string();
    let mut refusal_logged = false;
    loop {
        interval.tick().await;
        let duplicate = duplicate_of_self(&*chitchat.lock().await, agent.id);
        // Seen live for a while, not just once: a process this node replaced (same id, an
        // address it no longer has) stays in gossip until its heartbeats are missed.
        match duplicate {
            None => duplicate_since = None,
            Some(other) => {
                if duplicate_since.get_or_insert_with(Instant::now).elapsed() > DUPLICATE_GRACE {
                    let why = format!(
                        "node {other} runs with this node's Raft id {:016x}, and started first: this data directory ({}) is a copy of that node's; start this server with a fresh data directory",
                        agent.id,
                        agent.config.data_dir.display()
                    );
                    tracing::error!("{why}; stopping");
                    eprintln!("shoal-node: {why}");
                    std::process::exit(67);
                }
            }
        }
        let peers = read_gossip(&chitchat).await;
        let now = Instant::now();
        {
            let mut book = addrs.write().unwrap_or_else(|e| e.into_inner());
            for (p, live) in &peers {
                if *live {
                    last_seen.insert(p.id, now);
                    if let Ok(a) = p.raft_addr.parse() {
                        book.insert(p.id, a);
                    }
                }
            }
        }
        *agent.peers.write().unwrap_or_else(|e| e.into_inner()) = peers.clone();

        let (cluster_id, free) = {
            let state = agent.shared.state();
            // What the scheduler can still place here (what gossip publishes as free).
            let mut free = agent.config.capacity;
            free.sub(state.allocated(agent.id));
            (state.cluster_id.clone(), free)
        };
        let status = agent.shared.status();
        let member = status.voters.contains(&agent.id) || status.learners.contains(&agent.id);
        let live_peers: Vec<&PeerInfo> = peers.iter().filter(|(_, l)| *l).map(|(p, _)| p).collect();

        // What this node tells the others.
        let forming: Vec<FormingPeer> = live_peers
            .iter()
            .filter(|p| p.id != agent.id)
            .map(|p| FormingPeer { id: p.id, cluster: p.cluster.clone(), candidate: p.candidate })
            .collect();
        let candidate = (cluster_id.is_empty()).then(|| policy::bootstrap_candidate(agent.id, &forming));
        let node_status = if !cluster_id.is_empty() && member {
            "member"
        } else if forming.iter().any(|p| p.cluster.is_some()) {
            "joining"
        } else {
            "forming"
        };
        {
            let mut c = chitchat.lock().await;
            let me = c.self_node_state();
            me.set(gossip::KEY_STATUS, node_status);
            me.set(gossip::KEY_FREE, serde_json::to_string(&free).unwrap_or_default());
            me.set(gossip::KEY_CLUSTER, &cluster_id);
            me.set(gossip::KEY_CANDIDATE, candidate.map(|c| format!("{c:016x}")).unwrap_or_default());
            if agent.is_stopping() {
                me.set(gossip::KEY_STOPPING, "1");
            }
        }

        // A node without a certificate asks a member of the cluster gossip shows for one.
        if agent.tls.configs().is_none() && joining.as_ref().is_none_or(|j| j.is_finished()) {
            let member = live_peers.iter().find(|p| p.id != agent.id && p.cluster.is_some() && p.status == "member");
            if let Some(p) = member {
                if last_join.is_none_or(|t| t.elapsed() >= JOIN_RETRY) {
                    last_join = Some(now);
                    joining = Some(tokio::spawn(join(agent.clone(), p.api_addr.clone())));
                }
            }
        }

        if !cluster_id.is_empty() && remembered != cluster_id {
            match crate::durable::write(&mark, format!("{cluster_id}\n").as_bytes()) {
                Ok(()) => remembered = cluster_id.clone(),
                Err(e) => tracing::warn!(error = %e, path = %mark.display(), "cannot record the cluster id"),
            }
        }
        if cluster_id.is_empty() && !remembered.is_empty() {
            // This data directory was part of a cluster and its Raft log is gone (a disk that
            // lost it, a log deleted by hand): founding a new cluster would split the old one's
            // nodes between two clusters under one secret. It may still rejoin its cluster
            // (above) if the others are up.
            if !refusal_logged {
                refusal_logged = true;
                let why = format!(
                    "this data directory ({}) was part of cluster {remembered}, but its Raft log is empty: this node will not found a new cluster; it rejoins its cluster if that is up, else start it with a fresh data directory (or remove {} to found a new cluster)",
                    agent.config.data_dir.display(),
                    mark.display()
                );
                tracing::error!("{why}");
                eprintln!("shoal-node: {why}");
            }
            continue;
        }
        if cluster_id.is_empty() {
            // Two consecutive rounds must agree, so a node does not bootstrap on a view it has
            // only just published its own vote into.
            if policy::formation(agent.id, agent.config.min_voters, &forming) == Formation::Bootstrap {
                bootstrap_votes += 1;
                if bootstrap_votes >= 2 {
                    let cluster_id = format!("{:016x}", rand::random::<u64>());
                    match found_ca(&agent, &cluster_id) {
                        Ok(pki) => {
                            let _ = agent.inbox.try_send(Input::Bootstrap { cluster_id, me: agent.record(), pki });
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot create the cluster CA"),
                    }
                    bootstrap_votes = 0;
                }
            } else {
                bootstrap_votes = 0;
            }
            continue;
        }

        if status.role != "leader" {
            leading_since = None;
            continue;
        }
        leading_since.get_or_insert(now);
        let info: HashMap<u64, &PeerInfo> = peers.iter().map(|(p, _)| (p.id, p)).collect();
        let is_live = |id: u64| id == agent.id || peers.iter().any(|(p, l)| p.id == id && *l);
        let stopping = agent.stopping_nodes();
        let mut members: Vec<MemberView> = Vec::new();
        let mut ids: Vec<u64> = status.voters.iter().chain(status.learners.iter()).copied().collect();
        {
            let state = agent.shared.state();
            for p in &live_peers {
                // Admit nodes of this cluster or not yet in any that hold a certificate of its
                // CA (issued for their id, never to a removed node).
                let certified = state.pki.identities.contains_key(&p.id) && !state.pki.revoked.contains(&p.id);
                if !ids.contains(&p.id) && certified && p.cluster.as_deref().is_none_or(|c| c == cluster_id) {
                    ids.push(p.id);
                }
            }
        }
        for id in ids {
            let p = info.get(&id);
            let live = is_live(id);
            let dead_for = if live { Duration::ZERO } else { now - *last_seen.get(&id).unwrap_or(&started) };
            let matched = status.matched.get(&id).copied().unwrap_or(0);
            members.push(MemberView {
                id,
                live,
                dead_for,
                voter: status.voters.contains(&id),
                learner: status.learners.contains(&id),
                caught_up: matched > 0 && matched + 100 >= status.last_index,
                zone: p.and_then(|p| p.labels.get("zone").cloned()),
                free_vcpus: p.map(|p| p.free.vcpus).unwrap_or(0),
                free_mem_mib: p.map(|p| p.free.mem_mib).unwrap_or(0),
                stopping: stopping.contains(&id),
            });
        }
        // A node the operator revoked loses its seat first.
        let revoked = {
            let state = agent.shared.state();
            status.voters.iter().chain(&status.learners).copied().find(|id| state.pki.revoked.contains(id))
        };
        let planned = match revoked {
            Some(id) if id != agent.id => Some(VoterChange::Remove(id)),
            _ => policy::plan_voters(&members, agent.id, agent.config.dead_voter_timeout),
        };
        // A leader going down changes no membership: it hands over first.
        let planned = planned.filter(|_| !agent.is_stopping());
        let change = match planned {
            Some(VoterChange::AddLearner(id)) => info.get(&id).map(|p| {
                MembershipChange::AddLearner(NodeRecord {
                    id,
                    raft_addr: p.raft_addr.clone(),
                    api_addr: p.api_addr.clone(),
                    labels: p.labels.clone(),
                    capacity: p.capacity,
                })
            }),
            Some(VoterChange::Promote(id)) => Some(MembershipChange::Promote(id)),
            Some(VoterChange::Remove(id)) => Some(MembershipChange::Remove(id)),
            None => None,
        };
        if let Some(change) = change {
            let _ = agent.inbox.try_send(Input::Membership(change));
        } else if agent.is_stopping() || leading_since.is_some_and(|t| now - t >= LEADER_SETTLE) {
            if let Some(to) = policy::preferred_leader(&members, agent.id) {
                let _ = agent.inbox.try_send(Input::TransferLeader(to));
                leading_since = None;
            }
        }
    }
}

/// The bootstrapping node makes the cluster CA, issues its own certificate and serves with it;
/// the CA (its key sealed with the secret) and this node's identity go into the first state.
fn found_ca(agent: &Agent, cluster_id: &str) -> anyhow::Result<Pki> {
    let ca = pki::new_ca(cluster_id)?;
    let key = agent.tls.node_key();
    let cert = pki::issue(&ca.cert_pem, &ca.key_pem, agent.id, &pki::csr_der(agent.id, key)?, &agent.tls.cert_ips())?;
    let identity =
        Identity { node: agent.id, ca_pem: ca.cert_pem.clone(), cert_pem: cert, key_pem: key.serialize_pem() };
    let key_hash = identity.key_hash()?;
    agent.tls.install(identity, &agent.config.secret)?;
    Ok(Pki {
        ca_cert: ca.cert_pem,
        ca_key_sealed: pki::seal_ca_key(&agent.config.secret, cluster_id, &ca.key_pem),
        identities: [(agent.id, key_hash)].into(),
        revoked: Default::default(),
    })
}

/// Asks the member whose API is at `api_addr` for this node's certificate, and installs it.
async fn join(agent: Arc<Agent>, api_addr: String) {
    let req = match super::join::request(&agent.config.secret, agent.id, agent.tls.node_key(), &agent.tls.cert_ips()) {
        Ok(r) => r,
        Err(e) => return tracing::error!(error = %format!("{e:#}"), "cannot make the join request"),
    };
    let body = serde_json::to_vec(&req).unwrap_or_default();
    let config = Arc::new(super::join::AnyServer::client_config());
    let res = crate::peer::post(&api_addr, "/v1/cluster/join", "", body.into(), &config).await;
    let res = match res {
        Ok(r) => r,
        Err(e) => return tracing::debug!(%api_addr, error = %e, "join request failed"),
    };
    let status = res.status();
    let bytes = match http_body_util::BodyExt::collect(res.into_body()).await {
        Ok(b) => b.to_bytes(),
        Err(e) => return tracing::debug!(%api_addr, error = %e, "join answer lost"),
    };
    if !status.is_success() {
        let why = String::from_utf8_lossy(&bytes);
        return tracing::warn!(%api_addr, %status, answer = %why, "join refused");
    }
    let accepted = serde_json::from_slice(&bytes)
        .map_err(anyhow::Error::from)
        .and_then(|ans| super::join::accept(&agent.config.secret, agent.id, agent.tls.node_key(), &req, ans))
        .and_then(|identity| agent.tls.install(identity, &agent.config.secret));
    match accepted {
        Ok(()) => info!(%api_addr, "received this node's certificate from the cluster CA"),
        Err(e) => tracing::warn!(%api_addr, error = %format!("{e:#}"), "join answer refused"),
    }
}
