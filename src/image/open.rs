//! Opening an image: superblock, group descriptors, journal recovery, `/disk` and its tree,
//! block bitmaps — every structure decoded and checked on the way in.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Image, ImageError, RecoveryInfo};
use crate::ext4::dir;
use crate::ext4::extent::{self, Extent};
use crate::ext4::group::{GroupDesc, BG_BLOCK_UNINIT, DESCS_PER_BLOCK, DESC_SIZE};
use crate::ext4::inode::{Inode, EXTENTS_FL};
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

#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub read_only: bool,
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
            Some(b0) => b0[1024..2048].to_vec(),
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

    /// An inode's extent tree (any depth).
    fn tree(&self, inode: &Inode, iseed: u32, what: &str) -> Result<ExtentTree, ImageError> {
        if inode.flags & EXTENTS_FL == 0 {
            return Err(corrupt(what.to_string(), "not extent-mapped").into());
        }
        let root = extent::decode_root(&inode.i_block)?;
        let t = ExtentTree::load(&root, |p| {
            let b = self.block(p).map_err(|e| match e {
                ImageError::Format(f) => f,
                other => corrupt(format!("extent block {p}"), other.to_string()),
            })?;
            extent::decode_block(&b, iseed, p)
        })?;
        Ok(t)
    }
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
        let mut overlay = BTreeMap::new();
        let mut recovery = RecoveryInfo::default();
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
            let (jinode, _, _) = r.inode(&sb, &descs, sb.journal_inum)?;
            let jtree = r.tree(
                &jinode,
                inode_seed(sb.csum_seed(), sb.journal_inum, jinode.generation),
                "journal inode",
            )?;
            let map = LogMap::new(jtree.iter().collect::<Vec<Extent>>());
            if !map.is_contiguous()
                || map.blocks() * BLOCK_SIZE_U64 != jinode.size
                || map.blocks() < 1024
            {
                return Err(
                    corrupt("journal inode", "its blocks do not map the whole journal").into(),
                );
            }
            let mut jb = vec![0u8; BLOCK_SIZE];
            io.read_at(&mut jb, map.byte_offset(0))?;
            let mut jsb = JournalSuperblock::decode(&jb)?;
            if u64::from(jsb.maxlen) > map.blocks() {
                return Err(
                    corrupt("journal superblock", "s_maxlen exceeds the journal inode").into(),
                );
            }
            if jsb.start != 0 && overlay.is_empty() {
                let out = replay::replay(&*io, &map, &jsb)?;
                recovery = RecoveryInfo {
                    transactions: out.transactions,
                    blocks: out.blocks.len(),
                    corrupt: out.corrupt.clone(),
                    bad_tags: out.bad_tags,
                };
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
                    for (blk, data) in &out.blocks {
                        io.write_at(data, blk * BLOCK_SIZE_U64)?;
                    }
                    io.flush()?;
                    jsb.start = 0;
                    jsb.sequence = out.end_tid.wrapping_add(1);
                    io.write_at(&jsb.encode(), map.byte_offset(0))?;
                    io.flush()?;
                    continue;
                }
            }
            return Image::finish_open(io.clone(), sb, descs, map, jsb, overlay, recovery, opts);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_open(
        io: Arc<dyn BlockIo>,
        mut sb: Superblock,
        descs: Vec<GroupDesc>,
        map: LogMap,
        mut jsb: JournalSuperblock,
        overlay: BTreeMap<u64, Vec<u8>>,
        recovery: RecoveryInfo,
        opts: OpenOptions,
    ) -> Result<Image, ImageError> {
        let seed = sb.csum_seed();
        let r = Reader {
            io: &*io,
            overlay: &overlay,
            blocks_count: sb.blocks_count,
        };
        // `/disk` through the root directory.
        let (root, _, _) = r.inode(&sb, &descs, ROOT_INO)?;
        if !root.is_dir() {
            return Err(corrupt("root inode", "not a directory").into());
        }
        let rseed = inode_seed(seed, ROOT_INO, root.generation);
        let rtree = r.tree(&root, rseed, "root directory")?;
        let mut disk_ino = None;
        for e in rtree.iter() {
            for i in 0..e.len {
                let b = r.block(e.pblk + u64::from(i))?;
                for ent in dir::decode_block(&b, rseed, "root directory")? {
                    if ent.name == DISK_NAME.as_bytes() {
                        disk_ino = Some(ent.ino);
                    }
                }
            }
        }
        let disk_ino = disk_ino.ok_or(FormatError::Corrupt {
            what: "image".into(),
            detail: "no /disk file".into(),
        })?;
        if disk_ino == 0 || disk_ino > sb.inodes_count {
            return Err(corrupt("/disk", format!("inode number {disk_ino}")).into());
        }
        let (disk, itable_blk, itable) = r.inode(&sb, &descs, disk_ino)?;
        if !disk.is_reg() {
            return Err(corrupt("/disk", "not a regular file").into());
        }
        let disk_iseed = inode_seed(seed, disk_ino, disk.generation);
        let tree = r.tree(&disk, disk_iseed, "/disk")?;
        let disk_blocks = disk.size.div_ceil(BLOCK_SIZE_U64);
        if disk_blocks > crate::ext4::MAX_FILE_BLOCKS {
            return Err(corrupt("/disk", "larger than 16 TiB - 4 KiB").into());
        }
        // Block bitmaps, each checked against its descriptor.
        let mut bitmaps = Vec::with_capacity(descs.len());
        for (g, d) in descs.iter().enumerate() {
            let bm = if d.flags & BG_BLOCK_UNINIT != 0 {
                synthesize_bitmap(&sb, &descs, g as u64)
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
            // Compact at once: a large image's bitmaps are never all in memory together.
            bitmaps.push(crate::mapping::usemap::UseMap::from_bitmap(&bm));
        }
        // Identity placement starts past the journal (and any backup range right after it).
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
        let alloc = Allocator::new(
            sb.blocks_count,
            data_start,
            data_start + disk_blocks,
            descs,
            bitmaps,
        );
        let journal = if opts.read_only {
            None
        } else {
            if !jsb.has_csum_v3() {
                // A journal made by mke2fs: upgrade it while it is empty, as the kernel does.
                jsb.upgrade_features();
                io.write_at(&jsb.encode(), map.byte_offset(0))?;
            }
            sb.set_needs_recovery(true);
            io.write_at(&sb.encode(), SUPERBLOCK_OFFSET)?;
            io.flush()?;
            Some(Journal::new(map.clone(), jsb.clone()))
        };
        Ok(Image {
            io,
            seed,
            disk_ino,
            disk,
            disk_iseed,
            itable: (itable_blk, itable),
            tree,
            alloc,
            journal,
            journal_sb: jsb,
            log_map: map,
            disk_blocks,
            read_only: opts.read_only,
            recovery,
            overlay,
            inode_dirty: false,
            revokes: Default::default(),
            aborted: None,
            sb,
        })
    }
}
