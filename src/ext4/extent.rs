//! Extent-tree nodes: the root in the inode's `i_block` (4 entries) and index/leaf blocks
//! (340 entries and a checksum tail).

use super::le::*;
use super::{crc, FormatError, BLOCK_SIZE};

pub const MAGIC: u16 = 0xF30A;
pub const ROOT_MAX: u16 = 4;
pub const BLOCK_MAX: u16 = 340;
/// Longest written extent; an unwritten one is at most one block shorter.
pub const MAX_WRITTEN_LEN: u32 = 32768;
pub const MAX_UNWRITTEN_LEN: u32 = 32767;
/// Deeper trees than this cannot occur below 2^32 logical blocks.
pub const MAX_DEPTH: u16 = 5;
const TAIL: usize = 12 + 12 * BLOCK_MAX as usize;

/// A leaf entry: logical blocks `[lblk, lblk + len)` at physical `pblk…`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub lblk: u32,
    pub len: u32,
    pub pblk: u64,
    pub unwritten: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        u64::from(self.lblk) + u64::from(self.len)
    }

    pub fn max_len(unwritten: bool) -> u32 {
        if unwritten {
            MAX_UNWRITTEN_LEN
        } else {
            MAX_WRITTEN_LEN
        }
    }
}

/// An index entry: the child node covering logical blocks from `lblk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Index {
    pub lblk: u32,
    pub child: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entries {
    Leaf(Vec<Extent>),
    Index(Vec<Index>),
}

/// A decoded node; `depth` 0 holds extents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub depth: u16,
    pub entries: Entries,
}

