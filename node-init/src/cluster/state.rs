//! The replicated state machine: a keyed store with revisions (etcd's model), applied in log order on
//! every node. It owns the committed data and the recent change history the watch stream serves; it
//! does no I/O and knows nothing of Raft beyond the order in which commands arrive.
//!
//! Cluster settings and typed records live in the same store under the reserved `shoal/` prefix
//! (`shoal/settings/<name>`, `shoal/nodes/<id>`, later `shoal/tenants/`, `shoal/vms/`...), so one
//! revision counter orders every change and one watch stream carries them all.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Keys under this prefix are written by the agent itself (settings, node records), not by clients
/// through the keyed store API.
pub const RESERVED_PREFIX: &str = "shoal/";
/// Node records: `shoal/nodes/<id in hex>` holding a [`NodeRecord`] as JSON.
pub const NODES_PREFIX: &str = "shoal/nodes/";
/// Cluster settings: `shoal/settings/<name>`.
pub const SETTINGS_PREFIX: &str = "shoal/settings/";
/// How many committed changes the watch history keeps (older watchers get `Compacted`).
pub const HISTORY_LEN: usize = 10_000;

/// One command in the Raft log. `origin` and `seq` let the proposing node find its waiting client
/// when the entry is applied; every other node ignores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub origin: u64,
    pub seq: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Sets `key`. With `prev_revision`, only if the key's current `mod_revision` equals it
    /// (0: only if the key does not exist).
    Put {
        key: String,
        value: String,
        prev_revision: Option<u64>,
    },
    Delete {
        key: String,
        prev_revision: Option<u64>,
    },
}

/// What a client learns when its command is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyOutcome {
    /// The change took effect at this revision.
    Applied { revision: u64 },
    /// A conditional write whose condition did not hold; nothing changed.
    Conflict { current_revision: Option<u64> },
    /// Delete of a key that does not exist; nothing changed.
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Revision at which the key was created (since its last deletion).
    pub create_revision: u64,
    /// Revision of the last change to the key.
    pub mod_revision: u64,
    /// Number of writes since creation.
    pub version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Put,
    Delete,
}

/// One committed change, as the watch stream delivers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: u64,
    pub kind: EventKind,
    pub key: String,
    /// The new value (empty for deletes).
    pub value: String,
}

