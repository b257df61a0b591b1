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
use std::io;
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
    // A stray {:?} in a log line must not leak them; the user name may be
    // a token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &"***")
            .field("pass", &"***")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Upstream {
    kind: Kind,
    addr: SocketAddr,
    creds: Option<Credentials>,
    /// The URL as given, user info replaced by "***".
    shown: String,
}

/// Whether `url` has user info (credentials, or a token as user name).
pub fn has_credentials(url: &str) -> bool {
    url::userinfo_span(url).is_some_and(|r| !r.is_empty())
}

/// The byte range of `url`'s user info, the part to keep secret.
pub fn userinfo_span(url: &str) -> Option<std::ops::Range<usize>> {
    url::userinfo_span(url).filter(|r| !r.is_empty())
}

impl Upstream {
    /// Parses `socks5://[user:pass@]host:port` or `http://[user:pass@]host:port`
    /// and resolves the host once, at start-up.
    pub fn parse(url: &str) -> error::Result<Upstream> {
        url::parse(url, "-u/--upstream")
    }

    /// `parse`, naming `source` (where the URL came from) in errors.
    pub fn parse_from(url: &str, source: &str) -> error::Result<Upstream> {
        url::parse(url, source)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[cfg(test)]
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The URL for logs, user info replaced by "***".
    pub fn display(&self) -> String {
        self.shown.clone()
    }

    /// Asks the proxy, over `stream` (connected to `addr()`, blocking, with
    /// the caller's timeouts), to connect to `dst`. On success the stream is
    /// a raw tunnel to `dst` and nothing past the proxy's reply was read.
    pub fn handshake<'a>(
        &self,
        stream: &mut TcpStream,
        dst: impl Into<Target<'a>>,
    ) -> Result<(), HandshakeError> {
        let dst = match dst.into() {
            Target::Addr(a) => Target::Addr(unmap(a)),
            name => name,
        };
        let creds = self.creds.as_ref();
        match self.kind {
            Kind::Socks5 => socks5::handshake(stream, creds, dst),
            Kind::HttpConnect => http::handshake(stream, creds, dst),
        }
        .map_err(|failure| HandshakeError {
            proxy: self.kind,
            addr: self.addr,
            failure,
        })
    }
}

/// What the upstream is asked to connect to: an address, or a name that the
/// proxy resolves itself (SOCKS5 ATYP 3, HTTP `CONNECT name:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Addr(SocketAddr),
    Name(&'a str, u16),
}

/// SOCKS5 gives a name one length byte.
pub const MAX_NAME: usize = 255;

impl<'a> Target<'a> {
    /// A host name for the upstream: at most 255 bytes of letters, digits,
    /// '-', '_' and '.'. Anything else could not be carried by SOCKS5 or
    /// would inject into the HTTP request line, and no DNS name needs it.
    pub fn name(name: &'a str, port: u16) -> Result<Target<'a>, String> {
        if name.len() > MAX_NAME {
            return Err(format!(
                "the name {}... is {} bytes long: SOCKS5 and DNS names carry at most {MAX_NAME}",
                name.chars().take(40).collect::<String>().escape_debug(),
                name.len()
            ));
        }
        let bad = |b: u8| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if name.is_empty() || name.bytes().any(bad) {
            return Err(format!(
                "the name '{}' has characters a proxy request cannot carry",
                name.escape_debug()
            ));
        }
        Ok(Target::Name(name, port))
    }
}

impl From<SocketAddr> for Target<'_> {
    fn from(a: SocketAddr) -> Self {
        Target::Addr(a)
    }
}

impl fmt::Display for Target<'_> {
    /// `1.2.3.4:443`, `[2001:db8::1]:443` or `example.com:443`: what the
    /// logs show and what HTTP CONNECT asks for (no IPv6 zone id, which
    /// means nothing to the proxy).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(SocketAddr::V4(a)) => write!(f, "{}:{}", a.ip(), a.port()),
            Target::Addr(SocketAddr::V6(a)) => write!(f, "[{}]:{}", a.ip(), a.port()),
            Target::Name(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// Why a handshake failed. Its `Display` is the reason in the connection's
/// log line, which users and tests grep for: the texts are an interface.
#[derive(Debug)]
pub struct HandshakeError {
    proxy: Kind,
    addr: SocketAddr,
    failure: Failure,
}

/// What went wrong, by kind; the protocol code returns these and
/// `Upstream::handshake` adds which proxy said it.
#[derive(Debug)]
enum Failure {
    /// The proxy closed the connection, went silent past the timeout, or
    /// the socket failed.
    Io(io::Error),
    /// The peer does not speak the protocol, or breaks it.
    Protocol(Violation),
    /// The proxy wants credentials that were not given, or rejected them.
    Auth(AuthFailure),
    /// The proxy understood the request and would not, or could not, connect.
    Refused(Refusal),
}

#[derive(Debug)]
enum Violation {
    /// A SOCKS5 reply whose version byte is not 5.
    Socks5Version(u8),
    /// The SOCKS5 server chose an authentication method that was not offered.
    Socks5MethodNotOffered(u8),
    /// A SOCKS5 reply's bound address has an unknown type, hence length.
    Socks5AddressType(u8),
    /// An HTTP status line that does not parse, already made printable.
    HttpStatusLine(String),
    /// An HTTP response head longer than `http::MAX_HEAD`.
    HttpHeadTooLarge,
}

#[derive(Debug)]
enum AuthFailure {
    /// The SOCKS5 server chose username/password, and there is none.
    Socks5CredentialsMissing,
    /// The SOCKS5 server answered "no acceptable methods" (0xFF).
    Socks5NoAcceptableMethod { offered_password: bool },
    /// RFC 1929 sub-negotiation returned a non-zero status.
    Socks5Rejected,
    /// An HTTP 407 (or 401, as tinyproxy sends for a wrong password).
    Http {
        status: HttpStatus,
        credentials_given: bool,
    },
}

#[derive(Debug)]
enum Refusal {
    /// A non-zero SOCKS5 reply code (REP).
    Socks5(u8),
    /// An HTTP status outside 2xx, other than an authentication one.
    Http(HttpStatus),
}

/// A status code and its reason phrase, the latter already made printable:
/// the proxy chose its bytes, and they end up in the log.
#[derive(Debug)]
struct HttpStatus {
    code: u16,
    reason: String,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // "SOCKS5 proxy 127.0.0.1:1080": how every handshake error names the peer.
        let (name, addr) = (self.proxy.name(), self.addr);
        match &self.failure {
            Failure::Io(e) => match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::WriteZero => write!(
                    f,
                    "upstream {name} proxy {addr} closed the connection during the handshake"
                ),
                // SO_RCVTIMEO/SO_SNDTIMEO expiry surfaces as EAGAIN.
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    write!(
                        f,
                        "upstream {name} proxy {addr} timed out during the handshake"
                    )
                }
                _ => write!(
                    f,
                    "upstream {name} proxy {addr} failed during the handshake: {}",
                    io_text(e)
                ),
            },
            Failure::Protocol(v) => write!(f, "{name} proxy {addr} {v}"),
            Failure::Auth(a) => write!(f, "{name} proxy {addr} {a}"),
            Failure::Refused(r) => write!(f, "{name} proxy {addr} {r}"),
        }
    }
}

