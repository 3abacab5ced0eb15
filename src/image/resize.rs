//! Resizing an image: `/disk` grows (or, with nothing in the cut range, shrinks) and the
//! filesystem grows with it, keeping the space rule — every block of the disk, and the extent
//! tree's worst case, has a free block waiting for it after the resize exactly as before.
//!
//! A grow adds whole block groups past the old end, as `resize2fs` does on a flex_bg,
//! sparse_super2 filesystem. Their bitmaps and inode tables go at the start of the new space;
//! the sparse_super2 backups move to the new last group (and, when the descriptor table needs
//! more blocks than group 1's backup has room for, from group 1 to the first new group). When
//! the descriptor table grows, the blocks right after it in group 0 — bitmaps and inode tables
//! in an extblk layout — are first copied to free blocks of the old filesystem's spare area;
//! anything else there (the journal, a directory, `/disk`'s own blocks) makes the resize refuse
//! before it changes anything. That bounds one image's growth: from a one-group image (64 MiB)
//! to 256 groups (32 GiB), from 10 GiB to about 1.9 TiB.
//!
//! Atomicity: everything past the old end (new groups' metadata, new backups) and the moved
//! copies (in blocks the old filesystem has free) are unreferenced until the resize commits, so
//! they are written in place first, followed by a barrier. Everything else that changes — block
//! 0 with the superblock, descriptor blocks (new ones land on the moved items' old places), the
//! bitmaps of old groups, group 1's backup if it stays, `/disk`'s inode — goes in one jbd2
//! transaction. A crash before its commit block leaves the old image (with unused bytes past
//! its end); after it, replay gives the new one. Checkpoint and replay write block 0 last,
//! after a barrier, so that no crash pairs the new superblock with old descriptors, and old
//! descriptor blocks already replaced still describe the old filesystem (the moved copies are
//! inside it).

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use super::{Image, ImageError};
use crate::ext4::bitmap;
use crate::ext4::group::{GroupDesc, BG_BLOCK_UNINIT, BG_INODE_UNINIT, BG_INODE_ZEROED};
use crate::ext4::group::{DESCS_PER_BLOCK, DESC_SIZE};
use crate::ext4::layout::{tree_reserve, MAX_DISK_SIZE};
use crate::ext4::superblock::{compat, incompat, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
use crate::ext4::{BLOCKS_PER_GROUP, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::jbd2::Transaction;
use crate::mapping::zone::Owner;

const BS: u64 = BLOCK_SIZE_U64;
const BPG: u64 = BLOCKS_PER_GROUP;

#[derive(Debug, Error)]
pub enum ResizeError {
    #[error("new size {0} must be a positive multiple of 512 bytes")]
    Unaligned(u64),
    #[error("new size {0} exceeds the maximum of {MAX_DISK_SIZE} bytes (16 TiB - 4 KiB)")]
    TooLarge(u64),
    #[error("shrinking from {old} to {new} bytes needs --shrink")]
    ShrinkNotAllowed { old: u64, new: u64 },
    #[error("cannot shrink to {new} bytes: the disk holds data at byte {at} (discard it first)")]
    DataInCutRange { new: u64, at: u64 },
    #[error("a served disk only grows ({old} -> {new} bytes): stop the daemon and run `extblk resize --shrink`")]
    OnlineShrink { old: u64, new: u64 },
    #[error("cannot grow this image: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// A group metadata item moved out of the descriptor table's way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Moved {
    /// "block bitmap", "inode bitmap" or "inode table".
    pub what: &'static str,
    pub group: u64,
    pub from: u64,
    pub to: u64,
    pub blocks: u64,
}

/// What a resize does, computed before anything is written.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ResizePlan {
    pub old_size: u64,
    pub new_size: u64,
    pub old_fs_blocks: u64,
    pub new_fs_blocks: u64,
    pub old_groups: u64,
    pub new_groups: u64,
    pub old_gdt_blocks: u64,
    pub new_gdt_blocks: u64,
    /// The sparse_super2 backup groups after the resize.
    pub backup_groups: Vec<u64>,
    pub moved: Vec<Moved>,
    /// Bytes the backing holds after the resize (it only grows).
    pub backing_bytes: u64,
}

impl ResizePlan {
    pub fn fs_grows(&self) -> bool {
        self.new_fs_blocks > self.old_fs_blocks
    }
}

/// The plan's geometry for a given group count, before it is checked to fit.
struct Geometry {
    gdt: u64,
    backups: Vec<u64>,
    moved: Vec<Moved>,
    /// Free blocks of group 0 the larger descriptor table takes.
    gdt_takes_free: Vec<u64>,
    /// Blocks past the old end the new metadata needs (bitmaps, tables, moved items, backups).
    new_meta: u64,
    /// Old backup ranges given back: `(start, len)`.
    freed: Vec<(u64, u64)>,
}

fn backups_of(groups: u64, b: [u32; 2]) -> Vec<u64> {
    let mut v: Vec<u64> = b
        .iter()
        .map(|&g| u64::from(g))
        .filter(|&g| g > 0 && g < groups)
        .collect();
    v.dedup();
    v
}

impl Image {
    /// Plans a resize of `/disk` to `new_size` bytes; nothing is written.
    pub fn resize_plan(
        &self,
        new_size: u64,
        allow_shrink: bool,
    ) -> Result<ResizePlan, ResizeError> {
        if new_size == 0 || new_size % 512 != 0 {
            return Err(ResizeError::Unaligned(new_size));
        }
        if new_size > MAX_DISK_SIZE {
            return Err(ResizeError::TooLarge(new_size));
        }
        let old_size = self.disk_size();
        let sb = &self.pool.sb;
        let old_blocks = sb.blocks_count;
        let old_groups = sb.group_count();
        let old_gdt = old_groups.div_ceil(DESCS_PER_BLOCK);
        let mut plan = ResizePlan {
            old_size,
            new_size,
            old_fs_blocks: old_blocks,
            new_fs_blocks: old_blocks,
            old_groups,
            new_groups: old_groups,
            old_gdt_blocks: old_gdt,
            new_gdt_blocks: old_gdt,
            backup_groups: backups_of(old_groups, sb.backup_bgs),
            moved: vec![],
            backing_bytes: self.pool.io.size().max(old_blocks * BS),
        };
        if new_size < old_size {
            if !allow_shrink {
                return Err(ResizeError::ShrinkNotAllowed {
                    old: old_size,
                    new: new_size,
                });
            }
            let first = new_size.div_ceil(BS);
            let old_end = old_size.div_ceil(BS);
            if first < old_end {
                let (a, b) = (first as u32, old_end as u32);
                if let Some(e) = self.disk.tree.range(a, b).iter().find(|e| e.len > 0) {
                    let at = u64::from(e.lblk.max(a)) * BS;
                    return Err(ResizeError::DataInCutRange { new: new_size, at });
                }
            }
            return Ok(plan);
        }
        let (od, nd) = (old_size.div_ceil(BS), new_size.div_ceil(BS));
        // The space rule after the grow as before it: what the new blocks and the larger tree
        // reserve need, less the free blocks the image already has beyond its own needs (a
        // file image is rounded up to whole groups).
        let tree = &self.disk.tree;
        let owed =
            (od - tree.data_blocks().min(od)) + tree_reserve(od).saturating_sub(tree.tree_blocks());
        let surplus = self.pool.alloc.free_blocks().saturating_sub(owed);
        let need_free =
            ((nd - od) + tree_reserve(nd).saturating_sub(tree_reserve(od))).saturating_sub(surplus);
        if need_free == 0 {
            return Ok(plan);
        }
        self.check_growable()?;
        let itb = self.itable_blocks();
        let mut groups = old_groups;
        let (blocks, geo) = loop {
            let geo = self.geometry(groups, itb)?;
            let freed: u64 = geo.freed.iter().map(|r| r.1).sum();
            let total = (old_blocks + need_free + geo.new_meta + geo.gdt_takes_free.len() as u64)
                .saturating_sub(freed);
            let blocks = total.div_ceil(BPG) * BPG;
            let g2 = blocks.div_ceil(BPG);
            if g2 > groups {
                groups = g2;
                continue;
            }
            break (blocks.max(old_blocks), geo);
        };
        if blocks >= 1 << 32 {
            return Err(ResizeError::TooLarge(new_size));
        }
        plan.new_fs_blocks = blocks;
        plan.new_groups = blocks.div_ceil(BPG);
        plan.new_gdt_blocks = geo.gdt;
        plan.backup_groups = geo.backups;
        plan.moved = geo.moved;
        plan.backing_bytes = plan.backing_bytes.max(blocks * BS);
        Ok(plan)
    }

    /// Resizes `/disk` (and the filesystem under it) as [`Image::resize_plan`] says. Commits
    /// and checkpoints what is running first; on success the image is open on the new
    /// geometry, as if just opened (same session). An error before the resize's commit leaves
    /// the image as it was (and open); after it, the image is aborted in memory and must be
    /// reopened, which finds the resize done.
    pub fn resize(&mut self, new_size: u64, allow_shrink: bool) -> Result<ResizePlan, ResizeError> {
        self.pool.writable()?;
        let plan = self.resize_plan(new_size, allow_shrink)?;
        self.commit()?;
        self.checkpoint()?;
        let io = self.pool.io.clone();
        if plan.fs_grows() {
            io.grow(plan.backing_bytes).map_err(ImageError::Io)?;
        }
        let tx = self.write_resize(&plan)?;
        if tx.log_blocks()
            > self
                .pool
                .journal
                .as_ref()
                .map_or(0, |j| j.max_transaction())
        {
            return Err(ResizeError::Unsupported(format!(
                "the resize's transaction ({} blocks) does not fit in the journal",
                tx.log_blocks()
            )));
        }
        let Some(j) = self.pool.journal.as_mut() else {
            return Err(ImageError::ReadOnly.into());
        };
        let w = j.prepare(&*io, &tx, super::pool::now_secs());
        let w = match w {
            Ok(w) => w,
            Err(e) => {
                self.pool.aborted = Some(format!("resize commit failed: {e}"));
                return Err(ImageError::from(e).into());
            }
        };
        if let Some(w) = w {
            self.pool.alloc.commit_start();
            let r = w.write(&*io);
            self.pool.commit_finish(r)?;
        }
        // From here on the disk holds the new geometry: the in-memory image must follow it.
        let reopened = self.pool.checkpoint().and_then(|()| Image::reopen(io));
        match reopened {
            Ok(img) => {
                *self = img;
                Ok(plan)
            }
            Err(e) => {
                self.pool.aborted = Some(format!("reopen after resize failed: {e}"));
                Err(e.into())
            }
        }
    }

    fn itable_blocks(&self) -> u64 {
        let sb = &self.pool.sb;
        (u64::from(sb.inodes_per_group) * u64::from(sb.inode_size)).div_ceil(BS)
    }

    /// The layouts a grow knows how to extend: extblk's own (and mke2fs's with the same
    /// features).
    fn check_growable(&self) -> Result<(), ResizeError> {
        let sb = &self.pool.sb;
        let no = |m: &str| Err(ResizeError::Unsupported(m.into()));
        if sb.feature_compat & compat::SPARSE_SUPER2 == 0 {
            return no("it has backup superblocks in every sparse group (no sparse_super2)");
        }
        if sb.feature_compat & compat::RESIZE_INODE != 0 || sb.reserved_gdt_blocks != 0 {
            return no("it has a resize inode (reserved GDT blocks)");
        }
        if sb.feature_incompat & incompat::META_BG != 0 {
            return no("it uses meta_bg");
        }
        if sb.feature_incompat & incompat::FLEX_BG == 0 {
            return no("it lacks flex_bg (metadata must be free to live outside its group)");
        }
        if sb.feature_incompat & incompat::BIT64 == 0 || usize::from(sb.desc_size) != DESC_SIZE {
            return no("it lacks 64-byte group descriptors (64bit)");
        }
        if sb.first_data_block != 0 || u64::from(sb.blocks_per_group) != BPG {
            return no("its block groups are not 32768 blocks of 4 KiB");
        }
        Ok(())
    }

    /// Geometry with `groups` groups: descriptor table, backups, what must move, what it costs.
    fn geometry(&self, groups: u64, itb: u64) -> Result<Geometry, ResizeError> {
        let sb = &self.pool.sb;
        let alloc = &self.pool.alloc;
        let old_groups = sb.group_count();
        let old_gdt = old_groups.div_ceil(DESCS_PER_BLOCK);
        let gdt = groups.div_ceil(DESCS_PER_BLOCK).max(old_gdt);
        let old_backups = backups_of(old_groups, sb.backup_bgs);
        // Group 1 keeps its backup while it is an old group with room for the table; a new
        // group 1 gets one; otherwise the first new group takes it (if it is not the last).
        let b0 = if old_groups <= 1 || (old_backups.contains(&1) && gdt == old_gdt) {
            Some(1)
        } else {
            Some(old_groups)
        }
        .filter(|&b| b < groups.saturating_sub(1) || (groups == 2 && b == 1));
        let mut backups: Vec<u64> = b0.into_iter().collect();
        if groups >= 3 && !backups.contains(&(groups - 1)) {
            backups.push(groups - 1);
        }
        let freed = old_backups
            .iter()
            .filter(|g| !backups.contains(g))
            .map(|&g| (g * BPG, 1 + old_gdt))
            .collect();
        let mut moved: Vec<Moved> = Vec::new();
        let mut gdt_takes_free = Vec::new();
        for blk in 1 + old_gdt..1 + gdt {
            if moved
                .iter()
                .any(|m| blk >= m.from && blk < m.from + m.blocks)
            {
                continue;
            }
            let owner = alloc.zone().owner(blk);
            let item = match owner {
                Some(Owner::BlockBitmap { group }) => ("block bitmap", group, blk, 1),
                Some(Owner::InodeBitmap { group }) => ("inode bitmap", group, blk, 1),
                Some(Owner::InodeTable { group }) => {
                    let d = &alloc.descs[group as usize];
                    ("inode table", group, d.inode_table, itb)
                }
                None if !alloc.is_used(blk) => {
                    gdt_takes_free.push(blk);
                    continue;
                }
                None => {
                    return Err(ResizeError::Unsupported(format!(
                        "the group descriptor table must grow to {gdt} blocks, and block {blk} \
                         after it holds /disk's data"
                    )))
                }
                Some(o) => {
                    return Err(ResizeError::Unsupported(format!(
                        "the group descriptor table must grow to {gdt} blocks, and block {blk} \
                         after it is {o}, which cannot move; this image grows to {} groups \
                         ({} GiB of filesystem) at most (for more, `extblk convert` it into a \
                         new image created at the size wanted)",
                        (blk - 1) * DESCS_PER_BLOCK,
                        ((blk - 1) * DESCS_PER_BLOCK * BPG * BS) >> 30
                    )))
                }
            };
            moved.push(Moved {
                what: item.0,
                group: item.1,
                from: item.2,
                to: 0,
                blocks: item.3,
            });
        }
        let new_groups = groups - old_groups;
        let mut new_meta = new_groups * (2 + itb) + moved.iter().map(|m| m.blocks).sum::<u64>();
        new_meta += backups.iter().filter(|&&g| g >= old_groups).count() as u64 * (1 + gdt);
        Ok(Geometry {
            gdt,
            backups,
            moved,
            gdt_takes_free,
            new_meta,
            freed,
        })
    }

    /// Writes everything past the old end and returns the transaction for everything inside
    /// it. Nothing in memory changes.
    fn write_resize(&self, plan: &ResizePlan) -> Result<Transaction, ResizeError> {
        let io = &*self.pool.io;
        let seed = self.pool.seed;
        let alloc = &self.pool.alloc;
        let old_blocks = plan.old_fs_blocks;
        let new_blocks = plan.new_fs_blocks;
        let itb = self.itable_blocks();
        let mut tx = Transaction::default();
        let mut sb = self.pool.sb.clone();
        let mut descs = alloc.descs.clone();
        // Bitmaps of the groups that change, final contents.
        let mut bitmaps: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let geo = if plan.fs_grows() {
            Some(self.geometry(plan.new_groups, itb)?)
        } else {
            None
        };
        let mut moved = plan.moved.clone();
        if let Some(geo) = &geo {
            let bitmap_of = |bitmaps: &mut BTreeMap<u64, Vec<u8>>, g: u64| {
                bitmaps
                    .entry(g)
                    .or_insert_with(|| {
                        if g < plan.old_groups {
                            alloc.bitmap(g)
                        } else {
                            vec![0u8; BLOCK_SIZE]
                        }
                    })
                    .clone()
            };
            let mark = |bitmaps: &mut BTreeMap<u64, Vec<u8>>, s: u64, l: u64, used: bool| {
                for b in s..s + l {
                    let g = b / BPG;
                    let mut bm = bitmap_of(bitmaps, g);
                    let i = (b % BPG) as usize;
                    if used {
                        bitmap::set(&mut bm, i);
                    } else {
                        bitmap::clear(&mut bm, i);
                    }
                    bitmaps.insert(g, bm);
                }
            };
            // Padding of the old last group and of every new group: blocks past the end.
            let last_old = plan.old_groups - 1;
            mark(
                &mut bitmaps,
                old_blocks,
                ((last_old + 1) * BPG).min(new_blocks) - old_blocks,
                false,
            );
            for g in plan.old_groups..plan.new_groups {
                let n = bitmap::blocks_in_group(new_blocks, g);
                let mut bm = vec![0u8; BLOCK_SIZE];
                bitmap::set_range(&mut bm, n as usize, BPG as usize);
                bitmaps.insert(g, bm);
            }
            let region = 1 + geo.gdt;
            for &g in geo.backups.iter().filter(|&&g| g >= plan.old_groups) {
                mark(&mut bitmaps, g * BPG, region, true);
            }
            for &(s, l) in &geo.freed {
                mark(&mut bitmaps, s, l, false);
            }
            for &b in &geo.gdt_takes_free {
                mark(&mut bitmaps, b, 1, true);
            }
            // The new space, from the old end, skipping the new backups.
            let mut cursor = old_blocks;
            let mut place = |n: u64| -> u64 {
                for &g in &geo.backups {
                    let s = g * BPG;
                    if cursor < s + region && cursor + n > s {
                        cursor = s + region;
                    }
                }
                let at = cursor;
                cursor += n;
                at
            };
            for _ in plan.old_groups..plan.new_groups {
                let d = GroupDesc {
                    block_bitmap: place(1),
                    inode_bitmap: place(1),
                    inode_table: place(itb),
                    free_blocks: 0,
                    free_inodes: sb.inodes_per_group,
                    used_dirs: 0,
                    flags: BG_INODE_UNINIT | BG_INODE_ZEROED,
                    block_bitmap_csum: 0,
                    inode_bitmap_csum: 0,
                    itable_unused: sb.inodes_per_group,
                };
                for (s, l) in [
                    (d.block_bitmap, 1),
                    (d.inode_bitmap, 1),
                    (d.inode_table, itb),
                ] {
                    mark(&mut bitmaps, s, l, true);
                    io.punch(s * BS, l * BS).map_err(ImageError::Io)?;
                }
                descs.push(d);
            }
            let mut finder = alloc.clone();
            let spare = alloc.data_start() + self.disk.blocks;
            for m in &mut moved {
                // An inode table reaching past the new table's end leaves its tail free.
                let keep = 1 + geo.gdt;
                if m.from + m.blocks > keep {
                    let s = m.from.max(keep);
                    mark(&mut bitmaps, s, m.from + m.blocks - s, false);
                }
                // Inside the old filesystem, in its spare area: a crash while the resize's
                // transaction is checkpointed may find the new descriptor blocks home under
                // the old superblock, and they must then describe a valid old filesystem.
                let (to, got) = finder.alloc(spare, m.blocks).map_err(|_| {
                    ResizeError::Unsupported(format!(
                        "no free room to move the {} of group {}",
                        m.what, m.group
                    ))
                })?;
                if got != m.blocks {
                    return Err(ResizeError::Unsupported(format!(
                        "no {} free blocks in one run for the {} of group {}",
                        m.blocks, m.what, m.group
                    )));
                }
                m.to = to;
                mark(&mut bitmaps, m.to, m.blocks, true);
                let mut buf = vec![0u8; (m.blocks * BS) as usize];
                io.read_at(&mut buf, m.from * BS).map_err(ImageError::Io)?;
                io.write_at(&buf, m.to * BS).map_err(ImageError::Io)?;
                let d = &mut descs[m.group as usize];
                match m.what {
                    "block bitmap" => d.block_bitmap = m.to,
                    "inode bitmap" => d.inode_bitmap = m.to,
                    _ => d.inode_table = m.to,
                }
            }
            if cursor > new_blocks {
                return Err(ResizeError::Unsupported(format!(
                    "internal sizing error: metadata up to block {cursor}, {new_blocks} blocks"
                )));
            }
            sb.blocks_count = new_blocks;
            let added = (plan.new_groups - plan.old_groups) * u64::from(sb.inodes_per_group);
            sb.inodes_count += added as u32;
            sb.free_inodes_count += added as u32;
            let mut bgs = [0u32; 2];
            for (i, g) in geo.backups.iter().enumerate().take(2) {
                bgs[i] = *g as u32;
            }
            sb.backup_bgs = bgs;
        }
        // Final descriptors: counts and checksums of every changed bitmap.
        for (&g, bm) in &bitmaps {
            let n = bitmap::blocks_in_group(sb.blocks_count, g) as usize;
            let d = &mut descs[g as usize];
            d.free_blocks = bitmap::count_free(bm, n) as u32;
            d.block_bitmap_csum = bitmap::block_bitmap_csum(seed, bm);
            if g < plan.old_groups {
                d.flags &= !BG_BLOCK_UNINIT;
            }
        }
        sb.free_blocks_count = descs.iter().map(|d| u64::from(d.free_blocks)).sum();
        // Bitmaps home: in place past the old end, in the transaction inside it.
        let put = |tx: &mut Transaction, blk: u64, content: Vec<u8>| -> Result<(), ImageError> {
            if blk >= old_blocks {
                io.write_at(&content, blk * BS)?;
            } else {
                tx.blocks.insert(blk, content);
            }
            Ok(())
        };
        for (&g, bm) in &bitmaps {
            put(&mut tx, descs[g as usize].block_bitmap, bm.clone())?;
        }
        // /disk's inode with its new size, in its inode table (maybe moved).
        let mut inode = self.disk.inode.clone();
        inode.size = plan.new_size;
        let (blk, mut content) = self.disk.itable.clone();
        let isz = usize::from(sb.inode_size);
        let off = ((self.disk.ino - 1) % sb.inodes_per_group) as usize * isz;
        content[off..off + isz].copy_from_slice(&inode.encode(self.disk.ino, seed));
        let home = moved
            .iter()
            .find(|m| m.what == "inode table" && blk >= m.from && blk < m.from + m.blocks)
            .map_or(blk, |m| m.to + (blk - m.from));
        put(&mut tx, home, content)?;
        // Stale bytes past the old end of a partial last block (a shrink left them) must not
        // reappear as the disk's contents.
        if plan.old_size % BS != 0 && plan.new_size > plan.old_size {
            let last = plan.old_size / BS;
            if let Some(p) = self.disk_block_written(last) {
                let mut b = vec![0u8; BLOCK_SIZE];
                io.read_at(&mut b, p * BS).map_err(ImageError::Io)?;
                b[(plan.old_size % BS) as usize..].fill(0);
                io.write_at(&b, p * BS).map_err(ImageError::Io)?;
            }
        }
        // Descriptor table: the changed blocks, and every new one (over moved items' old places).
        let gdt = plan.new_gdt_blocks;
        let mut table = vec![0u8; (gdt * BS) as usize];
        for (g, d) in descs.iter().enumerate() {
            table[g * DESC_SIZE..(g + 1) * DESC_SIZE].copy_from_slice(&d.encode(g as u64, seed));
        }
        let mut changed: BTreeSet<u64> = (plan.old_gdt_blocks..gdt).collect();
        let old_table = self.old_gdt_bytes();
        for k in 0..plan.old_gdt_blocks {
            let r = (k * BS) as usize..((k + 1) * BS) as usize;
            if table[r.clone()] != old_table[r] {
                changed.insert(k);
            }
        }
        for &k in &changed {
            let r = (k * BS) as usize..((k + 1) * BS) as usize;
            tx.blocks.insert(1 + k, table[r].to_vec());
        }
        // Superblock in block 0 (the journal logs whole blocks), and the backups.
        let mut block0 = vec![0u8; BLOCK_SIZE];
        io.read_at(&mut block0, 0).map_err(ImageError::Io)?;
        let so = SUPERBLOCK_OFFSET as usize;
        block0[so..so + SUPERBLOCK_SIZE].copy_from_slice(&sb.encode());
        tx.blocks.insert(0, block0);
        if let Some(geo) = &geo {
            for &g in &geo.backups {
                let mut copy = sb.clone();
                copy.block_group_nr = g as u16;
                let mut blk = vec![0u8; BLOCK_SIZE];
                blk[..SUPERBLOCK_SIZE].copy_from_slice(&copy.encode());
                put(&mut tx, g * BPG, blk)?;
                for k in 0..gdt {
                    let r = (k * BS) as usize..((k + 1) * BS) as usize;
                    put(&mut tx, g * BPG + 1 + k, table[r].to_vec())?;
                }
            }
        }
        io.flush().map_err(ImageError::Io)?;
        Ok(tx)
    }

    /// The physical block of a written (not unwritten) disk block.
    fn disk_block_written(&self, lblk: u64) -> Option<u64> {
        match self.disk.tree.lookup(lblk as u32) {
            crate::mapping::tree::Lookup::Mapped(e) if !e.unwritten => Some(e.pblk),
            _ => None,
        }
    }

    /// The descriptor table as it stands, encoded.
    fn old_gdt_bytes(&self) -> Vec<u8> {
        let descs = &self.pool.alloc.descs;
        let blocks = (descs.len() as u64).div_ceil(DESCS_PER_BLOCK);
        let mut t = vec![0u8; (blocks * BS) as usize];
        for (g, d) in descs.iter().enumerate() {
            t[g * DESC_SIZE..(g + 1) * DESC_SIZE]
                .copy_from_slice(&d.encode(g as u64, self.pool.seed));
        }
        t
    }
}
