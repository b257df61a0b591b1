//! End-to-end tests of the destination rules: -d/-x/-p, their -file forms
//! (long ones, and malformed ones), and how they combine across IPv4, IPv6
//! and IPv4-mapped destinations.
//!
//! They load BPF programs, so they need root:
//!   sudo cargo test --release --test rules
//! Every test has its own cgroup, its own ktproxy on free ports and its own
//! servers (127.0.0.2, 127.0.0.3, ... are local addresses on Linux, so they
//! serve as distinct destinations without touching the host's network
//! configuration), so they run in parallel with each other and with the other
//! test files.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

// ---- -d / -x / -p ---------------------------------------------------------------------------

#[test]
fn dest_rule_intercepts_only_the_listed_ipv4_host_and_no_other_v4_or_v6() {
    require_root();
    let cg = TestCgroup::new("dest_only");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &with_dual(&["-d", "127.0.0.2/32"]));
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
    check_route(&cg, &proxy, &s6, "::1", false);
    // IPv4-mapped destinations follow the IPv4 rules.
    check_route(&cg, &proxy, &s2, "::ffff:127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "::ffff:127.0.0.3", false);
}

#[test]
fn exclude_carves_a_host_out_of_a_dest_network() {
    require_root();
    let cg = TestCgroup::new("dest_minus_exclude");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let proxy = Proxy::start(&cg, &["-d", "127.0.0.0/8", "-x", "127.0.0.3"]);
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
}

#[test]
fn exclude_wins_over_a_matching_port() {
    require_root();
    let cg = TestCgroup::new("exclude_over_port");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let ports = ports_of(&[&s2, &s3]);
    let proxy = Proxy::start(&cg, &["-p", &ports, "-x", "127.0.0.2"]);
    check_route(&cg, &proxy, &s2, "127.0.0.2", false);
    // Positive control: a listed port to a destination not excluded.
    check_route(&cg, &proxy, &s3, "127.0.0.3", true);
}

#[test]
fn dest_and_ports_must_both_match() {
    require_root();
    let cg = TestCgroup::new("dest_and_port");
    let yes = hello_on("127.0.0.2"); // dest and port listed
    let wrong_port = hello_on("127.0.0.2"); // dest listed, port not
    let wrong_dest = hello_on("127.0.0.3"); // port listed, dest not
    let ports = ports_of(&[&yes, &wrong_dest]);
    let proxy = Proxy::start(&cg, &["-d", "127.0.0.2/32", "-p", &ports]);
    check_route(&cg, &proxy, &yes, "127.0.0.2", true);
    check_route(&cg, &proxy, &wrong_port, "127.0.0.2", false);
    check_route(&cg, &proxy, &wrong_dest, "127.0.0.3", false);
}

#[test]
fn ipv6_dest_rule_intercepts_ipv6_and_leaves_ipv4_and_v4_mapped_direct() {
    require_root();
    let cg = TestCgroup::new("dest_v6");
    let s6 = hello_on("::1");
    let s4 = hello_on("127.0.0.1");
    let proxy = Proxy::start(&cg, &with_dual(&["-d", "::1/128"]));
    check_route(&cg, &proxy, &s6, "::1", true);
    check_route(&cg, &proxy, &s4, "127.0.0.1", false);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", false);
}

#[test]
fn ipv6_exclude_leaves_ipv6_direct_and_ipv4_intercepted() {
    require_root();
    let cg = TestCgroup::new("exclude_v6");
    let s6 = hello_on("::1");
    let s4 = hello_on("127.0.0.1");
    let proxy = Proxy::start(&cg, &with_dual(&["-x", "::1"]));
    check_route(&cg, &proxy, &s6, "::1", false);
    check_route(&cg, &proxy, &s4, "127.0.0.1", true);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", true);
}

