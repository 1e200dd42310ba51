//! Durable Raft storage on raft-engine: log entries, hard state, conf state and the latest
//! state-machine snapshot. Entries live in one raft-engine group and metadata in another, so
//! replacing the log with a snapshot never touches the metadata. Every write that raft-rs must see
//! persisted before it sends messages is synced.
//!
//! Invariant: the stored snapshot covers every index below the first stored entry
//! (`first_index == snapshot.index + 1`), so raft-rs can always answer `term(first_index - 1)`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Config, Engine, LogBatch, MessageExt};

const ENTRIES: u64 = 1;
const META: u64 = 2;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft log engine")]
    Engine(#[from] raft_engine::Error),
    #[error("stored raft metadata is unreadable")]
    Decode(#[from] protobuf::ProtobufError),
}

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

#[derive(Clone)]
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

#[derive(Default)]
struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
}

/// Raft storage backed by raft-engine. Cheap to clone; clones share the engine.
#[derive(Clone)]
pub struct RaftStore {
    engine: Arc<Engine>,
    cached: Arc<RwLock<Cached>>,
    /// Set when raft-rs asked for a snapshot the stored one cannot serve (older than requested, or
    /// taken before the receiving node was in the configuration); the Raft thread then takes a
    /// fresh one and raft-rs retries.
    snapshot_wanted: Arc<AtomicBool>,
    /// Whether writes raft-rs needs durable are synced (always, but for `--unsafe-no-fsync`
    /// and the simulation, whose "crashes" keep the page cache anyway).
    sync: bool,
    /// Held while the stored snapshot is replaced: by a received snapshot on the Raft thread, or
    /// by a compaction on the thread that built it.
    snapshot_lock: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStore").field("path", &self.engine.path()).finish()
    }
}

/// Log files rotate at this size; compacted ones are removed once the log passes
/// `PURGE_THRESHOLD`.
const LOG_FILE_SIZE: u64 = 32 << 20;
const PURGE_THRESHOLD: u64 = 256 << 20;

