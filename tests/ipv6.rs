//! End-to-end tests of IPv6, dual-stack and IPv4-mapped interception, of
//! connects to the unspecified address, of hosts with one family only, and of
//! what a real client program sees (getpeername) while it is being
//! redirected.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test ipv6
//! Every test has its own cgroup, its own ktproxy on free ports and its own
//! servers, so they run in parallel with each other and with the other test
//! files.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad address {s:?}: {e}"))
}

// ---- IPv6 and IPv4-mapped relaying -----------------------------------------------------

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

// ---- getpeername as a real program sees it ------------------------------------------------

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

// ---- the unspecified address -------------------------------------------------------------
//
// connect() to 0.0.0.0, :: or ::ffff:0.0.0.0 reaches this host: the kernel
// connects to 127.0.0.1 (or ::1) instead, and getpeername() says so. For
// ktproxy to be transparent, and for `-x 127.0.0.0/8 -x ::1` ("everything
// except local services", README) to mean what it says, such a connect must
// count as a connect to loopback.

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

// ---- one family only ----------------------------------------------------------------------

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

// ---- default listen addresses on a host without IPv6 --------------------------------------

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
    let ns = NetNs::without_ipv6();
    let server = ServerProcess::start(ns.command(TESTSERVER).args(["-l", "127.0.0.1:0"]), 1);
    let target = server.addr();

    // No -l: the defaults, 127.0.0.1:8999 and [::1]:8999 (free in a fresh
    // namespace).
    let mut proxy = Proxy::start_command(&cg, ktproxy_in_netns(&cg, &ns, &[]));
    let ready = proxy.ready_line();
    assert_eq!(
        parse_listen_addrs(ready),
        Some(vec![addr("127.0.0.1:8999")]),
        "{ready}"
    );
    let log = without_capacity_warning(&proxy.log());
    let warning = log
        .lines()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| panic!("no warning:\n{log}"));
    assert!(warning.contains("IPv6"), "{warning}");
    let own = parse_own_cgroup(ready).unwrap_or_else(|| panic!("{ready}"));
    assert_eq!(own, own_cgroup_of(proxy.pid() as u32));
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

    let status = proxy.stop_term();
    assert_eq!(status.code(), Some(0), "ktproxy: {status}\n{}", proxy.log());
    assert!(attached_programs(cg.path()).is_empty());
    assert!(!own.exists(), "{} left behind", own.display());
}

#[test]
fn explicit_ipv6_listen_without_ipv6_exits_1_naming_the_address() {
    require_root();
    let cg = TestCgroup::new("no_ipv6_explicit");
    let ns = NetNs::without_ipv6();
    // Only the default IPv6 listener may be dropped: an explicit one must
    // work or ktproxy must refuse to start.
    let mut cmd = ktproxy_in_netns(&cg, &ns, &["-l", "127.0.0.1:0", "-l", "[::1]:0"]);
    let shown = format!("{cmd:?}");
    let (out, pid) = output_within_pid(cmd.stdin(Stdio::null()), Duration::from_secs(10));
    let out = out.unwrap_or_else(|o| panic!("{shown} kept running: {}", describe(&o)));
    let stderr = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}: {}", describe(&out));
    assert_eq!(stderr.lines().count(), 1, "{shown}: {}", describe(&out));
    assert!(stderr.contains("[::1]:0"), "{stderr}");
    let left = attached_programs(cg.path());
    assert!(left.is_empty(), "{shown} left {left:?} attached");
    let own = own_cgroup_of(pid);
    assert!(!own.exists(), "{shown} left {} behind", own.display());
}
