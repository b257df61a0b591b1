//! What is intercepted, as the user says it and as the kernel looks it up:
//! - destination ports (-p/--ports): a bitmap indexed by port (port_wanted in
//!   bpf/ktproxy.bpf.c);
//! - destination rules (-d/--dest, -x/--exclude and their -file forms): CIDRs
//!   looked up in the kernel's LPM tries (dest4_wanted/dest6_wanted), so a
//!   long list costs nothing per connect.

use std::fmt;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use crate::error::{io_text, Error, Result};

/// The entries of a list file given to option `opt` (--dest-file,
/// --exclude-file, --direct-domain-file): one per line, blank lines and `#`
/// comments (whole-line or trailing) ignored, each line read by `item`.
/// Errors are usage errors naming the option, and the file and line.
pub fn read_list_file<T>(
    opt: &str,
    path: &Path,
    item: impl Fn(&str) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let text = fs::read_to_string(path).map_err(|e| {
        Error::usage(format!(
            "{opt}: cannot read {}: {}",
            path.display(),
            io_text(&e)
        ))
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let v = item(line)
            .map_err(|e| Error::usage(format!("{opt}: {}:{}: {e}", path.display(), i + 1)))?;
        out.push(v);
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cidr {
    V4(Ipv4Addr, u8),
    V6(Ipv6Addr, u8),
}

impl Cidr {
    /// "10.0.0.0/8", "2001:db8::/32", or a single address. Host bits set
    /// ("10.0.0.1/8") are rejected: they usually mean a typo.
    pub fn parse(s: &str) -> std::result::Result<Cidr, String> {
        let s = s.trim();
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 or IPv6 address or CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("'{s}': prefix length must be 0-{max}")),
            },
        };
        let cidr = match ip {
            IpAddr::V4(a) => Cidr::V4(a, len),
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
                return Err(format!(
                "'{s}' is IPv4-mapped; write the IPv4 form (it also covers ::ffff: destinations)"
            ))
            }
            IpAddr::V6(a) => Cidr::V6(a, len),
        };
        let masked = cidr.network();
        if masked != cidr {
            return Err(format!("'{s}' has host bits set (did you mean {masked}?)"));
        }
        Ok(cidr)
    }

    fn network(self) -> Cidr {
        match self {
            Cidr::V4(a, l) => {
                let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
                Cidr::V4(Ipv4Addr::from(u32::from(a) & mask), l)
            }
            Cidr::V6(a, l) => {
                let mask = if l == 0 { 0 } else { u128::MAX << (128 - l) };
                Cidr::V6(Ipv6Addr::from(u128::from(a) & mask), l)
            }
        }
    }

    #[cfg(test)]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (*self, ip) {
            (Cidr::V4(_, l), IpAddr::V4(a)) => Cidr::V4(a, l).network() == *self,
            (Cidr::V6(_, l), IpAddr::V6(a)) => Cidr::V6(a, l).network() == *self,
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cidr::V4(a, l) => write!(f, "{a}/{l}"),
            Cidr::V6(a, l) => write!(f, "{a}/{l}"),
        }
    }
}

/// Both rule lists, as given on the command line and in files.
#[derive(Debug, Default)]
pub struct Rules {
    /// Empty: every destination (subject to the exclusions).
    pub dest: Vec<Cidr>,
    pub exclude: Vec<Cidr>,
    /// Whether any -d/--dest(-file) was given, even if a file was empty:
    /// "only these" with an empty list intercepts nothing, as asked.
    pub dest_given: bool,
}

impl Rules {
    pub fn add_args(list: &mut Vec<Cidr>, opt: &str, args: &[String]) -> Result<()> {
        for a in args {
            list.push(Cidr::parse(a).map_err(|e| Error::usage(format!("{opt}: {e}")))?);
        }
        Ok(())
    }

    /// One CIDR per line (see [`read_list_file`]).
    pub fn add_file(list: &mut Vec<Cidr>, opt: &str, path: &Path) -> Result<()> {
        list.extend(read_list_file(opt, path, Cidr::parse)?);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        !self.dest_given && self.exclude.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.dest_given {
            parts.push(format!("{} destination rule(s)", self.dest.len()));
        }
        if !self.exclude.is_empty() {
            parts.push(format!("{} exclusion(s)", self.exclude.len()));
        }
        parts.join(", ")
    }
}

/// A set of TCP ports, as the kernel side wants it: one bit per port.
#[derive(Clone)]
pub struct PortSet {
    bits: Box<[u64; 1024]>,
    spec: String,
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({})", self.spec)
    }
}

