//! The tree against a per-block model, with its on-disk form round-tripped through a block store.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;
use crate::ext4::extent::{decode_block, encode_block};

/// A block store + allocator: hands out blocks from 1_000_000 up, remembers node contents.
#[derive(Default)]
struct Store {
    next: u64,
    live: BTreeSet<u64>,
    blocks: HashMap<u64, Vec<u8>>,
    freed: Vec<u64>,
    /// Blocks left before ENOSPC (`None`: unlimited).
    budget: Option<usize>,
}

impl NodeAlloc for Store {
    fn alloc_nodes(&mut self, _goal: u64, n: usize) -> Result<Vec<u64>, MapError> {
        if let Some(left) = self.budget.as_mut() {
            if *left < n {
                return Err(MapError::NoSpace);
            }
            *left -= n;
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let b = self.freed.pop().unwrap_or_else(|| {
                self.next += 1;
                1_000_000 + self.next
            });
            assert!(self.live.insert(b), "block {b} allocated twice");
            v.push(b);
        }
        Ok(v)
    }
    fn free_node(&mut self, pblk: u64) {
        assert!(
            self.live.remove(&pblk),
            "freeing block {pblk} that is not allocated"
        );
        self.blocks.remove(&pblk);
        self.freed.push(pblk);
    }
}

impl Store {
    /// Writes the changed nodes, as the image would journal them.
    fn flush(&mut self, t: &mut ExtentTree, root: &mut Node) {
        let ch = t.take_changes();
        for p in ch.dirty {
            let node = t.node(p).expect("dirty block is a live node");
            self.blocks.insert(p, encode_block(&node, 7));
        }
        if ch.root_dirty {
            *root = t.root_node();
        }
    }
}

type Model = BTreeMap<u32, (u64, bool)>;

fn model_apply(m: &mut Model, a: u32, b: u32, new: &[Extent]) {
    for l in a..b {
        m.remove(&l);
    }
    for e in new {
        for i in 0..e.len {
            m.insert(e.lblk + i, (e.pblk + u64::from(i), e.unwritten));
        }
    }
}

fn tree_blocks(t: &ExtentTree) -> Model {
    let mut m = Model::new();
    for e in t.iter() {
        for i in 0..e.len {
            m.insert(e.lblk + i, (e.pblk + u64::from(i), e.unwritten));
        }
    }
    m
}

fn check(t: &ExtentTree, model: &Model, store: &Store, root: &Node) {
    assert_eq!(&tree_blocks(t), model);
    // Structure: sizes, keys, minimal depth, no merge left undone between same-leaf neighbours.
    let total = t.iter().count();
    assert_eq!(t.extent_count(), total);
    assert_eq!(t.data_blocks(), model.len() as u64);
    if total <= 4 {
        assert_eq!(t.depth(), 0, "{total} extents must live in the root");
    }
    for l in &t.leaves {
        assert!(!l.extents.is_empty() && l.extents.len() <= 340);
    }
    assert!(t.root_node().len() <= 4);
    let live: BTreeSet<u64> = t.node_blocks().into_iter().collect();
    assert_eq!(
        live, store.live,
        "allocated blocks are exactly the tree's nodes"
    );
    // The on-disk form loads back to the same tree.
    let loaded = ExtentTree::load(root, |p| decode_block(&store.blocks[&p], 7, p)).expect("load");
    assert_eq!(tree_blocks(&loaded), *model);
    assert_eq!(loaded.depth(), t.depth());
}

#[derive(Clone, Debug)]
enum Op {
    /// Map [a, a+len) with runs alternating written/unwritten.
    Map {
        a: u32,
        len: u32,
        runs: u32,
        pblk: u64,
    },
    Unmap {
        a: u32,
        len: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..20_000, 1u32..64, 1u32..4, 0u64..1_000_000).prop_map(|(a, len, runs, pblk)| Op::Map { a, len, runs, pblk }),
        1 => (0u32..20_000, 1u32..3000).prop_map(|(a, len)| Op::Unmap { a, len }),
    ]
}

