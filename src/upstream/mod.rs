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
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};

use crate::error::{self, io_text, Error};

/// Real CONNECT response heads are a few hundred bytes; more than this means
/// the peer is broken or not a proxy, and the head must not grow unbounded.
const MAX_HTTP_HEAD: usize = 16 * 1024;

const SOCKS_VERSION: u8 = 5;
const METHOD_NONE: u8 = 0x00;
const METHOD_USERPASS: u8 = 0x02;
const METHOD_NO_ACCEPTABLE: u8 = 0xFF;
const CMD_CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;
/// RFC 1929 versions its sub-negotiation separately from SOCKS itself.
const USERPASS_VERSION: u8 = 1;
/// RFC 1929 sends each length in one byte.
const SOCKS_MAX_CREDENTIAL: usize = 255;

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
        let shown = redact(url);
        let bad =
            |reason: &str| Error::usage(format!("-u/--upstream: invalid URL '{shown}': {reason}"));

        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("missing scheme (expected socks5:// or http://)"))?;
        let kind = if scheme.eq_ignore_ascii_case("socks5") {
            Kind::Socks5
        } else if scheme.eq_ignore_ascii_case("http") {
            Kind::HttpConnect
        } else {
            return Err(bad("scheme must be socks5 or http"));
        };

        // The last '@' ends the user info, so a password with an unencoded
        // '@' or '/' still parses the way its owner meant.
        let (userinfo, hostport) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        // Proxy URLs are often written with a trailing '/' (as in
        // http_proxy=); any other path would be silently ignored, so refuse it.
        let hostport = match hostport.find(['/', '?', '#']) {
            Some(i) if &hostport[i..] == "/" => &hostport[..i],
            Some(i) => {
                return Err(bad(&format!(
                    "unexpected '{}' after host:port",
                    &hostport[i..]
                )))
            }
            None => hostport,
        };
        let (host, port) = split_host_port(hostport).map_err(|reason| bad(&reason))?;

        let creds = match userinfo {
            None => None,
            Some(info) => {
                let (user, pass) = info.split_once(':').unwrap_or((info, ""));
                let user = percent_decode(user)
                    .ok_or_else(|| bad("invalid percent-encoding in the username"))?;
                let pass = percent_decode(pass)
                    .ok_or_else(|| bad("invalid percent-encoding in the password"))?;
                if user.is_empty() {
                    return Err(bad("empty username"));
                }
                if kind == Kind::Socks5
                    && (user.len() > SOCKS_MAX_CREDENTIAL || pass.len() > SOCKS_MAX_CREDENTIAL)
                {
                    return Err(bad(
                        "SOCKS5 allows at most 255 bytes each for username and password",
                    ));
                }
                Some(Credentials { user, pass })
            }
        };

        let addr = resolve(host, port).map_err(|reason| {
            Error::new(format!(
                "-u/--upstream: cannot resolve host '{host}': {reason}"
            ))
        })?;

        Ok(Upstream {
            kind,
            addr,
            creds,
            shown,
        })
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

    fn socks5(&self, s: &mut TcpStream, dst: SocketAddr) -> Result<(), String> {
        let greeting: &[u8] = if self.creds.is_some() {
            &[SOCKS_VERSION, 2, METHOD_NONE, METHOD_USERPASS]
        } else {
            &[SOCKS_VERSION, 1, METHOD_NONE]
        };
        self.send(s, greeting)?;
        let mut choice = [0u8; 2];
        self.recv(s, &mut choice)?;
        self.check_socks_version(choice[0])?;
        match (choice[1], &self.creds) {
            (METHOD_NONE, _) => {}
            (METHOD_USERPASS, Some(creds)) => self.socks5_auth(s, creds)?,
            (METHOD_USERPASS, None) => {
                return Err(format!(
                    "{} requires authentication (method 0x02) but no credentials were given",
                    self.who()
                ))
            }
            // A conforming server that wants a password answers "no
            // acceptable method" to a client that offered none.
            (METHOD_NO_ACCEPTABLE, None) => {
                return Err(format!(
                    "{} requires authentication: it accepted none of the offered methods \
                     (no authentication); give user:pass in the URL",
                    self.who()
                ))
            }
            (METHOD_NO_ACCEPTABLE, Some(_)) => {
                return Err(format!(
                    "{} accepted none of the offered authentication methods \
                     (no authentication, username/password)",
                    self.who()
                ))
            }
            (method, _) => {
                return Err(format!(
                    "{} chose authentication method 0x{method:02x}, which was not offered",
                    self.who()
                ))
            }
        }

        let mut req = vec![SOCKS_VERSION, CMD_CONNECT, 0];
        match dst.ip() {
            IpAddr::V4(ip) => {
                req.push(ATYP_IPV4);
                req.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                req.push(ATYP_IPV6);
                req.extend_from_slice(&ip.octets());
            }
        }
        req.extend_from_slice(&dst.port().to_be_bytes());
        self.send(s, &req)?;

        // VER REP RSV ATYP, then BND.ADDR and BND.PORT, whose length ATYP decides.
        let mut head = [0u8; 4];
        self.recv(s, &mut head)?;
        self.check_socks_version(head[0])?;
        if head[1] != 0 {
            return Err(format!(
                "{} refused: {} (reply {})",
                self.who(),
                socks_reply_text(head[1]),
                head[1]
            ));
        }
        let bound_len = match head[3] {
            ATYP_IPV4 => 4 + 2,
            ATYP_IPV6 => 16 + 2,
            ATYP_DOMAIN => {
                let mut len = [0u8; 1];
                self.recv(s, &mut len)?;
                usize::from(len[0]) + 2
            }
            atyp => {
                // Its length is unknown, so the tunnel would start mid-reply.
                return Err(format!(
                    "{} sent a reply with unknown address type {atyp}",
                    self.who()
                ));
            }
        };
        let mut bound = [0u8; 255 + 2];
        self.recv(s, &mut bound[..bound_len])
    }

    fn socks5_auth(&self, s: &mut TcpStream, creds: &Credentials) -> Result<(), String> {
        let mut msg = Vec::with_capacity(3 + creds.user.len() + creds.pass.len());
        msg.push(USERPASS_VERSION);
        // parse() capped both at 255 bytes, so the casts cannot truncate.
        msg.push(creds.user.len() as u8);
        msg.extend_from_slice(&creds.user);
        msg.push(creds.pass.len() as u8);
        msg.extend_from_slice(&creds.pass);
        self.send(s, &msg)?;
        let mut reply = [0u8; 2];
        self.recv(s, &mut reply)?;
        // The version byte is not checked: some servers answer 5 instead of 1,
        // and the status alone says whether we are in.
        if reply[1] != 0 {
            return Err(format!("{} rejected the username/password", self.who()));
        }
        Ok(())
    }

    fn check_socks_version(&self, version: u8) -> Result<(), String> {
        if version == SOCKS_VERSION {
            return Ok(());
        }
        Err(format!(
            "{} answered with version 0x{version:02x} instead of 5: is it a SOCKS5 proxy?",
            self.who()
        ))
    }

    fn http_connect(&self, s: &mut TcpStream, dst: SocketAddr) -> Result<(), String> {
        // Not SocketAddrV6's Display: a zone id means nothing to the proxy.
        let target = match dst {
            SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(creds) = &self.creds {
            let mut pair = creds.user.clone();
            pair.push(b':');
            pair.extend_from_slice(&creds.pass);
            req.push_str(&format!("Proxy-Authorization: Basic {}\r\n", base64(&pair)));
        }
        req.push_str("\r\n");
        self.send(s, req.as_bytes())?;

        let head = self.read_http_head(s)?;
        let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
        let line = &head[..line_end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some((code, reason)) = parse_status_line(line) else {
            return Err(format!(
                "{} sent a malformed status line '{}': is it an HTTP proxy?",
                self.who(),
                printable(&String::from_utf8_lossy(line))
            ));
        };
        if (200..300).contains(&code) {
            return Ok(());
        }
        let mut msg = format!("{} answered {code}", self.who());
        if !reason.is_empty() {
            msg.push(' ');
            msg.push_str(&reason);
        }
        // tinyproxy answers a wrong password with 401, the RFC says 407.
        if code == 407 || code == 401 {
            msg.push_str(if self.creds.is_some() {
                " (the credentials were rejected)"
            } else {
                " (no credentials were given)"
            });
        }
        Err(msg)
    }

    /// Reads the response head up to and including its blank line, and not
    /// one byte more: peek, then consume only what belongs to the head.
    /// Reading byte by byte would be as exact but costs a syscall per byte.
    fn read_http_head(&self, s: &mut TcpStream) -> Result<Vec<u8>, String> {
        let mut head = Vec::new();
        let mut buf = vec![0u8; MAX_HTTP_HEAD];
        loop {
            let room = MAX_HTTP_HEAD - head.len();
            let n = loop {
                match s.peek(&mut buf[..room]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.io_failure(&e)),
                }
            };
            if n == 0 {
                return Err(self.io_failure(&io::ErrorKind::UnexpectedEof.into()));
            }
            let old_len = head.len();
            head.extend_from_slice(&buf[..n]);
            // The blank line may straddle two peeks; back up far enough to
            // see a "\r\n\r\n" whose first three bytes were already consumed.
            let end = head_end(&head, old_len.saturating_sub(3));
            let take = end.map_or(n, |end| end - old_len);
            head.truncate(old_len + take);
            // Already peeked, so this returns at once with the same bytes.
            self.recv(s, &mut buf[..take])?;
            if end.is_some() {
                return Ok(head);
            }
            if head.len() >= MAX_HTTP_HEAD {
                return Err(format!(
                    "{} sent a response head larger than 16 KiB",
                    self.who()
                ));
            }
        }
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

/// Splits "host:port" or "[v6]:port"; the error is the reason alone.
fn split_host_port(s: &str) -> Result<(&str, u16), String> {
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let (ip, after) = inner
            .split_once(']')
            .ok_or_else(|| "missing ']' after IPv6 address".to_string())?;
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address '{ip}'"));
        }
        match after.strip_prefix(':') {
            Some(port) => (ip, port),
            None if after.is_empty() => return Err("missing port".to_string()),
            None => return Err(format!("unexpected '{after}' after ']'")),
        }
    } else {
        match s.rsplit_once(':') {
            None if s.is_empty() => return Err("missing host".to_string()),
            None => return Err("missing port".to_string()),
            Some((host, _)) if host.contains(':') => {
                return Err("IPv6 addresses must be in brackets, e.g. [::1]:1080".to_string())
            }
            Some(pair) => pair,
        }
    };
    if host.is_empty() {
        return Err("missing host".to_string());
    }
    if port.is_empty() {
        return Err("missing port".to_string());
    }
    // u16's FromStr takes a leading '+', which no URL means.
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok((host, p)),
        _ => Err(format!("invalid port '{port}'")),
    }
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    match (host, port).to_socket_addrs() {
        // std prefixes getaddrinfo's reason with its own wording.
        Err(e) => Err(io_text(&e)
            .trim_start_matches("failed to lookup address information: ")
            .to_string()),
        Ok(mut addrs) => addrs.next().ok_or_else(|| "no addresses".to_string()),
    }
}

