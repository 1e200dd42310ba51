//! The Raft core: the raft-rs `RawNode`, its store and the state machine, with no I/O of its own.
//! It takes [`Input`]s, ticks and the time from its driver and hands the messages it must send to
//! a callback; it never reads a clock, a socket or a random source. The Raft thread
//! ([`super::raft_node::RaftThread`]) drives it with the real clock and transport; the
//! deterministic simulation (`tests/simulation.rs`) drives it with a seeded network and virtual
//! time.
//!
//! Invariants it keeps: entries and the hard state are persisted (synced, unless the store was
//! opened unsynced) before the messages that depend on them are handed out; entries are applied
//! in log order, each once; a client is answered only for an entry of this process (`origin`,
//! `boot`, `seq`) that was applied, or told the outcome is unknown; a read is answered only once
//! the local state has applied the index the leader confirmed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::raft_node::{fatal, Input, MembershipChange, RaftStatus, RaftTiming, RequestError, Shared, REQUEST_TIMEOUT};
use super::storage::RaftStore;
use super::transport::AddressBook;
use crate::state::command::{self, LogEntry};
use crate::state::objects::Millis;
use crate::state::{ApplyOutcome, NodeRecord, State, WatchEvent};

/// A read whose ReadIndex got no answer in this long is asked again.
const READ_RETRY: Duration = Duration::from_millis(150);

/// The context of a ReadIndex request: this node's id and the read's sequence number.
fn read_ctx(id: u64, seq: u64) -> Vec<u8> {
    [id.to_be_bytes(), seq.to_be_bytes()].concat()
}

fn discard_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

type WriteReply = oneshot::Sender<Result<ApplyOutcome, RequestError>>;
type ReadReply = oneshot::Sender<Result<(), RequestError>>;

/// What a core is built from.
pub struct CoreParts {
    pub id: u64,
    /// Election priority: the node with the most free capacity is preferred as leader.
    pub priority: i64,
    pub timing: RaftTiming,
    pub store: RaftStore,
    pub shared: Arc<Shared>,
    /// Where peers' Raft addresses learned from the log are written (for the transport).
    pub addrs: AddressBook,
    /// Different on every start of the process: with a sequence number, names its proposals.
    pub boot: u64,
    /// The time the core starts at.
    pub now: Instant,
    pub wall_ms: Millis,
}

impl std::fmt::Debug for CoreParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreParts").field("id", &self.id).finish_non_exhaustive()
    }
}

pub struct RaftCore {
    id: u64,
    priority: i64,
    timing: RaftTiming,
    store: RaftStore,
    node: RawNode<RaftStore>,
    shared: Arc<Shared>,
    addrs: AddressBook,
    boot: u64,
    seq: u64,
    /// The driver's clock: monotonic, and the wall clock stamped on proposals.
    now: Instant,
    wall_ms: Millis,
    /// Waiting writers: reply, deadline, and the leader the proposal went to. (Ordered maps, so
    /// a core given the same inputs does the same things in the same order.)
    proposals: BTreeMap<u64, (WriteReply, Instant, u64)>,
    /// Reads waiting for a read index: reply, deadline, when the ReadIndex was last asked
    /// (None: not yet, no leader was known).
    reads_pending: BTreeMap<u64, (ReadReply, Instant, Option<Instant>)>,
    reads_ready: Vec<(u64, ReadReply, Instant)>,
    applied: u64,
    applied_term: u64,
    /// Received snapshots waiting for the ready round that installs them (or does not).
    snapshot_acks: Vec<(u64, oneshot::Sender<bool>)>,
    /// A state snapshot for the driver to build and store, and whether one is being built.
    snapshot_job: Option<SnapshotJob>,
    snapshot_in_flight: Arc<AtomicBool>,
}

/// A state snapshot to serialize and store away from the Raft thread (a large state takes
/// seconds to write): the state as applied at `index`, copied. raft-rs goes on meanwhile; the
/// store takes the snapshot and compacts its log when the job is done, unless a newer snapshot
/// arrived from the leader first.
pub struct SnapshotJob {
    index: u64,
    term: u64,
    conf_state: ConfState,
    state: State,
    log_tail: u64,
    store: RaftStore,
    in_flight: Arc<AtomicBool>,
}

