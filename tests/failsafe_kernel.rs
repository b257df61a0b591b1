//! Fail safe in the kernel (issue 10): connects are redirected only while
//! ktproxy proves it can accept; in command mode with an upstream what
//! cannot be proxied is refused, even after `kill -9`; failing to start
//! threads never stops accepting; a `-c` cgroup created again is followed.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// ktproxy counts as alive while its heartbeat is at most this old (the
/// kernel's HEARTBEAT_MAX_AGE_NS): the fail-safe's contract, never scaled.
const HEARTBEAT_MAX_AGE: f64 = 1.0;

/// Fail open: a stopped ktproxy (SIGSTOP, Ctrl-Z) stops renewing its
/// heartbeat, and within about a second the cgroup's new connects go
/// direct instead of waiting in the backlog of a listener nobody accepts
/// from; after SIGCONT they are intercepted again at once.
#[test]
fn sigstop_sends_new_connects_direct_within_a_second_and_sigcont_resumes_interception() {
    require_root();
    let cg = TestCgroup::new("sigstop");
    let server = HelloServer::start();
    let proxy = Proxy::start(&cg, &[]);
    let before = probe(&cg, server.addr(), 0.0, 0.0, 5.0);
    assert!(before[0].proxied_to(&server), "not intercepted: {before:?}");

    let stopped = Stopped::new(proxy.pid());
    // Every thread is stopped by now: the last heartbeat is older than this.
    let stopped_at = monotonic_secs();
    // Attempts that still reach the stopped ktproxy wait for a reply that
    // cannot come: `timeout` each, then the next one. The timeout (and so
    // the probe's length) is slack for a direct connect's reply, scaled.
    let timeout = scaled_secs(0.2);
    let during = probe(&cg, server.addr(), 2.1 + 2.0 * timeout, 0.05, timeout);
    // The contract, whatever the probe's pace: every connect that starts
    // once the heartbeat is too old goes direct (`t` is when an attempt
    // starts, on the kernel's clock), and stays direct.
    let deadline = stopped_at + HEARTBEAT_MAX_AGE;
    let late: Vec<&Attempt> = during.iter().filter(|a| a.t > deadline).collect();
    assert!(
        !late.is_empty(),
        "the probe ended before the heartbeat expired: {during:?}"
    );
    assert!(
        late.iter().all(|a| a.direct_to(&server)),
        "a connect {HEARTBEAT_MAX_AGE} s after SIGSTOP (at {stopped_at:.3}) did not go direct: \
         {during:?}"
    );
    let first_direct = during
        .iter()
        .position(|a| a.direct_to(&server))
        .expect("a direct connect");
    eprintln!(
        "first direct connect {:.2} s after SIGSTOP",
        during[first_direct].t - stopped_at
    );
    assert!(
        during[first_direct..].iter().all(|a| a.direct_to(&server)),
        "once direct, every connect must stay direct while ktproxy is stopped: {during:?}"
    );

    let resumed_at = monotonic_secs();
    drop(stopped);
    let after = probe(&cg, server.addr(), 1.5, 0.05, scaled_secs(2.0));
    let first_proxied = after
        .iter()
        .position(|a| a.proxied_to(&server))
        .unwrap_or_else(|| panic!("nothing intercepted after SIGCONT: {after:?}"));
    // "At once": as soon as ktproxy runs again; the second is slack for
    // scheduling it (scaled).
    assert!(
        after[first_proxied].t - resumed_at < scaled_secs(1.0),
        "interception resumed only {:.2} s after SIGCONT: {after:?}",
        after[first_proxied].t - resumed_at
    );
    assert!(
        after[first_proxied..].iter().all(|a| a.proxied_to(&server)),
        "after SIGCONT every connect must be intercepted again: {after:?}"
    );
}

