//! Command-line parsing: turns argv into a `Config`, or a one-line usage error.
//!
//! - this file: `Config`, `Action` and `parse`, with the listen, scope,
//!   timeout and verbosity options;
//! - `options.rs`: the option table and the `--help` text;
//! - `names.rs`: the names (DNS) options;
//! - `security.rs`: the upstream URL's source, --mark, COMMAND's environment.

mod names;
mod options;
mod security;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use crate::error::{Error, Result};
use crate::rules::{PortSet, Rules};
use crate::secret::UPSTREAM_ENV;
use crate::upstream::Upstream;

use names::parse_names;
pub use names::{NamesOptions, Unproxied};
use options::{help, options};
use security::{parse_security, parse_upstream};

/// IPv4 and IPv6 loopback; without IPv6 on the host the second is dropped
/// with a warning (only when defaulted: an explicit -l must work).
pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:8999", "[::1]:8999"];
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;

#[derive(Debug)]
pub struct Config {
    /// At most one address per family.
    pub listen: Vec<SocketAddr>,
    /// `listen` is the default, not the user's choice.
    pub listen_defaulted: bool,
    /// None: the whole cgroup v2 hierarchy.
    pub cgroup: Option<PathBuf>,
    /// None: every destination port.
    pub ports: Option<PortSet>,
    pub rules: Rules,
    pub connect_timeout: Duration,
    pub log_level: LevelFilter,
    /// `-- COMMAND [ARGS...]`: run it in a fresh cgroup and intercept only that.
    pub command: Vec<String>,
    /// --user: run COMMAND as this user.
    pub user: Option<String>,
    /// -u: dial destinations through this SOCKS5 or HTTP CONNECT proxy.
    pub upstream: Option<Upstream>,
    /// --drain: on SIGTERM/SIGINT/SIGHUP, how long open connections may take
    /// to finish (after the redirect is detached) before they are reset.
    pub drain: Option<Duration>,
    /// The -u value as given on the command line, whose credentials are
    /// hidden in argv at start-up; None when the URL came from
    /// --upstream-file or the environment.
    pub upstream_arg: Option<String>,
    /// --mark: SO_MARK on every outgoing socket.
    pub mark: Option<u32>,
    /// --preserve-env: what COMMAND run with --user keeps of the environment.
    pub preserve_env: Vec<String>,
    /// --env NAME=VALUE: set in COMMAND's environment.
    pub set_env: Vec<(String, String)>,
    /// Found while parsing; logged once logging is set up.
    pub warnings: Vec<String>,
    /// Names through the proxy: DNS interception, fake addresses, and what
    /// becomes of traffic ktproxy cannot carry.
    pub names: NamesOptions,
}

impl Config {
    /// What the ready line says after the cgroup: "all ports" or "ports
    /// LIST", the destination rules, and the upstream proxy.
    pub fn describe_filters(&self) -> String {
        let mut filters = vec![self
            .ports
            .as_ref()
            .map_or("all ports".to_string(), |p| format!("ports {p}"))];
        if !self.rules.is_empty() {
            filters.push(self.rules.describe());
        }
        if let Some(up) = &self.upstream {
            filters.push(format!("via {}", up.display()));
        }
        filters.join(", ")
    }
}

#[derive(Debug)]
pub enum Action {
    Run(Box<Config>),
    Help(String),
    Version,
}

/// Parses `args`, the command line after the program name; the upstream URL
/// may also come from $KTPROXY_UPSTREAM.
pub fn parse(args: &[String]) -> Result<Action> {
    let from_env = match std::env::var(UPSTREAM_ENV) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(Error::usage(format!("{UPSTREAM_ENV}: not valid UTF-8")))
        }
    };
    parse_with(args, from_env)
}

