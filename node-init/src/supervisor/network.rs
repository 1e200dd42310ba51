//! This node's side of the cluster network: what its microVM networking should be (from the
//! replicated state and the local instance directories), made so on the host by netstack's
//! idempotent reconciler, and what one instance's VMM is given (its tap, MAC and `ip=`).
//!
//! Level-triggered like the rest of the supervisor: every pass computes the whole wanted
//! state afresh and reconciles when it differs from what was last made so (or after a
//! restart, once), so taps, bridges, FDB entries, routes and rules of instances that are gone
//! are removed by the same code that creates them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use shoal_netstack::ipam;
use shoal_netstack::names;
use shoal_netstack::netlink::Netlink;
use shoal_netstack::nft::Published;
use shoal_netstack::node::{InstanceNet, NodeNet, TenantNet};
use tracing::{info, warn};

use super::layout::Meta;
use super::Ctx;
use crate::state::network::underlay_ip;
use crate::state::objects::{Desired, Instance, InstanceState, PortProtocol};

/// What the VMM of one instance is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub tap: String,
    pub mac: String,
    /// The kernel command line's `ip=` (the guest's address, gateway and netmask).
    pub ip_arg: String,
}

/// The netlink socket and what was last made so.
#[derive(Default)]
pub(super) struct NetState {
    netlink: Option<Netlink>,
    applied: Option<NodeNet>,
    /// The last failure, said once (every pass retries).
    failing: Option<String>,
}

/// The interface `inst` gets, if the cluster gave it an address.
pub fn iface(want: &NodeNet, inst: &Instance) -> Option<Iface> {
    let ip = inst.address?;
    Some(Iface {
        tap: names::tap(&inst.uid)?,
        mac: ipam::format_mac(&ipam::mac_for(&inst.uid)),
        ip_arg: want.kernel_ip_arg(ip)?,
    })
}

/// Makes the host's microVM networking match the state; returns what it is now (None: this
/// node is not in the state yet, or wires nothing: `--no-instance-network`).
pub(super) async fn sync(ctx: &Ctx) -> Result<Option<NodeNet>, String> {
    if !ctx.cfg.network {
        return Ok(None);
    }
    let mut net = ctx.net.lock().await;
    if net.netlink.is_none() {
        net.netlink = Some(Netlink::connect().map_err(|e| format!("cannot open rtnetlink: {e}"))?);
    }
    let Some(nl) = net.netlink.as_ref() else { return Ok(None) };
    let Some(want) = wanted(ctx, nl).await? else {
        return Ok(None);
    };
    if net.applied.as_ref() == Some(&want) {
        return Ok(Some(want));
    }
    match shoal_netstack::node::reconcile(nl, &want).await {
        Ok(report) => {
            if !report.changes.is_empty() {
                info!(changes = %report.changes.join("; "), "microVM networking reconciled");
            }
            net.applied = Some(want.clone());
            net.failing = None;
            Ok(Some(want))
        }
        Err(e) => {
            net.applied = None;
            let e = e.to_string();
            if net.failing.as_ref() != Some(&e) {
                warn!(error = %e, "microVM networking did not reconcile");
                net.failing = Some(e.clone());
            }
            Err(e)
        }
    }
}

/// What this node's networking should be now.
async fn wanted(ctx: &Ctx, nl: &Netlink) -> Result<Option<NodeNet>, String> {
    let me = ctx.node.id();
    let local: BTreeMap<String, Meta> = super::scan(&ctx.node.instances_dir);
    let (subnet, cluster, my_ip, tenants, peers, published) = {
        let state = ctx.node.agent.shared.state();
        let Some(node) = state.nodes.get(&me) else { return Ok(None) };
        let subnet = node.subnet;
        let cluster = state.cluster_network().map_err(|e| e.to_string())?.cidr;
        let my_ip = underlay_ip(node).ok_or_else(|| format!("this node's address {} is not IPv4", node.raft_addr))?;
        let mut tenants: BTreeMap<u32, TenantNet> = BTreeMap::new();
        for inst in state.instances_on(me) {
            let (Some(ip), Some(meta)) = (inst.address, local.get(&inst.uid)) else { continue };
            if inst.desired != Desired::Running || inst.state == InstanceState::Lost {
                continue;
            }
            let Some(vni) = state.tenants.get(&inst.tenant).and_then(|t| t.vni) else { continue };
            let owner = (meta.jail_uid, meta.jail_uid);
            // A deployment's `egress` (true unless it says otherwise; an instance whose
            // deployment is gone keeps what it had by default).
            let egress =
                state.deployments.get(&(inst.tenant.clone(), inst.deployment.clone())).is_none_or(|d| d.spec.egress);
            let t = tenants.entry(vni).or_default();
            t.instances.insert(inst.uid.clone(), InstanceNet { ip, mac: ipam::mac_for(&inst.uid), owner, egress });
        }
        // The tenant's instances elsewhere: their nodes get this tenant's broadcasts, their
        // MACs point at their nodes.
        for (tenant, t) in &state.tenants {
            let Some(vni) = t.vni else { continue };
            let Some(tn) = tenants.get_mut(&vni) else { continue };
            let first = (tenant.clone(), String::new());
            for ((tn_name, _), inst) in state.instances.range(first..) {
                if tn_name != tenant {
                    break;
                }
                let Some(node) = inst.node.filter(|n| *n != me) else { continue };
                if inst.address.is_none() || !inst.is_active() || inst.state == InstanceState::Lost {
                    continue;
                }
                let Some(ip) = state.nodes.get(&node).and_then(underlay_ip) else { continue };
                tn.remotes.entry(ip).or_default().insert(ipam::mac_for(&inst.uid));
            }
        }
        let peers: Vec<Ipv4Addr> =
            state.nodes.iter().filter(|(id, _)| **id != me).filter_map(|(_, n)| underlay_ip(n)).collect();
        // Every deployment's published ports, with its running instances here and elsewhere.
        let mut published = Vec::new();
        for (key, d) in state.deployments.iter().filter(|(_, d)| !d.spec.ports.is_empty()) {
            let (mut local, mut remote) = (Vec::new(), Vec::new());
            for id in state.index.deployment_instances.get(key).into_iter().flatten() {
                let Some(inst) = state.instances.get(&(key.0.clone(), id.clone())) else { continue };
                let (Some(ip), Some(node), InstanceState::Running) = (inst.address, inst.node, inst.state) else {
                    continue;
                };
                if node == me {
                    local.push(ip);
                } else if let Some(n) = state.nodes.get(&node).and_then(underlay_ip) {
                    remote.push(n);
                }
            }
            for p in &d.spec.ports {
                published.push(Published {
                    tcp: p.protocol == PortProtocol::Tcp,
                    node_port: p.node_port,
                    port: p.port,
                    local: local.clone(),
                    remote: remote.clone(),
                });
            }
        }
        (subnet, cluster, my_ip, tenants, peers, published)
    };
    let dev = underlay(nl, my_ip).await?;
    Ok(Some(NodeNet {
        underlay_dev: dev.name,
        underlay_ip: my_ip,
        underlay_mtu: dev.mtu,
        cluster,
        subnet,
        tenants,
        peers,
        published,
    }))
}

async fn underlay(nl: &Netlink, ip: Ipv4Addr) -> Result<shoal_netstack::netlink::Link, String> {
    nl.device_with(ip)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no interface of this host holds its cluster address {ip}"))
}
