//! What the relay promises a byte stream: every byte arrives, in order,
//! under thousands of connections with random sizes, directions and
//! half-close points; an EOF never overtakes the bytes before it; a reset
//! reaches the other side as a reset; a reader that stops holds the writer
//! back (TCP flow control), with no unbounded buffering in between.
//!
//! The clients are this test binary run again inside the test cgroup, as
//! the ignored test `client_process` (only processes in the cgroup are
//! redirected). A client runs connection plans (`Plan`) against a
//! `PlanServer` on threads of the test process; both ends check every byte
//! they receive against the stream the plan says the other end sends.
//!
//! `KTPROXY_STRESS_CONNECTIONS` (default 5000) and `KTPROXY_STRESS_SEED`
//! (default: from the clock, printed) set the stress test's size and plans.

mod common;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CLIENT_ENV: &str = "KTPROXY_RELAY_TEST_CLIENT";
/// Bound for a client run of a few connections.
const SHORT: Duration = Duration::from_secs(60);

// ---- the client process -----------------------------------------------------------

/// Not a test: the client process that tests start inside their cgroup
/// (`CLIENT_ENV` = "ADDR BANNER_ADDR WORKERS SEED COUNT" for random plans,
/// or "ADDR BANNER_ADDR 1 plan PLAN_HEX..." for given ones). Prints `done N
/// failed M` and the first failures; exits 1 if any failed.
#[test]
#[ignore = "a helper: run by the other tests as their client process"]
fn client_process() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let all: Vec<&str> = spec.split_whitespace().collect();
    let addrs: [SocketAddr; 2] = [0, 1].map(|i| all[i].parse().expect("server address"));
    let words = &all[1..];
    let workers: usize = words[1].parse().expect("worker count");
    let plans: Vec<Plan> = if words[2] == "plan" {
        words[3..]
            .iter()
            .map(|h| {
                let bytes: Vec<u8> = (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                    .collect();
                Plan::decode(&bytes.try_into().expect("plan size"))
            })
            .collect()
    } else {
        let seed: u64 = words[2].parse().expect("seed");
        let count: u64 = words[3].parse().expect("count");
        (0..count).map(|i| Plan::random(seed, i)).collect()
    };
    let plans = Arc::new(plans);
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|_| {
            let (plans, next, failures) =
                (Arc::clone(&plans), Arc::clone(&next), Arc::clone(&failures));
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                let Some(plan) = plans.get(i) else { return };
                if let Err(e) = client_plan(addrs, *plan) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("client, plan {i} {plan:?}: {e}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    println!(
        "done {} failed {} in {:.1} s",
        plans.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    for f in failures.iter().take(10) {
        println!("{f}");
    }
    if !failures.is_empty() {
        std::process::exit(1);
    }
}

/// Runs the client process in `cg` with `spec`, within `timeout`.
fn run_client(cg: &TestCgroup, spec: &str, timeout: Duration) -> Output {
    let exe = std::env::current_exe().expect("the test binary");
    let mut cmd = cg.command(exe);
    cmd.args([
        "client_process",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(CLIENT_ENV, spec);
    run_within(&mut cmd, timeout)
}

fn plans_spec(server: &PlanServer, plans: &[Plan]) -> String {
    let hex: Vec<String> = plans
        .iter()
        .map(|p| p.encode().iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    format!("{} 1 plan {}", server.addrs(), hex.join(" "))
}

/// Runs `plans` one after another through a ktproxy with `extra`; asserts
/// both ends saw every byte and the log counted them.
fn run_plans(name: &str, plans: &[Plan], extra: &[&str]) {
    require_root();
    let cg = TestCgroup::new(name);
    let server = PlanServer::start();
    let proxy = Proxy::start(&cg, extra);
    let out = run_client(&cg, &plans_spec(&server, plans), SHORT);
    assert!(out.status.success(), "{}", describe(&out));
    let failures = server.wait_done(plans.len() as u64, LOG_TIMEOUT);
    assert!(failures.is_empty(), "{failures:?}");
    let log = wait_closed(&proxy, plans.len());
    assert_byte_counts(&log, plans);
}

/// Waits until the log has `n` connection ends; returns it.
fn wait_closed(proxy: &Proxy, n: usize) -> String {
    let mut log = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        log = proxy.log();
        log.matches("Connection closed").count() + log.matches("Connection reset").count() >= n
    });
    assert!(ok, "not every connection ended:\n{}", tail(&log, 40));
    log
}

/// The close lines count exactly the bytes the plans relayed.
fn assert_byte_counts(log: &str, plans: &[Plan]) {
    let closed: Vec<(u64, u64)> = log
        .lines()
        .filter(|l| l.contains("Connection closed"))
        .filter_map(byte_counts)
        .collect();
    let resets: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Connection reset"))
        .collect();
    assert!(resets.is_empty(), "resets: {resets:?}");
    assert_eq!(closed.len(), plans.len(), "close lines");
    let want = plans.iter().fold((0, 0), |(u, d), p| {
        let (pu, pd) = p.relayed();
        (u + pu, d + pd)
    });
    let got = closed
        .iter()
        .fold((0, 0), |(u, d), (cu, cd)| (u + cu, d + cd));
    assert_eq!(got, want, "bytes (sent, received) in the log");
}

// ---- ends of streams -------------------------------------------------------------------

#[test]
fn an_eof_follows_every_byte_before_it_in_both_directions() {
    // 8 MiB and the FIN right behind them, to a reader that starts 300 ms
    // later: the FIN is seen while most bytes are still in ktproxy's hands.
    // A half-close forwarded then would cut them off.
    let plans = [
        Plan {
            up: 8 << 20,
            key: 3,
            server_pause_ms: 300,
            ..Plan::default()
        },
        Plan {
            down: 8 << 20,
            key: 4,
            client_pause_ms: 300,
            client_close_at: 8 << 20,
            ..Plan::default()
        },
        Plan {
            up: 8 << 20,
            down: 8 << 20,
            key: 5,
            client_pause_ms: 200,
            server_pause_ms: 300,
            ..Plan::default()
        },
    ];
    run_plans("eof_follows", &plans, &[]);
}

#[test]
fn through_socks5_a_server_that_speaks_first_arrives_intact_after_the_handshake() {
    // Through SOCKS5 the dialed socket first carries the handshake, which
    // ktproxy reads itself; the server's banner follows the reply at once.
    // (microsocks closes both ends at the first EOF: no half-close before
    // everything has arrived.)
    let socks = Peer::microsocks(None);
    let url = socks.socks5_url();
    let plans = [
        Plan {
            up: 100_000,
            down: 100_000,
            key: 6,
            banner: true,
            client_close_at: 100_000,
            server_close_at: 100_000,
            ..Plan::default()
        },
        Plan {
            up: 3 << 20,
            down: 1 << 20,
            key: 7,
            client_close_at: 1 << 20,
            server_close_at: 3 << 20,
            ..Plan::default()
        },
    ];
    run_plans("upstream", &plans, &["-u", &url]);
}

/// A server that reads a little, then resets the connection (SO_LINGER 0).
fn reset_after_reading(mut conn: TcpStream) {
    let mut buf = [0u8; 1000];
    let _ = conn.read_exact(&mut buf);
    sys_linger_zero(&conn);
}

fn sys_linger_zero(conn: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: l is a linger struct, as SO_LINGER wants, alive for the call.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(conn),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

#[test]
fn a_reset_from_either_side_reaches_the_other_side_as_a_reset() {
    require_root();
    let cg = TestCgroup::new("reset");
    let proxy = Proxy::start(&cg, &["-v"]);

    // The server resets while the client is still sending.
    let server = TestServer::start("127.0.0.1:0".parse().unwrap(), reset_after_reading, true);
    let py = format!(
        "import socket, sys, time\n\
         s = socket.create_connection(('{ip}', {port}))\n\
         try:\n\
         \x20   for _ in range(2000):\n\
         \x20       s.sendall(b'x' * 65536)\n\
         \x20   print('no reset'); sys.exit(1)\n\
         except ConnectionError:\n\
         \x20   print('reset')\n",
        ip = server.addr().ip(),
        port = server.addr().port()
    );
    let out = cg.run(python(), &["-c", &py], SHORT);
    assert!(out.status.success(), "{}", describe(&out));
    proxy.wait_log("Connection reset", LOG_TIMEOUT);

    // The client resets while the server is still sending.
    let (tx, rx) = mpsc::channel();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let r = (|| -> io::Result<()> {
            for _ in 0..2000 {
                conn.write_all(&[b'y'; 65536])?;
            }
            Ok(())
        })();
        tx.send(r.err().map(|e| e.kind())).unwrap();
    });
    let py = format!(
        "import socket, struct\n\
         s = socket.create_connection(('{ip}', {port}))\n\
         s.recv(1000)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n\
         s.close()\n",
        ip = addr.ip(),
        port = addr.port()
    );
    let out = cg.run(python(), &["-c", &py], SHORT);
    assert!(out.status.success(), "{}", describe(&out));
    let kind = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server was never told the client reset");
    assert!(
        matches!(
            kind,
            Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)
        ),
        "the server saw {kind:?}"
    );
    serving.join().unwrap();
    wait_log_count(&proxy, "Connection reset", 1);
}

// ---- stress ------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Thousands of connections with random sizes, directions and half-close
/// points through one ktproxy: every byte arrives in order, and the log
/// counts every byte.
#[test]
fn stress_random_sizes_directions_and_half_closes() {
    require_root();
    let count = env_u64("KTPROXY_STRESS_CONNECTIONS").unwrap_or(5000);
    let seed = env_u64("KTPROXY_STRESS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let cg = TestCgroup::new("stress");
    let server = PlanServer::start();
    let mut proxy = Proxy::start(&cg, &[]);
    let plans: Vec<Plan> = (0..count).map(|i| Plan::random(seed, i)).collect();
    let (up, down) = plans
        .iter()
        .fold((0, 0), |(u, d), p| (u + p.up, d + p.down));
    eprintln!(
        "stress: seed {seed}, {count} connections, {} MiB up, {} MiB down",
        up >> 20,
        down >> 20
    );
    let started = Instant::now();
    let out = run_client(
        &cg,
        &format!("{} 8 {seed} {count}", server.addrs()),
        Duration::from_secs(600),
    );
    let took = started.elapsed();
    // On failure, what ktproxy said about the connections that ended with a
    // reset, and about those the client names ("from ADDR").
    let early_ends = |failures: &str| {
        let log = proxy.log();
        let mut ids: Vec<String> = log
            .lines()
            .filter(|l| l.contains("Connection reset"))
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('#')))
            .map(String::from)
            .collect();
        for addr in failures.split("from ").skip(1) {
            let addr = addr.split(':').take(2).collect::<Vec<_>>().join(":");
            let needle = format!("Client: {addr}");
            if let Some(l) = log.lines().find(|l| l.ends_with(&needle)) {
                ids.extend(
                    l.split_whitespace()
                        .find(|w| w.starts_with('#'))
                        .map(String::from),
                );
            }
        }
        ids.dedup();
        let mut text = String::new();
        for id in ids.iter().take(5) {
            for l in log.lines().filter(|l| l.contains(&format!("{id} "))) {
                text += l;
                text += "\n";
            }
        }
        text
    };
    if !out.status.success() {
        // The server's view too: one side's failure often causes the other's.
        wait_until(Duration::from_secs(5), || {
            server.tally.lock().unwrap().done >= count
        });
        let failures = server.tally.lock().unwrap().failures.clone();
        let what = format!("{}\nserver failures: {failures:?}", describe(&out));
        panic!("seed {seed}: {what}\nktproxy:\n{}", early_ends(&what));
    }
    let failures = server.wait_done(count, LOG_TIMEOUT);
    assert!(
        failures.is_empty(),
        "seed {seed}: {failures:?}\nktproxy:\n{}",
        early_ends(&format!("{failures:?}"))
    );
    let log = wait_closed(&proxy, count as usize);
    assert_byte_counts(&log, &plans);
    proxy.stop_term();
    eprintln!(
        "stress: {count} connections, 0 mismatches in {:.1} s; {}",
        took.as_secs_f64(),
        stdout(&out).trim()
    );
}

