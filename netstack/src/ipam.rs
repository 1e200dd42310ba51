//! Addresses of the cluster network: the `cluster_cidr` setting, one subnet of it per node
//! (assigned through Raft when the node joins), one address of its node's subnet per instance,
//! a VXLAN network identifier per tenant and a MAC per instance. Pure functions of what is
//! already taken, so every node of the cluster computes the same answer from the same state.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network: an address with its host bits clear, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("{0:?} is not an IPv4 network such as 10.240.0.0/16")]
    Malformed(String),
    #[error("{given} has host bits set: the network is {network}")]
    HostBits { given: String, network: Ipv4Cidr },
    #[error("the cluster network {cidr} is too small: it needs room for at least {min} node subnets of /{node_prefix} (a /{max_prefix} or larger)")]
    TooSmall { cidr: Ipv4Cidr, node_prefix: u8, min: u32, max_prefix: u8 },
    #[error("a node subnet of /{0} is out of range: /16 to /28")]
    NodePrefix(u8),
    #[error("the cluster network {cidr} overlaps {other} ({what})")]
    Overlaps { cidr: Ipv4Cidr, other: Ipv4Cidr, what: String },
    #[error("the cluster network {cidr} has no free node subnet: all {count} are assigned")]
    ClusterFull { cidr: Ipv4Cidr, count: u32 },
    #[error("the node subnet {subnet} has no free address: all {count} are in use")]
    SubnetExhausted { subnet: Ipv4Cidr, count: u32 },
    #[error("no free VXLAN network identifier")]
    NoVni,
}

impl Ipv4Cidr {
    /// The network `network/prefix`; host bits are refused.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, IpamError> {
        if prefix > 32 {
            return Err(IpamError::Malformed(format!("{network}/{prefix}")));
        }
        let c = Ipv4Cidr { network: Ipv4Addr::from(u32::from(network) & mask(prefix)), prefix };
        if c.network != network {
            return Err(IpamError::HostBits { given: format!("{network}/{prefix}"), network: c });
        }
        Ok(c)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask, as `ip=` wants it.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// How many addresses it spans.
    pub fn size(&self) -> u64 {
        1u64 << (32 - self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The `i`th address of the network (0 is the network address itself).
    pub fn nth(&self, i: u64) -> Option<Ipv4Addr> {
        (i < self.size()).then(|| Ipv4Addr::from(u32::from(self.network) + i as u32))
    }

    /// The last address (the broadcast address of a subnet).
    pub fn last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = IpamError;

    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::Malformed(s.to_string());
        let (ip, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        // Digits only: "+8" and " 8" parse as u8 but are not what anyone writes.
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        Ipv4Cidr::new(ip, prefix)
    }
}

impl serde::Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Networks a cluster network must not overlap: its addresses would be unreachable or mean
/// something else on every host.
const RESERVED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local, where the metadata service answers"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
];

/// The default size of a node's subnet: 253 instance addresses (the gateway aside).
pub const DEFAULT_NODE_PREFIX: u8 = 24;
/// At least this many node subnets must fit in the cluster network.
pub const MIN_NODE_SUBNETS: u32 = 4;

/// The cluster network: `cidr`, cut into node subnets of `/node_prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterNetwork {
    pub cidr: Ipv4Cidr,
    pub node_prefix: u8,
}

impl ClusterNetwork {
    /// Checks that `cidr` holds at least [`MIN_NODE_SUBNETS`] subnets of `/node_prefix` and
    /// overlaps no reserved range.
    pub fn new(cidr: Ipv4Cidr, node_prefix: u8) -> Result<Self, IpamError> {
        if !(16..=28).contains(&node_prefix) {
            return Err(IpamError::NodePrefix(node_prefix));
        }
        let max_prefix = node_prefix.saturating_sub(MIN_NODE_SUBNETS.trailing_zeros() as u8);
        if cidr.prefix > max_prefix {
            return Err(IpamError::TooSmall { cidr, node_prefix, min: MIN_NODE_SUBNETS, max_prefix });
        }
        for (net, what) in RESERVED {
            let other: Ipv4Cidr = net.parse()?;
            if cidr.overlaps(&other) {
                return Err(IpamError::Overlaps { cidr, other, what: what.to_string() });
            }
        }
        Ok(ClusterNetwork { cidr, node_prefix })
    }

