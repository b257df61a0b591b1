//! Connection plans (`Plan`): what one connection sends each way, when each
//! side half-closes, and the byte streams both ends check every byte
//! against; a `PlanServer` on threads of the test process, and the client's
//! side (`client_plan`). tests/relay.rs runs its clients as its own
//! executable's ignored test `client_process`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::process::wait_until;

// ---- connection plans and their byte streams ----------------------------------

/// What one connection does. The client sends `HEADER` bytes (the plan),
/// then `up` bytes of the stream keyed `key`, and half-closes once it has
/// received `client_close_at` of the `down` bytes the server sends (the
/// stream keyed `!key`); the server half-closes once it has sent them and
/// received `server_close_at` bytes. Either side may wait before it starts
/// reading, and with `banner` the server speaks first: 8 bytes before it
/// reads the plan, which the client waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Plan {
    pub up: u64,
    pub down: u64,
    pub key: u64,
    pub client_close_at: u64,
    pub server_close_at: u64,
    pub client_pause_ms: u64,
    pub server_pause_ms: u64,
    pub banner: bool,
}

const HEADER: usize = 8 * 8;
const BANNER: &[u8; 8] = b"banner!\n";

impl Plan {
    pub fn encode(&self) -> [u8; HEADER] {
        let words = [
            self.up,
            self.down,
            self.key,
            self.client_close_at,
            self.server_close_at,
            self.client_pause_ms,
            self.server_pause_ms,
            u64::from(self.banner),
        ];
        let mut b = [0u8; HEADER];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    pub fn decode(b: &[u8; HEADER]) -> Plan {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        Plan {
            up: w(0),
            down: w(1),
            key: w(2),
            client_close_at: w(3),
            server_close_at: w(4),
            client_pause_ms: w(5),
            server_pause_ms: w(6),
            banner: w(7) != 0,
        }
    }

    /// Bytes ktproxy relays client → server and server → client.
    pub fn relayed(&self) -> (u64, u64) {
        let banner = if self.banner { BANNER.len() as u64 } else { 0 };
        (HEADER as u64 + self.up, banner + self.down)
    }

    /// Plan `i` of the stress test with `seed`: a random direction mix
    /// (upload only, download only, both), sizes from 0 B to 8 MiB spread
    /// evenly over their orders of magnitude, and half-closes at random
    /// points of the other direction.
    pub fn random(seed: u64, i: u64) -> Plan {
        let mut rng = XorShift(seed ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for _ in 0..4 {
            rng.next();
        }
        let size = |rng: &mut XorShift| {
            // One in 16 is empty; the rest log-uniform over 1 B ..= 8 MiB.
            if rng.below(16) == 0 {
                0
            } else {
                let bits = rng.below(24);
                (1u64 << bits) + rng.below(1u64 << bits)
            }
        };
        let (up, down) = match rng.below(3) {
            0 => (size(&mut rng), 0),
            1 => (0, size(&mut rng)),
            _ => (size(&mut rng), size(&mut rng)),
        };
        Plan {
            up,
            down,
            key: rng.next(),
            client_close_at: rng.below(down + 1),
            server_close_at: rng.below(up + 1),
            client_pause_ms: 0,
            server_pause_ms: 0,
            banner: rng.below(8) == 0,
        }
    }
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// The bytes of one direction: xorshift64 words, little-endian, from `key`.
struct Stream {
    rng: XorShift,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    fn new(key: u64) -> Stream {
        Stream {
            rng: XorShift(key | 1),
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.used < 8 {
            out[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut chunks = out[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.rng.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.word = self.rng.next().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }
}

/// Sends `n` bytes of `stream`.
fn send_stream(mut to: &TcpStream, stream: &mut Stream, n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        stream.fill(&mut buf[..k]);
        to.write_all(&buf[..k])?;
        left -= k as u64;
    }
    Ok(())
}

/// Reads to EOF, checking every byte against the stream keyed `key`;
/// returns how many came. `progress` is told the count as it grows.
fn check_stream(
    mut from: &TcpStream,
    key: u64,
    mut progress: impl FnMut(u64),
) -> Result<u64, String> {
    let mut stream = Stream::new(key);
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read after {total} bytes: {e}")),
        };
        stream.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let at = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let pos = total + at as u64;
            return Err(format!(
                "byte {pos} differs from the stream (byte {at} of a {n}-byte read); {}",
                locate(key, &buf[at..n], pos)
            ));
        }
        total += n as u64;
        progress(total);
    }
}

/// Where in the stream keyed `key` the bytes that arrived at `pos` come
/// from: tells a gap from a repeat from garbage.
fn locate(key: u64, got: &[u8], pos: u64) -> String {
    let probe = &got[..got.len().min(32)];
    if probe.len() < 16 {
        return format!("{} bytes too few to place", probe.len());
    }
    let mut stream = Stream::new(key);
    let span = pos + (64 << 20);
    let mut window = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    let mut start = 0u64;
    while start < span {
        stream.fill(&mut window);
        let mut hay = std::mem::take(&mut carry);
        let hay_start = start - hay.len() as u64;
        hay.extend_from_slice(&window);
        if let Some(i) = hay.windows(probe.len()).position(|w| w == probe) {
            let from = hay_start + i as u64;
            return format!(
                "they are the stream's bytes from {from} ({:+})",
                from as i64 - pos as i64
            );
        }
        carry = hay[hay.len() - (probe.len() - 1)..].to_vec();
        start += window.len() as u64;
    }
    format!("they are not in the stream's first {span} bytes: {probe:02x?}")
}

// ---- the server: plans on threads of the test process ----------------------------

#[derive(Default)]
pub struct Tally {
    pub done: u64,
    pub failures: Vec<String>,
}

/// Serves plans, one thread per connection, and keeps the tally: on `addr`
/// the client speaks first, on `banner_addr` the server.
pub struct PlanServer {
    addr: SocketAddr,
    banner_addr: SocketAddr,
    pub tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
}

impl PlanServer {
    pub fn start() -> PlanServer {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let [addr, banner_addr] = [false, true].map(|banner| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("binding the plan server");
            let addr = listener.local_addr().unwrap();
            let (t, s) = (Arc::clone(&tally), Arc::clone(&stop));
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let t = Arc::clone(&t);
                    thread::spawn(move || {
                        let r = serve_plan(&conn, banner);
                        let mut t = t.lock().unwrap();
                        t.done += 1;
                        if let Err(e) = r {
                            t.failures.push(e);
                        }
                    });
                }
            });
            addr
        });
        PlanServer {
            addr,
            banner_addr,
            tally,
            stop,
        }
    }

    /// The client's view: "ADDR BANNER_ADDR".
    pub fn addrs(&self) -> String {
        format!("{} {}", self.addr, self.banner_addr)
    }

    /// Waits until `n` connections are done; returns their failures.
    pub fn wait_done(&self, n: u64, timeout: Duration) -> Vec<String> {
        let ok = wait_until(timeout, || self.tally.lock().unwrap().done >= n);
        let t = self.tally.lock().unwrap();
        assert!(ok, "the server finished {} of {n} connections", t.done);
        t.failures.clone()
    }
}

