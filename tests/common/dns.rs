//! Names through the proxy: upstream proxies that know a name this host does
//! not, DNS servers and UDP receivers that count what reaches them, a Python
//! client that shows what a real program sees, and private mount namespaces
//! (`unshare -m`) for files the tests must not change on the host.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::clients::python;
use super::command::{CommandRun, RUN_TIMEOUT};
use super::process::{need, run_within, scaled, stdout, PROXY_ENV};
use super::upstream::Peer;
use super::KTPROXY;

/// ktproxy's default --fake-net.
pub const FAKE_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);

/// A name neither this host's /etc/hosts nor its DNS knows; only the
/// upstream proxies started by `*_knowing_secret` resolve it.
pub const SECRET: &str = "secret.test";

pub fn is_fake(ip: IpAddr) -> bool {
    let IpAddr::V4(ip) = ip else { return false };
    let mask = u32::MAX << (32 - u32::from(FAKE_NET.1));
    u32::from(ip) & mask == u32::from(FAKE_NET.0)
}

/// `unshare -m --propagation private` running `program args` with each
/// `(file, over)` bind-mounted over `over`: only that process tree sees it.
pub fn with_mounts(binds: &[(&Path, &str)], program: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(need("unshare"));
    cmd.args(["-m", "--propagation", "private", "sh", "-ec"]);
    cmd.arg(
        "while [ \"$1\" != -- ]; do mount --bind \"$1\" \"$2\"; shift 2; done; shift; exec \"$@\"",
    );
    cmd.arg("sh");
    for (file, over) in binds {
        cmd.arg(file).arg(over);
    }
    cmd.arg("--").arg(program).args(args);
    cmd
}

/// Makes the process `cmd` starts enter a private mount namespace with
/// `file` bind-mounted over `over`, between fork and exec.
pub fn private_bind_on_exec(cmd: &mut Command, file: &Path, over: &str) {
    let from = CString::new(file.as_os_str().as_bytes()).expect("path without NUL");
    let to = CString::new(over).expect("path without NUL");
    // SAFETY: unshare and mount are async-signal-safe system calls, on
    // memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            };
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                from.as_ptr(),
                to.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))
        });
    }
}