#[test]
fn ipv4_exclude_applies_to_a_v4_mapped_destination() {
    require_root();
    let cg = TestCgroup::new("exclude_mapped");
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let proxy = Proxy::start(&cg, &with_dual(&["-x", "127.0.0.2"]));
    check_route(&cg, &proxy, &s2, "::ffff:127.0.0.2", false);
    check_route(&cg, &proxy, &s2, "127.0.0.2", false);
    // Positive control: the same kind of connect to a host not excluded.
    check_route(&cg, &proxy, &s3, "::ffff:127.0.0.3", true);
}

#[test]
fn ports_rule_applies_to_ipv6_and_v4_mapped_destinations() {
    require_root();
    let cg = TestCgroup::new("ports_v6");
    let listed6 = hello_on("::1");
    let other6 = hello_on("::1");
    let listed4 = hello_on("127.0.0.1");
    let other4 = hello_on("127.0.0.1");
    let ports = ports_of(&[&listed6, &listed4]);
    let proxy = Proxy::start(&cg, &with_dual(&["-p", &ports]));
    check_route(&cg, &proxy, &listed6, "::1", true);
    check_route(&cg, &proxy, &other6, "::1", false);
    check_route(&cg, &proxy, &listed4, "::ffff:127.0.0.1", true);
    check_route(&cg, &proxy, &other4, "::ffff:127.0.0.1", false);
}

#[test]
fn zero_length_prefixes_cover_every_address_of_their_own_family_only() {
    require_root();
    let cg = TestCgroup::new("zero_prefix");
    let s4 = hello_on("127.0.0.2");
    let s6 = hello_on("::1");
    {
        let mut proxy = Proxy::start(&cg, &with_dual(&["-x", "0.0.0.0/0"]));
        check_route(&cg, &proxy, &s4, "127.0.0.2", false);
        check_route(&cg, &proxy, &s4, "::ffff:127.0.0.2", false);
        check_route(&cg, &proxy, &s6, "::1", true);
        assert!(proxy.stop_term().success());
    }
    let proxy = Proxy::start(&cg, &with_dual(&["-d", "::/0"]));
    check_route(&cg, &proxy, &s6, "::1", true);
    check_route(&cg, &proxy, &s4, "127.0.0.2", false);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.2", false);
}

// ---- long rule files --------------------------------------------------------------------------

/// Writes a rule file of 10,000 distinct CIDRs (/24s of 10.0.0.0/8, a few
/// /32s and /48s) with comments, trailing comments and blank lines, plus
/// `extra` in the middle. Returns its path and the number of rules in it.
fn big_rule_file(dir: &TempDir, name: &str, extra: &str) -> (PathBuf, usize) {
    let path = dir.path().join(name);
    let mut f = std::io::BufWriter::new(fs::File::create(&path).unwrap());
    writeln!(f, "# {name}: 10,000 generated networks").unwrap();
    let mut rules = 0;
    for i in 0..10_000u32 {
        if i % 500 == 0 {
            writeln!(f, "\n# block {}", i / 500).unwrap();
        }
        if i == 5_000 {
            writeln!(f, "{extra}   # the one that matters").unwrap();
            rules += 1;
        }
        match i % 1000 {
            // Some IPv6 networks and host routes among them.
            999 => writeln!(f, "2001:db8:{:x}::/48", i / 1000).unwrap(),
            998 => writeln!(f, "10.200.{}.{}", (i / 1000) % 256, 7).unwrap(),
            _ => writeln!(f, "10.{}.{}.0/24", i / 256, i % 256).unwrap(),
        }
        rules += 1;
    }
    writeln!(f, "\n# end").unwrap();
    f.flush().unwrap();
    (path, rules)
}

/// Starts ktproxy with `extra`, returning it and the time from spawn to its
/// ready line (which comes after the programs are loaded and the rules are
/// in the kernel's maps). Only printed: how fast is scripts/bench.sh's
/// question ("start-up to ready with 10,000 rules"); here, the scaled
/// READY_TIMEOUT catches a hang.
fn start_timed<'a>(cg: &'a TestCgroup, extra: &[&str]) -> (Proxy<'a>, Duration) {
    let started = Instant::now();
    let proxy = Proxy::start(cg, extra);
    (proxy, started.elapsed())
}

