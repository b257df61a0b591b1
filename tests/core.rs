//! End-to-end tests of ktproxy's core behaviour: what it intercepts and
//! relays, what it leaves alone, how it stops, and how it refuses bad input.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test core
//! Every test has its own cgroup, its own ktproxy on a free port and its own
//! servers, so they run in parallel.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

// ---- relaying ---------------------------------------------------------------------

#[test]
fn curl_get_through_the_proxy_reaches_the_dialed_server() {
    require_root();
    let cg = TestCgroup::new("curl_get");
    let server = ServerProcess::testserver();
    let proxy = Proxy::start(&cg, &[]);
    let target = server.addr();

    let url = format!("http://{target}/");
    let out = cg.run(
        "curl",
        &["-sS", "--noproxy", "*", "--max-time", "10", &url],
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "curl: {}", describe(&out));
    let body = stdout(&out);
    assert!(
        body.contains(&format!("testserver at {target},")),
        "the reply does not name {target}: {body}"
    );

    let log = proxy.wait_log("Connection closed", LOG_TIMEOUT);
    for needle in [
        "=== New Connection ===",
        "Proxy Server: ",
        "Client: ",
        &format!("Connecting to target {target}"),
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    let established = log
        .lines()
        .find(|l| l.contains("Proxy connection established, from "))
        .unwrap_or_else(|| panic!("no established line:\n{log}"));
    assert!(
        established.ends_with(&format!(" to {target}")),
        "{established}"
    );
    let closed = log
        .lines()
        .find(|l| l.contains("Connection closed"))
        .unwrap();
    let (sent, received) =
        byte_counts(closed).unwrap_or_else(|| panic!("no byte counts in: {closed}"));
    assert!(sent > 0 && received > 0, "{closed}");
}

#[test]
fn bulk_32_mib_each_way_arrives_intact() {
    require_root();
    const BYTES: u64 = 32 << 20;
    let cg = TestCgroup::new("bulk_32_mib");
    let echo = EchoServer::start();
    let proxy = Proxy::start(&cg, &[]);

    let out = cg.run(
        TESTCLIENT,
        &[
            "echo",
            &echo.addr().to_string(),
            "--bytes",
            &BYTES.to_string(),
        ],
        Duration::from_secs(90),
    );
    assert!(out.status.success(), "testclient echo: {}", describe(&out));

    let log = proxy.wait_log("Connection closed", LOG_TIMEOUT);
    let closed = log
        .lines()
        .find(|l| l.contains("Connection closed"))
        .unwrap();
    assert_eq!(byte_counts(closed), Some((BYTES, BYTES)), "{closed}");
}

#[test]
#[allow(non_snake_case)] // named after `nc -N`
fn half_close_is_forwarded_nc_N() {
    require_root();
    let cg = TestCgroup::new("half_close");
    let server = ReplyAfterEofServer::start();
    let proxy = Proxy::start(&cg, &[]);

    let (ip, port) = (server.addr().ip().to_string(), server.addr().port());
    let out = cg.run(
        "sh",
        &[
            "-c",
            r#"printf hello | exec nc -N "$0" "$1""#,
            &ip,
            &port.to_string(),
        ],
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success(), "nc -N: {}", describe(&out));
    assert_eq!(stdout(&out), "got 5 bytes\n", "{}", describe(&out));
    proxy.wait_log(
        &format!("Proxy connection established, from {ip}:"),
        LOG_TIMEOUT,
    );
}

#[test]
fn twenty_thousand_sequential_connections_each_reach_the_server_dialed() {
    require_root();
    const COUNT: u64 = 20_000;
    let cg = TestCgroup::new("twenty_thousand");
    let a = HelloServer::start();
    let b = HelloServer::start();
    let mut proxy = Proxy::start(&cg, &[]);

    let started = Instant::now();
    // The bound only catches a hang (it is scaled): the connection rate is
    // scripts/bench.sh's to measure ("new connections/s").
    let out = cg.run(
        TESTCLIENT,
        &[
            "hello",
            &a.addr().to_string(),
            "--alt",
            &b.addr().to_string(),
            "--count",
            &COUNT.to_string(),
        ],
        Duration::from_secs(180),
    );
    assert!(out.status.success(), "testclient hello: {}", describe(&out));
    eprintln!(
        "{COUNT} connections in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        stdout(&out).trim()
    );
    a.wait_peers(COUNT as usize / 2, LOG_TIMEOUT);
    b.wait_peers(COUNT as usize / 2, LOG_TIMEOUT);

    // Each entry lives only between the client's and ktproxy's handshake.
    let flows = map_entry_count(proxy_map_id(&proxy, "flows"));
    eprintln!("flows map: {flows} entries");
    assert!(flows < 64, "{flows} entries left in the flows map");

    let status = proxy.stop_term();
    assert!(status.success(), "ktproxy exited with {status}");
    let log = proxy.log();
    let c = kernel_counters(&log)
        .unwrap_or_else(|| panic!("no kernel counters line:\n{}", tail(&log, 10)));
    eprintln!("kernel counters: {c:?}");
    let redirected = c.get("redirected").copied().unwrap_or(0);
    assert!(redirected >= COUNT, "counters {c:?}");
    assert_eq!(c.get("flows_claimed"), Some(&redirected), "counters {c:?}");
}

#[test]
fn dialing_the_proxy_port_directly_is_closed_with_a_warning() {
    require_root();
    let cg = TestCgroup::new("direct_dial");
    let proxy = Proxy::start(&cg, &[]);

    // The test process is outside the cgroup: this is a plain connection.
    // ktproxy closes it at once; the bound catches a connection left open.
    let bound = scaled(Duration::from_secs(2));
    let started = Instant::now();
    let mut s =
        TcpStream::connect_timeout(&proxy.addr(), bound).expect("connecting to the proxy port");
    s.set_read_timeout(Some(bound)).unwrap();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!(
            "expected EOF or reset within {bound:?}, got {other:?} after {:?}",
            started.elapsed()
        ),
    }
    proxy.wait_log("has no original destination", LOG_TIMEOUT);
}

