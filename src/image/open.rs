//! Opening an image: superblock, group descriptors, journal recovery, `/disk` and its tree,
//! block bitmaps — every structure decoded and checked on the way in.
//!
//! The bytes are untrusted even where their checksums hold (a checksum proves that a writer
//! meant them, not that the writer was right). As ext4's `block_validity`, open builds the
//! system zone — superblock and GDT copies, bitmaps, inode tables, the journal, the
//! directories — and checks every extent and every tree pointer against it before use: inside
//! the filesystem, not empty, clear of the zone, and (for `/disk`) clear of its own tree
//! blocks. A read-write open also requires `/disk`'s blocks to be marked in use and used once,
//! so the allocator can never hand one of them out again. `docs/format.md` lists the rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::file::DiskFile;
use super::pool::Pool;
use super::{Image, ImageError, RecoveryInfo};
use crate::ext4::dir;
use crate::ext4::extent::{self, Extent};
use crate::ext4::group::{GroupDesc, BG_BLOCK_UNINIT, DESCS_PER_BLOCK, DESC_SIZE};
use crate::ext4::inode::{Inode, EXTENTS_FL};
use crate::ext4::layout::MIN_JOURNAL_BLOCKS;
use crate::ext4::superblock::{Superblock, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
use crate::ext4::{
    bitmap, corrupt, inode_seed, FormatError, BLOCKS_PER_GROUP, BLOCK_SIZE, BLOCK_SIZE_U64,
    DISK_NAME, ROOT_INO,
};
use crate::io::BlockIo;
use crate::jbd2::format::JournalSuperblock;
use crate::jbd2::{replay, Journal, LogMap};
use crate::mapping::alloc::Allocator;
use crate::mapping::tree::ExtentTree;
use crate::mapping::usemap::UseMap;
use crate::mapping::zone::{Claim, Invalid, Owner, SystemZone};

#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
}

/// How much of the bitmaps a read-write open insists on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bitmaps {
    /// Every block `/disk` maps must be marked in use (the allocator relies on it).
    Trusted,
    /// `check --repair`: the bitmaps are about to be rebuilt from the trees.
    Rebuilding,
}

/// The error for a run of blocks that `what` must not use.
fn invalid(what: impl Into<String>, start: u64, len: u64, why: Invalid) -> ImageError {
    FormatError::BlockValidity {
        what: what.into(),
        start,
        len,
        problem: why.to_string(),
    }
    .into()
}

/// Checks every extent and tree block of `tree` against `zone`, then adds them to it as
/// `owner`'s (another structure must not use them either).
fn claim_tree(
    zone: &mut SystemZone,
    tree: &ExtentTree,
    what: &str,
    owner: Owner,
) -> Result<(), ImageError> {
    for b in tree.node_blocks() {
        zone.add(Claim::new(b, 1, owner))
            .map_err(|why| invalid(format!("{what} extent tree block"), b, 1, why))?;
    }
    for e in tree.iter() {
        zone.add(Claim::new(e.pblk, u64::from(e.len), owner))
            .map_err(|why| {
                invalid(
                    format!("{what} extent at logical block {}", e.lblk),
                    e.pblk,
                    u64::from(e.len),
                    why,
                )
            })?;
    }
    Ok(())
}

/// The group metadata of the system zone: superblock/GDT copies, bitmaps and inode tables,
/// each inside the filesystem and overlapping no other (groups sharing a bitmap block would
/// corrupt each other's allocations).
fn group_zone(sb: &Superblock, descs: &[GroupDesc]) -> Result<SystemZone, ImageError> {
    let n = sb.blocks_count;
    let itable =
        (u64::from(sb.inodes_per_group) * u64::from(sb.inode_size)).div_ceil(BLOCK_SIZE_U64);
    let mut claims = Vec::with_capacity(3 * descs.len() + 4);
    for g in (0..sb.group_count()).filter(|&g| sb.has_super(g)) {
        let len = sb.super_region_len().min(bitmap::blocks_in_group(n, g));
        claims.push(Claim::new(
            g * BLOCKS_PER_GROUP,
            len,
            Owner::Superblock { group: g },
        ));
    }
    for (g, d) in descs.iter().enumerate() {
        let group = g as u64;
        claims.push(Claim::per_group(
            d.block_bitmap,
            1,
            Owner::BlockBitmap { group },
            1,
        ));
        claims.push(Claim::per_group(
            d.inode_bitmap,
            1,
            Owner::InodeBitmap { group },
            1,
        ));
        claims.push(Claim::per_group(
            d.inode_table,
            itable,
            Owner::InodeTable { group },
            itable,
        ));
    }
    SystemZone::new(n, claims).map_err(|(c, why)| invalid(c.owner.to_string(), c.start, c.len, why))
}

