//! Links, addresses, routes, rules and bridge FDB entries through rtnetlink: the operations the
//! node's networking is built from, each as "make it so" or "list what is there" (the
//! reconciler in `node.rs` compares and changes only what differs).

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, IpVersion, LinkBridge, LinkUnspec, LinkVxlan, RouteMessageBuilder};

/// The route protocol number netstack's routes carry, so it finds them again (iproute2 shows
/// it as `proto 83`; 83 is 'S').
pub const ROUTE_PROTO: u8 = 83;
/// The priority of netstack's policy rules (before the main table's 32766).
pub const RULE_PRIORITY: u32 = 20_000;
/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface named {0}")]
    NoLink(String),
}

/// errno of a netlink error reply, if it is one.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// What the reconciler needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub controller: Option<u32>,
    pub up: bool,
    pub mtu: u32,
    /// VXLAN only: its network identifier, local address and underlay device.
    pub vxlan: Option<(u32, Option<Ipv4Addr>, Option<u32>)>,
    /// Its hardware address, when it has an Ethernet one.
    pub mac: Option<[u8; 6]>,
    /// Whether the link has a carrier (IFF_LOWER_UP).
    pub carrier: bool,
}

fn link_of(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        kind: None,
        controller: None,
        up: m.header.flags.contains(LinkFlags::Up),
        mtu: 0,
        vxlan: None,
        mac: None,
        carrier: m.header.flags.contains(LinkFlags::LowerUp),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Controller(c) => l.controller = Some(*c),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(a) => l.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let (mut id, mut local, mut dev) = (0, None, None);
                            for x in v {
                                match x {
                                    InfoVxlan::Id(i) => id = *i,
                                    InfoVxlan::Local(a) => local = Some(*a),
                                    InfoVxlan::Link(d) => dev = Some(*d),
                                    _ => {}
                                }
                            }
                            l.vxlan = Some((id, local, dev));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

/// One bridge FDB entry of a VXLAN device: frames for `mac` go to `dst` over the underlay
/// (all-zero `mac`: broadcast, multicast and unknown unicast, replicated to every such `dst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    pub dst: Ipv4Addr,
}

/// A route netstack made (main table, protocol [`ROUTE_PROTO`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
}

/// A policy rule netstack made (priority [`RULE_PRIORITY`]): packets that arrive on `iif` for
/// `dst/prefix` are refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub iif: String,
    pub dst: Ipv4Addr,
    pub prefix: u8,
}

