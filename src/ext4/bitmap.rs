//! Block and inode bitmaps: one block each, bit i ↔ the group's i-th block (or inode).

use super::{crc, BLOCKS_PER_GROUP, BLOCK_SIZE};

pub fn test(b: &[u8], i: usize) -> bool {
    b[i >> 3] & (1 << (i & 7)) != 0
}

pub fn set(b: &mut [u8], i: usize) {
    b[i >> 3] |= 1 << (i & 7);
}

pub fn clear(b: &mut [u8], i: usize) {
    b[i >> 3] &= !(1 << (i & 7));
}

/// Sets bits `[start, end)`.
pub fn set_range(b: &mut [u8], start: usize, end: usize) {
    for i in start..end {
        set(b, i);
    }
}

/// Checksum of a block bitmap: all 4096 bytes.
pub fn block_bitmap_csum(seed: u32, b: &[u8]) -> u32 {
    crc(seed, &b[..BLOCK_SIZE])
}

/// Checksum of an inode bitmap: only the bits of real inodes (`ipg / 8` bytes).
pub fn inode_bitmap_csum(seed: u32, b: &[u8], inodes_per_group: u32) -> u32 {
    crc(seed, &b[..inodes_per_group as usize / 8])
}

/// Number of blocks of group `g` that exist (the last group may be partial).
pub fn blocks_in_group(blocks_count: u64, g: u64) -> u64 {
    (blocks_count - g * BLOCKS_PER_GROUP).min(BLOCKS_PER_GROUP)
}

/// Zero bits among the first `n` bits.
pub fn count_free(b: &[u8], n: usize) -> u64 {
    let full = n / 8;
    let mut free: u64 = b[..full].iter().map(|x| u64::from(x.count_zeros())).sum();
    for i in full * 8..n {
        if !test(b, i) {
            free += 1;
        }
    }
    free
}

/// Finds the first run of free bits at or after `from` (below `n`): (start, length ≤ max_len).
pub fn find_free_run(b: &[u8], from: usize, n: usize, max_len: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < n {
        // Skip whole used bytes quickly.
        if i % 8 == 0 && i + 8 <= n && b[i >> 3] == 0xFF {
            i += 8;
            continue;
        }
        if !test(b, i) {
            let start = i;
            while i < n && i - start < max_len && !test(b, i) {
                i += 1;
            }
            return Some((start, i - start));
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_counts() {
        let mut b = vec![0u8; BLOCK_SIZE];
        set_range(&mut b, 0, 20);
        set(&mut b, 25);
        assert_eq!(count_free(&b, 32), 32 - 21);
        assert_eq!(find_free_run(&b, 0, 32768, 100), Some((20, 5)));
        assert_eq!(find_free_run(&b, 21, 32768, 3), Some((21, 3)));
        assert_eq!(find_free_run(&b, 26, 30, 100), Some((26, 4)));
        clear(&mut b, 3);
        assert_eq!(find_free_run(&b, 0, 32768, 100), Some((3, 1)));
    }
}
