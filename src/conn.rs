//! One proxied connection, start to end: recover where the client was going,
//! dial it (directly or through the upstream proxy), relay, and log the
//! seed's per-connection lines.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::error::io_text;
use crate::names::{self, Dns, Route};
use crate::pipes::{PipePool, COPY_ONLY_ENV};
use crate::relay::relay;
use crate::sys::{self, Egress, Origin};
use crate::upstream::{Target, Upstream};

/// What every connection thread shares.
pub struct Shared {
    pub pipes: PipePool,
    pub connect_timeout: Duration,
    /// The bound listen addresses: a destination equal to one of them would
    /// make ktproxy dial itself.
    pub listen: Vec<SocketAddr>,
    pub upstream: Option<Upstream>,
    /// --mark for every outgoing socket.
    mark: Option<u32>,
    /// Outgoing sockets are created as the client's uid and gid (needs
    /// CAP_SETUID and CAP_SETGID); ktproxy's own (uid, gid) need no switch.
    as_client: bool,
    own_ids: (libc::uid_t, libc::gid_t),
    next_id: AtomicU64,
    /// DNS interception, when on: fake addresses and DNS over TCP.
    names: Option<Dns>,
}

impl Shared {
    pub fn new(
        listen: Vec<SocketAddr>,
        connect_timeout: Duration,
        upstream: Option<Upstream>,
        mark: Option<u32>,
    ) -> Shared {
        let copy_only = std::env::var_os(COPY_ONLY_ENV).is_some_and(|v| v == "1");
        if copy_only {
            warn!("{COPY_ONLY_ENV}=1: relaying through user-space buffers, not splice");
        }
        let as_client = sys::can_create_as_others();
        if !as_client {
            warn!(
                "ktproxy cannot create sockets as another user (setfsuid needs CAP_SETUID and \
                 CAP_SETGID): outgoing connections carry ktproxy's own uid, so firewall rules on \
                 the client's uid do not apply to them"
            );
        }
        Shared {
            // Enough for every connection with bytes in flight at once on
            // a busy machine; each pooled pipe holds two descriptors.
            pipes: PipePool::new(64).copy_only(copy_only),
            connect_timeout,
            listen,
            upstream,
            mark,
            as_client,
            own_ids: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
            next_id: AtomicU64::new(1),
            names: None,
        }
    }

    /// The connection to the destination, or to the upstream proxy, is the
    /// client's: rules on its uid (nft `meta skuid`, `-m owner`, `ip rule
    /// uidrange`) apply as if it had dialed itself.
    fn egress(&self, origin: &Origin) -> Egress {
        let ids = (origin.uid, origin.gid);
        Egress {
            owner: (self.as_client && ids != self.own_ids).then_some(ids),
            mark: self.mark,
        }
    }

    pub fn with_names(mut self, names: Option<Dns>) -> Shared {
        self.names = names;
        self
    }

    fn is_proxy(&self, dst: &SocketAddr) -> bool {
        self.listen
            .iter()
            .any(|l| l.port() == dst.port() && (l.ip() == dst.ip() || dst.ip().is_unspecified()))
    }
}

/// Connections being served right now, for the drain at exit: one atomic
/// add and one subtract per connection.
static LIVE: AtomicUsize = AtomicUsize::new(0);

pub fn live() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// Counts a connection in `LIVE` for as long as it lives.
struct Live;

