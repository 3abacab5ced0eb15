//! The extent tree of `/disk`, held in memory and written back node by node.
//!
//! The tree is kept as an ordered list of leaves (each ≤ 340 extents) with index levels derived
//! from it: level k groups the nodes of level k−1 in runs of 340, until at most 4 entries remain
//! for the root in the inode. With ≤ 4 extents the root holds them itself (depth 0). A change
//! inside one leaf that keeps its first key rewrites just that leaf (the common case, in time
//! independent of the tree's size); any other change repacks the leaves around it to three
//! quarters full and rewrites the index nodes whose entries changed. Every changed node is reported in [`TreeChanges`] so the caller
//! can journal it; tree blocks come from and go back to a [`NodeAlloc`].

use std::collections::BTreeSet;

use super::MapError;
use crate::ext4::extent::{Entries, Extent, Index, Node, BLOCK_MAX, MAX_WRITTEN_LEN, ROOT_MAX};
use crate::ext4::{FormatError, MAX_FILE_BLOCKS};

const FANOUT: usize = BLOCK_MAX as usize;
const ROOT_FANOUT: usize = ROOT_MAX as usize;
/// Extents per leaf when leaves are rebuilt: a quarter of a leaf stays free, as after ext4's own
/// splits, so inserts land in one leaf without touching the index.
const LEAF_FILL: usize = FANOUT * 3 / 4;

/// Where tree blocks come from.
pub trait NodeAlloc {
    /// `n` free blocks for tree nodes, near `goal`: all of them, or none and an error (ENOSPC)
    /// with nothing changed. An edit reserves every block it needs this way before it touches
    /// the tree, so a failed edit leaves tree and allocator exactly as they were.
    fn alloc_nodes(&mut self, goal: u64, n: usize) -> Result<Vec<u64>, MapError>;
    /// A tree node's block is no longer used.
    fn free_node(&mut self, pblk: u64);
}

/// Takes a block [`ExtentTree::reserve`] set aside. It counts exactly the blocks an edit takes,
/// so the pool cannot run dry; if it ever did, stopping beats writing a node over block 0.
fn reserved(pool: &mut Vec<u64>) -> u64 {
    pool.pop().expect("reserve() counts every new node")
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Leaf {
    pblk: u64,
    extents: Vec<Stored>,
}

/// An extent as a leaf keeps it in memory: 12 bytes, as on disk, where [`Extent`] takes 24 (a
/// 1 TiB disk written at random holds a million extents). The length carries the unwritten flag
/// as ext4's `ee_len` does (> 32768: unwritten), the physical block is 48 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stored {
    lblk: u32,
    len: u16,
    pblk_hi: u16,
    pblk_lo: u32,
}

/// A [`Stored`] length above this is an unwritten extent of the excess, as ext4's `ee_len`
/// above `EXT_INIT_MAX_LEN` (the longest written extent).
const UNWRITTEN_LEN_OFFSET: u32 = MAX_WRITTEN_LEN;

impl From<Extent> for Stored {
    fn from(e: Extent) -> Stored {
        debug_assert!(e.len >= 1 && e.len <= Extent::max_len(e.unwritten) && e.pblk < 1 << 48);
        let len = if e.unwritten {
            e.len + UNWRITTEN_LEN_OFFSET
        } else {
            e.len
        };
        Stored {
            lblk: e.lblk,
            len: len as u16,
            pblk_hi: (e.pblk >> 32) as u16,
            pblk_lo: e.pblk as u32,
        }
    }
}

impl From<Stored> for Extent {
    fn from(s: Stored) -> Extent {
        let unwritten = u32::from(s.len) > UNWRITTEN_LEN_OFFSET;
        Extent {
            lblk: s.lblk,
            len: u32::from(s.len) - if unwritten { UNWRITTEN_LEN_OFFSET } else { 0 },
            pblk: u64::from(s.pblk_hi) << 32 | u64::from(s.pblk_lo),
            unwritten,
        }
    }
}

fn stored(v: &[Extent]) -> Vec<Stored> {
    v.iter().map(|&e| Stored::from(e)).collect()
}

fn unpacked(v: &[Stored]) -> impl Iterator<Item = Extent> + '_ {
    v.iter().map(|&e| Extent::from(e))
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct IndexNode {
    pblk: u64,
    entries: Vec<Index>,
}

/// What a change did to the on-disk tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeChanges {
    /// Tree blocks whose content changed (to be journaled), including new ones.
    pub dirty: BTreeSet<u64>,
    /// The root (in the inode) changed.
    pub root_dirty: bool,
}

