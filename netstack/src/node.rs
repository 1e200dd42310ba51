//! The node's microVM networking as one desired state, and the reconciler that makes the host
//! match it: per tenant a bridge holding the gateway address and a VXLAN device (no learning;
//! its FDB lists the tenant's instances on other nodes and floods to those nodes only), per
//! instance a tap on its tenant's bridge and a host route, per tenant bridge a rule that keeps
//! its packets out of every other tenant's addresses. Everything it creates carries a name (or
//! route protocol, or rule priority) that says it is netstack's, so a reconcile after a crash
//! or restart finds it, removes what is no longer wanted, and leaves what is right alone:
//! running it twice changes nothing the second time.
//!
//! Isolation: a tenant's instances share an L2 network with its own instances only (its VNI);
//! the host routes between tenant bridges only what the rule lets through, and the rule refuses
//! anything from a tenant bridge to the cluster network (the gateway address itself is local
//! and answered before the rule applies). Egress: an instance whose deployment allows it reaches
//! outside the cluster network masqueraded as the node; one that does not is dropped there
//! (`nft.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::ipam::{self, Ipv4Cidr};
use crate::names::{self, Owned};
use crate::netlink::{FdbEntry, Link, Netlink, NetlinkError, Route, Rule};
use crate::tap;

/// VXLAN over IPv4 takes 50 bytes of every underlay frame.
pub const VXLAN_OVERHEAD: u32 = 50;

/// One instance's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNet {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The jail's uid and gid: the tap's owner.
    pub owner: (u32, u32),
    /// Whether it may reach outside the cluster network (masqueraded as the node).
    pub egress: bool,
}

/// One tenant's network on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantNet {
    /// This node's instances of the tenant, by uid.
    pub instances: BTreeMap<String, InstanceNet>,
    /// The other nodes that run instances of the tenant (their underlay addresses), with those
    /// instances' MACs.
    pub remotes: BTreeMap<Ipv4Addr, BTreeSet<[u8; 6]>>,
}

/// What this node's microVM networking should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    /// The device the overlay runs over, and this node's address on it.
    pub underlay_dev: String,
    pub underlay_ip: Ipv4Addr,
    /// The underlay's MTU; the overlay's is [`VXLAN_OVERHEAD`] less.
    pub underlay_mtu: u32,
    pub cluster: Ipv4Cidr,
    /// This node's subnet of the cluster network (None until the cluster places an instance
    /// here: such a node still serves published ports and removes what is stale).
    pub subnet: Option<Ipv4Cidr>,
    /// By VNI.
    pub tenants: BTreeMap<u32, TenantNet>,
    /// The other nodes' underlay addresses.
    pub peers: Vec<Ipv4Addr>,
    /// Every deployment's published ports (each node serves them all).
    pub published: Vec<crate::nft::Published>,
}

