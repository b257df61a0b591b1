//! Harness for ktproxy's end-to-end tests: cgroups, the proxy process, small
//! servers, clients run inside a cgroup, bpftool queries, network namespaces.
//!
//! Safety rules every helper here keeps (a redirect attached to the wrong
//! cgroup would send every new connection of the machine into a port):
//! - ktproxy always gets `-c <a TestCgroup>`: never no `-c`, never the root.
//! - Only client processes enter a test cgroup, and they do so in `pre_exec`,
//!   before exec, so not one of their connect() calls escapes it.
//! - Every wait is bounded; only processes the test started are killed, by pid.
//! - Everything created (cgroups, namespaces, temp files, processes) is
//!   removed by `Drop`, also when the test panics.
//!
//! Each test file uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub const KTPROXY: &str = env!("CARGO_BIN_EXE_ktproxy");
pub const TESTCLIENT: &str = env!("CARGO_BIN_EXE_testclient");
pub const TESTSERVER: &str = env!("CARGO_BIN_EXE_testserver");

/// How long ktproxy may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long ktproxy may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// Environment variables that would make curl & co. use a configured proxy
/// instead of dialing the destination themselves.
pub const PROXY_ENV: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
];

pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        panic!("end-to-end tests need root: run sudo scripts/test.sh");
    }
}

/// A number unique within this test process, for names.
pub fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Polls `cond` until it holds or `timeout` passes; says whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Sends `sig` to `pid`, a process this test started.
pub fn signal(pid: i32, sig: libc::c_int) {
    assert!(pid > 0, "refusing to signal pid {pid}");
    // SAFETY: plain syscall; ESRCH (already gone) is fine.
    unsafe { libc::kill(pid, sig) };
}

/// Waits at most `timeout` for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// A loopback TCP port nobody listens on (it was free a moment ago).
pub fn unused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// The last `n` lines of `text`, for failure messages about huge logs.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---- temporary files ------------------------------------------------------

/// A directory under $TMPDIR, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "ktproxy-test-{}-{}-{label}",
            std::process::id(),
            unique()
        ));
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

// ---- processes --------------------------------------------------------------

