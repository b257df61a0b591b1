//! Sockets the redirect cannot serve (issue 10): device-bound sockets and
//! the kernel's own go direct (and are counted); a socket that connects
//! again keeps no stale destination; a connection that dies in the accept
//! queue cannot hand its tuple's destination to the next one.

mod common;

use std::fs;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// Connects from a socket bound to a device (SO_BINDTODEVICE) to HOST PORT
/// with a 3 s timeout and prints the reply, or `error ERRNO`.
const BOUND_CLIENT: &str = r#"
import socket, sys
host, port, dev = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
s.settimeout(3)
if dev:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
try:
    s.connect((host, port))
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    print(data.decode().strip())
except OSError as e:
    print("error", e.errno if e.errno is not None else e)
"#;

/// A socket bound to a device cannot reach the loopback listener: it goes
/// direct (counted as bound_to_device) instead of timing out in a redirect.
/// The same destination from an unbound socket is intercepted.
#[test]
fn a_socket_bound_to_a_device_goes_direct_and_is_counted() {
    require_root();
    let cg = TestCgroup::new("bound_dev");
    let ns = NetNs::new();
    let n = ns.name();
    ip(&[
        "-n", n, "link", "add", "ktp0", "type", "veth", "peer", "name", "ktp1",
    ]);
    ip(&["-n", n, "addr", "add", "10.213.0.1/24", "dev", "ktp0"]);
    ip(&["-n", n, "link", "set", "ktp0", "up"]);
    ip(&["-n", n, "link", "set", "ktp1", "up"]);
    let server = ServerProcess::start(ns.command(TESTSERVER).args(["-l", "10.213.0.1:0"]), 1);
    let mut proxy = Proxy::start_command(&cg, ktproxy_in_netns(&cg, &ns, &["-l", "127.0.0.1:0"]));
    let connect = |dev: &str| {
        let mut cmd = cg.command("ip");
        cmd.args(ns.exec_args(python())).args([
            "-c",
            BOUND_CLIENT,
            &server.addr().ip().to_string(),
            &server.addr().port().to_string(),
            dev,
        ]);
        let out = run_within(&mut cmd, CLIENT_TIMEOUT);
        assert!(out.status.success(), "{}", describe(&out));
        stdout(&out)
    };

    let bound = connect("ktp0");
    assert_body_from(&bound, server.addr());
    assert!(
        !proxy.log().contains("New Connection"),
        "the device-bound socket was redirected:\n{}",
        proxy.log()
    );
    let unbound = connect("");
    assert_body_from(&unbound, server.addr());
    proxy.wait_log(
        &format!("Connecting to target {}", server.addr()),
        LOG_TIMEOUT,
    );

    proxy.stop_term();
    let counters = kernel_counters(&proxy.log()).expect("counters");
    assert_eq!(counters["bound_to_device"], 1, "{counters:?}");
    assert_eq!(counters["redirected"], 1, "{counters:?}");
}

/// An MPTCP client: its connection goes out through a subflow, a kernel
/// socket (sock_create_kern) made in the client's cgroup. The hook tells
/// kernel sockets apart (sk_kern_sock, read through BTF) and keeps
/// intercepting those that carry a user's MPTCP socket (is_mptcp). That is
/// the part of the kernel-socket test this machine can run: no NFS, SMB or
/// NVMe/TCP client is built into its kernel (see the README for the rest).
#[test]
fn an_mptcp_subflow_is_recognised_as_a_kernel_socket_and_stays_intercepted() {
    require_root();
    let enabled = fs::read_to_string("/proc/sys/net/mptcp/enabled").unwrap_or_default();
    assert_eq!(
        enabled.trim(),
        "1",
        "this test needs MPTCP (net.mptcp.enabled=1)"
    );
    let cg = TestCgroup::new("mptcp");
    let server = HelloServer::start();
    let mut proxy = Proxy::start(&cg, &[]);
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)\n\
         s.settimeout(5)\n\
         s.connect(('{}', {}))\n\
         print(s.getsockname()[1], s.recv(100).decode().strip())\n",
        server.addr().ip(),
        server.addr().port()
    );
    let out = cg.run(python(), &["-c", &script], CLIENT_TIMEOUT);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    let (port, reply) = text.trim().split_once(' ').expect("PORT REPLY");
    assert_eq!(reply, server.addr().to_string());
    let local = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        !server.peers().contains(&local),
        "the MPTCP connection went direct"
    );
    let before = probe(&cg, server.addr(), 0.0, 0.0, 5.0);
    assert!(before[0].proxied_to(&server));

    proxy.stop_term();
    let counters = kernel_counters(&proxy.log()).expect("counters");
    assert_eq!(counters["mptcp_subflow"], 1, "{counters:?}");
    assert_eq!(counters["kernel_socket"], 0, "{counters:?}");
    assert_eq!(counters["redirected"], 2, "{counters:?}");
}

