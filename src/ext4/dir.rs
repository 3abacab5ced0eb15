//! Linear directory blocks (no hash tree) with the 12-byte checksum tail.

use super::le::*;
use super::{crc, FormatError, BLOCK_SIZE};

pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
const TAIL_OFF: usize = BLOCK_SIZE - 12;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u32,
    pub name: Vec<u8>,
    pub file_type: u8,
}

impl DirEntry {
    pub fn new(ino: u32, name: &str, file_type: u8) -> DirEntry {
        DirEntry {
            ino,
            name: name.as_bytes().to_vec(),
            file_type,
        }
    }
}

fn rec_len_for(name_len: usize) -> usize {
    (8 + name_len).div_ceil(4) * 4
}

/// Encodes entries into one block; the last entry's rec_len runs to the tail.
pub fn encode_block(entries: &[DirEntry], dir_iseed: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    let mut off = 0;
    for (i, e) in entries.iter().enumerate() {
        let len = if i + 1 == entries.len() {
            TAIL_OFF - off
        } else {
            rec_len_for(e.name.len())
        };
        put_u32(&mut b, off, e.ino);
        put_u16(&mut b, off + 4, len as u16);
        b[off + 6] = e.name.len() as u8;
        b[off + 7] = e.file_type;
        b[off + 8..off + 8 + e.name.len()].copy_from_slice(&e.name);
        off += len;
    }
    if entries.is_empty() {
        put_u16(&mut b, 4, TAIL_OFF as u16);
    }
    // Tail: inode 0, rec_len 12, name_len 0, file type 0xDE, checksum.
    put_u16(&mut b, TAIL_OFF + 4, 12);
    b[TAIL_OFF + 7] = 0xDE;
    let c = crc(dir_iseed, &b[..TAIL_OFF]);
    put_u32(&mut b, TAIL_OFF + 8, c);
    b
}

/// Recomputes the checksum tail of a directory block edited in place (tests, fuzzing); false
/// if the block has no tail.
pub fn reseal_block(b: &mut [u8], dir_iseed: u32) -> bool {
    if b.len() < BLOCK_SIZE || u16_at(b, TAIL_OFF + 4) != 12 || b[TAIL_OFF + 7] != 0xDE {
        return false;
    }
    let c = crc(dir_iseed, &b[..TAIL_OFF]);
    put_u32(b, TAIL_OFF + 8, c);
    true
}

/// Decodes the live entries of a directory block, checking structure and checksum.
pub fn decode_block(b: &[u8], dir_iseed: u32, what: &str) -> Result<Vec<DirEntry>, FormatError> {
    let bad = |d: String| super::corrupt(what.to_string(), d);
    if b.len() < BLOCK_SIZE {
        return Err(bad("truncated".into()));
    }
    if u16_at(b, TAIL_OFF + 4) != 12 || b[TAIL_OFF + 7] != 0xDE || u32_at(b, TAIL_OFF) != 0 {
        return Err(bad("missing checksum tail".into()));
    }
    let stored = u32_at(b, TAIL_OFF + 8);
    let computed = crc(dir_iseed, &b[..TAIL_OFF]);
    if stored != computed {
        return Err(FormatError::Checksum {
            what: what.to_string(),
            stored,
            computed,
        });
    }
    let mut out = Vec::new();
    let mut off = 0;
    while off < TAIL_OFF {
        let rec_len = usize::from(u16_at(b, off + 4));
        let name_len = usize::from(b[off + 6]);
        if rec_len < 8
            || rec_len % 4 != 0
            || off + rec_len > TAIL_OFF
            || rec_len < rec_len_for(name_len)
        {
            return Err(bad(format!("bad entry at offset {off}")));
        }
        let ino = u32_at(b, off);
        if ino != 0 {
            out.push(DirEntry {
                ino,
                name: b[off + 8..off + 8 + name_len].to_vec(),
                file_type: b[off + 7],
            });
        }
        off += rec_len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_block_matches_the_reference_layout() {
        let e = [
            DirEntry::new(2, ".", FT_DIR),
            DirEntry::new(2, "..", FT_DIR),
            DirEntry::new(11, "lost+found", FT_DIR),
            DirEntry::new(12, "disk", FT_REG),
        ];
        let b = encode_block(&e, 5);
        assert_eq!(u16_at(&b, 0x2C + 4), 0xFC8, "last rec_len runs to the tail");
        assert_eq!(u16_at(&b, 0x18 + 4), 0x14);
        assert_eq!(decode_block(&b, 5, "/").unwrap(), e);
        let mut c = b.clone();
        c[0x2C + 6] = 5;
        assert!(decode_block(&c, 5, "/").is_err());
    }
}
