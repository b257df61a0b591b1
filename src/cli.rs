//! Command-line parsing: turns argv into a `Config`, or a one-line usage error.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use getopts::Options;
use log::LevelFilter;

use crate::dns::{self, FakeNet, DEFAULT_FAKE_NET};
use crate::error::{Error, Result};
use crate::rules::{PortSet, Rules};
use crate::secret::{self, UPSTREAM_ENV};
use crate::upstream::Upstream;

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
    /// --relay: how established connections are relayed.
    pub relay: Relay,
}

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

/// `--relay`: who moves the bytes of an established connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// ktproxy's connection thread, with splice(2) through pipes.
    Splice,
    /// The kernel: a BPF sockhash and stream verdict program (src/sockmap.rs).
    Sockmap,
}

impl Relay {
    /// Measured in scripts/bench.sh on Linux 6.18: splice relays new
    /// connections at about twice sockmap's rate (README, Performance).
    pub const DEFAULT: Relay = Relay::Splice;

    pub fn name(self) -> &'static str {
        match self {
            Relay::Splice => "splice",
            Relay::Sockmap => "sockmap",
        }
    }

    fn parse(s: &str) -> Result<Relay> {
        match s {
            "splice" => Ok(Relay::Splice),
            "sockmap" => Ok(Relay::Sockmap),
            _ => Err(Error::usage(format!(
                "--relay: invalid value '{s}': expected sockmap or splice"
            ))),
        }
    }
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

