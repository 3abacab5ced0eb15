//! The cache's bookkeeping, behind one mutex: which slot holds the newest version of each
//! block, which are dirty, which are being written back, and who waits for what. No I/O and no
//! waiting happen under it (see `mod.rs` for the lock's rules).
//!
//! A slot holds one version of one block, or nothing:
//!
//! | role | meaning | freed when |
//! | --- | --- | --- |
//! | `Free` | on the free list | — |
//! | `Live` | the block's newest version, in `index` | evicted (clean, idle) |
//! | `Retired` | superseded by a newer write | its writeback (if any) ends |
//! | `Doomed` | dropped by a discard or write-zeroes in flight (still read, in `doomed`, until a write supersedes it) | that request ends |
//!
//! `dirty` (header sequence ≠ 0) means the data is newer than the engine below; `busy` that a
//! writeback of it is in flight. Only one version of a block is ever busy (`writing`): a newer
//! one waits for the older one's write to end, so the engine never sees two writes of one block
//! from the cache at once and the last one written is the newest.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::store::Store;
use crate::engine::EngineError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Free,
    Live,
    Retired,
    Doomed,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    pub lblock: u64,
    pub seq: u64,
    /// Bumped when the slot is freed: a (slot, gen) pair names one use of a slot.
    pub gen: u32,
    pub role: Role,
    pub dirty: bool,
    pub busy: bool,
    pub dirtied: Instant,
    /// The slot has an entry in `lru` (so there is at most one per slot).
    pub in_lru: bool,
}

/// Completes one flush (a guest FLUSH, a FUA write's, or `BlockEngine::flush`).
pub(super) type FlushDone = Box<dyn FnOnce(Result<(), EngineError>) + Send>;

pub(super) struct FlushWaiter {
    /// Every version with a sequence up to this must be written back first.
    pub target: u64,
    pub done: FlushDone,
}

/// One writeback: consecutive blocks from `first`, one slot each.
pub(super) struct Run {
    pub first: u64,
    pub slots: Vec<u32>,
}

/// Longest run one writeback writes (1 MiB).
pub(super) const MAX_RUN: usize = 256;
/// Most blocks one planning round looks at (it holds the state lock).
const SCAN_LIMIT: usize = 8192;

pub(super) struct State {
    pub meta: Vec<Meta>,
    free: Vec<u32>,
    /// Block → the slot with its newest version.
    pub index: HashMap<u64, u32>,
    /// Block → its version a discard or write-zeroes in flight dropped: still what a read
    /// returns until that request ends (the version before it may be below, older still).
    pub doomed: HashMap<u64, u32>,
    /// Clean, idle `Live` slots, oldest first; entries that stopped being so are skipped.
    lru: VecDeque<u32>,
    /// `Live`, clean and idle slots (what eviction can take).
    clean: usize,
    /// Blocks whose `Live` slot is dirty and not busy: what a writeback may take.
    pub candidates: BTreeSet<u64>,
    /// `Live` dirty slots by sequence: the oldest dirty version (flush targets, expiry).
    pub by_seq: BTreeMap<u64, u32>,
    /// Blocks with a writeback in flight.
    pub writing: HashSet<u64>,
    /// Block ranges `[first, end)` of the discards and write-zeroes in flight below: nothing
    /// is written back into them, and no sub-block write goes below into them, until they end.
    pub zeroing: Vec<(u64, u64)>,
    /// Where the next planning round starts in `candidates` (an elevator).
    cursor: u64,
    /// Dirty slots (`Live` or `Doomed`): what the dirty limit counts.
    pub dirty: usize,
    next_seq: u64,
    /// Blocks a waiting write-zeroes or discard needs written back now.
    pub urgent: BTreeSet<u64>,
    pub flushes: Vec<FlushWaiter>,
    pub flush_in_flight: bool,
    pub runs_in_flight: usize,
    /// A writeback or a flush below failed: nothing more is accepted.
    pub failed: Option<Arc<EngineError>>,
    /// Queues with deferred requests, to wake when slots free up or writebacks end.
    pub waiting: Vec<Arc<EventFd>>,
    pub stop: bool,
    pub dirty_limit: usize,
    pub background: usize,
}

