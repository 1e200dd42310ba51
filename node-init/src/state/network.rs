//! The cluster network in the replicated state: the `cluster_cidr` and `node_subnet_prefix`
//! settings, a subnet per node, a VXLAN identifier per tenant, an address and a MAC per
//! instance. All of it is decided when a command is applied, by the pure allocators of
//! `shoal_netstack::ipam`, so every node computes the same answer from the same log.
//!
//! Invariants: two nodes never hold overlapping subnets; an address is held by at most one
//! instance, from its placement until it is finished for good or removed (a lost instance
//! keeps it: its node may still run it); two tenants never share a VNI.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use shoal_netstack::ipam::{self, ClusterNetwork, IpamError, Ipv4Cidr};

use super::command::FORMAT_NETWORK;
use super::objects::{Instance, Millis, Node, Tenant};
use super::State;

/// The cluster network's setting.
pub const CIDR_SETTING: &str = "cluster_cidr";
/// The label of a node whose agent wires no instance networks (`--no-instance-network`).
pub const NO_NETWORK_LABEL: (&str, &str) = ("shoal.io/instance-network", "off");
/// The size of every node's subnet of it (a prefix length).
pub const NODE_PREFIX_SETTING: &str = "node_subnet_prefix";
/// Used when `cluster_cidr` is not set: 256 node subnets of /24.
pub const DEFAULT_CIDR: &str = "10.200.0.0/16";

/// The cluster network from the given setting values (the defaults where unset).
pub fn parse_network(cidr: Option<&str>, node_prefix: Option<&str>) -> Result<ClusterNetwork, IpamError> {
    let cidr: Ipv4Cidr = cidr.unwrap_or(DEFAULT_CIDR).parse()?;
    let prefix = match node_prefix.map(str::trim) {
        None => ipam::DEFAULT_NODE_PREFIX,
        Some(p) => p.parse().map_err(|_| IpamError::Malformed(format!("node subnet prefix {p:?}")))?,
    };
    ClusterNetwork::new(cidr, prefix)
}

/// The node's underlay address (the host part of its Raft address).
pub fn underlay_ip(node: &Node) -> Option<Ipv4Addr> {
    node.raft_addr.parse::<std::net::SocketAddr>().ok().and_then(|a| match a.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(_) => None,
    })
}

impl State {
    /// Whether instances get networks (the cluster runs a format that knows them).
    pub fn networking(&self) -> bool {
        self.format >= FORMAT_NETWORK
    }

    /// The cluster network as its settings say now.
    pub fn cluster_network(&self) -> Result<ClusterNetwork, IpamError> {
        parse_network(self.setting(CIDR_SETTING), self.setting(NODE_PREFIX_SETTING))
    }

    /// Whether any node holds a subnet (the cluster network can no longer change).
    pub fn subnets_assigned(&self) -> bool {
        self.nodes.values().any(|n| n.subnet.is_some())
    }

    /// Refuses a cluster network that cannot serve this cluster: malformed, too small, or
    /// holding a node's own (underlay) address.
    pub fn check_network(&self, net: &ClusterNetwork) -> Result<(), String> {
        for n in self.nodes.values() {
            if let Some(ip) = underlay_ip(n).filter(|ip| net.cidr.contains(*ip)) {
                return Err(format!(
                    "the cluster network {} holds node {:016x}'s own address {ip}: choose one apart from the hosts' networks",
                    net.cidr, n.id
                ));
            }
        }
        Ok(())
    }

    /// Whether `node` wires its instances' networks (it does unless its agent runs with
    /// `--no-instance-network`, which labels it so).
    pub fn node_has_network(&self, node: u64) -> bool {
        self.nodes.get(&node).is_some_and(|n| n.labels.get(NO_NETWORK_LABEL.0).is_none_or(|v| v != NO_NETWORK_LABEL.1))
    }

    /// How many more instances `node` has addresses for: what its subnet (or the subnet it would
    /// be given) holds less what its instances hold. None when instances get no networks, or
    /// the cluster network is unusable (placing says why).
    pub fn free_addresses(&self, node: u64) -> Option<u64> {
        if !self.networking() || !self.node_has_network(node) {
            return None;
        }
        let net = self.cluster_network().ok()?;
        let n = self.nodes.get(&node)?;
        let subnet = match n.subnet {
            Some(s) => s,
            None => {
                let taken: BTreeSet<u32> =
                    self.nodes.values().filter_map(|o| o.subnet.and_then(|s| subnet_index(&net, &s))).collect();
                match net.allocate_node_subnet(&taken) {
                    Ok(i) => net.node_subnet(i)?,
                    Err(_) => return Some(0),
                }
            }
        };
        let used = self
            .index
            .node_instances
            .get(&node)
            .into_iter()
            .flatten()
            .filter(|k| self.instances.get(*k).is_some_and(|i| i.address.is_some()))
            .count() as u64;
        // Less the network, broadcast and gateway addresses.
        Some(subnet.size().saturating_sub(3).saturating_sub(used))
    }

    /// Gives `inst`, being placed on `node`, its address and MAC, its tenant a VNI and the node
    /// a subnet, whichever lack one; or says why it cannot be placed there (nothing changed).
    pub(super) fn wire(&mut self, inst: &mut Instance, node: u64, at: Millis) -> Result<(), String> {
        if !self.networking() || inst.address.is_some() || !self.node_has_network(node) {
            return Ok(());
        }
        let net = self.cluster_network().map_err(|e| format!("the cluster network setting is unusable: {e}"))?;
        let Some(n) = self.nodes.get(&node).cloned() else { return Err("no such node".into()) };
        let subnet = match n.subnet {
            Some(s) => s,
            None => {
                self.check_network(&net)?;
                let taken: BTreeSet<u32> =
                    self.nodes.values().filter_map(|o| o.subnet.and_then(|s| subnet_index(&net, &s))).collect();
                let i = net.allocate_node_subnet(&taken).map_err(|e| e.to_string())?;
                net.node_subnet(i).ok_or_else(|| "no node subnet".to_string())?
            }
        };
        let taken: BTreeSet<Ipv4Addr> = self
            .index
            .node_instances
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.instances.get(k).and_then(|i| i.address))
            .collect();
        let ip = ipam::allocate_instance(&subnet, &taken).map_err(|e| e.to_string())?;
        let Some(tenant) = self.tenants.get(&inst.tenant).cloned() else {
            return Err(format!("tenant {:?} does not exist", inst.tenant));
        };
        if tenant.vni.is_none() {
            let taken: BTreeSet<u32> = self.tenants.values().filter_map(|t| t.vni).collect();
            let vni = ipam::allocate_vni(&taken).map_err(|e| e.to_string())?;
            self.write_tenant(Tenant { vni: Some(vni), ..tenant }, at);
        }
        if n.subnet.is_none() {
            self.write_node(Node { subnet: Some(subnet), ..n }, at);
        }
        inst.address = Some(ip);
        inst.mac = Some(ipam::format_mac(&ipam::mac_for(&inst.uid)));
        Ok(())
    }
}

/// The number of `subnet` among `net`'s node subnets, if it is one of them.
fn subnet_index(net: &ClusterNetwork, subnet: &Ipv4Cidr) -> Option<u32> {
    if subnet.prefix() != net.node_prefix || !net.cidr.contains(subnet.network()) {
        return None;
    }
    let offset = u32::from(subnet.network()) - u32::from(net.cidr.network());
    Some(offset >> (32 - u32::from(net.node_prefix)))
}
