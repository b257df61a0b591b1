//! The systemd readiness protocol (sd_notify(3)) without libsystemd: one
//! datagram of `KEY=VALUE` lines on the Unix socket named in $NOTIFY_SOCKET.
//! Without that variable (not started by systemd with Type=notify) nothing
//! is sent. A path starting with '@' names an abstract socket.
//!
//! A failure to notify is a warning, not an error: ktproxy works either way,
//! and under systemd the missing READY=1 shows as a start-up timeout that
//! this warning explains.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use log::warn;

/// Interception works (programs attached, listeners accepting): the same
/// moment as the `ready` log line.
pub fn ready() {
    send("READY=1");
}

/// ktproxy is shutting down: detaching and closing follow.
pub fn stopping() {
    send("STOPPING=1");
}

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_to(&path, state) {
        warn!(
            "cannot tell systemd {state} on NOTIFY_SOCKET {}: {}",
            path.to_string_lossy(),
            crate::error::io_text(&e)
        );
    }
}

fn send_to(path: &OsStr, state: &str) -> io::Result<()> {
    let addr = address(path)?;
    let sock = UnixDatagram::unbound()?;
    let n = sock.send_to_addr(state.as_bytes(), &addr)?;
    if n != state.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short datagram"));
    }
    Ok(())
}

fn address(path: &OsStr) -> io::Result<SocketAddr> {
    match path.as_bytes() {
        [] => Err(io::Error::new(io::ErrorKind::InvalidInput, "empty")),
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        [b'/', ..] => SocketAddr::from_pathname(path),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor @abstract",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn paths_and_abstract_names_are_addresses_relative_paths_are_not() {
        let a = address(OsStr::new("/run/systemd/notify")).unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = address(OsStr::new("@ktproxy/notify")).unwrap();
        assert_eq!(a.as_abstract_name(), Some(&b"ktproxy/notify"[..]));
        assert!(address(OsStr::new("")).is_err());
        assert!(address(OsStr::new("run/notify")).is_err());
    }

    #[test]
    fn datagrams_reach_an_abstract_socket() {
        let name = format!("ktproxy-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        send_to(OsStr::from_bytes(format!("@{name}").as_bytes()), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
