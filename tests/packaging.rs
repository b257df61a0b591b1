//! ktproxy as a system tool: its man page, its systemd unit (readiness
//! notification, start helper, capabilities) and its Debian package.
//! The pieces live in scripts/deb/; scripts/package.sh puts them together.
//!
//! The end-to-end ones load BPF programs, so they need root:
//!   sudo cargo test --release --test packaging

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

const MAN_PAGE: &str = "scripts/deb/ktproxy.8";

// ---- the man page ---------------------------------------------------------------------

/// One option as `ktproxy --help` or the man page shows it.
#[derive(Debug, Clone)]
struct Opt {
    short: Option<char>,
    long: String,
    arg: Option<String>,
    text: String,
}

/// `-l, --listen ADDR:PORT`, `--dest-file FILE` or `-q, --quiet`: the
/// option names and argument of a --help line or man page tag.
fn parse_tag(tag: &str) -> Option<Opt> {
    let mut opt = Opt {
        short: None,
        long: String::new(),
        arg: None,
        text: String::new(),
    };
    for word in tag.split_whitespace() {
        let word = word.trim_end_matches(',');
        if let Some(long) = word.strip_prefix("--") {
            opt.long = long.to_string();
        } else if let Some(short) = word.strip_prefix('-') {
            opt.short = short.chars().next().filter(|_| short.len() == 1);
        } else {
            opt.arg = Some(word.to_string());
        }
    }
    (!opt.long.is_empty()).then_some(opt)
}

/// `-c, --cgroup PATH  intercept ...` into the tag and the description.
/// Usually two or more blanks part them, but a tag that ends at column 23
/// is followed by one only: so the tag is read by its shape (an optional
/// `-x,`, `--name`, an optional argument hint without lower-case letters).
fn split_tag(body: &str) -> (&str, &str) {
    let mut end = 0;
    let mut rest = body;
    let mut take = |pred: &dyn Fn(&str) -> bool| {
        let trimmed = rest.trim_start();
        let word = trimmed.split(' ').next().unwrap_or("");
        if !word.is_empty() && pred(word) {
            end += rest.len() - trimmed.len() + word.len();
            rest = &trimmed[word.len()..];
        }
    };
    take(&|w| w.len() == 3 && w.starts_with('-') && w.ends_with(','));
    take(&|w| w.starts_with("--"));
    take(&|w| !w.chars().any(|c| c.is_ascii_lowercase()));
    (&body[..end], body[end..].trim())
}

/// The options of `ktproxy --help` (getopts' layout: names at indent 4 or
/// 8, descriptions from column 24, continued on lines of their own).
fn help_options() -> Vec<Opt> {
    let out = run_within(Command::new(KTPROXY).arg("--help"), Duration::from_secs(10));
    assert!(out.status.success(), "ktproxy --help: {}", describe(&out));
    let text = stdout(&out);
    let mut opts: Vec<Opt> = Vec::new();
    let lines = text
        .lines()
        .skip_while(|l| *l != "Options:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty());
    for line in lines {
        let body = line.trim_start();
        if body.starts_with('-') && line.len() - body.len() <= 8 {
            let (tag, desc) = split_tag(body);
            let mut opt = parse_tag(tag).unwrap_or_else(|| panic!("cannot read {line:?}"));
            opt.text = desc.trim().to_string();
            opts.push(opt);
        } else if let Some(last) = opts.last_mut() {
            last.text = format!("{} {}", last.text, body).trim().to_string();
        }
    }
    assert!(
        opts.len() >= 10,
        "read only {opts:?} from ktproxy --help:\n{text}"
    );
    opts
}

/// roff source to plain words: `\-` is a hyphen, font changes go.
fn unroff(s: &str) -> String {
    let mut t = s.replace("\\-", "-");
    for f in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        t = t.replace(f, "");
    }
    t
}

/// The tags (the line after each `.TP`) of the man page's OPTIONS section.
fn man_options(page: &str) -> Vec<Opt> {
    let lines: Vec<&str> = page
        .lines()
        .skip_while(|l| *l != ".SH OPTIONS")
        .skip(1)
        .take_while(|l| !l.starts_with(".SH "))
        .collect();
    lines
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .map(|w| parse_tag(&unroff(w[1])).unwrap_or_else(|| panic!("option tag {:?}", w[1])))
        .collect()
}

