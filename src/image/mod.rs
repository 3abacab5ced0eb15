//! An extblk image: an ext4 filesystem holding the virtual disk as `/disk`, opened for
//! mapping work. [`Image`] owns the in-memory metadata (superblock, group descriptors, block
//! bitmaps, `/disk`'s inode and extent tree) and the journal; every change it makes is collected
//! into the running transaction and reaches the disk only through [`Image::commit`].

pub mod create;
mod open;
#[doc(hidden)]
pub mod reseal;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::ext4::extent::{self, Extent};
use crate::ext4::inode::Inode;
use crate::ext4::superblock::{Superblock, SUPERBLOCK_OFFSET};
use crate::ext4::{bitmap, FormatError, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::io::BlockIo;
use crate::jbd2::format::JournalSuperblock;
use crate::jbd2::{CommitWrite, Journal, LogMap, Transaction};
use crate::mapping::alloc::Allocator;
use crate::mapping::tree::{ExtentTree, Lookup, NodeAlloc};
use crate::mapping::MapError;

pub use open::OpenOptions;

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

pub struct Image {
    io: Arc<dyn BlockIo>,
    sb: Superblock,
    seed: u32,
    disk_ino: u32,
    disk: Inode,
    disk_iseed: u32,
    /// The inode-table block holding `/disk`'s inode, as last written.
    itable: (u64, Vec<u8>),
    tree: ExtentTree,
    alloc: Allocator,
    journal: Option<Journal>,
    journal_sb: JournalSuperblock,
    log_map: LogMap,
    disk_blocks: u64,
    read_only: bool,
    recovery: RecoveryInfo,
    /// Metadata replayed in memory only (read-only open of an image that needs recovery).
    overlay: BTreeMap<u64, Vec<u8>>,
    // The running transaction.
    inode_dirty: bool,
    revokes: BTreeSet<u64>,
    aborted: Option<String>,
}

/// Tree blocks come from the allocator; freeing one that the live log holds needs a revoke.
struct TreeAlloc<'a> {
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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Image {
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn journal_superblock(&self) -> &JournalSuperblock {
        self.journal
            .as_ref()
            .map(Journal::superblock)
            .unwrap_or(&self.journal_sb)
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    pub fn recovery(&self) -> &RecoveryInfo {
        &self.recovery
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Virtual disk size in bytes (`/disk`'s i_size).
    pub fn disk_size(&self) -> u64 {
        self.disk.size
    }

    pub fn disk_blocks(&self) -> u64 {
        self.disk_blocks
    }

    pub fn tree(&self) -> &ExtentTree {
        &self.tree
    }

    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    pub fn disk_inode(&self) -> &Inode {
        &self.disk
    }

    pub fn disk_ino(&self) -> u32 {
        self.disk_ino
    }

    pub fn io(&self) -> &Arc<dyn BlockIo> {
        &self.io
    }

    pub fn lookup(&self, lblk: u32) -> Lookup {
        self.tree.lookup(lblk)
    }

    /// The whole disk as data / unwritten / hole runs.
    pub fn runs(&self) -> Vec<Run> {
        let mut out = Vec::new();
        let mut pos = 0u64;
        let push = |out: &mut Vec<Run>, r: Run| match out.last_mut() {
            Some(p)
                if p.kind == r.kind
                    && p.lblk + p.len == r.lblk
                    && (r.kind == RunKind::Hole || p.pblk.map(|b| b + p.len) == r.pblk) =>
            {
                p.len += r.len
            }
            _ => out.push(r),
        };
        for e in self.tree.iter() {
            if u64::from(e.lblk) >= self.disk_blocks {
                break;
            }
            if u64::from(e.lblk) > pos {
                push(
                    &mut out,
                    Run {
                        lblk: pos,
                        len: u64::from(e.lblk) - pos,
                        kind: RunKind::Hole,
                        pblk: None,
                    },
                );
            }
            let kind = if e.unwritten {
                RunKind::Unwritten
            } else {
                RunKind::Data
            };
            let len = e.end().min(self.disk_blocks) - u64::from(e.lblk);
            push(
                &mut out,
                Run {
                    lblk: u64::from(e.lblk),
                    len,
                    kind,
                    pblk: Some(e.pblk),
                },
            );
            pos = e.end();
        }
        if pos < self.disk_blocks {
            push(
                &mut out,
                Run {
                    lblk: pos,
                    len: self.disk_blocks - pos,
                    kind: RunKind::Hole,
                    pblk: None,
                },
            );
        }
        out
    }

    fn writable(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if let Some(why) = &self.aborted {
            return Err(ImageError::Aborted(why.clone()));
        }
        Ok(())
    }

    fn check_range(&self, lblk: u64, len: u64) -> Result<(u32, u32), ImageError> {
        match lblk.checked_add(len) {
            Some(end) if end <= self.disk_blocks && len > 0 => Ok((lblk as u32, end as u32)),
            _ => Err(ImageError::OutOfRange(lblk, len)),
        }
    }

    fn replace(&mut self, a: u32, b: u32, new: &[Extent]) -> Result<Vec<Extent>, ImageError> {
        let mut na = TreeAlloc {
            alloc: &mut self.alloc,
            journal: self.journal.as_ref(),
            revokes: &mut self.revokes,
        };
        // The tree keeps the running transaction's changed nodes itself (a node freed within
        // the transaction leaves that record), so nothing here is linear in the tree's size.
        let removed = self.tree.replace(a, b, new, &mut na)?;
        if !removed.is_empty() || !new.is_empty() {
            self.inode_dirty = true;
        }
        Ok(removed)
    }

    /// Gives every hole in `[lblk, lblk + len)` unwritten blocks (identity placement where
    /// free). Returns the new extents; the range then reads as zeroes until converted. On any
    /// error (ENOSPC for data or for a tree block) nothing has changed.
    pub fn allocate(&mut self, lblk: u64, len: u64) -> Result<Vec<Extent>, ImageError> {
        self.writable()?;
        let (a, b) = self.check_range(lblk, len)?;
        let mut holes = Vec::new();
        let mut pos = a;
        while pos < b {
            match self.tree.lookup(pos) {
                Lookup::Mapped(e) => pos = pos.saturating_add(e.len).min(b),
                Lookup::Hole { len } => {
                    let end = (u64::from(pos) + len).min(u64::from(b)) as u32;
                    holes.push((pos, end));
                    pos = end;
                }
            }
        }
        if holes.is_empty() {
            return Ok(Vec::new());
        }
        // Data blocks are taken one run at a time: the savepoint gives back exactly what this
        // call took (bitmaps, counters, dirty groups) if a later run or the tree edit fails.
        let sp = self.alloc.savepoint();
        match self.allocate_holes(&holes) {
            Ok(new) => {
                self.alloc.release(sp);
                Ok(new)
            }
            Err(e) => {
                self.alloc.rollback(sp);
                Err(e)
            }
        }
    }

    fn allocate_holes(&mut self, holes: &[(u32, u32)]) -> Result<Vec<Extent>, ImageError> {
        let mut new = Vec::new();
        for &(ha, hb) in holes {
            let mut p = ha;
            while p < hb {
                let want = u64::from(hb - p).min(u64::from(extent::MAX_UNWRITTEN_LEN));
                let (pblk, got) = self.alloc.alloc_data(u64::from(p), want)?;
                new.push(Extent {
                    lblk: p,
                    len: got as u32,
                    pblk,
                    unwritten: true,
                });
                p += got as u32;
            }
        }
        // One tree edit for all the holes, the mapped runs between them kept as they are: an
        // edit either happens whole or (ENOSPC for a tree block) not at all.
        let (lo, hi) = (holes[0].0, holes[holes.len() - 1].1);
        let mut all = self.tree.range(lo, hi);
        all.extend_from_slice(&new);
        all.sort_unstable_by_key(|e| e.lblk);
        self.replace(lo, hi, &all)?;
        Ok(new)
    }

    /// Benchmark aid for a new image (`extblk create --scatter`): maps `[0, len)` as written
    /// blocks, each its own extent, no two logical neighbours physically adjacent — the worst
    /// fragmentation for the seed's experiment. The range must be a hole, and the backing must
    /// read as zeroes there (a new sparse file), since the blocks count as written.
    pub fn map_scattered(&mut self, len: u64) -> Result<(), ImageError> {
        self.writable()?;
        let (a, b) = self.check_range(0, len)?;
        if self.tree.range(a, b).iter().any(|e| e.len > 0) {
            return Err(crate::ext4::corrupt("scatter", "the range is already mapped").into());
        }
        let mut phys = Vec::with_capacity(len as usize);
        while (phys.len() as u64) < len {
            let (p, got) = self.alloc.alloc_data(0, len - phys.len() as u64)?;
            phys.extend(p..p + got);
        }
        // Even logical blocks take the first half of the run, odd ones the second.
        let half = len.div_ceil(2);
        let place = |l: u64| phys[(if l % 2 == 0 { l / 2 } else { half + l / 2 }) as usize];
        let mut l = a;
        while l < b {
            let end = (l + 256).min(b);
            let new: Vec<Extent> = (l..end)
                .map(|x| Extent {
                    lblk: x,
                    len: 1,
                    pblk: place(u64::from(x)),
                    unwritten: false,
                })
                .collect();
            self.replace(l, end, &new)?;
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
        self.convert_where(lblk, len, |_, _| true)
    }

    /// Converts only the unwritten blocks of `[lblk, lblk + len)` that are still at `pblk…`: the
    /// blocks one write allocated and filled. If a discard removed them meanwhile, or the range
    /// was reallocated elsewhere, nothing is converted — a conversion never brings back a freed
    /// extent nor exposes blocks another write has not filled yet.
    pub fn convert_exact(&mut self, lblk: u64, len: u64, pblk: u64) -> Result<u64, ImageError> {
        self.convert_where(lblk, len, |e, a| e.pblk == pblk + u64::from(e.lblk - a))
    }

    /// Marks written the unwritten extents of a range that `keep(extent, range start)` accepts.
    /// One tree edit: on ENOSPC (a split needing a leaf) nothing has changed.
    fn convert_where(
        &mut self,
        lblk: u64,
        len: u64,
        keep: impl Fn(&Extent, u32) -> bool,
    ) -> Result<u64, ImageError> {
        self.writable()?;
        let (a, b) = self.check_range(lblk, len)?;
        let pieces = self.tree.range(a, b);
        let hit = |e: &Extent| e.unwritten && keep(e, a);
        let (Some(first), Some(last)) = (pieces.iter().position(hit), pieces.iter().rposition(hit))
        else {
            return Ok(0);
        };
        let span = &pieces[first..=last];
        let mut converted = 0;
        let new: Vec<Extent> = span
            .iter()
            .map(|e| {
                if hit(e) {
                    converted += u64::from(e.len);
                    Extent {
                        unwritten: false,
                        ..*e
                    }
                } else {
                    *e
                }
            })
            .collect();
        self.replace(span[0].lblk, new[new.len() - 1].end() as u32, &new)?;
        Ok(converted)
    }

    /// Makes the written blocks of a range unwritten (they read as zeroes; nothing is freed).
    /// One tree edit: on ENOSPC nothing has changed.
    pub fn zero(&mut self, lblk: u64, len: u64) -> Result<(), ImageError> {
        self.writable()?;
        let (a, b) = self.check_range(lblk, len)?;
        let pieces = self.tree.range(a, b);
        let (Some(first), Some(last)) = (
            pieces.iter().position(|e| !e.unwritten),
            pieces.iter().rposition(|e| !e.unwritten),
        ) else {
            return Ok(());
        };
        let span = &pieces[first..=last];
        let mut new = Vec::with_capacity(span.len() + 1);
        for e in span {
            if e.unwritten {
                new.push(*e);
                continue;
            }
            // A written extent may be one block longer than an unwritten one can be.
            let mut p = e.lblk;
            while p < e.lblk + e.len {
                let n = (e.lblk + e.len - p).min(extent::MAX_UNWRITTEN_LEN);
                new.push(Extent {
                    lblk: p,
                    len: n,
                    pblk: e.pblk + u64::from(p - e.lblk),
                    unwritten: true,
                });
                p += n;
            }
        }
        self.replace(span[0].lblk, new[new.len() - 1].end() as u32, &new)?;
        Ok(())
    }

    /// Unmaps a range and frees its blocks (allocatable again after the commit). Returns the
    /// physical runs freed, for the caller to deallocate in the backing after committing. On
    /// any error (ENOSPC for a leaf when the punch splits an extent, blocks the bitmaps do not
    /// show in use) nothing has changed.
    pub fn punch(&mut self, lblk: u64, len: u64) -> Result<Vec<(u64, u64)>, ImageError> {
        self.writable()?;
        let (a, b) = self.check_range(lblk, len)?;
        // Every run is checked before the tree changes: freeing must not fail halfway.
        let mut runs: Vec<(u64, u64)> = self
            .tree
            .range(a, b)
            .iter()
            .map(|e| (e.pblk, u64::from(e.len)))
            .collect();
        runs.sort_unstable();
        for w in runs.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(ImageError::Inconsistent(MapError::Inconsistent {
                    block: w[1].0,
                    used: false,
                }));
            }
        }
        for &(s, l) in &runs {
            self.alloc.check_free(s, l)?;
        }
        let removed = self.replace(a, b, &[])?;
        let mut freed = Vec::with_capacity(removed.len());
        for e in removed {
            if let Err(err) = self.alloc.free(e.pblk, u64::from(e.len)) {
                // Checked above; a leak at worst, which `check` reports.
                log::error!("blocks {}+{} not freed: {err}", e.pblk, e.len);
                continue;
            }
            freed.push((e.pblk, u64::from(e.len)));
        }
        Ok(freed)
    }

    /// Log blocks the running transaction would take now (at most), counted as the journal
    /// lays it out ([`crate::jbd2::log_blocks`]).
    pub fn running_log_blocks(&self) -> u32 {
        // Bitmap + descriptor-table block per dirty group is an upper bound worth having cheaply.
        let blocks = self.tree.pending_changes().dirty.len()
            + usize::from(self.inode_dirty)
            + 2 * self.alloc_dirty_groups();
        crate::jbd2::log_blocks(blocks, self.revokes.len())
    }

    fn alloc_dirty_groups(&self) -> usize {
        self.alloc.dirty_count()
    }

    /// Is free space only waiting for a commit (blocks freed by the running or committing
    /// transaction)? An allocation that fails with `NoSpace` then succeeds after a commit.
    pub fn space_pending(&self) -> bool {
        self.alloc.frees_pending()
    }

    /// Is the running transaction so large that it must not grow until a commit has made room
    /// (half the log: the transaction being committed meanwhile fits in the rest)?
    pub fn log_nearly_full(&self) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| self.running_log_blocks() >= j.hard_limit())
    }

    /// Should the caller commit now to keep transactions within a quarter of the log?
    pub fn should_commit(&self) -> bool {
        self.journal
            .as_ref()
            .is_some_and(|j| self.running_log_blocks() >= j.max_transaction())
    }

    /// Builds the running transaction's metadata blocks.
    fn build_transaction(&mut self) -> Transaction {
        let mut tx = Transaction::default();
        let iseed = self.disk_iseed;
        let changes = self.tree.take_changes();
        for (p, node) in self.tree.nodes_in(&changes.dirty) {
            tx.blocks.insert(p, extent::encode_block(&node, iseed));
        }
        if self.inode_dirty || changes.root_dirty {
            self.disk.i_block = extent::encode_root(&self.tree.root_node());
            self.disk.blocks = 8 * (self.tree.data_blocks() + self.tree.tree_blocks());
            let now = now_secs() as u32;
            self.disk.mtime = now;
            self.disk.ctime = now;
            let (blk, mut content) = self.itable.clone();
            let isz = usize::from(self.sb.inode_size);
            let off = ((self.disk_ino - 1) % self.sb.inodes_per_group) as usize * isz;
            content[off..off + isz].copy_from_slice(&self.disk.encode(self.disk_ino, self.seed));
            self.itable = (blk, content.clone());
            tx.blocks.insert(blk, content);
            self.inode_dirty = false;
        }
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

    /// Commits the running transaction; returns whether there was one. Data written before the
    /// call is durable after it when a transaction was written (the caller flushes otherwise).
    pub fn commit(&mut self) -> Result<bool, ImageError> {
        let Some(w) = self.commit_prepare()? else {
            return Ok(false);
        };
        let r = w.write(&*self.io);
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
        self.writable()?;
        let tx = self.build_transaction();
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
    pub fn commit_finish(&mut self, written: io::Result<()>) -> Result<(), ImageError> {
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

    /// Aborts the journal after a failed data write or commit (`data_err=abort`): no further
    /// change is accepted, the running transaction is dropped, and the error is recorded the way
    /// ext4 records it — ERROR_FS and the error fields in the superblock, `s_errno` in the journal
    /// superblock — in place and durably. Committed transactions stay in the log for replay.
    pub fn abort(&mut self, errno: i32, func: &str, block: u64) -> Result<(), ImageError> {
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
    pub fn replace_block_bitmap(&mut self, g: u64, bm: Vec<u8>) -> Result<(), ImageError> {
        self.writable()?;
        if g as usize >= self.alloc.descs.len() || bm.len() != BLOCK_SIZE {
            return Err(crate::ext4::corrupt("repair", format!("bad bitmap for group {g}")).into());
        }
        self.alloc.replace_bitmap(g, bm);
        Ok(())
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.is_some()
    }

    /// Writes every committed block home and empties the log.
    pub fn checkpoint(&mut self) -> Result<(), ImageError> {
        if let Some(j) = self.journal.as_mut() {
            j.checkpoint(&*self.io)?;
        }
        Ok(())
    }

    /// Clean close: commit, checkpoint, exact free counts, needs_recovery cleared.
    pub fn close(mut self) -> Result<(), ImageError> {
        self.close_in_place()
    }

    /// [`Image::close`] for an owner that cannot give the image up; no change is accepted after.
    pub fn close_in_place(&mut self) -> Result<(), ImageError> {
        if self.read_only || self.aborted.is_some() {
            return Ok(());
        }
        self.commit()?;
        self.checkpoint()?;
        self.sb.free_blocks_count = self.alloc.free_blocks();
        self.sb.set_needs_recovery(false);
        self.sb.wtime = now_secs() as u32;
        self.write_superblock()?;
        self.io.flush()?;
        self.aborted = Some("the image is closed".into());
        Ok(())
    }

    fn write_superblock(&self) -> io::Result<()> {
        self.io.write_at(&self.sb.encode(), SUPERBLOCK_OFFSET)
    }

    /// The journal's log → filesystem block map.
    pub fn log_map(&self) -> &LogMap {
        &self.log_map
    }

    /// Reads a metadata block as the image stands after recovery (a read-only open keeps
    /// replayed blocks in memory).
    pub fn meta_block(&self, blk: u64) -> io::Result<Vec<u8>> {
        if let Some(b) = self.overlay.get(&blk) {
            return Ok(b.clone());
        }
        let mut b = vec![0u8; BLOCK_SIZE];
        self.io.read_at(&mut b, blk * BLOCK_SIZE_U64)?;
        Ok(b)
    }

    /// Reads a data block of the disk's backing at physical block `pblk`.
    pub fn read_block(&self, pblk: u64, buf: &mut [u8]) -> io::Result<()> {
        self.io.read_at(buf, pblk * BLOCK_SIZE_U64)
    }
}
