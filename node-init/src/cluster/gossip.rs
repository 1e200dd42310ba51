//! Membership by gossip (chitchat over UDP): what each node publishes about itself, how it reads
//! the others, and a transport that signs every packet with the cluster secret so gossip from a
//! node without it is dropped before chitchat sees it.
//!
//! chitchat keeps its wire encoding private, so the signed transport encodes and decodes envelopes
//! by passing them through a chitchat UDP socket on the loopback interface and signs or verifies
//! the bytes in between.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdp};
use chitchat::{ChitchatEnvelope, ChitchatId, NodeState};
use serde::Serialize;

pub use crate::state::objects::Resources;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Mutex};
use tracing::warn;

use super::secret::{PurposeKey, TAG_LEN};

pub const KEY_RAFT_ID: &str = "raft_id";
pub const KEY_API: &str = "api_addr";
pub const KEY_RAFT: &str = "raft_addr";
pub const KEY_LABELS: &str = "labels";
pub const KEY_CAPACITY: &str = "capacity";
pub const KEY_FREE: &str = "free";
pub const KEY_VERSION: &str = "version";
pub const KEY_STATUS: &str = "status";
pub const KEY_CLUSTER: &str = "cluster";
pub const KEY_CANDIDATE: &str = "candidate";
/// The newest log entry format the node's binary knows (absent: the first release, format 1).
pub const KEY_FORMAT: &str = "format";

/// One node as gossip describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerInfo {
    pub id: u64,
    pub gossip_addr: String,
    pub api_addr: String,
    pub raft_addr: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub free: Resources,
    pub version: String,
    /// The newest log entry format its binary knows.
    pub format: u32,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(skip)]
    pub candidate: Option<u64>,
}

impl PeerInfo {
    pub fn from_state(cid: &ChitchatId, st: &NodeState) -> Option<PeerInfo> {
        let id = u64::from_str_radix(st.get(KEY_RAFT_ID)?, 16).ok()?;
        fn json<T: serde::de::DeserializeOwned + Default>(st: &NodeState, k: &str) -> T {
            st.get(k).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default()
        }
        Some(PeerInfo {
            id,
            gossip_addr: cid.gossip_advertise_addr.to_string(),
            api_addr: st.get(KEY_API).unwrap_or_default().to_string(),
            raft_addr: st.get(KEY_RAFT).unwrap_or_default().to_string(),
            labels: json(st, KEY_LABELS),
            capacity: json(st, KEY_CAPACITY),
            free: json(st, KEY_FREE),
            version: st.get(KEY_VERSION).unwrap_or_default().to_string(),
            format: st.get(KEY_FORMAT).and_then(|f| f.parse().ok()).unwrap_or(1),
            status: st.get(KEY_STATUS).unwrap_or_default().to_string(),
            cluster: st.get(KEY_CLUSTER).filter(|c| !c.is_empty()).map(str::to_string),
            candidate: st.get(KEY_CANDIDATE).and_then(|c| u64::from_str_radix(c, 16).ok()),
        })
    }
}

/// Gossip timing: how often a node gossips and how suspicious the failure detector is.
#[derive(Debug, Clone, Copy)]
pub struct GossipTiming {
    pub interval: Duration,
    pub phi_threshold: f64,
}

impl Default for GossipTiming {
    fn default() -> Self {
        GossipTiming { interval: Duration::from_millis(100), phi_threshold: 5.0 }
    }
}

pub fn failure_detector(timing: &GossipTiming) -> chitchat::FailureDetectorConfig {
    chitchat::FailureDetectorConfig {
        phi_threshold: timing.phi_threshold,
        sampling_window_size: 1000,
        max_interval: Duration::from_secs(5),
        initial_interval: timing.interval * 4,
        dead_node_grace_period: Duration::from_secs(24 * 3600),
    }
}

/// chitchat's UDP transport with every packet signed: `[32-byte HMAC][chitchat packet]`.
#[derive(Debug)]
pub struct SignedUdpTransport {
    key: PurposeKey,
}

impl SignedUdpTransport {
    pub fn new(key: PurposeKey) -> Self {
        SignedUdpTransport { key }
    }
}

#[async_trait::async_trait]
impl Transport for SignedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let outer = Arc::new(
            UdpSocket::bind(listen_addr)
                .await
                .with_context(|| format!("failed to bind {listen_addr}/UDP for gossip"))?,
        );
        let codec = Arc::new(Mutex::new(Codec::open().await?));
        let (tx, rx) = mpsc::channel(1024);
        // Receiving runs in its own task so that chitchat cancelling `recv` never leaves a packet
        // half-way through the codec.
        let recv_task = tokio::spawn(receive_loop(outer.clone(), Codec::open().await?, self.key.clone(), tx));
        Ok(Box::new(SignedSocket { outer, codec, key: self.key.clone(), rx, recv_task }))
    }
}

/// Encodes and decodes chitchat envelopes through chitchat's own UDP socket on loopback.
struct Codec {
    chitchat: ChitchatUdp,
    chitchat_addr: SocketAddr,
    tap: UdpSocket,
    tap_addr: SocketAddr,
    buf: Vec<u8>,
}

