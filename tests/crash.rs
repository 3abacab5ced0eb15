//! Crash consistency (design §5), dm-log-writes style: a workload runs through the real image
//! engine over a recording I/O layer; crash states are rebuilt from the log and each is checked:
//! `extblk check` clean after replay, every write acknowledged before a completed FLUSH intact,
//! every 512-byte sector holding zeroes or a value written to it at or after its last flushed
//! write, never poison (the stale bytes a device's previous tenant left) nor another block's
//! data. e2fsprogs judges a sample too.
//!
//! # The log
//!
//! `extblk::io::record` logs a history, not a list of finished writes: `Write { offset, data,
//! id }` when a write is handed to the backing (its bytes then, one event per 4 KiB block),
//! `Complete { id, durable }` when it completed (`durable`: `RWF_DSYNC`), `FlushStart` and
//! `FlushEnd` around each barrier (`fdatasync`; barriers never overlap), `Punch` once a range is
//! deallocated. Positioned I/O logs `Write` and `Complete` around the call; the engine's io_uring
//! logs them through its `RingObserver` when it pushes an operation (the iovecs' bytes, copied)
//! and when it reaps the completion. A write is ordered before a barrier only if its `Complete`
//! precedes the barrier's `FlushStart` (`pieces`): from that barrier's end on it is durable;
//! until then it is *unordered*, on disk or not, in any order with the other unordered writes.
//! A crash state at a cut (events `..cut` happened) is the durable writes in log order plus some
//! arrangement of the unordered ones; but where two overlap and one had completed before the
//! other was submitted, the earlier never lands over the later (`Piece::done`): no device or
//! host filesystem reorders those, and an `RWF_DSYNC` write can be durable before an earlier,
//! unflushed write or punch of its block is.
//!
//! # The sequential exploration
//!
//! One request at a time through positioned I/O (`workload`): crash states at every cut, each as
//! the prefix, two random subsets of the unordered writes in random orders, and the last
//! unordered 4 KiB write torn at 512 bytes; per block, the allowed values follow the requests'
//! order (`allowed`). Three deliberately broken engines must be caught.
//!
//! # The concurrent exploration (`crash/concurrent.rs`)
//!
//! The engine as it serves: `ImageEngine::open` over a file (in /dev/shm) behind the recorder
//! with its ring (`RecordingIo::with_ring`), two queue threads from `BlockEngine::open_queue`,
//! each keeping 16 requests in flight, submitting a batch (reads and overwrites first, then
//! allocating writes, discards, write-zeroes, FLUSHes), `submit_batch()`, then polling the
//! ring's completion fd and `process_completions()`. The image has 264 block groups and the
//! minimum 1024-block journal; a walk allocates in one group after another and whole-disk
//! discards free blocks in all of them at once, so the running transaction passes half the log
//! and allocating writes meet the throttle; barriers take 20 ms and commits run every 10 ms, so
//! commits overlap allocation and writes straddle barriers; the queues overlap on a few hot slots
//! (deferred partial writes, relocation after discards). Allocation units of 4, 16 and 64 KiB
//! take turns. The test asserts the throttle, deferral, commits and straddling writes happened.
//!
//! Requests carry two clocks: a counter of the harness's own submissions and completions
//! (`seq`), and the log's length then (`log`). A request is durable at a cut once a FLUSH
//! submitted after its completion has completed by the cut (or it is FUA and completed); a
//! sector may hold the value of any request on it submitted by the cut, unless a durable request
//! on it was submitted after that one completed (initial zeroes count as a request that came
//! first). Crash states are rebuilt incrementally (a durable image, an overlay of shared pages),
//! at barrier starts and ends and at a sample of completions, as the prefix, two subsets and
//! a torn write, on a device-like and a file-like backing in turn; at least 10,000 per run,
//! split over two threads. Every read's data is checked against the same order as it ran.
//! A liveness watch fails the run ("queue N stopped completing") when a queue with requests in
//! flight completes nothing for 4 s: `Broken::ThrottleHoldsFence` (the old throttle, waiting for
//! a commit while its own batch's fence guards hold the committer up) must stall it, in a child
//! process since its threads can never be ended; the three other broken engines must be caught
//! by crash states. `EXTBLK_CONCURRENT_STATES`, `EXTBLK_CRASH_SEED`, `EXTBLK_CRASH_THREADS` and
//! `EXTBLK_CRASH_TRACE=auto` (the log around a violation) tune and debug it.

use extblk::rng::Rng;
use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use extblk::engine::cache::{CacheCounters, CacheEngine, CacheOptions};
use extblk::engine::image::{EngineOptions, ImageEngine};
use extblk::engine::{
    BlockEngine, Completion, EngineError, EngineOp, EngineQueue, GuestBuffers, ZeroRange,
};
use extblk::ext4::layout::Layout;
use extblk::image::create::{create, CreateParams};
use extblk::image::{Image, OpenOptions};
use extblk::io::fault::{FaultIo, FaultOp, FaultSpec};
use extblk::io::mem::MemIo;
use extblk::io::record::{IoEvent, RecordingIo};
use extblk::io::BlockIo;
use extblk::mapping::tree::Lookup;
use extblk::testing::{set_broken, Broken};
use extblk::units::{ByteRange, Bytes};

#[path = "crash/concurrent.rs"]
mod concurrent;

const DISK_BLOCKS: u64 = 512;

/// Word `i` of a block's content: it names its logical block (24 bits) and version (16 bits).
fn stamp_word(lblk: u64, version: u64, i: u64) -> u64 {
    debug_assert!(lblk < 1 << 24 && version < 1 << 16);
    0xDA7A_0000_0000_0000 | (lblk << 24) | (version << 8) | (i & 0xFF)
}

/// A block's content names its logical block and version; poison names a physical block.
fn stamp(lblk: u64, version: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|i| stamp_word(lblk, version, i).to_le_bytes())
        .collect()
}
fn poison(pblk: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|i| (0x5017_0000_0000_0000 | (pblk << 8) | (i & 0xFF)).to_le_bytes())
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Val {
    Zero,
    V(u64),
}

