//! A terminal of COMMAND's own, for `--user`: a pseudo-terminal whose
//! master ktproxy relays to and from the caller's terminal.
//!
//! Why not just a new session (setsid)? COMMAND would lose its controlling
//! terminal, so TIOCSTI would fail, but it would still hold descriptors of
//! the caller's terminal (its stdin, stdout, stderr): it could read what the
//! caller types after it, change the terminal's modes, and programs that
//! need a controlling terminal (password prompts reading /dev/tty, job
//! control in shells, full-screen programs) would stop working. With a pty
//! of its own, as `sudo` (use_pty) and `su --pty` do it, COMMAND never sees
//! the caller's terminal at all, and everything interactive works: the
//! caller's terminal is raw while COMMAND runs, so Ctrl-C and Ctrl-\ are
//! plain bytes that the pty's line discipline turns into SIGINT and SIGQUIT
//! for COMMAND's foreground process group, exactly as on a real terminal.
//!
//! Only the descriptors among 0, 1 and 2 that are terminals are replaced by
//! the pty: `ktproxy --user u -- cmd > file` still writes to the file.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{self, SetArg, Termios};
use nix::unistd::{Gid, Pid, Uid};

use crate::error::{Context, Result};

const STD_FDS: [RawFd; 3] = [0, 1, 2];

/// A pty for COMMAND, before it runs.
pub struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
    /// Which of fds 0, 1, 2 are terminals; COMMAND gets the slave there.
    on_tty: [bool; 3],
    /// The caller's terminal: where the pty's output goes, and (if stdin is
    /// a terminal) where its input comes from.
    outer: RawFd,
}

impl Pty {
    /// A pty if any of stdin, stdout and stderr is a terminal (None
    /// otherwise), with the caller's terminal's modes and window size, its
    /// slave owned by `owner` as a login terminal would be.
    pub fn open_if_interactive(owner: (Uid, Gid)) -> Result<Option<Pty>> {
        let on_tty = STD_FDS.map(|fd| nix::unistd::isatty(borrow(fd)).unwrap_or(false));
        // Output to the first of stdout and stderr on a terminal; stdin's
        // terminal only when it is the only one (opened read-write by the
        // shell, as terminals are).
        let Some(&outer) = [1, 2, 0].iter().find(|&&fd| on_tty[fd as usize]) else {
            return Ok(None);
        };
        let modes = termios::tcgetattr(borrow(outer)).context("reading the terminal's modes")?;
        let size = window_size(outer);
        let pty = nix::pty::openpty(size.as_ref(), Some(&modes)).context("opening a pty")?;
        for fd in [&pty.master, &pty.slave] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("setting up the pty")?;
        }
        // Programs such as mesg, write and ssh check who owns their
        // terminal; group tty and mode 0620, as login(1) leaves it.
        let tty_group = nix::unistd::Group::from_name("tty")
            .ok()
            .flatten()
            .map(|g| g.gid);
        nix::unistd::fchown(&pty.slave, Some(owner.0), tty_group.or(Some(owner.1)))
            .context("giving the pty to the user")?;
        nix::sys::stat::fchmod(&pty.slave, nix::sys::stat::Mode::from_bits_truncate(0o620))
            .context("giving the pty to the user")?;
        fcntl(&pty.master, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).context("setting up the pty")?;
        Ok(Some(Pty {
            master: pty.master,
            slave: pty.slave,
            on_tty,
            outer,
        }))
    }

    /// What the child needs between fork and exec: the slave, and which
    /// of fds 0-2 it replaces.
    pub fn for_child(&self) -> (RawFd, [bool; 3]) {
        (self.slave.as_raw_fd(), self.on_tty)
    }

    /// Once COMMAND runs: closes ktproxy's copy of the slave (so that the
    /// master reports the end when COMMAND's side is all closed), makes the
    /// caller's terminal raw if input is relayed, and starts relaying.
    pub fn start(self) -> Result<Relay> {
        drop(self.slave);
        let input = self.on_tty[0];
        // Without raw mode (a terminal that refuses it), keystrokes are
        // still relayed, line by line, and Ctrl-C still reaches COMMAND
        // through ktproxy.
        let raw = input
            .then(|| RawMode::enter(0))
            .transpose()
            .unwrap_or_else(|e| {
                warn!("cannot switch the terminal to raw mode: {e}");
                None
            });
        let master = Arc::new(self.master);
        let (done_tx, done) = mpsc::channel();
        let relayed = Arc::clone(&master);
        let outer = self.outer;
        thread::Builder::new()
            .name("ktproxy-pty".into())
            .spawn(move || {
                relay(&relayed, input, outer);
                let _ = done_tx.send(());
            })
            .context("starting the pty relay")?;
        Ok(Relay {
            master,
            outer,
            raw,
            done,
        })
    }
}

/// The running relay; the caller's terminal gets its modes back on drop.
pub struct Relay {
    master: Arc<OwnedFd>,
    outer: RawFd,
    raw: Option<RawMode>,
    done: mpsc::Receiver<()>,
}

impl Relay {
    /// SIGWINCH: the caller's terminal changed size; the kernel passes the
    /// new size on to COMMAND's foreground process group as a SIGWINCH.
    pub fn resize(&self) {
        if let Some(size) = window_size(self.outer) {
            // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
            unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        }
    }

