//! The virtio-blk configuration space (virtio 1.2 §5.2.4) and feature bits.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Offset of the `writeback` byte, the only field a driver may write (with CONFIG_WCE).
pub const WRITEBACK_OFFSET: u32 = 32;
/// Size of the config structure we expose: everything up to and including the write-zeroes
/// fields (the secure-erase and zoned fields follow, and read as zero).
pub const CONFIG_SIZE: usize = 60;

/// The feature bits offered, before `--readonly` adds RO.
pub fn device_features(read_only: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    let mut f = bits.iter().fold(0u64, |acc, b| acc | (1u64 << b));
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// The values of `struct virtio_blk_config`, encoded little-endian by [`BlkConfig::encode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors, whatever `blk_size` is.
    pub capacity_sectors: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: bool,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: legacy geometry, left zero.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[25] = 0; // alignment_offset
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[32] = u8::from(self.writeback);
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = u8::from(self.write_zeroes_may_unmap);
        b
    }

    /// The `size` bytes at `offset`, zero-padded past our structure (frontends may ask for the
    /// newer, larger layout and expect exactly the size they asked for).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let enc = self.encode();
        (offset as usize..offset as usize + size as usize)
            .map(|i| enc.get(i).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_offsets() {
        let c = BlkConfig {
            capacity_sectors: 0x0102_0304_0506_0708,
            size_max: 1 << 20,
            seg_max: 126,
            blk_size: 4096,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: true,
            num_queues: 2,
            max_discard_sectors: 7,
            max_discard_seg: 8,
            discard_sector_alignment: 9,
            max_write_zeroes_sectors: 10,
            max_write_zeroes_seg: 11,
            write_zeroes_may_unmap: true,
        };
        let b = c.encode();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[WRITEBACK_OFFSET as usize], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 9);
        assert_eq!(b[56], 1);
        let r = c.read(32, 40);
        assert_eq!(r.len(), 40);
        assert_eq!(r[0], 1);
        assert!(r[28..].iter().all(|&x| x == 0));
    }

    #[test]
    fn read_only_adds_ro() {
        assert_eq!(
            device_features(true) & !device_features(false),
            1 << VIRTIO_BLK_F_RO
        );
    }
}