/// The value of one 512-byte sector (`k` of block `lblk`): the guest's unit of atomicity.
fn decode(lblk: u64, k: usize, b: &[u8]) -> Result<Val, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(Val::Zero);
    }
    let w = u64::from_le_bytes(b[..8].try_into().unwrap());
    if w >> 48 == 0x5017 {
        return Err(format!(
            "stale data: poison of physical block {}",
            (w >> 8) & 0xFF_FFFF_FFFF
        ));
    }
    if w >> 48 != 0xDA7A || (w >> 24) & 0xFF_FFFF != lblk {
        return Err(format!("data of another block ({w:#x})"));
    }
    let v = (w >> 8) & 0xFFFF;
    let whole = b.chunks_exact(8).enumerate().all(|(j, x)| {
        u64::from_le_bytes(x.try_into().unwrap()) == stamp_word(lblk, v, (k * 64 + j) as u64)
    });
    if !whole {
        return Err("sector content is not one written value".into());
    }
    Ok(Val::V(v))
}

#[derive(Clone)]
struct Done(Arc<Mutex<Option<Result<(), String>>>>);
impl Completion for Done {
    fn complete(self, r: Result<(), EngineError>) {
        *self.0.lock().unwrap() = Some(r.map_err(|e| e.to_string()));
    }
}

/// One operation of the workload and the event-log span it produced.
struct OpRecord {
    /// Per affected block, the value the operation gives it.
    effects: Vec<(u64, Val)>,
    is_flush: bool,
    start: usize,
    end: usize,
    /// The engine reported success.
    ok: bool,
}

struct Run {
    base: Vec<u8>,
    events: Vec<IoEvent>,
    ops: Vec<OpRecord>,
    /// The write-back cache's counters, for a run through it.
    cache: Option<CacheCounters>,
    /// Blocks of allocation units converted without a write, found reading as zeroes.
    found_zero: u64,
}

fn buffers(data: Vec<u8>) -> GuestBuffers {
    let keep = Arc::new(data);
    let iov = libc::iovec {
        iov_base: keep.as_ptr() as *mut libc::c_void,
        iov_len: keep.len(),
    };
    // SAFETY: the buffer lives in `keep`, held by the GuestBuffers; the engine only reads it.
    unsafe { GuestBuffers::new(vec![iov], keep) }
}

/// Builds an image (free blocks poisoned or zero, by seed), runs `nops` seeded operations through
/// the engine, records the log.
fn workload(seed: u64, nops: usize) -> Run {
    workload_with(seed, nops, None).0
}

/// The same through the write-back cache (`--cache writeback`): 64 pages, half of them
/// allowed dirty, expiring after 2 ms, so writebacks run beside the requests and writers
/// wait for room.
fn workload_cached(seed: u64, nops: usize) -> Run {
    workload_in(seed, nops, None, Some((64, Duration::from_millis(2)))).0
}

/// The same with a fault injected below the engine; also returns the final backing bytes.
fn workload_with(seed: u64, nops: usize, fault: Option<FaultSpec>) -> (Run, Vec<u8>) {
    workload_in(seed, nops, fault, None)
}

/// `cache`: through the write-back cache of this many pages, with this dirty expiry.
fn workload_in(
    seed: u64,
    nops: usize,
    fault: Option<FaultSpec>,
    cache: Option<(u64, Duration)>,
) -> (Run, Vec<u8>) {
    // Seeds take turns with exact allocation and with 16 KiB and 64 KiB units, and, for each,
    // with free blocks holding stale bytes (poison: a read of a never-written block sees them,
    // and the rest of a unit must be zero-filled) and free blocks reading as zeroes (holes of
    // a sparse file: the rest of a unit is converted without a write).
    let alloc_unit = match seed % 3 {
        0 => 1,
        1 => 4,
        _ => 16,
    };
    let stale_free_blocks = (seed / 3) % 2 == 0;
    let probe = Layout::compute(DISK_BLOCKS * 4096, 1024, None).unwrap();
    let need = probe.data_start + 2 * DISK_BLOCKS + probe.tree_reserve + 64;
    let layout = Layout::compute(DISK_BLOCKS * 4096, 1024, Some(need)).unwrap();
    let mem = MemIo::new(vec![0u8; (layout.blocks_count * 4096) as usize]);
    create(
        &mem,
        &layout,
        &CreateParams {
            label: "crash".into(),
            uuid: [seed as u8; 16],
            now: 1_700_000_000,
        },
    )
    .unwrap();
    let mut base = mem.into_inner();
    if stale_free_blocks {
        for p in layout.data_start..layout.blocks_count {
            base[(p * 4096) as usize..((p + 1) * 4096) as usize].copy_from_slice(&poison(p));
        }
    }
    let mem = Arc::new(MemIo::new(base.clone()));
    let below: Arc<dyn BlockIo> = match fault {
        Some(spec) => Arc::new(FaultIo::new(mem.clone(), spec)),
        None => mem.clone(),
    };
    let rec = Arc::new(RecordingIo::new(below));
    let engine = ImageEngine::open(
        rec.clone(),
        EngineOptions {
            commit_interval: Duration::from_secs(3600),
            alloc_unit,
            ..Default::default()
        },
    )
    .unwrap();
    let stats_of = engine.clone();
    let mut counters = None;
    let ops = if let Some((pages, expire)) = cache {
        let cached = CacheEngine::new(
            engine,
            CacheOptions {
                size: pages * 4096,
                dirty_ratio: 50,
                dirty_expire: expire,
                file: None,
                thread_start: None,
            },
        )
        .unwrap();
        let ops = run_ops(&cached, &rec, seed, nops, fault.is_some());
        let _ = cached.close();
        counters = Some(cached.stats());
        ops
    } else {
        let ops = run_ops(&engine, &rec, seed, nops, fault.is_some());
        let _ = engine.close();
        ops
    };
    let events = rec.events();
    drop(rec);
    let found_zero = stats_of
        .stats()
        .unit_blocks_found_zero
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(stats_of);
    let mut bytes = vec![0u8; mem.size() as usize];
    mem.read_at(&mut bytes, 0).unwrap();
    (
        Run {
            base,
            events,
            ops,
            cache: counters,
            found_zero,
        },
        bytes,
    )
}

