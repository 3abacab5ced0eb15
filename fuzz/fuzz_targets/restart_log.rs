//! The restart log's decoder on arbitrary bytes, and whatever records it accepts applied to a
//! valid image as a restart would (`Image::reapply_chunk` and a commit until all are applied,
//! then close, reopen): an error is
//! fine, a panic is not, and the image must stay consistent (`check` finds no problem), since
//! a log is only bytes in a file that anyone with access to /run may have written.
//!
//! Input: one byte, then either the file's bytes as they are (even first byte: the header
//! checks), or 13-byte records (kind, lblk, len, pblk) sealed under a valid header.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::Arc;

use extblk::image::{Image, OpenOptions, Reapplied};
use extblk::io::mem::MemIo;
use extblk::io::BlockIo;
use extblk::restart_log::format::{self, Change, Header, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let header = Header {
        uuid: [9; 16],
        session: 1,
        base_tid: 0,
        boot_id: [0; 16],
    };
    let bytes = if sel & 1 == 0 {
        rest.to_vec()
    } else {
        // A valid header, and records sealed under it: the mutations reach the records'
        // meaning, not only their checksums.
        let seed = format::record_seed(&header);
        let mut b = format::encode_header(&header).to_vec();
        for c in rest.chunks(13) {
            let mut r = [0u8; 13];
            r[..c.len()].copy_from_slice(c);
            let u = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
            // Small numbers most of the time: the pristine disk has 1024 blocks.
            let small = |v: u32| if r[0] & 0x80 == 0 { v % 2048 } else { v };
            let (lblk, len) = (small(u(1)), small(u(5)));
            let change = match r[0] % 3 {
                0 => Change::Written {
                    lblk,
                    len,
                    pblk: u64::from(small(u(9))) + if r[0] & 0x40 == 0 { 0 } else { 1 << 12 },
                },
                1 => Change::Zero { lblk, len },
                _ => Change::Punch { lblk, len },
            };
            let tid = u32::from(r[0] >> 2);
            b.extend_from_slice(&format::encode_record(seed, &Record { tid, change }));
        }
        b
    };
    let Ok(d) = format::decode(&bytes) else {
        return;
    };
    let p = common::pristine();
    let io = Arc::new(MemIo::new(p.bytes.clone()));
    let dynio: Arc<dyn BlockIo> = io.clone();
    let mut img = Image::open(dynio.clone(), OpenOptions::default()).expect("pristine opens");
    let changes: Vec<_> = d.records.iter().map(|r| r.change).collect();
    let mut out = Reapplied::default();
    let mut at = 0;
    while at < changes.len() {
        let Ok(n) = img.reapply_chunk(&changes[at..], &mut out) else {
            return;
        };
        if img.commit().is_err() {
            return;
        }
        at += n;
    }
    if img.close().is_err() {
        return;
    }
    let img = Image::open(dynio, OpenOptions { read_only: true }).expect("reopens");
    let report = extblk::check::check(&img, "fuzz".into());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
});
