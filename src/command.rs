//! `ktproxy [OPTIONS] -- COMMAND [ARGS...]`: run one command, and everything
//! it forks, through the proxy.
//!
//! The child joins its cgroup between fork and exec, so not even its first
//! connect can escape. ktproxy then only supervises: it exits with COMMAND's
//! status, and leaves Ctrl-C to COMMAND (the terminal delivers it to both; a
//! signal sent to ktproxy alone with kill(1) is passed on).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Pid, User};

use crate::cgroup::CommandCgroup;
use crate::error::{io_text, Context, Error, Result};
use crate::nss;

/// Who COMMAND runs as with --user, resolved before fork: the child may only
/// make async-signal-safe calls.
pub struct Identity {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    home: std::path::PathBuf,
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
        home: user.dir,
    })
}

/// Starts COMMAND inside `cgroup`, as `user` if given, in the name-service
/// view `nss` if given.
pub fn spawn(
    argv: &[String],
    cgroup: &CommandCgroup,
    user: Option<&Identity>,
    nss: Option<&nss::View>,
) -> Result<Child> {
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
    let mut creds = None;
    let ktproxy_pid = nix::unistd::getpid().as_raw();
    let nss = nss.map(nss::View::mounts);
    if let Some(u) = user {
        cmd.env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
        creds = Some((u.uid, u.gid, u.groups.clone()));
    }
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (write, unshare, mount, setgroups, setgid,
    // setuid, prctl, getppid, pthread_sigmask) on data prepared before the
    // fork. They stay
    // raw libc so that this can be checked call by call against
    // signal-safety(7), with nothing in between that might allocate.
    unsafe {
        cmd.pre_exec(move || {
            // "0" means the writing process itself.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
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
        "started {prog} as pid {} in {}",
        child.id(),
        cgroup.path().display()
    );
    Ok(child)
}

/// Waits for COMMAND, then for whatever it left running in its cgroup (it
/// stays proxied until it exits). Returns the exit status to give: COMMAND's
/// own, or 128+signal if a signal killed it, as shells report it.
pub fn supervise(mut child: Child, cgroup: &CommandCgroup, signals: &SigSet) -> Result<i32> {
    let child_pid = child.id() as i32;
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
            } else if status.is_none() {
                // The terminal sends Ctrl-C to COMMAND too; pass on only what
                // was aimed at ktproxy alone.
                if from_elsewhere {
                    debug!("passing {sig} on to pid {child_pid}");
                    let _ = nix::sys::signal::kill(Pid::from_raw(child_pid), sig);
                    asked_to_stop = true;
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
            if let Some(st) = child.try_wait().context("waiting for COMMAND")? {
                status = Some(exit_code(st));
            }
        }
        let Some(code) = status else { continue };
        let left = cgroup.processes();
        if left.is_empty() {
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

fn exit_code(st: ExitStatus) -> i32 {
    match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
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
