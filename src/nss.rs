//! Resolvers that send no packet. With names on in command mode, COMMAND's
//! DNS must reach the network as packets from its own cgroup, where the
//! kernel sends them to ktproxy. nss-resolve (systemd-resolved), nscd, sssd
//! and friends instead ask a daemon over a Unix socket, and the daemon asks
//! the network itself, from outside the cgroup: the query leaks and the
//! answer is a real address.
//!
//! So, when /etc/nsswitch.conf names such a service for `hosts`, or an nscd
//! socket exists, COMMAND gets a private mount namespace (prepared here
//! before fork, entered between fork and exec) in which /etc/nsswitch.conf
//! says `hosts: files dns` and the nscd socket is /dev/null. glibc then
//! reads /etc/hosts and sends DNS packets, and falls back from the nscd
//! "socket" on its own (connect fails with ECONNREFUSED). Nothing else
//! changes: the namespace is a slave copy of ktproxy's, so mounts made
//! later on the host still show up in it.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use log::info;

use crate::error::{Context, Error, Result};

const NSSWITCH: &str = "/etc/nsswitch.conf";
/// glibc's _PATH_NSCDSOCKET; /var/run is usually a link to /run.
const NSCD_SOCKETS: [&str; 2] = ["/run/nscd/socket", "/var/run/nscd/socket"];
/// `hosts` services that answer without a daemon or from this host only.
const PACKET_SERVICES: [&str; 4] = ["files", "dns", "myhostname", "mymachines"];
/// The hosts line COMMAND gets: /etc/hosts, then DNS packets.
const HOSTS_LINE: &str = "hosts: files dns";

/// COMMAND's name-service view: the mounts, and our copy of nsswitch.conf,
/// removed on drop (once COMMAND has mounted it, or failed to start).
pub struct View {
    mounts: Mounts,
    copy: Option<PathBuf>,
}

/// What COMMAND's mount namespace changes; everything prepared before fork,
/// so that `apply` only makes system calls.
#[derive(Clone)]
pub struct Mounts {
    /// (our copy, /etc/nsswitch.conf) to bind over it.
    nsswitch: Option<(CString, CString)>,
    /// nscd sockets to hide under /dev/null.
    hide: Vec<CString>,
}

/// What would resolve names outside the intercepted cgroup: the daemon
/// services of the hosts line, and nscd. None when names leave as packets.
pub fn leaks() -> Option<String> {
    let text = fs::read_to_string(NSSWITCH).ok();
    describe(
        &text.as_deref().map(daemon_services).unwrap_or_default(),
        !nscd_sockets().is_empty(),
    )
}

fn describe(daemons: &[String], nscd: bool) -> Option<String> {
    let mut what: Vec<String> = daemons
        .iter()
        .map(|s| format!("'{s}' in {NSSWITCH}"))
        .collect();
    if nscd {
        what.push("nscd".to_string());
    }
    (!what.is_empty()).then(|| what.join(" and "))
}

/// The view COMMAND needs, if it needs one. Logs what it found and does.
pub fn prepare() -> Result<Option<View>> {
    let text = fs::read_to_string(NSSWITCH).ok();
    let daemons = text.as_deref().map(daemon_services).unwrap_or_default();
    let sockets = nscd_sockets();
    let Some(what) = describe(&daemons, !sockets.is_empty()) else {
        return Ok(None);
    };
    info!(
        "COMMAND would resolve names through {what}, which asks the network from outside its \
         cgroup (a leak, and real addresses): COMMAND gets a private mount namespace with \
         '{HOSTS_LINE}' and no nscd socket"
    );
    let mut view = View {
        mounts: Mounts {
            nsswitch: None,
            hide: sockets.iter().map(|p| c_path(p)).collect::<Result<_>>()?,
        },
        copy: None,
    };
    if let (Some(text), false) = (text, daemons.is_empty()) {
        let copy = write_copy(&with_hosts_line(&text))?;
        view.copy = Some(copy.clone());
        view.mounts.nsswitch = Some((c_path(&copy)?, c_path(Path::new(NSSWITCH))?));
    }
    Ok(Some(view))
}

impl View {
    /// For the child to take along (pre_exec wants owned data).
    pub fn mounts(&self) -> Mounts {
        self.mounts.clone()
    }
}