/// A child process that is killed (SIGKILL, by pid) and reaped on drop.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn spawn(cmd: &mut Command) -> KillOnDrop {
        KillOnDrop(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        )
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cmd` (stdin as configured: inherited by default) and collects its
/// output, killing it if it runs longer than `timeout`: Err(what it printed)
/// then. Output goes through files, not pipes, so grandchildren that keep a
/// pipe open cannot make this hang.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, Output> {
    output_within_pid(cmd, timeout).0
}

/// `output_within`, also returning the pid the command ran as.
pub fn output_within_pid(cmd: &mut Command, timeout: Duration) -> (Result<Output, Output>, u32) {
    let dir = TempDir::new("out");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let create = |p: &Path| File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    cmd.stdout(create(&out)).stderr(create(&err));
    let mut child = KillOnDrop::spawn(cmd);
    let pid = child.0.id();
    let status = wait_child(&mut child.0, timeout);
    let timed_out = status.is_none();
    let status = match status {
        Some(s) => s,
        None => {
            let _ = child.0.kill();
            child.0.wait().expect("waiting for a killed child")
        }
    };
    let output = Output {
        status,
        stdout: fs::read(&out).unwrap_or_default(),
        stderr: fs::read(&err).unwrap_or_default(),
    };
    (if timed_out { Err(output) } else { Ok(output) }, pid)
}

/// `output_within`, panicking on timeout with everything the command printed.
pub fn run_within(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    output_within(cmd.stdin(Stdio::null()), timeout).unwrap_or_else(|o| {
        panic!(
            "{shown} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// One line per stream, for assertion messages.
pub fn describe(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim_end(),
        String::from_utf8_lossy(&o.stderr).trim_end()
    )
}

// ---- cgroups ------------------------------------------------------------------

/// Mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo.
pub fn cgroup2_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let text = fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
        cgroup2_mount(&text).expect("no cgroup2 filesystem in /proc/self/mountinfo")
    })
    .clone()
}

/// The first cgroup2 mount of the hierarchy's root (else the first at all).
/// Lines: `id parent maj:min root mountpoint opts [optional...] - fstype ...`.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = pre.split_whitespace().collect();
        let (Some(root), Some(mnt)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let path = PathBuf::from(unescape_octal(mnt));
        if *root == "/" {
            return Some(path);
        }
        fallback.get_or_insert(path);
    }
    fallback
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 directory of the test process. ktproxy, started from here,
/// creates its own `ktproxy-<pid>` cgroup inside it.
pub fn self_cgroup() -> PathBuf {
    let text = fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("/proc/self/cgroup has no cgroup v2 line");
    cgroup2_root().join(rel.trim_start_matches('/'))
}

/// Where ktproxy with this pid, started by the test process, has (or had)
/// its own cgroup.
pub fn own_cgroup_of(pid: u32) -> PathBuf {
    self_cgroup().join(format!("ktproxy-{pid}"))
}

/// Pids listed in a cgroup's cgroup.procs (empty if it is gone).
pub fn cgroup_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// rmdir, retried for up to `timeout`: the kernel takes exited processes
/// out of a cgroup a little after they are reaped. Gone already is success.
pub fn remove_cgroup_dir(dir: &Path, timeout: Duration) -> io::Result<()> {
    let mut last = Ok(());
    wait_until(timeout, || match fs::remove_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
        Err(e) => {
            last = Err(e);
            false
        }
    })
    .then_some(())
    .ok_or_else(|| last.unwrap_err())
}

/// Makes the process `cmd` starts join the cgroup `dir` between fork and
/// exec, so that it is inside before it runs a single instruction of its own.
pub fn join_cgroup_on_exec(cmd: &mut Command, dir: &Path) {
    let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
        .expect("cgroup path without NUL");
    // SAFETY: the closure only makes async-signal-safe syscalls (open, write,
    // close) on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n == 1 {
                Ok(())
            } else {
                Err(err)
            }
        });
    }
}

/// A child cgroup of the cgroup v2 root, `ktproxy-test-<pid>-<name>`, for one
/// test's clients. Drop kills whatever is still inside (only processes this
/// test put there, and their children) and removes it.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let root = cgroup2_root();
        let safe: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = root.join(format!("ktproxy-test-{}-{safe}", std::process::id()));
        assert_ne!(path, root);
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(|| remove_stale_test_cgroups(&root));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn procs(&self) -> Vec<i32> {
        cgroup_procs(&self.path)
    }

    /// A command whose process starts inside this cgroup. Proxy settings
    /// are removed from its environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for v in PROXY_ENV {
            cmd.env_remove(v);
        }
        join_cgroup_on_exec(&mut cmd, &self.path);
        cmd
    }

    /// Runs `program args` inside the cgroup, killed after `timeout` (then
    /// this panics with what it printed).
    pub fn run(&self, program: &str, args: &[&str], timeout: Duration) -> Output {
        run_within(self.command(program).args(args), timeout)
    }

    /// Spawns `program args` inside the cgroup; killed on drop.
    pub fn spawn(&self, program: &str, args: &[&str]) -> KillOnDrop {
        KillOnDrop::spawn(self.command(program).args(args))
    }
}

/// Removes the empty `ktproxy-test-<pid>-*` cgroups of test processes that
/// are gone (killed before their `Drop` ran). rmdir refuses non-empty ones,
/// and nothing is killed: their processes are not this run's.
fn remove_stale_test_cgroups(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ktproxy-test-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// See `TestCgroup::run`.
pub fn run_in_cgroup(cg: &TestCgroup, program: &str, args: &[&str], timeout: Duration) -> Output {
    cg.run(program, args, timeout)
}

/// SIGKILLs the members of a cgroup this test created (only its clients and
/// their children can be in it), a few rounds in case one was forking.
fn kill_all_in(dir: &Path) {
    for _ in 0..5 {
        let pids = cgroup_procs(dir);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            signal(pid, libc::SIGKILL);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        kill_all_in(&self.path);
        if let Err(e) = remove_cgroup_dir(&self.path, Duration::from_secs(5)) {
            let msg = format!(
                "cannot remove test cgroup {} ({e}); members: {:?}",
                self.path.display(),
                self.procs()
            );
            // A leak is a failure, but a second panic would abort.
            if thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

// ---- ktproxy --------------------------------------------------------------------

/// The ktproxy command line the tests use (cgroup mode): `-c <cg>`, then
/// `-l 127.0.0.1:0` unless `extra` has a listen option of its own, then
/// `extra`. Arguments after a `--` are not looked at.
pub fn ktproxy_command(cg: &TestCgroup, extra: &[&str]) -> Command {
    let opts = extra.iter().take_while(|a| **a != "--");
    let mut own_listen = false;
    for a in opts {
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

/// A running ktproxy for one test cgroup; stopped (SIGTERM, then SIGKILL)
/// on drop, which also happens before its cgroup is dropped.
pub struct Proxy<'a> {
    child: Child,
    status: Option<ExitStatus>,
    pid: i32,
    log_path: PathBuf,
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
        let dir = TempDir::new("ktproxy");
        let log_path = dir.path().join("ktproxy.log");
        // A file, not a pipe: a pipe nobody drains would block ktproxy.
        let log = File::create(&log_path).expect("creating the ktproxy log");
        let mut cmd = ktproxy_command(cg, extra);
        customize(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        // If the test process dies without running Drop (say, the test run
        // is killed), ktproxy gets SIGTERM and detaches. The signal comes
        // when the spawning *thread* exits: keep a Proxy on its test's thread.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let mut p = Proxy {
            pid: child.id() as i32,
            child,
            status: None,
            log_path,
            addrs: Vec::new(),
            own_cgroup: PathBuf::new(),
            _dir: dir,
            _cg: PhantomData,
        };
        let mut ready = None;
        let came = wait_until(READY_TIMEOUT, || {
            ready = p
                .log()
                .lines()
                .find(|l| l.contains("ready"))
                .map(String::from);
            ready.is_some() || p.exited()
        });
        let Some(line) = ready else {
            panic!(
                "ktproxy {cmd:?} {}:\n{}",
                if came {
                    "exited before it was ready"
                } else {
                    "printed no ready line within 10 s"
                },
                p.log()
            );
        };
        p.addrs = parse_listen_addrs(&line)
            .unwrap_or_else(|| panic!("no listen addresses in the ready line: {line}"));
        p.own_cgroup = parse_own_cgroup(&line)
            .unwrap_or_else(|| panic!("no own cgroup in the ready line: {line}"));
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
                "ktproxy logged no {needle:?} within {timeout:?}; log tail:\n{}",
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
                    "ktproxy did not exit within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
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

/// `... ready: listening on 127.0.0.1:40123 and [::1]:40123, intercepting ...`
pub fn parse_listen_addrs(line: &str) -> Option<Vec<SocketAddr>> {
    let rest = line.split_once("listening on ")?.1;
    let list = rest.split_once(", ")?.0;
    list.split(" and ")
        .map(|a| a.trim().parse().ok())
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty())
}

/// `... (own cgroup /sys/fs/cgroup/ktproxy-123, fd limit 1024)` or
/// `... (own cgroup /sys/fs/cgroup/ktproxy-123; room for ...)`: the path
/// ends at the first `,`, `;`, `)` or blank.
pub fn parse_own_cgroup(line: &str) -> Option<PathBuf> {
    let rest = line.split_once("own cgroup ")?.1;
    let end = rest
        .find(|c: char| matches!(c, ',' | ';' | ')') || c.is_whitespace())
        .unwrap_or(rest.len());
    Some(PathBuf::from(&rest[..end])).filter(|p| p.is_absolute())
}

/// The counters of ktproxy's exit line `... kernel counters: a=1 b=2`.
pub fn kernel_counters(log: &str) -> Option<HashMap<String, u64>> {
    let line = log.lines().rev().find(|l| l.contains("kernel counters:"))?;
    let list = line.split_once("kernel counters:")?.1;
    list.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// (sent, received) from a `Connection closed` / `Connection reset` line:
/// `... N bytes sent, M bytes received ...`.
pub fn byte_counts(line: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let before = |what: &str| {
        words
            .windows(3)
            .find(|w| w[1] == "bytes" && w[2] == what)
            .and_then(|w| w[0].parse().ok())
    };
    Some((before("sent")?, before("received")?))
}

/// `testclient peer` prints `peer P local L`: returns (P, L).
pub fn parse_peer_line(stdout: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = stdout.lines().find(|l| l.starts_with("peer "))?;
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next(), w.next()) {
        (Some("peer"), Some(p), Some("local"), Some(l)) => Some((p.parse().ok()?, l.parse().ok()?)),
        _ => None,
    }
}

// ---- servers in the test process -------------------------------------------------

type Handler = fn(TcpStream);

/// A TCP server on a thread of the test process (outside every test
/// cgroup), recording the peer address of every connection it accepts.
pub struct TestServer {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
}

impl TestServer {
    /// `per_connection_thread`: serve each connection on its own thread
    /// (for handlers that wait for the client), else on the accept thread.
    pub fn start(bind: SocketAddr, handler: Handler, per_connection_thread: bool) -> TestServer {
        let listener =
            TcpListener::bind(bind).unwrap_or_else(|e| panic!("test server bind {bind}: {e}"));
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peers), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if let Ok(peer) = conn.peer_addr() {
                    p.lock().unwrap().push(peer);
                }
                if per_connection_thread {
                    thread::spawn(move || handler(conn));
                } else {
                    handler(conn);
                }
            }
        });
        TestServer { addr, peers, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peers of the connections accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Waits up to `timeout` until at least `n` connections were accepted.
    pub fn wait_peers(&self, n: usize, timeout: Duration) -> Vec<SocketAddr> {
        let mut peers = Vec::new();
        if !wait_until(timeout, || {
            peers = self.peers();
            peers.len() >= n
        }) {
            panic!(
                "server {} accepted {} connections within {timeout:?}, expected {n}",
                self.addr,
                peers.len()
            );
        }
        peers
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag and closes the socket.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Per-connection sockets of the servers give up after this long.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(60);

macro_rules! server_kind {
    ($(#[$doc:meta])* $name:ident, $handler:expr, $threaded:expr) => {
        $(#[$doc])*
        pub struct $name(TestServer);

        impl $name {
            /// On 127.0.0.1, a free port.
            pub fn start() -> $name {
                Self::start_on("127.0.0.1:0".parse().unwrap())
            }

            pub fn start_on(bind: SocketAddr) -> $name {
                $name(TestServer::start(bind, $handler, $threaded))
            }
        }

        impl std::ops::Deref for $name {
            type Target = TestServer;
            fn deref(&self) -> &TestServer {
                &self.0
            }
        }
    };
}

server_kind!(
    /// Writes its own address (`SocketAddr` Display) and "\n", then closes.
    HelloServer,
    hello,
    false
);
server_kind!(
    /// Sends back everything it reads; on EOF, shuts down its writing side.
    EchoServer,
    echo,
    true
);
server_kind!(
    /// Reads until EOF, then answers `got N bytes\n` and closes.
    ReplyAfterEofServer,
    reply_after_eof,
    true
);

fn hello(mut s: TcpStream) {
    if let Ok(local) = s.local_addr() {
        let _ = s.write_all(format!("{local}\n").as_bytes());
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn echo(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(SERVER_IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(SERVER_IO_TIMEOUT));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn reply_after_eof(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(SERVER_IO_TIMEOUT));
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0usize;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = s.write_all(format!("got {total} bytes\n").as_bytes());
    let _ = s.shutdown(Shutdown::Write);
}

// ---- servers as child processes ----------------------------------------------------

/// A `testserver` child process (killed on drop), e.g. `testserver -l
/// 127.0.0.1:0` or the same under `ip netns exec`, with the addresses it
/// announced.
pub struct ServerProcess {
    pub addrs: Vec<SocketAddr>,
    _child: KillOnDrop,
    _dir: TempDir,
}

