//! `extblk create`: writes a fresh image — superblock and backups, group descriptors, bitmaps,
//! inode table, `/`, `lost+found`, the journal and an empty `/disk` — following a [`Layout`].

use crate::ext4::bitmap;
use crate::ext4::dir::{self, DirEntry, FT_DIR, FT_REG};
use crate::ext4::extent::{self, Entries, Extent, Node};
use crate::ext4::group::{GroupDesc, BG_INODE_UNINIT, BG_INODE_ZEROED, DESCS_PER_BLOCK, DESC_SIZE};
use crate::ext4::inode::{Inode, EXTENTS_FL, SECTORS_PER_BLOCK, S_IFDIR, S_IFREG};
use crate::ext4::layout::Layout;
use crate::ext4::superblock::{Superblock, SUPERBLOCK_OFFSET};
use crate::ext4::{
    inode_seed, BLOCKS_PER_GROUP, BLOCK_SIZE, BLOCK_SIZE_U64, DISK_INO, INODES_PER_GROUP,
    INODE_SIZE, JOURNAL_INO, LOST_FOUND_INO, ROOT_INO,
};
use crate::io::BlockIo;
use crate::jbd2::format::JournalSuperblock;

use super::ImageError;

/// What a new image is called and stamped with.
#[derive(Clone, Debug)]
pub struct CreateParams {
    pub label: String,
    pub uuid: [u8; 16],
    pub now: u32,
}

/// A random version-4 UUID from the kernel's generator.
pub fn random_uuid() -> std::io::Result<[u8; 16]> {
    let mut u = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut u)?;
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    Ok(u)
}

fn leaf_root(extents: Vec<Extent>) -> [u8; 60] {
    extent::encode_root(&Node {
        depth: 0,
        entries: Entries::Leaf(extents),
    })
}

fn file_inode(mode: u16, links: u16, size: u64, blocks: u64, root: [u8; 60], now: u32) -> Inode {
    let mut i = Inode::new(INODE_SIZE);
    i.mode = mode;
    i.links = links;
    i.size = size;
    i.blocks = blocks * SECTORS_PER_BLOCK;
    i.flags = EXTENTS_FL;
    i.i_block = root;
    i.atime = now;
    i.ctime = now;
    i.mtime = now;
    i.crtime = now;
    i
}

/// Inodes in use in a new image: the reserved ones (1–10), lost+found (11) and /disk (12).
const USED_INODES: u32 = DISK_INO;
/// Directories in a new image: `/` and lost+found (both in group 0).
const USED_DIRS: u32 = 2;

/// Writes a new image onto `io`, which must be at least `layout.blocks_count` blocks long.
pub fn create(io: &dyn BlockIo, layout: &Layout, p: &CreateParams) -> Result<(), ImageError> {
    let bs = BLOCK_SIZE_U64;
    if io.size() < layout.blocks_count * bs {
        return Err(ImageError::TooSmall(io.size(), layout.blocks_count * bs));
    }
    erase_metadata(io, layout)?;
    let mut sb = new_superblock(layout, p);
    let seed = sb.csum_seed();
    let (descs, free_blocks) = write_groups(io, layout, seed)?;
    sb.free_blocks_count = free_blocks;
    let jruns = layout.journal_runs();
    let jroot = journal_root(&jruns);
    write_inodes(io, layout, &jroot, p.now, seed)?;
    sb.set_journal_backup(&jroot, layout.journal_blocks * bs);
    write_directories(io, layout, seed)?;
    // Journal superblock; the rest of the log area was zeroed by `erase_metadata`.
    let jsb = JournalSuperblock::new(layout.journal_blocks as u32, p.uuid, 0);
    io.write_at(&jsb.encode(), jruns[0].0 * bs)?;
    write_gdt_and_superblocks(io, layout, &sb, &descs, seed)
}

