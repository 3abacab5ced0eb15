//! Corrupted images: byte mutations anywhere in the metadata area of a valid image; open and
//! check must report, never panic.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use extblk::image::{Image, OpenOptions};
use extblk::io::mem::MemIo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = common::pristine();
    let mut bytes = p.bytes.clone();
    let meta_end = (p.layout.data_start as usize * 4096).min(bytes.len());
    // Mutations: (u32 offset, u8 value) records; offsets past the metadata hit tree blocks.
    for m in data.chunks_exact(5) {
        let off = u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize;
        let off = if m[0] & 1 == 0 {
            off % meta_end
        } else {
            off % bytes.len()
        };
        bytes[off] = m[4];
    }
    let io = Arc::new(MemIo::new(bytes));
    if let Ok(img) = Image::open(io, OpenOptions { read_only: true }) {
        let _ = extblk::check::check(&img, "fuzz".into());
        let _ = img.runs();
    }
});
