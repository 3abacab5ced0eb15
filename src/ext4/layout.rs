//! The geometry of an image extblk creates: where every metadata block goes (§1.2 of the
//! format reference), computed, never stored — `open` reads the real locations from the GDT.
//!
//! Order from block 0: superblock, GDT, all block bitmaps, all inode bitmaps, all inode tables,
//! root directory, lost+found, journal, then the data area. The allocation cursor skips the
//! backup superblock + GDT ranges of groups 1 and G−1 (sparse_super2).

use super::{FormatError, BLOCKS_PER_GROUP, BLOCK_SIZE_U64, MAX_FILE_BLOCKS};
use crate::ext4::extent::BLOCK_MAX;

/// The largest virtual disk: ext4's file limit at 4 KiB blocks (16 TiB − 4 KiB).
pub const MAX_DISK_SIZE: u64 = MAX_FILE_BLOCKS * BLOCK_SIZE_U64;
/// Journal bounds: at least 4 MiB (jbd2's minimum 1024 blocks), at most 384 MiB, so that its
/// extents (≤ 32768 blocks each, one more where a backup superblock splits it) fit in the inode.
pub const MIN_JOURNAL_BLOCKS: u64 = 1024;
pub const MAX_JOURNAL_BLOCKS: u64 = 3 * 32768;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub disk_size: u64,
    pub blocks_count: u64,
    pub groups: u64,
    pub gdt_blocks: u64,
    pub journal_blocks: u64,
    /// Extent-tree blocks the worst case can need: part of the sizing, allocated on demand.
    pub tree_reserve: u64,
    /// First block of the data area (identity placement: logical block L goes to data_start + L).
    pub data_start: u64,
    /// Number of cursor-allocated metadata blocks before the data area.
    cursor_len: u64,
}

/// Default journal: 1/64 of the disk, between 4 MiB and 384 MiB (from a 24 GiB disk on; mke2fs
/// gives a 1 TiB filesystem 1 GiB). A large log is what keeps scattered first writes on a big
/// disk cheap in host bytes: each dirties its own bitmap and leaf, and the checkpoint writes a
/// block home once however often the log holds it (`jbd2`, `MAX_CHECKPOINT_BLOCKS`). An image
/// file's log is sparse until used.
pub fn default_journal_blocks(disk_size: u64) -> u64 {
    (disk_size.div_ceil(BLOCK_SIZE_U64) / 64).clamp(MIN_JOURNAL_BLOCKS, MAX_JOURNAL_BLOCKS)
}

/// Worst-case extent-tree blocks for `data` data blocks: every block its own extent, leaves
/// split half full (170 entries), plus the index levels above them.
pub fn tree_reserve(data: u64) -> u64 {
    let half = u64::from(BLOCK_MAX / 2);
    let mut total = 0;
    let mut level = data.div_ceil(half);
    while level > 1 {
        total += level;
        level = level.div_ceil(half);
    }
    total + 1
}

impl Layout {
    /// Sizes an image for a disk of `disk_size` bytes. `device_blocks` is the size of a block
    /// device to format (the layout must fit in it); a file is sized to what is needed.
    pub fn compute(
        disk_size: u64,
        journal_blocks: u64,
        device_blocks: Option<u64>,
    ) -> Result<Layout, FormatError> {
        let geo = |m: String| Err(FormatError::Geometry(m));
        if disk_size == 0 || disk_size % 512 != 0 {
            return geo(format!(
                "disk size {disk_size} must be a positive multiple of 512 bytes"
            ));
        }
        if disk_size > MAX_DISK_SIZE {
            return geo(format!("disk size {disk_size} exceeds the maximum of {MAX_DISK_SIZE} bytes (16 TiB - 4 KiB)"));
        }
        if !(MIN_JOURNAL_BLOCKS..=MAX_JOURNAL_BLOCKS).contains(&journal_blocks) {
            return geo(format!(
                "journal of {journal_blocks} blocks: must be between {MIN_JOURNAL_BLOCKS} (4 MiB) and {MAX_JOURNAL_BLOCKS} (384 MiB)"
            ));
        }
        let data = disk_size.div_ceil(BLOCK_SIZE_U64);
        let tree = tree_reserve(data);
        let mut groups = 1u64;
        loop {
            let gdt = groups.div_ceil(64);
            let backups = match groups {
                1 => 0,
                2 => 1 + gdt,
                _ => 2 * (1 + gdt),
            };
            let cursor_len = 3 * groups + 2 + journal_blocks;
            let needed = 1 + gdt + cursor_len + backups + data + tree;
            let blocks = match device_blocks {
                Some(d) => d,
                None => needed.div_ceil(BLOCKS_PER_GROUP) * BLOCKS_PER_GROUP,
            };
            let g2 = blocks.div_ceil(BLOCKS_PER_GROUP);
            if g2 != groups {
                if g2 < groups && device_blocks.is_none() {
                    return geo("layout does not converge".into());
                }
                groups = g2;
                continue;
            }
            if needed > blocks {
                return geo(format!(
                    "a {disk_size}-byte disk needs {} bytes of filesystem, the device has {}",
                    needed * BLOCK_SIZE_U64,
                    blocks * BLOCK_SIZE_U64
                ));
            }
            if blocks >= 1 << 48 {
                return geo("filesystem too large".into());
            }
            let mut l = Layout {
                disk_size,
                blocks_count: blocks,
                groups,
                gdt_blocks: gdt,
                journal_blocks,
                tree_reserve: tree,
                data_start: 0,
                cursor_len,
            };
            l.data_start = l.cursor_block(cursor_len);
            if l.journal_runs().len() > usize::from(crate::ext4::extent::ROOT_MAX) {
                return geo("the journal does not fit in four extents".into());
            }
            return Ok(l);
        }
    }

