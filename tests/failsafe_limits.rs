//! End-to-end tests of ktproxy failing safe at its limits (issue 10):
//! logging never stalls the relay, and running out of descriptors hurts only
//! new connections. Stopping is tests/failsafe_stop.rs.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test failsafe_limits

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStderr, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

// ---- helpers ----------------------------------------------------------------------

/// ktproxy (cgroup mode) with its stderr into a pipe, and a reader of that
/// pipe that stops reading after the ready line until `wake()`.
struct PipedProxy {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<u8>>>,
    wake: mpsc::Sender<()>,
    reader: Option<thread::JoinHandle<()>>,
}

impl PipedProxy {
    fn start(cg: &TestCgroup, extra: &[&str]) -> PipedProxy {
        let mut cmd = ktproxy_command(cg, extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        sigterm_when_the_test_dies(&mut cmd);
        let mut child = cmd.spawn().expect("spawning ktproxy");
        let pipe = child.stderr.take().unwrap();
        // One page: the ring in ktproxy, not the pipe, must absorb the lines.
        // SAFETY: fcntl on a pipe this process owns.
        unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        let log = Arc::new(Mutex::new(Vec::new()));
        let (wake, woken) = mpsc::channel();
        let l = Arc::clone(&log);
        let reader = thread::spawn(move || read_pipe(pipe, &l, woken));
        let mut p = PipedProxy {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
            wake,
            reader: Some(reader),
        };
        let mut ready = None;
        wait_until(READY_TIMEOUT, || {
            ready = ready_line(&p.log()).map(String::from);
            ready.is_some() || matches!(p.child.try_wait(), Ok(Some(_)))
        });
        let line = ready.unwrap_or_else(|| panic!("ktproxy not ready:\n{}", p.log()));
        p.addr = parse_listen_addrs(&line).unwrap()[0];
        p
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    fn wake(&self) {
        let _ = self.wake.send(());
    }

    /// Sends `sig`; the exit status and how long the exit took, or None if
    /// it is still running after `timeout`.
    fn stop(&mut self, sig: libc::c_int, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let t = Instant::now();
        signal(self.child.id() as i32, sig);
        wait_child(&mut self.child, timeout).map(|s| (s, t.elapsed()))
    }
}

/// Reads until the ready line, waits for a wake-up, then reads to EOF.
fn read_pipe(mut pipe: ChildStderr, log: &Mutex<Vec<u8>>, woken: mpsc::Receiver<()>) {
    let mut buf = [0u8; 4096];
    let mut asleep = true;
    loop {
        if asleep && String::from_utf8_lossy(&log.lock().unwrap()).contains(ktproxy::logline::READY)
        {
            // Sleeps until woken, or for good once the test drops the sender.
            if woken.recv().is_err() {
                return;
            }
            asleep = false;
        }
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => log.lock().unwrap().extend_from_slice(&buf[..n]),
        }
    }
}

impl Drop for PipedProxy {
    fn drop(&mut self) {
        if self.stop(libc::SIGTERM, STOP_TIMEOUT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let own = own_cgroup_of(self.child.id());
        let _ = remove_cgroup_dir(&own, Duration::from_secs(2));
        self.wake();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if thread::panicking() {
            eprintln!("--- ktproxy log tail ---\n{}\n---", tail(&self.log(), 40));
        }
    }
}

/// `testclient hello ADDR --count N` in `cg`.
fn hello_connections(cg: &TestCgroup, server: SocketAddr, n: usize) -> Output {
    cg.run(
        TESTCLIENT,
        &["hello", &server.to_string(), "--count", &n.to_string()],
        Duration::from_secs(120),
    )
}

// ---- logging never blocks the relay ---------------------------------------------

#[test]
fn a_thousand_connections_succeed_while_the_stderr_reader_sleeps_and_drops_are_counted() {
    require_root();
    const N: usize = 1000;
    let cg = TestCgroup::new("log_reader_sleeps");
    let server = HelloServer::start();
    let mut proxy = PipedProxy::start(&cg, &[]);

    let out = hello_connections(&cg, server.addr(), N);
    assert!(
        out.status.success(),
        "connections failed while stderr was not read: {}",
        describe(&out)
    );
    server.wait_peers(N, LOG_TIMEOUT);

    // The reader wakes up: the drop count comes with the next lines, and the
    // total at exit.
    proxy.wake();
    let reported = wait_until(LOG_TIMEOUT, || {
        proxy
            .log()
            .contains("log line(s) dropped: stderr did not keep up")
    });
    assert!(
        reported,
        "no dropped-lines report:\n{}",
        tail(&proxy.log(), 20)
    );
    let (status, took) = proxy
        .stop(libc::SIGTERM, Duration::from_secs(2))
        .expect("ktproxy still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    eprintln!("exit after SIGTERM took {took:?}");
    if let Some(r) = proxy.reader.take() {
        r.join().unwrap();
    }

    // Every line is accounted for: written, or counted as dropped.
    let log = proxy.log();
    let per_conn = log.lines().filter(|l| l.contains("] #1 ")).count();
    assert!(
        per_conn >= 5,
        "connection #1 logged {per_conn} lines:\n{log}"
    );
    let written = log
        .lines()
        .filter(|l| {
            l.split_once("] #")
                .and_then(|(_, r)| r.split_once(' '))
                .and_then(|(id, _)| id.parse::<usize>().ok())
                .is_some_and(|id| (1..=N).contains(&id))
        })
        .count() as u64;
    let (dropped, total) = ktproxy::logline::dropped_lines(&log);
    let total = total.unwrap_or_else(|| panic!("no total at exit:\n{}", tail(&log, 10)));
    eprintln!("{written} connection lines written, {dropped} dropped, {per_conn} per connection");
    assert!(dropped > 0, "nothing dropped: the test proves nothing");
    assert_eq!(
        dropped,
        total,
        "reports and exit total disagree:\n{}",
        tail(&log, 10)
    );
    assert_eq!(
        written + dropped,
        (per_conn * N) as u64,
        "lines lost without being counted"
    );
}

#[test]
fn stderr_into_a_pipe_nobody_reads_neither_stops_proxying_nor_delays_the_exit() {
    require_root();
    const N: usize = 1000;
    let cg = TestCgroup::new("log_nobody_reads");
    let server = HelloServer::start();
    let mut proxy = PipedProxy::start(&cg, &[]);

    let out = hello_connections(&cg, server.addr(), N);
    assert!(
        out.status.success(),
        "connections failed while nobody read stderr: {}",
        describe(&out)
    );
    // Each went through ktproxy, not direct: the server saw ktproxy's side.
    let peers = server.wait_peers(N, LOG_TIMEOUT);
    assert!(peers.iter().all(|p| p.ip().is_loopback()));
    assert_ne!(proxy.addr.port(), 0);

    let (status, took) = proxy
        .stop(libc::SIGTERM, Duration::from_secs(2))
        .expect("ktproxy still running after SIGTERM, with stderr stuck");
    eprintln!("exit after SIGTERM with stderr stuck took {took:?}");
    assert_eq!(status.code(), Some(0), "{status}");
}

// ---- running out of descriptors -------------------------------------------------

/// The pipes a process has open, e.g. `pipe:[1234]`.
fn pipes_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .filter(|t| t.starts_with("pipe:"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_transfer_in_progress_completes_intact_when_descriptors_run_out() {
    require_root();
    const FIRST: usize = 1 << 20;
    const LEN: usize = 16 << 20;
    let cg = TestCgroup::new("emfile_transfer");
    let server = PacedServer::start(FIRST, LEN);
    let echo = EchoServer::start();
    let proxy = Proxy::start(&cg, &[]);
    let pid = proxy.pid() as u32;
    // Inherited ones (cargo's jobserver), before any relay pipe exists.
    let inherited = pipes_of(pid);

    let client = sink_in_background(&cg, &server);
    server.wait_sent(FIRST);
    proxy.wait_log("Proxy connection established", LOG_TIMEOUT);

    // Room for a few more descriptors only (prlimit on ktproxy), then idle
    // connections that take them all, as a local user can.
    set_fd_limit(pid, fd_count(pid) + 16);
    let holder = hold_connections(&cg, echo.addr(), 40);
    proxy.wait_log("Too many open files", LOG_TIMEOUT);
    // Which of ktproxy's pipes are still pooled then depends on the order of
    // accepts, dials and resets. Pin the state: no descriptor at all can be
    // opened any more, and more connections waiting in the backlog make
    // accept fail, which closes the pooled pipes. Then the transfer's next
    // bytes find no pipe.
    // (Not lower: poll(2) refuses more descriptors than the limit, EINVAL.)
    assert!(fd_count(pid) > 16);
    set_fd_limit(pid, 16);
    let more = hold_connections(&cg, echo.addr(), 10);
    let relay_pipes = || {
        pipes_of(pid)
            .into_iter()
            .filter(|p| !inherited.contains(p))
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(LOG_TIMEOUT, || relay_pipes().is_empty()),
        "ktproxy still holds pipes {:?}",
        relay_pipes()
    );

    server.go();
    let out = client.join().unwrap();
    assert!(
        out.status.success() && stdout(&out).contains(&server.ok_line()),
        "the transfer did not complete intact: {}\nktproxy log:\n{}",
        describe(&out),
        tail(&proxy.log(), 20)
    );
    server.result.recv().unwrap().expect("server side");
    let log = proxy.log();
    assert!(
        log.contains("no pipe for splice (Too many open files): copying through"),
        "the copy path was not taken:\n{}",
        tail(&log, 20)
    );
    drop((holder, more));
}

/// A process in `cg` holding `n` idle connections to `addr` until dropped.
fn hold_connections(cg: &TestCgroup, addr: SocketAddr, n: usize) -> KillOnDrop {
    let script = format!(
        "import socket, sys\n\
         held = [socket.create_connection(('{}', {}), timeout=5) for _ in range({n})]\n\
         sys.stdin.read()\n",
        addr.ip(),
        addr.port()
    );
    KillOnDrop::spawn(
        cg.command(python())
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}
