//! Thin wrappers over the socket and pipe syscalls std does not offer, so the
//! rest of the code reads as the syscalls `strace` shows. nix types the calls
//! it has; raw libc remains only where nix lacks the call or would cost a
//! syscall (accept4 with the peer address, KTPROXY_ORIGIN, SO_NETNS_COOKIE).

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6,
    SockaddrLike,
};
use nix::unistd::{setfsgid, setfsuid, Gid, Uid};

/// ktproxy's own getsockopt, answered by its cgroup/getsockopt program from
/// the accepted socket's storage (bpf/ktproxy.bpf.c: SOL_KTPROXY,
/// KTPROXY_ORIGIN, struct ktproxy_origin). The program also answers
/// SO_ORIGINAL_DST for other tools; this returns the client's identity with
/// the destination in the same single syscall.
const SOL_KTPROXY: libc::c_int = 0x6b74;
const KTPROXY_ORIGIN: libc::c_int = 1;
/// Since Linux 5.14; neither nix nor libc's top level name it.
const SO_NETNS_COOKIE: libc::c_int = 71;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `struct ktproxy_origin` of the C file, byte for byte.
#[repr(C)]
#[derive(Default)]
struct RawOrigin {
    family: u16,
    /// Network byte order.
    port: u16,
    /// Network byte order; IPv4 in the first four bytes.
    ip: [u8; 16],
    uid: u32,
    gid: u32,
}
const _: () = assert!(size_of::<RawOrigin>() == 28);

/// Where an intercepted client was going, and who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub dst: SocketAddr,
    /// The uid and gid of the process that called connect().
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// The original destination and the client's identity of a socket ktproxy
/// accepted. Raw getsockopt: the answer is a struct of ktproxy's own.
pub fn origin(sock: &TcpStream) -> io::Result<Origin> {
    let mut raw = RawOrigin::default();
    let mut len = size_of::<RawOrigin>() as libc::socklen_t;
    // SAFETY: raw has room for `len` bytes; the kernel writes at most that.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            SOL_KTPROXY,
            KTPROXY_ORIGIN,
            (&mut raw as *mut RawOrigin).cast(),
            &mut len,
        )
    })?;
    if len as usize != size_of::<RawOrigin>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the kernel answered {len} bytes, not a ktproxy origin"),
        ));
    }
    let port = u16::from_be(raw.port);
    let dst = match libc::c_int::from(raw.family) {
        libc::AF_INET => {
            let [a, b, c, d, ..] = raw.ip;
            SocketAddr::new(Ipv4Addr::new(a, b, c, d).into(), port)
        }
        libc::AF_INET6 => SocketAddr::new(Ipv6Addr::from(raw.ip).into(), port),
        f => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected address family {f}"),
            ))
        }
    };
    Ok(Origin {
        dst,
        uid: raw.uid,
        gid: raw.gid,
    })
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Runs `f` on `addr` as a sockaddr_in or sockaddr_in6. Not nix's
/// SockaddrStorage: that passes all its 128 bytes as the address length.
fn with_sockaddr<R>(addr: &SocketAddr, f: impl FnOnce(&dyn SockaddrLike) -> R) -> R {
    match *addr {
        SocketAddr::V4(a) => f(&SockaddrIn::from(a)),
        SocketAddr::V6(a) => f(&SockaddrIn6::from(a)),
    }
}

fn family(addr: &SocketAddr) -> AddressFamily {
    if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// A listening socket with a backlog sized for bursts of connections (std's
/// `TcpListener::bind` uses 128; the kernel caps this at net.core.somaxconn).
pub fn listen(addr: &SocketAddr, backlog: libc::c_int) -> io::Result<TcpListener> {
    let fd = socket::socket(family(addr), SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener: one
    // setsockopt per connection saved.
    set_nodelay(&fd)?;
    with_sockaddr(addr, |sa| socket::bind(fd.as_raw_fd(), sa))?;
    socket::listen(&fd, Backlog::new(backlog)?)?;
    Ok(TcpListener::from(fd))
}

/// accept4(2): the connection comes out non-blocking, as the relay wants it,
/// with the peer's address, saving getpeername and fcntl calls. Raw libc:
/// nix's accept4 drops the address, which would cost a getpeername.
pub fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    // SAFETY: plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss has room for len bytes; the new fd is owned right away.
    let fd = cvt(unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let peer = sockaddr_to_std(&ss)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "accepted a non-IP socket"))?;
    Ok((stream, peer))
}

/// What ktproxy's outgoing sockets carry besides their destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Egress {
    /// (uid, gid) to create the socket as: the client's. None: ktproxy's own.
    pub owner: Option<(libc::uid_t, libc::gid_t)>,
    /// SO_MARK (--mark).
    pub mark: Option<u32>,
}

