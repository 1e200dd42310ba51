//! Shoal's node agent as a library: the binaries (`shoal-node`) and the benches link it.
//!
//! - [`cluster`]: consensus and membership — Raft on raft-engine, gossip, transports, the
//!   policies that form and heal the cluster.
//! - [`state`]: the typed replicated state machine (commands, tables, indexes, snapshots).
//! - [`scheduler`]: placement, a pure function of the state and gossip's liveness view.
//! - [`supervisor`]: this node's reconciler: instance directories, jailed `shoal-vmm` processes.
//! - [`images`]: the content-addressed image store and peer fetch.
//! - [`leader`]: what only the leader does for workloads (scheduling rounds, lost nodes, image
//!   garbage collection, the format gate).
//! - [`api`]: the HTTP API every node serves.
//! - [`durable`]: files that must survive a crash whole.
//! - [`pid1`]: `shoal-node` as the host image's init: mounts, modules, data disk, uplink, the
//!   agent as its child, orphans reaped, ordered shutdown.

pub mod api;
pub mod cluster;
pub mod durable;
pub mod images;
pub mod leader;
pub mod local;
pub mod peer;
pub mod pid1;
pub mod scheduler;
pub mod state;
pub mod supervisor;
