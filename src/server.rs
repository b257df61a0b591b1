//! The accept loop: a few threads parked on each listener, accepting for
//! themselves, and a bench of idle ones.
//!
//! A parked thread waits in poll(2) on the non-blocking listener, then
//! accept4(2)s. Not in a blocking accept4: Linux reserves the new descriptor
//! (get_unused_fd_flags) before accept4 sleeps, so every thread blocked
//! there pins one slot of the descriptor table, unseen in /proc/PID/fd; with
//! many idle threads, a process near its limit had no descriptor left for
//! the connections it accepted. poll reserves nothing.
//!
//! poll wakes every thread waiting on the listener, so at most `PARK_MAX`
//! wait there (a small herd); the others wait on a condition variable, off
//! the listener. The thread that accepts serves the connection start to end
//! (one thread per connection, a straight-line loop under strace), then
//! tries accept4 once more before it parks again: under load that succeeds
//! at no cost. Only when fewer than `PARK_MIN` are left parked is a benched
//! thread woken, or a new one started: a steady stream of connections costs
//! no thread creation.
//!
//! Every accept4 that returns a connection, or finds none waiting, proves
//! that ktproxy can accept: it renews the kernel's heartbeat, at least every
//! `POLL_INTERVAL` while idle. A ktproxy that cannot accept (stopped, out of
//! descriptors, out of threads) stops proving it, and connects stop being
//! redirected into it.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::bpf::Heartbeat;
use crate::conn::{self, Shared};
use crate::error::{io_text, Context, Result};
use crate::sys;

/// Keep at least this many threads parked on each listener.
const PARK_MIN: usize = 1;
/// At most this many: each incoming connection wakes all of them.
const PARK_MAX: usize = 2;
/// Idle threads kept on the bench; a thread that finishes a connection
/// while the bench is full exits.
const BENCH_MAX: usize = 256;
/// A parked thread looks at the listener at least this often: the
/// heartbeat's period (the kernel stops redirecting after 1 s without one).
const POLL_INTERVAL: u16 = 250;
/// At most one warning per this interval about failing to start threads.
const WARN_INTERVAL: Duration = Duration::from_secs(5);
/// Connection threads need little stack: the relay uses a few hundred bytes,
/// logging a few KiB. Only touched pages cost memory.
const STACK_SIZE: usize = 128 * 1024;

/// The threads of one listener.
pub struct Acceptors {
    listener: TcpListener,
    local: SocketAddr,
    shared: Arc<Shared>,
    heartbeat: Heartbeat,
    /// Threads on the listener, counted by whoever sends them there (the
    /// spawner, the waker) so that a burst does not call a crowd.
    parked: AtomicUsize,
    bench: Mutex<Bench>,
    called: Condvar,
    /// When starting a thread last failed and was reported.
    spawn_warned: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct Bench {
    /// Threads waiting on `called`.
    idle: usize,
    /// Of those, how many were called back to the listener.
    calls: usize,
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
    let pool = Arc::new(Acceptors {
        listener,
        local,
        shared,
        heartbeat,
        parked: AtomicUsize::new(0),
        bench: Mutex::new(Bench::default()),
        called: Condvar::new(),
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
            if let Err(e) = self.call_one() {
                self.warn_spawn_failed(&e);
                return;
            }
        }
    }

    /// Sends one more thread to the listener: a benched one, or a new one.
    fn call_one(self: &Arc<Self>) -> io::Result<()> {
        {
            let mut b = self.lock_bench();
            if b.idle > b.calls {
                b.calls += 1;
                self.parked.fetch_add(1, Ordering::SeqCst);
                self.called.notify_one();
                return Ok(());
            }
        }
        spawn(self)
    }

    fn lock_bench(&self) -> MutexGuard<'_, Bench> {
        // Nothing panics while holding it; a poisoned count is still a count.
        self.bench.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits off the listener until called back (true) or, with the bench
    /// full, returns false at once: the thread exits.
    fn bench(&self) -> bool {
        let mut b = self.lock_bench();
        if b.idle >= BENCH_MAX {
            return false;
        }
        b.idle += 1;
        while b.calls == 0 {
            b = self.called.wait(b).unwrap_or_else(|e| e.into_inner());
        }
        b.calls -= 1;
        b.idle -= 1;
        true
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

    /// Waits on the listener until a connection comes. The caller is
    /// counted in `parked`; on return it no longer is.
    fn park(&self) -> (TcpStream, SocketAddr) {
        let mut last_warning: Option<Instant> = None;
        loop {
            match sys::accept(&self.listener) {
                Ok(accepted) => {
                    self.heartbeat.beat();
                    self.parked.fetch_sub(1, Ordering::SeqCst);
                    return accepted;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing waiting (or another thread took it): healthy.
                    self.heartbeat.beat();
                    let mut pfd = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
                    if let Err(e) = sys::poll(&mut pfd, PollTimeout::from(POLL_INTERVAL)) {
                        debug!("poll on {}: {}", self.local, io_text(&e));
                        std::thread::sleep(Duration::from_millis(10));
                    }
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

/// A connection thread: parked (counted by whoever started or called it),
/// serving, then parked again, benched, or gone.
fn thread_main(pool: &Arc<Acceptors>) {
    loop {
        let (stream, peer) = pool.park();
        if pool.parked.load(Ordering::SeqCst) < PARK_MIN {
            if let Err(e) = pool.call_one() {
                pool.warn_spawn_failed(&e);
                if pool.parked.load(Ordering::SeqCst) == 0 {
                    // Serving it would leave nobody on the listener, and
                    // every later connection hanging in the backlog: refuse
                    // this one promptly, keep accepting.
                    sys::set_linger_zero(&stream);
                    drop(stream);
                    pool.parked.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
            }
        }
        conn::serve(&pool.shared, stream, peer, pool.local);
        if pool.parked.fetch_add(1, Ordering::SeqCst) >= PARK_MAX {
            pool.parked.fetch_sub(1, Ordering::SeqCst);
            if !pool.bench() {
                return;
            }
            // Called back: `parked` already counts this thread.
        }
    }
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
