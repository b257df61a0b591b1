//! What the security tests need: nftables tables of their own, clients run
//! as `nobody`, and a terminal (`script`'s pty) to run ktproxy in.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use super::cgroup::TestCgroup;
use super::clients::{python, CLIENT_TIMEOUT};
use super::process::{
    describe, need, read_lossy, run_within, signal, tail, unique, wait_child, wait_until, TempDir,
};

use super::unprivileged::NOBODY;

/// An nftables table `inet ktproxy_test_<pid>_<n>` holding the test's rules
/// (in a chain on the output hook); deleted on drop.
pub struct NftTable {
    name: String,
}

impl NftTable {
    /// The table with one output chain holding `rules` (nft rule syntax).
    pub fn with_output_rules(rules: &[String]) -> NftTable {
        let name = format!("ktproxy_test_{}_{}", std::process::id(), unique());
        let mut script = format!(
            "table inet {name} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n"
        );
        for r in rules {
            script.push_str(&format!("  {r}\n"));
        }
        script.push_str(" }\n}\n");
        let table = NftTable { name };
        let dir = TempDir::new("nft");
        let file = dir.path().join("rules.nft");
        fs::write(&file, &script).expect("writing the nft script");
        let out = run_within(
            Command::new(need("nft")).arg("-f").arg(&file),
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "nft -f:\n{script}\n{}",
            describe(&out)
        );
        table
    }

    /// `nft list table`: the rules with their counters.
    pub fn list(&self) -> String {
        let out = run_within(
            Command::new(need("nft")).args(["list", "table", "inet", &self.name]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "nft list: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The packet count of the rule whose text contains `needle`.
    pub fn packets(&self, needle: &str) -> u64 {
        let list = self.list();
        let line = list
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no rule with {needle:?}:\n{list}"));
        line.split_once("counter packets ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {line:?}"))
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let _ = Command::new(need("nft"))
            .args(["delete", "table", "inet", &self.name])
            .status();
    }
}

/// Connects to 127.0.0.1:PORT and prints `reply <first line>`, or `error
/// <exception name>` when the connection is refused or reset, or `reply `
/// for a clean end without data (it never raises).
pub const PY_HELLO_CLIENT: &str = r#"
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    print("reply", data.decode().strip())
except OSError as e:
    print("error", type(e).__name__)
"#;

/// The Python client, as `uid` (root or nobody), in `cg` if given: what it
/// printed (`reply ...` or `error ...`).
pub fn hello_as(uid: u32, cg: Option<&TestCgroup>, port: u16) -> String {
    let mut cmd = match cg {
        Some(cg) => cg.command(need("runuser")),
        None => Command::new(need("runuser")),
    };
    let user = if uid == 0 { "root" } else { "nobody" };
    assert!(uid == 0 || uid == NOBODY);
    // From /: the checkout may be where nobody cannot go.
    cmd.current_dir("/")
        .args(["-u", user, "--", python(), "-c", PY_HELLO_CLIENT]);
    cmd.arg(port.to_string());
    let out = run_within(&mut cmd, CLIENT_TIMEOUT);
    assert!(out.status.success(), "client as {user}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `runuser -u nobody -- ps -eo args`: every process's command line as
/// another local user sees it.
pub fn ps_as_nobody() -> String {
    let mut cmd = Command::new(need("runuser"));
    cmd.current_dir("/")
        .args(["-u", "nobody", "--"])
        .arg(need("ps"))
        .args(["-eo", "args"]);
    let out = run_within(&mut cmd, Duration::from_secs(10));
    assert!(out.status.success(), "ps: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bash script run by `script(1)` on a new pty, as if typed at a
/// terminal: its stdin is a pipe the test writes keystrokes to, its output
/// (the terminal's) goes to a file. Killed (by pid) on drop.
pub struct Terminal {
    child: Child,
    keys: Option<ChildStdin>,
    out: PathBuf,
    _dir: TempDir,
}

impl Terminal {
    pub fn run(bash_script: &str) -> Terminal {
        let dir = TempDir::new("terminal");
        let out = dir.path().join("typescript-out");
        let script_file = dir.path().join("script.sh");
        fs::write(&script_file, bash_script).expect("writing the script");
        let mut cmd = Command::new(need("script"));
        // -q: no banner; -e: its exit status; -f: flush as it comes.
        cmd.args(["-q", "-e", "-f", "-c"])
            .arg(format!(
                "{} {}",
                need("bash").display(),
                script_file.display()
            ))
            .arg("/dev/null")
            .env("SHELL", need("bash"))
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(File::create(&out).expect("creating the output file"))
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; a dying test must not leave
        // script (and ktproxy under it) running.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting script");
        let keys = child.stdin.take();
        Terminal {
            child,
            keys,
            out,
            _dir: dir,
        }
    }

    /// What appeared on the terminal so far.
    pub fn screen(&self) -> String {
        read_lossy(&self.out)
    }

    /// Waits for `needle` on the screen; panics with the screen if it does
    /// not come within 10 s.
    pub fn wait_for(&self, needle: &str) -> String {
        let mut screen = String::new();
        if !wait_until(Duration::from_secs(10), || {
            screen = self.screen();
            screen.contains(needle)
        }) {
            panic!(
                "{needle:?} did not appear on the terminal; it shows:\n{}",
                tail(&screen, 40)
            );
        }
        screen
    }

    /// Types `keys` (raw bytes: "\x03" is Ctrl-C).
    pub fn type_keys(&mut self, keys: &[u8]) {
        let k = self.keys.as_mut().expect("keyboard open");
        k.write_all(keys).expect("typing");
        k.flush().expect("typing");
    }

    /// Waits up to 30 s for the script to end; returns the screen.
    pub fn finish(&mut self) -> String {
        let status = wait_child(&mut self.child, Duration::from_secs(30));
        let screen = self.screen();
        assert!(
            status.is_some(),
            "the terminal session did not end; it shows:\n{}",
            tail(&screen, 40)
        );
        screen
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        drop(self.keys.take());
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id() as i32, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
