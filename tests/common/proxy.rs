//! The ktproxy under test, in cgroup mode (`-c <a TestCgroup>`): its command
//! line, the running process and its log.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use ktproxy::logline::{parse_listen_addrs, parse_own_cgroup, ready_line};

use super::cgroup::{remove_cgroup_dir, TestCgroup};
use super::netns::NetNs;
use super::process::{
    read_lossy, scaled, signal, sigterm_when_the_test_dies, tail, wait_child, wait_until, TempDir,
};
use super::KTPROXY;

/// How long ktproxy may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long ktproxy may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a log line (ktproxy's or an upstream proxy's) may take to appear.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(5);

/// Listen on both loopbacks, IPv4 and IPv6.
pub const DUAL: [&str; 4] = ["-l", "127.0.0.1:0", "-l", "[::1]:0"];

/// `DUAL` followed by `extra`.
pub fn with_dual<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    DUAL.iter().copied().chain(extra.iter().copied()).collect()
}

/// The ktproxy command line the tests use (cgroup mode): `-c <cg>`, then
/// `-l 127.0.0.1:0` unless `extra` has a listen option of its own, then
/// `extra`. Arguments after a `--` are not looked at.
pub fn ktproxy_command(cg: &TestCgroup, extra: &[&str]) -> Command {
    let opts: Vec<&str> = extra.iter().copied().take_while(|a| *a != "--").collect();
    let mut own_listen = false;
    for a in &opts {
        assert!(
            !(a.starts_with("--cgroup") || (a.starts_with("-c") && !a.starts_with("--"))),
            "the harness supplies -c itself: {extra:?}"
        );
        own_listen |= a.starts_with("--listen") || (a.starts_with("-l") && !a.starts_with("--"));
    }
    let mut cmd = Command::new(KTPROXY);
    cmd.arg("-c").arg(cg.path());
    if !own_listen {
        cmd.args(["-l", "127.0.0.1:0"]);
    }
    cmd.args(extra);
    cmd
}

/// `ktproxy -c <cg> extra...` (no default `-l`), entering `ns` between fork
/// and exec (like `nsenter --net`; `ip netns exec` would also remount /sys,
/// which hides a cgroup2 hierarchy mounted below it, e.g.
/// /sys/fs/cgroup/unified).
pub fn ktproxy_in_netns(cg: &TestCgroup, ns: &NetNs, extra: &[&str]) -> Command {
    let ns_path = CString::new(format!("/run/netns/{}", ns.name())).unwrap();
    let mut cmd = Command::new(KTPROXY);
    cmd.arg("-c").arg(cg.path()).args(extra);
    // SAFETY: open, setns and close are async-signal-safe syscalls on
    // memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(ns_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let r = libc::setns(fd, libc::CLONE_NEWNET);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if r != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

/// A running ktproxy for one test cgroup; stopped (SIGTERM, then SIGKILL)
/// on drop, which also happens before its cgroup is dropped.
pub struct Proxy<'a> {
    child: Child,
    status: Option<ExitStatus>,
    pid: i32,
    log_path: PathBuf,
    ready: String,
    addrs: Vec<SocketAddr>,
    own_cgroup: PathBuf,
    _dir: TempDir,
    _cg: PhantomData<&'a TestCgroup>,
}

