//! The write-back cache file's parser (`engine::cache::store::parse`, what recovery reads
//! after a killed daemon) on arbitrary bytes: an error is fine, a panic is not, and what it
//! accepts must be what recovery may write: blocks inside the disk, each once, in order. The
//! file lives under /run, where anyone with access may have written it.
//!
//! Input: one byte, then either the file's bytes as they are (even first byte: the header
//! checks), or slot headers and pages under a valid header (odd: the checksum passed, so the
//! mutations reach the slot headers' meaning).
#![no_main]

use extblk::engine::cache::store::{encode_header, parse, Binding, Header, PAGE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let bytes = if sel & 1 == 0 {
        rest.to_vec()
    } else {
        // Slots from the input: 16 bytes of slot header each (block, sequence), small blocks
        // most of the time so that they fall inside the 64-block disk.
        let slots = (rest.len() / 16).min(64) as u32;
        let h = Header {
            binding: Binding {
                uuid: [1; 16],
                session: 2,
                boot_id: [3; 16],
                capacity: if sel & 2 == 0 { 64 * PAGE as u64 } else { u64::MAX },
            },
            slots,
        };
        let mut b = vec![0u8; PAGE];
        b[..68].copy_from_slice(&encode_header(&h));
        let headers = (slots as usize * 16).div_ceil(PAGE) * PAGE;
        let mut hb = vec![0u8; headers];
        for (i, c) in rest.chunks_exact(16).take(slots as usize).enumerate() {
            let mut lblock = u64::from_le_bytes(c[..8].try_into().unwrap());
            if sel & 4 == 0 {
                lblock %= 80;
            }
            hb[i * 16..i * 16 + 8].copy_from_slice(&lblock.to_le_bytes());
            hb[i * 16 + 8..i * 16 + 16].copy_from_slice(&c[8..16]);
        }
        b.extend_from_slice(&hb);
        // The pages, unless the input asks for a short file.
        if sel & 8 == 0 {
            b.resize(b.len() + slots as usize * PAGE, 0xA5);
        }
        b
    };
    let Ok((header, blocks)) = parse(&bytes) else {
        return;
    };
    let disk = header.binding.capacity / PAGE as u64;
    assert!(blocks.windows(2).all(|w| w[0] < w[1]), "blocks unsorted or repeated");
    assert!(blocks.iter().all(|&b| b < disk), "a block outside the disk");
    assert!(blocks.len() <= header.slots as usize);
});
