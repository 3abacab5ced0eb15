//! `extblk check`: every cross-structure invariant of an image, as a list of problems.
//!
//! Structures are decoded (with their checksums) by `Image::open`; an image whose journal holds
//! committed transactions is checked as replay would leave it, without writing. On top of that
//! this module checks what no single structure can: block ownership (no double use, nothing out
//! of range, bitmaps equal to what is really used, padding), counters, `/disk`'s size and
//! `i_blocks`, every inode and directory, and the journal's state.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::image::{pending_at, RestartLogAt};
use crate::ext4::dir;
use crate::ext4::extent;
use crate::ext4::group::{GroupDesc, BG_BLOCK_UNINIT, BG_INODE_UNINIT, DESCS_PER_BLOCK, DESC_SIZE};
use crate::ext4::inode::{Inode, SECTORS_PER_BLOCK};
use crate::ext4::superblock::Superblock;
use crate::ext4::{bitmap, inode_seed, FormatError, BLOCKS_PER_GROUP, BLOCK_SIZE};
use crate::image::{Image, ImageError, OpenOptions};
use crate::io::{BlockIo, FileIo};
use crate::jbd2::format::SUPERBLOCK_SIZE as JOURNAL_SUPERBLOCK_SIZE;
use crate::restart_log::Pending;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub image: String,
    pub clean: bool,
    pub problems: Vec<String>,
    /// Committed transactions the journal held (checked as replayed).
    pub journal_transactions: u32,
    pub extents: usize,
    pub allocated_blocks: u64,
    /// The restart log a killed daemon left at the path looked at (`--restart-log`), if there
    /// is a file there: not a problem of the image, but changes acknowledged to a guest that
    /// the next `serve` or `check --repair` applies.
    pub restart_log: Option<RestartLogReport>,
    /// Groups whose block bitmap or free count disagrees with what is really used, with the
    /// bitmap they should have; `repair` writes them when `bitmaps_rebuildable`.
    #[serde(skip)]
    pub rebuilt_bitmaps: Vec<(u64, Vec<u8>)>,
    /// No block is claimed twice or lies past the end: the claims can be trusted.
    #[serde(skip)]
    pub bitmaps_rebuildable: bool,
}

/// What the restart log at the path looked at holds for the image.
#[derive(Debug, Serialize)]
pub struct RestartLogReport {
    pub path: String,
    /// Changes the journal lacks that the next read-write open applies.
    pub pending_records: usize,
    /// Why the next open would ignore the file, when it would.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignored: Option<String>,
}

/// Exit status of `check`: 0 clean, 1 problems found, 2 could not check.
pub enum Outcome {
    Checked(Report),
    CouldNotCheck(String),
}

/// Opens `path` read-only and checks it; reports what the restart log at `restart_log` holds
/// for it, without applying or changing it.
pub fn check_path(path: &Path, restart_log: &RestartLogAt) -> Outcome {
    let io: Arc<dyn BlockIo> = match FileIo::open(path, true) {
        Ok(f) => Arc::new(f),
        Err(e) => return Outcome::CouldNotCheck(e.to_string()),
    };
    let name = path.display().to_string();
    match Image::open(io, OpenOptions { read_only: true }) {
        Ok(img) => {
            let mut r = check(&img, name);
            r.restart_log = pending_at(&img, &restart_log.for_image(path)).map(|(p, pending)| {
                let path = p.display().to_string();
                match pending {
                    Pending::Nothing => RestartLogReport {
                        path,
                        pending_records: 0,
                        ignored: None,
                    },
                    Pending::Ignored(why) => RestartLogReport {
                        path,
                        pending_records: 0,
                        ignored: Some(why),
                    },
                    Pending::Changes { changes, .. } => RestartLogReport {
                        path,
                        pending_records: changes.len(),
                        ignored: None,
                    },
                }
            });
            Outcome::Checked(r)
        }
        Err(ImageError::Format(
            e @ (FormatError::BadMagic(_)
            | FormatError::UnsupportedFeature(_)
            | FormatError::MissingFeature(_)
            | FormatError::Geometry(_)),
        )) => Outcome::CouldNotCheck(format!("{name}: {e}")),
        Err(ImageError::Format(e)) => Outcome::Checked(Report {
            image: name,
            problems: vec![e.to_string()],
            ..Default::default()
        }),
        Err(e) => Outcome::CouldNotCheck(format!("{name}: {e}")),
    }
}