impl NodeNet {
    pub fn overlay_mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD).max(576)
    }

    /// The kernel command line `ip=` that gives an instance its address (the guest's only
    /// interface, no autoconfiguration), as Documentation/admin-guide/nfs/nfsroot.rst reads it.
    pub fn kernel_ip_arg(&self, ip: Ipv4Addr) -> Option<String> {
        let subnet = self.subnet.as_ref()?;
        Some(format!("ip={ip}::{}:{}::eth0:off", ipam::gateway(subnet), self.cluster.netmask()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Nft(#[from] crate::nft::NftError),
    #[error("instance uid {0:?} cannot name a tap (it must be at least 8 lower-case hex digits)")]
    BadUid(String),
    #[error("{ip} of instance {uid} is not in this node's subnet {subnet}")]
    Foreign { uid: String, ip: Ipv4Addr, subnet: Ipv4Cidr },
    #[error("instance {0} is to be wired but this node has no subnet of the cluster network")]
    NoSubnet(String),
}

/// What a reconcile changed, one line each ("created bridge shb001000", ...): empty when the
/// host already matched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<String>,
}

/// Makes the host's networking match `want`, changing only what differs.
pub async fn reconcile(nl: &Netlink, want: &NodeNet) -> Result<Report, NetError> {
    let mut report = Report::default();
    let underlay = nl.index(&want.underlay_dev).await?;
    for (uid, i) in want.tenants.values().flat_map(|t| &t.instances) {
        if names::tap(uid).is_none() {
            return Err(NetError::BadUid(uid.clone()));
        }
        let Some(subnet) = want.subnet else { return Err(NetError::NoSubnet(uid.clone())) };
        if !subnet.contains(i.ip) {
            return Err(NetError::Foreign { uid: uid.clone(), ip: i.ip, subnet });
        }
    }
    if !want.tenants.is_empty() || !want.published.is_empty() {
        // Instances' packets to their gateway for anywhere else are routed (egress, published
        // ports); the rules below keep them out of other tenants.
        crate::netlink::sysctl("net/ipv4/ip_forward", "1")?;
    }
    let mtu = want.overlay_mtu();
    // Unused without tenants (a node with instances has a subnet: checked above).
    let gateway = want.subnet.as_ref().map(ipam::gateway).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let mut links: BTreeMap<String, Link> = nl.links().await?.into_iter().map(|l| (l.name.clone(), l)).collect();
    let mut keep_links = BTreeSet::new();
    let mut keep_routes = BTreeSet::new();
    let mut keep_rules = BTreeSet::new();
    for (vni, tenant) in &want.tenants {
        let br_name = names::bridge(*vni);
        let br = ensure_link(nl, &mut links, &br_name, &mut report, || nl.add_bridge(&br_name)).await?;
        ensure_state(nl, &br, None, mtu, &mut report).await?;
        if !nl.addresses(br.index).await?.contains(&(gateway, 32)) {
            nl.add_address(br.index, gateway, 32).await?;
            report.changes.push(format!("added {gateway}/32 to {br_name}"));
        }
        keep_links.insert(br_name.clone());

        let vx_name = names::vxlan(*vni);
        if let Some(l) = links.get(&vx_name) {
            if l.vxlan != Some((*vni, Some(want.underlay_ip), Some(underlay))) {
                nl.delete(l.index).await?;
                report.changes.push(format!("deleted {vx_name}: its VNI, address or device changed"));
                links.remove(&vx_name);
            }
        }
        let vx = ensure_link(nl, &mut links, &vx_name, &mut report, || {
            nl.add_vxlan(&vx_name, *vni, want.underlay_ip, underlay)
        })
        .await?;
        ensure_state(nl, &vx, Some(br.index), mtu, &mut report).await?;
        keep_links.insert(vx_name.clone());
        let want_fdb: BTreeSet<FdbEntry> = tenant
            .remotes
            .iter()
            .flat_map(|(dst, macs)| {
                std::iter::once(FdbEntry { mac: [0; 6], dst: *dst })
                    .chain(macs.iter().map(|m| FdbEntry { mac: *m, dst: *dst }))
            })
            .collect();
        let have_fdb: BTreeSet<FdbEntry> = nl.fdb(vx.index).await?.into_iter().collect();
        for e in want_fdb.difference(&have_fdb) {
            nl.fdb_append(vx.index, e).await?;
            report.changes.push(format!("FDB {vx_name}: {} -> {}", ipam::format_mac(&e.mac), e.dst));
        }
        for e in have_fdb.difference(&want_fdb) {
            nl.fdb_delete(vx.index, e).await?;
            report.changes.push(format!("FDB {vx_name}: removed {} -> {}", ipam::format_mac(&e.mac), e.dst));
        }
        keep_rules.insert(Rule { iif: br_name.clone(), dst: want.cluster.network(), prefix: want.cluster.prefix() });

        for (uid, inst) in &tenant.instances {
            let Some(tap_name) = names::tap(uid) else { continue };
            let (u, g) = inst.owner;
            let t =
                ensure_link(nl, &mut links, &tap_name, &mut report, || async { tap::create(&tap_name, u, g) }).await?;
            ensure_state(nl, &t, Some(br.index), mtu, &mut report).await?;
            keep_links.insert(tap_name);
            keep_routes.insert(Route { dst: inst.ip, prefix: 32, oif: Some(br.index), gateway: None });
        }
    }
    // What is ours and no longer wanted: instances' taps first, then what they hung on.
    let mut stale: Vec<(Owned, Link)> = links
        .values()
        .filter(|l| !keep_links.contains(&l.name))
        .filter_map(|l| names::parse(&l.name).map(|o| (o, l.clone())))
        .collect();
    stale.sort_by_key(|(o, _)| match o {
        Owned::Tap(_) => 0,
        Owned::Vxlan(_) => 1,
        Owned::Bridge(_) => 2,
    });
    for (_, l) in stale {
        nl.delete(l.index).await?;
        report.changes.push(format!("deleted {}", l.name));
    }
    let have_routes: BTreeSet<Route> = nl.routes().await?.into_iter().collect();
    for r in keep_routes.difference(&have_routes) {
        nl.add_route(r).await?;
        report.changes.push(format!("route {}/{} dev {}", r.dst, r.prefix, r.oif.unwrap_or_default()));
    }
    for r in have_routes.difference(&keep_routes) {
        nl.delete_route(r).await?;
        report.changes.push(format!("removed route {}/{}", r.dst, r.prefix));
    }
    let have_rules: BTreeSet<Rule> = nl.rules().await?.into_iter().collect();
    for r in keep_rules.difference(&have_rules) {
        nl.add_rule(r).await?;
        report.changes.push(format!("rule: from {} to {}/{} prohibited", r.iif, r.dst, r.prefix));
    }
    for r in have_rules.difference(&keep_rules) {
        nl.delete_rule(r).await?;
        report.changes.push(format!("removed rule from {}", r.iif));
    }
    let mut rules = crate::nft::Rules {
        cluster: Some(want.cluster),
        node_ip: Some(want.underlay_ip),
        peers: want.peers.clone(),
        published: want.published.clone(),
        ..Default::default()
    };
    for i in want.tenants.values().flat_map(|t| t.instances.values()) {
        if i.egress {
            rules.egress.push(i.ip);
        } else {
            rules.no_egress.push(i.ip);
        }
    }
    if crate::nft::apply(&rules)? {
        report.changes.push(format!(
            "nf_tables: {} instances masqueraded, {} kept inside the cluster network, {} published ports",
            rules.egress.len(),
            rules.no_egress.len(),
            rules.published.len()
        ));
    }
    Ok(report)
}

/// The link `name`, created with `create` if it is not there.
async fn ensure_link<F, Fut, E>(
    nl: &Netlink,
    links: &mut BTreeMap<String, Link>,
    name: &str,
    report: &mut Report,
    create: F,
) -> Result<Link, NetError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<NetError>,
{
    if let Some(l) = links.get(name) {
        return Ok(l.clone());
    }
    create().await.map_err(Into::into)?;
    let l = nl.link(name).await?.ok_or_else(|| NetlinkError::NoLink(name.to_string()))?;
    report.changes.push(format!("created {name}"));
    links.insert(name.to_string(), l.clone());
    Ok(l)
}

/// Puts `l` on `controller` (if given) with `mtu`, up.
async fn ensure_state(
    nl: &Netlink,
    l: &Link,
    controller: Option<u32>,
    mtu: u32,
    report: &mut Report,
) -> Result<(), NetError> {
    let wrong_controller = controller.is_some() && l.controller != controller;
    if wrong_controller || l.mtu != mtu || !l.up {
        // The MTU first: a port joins a bridge only with the bridge's MTU or it lowers the
        // bridge's.
        nl.set(l.index, None, Some(mtu), true).await?;
        if wrong_controller {
            nl.set(l.index, controller, None, true).await?;
        }
        report.changes.push(format!(
            "set {}: mtu {mtu}, up{}",
            l.name,
            if wrong_controller { ", on its bridge" } else { "" }
        ));
    }
    Ok(())
}
