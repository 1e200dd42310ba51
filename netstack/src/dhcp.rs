//! The node's uplink: a DHCPv4 client (RFC 2131) and the kernel's static `ip=` form.
//!
//! The client runs the RFC's states on one UDP socket bound to port 68 on the uplink
//! (`SO_BINDTODEVICE`, broadcast flag set so servers answer before the link has an address):
//! INIT (DISCOVER, first acceptable OFFER, REQUEST), BOUND until T1, RENEWING (unicast REQUEST
//! to the server that gave the lease) until T2, REBINDING (broadcast) until the lease ends, then
//! the address is removed and it starts over. A NAK in any state removes the address and starts
//! over; a link that loses its carrier and gets it back asks for its old address again
//! (INIT-REBOOT). What a lease gives is applied through rtnetlink: the address with its prefix,
//! the MTU, the default route (protocol `dhcp`); the DNS servers are reported. `stop` releases the
//! lease and removes what it applied. A reply that is not for us, malformed, or hostile (an
//! address that is not a usable unicast one, a non-contiguous mask, a tiny MTU) is ignored.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::netlink::{Netlink, NetlinkError};

const CLIENT_PORT: u16 = 68;
const SERVER_PORT: u16 = 67;
/// The smallest MTU a lease may set (RFC 2132 allows 68; anything under IPv4's 576 is refused).
const MIN_MTU: u16 = 576;
/// Leases shorter than this are taken as this long (a hostile 0 s lease must not spin us).
const MIN_LEASE: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("{0}")]
    Netlink(#[from] NetlinkError),
    #[error("no interface named {0}")]
    NoLink(String),
    #[error("{0} has no Ethernet address")]
    NoMac(String),
    #[error("the DHCP socket on {iface}: {source}")]
    Socket {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ip={arg}: {why}")]
    BadIpArg { arg: String, why: String },
}

/// What a server leased us, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub server: Ipv4Addr,
    pub routers: Vec<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u16>,
    pub domain: Option<String>,
    pub lease: Duration,
    pub t1: Duration,
    pub t2: Duration,
}

impl Lease {
    /// `/etc/resolv.conf` for this lease.
    pub fn resolv_conf(&self) -> String {
        let mut s = String::new();
        if let Some(d) = &self.domain {
            s.push_str(&format!("search {d}\n"));
        }
        for d in &self.dns {
            s.push_str(&format!("nameserver {d}\n"));
        }
        s
    }
}

/// What happened on the uplink, as the client reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new lease, applied (after INIT or INIT-REBOOT).
    Bound(Lease),
    /// The same address for longer, from the server that gave it (RENEWING) or any (REBINDING).
    Renewed(Lease),
    /// A server refused the address (or the request): it is removed, discovery starts again.
    Nak {
        server: Ipv4Addr,
        address: Option<Ipv4Addr>,
    },
    /// The lease ran out with no server answering: the address is removed.
    Expired(Lease),
    LinkDown,
    LinkUp,
    /// `stop`: the lease given back and its address removed.
    Released(Lease),
}

/// The client's timing: the first retransmission interval (doubling up to `max_retry`).
#[derive(Debug, Clone)]
pub struct Config {
    pub iface: String,
    pub retry: Duration,
    pub max_retry: Duration,
    pub hostname: Option<String>,
}

impl Config {
    pub fn new(iface: &str) -> Config {
        Config {
            iface: iface.to_string(),
            retry: Duration::from_secs(2),
            max_retry: Duration::from_secs(32),
            hostname: None,
        }
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.subsec_nanos() ^ std::process::id();
    }
    u32::from_ne_bytes(b)
}

/// The prefix length of a contiguous netmask.
fn prefix_of(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let p = m.leading_ones();
    (m.checked_shl(p).unwrap_or(0) == 0).then_some(p as u8)
}

fn usable_unicast(a: Ipv4Addr) -> bool {
    !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() || a.octets()[0] >= 240)
}

