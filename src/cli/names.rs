//! The names options (issue 9): DNS interception, fake addresses, the
//! direct domains and forwarder, and what becomes of traffic ktproxy cannot
//! carry.

use std::net::{IpAddr, SocketAddr};

use crate::dns::{self, FakeNet, DEFAULT_FAKE_NET};
use crate::error::{Error, Result};
use crate::upstream::Upstream;

#[derive(Debug)]
pub struct NamesOptions {
    /// Answer the intercepted processes' DNS with fake addresses and send
    /// names, not addresses, to the upstream.
    pub dns: bool,
    pub fake_net: FakeNet,
    /// --direct-domain suffixes, resolved for real.
    pub direct_domains: Vec<String>,
    /// --dns-forward: where other query types go (None: from resolv.conf).
    pub forward: Option<SocketAddr>,
    pub unproxied: Unproxied,
}

/// What becomes of a connect or datagram ktproxy cannot carry (UDP other
/// than DNS, a family without a listener, link-local IPv6) to a
/// non-loopback destination.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Unproxied {
    /// It goes direct, as it would without ktproxy.
    #[default]
    Pass,
    /// EPERM: command mode with -u, which promises that nothing leaks.
    Refuse,
    /// It goes direct and is counted: the same with --allow-direct.
    PassCounted,
}

/// The names options and their per-mode defaults: DNS is on with an
/// upstream in command mode and with -c, off without one (--proxy-dns turns
/// it on), and never for the whole machine, whose own resolver must keep
/// working (fake addresses outlive ktproxy in caches). Nothing leaks in
/// command mode with an upstream unless --allow-direct says so.
pub(super) fn parse_names(
    m: &getopts::Matches,
    command: &[String],
    cgroup_given: bool,
    upstream: Option<&Upstream>,
    listen: &[SocketAddr],
) -> Result<NamesOptions> {
    let whole_machine = command.is_empty() && !cgroup_given;
    let dns = match (m.opt_present("proxy-dns"), m.opt_present("no-proxy-dns")) {
        (true, true) => {
            return Err(Error::usage(
                "--proxy-dns and --no-proxy-dns contradict each other",
            ))
        }
        (true, false) if whole_machine => {
            return Err(Error::usage(
                "--proxy-dns needs -c or COMMAND: answering every process's DNS with fake \
                 addresses would break this machine's resolver (and its caches) once ktproxy stops",
            ))
        }
        (true, false) => true,
        (false, true) => false,
        (false, false) => upstream.is_some() && !whole_machine,
    };
    if !dns {
        for opt in [
            "fake-net",
            "direct-domain",
            "direct-domain-file",
            "dns-forward",
        ] {
            if m.opt_present(opt) {
                return Err(Error::usage(format!(
                    "--{opt} needs DNS interception, which is off here (it is on with -u and \
                     COMMAND or -c, or with --proxy-dns)"
                )));
            }
        }
    }

    let fake_arg = m.opt_str("fake-net");
    let fake_text = fake_arg.as_deref().unwrap_or(DEFAULT_FAKE_NET);
    let fake_net = FakeNet::parse(fake_text).map_err(|e| prefixed("--fake-net", e))?;
    for a in listen {
        if fake_net.covers(a.ip()) {
            return Err(Error::usage(format!(
                "--fake-net {fake_text} contains the listen address {a}: pick a range nothing \
                 on this machine uses"
            )));
        }
    }
    if let Some(up) = upstream.filter(|up| fake_net.covers(up.addr().ip())) {
        return Err(Error::usage(format!(
            "--fake-net {fake_text} contains the upstream proxy's address {}",
            up.addr()
        )));
    }

    let direct_domains = dns::parse_direct_domains(
        &m.opt_strs("direct-domain"),
        &m.opt_strs("direct-domain-file"),
    )?;
    let forward = m
        .opt_str("dns-forward")
        .map(|s| parse_dns_forward(&s))
        .transpose()?;

    let allow_direct = m.opt_present("allow-direct");
    let leak_free = !command.is_empty() && upstream.is_some();
    let unproxied = match (leak_free, allow_direct) {
        (true, false) => Unproxied::Refuse,
        (true, true) => Unproxied::PassCounted,
        (false, false) => Unproxied::Pass,
        (false, true) => {
            return Err(Error::usage(
                "--allow-direct goes with -u and COMMAND: only then is anything refused",
            ))
        }
    };
    Ok(NamesOptions {
        dns,
        fake_net,
        direct_domains,
        forward,
        unproxied,
    })
}

/// `IP` (port 53), `IP:PORT` or `[IPv6]:PORT`.
fn parse_dns_forward(s: &str) -> Result<SocketAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse().map_err(|_| {
        Error::usage(format!(
            "--dns-forward: invalid address '{s}': expected IP or IP:PORT, e.g. 192.0.2.53 or \
             [2001:db8::53]:53"
        ))
    })
}

