//! End-to-end tests of IPv6, dual-stack and IPv4-mapped interception, of the
//! destination rules (-d/-x/-p and their -file forms), and of what a real
//! client program sees (getpeername) while it is being redirected.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test ipv6_rules
//! Every test has its own cgroup, its own ktproxy on free ports and its own
//! servers (127.0.0.2, 127.0.0.3, ... are local addresses on Linux, so they
//! serve as distinct destinations without touching the host's network
//! configuration), so they run in parallel with each other and with the other
//! test files.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Upper bound for one short client run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TIMEOUT: Duration = Duration::from_secs(5);

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad address {s:?}: {e}"))
}

/// IPv4-mapped addresses as the IPv4 address they stand for.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// How many times `needle` occurs in the proxy's log so far.
fn log_count(proxy: &Proxy, needle: &str) -> usize {
    proxy.log().matches(needle).count()
}

/// Waits until `needle` occurs more than `before` times in the log.
fn wait_log_count(proxy: &Proxy, needle: &str, before: usize) {
    let ok = wait_until(LOG_TIMEOUT, || log_count(proxy, needle) > before);
    assert!(
        ok,
        "ktproxy logged no new {needle:?} within {LOG_TIMEOUT:?}; log tail:\n{}",
        tail(&proxy.log(), 40)
    );
}

// ---- clients -------------------------------------------------------------------------

/// Runs `testclient peer ADDR` in the cgroup: (peer it saw, its local address).
fn client_peer(cg: &TestCgroup, dial: SocketAddr) -> (SocketAddr, SocketAddr) {
    let out = cg.run(TESTCLIENT, &["peer", &dial.to_string()], CLIENT_TIMEOUT);
    assert!(
        out.status.success(),
        "testclient peer {dial}: {}",
        describe(&out)
    );
    parse_peer_line(&stdout(&out))
        .unwrap_or_else(|| panic!("testclient peer printed: {}", describe(&out)))
}

fn python() -> &'static str {
    // The distribution's interpreter, not a version manager's shell shim.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A real program's view of a connection: connects to HOST PORT with the
/// family HOST implies (an address with ':' is IPv6: `::ffff:a.b.c.d` makes
/// an IPv4-mapped connect on an AF_INET6 socket), then prints what
/// getpeername() and getsockname() return and the reply, read to EOF (as a
/// JSON string, so that it stays on one line).
const PY_CLIENT: &str = r#"
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(10)
s.connect((host, port))
print("peer", repr(s.getpeername()))
local = s.getsockname()
print("local", local[0], local[1])
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
print("reply", json.dumps(data.decode()))
sys.stdout.flush()
"#;

#[derive(Debug)]
struct PyConn {
    /// `repr(s.getpeername())`, e.g. `('::1', 8080, 0, 0)`.
    peer: String,
    /// getsockname(), as Python printed it (not canonicalised).
    local: SocketAddr,
    /// The reply, trimmed of surrounding white space.
    reply: String,
}

fn parse_py(out: &Output) -> PyConn {
    let text = stdout(out);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("python client printed no {name:?}: {}", describe(out)))
            .to_string()
    };
    let local = field("local");
    let (ip, port) = local
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("bad local line {local:?}"));
    PyConn {
        peer: field("peer"),
        local: SocketAddr::new(
            ip.parse().unwrap_or_else(|e| panic!("{ip:?}: {e}")),
            port.parse().unwrap_or_else(|e| panic!("{port:?}: {e}")),
        ),
        reply: {
            let json = field("reply");
            Json::parse(&json)
                .ok()
                .and_then(|j| j.as_str().map(|s| s.trim().to_string()))
                .unwrap_or_else(|| panic!("bad reply line {json:?}"))
        },
    }
}

/// The Python client, run inside the cgroup.
fn py_connect(cg: &TestCgroup, host: &str, port: u16) -> PyConn {
    let out = cg.run(
        python(),
        &["-c", PY_CLIENT, host, &port.to_string()],
        CLIENT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "python client to {host} port {port}: {}",
        describe(&out)
    );
    parse_py(&out)
}

