//! The watchdog: a thread of its own that wakes every 250 ms and keeps
//! ktproxy doing what it was asked to when something around it changes:
//! - connection threads could not be started (pids.max, threads-max): try
//!   again, so that some thread always waits on each listener;
//! - the `-c` cgroup was removed and created again (what `systemctl
//!   restart` does to a service's cgroup): the kernel dropped the links with
//!   the old cgroup, so attach to the new one;
//! - a local upstream proxy (re)started: exempt its processes, whose own
//!   connections would otherwise loop back into ktproxy.
//!
//! A thread rather than the main thread's signal wait: command mode's
//! supervision loop and the shutdown sequence stay as they are, and the
//! watchdog runs whatever the main thread is doing.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::warn;

use crate::bpf::Redirect;
use crate::error::{io_text, Error, Result};
use crate::instances;
use crate::loops::UpstreamOwners;
use crate::server::Acceptors;

const TICK: Duration = Duration::from_millis(250);

/// What the watchdog looks after.
pub struct Duties {
    pub redirect: Redirect,
    pub acceptors: Vec<Arc<Acceptors>>,
    /// `-c`: follow the cgroup if it is removed and created again.
    pub follow_cgroup: Option<Scope>,
    /// A local upstream proxy whose processes must stay exempt.
    pub upstream: Option<UpstreamOwners>,
}

/// Where this ktproxy stands in the cgroup hierarchy, for the overlap check
/// before re-attaching.
pub struct Scope {
    pub root: PathBuf,
    pub home: PathBuf,
}

pub struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<Result<Redirect>>,
}

impl Watchdog {
    pub fn start(duties: Duties) -> Result<Watchdog> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ktproxy-watch".into())
            .spawn(move || run(duties, &flag))
            .map_err(|e| Error::new(format!("starting the watchdog thread: {}", io_text(&e))))?;
        Ok(Watchdog { stop, thread })
    }

    /// Stops the watchdog and hands back the programs to detach; an error if
    /// it gave up (then it has already asked the process to stop).
    pub fn stop(self) -> Result<Redirect> {
        {
            let (lock, cv) = &*self.stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        self.thread
            .join()
            .unwrap_or_else(|_| Err(Error::new("the watchdog thread panicked")))
    }
}

fn run(mut d: Duties, stop: &(Mutex<bool>, Condvar)) -> Result<Redirect> {
    let mut cgroup_gone_warned = false;
    loop {
        {
            let (lock, cv) = stop;
            let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (stopped, _) = cv
                .wait_timeout_while(stopped, TICK, |s| !*s)
                .unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return Ok(d.redirect);
            }
        }
        for a in &d.acceptors {
            a.top_up();
        }
        if let Some(scope) = &d.follow_cgroup {
            if let Err(e) = follow_cgroup(&mut d.redirect, scope, &mut cgroup_gone_warned) {
                // Stop the whole process: the main thread waits for signals.
                log::error!("{e}; exiting");
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::SIGTERM);
                return Err(e);
            }
        }
        if let Some(up) = &mut d.upstream {
            up.refresh(&d.redirect);
        }
    }
}

/// Re-attaches when the intercepted cgroup's directory holds another cgroup
/// than the one attached to. Safe to do because it is the path the user
/// named (a restarted service's cgroup is what they meant), the old links go
/// before the new ones come (never two cgroups at once), the attach order is
/// the start-up one (connect last), and the new cgroup is checked for
/// another ktproxy first. Anything that fails on the way is an error: ktproxy
/// exits rather than run without intercepting what it was asked to.
fn follow_cgroup(redirect: &mut Redirect, scope: &Scope, gone_warned: &mut bool) -> Result<()> {
    let (path, id) = redirect.intercepted();
    let path = path.to_path_buf();
    let now = match fs::metadata(&path) {
        Ok(m) => m.ino(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !*gone_warned {
                warn!(
                    "cgroup {} was removed: its processes are gone, and ktproxy intercepts again \
                     as soon as it is created again",
                    path.display()
                );
                *gone_warned = true;
            }
            return Ok(());
        }
        Err(e) => {
            log::debug!("cgroup {}: {}", path.display(), io_text(&e));
            return Ok(());
        }
    };
    if now == id {
        return Ok(());
    }
    let what = format!(
        "cgroup {} was removed and created again (as `systemctl restart` does)",
        path.display()
    );
    instances::refuse_overlap(&scope.root, Some(&path), &scope.home)
        .map_err(|e| Error::new(format!("{what}, and cannot be intercepted again: {e}")))?;
    redirect
        .reattach(&path)
        .map_err(|e| Error::new(format!("{what}, and re-attaching failed: {e}")))?;
    *gone_warned = false;
    warn!("{what}: re-attached to the new cgroup");
    Ok(())
}