/// The man page entry to add for `o`, in the page's style.
fn man_entry(o: &Opt) -> String {
    let mut tag = String::new();
    if let Some(s) = o.short {
        tag.push_str(&format!("\\fB\\-{s}\\fR, "));
    }
    tag.push_str(&format!("\\fB\\-\\-{}\\fR", o.long.replace('-', "\\-")));
    if let Some(a) = &o.arg {
        tag.push_str(&format!(" \\fI{a}\\fR"));
    }
    format!(".TP\n{tag}\n{}", o.text.replace('-', "\\-"))
}

#[test]
fn man_page_documents_every_option_of_help_and_no_other() {
    let page = fs::read_to_string(repo().join(MAN_PAGE)).expect("reading the man page");
    let help = help_options();
    let man = man_options(&page);
    let mut problems = Vec::new();
    for h in &help {
        match man.iter().find(|m| m.long == h.long) {
            None => problems.push(format!(
                "`ktproxy --help` lists --{}, but {MAN_PAGE} does not document it. Add an \
                 entry to its OPTIONS section, where --help has it, e.g.:\n{}",
                h.long,
                man_entry(h)
            )),
            Some(m) if m.short != h.short || m.arg != h.arg => problems.push(format!(
                "--{}: --help shows {}, {MAN_PAGE} shows {}: make the man page's tag match, \
                 e.g.:\n{}",
                h.long,
                shown(h),
                shown(m),
                man_entry(h)
            )),
            Some(_) => {}
        }
    }
    for m in &man {
        if !help.iter().any(|h| h.long == m.long) {
            problems.push(format!(
                "{MAN_PAGE} documents --{}, which `ktproxy --help` does not list: remove its \
                 entry, or the option is missing from src/cli/options.rs",
                m.long
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n\n"));
}

fn shown(o: &Opt) -> String {
    let short = o.short.map(|s| format!("-{s}, ")).unwrap_or_default();
    let arg = o.arg.as_ref().map(|a| format!(" {a}")).unwrap_or_default();
    format!("'{short}--{}{arg}'", o.long)
}

#[test]
fn man_page_option_check_reads_help_and_names_a_missing_option() {
    // The check above must see real options, and say what to add.
    let help = help_options();
    let listen = help.iter().find(|o| o.long == "listen").expect("--listen");
    assert_eq!(listen.short, Some('l'));
    assert_eq!(listen.arg.as_deref(), Some("ADDR:PORT"));
    assert!(
        listen.text.contains("port 0 picks a free port"),
        "{listen:?}"
    );
    let page = fs::read_to_string(repo().join(MAN_PAGE)).unwrap();
    let man = man_options(&page);
    assert!(man
        .iter()
        .any(|m| m.long == "dest-file" && m.short.is_none()));
    assert_eq!(
        man_entry(listen).lines().nth(1),
        Some("\\fB\\-l\\fR, \\fB\\-\\-listen\\fR \\fIADDR:PORT\\fR")
    );
}

#[test]
fn man_page_quotes_the_log_lines_scripts_parse() {
    let page = unroff(&fs::read_to_string(repo().join(MAN_PAGE)).unwrap());
    for line in [
        ktproxy::logline::READY.trim_end(),
        "detached; kernel counters:",
        "Connecting to target",
        "Connection closed, from",
        "Connection reset, from",
        "caps ktproxy at about",
    ] {
        assert!(page.contains(line), "{MAN_PAGE} does not quote {line:?}");
    }
}

// ---- systemd: readiness, start helper, capabilities ----------------------------------------

/// The next datagram on `sock`, as text; None after `timeout` (scaled).
fn next_datagram(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(scaled(timeout))).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv on the notify socket: {e}"),
    }
}

#[test]
fn systemd_hears_ready_only_once_connects_are_intercepted_then_stopping() {
    require_root();
    let cg = TestCgroup::new("sd_notify");
    let server = HelloServer::start();
    let dir = TempDir::new("notify");
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).expect("binding the notify socket");
    let log_path = dir.path().join("ktproxy.log");
    let log = File::create(&log_path).unwrap();

    let mut cmd = ktproxy_command(&cg, &[]);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    sigterm_when_the_test_dies(&mut cmd);
    let mut ktproxy = KillOnDrop::spawn(&mut cmd);

    let first = next_datagram(&sock, READY_TIMEOUT);
    assert_eq!(
        first.as_deref(),
        Some("READY=1"),
        "the first notification; log:\n{}",
        read_lossy(&log_path)
    );
    // At once, as a service ordered After=ktproxy.service would: its very
    // first connect must already go through ktproxy.
    let (peer, local) = client_peer(&cg, server.addr());
    assert_eq!(peer, server.addr());
    let seen = server.wait_peers(1, LOG_TIMEOUT)[0];
    assert_ne!(
        seen,
        local,
        "READY=1 came before interception worked: the server saw the client itself; log:\n{}",
        read_lossy(&log_path)
    );
    assert!(
        wait_until(LOG_TIMEOUT, || ready_line(&read_lossy(&log_path)).is_some()),
        "no ready line to go with READY=1:\n{}",
        read_lossy(&log_path)
    );

    signal(ktproxy.pid(), libc::SIGTERM);
    assert_eq!(
        next_datagram(&sock, STOP_TIMEOUT).as_deref(),
        Some("STOPPING=1"),
        "after SIGTERM; log:\n{}",
        read_lossy(&log_path)
    );
    let status = wait_child(&mut ktproxy.0, STOP_TIMEOUT).expect("ktproxy did not exit");
    assert_eq!(status.code(), Some(0), "{}", read_lossy(&log_path));
    assert_eq!(next_datagram(&sock, Duration::from_millis(100)), None);
    assert!(attached_programs(cg.path()).is_empty());
}

fn start_helper() -> PathBuf {
    repo().join("scripts/deb/ktproxy-cgroup")
}

#[test]
fn service_start_helper_intercepts_the_cgroup_below_the_cgroup2_mount() {
    require_root();
    let cg = TestCgroup::new("start_helper");
    let server = HelloServer::start();
    let rel = cg
        .path()
        .strip_prefix(cgroup2_root())
        .expect("test cgroups are below the cgroup v2 root")
        .to_str()
        .unwrap()
        .to_string();
    let mut cmd = Command::new(start_helper());
    cmd.env("KTPROXY", KTPROXY)
        .args([rel.as_str(), "-l", "127.0.0.1:0"]);
    let proxy = Proxy::start_command(&cg, cmd);
    let want = format!("intercepting cgroup {},", cg.path().display());
    assert!(proxy.ready_line().contains(&want), "{}", proxy.ready_line());
    check_route(&cg, &proxy, &server, "127.0.0.1", true);
}

#[test]
fn service_start_helper_refuses_the_root_and_paths_leaving_the_hierarchy() {
    let dir = TempDir::new("helper_refuses");
    let marker = dir.path().join("ran");
    // Stands in for ktproxy: leaves a mark if the helper runs it.
    let fake = dir.path().join("fake-ktproxy");
    fs::write(&fake, format!("#!/bin/sh\ntouch '{}'\n", marker.display())).unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    for rel in [
        "",
        "/",
        "/sys/fs/cgroup/x",
        ".",
        "..",
        "a/../..",
        "a//b",
        "./a",
    ] {
        let out = run_within(
            Command::new(start_helper()).env("KTPROXY", &fake).arg(rel),
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(2), "{rel:?}: {}", describe(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{rel:?}: {}", describe(&out));
        assert!(err.starts_with("ktproxy-cgroup: "), "{rel:?}: {err}");
        assert!(!marker.exists(), "{rel:?}: the helper ran ktproxy");
    }
}

/// `CapabilityBoundingSet=` of ktproxy.service.
fn unit_capabilities() -> Vec<String> {
    let unit = fs::read_to_string(repo().join("scripts/deb/ktproxy.service")).unwrap();
    let caps: Vec<String> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(|v| v.split_whitespace().map(String::from))
        .collect();
    assert!(
        !caps.is_empty(),
        "ktproxy.service sets no CapabilityBoundingSet"
    );
    caps
}

/// The unit keeps ktproxy to its CapabilityBoundingSet; ktproxy must work
/// with exactly those. Run as systemd would: root, only those capabilities
/// bounded and permitted, started in a cgroup of its own (the service's),
/// whose directory root owns: no CAP_DAC_OVERRIDE needed to create its
/// ktproxy-<pid> cgroup there.
#[test]
fn ktproxy_works_with_only_the_capabilities_the_unit_leaves_it() {
    require_root();
    let setpriv = need("setpriv");
    let caps = unit_capabilities();
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| {
            format!(
                "+{}",
                c.strip_prefix("CAP_")
                    .unwrap_or_else(|| panic!("{c}: not a capability name"))
                    .to_lowercase()
            )
        }))
        .collect::<Vec<_>>()
        .join(",");
    let home = TestCgroup::new("caps_home");
    let cg = TestCgroup::new("caps");
    let server = HelloServer::start();
    let mut cmd = Command::new(setpriv);
    cmd.args([
        "--bounding-set",
        &bounding,
        "--inh-caps",
        "-all",
        "--",
        KTPROXY,
    ])
    .arg("-c")
    .arg(cg.path())
    .args(["-l", "127.0.0.1:0"]);
    join_cgroup_on_exec(&mut cmd, home.path());
    let proxy = Proxy::start_command(&cg, cmd);
    let status = fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapEff");
    let bit = |name: &str| match name {
        "CAP_NET_ADMIN" => 12,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("add the number of {other} here"),
    };
    let want = caps.iter().fold(0u64, |m, c| m | 1 << bit(c));
    assert_eq!(eff, want, "ktproxy's effective capabilities (CapEff)");
    check_route(&cg, &proxy, &server, "127.0.0.1", true);
}

// ---- the Debian package ---------------------------------------------------------------------

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    let out = run_within(
        Command::new("dpkg-deb").args(args).arg(deb),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        describe(&out)
    );
    stdout(&out)
}

