//! The accept loop: idle threads parked on each listener, accepting for
//! themselves.
//!
//! A parked thread waits in epoll_wait(2), then accept4(2)s the
//! non-blocking listener. Not in a blocking accept4: Linux reserves the new
//! descriptor (get_unused_fd_flags) before accept4 sleeps, so every thread
//! blocked there pins one slot of the descriptor table, unseen in
//! /proc/PID/fd; with many idle threads, a process near its limit had no
//! descriptor left for the connections it accepted. epoll_wait reserves
//! nothing.
//!
//! All of a listener's threads wait on one epoll instance, whose waiters the
//! kernel wakes one at a time (exclusive waits, as blocking accept4's were):
//! no thundering herd, however many wait. The listener is registered
//! one-shot: the woken thread re-arms it right after its accept4, so the
//! next connection wakes the next waiter, and nobody is woken for a
//! connection already taken (level-triggered, every event would also wake
//! a second waiter for nothing). The thread that accepts serves the
//! connection start to end (one thread per connection, a straight-line loop
//! under strace), then takes the next waiting one, if any, before it parks
//! again: under load that costs no wait at all. A new thread is spawned only
//! when fewer than `PARK_MIN` are left parked, so a steady stream of
//! connections costs no thread creation.
//!
//! Every accept4 that returns a connection, or finds none waiting, proves
//! that ktproxy can accept: it renews the kernel's heartbeat. A timerfd in
//! the same epoll instance wakes one parked thread every `TICK` to try: a
//! ktproxy that cannot accept (stopped, out of descriptors, no thread
//! parked) stops proving it, and connects stop being redirected into it.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::bpf::Heartbeat;
use crate::conn::{self, Shared};
use crate::error::{io_text, Context, Result};
use crate::sys;

/// Keep at least this many threads parked on each listener.
const PARK_MIN: usize = 2;
/// A thread that finishes a connection while this many are parked exits.
const PARK_MAX: usize = 256;
/// How often a parked thread proves that ktproxy can accept; the kernel
/// stops redirecting after 1 s without a proof.
const TICK: Duration = Duration::from_millis(250);
/// At most one warning per this interval about failing to start threads.
const WARN_INTERVAL: Duration = Duration::from_secs(5);
/// Connection threads need little stack: the relay uses a few hundred bytes,
/// logging a few KiB. Only touched pages cost memory.
const STACK_SIZE: usize = 128 * 1024;

/// epoll's data for each source.
const LISTENER: u64 = 0;
const TICKER: u64 = 1;

/// The threads of one listener.
pub struct Acceptors {
    listener: TcpListener,
    local: SocketAddr,
    shared: Arc<Shared>,
    heartbeat: Heartbeat,
    /// The listener and the ticker: where parked threads wait.
    epoll: Epoll,
    ticker: TimerFd,
    /// Threads parked (or about to park), counted by whoever sends them
    /// there (the spawner, the thread itself) so that a burst does not start
    /// a crowd.
    parked: AtomicUsize,
    /// When starting a thread last failed and was reported.
    spawn_warned: Mutex<Option<Instant>>,
}

/// Starts the threads for `listener` and returns them, for the watchdog.
pub fn start(
    listener: TcpListener,
    shared: Arc<Shared>,
    heartbeat: Heartbeat,
) -> Result<Arc<Acceptors>> {
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    listener
        .set_nonblocking(true)
        .context("making the listener non-blocking")?;
    let epoll =
        Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("creating an epoll instance")?;
    epoll
        .add(&listener, listener_event())
        .context("watching the listener")?;
    let ticker = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )
    .context("creating the heartbeat timer")?;
    ticker
        .set(
            Expiration::Interval(TimeSpec::from_duration(TICK)),
            TimerSetTimeFlags::empty(),
        )
        .context("setting the heartbeat timer")?;
    epoll
        .add(&ticker, EpollEvent::new(EpollFlags::EPOLLIN, TICKER))
        .context("watching the heartbeat timer")?;
    let pool = Arc::new(Acceptors {
        listener,
        local,
        shared,
        heartbeat,
        epoll,
        ticker,
        parked: AtomicUsize::new(0),
        spawn_warned: Mutex::new(None),
    });
    for _ in 0..PARK_MIN {
        spawn(&pool).context("starting connection threads")?;
    }
    Ok(pool)
}

impl Acceptors {
    /// Brings the parked threads back up to `PARK_MIN`: the watchdog's
    /// retry when starting threads failed (pids.max, threads-max).
    pub fn top_up(self: &Arc<Self>) {
        while self.parked.load(Ordering::SeqCst) < PARK_MIN {
            if let Err(e) = spawn(self) {
                self.warn_spawn_failed(&e);
                return;
            }
        }
    }

