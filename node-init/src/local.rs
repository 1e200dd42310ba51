//! This node as the API and the supervisor see it: its cluster agent, its image store, where
//! its instances live, its counters, and the token other nodes' requests carry.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::cluster::agent::Agent;
use crate::cluster::raft_node::{ask, Input, RequestError};
use crate::images::ImageStore;
use crate::state::{ApplyOutcome, Command};

#[derive(Debug)]
pub struct LocalNode {
    pub agent: Arc<Agent>,
    pub images: ImageStore,
    /// `DATA_DIR/instances`: one directory per instance this node runs.
    pub instances_dir: PathBuf,
    pub metrics: Metrics,
    /// Accepted from peers as the cluster's own token (derived from the cluster secret).
    pub peer_token: String,
}

impl LocalNode {
    pub fn id(&self) -> u64 {
        self.agent.id
    }

    /// Proposes a command through Raft and waits until it is applied here.
    pub async fn propose(&self, command: Command) -> Result<ApplyOutcome, RequestError> {
        ask(&self.agent.inbox, |reply| Input::Propose { command, reply }).await
    }

    /// Waits until a linearizable read may be served from the local state.
    pub async fn read_barrier(&self) -> Result<(), RequestError> {
        ask(&self.agent.inbox, |reply| Input::Read { reply }).await
    }

    /// What node-to-node HTTP dials with: this node's certificate, the cluster CA.
    pub fn peer_tls(&self) -> Result<Arc<rustls::ClientConfig>, crate::peer::PeerError> {
        self.agent.tls.configs().map(|c| c.client.clone()).ok_or(crate::peer::PeerError::NoIdentity)
    }

    /// The API address of every node gossip reports alive, by node id.
    pub fn alive_peers(&self) -> std::collections::BTreeMap<u64, String> {
        self.agent.peers().into_iter().filter(|(_, live)| *live).map(|(p, _)| (p.id, p.api_addr)).collect()
    }
}

/// Counters on `/metrics` (Prometheus text).
#[derive(Debug, Default)]
pub struct Metrics {
    pub instance_starts: AtomicU64,
    pub instance_restarts: AtomicU64,
    pub instance_failures: AtomicU64,
    pub instance_stops: AtomicU64,
    pub instance_adoptions: AtomicU64,
    pub instances_running: AtomicU64,
    pub image_fetches: AtomicU64,
    pub image_fetch_failures: AtomicU64,
    pub image_fetch_bytes: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 9] = [
            ("shoal_instance_starts_total", "counter", "microVMs booted on this node", &self.instance_starts),
            (
                "shoal_instance_restarts_total",
                "counter",
                "microVMs booted again after they ended",
                &self.instance_restarts,
            ),
            ("shoal_instance_failures_total", "counter", "microVM runs or starts that failed", &self.instance_failures),
            ("shoal_instance_stops_total", "counter", "microVMs stopped by the supervisor", &self.instance_stops),
            (
                "shoal_instance_adoptions_total",
                "counter",
                "running microVMs taken over after an agent restart",
                &self.instance_adoptions,
            ),
            ("shoal_instances_running", "gauge", "microVMs running on this node", &self.instances_running),
            ("shoal_image_fetches_total", "counter", "images copied from peers", &self.image_fetches),
            ("shoal_image_fetch_failures_total", "counter", "image copies that failed", &self.image_fetch_failures),
            ("shoal_image_fetch_bytes_total", "counter", "bytes of images copied from peers", &self.image_fetch_bytes),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
        out
    }
}