    /// Refuses a cluster network that overlaps one of the host's own networks (its uplink's).
    pub fn check_disjoint(&self, host_networks: &[Ipv4Cidr]) -> Result<(), IpamError> {
        match host_networks.iter().find(|n| n.overlaps(&self.cidr)) {
            Some(n) => Err(IpamError::Overlaps { cidr: self.cidr, other: *n, what: "a network of this host".into() }),
            None => Ok(()),
        }
    }

    /// How many node subnets it holds.
    pub fn node_subnets(&self) -> u32 {
        1u32 << (self.node_prefix - self.cidr.prefix)
    }

    /// Node subnet number `index`.
    pub fn node_subnet(&self, index: u32) -> Option<Ipv4Cidr> {
        (index < self.node_subnets()).then(|| Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(self.cidr.network) + (index << (32 - u32::from(self.node_prefix)))),
            prefix: self.node_prefix,
        })
    }

    /// The lowest node subnet not in `taken`.
    pub fn allocate_node_subnet(&self, taken: &BTreeSet<u32>) -> Result<u32, IpamError> {
        (0..self.node_subnets())
            .find(|i| !taken.contains(i))
            .ok_or(IpamError::ClusterFull { cidr: self.cidr, count: self.node_subnets() })
    }
}

/// The gateway of a node subnet (its first host address): the node's own address on every
/// tenant bridge, where instances send what leaves their tenant network.
pub fn gateway(subnet: &Ipv4Cidr) -> Ipv4Addr {
    subnet.nth(1).unwrap_or(subnet.network)
}

/// The lowest address of `subnet` for an instance (not the network, the gateway or the
/// broadcast address) that is not in `taken`.
pub fn allocate_instance(subnet: &Ipv4Cidr, taken: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
    let hosts = subnet.size().saturating_sub(3);
    (2..subnet.size() - 1)
        .filter_map(|i| subnet.nth(i))
        .find(|ip| !taken.contains(ip))
        .ok_or(IpamError::SubnetExhausted { subnet: *subnet, count: hosts as u32 })
}

/// The lowest VXLAN network identifier for a new tenant. 1 to 4095 are left to the site's own
/// VLAN-mapped segments; the 24-bit space is otherwise ours.
pub fn allocate_vni(taken: &BTreeSet<u32>) -> Result<u32, IpamError> {
    (FIRST_VNI..=MAX_VNI).find(|v| !taken.contains(v)).ok_or(IpamError::NoVni)
}

pub const FIRST_VNI: u32 = 4096;
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// A stable, locally administered unicast MAC for an instance: the same id gives the same MAC
/// on every node and after every restart.
pub fn mac_for(id: &str) -> [u8; 6] {
    let h = fnv1a(id.as_bytes());
    let b = h.to_be_bytes();
    // 0x02: locally administered, unicast. 0x53 ('S') keeps ours recognisable.
    [0x02, 0x53, b[0] ^ b[4], b[1] ^ b[5], b[2] ^ b[6], b[3] ^ b[7]]
}

