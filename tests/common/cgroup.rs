//! cgroup v2 helpers: the hierarchy, the test's own cgroups (children of the
//! root, never the root itself), and where ktproxy puts its cgroups.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use super::process::{run_within, signal, wait_until, KillOnDrop, PROXY_ENV};

/// Mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo.
pub fn cgroup2_root() -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        ktproxy::mountinfo::cgroup2_mount_point()
            .expect("reading /proc/self/mountinfo")
            .expect("no cgroup2 filesystem in /proc/self/mountinfo")
    })
    .clone()
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

/// `<ktproxy's cgroup parent>/ktproxy-<pid>-cmd`, where `ktproxy -- COMMAND`
/// started by the test runs COMMAND.
pub fn command_cgroup_of(pid: u32) -> PathBuf {
    self_cgroup().join(format!("ktproxy-{pid}-cmd"))
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
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
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

/// SIGKILLs the members of a cgroup this test created (only its clients and
/// their children can be in it), a few rounds in case one was forking.
pub fn kill_all_in(dir: &Path) {
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
