//! Every on-disk decoder on arbitrary bytes: an error is fine, a panic is not.
#![no_main]

use extblk::ext4::{dir, extent, group::GroupDesc, inode::Inode, superblock::Superblock};
use extblk::jbd2::format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut block = vec![0u8; 4096];
    let n = rest.len().min(4096);
    block[..n].copy_from_slice(&rest[..n]);
    let seed = 0x1234_5678;
    match sel % 10 {
        0 => {
            let _ = Superblock::decode(&block[..1024]);
        }
        1 => {
            let _ = GroupDesc::decode(&block[..64], 3, seed);
        }
        2 => {
            let _ = Inode::decode(&block[..256], 12, seed);
        }
        3 => {
            let mut root = [0u8; 60];
            root.copy_from_slice(&block[..60]);
            let _ = extent::decode_root(&root);
        }
        4 => {
            let _ = extent::decode_block(&block, seed, 99);
        }
        5 => {
            let _ = dir::decode_block(&block, seed, "fuzz");
        }
        6 => {
            let _ = format::JournalSuperblock::decode(&block);
        }
        7 => {
            let _ = format::decode_descriptor(&block, seed);
        }
        8 => {
            let _ = format::decode_revoke(&block, seed);
        }
        _ => {
            let _ = format::decode_commit(&block, seed);
        }
    }
});