#[test]
fn dest_file_of_10000_cidrs_is_loaded_and_honoured() {
    require_root();
    let cg = TestCgroup::new("dest_file_10k");
    let dir = TempDir::new("dest-file");
    let (path, rules) = big_rule_file(&dir, "dest.txt", "127.0.0.2/32");
    let path = path.to_str().unwrap();
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let s6 = hello_on("::1");

    let (proxy, took) = start_timed(&cg, &with_dual(&["--dest-file", path]));
    eprintln!("--dest-file with {rules} rules: ready {took:?} after spawn");
    let log = proxy.log();
    assert!(
        log.contains(&format!("{rules} destination rule(s)")),
        "{log}"
    );
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
    check_route(&cg, &proxy, &s6, "::1", false);
}

#[test]
fn exclude_file_of_10000_cidrs_is_loaded_and_honoured() {
    require_root();
    let cg = TestCgroup::new("exclude_file_10k");
    let dir = TempDir::new("exclude-file");
    let (path, rules) = big_rule_file(&dir, "never.txt", "127.0.0.3/32");
    let path = path.to_str().unwrap();
    let s2 = hello_on("127.0.0.2");
    let s3 = hello_on("127.0.0.3");
    let s6 = hello_on("::1");

    let (proxy, took) = start_timed(&cg, &with_dual(&["--exclude-file", path]));
    eprintln!("--exclude-file with {rules} rules: ready {took:?} after spawn");
    let log = proxy.log();
    assert!(log.contains(&format!("{rules} exclusion(s)")), "{log}");
    check_route(&cg, &proxy, &s3, "127.0.0.3", false);
    check_route(&cg, &proxy, &s2, "127.0.0.2", true);
    check_route(&cg, &proxy, &s6, "::1", true);
}

#[test]
fn dest_file_with_only_comments_intercepts_nothing() {
    require_root();
    let cg = TestCgroup::new("dest_file_empty");
    let dir = TempDir::new("dest-file-empty");
    let path = dir.path().join("empty.txt");
    fs::write(&path, "# nothing yet\n\n   # still nothing\n").unwrap();
    let s4 = hello_on("127.0.0.1");
    let s6 = hello_on("::1");
    let proxy = Proxy::start(&cg, &with_dual(&["--dest-file", path.to_str().unwrap()]));
    check_route(&cg, &proxy, &s4, "127.0.0.1", false);
    check_route(&cg, &proxy, &s6, "::1", false);
    check_route(&cg, &proxy, &s4, "::ffff:127.0.0.1", false);
}

// ---- malformed rules -------------------------------------------------------------------------

/// Runs a ktproxy that must refuse to start: checks that it exits 2 with
/// exactly one line on stderr containing every one of `named`, and leaves
/// nothing behind (no program attached to the cgroup, no ktproxy-<pid>
/// cgroup).
fn refuses_with_usage_error(cg: &TestCgroup, extra: &[&str], named: &[&str]) {
    refuses_with_usage_error_cmd(cg, &mut ktproxy_command(cg, extra), named);
}

fn refuses_with_usage_error_cmd(cg: &TestCgroup, cmd: &mut Command, named: &[&str]) {
    let shown = format!("{cmd:?}");
    let (out, pid) = output_within_pid(cmd.stdin(Stdio::null()), Duration::from_secs(10));
    let out = out.unwrap_or_else(|o| panic!("{shown} kept running: {}", describe(&o)));
    let stderr = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{shown}: expected exit 2: {}",
        describe(&out)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{shown}: expected exactly one line on stderr: {}",
        describe(&out)
    );
    for n in named {
        assert!(
            stderr.contains(n),
            "{shown}: stderr should name {n:?}: {stderr}"
        );
    }
    let left = attached_programs(cg.path());
    assert!(left.is_empty(), "{shown} left {left:?} attached");
    let own = own_cgroup_of(pid);
    assert!(!own.exists(), "{shown} left {} behind", own.display());
}