/// Replaces the password in `url` by "***", for logs and error messages.
fn redact(url: &str) -> String {
    let (prefix, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{prefix}{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// None on a '%' not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
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

fn socks_reply_text(code: u8) -> &'static str {
    match code {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused by destination host",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unassigned reply code",
    }
}

/// Index just past the blank line that ends an HTTP head, searching from
/// `from`. A bare "\n\n" counts too, as RFC 9112 lets recipients accept.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        if buf[i] != b'\n' {
            return None;
        }
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

/// "HTTP/1.1 407 Proxy Authentication Required" -> (407, "Proxy Authentication Required").
fn parse_status_line(line: &[u8]) -> Option<(u16, String)> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    let rest = line.strip_prefix("HTTP/")?;
    let (_version, rest) = rest.split_once(' ')?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((code.parse().ok()?, printable(reason.trim())))
}

/// The peer chose these bytes and they end up in the log: cap the length
/// and escape control characters so a reply cannot forge log lines.
fn printable(text: &str) -> String {
    const MAX_CHARS: usize = 100;
    let mut out = String::new();
    for c in text.chars().take(MAX_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if text.chars().count() > MAX_CHARS {
        out.push_str("...");
    }
    out
}

/// Standard base64 with padding (RFC 4648), for Proxy-Authorization: Basic.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        // A chunk of k bytes fills k + 1 sextets; '=' pads the rest.
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;
    use std::time::{Duration, Instant};

    const WAIT: Duration = Duration::from_secs(5);

    fn dst4() -> SocketAddr {
        "93.184.216.34:443".parse().unwrap()
    }

    /// A one-connection proxy on 127.0.0.1 running `script` on the accepted
    /// socket; the script's assertions fail the test through join().
    fn mock(
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

    fn join(h: thread::JoinHandle<()>) {
        if let Err(panic) = h.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// Runs one handshake against `script`; returns its result and the
    /// stream, from which the test can read what followed the reply.
    fn run(
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

    fn expect(s: &mut TcpStream, want: &[u8]) {
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }

    fn read_request_head(s: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        String::from_utf8(head).unwrap()
    }

    fn rest_of(mut s: TcpStream) -> Vec<u8> {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        rest
    }

    fn usage_error(url: &str) -> String {
        let e = Upstream::parse(url).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{url}: {e}");
        e.to_string()
    }

    // ---- URL parsing ----

    #[test]
    fn parses_socks5_with_ip_and_port() {
        let up = Upstream::parse("socks5://127.0.0.1:1080").unwrap();
        assert_eq!(up.kind(), Kind::Socks5);
        assert_eq!(up.addr(), "127.0.0.1:1080".parse().unwrap());
        assert!(up.creds.is_none());
        assert_eq!(up.display(), "socks5://127.0.0.1:1080");
    }

    #[test]
    fn parses_http_with_credentials_and_hides_the_password() {
        let up = Upstream::parse("http://alice:s3cret@10.0.0.1:3128").unwrap();
        assert_eq!(up.kind(), Kind::HttpConnect);
        assert_eq!(up.addr(), "10.0.0.1:3128".parse().unwrap());
        let c = up.creds.as_ref().unwrap();
        assert_eq!(
            (c.user.as_slice(), c.pass.as_slice()),
            (&b"alice"[..], &b"s3cret"[..])
        );
        assert_eq!(up.display(), "http://alice:***@10.0.0.1:3128");
        assert!(!format!("{up:?}").contains("s3cret"));
    }

    #[test]
    fn percent_decodes_username_and_password() {
        let up = Upstream::parse("socks5://me%40corp:p%3Aw%2f%25d@127.0.0.1:1080").unwrap();
        let c = up.creds.as_ref().unwrap();
        assert_eq!(c.user, b"me@corp");
        assert_eq!(c.pass, b"p:w/%d");
        assert_eq!(up.display(), "socks5://me%40corp:***@127.0.0.1:1080");
    }

    #[test]
    fn username_without_password_means_an_empty_password() {
        let up = Upstream::parse("socks5://bob@127.0.0.1:1080").unwrap();
        let c = up.creds.as_ref().unwrap();
        assert_eq!(
            (c.user.as_slice(), c.pass.as_slice()),
            (&b"bob"[..], &b""[..])
        );
        assert_eq!(up.display(), "socks5://bob@127.0.0.1:1080");
    }

    #[test]
    fn unencoded_at_sign_in_password_splits_at_the_last_one() {
        let up = Upstream::parse("socks5://u:p@ss@127.0.0.1:1080").unwrap();
        assert_eq!(up.creds.as_ref().unwrap().pass, b"p@ss");
        assert_eq!(up.display(), "socks5://u:***@127.0.0.1:1080");
    }

    #[test]
    fn parses_bracketed_ipv6_literal() {
        let up = Upstream::parse("socks5://[::1]:1080").unwrap();
        assert_eq!(up.addr(), "[::1]:1080".parse().unwrap());
        let up = Upstream::parse("http://u:p@[2001:db8::7]:3128").unwrap();
        assert_eq!(up.addr(), "[2001:db8::7]:3128".parse().unwrap());
    }

    #[test]
    fn scheme_is_case_insensitive_and_a_trailing_slash_is_accepted() {
        let up = Upstream::parse("SOCKS5://127.0.0.1:1080/").unwrap();
        assert_eq!(up.kind(), Kind::Socks5);
        let up = Upstream::parse("HTTP://127.0.0.1:8080/").unwrap();
        assert_eq!(up.kind(), Kind::HttpConnect);
        assert_eq!(up.addr().port(), 8080);
    }

    #[test]
    fn resolves_a_hostname_once() {
        let up = Upstream::parse("socks5://localhost:1080").unwrap();
        assert!(up.addr().ip().is_loopback(), "{}", up.addr());
        assert_eq!(up.addr().port(), 1080);
        assert_eq!(up.display(), "socks5://localhost:1080");
    }

    #[test]
    fn rejects_other_schemes() {
        for url in ["socks4://x:1", "https://x:1", "socks5h://x:1"] {
            assert_eq!(
                usage_error(url),
                format!("-u/--upstream: invalid URL '{url}': scheme must be socks5 or http")
            );
        }
    }

    #[test]
    fn rejects_a_url_without_scheme_and_hides_its_password() {
        assert_eq!(
            usage_error("u:secret@127.0.0.1:1080"),
            "-u/--upstream: invalid URL 'u:***@127.0.0.1:1080': \
             missing scheme (expected socks5:// or http://)"
        );
    }

    #[test]
    fn rejects_missing_port() {
        for url in [
            "socks5://127.0.0.1",
            "socks5://127.0.0.1:",
            "http://proxy",
            "socks5://[::1]",
            "socks5://u:p@[::1]:",
        ] {
            let shown = redact(url);
            assert_eq!(
                usage_error(url),
                format!("-u/--upstream: invalid URL '{shown}': missing port")
            );
        }
    }

    #[test]
    fn rejects_invalid_ports() {
        for (url, port) in [
            ("socks5://h:0", "0"),
            ("socks5://h:65536", "65536"),
            ("socks5://h:http", "http"),
            ("socks5://h:+80", "+80"),
            ("socks5://[::1]:-1", "-1"),
        ] {
            assert_eq!(
                usage_error(url),
                format!("-u/--upstream: invalid URL '{url}': invalid port '{port}'")
            );
        }
    }

    #[test]
    fn rejects_missing_host() {
        for url in ["socks5://:1080", "socks5://", "http://u:p@:3128"] {
            let shown = redact(url);
            assert_eq!(
                usage_error(url),
                format!("-u/--upstream: invalid URL '{shown}': missing host")
            );
        }
    }

    #[test]
    fn rejects_ipv6_without_brackets() {
        assert_eq!(
            usage_error("socks5://::1:1080"),
            "-u/--upstream: invalid URL 'socks5://::1:1080': \
             IPv6 addresses must be in brackets, e.g. [::1]:1080"
        );
    }

    #[test]
    fn rejects_bad_bracketed_hosts() {
        assert_eq!(
            usage_error("socks5://[::1:1080"),
            "-u/--upstream: invalid URL 'socks5://[::1:1080': missing ']' after IPv6 address"
        );
        assert_eq!(
            usage_error("socks5://[localhost]:1080"),
            "-u/--upstream: invalid URL 'socks5://[localhost]:1080': \
             invalid IPv6 address 'localhost'"
        );
        assert_eq!(
            usage_error("socks5://[::1]x:1080"),
            "-u/--upstream: invalid URL 'socks5://[::1]x:1080': unexpected 'x:1080' after ']'"
        );
    }

    #[test]
    fn rejects_a_path_query_or_fragment() {
        assert_eq!(
            usage_error("http://127.0.0.1:3128/proxy"),
            "-u/--upstream: invalid URL 'http://127.0.0.1:3128/proxy': \
             unexpected '/proxy' after host:port"
        );
        assert_eq!(
            usage_error("http://127.0.0.1:3128?x=1"),
            "-u/--upstream: invalid URL 'http://127.0.0.1:3128?x=1': \
             unexpected '?x=1' after host:port"
        );
    }

    #[test]
    fn rejects_bad_percent_encoding() {
        assert_eq!(
            usage_error("socks5://a%4:pw@h:1"),
            "-u/--upstream: invalid URL 'socks5://a%4:***@h:1': \
             invalid percent-encoding in the username"
        );
        assert_eq!(
            usage_error("socks5://a:p%zz@h:1"),
            "-u/--upstream: invalid URL 'socks5://a:***@h:1': \
             invalid percent-encoding in the password"
        );
    }

    #[test]
    fn rejects_empty_username() {
        assert_eq!(
            usage_error("socks5://:pw@h:1"),
            "-u/--upstream: invalid URL 'socks5://:***@h:1': empty username"
        );
        assert_eq!(
            usage_error("http://@h:1"),
            "-u/--upstream: invalid URL 'http://@h:1': empty username"
        );
    }

    #[test]
    fn rejects_socks5_credentials_longer_than_255_bytes() {
        let long = "x".repeat(256);
        let e = usage_error(&format!("socks5://{long}:pw@h:1"));
        assert!(
            e.ends_with("SOCKS5 allows at most 255 bytes each for username and password"),
            "{e}"
        );
        let e = usage_error(&format!("socks5://u:{long}@h:1"));
        assert!(!e.contains(&long), "password leaked: {e}");
        // Basic auth has no such limit.
        assert!(Upstream::parse(&format!("http://u:{long}@127.0.0.1:1")).is_ok());
    }

    #[test]
    fn unresolvable_host_is_a_runtime_error() {
        let e = Upstream::parse("socks5://nope.invalid:1080").unwrap_err();
        assert_eq!(e.exit_code(), 1);
        let text = e.to_string();
        assert!(
            text.starts_with("-u/--upstream: cannot resolve host 'nope.invalid': "),
            "{text}"
        );
        assert!(!text.contains("failed to lookup"), "{text}");
    }

    // ---- SOCKS5 ----

    #[test]
    fn socks5_no_auth_connects_to_an_ipv4_destination() {
        let (r, s, _) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
            s.write_all(&[5, 0, 0, 1, 10, 0, 0, 1, 0x12, 0x34]).unwrap();
        });
        assert_eq!(r, Ok(()));
        assert!(rest_of(s).is_empty());
    }

    #[test]
    fn socks5_no_auth_connects_to_an_ipv6_destination() {
        let dst: SocketAddr = "[2001:db8::1]:8080".parse().unwrap();
        let (r, _, _) = run("socks5://", dst, |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            let mut want = vec![5, 1, 0, 4];
            want.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
            want.extend_from_slice(&[0x1f, 0x90]);
            expect(&mut s, &want);
            let mut reply = vec![5, 0, 0, 4];
            reply.extend_from_slice(&[0; 16]);
            reply.extend_from_slice(&[0, 0]);
            s.write_all(&reply).unwrap();
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn socks5_asks_for_ipv4_mapped_destinations_as_ipv4() {
        let dst: SocketAddr = "[::ffff:192.0.2.9]:25".parse().unwrap();
        let (r, _, _) = run("socks5://", dst, |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 192, 0, 2, 9, 0, 25]);
            s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn socks5_username_password_success() {
        let (r, _, _) = run("socks5://al%40ice:pw@", dst4(), |mut s| {
            expect(&mut s, &[5, 2, 0, 2]);
            s.write_all(&[5, 2]).unwrap();
            expect(&mut s, b"\x01\x06al@ice\x02pw");
            s.write_all(&[1, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
            s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn socks5_credentials_offered_but_no_auth_chosen_skips_authentication() {
        let (r, _, _) = run("socks5://u:p@", dst4(), |mut s| {
            expect(&mut s, &[5, 2, 0, 2]);
            s.write_all(&[5, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
            s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn socks5_username_password_rejected() {
        let (r, _, up) = run("socks5://u:wrong@", dst4(), |mut s| {
            expect(&mut s, &[5, 2, 0, 2]);
            s.write_all(&[5, 2]).unwrap();
            expect(&mut s, b"\x01\x01u\x05wrong");
            s.write_all(&[1, 1]).unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "SOCKS5 proxy {} rejected the username/password",
                up.addr()
            ))
        );
    }

    #[test]
    fn socks5_requiring_auth_without_credentials_says_so() {
        let (r, _, up) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 2]).unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "SOCKS5 proxy {} requires authentication (method 0x02) \
                 but no credentials were given",
                up.addr()
            ))
        );
    }

    #[test]
    fn socks5_no_acceptable_method() {
        let (r, _, up) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0xff]).unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "SOCKS5 proxy {} requires authentication: it accepted none of the offered \
                 methods (no authentication); give user:pass in the URL",
                up.addr()
            ))
        );
        let (r, _, up) = run("socks5://u:p@", dst4(), |mut s| {
            expect(&mut s, &[5, 2, 0, 2]);
            s.write_all(&[5, 0xff]).unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "SOCKS5 proxy {} accepted none of the offered authentication methods \
                 (no authentication, username/password)",
                up.addr()
            ))
        );
    }

    #[test]
    fn socks5_method_that_was_not_offered_is_an_error() {
        let (r, _, up) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 1]).unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "SOCKS5 proxy {} chose authentication method 0x01, which was not offered",
                up.addr()
            ))
        );
    }

    #[test]
    fn socks5_reply_codes_map_to_rfc_1928_words() {
        let words = [
            (1, "general SOCKS server failure"),
            (2, "connection not allowed by ruleset"),
            (3, "network unreachable"),
            (4, "host unreachable"),
            (5, "connection refused by destination host"),
            (6, "TTL expired"),
            (7, "command not supported"),
            (8, "address type not supported"),
            (9, "unassigned reply code"),
            (255, "unassigned reply code"),
        ];
        for (code, text) in words {
            let (r, _, up) = run("socks5://", dst4(), move |mut s| {
                expect(&mut s, &[5, 1, 0]);
                s.write_all(&[5, 0]).unwrap();
                expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
                s.write_all(&[5, code, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
            });
            assert_eq!(
                r,
                Err(format!(
                    "SOCKS5 proxy {} refused: {text} (reply {code})",
                    up.addr()
                ))
            );
        }
    }

    #[test]
    fn socks5_reply_with_domain_bound_address_is_read_completely() {
        let (r, s, _) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
            let mut reply = vec![5, 0, 0, 3, 13];
            reply.extend_from_slice(b"proxy.example");
            reply.extend_from_slice(&[0x04, 0x38]);
            reply.extend_from_slice(b"SSH-2.0-x\r\n");
            s.write_all(&reply).unwrap();
        });
        assert_eq!(r, Ok(()));
        assert_eq!(rest_of(s), b"SSH-2.0-x\r\n");
    }

    #[test]
    fn socks5_bytes_after_the_reply_stay_in_the_stream() {
        let (r, s, _) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
            s.write_all(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50220 mail ready\r\n")
                .unwrap();
        });
        assert_eq!(r, Ok(()));
        assert_eq!(rest_of(s), b"220 mail ready\r\n");
    }

    #[test]
    fn socks5_unknown_bound_address_type_is_an_error() {
        let (r, _, up) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
            s.write_all(&[5, 0, 0, 9]).unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "SOCKS5 proxy {} sent a reply with unknown address type 9",
                up.addr()
            ))
        );
    }

    #[test]
    fn socks5_upstream_closing_mid_handshake() {
        let (r, _, up) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            expect(&mut s, &[5, 1, 0, 1, 93, 184, 216, 34, 0x01, 0xbb]);
            s.write_all(&[5, 0, 0, 1, 0]).unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "upstream SOCKS5 proxy {} closed the connection during the handshake",
                up.addr()
            ))
        );
        let (r, _, _) = run("socks5://", dst4(), |mut s| expect(&mut s, &[5, 1, 0]));
        assert!(r
            .unwrap_err()
            .ends_with("closed the connection during the handshake"));
    }

    #[test]
    fn socks5_reply_from_something_else_names_the_version() {
        let (r, _, up) = run("socks5://", dst4(), |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "SOCKS5 proxy {} answered with version 0x48 instead of 5: is it a SOCKS5 proxy?",
                up.addr()
            ))
        );
    }

    #[test]
    fn handshake_times_out_when_the_upstream_never_answers() {
        let (addr, h) = mock(|mut s| {
            expect(&mut s, &[5, 1, 0]);
            // Hold the connection open, silent, until the client gives up.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let up = Upstream::parse(&format!("socks5://{addr}")).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let start = Instant::now();
        let r = up.handshake(&mut s, dst4());
        let took = start.elapsed();
        drop(s);
        join(h);
        assert_eq!(
            r,
            Err(format!(
                "upstream SOCKS5 proxy {addr} timed out during the handshake"
            ))
        );
        assert!(
            took >= Duration::from_millis(150) && took < WAIT,
            "{took:?}"
        );
    }

    #[test]
    fn http_handshake_times_out_while_waiting_for_the_status_line() {
        let (addr, h) = mock(|mut s| {
            read_request_head(&mut s);
            s.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        let up = Upstream::parse(&format!("http://{addr}")).unwrap();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let r = up.handshake(&mut s, dst4());
        drop(s);
        join(h);
        assert_eq!(
            r,
            Err(format!(
                "upstream HTTP proxy {addr} timed out during the handshake"
            ))
        );
    }

    // ---- HTTP CONNECT ----

    #[test]
    fn http_connect_200_with_basic_auth() {
        let (r, s, _) = run("http://user:pass@", dst4(), |mut s| {
            assert_eq!(
                read_request_head(&mut s),
                "CONNECT 93.184.216.34:443 HTTP/1.1\r\n\
                 Host: 93.184.216.34:443\r\n\
                 Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
                 \r\n"
            );
            s.write_all(b"HTTP/1.1 200 Connection established\r\nVia: mock\r\n\r\n")
                .unwrap();
        });
        assert_eq!(r, Ok(()));
        assert!(rest_of(s).is_empty());
    }

    #[test]
    fn http_connect_without_credentials_sends_no_authorization() {
        let dst: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        let (r, _, _) = run("http://", dst, |mut s| {
            assert_eq!(
                read_request_head(&mut s),
                "CONNECT [2001:db8::1]:80 HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"
            );
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn http_connect_accepts_http_1_0_and_any_2xx() {
        for status in [
            "HTTP/1.0 200 Connection established",
            "HTTP/1.1 204",
            "HTTP/1.1 299 Odd",
        ] {
            let (r, _, _) = run("http://", dst4(), move |mut s| {
                read_request_head(&mut s);
                s.write_all(format!("{status}\r\n\r\n").as_bytes()).unwrap();
            });
            assert_eq!(r, Ok(()), "{status}");
        }
    }

    #[test]
    fn http_connect_407_reports_status_and_reason() {
        let (r, _, up) = run("http://", dst4(), |mut s| {
            read_request_head(&mut s);
            s.write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\
                  Proxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n",
            )
            .unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "HTTP proxy {} answered 407 Proxy Authentication Required \
                 (no credentials were given)",
                up.addr()
            ))
        );
        let (r, _, _) = run("http://u:bad@", dst4(), |mut s| {
            read_request_head(&mut s);
            s.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                .unwrap();
        });
        assert!(r.unwrap_err().ends_with("(the credentials were rejected)"));
    }

    #[test]
    fn http_connect_403_and_502_report_status_and_reason() {
        for (status, text) in [
            ("HTTP/1.1 403 Forbidden", "403 Forbidden"),
            ("HTTP/1.1 502 Bad Gateway", "502 Bad Gateway"),
            ("HTTP/1.0 503", "503"),
        ] {
            let (r, _, up) = run("http://", dst4(), move |mut s| {
                read_request_head(&mut s);
                s.write_all(format!("{status}\r\nContent-Length: 3\r\n\r\nbad").as_bytes())
                    .unwrap();
            });
            assert_eq!(r, Err(format!("HTTP proxy {} answered {text}", up.addr())));
        }
    }

    #[test]
    fn http_connect_bytes_after_the_response_head_stay_in_the_stream() {
        let (r, s, _) = run("http://", dst4(), |mut s| {
            read_request_head(&mut s);
            s.write_all(b"HTTP/1.1 200 OK\r\nX-A: b\r\n\r\nSSH-2.0-OpenSSH\r\n")
                .unwrap();
        });
        assert_eq!(r, Ok(()));
        assert_eq!(rest_of(s), b"SSH-2.0-OpenSSH\r\n");
    }

    #[test]
    fn http_connect_head_split_across_segments_is_found_exactly() {
        let (r, s, _) = run("http://", dst4(), |mut s| {
            read_request_head(&mut s);
            for part in [&b"HTTP/1.1 200 OK\r"[..], b"\n\r", b"\n", b"tail"] {
                s.write_all(part).unwrap();
                thread::sleep(Duration::from_millis(30));
            }
        });
        assert_eq!(r, Ok(()));
        assert_eq!(rest_of(s), b"tail");
    }

    #[test]
    fn http_connect_accepts_bare_lf_line_ends() {
        let (r, s, _) = run("http://", dst4(), |mut s| {
            read_request_head(&mut s);
            s.write_all(b"HTTP/1.0 200 OK\nVia: x\n\nrest").unwrap();
        });
        assert_eq!(r, Ok(()));
        assert_eq!(rest_of(s), b"rest");
    }

    #[test]
    fn http_connect_refuses_an_endless_head() {
        let (r, _, up) = run("http://", dst4(), |mut s| {
            read_request_head(&mut s);
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            head.resize(MAX_HTTP_HEAD + 100, b'a');
            // The client stops reading at the cap and closes, so this may fail.
            let _ = s.write_all(&head);
        });
        assert_eq!(
            r,
            Err(format!(
                "HTTP proxy {} sent a response head larger than 16 KiB",
                up.addr()
            ))
        );
    }

    #[test]
    fn http_connect_malformed_status_line_is_quoted_safely() {
        let (r, _, up) = run("http://", dst4(), |mut s| {
            read_request_head(&mut s);
            s.write_all(b"\x05\xff garbage\x1b[31m\r\n\r\n").unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "HTTP proxy {} sent a malformed status line \
                 '\\u{{5}}\u{fffd} garbage\\u{{1b}}[31m': is it an HTTP proxy?",
                up.addr()
            ))
        );
    }

    #[test]
    fn http_connect_upstream_closing_before_the_head_ends() {
        let (r, _, up) = run("http://", dst4(), |mut s| {
            read_request_head(&mut s);
            s.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
        });
        assert_eq!(
            r,
            Err(format!(
                "upstream HTTP proxy {} closed the connection during the handshake",
                up.addr()
            ))
        );
    }

    // ---- helpers ----

    #[test]
    fn base64_known_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("user:pass", "dXNlcjpwYXNz"),
        ] {
            assert_eq!(base64(input.as_bytes()), output, "{input:?}");
        }
        assert_eq!(base64(&[0xfb, 0xff, 0xbf]), "+/+/");
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 200 OK\r"),
            Some((200, "OK".to_string()))
        );
        assert_eq!(
            parse_status_line(b"HTTP/1.0 407"),
            Some((407, String::new()))
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status_line(b"ICY 200 OK"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1"), None);
    }
}
