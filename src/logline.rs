//! The log lines that tests, scripts and users parse, and their parsers.
//!
//! **These lines are an interface.** The end-to-end tests (tests/), the
//! scripts (scripts/test.sh waits for `ready` and reads the `testserver
//! listening on` line) and users' own scripts read them. Change a line's
//! producer and its parser here together, and prefer adding to a line over
//! rewording it.
//!
//! | line (after the time and level, see src/logging.rs) | producer |
//! |---|---|
//! | `ktproxy ready: listening on A and B, intercepting ..., ... (own cgroup P; room for ...)` | `run` in src/main.rs |
//! | `detached; kernel counters: name=N name=N ...` | `run` in src/main.rs |
//! | `#ID Connecting to target D` and `... via URL`; for a fake address D is `NAME:PORT (FAKE_IP)` | `serve` in src/conn.rs |
//! | `#ID DNS over TCP from C to D: answered by ktproxy` | `answer_dns` in src/conn.rs |
//! | `#ID Connection closed, from C to D: N bytes sent, M bytes received, S s` | `serve` in src/conn.rs |
//! | `#ID Connection reset, from C to D: WHY (N bytes sent, M bytes received, S s)` | `serve` in src/conn.rs |
//! | `N log line(s) dropped: ...` after a gap, `N log line(s) dropped in all: ...` at exit | src/logging.rs, with [`dropped_lines`] |
//! | `#ID no pipe for splice (WHY): copying through N KiB buffers instead` | `relay` in src/relay.rs |
//! | `draining: waiting up to S s for N open connection(s) ...`, `drained: ...` | `drain` in src/stop.rs |
//! | `resetting N socket(s) whose stream is unfinished (M connection(s) still open)` | `reset_open_connections` in src/stop.rs |
//! | `testserver listening on ADDR` (stdout) | src/bin/testserver.rs, with [`testserver_listening`] |
//! | `peer P local L` (stdout) | src/bin/testclient/main.rs, with [`peer_line`] |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// What the ready line starts with (after the log prefix).
pub const READY: &str = "ktproxy ready: listening on ";

/// The ready line of a log: ktproxy has attached its programs and accepts.
pub fn ready_line(log: &str) -> Option<&str> {
    log.lines().find(|l| l.contains(READY))
}

/// The listen addresses of the ready line,
/// `... ready: listening on 127.0.0.1:40123 and [::1]:40123, intercepting ...`.
pub fn parse_listen_addrs(line: &str) -> Option<Vec<SocketAddr>> {
    let rest = line.split_once("listening on ")?.1;
    let list = rest.split_once(", ")?.0;
    list.split(" and ")
        .map(|a| a.trim().parse().ok())
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty())
}

/// ktproxy's own cgroup from the ready line,
/// `... (own cgroup /sys/fs/cgroup/ktproxy-123; room for ...)`: the path
/// ends at the first `,`, `;`, `)` or blank.
pub fn parse_own_cgroup(line: &str) -> Option<PathBuf> {
    let rest = line.split_once("own cgroup ")?.1;
    let end = rest
        .find(|c: char| matches!(c, ',' | ';' | ')') || c.is_whitespace())
        .unwrap_or(rest.len());
    Some(PathBuf::from(&rest[..end])).filter(|p| p.is_absolute())
}

