//! The DNS wire format (RFC 1035 §4, EDNS per RFC 6891), as much as the
//! responder needs: read one query, write a reply to it, check and filter a
//! reply that a real resolver gave.
//!
//! Hand-written rather than with the `simple-dns` crate: simple-dns 0.13
//! refuses to parse a question whose type it does not know (SSHFP, TLSA,
//! OPENPGPKEY, URI, SPF, ...: `InvalidQType`), and those are exactly the
//! queries ktproxy must pass on to a real resolver unchanged. What is left
//! needs no name decompression at all: the query's name is the first in the
//! message, so a compression pointer there could only point into the header
//! and is refused, and records are skipped, not decoded. Nothing here follows
//! a pointer, so no input can make it loop; every read is bounds-checked.

/// Header length; also where the question's name starts.
pub const HEADER_LEN: usize = 12;
/// A name's longest wire form, length bytes and root label included.
pub const MAX_NAME: usize = 255;
/// What a client without EDNS can receive over UDP.
pub const UDP_MIN: usize = 512;
/// The UDP payload size ktproxy advertises (DNS flag day 2020): answers it
/// makes up never come near it, forwarded ones may.
pub const EDNS_SIZE: u16 = 1232;

pub mod rtype {
    pub const A: u16 = 1;
    pub const PTR: u16 = 12;
    pub const AAAA: u16 = 28;
    pub const A6: u16 = 38;
    pub const OPT: u16 = 41;
    pub const SVCB: u16 = 64;
    pub const HTTPS: u16 = 65;
    pub const ANY: u16 = 255;
}

pub const CLASS_IN: u16 = 1;

pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    /// Extended (needs OPT): the query's EDNS version is not 0.
    pub const BADVERS: u16 = 16;
}

const QR: u16 = 0x8000;
const OPCODE: u16 = 0x7800;
const TC: u16 = 0x0200;
const RD: u16 = 0x0100;
const RA: u16 = 0x0080;
const CD: u16 = 0x0010;

/// One parsed query: slices of the message it came from.
pub struct Query<'a> {
    pub id: u16,
    pub flags: u16,
    /// The question as sent: name (any letter case), type, class.
    pub question: &'a [u8],
    /// The name in wire form (a slice of `question`).
    pub name: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub version: u8,
}

/// A message that gets no ordinary answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// No reply at all: shorter than a header, or itself a response (two
    /// servers answering each other's replies would loop forever).
    Ignore,
    /// A header-only reply with this RCODE and the query's ID.
    Reject { id: u16, flags: u16, rcode: u16 },
}

fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    let b = msg.get(pos..pos.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn u32_at(msg: &[u8], pos: usize) -> Option<u32> {
    let b = msg.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The end of an uncompressed name starting at `pos`: labels of 1-63
/// bytes, then the root label, at most MAX_NAME bytes in all.
fn name_end(msg: &[u8], pos: usize) -> Option<usize> {
    let mut p = pos;
    loop {
        let len = *msg.get(p)? as usize;
        if len == 0 {
            let end = p + 1;
            return (end - pos <= MAX_NAME).then_some(end);
        }
        // 0xC0: a compression pointer; 0x40/0x80: extended label types
        // (RFC 6891 §5 retired them). None belongs in a question.
        if len > 63 {
            return None;
        }
        p += 1 + len;
        if p - pos >= MAX_NAME {
            return None;
        }
    }
}

/// Skips a record's owner name, which may end in a compression pointer.
/// The pointer must point backwards (as every compressor writes them), which
/// is what lets `filter_forwarded` cut a message safely.
fn skip_name(msg: &[u8], pos: usize) -> Option<usize> {
    let mut p = pos;
    loop {
        let len = *msg.get(p)? as usize;
        match len {
            0 => return Some(p + 1),
            0xC0..=0xFF => {
                let target = (u16_at(msg, p)? & 0x3FFF) as usize;
                return (target < p).then_some(p + 2);
            }
            64..=0xBF => return None,
            _ => {
                p += 1 + len;
                if p - pos >= MAX_NAME {
                    return None;
                }
            }
        }
    }
}

/// One resource record's fixed fields and where it ends.
struct Record {
    rtype: u16,
    class: u16,
    ttl: u32,
    end: usize,
}

fn record_at(msg: &[u8], pos: usize) -> Option<Record> {
    let p = skip_name(msg, pos)?;
    let rtype = u16_at(msg, p)?;
    let class = u16_at(msg, p + 2)?;
    let ttl = u32_at(msg, p + 4)?;
    let rdata_len = u16_at(msg, p + 8)? as usize;
    let end = p + 10 + rdata_len;
    (end <= msg.len()).then_some(Record {
        rtype,
        class,
        ttl,
        end,
    })
}

/// Reads a query. Only a well-formed standard query with exactly one
/// question, no answer or authority records and at most one OPT record is
/// answered; bytes after the last record make it malformed (two messages in
/// one datagram must not get the first one's answer).
pub fn parse_query(msg: &[u8]) -> Result<Query<'_>, Bad> {
    let (Some(id), Some(flags)) = (u16_at(msg, 0), u16_at(msg, 2)) else {
        return Err(Bad::Ignore);
    };
    if flags & QR != 0 {
        return Err(Bad::Ignore);
    }
    let reject = |rcode| Bad::Reject { id, flags, rcode };
    let formerr = reject(rcode::FORMERR);
    if msg.len() < HEADER_LEN {
        return Err(formerr);
    }
    if flags & OPCODE != 0 {
        return Err(reject(rcode::NOTIMP));
    }
    let count = |i: usize| u16_at(msg, 4 + 2 * i).unwrap_or(0);
    let (qd, an, ns, ar) = (count(0), count(1), count(2), count(3));
    if qd != 1 || an != 0 || ns != 0 {
        return Err(formerr);
    }
    let name_end = name_end(msg, HEADER_LEN).ok_or(reject(rcode::FORMERR))?;
    let (Some(qtype), Some(qclass)) = (u16_at(msg, name_end), u16_at(msg, name_end + 2)) else {
        return Err(formerr);
    };
    let question_end = name_end + 4;
    let mut edns = None;
    let mut p = question_end;
    for _ in 0..ar {
        let r = record_at(msg, p).ok_or(reject(rcode::FORMERR))?;
        if r.rtype == rtype::OPT {
            // RFC 6891 §6.1.1: one OPT, owned by the root.
            if edns.is_some() || msg[p] != 0 {
                return Err(formerr);
            }
            edns = Some(Edns {
                udp_size: r.class,
                version: (r.ttl >> 16) as u8,
            });
        }
        p = r.end;
    }
    if p != msg.len() {
        return Err(formerr);
    }
    Ok(Query {
        id,
        flags,
        question: &msg[HEADER_LEN..question_end],
        name: &msg[HEADER_LEN..name_end],
        qtype,
        qclass,
        edns,
    })
}

impl Query<'_> {
    /// The most a UDP reply to this query may hold.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => (e.udp_size as usize).clamp(UDP_MIN, 4096),
            None => UDP_MIN,
        }
    }
}

/// Reply flags: a response to the same opcode, recursion available, RD and CD
/// as the client set them (RFC 1035 §4.1.1, RFC 6840 §5.9).
fn reply_flags(query_flags: u16, rcode: u16) -> u16 {
    QR | (query_flags & (OPCODE | RD | CD)) | RA | (rcode & 0xF)
}

fn header_bytes(id: u16, flags: u16, counts: [u16; 4]) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[0..2].copy_from_slice(&id.to_be_bytes());
    h[2..4].copy_from_slice(&flags.to_be_bytes());
    for (i, c) in counts.iter().enumerate() {
        h[4 + 2 * i..6 + 2 * i].copy_from_slice(&c.to_be_bytes());
    }
    h
}

fn header(out: &mut Vec<u8>, id: u16, flags: u16, counts: [u16; 4]) {
    out.extend_from_slice(&header_bytes(id, flags, counts));
}

/// The reply to a [`Bad::Reject`]: a header, nothing else.
pub fn write_header_only(out: &mut Vec<u8>, id: u16, query_flags: u16, rcode: u16) {
    out.clear();
    header(out, id, reply_flags(query_flags, rcode), [0; 4]);
}

