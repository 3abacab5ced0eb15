//! The pool: what every file of an image shares, as jbd2 and ext4's block layer share it —
//! the superblock, the group descriptors and block bitmaps (the allocator), and the journal
//! with its running transaction. Files change metadata only through a [`Handle`] on the pool
//! (jbd2's `handle_t`): it hands out data and tree blocks, frees them (allocatable again only
//! after the transaction that frees them commits) and revokes freed blocks the live log holds.
//!
//! Invariants: nothing reaches the disk except through [`Pool::commit_prepare`] /
//! [`Pool::commit_finish`] (and the in-place writes of `abort` and `close`); a handle exists
//! only while the pool is writable (not read-only, not aborted); a commit's frees become
//! allocatable only in `commit_finish` after its log write succeeded.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;

use super::{ImageError, RecoveryInfo};
use crate::ext4::superblock::{Superblock, SUPERBLOCK_OFFSET};
use crate::ext4::{bitmap, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::io::BlockIo;
use crate::jbd2::format::JournalSuperblock;
use crate::jbd2::{CommitWrite, Journal, LogMap, Transaction};
use crate::mapping::alloc::{Allocator, Savepoint};
use crate::mapping::tree::NodeAlloc;
use crate::mapping::MapError;

pub(super) struct Pool {
    pub(super) io: Arc<dyn BlockIo>,
    pub(super) sb: Superblock,
    /// The metadata checksum seed.
    pub(super) seed: u32,
    pub(super) alloc: Allocator,
    /// `None` on a read-only open: nothing is ever written.
    pub(super) journal: Option<Journal>,
    pub(super) journal_sb: JournalSuperblock,
    pub(super) log_map: LogMap,
    pub(super) read_only: bool,
    pub(super) recovery: RecoveryInfo,
    /// Metadata replayed in memory only (read-only open of an image that needs recovery).
    pub(super) overlay: BTreeMap<u64, Vec<u8>>,
    /// The running transaction's revokes: freed tree blocks the live log holds.
    pub(super) revokes: BTreeSet<u64>,
    pub(super) aborted: Option<String>,
}

/// A change to the running transaction in progress (jbd2's handle): the only way a file
/// reaches the allocator. Dropping it ends the change; everything it did belongs to the
/// running transaction.
pub(super) struct Handle<'p> {
    pool: &'p mut Pool,
}

impl Handle<'_> {
    /// Data blocks for logical block `lblk` (identity placement where free).
    pub(super) fn alloc_data(&mut self, lblk: u64, len: u64) -> Result<(u64, u64), MapError> {
        self.pool.alloc.alloc_data(lblk, len)
    }

    /// Marks where a multi-step change starts: [`Handle::rollback`] gives back exactly what
    /// was taken since (bitmaps, counters, dirty groups).
    pub(super) fn savepoint(&mut self) -> Savepoint {
        self.pool.alloc.savepoint()
    }

    pub(super) fn release(&mut self, sp: Savepoint) {
        self.pool.alloc.release(sp)
    }

    pub(super) fn rollback(&mut self, sp: Savepoint) {
        self.pool.alloc.rollback(sp)
    }

    /// Are `[start, start + len)` all in use (so that freeing them cannot fail halfway)?
    pub(super) fn check_free(&self, start: u64, len: u64) -> Result<(), MapError> {
        self.pool.alloc.check_free(start, len)
    }

    /// Frees data blocks: allocatable again once the running transaction has committed.
    pub(super) fn free(&mut self, start: u64, len: u64) -> Result<(), MapError> {
        self.pool.alloc.free(start, len)
    }

    /// Tree blocks for an extent-tree edit.
    pub(super) fn nodes(&mut self) -> TreeAlloc<'_> {
        TreeAlloc {
            alloc: &mut self.pool.alloc,
            journal: self.pool.journal.as_ref(),
            revokes: &mut self.pool.revokes,
        }
    }
}

/// Tree blocks come from the allocator; freeing one that the live log holds needs a revoke.
pub(super) struct TreeAlloc<'a> {
    alloc: &'a mut Allocator,
    journal: Option<&'a Journal>,
    revokes: &'a mut BTreeSet<u64>,
}

