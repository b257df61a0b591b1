//! A pool of pipes for splice(2). A connection borrows a pipe only while bytes
//! are in flight and returns it once it is empty, so idle connections hold no
//! pipes (two file descriptors and a pipe buffer each).
//!
//! `KTPROXY_RELAY_COPY=1` in the environment, read once at start-up, makes
//! the pool hand out no pipes at all, so that every connection takes the
//! relay's copy path (what it does when out of descriptors): for measuring
//! that path, not for normal use (relay.rs has the numbers).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use crate::sys;

/// Bigger than the default 64 KiB: bulk transfers then need fewer splice
/// calls and wake-ups (measured with iperf3 on loopback: ~0.58 of direct
/// throughput with 64 KiB pipes, ~0.70-0.77 with 256 KiB; 512 KiB and 1 MiB
/// were no better). A pipe holds pages only while bytes are in it.
const PIPE_SIZE: libc::c_int = 256 * 1024;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// How many bytes one splice into this pipe can take.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn read_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    pub fn write_fd(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }
}

pub struct PipePool {
    free: Mutex<Vec<Pipe>>,
    /// Pipes kept for reuse beyond this are closed instead.
    keep: usize,
    /// KTPROXY_RELAY_COPY: hand out no pipes.
    copy_only: bool,
}

/// The environment variable that switches splice off (see the module).
pub const COPY_ONLY_ENV: &str = "KTPROXY_RELAY_COPY";

impl PipePool {
    pub fn new(keep: usize) -> PipePool {
        PipePool {
            // Allocated once here: connection threads never touch the heap.
            free: Mutex::new(Vec::with_capacity(keep)),
            keep,
            copy_only: false,
        }
    }

    /// A pool that hands out no pipes: every take() fails (with no errno).
    pub fn copy_only(mut self, yes: bool) -> PipePool {
        self.copy_only = yes;
        self
    }

    /// A pipe, or the reason there is none: EMFILE/ENFILE when the process
    /// or the system is out of descriptors; no errno when switched off.
    pub fn take(&self) -> io::Result<Pipe> {
        if self.copy_only {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if let Some(p) = self.free.lock().ok().and_then(|mut f| f.pop()) {
            return Ok(p);
        }
        let (read, write) = sys::pipe()?;
        // Beyond fs.pipe-max-size an unprivileged process is refused; then
        // the default size does.
        let capacity = sys::set_pipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Only for empty pipes: leftover bytes would leak into another
    /// connection. Callers drop a pipe that may hold data instead.
    pub fn give_back(&self, pipe: Pipe) {
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(pipe);
            }
        }
    }

    /// Closes every pooled pipe: when the process runs out of descriptors,
    /// the two each of them holds are better spent on connections.
    pub fn release_all(&self) {
        if let Ok(mut f) = self.free.lock() {
            f.clear();
        }
    }

    #[cfg(test)]
    pub fn pooled(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn release_all_closes_the_pooled_pipes() {
        let pool = PipePool::new(4);
        let p = pool.take().unwrap();
        let fd = p.read_fd().as_raw_fd();
        pool.give_back(p);
        pool.release_all();
        assert_eq!(pool.pooled(), 0);
        // SAFETY: fcntl on a descriptor number only queries it. Raw libc:
        // nix wants a BorrowedFd, which a closed number must not be.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags, -1, "pipe still open");
    }

    #[test]
    fn a_copy_only_pool_hands_out_no_pipes_and_says_no_errno() {
        let e = PipePool::new(4).copy_only(true).take().err().unwrap();
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn pipes_are_reused_up_to_the_limit() {
        let pool = PipePool::new(1);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let a_fd = a.read_fd().as_raw_fd();
        pool.give_back(a);
        pool.give_back(b);
        assert_eq!(pool.pooled(), 1);
        assert_eq!(pool.take().unwrap().read_fd().as_raw_fd(), a_fd);
    }
}
