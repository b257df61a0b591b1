//! Upstream proxies for `-u`: microsocks (SOCKS5) and tinyproxy (HTTP
//! CONNECT), started by the test on loopback, outside every intercepted
//! cgroup, with their configuration in a temporary directory; killed (by
//! pid) on drop.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{need, read_lossy, scaled, tail, wait_until, KillOnDrop, TempDir};
use super::proxy::LOG_TIMEOUT;

const LOCALHOST_V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A SOCKS5 or HTTP proxy process (microsocks, tinyproxy) on 127.0.0.1,
/// started by the test, outside every intercepted cgroup; killed on drop.
pub struct Peer {
    pub addr: SocketAddr,
    log: PathBuf,
    _child: KillOnDrop,
    _dir: TempDir,
}

impl Peer {
    /// Starts `program` with the arguments `args(dir, port)` returns, on a
    /// free port (tried again with another one if it cannot bind it), and
    /// waits until it accepts connections. Its stdout and stderr go to
    /// `dir/out`; `log_file(dir)` is where it logs (may be that file).
    pub fn start(
        program: &str,
        label: &str,
        ip: IpAddr,
        args: impl Fn(&Path, u16) -> Vec<String>,
        log_file: impl Fn(&Path) -> PathBuf,
    ) -> Peer {
        let exe = need(program);
        let mut last = String::new();
        for _attempt in 0..5 {
            let dir = TempDir::new(label);
            let port = TcpListener::bind((ip, 0))
                .and_then(|l| l.local_addr())
                .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
                .port();
            let out = dir.path().join("out");
            let f = fs::File::create(&out).expect("creating the peer's output file");
            let mut cmd = Command::new(&exe);
            cmd.args(args(dir.path(), port))
                .stdin(Stdio::null())
                .stdout(f.try_clone().unwrap())
                .stderr(f);
            let mut child = KillOnDrop::spawn(&mut cmd);
            let addr = SocketAddr::new(ip, port);
            let mut died = false;
            let up = wait_until(Duration::from_secs(10), || {
                if matches!(child.0.try_wait(), Ok(Some(_))) {
                    died = true;
                    return true;
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            // A connect that succeeded may have reached someone else who
            // took the port meanwhile: the peer must still be alive.
            died |= matches!(child.0.try_wait(), Ok(Some(_)));
            if up && !died {
                return Peer {
                    addr,
                    log: log_file(dir.path()),
                    _child: child,
                    _dir: dir,
                };
            }
            last = format!(
                "{cmd:?} {}: {}",
                if died { "exited" } else { "accepted nothing" },
                read_lossy(&out)
            );
            drop(child);
        }
        panic!("could not start {program}: {last}");
    }

    /// `microsocks -i 127.0.0.1 -p PORT [-u USER -P PASS]`.
    pub fn microsocks(auth: Option<(&str, &str)>) -> Peer {
        Peer::microsocks_on(LOCALHOST_V4, auth)
    }

    /// `microsocks -i IP -p PORT [-u USER -P PASS]`.
    pub fn microsocks_on(ip: IpAddr, auth: Option<(&str, &str)>) -> Peer {
        let auth: Vec<String> = auth
            .map(|(u, p)| vec!["-u".into(), u.into(), "-P".into(), p.into()])
            .unwrap_or_default();
        Peer::start(
            "microsocks",
            "microsocks",
            ip,
            move |_, port| {
                let mut a: Vec<String> = ["-i", &ip.to_string(), "-p", &port.to_string()]
                    .map(String::from)
                    .to_vec();
                a.extend(auth.iter().cloned());
                a
            },
            |dir| dir.join("out"),
        )
    }

    /// `tinyproxy -d -c FILE`, allowing CONNECT only to `connect_port`, with
    /// Basic authentication if `auth` is given.
    pub fn tinyproxy(connect_port: u16, auth: Option<(&str, &str)>) -> Peer {
        let auth = auth.map(|(u, p)| format!("BasicAuth {u} {p}\n"));
        Peer::start(
            "tinyproxy",
            "tinyproxy",
            LOCALHOST_V4,
            move |dir, port| {
                let conf = dir.join("tinyproxy.conf");
                let text = format!(
                    "Port {port}\n\
                     Listen 127.0.0.1\n\
                     Timeout 30\n\
                     MaxClients 50\n\
                     LogFile \"{}\"\n\
                     LogLevel Info\n\
                     ConnectPort {connect_port}\n\
                     {}",
                    dir.join("tinyproxy.log").display(),
                    auth.clone().unwrap_or_default()
                );
                fs::write(&conf, text).expect("writing tinyproxy.conf");
                vec!["-d".into(), "-c".into(), conf.display().to_string()]
            },
            |dir| dir.join("tinyproxy.log"),
        )
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Waits for a log line containing `needle`; returns the log.
    pub fn wait_log(&self, needle: &str) -> String {
        let mut log = String::new();
        if !wait_until(LOG_TIMEOUT, || {
            log = self.log();
            log.contains(needle)
        }) {
            panic!(
                "the upstream proxy logged no {needle:?} within {:?}; its log:\n{}",
                scaled(LOG_TIMEOUT),
                tail(&log, 30)
            );
        }
        log
    }

    pub fn socks5_url(&self) -> String {
        format!("socks5://{}", self.addr)
    }
}