/// Dials `server` (which must be a HelloServer: it answers with its own
/// address) from inside the cgroup at `host` (the server's own address, or
/// its `::ffff:` form, which makes a Python IPv4-mapped connect), and checks
/// both views of whether the connection was intercepted:
/// - the server's: intercepted exactly when the peer it accepted is not the
///   client's own local address (it is ktproxy's);
/// - ktproxy's log: a new `Connecting to target <server>` and `Client:
///   <client's local address>` exactly when intercepted.
fn check_route(cg: &TestCgroup, proxy: &Proxy, server: &TestServer, host: &str, intercepted: bool) {
    let target = server.addr();
    let what = format!(
        "{host} port {} ({})",
        target.port(),
        if intercepted {
            "must be intercepted"
        } else {
            "must go direct"
        }
    );
    let connecting = format!("Connecting to target {target}\n");
    let connects_before = log_count(proxy, &connecting);
    let new_before = log_count(proxy, "=== New Connection ===");
    let accepted_before = server.peers().len();

    let local = if host.starts_with("::ffff:") {
        let c = py_connect(cg, host, target.port());
        assert_eq!(
            c.peer,
            format!("('{host}', {}, 0, 0)", target.port()),
            "{what}: getpeername"
        );
        assert_eq!(c.reply, target.to_string(), "{what}: reply");
        canonical(c.local)
    } else {
        let dial = SocketAddr::new(host.parse().expect("an IP address"), target.port());
        assert_eq!(dial, target, "dial the server's own address");
        let (peer, local) = client_peer(cg, dial);
        assert_eq!(
            peer, dial,
            "{what}: getpeername must show the dialed address"
        );
        local
    };

    let seen = canonical(server.wait_peers(accepted_before + 1, LOG_TIMEOUT)[accepted_before]);
    if intercepted {
        assert_ne!(
            seen, local,
            "{what}: the server saw the client itself, not ktproxy"
        );
        wait_log_count(proxy, &connecting, connects_before);
        proxy.wait_log(&format!("Client: {local}\n"), LOG_TIMEOUT);
    } else {
        assert_eq!(
            seen, local,
            "{what}: the server should see the client itself"
        );
        let log = proxy.log();
        assert_eq!(
            log.matches(&connecting).count(),
            connects_before,
            "{what}: ktproxy dialed it:\n{}",
            tail(&log, 20)
        );
        assert_eq!(
            log.matches("=== New Connection ===").count(),
            new_before,
            "{what}: ktproxy got a connection:\n{}",
            tail(&log, 20)
        );
    }
}

/// Starts a HelloServer on `ip`, a free port.
fn hello_on(ip: &str) -> HelloServer {
    let ip: IpAddr = ip.parse().expect("an IP address");
    HelloServer::start_on(SocketAddr::new(ip, 0))
}