impl Node {
    pub fn len(&self) -> usize {
        match &self.entries {
            Entries::Leaf(v) => v.len(),
            Entries::Index(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// First logical block covered, if any entry.
    pub fn first_lblk(&self) -> Option<u32> {
        match &self.entries {
            Entries::Leaf(v) => v.first().map(|e| e.lblk),
            Entries::Index(v) => v.first().map(|e| e.lblk),
        }
    }
}

fn decode_entries(b: &[u8], max_allowed: (u16, u16), what: &str) -> Result<Node, FormatError> {
    let bad = |d: String| super::corrupt(what.to_string(), d);
    if u16_at(b, 0) != MAGIC {
        return Err(bad(format!(
            "bad extent header magic {:#06x}",
            u16_at(b, 0)
        )));
    }
    let entries = u16_at(b, 2);
    let max = u16_at(b, 4);
    let depth = u16_at(b, 6);
    if max < max_allowed.0 || max > max_allowed.1 {
        return Err(bad(format!("eh_max {max}")));
    }
    if entries > max {
        return Err(bad(format!("{entries} entries, max {max}")));
    }
    if depth > MAX_DEPTH {
        return Err(bad(format!("depth {depth}")));
    }
    let at = |i: usize| 12 + 12 * i;
    let node = if depth == 0 {
        let mut v = Vec::with_capacity(entries.into());
        for i in 0..usize::from(entries) {
            let o = at(i);
            let raw_len = u32::from(u16_at(b, o + 4));
            let (len, unwritten) = if raw_len > MAX_WRITTEN_LEN {
                (raw_len - MAX_WRITTEN_LEN, true)
            } else {
                (raw_len, false)
            };
            if len == 0 {
                return Err(bad(format!("zero-length extent at entry {i}")));
            }
            let e = Extent {
                lblk: u32_at(b, o),
                len,
                pblk: u64::from(u32_at(b, o + 8)) | (u64::from(u16_at(b, o + 6)) << 32),
                unwritten,
            };
            if let Some(p) = v.last() {
                let p: &Extent = p;
                if u64::from(e.lblk) < p.end() {
                    return Err(bad(format!(
                        "extents out of order or overlapping at entry {i}"
                    )));
                }
            }
            if e.end() > super::MAX_FILE_BLOCKS {
                return Err(bad(format!(
                    "extent at entry {i} passes the last logical block"
                )));
            }
            v.push(e);
        }
        Entries::Leaf(v)
    } else {
        let mut v: Vec<Index> = Vec::with_capacity(entries.into());
        for i in 0..usize::from(entries) {
            let o = at(i);
            let e = Index {
                lblk: u32_at(b, o),
                child: u64::from(u32_at(b, o + 4)) | (u64::from(u16_at(b, o + 8)) << 32),
            };
            if v.last().is_some_and(|p| e.lblk <= p.lblk) {
                return Err(bad(format!("index entries out of order at entry {i}")));
            }
            v.push(e);
        }
        Entries::Index(v)
    };
    Ok(Node {
        depth,
        entries: node,
    })
}

fn encode_entries(node: &Node, b: &mut [u8], max: u16) {
    put_u16(b, 0, MAGIC);
    put_u16(b, 2, node.len() as u16);
    put_u16(b, 4, max);
    put_u16(b, 6, node.depth);
    put_u32(b, 8, 0);
    match &node.entries {
        Entries::Leaf(v) => {
            for (i, e) in v.iter().enumerate() {
                let o = 12 + 12 * i;
                put_u32(b, o, e.lblk);
                let raw_len = if e.unwritten {
                    e.len + MAX_WRITTEN_LEN
                } else {
                    e.len
                };
                put_u16(b, o + 4, raw_len as u16);
                put_u16(b, o + 6, (e.pblk >> 32) as u16);
                put_u32(b, o + 8, e.pblk as u32);
            }
        }
        Entries::Index(v) => {
            for (i, e) in v.iter().enumerate() {
                let o = 12 + 12 * i;
                put_u32(b, o, e.lblk);
                put_u32(b, o + 4, e.child as u32);
                put_u16(b, o + 8, (e.child >> 32) as u16);
                put_u16(b, o + 10, 0);
            }
        }
    }
}

/// Decodes the root held in an inode's `i_block`.
pub fn decode_root(i_block: &[u8; 60]) -> Result<Node, FormatError> {
    decode_entries(i_block, (3, ROOT_MAX), "extent root")
}

pub fn encode_root(node: &Node) -> [u8; 60] {
    let mut b = [0u8; 60];
    encode_entries(node, &mut b, ROOT_MAX);
    b
}

/// Decodes a tree block owned by an inode with checksum seed `iseed`.
pub fn decode_block(b: &[u8], iseed: u32, pblk: u64) -> Result<Node, FormatError> {
    let what = format!("extent block {pblk}");
    if b.len() < BLOCK_SIZE {
        return Err(super::corrupt(what, "truncated"));
    }
    let node = decode_entries(b, (338, BLOCK_MAX), &what)?;
    let max = usize::from(u16_at(b, 4));
    let tail = 12 + 12 * max;
    let stored = u32_at(b, tail);
    let computed = crc(iseed, &b[..tail]);
    if stored != computed {
        return Err(FormatError::Checksum {
            what,
            stored,
            computed,
        });
    }
    Ok(node)
}

/// Recomputes the tail checksum of a tree block edited in place (tests, fuzzing), where its
/// header says the tail is; false if the header is not an extent header.
pub fn reseal_block(b: &mut [u8], iseed: u32) -> bool {
    if b.len() < BLOCK_SIZE || u16_at(b, 0) != MAGIC {
        return false;
    }
    let max = usize::from(u16_at(b, 4));
    let tail = 12 + 12 * max;
    if max == 0 || tail + 4 > BLOCK_SIZE {
        return false;
    }
    let c = crc(iseed, &b[..tail]);
    put_u32(b, tail, c);
    true
}

pub fn encode_block(node: &Node, iseed: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    encode_entries(node, &mut b, BLOCK_MAX);
    let c = crc(iseed, &b[..TAIL]);
    put_u32(&mut b, TAIL, c);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_and_index_round_trip() {
        let leaf = Node {
            depth: 0,
            entries: Entries::Leaf(vec![
                Extent {
                    lblk: 0,
                    len: 256,
                    pblk: 16487,
                    unwritten: false,
                },
                Extent {
                    lblk: 262144,
                    len: 512,
                    pblk: 34816,
                    unwritten: true,
                },
                Extent {
                    lblk: 262656,
                    len: 32768,
                    pblk: 1 << 40,
                    unwritten: false,
                },
            ]),
        };
        let b = encode_block(&leaf, 99);
        assert_eq!(u16_at(&b, 12 + 12 + 4), 0x8200, "unwritten encoding");
        assert_eq!(decode_block(&b, 99, 7).unwrap(), leaf);
        assert!(decode_block(&b, 98, 7).is_err());
        let root = Node {
            depth: 1,
            entries: Entries::Index(vec![Index {
                lblk: 0,
                child: 32770,
            }]),
        };
        assert_eq!(decode_root(&encode_root(&root)).unwrap(), root);
    }

    #[test]
    fn malformed_nodes_are_refused() {
        let mut b = encode_root(&Node {
            depth: 0,
            entries: Entries::Leaf(vec![
                Extent {
                    lblk: 10,
                    len: 5,
                    pblk: 100,
                    unwritten: false,
                },
                Extent {
                    lblk: 12,
                    len: 5,
                    pblk: 200,
                    unwritten: false,
                },
            ]),
        });
        assert!(decode_root(&b).is_err(), "overlap");
        b[0] = 0;
        assert!(decode_root(&b).is_err(), "magic");
        let z = encode_root(&Node {
            depth: 0,
            entries: Entries::Leaf(vec![Extent {
                lblk: 0,
                len: 1,
                pblk: 1,
                unwritten: false,
            }]),
        });
        let mut zz = z;
        zz[16] = 0;
        zz[17] = 0;
        assert!(decode_root(&zz).is_err(), "zero length");
    }
}