/// `parse`, with the value of $KTPROXY_UPSTREAM given.
fn parse_with(args: &[String], upstream_env: Option<String>) -> Result<Action> {
    let m = options()
        .parse(args)
        .map_err(|e| Error::usage(format!("{e} (see ktproxy --help)")))?;
    if m.opt_present("h") {
        return Ok(Action::Help(help()));
    }
    if m.opt_present("V") {
        return Ok(Action::Version);
    }
    let command = m.free.clone();
    if !command.is_empty() && m.opt_present("c") {
        return Err(Error::usage(
            "-c/--cgroup and COMMAND exclude each other: with COMMAND, ktproxy intercepts a cgroup \
             of its own",
        ));
    }
    let user = m.opt_str("user");
    if user.is_some() && command.is_empty() {
        return Err(Error::usage("--user goes with -- COMMAND"));
    }

    let mut listen_args = m.opt_strs("l");
    let listen_defaulted = listen_args.is_empty();
    if listen_defaulted {
        // With COMMAND, free ports: several invocations must not collide.
        let port = if command.is_empty() { "8999" } else { "0" };
        listen_args.extend(DEFAULT_LISTEN.iter().map(|s| s.replace("8999", port)));
    }
    let listen = parse_listen(&listen_args)?;

    let cgroup = m.opt_str("c").map(PathBuf::from);
    if cgroup.as_deref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err(Error::usage("-c/--cgroup: empty path"));
    }

    let ports = m.opt_str("p").map(|s| PortSet::parse(&s)).transpose()?;

    let mut rules = Rules::default();
    Rules::add_args(&mut rules.dest, "-d/--dest", &m.opt_strs("d"))?;
    Rules::add_args(&mut rules.exclude, "-x/--exclude", &m.opt_strs("x"))?;
    for f in m.opt_strs("dest-file") {
        Rules::add_file(&mut rules.dest, "--dest-file", f.as_ref())?;
    }
    for f in m.opt_strs("exclude-file") {
        Rules::add_file(&mut rules.exclude, "--exclude-file", f.as_ref())?;
    }
    rules.dest_given = m.opt_present("d") || m.opt_present("dest-file");

    let connect_timeout = match m.opt_str("connect-timeout") {
        None => Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECS),
        Some(s) => match s.parse::<f64>() {
            Ok(secs) if secs > 0.0 && secs <= 3600.0 => Duration::from_secs_f64(secs),
            _ => {
                return Err(Error::usage(format!(
                    "--connect-timeout: invalid value '{s}': expected seconds between 0 and 3600"
                )))
            }
        },
    };

    let drain = m.opt_str("drain").map(|s| parse_drain(&s)).transpose()?;
    let mut warnings = Vec::new();
    let (upstream, upstream_arg) = parse_upstream(&m, upstream_env, &mut warnings)?;
    let (mark, preserve_env, set_env) = parse_security(&m, user.is_some(), !command.is_empty())?;
    let names = parse_names(&m, &command, cgroup.is_some(), upstream.as_ref(), &listen)?;

    let verbose = m.opt_count("v");
    if verbose > 0 && m.opt_present("q") {
        return Err(Error::usage("-q and -v contradict each other"));
    }
    // COMMAND's own output comes first: one -v less by default.
    let levels = [LevelFilter::Info, LevelFilter::Debug, LevelFilter::Trace];
    let verbose = if command.is_empty() {
        verbose + 1
    } else {
        verbose
    };
    let log_level = match (m.opt_present("q"), verbose) {
        (true, _) | (false, 0) => LevelFilter::Warn,
        (false, v) => levels[(v - 1).min(levels.len() - 1)],
    };

    Ok(Action::Run(Box::new(Config {
        listen,
        listen_defaulted,
        cgroup,
        ports,
        rules,
        connect_timeout,
        log_level,
        command,
        user,
        upstream,
        drain,
        upstream_arg,
        mark,
        preserve_env,
        set_env,
        warnings,
        names,
    })))
}

fn parse_drain(s: &str) -> Result<Duration> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..=3600.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(Error::usage(format!(
            "--drain: invalid value '{s}': expected seconds between 0 and 3600"
        ))),
    }
}

