//! DNS (issue 9): a query, and a load generator for scripts/bench.sh.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ktproxy::error::io_text;

use crate::{check, connect, is_timeout, usage_err, Failure};

const DNS_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn dns_type(s: &str) -> Result<u16, Failure> {
    Ok(match s.to_ascii_uppercase().as_str() {
        "A" => 1,
        "NS" => 2,
        "CNAME" => 5,
        "PTR" => 12,
        "MX" => 15,
        "TXT" => 16,
        "AAAA" => 28,
        "SRV" => 33,
        "HTTPS" => 65,
        "ANY" => 255,
        other => match other.parse() {
            Ok(n) => n,
            Err(_) => return usage_err(format!("invalid --type '{s}'")),
        },
    })
}

/// A query with RD set and one question, no EDNS.
fn dns_message(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, Failure> {
    let mut m = vec![0; 12];
    m[0..2].copy_from_slice(&id.to_be_bytes());
    m[2] = 0x01;
    m[5] = 1;
    for label in name.split('.').filter(|l| !l.is_empty()) {
        if label.len() > 63 {
            return usage_err(format!("label '{label}' is longer than 63 bytes"));
        }
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    Ok(m)
}

/// The RCODE and answers of a reply to `query`, or why it is not one.
fn dns_answers(query: &[u8], reply: &[u8]) -> Result<(u16, Vec<String>), String> {
    let qlen = query.len() - 12;
    if reply.len() < 12 + qlen || reply[..2] != query[..2] || reply[2] & 0x80 == 0 {
        return Err(format!("not a reply to this query: {reply:02x?}"));
    }
    if !reply[12..12 + qlen].eq_ignore_ascii_case(&query[12..]) {
        return Err("reply to another question".into());
    }
    let u16_at = |p: usize| -> Result<u16, String> {
        match reply.get(p..p + 2) {
            Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
            None => Err("truncated reply".into()),
        }
    };
    let rcode = u16::from(reply[3] & 0xF);
    let mut p = 12 + qlen;
    let mut out = Vec::new();
    for _ in 0..u16_at(6)? {
        // Owner: a pointer or labels.
        loop {
            let len = *reply.get(p).ok_or("truncated reply")? as usize;
            if len >= 0xC0 {
                p += 2;
                break;
            }
            p += 1 + len;
            if len == 0 {
                break;
            }
        }
        let t = u16_at(p)?;
        let len = u16_at(p + 8)? as usize;
        let rdata = reply.get(p + 10..p + 10 + len).ok_or("truncated reply")?;
        out.push(match (t, len) {
            (1, 4) => std::net::Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]).to_string(),
            (28, 16) => {
                let b: [u8; 16] = rdata.try_into().map_err(|_| "bad AAAA")?;
                std::net::Ipv6Addr::from(b).to_string()
            }
            (12, _) => {
                let mut labels = Vec::new();
                let mut i = 0;
                while let Some(&l) = rdata.get(i) {
                    if l == 0 || l >= 0xC0 {
                        break;
                    }
                    let text = rdata.get(i + 1..i + 1 + l as usize).ok_or("bad PTR")?;
                    labels.push(String::from_utf8_lossy(text).into_owned());
                    i += 1 + l as usize;
                }
                labels.join(".")
            }
            _ => format!("TYPE{t}"),
        });
        p += 10 + len;
    }
    Ok((rcode, out))
}

pub(crate) fn dns_query(
    addr: SocketAddr,
    name: &str,
    qtype: u16,
    tcp: bool,
) -> Result<String, Failure> {
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let q = dns_message(id, name, qtype)?;
    let deadline = Instant::now() + DNS_TIMEOUT;
    let reply = if tcp {
        let mut s =
            connect(addr, deadline).or_else(|e| check(format!("connect: {}", io_text(&e))))?;
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        s.write_all(&framed)
            .or_else(|e| check(format!("write: {}", io_text(&e))))?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)
            .or_else(|e| check(format!("read: {}", io_text(&e))))?;
        let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut r)
            .or_else(|e| check(format!("read: {}", io_text(&e))))?;
        r
    } else {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = std::net::UdpSocket::bind(bind).or_else(|e| check(io_text(&e)))?;
        s.connect(addr)
            .or_else(|e| check(format!("connect: {}", io_text(&e))))?;
        s.set_read_timeout(Some(DNS_TIMEOUT))
            .or_else(|e| check(io_text(&e)))?;
        s.send(&q)
            .or_else(|e| check(format!("send: {}", io_text(&e))))?;
        let mut buf = vec![0u8; 65_536];
        let n = s
            .recv(&mut buf)
            .or_else(|e| check(format!("no reply: {}", io_text(&e))))?;
        buf.truncate(n);
        buf
    };
    let (rcode, answers) = dns_answers(&q, &reply).or_else(check)?;
    let rcode = match rcode {
        0 => "NOERROR".to_string(),
        1 => "FORMERR".to_string(),
        2 => "SERVFAIL".to_string(),
        3 => "NXDOMAIN".to_string(),
        5 => "REFUSED".to_string(),
        n => n.to_string(),
    };
    Ok(format!("rcode={rcode} answers={}", answers.join(",")))
}

