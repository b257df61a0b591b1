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
//! - **Resets.** As splice, which reads a socket's bytes and its FIN before
//!   an error that came after them: a socket reset without a FIN fails the
//!   relay (the caller resets both) once what it received before has
//!   reached the other socket; a socket reset after its FIN (a server that
//!   answers, then closes with a request unread) has its bytes and EOF
//!   forwarded as usual, and the other direction goes on outside the maps
//!   until its EOF (clean) or its first byte for the gone socket (a reset,
//!   as splice's write would fail). See `Pair::failed`.
//! - **Bytes TCP delivers twice.** A retransmission that overlaps bytes
//!   already received reaches the verdict whole (tcp_read_skb() does not
//!   skip the overlap as recv() does); the verdict cuts the overlap
//!   (`trim_overlap` in bpf/ktproxy.bpf.c, counted as relay_trimmed). If it
//!   cannot, it drops the skb and the pair ends with a reset, not with a
//!   gap in a clean close.
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
use log::{debug, info, trace};

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
        let end = RelayEnd {
            peer,
            ..RelayEnd::default()
        };
        update(&self.ends, &cookie, &end)
    }

    /// The bytes the verdict has sent on for a socket so far.
    fn end_bytes(&self, cookie: u64) -> io::Result<u64> {
        let mut end = RelayEnd::default();
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

    /// Removes a socket's entry; returns its last counts.
    fn take_end(&self, cookie: u64) -> io::Result<RelayEnd> {
        let mut end = RelayEnd::default();
        // SAFETY: key and value point to a u64 and a RelayEnd, the map's
        // key and value types (checked by the kernel against its sizes).
        cvt(unsafe {
            libbpf_sys::bpf_map_lookup_and_delete_elem(
                self.ends.as_raw_fd(),
                (&cookie as *const u64).cast(),
                (&mut end as *mut RelayEnd).cast(),
            )
        })?;
        Ok(end)
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
    /// Socket i was reset or closed after its EOF (see `failed`): why,
    /// for when a byte would have to go there.
    gone: [Option<io::Error>; 2],
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
            gone: [None, None],
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
        let mut err = self.second().and_then(|()| self.wait()).err();
        let mut bytes = [0u64; 2];
        for i in [CLIENT, TARGET] {
            let end = self.maps.take_end(self.cookies[i]).unwrap_or_default();
            bytes[i] = end.bytes + self.copied[i];
            if end.trimmed > 0 {
                debug!(
                    "#{} {}: {} bytes TCP delivered twice were cut",
                    self.id, DIRECTION[i], end.trimmed
                );
            }
            if end.lost > 0 && err.is_none() {
                // The verdict had to drop bytes (see trim_overlap in
                // bpf/ktproxy.bpf.c): a clean end would hide the gap.
                err = Some(io::Error::other(format!(
                    "the kernel dropped {} bytes of the {} stream",
                    end.lost, DIRECTION[i]
                )));
            }
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
            let mut fds = [self.watch(CLIENT), self.watch(TARGET)];
            poll(&mut fds, None)?;
            trace!(
                "#{} poll: client revents {:#x}, target revents {:#x}",
                self.id,
                fds[CLIENT].revents,
                fds[TARGET].revents
            );
            for i in [CLIENT, TARGET] {
                self.event(i, fds[i].revents)?;
            }
        }
        Ok(())
    }

    /// What the thread waits for on socket i.
    fn watch(&self, i: usize) -> libc::pollfd {
        let sock = self.socks[i];
        if self.gone[i].is_some() {
            // Nothing more comes from it, and a closed socket reports
            // POLLHUP for ever: leave it out (poll skips negative fds).
            return libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            };
        }
        if self.gone[1 - i].is_some() {
            // Out of the maps (`orphan`): a byte is news too.
            return pollfd(sock, libc::POLLIN | libc::POLLRDHUP);
        }
        // Errors and hang-ups are reported unasked.
        pollfd(sock, if self.eof[i] { 0 } else { libc::POLLRDHUP })
    }

    /// Acts on what poll said about socket i.
    fn event(&mut self, i: usize, revents: libc::c_short) -> io::Result<()> {
        // POLLHUP on a socket whose EOF is forwarded, while ktproxy has not
        // yet shut its sending side: it was reset or closed.
        if revents & libc::POLLERR != 0 || (self.eof[i] && revents & libc::POLLHUP != 0) {
            return self.failed(i);
        }
        if self.eof[i] || revents & (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP) == 0 {
            return Ok(());
        }
        if let Some(why) = self.gone[1 - i].take() {
            // Bytes for a socket that is gone fail as splice's write would;
            // only the EOF may follow.
            match peek(self.socks[i]) {
                Ok(0) => {}
                Ok(_) => return Err(why),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.gone[1 - i] = Some(why);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.forward_eof(i)
    }

    /// Socket i reported an error or hung up.
    ///
    /// Splice reads what a socket received, its FIN included, before an
    /// error that came after (recv() returns them first), and so does this
    /// relay. A reset that follows the FIN is common: a server that closes
    /// with a request unread, or that receives one after its close, resets.
    /// Failing then would throw away the answer and the EOF before it,
    /// which the client may not have read yet (they can still wait in the
    /// client socket's psock backlog). So: with the FIN first, the EOF is
    /// forwarded as usual, the socket is `gone`, and the other direction
    /// goes on (`orphan`). Without it, the socket was reset: what it
    /// received before still reaches the other side, then the relay fails.
    fn failed(&mut self, i: usize) -> io::Result<()> {
        let sock = self.socks[i];
        // recv() checks for a FIN before it reports (and clears) a pending
        // error; MSG_PEEK takes no byte (the verdict has taken them all).
        let peeked = peek(sock);
        trace!(
            "#{} {}: socket error or hang-up; peek: {peeked:?}",
            self.id,
            DIRECTION[i]
        );
        let reset = match peeked {
            Ok(0) => None,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Some(e),
            _ => Some(socket_error(sock)),
        };
        if let Some(why) = reset {
            // Best effort: the other side may be failing too.
            let _ = self.drain(i);
            return Err(why);
        }
        if !self.eof[i] {
            self.forward_eof(i)?;
        }
        self.gone[i] = Some(socket_error(sock));
        self.orphan(1 - i)
    }

    /// Socket i's peer socket is `gone` before socket i's EOF. Splice would
    /// fail at its next write there; this relay takes socket i out of the
    /// maps, so that what it receives from now on waits in its receive
    /// queue (`event` fails at the first byte, forwards the EOF), and fails
    /// now if a byte it sent before has not reached the gone socket.
    fn orphan(&mut self, i: usize) -> io::Result<()> {
        if self.eof[i] {
            return Ok(());
        }
        let (m, c) = (self.maps, self.cookies[i]);
        RelayMaps::delete(&m.verdict, c);
        RelayMaps::delete(&m.peers, c);
        // After the deletes, and once any verdict still running on socket
        // i (under its lock, see `drain`) is done, its count is final; the
        // gone socket takes no byte any more.
        sys::tcp_info(self.socks[i])?;
        let want = self.base[1 - i] + m.end_bytes(c)? + self.copied[i];
        let got = written(self.socks[1 - i])?;
        trace!(
            "#{} {}: the other socket is gone; {} of {} bytes reached it",
            self.id,
            DIRECTION[i],
            got.saturating_sub(self.base[1 - i]),
            want - self.base[1 - i]
        );
        if got < want {
            let why = self.gone[1 - i].take();
            return Err(why.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
        }
        Ok(())
    }

    /// Socket i said EOF: once everything it received before has reached
    /// the other socket's send queue, half-close that one.
    fn forward_eof(&mut self, i: usize) -> io::Result<()> {
        self.drain(i)?;
        let to = self.socks[1 - i];
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

    /// Waits until everything socket i has received (up to its FIN or its
    /// reset) is in the other socket's send queue. Only the other socket's
    /// failure stops it: socket i's own state does not matter any more, the
    /// bytes are in the other socket's psock backlog.
    fn drain(&self, i: usize) -> io::Result<()> {
        let (from, to) = (self.socks[i], self.socks[1 - i]);
        // TCP_INFO takes `from`'s lock, so the softirq that delivered the FIN
        // (waking poll before it ran the verdict on the bytes it came with)
        // is done: the count is final.
        sys::tcp_info(from)?;
        let redirected = self.maps.end_bytes(self.cookies[i])?;
        let want = self.base[1 - i] + redirected + self.copied[i];
        let mut pause = DRAIN_PAUSE_FIRST;
        let mut failed = None;
        loop {
            let (got, _) = written_at_least(to, &sys::tcp_info(to)?)?;
            trace!(
                "#{} {}: {redirected} bytes redirected, {} of them written",
                self.id,
                DIRECTION[i],
                got.saturating_sub(self.base[1 - i] + self.copied[i])
            );
            if got >= want {
                return Ok(());
            }
            if let Some(e) = failed {
                return Err(e);
            }
            // The rest waits in `to`'s psock backlog.
            let mut fds = [pollfd(to, 0)];
            poll(&mut fds, Some(pause))?;
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                // One more count first: the last bytes may have gone in
                // just before the reset they caused (as splice's write
                // would have), and a reset socket's count is final.
                failed = Some(socket_error(to));
                continue;
            }
            pause = (pause * 2).min(DRAIN_PAUSE_MAX);
        }
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

/// tcpi_state of a closed (or reset) socket: TCP_CLOSE in the kernel's
/// include/net/tcp_states.h, which libc does not export.
const TCP_CLOSE: u8 = 7;

/// `written`, or less when an ACK came between the two reads (bytes_acked
/// is read first, so the sum can only fall short): enough to tell that a
/// count has been reached. Also says whether the figure is exact.
fn written_at_least(sock: &TcpStream, info: &libc::tcp_info) -> io::Result<(u64, bool)> {
    // Nothing in flight and nothing unsent: bytes_acked alone is exact.
    // Not after a reset, which empties the retransmit queue (unacked = 0)
    // but leaves the sequence numbers, and so SIOCOUTQ, as they were.
    let closed = info.tcpi_state == TCP_CLOSE;
    if info.tcpi_unacked == 0 && info.tcpi_notsent_bytes == 0 && !closed {
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

/// recv(MSG_PEEK | MSG_DONTWAIT) of one byte: 1 if a byte waits, 0 at
/// EOF, else the error (EAGAIN when there is neither). Raw libc: std's
/// peek() has no MSG_DONTWAIT and gives up on EINTR.
fn peek(sock: &TcpStream) -> io::Result<usize> {
    let mut b = 0u8;
    loop {
        // SAFETY: b is one writable byte, alive for the call.
        let r = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
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

    /// As conn.rs: relays the pair on a thread of `scope`, then resets
    /// both sockets if the relay failed and closes them.
    fn relay_as_ktproxy<'s>(
        scope: &'s thread::Scope<'s, '_>,
        maps: &'s RelayMaps,
        relay_c: TcpStream,
        relay_t: TcpStream,
    ) -> thread::ScopedJoinHandle<'s, (Totals, Option<io::Error>)> {
        scope.spawn(move || {
            let pipes = PipePool::new(1);
            let r = maps.relay(4, &relay_c, &relay_t, &pipes);
            if r.1.is_some() {
                sys::set_linger_zero(&relay_c);
                sys::set_linger_zero(&relay_t);
            }
            r
        })
    }

    /// The server sends `n` bytes that the client does not read yet, and
    /// waits until ktproxy's socket has taken them all (the client socket's
    /// psock backlog holds most of them); with `fin`, it half-closes first.
    /// Then it resets the connection.
    fn server_sends_then_resets(mut server: TcpStream, n: usize, fin: bool) {
        server.write_all(&vec![5u8; n]).unwrap();
        if fin {
            server.shutdown(Shutdown::Write).unwrap();
        }
        while sys::send_queue(&server).unwrap() > 0 {
            thread::sleep(Duration::from_millis(1));
        }
        sys::set_linger_zero(&server);
        drop(server);
        // Time for ktproxy to see the reset before the client reads.
        thread::sleep(Duration::from_millis(200));
    }

    /// Reads until EOF or an error; (bytes, the error).
    fn read_all(mut sock: &TcpStream) -> (usize, Option<io::ErrorKind>) {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            match sock.read(&mut buf) {
                Ok(0) => return (total, None),
                Ok(k) => total += k,
                Err(e) => return (total, Some(e.kind())),
            }
        }
    }

    const MUCH: usize = 16 << 20;

    #[test]
    fn a_reset_after_the_fin_still_delivers_every_byte_and_the_eof() {
        // As a server that answers, then closes with the request unread:
        // its FIN, then its reset. The answer must not be lost with it.
        let maps = crate::bpf::relay_for_tests();
        let [client, relay_c, relay_t, server] = sockets();
        let (totals, err) = thread::scope(|s| {
            let h = relay_as_ktproxy(s, &maps, relay_c, relay_t);
            server_sends_then_resets(server, MUCH, true);
            assert_eq!(read_all(&client), (MUCH, None));
            drop(client);
            h.join().unwrap()
        });
        assert!(err.is_none(), "{err:?}");
        assert_eq!((totals.up, totals.down), (0, MUCH as u64));
    }

    #[test]
    fn a_byte_for_a_server_gone_after_its_fin_resets_the_client() {
        // Splice fails at its first write to a socket that was reset; this
        // relay must not swallow the byte and wait for the client's EOF.
        let maps = crate::bpf::relay_for_tests();
        let [mut client, relay_c, relay_t, server] = sockets();
        let (_, err) = thread::scope(|s| {
            let h = relay_as_ktproxy(s, &maps, relay_c, relay_t);
            server_sends_then_resets(server, 1000, true);
            assert_eq!(read_all(&client), (1000, None));
            client.write_all(b"more").unwrap();
            let r = h.join().unwrap();
            // The reset has come (the EOF before it still reads as EOF).
            thread::sleep(Duration::from_millis(100));
            assert!(client.write_all(b"again").is_err(), "no reset came");
            r
        });
        assert!(err.is_some(), "the byte for the gone server was swallowed");
    }

    #[test]
    fn a_reset_without_a_fin_fails_the_relay_once_the_bytes_before_it_are_handed_on() {
        // Splice writes what the server sent before its reset to the client
        // socket, then fails; the caller's reset then sends what the client
        // socket can. This relay must not fail while those bytes still wait
        // in the client socket's psock backlog: the reset would drop them.
        let maps = crate::bpf::relay_for_tests();
        let [client, relay_c, relay_t, server] = sockets();
        let base = written(&relay_c).unwrap();
        let maps = &maps;
        let (totals, err, handed) = thread::scope(|s| {
            let h = s.spawn(move || {
                let pipes = PipePool::new(1);
                let (totals, err) = maps.relay(5, &relay_c, &relay_t, &pipes);
                let handed = written(&relay_c).unwrap() - base;
                sys::set_linger_zero(&relay_c);
                (totals, err, handed)
            });
            server_sends_then_resets(server, MUCH, false);
            // The client reads only now: the relay has to wait for it.
            let (got, how) = read_all(&client);
            assert!(got > 0 && how.is_some(), "{got} {how:?}");
            h.join().unwrap()
        });
        let err = err.expect("a reset must end the relay with an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert_eq!(totals.down, MUCH as u64);
        assert_eq!(
            handed, MUCH as u64,
            "the relay failed before the bytes were handed on"
        );
    }

    /// setsockopt(2)/getsockopt(2) with any value type, for TCP repair.
    fn set_opt<T>(fd: i32, opt: libc::c_int, v: &T) {
        // SAFETY: v points to a live T of the length given.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (v as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt {opt}: {}", io::Error::last_os_error());
    }

    fn get_opt<T: Default>(fd: i32, opt: libc::c_int) -> T {
        let mut v = T::default();
        let mut len = std::mem::size_of::<T>() as libc::socklen_t;
        // SAFETY: v has room for len bytes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&mut v as *mut T).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "getsockopt {opt}: {}", io::Error::last_os_error());
        v
    }

    /// <linux/tcp.h>
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

    #[derive(Default)]
    #[repr(C)]
    struct RepairWindow {
        snd_wl1: u32,
        snd_wnd: u32,
        max_window: u32,
        rcv_wnd: u32,
        rcv_wup: u32,
    }

    /// Replaces `client` (silently, as CRIU does) by a socket of the same
    /// connection whose send queue holds `again`, the last bytes the peer
    /// has received already, then `new`: the peer gets them as one
    /// retransmitted segment that overlaps what it has, as after a lost ACK.
    fn resend_overlapping(client: TcpStream, again: &[u8], new: &[u8]) -> TcpStream {
        use nix::sys::socket::SockaddrIn;
        use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType};
        let fd = client.as_raw_fd();
        let info = sys::tcp_info(&client).unwrap();
        let (local, peer) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let ts: u32 = get_opt(fd, libc::TCP_TIMESTAMP);
        set_opt(fd, libc::TCP_REPAIR, &1);
        set_opt(fd, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE);
        let snd: u32 = get_opt(fd, libc::TCP_QUEUE_SEQ);
        set_opt(fd, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE);
        let rcv: u32 = get_opt(fd, libc::TCP_QUEUE_SEQ);
        let window: RepairWindow = get_opt(fd, libc::TCP_REPAIR_WINDOW);
        drop(client); // in repair mode: no FIN, no RST

        let s = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        let fd = s.as_raw_fd();
        // Repair mode first: it lets bind() take the port back.
        set_opt(fd, libc::TCP_REPAIR, &1);
        let addr = |a: std::net::SocketAddr| match a {
            std::net::SocketAddr::V4(v4) => SockaddrIn::from(v4),
            _ => panic!("IPv4 only"),
        };
        bind(fd, &addr(local)).unwrap();
        set_opt(fd, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE);
        set_opt(
            fd,
            libc::TCP_QUEUE_SEQ,
            &snd.wrapping_sub(again.len() as u32),
        );
        set_opt(fd, libc::TCP_REPAIR_QUEUE, &TCP_RECV_QUEUE);
        set_opt(fd, libc::TCP_QUEUE_SEQ, &rcv);
        connect(fd, &addr(peer)).unwrap();
        let wscale = info.tcpi_snd_rcv_wscale;
        let opts: [[u32; 2]; 4] = [
            [2, info.tcpi_snd_mss],                                       // TCPOPT_MAXSEG
            [3, u32::from(wscale & 15) | (u32::from(wscale >> 4) << 16)], // TCPOPT_WINDOW
            [4, 0],                                                       // TCPOPT_SACK_PERM
            [8, 0],                                                       // TCPOPT_TIMESTAMP
        ];
        set_opt(fd, libc::TCP_REPAIR_OPTIONS, &opts);
        set_opt(fd, libc::TCP_TIMESTAMP, &ts);
        set_opt(fd, libc::TCP_REPAIR_WINDOW, &window);
        set_opt(fd, libc::TCP_REPAIR_QUEUE, &TCP_SEND_QUEUE);
        let s = TcpStream::from(s);
        (&s).write_all(&[again, new].concat()).unwrap();
        // Out of repair mode without a window probe, whose ACK would trim
        // the head off the queued segment: the retransmission timer sends
        // it whole.
        set_opt(fd, libc::TCP_REPAIR, &TCP_REPAIR_OFF_NO_WP);
        s
    }

    #[test]
    fn a_retransmission_overlapping_relayed_bytes_does_not_relay_them_twice() {
        // tcp_read_skb() hands the verdict whole skbs, also one that starts
        // before what the socket has taken already (see trim_overlap in
        // bpf/ktproxy.bpf.c).
        let maps = crate::bpf::relay_for_tests();
        let [client, relay_c, relay_t, mut server] = sockets();
        let pipes = PipePool::new(1);
        let (more, (totals, err)) = thread::scope(|s| {
            let h = s.spawn(|| maps.relay(6, &relay_c, &relay_t, &pipes));
            (&client).write_all(b"0123456789").unwrap();
            let mut got = [0u8; 10];
            server.read_exact(&mut got).unwrap();
            let client = resend_overlapping(client, b"6789", b"ABCD");
            // The retransmission first: a FIN now would bring an ACK that
            // trims the overlap off before it is sent.
            server
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut more = vec![0u8; 4];
            server.read_exact(&mut more).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            server.read_to_end(&mut more).unwrap();
            server.shutdown(Shutdown::Write).unwrap();
            let mut end = Vec::new();
            (&client).read_to_end(&mut end).unwrap();
            (more, h.join().unwrap())
        });
        assert_eq!(
            String::from_utf8_lossy(&more),
            "ABCD",
            "bytes relayed twice"
        );
        assert!(err.is_none(), "{err:?}");
        assert_eq!((totals.up, totals.down), (14, 0));
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
