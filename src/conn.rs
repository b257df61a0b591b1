//! One proxied connection, start to end: recover where the client was going,
//! dial it (directly or through the upstream proxy), relay, and log the
//! seed's per-connection lines.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::error::io_text;
use crate::pipes::PipePool;
use crate::relay::relay;
use crate::sockmap::RelayMaps;
use crate::sys;
use crate::upstream::Upstream;

/// What every connection thread shares.
pub struct Shared {
    pub pipes: PipePool,
    pub connect_timeout: Duration,
    /// The bound listen addresses: a destination equal to one of them would
    /// make ktproxy dial itself.
    pub listen: Vec<SocketAddr>,
    pub upstream: Option<Upstream>,
    next_id: AtomicU64,
    /// --relay sockmap (None: splice).
    pub sockmap: Option<Arc<RelayMaps>>,
}

impl Shared {
    pub fn new(
        listen: Vec<SocketAddr>,
        connect_timeout: Duration,
        upstream: Option<Upstream>,
        sockmap: Option<Arc<RelayMaps>>,
    ) -> Shared {
        Shared {
            // Enough for every connection with bytes in flight at once on
            // a busy machine; each pooled pipe holds two descriptors.
            pipes: PipePool::new(64),
            connect_timeout,
            listen,
            upstream,
            next_id: AtomicU64::new(1),
            sockmap,
        }
    }

    fn is_proxy(&self, dst: &SocketAddr) -> bool {
        self.listen
            .iter()
            .any(|l| l.port() == dst.port() && (l.ip() == dst.ip() || dst.ip().is_unspecified()))
    }
}

/// `client` comes from accept4: non-blocking, with TCP_NODELAY inherited from
/// the listener. `local` is the listener's address.
pub fn serve(shared: &Shared, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    info!("#{id} === New Connection ===");
    info!("#{id} Proxy Server: {local}");
    info!("#{id} Client: {peer}");

    let dst = match sys::original_dst(&client, local.is_ipv6()) {
        Ok(d) => d,
        Err(e) => {
            warn!(
                "#{id} {peer} has no original destination ({}): it dialed the proxy port \
                 directly instead of being redirected; closing",
                io_text(&e)
            );
            return;
        }
    };
    if shared.is_proxy(&dst) {
        warn!("#{id} original destination {dst} of {peer} is the proxy itself; closing to avoid a loop");
        return;
    }

    let target = match &shared.upstream {
        None => {
            info!("#{id} Connecting to target {dst}");
            sys::dial(&dst, shared.connect_timeout).map_err(|e| {
                if sys::out_of_descriptors(&e) {
                    shared.pipes.release_all();
                }
                io_text(&e)
            })
        }
        Some(up) => {
            info!("#{id} Connecting to target {dst} via {}", up.display());
            through_upstream(up, dst, shared.connect_timeout)
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(why) => {
            warn!("#{id} connecting to {dst} for {peer} failed: {why}; resetting the client");
            reset(&client);
            return;
        }
    };
    info!("#{id} Proxy connection established, from {peer} to {dst}");

    let (totals, err) = match &shared.sockmap {
        Some(kernel) => kernel.relay(id, &client, &target, &shared.pipes),
        None => relay(id, &client, &target, &shared.pipes),
    };
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

/// Dials the upstream proxy and has it connect to `dst`. The handshake is
/// plain blocking I/O with timeouts; the tunnel then goes back to
/// non-blocking for the relay.
fn through_upstream(
    up: &Upstream,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let mut s = sys::dial(&up.addr(), timeout)
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
