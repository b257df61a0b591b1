//! The sockmap relay (`--relay sockmap`): an established pair is relayed by
//! the kernel, and the connection's thread only waits for the end.
//!
//! The pair (client socket, dialed socket, after any upstream handshake) goes
//! into two BPF sockhashes; the stream verdict program `ktproxy_relay`
//! (bpf/ktproxy.bpf.c) then sends every skb either socket receives to the
//! other socket's egress. The thread sleeps in poll(POLLRDHUP) on both
//! sockets and does what splice's relay does at the edges, so clients see no
//! difference:
//!
//! - **Half-close.** EOF from one side becomes shutdown(SHUT_WR) on the other,
//!   but only once every byte received before the EOF is in the other
//!   socket's send queue. Redirected skbs wait in the peer's psock backlog
//!   (a workqueue), and a FIN queued before them would have them fail with
//!   EPIPE. The backlog is not visible from user space, so ktproxy counts: the
//!   verdict program counts the bytes it redirected from the socket at EOF,
//!   and the other socket has taken them all when the bytes written to it
//!   (TCP_INFO's bytes_acked plus SIOCOUTQ) have grown by that much since the
//!   pair joined.
//! - **Resets.** POLLERR on either socket: the caller resets both, as today.
//! - **Bytes that arrived before the pair joined the maps** wait in the
//!   socket's receive queue, which the verdict reads only when new data
//!   arrives. setsockopt(SO_RCVLOWAT) makes TCP run the data-ready callback
//!   (the verdict) at once: those bytes go out first, in order.
//! - **Refusals.** A socket that is no longer ESTABLISHED (its FIN came
//!   during the dial) or a full map is refused: before the kernel has taken
//!   any byte the pair falls back to splice (counted); see `Pair::second`
//!   for the one case after.
//!
//! Byte counts come from the verdict program: each socket's entry in
//! `relay_ends` adds the length of every skb it redirects. These are exactly
//! the bytes the relay moved (TCP_INFO's byte counters would also count the
//! upstream handshake and need a baseline per socket), and the program looks
//! the entry up for every skb anyway.
//!
//! Nothing here allocates: map updates are raw bpf(2) calls on stack values.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libbpf_rs::libbpf_sys;
use log::{info, trace};

use crate::bpf::RelayEnd;
use crate::error::io_text;
use crate::pipes::PipePool;
use crate::relay::{self, Totals};
use crate::sys;

/// How many sockets the relay's maps hold: one per descriptor ktproxy may
/// have open, so the maps never refuse a socket that exists.
pub fn map_capacity() -> u32 {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(65536, |(soft, _)| soft);
    soft.clamp(1024, 1 << 20) as u32
}

/// While an EOF waits for redirected bytes to leave: first pause, and the
/// longest one (each wait doubles the last).
const DRAIN_PAUSE_FIRST: Duration = Duration::from_micros(20);
const DRAIN_PAUSE_MAX: Duration = Duration::from_millis(10);

/// The relay's maps and the attachment of its verdict program, as
/// descriptors of their own: connection threads use them for as long as they
/// run. When ktproxy exits, kill -9 included, the last descriptor goes and
/// the kernel frees the maps, which first hands every socket in them back
/// to plain TCP.
pub struct RelayMaps {
    ends: OwnedFd,
    peers: OwnedFd,
    verdict: OwnedFd,
    /// The bpf_link; None when the kernel (< 6.10) has no sockmap links and
    /// the program is attached to the map itself, which dies with it too.
    _link: Option<OwnedFd>,
    /// Pairs relayed in the kernel, and pairs refused and spliced instead.
    kernel: AtomicU64,
    fallbacks: AtomicU64,
}

