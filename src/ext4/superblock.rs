//! The superblock (1024 bytes at image offset 1024, and backups at byte 0 of groups 1 and G−1).
//!
//! `decode` reads the fields extblk uses and keeps the rest of the bytes, so an image made by
//! mke2fs round-trips untouched fields; `encode` writes the fields back and the checksum.

use super::le::*;
use super::{crc, FormatError, BLOCKS_PER_GROUP, BLOCK_SIZE};

pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const SUPERBLOCK_SIZE: usize = 1024;
pub const MAGIC: u16 = 0xEF53;

pub const STATE_VALID: u16 = 0x1;
pub const STATE_ERROR: u16 = 0x2;

pub mod compat {
    pub const HAS_JOURNAL: u32 = 0x0004;
    pub const EXT_ATTR: u32 = 0x0008;
    pub const RESIZE_INODE: u32 = 0x0010;
    pub const DIR_INDEX: u32 = 0x0020;
    pub const SPARSE_SUPER2: u32 = 0x0200;
    pub const FAST_COMMIT: u32 = 0x0400;
    pub const ORPHAN_FILE: u32 = 0x1000;
}
pub mod incompat {
    pub const FILETYPE: u32 = 0x0002;
    pub const RECOVER: u32 = 0x0004;
    pub const JOURNAL_DEV: u32 = 0x0008;
    pub const META_BG: u32 = 0x0010;
    pub const EXTENTS: u32 = 0x0040;
    pub const BIT64: u32 = 0x0080;
    pub const MMP: u32 = 0x0100;
    pub const FLEX_BG: u32 = 0x0200;
    pub const EA_INODE: u32 = 0x0400;
    pub const DIRDATA: u32 = 0x1000;
    pub const CSUM_SEED: u32 = 0x2000;
    pub const LARGEDIR: u32 = 0x4000;
    pub const INLINE_DATA: u32 = 0x8000;
    pub const ENCRYPT: u32 = 0x10000;
    pub const CASEFOLD: u32 = 0x20000;
}
pub mod ro_compat {
    pub const SPARSE_SUPER: u32 = 0x0001;
    pub const LARGE_FILE: u32 = 0x0002;
    pub const BTREE_DIR: u32 = 0x0004;
    pub const HUGE_FILE: u32 = 0x0008;
    pub const GDT_CSUM: u32 = 0x0010;
    pub const DIR_NLINK: u32 = 0x0020;
    pub const EXTRA_ISIZE: u32 = 0x0040;
    pub const QUOTA: u32 = 0x0100;
    pub const BIGALLOC: u32 = 0x0200;
    pub const METADATA_CSUM: u32 = 0x0400;
    pub const READONLY: u32 = 0x1000;
    pub const PROJECT: u32 = 0x2000;
    pub const VERITY: u32 = 0x8000;
    pub const ORPHAN_PRESENT: u32 = 0x10000;
}

/// What extblk writes.
pub const WRITE_COMPAT: u32 = compat::HAS_JOURNAL | compat::EXT_ATTR | compat::SPARSE_SUPER2;
pub const WRITE_INCOMPAT: u32 =
    incompat::FILETYPE | incompat::EXTENTS | incompat::BIT64 | incompat::FLEX_BG;
pub const WRITE_RO_COMPAT: u32 = ro_compat::SPARSE_SUPER
    | ro_compat::LARGE_FILE
    | ro_compat::HUGE_FILE
    | ro_compat::DIR_NLINK
    | ro_compat::EXTRA_ISIZE
    | ro_compat::METADATA_CSUM;

/// What extblk accepts on open: its own set plus what changes nothing it writes.
const ACCEPT_INCOMPAT: u32 = WRITE_INCOMPAT | incompat::RECOVER | incompat::CSUM_SEED;
const ACCEPT_RO_COMPAT: u32 = WRITE_RO_COMPAT;
const ACCEPT_COMPAT: u32 = WRITE_COMPAT | compat::RESIZE_INODE | compat::DIR_INDEX;

