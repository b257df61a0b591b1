//! End-to-end tests of issue 11: upstream credentials kept from other local
//! users, `--user` as a real privilege boundary, and outgoing connections
//! that carry the client's identity.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test security
//!
//! Safety: cgroup-mode ktproxys get `-c <a TestCgroup>`, command mode
//! intercepts only its own cgroup. nftables rules live in a table of the
//! test's own (`ktproxy_test_<pid>_<n>`), deleted on drop, and match only
//! the test's own server ports. Traffic stays on 127.0.0.1.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::*;

// ---- 1. upstream credentials ---------------------------------------------

/// `runuser -u nobody -- ps -eo args` shows ktproxy's command line with the
/// user info of -u replaced by '*', in each way getopts takes the option,
/// and neither the ready line nor the `via` lines show it: not the password,
/// and not a token given as the user name.
#[test]
fn upstream_credentials_are_in_no_command_line_and_no_log_line() {
    require_root();
    need("ps");
    let cg = TestCgroup::new("credentials_hidden");
    let server = HelloServer::start();
    let socks = Peer::microsocks(Some(("tok3nUser", "pa55Word")));
    let token_only = Peer::microsocks(None);
    let with_password = format!("socks5://tok3nUser:pa55Word@{}", socks.addr);
    let with_token = format!("socks5://T0KEN4711@{}", token_only.addr);
    let forms: [(Vec<String>, &str, &Peer); 3] = [
        (
            vec!["-u".into(), with_password.clone()],
            with_password.as_str(),
            &socks,
        ),
        (
            vec![format!("--upstream={with_token}")],
            with_token.as_str(),
            &token_only,
        ),
        (
            vec![format!("-vu{with_password}")],
            with_password.as_str(),
            &socks,
        ),
    ];
    for (args, url, peer) in forms {
        let secrets = ["tok3nUser", "pa55Word", "T0KEN4711"];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = Proxy::start(&cg, &args);

        let ps = ps_as_nobody();
        let line = ps
            .lines()
            .find(|l| l.contains(&proxy_marker(&cg)) && l.contains('@'))
            .unwrap_or_else(|| panic!("{args:?}: ktproxy is not in ps:\n{ps}"));
        let userinfo = &url["socks5://".len()..url.rfind('@').unwrap()];
        let hidden = url.replace(userinfo, &"*".repeat(userinfo.len()));
        assert!(line.contains(&hidden), "{args:?}: ps shows {line:?}");
        for s in secrets {
            assert!(!ps.contains(s), "{args:?}: ps shows {s}:\n{ps}");
        }
        let cmdline = fs::read(format!("/proc/{}/cmdline", proxy.pid())).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(userinfo),
            "/proc/{}/cmdline still has it",
            proxy.pid()
        );

        let reply = hello_as(0, Some(&cg), server.addr().port());
        assert_eq!(reply, format!("reply {}", server.addr()), "{args:?}");
        let shown = format!("via socks5://***@{}", peer.addr);
        let log = proxy.wait_log(
            &format!("Connecting to target {} {shown}", server.addr()),
            LOG_TIMEOUT,
        );
        assert!(
            ready_line(&log).is_some_and(|l| l.contains(&shown)),
            "{log}"
        );
        assert!(
            log.contains("hidden them there"),
            "no warning about argv:\n{log}"
        );
        for s in secrets {
            assert!(!log.contains(s), "{args:?}: the log shows {s}:\n{log}");
        }
    }
    socks.wait_log(&format!("connected to {}", server.addr()));
}

/// Something in ktproxy's command line that only this test's ktproxys have.
fn proxy_marker(cg: &TestCgroup) -> String {
    cg.path().display().to_string()
}

