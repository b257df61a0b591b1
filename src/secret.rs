//! Keeping the upstream proxy's credentials from other local users.
//!
//! `/proc/PID/cmdline` is world-readable: a URL with `user:pass@` given on
//! the command line is there for every local user to read. ktproxy offers
//! two ways around it, a file (`--upstream-file`, whose mode is checked) and
//! an environment variable (`/proc/PID/environ` is readable only by the
//! process's owner and root), and when the URL did come from argv it
//! overwrites the credentials there at start-up, as curl does with `-u`.

use std::ffi::{c_char, c_int, CStr};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::cli::Config;
use crate::error::{Context, Error, Result};

/// The environment variable that gives the upstream URL when neither -u nor
/// --upstream-file does.
pub const UPSTREAM_ENV: &str = "KTPROXY_UPSTREAM";

/// Reads the URL from `path`: its one line that is neither blank nor a `#`
/// comment. Returns it, and a warning if the URL carries credentials that
/// the file's group or other users can read.
pub fn read_upstream_file(path: &Path) -> Result<(String, Option<String>)> {
    let shown = path.display();
    let mut file =
        File::open(path).with_context(|| format!("--upstream-file: cannot read {shown}"))?;
    // fstat of the file read, not a second lookup of the path.
    let mode = file
        .metadata()
        .with_context(|| format!("--upstream-file: cannot read {shown}"))?
        .permissions()
        .mode();
    let mut text = String::new();
    file.read_to_string(&mut text)
        .with_context(|| format!("--upstream-file: cannot read {shown}"))?;
    let mut urls = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let url = match (urls.next(), urls.next()) {
        (Some(url), None) => url.to_string(),
        (None, _) => {
            return Err(Error::usage(format!(
                "--upstream-file {shown}: no URL in it"
            )))
        }
        (Some(_), Some(_)) => {
            return Err(Error::usage(format!(
                "--upstream-file {shown}: more than one URL (one line, plus # comments)"
            )))
        }
    };
    let warning = (mode & 0o044 != 0 && crate::upstream::has_credentials(&url)).then(|| {
        format!(
            "--upstream-file {shown} is readable by {} (mode {:04o}): the proxy credentials in it \
             are visible to other local users; chmod 600 it",
            match (mode & 0o040 != 0, mode & 0o004 != 0) {
                (true, true) => "its group and every user",
                (true, false) => "its group",
                _ => "every user",
            },
            mode & 0o7777
        )
    });
    Ok((url, warning))
}

/// `argc` and `argv` as the C runtime passed them to `main`: pointers into
/// the process's initial stack, the very bytes the kernel shows in
/// /proc/PID/cmdline. std keeps no reference into them: `std::env::args()`
/// copies the strings into new ones at every call.
static ARGC: AtomicUsize = AtomicUsize::new(0);
static ARGV: AtomicPtr<*mut c_char> = AtomicPtr::new(std::ptr::null_mut());

/// glibc calls the functions of the executable's `.init_array` with `(argc,
/// argv, envp)`, the same arguments `main` gets (a glibc extension that std
/// relies on the same way). Other C libraries (musl) pass nothing, so this
/// is only registered with glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[link_section = ".init_array"]
static CAPTURE_ARGV: extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) = capture_argv;

#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
extern "C" fn capture_argv(argc: c_int, argv: *mut *mut c_char, _envp: *mut *mut c_char) {
    ARGC.store(usize::try_from(argc).unwrap_or(0), Ordering::Relaxed);
    ARGV.store(argv, Ordering::Relaxed);
}

/// When the upstream URL came from the command line with credentials:
/// hides them there, and warns (via `cfg.warnings`) about where else they
/// were seen. Call it first thing in main, before any other thread starts.
pub fn hide_argv_credentials(cfg: &mut Config) {
    let Some(url) = cfg.upstream_arg.as_deref() else {
        return;
    };
    if !crate::upstream::has_credentials(url) {
        return;
    }
    let warning = match hide_credentials_in_argv(url) {
        Some(_) => {
            "-u/--upstream: the proxy credentials were in ktproxy's command line, which every \
             local user can read (ps); ktproxy has hidden them there, but the command line that \
             started it (sudo, a script) may still show them: prefer --upstream-file or \
             $KTPROXY_UPSTREAM"
        }
        None => {
            "-u/--upstream: the proxy credentials are in ktproxy's command line, which every \
             local user can read (ps), and cannot be hidden there on this system: use \
             --upstream-file or $KTPROXY_UPSTREAM"
        }
    };
    cfg.warnings.push(warning.to_string());
}

