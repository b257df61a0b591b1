//! The Rust side of bpf/ktproxy.bpf.c: configure the programs, load them, and
//! attach them to cgroups with bpf_links.
//!
//! Links, not legacy attachments: a link lives exactly as long as its file
//! descriptor, so when ktproxy exits for any reason, kill -9 included, the
//! kernel detaches everything and connections go direct again.

use std::fmt;
use std::fs::File;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, PrintLevel};

use crate::cli::Config;
use crate::error::{Context, Error, Result};
use crate::preflight;
use crate::rules::{Cidr, PortSet, Rules};

mod skel {
    include!(concat!(env!("OUT_DIR"), "/ktproxy.skel.rs"));
}
use skel::types::{lpm4_key, lpm6_key, stat};
use skel::{KtproxySkel, KtproxySkelBuilder};

/// Everything the kernel side needs, fixed in .rodata before load(): there is
/// no moment where a program runs with half a configuration.
pub struct KernelConfig<'a> {
    proxy_cgroup_id: u64,
    proxy_netns_cookie: u64,
    listen4: Option<SocketAddrV4>,
    listen6: Option<SocketAddrV6>,
    ports: Option<&'a PortSet>,
    rules: &'a Rules,
}

impl<'a> KernelConfig<'a> {
    /// The options, plus what only start-up knows: ktproxy's own cgroup (whose
    /// dials are never intercepted), its network namespace and the addresses
    /// the listeners really got (port 0 picks one).
    pub fn new(
        cfg: &'a Config,
        own_cgroup_id: u64,
        netns_cookie: u64,
        bound: &[SocketAddr],
    ) -> KernelConfig<'a> {
        KernelConfig {
            proxy_cgroup_id: own_cgroup_id,
            proxy_netns_cookie: netns_cookie,
            listen4: bound.iter().find_map(|a| match a {
                SocketAddr::V4(a) => Some(*a),
                SocketAddr::V6(_) => None,
            }),
            listen6: bound.iter().find_map(|a| match a {
                SocketAddr::V6(a) => Some(*a),
                SocketAddr::V4(_) => None,
            }),
            ports: cfg.ports.as_ref(),
            rules: &cfg.rules,
        }
    }
}

/// `[STAT_X => "x", ...]`: each entry, with the compile-time check that
/// `"x"` is STAT_X's name.
macro_rules! stat_names {
    ($($stat:ident => $name:literal),* $(,)?) => {
        [$({
            const _: () = assert!(
                is_enumerator_name(stringify!($stat), $name),
                concat!("counter ", $name, " must be named for its enumerator ", stringify!($stat))
            );
            (stat::$stat, $name)
        }),*]
    };
}

/// The counters the programs keep (`enum stat` in the C file) with the names
/// the exit line `kernel counters: redirected=N ...` gives them, which tests
/// and users parse. The table is sized by the generated STAT_MAX and checked
/// while compiling: a counter added in C without a name here, a name that is
/// not its enumerator's (lower case, without STAT_), or an entry out of the
/// enum's order does not build.
const STATS: [(stat, &str); stat::STAT_MAX.0 as usize] = stat_names![
    STAT_REDIRECTED => "redirected",
    STAT_SKIPPED_PROXY_OWN => "skipped_proxy_own",
    STAT_SKIPPED_OTHER_NETNS => "skipped_other_netns",
    STAT_SKIPPED_BY_RULE => "skipped_by_rule",
    STAT_SKIPPED_TO_PROXY => "skipped_to_proxy",
    STAT_NO_SOCKET_STORAGE => "no_socket_storage",
    STAT_FLOWS_PUBLISHED => "flows_published",
    STAT_FLOWS_CLAIMED => "flows_claimed",
    STAT_ORIGINAL_DST_ANSWERED => "original_dst_answered",
];

// Entry i is enumerator i: with the size, every counter is named exactly once.
const _: () = {
    let mut i = 0;
    while i < STATS.len() {
        assert!(
            STATS[i].0 .0 as usize == i,
            "STATS must list the counters once each, in enum stat order"
        );
        i += 1;
    }
};

