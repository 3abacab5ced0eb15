//! The ext4 on-disk structures extblk reads and writes, each encoded and decoded explicitly,
//! with its metadata_csum checksum. Nothing outside this module (and `jbd2`) knows a byte offset.
//! The format and the feature set are described in `docs/format.md`.

pub mod bitmap;
pub mod dir;
pub mod extent;
pub mod group;
pub mod inode;
pub mod layout;
pub mod superblock;

use thiserror::Error;

/// Filesystem block size: extblk images always use 4 KiB blocks.
pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_SIZE_U64: u64 = 4096;
pub const BLOCKS_PER_GROUP: u64 = 32768;
/// Inodes per group in images extblk creates (one inode-table block of 256-byte inodes).
pub const INODES_PER_GROUP: u32 = 16;
pub const INODE_SIZE: u16 = 256;
pub const ROOT_INO: u32 = 2;
pub const RESIZE_INO: u32 = 7;
pub const JOURNAL_INO: u32 = 8;
pub const LOST_FOUND_INO: u32 = 11;
pub const DISK_INO: u32 = 12;
/// The file holding the virtual disk.
pub const DISK_NAME: &str = "disk";
/// Last usable logical block of a file (0xFFFFFFFF is reserved): files end at 16 TiB − 4 KiB.
pub const MAX_FILE_BLOCKS: u64 = (1 << 32) - 1;

/// Why bytes are not a valid extblk image structure.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not an ext4 filesystem (bad superblock magic {0:#06x})")]
    BadMagic(u16),
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        what: String,
        stored: u32,
        computed: u32,
    },
    #[error("unsupported ext4 feature: {0}")]
    UnsupportedFeature(String),
    #[error("required ext4 feature missing: {0}")]
    MissingFeature(&'static str),
    #[error("unsupported geometry: {0}")]
    Geometry(String),
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    /// The root directory has no `/disk` entry: an ext4 filesystem, but not an extblk image.
    #[error("corrupt image: no /disk file")]
    NoDiskFile,
    /// A structure points at blocks it must not use: past the end of the filesystem, or
    /// belonging to its metadata, the journal, a directory or another extent (ext4's
    /// `block_validity`).
    #[error("corrupt {what}: {len} block(s) from {start} {problem}")]
    BlockValidity {
        what: String,
        start: u64,
        len: u64,
        problem: String,
    },
}

pub(crate) fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> FormatError {
    FormatError::Corrupt {
        what: what.into(),
        detail: detail.into(),
    }
}

/// ext4's crc32c: Castagnoli, register preloaded with `seed`, no final inversion.
pub fn crc(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The per-filesystem checksum seed.
pub fn fs_seed(uuid: &[u8; 16]) -> u32 {
    crc(!0, uuid)
}

/// The per-inode checksum seed: `crc(crc(seed, le32 ino), le32 generation)`.
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    crc(crc(fs_seed, &ino.to_le_bytes()), &generation.to_le_bytes())
}

/// Little-endian field access on a byte buffer; offsets are the format's.
pub(crate) mod le {
    pub fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }
    pub fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    pub fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[off..off + 8]);
        u64::from_le_bytes(a)
    }
    pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
        b[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
    /// A 64-bit value split into a low u32 at `lo` and a high part of `hi_len` bytes at `hi`.
    pub fn split_u64(b: &[u8], lo: usize, hi: usize, hi_len: usize) -> u64 {
        let l = u64::from(u32_at(b, lo));
        let h = match hi_len {
            2 => u64::from(u16_at(b, hi)),
            _ => u64::from(u32_at(b, hi)),
        };
        l | (h << 32)
    }
    /// A 32-bit value split into two 16-bit halves (the group descriptor's counters).
    pub fn split_u32(b: &[u8], lo: usize, hi: usize) -> u32 {
        u32::from(u16_at(b, lo)) | (u32::from(u16_at(b, hi)) << 16)
    }
    pub fn put_split_u32(b: &mut [u8], lo: usize, hi: usize, v: u32) {
        put_u16(b, lo, v as u16);
        put_u16(b, hi, (v >> 16) as u16);
    }
    pub fn put_split_u64(b: &mut [u8], lo: usize, hi: usize, hi_len: usize, v: u64) {
        put_u32(b, lo, v as u32);
        match hi_len {
            2 => put_u16(b, hi, (v >> 32) as u16),
            _ => put_u32(b, hi, (v >> 32) as u32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_reference_vectors() {
        assert_eq!(crc(0xFFFF_FFFF, b"123456789"), 0x1CF9_6D7C);
        assert_eq!(crc(0, b"123456789"), 0x58E3_FA20);
        let uuid = [
            0x6a, 0x3e, 0x1c, 0x52, 0x9f, 0x0b, 0x4d, 0x2e, 0x8c, 0x41, 0x3b, 0x7d, 0x2a, 0x9e,
            0x5f, 0x10,
        ];
        let seed = fs_seed(&uuid);
        assert_eq!(seed, 0xD3F7_C361);
        assert_eq!(crc(seed, &0u32.to_le_bytes()), 0xF9DE_2359);
        assert_eq!(inode_seed(seed, 2, 0), 0xB4C7_0DE2);
        assert_eq!(inode_seed(seed, 12, 0), 0x4599_711B);
        assert_eq!(inode_seed(seed, 12, 0x0123_4567), 0x65E7_FC98);
        assert_eq!(crc(seed, &6u32.to_be_bytes()), 0xDF7F_C4B1);
    }
}