impl Drop for PlanServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        let _ = TcpStream::connect(self.banner_addr);
    }
}

pub fn serve_plan(conn: &TcpStream, banner_first: bool) -> Result<(), String> {
    let mut c = conn;
    let peer = conn.peer_addr().map_err(|e| e.to_string())?;
    let fail = |what: String| format!("server, connection from {peer}: {what}");
    let mut header = [0u8; HEADER];
    if banner_first {
        c.write_all(BANNER)
            .map_err(|e| fail(format!("banner: {e}")))?;
    }
    c.read_exact(&mut header)
        .map_err(|e| fail(format!("reading the plan: {e}")))?;
    let plan = Plan::decode(&header);
    if plan.banner != banner_first {
        return Err(fail(format!(
            "banner expected {}, sent {banner_first}",
            plan.banner
        )));
    }
    let (got, sent) = run_end(
        conn,
        (!plan.key, plan.down),
        (plan.key, plan.server_close_at),
        plan.server_pause_ms,
    );
    let got = got.map_err(|e| fail(format!("{plan:?}: {e}")))?;
    sent.map_err(fail)?;
    if got != plan.up {
        return Err(fail(format!("{got} bytes arrived, {} were sent", plan.up)));
    }
    Ok(())
}

// ---- the client's side of a plan -------------------------------------------------

/// Runs one plan against `addrs` (plan first, banner first).
pub fn client_plan(addrs: [SocketAddr; 2], plan: Plan) -> Result<(), String> {
    let addr = addrs[usize::from(plan.banner)];
    let conn = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    // ktproxy's log names the connection by this address.
    let local = conn.local_addr().map_err(|e| e.to_string())?;
    client_plan_on(conn, plan).map_err(|e| format!("from {local}: {e}"))
}

fn client_plan_on(conn: TcpStream, plan: Plan) -> Result<(), String> {
    let mut c = &conn;
    if plan.banner {
        let mut b = [0u8; 8];
        c.read_exact(&mut b)
            .map_err(|e| format!("reading the banner: {e}"))?;
        if &b != BANNER {
            return Err(format!("banner {b:?}"));
        }
    }
    c.write_all(&plan.encode())
        .map_err(|e| format!("sending the plan: {e}"))?;
    let (got, sent) = run_end(
        &conn,
        (plan.key, plan.up),
        (!plan.key, plan.client_close_at),
        plan.client_pause_ms,
    );
    let got = got?;
    sent?;
    if got != plan.down {
        return Err(format!("{got} bytes arrived, {} were sent", plan.down));
    }
    Ok(())
}

/// One end of a plan once the plan is exchanged: a thread sends `out.1`
/// bytes of the stream keyed `out.0` and half-closes once `inbound.1`
/// bytes have arrived; this one, after `pause_ms`, reads and checks the
/// stream keyed `inbound.0`. Returns (bytes received, the sending side).
fn run_end(
    conn: &TcpStream,
    out: (u64, u64),
    inbound: (u64, u64),
    pause_ms: u64,
) -> (Result<u64, String>, Result<(), String>) {
    let (tx, rx) = mpsc::channel::<()>();
    let received = Arc::new(AtomicU64::new(0));
    let writer = match conn.try_clone() {
        Ok(conn) => {
            let received = Arc::clone(&received);
            thread::spawn(move || -> Result<(), String> {
                let (key, n) = out;
                send_stream(&conn, &mut Stream::new(key), n)
                    .map_err(|e| format!("sending {n} bytes: {e}"))?;
                while received.load(Ordering::SeqCst) < inbound.1 {
                    if rx.recv().is_err() {
                        break;
                    }
                }
                conn.shutdown(Shutdown::Write)
                    .map_err(|e| format!("shutdown: {e}"))
            })
        }
        Err(e) => return (Err(e.to_string()), Ok(())),
    };
    thread::sleep(Duration::from_millis(pause_ms));
    let got = check_stream(conn, inbound.0, |n| {
        received.store(n, Ordering::SeqCst);
        let _ = tx.send(());
    });
    drop(tx);
    let sent = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()));
    (got, sent)
}
