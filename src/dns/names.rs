//! The name <-> fake address table: bounded, least recently used names go
//! first, names compared case-insensitively (stored lower-case).
//!
//! Addresses are handed out by a cursor that walks the fake range and wraps
//! around, skipping addresses in use. A freed address is therefore handed
//! out again as late as possible: with the default /15 and 65,536 names, only
//! after about 65,000 other names were assigned, long after any client's
//! cache (TTL 5 s) forgot it. An entry with an open connection (a
//! [`Pinned`] guard) is never evicted, so its address is never reassigned
//! while the connection lives.
//!
//! Memory: about 150 bytes per name of 15 characters, 180 for 37 (malloc's
//! count: the name once, shared by the entry and the name index, plus both
//! indexes' buckets); 65,536 names take under 10 MiB (scripts/bench.sh
//! measures ktproxy's Pss over 100,000 names).
//!
//! One mutex guards it all: the responder threads hold it for one hash
//! lookup, connection threads for one pin or unpin.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use super::FakeNet;

/// "No entry" in the LRU links.
const NIL: u32 = u32::MAX;
/// With the table full, how far the cursor looks for an address nobody
/// holds before it takes the evicted name's address instead: bounds the
/// work per new name when the range is barely larger than the table.
const MAX_PROBES: u32 = 64;

pub struct Names {
    net: FakeNet,
    table: Arc<Mutex<Table>>,
}

/// A fake address's name, held for the life of a connection to it: the
/// address cannot be reassigned until this is dropped.
pub struct Pinned {
    table: Arc<Mutex<Table>>,
    slot: u32,
    name: Arc<str>,
}

struct Entry {
    /// Lower-case, dot-separated, no trailing dot.
    name: Arc<str>,
    /// Index of the address in the fake range.
    off: u32,
    /// Open connections to the address.
    pins: u32,
    /// LRU links (slot indices): towards the most and the least recently
    /// used entry.
    newer: u32,
    older: u32,
}

struct Table {
    slots: Vec<Entry>,
    by_name: HashMap<Arc<str>, u32>,
    by_off: HashMap<u32, u32>,
    /// Most and least recently used slots.
    newest: u32,
    oldest: u32,
    /// Next address index to try.
    cursor: u32,
    capacity: usize,
    usable: u32,
}

impl Names {
    /// `capacity` names at most (at least 1), and never more than the range
    /// has addresses.
    pub fn new(net: FakeNet, capacity: usize) -> Names {
        let usable = net.usable();
        let capacity = capacity.clamp(1, usable as usize);
        Names {
            net,
            table: Arc::new(Mutex::new(Table {
                slots: Vec::new(),
                by_name: HashMap::new(),
                by_off: HashMap::new(),
                newest: NIL,
                oldest: NIL,
                cursor: 0,
                capacity,
                usable,
            })),
        }
    }

    pub fn net(&self) -> FakeNet {
        self.net
    }

    /// Names in the table now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.table).by_name.len()
    }

    pub fn capacity(&self) -> usize {
        lock(&self.table).capacity
    }

    /// The name behind a fake address, pinned (never reassigned) while the
    /// guard lives. None: not a fake address, or one no name holds now
    /// (e.g. handed out before a restart).
    pub fn pin(&self, ip: IpAddr) -> Option<Pinned> {
        let off = self.net.offset(ip)?;
        let mut t = lock(&self.table);
        let slot = *t.by_off.get(&off)?;
        t.touch(slot);
        let e = &mut t.slots[slot as usize];
        e.pins = e.pins.saturating_add(1);
        Some(Pinned {
            table: Arc::clone(&self.table),
            slot,
            name: Arc::clone(&e.name),
        })
    }

    /// The address for `name` (lower-case, as from the responder): the one
    /// it has, or a new one. None only when every entry is pinned.
    pub(crate) fn assign(&self, name: &str) -> Option<Ipv4Addr> {
        let mut t = lock(&self.table);
        if let Some(&slot) = t.by_name.get(name) {
            t.touch(slot);
            return Some(self.net.addr(t.slots[slot as usize].off));
        }
        let off = t.insert(name)?;
        Some(self.net.addr(off))
    }

    /// Reverse lookup for PTR queries; does not count as a use.
    pub(crate) fn name_of(&self, ip: IpAddr) -> Option<Arc<str>> {
        let off = self.net.offset(ip)?;
        let t = lock(&self.table);
        let slot = *t.by_off.get(&off)?;
        Some(Arc::clone(&t.slots[slot as usize].name))
    }
}

impl Pinned {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut t = lock(&self.table);
        // The slot cannot have changed hands: pinned entries are never evicted.
        if let Some(e) = t.slots.get_mut(self.slot as usize) {
            e.pins = e.pins.saturating_sub(1);
            t.touch(self.slot);
        }
    }
}