const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (0x0001, "compression"),
    (incompat::JOURNAL_DEV, "journal_dev"),
    (incompat::META_BG, "meta_bg"),
    (incompat::MMP, "mmp"),
    (incompat::EA_INODE, "ea_inode"),
    (incompat::DIRDATA, "dirdata"),
    (incompat::LARGEDIR, "large_dir"),
    (incompat::INLINE_DATA, "inline_data"),
    (incompat::ENCRYPT, "encrypt"),
    (incompat::CASEFOLD, "casefold"),
];
const RO_COMPAT_NAMES: &[(u32, &str)] = &[
    (ro_compat::BTREE_DIR, "btree_dir"),
    (ro_compat::GDT_CSUM, "uninit_bg"),
    (ro_compat::QUOTA, "quota"),
    (ro_compat::BIGALLOC, "bigalloc"),
    (ro_compat::READONLY, "read-only"),
    (ro_compat::PROJECT, "project"),
    (ro_compat::VERITY, "verity"),
    (ro_compat::ORPHAN_PRESENT, "orphan_present"),
];
const COMPAT_NAMES: &[(u32, &str)] = &[
    (compat::FAST_COMMIT, "fast_commit"),
    (compat::ORPHAN_FILE, "orphan_file"),
];

fn name_of(bits: u32, names: &[(u32, &str)], kind: &str) -> String {
    names
        .iter()
        .find(|(b, _)| bits & b != 0)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("{kind} {:#x}", bits & bits.wrapping_neg()))
}

/// The recorded error state (ext4's s_*_error_* fields), as set by an abort.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorRecord {
    pub count: u32,
    pub first_time: u32,
    pub first_ino: u32,
    pub first_block: u64,
    pub first_func: String,
    pub first_line: u32,
    pub first_errcode: u8,
    pub last_time: u32,
    pub last_ino: u32,
    pub last_block: u64,
    pub last_func: String,
    pub last_line: u32,
    pub last_errcode: u8,
}

