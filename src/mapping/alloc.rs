//! The block allocator: the group descriptors and block bitmaps, in memory, kept exact.
//!
//! Placement: a data block for logical block L goes to `data_start + L` (identity placement),
//! else to the nearest free run after that; tree blocks go to the spare area past the identity
//! range. Blocks freed by the running transaction stay unallocatable until it commits (replay
//! of an older transaction must never find them reused).
//!
//! The bitmaps come from the image and are not trusted further than their checksum: the
//! allocator never hands out a block of the system zone (even one a bitmap marks free), and
//! refuses — with an error, before changing anything — to free or mark blocks outside the
//! filesystem, in the zone, or already in the state asked for.

use std::collections::{BTreeMap, BTreeSet};

use super::usemap::UseMap;
use super::zone::SystemZone;
use super::MapError;
use crate::ext4::bitmap;
use crate::ext4::group::GroupDesc;
use crate::ext4::BLOCKS_PER_GROUP;

/// A change recorded while a [`Savepoint`] is open, so it can be undone exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Undo {
    Marked { start: u64, len: u64 },
    Freed { start: u64, len: u64 },
    Dirtied(u64),
}

/// An open savepoint: [`Allocator::rollback`] undoes every allocation and free made since.
#[must_use]
pub struct Savepoint(usize);

/// Comparable and cloneable so tests can snapshot it around a failing operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocator {
    blocks_count: u64,
    data_start: u64,
    spare_start: u64,
    pub descs: Vec<GroupDesc>,
    /// Each group's used blocks (index = group).
    bitmaps: Vec<UseMap>,
    zone: SystemZone,
    dirty: BTreeSet<u64>,
    /// Freed by the running transaction: start → len.
    pending: BTreeMap<u64, u64>,
    /// Freed by the transaction being committed (written outside the image lock).
    committing: BTreeMap<u64, u64>,
    /// Kept from allocation though maybe free: the blocks the restart log's records not yet
    /// applied will map (start → len, merged, disjoint). In memory only, never in a bitmap:
    /// a kill forgets it with the records' application, which the next open redoes.
    reserved: BTreeMap<u64, u64>,
    /// Changes since the oldest open savepoint (recorded only while one is open).
    undo: Vec<Undo>,
    open_savepoints: usize,
}

/// The first range of `m` (disjoint ranges, start → len) overlapping `[start, start + len)`.
fn first_overlap(m: &BTreeMap<u64, u64>, start: u64, len: u64) -> Option<(u64, u64)> {
    if let Some((&s, &l)) = m.range(..=start).next_back() {
        if s + l > start {
            return Some((s, l));
        }
    }
    m.range(start..start.saturating_add(len))
        .next()
        .map(|(&s, &l)| (s, l))
}

impl Allocator {
    /// `bitmaps` holds every group's used blocks (index = group); `zone` the blocks that are
    /// never allocated whatever the bitmaps say.
    pub fn new(
        blocks_count: u64,
        data_start: u64,
        spare_start: u64,
        descs: Vec<GroupDesc>,
        bitmaps: Vec<UseMap>,
        zone: SystemZone,
    ) -> Allocator {
        let last = blocks_count.saturating_sub(1);
        Allocator {
            blocks_count,
            data_start: data_start.min(last),
            spare_start: spare_start.min(last),
            descs,
            bitmaps,
            zone,
            dirty: BTreeSet::new(),
            pending: BTreeMap::new(),
            committing: BTreeMap::new(),
            reserved: BTreeMap::new(),
            undo: Vec::new(),
            open_savepoints: 0,
        }
    }

    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    pub fn zone(&self) -> &SystemZone {
        &self.zone
    }

