//! Stopping: a stream ktproxy cuts short ends with a reset, never with a
//! clean end of stream that would pass for a complete one.
//!
//! Order (run in src/main.rs): detach the redirect first, so that new
//! connections go direct; then [`drain`] lets open connections finish for
//! the --drain period; then [`reset_open_connections`] just before exit.
//!
//! Nothing is kept per connection for the reset. At exit, ktproxy walks its
//! own descriptor table (/proc/self/fd) and sets SO_LINGER {on, 0} on every
//! TCP socket whose outgoing stream is unfinished; the exit that follows
//! closes them, and with a zero linger the kernel sends RST instead of FIN
//! and drops what is still queued (tcp_close -> tcp_disconnect). A registry
//! of live sockets would cost every connection two updates of a shared
//! table and a slot; the walk costs one or two getsockopt calls per
//! descriptor, once, at exit (a few ms for 10,000 descriptors).
//!
//! Unfinished means the relay has not forwarded an end of stream into the
//! socket yet: TCP state ESTABLISHED or CLOSE_WAIT (or still connecting). A
//! socket the relay has shut down for writing (FIN_WAIT1/2, CLOSING,
//! LAST_ACK) carries a complete stream, its queued tail included: it closes
//! normally and the peer gets every byte and the FIN. (The kernel still
//! resets it if it holds unread data, e.g. a reply to a client that is gone.)

use std::time::{Duration, Instant};

use log::info;
use nix::sys::signal::{SigSet, Signal};

use crate::conn;

/// With COMMAND and no --drain: how long connections left when COMMAND and
/// everything it started have exited may take to deliver what their
/// (closed) clients sent. The wait ends as soon as none is left.
pub const COMMAND_GRACE: Duration = Duration::from_secs(1);

/// Waits up to `grace` for the open connections to finish; SIGTERM, SIGINT
/// or SIGHUP (blocked, so they wait for us) ends the wait at once.
pub fn drain(grace: Duration) {
    let open = conn::live();
    if grace.is_zero() || open == 0 {
        return;
    }
    info!(
        "draining: waiting up to {:.1} s for {open} open connection(s) to finish \
         (SIGTERM, SIGINT or SIGHUP again ends the wait)",
        grace.as_secs_f64()
    );
    let started = Instant::now();
    let deadline = started + grace;
    let mut stop = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        stop.add(s);
    }
    loop {
        if conn::live() == 0 {
            info!(
                "drained: every connection finished within {:.3} s",
                started.elapsed().as_secs_f64()
            );
            return;
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return;
        };
        if let Some(sig) = wait_signal(&stop, left.min(Duration::from_millis(20))) {
            info!("{sig}: ending the drain");
            return;
        }
    }
}

/// sigtimedwait: a pending signal of `set`, waiting at most `timeout`. Raw
/// libc: nix has no sigtimedwait.
fn wait_signal(set: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: valid pointers to a sigset and a timespec; a null siginfo is
    // allowed.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    Signal::try_from(r).ok()
}

/// Makes every connection still open end with a reset when the process
/// exits (see the module comment). Call last, right before exit: sockets
/// opened after the walk would still close with FIN.
pub fn reset_open_connections() {
    let open = conn::live();
    let sockets = linger_zero_all();
    if sockets > 0 {
        info!(
            "resetting {sockets} socket(s) whose stream is unfinished ({open} connection(s) \
             still open)"
        );
    }
}

/// Sets SO_LINGER {1, 0} on every TCP socket of the process whose outgoing
/// stream is unfinished; returns how many.
fn linger_zero_all() -> usize {
    let reset = |fd: libc::c_int| is_unfinished_tcp(fd) && set_linger_zero(fd);
    // stdio are not ours to reset, even when they are sockets.
    match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<libc::c_int>().ok())
            .filter(|&fd| fd > 2 && reset(fd))
            .count(),
        // Out of descriptors itself (EMFILE: just when resets matter most):
        // try every number below the limits instead, one failed getsockopt
        // (EBADF) per unused number, ~0.2 us each.
        Err(_) => {
            let (soft, hard) =
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .unwrap_or((65_536, 65_536));
            let end = soft.max(hard).min(1 << 20) as libc::c_int;
            (3..end).filter(|&fd| reset(fd)).count()
        }
    }
}

/// Whether `fd` is a TCP socket that has not sent its FIN (see the module).
/// The state is the first byte of struct tcp_info.
fn is_unfinished_tcp(fd: libc::c_int) -> bool {
    // SAFETY: tcp_info is plain data; all-zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // Raw libc on a descriptor number, not a BorrowedFd: a connection thread
    // may close it meanwhile. Then the call fails with EBADF, or acts on
    // whatever of ours took the number, which is about to be handled alike.
    // SAFETY: info has room for len bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Not TCP (or not a socket): an error. Listeners are in LISTEN.
    r == 0
        && matches!(
            i32::from(info.tcpi_state),
            TCP_ESTABLISHED | TCP_SYN_SENT | TCP_SYN_RECV | TCP_CLOSE_WAIT
        )
}

/// include/net/tcp_states.h; libc does not name them.
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE_WAIT: i32 = 8;

fn set_linger_zero(fd: libc::c_int) -> bool {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: l is a valid linger; see is_unfinished_tcp about the raw number.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn the_walk_picks_connections_with_unfinished_streams_only() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let (r, _w) = crate::sys::pipe().unwrap();
        assert!(is_unfinished_tcp(a.as_raw_fd()));
        assert!(is_unfinished_tcp(b.as_raw_fd()));
        assert!(!is_unfinished_tcp(l.as_raw_fd()));
        assert!(!is_unfinished_tcp(r.as_raw_fd()));
        assert!(!is_unfinished_tcp(1_000_000));
        // b has sent its FIN: its stream is complete (FIN_WAIT). a has
        // received it and has not sent its own (CLOSE_WAIT).
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!((&a).read(&mut buf).unwrap(), 0);
        assert!(!is_unfinished_tcp(b.as_raw_fd()));
        assert!(is_unfinished_tcp(a.as_raw_fd()));
    }

    #[test]
    fn a_socket_set_by_the_walk_resets_its_peer_on_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        assert!(set_linger_zero(b.as_raw_fd()));
        drop(b);
        let mut buf = [0u8; 1];
        let e = a.read(&mut buf).expect_err("a reset, not EOF");
        assert_eq!(e.kind(), ErrorKind::ConnectionReset);
    }
}
