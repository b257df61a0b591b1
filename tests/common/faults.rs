//! Faults the fail-safe tests inflict, and how they look from a client:
//! a probe that connects again and again and records each attempt, a
//! stopped process (SIGCONT on drop), a pids cgroup that caps a process's
//! threads.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::cgroup::TestCgroup;
use super::clients::python;
use super::process::{describe, run_within, signal, stdout, unique, wait_until};
use super::servers::TestServer;

/// Connects to HOST PORT again and again for SECONDS (at least once),
/// pausing PAUSE seconds between attempts, each bounded by TIMEOUT seconds
/// (connect, then read to EOF), and prints one JSON object per attempt:
/// `t` (time.monotonic() at its start), then `local` and `reply` if it
/// connected and read to EOF, or `err` (errno, or the exception's text).
/// SIGTERM is ignored: it plays the leftover that outlives its parent.
pub const PROBE: &str = r#"
import json, signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
host, port = sys.argv[1], int(sys.argv[2])
seconds, pause, timeout = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
start = time.monotonic()
while True:
    rec = {"t": time.monotonic()}
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
        rec["local"] = "%s:%d" % s.getsockname()[:2]
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
        rec["reply"] = data.decode(errors="replace").strip()
    except OSError as e:
        rec["err"] = e.errno if e.errno is not None else str(e)
    finally:
        s.close()
    print(json.dumps(rec), flush=True)
    if time.monotonic() - start >= seconds:
        break
    time.sleep(pause)
"#;

/// One connection attempt of `PROBE`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub t: f64,
    pub local: Option<SocketAddr>,
    pub reply: Option<String>,
    pub err: Option<String>,
}

impl Attempt {
    /// It connected and got `server`'s hello (its own address).
    pub fn answered_by(&self, server: &TestServer) -> bool {
        self.reply.as_deref() == Some(server.addr().to_string().as_str())
    }

    /// Answered, and `server` saw the client itself: it went direct.
    pub fn direct_to(&self, server: &TestServer) -> bool {
        self.answered_by(server)
            && self
                .local
                .is_some_and(|l| server.peers_since(self.t).contains(&l))
    }

    /// Answered, and `server` saw someone else (ktproxy): it was proxied.
    pub fn proxied_to(&self, server: &TestServer) -> bool {
        self.answered_by(server)
            && self
                .local
                .is_some_and(|l| !server.peers_since(self.t).contains(&l))
    }

    /// The connect failed with this errno.
    pub fn failed_with(&self, errno: i32) -> bool {
        self.err.as_deref() == Some(errno.to_string().as_str())
    }
}

/// Parses `PROBE`'s output.
pub fn parse_attempts(text: &str) -> Vec<Attempt> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("probe line {l}: {e}"));
            Attempt {
                t: v["t"].as_f64().expect("t"),
                local: v["local"].as_str().and_then(|s| s.parse().ok()),
                reply: v["reply"].as_str().map(String::from),
                err: match &v["err"] {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                },
            }
        })
        .collect()
}

/// Runs `PROBE` in the cgroup against `to` (see there), to the end.
pub fn probe(
    cg: &TestCgroup,
    to: SocketAddr,
    seconds: f64,
    pause: f64,
    timeout: f64,
) -> Vec<Attempt> {
    let args = probe_args(to, seconds, pause, timeout);
    let bound = Duration::from_secs_f64(seconds + timeout + 20.0);
    let out = cg.run(
        python(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        bound,
    );
    assert!(out.status.success(), "probe: {}", describe(&out));
    let attempts = parse_attempts(&stdout(&out));
    assert!(
        !attempts.is_empty(),
        "probe made no attempt: {}",
        describe(&out)
    );
    attempts
}

/// `python3 -c PROBE HOST PORT SECONDS PAUSE TIMEOUT` as arguments.
pub fn probe_args(to: SocketAddr, seconds: f64, pause: f64, timeout: f64) -> Vec<String> {
    vec![
        "-c".into(),
        PROBE.into(),
        to.ip().to_string(),
        to.port().to_string(),
        seconds.to_string(),
        pause.to_string(),
        timeout.to_string(),
    ]
}

/// A process this test stopped with SIGSTOP; SIGCONT on drop, so that a
/// failing test leaves nothing stopped (a stopped ktproxy ignores SIGTERM).
pub struct Stopped(i32);

impl Stopped {
    /// Returns once every thread of `pid` has stopped: from then on it does
    /// nothing (renews no heartbeat), which tests of the fail-safe time from.
    pub fn new(pid: i32) -> Stopped {
        signal(pid, libc::SIGSTOP);
        assert!(
            wait_until(Duration::from_secs(5), || all_threads_stopped(pid)),
            "process {pid} did not stop"
        );
        Stopped(pid)
    }
}

/// Whether every thread of `pid` is stopped (state T): a group stop reaches
/// the threads one by one, and /proc/PID/stat shows only the main thread's.
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        let st = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let state = st
            .rfind(')')
            .and_then(|i| st[i + 1..].trim_start().chars().next());
        // A thread that exits meanwhile (no stat any more, or a zombie)
        // renews nothing either.
        if state.is_some_and(|s| !matches!(s, 'T' | 'Z' | 'X')) {
            return false;
        }
        any = true;
    }
    any
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// The state letter of /proc/PID/stat (R, S, T, Z...).
pub fn process_state(pid: i32) -> Option<char> {
    let st = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    st[st.rfind(')')? + 1..].trim_start().chars().next()
}

