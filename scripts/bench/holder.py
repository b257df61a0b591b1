#!/usr/bin/env python3
"""Idle-connection holder for scripts/bench.sh.

  holder.py server PORT
      Listens on 127.0.0.1:PORT (0 = any free port; prints "listening PORT").
      Greets every accepted connection with one byte, b"H", then holds it
      open, idle, until the peer closes it. Runs until killed.

  holder.py client HOST PORT N DEADLINE_S
      Opens N connections to HOST:PORT, 100 at a time, and counts one as
      established only once the server's greeting byte came back through it:
      that proves the whole path (client -> proxy -> server) is up, not just
      the proxy's listen backlog. Prints one line
          READY ok=K fail=F secs=S errors=...
      and then holds the K connections open, idle, until killed (SIGTERM).

Both raise their RLIMIT_NOFILE soft limit to the hard limit. Every socket has
SO_LINGER {on, 0}: closing it (also by exiting) sends a RST, so tearing down
thousands of connections leaves no TIME_WAIT sockets behind whose slab would be
freed in the middle of the next run's memory measurement.
"""

import collections
import errno
import resource
import selectors
import signal
import socket
import struct
import sys
import time

LINGER0 = struct.pack("ii", 1, 0)
BATCH = 100


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def server(port):
    raise_nofile()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    ls.setblocking(False)
    print(f"listening {ls.getsockname()[1]}", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            print(f"accept: {e.strerror}", file=sys.stderr, flush=True)
                            time.sleep(0.01)
                        break
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
                    c.setblocking(False)
                    try:
                        c.send(b"H")
                    except OSError:
                        c.close()
                        continue
                    sel.register(c, selectors.EVENT_READ, 1)
            else:
                c = key.fileobj
                try:
                    data = c.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(c)
                    c.close()


def client(host, port, n, deadline_s):
    raise_nofile()
    t0 = time.monotonic()
    deadline = t0 + deadline_s
    sel = selectors.DefaultSelector()
    held = []
    fail = 0
    errors = collections.Counter()
    for start in range(0, n, BATCH):
        pending = {}
        for _ in range(start, min(n, start + BATCH)):
            left = deadline - time.monotonic()
            if left <= 0:
                fail += 1
                errors["deadline"] += 1
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
            s.settimeout(min(5.0, left))
            try:
                s.connect((host, port))
            except OSError as e:
                fail += 1
                errors["connect:" + (e.strerror or type(e).__name__)] += 1
                s.close()
                continue
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            pending[s.fileno()] = s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(timeout=min(1.0, left)):
                s = key.fileobj
                try:
                    data = s.recv(1)
                except BlockingIOError:
                    continue
                except OSError as e:
                    data = None
                    errors["recv:" + (e.strerror or type(e).__name__)] += 1
                sel.unregister(s)
                del pending[s.fileno()]
                if data == b"H":
                    held.append(s)
                else:
                    if data == b"":
                        errors["closed before greeting"] += 1
                    fail += 1
                    s.close()
        for s in pending.values():
            fail += 1
            errors["no greeting before deadline"] += 1
            sel.unregister(s)
            s.close()
    secs = time.monotonic() - t0
    err = ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "none"
    print(f"READY ok={len(held)} fail={fail} secs={secs:.2f} errors={err}", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        signal.pause()


def main(argv):
    if len(argv) == 3 and argv[1] == "server":
        server(int(argv[2]))
    elif len(argv) == 6 and argv[1] == "client":
        client(argv[2], int(argv[3]), int(argv[4]), float(argv[5]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