impl RelayMaps {
    /// Attaches `prog` to the `verdict` sockhash; keeps a descriptor of
    /// each map.
    pub fn attach(
        prog: BorrowedFd,
        ends: &impl AsFd,
        peers: &impl AsFd,
        verdict: &impl AsFd,
    ) -> Result<RelayMaps, String> {
        let dup = |m: &dyn AsFd| {
            m.as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("duplicating a map descriptor: {}", io_text(&e)))
        };
        let (ends, peers, verdict) = (dup(ends)?, dup(peers)?, dup(verdict)?);
        let kind = libbpf_sys::BPF_SK_SKB_STREAM_VERDICT;
        // SAFETY: both descriptors are open; no options are passed.
        let link = unsafe {
            libbpf_sys::bpf_link_create(
                prog.as_raw_fd(),
                verdict.as_raw_fd(),
                kind,
                std::ptr::null(),
            )
        };
        let link = if link >= 0 {
            // SAFETY: bpf_link_create returned a new descriptor we own.
            Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(link) })
        } else {
            // SAFETY: both descriptors are open.
            let r = unsafe {
                libbpf_sys::bpf_prog_attach(prog.as_raw_fd(), verdict.as_raw_fd(), kind, 0)
            };
            if r < 0 {
                return Err(format!(
                    "attaching the verdict program to its sockhash: {}",
                    io_text(&io::Error::from_raw_os_error(-r))
                ));
            }
            None
        };
        Ok(RelayMaps {
            ends,
            peers,
            verdict,
            _link: link,
            kernel: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        })
    }

    /// (pairs relayed in the kernel, pairs spliced because it refused them)
    pub fn counts(&self) -> (u64, u64) {
        (
            self.kernel.load(Ordering::Relaxed),
            self.fallbacks.load(Ordering::Relaxed),
        )
    }

    /// Relays until both directions are done, in the kernel if it takes the
    /// pair, with splice if not. As `relay::relay`: on error the totals so
    /// far come with it, and the caller resets both sockets.
    pub fn relay(
        &self,
        id: u64,
        client: &TcpStream,
        target: &TcpStream,
        pipes: &PipePool,
    ) -> (Totals, Option<io::Error>) {
        match Pair::join(self, id, client, target) {
            Ok(pair) => {
                self.kernel.fetch_add(1, Ordering::Relaxed);
                info!("#{id} Relaying in the kernel (sockmap)");
                pair.run()
            }
            Err(e) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                info!(
                    "#{id} sockmap refused the pair ({}); relaying with splice",
                    io_text(&e)
                );
                relay::relay(id, client, target, pipes)
            }
        }
    }

    fn put_end(&self, cookie: u64, peer: u64) -> io::Result<()> {
        let end = RelayEnd { peer, bytes: 0 };
        update(&self.ends, &cookie, &end)
    }

    /// The bytes the verdict has sent on for a socket so far.
    fn end_bytes(&self, cookie: u64) -> io::Result<u64> {
        let mut end = RelayEnd { peer: 0, bytes: 0 };
        // SAFETY: key and value point to a u64 and a RelayEnd, the map's
        // key and value types (checked by the kernel against its sizes).
        cvt(unsafe {
            libbpf_sys::bpf_map_lookup_elem(
                self.ends.as_raw_fd(),
                (&cookie as *const u64).cast(),
                (&mut end as *mut RelayEnd).cast(),
            )
        })?;
        Ok(end.bytes)
    }

    /// Removes a socket's entry; returns the bytes the verdict sent on for it.
    fn take_end(&self, cookie: u64) -> io::Result<u64> {
        let mut end = RelayEnd { peer: 0, bytes: 0 };
        // SAFETY: key and value point to a u64 and a RelayEnd, the map's
        // key and value types (checked by the kernel against its sizes).
        cvt(unsafe {
            libbpf_sys::bpf_map_lookup_and_delete_elem(
                self.ends.as_raw_fd(),
                (&cookie as *const u64).cast(),
                (&mut end as *mut RelayEnd).cast(),
            )
        })?;
        Ok(end.bytes)
    }

    fn delete(map: &OwnedFd, cookie: u64) {
        // SAFETY: key points to a u64, the map's key type. Failure leaves
        // the entry to close(), which removes a socket from every sockhash.
        unsafe { libbpf_sys::bpf_map_delete_elem(map.as_raw_fd(), (&cookie as *const u64).cast()) };
    }
}

/// bpf(BPF_MAP_UPDATE_ELEM, BPF_NOEXIST): a sockhash takes the socket's
/// descriptor as its value.
fn update<V>(map: &OwnedFd, key: &u64, value: &V) -> io::Result<()> {
    // SAFETY: key and value point to live values of the map's key and value
    // sizes (the kernel checks them against the map).
    cvt(unsafe {
        libbpf_sys::bpf_map_update_elem(
            map.as_raw_fd(),
            (key as *const u64).cast(),
            (value as *const V).cast(),
            libbpf_sys::BPF_NOEXIST.into(),
        )
    })
}

/// libbpf returns -errno.
fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::from_raw_os_error(-r))
    } else {
        Ok(())
    }
}

const CLIENT: usize = 0;
const TARGET: usize = 1;
/// Direction i carries socket i's bytes to socket 1 - i.
const DIRECTION: [&str; 2] = ["up", "down"];

