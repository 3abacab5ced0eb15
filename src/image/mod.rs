//! An extblk image: an ext4 filesystem holding the virtual disk as `/disk`, opened for
//! mapping work. It is split as jbd2 and ext4 split it: the **pool** (`pool.rs`: superblock,
//! group descriptors and bitmaps, the journal and its running transaction), offered to files
//! as handles; and the **file** (`file.rs`: `/disk`'s inode and extent tree), which changes
//! its metadata only through a handle. [`Image`] is one pool with its one file; every change
//! is collected into the running transaction and reaches the disk only through
//! [`Image::commit`].

pub mod create;
mod file;
mod open;
mod pool;
mod reapply;
#[doc(hidden)]
pub mod reseal;
pub mod resize;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::ext4::extent::Extent;
use crate::ext4::inode::Inode;
use crate::ext4::superblock::Superblock;
use crate::ext4::{FormatError, BLOCK_SIZE_U64};
use crate::io::BlockIo;
use crate::jbd2::format::JournalSuperblock;
use crate::jbd2::{CommitWrite, Journal, LogMap};
use crate::mapping::alloc::Allocator;
use crate::mapping::tree::{ExtentTree, Lookup};
use crate::mapping::MapError;
use file::DiskFile;
use pool::Pool;

pub use open::OpenOptions;
pub use reapply::Reapplied;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("the backing holds {0} bytes, the image needs {1}")]
    TooSmall(u64, u64),
    #[error("{0} already exists (use --force to overwrite it)")]
    Exists(std::path::PathBuf),
    #[error(transparent)]
    Open(#[from] crate::io::backing::OpenError),
    #[error(transparent)]
    RestartLog(#[from] crate::restart_log::RestartLogError),
    #[error("no space left in the image")]
    NoSpace,
    #[error("the image is open read-only")]
    ReadOnly,
    #[error("range {0}+{1} is outside the disk")]
    OutOfRange(u64, u64),
    #[error("the journal was aborted: {0}")]
    Aborted(String),
    /// The extent tree and the allocator disagree (blocks freed twice, or outside the data
    /// area): refused before anything changed. Open's checks make this unreachable from an
    /// image's bytes; it is an error rather than a panic or a corrupted bitmap all the same.
    #[error("inconsistent metadata: {0}")]
    Inconsistent(MapError),
}

impl From<MapError> for ImageError {
    fn from(e: MapError) -> Self {
        match e {
            MapError::NoSpace => ImageError::NoSpace,
            MapError::Format(f) => ImageError::Format(f),
            other => ImageError::Inconsistent(other),
        }
    }
}

/// What open found in the journal.
#[derive(Clone, Debug, Default)]
pub struct RecoveryInfo {
    pub transactions: u32,
    pub blocks: usize,
    pub corrupt: Option<String>,
    pub bad_tags: u32,
    /// The tid of the first transaction the opened image does not hold: every transaction
    /// before it is durable (replayed or checkpointed), none from it on. The restart log
    /// applies its records from this tid on.
    pub first_missing_tid: u32,
}

/// A run of the virtual disk as `map` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    Data,
    Unwritten,
    Hole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub lblk: u64,
    pub len: u64,
    pub kind: RunKind,
    /// Physical block of the first block (data and unwritten runs).
    pub pblk: Option<u64>,
}

/// An open image: the pool and its one file, `/disk`.
pub struct Image {
    pool: Pool,
    disk: DiskFile,
}

impl Image {
    pub fn superblock(&self) -> &Superblock {
        &self.pool.sb
    }

    pub fn journal_superblock(&self) -> &JournalSuperblock {
        self.pool.journal_superblock()
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.pool.journal.as_ref()
    }

    pub fn recovery(&self) -> &RecoveryInfo {
        &self.pool.recovery
    }

    pub fn is_read_only(&self) -> bool {
        self.pool.read_only
    }

    /// Virtual disk size in bytes (`/disk`'s i_size).
    pub fn disk_size(&self) -> u64 {
        self.disk.inode.size
    }

    pub fn disk_blocks(&self) -> u64 {
        self.disk.blocks
    }

    pub fn tree(&self) -> &ExtentTree {
        &self.disk.tree
    }

    pub fn allocator(&self) -> &Allocator {
        &self.pool.alloc
    }

    pub fn disk_inode(&self) -> &Inode {
        &self.disk.inode
    }

    pub fn disk_ino(&self) -> u32 {
        self.disk.ino
    }

    pub fn io(&self) -> &Arc<dyn BlockIo> {
        &self.pool.io
    }

    pub fn lookup(&self, lblk: u32) -> Lookup {
        self.disk.tree.lookup(lblk)
    }

