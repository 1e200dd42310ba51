use super::*;
use crate::devices::virtio::testing::{memory, TestQueue};
use std::cell::Cell;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CID: u64 = 3;
const RX_BUF: u32 = 4096 + HDR_LEN as u32;

/// A vsock device with its three queues in plain memory, driven the way a guest driver would.
struct Guest {
    mem: GuestMemoryMmap,
    rxq: TestQueue,
    txq: TestQueue,
    evq: TestQueue,
    dev: VirtioVsock,
    dir: tempfile::TempDir,
    rx_seen: Cell<u16>,
    next_rx_buf: Cell<u64>,
    next_tx_buf: Cell<u64>,
}

impl Guest {
    fn new() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let mem = memory();
        let (rxq, txq, evq) =
            (TestQueue::new(&mem, 0x1000, 16), TestQueue::new(&mem, 0x4000, 16), TestQueue::new(&mem, 0x7000, 16));
        let mut dev = VirtioVsock::new(CID, &dir.path().join("v.sock")).unwrap();
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(
            mem.clone(),
            vec![rxq.queue(QUEUE_SIZE), txq.queue(QUEUE_SIZE), evq.queue(QUEUE_SIZE)],
            irq,
            VIRTIO_F_VERSION_1,
        )
        .unwrap();
        Guest {
            mem,
            rxq,
            txq,
            evq,
            dev,
            dir,
            rx_seen: Cell::new(0),
            next_rx_buf: Cell::new(0),
            next_tx_buf: Cell::new(0),
        }
    }

    fn path(&self, suffix: &str) -> PathBuf {
        self.dir.path().join(format!("v.sock{suffix}"))
    }

    fn rx_addr(i: u64) -> u64 {
        0x100000 + (i % 16) * 0x2000
    }

    /// Posts `n` receive buffers.
    fn post_rx(&self, n: usize) {
        for _ in 0..n {
            let i = self.next_rx_buf.get();
            self.next_rx_buf.set(i + 1);
            self.rxq.add_chain(&self.mem, &[(Self::rx_addr(i), RX_BUF, true)]);
        }
    }

    /// Packets the device put in receive buffers since the last call.
    fn received(&self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen.get() != self.rxq.used_idx(&self.mem) {
            let i = self.rx_seen.get();
            let (_, len) = self.rxq.used_elem(&self.mem, i);
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(Self::rx_addr(u64::from(i)))).unwrap();
            self.rx_seen.set(i.wrapping_add(1));
            if b.len() >= HDR_LEN {
                let h = Header::parse(b[..HDR_LEN].try_into().unwrap());
                out.push((h, b[HDR_LEN..].to_vec()));
            }
        }
        out
    }

    /// Sends one packet from the guest as header and payload descriptors.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let i = self.next_tx_buf.get();
        self.next_tx_buf.set(i + 1);
        let at = 0x300000 + (i % 8) * 0x20000;
        self.mem.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
        self.mem.write_slice(payload, GuestAddress(at + 0x1000)).unwrap();
        if payload.is_empty() {
            self.txq.add_chain(&self.mem, &[(at, HDR_LEN as u32, false)]);
        } else {
            self.txq.add_chain(&self.mem, &[(at, HDR_LEN as u32, false), (at + 0x1000, payload.len() as u32, false)]);
        }
        self.dev.process_queue(TX);
    }

    fn packet(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// Lets the device see host socket activity (the event loop's job).
    fn poll(&mut self) {
        std::thread::sleep(Duration::from_millis(20));
        self.dev.process_backend();
    }

    fn errors(&self) -> u64 {
        self.dev.counters().errors.load(Ordering::Relaxed)
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

#[test]
fn a_host_program_connects_to_a_guest_port_and_both_sides_talk() {
    let mut g = Guest::new();
    g.post_rx(8);
    let mut host = UnixStream::connect(g.path("")).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    g.poll();
    let got = g.received();
    assert_eq!(got.len(), 1);
    let req = got[0].0;
    assert_eq!(
        (req.op, req.src_cid, req.dst_cid, req.dst_port, req.src_port),
        (OP_REQUEST, HOST_CID, CID, 52, FIRST_LOCAL_PORT)
    );
    // The guest accepts: the host program is told the local port.
    g.send(g.packet(52, FIRST_LOCAL_PORT, OP_RESPONSE, 0), b"");
    assert_eq!(read_exactly(&mut host, 14), format!("OK {FIRST_LOCAL_PORT}\n").as_bytes());
    host.write_all(b"ping").unwrap();
    g.poll();
    let got = g.received();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.op, got[0].0.len, got[0].1.as_slice()), (OP_RW, 4, &b"ping"[..]));
    assert_eq!(got[0].0.buf_alloc, CONN_BUF);
    g.send(g.packet(52, FIRST_LOCAL_PORT, OP_RW, 4), b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");
    // The host program closes: the guest is told, answers RST, the stream is gone.
    drop(host);
    g.poll();
    let got = g.received();
    assert_eq!(
        got.iter().map(|p| (p.0.op, p.0.flags)).collect::<Vec<_>>(),
        [(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)]
    );
    g.send(g.packet(52, FIRST_LOCAL_PORT, OP_RST, 0), b"");
    assert_eq!(g.dev.streams(), 0);
    assert_eq!(g.errors(), 0);
}

#[test]
fn a_guest_connects_to_a_host_listener_on_uds_path_port() {
    let mut g = Guest::new();
    g.post_rx(8);
    let listener = UnixListener::bind(g.path("_1234")).unwrap();
    g.send(g.packet(5000, 1234, OP_REQUEST, 0), b"");
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(
        g.received().iter().map(|p| (p.0.op, p.0.src_port, p.0.dst_port)).collect::<Vec<_>>(),
        [(OP_RESPONSE, 1234, 5000)]
    );
    g.send(g.packet(5000, 1234, OP_RW, 5), b"hello");
    assert_eq!(read_exactly(&mut host, 5), b"hello");
    host.write_all(b"world").unwrap();
    g.poll();
    let got = g.received();
    assert_eq!((got[0].0.op, got[0].1.as_slice()), (OP_RW, &b"world"[..]));
    // The guest closes: buffered data is delivered, then RST, and the host sees EOF.
    g.send(g.packet(5000, 1234, OP_RW, 3), b"bye");
    g.send(Header { flags: SHUTDOWN_RCV | SHUTDOWN_SEND, ..g.packet(5000, 1234, OP_SHUTDOWN, 0) }, b"");
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    assert_eq!(g.received().iter().map(|p| p.0.op).collect::<Vec<_>>(), [OP_RST]);
    // Nobody listens on port 999: the guest gets RST.
    g.send(g.packet(5001, 999, OP_REQUEST, 0), b"");
    assert_eq!(g.received().iter().map(|p| (p.0.op, p.0.dst_port)).collect::<Vec<_>>(), [(OP_RST, 5001)]);
    assert_eq!(g.dev.streams(), 0);
}

#[test]
fn data_towards_the_guest_respects_its_credit() {
    let mut g = Guest::new();
    g.post_rx(8);
    let listener = UnixListener::bind(g.path("_7")).unwrap();
    g.send(Header { buf_alloc: 8, ..g.packet(6000, 7, OP_REQUEST, 0) }, b"");
    let (mut host, _) = listener.accept().unwrap();
    g.received();
    host.write_all(&[1u8; 20]).unwrap();
    g.poll();
    let got = g.received();
    assert_eq!(got.iter().map(|p| p.1.len()).sum::<usize>(), 8, "only the guest's 8 bytes of credit");
    // The guest consumed them: 8 more.
    g.send(Header { buf_alloc: 8, fwd_cnt: 8, ..g.packet(6000, 7, OP_CREDIT_UPDATE, 0) }, b"");
    assert_eq!(g.received().iter().map(|p| p.1.len()).sum::<usize>(), 8);
    // Asked for credit, the device says how much it has taken.
    g.send(g.packet(6000, 7, OP_RW, 3), b"abc");
    g.send(g.packet(6000, 7, OP_CREDIT_REQUEST, 0), b"");
    let got = g.received();
    assert_eq!(got.last().map(|p| (p.0.op, p.0.fwd_cnt, p.0.buf_alloc)), Some((OP_CREDIT_UPDATE, 3, CONN_BUF)));
}

#[test]
fn hostile_packets_are_dropped_or_reset_and_counted() {
    let mut g = Guest::new();
    g.post_rx(16);
    let listener = UnixListener::bind(g.path("_7")).unwrap();
    // Not from this guest's CID, or not to the host: dropped without an answer.
    g.send(Header { src_cid: 99, ..g.packet(1, 7, OP_REQUEST, 0) }, b"");
    g.send(Header { dst_cid: 77, ..g.packet(1, 7, OP_REQUEST, 0) }, b"");
    assert!(g.received().is_empty());
    assert_eq!(g.errors(), 2);
    // A datagram socket type, an unknown op, data for a stream that does not exist: RST.
    g.send(Header { kind: 2, ..g.packet(1, 7, OP_REQUEST, 0) }, b"");
    g.send(g.packet(2, 7, 42, 0), b"");
    g.send(g.packet(3, 7, OP_RW, 2), b"hi");
    assert_eq!(
        g.received().iter().map(|p| (p.0.op, p.0.dst_port)).collect::<Vec<_>>(),
        [(OP_RST, 1), (OP_RST, 2), (OP_RST, 3)]
    );
    // A header that claims more payload than the chain has, one over the limit, a chain
    // shorter than a header, one outside guest memory: dropped, counted.
    let before = g.errors();
    g.send(g.packet(4, 7, OP_RW, 100), b"short");
    g.send(g.packet(4, 7, OP_RW, u32::MAX), b"x");
    g.txq.add_chain(&g.mem, &[(0x300000, 10, false)]);
    g.txq.add_chain(&g.mem, &[((16 << 20) - 8, 64, false)]);
    g.dev.process_queue(TX);
    assert_eq!(g.errors() - before, 4);
    // A stream that sends more than the credit it was given is reset.
    g.send(g.packet(8, 7, OP_REQUEST, 0), b"");
    let (_host, _) = listener.accept().unwrap();
    g.received();
    // (The host never reads, so once its socket buffer is full the device holds the data.)
    let big = vec![0u8; MAX_PAYLOAD];
    let mut reset = false;
    for _ in 0..32 {
        g.send(g.packet(8, 7, OP_RW, MAX_PAYLOAD as u32), &big);
        if g.received().iter().any(|p| p.0.op == OP_RST && p.0.dst_port == 8) {
            reset = true;
            break;
        }
    }
    assert!(reset, "over-credit stream reset");
    assert_eq!(g.dev.streams(), 0);
    // A receive buffer too small for a header is given back empty.
    g.rxq.add_chain(&g.mem, &[(0x180000, 8, true)]);
    g.dev.process_queue(RX);
    assert_eq!(g.txq.used_idx(&g.mem), g.next_tx_buf.get() as u16 + 2);
}

#[test]
fn bad_connect_lines_close_the_host_connection() {
    let mut g = Guest::new();
    g.post_rx(4);
    for line in [&b"CONNECT x\n"[..], b"HELLO 52\n", b"CONNECT 99999999999\n", &[b'9'; 100][..], b"CONNECT \n"] {
        let mut host = UnixStream::connect(g.path("")).unwrap();
        let _ = host.write_all(line);
        g.poll();
        let mut rest = Vec::new();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Closed: EOF, or a reset where the device left part of the line unread.
        let r = host.read_to_end(&mut rest);
        assert!(
            matches!(&r, Ok(0)) || r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "{:?}: {r:?}",
            String::from_utf8_lossy(line)
        );
    }
    assert!(g.received().is_empty(), "the guest was asked nothing");
    assert_eq!(g.errors(), 5);
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
}

#[test]
fn a_restored_device_tells_the_guest_to_reset_its_transport() {
    let mut g = Guest::new();
    g.evq.add_chain(&g.mem, &[(0x190000, 4, true)]);
    g.dev.restored();
    assert_eq!(g.evq.used_idx(&g.mem), 1);
    assert_eq!(g.evq.used_elem(&g.mem, 0).1, 4);
    assert_eq!(g.mem.read_obj::<u32>(GuestAddress(0x190000)).unwrap(), EVENT_TRANSPORT_RESET);
    let mut cfg = [0u8; 8];
    g.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    assert!(matches!(VirtioVsock::new(2, &g.path("x")), Err(VsockError::BadCid(2))));
}

#[test]
fn a_guest_that_posts_no_receive_buffers_cannot_grow_the_control_queue() {
    let mut g = Guest::new();
    // Requests to a port nobody listens on, each answered with RST, and no receive buffers.
    let sent = MAX_CONTROL + 5;
    for port in 0..sent as u32 {
        g.send(g.packet(10_000 + port, 999, OP_REQUEST, 0), b"");
    }
    assert_eq!(g.dev.control.len(), MAX_CONTROL, "the answers wait, up to the cap");
    assert_eq!(usize::from(g.txq.used_idx(&g.mem)), MAX_CONTROL, "the rest stay in the transmit queue");
    // Receive buffers come: every answer arrives, in order, and the held chains are taken.
    let mut answers = Vec::new();
    while answers.len() < sent {
        g.post_rx(16);
        g.dev.process_queue(RX);
        let got = g.received();
        assert!(!got.is_empty(), "answers stop at {}", answers.len());
        answers.extend(got.iter().map(|p| (p.0.op, p.0.dst_port)));
    }
    let expected: Vec<_> = (0..sent as u32).map(|p| (OP_RST, 10_000 + p)).collect();
    assert_eq!(answers, expected);
    assert_eq!(usize::from(g.txq.used_idx(&g.mem)), sent);
    assert!(g.dev.control.is_empty());
}

#[test]
fn every_stream_counts_once_against_the_connection_limit() {
    let mut g = Guest::new();
    g.dev.max_conns = 4;
    g.post_rx(16);
    let listener = UnixListener::bind(g.path("_7")).unwrap();
    for port in 0..5 {
        g.send(g.packet(100 + port, 7, OP_REQUEST, 0), b"");
    }
    let _held: Vec<_> = (0..4).map(|_| listener.accept().unwrap()).collect();
    assert_eq!(
        g.received().iter().map(|p| (p.0.op, p.0.dst_port)).collect::<Vec<_>>(),
        [(OP_RESPONSE, 100), (OP_RESPONSE, 101), (OP_RESPONSE, 102), (OP_RESPONSE, 103), (OP_RST, 104)],
        "four streams for a limit of four; the fifth is refused"
    );
    assert_eq!(g.dev.streams(), 4);
    // A host connection beyond the limit is closed at once.
    let mut host = UnixStream::connect(g.path("")).unwrap();
    g.poll();
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(host.read_to_end(&mut rest), Ok(0)));
}