/// One pair in the kernel's hands.
struct Pair<'a> {
    maps: &'a RelayMaps,
    id: u64,
    socks: [&'a TcpStream; 2],
    cookies: [u64; 2],
    /// Socket i's EOF has been forwarded (or its pending bytes copied, then
    /// forwarded).
    eof: [bool; 2],
    /// Bytes ktproxy copied itself, per direction (see `second`).
    copied: [u64; 2],
    /// `written` of each socket when the pair joined, before any verdict.
    base: [u64; 2],
}

impl<'a> Pair<'a> {
    /// Publishes the pair and puts the dialed socket under the verdict. On
    /// error everything done is undone before the kernel has moved a byte,
    /// so the caller may splice instead.
    fn join(
        maps: &'a RelayMaps,
        id: u64,
        client: &'a TcpStream,
        target: &'a TcpStream,
    ) -> io::Result<Pair<'a>> {
        let cookies = [sys::socket_cookie(client)?, sys::socket_cookie(target)?];
        // Before any verdict can write to them.
        let base = [written(client)?, written(target)?];
        let pair = Pair {
            maps,
            id,
            socks: [client, target],
            cookies,
            eof: [false; 2],
            copied: [0; 2],
            base,
        };
        let mut done = 0;
        let r = pair.enter(&mut done);
        trace!(
            "#{id} sockmap: cookies {:#x} {:#x}, {done} of 5 steps: {r:?}",
            cookies[0],
            cookies[1]
        );
        if let Err(e) = r {
            pair.undo(done);
            return Err(e);
        }
        Ok(pair)
    }

    /// The steps before the point of no return; `done` counts those done.
    fn enter(&self, done: &mut usize) -> io::Result<()> {
        let (m, c) = (self.maps, self.cookies);
        m.put_end(c[CLIENT], c[TARGET])?;
        *done += 1;
        m.put_end(c[TARGET], c[CLIENT])?;
        *done += 1;
        for i in [CLIENT, TARGET] {
            update(&m.peers, &c[i], &(self.socks[i].as_raw_fd() as u64))?;
            *done += 1;
        }
        // The dialed socket first: its peer sending a FIN during the dial
        // is the likelier refusal, and this one is still free to fail.
        update(
            &m.verdict,
            &c[TARGET],
            &(self.socks[TARGET].as_raw_fd() as u64),
        )?;
        *done += 1;
        Ok(())
    }

    /// Undoes the first `done` steps of `enter`, last first. No verdict has
    /// run, so no byte has left the sockets' receive queues.
    fn undo(&self, done: usize) {
        let (m, c) = (self.maps, self.cookies);
        for (step, i) in [(4, TARGET), (3, CLIENT)] {
            if done >= step {
                RelayMaps::delete(&m.peers, c[i]);
            }
        }
        for (step, i) in [(2, TARGET), (1, CLIENT)] {
            if done >= step {
                let _ = m.take_end(c[i]);
            }
        }
    }

    /// Relays to the end; the pair's entries are gone afterwards (the
    /// sockets leave the sockhashes when they are closed).
    fn run(mut self) -> (Totals, Option<io::Error>) {
        let err = self.second().and_then(|()| self.wait()).err();
        let mut bytes = [0u64; 2];
        for i in [CLIENT, TARGET] {
            bytes[i] = self.maps.take_end(self.cookies[i]).unwrap_or(0) + self.copied[i];
        }
        (
            Totals {
                up: bytes[CLIENT],
                down: bytes[TARGET],
            },
            err,
        )
    }

    /// Puts the client socket under the verdict too, then has the verdict
    /// read whatever both sockets received before.
    ///
    /// The dialed socket's verdict may already have sent bytes into the
    /// client socket's backlog, so a refusal here cannot go back to splice.
    /// A client that sent its FIN during the dial (its socket is no longer
    /// ESTABLISHED, which a sockhash refuses) has nothing more to say: its
    /// pending bytes are copied here, its EOF forwarded, and the other
    /// direction stays in the kernel. Any other refusal ends the connection
    /// as an error.
    fn second(&mut self) -> io::Result<()> {
        let client = self.socks[CLIENT];
        let r = update(
            &self.maps.verdict,
            &self.cookies[CLIENT],
            &(client.as_raw_fd() as u64),
        );
        trace!("#{} sockmap: client under the verdict: {r:?}", self.id);
        match r {
            Ok(()) => sys::rcvlowat_one(client)?,
            Err(e) => {
                if client.take_error()?.is_some() || !at_eof(client)? {
                    return Err(e);
                }
                self.copy_to_eof(CLIENT)?;
                self.forward_eof(CLIENT)?;
            }
        }
        sys::rcvlowat_one(self.socks[TARGET])
    }

    /// Waits for both EOFs, forwarding each, or for an error.
    fn wait(&mut self) -> io::Result<()> {
        while self.eof != [true, true] {
            let watch = |i: usize| if self.eof[i] { 0 } else { libc::POLLRDHUP };
            let mut fds = [
                pollfd(self.socks[CLIENT], watch(CLIENT)),
                pollfd(self.socks[TARGET], watch(TARGET)),
            ];
            poll(&mut fds, None)?;
            trace!(
                "#{} poll: client revents {:#x}, target revents {:#x}",
                self.id,
                fds[CLIENT].revents,
                fds[TARGET].revents
            );
            for i in [CLIENT, TARGET] {
                // POLLHUP on a socket whose EOF is forwarded, while ktproxy
                // has not yet shut its sending side: it was reset or closed.
                let r = fds[i].revents;
                if r & libc::POLLERR != 0 || (self.eof[i] && r & libc::POLLHUP != 0) {
                    return Err(socket_error(self.socks[i]));
                }
            }
            for i in [CLIENT, TARGET] {
                if !self.eof[i] && fds[i].revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
                    self.forward_eof(i)?;
                }
            }
        }
        Ok(())
    }

    /// Socket i said EOF: once everything it received before has reached
    /// the other socket's send queue, half-close that one.
    fn forward_eof(&mut self, i: usize) -> io::Result<()> {
        let (from, to) = (self.socks[i], self.socks[1 - i]);
        // TCP_INFO takes `from`'s lock, so the softirq that delivered the FIN
        // (waking poll before it ran the verdict on the bytes it came with)
        // is done: the count is final.
        sys::tcp_info(from)?;
        let redirected = self.maps.end_bytes(self.cookies[i])?;
        let want = self.base[1 - i] + redirected + self.copied[i];
        let mut pause = DRAIN_PAUSE_FIRST;
        loop {
            let (got, _) = written_at_least(to, &sys::tcp_info(to)?)?;
            trace!(
                "#{} {}: {redirected} bytes redirected, {} of them written",
                self.id,
                DIRECTION[i],
                got.saturating_sub(self.base[1 - i] + self.copied[i])
            );
            if got >= want {
                break;
            }
            // The rest waits in `to`'s psock backlog: wait, but not through
            // an error on either socket.
            let mut fds = [pollfd(from, 0), pollfd(to, 0)];
            poll(&mut fds, Some(pause))?;
            // Only `to`'s hang-up is news: `from` may be shut both ways by now.
            if fds[0].revents & libc::POLLERR != 0 {
                return Err(socket_error(from));
            }
            if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(socket_error(to));
            }
            pause = (pause * 2).min(DRAIN_PAUSE_MAX);
        }
        // ENOTCONN: the peer is gone already, which its poll reports.
        let r = sys::shutdown_write(to);
        trace!(
            "#{} {}: shutdown({}, SHUT_WR) = {r:?}",
            self.id,
            DIRECTION[i],
            to.as_raw_fd()
        );
        self.eof[i] = true;
        Ok(())
    }

    /// Copies what socket i still holds, up to its EOF, to the other socket
    /// (both non-blocking; a stack buffer, no allocation). Never inlined:
    /// its 16 KiB frame would otherwise be part of every relaying thread's
    /// stack, touched by the stack probe and kept as resident memory by
    /// each idle connection.
    #[inline(never)]
    #[cold]
    fn copy_to_eof(&mut self, i: usize) -> io::Result<()> {
        let (mut from, mut to) = (self.socks[i], self.socks[1 - i]);
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_for(from, libc::POLLIN)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                match to.write(rest) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(w) => {
                        rest = &rest[w..];
                        self.copied[i] += w as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_for(to, libc::POLLOUT)?,
                    Err(e) => return Err(e),
                }
            }
            trace!("#{} {}: copied {n} bytes", self.id, DIRECTION[i]);
        }
    }
}

