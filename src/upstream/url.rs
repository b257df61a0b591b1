//! The -u/--upstream URL: parsing, redaction, percent-decoding, and
//! resolving the proxy's host once at start-up.

use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::ops::Range;

use super::{socks5, Credentials, Kind, Upstream};
use crate::error::{self, io_text, Error};

/// Parses `socks5://[user:pass@]host:port` or `http://[user:pass@]host:port`
/// and resolves the host once, at start-up. `source` names where the URL
/// came from in error messages ("-u/--upstream", "--upstream-file PATH").
pub(super) fn parse(url: &str, source: &str) -> error::Result<Upstream> {
    let shown = redact(url);
    let bad = |reason: &str| Error::usage(format!("{source}: invalid URL '{shown}': {reason}"));

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
                && (user.len() > socks5::MAX_CREDENTIAL || pass.len() > socks5::MAX_CREDENTIAL)
            {
                return Err(bad(
                    "SOCKS5 allows at most 255 bytes each for username and password",
                ));
            }
            Some(Credentials { user, pass })
        }
    };

    let addr = resolve(host, port).map_err(|reason| {
        Error::new(format!("{source}: cannot resolve host '{host}': {reason}"))
    })?;

    Ok(Upstream {
        kind,
        addr,
        creds,
        shown,
    })
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

/// Where the user info of `url` is: after the scheme's "://" (or from the
/// start, without one) up to the last '@', the same split `parse` makes.
/// None without an '@'.
pub(super) fn userinfo_span(url: &str) -> Option<Range<usize>> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = start + url[start..].rfind('@')?;
    Some(start..end)
}

/// Replaces the whole user info of `url` by "***", for logs and error
/// messages: with hosted proxies the user name is often the secret itself
/// (`socks5://TOKEN@host:port`).
fn redact(url: &str) -> String {
    match userinfo_span(url) {
        Some(r) if !r.is_empty() => format!("{}***{}", &url[..r.start], &url[r.end..]),
        _ => url.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(up.display(), "http://***@10.0.0.1:3128");
        assert!(!format!("{up:?}").contains("s3cret"));
        assert!(!format!("{up:?}").contains("alice"));
    }

    #[test]
    fn percent_decodes_username_and_password() {
        let up = Upstream::parse("socks5://me%40corp:p%3Aw%2f%25d@127.0.0.1:1080").unwrap();
        let c = up.creds.as_ref().unwrap();
        assert_eq!(c.user, b"me@corp");
        assert_eq!(c.pass, b"p:w/%d");
        assert_eq!(up.display(), "socks5://***@127.0.0.1:1080");
    }

    #[test]
    fn username_without_password_means_an_empty_password_and_is_hidden_too() {
        // Hosted proxies take a token as the user name, with no password.
        let up = Upstream::parse("socks5://tok3n@127.0.0.1:1080").unwrap();
        let c = up.creds.as_ref().unwrap();
        assert_eq!(
            (c.user.as_slice(), c.pass.as_slice()),
            (&b"tok3n"[..], &b""[..])
        );
        assert_eq!(up.display(), "socks5://***@127.0.0.1:1080");
        assert!(!format!("{up:?}").contains("tok3n"));
    }

    #[test]
    fn userinfo_span_matches_the_split_parse_makes() {
        let url = "http://u:p@ss@h:1";
        assert_eq!(&url[userinfo_span(url).unwrap()], "u:p@ss");
        assert_eq!(userinfo_span("socks5://h:1"), None);
        assert_eq!(&"t@h:1"[userinfo_span("t@h:1").unwrap()], "t");
        assert_eq!(redact("http://@h:1"), "http://@h:1");
        assert!(crate::upstream::has_credentials("socks5://t@h:1"));
        assert!(!crate::upstream::has_credentials("socks5://h:1"));
    }

    #[test]
    fn unencoded_at_sign_in_password_splits_at_the_last_one() {
        let up = Upstream::parse("socks5://u:p@ss@127.0.0.1:1080").unwrap();
        assert_eq!(up.creds.as_ref().unwrap().pass, b"p@ss");
        assert_eq!(up.display(), "socks5://***@127.0.0.1:1080");
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
            "-u/--upstream: invalid URL '***@127.0.0.1:1080': \
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
            "-u/--upstream: invalid URL 'socks5://***@h:1': \
             invalid percent-encoding in the username"
        );
        assert_eq!(
            usage_error("socks5://a:p%zz@h:1"),
            "-u/--upstream: invalid URL 'socks5://***@h:1': \
             invalid percent-encoding in the password"
        );
    }

    #[test]
    fn rejects_empty_username() {
        assert_eq!(
            usage_error("socks5://:pw@h:1"),
            "-u/--upstream: invalid URL 'socks5://***@h:1': empty username"
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
}