/// `-p` list naming these servers' ports.
fn ports_of(servers: &[&TestServer]) -> String {
    servers
        .iter()
        .map(|s| s.addr().port().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

// ---- 1, 2: IPv6 and IPv4-mapped relaying -----------------------------------------------

#[test]
fn curl_over_ipv6_is_intercepted_and_logged_as_bracketed_address() {
    require_root();
    let cg = TestCgroup::new("curl_ipv6");
    let server = ServerProcess::start(Command::new(TESTSERVER).args(["-l", "[::1]:0"]), 1);
    let target = server.addr();
    assert!(target.is_ipv6(), "{target}");
    let proxy = Proxy::start(&cg, &["-l", "127.0.0.1:0", "-l", "[::1]:0"]);
    assert_eq!(proxy.addrs().len(), 2, "{:?}", proxy.addrs());

    let url = format!("http://{target}/");
    let out = cg.run(
        "curl",
        &["-g", "-sS", "--noproxy", "*", "--max-time", "10", &url],
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "curl {url}: {}", describe(&out));
    let body = stdout(&out);
    assert!(
        body.contains(&format!("testserver at {target},")),
        "the reply does not name {target}: {body}"
    );

    let log = proxy.wait_log("Connection closed", LOG_TIMEOUT);
    for needle in [
        "Proxy Server: [::1]:".to_string(),
        "Client: [::1]:".to_string(),
        format!("Connecting to target {target}\n"),
        "Proxy connection established, from [::1]:".to_string(),
    ] {
        assert!(log.contains(&needle), "log lacks {needle:?}:\n{log}");
    }
    // The server saw ktproxy's dial, also over IPv6.
    assert!(body.contains("you are [::1]:"), "{body}");
}

#[test]
fn ipv4_mapped_connect_from_python_is_intercepted_and_dialed_as_ipv4() {
    require_root();
    let cg = TestCgroup::new("mapped_python");
    let server = HelloServer::start();
    let target = server.addr();
    let proxy = Proxy::start(&cg, &["-l", "127.0.0.1:0", "-l", "[::1]:0"]);

    let c = py_connect(&cg, "::ffff:127.0.0.1", target.port());
    assert_eq!(c.reply, target.to_string(), "the answer: {c:?}");
    let local = canonical(c.local);
    assert!(local.is_ipv4(), "{c:?}");

    let log = proxy.wait_log("Connection closed", LOG_TIMEOUT);
    for needle in [
        // Accepted on the IPv4 listener, client seen as IPv4...
        "Proxy Server: 127.0.0.1:".to_string(),
        format!("Client: {local}\n"),
        // ...and dialed as IPv4, not as ::ffff:127.0.0.1.
        format!("Connecting to target {target}\n"),
    ] {
        assert!(log.contains(&needle), "log lacks {needle:?}:\n{log}");
    }
    assert!(!log.contains("::ffff:"), "{log}");
    let seen = server.wait_peers(1, LOG_TIMEOUT)[0];
    assert_ne!(seen, local, "the server should see ktproxy, not the client");
}

// ---- 3: getpeername as a real program sees it ---------------------------------------------

/// For each of IPv4, IPv6 and IPv4-mapped: Python's getpeername() after
/// connecting. Returns the three connections.
fn python_views(cg: &TestCgroup, v4: &TestServer, v6: &TestServer) -> [PyConn; 3] {
    let (p4, p6) = (v4.addr().port(), v6.addr().port());
    let c4 = py_connect(cg, "127.0.0.1", p4);
    assert_eq!(c4.peer, format!("('127.0.0.1', {p4})"), "{c4:?}");
    assert_eq!(c4.reply, v4.addr().to_string(), "{c4:?}");
    let c6 = py_connect(cg, "::1", p6);
    assert_eq!(c6.peer, format!("('::1', {p6}, 0, 0)"), "{c6:?}");
    assert_eq!(c6.reply, v6.addr().to_string(), "{c6:?}");
    let cm = py_connect(cg, "::ffff:127.0.0.1", p4);
    assert_eq!(
        cm.peer,
        format!("('::ffff:127.0.0.1', {p4}, 0, 0)"),
        "{cm:?}"
    );
    assert_eq!(cm.reply, v4.addr().to_string(), "{cm:?}");
    [c4, c6, cm]
}

#[test]
fn python_getpeername_returns_the_dialed_v4_v6_and_v4_mapped_address_not_the_proxy() {
    require_root();
    let cg = TestCgroup::new("getpeername_intercepted");
    let v4 = HelloServer::start();
    let v6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &["-l", "127.0.0.1:0", "-l", "[::1]:0"]);

    let conns = python_views(&cg, &v4, &v6);
    // They were intercepted: ktproxy got each of them, from that very socket.
    for (c, target) in conns.iter().zip([v4.addr(), v6.addr(), v4.addr()]) {
        proxy.wait_log(&format!("Client: {}\n", canonical(c.local)), LOG_TIMEOUT);
        proxy.wait_log(&format!("Connecting to target {target}\n"), LOG_TIMEOUT);
    }
    assert_eq!(log_count(&proxy, "=== New Connection ==="), 3);
    let peers4 = v4.wait_peers(2, LOG_TIMEOUT);
    let peers6 = v6.wait_peers(1, LOG_TIMEOUT);
    assert_ne!(canonical(peers4[0]), canonical(conns[0].local));
    assert_ne!(canonical(peers6[0]), canonical(conns[1].local));
    assert_ne!(canonical(peers4[1]), canonical(conns[2].local));
}

#[test]
fn python_getpeername_of_connections_excluded_with_x_is_the_same_dialed_address() {
    require_root();
    let cg = TestCgroup::new("getpeername_excluded");
    let v4 = HelloServer::start();
    let v6 = hello_on("::1");
    let proxy = Proxy::start(
        &cg,
        &[
            "-l",
            "127.0.0.1:0",
            "-l",
            "[::1]:0",
            "-x",
            "127.0.0.0/8",
            "-x",
            "::1",
        ],
    );

    let conns = python_views(&cg, &v4, &v6);
    // Not intercepted: the servers saw the clients themselves.
    let peers4 = v4.wait_peers(2, LOG_TIMEOUT);
    let peers6 = v6.wait_peers(1, LOG_TIMEOUT);
    assert_eq!(canonical(peers4[0]), canonical(conns[0].local));
    assert_eq!(canonical(peers6[0]), canonical(conns[1].local));
    assert_eq!(canonical(peers4[1]), canonical(conns[2].local));
    assert!(!proxy.log().contains("New Connection"), "{}", proxy.log());
}

// ---- 4: -d / -x / -p ------------------------------------------------------------------------

const DUAL: [&str; 4] = ["-l", "127.0.0.1:0", "-l", "[::1]:0"];

fn with_dual<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    DUAL.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn dest_rule_intercepts_only_the_listed_ipv4_host_and_no_other_v4_or_v6() {
    require_root();
    let cg = TestCgroup::new("dest_only");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &with_dual(&["-d", "127.0.0.2/32"]));
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
    check_route(&cg, &proxy, &s6, "::1", false);
    // IPv4-mapped destinations follow the IPv4 rules.
    check_route(&cg, &proxy, &s2, "::ffff:127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "::ffff:127.0.0.3", false);
}

#[test]
fn exclude_carves_a_host_out_of_a_dest_network() {
    require_root();
    let cg = TestCgroup::new("dest_minus_exclude");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let proxy = Proxy::start(&cg, &["-d", "127.0.0.0/8", "-x", "127.0.0.3"]);
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
}

#[test]
fn exclude_wins_over_a_matching_port() {
    require_root();
    let cg = TestCgroup::new("exclude_over_port");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let ports = ports_of(&[&s2, &s3]);
    let proxy = Proxy::start(&cg, &["-p", &ports, "-x", "127.0.0.2"]);
    check_route(&cg, &proxy, &s2, "127.0.0.2", false);
    // Positive control: a listed port to a destination not excluded.
    check_route(&cg, &proxy, &s3, "127.0.0.3", true);
}

#[test]
fn dest_and_ports_must_both_match() {
    require_root();
    let cg = TestCgroup::new("dest_and_port");
    let yes = hello_on("127.0.0.2"); // dest and port listed
    let wrong_port = hello_on("127.0.0.2"); // dest listed, port not
    let wrong_dest = hello_on("127.0.0.3"); // port listed, dest not
    let ports = ports_of(&[&yes, &wrong_dest]);
    let proxy = Proxy::start(&cg, &["-d", "127.0.0.2/32", "-p", &ports]);
    check_route(&cg, &proxy, &yes, "127.0.0.2", true);
    check_route(&cg, &proxy, &wrong_port, "127.0.0.2", false);
    check_route(&cg, &proxy, &wrong_dest, "127.0.0.3", false);
}

#[test]
fn ipv6_dest_rule_intercepts_ipv6_and_leaves_ipv4_and_v4_mapped_direct() {
    require_root();
    let cg = TestCgroup::new("dest_v6");
    let s6 = hello_on("::1");
    let s4 = hello_on("127.0.0.1");
    let proxy = Proxy::start(&cg, &with_dual(&["-d", "::1/128"]));
    check_route(&cg, &proxy, &s6, "::1", true);
    check_route(&cg, &proxy, &s4, "127.0.0.1", false);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", false);
}

#[test]
fn ipv6_exclude_leaves_ipv6_direct_and_ipv4_intercepted() {
    require_root();
    let cg = TestCgroup::new("exclude_v6");
    let s6 = hello_on("::1");
    let s4 = hello_on("127.0.0.1");
    let proxy = Proxy::start(&cg, &with_dual(&["-x", "::1"]));
    check_route(&cg, &proxy, &s6, "::1", false);
    check_route(&cg, &proxy, &s4, "127.0.0.1", true);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", true);
}

#[test]
fn ipv4_exclude_applies_to_a_v4_mapped_destination() {
    require_root();
    let cg = TestCgroup::new("exclude_mapped");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let proxy = Proxy::start(&cg, &with_dual(&["-x", "127.0.0.2"]));
    check_route(&cg, &proxy, &s2, "::ffff:127.0.0.2", false);
    check_route(&cg, &proxy, &s2, "127.0.0.2", false);
    // Positive control: the same kind of connect to a host not excluded.
    check_route(&cg, &proxy, &s3, "::ffff:127.0.0.3", true);
}

#[test]
fn ports_rule_applies_to_ipv6_and_v4_mapped_destinations() {
    require_root();
    let cg = TestCgroup::new("ports_v6");
    let listed6 = hello_on("::1");
    let other6 = hello_on("::1");
    let listed4 = hello_on("127.0.0.1");
    let other4 = hello_on("127.0.0.1");
    let ports = ports_of(&[&listed6, &listed4]);
    let proxy = Proxy::start(&cg, &with_dual(&["-p", &ports]));
    check_route(&cg, &proxy, &listed6, "::1", true);
    check_route(&cg, &proxy, &other6, "::1", false);
    check_route(&cg, &proxy, &listed4, "::ffff:127.0.0.1", true);
    check_route(&cg, &proxy, &other4, "::ffff:127.0.0.1", false);
}

#[test]
fn zero_length_prefixes_cover_every_address_of_their_own_family_only() {
    require_root();
    let cg = TestCgroup::new("zero_prefix");
    let s4 = hello_on("127.0.0.2");
    let s6 = hello_on("::1");
    {
        let mut proxy = Proxy::start(&cg, &with_dual(&["-x", "0.0.0.0/0"]));
        check_route(&cg, &proxy, &s4, "127.0.0.2", false);
        check_route(&cg, &proxy, &s4, "::ffff:127.0.0.2", false);
        check_route(&cg, &proxy, &s6, "::1", true);
        assert!(proxy.stop_term().success());
    }
    let proxy = Proxy::start(&cg, &with_dual(&["-d", "::/0"]));
    check_route(&cg, &proxy, &s6, "::1", true);
    check_route(&cg, &proxy, &s4, "127.0.0.2", false);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.2", false);
}

// ---- the unspecified address -------------------------------------------------------------
//
// connect() to 0.0.0.0, :: or ::ffff:0.0.0.0 reaches this host: the kernel
// connects to 127.0.0.1 (or ::1) instead, and getpeername() says so. For
// ktproxy to be transparent, and for `-x 127.0.0.0/8 -x ::1` ("everything
// except local services", README) to mean what it says, such a connect must
// count as a connect to loopback.

/// The Python client run outside every test cgroup: the kernel's own view.
fn py_connect_direct(host: &str, port: u16) -> PyConn {
    let out = run_within(
        Command::new(python()).args(["-c", PY_CLIENT, host, &port.to_string()]),
        CLIENT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "python client to {host} port {port}: {}",
        describe(&out)
    );
    parse_py(&out)
}

#[test]
fn exclude_of_loopback_also_covers_connects_to_the_unspecified_address() {
    require_root();
    let cg = TestCgroup::new("unspecified_excluded");
    let s4 = hello_on("127.0.0.1");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &with_dual(&["-x", "127.0.0.0/8", "-x", "::1"]));
    let mut wrong = Vec::new();
    for (host, server) in [("0.0.0.0", &s4), ("::", &s6), ("::ffff:0.0.0.0", &s4)] {
        let port = server.addr().port();
        let before = server.peers().len();
        let c = py_connect(&cg, host, port);
        assert_eq!(c.reply, server.addr().to_string(), "{host}: {c:?}");
        let seen = canonical(server.wait_peers(before + 1, LOG_TIMEOUT)[before]);
        if seen != canonical(c.local) {
            wrong.push(format!(
                "{host} port {port}: the server saw {seen}, not the client {}",
                c.local
            ));
        }
    }
    let log = proxy.log();
    assert!(
        wrong.is_empty() && !log.contains("New Connection"),
        "connects to the unspecified address reach local services, yet -x 127.0.0.0/8 \
         -x ::1 did not keep them direct:\n{}\nktproxy log:\n{}",
        wrong.join("\n"),
        tail(&log, 30)
    );
}