#[test]
fn malformed_rule_files_exit_2_with_one_line_naming_file_and_line() {
    require_root();
    let cg = TestCgroup::new("bad_rule_files");
    let dir = TempDir::new("bad-rules");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let bad3 = write("bad3.txt", "10.0.0.0/8\n# fine\n300.1.2.3/8\n10.1.0.0/16\n");
    let hostbits = write("hostbits.txt", "\n# host bits\n\n10.0.0.1/8  # oops\n");
    let toolong4 = write("toolong4.txt", "192.168.0.0/16\n10.0.0.0/33\n");
    let toolong6 = write("toolong6.txt", "2001:db8::/32\n::/129\n");
    let mapped = write("mapped.txt", "::ffff:10.0.0.0/104\n");
    let missing = dir.path().join("missing.txt");
    let missing = missing.to_str().unwrap();
    let a_dir = dir.path().to_str().unwrap();
    // Readable by root only, in a directory everyone may enter.
    let open_dir = TempDir::new("bad-rules-locked");
    fs::set_permissions(open_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let locked = open_dir.path().join("locked.txt");
    fs::write(&locked, "10.0.0.0/8\n").unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    let locked = locked.to_str().unwrap().to_string();
    let copy = UnprivilegedKtproxy::new();

    for opt in ["--dest-file", "--exclude-file"] {
        refuses_with_usage_error(
            &cg,
            &[opt, &bad3],
            &[opt, &format!("{bad3}:3:"), "'300.1.2.3/8'"],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &hostbits],
            &[
                &format!("{hostbits}:4:"),
                "'10.0.0.1/8'",
                "host bits",
                "did you mean 10.0.0.0/8",
            ],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &toolong4],
            &[&format!("{toolong4}:2:"), "'10.0.0.0/33'", "0-32"],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &toolong6],
            &[&format!("{toolong6}:2:"), "'::/129'", "0-128"],
        );
        refuses_with_usage_error(
            &cg,
            &[opt, &mapped],
            &[&format!("{mapped}:1:"), "IPv4-mapped"],
        );
        refuses_with_usage_error(&cg, &[opt, missing], &[opt, "cannot read", missing]);
        // Root reads any file: a directory is unreadable even for root...
        refuses_with_usage_error(&cg, &[opt, a_dir], &[opt, "cannot read", a_dir]);
        // ...and a mode 000 file is for anyone else (command-line errors come
        // before the privilege check).
        let mut cmd = copy.command(&ktproxy_command(&cg, &[opt, &locked]));
        refuses_with_usage_error_cmd(
            &cg,
            &mut cmd,
            &[opt, "cannot read", &locked, "Permission denied"],
        );
    }
    // A good file does not hide a bad one given after it.
    let good = write("good.txt", "10.0.0.0/8\n");
    refuses_with_usage_error(
        &cg,
        &["--dest-file", &good, "--dest-file", &bad3],
        &[&format!("{bad3}:3:")],
    );
}

#[test]
fn malformed_cidr_arguments_exit_2_with_one_line_naming_the_value() {
    require_root();
    let cg = TestCgroup::new("bad_cidr_args");
    let cases: [(&[&str], &[&str]); 8] = [
        (&["-d", "bogus"], &["-d/--dest", "'bogus'"]),
        (
            &["-x", "10.0.0.0/33"],
            &["-x/--exclude", "'10.0.0.0/33'", "0-32"],
        ),
        (&["-d", "10.0.0.1/8"], &["did you mean 10.0.0.0/8"]),
        (&["-x", "::1/129"], &["'::1/129'", "0-128"]),
        (&["-d", "2001:db8::1/32"], &["did you mean 2001:db8::/32"]),
        (&["-d", "10.0.0.0/"], &["'10.0.0.0/'"]),
        (&["--exclude", "example.com"], &["'example.com'"]),
        (
            &["-d", "10.0.0.0/8", "-d", "::ffff:1.2.3.4"],
            &["IPv4-mapped"],
        ),
    ];
    for (args, named) in cases {
        refuses_with_usage_error(&cg, args, named);
    }
}