/// Bytes written to a socket since it connected (its SYN included):
/// bytes_acked plus the send queue, read so that no ACK falls between the
/// two (for a base that must be exact).
fn written(sock: &TcpStream) -> io::Result<u64> {
    loop {
        let info = sys::tcp_info(sock)?;
        let at_least = written_at_least(sock, &info)?;
        if at_least.1 || sys::tcp_info(sock)?.tcpi_bytes_acked == info.tcpi_bytes_acked {
            return Ok(at_least.0);
        }
    }
}

/// `written`, or less when an ACK came between the two reads (bytes_acked
/// is read first, so the sum can only fall short): enough to tell that a
/// count has been reached. Also says whether the figure is exact.
fn written_at_least(sock: &TcpStream, info: &libc::tcp_info) -> io::Result<(u64, bool)> {
    // Nothing in flight and nothing unsent: bytes_acked alone is exact.
    if info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0 {
        return Ok((info.tcpi_bytes_acked, true));
    }
    let queued = sys::send_queue(sock)?;
    Ok((info.tcpi_bytes_acked + u64::from(queued), false))
}

fn wait_for(sock: &TcpStream, events: libc::c_short) -> io::Result<()> {
    poll(&mut [pollfd(sock, events)], None)
}

/// The socket has received its peer's FIN (POLLRDHUP, without waiting).
fn at_eof(sock: &TcpStream) -> io::Result<bool> {
    let mut fds = [pollfd(sock, libc::POLLRDHUP)];
    poll(&mut fds, Some(Duration::ZERO))?;
    Ok(fds[0].revents & libc::POLLRDHUP != 0)
}