#[test]
fn getpeername_after_connecting_to_the_unspecified_address_matches_a_direct_connection() {
    require_root();
    let cg = TestCgroup::new("unspecified_peer");
    let s4 = hello_on("127.0.0.1");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &DUAL);
    let mut wrong = Vec::new();
    for (host, server) in [("0.0.0.0", &s4), ("::", &s6), ("::ffff:0.0.0.0", &s4)] {
        let port = server.addr().port();
        let direct = py_connect_direct(host, port);
        let proxied = py_connect(&cg, host, port);
        assert_eq!(proxied.reply, direct.reply, "{host}");
        if proxied.peer != direct.peer {
            wrong.push(format!(
                "{host} port {port}: getpeername {} through ktproxy, {} direct",
                proxied.peer, direct.peer
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "getpeername after a connect to the unspecified address differs from a direct \
         connection's:\n{}\nktproxy log:\n{}",
        wrong.join("\n"),
        tail(&proxy.log(), 30)
    );
}

// ---- 5: long rule files -----------------------------------------------------------------------

/// Writes a rule file of 10,000 distinct CIDRs (/24s of 10.0.0.0/8, a few
/// /32s and /48s) with comments, trailing comments and blank lines, plus
/// `extra` in the middle. Returns its path and the number of rules in it.
fn big_rule_file(dir: &TempDir, name: &str, extra: &str) -> (PathBuf, usize) {
    let path = dir.path().join(name);
    let mut f = std::io::BufWriter::new(fs::File::create(&path).unwrap());
    writeln!(f, "# {name}: 10,000 generated networks").unwrap();
    let mut rules = 0;
    for i in 0..10_000u32 {
        if i % 500 == 0 {
            writeln!(f, "\n# block {}", i / 500).unwrap();
        }
        if i == 5_000 {
            writeln!(f, "{extra}   # the one that matters").unwrap();
            rules += 1;
        }
        match i % 1000 {
            // Some IPv6 networks and host routes among them.
            999 => writeln!(f, "2001:db8:{:x}::/48", i / 1000).unwrap(),
            998 => writeln!(f, "10.200.{}.{}", (i / 1000) % 256, 7).unwrap(),
            _ => writeln!(f, "10.{}.{}.0/24", i / 256, i % 256).unwrap(),
        }
        rules += 1;
    }
    writeln!(f, "\n# end").unwrap();
    f.flush().unwrap();
    (path, rules)
}

/// Starts ktproxy with `extra`, returning it and the time from spawn to its
/// ready line (which comes after the programs are loaded and the rules are
/// in the kernel's maps).
fn start_timed<'a>(cg: &'a TestCgroup, extra: &[&str]) -> (Proxy<'a>, Duration) {
    let started = Instant::now();
    let proxy = Proxy::start(cg, extra);
    (proxy, started.elapsed())
}

#[test]
fn dest_file_of_10000_cidrs_is_ready_within_1s_and_honoured() {
    require_root();
    let cg = TestCgroup::new("dest_file_10k");
    let dir = TempDir::new("dest-file");
    let (path, rules) = big_rule_file(&dir, "dest.txt", "127.0.0.2/32");
    let path = path.to_str().unwrap();
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let s6 = hello_on("::1");

    let (proxy, took) = start_timed(&cg, &with_dual(&["--dest-file", path]));
    eprintln!("--dest-file with {rules} rules: ready {took:?} after spawn");
    assert!(
        took < Duration::from_secs(1),
        "ready only after {took:?}:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    assert!(
        log.contains(&format!("{rules} destination rule(s)")),
        "{log}"
    );
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
    check_route(&cg, &proxy, &s6, "::1", false);
}

#[test]
fn exclude_file_of_10000_cidrs_is_ready_within_1s_and_honoured() {
    require_root();
    let cg = TestCgroup::new("exclude_file_10k");
    let dir = TempDir::new("exclude-file");
    let (path, rules) = big_rule_file(&dir, "never.txt", "127.0.0.3/32");
    let path = path.to_str().unwrap();
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let s6 = hello_on("::1");

    let (proxy, took) = start_timed(&cg, &with_dual(&["--exclude-file", path]));
    eprintln!("--exclude-file with {rules} rules: ready {took:?} after spawn");
    assert!(
        took < Duration::from_secs(1),
        "ready only after {took:?}:\n{}",
        proxy.log()
    );
    let log = proxy.log();
    assert!(log.contains(&format!("{rules} exclusion(s)")), "{log}");
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s6, "::1", true);
}

