//! The kernel's counters: the names they are logged under, checked against
//! the C file's `enum stat` while compiling, and the exit line's text.

use std::fmt;

use super::skel::types::stat;

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
pub(super) const STATS: [(stat, &str); stat::STAT_MAX.0 as usize] = stat_names![
    STAT_REDIRECTED => "redirected",
    STAT_SKIPPED_PROXY_OWN => "skipped_proxy_own",
    STAT_SKIPPED_OTHER_NETNS => "skipped_other_netns",
    STAT_SKIPPED_BY_RULE => "skipped_by_rule",
    STAT_SKIPPED_TO_PROXY => "skipped_to_proxy",
    STAT_NO_SOCKET_STORAGE => "no_socket_storage",
    STAT_FLOWS_PUBLISHED => "flows_published",
    STAT_FLOWS_CLAIMED => "flows_claimed",
    STAT_ORIGINAL_DST_ANSWERED => "original_dst_answered",
    STAT_BOUND_TO_DEVICE => "bound_to_device",
    STAT_KERNEL_SOCKET => "kernel_socket",
    STAT_MPTCP_SUBFLOW => "mptcp_subflow",
    STAT_STALE => "stale",
    STAT_REFUSED => "refused",
    STAT_GUARD_REFUSED => "guard_refused",
    STAT_SKIPPED_UPSTREAM => "skipped_upstream",
    STAT_LOOP => "loop",
    STAT_DNS_CONNECT => "dns_connect",
    STAT_DNS_SENDMSG => "dns_sendmsg",
    STAT_DNS_REPLY_SOURCE => "dns_reply_source",
    STAT_DNS_TCP => "dns_tcp",
    STAT_FAKE_REDIRECTED => "fake_redirected",
    STAT_REFUSED_UDP => "refused_udp",
    STAT_REFUSED_UNPROXYABLE => "refused_unproxyable",
    STAT_DIRECT_UDP => "direct_udp",
    STAT_DIRECT_UNPROXYABLE => "direct_unproxyable",
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
pub struct Counters(pub(super) [u64; STATS.len()]);

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ((_, name), value)) in STATS.iter().zip(self.0).enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_logged_under_their_enumerators_names_in_enum_order() {
        let values: [u64; STATS.len()] = std::array::from_fn(|i| i as u64 * 10);
        assert_eq!(
            Counters(values).to_string(),
            "redirected=0 skipped_proxy_own=10 skipped_other_netns=20 skipped_by_rule=30 \
             skipped_to_proxy=40 no_socket_storage=50 flows_published=60 flows_claimed=70 \
             original_dst_answered=80 bound_to_device=90 kernel_socket=100 mptcp_subflow=110 \
             stale=120 refused=130 guard_refused=140 skipped_upstream=150 loop=160 \
             dns_connect=170 dns_sendmsg=180 dns_reply_source=190 dns_tcp=200 \
             fake_redirected=210 refused_udp=220 refused_unproxyable=230 direct_udp=240 \
             direct_unproxyable=250"
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