    pub fn free_blocks(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.free_blocks)).sum()
    }

    /// Group `g`'s on-disk block bitmap.
    pub fn bitmap(&self, g: u64) -> Vec<u8> {
        self.bitmaps[g as usize].to_bitmap()
    }

    /// Is `blk` marked in use? Blocks past the end count as used (as the bitmap padding does).
    pub fn is_used(&self, blk: u64) -> bool {
        let g = blk / BLOCKS_PER_GROUP;
        self.bitmaps
            .get(g as usize)
            .is_none_or(|m| blk >= self.blocks_count || m.test((blk % BLOCKS_PER_GROUP) as usize))
    }

    /// The first block of `[start, start + len)` marked free, if any (the range must be inside
    /// the filesystem).
    pub fn first_free_in(&self, start: u64, len: u64) -> Option<u64> {
        let end = start.saturating_add(len).min(self.blocks_count);
        let mut b = start;
        while b < end {
            let g = b / BLOCKS_PER_GROUP;
            let base = g * BLOCKS_PER_GROUP;
            let e = ((g + 1) * BLOCKS_PER_GROUP).min(end);
            let m = &self.bitmaps[g as usize];
            if let Some((s, _)) = m.find_free_run((b - base) as usize, (e - base) as usize, 1) {
                return Some(base + s as u64);
            }
            b = e;
        }
        None
    }

    /// Sets every group's free count from its bitmap, as ext4's mballoc trusts the bitmap over
    /// the descriptor; returns the groups whose descriptor was wrong (now dirty, so the fixed
    /// count is journaled with the next commit).
    pub fn recount(&mut self) -> Vec<u64> {
        let mut fixed = Vec::new();
        for (g, m) in self.bitmaps.iter().enumerate() {
            let n = bitmap::blocks_in_group(self.blocks_count, g as u64) as usize;
            let free = n as u32 - m.count_used(0, n);
            if self.descs[g].free_blocks != free {
                self.descs[g].free_blocks = free;
                fixed.push(g as u64);
            }
        }
        for &g in &fixed {
            self.dirty.insert(g);
        }
        fixed
    }

    /// Replaces group `g`'s block bitmap (repair), recomputing its free count.
    pub fn replace_bitmap(&mut self, g: u64, bm: Vec<u8>) {
        let n = bitmap::blocks_in_group(self.blocks_count, g);
        self.descs[g as usize].free_blocks = bitmap::count_free(&bm, n as usize) as u32;
        self.bitmaps[g as usize] = UseMap::from_bitmap(&bm);
        self.dirty.insert(g);
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// Groups changed since the last [`Allocator::take_dirty`].
    pub fn take_dirty(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty)
    }

    /// The running transaction is being committed: blocks freed from now on belong to the next.
    pub fn commit_start(&mut self) {
        let freed = std::mem::take(&mut self.pending);
        self.committing.extend(freed);
    }

    /// The transaction being committed is durable: its freed blocks may be reused.
    pub fn commit_done(&mut self) {
        self.committing.clear();
    }

    /// Are blocks freed by the running or the committing transaction waiting for their commit?
    /// Then an allocation that finds no free block succeeds after a commit or two.
    pub fn frees_pending(&self) -> bool {
        !self.pending.is_empty() || !self.committing.is_empty()
    }

    /// Starts recording changes so that a failed multi-step operation can be undone exactly:
    /// bitmaps, counters, dirty groups and pending frees as they were (an ENOSPC halfway
    /// through an allocation must not leave blocks marked, nor groups dirty in the running
    /// transaction). Savepoints nest; close each with [`Allocator::release`] or
    /// [`Allocator::rollback`]. No commit may happen while one is open.
    pub fn savepoint(&mut self) -> Savepoint {
        self.open_savepoints += 1;
        Savepoint(self.undo.len())
    }

    /// Keeps the changes made since `sp`.
    pub fn release(&mut self, sp: Savepoint) {
        let _ = sp;
        self.close_savepoint();
    }

    /// Undoes every change made since `sp`, newest first.
    pub fn rollback(&mut self, sp: Savepoint) {
        let at = sp.0.min(self.undo.len());
        let undo: Vec<Undo> = self.undo.drain(at..).rev().collect();
        // Nothing is recorded while undoing: the entries are being consumed.
        let open = std::mem::take(&mut self.open_savepoints);
        for u in undo {
            match u {
                Undo::Marked { start, len } => self.apply(start, len, false),
                Undo::Freed { start, len } => {
                    self.apply(start, len, true);
                    self.pending.remove(&start);
                }
                Undo::Dirtied(g) => {
                    self.dirty.remove(&g);
                }
            }
        }
        self.open_savepoints = open;
        self.close_savepoint();
    }

    fn close_savepoint(&mut self) {
        self.open_savepoints = self.open_savepoints.saturating_sub(1);
        if self.open_savepoints == 0 {
            self.undo.clear();
        }
    }

    fn record(&mut self, u: Undo) {
        if self.open_savepoints > 0 {
            self.undo.push(u);
        }
    }

    /// The first range overlapping `[start, start + len)` that must not be allocated: freed
    /// but not yet committed, in the system zone, or reserved (ranges are disjoint within a
    /// kind).
    fn forbidden_overlap(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        [
            self.held_overlap(start, len),
            first_overlap(&self.reserved, start, len),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|r| r.0)
    }

    /// [`Allocator::forbidden_overlap`] without the reservation: what even the restart log's
    /// own records may not take.
    fn held_overlap(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        [
            first_overlap(&self.pending, start, len),
            first_overlap(&self.committing, start, len),
            self.zone.first_overlap(start, len),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|r| r.0)
    }

    /// Keeps `runs` (any order, overlapping or not) from allocation until the next call:
    /// the reservation is replaced, not extended. The restart log's application reserves the
    /// blocks of the records it has not applied yet, so that no tree edit of an earlier record
    /// takes one for a node; [`Allocator::claim_free`] still takes them for their record.
    /// Nothing is marked: the bitmaps never see a reservation.
    pub fn set_reserved(&mut self, runs: impl IntoIterator<Item = (u64, u64)>) {
        let mut runs: Vec<(u64, u64)> = runs.into_iter().filter(|r| r.1 > 0).collect();
        runs.sort_unstable();
        self.reserved.clear();
        let mut cur: Option<(u64, u64)> = None;
        for (s, l) in runs {
            let e = s.saturating_add(l);
            cur = match cur {
                Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
                Some((cs, ce)) => {
                    self.reserved.insert(cs, ce - cs);
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((cs, ce)) = cur {
            self.reserved.insert(cs, ce - cs);
        }
    }

    /// The reservation, merged.
    #[cfg(test)]
    fn reserved(&self) -> Vec<(u64, u64)> {
        self.reserved.iter().map(|(&s, &l)| (s, l)).collect()
    }

    /// The free run at or after `from` (below `limit`), at most `max` long, avoiding pending
    /// frees and the system zone.
    fn find_from(&self, mut from: u64, limit: u64, max: u64) -> Option<(u64, u64)> {
        while from < limit {
            let g = from / BLOCKS_PER_GROUP;
            if self.descs[g as usize].free_blocks == 0 {
                from = (g + 1) * BLOCKS_PER_GROUP;
                continue;
            }
            let base = g * BLOCKS_PER_GROUP;
            let n = bitmap::blocks_in_group(self.blocks_count, g).min(limit - base);
            let want = max.min(BLOCKS_PER_GROUP) as usize;
            match self.bitmaps[g as usize].find_free_run((from - base) as usize, n as usize, want) {
                Some((s, l)) => {
                    let (s, l) = (base + s as u64, l as u64);
                    match self.forbidden_overlap(s, l) {
                        None => return Some((s, l)),
                        Some((ps, _)) if ps > s => return Some((s, ps - s)),
                        Some((ps, pl)) => from = ps + pl,
                    }
                }
                None => from = base + BLOCKS_PER_GROUP,
            }
        }
        None
    }

    /// `goal` moved into the data area.
    fn clamp_goal(&self, goal: u64) -> u64 {
        goal.max(self.data_start)
            .min(self.blocks_count.saturating_sub(1))
    }

    /// Allocates up to `len` contiguous blocks, preferably exactly at `goal`.
    pub fn alloc(&mut self, goal: u64, len: u64) -> Result<(u64, u64), MapError> {
        let goal = self.clamp_goal(goal);
        let run = self
            .find_from(goal, self.blocks_count, len)
            .or_else(|| self.find_from(self.data_start, goal, len))
            .ok_or(MapError::NoSpace)?;
        self.mark(run.0, run.1, true)?;
        Ok(run)
    }

    /// Allocates a data run for logical block `lblk`: identity placement, else past it.
    pub fn alloc_data(&mut self, lblk: u64, len: u64) -> Result<(u64, u64), MapError> {
        let goal = self.data_start.saturating_add(lblk);
        if goal < self.blocks_count {
            if let Some((s, l)) = self.find_from(goal, self.blocks_count, len) {
                if s == goal {
                    self.mark(s, l, true)?;
                    return Ok((s, l));
                }
            }
        }
        // The identity slot is taken: use the spare area first, so other blocks keep theirs.
        self.alloc(self.spare_start, len)
    }

    /// A block for an extent-tree node, in the spare area.
    pub fn alloc_tree(&mut self, goal: u64) -> Result<u64, MapError> {
        self.alloc_tree_blocks(goal, 1).map(|v| v[0])
    }

    /// `n` blocks for extent-tree nodes, in the spare area: all of them or, on ENOSPC, none
    /// (nothing changes), so a tree edit can reserve what it needs before it changes anything.
    pub fn alloc_tree_blocks(&mut self, goal: u64, n: usize) -> Result<Vec<u64>, MapError> {
        let goal = self.clamp_goal(goal.max(self.spare_start));
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut got = 0u64;
        let want = n as u64;
        for (mut from, limit) in [(goal, self.blocks_count), (self.data_start, goal)] {
            while got < want {
                // Runs found are not marked yet: searching on from past each one finds new ones.
                match self.find_from(from, limit, want - got) {
                    Some((s, l)) => {
                        runs.push((s, l));
                        got += l;
                        from = s + l;
                    }
                    None => break,
                }
            }
        }
        if got < want {
            return Err(MapError::NoSpace);
        }
        let sp = self.savepoint();
        for &(s, l) in &runs {
            if let Err(e) = self.mark(s, l, true) {
                self.rollback(sp);
                return Err(e);
            }
        }
        self.release(sp);
        Ok(runs.iter().flat_map(|&(s, l)| s..s + l).collect())
    }

    /// Marks in use every block of `[start, start + len)` that could be allocated now (free,
    /// in the data area, neither in the zone nor freed by an uncommitted transaction; reserved
    /// or not) and returns those runs. The restart log's application claims the blocks a
    /// record names just before applying it, and gives back what it did not map.
    pub fn claim_free(&mut self, start: u64, len: u64) -> Result<Vec<(u64, u64)>, MapError> {
        let end = start.saturating_add(len).min(self.blocks_count);
        let ok =
            |a: &Self, b: u64| b >= a.data_start && !a.is_used(b) && a.held_overlap(b, 1).is_none();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in start.max(self.data_start)..end {
            if !ok(self, b) {
                continue;
            }
            match runs.last_mut() {
                Some((s, l)) if *s + *l == b => *l += 1,
                _ => runs.push((b, 1)),
            }
        }
        for &(s, l) in &runs {
            self.mark(s, l, true)?;
        }
        Ok(runs)
    }

    /// Gives back blocks [`Allocator::claim_free`] claimed and nothing came to map: free at
    /// once (they were free when the running transaction began, so no replay can miss them).
    pub fn unclaim(&mut self, start: u64, len: u64) -> Result<(), MapError> {
        self.mark(start, len, false)
    }

    /// Can `[start, start + len)` be freed: inside the filesystem, clear of the system zone,
    /// every block in use?
    pub fn check_free(&self, start: u64, len: u64) -> Result<(), MapError> {
        self.check_change(start, len, false)
    }

    /// Frees a run; it becomes allocatable when the running transaction commits. Refused,
    /// with nothing changed, unless [`Allocator::check_free`] accepts it.
    pub fn free(&mut self, start: u64, len: u64) -> Result<(), MapError> {
        self.mark(start, len, false)?;
        if !broken!(ReuseBeforeCommit) {
            self.pending.insert(start, len);
        }
        self.record(Undo::Freed { start, len });
        Ok(())
    }

    /// Every block of the range can go to `used`.
    fn check_change(&self, start: u64, len: u64, used: bool) -> Result<(), MapError> {
        self.zone
            .check(start, len)
            .map_err(|why| MapError::Invalid { start, len, why })?;
        let mut b = start;
        while b < start + len {
            let g = b / BLOCKS_PER_GROUP;
            let base = g * BLOCKS_PER_GROUP;
            let end = ((g + 1) * BLOCKS_PER_GROUP).min(start + len);
            let m = &self.bitmaps[g as usize];
            let (s, e) = ((b - base) as usize, (end - base) as usize);
            let in_use = m.count_used(s, e);
            let ok = if used {
                in_use == 0
            } else {
                in_use as u64 == end - b
            };
            if !ok {
                // Name the first offending block.
                let block = (b..end)
                    .find(|&x| m.test((x - base) as usize) == used)
                    .unwrap_or(b);
                return Err(MapError::Inconsistent { block, used });
            }
            b = end;
        }
        Ok(())
    }

    fn mark(&mut self, start: u64, len: u64, used: bool) -> Result<(), MapError> {
        self.check_change(start, len, used)?;
        self.apply(start, len, used);
        if used {
            self.record(Undo::Marked { start, len });
        }
        Ok(())
    }

    /// Sets the blocks' state and the counters (checked by the caller).
    fn apply(&mut self, start: u64, len: u64, used: bool) {
        let mut b = start;
        while b < start + len {
            let g = b / BLOCKS_PER_GROUP;
            let end = ((g + 1) * BLOCKS_PER_GROUP).min(start + len);
            let base = g * BLOCKS_PER_GROUP;
            let changed =
                self.bitmaps[g as usize].set((b - base) as usize, (end - base) as usize, used);
            let d = &mut self.descs[g as usize];
            if used {
                d.free_blocks = d.free_blocks.saturating_sub(changed);
            } else {
                d.free_blocks = d.free_blocks.saturating_add(changed);
            }
            if self.dirty.insert(g) {
                self.record(Undo::Dirtied(g));
            }
            b = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext4::group::GroupDesc;
    use crate::ext4::BLOCK_SIZE;
    use crate::mapping::zone::{Claim, Owner};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// Three groups; the first 100 blocks are metadata; the last group is partial (padding).
    fn allocator() -> Allocator {
        let blocks = 2 * BLOCKS_PER_GROUP + 5000;
        let mut bitmaps = Vec::new();
        let mut descs = Vec::new();
        for g in 0..3u64 {
            let mut bm = vec![0u8; BLOCK_SIZE];
            if g == 0 {
                bitmap::set_range(&mut bm, 0, 100);
            }
            let n = bitmap::blocks_in_group(blocks, g);
            bitmap::set_range(&mut bm, n as usize, BLOCKS_PER_GROUP as usize);
            descs.push(GroupDesc {
                free_blocks: bitmap::count_free(&bm, n as usize) as u32,
                ..Default::default()
            });
            bitmaps.push(UseMap::from_bitmap(&bm));
        }
        let zone = SystemZone::new(
            blocks,
            vec![Claim::new(0, 100, Owner::Superblock { group: 0 })],
        )
        .unwrap();
        Allocator::new(blocks, 100, 100 + 40_000, descs, bitmaps, zone)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Data(u64, u64),
        Tree,
        FreeSome(usize),
        CommitStart,
        CommitDone,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..45_000, 1u64..3000).prop_map(|(l, n)| Op::Data(l, n)),
            1 => Just(Op::Tree),
            2 => (0usize..1000).prop_map(Op::FreeSome),
            1 => Just(Op::CommitStart),
            1 => Just(Op::CommitDone),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a model set of used blocks: no double allocation, no allocation of metadata or
        /// padding, freed blocks not reused before the commit, counters exact.
        #[test]
        fn allocator_matches_the_model(ops in prop::collection::vec(op(), 1..200)) {
            let mut a = allocator();
            let total = a.free_blocks();
            let mut used: Vec<(u64, u64)> = Vec::new();
            let mut pending: BTreeSet<u64> = BTreeSet::new();
            let mut committing: BTreeSet<u64> = BTreeSet::new();
            for o in ops {
                match o {
                    Op::Data(l, n) => {
                        if let Ok((s, got)) = a.alloc_data(l, n) {
                            prop_assert!(got >= 1 && got <= n);
                            prop_assert!(s >= 100, "metadata handed out");
                            prop_assert!(s + got <= 2 * BLOCKS_PER_GROUP + 5000, "padding handed out");
                            for b in s..s + got {
                                prop_assert!(!pending.contains(&b) && !committing.contains(&b), "block {} reused before its free committed", b);
                                prop_assert!(!used.iter().any(|&(us, ul)| b >= us && b < us + ul), "block {} allocated twice", b);
                            }
                            used.push((s, got));
                        }
                    }
                    Op::Tree => {
                        if let Ok(b) = a.alloc_tree(0) {
                            prop_assert!(!pending.contains(&b) && !committing.contains(&b) && !used.iter().any(|&(us, ul)| b >= us && b < us + ul));
                            used.push((b, 1));
                        }
                    }
                    Op::FreeSome(i) => {
                        if !used.is_empty() {
                            let (s, l) = used.swap_remove(i % used.len());
                            a.free(s, l).unwrap();
                            pending.extend(s..s + l);
                        }
                    }
                    Op::CommitStart => {
                        a.commit_start();
                        committing.append(&mut pending);
                    }
                    Op::CommitDone => {
                        a.commit_done();
                        committing.clear();
                    }
                }
                let in_use: u64 = used.iter().map(|r| r.1).sum();
                prop_assert_eq!(a.free_blocks(), total - in_use);
            }
        }
    }

    #[test]
    fn identity_placement_then_the_spare_area() {
        let mut a = allocator();
        assert_eq!(a.alloc_data(5, 10).unwrap(), (105, 10));
        // The identity slot of block 7 is taken (by block 5's run): go to the spare area.
        let (s, _) = a.alloc_data(7, 1).unwrap();
        assert_eq!(s, 40_100);
        assert_eq!(a.alloc_tree(0).unwrap(), 40_101);
    }

    #[test]
    fn reserved_blocks_are_never_allocated_but_can_be_claimed() {
        let mut a = allocator();
        a.set_reserved([(110, 5), (105, 10), (120, 1), (0, 0)]);
        assert_eq!(a.reserved(), vec![(105, 10), (120, 1)]);
        // Identity placement of block 5 (block 105) is reserved: the spare area instead.
        assert_eq!(a.alloc_data(5, 1).unwrap().0, 40_100);
        // A run stops short of the reservation.
        assert_eq!(a.alloc_data(0, 10).unwrap(), (100, 5));
        // Tree blocks skip it too.
        a.set_reserved([(40_101, 3)]);
        assert_eq!(a.alloc_tree(0).unwrap(), 40_104);
        // Its own record claims a reserved block; blocks already used are not claimed.
        assert_eq!(a.claim_free(40_100, 4).unwrap(), vec![(40_101, 3)]);
        let before = a.free_blocks();
        a.unclaim(40_101, 3).unwrap();
        assert_eq!(a.free_blocks(), before + 3);
        // Replaced, not extended: nothing is reserved any more.
        a.set_reserved([]);
        assert!(a.reserved().is_empty());
        assert_eq!(a.alloc_tree(0).unwrap(), 40_101);
    }
}
