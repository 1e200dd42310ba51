//! virtio-vsock with Firecracker's host side: guest streams meet host programs over Unix
//! sockets.
//!
//! - Host → guest: a host program connects to `uds_path` and writes `CONNECT <port>\n`; the
//!   device asks the guest (REQUEST to `<port>`), and once the guest accepts writes
//!   `OK <host port>\n` back; from then on the socket carries the stream. If the guest refuses
//!   (RST), the socket is closed.
//! - Guest → host: a guest connecting to CID 2, port P reaches the Unix socket
//!   `<uds_path>_<P>` (a host program listens there); if nothing listens the guest gets RST.
//!
//! Queues: 0 receive (device → guest), 1 transmit (guest → device), 2 events. Flow control is
//! virtio-vsock's credit scheme: the device announces `CONN_BUF` bytes of buffer per stream and
//! counts what it has written to the host socket (`fwd_cnt`), so a guest can never make it
//! hold more than `CONN_BUF` bytes; towards the guest it sends no more than the guest's
//! announced credit. A guest that breaks the rules (wrong CIDs, unknown ops, more data than its
//! credit) has that packet dropped or its stream reset, and the error counted.
//!
//! The host sockets are watched by the device's own epoll instance, whose descriptor is the
//! device's `backend_fd`: the event loop wakes the device when any of them is ready.
//! Connections are not part of a snapshot: after a restore the device sends the guest a
//! TRANSPORT_RESET event (as Firecracker does), the guest drops its streams and re-reads its
//! CID (which a restore may change, so that clones differ).

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{
    read_config_bytes, ActivateError, ActiveQueues, DeviceCounters, IrqLine, VirtioDevice, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};
use packet::*;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
/// Bytes the device buffers per stream towards the host (its announced `buf_alloc`).
pub const CONN_BUF: u32 = 256 * 1024;
/// Largest payload the device accepts in or puts into one packet.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Streams (and host connections still sending their CONNECT line) per device.
const MAX_CONNS: usize = 1024;
/// Control packets (RESPONSE, RST, credit updates) waiting for receive buffers, beyond which
/// the device takes no more transmit chains: a guest that posts no receive buffers cannot make
/// the queue grow. One guest packet queues at most one control packet; host events add at most
/// two per stream, so the queue never holds more than `MAX_CONTROL + 2 * MAX_CONNS` headers.
const MAX_CONTROL: usize = QUEUE_SIZE as usize;
/// Longest CONNECT line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Local ports for host-initiated streams start here (Firecracker's choice too).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LISTENER_TOKEN: u64 = 0;

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (0, 1, 2 and u32::MAX are not guest CIDs)")]
    BadCid(u64),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot create the vsock epoll instance: {0}")]
    Epoll(std::io::Error),
}

/// Checks a guest CID the way Firecracker does: 3 and up, 32 bits.
pub fn check_cid(cid: u64) -> Result<(), VsockError> {
    shoal_vmm_config::limits::check_cid(cid).map_err(|_| VsockError::BadCid(cid))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    Requested,
    Established,
    /// The guest shut the stream down: what is buffered goes to the host, then RST.
    Draining,
}

/// Key of a stream: (host-side port, guest-side port).
type Key = (u32, u32);

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// What the guest announced: its buffer and how much of our data it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest on this stream.
    tx_cnt: u32,
    /// Bytes of the guest's data written to the host socket, and the value last told the guest.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    to_host: VecDeque<u8>,
    /// The host socket may have data (or EOF) to read.
    readable: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            to_host: VecDeque::new(),
            readable: false,
        }
    }

    /// How many bytes the guest can take now.
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes buffered guest data to the host socket until it would block.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// What an epoll token stands for.
enum Token {
    /// A host connection still sending its `CONNECT <port>\n` line.
    Pending {
        stream: UnixStream,
        line: Vec<u8>,
    },
    Conn(Key),
}

/// A vsock device.
pub struct VirtioVsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    tokens: HashMap<u64, Token>,
    conns: HashMap<Key, Conn>,
    next_token: u64,
    next_local_port: u32,
    /// Header-only packets waiting for a receive buffer, in order.
    control: VecDeque<Header>,
    /// A TRANSPORT_RESET event waiting for an event buffer.
    reset_event: bool,
    /// Transmit chains were left in the queue because `control` was full.
    tx_held: bool,
    /// Streams and pending host connections allowed at once (MAX_CONNS; tests lower it).
    max_conns: usize,
    active: Option<ActiveQueues>,
    buf: Vec<u8>,
    counters: DeviceCounters,
}

impl std::fmt::Debug for VirtioVsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioVsock")
            .field("cid", &self.cid)
            .field("uds_path", &self.uds_path)
            .field("streams", &self.conns.len())
            .finish()
    }
}