/// testclient's `ok: ... after N ms` (see expect-reset): N, the time from
/// before its connect to the refusal, reset or EOF, without its start-up.
fn reset_after(out: &std::process::Output) -> Duration {
    let text = stdout(out);
    let ms = text
        .split_once(" after ")
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no time in testclient's line: {}", describe(out)));
    Duration::from_millis(ms)
}

#[test]
fn refused_target_resets_the_client_promptly() {
    require_root();
    let cg = TestCgroup::new("refused_target");
    // A connect timeout far above the bound below: waiting it out cannot
    // pass for prompt, whatever the time scale.
    let proxy = Proxy::start(&cg, &["--connect-timeout", "600"]);
    let dead = format!("127.0.0.1:{}", unused_port());

    // "Promptly": the refusal is passed on as soon as it comes; the bound
    // is slack for scheduling only.
    let bound = scaled(Duration::from_secs(2)).min(Duration::from_secs(300));
    let out = cg.run(
        TESTCLIENT,
        &[
            "expect-reset",
            &dead,
            "--within",
            &bound.as_millis().to_string(),
        ],
        CLIENT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "testclient expect-reset: {}",
        describe(&out)
    );
    assert!(reset_after(&out) < bound, "{}", describe(&out));
    proxy.wait_log("Connection refused", LOG_TIMEOUT);
    assert!(proxy
        .log()
        .contains(&format!("Connecting to target {dead}")));
}

#[test]
fn unanswered_target_resets_the_client_after_the_connect_timeout() {
    require_root();
    let cg = TestCgroup::new("silent_target");
    // A listener whose accept queue is full drops further SYNs: a
    // destination that does not answer, without leaving loopback.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) again on a listening socket only resizes its queue.
    assert_eq!(unsafe { libc::listen(silent.as_raw_fd(), 0) }, 0);
    let target = silent.local_addr().unwrap();
    // One connection fills a queue of length 0; the second attempt only
    // confirms that SYNs are now dropped.
    let _queued = TcpStream::connect_timeout(&target, scaled(Duration::from_secs(2))).unwrap();
    assert!(TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_err());
    let proxy = Proxy::start(&cg, &["--connect-timeout", "0.5"]);

    // The contract is the 0.5 s given; the test adds 1.5 s of slack for
    // scheduling (scaled), but stays below the default connect timeout of
    // 10 s, which an ignored --connect-timeout would show.
    let contract = Duration::from_millis(500);
    let bound = contract + scaled(Duration::from_millis(1500)).min(Duration::from_secs(8));
    let out = cg.run(
        TESTCLIENT,
        &[
            "expect-reset",
            &target.to_string(),
            "--within",
            &(bound + Duration::from_secs(1)).as_millis().to_string(),
        ],
        CLIENT_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "testclient expect-reset: {}",
        describe(&out)
    );
    let took = reset_after(&out);
    assert!(
        took >= contract - Duration::from_millis(100) && took < bound,
        "reset after {took:?}, expected about the 0.5 s connect timeout (at most {bound:?})"
    );
    proxy.wait_log("no answer within 0.5 s", LOG_TIMEOUT);
}

