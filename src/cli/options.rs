//! The option table and the `--help` text: everything a user reads about
//! the options, in the order `--help` (and the man page) lists them.

use getopts::Options;

use crate::dns::DEFAULT_FAKE_NET;

pub(super) fn options() -> Options {
    let mut o = Options::new();
    // Options end at COMMAND: `ktproxy -v curl -s URL` passes -s to curl.
    o.parsing_style(getopts::ParsingStyle::StopAtFirstFree);
    // Listening and scope.
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
    // The upstream proxy and the outgoing connections.
    o.optopt(
        "u",
        "upstream",
        "open every intercepted connection through this proxy: socks5://[user:pass@]host:port \
         or http://[user:pass@]host:port (HTTP CONNECT)",
        "URL",
    );
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
        "connect-timeout",
        "give up dialing a destination (or the upstream proxy, and its handshake) after this \
         many seconds (default 10)",
        "SECS",
    );
    o.optopt(
        "",
        "mark",
        "set this firewall mark (SO_MARK) on every outgoing connection, to the destination or \
         to the upstream proxy, e.g. for rules that must recognise ktproxy's traffic \
         (decimal or 0x hex)",
        "N",
    );
    // Names (DNS).
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
    // Command mode.
    o.optopt(
        "",
        "user",
        "with COMMAND: run it as this user, in a session and on a terminal of its own, with a \
         fresh environment (ktproxy itself needs root)",
        "NAME",
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
    // Run time.
    o.optopt(
        "",
        "drain",
        "on SIGTERM, SIGINT or SIGHUP, stop intercepting at once but give open connections up \
         to this many seconds to finish; those still open then are reset, as they are at once \
         without --drain (a second signal ends the wait; with COMMAND, the wait starts when \
         COMMAND and what it started have exited, default 1)",
        "SECS",
    );
    o.optflagmulti(
        "v",
        "verbose",
        "more logging (-vv for per-syscall tracing; with COMMAND, where the default is \
         warnings only, -v shows connections and -vvv traces)",
    );
    o.optflag("q", "quiet", "log warnings and errors only");
    o.optflag("h", "help", "print this help");
    o.optflag("V", "version", "print the version");
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

#[cfg(test)]
mod tests {
    use crate::cli::tests::args;
    use crate::cli::{parse, Action};

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
}