/// Fail closed, and kill -9: COMMAND (a shell) leaves a grandchild that
/// ignores SIGTERM and keeps connecting. Once ktproxy is killed, every one
/// of its connects fails (the guard's EPERM), none goes direct. The guard
/// is attached to COMMAND's cgroup only, not with a link, and goes away
/// with that cgroup: bpftool shows it while the cgroup exists, and the
/// programs are unloaded once it is removed.
#[test]
fn kill_9_in_command_mode_leaves_a_guard_that_refuses_leftovers_until_their_cgroup_goes() {
    require_root();
    need("bpftool");
    let socks = Peer::microsocks(None);
    let server = HelloServer::start();
    let dir = TempDir::new("guard");
    let script = dir.path().join("probe.py");
    let out = dir.path().join("probe.out");
    fs::write(&script, PROBE).unwrap();
    // The probe outlives the checks below, whatever the time scale: it is
    // killed with its cgroup at the end.
    let sh = format!(
        "{} {} {} {} {} 0.05 {} >{} 2>&1 & wait",
        python(),
        script.display(),
        server.addr().ip(),
        server.addr().port(),
        scaled_secs(8.0),
        scaled_secs(0.5),
        out.display()
    );
    let mut run = CommandRun::spawn(&mut ktproxy_cmd(
        &["-u", &socks.socks5_url()],
        &["sh", "-c", &sh],
    ));
    let pid = run.pid();
    let cmd_cgroup = command_cgroup_of(pid);
    let attempts = || parse_attempts(&read_lossy(&out));
    assert!(
        wait_until(Duration::from_secs(10), || {
            attempts().iter().filter(|a| a.proxied_to(&server)).count() >= 3
        }),
        "the grandchild's connects were not proxied: {:?}\n{}",
        attempts(),
        run.stderr_now()
    );

    let killed_at = monotonic_secs();
    signal(pid as i32, libc::SIGKILL);
    assert!(
        run.wait(Duration::from_secs(5)).is_some(),
        "ktproxy survived SIGKILL"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            attempts().last().is_some_and(|a| a.t > killed_at + 2.5)
        }),
        "the grandchild stopped connecting: {:?}",
        attempts()
    );
    let after: Vec<Attempt> = attempts().into_iter().filter(|a| a.t > killed_at).collect();
    let answered: Vec<&Attempt> = after.iter().filter(|a| a.answered_by(&server)).collect();
    assert!(
        answered.is_empty(),
        "after kill -9 the leftover got through (direct): {answered:?}"
    );
    assert!(
        after.iter().any(|a| a.failed_with(libc::EPERM)),
        "no connect was refused with EPERM after kill -9: {after:?}"
    );

    // The guard, on COMMAND's cgroup, which still holds the grandchild.
    let guard: Vec<Attached> = attached(&cmd_cgroup)
        .into_iter()
        .filter(|a| a.name.starts_with("ktproxy_guard"))
        .collect();
    assert_eq!(
        guard.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        [
            "ktproxy_guard4",
            "ktproxy_guard6",
            "ktproxy_guard_sendmsg4",
            "ktproxy_guard_sendmsg6"
        ],
        "{guard:?}"
    );
    // The leak check of the other tests sees it: it can fail.
    let left = bpf_leftovers(pid);
    assert!(
        left.iter().any(|l| l.contains("ktproxy_guard4")),
        "bpf_leftovers missed the guard still attached: {left:?}"
    );

    // Remove the cgroup: the guard goes with it.
    kill_all_in(&cmd_cgroup);
    remove_cgroup_dir(&cmd_cgroup, Duration::from_secs(5)).expect("removing COMMAND's cgroup");
    let _ = remove_cgroup_dir(&own_cgroup_of(pid), Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(10), || guard
            .iter()
            .all(|g| !program_loaded(g.id))),
        "the guard outlived its cgroup: {guard:?} still loaded"
    );
    assert_eq!(bpf_leftovers(pid), Vec::<String>::new());
}

/// Sends a UDP datagram to HOST:PORT and to HOST:53, alternately with
/// sendto and with connect + send, every 50 ms for SECONDS; one line per
/// datagram: `T PORT ok|ERRNO`.
const UDP_PROBE: &str = r#"
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    for p in (port, 53):
        n += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if n % 2:
                s.sendto(b"ktproxy-leak", (host, p))
            else:
                s.connect((host, p))
                s.send(b"ktproxy-leak")
            r = "ok"
        except OSError as e:
            r = str(e.errno)
        finally:
            s.close()
        print("%f %d %s" % (time.monotonic(), p, r), flush=True)
    time.sleep(0.05)
"#;

