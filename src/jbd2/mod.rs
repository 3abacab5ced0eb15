//! The jbd2 journal (inode 8): on-disk blocks (`format`), recovery (`replay`), and the
//! transaction writer ([`Journal`]). Everything is big-endian, checksum v3 with crc32c.

pub mod format;
pub mod replay;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;

use format::{JournalSuperblock, Tag, MAX_REVOKES, MAX_TAGS};

use crate::ext4::extent::Extent;
use crate::ext4::BLOCK_SIZE_U64;
use crate::io::BlockIo;

/// Journal log block → filesystem block, from the journal inode's extents.
#[derive(Clone, Debug)]
pub struct LogMap {
    runs: Vec<Extent>,
}

impl LogMap {
    pub fn new(runs: Vec<Extent>) -> LogMap {
        LogMap { runs }
    }

    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|e| u64::from(e.len)).sum()
    }

    pub fn fs_block(&self, log_block: u32) -> u64 {
        // Callers check bounds against s_maxlen ≤ blocks(); this is a programming error.
        self.try_fs_block(log_block)
            .unwrap_or_else(|| panic!("log block {log_block} is outside the journal"))
    }

    /// The filesystem block of `log_block`, if the journal maps it.
    pub fn try_fs_block(&self, log_block: u32) -> Option<u64> {
        self.runs
            .iter()
            .find(|e| log_block >= e.lblk && u64::from(log_block) < e.end())
            .map(|e| e.pblk + u64::from(log_block - e.lblk))
    }

    pub fn byte_offset(&self, log_block: u32) -> u64 {
        self.fs_block(log_block) * BLOCK_SIZE_U64
    }

    /// Is the map contiguous from log block 0 with no gaps (what the format requires)?
    pub fn is_contiguous(&self) -> bool {
        let mut next = 0u64;
        for e in &self.runs {
            if u64::from(e.lblk) != next || e.unwritten {
                return false;
            }
            next = e.end();
        }
        true
    }
}

/// The metadata blocks of one transaction and the blocks it revokes.
#[derive(Debug, Default)]
pub struct Transaction {
    pub blocks: BTreeMap<u64, Vec<u8>>,
    pub revokes: BTreeSet<u64>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.revokes.is_empty()
    }

    /// Log blocks this transaction occupies (at most: a revoke of a block it also logs is
    /// counted, though [`Journal::prepare`] writes no record for it).
    pub fn log_blocks(&self) -> u32 {
        log_blocks(self.blocks.len(), self.revokes.len())
    }
}

/// Log blocks a transaction of `blocks` metadata blocks and `revokes` revoke records takes, as
/// [`Journal::prepare`] lays it out: revoke blocks of [`MAX_REVOKES`] records each, then per
/// [`MAX_TAGS`] blocks a descriptor followed by their copies, then the commit block. The writer
/// and every estimate of a running transaction's size count with this.
pub fn log_blocks(blocks: usize, revokes: usize) -> u32 {
    (revokes.div_ceil(MAX_REVOKES) + blocks.div_ceil(MAX_TAGS) + blocks + 1) as u32
}

/// The log block after `pos` in a log of blocks `first..maxlen` (`s_first`, `s_maxlen`): past
/// the end it wraps around to `first`. `pos` is at most one block past the end. The writer
/// and replay both step through the log with this.
pub fn wrap(pos: u32, first: u32, maxlen: u32) -> u32 {
    if pos >= maxlen {
        first + (pos - maxlen)
    } else {
        pos
    }
}

/// Statistics for `info` and the daemon's counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct JournalStats {
    pub commits: u64,
    pub checkpoints: u64,
    pub logged_blocks: u64,
}

/// The writes of one prepared transaction, made without the image lock: log blocks, barrier,
/// commit block, barrier. Guest data written before [`CommitWrite::write`] is durable once the
/// first barrier returns, so the commit never describes data that is not on disk.
pub struct CommitWrite {
    /// The journal superblock, when the log was empty: written first, it points replay here.
    sb: Option<(u64, Vec<u8>)>,
    /// Log blocks in runs contiguous in the backing: (byte offset, the run's bytes). Metadata
    /// goes through `write_at`, as everywhere (the recording and fault layers tell it by that).
    body: Vec<(u64, Vec<u8>)>,
    commit: (u64, Vec<u8>),
}

impl CommitWrite {
    pub fn write(&self, io: &dyn BlockIo) -> io::Result<()> {
        if let Some((at, sb)) = &self.sb {
            io.write_at(sb, *at)?;
        }
        for (at, run) in &self.body {
            io.write_at(run, *at)?;
        }
        if !broken!(CommitBeforeData) {
            io.flush()?;
        }
        io.write_at(&self.commit.1, self.commit.0)?;
        io.flush()
    }
}