    /// The whole disk as data / unwritten / hole runs.
    pub fn runs(&self) -> Vec<Run> {
        self.disk.runs()
    }

    /// Gives every hole in `[lblk, lblk + len)` unwritten blocks (identity placement where
    /// free). Returns the new extents; the range then reads as zeroes until converted. On any
    /// error (ENOSPC for data or for a tree block) nothing has changed.
    pub fn allocate(&mut self, lblk: u64, len: u64) -> Result<Vec<Extent>, ImageError> {
        let mut h = self.pool.start()?;
        self.disk.allocate(&mut h, lblk, len)
    }

    /// Benchmark aid for a new image (`extblk create --scatter`): maps `[0, len)` as written
    /// blocks, each its own extent, no two logical neighbours physically adjacent — the worst
    /// fragmentation for the seed's experiment. The range must be a hole, and the backing must
    /// read as zeroes there (a new sparse file), since the blocks count as written.
    pub fn map_scattered(&mut self, len: u64) -> Result<(), ImageError> {
        self.pool.writable()?;
        let (a, b) = self.disk.check_range(0, len)?;
        if self.disk.tree.range(a, b).iter().any(|e| e.len > 0) {
            return Err(crate::ext4::corrupt("scatter", "the range is already mapped").into());
        }
        let mut phys = Vec::with_capacity(len as usize);
        while (phys.len() as u64) < len {
            let (p, got) = self.pool.start()?.alloc_data(0, len - phys.len() as u64)?;
            phys.extend(p..p + got);
        }
        // Even logical blocks take the first half of the run, odd ones the second.
        let half = len.div_ceil(2);
        let place = |l: u64| phys[(if l % 2 == 0 { l / 2 } else { half + l / 2 }) as usize];
        let mut l = a;
        while l < b {
            let end = (l + SCATTER_EDIT).min(b);
            let new: Vec<Extent> = (l..end)
                .map(|x| Extent {
                    lblk: x,
                    len: 1,
                    pblk: place(u64::from(x)),
                    unwritten: false,
                })
                .collect();
            self.disk.replace(&mut self.pool.start()?, l, end, &new)?;
            if self.should_commit() {
                self.commit()?;
            }
            l = end;
        }
        self.commit()?;
        Ok(())
    }

    /// Marks the unwritten blocks of `[lblk, lblk + len)` written. Holes stay holes: a range
    /// punched after its data was written is not brought back.
    pub fn convert(&mut self, lblk: u64, len: u64) -> Result<u64, ImageError> {
        let mut h = self.pool.start()?;
        self.disk.convert(&mut h, lblk, len)
    }

    /// Converts only the unwritten blocks of `[lblk, lblk + len)` that are still at `pblk…`: the
    /// blocks one write allocated and filled. If a discard removed them meanwhile, or the range
    /// was reallocated elsewhere, nothing is converted — a conversion never brings back a freed
    /// extent nor exposes blocks another write has not filled yet.
    pub fn convert_exact(&mut self, lblk: u64, len: u64, pblk: u64) -> Result<u64, ImageError> {
        let mut h = self.pool.start()?;
        self.disk.convert_exact(&mut h, lblk, len, pblk)
    }

    /// [`Image::convert_exact`], returning the extents it converted, now written.
    pub fn convert_exact_runs(
        &mut self,
        lblk: u64,
        len: u64,
        pblk: u64,
    ) -> Result<Vec<Extent>, ImageError> {
        let mut h = self.pool.start()?;
        self.disk.convert_exact_runs(&mut h, lblk, len, pblk)
    }

    /// The tid the running transaction will commit with: every change made now joins it.
    /// `None` on a read-only open (no journal writer).
    pub fn running_tid(&self) -> Option<u32> {
        self.pool.journal.as_ref().map(Journal::running_tid)
    }

    /// Makes the written blocks of a range unwritten (they read as zeroes; nothing is freed).
    /// One tree edit: on ENOSPC nothing has changed.
    pub fn zero(&mut self, lblk: u64, len: u64) -> Result<(), ImageError> {
        let mut h = self.pool.start()?;
        self.disk.zero(&mut h, lblk, len)
    }

    /// Unmaps a range and frees its blocks (allocatable again after the commit). Returns the
    /// physical runs freed, for the caller to deallocate in the backing after committing. On
    /// any error (ENOSPC for a leaf when the punch splits an extent, blocks the bitmaps do not
    /// show in use) nothing has changed.
    pub fn punch(&mut self, lblk: u64, len: u64) -> Result<Vec<(u64, u64)>, ImageError> {
        let mut h = self.pool.start()?;
        self.disk.punch(&mut h, lblk, len)
    }

