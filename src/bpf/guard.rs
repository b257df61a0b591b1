//! The guard of command mode with an upstream: the one program attached
//! the legacy way, so that it outlives a killed ktproxy.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use libbpf_rs::libbpf_sys;
use libbpf_rs::ProgramMut;

use super::open_dir;
use super::skel::KtproxySkel;
use crate::error::{Context, Error, Result};

/// ktproxy_guard4/6 on COMMAND's cgroup (fail-closed mode): the one
/// deliberate exception to "bpf_link only". The issue this answers: after
/// `kill -9`, COMMAND's leftovers (a child that ignores SIGTERM, a
/// daemonised grandchild) must get errors, never direct connections, but
/// every link dies with ktproxy. A legacy BPF_PROG_ATTACH belongs to the
/// cgroup instead: it stays after ktproxy's death and refuses (EPERM) every
/// connect the rules want proxied, and the kernel drops it with the cgroup
/// (cgroup_bpf_release), so it cannot outlive COMMAND's processes' cgroup.
/// It is attached only to that cgroup, which ktproxy created itself, with
/// BPF_F_ALLOW_MULTI (next to connect4/6's links, after them), and detached
/// on every normal exit.
pub(super) struct Guard {
    cgroup: File,
}

impl Guard {
    pub(super) fn attach(skel: &KtproxySkel<'static>, cgroup: &Path) -> Result<Guard> {
        let guard = Guard {
            cgroup: open_dir(cgroup)?,
        };
        for (prog, ty) in guard.programs(skel) {
            // SAFETY: plain syscall wrapper on two valid descriptors.
            let r = unsafe {
                libbpf_sys::bpf_prog_attach(
                    prog.as_fd().as_raw_fd(),
                    guard.cgroup.as_raw_fd(),
                    ty,
                    libbpf_sys::BPF_F_ALLOW_MULTI,
                )
            };
            if r != 0 {
                let e = io::Error::from_raw_os_error(-r);
                guard.detach(skel);
                return Err(Error::from(e)).with_context(|| {
                    format!(
                        "attaching {} to {}",
                        prog.name().to_string_lossy(),
                        cgroup.display()
                    )
                });
            }
        }
        Ok(guard)
    }

    fn programs<'a>(
        &self,
        skel: &'a KtproxySkel<'static>,
    ) -> [(&'a ProgramMut<'static>, libbpf_sys::bpf_attach_type); 4] {
        [
            (
                &skel.progs.ktproxy_guard4,
                libbpf_sys::BPF_CGROUP_INET4_CONNECT,
            ),
            (
                &skel.progs.ktproxy_guard6,
                libbpf_sys::BPF_CGROUP_INET6_CONNECT,
            ),
            (
                &skel.progs.ktproxy_guard_sendmsg4,
                libbpf_sys::BPF_CGROUP_UDP4_SENDMSG,
            ),
            (
                &skel.progs.ktproxy_guard_sendmsg6,
                libbpf_sys::BPF_CGROUP_UDP6_SENDMSG,
            ),
        ]
    }

    pub(super) fn detach(&self, skel: &KtproxySkel<'static>) {
        for (prog, ty) in self.programs(skel) {
            // SAFETY: plain syscall wrapper on two valid descriptors; ENOENT
            // (never attached) is fine.
            unsafe {
                libbpf_sys::bpf_prog_detach2(prog.as_fd().as_raw_fd(), self.cgroup.as_raw_fd(), ty)
            };
            log::debug!("detached {}", prog.name().to_string_lossy());
        }
    }
}
