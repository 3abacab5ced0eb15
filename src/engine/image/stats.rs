//! The image engine's counters: which path each request took. Bumped with relaxed atomics
//! from any thread (no lock); read as a snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Engine counters: which path each request took.
#[derive(Default)]
pub struct EngineStats {
    pub fast_reads: AtomicU64,
    pub fast_overwrites: AtomicU64,
    pub allocating_writes: AtomicU64,
    pub deferred_writes: AtomicU64,
    pub journal_handles: AtomicU64,
    pub converted_blocks: AtomicU64,
    /// Blocks allocated around allocating writes to fill their allocation unit (zero-filled).
    pub zero_filled_blocks: AtomicU64,
    pub commits: AtomicU64,
    pub discards: AtomicU64,
    /// Allocating writes that failed for lack of space (never inside the disk's capacity).
    pub enospc: AtomicU64,
    /// Allocating writes that parked because the running transaction reached half the log.
    pub throttled: AtomicU64,
    /// Allocating writes that parked because free space existed only as blocks freed by the
    /// running or committing transaction (allocatable once it commits).
    pub space_waits: AtomicU64,
    /// FUA overwrites completed after a commit because some mapping change was not yet durable.
    pub fua_commits: AtomicU64,
}

impl EngineStats {
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "fast_reads={} fast_overwrites={} allocating_writes={} deferred_writes={} journal_handles={} converted_blocks={} zero_filled_blocks={} commits={} zeroing_ops={} enospc={} throttled={} space_waits={} fua_commits={}",
            g(&self.fast_reads),
            g(&self.fast_overwrites),
            g(&self.allocating_writes),
            g(&self.deferred_writes),
            g(&self.journal_handles),
            g(&self.converted_blocks),
            g(&self.zero_filled_blocks),
            g(&self.commits),
            g(&self.discards),
            g(&self.enospc),
            g(&self.throttled),
            g(&self.space_waits),
            g(&self.fua_commits)
        )
    }
}