// ---- what is not intercepted ---------------------------------------------------------

#[test]
fn process_outside_the_cgroup_is_not_intercepted() {
    require_root();
    let cg = TestCgroup::new("outside");
    let server = HelloServer::start();
    let proxy = Proxy::start(&cg, &[]);

    let mut s = TcpStream::connect_timeout(&server.addr(), scaled(Duration::from_secs(2)))
        .expect("connecting to the hello server");
    let local = s.local_addr().unwrap();
    s.set_read_timeout(Some(scaled(Duration::from_secs(2))))
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reading the reply");
    assert_eq!(reply, format!("{}\n", server.addr()));
    assert_eq!(server.wait_peers(1, LOG_TIMEOUT)[0], local);
    assert!(!proxy.log().contains("New Connection"), "{}", proxy.log());
}

#[test]
fn port_outside_dash_p_is_not_intercepted() {
    require_root();
    let cg = TestCgroup::new("port_filter");
    let server = HelloServer::start();
    let port = server.addr().port();
    let other = if port == 65535 { 1 } else { port + 1 };

    {
        let mut proxy = Proxy::start(&cg, &["-p", &other.to_string()]);
        let (peer, local) = client_peer(&cg, server.addr());
        assert_eq!(peer, server.addr());
        assert_eq!(
            server.wait_peers(1, LOG_TIMEOUT)[0],
            local,
            "the server should see the client itself"
        );
        assert!(!proxy.log().contains("New Connection"), "{}", proxy.log());
        assert!(proxy.stop_term().success());
    }

    // Positive control: the same client, with the server's port listed.
    let proxy = Proxy::start(&cg, &["-p", &port.to_string()]);
    let (peer, local) = client_peer(&cg, server.addr());
    assert_eq!(
        peer,
        server.addr(),
        "getpeername must show the dialed server"
    );
    let seen = server.wait_peers(2, LOG_TIMEOUT)[1];
    assert_ne!(seen, local, "the server should see ktproxy, not the client");
    proxy.wait_log(&format!("Client: {local}"), LOG_TIMEOUT);
    proxy.wait_log(
        &format!("Connecting to target {}", server.addr()),
        LOG_TIMEOUT,
    );
}

#[test]
fn other_network_namespace_is_not_intercepted() {
    require_root();
    let cg = TestCgroup::new("other_netns");
    let ns = NetNs::new();
    let server = ServerProcess::start(ns.command(TESTSERVER).args(["-l", "127.0.0.1:0"]), 1);
    let proxy = Proxy::start(&cg, &[]);

    // In the cgroup (pre_exec) and in the namespace (ip netns exec).
    let mut cmd = cg.command("ip");
    cmd.args(ns.exec_args(TESTCLIENT))
        .args(["hello", &server.addr().to_string()]);
    let out = run_within(&mut cmd, CLIENT_TIMEOUT);
    assert!(
        out.status.success(),
        "client in the other namespace: {}",
        describe(&out)
    );
    assert!(!proxy.log().contains("New Connection"), "{}", proxy.log());
}

// ---- stopping -------------------------------------------------------------------------

#[test]
fn kill_9_leaves_nothing_attached_and_connections_go_direct() {
    require_root();
    let cg = TestCgroup::new("kill_9");
    let server = HelloServer::start();
    let mut proxy = Proxy::start(&cg, &[]);
    let own = proxy.own_cgroup().to_path_buf();
    // What `refuses` relies on to find a failed ktproxy's cgroup.
    assert_eq!(own, own_cgroup_of(proxy.pid() as u32));
    assert!(
        !attached_programs(cg.path()).is_empty(),
        "nothing attached to {} while ktproxy runs",
        cg.path().display()
    );

    let status = proxy.kill9();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let left = wait_detached(cg.path(), Duration::from_secs(2));
    assert!(left.is_empty(), "still attached after kill -9: {left:?}");
    let left = wait_detached(&own, Duration::from_secs(2));
    assert!(
        left.is_empty(),
        "still attached to {}: {left:?}",
        own.display()
    );

    let (peer, local) = client_peer(&cg, server.addr());
    assert_eq!(peer, server.addr());
    assert_eq!(server.wait_peers(1, LOG_TIMEOUT)[0], local);

    // The one thing kill -9 leaves: ktproxy's empty cgroup (another ktproxy
    // starting meanwhile may have removed it already).
    remove_cgroup_dir(&own, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("removing {}: {e}", own.display()));
    assert!(!own.exists());
}