/// A panic while the lock was held cannot leave the table inconsistent in a
/// way that matters more than stopping DNS would: carry on.
fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Table {
    fn unlink(&mut self, slot: u32) {
        let (newer, older) = {
            let e = &self.slots[slot as usize];
            (e.newer, e.older)
        };
        match newer {
            NIL => self.newest = older,
            n => self.slots[n as usize].older = older,
        }
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
    }

    fn push_newest(&mut self, slot: u32) {
        let old_newest = self.newest;
        {
            let e = &mut self.slots[slot as usize];
            e.newer = NIL;
            e.older = old_newest;
        }
        match old_newest {
            NIL => self.oldest = slot,
            n => self.slots[n as usize].newer = slot,
        }
        self.newest = slot;
    }

    fn touch(&mut self, slot: u32) {
        if self.newest != slot {
            self.unlink(slot);
            self.push_newest(slot);
        }
    }

    /// Adds `name`, evicting the least recently used unpinned entry if the
    /// table is full. Returns its address index.
    fn insert(&mut self, name: &str) -> Option<u32> {
        let (slot, freed) = if self.slots.len() < self.capacity {
            (u32::try_from(self.slots.len()).ok()?, None)
        } else {
            let slot = self.evict()?;
            (slot, Some(self.slots[slot as usize].off))
        };
        let off = self.free_address(freed)?;
        self.cursor = if off + 1 >= self.usable { 0 } else { off + 1 };
        let name: Arc<str> = Arc::from(name);
        let entry = Entry {
            name: Arc::clone(&name),
            off,
            pins: 0,
            newer: NIL,
            older: NIL,
        };
        if slot as usize == self.slots.len() {
            self.slots.push(entry);
        } else {
            self.slots[slot as usize] = entry;
        }
        self.by_name.insert(name, slot);
        self.by_off.insert(off, slot);
        self.push_newest(slot);
        Some(off)
    }

    /// Unlinks the least recently used unpinned entry and returns its slot.
    /// Pinned entries met on the way move to the newest end, so a long-lived
    /// connection is stepped over once, not on every eviction.
    fn evict(&mut self) -> Option<u32> {
        for _ in 0..self.slots.len() {
            let slot = self.oldest;
            if slot == NIL {
                return None;
            }
            if self.slots[slot as usize].pins > 0 {
                self.touch(slot);
                continue;
            }
            self.unlink(slot);
            let e = &self.slots[slot as usize];
            let (name, off) = (Arc::clone(&e.name), e.off);
            self.by_name.remove(&name);
            self.by_off.remove(&off);
            return Some(slot);
        }
        None
    }

    /// The next address index from the cursor that no entry holds. With the
    /// table full (`freed` is the evicted entry's), gives up after
    /// MAX_PROBES and reuses `freed`.
    fn free_address(&self, freed: Option<u32>) -> Option<u32> {
        let limit = if freed.is_some() {
            MAX_PROBES.min(self.usable)
        } else {
            self.usable
        };
        let mut off = self.cursor;
        for _ in 0..limit {
            if !self.by_off.contains_key(&off) {
                return Some(off);
            }
            off = if off + 1 >= self.usable { 0 } else { off + 1 };
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(capacity: usize) -> Names {
        Names::new(FakeNet::parse("10.240.0.0/20").unwrap(), capacity)
    }

    fn ip(a: Ipv4Addr) -> IpAddr {
        IpAddr::V4(a)
    }

    #[test]
    fn same_name_gets_same_address_and_names_get_distinct_ones() {
        let n = small(100);
        let a = n.assign("example.com").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 240, 0, 1));
        let b = n.assign("example.org").unwrap();
        assert_ne!(a, b);
        assert_eq!(n.assign("example.com"), Some(a));
        assert_eq!(n.len(), 2);
        assert_eq!(n.pin(ip(a)).unwrap().name(), "example.com");
        assert_eq!(&*n.name_of(ip(b)).unwrap(), "example.org");
    }

    #[test]
    fn guards_and_table_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Pinned>();
        send_sync::<Names>();
    }

    #[test]
    fn unknown_or_foreign_addresses_do_not_pin() {
        let n = small(10);
        n.assign("a.test").unwrap();
        assert!(n.pin(ip(Ipv4Addr::new(10, 240, 0, 2))).is_none());
        assert!(n.pin(ip(Ipv4Addr::new(192, 0, 2, 1))).is_none());
        assert!(n.pin("::1".parse().unwrap()).is_none());
        assert!(n.pin("::ffff:10.240.0.1".parse().unwrap()).is_some());
    }

    #[test]
    fn least_recently_used_name_is_evicted_first() {
        let n = small(3);
        let a = n.assign("a").unwrap();
        n.assign("b").unwrap();
        n.assign("c").unwrap();
        n.assign("a").unwrap(); // a is now the newest; b the oldest
        n.assign("d").unwrap();
        assert_eq!(n.len(), 3);
        assert_eq!(n.assign("a"), Some(a), "a was used recently and stays");
        assert!(
            n.name_of(ip(Ipv4Addr::new(10, 240, 0, 2))).is_none(),
            "b went"
        );
    }

    #[test]
    fn freed_addresses_are_reused_only_after_the_cursor_wraps() {
        let n = small(2);
        let mut seen = std::collections::HashSet::new();
        let usable = n.net().usable();
        for i in 0..usable {
            let a = n.assign(&format!("n{i}")).unwrap();
            assert!(seen.insert(a), "{a} handed out twice within one wrap");
        }
        // Wrapped: the first address again, free since long ago.
        assert_eq!(n.assign("again").unwrap(), Ipv4Addr::new(10, 240, 0, 1));
    }

    #[test]
    fn pinned_address_is_never_reassigned_and_unpin_releases_it() {
        let n = small(2);
        let a = n.assign("pinned.test").unwrap();
        let guard = n.pin(ip(a)).unwrap();
        let usable = n.net().usable();
        for i in 0..usable * 2 {
            let b = n.assign(&format!("x{i}")).unwrap();
            assert_ne!(b, a, "pinned address reassigned after {i} names");
        }
        assert_eq!(n.pin(ip(a)).unwrap().name(), "pinned.test");
        drop(guard);
        // Unpinned, it ages out like any other entry.
        n.assign("y1").unwrap();
        n.assign("y2").unwrap();
        assert!(n.name_of(ip(a)).is_none());
    }

    #[test]
    fn every_entry_pinned_means_no_address() {
        let n = small(2);
        let a = n.assign("a").unwrap();
        let b = n.assign("b").unwrap();
        let _ga = n.pin(ip(a)).unwrap();
        let _gb = n.pin(ip(b)).unwrap();
        assert_eq!(n.assign("c"), None);
        assert_eq!(n.assign("a"), Some(a), "existing names still answer");
    }

    #[test]
    fn full_range_table_reuses_the_evicted_address_when_none_is_near() {
        let net = FakeNet::parse("10.240.0.0/20").unwrap();
        let n = Names::new(net, usize::MAX);
        assert_eq!(n.capacity(), 4094);
        for i in 0..4094 {
            n.assign(&format!("f{i}")).unwrap();
        }
        // Full, cursor wrapped to 0: keep f0..f69 in use, so the oldest is
        // f70 (10.240.0.71) and the first MAX_PROBES addresses are all held.
        for i in 0..70 {
            n.assign(&format!("f{i}")).unwrap();
        }
        let a = n.assign("new").unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 240, 0, 71));
        assert_eq!(n.len(), 4094);
        assert_eq!(n.pin(ip(a)).unwrap().name(), "new");
        // Near a free address, the cursor finds it: f71's, evicted next.
        assert_eq!(n.assign("newer").unwrap(), Ipv4Addr::new(10, 240, 0, 72));
    }

    #[test]
    fn table_stays_consistent_under_random_use() {
        // A model check: the table agrees with a plain map of what it says it
        // holds, for a random mix of assigns, pins and unpins.
        let n = small(50);
        let mut rng = crate::dns::fuzz::Rng::new(7);
        let mut guards: Vec<Pinned> = Vec::new();
        let mut last: HashMap<String, Ipv4Addr> = HashMap::new();
        for _ in 0..20_000 {
            match rng.below(10) {
                0..=6 => {
                    let name = format!("h{}", rng.below(120));
                    if let Some(a) = n.assign(&name) {
                        if let Some(&prev) = last.get(&name) {
                            if n.name_of(ip(prev)).as_deref() == Some(name.as_str()) {
                                assert_eq!(a, prev);
                            }
                        }
                        last.insert(name.clone(), a);
                        assert_eq!(n.name_of(ip(a)).as_deref(), Some(name.as_str()));
                    }
                }
                7 | 8 => {
                    let a = n.net().addr(rng.below(60) as u32);
                    if let Some(g) = n.pin(ip(a)) {
                        guards.push(g);
                    }
                }
                _ => {
                    if !guards.is_empty() {
                        let i = rng.below(guards.len() as u64) as usize;
                        guards.swap_remove(i);
                    }
                }
            }
            assert!(n.len() <= 50);
            for g in &guards {
                let t = lock(&n.table);
                let e = &t.slots[g.slot as usize];
                assert_eq!(&*e.name, g.name(), "a pinned entry changed hands");
                assert!(e.pins > 0);
            }
        }
        let t = lock(&n.table);
        assert_eq!(t.by_name.len(), t.by_off.len());
        let mut count = 0;
        let mut s = t.newest;
        while s != NIL {
            count += 1;
            s = t.slots[s as usize].older;
        }
        assert_eq!(count, t.by_name.len(), "LRU list and map disagree");
    }
}