impl Live {
    fn enter() -> Live {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Live
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `client` comes from accept4: non-blocking, with TCP_NODELAY inherited from
/// the listener. `local` is the listener's address.
pub fn serve(shared: &Shared, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
    // Declared first, dropped last: after both sockets are closed (the
    // rebinding makes `client` a local, dropped before `_live`).
    let _live = Live::enter();
    let client = client;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    info!("#{id} === New Connection ===");
    info!("#{id} Proxy Server: {local}");
    info!("#{id} Client: {peer}");

    let origin = match sys::origin(&client) {
        Ok(o) => o,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            // The kernel recognised one of ktproxy's own dials (see
            // came_from_proxy in bpf/ktproxy.bpf.c).
            warn!(
                "#{id} {peer} is ktproxy's own connection come back to it (a proxy loop: was \
                 ktproxy moved out of its cgroup?); resetting it"
            );
            reset(&client);
            return;
        }
        Err(e) => {
            warn!(
                "#{id} {peer} has no original destination ({}): it dialed the proxy port \
                 directly instead of being redirected; closing",
                io_text(&e)
            );
            return;
        }
    };
    let dst = origin.dst;
    let egress = shared.egress(&origin);
    debug!(
        "#{id} client uid {}, gid {}{}",
        origin.uid,
        origin.gid,
        if egress.owner.is_some() {
            ": dialing as that user"
        } else {
            ""
        }
    );
    if shared.is_proxy(&dst) {
        warn!("#{id} original destination {dst} of {peer} is the proxy itself; closing to avoid a loop");
        return;
    }

    // A fake address stands for a name, pinned to it until we are done.
    let pinned = match shared.names.as_ref().map_or(Route::Addr, |n| n.route(&dst)) {
        Route::Addr => None,
        Route::Name(p) => Some(p),
        Route::Dns => {
            if let Some(n) = &shared.names {
                answer_dns(id, n, &client, peer, dst);
            }
            return;
        }
        Route::Unknown => {
            warn!(
                "#{id} {peer} dialed {dst}, a fake address that stands for no name (ktproxy \
                 restarted, or the client kept the address past its TTL); resetting it, not \
                 dialing"
            );
            reset(&client);
            return;
        }
    };
    let target = match &pinned {
        None => Target::Addr(dst),
        Some(p) => match Target::name(p.name(), dst.port()) {
            Ok(t) => t,
            Err(why) => {
                warn!("#{id} {peer} dialed {dst}: {why}; resetting the client");
                reset(&client);
                return;
            }
        },
    };
    // Names show as "example.com:443 (198.18.0.7)" where they are dialed,
    // and as "example.com:443" in the lines after.
    let (shown, dst) = match target {
        Target::Name(..) => (format!("{target} ({})", dst.ip()), target.to_string()),
        Target::Addr(_) => (dst.to_string(), dst.to_string()),
    };

    let target = match (&shared.upstream, target) {
        (None, Target::Addr(addr)) => {
            info!("#{id} Connecting to target {shown}");
            sys::dial_as(&addr, shared.connect_timeout, egress).map_err(|e| {
                if sys::out_of_descriptors(&e) {
                    shared.pipes.release_all();
                }
                io_text(&e)
            })
        }
        (None, Target::Name(name, port)) => {
            info!("#{id} Connecting to target {shown}");
            dial_name(shared, id, name, port, egress)
        }
        (Some(up), target) => {
            info!("#{id} Connecting to target {shown} via {}", up.display());
            through_upstream(up, target, shared.connect_timeout, egress)
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(why) => {
            warn!(
                "#{id} connecting to {shown} for {peer} (uid {}) failed: {why}; resetting the client",
                origin.uid
            );
            reset(&client);
            return;
        }
    };
    info!("#{id} Proxy connection established, from {peer} to {dst}");

    let (totals, err) = relay(id, &client, &target, &shared.pipes);
    let secs = started.elapsed().as_secs_f64();
    match err {
        None => info!(
            "#{id} Connection closed, from {peer} to {dst}: {} bytes sent, {} bytes received, {secs:.3} s",
            totals.up, totals.down
        ),
        Some(e) => {
            // One side failed: make sure the other hears it as a reset, not
            // as a clean end of stream.
            reset(&client);
            reset(&target);
            info!(
                "#{id} Connection reset, from {peer} to {dst}: {} ({} bytes sent, {} bytes received, {secs:.3} s)",
                io_text(&e),
                totals.up,
                totals.down
            );
        }
    }
}

/// DNS over TCP (any server, port 53) is answered by ktproxy itself.
fn answer_dns(id: u64, names: &Dns, client: &TcpStream, peer: SocketAddr, dst: SocketAddr) {
    info!("#{id} DNS over TCP from {peer} to {dst}: answered by ktproxy");
    if let Err(e) = names.serve_tcp(client) {
        warn!("#{id} DNS over TCP from {peer}: {}", io_text(&e));
    }
}

/// No upstream: ktproxy resolves the name itself (from its own cgroup) and
/// dials the addresses in turn.
fn dial_name(
    shared: &Shared,
    id: u64,
    name: &str,
    port: u16,
    egress: Egress,
) -> Result<TcpStream, String> {
    let addrs =
        names::resolve(name, port).map_err(|e| format!("resolving {name}: {}", io_text(&e)))?;
    let mut last = String::new();
    for addr in addrs {
        if shared.is_proxy(&addr) {
            last = format!("{name} resolves to the proxy itself ({addr})");
            continue;
        }
        info!("#{id} {name} resolved to {addr}");
        match sys::dial_as(&addr, shared.connect_timeout, egress) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if sys::out_of_descriptors(&e) {
                    shared.pipes.release_all();
                }
                last = format!("{addr}: {}", io_text(&e));
            }
        }
    }
    Err(last)
}

/// Dials the upstream proxy and has it connect to `dst`. The handshake is
/// plain blocking I/O with timeouts; the tunnel then goes back to
/// non-blocking for the relay.
pub fn through_upstream(
    up: &Upstream,
    dst: Target,
    timeout: Duration,
    egress: Egress,
) -> Result<TcpStream, String> {
    let mut s = sys::dial_as(&up.addr(), timeout, egress)
        .map_err(|e| format!("upstream {} unreachable: {}", up.display(), io_text(&e)))?;
    s.set_nonblocking(false)
        .and_then(|_| s.set_read_timeout(Some(timeout)))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| io_text(&e))?;
    up.handshake(&mut s, dst).map_err(|e| e.to_string())?;
    s.set_nonblocking(true).map_err(|e| io_text(&e))?;
    Ok(s)
}

fn reset(s: &TcpStream) {
    sys::set_linger_zero(s);
}
