//! Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`:
//! /sys/fs/cgroup on unified systems, /sys/fs/cgroup/unified on hybrid ones,
//! anywhere at all on others.

use std::path::PathBuf;

/// The cgroup v2 mount point of the calling process's mount namespace, or
/// None if no cgroup2 filesystem is mounted there.
pub fn cgroup2_mount_point() -> std::io::Result<Option<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(cgroup2_mount(&text))
}

/// The first cgroup2 mount whose root is the hierarchy's root, else the first
/// cgroup2 mount at all (bind mounts of a sub-tree, as containers have, show
/// a different root). Lines read
/// `id parent maj:min root mountpoint options [optional...] - fstype source ...`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = pre.split_whitespace().collect();
        let (Some(root), Some(mnt)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let path = PathBuf::from(unescape_mount_path(mnt));
        if *root == "/" {
            return Some(path);
        }
        fallback.get_or_insert(path);
    }
    fallback
}

/// mountinfo escapes space, tab, newline and backslash as \ooo octal.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let octal = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = octal.and_then(|t| u8::from_str_radix(t, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn prefers_the_mount_of_the_hierarchy_root_over_bind_mounts() {
        let text = "\
50 1 0:38 /sub /mnt/sub rw - cgroup2 cgroup2 rw
51 1 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount(text), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        assert_eq!(
            cgroup2_mount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn mount_paths_with_escaped_spaces() {
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }
}
