//! End-to-end tests of names through the proxy (issue 9): DNS answered by
//! ktproxy with fake addresses, connects by name through real upstream
//! proxies, the kernel hooks that make it invisible to clients, and a
//! command mode that leaks nothing.
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
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

/// `-v` shows the connection lines in command mode.
const VERBOSE: &str = "-v";

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

/// `sh -c SCRIPT` with the Python client in $CLIENT_PY.
fn shell(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn run_logged(cmd: &mut std::process::Command) -> (Output, u32) {
    let mut run = CommandRun::spawn(cmd);
    let out = run.finish(RUN_TIMEOUT);
    (out, run.pid())
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
    let wait = Duration::from_millis(500);
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

/// Query types ktproxy does not answer itself go to a real resolver, over
/// TCP through the upstream: the upstream's log shows the resolver.
#[test]
fn other_query_types_are_forwarded_through_the_upstream_never_directly() {
    require_root();
    need("dig");
    let resolver = CountingDns::start(private_loopback());
    let socks = microsocks_knowing_secret();
    let forward = resolver.addr.ip().to_string();
    let (out, pid) = run_command(
        &[
            VERBOSE,
            "-u",
            &socks.socks5_url(),
            "--dns-forward",
            &forward,
        ],
        &["dig", "+time=3", "+tries=1", "MX", "mail.example"],
        RUN_TIMEOUT,
    );
    let log = stderr(&out);
    socks.wait_log(&format!("connected to {}", resolver.addr));
    let (udp, tcp) = resolver.counts();
    assert_eq!(
        udp, 0,
        "a datagram reached the resolver: not through the upstream"
    );
    assert!(tcp >= 1, "the resolver was not asked over TCP:\n{log}");
    assert_nothing_left(pid, &log, "forwarded MX");
}

/// The leak test: COMMAND's resolv.conf points at a DNS server on loopback
/// that counts what reaches it. Resolving and connecting in every way above
/// sends it nothing; UDP to this host's own address never arrives; a TCP
/// connect that cannot be proxied fails with EPERM. Then the same with
/// --allow-direct and --no-proxy-dns shows that the counters would have
/// seen a leak.
#[test]
fn command_mode_with_an_upstream_leaks_nothing() {
    require_root();
    need("dig");
    need("busybox");
    let (own4, own6) = own_addresses();
    let own4 = own4.expect("this test needs a non-loopback IPv4 address on this host");
    let counting = CountingDns::start(private_loopback());
    let sink = UdpSink::start(IpAddr::V4(own4));
    let server = ServerProcess::testserver();
    let port = server.addr().port();
    let socks = microsocks_knowing_secret();
    let dir = TempDir::new("leak");
    let resolv = dir.path().join("resolv.conf");
    // One short try: the control run below lets queries reach it unanswered.
    fs::write(
        &resolv,
        format!(
            "nameserver {}\noptions timeout:1 attempts:1\n",
            counting.addr.ip()
        ),
    )
    .unwrap();
    let ns = counting.addr.ip();
    let sink_port = sink.addr.port().to_string();
    let py = python();
    let script = format!(
        "getent ahosts {SECRET} >/dev/null; echo getent $?\n\
         {py} -c \"$CLIENT_PY\" getaddrinfo {SECRET} {port} >/dev/null; echo python $?\n\
         curl -sS --noproxy '*' --max-time 10 -o /dev/null http://{SECRET}:{port}/; echo curl $?\n\
         busybox wget -q -O /dev/null http://{SECRET}:{port}/; echo wget $?\n\
         busybox nslookup {SECRET} >/dev/null; echo nslookup $?\n\
         dig +short +time=2 +tries=1 {SECRET} | grep -q .; echo dig $?\n\
         dig +tcp +short +time=2 +tries=1 {SECRET} | grep -q .; echo digtcp $?\n\
         dig +short +time=2 +tries=1 @{ns} {SECRET} | grep -q .; echo digat $?\n\
         echo udp-send $({py} -c \"$CLIENT_PY\" send 4 {own4} {sink_port})\n\
         echo udp-connect $({py} -c \"$CLIENT_PY\" udp-connect 4 {own4} {sink_port})\n\
         echo udp-mapped $({py} -c \"$CLIENT_PY\" send 6 ::ffff:{own4} {sink_port})\n\
         echo linklocal $({py} -c \"$CLIENT_PY\" tcp-connect 6 fe80::1%lo 80)\n"
    );
    let control = format!(
        "getent ahosts {SECRET} >/dev/null; echo getent $?\n\
         echo udp-send $({py} -c \"$CLIENT_PY\" send 4 {own4} {sink_port})\n"
    );
    let run = |opts: &[&str], script: &str| {
        let mut all = vec![VERBOSE, "-u"];
        let url = socks.socks5_url();
        all.push(&url);
        all.extend_from_slice(opts);
        let mut cmd = ktproxy_with_mounts(
            &[(resolv.as_path(), "/etc/resolv.conf")],
            &all,
            &as_strs(&shell(script)),
        );
        cmd.env("CLIENT_PY", CLIENT_PY);
        run_logged(&mut cmd)
    };

    let (out, pid) = run(&[], &script);
    let text = stdout(&out);
    let log = stderr(&out);
    for client in [
        "getent", "python", "curl", "wget", "nslookup", "dig", "digtcp", "digat",
    ] {
        assert!(
            text.lines().any(|l| l == format!("{client} 0")),
            "{client} failed:\n{text}\n{}",
            tail(&log, 30)
        );
    }
    for refused in ["udp-send", "udp-connect", "udp-mapped", "linklocal"] {
        assert!(
            text.lines().any(|l| l == format!("{refused} EPERM")),
            "{refused} was not refused with EPERM:\n{text}"
        );
    }
    assert_eq!(
        counting.counts(),
        (0, 0),
        "COMMAND's resolver was reached (datagrams, connections):\n{text}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.count(), 0, "UDP to {own4} arrived:\n{text}");
    let counters = kernel_counters(&log).expect("counters");
    assert!(counters["refused_udp"] >= 3, "{counters:?}");
    assert!(counters["refused_unproxyable"] >= 1, "{counters:?}");
    assert_nothing_left(pid, &log, "leak test");

    // The receivers work: let the same traffic through, and it arrives.
    let (out, _) = run(&["--allow-direct", "--no-proxy-dns"], &control);
    let text = stdout(&out);
    let log = stderr(&out);
    assert!(
        text.lines().any(|l| l == "udp-send ok"),
        "with --allow-direct the datagram is sent:\n{text}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || sink.count() >= 1),
        "the UDP sink saw {} datagrams",
        sink.count()
    );
    assert!(
        counting.counts().0 >= 1,
        "with --no-proxy-dns COMMAND asks its resolver: the counter must see it"
    );
    assert!(
        log.contains("--allow-direct"),
        "the opt-out is logged:\n{log}"
    );
    let counters = kernel_counters(&log).expect("counters");
    assert!(counters["direct_udp"] >= 1, "{counters:?}");
    let _ = own6;
}

/// A connect ktproxy cannot proxy (no listener for its family) is refused
/// in command mode with -u, except to loopback; --allow-direct lets it go.
#[test]
fn connects_to_a_family_without_listener_are_refused_unless_loopback() {
    require_root();
    let (own4, own6) = own_addresses();
    let own6 = own6.expect("this test needs a non-loopback IPv6 address on this host");
    let own4 = own4.expect("this test needs a non-loopback IPv4 address on this host");
    // Servers on this host: reachable directly, so only a refusal stops them.
    let v6 = EchoServer::start_on(SocketAddr::new(IpAddr::V6(own6), 0));
    let lo6 = EchoServer::start_on("[::1]:0".parse().unwrap());
    let v4 = EchoServer::start_on(SocketAddr::new(IpAddr::V4(own4), 0));
    let socks = EchoNameSocks::start();
    let py = python();
    let script = format!(
        "echo own6 $({py} -c \"$CLIENT_PY\" tcp-connect 6 {own6} {p6})\n\
         echo lo6 $({py} -c \"$CLIENT_PY\" tcp-connect 6 ::1 {plo})\n",
        p6 = v6.addr().port(),
        plo = lo6.addr().port()
    );
    let script4 = format!(
        "echo own4 $({py} -c \"$CLIENT_PY\" tcp-connect 4 {own4} {p4})\n",
        p4 = v4.addr().port()
    );
    let go = |listen: &str, extra: &[&str], script: &str| {
        let mut opts = vec!["-l", listen, "-u"];
        let url = socks.url();
        opts.push(&url);
        opts.extend_from_slice(extra);
        let mut cmd = ktproxy_cmd(&opts, &as_strs(&shell(script)));
        cmd.env("CLIENT_PY", CLIENT_PY);
        let (out, pid) = run_logged(&mut cmd);
        assert_nothing_left(pid, &stderr(&out), "family without listener");
        stdout(&out)
    };
    let out = go("127.0.0.1:0", &[], &script);
    assert!(out.contains("own6 EPERM"), "{out}");
    assert!(out.contains("lo6 ok"), "loopback stays as it is: {out}");
    let out = go("[::1]:0", &[], &script4);
    assert!(out.contains("own4 EPERM"), "{out}");
    let out = go("127.0.0.1:0", &["--allow-direct"], &script);
    assert!(
        out.contains("own6 ok"),
        "--allow-direct lets it through: {out}"
    );
    assert!(socks.asked().is_empty(), "{:?}", socks.asked());
}

/// nss-resolve and nscd answer over a Unix socket, so no packet would leave
/// COMMAND's cgroup. COMMAND gets `hosts: files dns` and no nscd socket: a
/// fake nscd that counts connections sees none, and the name resolves to a
/// fake address. With DNS off nothing is changed, and the fake nscd is
/// asked (which shows it would have counted).
#[test]
fn nss_resolve_and_nscd_are_bypassed_for_command() {
    require_root();
    let dir = TempDir::new("nss");
    let nss = dir.path().join("nsswitch.conf");
    fs::write(
        &nss,
        "passwd: files\nhosts: files resolve [!UNAVAIL=return] dns\n",
    )
    .unwrap();
    // A fake nscd on /run/nscd/socket, in a private /run (tmpfs) of the
    // mount namespace ktproxy runs in; it prints how often it was asked.
    let fake_nscd = r#"
import os, socket, subprocess, sys, threading
os.makedirs("/run/nscd", exist_ok=True)
s = socket.socket(socket.AF_UNIX)
s.bind("/run/nscd/socket")
s.listen(16)
n = [0]
def serve():
    while True:
        c, _ = s.accept()
        n[0] += 1
        c.close()
threading.Thread(target=serve, daemon=True).start()
r = subprocess.run(sys.argv[1:])
print("nscd connections %d" % n[0], flush=True)
sys.exit(r.returncode)
"#;
    let run = |opts: &[&str], name: &str| {
        let mut args: Vec<String> = vec![
            "-m".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-ec".into(),
            "mount -t tmpfs ktproxy-test /run; mount --bind \"$1\" /etc/nsswitch.conf; shift; \
             exec \"$@\""
                .into(),
            "sh".into(),
            nss.display().to_string(),
            python().into(),
            "-c".into(),
            fake_nscd.into(),
            KTPROXY.into(),
        ];
        args.extend(opts.iter().map(|s| s.to_string()));
        let script = format!("grep '^hosts' /etc/nsswitch.conf; getent hosts {name}");
        args.extend(["--".into(), "sh".into(), "-c".into(), script]);
        let mut cmd = std::process::Command::new(need("unshare"));
        cmd.args(&args).stdin(std::process::Stdio::null());
        let out = run_within(&mut cmd, RUN_TIMEOUT);
        (stdout(&out), stderr(&out))
    };
    let (out, log) = run(&[VERBOSE, "--proxy-dns"], "nss.example");
    assert!(out.contains("hosts: files dns\n"), "{out}\n{log}");
    assert!(out.contains("nscd connections 0"), "nscd was asked:\n{out}");
    let ip: IpAddr = out
        .lines()
        .find(|l| l.ends_with("nss.example"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("getent printed no address:\n{out}\n{log}"));
    assert!(is_fake(ip), "{ip}");
    assert!(
        log.contains("'resolve' in /etc/nsswitch.conf and nscd"),
        "{log}"
    );

    // localhost: glibc asks nscd first, then /etc/hosts; no DNS query.
    let (out, _) = run(&[VERBOSE, "--no-proxy-dns"], "localhost");
    assert!(out.contains("hosts: files resolve"), "{out}");
    assert!(
        !out.contains("nscd connections 0"),
        "without the bypass glibc asks nscd first: {out}"
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