/// The guard covers datagrams too: after kill -9 in command mode with an
/// upstream, a leftover's UDP to a non-loopback address (this host's own),
/// DNS included, is refused with EPERM and never arrives, as it was while
/// ktproxy lived (DNS went to ktproxy, the rest was refused).
#[test]
fn kill_9_in_command_mode_leaves_udp_refused_too() {
    require_root();
    let (own4, _) = own_addresses();
    let own4 = own4.expect("this test needs a non-loopback IPv4 address on this host");
    let socks = Peer::microsocks(None);
    let sink = UdpSink::start(std::net::IpAddr::V4(own4));
    let dns = CountingDns::start(std::net::IpAddr::V4(own4));
    let dir = TempDir::new("guard_udp");
    let script = dir.path().join("udp_probe.py");
    let out = dir.path().join("udp_probe.out");
    fs::write(&script, UDP_PROBE).unwrap();
    // Outlives the checks below: it is killed with its cgroup.
    let sh = format!(
        "{} {} {own4} {} {} >{} 2>&1 & wait",
        python(),
        script.display(),
        sink.addr.port(),
        scaled_secs(8.0),
        out.display()
    );
    let mut run = CommandRun::spawn(&mut ktproxy_cmd(
        &["-u", &socks.socks5_url()],
        &["sh", "-c", &sh],
    ));
    let pid = run.pid();
    let cmd_cgroup = command_cgroup_of(pid);
    // (time, port, result) of each datagram.
    let sent = || -> Vec<(f64, u16, String)> {
        read_lossy(&out)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.parse().ok()?,
                    w.next()?.parse().ok()?,
                    w.next()?.to_string(),
                ))
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || sent().len() >= 6),
        "the grandchild sent nothing: {}\n{}",
        read_lossy(&out),
        run.stderr_now()
    );

    let killed_at = monotonic_secs();
    signal(pid as i32, libc::SIGKILL);
    assert!(
        run.wait(Duration::from_secs(5)).is_some(),
        "ktproxy survived SIGKILL"
    );
    assert!(
        wait_until(Duration::from_secs(10), || sent()
            .last()
            .is_some_and(|s| s.0 > killed_at + 2.0)),
        "the grandchild stopped sending: {:?}",
        sent()
    );
    kill_all_in(&cmd_cgroup);
    let after: Vec<_> = sent().into_iter().filter(|s| s.0 > killed_at).collect();
    let eperm = libc::EPERM.to_string();
    assert!(
        after.iter().all(|s| s.2 == eperm),
        "after kill -9 a leftover's datagram was not refused with EPERM: {after:?}"
    );
    assert!(after.iter().any(|s| s.1 == 53) && after.iter().any(|s| s.1 != 53));
    // Give a leaked datagram time to arrive before counting.
    std::thread::sleep(scaled(Duration::from_millis(300)));
    assert_eq!(sink.count(), 0, "UDP reached this host's own address");
    assert_eq!(dns.counts().0, 0, "a DNS query reached this host's own :53");

    remove_cgroup_dir(&cmd_cgroup, Duration::from_secs(5)).expect("removing COMMAND's cgroup");
    let _ = remove_cgroup_dir(&own_cgroup_of(pid), Duration::from_secs(5));
}

