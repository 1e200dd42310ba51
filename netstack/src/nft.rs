//! Instances' egress through nf_tables, spoken over netlink (no `nft` binary in the image).
//!
//! netstack owns one table, `ip shoal`. It is replaced as a whole in one atomic batch whenever
//! what it should hold changes (add, delete, add again: the kernel applies all of it or none),
//! and carries a digest of its contents in its user data, so applying the same rules again reads
//! the table and changes nothing. Its chains:
//! - `forward` (filter, forward hook): replies of tracked connections pass; packets from an
//!   instance without egress to anywhere outside the cluster network are dropped;
//! - `postrouting` (nat): packets from an instance with egress to outside the cluster network
//!   leave with the node's address (masquerade), and so do connections this node hands on to
//!   another node's published port;
//! - `prerouting` (nat): a published port on the node's own address is spread over the
//!   deployment's running instances: those here directly, those on other nodes through their
//!   node's published port (with probability 1/(n-i) for the i-th of n, which is uniform, as
//!   kube-proxy does). A connection handed on by another node goes to this node's own instances
//!   only, so nothing travels back and forth.

use std::net::Ipv4Addr;

use crate::ipam::Ipv4Cidr;

pub const TABLE: &str = "shoal";

/// What the table should say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// The cluster network: traffic inside it is the overlay's business, not NAT's.
    pub cluster: Option<Ipv4Cidr>,
    /// This node's instances that may reach out.
    pub egress: Vec<Ipv4Addr>,
    /// This node's instances that may not.
    pub no_egress: Vec<Ipv4Addr>,
    /// This node's own address (where published ports listen) and the other nodes'.
    pub node_ip: Option<Ipv4Addr>,
    pub peers: Vec<Ipv4Addr>,
    pub published: Vec<Published>,
}

