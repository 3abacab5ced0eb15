//! Which blocks of one group are in use, held in memory as compactly as the group allows.
//!
//! A thin image's groups are mostly empty, full, or sprinkled with a few allocations: as a list
//! of used runs they take a few bytes where the on-disk bitmap takes 4 KiB (a 1 TiB image has
//! 8,192 groups: 32 MiB of bitmaps). A group whose runs would outgrow its bitmap is kept as the
//! bitmap itself. The on-disk bytes are produced by [`UseMap::to_bitmap`] only for the groups a
//! transaction changed.

use crate::ext4::{bitmap, BLOCKS_PER_GROUP, BLOCK_SIZE};

/// Runs beyond which a group is kept as its bitmap (4 bytes a run: the bitmap's size).
const MAX_RUNS: usize = BLOCK_SIZE / 4;

const BITS: usize = BLOCKS_PER_GROUP as usize;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UseMap {
    /// Used runs `(start, len)`: sorted, disjoint and never adjacent.
    Runs(Vec<(u16, u16)>),
    /// The group's block bitmap (`BLOCK_SIZE` bytes).
    Bits(Box<[u8]>),
}

impl UseMap {
    /// From a group's on-disk block bitmap, 64 blocks at a time (opening a large image decodes
    /// thousands of them).
    pub fn from_bitmap(b: &[u8]) -> UseMap {
        let mut runs: Vec<(u16, u16)> = Vec::new();
        for (k, chunk) in b[..BITS / 8].chunks_exact(8).enumerate() {
            let mut w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let mut at = k * 64;
            if w == u64::MAX {
                push_used(&mut runs, at, 64);
                continue;
            }
            while w != 0 {
                let free = w.trailing_zeros() as usize;
                w >>= free;
                at += free;
                // w != u64::MAX here (a free bit was shifted in at the top), so used < 64.
                let used = (!w).trailing_zeros() as usize;
                push_used(&mut runs, at, used);
                w >>= used;
                at += used;
            }
            if runs.len() > MAX_RUNS {
                return UseMap::Bits(b[..BLOCK_SIZE].to_vec().into_boxed_slice());
            }
        }
        UseMap::Runs(runs)
    }

    /// The on-disk block bitmap.
    pub fn to_bitmap(&self) -> Vec<u8> {
        match self {
            UseMap::Bits(b) => b.to_vec(),
            UseMap::Runs(runs) => {
                let mut b = vec![0u8; BLOCK_SIZE];
                for &(s, l) in runs {
                    bitmap::set_range(&mut b, usize::from(s), usize::from(s) + usize::from(l));
                }
                b
            }
        }
    }

    pub fn test(&self, i: usize) -> bool {
        match self {
            UseMap::Bits(b) => bitmap::test(b, i),
            UseMap::Runs(runs) => {
                let k = runs.partition_point(|&(s, l)| usize::from(s) + usize::from(l) <= i);
                runs.get(k).is_some_and(|&(s, _)| usize::from(s) <= i)
            }
        }
    }

    /// How many blocks of `[start, end)` are in use.
    pub fn count_used(&self, start: usize, end: usize) -> u32 {
        let end = end.min(BITS);
        if start >= end {
            return 0;
        }
        match self {
            UseMap::Bits(b) => (start..end).filter(|&i| bitmap::test(b, i)).count() as u32,
            UseMap::Runs(runs) => {
                let lo = runs.partition_point(|&(s, l)| usize::from(s) + usize::from(l) <= start);
                runs[lo..]
                    .iter()
                    .take_while(|&&(s, _)| usize::from(s) < end)
                    .map(|&(s, l)| {
                        let (a, b) = (
                            usize::from(s).max(start),
                            (usize::from(s) + usize::from(l)).min(end),
                        );
                        (b - a) as u32
                    })
                    .sum()
            }
        }
    }

    /// Marks `[start, end)` used or free; returns how many blocks changed state.
    pub fn set(&mut self, start: usize, end: usize, used: bool) -> u32 {
        debug_assert!(start <= end && end <= BITS);
        match self {
            UseMap::Bits(b) => {
                let mut changed = 0;
                for i in start..end {
                    if bitmap::test(b, i) != used {
                        if used {
                            bitmap::set(b, i);
                        } else {
                            bitmap::clear(b, i);
                        }
                        changed += 1;
                    }
                }
                changed
            }
            UseMap::Runs(runs) => {
                let changed = set_runs(runs, start, end, used);
                if runs.len() > MAX_RUNS {
                    *self = UseMap::Bits(self.to_bitmap().into_boxed_slice());
                }
                changed
            }
        }
    }

    /// The first free run at or after `from` below `n`: (start, length ≤ `max_len`).
    pub fn find_free_run(&self, from: usize, n: usize, max_len: usize) -> Option<(usize, usize)> {
        match self {
            UseMap::Bits(b) => bitmap::find_free_run(b, from, n, max_len),
            UseMap::Runs(runs) => {
                let mut pos = from;
                let mut k = runs.partition_point(|&(s, l)| usize::from(s) + usize::from(l) <= pos);
                if let Some(&(s, l)) = runs.get(k) {
                    if usize::from(s) <= pos {
                        pos = usize::from(s) + usize::from(l);
                        k += 1;
                    }
                }
                if pos >= n {
                    return None;
                }
                let next_used = runs.get(k).map_or(n, |&(s, _)| usize::from(s)).min(n);
                Some((pos, (next_used - pos).min(max_len)))
            }
        }
    }
}

