//! The cluster agent: gossip membership, Raft consensus over a replicated keyed store, and the
//! policies (bootstrap, voter placement) that make nodes form and heal one cluster on their own.

pub mod agent;
pub mod discovery;
pub mod gossip;
pub mod join;
pub mod pki;
pub mod policy;
pub mod raft_core;
pub mod raft_node;
pub mod secret;
pub mod storage;
pub mod tls;
pub mod transport;
