//! Issue 11's options: where the upstream URL comes from (-u,
//! --upstream-file, $KTPROXY_UPSTREAM), --mark, and COMMAND's environment
//! (--preserve-env, --env).

use crate::error::{Error, Result};
use crate::secret::{self, UPSTREAM_ENV};
use crate::upstream::Upstream;

/// -u, --upstream-file or $KTPROXY_UPSTREAM, in that order: the upstream,
/// and the -u text when that is where it came from.
pub(super) fn parse_upstream(
    m: &getopts::Matches,
    from_env: Option<String>,
    warnings: &mut Vec<String>,
) -> Result<(Option<Upstream>, Option<String>)> {
    match (m.opt_str("u"), m.opt_str("upstream-file")) {
        (Some(_), Some(_)) => Err(Error::usage(
            "-u/--upstream and --upstream-file exclude each other",
        )),
        (Some(url), None) => Ok((Some(Upstream::parse(&url)?), Some(url))),
        (None, Some(path)) => {
            let (url, warning) = secret::read_upstream_file(path.as_ref())?;
            warnings.extend(warning);
            let up = Upstream::parse_from(&url, &format!("--upstream-file {path}"))?;
            Ok((Some(up), None))
        }
        (None, None) => match from_env.filter(|v| !v.trim().is_empty()) {
            Some(url) => Ok((Some(Upstream::parse_from(url.trim(), UPSTREAM_ENV)?), None)),
            None => Ok((None, None)),
        },
    }
}

type SecurityOptions = (Option<u32>, Vec<String>, Vec<(String, String)>);

/// --mark, --preserve-env and --env.
pub(super) fn parse_security(
    m: &getopts::Matches,
    user: bool,
    command: bool,
) -> Result<SecurityOptions> {
    let mark = m.opt_str("mark").map(|s| parse_mark(&s)).transpose()?;
    let mut preserve = Vec::new();
    for list in m.opt_strs("preserve-env") {
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            check_env_name("--preserve-env", name)?;
            preserve.push(name.to_string());
        }
    }
    if !preserve.is_empty() && !user {
        return Err(Error::usage(
            "--preserve-env goes with --user (without it, COMMAND keeps the whole environment)",
        ));
    }
    let mut set = Vec::new();
    for pair in m.opt_strs("env") {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| Error::usage(format!("--env: '{pair}': expected NAME=VALUE")))?;
        check_env_name("--env", name)?;
        if value.contains('\0') {
            return Err(Error::usage(format!(
                "--env {name}: value contains a NUL byte"
            )));
        }
        set.push((name.to_string(), value.to_string()));
    }
    if !set.is_empty() && !command {
        return Err(Error::usage("--env goes with -- COMMAND"));
    }
    Ok((mark, preserve, set))
}

fn parse_mark(s: &str) -> Result<u32> {
    let n = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse::<u32>(),
    };
    match n {
        Ok(n) if n != 0 && !s.starts_with('+') => Ok(n),
        _ => Err(Error::usage(format!(
            "--mark: invalid value '{s}': expected a number from 1 to 4294967295 (or 0x1 to \
             0xffffffff)"
        ))),
    }
}

fn check_env_name(option: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(Error::usage(format!(
            "{option}: invalid variable name '{name}'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cli::tests::{args, run, usage_error};
    use crate::cli::{parse_with, Action, Config};

    fn run_env(a: &[&str], env: &str) -> Config {
        match parse_with(&args(a), Some(env.to_string())).expect("parses") {
            Action::Run(c) => *c,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn upstream_comes_from_u_then_upstream_file_then_the_environment() {
        let c = run_env(&[], "socks5://t0ken@127.0.0.1:1080");
        assert_eq!(
            c.upstream.as_ref().unwrap().display(),
            "socks5://***@127.0.0.1:1080"
        );
        assert_eq!(c.upstream_arg, None, "nothing to hide in argv");
        let c = run_env(
            &["-u", "http://a:b@127.0.0.1:3128"],
            "socks5://127.0.0.1:1080",
        );
        assert_eq!(
            c.upstream.as_ref().unwrap().display(),
            "http://***@127.0.0.1:3128"
        );
        assert_eq!(c.upstream_arg.as_deref(), Some("http://a:b@127.0.0.1:3128"));
        assert!(run_env(&[], "  ").upstream.is_none(), "empty means unset");

        let e = parse_with(&args(&[]), Some("socks9://t0ken@h:1".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("KTPROXY_UPSTREAM: invalid URL 'socks9://***@h:1'"),
            "{e}"
        );
        assert!(
            usage_error(&["-u", "socks5://h:1", "--upstream-file", "/x"])
                .contains("exclude each other")
        );

        let path = std::env::temp_dir().join(format!("ktproxy-cli-{}", std::process::id()));
        std::fs::write(&path, "socks5://t0ken@h:0\n").unwrap();
        let file = path.to_str().unwrap();
        let e = usage_error(&["--upstream-file", file]);
        assert_eq!(
            e,
            format!("--upstream-file {file}: invalid URL 'socks5://***@h:0': invalid port '0'")
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn mark_is_decimal_or_hex_and_not_zero() {
        assert_eq!(run(&[]).mark, None);
        assert_eq!(run(&["--mark", "42"]).mark, Some(42));
        assert_eq!(run(&["--mark", "0x4b50"]).mark, Some(0x4b50));
        assert_eq!(run(&["--mark", "4294967295"]).mark, Some(u32::MAX));
        for bad in ["0", "-1", "+5", "0x", "4294967296", "ten"] {
            assert!(
                usage_error(&["--mark", bad])
                    .starts_with(&format!("--mark: invalid value '{bad}'")),
                "{bad}"
            );
        }
    }

    #[test]
    fn environment_options_go_with_user_and_command() {
        let c = run(&[
            "--user",
            "nobody",
            "--preserve-env",
            "LANG, LC_ALL",
            "--preserve-env=TZ",
            "--env",
            "A=1=2",
            "--",
            "env",
        ]);
        assert_eq!(c.preserve_env, ["LANG", "LC_ALL", "TZ"]);
        assert_eq!(c.set_env, [("A".to_string(), "1=2".to_string())]);
        assert!(usage_error(&["--preserve-env", "LANG", "--", "env"]).contains("goes with --user"));
        assert!(usage_error(&["--env", "A=1"]).contains("goes with -- COMMAND"));
        assert!(usage_error(&["--env", "A", "--", "env"]).contains("expected NAME=VALUE"));
        assert!(usage_error(&["--env", "=1", "--", "env"]).contains("invalid variable name"));
    }
}
