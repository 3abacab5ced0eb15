//! A small pristine image built once per fuzz process.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use extblk::ext4::layout::Layout;
use extblk::image::create::{create, CreateParams};
use extblk::image::{Image, OpenOptions};
use extblk::io::mem::MemIo;
use extblk::io::BlockIo;

pub struct Pristine {
    pub bytes: Vec<u8>,
    pub layout: Layout,
    /// Every metadata block of the image: superblock, GDT, bitmaps, inode table, directories,
    /// the journal's superblock and the log blocks its transactions used, `/disk`'s tree.
    pub meta_blocks: Vec<u64>,
}

/// A 4 MiB disk with a two-level tree of scattered extents, closed cleanly (its log still
/// holds the blocks of the transactions it committed, as any log does after a checkpoint).
pub fn pristine() -> &'static Pristine {
    static P: OnceLock<Pristine> = OnceLock::new();
    P.get_or_init(|| {
        let probe = Layout::compute(4 << 20, 1024, None).unwrap();
        let need = probe.data_start + 1024 + probe.tree_reserve + 64;
        let layout =
            Layout::compute(4 << 20, 1024, Some(need.max(probe.data_start + 2048))).unwrap();
        let io = Arc::new(MemIo::new(vec![0u8; (layout.blocks_count * 4096) as usize]));
        create(
            &*io,
            &layout,
            &CreateParams {
                label: "fuzz".into(),
                uuid: [9; 16],
                now: 1_700_000_000,
            },
        )
        .unwrap();
        let dynio: Arc<dyn BlockIo> = io.clone();
        let mut img = Image::open(dynio, OpenOptions::default()).unwrap();
        for k in 0..400u64 {
            img.allocate(k * 2 % 1024, 1).unwrap();
        }
        img.convert(0, 512).unwrap();
        img.commit().unwrap();
        img.punch(100, 30).unwrap();
        img.zero(300, 40).unwrap();
        let log_used = img.journal().map_or(0, |j| j.log_used()).max(64);
        let tree_blocks = img.tree().node_blocks();
        img.close().unwrap();
        let bytes = Arc::try_unwrap(io).ok().unwrap().into_inner();
        let mut meta: Vec<u64> = (0..layout.data_start.min(layout.journal_runs()[0].0)).collect();
        let (jstart, _) = layout.journal_runs()[0];
        meta.extend(jstart..jstart + 1 + u64::from(log_used));
        meta.extend(tree_blocks);
        Pristine {
            bytes,
            layout,
            meta_blocks: meta,
        }
    })
}
