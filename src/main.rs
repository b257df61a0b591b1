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
mod dns;
mod instances;
mod logging;
mod loops;
mod names;
mod notify;
mod nss;
mod pipes;
mod preflight;
mod pty;
mod relay;
mod rules;
mod secret;
mod server;
mod stop;
mod sys;
mod upstream;
mod watchdog;

// Shared with the test helpers, so it lives in the library; imported here
// so that `crate::error::...` names it in every module.
use ktproxy::error;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
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
        Ok(Action::Run(mut cfg)) => {
            // First, while no other thread exists (see the function).
            secret::hide_argv_credentials(&mut cfg);
            let code = match run(*cfg) {
                Ok(code) => code,
                Err(e) => {
                    // Through the logger: stderr may be a pipe nobody reads.
                    logging::plain_line(&format!("ktproxy: error: {e}"));
                    e.exit_code()
                }
            };
            stop::reset_open_connections();
            // Bounded: exit must not wait for a stderr that never drains.
            logging::finish(Duration::from_millis(500));
            code
        }
        Err(e) => {
            eprintln!("ktproxy: {e}");
            e.exit_code()
        }
    };
    // Connection threads may still be relaying: exiting closes their sockets,
    // with a reset (stop::reset_open_connections).
    std::process::exit(code);
}

/// Returns the exit status: 0, or COMMAND's.
fn run(cfg: Config) -> Result<i32> {
    logging::init(cfg.log_level).context("starting the logging thread")?;
    for w in &cfg.warnings {
        warn!("{w}");
    }
    preflight::check_privileges()?;
    preflight::check_kernel()?;
    let root = cgroup::root()?;
    let given = cfg.cgroup.as_deref().map(cgroup::check_dir).transpose()?;
    let user = cfg.user.as_deref().map(command::resolve_user).transpose()?;
    let caller_limits = command::CallerLimits::capture();
    let capacity = raise_limits();
    let signals = block_signals(!cfg.command.is_empty())?;
    let home = cgroup::of_process(&root, "self")?;
    refuse_overlapping_instance(&cfg, &root, given.as_deref(), &home)?;

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
    let bound = local_addrs(&listeners)?;
    let netns_cookie = netns_cookie(&listeners)?;
    let dns = names::start(&cfg, &bound)?;
    let kernel = bpf::KernelConfig::new(&cfg, own.id(), netns_cookie, &bound)
        .with_names(names::kernel(&cfg, dns.as_ref()));
    let redirect = bpf::Redirect::start(&kernel, &intercepted, own.path())?;
    let upstream = upstream_owners(&cfg, &root, &intercepted, kernel.fail_closed(), &redirect);
    let shared = Arc::new(
        conn::Shared::new(
            bound.clone(),
            cfg.connect_timeout,
            cfg.upstream.clone(),
            cfg.mark,
        )
        .with_names(dns),
    );
    let mut acceptors = Vec::new();
    for l in listeners {
        acceptors.push(server::start(l, Arc::clone(&shared), redirect.heartbeat())?);
    }
    let watchdog = watchdog::Watchdog::start(watchdog::Duties {
        redirect,
        acceptors,
        follow_cgroup: (cfg.cgroup.is_some() && command_cgroup.is_none()).then(|| {
            watchdog::Scope {
                root: root.clone(),
                home: home.clone(),
            }
        }),
        upstream,
    })?;
    log_failure_policy(kernel.fail_closed());
    log_ready(&cfg, &bound, &root, &intercepted, own.path(), capacity);
    notify::ready();

    let code = match &command_cgroup {
        Some(cg) => {
            let launch = command::Launch {
                user: user.as_ref(),
                limits: &caller_limits,
                preserve_env: &cfg.preserve_env,
                set_env: &cfg.set_env,
                nss: None,
            };
            run_command(&cfg.command, cg, launch, &signals, cfg.names.dns)?
        }
        None => wait_for_signal(&signals)?,
    };
    notify::stopping();
    let redirect = watchdog.stop()?;
    let counters = redirect.counters();
    drop(redirect);
    drop(command_cgroup);
    drop(own);
    info!("detached; kernel counters: {counters}");
    // New connections go direct now; open ones may finish, then main()
    // resets the rest (stop.rs).
    stop::drain(match (&cfg.drain, cfg.command.is_empty()) {
        (Some(d), _) => *d,
        (None, true) => Duration::ZERO,
        (None, false) => stop::COMMAND_GRACE,
    });
    Ok(code)
}

