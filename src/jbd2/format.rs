//! jbd2 log blocks: the journal superblock, descriptor blocks and their tags, commit blocks and
//! revoke blocks, each encoded and decoded with its checksum (format reference §4).

use crate::ext4::{corrupt, crc, FormatError, BLOCK_SIZE};

pub const MAGIC: u32 = 0xC03B_3998;
pub const BT_DESCRIPTOR: u32 = 1;
pub const BT_COMMIT: u32 = 2;
pub const BT_SUPERBLOCK_V1: u32 = 3;
pub const BT_SUPERBLOCK_V2: u32 = 4;
pub const BT_REVOKE: u32 = 5;

pub const INCOMPAT_REVOKE: u32 = 0x1;
pub const INCOMPAT_64BIT: u32 = 0x2;
pub const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
pub const INCOMPAT_CSUM_V2: u32 = 0x8;
pub const INCOMPAT_CSUM_V3: u32 = 0x10;
pub const INCOMPAT_FAST_COMMIT: u32 = 0x20;
/// What extblk writes: revoke, 64-bit block numbers, checksum v3.
pub const WRITE_INCOMPAT: u32 = INCOMPAT_REVOKE | INCOMPAT_64BIT | INCOMPAT_CSUM_V3;
const CSUM_TYPE_CRC32C: u8 = 4;

