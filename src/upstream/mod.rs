//! Chaining through an upstream proxy: instead of dialing the original
//! destination, ktproxy dials a SOCKS5 (RFC 1928/1929) or HTTP CONNECT proxy
//! and asks it to connect on the client's behalf.
//!
//! The handshake runs on a blocking socket and consumes exactly the bytes of
//! the proxy's reply. Whatever the destination sends right after that reply
//! (an SSH or SMTP banner, say) must still be in the kernel's receive queue
//! when the splice relay takes over, because the relay never sees a
//! user-space buffer.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use crate::error::{self, io_text};

mod http;
mod socks5;
mod url;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Socks5,
    HttpConnect,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Socks5 => "SOCKS5",
            Kind::HttpConnect => "HTTP",
        }
    }
}

/// Percent-decoded bytes: RFC 1929 and Basic auth carry octets, not text.
#[derive(Clone)]
struct Credentials {
    user: Vec<u8>,
    pass: Vec<u8>,
}

impl fmt::Debug for Credentials {
    // A stray {:?} in a log line must not leak the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &String::from_utf8_lossy(&self.user))
            .field("pass", &"***")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    kind: Kind,
    addr: SocketAddr,
    creds: Option<Credentials>,
    /// The URL as given, password replaced by "***".
    shown: String,
}

impl Upstream {
    /// Parses `socks5://[user:pass@]host:port` or `http://[user:pass@]host:port`
    /// and resolves the host once, at start-up.
    pub fn parse(url: &str) -> error::Result<Upstream> {
        url::parse(url)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[cfg(test)]
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The URL for logs, password replaced by "***".
    pub fn display(&self) -> String {
        self.shown.clone()
    }

    /// Asks the proxy, over `stream` (connected to `addr()`, blocking, with
    /// the caller's timeouts), to connect to `dst`. On success the stream is
    /// a raw tunnel to `dst` and nothing past the proxy's reply was read.
    pub fn handshake(&self, stream: &mut TcpStream, dst: SocketAddr) -> Result<(), String> {
        let dst = unmap(dst);
        match self.kind {
            Kind::Socks5 => self.socks5(stream, dst),
            Kind::HttpConnect => self.http_connect(stream, dst),
        }
    }

    /// "SOCKS5 proxy 127.0.0.1:1080": how every handshake error names the peer.
    fn who(&self) -> String {
        format!("{} proxy {}", self.kind.name(), self.addr)
    }
    fn send(&self, s: &mut TcpStream, buf: &[u8]) -> Result<(), String> {
        s.write_all(buf).map_err(|e| self.io_failure(&e))
    }

    fn recv(&self, s: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
        s.read_exact(buf).map_err(|e| self.io_failure(&e))
    }

    fn io_failure(&self, e: &io::Error) -> String {
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::WriteZero => {
                format!(
                    "upstream {} closed the connection during the handshake",
                    self.who()
                )
            }
            // SO_RCVTIMEO/SO_SNDTIMEO expiry surfaces as EAGAIN.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("upstream {} timed out during the handshake", self.who())
            }
            _ => format!(
                "upstream {} failed during the handshake: {}",
                self.who(),
                io_text(e)
            ),
        }
    }
}

/// An IPv6 socket dialing ::ffff:a.b.c.d reaches an IPv4 host; asking the
/// proxy for the IPv4 address works even where the proxy has no IPv6.
fn unmap(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => dst,
        },
        SocketAddr::V4(_) => dst,
    }
}

/// A one-connection mock proxy and what the protocol tests do with it.
#[cfg(test)]
mod mock {
    use std::io::Read;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration;

    use super::Upstream;

    pub(super) const WAIT: Duration = Duration::from_secs(5);

    pub(super) fn dst4() -> SocketAddr {
        "93.184.216.34:443".parse().unwrap()
    }

    /// A one-connection proxy on 127.0.0.1 running `script` on the accepted
    /// socket; the script's assertions fail the test through join().
    pub(super) fn mock(
        script: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (SocketAddr, thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.set_nodelay(true).unwrap();
            script(s);
        });
        (addr, h)
    }

    pub(super) fn join(h: thread::JoinHandle<()>) {
        if let Err(panic) = h.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// Runs one handshake against `script`; returns its result and the
    /// stream, from which the test can read what followed the reply.
    pub(super) fn run(
        url_prefix: &str,
        dst: SocketAddr,
        script: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (Result<(), String>, TcpStream, Upstream) {
        let (addr, h) = mock(script);
        let up = Upstream::parse(&format!("{url_prefix}{addr}")).unwrap();
        let mut s = TcpStream::connect(up.addr()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        let r = up.handshake(&mut s, dst);
        join(h);
        (r, s, up)
    }

    pub(super) fn expect(s: &mut TcpStream, want: &[u8]) {
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }

    pub(super) fn read_request_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    pub(super) fn rest_of(mut s: TcpStream) -> Vec<u8> {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        rest
    }
}
