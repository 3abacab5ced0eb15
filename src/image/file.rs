//! A file of the image: `/disk`'s inode and extent tree. Every change goes through a
//! [`Handle`] on the pool (its blocks, its frees, its revokes) and joins the running
//! transaction; the file keeps which of its own blocks (tree nodes, its inode) the
//! transaction changed, and hands them to the pool's commit ([`DiskFile::take_changes`]).
//!
//! Invariants: every edit is all-or-nothing — on any error (ENOSPC for a data or tree block,
//! an inconsistency) the tree, the allocator and the transaction are as they were; a range
//! outside the file's blocks is refused before anything is looked at.

use super::pool::{now_secs, Handle};
use super::{ImageError, Run, RunKind};
use crate::ext4::extent::{self, Extent};
use crate::ext4::inode::Inode;
use crate::ext4::superblock::Superblock;
use crate::mapping::tree::{ExtentTree, Lookup};
use crate::mapping::MapError;

pub(super) struct DiskFile {
    pub(super) ino: u32,
    pub(super) inode: Inode,
    /// The inode's checksum seed (tree blocks are checksummed with it).
    pub(super) iseed: u32,
    /// The inode-table block holding the inode, as last written.
    pub(super) itable: (u64, Vec<u8>),
    pub(super) tree: ExtentTree,
    /// The file's size in blocks, rounded up: the range its operations accept.
    pub(super) blocks: u64,
    /// The running transaction changed the inode (its root node, its block count).
    pub(super) inode_dirty: bool,
}

impl DiskFile {
    /// Blocks of this file the running transaction has changed (for the log estimate).
    pub(super) fn pending_blocks(&self) -> usize {
        self.tree.pending_changes().dirty.len() + usize::from(self.inode_dirty)
    }

