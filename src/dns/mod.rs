//! Names through the proxy: ktproxy answers the DNS queries of intercepted
//! programs itself. A host name gets a fake IPv4 address from a reserved
//! range (--fake-net, default 198.18.0.0/15); a later connect to that
//! address is redirected like any other, and conn.rs asks [`Names::pin`]
//! which name it stands for, so the upstream receives the name, never an
//! address resolved on this machine.
//!
//! - [`FakeNet`]: the reserved range;
//! - [`Names`] (names.rs): the bounded name <-> address table;
//! - [`Responder`] (responder.rs): query bytes -> reply bytes, the policy per
//!   query type;
//! - wire.rs: the DNS wire format, as much as the responder needs;
//! - direct.rs: --direct-domain names, resolved for real by ktproxy;
//! - serve.rs: the UDP responder threads and DNS over TCP.

mod direct;
mod names;
mod responder;
mod serve;
mod wire;

#[cfg(test)]
mod fuzz;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::rules::Cidr;

pub use direct::parse_direct_domains;
pub use names::{Names, Pinned};
pub use responder::Responder;
pub use serve::{serve_tcp, start_udp};

/// The fake range when --fake-net is not given: RFC 2544's benchmarking
/// range, which no real host uses (131,070 addresses).
pub const DEFAULT_FAKE_NET: &str = "198.18.0.0/15";
/// How many names the table keeps (least recently used goes first).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// Seconds. Short, so that clients come back often: a name in use is then
/// refreshed in the table, and a client holds an address only briefly
/// after its name was last asked for. Five seconds still spares a page
/// load its repeated lookups.
pub const DEFAULT_TTL: u32 = 5;
/// --fake-net must hold at least this many names (a /20): fewer, and a busy
/// session would cycle the table faster than clients forget addresses.
pub const MIN_FAKE_PREFIX: u8 = 20;

/// How other query types (MX, TXT, SRV, ...) reach a real resolver: given a
/// DNS message, return the reply (TCP DNS through the upstream; see
/// [`Options::forward`]). `None` means no reply: the client gets SERVFAIL.
/// The reply is checked (ID, question) and filtered (no address records)
/// before it reaches the client.
pub type Forward = Box<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// What the responder needs; `Options::new` has the defaults.
pub struct Options {
    pub names: Arc<Names>,
    /// Query types other than A/AAAA/HTTPS/SVCB/PTR-of-a-fake-address.
    /// None: SERVFAIL.
    pub forward: Option<Forward>,
    /// Other query types for names under a direct domain (the names the user
    /// wants resolved locally). None: SERVFAIL.
    pub direct_forward: Option<Forward>,
    /// Normalized suffixes from [`parse_direct_domains`].
    pub direct_domains: Vec<String>,
    /// TTL of every answer ktproxy makes up, in seconds.
    pub ttl: u32,
}

impl Options {
    pub fn new(names: Arc<Names>) -> Options {
        Options {
            names,
            forward: None,
            direct_forward: None,
            direct_domains: Vec::new(),
            ttl: DEFAULT_TTL,
        }
    }
}

/// --fake-net: an IPv4 range whose addresses stand for names. The first
/// (network) and last (broadcast) addresses are never handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FakeNet {
    base: u32,
    prefix: u8,
}

impl FakeNet {
    /// Errors are usage errors (exit 2) and say what is wrong, e.g.
    /// "--fake-net 10.9.0.0/24: too small (254 addresses); use a /20 or
    /// larger (4,094 addresses)".
    pub fn parse(s: &str) -> Result<FakeNet> {
        let bad = |why: String| Error::usage(format!("--fake-net {}: {why}", s.trim()));
        let (addr, prefix) = match Cidr::parse(s).map_err(bad)? {
            Cidr::V4(a, l) => (a, l),
            Cidr::V6(..) => {
                return Err(bad(
                    "must be an IPv4 range (AAAA queries get no fake address)".into(),
                ))
            }
        };
        let net = FakeNet {
            base: u32::from(addr),
            prefix,
        };
        for (what, range) in RESERVED {
            let (r, l) = (u32::from(range.0), range.1);
            if net.overlaps(r, l) {
                return Err(bad(format!("overlaps {what} {}/{l}", Ipv4Addr::from(r))));
            }
        }
        if prefix > MIN_FAKE_PREFIX {
            return Err(bad(format!(
                "too small ({} addresses); use a /{MIN_FAKE_PREFIX} or larger ({} addresses)",
                group(net.usable()),
                group(FakeNet::usable_in(MIN_FAKE_PREFIX))
            )));
        }
        Ok(net)
    }

