//! Processes the tests start: bounded waits, kill-on-drop, output through
//! files, and the tools they need.

use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

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

/// The full path of `tool`, which the tests need: a missing one fails the
/// test (never skips it) and says how to install it.
pub fn need(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{tool}` is not installed, and this test needs it: run scripts/deps.sh as root \
         (it installs microsocks, tinyproxy, busybox-static, curl, netcat, bpftool)"
    );
}

/// A number unique within this test process, for names.
pub fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// How many times slower than on a development machine the tests may run:
/// `KTPROXY_TEST_TIME_SCALE` (default 1), read once. scripts/vmtest.sh sets
/// it in its guests, whose CPU qemu emulates (TCG).
///
/// Every bounded wait of the harness (`wait_until` and all that waits
/// through it: `wait_child`, `run_within`, `Proxy::wait_log`, ...) is a
/// hang catcher and is multiplied by it. A test that asserts ktproxy's own
/// timing (the 1 s heartbeat, `--connect-timeout`, `--drain`) keeps that
/// figure as it is and scales only the slack it adds for scheduling, with
/// `scaled`. Speed targets are no test's business: scripts/bench.sh
/// measures them.
pub fn time_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("KTPROXY_TEST_TIME_SCALE") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<f64>() {
            Ok(x) if (1.0..=1000.0).contains(&x) => x,
            _ => panic!("KTPROXY_TEST_TIME_SCALE={v:?}: expected a number from 1 to 1000"),
        },
        _ => 1.0,
    })
}

/// `d` multiplied by `time_scale()`.
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// `scaled(Duration::from_secs_f64(secs))` in seconds, for the arguments
/// of scripts and clients.
pub fn scaled_secs(secs: f64) -> f64 {
    secs * time_scale()
}

/// Polls `cond` until it holds or `scaled(timeout)` passes; says whether it
/// held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + scaled(timeout);
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

/// Waits at most `timeout` (scaled) for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// Whether process `pid` exists and has not exited (a zombie waiting for
/// its parent, e.g. init after reparenting, has exited).
pub fn is_running(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            // "pid (comm) S ...": the state follows the last ')'.
            let after = &st[st.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Makes the process `cmd` starts receive SIGTERM when the test dies
/// without running its `Drop`s (say, the test run is killed): a ktproxy
/// then detaches and cleans up. The signal comes when the spawning *thread*
/// exits: spawn on the test's own thread.
pub fn sigterm_when_the_test_dies(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The last `n` lines of `text`, for failure messages about huge logs.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

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

/// A file's text so far (invalid UTF-8 replaced); empty if it is missing.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

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
/// output, killing it if it runs longer than `timeout` (scaled): Err(what it printed)
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
            "{shown} did not finish within {:?}\nstdout: {}\nstderr: {}",
            scaled(timeout),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What the command printed on stderr, less ktproxy's capacity warning
/// (`... caps ktproxy at about N concurrent connections`): whether it comes
/// depends on the RLIMIT_NOFILE the tests run under (containers and many
/// init systems give 1024:4096), not on what a test checks. `describe` and
/// `stderr_raw` keep it.
pub fn stderr(o: &Output) -> String {
    without_capacity_warning(&stderr_raw(o))
}

pub fn stderr_raw(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `text` without the lines of ktproxy's start-up warning that its limits
/// leave room for fewer than 4,096 connections.
pub fn without_capacity_warning(text: &str) -> String {
    text.split_inclusive('\n')
        .filter(|l| !(l.contains("[WARN]") && l.contains(" caps ktproxy at about ")))
        .collect()
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

/// CLOCK_MONOTONIC in seconds: the clock of Python's time.monotonic() and
/// of the kernel's bpf_ktime_get_ns(), comparable across processes.
pub fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// prlimit(RLIMIT_NOFILE) on process `pid`, soft and hard. Below the number
/// of descriptors open, it only stops new ones.
pub fn set_fd_limit(pid: u32, limit: usize) {
    let rl = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // SAFETY: prlimit with a valid new limit and no old-limit pointer.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &rl,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}