#[test]
fn dest_file_with_only_comments_intercepts_nothing() {
    require_root();
    let cg = TestCgroup::new("dest_file_empty");
    let dir = TempDir::new("dest-file-empty");
    let path = dir.path().join("empty.txt");
    fs::write(&path, "# nothing yet\n\n   # still nothing\n").unwrap();
    let s4 = hello_on("127.0.0.1");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &with_dual(&["--dest-file", path.to_str().unwrap()]));
    check_route(&cg, &proxy, &s4, "127.0.0.1", false);
    check_route(&cg, &proxy, &s6, "::1", false);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", false);
}

// ---- 6: malformed rules ----------------------------------------------------------------------

/// Runs a ktproxy that must refuse to start: checks that it exits 2 with
/// exactly one line on stderr containing every one of `named`, and leaves
/// nothing behind (no program attached to the cgroup, no ktproxy-<pid>
/// cgroup).
fn refuses_with_usage_error(cg: &TestCgroup, extra: &[&str], named: &[&str]) {
    refuses_with_usage_error_cmd(cg, &mut ktproxy_command(cg, extra), named);
}

fn refuses_with_usage_error_cmd(cg: &TestCgroup, cmd: &mut Command, named: &[&str]) {
    let shown = format!("{cmd:?}");
    let (out, pid) = output_within_pid(cmd.stdin(Stdio::null()), Duration::from_secs(10));
    let out = out.unwrap_or_else(|o| panic!("{shown} kept running: {}", describe(&o)));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{shown}: expected exit 2: {}",
        describe(&out)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{shown}: expected exactly one line on stderr: {}",
        describe(&out)
    );
    for n in named {
        assert!(
            stderr.contains(n),
            "{shown}: stderr should name {n:?}: {stderr}"
        );
    }
    let left = attached_programs(cg.path());
    assert!(left.is_empty(), "{shown} left {left:?} attached");
    let own = own_cgroup_of(pid);
    assert!(!own.exists(), "{shown} left {} behind", own.display());
}

