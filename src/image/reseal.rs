//! Recomputes every metadata checksum of an image whose bytes were edited in place, so that
//! tests and fuzzing reach the checks behind the checksums: a checksum proves that a writer
//! meant the bytes, not that they make sense, and `open` must refuse nonsense that carries a
//! valid checksum just as firmly.
//!
//! Best effort on any bytes, never a panic: structures that cannot be followed (a superblock
//! that does not decode, a tree pointer past the end) are skipped. The order is the format's
//! (§3.3 of the reference): superblock, group descriptors, inodes, extent and directory blocks
//! (their seeds come from the inodes), bitmap checksums into the descriptors, then the journal:
//! its superblock, descriptor tags over their logged copies, descriptor/revoke tails, commits.

use std::collections::BTreeSet;

use crate::ext4::extent::{self, Entries, Extent, Node};
use crate::ext4::group::{GroupDesc, BG_INODE_UNINIT, DESCS_PER_BLOCK, DESC_SIZE};
use crate::ext4::inode::{Inode, EXTENTS_FL};
use crate::ext4::superblock::{Superblock, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
use crate::ext4::{bitmap, dir, inode_seed, BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::jbd2::format::{self as jformat, JournalSuperblock, BT_DESCRIPTOR};
use crate::jbd2::LogMap;

/// Directory blocks resealed per directory at most (extblk's have one; mke2fs's lost+found 4).
const MAX_DIR_BLOCKS: u32 = 64;

fn block(img: &[u8], blk: u64) -> Option<&[u8]> {
    let at = usize::try_from(blk.checked_mul(BLOCK_SIZE_U64)?).ok()?;
    img.get(at..at.checked_add(BLOCK_SIZE)?)
}

fn block_mut(img: &mut [u8], blk: u64) -> Option<&mut [u8]> {
    let at = usize::try_from(blk.checked_mul(BLOCK_SIZE_U64)?).ok()?;
    img.get_mut(at..at.checked_add(BLOCK_SIZE)?)
}

/// Reseals every checksum of the image in `img` (the whole backing's bytes).
pub fn reseal(img: &mut [u8]) {
    let sb_at = SUPERBLOCK_OFFSET as usize;
    let Some(raw) = img.get_mut(sb_at..sb_at + SUPERBLOCK_SIZE) else {
        return;
    };
    Superblock::reseal(raw);
    let Ok(sb) = Superblock::decode(raw) else {
        return;
    };
    let seed = sb.csum_seed();
    let groups = sb.group_count();
    let Some(descs) = reseal_descs(img, groups, seed) else {
        return;
    };
    let isz = usize::from(sb.inode_size);
    let ipg = sb.inodes_per_group;
    let itable_blocks = (ipg as usize * isz).div_ceil(BLOCK_SIZE) as u64;
    // Inodes first: their generation seeds the checksums of their tree and directory blocks.
    let mut files: Vec<(u32, Inode)> = Vec::new();
    for (g, d) in descs.iter().enumerate() {
        for k in 0..itable_blocks {
            let Some(b) = block_mut(img, d.inode_table.saturating_add(k)) else {
                continue;
            };
            for (i, raw) in b.chunks_mut(isz).enumerate() {
                let idx = k as usize * (BLOCK_SIZE / isz) + i;
                if idx >= ipg as usize || raw.iter().all(|&x| x == 0) {
                    continue;
                }
                let ino = (g as u64 * u64::from(ipg) + idx as u64 + 1) as u32;
                Inode::reseal(raw, ino, seed);
                if let Ok(inode) = Inode::decode(raw, ino, seed) {
                    files.push((ino, inode));
                }
            }
        }
    }
    for (ino, inode) in &files {
        if inode.flags & EXTENTS_FL == 0 {
            continue;
        }
        let iseed = inode_seed(seed, *ino, inode.generation);
        let extents = reseal_tree(img, &inode.i_block, iseed);
        if inode.is_dir() {
            for e in extents {
                for k in 0..e.len.min(MAX_DIR_BLOCKS) {
                    if let Some(b) = block_mut(img, e.pblk.saturating_add(u64::from(k))) {
                        dir::reseal_block(b, iseed);
                    }
                }
            }
        }
    }
    // Bitmap checksums live in the descriptors, whose own checksums follow.
    let mut descs = descs;
    for (g, d) in descs.iter_mut().enumerate() {
        if let Some(bb) = block(img, d.block_bitmap) {
            d.block_bitmap_csum = bitmap::block_bitmap_csum(seed, bb);
        }
        if d.flags & BG_INODE_UNINIT == 0 {
            if let Some(ib) = block(img, d.inode_bitmap) {
                d.inode_bitmap_csum = bitmap::inode_bitmap_csum(seed, ib, ipg);
            }
        }
        let at = BLOCK_SIZE + g * DESC_SIZE;
        if let Some(raw) = img.get_mut(at..at + DESC_SIZE) {
            raw.copy_from_slice(&d.encode(g as u64, seed));
        }
    }
    if let Some((_, j)) = files.iter().find(|(ino, _)| *ino == sb.journal_inum) {
        let iseed = inode_seed(seed, sb.journal_inum, j.generation);
        reseal_journal(img, &j.i_block, iseed);
    }
}

/// Reseals every group descriptor; returns them decoded.
fn reseal_descs(img: &mut [u8], groups: u64, seed: u32) -> Option<Vec<GroupDesc>> {
    let mut descs = Vec::with_capacity(groups as usize);
    for g in 0..groups {
        let blk = 1 + g / DESCS_PER_BLOCK;
        let o = (g % DESCS_PER_BLOCK) as usize * DESC_SIZE;
        let raw = &mut block_mut(img, blk)?[o..o + DESC_SIZE];
        GroupDesc::reseal(raw, g, seed);
        descs.push(GroupDesc::decode(raw, g, seed).ok()?);
    }
    Some(descs)
}

/// Reseals the tree blocks under the root in `i_block`; returns the leaf extents found.
fn reseal_tree(img: &mut [u8], i_block: &[u8; 60], iseed: u32) -> Vec<Extent> {
    let mut extents = Vec::new();
    let Ok(root) = extent::decode_root(i_block) else {
        return extents;
    };
    let mut seen = BTreeSet::new();
    let mut stack: Vec<Node> = vec![root];
    while let Some(node) = stack.pop() {
        match node.entries {
            Entries::Leaf(v) => extents.extend(v),
            Entries::Index(v) => {
                for ix in v {
                    if !seen.insert(ix.child) || seen.len() > 4096 {
                        continue;
                    }
                    let Some(b) = block_mut(img, ix.child) else {
                        continue;
                    };
                    if extent::reseal_block(b, iseed) {
                        if let Ok(child) = extent::decode_block(b, iseed, ix.child) {
                            stack.push(child);
                        }
                    }
                }
            }
        }
    }
    extents
}

/// Reseals the journal superblock and every log block that looks like a journal structure,
/// descriptor tags over the copies that follow them.
fn reseal_journal(img: &mut [u8], i_block: &[u8; 60], iseed: u32) {
    let map = LogMap::new(reseal_tree(img, i_block, iseed));
    let Some(jsb_blk) = map.try_fs_block(0) else {
        return;
    };
    let Some(raw) = block_mut(img, jsb_blk) else {
        return;
    };
    let jseed_guess = jformat::journal_seed(&[0; 16]);
    jformat::reseal(raw, jseed_guess);
    let Ok(jsb) = JournalSuperblock::decode(raw) else {
        return;
    };
    let jseed = jformat::journal_seed(&jsb.uuid);
    let (first, maxlen) = (jsb.first, jsb.maxlen);
    let wrap = |p: u32| if p >= maxlen { first + (p - maxlen) } else { p };
    for pos in first..maxlen {
        let Some(blk) = map.try_fs_block(pos) else {
            continue;
        };
        // Most log blocks are logged copies or unused: look before copying.
        if block(img, blk).and_then(jformat::header).is_none() {
            continue;
        }
        let Some(mut b) = block(img, blk).map(<[u8]>::to_vec) else {
            continue;
        };
        let Some((kind, tid)) = jformat::reseal(&mut b, jseed) else {
            continue;
        };
        if kind == BT_DESCRIPTOR {
            let copies: &[u8] = img;
            let mut data = |i: usize| {
                let p = wrap(pos.checked_add(1 + i as u32)?);
                block(copies, map.try_fs_block(p)?).map(<[u8]>::to_vec)
            };
            jformat::reseal_tags(&mut b, tid, jseed, &mut data);
        }
        if let Some(out) = block_mut(img, blk) {
            out.copy_from_slice(&b);
        }
    }
}