/// `ktproxy OPTS -- COMMAND` (proxy settings removed from the environment,
/// stdin from /dev/null) in a private mount namespace with `binds`; ktproxy
/// keeps the pid of the `unshare` process, which execs it.
pub fn ktproxy_with_mounts(binds: &[(&Path, &str)], opts: &[&str], command: &[&str]) -> Command {
    let mut args: Vec<String> = opts.iter().map(|s| s.to_string()).collect();
    args.push("--".into());
    args.extend(command.iter().map(|s| s.to_string()));
    let mut cmd = with_mounts(binds, KTPROXY, &args);
    for v in PROXY_ENV {
        cmd.env_remove(v);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A hosts file in which `SECRET` is 127.0.0.1.
fn secret_hosts(dir: &Path) -> String {
    let hosts = dir.join("hosts");
    fs::write(&hosts, format!("127.0.0.1 localhost\n127.0.0.1 {SECRET}\n"))
        .expect("writing the hosts file");
    hosts.display().to_string()
}

/// The `unshare` arguments that run `program args` with `SECRET` in its
/// /etc/hosts.
fn knowing_secret(dir: &Path, program: &str, args: &[String]) -> Vec<String> {
    let mut v: Vec<String> = ["-m", "--propagation", "private", "sh", "-ec"]
        .map(String::from)
        .to_vec();
    v.push("mount --bind \"$1\" /etc/hosts; shift; exec \"$@\"".into());
    v.push("sh".into());
    v.push(secret_hosts(dir));
    v.push(need(program).display().to_string());
    v.extend(args.iter().cloned());
    v
}

/// microsocks on 127.0.0.1 that resolves `SECRET` (its log names each
/// destination: `client[N] 127.0.0.1: connected to secret.test:PORT`).
pub fn microsocks_knowing_secret() -> Peer {
    need("microsocks");
    Peer::start(
        "unshare",
        "microsocks",
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        |dir, port| {
            let args = ["-i", "127.0.0.1", "-p", &port.to_string()].map(String::from);
            knowing_secret(dir, "microsocks", &args)
        },
        |dir| dir.join("out"),
    )
}

/// tinyproxy on 127.0.0.1 that resolves `SECRET`, allowing CONNECT to
/// `connect_port` (its log names each request: `CONNECT secret.test:PORT`).
pub fn tinyproxy_knowing_secret(connect_port: u16) -> Peer {
    need("tinyproxy");
    Peer::start(
        "unshare",
        "tinyproxy",
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        move |dir, port| {
            let conf = dir.join("tinyproxy.conf");
            let text = format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nLogFile \"{}\"\n\
                 LogLevel Info\nConnectPort {connect_port}\n",
                dir.join("tinyproxy.log").display()
            );
            fs::write(&conf, text).expect("writing tinyproxy.conf");
            let args = ["-d".to_string(), "-c".into(), conf.display().to_string()];
            knowing_secret(dir, "tinyproxy", &args)
        },
        |dir| dir.join("tinyproxy.log"),
    )
}

/// Counts every datagram and every TCP connection that reaches `ip`:53.
/// Answers nothing: it only has to tell whether anything arrived.
pub struct CountingDns {
    pub addr: SocketAddr,
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CountingDns {
    pub fn start(ip: IpAddr) -> CountingDns {
        let addr = SocketAddr::new(ip, 53);
        let udp_sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("binding udp {addr}: {e}"));
        let tcp_sock =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding tcp {addr}: {e}"));
        udp_sock
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        tcp_sock.set_nonblocking(true).unwrap();
        let (udp, tcp, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (u, t, s) = (Arc::clone(&udp), Arc::clone(&tcp), Arc::clone(&stop));
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                if udp_sock.recv_from(&mut buf).is_ok() {
                    u.fetch_add(1, Ordering::SeqCst);
                }
                while tcp_sock.accept().is_ok() {
                    t.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        CountingDns {
            addr,
            udp,
            tcp,
            stop,
        }
    }

    /// (datagrams, connections) so far.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.udp.load(Ordering::SeqCst),
            self.tcp.load(Ordering::SeqCst),
        )
    }
}

impl Drop for CountingDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A loopback address of its own for a test's port-53 server:
/// 127.53.X.Y, with X.Y from the pid and a counter.
pub fn private_loopback() -> IpAddr {
    let n = super::process::unique() as u32;
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        53,
        (pid % 251) as u8,
        (n % 250 + 1) as u8,
    ))
}

/// Counts the datagrams that reach a UDP socket on `ip`, a free port.
pub struct UdpSink {
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpSink {
    pub fn start(ip: IpAddr) -> UdpSink {
        let sock = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("binding udp {ip}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&count), Arc::clone(&stop));
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if sock.recv_from(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        UdpSink { addr, count, stop }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// This host's own non-loopback addresses (`ip -o addr show scope global`):
/// traffic to them stays on the host, yet it is not loopback.
pub fn own_addresses() -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let out = run_within(
        Command::new("ip").args(["-o", "addr", "show", "scope", "global"]),
        Duration::from_secs(10),
    );
    let mut v4 = None;
    let mut v6 = None;
    for line in stdout(&out).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| *w == "inet" || *w == "inet6") else {
            continue;
        };
        let Some(addr) = words.get(i + 1).and_then(|a| a.split('/').next()) else {
            continue;
        };
        match addr.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if v4.is_none() => v4 = Some(a),
            Ok(IpAddr::V6(a)) if v6.is_none() => v6 = Some(a),
            _ => {}
        }
    }
    (v4, v6)
}

/// A SOCKS5 server on a thread of the test process that tunnels nowhere: it
/// answers every CONNECT with success, sends back the name (or address) it
/// was asked for and a newline, and closes. It records every request.
pub struct EchoNameSocks {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl EchoNameSocks {
    pub fn start() -> EchoNameSocks {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding the mock SOCKS5 server");
        let addr = l.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (Arc::clone(&asked), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(scaled(Duration::from_secs(10))));
                if let Some(target) = socks_request(&mut c) {
                    let _ = c.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                    let _ = c.write_all(format!("{target}\n").as_bytes());
                    a.lock().unwrap().push(target);
                }
            }
        });
        EchoNameSocks { addr, asked, stop }
    }

    pub fn url(&self) -> String {
        format!("socks5://{}", self.addr)
    }

    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for EchoNameSocks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Reads greeting and CONNECT; returns "name:port" or "ip:port".
