//! Self-proxy loops through a local upstream proxy.
//!
//! ktproxy's own dials are never redirected (its cgroup, and its process in
//! the kernel's exempt_tgids; a connection that still comes back from it is
//! refused with ELOOP by the getsockopt program). But a local upstream proxy
//! that runs inside the intercepted scope (`ssh -D` in the user's session,
//! with ktproxy intercepting the whole machine) has its connections to the
//! destinations redirected back into ktproxy, which sends them to the
//! upstream again, and so on until the descriptors run out.
//!
//! So the processes that own the upstream's listening socket are exempt:
//! their connects go direct (fail closed: they are refused, and the loop
//! stops there). They are found here, from the kernel's socket table
//! (sock_diag, listening sockets only) and /proc/PID/fd, at start-up and
//! again whenever the listening socket changes (the upstream restarted),
//! which the watchdog checks every 250 ms.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use log::{debug, warn};

use crate::bpf::{Exempt, Redirect};
use crate::cgroup;
use crate::upstream::Upstream;

pub struct UpstreamOwners {
    addr: SocketAddr,
    shown: String,
    root: PathBuf,
    scope: PathBuf,
    fail_closed: bool,
    inodes: Vec<u64>,
    tgids: Vec<u32>,
}

impl UpstreamOwners {
    /// None unless the upstream proxy is on this machine.
    pub fn new(
        up: &Upstream,
        is_local: bool,
        root: &Path,
        scope: &Path,
        fail_closed: bool,
    ) -> Option<UpstreamOwners> {
        is_local.then(|| UpstreamOwners {
            addr: up.addr(),
            shown: up.display().to_string(),
            root: root.to_path_buf(),
            scope: scope.to_path_buf(),
            fail_closed,
            inodes: Vec::new(),
            tgids: Vec::new(),
        })
    }

    /// Exempts the processes that own the upstream's listening socket now.
    pub fn refresh(&mut self, redirect: &Redirect) {
        let mut inodes = match listening_inodes(&self.addr) {
            Ok(i) => i,
            Err(e) => {
                debug!("listing listening sockets: {e}");
                return;
            }
        };
        inodes.sort_unstable();
        if inodes == self.inodes {
            return;
        }
        let tgids = owners(&inodes);
        for old in self.tgids.iter().filter(|t| !tgids.contains(t)) {
            redirect.unexempt(*old);
        }
        for &tgid in tgids.iter().filter(|t| !self.tgids.contains(t)) {
            if let Err(e) = redirect.exempt(tgid, Exempt::Upstream) {
                debug!("{e}");
                continue;
            }
            let inside = cgroup::of_process(&self.root, &tgid.to_string())
                .is_ok_and(|cg| cg.starts_with(&self.scope));
            if inside {
                let comm = fs::read_to_string(format!("/proc/{tgid}/comm")).unwrap_or_default();
                warn!(
                    "the upstream proxy {} runs inside the intercepted cgroup {} (pid {tgid}, {}): \
                     its own connections {} instead of looping back into ktproxy",
                    self.shown,
                    self.scope.display(),
                    comm.trim(),
                    if self.fail_closed {
                        "are refused"
                    } else {
                        "go direct"
                    }
                );
            }
        }
        self.inodes = inodes;
        self.tgids = tgids;
    }
}

/// Processes with a descriptor for one of these sockets, from /proc/PID/fd.
fn owners(inodes: &[u64]) -> Vec<u32> {
    let wanted: HashSet<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let mut tgids = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return tgids;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path())
                .ok()
                .and_then(|t| t.to_str().map(|t| wanted.contains(t)))
                .unwrap_or(false)
        });
        if holds {
            tgids.push(pid);
        }
    }
    tgids
}

// <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>: neither libc
// nor nix has the inet_diag structures.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: u16, // network order
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
struct Request {
    hdr: libc::nlmsghdr,
    req: InetDiagReqV2,
}

/// Inodes of the listening TCP sockets that accept connections to `addr`
/// (bound to it, or to the wildcard address on its port), both families.
fn listening_inodes(addr: &SocketAddr) -> io::Result<Vec<u64>> {
    let mut inodes = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for (local, inode) in dump_listeners(family)? {
            if local.port() == addr.port() && accepts_for(local.ip(), addr.ip()) {
                inodes.push(inode);
            }
        }
    }
    Ok(inodes)
}

fn accepts_for(bound: IpAddr, dst: IpAddr) -> bool {
    bound.is_unspecified() || bound.to_canonical() == dst.to_canonical()
}

fn dump_listeners(family: libc::c_int) -> io::Result<Vec<(SocketAddr, u64)>> {
    // SAFETY: plain syscall; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = Request {
        hdr: libc::nlmsghdr {
            nlmsg_len: size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        req: InetDiagReqV2 {
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states: 1 << TCP_LISTEN,
            ..Default::default()
        },
    };
    // SAFETY: req is a repr(C) value of the size given; the kernel reads it.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&req as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: buf has room for buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= size_of::<libc::nlmsghdr>() {
            // SAFETY: at least a header's worth of bytes; read unaligned.
            let hdr: libc::nlmsghdr = unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
            let len = hdr.nlmsg_len as usize;
            if len < size_of::<libc::nlmsghdr>() || len > rest.len() {
                return Ok(out);
            }
            match libc::c_int::from(hdr.nlmsg_type) {
                libc::NLMSG_DONE => return Ok(out),
                libc::NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the dump")),
                _ => {}
            }
            let body = &rest[size_of::<libc::nlmsghdr>()..len];
            if body.len() >= size_of::<InetDiagMsg>() {
                // SAFETY: enough bytes for the message; read unaligned.
                let m: InetDiagMsg = unsafe { std::ptr::read_unaligned(body.as_ptr().cast()) };
                out.push((local_addr(&m), u64::from(m.inode)));
            }
            // Messages are 4-byte aligned.
            let next = (len + 3) & !3;
            rest = &rest[next.min(rest.len())..];
        }
    }
}

fn local_addr(m: &InetDiagMsg) -> SocketAddr {
    let port = u16::from_be(m.id.sport);
    let ip = if i32::from(m.family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::from(m.id.src[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in m.id.src.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_its_own_listening_socket_and_its_own_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let inodes = listening_inodes(&addr).unwrap();
        assert_eq!(inodes.len(), 1, "{inodes:?}");
        assert_eq!(owners(&inodes), vec![std::process::id()]);
        drop(l);
        assert!(listening_inodes(&addr).unwrap().is_empty());
    }

    #[test]
    fn wildcard_listeners_accept_for_every_address() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(accepts_for("0.0.0.0".parse().unwrap(), lo));
        assert!(accepts_for("::".parse().unwrap(), lo));
        assert!(accepts_for("::ffff:127.0.0.1".parse().unwrap(), lo));
        assert!(!accepts_for("127.0.0.2".parse().unwrap(), lo));
    }
}