/// The log blocks of one commit, built in place as runs contiguous in the backing (one write
/// per run): each block's bytes go straight to the end of its run, which was given its final
/// size when it started (at most the blocks still to come). A transaction's copies exist
/// twice while it is written (the transaction's and these), not three or four times as with a
/// copy per block joined into regrowing runs: on a 16 TiB image a commit of 2,048 scattered
/// bitmaps peaked at 16 MB.
struct LogRuns<'m> {
    map: &'m LogMap,
    maxlen: u32,
    /// Blocks still to come, at most (bounds a new run's size).
    left: u32,
    runs: Vec<(u64, Vec<u8>)>,
    /// Where the last run goes on, and how many more blocks it has room for.
    next: u32,
    room: u32,
}

impl<'m> LogRuns<'m> {
    fn new(map: &'m LogMap, maxlen: u32, blocks: u32) -> LogRuns<'m> {
        LogRuns {
            map,
            maxlen,
            left: blocks,
            runs: Vec::new(),
            next: 0,
            room: 0,
        }
    }

    /// Log block `pos`'s bytes, all zero, to be filled in: at the end of the last run if
    /// `pos` follows it in the backing, else at the start of a new one.
    fn block(&mut self, pos: u32) -> &mut [u8] {
        let bs = BLOCK_SIZE_U64 as usize;
        if self.runs.is_empty() || pos != self.next || self.room == 0 {
            // The run can reach the end of the journal extent holding `pos`, or of the log.
            let contiguous = self
                .map
                .runs
                .iter()
                .find(|e| pos >= e.lblk && u64::from(pos) < e.end())
                .map_or(1, |e| {
                    (e.end().min(u64::from(self.maxlen)) - u64::from(pos)) as u32
                });
            let n = contiguous.min(self.left).max(1);
            self.runs.push((
                self.map.byte_offset(pos),
                Vec::with_capacity(n as usize * bs),
            ));
            self.room = n;
        }
        self.left = self.left.saturating_sub(1);
        self.room -= 1;
        self.next = pos + 1;
        let run = &mut self.runs.last_mut().expect("a run was pushed").1;
        let at = run.len();
        run.resize(at + bs, 0);
        &mut run[at..]
    }
}

/// Bounds whatever the log's size: a transaction is committed by this many blocks (its copies
/// exist twice while it is written: memory), and the committed blocks waiting for a checkpoint
/// are written home once they reach this many (the checkpoint's pause, taken under the image
/// lock: about 10 µs a block here, so at most ~0.2 s). Below that the log's own size decides,
/// and the larger the log, the more often a block is rewritten in it before it goes home once:
/// on a fresh 1 TiB image, 5 s of random 4 KiB writes wrote 3,500 blocks home per 4,900 log
/// blocks with a bound of 4,096, and 8,700 per 85,000 with this one and a 384 MiB log (host
/// bytes per guest byte 5.3× → 2.5×).
const MAX_TRANSACTION_BLOCKS: u32 = 2048;
const MAX_CHECKPOINT_BLOCKS: usize = 16384;

/// Where the latest committed copy of a block waiting for the checkpoint sits in the log. The
/// checkpoint reads it back from there, so committed metadata is not held in memory twice (the
/// log is not reused before the checkpoint, so the copy stays valid).
#[derive(Clone, Copy, Debug)]
struct LogCopy {
    pos: u32,
    escaped: bool,
}

/// Writes transactions into an open, recovered (empty) log.
pub struct Journal {
    map: LogMap,
    sb: JournalSuperblock,
    jseed: u32,
    head: u32,
    next_tid: u32,
    used: u32,
    /// Every block in the live log waiting for checkpoint: its latest committed copy.
    checkpoint: BTreeMap<u64, LogCopy>,
    live: HashSet<u64>,
    last_commit_sec: u64,
    pub stats: JournalStats,
}

impl Journal {
    /// Takes over an empty log (after replay): the next transaction gets `s_sequence + 1`.
    pub fn new(map: LogMap, sb: JournalSuperblock) -> Journal {
        debug_assert_eq!(sb.start, 0);
        Journal {
            jseed: format::journal_seed(&sb.uuid),
            head: sb.first,
            next_tid: sb.sequence.wrapping_add(1),
            used: 0,
            map,
            sb,
            checkpoint: BTreeMap::new(),
            live: HashSet::new(),
            last_commit_sec: 0,
            stats: JournalStats::default(),
        }
    }