fn options() -> Options {
    let mut o = Options::new();
    // Options end at COMMAND: `ktproxy -v curl -s URL` passes -s to curl.
    o.parsing_style(getopts::ParsingStyle::StopAtFirstFree);
    o.optmulti(
        "l",
        "listen",
        "where the proxy listens, once per address family: IPv4 connects go to the IPv4 \
         listener, IPv6 ones to the IPv6 listener; a family without one is not intercepted \
         (default 127.0.0.1:8999 and [::1]:8999); port 0 picks a free port",
        "ADDR:PORT",
    );
    o.optopt(
        "c",
        "cgroup",
        "intercept connect() of processes in this cgroup v2 directory \
         (default: the whole cgroup v2 hierarchy = every process on the machine)",
        "PATH",
    );
    o.optopt(
        "p",
        "ports",
        "intercept only these destination ports, e.g. 80,443,8000-8999 (default all)",
        "LIST",
    );
    o.optmulti(
        "d",
        "dest",
        "intercept only these destinations (repeatable; IPv4 or IPv6 CIDR or address; \
         default all)",
        "CIDR",
    );
    o.optmulti(
        "x",
        "exclude",
        "never intercept these destinations (repeatable; wins over -d and -p)",
        "CIDR",
    );
    o.optmulti(
        "",
        "dest-file",
        "like -d, one CIDR per line, # comments (repeatable)",
        "FILE",
    );
    o.optmulti(
        "",
        "exclude-file",
        "like -x, one CIDR per line, # comments (repeatable)",
        "FILE",
    );
    o.optopt(
        "u",
        "upstream",
        "open every intercepted connection through this proxy: socks5://[user:pass@]host:port \
         or http://[user:pass@]host:port (HTTP CONNECT)",
        "URL",
    );
    o.optopt(
        "",
        "connect-timeout",
        "give up dialing a destination (or the upstream proxy, and its handshake) after this \
         many seconds (default 10)",
        "SECS",
    );
    o.optopt(
        "",
        "user",
        "with COMMAND: run it as this user, in a session and on a terminal of its own, with a \
         fresh environment (ktproxy itself needs root)",
        "NAME",
    );
    options_security(&mut o);
    o.optflagmulti(
        "v",
        "verbose",
        "more logging (-vv for per-syscall tracing; with COMMAND, where the default is \
         warnings only, -v shows connections and -vvv traces)",
    );
    o.optflag("q", "quiet", "log warnings and errors only");
    o.optflag(
        "",
        "proxy-dns",
        "answer the intercepted processes' DNS (UDP and TCP port 53, any server) with fake \
         addresses, and give the upstream the name, not an address (default: on with -u in \
         command mode and with -c; not allowed without -c or COMMAND)",
    );
    o.optflag(
        "",
        "no-proxy-dns",
        "leave DNS alone: processes resolve names themselves and ktproxy sees addresses only",
    );
    o.optopt(
        "",
        "fake-net",
        &format!(
            "the IPv4 range fake addresses come from (default {DEFAULT_FAKE_NET}); connects to \
             it are always intercepted"
        ),
        "CIDR",
    );
    o.optmulti(
        "",
        "direct-domain",
        "resolve names under this suffix for real (from ktproxy itself, not through the \
         upstream) and give the client the real addresses, e.g. .lan (repeatable)",
        "SUFFIX",
    );
    o.optmulti(
        "",
        "direct-domain-file",
        "like --direct-domain, one suffix per line, # comments (repeatable)",
        "FILE",
    );
    o.optopt(
        "",
        "dns-forward",
        "the resolver for query types other than A, AAAA, HTTPS and PTR (MX, TXT, SRV...), asked \
         over TCP, through the upstream with -u (default: the first nameserver of ktproxy's \
         /etc/resolv.conf, with -u the first one not on loopback)",
        "IP[:PORT]",
    );
    o.optflag(
        "",
        "allow-direct",
        "in command mode with -u: let UDP other than DNS, and connects ktproxy cannot proxy \
         (no listener for the family, link-local IPv6), go out directly instead of failing \
         with EPERM",
    );
    o.optflag("h", "help", "print this help");
    o.optflag("V", "version", "print the version");
    o.optopt(
        "",
        "drain",
        "on SIGTERM, SIGINT or SIGHUP, stop intercepting at once but give open connections up \
         to this many seconds to finish; those still open then are reset, as they are at once \
         without --drain (a second signal ends the wait; with COMMAND, the wait starts when \
         COMMAND and what it started have exited, default 1)",
        "SECS",
    );
    o.optopt(
        "",
        "relay",
        &format!(
            "how established connections are relayed: splice (ktproxy's thread, splice(2) \
             through pipes) or sockmap (the kernel: a BPF sockhash and stream verdict program \
             send each side's data to the other while the thread sleeps; a connection the \
             kernel refuses, or a kernel without it, is spliced) (default {})",
            Relay::DEFAULT.name()
        ),
        "KIND",
    );
    o
}

