//! The range lock of `/disk`'s blocks: which blocks an allocating write is still initialising,
//! and the writes deferred behind them.
//!
//! Invariants (all under the mapping lock, which holds the `RangeLock`):
//! - a block is in `in_progress` from the allocation that made it unwritten until its
//!   conversion (or the failure of its data write) — `mark` and `unmark` pair exactly, one
//!   `unmark` per `mark` on every path, the failing ones included (`Shared::fail_work`,
//!   `Shared::fail_parked`);
//! - a write touching an in-progress block is deferred, never run: partial writes into one
//!   new block would otherwise clobber each other's zero padding;
//! - nobody waits on the range lock: a deferred write is handed back by [`RangeLock::take_ready`]
//!   to whoever unmarked the last of its blocks, which redoes it. It ends because every
//!   marked block is unmarked once its write's I/O has ended.

use std::collections::HashMap;

use super::alloc_write::PendingWrite;
use super::BS;

/// The blocks `[b0, b1)` a request at `offset` of `len` bytes touches.
pub(super) fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
    (offset / BS, (offset + len).div_ceil(BS))
}

/// `(lblk, len, pblk)`: a run of blocks one allocating write fills.
pub(super) type Run = (u64, u64, u64);

#[derive(Default)]
pub(super) struct RangeLock {
    /// Blocks an allocating write is filling: lblk → writers.
    in_progress: HashMap<u64, u32>,
    /// Writes waiting for some of their blocks to leave `in_progress`, in arrival order.
    deferred: Vec<PendingWrite>,
}

impl RangeLock {
    /// Does any block of `[b0, b1)` belong to a write still initialising it?
    pub(super) fn busy(&self, b0: u64, b1: u64) -> bool {
        (b0..b1).any(|b| self.in_progress.contains_key(&b))
    }

    /// Marks the blocks of `runs` as being initialised by one more write.
    pub(super) fn mark(&mut self, runs: &[Run]) {
        for &(l, n, _) in runs {
            for b in l..l + n {
                *self.in_progress.entry(b).or_insert(0) += 1;
            }
        }
    }

    /// Undoes one [`RangeLock::mark`] of `runs`.
    pub(super) fn unmark(&mut self, runs: &[Run]) {
        for &(l, n, _) in runs {
            for b in l..l + n {
                if let Some(c) = self.in_progress.get_mut(&b) {
                    *c -= 1;
                    if *c == 0 {
                        self.in_progress.remove(&b);
                    }
                }
            }
        }
    }

    /// Defers a write that touches an in-progress block.
    pub(super) fn defer(&mut self, w: PendingWrite) {
        self.deferred.push(w);
    }

    /// The most recently deferred write.
    pub(super) fn last_deferred_mut(&mut self) -> Option<&mut PendingWrite> {
        self.deferred.last_mut()
    }

    /// Deferred writes whose blocks are no longer being initialised, in arrival order.
    pub(super) fn take_ready(&mut self) -> Vec<PendingWrite> {
        let mut ready = Vec::new();
        let mut keep = Vec::new();
        for w in self.deferred.drain(..) {
            let (b0, b1) = blocks_of(w.offset, w.bufs.len() as u64);
            if (b0..b1).any(|b| self.in_progress.contains_key(&b)) {
                keep.push(w);
            } else {
                ready.push(w);
            }
        }
        self.deferred = keep;
        ready
    }

    /// Every deferred write (the journal is gone: they are failed).
    pub(super) fn take_deferred(&mut self) -> Vec<PendingWrite> {
        std::mem::take(&mut self.deferred)
    }
}
