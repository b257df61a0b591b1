//! Another ktproxy whose scope overlaps this one's, found before anything is
//! attached, and refused with a message that names it.
//!
//! Two instances whose scopes overlap chain into each other: the cgroup's
//! programs and its ancestors' all run on every connect, so a client could
//! be redirected by both (and its destination recorded by one, looked up by
//! the other), and an instance running inside the other's scope has its own
//! dials proxied again. Making them cooperate would need shared state in the
//! kernel that outlives both; refusing is simple, and says exactly why.
//!
//! The running instances are read from the kernel, not from files that a
//! killed ktproxy could leave behind: every cgroup is asked (BPF_PROG_QUERY,
//! as `bpftool cgroup tree` does) which programs are attached to it. An
//! instance is its ktproxy_connect4 (on the cgroup it intercepts) and its
//! ktproxy_getsockopt (on its own cgroup, `ktproxy-<pid>`, which names its
//! pid), paired by the maps they share.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::bpf::{self, AttachedProgram, Hook};
use crate::error::{Error, Result};

/// The kernel keeps the first 15 bytes of a program's name.
const NAME_LEN: usize = 15;

struct Instance {
    scope: PathBuf,
    own: Option<PathBuf>,
    pid: Option<u32>,
}

/// Refuses if a running ktproxy overlaps the one about to start, whose own
/// cgroup is created in `home` and which intercepts `scope` (None: command
/// mode, a new cgroup in `home`).
pub fn refuse_overlap(root: &Path, scope: Option<&Path>, home: &Path) -> Result<()> {
    for other in running(root) {
        if other.pid == Some(std::process::id()) {
            continue;
        }
        let why =
            if let Some(s) = scope.filter(|s| within(s, &other.scope) || within(&other.scope, s)) {
                format!(
                    "its cgroup and {} overlap: their connections would be proxied twice",
                    s.display()
                )
            } else if within(home, &other.scope) {
                format!(
                    "this ktproxy would run inside it (in {}): its own connections would be \
                 proxied again",
                    home.display()
                )
            } else if let Some(own) = other
                .own
                .as_deref()
                .filter(|o| scope.is_some_and(|s| within(o, s)))
            {
                format!(
                    "it runs inside the cgroup to intercept (in {}): its connections would be \
                 proxied again",
                    own.display()
                )
            } else {
                continue;
            };
        return Err(Error::new(format!(
            "another ktproxy ({}) already intercepts {}, and {why}; stop it, or choose a \
             cgroup outside its scope",
            describe(&other),
            other.scope.display()
        )));
    }
    Ok(())
}

fn within(path: &Path, ancestor: &Path) -> bool {
    path.starts_with(ancestor)
}

fn describe(i: &Instance) -> String {
    match i.pid {
        Some(pid) => {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    b.split(|&c| c == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            if cmdline.is_empty() {
                format!("pid {pid}")
            } else {
                let mut c: String = cmdline.chars().take(120).collect();
                if c.len() < cmdline.len() {
                    c.push_str("...");
                }
                format!("pid {pid}: {c}")
            }
        }
        None => "pid unknown".to_string(),
    }
}

/// The ktproxy instances attached anywhere in the hierarchy under `root`.
fn running(root: &Path) -> Vec<Instance> {
    let mut scopes: Vec<(PathBuf, AttachedProgram)> = Vec::new();
    let mut owns: Vec<(PathBuf, AttachedProgram)> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        // Cgroups come and go while we walk: what vanished had nothing.
        let Ok(f) = File::open(&dir) else { continue };
        for (hook, name, out) in [
            (Hook::Connect4, "ktproxy_connect4", &mut scopes),
            (Hook::Getsockopt, "ktproxy_getsockopt", &mut owns),
        ] {
            let short = &name[..name.len().min(NAME_LEN)];
            for p in bpf::attached_programs(&f, hook).unwrap_or_default() {
                if p.name == short {
                    out.push((dir.clone(), p));
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    scopes
        .into_iter()
        .map(|(scope, connect)| {
            let own = owns
                .iter()
                .find(|(_, g)| g.map_ids.iter().any(|m| connect.map_ids.contains(m)))
                .map(|(dir, _)| dir.clone());
            let pid = own.as_deref().and_then(pid_of_own_cgroup);
            Instance { scope, own, pid }
        })
        .collect()
}

/// `.../ktproxy-1234` names ktproxy 1234's own cgroup.
fn pid_of_own_cgroup(dir: &Path) -> Option<u32> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("ktproxy-")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroups_name_their_pid() {
        assert_eq!(
            pid_of_own_cgroup(Path::new("/sys/fs/cgroup/ktproxy-42")),
            Some(42)
        );
        assert_eq!(
            pid_of_own_cgroup(Path::new("/sys/fs/cgroup/ktproxy-42-cmd")),
            None
        );
    }

    #[test]
    fn within_compares_whole_components() {
        assert!(within(Path::new("/a/b/c"), Path::new("/a/b")));
        assert!(within(Path::new("/a/b"), Path::new("/a/b")));
        assert!(!within(Path::new("/a/bc"), Path::new("/a/b")));
    }
}
