//! Clients run inside a test cgroup (so that ktproxy intercepts them):
//! `testclient`, curl, and a Python client that shows what a real program
//! sees (getpeername, getsockname).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use ktproxy::logline::parse_peer_line;

use super::cgroup::TestCgroup;
use super::netns::NetNs;
use super::process::{describe, run_within, scaled_secs, stdout};
use super::servers::PacedServer;
use super::TESTCLIENT;

/// Upper bound for one short client run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `testclient peer ADDR` in the cgroup: (peer it saw, its local address).
pub fn client_peer(cg: &TestCgroup, dial: SocketAddr) -> (SocketAddr, SocketAddr) {
    let out = cg.run(TESTCLIENT, &["peer", &dial.to_string()], CLIENT_TIMEOUT);
    assert!(
        out.status.success(),
        "testclient peer {dial}: {}",
        describe(&out)
    );
    parse_peer_line(&stdout(&out))
        .unwrap_or_else(|| panic!("testclient peer printed: {}", describe(&out)))
}

/// curl arguments for one bounded GET (10 s, scaled) that ignores any
/// configured proxy.
pub fn curl_args(url: &str) -> Vec<String> {
    let max_time = format!("{:.1}", scaled_secs(10.0));
    ["-sS", "--noproxy", "*", "--max-time", &max_time, "-g", url]
        .map(String::from)
        .to_vec()
}

/// `curl ... URL` as a command line.
pub fn curl_command(url: &str) -> Vec<String> {
    let mut v = vec!["curl".to_string()];
    v.extend(curl_args(url));
    v
}

pub fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn python() -> &'static str {
    // The distribution's interpreter, not a version manager's shell shim.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A real program's view of a connection: connects to HOST PORT with the
/// family HOST implies (an address with ':' is IPv6: `::ffff:a.b.c.d` makes
/// an IPv4-mapped connect on an AF_INET6 socket), then prints what
/// getpeername() and getsockname() return and the reply, read to EOF (as a
/// JSON string, so that it stays on one line).
pub const PY_CLIENT: &str = r#"
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.settimeout(10)
s.connect((host, port))
print("peer", repr(s.getpeername()))
local = s.getsockname()
print("local", local[0], local[1])
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
print("reply", json.dumps(data.decode()))
sys.stdout.flush()
"#;

/// What the Python client printed.
#[derive(Debug)]
pub struct PyConn {
    /// `repr(s.getpeername())`, e.g. `('::1', 8080, 0, 0)`.
    pub peer: String,
    /// getsockname(), as Python printed it (not canonicalised).
    pub local: SocketAddr,
    /// The reply, trimmed of surrounding white space.
    pub reply: String,
}

fn parse_py(out: &Output) -> PyConn {
    let text = stdout(out);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("python client printed no {name:?}: {}", describe(out)))
            .to_string()
    };
    let local = field("local");
    let (ip, port) = local
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("bad local line {local:?}"));
    PyConn {
        peer: field("peer"),
        local: SocketAddr::new(
            ip.parse().unwrap_or_else(|e| panic!("{ip:?}: {e}")),
            port.parse().unwrap_or_else(|e| panic!("{port:?}: {e}")),
        ),
        reply: {
            let json = field("reply");
            serde_json::from_str::<String>(&json)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| panic!("bad reply line {json:?}"))
        },
    }
}

/// Runs the Python client as `cmd` (which ends in the interpreter) and
/// checks that it succeeded.
fn py_run(mut cmd: Command, host: &str, port: u16, where_: &str) -> PyConn {
    cmd.args(["-c", PY_CLIENT, host, &port.to_string()]);
    let out = run_within(&mut cmd, CLIENT_TIMEOUT);
    assert!(
        out.status.success(),
        "python client to {host} port {port}{where_}: {}",
        describe(&out)
    );
    parse_py(&out)
}

/// The Python client, run inside the cgroup.
pub fn py_connect(cg: &TestCgroup, host: &str, port: u16) -> PyConn {
    py_run(cg.command(python()), host, port, "")
}

/// The Python client run outside every test cgroup: the kernel's own view.
pub fn py_connect_direct(host: &str, port: u16) -> PyConn {
    py_run(Command::new(python()), host, port, "")
}

/// The Python client, run in the cgroup and in `ns`.
pub fn py_connect_in(cg: &TestCgroup, ns: &NetNs, host: &str, port: u16) -> PyConn {
    let mut cmd = cg.command("ip");
    cmd.args(ns.exec_args(python()));
    py_run(cmd, host, port, &format!(" in {}", ns.name()))
}

/// Runs `testclient sink ADDR --bytes LEN` in `cg` on a thread of its own.
pub fn sink_in_background(cg: &TestCgroup, server: &PacedServer) -> thread::JoinHandle<Output> {
    let mut cmd = cg.command(TESTCLIENT);
    cmd.args([
        "sink",
        &server.addr.to_string(),
        "--bytes",
        &server.len.to_string(),
    ])
    .stdin(Stdio::null());
    thread::spawn(move || run_within(&mut cmd, CLIENT_TIMEOUT))
}
