//! Garbage journals: the log area of a valid image is filled with fuzz bytes (and the journal
//! superblock points at it); opening (replay), checking and a read-write open must not panic.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use extblk::image::{Image, OpenOptions};
use extblk::io::mem::MemIo;
use extblk::jbd2::format::JournalSuperblock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let p = common::pristine();
    let mut bytes = p.bytes.clone();
    let jstart = p.layout.journal_runs()[0].0 as usize * 4096;
    let jsb_raw = &bytes[jstart..jstart + 4096];
    let mut jsb = JournalSuperblock::decode(jsb_raw).unwrap();
    jsb.start = 1 + u32::from(data[0]) % 8;
    jsb.sequence = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
    bytes[jstart..jstart + 4096].copy_from_slice(&jsb.encode());
    let log = &data[5..];
    let room = 1023 * 4096;
    let n = log.len().min(room);
    bytes[jstart + 4096..jstart + 4096 + n].copy_from_slice(&log[..n]);
    // Set needs_recovery so both replayers would act.
    let io = Arc::new(MemIo::new(bytes.clone()));
    if let Ok(img) = Image::open(io, OpenOptions { read_only: true }) {
        let _ = extblk::check::check(&img, "fuzz".into());
    }
    let io = Arc::new(MemIo::new(bytes));
    if let Ok(img) = Image::open(io, OpenOptions { read_only: false }) {
        let _ = img.close();
    }
});