    /// Log blocks the running transaction would take now: an upper bound, counted the way the
    /// journal lays it out ([`crate::jbd2::log_blocks`]).
    pub fn running_log_blocks(&self) -> u32 {
        self.pool.running_log_blocks(self.disk.pending_blocks())
    }

    /// Is free space only waiting for a commit (blocks freed by the running or committing
    /// transaction)? An allocation that fails with `NoSpace` then succeeds after a commit.
    pub fn space_pending(&self) -> bool {
        self.pool.space_pending()
    }

    /// Is the running transaction so large that it must not grow until a commit has made room
    /// (half the log: the transaction being committed meanwhile fits in the rest)?
    pub fn log_nearly_full(&self) -> bool {
        self.pool.log_nearly_full(self.disk.pending_blocks())
    }

    /// Should the caller commit now to keep transactions within a quarter of the log?
    pub fn should_commit(&self) -> bool {
        self.pool.should_commit(self.disk.pending_blocks())
    }

    /// Commits the running transaction; returns whether there was one. Data written before the
    /// call is durable after it when a transaction was written (the caller flushes otherwise).
    pub fn commit(&mut self) -> Result<bool, ImageError> {
        let Some(w) = self.commit_prepare()? else {
            return Ok(false);
        };
        let r = w.write(&*self.pool.io);
        self.commit_finish(r)?;
        Ok(true)
    }

    /// The first half of a commit, under the owner's lock: freezes the running transaction
    /// (changes from now on go to the next one) and returns its log writes, or `None` when
    /// there is nothing to journal. The owner writes them with the lock released — as jbd2
    /// commits while new handles join the next transaction — then calls
    /// [`Image::commit_finish`]. One commit at a time: the next `commit_prepare` only after
    /// the previous `commit_finish`.
    pub fn commit_prepare(&mut self) -> Result<Option<CommitWrite>, ImageError> {
        self.pool.writable()?;
        let blocks = self.disk.take_changes(&self.pool.sb, self.pool.seed);
        self.pool.commit_prepare(blocks)
    }

    /// The second half of a commit: `written` is how writing the prepared transaction went.
    /// Blocks it freed may be reused from now on; a failed write aborts the journal.
    pub fn commit_finish(&mut self, written: io::Result<()>) -> Result<(), ImageError> {
        self.pool.commit_finish(written)
    }

    /// Aborts the journal after a failed data write or commit (`data_err=abort`): no further
    /// change is accepted, the running transaction is dropped, and the error is recorded the way
    /// ext4 records it — ERROR_FS and the error fields in the superblock, `s_errno` in the journal
    /// superblock — in place and durably. Committed transactions stay in the log for replay.
    pub fn abort(&mut self, errno: i32, func: &str, block: u64) -> Result<(), ImageError> {
        self.pool.abort(errno, func, block)
    }

    /// See [`Image::open_keeping_session`].
    pub fn begin_session(&mut self) -> Result<(), ImageError> {
        self.pool.begin_session()
    }

    /// Replaces a group's block bitmap (repair); journaled with the next commit.
    pub fn replace_block_bitmap(&mut self, g: u64, bm: Vec<u8>) -> Result<(), ImageError> {
        self.pool.replace_block_bitmap(g, bm)
    }

    pub fn is_aborted(&self) -> bool {
        self.pool.aborted.is_some()
    }

    /// Writes every committed block home and empties the log.
    pub fn checkpoint(&mut self) -> Result<(), ImageError> {
        self.pool.checkpoint()
    }

    /// Clean close: commit, checkpoint, exact free counts, needs_recovery cleared.
    pub fn close(mut self) -> Result<(), ImageError> {
        self.close_in_place()
    }

    /// [`Image::close`] for an owner that cannot give the image up; no change is accepted after.
    pub fn close_in_place(&mut self) -> Result<(), ImageError> {
        if self.pool.read_only || self.pool.aborted.is_some() {
            return Ok(());
        }
        self.commit()?;
        self.pool.close_committed()
    }

    /// The journal's log → filesystem block map.
    pub fn log_map(&self) -> &LogMap {
        &self.pool.log_map
    }

    /// Reads a metadata block as the image stands after recovery (a read-only open keeps
    /// replayed blocks in memory).
    pub fn meta_block(&self, blk: u64) -> io::Result<Vec<u8>> {
        self.pool.meta_block(blk)
    }

    /// Reads a data block of the disk's backing at physical block `pblk`.
    pub fn read_block(&self, pblk: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pool.io.read_at(buf, pblk * BLOCK_SIZE_U64)
    }
}

/// Extents `map_scattered` writes per tree edit: small enough that a transaction stays far
/// below the log's limit between its commit checks.
const SCATTER_EDIT: u32 = 256;
