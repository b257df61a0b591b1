//! One proxied connection, start to end: recover where the client was going,
//! dial it, relay, and log the seed's per-connection lines.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::error::io_text;
use crate::pipes::PipePool;
use crate::relay::relay;
use crate::sys;

/// What every connection thread shares.
pub struct Shared {
    pub pipes: PipePool,
    pub connect_timeout: Duration,
    /// The bound listen addresses: a destination equal to one of them would
    /// make ktproxy dial itself.
    pub listen: Vec<SocketAddr>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(listen: Vec<SocketAddr>, connect_timeout: Duration) -> Shared {
        Shared {
            pipes: PipePool::new(1024),
            connect_timeout,
            listen,
            next_id: AtomicU64::new(1),
        }
    }

    fn is_proxy(&self, dst: &SocketAddr) -> bool {
        self.listen
            .iter()
            .any(|l| l.port() == dst.port() && (l.ip() == dst.ip() || dst.ip().is_unspecified()))
    }
}

pub fn serve(shared: &Shared, client: TcpStream) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let (local, peer) = match (client.local_addr(), client.peer_addr()) {
        (Ok(l), Ok(p)) => (l, p),
        // The client reset before we looked: nothing to serve.
        (Err(e), _) | (_, Err(e)) => {
            debug!(
                "#{id} connection gone before it was served: {}",
                io_text(&e)
            );
            return;
        }
    };
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

    info!("#{id} Connecting to target {dst}");
    let target = match sys::dial(&dst, shared.connect_timeout) {
        Ok(t) => t,
        Err(e) => {
            warn!(
                "#{id} connecting to {dst} for {peer} failed: {}; resetting the client",
                io_text(&e)
            );
            reset(&client);
            return;
        }
    };
    if let Err(e) = client
        .set_nonblocking(true)
        .and_then(|_| sys::set_nodelay(client.as_raw_fd()))
    {
        warn!(
            "#{id} preparing the client socket of {peer}: {}",
            io_text(&e)
        );
        return;
    }
    info!("#{id} Proxy connection established, from {peer} to {dst}");

    let (totals, err) = relay(&client, &target, &shared.pipes);
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

fn reset(s: &TcpStream) {
    sys::set_linger_zero(s.as_raw_fd());
}
