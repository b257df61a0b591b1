//! Client side of ktproxy's end-to-end tests.
//!
//! Tests run it inside a dedicated cgroup so that its connect() calls are
//! redirected, then check its one-line summary and exit status:
//! 0 = every check passed, 1 = a check failed (reason on stderr),
//! 2 = bad usage.
//!
//! # Test data (`echo`)
//!
//! The bytes sent are an xorshift64 stream (shifts 13, 7, 17) with the state
//! seeded to [`SEED`](data::SEED). Each step updates the state first, then
//! emits its 8 bytes little-endian; the stream is cut after N bytes.
//! Checksums (`echo`, `sink`) are 64-bit FNV-1a over the bytes: offset basis
//! 0xcbf29ce484222325, prime 0x100000001b3. See [`DataStream`] and [`Fnv1a`]
//! (data.rs).

mod data;
mod dns;

use std::fmt::Display;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::exit;
use std::thread;
use std::time::{Duration, Instant};

use ktproxy::error::io_text;
use ktproxy::logline;

use data::{checksum_of_stream, DataStream, Fnv1a};
use dns::{dns_bench, dns_query, dns_type};

const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// The hello servers answer with one short line; anything longer is wrong.
const HELLO_MAX: usize = 64 * 1024;
const CHUNK: usize = 64 * 1024;

const USAGE: &str = "\
Usage: testclient COMMAND ADDR:PORT [options]

Commands:
  hello ADDR:PORT [--count N] [--alt ADDR2:PORT2]
      N sequential connections (default 1), odd ones to ADDR2 if given; each
      reply must contain the dialed address.
  echo ADDR:PORT --bytes N
      send N bytes of test data, half-close, expect the same bytes back.
  sink ADDR:PORT --bytes N
      read until EOF, expect N bytes, print their checksum.
  expect-reset ADDR:PORT [--within MS]
      expect refusal, reset or EOF without data within MS ms (default 3000).
  peer ADDR:PORT
      print the peer and local addresses of the connected socket.
  dns ADDR:PORT --name NAME [--type TYPE] [--tcp]
      one DNS query (TYPE: A, AAAA, PTR, MX, TXT, HTTPS or a number; default
      A) over UDP or TCP; prints 'rcode=R answers=X,Y' (addresses, PTR names,
      TYPEnn for others). Fails without a matching reply within 5 s.
  dns-bench ADDR:PORT [--seconds S] [--window W] [--names N]
      UDP DNS load: 2000 sequential A queries for one name (latency), then S
      seconds (default 2) with W queries in flight (default 16; queries/s),
      then N distinct names (default 0); --seconds 0: only the names. Prints 'dns-bench p50_us=.. p99_us=..
      qps=.. lost=.. names=.. distinct=..'. Fails if any reply is wrong.

Exit status: 0 ok, 1 a check failed, 2 bad usage.
";

enum Failure {
    Usage(String),
    Check(String),
}

fn check<T>(msg: impl Display) -> Result<T, Failure> {
    Err(Failure::Check(msg.to_string()))
}