#[test]
fn malformed_rule_files_exit_2_with_one_line_naming_file_and_line() {
    require_root();
    let cg = TestCgroup::new("bad_rule_files");
    let dir = TempDir::new("bad-rules");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let bad3 = write("bad3.txt", "10.0.0.0/8\n# fine\n300.1.2.3/8\n10.1.0.0/16\n");
    let hostbits = write("hostbits.txt", "\n# host bits\n\n10.0.0.1/8  # oops\n");
    let toolong4 = write("toolong4.txt", "192.168.0.0/16\n10.0.0.0/33\n");
    let toolong6 = write("toolong6.txt", "2001:db8::/32\n::/129\n");
    let mapped = write("mapped.txt", "::ffff:10.0.0.0/104\n");
    let missing = dir.path().join("missing.txt");
    let missing = missing.to_str().unwrap();
    let a_dir = dir.path().to_str().unwrap();
    // Readable by root only, in a directory everyone may enter.
    let open_dir = TempDir::new("bad-rules-locked");
    fs::set_permissions(open_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let locked = open_dir.path().join("locked.txt");
    fs::write(&locked, "10.0.0.0/8\n").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let locked = locked.to_str().unwrap().to_string();

    for opt in ["--dest-file", "--exclude-file"] {
        refuses_with_usage_error(
            &cg,
            &[opt, &bad3],
            &[opt, &format!("{bad3}:3:"), "'300.1.2.3/8'"],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &hostbits],
            &[
                &format!("{hostbits}:4:"),
                "'10.0.0.1/8'",
                "host bits",
                "did you mean 10.0.0.0/8",
            ],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &toolong4],
            &[&format!("{toolong4}:2:"), "'10.0.0.0/33'", "0-32"],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &toolong6],
            &[&format!("{toolong6}:2:"), "'::/129'", "0-128"],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &mapped],
            &[&format!("{mapped}:1:"), "IPv4-mapped"],
        );
        refuses_with_usage_error(&cg, &[opt, missing], &[opt, "cannot read", missing]);
        // Root reads any file: a directory is unreadable even for root...
        refuses_with_usage_error(&cg, &[opt, a_dir], &[opt, "cannot read", a_dir]);
        // ...and a mode 000 file is for anyone else (command-line errors come
        // before the privilege check).
        let mut cmd = ktproxy_command(&cg, &[opt, &locked]);
        cmd.uid(65534).gid(65534);
        refuses_with_usage_error_cmd(
            &cg,
            &mut cmd,
            &[opt, "cannot read", &locked, "Permission denied"],
        );
    }
    // A good file does not hide a bad one given after it.
    let good = write("good.txt", "10.0.0.0/8\n");
    refuses_with_usage_error(
        &cg,
        &["--dest-file", &good, "--dest-file", &bad3],
        &[&format!("{bad3}:3:")],
    );
}

#[test]
fn malformed_cidr_arguments_exit_2_with_one_line_naming_the_value() {
    require_root();
    let cg = TestCgroup::new("bad_cidr_args");
    let cases: [(&[&str], &[&str]); 8] = [
        (&["-d", "bogus"], &["-d/--dest", "'bogus'"]),
        (
            &["-x", "10.0.0.0/33"],
            &["-x/--exclude", "'10.0.0.0/33'", "0-32"],
        ),
        (&["-d", "10.0.0.1/8"], &["did you mean 10.0.0.0/8"]),
        (&["-x", "::1/129"], &["'::1/129'", "0-128"]),
        (&["-d", "2001:db8::1/32"], &["did you mean 2001:db8::/32"]),
        (&["-d", "10.0.0.0/"], &["'10.0.0.0/'"]),
        (&["--exclude", "example.com"], &["'example.com'"]),
        (
            &["-d", "10.0.0.0/8", "-d", "::ffff:1.2.3.4"],
            &["IPv4-mapped"],
        ),
    ];
    for (args, named) in cases {
        refuses_with_usage_error(&cg, args, named);
    }
}

// ---- 7: one family only -------------------------------------------------------------------