    /// The running transaction's blocks of this file — changed tree nodes, and the
    /// inode-table block if the inode changed — encoded; the file's record of them is reset.
    pub(super) fn take_changes(&mut self, sb: &Superblock, seed: u32) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let changes = self.tree.take_changes();
        for (p, node) in self.tree.nodes_in(&changes.dirty) {
            out.push((p, extent::encode_block(&node, self.iseed)));
        }
        if self.inode_dirty || changes.root_dirty {
            self.inode.i_block = extent::encode_root(&self.tree.root_node());
            self.inode.blocks = crate::ext4::inode::SECTORS_PER_BLOCK
                * (self.tree.data_blocks() + self.tree.tree_blocks());
            let now = now_secs() as u32;
            self.inode.mtime = now;
            self.inode.ctime = now;
            let (blk, mut content) = self.itable.clone();
            let isz = usize::from(sb.inode_size);
            let off = ((self.ino - 1) % sb.inodes_per_group) as usize * isz;
            content[off..off + isz].copy_from_slice(&self.inode.encode(self.ino, seed));
            self.itable = (blk, content.clone());
            out.push((blk, content));
            self.inode_dirty = false;
        }
        out
    }

    /// The whole disk as data / unwritten / hole runs.
    pub(super) fn runs(&self) -> Vec<Run> {
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
            if u64::from(e.lblk) >= self.blocks {
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
            let len = e.end().min(self.blocks) - u64::from(e.lblk);
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
        if pos < self.blocks {
            push(
                &mut out,
                Run {
                    lblk: pos,
                    len: self.blocks - pos,
                    kind: RunKind::Hole,
                    pblk: None,
                },
            );
        }
        out
    }

    pub(super) fn check_range(&self, lblk: u64, len: u64) -> Result<(u32, u32), ImageError> {
        match lblk.checked_add(len) {
            Some(end) if end <= self.blocks && len > 0 => Ok((lblk as u32, end as u32)),
            _ => Err(ImageError::OutOfRange(lblk, len)),
        }
    }

    pub(super) fn replace(
        &mut self,
        h: &mut Handle,
        a: u32,
        b: u32,
        new: &[Extent],
    ) -> Result<Vec<Extent>, ImageError> {
        let mut na = h.nodes();
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
    pub(super) fn allocate(
        &mut self,
        h: &mut Handle,
        lblk: u64,
        len: u64,
    ) -> Result<Vec<Extent>, ImageError> {
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
        let sp = h.savepoint();
        match self.allocate_holes(h, &holes) {
            Ok(new) => {
                h.release(sp);
                Ok(new)
            }
            Err(e) => {
                h.rollback(sp);
                Err(e)
            }
        }
    }

    fn allocate_holes(
        &mut self,
        h: &mut Handle,
        holes: &[(u32, u32)],
    ) -> Result<Vec<Extent>, ImageError> {
        let mut new = Vec::new();
        for &(ha, hb) in holes {
            let mut p = ha;
            while p < hb {
                let want = u64::from(hb - p).min(u64::from(extent::MAX_UNWRITTEN_LEN));
                let (pblk, got) = h.alloc_data(u64::from(p), want)?;
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
        self.replace(h, lo, hi, &all)?;
        Ok(new)
    }

    /// Marks the unwritten blocks of `[lblk, lblk + len)` written. Holes stay holes: a range
    /// punched after its data was written is not brought back.
    pub(super) fn convert(
        &mut self,
        h: &mut Handle,
        lblk: u64,
        len: u64,
    ) -> Result<u64, ImageError> {
        self.convert_where(h, lblk, len, |_, _| true)
            .map(|(c, _)| c)
    }

    /// Converts only the unwritten blocks of `[lblk, lblk + len)` that are still at `pblk…`: the
    /// blocks one write allocated and filled. If a discard removed them meanwhile, or the range
    /// was reallocated elsewhere, nothing is converted — a conversion never brings back a freed
    /// extent nor exposes blocks another write has not filled yet.
    pub(super) fn convert_exact(
        &mut self,
        h: &mut Handle,
        lblk: u64,
        len: u64,
        pblk: u64,
    ) -> Result<u64, ImageError> {
        self.convert_exact_runs(h, lblk, len, pblk)
            .map(|runs| runs.iter().map(|e| u64::from(e.len)).sum())
    }

    /// [`DiskFile::convert_exact`], returning the extents it converted (as they are now
    /// written): what the restart log records.
    pub(super) fn convert_exact_runs(
        &mut self,
        h: &mut Handle,
        lblk: u64,
        len: u64,
        pblk: u64,
    ) -> Result<Vec<Extent>, ImageError> {
        self.convert_where(h, lblk, len, |e, a| e.pblk == pblk + u64::from(e.lblk - a))
            .map(|(_, runs)| runs)
    }

    /// Marks written the unwritten extents of a range that `keep(extent, range start)` accepts.
    /// One tree edit: on ENOSPC (a split needing a leaf) nothing has changed. Returns the
    /// blocks converted and the converted extents.
    fn convert_where(
        &mut self,
        h: &mut Handle,
        lblk: u64,
        len: u64,
        keep: impl Fn(&Extent, u32) -> bool,
    ) -> Result<(u64, Vec<Extent>), ImageError> {
        let (a, b) = self.check_range(lblk, len)?;
        let pieces = self.tree.range(a, b);
        let hit = |e: &Extent| e.unwritten && keep(e, a);
        let (Some(first), Some(last)) = (pieces.iter().position(hit), pieces.iter().rposition(hit))
        else {
            return Ok((0, Vec::new()));
        };
        let span = &pieces[first..=last];
        let mut converted = 0;
        let mut runs = Vec::new();
        let new: Vec<Extent> = span
            .iter()
            .map(|e| {
                if hit(e) {
                    converted += u64::from(e.len);
                    let w = Extent {
                        unwritten: false,
                        ..*e
                    };
                    runs.push(w);
                    w
                } else {
                    *e
                }
            })
            .collect();
        self.replace(h, span[0].lblk, new[new.len() - 1].end() as u32, &new)?;
        Ok((converted, runs))
    }

    /// The restart log's "written" record, applied again: `[lblk, lblk + len)` reads the data
    /// at `pblk…`. Unwritten extents still there are converted (as `convert_exact`); holes
    /// (their allocation was in a transaction the crash lost) are mapped written at the blocks
    /// `claims` holds for them; anything else — a block mapped elsewhere, already written — is
    /// left alone, so applying a record twice changes nothing. One tree edit. Returns the
    /// blocks converted, mapped and left alone.
    pub(super) fn map_written(
        &mut self,
        h: &mut Handle,
        lblk: u64,
        len: u64,
        pblk: u64,
        claims: &mut super::reapply::Claims,
    ) -> Result<(u64, u64, u64), ImageError> {
        let (a, b) = self.check_range(lblk, len)?;
        let target = |l: u32| pblk + u64::from(l - a);
        let mut new = Vec::new();
        let (mut converted, mut mapped, mut already) = (0u64, 0u64, 0u64);
        let mut pos = a;
        let mut hole = |new: &mut Vec<Extent>, from: u32, to: u32, mapped: &mut u64| {
            for (s, l) in claims.take(target(from), u64::from(to - from)) {
                new.push(Extent {
                    lblk: a + (s - pblk) as u32,
                    len: l as u32,
                    pblk: s,
                    unwritten: false,
                });
                *mapped += l;
            }
        };
        for e in self.tree.range(a, b) {
            if e.lblk > pos {
                hole(&mut new, pos, e.lblk, &mut mapped);
            }
            if e.unwritten && e.pblk == target(e.lblk) {
                converted += u64::from(e.len);
                new.push(Extent {
                    unwritten: false,
                    ..e
                });
            } else {
                if !e.unwritten && e.pblk == target(e.lblk) {
                    already += u64::from(e.len);
                }
                new.push(e);
            }
            pos = e.lblk + e.len;
        }
        if pos < b {
            hole(&mut new, pos, b, &mut mapped);
        }
        if converted + mapped > 0 {
            self.replace(h, a, b, &new)?;
        }
        Ok((
            converted,
            mapped,
            u64::from(b - a) - converted - mapped - already,
        ))
    }

    /// Makes the written blocks of a range unwritten (they read as zeroes; nothing is freed).
    /// One tree edit: on ENOSPC nothing has changed.
    pub(super) fn zero(&mut self, h: &mut Handle, lblk: u64, len: u64) -> Result<(), ImageError> {
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
        self.replace(h, span[0].lblk, new[new.len() - 1].end() as u32, &new)?;
        Ok(())
    }

    /// Unmaps a range and frees its blocks (allocatable again after the commit). Returns the
    /// physical runs freed, for the caller to deallocate in the backing after committing. On
    /// any error (ENOSPC for a leaf when the punch splits an extent, blocks the bitmaps do not
    /// show in use) nothing has changed.
    pub(super) fn punch(
        &mut self,
        h: &mut Handle,
        lblk: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, ImageError> {
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
            h.check_free(s, l)?;
        }
        let removed = self.replace(h, a, b, &[])?;
        let mut freed = Vec::with_capacity(removed.len());
        for e in removed {
            if let Err(err) = h.free(e.pblk, u64::from(e.len)) {
                // Checked above; a leak at worst, which `check` reports.
                log::error!("blocks {}+{} not freed: {err}", e.pblk, e.len);
                continue;
            }
            freed.push((e.pblk, u64::from(e.len)));
        }
        Ok(freed)
    }
}
