//! Query bytes in, reply bytes out: what ktproxy answers, per query type.
//!
//! | query | answer |
//! |---|---|
//! | A (and ANY) | a fake address from the table |
//! | AAAA, A6 | NOERROR, no answer: the client falls back to IPv4, whose fake address goes through the proxy |
//! | HTTPS, SVCB | NOERROR, no answer: their address hints would bypass the proxy |
//! | PTR of a fake address | the name behind it (NXDOMAIN if none) |
//! | anything else | [`Options::forward`]: a real resolver, through the upstream |
//! | a name under a --direct-domain | resolved for real by ktproxy (A, AAAA); other types through `direct_forward` |
//! | localhost, *.localhost | 127.0.0.1 / ::1 (RFC 6761: never sent anywhere) |
//! | *.invalid, names that are not host names | NXDOMAIN |
//!
//! Names are compared in lower case; the reply repeats the question exactly
//! as asked. Class other than IN: REFUSED. EDNS: answered with a minimal OPT
//! record (version 0, no options); a version above 0 gets BADVERS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use log::{debug, warn};

use super::direct::{self, DirectDomains, Lookup};
use super::wire::{self, rcode, rtype, Bad, Query, Reply};
use super::{Forward, Names, Options};

pub struct Responder {
    names: Arc<Names>,
    forward: Option<Forward>,
    direct_forward: Option<Forward>,
    direct: DirectDomains,
    ttl: u32,
    /// direct::lookup; tests put a stand-in here so that no query leaves
    /// the machine.
    lookup: fn(&str) -> Lookup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Replies fit the client's UDP payload size, or say TC.
    Udp,
    /// Up to 65,535 bytes.
    Tcp,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// `out` holds the reply.
    Reply,
    /// `out` holds an error reply to a malformed message (over TCP, the
    /// framing can no longer be trusted: close after sending it).
    Rejected,
    /// No reply.
    Drop,
    /// The answer needs a blocking call (forwarding, getaddrinfo): ask again
    /// with `may_block`, on a thread that may wait. Nothing in `out`.
    Slow,
}

/// What to do with a well-formed query.
enum Plan {
    Fake,
    Empty(u16),
    Loopback,
    Ptr(IpAddr),
    Direct,
    Forward(Via),
}

#[derive(Clone, Copy)]
enum Via {
    Upstream,
    Direct,
}

/// A lower-case host name: labels of letters, digits, '-' and '_' (what an
/// upstream can be given in a SOCKS5 request or an HTTP CONNECT line).
struct HostName {
    buf: [u8; wire::MAX_NAME],
    len: usize,
}