impl VirtioVsock {
    /// A device for guest `cid` listening on `uds_path` (a stale socket file there is
    /// replaced, as Firecracker expects its users to do by hand).
    pub fn new(cid: u64, uds_path: &Path) -> Result<VirtioVsock, VsockError> {
        check_cid(cid)?;
        let listen_err = |source| VsockError::Listen { path: uds_path.to_path_buf(), source };
        if std::fs::symlink_metadata(uds_path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(uds_path).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(VirtioVsock {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            tokens: HashMap::new(),
            conns: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            reset_event: false,
            tx_held: false,
            max_conns: MAX_CONNS,
            active: None,
            buf: vec![0; HDR_LEN + MAX_PAYLOAD],
            counters: DeviceCounters::default(),
        })
    }

    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Open streams (for metrics and tests).
    pub fn streams(&self) -> usize {
        self.conns.len()
    }

    /// Streams and host connections still sending their CONNECT line (each has a token).
    fn connections(&self) -> usize {
        self.tokens.len()
    }

    fn error(&self) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn watch(&mut self, fd: std::os::fd::RawFd, token: Token) -> Option<u64> {
        let id = self.next_token;
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, id)).is_err() {
            self.error();
            return None;
        }
        self.next_token += 1;
        self.tokens.insert(id, token);
        Some(id)
    }

    /// A header from the device to the guest for stream `key`, with our credit filled in.
    fn header_for(&mut self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get_mut(&key).map_or(0, |c| {
            c.fwd_cnt_told = c.fwd_cnt;
            c.fwd_cnt
        });
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF,
            fwd_cnt,
        }
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        let h = self.header_for(key, op, flags, 0);
        self.control.push_back(h);
    }

    /// Drops stream `key` (closing its host socket) and, if asked, resets it on the guest side.
    fn close(&mut self, key: Key, rst: bool) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(ControlOperation::Delete, c.stream.as_raw_fd(), EpollEvent::default());
            self.tokens.remove(&c.token);
        }
        if rst {
            self.control.push_back(Header {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: key.0,
                dst_port: key.1,
                kind: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            });
        }
    }

    // ---- guest → device -------------------------------------------------------------------

    fn process_tx(&mut self) {
        self.take_tx();
        // Replies (RESPONSE, RST, credit) go out now.
        self.process_rx();
    }

    /// Takes transmit chains until the queue is empty or `control` is full.
    fn take_tx(&mut self) {
        let mut used_any = false;
        self.tx_held = false;
        loop {
            if self.control.len() >= MAX_CONTROL {
                // The guest gets its answers (and its transmit buffers) once it posts receive
                // buffers again.
                self.tx_held = true;
                break;
            }
            let Some(a) = self.active.as_mut() else { return };
            let Some(chain) = a.queues[TX].pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            // Header then payload, however the driver split them into descriptors.
            let packet = match chain.reader(&a.mem) {
                Ok(mut r) if r.available_bytes() >= HDR_LEN => {
                    let mut hdr = [0u8; HDR_LEN];
                    match r.read_exact(&mut hdr) {
                        Ok(()) => {
                            let h = Header::parse(&hdr);
                            let len = h.len as usize;
                            if len > MAX_PAYLOAD || len > r.available_bytes() {
                                None
                            } else {
                                r.read_exact(&mut self.buf[..len]).ok().map(|()| h)
                            }
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if a.queues[TX].add_used(&a.mem, head, 0).is_err() {
                self.error();
            }
            used_any = true;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            match packet {
                Some(h) => self.handle_guest_packet(h),
                None => self.error(),
            }
        }
        if let Some(a) = self.active.as_mut() {
            if used_any && a.queues[TX].needs_notification(&a.mem).unwrap_or(true) {
                a.irq.signal_used();
            }
        }
    }

    /// One packet from the guest; its payload (h.len bytes) is in `self.buf`.
    fn handle_guest_packet(&mut self, h: Header) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            // Not from this guest or not for the host: nobody to answer.
            self.error();
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.kind != TYPE_STREAM {
            self.error();
            if h.op != OP_RST {
                self.close(key, true);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            // New credit may let waiting host data through.
            c.readable |= matches!(h.op, OP_CREDIT_UPDATE | OP_RW);
        }
        let state = self.conns.get(&key).map(|c| c.state);
        match (h.op, state) {
            (OP_REQUEST, None) => self.guest_connect(key, h),
            (OP_RESPONSE, Some(State::Requested)) => {
                let Some(c) = self.conns.get_mut(&key) else { return };
                c.state = State::Established;
                c.readable = true;
                let ok = format!("OK {}\n", key.0);
                // A fresh socket's buffer takes a short line; if not, the host side is broken.
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.close(key, true);
                }
            }
            (OP_RW, Some(State::Established)) => {
                let Some(c) = self.conns.get_mut(&key) else { return };
                let len = h.len as usize;
                if c.to_host.len() + len > CONN_BUF as usize {
                    // More than the credit we gave.
                    self.error();
                    self.close(key, true);
                    return;
                }
                c.to_host.extend(&self.buf[..len]);
                self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                self.flush_to_host(key);
            }
            (OP_RW, Some(State::Draining)) => {}
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_CREDIT_REQUEST, Some(_)) => self.send_control(key, OP_CREDIT_UPDATE, 0),
            (OP_SHUTDOWN, Some(_)) => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.state = State::Draining;
                }
                self.flush_to_host(key);
            }
            (OP_RST, Some(_)) => self.close(key, false),
            (OP_RST, None) => {}
            _ => {
                // Unknown op, or one that makes no sense for the stream's state.
                self.error();
                self.close(key, true);
            }
        }
    }

    /// The guest connects to host port `key.0`: reach `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: Key, h: Header) {
        if self.connections() >= self.max_conns {
            self.error();
            self.close(key, true);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.close(key, true);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        let Some(token) = self.watch(fd, Token::Conn(key)) else {
            self.close(key, true);
            return;
        };
        let mut c = Conn::new(stream, token, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.conns.insert(key, c);
        self.send_control(key, OP_RESPONSE, 0);
    }

    /// Writes what the guest sent to the host socket; tells the guest about freed buffer
    /// space; finishes a drained stream.
    fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else { return };
        if c.flush().is_err() {
            self.close(key, true);
            return;
        }
        let drained = c.to_host.is_empty();
        if c.state == State::Draining && drained {
            self.close(key, true);
        } else if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= CONN_BUF / 4 {
            self.send_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    // ---- host sockets -----------------------------------------------------------------------

    /// Handles every ready host socket, then moves what it can to the guest.
    fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.error();
                    break;
                }
            };
            for ev in &events[..n] {
                let (token, set) = (ev.data(), ev.event_set());
                if token == LISTENER_TOKEN {
                    self.accept_host();
                    continue;
                }
                match self.tokens.get(&token) {
                    Some(Token::Pending { .. }) => self.read_connect_line(token),
                    Some(&Token::Conn(key)) => {
                        if let Some(c) = self.conns.get_mut(&key) {
                            if set
                                .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
                            {
                                c.readable = true;
                            }
                        }
                        if set.contains(EventSet::OUT) {
                            self.flush_to_host(key);
                        }
                    }
                    None => {}
                }
            }
            if n < events.len() {
                break;
            }
        }
        self.process_rx();
    }

    fn accept_host(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connections() >= self.max_conns || stream.set_nonblocking(true).is_err() {
                        self.error();
                        continue; // dropping the stream closes it
                    }
                    let fd = stream.as_raw_fd();
                    let id = self.next_token;
                    if self.watch(fd, Token::Pending { stream, line: Vec::new() }).is_some() {
                        // It may have written its line already.
                        self.read_connect_line(id);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break, // WouldBlock
            }
        }
    }

    /// Reads a pending host connection's CONNECT line one byte at a time (so that nothing
    /// after the newline is consumed), and asks the guest for the stream once it is complete.
    fn read_connect_line(&mut self, token: u64) {
        let Some(Token::Pending { stream, line }) = self.tokens.get_mut(&token) else { return };
        let mut byte = [0u8; 1];
        let outcome = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(parse_connect(line)),
                Ok(_) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                Ok(_) => break Err(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let Some(Token::Pending { stream, .. }) = self.tokens.remove(&token) else { return };
        match outcome {
            Ok(Some(port)) if self.active.is_some() => {
                let local = self.alloc_local_port(port);
                self.tokens.insert(token, Token::Conn((local, port)));
                let mut c = Conn::new(stream, token, State::Requested);
                // Until the guest answers, assume nothing about its buffer.
                c.peer_buf_alloc = 0;
                self.conns.insert((local, port), c);
                self.send_control((local, port), OP_REQUEST, 0);
            }
            _ => {
                // A bad line, or no guest driver to ask: close the host connection.
                if !matches!(outcome, Ok(Some(_))) {
                    self.error();
                }
                let _ = self.epoll.ctl(ControlOperation::Delete, stream.as_raw_fd(), EpollEvent::default());
            }
        }
    }

    fn alloc_local_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    // ---- device → guest ---------------------------------------------------------------------

    /// Fills receive buffers with control packets first, then with data from host sockets
    /// (as far as each stream's credit allows), until either runs out; then takes the transmit
    /// chains held back while `control` was full, and so on while that frees room.
    fn process_rx(&mut self) {
        self.send_reset_event();
        loop {
            // The queue is taken out while it is filled, since filling reads host sockets.
            let Some(mut a) = self.active.take() else { return };
            let used_any = self.fill_rx(&mut a);
            if used_any && a.queues[RX].needs_notification(&a.mem).unwrap_or(true) {
                a.irq.signal_used();
            }
            self.active = Some(a);
            if !self.tx_held || self.control.len() >= MAX_CONTROL {
                return;
            }
            self.take_tx();
        }
    }

    /// Takes the next packet for the guest that fits `room` payload bytes: its header, with
    /// the payload (if any) in `self.buf`.
    fn next_packet(&mut self, keys: &[Key], next: &mut usize, room: usize) -> Option<Header> {
        if let Some(h) = self.control.pop_front() {
            return Some(h);
        }
        while *next < keys.len() {
            let key = keys[*next];
            if let Some(n) = self.read_host(key, room) {
                let h = self.header_for(key, OP_RW, 0, n as u32);
                if let Some(c) = self.conns.get_mut(&key) {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                }
                self.counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                return Some(h);
            }
            *next += 1;
        }
        // Reading may have queued a SHUTDOWN or RST.
        self.control.pop_front()
    }

    fn fill_rx(&mut self, a: &mut ActiveQueues) -> bool {
        let mut used_any = false;
        let mut keys: Vec<Key> =
            self.conns.iter().filter(|(_, c)| c.readable && c.state == State::Established).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        let mut next = 0;
        while let Some(chain) = a.queues[RX].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut len = 0;
            match chain.writer(&a.mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let room = (w.available_bytes() - HDR_LEN).min(MAX_PAYLOAD);
                    let Some(h) = self.next_packet(&keys, &mut next, room) else {
                        a.queues[RX].go_to_previous_position();
                        break;
                    };
                    let payload = &self.buf[..h.len as usize];
                    if w.write_all(&h.bytes()).is_ok() && w.write_all(payload).is_ok() {
                        len = HDR_LEN + payload.len();
                    } else {
                        self.error();
                    }
                }
                // A buffer that cannot hold a header is returned unused.
                _ => self.error(),
            }
            if a.queues[RX].add_used(&a.mem, head, len as u32).is_err() {
                self.error();
            }
            used_any = true;
        }
        used_any
    }

    /// Reads up to `room` bytes (and the guest's credit) of stream `key` into `self.buf`.
    /// None when it has nothing now; EOF or an error queue a SHUTDOWN / RST instead.
    fn read_host(&mut self, key: Key, room: usize) -> Option<usize> {
        let c = self.conns.get_mut(&key)?;
        if !c.readable || c.state != State::Established {
            return None;
        }
        let want = room.min(c.credit() as usize);
        if want == 0 {
            return None; // the guest's CREDIT_UPDATE marks it readable again
        }
        loop {
            match c.stream.read(&mut self.buf[..want]) {
                Ok(0) => {
                    // The host program closed its end: the guest sees an orderly shutdown and
                    // answers with RST, which closes the stream here.
                    c.readable = false;
                    c.state = State::Draining;
                    self.send_control(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
                    return None;
                }
                Ok(n) => return Some(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    return None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key, true);
                    return None;
                }
            }
        }
    }

    fn send_reset_event(&mut self) {
        if !self.reset_event {
            return;
        }
        let Some(a) = self.active.as_mut() else { return };
        let Some(chain) = a.queues[EVT].pop_descriptor_chain(&a.mem) else { return };
        let head = chain.head_index();
        let ok = chain.writer(&a.mem).is_ok_and(|mut w| w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()).is_ok());
        if a.queues[EVT].add_used(&a.mem, head, if ok { 4 } else { 0 }).is_err() || !ok {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        a.irq.signal_used();
        self.reset_event = !ok;
    }
}

/// `CONNECT <port>` (without the newline) → the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
        _acked: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        // Host connections that came before the driver was up have been closed (there was no
        // guest to ask); host programs retry.
        self.active = Some(ActiveQueues { mem, queues, irq });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match (index, self.active.is_some()) {
            (RX, true) => self.process_rx(),
            (TX, true) => self.process_tx(),
            (EVT, true) => self.send_reset_event(),
            _ => {
                self.counters.spurious.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.close(k, false);
        }
        self.control.clear();
        self.reset_event = false;
        self.tx_held = false;
        self.active = None;
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) {
        self.poll_host();
    }

    fn restored(&mut self) {
        // The guest's streams did not survive the snapshot; it must drop them and read its
        // CID again.
        self.reset_event = true;
        self.send_reset_event();
    }
}

impl Drop for VirtioVsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests;
