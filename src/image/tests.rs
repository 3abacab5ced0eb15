//! Images in memory with hand-made damage behind valid checksums (block_validity), and ENOSPC
//! in the middle of tree edits (a failed operation changes nothing).

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;

use super::create::{create, CreateParams};
use super::reseal::reseal;
use super::{Image, ImageError, OpenOptions};
use crate::ext4::extent::{self, Entries, Extent, Index, Node};
use crate::ext4::inode::Inode;
use crate::ext4::layout::Layout;
use crate::ext4::{inode_seed, FormatError, BLOCK_SIZE, DISK_INO, INODE_SIZE};
use crate::io::mem::MemIo;
use crate::io::BlockIo;
use crate::mapping::tree::ExtentTree;
use crate::mapping::zone::Owner;
use crate::rng::Rng;

const UUID: [u8; 16] = [7; 16];

/// A fresh image of a `disk_blocks`-block disk with a 1024-block journal, in memory.
fn fresh(disk_blocks: u64) -> (Vec<u8>, Layout) {
    let layout = Layout::compute(disk_blocks * 4096, 1024, None).unwrap();
    let io = MemIo::new(vec![0u8; (layout.blocks_count * 4096) as usize]);
    create(
        &io,
        &layout,
        &CreateParams {
            label: "t".into(),
            uuid: UUID,
            now: 1_700_000_000,
        },
    )
    .unwrap();
    (io.into_inner(), layout)
}

fn open(bytes: Vec<u8>, read_only: bool) -> Result<Image, ImageError> {
    let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(bytes));
    Image::open(io, OpenOptions { read_only })
}

/// Runs `f` on the image read-write, closes it cleanly, returns the bytes.
fn edit_image(bytes: Vec<u8>, f: impl FnOnce(&mut Image)) -> Vec<u8> {
    let io = Arc::new(MemIo::new(bytes));
    let dynio: Arc<dyn BlockIo> = io.clone();
    let mut img = Image::open(dynio, OpenOptions::default()).unwrap();
    f(&mut img);
    img.close().unwrap();
    Arc::try_unwrap(io).ok().unwrap().into_inner()
}

/// A 4 MiB disk: `n` single-block extents at even logical blocks (a depth-1 tree from 5 on).
fn with_extents(n: u32) -> (Vec<u8>, Layout) {
    let (bytes, layout) = fresh(1024);
    let bytes = edit_image(bytes, |img| {
        for k in 0..u64::from(n) {
            img.allocate(2 * k, 1).unwrap();
        }
        img.convert(0, 1024).unwrap();
    });
    (bytes, layout)
}

fn seed() -> u32 {
    crate::ext4::fs_seed(&UUID)
}

/// `/disk`'s inode bytes.
fn disk_inode_at(layout: &Layout) -> usize {
    (layout.inode_table(0) as usize) * BLOCK_SIZE + (DISK_INO as usize - 1) * INODE_SIZE as usize
}

fn disk_inode(bytes: &[u8], layout: &Layout) -> Inode {
    let at = disk_inode_at(layout);
    Inode::decode(&bytes[at..at + 256], DISK_INO, seed()).unwrap()
}

fn disk_iseed(bytes: &[u8], layout: &Layout) -> u32 {
    inode_seed(seed(), DISK_INO, disk_inode(bytes, layout).generation)
}

/// Rewrites `/disk`'s extent root, then every checksum.
fn edit_root(bytes: &mut [u8], layout: &Layout, f: impl FnOnce(&mut Node)) {
    let mut inode = disk_inode(bytes, layout);
    let mut root = extent::decode_root(&inode.i_block).unwrap();
    f(&mut root);
    inode.i_block = extent::encode_root(&root);
    let at = disk_inode_at(layout);
    bytes[at..at + 256].copy_from_slice(&inode.encode(DISK_INO, seed()));
    reseal(bytes);
}

/// Rewrites the tree block `pblk` of `/disk`, then every checksum.
fn edit_block(bytes: &mut [u8], layout: &Layout, pblk: u64, f: impl FnOnce(&mut Node)) {
    let iseed = disk_iseed(bytes, layout);
    let at = pblk as usize * BLOCK_SIZE;
    let mut node = extent::decode_block(&bytes[at..at + BLOCK_SIZE], iseed, pblk).unwrap();
    f(&mut node);
    bytes[at..at + BLOCK_SIZE].copy_from_slice(&extent::encode_block(&node, iseed));
    reseal(bytes);
}