/// Whatever was there before (an old device's data, a stale journal) must read as zero: the
/// metadata area, the journal and the backup superblock/GDT copies.
fn erase_metadata(io: &dyn BlockIo, layout: &Layout) -> Result<(), ImageError> {
    let bs = BLOCK_SIZE_U64;
    io.punch(0, layout.data_start * bs)?;
    for g in layout.backup_groups() {
        io.punch(g * BLOCKS_PER_GROUP * bs, (1 + layout.gdt_blocks) * bs)?;
    }
    Ok(())
}

/// The primary superblock as the layout and the parameters make it (free blocks counted
/// later, with the bitmaps).
fn new_superblock(layout: &Layout, p: &CreateParams) -> Superblock {
    let mut sb = Superblock::new_blank();
    sb.blocks_count = layout.blocks_count;
    sb.inodes_per_group = INODES_PER_GROUP;
    sb.inodes_count = (layout.groups * u64::from(INODES_PER_GROUP)) as u32;
    sb.free_inodes_count = sb.inodes_count - USED_INODES;
    sb.uuid = p.uuid;
    sb.set_label(&p.label);
    sb.mkfs_time = p.now;
    sb.wtime = p.now;
    sb.lastcheck = p.now;
    sb.log_groups_per_flex = layout.log_groups_per_flex();
    sb.backup_bgs = layout.backup_bgs();
    sb
}

/// Block bitmaps and group descriptors, one group at a time, and group 0's inode bitmap.
/// Returns the descriptors and the free blocks of all groups.
fn write_groups(
    io: &dyn BlockIo,
    layout: &Layout,
    seed: u32,
) -> Result<(Vec<GroupDesc>, u64), ImageError> {
    let bs = BLOCK_SIZE_U64;
    let used = layout.used_runs();
    let mut descs = Vec::with_capacity(layout.groups as usize);
    let mut free_total = 0u64;
    let zero_block = vec![0u8; BLOCK_SIZE];
    for g in 0..layout.groups {
        let base = g * BLOCKS_PER_GROUP;
        let n = bitmap::blocks_in_group(layout.blocks_count, g);
        let mut bb = vec![0u8; BLOCK_SIZE];
        for &(s, l) in &used {
            let (a, b) = (s.max(base), (s + l).min(base + n));
            if a < b {
                bitmap::set_range(&mut bb, (a - base) as usize, (b - base) as usize);
            }
        }
        bitmap::set_range(&mut bb, n as usize, BLOCKS_PER_GROUP as usize);
        let free = bitmap::count_free(&bb, n as usize);
        free_total += free;
        if bb != zero_block {
            io.write_at(&bb, layout.block_bitmap(g) * bs)?;
        }
        let first = g == 0;
        let mut d = GroupDesc {
            block_bitmap: layout.block_bitmap(g),
            inode_bitmap: layout.inode_bitmap(g),
            inode_table: layout.inode_table(g),
            free_blocks: free as u32,
            free_inodes: if first {
                INODES_PER_GROUP - USED_INODES
            } else {
                INODES_PER_GROUP
            },
            used_dirs: if first { USED_DIRS } else { 0 },
            flags: if first {
                BG_INODE_ZEROED
            } else {
                BG_INODE_UNINIT | BG_INODE_ZEROED
            },
            block_bitmap_csum: bitmap::block_bitmap_csum(seed, &bb),
            inode_bitmap_csum: 0,
            itable_unused: if first {
                INODES_PER_GROUP - USED_INODES
            } else {
                INODES_PER_GROUP
            },
        };
        if first {
            let mut ib = vec![0xFFu8; BLOCK_SIZE];
            ib[..INODES_PER_GROUP as usize / 8].fill(0);
            bitmap::set_range(&mut ib, 0, USED_INODES as usize);
            d.inode_bitmap_csum = bitmap::inode_bitmap_csum(seed, &ib, INODES_PER_GROUP);
            io.write_at(&ib, layout.inode_bitmap(0) * bs)?;
        }
        descs.push(d);
    }
    Ok((descs, free_total))
}