impl RaftStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_sized(dir, LOG_FILE_SIZE, PURGE_THRESHOLD)
    }

    /// A store that never syncs: acknowledged writes are lost when the machine loses power (as
    /// etcd's `--unsafe-no-fsync`). For tests that show what a power cut does without syncs, and
    /// the simulation, whose crashes keep the page cache.
    pub fn open_unsynced(dir: &Path) -> Result<Self, StoreError> {
        let mut store = Self::open(dir)?;
        store.sync = false;
        Ok(store)
    }

    /// `open` with other log file and purge sizes (tests use small ones).
    fn open_sized(dir: &Path, file_size: u64, purge_threshold: u64) -> Result<Self, StoreError> {
        // raft-engine purges only once its files pass `purge_threshold` (10 GB by default,
        // far beyond what a node's log should ever hold): compacted entries would stay on disk.
        let cfg = Config {
            dir: dir.to_string_lossy().into_owned(),
            target_file_size: raft_engine::ReadableSize(file_size),
            purge_threshold: raft_engine::ReadableSize(purge_threshold),
            ..Config::default()
        };
        let engine = Arc::new(Engine::open(cfg)?);
        let cached = Cached {
            hard_state: engine.get_message::<HardState>(META, KEY_HARD_STATE)?.unwrap_or_default(),
            conf_state: engine.get_message::<ConfState>(META, KEY_CONF_STATE)?.unwrap_or_default(),
            snapshot: engine.get_message::<Snapshot>(META, KEY_SNAPSHOT)?.unwrap_or_default(),
        };
        Ok(RaftStore {
            engine,
            cached: Arc::new(RwLock::new(cached)),
            snapshot_wanted: Arc::new(AtomicBool::new(false)),
            sync: true,
            snapshot_lock: Arc::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        self.cached.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cached> {
        self.cached.write().unwrap_or_else(|e| e.into_inner())
    }

    /// True when this store has never been part of a cluster.
    pub fn is_empty(&self) -> bool {
        let c = self.read();
        c.conf_state.voters.is_empty() && c.conf_state.learners.is_empty() && c.snapshot.get_metadata().index == 0
    }

    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    pub fn snapshot_meta_index(&self) -> u64 {
        self.read().snapshot.get_metadata().index
    }

    /// The latest snapshot (metadata and state-machine data).
    pub fn latest_snapshot(&self) -> Snapshot {
        self.read().snapshot.clone()
    }

    /// Appends entries (replacing any conflicting suffix) and, if given, the hard state; synced
    /// (unless opened unsynced).
    pub fn append(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        if let Some(first) = entries.first() {
            // raft-engine replaces everything from the first appended index on, but panics on a
            // hole or on rewriting compacted entries: start a fresh log in those cases (raft-rs only
            // appends past a snapshot or compaction point then).
            let span = self.engine.first_index(ENTRIES).zip(self.engine.last_index(ENTRIES));
            if let Some((lo, hi)) = span {
                if first.index < lo || first.index > hi + 1 {
                    batch.add_command(ENTRIES, raft_engine::Command::Clean);
                }
            }
            batch.add_entries::<EntryExt>(ENTRIES, entries)?;
        }
        if let Some(hs) = hard_state {
            batch.put_message(META, KEY_HARD_STATE.to_vec(), hs)?;
        }
        if !batch.is_empty() {
            self.engine.write(&mut batch, self.sync)?;
        }
        if let Some(hs) = hard_state {
            self.write().hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records the commit index raft-rs reported after an advance; not synced (the commit index is
    /// recoverable from the cluster).
    pub fn set_commit(&self, commit: u64) -> Result<(), StoreError> {
        let mut hs = self.hard_state();
        if hs.commit == commit {
            return Ok(());
        }
        hs.commit = commit;
        let mut batch = LogBatch::default();
        batch.put_message(META, KEY_HARD_STATE.to_vec(), &hs)?;
        self.engine.write(&mut batch, false)?;
        self.write().hard_state = hs;
        Ok(())
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        batch.put_message(META, KEY_CONF_STATE.to_vec(), cs)?;
        self.engine.write(&mut batch, self.sync)?;
        self.write().conf_state = cs.clone();
        Ok(())
    }

    /// Replaces the log with a snapshot received from the leader (or the bootstrap snapshot).
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let _replacing = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let meta = snap.get_metadata();
        let mut batch = LogBatch::default();
        batch.add_command(ENTRIES, raft_engine::Command::Clean);
        batch.put_message(META, KEY_SNAPSHOT.to_vec(), snap)?;
        batch.put_message(META, KEY_CONF_STATE.to_vec(), meta.get_conf_state())?;
        let mut hs = self.hard_state();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        batch.put_message(META, KEY_HARD_STATE.to_vec(), &hs)?;
        self.engine.write(&mut batch, self.sync)?;
        let mut c = self.write();
        c.snapshot = snap.clone();
        c.conf_state = meta.get_conf_state().clone();
        c.hard_state = hs;
        Ok(())
    }

    /// Stores a snapshot of the applied state at `index` and drops the log up to it.
    /// Keeps the `tail` entries before `index` in the log, so that a follower only briefly behind
    /// catches up from the log rather than needing the whole snapshot.
    /// A snapshot older than the one stored (a received snapshot won the race with the thread
    /// that built this one) is dropped.
    pub fn compact(&self, index: u64, term: u64, cs: &ConfState, data: Vec<u8>, tail: u64) -> Result<(), StoreError> {
        let _replacing = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        if index <= self.snapshot_meta_index() {
            return Ok(());
        }
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(cs.clone());
        let mut batch = LogBatch::default();
        batch.put_message(META, KEY_SNAPSHOT.to_vec(), &snap)?;
        self.engine.write(&mut batch, self.sync)?;
        self.write().snapshot = snap;
        self.engine.compact_to(ENTRIES, (index + 1).saturating_sub(tail));
        // Reclaim files whose entries are all compacted.
        self.engine.purge_expired_files()?;
        Ok(())
    }

    /// Whether raft-rs asked for a fresher snapshot since the last call.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    /// The first entry the log still holds: the kept tail below the snapshot counts when the
    /// log reaches the snapshot (a received snapshot cleans the log, then it starts after it).
    fn first(&self) -> u64 {
        let snap_index = self.snapshot_meta_index();
        match self.engine.first_index(ENTRIES).zip(self.engine.last_index(ENTRIES)) {
            Some((lo, hi)) if hi >= snap_index => lo.min(snap_index + 1),
            _ => snap_index + 1,
        }
    }

    fn last(&self) -> u64 {
        let snap_index = self.snapshot_meta_index();
        self.engine.last_index(ENTRIES).unwrap_or(snap_index).max(snap_index)
    }
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.read();
        Ok(RaftState { hard_state: c.hard_state.clone(), conf_state: c.conf_state.clone() })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        let max = max_size.into().map(|m| m as usize);
        self.engine.fetch_entries_to::<EntryExt>(ENTRIES, low, high, max, &mut out).map_err(StoreError::from)?;
        // raft-rs expects at least one entry when any exists, even past max_size.
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.read().snapshot.get_metadata().clone();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.engine.get_entry::<EntryExt>(ENTRIES, idx).map_err(StoreError::from)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let snap = self.latest_snapshot();
        let cs = snap.get_metadata().get_conf_state();
        let includes_to = cs.voters.iter().chain(&cs.learners).any(|id| *id == to);
        if snap.get_metadata().index < request_index || !includes_to {
            self.snapshot_wanted.store(true, Ordering::Relaxed);
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Default::default() }
    }

    fn dir_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()
    }

    #[test]
    fn a_compacted_log_gives_its_disk_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStore::open_sized(dir.path(), 1 << 20, 4 << 20).unwrap();
        // Incompressible (raft-engine compresses batches).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let payload: Vec<u8> = (0..64 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let cs = ConfState { voters: vec![1], ..Default::default() };
        // 24 MiB of entries, compacted as they go, as the Raft thread does.
        for batch in 0..24u64 {
            let entries: Vec<Entry> = (0..16)
                .map(|i| Entry {
                    index: batch * 16 + i + 1,
                    term: 1,
                    data: payload.clone().into(),
                    ..Default::default()
                })
                .collect();
            s.append(&entries, None).unwrap();
            s.compact(batch * 16 + 16, 1, &cs, vec![1, 2, 3], 0).unwrap();
        }
        let kept = dir_bytes(dir.path());
        assert!(kept < 12 << 20, "{kept} bytes of log kept for 24 MiB written and compacted");
        assert_eq!(s.first(), 385);
    }

    #[test]
    fn entries_hard_state_and_conf_state_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = RaftStore::open(dir.path()).unwrap();
            assert!(s.is_empty());
            let hs = HardState { term: 3, vote: 7, commit: 2, ..Default::default() };
            s.append(&[entry(1, 1), entry(2, 1), entry(3, 3)], Some(&hs)).unwrap();
            s.set_conf_state(&ConfState { voters: vec![7, 8], ..Default::default() }).unwrap();
        }
        let s = RaftStore::open(dir.path()).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (3, 7, 2));
        assert_eq!(st.conf_state.voters, vec![7, 8]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 3));
        assert_eq!(s.term(3).unwrap(), 3);
        let got = s.entries(1, 4, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn a_conflicting_append_replaces_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStore::open(dir.path()).unwrap();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1), entry(4, 1)], None).unwrap();
        s.append(&[entry(3, 2)], None).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 1);
    }

    #[test]
    fn a_compaction_older_than_a_received_snapshot_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStore::open(dir.path()).unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        s.append(&ents, None).unwrap();
        let mut received = Snapshot::default();
        received.mut_metadata().index = 50;
        received.mut_metadata().term = 2;
        received.set_data(b"received".to_vec().into());
        s.apply_snapshot(&received).unwrap();
        // A snapshot of index 8 built meanwhile arrives late.
        s.compact(8, 1, &ConfState::default(), b"built".to_vec(), 0).unwrap();
        assert_eq!(s.latest_snapshot().get_metadata().index, 50);
        assert_eq!(s.latest_snapshot().get_data(), b"received");
        assert_eq!(s.first_index().unwrap(), 51);
    }

    #[test]
    fn compaction_keeps_the_snapshot_and_later_entries() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStore::open(dir.path()).unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        s.append(&ents, None).unwrap();
        let cs = ConfState { voters: vec![1], ..Default::default() };
        s.compact(6, 1, &cs, b"state".to_vec(), 0).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
        assert_eq!(s.term(6).unwrap(), 1);
        assert!(matches!(s.term(5), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            s.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snap = s.snapshot(0, 1).unwrap();
        assert_eq!((snap.get_metadata().index, snap.get_data()), (6, &b"state"[..]));
        // A node that joined after the snapshot cannot restore it: ask for a fresh one.
        assert!(!s.take_snapshot_wanted());
        assert!(matches!(s.snapshot(0, 9), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))));
        assert!(s.take_snapshot_wanted());
        assert!(!s.take_snapshot_wanted());
        drop(s);
        let s = RaftStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
    }

    #[test]
    fn compaction_with_a_tail_keeps_entries_before_the_snapshot_to_serve_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStore::open(dir.path()).unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        s.append(&ents, None).unwrap();
        let cs = ConfState { voters: vec![1], ..Default::default() };
        s.compact(8, 1, &cs, b"state".to_vec(), 4).unwrap();
        // Entries 5..=10 remain: a follower at 4 is sent entries, not the snapshot at 8.
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (5, 10));
        let got = s.entries(5, 9, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), vec![5, 6, 7, 8]);
        assert_eq!(s.term(5).unwrap(), 1);
        assert!(matches!(s.term(4), Err(raft::Error::Store(StorageError::Compacted))));
        drop(s);
        let s = RaftStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.snapshot_meta_index()), (5, 8));
        // A snapshot received from a leader replaces the log: it starts after the snapshot.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 2;
        s.apply_snapshot(&snap).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 20));
    }

    #[test]
    fn an_applied_snapshot_replaces_the_whole_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftStore::open(dir.path()).unwrap();
        s.append(&[entry(1, 1), entry(2, 1)], None).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.apply_snapshot(&snap).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 20));
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        assert_eq!(s.hard_state().commit, 20);
        s.append(&[entry(21, 4)], None).unwrap();
        assert_eq!(s.last_index().unwrap(), 21);
    }
}