#[test]
fn ipv6_only_listener_intercepts_ipv6_and_leaves_ipv4_direct() {
    require_root();
    let cg = TestCgroup::new("ipv6_only");
    let s4 = hello_on("127.0.0.1");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &["-l", "[::1]:0"]);
    assert!(
        proxy.addrs().iter().all(SocketAddr::is_ipv6),
        "{:?}",
        proxy.addrs()
    );
    let log = proxy.log();
    assert!(
        log.contains("IPv4 connections are not intercepted"),
        "{log}"
    );
    check_route(&cg, &proxy, &s4, "127.0.0.1", false);
    check_route(&cg, &proxy, &s6, "::1", true);
    // IPv4-mapped connects are IPv4: without an IPv4 listener, direct.
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", false);
}

#[test]
fn ipv4_only_listener_intercepts_ipv4_and_leaves_ipv6_direct() {
    require_root();
    let cg = TestCgroup::new("ipv4_only");
    let s4 = hello_on("127.0.0.1");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &["-l", "127.0.0.1:0"]);
    assert!(
        proxy.addrs().iter().all(SocketAddr::is_ipv4),
        "{:?}",
        proxy.addrs()
    );
    let log = proxy.log();
    assert!(
        log.contains("IPv6 connections are not intercepted"),
        "{log}"
    );
    check_route(&cg, &proxy, &s6, "::1", false);
    check_route(&cg, &proxy, &s4, "127.0.0.1", true);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", true);
}

// ---- 8: default listen addresses on a host without IPv6 -----------------------------------

/// A ktproxy started in a network namespace (`ktproxy_in_netns`), logging to
/// a file; stopped with SIGTERM (then SIGKILL) on drop, which also removes
/// the cgroup a SIGKILLed ktproxy leaves.
struct NsProxy<'a> {
    child: Child,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    _dir: TempDir,
    _cg: std::marker::PhantomData<&'a TestCgroup>,
}

/// `ktproxy -c <cg> extra...`, entering `ns` between fork and exec (like
/// `nsenter --net`; `ip netns exec` would also remount /sys, which hides a
/// cgroup2 hierarchy mounted below it, e.g. /sys/fs/cgroup/unified).
fn ktproxy_in_netns(cg: &TestCgroup, ns: &NetNs, extra: &[&str]) -> Command {
    let ns_path = CString::new(format!("/run/netns/{}", ns.name())).unwrap();
    let mut cmd = Command::new(KTPROXY);
    cmd.arg("-c").arg(cg.path()).args(extra);
    // SAFETY: open, setns and close are async-signal-safe syscalls on
    // memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(ns_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let r = libc::setns(fd, libc::CLONE_NEWNET);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if r != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

impl<'a> NsProxy<'a> {
    /// `ktproxy -c <cg> extra...` in `ns`; waits for the ready line.
    fn start(cg: &'a TestCgroup, ns: &NetNs, extra: &[&str]) -> NsProxy<'a> {
        let dir = TempDir::new("ktproxy-netns");
        let log_path = dir.path().join("ktproxy.log");
        let log = fs::File::create(&log_path).expect("creating the ktproxy log");
        let mut cmd = ktproxy_in_netns(cg, ns, extra);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let mut p = NsProxy {
            child,
            status: None,
            log_path,
            _dir: dir,
            _cg: std::marker::PhantomData,
        };
        let came = wait_until(READY_TIMEOUT, || {
            p.log().lines().any(|l| l.contains("ready")) || p.exited()
        });
        if !p.log().lines().any(|l| l.contains("ready")) {
            panic!(
                "ktproxy {cmd:?} {}:\n{}",
                if came {
                    "exited before it was ready"
                } else {
                    "printed no ready line in time"
                },
                p.log()
            );
        }
        p
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn ready_line(&self) -> String {
        self.log()
            .lines()
            .find(|l| l.contains("ready"))
            .unwrap_or_default()
            .to_string()
    }

    fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_some()
    }

    /// SIGTERM, then SIGKILL after STOP_TIMEOUT; returns the exit status.
    fn stop(&mut self) -> ExitStatus {
        if self.status.is_none() {
            signal(self.pid(), libc::SIGTERM);
            self.status = wait_child(&mut self.child, STOP_TIMEOUT);
        }
        if self.status.is_none() {
            signal(self.pid(), libc::SIGKILL);
            self.status = Some(self.child.wait().expect("waiting for ktproxy"));
            let _ = remove_cgroup_dir(&own_cgroup_of(self.child.id()), Duration::from_secs(2));
        }
        self.status.unwrap()
    }
}

impl Drop for NsProxy<'_> {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- ktproxy (pid {}) log tail ---\n{}\n---",
                self.pid(),
                tail(&self.log(), 60)
            );
        }
    }
}

/// A network namespace with `lo` up and IPv6 disabled (no ::1 at all).
fn netns_without_ipv6() -> NetNs {
    let ns = NetNs::new();
    let sysctl = run_within(
        ns.command("sysctl").args([
            "-w",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv6.conf.lo.disable_ipv6=1",
        ]),
        Duration::from_secs(10),
    );
    assert!(sysctl.status.success(), "sysctl: {}", describe(&sysctl));
    let v6 = run_within(
        Command::new("ip").args(["-n", ns.name(), "-6", "addr", "show", "dev", "lo"]),
        Duration::from_secs(10),
    );
    assert!(
        v6.status.success() && stdout(&v6).trim().is_empty(),
        "IPv6 still configured on lo in {}: {}",
        ns.name(),
        describe(&v6)
    );
    ns
}

