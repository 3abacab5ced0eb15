//! The block allocator: the group descriptors and block bitmaps, in memory, kept exact.
//!
//! Placement: a data block for logical block L goes to `data_start + L` (identity placement),
//! else to the nearest free run after that; tree blocks go to the spare area past the identity
//! range. Blocks freed by the running transaction stay unallocatable until it commits (replay
//! of an older transaction must never find them reused).

use std::collections::{BTreeMap, BTreeSet};

use super::MapError;
use crate::ext4::bitmap;
use crate::ext4::group::GroupDesc;
use crate::ext4::{BLOCKS_PER_GROUP, BLOCK_SIZE};

pub struct Allocator {
    blocks_count: u64,
    data_start: u64,
    spare_start: u64,
    pub descs: Vec<GroupDesc>,
    bitmaps: BTreeMap<u64, Vec<u8>>,
    dirty: BTreeSet<u64>,
    /// Freed by the running transaction: start → len.
    pending: BTreeMap<u64, u64>,
}

impl Allocator {
    /// `bitmaps` holds every group's block bitmap (index = group).
    pub fn new(
        blocks_count: u64,
        data_start: u64,
        spare_start: u64,
        descs: Vec<GroupDesc>,
        bitmaps: Vec<Vec<u8>>,
    ) -> Allocator {
        Allocator {
            blocks_count,
            data_start,
            spare_start: spare_start.min(blocks_count.saturating_sub(1)),
            descs,
            bitmaps: bitmaps
                .into_iter()
                .enumerate()
                .map(|(g, b)| (g as u64, b))
                .collect(),
            dirty: BTreeSet::new(),
            pending: BTreeMap::new(),
        }
    }

    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    pub fn free_blocks(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.free_blocks)).sum()
    }

    pub fn bitmap(&self, g: u64) -> &[u8] {
        &self.bitmaps[&g]
    }

    pub fn is_used(&self, blk: u64) -> bool {
        let g = blk / BLOCKS_PER_GROUP;
        bitmap::test(&self.bitmaps[&g], (blk % BLOCKS_PER_GROUP) as usize)
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// Groups changed since the last [`Allocator::take_dirty`].
    pub fn take_dirty(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty)
    }

    /// The running transaction committed: its freed blocks may be reused.
    pub fn commit_done(&mut self) {
        self.pending.clear();
    }

    /// The first pending range overlapping `[start, start + len)` (pending ranges are disjoint).
    fn pending_overlap(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        if let Some((&s, &l)) = self.pending.range(..=start).next_back() {
            if s + l > start {
                return Some((s, l));
            }
        }
        self.pending
            .range(start..start + len)
            .next()
            .map(|(&s, &l)| (s, l))
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
            match bitmap::find_free_run(&self.bitmaps[&g], (from - base) as usize, n as usize, want)
            {
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
        self.pending.insert(start, len);
    }

    fn mark(&mut self, start: u64, len: u64, used: bool) {
        let mut b = start;
        while b < start + len {
            let g = b / BLOCKS_PER_GROUP;
            let end = ((g + 1) * BLOCKS_PER_GROUP).min(start + len);
            let bm = self
                .bitmaps
                .entry(g)
                .or_insert_with(|| vec![0u8; BLOCK_SIZE]);
            let mut changed = 0u32;
            for x in b..end {
                let i = (x - g * BLOCKS_PER_GROUP) as usize;
                if bitmap::test(bm, i) != used {
                    if used {
                        bitmap::set(bm, i);
                    } else {
                        bitmap::clear(bm, i);
                    }
                    changed += 1;
                }
            }
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
