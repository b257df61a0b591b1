//! End-to-end tests that names through the proxy leak nothing (issue 9):
//! query types ktproxy does not answer go through the upstream, command mode
//! with -u sends nothing to a resolver and refuses what it cannot proxy, and
//! nss-resolve and nscd are bypassed.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test dns_leaks
//!
//! Safety: command mode intercepts only its own cgroup. Files the tests need
//! changed (resolv.conf and nsswitch.conf of COMMAND) are bind-mounted in
//! private mount namespaces (`unshare -m`), never written on the host.
//! Traffic stays on loopback and this host's own interface address: DNS
//! "servers" the clients ask elsewhere are never reached, which is the point.

mod common;

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;

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
    // Give a leaked datagram time to arrive before counting.
    std::thread::sleep(scaled(Duration::from_millis(300)));
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