pub fn help() -> String {
    let brief = "Usage: ktproxy [OPTIONS]\n       ktproxy [OPTIONS] -- COMMAND [ARGS...]\n\n\
        Transparent TCP proxy. eBPF programs in the kernel redirect the connect() calls of\n\
        the processes in a cgroup to ktproxy, which dials the original destination and relays\n\
        the bytes with splice(2). Applications need no proxy settings. Needs root (CAP_BPF and\n\
        CAP_NET_ADMIN) and cgroup v2. Stopping ktproxy (even kill -9) detaches everything.\n\n\
        With COMMAND, ktproxy runs it in a new cgroup of its own, intercepts only that (and\n\
        everything COMMAND forks), listens on free ports, and exits with COMMAND's status.";
    let mut text = options().usage(brief);
    text.push_str(
        "\nWhat is intercepted: TCP connects (IPv4, IPv6, and IPv4-mapped ::ffff:a.b.c.d on IPv6\n\
         sockets, which are dialed as IPv4) by processes in the cgroup, in ktproxy's own network\n\
         namespace, to destinations allowed by -p, -d and -x: a destination must match -p (if\n\
         given) and -d (if given) and must not match -x. Never intercepted: ktproxy's own\n\
         connections, connects to its listen address, other network namespaces, UDP other than\n\
         DNS.\n\
         \n\
         Names (with --proxy-dns, the default with -u and COMMAND or -c): DNS queries to any\n\
         server get fake addresses from --fake-net; a connect to one reaches ktproxy, which asks\n\
         the upstream for the name (SOCKS5 domain name, HTTP CONNECT name:port), or resolves it\n\
         itself without -u. A/AAAA/HTTPS/PTR are answered by ktproxy, other types forwarded\n\
         (--dns-forward). /etc/hosts still works. In command mode with -u nothing leaks: UDP\n\
         other than DNS and connects that cannot be proxied fail with EPERM (--allow-direct).\n\
         \n\
         What the client sees: getpeername() on an intercepted socket returns the destination it\n\
         dialed, not the proxy (TLS libraries and logs keep working). getsockname() shows the\n\
         loopback address the redirect really uses.\n\
         \n\
         Examples:\n\
         \x20 sudo ktproxy                                   intercept every process on the machine\n\
         \x20 sudo ktproxy -c /sys/fs/cgroup/app -p 80,443   only processes in one cgroup, web ports\n\
         \x20 sudo ktproxy -d 10.0.0.0/8 -x 10.0.0.53        a network, except one host\n\
         \x20 sudo ktproxy -l [::1]:8999                     IPv6 only\n\
         \x20 sudo ktproxy -l 127.0.0.1:0 -v                 any free port, debug logging\n\
         \x20 sudo ktproxy -u socks5://127.0.0.1:1080 -- go run .   one command through a SOCKS5 proxy\n\
         \n\
         Debugging: `bpftool cgroup tree` shows what ktproxy attached, `bpftool map dump name stats`\n\
         its counters, `ss -tnp` the proxied connections.\n\
         \n\
         Security: the upstream URL may come from --upstream-file or $KTPROXY_UPSTREAM instead of\n\
         -u (whose credentials ktproxy hides in its command line at start-up). Each outgoing\n\
         connection is created as the uid and gid of the client that dialed (firewall rules on\n\
         `meta skuid` or `-m owner` keep applying). With --user, COMMAND runs in a new session on\n\
         a terminal of its own, with the caller's resource limits and a reset environment.\n",
    );
    text
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
    let relay = m
        .opt_str("relay")
        .map(|r| Relay::parse(&r))
        .transpose()?
        .unwrap_or(Relay::DEFAULT);

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
        relay,
    })))
}

/// Issue 11's options: where the upstream URL comes from, --mark, and
/// COMMAND's environment.
fn options_security(o: &mut Options) {
    o.optopt(
        "",
        "upstream-file",
        "like -u, with the URL read from this file (one line, # comments): its credentials stay \
         out of the command line, which every local user can read (ps); ktproxy warns if the \
         file's group or others may read it. Without -u and --upstream-file, the URL comes from \
         $KTPROXY_UPSTREAM if that is set",
        "PATH",
    );
    o.optopt(
        "",
        "mark",
        "set this firewall mark (SO_MARK) on every outgoing connection, to the destination or \
         to the upstream proxy, e.g. for rules that must recognise ktproxy's traffic \
         (decimal or 0x hex)",
        "N",
    );
    o.optmulti(
        "",
        "preserve-env",
        "with --user: also pass these variables of ktproxy's environment to COMMAND \
         (comma-separated, repeatable). Otherwise COMMAND gets only HOME, USER, LOGNAME, SHELL, \
         PATH and TERM",
        "NAMES",
    );
    o.optmulti(
        "",
        "env",
        "with COMMAND: set this variable in its environment (repeatable)",
        "NAME=VALUE",
    );
}

