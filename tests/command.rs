//! End-to-end tests of "proxy one command" (`ktproxy [OPTIONS] -- COMMAND`):
//! exit status, what COMMAND inherits, its own cgroup, signals, leftovers.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test command
//!
//! Safety: command mode creates and intercepts only its own cgroup,
//! `<ktproxy's cgroup>/ktproxy-<pid>-cmd`, so these tests never pass `-c`.
//! Traffic stays on 127.0.0.1 and ::1. Every wait is bounded; a ktproxy
//! that outlives its test is killed by pid and whatever its COMMAND left in
//! `ktproxy-<pid>-cmd` with it.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The listen addresses from a `-v` log's ready line.
fn listen_addrs(log: &str) -> Vec<SocketAddr> {
    let line =
        ready_line(log).unwrap_or_else(|| panic!("no ready line in the log:\n{}", tail(log, 20)));
    parse_listen_addrs(line).unwrap_or_else(|| panic!("no listen addresses in: {line}"))
}

/// An ELF executable without a PT_INTERP program header is statically
/// linked: no dynamic loader runs, so LD_PRELOAD (proxychains) cannot work.
fn is_statically_linked(path: &Path) -> Result<bool, String> {
    let b = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err(format!("{} is not an ELF file", path.display()));
    }
    let le = b[5] == 1;
    let uint = |at: usize, len: usize| -> Result<u64, String> {
        let bytes = b
            .get(at..at + len)
            .ok_or_else(|| format!("{}: truncated ELF header", path.display()))?;
        let mut v = 0u64;
        for i in 0..len {
            let byte = if le { bytes[len - 1 - i] } else { bytes[i] };
            v = (v << 8) | u64::from(byte);
        }
        Ok(v)
    };
    let (phoff, phentsize, phnum) = match b[4] {
        2 => (uint(0x20, 8)?, uint(0x36, 2)?, uint(0x38, 2)?),
        1 => (uint(0x1c, 4)?, uint(0x2a, 2)?, uint(0x2c, 2)?),
        c => return Err(format!("{}: unknown ELF class {c}", path.display())),
    };
    const PT_INTERP: u64 = 3;
    for i in 0..phnum {
        if uint((phoff + i * phentsize) as usize, 4)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

#[test]
fn command_exit_status_is_passed_through_and_128_plus_signal() {
    require_root();
    need("sh");
    let cases: [(&str, i32); 4] = [
        ("exit 0", 0),
        ("exit 7", 7),
        ("kill -9 $$", 128 + 9),
        ("kill -TERM $$", 128 + 15),
    ];
    for (script, want) in cases {
        let (out, pid) = run_command(&[], &["sh", "-c", script], RUN_TIMEOUT);
        assert_eq!(
            exit_code(&out),
            want,
            "sh -c '{script}': {}",
            describe(&out)
        );
        assert_nothing_left(pid, &stderr(&out), script);
    }
}

#[test]
fn missing_command_exits_127_and_non_executable_126_with_one_line() {
    require_root();
    let missing = "ktproxy-test-no-such-command";
    let (out, pid) = run_command(&[], &[missing, "arg"], RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 127, "{}", describe(&out));
    let err = stderr(&out);
    assert_eq!(
        err.lines().count(),
        1,
        "one line expected: {}",
        describe(&out)
    );
    assert!(
        err.contains(&format!(
            "cannot run '{missing}': No such file or directory"
        )),
        "{err}"
    );
    assert_nothing_left(pid, &stderr(&out), missing);

    let (out, pid) = run_command(&[], &["/etc/passwd"], RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 126, "{}", describe(&out));
    let err = stderr(&out);
    assert_eq!(
        err.lines().count(),
        1,
        "one line expected: {}",
        describe(&out)
    );
    assert!(
        err.contains("cannot run '/etc/passwd': Permission denied"),
        "{err}"
    );
    assert_nothing_left(pid, &stderr(&out), "/etc/passwd");
}

/// COMMAND runs as it would without ktproxy: same stdin, working directory
/// and environment, and the blocked and ignored standard signals (1-31) a
/// direct child of the test gets (ktproxy blocks signals for itself, and
/// Rust ignores SIGPIPE: COMMAND must inherit neither). Signals 32 and 33
/// are glibc's own and are left out.
#[test]
fn command_gets_stdin_cwd_environment_and_signal_state_of_a_direct_child() {
    require_root();
    need("sh");
    let dir = TempDir::new("passthrough");
    let input = dir.path().join("input");
    fs::write(&input, "line from stdin\n").unwrap();
    let script = r#"read -r line; echo "stdin=$line"; echo "cwd=$(pwd)"; echo "env=$KTPROXY_TEST_VAR"; blk=$(awk '/^SigBlk:/ {print $2}' /proc/self/status); ign=$(awk '/^SigIgn:/ {print $2}' /proc/self/status); echo "blocked=$((0x$blk & 0x7fffffff)) ignored=$((0x$ign & 0x7fffffff))""#;

    let mut direct = Command::new("sh");
    direct
        .args(["-c", script])
        .current_dir(dir.path())
        .env("KTPROXY_TEST_VAR", "some value")
        .stdin(fs::File::open(&input).unwrap());
    let want = output_within(&mut direct, RUN_TIMEOUT)
        .unwrap_or_else(|o| panic!("sh did not finish: {}", describe(&o)));
    assert!(want.status.success(), "{}", describe(&want));

    let mut cmd = ktproxy_cmd(&[], &["sh", "-c", script]);
    cmd.current_dir(dir.path())
        .env("KTPROXY_TEST_VAR", "some value")
        .stdin(fs::File::open(&input).unwrap());
    let mut run = CommandRun::spawn(&mut cmd);
    let out = run.finish(RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    let got = stdout(&out);
    assert!(got.contains("stdin=line from stdin\n"), "{got}");
    assert!(got.contains("env=some value\n"), "{got}");
    assert_eq!(
        got,
        stdout(&want),
        "COMMAND's view differs from a direct child's"
    );
    assert_eq!(stderr(&out), "", "{}", describe(&out));
    assert_nothing_left(run.pid(), &run.stderr_now(), "passthrough");
}

#[test]
fn dash_c_together_with_command_is_refused_exit_2() {
    require_root();
    let cg = TestCgroup::new("dash_c_with_command");
    let dir = TempDir::new("dash_c");
    let marker = dir.path().join("ran");
    // Not through ktproxy_cmd, which refuses -c itself.
    let mut cmd = Command::new(KTPROXY);
    cmd.arg("-c")
        .arg(cg.path())
        .args(["--", "touch"])
        .arg(&marker)
        .stdin(Stdio::null());
    let mut run = CommandRun::spawn(&mut cmd);
    let out = run.finish(RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 2, "{}", describe(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", describe(&out));
    assert!(stderr(&out).contains("-c/--cgroup"), "{}", describe(&out));
    assert!(!marker.exists(), "COMMAND ran although ktproxy refused");
    assert!(attached_programs(cg.path()).is_empty());
    assert_nothing_left(run.pid(), &run.stderr_now(), "-c with COMMAND");
}

#[test]
fn command_connections_are_proxied_and_quiet_without_v() {
    require_root();
    need("curl");
    let server = ServerProcess::testserver();
    let url = format!("http://{}/", server.addr());
    let command = curl_command(&url);
    let command = as_strs(&command);

    let (out, pid) = run_command(&["-v"], &command, RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    assert_body_from(&stdout(&out), server.addr());
    let log = stderr(&out);
    assert!(
        log.contains(&format!(
            "intercepting cgroup {}",
            command_cgroup_of(pid).display()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("Connecting to target {}", server.addr())),
        "{log}"
    );
    assert!(log.contains("Proxy connection established"), "{log}");
    assert_nothing_left(pid, &stderr(&out), "-v curl");

    // Quiet by default: COMMAND's output only.
    let (out, pid) = run_command(&[], &command, RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    assert_body_from(&stdout(&out), server.addr());
    assert_eq!(
        stderr(&out),
        "",
        "ktproxy printed something without -v: {}",
        describe(&out)
    );
    assert_nothing_left(pid, &stderr(&out), "curl");
}

#[test]
fn forking_command_has_all_its_connections_proxied() {
    require_root();
    need("curl");
    need("sh");
    let a = ServerProcess::testserver();
    let b = ServerProcess::testserver();
    let script = format!(
        "curl -sS --noproxy '*' --max-time 10 http://{}/ && curl -sS --noproxy '*' --max-time 10 http://{}/",
        a.addr(),
        b.addr()
    );
    let (out, pid) = run_command(&["-v"], &["sh", "-c", &script], RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    assert_body_from(&stdout(&out), a.addr());
    assert_body_from(&stdout(&out), b.addr());
    let log = stderr(&out);
    assert_eq!(
        targets(&log),
        vec![a.addr().to_string(), b.addr().to_string()],
        "{log}"
    );
    assert_eq!(
        log.matches("Proxy connection established").count(),
        2,
        "{log}"
    );
    assert_nothing_left(pid, &stderr(&out), "sh -c 'curl; curl'");
}

#[test]
fn command_runs_in_its_own_cgroup_which_is_gone_afterwards() {
    require_root();
    need("curl");
    need("bpftool");
    let server = ServerProcess::testserver();
    // From inside: where COMMAND is, and what is attached while it runs.
    let script = format!(
        "cat /proc/self/cgroup; echo ===; \
         for i in 1 2 3 4 5 6 7 8 9 10; do \
           t=$(bpftool cgroup tree 2>/dev/null) && {{ echo \"$t\"; break; }}; sleep 0.1; \
         done; echo ===; \
         curl -sS --noproxy '*' --max-time 10 http://{}/",
        server.addr()
    );
    let (out, pid) = run_command(&["-v"], &["sh", "-c", &script], RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    let text = stdout(&out);
    let parts: Vec<&str> = text.split("===\n").collect();
    assert_eq!(parts.len(), 3, "{text}");

    let v2 = parts[0]
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line in /proc/self/cgroup: {}", parts[0]));
    assert!(
        v2.ends_with(&format!("/ktproxy-{pid}-cmd")),
        "COMMAND ran in {v2}, not in ktproxy-{pid}-cmd"
    );
    assert_eq!(
        cgroup2_root().join(v2.trim_start_matches('/')),
        command_cgroup_of(pid)
    );
    // Positive control for the check below: while it ran, bpftool saw both.
    let during = tree_mentions(parts[1], pid);
    assert_eq!(during.len(), 2, "{}", parts[1]);
    assert!(
        parts[1].contains("ktproxy_connect4"),
        "nothing attached while COMMAND ran:\n{}",
        parts[1]
    );
    assert_body_from(parts[2], server.addr());
    assert!(stderr(&out).contains("Proxy connection established"));

    assert_nothing_left(pid, &stderr(&out), "after the run");
}

#[test]
fn two_concurrent_commands_do_not_interfere() {
    require_root();
    const COUNT: usize = 200;
    let servers: Vec<HelloServer> = (0..4).map(|_| HelloServer::start()).collect();
    let (a1, b1, a2, b2) = (
        servers[0].addr().to_string(),
        servers[1].addr().to_string(),
        servers[2].addr().to_string(),
        servers[3].addr().to_string(),
    );
    let count = COUNT.to_string();
    // Each COMMAND waits (at most 10 s) for a go file, so that both clients
    // start together, once both ktproxy instances are up.
    let dir = TempDir::new("concurrent");
    let go = dir.path().join("go");
    let script = r#"i=0; while [ ! -e "$0" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; exec "$@""#;
    let go_arg = go.to_str().unwrap();
    // Both spawned from this thread (PR_SET_PDEATHSIG follows the thread).
    let mut one = CommandRun::spawn(&mut ktproxy_cmd(
        &["-v"],
        &[
            "sh", "-c", script, go_arg, TESTCLIENT, "hello", &a1, "--count", &count, "--alt", &b1,
        ],
    ));
    let mut two = CommandRun::spawn(&mut ktproxy_cmd(
        &["-v"],
        &[
            "sh", "-c", script, go_arg, TESTCLIENT, "hello", &a2, "--count", &count, "--alt", &b2,
        ],
    ));
    let both_up = wait_until(Duration::from_secs(10), || {
        !cgroup_procs(&command_cgroup_of(one.pid())).is_empty()
            && !cgroup_procs(&command_cgroup_of(two.pid())).is_empty()
    });
    fs::write(&go, "").expect("creating the go file");
    assert!(
        both_up,
        "the two COMMANDs never ran at the same time:\n{}\n{}",
        one.stderr_now(),
        two.stderr_now()
    );
    let out1 = one.finish(Duration::from_secs(60));
    let out2 = two.finish(Duration::from_secs(60));
    for (out, own, other) in [
        (&out1, [&a1, &b1], [&a2, &b2]),
        (&out2, [&a2, &b2], [&a1, &b1]),
    ] {
        assert_eq!(exit_code(out), 0, "{}", describe(out));
        let log = stderr(out);
        let t = targets(&log);
        assert_eq!(t.len(), COUNT, "{}", tail(&log, 20));
        assert!(
            t.iter().all(|d| own.contains(&d)),
            "connections to other servers than {own:?}: {:?}",
            t.iter().filter(|d| !own.contains(d)).collect::<Vec<_>>()
        );
        for o in other {
            assert!(!t.contains(o), "connections to {o} of the other run");
        }
        assert_eq!(
            log.matches("Proxy connection established").count(),
            COUNT,
            "{}",
            tail(&log, 20)
        );
    }
    for s in &servers {
        assert_eq!(s.wait_peers(COUNT / 2, LOG_TIMEOUT).len(), COUNT / 2);
    }
    let (l1, l2) = (listen_addrs(&stderr(&out1)), listen_addrs(&stderr(&out2)));
    for a in &l1 {
        assert!(
            l2.iter().all(|b| b.port() != a.port() || b.ip() != a.ip()),
            "both listened on {a}: {l1:?} {l2:?}"
        );
    }
    assert_ne!(one.pid(), two.pid());
    assert_nothing_left(one.pid(), &stderr(&out1), "first of two");
    assert_nothing_left(two.pid(), &stderr(&out2), "second of two");
}

#[test]
fn static_busybox_wget_is_proxied_through_socks5() {
    require_root();
    let busybox = need("busybox");
    let real = fs::canonicalize(&busybox).unwrap_or(busybox.clone());
    match is_statically_linked(&real) {
        Ok(true) => {}
        Ok(false) => panic!(
            "{} is dynamically linked: this test needs the statically linked busybox \
             (busybox-static; run scripts/deps.sh)",
            real.display()
        ),
        Err(e) => panic!("{e}"),
    }
    let server = ServerProcess::testserver();
    let socks = Peer::microsocks(None);
    let url = format!("http://{}/", server.addr());
    let (out, pid) = run_command(
        &["-v", "-u", &socks.socks5_url()],
        &[real.to_str().unwrap(), "wget", "-q", "-O", "-", &url],
        RUN_TIMEOUT,
    );
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    assert_body_from(&stdout(&out), server.addr());
    assert!(
        stderr(&out).contains(&format!(
            "Connecting to target {} via {}",
            server.addr(),
            socks.socks5_url()
        )),
        "{}",
        stderr(&out)
    );
    socks.wait_log(&format!("connected to {}", server.addr()));
    assert_nothing_left(pid, &stderr(&out), "busybox wget");
}

#[test]
fn user_option_runs_command_as_that_user_and_it_is_proxied() {
    require_root();
    need("curl");
    let server = ServerProcess::testserver();
    let script = format!(
        "id -u; id -g; id -G; curl -sS --noproxy '*' --max-time 10 http://{}/",
        server.addr()
    );
    let (out, pid) = run_command(
        &["--user", "nobody", "-v"],
        &["sh", "-c", &script],
        RUN_TIMEOUT,
    );
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    let text = stdout(&out);
    // uid, gid, and no supplementary group of root's left.
    let ids: Vec<&str> = text.lines().take(3).collect();
    let nobody_gid = ids.get(1).copied().unwrap_or("");
    assert_eq!(ids.first(), Some(&"65534"), "{}", describe(&out));
    assert_ne!(nobody_gid, "0", "{}", describe(&out));
    let groups = ids.get(2).copied().unwrap_or("");
    assert!(
        groups.split_whitespace().any(|g| g == nobody_gid)
            && !groups.split_whitespace().any(|g| g == "0"),
        "supplementary groups {groups:?}: {}",
        describe(&out)
    );
    assert_body_from(&text, server.addr());
    assert!(
        stderr(&out).contains("Proxy connection established, from 127.0.0.1:")
            && stderr(&out).contains(&format!(" to {}", server.addr())),
        "{}",
        stderr(&out)
    );
    assert_nothing_left(pid, &stderr(&out), "--user nobody");

    let dir = TempDir::new("no_such_user");
    let marker = dir.path().join("ran");
    let (out, pid) = run_command(
        &["--user", "no_such_user"],
        &["touch", marker.to_str().unwrap()],
        RUN_TIMEOUT,
    );
    assert_eq!(exit_code(&out), 2, "{}", describe(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", describe(&out));
    assert!(stderr(&out).contains("no_such_user"), "{}", describe(&out));
    assert!(!marker.exists(), "COMMAND ran without its user");
    assert_nothing_left(pid, &stderr(&out), "--user no_such_user");
}

#[test]
fn background_leftovers_are_waited_for_and_proxied_then_cgroup_removed() {
    require_root();
    need("sh");
    need("curl");
    let started = Instant::now();
    let (out, pid) = run_command(&[], &["sh", "-c", "sleep 1 & exit 3"], RUN_TIMEOUT);
    let took = started.elapsed();
    assert_eq!(exit_code(&out), 3, "{}", describe(&out));
    assert!(
        took >= Duration::from_millis(900),
        "ktproxy exited after {took:?}, before the background sleep 1 ended"
    );
    assert!(took < scaled(Duration::from_secs(10)), "took {took:?}");
    assert_nothing_left(pid, &stderr(&out), "sleep 1 &");

    // A leftover that connects only after COMMAND exited is still proxied
    // (and ktproxy waits past the 1 s its cgroup removal would retry).
    let server = ServerProcess::testserver();
    let script = format!(
        "(sleep 1.5; curl -sS --noproxy '*' --max-time 10 http://{}/) & exit 4",
        server.addr()
    );
    let started = Instant::now();
    let (out, pid) = run_command(&["-v"], &["sh", "-c", &script], RUN_TIMEOUT);
    let took = started.elapsed();
    assert_eq!(exit_code(&out), 4, "{}", describe(&out));
    assert!(took >= Duration::from_millis(1400), "took {took:?}");
    assert_body_from(&stdout(&out), server.addr());
    let log = stderr(&out);
    assert!(
        log.contains(&format!("Connecting to target {}", server.addr())),
        "{log}"
    );
    assert!(log.contains("Proxy connection established"), "{log}");
    assert_nothing_left(pid, &stderr(&out), "(sleep; curl) &");
}

/// "Ctrl-C or SIGTERM stops them": a SIGTERM to ktproxy while it waits
/// for leftovers ends them, and ktproxy exits with COMMAND's status.
#[test]
fn sigterm_stops_background_leftovers() {
    require_root();
    need("sh");
    let mut run = CommandRun::spawn(&mut ktproxy_cmd(&[], &["sh", "-c", "sleep 30 & exit 5"]));
    let waiting = wait_until(Duration::from_secs(10), || {
        run.stderr_now().contains("still run") || run.wait(Duration::ZERO).is_some()
    });
    assert!(
        waiting && run.status.is_none(),
        "ktproxy did not wait for the leftover sleep: {}",
        run.stderr_now()
    );
    let left = cgroup_procs(&command_cgroup_of(run.pid()));
    assert_eq!(left.len(), 1, "{left:?}");

    let started = Instant::now();
    signal(run.pid() as i32, libc::SIGTERM);
    let status = run.wait(Duration::from_secs(2)).unwrap_or_else(|| {
        panic!(
            "ktproxy still running {:?} after SIGTERM: {}",
            scaled(Duration::from_secs(2)),
            run.stderr_now()
        )
    });
    eprintln!("leftovers stopped in {:?}", started.elapsed());
    assert_eq!(status.code(), Some(5), "{status}: {}", run.stderr_now());
    assert!(
        !is_running(left[0]),
        "the leftover sleep (pid {}) still runs",
        left[0]
    );
    assert_nothing_left(run.pid(), &run.stderr_now(), "SIGTERM to leftovers");
}

/// Runs `ktproxy -- COMMAND` (which must end up running `sleep 30` in its
/// cgroup), sends `sig` to ktproxy alone, and checks that ktproxy exits with
/// 128+sig within 2 s (scaled: a hang catcher; the sleep's own exit would
/// give another status), the sleep gone and its cgroups removed.
fn signal_to_ktproxy_stops_the_command(sig: libc::c_int, command: &[&str]) {
    require_root();
    need("sleep");
    let mut run = CommandRun::spawn(&mut ktproxy_cmd(&[], command));
    let cmd_cgroup = command_cgroup_of(run.pid());
    // Until COMMAND (or its child) has exec'd sleep inside its cgroup.
    let mut sleeper = None;
    let ready = wait_until(Duration::from_secs(10), || {
        sleeper = cgroup_procs(&cmd_cgroup).into_iter().find(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        sleeper.is_some() || run.wait(Duration::ZERO).is_some()
    });
    let sleeper = sleeper.unwrap_or_else(|| {
        panic!(
            "sleep never ran in {} (ready {ready}): {}",
            cmd_cgroup.display(),
            run.stderr_now()
        )
    });

    let started = Instant::now();
    signal(run.pid() as i32, sig);
    let status = run.wait(Duration::from_secs(2));
    let took = started.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "{command:?}: ktproxy still running {:?} after signal {sig}; in {}: {:?}; log: {}",
            scaled(Duration::from_secs(2)),
            cmd_cgroup.display(),
            cgroup_procs(&cmd_cgroup)
                .iter()
                .map(|p| fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .unwrap_or_default()
                    .replace('\0', " "))
                .collect::<Vec<_>>(),
            run.stderr_now()
        )
    });
    assert_eq!(
        status.code(),
        Some(128 + sig),
        "{command:?}: ktproxy exited with {status} after signal {sig}: {}",
        run.stderr_now()
    );
    eprintln!("signal {sig}, {command:?}: ktproxy and sleep gone in {took:?}");
    assert!(!is_running(sleeper), "sleep (pid {sleeper}) still runs");
    assert_nothing_left(run.pid(), &run.stderr_now(), &format!("signal {sig}"));
}

#[test]
fn sigterm_to_ktproxy_is_passed_on_to_the_command() {
    signal_to_ktproxy_stops_the_command(libc::SIGTERM, &["sleep", "30"]);
}

#[test]
fn sigint_and_sighup_to_ktproxy_are_passed_on_to_the_command() {
    signal_to_ktproxy_stops_the_command(libc::SIGINT, &["sleep", "30"]);
    signal_to_ktproxy_stops_the_command(libc::SIGHUP, &["sleep", "30"]);
}

/// `kill <ktproxy>` (systemd, timeout(1), a CI job being cancelled) means
/// "stop". When COMMAND is a shell that is waiting for a child, passing the
/// signal to the shell alone kills the shell but leaves the child running:
/// ktproxy must not then keep waiting for it (here, 30 s).
#[test]
fn sigterm_to_ktproxy_stops_a_shell_command_and_its_child() {
    need("sh");
    signal_to_ktproxy_stops_the_command(libc::SIGTERM, &["sh", "-c", "sleep 30; true"]);
}

/// Without ktproxy the redirect is gone: COMMAND must not carry on with its
/// connections going out unproxied. kill -9 gives ktproxy no chance to do
/// anything, so this rests on the kernel's parent-death signal.
#[test]
fn kill_9_of_ktproxy_terminates_the_command() {
    require_root();
    need("sleep");
    let mut run = CommandRun::spawn(&mut ktproxy_cmd(&[], &["sleep", "30"]));
    let cmd_cgroup = command_cgroup_of(run.pid());
    let mut sleeper = None;
    wait_until(Duration::from_secs(10), || {
        sleeper = cgroup_procs(&cmd_cgroup).into_iter().find(|p| {
            fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
        });
        sleeper.is_some()
    });
    let sleeper = sleeper.unwrap_or_else(|| panic!("sleep never ran: {}", run.stderr_now()));
    signal(run.pid() as i32, libc::SIGKILL);
    assert!(
        run.wait(Duration::from_secs(2)).is_some(),
        "ktproxy survived SIGKILL"
    );
    assert!(
        wait_until(Duration::from_secs(2), || !is_running(sleeper)),
        "COMMAND (sleep, pid {sleeper}) outlived the killed ktproxy"
    );
}
