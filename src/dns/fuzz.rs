//! Property tests of the responder over hostile input: random bytes,
//! truncations and mutations of valid queries, compression-pointer loops,
//! and hostile replies from the forwarder. The properties:
//! - no panic, and every call returns (no loop);
//! - a reply is a response (QR) with the query's ID; if it has a question,
//!   it is the query's, byte for byte (never an answer to another query);
//! - a reply fits the UDP limit the query allows;
//! - a message that is not a clean query gets no answer record;
//! - no forwarded reply hands the client an address record.
//!
//! `KTPROXY_FUZZ_ITERS=N KTPROXY_FUZZ_SEED=S cargo test --release fuzz_ --
//! --nocapture` runs a longer campaign and prints how many messages each
//! test checked.

use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    /// Messages checked by this test (each test runs on its own thread).
    static CHECKED: Cell<u64> = const { Cell::new(0) };
}

use super::responder::tests::{responder, responder_with};
use super::responder::{Outcome, Responder, Transport};
use super::wire::{self, rtype, tests::query};
use super::Forward;

/// xorshift64*: a fixed seed per test, so a failure repeats.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Seeds differ per campaign with KTPROXY_FUZZ_SEED.
fn seed(n: u64) -> u64 {
    let base: u64 = std::env::var("KTPROXY_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    base.wrapping_mul(1000).wrapping_add(n)
}

fn report(test: &str) {
    eprintln!("fuzz {test}: {} messages checked", CHECKED.get());
}

fn iterations(default: u64) -> u64 {
    std::env::var("KTPROXY_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn u16_at(m: &[u8], p: usize) -> u16 {
    u16::from_be_bytes([m[p], m[p + 1]])
}

/// Walks a reply's records (as a client would) and returns their types;
/// panics if the reply is not well-formed.
fn record_types(reply: &[u8], question_len: usize) -> Vec<u16> {
    let mut p = 12 + question_len;
    let mut types = Vec::new();
    let total = (6..12)
        .step_by(2)
        .map(|i| u16_at(reply, i) as usize)
        .sum::<usize>();
    for _ in 0..total {
        loop {
            let len = reply[p] as usize;
            if len == 0 {
                p += 1;
                break;
            }
            if len >= 0xC0 {
                p += 2;
                break;
            }
            p += 1 + len;
        }
        types.push(u16_at(reply, p));
        p += 10 + u16_at(reply, p + 8) as usize;
    }
    assert_eq!(p, reply.len(), "reply has bytes after its records");
    types
}

/// Checks the properties for one message over both transports.
fn check(r: &Responder, msg: &[u8]) {
    CHECKED.set(CHECKED.get() + 1);
    let mut out = Vec::new();
    for transport in [Transport::Udp, Transport::Tcp] {
        let outcome = r.respond(msg, &mut out, transport, true);
        let parsed = wire::parse_query(msg);
        match outcome {
            Outcome::Drop => {
                assert!(
                    matches!(parsed, Err(wire::Bad::Ignore)),
                    "dropped a query: {msg:?}"
                );
                continue;
            }
            Outcome::Slow => panic!("slow with may_block"),
            Outcome::Rejected => {
                assert!(parsed.is_err());
                assert_eq!(out.len(), 12, "a rejection is a bare header");
            }
            Outcome::Reply => {
                assert!(parsed.is_ok(), "answered a malformed message: {msg:?}");
            }
        }
        assert_eq!(&out[..2], &msg[..2], "reply with another ID");
        assert_eq!(out[2] & 0x80, 0x80, "reply without QR");
        if let Ok(q) = &parsed {
            assert_eq!(
                &out[12..12 + q.question.len()],
                q.question,
                "another question"
            );
            let types = record_types(&out, q.question.len());
            if transport == Transport::Udp {
                assert!(
                    out.len() <= q.udp_limit(),
                    "{} > {}",
                    out.len(),
                    q.udp_limit()
                );
            }
            let lower = q.name.to_ascii_lowercase();
            let local = lower.ends_with(b"\x03lan\x00") || lower.ends_with(b"\x09localhost\x00");
            let is_addr = |t: u16| {
                matches!(
                    t,
                    rtype::A | rtype::AAAA | rtype::A6 | rtype::SVCB | rtype::HTTPS
                )
            };
            for &t in &types {
                match q.qtype {
                    rtype::A | rtype::ANY => assert!(t == rtype::A || t == rtype::OPT),
                    rtype::AAAA => {
                        assert!(
                            t == rtype::OPT || (t == rtype::AAAA && local),
                            "AAAA answered"
                        )
                    }
                    _ => assert!(!is_addr(t), "an address record in a forwarded reply"),
                }
            }
        }
    }
}

/// A forwarder that replies with the query turned into a response plus
/// random records (some of them address records), sometimes mangled.
fn hostile_forwarder(seed: u64) -> Forward {
    let rng = std::sync::Mutex::new(Rng::new(seed));
    Box::new(move |m: &[u8]| {
        let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
        let mut reply = m.to_vec();
        reply[2] |= 0x80;
        let records = rng.below(6) as u16;
        for _ in 0..records {
            let t = [1u16, 28, 15, 16, 65, 5][rng.below(6) as usize];
            let rdlen = rng.below(40) as u16;
            reply.extend_from_slice(&[0xC0, 12]);
            reply.extend_from_slice(&t.to_be_bytes());
            reply.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
            reply.extend_from_slice(&rdlen.to_be_bytes());
            reply.extend((0..rdlen).map(|_| rng.byte()));
        }
        // Spread the records over the three sections.
        let an = rng.below(u64::from(records) + 1) as u16;
        let ns = rng.below(u64::from(records - an) + 1) as u16;
        let ar = records - an - ns;
        reply[6..8].copy_from_slice(&an.to_be_bytes());
        reply[8..10].copy_from_slice(&ns.to_be_bytes());
        let ar0 = u16_at(m, 10);
        reply[10..12].copy_from_slice(&(ar + ar0).to_be_bytes());
        // Client OPT (if any) sits before the added records: move it to the
        // end so the sections stay in order.
        if ar0 > 0 {
            let q = wire::parse_query(m).map(|q| 12 + q.question.len());
            if let Ok(qend) = q {
                let opt: Vec<u8> = reply.drain(qend..m.len()).collect();
                reply.extend_from_slice(&opt);
            }
        }
        for _ in 0..rng.below(3) {
            let i = rng.below(reply.len() as u64) as usize;
            reply[i] = rng.byte();
        }
        if rng.below(4) == 0 {
            let cut = rng.below(reply.len() as u64 + 1) as usize;
            reply.truncate(cut);
        }
        Some(reply)
    })
}

fn valid_queries(rng: &mut Rng) -> Vec<u8> {
    let names = [
        "example.com",
        "A.Example.COM",
        "x.lan",
        "localhost",
        "7.0.18.198.in-addr.arpa",
        "_s._tcp.h.test",
        "",
    ];
    let types = [
        rtype::A,
        rtype::AAAA,
        rtype::HTTPS,
        rtype::PTR,
        rtype::ANY,
        15,
        16,
        52,
    ];
    let name = names[rng.below(names.len() as u64) as usize];
    let t = types[rng.below(types.len() as u64) as usize];
    let edns = match rng.below(3) {
        0 => None,
        1 => Some(512),
        _ => Some(rng.next() as u16),
    };
    query(rng.next() as u16, name, t, edns)
}

fn fuzz_responder() -> Responder {
    // Direct names' other types go to a hostile forwarder too.
    responder_with(Some(hostile_forwarder(99)), Some(hostile_forwarder(98)))
}

#[test]
fn fuzz_random_bytes_never_crash_loop_or_misanswer() {
    let r = fuzz_responder();
    let mut rng = Rng::new(seed(1));
    for i in 0..iterations(50_000) {
        let len = match i % 100 {
            0 => 65_535,
            _ => rng.below(80) as usize,
        };
        let mut m: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        if m.len() >= 12 && rng.below(2) == 0 {
            // Plausible header: a query with one question.
            m[2] &= 0x01;
            m[4..6].copy_from_slice(&[0, 1]);
            m[6..10].fill(0);
            m[10] = 0;
            m[11] &= 1;
        }
        check(&r, &m);
    }
    report("random bytes");
}

#[test]
fn fuzz_truncated_and_mutated_queries_never_misanswer() {
    let r = fuzz_responder();
    let mut rng = Rng::new(seed(2));
    for _ in 0..iterations(20_000) {
        let q = valid_queries(&mut rng);
        for cut in 0..q.len() {
            check(&r, &q[..cut]);
        }
        check(&r, &q);
        let mut m = q.clone();
        for _ in 0..=rng.below(4) {
            let i = rng.below(m.len() as u64) as usize;
            match rng.below(4) {
                0 => m[i] = rng.byte(),
                1 => m[i] ^= 1 << rng.below(8),
                2 => m.insert(i, rng.byte()),
                _ => {
                    m.remove(i);
                }
            }
            if m.is_empty() {
                break;
            }
        }
        check(&r, &m);
    }
    report("truncations and mutations");
}

#[test]
fn fuzz_compression_pointers_in_queries_and_forwarded_replies() {
    let r = fuzz_responder();
    let mut rng = Rng::new(seed(3));
    for _ in 0..iterations(20_000) {
        // A query whose name is, or ends in, a pointer anywhere (itself, the
        // header, past the end).
        let mut m = query(rng.next() as u16, "a.b", rng.below(300) as u16, None)[..12].to_vec();
        for _ in 0..rng.below(3) {
            m.extend_from_slice(&[1, b'a']);
        }
        let target = rng.below(40) as u16;
        m.extend_from_slice(&(0xC000 | target).to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 1]);
        check(&r, &m);
    }
    report("compression pointers");
    // Forwarded replies whose records are owned by pointer loops.
    let looped: Forward = Box::new(|m: &[u8]| {
        let mut reply = m.to_vec();
        reply[2] |= 0x80;
        reply[7] = 1;
        let here = reply.len() as u16;
        reply.extend_from_slice(&(0xC000 | here).to_be_bytes());
        reply.extend_from_slice(&[0, 16, 0, 1, 0, 0, 0, 1, 0, 0]);
        Some(reply)
    });
    let r = responder(Some(looped));
    let q = query(1, "loop.test", 16, None);
    let mut out = Vec::new();
    assert_eq!(
        r.respond(&q, &mut out, Transport::Udp, true),
        Outcome::Reply
    );
    assert_eq!(u16::from(out[3] & 0xF), wire::rcode::SERVFAIL);
}

#[test]
fn fuzz_names_table_under_concurrent_queries_and_pins() {
    // Several threads querying and pinning at once: the table's answers
    // stay consistent (a pinned name keeps its address).
    let r = Arc::new(responder(None));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed(10 + t));
                let mut out = Vec::new();
                for _ in 0..iterations(20_000) / 4 {
                    let name = format!("n{}.test", rng.below(3000));
                    let q = query(1, &name, rtype::A, None);
                    r.respond(&q, &mut out, Transport::Udp, false);
                    let ip = std::net::Ipv4Addr::new(
                        out[out.len() - 4],
                        out[out.len() - 3],
                        out[out.len() - 2],
                        out[out.len() - 1],
                    );
                    if let Some(p) = r.names().pin(ip.into()) {
                        // Still this name, or (if evicted meanwhile) any
                        // other; while pinned it cannot move.
                        let pinned = p.name().to_string();
                        r.respond(
                            &query(2, &pinned, rtype::A, None),
                            &mut out,
                            Transport::Udp,
                            false,
                        );
                        assert_eq!(&out[out.len() - 4..], ip.octets());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
