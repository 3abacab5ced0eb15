//! Inodes (`s_inode_size` bytes, 256 in images extblk creates) in the inode tables.

use super::le::*;
use super::{crc, inode_seed, FormatError};

pub const EXTENTS_FL: u32 = 0x0008_0000;
pub const HUGE_FILE_FL: u32 = 0x0004_0000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFMT: u16 = 0o170000;

/// Size of `i_extra_isize` extblk writes: holds `i_checksum_hi`, nanosecond times and crtime.
pub const EXTRA_ISIZE: u16 = 32;

/// `i_blocks` units in one filesystem block: it counts 512-byte sectors.
pub const SECTORS_PER_BLOCK: u64 = crate::ext4::BLOCK_SIZE_U64 / 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub mode: u16,
    pub size: u64,
    pub atime: u32,
    pub ctime: u32,
    pub mtime: u32,
    pub dtime: u32,
    pub links: u16,
    /// 512-byte sectors allocated (huge_file: 48 bits, never in block units).
    pub blocks: u64,
    pub flags: u32,
    /// The 60-byte extent-tree root.
    pub i_block: [u8; 60],
    pub generation: u32,
    pub extra_isize: u16,
    pub crtime: u32,
    raw: Vec<u8>,
}

impl Inode {
    pub fn new(inode_size: u16) -> Inode {
        Inode {
            mode: 0,
            size: 0,
            atime: 0,
            ctime: 0,
            mtime: 0,
            dtime: 0,
            links: 0,
            blocks: 0,
            flags: 0,
            i_block: [0; 60],
            generation: 0,
            extra_isize: EXTRA_ISIZE,
            crtime: 0,
            raw: vec![0; usize::from(inode_size)],
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    /// The double-indirect block pointer of an indirect-mapped inode (`i_block[13]`): the
    /// resize inode keeps its list of reserved GDT blocks there.
    pub fn dind_block(&self) -> u32 {
        u32_at(&self.i_block, 13 * 4)
    }

    pub fn is_reg(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }

    fn checksum(b: &[u8], ino: u32, seed: u32) -> u32 {
        let gen = u32_at(b, 0x64);
        let extra = u16_at(b, 0x80);
        let mut r = b.to_vec();
        r[0x7C] = 0;
        r[0x7D] = 0;
        if extra >= 4 {
            r[0x82] = 0;
            r[0x83] = 0;
        }
        crc(inode_seed(seed, ino, gen), &r)
    }

    /// Recomputes the checksum of inode bytes edited in place (tests, fuzzing); `b` is the
    /// whole on-disk inode.
    pub fn reseal(b: &mut [u8], ino: u32, seed: u32) {
        if b.len() < 256 {
            return;
        }
        let c = Self::checksum(b, ino, seed);
        put_u16(b, 0x7C, c as u16);
        if u16_at(b, 0x80) >= 4 {
            put_u16(b, 0x82, (c >> 16) as u16);
        }
    }

    /// Decodes inode `ino`; `b` is exactly the on-disk inode (`s_inode_size` bytes).
    pub fn decode(b: &[u8], ino: u32, seed: u32) -> Result<Inode, FormatError> {
        let extra = u16_at(b, 0x80);
        if b.len() < 256 || usize::from(extra) + 128 > b.len() {
            return Err(super::corrupt(format!("inode {ino}"), "bad i_extra_isize"));
        }
        let computed = Self::checksum(b, ino, seed);
        let (stored, computed) = if extra >= 4 {
            (
                u32::from(u16_at(b, 0x7C)) | (u32::from(u16_at(b, 0x82)) << 16),
                computed,
            )
        } else {
            (u32::from(u16_at(b, 0x7C)), computed & 0xFFFF)
        };
        // All-zero reserved inodes pass: e2fsck accepts them and so do we.
        if stored != computed && b.iter().any(|&x| x != 0) {
            return Err(FormatError::Checksum {
                what: format!("inode {ino}"),
                stored,
                computed,
            });
        }
        let mut i_block = [0u8; 60];
        i_block.copy_from_slice(&b[0x28..0x64]);
        Ok(Inode {
            mode: u16_at(b, 0x00),
            size: split_u64(b, 0x04, 0x6C, 4),
            atime: u32_at(b, 0x08),
            ctime: u32_at(b, 0x0C),
            mtime: u32_at(b, 0x10),
            dtime: u32_at(b, 0x14),
            links: u16_at(b, 0x1A),
            blocks: split_u64(b, 0x1C, 0x74, 2),
            flags: u32_at(b, 0x20),
            i_block,
            generation: u32_at(b, 0x64),
            extra_isize: extra,
            crtime: if extra >= 0x18 { u32_at(b, 0x90) } else { 0 },
            raw: b.to_vec(),
        })
    }

    pub fn encode(&self, ino: u32, seed: u32) -> Vec<u8> {
        let mut b = self.raw.clone();
        put_u16(&mut b, 0x00, self.mode);
        put_split_u64(&mut b, 0x04, 0x6C, 4, self.size);
        put_u32(&mut b, 0x08, self.atime);
        put_u32(&mut b, 0x0C, self.ctime);
        put_u32(&mut b, 0x10, self.mtime);
        put_u32(&mut b, 0x14, self.dtime);
        put_u16(&mut b, 0x1A, self.links);
        put_split_u64(&mut b, 0x1C, 0x74, 2, self.blocks);
        put_u32(&mut b, 0x20, self.flags);
        b[0x28..0x64].copy_from_slice(&self.i_block);
        put_u32(&mut b, 0x64, self.generation);
        put_u16(&mut b, 0x80, self.extra_isize);
        if self.extra_isize >= 0x18 {
            put_u32(&mut b, 0x90, self.crtime);
        }
        let c = Self::checksum(&b, ino, seed);
        put_u16(&mut b, 0x7C, c as u16);
        if self.extra_isize >= 4 {
            put_u16(&mut b, 0x82, (c >> 16) as u16);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_flips() {
        let mut i = Inode::new(256);
        i.mode = S_IFREG | 0o600;
        i.size = 3 << 30;
        i.links = 1;
        i.blocks = 1 << 40;
        i.flags = EXTENTS_FL;
        i.generation = 0x0123_4567;
        i.i_block[0] = 0x0A;
        let b = i.encode(12, 0xD3F7_C361);
        let d = Inode::decode(&b, 12, 0xD3F7_C361).unwrap();
        assert_eq!(d, i.clone().with_raw(&b));
        assert!(Inode::decode(&b, 13, 0xD3F7_C361).is_err());
        for k in 0..256 {
            let mut c = b.clone();
            c[k] ^= 4;
            assert!(Inode::decode(&c, 12, 0xD3F7_C361).is_err(), "byte {k}");
        }
        assert!(
            Inode::decode(&[0u8; 256], 5, 1).is_ok(),
            "zero reserved inode"
        );
    }

    impl Inode {
        fn with_raw(mut self, b: &[u8]) -> Inode {
            self.raw = b.to_vec();
            self
        }
    }
}