/// `--upstream-file` (a 0644 file draws a warning that names the mode, a
/// 0600 one none) and `$KTPROXY_UPSTREAM` work like -u, without the URL in
/// any command line; COMMAND does not inherit `$KTPROXY_UPSTREAM`.
#[test]
fn upstream_from_a_file_or_the_environment_is_used_and_never_shown() {
    require_root();
    need("curl");
    need("ps");
    let server = ServerProcess::testserver();
    let socks = Peer::microsocks(Some(("fileUser", "fi1ePass")));
    let url = format!("socks5://fileUser:fi1ePass@{}", socks.addr);
    let dir = TempDir::new("upstream_file");
    let file = dir.path().join("upstream");
    fs::write(&file, format!("# ktproxy's upstream\n{url}\n")).unwrap();
    let curl = curl_command(&format!("http://{}/", server.addr()));
    let script = format!(
        "echo \"env=${{KTPROXY_UPSTREAM-unset}}\"; ps -eo args > {}; {}",
        dir.path().join("ps").display(),
        curl.join(" ")
    );
    let file_arg = file.to_str().unwrap();

    for mode in [0o644, 0o600] {
        fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
        let (out, pid) = run_command(
            &["-v", "--upstream-file", file_arg],
            &["sh", "-c", &script],
            RUN_TIMEOUT,
        );
        assert_eq!(exit_code(&out), 0, "{}", describe(&out));
        assert_body_from(&stdout(&out), server.addr());
        let log = stderr(&out);
        assert!(
            log.contains(&format!("via socks5://***@{}", socks.addr)),
            "{log}"
        );
        let warned = log.contains(&format!("--upstream-file {file_arg} is readable by"));
        assert_eq!(warned, mode == 0o644, "mode {mode:o}:\n{log}");
        if warned {
            assert!(
                log.contains("(mode 0644)") && log.contains("chmod 600"),
                "{log}"
            );
        }
        assert!(
            !log.contains("fi1ePass") && !log.contains("fileUser"),
            "{log}"
        );
        assert!(!fs::read_to_string(dir.path().join("ps"))
            .unwrap()
            .contains("fi1ePass"));
        assert_nothing_left(pid, &log, "--upstream-file");
    }

    let before = socks.log().matches("connected to").count();
    let mut cmd = ktproxy_cmd(&["-v"], &["sh", "-c", &script]);
    cmd.env("KTPROXY_UPSTREAM", &url);
    let mut run = CommandRun::spawn(&mut cmd);
    let out = run.finish(RUN_TIMEOUT);
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    assert_body_from(&stdout(&out), server.addr());
    assert!(
        stdout(&out).contains("env=unset\n"),
        "COMMAND got it: {}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains(&format!("via socks5://***@{}", socks.addr)),
        "{}",
        describe(&out)
    );
    assert!(!fs::read_to_string(dir.path().join("ps"))
        .unwrap()
        .contains("fi1ePass"));
    assert!(
        socks.log().matches("connected to").count() > before,
        "not via the upstream"
    );
    assert_nothing_left(run.pid(), &run.stderr_now(), "KTPROXY_UPSTREAM");
}

// ---- 2. --user as a boundary ---------------------------------------------

/// Run as nobody: tries TIOCSTI with the line in argv[1] on fds 0-3 and on
/// /dev/tty, and prints for each whether it is the caller's terminal
/// (argv[2]; fd 3 is that terminal, passed on purpose) and what the ioctl
/// said. TIOCGDEV names the terminal behind a descriptor, even one opened
/// through /dev/tty.
const INJECT: &str = r#"
import errno, fcntl, os, struct, sys, termios
TIOCGDEV = 0x80045432
line = (sys.argv[1] + "\n").encode()
caller = os.stat(sys.argv[2]).st_rdev
def attempt(name, fd):
    try:
        dev = struct.unpack("I", fcntl.ioctl(fd, TIOCGDEV, bytes(4)))[0]
        who = "caller" if dev == caller else "other"
    except OSError:
        who = "other"
    try:
        for b in line:
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([b]))
        return f"{name}:{who}:ok"
    except OSError as e:
        return f"{name}:{who}:{errno.errorcode[e.errno]}"
