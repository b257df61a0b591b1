//! The accept loop: a pool of parked threads that accept for themselves.
//!
//! Each thread blocks in accept(2); the kernel wakes exactly one per incoming
//! connection. The thread that got it serves it start to end (one thread per
//! connection, a straight-line loop under strace) and then goes back to
//! accept. A new thread is spawned only when too few are left waiting, so a
//! steady stream of connections costs no thread creation at all.

use std::io;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};

use crate::conn::{self, Shared};
use crate::error::{io_text, Context, Result};
use crate::sys;

/// Keep at least this many threads waiting in accept per listener.
const MIN_IDLE: usize = 2;
/// A thread that finishes a connection while this many already wait retires.
const MAX_IDLE: usize = 256;
/// Connection threads need little stack: the relay uses a few hundred bytes,
/// logging a few KiB. Only touched pages cost memory.
const STACK_SIZE: usize = 128 * 1024;

struct Acceptors {
    listener: TcpListener,
    local: std::net::SocketAddr,
    shared: Arc<Shared>,
    idle: AtomicUsize,
}

pub fn start(listener: TcpListener, shared: Arc<Shared>) -> Result<()> {
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    let pool = Arc::new(Acceptors {
        listener,
        local,
        shared,
        idle: AtomicUsize::new(0),
    });
    for _ in 0..MIN_IDLE {
        spawn(&pool).context("starting connection threads")?;
    }
    Ok(())
}

/// Starts a connection thread with pthread_create directly. std::thread gives
/// every thread a signal alternate stack (two more memory mappings), a
/// heap-allocated handle and name, and frees a boxed closure in the new
/// thread, which makes glibc set up a per-thread malloc cache. At thousands
/// of threads that is ~1 KiB of memory per connection, and twice as many
/// mappings against vm.max_map_count. This thread allocates nothing. Raw
/// libc: nix has no pthread_create.
fn spawn(pool: &Arc<Acceptors>) -> io::Result<()> {
    extern "C" fn start(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the Arc leaked by spawn() for this thread.
        let pool = unsafe { Arc::from_raw(arg as *const Acceptors) };
        // For `top -H` and `ps -L`; from inside the thread it is one prctl
        // (pthread_setname_np on another thread opens a /proc file).
        let _ = nix::sys::prctl::set_name(c"ktproxy-conn");
        // Unwinding out of an extern "C" function would abort the process.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| accept_loop(&pool))).is_err() {
            log::error!("a connection thread panicked; its connection was dropped");
        }
        std::ptr::null_mut()
    }

    // Counted as idle before it starts, so a burst does not spawn a crowd.
    pool.idle.fetch_add(1, Ordering::SeqCst);
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
        pool.idle.fetch_sub(1, Ordering::SeqCst);
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

fn accept_loop(pool: &Arc<Acceptors>) {
    let mut last_warning: Option<Instant> = None;
    loop {
        // `idle` already counts this thread.
        let accepted = sys::accept(&pool.listener);
        let idle_left = pool.idle.fetch_sub(1, Ordering::SeqCst) - 1;
        match accepted {
            Ok((stream, peer)) => {
                if idle_left < MIN_IDLE {
                    if let Err(e) = spawn(pool) {
                        warn!("cannot start another connection thread: {}", io_text(&e));
                    }
                }
                conn::serve(&pool.shared, stream, peer, pool.local);
                if pool.idle.load(Ordering::SeqCst) >= MAX_IDLE {
                    return;
                }
            }
            Err(e) => {
                if sys::out_of_descriptors(&e) {
                    pool.shared.pipes.release_all();
                }
                if let Some(pause) = accept_error_pause(&e) {
                    // Out of descriptors or memory: the connection stays in
                    // the backlog, so retrying at once would spin.
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        warn!("accept failed: {}; retrying", io_text(&e));
                        last_warning = Some(Instant::now());
                    }
                    std::thread::sleep(pause);
                } else {
                    debug!("accept: {}", io_text(&e));
                }
            }
        }
        pool.idle.fetch_add(1, Ordering::SeqCst);
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