/// The journal inode's extent root: its runs (`Layout::journal_runs`) one after the other in
/// the log.
fn journal_root(jruns: &[(u64, u64)]) -> [u8; 60] {
    let mut jext = Vec::new();
    let mut lblk = 0u32;
    for &(s, l) in jruns {
        jext.push(Extent {
            lblk,
            len: l as u32,
            pblk: s,
            unwritten: false,
        });
        lblk += l as u32;
    }
    leaf_root(jext)
}

/// Group 0's inode table: `/`, the journal (its extent root `jroot`), lost+found and an empty
/// `/disk`; the reserved inodes stay zero.
fn write_inodes(
    io: &dyn BlockIo,
    layout: &Layout,
    jroot: &[u8; 60],
    now: u32,
    seed: u32,
) -> Result<(), ImageError> {
    let bs = BLOCK_SIZE_U64;
    let jsize = layout.journal_blocks * bs;
    // Link counts: `/` is named by its own `.` and `..` and by lost+found's `..`; lost+found
    // by its `.` and its entry in `/`; `/disk` by its entry; the journal, which no directory
    // names, has 1 as mke2fs gives it.
    let inodes = [
        (
            ROOT_INO,
            file_inode(
                S_IFDIR | 0o755,
                3,
                bs,
                1,
                leaf_root(vec![Extent {
                    lblk: 0,
                    len: 1,
                    pblk: layout.root_dir_block(),
                    unwritten: false,
                }]),
                now,
            ),
        ),
        (
            JOURNAL_INO,
            file_inode(
                S_IFREG | 0o600,
                1,
                jsize,
                layout.journal_blocks,
                *jroot,
                now,
            ),
        ),
        (
            LOST_FOUND_INO,
            file_inode(
                S_IFDIR | 0o700,
                2,
                bs,
                1,
                leaf_root(vec![Extent {
                    lblk: 0,
                    len: 1,
                    pblk: layout.lost_found_block(),
                    unwritten: false,
                }]),
                now,
            ),
        ),
        (
            DISK_INO,
            file_inode(
                S_IFREG | 0o600,
                1,
                layout.disk_size,
                0,
                leaf_root(vec![]),
                now,
            ),
        ),
    ];
    let mut itable = vec![0u8; BLOCK_SIZE];
    let isz = usize::from(INODE_SIZE);
    for (ino, inode) in &inodes {
        let off = (*ino as usize - 1) * isz;
        itable[off..off + isz].copy_from_slice(&inode.encode(*ino, seed));
    }
    io.write_at(&itable, layout.inode_table(0) * bs)?;
    Ok(())
}

/// The blocks of `/` (`.`, `..`, lost+found, disk) and of lost+found (`.`, `..`).
fn write_directories(io: &dyn BlockIo, layout: &Layout, seed: u32) -> Result<(), ImageError> {
    let bs = BLOCK_SIZE_U64;
    let root = dir::encode_block(
        &[
            DirEntry::new(ROOT_INO, ".", FT_DIR),
            DirEntry::new(ROOT_INO, "..", FT_DIR),
            DirEntry::new(LOST_FOUND_INO, "lost+found", FT_DIR),
            DirEntry::new(DISK_INO, crate::ext4::DISK_NAME, FT_REG),
        ],
        inode_seed(seed, ROOT_INO, 0),
    );
    io.write_at(&root, layout.root_dir_block() * bs)?;
    let lf = dir::encode_block(
        &[
            DirEntry::new(LOST_FOUND_INO, ".", FT_DIR),
            DirEntry::new(ROOT_INO, "..", FT_DIR),
        ],
        inode_seed(seed, LOST_FOUND_INO, 0),
    );
    io.write_at(&lf, layout.lost_found_block() * bs)?;
    Ok(())
}