/// A node's record in the replicated state, written by the leader when it admits the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    pub raft_addr: String,
    pub api_addr: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("revision {requested} is compacted; the oldest revision still watchable is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
    #[error("state snapshot is unreadable")]
    BadSnapshot(#[source] SerdeError),
}

/// serde_json's error, wrapped so [`StateError`] can derive `PartialEq`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SerdeError(String);

impl PartialEq for SerdeError {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for SerdeError {}

/// The keyed store. Serialized whole into Raft snapshots.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvState {
    /// Identity of the cluster this state belongs to; set once at bootstrap.
    pub cluster_id: String,
    /// Revision of the last change (0: nothing written yet).
    pub revision: u64,
    data: BTreeMap<String, KeyValue>,
    /// The last [`HISTORY_LEN`] changes, oldest first.
    history: VecDeque<WatchEvent>,
}

impl KvState {
    pub fn new(cluster_id: &str) -> Self {
        KvState { cluster_id: cluster_id.to_string(), ..Default::default() }
    }

    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.data.get(key)
    }

    /// Keys starting with `prefix`, in key order.
    pub fn range<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeyValue> + 'a {
        self.data.range(prefix.to_string()..).take_while(move |(k, _)| k.starts_with(prefix)).map(|(_, v)| v)
    }

    /// The node records admitted to the cluster.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.range(NODES_PREFIX).filter_map(|kv| serde_json::from_str(&kv.value).ok()).collect()
    }

    /// Applies one command; returns the outcome and the change it made, if any.
    pub fn apply(&mut self, op: &Op) -> (ApplyOutcome, Option<WatchEvent>) {
        match op {
            Op::Put { key, value, prev_revision } => {
                let current = self.data.get(key).map(|kv| kv.mod_revision);
                if let Some(expected) = prev_revision {
                    if current.unwrap_or(0) != *expected {
                        return (ApplyOutcome::Conflict { current_revision: current }, None);
                    }
                }
                self.revision += 1;
                let revision = self.revision;
                let entry = self.data.entry(key.clone()).or_insert_with(|| KeyValue {
                    key: key.clone(),
                    value: String::new(),
                    create_revision: revision,
                    mod_revision: revision,
                    version: 0,
                });
                entry.value = value.clone();
                entry.mod_revision = revision;
                entry.version += 1;
                let event = WatchEvent { revision, kind: EventKind::Put, key: key.clone(), value: value.clone() };
                self.record(event.clone());
                (ApplyOutcome::Applied { revision }, Some(event))
            }
            Op::Delete { key, prev_revision } => {
                let Some(current) = self.data.get(key).map(|kv| kv.mod_revision) else {
                    return match prev_revision {
                        Some(p) if *p != 0 => (ApplyOutcome::Conflict { current_revision: None }, None),
                        _ => (ApplyOutcome::NotFound, None),
                    };
                };
                if let Some(expected) = prev_revision {
                    if current != *expected {
                        return (ApplyOutcome::Conflict { current_revision: Some(current) }, None);
                    }
                }
                self.data.remove(key);
                self.revision += 1;
                let event = WatchEvent {
                    revision: self.revision,
                    kind: EventKind::Delete,
                    key: key.clone(),
                    value: String::new(),
                };
                self.record(event.clone());
                (ApplyOutcome::Applied { revision: self.revision }, Some(event))
            }
        }
    }

    fn record(&mut self, event: WatchEvent) {
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(event);
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
        // A map of strings cannot fail to serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        serde_json::from_slice(bytes).map_err(|e| StateError::BadSnapshot(SerdeError(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put { key: key.into(), value: value.into(), prev_revision: None }
    }

    #[test]
    fn revisions_count_every_change_and_versions_count_writes_per_key() {
        let mut s = KvState::new("c");
        assert_eq!(s.apply(&put("a", "1")).0, ApplyOutcome::Applied { revision: 1 });
        assert_eq!(s.apply(&put("b", "1")).0, ApplyOutcome::Applied { revision: 2 });
        assert_eq!(s.apply(&put("a", "2")).0, ApplyOutcome::Applied { revision: 3 });
        let a = s.get("a").unwrap();
        assert_eq!((a.value.as_str(), a.create_revision, a.mod_revision, a.version), ("2", 1, 3, 2));
        let (outcome, event) = s.apply(&Op::Delete { key: "a".into(), prev_revision: None });
        assert_eq!(outcome, ApplyOutcome::Applied { revision: 4 });
        assert_eq!(event.unwrap().kind, EventKind::Delete);
        assert!(s.get("a").is_none());
        assert_eq!(s.apply(&Op::Delete { key: "a".into(), prev_revision: None }).0, ApplyOutcome::NotFound);
        assert_eq!(s.revision, 4);
    }

    #[test]
    fn conditional_writes_apply_only_when_the_revision_matches() {
        let mut s = KvState::new("c");
        let create = Op::Put { key: "k".into(), value: "v".into(), prev_revision: Some(0) };
        assert_eq!(s.apply(&create).0, ApplyOutcome::Applied { revision: 1 });
        assert_eq!(s.apply(&create).0, ApplyOutcome::Conflict { current_revision: Some(1) });
        let swap = Op::Put { key: "k".into(), value: "w".into(), prev_revision: Some(1) };
        assert_eq!(s.apply(&swap).0, ApplyOutcome::Applied { revision: 2 });
        let stale_delete = Op::Delete { key: "k".into(), prev_revision: Some(1) };
        assert_eq!(s.apply(&stale_delete).0, ApplyOutcome::Conflict { current_revision: Some(2) });
        assert_eq!(s.get("k").unwrap().value, "w");
        assert_eq!(s.revision, 2);
    }

    #[test]
    fn changes_after_a_revision_come_in_order_and_compacted_history_is_an_error() {
        let mut s = KvState::new("c");
        for i in 0..(HISTORY_LEN + 10) {
            s.apply(&put(&format!("k{}", i % 7), &i.to_string()));
        }
        let last = s.revision;
        let tail = s.changes_after(last - 3).unwrap();
        assert_eq!(tail.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![last - 2, last - 1, last]);
        assert!(s.changes_after(last).unwrap().is_empty());
        assert_eq!(s.changes_after(3), Err(StateError::Compacted { requested: 4, oldest: 11 }));
        assert_eq!(s.changes_after(10).unwrap().len(), HISTORY_LEN);
    }

    #[test]
    fn snapshots_round_trip_and_garbage_is_an_error() {
        let mut s = KvState::new("cluster-1");
        s.apply(&put("x", "y"));
        let back = KvState::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert!(matches!(KvState::from_bytes(b"{not json"), Err(StateError::BadSnapshot(_))));
    }

    #[test]
    fn range_lists_only_the_prefix() {
        let mut s = KvState::new("c");
        for k in ["a/1", "a/2", "b/1", "a"] {
            s.apply(&put(k, "v"));
        }
        let keys: Vec<_> = s.range("a/").map(|kv| kv.key.clone()).collect();
        assert_eq!(keys, vec!["a/1", "a/2"]);
    }
}