/// Reads metadata blocks, seeing replayed-but-unwritten journal blocks first.
struct Reader<'a> {
    io: &'a dyn BlockIo,
    overlay: &'a BTreeMap<u64, Vec<u8>>,
    blocks_count: u64,
}

impl Reader<'_> {
    fn block(&self, blk: u64) -> Result<Vec<u8>, ImageError> {
        if let Some(b) = self.overlay.get(&blk) {
            return Ok(b.clone());
        }
        if blk >= self.blocks_count {
            return Err(corrupt(
                "metadata",
                format!("block {blk} is past the end of the filesystem"),
            )
            .into());
        }
        let mut b = vec![0u8; BLOCK_SIZE];
        self.io.read_at(&mut b, blk * BLOCK_SIZE_U64)?;
        Ok(b)
    }

    fn superblock(&self) -> Result<Superblock, ImageError> {
        let b = match self.overlay.get(&0) {
            Some(b0) => {
                let at = SUPERBLOCK_OFFSET as usize;
                b0[at..at + SUPERBLOCK_SIZE].to_vec()
            }
            None => {
                let mut b = vec![0u8; SUPERBLOCK_SIZE];
                self.io.read_at(&mut b, SUPERBLOCK_OFFSET)?;
                b
            }
        };
        Ok(Superblock::decode(&b)?)
    }

    fn inode(
        &self,
        sb: &Superblock,
        descs: &[GroupDesc],
        ino: u32,
    ) -> Result<(Inode, u64, Vec<u8>), ImageError> {
        let g = ((ino - 1) / sb.inodes_per_group) as usize;
        let d = descs
            .get(g)
            .ok_or_else(|| corrupt(format!("inode {ino}"), "past the last group"))?;
        let isz = usize::from(sb.inode_size);
        let per_block = BLOCK_SIZE / isz;
        let idx = ((ino - 1) % sb.inodes_per_group) as usize;
        let blk = d.inode_table + (idx / per_block) as u64;
        let content = self.block(blk)?;
        let off = (idx % per_block) * isz;
        let inode = Inode::decode(&content[off..off + isz], ino, sb.csum_seed())?;
        Ok((inode, blk, content))
    }

    /// An inode's extent tree (any depth). Every index pointer is checked against `zone`
    /// before its block is read.
    fn tree(
        &self,
        inode: &Inode,
        iseed: u32,
        what: &str,
        zone: &SystemZone,
    ) -> Result<ExtentTree, ImageError> {
        if inode.flags & EXTENTS_FL == 0 {
            return Err(corrupt(what.to_string(), "not extent-mapped").into());
        }
        let root = extent::decode_root(&inode.i_block)?;
        if root.depth > 0 && root.is_empty() {
            return Err(corrupt(format!("{what} extent root"), "an index without entries").into());
        }
        let t = ExtentTree::load(&root, |p| {
            if let Err(why) = zone.check(p, 1) {
                return Err(FormatError::BlockValidity {
                    what: format!("{what} extent index entry"),
                    start: p,
                    len: 1,
                    problem: why.to_string(),
                });
            }
            let b = self.block(p).map_err(|e| match e {
                ImageError::Format(f) => f,
                other => corrupt(format!("extent block {p}"), other.to_string()),
            })?;
            extent::decode_block(&b, iseed, p)
        })?;
        Ok(t)
    }
}