impl ServerProcess {
    /// `cmd` must print one `testserver listening on ADDR` line per address;
    /// waits up to 10 s for `expected` of them.
    pub fn start(cmd: &mut Command, expected: usize) -> ServerProcess {
        let dir = TempDir::new("server");
        let out = dir.path().join("out");
        let f = File::create(&out).expect("creating the server log");
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        let mut child = KillOnDrop::spawn(cmd);
        let mut addrs = Vec::new();
        let ok = wait_until(Duration::from_secs(10), || {
            addrs = read_lossy(&out)
                .lines()
                .filter_map(|l| l.strip_prefix("testserver listening on "))
                .filter_map(|a| a.trim().parse().ok())
                .collect();
            addrs.len() >= expected || matches!(child.0.try_wait(), Ok(Some(_)))
        });
        if !ok || addrs.len() < expected {
            panic!("{cmd:?} did not start:\n{}", read_lossy(&out));
        }
        ServerProcess {
            addrs,
            _child: child,
            _dir: dir,
        }
    }

    /// `testserver -l 127.0.0.1:0`.
    pub fn testserver() -> ServerProcess {
        Self::start(Command::new(TESTSERVER).args(["-l", "127.0.0.1:0"]), 1)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }
}

// ---- network namespaces ------------------------------------------------------------