impl State {
    pub fn new(slots: u32, dirty_limit: usize) -> State {
        let now = Instant::now();
        State {
            meta: vec![
                Meta {
                    lblock: 0,
                    seq: 0,
                    gen: 0,
                    role: Role::Free,
                    dirty: false,
                    busy: false,
                    dirtied: now,
                    in_lru: false,
                };
                slots as usize
            ],
            free: (0..slots).rev().collect(),
            // Sized for every slot: no rehash pause on the queue thread as the cache fills.
            index: HashMap::with_capacity(slots as usize),
            doomed: HashMap::new(),
            lru: VecDeque::new(),
            clean: 0,
            candidates: BTreeSet::new(),
            by_seq: BTreeMap::new(),
            writing: HashSet::new(),
            zeroing: Vec::new(),
            cursor: 0,
            dirty: 0,
            next_seq: 1,
            urgent: BTreeSet::new(),
            flushes: Vec::new(),
            flush_in_flight: false,
            runs_in_flight: 0,
            failed: None,
            waiting: Vec::new(),
            stop: false,
            dirty_limit: dirty_limit.max(1),
            background: (dirty_limit / 2).max(1),
        }
    }

    /// Slots a write could take now, and whether the dirty limit lets it make `k` more
    /// dirty versions.
    pub fn room(&self, new_dirty: usize) -> (usize, bool) {
        (
            self.free.len() + self.clean,
            self.dirty + new_dirty <= self.dirty_limit,
        )
    }

    /// Would a new version of `lblock` add a dirty slot (rather than replace one)?
    pub fn adds_dirty(&self, lblock: u64) -> bool {
        self.index
            .get(&lblock)
            .is_none_or(|&s| !self.meta[s as usize].dirty)
    }

    pub fn is_cached(&self) -> bool {
        !self.index.is_empty() || !self.doomed.is_empty()
    }

    /// The version a read of `lblock` returns, if cached: the newest, else one a discard in
    /// flight dropped.
    pub fn readable(&self, lblock: u64) -> Option<u32> {
        self.index
            .get(&lblock)
            .or_else(|| self.doomed.get(&lblock))
            .copied()
    }

    /// A slot to fill: a free one, or the oldest clean idle one evicted.
    pub fn take_slot(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        while let Some(s) = self.lru.pop_front() {
            self.meta[s as usize].in_lru = false;
            let m = self.meta[s as usize];
            if m.role == Role::Live && !m.dirty && !m.busy && self.index.get(&m.lblock) == Some(&s)
            {
                self.index.remove(&m.lblock);
                self.clean -= 1;
                self.meta[s as usize].role = Role::Free;
                self.meta[s as usize].gen = m.gen.wrapping_add(1);
                return Some(s);
            }
        }
        None
    }

    /// Makes `slot` (taken, its data written) the newest version of `lblock`.
    pub fn install(&mut self, store: &Store, slot: u32, lblock: u64, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        // The new version is published before the old one is cleared: a kill in between
        // leaves both, and recovery takes the newer.
        store.publish(slot, lblock, seq);
        let m = &mut self.meta[slot as usize];
        *m = Meta {
            lblock,
            seq,
            gen: m.gen,
            role: Role::Live,
            dirty: true,
            busy: false,
            dirtied: now,
            in_lru: m.in_lru,
        };
        // A version a discard in flight dropped is superseded too: no longer read, never
        // given back if that discard fails, not needed after a kill.
        if let Some(d) = self.doomed.remove(&lblock) {
            self.undirty(store, d);
        }
        self.dirty += 1;
        self.by_seq.insert(seq, slot);
        self.candidates.insert(lblock);
        if let Some(old) = self.index.insert(lblock, slot) {
            self.retire(store, old);
        }
    }

    /// `s`'s data is no longer newer than the engine below (superseded, written back,
    /// discarded): its header is cleared and it leaves the dirty counts. A no-op on a clean slot.
    fn undirty(&mut self, store: &Store, s: u32) {
        let m = self.meta[s as usize];
        if m.dirty {
            store.clear(s);
            self.dirty -= 1;
            self.by_seq.remove(&m.seq);
            self.meta[s as usize].dirty = false;
        }
    }