impl NodeAlloc for TreeAlloc<'_> {
    fn alloc_nodes(&mut self, goal: u64, n: usize) -> Result<Vec<u64>, MapError> {
        self.alloc.alloc_tree_blocks(goal, n)
    }
    fn free_node(&mut self, pblk: u64) {
        if let Err(e) = self.alloc.free(pblk, 1) {
            // The tree held a block the allocator did not see in use: the edit stands (the
            // tree is consistent without the node), the block is only leaked, which `check`
            // reports. Open's checks make this unreachable from an image's bytes.
            log::error!("extent tree block {pblk} not freed: {e}");
            return;
        }
        if self.journal.is_some_and(|j| j.is_logged(pblk)) {
            self.revokes.insert(pblk);
        }
    }
}

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Pool {
    /// Starts a handle (jbd2_journal_start): fails once the pool takes no more changes.
    pub(super) fn start(&mut self) -> Result<Handle<'_>, ImageError> {
        self.writable()?;
        Ok(Handle { pool: self })
    }

    pub(super) fn writable(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if let Some(why) = &self.aborted {
            return Err(ImageError::Aborted(why.clone()));
        }
        Ok(())
    }

    pub(super) fn journal_superblock(&self) -> &JournalSuperblock {
        self.journal
            .as_ref()
            .map(Journal::superblock)
            .unwrap_or(&self.journal_sb)
    }

    /// Log blocks the running transaction would take now, with `file_blocks` blocks the files
    /// have changed (tree nodes, inode-table blocks).
    pub(super) fn running_log_blocks(&self, file_blocks: usize) -> u32 {
        // Bitmap + descriptor-table block per dirty group is an upper bound worth having cheaply.
        let blocks = file_blocks + 2 * self.alloc.dirty_count();
        crate::jbd2::log_blocks(blocks, self.revokes.len())
    }

    /// Is free space only waiting for a commit (blocks freed by the running or committing
    /// transaction)? An allocation that fails with `NoSpace` then succeeds after a commit.
    pub(super) fn space_pending(&self) -> bool {
        self.alloc.frees_pending()
    }

    /// Is the running transaction so large that it must not grow until a commit has made room
    /// (half the log: the transaction being committed meanwhile fits in the rest)? The
    /// reservation check of jbd2's `start_this_handle`.
    pub(super) fn log_nearly_full(&self, file_blocks: usize) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| self.running_log_blocks(file_blocks) >= j.hard_limit())
    }

    /// Should the owner commit now to keep transactions within a quarter of the log?
    pub(super) fn should_commit(&self, file_blocks: usize) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| self.running_log_blocks(file_blocks) >= j.max_transaction())
    }

    /// The running transaction: the files' changed blocks, then the pool's own (bitmaps,
    /// group descriptors) and its revokes.
    fn build_transaction(&mut self, file_blocks: Vec<(u64, Vec<u8>)>) -> Transaction {
        let mut tx = Transaction::default();
        tx.blocks.extend(file_blocks);
        let groups = self.alloc.take_dirty();
        let mut gdt_blocks = BTreeSet::new();
        for g in groups {
            let bm = self.alloc.bitmap(g);
            let d = &mut self.alloc.descs[g as usize];
            d.block_bitmap_csum = bitmap::block_bitmap_csum(self.seed, &bm);
            d.flags &= !crate::ext4::group::BG_BLOCK_UNINIT;
            tx.blocks.insert(d.block_bitmap, bm);
            gdt_blocks.insert(g / crate::ext4::group::DESCS_PER_BLOCK);
        }
        for k in gdt_blocks {
            tx.blocks.insert(1 + k, self.gdt_block(k));
        }
        tx.revokes = std::mem::take(&mut self.revokes);
        tx
    }

    fn gdt_block(&self, k: u64) -> Vec<u8> {
        use crate::ext4::group::{DESCS_PER_BLOCK, DESC_SIZE};
        let mut b = vec![0u8; BLOCK_SIZE];
        let first = k * DESCS_PER_BLOCK;
        for g in first..(first + DESCS_PER_BLOCK).min(self.alloc.descs.len() as u64) {
            let o = (g - first) as usize * DESC_SIZE;
            b[o..o + DESC_SIZE].copy_from_slice(&self.alloc.descs[g as usize].encode(g, self.seed));
        }
        b
    }

    /// The first half of a commit, under the owner's lock: freezes the running transaction
    /// (changes from now on go to the next one) with the files' changed blocks and returns its
    /// log writes, or `None` when there is nothing to journal. See `Image::commit_prepare`.
    pub(super) fn commit_prepare(
        &mut self,
        file_blocks: Vec<(u64, Vec<u8>)>,
    ) -> Result<Option<CommitWrite>, ImageError> {
        let tx = self.build_transaction(file_blocks);
        let Some(j) = self.journal.as_mut() else {
            return Ok(None);
        };
        if tx.is_empty() {
            return Ok(None);
        }
        match j.prepare(&*self.io, &tx, now_secs()) {
            Ok(w) => {
                self.alloc.commit_start();
                Ok(w)
            }
            Err(e) => {
                self.aborted = Some(format!("commit failed: {e}"));
                Err(e.into())
            }
        }
    }

    /// The second half of a commit: `written` is how writing the prepared transaction went.
    /// Blocks it freed may be reused from now on; a failed write aborts the journal.
    pub(super) fn commit_finish(&mut self, written: io::Result<()>) -> Result<(), ImageError> {
        match written {
            Ok(()) => {
                self.alloc.commit_done();
                if self.aborted.is_some() {
                    // Aborted while the commit was written: its journal superblock (pointing
                    // replay at the log) may have overwritten the one recording the error.
                    if let Some(j) = self.journal.as_mut() {
                        j.rewrite_superblock(&*self.io)?;
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.aborted = Some(format!("commit failed: {e}"));
                Err(e.into())
            }
        }
    }

    /// See `Image::abort`.
    pub(super) fn abort(&mut self, errno: i32, func: &str, block: u64) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if self.aborted.is_none() {
            self.aborted = Some(format!("{func}: {}", io::Error::from_raw_os_error(errno)));
        }
        let now = now_secs() as u32;
        let code = if errno == libc::EIO {
            crate::ext4::superblock::ERRCODE_EIO
        } else {
            1
        };
        self.sb.record_error(now, func, code, block);
        self.write_superblock()?;
        if let Some(j) = self.journal.as_mut() {
            j.record_abort(&*self.io, errno)?;
        }
        self.io.flush()?;
        Ok(())
    }

    /// Replaces a group's block bitmap (repair); journaled with the next commit.
    pub(super) fn replace_block_bitmap(&mut self, g: u64, bm: Vec<u8>) -> Result<(), ImageError> {
        self.writable()?;
        if g as usize >= self.alloc.descs.len() || bm.len() != BLOCK_SIZE {
            return Err(crate::ext4::corrupt("repair", format!("bad bitmap for group {g}")).into());
        }
        self.alloc.replace_bitmap(g, bm);
        Ok(())
    }

    /// Writes every committed block home and empties the log.
    pub(super) fn checkpoint(&mut self) -> Result<(), ImageError> {
        if let Some(j) = self.journal.as_mut() {
            j.checkpoint(&*self.io)?;
        }
        Ok(())
    }

    /// The pool's part of a clean close, after the last commit: checkpoint, exact free
    /// counts, needs_recovery cleared; no change is accepted after.
    pub(super) fn close_committed(&mut self) -> Result<(), ImageError> {
        self.checkpoint()?;
        self.sb.free_blocks_count = self.alloc.free_blocks();
        self.sb.set_needs_recovery(false);
        self.sb.wtime = now_secs() as u32;
        self.write_superblock()?;
        self.io.flush()?;
        self.aborted = Some("the image is closed".into());
        Ok(())
    }

    /// Counts a read-write session in `s_mnt_count`, as ext4 counts mounts, durably: the
    /// restart log names the session it was written in, and one left by an earlier session
    /// (the image opened read-write since, without it) is never applied.
    pub(super) fn begin_session(&mut self) -> Result<(), ImageError> {
        self.writable()?;
        self.sb.mnt_count = self.sb.mnt_count.wrapping_add(1);
        self.write_superblock()?;
        self.io.flush()?;
        Ok(())
    }

    fn write_superblock(&self) -> io::Result<()> {
        self.io.write_at(&self.sb.encode(), SUPERBLOCK_OFFSET)
    }

    /// Reads a metadata block as the image stands after recovery (a read-only open keeps
    /// replayed blocks in memory).
    pub(super) fn meta_block(&self, blk: u64) -> io::Result<Vec<u8>> {
        if let Some(b) = self.overlay.get(&blk) {
            return Ok(b.clone());
        }
        let mut b = vec![0u8; BLOCK_SIZE];
        self.io.read_at(&mut b, blk * BLOCK_SIZE_U64)?;
        Ok(b)
    }
}