/// EXT4_ERR_EIO in s_first/last_error_errcode.
pub const ERRCODE_EIO: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub inodes_count: u32,
    pub blocks_count: u64,
    pub free_blocks_count: u64,
    pub free_inodes_count: u32,
    pub first_data_block: u32,
    pub log_block_size: u32,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub mtime: u32,
    pub wtime: u32,
    pub mnt_count: u16,
    pub state: u16,
    pub lastcheck: u32,
    pub rev_level: u32,
    pub first_ino: u32,
    pub inode_size: u16,
    pub block_group_nr: u16,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub feature_ro_compat: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub reserved_gdt_blocks: u16,
    pub journal_inum: u32,
    pub desc_size: u16,
    pub mkfs_time: u32,
    pub jnl_blocks: [u32; 17],
    pub log_groups_per_flex: u8,
    pub backup_bgs: [u32; 2],
    pub checksum_seed: u32,
    pub error: ErrorRecord,
    /// The bytes as read (or zeros for a new superblock): fields not modelled above survive.
    raw: Box<[u8; SUPERBLOCK_SIZE]>,
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn put_cstr(b: &mut [u8], s: &str) {
    b.fill(0);
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl Superblock {
    /// A superblock for a new image; the caller fills in geometry and counts.
    pub fn new_blank() -> Superblock {
        let mut sb = Superblock::decode_unchecked(&[0u8; SUPERBLOCK_SIZE]);
        sb.rev_level = 1;
        sb.first_ino = 11;
        sb.inode_size = super::INODE_SIZE;
        sb.log_block_size = 2;
        sb.blocks_per_group = BLOCKS_PER_GROUP as u32;
        sb.desc_size = 64;
        sb.state = STATE_VALID;
        sb.journal_inum = super::JOURNAL_INO;
        sb.feature_compat = WRITE_COMPAT;
        sb.feature_incompat = WRITE_INCOMPAT;
        sb.feature_ro_compat = WRITE_RO_COMPAT;
        sb
    }

    fn decode_unchecked(b: &[u8]) -> Superblock {
        let mut jnl_blocks = [0u32; 17];
        for (i, w) in jnl_blocks.iter_mut().enumerate() {
            *w = u32_at(b, 0x10C + 4 * i);
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[0x68..0x78]);
        let mut volume_name = [0u8; 16];
        volume_name.copy_from_slice(&b[0x78..0x88]);
        let mut raw = Box::new([0u8; SUPERBLOCK_SIZE]);
        raw.copy_from_slice(&b[..SUPERBLOCK_SIZE]);
        Superblock {
            inodes_count: u32_at(b, 0x00),
            blocks_count: split_u64(b, 0x04, 0x150, 4),
            free_blocks_count: split_u64(b, 0x0C, 0x158, 4),
            free_inodes_count: u32_at(b, 0x10),
            first_data_block: u32_at(b, 0x14),
            log_block_size: u32_at(b, 0x18),
            blocks_per_group: u32_at(b, 0x20),
            inodes_per_group: u32_at(b, 0x28),
            mtime: u32_at(b, 0x2C),
            wtime: u32_at(b, 0x30),
            mnt_count: u16_at(b, 0x34),
            state: u16_at(b, 0x3A),
            lastcheck: u32_at(b, 0x40),
            rev_level: u32_at(b, 0x4C),
            first_ino: u32_at(b, 0x54),
            inode_size: u16_at(b, 0x58),
            block_group_nr: u16_at(b, 0x5A),
            feature_compat: u32_at(b, 0x5C),
            feature_incompat: u32_at(b, 0x60),
            feature_ro_compat: u32_at(b, 0x64),
            uuid,
            volume_name,
            reserved_gdt_blocks: u16_at(b, 0xCE),
            journal_inum: u32_at(b, 0xE0),
            desc_size: u16_at(b, 0xFE),
            mkfs_time: u32_at(b, 0x108),
            jnl_blocks,
            log_groups_per_flex: b[0x174],
            backup_bgs: [u32_at(b, 0x24C), u32_at(b, 0x250)],
            checksum_seed: u32_at(b, 0x270),
            error: ErrorRecord {
                count: u32_at(b, 0x194),
                first_time: u32_at(b, 0x198),
                first_ino: u32_at(b, 0x19C),
                first_block: u64_at(b, 0x1A0),
                first_func: cstr(&b[0x1A8..0x1C8]),
                first_line: u32_at(b, 0x1C8),
                last_time: u32_at(b, 0x1CC),
                last_ino: u32_at(b, 0x1D0),
                last_line: u32_at(b, 0x1D4),
                last_block: u64_at(b, 0x1D8),
                last_func: cstr(&b[0x1E0..0x200]),
                first_errcode: b[0x27A],
                last_errcode: b[0x27B],
            },
            raw,
        }
    }

    /// Recomputes the checksum of superblock bytes edited in place (tests, fuzzing).
    pub fn reseal(b: &mut [u8]) {
        if b.len() >= SUPERBLOCK_SIZE {
            let c = crc(!0, &b[..0x3FC]);
            put_u32(b, 0x3FC, c);
        }
    }

    /// Decodes and validates a superblock: magic, checksum, geometry and feature set.
    pub fn decode(b: &[u8]) -> Result<Superblock, FormatError> {
        if b.len() < SUPERBLOCK_SIZE {
            return Err(super::corrupt("superblock", "truncated"));
        }
        let magic = u16_at(b, 0x38);
        if magic != MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        let sb = Superblock::decode_unchecked(b);
        sb.check_features()?;
        let stored = u32_at(b, 0x3FC);
        let computed = crc(!0, &b[..0x3FC]);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: "superblock".into(),
                stored,
                computed,
            });
        }
        sb.check_geometry()?;
        Ok(sb)
    }

    fn check_features(&self) -> Result<(), FormatError> {
        let bad = self.feature_incompat & !ACCEPT_INCOMPAT;
        if bad != 0 {
            return Err(FormatError::UnsupportedFeature(name_of(
                bad,
                INCOMPAT_NAMES,
                "incompat",
            )));
        }
        let bad = self.feature_ro_compat & !ACCEPT_RO_COMPAT;
        if bad != 0 {
            return Err(FormatError::UnsupportedFeature(name_of(
                bad,
                RO_COMPAT_NAMES,
                "ro_compat",
            )));
        }
        let bad =
            self.feature_compat & !ACCEPT_COMPAT & (compat::FAST_COMMIT | compat::ORPHAN_FILE);
        if bad != 0 {
            return Err(FormatError::UnsupportedFeature(name_of(
                bad,
                COMPAT_NAMES,
                "compat",
            )));
        }
        for (have, bit, name) in [
            (self.feature_compat, compat::HAS_JOURNAL, "has_journal"),
            (self.feature_incompat, incompat::EXTENTS, "extent"),
            (self.feature_incompat, incompat::BIT64, "64bit"),
            (self.feature_incompat, incompat::FLEX_BG, "flex_bg"),
            (self.feature_incompat, incompat::FILETYPE, "filetype"),
            (
                self.feature_ro_compat,
                ro_compat::METADATA_CSUM,
                "metadata_csum",
            ),
            (self.feature_ro_compat, ro_compat::HUGE_FILE, "huge_file"),
            (self.feature_ro_compat, ro_compat::LARGE_FILE, "large_file"),
            (
                self.feature_ro_compat,
                ro_compat::EXTRA_ISIZE,
                "extra_isize",
            ),
        ] {
            if have & bit == 0 {
                return Err(FormatError::MissingFeature(name));
            }
        }
        Ok(())
    }

    fn check_geometry(&self) -> Result<(), FormatError> {
        let g = |m: String| Err(FormatError::Geometry(m));
        if self.log_block_size != 2 {
            return g(format!(
                "block size {} (extblk needs 4096)",
                1024u64 << self.log_block_size.min(20)
            ));
        }
        if u64::from(self.blocks_per_group) != BLOCKS_PER_GROUP {
            return g(format!("{} blocks per group", self.blocks_per_group));
        }
        if self.first_data_block != 0 {
            return g(format!("first data block {}", self.first_data_block));
        }
        if self.desc_size != 64 {
            return g(format!("group descriptor size {}", self.desc_size));
        }
        if self.inode_size < 256
            || !self.inode_size.is_power_of_two()
            || usize::from(self.inode_size) > BLOCK_SIZE
        {
            return g(format!("inode size {}", self.inode_size));
        }
        if self.inodes_per_group == 0
            || self.inodes_per_group > BLOCKS_PER_GROUP as u32
            || self.inodes_per_group % 8 != 0
        {
            return g(format!("{} inodes per group", self.inodes_per_group));
        }
        if self.blocks_count < 16 {
            return g(format!("{} blocks", self.blocks_count));
        }
        if u64::from(self.inodes_count) != self.group_count() * u64::from(self.inodes_per_group) {
            return g("inode count does not match the group count".into());
        }
        if self.journal_inum == 0 {
            return g("no journal inode".into());
        }
        if self.reserved_gdt_blocks != 0 && self.feature_compat & compat::RESIZE_INODE == 0 {
            return g("reserved GDT blocks without resize_inode".into());
        }
        Ok(())
    }

    pub fn group_count(&self) -> u64 {
        self.blocks_count.div_ceil(BLOCKS_PER_GROUP)
    }

    /// Does group `g` hold a superblock + GDT copy? Group 0 always; then `sparse_super2`'s two
    /// backups, or `sparse_super`'s groups 1 and powers of 3, 5 and 7, or every group.
    pub fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.feature_compat & compat::SPARSE_SUPER2 != 0 {
            return self.backup_bgs.contains(&(g as u32));
        }
        if self.feature_ro_compat & ro_compat::SPARSE_SUPER == 0 {
            return true;
        }
        if g == 1 {
            return true;
        }
        [3u64, 5, 7].iter().any(|&b| {
            let mut p = b;
            while p < g {
                p *= b;
            }
            p == g
        })
    }

    /// Blocks at the start of a group holding a superblock copy: superblock, GDT, reserved GDT.
    pub fn super_region_len(&self) -> u64 {
        1 + self.group_count().div_ceil(super::group::DESCS_PER_BLOCK)
            + u64::from(self.reserved_gdt_blocks)
    }

    /// The seed of every metadata checksum.
    pub fn csum_seed(&self) -> u32 {
        if self.feature_incompat & incompat::CSUM_SEED != 0 {
            self.checksum_seed
        } else {
            super::fs_seed(&self.uuid)
        }
    }

    pub fn needs_recovery(&self) -> bool {
        self.feature_incompat & incompat::RECOVER != 0
    }

    pub fn set_needs_recovery(&mut self, on: bool) {
        if on {
            self.feature_incompat |= incompat::RECOVER;
        } else {
            self.feature_incompat &= !incompat::RECOVER;
        }
    }

    pub fn has_errors(&self) -> bool {
        self.state & STATE_ERROR != 0
    }

    pub fn label(&self) -> String {
        cstr(&self.volume_name)
    }

    pub fn set_label(&mut self, s: &str) {
        put_cstr(&mut self.volume_name, s);
    }

    /// `s_jnl_blocks`, the backup of the journal inode's block map: its 60-byte `i_block` as
    /// 15 little-endian words, then `i_size`'s high and low words.
    pub fn set_journal_backup(&mut self, i_block: &[u8; 60], size: u64) {
        for (w, b) in self.jnl_blocks.iter_mut().zip(i_block.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        self.jnl_blocks[15] = (size >> 32) as u32;
        self.jnl_blocks[16] = size as u32;
    }

    /// The 1024 bytes with the checksum.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = *self.raw;
        put_u32(&mut b, 0x00, self.inodes_count);
        put_split_u64(&mut b, 0x04, 0x150, 4, self.blocks_count);
        put_split_u64(&mut b, 0x0C, 0x158, 4, self.free_blocks_count);
        put_u32(&mut b, 0x10, self.free_inodes_count);
        put_u32(&mut b, 0x14, self.first_data_block);
        put_u32(&mut b, 0x18, self.log_block_size);
        put_u32(&mut b, 0x1C, self.log_block_size);
        put_u32(&mut b, 0x20, self.blocks_per_group);
        put_u32(&mut b, 0x24, self.blocks_per_group);
        put_u32(&mut b, 0x28, self.inodes_per_group);
        put_u32(&mut b, 0x2C, self.mtime);
        put_u32(&mut b, 0x30, self.wtime);
        put_u16(&mut b, 0x34, self.mnt_count);
        if u16_at(&b, 0x36) == 0 {
            put_u16(&mut b, 0x36, 0xFFFF);
        }
        put_u16(&mut b, 0x38, MAGIC);
        put_u16(&mut b, 0x3A, self.state);
        if u16_at(&b, 0x3C) == 0 {
            put_u16(&mut b, 0x3C, 1);
        }
        put_u32(&mut b, 0x40, self.lastcheck);
        put_u32(&mut b, 0x4C, self.rev_level);
        put_u32(&mut b, 0x54, self.first_ino);
        put_u16(&mut b, 0x58, self.inode_size);
        put_u16(&mut b, 0x5A, self.block_group_nr);
        put_u32(&mut b, 0x5C, self.feature_compat);
        put_u32(&mut b, 0x60, self.feature_incompat);
        put_u32(&mut b, 0x64, self.feature_ro_compat);
        b[0x68..0x78].copy_from_slice(&self.uuid);
        b[0x78..0x88].copy_from_slice(&self.volume_name);
        put_u16(&mut b, 0xCE, self.reserved_gdt_blocks);
        put_u32(&mut b, 0xE0, self.journal_inum);
        if b[0xFC] == 0 {
            b[0xFC] = 1; // s_def_hash_version: half_md4
        }
        b[0xFD] = 1; // s_jnl_backup_type: s_jnl_blocks holds the journal inode's block map
        put_u16(&mut b, 0xFE, self.desc_size);
        put_u32(&mut b, 0x108, self.mkfs_time);
        for (i, w) in self.jnl_blocks.iter().enumerate() {
            put_u32(&mut b, 0x10C + 4 * i, *w);
        }
        put_u16(&mut b, 0x15C, 32);
        put_u16(&mut b, 0x15E, 32);
        b[0x174] = self.log_groups_per_flex;
        b[0x175] = 1; // crc32c
        let e = &self.error;
        put_u32(&mut b, 0x194, e.count);
        put_u32(&mut b, 0x198, e.first_time);
        put_u32(&mut b, 0x19C, e.first_ino);
        put_u64(&mut b, 0x1A0, e.first_block);
        put_cstr(&mut b[0x1A8..0x1C8], &e.first_func);
        put_u32(&mut b, 0x1C8, e.first_line);
        put_u32(&mut b, 0x1CC, e.last_time);
        put_u32(&mut b, 0x1D0, e.last_ino);
        put_u32(&mut b, 0x1D4, e.last_line);
        put_u64(&mut b, 0x1D8, e.last_block);
        put_cstr(&mut b[0x1E0..0x200], &e.last_func);
        b[0x27A] = e.first_errcode;
        b[0x27B] = e.last_errcode;
        put_u32(&mut b, 0x24C, self.backup_bgs[0]);
        put_u32(&mut b, 0x250, self.backup_bgs[1]);
        put_u32(&mut b, 0x270, self.checksum_seed);
        let c = crc(!0, &b[..0x3FC]);
        put_u32(&mut b, 0x3FC, c);
        b
    }

    /// Records an error the way ext4 does (ERROR_FS, counts, first/last error fields).
    pub fn record_error(&mut self, now: u32, func: &str, errcode: u8, block: u64) {
        self.state |= STATE_ERROR;
        let e = &mut self.error;
        e.count = e.count.saturating_add(1);
        if e.first_time == 0 {
            e.first_time = now;
            e.first_ino = super::DISK_INO;
            e.first_block = block;
            e.first_func = func.to_string();
            e.first_errcode = errcode;
        }
        e.last_time = now;
        e.last_ino = super::DISK_INO;
        e.last_block = block;
        e.last_func = func.to_string();
        e.last_errcode = errcode;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        let mut sb = Superblock::new_blank();
        sb.blocks_count = 32768 * 3;
        sb.inodes_per_group = 16;
        sb.inodes_count = 48;
        sb.uuid = [7; 16];
        sb.set_label("extblk");
        sb
    }

    #[test]
    fn round_trip_and_checksum() {
        let sb = sample();
        let b = sb.encode();
        let d = Superblock::decode(&b).unwrap();
        assert_eq!(d.encode(), b);
        assert_eq!(d.label(), "extblk");
        assert_eq!(u32_at(&b, 0x5C), 0x20C);
        assert_eq!(u32_at(&b, 0x60), 0x2C2);
        assert_eq!(u32_at(&b, 0x64), 0x46B);
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let b = sample().encode();
        for i in 0..SUPERBLOCK_SIZE {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(Superblock::decode(&c).is_err(), "byte {i:#x}");
        }
    }

    #[test]
    fn unsupported_features_are_named() {
        let mut sb = sample();
        sb.feature_incompat |= incompat::INLINE_DATA;
        let err = Superblock::decode(&sb.encode()).unwrap_err();
        assert_eq!(err, FormatError::UnsupportedFeature("inline_data".into()));
        let mut sb = sample();
        sb.feature_ro_compat &= !ro_compat::METADATA_CSUM;
        assert_eq!(
            Superblock::decode(&sb.encode()).unwrap_err(),
            FormatError::MissingFeature("metadata_csum")
        );
    }
}