/// `STAT_SKIPPED_BY_RULE` is named `skipped_by_rule`.
const fn is_enumerator_name(enumerator: &str, name: &str) -> bool {
    let (e, n) = (enumerator.as_bytes(), name.as_bytes());
    let prefix = b"STAT_";
    if e.len() != prefix.len() + n.len() {
        return false;
    }
    let mut i = 0;
    while i < e.len() {
        let want = if i < prefix.len() {
            prefix[i]
        } else {
            n[i - prefix.len()].to_ascii_uppercase()
        };
        if e[i] != want {
            return false;
        }
        i += 1;
    }
    true
}

/// The kernel counters, each summed over CPUs; displayed as the exit line
/// shows them: `redirected=N skipped_proxy_own=N ...`.
pub struct Counters([u64; STATS.len()]);

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ((_, name), value)) in STATS.iter().zip(self.0).enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={value}")?;
        }
        Ok(())
    }
}

/// Loaded programs and their links. Dropping it detaches everything, the
/// redirect first.
pub struct Redirect {
    skel: KtproxySkel<'static>,
    links: Vec<(String, Link)>,
}

impl Redirect {
    /// Loads the programs and attaches them: the proxy-side ones to ktproxy's
    /// own cgroup, the client-side ones to the intercepted cgroup, connect
    /// last so that a redirected connection always finds everything in place.
    pub fn start(cfg: &KernelConfig, intercepted: &Path, own: &Path) -> Result<Redirect> {
        for (missing, family) in [
            (cfg.listen4.is_none(), "IPv4"),
            (cfg.listen6.is_none(), "IPv6"),
        ] {
            if missing {
                log::info!("{family} connections are not intercepted: no {family} listen address");
            }
        }
        let skel = load(cfg)?;
        let mut r = Redirect {
            skel,
            links: Vec::new(),
        };
        let own_fd = open_dir(own)?;
        let target_fd = open_dir(intercepted)?;
        let p = &r.skel.progs;
        let (mine, theirs) = ((&own_fd, own), (&target_fd, intercepted));
        let plan = [
            (&p.ktproxy_getsockopt, mine),
            (&p.ktproxy_sockops_client, theirs),
            (&p.ktproxy_getpeername4, theirs),
            (&p.ktproxy_getpeername6, theirs),
            (&p.ktproxy_connect6, theirs),
            (&p.ktproxy_connect4, theirs),
        ];
        let mut links = Vec::new();
        for (prog, (fd, path)) in plan {
            let name = prog.name().to_string_lossy().into_owned();
            let link = prog
                .attach_cgroup(fd.as_raw_fd())
                .with_context(|| format!("attaching {name} to {}", path.display()))?;
            links.push((name, link));
        }
        r.links = links;
        Ok(r)
    }

    /// Each counter summed over CPUs.
    pub fn counters(&self) -> Counters {
        let map = &self.skel.maps.stats;
        Counters(STATS.map(|(counter, _)| {
            // The map's key is the enum's value as a __u32, its value a
            // __u64 per CPU.
            map.lookup_percpu(&counter.0.to_ne_bytes(), MapFlags::ANY)
                .ok()
                .flatten()
                .map(|per_cpu| {
                    per_cpu
                        .iter()
                        .filter_map(|v| v.get(..8)?.try_into().ok())
                        .map(u64::from_ne_bytes)
                        .sum()
                })
                .unwrap_or(0)
        }))
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        // Reverse attach order: connect first, so no new connection is
        // redirected while the rest is being taken down.
        while let Some((name, link)) = self.links.pop() {
            drop(link);
            log::debug!("detached {name}");
        }
    }
}

fn open_dir(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("opening cgroup {}", path.display()))
}