/// Runs `nops` seeded operations one at a time through `engine`, alternating two queues.
fn run_ops<E: BlockEngine>(
    engine: &E,
    rec: &RecordingIo,
    seed: u64,
    nops: usize,
    faulty: bool,
) -> Vec<OpRecord> {
    // Two virtqueues, as a guest with two queues would use them (each with its own mapping
    // cache and ring state); operations alternate between them.
    let mut queues = [
        engine.open_queue::<Done>(0).unwrap(),
        engine.open_queue::<Done>(1).unwrap(),
    ];
    let mut rng = Rng::new(seed | 1);
    let mut ops = Vec::new();
    let mut version = 0u64;
    for _ in 0..nops {
        // Half the operations hit a small hot region: rewrites after discards push allocations
        // into the spare area, where freed blocks of one logical block can go to another.
        let lblk = if rng.below(2) == 0 {
            rng.below(24)
        } else {
            rng.below(DISK_BLOCKS - 8)
        };
        let n = 1 + rng.below(4);
        let start = rec.len();
        let slot = Done(Arc::new(Mutex::new(None)));
        let range = ByteRange {
            offset: Bytes(lblk * 4096),
            len: Bytes(n * 4096),
        };
        let (op, effects, is_flush) = match rng.below(10) {
            0..=5 => {
                let mut data = Vec::new();
                let mut effects = Vec::new();
                for k in 0..n {
                    version += 1;
                    data.extend(stamp(lblk + k, version));
                    effects.push((lblk + k, Val::V(version)));
                }
                (
                    EngineOp::Write {
                        offset: Bytes(lblk * 4096),
                        bufs: buffers(data),
                        fua: false,
                    },
                    effects,
                    false,
                )
            }
            6 | 7 => (EngineOp::Flush, vec![], true),
            8 => (
                EngineOp::Discard {
                    ranges: vec![ZeroRange {
                        range,
                        unmap: false,
                    }],
                    fua: false,
                },
                (lblk..lblk + n).map(|b| (b, Val::Zero)).collect(),
                false,
            ),
            _ => {
                let unmap = rng.below(2) == 0;
                (
                    EngineOp::WriteZeroes {
                        ranges: vec![ZeroRange { range, unmap }],
                        fua: false,
                    },
                    (lblk..lblk + n).map(|b| (b, Val::Zero)).collect(),
                    false,
                )
            }
        };
        let qi = ops.len() % 2;
        queues[qi].submit(op, slot.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        let ok = loop {
            // A request the engine deferred (the cache's, waiting for room or a writeback)
            // is retried here.
            queues[qi].process_completions();
            if let Some(r) = slot.0.lock().unwrap().take() {
                if !faulty {
                    if let Err(e) = &r {
                        panic!("seed {seed}: operation failed: {e}");
                    }
                }
                break r.is_ok();
            }
            assert!(Instant::now() < deadline, "seed {seed}: operation hangs");
            std::thread::sleep(Duration::from_micros(50));
        };
        ops.push(OpRecord {
            effects,
            is_flush,
            start,
            end: rec.len(),
            ok,
        });
    }
    drop(queues);
    ops
}

/// Applies events. `punch_zeroes`: a sparse file (a punched range reads as zeroes); otherwise a
/// block device whose discard leaves the old bytes, so a bug exposing freed blocks shows stale
/// data. Both are real backings; the explorer alternates.
fn apply(state: &mut [u8], events: &[&IoEvent], punch_zeroes: bool) {
    for e in events {
        match e {
            IoEvent::Write { offset, data, .. } => {
                let o = *offset as usize;
                state[o..o + data.len()].copy_from_slice(data);
            }
            IoEvent::Punch { offset, len } if punch_zeroes => {
                state[*offset as usize..(*offset + *len) as usize].fill(0);
            }
            _ => {}
        }
    }
}

/// One write (or punch) of a log, and from which cut on it is durable: a write is ordered by the
/// first barrier that starts after its completion, once that barrier has ended (or at its own
/// completion, an `RWF_DSYNC` write); until then it may or may not be on disk, in any order with
/// the other unordered ones (see `extblk::io::record`).
#[derive(Clone, Copy, Debug)]
struct Piece {
    /// Index of its `Write` (or `Punch`) event.
    at: usize,
    /// Index of the event by which it had completed: a write's `Complete` (`usize::MAX`: it
    /// never did), a punch's own event (logged once the range is deallocated). A piece that
    /// completed before another was submitted is ordered before it where they overlap: no
    /// device or host filesystem lets a finished write or punch land over a later one. A punch
    /// is logged only when it returns, so it counts as submitted then: a write that completed
    /// while it ran is ordered before it. That holds because the engine punches only after
    /// waiting out the I/O in flight (`fence.wait_prior` in the commit), and a host
    /// filesystem's punch waits for the file's direct I/O in flight anyway.
    done: usize,
    /// The first cut (events `..cut` happened) at which it is durable; `usize::MAX`: never.
    durable_from: usize,
}

/// The log's writes and punches in log order, with the cuts they are durable from; also how
/// many writes were in flight when a barrier started (the overlap the concurrent engine makes).
fn pieces(events: &[IoEvent]) -> (Vec<Piece>, usize) {
    let mut done: std::collections::HashMap<u64, (usize, bool)> = Default::default();
    // Barriers never overlap (the recorder serialises them): a FlushEnd closes the last start.
    let mut barriers: Vec<(usize, usize)> = Vec::new();
    let mut open = None;
    for (i, e) in events.iter().enumerate() {
        match e {
            IoEvent::Complete { id, durable } => {
                done.insert(*id, (i, *durable));
            }
            IoEvent::FlushStart => open = Some(i),
            IoEvent::FlushEnd => {
                if let Some(s) = open.take() {
                    barriers.push((s, i));
                }
            }
            _ => {}
        }
    }
    // The end (as a cut) of the first barrier that starts after event `c`.
    let ordered_by = |c: usize| {
        let j = barriers.partition_point(|&(s, _)| s <= c);
        barriers.get(j).map_or(usize::MAX, |&(_, e)| e + 1)
    };
    let mut out = Vec::new();
    let mut straddling = 0;
    for (i, e) in events.iter().enumerate() {
        let finished = match e {
            IoEvent::Write { id, .. } => done.get(id).map_or(usize::MAX, |&(c, _)| c),
            _ => i,
        };
        let durable_from = match e {
            IoEvent::Write { id, .. } => match done.get(id) {
                None => usize::MAX,
                Some(&(c, dsync)) => {
                    let j = barriers.partition_point(|&(s, _)| s <= i);
                    if barriers.get(j).is_some_and(|&(s, _)| s < c) {
                        straddling += 1;
                    }
                    if dsync {
                        ordered_by(c).min(c + 1)
                    } else {
                        ordered_by(c)
                    }
                }
            },
            IoEvent::Punch { .. } => ordered_by(i),
            _ => continue,
        };
        out.push(Piece {
            at: i,
            done: finished,
            durable_from,
        });
    }
    (out, straddling)
}

/// The values each block may hold after a crash at event `cut` (see §5).
fn allowed(run: &Run, cut: usize) -> Vec<HashSet<Val>> {
    // The last FLUSH that completed before the cut makes everything before it durable.
    let last_flush = run
        .ops
        .iter()
        .rposition(|o| o.is_flush && o.ok && o.end <= cut);
    let mut durable = vec![Val::Zero; DISK_BLOCKS as usize];
    // Failed requests before the flush: what they did may or may not be there.
    let mut maybe: Vec<(u64, Val)> = Vec::new();
    let from = match last_flush {
        Some(i) => {
            for o in &run.ops[..i] {
                for &(b, v) in &o.effects {
                    if o.ok {
                        durable[b as usize] = v;
                    } else {
                        maybe.push((b, v));
                    }
                }
            }
            i + 1
        }
        None => 0,
    };
    let mut allowed: Vec<HashSet<Val>> = durable.iter().map(|&v| HashSet::from([v])).collect();
    for (b, v) in maybe {
        allowed[b as usize].insert(v);
    }
    // Not flushed: anything written by operations that had started by the cut, and (when never
    // flushed) zeroes — already there.
    for o in run.ops[from..].iter().filter(|o| o.start <= cut) {
        for &(b, v) in &o.effects {
            allowed[b as usize].insert(v);
        }
    }
    if last_flush.is_none() {
        for a in &mut allowed {
            a.insert(Val::Zero);
        }
    }
    allowed
}

/// Checks one crash state; returns a description of the first violation.
fn judge(state: Vec<u8>, allowed: &[HashSet<Val>]) -> Result<(), String> {
    let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(state));
    let img = Image::open(io.clone(), OpenOptions { read_only: true })
        .map_err(|e| format!("open: {e}"))?;
    let report = extblk::check::check(&img, "crash".into());
    if !report.problems.is_empty() {
        return Err(format!("check: {:?}", report.problems));
    }
    let mut buf = vec![0u8; 4096];
    for b in 0..DISK_BLOCKS {
        match img.lookup(b as u32) {
            Lookup::Mapped(e) if !e.unwritten => img
                .read_block(e.pblk, &mut buf)
                .map_err(|e| e.to_string())?,
            _ => buf.fill(0),
        }
        for k in 0..8 {
            let v = decode(b, k, &buf[k * 512..(k + 1) * 512])
                .map_err(|e| format!("block {b} sector {k}: {e}"))?;
            if !allowed[b as usize].contains(&v) {
                return Err(format!(
                    "block {b} sector {k} holds {v:?}, allowed {:?}",
                    allowed[b as usize]
                ));
            }
        }
    }
    Ok(())
}

