//! Two instances, and loops (issue 10): a ktproxy whose scope overlaps a
//! running one refuses to start and names it; ktproxy never proxies its own
//! connections or those of a local upstream proxy back into itself.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs a ktproxy that must refuse to start because of `other`: exit 1,
/// one line naming `other`'s pid, nothing created or attached.
fn refused_because_of(cmd: &mut Command, other: &Proxy, scope: &std::path::Path) {
    let shown = format!("{cmd:?}");
    let (out, pid) = output_within_pid(cmd.stdin(Stdio::null()), Duration::from_secs(10));
    let out = out.unwrap_or_else(|o| panic!("{shown} kept running: {}", describe(&o)));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}: {}", describe(&out));
    assert!(
        err.contains(&format!("another ktproxy (pid {}", other.pid())),
        "{shown} does not name the running instance: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        !own_cgroup_of(pid).exists(),
        "{}",
        own_cgroup_of(pid).display()
    );
    assert!(!command_cgroup_of(pid).exists());
    let left: Vec<String> = attached_programs(scope)
        .into_iter()
        .filter(|n| n == "ktproxy_connect4")
        .collect();
    assert_eq!(
        left.len(),
        1,
        "only the running instance's connect4: {left:?}"
    );
}

#[test]
fn a_nested_dash_c_is_refused_naming_the_running_instance() {
    require_root();
    let cg = TestCgroup::new("nested_outer");
    let inner = ChildCgroup::new(cg.path(), "inner");
    let outer = Proxy::start(&cg, &[]);
    let mut cmd = Command::new(KTPROXY);
    cmd.arg("-c").arg(&inner.0).args(["-l", "127.0.0.1:0"]);
    refused_because_of(&mut cmd, &outer, cg.path());
    assert!(attached_programs(&inner.0).is_empty());
}

#[test]
fn a_dash_c_around_a_running_instances_cgroup_is_refused_naming_it() {
    require_root();
    let cg = TestCgroup::new("nested_around");
    let inner = ChildCgroup::new(cg.path(), "inner");
    // The running one intercepts the child cgroup; the new one would
    // intercept its parent.
    let mut cmd = Command::new(KTPROXY);
    cmd.arg("-c").arg(&inner.0).args(["-l", "127.0.0.1:0"]);
    let running = Proxy::start_command(&cg, cmd);
    let mut cmd = Command::new(KTPROXY);
    cmd.arg("-c").arg(cg.path()).args(["-l", "127.0.0.1:0"]);
    refused_because_of(&mut cmd, &running, &inner.0);
    assert!(attached_programs(cg.path()).is_empty());
}

#[test]
fn command_mode_inside_a_dash_c_instance_is_refused_naming_it() {
    require_root();
    let cg = TestCgroup::new("cmd_inside");
    let outer = Proxy::start(&cg, &[]);
    let mut cmd = cg.command(KTPROXY);
    cmd.args(["--", "true"]);
    refused_because_of(&mut cmd, &outer, cg.path());
}

#[test]
fn a_ktproxy_started_inside_another_ones_cgroup_is_refused_naming_it() {
    require_root();
    let cg = TestCgroup::new("inside_other");
    let elsewhere = TestCgroup::new("inside_other_target");
    let outer = Proxy::start(&cg, &[]);
    let mut cmd = cg.command(KTPROXY);
    cmd.arg("-c")
        .arg(elsewhere.path())
        .args(["-l", "127.0.0.1:0"]);
    refused_because_of(&mut cmd, &outer, cg.path());
    assert!(attached_programs(elsewhere.path()).is_empty());
}

/// One ktproxy running inside the very cgroup it intercepts is no overlap:
/// its own dials are never intercepted, each connection is proxied once.
#[test]
fn ktproxy_inside_its_own_dash_c_proxies_each_connection_once() {
    require_root();
    let cg = TestCgroup::new("inside_own");
    let server = HelloServer::start();
    let proxy = Proxy::start_with(&cg, &[], |cmd| join_cgroup_on_exec(cmd, cg.path()));
    assert!(
        proxy.own_cgroup().starts_with(cg.path()),
        "{}",
        proxy.own_cgroup().display()
    );
    for _ in 0..3 {
        check_route(&cg, &proxy, &server, "127.0.0.1", true);
    }
    assert_eq!(log_count(&proxy, "=== New Connection ==="), 3);
}

