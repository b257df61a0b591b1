//! ktproxy run by an unprivileged user, from a copy that user can reach.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{describe, run_within, TempDir};
use super::KTPROXY;

/// uid and gid of `nobody` on Debian, Ubuntu and Fedora.
pub const NOBODY: u32 = 65534;

/// A copy of the ktproxy binary in a private temporary directory that every
/// user may enter. The build under target/ may sit where `nobody` cannot
/// (a checkout in /root, mode 0700, or in an Ubuntu home, 0750): exec would
/// fail with EACCES before ktproxy ran at all, and the test would say
/// nothing about ktproxy. Removed on drop.
pub struct UnprivilegedKtproxy {
    dir: TempDir,
}

impl UnprivilegedKtproxy {
    pub fn new() -> UnprivilegedKtproxy {
        let dir = TempDir::new("unprivileged");
        let bin = dir.path().join("ktproxy");
        // Copied by cp(1), a process of its own: a descriptor open for
        // writing in this test process would also be in the children other
        // tests fork meanwhile, and exec would fail with ETXTBSY until they
        // exec in turn.
        let cp = run_within(
            Command::new("cp").arg(KTPROXY).arg(&bin),
            Duration::from_secs(30),
        );
        assert!(cp.status.success(), "cp {KTPROXY}: {}", describe(&cp));
        let mode = |p: &Path, m: u32| {
            fs::set_permissions(p, fs::Permissions::from_mode(m))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
        };
        // Search only for the directory: others can run the copy, not list
        // or change what is next to it.
        mode(dir.path(), 0o711);
        mode(&bin, 0o755);
        for a in dir.path().ancestors().skip(1) {
            let m = fs::metadata(a).map(|m| m.permissions().mode()).unwrap_or(0);
            assert!(
                m & 0o001 != 0,
                "{} (mode {m:o}) cannot be entered by other users, so nobody cannot run \
                 ktproxy from below it: point TMPDIR to a directory such as /tmp",
                a.display()
            );
        }
        UnprivilegedKtproxy { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("ktproxy")
    }

    /// `like` (a ktproxy command line, e.g. from `ktproxy_command`), run by
    /// the copy as uid and gid 65534 with no supplementary groups.
    pub fn command(&self, like: &Command) -> Command {
        let mut cmd = Command::new(self.path());
        cmd.args(like.get_args()).uid(NOBODY).gid(NOBODY);
        cmd
    }
}