impl std::error::Error for HandshakeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.failure {
            Failure::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Socks5Version(v) => write!(
                f,
                "answered with version 0x{v:02x} instead of 5: is it a SOCKS5 proxy?"
            ),
            Violation::Socks5MethodNotOffered(m) => write!(
                f,
                "chose authentication method 0x{m:02x}, which was not offered"
            ),
            Violation::Socks5AddressType(t) => {
                write!(f, "sent a reply with unknown address type {t}")
            }
            Violation::HttpStatusLine(line) => write!(
                f,
                "sent a malformed status line '{line}': is it an HTTP proxy?"
            ),
            Violation::HttpHeadTooLarge => {
                write!(
                    f,
                    "sent a response head larger than {} KiB",
                    http::MAX_HEAD / 1024
                )
            }
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthFailure::Socks5CredentialsMissing => {
                f.write_str("requires authentication (method 0x02) but no credentials were given")
            }
            AuthFailure::Socks5NoAcceptableMethod {
                offered_password: false,
            } => f.write_str(
                "requires authentication: it accepted none of the offered methods \
                 (no authentication); give user:pass in the URL",
            ),
            AuthFailure::Socks5NoAcceptableMethod {
                offered_password: true,
            } => f.write_str(
                "accepted none of the offered authentication methods \
                 (no authentication, username/password)",
            ),
            AuthFailure::Socks5Rejected => f.write_str("rejected the username/password"),
            AuthFailure::Http {
                status,
                credentials_given,
            } => write!(
                f,
                "{status} ({})",
                if *credentials_given {
                    "the credentials were rejected"
                } else {
                    "no credentials were given"
                }
            ),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Socks5(code) => {
                write!(f, "refused: {} (reply {code})", socks5::reply_text(*code))
            }
            Refusal::Http(status) => write!(f, "{status}"),
        }
    }
}

impl fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "answered {}", self.code)?;
        if !self.reason.is_empty() {
            write!(f, " {}", self.reason)?;
        }
        Ok(())
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

    /// Runs one handshake against `script`; returns its result (the error as
    /// the log line shows it) and the stream, from which the test can read
    /// what followed the reply.
    pub(super) fn run(
        url_prefix: &str,
        dst: impl Into<super::Target<'static>>,
        script: impl FnOnce(TcpStream) + Send + 'static,
    ) -> (Result<(), String>, TcpStream, Upstream) {
        let (addr, h) = mock(script);
        let up = Upstream::parse(&format!("{url_prefix}{addr}")).unwrap();
        let mut s = TcpStream::connect(up.addr()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        let r = up.handshake(&mut s, dst.into()).map_err(|e| e.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_up_to_255_bytes_of_hostname_characters_are_targets() {
        assert_eq!(
            Target::name("secret.test", 443),
            Ok(Target::Name("secret.test", 443))
        );
        let long = "a".repeat(255);
        assert!(Target::name(&long, 80).is_ok());
        assert_eq!(
            Target::name("_srv.x-y.onion", 1).unwrap().to_string(),
            "_srv.x-y.onion:1"
        );
    }

    #[test]
    fn names_over_255_bytes_get_an_error_naming_the_length() {
        let long = "a".repeat(256);
        let e = Target::name(&long, 80).unwrap_err();
        assert!(
            e.contains("256 bytes long") && e.contains("at most 255"),
            "{e}"
        );
        assert!(e.len() < 200, "the name is shortened: {e}");
    }

    #[test]
    fn names_that_would_inject_into_a_request_are_refused() {
        for bad in [
            "",
            "a b",
            "a\r\nHost: x",
            "a:1",
            "a/b",
            "a@b",
            "[::1]",
            "é.test",
        ] {
            let e = Target::name(bad, 80).unwrap_err();
            assert!(e.contains("cannot carry"), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn targets_display_as_host_and_port() {
        let v6: SocketAddr = "[2001:db8::1%3]:80".parse().unwrap();
        assert_eq!(Target::Addr(v6).to_string(), "[2001:db8::1]:80");
        assert_eq!(
            Target::from("1.2.3.4:5".parse::<SocketAddr>().unwrap()).to_string(),
            "1.2.3.4:5"
        );
    }
}
