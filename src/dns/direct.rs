//! --direct-domain: names the user wants resolved on this machine, not
//! behind the upstream (".lan", ".internal", the search domain). ktproxy
//! resolves them itself with getaddrinfo, from its own cgroup (so its
//! lookups are not intercepted), and the client gets the real addresses;
//! the ordinary -p/-d/-x rules then apply to connections to them.

use std::collections::HashSet;
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::error::{Error, Result};
use crate::rules::read_list_file;

/// --direct-domain SUFFIX... and --direct-domain-file FILE... into
/// normalized suffixes: lower-case, no leading or trailing dot. Files hold
/// one suffix per line; blank lines and `#` comments are ignored. Errors are
/// usage errors naming the option, or the file and line.
pub fn parse_direct_domains(args: &[String], files: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for a in args {
        let d = normalize(a).map_err(|e| Error::usage(format!("--direct-domain {e}")))?;
        out.push(d);
    }
    for f in files {
        out.extend(read_list_file(
            "--direct-domain-file",
            Path::new(f),
            normalize,
        )?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// ".Lan." -> "lan". The error text starts with the value, quoted.
fn normalize(s: &str) -> std::result::Result<String, String> {
    let t = s.trim();
    let d = t.strip_prefix("*.").unwrap_or(t);
    let d = d.strip_prefix('.').unwrap_or(d);
    let d = d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase();
    if d.is_empty() {
        return Err(format!(
            "'{t}': empty suffix (to resolve every name locally, turn DNS handling off instead)"
        ));
    }
    if d.len() > 253 {
        return Err(format!("'{t}': longer than a name can be (253 bytes)"));
    }
    for label in d.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("'{t}': labels must be 1-63 characters"));
        }
        if let Some(c) = label.chars().find(|&c| !is_host_char(c)) {
            return Err(format!(
                "'{t}': '{c}' is not allowed in a domain name (letters, digits, '-' and '_')"
            ));
        }
    }
    Ok(d)
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The suffix set, looked up label boundary by label boundary: a few hash
/// lookups per query however long the list.
pub(crate) struct DirectDomains(HashSet<String>);

impl DirectDomains {
    pub(crate) fn new(list: &[String]) -> DirectDomains {
        DirectDomains(list.iter().cloned().collect())
    }

    /// `name` is lower-case without a trailing dot.
    pub(crate) fn contains(&self, name: &str) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let mut rest = name;
        loop {
            if self.0.contains(rest) {
                return true;
            }
            match rest.split_once('.') {
                Some((_, tail)) => rest = tail,
                None => return false,
            }
        }
    }
}

pub(crate) enum Lookup {
    Found(Vec<IpAddr>),
    /// The name does not exist (NXDOMAIN).
    NoName,
    /// The name exists but has no address (NODATA).
    NoData,
    /// The resolver failed (SERVFAIL).
    Failed,
}

/// getaddrinfo, both families at once (the system resolver and /etc/hosts,
/// as any program on this machine would see them). Blocks: the UDP
/// responder calls it on a thread of its own.
pub(crate) fn lookup(name: &str) -> Lookup {
    let Ok(host) = CString::new(name) else {
        return Lookup::NoName;
    };
    // SAFETY: addrinfo is a plain C struct for which all-zero is the
    // documented "no hints" value of every field but those set below.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: host is a NUL-terminated string, service may be NULL, hints and
    // res point to live locals; on success res is freed below, once.
    let rc = unsafe { libc::getaddrinfo(host.as_ptr(), std::ptr::null(), &hints, &mut res) };
    match rc {
        0 => {}
        libc::EAI_NONAME => return Lookup::NoName,
        libc::EAI_NODATA => return Lookup::NoData,
        _ => return Lookup::Failed,
    }
    let mut addrs = Vec::new();
    let mut p = res;
    while !p.is_null() {
        // SAFETY: p is a node of the list getaddrinfo returned, not yet freed.
        let ai = unsafe { &*p };
        if let Some(ip) = sockaddr_ip(ai) {
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
        p = ai.ai_next;
    }
    // SAFETY: res came from a successful getaddrinfo and is freed only here.
    unsafe { libc::freeaddrinfo(res) };
    Lookup::Found(addrs)
}

fn sockaddr_ip(ai: &libc::addrinfo) -> Option<IpAddr> {
    if ai.ai_addr.is_null() {
        return None;
    }
    let len = ai.ai_addrlen as usize;
    match ai.ai_family {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: family and length say ai_addr holds a sockaddr_in;
            // read_unaligned makes no alignment assumption.
            let sa = unsafe { std::ptr::read_unaligned(ai.ai_addr as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sa = unsafe { std::ptr::read_unaligned(ai.ai_addr as *const libc::sockaddr_in6) };
            Some(IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn suffixes_are_normalized_and_matched_at_label_boundaries() {
        let d =
            parse_direct_domains(&strings(&[".LAN", "corp.example.", "*.internal"]), &[]).unwrap();
        assert_eq!(d, ["corp.example", "internal", "lan"]);
        let set = DirectDomains::new(&d);
        assert!(set.contains("lan"));
        assert!(set.contains("printer.lan"));
        assert!(set.contains("a.b.corp.example"));
        assert!(!set.contains("plan"), "suffix match is per label");
        assert!(!set.contains("example"));
        assert!(!set.contains("lan.example.com"));
        assert!(!DirectDomains::new(&[]).contains("lan"));
    }

    #[test]
    fn bad_suffixes_are_usage_errors_naming_the_value() {
        let e = parse_direct_domains(&strings(&["."]), &[]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .starts_with("--direct-domain '.': empty suffix"),
            "{e}"
        );
        let e = parse_direct_domains(&strings(&["a b.lan"]), &[]).unwrap_err();
        assert!(e.to_string().contains("' ' is not allowed"), "{e}");
        let e = parse_direct_domains(&strings(&["a..lan"]), &[]).unwrap_err();
        assert!(e.to_string().contains("labels must be 1-63"), "{e}");
    }

    #[test]
    fn direct_domain_file_errors_name_file_and_line() {
        let dir = std::env::temp_dir().join(format!("ktproxy-dd-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("domains");
        fs::write(
            &f,
            "# local names\nlan\n\n  .Internal  # trailing comment\nbad/name\n",
        )
        .unwrap();
        let files = [f.display().to_string()];
        let e = parse_direct_domains(&[], &files).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            format!(
                "--direct-domain-file: {}:5: 'bad/name': '/' is not allowed in a domain name (letters, digits, '-' and '_')",
                f.display()
            )
        );
        fs::write(&f, "lan\n  .Internal  # trailing comment\n").unwrap();
        assert_eq!(
            parse_direct_domains(&[], &files).unwrap(),
            ["internal", "lan"]
        );
        let missing = [dir.join("nope").display().to_string()];
        let e = parse_direct_domains(&[], &missing).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lookup_resolves_localhost_from_the_hosts_file() {
        // /etc/hosts answers (no query leaves the machine).
        match lookup("localhost") {
            Lookup::Found(a) => assert!(a.iter().any(|ip| ip.is_loopback()), "{a:?}"),
            _ => panic!("localhost did not resolve"),
        }
        assert!(matches!(lookup("nul\0byte"), Lookup::NoName));
    }
}