    /// IPv4, or IPv4-mapped IPv6 (what an AF_INET6 socket reports for an
    /// IPv4 destination).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset(ip).is_some()
    }

    pub fn network(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::from(self.base), self.prefix)
    }

    /// Whether `ip` is in the range at all, network and broadcast included
    /// (e.g. to refuse listen addresses inside it).
    pub fn covers(&self, ip: IpAddr) -> bool {
        match v4(ip) {
            Some(a) => self.overlaps(u32::from(a), 32),
            None => false,
        }
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    fn overlaps(&self, other: u32, len: u8) -> bool {
        let l = self.prefix.min(len);
        (self.base ^ other) & FakeNet::mask(l) == 0
    }

    fn usable_in(prefix: u8) -> u32 {
        // Network and broadcast excluded; parse never lets prefix exceed 20.
        let size = 1u64 << (32 - u32::from(prefix));
        u32::try_from(size.saturating_sub(2)).unwrap_or(u32::MAX)
    }

    /// How many addresses can be handed out.
    pub(crate) fn usable(&self) -> u32 {
        FakeNet::usable_in(self.prefix)
    }

    /// The address with index `off` (0 .. usable()).
    pub(crate) fn addr(&self, off: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base.wrapping_add(1).wrapping_add(off))
    }

    /// The index of a handed-out address, None outside the range or for its
    /// network and broadcast addresses.
    pub(crate) fn offset(&self, ip: IpAddr) -> Option<u32> {
        let a = u32::from(v4(ip)?);
        if (a ^ self.base) & FakeNet::mask(self.prefix) != 0 {
            return None;
        }
        let off = (a - self.base).checked_sub(1)?;
        (off < self.usable()).then_some(off)
    }
}

/// DEFAULT_FAKE_NET.
impl Default for FakeNet {
    fn default() -> FakeNet {
        FakeNet {
            base: u32::from(Ipv4Addr::new(198, 18, 0, 0)),
            prefix: 15,
        }
    }
}

impl fmt::Display for FakeNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

/// Ranges a fake address must never shadow: connects there mean something.
const RESERVED: [(&str, (Ipv4Addr, u8)); 5] = [
    ("'this network'", (Ipv4Addr::new(0, 0, 0, 0), 8)),
    ("loopback", (Ipv4Addr::new(127, 0, 0, 0), 8)),
    ("link-local", (Ipv4Addr::new(169, 254, 0, 0), 16)),
    ("multicast", (Ipv4Addr::new(224, 0, 0, 0), 4)),
    ("reserved/broadcast", (Ipv4Addr::new(240, 0, 0, 0), 4)),
];

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

/// 131070 -> "131,070": counts people read.
fn group(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        let e = FakeNet::parse(s).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{s}: {e}");
        e.to_string()
    }

    #[test]
    fn default_fake_net_parses_to_the_default() {
        let n = FakeNet::parse(DEFAULT_FAKE_NET).unwrap();
        assert_eq!(n, FakeNet::default());
        assert_eq!(n.network(), (Ipv4Addr::new(198, 18, 0, 0), 15));
        assert_eq!(n.usable(), 131_070);
        assert_eq!(n.to_string(), "198.18.0.0/15");
    }

    #[test]
    fn fake_net_errors_name_the_problem() {
        assert_eq!(
            err("10.9.0.0/24"),
            "--fake-net 10.9.0.0/24: too small (254 addresses); use a /20 or larger (4,094 addresses)"
        );
        assert!(err("banana").contains("'banana' is not an IPv4 or IPv6 address"));
        assert!(err("10.0.0.1/8").contains("host bits set"));
        assert!(err("fd00::/8").contains("must be an IPv4 range"));
        assert_eq!(
            err("127.16.0.0/12"),
            "--fake-net 127.16.0.0/12: overlaps loopback 127.0.0.0/8"
        );
        assert!(err("0.0.0.0/0").contains("overlaps 'this network' 0.0.0.0/8"));
        assert!(err("224.0.0.0/8").contains("overlaps multicast"));
        assert!(err("169.254.0.0/16").contains("overlaps link-local"));
        assert!(err("10.0.0.0/33").contains("prefix length"));
        assert!(FakeNet::parse("10.240.0.0/20").is_ok());
        assert!(FakeNet::parse("100.64.0.0/10").is_ok());
    }

    #[test]
    fn offsets_skip_network_and_broadcast_and_accept_mapped_addresses() {
        let n = FakeNet::parse("10.240.0.0/20").unwrap();
        assert_eq!(n.addr(0), Ipv4Addr::new(10, 240, 0, 1));
        assert_eq!(n.addr(n.usable() - 1), Ipv4Addr::new(10, 240, 15, 254));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(n.offset(ip("10.240.0.1")), Some(0));
        assert_eq!(n.offset(ip("10.240.15.254")), Some(4093));
        assert_eq!(n.offset(ip("10.240.0.0")), None);
        assert_eq!(n.offset(ip("10.240.15.255")), None);
        assert_eq!(n.offset(ip("10.241.0.1")), None);
        assert_eq!(n.offset(ip("::ffff:10.240.0.7")), Some(6));
        assert!(!n.contains(ip("fd00::1")));
        assert!(n.covers(ip("10.240.0.0")));
        assert!(!n.covers(ip("10.239.255.255")));
    }
}