/// Overwrites, in ktproxy's own argv, the user info of every copy of `url`
/// (the -u value, found whether it was given as `-u URL`, `-uURL` or
/// `--upstream=URL`) with `*`, so that `ps` and /proc/PID/cmdline show
/// `socks5://*********@host:port`. The length stays: the kernel shows the
/// argument area as it was laid out at exec. Returns how many copies were
/// hidden, or None where argv cannot be reached.
///
/// Call it before any other thread starts: nothing may read argv meanwhile.
pub fn hide_credentials_in_argv(url: &str) -> Option<usize> {
    let span = crate::upstream::userinfo_span(url)?;
    let argv = ARGV.load(Ordering::Relaxed);
    if argv.is_null() {
        return None;
    }
    let argc = ARGC.load(Ordering::Relaxed);
    let needle = url.as_bytes();
    let mut hidden = 0;
    for i in 1..argc {
        // SAFETY: the C runtime passed argc valid entries of argv (checked
        // against a null entry all the same), each a NUL-terminated string
        // in the initial stack's argument area, writable and alive for the
        // whole process. Only this thread runs (the caller's contract) and
        // std holds no reference into them (it copies argv on every
        // std::env::args() call), so this exclusive slice aliases nothing;
        // it covers the string without its NUL, which stays in place.
        let arg = unsafe {
            let p = *argv.add(i);
            if p.is_null() {
                break;
            }
            let len = CStr::from_ptr(p).to_bytes().len();
            std::slice::from_raw_parts_mut(p.cast::<u8>(), len)
        };
        let mut from = 0;
        while let Some(at) = find(&arg[from..], needle).map(|a| a + from) {
            arg[at + span.start..at + span.end].fill(b'*');
            hidden += 1;
            from = at + needle.len();
        }
    }
    Some(hidden)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn temp_file(name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ktproxy-unit-{}-{name}", std::process::id()));
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn upstream_file_gives_its_one_url_and_warns_when_others_can_read_credentials() {
        let p = temp_file(
            "private",
            "# the proxy\n\n  socks5://tok@127.0.0.1:1080  \n",
            0o600,
        );
        let (url, warning) = read_upstream_file(&p).unwrap();
        assert_eq!(url, "socks5://tok@127.0.0.1:1080");
        assert_eq!(warning, None);

        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let w = read_upstream_file(&p).unwrap().1.expect("a warning");
        assert!(w.contains("readable by its group (mode 0640)"), "{w}");
        assert!(!w.contains("tok"), "{w}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o604)).unwrap();
        let w = read_upstream_file(&p).unwrap().1.expect("a warning");
        assert!(w.contains("every user (mode 0604)"), "{w}");
        fs::remove_file(&p).unwrap();

        // Nothing secret in it: nothing to warn about.
        let p = temp_file("public", "http://127.0.0.1:3128\n", 0o644);
        assert_eq!(read_upstream_file(&p).unwrap().1, None);
        fs::remove_file(&p).unwrap();
    }

    #[test]
    fn upstream_file_errors_name_the_file_and_never_show_its_contents() {
        let p = temp_file("two", "socks5://a:secret@h:1\nsocks5://b@h:2\n", 0o600);
        let e = read_upstream_file(&p).unwrap_err().to_string();
        assert!(e.contains("more than one URL"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        fs::remove_file(&p).unwrap();
        let p = temp_file("empty", "# nothing\n", 0o600);
        let e = read_upstream_file(&p).unwrap_err().to_string();
        assert!(e.ends_with("no URL in it"), "{e}");
        fs::remove_file(&p).unwrap();
        let e = read_upstream_file(Path::new("/nonexistent/up")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--upstream-file: cannot read /nonexistent/up"),
            "{e}"
        );
    }

    #[test]
    fn argv_was_captured_from_the_c_runtime() {
        // The test binary's own argv: argv[0] is its path.
        let argv = ARGV.load(Ordering::Relaxed);
        assert!(!argv.is_null());
        assert!(ARGC.load(Ordering::Relaxed) >= 1);
        // SAFETY: argv[0] is a NUL-terminated string (see above); only read.
        let first = unsafe { CStr::from_ptr(*argv) };
        let want = std::env::args_os().next().unwrap();
        assert_eq!(first.to_bytes(), want.as_encoded_bytes());
    }

    #[test]
    fn find_locates_every_copy() {
        assert_eq!(find(b"--upstream=s://a@h", b"s://a@h"), Some(11));
        assert_eq!(find(b"abc", b""), None);
        assert_eq!(find(b"ab", b"abc"), None);
    }
}