/// Raises the descriptor and locked-memory limits; returns about how many
/// connections fit, and what limits them.
fn raise_limits() -> (u64, &'static str) {
    let fd_limit = preflight::raise_fd_limit();
    preflight::raise_memlock_limit();
    let (capacity, limited_by) = preflight::connection_capacity(fd_limit);
    // Below a few thousand, busy machines hit it; the ready line always says.
    if capacity < 4096 {
        warn!("{limited_by} caps ktproxy at about {capacity} concurrent connections");
    }
    (capacity, limited_by)
}

/// Blocked before any thread starts, so that every thread inherits the
/// mask and only the main thread's sigwait() sees these signals. SIGQUIT
/// (Ctrl-\) is only taken over when COMMAND is there to receive it, and
/// SIGCHLD and SIGWINCH (passed on to COMMAND's own terminal) only matter
/// then.
fn block_signals(with_command: bool) -> Result<SigSet> {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    if with_command {
        signals.add(Signal::SIGQUIT);
        signals.add(Signal::SIGCHLD);
        signals.add(Signal::SIGWINCH);
    }
    signals.thread_block().context("blocking signals")?;
    Ok(signals)
}

fn local_addrs(listeners: &[TcpListener]) -> Result<Vec<SocketAddr>> {
    listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<_>>()
        .context("reading the listen address")
}

/// The network namespace ktproxy listens in: the one whose connections it
/// intercepts.
fn netns_cookie(listeners: &[TcpListener]) -> Result<u64> {
    let first = listeners
        .first()
        .ok_or_else(|| Error::new("no listen address could be bound"))?;
    sys::netns_cookie(first.as_raw_fd())
        .context("reading the network namespace cookie (SO_NETNS_COOKIE needs Linux >= 5.14)")
}

/// Another ktproxy whose scope overlaps this one's: refused before anything
/// is created or attached.
fn refuse_overlapping_instance(
    cfg: &Config,
    root: &Path,
    given: Option<&Path>,
    home: &Path,
) -> Result<()> {
    let scope = if cfg.command.is_empty() {
        Some(given.unwrap_or(root))
    } else {
        None
    };
    instances::refuse_overlap(root, scope, home)
}

/// A local upstream proxy: its processes are exempt from interception from
/// the start (see loops.rs); the watchdog follows it if it restarts.
fn upstream_owners(
    cfg: &Config,
    root: &Path,
    intercepted: &Path,
    fail_closed: bool,
    redirect: &bpf::Redirect,
) -> Option<loops::UpstreamOwners> {
    let up = cfg.upstream.as_ref()?;
    let mut owners =
        loops::UpstreamOwners::new(up, is_local(&up.addr()), root, intercepted, fail_closed)?;
    owners.refresh(redirect);
    Some(owners)
}

fn log_failure_policy(fail_closed: bool) {
    if fail_closed {
        info!(
            "fail closed: while ktproxy cannot accept (stopped, or gone), COMMAND's connects are \
             refused (EPERM), never sent direct"
        );
    } else {
        info!(
            "fail open: while ktproxy cannot accept (stopped, hung, out of descriptors), \
             new connects go direct within 1 s"
        );
    }
}

fn is_local(addr: &SocketAddr) -> bool {
    // Binding to an address succeeds only if it is one of ours.
    addr.ip().is_loopback() || std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).is_ok()
}

fn log_ready(
    cfg: &Config,
    bound: &[SocketAddr],
    root: &Path,
    intercepted: &Path,
    own: &Path,
    (capacity, limited_by): (u64, &str),
) {
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
        cfg.describe_filters(),
        own.display()
    );
}

fn run_command(
    argv: &[String],
    cgroup: &cgroup::CommandCgroup,
    launch: command::Launch,
    signals: &SigSet,
    names: bool,
) -> Result<i32> {
    // With names on, COMMAND's names must leave as DNS packets (src/nss.rs).
    // The view's files may go once COMMAND runs: spawn returns after exec.
    let child = {
        let nss = if names { nss::prepare()? } else { None };
        command::spawn(
            argv,
            cgroup,
            &command::Launch {
                nss: nss.as_ref(),
                ..launch
            },
        )?
    };
    let code = command::supervise(child, cgroup, signals)?;
    info!("COMMAND exited with status {code}: shutting down");
    Ok(code)
}

fn wait_for_signal(signals: &SigSet) -> Result<i32> {
    let sig = signals.wait().context("waiting for signals")?;
    info!("{sig}: shutting down");
    Ok(0)
}

/// Binds every -l address. The default IPv6 listener is optional: a host
/// without IPv6 loopback gets IPv4 only, with a warning.
fn bind_listeners(cfg: &Config) -> Result<Vec<TcpListener>> {
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