/// A claimed run of blocks and who claims it.
struct Claim {
    start: u64,
    len: u64,
    owner: String,
}

/// Every structure's claim on blocks, gathered for the ownership and bitmap checks.
#[derive(Default)]
struct Claims(Vec<Claim>);

impl Claims {
    fn claim(&mut self, start: u64, len: u64, owner: String) {
        self.0.push(Claim { start, len, owner });
    }
}

/// Blocks of one group's inode table.
fn itable_blocks(sb: &Superblock) -> u64 {
    (sb.inodes_per_group as usize * usize::from(sb.inode_size)).div_ceil(BLOCK_SIZE) as u64
}

pub fn check(img: &Image, name: String) -> Report {
    let mut p: Vec<String> = Vec::new();
    let sb = img.superblock();
    let rec = img.recovery();
    let jsb = img.journal_superblock();
    check_recorded_state(img, &mut p);
    let mut claims = Claims::default();
    claim_group_metadata(sb, &img.allocator().descs, &mut claims);
    check_gdt_padding(img, &mut p);
    check_inode_tables(img, &mut p);
    check_system_inodes(img, &mut p, &mut claims);
    check_resize_inode(img, &mut p, &mut claims);
    check_disk(img, &mut p, &mut claims);
    check_journal_superblock_padding(img, &mut p);
    let mut claims = claims.0;
    claims.sort_by_key(|c| c.start);
    let ownership_problems = p.len();
    check_ownership(&claims, sb.blocks_count, &mut p);
    let bitmaps_rebuildable = p.len() == ownership_problems;
    let (rebuilt_bitmaps, free_total) = check_block_bitmaps(img, &claims, &mut p);
    if !sb.needs_recovery() && sb.free_blocks_count != free_total {
        p.push(format!(
            "free blocks count wrong ({}, counted={free_total})",
            sb.free_blocks_count
        ));
    }
    let clean = !sb.needs_recovery() && jsb.start == 0 && !sb.has_errors();
    let tree = img.tree();
    Report {
        image: name,
        clean,
        problems: p,
        journal_transactions: rec.transactions,
        extents: tree.extent_count(),
        allocated_blocks: tree.data_blocks(),
        restart_log: None,
        rebuilt_bitmaps,
        bitmaps_rebuildable,
    }
}

/// What the image says about itself: the journal's recovery outcome, errors recorded in the
/// superblock or the journal superblock, and `needs_recovery` against the log's contents.
fn check_recorded_state(img: &Image, p: &mut Vec<String>) {
    let sb = img.superblock();
    let rec = img.recovery();
    if let Some(c) = &rec.corrupt {
        p.push(c.clone());
    }
    if rec.bad_tags > 0 {
        p.push(format!(
            "{} journal block(s) failed their checksum and were not replayed",
            rec.bad_tags
        ));
    }
    if sb.has_errors() {
        p.push(format!(
            "the filesystem has recorded errors ({} since creation, last in {})",
            sb.error.count, sb.error.last_func
        ));
    }
    let jsb = img.journal_superblock();
    if jsb.errno != 0 {
        p.push(format!("the journal was aborted (errno {})", jsb.errno));
    }
    if !sb.needs_recovery() && rec.transactions > 0 {
        p.push("needs_recovery is clear, but the journal has data".into());
    }
}

/// The group metadata's blocks: superblock copies with their GDT and reserved GDT blocks (the
/// latter also belong to the resize inode, which extblk never touches: claimed once here),
/// then each group's bitmaps and inode table.
fn claim_group_metadata(sb: &Superblock, descs: &[GroupDesc], claims: &mut Claims) {
    let n = sb.blocks_count;
    for g in (0..sb.group_count()).filter(|&g| sb.has_super(g)) {
        let len = sb.super_region_len().min(bitmap::blocks_in_group(n, g));
        claims.claim(
            g * BLOCKS_PER_GROUP,
            len,
            format!("superblock copy of group {g}"),
        );
    }
    let itable_blocks = itable_blocks(sb);
    for (g, d) in descs.iter().enumerate() {
        claims.claim(d.block_bitmap, 1, format!("block bitmap of group {g}"));
        claims.claim(d.inode_bitmap, 1, format!("inode bitmap of group {g}"));
        claims.claim(
            d.inode_table,
            itable_blocks,
            format!("inode table of group {g}"),
        );
    }
}