/// The edit an op makes: `[a, b)` replaced by the extents.
fn edit_of(o: &Op) -> (u32, u32, Vec<Extent>) {
    match *o {
        Op::Map { a, len, runs, pblk } => {
            let step = len.div_ceil(runs);
            let mut new = Vec::new();
            let mut l = a;
            let mut k = 0;
            while l < a + len {
                let n = step.min(a + len - l);
                new.push(Extent {
                    lblk: l,
                    len: n,
                    pblk: pblk + u64::from(l - a),
                    unwritten: k % 2 == 1,
                });
                l += n;
                k += 1;
            }
            (a, a + len, new)
        }
        Op::Unmap { a, len } => (a, a + len, vec![]),
    }
}

fn run(ops: &[Op]) -> u16 {
    let mut max_depth = 0;
    let mut t = ExtentTree::new();
    let mut store = Store::default();
    let mut root = t.root_node();
    let mut model = Model::new();
    for o in ops {
        let (a, b, new) = edit_of(o);
        let before: Vec<Extent> = t.range(a, b);
        let removed = t.replace(a, b, &new, &mut store).unwrap();
        let rb: u64 = removed.iter().map(|e| u64::from(e.len)).sum();
        let bb: u64 = before.iter().map(|e| u64::from(e.len)).sum();
        assert_eq!(rb, bb, "removed pieces cover what was mapped");
        model_apply(&mut model, a, b, &new);
        store.flush(&mut t, &mut root);
        check(&t, &model, &store, &root);
        max_depth = max_depth.max(t.depth());
    }
    max_depth
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn tree_matches_the_model(ops in prop::collection::vec(op(), 1..400)) {
        run(&ops);
    }
}

/// Replays `ops`, each with a budget of tree blocks (`None`: unlimited). An edit that finds
/// too few must fail with ENOSPC and leave the tree — extents, leaves, index levels, pending
/// changes — and its blocks exactly as they were. Returns how many failed.
fn run_with_budgets(ops: &[(Op, Option<usize>)]) -> usize {
    let mut t = ExtentTree::new();
    let mut store = Store::default();
    let mut root = t.root_node();
    let mut model = Model::new();
    let mut failed = 0;
    for (o, budget) in ops {
        let (a, b, new) = edit_of(o);
        let before = t.clone();
        let live = store.live.clone();
        store.budget = *budget;
        let r = t.replace(a, b, &new, &mut store);
        store.budget = None;
        match r {
            Err(MapError::NoSpace) => {
                assert!(t == before, "a failed edit changed the tree ({o:?})");
                assert_eq!(store.live, live, "a failed edit took or freed blocks");
                failed += 1;
            }
            Err(e) => panic!("{e}"),
            Ok(_) => {
                model_apply(&mut model, a, b, &new);
                store.flush(&mut t, &mut root);
                check(&t, &model, &store, &root);
            }
        }
    }
    failed
}

fn budget() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![2 => Just(None), 1 => Just(Some(0)), 1 => (1usize..3).prop_map(Some)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn enospc_leaves_the_tree_as_it_was(ops in prop::collection::vec((op(), budget()), 1..400)) {
        run_with_budgets(&ops);
    }
}

/// Deep in a two-level tree, with no block to spare: inserts into full leaves, extents split
/// in the middle (one becomes two, or three), a new index block — all refused whole.
#[test]
fn enospc_deep_in_the_tree_leaves_it_as_it_was() {
    let mut ops = Vec::new();
    // 2000 three-block extents a block apart: two index levels.
    for i in 0..2000u32 {
        ops.push((
            Op::Map {
                a: i * 4,
                len: 3,
                runs: 1,
                pblk: u64::from(i) * 10,
            },
            None,
        ));
    }
    let mut rng = crate::rng::Rng::new(3);
    for _ in 0..3000 {
        let i = rng.below(2000) as u32;
        let o = match rng.below(3) {
            // The middle block unmapped: the extent splits in two.
            0 => Op::Unmap {
                a: i * 4 + 1,
                len: 1,
            },
            // The middle block remapped elsewhere (unwritten): three pieces.
            1 => Op::Map {
                a: i * 4 + 1,
                len: 1,
                runs: 2,
                pblk: 5_000_000 + u64::from(i),
            },
            // A new extent in the hole between two.
            _ => Op::Map {
                a: i * 4 + 3,
                len: 1,
                runs: 1,
                pblk: 6_000_000 + u64::from(i),
            },
        };
        ops.push((o, Some(0)));
    }
    let failed = run_with_budgets(&ops);
    assert!(failed > 100, "only {failed} edits needed a block");
}