/// The lease an ACK describes, if it is a usable one.
fn lease_of(m: &Message, server_hint: Ipv4Addr) -> Result<Lease, String> {
    let address = m.yiaddr();
    if !usable_unicast(address) {
        return Err(format!("unusable address {address}"));
    }
    let opts = m.opts();
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => {
            prefix_of(*mask).ok_or_else(|| format!("netmask {mask} is not contiguous"))?
        }
        _ => 24,
    };
    if prefix == 0 || prefix > 30 {
        return Err(format!("prefix /{prefix}"));
    }
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) if usable_unicast(*s) => *s,
        _ => server_hint,
    };
    let secs = |code| match opts.get(code) {
        Some(DhcpOption::AddressLeaseTime(v) | DhcpOption::Renewal(v) | DhcpOption::Rebinding(v)) => Some(*v),
        _ => None,
    };
    let lease =
        Duration::from_secs(u64::from(secs(OptionCode::AddressLeaseTime).ok_or("no lease time")?)).max(MIN_LEASE);
    // T1 and T2 as given when they make sense, else the RFC's 1/2 and 7/8 of the lease.
    let mut t1 = secs(OptionCode::Renewal).map_or(lease / 2, |v| Duration::from_secs(u64::from(v)));
    let mut t2 = secs(OptionCode::Rebinding).map_or(lease * 7 / 8, |v| Duration::from_secs(u64::from(v)));
    if !(t1 < t2 && t2 < lease) || t1.is_zero() {
        (t1, t2) = (lease / 2, lease * 7 / 8);
    }
    let net = u32::from(address) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    let in_subnet = |a: &Ipv4Addr| {
        (u32::from(*a) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)) == net && *a != address
    };
    let routers = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.iter().copied().filter(|a| usable_unicast(*a) && in_subnet(a)).collect(),
        _ => Vec::new(),
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.iter().copied().filter(|a| usable_unicast(*a)).take(3).collect(),
        _ => Vec::new(),
    };
    let mtu = match opts.get(OptionCode::InterfaceMtu) {
        Some(DhcpOption::InterfaceMtu(m)) if *m >= MIN_MTU => Some(*m),
        _ => None,
    };
    let domain = match opts.get(OptionCode::DomainName) {
        Some(DhcpOption::DomainName(d))
            if !d.is_empty()
                && d.len() <= 253
                && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
        {
            Some(d.clone())
        }
        _ => None,
    };
    Ok(Lease { address, prefix, server, routers, dns, mtu, domain, lease, t1, t2 })
}

/// Whether `next` would need anything on the link changed from `prev`.
fn same_config(prev: &Lease, next: &Lease) -> bool {
    (prev.address, prev.prefix, prev.routers.first(), prev.mtu)
        == (next.address, next.prefix, next.routers.first(), next.mtu)
}

/// Puts a lease's address, MTU and default route on the link, taking off what `prev` put there
/// and `next` does not have.
pub async fn apply(nl: &Netlink, index: u32, prev: Option<&Lease>, next: Option<&Lease>) -> Result<(), NetlinkError> {
    if let Some(p) = prev {
        if let Some(g) = p.routers.first() {
            if next.and_then(|n| n.routers.first()) != Some(g) || next.map(|n| n.address) != Some(p.address) {
                nl.delete_default_route(*g, index).await?;
            }
        }
        if next.map(|n| (n.address, n.prefix)) != Some((p.address, p.prefix)) {
            nl.delete_address(index, p.address, p.prefix).await?;
        }
    }
    if let Some(n) = next {
        if let Some(m) = n.mtu {
            nl.set(index, None, Some(u32::from(m)), true).await?;
        }
        nl.add_address(index, n.address, n.prefix).await?;
        if let Some(g) = n.routers.first() {
            nl.add_default_route(*g, index).await?;
        }
    }
    Ok(())
}

enum State {
    Init,
    /// Asking for the address we had (after the carrier came back), leased at `since`.
    Reboot {
        lease: Lease,
        since: Instant,
    },
    Bound {
        lease: Lease,
        since: Instant,
    },
}

/// What a wait for a reply ended with.
enum Got {
    Reply(Message, Ipv4Addr),
    Timeout,
    LinkDown,
    Stop,
}

/// A DHCP client on one link.
#[derive(Debug)]
pub struct Client {
    nl: Netlink,
    cfg: Config,
    index: u32,
    mac: [u8; 6],
    sock: UdpSocket,
    /// Ignored replies (not ours, malformed or hostile), for tests and metrics.
    pub ignored: u64,
}

