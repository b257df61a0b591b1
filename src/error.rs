//! The project's error type: one line of text that says what failed and why,
//! built up with `.context(...)` as it travels out, e.g.
//! "attaching ktproxy_connect4 to /sys/fs/cgroup/x: Operation not permitted".

use std::fmt;

#[derive(Debug)]
pub struct Error {
    msg: String,
    code: i32,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Something went wrong while running: exit status 1.
    pub fn new(msg: impl Into<String>) -> Self {
        Error::with_code(msg, 1)
    }

    /// The command line is wrong: exit status 2, as getopts-style tools do.
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::with_code(msg, 2)
    }

    /// E.g. 127 for a COMMAND that does not exist, as shells report it.
    pub fn with_code(msg: impl Into<String>, code: i32) -> Self {
        Error {
            msg: msg.into(),
            code,
        }
    }

    pub fn exit_code(&self) -> i32 {
        self.code
    }

    fn wrap(self, ctx: impl fmt::Display) -> Self {
        Error {
            msg: format!("{ctx}: {}", self.msg),
            code: self.code,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::new(io_text(&e))
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::new(e.desc())
    }
}

impl From<libbpf_rs::Error> for Error {
    fn from(e: libbpf_rs::Error) -> Self {
        // libbpf-rs chains its own context ("failed to attach cgroup: ...");
        // the kernel's reason is the last link, and the only part users need.
        let text = e.to_string();
        let reason = match e.kind() {
            libbpf_rs::ErrorKind::PermissionDenied => "Operation not permitted".to_string(),
            _ => text.rsplit(": ").next().unwrap_or(&text).to_string(),
        };
        Error::new(strip_os_error(&reason))
    }
}

/// `std::io::Error` prints "Permission denied (os error 13)"; the number is
/// noise in a message meant for people.
pub fn io_text(e: &std::io::Error) -> String {
    strip_os_error(&e.to_string())
}

fn strip_os_error(text: &str) -> String {
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text.to_string(),
    }
}

pub trait Context<T> {
    fn context(self, ctx: impl fmt::Display) -> Result<T>;
    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, ctx: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().wrap(ctx))
    }

    fn with_context<C: fmt::Display>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().wrap(f()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_prefixes_and_drops_the_errno_number() {
        let r: std::result::Result<(), std::io::Error> =
            Err(std::io::Error::from_raw_os_error(libc::EPERM));
        let e = r.context("attaching connect4 to /x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "attaching connect4 to /x: Operation not permitted"
        );
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn usage_errors_keep_exit_status_2_through_context() {
        let r: Result<()> = Err(Error::usage("bad port"));
        assert_eq!(r.context("-p").unwrap_err().exit_code(), 2);
    }
}
