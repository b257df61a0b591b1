//! End-to-end tests of names through the proxy (issue 9): DNS answered by
//! ktproxy with fake addresses, connects by name through real upstream
//! proxies, and the kernel hooks that make it invisible to clients. That
//! nothing leaks (command mode with -u) is tests/dns_leaks.rs.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test dns
//!
//! Safety: command mode intercepts only its own cgroup; cgroup-mode tests
//! use a TestCgroup. Files the tests need changed (/etc/hosts of the
//! upstream, resolv.conf and nsswitch.conf of COMMAND) are bind-mounted in
//! private mount namespaces (`unshare -m`), never written on the host.
//! Traffic stays on loopback and this host's own interface address: DNS
//! "servers" the clients ask elsewhere are never reached, which is the point.

mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The lines after `== NAME` up to the next `== ` line.
fn section<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let header = format!("== {name}");
    out.lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect()
}

/// The first fake address in `lines` (first word of each line or the word
/// after "Address:").
fn fake_in(lines: &[&str]) -> Option<IpAddr> {
    lines
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.parse::<IpAddr>().ok())
        .find(|ip| is_fake(*ip))
}

/// Every kind of real client resolves SECRET (which only the upstream
/// knows) to a fake address and reaches the testserver through the
/// upstream by name.
fn clients_reach_the_secret_name(upstream_url: &str, port: u16) -> (String, String, u32) {
    let script = format!(
        "exec 2>&1\n\
         echo '== getent'; getent ahosts {SECRET}\n\
         echo '== python'; {py} -c \"$CLIENT_PY\" getaddrinfo {SECRET} {port}\n\
         echo '== curl'; curl -sS --noproxy '*' --max-time 10 http://{SECRET}:{port}/\n\
         echo; echo '== wget'; busybox wget -q -O - http://{SECRET}:{port}/\n\
         echo; echo '== nslookup'; busybox nslookup {SECRET}\n\
         echo '== dig'; dig +short +time=3 +tries=1 {SECRET}\n\
         echo '== dig-tcp'; dig +tcp +short +time=3 +tries=1 {SECRET}\n\
         echo '== curl-dig'; curl -sS --noproxy '*' --max-time 10 \"http://$(dig +short +time=3 +tries=1 {SECRET} | head -n1):{port}/\"\n\
         echo; echo '== end'\n",
        py = python()
    );
    let cmd_line = shell(&script);
    let mut cmd = ktproxy_cmd(&[VERBOSE, "-u", upstream_url], &as_strs(&cmd_line));
    cmd.env("CLIENT_PY", CLIENT_PY);
    let (out, pid) = run_logged(&mut cmd);
    (stdout(&out), stderr(&out), pid)
}

fn assert_every_client_got_a_fake_address_and_the_server(out: &str, server: SocketAddr) {
    for client in ["getent", "python", "nslookup", "dig", "dig-tcp"] {
        let lines = section(out, client);
        assert!(
            fake_in(&lines).is_some(),
            "{client} got no fake address from {:?}: {lines:?}\nwhole output:\n{out}",
            FAKE_NET
        );
    }
    for client in ["python", "curl", "wget", "curl-dig"] {
        let body = section(out, client).join("\n");
        assert!(
            body.contains(&format!("testserver at {server},")),
            "{client} did not reach the testserver at {server}: {body:?}\nwhole output:\n{out}"
        );
    }
}

#[test]
fn real_clients_resolve_a_name_only_the_socks5_upstream_knows_and_connect_by_name() {
    require_root();
    need("dig");
    need("busybox");
    let server = ServerProcess::testserver();
    let port = server.addr().port();
    let socks = microsocks_knowing_secret();
    let (out, log, pid) = clients_reach_the_secret_name(&socks.socks5_url(), port);
    assert_every_client_got_a_fake_address_and_the_server(&out, server.addr());

    // Resolution happened behind the upstream: it was asked for the name.
    socks.wait_log(&format!("connected to {SECRET}:{port}"));
    let line = log
        .lines()
        .find(|l| l.contains(&format!("Connecting to target {SECRET}:{port} (198.1")))
        .unwrap_or_else(|| panic!("no connect-by-name line in the log:\n{log}"));
    assert!(
        line.contains(&format!("via socks5://{}", socks.addr)),
        "{line}"
    );
    assert_eq!(targets(&log)[0], format!("{SECRET}:{port}"));
    assert_nothing_left(pid, &log, "clients by name through socks5");
}

