//! Names through the proxy: ktproxy's side of the DNS module (src/dns/).
//!
//! The kernel sends every DNS query of the intercepted processes to the DNS
//! sockets bound here, and every TCP connect to a fake address (or to port
//! 53) to the ordinary listeners. This module
//! - binds those UDP sockets, next to the TCP listeners, and starts the
//!   responder (`start`, one start-up step);
//! - builds the forwarder the responder uses for query types it does not
//!   answer itself: DNS over TCP to a real resolver, through the upstream
//!   when there is one, never directly then;
//! - tells a connection what its original destination stands for
//!   (`Dns::route`): a name, DNS over TCP, or an ordinary address.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, ToSocketAddrs,
    UdpSocket,
};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};

use crate::bpf::NamesKernel;
use crate::cli::{Config, Unproxied};
use crate::conn;
use crate::dns::{self, FakeNet, Pinned, Responder};
use crate::error::{io_text, Context, Result};
use crate::nss;
use crate::sys::{self, Egress};
use crate::upstream::{Target, Upstream};

/// An idle DNS-over-TCP client is dropped after this long.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// DNS interception, running: the responder and the table behind it.
pub struct Dns {
    table: Arc<dns::Names>,
    responder: Arc<Responder>,
    fake_net: FakeNet,
    /// The DNS sockets, IPv4 and IPv6.
    addrs: (Option<SocketAddrV4>, Option<SocketAddrV6>),
}

/// What a connection's original destination stands for.
pub enum Route {
    /// An ordinary address: dial it.
    Addr,
    /// Port 53: DNS over TCP, answered here.
    Dns,
    /// A fake address and the name behind it, pinned while the guard lives.
    Name(Pinned),
    /// A fake address no name stands behind (ktproxy restarted, or the
    /// client cached it past the TTL and the table moved on).
    Unknown,
}

/// With names on: binds a UDP DNS socket for each listen address (the TCP
/// listener's port number, UDP ports being separate) and starts answering.
/// Runs before the programs are attached, so the first redirected query
/// finds its answer. The socket is on loopback even when the listener is
/// not: on another address it would be an open resolver for the network,
/// forwarding through the upstream.
pub fn start(cfg: &Config, bound: &[SocketAddr]) -> Result<Option<Dns>> {
    let n = &cfg.names;
    if n.unproxied == Unproxied::PassCounted {
        warn!(
            "--allow-direct: COMMAND's UDP other than DNS, and connects ktproxy cannot proxy, \
             go out directly, not through the upstream (counted: direct_udp, direct_unproxyable)"
        );
    }
    if !n.dns {
        if cfg.upstream.is_some() && n.unproxied != Unproxied::Pass {
            warn!(
                "--no-proxy-dns: COMMAND resolves names itself; its DNS queries leave this \
                 machine directly, not through the upstream"
            );
        }
        return Ok(None);
    }
    let mut sockets = Vec::new();
    let mut addrs = (None, None);
    for addr in bound {
        let s = bind_dns_socket(cfg, addr)?;
        match s.local_addr().context("reading the DNS address")? {
            SocketAddr::V4(a) => addrs.0 = Some(a),
            SocketAddr::V6(a) => addrs.1 = Some(a),
        }
        sockets.push(s);
    }
    let table = Arc::new(dns::Names::new(n.fake_net, dns::DEFAULT_CAPACITY));
    let forward = forward_server(cfg);
    let egress = Egress {
        owner: None,
        mark: cfg.mark,
    };
    let mut options = dns::Options::new(Arc::clone(&table));
    options.forward =
        forward.map(|server| forwarder(server, cfg.upstream.clone(), cfg.connect_timeout, egress));
    // Names under --direct-domain are local by definition: their other
    // query types go to ktproxy's own resolver, directly.
    options.direct_forward =
        local_server().map(|server| forwarder(server, None, cfg.connect_timeout, egress));
    options.direct_domains = n.direct_domains.clone();
    let responder = Arc::new(Responder::new(options));
    let shown: Vec<String> = sockets
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    dns::start_udp(sockets, Arc::clone(&responder))?;
    let (net, len) = n.fake_net.network();
    info!(
        "answering DNS on udp {} (TCP port 53 through the listeners); fake addresses from \
         {net}/{len}, {} names at most; other query types {}",
        shown.join(" and "),
        table.capacity(),
        match (forward, &cfg.upstream) {
            (Some(s), Some(up)) => format!("go to {s} through {}", up.display()),
            (Some(s), None) => format!("go to {s}"),
            (None, _) => "get SERVFAIL (no resolver to forward them to: --dns-forward)".into(),
        }
    );
    if cfg.command.is_empty() {
        // A cgroup's processes keep their own mount namespace: only warn.
        if let Some(what) = nss::leaks() {
            warn!(
                "processes that resolve names through {what} bypass ktproxy's DNS: the daemon \
                 asks the network itself, from outside the intercepted cgroup"
            );
        }
    }
    Ok(Some(Dns {
        table,
        responder,
        fake_net: n.fake_net,
        addrs,
    }))
}

/// The DNS socket for one listener: its address if that is loopback, else
/// the family's loopback; its port number if free, else (when the port was
/// picked by the system anyway) any free port.
fn bind_dns_socket(cfg: &Config, listener: &SocketAddr) -> Result<UdpSocket> {
    let ip = match listener.ip() {
        ip if ip.is_loopback() => ip,
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    let addr = SocketAddr::new(ip, listener.port());
    match UdpSocket::bind(addr) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && chosen_port(cfg, listener) == 0 => {
            debug!("udp {addr} is taken; the DNS socket takes another port");
            UdpSocket::bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding the DNS socket on udp {ip}"))
        }
        Err(e) => Err(e).with_context(|| format!("binding the DNS socket on udp {addr}")),
    }
}

