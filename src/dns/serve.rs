//! Serving DNS: one responder thread per UDP socket, and DNS over TCP on a
//! connection conn.rs hands over.
//!
//! The UDP thread answers from the table itself (no allocation per query:
//! the receive and reply buffers are reused). A query that needs a blocking
//! call (forwarding through the upstream, a direct-domain lookup) gets a
//! short-lived thread of its own, so one slow name never holds up the
//! others; at most MAX_SLOW of those run per socket, and a query beyond that
//! gets SERVFAIL at once.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::responder::{Outcome, Responder, Transport};
use super::wire;
use crate::error::{io_text, Context, Result};

/// Forwards and direct lookups in flight per UDP socket.
const MAX_SLOW: usize = 64;
/// A TCP client that sends nothing for this long, or takes longer to send
/// one message, is disconnected (RFC 7766 §6.2.3 asks for seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Any datagram fits (a UDP payload is at most 65,507 bytes over IPv4).
const UDP_BUF: usize = 65_536;
/// getaddrinfo runs on the slow threads: glibc's NSS modules want more than
/// the minimum.
const SLOW_STACK: usize = 256 * 1024;

/// Starts one responder thread per socket. The sockets must be bound.
pub fn start_udp(sockets: Vec<UdpSocket>, r: Arc<Responder>) -> Result<()> {
    for sock in sockets {
        let local = sock
            .local_addr()
            .context("reading the DNS socket's address")?;
        sock.set_read_timeout(None)
            .with_context(|| format!("setting up the DNS socket {local}"))?;
        let sock = Arc::new(sock);
        let r = Arc::clone(&r);
        thread::Builder::new()
            .name("dns-udp".into())
            .spawn(move || udp_loop(&sock, local, &r))
            .with_context(|| format!("starting the DNS responder on {local}"))?;
    }
    Ok(())
}

fn udp_loop(sock: &Arc<UdpSocket>, local: SocketAddr, r: &Arc<Responder>) {
    let mut buf = vec![0u8; UDP_BUF];
    let mut out = Vec::with_capacity(wire::UDP_MIN);
    let slow = Arc::new(AtomicUsize::new(0));
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // ENOMEM and the like: transient. Do not spin on it.
                warn!("DNS: receiving on {local}: {}", io_text(&e));
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let query = &buf[..n];
        match r.respond(query, &mut out, Transport::Udp, false) {
            Outcome::Reply | Outcome::Rejected => send(sock, &out, peer),
            Outcome::Drop => {}
            Outcome::Slow => answer_slowly(sock, r, &slow, query, peer, &mut out),
        }
    }
}

fn send(sock: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(reply, peer) {
        debug!("DNS: replying to {peer}: {}", io_text(&e));
    }
}

/// Decrements the slow-query count when the slow thread ends, however.
struct SlowSlot(Arc<AtomicUsize>);

impl Drop for SlowSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn answer_slowly(
    sock: &Arc<UdpSocket>,
    r: &Arc<Responder>,
    slow: &Arc<AtomicUsize>,
    query: &[u8],
    peer: SocketAddr,
    out: &mut Vec<u8>,
) {
    if slow.fetch_add(1, Ordering::Relaxed) >= MAX_SLOW {
        slow.fetch_sub(1, Ordering::Relaxed);
        debug!("DNS: {MAX_SLOW} lookups already in flight; SERVFAIL to {peer}");
        servfail(query, out);
        send(sock, out, peer);
        return;
    }
    let slot = SlowSlot(Arc::clone(slow));
    let (sock2, r2, query2) = (Arc::clone(sock), Arc::clone(r), query.to_vec());
    let spawned = thread::Builder::new()
        .name("dns-lookup".into())
        .stack_size(SLOW_STACK)
        .spawn(move || {
            let _slot = slot;
            let mut out = Vec::new();
            if r2.respond(&query2, &mut out, Transport::Udp, true) != Outcome::Drop {
                send(&sock2, &out, peer);
            }
        });
    // On failure the closure, and with it the slot, has been dropped.
    if let Err(e) = spawned {
        warn!("DNS: cannot start a lookup thread: {}", io_text(&e));
        servfail(query, out);
        send(sock, out, peer);
    }
}

