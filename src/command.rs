//! `ktproxy [OPTIONS] -- COMMAND [ARGS...]`: run one command, and everything
//! it forks, through the proxy.
//!
//! The child joins its cgroup between fork and exec, so not even its first
//! connect can escape. ktproxy then only supervises: it exits with COMMAND's
//! status, and leaves Ctrl-C to COMMAND (the terminal delivers it to both; a
//! signal sent to ktproxy alone with kill(1) is passed on).
//!
//! Every COMMAND gets the caller's resource limits back (ktproxy raises its
//! own). With --user, the boundary is real: COMMAND runs in a session of its
//! own, on a pty of its own when the caller has a terminal (src/pty.rs), so
//! it cannot push keystrokes into the caller's terminal (TIOCSTI, as in
//! CVE-2016-7545 and CVE-2017-5226); and it gets a fresh environment, as
//! `su -l` gives, plus what the caller passes with --preserve-env and --env.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid, User};

use crate::cgroup::CommandCgroup;
use crate::error::{io_text, Context, Error, Result};
use crate::nss;
use crate::pty::{Pty, Relay};
use crate::secret::UPSTREAM_ENV;

/// Who COMMAND runs as with --user, resolved before fork: the child may only
/// make async-signal-safe calls.
pub struct Identity {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    home: std::path::PathBuf,
    shell: std::path::PathBuf,
    /// PATH for the user, as su(1) sets it from /etc/login.defs.
    path: String,
}

pub fn resolve_user(name: &str) -> Result<Identity> {
    let user = User::from_name(name)
        .map_err(|e| Error::new(format!("--user {name}: looking up the user: {}", e.desc())))?
        .ok_or_else(|| Error::usage(format!("--user: no such user '{name}'")))?;
    let cname = CString::new(name).map_err(|_| Error::usage("--user: name contains a NUL byte"))?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map_err(|e| Error::new(format!("--user {name}: listing its groups: {}", e.desc())))?;
    Ok(Identity {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups: groups.iter().map(|g| g.as_raw()).collect(),
        path: login_path(
            &std::fs::read_to_string("/etc/login.defs").unwrap_or_default(),
            user.uid.is_root(),
        ),
        home: user.dir,
        shell: user.shell,
    })
}

/// ENV_SUPATH (for root) or ENV_PATH from login.defs, with or without its
/// `PATH=` prefix; su's defaults without one.
fn login_path(login_defs: &str, root: bool) -> String {
    let (key, default) = if root {
        (
            "ENV_SUPATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
    } else {
        ("ENV_PATH", "/usr/local/bin:/usr/bin:/bin")
    };
    login_defs
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(key)).then(|| words.next()).flatten()
        })
        .map(|v| v.strip_prefix("PATH=").unwrap_or(v))
        .filter(|v| !v.is_empty())
        .unwrap_or(default)
        .to_string()
}

/// RLIMIT_NOFILE and RLIMIT_MEMLOCK as the caller set them, captured before
/// ktproxy raised its own: COMMAND gets them back.
pub struct CallerLimits {
    nofile: libc::rlimit,
    memlock: libc::rlimit,
}

impl CallerLimits {
    pub fn capture() -> CallerLimits {
        let get = |resource| {
            let mut r = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: getrlimit writes one rlimit; on failure it stays at
            // "unlimited", which setrlimit then leaves as ktproxy had it.
            unsafe { libc::getrlimit(resource, &mut r) };
            r
        };
        CallerLimits {
            nofile: get(libc::RLIMIT_NOFILE),
            memlock: get(libc::RLIMIT_MEMLOCK),
        }
    }
}

/// How COMMAND is started, besides its argv and cgroup.
pub struct Launch<'a> {
    pub user: Option<&'a Identity>,
    pub limits: &'a CallerLimits,
    /// --preserve-env (with --user).
    pub preserve_env: &'a [String],
    /// --env NAME=VALUE.
    pub set_env: &'a [(String, String)],
    /// A private name-service view (nss.rs): nsswitch.conf without daemon
    /// resolvers, no nscd socket.
    pub nss: Option<&'a nss::View>,
}

/// COMMAND, once started.
pub struct Running {
    child: Child,
    /// In a session of its own (--user): terminal signals reach only
    /// ktproxy, which passes them on.
    detached: bool,
    /// Its own terminal, relayed.
    pty: Option<Relay>,
}