impl Client {
    /// Brings the link up and opens the client's socket on it.
    pub async fn new(nl: Netlink, cfg: Config) -> Result<Client, DhcpError> {
        let link = nl.link(&cfg.iface).await?.ok_or_else(|| DhcpError::NoLink(cfg.iface.clone()))?;
        let mac = link.mac.ok_or_else(|| DhcpError::NoMac(cfg.iface.clone()))?;
        if !link.up {
            nl.set(link.index, None, None, true).await?;
        }
        let sock_err = |source| DhcpError::Socket { iface: cfg.iface.clone(), source };
        let std_sock =
            std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT)).map_err(sock_err)?;
        std_sock.set_broadcast(true).map_err(sock_err)?;
        std_sock.set_nonblocking(true).map_err(sock_err)?;
        let name = cfg.iface.as_bytes();
        // SAFETY: SO_BINDTODEVICE reads `name.len()` bytes from a live slice; the descriptor is
        // the socket just opened.
        let r = unsafe {
            libc::setsockopt(
                std_sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(sock_err(std::io::Error::last_os_error()));
        }
        let sock = UdpSocket::from_std(std_sock).map_err(sock_err)?;
        Ok(Client { nl, cfg, index: link.index, mac, sock, ignored: 0 })
    }

    fn message(&self, xid: u32, kind: MessageType, ciaddr: Ipv4Addr) -> Message {
        let mut m = Message::new_with_id(
            xid,
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        m.set_opcode(Opcode::BootRequest);
        if ciaddr.is_unspecified() {
            m.set_flags(Flags::default().set_broadcast());
        }
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        let mut id = vec![1u8];
        id.extend_from_slice(&self.mac);
        o.insert(DhcpOption::ClientIdentifier(id));
        if kind != MessageType::Release {
            o.insert(DhcpOption::ParameterRequestList(vec![
                OptionCode::SubnetMask,
                OptionCode::Router,
                OptionCode::DomainNameServer,
                OptionCode::DomainName,
                OptionCode::InterfaceMtu,
                OptionCode::AddressLeaseTime,
                OptionCode::Renewal,
                OptionCode::Rebinding,
            ]));
            o.insert(DhcpOption::MaxMessageSize(1500));
            if let Some(h) = &self.cfg.hostname {
                o.insert(DhcpOption::Hostname(h.clone()));
            }
        }
        m
    }

    async fn send(&self, m: &Message, to: Ipv4Addr) {
        if let Ok(bytes) = m.to_vec() {
            // A send that fails (no route yet, link down) is retransmitted like a lost one.
            let _ = self.sock.send_to(&bytes, SocketAddrV4::new(to, SERVER_PORT)).await;
        }
    }

    async fn carrier(&self) -> bool {
        matches!(self.nl.link(&self.cfg.iface).await, Ok(Some(l)) if l.carrier)
    }

    /// Sends `m` to `to` until a reply of one of `kinds` for `xid` comes, retransmitting with
    /// doubling intervals (or `fixed`), until `deadline`.
    async fn exchange(
        &mut self,
        m: &Message,
        to: Ipv4Addr,
        kinds: &[MessageType],
        deadline: Instant,
        stop: &mut (impl std::future::Future<Output = ()> + Unpin),
    ) -> Got {
        let mut interval = self.cfg.retry;
        let mut buf = vec![0u8; 4096];
        loop {
            if Instant::now() >= deadline {
                return Got::Timeout;
            }
            self.send(m, to).await;
            let until = (Instant::now() + interval).min(deadline);
            interval = (interval * 2).min(self.cfg.max_retry);
            loop {
                let check = (Instant::now() + Duration::from_secs(1)).min(until);
                tokio::select! {
                    r = self.sock.recv_from(&mut buf) => {
                        let Ok((n, from)) = r else { continue };
                        let from = match from { std::net::SocketAddr::V4(a) => *a.ip(), _ => continue };
                        match Message::from_bytes(&buf[..n]) {
                            Ok(reply) if reply.opcode() == Opcode::BootReply
                                && reply.xid() == m.xid()
                                && reply.chaddr().get(..6) == Some(&self.mac[..])
                                && reply.opts().msg_type().is_some_and(|t| kinds.contains(&t)) => {
                                return Got::Reply(reply, from);
                            }
                            _ => self.ignored += 1,
                        }
                    }
                    _ = tokio::time::sleep_until(check) => {
                        if !self.carrier().await {
                            return Got::LinkDown;
                        }
                        if Instant::now() >= until {
                            break;
                        }
                    }
                    _ = &mut *stop => return Got::Stop,
                }
            }
        }
    }

    /// Waits for the carrier to come back (or `stop`): true when it did.
    async fn wait_carrier(&self, stop: &mut (impl std::future::Future<Output = ()> + Unpin)) -> bool {
        loop {
            if self.carrier().await {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = &mut *stop => return false,
            }
        }
    }

    /// Runs the client until `stop` completes, reporting to `on_event`; then releases the lease.
    pub async fn run(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
        mut on_event: impl FnMut(&Event),
    ) -> Result<(), DhcpError> {
        let mut stop = Box::pin(stop);
        let mut state = State::Init;
        // What is on the link now.
        let mut applied: Option<Lease> = None;
        let mut backoff = self.cfg.retry;
        let far = || Instant::now() + Duration::from_secs(3600 * 24 * 365);
        loop {
            state = match std::mem::replace(&mut state, State::Init) {
                State::Init => {
                    if !self.wait_carrier(&mut stop).await {
                        break;
                    }
                    let xid = random_u32();
                    let discover = self.message(xid, MessageType::Discover, Ipv4Addr::UNSPECIFIED);
                    let (offer, from) = match self
                        .exchange(&discover, Ipv4Addr::BROADCAST, &[MessageType::Offer], far(), &mut stop)
                        .await
                    {
                        Got::Reply(o, from) => (o, from),
                        Got::Stop => break,
                        Got::LinkDown => {
                            on_event(&Event::LinkDown);
                            continue;
                        }
                        Got::Timeout => continue,
                    };
                    let Ok(offered) = lease_of(&offer, from) else {
                        self.ignored += 1;
                        continue;
                    };
                    let mut req = self.message(xid, MessageType::Request, Ipv4Addr::UNSPECIFIED);
                    req.opts_mut().insert(DhcpOption::RequestedIpAddress(offered.address));
                    req.opts_mut().insert(DhcpOption::ServerIdentifier(offered.server));
                    let deadline = Instant::now() + self.cfg.retry * 8;
                    match self
                        .request(&req, Ipv4Addr::BROADCAST, deadline, &mut stop, &mut applied, &mut on_event, false)
                        .await?
                    {
                        Answer::Acked(s) => {
                            backoff = self.cfg.retry;
                            s
                        }
                        Answer::Stopped => break,
                        Answer::Refused | Answer::Silent | Answer::LinkDown => {
                            // Wait a little before discovering again.
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = &mut stop => break,
                            }
                            backoff = (backoff * 2).min(self.cfg.max_retry);
                            State::Init
                        }
                    }
                }
                State::Reboot { lease: prev, since } => {
                    let xid = random_u32();
                    let mut req = self.message(xid, MessageType::Request, Ipv4Addr::UNSPECIFIED);
                    req.opts_mut().insert(DhcpOption::RequestedIpAddress(prev.address));
                    let deadline = Instant::now() + self.cfg.retry * 4;
                    match self
                        .request(&req, Ipv4Addr::BROADCAST, deadline, &mut stop, &mut applied, &mut on_event, false)
                        .await?
                    {
                        Answer::Acked(s) => s,
                        Answer::Stopped => break,
                        // No server answered: the address is still ours while the lease lasts.
                        Answer::Silent | Answer::LinkDown if applied.is_some() => State::Bound { lease: prev, since },
                        _ => State::Init,
                    }
                }
                State::Bound { lease, since } => {
                    let (t1, t2, end) = (since + lease.t1, since + lease.t2, since + lease.lease);
                    match self.sleep_bound(t1, &mut stop).await {
                        Got::Stop => break,
                        Got::LinkDown => {
                            on_event(&Event::LinkDown);
                            if !self.wait_carrier(&mut stop).await {
                                break;
                            }
                            on_event(&Event::LinkUp);
                            State::Reboot { lease, since }
                        }
                        _ => {
                            // RENEWING: to the server that gave it, from our address; then
                            // REBINDING: to any server.
                            let xid = random_u32();
                            let req = self.message(xid, MessageType::Request, lease.address);
                            let mut answer = self
                                .request(&req, lease.server, t2, &mut stop, &mut applied, &mut on_event, true)
                                .await?;
                            if matches!(answer, Answer::Silent) {
                                answer = self
                                    .request(
                                        &req,
                                        Ipv4Addr::BROADCAST,
                                        end,
                                        &mut stop,
                                        &mut applied,
                                        &mut on_event,
                                        true,
                                    )
                                    .await?;
                            }
                            match answer {
                                Answer::Acked(s) => s,
                                Answer::Stopped => break,
                                Answer::Refused => State::Init,
                                Answer::LinkDown => State::Bound { lease, since },
                                Answer::Silent => {
                                    apply(&self.nl, self.index, applied.as_ref(), None).await?;
                                    applied = None;
                                    on_event(&Event::Expired(lease));
                                    State::Init
                                }
                            }
                        }
                    }
                }
            };
        }
        if let Some(l) = applied.take() {
            let mut rel = self.message(random_u32(), MessageType::Release, l.address);
            rel.opts_mut().insert(DhcpOption::ServerIdentifier(l.server));
            self.send(&rel, l.server).await;
            apply(&self.nl, self.index, Some(&l), None).await?;
            on_event(&Event::Released(l));
        }
        Ok(())
    }

    /// Sleeps until `until`, watching the carrier.
    async fn sleep_bound(&self, until: Instant, stop: &mut (impl std::future::Future<Output = ()> + Unpin)) -> Got {
        loop {
            if Instant::now() >= until {
                return Got::Timeout;
            }
            let check = (Instant::now() + Duration::from_secs(1)).min(until);
            tokio::select! {
                _ = tokio::time::sleep_until(check) => {
                    if !self.carrier().await {
                        return Got::LinkDown;
                    }
                }
                _ = &mut *stop => return Got::Stop,
            }
        }
    }

    /// Sends a REQUEST until an ACK or NAK or `deadline`. An ACK is applied and gives the next
    /// state; a NAK removes what is applied.
    #[allow(clippy::too_many_arguments)]
    async fn request(
        &mut self,
        req: &Message,
        to: Ipv4Addr,
        deadline: Instant,
        stop: &mut (impl std::future::Future<Output = ()> + Unpin),
        applied: &mut Option<Lease>,
        on_event: &mut impl FnMut(&Event),
        renewal: bool,
    ) -> Result<Answer, DhcpError> {
        loop {
            match self.exchange(req, to, &[MessageType::Ack, MessageType::Nak], deadline, stop).await {
                Got::Reply(reply, from) if reply.opts().has_msg_type(MessageType::Nak) => {
                    let server = match reply.opts().get(OptionCode::ServerIdentifier) {
                        Some(DhcpOption::ServerIdentifier(s)) => *s,
                        _ => from,
                    };
                    let address = applied.as_ref().map(|l| l.address);
                    apply(&self.nl, self.index, applied.as_ref(), None).await?;
                    *applied = None;
                    on_event(&Event::Nak { server, address });
                    return Ok(Answer::Refused);
                }
                Got::Reply(reply, from) => {
                    let Ok(lease) = lease_of(&reply, from) else {
                        self.ignored += 1;
                        continue;
                    };
                    if renewal && applied.as_ref().map(|l| l.address) != Some(lease.address) {
                        // An ACK for some other address to a renewal of ours is not an answer.
                        self.ignored += 1;
                        continue;
                    }
                    let unchanged = applied.as_ref().is_some_and(|p| same_config(p, &lease));
                    // A renewal that changes nothing touches nothing; a new or re-asked lease is
                    // applied (again: the link may have lost its routes while it was down).
                    if !unchanged || !renewal {
                        apply(&self.nl, self.index, applied.as_ref(), Some(&lease)).await?;
                    }
                    on_event(&if renewal || unchanged {
                        Event::Renewed(lease.clone())
                    } else {
                        Event::Bound(lease.clone())
                    });
                    *applied = Some(lease.clone());
                    return Ok(Answer::Acked(State::Bound { lease, since: Instant::now() }));
                }
                Got::LinkDown => {
                    on_event(&Event::LinkDown);
                    return Ok(Answer::LinkDown);
                }
                Got::Timeout => return Ok(Answer::Silent),
                Got::Stop => return Ok(Answer::Stopped),
            }
        }
    }
}