fn parse_listen(args: &[String]) -> Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in args {
        let addr: SocketAddr = a.parse().map_err(|_| {
            Error::usage(format!(
                "-l/--listen: invalid address '{a}': expected IP:PORT, e.g. 127.0.0.1:8999 or [::1]:8999"
            ))
        })?;
        if addr.ip().is_unspecified() {
            return Err(Error::usage(format!(
                "-l/--listen: '{a}' would expose the proxy on every interface; \
                 give the local address connections are redirected to, e.g. 127.0.0.1:{}",
                addr.port()
            )));
        }
        if let IpAddr::V6(ip) = addr.ip() {
            if ip.to_ipv4_mapped().is_some() {
                return Err(Error::usage(format!(
                    "-l/--listen: '{a}' is an IPv4-mapped address; write it as IPv4"
                )));
            }
        }
        if out.iter().any(|o| o.is_ipv4() == addr.is_ipv4()) {
            return Err(Error::usage(format!(
                "-l/--listen: '{a}': at most one listen address per address family"
            )));
        }
        out.push(addr);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    pub(super) fn run(a: &[&str]) -> Config {
        match parse_with(&args(a), None).expect("parses") {
            Action::Run(c) => *c,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    pub(super) fn usage_error(a: &[&str]) -> String {
        let e = parse_with(&args(a), None).expect_err("must be rejected");
        assert_eq!(e.exit_code(), 2, "{e}");
        e.to_string()
    }

    #[test]
    fn defaults_listen_on_both_loopbacks_8999_for_every_port_and_cgroup() {
        let c = run(&[]);
        assert_eq!(
            c.listen,
            vec![
                "127.0.0.1:8999".parse().unwrap(),
                "[::1]:8999".parse().unwrap()
            ]
        );
        assert!(c.listen_defaulted);
        assert!(c.cgroup.is_none());
        assert!(c.ports.is_none());
        assert!(c.rules.is_empty());
        assert_eq!(c.log_level, LevelFilter::Info);
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn long_and_short_options_are_equivalent() {
        let a = run(&["-l", "127.0.0.2:1000", "-c", "/x", "-p", "80", "-v"]);
        let b = run(&[
            "--listen",
            "127.0.0.2:1000",
            "--cgroup",
            "/x",
            "--ports",
            "80",
            "--verbose",
        ]);
        assert_eq!(a.listen, b.listen);
        assert_eq!(a.cgroup, b.cgroup);
        assert_eq!(a.log_level, LevelFilter::Debug);
        assert_eq!(b.log_level, LevelFilter::Debug);
    }

    #[test]
    fn verbosity_levels() {
        assert_eq!(run(&["-vv"]).log_level, LevelFilter::Trace);
        assert_eq!(run(&["-q"]).log_level, LevelFilter::Warn);
        assert!(usage_error(&["-q", "-v"]).contains("contradict"));
    }

    #[test]
    fn one_listen_address_per_family() {
        let c = run(&["-l", "127.0.0.1:1", "-l", "[::1]:2"]);
        assert_eq!(c.listen.len(), 2);
        assert!(!c.listen_defaulted);
        assert_eq!(
            run(&["-l", "[::1]:9"]).listen,
            vec!["[::1]:9".parse().unwrap()]
        );
        assert!(
            usage_error(&["-l", "127.0.0.1:1", "-l", "127.0.0.2:2"]).contains("per address family")
        );
    }

    #[test]
    fn bad_listen_addresses_are_named() {
        assert!(usage_error(&["-l", "localhost"]).contains("'localhost'"));
        assert!(usage_error(&["-l", "127.0.0.1"]).contains("expected IP:PORT"));
        assert!(usage_error(&["-l", "127.0.0.1:70000"]).contains("invalid address"));
        assert!(usage_error(&["-l", "0.0.0.0:8999"]).contains("every interface"));
        assert!(usage_error(&["-l", "[::ffff:127.0.0.1]:1"]).contains("IPv4-mapped"));
    }

    #[test]
    fn ready_line_filters_name_ports_rules_and_upstream() {
        assert_eq!(run(&[]).describe_filters(), "all ports");
        let c = run(&[
            "-p",
            "80,443",
            "-d",
            "10.0.0.0/8",
            "-x",
            "10.1.0.0/16",
            "-u",
            "socks5://127.0.0.1:1080",
        ]);
        assert_eq!(
            c.describe_filters(),
            "ports 80,443, 1 destination rule(s), 1 exclusion(s), via socks5://127.0.0.1:1080"
        );
    }

    #[test]
    fn destination_rules_from_options() {
        let c = run(&[
            "-d",
            "10.0.0.0/8",
            "--dest",
            "2001:db8::/32",
            "-x",
            "10.1.0.0/16",
        ]);
        assert_eq!(c.rules.dest.len(), 2);
        assert_eq!(c.rules.exclude.len(), 1);
        assert!(c.rules.dest_given);
        assert!(usage_error(&["-d", "10.0.0.0/40"]).starts_with("-d/--dest: '10.0.0.0/40'"));
        assert!(usage_error(&["-x", "bogus"]).starts_with("-x/--exclude: 'bogus'"));
        assert!(usage_error(&["--dest-file", "/nonexistent"]).contains("cannot read /nonexistent"));
    }

    #[test]
    fn command_mode_takes_everything_after_the_first_free_argument() {
        let c = run(&["-v", "--", "curl", "-s", "http://x/"]);
        assert_eq!(c.command, ["curl", "-s", "http://x/"]);
        assert_eq!(c.log_level, LevelFilter::Info);
        let c = run(&["curl", "-v"]);
        assert_eq!(c.command, ["curl", "-v"]);
        assert_eq!(
            c.log_level,
            LevelFilter::Warn,
            "quiet by default with COMMAND"
        );
        assert_eq!(
            c.listen,
            vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()],
            "free ports by default with COMMAND"
        );
        let c = run(&["--user", "nobody", "--", "id"]);
        assert_eq!(c.user.as_deref(), Some("nobody"));
    }

    #[test]
    fn command_mode_conflicts_are_usage_errors() {
        assert!(usage_error(&["-c", "/x", "--", "true"]).contains("exclude each other"));
        assert!(usage_error(&["--user", "nobody"]).contains("goes with -- COMMAND"));
    }

    #[test]
    fn unknown_options_are_usage_errors() {
        assert!(usage_error(&["-c"]).contains("c"));
        assert!(usage_error(&["--connect-timeout", "0"]).contains("--connect-timeout"));
    }

    #[test]
    fn drain_takes_seconds_up_to_an_hour() {
        assert_eq!(run(&[]).drain, None);
        assert_eq!(run(&["--drain", "5"]).drain, Some(Duration::from_secs(5)));
        assert_eq!(
            run(&["--drain", "0.5"]).drain,
            Some(Duration::from_millis(500))
        );
        assert_eq!(run(&["--drain", "0"]).drain, Some(Duration::ZERO));
        for bad in ["-1", "3601", "soon", "nan"] {
            assert!(usage_error(&["--drain", bad]).contains("--drain: invalid value"));
        }
    }
}
