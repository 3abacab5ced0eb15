//! The image engine's counters: which path each request took. Bumped with relaxed atomics
//! from any thread (no lock); read as an [`EngineCounters`] snapshot (JSON and the log).

crate::counters::counters! {
    /// Engine counters: which path each request took.
    pub struct EngineStats => EngineCounters {
        /// Reads served on the queue thread from the mapping.
        fast_reads,
        /// Writes whose blocks were all written: straight to the mapped blocks, no handle.
        fast_overwrites,
        /// Writes that allocated blocks (unwritten extents, converted after the data I/O).
        allocating_writes,
        /// Allocating writes deferred behind a write still initialising some of their blocks.
        deferred_writes,
        /// Mapping changes made (allocations, zeroings, punches): jbd2 handles.
        journal_handles,
        /// Blocks converted from unwritten to written.
        converted_blocks,
        /// Blocks of an allocation unit around an allocating write zero-filled and converted
        /// with it (the unit had been written before: it is filling up).
        zero_filled_blocks,
        /// Blocks of a new allocation unit (all holes before) left allocated but unwritten
        /// around its first write: no zeroes written; filled by the unit's next allocating write.
        unit_blocks_left_unwritten,
        /// Blocks of an allocation unit around an allocating write converted without writing
        /// anything: the backing reads them as zeroes already (holes of a sparse image file).
        unit_blocks_found_zero,
        /// Journal commits (including flushes with nothing to journal).
        commits,
        /// DISCARD and WRITE_ZEROES requests run by the worker.
        zeroing_ops,
        /// Allocating writes that failed for lack of space (never inside the disk's capacity).
        enospc,
        /// Allocating writes that parked because the running transaction reached half the log.
        throttled,
        /// Allocating writes that parked because free space existed only as blocks freed by the
        /// running or committing transaction (allocatable once it commits).
        space_waits,
        /// FUA overwrites completed after a commit because some mapping change was not yet durable.
        fua_commits,
    }
}