/// `/disk`'s blocks against the system zone (`alloc`'s) and its own tree blocks: no guest
/// write may land in metadata. For a read-write open (`trust` given) also: every block used
/// once, and (unless the bitmaps are being rebuilt) marked in use — otherwise the allocator
/// could hand a block out while an extent still maps it.
fn check_disk_blocks(
    tree: &ExtentTree,
    alloc: &Allocator,
    trust: Option<Bitmaps>,
) -> Result<(), ImageError> {
    let zone = alloc.zone();
    let mut nodes = tree.node_blocks();
    for &b in &nodes {
        zone.check(b, 1)
            .map_err(|why| invalid("/disk extent tree block", b, 1, why))?;
    }
    nodes.sort_unstable();
    if let Some(w) = nodes.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(
            "/disk extent tree block",
            w[0],
            1,
            Invalid::Owned {
                block: w[0],
                owner: Owner::ExtentTree,
            },
        ));
    }
    let what = |e: &Extent| format!("/disk extent at logical block {}", e.lblk);
    for e in tree.iter() {
        let len = u64::from(e.len);
        zone.check(e.pblk, len)
            .map_err(|why| invalid(what(&e), e.pblk, len, why))?;
        let i = nodes.partition_point(|&b| b < e.pblk);
        if let Some(&b) = nodes.get(i).filter(|&&b| b < e.pblk + len) {
            return Err(invalid(
                what(&e),
                e.pblk,
                len,
                Invalid::Owned {
                    block: b,
                    owner: Owner::ExtentTree,
                },
            ));
        }
    }
    let Some(trust) = trust else {
        return Ok(());
    };
    // Used once: sorted by physical start, no run reaches into the next (nearly sorted
    // already with identity placement, so the sort is close to linear).
    let mut runs: Vec<(u64, u64, u32)> = tree
        .iter()
        .map(|e| (e.pblk, u64::from(e.len), e.lblk))
        .collect();
    runs.sort_unstable();
    for w in runs.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(invalid(
                format!("/disk extent at logical block {}", w[1].2),
                w[1].0,
                w[1].1,
                Invalid::Owned {
                    block: w[1].0,
                    owner: Owner::Extent { lblk: w[0].2 },
                },
            ));
        }
    }
    if trust == Bitmaps::Trusted {
        for &(s, l, lblk) in &runs {
            if let Some(b) = alloc.first_free_in(s, l) {
                return Err(invalid(
                    format!("/disk extent at logical block {lblk}"),
                    s,
                    l,
                    Invalid::MarkedFree { block: b },
                ));
            }
        }
        for &b in &nodes {
            if alloc.first_free_in(b, 1).is_some() {
                return Err(invalid(
                    "/disk extent tree block",
                    b,
                    1,
                    Invalid::MarkedFree { block: b },
                ));
            }
        }
    }
    Ok(())
}

fn read_descs(r: &Reader, sb: &Superblock) -> Result<Vec<GroupDesc>, ImageError> {
    let groups = sb.group_count();
    let seed = sb.csum_seed();
    let mut descs = Vec::with_capacity(groups as usize);
    for k in 0..groups.div_ceil(DESCS_PER_BLOCK) {
        let b = r.block(1 + k)?;
        for i in 0..DESCS_PER_BLOCK.min(groups - k * DESCS_PER_BLOCK) {
            let g = k * DESCS_PER_BLOCK + i;
            let o = i as usize * DESC_SIZE;
            let d = GroupDesc::decode(&b[o..o + DESC_SIZE], g, seed)?;
            for (name, blk) in [
                ("block bitmap", d.block_bitmap),
                ("inode bitmap", d.inode_bitmap),
                ("inode table", d.inode_table),
            ] {
                if blk == 0 || blk >= sb.blocks_count {
                    return Err(corrupt(
                        format!("group descriptor {g}"),
                        format!("{name} at block {blk}"),
                    )
                    .into());
                }
            }
            descs.push(d);
        }
    }
    Ok(descs)
}