// ---- flow control ----------------------------------------------------------------------------

#[test]
fn a_reader_that_stops_holds_the_writer_back_and_then_gets_every_byte() {
    // The server reads nothing until told. A relay that keeps taking bytes
    // from the client (as an in-kernel sockmap redirect does: the bytes are
    // ACKed and queued without limit, 5.7 GB in 8 s on 6.18) would let any
    // intercepted process pin kernel memory. Here the client must stall
    // after what the socket buffers and one pipe hold, and every byte must
    // arrive once the server reads.
    require_root();
    const BOUND: u64 = 64 << 20;
    let cg = TestCgroup::new("flow_control");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, start) = mpsc::channel::<()>();
    let server = thread::spawn(move || -> io::Result<u64> {
        let (mut conn, _) = listener.accept()?;
        // A test that fails elsewhere drops `go`: read anyway, then end.
        let _ = start.recv();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok(n),
                k => {
                    if buf[..k].iter().any(|&b| b != b'z') {
                        return Err(io::Error::other("a byte other than 'z' arrived"));
                    }
                    n += k as u64;
                }
            }
        }
    });
    let _proxy = Proxy::start(&cg, &[]);
    // Writes until the socket has taken nothing for 0.5 s (stalled), or for
    // at most 10 s; then half-closes and waits for the server's end.
    let script = format!(
        "import socket, time\n\
         s = socket.create_connection(('{}', {}), timeout=30)\n\
         s.setblocking(False)\n\
         chunk, sent, idle, t0 = b'z' * 65536, 0, 0, time.time()\n\
         while idle < 50 and time.time() - t0 < 10 and sent < {BOUND} * 4:\n\
         \x20   try:\n\
         \x20       sent += s.send(chunk); idle = 0\n\
         \x20   except BlockingIOError:\n\
         \x20       idle += 1; time.sleep(0.01)\n\
         print('sent', sent, 'stalled' if idle >= 50 else 'still-taking', flush=True)\n\
         s.setblocking(True)\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n",
        addr.ip(),
        addr.port()
    );
    let mut client = KillOnDrop::spawn(
        cg.command(python())
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped()),
    );
    let mut line = String::new();
    let stdout = client.0.stdout.take().unwrap();
    io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let sent: u64 = match words.as_slice() {
        ["sent", n, _] => n.parse().unwrap(),
        _ => panic!("client said {line:?}"),
    };
    assert!(
        words[2] == "stalled" && sent < BOUND,
        "the writer was not held back: {sent} bytes taken while nobody read ({})",
        words[2]
    );
    go.send(()).unwrap();
    let got = server.join().unwrap().expect("the server's side");
    assert_eq!(got, sent, "bytes the server read, of those the client sent");
    let status = client.0.wait().unwrap();
    assert!(status.success(), "client: {status}");
}