    /// The process group in the foreground of COMMAND's terminal: where a
    /// terminal signal belongs.
    pub fn foreground(&self) -> Option<Pid> {
        nix::unistd::tcgetpgrp(self.master.as_fd()).ok()
    }

    /// COMMAND stopped (SIGSTOP): give the caller's terminal back and stop
    /// ktproxy too, so that the caller's shell regains control and shows a
    /// stopped job; when continued (fg), take the terminal again and
    /// continue COMMAND. (Ctrl-Z does not stop COMMAND itself: it leads a
    /// session of its own, whose process group the kernel deems orphaned
    /// and exempts from terminal stop signals, as with a login shell. Job
    /// control inside a shell run as COMMAND works.)
    pub fn suspend(&mut self, command: Pid) {
        let Some(raw) = &self.raw else { return };
        raw.leave();
        debug!("COMMAND stopped: stopping ktproxy too");
        // Its default action stops every thread until SIGCONT; an orphaned
        // process group (no shell to continue it) ignores it instead.
        let _ = kill(Pid::this(), Signal::SIGTSTP);
        if let Err(e) = raw.again() {
            debug!("cannot switch the terminal back to raw mode: {e}");
        }
        self.resize();
        let _ = nix::sys::signal::killpg(command, Signal::SIGCONT);
    }

    /// After COMMAND and everything it started have exited: waits briefly
    /// for the last output to be relayed, then restores the terminal.
    pub fn finish(self) {
        // The master reads EIO once every slave descriptor is closed, after
        // the output still queued; a descriptor passed outside the cgroup
        // could keep it open forever, hence the bound.
        let _ = self.done.recv_timeout(Duration::from_secs(1));
    }
}

/// The caller's terminal in raw mode: no echo, no line editing, no
/// signals, no output processing, as sudo (use_pty) and ssh set theirs.
struct RawMode {
    fd: RawFd,
    saved: Termios,
}

impl RawMode {
    fn enter(fd: RawFd) -> nix::Result<RawMode> {
        let saved = termios::tcgetattr(borrow(fd))?;
        let mode = RawMode { fd, saved };
        mode.again()?;
        Ok(mode)
    }

    fn again(&self) -> nix::Result<()> {
        let mut raw = self.saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(borrow(self.fd), SetArg::TCSADRAIN, &raw)
    }

    fn leave(&self) {
        let _ = termios::tcsetattr(borrow(self.fd), SetArg::TCSADRAIN, &self.saved);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.leave();
    }
}

/// One of ktproxy's standard descriptors, which stay open for the whole run.
fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    debug_assert!((0..=2).contains(&fd));
    // SAFETY: fds 0-2 are open for the life of the process: ktproxy never
    // closes them, and std reopens them on /dev/null at start-up if absent.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

fn window_size(fd: RawFd) -> Option<libc::winsize> {
    // SAFETY: winsize is plain data; all-zero is valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0).then_some(ws)
}

/// Copies the caller's keystrokes (stdin, if `input`) to the master and the
/// master's output to the caller's terminal (`output`) until the master
/// reports that every slave descriptor is closed. The master is
/// non-blocking, so a COMMAND that stops reading its input cannot stop its
/// output from being relayed.
fn relay(master: &OwnedFd, mut input: bool, output: RawFd) {
    let mut typed = [0u8; 4096];
    let (mut pending, mut sent) = (0usize, 0usize);
    let mut shown = [0u8; 16384];
    loop {
        let mut master_events = PollFlags::POLLIN;
        if sent < pending {
            master_events |= PollFlags::POLLOUT;
        }
        // Read more keystrokes only once the last ones are in the master.
        let reading = input && sent == pending;
        let mut fds = [
            PollFd::new(master.as_fd(), master_events),
            PollFd::new(borrow(0), PollFlags::POLLIN),
        ];
        let n = if reading { 2 } else { 1 };
        if crate::sys::poll(&mut fds[..n], PollTimeout::NONE).is_err() {
            return;
        }
        let ready = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        let (from_master, from_input) =
            (ready(0), if n == 2 { ready(1) } else { PollFlags::empty() });

        if from_master.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            match nix::unistd::read(master.as_fd(), &mut shown) {
                Ok(0) | Err(Errno::EIO) => return,
                Ok(k) => {
                    // If the caller's terminal went away, keep draining, so
                    // that COMMAND is not blocked writing.
                    let _ = write_all(output, &shown[..k]);
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(_) => return,
            }
        }
        if sent < pending && from_master.contains(PollFlags::POLLOUT) {
            match nix::unistd::write(master, &typed[sent..pending]) {
                Ok(k) => sent += k,
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(_) => (input, sent) = (false, pending),
            }
        }
        if !from_input.is_empty() {
            match nix::unistd::read(borrow(0), &mut typed) {
                Ok(k) if k > 0 => (pending, sent) = (k, 0),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                // End of input or a hung-up terminal: COMMAND keeps running
                // (a SIGHUP, if one comes, is passed on to it).
                _ => input = false,
            }
        }
    }
}

/// write(2) until done; waits for a non-blocking terminal to take more.
fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(borrow(fd), buf) {
            Ok(k) => buf = &buf[k..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let mut p = [PollFd::new(borrow(fd), PollFlags::POLLOUT)];
                crate::sys::poll(&mut p, PollTimeout::NONE)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