/// An OPT record (RFC 6891 §6.1.2): ktproxy's payload size, the upper bits
/// of the RCODE, version 0, no DO bit (ktproxy does no DNSSEC), no options.
const OPT_LEN: usize = 11;
fn opt(out: &mut Vec<u8>, rcode: u16) {
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&EDNS_SIZE.to_be_bytes());
    out.extend_from_slice(&(u32::from(rcode >> 4) << 24).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Builds a reply to a query: header, the question exactly as asked (so the
/// client's letter case survives, as 0x20-randomizing resolvers check), the
/// answers, and an OPT record if the query had one.
pub struct Reply<'o> {
    out: &'o mut Vec<u8>,
    id: u16,
    query_flags: u16,
    rcode: u16,
    edns: bool,
    limit: usize,
    answers: u16,
    truncated: bool,
}

impl<'o> Reply<'o> {
    /// `limit`: the largest message the client can take.
    pub fn new(out: &'o mut Vec<u8>, q: &Query, rcode: u16, limit: usize) -> Reply<'o> {
        out.clear();
        header(out, q.id, 0, [1, 0, 0, 0]);
        out.extend_from_slice(q.question);
        Reply {
            out,
            id: q.id,
            query_flags: q.flags,
            rcode,
            edns: q.edns.is_some(),
            limit,
            answers: 0,
            truncated: false,
        }
    }

    /// Adds a record owned by the question's name (a pointer to it). Returns
    /// false, and marks the reply truncated, when it no longer fits.
    pub fn answer(&mut self, rtype: u16, ttl: u32, rdata: &[u8]) -> bool {
        let reserve = if self.edns { OPT_LEN } else { 0 };
        let need = 12 + rdata.len();
        if self.truncated || self.out.len() + need + reserve > self.limit || rdata.len() > 0xFFFF {
            self.truncated = true;
            return false;
        }
        self.out
            .extend_from_slice(&(0xC000 | HEADER_LEN as u16).to_be_bytes());
        self.out.extend_from_slice(&rtype.to_be_bytes());
        self.out.extend_from_slice(&CLASS_IN.to_be_bytes());
        self.out.extend_from_slice(&ttl.to_be_bytes());
        self.out
            .extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        self.out.extend_from_slice(rdata);
        self.answers += 1;
        true
    }

    pub fn truncate(&mut self) {
        self.truncated = true;
    }

    pub fn finish(self) {
        let mut flags = reply_flags(self.query_flags, self.rcode);
        if self.truncated {
            flags |= TC;
        }
        let additional = u16::from(self.edns);
        let head = header_bytes(self.id, flags, [1, self.answers, 0, additional]);
        self.out[..HEADER_LEN].copy_from_slice(&head);
        if self.edns {
            opt(self.out, self.rcode);
        }
    }
}

/// A name in wire form from its dotted text (labels of 1-63 bytes, as the
/// table's names are). None if it cannot be one.
pub fn name_to_wire(text: &str, out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    for label in text.split('.').filter(|l| !l.is_empty()) {
        if label.len() > 63 {
            return None;
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    (out.len() - start <= MAX_NAME).then_some(())
}

/// Record types a forwarded reply must not carry: addresses (and the
/// address hints of HTTPS/SVCB) would let the client dial around the proxy.
fn is_address_type(t: u16) -> bool {
    matches!(
        t,
        rtype::A | rtype::AAAA | rtype::A6 | rtype::SVCB | rtype::HTTPS
    )
}

/// Checks a real resolver's reply to `q` and writes what the client gets
/// into `out`. False (nothing usable) unless: it answers this very query
/// (same ID, a response, one question equal to ours ignoring letter case;
/// the client gets its own letter case back) and parses to the end; and no address record is in its answer or
/// authority section. Address records in the additional section (glue for
/// MX, NS, SRV) are dropped with that whole section, OPT included (ktproxy
/// adds its own). Too big for `limit`: a truncated reply, so the client asks
/// again over TCP.
pub fn filter_forwarded(q: &Query, reply: &[u8], out: &mut Vec<u8>, limit: usize) -> bool {
    let (Some(id), Some(flags)) = (u16_at(reply, 0), u16_at(reply, 2)) else {
        return false;
    };
    if id != q.id || flags & QR == 0 || flags & OPCODE != q.flags & OPCODE {
        return false;
    }
    let count = |i: usize| u16_at(reply, 4 + 2 * i);
    let (Some(1), Some(an), Some(ns), Some(ar)) = (count(0), count(1), count(2), count(3)) else {
        return false;
    };
    // The name ignoring letter case (resolvers may not keep it), type and
    // class exactly.
    let name_len = q.name.len();
    let Some(question) = reply.get(HEADER_LEN..HEADER_LEN + q.question.len()) else {
        return false;
    };
    if name_end(reply, HEADER_LEN) != Some(HEADER_LEN + name_len)
        || !question[..name_len].eq_ignore_ascii_case(q.name)
        || question[name_len..] != q.question[name_len..]
    {
        return false;
    }
    let mut p = HEADER_LEN + q.question.len();
    for _ in 0..u32::from(an) + u32::from(ns) {
        match record_at(reply, p) {
            Some(r) if !is_address_type(r.rtype) => p = r.end,
            _ => return false,
        }
    }
    let additional_at = p;
    let mut drop_additional = false;
    for _ in 0..ar {
        let Some(r) = record_at(reply, p) else {
            return false;
        };
        drop_additional |= is_address_type(r.rtype);
        p = r.end;
    }
    if p != reply.len() {
        return false;
    }
    out.clear();
    if drop_additional {
        out.extend_from_slice(&reply[..additional_at]);
        let has_opt = q.edns.is_some();
        out[10..12].copy_from_slice(&u16::from(has_opt).to_be_bytes());
        if has_opt {
            opt(out, 0);
        }
    } else {
        out.extend_from_slice(reply);
    }
    // The question as the client wrote it: a resolver may have changed its
    // letter case, and 0x20-checking clients would drop the reply.
    out[HEADER_LEN..HEADER_LEN + q.question.len()].copy_from_slice(q.question);
    if out.len() > limit {
        Reply::new(out, q, rcode::NOERROR, limit).finish_truncated();
    }
    true
}

impl Reply<'_> {
    fn finish_truncated(mut self) {
        self.truncate();
        self.finish();
    }
}

/// The label texts of an uncompressed wire name (as from [`Query::name`]).
pub fn labels(name: &[u8]) -> Labels<'_> {
    Labels { name, pos: 0 }
}

pub struct Labels<'a> {
    name: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Labels<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let len = *self.name.get(self.pos)? as usize;
        if len == 0 {
            return None;
        }
        let label = self.name.get(self.pos + 1..self.pos + 1 + len)?;
        self.pos += 1 + len;
        Some(label)
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A query as a stub resolver sends it: RD set, one question, EDNS if
    /// `edns` is Some(payload size).
    pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut m = Vec::new();
        header(&mut m, id, RD, [1, 0, 0, u16::from(edns.is_some())]);
        name_to_wire(name, &mut m).unwrap();
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            m.push(0);
            m.extend_from_slice(&rtype::OPT.to_be_bytes());
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, 0x80, 0, 0, 0]); // DO set, no options
        }
        m
    }

    #[test]
    fn parses_a_plain_query() {
        let m = query(0x1234, "Example.COM", rtype::A, None);
        let q = parse_query(&m).unwrap();
        assert_eq!((q.id, q.qtype, q.qclass), (0x1234, rtype::A, CLASS_IN));
        assert_eq!(q.name, b"\x07Example\x03COM\x00");
        assert_eq!(q.edns, None);
        assert_eq!(q.udp_limit(), 512);
        let l: Vec<&[u8]> = labels(q.name).collect();
        assert_eq!(l, [&b"Example"[..], b"COM"]);
    }

    #[test]
    fn parses_edns_and_clamps_its_size() {
        let q = query(1, "a.b", rtype::A, Some(4096));
        assert_eq!(parse_query(&q).unwrap().udp_limit(), 4096);
        let q = query(1, "a.b", rtype::A, Some(100));
        let p = parse_query(&q).unwrap();
        assert_eq!(p.edns.unwrap().udp_size, 100);
        assert_eq!(p.udp_limit(), 512);
    }

    #[test]
    fn rejects_what_is_not_one_clean_question() {
        let good = query(7, "a.b", rtype::A, None);
        let reject = |rcode: u16| {
            Err::<(), _>(Bad::Reject {
                id: 7,
                flags: RD,
                rcode,
            })
        };
        assert_eq!(parse_query(&good[..3]).err(), Some(Bad::Ignore));
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp).err(), Some(Bad::Ignore));
        for cut in 4..good.len() {
            assert_eq!(
                parse_query(&good[..cut]).err(),
                reject(rcode::FORMERR).err()
            );
        }
        let mut two = good.clone();
        two[5] = 2;
        assert_eq!(parse_query(&two).err(), reject(rcode::FORMERR).err());
        let mut zero = good.clone();
        zero[5] = 0;
        assert_eq!(parse_query(&zero).err(), reject(rcode::FORMERR).err());
        let mut trailing = good.clone();
        trailing.extend_from_slice(&good);
        assert_eq!(parse_query(&trailing).err(), reject(rcode::FORMERR).err());
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        assert!(matches!(
            parse_query(&notify),
            Err(Bad::Reject {
                rcode: rcode::NOTIMP,
                ..
            })
        ));
        // A compression pointer as the question's name: to itself, and to
        // the header.
        let mut ptr = good[..12].to_vec();
        ptr.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_query(&ptr).err(), reject(rcode::FORMERR).err());
        ptr[13] = 0;
        assert_eq!(parse_query(&ptr).err(), reject(rcode::FORMERR).err());
        // Two OPT records.
        let mut two_opt = query(7, "a.b", rtype::A, Some(1232));
        two_opt[11] = 2;
        let opt_rr = two_opt[two_opt.len() - 11..].to_vec();
        two_opt.extend_from_slice(&opt_rr);
        assert_eq!(parse_query(&two_opt).err(), reject(rcode::FORMERR).err());
    }

    #[test]
    fn names_longer_than_255_bytes_are_refused() {
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long.len(), 253); // 255 on the wire: the longest legal name
        assert!(parse_query(&query(1, &long, rtype::A, None)).is_ok());
        let mut m = Vec::new();
        header(&mut m, 1, 0, [1, 0, 0, 0]);
        for _ in 0..4 {
            m.push(63);
            m.extend_from_slice(&[b'x'; 63]);
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(parse_query(&m).is_err());
    }

    #[test]
    fn reply_echoes_question_and_points_answers_at_it() {
        let m = query(0xBEEF, "Foo.Test", rtype::A, Some(1232));
        let q = parse_query(&m).unwrap();
        let mut out = Vec::new();
        let mut r = Reply::new(&mut out, &q, rcode::NOERROR, q.udp_limit());
        assert!(r.answer(rtype::A, 5, &[198, 18, 0, 1]));
        r.finish();
        let mut want = vec![0xBE, 0xEF, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 1];
        want.extend_from_slice(q.question);
        want.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 198, 18, 0, 1]);
        want.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out, want);
    }

    #[test]
    fn reply_truncates_instead_of_exceeding_the_limit() {
        let m = query(1, "a.test", rtype::A, None);
        let q = parse_query(&m).unwrap();
        let mut out = Vec::new();
        let mut r = Reply::new(&mut out, &q, rcode::NOERROR, 512);
        let mut n: u8 = 0;
        while r.answer(rtype::A, 5, &[10, 0, 0, n]) {
            n += 1;
        }
        r.finish();
        assert!(out.len() <= 512);
        assert_eq!(usize::from(n), (512 - 12 - 12) / 16);
        assert_eq!(out[2] & 0x02, 0x02, "TC set");
    }

    #[test]
    fn badvers_goes_in_the_opt_record() {
        let mut m = query(3, "a.test", rtype::A, Some(1232));
        let n = m.len();
        m[n - 5] = 1; // EDNS version 1
        let q = parse_query(&m).unwrap();
        assert_eq!(q.edns.unwrap().version, 1);
        let mut out = Vec::new();
        Reply::new(&mut out, &q, rcode::BADVERS, 512).finish();
        assert_eq!(out[3] & 0xF, 0);
        assert_eq!(out[out.len() - 6], 1, "extended RCODE 16 >> 4");
    }
}