/// Appends `len` used blocks at `at` (in increasing order), joining the last run if adjacent.
fn push_used(runs: &mut Vec<(u16, u16)>, at: usize, len: usize) {
    if let Some(last) = runs.last_mut() {
        if usize::from(last.0) + usize::from(last.1) == at {
            last.1 += len as u16;
            return;
        }
    }
    runs.push((at as u16, len as u16));
}

/// [`UseMap::set`] on a run list.
fn set_runs(runs: &mut Vec<(u16, u16)>, start: usize, end: usize, used: bool) -> u32 {
    if start >= end {
        return 0;
    }
    let run_end = |&(s, l): &(u16, u16)| usize::from(s) + usize::from(l);
    // Runs touching [start, end), adjacency included (they merge when marking used).
    let lo = runs.partition_point(|r| run_end(r) < start);
    let hi = runs.partition_point(|r| usize::from(r.0) <= end);
    let mut overlap = 0;
    for r in &runs[lo..hi] {
        let (s, e) = (usize::from(r.0).max(start), run_end(r).min(end));
        if s < e {
            overlap += e - s;
        }
    }
    let mut repl: Vec<(u16, u16)> = Vec::with_capacity(2);
    if used {
        let s = runs[lo..hi]
            .first()
            .map_or(start, |r| usize::from(r.0).min(start));
        let e = runs[lo..hi].last().map_or(end, |r| run_end(r).max(end));
        repl.push((s as u16, (e - s) as u16));
    } else {
        for r in &runs[lo..hi] {
            if usize::from(r.0) < start {
                repl.push((r.0, (start - usize::from(r.0)) as u16));
            }
            if run_end(r) > end {
                repl.push((end as u16, (run_end(r) - end) as u16));
            }
        }
    }
    let grow = repl.len().saturating_sub(hi - lo);
    if runs.len() + grow > runs.capacity() {
        // By a quarter: a 16 TiB disk written at random has 131,072 groups of a few runs
        // each, where doubling leaves a third of their memory unused.
        runs.reserve_exact(grow.max(runs.len() / 4).max(2));
    }
    runs.splice(lo..hi, repl);
    if used {
        (end - start - overlap) as u32
    } else {
        overlap as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bits_of(m: &UseMap) -> Vec<bool> {
        (0..BITS).map(|i| m.test(i)).collect()
    }

    proptest! {
        /// Runs and bitmap agree on every query, through any sequence of marks, across the
        /// switch to the bitmap and through an on-disk round trip.
        #[test]
        fn runs_match_a_bitmap(ops in prop::collection::vec(
            (0usize..BITS, 1usize..3000, any::<bool>(), 0usize..BITS, 1usize..500), 1..300)
        ) {
            let mut m = UseMap::Runs(Vec::new());
            let mut model = vec![0u8; BLOCK_SIZE];
            for (s, l, used, from, max) in ops {
                let e = (s + l).min(BITS);
                let mut changed = 0;
                for i in s..e {
                    if bitmap::test(&model, i) != used {
                        changed += 1;
                        if used { bitmap::set(&mut model, i) } else { bitmap::clear(&mut model, i) }
                    }
                }
                let (qa, qb) = (from.min(s), (from + max).min(BITS));
                prop_assert_eq!(m.set(s, e, used), changed);
                prop_assert_eq!(
                    m.count_used(qa, qb),
                    (qa..qb).filter(|&i| bitmap::test(&model, i)).count() as u32
                );
                prop_assert_eq!(
                    m.find_free_run(from, BITS - 7, max),
                    bitmap::find_free_run(&model, from, BITS - 7, max)
                );
                if let UseMap::Runs(r) = &m {
                    for w in r.windows(2) {
                        prop_assert!(usize::from(w[0].0) + usize::from(w[0].1) < usize::from(w[1].0));
                    }
                }
            }
            prop_assert_eq!(m.to_bitmap(), model.clone());
            let back = UseMap::from_bitmap(&model);
            prop_assert_eq!(bits_of(&back), bits_of(&m));
        }
    }

    proptest! {
        /// Decoding finds every used bit, whatever word boundaries the runs cross.
        #[test]
        fn decoding_matches_the_bitmap(
            bits in prop::collection::vec(0usize..BITS, 0..700),
            runs in prop::collection::vec((0usize..BITS, 1usize..200), 0..20),
        ) {
            let mut b = vec![0u8; BLOCK_SIZE];
            for i in bits {
                bitmap::set(&mut b, i);
            }
            for (s, l) in runs {
                bitmap::set_range(&mut b, s, (s + l).min(BITS));
            }
            let m = UseMap::from_bitmap(&b);
            for i in 0..BITS {
                prop_assert_eq!(m.test(i), bitmap::test(&b, i), "block {}", i);
            }
            prop_assert_eq!(m.to_bitmap(), b);
        }
    }

    #[test]
    fn sparse_groups_stay_small_and_dense_ones_become_bitmaps() {
        let mut m = UseMap::Runs(Vec::new());
        m.set(0, 100, true);
        for i in 0..MAX_RUNS - 1 {
            m.set(200 + 3 * i, 201 + 3 * i, true);
        }
        assert!(matches!(m, UseMap::Runs(_)));
        let i = MAX_RUNS - 1;
        m.set(200 + 3 * i, 201 + 3 * i, true);
        assert!(matches!(m, UseMap::Bits(_)));
        assert!(m.test(99) && !m.test(100) && m.test(203) && !m.test(204));
        let full = UseMap::from_bitmap(&[0xFF; BLOCK_SIZE]);
        assert_eq!(full, UseMap::Runs(vec![(0, BITS as u16)]));
        assert_eq!(full.find_free_run(0, BITS, 10), None);
    }
}