impl PortSet {
    pub fn parse(spec: &str) -> Result<PortSet> {
        let bad = |why: String| Error::usage(format!("-p/--ports: invalid list '{spec}': {why}"));
        let mut bits = Box::new([0u64; 1024]);
        if spec.trim().is_empty() {
            return Err(bad("empty".into()));
        }
        for item in spec.split(',') {
            let item = item.trim();
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (port(a.trim()), port(b.trim())),
                None => (port(item), port(item)),
            };
            let (lo, hi) = match (lo, hi) {
                (Some(lo), Some(hi)) => (lo, hi),
                _ => return Err(bad(format!("'{item}' is not a port (1-65535) or range"))),
            };
            if lo > hi {
                return Err(bad(format!("range '{item}' runs backwards")));
            }
            for p in lo..=hi {
                bits[usize::from(p >> 6)] |= 1u64 << (p & 63);
            }
        }
        Ok(PortSet {
            bits,
            spec: spec.to_string(),
        })
    }

    #[cfg(test)]
    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port >> 6)] >> (port & 63) & 1 == 1
    }

    pub fn bits(&self) -> &[u64; 1024] {
        &self.bits
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

fn port(s: &str) -> Option<u16> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(p) => Some(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_ipv4_and_ipv6_cidrs_and_single_addresses() {
        assert_eq!(
            Cidr::parse("10.0.0.0/8"),
            Ok(Cidr::V4(Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(
            Cidr::parse("192.168.1.7"),
            Ok(Cidr::V4(Ipv4Addr::new(192, 168, 1, 7), 32))
        );
        assert_eq!(
            Cidr::parse("2001:db8::/32"),
            Ok(Cidr::V6("2001:db8::".parse().unwrap(), 32))
        );
        assert_eq!(Cidr::parse("::1"), Ok(Cidr::V6(Ipv6Addr::LOCALHOST, 128)));
        assert_eq!(
            Cidr::parse("0.0.0.0/0"),
            Ok(Cidr::V4(Ipv4Addr::UNSPECIFIED, 0))
        );
    }

    #[test]
    fn rejects_malformed_cidrs_with_the_reason() {
        assert!(Cidr::parse("10.0.0.0/33")
            .unwrap_err()
            .contains("prefix length must be 0-32"));
        assert!(Cidr::parse("::/129").unwrap_err().contains("0-128"));
        assert!(Cidr::parse("10.0.0.1/8")
            .unwrap_err()
            .contains("did you mean 10.0.0.0/8"));
        assert!(Cidr::parse("example.com")
            .unwrap_err()
            .contains("not an IPv4 or IPv6"));
        assert!(Cidr::parse("10.0.0.0/x")
            .unwrap_err()
            .contains("prefix length"));
        assert!(Cidr::parse("::ffff:10.0.0.0/104")
            .unwrap_err()
            .contains("IPv4-mapped"));
    }

    #[test]
    fn containment_follows_the_prefix() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
    }

    #[test]
    fn rule_files_skip_comments_and_name_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("ktproxy-rules-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        let mut f = fs::File::create(&good).unwrap();
        writeln!(f, "# office\n10.0.0.0/8  # lan\n\n2001:db8::/32").unwrap();
        let mut list = Vec::new();
        Rules::add_file(&mut list, "--dest-file", &good).unwrap();
        assert_eq!(list.len(), 2);

        let bad = dir.join("bad");
        fs::write(&bad, "10.0.0.0/8\n# ok\n300.1.2.3/8\n").unwrap();
        let e = Rules::add_file(&mut list, "--dest-file", &bad).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("bad:3: '300.1.2.3/8'"), "{e}");

        let e = Rules::add_file(&mut list, "--dest-file", &dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn port_lists_with_ranges() {
        let p = PortSet::parse("80,443, 8000-8999").unwrap();
        for yes in [80, 443, 8000, 8500, 8999] {
            assert!(p.contains(yes), "{yes}");
        }
        for no in [1, 79, 81, 7999, 9000, 65535] {
            assert!(!p.contains(no), "{no}");
        }
        let all = PortSet::parse("1-65535").unwrap();
        assert!(all.contains(1) && all.contains(65535) && !all.contains(0));
    }

    #[test]
    fn bad_port_lists_are_named() {
        let usage_error = |spec: &str| {
            let e = PortSet::parse(spec).expect_err("must be rejected");
            assert_eq!(e.exit_code(), 2, "{e}");
            e.to_string()
        };
        assert!(usage_error("http").contains("'http' is not a port"));
        assert!(usage_error("0").contains("'0' is not a port"));
        assert!(usage_error("65536").contains("'65536'"));
        assert!(usage_error("90-80").contains("backwards"));
        assert!(usage_error("80,,443").contains("'' is not a port"));
        assert!(usage_error("").contains("empty"));
    }
}
