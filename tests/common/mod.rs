//! Harness for ktproxy's end-to-end tests, one file per concern (after the
//! kernel selftests' cgroup_helpers and network_helpers):
//! - `process`: bounded waits, kill-on-drop children, temporary files, tools;
//! - `cgroup`: the cgroup v2 hierarchy, test cgroups, ktproxy's own cgroups;
//! - `proxy`: the ktproxy under test in cgroup mode, and its log;
//! - `command`: `ktproxy -- COMMAND` runs, and what they must leave behind;
//! - `servers`: servers on threads of the test process, `testserver`;
//! - `clients`: clients run inside a test cgroup (testclient, curl, Python);
//! - `route`: whether a connection went through ktproxy or direct;
//! - `upstream`: SOCKS5 and HTTP proxies for `-u` (microsocks, tinyproxy);
//! - `dns`: names through the proxy: upstreams that know a secret name,
//!   counting DNS servers, a Python DNS client, private mount namespaces;
//! - `netns`: network namespaces;
//! - `bpftool`: what the kernel has attached, as bpftool shows it;
//! - `unprivileged`: ktproxy run as nobody, from a copy nobody can reach;
//! - `security`: nftables tables, clients as nobody, a terminal (script);
//! - `faults`: stopped processes, capped threads, a probe that keeps connecting;
//! - `plan`: connection plans whose every byte both ends check, their server
//!   and their client (tests/relay.rs).
//!
//! ktproxy's log lines are parsed by `ktproxy::logline`, re-exported here.
//!
//! Safety rules every helper here keeps (a redirect attached to the wrong
//! cgroup would send every new connection of the machine into a port):
//! - ktproxy always gets `-c <a TestCgroup>`: never no `-c`, never the root
//!   (command mode creates and intercepts only its own cgroup).
//! - Only client processes enter a test cgroup, and they do so in `pre_exec`,
//!   before exec, so not one of their connect() calls escapes it.
//! - Every wait is bounded; only processes the test started are killed, by pid.
//! - Everything created (cgroups, namespaces, temp files, processes) is
//!   removed by `Drop`, also when the test panics.
#![allow(dead_code)] // each test file uses a part of it

mod bpftool;
mod cgroup;
mod clients;
mod command;
mod dns;
mod faults;
mod netns;
mod plan;
mod process;
mod proxy;
mod route;
mod security;
mod servers;
mod unprivileged;
mod upstream;

// Each test file uses a part: what one does not use is not an error.
#[allow(unused_imports)]
pub use self::{
    bpftool::*, cgroup::*, clients::*, command::*, dns::*, faults::*, netns::*, plan::*,
    process::*, proxy::*, route::*, security::*, servers::*, unprivileged::*, upstream::*,
};
#[allow(unused_imports)]
pub use ktproxy::logline::{
    byte_counts, kernel_counters, parse_listen_addrs, parse_own_cgroup, parse_peer_line,
    ready_line, targets,
};

pub const KTPROXY: &str = env!("CARGO_BIN_EXE_ktproxy");
pub const TESTCLIENT: &str = env!("CARGO_BIN_EXE_testclient");
pub const TESTSERVER: &str = env!("CARGO_BIN_EXE_testserver");
