//! The replicated state machine, applied in log order on every node: the keyed store (users'
//! data, settings) and the typed tables (nodes, tenants, images, deployments, instances) under one
//! global revision, with the recent change history the watch streams serve and derived indexes
//! (instances per node and per deployment, usage per node and per tenant) rebuilt when a
//! snapshot loads.
//!
//! It does no I/O and reads no clock: [`State::apply`] takes a decoded [`LogEntry`] (whose
//! `at_ms` is the only time it knows) and the Raft term of its entry, so every node that applies
//! the same log holds the same state. It knows nothing else of Raft.
//!
//! Every object change gets its own revision and one [`WatchEvent`] whose key names the object
//! (`shoal/tenants/<t>`, `shoal/deployments/<t>/<name>`, `shoal/instances/<t>/<id>`,
//! `shoal/images/<digest>`, `shoal/nodes/<id>`) and whose value is the object as JSON.

pub mod command;
pub mod kv;
pub mod network;
pub mod objects;
pub mod time;
mod workloads;

#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub use command::{Command, LogEntry};
pub use kv::{KeyValue, KvStore, Op};
use objects::{Deployment, Image, Instance, Millis, Node, Resources, Tenant, Usage};

/// Keys under this prefix are written by the agent itself (settings, objects), not by clients
/// through the keyed store API.
pub const RESERVED_PREFIX: &str = "shoal/";
/// Cluster settings: `shoal/settings/<name>`.
pub const SETTINGS_PREFIX: &str = "shoal/settings/";
pub const NODES_PREFIX: &str = "shoal/nodes/";
pub const TENANTS_PREFIX: &str = "shoal/tenants/";
pub const IMAGES_PREFIX: &str = "shoal/images/";
pub const DEPLOYMENTS_PREFIX: &str = "shoal/deployments/";
pub const INSTANCES_PREFIX: &str = "shoal/instances/";
/// The event key of the cluster-wide format.
pub const FORMAT_KEY: &str = "shoal/cluster/format";
/// How many committed changes the watch history keeps (older watchers get `Compacted`).
pub const HISTORY_LEN: usize = 10_000;

/// What a client learns when its command is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyOutcome {
    /// The change took effect; the state is at this revision.
    Applied { revision: u64 },
    /// A conditional write whose condition did not hold; nothing changed.
    Conflict { current_revision: Option<u64> },
    /// Delete of a key or object that does not exist; nothing changed.
    NotFound,
    /// The command is refused; nothing changed.
    Rejected { kind: RejectKind, reason: String },
}

/// Why a command was refused, as the API answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectKind {
    /// Malformed (400).
    Invalid,
    /// Names an object that does not exist (404).
    NotFound,
    /// Conflicts with the current state (409).
    Conflict,
    /// Well-formed but cannot be honoured: over quota, unknown image, fits no node (422).
    Unprocessable,
    /// Needs a cluster format that not every voter knows yet (503: retry after the upgrade).
    Unsupported,
    /// A decision made on a view that is no longer current (a deposed leader's).
    Stale,
}

pub fn reject(kind: RejectKind, reason: impl Into<String>) -> ApplyOutcome {
    ApplyOutcome::Rejected { kind, reason: reason.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Put,
    Delete,
}

/// One committed change, as the watch streams deliver it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: u64,
    pub kind: EventKind,
    pub key: String,
    /// The new value (an object's JSON for typed objects; empty for deletes).
    pub value: String,
}

/// A node as Raft admits it (the context of its AddLearner change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capacity: Resources,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("revision {requested} is compacted; the oldest revision still watchable is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
    #[error("state snapshot is unreadable: {0}")]
    BadSnapshot(String),
}

pub type InstanceKey = (String, String);

/// Derived from the tables; never serialized, rebuilt when a snapshot loads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Indexes {
    /// Every instance assigned to a node, whatever its state.
    pub node_instances: BTreeMap<u64, BTreeSet<InstanceKey>>,
    /// Resources held on each node by its active instances.
    pub node_allocated: BTreeMap<u64, Resources>,
    /// What each tenant's active instances take.
    pub tenant_usage: BTreeMap<String, Usage>,
    /// Instance ids of each deployment.
    pub deployment_instances: BTreeMap<InstanceKey, BTreeSet<String>>,
    /// Active instances waiting for a node: highest priority first, then in creation order.
    pub unassigned: BTreeSet<(std::cmp::Reverse<i32>, u64, InstanceKey)>,
    /// Active instances of each deployment per node.
    pub deployment_nodes: BTreeMap<InstanceKey, BTreeMap<u64, u32>>,
    /// Active instances on nodes, by priority (whether anything could be preempted at all).
    pub priorities: BTreeMap<i32, u64>,
    /// How many deployment templates and instances name each image.
    pub image_refs: BTreeMap<String, u64>,
    /// Tenant token hashes.
    pub tokens: BTreeMap<String, String>,
}