/// A network namespace `ktproxy-t-<pid>-<n>` with its loopback up; deleted
/// on drop (after the processes the test started in it, which drop first).
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(remove_stale_netns);
        let name = format!("ktproxy-t-{}-{}", std::process::id(), unique());
        let ip = |args: &[&str]| {
            let o = run_within(Command::new("ip").args(args), Duration::from_secs(10));
            assert!(o.status.success(), "ip {args:?}: {}", describe(&o));
        };
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> <program>`: ip enters the namespace, then execs
    /// the program (same pid).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Same, as a command line to append to e.g. `TestCgroup::command("ip")`.
    pub fn exec_args<'s>(&'s self, program: &'s str) -> [&'s str; 4] {
        ["netns", "exec", &self.name, program]
    }
}

/// Deletes the `ktproxy-t-<pid>-<n>` namespaces of test processes that are
/// gone (only the name goes; processes still inside keep theirs).
fn remove_stale_netns() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ktproxy-t-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = output_within(
                Command::new("ip").args(["netns", "delete", &name]),
                Duration::from_secs(10),
            );
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = output_within(
            Command::new("ip").args(["netns", "delete", &self.name]),
            Duration::from_secs(10),
        );
    }
}

// ---- bpftool -------------------------------------------------------------------------

fn bpftool_json(args: &[&str]) -> Json {
    let o = run_within(
        Command::new("bpftool").arg("-j").args(args),
        Duration::from_secs(20),
    );
    assert!(o.status.success(), "bpftool -j {args:?}: {}", describe(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    if text.trim().is_empty() {
        return Json::Arr(Vec::new());
    }
    Json::parse(&text).unwrap_or_else(|e| panic!("bpftool -j {args:?}: {e}: {text}"))
}

/// A program attached to a cgroup, as `bpftool cgroup show` lists it.
#[derive(Debug, Clone)]
pub struct Attached {
    pub id: u64,
    pub name: String,
    pub attach_type: String,
}

/// Programs attached directly to the cgroup `path` (not inherited ones).
/// A cgroup that does not exist (any more) has none.
pub fn attached(path: &Path) -> Vec<Attached> {
    let p = path.to_str().expect("UTF-8 cgroup path");
    let o = run_within(
        Command::new("bpftool").args(["-j", "cgroup", "show", p]),
        Duration::from_secs(20),
    );
    if !o.status.success() && !path.exists() {
        return Vec::new();
    }
    assert!(
        o.status.success(),
        "bpftool cgroup show {p}: {}",
        describe(&o)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    Json::parse(&text)
        .unwrap_or_else(|e| panic!("bpftool cgroup show {p}: {e}: {text}"))
        .as_array()
        .iter()
        .map(|e| Attached {
            id: e.get("id").and_then(Json::as_u64).unwrap_or(0),
            name: e.get("name").and_then(Json::as_str).unwrap_or("").into(),
            attach_type: e
                .get("attach_type")
                .and_then(Json::as_str)
                .unwrap_or("")
                .into(),
        })
        .collect()
}

/// Names of the programs attached to the cgroup `path`.
pub fn attached_programs(path: &Path) -> Vec<String> {
    attached(path).into_iter().map(|a| a.name).collect()
}

/// Waits up to `timeout` for the cgroup to have no programs attached;
/// returns what is still attached on timeout.
pub fn wait_detached(path: &Path, timeout: Duration) -> Vec<String> {
    let mut left = Vec::new();
    wait_until(timeout, || {
        left = attached_programs(path);
        left.is_empty()
    });
    left
}

/// The id of the map called `name` that the running `proxy` uses. With a
/// bpftool that lists map owners (`pids`), by pid; otherwise through the
/// programs attached to ktproxy's own cgroup, which only it uses.
pub fn proxy_map_id(proxy: &Proxy, name: &str) -> u64 {
    let maps = bpftool_json(&["map", "show"]);
    let named: Vec<&Json> = maps
        .as_array()
        .iter()
        .filter(|m| m.get("name").and_then(Json::as_str) == Some(name))
        .collect();
    if named.iter().any(|m| m.get("pids").is_some()) {
        let owned = named.iter().find(|m| {
            m.get("pids").is_some_and(|p| {
                p.as_array()
                    .iter()
                    .any(|e| e.get("pid").and_then(Json::as_u64) == Some(proxy.pid() as u64))
            })
        });
        return owned
            .and_then(|m| m.get("id").and_then(Json::as_u64))
            .unwrap_or_else(|| panic!("no map {name} held by pid {}", proxy.pid()));
    }
    for prog in attached(proxy.own_cgroup()) {
        let info = bpftool_json(&["prog", "show", "id", &prog.id.to_string()]);
        for id in info.get("map_ids").map(Json::as_array).unwrap_or(&[]) {
            let Some(id) = id.as_u64() else { continue };
            let map = bpftool_json(&["map", "show", "id", &id.to_string()]);
            if map.get("name").and_then(Json::as_str) == Some(name) {
                return id;
            }
        }
    }
    panic!(
        "no map {name} among the programs attached to {}",
        proxy.own_cgroup().display()
    )
}

/// Number of entries in the map with this id.
pub fn map_entry_count(id: u64) -> usize {
    bpftool_json(&["map", "dump", "id", &id.to_string()])
        .as_array()
        .len()
}

// ---- a small JSON reader, for bpftool -j ----------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number's text, so that 64-bit values survive.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            b: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("trailing data at byte {}", p.i));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The elements of an array; empty for anything else.
    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            _ => &[],
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) => n.parse().ok(),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.b.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("JSON: {what} at byte {}", self.i))
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.b[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.b.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'{') => {
                self.i += 1;
                let mut kv = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Json::Obj(kv));
                }
                loop {
                    self.ws();
                    let Json::Str(k) = self.value()? else {
                        return self.err("expected a key");
                    };
                    self.ws();
                    if !self.eat(":") {
                        return self.err("expected ':'");
                    }
                    kv.push((k, self.value()?));
                    self.ws();
                    if self.eat("}") {
                        return Ok(Json::Obj(kv));
                    }
                    if !self.eat(",") {
                        return self.err("expected ',' or '}'");
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Json::Arr(v));
                }
                loop {
                    v.push(self.value()?);
                    self.ws();
                    if self.eat("]") {
                        return Ok(Json::Arr(v));
                    }
                    if !self.eat(",") {
                        return self.err("expected ',' or ']'");
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(_) if self.eat("true") => Ok(Json::Bool(true)),
            Some(_) if self.eat("false") => Ok(Json::Bool(false)),
            Some(_) if self.eat("null") => Ok(Json::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self
                    .b
                    .get(self.i)
                    .is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c))
                {
                    self.i += 1;
                }
                Ok(Json::Num(
                    String::from_utf8_lossy(&self.b[start..self.i]).into(),
                ))
            }
            Some(_) => self.err("unexpected character"),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                return self.err("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        return self.err("unterminated escape");
                    };
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4).unwrap_or(b"");
                            let cp = std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u32::from_str_radix(h, 16).ok());
                            let Some(cp) = cp else {
                                return self.err("bad \\u escape");
                            };
                            self.i += 4;
                            let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                            out.extend_from_slice(ch.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                _ => out.push(c),
            }
        }
    }
}