/// At most this many descriptors for a ktproxy that might loop: a loop on
/// a build without the fix ends at this limit, not at the machine's.
fn small_fd_limit(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let rl = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// microsocks inside the intercepted cgroup, on a free 127.0.0.1 port.
fn microsocks_in(cg: &TestCgroup) -> (KillOnDrop, std::net::SocketAddr) {
    let port = unused_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = KillOnDrop::spawn(
        cg.command(need("microsocks"))
            .args(["-i", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok()),
        "microsocks did not start on {addr}"
    );
    (child, addr)
}

/// A local upstream proxy inside the intercepted cgroup: its connections to
/// the destinations would come back to ktproxy, which sends them to it
/// again... Its process is exempt instead: each connection is proxied once.
#[test]
fn a_local_upstream_inside_the_intercepted_cgroup_is_exempt_instead_of_looping() {
    require_root();
    let cg = TestCgroup::new("upstream_loop");
    let server = HelloServer::start();
    let (_socks, socks) = microsocks_in(&cg);
    let url = format!("socks5://{socks}");
    let mut proxy = Proxy::start_with(&cg, &["-u", &url], small_fd_limit);
    let attempts = probe(&cg, server.addr(), 0.0, 0.0, 5.0);
    assert!(
        attempts[0].answered_by(&server),
        "{attempts:?}\n{}",
        tail(&proxy.log(), 30)
    );
    assert_eq!(
        log_count(&proxy, "=== New Connection ==="),
        1,
        "{}",
        tail(&proxy.log(), 30)
    );
    proxy.wait_log("runs inside the intercepted cgroup", LOG_TIMEOUT);
    proxy.stop_term();
    let counters = kernel_counters(&proxy.log()).expect("counters");
    assert!(counters["skipped_upstream"] >= 1, "{counters:?}");
}

/// ktproxy moved (by someone) out of its own cgroup into the one it
/// intercepts: its dials must still go out, not back into itself.
#[test]
fn ktproxy_moved_into_the_intercepted_cgroup_does_not_proxy_itself() {
    require_root();
    let cg = TestCgroup::new("moved_out");
    let server = HelloServer::start();
    let mut proxy = Proxy::start_with(&cg, &[], small_fd_limit);
    fs::write(cg.path().join("cgroup.procs"), proxy.pid().to_string()).unwrap();
    let attempts = probe(&cg, server.addr(), 0.0, 0.0, 5.0);
    assert!(
        attempts[0].proxied_to(&server),
        "{attempts:?}\n{}",
        tail(&proxy.log(), 30)
    );
    assert_eq!(log_count(&proxy, "=== New Connection ==="), 1);
    proxy.stop_term();
    let counters = kernel_counters(&proxy.log()).expect("counters");
    assert!(counters["skipped_proxy_own"] >= 1, "{counters:?}");
}

/// The same in another PID namespace, where ktproxy cannot name its own
/// process to the kernel: its dial is redirected into itself once, the
/// kernel recognises it there (ELOOP) and ktproxy resets it with a
/// warning. The client gets an error at once, and it stops there.
#[test]
fn a_ktproxy_in_a_pid_namespace_moved_out_of_its_cgroup_stops_the_loop_at_once() {
    require_root();
    let cg = TestCgroup::new("loop_pidns");
    let server = HelloServer::start();
    let mut cmd = Command::new(need("unshare"));
    cmd.args(["--pid", "--fork", "--kill-child=SIGTERM", KTPROXY])
        .arg("-c")
        .arg(cg.path())
        .args(["-l", "127.0.0.1:0"]);
    small_fd_limit(&mut cmd);
    let mut proxy = Proxy::start_command(&cg, cmd);
    let _own_cleanup = RemoveOnDrop(proxy.own_cgroup().to_path_buf());
    let children = fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        proxy.pid(),
        proxy.pid()
    ))
    .unwrap();
    let ktproxy: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    fs::write(cg.path().join("cgroup.procs"), ktproxy.to_string()).unwrap();

    // "At once": the client's error comes well before its own timeout
    // (which a loop that went on would run into); both scaled.
    let started = monotonic_secs();
    let attempts = probe(&cg, server.addr(), 0.0, 0.0, scaled_secs(5.0));
    assert!(
        attempts[0].reply.as_deref().unwrap_or("").is_empty(),
        "the looped connection should fail: {attempts:?}"
    );
    assert_ne!(
        attempts[0].err.as_deref(),
        Some("timed out"),
        "the looped connection hung: {attempts:?}"
    );
    assert!(
        monotonic_secs() - started < scaled_secs(3.0),
        "{attempts:?}"
    );
    proxy.wait_log("is ktproxy's own connection come back", LOG_TIMEOUT);
    // Time for a loop that went on to show in the log.
    std::thread::sleep(scaled(Duration::from_millis(300)));
    assert_eq!(
        log_count(&proxy, "=== New Connection ==="),
        2,
        "the loop went on:\n{}",
        tail(&proxy.log(), 30)
    );
    // unshare ignores SIGTERM: stop ktproxy itself (blocked and waited
    // for, the signal reaches it although it is its namespace's init).
    signal(ktproxy, libc::SIGTERM);
    assert!(proxy.stop(0, STOP_TIMEOUT).is_some());
    assert!(
        wait_until(LOG_TIMEOUT, || proxy.log().contains("kernel counters")),
        "{}",
        tail(&proxy.log(), 10)
    );
    let counters = kernel_counters(&proxy.log()).expect("counters");
    assert_eq!(counters["loop"], 1, "{counters:?}");
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = remove_cgroup_dir(&self.0, Duration::from_secs(5));
    }
}

/// The `-c` cgroup removed and created again while ktproxy was stopped, and
/// meanwhile taken by another ktproxy: re-attaching would intercept it
/// twice, so ktproxy exits non-zero, naming the other.
#[test]
fn a_recreated_cgroup_taken_by_another_instance_makes_ktproxy_exit_1_naming_it() {
    require_root();
    let cg = TestCgroup::new("recreated_taken");
    let mut first = Proxy::start(&cg, &[]);
    let stopped = Stopped::new(first.pid());
    fs::remove_dir(cg.path()).expect("rmdir of the -c cgroup");
    fs::create_dir(cg.path()).expect("mkdir of the -c cgroup");
    let second = Proxy::start(&cg, &[]);
    drop(stopped);
    let status = first
        .stop(0, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("ktproxy kept running:\n{}", tail(&first.log(), 20)));
    assert_eq!(status.code(), Some(1), "{}", tail(&first.log(), 20));
    let log = first.log();
    assert!(
        log.contains("was removed and created again")
            && log.contains(&format!("another ktproxy (pid {}", second.pid())),
        "{}",
        tail(&log, 20)
    );
    let mine: Vec<String> = attached_programs(cg.path());
    assert_eq!(
        mine.iter().filter(|n| *n == "ktproxy_connect4").count(),
        1,
        "only the second instance's: {mine:?}"
    );
}