/// Connects a non-blocking socket with TCP_NODELAY set, waiting at most
/// `timeout`. The stream stays non-blocking, as the relay wants it. As
/// ktproxy itself: for connections with no client behind them.
#[cfg_attr(not(test), allow(dead_code))]
pub fn dial(addr: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    dial_as(addr, timeout, Egress::default())
}

/// `dial`, with the socket created as `egress.owner` and marked.
pub fn dial_as(addr: &SocketAddr, timeout: Duration, egress: Egress) -> io::Result<TcpStream> {
    let fd = {
        let _as_client = egress.owner.map(|(uid, gid)| FsIds::assume(uid, gid));
        socket::socket(
            family(addr),
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?
    };
    if let Some(mark) = egress.mark {
        socket::setsockopt(&fd, sockopt::Mark, &mark)?;
    }
    let stream = TcpStream::from(fd);
    set_nodelay(&stream)?;
    match with_sockaddr(addr, |sa| socket::connect(stream.as_raw_fd(), sa)) {
        Ok(()) => return Ok(stream),
        Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let mut pfd = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
    let wait = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    if poll(&mut pfd, wait)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {:.1} s", timeout.as_secs_f64()),
        ));
    }
    // Only a failed connect raises POLLERR/POLLHUP: ask for the reason then.
    let failed = pfd[0]
        .revents()
        .is_none_or(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP));
    if !failed {
        return Ok(stream);
    }
    match stream.take_error()? {
        Some(e) => Err(e),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connect failed",
        )),
    }
}

/// This thread's filesystem uid and gid, switched to another user's until
/// dropped. A socket's owner is taken from them when it is created: its
/// inode's uid (sk_uid: `ip rule uidrange`, `ss -e`) and its file's
/// credentials (nft `meta skuid`/`skgid`, iptables `-m owner`). The kernel
/// keeps them per thread, and glibc's setfsuid/setfsgid are plain syscalls
/// (not broadcast to every thread as setuid is), so no other thread is
/// affected. They never fail visibly: without CAP_SETUID/CAP_SETGID they
/// change nothing (see `can_create_as_others`).
struct FsIds {
    uid: Uid,
    gid: Gid,
}

impl FsIds {
    fn assume(uid: libc::uid_t, gid: libc::gid_t) -> FsIds {
        // A thread whose fsuid is not 0 loses its filesystem capabilities,
        // but not CAP_SETUID/CAP_SETGID: any order works; drop reverses it.
        let gid = setfsgid(Gid::from_raw(gid));
        let uid = setfsuid(Uid::from_raw(uid));
        FsIds { uid, gid }
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        setfsuid(self.uid);
        setfsgid(self.gid);
    }
}

/// Whether this process can create sockets as another user: setfsuid
/// reports no error, so switch to nobody and read back (an invalid id, -1,
/// changes nothing and returns the current one).
pub fn can_create_as_others() -> bool {
    const NOBODY: libc::uid_t = 65534;
    let _probe = FsIds::assume(NOBODY, NOBODY);
    let uid = setfsuid(Uid::from_raw(libc::uid_t::MAX));
    let gid = setfsgid(Gid::from_raw(libc::gid_t::MAX));
    uid.as_raw() == NOBODY && gid.as_raw() == NOBODY
}

/// EMFILE or ENFILE: the process or the system has no descriptor left.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Nagle plus delayed ACKs stalls request/response traffic by ~40 ms.
pub fn set_nodelay(sock: &impl AsFd) -> io::Result<()> {
    Ok(socket::setsockopt(sock, sockopt::TcpNoDelay, &true)?)
}

/// Makes the next close() send RST instead of FIN: how a proxy tells the
/// client that the destination refused or reset.
pub fn set_linger_zero(sock: &impl AsFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // Failure leaves a FIN close, still a close.
    let _ = socket::setsockopt(sock, sockopt::Linger, &l);
}

/// The kernel's cookie for the network namespace a socket lives in. Raw
/// getsockopt: nix has no SO_NETNS_COOKIE.
pub fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: v has room for len bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    })?;
    Ok(v)
}

