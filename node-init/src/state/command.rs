//! What the Raft log carries: one versioned [`LogEntry`] per entry, holding one [`Command`].
//! Commands state intent; the state machine validates them when it applies them, the same way on
//! every node.
//!
//! Every entry names its format. A node that reads an entry it cannot decode, or one of a newer
//! format than it knows, must stop (applying around it would let it silently diverge from the
//! others): [`decode`] tells those cases apart so the caller can say which. The cluster-wide
//! format in the state gates commands of a newer format until every voter knows them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::kv::Op;
use super::objects::{DeploymentSpec, InstanceState, Millis, NodeSpec, Resources, TenantSpec};

/// The newest entry format this binary reads and writes.
pub const BINARY_FORMAT: u32 = 4;
/// Format 1: the keyed store, cluster settings and node records (the first release).
pub const FORMAT_KV: u32 = 1;
/// Format 2: typed workloads (tenants, images, deployments, instances, scheduling).
pub const FORMAT_WORKLOADS: u32 = 2;
/// Format 3: node identities (the cluster CA's certificates, registered per node id).
pub const FORMAT_IDENTITY: u32 = 3;
/// Format 4: the cluster network (node subnets, tenant VNIs, instance addresses), allocated
/// when instances are placed.
pub const FORMAT_NETWORK: u32 = 4;

/// One Raft log entry. `origin`, `boot` and `seq` let the proposing node find its waiting
/// client when the entry is applied (`boot` is random per process start, so an entry proposed
/// before a restart never answers a client of the new process); `at_ms` is the proposer's
/// clock, the only time the state machine knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub format: u32,
    pub origin: u64,
    #[serde(default)]
    pub boot: u64,
    pub seq: u64,
    #[serde(default)]
    pub at_ms: Millis,
    pub command: Command,
}

/// The entries of the first release: a keyed-store operation without a format field.
#[derive(Debug, Deserialize)]
struct LegacyProposal {
    origin: u64,
    seq: u64,
    op: Op,
}

#[derive(Debug, Deserialize)]
struct Header {
    format: u32,
}

/// Why a committed entry cannot be applied. Either way the node must stop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "the entry has format {found}, newer than this binary knows ({BINARY_FORMAT}): upgrade shoal-node on this node"
    )]
    NewerFormat { found: u32 },
    #[error("the entry does not decode: {0}")]
    Undecodable(String),
}

pub fn encode(entry: &LogEntry) -> Vec<u8> {
    // Plain data (strings, numbers, maps with string keys) always serializes.
    serde_json::to_vec(entry).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<LogEntry, DecodeError> {
    match serde_json::from_slice::<Header>(bytes) {
        Ok(h) if h.format > BINARY_FORMAT => return Err(DecodeError::NewerFormat { found: h.format }),
        Ok(_) => {}
        Err(_) => {
            if let Ok(p) = serde_json::from_slice::<LegacyProposal>(bytes) {
                return Ok(LogEntry {
                    format: FORMAT_KV,
                    origin: p.origin,
                    boot: 0,
                    seq: p.seq,
                    at_ms: 0,
                    command: Command::Kv(p.op),
                });
            }
        }
    }
    let entry: LogEntry = serde_json::from_slice(bytes).map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    if entry.command.format() > entry.format {
        return Err(DecodeError::Undecodable(format!(
            "a {} command in an entry of format {}",
            entry.command.name(),
            entry.format
        )));
    }
    Ok(entry)
}

/// Where the scheduler puts one pending instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub tenant: String,
    pub id: String,
    pub node: u64,
}

/// Why an instance stays pending (recorded only when it changes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReason {
    pub tenant: String,
    pub id: String,
    pub reason: String,
}

/// An instance stopped to make room for a higher-priority one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preemption {
    pub tenant: String,
    pub id: String,
    pub node: u64,
    /// The pending instance the room is for.
    pub for_tenant: String,
    pub for_id: String,
}

/// One round of the leader's scheduler. `term` and `revision` are what it decided on: a
/// decision from a deposed leader (a newer term has committed entries) is refused whole, and
/// an instance changed since `revision` is left for the next round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub term: u64,
    pub revision: u64,
    #[serde(default)]
    pub assignments: Vec<Assignment>,
    #[serde(default)]
    pub pending: Vec<PendingReason>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preemptions: Vec<Preemption>,
}

/// What a node saw its instance do. Sent only when something changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    pub node: u64,
    pub tenant: String,
    pub id: String,
    pub state: InstanceState,
    pub restarts: u32,
    pub last_exit_code: Option<i32>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub started_at: Option<Millis>,
    #[serde(default)]
    pub finished_at: Option<Millis>,
}