    /// Groups holding a superblock + GDT copy: 0, and the sparse_super2 backups.
    pub fn backup_groups(&self) -> Vec<u64> {
        match self.groups {
            1 => vec![],
            2 => vec![1],
            g => vec![1, g - 1],
        }
    }

    /// The sparse_super2 `s_backup_bgs` values.
    pub fn backup_bgs(&self) -> [u32; 2] {
        match self.groups {
            1 => [0, 0],
            2 => [1, 0],
            g => [1, (g - 1) as u32],
        }
    }

    /// Is `blk` part of a backup superblock + GDT range?
    pub fn in_backup(&self, blk: u64) -> bool {
        self.backup_groups().iter().any(|g| {
            let s = g * BLOCKS_PER_GROUP;
            blk >= s && blk < s + 1 + self.gdt_blocks
        })
    }

    /// The physical block of the k-th cursor-allocated metadata block (0-based), skipping backups.
    fn cursor_block(&self, k: u64) -> u64 {
        let mut blk = 1 + self.gdt_blocks + k;
        for g in self.backup_groups() {
            if blk >= g * BLOCKS_PER_GROUP {
                blk += 1 + self.gdt_blocks;
            }
        }
        blk
    }

    pub fn block_bitmap(&self, g: u64) -> u64 {
        self.cursor_block(g)
    }

    pub fn inode_bitmap(&self, g: u64) -> u64 {
        self.cursor_block(self.groups + g)
    }

    pub fn inode_table(&self, g: u64) -> u64 {
        self.cursor_block(2 * self.groups + g)
    }

    pub fn root_dir_block(&self) -> u64 {
        self.cursor_block(3 * self.groups)
    }

    pub fn lost_found_block(&self) -> u64 {
        self.cursor_block(3 * self.groups + 1)
    }

    /// The journal as physical runs `(start, len)`, each at most 32768 blocks (one extent).
    pub fn journal_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for k in 0..self.journal_blocks {
            let b = self.cursor_block(3 * self.groups + 2 + k);
            match runs.last_mut() {
                Some((s, l)) if *s + *l == b && *l < 32768 => *l += 1,
                _ => runs.push((b, 1)),
            }
        }
        runs
    }

    /// Every block `create` marks in use, as runs: metadata, directories and journal.
    pub fn used_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = vec![(0, 1 + self.gdt_blocks)];
        for g in self.backup_groups() {
            runs.push((g * BLOCKS_PER_GROUP, 1 + self.gdt_blocks));
        }
        let end = self.data_start;
        // Cursor blocks form one range [1 + gdt, data_start) minus the backup ranges.
        let mut s = 1 + self.gdt_blocks;
        for g in self.backup_groups() {
            let b = g * BLOCKS_PER_GROUP;
            if b < end {
                runs.push((s, b - s));
                s = b + 1 + self.gdt_blocks;
            }
        }
        runs.push((s, end - s));
        runs
    }

    /// `s_log_groups_per_flex`: ⌈log2 G⌉, so one flex group holds every group's metadata.
    pub fn log_groups_per_flex(&self) -> u8 {
        (64 - (self.groups.max(2) - 1).leading_zeros()) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_image() {
        let l = Layout::compute(64 << 20, 1024, None).unwrap();
        assert_eq!(l.groups, 1);
        assert_eq!(l.blocks_count, 32768);
        assert_eq!(l.block_bitmap(0), 2);
        assert_eq!(l.inode_table(0), 4);
        assert_eq!(l.root_dir_block(), 5);
        assert_eq!(l.journal_runs(), vec![(7, 1024)]);
        assert_eq!(l.data_start, 7 + 1024);
    }

    #[test]
    fn journal_skips_the_backup_of_group_one() {
        let l = Layout::compute(8 << 30, 32768, None).unwrap();
        let runs = l.journal_runs();
        assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), 32768);
        for (s, n) in &runs {
            for b in *s..s + n {
                assert!(!l.in_backup(b), "journal block {b} in a backup range");
            }
        }
        assert!(l.blocks_count >= l.data_start + (8 << 30) / 4096 + l.tree_reserve);
    }

    #[test]
    fn default_journal_grows_with_the_disk_to_the_most_the_inode_holds() {
        assert_eq!(default_journal_blocks(64 << 20), MIN_JOURNAL_BLOCKS);
        assert_eq!(default_journal_blocks(8 << 30), 32768);
        assert_eq!(default_journal_blocks(24 << 30), MAX_JOURNAL_BLOCKS);
        assert_eq!(default_journal_blocks(MAX_DISK_SIZE), MAX_JOURNAL_BLOCKS);
        for disk in [1u64 << 40, MAX_DISK_SIZE] {
            let l = Layout::compute(disk, default_journal_blocks(disk), None).unwrap();
            assert!(
                l.journal_runs().len() <= 4,
                "{disk}: {:?}",
                l.journal_runs()
            );
        }
    }

    #[test]
    fn limits() {
        assert!(Layout::compute(MAX_DISK_SIZE, 32768, None).is_ok());
        assert!(Layout::compute(MAX_DISK_SIZE + 4096, 32768, None).is_err());
        assert!(Layout::compute(1000, 1024, None).is_err());
        assert!(Layout::compute(1 << 30, 10, None).is_err());
        assert!(Layout::compute(1 << 30, MAX_JOURNAL_BLOCKS, None).is_ok());
        assert!(Layout::compute(1 << 30, MAX_JOURNAL_BLOCKS + 1, None).is_err());
        assert!(Layout::compute(1 << 30, 1024, Some(1000)).is_err());
    }
}