/// -u, --upstream-file or $KTPROXY_UPSTREAM, in that order: the upstream,
/// and the -u text when that is where it came from.
fn parse_upstream(
    m: &getopts::Matches,
    from_env: Option<String>,
    warnings: &mut Vec<String>,
) -> Result<(Option<Upstream>, Option<String>)> {
    match (m.opt_str("u"), m.opt_str("upstream-file")) {
        (Some(_), Some(_)) => Err(Error::usage(
            "-u/--upstream and --upstream-file exclude each other",
        )),
        (Some(url), None) => Ok((Some(Upstream::parse(&url)?), Some(url))),
        (None, Some(path)) => {
            let (url, warning) = secret::read_upstream_file(path.as_ref())?;
            warnings.extend(warning);
            let up = Upstream::parse_from(&url, &format!("--upstream-file {path}"))?;
            Ok((Some(up), None))
        }
        (None, None) => match from_env.filter(|v| !v.trim().is_empty()) {
            Some(url) => Ok((Some(Upstream::parse_from(url.trim(), UPSTREAM_ENV)?), None)),
            None => Ok((None, None)),
        },
    }
}

type SecurityOptions = (Option<u32>, Vec<String>, Vec<(String, String)>);

/// --mark, --preserve-env and --env.
fn parse_security(m: &getopts::Matches, user: bool, command: bool) -> Result<SecurityOptions> {
    let mark = m.opt_str("mark").map(|s| parse_mark(&s)).transpose()?;
    let mut preserve = Vec::new();
    for list in m.opt_strs("preserve-env") {
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            check_env_name("--preserve-env", name)?;
            preserve.push(name.to_string());
        }
    }
    if !preserve.is_empty() && !user {
        return Err(Error::usage(
            "--preserve-env goes with --user (without it, COMMAND keeps the whole environment)",
        ));
    }
    let mut set = Vec::new();
    for pair in m.opt_strs("env") {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| Error::usage(format!("--env: '{pair}': expected NAME=VALUE")))?;
        check_env_name("--env", name)?;
        if value.contains('\0') {
            return Err(Error::usage(format!(
                "--env {name}: value contains a NUL byte"
            )));
        }
        set.push((name.to_string(), value.to_string()));
    }
    if !set.is_empty() && !command {
        return Err(Error::usage("--env goes with -- COMMAND"));
    }
    Ok((mark, preserve, set))
}

fn parse_mark(s: &str) -> Result<u32> {
    let n = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    match n {
        Ok(n) if n != 0 && !s.starts_with('+') => Ok(n),
        _ => Err(Error::usage(format!(
            "--mark: invalid value '{s}': expected a number from 1 to 4294967295 (or 0x1 to \
             0xffffffff)"
        ))),
    }
}

fn check_env_name(option: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(Error::usage(format!(
            "{option}: invalid variable name '{name}'"
        )));
    }
    Ok(())
}

fn parse_drain(s: &str) -> Result<Duration> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..=3600.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(Error::usage(format!(
            "--drain: invalid value '{s}': expected seconds between 0 and 3600"
        ))),
    }
}