results = [attempt(f"fd{fd}", fd) for fd in (0, 1, 2, 3)]
try:
    results.append(attempt("devtty", os.open("/dev/tty", os.O_RDWR)))
except OSError as e:
    results.append("devtty:open:" + errno.errorcode[e.errno])
print("inject", " ".join(results), flush=True)
"#;

/// Under `script` (a pty, like an interactive root shell), COMMAND run with
/// --user nobody cannot push a command line into the caller's terminal:
/// TIOCSTI on the caller's terminal fails with EPERM, every other route
/// reaches another terminal or none, and the shell that started ktproxy
/// reads and runs nothing afterwards. Both with COMMAND on a terminal (it
/// gets a pty of its own) and without one (it gets no controlling terminal).
#[test]
fn user_command_cannot_inject_keystrokes_into_the_callers_terminal() {
    require_root();
    let dir = TempDir::new("tiocsti");
    let (marker1, marker2) = (dir.path().join("ran1"), dir.path().join("ran2"));
    let quiet_out = dir.path().join("quiet");
    let script = format!(
        r#"cd /
INJECT=$(cat <<'PY'
{INJECT}
PY
)
outer() {{ if read -r -t 2 line; then echo "outer read [$line]"; eval "$line"; else echo "outer read nothing"; fi; }}
{ktproxy} --user nobody -- {python} -c "$INJECT" "touch {m1}" "$(tty)" 3<>/dev/tty
echo "ktproxy exit $?"
outer
{ktproxy} --user nobody -- {python} -c "$INJECT" "touch {m2}" "$(tty)" 3<>/dev/tty </dev/null >{quiet} 2>&1
echo "ktproxy exit $?"
outer
echo finished
"#,
        ktproxy = KTPROXY,
        python = python(),
        m1 = marker1.display(),
        m2 = marker2.display(),
        quiet = quiet_out.display(),
    );
    let mut term = Terminal::run(&script);
    let screen = term.finish();
    assert!(screen.contains("finished"), "{screen}");
    assert_eq!(screen.matches("ktproxy exit 0").count(), 2, "{screen}");

    let on_terminal = screen
        .lines()
        .find(|l| l.starts_with("inject "))
        .unwrap_or_else(|| panic!("no result on the terminal:\n{screen}"));
    let quiet = fs::read_to_string(&quiet_out).unwrap();
    let without_terminal = quiet
        .lines()
        .find(|l| l.starts_with("inject "))
        .unwrap_or_else(|| panic!("no result in the file: {quiet}"));
    for result in [on_terminal, without_terminal] {
        assert!(result.contains("fd3:caller:EPERM"), "{result}");
        assert!(!result.contains("caller:ok"), "injected: {result}");
    }
    // With a terminal, COMMAND's is a pty of its own, nobody else's.
    assert!(on_terminal.contains("fd0:other:ok"), "{on_terminal}");
    assert!(on_terminal.contains("devtty:other:ok"), "{on_terminal}");
    // Without one, it has no controlling terminal at all.
    assert!(
        without_terminal.contains("fd0:other:ENOTTY"),
        "{without_terminal}"
    );
    assert!(
        without_terminal.contains("devtty:open:ENXIO"),
        "{without_terminal}"
    );

    assert_eq!(screen.matches("outer read nothing").count(), 2, "{screen}");
    assert!(
        !marker1.exists() && !marker2.exists(),
        "the caller's shell ran it:\n{screen}"
    );
}

/// Run as nobody on its own terminal: reports its terminal and size, and
/// each SIGINT, SIGQUIT and SIGWINCH, then echoes the line typed.
const INTERACTIVE: &str = r#"
import os, signal, sys
# Handlers write with os.write: a signal that arrives while another
# handler is inside print() would make Python fail with "reentrant call".
def said(sig, frame):
    os.write(1, ("got %s\n" % signal.Signals(sig).name).encode())
def resized(sig, frame):
    os.write(1, ("size %d %d\n" % tuple(os.get_terminal_size(0))).encode())
