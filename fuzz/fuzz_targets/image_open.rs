//! Corrupted images that get past the checksums: the fuzzer's mutations land in the metadata
//! blocks of a valid image (superblock, GDT, bitmaps, inode table, directories, the journal
//! and its old transactions, `/disk`'s tree), then every checksum is recomputed, so open's
//! semantic checks are what stands between the bytes and the allocator. Open, check, and if a
//! read-write open accepts the image: allocate, punch, convert, zero, commit, close, reopen —
//! an error is fine anywhere, a panic is not.
//!
//! Input: one byte (mutation count − 1, mod 32), 5-byte mutations, then 4-byte operations.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use extblk::image::reseal::reseal;
use extblk::image::{Image, OpenOptions};
use extblk::io::mem::MemIo;
use extblk::io::BlockIo;
use libfuzzer_sys::fuzz_target;

/// Values worth writing as a whole 32-bit field: the limits open must check.
fn interesting(p: &common::Pristine, v: u8) -> u32 {
    let l = &p.layout;
    let table = [
        0,
        1,
        u32::MAX,
        l.blocks_count as u32,
        (l.blocks_count - 1) as u32,
        l.data_start as u32,
        l.journal_runs()[0].0 as u32,
        l.inode_table(0) as u32,
        l.block_bitmap(0) as u32,
        32768,
        32769,
        0xF30A,
        0xC03B_3998,
        u32::from(v) << 8,
    ];
    table[usize::from(v) % table.len()]
}

fn mutate(p: &common::Pristine, bytes: &mut [u8], m: &[u8]) {
    let sel = usize::from(u16::from_le_bytes([m[0], m[1]])) % p.meta_blocks.len();
    let word = u16::from_le_bytes([m[2], m[3]]);
    let off = usize::from(word & 0xFFF);
    let mode = word >> 12;
    let at = p.meta_blocks[sel] as usize * 4096 + off;
    let v = m[4];
    match mode {
        0..=7 => bytes[at] = v,
        8..=11 => bytes[at] ^= v,
        _ => {
            let at = at.min(p.meta_blocks[sel] as usize * 4096 + 4092);
            let w = interesting(p, v);
            if mode == 15 {
                // Big-endian: jbd2's fields.
                bytes[at..at + 4].copy_from_slice(&w.to_be_bytes());
            } else {
                bytes[at..at + 4].copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

fn operate(img: &mut Image, ops: &[u8]) {
    let blocks = img.disk_blocks().max(1);
    for c in ops.chunks_exact(4).take(32) {
        let lblk = u64::from(u16::from_le_bytes([c[1], c[2]])) % blocks;
        let len = (u64::from(c[3]) + 1).min(blocks - lblk);
        let _ = match c[0] % 7 {
            0 => img.allocate(lblk, len).map(drop),
            1 => img.convert(lblk, len).map(drop),
            2 => img.zero(lblk, len),
            3 => img.punch(lblk, len).map(drop),
            4 => img.commit().map(drop),
            5 => img.checkpoint(),
            _ => img
                .allocate(lblk, len)
                .and_then(|new| {
                    new.first().map_or(Ok(0), |e| {
                        img.convert_exact(u64::from(e.lblk), u64::from(e.len), e.pblk)
                    })
                })
                .map(drop),
        };
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let p = common::pristine();
    let nmut = (usize::from(n) % 32 + 1).min(rest.len() / 5);
    let (muts, ops) = rest.split_at(nmut * 5);
    let mut bytes = p.bytes.clone();
    for m in muts.chunks_exact(5) {
        mutate(p, &mut bytes, m);
    }
    reseal(&mut bytes);

    // A read-only open writes nothing: the read-write open below sees the same bytes.
    let dynio: Arc<dyn BlockIo> = Arc::new(MemIo::new(bytes));
    if let Ok(img) = Image::open(dynio.clone(), OpenOptions { read_only: true }) {
        let _ = extblk::check::check(&img, "fuzz".into());
        let _ = img.runs();
    }
    let debug = std::env::var_os("EXTBLK_FUZZ_DEBUG").is_some();
    let mut img = match Image::open(dynio.clone(), OpenOptions { read_only: false }) {
        Ok(img) => img,
        Err(e) => {
            if debug {
                // What refused the image (to judge the corpus's reach).
                eprintln!("refused: {e}");
            }
            return;
        }
    };
    if debug {
        eprintln!("opened");
    }
    operate(&mut img, ops);
    let _ = img.commit();
    let _ = img.close();
    // What we wrote must open again, and check.
    if let Ok(img) = Image::open(dynio, OpenOptions { read_only: true }) {
        let _ = extblk::check::check(&img, "fuzz".into());
    }
});