#[test]
fn many_scattered_extents_grow_and_shrink_the_tree() {
    // Every other block mapped: one extent per block, deep enough for two index levels.
    let mut ops = Vec::new();
    for i in 0..2000u32 {
        ops.push(Op::Map {
            a: i * 2 * 97 % 400_000,
            len: 1,
            runs: 1,
            pblk: u64::from(i) * 10,
        });
    }
    for i in 0..2000u32 {
        ops.push(Op::Unmap {
            a: i * 2 * 97 % 400_000,
            len: 1,
        });
    }
    assert_eq!(
        run(&ops),
        2,
        "2000 single-block extents need two index levels"
    );
}

#[test]
fn splice_splits_and_merges() {
    let w = |lblk, len, pblk| Extent {
        lblk,
        len,
        pblk,
        unwritten: false,
    };
    let u = |lblk, len, pblk| Extent {
        lblk,
        len,
        pblk,
        unwritten: true,
    };
    // Convert the middle of an unwritten extent: three pieces.
    let (v, removed) = splice(&[u(0, 10, 100)], 3, 5, &[w(3, 2, 103)]);
    assert_eq!(v, vec![u(0, 3, 100), w(3, 2, 103), u(5, 5, 105)]);
    assert_eq!(removed, vec![u(3, 2, 103)]);
    // Converting the rest merges everything back into one written extent.
    let (v, _) = splice(&v, 0, 3, &[w(0, 3, 100)]);
    let (v, _) = splice(&v, 5, 10, &[w(5, 5, 105)]);
    assert_eq!(v, vec![w(0, 10, 100)]);
    // Not physically contiguous: no merge.
    let (v, _) = splice(&[w(0, 2, 50)], 2, 4, &[w(2, 2, 60)]);
    assert_eq!(v.len(), 2);
}

/// No block for the first leaf (ENOSPC): the change fails and the root keeps its extents.
#[test]
fn a_root_overflow_without_a_free_block_leaves_the_tree_as_it_was() {
    struct Full;
    impl NodeAlloc for Full {
        fn alloc_nodes(&mut self, _goal: u64, n: usize) -> Result<Vec<u64>, MapError> {
            if n == 0 {
                return Ok(Vec::new());
            }
            Err(MapError::NoSpace)
        }
        fn free_node(&mut self, _pblk: u64) {}
    }
    let mut t = ExtentTree::new();
    let e = |l: u32| Extent {
        lblk: l * 10,
        len: 1,
        pblk: u64::from(l) * 100,
        unwritten: false,
    };
    for l in 0..4 {
        t.replace(l * 10, l * 10 + 1, &[e(l)], &mut Full).unwrap();
    }
    let before: Vec<Extent> = t.iter().collect();
    assert!(t.replace(40, 41, &[e(4)], &mut Full).is_err());
    assert_eq!(t.iter().collect::<Vec<_>>(), before);
    assert_eq!(t.extent_count(), 4);
    assert_eq!(t.depth(), 0);
}

#[test]
fn stored_extents_round_trip_at_the_format_limits() {
    for e in [
        Extent {
            lblk: 0,
            len: 1,
            pblk: 0,
            unwritten: false,
        },
        Extent {
            lblk: u32::MAX - 32768,
            len: 32768,
            pblk: (1 << 48) - 32769,
            unwritten: false,
        },
        Extent {
            lblk: 7,
            len: 32767,
            pblk: 1 << 40,
            unwritten: true,
        },
        Extent {
            lblk: 9,
            len: 1,
            pblk: 0xFFFF_FFFF,
            unwritten: true,
        },
    ] {
        let s = Stored::from(e);
        assert_eq!(Extent::from(s), e);
        assert_eq!(std::mem::size_of_val(&s), 12);
    }
}
