//! cgroup v2 handling: finding the hierarchy, checking `-c`, and ktproxy's own
//! small cgroup.
//!
//! Why ktproxy needs a cgroup of its own: `cgroup/getsockopt` and sockops run
//! for the cgroup of the *socket*, and an accepted socket belongs to the
//! listener's cgroup. Putting ktproxy (and so its listener) in a cgroup nobody
//! else uses lets those programs see only ktproxy's sockets, and its cgroup id
//! tells connect4 which dials are ktproxy's own, also inside PID namespaces.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

use crate::error::{io_text, Context, Error, Result};

const OWN_PREFIX: &str = "ktproxy-";

/// Where the cgroup v2 hierarchy is mounted (e.g. /sys/fs/cgroup, or
/// /sys/fs/cgroup/unified on hybrid systems).
pub fn root() -> Result<PathBuf> {
    ktproxy::mountinfo::cgroup2_mount_point()
        .context("reading /proc/self/mountinfo")?
        .ok_or_else(|| {
            Error::new(
                "no cgroup v2 hierarchy is mounted; ktproxy needs cgroup v2 \
                 (mount one with: mount -t cgroup2 none /sys/fs/cgroup/unified)",
            )
        })
}

/// Checks that `path` is a directory of the cgroup v2 hierarchy.
pub fn check_dir(path: &Path) -> Result<PathBuf> {
    let shown = path.display();
    let meta =
        fs::metadata(path).map_err(|e| Error::new(format!("cgroup {shown}: {}", io_text(&e))))?;
    if !meta.is_dir() {
        return Err(Error::new(format!("cgroup {shown}: not a directory")));
    }
    let st =
        statfs(path).map_err(|e| Error::new(format!("cgroup {shown}: {}", io_text(&e.into()))))?;
    if st.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(Error::new(format!(
            "cgroup {shown}: not a cgroup v2 directory (cgroup v1 and ordinary directories cannot be used)"
        )));
    }
    fs::canonicalize(path).with_context(|| format!("cgroup {shown}"))
}

/// The cgroup v2 id of a cgroup directory, as bpf_get_current_cgroup_id()
/// returns it: on 64-bit kernels it is the kernfs inode number.
pub fn id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cgroup {}", path.display()))?
        .ino())
}

/// The cgroup v2 directory a process is in, from /proc/PID/cgroup ("0::/a/b").
pub fn of_process(root: &Path, pid: &str) -> Result<PathBuf> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::new(format!("{file} names no cgroup v2 membership")))?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// Moves process `pid` (0 = the caller) into the cgroup at `dir`.
pub fn move_process(dir: &Path, pid: u32) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
        .with_context(|| format!("moving process {pid} into {}", dir.display()))
}

/// ktproxy's own cgroup, `<its current cgroup>/ktproxy-<pid>`, holding the
/// ktproxy process for as long as this value lives. Dropping it moves ktproxy
/// back and removes the directory.
pub struct OwnCgroup {
    path: PathBuf,
    home: PathBuf,
    id: u64,
}

impl OwnCgroup {
    pub fn enter(root: &Path) -> Result<OwnCgroup> {
        let home = of_process(root, "self")?;
        remove_stale(&home);
        let path = home.join(format!("{OWN_PREFIX}{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        // From here on, Drop undoes the creation if a later step fails.
        let mut own = OwnCgroup { id: 0, path, home };
        move_process(&own.path, 0)?;
        own.id = id(&own.path)?;
        Ok(own)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The directory ktproxy's own cgroup was created in.
    pub fn parent(&self) -> &Path {
        &self.home
    }
}

/// The cgroup of `ktproxy -- COMMAND`: a sibling of ktproxy's own cgroup,
/// `ktproxy-<pid>-cmd`, removed on drop once its processes are gone.
pub struct CommandCgroup {
    path: PathBuf,
}

impl CommandCgroup {
    pub fn create(own: &OwnCgroup) -> Result<CommandCgroup> {
        let path = own
            .parent()
            .join(format!("{OWN_PREFIX}{}-cmd", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(CommandCgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// PIDs of the processes still in the cgroup.
    pub fn processes(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Sends `sig` to every process in the cgroup.
    pub fn signal_all(&self, sig: nix::sys::signal::Signal) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }
}

impl Drop for CommandCgroup {
    fn drop(&mut self) {
        // An exited process leaves cgroup.procs a moment after wait()
        // returns: retry briefly before giving up.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            log::warn!("removing cgroup {}: {}", self.path.display(), io_text(&e));
        }
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        // rmdir needs the cgroup empty: go home first. Sockets still pointing
        // at the cgroup do not block removal.
        if let Err(e) = move_process(&self.home, 0) {
            log::warn!("{e}");
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            log::warn!("removing cgroup {}: {}", self.path.display(), io_text(&e));
        }
    }
}

/// A ktproxy killed with SIGKILL leaves its empty cgroup behind (the kernel
/// has already detached its programs). Remove those of dead processes; rmdir
/// refuses a cgroup that still has processes, so this cannot harm a live one.
fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(OWN_PREFIX)) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        if fs::remove_dir(e.path()).is_ok() {
            log::debug!("removed stale cgroup {}", e.path().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_directories_are_not_cgroups() {
        let e = check_dir(Path::new("/tmp")).unwrap_err().to_string();
        assert!(e.contains("not a cgroup v2 directory"), "{e}");
        let e = check_dir(Path::new("/nonexistent/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file or directory"), "{e}");
    }
}