impl std::fmt::Debug for SnapshotJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotJob").field("index", &self.index).finish_non_exhaustive()
    }
}

impl SnapshotJob {
    /// Serializes the state and stores it; an error is the store's (the caller stops the node).
    pub fn run(self) -> anyhow::Result<()> {
        let started = Instant::now();
        let data = self.state.to_bytes();
        let bytes = data.len();
        self.store.compact(self.index, self.term, &self.conf_state, data, self.log_tail)?;
        info!(
            index = self.index,
            bytes,
            ms = started.elapsed().as_millis() as u64,
            "state snapshot taken; log compacted"
        );
        Ok(())
    }
}

impl Drop for SnapshotJob {
    fn drop(&mut self) {
        self.in_flight.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for RaftCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftCore").field("id", &self.id).field("applied", &self.applied).finish_non_exhaustive()
    }
}

fn new_raw_node(
    id: u64,
    priority: i64,
    timing: &RaftTiming,
    store: &RaftStore,
    applied: u64,
) -> raft::Result<RawNode<RaftStore>> {
    let cfg = raft::Config {
        id,
        election_tick: timing.election_ticks,
        heartbeat_tick: timing.heartbeat_ticks,
        max_election_tick: timing.max_election_ticks,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        priority,
        ..Default::default()
    };
    RawNode::new(&cfg, store.clone(), &discard_logger())
}

impl RaftCore {
    /// Opens the node from its store (empty for a node that has never joined a cluster).
    pub fn new(parts: CoreParts) -> anyhow::Result<Self> {
        let CoreParts { id, priority, timing, store, shared, addrs, boot, now, wall_ms } = parts;
        let snap = store.latest_snapshot();
        let applied = snap.get_metadata().index;
        if applied > 0 {
            let state = State::from_bytes(snap.get_data())?;
            *shared.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        }
        let node = new_raw_node(id, priority, &timing, &store, applied)?;
        let core = RaftCore {
            id,
            priority,
            timing,
            store,
            node,
            shared,
            addrs,
            boot,
            seq: 0,
            now,
            wall_ms,
            proposals: BTreeMap::new(),
            reads_pending: BTreeMap::new(),
            reads_ready: Vec::new(),
            applied,
            applied_term: snap.get_metadata().term,
            snapshot_acks: Vec::new(),
            snapshot_job: None,
            snapshot_in_flight: Arc::default(),
        };
        core.learn_addresses();
        core.publish_status();
        Ok(core)
    }

    /// Moves the core's clock (the driver's, real or simulated).
    pub fn set_clock(&mut self, now: Instant, wall_ms: Millis) {
        self.now = now;
        self.wall_ms = wall_ms;
    }