/// How a REQUEST ended.
enum Answer {
    Acked(State),
    Refused,
    Silent,
    LinkDown,
    Stopped,
}

/// The uplink's configuration from the kernel command line's `ip=` (as the kernel's
/// nfsroot documentation describes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink {
    /// `ip=dhcp`, `ip=on`, `ip=any`, `ip=::::::dhcp` and the like; on `device` if named.
    Dhcp { device: Option<String> },
    /// `ip=off` or `ip=none`: the uplink is left alone.
    Off,
    /// `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:off[:<dns0>[:<dns1>]]`.
    Static {
        address: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        hostname: Option<String>,
        device: Option<String>,
        dns: Vec<Ipv4Addr>,
    },
}

/// Parses the value of `ip=`.
pub fn parse_ip_arg(arg: &str) -> Result<Uplink, DhcpError> {
    let bad = |why: &str| DhcpError::BadIpArg { arg: arg.to_string(), why: why.to_string() };
    let autoconf = |s: &str| matches!(s, "dhcp" | "on" | "any" | "both" | "bootp" | "rarp");
    if autoconf(arg) {
        return Ok(Uplink::Dhcp { device: None });
    }
    if matches!(arg, "off" | "none") {
        return Ok(Uplink::Off);
    }
    let f: Vec<&str> = arg.split(':').collect();
    if f.len() > 10 {
        return Err(bad("more than ten fields"));
    }
    let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
    let ip = |i: usize, what: &str| -> Result<Option<Ipv4Addr>, DhcpError> {
        field(i)
            .map(|s| s.parse::<Ipv4Addr>().map_err(|_| bad(&format!("{what} {s:?} is not an IPv4 address"))))
            .transpose()
    };
    let device = field(5).map(str::to_string);
    if let Some(d) = &device {
        if d.len() > 15 || d.contains('/') {
            return Err(bad("the device is not an interface name"));
        }
    }
    let conf = field(6).unwrap_or("");
    let client = ip(0, "the address")?;
    if client.is_none() || autoconf(conf) {
        if !conf.is_empty() && !autoconf(conf) && !matches!(conf, "off" | "none") {
            return Err(bad(&format!("unknown autoconfiguration {conf:?}")));
        }
        return Ok(if matches!(conf, "off" | "none") { Uplink::Off } else { Uplink::Dhcp { device } });
    }
    if !matches!(conf, "" | "off" | "none") {
        return Err(bad(&format!("unknown autoconfiguration {conf:?}")));
    }
    let address = client.unwrap_or(Ipv4Addr::UNSPECIFIED);
    if !usable_unicast(address) {
        return Err(bad("the address is not a usable unicast address"));
    }
    let prefix = match ip(3, "the netmask")? {
        Some(m) => prefix_of(m).filter(|p| (1..=32).contains(p)).ok_or_else(|| bad("the netmask is not contiguous"))?,
        // The kernel's default: the address's class.
        None => match address.octets()[0] {
            0..=127 => 8,
            128..=191 => 16,
            _ => 24,
        },
    };
    let gateway = ip(2, "the gateway")?;
    let hostname = field(4).map(str::to_string);
    let dns = [ip(7, "dns0")?, ip(8, "dns1")?].into_iter().flatten().collect();
    Ok(Uplink::Static { address, prefix, gateway, hostname, device, dns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_arg_forms_the_kernel_documents() {
        assert_eq!(parse_ip_arg("dhcp").unwrap(), Uplink::Dhcp { device: None });
        assert_eq!(parse_ip_arg("off").unwrap(), Uplink::Off);
        assert_eq!(parse_ip_arg(":::::eth1:dhcp").unwrap(), Uplink::Dhcp { device: Some("eth1".into()) });
        assert_eq!(
            parse_ip_arg("10.0.0.5::10.0.0.1:255.255.255.0:node1:eth0:off:10.0.0.53").unwrap(),
            Uplink::Static {
                address: Ipv4Addr::new(10, 0, 0, 5),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                hostname: Some("node1".into()),
                device: Some("eth0".into()),
                dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
            }
        );
        match parse_ip_arg("172.16.0.9").unwrap() {
            Uplink::Static { prefix, gateway: None, .. } => assert_eq!(prefix, 16),
            other => panic!("{other:?}"),
        }
        for (bad, why) in [
            ("10.0.0.300::::::off", "not an IPv4 address"),
            ("10.0.0.5:::255.0.255.0:::off", "not contiguous"),
            ("10.0.0.5::::::static", "unknown autoconfiguration"),
            ("127.0.0.1::::::off", "usable unicast"),
            ("10.0.0.5:::::a/b:off", "interface name"),
        ] {
            let e = parse_ip_arg(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn ack(opts: &[DhcpOption], yiaddr: Ipv4Addr) -> Message {
        let mut m = Message::new_with_id(
            1,
            Ipv4Addr::UNSPECIFIED,
            yiaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[2; 6],
        );
        m.set_opcode(Opcode::BootReply);
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Ack));
        for o in opts {
            m.opts_mut().insert(o.clone());
        }
        m
    }

    #[test]
    fn a_lease_takes_what_makes_sense_and_refuses_the_rest() {
        let a = Ipv4Addr::new(10, 1, 0, 50);
        let l = lease_of(
            &ack(
                &[
                    DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)),
                    DhcpOption::AddressLeaseTime(120),
                    DhcpOption::Router(vec![Ipv4Addr::new(192, 168, 9, 1), Ipv4Addr::new(10, 1, 0, 1)]),
                    DhcpOption::InterfaceMtu(68),
                    DhcpOption::Renewal(100),
                    DhcpOption::Rebinding(50),
                ],
                a,
            ),
            Ipv4Addr::new(10, 1, 0, 2),
        )
        .unwrap();
        assert_eq!((l.address, l.prefix, l.server), (a, 24, Ipv4Addr::new(10, 1, 0, 2)));
        assert_eq!(l.routers, vec![Ipv4Addr::new(10, 1, 0, 1)], "a router outside the subnet is dropped");
        assert_eq!(l.mtu, None, "an MTU under 576 is refused");
        assert_eq!((l.t1, l.t2), (Duration::from_secs(60), Duration::from_secs(105)), "T1 > T2: the RFC's defaults");
        let zero = lease_of(&ack(&[DhcpOption::AddressLeaseTime(0)], a), a).unwrap();
        assert_eq!(zero.lease, MIN_LEASE);
        for (opts, yiaddr, why) in [
            (vec![DhcpOption::AddressLeaseTime(60)], Ipv4Addr::new(255, 255, 255, 255), "unusable"),
            (vec![DhcpOption::AddressLeaseTime(60)], Ipv4Addr::new(224, 0, 0, 1), "unusable"),
            (vec![], a, "no lease time"),
            (
                vec![DhcpOption::AddressLeaseTime(60), DhcpOption::SubnetMask(Ipv4Addr::new(255, 0, 255, 0))],
                a,
                "contiguous",
            ),
            (
                vec![DhcpOption::AddressLeaseTime(60), DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 255))],
                a,
                "prefix",
            ),
        ] {
            let e = lease_of(&ack(&opts, yiaddr), a).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn random_bytes_never_panic_the_parser_or_the_checks() {
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let base = ack(&[DhcpOption::AddressLeaseTime(60)], Ipv4Addr::new(10, 0, 0, 9)).to_vec().unwrap();
        for _ in 0..20_000 {
            let mut b = base.clone();
            let flips = next() % 16;
            for _ in 0..flips {
                let i = next() as usize % b.len();
                b[i] = next() as u8;
            }
            b.truncate(next() as usize % (b.len() + 1));
            if let Ok(m) = Message::from_bytes(&b) {
                let _ = lease_of(&m, Ipv4Addr::new(10, 0, 0, 1));
            }
        }
    }
}