/// Fail closed while ktproxy lives: stopped, it refuses COMMAND's connects
/// with EPERM within about a second instead of letting them hang or leak.
#[test]
fn sigstop_in_command_mode_with_an_upstream_refuses_connects_with_eperm() {
    require_root();
    let socks = Peer::microsocks(None);
    let server = HelloServer::start();
    let dir = TempDir::new("stopped_cmd");
    let script = dir.path().join("probe.py");
    let out = dir.path().join("probe.out");
    fs::write(&script, PROBE).unwrap();
    // A proxied attempt's reply may take `timeout` (slack, scaled); one
    // that reaches the stopped ktproxy hangs that long. The probe goes on
    // long enough for attempts after the heartbeat expired.
    let timeout = scaled_secs(0.3);
    let sh = format!(
        "exec {} {} {} {} {} 0.05 {timeout} >{}",
        python(),
        script.display(),
        server.addr().ip(),
        server.addr().port(),
        6.0 + 2.0 * timeout,
        out.display()
    );
    let mut run = CommandRun::spawn(&mut ktproxy_cmd(
        &["-u", &socks.socks5_url()],
        &["sh", "-c", &sh],
    ));
    let attempts = || parse_attempts(&read_lossy(&out));
    assert!(
        wait_until(Duration::from_secs(10), || attempts()
            .iter()
            .any(|a| a.proxied_to(&server))),
        "not proxied: {:?}\n{}",
        attempts(),
        run.stderr_now()
    );
    let stopped = Stopped::new(run.pid() as i32);
    // Every thread is stopped by now: the last heartbeat is older than this.
    let stopped_at = monotonic_secs();
    let deadline = stopped_at + HEARTBEAT_MAX_AGE;
    assert!(
        wait_until(Duration::from_secs(10), || attempts()
            .last()
            .is_some_and(|a| a.t > deadline + 0.5)),
        "the probe stopped: {:?}",
        attempts()
    );
    let during: Vec<Attempt> = attempts()
        .into_iter()
        .filter(|a| a.t > stopped_at)
        .collect();
    drop(stopped);
    assert!(
        !during.iter().any(|a| a.direct_to(&server)),
        "a connect went direct while ktproxy was stopped: {during:?}"
    );
    // The contract, whatever the probe's pace: every connect that starts
    // once the heartbeat is too old is refused at once.
    let late: Vec<&Attempt> = during.iter().filter(|a| a.t > deadline).collect();
    assert!(!late.is_empty(), "{during:?}");
    assert!(
        late.iter().all(|a| a.failed_with(libc::EPERM)),
        "a connect {HEARTBEAT_MAX_AGE} s after SIGSTOP (at {stopped_at:.3}) was not refused \
         with EPERM: {during:?}"
    );
    let out = run.finish(RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
}

/// Holds connections open from HOST PORT from the cgroup, one more per line
/// on stdin; prints `served` (the echo came back), `refused ERR` (reset,
/// refused or closed) or `hung` (nothing within SECONDS) for each.
const HOLDER: &str = r#"
import socket, sys
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held = []
for line in sys.stdin:
    s = socket.socket()
    s.settimeout(seconds)
    try:
        s.connect((host, port))
        s.sendall(b"ping")
        data = s.recv(16)
        print("served" if data == b"ping" else "refused eof", flush=True)
        held.append(s)
    except socket.timeout:
        print("hung", flush=True)
    except OSError as e:
        print("refused", e.errno, flush=True)
"#;

/// pids.max on ktproxy's cgroup while connections are held: starting a
/// thread fails, yet new connections are served or refused at once, never
/// left hanging; once the cap is raised they are served again.
#[test]
fn with_thread_creation_failing_new_connections_are_refused_promptly_and_served_once_it_works() {
    require_root();
    let cg = TestCgroup::new("pids_max");
    let echo = EchoServer::start();
    let proxy = Proxy::start(&cg, &[]);
    let mut holder = KillOnDrop::spawn(
        cg.command(python())
            .args([
                "-c",
                HOLDER,
                &echo.addr().ip().to_string(),
                &echo.addr().port().to_string(),
                // A hang never ends: 3 s (scaled) tell it from a slow reply.
                &scaled_secs(3.0).to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let mut to_holder = holder.0.stdin.take().unwrap();
    let mut from_holder = BufReader::new(holder.0.stdout.take().unwrap());
    let mut open = || -> String {
        writeln!(to_holder, "open").unwrap();
        let mut line = String::new();
        from_holder.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    for _ in 0..5 {
        assert_eq!(open(), "served", "{}", tail(&proxy.log(), 20));
    }

    let cap = PidsCap::new(proxy.pid());
    cap.set_max(&cap.current().to_string());
    let threads = thread_count(proxy.pid());
    let capped: Vec<String> = (0..4).map(|_| open()).collect();
    assert!(
        !capped.iter().any(|r| r == "hung"),
        "a connection hung while threads could not be started: {capped:?}\n{}\n{}",
        cap.state(),
        tail(&proxy.log(), 20)
    );
    assert!(
        capped.iter().any(|r| r.starts_with("refused")) && cap.refusals() > 0,
        "the cap never bit ({threads} threads, {} refusals): {capped:?}\n{}\n{}",
        cap.refusals(),
        cap.state(),
        tail(&proxy.log(), 20)
    );
    assert!(
        proxy.log().contains("cannot start a connection thread"),
        "{}\n{}",
        cap.state(),
        tail(&proxy.log(), 20)
    );

    cap.set_max("max");
    let mut after = Vec::new();
    let served = wait_until(Duration::from_secs(10), || {
        after.push(open());
        after.last().is_some_and(|r| r == "served")
    });
    assert!(
        served,
        "nothing served after the cap was raised: {after:?}\n{}\n{}",
        cap.state(),
        tail(&proxy.log(), 20)
    );
    assert!(
        !after.iter().any(|r| r == "hung"),
        "a connection hung after the cap was raised: {after:?}"
    );
}

/// `rmdir` then `mkdir` of the `-c` cgroup (what `systemctl restart` does):
/// the kernel drops the links with the old cgroup; ktproxy warns, attaches
/// to the new one within about a second, and intercepts its processes.
#[test]
fn a_cgroup_removed_and_created_again_is_intercepted_again_with_a_warning() {
    require_root();
    let cg = TestCgroup::new("recreated");
    let server = HelloServer::start();
    let mut proxy = Proxy::start(&cg, &[]);
    check_route(&cg, &proxy, &server, "127.0.0.1", true);

    fs::remove_dir(cg.path()).expect("rmdir of the -c cgroup");
    proxy.wait_log("was removed", LOG_TIMEOUT);
    fs::create_dir(cg.path()).expect("mkdir of the -c cgroup");
    let created_at = monotonic_secs();
    proxy.wait_log("re-attached to the new cgroup", LOG_TIMEOUT);
    // "Within about a second" (the watchdog looks every 250 ms), plus half
    // a second of slack for scheduling, scaled.
    let took = monotonic_secs() - created_at;
    assert!(
        took < 1.0 + scaled_secs(0.5),
        "re-attached only after {took:.2} s"
    );
    check_route(&cg, &proxy, &server, "127.0.0.1", true);
    let names = attached_programs(cg.path());
    assert!(names.iter().any(|n| n == "ktproxy_connect4"), "{names:?}");

    let status = proxy.stop_term();
    assert!(status.success(), "{status:?}");
    assert!(attached_programs(cg.path()).is_empty());
}