fn first_leaf(bytes: &[u8], layout: &Layout) -> u64 {
    let root = extent::decode_root(&disk_inode(bytes, layout).i_block).unwrap();
    match root.entries {
        Entries::Index(v) => v[0].child,
        Entries::Leaf(_) => panic!("depth 0"),
    }
}

fn leaf_extents(node: &mut Node) -> &mut Vec<Extent> {
    match &mut node.entries {
        Entries::Leaf(v) => v,
        Entries::Index(_) => panic!("not a leaf"),
    }
}

/// Both opens refuse the image with a block-validity error that mentions `want`.
fn refused(bytes: &[u8], want: &str) {
    for ro in [true, false] {
        match open(bytes.to_vec(), ro) {
            Ok(_) => panic!("opened (read_only {ro}) an image that should be refused ({want})"),
            Err(ImageError::Format(e @ FormatError::BlockValidity { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains(want), "read_only {ro}: {msg:?} lacks {want:?}");
            }
            Err(e) => panic!("read_only {ro}: not a block-validity error: {e}"),
        }
    }
}

#[test]
fn resealed_images_still_open() {
    // The reseal helper itself must not disturb a valid image.
    let (mut bytes, _) = with_extents(50);
    let before = bytes.clone();
    reseal(&mut bytes);
    assert!(before == bytes, "reseal changed a valid image");
    open(bytes, false).unwrap();
}

#[test]
fn an_extent_past_the_end_of_the_filesystem_is_refused() {
    let (mut bytes, layout) = with_extents(2);
    let n = layout.blocks_count;
    edit_root(&mut bytes, &layout, |r| {
        leaf_extents(r)[1].pblk = n - 2;
        leaf_extents(r)[1].len = 5;
    });
    refused(&bytes, "past the end of the filesystem");
    // Far past it, and a 48-bit start that would overflow any sum.
    edit_root(&mut bytes, &layout, |r| {
        leaf_extents(r)[1].pblk = (1 << 48) - 2
    });
    refused(&bytes, "past the end of the filesystem");
}

#[test]
fn extents_into_group_metadata_are_refused() {
    let (bytes, layout) = with_extents(2);
    for (blk, what) in [
        (0, "superblock/GDT copy of group 0"),
        (1, "superblock/GDT copy of group 0"),
        (layout.block_bitmap(0), "block bitmap of group 0"),
        (layout.inode_bitmap(0), "inode bitmap of group 0"),
        (layout.inode_table(0), "inode table of group 0"),
        (layout.root_dir_block(), "directory inode 2"),
        (layout.lost_found_block(), "directory inode 11"),
    ] {
        let mut b = bytes.clone();
        edit_root(&mut b, &layout, |r| leaf_extents(r)[0].pblk = blk);
        refused(&b, what);
    }
    // An extent that starts in the data area and runs into the bitmaps of a backup group.
    let (bytes, layout) = fresh(40_000);
    let backup = 32768;
    let mut b = edit_image(bytes, |img| {
        img.allocate(0, 1).unwrap();
    });
    edit_root(&mut b, &layout, |r| {
        leaf_extents(r)[0].pblk = backup - 3;
        leaf_extents(r)[0].len = 10;
    });
    refused(&b, "superblock/GDT copy of group 1");
}

#[test]
fn extents_into_the_journal_are_refused() {
    let (bytes, layout) = with_extents(2);
    let (jstart, jlen) = layout.journal_runs()[0];
    for (start, len) in [(jstart, 1), (jstart + 500, 3), (jstart + jlen - 1, 2)] {
        let mut b = bytes.clone();
        edit_root(&mut b, &layout, |r| {
            leaf_extents(r)[1].pblk = start;
            leaf_extents(r)[1].len = len;
        });
        refused(&b, "the journal");
    }
}

#[test]
fn index_entries_into_metadata_or_loops_are_refused() {
    let (bytes, layout) = with_extents(200);
    for (blk, what) in [
        (layout.inode_table(0), "inode table"),
        (layout.block_bitmap(0), "block bitmap"),
        (layout.journal_runs()[0].0 + 7, "journal"),
        (layout.blocks_count + 5, "past the end"),
    ] {
        let mut b = bytes.clone();
        edit_root(&mut b, &layout, |r| match &mut r.entries {
            Entries::Index(v) => v[0].child = blk,
            Entries::Leaf(_) => panic!("depth 0"),
        });
        refused(&b, what);
    }
    // Two index entries naming one block: a loop in the making.
    let mut b = bytes.clone();
    let leaf = first_leaf(&b, &layout);
    edit_root(&mut b, &layout, |r| match &mut r.entries {
        Entries::Index(v) => v.push(Index {
            lblk: 5000,
            child: leaf,
        }),
        Entries::Leaf(_) => panic!("depth 0"),
    });
    match open(b, true) {
        Err(ImageError::Format(e)) => assert!(e.to_string().contains("referenced twice"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a block referenced twice was accepted"),
    }
    // A data extent over its own leaf block.
    let mut b = bytes.clone();
    edit_block(&mut b, &layout, leaf, |n| leaf_extents(n)[3].pblk = leaf);
    refused(&b, "a /disk extent tree block");
}

#[test]
fn overlapping_extents_are_refused() {
    // Two leaves.
    let (bytes, layout) = with_extents(400);
    let leaf = first_leaf(&bytes, &layout);
    // Logically overlapping inside a leaf (decode catches it, checksum and all).
    let mut b = bytes.clone();
    edit_block(&mut b, &layout, leaf, |n| leaf_extents(n)[2].len = 7);
    match open(b, true) {
        Err(ImageError::Format(e)) => assert!(e.to_string().contains("overlapping"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("overlapping extents accepted"),
    }
    // Logically overlapping across leaves: the first leaf's last extent reaches into the next.
    let mut b = bytes.clone();
    edit_block(&mut b, &layout, leaf, |n| {
        let v = leaf_extents(n);
        let last = v.len() - 1;
        v[last].len = 40;
    });
    match open(b, true) {
        Err(ImageError::Format(e)) => assert!(e.to_string().contains("overlaps"), "{e}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("overlapping extents across leaves accepted"),
    }
    // Physically overlapping (two logical blocks, one physical block): refused read-write,
    // where the allocator would hand the block out again after one of them is punched.
    let mut b = bytes.clone();
    edit_block(&mut b, &layout, leaf, |n| {
        let v = leaf_extents(n);
        v[5].pblk = v[4].pblk;
    });
    match open(b.clone(), false) {
        Err(ImageError::Format(e @ FormatError::BlockValidity { .. })) => {
            assert!(
                e.to_string()
                    .contains("the /disk extent at logical block 8"),
                "{e}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a doubly used block was accepted read-write"),
    }
    // Read-only, `check` gets to report it.
    let img = open(b, true).unwrap();
    let report = crate::check::check(&img, "t".into());
    assert!(
        report.problems.iter().any(|p| p.contains("used twice")),
        "{:?}",
        report.problems
    );
}

#[test]
fn blocks_marked_free_are_refused_read_write_but_repairable() {
    let (bytes, layout) = with_extents(20);
    let mut b = bytes.clone();
    let pblk = open(bytes, true)
        .unwrap()
        .tree()
        .iter()
        .nth(3)
        .unwrap()
        .pblk;
    // Clear the bit and the count together: every checksum and counter agrees.
    let bb = layout.block_bitmap(0) as usize * BLOCK_SIZE;
    crate::ext4::bitmap::clear(&mut b[bb..bb + BLOCK_SIZE], pblk as usize);
    reseal(&mut b);
    match open(b.clone(), false) {
        Err(ImageError::Format(e @ FormatError::BlockValidity { .. })) => {
            assert!(e.to_string().contains("marked free"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a mapped block marked free was accepted read-write"),
    }
    open(b.clone(), true).unwrap();
    let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(b));
    Image::open_for_repair(io).unwrap();
}

#[test]
fn a_journal_over_the_inode_table_is_refused() {
    let (mut bytes, layout) = with_extents(2);
    let it = layout.inode_table(0);
    // The journal inode's one extent moved onto the inode table.
    let jat = it as usize * BLOCK_SIZE + (crate::ext4::JOURNAL_INO as usize - 1) * 256;
    let mut j = Inode::decode(&bytes[jat..jat + 256], crate::ext4::JOURNAL_INO, seed()).unwrap();
    let mut root = extent::decode_root(&j.i_block).unwrap();
    leaf_extents(&mut root)[0].pblk = it - 1;
    j.i_block = extent::encode_root(&root);
    bytes[jat..jat + 256].copy_from_slice(&j.encode(crate::ext4::JOURNAL_INO, seed()));
    reseal(&mut bytes);
    refused(&bytes, "journal inode extent");
}

#[test]
fn group_metadata_overlapping_itself_is_refused() {
    use crate::ext4::group::{GroupDesc, DESC_SIZE};
    let (mut bytes, layout) = with_extents(2);
    let at = BLOCK_SIZE;
    let mut d = GroupDesc::decode(&bytes[at..at + DESC_SIZE], 0, seed()).unwrap();
    d.inode_bitmap = layout.inode_table(0);
    bytes[at..at + DESC_SIZE].copy_from_slice(&d.encode(0, seed()));
    reseal(&mut bytes);
    match open(bytes, true) {
        Err(ImageError::Format(e @ FormatError::BlockValidity { .. })) => {
            assert!(e.to_string().contains("inode table of group 0"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an inode bitmap inside the inode table was accepted"),
    }
}

#[test]
fn the_allocator_refuses_bad_frees_without_changing_anything() {
    let (bytes, layout) = with_extents(20);
    let mut img = open(bytes, false).unwrap();
    let before = img.pool.alloc.clone();
    let used = img.tree().iter().next().unwrap().pblk;
    let n = layout.blocks_count;
    for (s, l) in [
        (n - 1, 2),
        (u64::MAX - 1, 4),
        (layout.inode_table(0), 1),
        (layout.journal_runs()[0].0, 1),
        (used, 0),
    ] {
        assert!(
            matches!(
                img.pool.alloc.free(s, l),
                Err(crate::mapping::MapError::Invalid { .. })
            ),
            "{s}+{l}"
        );
    }
    // A free block freed (a double free).
    assert!(matches!(
        img.pool.alloc.free(n - 1, 1),
        Err(crate::mapping::MapError::Inconsistent { used: false, .. })
    ));
    // Half used, half free: refused whole.
    assert!(img.pool.alloc.free(used, 2).is_err());
    assert!(
        img.pool.alloc == before,
        "a refused free changed the allocator"
    );
    // The zone is never handed out, even where a bitmap marks it free: here the backup
    // superblock of group 1, inside the data area.
    let (bytes, _) = fresh(40_000);
    let mut img = open(bytes, false).unwrap();
    let backup = 32768;
    assert!(img.pool.alloc.zone().owner(backup).is_some());
    let mut bm = img.pool.alloc.bitmap(1);
    crate::ext4::bitmap::clear(&mut bm, 0);
    crate::ext4::bitmap::clear(&mut bm, 1);
    img.pool.alloc.replace_bitmap(1, bm);
    let mut got = 0;
    while let Ok((s, l)) = img.pool.alloc.alloc(backup - 10, 4096) {
        assert!(
            s + l <= backup || s >= backup + 2,
            "backup superblock allocated"
        );
        got += l;
    }
    assert!(got > 30_000, "the allocator stopped early: {got}");
}

/// What a failed operation must leave exactly as it was.
#[derive(PartialEq)]
struct Snapshot {
    tree: ExtentTree,
    alloc: crate::mapping::alloc::Allocator,
    inode_dirty: bool,
    revokes: BTreeSet<u64>,
}

fn snapshot(img: &Image) -> Snapshot {
    Snapshot {
        tree: img.disk.tree.clone(),
        alloc: img.pool.alloc.clone(),
        inode_dirty: img.disk.inode_dirty,
        revokes: img.pool.revokes.clone(),
    }
}

/// Leaves `keep` free blocks: the rest are taken straight from the allocator (leaked).
fn eat_free_blocks(img: &mut Image, keep: u64) {
    while img.pool.alloc.free_blocks() > keep {
        let want = (img.pool.alloc.free_blocks() - keep).min(32768);
        if img.pool.alloc.alloc(0, want).is_err() {
            break;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Allocate,
    Convert,
    Zero,
    Punch,
}

fn apply(img: &mut Image, op: Op, lblk: u64, len: u64) -> Result<(), ImageError> {
    match op {
        Op::Allocate => img.allocate(lblk, len).map(drop),
        Op::Convert => img.convert(lblk, len).map(drop),
        Op::Zero => img.zero(lblk, len),
        Op::Punch => img.punch(lblk, len).map(drop),
    }
}

/// An edit that hits ENOSPC must leave tree, allocator and transaction state as they were.
fn checked(img: &mut Image, op: Op, lblk: u64, len: u64) -> bool {
    let before = snapshot(img);
    match apply(img, op, lblk, len) {
        Err(ImageError::NoSpace) => {
            let after = snapshot(img);
            assert!(
                after == before,
                "{op:?} {lblk}+{len} failed with ENOSPC but changed the image's state"
            );
            true
        }
        Err(e) => panic!("{op:?} {lblk}+{len}: {e}"),
        Ok(()) => false,
    }
}

/// Splits in the middle of extents (punch, convert, zero of one inner block: one extent
/// becomes two or three) deep in a two-level tree, with no block left for a new leaf.
#[test]
fn enospc_splitting_extents_deep_in_the_tree_changes_nothing() {
    let (bytes, _) = fresh(8192);
    let mut img = open(bytes, false).unwrap();
    // 2048 three-block extents, separated by one-block holes; every other one written.
    for i in 0..2048u64 {
        img.allocate(4 * i, 3).unwrap();
        if i % 2 == 0 {
            img.convert(4 * i, 3).unwrap();
        }
        if img.should_commit() {
            img.commit().unwrap();
        }
    }
    img.commit().unwrap();
    assert_eq!(img.tree().depth(), 2);
    eat_free_blocks(&mut img, 0);
    let mut rng = Rng::new(5);
    let mut failed = [0u32; 4];
    for _ in 0..3000 {
        let i = rng.below(2048);
        let op = [Op::Punch, Op::Convert, Op::Zero, Op::Allocate][rng.below(4) as usize];
        let (lblk, len) = match op {
            // The hole between two extents: a new extent needs a data block, never there.
            Op::Allocate => (4 * i + 3, 1),
            _ => (4 * i + 1, 1),
        };
        if checked(&mut img, op, lblk, len) {
            failed[op as usize] += 1;
        }
    }
    for (k, n) in failed.iter().enumerate() {
        assert!(*n > 0, "op {k} never hit ENOSPC: {failed:?}");
    }
    // Whatever succeeded left a consistent tree: commit, close, reopen.
    let runs = img.runs();
    img.commit().unwrap();
    let io = img.io().clone();
    img.close().unwrap();
    let again = Image::open(io, OpenOptions { read_only: true }).unwrap();
    assert_eq!(again.runs(), runs);
}

fn op_strategy() -> impl Strategy<Value = (u8, u64, u64)> {
    (
        0u8..5,
        0u64..1024,
        prop_oneof![1u64..4, 1u64..64, 1u64..1024],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Random operations on a nearly full image: each one that hits ENOSPC (for data or for a
    /// tree block) leaves the tree, the allocator's bitmaps and counters and the running
    /// transaction exactly as they were.
    #[test]
    fn enospc_on_a_nearly_full_image_changes_nothing(
        keep in 0u64..24,
        scatter in 0u64..600,
        ops in prop::collection::vec(op_strategy(), 1..150),
    ) {
        let (bytes, _) = fresh(1024);
        let mut img = open(bytes, false).unwrap();
        for k in 0..scatter {
            img.allocate(k * 7 % 1021, 1).unwrap();
        }
        eat_free_blocks(&mut img, keep);
        for (kind, lblk, len) in ops {
            let len = len.min(1024 - lblk);
            if kind == 4 {
                img.commit().unwrap();
                continue;
            }
            let op = [Op::Allocate, Op::Convert, Op::Zero, Op::Punch][kind as usize];
            checked(&mut img, op, lblk, len);
        }
        img.commit().unwrap();
    }
}

#[test]
fn the_zone_names_what_a_block_belongs_to() {
    let (bytes, layout) = with_extents(2);
    let img = open(bytes, true).unwrap();
    let z = img.allocator().zone();
    assert_eq!(z.owner(0), Some(Owner::Superblock { group: 0 }));
    assert_eq!(
        z.owner(layout.inode_table(0)),
        Some(Owner::InodeTable { group: 0 })
    );
    assert_eq!(
        z.owner(layout.journal_runs()[0].0 + 3),
        Some(Owner::Journal)
    );
    assert_eq!(z.owner(layout.data_start + 3), None);
}

/// A sparse image in memory (blocks that were never written read as zeroes), so that crash
/// states of a multi-GiB filesystem cost only the blocks written.
struct SparseIo {
    blocks: std::sync::Mutex<(std::collections::HashMap<u64, Vec<u8>>, u64)>,
}

impl SparseIo {
    fn new(blocks: std::collections::HashMap<u64, Vec<u8>>, size: u64) -> SparseIo {
        SparseIo {
            blocks: std::sync::Mutex::new((blocks, size)),
        }
    }
    fn from_bytes(b: &[u8]) -> SparseIo {
        let mut m = std::collections::HashMap::new();
        for (i, c) in b.chunks(BLOCK_SIZE).enumerate() {
            if c.iter().any(|&x| x != 0) {
                m.insert(i as u64, c.to_vec());
            }
        }
        SparseIo::new(m, b.len() as u64)
    }
    fn snapshot(&self) -> (std::collections::HashMap<u64, Vec<u8>>, u64) {
        self.blocks.lock().unwrap().clone()
    }
}

impl BlockIo for SparseIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let g = self.blocks.lock().unwrap();
        assert!(offset + buf.len() as u64 <= g.1, "read past the end");
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (k, o) = (at / 4096, (at % 4096) as usize);
            let n = (BLOCK_SIZE - o).min(buf.len() - done);
            match g.0.get(&k) {
                Some(b) => buf[done..done + n].copy_from_slice(&b[o..o + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut g = self.blocks.lock().unwrap();
        assert!(offset + buf.len() as u64 <= g.1, "write past the end");
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let (k, o) = (at / 4096, (at % 4096) as usize);
            let n = (BLOCK_SIZE - o).min(buf.len() - done);
            let b = g.0.entry(k).or_insert_with(|| vec![0u8; BLOCK_SIZE]);
            b[o..o + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut g = self.blocks.lock().unwrap();
        for k in offset / 4096..(offset + len) / 4096 {
            g.0.remove(&k);
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.blocks.lock().unwrap().1
    }
    fn grow(&self, len: u64) -> std::io::Result<()> {
        let mut g = self.blocks.lock().unwrap();
        g.1 = g.1.max(len);
        Ok(())
    }
}

/// A crash anywhere in a resize leaves the old image or the new one, each consistent, with
/// every written block's data where it was; the resize grows through a larger descriptor table
/// (group 0's bitmaps and inode table moved out of its way).
#[test]
fn a_crash_anywhere_in_a_resize_leaves_the_old_image_or_the_new_one() {
    use crate::io::record::{IoEvent, RecordingIo};
    let (bytes, _) = fresh(16384);
    // Some data: written blocks at both ends of the disk and in the middle.
    let bytes = edit_image(bytes, |img| {
        for (l, n) in [(0u64, 8u64), (8000, 3), (16380, 4)] {
            img.allocate(l, n).unwrap();
            img.convert(l, n).unwrap();
        }
        img.commit().unwrap();
    });
    let base = SparseIo::from_bytes(&bytes);
    let old_size = 16384 * 4096;
    let (old_runs, stamps) = {
        let io: Arc<dyn BlockIo> = Arc::new(SparseIo::new(base.snapshot().0, base.size()));
        let img = Image::open(io.clone(), OpenOptions { read_only: true }).unwrap();
        let runs = img.runs();
        // Stamp each written block's data in place (the blocks are data, not metadata).
        let mut stamps = Vec::new();
        for r in runs.iter().filter(|r| r.kind == super::RunKind::Data) {
            for k in 0..r.len {
                let p = r.pblk.unwrap() + k;
                let data = vec![(r.lblk + k) as u8 ^ 0x5A; BLOCK_SIZE];
                stamps.push((p, data));
            }
        }
        (runs, stamps)
    };
    let mut start = base.snapshot();
    for (p, d) in &stamps {
        start.0.insert(*p, d.clone());
    }
    let new_size = 9u64 << 30;
    let inner: Arc<dyn BlockIo> = Arc::new(SparseIo::new(start.0.clone(), start.1));
    let rec = Arc::new(RecordingIo::new(inner));
    let dynio: Arc<dyn BlockIo> = rec.clone();
    let mut img = Image::open(dynio, OpenOptions::default()).unwrap();
    let events_before = rec.len();
    let plan = img.resize(new_size, false).unwrap();
    assert!(plan.new_gdt_blocks > plan.old_gdt_blocks, "{plan:?}");
    assert!(!plan.moved.is_empty(), "{plan:?}");
    drop(img);
    let events = rec.events();
    // The state the resize started from: the open's own writes applied.
    let mut first = start.clone();
    apply_sparse(&mut first.0, &events[..events_before]);
    let resize_events = &events[events_before..];
    let cuts: Vec<usize> = (0..=resize_events.len())
        .filter(|&i| {
            i == resize_events.len()
                || matches!(
                    resize_events[i],
                    IoEvent::Write { .. } | IoEvent::FlushStart
                )
        })
        .collect();
    let (mut saw_old, mut saw_new) = (false, false);
    for i in cuts {
        let mut st = first.clone();
        apply_sparse(&mut st.0, &resize_events[..i]);
        let size = st.1.max(plan.new_fs_blocks * 4096);
        let io: Arc<dyn BlockIo> = Arc::new(SparseIo::new(st.0, size));
        let img = Image::open(io, OpenOptions::default())
            .unwrap_or_else(|e| panic!("crash after event {i}: open failed: {e}"));
        let d = img.disk_size();
        assert!(
            d == old_size || d == new_size,
            "crash after event {i}: size {d}"
        );
        saw_old |= d == old_size;
        saw_new |= d == new_size;
        let report = crate::check::check(&img, format!("cut {i}"));
        assert!(
            report.problems.is_empty(),
            "crash after event {i}: {:?}",
            report.problems
        );
        let runs: Vec<_> = img
            .runs()
            .into_iter()
            .filter(|r| r.kind != super::RunKind::Hole)
            .collect();
        let want: Vec<_> = old_runs
            .iter()
            .filter(|r| r.kind != super::RunKind::Hole)
            .cloned()
            .collect();
        assert_eq!(runs, want, "crash after event {i}: the mapping changed");
        for (p, data) in &stamps {
            let mut b = vec![0u8; BLOCK_SIZE];
            img.read_block(*p, &mut b).unwrap();
            assert!(&b == data, "crash after event {i}: block {p} lost its data");
        }
        if d == new_size {
            assert_eq!(img.superblock().blocks_count, plan.new_fs_blocks);
        }
    }
    assert!(
        saw_old && saw_new,
        "the cuts never saw both sides of the commit"
    );
}

/// Applies recorded writes and punches to a sparse block map (`record::apply` on a map).
fn apply_sparse(
    m: &mut std::collections::HashMap<u64, Vec<u8>>,
    events: &[crate::io::record::IoEvent],
) {
    use crate::io::record::IoEvent;
    for e in events {
        match e {
            IoEvent::Write { offset, data, .. } => {
                // One block at most per event (the recording splits longer writes).
                let (k, o) = (offset / 4096, (offset % 4096) as usize);
                let b = m.entry(k).or_insert_with(|| vec![0u8; BLOCK_SIZE]);
                b[o..o + data.len()].copy_from_slice(data);
            }
            IoEvent::Punch { offset, len } => {
                for k in offset / 4096..(offset + len) / 4096 {
                    m.remove(&k);
                }
            }
            _ => {}
        }
    }
}