/// The cluster's certificate authority and the node identities it vouches for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pki {
    /// The CA certificate (PEM), created when the cluster bootstrapped.
    #[serde(default)]
    pub ca_cert: String,
    /// The CA's private key, sealed with a key derived from the cluster secret (hex): a copy of
    /// the log or a snapshot does not give away the CA without the secret.
    #[serde(default)]
    pub ca_key_sealed: String,
    /// Node id to the SHA-256 (hex) of the public key its certificate was issued for.
    #[serde(default)]
    pub identities: BTreeMap<u64, String>,
    /// Nodes the operator removed (`DELETE /v1/nodes/{id}`): their certificates are refused,
    /// their ids never reissued. (A node the leader drops from Raft after it stayed dead keeps
    /// its identity and is readmitted when it comes back.)
    #[serde(default)]
    pub revoked: BTreeSet<u64>,
}

impl Pki {
    /// Whether a peer presenting a certificate for `node` with public key hash `key` may speak.
    pub fn admits(&self, node: u64, key: &str) -> bool {
        !self.revoked.contains(&node) && self.identities.get(&node).is_none_or(|k| k == key)
    }
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Identity of the cluster this state belongs to; set once at bootstrap.
    pub cluster_id: String,
    /// Revision of the last change (0: nothing written yet).
    pub revision: u64,
    /// The cluster-wide entry format: commands of newer formats are refused until it is raised.
    pub format: u32,
    /// The highest Raft term of any applied entry.
    pub max_term: u64,
    /// The latest proposer time of any applied command: the time of changes that come from Raft
    /// itself (membership), which carry none.
    pub last_at: Millis,
    kv: KvStore,
    /// The last [`HISTORY_LEN`] changes, oldest first.
    history: VecDeque<WatchEvent>,
    pub nodes: BTreeMap<u64, Node>,
    pub tenants: BTreeMap<String, Tenant>,
    pub images: BTreeMap<String, Image>,
    pub deployments: BTreeMap<InstanceKey, Deployment>,
    pub instances: BTreeMap<InstanceKey, Instance>,
    /// Never shown by the API: the CA key is in here (sealed).
    pub pki: Pki,
    pub index: Indexes,
    /// Changes of the command being applied, handed to the caller.
    events: Vec<WatchEvent>,
    /// Deployments and images whose derived fields must be settled before the command ends.
    dirty_deployments: BTreeSet<InstanceKey>,
    dirty_images: BTreeSet<String>,
}

impl Default for State {
    fn default() -> Self {
        State::new("")
    }
}

/// What a state snapshot holds (indexes are rebuilt, not stored).
#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// Tells this layout from the first release's keyed-store snapshot.
    layout: u32,
    cluster_id: String,
    revision: u64,
    format: u32,
    max_term: u64,
    #[serde(default)]
    last_at: Millis,
    kv: KvStore,
    history: VecDeque<WatchEvent>,
    nodes: Vec<Node>,
    tenants: Vec<Tenant>,
    images: Vec<Image>,
    deployments: Vec<Deployment>,
    instances: Vec<Instance>,
    #[serde(default)]
    pki: Pki,
}

const SNAPSHOT_LAYOUT: u32 = 2;

/// The first release's snapshot: the keyed store alone, node records under `shoal/nodes/`.
#[derive(Deserialize)]
struct LegacySnapshot {
    cluster_id: String,
    revision: u64,
    data: BTreeMap<String, KeyValue>,
    history: VecDeque<WatchEvent>,
}

impl State {
    /// An empty state at the format this binary writes (a fresh cluster's).
    pub fn new(cluster_id: &str) -> Self {
        State {
            cluster_id: cluster_id.to_string(),
            revision: 0,
            format: command::BINARY_FORMAT,
            max_term: 0,
            last_at: 0,
            kv: KvStore::default(),
            history: VecDeque::new(),
            nodes: BTreeMap::new(),
            tenants: BTreeMap::new(),
            images: BTreeMap::new(),
            deployments: BTreeMap::new(),
            instances: BTreeMap::new(),
            pki: Pki::default(),
            index: Indexes::default(),
            events: Vec::new(),
            dirty_deployments: BTreeSet::new(),
            dirty_images: BTreeSet::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.kv.get(key)
    }

    /// Keys starting with `prefix`, in key order.
    pub fn range<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeyValue> + 'a {
        self.kv.range(prefix)
    }