/// The result of looking up one logical block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The block is mapped: the extent clipped to start at the looked-up block.
    Mapped(Extent),
    /// A hole of `len` blocks (up to the next extent, or the end of the logical space).
    Hole { len: u64 },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentTree {
    /// Depth 0: the extents in the root.
    root_extents: Vec<Extent>,
    /// Depth ≥ 1: the leaves in logical order.
    leaves: Vec<Leaf>,
    /// Index levels above the leaves, lowest first; the root's entries are derived from the top.
    levels: Vec<Vec<IndexNode>>,
    root_entries: Vec<Index>,
    changes: TreeChanges,
    data_blocks: u64,
    extent_count: usize,
}

fn merge_pass(v: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        if let Some(p) = out.last_mut() {
            if p.end() == u64::from(e.lblk)
                && p.unwritten == e.unwritten
                && p.pblk + u64::from(p.len) == e.pblk
                && p.len + e.len <= Extent::max_len(e.unwritten)
            {
                p.len += e.len;
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// The edit that replaces the coverage of `[a, b)` in a sorted list: `old[lo..hi]` becomes
/// `window` (the edges of split extents, `new`, and the neighbours they may merge with).
struct Edit {
    lo: usize,
    hi: usize,
    window: Vec<Extent>,
    removed: Vec<Extent>,
}

/// Finds the edit by binary search, so its cost is that of the extents it touches.
fn edit<T: Copy + Into<Extent>>(old: &[T], a: u32, b: u32, new: &[Extent]) -> Edit {
    let (a64, b64) = (u64::from(a), u64::from(b));
    let i0 = old.partition_point(|&e| e.into().end() <= a64);
    let i1 = old
        .partition_point(|&e| u64::from(e.into().lblk) < b64)
        .max(i0);
    let (lo, hi) = (i0.saturating_sub(1), (i1 + 1).min(old.len()));
    let mut window = Vec::with_capacity(new.len() + 4);
    window.extend(old[lo..i0].iter().map(|&e| e.into()));
    let mut removed = Vec::with_capacity(i1 - i0);
    for (k, e) in old[i0..i1]
        .iter()
        .map(|&e| -> Extent { e.into() })
        .enumerate()
    {
        let e = &e;
        // Overlaps [a, b): keep the parts outside, report the part inside.
        if u64::from(e.lblk) < a64 {
            window.push(Extent {
                len: a - e.lblk,
                ..*e
            });
        }
        let s = e.lblk.max(a);
        let t = e.end().min(b64) as u32;
        removed.push(Extent {
            lblk: s,
            len: t - s,
            pblk: e.pblk + u64::from(s - e.lblk),
            unwritten: e.unwritten,
        });
        if k == 0 {
            window.extend_from_slice(new);
        }
        if e.end() > b64 {
            window.push(Extent {
                lblk: b,
                len: (e.end() - b64) as u32,
                pblk: e.pblk + u64::from(b - e.lblk),
                unwritten: e.unwritten,
            });
        }
    }
    if i0 == i1 {
        window.extend_from_slice(new);
    }
    window.extend(old[i1..hi].iter().map(|&e| e.into()));
    Edit {
        lo,
        hi,
        window: merge_pass(window),
        removed,
    }
}

/// Replaces the coverage of `[a, b)` in the sorted list `old` by `new` (sorted, inside
/// `[a, b)`), splitting extents at the edges and merging neighbours. Returns the new list and
/// the removed pieces.
pub fn splice(old: &[Extent], a: u32, b: u32, new: &[Extent]) -> (Vec<Extent>, Vec<Extent>) {
    let ed = edit(old, a, b, new);
    let mut out = Vec::with_capacity(old.len() - (ed.hi - ed.lo) + ed.window.len());
    out.extend_from_slice(&old[..ed.lo]);
    out.extend(ed.window);
    out.extend_from_slice(&old[ed.hi..]);
    (out, ed.removed)
}

/// Looks `lblk` up in one sorted run of extents; `next` is the first key after them.
fn lookup_in<T: Copy + Into<Extent>>(v: &[T], next: Option<u32>, lblk: u32) -> Lookup {
    let i = v.partition_point(|&e| e.into().lblk <= lblk);
    if i > 0 {
        let e: Extent = v[i - 1].into();
        if u64::from(lblk) < e.end() {
            let off = lblk - e.lblk;
            return Lookup::Mapped(Extent {
                lblk,
                len: e.len - off,
                pblk: e.pblk + u64::from(off),
                unwritten: e.unwritten,
            });
        }
    }
    let next = v.get(i).map(|&e| e.into().lblk).or(next);
    let end = next.map(u64::from).unwrap_or(MAX_FILE_BLOCKS);
    Lookup::Hole {
        len: end - u64::from(lblk),
    }
}

impl ExtentTree {
    pub fn new() -> ExtentTree {
        ExtentTree::default()
    }

    /// Loads a tree from its root, reading child blocks with `read`. Checks the structure:
    /// depths, ordering, index keys equal to the children's first keys, no overlap.
    pub fn load(
        root: &Node,
        mut read: impl FnMut(u64) -> Result<Node, FormatError>,
    ) -> Result<ExtentTree, FormatError> {
        let mut t = ExtentTree::new();
        match &root.entries {
            Entries::Leaf(v) => {
                if root.depth != 0 {
                    return Err(crate::ext4::corrupt(
                        "extent root",
                        "leaf entries at depth > 0",
                    ));
                }
                t.root_extents = v.clone();
            }
            Entries::Index(v) => {
                t.root_entries = v.clone();
                t.levels = vec![Vec::new(); usize::from(root.depth) - 1];
                let mut seen = BTreeSet::new();
                for ix in v {
                    t.load_node(ix, root.depth - 1, &mut read, &mut seen)?;
                }
            }
        }
        // Global order across leaves, and sizes.
        let mut prev_end = 0u64;
        for e in t.iter() {
            if u64::from(e.lblk) < prev_end {
                return Err(crate::ext4::corrupt(
                    "extent tree",
                    format!("extent at {} overlaps its predecessor", e.lblk),
                ));
            }
            if e.end() > MAX_FILE_BLOCKS {
                return Err(crate::ext4::corrupt(
                    "extent tree",
                    "extent past the last logical block",
                ));
            }
            prev_end = e.end();
        }
        t.data_blocks = t.iter().map(|e| u64::from(e.len)).sum();
        t.extent_count = t.iter().count();
        Ok(t)
    }

    fn load_node(
        &mut self,
        ix: &Index,
        depth: u16,
        read: &mut impl FnMut(u64) -> Result<Node, FormatError>,
        seen: &mut BTreeSet<u64>,
    ) -> Result<(), FormatError> {
        if !seen.insert(ix.child) {
            return Err(crate::ext4::corrupt(
                "extent tree",
                format!("block {} referenced twice", ix.child),
            ));
        }
        let node = read(ix.child)?;
        let what = format!("extent block {}", ix.child);
        if node.depth != depth {
            return Err(crate::ext4::corrupt(
                what,
                format!("depth {} where {} was expected", node.depth, depth),
            ));
        }
        match node.first_lblk() {
            None => return Err(crate::ext4::corrupt(what, "empty node")),
            Some(f) if f != ix.lblk => {
                return Err(crate::ext4::corrupt(
                    what,
                    format!("first key {f} does not match the index key {}", ix.lblk),
                ))
            }
            _ => {}
        }
        match node.entries {
            Entries::Leaf(v) => self.leaves.push(Leaf {
                pblk: ix.child,
                extents: stored(&v),
            }),
            Entries::Index(v) => {
                for c in &v {
                    self.load_node(c, depth - 1, read, seen)?;
                }
                self.levels[usize::from(depth) - 1].push(IndexNode {
                    pblk: ix.child,
                    entries: v,
                });
            }
        }
        Ok(())
    }

    pub fn depth(&self) -> u16 {
        if self.leaves.is_empty() {
            0
        } else {
            self.levels.len() as u16 + 1
        }
    }

    pub fn extent_count(&self) -> usize {
        self.extent_count
    }

    /// Blocks mapped by extents, written and unwritten.
    pub fn data_blocks(&self) -> u64 {
        self.data_blocks
    }

    /// Blocks holding tree nodes (the root costs none).
    pub fn tree_blocks(&self) -> u64 {
        (self.leaves.len() + self.levels.iter().map(Vec::len).sum::<usize>()) as u64
    }

    /// Every tree block, for bitmap cross-checks.
    pub fn node_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.leaves.iter().map(|l| l.pblk).collect();
        v.extend(self.levels.iter().flatten().map(|n| n.pblk));
        v
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = Extent> + '_> {
        if self.leaves.is_empty() {
            Box::new(self.root_extents.iter().copied())
        } else {
            Box::new(self.leaves.iter().flat_map(|l| unpacked(&l.extents)))
        }
    }

    fn leaf_index(&self, lblk: u32) -> usize {
        self.leaves
            .partition_point(|l| l.extents[0].lblk <= lblk)
            .saturating_sub(1)
    }

    pub fn lookup(&self, lblk: u32) -> Lookup {
        if self.leaves.is_empty() {
            return lookup_in(&self.root_extents, None, lblk);
        }
        let i = self.leaf_index(lblk);
        let next = self.leaves.get(i + 1).map(|l| l.extents[0].lblk);
        lookup_in(&self.leaves[i].extents, next, lblk)
    }

    /// The extents overlapping `[a, b)`, clipped to it.
    pub fn range(&self, a: u32, b: u32) -> Vec<Extent> {
        let mut out = Vec::new();
        let mut pos = a;
        while pos < b {
            match self.lookup(pos) {
                Lookup::Mapped(e) => {
                    let len = e.len.min(b - pos);
                    out.push(Extent { len, ..e });
                    pos += len;
                }
                Lookup::Hole { len } => pos = (u64::from(pos) + len).min(u64::from(b)) as u32,
            }
        }
        out
    }

    /// Replaces the mapping of `[a, b)` by `new` (sorted extents inside `[a, b)`); returns the
    /// extents removed from that range (the caller frees their blocks as needed).
    pub fn replace(
        &mut self,
        a: u32,
        b: u32,
        new: &[Extent],
        alloc: &mut dyn NodeAlloc,
    ) -> Result<Vec<Extent>, MapError> {
        debug_assert!(new
            .iter()
            .all(|e| e.lblk >= a && e.end() <= u64::from(b) && e.len > 0));
        let removed = if self.leaves.is_empty() {
            let (v, removed) = splice(&self.root_extents, a, b, new);
            if v.len() > ROOT_FANOUT {
                // The root overflows into leaves. Their blocks are reserved first: without them
                // (ENOSPC) the tree stays as it was.
                let mut pool = self.reserve(0, 0, v.len(), alloc)?;
                self.repack(0, 0, v, &mut pool, alloc);
                self.rebuild_index(&mut pool, alloc);
                debug_assert!(pool.is_empty(), "reserved blocks left over");
                self.root_extents.clear();
                self.changes.root_dirty = true;
            } else if v != self.root_extents {
                self.changes.root_dirty = true;
                self.root_extents = v;
            }
            self.extent_count = self
                .root_extents
                .len()
                .max(self.leaves.iter().map(|l| l.extents.len()).sum::<usize>());
            removed
        } else if let Some(removed) = self.replace_in_leaf(a, b, new) {
            removed
        } else {
            // The leaves around [a, b), plus one on each side for merging and for overflow room.
            let s = self.leaf_index(a.saturating_sub(1));
            let e = (self.leaf_index(b.saturating_sub(1).max(a)) + 2).min(self.leaves.len());
            let old: Vec<Extent> = self.leaves[s..e]
                .iter()
                .flat_map(|l| unpacked(&l.extents))
                .collect();
            let (v, removed) = splice(&old, a, b, new);
            let count = self.extent_count + v.len() - old.len();
            // Every new leaf and index block, reserved before anything changes (ENOSPC in a
            // split deep in the tree leaves it as it was).
            let mut pool = self.reserve(s, e, v.len(), alloc)?;
            self.repack(s, e, v, &mut pool, alloc);
            self.rebuild_index(&mut pool, alloc);
            debug_assert!(pool.is_empty(), "reserved blocks left over");
            self.extent_count = count;
            removed
        };
        let added: u64 = new.iter().map(|e| u64::from(e.len)).sum();
        let gone: u64 = removed.iter().map(|e| u64::from(e.len)).sum();
        self.data_blocks = self.data_blocks + added - gone;
        self.maybe_collapse(alloc);
        Ok(removed)
    }

    /// Reserves the blocks that repacking leaves `[s, e)` into leaves for `n` extents, and then
    /// rebuilding the index, will take beyond the blocks they reuse — the same counts
    /// [`repack`](Self::repack) and [`rebuild_index`](Self::rebuild_index) use. All or none.
    fn reserve(
        &self,
        s: usize,
        e: usize,
        n: usize,
        alloc: &mut dyn NodeAlloc,
    ) -> Result<Vec<u64>, MapError> {
        let count = n.div_ceil(LEAF_FILL);
        let mut need = count.saturating_sub(e - s);
        let mut below = self.leaves.len() - (e - s) + count;
        let mut level = 0;
        while below > ROOT_FANOUT {
            let want = below.div_ceil(FANOUT);
            need += want.saturating_sub(self.levels.get(level).map_or(0, Vec::len));
            below = want;
            level += 1;
        }
        if need == 0 {
            return Ok(Vec::new());
        }
        let goal = self
            .leaves
            .get(s)
            .filter(|_| e > s)
            .or_else(|| self.leaves.last())
            .map_or(0, |l| l.pblk + 1);
        let mut pool = alloc.alloc_nodes(goal, need)?;
        // Taken from the back: the lowest block goes to the first new node.
        pool.reverse();
        Ok(pool)
    }

    /// The common case, in time independent of the tree's size: the change stays inside one
    /// leaf, fits it, and keeps its first key, so no index entry changes. `None` leaves the tree
    /// untouched for the general path.
    fn replace_in_leaf(&mut self, a: u32, b: u32, new: &[Extent]) -> Option<Vec<Extent>> {
        let i = self.leaf_index(a);
        let first = self.leaves[i].extents[0].lblk;
        let next = self
            .leaves
            .get(i + 1)
            .map_or(u64::MAX, |l| u64::from(l.extents[0].lblk));
        if a < first || u64::from(b) > next {
            return None;
        }
        let leaf = &mut self.leaves[i];
        let ed = edit(&leaf.extents, a, b, new);
        let len = leaf.extents.len() - (ed.hi - ed.lo) + ed.window.len();
        let new_first = match ed.window.first() {
            Some(e) if ed.lo == 0 => Some(e.lblk),
            _ if ed.lo == 0 => leaf.extents.get(ed.hi).map(|e| e.lblk),
            _ => Some(first),
        };
        if len == 0 || len > FANOUT || new_first != Some(first) {
            return None;
        }
        if !unpacked(&leaf.extents[ed.lo..ed.hi]).eq(ed.window.iter().copied()) {
            self.changes.dirty.insert(leaf.pblk);
        }
        self.extent_count = self.extent_count + len - leaf.extents.len();
        if len > leaf.extents.capacity() {
            // By an eighth of a full leaf at a time (a copy of at most 4 KiB every 42 inserts):
            // doubling, or a full leaf's size at once, left a quarter of a randomly written
            // tree's memory unused (4.3 of 17 MB for a million extents).
            let want = (len + FANOUT / 8).min(FANOUT);
            leaf.extents.reserve_exact(want - leaf.extents.len());
        }
        leaf.extents
            .splice(ed.lo..ed.hi, ed.window.into_iter().map(Stored::from));
        Some(ed.removed)
    }

    /// Replaces leaves `[s, e)` by `v` spread evenly over leaves three-quarters full (room for
    /// the next inserts to stay in one leaf), reusing their blocks, then blocks from `pool`.
    fn repack(
        &mut self,
        s: usize,
        e: usize,
        v: Vec<Extent>,
        pool: &mut Vec<u64>,
        alloc: &mut dyn NodeAlloc,
    ) {
        let old: Vec<u64> = self.leaves[s..e].iter().map(|l| l.pblk).collect();
        let count = v.len().div_ceil(LEAF_FILL);
        let mut fresh = Vec::with_capacity(count);
        let mut reuse = old.into_iter();
        let mut rest = v.as_slice();
        for k in 0..count {
            // Evenly: the first (len % count) leaves take one extent more.
            let take = rest.len().div_ceil(count - k);
            let (chunk, tail) = rest.split_at(take);
            rest = tail;
            let pblk = reuse.next().unwrap_or_else(|| reserved(pool));
            self.changes.dirty.insert(pblk);
            fresh.push(Leaf {
                pblk,
                extents: stored(chunk),
            });
        }
        for p in reuse {
            self.changes.dirty.remove(&p);
            alloc.free_node(p);
        }
        self.leaves.splice(s..e, fresh);
    }

    /// Recomputes the index levels from the leaves; rewrites index nodes whose entries changed.
    /// New index blocks come from `pool`.
    fn rebuild_index(&mut self, pool: &mut Vec<u64>, alloc: &mut dyn NodeAlloc) {
        let mut below: Vec<Index> = self
            .leaves
            .iter()
            .map(|l| Index {
                lblk: l.extents[0].lblk,
                child: l.pblk,
            })
            .collect();
        let mut level = 0;
        while below.len() > ROOT_FANOUT {
            let want: Vec<Vec<Index>> = below.chunks(FANOUT).map(<[Index]>::to_vec).collect();
            if self.levels.len() <= level {
                self.levels.push(Vec::new());
            }
            let cur = &mut self.levels[level];
            let mut next = Vec::with_capacity(want.len());
            for (i, entries) in want.into_iter().enumerate() {
                match cur.get(i) {
                    Some(n) if n.entries == entries => next.push(n.clone()),
                    Some(n) => {
                        self.changes.dirty.insert(n.pblk);
                        next.push(IndexNode {
                            pblk: n.pblk,
                            entries,
                        });
                    }
                    None => {
                        let pblk = reserved(pool);
                        self.changes.dirty.insert(pblk);
                        next.push(IndexNode { pblk, entries });
                    }
                }
            }
            for n in cur.iter().skip(next.len()) {
                self.changes.dirty.remove(&n.pblk);
                alloc.free_node(n.pblk);
            }
            *cur = next;
            below = cur
                .iter()
                .map(|n| Index {
                    lblk: n.entries[0].lblk,
                    child: n.pblk,
                })
                .collect();
            level += 1;
        }
        for lv in self.levels.drain(level..) {
            for n in lv {
                self.changes.dirty.remove(&n.pblk);
                alloc.free_node(n.pblk);
            }
        }
        if below != self.root_entries {
            self.changes.root_dirty = true;
            self.root_entries = below;
        }
    }

    /// With ≤ 4 extents left, the root holds them again and every tree block is freed.
    fn maybe_collapse(&mut self, alloc: &mut dyn NodeAlloc) {
        if self.leaves.is_empty() || self.extent_count > ROOT_FANOUT {
            return;
        }
        let all: Vec<Extent> = self
            .leaves
            .iter()
            .flat_map(|l| unpacked(&l.extents))
            .collect();
        for p in self.node_blocks() {
            self.changes.dirty.remove(&p);
            alloc.free_node(p);
        }
        self.leaves.clear();
        self.levels.clear();
        self.root_entries.clear();
        self.root_extents = all;
        self.changes.root_dirty = true;
    }

    /// The root as it goes into the inode.
    pub fn root_node(&self) -> Node {
        if self.leaves.is_empty() {
            Node {
                depth: 0,
                entries: Entries::Leaf(self.root_extents.clone()),
            }
        } else {
            Node {
                depth: self.depth(),
                entries: Entries::Index(self.root_entries.clone()),
            }
        }
    }

    /// The nodes stored in the blocks of `set`, in one pass over the tree (what a commit
    /// journals: many dirty blocks must not cost a search each).
    pub fn nodes_in(&self, set: &BTreeSet<u64>) -> Vec<(u64, Node)> {
        let mut out = Vec::with_capacity(set.len());
        if set.is_empty() {
            return out;
        }
        for l in self.leaves.iter().filter(|l| set.contains(&l.pblk)) {
            out.push((
                l.pblk,
                Node {
                    depth: 0,
                    entries: Entries::Leaf(unpacked(&l.extents).collect()),
                },
            ));
        }
        for (i, lv) in self.levels.iter().enumerate() {
            for n in lv.iter().filter(|n| set.contains(&n.pblk)) {
                out.push((
                    n.pblk,
                    Node {
                        depth: i as u16 + 1,
                        entries: Entries::Index(n.entries.clone()),
                    },
                ));
            }
        }
        out
    }

    /// The node stored in tree block `pblk`.
    pub fn node(&self, pblk: u64) -> Option<Node> {
        if let Some(l) = self.leaves.iter().find(|l| l.pblk == pblk) {
            return Some(Node {
                depth: 0,
                entries: Entries::Leaf(unpacked(&l.extents).collect()),
            });
        }
        for (i, lv) in self.levels.iter().enumerate() {
            if let Some(n) = lv.iter().find(|n| n.pblk == pblk) {
                return Some(Node {
                    depth: i as u16 + 1,
                    entries: Entries::Index(n.entries.clone()),
                });
            }
        }
        None
    }

    /// What changed since the last [`take_changes`](Self::take_changes).
    pub fn pending_changes(&self) -> &TreeChanges {
        &self.changes
    }

    /// Takes the record of what changed since the last call.
    pub fn take_changes(&mut self) -> TreeChanges {
        std::mem::take(&mut self.changes)
    }
}

#[cfg(test)]
mod tests;
