//! ktproxy: a transparent TCP proxy. eBPF programs redirect connect() to it
//! in the kernel; it recovers the original destination with
//! getsockopt(SO_ORIGINAL_DST), dials it and relays the bytes with splice(2).
//!
//! Start-up order matters and is all here: check privileges and arguments,
//! enter ktproxy's own cgroup, bind the listeners, load the programs with
//! their configuration, attach them (the redirect last), accept. Everything
//! acquired is released in reverse by `Drop` on any error, so a failed start
//! leaves nothing attached or created behind.

mod bpf;
mod cgroup;
mod cli;
mod command;
mod conn;
mod error;
mod pipes;
mod preflight;
mod relay;
mod rules;
mod server;
mod sys;
mod upstream;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{info, warn, LevelFilter};
use nix::sys::signal::{SigSet, Signal};

use crate::cli::{Action, Config};
use crate::error::{Context, Error, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match cli::parse(&args) {
        Ok(Action::Help(text)) => {
            print!("{text}");
            0
        }
        Ok(Action::Version) => {
            println!("ktproxy {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Action::Run(cfg)) => match run(*cfg) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ktproxy: error: {e}");
                e.exit_code()
            }
        },
        Err(e) => {
            eprintln!("ktproxy: {e}");
            e.exit_code()
        }
    };
    // Connection threads may still be relaying: exiting closes their sockets.
    std::process::exit(code);
}

/// Returns the exit status: 0, or COMMAND's.
fn run(cfg: Config) -> Result<i32> {
    init_logging(cfg.log_level);
    preflight::check_privileges()?;
    preflight::check_kernel()?;

    let root = cgroup::root()?;
    let given = cfg.cgroup.as_deref().map(cgroup::check_dir).transpose()?;
    let user = cfg.user.as_deref().map(command::resolve_user).transpose()?;
    let fd_limit = preflight::raise_fd_limit();
    preflight::raise_memlock_limit();
    let (capacity, limited_by) = preflight::connection_capacity(fd_limit);
    // Below a few thousand, busy machines hit it; the ready line always says.
    if capacity < 4096 {
        warn!("{limited_by} caps ktproxy at about {capacity} concurrent connections");
    }

    // Blocked before any thread starts, so that every thread inherits the
    // mask and only the main thread's sigwait() sees these signals. SIGQUIT
    // (Ctrl-\) is only taken over when COMMAND is there to receive it, and
    // SIGCHLD only matters then.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    if !cfg.command.is_empty() {
        signals.add(Signal::SIGQUIT);
        signals.add(Signal::SIGCHLD);
    }
    signals.thread_block().context("blocking signals")?;

    // Declared in acquisition order; dropped in reverse on any return.
    let own = cgroup::OwnCgroup::enter(&root)?;
    let command_cgroup = if cfg.command.is_empty() {
        None
    } else {
        Some(cgroup::CommandCgroup::create(&own)?)
    };
    let intercepted = match (&command_cgroup, given) {
        (Some(c), _) => c.path().to_path_buf(),
        (None, Some(p)) => p,
        (None, None) => root.clone(),
    };
    let listeners = bind_listeners(&cfg)?;
    let bound: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()
        .context("reading the listen address")?;
    let first = listeners
        .first()
        .ok_or_else(|| Error::new("no listen address could be bound"))?;
    let netns_cookie = sys::netns_cookie(first.as_raw_fd())
        .context("reading the network namespace cookie (SO_NETNS_COOKIE needs Linux >= 5.14)")?;

    let kcfg = bpf::KernelConfig {
        proxy_cgroup_id: own.id(),
        proxy_netns_cookie: netns_cookie,
        listen4: bound.iter().find_map(|a| match a {
            SocketAddr::V4(a) => Some(*a),
            SocketAddr::V6(_) => None,
        }),
        listen6: bound.iter().find_map(|a| match a {
            SocketAddr::V6(a) => Some(*a),
            SocketAddr::V4(_) => None,
        }),
        ports: cfg.ports.as_ref(),
        rules: &cfg.rules,
    };
    for (missing, family) in [
        (kcfg.listen4.is_none(), "IPv4"),
        (kcfg.listen6.is_none(), "IPv6"),
    ] {
        if missing {
            info!("{family} connections are not intercepted: no {family} listen address");
        }
    }
    let redirect = bpf::Redirect::start(&kcfg, &intercepted, own.path())?;

    if let Some(up) = &cfg.upstream {
        if command_cgroup.is_none() && is_local(&up.addr()) {
            warn!(
                "the upstream proxy {} is on this machine: unless it runs outside {}, its own \
                 connections are intercepted too and loop back into ktproxy (use -c or -- COMMAND)",
                up.display(),
                intercepted.display()
            );
        }
    }
    let shared = Arc::new(conn::Shared::new(
        bound.clone(),
        cfg.connect_timeout,
        cfg.upstream.clone(),
    ));
    for l in listeners {
        server::start(l, Arc::clone(&shared))?;
    }
    info!(
        "ktproxy ready: listening on {}, intercepting {}, {} (own cgroup {}; room for about \
         {capacity} connections, limited by {limited_by})",
        bound
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        if intercepted == root {
            format!("every process (cgroup v2 root {})", root.display())
        } else {
            format!("cgroup {}", intercepted.display())
        },
        describe_filters(&cfg),
        own.path().display()
    );

    let code = match &command_cgroup {
        Some(cg) => {
            let child = command::spawn(&cfg.command, cg, user.as_ref())?;
            let code = command::supervise(child, cg, &signals)?;
            info!("COMMAND exited with status {code}: shutting down");
            code
        }
        None => {
            let sig = signals.wait().context("waiting for signals")?;
            info!("{sig}: shutting down");
            0
        }
    };
    let counters = redirect.stats();
    drop(redirect);
    drop(command_cgroup);
    drop(own);
    let summary: Vec<String> = bpf::STAT_NAMES
        .iter()
        .zip(counters)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    info!("detached; kernel counters: {}", summary.join(" "));
    Ok(code)
}