fn socks_request(c: &mut std::net::TcpStream) -> Option<String> {
    let mut head = [0u8; 2];
    c.read_exact(&mut head).ok()?;
    let mut methods = vec![0u8; usize::from(head[1])];
    c.read_exact(&mut methods).ok()?;
    c.write_all(&[5, 0]).ok()?;
    let mut req = [0u8; 4];
    c.read_exact(&mut req).ok()?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a).ok()?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            c.read_exact(&mut len).ok()?;
            let mut name = vec![0u8; usize::from(len[0])];
            c.read_exact(&mut name).ok()?;
            String::from_utf8_lossy(&name).into_owned()
        }
        4 => {
            let mut a = [0u8; 16];
            c.read_exact(&mut a).ok()?;
            format!("[{}]", Ipv6Addr::from(a))
        }
        _ => return None,
    };
    let mut port = [0u8; 2];
    c.read_exact(&mut port).ok()?;
    Some(format!("{host}:{}", u16::from_be_bytes(port)))
}

/// A Python program that does what a real client does, one subcommand per
/// run, and prints what it saw on one line:
/// - `getaddrinfo NAME PORT`: resolve (glibc), connect, HTTP GET; prints
///   `addr IP peer IP:PORT body <first line>`
/// - `query FAMILY MODE SERVER NAME [TYPE]`: one DNS query over UDP from an
///   AF_INET or AF_INET6 socket, `connected` (connect + send + recv) or
///   `unconnected` (sendto + recvfrom); prints `from ADDR rcode N answers
///   IP,IP` (`from` is getpeername for connected sockets)
/// - `send FAMILY IP PORT`: one datagram with sendto; prints `ok` or the
///   errno name
/// - `udp-connect FAMILY IP PORT`, `tcp-connect FAMILY IP PORT`: prints `ok`
///   or the errno name (a TCP connect gives up after 3 s: `timeout`)
/// - `names COUNT STRIDE KTPROXY_PID PORT`: resolves COUNT distinct names
///   with UDP queries, connects to every STRIDE-th one's address and reads
///   the name the server echoes; prints `mismatch ...` lines and, at 70% and
///   at the end, `rss KB` of ktproxy.
pub const CLIENT_PY: &str = r#"
import errno, os, random, socket, struct, sys

def fam(f):
    return socket.AF_INET6 if f == "6" else socket.AF_INET

def query(name, qtype=1):
    qid = random.randrange(65536)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", qtype, 1), qid

def skip_name(b, i):
    while True:
        n = b[i]
        if n == 0:
            return i + 1
        if n >= 0xC0:
            return i + 2
        i += n + 1

def parse(reply, qid):
    rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", reply[:12])
    if rid != qid:
        raise SystemExit("reply for another query")
    i = 12
    for _ in range(qd):
        i = skip_name(reply, i) + 4
    out = []
    for _ in range(an):
        i = skip_name(reply, i)
        t, _, _, n = struct.unpack(">HHIH", reply[i:i + 10])
        i += 10
        if t == 1:
            out.append(socket.inet_ntop(socket.AF_INET, reply[i:i + 4]))
        elif t == 28:
            out.append(socket.inet_ntop(socket.AF_INET6, reply[i:i + 16]))
        else:
            out.append("type%d" % t)
        i += n
    return flags & 0xF, out

def show(a):
    return "[%s]:%d" % (a[0], a[1]) if ":" in a[0] else "%s:%d" % (a[0], a[1])