    fn warn_spawn_failed(&self, e: &io::Error) {
        let mut last = self.spawn_warned.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
            warn!(
                "cannot start a connection thread: {}; connections to {} that find no free \
                 thread are reset until one can be started",
                io_text(e),
                self.local
            );
            *last = Some(Instant::now());
        }
    }

    /// A connection already waiting in the backlog, if any (errors are left
    /// to the parked threads, which pause on them).
    fn take_waiting(&self) -> Option<(TcpStream, SocketAddr)> {
        let accepted = sys::accept(&self.listener).ok()?;
        self.heartbeat.beat();
        Some(accepted)
    }

    /// Waits on the listener until a connection comes. The caller is
    /// counted in `parked`; on return it no longer is. `waiting_checked`:
    /// the caller's accept4 just found none waiting.
    fn park(&self, mut waiting_checked: bool) -> (TcpStream, SocketAddr) {
        let mut last_warning: Option<Instant> = None;
        let mut rearm = false;
        loop {
            if waiting_checked {
                // The caller just found nothing waiting: wait first.
                waiting_checked = false;
                rearm = self.wait();
                continue;
            }
            let accepted = sys::accept(&self.listener);
            if rearm {
                // One-shot: the next waiter is woken only once the listener
                // is armed again, after this thread took its connection.
                let _ = self.epoll.modify(&self.listener, &mut listener_event());
                rearm = false;
            }
            match accepted {
                Ok(accepted) => {
                    self.heartbeat.beat();
                    self.parked.fetch_sub(1, Ordering::SeqCst);
                    return accepted;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing waiting (or another thread took it): healthy.
                    self.heartbeat.beat();
                    rearm = self.wait();
                }
                Err(e) => {
                    // No heartbeat: ktproxy cannot accept right now.
                    if sys::out_of_descriptors(&e) {
                        self.shared.pipes.release_all();
                    }
                    if let Some(pause) = accept_error_pause(&e) {
                        // Out of descriptors or memory: the connection stays
                        // in the backlog, so retrying at once would spin.
                        if last_warning.is_none_or(|t| t.elapsed() > WARN_INTERVAL) {
                            warn!("accept failed: {}; retrying", io_text(&e));
                            last_warning = Some(Instant::now());
                        }
                        std::thread::sleep(pause);
                    } else {
                        debug!("accept: {}", io_text(&e));
                    }
                }
            }
        }
    }

    /// Sleeps until the listener is readable (true: it is disarmed) or the
    /// ticker fires.
    fn wait(&self) -> bool {
        let mut events = [EpollEvent::empty()];
        match self.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(1) if events[0].data() == TICKER => {
                // Level-triggered: consume the expiry, or every waiter would
                // wake. EAGAIN: another thread did.
                let _ = self.ticker.wait();
                false
            }
            Ok(1) => true,
            Ok(_) | Err(Errno::EINTR) => false,
            Err(e) => {
                debug!("epoll_wait on {}: {}", self.local, e.desc());
                std::thread::sleep(Duration::from_millis(10));
                false
            }
        }
    }
}

/// Starts a connection thread with pthread_create directly. std::thread gives
/// every thread a signal alternate stack (two more memory mappings), a
/// heap-allocated handle and name, and frees a boxed closure in the new
/// thread, which makes glibc set up a per-thread malloc cache. At thousands
/// of threads that is ~1 KiB of memory per connection, and twice as many
/// mappings against vm.max_map_count. This thread allocates nothing. Raw
/// libc: nix has no pthread_create. The new thread is counted as parked.
fn spawn(pool: &Arc<Acceptors>) -> io::Result<()> {
    extern "C" fn start(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the Arc leaked by spawn() for this thread.
        let pool = unsafe { Arc::from_raw(arg as *const Acceptors) };
        // For `top -H` and `ps -L`; from inside the thread it is one prctl
        // (pthread_setname_np on another thread opens a /proc file).
        let _ = nix::sys::prctl::set_name(c"ktproxy-conn");
        // Unwinding out of an extern "C" function would abort the process.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| thread_main(&pool))).is_err() {
            log::error!("a connection thread panicked; its connection was dropped");
        }
        std::ptr::null_mut()
    }

    pool.parked.fetch_add(1, Ordering::SeqCst);
    let arg = Arc::into_raw(Arc::clone(pool)) as *mut libc::c_void;
    // SAFETY: attr is initialised before use and destroyed after; on failure
    // the leaked Arc is reclaimed, on success the thread owns it.
    let r = unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, STACK_SIZE);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut tid: libc::pthread_t = 0;
        let r = libc::pthread_create(&mut tid, &attr, start, arg);
        libc::pthread_attr_destroy(&mut attr);
        if r != 0 {
            drop(Arc::from_raw(arg as *const Acceptors));
        }
        r
    };
    if r != 0 {
        pool.parked.fetch_sub(1, Ordering::SeqCst);
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A connection thread: parked (counted by whoever started it), serving,
/// then parked again or gone.
fn thread_main(pool: &Arc<Acceptors>) {
    let mut waiting_checked = false;
    loop {
        let (stream, peer) = pool.park(waiting_checked);
        if pool.parked.load(Ordering::SeqCst) < PARK_MIN {
            if let Err(e) = spawn(pool) {
                pool.warn_spawn_failed(&e);
                if pool.parked.load(Ordering::SeqCst) == 0 {
                    // Serving it would leave nobody on the listener, and
                    // every later connection hanging in the backlog: refuse
                    // this one promptly, keep accepting.
                    sys::set_linger_zero(&stream);
                    drop(stream);
                    pool.parked.fetch_add(1, Ordering::SeqCst);
                    waiting_checked = false;
                    continue;
                }
            }
        }
        conn::serve(&pool.shared, stream, peer, pool.local);
        // Under load the next connection is already waiting: take it
        // without a wait, and without counting as parked.
        while let Some((stream, peer)) = pool.take_waiting() {
            conn::serve(&pool.shared, stream, peer, pool.local);
        }
        if pool.parked.fetch_add(1, Ordering::SeqCst) >= PARK_MAX {
            pool.parked.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        waiting_checked = true;
    }
}

fn listener_event() -> EpollEvent {
    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT, LISTENER)
}

/// None for errors that concern one connection only (it was aborted before
/// we took it): just accept the next one.
fn accept_error_pause(e: &io::Error) -> Option<Duration> {
    match e.raw_os_error() {
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM | libc::EINTR) => None,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            Some(Duration::from_millis(100))
        }
        _ => Some(Duration::from_millis(10)),
    }
}