fn load(cfg: &KernelConfig) -> Result<KtproxySkel<'static>> {
    // The skeleton borrows its object for as long as the programs are loaded,
    // which is the rest of the process's life.
    let object = Box::leak(Box::new(MaybeUninit::uninit()));
    let mut open = KtproxySkelBuilder::default()
        .open(object)
        .context("opening the eBPF object")?;

    let ro = open
        .maps
        .rodata_data
        .as_deref_mut()
        .ok_or_else(|| Error::new("eBPF object has no .rodata to configure"))?;
    ro.proxy_cgroup_id = cfg.proxy_cgroup_id;
    ro.proxy_netns_cookie = cfg.proxy_netns_cookie;
    if let Some(a) = cfg.listen4 {
        // Addresses stay in network byte order, ports in host byte order.
        ro.listen_ip4 = u32::from_ne_bytes(a.ip().octets());
        ro.listen_port4 = a.port();
    }
    if let Some(a) = cfg.listen6 {
        ro.listen_ip6 = ip6_words(a.ip());
        ro.listen_port6 = a.port();
    }
    if let Some(ports) = cfg.ports {
        ro.port_filter = 1;
        ro.port_bits = *ports.bits();
    }
    let (dest4, dest6) = lpm_keys(&cfg.rules.dest);
    let (excl4, excl6) = lpm_keys(&cfg.rules.exclude);
    ro.dest_filter = u8::from(cfg.rules.dest_given);
    ro.have_excl4 = u8::from(!excl4.is_empty());
    ro.have_excl6 = u8::from(!excl6.is_empty());

    // LPM tries are sized to their rules (an empty map is not allowed).
    let m = &mut open.maps;
    for (map, len) in [
        (&mut m.dest4, dest4.len()),
        (&mut m.dest6, dest6.len()),
        (&mut m.excl4, excl4.len()),
        (&mut m.excl6, excl6.len()),
    ] {
        let n =
            u32::try_from(len.max(1)).map_err(|_| Error::usage("too many destination rules"))?;
        map.set_max_entries(n).context("sizing a rule map")?;
    }

    capture_libbpf_log(true);
    let loaded = open.load();
    let log = capture_libbpf_log(false);
    let skel = loaded.map_err(|e| load_error(&e.to_string(), &log))?;

    // Filled after load but before any program is attached: no connect can
    // see a half-filled rule set.
    let m = &skel.maps;
    fill_rules(&m.dest4, &dest4, "IPv4 destination")?;
    fill_rules(&m.dest6, &dest6, "IPv6 destination")?;
    fill_rules(&m.excl4, &excl4, "IPv4 exclusion")?;
    fill_rules(&m.excl6, &excl6, "IPv6 exclusion")?;
    Ok(skel)
}

fn fill_rules<K: Pod>(map: &impl MapCore, keys: &[K], what: &str) -> Result<()> {
    for key in keys {
        // The tries' value is a __u8 that nothing reads: presence is the answer.
        map.update(bytes_of(key), &[1], MapFlags::ANY)
            .with_context(|| format!("loading {what} rules"))?;
    }
    Ok(())
}

/// The keys of the LPM tries, per family: prefix length in host byte order,
/// the address in network byte order, as the programs look them up.
fn lpm_keys(cidrs: &[Cidr]) -> (Vec<lpm4_key>, Vec<lpm6_key>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for c in cidrs {
        match *c {
            Cidr::V4(a, len) => v4.push(lpm4_key {
                prefixlen: len.into(),
                addr: u32::from_ne_bytes(a.octets()),
            }),
            Cidr::V6(a, len) => v6.push(lpm6_key {
                prefixlen: len.into(),
                addr: ip6_words(&a),
            }),
        }
    }
    (v4, v6)
}

/// A type generated from the C file that the kernel gets as raw bytes.
///
/// # Safety
/// Only for `#[repr(C)]` types without padding: every byte must be
/// initialised for `bytes_of` to read it.
unsafe trait Pod: Copy {}

// SAFETY: repr(C) with two u32 fields and, as asserted, no padding.
unsafe impl Pod for lpm4_key {}
const _: () = assert!(size_of::<lpm4_key>() == size_of::<u32>() * 2);
// SAFETY: repr(C) with a u32 and a [u32; 4] and, as asserted, no padding.
unsafe impl Pod for lpm6_key {}
const _: () = assert!(size_of::<lpm6_key>() == size_of::<u32>() * 5);

