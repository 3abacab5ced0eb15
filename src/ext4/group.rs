//! Group descriptors (64 bytes each, 64 per block, in the GDT after the superblock).

use super::le::*;
use super::{crc, FormatError};

pub const DESC_SIZE: usize = 64;
pub const DESCS_PER_BLOCK: u64 = 64;

pub const BG_INODE_UNINIT: u16 = 0x1;
pub const BG_BLOCK_UNINIT: u16 = 0x2;
pub const BG_INODE_ZEROED: u16 = 0x4;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub flags: u16,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
    pub itable_unused: u32,
}

impl GroupDesc {
    /// Decodes descriptor `group` and checks its checksum against `seed`.
    pub fn decode(b: &[u8], group: u64, seed: u32) -> Result<GroupDesc, FormatError> {
        let d = GroupDesc {
            block_bitmap: split_u64(b, 0x00, 0x20, 4),
            inode_bitmap: split_u64(b, 0x04, 0x24, 4),
            inode_table: split_u64(b, 0x08, 0x28, 4),
            free_blocks: split_u32(b, 0x0C, 0x2C),
            free_inodes: split_u32(b, 0x0E, 0x2E),
            used_dirs: split_u32(b, 0x10, 0x30),
            flags: u16_at(b, 0x12),
            block_bitmap_csum: split_u32(b, 0x18, 0x38),
            inode_bitmap_csum: split_u32(b, 0x1A, 0x3A),
            itable_unused: split_u32(b, 0x1C, 0x32),
        };
        let stored = u16_at(b, 0x1E);
        let computed = Self::checksum(b, group, seed);
        if stored != computed {
            return Err(FormatError::Checksum {
                what: format!("group descriptor {group}"),
                stored: stored.into(),
                computed: computed.into(),
            });
        }
        Ok(d)
    }

    /// Recomputes the checksum of descriptor bytes edited in place (tests, fuzzing).
    pub fn reseal(b: &mut [u8], group: u64, seed: u32) {
        if b.len() >= DESC_SIZE {
            let c = Self::checksum(b, group, seed);
            put_u16(b, 0x1E, c);
        }
    }

    fn checksum(b: &[u8], group: u64, seed: u32) -> u16 {
        let mut d = [0u8; DESC_SIZE];
        d.copy_from_slice(&b[..DESC_SIZE]);
        d[0x1E] = 0;
        d[0x1F] = 0;
        crc(crc(seed, &(group as u32).to_le_bytes()), &d) as u16
    }

    pub fn encode(&self, group: u64, seed: u32) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        put_split_u64(&mut b, 0x00, 0x20, 4, self.block_bitmap);
        put_split_u64(&mut b, 0x04, 0x24, 4, self.inode_bitmap);
        put_split_u64(&mut b, 0x08, 0x28, 4, self.inode_table);
        put_split_u32(&mut b, 0x0C, 0x2C, self.free_blocks);
        put_split_u32(&mut b, 0x0E, 0x2E, self.free_inodes);
        put_split_u32(&mut b, 0x10, 0x30, self.used_dirs);
        put_u16(&mut b, 0x12, self.flags);
        put_split_u32(&mut b, 0x18, 0x38, self.block_bitmap_csum);
        put_split_u32(&mut b, 0x1A, 0x3A, self.inode_bitmap_csum);
        put_split_u32(&mut b, 0x1C, 0x32, self.itable_unused);
        let c = Self::checksum(&b, group, seed);
        put_u16(&mut b, 0x1E, c);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_flips() {
        let d = GroupDesc {
            block_bitmap: 0x1_0000_0002,
            inode_bitmap: 34,
            inode_table: 66,
            free_blocks: 16025,
            free_inodes: 4,
            used_dirs: 2,
            flags: BG_INODE_ZEROED,
            block_bitmap_csum: 0x0c24abf1,
            inode_bitmap_csum: 0xbe13a311,
            itable_unused: 4,
        };
        let b = d.encode(3, 0x1234);
        assert_eq!(GroupDesc::decode(&b, 3, 0x1234).unwrap(), d);
        assert!(
            GroupDesc::decode(&b, 4, 0x1234).is_err(),
            "descriptor number is in the checksum"
        );
        for i in 0..DESC_SIZE {
            let mut c = b;
            c[i] ^= 1;
            assert!(GroupDesc::decode(&c, 3, 0x1234).is_err(), "byte {i}");
        }
    }
}