fn is_local(addr: &SocketAddr) -> bool {
    // Binding to an address succeeds only if it is one of ours.
    addr.ip().is_loopback() || std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).is_ok()
}

fn describe_filters(cfg: &Config) -> String {
    let mut filters = vec![cfg
        .ports
        .as_ref()
        .map_or("all ports".to_string(), |p| format!("ports {p}"))];
    if !cfg.rules.is_empty() {
        filters.push(cfg.rules.describe());
    }
    if let Some(up) = &cfg.upstream {
        filters.push(format!("via {}", up.display()));
    }
    filters.join(", ")
}

/// Binds every -l address. The default IPv6 listener is optional: a host
/// without IPv6 loopback gets IPv4 only, with a warning.
fn bind_listeners(cfg: &Config) -> Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        match sys::listen(addr, 4096) {
            Ok(l) => listeners.push(l),
            Err(e)
                if cfg.listen_defaulted
                    && addr.is_ipv6()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) =>
            {
                warn!(
                    "no IPv6 loopback on this host ({}): listening on IPv4 only, IPv6 connections are not intercepted",
                    error::io_text(&e)
                );
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
        }
    }
    Ok(listeners)
}

fn init_logging(level: LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .build();
    // SAFETY: isatty only inspects the descriptor.
    let colors = if unsafe { libc::isatty(libc::STDERR_FILENO) } == 1 {
        simplelog::ColorChoice::Auto
    } else {
        simplelog::ColorChoice::Never
    };
    let logger = simplelog::TermLogger::new(level, config, simplelog::TerminalMode::Stderr, colors);
    if simplelog::CombinedLogger::init(vec![logger]).is_err() {
        eprintln!("ktproxy: logger already initialised");
    }
}
