//! Whether a connection went through ktproxy or direct, seen from both ends.

use std::net::SocketAddr;

use super::cgroup::TestCgroup;
use super::clients::{client_peer, py_connect};
use super::process::tail;
use super::proxy::{log_count, wait_log_count, Proxy, LOG_TIMEOUT};
use super::servers::TestServer;

/// IPv4-mapped addresses as the IPv4 address they stand for.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Dials `server` (which must be a HelloServer: it answers with its own
/// address) from inside the cgroup at `host` (the server's own address, or
/// its `::ffff:` form, which makes a Python IPv4-mapped connect), and checks
/// both views of whether the connection was intercepted:
/// - the server's: intercepted exactly when the peer it accepted is not the
///   client's own local address (it is ktproxy's);
/// - ktproxy's log: a new `Connecting to target <server>` and `Client:
///   <client's local address>` exactly when intercepted.
pub fn check_route(
    cg: &TestCgroup,
    proxy: &Proxy,
    server: &TestServer,
    host: &str,
    intercepted: bool,
) {
    let target = server.addr();
    let what = format!(
        "{host} port {} ({})",
        target.port(),
        if intercepted {
            "must be intercepted"
        } else {
            "must go direct"
        }
    );
    let connecting = format!("Connecting to target {target}\n");
    let connects_before = log_count(proxy, &connecting);
    let new_before = log_count(proxy, "=== New Connection ===");
    let accepted_before = server.peers().len();

    let local = if host.starts_with("::ffff:") {
        let c = py_connect(cg, host, target.port());
        assert_eq!(
            c.peer,
            format!("('{host}', {}, 0, 0)", target.port()),
            "{what}: getpeername"
        );
        assert_eq!(c.reply, target.to_string(), "{what}: reply");
        canonical(c.local)
    } else {
        let dial = SocketAddr::new(host.parse().expect("an IP address"), target.port());
        assert_eq!(dial, target, "dial the server's own address");
        let (peer, local) = client_peer(cg, dial);
        assert_eq!(
            peer, dial,
            "{what}: getpeername must show the dialed address"
        );
        local
    };

    let seen = canonical(server.wait_peers(accepted_before + 1, LOG_TIMEOUT)[accepted_before]);
    if intercepted {
        assert_ne!(
            seen, local,
            "{what}: the server saw the client itself, not ktproxy"
        );
        wait_log_count(proxy, &connecting, connects_before);
        proxy.wait_log(&format!("Client: {local}\n"), LOG_TIMEOUT);
    } else {
        assert_eq!(
            seen, local,
            "{what}: the server should see the client itself"
        );
        let log = proxy.log();
        assert_eq!(
            log.matches(&connecting).count(),
            connects_before,
            "{what}: ktproxy dialed it:\n{}",
            tail(&log, 20)
        );
        assert_eq!(
            log.matches("=== New Connection ===").count(),
            new_before,
            "{what}: ktproxy got a connection:\n{}",
            tail(&log, 20)
        );
    }
}