/// UDP load on one socket. Replies are matched by ID; each must be a
/// NOERROR reply to its query with an address.
pub(crate) fn dns_bench(
    addr: SocketAddr,
    secs: u64,
    window: usize,
    names: u64,
) -> Result<String, Failure> {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = std::net::UdpSocket::bind(bind).or_else(|e| check(io_text(&e)))?;
    s.connect(addr)
        .or_else(|e| check(format!("connect: {}", io_text(&e))))?;
    let mut buf = vec![0u8; 65_536];
    let mut next_id: u16 = 1;
    // One query in flight at a time; returns the reply's answers.
    let mut ask = |name: &str, buf: &mut Vec<u8>| -> Result<(Duration, Vec<String>), Failure> {
        next_id = next_id.wrapping_add(1);
        let q = dns_message(next_id, name, 1)?;
        s.set_read_timeout(Some(DNS_TIMEOUT))
            .or_else(|e| check(io_text(&e)))?;
        let t0 = Instant::now();
        s.send(&q)
            .or_else(|e| check(format!("send: {}", io_text(&e))))?;
        loop {
            let n = s
                .recv(buf)
                .or_else(|e| check(format!("no reply for {name}: {}", io_text(&e))))?;
            if buf[..2] != q[..2] {
                continue; // a late reply from the load phase
            }
            let took = t0.elapsed();
            let (rcode, answers) = dns_answers(&q, &buf[..n]).or_else(check)?;
            if rcode != 0 || answers.is_empty() {
                return check(format!("{name}: rcode {rcode}, {} answers", answers.len()));
            }
            return Ok((took, answers));
        }
    };
    // Latency: the name is cached after the first query.
    ask("bench.test", &mut buf)?;
    let mut lat: Vec<Duration> = Vec::with_capacity(2000);
    for _ in 0..if secs > 0 { 2000 } else { 0 } {
        lat.push(ask("bench.test", &mut buf)?.0);
    }
    lat.sort();
    let pct = |p: usize| {
        lat.get(lat.len() * p / 100)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let (p50, p99) = (pct(50), pct(99));

    // Throughput: `window` queries in flight, IDs from a ring.
    let q = dns_message(0, "bench.test", 1)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .or_else(|e| check(io_text(&e)))?;
    let mut pending = vec![false; 65_536];
    let mut in_flight = 0usize;
    let mut id: u16 = 0x8000;
    let (mut done, mut lost) = (0u64, 0u64);
    let mut msg = q.clone();
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        while in_flight < window {
            id = id.wrapping_add(1);
            msg[..2].copy_from_slice(&id.to_be_bytes());
            if pending[id as usize] {
                lost += 1; // never answered, and its ID comes round again
                in_flight -= 1;
            }
            s.send(&msg)
                .or_else(|e| check(format!("send: {}", io_text(&e))))?;
            pending[id as usize] = true;
            in_flight += 1;
        }
        match s.recv(&mut buf) {
            Ok(n) => {
                let rid = u16::from_be_bytes([buf[0], buf[1]]);
                if n < 12 || !pending[rid as usize] {
                    continue;
                }
                msg[..2].copy_from_slice(&buf[..2]);
                let (rcode, answers) = dns_answers(&msg, &buf[..n]).or_else(check)?;
                if rcode != 0 || answers.is_empty() {
                    return check(format!(
                        "load reply: rcode {rcode}, {} answers",
                        answers.len()
                    ));
                }
                pending[rid as usize] = false;
                in_flight -= 1;
                done += 1;
            }
            Err(e) if is_timeout(&e) => {
                lost += in_flight as u64;
                in_flight = 0;
                pending.fill(false);
            }
            Err(e) => return check(format!("recv: {}", io_text(&e))),
        }
    }
    let qps = if secs > 0 {
        done as f64 / start.elapsed().as_secs_f64()
    } else {
        0.0
    };

    // Distinct names: fills the table (memory per name).
    let mut distinct = std::collections::HashSet::new();
    for i in 0..names {
        let (_, answers) = ask(&format!("n{i}.bench.test"), &mut buf)?;
        distinct.insert(answers[0].clone());
    }
    Ok(format!(
        "dns-bench p50_us={p50:.1} p99_us={p99:.1} qps={qps:.0} lost={lost} names={names} distinct={}",
        distinct.len()
    ))
}