fn bytes_of<T: Pod>(value: &T) -> &[u8] {
    // SAFETY: `value` is a live reference to size_of::<T>() bytes, all of
    // them initialised because T has no padding (Pod); u8 has no alignment
    // requirement, and the slice borrows `value` for its lifetime.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// An IPv6 address as the C side's `__u32 [4]`, in network byte order.
fn ip6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

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
fn capture_libbpf_log(on: bool) -> String {
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
fn load_error(err: &str, log: &str) -> Error {
    let (kernel, release) = preflight::kernel_version();
    let (maj, min) = preflight::MIN_KERNEL;
    let too_old = kernel.is_some_and(|k| k < preflight::MIN_KERNEL);
    let kernel_note = format!(
        "kernel {release}{}; ktproxy needs Linux >= {maj}.{min}",
        if too_old { ", too old" } else { "" }
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

    #[test]
    fn ipv6_words_keep_network_byte_order() {
        let w = ip6_words(&"::1".parse().unwrap());
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 1]);
    }

    #[test]
    fn lpm_keys_are_host_order_prefix_length_then_network_order_address() {
        let cidrs = [
            Cidr::parse("10.1.0.0/16").unwrap(),
            Cidr::parse("2001:db8::/32").unwrap(),
        ];
        let (v4, v6) = lpm_keys(&cidrs);
        assert_eq!(v4.len(), 1);
        assert_eq!(v6.len(), 1);
        let mut want4 = 16u32.to_ne_bytes().to_vec();
        want4.extend([10, 1, 0, 0]);
        assert_eq!(bytes_of(&v4[0]), want4);
        let mut want6 = 32u32.to_ne_bytes().to_vec();
        want6.extend("2001:db8::".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(bytes_of(&v6[0]), want6);
    }

    #[test]
    fn kernel_config_takes_each_familys_bound_address_and_the_filters() {
        let args: Vec<String> = ["-p", "443", "-x", "10.0.0.0/8"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cfg = match crate::cli::parse(&args).unwrap() {
            crate::cli::Action::Run(cfg) => cfg,
            _ => panic!("expected a run"),
        };
        let bound: [SocketAddr; 2] = [
            "[::1]:41000".parse().unwrap(),
            "127.0.0.1:42000".parse().unwrap(),
        ];
        let k = KernelConfig::new(&cfg, 7, 9, &bound);
        assert_eq!((k.proxy_cgroup_id, k.proxy_netns_cookie), (7, 9));
        assert_eq!(k.listen4, Some("127.0.0.1:42000".parse().unwrap()));
        assert_eq!(k.listen6, Some("[::1]:41000".parse().unwrap()));
        assert!(k.ports.is_some_and(|p| p.contains(443) && !p.contains(80)));
        assert_eq!(k.rules.exclude.len(), 1);

        let k = KernelConfig::new(&cfg, 7, 9, &bound[1..]);
        assert_eq!(k.listen6, None, "no IPv6 listener: IPv6 is not intercepted");
    }

    #[test]
    fn counters_are_logged_under_their_enumerators_names_in_enum_order() {
        let values: [u64; STATS.len()] = std::array::from_fn(|i| i as u64 * 10);
        assert_eq!(
            Counters(values).to_string(),
            "redirected=0 skipped_proxy_own=10 skipped_other_netns=20 skipped_by_rule=30 \
             skipped_to_proxy=40 no_socket_storage=50 flows_published=60 flows_claimed=70 \
             original_dst_answered=80"
        );
    }

    #[test]
    fn counter_names_are_their_enumerators_lower_case_without_the_prefix() {
        assert!(is_enumerator_name(
            "STAT_SKIPPED_BY_RULE",
            "skipped_by_rule"
        ));
        assert!(!is_enumerator_name(
            "STAT_SKIPPED_BY_RULE",
            "skipped_by_rules"
        ));
        assert!(!is_enumerator_name("STAT_SKIP_RULE", "skipped_by_rule"));
        assert!(!is_enumerator_name("SKIPPED_BY_RULE", "skipped_by_rule"));
    }
}
