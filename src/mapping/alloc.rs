//! The block allocator: the group descriptors and block bitmaps, in memory, kept exact.
//!
//! Placement: a data block for logical block L goes to `data_start + L` (identity placement),
//! else to the nearest free run after that; tree blocks go to the spare area past the identity
//! range. Blocks freed by the running transaction stay unallocatable until it commits (replay
//! of an older transaction must never find them reused).

use std::collections::{BTreeMap, BTreeSet};

use super::usemap::UseMap;
use super::MapError;
use crate::ext4::bitmap;
use crate::ext4::group::GroupDesc;
use crate::ext4::BLOCKS_PER_GROUP;

pub struct Allocator {
    blocks_count: u64,
    data_start: u64,
    spare_start: u64,
    pub descs: Vec<GroupDesc>,
    /// Each group's used blocks (index = group).
    bitmaps: Vec<UseMap>,
    dirty: BTreeSet<u64>,
    /// Freed by the running transaction: start → len.
    pending: BTreeMap<u64, u64>,
    /// Freed by the transaction being committed (written outside the image lock).
    committing: BTreeMap<u64, u64>,
}

impl Allocator {
    /// `bitmaps` holds every group's used blocks (index = group).
    pub fn new(
        blocks_count: u64,
        data_start: u64,
        spare_start: u64,
        descs: Vec<GroupDesc>,
        bitmaps: Vec<UseMap>,
    ) -> Allocator {
        Allocator {
            blocks_count,
            data_start,
            spare_start: spare_start.min(blocks_count.saturating_sub(1)),
            descs,
            bitmaps,
            dirty: BTreeSet::new(),
            pending: BTreeMap::new(),
            committing: BTreeMap::new(),
        }
    }

    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    pub fn free_blocks(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.free_blocks)).sum()
    }

    /// Group `g`'s on-disk block bitmap.
    pub fn bitmap(&self, g: u64) -> Vec<u8> {
        self.bitmaps[g as usize].to_bitmap()
    }

    pub fn is_used(&self, blk: u64) -> bool {
        let g = blk / BLOCKS_PER_GROUP;
        self.bitmaps[g as usize].test((blk % BLOCKS_PER_GROUP) as usize)
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

    /// The first range freed but not yet committed that overlaps `[start, start + len)` (such
    /// ranges are disjoint).
    fn pending_overlap(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        let first = |m: &BTreeMap<u64, u64>| {
            if let Some((&s, &l)) = m.range(..=start).next_back() {
                if s + l > start {
                    return Some((s, l));
                }
            }
            m.range(start..start + len).next().map(|(&s, &l)| (s, l))
        };
        match (first(&self.pending), first(&self.committing)) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// The free run at or after `from` (below `limit`), at most `max` long, avoiding pending frees.
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
                    match self.pending_overlap(s, l) {
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

    /// Allocates up to `len` contiguous blocks, preferably exactly at `goal`.
    pub fn alloc(&mut self, goal: u64, len: u64) -> Result<(u64, u64), MapError> {
        let goal = goal.clamp(self.data_start, self.blocks_count - 1);
        let run = self
            .find_from(goal, self.blocks_count, len)
            .or_else(|| self.find_from(self.data_start, goal, len))
            .ok_or(MapError::NoSpace)?;
        self.mark(run.0, run.1, true);
        Ok(run)
    }

    /// Allocates a data run for logical block `lblk`: identity placement, else past it.
    pub fn alloc_data(&mut self, lblk: u64, len: u64) -> Result<(u64, u64), MapError> {
        let goal = self.data_start + lblk;
        if goal < self.blocks_count {
            if let Some((s, l)) = self.find_from(goal, self.blocks_count, len) {
                if s == goal {
                    self.mark(s, l, true);
                    return Ok((s, l));
                }
            }
        }
        // The identity slot is taken: use the spare area first, so other blocks keep theirs.
        self.alloc(self.spare_start, len)
    }

    /// A block for an extent-tree node, in the spare area.
    pub fn alloc_tree(&mut self, goal: u64) -> Result<u64, MapError> {
        let g = if goal >= self.spare_start {
            goal
        } else {
            self.spare_start
        };
        self.alloc(g, 1).map(|(s, _)| s)
    }

    /// Frees a run; it becomes allocatable when the running transaction commits.
    pub fn free(&mut self, start: u64, len: u64) {
        self.mark(start, len, false);
        if !crate::testing::broken(crate::testing::Broken::ReuseBeforeCommit) {
            self.pending.insert(start, len);
        }
    }

    fn mark(&mut self, start: u64, len: u64, used: bool) {
        let mut b = start;
        while b < start + len {
            let g = b / BLOCKS_PER_GROUP;
            let end = ((g + 1) * BLOCKS_PER_GROUP).min(start + len);
            let base = g * BLOCKS_PER_GROUP;
            let changed =
                self.bitmaps[g as usize].set((b - base) as usize, (end - base) as usize, used);
            debug_assert_eq!(
                changed as u64,
                end - b,
                "double allocation or double free at {b}..{end}"
            );
            let d = &mut self.descs[g as usize];
            if used {
                d.free_blocks -= changed;
            } else {
                d.free_blocks += changed;
            }
            self.dirty.insert(g);
            b = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext4::group::GroupDesc;
    use crate::ext4::BLOCK_SIZE;
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
        Allocator::new(blocks, 100, 100 + 40_000, descs, bitmaps)
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
                            a.free(s, l);
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
}