/// The counters of the exit line, `... kernel counters: a=1 b=2`.
pub fn kernel_counters(log: &str) -> Option<HashMap<String, u64>> {
    let line = log.lines().rev().find(|l| l.contains("kernel counters:"))?;
    let list = line.split_once("kernel counters:")?.1;
    list.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// (sent, received) from a `Connection closed` or `Connection reset` line:
/// `... N bytes sent, M bytes received ...`.
pub fn byte_counts(line: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let before = |what: &str| {
        words
            .windows(3)
            .find(|w| w[1] == "bytes" && w[2] == what)
            .and_then(|w| w[0].parse().ok())
    };
    Some((before("sent")?, before("received")?))
}

/// The destinations of a log's `Connecting to target D` lines, in order
/// (`example.com:443` for a name, without the fake address after it).
pub fn targets(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once("Connecting to target ").map(|(_, t)| t))
        .map(|t| t.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// What follows the count in the logger's report of the lines it dropped
/// because stderr did not keep up, after each gap.
pub const DROPPED: &str = " log line(s) dropped: stderr did not keep up";
/// The same at exit, with the total.
pub const DROPPED_IN_ALL: &str = " log line(s) dropped in all: stderr did not keep up";

/// (the sum of the counts of the [`DROPPED`] reports, the total of the
/// [`DROPPED_IN_ALL`] line at exit if there is one).
pub fn dropped_lines(log: &str) -> (u64, Option<u64>) {
    let count = |suffix: &str| {
        log.lines()
            .filter_map(|l| {
                l.strip_suffix(suffix)?
                    .rsplit(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .collect::<Vec<_>>()
    };
    (
        count(DROPPED).iter().sum(),
        count(DROPPED_IN_ALL).last().copied(),
    )
}

/// What `testserver` prints for each address it listens on, once bound.
pub fn testserver_listening(addr: SocketAddr) -> String {
    format!("testserver listening on {addr}")
}

/// The address of a [`testserver_listening`] line.
pub fn parse_testserver_listening(line: &str) -> Option<SocketAddr> {
    line.strip_prefix("testserver listening on ")?
        .trim()
        .parse()
        .ok()
}

/// What `testclient peer` prints: the peer and local address of the socket
/// it connected (getpeername, getsockname).
pub fn peer_line(peer: SocketAddr, local: SocketAddr) -> String {
    format!("peer {peer} local {local}")
}

/// (peer, local) from the [`peer_line`] in `testclient peer`'s output.
pub fn parse_peer_line(stdout: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = stdout.lines().find(|l| l.starts_with("peer "))?;
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next(), w.next()) {
        (Some("peer"), Some(p), Some("local"), Some(l)) => Some((p.parse().ok()?, l.parse().ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_names_the_listen_addresses_and_the_own_cgroup() {
        let log = "\
12:00:00 [WARN] the upstream proxy is already here
12:00:00 [INFO] ktproxy ready: listening on 127.0.0.1:8999 and [::1]:8999, intercepting \
cgroup /sys/fs/cgroup/t, all ports (own cgroup /sys/fs/cgroup/ktproxy-7; room for about \
9000 connections, limited by RLIMIT_NOFILE)
";
        let line = ready_line(log).unwrap();
        assert_eq!(
            parse_listen_addrs(line),
            Some(vec![
                "127.0.0.1:8999".parse().unwrap(),
                "[::1]:8999".parse().unwrap()
            ])
        );
        assert_eq!(
            parse_own_cgroup(line),
            Some(PathBuf::from("/sys/fs/cgroup/ktproxy-7"))
        );
    }

    #[test]
    fn connection_and_exit_lines_give_targets_byte_counts_and_counters() {
        let log = "\
[INFO] #1 Connecting to target 10.0.0.1:80
[INFO] #1 Connection closed, from 127.0.0.1:5 to 10.0.0.1:80: 12 bytes sent, 34 bytes received, 0.001 s
[INFO] #2 Connecting to target [::1]:80 via socks5://127.0.0.1:1080
[INFO] #2 Connection reset, from [::1]:6 to [::1]:80: Connection reset by peer (5 bytes sent, 0 bytes received, 0.002 s)
[INFO] detached; kernel counters: redirected=2 flows_claimed=2
";
        assert_eq!(targets(log), ["10.0.0.1:80", "[::1]:80"]);
        let counts: Vec<_> = log.lines().filter_map(byte_counts).collect();
        assert_eq!(counts, [(12, 34), (5, 0)]);
        let c = kernel_counters(log).unwrap();
        assert_eq!((c["redirected"], c["flows_claimed"], c.len()), (2, 2, 2));
    }

    #[test]
    fn dropped_line_reports_add_up_and_the_exit_total_is_found() {
        let log = format!(
            "12:00:00 [INFO] #1 x\n12:00:01 [WARN] 7{DROPPED}\n12:00:02 [WARN] 5{DROPPED}\n\
             12:00:03 [WARN] 12{DROPPED_IN_ALL}\n"
        );
        assert_eq!(dropped_lines(&log), (12, Some(12)));
        assert_eq!(dropped_lines("12:00:00 [INFO] #1 x\n"), (0, None));
    }

    #[test]
    fn helper_lines_parse_back_to_what_was_printed() {
        let (p, l) = ("[::1]:80".parse().unwrap(), "127.0.0.1:9".parse().unwrap());
        assert_eq!(
            parse_peer_line(&format!("noise\n{}\n", peer_line(p, l))),
            Some((p, l))
        );
        assert_eq!(
            parse_testserver_listening(&testserver_listening(p)),
            Some(p)
        );
    }
}