fn e2fsck_agrees(state: &[u8], dir: &std::path::Path, n: usize) -> Result<(), String> {
    let p = dir.join(format!("state-{n}.img"));
    std::fs::write(&p, state).unwrap();
    let ours = {
        let img = Image::open(
            Arc::new(MemIo::new(state.to_vec())),
            OpenOptions { read_only: true },
        )
        .map_err(|e| e.to_string())?;
        img.runs()
    };
    e2fsck_file_agrees(&p, ours)
}

/// e2fsck replays and checks the image in file `p` (which it may change): nothing to fix, and
/// its replay maps `/disk` as ours did (`ours`). Removes the file when it agrees.
fn e2fsck_file_agrees(p: &std::path::Path, ours: Vec<extblk::image::Run>) -> Result<(), String> {
    let out = Command::new("e2fsck")
        .args(["-fy", "-E", "no_optimize_extents"])
        .arg(p)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.code().unwrap_or(8) > 1
        || text.contains("checksum error")
        || text.contains("corrupt")
    {
        return Err(format!("e2fsck -fy: {text}"));
    }
    let out = Command::new("e2fsck")
        .args(["-fn", "-E", "no_optimize_extents"])
        .arg(p)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "e2fsck -fn after its replay: {}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    // Read through the file, not into memory: a sparse image may be far larger than its data.
    let backing = extblk::io::backing::Backing::open(p, true).map_err(|e| e.to_string())?;
    let theirs = Image::open(
        Arc::new(extblk::io::FileIo::new(backing)),
        OpenOptions { read_only: true },
    )
    .map_err(|e| e.to_string())?
    .runs();
    let _ = std::fs::remove_file(p);
    if ours != theirs {
        return Err("e2fsck's replay maps /disk differently from ours".into());
    }
    Ok(())
}

struct Stats {
    states: usize,
    e2fsck: usize,
}