    fn retire(&mut self, store: &Store, s: u32) {
        let m = self.meta[s as usize];
        if m.dirty {
            self.undirty(store, s);
        } else if !m.busy {
            self.clean -= 1;
        }
        self.meta[s as usize].role = Role::Retired;
        if !m.busy {
            self.free_slot(s);
        }
    }

    fn push_lru(&mut self, s: u32) {
        if !self.meta[s as usize].in_lru {
            self.meta[s as usize].in_lru = true;
            self.lru.push_back(s);
        }
    }

    /// Is `lblock` inside a discard or write-zeroes in flight below?
    pub fn zeroing_covers(&self, lblock: u64) -> bool {
        self.zeroing.iter().any(|&(a, e)| a <= lblock && lblock < e)
    }

    fn free_slot(&mut self, s: u32) {
        let m = &mut self.meta[s as usize];
        m.role = Role::Free;
        m.busy = false;
        m.dirty = false;
        m.gen = m.gen.wrapping_add(1);
        self.free.push(s);
    }

    /// The sequence of the last version made: a flush now must wait for every version up to it.
    pub fn flush_target(&self) -> u64 {
        self.next_seq - 1
    }

    /// The oldest dirty `Live` version's sequence (`u64::MAX` when none).
    pub fn oldest_dirty(&self) -> u64 {
        self.by_seq.keys().next().copied().unwrap_or(u64::MAX)
    }

    /// May `lblock`'s dirty version be written back now?
    fn eligible(&self, lblock: u64) -> bool {
        self.candidates.contains(&lblock)
            && !self.writing.contains(&lblock)
            && !self.zeroing_covers(lblock)
    }