impl HostName {
    /// None for the root or any byte outside the host name set.
    fn from_wire(name: &[u8]) -> Option<HostName> {
        let mut h = HostName {
            buf: [0; wire::MAX_NAME],
            len: 0,
        };
        for label in wire::labels(name) {
            if h.len > 0 {
                *h.buf.get_mut(h.len)? = b'.';
                h.len += 1;
            }
            for &b in label {
                if !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    return None;
                }
                *h.buf.get_mut(h.len)? = b.to_ascii_lowercase();
                h.len += 1;
            }
        }
        (h.len > 0).then_some(h)
    }

    fn as_str(&self) -> &str {
        // Only ASCII was copied in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

fn under(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

/// "7.0.18.198.in-addr.arpa" -> 198.18.0.7. Only full four-octet names.
fn reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut parts = rest.split('.');
    for i in (0..4).rev() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        octets[i] = p.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

impl Responder {
    pub fn new(o: Options) -> Responder {
        Responder {
            names: o.names,
            forward: o.forward,
            direct_forward: o.direct_forward,
            direct: DirectDomains::new(&o.direct_domains),
            ttl: o.ttl,
            lookup: direct::lookup,
        }
    }

    #[cfg(test)]
    pub fn names(&self) -> &Arc<Names> {
        &self.names
    }

    /// The reply to one query as a UDP client gets it (None: no reply).
    /// May block (forwarding, direct lookups). The servers use `respond`.
    #[cfg(test)]
    pub fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match self.respond(query, &mut out, Transport::Udp, true) {
            Outcome::Reply | Outcome::Rejected => Some(out),
            Outcome::Drop | Outcome::Slow => None,
        }
    }

    /// Writes the reply to `query` into `out` (cleared first). With
    /// `may_block` false, answers that need a blocking call are not made:
    /// the result is Outcome::Slow.
    pub(crate) fn respond(
        &self,
        query: &[u8],
        out: &mut Vec<u8>,
        transport: Transport,
        may_block: bool,
    ) -> Outcome {
        out.clear();
        let q = match wire::parse_query(query) {
            Ok(q) => q,
            Err(Bad::Ignore) => return Outcome::Drop,
            Err(Bad::Reject { id, flags, rcode }) => {
                wire::write_header_only(out, id, flags, rcode);
                return Outcome::Rejected;
            }
        };
        let limit = match transport {
            Transport::Udp => q.udp_limit(),
            Transport::Tcp => 0xFFFF,
        };
        let host = HostName::from_wire(q.name);
        let plan = match q.edns {
            Some(e) if e.version > 0 => Plan::Empty(rcode::BADVERS),
            _ if q.qclass != wire::CLASS_IN => Plan::Empty(rcode::REFUSED),
            _ => self.plan(&q, host.as_ref().map(HostName::as_str)),
        };
        let name = host.as_ref().map_or("(not a host name)", HostName::as_str);
        match plan {
            Plan::Fake => match self.names.assign(name) {
                Some(ip) => {
                    let mut r = Reply::new(out, &q, rcode::NOERROR, limit);
                    r.answer(rtype::A, self.ttl, &ip.octets());
                    r.finish();
                }
                None => {
                    warn!("DNS: no fake address for {name}: every name in the table has an open connection");
                    Reply::new(out, &q, rcode::SERVFAIL, limit).finish();
                }
            },
            Plan::Empty(rc) => Reply::new(out, &q, rc, limit).finish(),
            Plan::Loopback => {
                let mut r = Reply::new(out, &q, rcode::NOERROR, limit);
                match q.qtype {
                    rtype::AAAA => r.answer(rtype::AAAA, self.ttl, &Ipv6Addr::LOCALHOST.octets()),
                    _ => r.answer(rtype::A, self.ttl, &Ipv4Addr::LOCALHOST.octets()),
                };
                r.finish();
            }
            Plan::Ptr(ip) => self.answer_ptr(&q, ip, out, limit),
            Plan::Direct | Plan::Forward(_) if !may_block => return Outcome::Slow,
            Plan::Direct => self.answer_direct(&q, name, out, limit),
            Plan::Forward(via) => self.answer_forwarded(&q, query, via, name, out, limit),
        }
        Outcome::Reply
    }

    fn plan(&self, q: &Query, host: Option<&str>) -> Plan {
        let Some(h) = host else {
            // The root, or bytes no host name has: nothing to give an
            // address for. Other types are the real DNS's business.
            return match q.qtype {
                rtype::A | rtype::ANY | rtype::AAAA | rtype::A6 | rtype::SVCB | rtype::HTTPS
                    if q.name == [0] =>
                {
                    Plan::Empty(rcode::NOERROR)
                }
                rtype::A | rtype::ANY | rtype::AAAA | rtype::A6 => Plan::Empty(rcode::NXDOMAIN),
                rtype::SVCB | rtype::HTTPS => Plan::Empty(rcode::NOERROR),
                _ => Plan::Forward(Via::Upstream),
            };
        };
        let address_query = matches!(q.qtype, rtype::A | rtype::ANY | rtype::AAAA | rtype::A6);
        if address_query && under(h, "localhost") {
            return match q.qtype {
                rtype::A6 => Plan::Empty(rcode::NOERROR),
                _ => Plan::Loopback,
            };
        }
        if under(h, "invalid") {
            return Plan::Empty(rcode::NXDOMAIN);
        }
        if self.direct.contains(h) {
            return match q.qtype {
                rtype::A | rtype::ANY | rtype::AAAA => Plan::Direct,
                rtype::A6 => Plan::Empty(rcode::NOERROR),
                _ => Plan::Forward(Via::Direct),
            };
        }
        match q.qtype {
            rtype::A | rtype::ANY => Plan::Fake,
            rtype::AAAA | rtype::A6 | rtype::SVCB | rtype::HTTPS => Plan::Empty(rcode::NOERROR),
            rtype::PTR => match reverse_v4(h) {
                Some(ip) if self.names.net().covers(IpAddr::V4(ip)) => Plan::Ptr(IpAddr::V4(ip)),
                _ => Plan::Forward(Via::Upstream),
            },
            _ => Plan::Forward(Via::Upstream),
        }
    }

    fn answer_ptr(&self, q: &Query, ip: IpAddr, out: &mut Vec<u8>, limit: usize) {
        let Some(name) = self.names.name_of(ip) else {
            Reply::new(out, q, rcode::NXDOMAIN, limit).finish();
            return;
        };
        let mut rdata = Vec::with_capacity(name.len() + 2);
        if wire::name_to_wire(&name, &mut rdata).is_none() {
            Reply::new(out, q, rcode::SERVFAIL, limit).finish();
            return;
        }
        let mut r = Reply::new(out, q, rcode::NOERROR, limit);
        r.answer(rtype::PTR, self.ttl, &rdata);
        r.finish();
    }

    fn answer_direct(&self, q: &Query, name: &str, out: &mut Vec<u8>, limit: usize) {
        let addrs = match (self.lookup)(name) {
            Lookup::Found(a) => a,
            Lookup::NoName => return Reply::new(out, q, rcode::NXDOMAIN, limit).finish(),
            Lookup::NoData => Vec::new(),
            Lookup::Failed => {
                debug!("DNS: resolving direct name {name} failed");
                return Reply::new(out, q, rcode::SERVFAIL, limit).finish();
            }
        };
        let mut r = Reply::new(out, q, rcode::NOERROR, limit);
        for ip in addrs {
            let fits = match (ip, q.qtype) {
                (IpAddr::V6(a), rtype::AAAA) => r.answer(rtype::AAAA, self.ttl, &a.octets()),
                (IpAddr::V4(a), rtype::A | rtype::ANY) => r.answer(rtype::A, self.ttl, &a.octets()),
                _ => true,
            };
            if !fits {
                break;
            }
        }
        r.finish();
    }

    fn answer_forwarded(
        &self,
        q: &Query,
        query: &[u8],
        via: Via,
        name: &str,
        out: &mut Vec<u8>,
        limit: usize,
    ) {
        let forward = match via {
            Via::Upstream => self.forward.as_ref(),
            Via::Direct => self.direct_forward.as_ref(),
        };
        let reply = forward.and_then(|f| f(query));
        let ok = match &reply {
            Some(reply) => wire::filter_forwarded(q, reply, out, limit),
            None => false,
        };
        if !ok {
            if reply.is_some() {
                debug!("DNS: dropped a forwarded reply for {name} type {} (not for this query, malformed, or carrying addresses)", q.qtype);
            }
            Reply::new(out, q, rcode::SERVFAIL, limit).finish();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dns::wire::tests::query;
    use crate::dns::FakeNet;

    pub(crate) fn fake_lookup(name: &str) -> Lookup {
        match name {
            "printer.lan" => Lookup::Found(vec![
                "192.168.1.20".parse().unwrap(),
                "fd00::20".parse().unwrap(),
            ]),
            "v6only.lan" => Lookup::Found(vec!["fd00::21".parse().unwrap()]),
            "empty.lan" => Lookup::NoData,
            "broken.lan" => Lookup::Failed,
            _ => Lookup::NoName,
        }
    }

    pub(crate) fn responder(forward: Option<Forward>) -> Responder {
        responder_with(forward, None)
    }

    /// 1000 names, "lan" a direct domain (looked up by fake_lookup).
    pub(crate) fn responder_with(forward: Option<Forward>, direct: Option<Forward>) -> Responder {
        let names = Arc::new(Names::new(FakeNet::default(), 1000));
        let mut o = Options::new(names);
        o.forward = forward;
        o.direct_forward = direct;
        o.direct_domains = vec!["lan".into()];
        let mut r = Responder::new(o);
        r.lookup = fake_lookup;
        r
    }

    /// (rcode, flags, answers as (type, rdata)) of a reply; the header and
    /// question are checked against the query on the way.
    pub(crate) fn decode(query: &[u8], reply: &[u8]) -> (u16, u16, Vec<(u16, Vec<u8>)>) {
        let q = wire::parse_query(query).unwrap();
        assert_eq!(&reply[..2], &query[..2], "ID kept");
        let flags = u16::from_be_bytes([reply[2], reply[3]]);
        assert_eq!(flags & 0x8000, 0x8000, "QR set");
        assert_eq!(&reply[4..6], [0, 1], "one question");
        assert_eq!(
            &reply[12..12 + q.question.len()],
            q.question,
            "question echoed"
        );
        let an = u16::from_be_bytes([reply[6], reply[7]]);
        let mut p = 12 + q.question.len();
        let mut answers = Vec::new();
        for _ in 0..an {
            assert_eq!(&reply[p..p + 2], [0xC0, 12]);
            let t = u16::from_be_bytes([reply[p + 2], reply[p + 3]]);
            let len = u16::from_be_bytes([reply[p + 10], reply[p + 11]]) as usize;
            answers.push((t, reply[p + 12..p + 12 + len].to_vec()));
            p += 12 + len;
        }
        (flags & 0xF, flags, answers)
    }

    fn ask(r: &Responder, name: &str, qtype: u16) -> (u16, Vec<(u16, Vec<u8>)>) {
        let q = query(0x4242, name, qtype, None);
        let reply = r.answer(&q).expect("a reply");
        let (rc, _, answers) = decode(&q, &reply);
        (rc, answers)
    }

    fn a_of(answers: &[(u16, Vec<u8>)]) -> Ipv4Addr {
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers[0].0, rtype::A);
        let b: [u8; 4] = answers[0].1[..].try_into().unwrap();
        Ipv4Addr::from(b)
    }

    #[test]
    fn a_gets_a_fake_address_and_the_same_one_in_any_letter_case() {
        let r = responder(None);
        let (rc, ans) = ask(&r, "Example.COM", rtype::A);
        assert_eq!(rc, rcode::NOERROR);
        let ip = a_of(&ans);
        assert!(r.names().net().contains(IpAddr::V4(ip)));
        assert_eq!(a_of(&ask(&r, "example.com", rtype::A).1), ip);
        assert_eq!(r.names().pin(IpAddr::V4(ip)).unwrap().name(), "example.com");
        assert_eq!(a_of(&ask(&r, "example.com", rtype::ANY).1), ip);
    }

    #[test]
    fn reply_flags_keep_rd_and_cd_and_set_ra_and_ttl_is_short() {
        let r = responder(None);
        let mut q = query(9, "a.test", rtype::A, None);
        q[3] |= 0x10; // CD
        let reply = r.answer(&q).unwrap();
        let (_, flags, _) = decode(&q, &reply);
        assert_eq!(flags, 0x8000 | 0x0100 | 0x0080 | 0x0010);
        let ttl_at = reply.len() - 10;
        assert_eq!(&reply[ttl_at..ttl_at + 4], 5u32.to_be_bytes());
    }

    #[test]
    fn aaaa_https_and_svcb_get_no_answer() {
        let r = responder(None);
        for t in [rtype::AAAA, rtype::HTTPS, rtype::SVCB, rtype::A6] {
            assert_eq!(
                ask(&r, "example.com", t),
                (rcode::NOERROR, vec![]),
                "type {t}"
            );
        }
    }

    #[test]
    fn ptr_of_a_fake_address_gives_the_name() {
        let r = responder(None);
        let ip = a_of(&ask(&r, "Www.Example.org", rtype::A).1);
        let o = ip.octets();
        let rev = format!("{}.{}.{}.{}.in-addr.ARPA", o[3], o[2], o[1], o[0]);
        let (rc, ans) = ask(&r, &rev, rtype::PTR);
        assert_eq!(rc, rcode::NOERROR);
        assert_eq!(
            ans,
            [(rtype::PTR, b"\x03www\x07example\x03org\x00".to_vec())]
        );
        assert_eq!(
            ask(&r, "9.9.19.198.in-addr.arpa", rtype::PTR).0,
            rcode::NXDOMAIN
        );
        // Not a fake address: the real DNS's business (no forwarder here).
        assert_eq!(
            ask(&r, "1.2.0.192.in-addr.arpa", rtype::PTR).0,
            rcode::SERVFAIL
        );
        assert_eq!(reverse_v4("07.0.18.198.in-addr.arpa"), None);
        assert_eq!(reverse_v4("18.198.in-addr.arpa"), None);
    }

    #[test]
    fn other_types_are_forwarded_and_checked() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
        let log = Arc::clone(&seen);
        let r = responder(Some(Box::new(move |m: &[u8]| {
            log.lock().unwrap().push(m.to_vec());
            // An MX answer with an A record as glue.
            let mut reply = m.to_vec();
            reply[2] |= 0x80;
            reply[7] = 1;
            reply[11] = 1;
            reply.extend_from_slice(&[0xC0, 12, 0, 15, 0, 1, 0, 0, 1, 0, 0, 4, 0, 10, 0xC0, 12]);
            reply.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 192, 0, 2, 1]);
            Some(reply)
        })));
        let q = query(77, "example.com", 15, None);
        let reply = r.answer(&q).unwrap();
        assert_eq!(seen.lock().unwrap()[..], [&q[..]], "forwarded as asked");
        let (rc, _, ans) = decode(&q, &reply);
        assert_eq!(rc, rcode::NOERROR);
        assert_eq!(ans, [(15, vec![0, 10, 0xC0, 12])]);
        assert_eq!(&reply[10..12], [0, 0], "the glue A record is gone");
        // TLSA: a type the simple-dns crate could not parse.
        assert_eq!(ask(&r, "_443._tcp.example.com", 52).0, rcode::NOERROR);
    }

    #[test]
    fn forwarded_replies_for_another_query_or_with_addresses_become_servfail() {
        let make = |f: fn(&mut Vec<u8>)| {
            responder(Some(Box::new(move |m: &[u8]| {
                let mut reply = m.to_vec();
                reply[2] |= 0x80;
                f(&mut reply);
                Some(reply)
            })))
        };
        type Mangle = fn(&mut Vec<u8>);
        let cases: [(&str, Mangle); 5] = [
            ("other ID", |m| m[1] ^= 1),
            ("other name", |m| m[13] = b'x'),
            ("other type", |m| {
                let n = m.len();
                m[n - 3] = 15;
            }),
            ("trailing bytes", |m| m.push(0)),
            ("an A answer", |m| {
                m[7] = 1;
                m.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 192, 0, 2, 1]);
            }),
        ];
        for (what, f) in cases {
            let r = make(f);
            assert_eq!(ask(&r, "example.com", 16).0, rcode::SERVFAIL, "{what}");
        }
        // Same name in another letter case is the same question.
        let r = make(|m| m[13] = b'E');
        assert_eq!(ask(&r, "example.com", 16).0, rcode::NOERROR);
    }

    #[test]
    fn forwarded_reply_too_big_for_udp_is_truncated() {
        let r = responder(Some(Box::new(|m: &[u8]| {
            let mut reply = m.to_vec();
            reply[2] |= 0x80;
            reply[7] = 1;
            let txt = [255u8; 256];
            reply.extend_from_slice(&[0xC0, 12, 0, 16, 0, 1, 0, 0, 1, 0, 1, 0]);
            reply.extend_from_slice(&txt);
            reply[7] = 2;
            reply.extend_from_slice(&[0xC0, 12, 0, 16, 0, 1, 0, 0, 1, 0, 1, 0]);
            reply.extend_from_slice(&txt);
            Some(reply)
        })));
        let q = query(5, "big.example", 16, None);
        let reply = r.answer(&q).unwrap();
        let (rc, flags, ans) = decode(&q, &reply);
        assert_eq!((rc, flags & 0x0200, ans.len()), (rcode::NOERROR, 0x0200, 0));
        let mut out = Vec::new();
        assert_eq!(
            r.respond(&q, &mut out, Transport::Tcp, true),
            Outcome::Reply
        );
        assert_eq!(decode(&q, &out).2.len(), 2, "over TCP it all fits");
    }

    #[test]
    fn without_a_forwarder_other_types_get_servfail() {
        let r = responder(None);
        assert_eq!(ask(&r, "example.com", 16), (rcode::SERVFAIL, vec![]));
        let mut out = Vec::new();
        let q = query(1, "example.com", 16, None);
        assert_eq!(
            r.respond(&q, &mut out, Transport::Udp, false),
            Outcome::Slow
        );
        assert!(out.is_empty());
    }

    #[test]
    fn direct_domains_get_real_addresses() {
        let r = responder(None);
        let (rc, ans) = ask(&r, "Printer.LAN", rtype::A);
        assert_eq!(
            (rc, a_of(&ans)),
            (rcode::NOERROR, Ipv4Addr::new(192, 168, 1, 20))
        );
        let (rc, ans) = ask(&r, "printer.lan", rtype::AAAA);
        assert_eq!(rc, rcode::NOERROR);
        assert_eq!(
            ans,
            [(
                rtype::AAAA,
                "fd00::20".parse::<Ipv6Addr>().unwrap().octets().to_vec()
            )]
        );
        assert_eq!(ask(&r, "v6only.lan", rtype::A), (rcode::NOERROR, vec![]));
        assert_eq!(ask(&r, "empty.lan", rtype::AAAA), (rcode::NOERROR, vec![]));
        assert_eq!(ask(&r, "gone.lan", rtype::A).0, rcode::NXDOMAIN);
        assert_eq!(ask(&r, "broken.lan", rtype::A).0, rcode::SERVFAIL);
        assert_eq!(r.names().len(), 0, "no fake address for direct names");
        let mut out = Vec::new();
        let q = query(1, "printer.lan", rtype::A, None);
        assert_eq!(
            r.respond(&q, &mut out, Transport::Udp, false),
            Outcome::Slow
        );
    }

    #[test]
    fn localhost_invalid_and_odd_names_never_get_a_fake_address() {
        let r = responder(None);
        assert_eq!(a_of(&ask(&r, "localhost", rtype::A).1), Ipv4Addr::LOCALHOST);
        assert_eq!(
            a_of(&ask(&r, "app.LOCALHOST", rtype::A).1),
            Ipv4Addr::LOCALHOST
        );
        let (_, ans) = ask(&r, "localhost", rtype::AAAA);
        assert_eq!(ans, [(rtype::AAAA, Ipv6Addr::LOCALHOST.octets().to_vec())]);
        assert_eq!(ask(&r, "x.invalid", rtype::A).0, rcode::NXDOMAIN);
        assert_eq!(ask(&r, "has space.example", rtype::A).0, rcode::NXDOMAIN);
        assert_eq!(ask(&r, "", rtype::A), (rcode::NOERROR, vec![]));
        assert_eq!(r.names().len(), 0);
    }

    #[test]
    fn other_classes_are_refused_and_new_edns_versions_get_badvers() {
        let r = responder(None);
        let mut q = query(1, "version.bind", 16, None);
        let n = q.len();
        q[n - 1] = 3; // CH
        assert_eq!(decode(&q, &r.answer(&q).unwrap()).0, rcode::REFUSED);
        let mut q = query(1, "a.test", rtype::A, Some(1232));
        let n = q.len();
        q[n - 5] = 1;
        let reply = r.answer(&q).unwrap();
        assert_eq!(decode(&q, &reply).2.len(), 0);
        assert_eq!(reply[reply.len() - 6], 1, "BADVERS in the OPT record");
    }

    #[test]
    fn malformed_queries_get_formerr_and_responses_get_nothing() {
        let r = responder(None);
        let q = query(0x0102, "a.test", rtype::A, None);
        let reply = r.answer(&q[..q.len() - 1]).unwrap();
        assert_eq!(reply, [1, 2, 0x81, 0x81, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut resp = q.clone();
        resp[2] |= 0x80;
        assert_eq!(r.answer(&resp), None);
        assert_eq!(r.answer(&[]), None);
    }
}
