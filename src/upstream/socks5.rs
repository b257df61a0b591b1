//! SOCKS5 (RFC 1928) with username/password authentication (RFC 1929).

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};

use super::{AuthFailure, Credentials, Failure, Refusal, Target, Violation};

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
pub(super) const MAX_CREDENTIAL: usize = 255;

/// Greeting, authentication if the server picks it, then CONNECT; reads the
/// reply to its last byte and not one byte further.
pub(super) fn handshake(
    s: &mut TcpStream,
    creds: Option<&Credentials>,
    dst: Target,
) -> Result<(), Failure> {
    let greeting: &[u8] = if creds.is_some() {
        &[SOCKS_VERSION, 2, METHOD_NONE, METHOD_USERPASS]
    } else {
        &[SOCKS_VERSION, 1, METHOD_NONE]
    };
    s.write_all(greeting)?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice)?;
    check_version(choice[0])?;
    match (choice[1], creds) {
        (METHOD_NONE, _) => {}
        (METHOD_USERPASS, Some(creds)) => authenticate(s, creds)?,
        (METHOD_USERPASS, None) => {
            return Err(Failure::Auth(AuthFailure::Socks5CredentialsMissing))
        }
        // A conforming server that wants a password answers "no
        // acceptable method" to a client that offered none.
        (METHOD_NO_ACCEPTABLE, creds) => {
            return Err(Failure::Auth(AuthFailure::Socks5NoAcceptableMethod {
                offered_password: creds.is_some(),
            }))
        }
        (method, _) => return Err(Failure::Protocol(Violation::Socks5MethodNotOffered(method))),
    }

    s.write_all(&connect_request(dst))?;

    // VER REP RSV ATYP, then BND.ADDR and BND.PORT, whose length ATYP decides.
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    check_version(head[0])?;
    if head[1] != 0 {
        return Err(Failure::Refused(Refusal::Socks5(head[1])));
    }
    let bound_len = match head[3] {
        ATYP_IPV4 => 4 + 2,
        ATYP_IPV6 => 16 + 2,
        ATYP_DOMAIN => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len)?;
            usize::from(len[0]) + 2
        }
        // Its length is unknown, so the tunnel would start mid-reply.
        atyp => return Err(Failure::Protocol(Violation::Socks5AddressType(atyp))),
    };
    let mut bound = [0u8; 255 + 2];
    s.read_exact(&mut bound[..bound_len])?;
    Ok(())
}

/// VER CMD RSV, then DST.ADDR as ATYP and address (a name: its length in
/// one byte, then its bytes), then DST.PORT.
fn connect_request(dst: Target) -> Vec<u8> {
    let mut req = vec![SOCKS_VERSION, CMD_CONNECT, 0];
    let port = match dst {
        Target::Addr(a) => {
            match a.ip() {
                IpAddr::V4(ip) => {
                    req.push(ATYP_IPV4);
                    req.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    req.push(ATYP_IPV6);
                    req.extend_from_slice(&ip.octets());
                }
            }
            a.port()
        }
        Target::Name(name, port) => {
            req.push(ATYP_DOMAIN);
            // Target::name capped it at 255 bytes.
            req.push(name.len() as u8);
            req.extend_from_slice(name.as_bytes());
            port
        }
    };
    req.extend_from_slice(&port.to_be_bytes());
    req
}

fn authenticate(s: &mut TcpStream, creds: &Credentials) -> Result<(), Failure> {
    let mut msg = Vec::with_capacity(3 + creds.user.len() + creds.pass.len());
    msg.push(USERPASS_VERSION);
    // parse() capped both at 255 bytes, so the casts cannot truncate.
    msg.push(creds.user.len() as u8);
    msg.extend_from_slice(&creds.user);
    msg.push(creds.pass.len() as u8);
    msg.extend_from_slice(&creds.pass);
    s.write_all(&msg)?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply)?;
    // The version byte is not checked: some servers answer 5 instead of 1,
    // and the status alone says whether we are in.
    if reply[1] != 0 {
        return Err(Failure::Auth(AuthFailure::Socks5Rejected));
    }
    Ok(())
}

fn check_version(version: u8) -> Result<(), Failure> {
    if version == SOCKS_VERSION {
        return Ok(());
    }
    Err(Failure::Protocol(Violation::Socks5Version(version)))
}

/// RFC 1928's words for a reply code (REP).
pub(super) fn reply_text(code: u8) -> &'static str {
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv6Addr, SocketAddr};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::upstream::mock::*;
    use crate::upstream::Upstream;

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
    fn socks5_sends_a_name_as_a_domain_address() {
        let dst = Target::name("secret.test", 443).unwrap();
        let (r, s, _) = run("socks5://", dst, |mut s| {
            expect(&mut s, &[5, 1, 0]);
            s.write_all(&[5, 0]).unwrap();
            let mut want = vec![5, 1, 0, 3, 11];
            want.extend_from_slice(b"secret.test");
            want.extend_from_slice(&[0x01, 0xbb]);
            expect(&mut s, &want);
            s.write_all(&[5, 0, 0, 1, 10, 0, 0, 1, 0x12, 0x34, b'X'])
                .unwrap();
        });
        assert_eq!(r, Ok(()));
        assert_eq!(rest_of(s), b"X", "nothing past the reply was read");
    }

    #[test]
    fn socks5_sends_a_255_byte_name_with_its_length_byte() {
        let name: &'static str = Box::leak("n".repeat(255).into_boxed_str());
        let (r, _, _) = run(
            "socks5://",
            Target::name(name, 80).unwrap(),
            move |mut s| {
                expect(&mut s, &[5, 1, 0]);
                s.write_all(&[5, 0]).unwrap();
                let mut want = vec![5, 1, 0, 3, 255];
                want.extend_from_slice(name.as_bytes());
                want.extend_from_slice(&[0, 80]);
                expect(&mut s, &want);
                s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
            },
        );
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
    fn socks5_upstream_resetting_mid_handshake_names_the_reason() {
        let (r, _, up) = run("socks5://", dst4(), |s| {
            // Closing with the greeting unread makes the kernel answer with
            // a RST instead of a FIN.
            assert!(s.peek(&mut [0u8; 3]).unwrap() > 0);
        });
        assert_eq!(
            r,
            Err(format!(
                "upstream SOCKS5 proxy {} failed during the handshake: Connection reset by peer",
                up.addr()
            ))
        );
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
        let r = up.handshake(&mut s, dst4()).map_err(|e| e.to_string());
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
}