    /// Chooses writebacks: the dirty versions up to `flush_upto` when a flush waits for them
    /// (oldest first: a flush never starves behind newer writes), else every candidate
    /// (`all`), else the urgent ones and those dirtied before `expired_before`; in runs of
    /// consecutive blocks, longest first, at most `max`. Marks what it chose busy. Looks at a
    /// bounded number of blocks: it runs under the state lock.
    pub fn plan(
        &mut self,
        flush_upto: Option<u64>,
        all: bool,
        expired_before: Instant,
        max: usize,
    ) -> Vec<Run> {
        if max == 0 {
            return Vec::new();
        }
        let mut chosen: Vec<u64> = Vec::new();
        if let Some(t) = flush_upto {
            for &s in self.by_seq.range(..=t).map(|(_, s)| s).take(SCAN_LIMIT) {
                let m = &self.meta[s as usize];
                if m.role == Role::Live && !m.busy && self.eligible(m.lblock) {
                    chosen.push(m.lblock);
                }
            }
        } else if all {
            // An elevator from the cursor, wrapping, over at most enough runs to choose the
            // longest `max` of four times as many.
            let (mut runs, mut last) = (0usize, None::<u64>);
            let from = self.cursor;
            for &b in self
                .candidates
                .range(from..)
                .chain(self.candidates.range(..from))
            {
                if chosen.len() >= SCAN_LIMIT {
                    break;
                }
                if !self.eligible(b) {
                    continue;
                }
                if last.is_none_or(|l| l + 1 != b) {
                    runs += 1;
                    if runs > 4 * max {
                        break;
                    }
                }
                chosen.push(b);
                last = Some(b);
            }
            self.cursor = last.map_or(0, |l| l + 1);
        } else {
            chosen.extend(self.urgent.iter().copied().filter(|&b| self.eligible(b)));
            for &s in self.by_seq.values().take(SCAN_LIMIT) {
                let m = &self.meta[s as usize];
                if m.dirtied >= expired_before {
                    break;
                }
                if m.role == Role::Live && !m.busy && self.eligible(m.lblock) {
                    chosen.push(m.lblock);
                }
            }
        }
        // The wrap and the sequence order put blocks out of order; urgent ones may expire too.
        chosen.sort_unstable();
        chosen.dedup();
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for b in chosen {
            match runs.last_mut() {
                Some((first, n)) if *first + *n as u64 == b && *n < MAX_RUN => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        runs.truncate(max);
        runs.into_iter()
            .map(|(first, n)| Run {
                first,
                slots: (first..first + n as u64)
                    .map(|b| self.start_writeback(b))
                    .collect(),
            })
            .collect()
    }

    fn start_writeback(&mut self, lblock: u64) -> u32 {
        let s = self.index[&lblock];
        self.candidates.remove(&lblock);
        self.urgent.remove(&lblock);
        self.writing.insert(lblock);
        self.meta[s as usize].busy = true;
        s
    }

    /// A writeback of `s` ended.
    pub fn end_writeback(&mut self, store: &Store, s: u32, ok: bool) {
        let m = self.meta[s as usize];
        self.writing.remove(&m.lblock);
        self.meta[s as usize].busy = false;
        match m.role {
            Role::Live => {
                if !ok {
                    // Kept dirty (and not retried: the cache has failed).
                    self.candidates.insert(m.lblock);
                } else if m.dirty {
                    self.undirty(store, s);
                    self.clean += 1;
                    self.push_lru(s);
                }
            }
            Role::Retired => self.free_slot(s),
            // Its discard frees it; it waits for this writeback to end.
            Role::Doomed => {}
            Role::Free => debug_assert!(false, "writeback of a free slot"),
        }
    }

    /// Drops `lblock`'s cached versions for a discard or write-zeroes about to be sent below:
    /// the `Live` one becomes `Doomed` (returned: freed when that request ends).
    pub fn doom(&mut self, lblock: u64) -> Option<u32> {
        let s = self.index.remove(&lblock)?;
        let m = self.meta[s as usize];
        self.candidates.remove(&lblock);
        self.urgent.remove(&lblock);
        // A dirty version stays in `by_seq`: a flush waits until its discard has ended (if
        // that fails, the version comes back, and the flush must not have claimed it).
        if !m.dirty && !m.busy {
            self.clean -= 1;
        }
        self.meta[s as usize].role = Role::Doomed;
        self.doomed.insert(lblock, s);
        Some(s)
    }

    /// The discard or write-zeroes that doomed `s` ended. On failure the version comes back
    /// if it is still the block's latest (no write superseded it, no other discard began over
    /// it): the request did not happen, the write before it did.
    pub fn release_doomed(&mut self, store: &Store, s: u32, ok: bool) {
        let m = self.meta[s as usize];
        debug_assert!(m.role == Role::Doomed && !m.busy);
        let latest = self.doomed.get(&m.lblock) == Some(&s);
        if latest {
            self.doomed.remove(&m.lblock);
        }
        if !ok && latest && !self.index.contains_key(&m.lblock) {
            self.meta[s as usize].role = Role::Live;
            self.index.insert(m.lblock, s);
            if m.dirty {
                self.candidates.insert(m.lblock);
            } else {
                self.clean += 1;
                self.push_lru(s);
            }
            return;
        }
        self.undirty(store, s);
        self.free_slot(s);
    }

    /// A discard or write-zeroes over `ranges` (blocks) ended below.
    pub fn end_zeroing(&mut self, ranges: &[(u64, u64)]) {
        for r in ranges {
            if let Some(i) = self.zeroing.iter().position(|x| x == r) {
                self.zeroing.swap_remove(i);
            }
        }
    }

    /// Drops clean idle pages from `first_block` on (a resize shrank the disk under them).
    pub fn drop_clean_from(&mut self, first_block: u64) {
        let gone: Vec<u64> = self
            .index
            .iter()
            .filter(|(&b, &s)| {
                let m = &self.meta[s as usize];
                b >= first_block && !m.dirty && !m.busy
            })
            .map(|(&b, _)| b)
            .collect();
        for b in gone {
            let s = self.index.remove(&b).expect("listed");
            self.clean -= 1;
            self.free_slot(s);
        }
    }

    /// Cached (`Live`) pages now.
    pub fn cached(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(st: &mut State, store: &Store, lblock: u64) -> u32 {
        let s = st.take_slot().expect("room");
        st.install(store, s, lblock, Instant::now());
        s
    }

    #[test]
    fn versions_writebacks_and_eviction_keep_the_counts() {
        let store = Store::anonymous(4).unwrap();
        let mut st = State::new(4, 3);
        let a = put(&mut st, &store, 10);
        put(&mut st, &store, 11);
        assert_eq!(st.dirty, 2);
        let runs = st.plan(None, true, Instant::now(), 8);
        assert_eq!((runs.len(), runs[0].first, runs[0].slots.len()), (1, 10, 2));
        // A new version of a busy block: the old one is retired, and waits for its write.
        let a2 = put(&mut st, &store, 10);
        assert_eq!(st.meta[a as usize].role, Role::Retired);
        assert_eq!(st.dirty, 2);
        // Block 10 is being written: not planned again until that ends.
        assert!(st.plan(None, true, Instant::now(), 8).is_empty());
        for &s in &runs[0].slots {
            st.end_writeback(&store, s, true);
        }
        assert_eq!(st.meta[a as usize].role, Role::Free);
        assert_eq!(st.dirty, 1);
        assert_eq!(st.oldest_dirty(), st.meta[a2 as usize].seq);
        // Slots: a (free again), a2 (dirty), 11 (clean). A fourth slot is free; fill up.
        put(&mut st, &store, 20);
        put(&mut st, &store, 21);
        assert_eq!(st.room(0), (1, true));
        // Eviction takes block 11's clean page.
        put(&mut st, &store, 22);
        assert!(!st.index.contains_key(&11));
        assert_eq!(st.room(1), (0, false));
        assert!(st.take_slot().is_none());
    }

    #[test]
    fn a_failed_discard_gives_the_write_back() {
        let store = Store::anonymous(2).unwrap();
        let mut st = State::new(2, 2);
        let s = put(&mut st, &store, 5);
        assert_eq!(st.doom(5), Some(s));
        // Still read until the discard ends.
        assert_eq!(st.readable(5), Some(s));
        st.release_doomed(&store, s, false);
        assert_eq!(st.index.get(&5), Some(&s));
        assert!(st.candidates.contains(&5));
        assert_eq!(st.doom(5), Some(s));
        st.release_doomed(&store, s, true);
        assert_eq!((st.dirty, st.cached()), (0, 0));
        assert!(!st.is_cached());
        assert_eq!(st.room(2), (2, true));
    }

    #[test]
    fn a_write_over_a_doomed_version_supersedes_it_and_writebacks_wait_for_the_discard() {
        let store = Store::anonymous(4).unwrap();
        let mut st = State::new(4, 4);
        let x = put(&mut st, &store, 5);
        let seq_x = st.meta[x as usize].seq;
        assert_eq!(st.doom(5), Some(x));
        st.zeroing.push((4, 8));
        // Still dirty for a flush's sake until the discard ends.
        assert_eq!(st.oldest_dirty(), seq_x);
        let y = put(&mut st, &store, 5);
        assert_eq!(st.readable(5), Some(y));
        assert_eq!(st.dirty, 1);
        // Not written back into a discard in flight.
        assert!(st.plan(None, true, Instant::now(), 8).is_empty());
        // The discard fails: the older version must not come back over the newer one.
        st.end_zeroing(&[(4, 8)]);
        st.release_doomed(&store, x, false);
        assert_eq!(st.index.get(&5), Some(&y));
        assert_eq!(st.meta[x as usize].role, Role::Free);
        let runs = st.plan(None, true, Instant::now(), 8);
        assert_eq!((runs.len(), runs[0].slots.clone()), (1, vec![y]));
    }

    #[test]
    fn eviction_keeps_one_lru_entry_per_slot() {
        let store = Store::anonymous(2).unwrap();
        let mut st = State::new(2, 2);
        for _ in 0..100 {
            let s = put(&mut st, &store, 1);
            let runs = st.plan(None, true, Instant::now(), 8);
            assert_eq!(runs[0].slots, vec![s]);
            st.end_writeback(&store, s, true);
        }
        assert!(st.lru.len() <= 2, "{}", st.lru.len());
    }

    #[test]
    fn expiry_takes_only_old_pages() {
        let store = Store::anonymous(4).unwrap();
        let mut st = State::new(4, 4);
        put(&mut st, &store, 1);
        let cut = Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        put(&mut st, &store, 2);
        let runs = st.plan(None, false, cut + std::time::Duration::from_millis(1), 8);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].first, runs[0].slots.len()), (1, 1));
    }
}
