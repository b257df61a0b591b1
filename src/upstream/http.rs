//! HTTP CONNECT (RFC 9110 9.3.6), with Basic proxy authentication.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use super::{AuthFailure, Credentials, Failure, HttpStatus, Refusal, Target, Violation};

/// Real CONNECT response heads are a few hundred bytes; more than this means
/// the peer is broken or not a proxy, and the head must not grow unbounded.
pub(super) const MAX_HEAD: usize = 16 * 1024;

/// Sends CONNECT and reads the response head to its blank line and not one
/// byte further; any 2xx opens the tunnel.
pub(super) fn handshake(
    s: &mut TcpStream,
    creds: Option<&Credentials>,
    dst: Target,
) -> Result<(), Failure> {
    s.write_all(connect_request(creds, dst).as_bytes())?;

    let head = read_head(s)?;
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some((code, reason)) = parse_status_line(line) else {
        return Err(Failure::Protocol(Violation::HttpStatusLine(printable(
            &String::from_utf8_lossy(line),
        ))));
    };
    if (200..300).contains(&code) {
        return Ok(());
    }
    let status = HttpStatus { code, reason };
    // tinyproxy answers a wrong password with 401, the RFC says 407.
    if code == 407 || code == 401 {
        return Err(Failure::Auth(AuthFailure::Http {
            status,
            credentials_given: creds.is_some(),
        }));
    }
    Err(Failure::Refused(Refusal::Http(status)))
}

/// The request head, blank line included.
/// The target is `1.2.3.4:443`, `[2001:db8::1]:443` or `example.com:443`
/// (Target's Display), in the request line and in Host.
fn connect_request(creds: Option<&Credentials>, dst: Target) -> String {
    let target = dst.to_string();
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(creds) = creds {
        let mut pair = creds.user.clone();
        pair.push(b':');
        pair.extend_from_slice(&creds.pass);
        req.push_str(&format!("Proxy-Authorization: Basic {}\r\n", base64(&pair)));
    }
    req.push_str("\r\n");
    req
}

/// Reads the response head up to and including its blank line, and not
/// one byte more: peek, then consume only what belongs to the head.
/// Reading byte by byte would be as exact but costs a syscall per byte.
fn read_head(s: &mut TcpStream) -> Result<Vec<u8>, Failure> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        let room = MAX_HEAD - head.len();
        let n = loop {
            match s.peek(&mut buf[..room]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(e)),
            }
        };
        if n == 0 {
            return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let old_len = head.len();
        head.extend_from_slice(&buf[..n]);
        // The blank line may straddle two peeks; back up far enough to
        // see a "\r\n\r\n" whose first three bytes were already consumed.
        let end = head_end(&head, old_len.saturating_sub(3));
        let take = end.map_or(n, |end| end - old_len);
        head.truncate(old_len + take);
        // Already peeked, so this returns at once with the same bytes.
        s.read_exact(&mut buf[..take])?;
        if end.is_some() {
            return Ok(head);
        }
        if head.len() >= MAX_HEAD {
            return Err(Failure::Protocol(Violation::HttpHeadTooLarge));
        }
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
    use std::io::{Read, Write};
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::upstream::mock::*;
    use crate::upstream::Upstream;

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
        let r = up.handshake(&mut s, dst4()).map_err(|e| e.to_string());
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
    fn http_connect_asks_for_a_name_in_the_request_line_and_host() {
        let dst = Target::name("secret.test", 8443).unwrap();
        let (r, _, _) = run("http://", dst, |mut s| {
            assert_eq!(
                read_request_head(&mut s),
                "CONNECT secret.test:8443 HTTP/1.1\r\nHost: secret.test:8443\r\n\r\n"
            );
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        });
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn http_connect_without_credentials_sends_no_authorization() {
        let dst: std::net::SocketAddr = "[2001:db8::1]:80".parse().unwrap();
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
            head.resize(MAX_HEAD + 100, b'a');
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