/// The group descriptor table: its bytes past the last descriptor are zero.
fn check_gdt_padding(img: &Image, p: &mut Vec<String>) {
    let sb = img.superblock();
    let gdt_blocks = sb.group_count().div_ceil(DESCS_PER_BLOCK);
    if let Ok(b) = img.meta_block(gdt_blocks) {
        let used = (sb.group_count() - (gdt_blocks - 1) * DESCS_PER_BLOCK) as usize * DESC_SIZE;
        if b[used..].iter().any(|&x| x != 0) {
            p.push("garbage after the last group descriptor".into());
        }
    }
}

/// Inode bitmaps and tables: every inode of every initialised inode table has its checksum,
/// used inodes agree with the bitmap, and the free-inode and directory counts add up.
fn check_inode_tables(img: &Image, p: &mut Vec<String>) {
    let sb = img.superblock();
    let seed = sb.csum_seed();
    let descs = &img.allocator().descs;
    let isz = usize::from(sb.inode_size);
    let itable_blocks = itable_blocks(sb);
    let mut dirs_found = 0u32;
    for (g, d) in descs.iter().enumerate() {
        let ib = match img.meta_block(d.inode_bitmap) {
            Ok(b) => b,
            Err(e) => {
                p.push(format!("cannot read the inode bitmap of group {g}: {e}"));
                continue;
            }
        };
        let ipg = sb.inodes_per_group;
        if d.flags & BG_INODE_UNINIT == 0 {
            let c = bitmap::inode_bitmap_csum(seed, &ib, ipg);
            if c != d.inode_bitmap_csum {
                p.push(format!(
                    "inode bitmap of group {g} does not match its checksum"
                ));
            }
            if ib[ipg as usize / 8..].iter().any(|&x| x != 0xFF) {
                p.push(format!(
                    "padding at the end of the inode bitmap of group {g} is not set"
                ));
            }
        }
        let mut free = 0u32;
        for blk in 0..itable_blocks {
            let t = match img.meta_block(d.inode_table + blk) {
                Ok(b) => b,
                Err(e) => {
                    p.push(format!("cannot read the inode table of group {g}: {e}"));
                    continue;
                }
            };
            for (k, raw) in t.chunks(isz).enumerate() {
                let idx = blk as usize * (BLOCK_SIZE / isz) + k;
                if idx >= ipg as usize {
                    break;
                }
                let ino = g as u32 * ipg + idx as u32 + 1;
                let in_use = d.flags & BG_INODE_UNINIT == 0 && bitmap::test(&ib, idx);
                if !in_use {
                    free += 1;
                }
                if d.flags & BG_INODE_UNINIT != 0 && raw.iter().all(|&x| x == 0) {
                    continue;
                }
                match Inode::decode(raw, ino, seed) {
                    Err(e) => p.push(e.to_string()),
                    Ok(i) if in_use && i.links > 0 => {
                        if i.is_dir() {
                            dirs_found += 1;
                        }
                    }
                    Ok(i) if !in_use && i.links > 0 && i.dtime == 0 => p.push(format!(
                        "inode {ino} is in use but free in the inode bitmap"
                    )),
                    Ok(_) => {}
                }
            }
        }
        if d.flags & BG_INODE_UNINIT == 0 && free != d.free_inodes {
            p.push(format!(
                "free inodes count wrong for group #{g} ({}, counted={free})",
                d.free_inodes
            ));
        }
    }
    if dirs_found != descs.iter().map(|d| d.used_dirs).sum::<u32>() {
        p.push(format!(
            "directories count wrong ({} in descriptors, counted={dirs_found})",
            descs.iter().map(|d| d.used_dirs).sum::<u32>()
        ));
    }
}

