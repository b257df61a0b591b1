//! Checks and settings done before ktproxy touches the kernel's BPF or cgroup
//! state, so that a missing privilege is reported in words, not as EPERM from
//! somewhere deep inside libbpf.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::error::{Context, Error, Result};
use crate::sys;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The oldest kernel with everything ktproxy uses: bpf_link for cgroups
/// (5.7), socket storage reachable from sockops through skops->sk (5.10),
/// SO_NETNS_COOKIE to tell our network namespace from others (5.14).
pub const MIN_KERNEL: (u32, u32) = (5, 14);

pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let caps = effective_caps(&status)
        .ok_or_else(|| Error::new("cannot read CapEff from /proc/self/status"))?;
    let has = |c: u32| caps >> c & 1 == 1;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::new(format!(
        "ktproxy needs root: loading and attaching its cgroup eBPF programs requires {} \
         (run it with sudo)",
        missing.join(" and ")
    )))
}

fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Kernel support that ktproxy cannot do without and that can be probed
/// before anything is loaded; the programs themselves are judged by the
/// verifier at load time (bpf::load_error quotes it). Probing, not comparing
/// version numbers: distribution kernels backport features.
///
/// Measured under qemu (scripts/vmtest.sh): Debian 11's 5.10 loads and
/// attaches all six programs, and lacks only SO_NETNS_COOKIE.
pub fn check_kernel() -> Result<()> {
    // Any socket answers SOL_SOCKET options; an unbound AF_UNIX one takes no
    // address or port and works in any network namespace.
    let probe = UnixDatagram::unbound().context("creating a socket to probe the kernel")?;
    match sys::netns_cookie(probe.as_raw_fd()) {
        Ok(_) => Ok(()),
        // Without our own namespace's cookie the connect programs cannot
        // tell this namespace's processes from a container's, and redirecting
        // the latter to our loopback address would black-hole them.
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Err(missing_feature(
            &kernel_version().1,
            "SO_NETNS_COOKIE",
            (5, 14),
            "to tell its own network namespace from other ones",
        )),
        Err(e) => Err(Error::from(e)).context("reading SO_NETNS_COOKIE"),
    }
}

/// One line: what is missing, which kernel has it, and what to do.
fn missing_feature(release: &str, feature: &str, since: (u32, u32), why: &str) -> Error {
    let (maj, min) = since;
    Error::new(format!(
        "kernel {release} lacks {feature}, which ktproxy needs {why}: run ktproxy on \
         Linux >= {maj}.{min} (Debian 12, Ubuntu 22.04, RHEL 9 and later)"
    ))
}

/// (major, minor) of the running kernel, and its full release string.
pub fn kernel_version() -> (Option<(u32, u32)>, String) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_string());
    (parse_release(&release), release)
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A thread per connection holds two sockets; let ktproxy use every file
/// descriptor it may. Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// How many connections this machine lets ktproxy hold at once, and which
/// limit decides it. Each connection costs two descriptors, one thread, and
/// two memory mappings (the thread's stack and its guard page).
pub fn connection_capacity(fd_limit: u64) -> (u64, &'static str) {
    let sysctl = |path: &str| -> Option<u64> { fs::read_to_string(path).ok()?.trim().parse().ok() };
    let mut limits = vec![(
        fd_limit.saturating_sub(64) / 2,
        "the open-file limit (RLIMIT_NOFILE)",
    )];
    if let Some(n) = sysctl("/proc/sys/vm/max_map_count") {
        limits.push((n.saturating_sub(1000) / 2, "vm.max_map_count"));
    }
    if let Some(n) = sysctl("/proc/sys/kernel/pid_max") {
        limits.push((n.saturating_sub(1000), "kernel.pid_max"));
    }
    if let Some(n) = sysctl("/proc/sys/kernel/threads-max") {
        limits.push((n.saturating_sub(1000), "kernel.threads-max"));
    }
    limits
        .into_iter()
        .min_by_key(|(n, _)| *n)
        .unwrap_or((0, "unknown"))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (64 KiB by default);
/// later ones use memory cgroups and ignore it. Raising it is harmless.
pub fn raise_memlock_limit() {
    // Failure only matters on old kernels, where the BPF load error that
    // follows says so.
    let _ = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_capabilities() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }

    #[test]
    fn this_kernel_has_what_ktproxy_probes_for() {
        // The machines that build and test ktproxy run Linux >= 5.14; an
        // older one is reported by check_kernel itself, which fails here.
        check_kernel().unwrap();
    }

    #[test]
    fn a_missing_kernel_feature_is_one_line_with_the_remedy() {
        let e =
            missing_feature("5.10.0-32-amd64", "SO_NETNS_COOKIE", (5, 14), "to tell").to_string();
        assert_eq!(
            e,
            "kernel 5.10.0-32-amd64 lacks SO_NETNS_COOKIE, which ktproxy needs to tell: run \
             ktproxy on Linux >= 5.14 (Debian 12, Ubuntu 22.04, RHEL 9 and later)"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v595"), Some((6, 18)));
        assert_eq!(parse_release("5.14.0-362.el9.x86_64"), Some((5, 14)));
        assert_eq!(parse_release("garbage"), None);
    }
}