    pub fn superblock(&self) -> &JournalSuperblock {
        &self.sb
    }

    /// The tid the next [`Journal::prepare`] gives its transaction: the running one's.
    pub fn running_tid(&self) -> u32 {
        self.next_tid
    }

    fn capacity(&self) -> u32 {
        self.sb.maxlen - self.sb.first
    }

    /// The largest transaction (in log blocks) the image should let build up: a quarter of the
    /// log, as the kernel does, so commits never wait for a full checkpoint twice in a row.
    pub fn max_transaction(&self) -> u32 {
        (self.capacity() / 4)
            .min(MAX_TRANSACTION_BLOCKS)
            .min(self.hard_limit() / 2)
    }

    /// The size (in log blocks) a running transaction must never reach while another is being
    /// committed: half the log.
    pub fn hard_limit(&self) -> u32 {
        #[cfg(feature = "testing")]
        if let Some(n) = crate::testing::log_hard_limit() {
            return n.min(self.capacity() / 2);
        }
        self.capacity() / 2
    }

    /// Does `block` have a copy in the live log (so freeing it needs a revoke record)?
    pub fn is_logged(&self, block: u64) -> bool {
        self.live.contains(&block)
    }

    fn wrap(&self, p: u32) -> u32 {
        wrap(p, self.sb.first, self.sb.maxlen)
    }

    fn write_sb(&mut self, io: &dyn BlockIo) -> io::Result<()> {
        io.write_at(&self.sb.encode(), self.map.byte_offset(0))
    }

    /// Commits `tx`: log blocks, barrier, commit block, barrier. Guest data written before this
    /// call is durable when it returns (the first barrier covers it: ordered mode).
    pub fn commit(&mut self, io: &dyn BlockIo, tx: &Transaction, now_sec: u64) -> io::Result<()> {
        match self.prepare(io, tx, now_sec)? {
            Some(w) => w.write(io),
            None => Ok(()),
        }
    }

    /// The first half of a commit, under the caller's lock: lays `tx` out in the log and takes
    /// it as committed in the journal's own state (the next transaction goes after it, later
    /// frees of its blocks need revokes), returning the writes to make. A full log is
    /// checkpointed here first. The caller writes the result with [`CommitWrite::write`] before
    /// preparing the next transaction, and treats the journal as aborted if that fails.
    pub fn prepare(
        &mut self,
        io: &dyn BlockIo,
        tx: &Transaction,
        now_sec: u64,
    ) -> io::Result<Option<CommitWrite>> {
        if tx.is_empty() {
            return Ok(None);
        }
        let need = tx.log_blocks();
        if need >= self.capacity() {
            return Err(io::Error::other(format!(
                "transaction of {need} log blocks does not fit the journal"
            )));
        }
        if self.used + need > self.capacity()
            || self.checkpoint.len() + tx.blocks.len() > MAX_CHECKPOINT_BLOCKS
        {
            self.checkpoint(io)?;
        }
        let tid = self.next_tid;
        let start = self.head;
        let mut pos = start;
        // Revoke and descriptor blocks, copies, and the commit block's slot (zeroed with them).
        let mut body = LogRuns::new(&self.map, self.sb.maxlen, need);
        let revokes: Vec<u64> = tx
            .revokes
            .iter()
            .copied()
            .filter(|b| !tx.blocks.contains_key(b))
            .collect();
        for chunk in revokes.chunks(MAX_REVOKES) {
            body.block(pos)
                .copy_from_slice(&format::encode_revoke(tid, chunk, self.jseed));
            pos = self.wrap(pos + 1);
        }
        let blocks: Vec<(&u64, &Vec<u8>)> = tx.blocks.iter().collect();
        let mut placed = Vec::with_capacity(blocks.len());
        for chunk in blocks.chunks(MAX_TAGS) {
            // The descriptor goes first; its tags are known once the copies are made.
            body.block(pos);
            let desc_at = (
                body.runs.len() - 1,
                body.runs.last().map_or(0, |r| r.1.len()) - BLOCK_SIZE_U64 as usize,
            );
            pos = self.wrap(pos + 1);
            let mut tags = Vec::with_capacity(chunk.len());
            for (&blk, data) in chunk {
                let escaped = format::needs_escape(data);
                let c = body.block(pos);
                c.copy_from_slice(data);
                if escaped {
                    format::escape(c);
                }
                tags.push(Tag {
                    blocknr: blk,
                    escaped,
                    checksum: format::block_csum(self.jseed, tid, c),
                });
                placed.push((blk, LogCopy { pos, escaped }));
                pos = self.wrap(pos + 1);
            }
            let (r, o) = desc_at;
            body.runs[r].1[o..o + BLOCK_SIZE_U64 as usize]
                .copy_from_slice(&format::encode_descriptor(tid, &tags, self.jseed));
        }
        let sb = if self.sb.start == 0 {
            self.sb.start = start;
            self.sb.sequence = tid;
            Some((self.map.byte_offset(0), self.sb.encode()))
        } else {
            None
        };
        // The commit block's slot is zeroed with the log blocks, before the barrier: a commit
        // block torn at 512 bytes then holds its record (all in the first sector) over zeroes,
        // which is the whole block, checksum included, or no commit block at all. Over what a
        // wrapped log left there it would fail its checksum, and replay would report the
        // transaction corrupt instead of uncommitted (found by the concurrent crash tests).
        body.block(pos);
        // Commit times never go backwards (replay uses them to tell stale blocks from damage).
        let sec = now_sec.max(self.last_commit_sec);
        let commit = (pos, format::encode_commit(tid, sec, 0, self.jseed));
        pos = self.wrap(pos + 1);
        self.last_commit_sec = sec;
        for b in &tx.revokes {
            self.checkpoint.remove(b);
        }
        for (blk, copy) in placed {
            self.checkpoint.insert(blk, copy);
            self.live.insert(blk);
        }
        self.used += need;
        self.head = pos;
        self.next_tid = tid.wrapping_add(1);
        self.stats.commits += 1;
        self.stats.logged_blocks += tx.blocks.len() as u64;
        Ok(Some(CommitWrite {
            sb,
            body: body.runs,
            commit: (self.map.byte_offset(commit.0), commit.1),
        }))
    }