/// A v4-mapped connect on an IPV6_V6ONLY socket is redirected by connect6,
/// then fails in the kernel (ENETUNREACH); the same socket then connects
/// to an IPv6 server that is not intercepted (no IPv6 listener). Its
/// getpeername must be that server, not the first destination.
#[test]
fn a_socket_connecting_again_after_a_failed_connect_keeps_no_stale_destination() {
    require_root();
    let cg = TestCgroup::new("stale_dst");
    let first = HelloServer::start();
    let second = hello_on("::1");
    let _proxy = Proxy::start(&cg, &[]);
    let script = format!(
        "import errno, socket\n\
         s = socket.socket(socket.AF_INET6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n\
         s.settimeout(5)\n\
         try:\n\
         \x20   s.connect(('::ffff:127.0.0.1', {}))\n\
         \x20   print('first connected')\n\
         except OSError as e:\n\
         \x20   print('first', errno.errorcode.get(e.errno, e.errno))\n\
         s.connect(('::1', {}))\n\
         print('peer', s.getpeername()[:2], 'reply', s.recv(100).decode().strip())\n",
        first.addr().port(),
        second.addr().port()
    );
    let out = cg.run(python(), &["-c", &script], CLIENT_TIMEOUT);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("first ENETUNREACH"), "{text}");
    assert!(
        text.contains(&format!(
            "peer ('::1', {}) reply {}",
            second.addr().port(),
            second.addr()
        )),
        "getpeername answered for the failed first connect: {text}"
    );
}

/// Prints `started`, then waits for a line on stdin (the test stops
/// ktproxy meanwhile: the interpreter's start-up must not eat into the
/// heartbeat's last second). Then opens connection 1 to FIRST from local
/// port P, resets it (still in ktproxy's accept queue: ktproxy is stopped),
/// opens connection 2 to SECOND from the same port, so with the same
/// 4-tuple; signals readiness by printing `ready`, then prints what
/// connection 2 receives.
const REUSE_CLIENT: &str = r#"
import socket, struct, sys
host, first, second = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("started", flush=True)
sys.stdin.readline()
def conn(port, local):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, local))
    s.settimeout(10)
    s.connect((host, port))
    return s
c1 = conn(first, 0)
local = c1.getsockname()[1]
c1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
c1.close()
c2 = conn(second, local)
print("ready", local, flush=True)
data = b""
try:
    while True:
        b = c2.recv(4096)
        if not b:
            break
        data += b
except OSError as e:
    print("error", e.errno, flush=True)
print("reply", data.decode().strip(), flush=True)
"#;

/// A connection reset while it waits in ktproxy's accept queue frees its
/// 4-tuple; the next connection from the same port takes the tuple, and
/// with it the `flows` entry. The dead one, accepted first, cannot claim
/// the live one's destination: the kernel zeroed its local port when it was
/// reset (inet_put_port), so its key matches no entry. This proves it on
/// the running kernel (it passed before issue 10 too: nothing to fix).
#[test]
fn a_connection_dead_in_the_accept_queue_cannot_take_its_tuples_next_destination() {
    require_root();
    let cg = TestCgroup::new("tuple_reuse");
    let first = HelloServer::start();
    let second = HelloServer::start();
    let proxy = Proxy::start(&cg, &[]);
    let dir = TempDir::new("reuse");
    let out = dir.path().join("out");
    let mut client = KillOnDrop::spawn(
        cg.command(python())
            .args([
                "-c",
                REUSE_CLIENT,
                "127.0.0.1",
                &first.addr().port().to_string(),
                &second.addr().port().to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(fs::File::create(&out).unwrap()),
    );
    assert!(
        wait_until(Duration::from_secs(10), || read_lossy(&out)
            .contains("started")),
        "the client did not start: {}",
        read_lossy(&out)
    );
    // A connection just now: the heartbeat is fresh, and stays so for the
    // fraction of a second the stopped ktproxy still gets redirects. The
    // client, already running, connects twice within it.
    let warm = probe(&cg, first.addr(), 0.0, 0.0, 5.0);
    assert!(warm[0].proxied_to(&first));
    let stopped = Stopped::new(proxy.pid());
    let mut go = client.0.stdin.take().unwrap();
    writeln!(go, "go").unwrap();
    drop(go);
    assert!(
        wait_until(Duration::from_secs(5), || read_lossy(&out)
            .contains("ready")),
        "the client did not connect twice: {}",
        read_lossy(&out)
    );
    drop(stopped);
    assert!(
        wait_child(&mut client.0, Duration::from_secs(15)).is_some(),
        "connection 2 got nothing: {}",
        read_lossy(&out)
    );
    let text = read_lossy(&out);
    let port: u16 = text
        .lines()
        .find_map(|l| l.strip_prefix("ready "))
        .and_then(|p| p.trim().parse().ok())
        .expect("ready PORT");
    // Both were redirected: ktproxy saw the tuple twice.
    let client_line = format!("Client: 127.0.0.1:{port}\n");
    assert!(
        wait_until(LOG_TIMEOUT, || log_count(&proxy, &client_line) == 2),
        "ktproxy did not accept both connections from port {port}:\n{}",
        tail(&proxy.log(), 30)
    );
    assert!(
        text.contains(&format!("reply {}", second.addr())),
        "connection 2 did not reach its server: {text}\n{}",
        tail(&proxy.log(), 30)
    );
    assert!(
        proxy
            .log()
            .contains(&format!("127.0.0.1:{port} has no original destination")),
        "the dead connection claimed a destination:\n{}",
        tail(&proxy.log(), 30)
    );
}