#[test]
fn real_clients_connect_by_name_through_an_http_connect_upstream() {
    require_root();
    need("dig");
    need("busybox");
    let server = ServerProcess::testserver();
    let port = server.addr().port();
    let http = tinyproxy_knowing_secret(port);
    let (out, log, pid) = clients_reach_the_secret_name(&format!("http://{}", http.addr), port);
    assert_every_client_got_a_fake_address_and_the_server(&out, server.addr());
    http.wait_log(&format!("CONNECT {SECRET}:{port}"));
    assert!(
        log.contains(&format!("Connecting to target {SECRET}:{port} (198.1")),
        "{log}"
    );
    assert_nothing_left(pid, &log, "clients by name through HTTP CONNECT");
}

/// dig checks that the reply comes from the server it asked (it prints
/// "reply from unexpected source" and keeps waiting otherwise), and names
/// the server and transport it used. The servers asked are this host's own
/// address and ::1, neither of which runs a DNS server: only ktproxy can
/// have answered.
#[test]
fn dig_gets_answers_from_the_server_it_asked_over_udp_and_tcp_ipv4_and_ipv6() {
    require_root();
    need("dig");
    let (own4, _) = own_addresses();
    let own4 = own4.expect("this test needs a non-loopback IPv4 address on this host");
    let script = format!(
        "for s in {own4} ::1; do for t in +notcp +tcp; do \
           echo \"== $s $t\"; dig $t +time=3 +tries=1 @$s example.com 2>&1; \
         done; done; echo '== end'"
    );
    let (out, pid) = run_command(
        &[VERBOSE, "--proxy-dns"],
        &as_strs(&shell(&script)),
        RUN_TIMEOUT,
    );
    let text = stdout(&out);
    for server in [own4.to_string(), "::1".to_string()] {
        for (flag, proto) in [("+notcp", "UDP"), ("+tcp", "TCP")] {
            let lines = section(&text, &format!("{server} {flag}"));
            let joined = lines.join("\n");
            assert!(
                fake_in(&lines).is_some(),
                "dig @{server} {flag}: no fake address:\n{joined}"
            );
            assert!(
                joined.contains(&format!(";; SERVER: {server}#53({server}) ({proto})")),
                "dig @{server} {flag} does not name the server it asked:\n{joined}"
            );
            assert!(
                !joined.contains("unexpected source"),
                "dig @{server} {flag}:\n{joined}"
            );
        }
    }
    let log = stderr(&out);
    let counters = kernel_counters(&log).expect("counters");
    assert!(counters["dns_reply_source"] >= 2, "{counters:?}");
    assert!(counters["dns_tcp"] >= 2, "{counters:?}");
    assert_nothing_left(pid, &log, "dig");
}

/// What getpeername and recvfrom show on UDP sockets: the server asked,
/// for connected and unconnected sockets, IPv4, IPv6 and IPv4-mapped.
#[test]
fn udp_sockets_see_the_dns_server_they_asked_connected_or_not() {
    require_root();
    let (own4, _) = own_addresses();
    let own4 = own4.expect("this test needs a non-loopback IPv4 address on this host");
    let cases = [
        ("4", "unconnected", own4.to_string(), format!("{own4}:53")),
        ("4", "connected", own4.to_string(), format!("{own4}:53")),
        (
            "4",
            "unconnected",
            "127.0.0.53".into(),
            "127.0.0.53:53".into(),
        ),
        ("6", "unconnected", "::1".into(), "[::1]:53".into()),
        ("6", "connected", "::1".into(), "[::1]:53".into()),
        (
            "6",
            "unconnected",
            format!("::ffff:{own4}"),
            format!("[::ffff:{own4}]:53"),
        ),
        (
            "6",
            "connected",
            format!("::ffff:{own4}"),
            format!("[::ffff:{own4}]:53"),
        ),
    ];
    let mut script = String::new();
    for (i, (fam, mode, server, _)) in cases.iter().enumerate() {
        script.push_str(&format!(
            "echo '== {i}'; {} -c \"$CLIENT_PY\" query {fam} {mode} {server} case{i}.example 2>&1\n",
            python()
        ));
    }
    script.push_str("echo '== end'\n");
    let mut cmd = ktproxy_cmd(&[VERBOSE, "--proxy-dns"], &as_strs(&shell(&script)));
    cmd.env("CLIENT_PY", CLIENT_PY);
    let (out, pid) = run_logged(&mut cmd);
    let text = stdout(&out);
    for (i, (fam, mode, server, shown)) in cases.iter().enumerate() {
        let lines = section(&text, &i.to_string());
        let line = lines.first().copied().unwrap_or("");
        assert!(
            line.starts_with(&format!("from {shown} rcode 0 answers 198.1")),
            "AF_INET{fam} {mode} query to {server}: {line:?}\n{text}"
        );
    }
    assert_nothing_left(pid, &stderr(&out), "udp sockets");
}