fn usage_err<T>(msg: impl Display) -> Result<T, Failure> {
    Err(Failure::Usage(msg.to_string()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(summary) => println!("{summary}"),
        Err(Failure::Usage(msg)) => {
            eprintln!("testclient: {msg}");
            exit(2)
        }
        Err(Failure::Check(msg)) => {
            eprintln!("testclient: {msg}");
            exit(1)
        }
    }
}

fn run(args: &[String]) -> Result<String, Failure> {
    let Some(cmd) = args.first() else {
        return usage_err("missing command (see --help)");
    };
    if matches!(cmd.as_str(), "-h" | "--help" | "help") {
        return Ok(USAGE.trim_end().to_string());
    }
    let mut opts = getopts::Options::new();
    match cmd.as_str() {
        "hello" => {
            opts.optopt("", "count", "", "N");
            opts.optopt("", "alt", "", "ADDR:PORT");
        }
        "echo" | "sink" => {
            opts.reqopt("", "bytes", "", "N");
        }
        "expect-reset" => {
            opts.optopt("", "within", "", "MS");
        }
        "peer" => {}
        "dns" => {
            opts.reqopt("", "name", "", "NAME");
            opts.optopt("", "type", "", "TYPE");
            opts.optflag("", "tcp", "");
        }
        "dns-bench" => {
            opts.optopt("", "seconds", "", "S");
            opts.optopt("", "window", "", "W");
            opts.optopt("", "names", "", "N");
        }
        _ => return usage_err(format!("unknown command '{cmd}' (see --help)")),
    }
    opts.optflag("h", "help", "");
    let m = match opts.parse(&args[1..]) {
        Ok(m) => m,
        Err(e) => return usage_err(format!("{cmd}: {e}")),
    };
    if m.opt_present("h") {
        return Ok(USAGE.trim_end().to_string());
    }
    let addr = match m.free.as_slice() {
        [a] => parse_addr(a)?,
        [] => return usage_err(format!("{cmd}: missing ADDR:PORT")),
        [_, extra, ..] => return usage_err(format!("{cmd}: unexpected argument '{extra}'")),
    };
    match cmd.as_str() {
        "hello" => {
            let count = parse_num(&m, "count")?.unwrap_or(1);
            if count == 0 {
                return usage_err("invalid --count '0': expected a positive integer");
            }
            let alt = m.opt_str("alt").map(|a| parse_addr(&a)).transpose()?;
            hello(addr, alt, count)
        }
        "echo" => echo(addr, parse_num(&m, "bytes")?.unwrap_or(0)),
        "sink" => sink(addr, parse_num(&m, "bytes")?.unwrap_or(0)),
        "expect-reset" => {
            let ms = parse_num(&m, "within")?.unwrap_or(3000);
            // The cap keeps Instant arithmetic far from overflowing.
            if !(1..=3_600_000).contains(&ms) {
                return usage_err(format!("invalid --within '{ms}': expected 1 to 3600000"));
            }
            expect_reset(addr, Duration::from_millis(ms))
        }
        "dns" => {
            let name = m.opt_str("name").unwrap_or_default();
            let qtype = dns_type(m.opt_str("type").as_deref().unwrap_or("A"))?;
            dns_query(addr, &name, qtype, m.opt_present("tcp"))
        }
        "dns-bench" => {
            let secs = parse_num(&m, "seconds")?.unwrap_or(2);
            let window = parse_num(&m, "window")?.unwrap_or(16);
            if secs > 600 || !(1..=1024).contains(&window) {
                return usage_err("dns-bench: --seconds 0-600, --window 1-1024");
            }
            let names = parse_num(&m, "names")?.unwrap_or(0);
            dns_bench(addr, secs, window as usize, names)
        }
        _ => peer(addr),
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, Failure> {
    s.parse()
        .or_else(|_| usage_err(format!("invalid address '{s}': expected ADDR:PORT")))
}

fn parse_num(m: &getopts::Matches, name: &str) -> Result<Option<u64>, Failure> {
    match m.opt_str(name) {
        None => Ok(None),
        Some(s) => match s.parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => usage_err(format!(
                "invalid --{name} '{s}': expected a non-negative integer"
            )),
        },
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Time left before `deadline`, or None once it has passed. Socket timeouts
/// must not be zero (std rejects that), hence the Option.
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn connect(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    let left = remaining(deadline).ok_or(ErrorKind::TimedOut)?;
    let s = TcpStream::connect_timeout(&addr, left)?;
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))?;
    Ok(s)
}

/// Reads until EOF, feeding every chunk to `sink`. Fails on timeout, so
/// every call is bounded by `deadline`.
fn read_to_eof(
    s: &mut TcpStream,
    deadline: Instant,
    mut sink: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let left = remaining(deadline).ok_or("timed out waiting for EOF")?;
        s.set_read_timeout(Some(left)).map_err(|e| io_text(&e))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => sink(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err("timed out waiting for EOF".into()),
            Err(e) => return Err(format!("read: {}", io_text(&e))),
        }
    }
}

fn hello(addr: SocketAddr, alt: Option<SocketAddr>, count: u64) -> Result<String, Failure> {
    let start = Instant::now();
    for i in 0..count {
        let dialed = match alt {
            Some(a) if i % 2 == 1 => a,
            _ => addr,
        };
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let mut s = match connect(dialed, deadline) {
            Ok(s) => s,
            Err(e) => return check(format!("connection {i} to {dialed}: {}", io_text(&e))),
        };
        let mut got = Vec::new();
        let read = read_to_eof(&mut s, deadline, |b| {
            got.extend_from_slice(b);
            if got.len() > HELLO_MAX {
                return Err(format!("more than {HELLO_MAX} bytes"));
            }
            Ok(())
        });
        let text = String::from_utf8_lossy(&got);
        if let Err(e) = read {
            return check(format!("connection {i} to {dialed}: {e} (read {text:?})"));
        }
        let want = dialed.to_string();
        if !contains_addr(&text, &want) {
            return check(format!(
                "connection {i} to {dialed}: reply does not name {want}: read {text:?}"
            ));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "hello: {count} connections in {secs:.3} s ({:.0}/s)",
        count as f64 / secs.max(1e-9)
    );
    Ok(format!(
        "ok: {count} connections, all answered by the dialed server"
    ))
}

/// Whether `addr` occurs in `text` as a whole token, so that dialing
/// 127.0.0.1:900 is not "confirmed" by a reply from 127.0.0.1:9001.
fn contains_addr(text: &str, addr: &str) -> bool {
    let addr_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']');
    text.match_indices(addr).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + addr.len()..].chars().next();
        !before.is_some_and(addr_char) && !after.is_some_and(addr_char)
    })
}

