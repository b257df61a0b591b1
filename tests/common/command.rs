//! `ktproxy [OPTIONS] -- COMMAND` runs: ktproxy creates and intercepts only
//! COMMAND's own cgroup, `<ktproxy's cgroup>/ktproxy-<pid>-cmd`, so these
//! never pass `-c`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::bpftool::bpf_leftovers;
use super::cgroup::{
    cgroup_procs, command_cgroup_of, kill_all_in, own_cgroup_of, remove_cgroup_dir,
};
use super::process::{
    describe, read_lossy, scaled, signal, sigterm_when_the_test_dies, tail, wait_child, TempDir,
    PROXY_ENV,
};
use super::KTPROXY;

/// Upper bound for one short ktproxy -- COMMAND run.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// `ktproxy OPTS -- COMMAND...`, proxy settings removed from the environment
/// that COMMAND inherits, stdin from /dev/null.
pub fn ktproxy_cmd(opts: &[&str], command: &[&str]) -> Command {
    for a in opts {
        assert!(
            !(a.starts_with("--cgroup") || (a.starts_with("-c") && !a.starts_with("--"))),
            "command mode must not be given -c: {opts:?}"
        );
    }
    let mut cmd = Command::new(KTPROXY);
    cmd.args(opts).arg("--").args(command);
    for v in PROXY_ENV {
        cmd.env_remove(v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A running `ktproxy ... -- COMMAND` with stdout and stderr in files. On
/// drop, a ktproxy still running is killed (by pid) together with what is
/// left in its command cgroup, and both of its cgroups are removed.
pub struct CommandRun {
    child: Child,
    pid: u32,
    pub status: Option<ExitStatus>,
    shown: String,
    out: PathBuf,
    err: PathBuf,
    _dir: TempDir,
}

impl CommandRun {
    pub fn spawn(cmd: &mut Command) -> CommandRun {
        let dir = TempDir::new("cmdrun");
        let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let create = |p: &Path| fs::File::create(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        cmd.stdout(create(&out)).stderr(create(&err));
        // Should the test die without Drop, ktproxy gets SIGTERM, passes it
        // on to COMMAND and cleans up.
        sigterm_when_the_test_dies(cmd);
        let shown = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
        CommandRun {
            pid: child.id(),
            child,
            status: None,
            shown,
            out,
            err,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn stderr_now(&self) -> String {
        read_lossy(&self.err)
    }

    /// Waits up to `timeout` for the exit; None if still running.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Waits for the exit and returns what it printed; panics (and Drop
    /// cleans up) if it runs longer than `timeout`.
    pub fn finish(&mut self, timeout: Duration) -> Output {
        match self.wait(timeout) {
            Some(status) => Output {
                status,
                stdout: fs::read(&self.out).unwrap_or_default(),
                stderr: fs::read(&self.err).unwrap_or_default(),
            },
            None => panic!(
                "{} did not finish within {:?}\nstdout: {}\nstderr: {}",
                self.shown,
                scaled(timeout),
                read_lossy(&self.out),
                tail(&read_lossy(&self.err), 40)
            ),
        }
    }
}

impl Drop for CommandRun {
    fn drop(&mut self) {
        let cmd_cgroup = command_cgroup_of(self.pid);
        if self.status.is_none() && self.wait(Duration::ZERO).is_none() {
            signal(self.pid as i32, libc::SIGKILL);
            self.status = self.child.wait().ok();
            // Only COMMAND and what it forked can be in there.
            kill_all_in(&cmd_cgroup);
        }
        // rmdir only removes empty cgroups; after a normal exit there is
        // nothing to remove (the tests check that before this runs).
        let _ = remove_cgroup_dir(&cmd_cgroup, Duration::from_secs(2));
        let _ = remove_cgroup_dir(&own_cgroup_of(self.pid), Duration::from_secs(2));
    }
}

/// Runs `ktproxy OPTS -- COMMAND` to the end: (output, ktproxy's pid).
pub fn run_command(opts: &[&str], command: &[&str], timeout: Duration) -> (Output, u32) {
    let mut run = CommandRun::spawn(&mut ktproxy_cmd(opts, command));
    let out = run.finish(timeout);
    (out, run.pid())
}

/// ktproxy's exit code; panics if it died of a signal itself.
pub fn exit_code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("ktproxy died of a signal: {}", describe(o)))
}

/// After ktproxy `pid` exited: the kernel holds nothing of it (see
/// `bpf_leftovers`: no program on its cgroups, no program of any ktproxy
/// left attached nowhere), neither of its cgroups exists, and its log
/// (`log`) has no complaint about removing them. (Another ktproxy starting
/// meanwhile removes the empty cgroups of dead ones, which would hide a leak
/// but not its warning.)
pub fn assert_nothing_left(pid: u32, log: &str, what: &str) {
    let left = bpf_leftovers(pid);
    assert!(left.is_empty(), "{what}: the kernel still holds {left:?}");
    for dir in [own_cgroup_of(pid), command_cgroup_of(pid)] {
        assert!(
            !dir.exists(),
            "{what}: {} left behind (members {:?})",
            dir.display(),
            cgroup_procs(&dir)
        );
    }
    assert!(
        !log.contains("removing cgroup"),
        "{what}: ktproxy could not remove a cgroup:\n{log}"
    );
}