impl Mounts {
    /// Between fork and exec, as root (before any --user switch): a new
    /// mount namespace with the changes. Only async-signal-safe system
    /// calls on memory prepared before the fork.
    ///
    /// # Safety
    /// Call only in the child between fork and exec.
    pub unsafe fn apply(&self) -> io::Result<()> {
        let check = |r: libc::c_int| {
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on NUL-terminated strings that live in
        // `self`; null pointers where mount(2) allows them.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // A slave copy: our mounts stay ours, the host's still arrive.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ))?;
            if let Some((from, to)) = &self.nsswitch {
                check(libc::mount(
                    from.as_ptr(),
                    to.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            for socket in &self.hide {
                check(libc::mount(
                    c"/dev/null".as_ptr(),
                    socket.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
        }
        Ok(())
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // The bind mount holds the file itself, not its name.
        if let Some(copy) = self.copy.take() {
            let _ = fs::remove_file(copy);
        }
    }
}

/// The services of the `hosts` line that resolve through a daemon (or
/// anything else that is not a DNS packet from COMMAND), in order.
fn daemon_services(nsswitch: &str) -> Vec<String> {
    let Some(line) = hosts_line(nsswitch) else {
        // No hosts line: glibc's default is "dns [!UNAVAIL=return] files".
        return Vec::new();
    };
    let mut services = Vec::new();
    let mut in_action = false;
    for word in line.split_whitespace() {
        // "[!UNAVAIL=return]" actions, possibly split over words.
        if word.starts_with('[') {
            in_action = true;
        }
        if !in_action && !PACKET_SERVICES.contains(&word) {
            services.push(word.to_string());
        }
        if word.ends_with(']') {
            in_action = false;
        }
    }
    services
}

/// The services of the (last: glibc takes the last) `hosts:` line.
fn hosts_line(nsswitch: &str) -> Option<&str> {
    nsswitch
        .lines()
        .filter_map(|l| l.split('#').next())
        .filter_map(|l| l.trim_start().strip_prefix("hosts"))
        .filter_map(|rest| rest.trim_start().strip_prefix(':'))
        .next_back()
}

/// The file with every `hosts:` line replaced by `hosts: files dns`.
fn with_hosts_line(nsswitch: &str) -> String {
    let mut out = String::new();
    for l in nsswitch.lines() {
        let code = l.split('#').next().unwrap_or("");
        let is_hosts = code
            .trim_start()
            .strip_prefix("hosts")
            .is_some_and(|rest| rest.trim_start().starts_with(':'));
        out.push_str(if is_hosts { HOSTS_LINE } else { l });
        out.push('\n');
    }
    out
}

/// nscd's socket, where it exists, once per file.
fn nscd_sockets() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for p in NSCD_SOCKETS {
        let is_socket = fs::metadata(p).is_ok_and(|m| m.file_type().is_socket());
        if let (true, Ok(real)) = (is_socket, fs::canonicalize(p)) {
            if !found.contains(&real) {
                found.push(real);
            }
        }
    }
    found
}

/// A root-owned file only ktproxy can have created (O_EXCL, in /run when
/// there is one), readable by COMMAND whatever user it runs as.
fn write_copy(text: &str) -> Result<PathBuf> {
    let dir = if Path::new("/run").is_dir() {
        PathBuf::from("/run")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("ktproxy-{}-nsswitch.conf", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("writing COMMAND's nsswitch.conf {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::new(format!("{} contains a NUL byte", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_dns_need_nothing() {
        assert!(daemon_services("hosts:          files dns\n").is_empty());
        assert!(daemon_services("hosts: files myhostname dns [!UNAVAIL=return]\n").is_empty());
        assert!(
            daemon_services("passwd: files systemd\n").is_empty(),
            "no hosts line"
        );
    }

    #[test]
    fn resolve_sss_and_mdns_are_found_whatever_the_actions() {
        let fedora = "passwd: files sss systemd\n\
                      hosts:      files myhostname resolve [!UNAVAIL=return] dns\n";
        assert_eq!(daemon_services(fedora), ["resolve"]);
        let ubuntu = "hosts: files mdns4_minimal [NOTFOUND=return] dns mymachines\n";
        assert_eq!(daemon_services(ubuntu), ["mdns4_minimal"]);
        let spaced = "hosts: files [ NOTFOUND=return ] sss dns # comment resolve\n";
        assert_eq!(daemon_services(spaced), ["sss"]);
    }

    #[test]
    fn glibc_takes_the_last_hosts_line() {
        let text = "hosts: resolve\n#hosts: nis\nhosts: files dns\n";
        assert!(daemon_services(text).is_empty());
    }

    #[test]
    fn the_copy_changes_only_the_hosts_lines() {
        let text =
            "# nsswitch\npasswd: files systemd\nhosts: files resolve [!UNAVAIL=return] dns\n\
                    hostsfile: x\nnetworks: files\n";
        assert_eq!(
            with_hosts_line(text),
            "# nsswitch\npasswd: files systemd\nhosts: files dns\nhostsfile: x\nnetworks: files\n"
        );
    }
}
