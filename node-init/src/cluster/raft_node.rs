//! The Raft thread: drives the [`RaftCore`] (raft-rs' `RawNode`, its durable store and the state
//! machine) with the real clock, a bounded inbox and the TLS transport. Everything else talks to
//! it through [`Input`] and reads what it publishes in [`Shared`].
//!
//! Writes: any node proposes; raft-rs forwards a follower's proposal to the leader; the proposer
//! answers its client when the entry is applied locally. Linearizable reads use ReadIndex: the
//! client is answered once the local state machine has applied the index the leader confirmed.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use raft::eraftpb::Message;
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

use super::raft_core::{CoreParts, RaftCore};
use super::storage::RaftStore;
use super::transport::{AddressBook, RaftTransport};
use crate::state::command::Command;
use crate::state::{ApplyOutcome, NodeRecord, State, WatchEvent};

/// How long a client waits for its write or read before it is told the outcome is unknown.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Inputs waiting for the Raft thread at most: past it, peers' messages are shed (Raft resends)
/// and clients are told to retry, so a flood cannot grow the node's memory without bound.
pub const INBOX_LEN: usize = 8192;

/// The sending side of the Raft thread's bounded inbox.
pub type InboxSender = SyncSender<Input>;

/// The Raft thread's inbox.
pub fn inbox() -> (InboxSender, Receiver<Input>) {
    std::sync::mpsc::sync_channel(INBOX_LEN)
}

#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    pub tick: Duration,
    pub election_ticks: usize,
    /// Each election timeout is drawn from `election_ticks..max_election_ticks` (raft-rs' own
    /// random source; the simulation makes the range one value and jitters its ticks instead).
    pub max_election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Applied entries between state-machine snapshots (and log compactions).
    pub snapshot_every: u64,
    /// Entries kept before each snapshot when the log is compacted: a follower less than this far
    /// behind catches up from the log instead of receiving the whole state.
    pub log_tail: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            tick: Duration::from_millis(50),
            election_ticks: 6,
            max_election_ticks: 12,
            heartbeat_ticks: 2,
            snapshot_every: 2000,
            log_tail: 5000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no leader is known: the cluster has not formed or lost its quorum")]
    NoLeader,
    #[error("timed out; the write may or may not have been applied")]
    Timeout,
    #[error("this node is not part of a cluster yet")]
    NotMember,
    #[error("the raft thread stopped")]
    Stopped,
    #[error("the node is overloaded (its raft inbox is full); nothing was proposed")]
    Busy,
}

/// A membership change the agent asks the leader to make.
#[derive(Debug, Clone)]
pub enum MembershipChange {
    AddLearner(NodeRecord),
    Promote(u64),
    Remove(u64),
}

// Inputs are moved through a channel once each: the large variant costs nothing to speak of.
#[allow(clippy::large_enum_variant)]
pub enum Input {
    Message(Message),
    /// A snapshot message received whole; `applied` learns whether it was installed.
    Snapshot {
        msg: Message,
        applied: oneshot::Sender<bool>,
    },
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<ApplyOutcome, RequestError>>,
    },
    /// Answered once a linearizable read may be served from the local state.
    Read {
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    Membership(MembershipChange),
    /// Hand leadership to this voter (only acted on by the leader).
    TransferLeader(u64),
    Bootstrap {
        cluster_id: String,
        me: NodeRecord,
        /// The cluster CA and this node's identity.
        pki: crate::state::Pki,
    },
    Unreachable(u64),
    SnapshotStatus {
        to: u64,
        ok: bool,
    },
    Shutdown,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Message(_) => "Message",
            Input::Snapshot { .. } => "Snapshot",
            Input::Propose { .. } => "Propose",
            Input::Read { .. } => "Read",
            Input::Membership(_) => "Membership",
            Input::TransferLeader(_) => "TransferLeader",
            Input::Bootstrap { .. } => "Bootstrap",
            Input::Unreachable(_) => "Unreachable",
            Input::SnapshotStatus { .. } => "SnapshotStatus",
            Input::Shutdown => "Shutdown",
        })
    }
}

/// What the Raft thread publishes for the API and the agent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RaftStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: String,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: each peer's matched log index.
    #[serde(skip)]
    pub matched: BTreeMap<u64, u64>,
}

#[derive(Debug)]
pub struct Shared {
    pub state: RwLock<State>,
    pub status: RwLock<RaftStatus>,
    pub events: broadcast::Sender<WatchEvent>,
    /// The revision of each state installed from a snapshot: a jump no `events` describe, so
    /// watchers catch up from the new state's history (or are told they cannot).
    pub installs: broadcast::Sender<u64>,
}