/// Starts COMMAND inside `cgroup`, as `launch.user` if given.
pub fn spawn(argv: &[String], cgroup: &CommandCgroup, launch: &Launch) -> Result<Running> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| Error::usage("no COMMAND after --"))?;
    // Opened here: open(2) with a path is fine after fork, but an error is
    // far easier to report from the parent.
    let procs: OwnedFd = OpenOptions::new()
        .write(true)
        .open(cgroup.path().join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", cgroup.path().display()))?
        .into();
    let procs_fd = procs.as_raw_fd();

    let mut cmd = Command::new(prog);
    cmd.args(args);
    set_environment(&mut cmd, launch);
    let user = launch.user;
    let creds = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    let pty = match user {
        Some(u) => Pty::open_if_interactive((Uid::from_raw(u.uid), Gid::from_raw(u.gid)))?,
        None => None,
    };
    let detached = user.is_some();
    let tty = pty.as_ref().map(Pty::for_child);
    let (nofile, memlock) = (launch.limits.nofile, launch.limits.memlock);
    let ktproxy_pid = nix::unistd::getpid().as_raw();
    let nss = launch.nss.map(nss::View::mounts);
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (write, setrlimit, unshare, mount, setsid,
    // ioctl, dup2, setgroups, setgid, setuid, prctl, getppid,
    // pthread_sigmask) on data prepared before the fork. They stay raw libc
    // so that this can be checked call by call against signal-safety(7),
    // with nothing in between that might allocate.
    unsafe {
        cmd.pre_exec(move || {
            // "0" means the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            // ktproxy raised these for itself; lowering needs no privilege.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) != 0
                || libc::setrlimit(libc::RLIMIT_MEMLOCK, &memlock) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // A new session has no controlling terminal: TIOCSTI on the
            // caller's terminal answers EPERM, and /dev/tty cannot reach it.
            if detached && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((slave, on_tty)) = tty {
                // The pty becomes the new session's controlling terminal:
                // its Ctrl-C signals COMMAND's foreground process group.
                if libc::ioctl(slave, libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                for (fd, replace) in (0..).zip(on_tty) {
                    if replace && libc::dup2(slave, fd) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            // Needs CAP_SYS_ADMIN: before any --user switch.
            if let Some(mounts) = &nss {
                mounts.apply()?;
            }
            if let Some((uid, gid, groups)) = &creds {
                // Groups first: after setuid we could no longer change them.
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // If ktproxy dies (even kill -9), the redirect is gone and
            // COMMAND's connections would go out unproxied: COMMAND gets
            // SIGTERM instead. Set after setuid, which clears it; the getppid
            // check closes the race with a ktproxy that died just now.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != ktproxy_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // ktproxy blocks the signals it waits for; COMMAND must not
            // inherit that.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        // The shell's conventions: 127 not found, 126 found but not runnable.
        let code = if e.kind() == io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        Error::with_code(format!("cannot run '{prog}': {}", io_text(&e)), code)
    })?;
    drop(procs);
    debug!(
        "started {prog} as pid {} in {}{}",
        child.id(),
        cgroup.path().display(),
        match (&pty, detached) {
            (Some(_), _) => ", in a session of its own on a pty of its own",
            (None, true) => ", in a session of its own",
            (None, false) => "",
        }
    );
    let pty = pty.map(Pty::start).transpose()?;
    Ok(Running {
        child,
        detached,
        pty,
    })
}

/// With --user, only what `su -l` sets (HOME, USER, LOGNAME, SHELL, PATH),
/// TERM, and what the caller names with --preserve-env: nothing of root's
/// environment (LD_*, proxy settings, tokens) reaches another user's
/// program unasked. Without --user, the whole environment but the upstream
/// URL. --env applies in both.
fn set_environment(cmd: &mut Command, launch: &Launch) {
    match launch.user {
        Some(u) => {
            let term = std::env::var_os("TERM");
            cmd.env_clear()
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name)
                .env("SHELL", &u.shell)
                .env("PATH", &u.path);
            if let Some(t) = term {
                cmd.env("TERM", t);
            }
            for name in launch.preserve_env {
                if let Some(v) = std::env::var_os(name) {
                    cmd.env(name, v);
                }
            }
        }
        None => {
            cmd.env_remove(UPSTREAM_ENV);
        }
    }
    for (name, value) in launch.set_env {
        cmd.env(name, value);
    }
}

/// Waits for COMMAND, then for whatever it left running in its cgroup (it
/// stays proxied until it exits). Returns the exit status to give: COMMAND's
/// own, or 128+signal if a signal killed it, as shells report it.
pub fn supervise(mut run: Running, cgroup: &CommandCgroup, signals: &SigSet) -> Result<i32> {
    let child_pid = run.child.id() as i32;
    let mut status: Option<i32> = None;
    let mut told_about_leftovers = false;
    let mut stopping_since: Option<Instant> = None;
    // Someone asked ktproxy itself to stop: what COMMAND leaves behind when
    // it obeys must stop too, not keep ktproxy waiting.
    let mut asked_to_stop = false;
    loop {
        let sig = wait_signal(signals, Duration::from_millis(200))?;
        if let Some((sig, from_elsewhere)) = sig {
            if sig == Signal::SIGCHLD {
                // handled below: a SIGCHLD may stand for several exits
            } else if sig == Signal::SIGWINCH {
                if let Some(pty) = &run.pty {
                    pty.resize();
                }
            } else if status.is_none() {
                // The terminal sends Ctrl-C to COMMAND too; pass on only what
                // was aimed at ktproxy alone.
                if from_elsewhere {
                    debug!("passing {sig} on to pid {child_pid}");
                    let _ = nix::sys::signal::kill(Pid::from_raw(child_pid), sig);
                    asked_to_stop = true;
                } else if run.detached {
                    // COMMAND's session has another terminal, or none: the
                    // caller's terminal signalled only ktproxy. To the
                    // foreground of COMMAND's terminal, as a terminal would.
                    let group = run.pty.as_ref().and_then(Relay::foreground);
                    let group = group.unwrap_or(Pid::from_raw(child_pid));
                    debug!("passing {sig} on to process group {group}");
                    let _ = nix::sys::signal::killpg(group, sig);
                }
            } else if stopping_since.is_none() {
                info!(
                    "{sig}: stopping the processes left in {}",
                    cgroup.path().display()
                );
                cgroup.signal_all(Signal::SIGTERM);
                stopping_since = Some(Instant::now());
            }
        }
        if status.is_none() {
            status = check_command(&mut run)?;
        }
        let Some(code) = status else { continue };
        let left = cgroup.processes();
        if left.is_empty() {
            finish(run);
            return Ok(code);
        }
        if asked_to_stop && stopping_since.is_none() {
            cgroup.signal_all(Signal::SIGTERM);
            stopping_since = Some(Instant::now());
        }
        if !told_about_leftovers && !asked_to_stop {
            warn!(
                "COMMAND exited ({code}) but {} process(es) it started still run in {}; they stay \
                 proxied and ktproxy waits for them (Ctrl-C or SIGTERM stops them)",
                left.len(),
                cgroup.path().display()
            );
            told_about_leftovers = true;
        }
        if stopping_since.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            cgroup.signal_all(Signal::SIGKILL);
        }
    }
}

/// After COMMAND and what it left behind have exited: the last of the pty's
/// output relayed, the caller's terminal restored.
fn finish(run: Running) {
    if let Some(pty) = run.pty {
        pty.finish();
    }
}

/// COMMAND's exit status if it has exited. A COMMAND stopped on its own
/// terminal (Ctrl-Z) stops ktproxy too, as a job the caller's shell can
/// continue.
fn check_command(run: &mut Running) -> Result<Option<i32>> {
    let pid = Pid::from_raw(run.child.id() as i32);
    let flags = WaitPidFlag::WNOHANG | WaitPidFlag::WUNTRACED;
    match waitpid(pid, Some(flags)) {
        Ok(WaitStatus::Exited(_, code)) => Ok(Some(code)),
        Ok(WaitStatus::Signaled(_, sig, _)) => Ok(Some(128 + sig as i32)),
        Ok(WaitStatus::Stopped(..)) => {
            if let Some(pty) = &mut run.pty {
                pty.suspend(pid);
            }
            Ok(None)
        }
        Ok(_) => Ok(None),
        Err(e) => Err(Error::from(io::Error::from(e))).context("waiting for COMMAND"),
    }
}

/// sigtimedwait: the signal, and whether another process sent it with
/// kill(2) (as opposed to the terminal or the kernel). Raw libc: nix 0.30 has
/// sigwait, which neither times out nor says who sent the signal.
fn wait_signal(set: &SigSet, timeout: Duration) -> Result<Option<(Signal, bool)>> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: siginfo_t is plain data; the kernel fills it in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a sigset, a siginfo and a timespec.
    let r = unsafe { libc::sigtimedwait(set.as_ref(), &mut info, &ts) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR) => Ok(None),
            _ => Err(Error::from(e)).context("waiting for signals"),
        };
    }
    let sig = Signal::try_from(r).map_err(|_| Error::new(format!("unexpected signal {r}")))?;
    // SI_USER (kill), SI_QUEUE (sigqueue), SI_TKILL (tgkill) are <= 0.
    Ok(Some((sig, info.si_code <= 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_path_comes_from_login_defs_as_su_reads_it() {
        let defs = "# comment\nENV_SUPATH\tPATH=/sbin:/bin\nENV_PATH   /usr/bin:/bin\n";
        assert_eq!(login_path(defs, true), "/sbin:/bin");
        assert_eq!(login_path(defs, false), "/usr/bin:/bin");
        assert_eq!(login_path("", false), "/usr/local/bin:/usr/bin:/bin");
        assert_eq!(
            login_path("ENV_PATH\n", true),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        );
    }
}