/// The threads of a process.
pub fn thread_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// A cap on the tasks (threads included) of one process, with the pids
/// controller. Where cgroup v1's pids hierarchy is mounted (hybrid systems,
/// like the development machine): a pids cgroup of the test's own, holding
/// the process (moved in by the test; Drop moves it back and removes the
/// cgroup). On a pure cgroup v2 system (Debian 12's default, the
/// scripts/vmtest.sh guests): the process's own v2 cgroup (ktproxy's
/// `ktproxy-<pid>`), which has `pids.max` when its parent enables the
/// controller (Drop lifts the cap); else the test says so.
pub struct PidsCap {
    dir: PathBuf,
    /// Where the process goes back to on drop: None if it was not moved.
    home: Option<PathBuf>,
    pid: i32,
}

impl PidsCap {
    pub fn new(pid: i32) -> PidsCap {
        let Some(mount) = v1_pids_mount() else {
            let dir = v2_cgroup_of(pid).filter(|d| d.join("pids.max").exists());
            let dir = dir.unwrap_or_else(|| {
                panic!(
                    "this test caps threads with the pids controller: no cgroup v1 pids \
                     hierarchy is mounted, and the cgroup v2 of process {pid} has no pids.max \
                     (enable +pids in its parent's cgroup.subtree_control)"
                )
            });
            return PidsCap {
                dir,
                home: None,
                pid,
            };
        };
        let home = mount.join(
            v1_pids_path(pid)
                .unwrap_or_default()
                .trim_start_matches('/'),
        );
        let dir = mount.join(format!("ktproxy-test-{}-{}", std::process::id(), unique()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let cap = PidsCap {
            dir,
            home: Some(home),
            pid,
        };
        write(&cap.dir.join("cgroup.procs"), &pid.to_string());
        cap
    }

    /// Tasks in the cgroup now.
    pub fn current(&self) -> u64 {
        fs::read_to_string(self.dir.join("pids.current"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `pids.max`: a number, or "max".
    pub fn set_max(&self, max: &str) {
        write(&self.dir.join("pids.max"), max);
    }

    /// The cgroup and its pids files, for failure messages.
    pub fn state(&self) -> String {
        let read = |f: &str| {
            fs::read_to_string(self.dir.join(f))
                .map(|s| s.trim().replace('\n', ", "))
                .unwrap_or_else(|e| format!("({e})"))
        };
        format!(
            "{}: pids.current {}, pids.max {}, pids.events {}",
            self.dir.display(),
            read("pids.current"),
            read("pids.max"),
            read("pids.events")
        )
    }

    /// How often creating a task failed at the cap (pids.events "max N").
    pub fn refusals(&self) -> u64 {
        fs::read_to_string(self.dir.join("pids.events"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("max ").and_then(|n| n.trim().parse().ok()))
            })
            .unwrap_or(0)
    }
}

impl Drop for PidsCap {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("pids.max"), "max");
        let Some(home) = &self.home else { return };
        if Path::new(&format!("/proc/{}", self.pid)).exists() {
            let _ = fs::write(home.join("cgroup.procs"), self.pid.to_string());
        }
        let _ = wait_until(Duration::from_secs(5), || fs::remove_dir(&self.dir).is_ok());
    }
}

/// The process's cgroup v2 directory ("0::/path" in /proc/PID/cgroup).
fn v2_cgroup_of(pid: i32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(super::cgroup::cgroup2_root().join(rel.trim_start_matches('/')))
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("writing {text} to {}: {e}", path.display()));
}

/// Where the cgroup v1 hierarchy with the pids controller is mounted.
fn v1_pids_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let _source = post.next()?;
        let opts = post.next()?;
        (fstype == "cgroup" && opts.split(',').any(|o| o == "pids"))
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or("")))
    })
}

/// The process's cgroup in the v1 pids hierarchy ("N:pids:/path").
fn v1_pids_path(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _n = parts.next()?;
        let ctrl = parts.next()?;
        let path = parts.next()?;
        ctrl.split(',')
            .any(|c| c == "pids")
            .then(|| path.to_string())
    })
}

/// A cgroup directory the test creates inside another (a child of a test
/// cgroup); removed on drop (after its processes, which the test kills).
pub struct ChildCgroup(pub PathBuf);

impl ChildCgroup {
    pub fn new(parent: &Path, name: &str) -> ChildCgroup {
        let p = parent.join(name);
        fs::create_dir(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        ChildCgroup(p)
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        super::cgroup::kill_all_in(&self.0);
        let _ = super::cgroup::remove_cgroup_dir(&self.0, Duration::from_secs(5));
    }
}

/// `ip ARGS` (inside a namespace: `-n NS ...`), which must succeed.
pub fn ip(args: &[&str]) {
    let o = run_within(
        std::process::Command::new("ip").args(args),
        Duration::from_secs(10),
    );
    assert!(o.status.success(), "ip {args:?}: {}", describe(&o));
}