/// A fake address is always intercepted, whatever -p and -x say. Without
/// an upstream ktproxy resolves the name itself: here SECRET, which only
/// ktproxy's own /etc/hosts knows (a private mount namespace), not the
/// client's. getpeername shows the fake address.
#[test]
fn fake_addresses_are_intercepted_whatever_the_rules_and_resolved_by_ktproxy_without_upstream() {
    require_root();
    let server = ServerProcess::testserver();
    let port = server.addr().port();
    let cg = TestCgroup::new("dns-rules");
    let dir = TempDir::new("dns-hosts");
    let hosts = dir.path().join("hosts");
    fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.1 {SECRET}\n")).unwrap();
    // -p names another port and -x the whole fake range: neither may stop it.
    let proxy = Proxy::start_with(
        &cg,
        &["--proxy-dns", "-p", "1", "-x", "198.18.0.0/15"],
        |cmd| private_bind_on_exec(cmd, &hosts, "/etc/hosts"),
    );
    let out = cg.run(
        python(),
        &["-c", CLIENT_PY, "getaddrinfo", SECRET, &port.to_string()],
        CLIENT_TIMEOUT,
    );
    let line = stdout(&out);
    assert!(out.status.success(), "{}\n{}", describe(&out), proxy.log());
    let words: Vec<&str> = line.split_whitespace().collect();
    let fake: IpAddr = words[1].parse().expect("an address");
    assert!(
        is_fake(fake),
        "{SECRET} resolved to {fake}, not a fake address: {line}"
    );
    assert_eq!(
        words[3],
        format!("{fake}:{port}"),
        "getpeername shows the fake address dialed"
    );
    assert!(
        line.contains(&format!("testserver at {},", server.addr())),
        "{line}"
    );
    let log = proxy.wait_log("Connection closed", LOG_TIMEOUT);
    assert!(
        log.contains(&format!("Connecting to target {SECRET}:{port} ({fake})")),
        "{log}"
    );
    assert!(
        log.contains(&format!("{SECRET} resolved to 127.0.0.1:{port}")),
        "{log}"
    );
    let mut proxy = proxy;
    proxy.stop_term();
    let counters = kernel_counters(&proxy.log()).expect("counters");
    assert!(counters["fake_redirected"] >= 1, "{counters:?}");
}

/// With a listener on a non-loopback address, the DNS socket still sits on
/// loopback: on that address it would answer (and forward for) the network.
#[test]
fn the_dns_socket_stays_on_loopback_when_the_listener_does_not() {
    require_root();
    let (own4, _) = own_addresses();
    let own4 = own4.expect("this test needs a non-loopback IPv4 address on this host");
    let cg = TestCgroup::new("dns-lan");
    let listen = format!("{own4}:0");
    let proxy = Proxy::start(&cg, &["--proxy-dns", "-l", &listen]);
    let port = proxy.addr().port();
    let out = cg.run(
        python(),
        &[
            "-c",
            CLIENT_PY,
            "query",
            "4",
            "unconnected",
            "127.0.0.53",
            "lan.example",
        ],
        CLIENT_TIMEOUT,
    );
    assert!(
        stdout(&out).starts_with("from 127.0.0.53:53 rcode 0 answers 198.1"),
        "the cgroup's DNS is answered: {}",
        describe(&out)
    );
    let wait = scaled(Duration::from_millis(500));
    assert!(
        ask_udp(SocketAddr::new(IpAddr::V4(own4), port), "lan.example", wait).is_none(),
        "the DNS socket answers on {own4}:{port}"
    );
    assert!(
        ask_udp(
            SocketAddr::new("127.0.0.1".parse().unwrap(), port),
            "lan.example",
            wait
        )
        .is_some(),
        "no DNS socket on 127.0.0.1:{port}"
    );
}

/// DNS over TCP to any server is answered by ktproxy, whatever -p says.
#[test]
fn tcp_port_53_is_answered_by_ktproxy_whatever_the_rules() {
    require_root();
    need("dig");
    let cg = TestCgroup::new("dns-tcp");
    let proxy = Proxy::start(&cg, &["--proxy-dns", "-p", "1"]);
    let out = cg.run(
        "dig",
        &[
            "+tcp",
            "+short",
            "+time=3",
            "+tries=1",
            "@127.0.0.1",
            "tcp.example",
        ],
        CLIENT_TIMEOUT,
    );
    let answer = stdout(&out);
    let ip: IpAddr = answer.trim().parse().unwrap_or_else(|_| {
        panic!(
            "dig +tcp got no address: {}\n{}",
            describe(&out),
            proxy.log()
        )
    });
    assert!(is_fake(ip), "{ip}");
    proxy.wait_log("DNS over TCP from", LOG_TIMEOUT);
}

