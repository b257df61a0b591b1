//! libbpf's log while loading, and the one-line error made of it: which
//! program, and the verifier's own words.

use std::path::Path;
use std::sync::Mutex;

use libbpf_rs::PrintLevel;

use crate::error::Error;
use crate::preflight;

static LIBBPF_LOG: Mutex<String> = Mutex::new(String::new());

fn record_libbpf(level: PrintLevel, msg: String) {
    // libbpf prefixes its own lines with "libbpf: ".
    log::trace!("{}", msg.trim_end());
    if level <= PrintLevel::Info {
        if let Ok(mut buf) = LIBBPF_LOG.lock() {
            buf.push_str(&msg);
        }
    }
}

fn forward_libbpf(_level: PrintLevel, msg: String) {
    log::debug!("{}", msg.trim_end());
}

/// While loading, keep what libbpf says (the verifier log comes this way);
/// afterwards only forward it to our log. Returns what was captured.
pub(super) fn capture_libbpf_log(on: bool) -> String {
    if on {
        if let Ok(mut b) = LIBBPF_LOG.lock() {
            b.clear();
        }
        libbpf_rs::set_print(Some((PrintLevel::Debug, record_libbpf)));
        String::new()
    } else {
        libbpf_rs::set_print(Some((PrintLevel::Debug, forward_libbpf)));
        LIBBPF_LOG
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
}

/// One line: which program, why, and the verifier's own words.
pub(super) fn load_error(err: &str, log: &str) -> Error {
    let (kernel, release) = preflight::kernel_version();
    let (maj, min) = preflight::MIN_KERNEL;
    let too_old = kernel.is_some_and(|k| k < preflight::MIN_KERNEL);
    let no_btf = !Path::new("/sys/kernel/btf/vmlinux").exists();
    let kernel_note = format!(
        "kernel {release}{}; ktproxy needs Linux >= {maj}.{min}{}",
        if too_old { ", too old" } else { "" },
        if no_btf {
            " with BTF (CONFIG_DEBUG_INFO_BTF; /sys/kernel/btf/vmlinux is missing)"
        } else {
            ""
        }
    );
    let what = match failed_program(log) {
        Some(prog) => format!("loading eBPF program {prog}"),
        None => "loading the eBPF programs".to_string(),
    };
    let detail = verifier_error(log)
        .or_else(|| last_libbpf_error(log))
        .unwrap_or_else(|| err.to_string());
    Error::new(format!("{what}: {detail} ({kernel_note})"))
}

/// libbpf names the program in "libbpf: prog 'NAME': BPF program load failed: ...".
fn failed_program(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("BPF program load failed") || l.contains("failed to load"))
        .and_then(|l| l.split_once("prog '"))
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(name, _)| name.to_string())
}

/// The verifier's complaint: in the load log, the last line before the
/// "processed N insns" summary that is not an instruction dump or register
/// state (those start with a digit, ';' or a register).
fn verifier_error(log: &str) -> Option<String> {
    let start = log.find("-- BEGIN PROG LOAD LOG --")?;
    let body = &log[start..];
    let body = &body[..body.find("-- END PROG LOAD LOG --").unwrap_or(body.len())];
    let lines: Vec<&str> = body
        .lines()
        .skip(1)
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let end = lines
        .iter()
        .position(|l| l.starts_with("processed "))
        .unwrap_or(lines.len());
    lines[..end]
        .iter()
        .rev()
        .find(|l| {
            let first = l.chars().next().unwrap_or('0');
            !first.is_ascii_digit()
                && first != ';'
                && !l.starts_with("R")
                && !l.starts_with("from ")
                && !l.starts_with("libbpf:")
                && !l.starts_with("mark_precise")
                && !l.starts_with("last_idx")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
        })
        .map(|l| l.to_string())
}

fn last_libbpf_error(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .find(|l| l.starts_with("libbpf: ") && !l.contains("-- END"))
        .map(|l| l.trim_start_matches("libbpf: ").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // What libbpf printed for a connect4 program that stored 16 bits to user_port.
    const LOG: &str = "\
libbpf: prog 'ktproxy_connect4': BPF program load failed: Permission denied
libbpf: prog 'ktproxy_connect4': -- BEGIN PROG LOAD LOG --
0: R1=ctx() R10=fp0
; if (ctx->type != SOCK_STREAM) @ ktproxy.bpf.c:210
0: (61) r2 = *(u32 *)(r1 +32)         ; R1=ctx() R2_w=scalar()
5: (6b) *(u16 *)(r1 +24) = r2
invalid bpf_context access off=24 size=2
processed 6 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0
-- END PROG LOAD LOG --
libbpf: prog 'ktproxy_connect4': failed to load: -13
libbpf: failed to load object 'ktproxy_bpf'
";

    #[test]
    fn load_errors_name_the_program_and_the_verifier_complaint() {
        assert_eq!(failed_program(LOG).as_deref(), Some("ktproxy_connect4"));
        assert_eq!(
            verifier_error(LOG).as_deref(),
            Some("invalid bpf_context access off=24 size=2")
        );
        let e = load_error("Permission denied", LOG).to_string();
        assert!(
            e.starts_with("loading eBPF program ktproxy_connect4: invalid bpf_context access"),
            "{e}"
        );
        assert!(e.contains("ktproxy needs Linux >= 5.14"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn load_errors_without_a_verifier_log_use_libbpfs_last_word() {
        let log = "libbpf: map 'flows': failed to create: Operation not permitted\n";
        let e = load_error("Operation not permitted", log).to_string();
        assert!(
            e.starts_with("loading the eBPF programs: map 'flows': failed to create"),
            "{e}"
        );
    }
}