/// ktproxy stops on `sig` with a proxied connection open: exit status 0
/// within 2 s, nothing attached, its own cgroup removed.
fn exits_0_within_2s_with_connections_open(sig: libc::c_int, name: &str) {
    require_root();
    let cg = TestCgroup::new(name);
    let echo = EchoServer::start();
    let mut proxy = Proxy::start(&cg, &[]);
    let own = proxy.own_cgroup().to_path_buf();

    // nc stays connected as long as its stdin (our pipe) stays open.
    let mut nc = KillOnDrop::spawn(
        cg.command("nc")
            .args([echo.addr().ip().to_string(), echo.addr().port().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    proxy.wait_log("Proxy connection established", LOG_TIMEOUT);
    echo.wait_peers(1, LOG_TIMEOUT);
    assert!(matches!(nc.0.try_wait(), Ok(None)), "nc exited early");

    let started = Instant::now();
    let status = proxy.stop(sig, Duration::from_secs(2)).unwrap_or_else(|| {
        panic!(
            "ktproxy still running {:?} after signal {sig}",
            scaled(Duration::from_secs(2))
        );
    });
    let took = started.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "ktproxy exited with {status} after signal {sig}"
    );
    eprintln!("signal {sig}: ktproxy exited in {took:?}");
    let left = attached_programs(cg.path());
    assert!(left.is_empty(), "still attached after exit: {left:?}");
    assert!(!own.exists(), "{} left behind", own.display());
}

#[test]
fn sigterm_exits_0_within_2s_with_connections_open_and_detaches() {
    exits_0_within_2s_with_connections_open(libc::SIGTERM, "sigterm");
}

#[test]
fn sigint_exits_0_within_2s_with_connections_open_and_detaches() {
    exits_0_within_2s_with_connections_open(libc::SIGINT, "sigint");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    n(14) + n(15)
}

#[test]
fn running_out_of_file_descriptors_neither_spins_nor_stops_the_accept_loop() {
    require_root();
    let cg = TestCgroup::new("emfile");
    let echo = EchoServer::start();
    // Room for a handful of connections beyond what ktproxy holds when idle
    // (BPF objects, listeners, stdio), set on the running process.
    let proxy = Proxy::start(&cg, &[]);
    set_fd_limit(proxy.pid() as u32, fd_count(proxy.pid() as u32) + 12);
    // 30 connections held open from the cgroup: more than ktproxy can take.
    let script = format!(
        "import socket, sys, time\n\
         held = [socket.create_connection(('{}', {}), timeout=5) for _ in range(30)]\n\
         print('held', len(held), flush=True)\n\
         sys.stdin.read()\n",
        echo.addr().ip(),
        echo.addr().port()
    );
    let mut holder = KillOnDrop::spawn(
        cg.command("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    proxy.wait_log("Too many open files", LOG_TIMEOUT);

    // Out of descriptors with connections waiting: a loop that retried at
    // once would burn a whole CPU. What ktproxy does meanwhile (its 250 ms
    // ticks) costs more CPU time where the CPU is emulated: 20% of a CPU,
    // scaled, but at most half of one, well below a spin.
    let t0 = cpu_ticks(proxy.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(proxy.pid()) - t0;
    // SAFETY: sysconf cannot fail for _SC_CLK_TCK.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let share = scaled_secs(0.2).min(0.5);
    assert!(
        (used as f64) < hz as f64 * share,
        "ktproxy used {used} ticks (of {hz} per second) while out of descriptors: spinning?\n{}",
        tail(&proxy.log(), 20)
    );

    // Once the held connections close, ktproxy serves new ones again.
    drop(holder.0.stdin.take());
    let recovered = wait_until(Duration::from_secs(10), || {
        cg.run(
            TESTCLIENT,
            &["echo", &echo.addr().to_string(), "--bytes", "1000"],
            CLIENT_TIMEOUT,
        )
        .status
        .success()
    });
    assert!(
        recovered,
        "no connection got through after the descriptors were freed:\n{}",
        tail(&proxy.log(), 20)
    );
}

// ---- bad input --------------------------------------------------------------------------

/// Runs a ktproxy that must refuse to start. Checks what every refusal must
/// do (one line on stderr, nothing attached to the cgroup, no ktproxy-<pid>
/// cgroup left) and returns (exit code, stderr).
fn refuses(cg: &TestCgroup, cmd: &mut Command) -> (i32, String) {
    let shown = format!("{cmd:?}");
    let (out, pid) = output_within_pid(cmd.stdin(Stdio::null()), Duration::from_secs(10));
    let out = out.unwrap_or_else(|o| panic!("{shown} kept running: {}", describe(&o)));
    let stderr = stderr(&out);
    assert_eq!(
        stderr.lines().count(),
        1,
        "{shown}: expected exactly one line on stderr: {}",
        describe(&out)
    );
    let left = attached_programs(cg.path());
    assert!(left.is_empty(), "{shown} left {left:?} attached");
    let own = own_cgroup_of(pid);
    assert!(!own.exists(), "{shown} left {} behind", own.display());
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("{shown} died of a signal: {}", describe(&out)));
    (code, stderr)
}

#[test]
fn not_root_exits_1_naming_root_and_the_capabilities() {
    require_root();
    let cg = TestCgroup::new("not_root");
    let copy = UnprivilegedKtproxy::new();
    let mut cmd = copy.command(&ktproxy_command(&cg, &[]));
    let (code, err) = refuses(&cg, &mut cmd);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("root"), "{err}");
    assert!(
        err.contains("CAP_BPF") || err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
}

#[test]
fn without_cgroup_v2_mounted_exits_1_saying_so() {
    require_root();
    let cg = TestCgroup::new("no_cgroup2");
    let root = cgroup2_root();
    // Unmounted only in a private mount namespace that unshare creates; if
    // unshare fails, nothing runs at all.
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"umount -l "$0" && exec "$1" -c /tmp -l 127.0.0.1:0"#,
    ])
    .arg(&root)
    .arg(KTPROXY);
    let (code, err) = refuses(&cg, &mut cmd);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cgroup v2"), "{err}");
    assert!(
        root.join("cgroup.procs").exists(),
        "the real cgroup v2 mount must be untouched"
    );
}

#[test]
fn nonexistent_cgroup_exits_1_naming_the_path() {
    require_root();
    let cg = TestCgroup::new("nonexistent");
    assert!(!Path::new("/nonexistent").exists());
    let mut cmd = Command::new(KTPROXY);
    cmd.args(["-c", "/nonexistent", "-l", "127.0.0.1:0"]);
    let (code, err) = refuses(&cg, &mut cmd);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
}

#[test]
fn ordinary_directory_as_cgroup_exits_1_not_a_cgroup_v2_directory() {
    require_root();
    let cg = TestCgroup::new("ordinary_dir");
    let mut cmd = Command::new(KTPROXY);
    cmd.args(["-c", "/tmp", "-l", "127.0.0.1:0"]);
    let (code, err) = refuses(&cg, &mut cmd);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a cgroup v2 directory"), "{err}");
}

#[test]
fn bad_arguments_exit_2_with_one_line_naming_them() {
    require_root();
    let cg = TestCgroup::new("bad_arguments");
    let cases: [(&[&str], &str); 6] = [
        (&["-p", "0"], "'0'"),
        (&["-p", "90-80"], "90-80"),
        (&["-p", "http"], "http"),
        (&["-l", "nonsense"], "nonsense"),
        (&["-l", "127.0.0.1:99999"], "127.0.0.1:99999"),
        (&["--bogus"], "bogus"),
    ];
    for (args, named) in cases {
        let (code, err) = refuses(&cg, &mut ktproxy_command(&cg, args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(named), "{args:?} should name {named}: {err}");
    }
}

#[test]
fn listen_address_in_use_exits_1_and_leaves_nothing_behind() {
    require_root();
    let cg = TestCgroup::new("listen_in_use");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = refuses(&cg, &mut ktproxy_command(&cg, &["-l", &addr]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Address already in use"), "{err}");
    assert!(err.contains(&addr), "should name {addr}: {err}");
}

#[test]
fn help_lists_the_options_and_version_exits_0() {
    require_root();
    let cg = TestCgroup::new("help_version");
    let out = run_within(
        &mut ktproxy_command(&cg, &["--help"]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "--help: {}", describe(&out));
    let help = stdout(&out);
    for opt in ["--listen", "--cgroup", "--ports"] {
        assert!(help.contains(opt), "--help lacks {opt}:\n{help}");
    }
    let out = run_within(
        &mut ktproxy_command(&cg, &["--version"]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "--version: {}", describe(&out));
    assert!(stdout(&out).starts_with("ktproxy "), "{}", describe(&out));
    assert!(attached_programs(cg.path()).is_empty());
}
