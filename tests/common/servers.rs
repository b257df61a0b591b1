//! Servers for ktproxy to reach: small ones on threads of the test process
//! (outside every test cgroup) that record their peers, and `testserver`
//! child processes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use ktproxy::logline::parse_testserver_listening;

use super::process::{monotonic_secs, read_lossy, scaled, wait_until, KillOnDrop, TempDir};
use super::TESTSERVER;

/// A loopback TCP port nobody listens on (it was free a moment ago).
pub fn unused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

type Handler = fn(TcpStream);

/// A TCP server on a thread of the test process (outside every test
/// cgroup), recording the peer address of every connection it accepts.
pub struct TestServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// Each accepted peer with its CLOCK_MONOTONIC accept time: a client's
    /// ephemeral port is reused soon after, so "this port reached the server"
    /// only means something for connections made after a given moment.
    accepted: Arc<Mutex<Vec<(SocketAddr, f64)>>>,
    stop: Arc<AtomicBool>,
}

impl TestServer {
    /// `per_connection_thread`: serve each connection on its own thread
    /// (for handlers that wait for the client), else on the accept thread.
    pub fn start(bind: SocketAddr, handler: Handler, per_connection_thread: bool) -> TestServer {
        let listener =
            TcpListener::bind(bind).unwrap_or_else(|e| panic!("test server bind {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, a, s) = (Arc::clone(&peers), Arc::clone(&accepted), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if let Ok(peer) = conn.peer_addr() {
                    p.lock().unwrap().push(peer);
                    a.lock().unwrap().push((peer, monotonic_secs()));
                }
                if per_connection_thread {
                    thread::spawn(move || handler(conn));
                } else {
                    handler(conn);
                }
            }
        });
        TestServer {
            addr,
            peers,
            accepted,
            stop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peers of the connections accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Peers of the connections accepted at or after `since` (seconds of
    /// CLOCK_MONOTONIC, as `monotonic_secs` and Python's time.monotonic()).
    pub fn peers_since(&self, since: f64) -> Vec<SocketAddr> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| *t >= since)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Waits up to `timeout` until at least `n` connections were accepted.
    pub fn wait_peers(&self, n: usize, timeout: Duration) -> Vec<SocketAddr> {
        let mut peers = Vec::new();
        if !wait_until(timeout, || {
            peers = self.peers();
            peers.len() >= n
        }) {
            panic!(
                "server {} accepted {} connections within {:?}, expected {n}",
                self.addr,
                peers.len(),
                scaled(timeout)
            );
        }
        peers
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag and closes the socket.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Per-connection sockets of the servers give up after this long (scaled).
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(60);

macro_rules! server_kind {
    ($(#[$doc:meta])* $name:ident, $handler:expr, $threaded:expr) => {
        $(#[$doc])*
        pub struct $name(TestServer);

        impl $name {
            /// On 127.0.0.1, a free port.
            pub fn start() -> $name {
                Self::start_on("127.0.0.1:0".parse().unwrap())
            }

            pub fn start_on(bind: SocketAddr) -> $name {
                $name(TestServer::start(bind, $handler, $threaded))
            }
        }

        impl std::ops::Deref for $name {
            type Target = TestServer;
            fn deref(&self) -> &TestServer {
                &self.0
            }
        }
    };
}

server_kind!(
    /// Writes its own address (`SocketAddr` Display) and "\n", then closes.
    HelloServer,
    hello,
    false
);
server_kind!(
    /// Sends back everything it reads; on EOF, shuts down its writing side.
    EchoServer,
    echo,
    true
);
server_kind!(
    /// Reads until EOF, then answers `got N bytes\n` and closes.
    ReplyAfterEofServer,
    reply_after_eof,
    true
);

/// Starts a HelloServer on `ip`, a free port.
pub fn hello_on(ip: &str) -> HelloServer {
    let ip: IpAddr = ip.parse().expect("an IP address");
    HelloServer::start_on(SocketAddr::new(ip, 0))
}

/// `-p` list naming these servers' ports.
pub fn ports_of(servers: &[&TestServer]) -> String {
    servers
        .iter()
        .map(|s| s.addr().port().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn hello(mut s: TcpStream) {
    if let Ok(local) = s.local_addr() {
        let _ = s.write_all(format!("{local}\n").as_bytes());
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn echo(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(scaled(SERVER_IO_TIMEOUT)));
    let _ = s.set_write_timeout(Some(scaled(SERVER_IO_TIMEOUT)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn reply_after_eof(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(scaled(SERVER_IO_TIMEOUT)));
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = s.write_all(format!("got {total} bytes\n").as_bytes());
    let _ = s.shutdown(Shutdown::Write);
}

/// A `testserver` child process (killed on drop), e.g. `testserver -l
/// 127.0.0.1:0` or the same under `ip netns exec`, with the addresses it
/// announced.
pub struct ServerProcess {
    pub addrs: Vec<SocketAddr>,
    _child: KillOnDrop,
    _dir: TempDir,
}

impl ServerProcess {
    /// `cmd` must print one `testserver listening on ADDR` line per address;
    /// waits up to 10 s for `expected` of them.
    pub fn start(cmd: &mut Command, expected: usize) -> ServerProcess {
        let dir = TempDir::new("server");
        let out = dir.path().join("out");
        let f = File::create(&out).expect("creating the server log");
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        let mut child = KillOnDrop::spawn(cmd);
        let mut addrs = Vec::new();
        let ok = wait_until(Duration::from_secs(10), || {
            addrs = read_lossy(&out)
                .lines()
                .filter_map(parse_testserver_listening)
                .collect();
            addrs.len() >= expected || matches!(child.0.try_wait(), Ok(Some(_)))
        });
        if !ok || addrs.len() < expected {
            panic!("{cmd:?} did not start:\n{}", read_lossy(&out));
        }
        ServerProcess {
            addrs,
            _child: child,
            _dir: dir,
        }
    }

    /// `testserver -l 127.0.0.1:0`.
    pub fn testserver() -> ServerProcess {
        Self::start(Command::new(TESTSERVER).args(["-l", "127.0.0.1:0"]), 1)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }
}

/// Checks that `body` is what the `testserver` at `server` answers.
pub fn assert_body_from(body: &str, server: SocketAddr) {
    assert!(
        body.contains(&format!("Hello from testserver at {server},")),
        "the reply does not come from the testserver at {server}: {body:?}"
    );
}

/// 64-bit FNV-1a, as `testclient sink` prints it.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Test data no shorter pattern repeats in.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect()
}

/// A server for one download: sends the first `first` bytes at once, the
/// rest only after `go()`, then closes. The data's checksum is known.
pub struct PacedServer {
    pub addr: SocketAddr,
    pub len: usize,
    checksum: u64,
    /// Bytes written so far.
    sent: Arc<AtomicU64>,
    go: mpsc::Sender<()>,
    pub result: mpsc::Receiver<io::Result<()>>,
}

impl PacedServer {
    pub fn start(first: usize, len: usize) -> PacedServer {
        let data = pattern(len);
        let checksum = fnv1a(&data);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let (go, go_rx) = mpsc::channel::<()>();
        let (done, result) = mpsc::channel();
        let s = Arc::clone(&sent);
        thread::spawn(move || {
            let r = (|| {
                let (mut c, _) = l.accept()?;
                c.set_write_timeout(Some(scaled(Duration::from_secs(60))))?;
                for (part, wait) in [(&data[..first], false), (&data[first..], true)] {
                    if wait && go_rx.recv_timeout(scaled(Duration::from_secs(60))).is_err() {
                        return Err(io::Error::other("never told to go on"));
                    }
                    for chunk in part.chunks(64 * 1024) {
                        c.write_all(chunk)?;
                        s.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    }
                }
                c.shutdown(Shutdown::Write)
            })();
            let _ = done.send(r);
        });
        PacedServer {
            addr,
            len,
            checksum,
            sent,
            go,
            result,
        }
    }

    pub fn wait_sent(&self, n: usize) {
        assert!(
            wait_until(Duration::from_secs(10), || self.sent.load(Ordering::SeqCst)
                >= n as u64),
            "the server sent only {} of {n} bytes",
            self.sent.load(Ordering::SeqCst)
        );
    }

    pub fn go(&self) {
        let _ = self.go.send(());
    }

    /// What `testclient sink` prints on success.
    pub fn ok_line(&self) -> String {
        format!(
            "ok: received {} bytes, checksum 0x{:016x}",
            self.len, self.checksum
        )
    }
}