#[test]
fn deb_package_holds_ktproxy_its_man_page_units_and_conffile_and_no_test_helper() {
    if !Path::new("/var/lib/dpkg/status").exists() {
        eprintln!("not a dpkg system: the Debian package is not built here");
        return;
    }
    need("dpkg-shlibdeps");
    let out_dir = TempDir::new("deb");
    let out = run_within(
        Command::new(repo().join("scripts/package.sh"))
            .args(["--out", out_dir.path().to_str().unwrap()])
            .env("KTPROXY_BIN", KTPROXY),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "package.sh: {}", describe(&out));
    let deb = PathBuf::from(stdout(&out).trim());
    let arch = stdout(&run_within(
        Command::new("dpkg").arg("--print-architecture"),
        Duration::from_secs(10),
    ));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb,
        out_dir
            .path()
            .join(format!("ktproxy_{version}_{}.deb", arch.trim()))
    );

    let files: BTreeSet<String> = dpkg_deb(&["--contents"], &deb)
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    let want: BTreeSet<String> = [
        "/usr/sbin/ktproxy",
        "/usr/libexec/ktproxy/ktproxy-cgroup",
        "/usr/lib/systemd/system/ktproxy.service",
        "/usr/lib/systemd/system/proxied.slice",
        "/etc/default/ktproxy",
        "/usr/share/man/man8/ktproxy.8.gz",
        "/usr/share/doc/ktproxy/README.md.gz",
        "/usr/share/doc/ktproxy/LICENSE",
        "/usr/share/doc/ktproxy/copyright",
        "/usr/share/doc/ktproxy/changelog.gz",
    ]
    .map(String::from)
    .into();
    assert_eq!(files, want, "the package's files");

    let control = dpkg_deb(&["--field"], &deb);
    let depends = control
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends:\n{control}"));
    for lib in ["libc6 ", "libelf1 ", "zlib1g "] {
        assert!(depends.contains(lib), "Depends lacks {lib}: {depends}");
    }
    assert!(
        control.contains(&format!("Version: {version}\n")),
        "{control}"
    );

    let x = TempDir::new("deb_x");
    let ctrl = x.path().join("DEBIAN");
    run_within(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&deb)
            .arg(&ctrl),
        Duration::from_secs(30),
    );
    assert_eq!(
        fs::read_to_string(ctrl.join("conffiles")).unwrap(),
        "/etc/default/ktproxy\n"
    );
    run_within(
        Command::new("dpkg-deb")
            .arg("--extract")
            .arg(&deb)
            .arg(x.path()),
        Duration::from_secs(30),
    );
    let v = run_within(
        Command::new(x.path().join("usr/sbin/ktproxy")).arg("-V"),
        Duration::from_secs(10),
    );
    assert_eq!(
        stdout(&v),
        format!("ktproxy {version}\n"),
        "{}",
        describe(&v)
    );
    let unit = fs::read_to_string(x.path().join("usr/lib/systemd/system/ktproxy.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .and_then(|l| l.split_whitespace().next())
        .expect("ExecStart=");
    assert!(
        x.path().join(exec.trim_start_matches('/')).is_file(),
        "ExecStart={exec} is not in the package"
    );
}
