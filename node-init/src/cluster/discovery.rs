//! LAN discovery: how nodes booted with no seed find each other. Each node broadcasts, on its
//! LAN segment, a small announcement of its Raft id and gossip address, tagged with a key derived
//! from the cluster secret; a node that receives a valid announcement from another node adds that
//! address to its gossip seeds. From there gossip (authenticated itself) does the rest, and a
//! fresh cluster bootstraps as it does from seeds once `--min-voters` nodes see each other.
//!
//! An announcement carries nothing secret and grants nothing: a replayed one only names an
//! address that once held a node (gossip to it then fails or reaches that node), so there is no
//! replay window to keep, and servers need no synchronised clocks. Packets without the tag, or of
//! another length, are dropped unread.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use super::secret::{PurposeKey, TAG_LEN};

/// The UDP port nodes announce themselves on (gossip is on 7400, Raft on 7401).
pub const DEFAULT_PORT: u16 = 7402;
const MAGIC: &[u8; 8] = b"SHOALDS1";
const BODY_LEN: usize = MAGIC.len() + 8 + 4 + 2;
/// Between announcements for the first minute (servers of a rack boot together), then later.
const FAST: Duration = Duration::from_secs(1);
const FAST_FOR: Duration = Duration::from_secs(60);
const SLOW: Duration = Duration::from_secs(10);

/// One announcement: magic, Raft id, gossip address, tag.
pub fn encode(key: &PurposeKey, node: u64, gossip: SocketAddrV4) -> Vec<u8> {
    let mut p = Vec::with_capacity(BODY_LEN + TAG_LEN);
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&node.to_be_bytes());
    p.extend_from_slice(&gossip.ip().octets());
    p.extend_from_slice(&gossip.port().to_be_bytes());
    let tag = key.tag(&p);
    p.extend_from_slice(&tag);
    p
}

/// The Raft id and gossip address of a valid announcement.
pub fn decode(key: &PurposeKey, packet: &[u8]) -> Option<(u64, SocketAddrV4)> {
    if packet.len() != BODY_LEN + TAG_LEN || !packet.starts_with(MAGIC) {
        return None;
    }
    let (body, tag) = packet.split_at(BODY_LEN);
    if !key.verify(body, tag) {
        return None;
    }
    let node = u64::from_be_bytes(body[8..16].try_into().ok()?);
    let ip = Ipv4Addr::new(body[16], body[17], body[18], body[19]);
    let port = u16::from_be_bytes([body[20], body[21]]);
    // Nodes always announce their own address; a wildcard would make the receiver trust the
    // packet's (spoofable) source instead.
    (!ip.is_unspecified() && !ip.is_broadcast() && port != 0).then(|| (node, SocketAddrV4::new(ip, port)))
}

/// The broadcast address of the subnet holding `ip` (255.255.255.255 when none does).
async fn broadcast_of(ip: Ipv4Addr) -> Ipv4Addr {
    let Ok(nl) = shoal_netstack::netlink::Netlink::connect() else { return Ipv4Addr::BROADCAST };
    let Ok(Some(link)) = nl.device_with(ip).await else { return Ipv4Addr::BROADCAST };
    let addrs = nl.addresses(link.index).await.unwrap_or_default();
    match addrs.iter().find(|(a, _)| *a == ip) {
        Some((_, prefix)) if *prefix < 31 => Ipv4Addr::from(u32::from(ip) | (u32::MAX >> prefix)),
        _ => Ipv4Addr::BROADCAST,
    }
}

fn socket(port: u16) -> std::io::Result<tokio::net::UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Every node of one host (tests) binds the port; each gets every broadcast.
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Announces this node (`gossip` is its gossip address) on `port` and hands every other node's
/// address to `found`, for as long as the agent runs.
pub async fn run(key: PurposeKey, node: u64, gossip: SocketAddr, port: u16, found: impl Fn(SocketAddr) -> bool) {
    let SocketAddr::V4(gossip) = gossip else {
        tracing::warn!("LAN discovery needs an IPv4 listen address; not announcing");
        return;
    };
    let sock = match socket(port) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(port, error = %e, "LAN discovery cannot bind its port; not announcing");
            return;
        }
    };
    let target = SocketAddr::from((broadcast_of(*gossip.ip()).await, port));
    tracing::info!(%target, "announcing this node on the LAN (no seed given)");
    let announcement = encode(&key, node, gossip);
    let started = tokio::time::Instant::now();
    let mut next = tokio::time::Instant::now();
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if let Err(e) = sock.send_to(&announcement, target).await {
                    tracing::debug!(%target, error = %e, "LAN announcement not sent");
                }
                next += if started.elapsed() < FAST_FOR { FAST } else { SLOW };
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let Some((peer, addr)) = decode(&key, &buf[..n]) else {
                    tracing::debug!(%from, "dropped a LAN announcement that is not ours");
                    continue;
                };
                let addr = SocketAddr::V4(addr);
                if peer != node && found(addr) {
                    tracing::info!(node = %format!("{peer:016x}"), %addr, "found a node on the LAN");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::secret::ClusterSecret;

    #[test]
    fn announcements_decode_only_with_the_same_secret_and_unchanged() {
        let key = ClusterSecret::new("s").key("discovery");
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 7), 7400);
        let p = encode(&key, 0xfeed, addr);
        assert_eq!(decode(&key, &p), Some((0xfeed, addr)));
        assert_eq!(decode(&ClusterSecret::new("other").key("discovery"), &p), None, "another cluster's secret");
        assert_eq!(decode(&ClusterSecret::new("s").key("gossip"), &p), None, "another purpose's key");
        for i in 0..p.len() {
            let mut bad = p.clone();
            bad[i] ^= 1;
            assert_eq!(decode(&key, &bad), None, "byte {i} flipped");
        }
        assert_eq!(decode(&key, &p[..p.len() - 1]), None);
        assert_eq!(decode(&key, &[p.clone(), vec![0]].concat()), None);
        assert_eq!(decode(&key, b""), None);
        let wildcard = encode(&key, 0xfeed, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7400));
        assert_eq!(decode(&key, &wildcard), None, "an announcement must name its address");
    }
}
