//! The system zone: blocks that belong to the filesystem itself and must never be mapped by
//! `/disk` nor handed out by the allocator — superblock and GDT copies, bitmaps, inode tables,
//! the journal, directories. As ext4's `block_validity` (fs/ext4/block_validity.c), it is built
//! once at open from the group descriptors and the reserved inodes, and every extent and tree
//! pointer read from the image is checked against it before use: an image's bytes are
//! untrusted, and a guest write through a bad extent would otherwise land in metadata.

use std::fmt;

/// Who owns a system-zone block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A superblock copy with its group descriptor table (and reserved GDT blocks).
    Superblock {
        group: u64,
    },
    BlockBitmap {
        group: u64,
    },
    InodeBitmap {
        group: u64,
    },
    InodeTable {
        group: u64,
    },
    /// The journal's blocks and its extent-tree blocks.
    Journal,
    /// A directory's blocks and its extent-tree blocks.
    Directory {
        ino: u32,
    },
    /// The resize inode's double-indirect block (mke2fs's `resize_inode`).
    ResizeInode,
    /// One of `/disk`'s own extent-tree blocks (never in the zone: checked against at open).
    ExtentTree,
    /// `/disk`'s extent at this logical block (checked against at open).
    Extent {
        lblk: u32,
    },
}

impl Owner {
    /// The owner of the block `k` blocks into a run claimed by `self` with `per` blocks per group.
    fn at(self, k: u64, per: u64) -> Owner {
        let step = k.checked_div(per).unwrap_or(0);
        match self {
            Owner::BlockBitmap { group } => Owner::BlockBitmap {
                group: group + step,
            },
            Owner::InodeBitmap { group } => Owner::InodeBitmap {
                group: group + step,
            },
            Owner::InodeTable { group } => Owner::InodeTable {
                group: group + step,
            },
            other => other,
        }
    }

    /// The owner that a run claimed by `self` and then by `next` (right after it) would have
    /// if both were one: consecutive groups' bitmaps and inode tables sit side by side with
    /// flex_bg, and merging them keeps a 16 TiB image's zone at a handful of entries.
    fn continues(self, len: u64, per: u64, next: Owner) -> bool {
        per > 0 && len % per == 0 && self.at(len, per) == next && self != next
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Superblock { group } => write!(f, "the superblock/GDT copy of group {group}"),
            Owner::BlockBitmap { group } => write!(f, "the block bitmap of group {group}"),
            Owner::InodeBitmap { group } => write!(f, "the inode bitmap of group {group}"),
            Owner::InodeTable { group } => write!(f, "the inode table of group {group}"),
            Owner::Journal => write!(f, "the journal"),
            Owner::Directory { ino } => write!(f, "directory inode {ino}"),
            Owner::ResizeInode => write!(f, "the resize inode"),
            Owner::ExtentTree => write!(f, "a /disk extent tree block"),
            Owner::Extent { lblk } => write!(f, "the /disk extent at logical block {lblk}"),
        }
    }
}

/// A run of blocks and its owner; `per` is the run's blocks per group (0: one owner for all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub start: u64,
    pub len: u64,
    pub owner: Owner,
    pub per: u64,
}

impl Claim {
    pub fn new(start: u64, len: u64, owner: Owner) -> Claim {
        Claim {
            start,
            len,
            owner,
            per: 0,
        }
    }

    /// A run that belongs to consecutive groups, `per` blocks each (bitmaps, inode tables).
    pub fn per_group(start: u64, len: u64, owner: Owner, per: u64) -> Claim {
        Claim {
            start,
            len,
            owner,
            per,
        }
    }

    fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    fn owner_of(&self, blk: u64) -> Owner {
        self.owner.at(blk - self.start, self.per)
    }
}

/// Why a run is not valid where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Zero blocks long.
    Empty,
    /// It reaches past the last block of the filesystem (or overflows).
    PastEnd { blocks_count: u64 },
    /// Its block `block` belongs to `owner`.
    Owned { block: u64, owner: Owner },
    /// Its block `block` is marked free in the block bitmap.
    MarkedFree { block: u64 },
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::Empty => write!(f, "is empty"),
            Invalid::PastEnd { blocks_count } => write!(
                f,
                "reaches past the end of the filesystem ({blocks_count} blocks)"
            ),
            Invalid::Owned { block, owner } => write!(f, "overlaps {owner} at block {block}"),
            Invalid::MarkedFree { block } => {
                write!(f, "includes block {block}, marked free in its bitmap")
            }
        }
    }
}

/// The filesystem's own blocks, as sorted, disjoint claims.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemZone {
    blocks_count: u64,
    claims: Vec<Claim>,
}

impl SystemZone {
    /// The zone made of `claims`, which must each lie inside the filesystem and not overlap
    /// one another (two groups sharing a bitmap block would corrupt each other).
    pub fn new(blocks_count: u64, mut claims: Vec<Claim>) -> Result<SystemZone, (Claim, Invalid)> {
        claims.sort_by_key(|c| c.start);
        let mut merged: Vec<Claim> = Vec::with_capacity(claims.len().min(64));
        for c in claims {
            check_inside(blocks_count, c.start, c.len).map_err(|why| (c, why))?;
            if let Some(p) = merged.last_mut() {
                if c.start < p.end() {
                    return Err((
                        c,
                        Invalid::Owned {
                            block: c.start,
                            owner: p.owner_of(c.start),
                        },
                    ));
                }
                if c.start == p.end() && c.per == p.per && p.owner.continues(p.len, p.per, c.owner)
                {
                    p.len += c.len;
                    continue;
                }
            }
            merged.push(c);
        }
        Ok(SystemZone {
            blocks_count,
            claims: merged,
        })
    }