impl Codec {
    async fn open() -> anyhow::Result<Self> {
        let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
        let chitchat = ChitchatUdp::open(loopback).await.context("gossip codec socket (is loopback up?)")?;
        let chitchat_addr = chitchat.local_addr()?;
        let tap = UdpSocket::bind(loopback).await?;
        let tap_addr = tap.local_addr()?;
        Ok(Codec { chitchat, chitchat_addr, tap, tap_addr, buf: vec![0u8; 65_536] })
    }

    async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<Vec<u8>> {
        self.chitchat.send(self.tap_addr, envelope).await?;
        loop {
            let (n, from) = self.tap.recv_from(&mut self.buf).await?;
            if from == self.chitchat_addr {
                return Ok(self.buf[..n].to_vec());
            }
        }
    }

    async fn decode(&mut self, bytes: &[u8]) -> anyhow::Result<ChitchatEnvelope> {
        self.tap.send_to(bytes, self.chitchat_addr).await?;
        let outcome = tokio::time::timeout(Duration::from_secs(1), self.chitchat.recv())
            .await
            .context("gossip packet did not decode")??;
        Ok(outcome.envelope)
    }
}

async fn receive_loop(outer: Arc<UdpSocket>, mut codec: Codec, key: PurposeKey, tx: mpsc::Sender<RecvOutcome>) {
    let mut buf = vec![0u8; 65_536];
    let mut refused: u64 = 0;
    loop {
        let (n, from) = match outer.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset) =>
            {
                continue
            }
            Err(e) => {
                warn!(error = %e, "gossip socket failed");
                return;
            }
        };
        let packet = &buf[..n];
        if n <= TAG_LEN || !key.verify(&packet[TAG_LEN..], &packet[..TAG_LEN]) {
            refused += 1;
            // Powers of two: a peer with the wrong secret is reported, not logged on every packet.
            if refused.is_power_of_two() {
                warn!(%from, refused, "gossip packet without a valid cluster-secret tag dropped");
            }
            continue;
        }
        // The tag holds, so the bytes come from a node of this cluster; decode failures here
        // mean a chitchat version mismatch.
        match codec.decode(&packet[TAG_LEN..]).await {
            Ok(envelope) => {
                if tx.send(RecvOutcome { from_addr: from, envelope, num_bytes_received: n }).await.is_err() {
                    return;
                }
            }
            Err(e) => warn!(%from, error = %e, "gossip packet undecodable"),
        }
    }
}

struct SignedSocket {
    outer: Arc<UdpSocket>,
    codec: Arc<Mutex<Codec>>,
    key: PurposeKey,
    rx: mpsc::Receiver<RecvOutcome>,
    recv_task: tokio::task::JoinHandle<()>,
}

impl Drop for SignedSocket {
    fn drop(&mut self) {
        self.recv_task.abort();
    }
}

#[async_trait::async_trait]
impl Socket for SignedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.outer.local_addr()?)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let body = self.codec.lock().await.encode(envelope).await?;
        let mut packet = Vec::with_capacity(TAG_LEN + body.len());
        packet.extend_from_slice(&self.key.tag(&body));
        packet.extend_from_slice(&body);
        match self.outer.send_to(&packet, to).await {
            Ok(n) => Ok(SendOutcome { num_bytes_sent: n }),
            // An unreachable peer is what gossip exists to detect, not a broken transport.
            Err(_) => Ok(SendOutcome { num_bytes_sent: 0 }),
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.rx.recv().await.context("gossip receiver stopped")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::secret::ClusterSecret;
    use chitchat::{spawn_chitchat, ChitchatConfig, ProtocolVersion};

    async fn node(port_secret: &str, seeds: Vec<String>) -> chitchat::ChitchatHandle {
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let sock = std::net::UdpSocket::bind(addr).unwrap();
        let addr = sock.local_addr().unwrap();
        drop(sock);
        let id = ChitchatId::new(format!("n{}", addr.port()), 1, addr);
        let cfg = ChitchatConfig {
            chitchat_id: id,
            cluster_id: "shoal".into(),
            gossip_interval: Duration::from_millis(50),
            listen_addr: addr,
            seed_nodes: seeds,
            failure_detector_config: failure_detector(&GossipTiming::default()),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let transport = SignedUdpTransport::new(ClusterSecret::new(port_secret).key("gossip"));
        spawn_chitchat(cfg, vec![("k".into(), port_secret.into())], &transport).await.unwrap()
    }

    async fn live_count(h: &chitchat::ChitchatHandle) -> usize {
        h.with_chitchat(|c| c.live_nodes().count()).await
    }

    #[tokio::test]
    async fn nodes_with_the_secret_see_each_other_and_a_stranger_is_not_seen() {
        let a = node("s", vec![]).await;
        let seed = a.chitchat_id().gossip_advertise_addr.to_string();
        let b = node("s", vec![seed.clone()]).await;
        let stranger = node("not-s", vec![seed]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while live_count(&a).await < 2 || live_count(&b).await < 2 {
            assert!(tokio::time::Instant::now() < deadline, "a and b never saw each other");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(live_count(&a).await, 2, "the stranger must not join a's view");
        assert_eq!(live_count(&stranger).await, 1, "the stranger sees only itself");
        let seen_value = b
            .with_chitchat(|c| {
                c.node_states()
                    .iter()
                    .find(|(id, _)| id.node_id == a.chitchat_id().node_id)
                    .and_then(|(_, st)| st.get("k").map(str::to_string))
            })
            .await;
        assert_eq!(seen_value.as_deref(), Some("s"));
    }
}