    /// A cluster setting's value, if set.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.kv.get(&format!("{SETTINGS_PREFIX}{name}")).map(|kv| kv.value.as_str())
    }

    /// Notes the term of an applied entry that carries no command (a new leader's empty entry).
    pub fn observe_term(&mut self, term: u64) {
        self.max_term = self.max_term.max(term);
    }

    /// Applies one committed entry of Raft term `term`; returns the outcome and the changes it made.
    pub fn apply(&mut self, entry: &LogEntry, term: u64) -> (ApplyOutcome, Vec<WatchEvent>) {
        self.observe_term(term);
        self.last_at = self.last_at.max(entry.at_ms);
        self.events.clear();
        let command = &entry.command;
        let outcome = if command.format() > self.format {
            reject(
                RejectKind::Unsupported,
                format!(
                    "the cluster runs entry format {}; {} needs format {}, which every voter must know first",
                    self.format,
                    command.name(),
                    command.format()
                ),
            )
        } else {
            self.apply_command(command, entry.at_ms)
        };
        self.settle(entry.at_ms);
        let events = std::mem::take(&mut self.events);
        let outcome = match outcome {
            ApplyOutcome::Applied { .. } => ApplyOutcome::Applied { revision: self.revision },
            other => other,
        };
        (outcome, events)
    }

    fn apply_command(&mut self, command: &Command, at: Millis) -> ApplyOutcome {
        match command {
            Command::Kv(op) => self.apply_kv(op),
            Command::RegisterIdentity { node, key } => self.register_identity(*node, key),
            Command::RevokeNode { node } => {
                if !self.pki.identities.contains_key(node) && !self.nodes.contains_key(node) {
                    return ApplyOutcome::NotFound;
                }
                self.pki.revoked.insert(*node);
                ApplyOutcome::Applied { revision: self.revision }
            }
            Command::SetFormat { format } => {
                if *format > self.format && *format <= command::BINARY_FORMAT {
                    self.format = *format;
                    let value = format.to_string();
                    self.emit_put(FORMAT_KEY.to_string(), value);
                }
                ApplyOutcome::Applied { revision: self.revision }
            }
            other => self.apply_workload(other, at),
        }
    }

    /// One key per node id; the same key again is a retry and succeeds.
    fn register_identity(&mut self, node: u64, key: &str) -> ApplyOutcome {
        if node == 0 || key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            return reject(RejectKind::Invalid, "an identity is a node id and a 64-digit key hash");
        }
        if self.pki.revoked.contains(&node) {
            return reject(
                RejectKind::Conflict,
                format!("node {node:016x} was removed from the cluster; start it with a fresh data directory"),
            );
        }
        match self.pki.identities.get(&node) {
            Some(k) if k == key => {}
            Some(_) => {
                return reject(
                    RejectKind::Conflict,
                    format!("node {node:016x} already has a certificate for another key"),
                )
            }
            None => {
                self.pki.identities.insert(node, key.to_string());
            }
        }
        ApplyOutcome::Applied { revision: self.revision }
    }

    fn apply_kv(&mut self, op: &Op) -> ApplyOutcome {
        match op {
            Op::Put { key, value, prev_revision } => {
                let current = self.kv.get(key).map(|kv| kv.mod_revision);
                if let Some(expected) = prev_revision {
                    if current.unwrap_or(0) != *expected {
                        return ApplyOutcome::Conflict { current_revision: current };
                    }
                }
                let revision = self.bump();
                self.kv.put(key, value, revision);
                self.record(WatchEvent { revision, kind: EventKind::Put, key: key.clone(), value: value.clone() });
                ApplyOutcome::Applied { revision }
            }
            Op::Delete { key, prev_revision } => {
                let Some(current) = self.kv.get(key).map(|kv| kv.mod_revision) else {
                    return match prev_revision {
                        Some(p) if *p != 0 => ApplyOutcome::Conflict { current_revision: None },
                        _ => ApplyOutcome::NotFound,
                    };
                };
                if let Some(expected) = prev_revision {
                    if current != *expected {
                        return ApplyOutcome::Conflict { current_revision: Some(current) };
                    }
                }
                self.kv.remove(key);
                self.emit_delete(key.clone());
                ApplyOutcome::Applied { revision: self.revision }
            }
        }
    }

    fn bump(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn record(&mut self, event: WatchEvent) {
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(event.clone());
        self.events.push(event);
    }

    /// Records a put of `key` at a new revision; returns it.
    fn emit_put(&mut self, key: String, value: String) -> u64 {
        let revision = self.bump();
        self.record(WatchEvent { revision, kind: EventKind::Put, key, value });
        revision
    }

    fn emit_delete(&mut self, key: String) -> u64 {
        let revision = self.bump();
        self.record(WatchEvent { revision, kind: EventKind::Delete, key, value: String::new() });
        revision
    }

    /// Every retained change with a revision greater than `after`, oldest first.
    pub fn changes_after(&self, after: u64) -> Result<Vec<WatchEvent>, StateError> {
        let oldest = self.history.front().map(|e| e.revision).unwrap_or(self.revision + 1);
        // Changes (after, oldest) were dropped from the history: the watcher would miss them.
        if after + 1 < oldest && after < self.revision {
            return Err(StateError::Compacted { requested: after + 1, oldest });
        }
        let start = self.history.partition_point(|e| e.revision <= after);
        Ok(self.history.iter().skip(start).cloned().collect())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let snap = Snapshot {
            layout: SNAPSHOT_LAYOUT,
            cluster_id: self.cluster_id.clone(),
            revision: self.revision,
            format: self.format,
            max_term: self.max_term,
            last_at: self.last_at,
            kv: self.kv.clone(),
            history: self.history.clone(),
            nodes: self.nodes.values().cloned().collect(),
            tenants: self.tenants.values().cloned().collect(),
            images: self.images.values().cloned().collect(),
            deployments: self.deployments.values().cloned().collect(),
            instances: self.instances.values().cloned().collect(),
            pki: self.pki.clone(),
        };
        // Plain data with string map keys always serializes.
        serde_json::to_vec(&snap).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        #[derive(Deserialize)]
        struct Layout {
            #[serde(default)]
            layout: u32,
        }
        let layout = serde_json::from_slice::<Layout>(bytes).map_err(|e| StateError::BadSnapshot(e.to_string()))?;
        let mut state = match layout.layout {
            0 => {
                let old: LegacySnapshot =
                    serde_json::from_slice(bytes).map_err(|e| StateError::BadSnapshot(e.to_string()))?;
                State::from_legacy(old)
            }
            SNAPSHOT_LAYOUT => {
                let s: Snapshot = serde_json::from_slice(bytes).map_err(|e| StateError::BadSnapshot(e.to_string()))?;
                let mut state = State::new(&s.cluster_id);
                state.revision = s.revision;
                state.format = s.format;
                state.max_term = s.max_term;
                state.last_at = s.last_at;
                state.kv = s.kv;
                state.history = s.history;
                state.nodes = s.nodes.into_iter().map(|n| (n.id, n)).collect();
                state.tenants = s.tenants.into_iter().map(|t| (t.name.clone(), t)).collect();
                state.images = s.images.into_iter().map(|i| (i.digest.clone(), i)).collect();
                state.deployments =
                    s.deployments.into_iter().map(|d| ((d.tenant.clone(), d.name.clone()), d)).collect();
                state.instances = s.instances.into_iter().map(|i| ((i.tenant.clone(), i.id.clone()), i)).collect();
                state.pki = s.pki;
                state
            }
            other => {
                return Err(StateError::BadSnapshot(format!(
                    "snapshot layout {other} is newer than this binary knows ({SNAPSHOT_LAYOUT})"
                )))
            }
        };
        state.rebuild_indexes();
        Ok(state)
    }

    /// The first release kept node records as keys; they become the nodes table, and the
    /// cluster runs the first format until the leader raises it.
    fn from_legacy(old: LegacySnapshot) -> State {
        let mut state = State::new(&old.cluster_id);
        state.format = command::FORMAT_KV;
        state.revision = old.revision;
        state.history = old.history;
        for (key, kv) in old.data {
            if key.starts_with(NODES_PREFIX) {
                if let Ok(rec) = serde_json::from_str::<NodeRecord>(&kv.value) {
                    let meta = objects::Meta {
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                        created_at: 0,
                    };
                    state.nodes.insert(rec.id, node_from_record(&rec, meta));
                }
            } else {
                state.kv.insert(kv);
            }
        }
        state
    }
}

fn node_from_record(rec: &NodeRecord, meta: objects::Meta) -> Node {
    Node {
        id: rec.id,
        raft_addr: rec.raft_addr.clone(),
        api_addr: rec.api_addr.clone(),
        labels: rec.labels.clone(),
        capacity: rec.capacity,
        cordoned: false,
        api_labels: BTreeMap::new(),
        taints: Vec::new(),
        drain: None,
        subnet: None,
        meta,
    }
}