    pub fn blocks_count(&self) -> u64 {
        self.blocks_count
    }

    /// Adds a claim after checking it like any extent (inside the filesystem, clear of the zone).
    pub fn add(&mut self, c: Claim) -> Result<(), Invalid> {
        self.check(c.start, c.len)?;
        let i = self.claims.partition_point(|x| x.start < c.start);
        self.claims.insert(i, c);
        Ok(())
    }

    /// The first zone claim overlapping `[start, start + len)`, as (its start, its length).
    pub fn first_overlap(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        let end = start.saturating_add(len);
        let i = self.claims.partition_point(|c| c.end() <= start);
        self.claims
            .get(i)
            .filter(|c| c.start < end)
            .map(|c| (c.start, c.len))
    }

    /// Is `[start, start + len)` a valid place for file data or a tree block: not empty, inside
    /// the filesystem, clear of the zone?
    pub fn check(&self, start: u64, len: u64) -> Result<(), Invalid> {
        check_inside(self.blocks_count, start, len)?;
        let end = start + len;
        let i = self.claims.partition_point(|c| c.end() <= start);
        match self.claims.get(i) {
            Some(c) if c.start < end => {
                let block = c.start.max(start);
                Err(Invalid::Owned {
                    block,
                    owner: c.owner_of(block),
                })
            }
            _ => Ok(()),
        }
    }

    /// Who owns `blk`, if the zone holds it.
    pub fn owner(&self, blk: u64) -> Option<Owner> {
        let i = self.claims.partition_point(|c| c.end() <= blk);
        self.claims
            .get(i)
            .filter(|c| c.start <= blk)
            .map(|c| c.owner_of(blk))
    }

    /// Number of (merged) claims: a measure of the zone's size.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }
}

fn check_inside(blocks_count: u64, start: u64, len: u64) -> Result<(), Invalid> {
    if len == 0 {
        return Err(Invalid::Empty);
    }
    match start.checked_add(len) {
        Some(end) if end <= blocks_count => Ok(()),
        _ => Err(Invalid::PastEnd { blocks_count }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> SystemZone {
        // Three groups' bitmaps and tables side by side (flex_bg), a journal further on.
        let mut claims = vec![Claim::new(0, 2, Owner::Superblock { group: 0 })];
        for g in 0..3 {
            claims.push(Claim::per_group(
                2 + g,
                1,
                Owner::BlockBitmap { group: g },
                1,
            ));
            claims.push(Claim::per_group(
                5 + g,
                1,
                Owner::InodeBitmap { group: g },
                1,
            ));
            claims.push(Claim::per_group(
                8 + 2 * g,
                2,
                Owner::InodeTable { group: g },
                2,
            ));
        }
        claims.push(Claim::new(100, 50, Owner::Journal));
        SystemZone::new(1000, claims).unwrap()
    }

    #[test]
    fn per_group_runs_merge_and_still_name_their_group() {
        let z = zone();
        assert_eq!(z.len(), 5, "superblock, bitmaps x2, tables, journal");
        assert_eq!(z.owner(3), Some(Owner::BlockBitmap { group: 1 }));
        assert_eq!(z.owner(7), Some(Owner::InodeBitmap { group: 2 }));
        assert_eq!(z.owner(11), Some(Owner::InodeTable { group: 1 }));
        assert_eq!(z.owner(14), None);
        assert_eq!(z.owner(149), Some(Owner::Journal));
        assert_eq!(z.owner(150), None);
    }

    #[test]
    fn runs_are_checked_against_the_zone_and_the_end() {
        let z = zone();
        assert_eq!(z.check(14, 86), Ok(()));
        assert_eq!(
            z.check(14, 87),
            Err(Invalid::Owned {
                block: 100,
                owner: Owner::Journal
            })
        );
        assert_eq!(
            z.check(9, 1),
            Err(Invalid::Owned {
                block: 9,
                owner: Owner::InodeTable { group: 0 }
            })
        );
        assert_eq!(z.check(500, 0), Err(Invalid::Empty));
        assert_eq!(
            z.check(999, 2),
            Err(Invalid::PastEnd { blocks_count: 1000 })
        );
        assert_eq!(
            z.check(u64::MAX, 2),
            Err(Invalid::PastEnd { blocks_count: 1000 })
        );
        assert_eq!(z.first_overlap(12, 200), Some((8, 6)));
        assert_eq!(z.first_overlap(14, 86), None);
    }

    #[test]
    fn overlapping_claims_are_refused() {
        let claims = vec![
            Claim::new(0, 2, Owner::Superblock { group: 0 }),
            Claim::new(1, 1, Owner::BlockBitmap { group: 0 }),
        ];
        let (c, why) = SystemZone::new(100, claims).unwrap_err();
        assert_eq!(c.owner, Owner::BlockBitmap { group: 0 });
        assert_eq!(
            why,
            Invalid::Owned {
                block: 1,
                owner: Owner::Superblock { group: 0 }
            }
        );
        let mut z = SystemZone::new(100, vec![]).unwrap();
        z.add(Claim::new(10, 5, Owner::Journal)).unwrap();
        assert!(z
            .add(Claim::new(14, 1, Owner::Directory { ino: 2 }))
            .is_err());
        assert!(z
            .add(Claim::new(99, 2, Owner::Directory { ino: 2 }))
            .is_err());
    }
}