impl Shared {
    pub fn new(state: State) -> Arc<Self> {
        let (events, _) = broadcast::channel(4096);
        let (installs, _) = broadcast::channel(64);
        Arc::new(Shared { state: RwLock::new(state), status: RwLock::new(RaftStatus::default()), events, installs })
    }

    pub fn status(&self) -> RaftStatus {
        self.status.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the Raft thread is built from.
pub struct RaftParts {
    pub id: u64,
    /// Election priority: the node with the most free capacity is preferred as leader.
    pub priority: i64,
    pub timing: RaftTiming,
    pub store: RaftStore,
    pub transport: RaftTransport,
    pub shared: Arc<Shared>,
    pub addrs: AddressBook,
    pub inbox: Receiver<Input>,
}

impl std::fmt::Debug for RaftParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftParts").field("id", &self.id).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RaftThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftThread").field("core", &self.core).finish_non_exhaustive()
    }
}

/// The Raft thread: drives a [`RaftCore`] with the real clock, the inbox and the transport.
pub struct RaftThread {
    core: RaftCore,
    timing: RaftTiming,
    transport: RaftTransport,
    inbox: Receiver<Input>,
}

impl RaftThread {
    /// Opens the node from its store (empty for a node that has never joined a cluster).
    pub fn new(parts: RaftParts) -> anyhow::Result<Self> {
        let RaftParts { id, priority, timing, store, transport, shared, addrs, inbox } = parts;
        let core = RaftCore::new(CoreParts {
            id,
            priority,
            timing,
            store,
            shared,
            addrs,
            boot: rand::random(),
            now: Instant::now(),
            wall_ms: crate::state::time::now_ms(),
        })?;
        Ok(RaftThread { core, timing, transport, inbox })
    }

    pub fn run(mut self) {
        let mut next_tick = Instant::now() + self.timing.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let first = self.inbox.recv_timeout(wait);
            self.core.set_clock(Instant::now(), crate::state::time::now_ms());
            match first {
                Ok(Input::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(input) => {
                    self.core.handle(input);
                    // Take whatever else is queued before the (synced) ready round.
                    while let Ok(input) = self.inbox.try_recv() {
                        if matches!(input, Input::Shutdown) {
                            return;
                        }
                        self.core.handle(input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_tick {
                self.core.tick();
                next_tick += self.timing.tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + self.timing.tick;
                }
            }
            let transport = &self.transport;
            if let Err(e) = self.core.ready(&mut |m| transport.send(m)) {
                // The store failed: continuing could acknowledge writes that are not durable.
                storage_failed(e);
            }
            if let Some(job) = self.core.take_snapshot_job() {
                // Serializing and writing a large state takes seconds: not on this thread.
                let spawned = std::thread::Builder::new().name("raft-snapshot".into()).spawn(move || {
                    if let Err(e) = job.run() {
                        storage_failed(e);
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "no thread for the state snapshot; it waits for the next one");
                }
            }
        }
    }
}

fn storage_failed(e: anyhow::Error) -> ! {
    tracing::error!(error = %format!("{e:#}"), "raft storage failed; stopping");
    std::process::exit(70);
}

/// Stops the node on a committed entry it cannot apply: going on would let its state diverge
/// from the other nodes' (they applied it). The operator upgrades or repairs the node.
pub(super) fn fatal(index: u64, what: &str) -> ! {
    tracing::error!(index, "cannot apply committed log entry {index}: {what}; stopping so as not to diverge");
    eprintln!(
        "shoal-node: cannot apply committed log entry {index}: {what}; stopping so as not to diverge from the cluster"
    );
    std::process::exit(65);
}

/// Sends an input to the Raft thread and waits for its answer.
pub async fn ask<T>(
    inbox: &InboxSender,
    make: impl FnOnce(oneshot::Sender<Result<T, RequestError>>) -> Input,
) -> Result<T, RequestError> {
    let (tx, rx) = oneshot::channel();
    inbox.try_send(make(tx)).map_err(|e| match e {
        TrySendError::Full(_) => RequestError::Busy,
        TrySendError::Disconnected(_) => RequestError::Stopped,
    })?;
    match tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_millis(500), rx).await {
        Ok(Ok(r)) => r,
        // The thread dropped the waiter at its deadline.
        Ok(Err(_)) | Err(_) => Err(RequestError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full inbox turns a client's request away at once, saying nothing was proposed.
    #[tokio::test]
    async fn a_full_inbox_answers_busy_instead_of_growing() {
        let (tx, _rx) = inbox();
        for _ in 0..INBOX_LEN {
            tx.try_send(Input::Unreachable(1)).unwrap();
        }
        let r: Result<(), RequestError> = ask(&tx, |reply| Input::Read { reply }).await;
        assert_eq!(r, Err(RequestError::Busy));
    }
}
