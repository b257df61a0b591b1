//! The bytes the kernel side reads: LPM trie keys, IPv6 words and the fake
//! range, in the byte orders the programs expect.

use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr};

use libbpf_rs::{MapCore, MapFlags};

use super::skel::types::{lpm4_key, lpm6_key};
use crate::error::{Context, Result};
use crate::rules::Cidr;

pub(super) fn fill_rules<K: Pod>(map: &impl MapCore, keys: &[K], what: &str) -> Result<()> {
    for key in keys {
        // The tries' value is a __u8 that nothing reads: presence is the answer.
        map.update(bytes_of(key), &[1], MapFlags::ANY)
            .with_context(|| format!("loading {what} rules"))?;
    }
    Ok(())
}

/// The keys of the LPM tries, per family: prefix length in host byte order,
/// the address in network byte order, as the programs look them up.
pub(super) fn lpm_keys(cidrs: &[Cidr]) -> (Vec<lpm4_key>, Vec<lpm6_key>) {
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

/// (network, mask) of a fake range, both in network byte order as the
/// programs compare them; a /0 would be everything and is never given.
pub(super) fn fake_range(net: Ipv4Addr, len: u8) -> (u32, u32) {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    let net = u32::from(net) & mask;
    (
        u32::from_ne_bytes(net.to_be_bytes()),
        u32::from_ne_bytes(mask.to_be_bytes()),
    )
}

/// A type generated from the C file that the kernel gets as raw bytes.
///
/// # Safety
/// Only for `#[repr(C)]` types without padding: every byte must be
/// initialised for `bytes_of` to read it.
pub(super) unsafe trait Pod: Copy {}

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
pub(super) fn ip6_words(ip: &Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn fake_range_is_network_and_mask_in_network_byte_order() {
        let (net, mask) = fake_range(Ipv4Addr::new(198, 18, 0, 0), 15);
        assert_eq!(net.to_ne_bytes(), [198, 18, 0, 0]);
        assert_eq!(mask.to_ne_bytes(), [255, 254, 0, 0]);
        let (net, mask) = fake_range(Ipv4Addr::new(10, 1, 2, 3), 24);
        assert_eq!(net.to_ne_bytes(), [10, 1, 2, 0], "host bits are cleared");
        assert_eq!(mask.to_ne_bytes(), [255, 255, 255, 0]);
        assert_eq!(fake_range(Ipv4Addr::new(1, 2, 3, 4), 32).1, u32::MAX);
    }
}