/// A deployment's published port on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub tcp: bool,
    pub node_port: u16,
    /// The instances' port.
    pub port: u16,
    /// Running instances on this node.
    pub local: Vec<Ipv4Addr>,
    /// Running instances elsewhere: their node's address, once per instance.
    pub remote: Vec<Ipv4Addr>,
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.egress.is_empty() && self.no_egress.is_empty() && self.published.is_empty()
    }

    /// A digest of the rules (FNV-1a over their text), kept in the table's user data.
    fn digest(&self) -> Vec<u8> {
        let text = format!("v2 {self:?}");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("shoal:{h:016x}").into_bytes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nf_tables netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("nf_tables refused {what}: {source}")]
    Refused {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

// Netlink and nf_tables constants (linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_IPV4: u8 = 2;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_FORWARD: u32 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_META_L4PROTO: u32 = 16;
const NFT_NG_RANDOM: u32 = 1;
const NFT_NAT_DNAT: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_CT_STATE: u32 = 0;
/// ct state established | related.
const CT_ESTABLISHED_RELATED: u32 = 2 | 4;

/// One netlink attribute being built.
struct Attrs(Vec<u8>);

impl Attrs {
    fn new() -> Attrs {
        Attrs(Vec::new())
    }

    fn put(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self
    }

    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(kind, &b)
    }

    fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.put(kind, &v.to_be_bytes())
    }

    fn nest(&mut self, kind: u16, inner: Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

/// An expression: its name and its attributes.
fn expr(name: &str, data: Attrs) -> Attrs {
    let mut e = Attrs::new();
    e.str(1, name); // NFTA_EXPR_NAME
    if !data.0.is_empty() {
        e.nest(2, data); // NFTA_EXPR_DATA
    }
    e
}

/// Loads 4 bytes of the IPv4 header at `offset` (12: source, 16: destination) into reg 1.
fn load_ip(offset: u32) -> Attrs {
    let mut a = Attrs::new();
    a.be32(1, NFT_REG_1).be32(2, NFT_PAYLOAD_NETWORK_HEADER).be32(3, offset).be32(4, 4);
    expr("payload", a)
}

fn data_value(bytes: &[u8]) -> Attrs {
    let mut d = Attrs::new();
    d.put(1, bytes); // NFTA_DATA_VALUE
    d
}

fn cmp(op: u32, bytes: &[u8]) -> Attrs {
    let mut a = Attrs::new();
    a.be32(1, NFT_REG_1).be32(2, op).nest(3, data_value(bytes));
    expr("cmp", a)
}

/// reg 1 &= mask (xor 0).
fn and(mask: &[u8]) -> Attrs {
    let mut a = Attrs::new();
    a.be32(1, NFT_REG_1)
        .be32(2, NFT_REG_1)
        .be32(3, mask.len() as u32)
        .nest(4, data_value(mask))
        .nest(5, data_value(&vec![0; mask.len()]));
    expr("bitwise", a)
}

fn verdict(code: u32) -> Attrs {
    let mut v = Attrs::new();
    v.be32(1, code); // NFTA_VERDICT_CODE
    let mut d = Attrs::new();
    d.nest(2, v); // NFTA_DATA_VERDICT
    let mut a = Attrs::new();
    a.be32(1, NFT_REG_VERDICT).nest(2, d);
    expr("immediate", a)
}

/// The destination is outside `cluster`.
fn daddr_outside(cluster: &Ipv4Cidr) -> [Attrs; 3] {
    [load_ip(16), and(&cluster.netmask().octets()), cmp(NFT_CMP_NEQ, &cluster.network().octets())]
}

fn saddr_is(ip: Ipv4Addr) -> [Attrs; 2] {
    [load_ip(12), cmp(NFT_CMP_EQ, &ip.octets())]
}

/// Loads the transport header's destination port into reg 1.
fn load_port() -> Attrs {
    let mut a = Attrs::new();
    a.be32(1, NFT_REG_1).be32(2, NFT_PAYLOAD_TRANSPORT_HEADER).be32(3, 2).be32(4, 2);
    expr("payload", a)
}

/// The packet is of `p`'s protocol, to port `p.node_port`.
fn proto_port(p: &Published) -> Vec<Attrs> {
    let mut meta = Attrs::new();
    meta.be32(1, NFT_REG_1).be32(2, NFT_META_L4PROTO);
    vec![
        expr("meta", meta),
        cmp(NFT_CMP_EQ, &[if p.tcp { 6 } else { 17 }]),
        load_port(),
        cmp(NFT_CMP_EQ, &p.node_port.to_be_bytes()),
    ]
}

fn copy(a: &[Attrs]) -> Vec<Attrs> {
    a.iter().map(|x| Attrs(x.0.clone())).collect()
}

/// `matches`, then the i-th of `targets` with probability 1/(n-i): a uniform choice.
fn spread(matches: &[Attrs], targets: &[(Ipv4Addr, u16)]) -> Vec<Vec<Attrs>> {
    let n = targets.len();
    targets
        .iter()
        .enumerate()
        .map(|(i, (ip, port))| {
            let mut e = copy(matches);
            if n - i > 1 {
                let mut ng = Attrs::new();
                ng.be32(1, NFT_REG_1).be32(2, (n - i) as u32).be32(3, NFT_NG_RANDOM);
                e.push(expr("numgen", ng));
                e.push(cmp(NFT_CMP_EQ, &0u32.to_ne_bytes()));
            }
            for (reg, bytes) in [(NFT_REG_1, ip.octets().to_vec()), (NFT_REG_2, port.to_be_bytes().to_vec())] {
                let mut imm = Attrs::new();
                imm.be32(1, reg).nest(2, data_value(&bytes));
                e.push(expr("immediate", imm));
            }
            let mut nat = Attrs::new();
            nat.be32(1, NFT_NAT_DNAT).be32(2, u32::from(NFPROTO_IPV4)).be32(3, NFT_REG_1).be32(5, NFT_REG_2);
            e.push(expr("nat", nat));
            e
        })
        .collect()
}

/// A netlink message: header, nfgenmsg, attributes.
fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &Attrs) -> Vec<u8> {
    let len = 16 + 4 + attrs.0.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(0); // NFNETLINK_V0
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(&attrs.0);
    m
}

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// The batch that makes the table hold `rules` (or, empty, removes it).
fn batch(rules: &Rules) -> (Vec<u8>, u32) {
    let mut out = Vec::new();
    let mut seq = 1u32;
    let mut acked = 0u32;
    let mut push = |out: &mut Vec<u8>, kind: u16, flags: u16, attrs: &Attrs, acked: &mut u32| {
        out.extend(message(nft_type(kind), NLM_F_REQUEST | NLM_F_ACK | flags, seq, NFPROTO_IPV4, 0, attrs));
        seq += 1;
        *acked += 1;
    };
    out.extend(message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0, NFNL_SUBSYS_NFTABLES, &Attrs::new()));
    let mut table = Attrs::new();
    table.str(1, TABLE);
    // Created if missing so that the delete that follows always finds it.
    push(&mut out, NFT_MSG_NEWTABLE, NLM_F_CREATE, &table, &mut acked);
    push(&mut out, NFT_MSG_DELTABLE, 0, &table, &mut acked);
    if !rules.is_empty() {
        let mut t = Attrs::new();
        t.str(1, TABLE).put(6, &rules.digest()); // NFTA_TABLE_USERDATA
        push(&mut out, NFT_MSG_NEWTABLE, NLM_F_CREATE, &t, &mut acked);
        for (name, kind, hook, prio) in [
            ("forward", "filter", NF_INET_FORWARD, 0i32),
            ("postrouting", "nat", NF_INET_POST_ROUTING, 100),
            ("prerouting", "nat", NF_INET_PRE_ROUTING, -100),
        ] {
            let mut h = Attrs::new();
            h.be32(1, hook).be32(2, prio as u32);
            let mut c = Attrs::new();
            c.str(1, TABLE).str(3, name).nest(4, h).str(7, kind);
            push(&mut out, NFT_MSG_NEWCHAIN, NLM_F_CREATE, &c, &mut acked);
        }
        let mut rule = |chain: &str, exprs: Vec<Attrs>, out: &mut Vec<u8>, acked: &mut u32| {
            let mut list = Attrs::new();
            for e in exprs {
                list.nest(1, e); // NFTA_LIST_ELEM
            }
            let mut r = Attrs::new();
            r.str(1, TABLE).str(2, chain).nest(4, list);
            push(out, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &r, acked);
        };
        let ct = {
            let mut a = Attrs::new();
            a.be32(1, NFT_REG_1).be32(2, NFT_CT_STATE);
            expr("ct", a)
        };
        rule(
            "forward",
            vec![ct, and(&CT_ESTABLISHED_RELATED.to_ne_bytes()), cmp(NFT_CMP_NEQ, &[0; 4]), verdict(NF_ACCEPT)],
            &mut out,
            &mut acked,
        );
        if let Some(cluster) = &rules.cluster {
            for ip in &rules.no_egress {
                let mut e: Vec<Attrs> = saddr_is(*ip).into();
                e.extend(daddr_outside(cluster));
                e.push(verdict(NF_DROP));
                rule("forward", e, &mut out, &mut acked);
            }
            for ip in &rules.egress {
                let mut e: Vec<Attrs> = saddr_is(*ip).into();
                e.extend(daddr_outside(cluster));
                e.push(expr("masq", Attrs::new()));
                rule("postrouting", e, &mut out, &mut acked);
            }
        }
        if let Some(node_ip) = rules.node_ip {
            for p in &rules.published {
                let mut base = proto_port(p);
                base.extend([load_ip(16), cmp(NFT_CMP_EQ, &node_ip.octets())]);
                let local: Vec<(Ipv4Addr, u16)> = p.local.iter().map(|ip| (*ip, p.port)).collect();
                // Handed on by another node: this node's instances only.
                if !local.is_empty() {
                    for peer in &rules.peers {
                        let mut m = copy(&base);
                        m.extend(saddr_is(*peer));
                        for e in spread(&m, &local) {
                            rule("prerouting", e, &mut out, &mut acked);
                        }
                    }
                }
                let mut all = local.clone();
                all.extend(p.remote.iter().map(|n| (*n, p.node_port)));
                for e in spread(&base, &all) {
                    rule("prerouting", e, &mut out, &mut acked);
                }
                // What is handed on leaves as this node, so the answers come back through it.
                let mut hops = p.remote.clone();
                hops.sort();
                hops.dedup();
                for n in hops {
                    let mut e = vec![load_ip(16), cmp(NFT_CMP_EQ, &n.octets())];
                    e.extend(proto_port(p));
                    e.push(expr("masq", Attrs::new()));
                    rule("postrouting", e, &mut out, &mut acked);
                }
            }
        }
    }
    out.extend(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, 0, NFNL_SUBSYS_NFTABLES, &Attrs::new()));
    (out, acked)
}