signal.signal(signal.SIGINT, said)
signal.signal(signal.SIGQUIT, said)
signal.signal(signal.SIGWINCH, resized)
print("inner tty", os.ttyname(0), "foreground", os.tcgetpgrp(0) == os.getpgrp(), flush=True)
print("size %d %d" % tuple(os.get_terminal_size(0)), flush=True)
print("ready", flush=True)
print("line", repr(sys.stdin.readline()), flush=True)
"#;

/// With --user on a terminal, COMMAND runs on a terminal of its own that
/// behaves like the caller's: same size (and size changes), Ctrl-C and
/// Ctrl-\ reach it as SIGINT and SIGQUIT, and what the caller types reaches
/// it; the caller's terminal is back in its own modes afterwards.
#[test]
fn user_command_on_its_own_terminal_gets_keys_signals_and_size() {
    require_root();
    need("stty");
    let script = format!(
        r#"cd /
PROG=$(cat <<'PY'
{INTERACTIVE}
PY
)
echo "outer tty $(tty)"
stty rows 31 cols 97
before=$(stty -g)
{ktproxy} --user nobody -- {python} -c "$PROG"
echo "ktproxy exit $?"
[ "$(stty -g)" = "$before" ] && echo "modes restored"
"#,
        ktproxy = KTPROXY,
        python = python(),
    );
    let mut term = Terminal::run(&script);
    let screen = term.wait_for("ready");
    let field = |prefix: &str| {
        screen
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} on the terminal:\n{screen}"))
            .to_string()
    };
    let outer = field("outer tty ");
    let inner = field("inner tty ");
    assert!(inner.starts_with("/dev/pts/"), "{screen}");
    assert_ne!(
        inner.split_whitespace().next().unwrap(),
        outer,
        "COMMAND is on the caller's terminal"
    );
    assert!(inner.ends_with("foreground True"), "{screen}");
    assert_eq!(field("size "), "97 31", "{screen}");

    term.type_keys(b"\x03");
    term.wait_for("got SIGINT");
    term.type_keys(b"\x1c");
    term.wait_for("got SIGQUIT");
    let resize = run_within(
        Command::new(need("stty")).args(["-F", &outer, "rows", "40", "cols", "100"]),
        Duration::from_secs(10),
    );
    assert!(resize.status.success(), "{}", describe(&resize));
    term.wait_for("size 100 40");
    term.type_keys(b"typed line\r");
    let screen = term.finish();
    assert!(screen.contains("line 'typed line\\n'"), "{screen}");
    assert!(screen.contains("ktproxy exit 0"), "{screen}");
    assert!(screen.contains("modes restored"), "{screen}");
}