    /// The index of the last entry applied to the state.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    fn learn_addresses(&self) {
        let nodes: Vec<(u64, String)> =
            self.shared.state().nodes.values().map(|n| (n.id, n.raft_addr.clone())).collect();
        let mut book = self.addrs.write().unwrap_or_else(|e| e.into_inner());
        for (id, raft_addr) in nodes {
            if let Ok(a) = raft_addr.parse() {
                book.entry(id).or_insert(a);
            }
        }
    }

    /// One Raft tick: elections and heartbeats are counted in these; expired requests are
    /// answered and unanswered reads asked again.
    pub fn tick(&mut self) {
        self.node.tick();
        self.expire();
        self.retry_reads();
    }

    pub fn handle(&mut self, input: Input) {
        match input {
            Input::Message(m) => {
                if let Err(e) = self.node.step(m) {
                    tracing::debug!(error = %e, "raft message ignored");
                }
            }
            Input::Snapshot { msg, applied } => {
                let index = msg.get_snapshot().get_metadata().index;
                if let Err(e) = self.node.step(msg) {
                    tracing::debug!(error = %e, "raft snapshot ignored");
                }
                self.snapshot_acks.push((index, applied));
            }
            Input::Propose { command, reply } => {
                if self.store.is_empty() {
                    let _ = reply.send(Err(RequestError::NotMember));
                    return;
                }
                self.seq += 1;
                let entry = LogEntry {
                    format: command.format(),
                    origin: self.id,
                    boot: self.boot,
                    seq: self.seq,
                    at_ms: self.wall_ms,
                    command,
                };
                let data = command::encode(&entry);
                match self.node.propose(vec![], data) {
                    Ok(()) => {
                        self.proposals.insert(self.seq, (reply, self.now + REQUEST_TIMEOUT, self.node.raft.leader_id));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(RequestError::NoLeader));
                    }
                }
            }
            Input::Read { reply } => {
                if self.store.is_empty() {
                    let _ = reply.send(Err(RequestError::NotMember));
                    return;
                }
                // Without a leader (an election), or with a new leader that drops ReadIndex until
                // it has committed in its term, the read waits and is asked again (`retry_reads`)
                // until its deadline: a read is safe to repeat, so clients need not see the gap.
                self.seq += 1;
                let asked = (self.node.raft.leader_id != 0).then(|| {
                    self.node.read_index(read_ctx(self.id, self.seq));
                    self.now
                });
                self.reads_pending.insert(self.seq, (reply, self.now + REQUEST_TIMEOUT, asked));
            }
            Input::Membership(change) => self.propose_membership(change),
            Input::TransferLeader(to) => {
                if self.node.raft.state == StateRole::Leader && self.node.raft.lead_transferee.is_none() {
                    info!(to = %format!("{to:016x}"), "handing leadership to the voter with the most free capacity");
                    self.node.transfer_leader(to);
                }
            }
            Input::Bootstrap { cluster_id, me, pki } => {
                if let Err(e) = self.bootstrap(&cluster_id, me, pki) {
                    warn!(error = %format!("{e:#}"), "bootstrap failed");
                }
            }
            Input::Unreachable(id) => self.node.report_unreachable(id),
            Input::SnapshotStatus { to, ok } => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.node.report_snapshot(to, status);
            }
            Input::Shutdown => {}
        }
    }

    /// Starts a one-voter cluster from an initial snapshot at index 1 holding the cluster identity
    /// and this node's record; later nodes receive that snapshot and learn both from it.
    fn bootstrap(&mut self, cluster_id: &str, me: NodeRecord, pki: crate::state::Pki) -> anyhow::Result<()> {
        if !self.store.is_empty() {
            return Ok(());
        }
        let mut state = State::new(cluster_id);
        state.pki = pki;
        state.admit_node(&me, self.wall_ms);
        let mut snap = Snapshot::default();
        snap.set_data(state.to_bytes().into());
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = vec![self.id];
        self.store.apply_snapshot(&snap)?;
        *self.shared.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        self.applied = 1;
        self.applied_term = 1;
        self.node = new_raw_node(self.id, self.priority, &self.timing, &self.store, 1)?;
        self.node.campaign()?;
        info!(cluster_id, node = %format!("{:016x}", self.id), "bootstrapped a new cluster");
        Ok(())
    }

    fn propose_membership(&mut self, change: MembershipChange) {
        if self.node.raft.state != StateRole::Leader || self.node.raft.has_pending_conf() {
            return;
        }
        let mut cc = ConfChange::default();
        let mut context = Vec::new();
        match change {
            MembershipChange::AddLearner(rec) => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = rec.id;
                context = serde_json::to_vec(&rec).unwrap_or_default();
            }
            MembershipChange::Promote(id) => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = id;
            }
            MembershipChange::Remove(id) => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = id;
            }
        }
        info!(change = ?cc.get_change_type(), node = %format!("{:016x}", cc.node_id), "proposing membership change");
        if let Err(e) = self.node.propose_conf_change(context, cc) {
            warn!(error = %e, "membership change not proposed");
        }
    }

    /// Asks again for the read index of reads that got none within `READ_RETRY` (a new
    /// leader drops ReadIndex until it commits in its term; a message can be lost).
    fn retry_reads(&mut self) {
        if self.node.raft.leader_id == 0 {
            return;
        }
        let now = self.now;
        let due: Vec<u64> = self
            .reads_pending
            .iter()
            .filter(|(_, (_, _, asked))| asked.is_none_or(|t| now.duration_since(t) >= READ_RETRY))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in due {
            self.node.read_index(read_ctx(self.id, seq));
            if let Some(r) = self.reads_pending.get_mut(&seq) {
                r.2 = Some(now);
            }
        }
    }

    fn expire(&mut self) {
        let now = self.now;
        self.proposals.retain(|_, (_, deadline, _)| *deadline > now);
        // A read past its deadline changed nothing: say so (NoLeader: safe to retry).
        let expired: Vec<u64> =
            self.reads_pending.iter().filter(|(_, (_, d, _))| *d <= now).map(|(seq, _)| *seq).collect();
        for seq in expired {
            if let Some((reply, _, _)) = self.reads_pending.remove(&seq) {
                let _ = reply.send(Err(RequestError::NoLeader));
            }
        }
        self.reads_ready.retain(|(_, _, deadline)| *deadline > now);
        // Dropping a sender answers its waiter with `Timeout` (see the API).
    }

    /// One ready round: persists what raft-rs asks, hands out its messages through `send` (those
    /// that must wait for the round's writes only after them), applies committed entries,
    /// answers clients and publishes the status. An error is the store's: the caller must stop
    /// (going on could acknowledge writes that are not durable).
    pub fn ready(&mut self, send: &mut dyn FnMut(Message)) -> anyhow::Result<()> {
        let result = self.ready_round(send);
        // The ready round after a snapshot arrived installs it, if raft-rs took it: answer
        // the sender now, yes when this node has applied at least the snapshot's index.
        for (index, applied) in self.snapshot_acks.drain(..) {
            let _ = applied.send(result.is_ok() && self.applied >= index);
        }
        self.publish_status();
        result
    }

    fn ready_round(&mut self, send: &mut dyn FnMut(Message)) -> anyhow::Result<()> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        // A leader's appends may travel while it writes its own copy.
        ready.take_messages().into_iter().for_each(&mut *send);
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.apply_snapshot(&snap)?;
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        let hs = ready.hs().cloned();
        if !ready.entries().is_empty() || hs.is_some() {
            self.store.append(ready.entries(), hs.as_ref())?;
        }
        ready.take_persisted_messages().into_iter().for_each(&mut *send);
        for rs in ready.take_read_states() {
            let ctx = rs.request_ctx;
            if ctx.len() == 16 && ctx[..8] == self.id.to_be_bytes() {
                let seq = u64::from_be_bytes(ctx[8..16].try_into().unwrap_or_default());
                if let Some((reply, deadline, _)) = self.reads_pending.remove(&seq) {
                    self.reads_ready.push((rs.index, reply, deadline));
                }
            }
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit)?;
        }
        light.take_messages().into_iter().for_each(&mut *send);
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.node.advance_apply();
        self.answer_reads();
        self.abandon_orphaned_proposals();
        self.maybe_compact();
        Ok(())
    }

    fn apply_snapshot(&mut self, snap: &Snapshot) -> anyhow::Result<()> {
        let state = State::from_bytes(snap.get_data())?;
        self.store.apply_snapshot(snap)?;
        let meta = snap.get_metadata();
        self.applied = meta.index;
        self.applied_term = meta.term;
        info!(index = meta.index, bytes = snap.get_data().len(), cluster_id = %state.cluster_id, revision = state.revision, "installed snapshot");
        let revision = state.revision;
        *self.shared.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        let _ = self.shared.installs.send(revision);
        self.learn_addresses();
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&e),
                EntryType::EntryConfChange => self.apply_conf_change(&e)?,
                EntryType::EntryConfChangeV2 => {
                    // Shoal never proposes joint changes: one here comes from a binary this one does
                    // not understand, and skipping it would leave this node's membership wrong.
                    fatal(e.index, "a joint membership change (ConfChangeV2), which this binary does not apply");
                }
            }
            self.applied = e.index;
            self.applied_term = e.term;
        }
        Ok(())
    }

    fn apply_normal(&mut self, e: &Entry) {
        let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        if e.data.is_empty() {
            state.observe_term(e.term); // A new leader's empty entry.
            return;
        }
        let entry = match command::decode(&e.data) {
            Ok(entry) => entry,
            // Applying around an entry would leave this node's state different from the others'.
            Err(err) => fatal(e.index, &err.to_string()),
        };
        let (outcome, events) = state.apply(&entry, e.term);
        drop(state);
        self.publish(events);
        if entry.origin == self.id && entry.boot == self.boot {
            if let Some((reply, _, _)) = self.proposals.remove(&entry.seq) {
                let _ = reply.send(Ok(outcome));
            }
        }
    }

    fn publish(&self, events: Vec<WatchEvent>) {
        for ev in events {
            let _ = self.shared.events.send(ev);
        }
    }

    fn apply_conf_change(&mut self, e: &Entry) -> anyhow::Result<()> {
        let cc = ConfChange::parse_from_bytes(&e.data)?;
        let cs: ConfState = self.node.apply_conf_change(&cc)?;
        self.store.set_conf_state(&cs)?;
        info!(change = ?cc.get_change_type(), node = %format!("{:016x}", cc.node_id), voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
        state.observe_term(e.term);
        let at = state.last_at;
        let events = match cc.get_change_type() {
            ConfChangeType::AddLearnerNode => match serde_json::from_slice::<NodeRecord>(&e.context) {
                Ok(rec) => {
                    if let Ok(a) = rec.raft_addr.parse() {
                        self.addrs.write().unwrap_or_else(|e| e.into_inner()).insert(rec.id, a);
                    }
                    state.admit_node(&rec, at)
                }
                Err(_) => Vec::new(),
            },
            ConfChangeType::RemoveNode => state.remove_node(cc.node_id, at),
            ConfChangeType::AddNode => Vec::new(),
        };
        drop(state);
        self.publish(events);
        Ok(())
    }

    /// A proposal forwarded to a leader that lost its role may never be committed, or may be: tell
    /// its client at once that the outcome is unknown rather than at the deadline.
    fn abandon_orphaned_proposals(&mut self) {
        let leader = self.node.raft.leader_id;
        let orphaned: Vec<u64> =
            self.proposals.iter().filter(|(_, (_, _, l))| *l != leader).map(|(seq, _)| *seq).collect();
        for seq in orphaned {
            if let Some((reply, _, _)) = self.proposals.remove(&seq) {
                let _ = reply.send(Err(RequestError::Timeout));
            }
        }
        // Reads are not abandoned: they wait out an election (`retry_reads` asks the next leader).
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (done, waiting): (Vec<_>, Vec<_>) = self.reads_ready.drain(..).partition(|(idx, _, _)| *idx <= applied);
        self.reads_ready = waiting;
        for (_, reply, _) in done {
            let _ = reply.send(Ok(()));
        }
    }

    /// Every `snapshot_every` applied entries (or when raft-rs needs a fresher snapshot for a
    /// follower), one snapshot job for the driver, unless one is still being built.
    fn maybe_compact(&mut self) {
        if self.snapshot_job.is_some() || self.snapshot_in_flight.load(Ordering::Acquire) {
            return;
        }
        let snap_index = self.store.snapshot_meta_index();
        let wanted = self.store.take_snapshot_wanted();
        if self.applied <= snap_index || (!wanted && self.applied < snap_index + self.timing.snapshot_every) {
            return;
        }
        self.snapshot_in_flight.store(true, Ordering::Release);
        self.snapshot_job = Some(SnapshotJob {
            index: self.applied,
            term: self.applied_term,
            conf_state: self.node.raft.prs().conf().to_conf_state(),
            state: self.shared.state().clone(),
            log_tail: self.timing.log_tail,
            store: self.store.clone(),
            in_flight: self.snapshot_in_flight.clone(),
        });
    }

    /// The snapshot to build, if one is due: the driver runs it on a thread of its own (the
    /// simulation runs it at once, to stay deterministic).
    pub fn take_snapshot_job(&mut self) -> Option<SnapshotJob> {
        self.snapshot_job.take()
    }

    fn publish_status(&self) {
        let raft = &self.node.raft;
        let cs = raft.prs().conf().to_conf_state();
        let status = RaftStatus {
            id: self.id,
            leader_id: raft.leader_id,
            term: raft.term,
            role: format!("{:?}", raft.state).to_lowercase(),
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            last_index: raft.raft_log.last_index(),
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            matched: if raft.state == StateRole::Leader {
                raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
            } else {
                BTreeMap::new()
            },
        };
        *self.shared.status.write().unwrap_or_else(|e| e.into_inner()) = status;
    }
}