/// poll(2), retried on EINTR. Returns how many fds are ready.
pub fn poll(fds: &mut [PollFd], timeout: PollTimeout) -> io::Result<usize> {
    loop {
        match nix::poll::poll(fds, timeout) {
            Ok(n) => return Ok(n as usize),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Non-blocking splice(2). Without SPLICE_F_MORE: it corks small writes and
/// stalls request/response traffic by ~200 ms.
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        // No offsets: sockets and pipes have none.
        match nix::fcntl::splice(from.as_fd(), None, to.as_fd(), None, len, flags) {
            Err(Errno::EINTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// A pipe: (read end, write end), non-blocking and close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?)
}

/// F_SETPIPE_SZ; returns the size the kernel actually gave.
pub fn set_pipe_size(pipe: impl AsFd, size: libc::c_int) -> io::Result<usize> {
    let n = nix::fcntl::fcntl(pipe, FcntlArg::F_SETPIPE_SZ(size))?;
    Ok(n as usize)
}

/// read(2), retried on EINTR: the relay's copy path when it has no pipe.
pub fn read(from: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(from.as_fd(), buf) {
            Err(Errno::EINTR) => continue,
            other => return Ok(other?),
        }
    }
}

/// write(2), retried on EINTR.
pub fn write(to: impl AsFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::write(to.as_fd(), buf) {
            Err(Errno::EINTR) => continue,
            other => return Ok(other?),
        }
    }
}

pub fn shutdown_write(sock: impl AsFd) -> io::Result<()> {
    Ok(socket::shutdown(
        sock.as_fd().as_raw_fd(),
        socket::Shutdown::Write,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_conversion_reads_what_nix_writes_for_both_families() {
        for a in ["127.0.0.1:8080", "[::1]:443", "[fe80::1%2]:22"] {
            let addr: SocketAddr = a.parse().unwrap();
            let written = socket::SockaddrStorage::from(addr);
            // SAFETY: SockaddrStorage is a repr(C) union with a
            // sockaddr_storage member, so it holds one in full.
            let ss: libc::sockaddr_storage = unsafe { std::ptr::read(written.as_ptr().cast()) };
            assert_eq!(sockaddr_to_std(&ss), Some(addr), "{a}");
        }
    }

    #[test]
    fn splice_moves_bytes_through_a_pipe_without_blocking() {
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let a = dial(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let (r, w) = pipe().unwrap();
        // Nothing to read yet: a non-blocking splice must say so, not hang.
        let e = splice(&a, &w, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        use std::io::{Read, Write};
        b.write_all(b"ping").unwrap();
        let mut pfd = [PollFd::new(a.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut pfd, PollTimeout::from(5000u16)).unwrap(), 1);
        assert_eq!(splice(&a, &w, 4096).unwrap(), 4);
        assert_eq!(splice(&r, &a, 4096).unwrap(), 4);
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn accepted_sockets_are_non_blocking_and_inherit_nodelay() {
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let c = dial(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        let (s, peer) = accept(&l).unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        assert!(
            s.nodelay().unwrap(),
            "TCP_NODELAY inherited from the listener"
        );
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(
            (&s).read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn ipv6_listeners_reuse_addresses_and_report_the_peer() {
        // (IPV6_V6ONLY cannot be checked here: binding ::1 sets it anyway.)
        let l = listen(&"[::1]:0".parse().unwrap(), 16).unwrap();
        assert!(socket::getsockopt(&l, sockopt::ReuseAddr).unwrap());
        let c = dial(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        let (_, peer) = accept(&l).unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
    }

    #[test]
    fn linger_zero_is_set() {
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let c = dial(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        set_linger_zero(&c);
        let got = socket::getsockopt(&c, sockopt::Linger).unwrap();
        assert_eq!((got.l_onoff, got.l_linger), (1, 0));
    }

    #[test]
    fn dial_reports_a_refused_connection() {
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = dial(&addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn origin_of_a_connection_ktproxy_did_not_redirect_is_an_error() {
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let _c = dial(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        let (s, _) = l.accept().unwrap();
        // Without ktproxy's program no protocol knows SOL_KTPROXY (TCP
        // hands it to IP, which answers EOPNOTSUPP).
        let e = origin(&s).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
    }

    #[test]
    fn sockets_dialed_as_another_user_belong_to_it_and_carry_the_mark() {
        // Needs root (CAP_SETUID, CAP_SETGID, CAP_NET_ADMIN), as ktproxy does.
        assert!(can_create_as_others(), "run the tests as root");
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let egress = Egress {
            owner: Some((65534, 65533)),
            mark: Some(0x4b50),
        };
        let c = dial_as(&l.local_addr().unwrap(), Duration::from_secs(5), egress).unwrap();
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", c.as_raw_fd())).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (65534, 65533));
        assert_eq!(socket::getsockopt(&c, sockopt::Mark).unwrap(), 0x4b50);
        // This thread is itself again.
        assert_eq!(setfsuid(Uid::from_raw(libc::uid_t::MAX)).as_raw(), 0);
        assert_eq!(setfsgid(Gid::from_raw(libc::gid_t::MAX)).as_raw(), 0);
        let plain = dial(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", plain.as_raw_fd())).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0));
        assert_eq!(socket::getsockopt(&plain, sockopt::Mark).unwrap(), 0);
    }
}