/// The Python client, run in the cgroup and in `ns`.
fn py_connect_in(cg: &TestCgroup, ns: &NetNs, host: &str, port: u16) -> PyConn {
    let mut cmd = cg.command("ip");
    cmd.args(ns.exec_args(python()))
        .args(["-c", PY_CLIENT, host, &port.to_string()]);
    let out = run_within(&mut cmd, CLIENT_TIMEOUT);
    assert!(
        out.status.success(),
        "python client to {host} port {port} in {}: {}",
        ns.name(),
        describe(&out)
    );
    parse_py(&out)
}

/// The peer a testserver names in its reply (`... you are ADDR`).
fn testserver_saw(c: &PyConn) -> SocketAddr {
    c.reply
        .rsplit_once("you are ")
        .and_then(|(_, p)| p.trim().parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("the reply names no peer: {c:?}"))
}

#[test]
fn default_listen_without_ipv6_falls_back_to_ipv4_only_with_a_warning() {
    require_root();
    let cg = TestCgroup::new("no_ipv6_default");
    let ns = netns_without_ipv6();
    let server = ServerProcess::start(ns.command(TESTSERVER).args(["-l", "127.0.0.1:0"]), 1);
    let target = server.addr();

    // No -l: the defaults, 127.0.0.1:8999 and [::1]:8999 (free in a fresh
    // namespace).
    let mut proxy = NsProxy::start(&cg, &ns, &[]);
    let ready = proxy.ready_line();
    assert_eq!(
        parse_listen_addrs(&ready),
        Some(vec![addr("127.0.0.1:8999")]),
        "{ready}"
    );
    let log = proxy.log();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains("IPv6"), "{warning}");
    let own = parse_own_cgroup(&ready).unwrap_or_else(|| panic!("{ready}"));
    assert_eq!(own, own_cgroup_of(proxy.child.id()));
    assert!(!attached_programs(cg.path()).is_empty());

    // A client in the cgroup and in the namespace is intercepted.
    let mut cmd = cg.command("ip");
    cmd.args(ns.exec_args(TESTCLIENT))
        .args(["hello", &target.to_string()]);
    let out = run_within(&mut cmd, CLIENT_TIMEOUT);
    assert!(out.status.success(), "testclient hello: {}", describe(&out));
    let wait = |needle: &str| {
        let ok = wait_until(LOG_TIMEOUT, || proxy.log().contains(needle));
        assert!(ok, "ktproxy logged no {needle:?}:\n{}", proxy.log());
    };
    wait(&format!("Connecting to target {target}\n"));
    wait("Proxy Server: 127.0.0.1:8999");

    // The server saw ktproxy, not the client; the client saw the server.
    let c = py_connect_in(&cg, &ns, "127.0.0.1", target.port());
    assert_eq!(c.peer, format!("('127.0.0.1', {})", target.port()), "{c:?}");
    assert!(
        c.reply.contains(&format!("testserver at {target},")),
        "{c:?}"
    );
    assert_ne!(testserver_saw(&c), c.local, "not intercepted: {c:?}");
    wait(&format!("Client: {}\n", c.local));

    // IPv4-mapped connects still work without IPv6 and are IPv4: intercepted.
    let m = py_connect_in(&cg, &ns, "::ffff:127.0.0.1", target.port());
    assert_eq!(
        m.peer,
        format!("('::ffff:127.0.0.1', {}, 0, 0)", target.port()),
        "{m:?}"
    );
    assert_ne!(
        testserver_saw(&m),
        canonical(m.local),
        "not intercepted: {m:?}"
    );
    wait(&format!("Client: {}\n", canonical(m.local)));

    let status = proxy.stop();
    assert_eq!(status.code(), Some(0), "ktproxy: {status}\n{}", proxy.log());
    assert!(attached_programs(cg.path()).is_empty());
    assert!(!own.exists(), "{} left behind", own.display());
}

#[test]
fn explicit_ipv6_listen_without_ipv6_exits_1_naming_the_address() {
    require_root();
    let cg = TestCgroup::new("no_ipv6_explicit");
    let ns = netns_without_ipv6();
    // Only the default IPv6 listener may be dropped: an explicit one must
    // work or ktproxy must refuse to start.
    let mut cmd = ktproxy_in_netns(&cg, &ns, &["-l", "127.0.0.1:0", "-l", "[::1]:0"]);
    let shown = format!("{cmd:?}");
    let (out, pid) = output_within_pid(cmd.stdin(Stdio::null()), Duration::from_secs(10));
    let out = out.unwrap_or_else(|o| panic!("{shown} kept running: {}", describe(&o)));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{shown}: {}", describe(&out));
    assert_eq!(stderr.lines().count(), 1, "{shown}: {}", describe(&out));
    assert!(stderr.contains("[::1]:0"), "{stderr}");
    let left = attached_programs(cg.path());
    assert!(left.is_empty(), "{shown} left {left:?} attached");
    let own = own_cgroup_of(pid);
    assert!(!own.exists(), "{shown} left {} behind", own.display());
}