fn echo(addr: SocketAddr, bytes: u64) -> Result<String, Failure> {
    let deadline = Instant::now() + STREAM_TIMEOUT;
    let mut s = connect(addr, deadline)
        .or_else(|e| check(format!("connect to {addr}: {}", io_text(&e))))?;
    let mut w = s
        .try_clone()
        .or_else(|e| check(format!("dup socket: {}", io_text(&e))))?;
    let writer = thread::spawn(move || -> Result<(), String> {
        let mut data = DataStream::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            data.fill(&mut buf[..n]);
            // The socket's write timeout (set to the deadline) bounds this.
            w.write_all(&buf[..n])
                .map_err(|e| format!("write after {} bytes: {}", bytes - left, io_text(&e)))?;
            left -= n as u64;
        }
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown(Write): {}", io_text(&e)))
    });

    let mut expected = DataStream::new();
    let mut want = vec![0u8; CHUNK];
    let mut sum = Fnv1a::new();
    let mut got: u64 = 0;
    let read = read_to_eof(&mut s, deadline, |b| {
        if got + b.len() as u64 > bytes {
            return Err(format!("received more than the {bytes} bytes sent"));
        }
        expected.fill(&mut want[..b.len()]);
        if let Some(off) = b.iter().zip(&want).position(|(x, y)| x != y) {
            return Err(format!("data differs at byte offset {}", got + off as u64));
        }
        sum.update(b);
        got += b.len() as u64;
        Ok(())
    });
    // Unblocks the writer if we stopped reading early, so join() is bounded.
    if read.is_err() {
        let _ = s.shutdown(Shutdown::Both);
    }
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err("writer thread panicked".into()));
    if let Err(e) = read {
        return check(format!("echo via {addr}: {e} (after {got} bytes)"));
    }
    if let Err(e) = wrote {
        return check(format!("echo via {addr}: {e}"));
    }
    let sent = checksum_of_stream(bytes);
    if got != bytes {
        return check(format!(
            "echo via {addr}: received {got} bytes, sent {bytes}"
        ));
    }
    if sum.value() != sent {
        return check(format!(
            "echo via {addr}: checksum 0x{:016x}, sent 0x{sent:016x}",
            sum.value()
        ));
    }
    Ok(format!("ok: echoed {bytes} bytes, checksum 0x{sent:016x}"))
}