/// All crash states of one run. `e2fsck_every`: judge every n-th state with e2fsprogs too.
fn explore(
    run: &Run,
    seed: u64,
    e2fsck_every: usize,
    dir: &std::path::Path,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    let n = run.events.len();
    let (pieces, _) = pieces(&run.events);
    // Where a request started or ended: a cut there may change what is allowed.
    let bounds: HashSet<usize> = run.ops.iter().flat_map(|o| [o.start, o.end]).collect();
    for cut in 0..=n {
        // A cut just after a completion or a barrier's start has the crash states of the cut
        // before it.
        if cut > 0
            && !bounds.contains(&cut)
            && matches!(
                run.events[cut - 1],
                IoEvent::Complete { .. } | IoEvent::FlushStart
            )
        {
            continue;
        }
        let allowed = allowed(run, cut);
        let ev = |p: &Piece| &run.events[p.at];
        let happened: Vec<&Piece> = pieces.iter().filter(|p| p.at < cut).collect();
        let durable: Vec<&IoEvent> = happened
            .iter()
            .filter(|p| p.durable_from <= cut)
            .map(|p| ev(p))
            .collect();
        let unordered: Vec<&Piece> = happened
            .iter()
            .copied()
            .filter(|p| p.durable_from > cut)
            .collect();
        let mut variants: Vec<(String, Vec<&IoEvent>)> =
            vec![("prefix".into(), happened.iter().map(|p| ev(p)).collect())];
        if unordered.len() > 1 {
            for k in 0..2 {
                // A random subset of the unordered writes, in a random order.
                let mut sub: Vec<&IoEvent> = unordered
                    .iter()
                    .filter(|_| rng.below(2) == 0)
                    .map(|p| ev(p))
                    .collect();
                for i in (1..sub.len()).rev() {
                    sub.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let mut all = durable.clone();
                all.extend(sub);
                variants.push((format!("subset {k}"), all));
            }
        }
        let mut torn_events = Vec::new();
        let last = unordered.last().copied();
        if let Some(IoEvent::Write { offset, data, .. }) = last
            .map(ev)
            .filter(|e| matches!(e, IoEvent::Write { data, .. } if data.len() % 4096 == 0))
        {
            // The last unordered 4 KiB write torn: only some of its 512-byte sectors reached
            // the disk. (The 1 KiB superblock write is taken as sector-atomic, as ext4 does; a
            // torn superblock is what its backups are for.)
            for s in (0..data.len()).step_by(512) {
                if rng.below(2) == 0 {
                    torn_events.push(IoEvent::Write {
                        offset: offset + s as u64,
                        data: data[s..s + 512].to_vec(),
                        id: u64::MAX,
                    });
                }
            }
        }
        if !torn_events.is_empty() {
            let skip = last.map(|p| p.at);
            let mut all: Vec<&IoEvent> = happened
                .iter()
                .filter(|p| Some(p.at) != skip)
                .map(|p| ev(p))
                .collect();
            all.extend(torn_events.iter());
            variants.push(("torn last write".into(), all));
        }
        for (what, ev) in variants {
            let mut state = run.base.clone();
            apply(&mut state, &ev, cut % 2 == 0);
            stats.states += 1;
            if e2fsck_every > 0 && stats.states % e2fsck_every == 0 {
                e2fsck_agrees(&state, dir, stats.states)
                    .map_err(|e| format!("cut {cut} ({what}): {e}"))?;
                stats.e2fsck += 1;
            }
            judge(state, &allowed).map_err(|e| format!("cut {cut}/{n} ({what}): {e}"))?;
        }
    }
    Ok(())
}

fn scratch(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("extblk-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// On a failure, find the shortest prefix of the workload that still fails: the reproducer.
fn shrink(seed: u64, nops: usize) -> usize {
    let (mut lo, mut hi) = (1, nops);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let run = workload(seed, mid);
        let mut st = Stats {
            states: 0,
            e2fsck: 0,
        };
        if explore(&run, seed, 0, &scratch("shrink"), &mut st).is_err() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

static SERIAL: Mutex<()> = Mutex::new(());

/// The environment variable `name` parsed, or `default` when unset or unparsable.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn crash_states_keep_the_contract() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(Broken::None);
    let target: usize = env_or("EXTBLK_CRASH_STATES", 10_000);
    let dir = scratch("ok");
    let t0 = Instant::now();
    let mut stats = Stats {
        states: 0,
        e2fsck: 0,
    };
    let mut seed = env_or("EXTBLK_CRASH_SEED", 1u64);
    let mut found_zero = 0;
    while stats.states < target {
        let run = workload(seed, 120);
        found_zero += run.found_zero;
        // About 250 e2fsck judgements over 10,000 states.
        if let Err(e) = explore(&run, seed, 40, &dir, &mut stats) {
            let min = shrink(seed, 120);
            panic!("seed {seed}: {e}\nreproduce: EXTBLK_CRASH_SEED={seed} (fails with {min} operations)");
        }
        seed += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} crash states ({} judged by e2fsck) in {secs:.1}s: {:.0} states/s",
        stats.states,
        stats.e2fsck,
        stats.states as f64 / secs
    );
    assert!(
        stats.e2fsck >= 200,
        "too few e2fsck judgements: {}",
        stats.e2fsck
    );
    assert!(
        found_zero > 0,
        "no allocation unit was converted over blocks reading as zeroes"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn crash_states_keep_the_contract_through_the_writeback_cache() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(Broken::None);
    let target: usize = env_or("EXTBLK_CRASH_STATES", 10_000);
    let dir = scratch("cached");
    let mut stats = Stats {
        states: 0,
        e2fsck: 0,
    };
    let mut seed = 1u64;
    let (mut throttled, mut waited, mut runs, mut flushes) = (0, 0, 0, 0);
    while stats.states < target {
        let run = workload_cached(seed, 120);
        let c = run.cache.expect("run through the cache");
        throttled += c.writes_throttled;
        waited += c.zeroes_waited;
        runs += c.writeback_runs;
        flushes += c.flushes_below;
        if let Err(e) = explore(&run, seed, 40, &dir, &mut stats) {
            panic!("seed {seed} through the cache: {e}");
        }
        seed += 1;
    }
    println!(
        "{} crash states through the cache ({} judged by e2fsck), {seed} seeds; {throttled} \
         writes waited for room, {waited} discards or write-zeroes for a writeback, {runs} \
         writebacks, {flushes} flushes below",
        stats.states, stats.e2fsck
    );
    // Writebacks ran between the flushes (expiry and pressure), not only at them. (One
    // request at a time meets no races; the concurrent exploration asserts those.)
    assert!(runs > flushes, "{runs} {flushes}");
    assert!(
        stats.e2fsck >= 200,
        "too few e2fsck judgements: {}",
        stats.e2fsck
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cache_flush_before_its_writeback_is_caught() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(Broken::FlushBeforeWriteback);
    let dir = scratch("broken-cache");
    let mut found = None;
    for seed in 1..40u64 {
        // Nothing expires and the whole disk fits: at a FLUSH the dirty pages are all still
        // in the cache, and the broken cache's flush leaves them out.
        let run = workload_in(seed, 120, None, Some((2048, Duration::from_secs(3600)))).0;
        let mut st = Stats {
            states: 0,
            e2fsck: 0,
        };
        if let Err(e) = explore(&run, seed, 0, &dir, &mut st) {
            found = Some(format!("seed {seed}: {e}"));
            break;
        }
    }
    set_broken(Broken::None);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        found.is_some(),
        "the crash tests missed a cache that flushes before writing back"
    );
    println!("caught: {}", found.unwrap());
}

fn caught(mode: Broken) -> Option<String> {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(mode);
    let dir = scratch("broken");
    let mut found = None;
    for seed in 1..40u64 {
        let run = workload(seed, 120);
        let mut st = Stats {
            states: 0,
            e2fsck: 0,
        };
        if let Err(e) = explore(&run, seed, 0, &dir, &mut st) {
            found = Some(format!("seed {seed}: {e}"));
            break;
        }
    }
    set_broken(Broken::None);
    let _ = std::fs::remove_dir_all(&dir);
    found
}

#[test]
fn a_commit_record_before_the_data_barrier_is_caught() {
    let r = caught(Broken::CommitBeforeData);
    assert!(
        r.is_some(),
        "the crash tests missed a commit written before its data barrier"
    );
    println!("caught: {}", r.unwrap());
}

#[test]
fn reusing_freed_blocks_before_the_commit_is_caught() {
    let r = caught(Broken::ReuseBeforeCommit);
    assert!(
        r.is_some(),
        "the crash tests missed blocks reused before their free committed"
    );
    println!("caught: {}", r.unwrap());
}

#[test]
fn converting_stale_blocks_as_zeroes_is_caught() {
    let r = caught(Broken::ZeroWithoutHole);
    assert!(
        r.is_some(),
        "the crash tests missed the rest of a unit converted over stale bytes"
    );
    println!("caught: {}", r.unwrap());
}

#[test]
fn converting_before_the_data_write_is_caught() {
    let r = caught(Broken::ConvertBeforeWrite);
    assert!(
        r.is_some(),
        "the crash tests missed a conversion before the data write"
    );
    println!("caught: {}", r.unwrap());
}

/// The shape of concurrent run `seed`: allocation units of 4, 16 and 64 KiB in rotation; a
/// short commit interval and barriers that take a while, so commits overlap allocation and
/// the next transaction reaches the log throttle.
fn shape(seed: u64) -> concurrent::Shape {
    concurrent::Shape {
        seed,
        alloc_unit: [1, 4, 16][(seed % 3) as usize],
        requests_per_queue: 2500,
        commit_interval: Duration::from_millis(10),
        barrier_delay: Duration::from_millis(20),
        fua: false,
        cache: None,
    }
}

#[test]
fn concurrent_crash_states_keep_the_contract() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(Broken::None);
    let target: usize = env_or("EXTBLK_CONCURRENT_STATES", 10_000);
    let mut seed = env_or("EXTBLK_CRASH_SEED", 1u64);
    let dir = scratch("concurrent");
    let t0 = Instant::now();
    let mut stats = concurrent::ExploreStats::default();
    let mut total = concurrent::RunCounts::default();
    let mut runs = 0;
    // At least one run per allocation unit; states spread over them.
    while runs < 3 || stats.states < target {
        let t = Instant::now();
        let run = concurrent::workload(shape(seed))
            .unwrap_or_else(|e| panic!("seed {seed} {:?}: {e}", shape(seed)));
        let ran = t.elapsed();
        let reads = concurrent::check_reads(&run).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        // Spread over the three first runs; a longer soak takes new seeds rather than more
        // states of one run.
        let want = target
            .saturating_sub(stats.states)
            .div_ceil(3 - runs.min(2))
            .min(4000);
        let before = stats.states;
        // About 35 e2fsck judgements over 10,000 states.
        concurrent::explore(&run, want.max(500), 300, &dir, &mut stats)
            .unwrap_or_else(|e| panic!("{e}\nreproduce (timing varies): EXTBLK_CRASH_SEED={seed}"));
        let c = run.counts;
        println!(
            "  open {:.1}s check {:.1}s data {:.1}s",
            stats.open.as_secs_f64(),
            stats.check.as_secs_f64(),
            stats.data.as_secs_f64()
        );
        println!(
            "seed {seed} unit {}: {} requests ({reads} sectors read back) in {:.1}s, {} events, \
             {} writes straddling a barrier; throttled {}, deferred {}, commits {}, space waits {}; \
             {} crash states",
            run.shape.alloc_unit,
            c.requests,
            ran.as_secs_f64(),
            c.events,
            c.straddling,
            c.throttled,
            c.deferred_writes,
            c.commits,
            c.space_waits,
            stats.states - before
        );
        total.throttled += c.throttled;
        total.deferred_writes += c.deferred_writes;
        total.commits += c.commits;
        total.straddling += c.straddling;
        seed += 1;
        runs += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "concurrent crash states: {} ({} cuts, up to {} unordered writes, {} judged by e2fsck) in {secs:.1}s",
        stats.states, stats.cuts, stats.max_unordered, stats.e2fsck
    );
    assert!(stats.states >= target, "{} states", stats.states);
    assert!(
        stats.e2fsck >= 20,
        "too few e2fsck judgements: {}",
        stats.e2fsck
    );
    // What the sequential exploration never sees happened.
    assert!(total.throttled > 0, "no write met the log throttle");
    assert!(total.deferred_writes > 0, "no write was deferred");
    assert!(total.commits > 0, "nothing committed");
    assert!(
        total.straddling > 0,
        "no write was in flight across a barrier"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn concurrent_crash_states_keep_the_contract_through_the_writeback_cache() {
    // The engine as `serve --cache writeback` runs it: two queues of 16 requests in flight
    // into a 64-page cache (32 may be dirty, 5 ms expiry) over the image engine and its
    // io_uring, so writes wait for room, discards and write-zeroes wait for writebacks of
    // their blocks, and writebacks run beside FLUSHes, commits and barriers.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(Broken::None);
    let target: usize = env_or("EXTBLK_CONCURRENT_STATES", 6_000);
    let dir = scratch("concurrent-cache");
    let mut stats = concurrent::ExploreStats::default();
    let (mut throttled, mut waited, mut writebacks) = (0, 0, 0);
    let first = env_or("EXTBLK_CRASH_SEED", 1u64);
    let mut seed = first;
    while seed < first + 3 || stats.states < target {
        let shape = concurrent::Shape {
            cache: Some(64),
            requests_per_queue: 1500,
            ..shape(seed)
        };
        let run = concurrent::workload(shape)
            .unwrap_or_else(|e| panic!("seed {seed} {shape:?} through the cache: {e}"));
        let reads = concurrent::check_reads(&run)
            .unwrap_or_else(|e| panic!("seed {seed} through the cache: {e}"));
        let before = stats.states;
        concurrent::explore(&run, (target / 3).max(500), 200, &dir, &mut stats).unwrap_or_else(
            |e| {
                panic!(
                    "{e}\nthrough the cache; reproduce (timing varies): EXTBLK_CRASH_SEED={seed}"
                )
            },
        );
        let c = run.counts;
        println!(
            "seed {seed} through the cache: {} requests ({reads} sectors read back), {} writes \
             waited for room, {} zeroings for a writeback, {} writebacks, {} straddling; {} \
             crash states",
            c.requests,
            c.cache_throttled,
            c.cache_zeroes_waited,
            c.cache_writebacks,
            c.straddling,
            stats.states - before
        );
        throttled += c.cache_throttled;
        waited += c.cache_zeroes_waited;
        writebacks += c.cache_writebacks;
        seed += 1;
    }
    assert!(
        stats.e2fsck >= 10,
        "too few e2fsck judgements: {}",
        stats.e2fsck
    );
    assert!(throttled > 0, "no write waited for room");
    assert!(
        waited > 0,
        "no discard or write-zeroes waited for a writeback"
    );
    assert!(writebacks > 0, "nothing was written back");
    let _ = std::fs::remove_dir_all(&dir);
}

/// FUA (write-through) requests under the concurrent exploration, with the engine broken as
/// `mode`: the crash states explored and the FUA overwrites that waited for a commit, or the
/// first violation.
fn fua_exploration(mode: Broken) -> Result<(usize, u64), String> {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(mode);
    let dir = scratch("concurrent-fua");
    let mut stats = concurrent::ExploreStats::default();
    let mut waited = 0;
    let r = (1..=3u64).try_for_each(|seed| {
        let shape = concurrent::Shape {
            fua: true,
            ..shape(seed)
        };
        let run = concurrent::workload(shape).map_err(|e| format!("seed {seed}: {e}"))?;
        concurrent::check_reads(&run).map_err(|e| format!("seed {seed}: {e}"))?;
        waited += run.counts.fua_commits;
        concurrent::explore(&run, 2000, 0, &dir, &mut stats)
    });
    set_broken(Broken::None);
    let _ = std::fs::remove_dir_all(&dir);
    r.map(|()| (stats.states, waited))
}

/// FUA (write-through) writes, discards and write-zeroes must be durable once they complete,
/// without a FLUSH: a guest that turned the write cache off sends none. A FUA *overwrite* of a
/// block whose mapping is still in an uncommitted transaction completes after a commit
/// (`fua_commits`, as ext4's `i_datasync_tid`); the test asserts that case came up. (It was
/// ignored for a while over a failure that was the model's: a write or punch that finished
/// before a FUA write to the same block was submitted was let land over it; see `Piece::done`.)
#[test]
fn concurrent_fua_requests_are_durable_once_acknowledged() {
    let (states, waited) = fua_exploration(Broken::None).unwrap_or_else(|e| panic!("{e}"));
    println!("FUA crash states: {states}; FUA overwrites that waited for a commit: {waited}");
    assert!(states >= 3000, "too few crash states: {states}");
    assert!(
        waited > 0,
        "no FUA overwrite met an uncommitted mapping change"
    );
}

/// The old FUA bug (`Broken::FuaBeforeCommit`: complete on the data's durability alone) must
/// be caught.
#[test]
fn concurrent_a_fua_write_acknowledged_before_its_mapping_is_caught() {
    let r = fua_exploration(Broken::FuaBeforeCommit);
    // A crash state's violation (named by its cut), not a run that failed for another reason.
    assert!(
        r.as_ref().is_err_and(|e| e.contains(": cut ")),
        "the FUA exploration missed a FUA write completed before its mapping committed: {r:?}"
    );
    println!("caught: {}", r.unwrap_err());
}

/// A broken engine under the concurrent exploration: the first violation, or why the run
/// itself failed.
fn caught_concurrent(mode: Broken) -> Option<String> {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(mode);
    let dir = scratch("concurrent-broken");
    let mut found = None;
    for seed in 1..=6u64 {
        // Quick barriers and a shorter run: these bugs need no throttle, and the broken
        // conversion commits (two barriers) inside every allocating write.
        let quick = concurrent::Shape {
            barrier_delay: Duration::from_millis(1),
            requests_per_queue: 1500,
            ..shape(seed)
        };
        match concurrent::workload(quick) {
            Err(e) => found = Some(format!("seed {seed}: the run failed: {e}")),
            Ok(run) => {
                let mut st = concurrent::ExploreStats::default();
                if let Err(e) = concurrent::explore(&run, 4000, 0, &dir, &mut st) {
                    found = Some(e);
                } else if let Err(e) = concurrent::check_reads(&run) {
                    found = Some(format!("seed {seed}: {e}"));
                }
            }
        }
        if found.is_some() {
            break;
        }
    }
    set_broken(Broken::None);
    let _ = std::fs::remove_dir_all(&dir);
    found
}

#[test]
fn concurrent_a_commit_record_before_the_data_barrier_is_caught() {
    let r = caught_concurrent(Broken::CommitBeforeData);
    assert!(
        r.is_some(),
        "the concurrent exploration missed a commit before its data barrier"
    );
    println!("caught: {}", r.unwrap());
}

#[test]
fn concurrent_reusing_freed_blocks_before_the_commit_is_caught() {
    let r = caught_concurrent(Broken::ReuseBeforeCommit);
    assert!(
        r.is_some(),
        "the concurrent exploration missed blocks reused before their free committed"
    );
    println!("caught: {}", r.unwrap());
}

#[test]
fn concurrent_converting_before_the_data_write_is_caught() {
    let r = caught_concurrent(Broken::ConvertBeforeWrite);
    assert!(
        r.is_some(),
        "the concurrent exploration missed a conversion before the data write"
    );
    println!("caught: {}", r.unwrap());
}

/// The old throttle (`Broken::ThrottleHoldsFence`) waits for a commit on the queue thread while
/// fence guards of its own reads and overwrites, pushed earlier in the batch or in flight on its
/// ring, hold the committer up: the disk stops. The liveness watch must say so. In a child copy
/// of this test binary, since the stuck threads can never be ended.
#[test]
fn concurrent_a_throttle_that_holds_fence_guards_stops_a_queue_and_is_caught() {
    const CHILD: &str = "EXTBLK_CRASH_THROTTLE_CHILD";
    const NAME: &str = "concurrent_a_throttle_that_holds_fence_guards_stops_a_queue_and_is_caught";
    if std::env::var_os(CHILD).is_some() {
        set_broken(Broken::ThrottleHoldsFence);
        // The stall needs a throttled write behind unsubmitted guards of its own batch while
        // the commit it waits for has frees (only then does the committer wait in the fence):
        // likely in a seed, not certain (2 to 8 throttled writes each). Seeds until one stops.
        for seed in 1..=16u64 {
            let outcome = match concurrent::workload(shape(seed)) {
                Err(concurrent::RunError::Stalled(m)) => Some((0, format!("stall: {m}"))),
                Err(concurrent::RunError::Failed(m)) => Some((2, format!("failed: {m}"))),
                Ok(run) => {
                    println!("seed {seed}: no stall ({:?})", run.counts);
                    None
                }
            };
            if let Some((code, m)) = outcome {
                // On a line of its own: the harness has printed the test's name before it.
                println!("\n{m}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(code);
            }
        }
        std::process::exit(3);
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Output to files: a pipe nobody reads while we wait could fill and block the child.
    let dir = scratch("throttle-child");
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // A child stuck somewhere the watch does not see must not hang the suite.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let stall = stdout.lines().find(|l| l.starts_with("stall: "));
    assert!(
        status.code() == Some(0) && stall.is_some_and(|l| l.contains("stopped completing")),
        "the liveness watch missed the stall ({status:?}): {stdout}{stderr}"
    );
    println!("caught: {}", stall.unwrap());
}

/// Faults below the engine: EIO on data writes, on metadata/journal writes and on fdatasync,
/// ENOSPC, and short writes. The engine must fail requests cleanly or abort the journal; the
/// image must then reopen (replay) consistent, with every acknowledged flush intact.
#[test]
fn injected_faults_fail_cleanly_and_the_image_reopens_consistent() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_broken(Broken::None);
    let mut tried = 0;
    let mut fired: std::collections::HashMap<String, usize> = Default::default();
    for (kind, op) in [
        ("eio", FaultOp::Data),
        ("eio", FaultOp::Meta),
        ("eio", FaultOp::Flush),
        ("enospc", FaultOp::Data),
        ("short", FaultOp::Data),
        ("short", FaultOp::Meta),
    ] {
        for (seed, after) in [(11u64, 3u64), (12, 20), (13, 60)] {
            let spec = FaultSpec {
                errno: if kind == "enospc" {
                    libc::ENOSPC
                } else {
                    libc::EIO
                },
                short: kind == "short",
                op,
                after,
                // A short write happens once; a device that tears every later write (the
                // superblock's error record included) leaves only e2fsck's backups to help.
                count: match kind {
                    "enospc" => 2,
                    "short" => 1,
                    _ => u64::MAX,
                },
            };
            let (run, bytes) = workload_with(seed, 100, Some(spec));
            let failed = run.ops.iter().filter(|o| !o.ok).count();
            *fired.entry(format!("{kind}/{op:?}")).or_default() += failed;
            // Reopen read-write (our replay), close cleanly, then judge the result.
            let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(bytes));
            let img = Image::open(io.clone(), OpenOptions::default()).unwrap_or_else(|e| {
                panic!("{kind}/{op:?} seed {seed}: the image does not reopen: {e}")
            });
            img.close().unwrap();
            let mut after_close = vec![0u8; io.size() as usize];
            io.read_at(&mut after_close, 0).unwrap();
            let allowed = allowed(&run, run.events.len());
            if let Err(e) = judge_with_errors(after_close, &allowed) {
                panic!("{kind}/{op:?} after {after}, seed {seed} ({failed} requests failed): {e}");
            }
            tried += 1;
        }
    }
    assert_eq!(tried, 18);
    println!("failed requests per fault: {fired:?}");
    for (k, n) in &fired {
        assert!(*n > 0, "fault {k} never made a request fail");
    }
}

/// Like `judge`, but an image that recorded an abort may report exactly that error.
fn judge_with_errors(state: Vec<u8>, allowed: &[HashSet<Val>]) -> Result<(), String> {
    let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(state.clone()));
    let img = Image::open(io, OpenOptions { read_only: true }).map_err(|e| format!("open: {e}"))?;
    let report = extblk::check::check(&img, "fault".into());
    let real: Vec<&String> = report
        .problems
        .iter()
        .filter(|p| !p.contains("recorded errors") && !p.contains("journal was aborted"))
        .collect();
    if !real.is_empty() {
        return Err(format!("check: {real:?}"));
    }
    drop(img);
    // The contract on data, ignoring the recorded error state.
    let mut clean = state;
    clear_error_state(&mut clean);
    judge(clean, allowed)
}

/// Clears ERROR_FS and the journal's errno the way e2fsck would, so `judge` sees a plain image.
fn clear_error_state(state: &mut [u8]) {
    use extblk::ext4::superblock::Superblock;
    let mut sb = Superblock::decode(&state[1024..2048]).unwrap();
    sb.state &= !extblk::ext4::superblock::STATE_ERROR;
    sb.error = Default::default();
    state[1024..2048].copy_from_slice(&sb.encode());
    let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(state.to_vec()));
    let img = Image::open(io, OpenOptions { read_only: true }).unwrap();
    let jblk = img.log_map().fs_block(0) as usize;
    drop(img);
    let mut jsb =
        extblk::jbd2::format::JournalSuperblock::decode(&state[jblk * 4096..jblk * 4096 + 4096])
            .unwrap();
    jsb.errno = 0;
    state[jblk * 4096..jblk * 4096 + 4096].copy_from_slice(&jsb.encode());
}