def err(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "timeout"

def rss(pid):
    for line in open("/proc/%s/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "getaddrinfo":
    name, port = args[0], int(args[1])
    ip = socket.getaddrinfo(name, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    s = socket.create_connection((ip, port), timeout=10)
    peer = s.getpeername()
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    body = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        body += b
    last = body.decode(errors="replace").strip().splitlines()[-1]
    print("addr %s peer %s body %s" % (ip, show(peer), last))
elif cmd == "query":
    f, mode, server, name = args[:4]
    qtype = int(args[4]) if len(args) > 4 else 1
    s = socket.socket(fam(f), socket.SOCK_DGRAM)
    s.settimeout(5)
    q, qid = query(name, qtype)
    dst = (server, 53)
    if mode == "connected":
        s.connect(dst)
        s.send(q)
        reply = s.recv(65535)
        src = s.getpeername()
    else:
        s.sendto(q, dst)
        reply, src = s.recvfrom(65535)
    rcode, out = parse(reply, qid)
    print("from %s rcode %d answers %s" % (show(src), rcode, ",".join(out) or "-"))
elif cmd in ("send", "udp-connect", "tcp-connect"):
    f, ip, port = args[0], args[1], int(args[2])
    kind = socket.SOCK_STREAM if cmd == "tcp-connect" else socket.SOCK_DGRAM
    s = socket.socket(fam(f), kind)
    s.settimeout(3)
    try:
        if cmd == "send":
            s.sendto(b"leak?", (ip, port))
        else:
            s.connect((ip, port))
        print("ok")
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print(err(e))
elif cmd == "names":
    count, stride, pid, port = [int(a) for a in args]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    def resolve(name):
        q, qid = query(name)
        s.sendto(q, ("127.0.0.1", 53))
        while True:
            reply, _ = s.recvfrom(65535)
            if struct.unpack(">H", reply[:2])[0] == qid:
                return parse(reply, qid)[1][0]
    def check(name, ip):
        c = socket.create_connection((ip, port), timeout=10)
        got = b""
        while not got.endswith(b"\n"):
            b = c.recv(512)
            if not b:
                break
            got += b
        c.close()
        want = "%s:%d" % (name, port)
        if got.decode().strip() != want:
            print("mismatch %s %s got %r" % (name, ip, got))
        return 1
    checked = 0
    for i in range(count):
        name = "n%d.bulk.test" % i
        ip = resolve(name)
        if i % stride == 0 or i >= count - 100:
            checked += check(name, ip)
        if i + 1 == count * 7 // 10:
            print("rss %d at %d" % (rss(pid), i + 1), flush=True)
    for i in range(10):
        name = "n%d.bulk.test" % i
        checked += check(name, resolve(name))
    print("rss %d at %d" % (rss(pid), count))
    print("checked %d" % checked)
else:
    raise SystemExit("unknown subcommand " + cmd)
"#;

/// `python3 -c CLIENT_PY args...` as a command line.
pub fn client_py(args: &[&str]) -> Vec<String> {
    let mut v = vec![python().to_string(), "-c".into(), CLIENT_PY.into()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// `-v` shows the connection lines in command mode.
pub const VERBOSE: &str = "-v";

/// `sh -c SCRIPT` with the Python client in $CLIENT_PY.
pub fn shell(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// Runs a ktproxy command to its end (bounded): its output and pid.
pub fn run_logged(cmd: &mut std::process::Command) -> (Output, u32) {
    let mut run = CommandRun::spawn(cmd);
    let out = run.finish(RUN_TIMEOUT);
    (out, run.pid())
}

/// One DNS query for `name` (type A) over UDP from the test process itself
/// (outside every intercepted cgroup): the reply, or None after `timeout`.
pub fn ask_udp(server: SocketAddr, name: &str, timeout: Duration) -> Option<Vec<u8>> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let s = UdpSocket::bind(bind).expect("binding a UDP socket");
    s.set_read_timeout(Some(timeout)).unwrap();
    s.send_to(&q, server).ok()?;
    let mut buf = [0u8; 4096];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}