/// A netlink connection in the calling thread's network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection; its driver runs on the current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> =
            self.handle.link().get().execute().try_collect().await.map_err(req("list links"))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let r: Result<Vec<LinkMessage>, _> =
            self.handle.link().get().match_name(name.to_string()).execute().try_collect().await;
        match r {
            Ok(m) => Ok(m.first().map(link_of)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(req(format!("look up {name}"))(e)),
        }
    }

    pub async fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.link(name).await?.map(|l| l.index).ok_or_else(|| NetlinkError::NoLink(name.into()))
    }

    pub async fn add_bridge(&self, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(req(format!("create bridge {name}")))
    }

    /// A VXLAN device with no learning: where frames go is only what the FDB says.
    pub async fn add_vxlan(&self, name: &str, vni: u32, local: Ipv4Addr, dev: u32) -> Result<(), NetlinkError> {
        let msg = LinkVxlan::new(name, vni).dev(dev).local(local).port(VXLAN_PORT).learning(false).build();
        self.handle.link().add(msg).execute().await.map_err(req(format!("create vxlan {name}")))
    }

    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetlinkError> {
        let msg = rtnetlink::LinkVeth::new(name, peer).build();
        self.handle.link().add(msg).execute().await.map_err(req(format!("create veth {name}")))
    }

    pub async fn delete(&self, index: u32) -> Result<(), NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            r => r.map_err(req(format!("delete link {index}"))),
        }
    }

    /// Sets `index`'s controller (bridge), MTU and state; `None` leaves one as it is.
    pub async fn set(
        &self,
        index: u32,
        controller: Option<u32>,
        mtu: Option<u32>,
        up: bool,
    ) -> Result<(), NetlinkError> {
        let mut b = LinkUnspec::new_with_index(index);
        if let Some(c) = controller {
            b = b.controller(c);
        }
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        b = if up { b.up() } else { b.down() };
        self.handle.link().set(b.build()).execute().await.map_err(req(format!("set link {index}")))
    }

    /// The kernel's address messages of link `index`.
    async fn address_messages(&self, index: u32) -> Result<Vec<AddressMessage>, NetlinkError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(req(format!("list addresses of {index}")))
    }

    /// The IPv4 addresses on `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let msgs = self.address_messages(index).await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .flat_map(|m| {
                m.attributes.iter().filter_map(move |a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// The link that holds `ip` (the underlay device of a node whose address it is).
    pub async fn device_with(&self, ip: Ipv4Addr) -> Result<Option<Link>, NetlinkError> {
        let mut covering = None;
        for l in self.links().await? {
            let addrs = self.addresses(l.index).await?;
            if addrs.iter().any(|(a, _)| *a == ip) {
                return Ok(Some(l));
            }
            // Every address of 127.0.0.1/8 is the loopback's, assigned or not (a node listening
            // on 127.0.0.2 runs over `lo`).
            if ip.is_loopback() && addrs.iter().any(|(a, _)| a.is_loopback()) {
                covering = Some(l);
            }
        }
        Ok(covering)
    }

    pub async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        match self.handle.address().add(index, IpAddr::V4(ip), prefix).execute().await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(req(format!("add {ip}/{prefix} to link {index}"))),
        }
    }

    pub async fn delete_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<(), NetlinkError> {
        let msgs = self.address_messages(index).await?;
        for m in msgs {
            let ours = m.header.index == index
                && m.header.prefix_len == prefix
                && m.attributes.iter().any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(a)) if *a == ip));
            if ours {
                match self.handle.address().del(m).execute().await {
                    Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
                    r => r.map_err(req(format!("delete {ip}/{prefix} from link {index}")))?,
                }
            }
        }
        Ok(())
    }

    fn default_route(gateway: Ipv4Addr, oif: u32) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gateway)
            .output_interface(oif)
            .protocol(RouteProtocol::Dhcp)
            .build()
    }

    /// The default route through `gateway` on `oif` that the uplink's lease gives (protocol
    /// `dhcp`, so it is told apart from netstack's instance routes).
    pub async fn add_default_route(&self, gateway: Ipv4Addr, oif: u32) -> Result<(), NetlinkError> {
        match self.handle.route().add(Self::default_route(gateway, oif)).execute().await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            res => res.map_err(req(format!("add default route via {gateway}"))),
        }
    }

    pub async fn delete_default_route(&self, gateway: Ipv4Addr, oif: u32) -> Result<(), NetlinkError> {
        match self.handle.route().del(Self::default_route(gateway, oif)).execute().await {
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            res => res.map_err(req(format!("delete default route via {gateway}"))),
        }
    }

    /// The bridge FDB entries of `index` that carry a remote address (VXLAN ones).
    pub async fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(req("list the bridge FDB"))?;
        let mut out = Vec::new();
        for m in msgs.iter().filter(|m| m.header.ifindex == index) {
            let mut mac = None;
            let mut dst = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = <[u8; 6]>::try_from(l.as_slice()).ok();
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                    // In the bridge family the crate cannot tell an IPv4 destination by the
                    // family, and hands over its bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
                    }
                    _ => {}
                }
            }
            if let (Some(mac), Some(dst)) = (mac, dst) {
                out.push(FdbEntry { mac, dst });
            }
        }
        Ok(out)
    }

    fn fdb_message(index: u32, e: &FdbEntry) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.flags = NeighbourFlags::Own;
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(e.mac.to_vec()));
        m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(e.dst)));
        m
    }

    /// Appends an FDB entry (`bridge fdb append`: several all-zero entries may coexist, one per
    /// remote node).
    pub async fn fdb_append(&self, index: u32, e: &FdbEntry) -> Result<(), NetlinkError> {
        let mut msg = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(Self::fdb_message(index, e)));
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let what = format!("add FDB entry {} -> {} on link {index}", crate::ipam::format_mac(&e.mac), e.dst);
        let mut handle = self.handle.clone();
        let mut replies = handle.request(msg).map_err(req(what.clone()))?;
        while let Some(reply) = futures_util::StreamExt::next(&mut replies).await {
            if let NetlinkPayload::Error(err) = reply.payload {
                if err.code.map(|c| -c.get()) == Some(libc::EEXIST) {
                    return Ok(());
                }
                return Err(req(what)(rtnetlink::Error::NetlinkError(err)));
            }
        }
        Ok(())
    }

    pub async fn fdb_delete(&self, index: u32, e: &FdbEntry) -> Result<(), NetlinkError> {
        match self.handle.neighbours().del(Self::fdb_message(index, e)).execute().await {
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            r => r.map_err(req(format!("delete FDB entry on link {index}"))),
        }
    }

    fn route_message(r: &Route) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.dst, r.prefix)
            .protocol(RouteProtocol::Other(ROUTE_PROTO));
        if let Some(oif) = r.oif {
            b = b.output_interface(oif);
        }
        if let Some(g) = r.gateway {
            b = b.gateway(g);
        }
        b.build()
    }

    /// netstack's routes in the main table.
    pub async fn routes(&self) -> Result<Vec<Route>, NetlinkError> {
        let q = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> =
            self.handle.route().get(q).execute().try_collect().await.map_err(req("list routes"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::Other(ROUTE_PROTO))
            .map(|m| {
                let mut r = Route {
                    dst: Ipv4Addr::UNSPECIFIED,
                    prefix: m.header.destination_prefix_length,
                    oif: None,
                    gateway: None,
                };
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => r.dst = *ip,
                        RouteAttribute::Oif(i) => r.oif = Some(*i),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(*g),
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }

    pub async fn add_route(&self, r: &Route) -> Result<(), NetlinkError> {
        match self.handle.route().add(Self::route_message(r)).execute().await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            res => res.map_err(req(format!("add route {}/{}", r.dst, r.prefix))),
        }
    }

    pub async fn delete_route(&self, r: &Route) -> Result<(), NetlinkError> {
        match self.handle.route().del(Self::route_message(r)).execute().await {
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            res => res.map_err(req(format!("delete route {}/{}", r.dst, r.prefix))),
        }
    }

    /// netstack's policy rules.
    pub async fn rules(&self) -> Result<Vec<Rule>, NetlinkError> {
        let msgs: Vec<RuleMessage> =
            self.handle.rule().get(IpVersion::V4).execute().try_collect().await.map_err(req("list rules"))?;
        let mut out = Vec::new();
        for m in &msgs {
            let (mut prio, mut iif, mut dst) = (None, None, None);
            for a in &m.attributes {
                match a {
                    RuleAttribute::Priority(p) => prio = Some(*p),
                    RuleAttribute::Iifname(n) => iif = Some(n.clone()),
                    RuleAttribute::Destination(IpAddr::V4(d)) => dst = Some(*d),
                    _ => {}
                }
            }
            if let (Some(RULE_PRIORITY), Some(iif), Some(dst)) = (prio, iif, dst) {
                out.push(Rule { iif, dst, prefix: m.header.dst_len });
            }
        }
        Ok(out)
    }

    fn rule_request(&self, r: &Rule) -> rtnetlink::RuleAddRequest<Ipv4Addr> {
        self.handle
            .rule()
            .add()
            .v4()
            .input_interface(r.iif.clone())
            .destination_prefix(r.dst, r.prefix)
            .priority(RULE_PRIORITY)
            .action(RuleAction::Prohibit)
    }

    pub async fn add_rule(&self, r: &Rule) -> Result<(), NetlinkError> {
        match self.rule_request(r).execute().await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            res => res.map_err(req(format!("add rule iif {} to {}/{}", r.iif, r.dst, r.prefix))),
        }
    }

    pub async fn delete_rule(&self, r: &Rule) -> Result<(), NetlinkError> {
        let mut add = self.rule_request(r);
        let msg = add.message_mut().clone();
        match self.handle.rule().del(msg).execute().await {
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            res => res.map_err(req(format!("delete rule iif {}", r.iif))),
        }
    }
}

/// Writes a sysctl under /proc/sys (`net/ipv4/ip_forward`, ...).
pub fn sysctl(path: &str, value: &str) -> std::io::Result<()> {
    let p = std::path::Path::new("/proc/sys").join(path);
    if std::fs::read_to_string(&p).map(|v| v.trim() == value).unwrap_or(false) {
        return Ok(());
    }
    std::fs::write(&p, value).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}