/// A NETLINK_NETFILTER socket.
struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn open() -> Result<Socket, NftError> {
        use std::os::fd::FromRawFd;
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        let s = Socket(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        let tv = libc::timeval { tv_sec: 3, tv_usec: 0 };
        // SAFETY: SO_RCVTIMEO reads a timeval of the given size from a live local.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        Ok(s)
    }

    fn send(&self, bytes: &[u8]) -> Result<(), NftError> {
        use std::os::fd::AsRawFd;
        let mut addr: libc::sockaddr_nl = // SAFETY: an all-zero sockaddr_nl is valid (the kernel).
            unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sendto reads `bytes` and `addr`, both live for the call.
        let r = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The messages of one datagram: (type, payload after the netlink header).
    fn recv(&self) -> Result<Vec<(u16, Vec<u8>)>, NftError> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 65536];
        // SAFETY: recv writes at most buf.len() bytes into the live buffer.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        let mut out = Vec::new();
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if len < 16 || len > rest.len() {
                break;
            }
            out.push((u16::from_ne_bytes([rest[4], rest[5]]), rest[16..len].to_vec()));
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        Ok(out)
    }
}

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// The error code of an NLMSG_ERROR payload (0: an acknowledgement).
fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(-libc::EPROTO, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// The user data of table `shoal`, or None when there is no such table.
fn table_userdata(sock: &Socket) -> Result<Option<Vec<u8>>, NftError> {
    let mut a = Attrs::new();
    a.str(1, TABLE);
    sock.send(&message(nft_type(NFT_MSG_GETTABLE), NLM_F_REQUEST | NLM_F_ACK, 1, NFPROTO_IPV4, 0, &a))?;
    let mut found = None;
    loop {
        for (kind, payload) in sock.recv()? {
            match kind {
                NLMSG_ERROR => {
                    let code = error_code(&payload);
                    if code == 0 {
                        return Ok(found);
                    }
                    if -code == libc::ENOENT {
                        return Ok(None);
                    }
                    return Err(NftError::Refused {
                        what: "reading the table",
                        source: std::io::Error::from_raw_os_error(-code),
                    });
                }
                NLMSG_DONE => return Ok(found),
                k if k == nft_type(NFT_MSG_NEWTABLE) => {
                    let mut user = Vec::new();
                    let mut attrs = payload.get(4..).unwrap_or_default();
                    while attrs.len() >= 4 {
                        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                        if len < 4 || len > attrs.len() {
                            break;
                        }
                        if kind == 6 {
                            user = attrs[4..len].to_vec();
                        }
                        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
                    }
                    found = Some(user);
                }
                _ => {}
            }
        }
    }
}

/// Makes table `ip shoal` hold `rules`; true when it changed anything.
pub fn apply(rules: &Rules) -> Result<bool, NftError> {
    let sock = Socket::open()?;
    let have = table_userdata(&sock)?;
    match &have {
        None if rules.is_empty() => return Ok(false),
        Some(d) if !rules.is_empty() && *d == rules.digest() => return Ok(false),
        _ => {}
    }
    let (bytes, mut acks) = batch(rules);
    sock.send(&bytes)?;
    while acks > 0 {
        for (kind, payload) in sock.recv()? {
            if kind == NLMSG_ERROR {
                let code = error_code(&payload);
                if code != 0 {
                    return Err(NftError::Refused {
                        what: "the egress rules",
                        source: std::io::Error::from_raw_os_error(-code),
                    });
                }
                acks = acks.saturating_sub(1);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_aligned_and_nested_lengths_add_up() {
        let mut a = Attrs::new();
        a.str(1, "abc").be32(2, 7);
        assert_eq!(a.0.len(), 8 + 8);
        assert_eq!(&a.0[..4], &[8, 0, 1, 0]);
        let mut outer = Attrs::new();
        outer.nest(4, a);
        assert_eq!(u16::from_ne_bytes([outer.0[0], outer.0[1]]) as usize, 4 + 16);
        assert_eq!(u16::from_ne_bytes([outer.0[2], outer.0[3]]), 4 | NLA_F_NESTED);
    }

    #[test]
    fn the_digest_follows_the_rules() {
        let mut r = Rules {
            cluster: Some("10.240.0.0/16".parse().unwrap()),
            egress: vec![Ipv4Addr::new(10, 240, 0, 2)],
            ..Default::default()
        };
        let d = r.digest();
        assert_eq!(d, r.clone().digest());
        r.no_egress.push(Ipv4Addr::new(10, 240, 0, 3));
        assert_ne!(d, r.digest());
    }
}