/// Group descriptor tables, then the superblocks: the backups with their GDT copies, and the
/// primary last, after a barrier (an image is an image only once everything else is there).
fn write_gdt_and_superblocks(
    io: &dyn BlockIo,
    layout: &Layout,
    sb: &Superblock,
    descs: &[GroupDesc],
    seed: u32,
) -> Result<(), ImageError> {
    let bs = BLOCK_SIZE_U64;
    let mut gdt = vec![0u8; (layout.gdt_blocks * bs) as usize];
    for (g, d) in descs.iter().enumerate() {
        gdt[g * DESC_SIZE..(g + 1) * DESC_SIZE].copy_from_slice(&d.encode(g as u64, seed));
    }
    debug_assert!(descs.len() as u64 <= layout.gdt_blocks * DESCS_PER_BLOCK);
    io.write_at(&gdt, bs)?;
    for g in layout.backup_groups() {
        let at = g * BLOCKS_PER_GROUP * bs;
        let mut copy = sb.clone();
        copy.block_group_nr = g as u16;
        io.write_at(&copy.encode(), at)?;
        io.write_at(&gdt, at + bs)?;
    }
    io.flush()?;
    io.write_at(&sb.encode(), SUPERBLOCK_OFFSET)?;
    io.flush()?;
    Ok(())
}

/// Creates an image at `path`: a new sparse file, or (with `force`) an existing file or block
/// device, overwritten. Returns the layout written.
///
/// An existing file is opened without `O_TRUNC` and emptied only once this process holds the
/// image lock: a daemon (or a tool) that holds it keeps its image byte for byte, and this fails
/// with [`OpenError::Locked`](crate::io::backing::OpenError::Locked).
pub fn create_path(
    path: &std::path::Path,
    disk_size: u64,
    journal_blocks: Option<u64>,
    force: bool,
) -> Result<Layout, ImageError> {
    use crate::io::backing::{Backing, OpenError};
    use std::os::unix::fs::FileTypeExt;
    let journal =
        journal_blocks.unwrap_or_else(|| crate::ext4::layout::default_journal_blocks(disk_size));
    let meta = std::fs::metadata(path).ok();
    if meta.is_some() && !force {
        return Err(ImageError::Exists(path.to_path_buf()));
    }
    let is_dev = match &meta {
        Some(m) if m.file_type().is_block_device() => true,
        Some(m) if !m.file_type().is_file() => {
            return Err(OpenError::NotFileOrDevice(path.to_path_buf()).into())
        }
        _ => false,
    };
    if is_dev {
        let io = crate::io::FileIo::open(path, false)?;
        let layout = Layout::compute(disk_size, journal, Some(io.size() / BLOCK_SIZE_U64))?;
        create(&io, &layout, &default_params()?)?;
        return Ok(layout);
    }
    let layout = Layout::compute(disk_size, journal, None)?;
    // Everything that can fail without touching the file is done before it is touched.
    let params = default_params()?;
    let mut open = std::fs::OpenOptions::new();
    open.read(true).write(true);
    if meta.is_none() {
        // Not there a moment ago: if something made it since, it is not ours to overwrite.
        open.create_new(true);
    }
    let file = open.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => ImageError::Exists(path.to_path_buf()),
        _ => OpenError::Open(path.to_path_buf(), e).into(),
    })?;
    let made = (|| {
        let mut backing = Backing::lock(file, path, false)?;
        // Locked: now the old contents may go. Emptied first so none of them survives as data.
        backing.set_len(0)?;
        backing.set_len(layout.blocks_count * BLOCK_SIZE_U64)?;
        let io = crate::io::FileIo::new(backing);
        create(&io, &layout, &params)
    })();
    if let Err(e) = made {
        if meta.is_none() {
            // This call made the file (create_new): a half-made image is nobody's.
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    Ok(layout)
}

fn default_params() -> Result<CreateParams, ImageError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    Ok(CreateParams {
        label: "extblk".into(),
        uuid: random_uuid()?,
        now,
    })
}