    /// Writes every committed block home and empties the log.
    pub fn checkpoint(&mut self, io: &dyn BlockIo) -> io::Result<()> {
        if self.sb.start == 0 {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut buf = vec![0u8; BLOCK_SIZE_U64 as usize];
        // Block 0 (the primary superblock) goes home last, after a barrier: when it changes the
        // geometry (`resize`), a crash between the two must not pair a new superblock with
        // descriptor blocks still old, which no open could read to find the journal again.
        let mut home = |blk: u64, copy: &LogCopy| -> io::Result<()> {
            io.read_at(&mut buf, self.map.byte_offset(copy.pos))?;
            if copy.escaped {
                format::unescape(&mut buf);
            }
            io.write_at(&buf, blk * BLOCK_SIZE_U64)
        };
        for (&blk, copy) in self.checkpoint.range(1..) {
            home(blk, copy)?;
        }
        if let Some(copy) = self.checkpoint.get(&0) {
            io.flush()?;
            home(0, copy)?;
        }
        io.flush()?;
        self.sb.start = 0;
        // Clean: a tid above every tid written; the next session starts one above it.
        self.sb.sequence = self.next_tid;
        self.write_sb(io)?;
        io.flush()?;
        self.stats.checkpoints += 1;
        log::debug!(
            "checkpoint {}: {} blocks home from {} log blocks in {:?}",
            self.stats.checkpoints,
            self.checkpoint.len(),
            self.used,
            started.elapsed()
        );
        self.checkpoint.clear();
        self.live.clear();
        self.used = 0;
        self.head = self.sb.first;
        Ok(())
    }

    /// Writes the journal superblock as it stands in memory, durably.
    pub fn rewrite_superblock(&mut self, io: &dyn BlockIo) -> io::Result<()> {
        self.write_sb(io)?;
        io.flush()
    }

    /// Records an abort in the journal superblock (`s_errno`), as jbd2 does.
    pub fn record_abort(&mut self, io: &dyn BlockIo, errno: i32) -> io::Result<()> {
        self.sb.errno = -errno.abs();
        self.write_sb(io)?;
        io.flush()
    }

    /// Log blocks taken since the last checkpoint (the `image_open` fuzz target mutates those).
    pub fn log_used(&self) -> u32 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemIo;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const LOG_AT: u64 = 1000;
    const LOG_LEN: u32 = 48;
    const META: u64 = 40;

    #[derive(Clone, Debug)]
    enum Op {
        /// Log these metadata blocks (block index, content byte).
        Tx(Vec<(u64, u8)>),
        /// Free a metadata block (revoke it) and reuse it for data written in place.
        Reuse(u64, u8),
        Checkpoint,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => prop::collection::vec((0..META, any::<u8>()), 1..14).prop_map(Op::Tx),
            2 => (0..META, any::<u8>()).prop_map(|(b, v)| Op::Reuse(b, v)),
            1 => Just(Op::Checkpoint),
        ]
    }