/// "--opt: " before an error from another module, keeping its exit code.
fn prefixed(opt: &str, e: Error) -> Error {
    let text = e.to_string();
    if text.starts_with(opt) {
        e
    } else {
        Error::with_code(format!("{opt}: {text}"), e.exit_code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::{run, usage_error};

    #[test]
    fn dns_is_on_with_an_upstream_in_command_mode_and_with_a_cgroup() {
        let up = ["-u", "socks5://127.0.0.1:1080"];
        let c = run(&[up[0], up[1], "--", "true"]);
        assert!(c.names.dns);
        assert_eq!(
            c.names.unproxied,
            Unproxied::Refuse,
            "command mode with -u leaks nothing"
        );
        let c = run(&[up[0], up[1], "-c", "/x"]);
        assert!(c.names.dns);
        assert_eq!(c.names.unproxied, Unproxied::Pass);
        assert_eq!(
            c.names.fake_net.network(),
            ("198.18.0.0".parse().unwrap(), 15)
        );
    }

    #[test]
    fn dns_is_off_without_an_upstream_and_for_the_whole_machine() {
        assert!(!run(&["--", "true"]).names.dns);
        assert!(!run(&["-c", "/x"]).names.dns);
        let c = run(&["-u", "socks5://127.0.0.1:1080"]);
        assert!(!c.names.dns, "the machine's own resolver is left alone");
        assert_eq!(c.names.unproxied, Unproxied::Pass);
        assert!(run(&["--proxy-dns", "--", "true"]).names.dns);
        assert!(run(&["--proxy-dns", "-c", "/x"]).names.dns);
        let e = usage_error(&["--proxy-dns"]);
        assert!(e.contains("--proxy-dns needs -c or COMMAND"), "{e}");
        let e = usage_error(&["--proxy-dns", "-u", "socks5://127.0.0.1:1080"]);
        assert!(e.contains("--proxy-dns needs -c or COMMAND"), "{e}");
    }

    #[test]
    fn no_proxy_dns_turns_it_off_and_allow_direct_opts_out_of_refusing() {
        let c = run(&[
            "--no-proxy-dns",
            "-u",
            "socks5://127.0.0.1:1080",
            "--",
            "true",
        ]);
        assert!(!c.names.dns);
        assert_eq!(c.names.unproxied, Unproxied::Refuse);
        let c = run(&[
            "--allow-direct",
            "-u",
            "socks5://127.0.0.1:1080",
            "--",
            "true",
        ]);
        assert_eq!(c.names.unproxied, Unproxied::PassCounted);
        assert!(
            usage_error(&["--proxy-dns", "--no-proxy-dns", "--", "true"]).contains("contradict")
        );
        let e = usage_error(&["--allow-direct", "--", "true"]);
        assert!(e.contains("--allow-direct goes with -u and COMMAND"), "{e}");
    }

    #[test]
    fn fake_net_errors_name_the_option_and_the_problem() {
        let dns = ["--proxy-dns", "-c", "/x"];
        let with = |extra: &[&str]| {
            let mut a = dns.to_vec();
            a.extend_from_slice(extra);
            usage_error(&a)
        };
        let e = with(&["--fake-net", "bogus"]);
        assert!(e.starts_with("--fake-net bogus: "), "{e}");
        let e = with(&["--fake-net", "10.9.0.0/16", "-l", "10.9.1.1:8999"]);
        assert!(
            e.contains("contains the listen address 10.9.1.1:8999"),
            "{e}"
        );
        let e = with(&["--fake-net", "10.9.0.0/16", "-u", "socks5://10.9.0.5:1080"]);
        assert!(
            e.contains("contains the upstream proxy's address 10.9.0.5:1080"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let c = run(&["--proxy-dns", "-c", "/x", "--fake-net", "10.9.0.0/16"]);
        assert_eq!(
            c.names.fake_net.network(),
            ("10.9.0.0".parse().unwrap(), 16)
        );
    }

    #[test]
    fn dns_options_without_dns_are_usage_errors() {
        for opt in [
            ["--fake-net", "10.9.0.0/16"],
            ["--direct-domain", "lan"],
            ["--direct-domain-file", "/dev/null"],
            ["--dns-forward", "127.0.0.1"],
        ] {
            let e = usage_error(&[opt[0], opt[1], "--", "true"]);
            assert!(
                e.starts_with(&format!("{} needs DNS interception", opt[0])),
                "{e}"
            );
        }
    }

    #[test]
    fn dns_forward_takes_an_address_with_port_53_by_default() {
        let c = run(&["--proxy-dns", "-c", "/x", "--dns-forward", "192.0.2.53"]);
        assert_eq!(c.names.forward, Some("192.0.2.53:53".parse().unwrap()));
        let c = run(&[
            "--proxy-dns",
            "-c",
            "/x",
            "--dns-forward",
            "[2001:db8::1]:5353",
        ]);
        assert_eq!(c.names.forward, Some("[2001:db8::1]:5353".parse().unwrap()));
        let c = run(&["--proxy-dns", "-c", "/x", "--dns-forward", "::1"]);
        assert_eq!(c.names.forward, Some("[::1]:53".parse().unwrap()));
        let e = usage_error(&["--proxy-dns", "-c", "/x", "--dns-forward", "dns.google"]);
        assert!(
            e.starts_with("--dns-forward: invalid address 'dns.google'"),
            "{e}"
        );
    }

    #[test]
    fn direct_domains_come_from_options_and_files() {
        let dir = std::env::temp_dir().join(format!("ktproxy-cli-dd-{}", std::process::id()));
        std::fs::write(&dir, "# intranet\ncorp.example\n\nlan\n").unwrap();
        let f = dir.display().to_string();
        let c = run(&[
            "--proxy-dns",
            "-c",
            "/x",
            "--direct-domain",
            "internal",
            "--direct-domain-file",
            &f,
        ]);
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(
            c.names.direct_domains.len(),
            3,
            "{:?}",
            c.names.direct_domains
        );
    }
}