fn sink(addr: SocketAddr, bytes: u64) -> Result<String, Failure> {
    let deadline = Instant::now() + STREAM_TIMEOUT;
    let mut s = connect(addr, deadline)
        .or_else(|e| check(format!("connect to {addr}: {}", io_text(&e))))?;
    let mut sum = Fnv1a::new();
    let mut got: u64 = 0;
    let read = read_to_eof(&mut s, deadline, |b| {
        sum.update(b);
        got += b.len() as u64;
        Ok(())
    });
    if let Err(e) = read {
        return check(format!("sink from {addr}: {e} (after {got} bytes)"));
    }
    if got != bytes {
        return check(format!(
            "sink from {addr}: received {got} bytes (checksum 0x{:016x}), expected {bytes}",
            sum.value()
        ));
    }
    Ok(format!(
        "ok: received {got} bytes, checksum 0x{:016x}",
        sum.value()
    ))
}

fn expect_reset(addr: SocketAddr, within: Duration) -> Result<String, Failure> {
    let start = Instant::now();
    let deadline = start + within;
    let ms = || start.elapsed().as_millis();
    let limit = within.as_millis();
    let mut s = match connect(addr, deadline) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            return Ok(format!("ok: connection refused after {} ms", ms()))
        }
        // A proxy may accept and reset so quickly that connect() itself
        // sees the reset.
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            return Ok(format!(
                "ok: connection reset during connect after {} ms",
                ms()
            ))
        }
        Err(e) if is_timeout(&e) => {
            return check(format!("connect to {addr} still pending after {limit} ms"))
        }
        Err(e) => return check(format!("connect to {addr}: {}", io_text(&e))),
    };
    let still_open = || check(format!("{addr}: connection still open after {limit} ms"));
    let mut buf = [0u8; 512];
    loop {
        let Some(left) = remaining(deadline) else {
            return still_open();
        };
        if let Err(e) = s.set_read_timeout(Some(left)) {
            return check(format!("{addr}: setsockopt: {}", io_text(&e)));
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(format!("ok: connection closed (EOF) after {} ms", ms())),
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                return check(format!(
                    "{addr}: received {n} bytes instead of a reset: {text:?}"
                ));
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Ok(format!("ok: connection reset after {} ms", ms()))
            }
            Err(e) if is_timeout(&e) => return still_open(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return check(format!("{addr}: read: {}", io_text(&e))),
        }
    }
}

fn peer(addr: SocketAddr) -> Result<String, Failure> {
    let s = connect(addr, Instant::now() + HELLO_TIMEOUT)
        .or_else(|e| check(format!("connect to {addr}: {}", io_text(&e))))?;
    let p = s
        .peer_addr()
        .or_else(|e| check(format!("getpeername: {}", io_text(&e))))?;
    let l = s
        .local_addr()
        .or_else(|e| check(format!("getsockname: {}", io_text(&e))))?;
    Ok(logline::peer_line(p, l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_must_be_a_whole_token() {
        let at = |t| contains_addr(t, "127.0.0.1:900");
        assert!(at("127.0.0.1:900"));
        assert!(at("served by 127.0.0.1:900, bye\n"));
        assert!(!at("127.0.0.1:9001"));
        assert!(!at("227.0.0.1:900"));
        assert!(contains_addr("at [::1]:80, you", "[::1]:80"));
        assert!(!contains_addr("[::1]:8080", "[::1]:80"));
    }
}