    fn block(v: u8, b: u64) -> Vec<u8> {
        let mut d = vec![v; 4096];
        d[8..16].copy_from_slice(&b.to_le_bytes());
        if v == 0xC0 {
            // Some blocks begin with the jbd2 magic: they must be escaped and restored.
            d[..4].copy_from_slice(&format::MAGIC.to_be_bytes());
        }
        d
    }

    /// A commit block torn after its first sector, over a log slot a wrapped log had filled:
    /// the transaction replays (the slot was zeroed before the barrier), nothing is corrupt.
    #[test]
    fn a_torn_commit_block_over_a_reused_slot_is_whole_or_absent() {
        let io = MemIo::new(vec![0xAB; ((LOG_AT + u64::from(LOG_LEN)) * 4096) as usize]);
        let map = LogMap::new(vec![Extent {
            lblk: 0,
            len: LOG_LEN,
            pblk: LOG_AT,
            unwritten: false,
        }]);
        let jsb = JournalSuperblock::new(LOG_LEN, [5; 16], 7);
        io.write_at(&jsb.encode(), LOG_AT * 4096).unwrap();
        let mut j = Journal::new(map.clone(), jsb);
        let mut tx = Transaction::default();
        tx.blocks.insert(3, block(1, 3));
        let w = j.prepare(&io, &tx, 1).unwrap().unwrap();
        // Everything before the first barrier, then only the first sector of the commit block.
        if let Some((at, sb)) = &w.sb {
            io.write_at(sb, *at).unwrap();
        }
        for (at, run) in &w.body {
            io.write_at(run, *at).unwrap();
        }
        io.write_at(&w.commit.1[..512], w.commit.0).unwrap();
        let mut jb = vec![0u8; 4096];
        io.read_at(&mut jb, LOG_AT * 4096).unwrap();
        let sb = JournalSuperblock::decode(&jb).unwrap();
        let out = replay::replay(&io, &map, &sb).unwrap();
        assert!(out.corrupt.is_none(), "{:?}", out.corrupt);
        assert_eq!(out.transactions, 1);
        assert_eq!(out.blocks.get(&3), Some(&block(1, 3)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random transactions through a tiny log (many wraps and checkpoints), then a crash and
        /// replay: every block holds its last committed content, revoked copies never come back.
        #[test]
        fn journal_replay_matches_the_model(ops in prop::collection::vec(op(), 1..60), seq in any::<u32>()) {
            let io = MemIo::new(vec![0u8; ((LOG_AT + u64::from(LOG_LEN)) * 4096) as usize]);
            let map = LogMap::new(vec![Extent { lblk: 0, len: LOG_LEN, pblk: LOG_AT, unwritten: false }]);
            let jsb = JournalSuperblock::new(LOG_LEN, [5; 16], seq);
            io.write_at(&jsb.encode(), LOG_AT * 4096).unwrap();
            let mut j = Journal::new(map.clone(), jsb);
            let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
            for o in &ops {
                match o {
                    Op::Tx(blocks) => {
                        let mut tx = Transaction::default();
                        for &(b, v) in blocks {
                            tx.blocks.insert(b, block(v, b));
                        }
                        j.commit(&io, &tx, 1).unwrap();
                        for (b, d) in tx.blocks {
                            model.insert(b, d);
                        }
                    }
                    Op::Reuse(b, v) => {
                        let mut tx = Transaction::default();
                        if j.is_logged(*b) {
                            tx.revokes.insert(*b);
                        }
                        // The freeing transaction commits before the block is reused.
                        j.commit(&io, &tx, 1).unwrap();
                        let d = block(v.wrapping_add(1), *b);
                        io.write_at(&d, b * 4096).unwrap();
                        model.insert(*b, d);
                    }
                    Op::Checkpoint => j.checkpoint(&io).unwrap(),
                }
            }
            // Crash: replay from what is on disk.
            let mut jb = vec![0u8; 4096];
            io.read_at(&mut jb, LOG_AT * 4096).unwrap();
            let sb = JournalSuperblock::decode(&jb).unwrap();
            let out = replay::replay(&io, &map, &sb).unwrap();
            prop_assert!(out.corrupt.is_none() && out.bad_tags == 0);
            for (b, d) in &out.blocks {
                io.write_at(d, b * 4096).unwrap();
            }
            for (b, want) in &model {
                let mut got = vec![0u8; 4096];
                io.read_at(&mut got, b * 4096).unwrap();
                prop_assert!(&got == want, "block {} after replay is not its last committed content", b);
            }
        }
    }
}