/// A block bitmap for a group the kernel never initialised: its superblock copy (with GDT and
/// reserved GDT blocks), any group metadata placed in it, and the padding.
fn synthesize_bitmap(sb: &Superblock, descs: &[GroupDesc], g: u64) -> Vec<u8> {
    let mut bm = vec![0u8; BLOCK_SIZE];
    let base = g * BLOCKS_PER_GROUP;
    let n = bitmap::blocks_in_group(sb.blocks_count, g);
    if sb.has_super(g) {
        bitmap::set_range(&mut bm, 0, sb.super_region_len().min(n) as usize);
    }
    for d in descs {
        let itable =
            (u64::from(sb.inodes_per_group) * u64::from(sb.inode_size)).div_ceil(BLOCK_SIZE_U64);
        let blocks = [d.block_bitmap, d.inode_bitmap]
            .into_iter()
            .chain(d.inode_table..d.inode_table + itable);
        for blk in blocks {
            if blk / BLOCKS_PER_GROUP == g {
                bitmap::set(&mut bm, (blk - base) as usize);
            }
        }
    }
    bitmap::set_range(&mut bm, n as usize, BLOCKS_PER_GROUP as usize);
    bm
}

impl Image {
    /// Opens an image. Read-write opens replay the journal into place and mark the image in
    /// use (needs_recovery) before any change; read-only opens replay into memory only.
    pub fn open(io: Arc<dyn BlockIo>, opts: OpenOptions) -> Result<Image, ImageError> {
        let mut img = Image::open_with(io, opts, Bitmaps::Trusted)?;
        if !opts.read_only {
            img.pool.begin_session()?;
        }
        Ok(img)
    }

    /// A read-write open that leaves the session count (`s_mnt_count`) as it was: the
    /// daemon first checks the previous session's restart log against it, applies and
    /// commits what the log holds, and only then calls [`Image::begin_session`]. A kill
    /// anywhere in between leaves a log the next open still accepts.
    pub fn open_keeping_session(io: Arc<dyn BlockIo>) -> Result<Image, ImageError> {
        Image::open_with(io, OpenOptions { read_only: false }, Bitmaps::Trusted)
    }

    /// A read-write open for `check --repair`: as [`Image::open`], except that blocks of
    /// `/disk` marked free in the bitmaps are accepted — the repair rebuilds those bitmaps from
    /// the trees before anything is allocated. Blocks used twice are still refused. Like
    /// [`Image::open_keeping_session`], it leaves the session count as it was: the repair
    /// applies the last session's restart log first, then calls [`Image::begin_session`].
    pub fn open_for_repair(io: Arc<dyn BlockIo>) -> Result<Image, ImageError> {
        Image::open_with(io, OpenOptions { read_only: false }, Bitmaps::Rebuilding)
    }

    /// A read-write open of an image this process already holds, after it changed the
    /// geometry under the in-memory one (`resize`): the session count stays.
    pub(super) fn reopen(io: Arc<dyn BlockIo>) -> Result<Image, ImageError> {
        Image::open_with(io, OpenOptions { read_only: false }, Bitmaps::Trusted)
    }