/// A fake address that stands for no name (ktproxy restarted, say) is
/// reset with a warning naming it, and never dialed.
#[test]
fn an_unknown_fake_address_is_reset_with_a_warning_and_never_dialed() {
    require_root();
    let cg = TestCgroup::new("dns-unknown");
    let socks = EchoNameSocks::start();
    let proxy = Proxy::start(&cg, &["--proxy-dns", "-u", &socks.url()]);
    let out = cg.run(
        python(),
        &[
            "-c",
            // The reset may come before connect() has returned (it then
            // reports it) or after.
            "import socket\n\
             try:\n\
             \x20   s = socket.create_connection(('198.19.255.254', 443), timeout=5)\n\
             \x20   print(repr(s.recv(100)))\n\
             except OSError as e:\n\
             \x20   print('error', e.errno)",
        ],
        CLIENT_TIMEOUT,
    );
    assert_eq!(
        stdout(&out).trim(),
        format!("error {}", libc::ECONNRESET),
        "{}",
        describe(&out)
    );
    let log = proxy.wait_log("stands for no name", LOG_TIMEOUT);
    assert!(log.contains("198.19.255.254:443"), "{log}");
    assert!(targets(&log).is_empty(), "it was dialed: {log}");
    assert!(
        socks.asked().is_empty(),
        "the upstream was asked: {:?}",
        socks.asked()
    );
}
/// 100,000 distinct names, more than the table holds: every connect
/// reaches the name that was asked, also after the table wrapped, and
/// ktproxy's memory stops growing once the table is full.
#[test]
fn a_hundred_thousand_names_keep_memory_bounded_and_every_connect_reaches_its_name() {
    require_root();
    let cg = TestCgroup::new("dns-bulk");
    let socks = EchoNameSocks::start();
    let proxy = Proxy::start(&cg, &["--proxy-dns", "-u", &socks.url()]);
    let started = Instant::now();
    let count = std::env::var("KTPROXY_TEST_NAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000u32);
    let out = cg.run(
        python(),
        &[
            "-c",
            CLIENT_PY,
            "names",
            &count.to_string(),
            "100",
            &proxy.pid().to_string(),
            "443",
        ],
        Duration::from_secs(300),
    );
    let text = stdout(&out);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!text.contains("mismatch"), "{text}");
    let rss: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("rss "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(rss.len(), 2, "{text}");
    let checked: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("checked "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a checked line");
    assert_eq!(socks.asked().len(), checked);
    eprintln!(
        "{count} names in {:.1} s; ktproxy RSS {} KiB at 70%, {} KiB at the end; {checked} \
         connects checked",
        started.elapsed().as_secs_f64(),
        rss[0],
        rss[1]
    );
    // Past the table's capacity (65,536 of 100,000 names at 70%), more names
    // must not cost more memory.
    assert!(
        rss[1] <= rss[0] + 1024,
        "ktproxy grew from {} to {} KiB after the table was full",
        rss[0],
        rss[1]
    );
}

/// Bad input: one line naming the problem, exit 2, nothing attached.
#[test]
fn bad_names_options_are_one_line_usage_errors_and_attach_nothing() {
    require_root();
    let dir = TempDir::new("dns-bad");
    let bad_file = dir.path().join("domains");
    fs::write(&bad_file, "lan\ncorp example\n").unwrap();
    let bad = bad_file.display().to_string();
    let up = "socks5://127.0.0.1:1";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-u", up, "--fake-net", "bogus"], "--fake-net"),
        (vec!["-u", up, "--fake-net", "198.18.0.0/33"], "--fake-net"),
        (vec!["-u", up, "--fake-net", "198.18.0.0/30"], "--fake-net"),
        (
            vec!["-u", up, "--fake-net", "10.7.0.0/16", "-l", "10.7.0.1:0"],
            "contains the listen address",
        ),
        (vec!["-u", up, "--direct-domain-file", &bad], &bad),
        (
            vec!["-u", up, "--proxy-dns", "--no-proxy-dns"],
            "contradict",
        ),
    ];
    for (opts, needle) in cases {
        let (out, pid) = run_command(&opts, &["true"], RUN_TIMEOUT);
        let err = stderr(&out);
        assert_eq!(exit_code(&out), 2, "{opts:?}: {}", describe(&out));
        assert_eq!(err.lines().count(), 1, "{opts:?}: not one line: {err}");
        assert!(err.contains(needle), "{opts:?}: {err}");
        assert_nothing_left(pid, &err, &format!("{opts:?}"));
    }
    // The whole machine's resolver is not ktproxy's to take over.
    let out = run_within(
        std::process::Command::new(KTPROXY).args(["--proxy-dns", "-u", up]),
        RUN_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("--proxy-dns needs -c or COMMAND"));
    let _ = Path::new("/");
}