/// COMMAND, with and without --user, runs with the caller's RLIMIT_NOFILE
/// and RLIMIT_MEMLOCK (soft and hard), not the ones ktproxy raised for
/// itself: what `ulimit` says inside equals what a direct child says.
#[test]
fn command_gets_the_callers_resource_limits_back() {
    require_root();
    let report = "echo n=$(ulimit -Sn)/$(ulimit -Hn) l=$(ulimit -Sl)/$(ulimit -Hl)";
    let lower = |cmd: &mut Command| {
        // SAFETY: getrlimit and setrlimit are async-signal-safe syscalls.
        unsafe {
            cmd.pre_exec(|| {
                for (resource, soft) in
                    [(libc::RLIMIT_NOFILE, 1000), (libc::RLIMIT_MEMLOCK, 1 << 20)]
                {
                    let mut r: libc::rlimit = std::mem::zeroed();
                    libc::getrlimit(resource, &mut r);
                    r.rlim_cur = r.rlim_max.min(soft);
                    if libc::setrlimit(resource, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    };
    let mut direct = Command::new("sh");
    direct.args(["-c", report]).current_dir("/");
    lower(&mut direct);
    let want = run_within(&mut direct, RUN_TIMEOUT);
    assert!(stdout(&want).starts_with("n=1000/"), "{}", describe(&want));

    for opts in [&[][..], &["--user", "nobody"][..]] {
        let mut cmd = ktproxy_cmd(opts, &["sh", "-c", report]);
        cmd.current_dir("/");
        lower(&mut cmd);
        let mut run = CommandRun::spawn(&mut cmd);
        let out = run.finish(RUN_TIMEOUT);
        assert_eq!(exit_code(&out), 0, "{}", describe(&out));
        assert_eq!(stdout(&out), stdout(&want), "{opts:?}: {}", describe(&out));
        assert_nothing_left(run.pid(), &run.stderr_now(), "limits");
    }
}

/// With --user, COMMAND's environment is HOME, USER, LOGNAME, SHELL and
/// PATH for that user, TERM, what --preserve-env names and what --env sets:
/// nothing else of the caller's (LD_PRELOAD, tokens, KTPROXY_UPSTREAM).
#[test]
fn user_command_gets_a_fresh_environment_plus_what_the_caller_passes() {
    require_root();
    let nobody = nix_user_nobody();
    let fresh = [
        format!("HOME={}", nobody.0),
        "LOGNAME=nobody".to_string(),
        format!("PATH={}", login_defs_path()),
        format!("SHELL={}", nobody.1),
        "TERM=vt220".to_string(),
        "USER=nobody".to_string(),
    ];
    let passed = ["ADDED=a b".to_string(), "KEEP_ME=kept".to_string()];
    let preserve = [
        "--preserve-env",
        "KEEP_ME,NOT_SET_ANYWHERE",
        "--env",
        "ADDED=a b",
    ];
    for (extra, also) in [(&[][..], &[][..]), (&preserve[..], &passed[..])] {
        let mut opts = vec!["--user", "nobody"];
        opts.extend(extra);
        let mut cmd = ktproxy_cmd(&opts, &["env"]);
        cmd.current_dir("/")
            .env("TERM", "vt220")
            .env("KEEP_ME", "kept")
            .env("SECRET_TOKEN", "s3cr3t")
            .env("LD_LIBRARY_PATH", "/tmp/evil")
            .env("PATH", "/root/bin:/usr/bin:/bin")
            .env("HOME", "/root");
        let mut run = CommandRun::spawn(&mut cmd);
        let out = run.finish(RUN_TIMEOUT);
        assert_eq!(exit_code(&out), 0, "{}", describe(&out));
        let mut env: Vec<String> = stdout(&out).lines().map(String::from).collect();
        env.sort();
        let mut want: Vec<String> = fresh.iter().chain(also).cloned().collect();
        want.sort();
        assert_eq!(env, want, "{opts:?}: {}", describe(&out));
        assert_nothing_left(run.pid(), &run.stderr_now(), "environment");
    }
}

/// nobody's home directory and shell, from /etc/passwd.
fn nix_user_nobody() -> (String, String) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .expect("nobody in /etc/passwd");
    let f: Vec<&str> = line.split(':').collect();
    (f[5].to_string(), f[6].to_string())
}

/// ENV_PATH from /etc/login.defs, as su uses it.
fn login_defs_path() -> String {
    fs::read_to_string("/etc/login.defs")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("ENV_PATH"))
        .map(|v| v.trim().trim_start_matches("PATH=").to_string())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_string())
}

// ---- 3. the client's identity on the outgoing connection -------------------

/// An nftables rule rejects uid 65534's connections to a local server and
/// to an upstream proxy. Without ktproxy, nobody is refused and root gets
/// through. Through ktproxy (cgroup mode; with the upstream, whose port the
/// rule guards too; command mode with --user), nobody is still refused and
/// root still gets through: ktproxy's outgoing socket is the client's.
#[test]
fn owner_rules_still_apply_to_connections_ktproxy_makes() {
    require_root();
    let server = HelloServer::start();
    let socks = Peer::microsocks(None);
    let (port, socks_port) = (server.addr().port(), socks.addr.port());
    let _table = NftTable::with_output_rules(&[format!(
        "meta skuid {NOBODY} ip daddr 127.0.0.1 tcp dport {{ {port}, {socks_port} }} counter \
         reject with tcp reset"
    )]);
    let hello = format!("reply {}", server.addr());

    // The rule itself, without ktproxy.
    assert_eq!(hello_as(NOBODY, None, port), "error ConnectionRefusedError");
    assert_eq!(hello_as(0, None, port), hello);

    let cg = TestCgroup::new("owner_rules");
    {
        let proxy = Proxy::start(&cg, &["-v"]);
        let nobody = hello_as(NOBODY, Some(&cg), port);
        assert_ne!(nobody, hello, "nobody got through ktproxy");
        proxy.wait_log("(uid 65534) failed: Connection refused", LOG_TIMEOUT);
        assert_eq!(hello_as(0, Some(&cg), port), hello);
        let target = format!("Connecting to target {}", server.addr());
        assert_eq!(log_count(&proxy, &target), 2, "not through ktproxy");
    }
    {
        let socks_url = socks.socks5_url();
        let proxy = Proxy::start(&cg, &["-v", "-u", &socks_url]);
        let nobody = hello_as(NOBODY, Some(&cg), port);
        assert_ne!(nobody, hello, "nobody got through the upstream");
        proxy.wait_log(&format!("upstream {socks_url} unreachable"), LOG_TIMEOUT);
        assert_eq!(hello_as(0, Some(&cg), port), hello);
        socks.wait_log(&format!("connected to {}", server.addr()));
    }

    // COMMAND run as nobody is nobody on the way out too.
    let (out, pid) = run_command(
        &["--user", "nobody"],
        &[python(), "-c", PY_HELLO_CLIENT, &port.to_string()],
        RUN_TIMEOUT,
    );
    assert_eq!(exit_code(&out), 0, "{}", describe(&out));
    assert_ne!(stdout(&out).trim(), hello, "{}", describe(&out));
    assert_nothing_left(pid, &stderr(&out), "--user nobody");
}

/// --mark N sets SO_MARK on every outgoing socket, to the destination and
/// to the upstream proxy: an nftables rule matching the mark counts them,
/// and without --mark it counts nothing.
#[test]
fn mark_is_set_on_every_outgoing_connection() {
    require_root();
    let server = HelloServer::start();
    let socks = Peer::microsocks(None);
    let (port, socks_port) = (server.addr().port(), socks.addr.port());
    let table = NftTable::with_output_rules(&[
        format!("meta mark 0x4b50 ip daddr 127.0.0.1 tcp dport {port} counter"),
        format!("meta mark 0x4b50 ip daddr 127.0.0.1 tcp dport {socks_port} counter"),
    ]);
    let (to_server, to_socks) = (
        format!("dport {port} counter"),
        format!("dport {socks_port} counter"),
    );
    let hello = format!("reply {}", server.addr());
    let socks_url = socks.socks5_url();
    let cg = TestCgroup::new("mark");
    for (opts, marked) in [
        (&[][..], false),
        (&["--mark", "0x4b50"][..], true),
        (&["-u", &socks_url], false),
        (&["--mark", "19280", "-u", &socks_url], true),
    ] {
        let before = (table.packets(&to_server), table.packets(&to_socks));
        let _proxy = Proxy::start(&cg, opts);
        assert_eq!(hello_as(0, Some(&cg), port), hello, "{opts:?}");
        let after = (table.packets(&to_server), table.packets(&to_socks));
        // Through the upstream, ktproxy's own socket goes to the upstream;
        // the upstream's to the server is not ktproxy's to mark.
        let ours = if opts.contains(&"-u") {
            after.1 - before.1
        } else {
            after.0 - before.0
        };
        assert_eq!(
            ours > 0,
            marked,
            "{opts:?}: {before:?} -> {after:?}\n{}",
            table.list()
        );
    }
}
