//! The acceptors' proof of life, shared with connect4/connect6 through a
//! mapped BPF array.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Context, Error, Result};

/// ktproxy's proof that it can accept, read by connect4/connect6: the
/// CLOCK_MONOTONIC time of the last proof in the kernel's `heartbeat` array,
/// mapped into our memory. The mapping is never unmapped, so acceptors can
/// keep beating while the programs are being detached at exit; it keeps
/// the map alive on its own.
#[derive(Clone, Copy)]
pub struct Heartbeat(&'static AtomicU64);

impl Heartbeat {
    pub(super) fn map(map: &impl AsFd) -> Result<Heartbeat> {
        // SAFETY: a fresh shared mapping of the BPF_F_MMAPABLE array's one
        // page (value 0 at offset 0); the kernel checks the fd and the size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::from(io::Error::last_os_error())).context("mapping the heartbeat");
        }
        // SAFETY: the mapping is page-aligned, at least 8 bytes, writable,
        // and never unmapped: a valid, properly aligned u64 for 'static.
        // The kernel only reads it.
        Ok(Heartbeat(unsafe { AtomicU64::from_ptr(p.cast::<u64>()) }))
    }

    /// Now alive.
    pub fn beat(&self) {
        self.0.store(monotonic_ns(), Ordering::Relaxed);
    }
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns(), in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}