pub const TAG_ESCAPE: u32 = 0x1;
pub const TAG_SAME_UUID: u32 = 0x2;
pub const TAG_DELETED: u32 = 0x4;
pub const TAG_LAST: u32 = 0x8;
/// Tags fit until byte 4092: one 32-byte first tag (with its UUID slot), then 16 bytes each.
pub const MAX_TAGS: usize = 254;
/// Revoke records per block: (4092 − 16) / 8.
pub const MAX_REVOKES: usize = 509;
const TAIL: usize = BLOCK_SIZE - 4;
/// The journal superblock (`journal_superblock_t`): the first 1024 bytes of log block 0; the
/// rest of that block is zero.
pub const SUPERBLOCK_SIZE: usize = 1024;

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn put_be32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}
fn put_be64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// The journal seed: crc over the journal superblock's UUID.
pub fn journal_seed(uuid: &[u8; 16]) -> u32 {
    crc(!0, uuid)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalSuperblock {
    pub maxlen: u32,
    pub first: u32,
    /// tid of the oldest transaction in the log; when clean, the tid the next one uses − 1.
    pub sequence: u32,
    /// Log block of that transaction; 0 = empty log.
    pub start: u32,
    pub errno: i32,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub feature_ro_compat: u32,
    pub uuid: [u8; 16],
    pub checksum_type: u8,
    pub head: u32,
    raw: Box<[u8; SUPERBLOCK_SIZE]>,
}

impl JournalSuperblock {
    pub fn new(maxlen: u32, uuid: [u8; 16], sequence: u32) -> JournalSuperblock {
        JournalSuperblock {
            maxlen,
            first: 1,
            sequence,
            start: 0,
            errno: 0,
            feature_compat: 0,
            feature_incompat: WRITE_INCOMPAT,
            feature_ro_compat: 0,
            uuid,
            checksum_type: CSUM_TYPE_CRC32C,
            head: 0,
            raw: Box::new([0u8; SUPERBLOCK_SIZE]),
        }
    }

    pub fn decode(b: &[u8]) -> Result<JournalSuperblock, FormatError> {
        let bad = |d: &str| corrupt("journal superblock", d);
        if b.len() < SUPERBLOCK_SIZE {
            return Err(bad("truncated"));
        }
        if be32(b, 0) != MAGIC {
            return Err(bad("bad magic"));
        }
        match be32(b, 4) {
            BT_SUPERBLOCK_V2 => {}
            BT_SUPERBLOCK_V1 => {
                return Err(FormatError::UnsupportedFeature("jbd2 v1 journal".into()))
            }
            _ => return Err(bad("not a superblock")),
        }
        if be32(b, 0x0C) as usize != BLOCK_SIZE {
            return Err(bad("block size is not 4096"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[0x30..0x40]);
        let mut raw = Box::new([0u8; SUPERBLOCK_SIZE]);
        raw.copy_from_slice(&b[..SUPERBLOCK_SIZE]);
        let sb = JournalSuperblock {
            maxlen: be32(b, 0x10),
            first: be32(b, 0x14),
            sequence: be32(b, 0x18),
            start: be32(b, 0x1C),
            errno: be32(b, 0x20) as i32,
            feature_compat: be32(b, 0x24),
            feature_incompat: be32(b, 0x28),
            feature_ro_compat: be32(b, 0x2C),
            uuid,
            checksum_type: b[0x50],
            head: be32(b, 0x58),
            raw,
        };
        let unknown =
            sb.feature_incompat & !(WRITE_INCOMPAT | INCOMPAT_ASYNC_COMMIT | INCOMPAT_CSUM_V2);
        if unknown != 0 || sb.feature_incompat & INCOMPAT_FAST_COMMIT != 0 {
            return Err(FormatError::UnsupportedFeature(format!(
                "jbd2 incompat {:#x}",
                sb.feature_incompat
            )));
        }
        if sb.feature_ro_compat != 0 {
            return Err(FormatError::UnsupportedFeature(format!(
                "jbd2 ro_compat {:#x}",
                sb.feature_ro_compat
            )));
        }
        if sb.feature_incompat & INCOMPAT_CSUM_V2 != 0 || sb.feature_compat & 0x1 != 0 {
            return Err(FormatError::UnsupportedFeature(
                "jbd2 checksum v1/v2".into(),
            ));
        }
        if sb.feature_incompat & INCOMPAT_CSUM_V3 != 0 {
            if sb.checksum_type != CSUM_TYPE_CRC32C {
                return Err(bad("checksum v3 with a checksum type other than crc32c"));
            }
            let stored = be32(b, 0xFC);
            let computed = Self::checksum(b);
            if stored != computed {
                return Err(FormatError::Checksum {
                    what: "journal superblock".into(),
                    stored,
                    computed,
                });
            }
        }
        if sb.first == 0
            || sb.first >= sb.maxlen
            || sb.start >= sb.maxlen
            || (sb.start != 0 && sb.start < sb.first)
        {
            return Err(bad("log bounds out of range"));
        }
        Ok(sb)
    }

    /// Journals made by mke2fs start without checksums; extblk upgrades them while empty.
    pub fn has_csum_v3(&self) -> bool {
        self.feature_incompat & INCOMPAT_CSUM_V3 != 0
    }

    pub fn upgrade_features(&mut self) {
        self.feature_incompat = WRITE_INCOMPAT;
        self.checksum_type = CSUM_TYPE_CRC32C;
    }

    fn checksum(b: &[u8]) -> u32 {
        let mut c = [0u8; SUPERBLOCK_SIZE];
        c.copy_from_slice(&b[..SUPERBLOCK_SIZE]);
        c[0xFC..0x100].fill(0);
        crc(!0, &c)
    }

    /// The whole first journal block.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        b[..SUPERBLOCK_SIZE].copy_from_slice(&self.raw[..]);
        put_be32(&mut b, 0, MAGIC);
        put_be32(&mut b, 4, BT_SUPERBLOCK_V2);
        put_be32(&mut b, 8, 0);
        put_be32(&mut b, 0x0C, BLOCK_SIZE as u32);
        put_be32(&mut b, 0x10, self.maxlen);
        put_be32(&mut b, 0x14, self.first);
        put_be32(&mut b, 0x18, self.sequence);
        put_be32(&mut b, 0x1C, self.start);
        put_be32(&mut b, 0x20, self.errno as u32);
        put_be32(&mut b, 0x24, self.feature_compat);
        put_be32(&mut b, 0x28, self.feature_incompat);
        put_be32(&mut b, 0x2C, self.feature_ro_compat);
        b[0x30..0x40].copy_from_slice(&self.uuid);
        if be32(&b, 0x40) == 0 {
            put_be32(&mut b, 0x40, 1); // s_nr_users
        }
        b[0x50] = self.checksum_type;
        put_be32(&mut b, 0x58, self.head);
        if self.has_csum_v3() {
            let c = Self::checksum(&b);
            put_be32(&mut b, 0xFC, c);
        }
        b
    }
}

/// The common header of descriptor, commit and revoke blocks: (block type, tid).
pub fn header(b: &[u8]) -> Option<(u32, u32)> {
    if b.len() >= 12 && be32(b, 0) == MAGIC {
        Some((be32(b, 4), be32(b, 8)))
    } else {
        None
    }
}

fn put_header(b: &mut [u8], blocktype: u32, tid: u32) {
    put_be32(b, 0, MAGIC);
    put_be32(b, 4, blocktype);
    put_be32(b, 8, tid);
}

/// Checksum of a descriptor or revoke block: the whole block with its 4-byte tail taken as zero.
fn tail_csum(b: &[u8], jseed: u32) -> u32 {
    crc(crc(jseed, &b[..TAIL]), &[0u8; 4])
}

/// One descriptor tag: where a logged block goes home, and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub blocknr: u64,
    pub escaped: bool,
    pub checksum: u32,
}

/// Checksum of a logged block copy (as stored, after escaping) in transaction `tid`.
pub fn block_csum(jseed: u32, tid: u32, data: &[u8]) -> u32 {
    crc(crc(jseed, &tid.to_be_bytes()), data)
}

/// Does this block need escaping (it begins with the jbd2 magic)?
pub fn needs_escape(data: &[u8]) -> bool {
    be32(data, 0) == MAGIC
}

/// Escapes a block copy for the log: its leading magic is zeroed (its tag says so), so replay
/// never takes the copy for a journal block.
pub fn escape(data: &mut [u8]) {
    put_be32(data, 0, 0);
}

/// Restores the leading magic of an escaped block copy.
pub fn unescape(data: &mut [u8]) {
    put_be32(data, 0, MAGIC);
}

pub fn encode_descriptor(tid: u32, tags: &[Tag], jseed: u32) -> Vec<u8> {
    assert!(!tags.is_empty() && tags.len() <= MAX_TAGS);
    let mut b = vec![0u8; BLOCK_SIZE];
    put_header(&mut b, BT_DESCRIPTOR, tid);
    let mut off = 12;
    for (i, t) in tags.iter().enumerate() {
        let mut flags = 0;
        if t.escaped {
            flags |= TAG_ESCAPE;
        }
        if i > 0 {
            flags |= TAG_SAME_UUID;
        }
        if i + 1 == tags.len() {
            flags |= TAG_LAST;
        }
        put_be32(&mut b, off, t.blocknr as u32);
        put_be32(&mut b, off + 4, flags);
        put_be32(&mut b, off + 8, (t.blocknr >> 32) as u32);
        put_be32(&mut b, off + 12, t.checksum);
        off += 16;
        if i == 0 {
            off += 16; // UUID slot, zero
        }
    }
    let c = tail_csum(&b, jseed);
    put_be32(&mut b, TAIL, c);
    b
}

/// Recomputes the checksum of a journal block edited in place (tests, fuzzing): superblock,
/// descriptor or revoke tail, commit. Tag checksums are [`reseal_tags`]'. Returns the block's
/// (type, tid), or `None` for a block that is not a journal structure.
pub fn reseal(b: &mut [u8], jseed: u32) -> Option<(u32, u32)> {
    if b.len() < BLOCK_SIZE {
        return None;
    }
    let (kind, tid) = header(b)?;
    match kind {
        BT_SUPERBLOCK_V2 => {
            let c = JournalSuperblock::checksum(b);
            put_be32(b, 0xFC, c);
        }
        BT_DESCRIPTOR | BT_REVOKE => {
            let c = tail_csum(b, jseed);
            put_be32(b, TAIL, c);
        }
        BT_COMMIT => {
            b[0x10..0x14].fill(0);
            let c = crc(jseed, &b[..BLOCK_SIZE]);
            put_be32(b, 0x10, c);
        }
        _ => {}
    }
    Some((kind, tid))
}

/// Sets each tag of descriptor `b` (transaction `tid`) to the checksum of its logged block —
/// `data(i)` is the copy of the i-th — then reseals the descriptor (tests, fuzzing). Walks the
/// tags as [`decode_descriptor`] does; returns how many it found.
pub fn reseal_tags(
    b: &mut [u8],
    tid: u32,
    jseed: u32,
    data: &mut dyn FnMut(usize) -> Option<Vec<u8>>,
) -> usize {
    if b.len() < BLOCK_SIZE {
        return 0;
    }
    let mut off = 12;
    let mut n = 0;
    while off + 16 <= TAIL {
        let flags = be32(b, off + 4);
        if let Some(copy) = data(n) {
            put_be32(b, off + 12, block_csum(jseed, tid, &copy));
        }
        n += 1;
        off += 16;
        if flags & TAG_SAME_UUID == 0 {
            off += 16;
        }
        if flags & TAG_LAST != 0 {
            break;
        }
    }
    let c = tail_csum(b, jseed);
    put_be32(b, TAIL, c);
    n
}

/// Decodes a descriptor's tags. `Err` only for a structure that cannot be walked; a bad tail
/// checksum is reported in the second value (replay treats it as the end of the log).
pub fn decode_descriptor(b: &[u8], jseed: u32) -> Result<(Vec<Tag>, bool), FormatError> {
    let csum_ok = be32(b, TAIL) == tail_csum(b, jseed);
    let mut tags = Vec::new();
    let mut off = 12;
    loop {
        if off + 16 > TAIL {
            break;
        }
        let flags = be32(b, off + 4);
        tags.push(Tag {
            blocknr: u64::from(be32(b, off)) | (u64::from(be32(b, off + 8)) << 32),
            escaped: flags & TAG_ESCAPE != 0,
            checksum: be32(b, off + 12),
        });
        off += 16;
        if flags & TAG_SAME_UUID == 0 {
            off += 16;
        }
        if flags & TAG_LAST != 0 {
            break;
        }
    }
    if tags.is_empty() {
        return Err(corrupt("journal descriptor", "no tags"));
    }
    Ok((tags, csum_ok))
}

pub fn encode_commit(tid: u32, sec: u64, nsec: u32, jseed: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    put_header(&mut b, BT_COMMIT, tid);
    put_be64(&mut b, 0x30, sec);
    put_be32(&mut b, 0x38, nsec);
    let c = crc(jseed, &b);
    put_be32(&mut b, 0x10, c);
    b
}

/// A commit block's time and whether its checksum holds.
pub fn decode_commit(b: &[u8], jseed: u32) -> (u64, bool) {
    let mut c = b[..BLOCK_SIZE].to_vec();
    c[0x10..0x14].fill(0);
    let ok = be32(b, 0x10) == crc(jseed, &c);
    (be64(b, 0x30), ok)
}

pub fn encode_revoke(tid: u32, blocks: &[u64], jseed: u32) -> Vec<u8> {
    assert!(blocks.len() <= MAX_REVOKES);
    let mut b = vec![0u8; BLOCK_SIZE];
    put_header(&mut b, BT_REVOKE, tid);
    put_be32(&mut b, 0x0C, (16 + 8 * blocks.len()) as u32);
    for (i, blk) in blocks.iter().enumerate() {
        put_be64(&mut b, 16 + 8 * i, *blk);
    }
    let c = tail_csum(&b, jseed);
    put_be32(&mut b, TAIL, c);
    b
}

/// Revoked block numbers and whether the checksum holds.
pub fn decode_revoke(b: &[u8], jseed: u32) -> Result<(Vec<u64>, bool), FormatError> {
    let csum_ok = be32(b, TAIL) == tail_csum(b, jseed);
    let count = be32(b, 0x0C) as usize;
    if !(16..=TAIL).contains(&count) || (count - 16) % 8 != 0 {
        return Err(corrupt("journal revoke block", format!("r_count {count}")));
    }
    Ok((
        (16..count).step_by(8).map(|o| be64(b, o)).collect(),
        csum_ok,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip() {
        let sb = JournalSuperblock::new(16384, [3; 16], 7);
        let b = sb.encode();
        let d = JournalSuperblock::decode(&b).unwrap();
        assert_eq!(d.encode(), b);
        let mut c = b.clone();
        c[0x19] ^= 1;
        assert!(JournalSuperblock::decode(&c).is_err());
    }

    #[test]
    fn descriptor_commit_revoke_round_trip() {
        let tags: Vec<Tag> = (0..MAX_TAGS as u64)
            .map(|i| Tag {
                blocknr: (i << 33) | i,
                escaped: i % 7 == 0,
                checksum: i as u32 * 3,
            })
            .collect();
        let b = encode_descriptor(9, &tags, 42);
        assert_eq!(header(&b), Some((BT_DESCRIPTOR, 9)));
        assert_eq!(decode_descriptor(&b, 42).unwrap(), (tags, true));
        let c = encode_commit(9, 1_700_000_000, 5, 42);
        assert_eq!(decode_commit(&c, 42), (1_700_000_000, true));
        assert!(!decode_commit(&c, 43).1);
        let r = encode_revoke(9, &[1, 1 << 40], 42);
        assert_eq!(decode_revoke(&r, 42).unwrap(), (vec![1, 1 << 40], true));
    }
}
