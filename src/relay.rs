//! The per-connection relay: both directions in one thread, poll(2) plus
//! non-blocking splice(2) through pooled pipes. Bytes never enter user space.
//!
//! Half-close is forwarded: EOF from one side becomes shutdown(SHUT_WR) on the
//! other, and the connection ends only when both directions are done, so a
//! client that sends, shuts down, then reads (`nc -N`) gets its answer.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use log::trace;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::pipes::{Pipe, PipePool};
use crate::sys;

#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// client → target
    pub up: u64,
    /// target → client
    pub down: u64,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Wait {
    Readable,
    Writable,
    Done,
}

/// One direction of the connection.
struct Half<'a> {
    from: BorrowedFd<'a>,
    to: BorrowedFd<'a>,
    /// For -vv traces: "#7 up".
    id: u64,
    name: &'static str,
    /// Holds `buffered` bytes read from `from` and not yet written to `to`.
    pipe: Option<Pipe>,
    buffered: usize,
    /// poll said `from` is readable (or we have not asked yet).
    readable: bool,
    eof: bool,
    moved: u64,
}

impl<'a> Half<'a> {
    fn new(
        id: u64,
        from: BorrowedFd<'a>,
        to: BorrowedFd<'a>,
        name: &'static str,
        readable: bool,
    ) -> Half<'a> {
        Half {
            from,
            to,
            id,
            name,
            pipe: None,
            buffered: 0,
            readable,
            eof: false,
            moved: 0,
        }
    }

    /// Moves as much as possible without blocking; says what it waits for.
    fn pump(&mut self, pipes: &PipePool) -> io::Result<Wait> {
        loop {
            if let Some(pipe) = &self.pipe {
                if self.buffered > 0 {
                    let n = sys::splice(pipe.read_fd(), self.to, self.buffered);
                    trace!(
                        "#{} {}: splice(pipe, {}) = {:?}",
                        self.id,
                        self.name,
                        self.to.as_raw_fd(),
                        n
                    );
                    match n {
                        // A socket that takes nothing would have us spin.
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => {
                            self.buffered -= n;
                            self.moved += n as u64;
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Ok(Wait::Writable)
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if let Some(empty) = self.pipe.take() {
                pipes.give_back(empty);
            }
            if self.eof {
                return Ok(Wait::Done);
            }
            if !self.readable {
                return Ok(Wait::Readable);
            }
            let pipe = pipes.take()?;
            let n = sys::splice(self.from, pipe.write_fd(), pipe.capacity());
            trace!(
                "#{} {}: splice({}, pipe) = {:?}",
                self.id,
                self.name,
                self.from.as_raw_fd(),
                n
            );
            match n {
                Ok(0) => {
                    pipes.give_back(pipe);
                    self.eof = true;
                    // Forward the half-close. ENOTCONN: the peer is gone
                    // already, which the other direction will report.
                    let r = sys::shutdown_write(self.to);
                    trace!(
                        "#{} {}: shutdown({}, SHUT_WR) = {:?}",
                        self.id,
                        self.name,
                        self.to.as_raw_fd(),
                        r
                    );
                    return Ok(Wait::Done);
                }
                Ok(n) => {
                    // A short read drained the socket: the next read would
                    // only say EAGAIN, so leave it to poll to say when.
                    self.readable = n == pipe.capacity();
                    self.buffered = n;
                    self.pipe = Some(pipe);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipes.give_back(pipe);
                    self.readable = false;
                    return Ok(Wait::Readable);
                }
                Err(e) => {
                    pipes.give_back(pipe);
                    return Err(e);
                }
            }
        }
    }
}

/// Relays until both directions are done. On error, returns the totals so far
/// with the error; the caller resets both sockets. `id` labels -vv traces.
pub fn relay(
    id: u64,
    client: &TcpStream,
    target: &TcpStream,
    pipes: &PipePool,
) -> (Totals, Option<io::Error>) {
    let (c, t) = (client.as_fd(), target.as_fd());
    // The client has usually sent its request already; the target has not
    // said anything yet, so do not spend a pipe asking it.
    let mut up = Half::new(id, c, t, "up", true);
    let mut down = Half::new(id, t, c, "down", false);
    let err = run(&mut up, &mut down, pipes).err();
    (
        Totals {
            up: up.moved,
            down: down.moved,
        },
        err,
    )
}

fn run(up: &mut Half, down: &mut Half, pipes: &PipePool) -> io::Result<()> {
    loop {
        let wu = up.pump(pipes)?;
        let wd = down.pump(pipes)?;
        if wu == Wait::Done && wd == Wait::Done {
            return Ok(());
        }
        let interest = |read: bool, write: bool| {
            let mut f = PollFlags::empty();
            f.set(PollFlags::POLLIN, read);
            f.set(PollFlags::POLLOUT, write);
            f
        };
        let ce = interest(wu == Wait::Readable, wd == Wait::Writable);
        let te = interest(wd == Wait::Readable, wu == Wait::Writable);
        let mut fds = [PollFd::new(up.from, ce), PollFd::new(down.from, te)];
        // An fd with nothing to wait for is left out of the poll: a
        // half-closed socket reports POLLHUP even unasked and would make this
        // loop spin. One of the two always waits for something (both Done
        // returned above), and a left-out entry keeps revents 0.
        let first = usize::from(ce.is_empty());
        let end = if te.is_empty() { 1 } else { 2 };
        sys::poll(&mut fds[first..end], PollTimeout::NONE)?;
        // revents() is None only for bits nix does not know: -1 in the trace,
        // and taken as ready, so that the next splice says what happened.
        let revents = |p: &PollFd| p.revents().map_or(-1, |r| r.bits());
        trace!(
            "#{} poll: client revents {:#x}, target revents {:#x}",
            up.id,
            revents(&fds[0]),
            revents(&fds[1])
        );
        // Errors and hang-ups show up as readable: the next splice reports them.
        let ready = |p: &PollFd| {
            p.revents().is_none_or(|r| {
                r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            })
        };
        if ready(&fds[0]) {
            up.readable = true;
        }
        if ready(&fds[1]) {
            down.readable = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener};
    use std::thread;

    /// client <-> [a | relay | b] <-> server, all on loopback.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn with_relay(f: impl FnOnce(TcpStream, TcpStream)) -> (Totals, Option<io::Error>) {
        let (client, relay_c) = pair();
        let (relay_t, server) = pair();
        relay_c.set_nonblocking(true).unwrap();
        relay_t.set_nonblocking(true).unwrap();
        let h = thread::spawn(move || {
            let pool = PipePool::new(4);
            relay(0, &relay_c, &relay_t, &pool)
        });
        f(client, server);
        h.join().unwrap()
    }

    #[test]
    fn half_close_is_forwarded_and_the_answer_still_arrives() {
        let (totals, err) = with_relay(|mut client, mut server| {
            client.write_all(b"question").unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"question");
            server.write_all(b"answer").unwrap();
            drop(server);
            let mut back = Vec::new();
            client.read_to_end(&mut back).unwrap();
            assert_eq!(back, b"answer");
        });
        assert!(err.is_none(), "{err:?}");
        assert_eq!((totals.up, totals.down), (8, 6));
    }

    #[test]
    fn megabytes_cross_both_ways_intact() {
        const N: usize = 8 << 20;
        let data: Vec<u8> = (0..N).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        let (totals, err) = with_relay(move |client, server| {
            let mut cw = client.try_clone().unwrap();
            let writer = thread::spawn(move || {
                cw.write_all(&data).unwrap();
                cw.shutdown(Shutdown::Write).unwrap();
            });
            // The server echoes while reading.
            let mut sr = server.try_clone().unwrap();
            let mut sw = server;
            let echo = thread::spawn(move || {
                std::io::copy(&mut sr, &mut sw).unwrap();
                sw.shutdown(Shutdown::Write).unwrap();
            });
            let mut back = Vec::new();
            (&client).read_to_end(&mut back).unwrap();
            writer.join().unwrap();
            echo.join().unwrap();
            assert!(back == expected, "echoed bytes differ");
        });
        assert!(err.is_none(), "{err:?}");
        assert_eq!((totals.up, totals.down), (N as u64, N as u64));
    }

    #[test]
    fn a_reset_from_the_server_ends_the_relay_with_an_error() {
        let (_, err) = with_relay(|mut client, server| {
            client.write_all(b"x").unwrap();
            sys::set_linger_zero(&server);
            drop(server);
            let mut buf = [0u8; 1];
            let _ = client.read(&mut buf);
        });
        assert!(err.is_some());
    }
}