/// FNV-1a, 64 bits: stable across releases and platforms (std's hasher is not).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_strictly_and_name_the_network_when_host_bits_are_set() {
        assert_eq!(cidr("10.240.0.0/16").to_string(), "10.240.0.0/16");
        assert_eq!(cidr("10.240.0.0/16").netmask(), Ipv4Addr::new(255, 255, 0, 0));
        for bad in ["10.240.0.0", "10.240.0.0/33", "10.240.0/16", "10.240.0.0/+8", "/8", "10.0.0.0/ 8", ""] {
            assert!(matches!(bad.parse::<Ipv4Cidr>(), Err(IpamError::Malformed(_))), "{bad}");
        }
        let e = "10.240.1.0/16".parse::<Ipv4Cidr>().unwrap_err();
        assert_eq!(e.to_string(), "10.240.1.0/16 has host bits set: the network is 10.240.0.0/16");
        assert!(cidr("10.0.0.0/8").overlaps(&cidr("10.240.0.0/16")));
        assert!(cidr("10.240.0.0/16").overlaps(&cidr("10.0.0.0/8")));
        assert!(!cidr("10.240.0.0/16").overlaps(&cidr("10.241.0.0/16")));
        assert_eq!(cidr("0.0.0.0/0").size(), 1 << 32);
    }

    #[test]
    fn tiny_reserved_or_overlapping_cluster_networks_are_refused_with_the_reason() {
        let e = ClusterNetwork::new(cidr("10.240.0.0/23"), 24).unwrap_err();
        assert!(e.to_string().contains("too small") && e.to_string().contains("/22 or larger"), "{e}");
        assert!(ClusterNetwork::new(cidr("10.240.0.0/22"), 24).is_ok());
        assert!(matches!(ClusterNetwork::new(cidr("10.0.0.0/8"), 30), Err(IpamError::NodePrefix(30))));
        let e = ClusterNetwork::new(cidr("169.254.0.0/16"), 24).unwrap_err();
        assert!(e.to_string().contains("metadata"), "{e}");
        assert!(ClusterNetwork::new(cidr("0.0.0.0/0"), 24).is_err());
        let net = ClusterNetwork::new(cidr("10.0.0.0/8"), 24).unwrap();
        let e = net.check_disjoint(&[cidr("192.168.1.0/24"), cidr("10.1.2.0/24")]).unwrap_err();
        assert_eq!(e.to_string(), "the cluster network 10.0.0.0/8 overlaps 10.1.2.0/24 (a network of this host)");
        assert!(net.check_disjoint(&[cidr("192.168.1.0/24")]).is_ok());
    }

    #[test]
    fn node_subnets_are_handed_out_lowest_first_and_refused_when_all_are_taken() {
        let net = ClusterNetwork::new(cidr("10.240.0.0/22"), 24).unwrap();
        assert_eq!(net.node_subnets(), 4);
        assert_eq!(net.node_subnet(2), Some(cidr("10.240.2.0/24")));
        assert_eq!(net.node_subnet(4), None);
        let mut taken = BTreeSet::from([0, 2]);
        assert_eq!(net.allocate_node_subnet(&taken), Ok(1));
        taken.extend([1, 3]);
        let e = net.allocate_node_subnet(&taken).unwrap_err();
        assert_eq!(e.to_string(), "the cluster network 10.240.0.0/22 has no free node subnet: all 4 are assigned");
    }

    #[test]
    fn instance_addresses_skip_network_gateway_and_broadcast_and_are_never_handed_out_twice() {
        let subnet = cidr("10.240.3.0/28");
        assert_eq!(gateway(&subnet), Ipv4Addr::new(10, 240, 3, 1));
        let mut taken = BTreeSet::new();
        for _ in 0..13 {
            let ip = allocate_instance(&subnet, &taken).unwrap();
            assert!(subnet.contains(ip) && ip != gateway(&subnet) && ip != subnet.last() && ip != subnet.network());
            assert!(taken.insert(ip), "{ip} handed out twice");
        }
        let e = allocate_instance(&subnet, &taken).unwrap_err();
        assert_eq!(e.to_string(), "the node subnet 10.240.3.0/28 has no free address: all 13 are in use");
        // Released, it is handed out again.
        taken.remove(&Ipv4Addr::new(10, 240, 3, 7));
        assert_eq!(allocate_instance(&subnet, &taken), Ok(Ipv4Addr::new(10, 240, 3, 7)));
    }

    #[test]
    fn macs_are_stable_unicast_local_and_differ_between_ids() {
        let a = mac_for("web-0-7f3a");
        assert_eq!(a, mac_for("web-0-7f3a"));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered unicast");
        let all: BTreeSet<_> = (0..10_000).map(|i| mac_for(&format!("i{i}"))).collect();
        assert_eq!(all.len(), 10_000);
        assert_eq!(format_mac(&[2, 0x53, 0, 1, 0xab, 0xff]), "02:53:00:01:ab:ff");
        assert_eq!(allocate_vni(&BTreeSet::from([4096, 4097])), Ok(4098));
    }
}