/// The directories (`/`, `lost+found`) and the journal: their extent trees and directory
/// blocks decode, `i_blocks` matches, and their blocks are claimed.
fn check_system_inodes(img: &Image, p: &mut Vec<String>, claims: &mut Claims) {
    let sb = img.superblock();
    let seed = sb.csum_seed();
    for (ino, what) in [
        (crate::ext4::ROOT_INO, "/"),
        (crate::ext4::LOST_FOUND_INO, "lost+found"),
        (sb.journal_inum, "journal"),
    ] {
        match read_inode(img, ino) {
            Err(e) => p.push(format!("{what}: {e}")),
            Ok(i) => {
                let iseed = inode_seed(seed, ino, i.generation);
                let root = match extent::decode_root(&i.i_block) {
                    Ok(r) => r,
                    Err(e) => {
                        p.push(format!("{what}: {e}"));
                        continue;
                    }
                };
                let t = crate::mapping::tree::ExtentTree::load(&root, |b| {
                    let data = img
                        .meta_block(b)
                        .map_err(|e| crate::ext4::corrupt(format!("block {b}"), e.to_string()))?;
                    extent::decode_block(&data, iseed, b)
                });
                match t {
                    Err(e) => p.push(format!("{what}: {e}")),
                    Ok(t) => {
                        for b in t.node_blocks() {
                            claims.claim(b, 1, format!("{what} extent block"));
                        }
                        let mut blocks = t.tree_blocks();
                        for e in t.iter() {
                            claims.claim(e.pblk, u64::from(e.len), format!("{what} data"));
                            blocks += u64::from(e.len);
                            if i.is_dir() {
                                for k in 0..e.len {
                                    if let Ok(b) = img.meta_block(e.pblk + u64::from(k)) {
                                        if let Err(err) = dir::decode_block(&b, iseed, what) {
                                            p.push(err.to_string());
                                        }
                                    }
                                }
                            }
                        }
                        if i.blocks != blocks * SECTORS_PER_BLOCK {
                            p.push(format!(
                                "inode {ino} ({what}): i_blocks is {}, should be {}",
                                i.blocks,
                                blocks * SECTORS_PER_BLOCK
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// The resize inode (mke2fs's resize_inode feature): its double-indirect block is claimed; the
/// reserved GDT blocks it lists were claimed with the superblock copies.
fn check_resize_inode(img: &Image, p: &mut Vec<String>, claims: &mut Claims) {
    if img.superblock().feature_compat & crate::ext4::superblock::compat::RESIZE_INODE != 0 {
        match read_inode(img, crate::ext4::RESIZE_INO) {
            Ok(i) => {
                let dind = u64::from(i.dind_block());
                if dind != 0 {
                    claims.claim(dind, 1, "resize inode".into());
                }
            }
            Err(e) => p.push(format!("resize inode: {e}")),
        }
    }
}

/// `/disk`: its tree and data blocks are claimed, written extents end within `i_size`, and
/// `i_blocks` counts data and tree blocks.
fn check_disk(img: &Image, p: &mut Vec<String>, claims: &mut Claims) {
    let disk = img.disk_inode();
    let tree = img.tree();
    for b in tree.node_blocks() {
        claims.claim(b, 1, "/disk extent block".into());
    }
    for e in tree.iter() {
        claims.claim(
            e.pblk,
            u64::from(e.len),
            format!("/disk blocks {}..{}", e.lblk, e.end()),
        );
        if !e.unwritten && e.end() > img.disk_blocks() {
            p.push(format!(
                "/disk: written extent at {} ends past i_size",
                e.lblk
            ));
        }
    }
    let want = SECTORS_PER_BLOCK * (tree.data_blocks() + tree.tree_blocks());
    if disk.blocks != want {
        p.push(format!(
            "inode {} (/disk): i_blocks is {}, should be {want}",
            img.disk_ino(),
            disk.blocks
        ));
    }
}

/// The journal superblock's block: only its first 1024 bytes are the structure, the rest is
/// zero.
fn check_journal_superblock_padding(img: &Image, p: &mut Vec<String>) {
    match img.meta_block(img.log_map().fs_block(0)) {
        Ok(b) if b[JOURNAL_SUPERBLOCK_SIZE..].iter().any(|&x| x != 0) => {
            p.push("garbage after the journal superblock".into())
        }
        Ok(_) => {}
        Err(e) => p.push(format!("cannot read the journal superblock: {e}")),
    }
}

/// Block ownership over the claims (sorted by start): nothing past the end of the
/// filesystem, no block claimed twice.
fn check_ownership(claims: &[Claim], blocks_count: u64, p: &mut Vec<String>) {
    let mut prev: Option<&Claim> = None;
    for c in claims {
        if c.len == 0 {
            continue;
        }
        if c.start + c.len > blocks_count {
            p.push(format!(
                "{} (blocks {}..{}) past the end of the filesystem",
                c.owner,
                c.start,
                c.start + c.len
            ));
        }
        if let Some(q) = prev {
            if c.start < q.start + q.len {
                p.push(format!(
                    "block {} is used twice: by {} and by {}",
                    c.start, q.owner, c.owner
                ));
            }
        }
        if prev.is_none_or(|q| c.start + c.len > q.start + q.len) {
            prev = Some(c);
        }
    }
}

/// Block bitmaps and free-block counts against the claims (sorted by start): the differences
/// of each group, and the bitmaps `repair` would write. Returns those bitmaps and the free
/// blocks counted over all groups.
fn check_block_bitmaps(
    img: &Image,
    claims: &[Claim],
    p: &mut Vec<String>,
) -> (Vec<(u64, Vec<u8>)>, u64) {
    let n = img.superblock().blocks_count;
    let alloc = img.allocator();
    let mut rebuilt_bitmaps = Vec::new();
    let mut ci = 0usize;
    let mut free_total = 0u64;
    for (g, d) in alloc.descs.iter().enumerate() {
        let g = g as u64;
        let base = g * BLOCKS_PER_GROUP;
        let gn = bitmap::blocks_in_group(n, g);
        let mut expect = vec![0u8; BLOCK_SIZE];
        while ci < claims.len() && claims[ci].start + claims[ci].len <= base {
            ci += 1;
        }
        let mut k = ci;
        while k < claims.len() && claims[k].start < base + gn {
            let c = &claims[k];
            let (a, b) = (c.start.max(base), (c.start + c.len).min(base + gn));
            if a < b {
                bitmap::set_range(&mut expect, (a - base) as usize, (b - base) as usize);
            }
            k += 1;
        }
        bitmap::set_range(&mut expect, gn as usize, BLOCKS_PER_GROUP as usize);
        let actual = alloc.bitmap(g);
        if d.flags & BG_BLOCK_UNINIT == 0 && actual[..] != expect[..] {
            let mut plus = Vec::new();
            let mut minus = Vec::new();
            for i in 0..BLOCKS_PER_GROUP as usize {
                match (bitmap::test(&expect, i), bitmap::test(&actual, i)) {
                    (true, false) if i < gn as usize => plus.push(base + i as u64),
                    (false, true) => minus.push(base + i as u64),
                    (true, false) => p.push(format!(
                        "padding at the end of the block bitmap of group {g} is not set"
                    )),
                    _ => {}
                }
            }
            if !plus.is_empty() {
                p.push(format!(
                    "block bitmap differences in group {g}: {} used block(s) marked free, first {}",
                    plus.len(),
                    plus[0]
                ));
            }
            if !minus.is_empty() {
                p.push(format!(
                    "block bitmap differences in group {g}: {} free block(s) marked used, first {}",
                    minus.len(),
                    minus[0]
                ));
            }
        }
        let free = bitmap::count_free(&expect, gn as usize);
        free_total += free;
        if d.flags & BG_BLOCK_UNINIT == 0
            && (actual[..] != expect[..] || u64::from(d.free_blocks) != free)
        {
            rebuilt_bitmaps.push((g, expect.clone()));
        }
        if u64::from(d.free_blocks) != free {
            p.push(format!(
                "free blocks count wrong for group #{g} ({}, counted={free})",
                d.free_blocks
            ));
        }
    }
    (rebuilt_bitmaps, free_total)
}

fn read_inode(img: &Image, ino: u32) -> Result<Inode, ImageError> {
    let sb = img.superblock();
    let g = ((ino - 1) / sb.inodes_per_group) as usize;
    let d = &img.allocator().descs[g];
    let isz = usize::from(sb.inode_size);
    let idx = ((ino - 1) % sb.inodes_per_group) as usize;
    let blk = d.inode_table + (idx * isz / BLOCK_SIZE) as u64;
    let b = img.meta_block(blk)?;
    let off = (idx * isz) % BLOCK_SIZE;
    Ok(Inode::decode(&b[off..off + isz], ino, sb.csum_seed())?)
}