fn pollfd(sock: &TcpStream, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// ppoll(2), retried on EINTR; None waits for ever. Raw libc: nix's
/// PollFlags has no POLLRDHUP, and its `revents()` gives up on bits it does
/// not know.
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos().into(),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    loop {
        // SAFETY: fds is a live slice of pollfd and ts_ptr is null or points
        // to `ts`, which outlives the call; no signal mask.
        let r = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ts_ptr,
                std::ptr::null(),
            )
        };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Why a socket reported an error or hung up: SO_ERROR, else a reset.
fn socket_error(sock: &TcpStream) -> io::Error {
    match sock.take_error() {
        Ok(Some(e)) => e,
        Ok(None) => io::ErrorKind::ConnectionReset.into(),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Shutdown, TcpListener};
    use std::thread;

    /// client <-> [a | relay | b] <-> server, all on loopback.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn sockets() -> [TcpStream; 4] {
        let (client, relay_c) = pair();
        let (relay_t, server) = pair();
        relay_c.set_nonblocking(true).unwrap();
        relay_t.set_nonblocking(true).unwrap();
        [client, relay_c, relay_t, server]
    }

    #[test]
    fn half_close_is_forwarded_after_the_bytes_and_counted() {
        let maps = crate::bpf::relay_for_tests();
        let [mut client, relay_c, relay_t, mut server] = sockets();
        // Sent before the pair joins: the verdict must still see it first.
        client.write_all(b"question").unwrap();
        let pipes = PipePool::new(1);
        let (totals, err) = thread::scope(|s| {
            let h = s.spawn(|| maps.relay(1, &relay_c, &relay_t, &pipes));
            let mut got = [0u8; 8];
            server.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"question");
            client.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
            server.write_all(&[7u8; 300_000]).unwrap();
            server.shutdown(Shutdown::Write).unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).unwrap();
            assert_eq!(back.len(), 300_000);
            assert!(back.iter().all(|&b| b == 7));
            h.join().unwrap()
        });
        assert!(err.is_none(), "{err:?}");
        assert_eq!((totals.up, totals.down), (8, 300_000));
        assert_eq!(maps.counts(), (1, 0));
    }

    #[test]
    fn a_client_fin_after_the_dialed_socket_joined_is_copied_then_forwarded() {
        let maps = crate::bpf::relay_for_tests();
        let [mut client, relay_c, relay_t, mut server] = sockets();
        // The dialed socket is under the verdict; then the client's FIN
        // comes, and the sockhash refuses the client socket.
        let pair = Pair::join(&maps, 2, &relay_c, &relay_t).unwrap();
        client.write_all(b"request").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        while !at_eof(&relay_c).unwrap() {
            thread::sleep(Duration::from_millis(1));
        }
        server.write_all(b"early").unwrap();
        let (totals, err) = thread::scope(|s| {
            let h = s.spawn(|| pair.run());
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"request");
            server.write_all(b" and late").unwrap();
            server.shutdown(Shutdown::Write).unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).unwrap();
            assert_eq!(back, b"early and late");
            h.join().unwrap()
        });
        assert!(err.is_none(), "{err:?}");
        assert_eq!((totals.up, totals.down), (7, 14));
    }

    #[test]
    fn a_reset_by_the_server_is_an_error() {
        let maps = crate::bpf::relay_for_tests();
        let [mut client, relay_c, relay_t, server] = sockets();
        let pipes = PipePool::new(1);
        let (_, err) = thread::scope(|s| {
            let h = s.spawn(|| maps.relay(3, &relay_c, &relay_t, &pipes));
            client.write_all(b"x").unwrap();
            let mut server = server;
            let mut one = [0u8; 1];
            server.read_exact(&mut one).unwrap();
            sys::set_linger_zero(&server);
            drop(server);
            h.join().unwrap()
        });
        let err = err.expect("a reset must end the relay with an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }
}