impl<'a> Proxy<'a> {
    /// Starts ktproxy (see `ktproxy_command`) and waits for its ready line
    /// (an info-level message: not with `-q`).
    pub fn start(cg: &'a TestCgroup, extra: &[&str]) -> Proxy<'a> {
        Proxy::start_with(cg, extra, |_| {})
    }

    /// `start`, with `customize` applied to the command first (e.g. a
    /// `pre_exec` that lowers a resource limit).
    pub fn start_with(
        cg: &'a TestCgroup,
        extra: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> Proxy<'a> {
        let mut cmd = ktproxy_command(cg, extra);
        customize(&mut cmd);
        Proxy::start_command(cg, cmd)
    }

    /// Starts `cmd`, a ktproxy command line for `cg` (e.g. from
    /// `ktproxy_in_netns`), and waits for its ready line.
    pub fn start_command(_cg: &'a TestCgroup, mut cmd: Command) -> Proxy<'a> {
        let dir = TempDir::new("ktproxy");
        let log_path = dir.path().join("ktproxy.log");
        // A file, not a pipe: a pipe nobody drains would block ktproxy.
        let log = File::create(&log_path).expect("creating the ktproxy log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        // Keep a Proxy on its test's thread: see the function.
        sigterm_when_the_test_dies(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let mut p = Proxy {
            pid: child.id() as i32,
            child,
            status: None,
            log_path,
            ready: String::new(),
            addrs: Vec::new(),
            own_cgroup: PathBuf::new(),
            _dir: dir,
            _cg: PhantomData,
        };
        let mut ready = None;
        let came = wait_until(READY_TIMEOUT, || {
            ready = ready_line(&p.log()).map(String::from);
            ready.is_some() || p.exited()
        });
        let Some(line) = ready else {
            panic!(
                "ktproxy {cmd:?} {}:\n{}",
                if came {
                    "exited before it was ready"
                } else {
                    "printed no ready line in time"
                },
                p.log()
            );
        };
        p.addrs = parse_listen_addrs(&line)
            .unwrap_or_else(|| panic!("no listen addresses in the ready line: {line}"));
        p.own_cgroup = parse_own_cgroup(&line)
            .unwrap_or_else(|| panic!("no own cgroup in the ready line: {line}"));
        p.ready = line;
        p
    }

    /// The first listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn own_cgroup(&self) -> &Path {
        &self.own_cgroup
    }

    /// The log line that said ktproxy was ready.
    pub fn ready_line(&self) -> &str {
        &self.ready
    }

    /// Everything ktproxy has written to stderr (and stdout) so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Waits up to `timeout` for a log line containing `needle`; returns the
    /// log. Panics, showing the log's tail, if it does not come.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let mut log = String::new();
        if !wait_until(timeout, || {
            log = self.log();
            log.contains(needle)
        }) {
            panic!(
                "ktproxy logged no {needle:?} within {:?}; log tail:\n{}",
                scaled(timeout),
                tail(&log, 40)
            );
        }
        log
    }

    /// Whether ktproxy has exited (and been reaped).
    pub fn exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_some()
    }

    /// Sends `sig` and waits up to `timeout` for the exit; None if still
    /// running then (it is left running).
    pub fn stop(&mut self, sig: libc::c_int, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            signal(self.pid, sig);
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// SIGTERM; panics if ktproxy has not exited within 3 s (after killing it).
    pub fn stop_term(&mut self) -> ExitStatus {
        match self.stop(libc::SIGTERM, STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                self.kill9();
                panic!(
                    "ktproxy did not exit within {:?} of SIGTERM; log tail:\n{}",
                    scaled(STOP_TIMEOUT),
                    tail(&self.log(), 40)
                );
            }
        }
    }

    /// SIGKILL and reap. The kernel detaches the programs; ktproxy's own
    /// (empty) cgroup directory stays behind for the caller to remove.
    pub fn kill9(&mut self) -> ExitStatus {
        if self.status.is_none() {
            signal(self.pid, libc::SIGKILL);
            self.status = Some(self.child.wait().expect("waiting for ktproxy"));
        }
        self.status.unwrap()
    }
}

impl Drop for Proxy<'_> {
    fn drop(&mut self) {
        if self.stop(libc::SIGTERM, STOP_TIMEOUT).is_none() {
            self.kill9();
        }
        // Only a SIGKILLed ktproxy legitimately leaves its cgroup behind;
        // anything else stays visible as a leak.
        if self.status.and_then(|s| s.signal()) == Some(libc::SIGKILL) {
            let _ = remove_cgroup_dir(&self.own_cgroup, Duration::from_secs(2));
        }
        if thread::panicking() {
            eprintln!(
                "--- ktproxy (pid {}) log tail ---\n{}\n---",
                self.pid,
                tail(&self.log(), 60)
            );
        }
    }
}

/// How many times `needle` occurs in the proxy's log so far.
pub fn log_count(proxy: &Proxy, needle: &str) -> usize {
    proxy.log().matches(needle).count()
}

/// Waits until `needle` occurs more than `before` times in the log.
pub fn wait_log_count(proxy: &Proxy, needle: &str, before: usize) {
    let ok = wait_until(LOG_TIMEOUT, || log_count(proxy, needle) > before);
    assert!(
        ok,
        "ktproxy logged no new {needle:?} within {:?}; log tail:\n{}",
        scaled(LOG_TIMEOUT),
        tail(&proxy.log(), 40)
    );
}
