//! Thin wrappers over the socket and pipe syscalls std does not offer, so the
//! rest of the code reads as the syscalls `strace` shows.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (netfilter's name; answered here by
/// ktproxy's cgroup/getsockopt program).
const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;
/// Since Linux 5.14.
const SO_NETNS_COOKIE: libc::c_int = 71;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: v outlives the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The address an intercepted client originally dialed.
pub fn original_dst(sock: &TcpStream, ipv6: bool) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let (level, name, want) = if ipv6 {
        (
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            size_of::<libc::sockaddr_in6>(),
        )
    } else {
        (
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            size_of::<libc::sockaddr_in>(),
        )
    };
    let mut len = want as libc::socklen_t;
    // SAFETY: ss has room for `len` bytes; the kernel writes at most that.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    sockaddr_to_std(&ss)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected address family"))
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

fn std_to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin: &mut libc::sockaddr_in =
                unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: &mut libc::sockaddr_in6 =
                unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn family(addr: &SocketAddr) -> libc::c_int {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// A listening socket with a backlog sized for bursts of connections (std's
/// `TcpListener::bind` uses 128; the kernel caps this at net.core.somaxconn).
pub fn listen(addr: &SocketAddr, backlog: libc::c_int) -> io::Result<TcpListener> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(family(addr), libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    // Accepted sockets inherit TCP_NODELAY from the listener: one
    // setsockopt per connection saved.
    set_nodelay(fd)?;
    let (ss, len) = std_to_sockaddr(addr);
    // SAFETY: ss holds a valid sockaddr of `len` bytes.
    cvt(unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) })?;
    // SAFETY: fd is a bound socket.
    cvt(unsafe { libc::listen(fd, backlog) })?;
    Ok(TcpListener::from(owned))
}

/// accept4(2): the connection comes out non-blocking, as the relay wants it,
/// with the peer's address, saving getpeername and fcntl calls.
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

/// Connects a non-blocking socket with TCP_NODELAY set, waiting at most
/// `timeout`. The stream stays non-blocking, as the relay wants it.
pub fn dial(addr: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            family(addr),
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd is a fresh socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    set_nodelay(fd)?;
    let (ss, len) = std_to_sockaddr(addr);
    // SAFETY: ss holds a valid sockaddr of `len` bytes.
    if unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } == 0 {
        return Ok(stream);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINPROGRESS) {
        return Err(err);
    }
    let mut pfd = [libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    }];
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    if poll(&mut pfd, ms)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {:.1} s", timeout.as_secs_f64()),
        ));
    }
    // Only a failed connect raises POLLERR/POLLHUP: ask for the reason then.
    if pfd[0].revents & (libc::POLLERR | libc::POLLHUP) == 0 {
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

/// EMFILE or ENFILE: the process or the system has no descriptor left.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Nagle plus delayed ACKs stalls request/response traffic by ~40 ms.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// Makes the next close() send RST instead of FIN: how a proxy tells the
/// client that the destination refused or reset.
pub fn set_linger_zero(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: l outlives the call. Failure leaves a FIN close, still a close.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// The kernel's cookie for the network namespace a socket lives in.
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
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: fds is a valid slice of pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Non-blocking splice(2). Without SPLICE_F_MORE: it corks small writes and
/// stalls request/response traffic by ~200 ms.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: null offsets are valid for sockets and pipes.
        let r = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A pipe: (read end, write end), non-blocking and close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// F_SETPIPE_SZ; returns the size the kernel actually gave.
pub fn set_pipe_size(fd: RawFd, size: libc::c_int) -> io::Result<usize> {
    // SAFETY: plain fcntl on a pipe the caller owns.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size) }).map(|n| n as usize)
}

pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    cvt(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_conversion_round_trips_both_families() {
        for a in ["127.0.0.1:8080", "[::1]:443", "[fe80::1%2]:22"] {
            let addr: SocketAddr = a.parse().unwrap();
            let (ss, _) = std_to_sockaddr(&addr);
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
        let e = splice(a.as_raw_fd(), w.as_raw_fd(), 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        use std::io::{Read, Write};
        b.write_all(b"ping").unwrap();
        let mut pfd = [libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        assert_eq!(poll(&mut pfd, 5000).unwrap(), 1);
        assert_eq!(splice(a.as_raw_fd(), w.as_raw_fd(), 4096).unwrap(), 4);
        assert_eq!(splice(r.as_raw_fd(), a.as_raw_fd(), 4096).unwrap(), 4);
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
    fn dial_reports_a_refused_connection() {
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = dial(&addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[test]
    fn original_dst_of_a_plain_connection_is_an_error_or_the_listener() {
        let l = listen(&"127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let _c = dial(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
        let (s, _) = l.accept().unwrap();
        // Without ktproxy's program the kernel answers: an error, or, when
        // netfilter conntrack tracks the flow, the un-NATed destination.
        match original_dst(&s, false) {
            Err(_) => {}
            Ok(a) => assert_eq!(a, l.local_addr().unwrap()),
        }
    }
}