    fn open_with(
        io: Arc<dyn BlockIo>,
        opts: OpenOptions,
        bitmaps: Bitmaps,
    ) -> Result<Image, ImageError> {
        let mut overlay = BTreeMap::new();
        let mut recovery = RecoveryInfo::default();
        // A replay sets the journal's sequence one past the tid after the last transaction it
        // found (`apply_replay`): that tid, not the sequence, is the first one missing.
        let mut replayed = false;
        loop {
            let r = Reader {
                io: &*io,
                overlay: &overlay,
                blocks_count: u64::MAX,
            };
            let sb = r.superblock()?;
            if sb.blocks_count * BLOCK_SIZE_U64 > io.size() {
                return Err(corrupt(
                    "image",
                    format!(
                        "truncated: {} bytes, the filesystem needs {}",
                        io.size(),
                        sb.blocks_count * BLOCK_SIZE_U64
                    ),
                )
                .into());
            }
            let r = Reader {
                io: &*io,
                overlay: &overlay,
                blocks_count: sb.blocks_count,
            };
            let descs = read_descs(&r, &sb)?;
            let mut zone = group_zone(&sb, &descs)?;
            let (map, mut jsb) = load_journal(&r, &sb, &descs, &mut zone)?;
            if jsb.start != 0 && overlay.is_empty() {
                let out = replay::replay(&*io, &map, &jsb)?;
                recovery = RecoveryInfo {
                    transactions: out.transactions,
                    blocks: out.blocks.len(),
                    corrupt: out.corrupt.clone(),
                    bad_tags: out.bad_tags,
                    first_missing_tid: out.end_tid,
                };
                replayed = true;
                for blk in out.blocks.keys() {
                    if *blk >= sb.blocks_count {
                        return Err(corrupt(
                            "journal",
                            format!("logged block {blk} is past the end of the filesystem"),
                        )
                        .into());
                    }
                }
                if opts.read_only {
                    if out.blocks.is_empty() {
                        // Nothing to apply: open as is.
                    } else {
                        overlay = out.blocks;
                        continue;
                    }
                } else {
                    apply_replay(&*io, &map, &mut jsb, &out)?;
                    continue;
                }
            }
            if !replayed {
                // A clean log's sequence is the tid after the last one committed (checkpoint).
                recovery.first_missing_tid = jsb.sequence;
            }
            return Image::finish_open(
                io.clone(),
                sb,
                descs,
                zone,
                map,
                jsb,
                overlay,
                recovery,
                opts,
                bitmaps,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_open(
        io: Arc<dyn BlockIo>,
        mut sb: Superblock,
        descs: Vec<GroupDesc>,
        mut zone: SystemZone,
        map: LogMap,
        mut jsb: JournalSuperblock,
        overlay: BTreeMap<u64, Vec<u8>>,
        recovery: RecoveryInfo,
        opts: OpenOptions,
        trust: Bitmaps,
    ) -> Result<Image, ImageError> {
        let seed = sb.csum_seed();
        let r = Reader {
            io: &*io,
            overlay: &overlay,
            blocks_count: sb.blocks_count,
        };
        let disk_ino = find_disk(&r, &sb, &descs, &mut zone)?;
        claim_resize_inode(&r, &sb, &descs, &mut zone)?;
        let (disk, itable_blk, itable) = r.inode(&sb, &descs, disk_ino)?;
        if !disk.is_reg() {
            return Err(corrupt("/disk", "not a regular file").into());
        }
        let disk_iseed = inode_seed(seed, disk_ino, disk.generation);
        let tree = r.tree(&disk, disk_iseed, "/disk", &zone)?;
        let disk_blocks = disk.size.div_ceil(BLOCK_SIZE_U64);
        if disk_blocks > crate::ext4::MAX_FILE_BLOCKS {
            return Err(corrupt("/disk", "larger than 16 TiB - 4 KiB").into());
        }
        let bitmaps = read_bitmaps(&r, &sb, &descs)?;
        let data_start = data_start(&sb, &map)?;
        let mut alloc = Allocator::new(
            sb.blocks_count,
            data_start,
            data_start + disk_blocks,
            descs,
            bitmaps,
            zone,
        );
        check_disk_blocks(&tree, &alloc, (!opts.read_only).then_some(trust))?;
        let journal = if opts.read_only {
            None
        } else {
            Some(start_writing(&*io, &mut sb, &mut alloc, &map, &mut jsb)?)
        };
        Ok(Image {
            pool: Pool {
                io,
                seed,
                alloc,
                journal,
                journal_sb: jsb,
                log_map: map,
                read_only: opts.read_only,
                recovery,
                overlay,
                revokes: Default::default(),
                aborted: None,
                sb,
            },
            disk: DiskFile {
                ino: disk_ino,
                inode: disk,
                iseed: disk_iseed,
                itable: (itable_blk, itable),
                tree,
                blocks: disk_blocks,
                inode_dirty: false,
            },
        })
    }
}

/// The journal: its inode's blocks (claimed in the system zone before anything is replayed or
/// logged, since a journal over group metadata would overwrite it with every commit), checked
/// to map the whole log in one run, and its superblock.
fn load_journal(
    r: &Reader,
    sb: &Superblock,
    descs: &[GroupDesc],
    zone: &mut SystemZone,
) -> Result<(LogMap, JournalSuperblock), ImageError> {
    let (jinode, _, _) = r.inode(sb, descs, sb.journal_inum)?;
    let jtree = r.tree(
        &jinode,
        inode_seed(sb.csum_seed(), sb.journal_inum, jinode.generation),
        "journal inode",
        zone,
    )?;
    claim_tree(zone, &jtree, "journal inode", Owner::Journal)?;
    let map = LogMap::new(jtree.iter().collect::<Vec<Extent>>());
    if !map.is_contiguous()
        || map.blocks() * BLOCK_SIZE_U64 != jinode.size
        || map.blocks() < MIN_JOURNAL_BLOCKS
    {
        return Err(corrupt("journal inode", "its blocks do not map the whole journal").into());
    }
    let mut jb = vec![0u8; BLOCK_SIZE];
    r.io.read_at(&mut jb, map.byte_offset(0))?;
    let jsb = JournalSuperblock::decode(&jb)?;
    if u64::from(jsb.maxlen) > map.blocks() {
        return Err(corrupt("journal superblock", "s_maxlen exceeds the journal inode").into());
    }
    Ok((map, jsb))
}

/// A read-write open's recovery: the replayed blocks written home and made durable, then the
/// journal marked empty (`s_start` 0, the sequence after the last replayed transaction).
fn apply_replay(
    io: &dyn BlockIo,
    map: &LogMap,
    jsb: &mut JournalSuperblock,
    out: &replay::ReplayOutcome,
) -> Result<(), ImageError> {
    // The superblock's block last, after a barrier, as a checkpoint writes it (jbd2's
    // `Journal::checkpoint`): a geometry change must never be home before its descriptors.
    for (blk, data) in out.blocks.range(1..) {
        io.write_at(data, blk * BLOCK_SIZE_U64)?;
    }
    if let Some(data) = out.blocks.get(&0) {
        io.flush()?;
        io.write_at(data, 0)?;
    }
    io.flush()?;
    jsb.start = 0;
    jsb.sequence = out.end_tid.wrapping_add(1);
    io.write_at(&jsb.encode(), map.byte_offset(0))?;
    io.flush()?;
    Ok(())
}

/// `/disk`'s inode number, through the root directory. The blocks of `/` and of lost+found
/// join the system zone on the way: metadata a guest write must not reach either.
fn find_disk(
    r: &Reader,
    sb: &Superblock,
    descs: &[GroupDesc],
    zone: &mut SystemZone,
) -> Result<u32, ImageError> {
    let seed = sb.csum_seed();
    let (root, _, _) = r.inode(sb, descs, ROOT_INO)?;
    if !root.is_dir() {
        return Err(corrupt("root inode", "not a directory").into());
    }
    let rseed = inode_seed(seed, ROOT_INO, root.generation);
    let rtree = r.tree(&root, rseed, "root directory", zone)?;
    claim_tree(
        zone,
        &rtree,
        "root directory",
        Owner::Directory { ino: ROOT_INO },
    )?;
    let mut disk_ino = None;
    let mut others = Vec::new();
    for e in rtree.iter() {
        for i in 0..e.len {
            let b = r.block(e.pblk + u64::from(i))?;
            for ent in dir::decode_block(&b, rseed, "root directory")? {
                if ent.name == DISK_NAME.as_bytes() {
                    disk_ino = Some(ent.ino);
                } else if ent.name == b"lost+found" {
                    others.push(ent.ino);
                }
            }
        }
    }
    let disk_ino = disk_ino.ok_or(FormatError::NoDiskFile)?;
    if disk_ino == 0 || disk_ino > sb.inodes_count {
        return Err(corrupt("/disk", format!("inode number {disk_ino}")).into());
    }
    for ino in others {
        if ino == 0 || ino > sb.inodes_count || ino == disk_ino || ino == ROOT_INO {
            continue;
        }
        let (lf, _, _) = r.inode(sb, descs, ino)?;
        if lf.is_dir() && lf.flags & EXTENTS_FL != 0 {
            let what = format!("directory inode {ino}");
            let t = r.tree(&lf, inode_seed(seed, ino, lf.generation), &what, zone)?;
            claim_tree(zone, &t, &what, Owner::Directory { ino })?;
        }
    }
    Ok(disk_ino)
}

/// The resize inode's double-indirect block joins the system zone (mke2fs's resize_inode
/// feature; its reserved GDT blocks are already there with the superblock copies).
fn claim_resize_inode(
    r: &Reader,
    sb: &Superblock,
    descs: &[GroupDesc],
    zone: &mut SystemZone,
) -> Result<(), ImageError> {
    if sb.feature_compat & crate::ext4::superblock::compat::RESIZE_INODE != 0 {
        let (ri, _, _) = r.inode(sb, descs, crate::ext4::RESIZE_INO)?;
        let dind = u64::from(ri.dind_block());
        if dind != 0 {
            zone.add(Claim::new(dind, 1, Owner::ResizeInode))
                .map_err(|why| invalid("the resize inode", dind, 1, why))?;
        }
    }
    Ok(())
}

/// Block bitmaps, each checked against its descriptor (a `BLOCK_UNINIT` group's synthesised),
/// compacted at once: a large image's bitmaps are never all in memory together.
fn read_bitmaps(
    r: &Reader,
    sb: &Superblock,
    descs: &[GroupDesc],
) -> Result<Vec<UseMap>, ImageError> {
    let seed = sb.csum_seed();
    let mut bitmaps = Vec::with_capacity(descs.len());
    for (g, d) in descs.iter().enumerate() {
        let bm = if d.flags & BG_BLOCK_UNINIT != 0 {
            synthesize_bitmap(sb, descs, g as u64)
        } else {
            let bm = r.block(d.block_bitmap)?;
            let c = bitmap::block_bitmap_csum(seed, &bm);
            if c != d.block_bitmap_csum {
                return Err(FormatError::Checksum {
                    what: format!("block bitmap of group {g}"),
                    stored: d.block_bitmap_csum,
                    computed: c,
                }
                .into());
            }
            bm
        };
        bitmaps.push(UseMap::from_bitmap(&bm));
    }
    Ok(bitmaps)
}

/// Where identity placement starts: past the journal (and any backup range right after it);
/// an image with no data area there is refused.
fn data_start(sb: &Superblock, map: &LogMap) -> Result<u64, ImageError> {
    let jend = (0..map.blocks() as u32)
        .map(|b| map.fs_block(b))
        .max()
        .unwrap_or(0)
        + 1;
    let mut data_start = jend;
    let g = data_start / BLOCKS_PER_GROUP;
    if data_start % BLOCKS_PER_GROUP < sb.super_region_len() && sb.has_super(g) {
        data_start = g * BLOCKS_PER_GROUP + sb.super_region_len();
    }
    if data_start >= sb.blocks_count {
        return Err(corrupt("journal", "no data area after it").into());
    }
    Ok(data_start)
}

/// A read-write open takes the image: free counts from the bitmaps, a mke2fs journal upgraded,
/// `needs_recovery` set durably before the first transaction. Returns the journal writer.
fn start_writing(
    io: &dyn BlockIo,
    sb: &mut Superblock,
    alloc: &mut Allocator,
    map: &LogMap,
    jsb: &mut JournalSuperblock,
) -> Result<Journal, ImageError> {
    // The allocator counts from the bitmaps, as ext4's mballoc does; a descriptor that
    // disagrees is corrected in the next commit.
    for g in alloc.recount() {
        log::warn!(
            "group {g}: free blocks count in the descriptor disagrees with its bitmap; \
             using the bitmap's"
        );
    }
    if !jsb.has_csum_v3() {
        // A journal made by mke2fs: upgrade it while it is empty, as the kernel does.
        jsb.upgrade_features();
        io.write_at(&jsb.encode(), map.byte_offset(0))?;
    }
    sb.set_needs_recovery(true);
    io.write_at(&sb.encode(), SUPERBLOCK_OFFSET)?;
    io.flush()?;
    Ok(Journal::new(map.clone(), jsb.clone()))
}
