//! Minimal HTTP/1.x server for trying ktproxy out and for its tests.
//!
//! Every response names the address the connection was accepted on, so a
//! client can tell which server it really reached when a proxy sits between.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::exit;
use std::thread;
use std::time::Duration;

use ktproxy::error::io_text;
use ktproxy::logline;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const MAX_HEAD: usize = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn usage(opts: &getopts::Options) -> String {
    opts.usage(
        "Usage: testserver [-l ADDR:PORT]...\n\n\
         Answers every HTTP request with the address it was accepted on and the\n\
         client's address, then closes the connection.",
    )
}

fn main() {
    let mut opts = getopts::Options::new();
    opts.optmulti(
        "l",
        "listen",
        &format!("address to listen on, repeatable; IPv6 as [::1]:8080 (default {DEFAULT_LISTEN})"),
        "ADDR:PORT",
    );
    opts.optflag("h", "help", "print this help");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let m = match opts.parse(&args) {
        Ok(m) => m,
        Err(e) => die(2, &e.to_string()),
    };
    if m.opt_present("h") {
        print!("{}", usage(&opts));
        return;
    }
    if let Some(extra) = m.free.first() {
        die(2, &format!("unexpected argument '{extra}' (see --help)"));
    }
    let mut specs = m.opt_strs("l");
    if specs.is_empty() {
        specs.push(DEFAULT_LISTEN.to_string());
    }
    let addrs: Vec<SocketAddr> = specs
        .iter()
        .map(|s| {
            s.parse().unwrap_or_else(|_| {
                die(
                    2,
                    &format!("invalid listen address '{s}': expected ADDR:PORT"),
                )
            })
        })
        .collect();

    // Bind everything before announcing anything, so a test that sees the
    // first "listening" line never races a later bind failure.
    let listeners: Vec<TcpListener> = addrs
        .iter()
        .map(|a| {
            TcpListener::bind(a)
                .unwrap_or_else(|e| die(1, &format!("cannot listen on {a}: {}", io_text(&e))))
        })
        .collect();
    let mut out = io::stdout().lock();
    for l in &listeners {
        let local = match l.local_addr() {
            Ok(a) => a,
            Err(e) => die(1, &format!("getsockname: {}", io_text(&e))),
        };
        // Tests and scripts wait for this line, and stdout may be a pipe.
        let _ = writeln!(out, "{}", logline::testserver_listening(local));
    }
    let _ = out.flush();
    drop(out);

    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| thread::spawn(move || accept_loop(l)))
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let spawned = thread::Builder::new().spawn(move || match serve(stream, peer) {
                    Err(e) if !client_gone(&e) => {
                        eprintln!("testserver: {peer}: {}", io_text(&e))
                    }
                    _ => {}
                });
                if let Err(e) = spawned {
                    eprintln!("testserver: {peer}: cannot start thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("testserver: accept: {}", io_text(&e));
                // EMFILE and friends persist for a while; don't spin on them.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let local = stream.local_addr()?;
    let body = format!("Hello from testserver at {local}, you are {peer}\n");
    // The answer does not depend on the request, so it goes out before the
    // head is read: clients that send nothing (testclient hello) get it too.
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    // Closing with unread request bytes would make the kernel send RST
    // instead of FIN, and the client could lose the response.
    drain_head(&mut stream)
}

/// Reads until the end of the request head, EOF, the size cap or the timeout.
fn drain_head(stream: &mut TcpStream) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    while head.len() < MAX_HEAD {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The response is already out: a silent client is not an error.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        // Re-scan a few old bytes: the terminator may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(());
        }
    }
    Ok(())
}

/// A client that hangs up early is normal for a test server, not news.
fn client_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

fn die(code: i32, msg: &str) -> ! {
    eprintln!("testserver: {msg}");
    exit(code)
}