/// A SERVFAIL reply to a query that parsed (Slow is only ever the outcome
/// of one).
fn servfail(query: &[u8], out: &mut Vec<u8>) {
    out.clear();
    if let Ok(q) = wire::parse_query(query) {
        wire::Reply::new(out, &q, wire::rcode::SERVFAIL, q.udp_limit()).finish();
    }
}

/// DNS over TCP (RFC 7766): two-byte length, message; replies in order,
/// until EOF, an idle TCP_IDLE, or a malformed message (after its FORMERR:
/// a length prefix that lied has left the stream out of step, and nothing
/// after it can be trusted to be a query).
pub fn serve_tcp(stream: &TcpStream, r: &Responder) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    if let Err(e) = stream.set_write_timeout(Some(TCP_IDLE)) {
        debug!("DNS over TCP from {peer}: {}", io_text(&e));
        return;
    }
    let mut msg = Vec::new();
    let mut out = Vec::new();
    let mut framed = Vec::new();
    let why = loop {
        let mut len = [0u8; 2];
        match read_full(stream, &mut len, Instant::now() + TCP_IDLE) {
            Ok(true) => {}
            Ok(false) => break "end of stream".to_string(),
            Err(e) => break io_text(&e),
        }
        let n = u16::from_be_bytes(len) as usize;
        if n == 0 {
            break "an empty message".to_string();
        }
        msg.resize(n, 0);
        match read_full(stream, &mut msg, Instant::now() + TCP_IDLE) {
            Ok(true) => {}
            Ok(false) => break format!("end of stream inside a {n}-byte message"),
            Err(e) => break format!("{} inside a {n}-byte message", io_text(&e)),
        }
        let outcome = r.respond(&msg, &mut out, Transport::Tcp, true);
        if matches!(outcome, Outcome::Reply | Outcome::Rejected) {
            framed.clear();
            // Replies are capped at 65,535 bytes by Transport::Tcp.
            framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
            framed.extend_from_slice(&out);
            if let Err(e) = (&mut &*stream).write_all(&framed) {
                break io_text(&e);
            }
        }
        match outcome {
            Outcome::Reply => {}
            Outcome::Rejected => break "a malformed message".to_string(),
            Outcome::Drop | Outcome::Slow => break "not a query".to_string(),
        }
    };
    debug!("DNS over TCP from {peer} ends: {why}");
}