/// The names options and their per-mode defaults: DNS is on with an
/// upstream in command mode and with -c, off without one (--proxy-dns turns
/// it on), and never for the whole machine, whose own resolver must keep
/// working (fake addresses outlive ktproxy in caches). Nothing leaks in
/// command mode with an upstream unless --allow-direct says so.
fn parse_names(
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

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn run(a: &[&str]) -> Config {
        match parse_with(&args(a), None).expect("parses") {
            Action::Run(c) => *c,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn usage_error(a: &[&str]) -> String {
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
    fn relay_is_splice_by_default_and_sockmap_on_request() {
        assert_eq!(run(&[]).relay, Relay::Splice);
        assert_eq!(run(&["--relay", "sockmap"]).relay, Relay::Sockmap);
        assert_eq!(run(&["--relay=splice"]).relay, Relay::Splice);
        let e = usage_error(&["--relay", "kernel"]);
        assert!(e.starts_with("--relay: invalid value 'kernel'"), "{e}");
        assert!(help().contains("--relay KIND"));
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

    #[test]
    fn help_and_version() {
        assert!(
            matches!(parse(&args(&["-h"])).unwrap(), Action::Help(t) if t.contains("--listen"))
        );
        let Action::Help(text) = parse(&args(&["--help"])).unwrap() else {
            panic!("no help")
        };
        for flag in [
            "--proxy-dns",
            "--no-proxy-dns",
            "--fake-net",
            "--direct-domain ",
            "--direct-domain-file",
            "--dns-forward",
            "--allow-direct",
        ] {
            assert!(text.contains(flag), "--help documents {flag}");
        }
        assert!(matches!(
            parse(&args(&["--version"])).unwrap(),
            Action::Version
        ));
    }

    fn run_env(a: &[&str], env: &str) -> Config {
        match parse_with(&args(a), Some(env.to_string())).expect("parses") {
            Action::Run(c) => *c,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn upstream_comes_from_u_then_upstream_file_then_the_environment() {
        let c = run_env(&[], "socks5://t0ken@127.0.0.1:1080");
        assert_eq!(
            c.upstream.as_ref().unwrap().display(),
            "socks5://***@127.0.0.1:1080"
        );
        assert_eq!(c.upstream_arg, None, "nothing to hide in argv");
        let c = run_env(
            &["-u", "http://a:b@127.0.0.1:3128"],
            "socks5://127.0.0.1:1080",
        );
        assert_eq!(
            c.upstream.as_ref().unwrap().display(),
            "http://***@127.0.0.1:3128"
        );
        assert_eq!(c.upstream_arg.as_deref(), Some("http://a:b@127.0.0.1:3128"));
        assert!(run_env(&[], "  ").upstream.is_none(), "empty means unset");

        let e = parse_with(&args(&[]), Some("socks9://t0ken@h:1".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("KTPROXY_UPSTREAM: invalid URL 'socks9://***@h:1'"),
            "{e}"
        );
        assert!(
            usage_error(&["-u", "socks5://h:1", "--upstream-file", "/x"])
                .contains("exclude each other")
        );

        let path = std::env::temp_dir().join(format!("ktproxy-cli-{}", std::process::id()));
        std::fs::write(&path, "socks5://t0ken@h:0\n").unwrap();
        let file = path.to_str().unwrap();
        let e = usage_error(&["--upstream-file", file]);
        assert_eq!(
            e,
            format!("--upstream-file {file}: invalid URL 'socks5://***@h:0': invalid port '0'")
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn mark_is_decimal_or_hex_and_not_zero() {
        assert_eq!(run(&[]).mark, None);
        assert_eq!(run(&["--mark", "42"]).mark, Some(42));
        assert_eq!(run(&["--mark", "0x4b50"]).mark, Some(0x4b50));
        assert_eq!(run(&["--mark", "4294967295"]).mark, Some(u32::MAX));
        for bad in ["0", "-1", "+5", "0x", "4294967296", "ten"] {
            assert!(
                usage_error(&["--mark", bad])
                    .starts_with(&format!("--mark: invalid value '{bad}'")),
                "{bad}"
            );
        }
    }

    #[test]
    fn environment_options_go_with_user_and_command() {
        let c = run(&[
            "--user",
            "nobody",
            "--preserve-env",
            "LANG, LC_ALL",
            "--preserve-env=TZ",
            "--env",
            "A=1=2",
            "--",
            "env",
        ]);
        assert_eq!(c.preserve_env, ["LANG", "LC_ALL", "TZ"]);
        assert_eq!(c.set_env, [("A".to_string(), "1=2".to_string())]);
        assert!(usage_error(&["--preserve-env", "LANG", "--", "env"]).contains("goes with --user"));
        assert!(usage_error(&["--env", "A=1"]).contains("goes with -- COMMAND"));
        assert!(usage_error(&["--env", "A", "--", "env"]).contains("expected NAME=VALUE"));
        assert!(usage_error(&["--env", "=1", "--", "env"]).contains("invalid variable name"));
    }
}