/// The port the user asked for on this listener's family (0: any).
fn chosen_port(cfg: &Config, listener: &SocketAddr) -> u16 {
    cfg.listen
        .iter()
        .find(|a| a.is_ipv4() == listener.is_ipv4())
        .map_or(0, |a| a.port())
}

/// What the kernel needs to know, with or without names running.
pub fn kernel(cfg: &Config, dns: Option<&Dns>) -> NamesKernel {
    NamesKernel {
        dns: dns.is_some(),
        dns4: dns.and_then(|d| d.addrs.0),
        dns6: dns.and_then(|d| d.addrs.1),
        fake: dns.map(|d| d.fake_net.network()),
        unproxied: cfg.names.unproxied,
    }
}

impl Dns {
    pub fn route(&self, dst: &SocketAddr) -> Route {
        if dst.port() == 53 {
            return Route::Dns;
        }
        let ip = unmapped(dst.ip());
        if !self.fake_net.contains(ip) {
            return Route::Addr;
        }
        match self.table.pin(ip) {
            Some(p) => Route::Name(p),
            None => Route::Unknown,
        }
    }

    /// Answers DNS over TCP on an accepted connection until the client is
    /// done or idle.
    pub fn serve_tcp(&self, client: &TcpStream) -> io::Result<()> {
        client.set_nonblocking(false)?;
        client.set_read_timeout(Some(TCP_IDLE))?;
        client.set_write_timeout(Some(TCP_IDLE))?;
        dns::serve_tcp(client, &self.responder);
        Ok(())
    }
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Without an upstream, ktproxy resolves the name itself. Its own queries
/// leave from its own cgroup, which nothing intercepts. getaddrinfo's order
/// is kept; the caller dials the addresses in turn.
pub fn resolve(name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (name, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{name} has no address"),
        ));
    }
    Ok(addrs)
}

/// --dns-forward, or from ktproxy's own /etc/resolv.conf: the first
/// nameserver, and with an upstream the first one not on loopback (the
/// upstream's loopback is not this machine's).
fn forward_server(cfg: &Config) -> Option<SocketAddr> {
    if let Some(s) = cfg.names.forward {
        return Some(s);
    }
    let text = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let found = nameservers(&text)
        .into_iter()
        .find(|ip| cfg.upstream.is_none() || !ip.is_loopback());
    found.map(|ip| SocketAddr::new(ip, 53))
}

/// The first nameserver of ktproxy's own /etc/resolv.conf.
fn local_server() -> Option<SocketAddr> {
    let text = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    nameservers(&text)
        .first()
        .map(|ip| SocketAddr::new(*ip, 53))
}

/// The `nameserver` lines of a resolv.conf, in order; an IPv6 zone
/// (`fe80::1%eth0`) cannot be dialed through a proxy and is skipped.
fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            words.next()?.parse().ok()
        })
        .collect()
}

/// One DNS message over one TCP connection (RFC 7766 framing), through the
/// upstream if given. The reply is returned as the server sent it. These are
/// ktproxy's own queries: its own uid, and --mark like every outgoing socket.
fn forwarder(
    server: SocketAddr,
    upstream: Option<Upstream>,
    timeout: Duration,
    egress: Egress,
) -> dns::Forward {
    Box::new(
        move |query| match exchange(server, upstream.as_ref(), timeout, egress, query) {
            Ok(reply) => Some(reply),
            Err(why) => {
                debug!("forwarding a DNS query to {server} failed: {why}");
                None
            }
        },
    )
}

fn exchange(
    server: SocketAddr,
    upstream: Option<&Upstream>,
    timeout: Duration,
    egress: Egress,
    query: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    let len = u16::try_from(query.len()).map_err(|_| "query longer than 65535 bytes")?;
    let mut s = match upstream {
        Some(up) => conn::through_upstream(up, Target::Addr(server), timeout, egress)?,
        None => sys::dial_as(&server, timeout, egress).map_err(|e| io_text(&e))?,
    };
    let io = |e: io::Error| io_text(&e);
    s.set_nonblocking(false).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut msg = Vec::with_capacity(2 + query.len());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(query);
    s.write_all(&msg).map_err(io)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(io)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut reply).map_err(io)?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_read_in_order_skipping_comments_and_zones() {
        let text = "# generated\nsearch lan\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n\
                    nameserver  10.0.0.1 \n;nameserver 9.9.9.9\nnameserver ::1\n";
        let ns = nameservers(text);
        assert_eq!(
            ns,
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "10.0.0.1".parse().unwrap(),
                "::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_dns_exchange_is_length_prefixed_both_ways() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut q).unwrap();
            assert_eq!(q, b"query");
            s.write_all(&[0, 5]).unwrap();
            s.write_all(b"reply").unwrap();
        });
        let r = exchange(
            addr,
            None,
            Duration::from_secs(5),
            Egress::default(),
            b"query",
        );
        server.join().unwrap();
        assert_eq!(r.unwrap(), b"reply");
    }

    #[test]
    fn a_failed_exchange_is_an_error_not_a_reply() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            // A length prefix that promises more than comes.
            s.write_all(&[0, 50, 1, 2]).unwrap();
        });
        let r = exchange(
            addr,
            None,
            Duration::from_secs(5),
            Egress::default(),
            b"query",
        );
        server.join().unwrap();
        assert!(r.is_err());
    }
}