// A command is built, moved into one log entry and applied once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// A keyed-store write (users' data and cluster settings).
    Kv(Op),
    /// Raises the cluster-wide format (the leader does, once every voter knows it).
    SetFormat {
        format: u32,
    },
    /// Registers the key a node's certificate is issued for (the SHA-256 of its public key,
    /// hex). One key per node id, ever; a removed node's id is never registered again.
    RegisterIdentity {
        node: u64,
        key: String,
    },
    /// The operator removes a node from the cluster for good: its certificate opens no more
    /// connections, the leader takes its Raft seat, and its id is never registered again.
    RevokeNode {
        node: u64,
    },
    /// A node's own labels, capacity and addresses.
    NodeUpdate {
        node: u64,
        api_addr: String,
        raft_addr: String,
        labels: BTreeMap<String, String>,
        capacity: Resources,
    },
    Cordon {
        node: u64,
        cordoned: bool,
    },
    /// The operator's labels and the taints of a node.
    SetNodeSpec {
        node: u64,
        spec: NodeSpec,
    },
    /// Starts (or, false, stops) draining a node: it is cordoned and its instances moved off.
    Drain {
        node: u64,
        drain: bool,
    },
    /// The leader moves an instance off its node (a drain, or a no_execute taint it does not
    /// tolerate): it is stopped there and replaced elsewhere. With `budget`, only within its
    /// deployment's disruption budget.
    Evict {
        tenant: String,
        id: String,
        node: u64,
        reason: String,
        budget: bool,
        term: u64,
    },
    PutTenant {
        name: String,
        spec: TenantSpec,
        prev_revision: Option<u64>,
    },
    DeleteTenant {
        name: String,
    },
    AddTenantToken {
        tenant: String,
        id: String,
        sha256: String,
    },
    /// A node holds a verified blob: registers the image if new and records the holder.
    ImageStored {
        digest: String,
        size: u64,
        node: u64,
        tenant: Option<String>,
    },
    /// A node dropped its copy.
    ImageDropped {
        digest: String,
        node: u64,
    },
    DeleteImage {
        digest: String,
    },
    PutDeployment {
        tenant: String,
        name: String,
        spec: DeploymentSpec,
        prev_revision: Option<u64>,
    },
    DeleteDeployment {
        tenant: String,
        name: String,
    },
    Schedule(Schedule),
    InstanceReport(InstanceReport),
    /// A node stopped an instance it was told to stop (or no longer owns) and removed it.
    InstanceStopped {
        node: u64,
        tenant: String,
        id: String,
    },
    /// The leader's verdict on a node gossip has called dead past the grace period.
    NodeLost {
        node: u64,
        term: u64,
        reason: String,
    },
}

impl Command {
    /// The entry format that introduced this command.
    pub fn format(&self) -> u32 {
        match self {
            Command::Kv(_) | Command::SetFormat { .. } => FORMAT_KV,
            Command::RegisterIdentity { .. } | Command::RevokeNode { .. } => FORMAT_IDENTITY,
            _ => FORMAT_WORKLOADS,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Kv(_) => "kv",
            Command::SetFormat { .. } => "set_format",
            Command::RegisterIdentity { .. } => "register_identity",
            Command::RevokeNode { .. } => "revoke_node",
            Command::NodeUpdate { .. } => "node_update",
            Command::Cordon { .. } => "cordon",
            Command::SetNodeSpec { .. } => "set_node_spec",
            Command::Drain { .. } => "drain",
            Command::Evict { .. } => "evict",
            Command::PutTenant { .. } => "put_tenant",
            Command::DeleteTenant { .. } => "delete_tenant",
            Command::AddTenantToken { .. } => "add_tenant_token",
            Command::ImageStored { .. } => "image_stored",
            Command::ImageDropped { .. } => "image_dropped",
            Command::DeleteImage { .. } => "delete_image",
            Command::PutDeployment { .. } => "put_deployment",
            Command::DeleteDeployment { .. } => "delete_deployment",
            Command::Schedule(_) => "schedule",
            Command::InstanceReport(_) => "instance_report",
            Command::InstanceStopped { .. } => "instance_stopped",
            Command::NodeLost { .. } => "node_lost",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(command: Command) -> LogEntry {
        LogEntry { format: command.format(), origin: 1, boot: 2, seq: 3, at_ms: 4, command }
    }

    #[test]
    fn entries_round_trip() {
        let e = entry(Command::DeleteTenant { name: "acme".into() });
        assert_eq!(decode(&encode(&e)), Ok(e));
        let e = entry(Command::Kv(Op::Put { key: "k".into(), value: "v".into(), prev_revision: None }));
        assert_eq!(decode(&encode(&e)), Ok(e));
    }

    #[test]
    fn first_release_entries_still_decode() {
        let legacy = br#"{"origin":7,"seq":9,"op":{"Put":{"key":"a","value":"b","prev_revision":null}}}"#;
        let e = decode(legacy).unwrap();
        assert_eq!((e.format, e.origin, e.seq), (FORMAT_KV, 7, 9));
        assert_eq!(e.command, Command::Kv(Op::Put { key: "a".into(), value: "b".into(), prev_revision: None }));
    }

    #[test]
    fn newer_and_garbage_entries_are_told_apart() {
        let newer = format!(r#"{{"format":{},"origin":1,"seq":1,"command":{{"teleport":{{}}}}}}"#, BINARY_FORMAT + 1);
        assert_eq!(decode(newer.as_bytes()), Err(DecodeError::NewerFormat { found: BINARY_FORMAT + 1 }));
        assert!(matches!(decode(b"\x00\x01garbage"), Err(DecodeError::Undecodable(_))));
        let unknown = br#"{"format":2,"origin":1,"seq":1,"command":{"teleport":{}}}"#;
        assert!(matches!(decode(unknown), Err(DecodeError::Undecodable(_))));
        // A workload command claiming the first format is inconsistent, not silently applied.
        let mislabeled = br#"{"format":1,"origin":1,"seq":1,"command":{"delete_tenant":{"name":"a"}}}"#;
        assert!(matches!(decode(mislabeled), Err(DecodeError::Undecodable(_))));
    }
}
