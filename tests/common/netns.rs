//! Network namespaces the tests create: `ktproxy-t-<pid>-<n>`, loopback up,
//! deleted on drop.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::process::{describe, output_within, run_within, stdout, unique};

/// A network namespace `ktproxy-t-<pid>-<n>` with its loopback up; deleted
/// on drop (after the processes the test started in it, which drop first).
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(remove_stale_netns);
        let name = format!("ktproxy-t-{}-{}", std::process::id(), unique());
        let ip = |args: &[&str]| {
            let o = run_within(Command::new("ip").args(args), Duration::from_secs(10));
            assert!(o.status.success(), "ip {args:?}: {}", describe(&o));
        };
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A namespace with `lo` up and IPv6 disabled (no ::1 at all).
    pub fn without_ipv6() -> NetNs {
        let ns = NetNs::new();
        // Written under /proc/sys rather than with sysctl(8), which is in
        // procps and missing from minimal images. /proc/sys/net shows the
        // namespace of the process that opens it: sh's, inside `ns`.
        let disable = run_within(
            ns.command("sh").args([
                "-c",
                "for c in all default lo; do \
                 echo 1 >/proc/sys/net/ipv6/conf/$c/disable_ipv6 || exit 1; done",
            ]),
            Duration::from_secs(10),
        );
        assert!(
            disable.status.success(),
            "disabling IPv6: {}",
            describe(&disable)
        );
        let v6 = run_within(
            Command::new("ip").args(["-n", ns.name(), "-6", "addr", "show", "dev", "lo"]),
            Duration::from_secs(10),
        );
        assert!(
            v6.status.success() && stdout(&v6).trim().is_empty(),
            "IPv6 still configured on lo in {}: {}",
            ns.name(),
            describe(&v6)
        );
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> <program>`: ip enters the namespace, then execs
    /// the program (same pid).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Same, as a command line to append to e.g. `TestCgroup::command("ip")`.
    pub fn exec_args<'s>(&'s self, program: &'s str) -> [&'s str; 4] {
        ["netns", "exec", &self.name, program]
    }
}

/// Deletes the `ktproxy-t-<pid>-<n>` namespaces of test processes that are
/// gone (only the name goes; processes still inside keep theirs).
fn remove_stale_netns() {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("ktproxy-t-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = output_within(
                Command::new("ip").args(["netns", "delete", &name]),
                Duration::from_secs(10),
            );
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = output_within(
            Command::new("ip").args(["netns", "delete", &self.name]),
            Duration::from_secs(10),
        );
    }
}