/// Fills `buf` by `deadline`. Ok(false): EOF before the first byte (a
/// clean end between messages); EOF later is an error.
fn read_full(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(ErrorKind::TimedOut, "timed out"));
        }
        stream.set_read_timeout(Some(left))?;
        match (&mut &*stream).read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(io::Error::new(ErrorKind::TimedOut, "timed out"))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::responder::tests::{decode, responder};
    use crate::dns::wire::{rtype, tests::query};
    use std::net::{Shutdown, TcpListener};

    /// A TCP DNS server on loopback serving one connection with serve_tcp;
    /// returns the client end.
    fn tcp_pair(r: Responder) -> (TcpStream, thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            serve_tcp(&s, &r);
        });
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        (c, h)
    }

    fn framed(m: &[u8]) -> Vec<u8> {
        let mut v = (m.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(m);
        v
    }

    fn read_msg(c: &mut TcpStream) -> Option<Vec<u8>> {
        let mut len = [0u8; 2];
        c.read_exact(&mut len).ok()?;
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut m).ok()?;
        Some(m)
    }

    /// Closed by the server: EOF, or a reset when it closed with bytes of
    /// ours unread (the reply before it is still delivered).
    fn at_eof(c: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }

    #[test]
    fn tcp_answers_pipelined_queries_in_order_until_eof() {
        let (mut c, h) = tcp_pair(responder(None));
        let qs: Vec<Vec<u8>> = (0..5)
            .map(|i| query(100 + i, &format!("host{i}.test"), rtype::A, None))
            .collect();
        let all: Vec<u8> = qs.iter().flat_map(|q| framed(q)).collect();
        // In one write, and split at awkward places.
        c.write_all(&all[..3]).unwrap();
        thread::sleep(Duration::from_millis(20));
        c.write_all(&all[3..]).unwrap();
        for q in &qs {
            let reply = read_msg(&mut c).unwrap();
            let (rc, _, ans) = decode(q, &reply);
            assert_eq!((rc, ans.len()), (0, 1));
        }
        c.shutdown(Shutdown::Write).unwrap();
        assert!(at_eof(&mut c));
        h.join().unwrap();
    }

    #[test]
    fn tcp_length_prefix_that_lies_long_gets_formerr_and_close() {
        let (mut c, h) = tcp_pair(responder(None));
        let q1 = query(1, "one.test", rtype::A, None);
        let q2 = query(2, "two.test", rtype::A, None);
        // The first prefix claims its message and the whole next one: the
        // second query, swallowed, must not be answered.
        let second = framed(&q2);
        let mut bytes = ((q1.len() + second.len()) as u16).to_be_bytes().to_vec();
        bytes.extend_from_slice(&q1);
        bytes.extend_from_slice(&second);
        c.write_all(&bytes).unwrap();
        let reply = read_msg(&mut c).unwrap();
        assert_eq!(&reply[..2], [0, 1]);
        assert_eq!(reply[3] & 0xF, 1, "FORMERR");
        assert_eq!(&reply[4..12], [0; 8], "no question, no answer");
        assert!(at_eof(&mut c), "closed after the malformed message");
        h.join().unwrap();
    }

    #[test]
    fn tcp_length_prefix_that_lies_short_or_ends_early_never_answers_a_guess() {
        let (mut c, h) = tcp_pair(responder(None));
        let q = query(3, "three.test", rtype::A, None);
        let mut bytes = ((q.len() - 4) as u16).to_be_bytes().to_vec();
        bytes.extend_from_slice(&q);
        c.write_all(&bytes).unwrap();
        let reply = read_msg(&mut c).unwrap();
        assert_eq!(reply[3] & 0xF, 1, "FORMERR for the cut message");
        assert!(at_eof(&mut c));
        h.join().unwrap();

        // EOF inside a message: no reply at all.
        let (mut c, h) = tcp_pair(responder(None));
        c.write_all(&[0xFF, 0xFF, 1, 2, 3]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert!(at_eof(&mut c));
        h.join().unwrap();
    }

    #[test]
    fn tcp_handles_a_full_64k_message_and_an_empty_one() {
        let (mut c, h) = tcp_pair(responder(None));
        let mut big = query(4, "big.test", rtype::A, None);
        big.resize(0xFFFF, 0);
        c.write_all(&framed(&big)).unwrap();
        let reply = read_msg(&mut c).unwrap();
        assert_eq!(reply[3] & 0xF, 1, "trailing bytes: FORMERR");
        assert!(at_eof(&mut c));
        h.join().unwrap();

        let (mut c, h) = tcp_pair(responder(None));
        c.write_all(&[0, 0]).unwrap();
        assert!(at_eof(&mut c));
        h.join().unwrap();
    }

    #[test]
    fn udp_responder_answers_and_survives_garbage() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        start_udp(vec![server], Arc::new(responder(None))).unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; UDP_BUF];
        // Garbage of every kind first: a 64 KiB datagram, an empty one, a
        // response (never answered), a pointer loop.
        let mut resp = query(9, "x.test", rtype::A, None);
        resp[2] |= 0x80;
        let mut looped = query(10, "x.test", rtype::A, None)[..12].to_vec();
        looped.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        let mut big = query(8, "x.test", rtype::A, None);
        big.resize(65_507, 0x55);
        let garbage: Vec<Vec<u8>> = vec![big, vec![], resp, looped];
        for g in &garbage {
            c.send_to(g, addr).unwrap();
        }
        // FORMERR for the big one and the loop; nothing for the others.
        for id in [[0, 8], [0, 10]] {
            let (n, _) = c.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..2], id);
            assert_eq!((n, buf[3] & 0xF), (12, 1));
        }
        let q = query(11, "ok.test", rtype::A, None);
        c.send_to(&q, addr).unwrap();
        let (n, _) = c.recv_from(&mut buf).unwrap();
        let (rc, _, ans) = decode(&q, &buf[..n]);
        assert_eq!((rc, ans.len()), (0, 1));
        // A query that needs the (absent) forwarder: SERVFAIL from a lookup
        // thread.
        let q = query(12, "ok.test", 16, None);
        c.send_to(&q, addr).unwrap();
        let (n, _) = c.recv_from(&mut buf).unwrap();
        assert_eq!(decode(&q, &buf[..n]).0, wire::rcode::SERVFAIL);
    }
}
