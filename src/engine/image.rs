//! The image engine: serves an extblk image's `/disk` with ext4's iomap writeback design.
//!
//! - READ and pure OVERWRITE (every block mapped and written) run on the virtqueue thread: the
//!   mapping comes from a per-queue cache of written extents validated by a sequence number
//!   (no mapping lock), the data goes straight to the mapped blocks, and the request completes
//!   there. No journal handle.
//! - An ALLOCATING write takes the mapping lock, allocates every hole of the request as unwritten
//!   extents at once, marks those blocks in progress, and writes the data (sub-block pieces of new
//!   blocks padded with zeroes) outside the lock. The completion worker then converts exactly the
//!   blocks it wrote and completes the request. A write that touches blocks another write is still
//!   initialising waits for it, so partial writes into one new block never clobber each other.
//! - FLUSH, DISCARD and WRITE_ZEROES go to the worker, which keeps order with conversions and
//!   hands whatever must wait for durability to the committer.
//! - The committer thread (jbd2's kjournald) commits the running transaction on demand, on the
//!   commit interval and when the log fills: it freezes the transaction under the mapping lock
//!   and writes it with the lock released, so allocation and conversion go on into the next
//!   transaction meanwhile; every waiter that arrived before the freeze completes with that one
//!   commit (group commit). Freed ranges are punched in the backing once their transaction is
//!   durable and before the allocator may hand them out again.
//! - `data_err=abort`: a failed data write aborts the journal; reads go on, writes fail.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::fence::{FenceGuard, IoFence};
use super::{
    Batch, BlockEngine, Completion, EngineError, EngineInfo, EngineOp, EngineQueue, GuestBuffers,
    ZeroRange,
};
use crate::ext4::extent::Extent;
use crate::ext4::BLOCK_SIZE_U64;
use crate::image::{Image, ImageError, OpenOptions};
use crate::io::backing::DIRECT_ALIGN;
use crate::io::uring::{self, Ring};
use crate::io::{iov, BlockIo};
use crate::mapping::tree::Lookup;
use crate::units::Bytes;

const BS: u64 = BLOCK_SIZE_U64;

/// A completion the worker can hold without knowing its type.
pub trait DynCompletion: Send {
    fn finish(self: Box<Self>, r: Result<(), EngineError>);
    fn batch(&self) -> Batch;
}

impl<C: Completion> DynCompletion for C {
    fn finish(self: Box<Self>, r: Result<(), EngineError>) {
        (*self).complete(r)
    }
    fn batch(&self) -> Batch {
        Completion::batch(self)
    }
}

type Done = Box<dyn DynCompletion>;

/// How reads and pure overwrites are served. Anything but `Fast` exists only to reproduce the
/// seed's experiment (`extblk serve --hot-path`, `scripts/seed-experiment.sh`): it measures
/// what the fast path saves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HotPath {
    /// Mapping from the queue's seq-validated cache; completion on the queue thread.
    #[default]
    Fast,
    /// As `Fast`, but every completion goes through the completion worker.
    WorkerCompletion,
    /// As `Fast`, but every lookup takes the mapping lock instead of using the cache.
    LockedLookup,
}

/// How an image is served (`extblk serve` flags).
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub read_only: bool,
    /// Longest time between journal commits when no FLUSH forces one.
    pub commit_interval: Duration,
    pub hot_path: HotPath,
    /// Blocks an allocating write claims at least, aligned (a power of two, 1..=256): the holes
    /// of the aligned unit around the request are allocated with it and filled with zeroes in the
    /// same host write, so later writes into the unit are pure overwrites (qcow2's clusters,
    /// ext4's zeroout of short unwritten extents).
    pub alloc_unit: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            read_only: false,
            commit_interval: Duration::from_secs(5),
            hot_path: HotPath::Fast,
            alloc_unit: DEFAULT_ALLOC_UNIT,
        }
    }
}

/// Commits `close` tries for parked work before answering it with an error: parked work needs
/// at most two once first in line (the space rule), so this is generous.
const PARKED_CLOSE_COMMITS: usize = 8;

/// What a restart of parked work started, to hand on without the lock.
#[derive(Default)]
struct Restarted {
    ready: Vec<Allocated>,
    now: Vec<(Done, Result<(), EngineError>)>,
    durable: Vec<Done>,
    redo: Vec<PendingWrite>,
    still: bool,
}

/// The default allocation unit, in blocks (64 KiB: qcow2's default cluster size).
pub const DEFAULT_ALLOC_UNIT: u64 = 16;
/// The largest allocation unit, in blocks (1 MiB: one zero-fill write).
pub const MAX_ALLOC_UNIT: u64 = 256;

/// Engine counters: which path each request took.
#[derive(Default)]
pub struct EngineStats {
    pub fast_reads: AtomicU64,
    pub fast_overwrites: AtomicU64,
    pub allocating_writes: AtomicU64,
    pub deferred_writes: AtomicU64,
    pub journal_handles: AtomicU64,
    pub converted_blocks: AtomicU64,
    /// Blocks allocated around allocating writes to fill their allocation unit (zero-filled).
    pub zero_filled_blocks: AtomicU64,
    pub commits: AtomicU64,
    pub discards: AtomicU64,
    /// Allocating writes that failed for lack of space (never inside the disk's capacity).
    pub enospc: AtomicU64,
    /// Allocating writes that parked because the running transaction reached half the log.
    pub throttled: AtomicU64,
    /// Allocating writes that parked because free space existed only as blocks freed by the
    /// running or committing transaction (allocatable once it commits).
    pub space_waits: AtomicU64,
    /// FUA overwrites completed after a commit because some mapping change was not yet durable.
    pub fua_commits: AtomicU64,
}

impl EngineStats {
    pub fn summary(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "fast_reads={} fast_overwrites={} allocating_writes={} deferred_writes={} journal_handles={} converted_blocks={} zero_filled_blocks={} commits={} zeroing_ops={} enospc={} throttled={} space_waits={} fua_commits={}",
            g(&self.fast_reads),
            g(&self.fast_overwrites),
            g(&self.allocating_writes),
            g(&self.deferred_writes),
            g(&self.journal_handles),
            g(&self.converted_blocks),
            g(&self.zero_filled_blocks),
            g(&self.commits),
            g(&self.discards),
            g(&self.enospc),
            g(&self.throttled),
            g(&self.space_waits),
            g(&self.fua_commits)
        )
    }
}

struct PendingWrite {
    offset: u64,
    bufs: GuestBuffers,
    fua: bool,
    /// Was at the head of the parked queue when it was deferred: it goes back to the head.
    ahead: bool,
    done: Done,
}

enum Work {
    /// A conversion after an allocating write's data I/O, or a DISCARD / WRITE_ZEROES.
    Meta(MetaOp),
    Flush {
        done: Done,
    },
    /// A deferred write whose blocks are no longer being initialised: allocate it again.
    Redo(PendingWrite),
    /// Commit now and report (used by `flush()` at shutdown).
    Sync {
        reply: Sender<Result<(), String>>,
    },
    /// Complete a read or overwrite that is already done (`HotPath::WorkerCompletion` only).
    Complete {
        done: Done,
        result: Result<(), EngineError>,
    },
    /// A parked allocating write, allocated by the committer after a commit: write its data
    /// (positioned I/O), then convert.
    Write(Allocated),
}

/// What the committer completes after its next commit.
enum Waiter {
    /// A FLUSH, or a FUA write or zeroing: complete once durable.
    Done(Done),
    /// `flush()` at shutdown.
    Sync(Sender<Result<(), String>>),
    /// Nothing waits; the log is filling up, or writes are parked until the next commit.
    Nudge,
}

/// State behind the mapping lock.
struct Locked {
    image: Image,
    /// Blocks an allocating write is filling: lblk → writers.
    in_progress: HashMap<u64, u32>,
    deferred: Vec<PendingWrite>,
    /// Work waiting for a commit, in arrival order: allocating writes (the log throttle, or
    /// space that only a commit frees) and conversions or zeroings that found no block for a
    /// tree edit. While any waits, new allocating writes queue behind it. The committer
    /// restarts them after each commit (see `fence.rs`: nobody blocks on a commit).
    parked: VecDeque<Parked>,
    /// Backing ranges freed by the running transaction, to punch once it is durable.
    punch_after_commit: Vec<(u64, u64)>,
    /// The running transaction frees blocks: in-flight I/O that saw them mapped must end before
    /// they can be reused.
    frees_pending: bool,
}

struct Shared {
    state: Mutex<Locked>,
    /// Signalled after every commit. Only the deliberately broken engine of the tests
    /// (`Broken::ThrottleHoldsFence`) waits on it; the real one parks instead.
    committed: Condvar,
    io: Arc<dyn BlockIo>,
    fence: Arc<IoFence>,
    /// Bumped whenever a written mapping is removed or unwritten: invalidates queue caches.
    unmap_seq: AtomicU64,
    /// Bumped (under the mapping lock) by every change to the mapping: allocation, conversion,
    /// zeroing, punch. `durable_seq` is its value at the freeze of the last commit that is
    /// durable: while they differ, some mapping change is not yet durable, and a FUA overwrite
    /// (durable data in a block whose mapping may be that change) must wait for a commit, as
    /// ext4 makes an O_DSYNC write commit the inode's transaction (`i_datasync_tid`).
    meta_seq: AtomicU64,
    durable_seq: AtomicU64,
    info: EngineInfo,
    aborted: AtomicBool,
    stats: EngineStats,
    worker: Mutex<Option<Sender<Work>>>,
    committer: Mutex<Option<Sender<Waiter>>>,
    hot_path: HotPath,
    alloc_unit: u64,
}

/// The image engine. Cheap to clone.
#[derive(Clone)]
pub struct ImageEngine {
    shared: Arc<Shared>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ImageEngine {
    /// Opens `/disk` of the image on `io` and starts the completion worker.
    pub fn open(io: Arc<dyn BlockIo>, opts: EngineOptions) -> Result<ImageEngine, ImageError> {
        let EngineOptions {
            read_only,
            commit_interval,
            hot_path,
            alloc_unit,
        } = opts;
        let alloc_unit = alloc_unit.clamp(1, MAX_ALLOC_UNIT).next_power_of_two();
        let image = Image::open(io.clone(), OpenOptions { read_only })?;
        let sb = image.superblock();
        let rec = image.recovery();
        log::info!(
            "image: {} bytes virtual, {} bytes allocated in {} extents (tree depth {}), journal {} KiB, \
             features compat={:#x} incompat={:#x} ro_compat={:#x}, {}{}",
            image.disk_size(),
            image.tree().data_blocks() * BS,
            image.tree().extent_count(),
            image.tree().depth(),
            image.log_map().blocks() * 4,
            sb.feature_compat,
            sb.feature_incompat,
            sb.feature_ro_compat,
            if read_only { "read-only" } else { "read-write" },
            if rec.transactions > 0 { format!(", replayed {} journal transaction(s)", rec.transactions) } else { String::new() }
        );
        if image.superblock().has_errors() {
            log::warn!("the image has recorded errors (run `extblk check`); serving it anyway, as ext4 mounts with errors=continue");
        }
        let disk_bytes = image.disk_size() - image.disk_size() % 512;
        let info = EngineInfo {
            capacity: Bytes(disk_bytes),
            read_only,
            discard_granularity: BS as u32,
            physical_block_size: BS as u32,
        };
        let (tx, rx) = mpsc::channel();
        let (ctx, crx) = mpsc::channel();
        let shared = Arc::new(Shared {
            committed: Condvar::new(),
            state: Mutex::new(Locked {
                image,
                in_progress: HashMap::new(),
                deferred: Vec::new(),
                parked: VecDeque::new(),
                punch_after_commit: Vec::new(),
                frees_pending: false,
            }),
            io,
            fence: Arc::new(IoFence::default()),
            unmap_seq: AtomicU64::new(0),
            meta_seq: AtomicU64::new(0),
            durable_seq: AtomicU64::new(0),
            info,
            aborted: AtomicBool::new(false),
            stats: EngineStats::default(),
            worker: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(ctx)),
            hot_path,
            alloc_unit,
        });
        let s2 = shared.clone();
        let w = std::thread::Builder::new()
            .name("extblk-worker".into())
            .spawn(move || worker(s2, rx))
            .map_err(ImageError::Io)?;
        let s2 = shared.clone();
        let c = std::thread::Builder::new()
            .name("extblk-commit".into())
            .spawn(move || committer(s2, crx, commit_interval))
            .map_err(ImageError::Io)?;
        Ok(ImageEngine {
            shared,
            threads: Arc::new(Mutex::new(vec![w, c])),
        })
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// Stops the worker and closes the image cleanly (commit, checkpoint, clean superblock).
    pub fn close(&self) -> Result<(), EngineError> {
        self.flush()?;
        // Work parked for a commit (the drain before close may have timed out): a few more
        // commits let it run; what still cannot is answered, never dropped.
        for _ in 0..PARKED_CLOSE_COMMITS {
            if lock(&self.shared.state).parked.is_empty() {
                break;
            }
            self.flush()?;
        }
        // The worker first (it forwards to the committer), then the committer.
        lock(&self.shared.worker).take();
        let mut threads = std::mem::take(&mut *lock(&self.threads));
        if !threads.is_empty() {
            let _ = threads.remove(0).join();
        }
        lock(&self.shared.committer).take();
        for h in threads {
            let _ = h.join();
        }
        self.shared.fail_parked();
        let mut st = lock(&self.shared.state);
        if st.image.is_read_only() || st.image.is_aborted() {
            return Ok(());
        }
        // Close consumes the image: swap in nothing by closing through a checkpoint + clean mark.
        st.image.commit().map_err(to_engine)?;
        st.image.close_in_place().map_err(to_engine)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn to_engine(e: ImageError) -> EngineError {
    match e {
        ImageError::Io(e) => EngineError::Io(e),
        ImageError::NoSpace => EngineError::NoSpace,
        ImageError::ReadOnly => EngineError::ReadOnly,
        other => EngineError::Io(io::Error::other(other.to_string())),
    }
}

impl Shared {
    fn send(&self, w: Work) {
        let tx = lock(&self.worker).clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(w)) = tx.send(w) {
                    self.fail_work(w, "the completion worker is gone");
                }
            }
            None => self.fail_work(w, "the engine is closed"),
        }
    }

    /// Answers work that no worker will run. A conversion or allocated write that never
    /// finishes must still unmark its blocks, or writes deferred behind them would wait for ever.
    fn fail_work(&self, w: Work, why: &str) {
        let runs = match &w {
            Work::Meta(MetaOp::Convert { runs, .. }) => Some(runs.clone()),
            Work::Write(a) => Some(a.to_convert.clone()),
            _ => None,
        };
        fail_work(w, why);
        if let Some(runs) = runs {
            let mut st = lock(&self.state);
            unmark(&mut st, &runs);
            let ready = take_ready(&mut st);
            drop(st);
            for p in ready {
                p.done
                    .finish(Err(EngineError::Io(io::Error::other(why.to_string()))));
            }
        }
    }

    /// Completes a read or pure overwrite: here, on the queue thread, unless the seed's
    /// experiment sends it through the worker.
    fn complete_fast<C: Completion>(&self, done: C, result: Result<(), EngineError>) {
        if self.hot_path == HotPath::WorkerCompletion {
            self.send(Work::Complete {
                done: Box::new(done),
                result,
            });
        } else {
            done.complete(result);
        }
    }

    fn to_committer(&self, w: Waiter) {
        let tx = lock(&self.committer).clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(w)) = tx.send(w) {
                    answer(w, Err("the committer is gone".into()));
                }
            }
            None => answer(w, Err("the engine is closed".into())),
        }
    }

    /// Commits the running transaction; see the module comment. Only the committer thread
    /// calls this while the engine runs, so commits never overlap. `durable`: a waiter needs
    /// the data durable even when there is no metadata to journal. Afterwards, under the same
    /// lock that makes the commit's frees allocatable, the parked allocating writes start again
    /// in arrival order; returns whether some are still parked after a commit that wrote
    /// something (the caller commits again at once).
    fn commit(&self, durable: bool) -> Result<bool, String> {
        if self.info.read_only {
            return Ok(false);
        }
        if self.aborted.load(Ordering::Acquire) {
            self.fail_parked();
            return Err("the journal was aborted".into());
        }
        let frozen;
        let (prepared, punches, frees) = {
            let mut st = lock(&self.state);
            frozen = self.meta_seq.load(Ordering::Acquire);
            match st.image.commit_prepare() {
                Ok(p) => (
                    p,
                    std::mem::take(&mut st.punch_after_commit),
                    std::mem::take(&mut st.frees_pending),
                ),
                Err(e) => {
                    let e = self.commit_failed(&mut st, e);
                    drop(st);
                    self.committed.notify_all();
                    self.fail_parked();
                    return Err(e);
                }
            }
        };
        if prepared.is_none() && !durable {
            // Nothing was committed, so nothing new became free: what stays parked waits for
            // the next nudge or the interval rather than a busy loop of empty commits.
            self.restart_parked();
            return Ok(false);
        }
        if frees {
            // No I/O that saw the old mapping may still touch the blocks about to be reused.
            // Ends: see fence.rs (nobody holding a guard waits for this thread).
            self.fence.wait_prior();
        }
        let written = match &prepared {
            Some(w) => w.write(&*self.io),
            // Nothing to journal: FLUSH still needs the data durable.
            None => self.io.flush(),
        };
        if written.is_ok() {
            for (p, l) in punches {
                if let Err(e) = self.io.punch(p * BS, l * BS) {
                    log::warn!("cannot deallocate blocks {p}+{l} in the backing: {e}");
                }
            }
        }
        let mut st = lock(&self.state);
        let r = match prepared {
            Some(_) => st.image.commit_finish(written),
            None => written.map_err(ImageError::Io),
        };
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let r = r.map_err(|e| self.commit_failed(&mut st, e));
        if r.is_ok() {
            // Every mapping change made before the freeze is durable now (in this transaction or
            // an earlier one).
            self.durable_seq.fetch_max(frozen, Ordering::AcqRel);
        }
        // Parked work first, under this same guard: nothing else takes the freed blocks first.
        let restarted = r.is_ok().then(|| self.restart_locked(&mut st));
        drop(st);
        self.committed.notify_all();
        match (r, restarted) {
            (Ok(()), Some(restarted)) => Ok(self.dispatch(restarted)),
            (Ok(()), None) => Ok(false),
            (Err(e), _) => {
                self.fail_parked();
                Err(e)
            }
        }
    }

    /// Restarts parked work, oldest first, until one must park again: allocating writes are
    /// allocated here (their data I/O goes to the worker), conversions and zeroings run here.
    /// Returns whether work is still parked.
    fn restart_parked(&self) -> bool {
        let mut st = lock(&self.state);
        let r = self.restart_locked(&mut st);
        drop(st);
        self.dispatch(r)
    }

    /// The part of [`Shared::restart_parked`] under the lock. The committer calls it with the
    /// same guard under which the commit's frees became allocatable, so the oldest waiter has
    /// first pick of them.
    fn restart_locked(&self, st: &mut Locked) -> Restarted {
        let mut r = Restarted::default();
        while let Some(p) = st.parked.pop_front() {
            match p {
                Parked::Write(w) => match self.alloc_locked(st, w) {
                    Step::Go(a) => r.ready.push(a),
                    Step::Later => {
                        // Deferred behind a write initialising its blocks: it keeps its place
                        // at the head once redone (begin_alloc sees `ahead`).
                        if let Some(w) = st.deferred.last_mut() {
                            w.ahead = true;
                        }
                    }
                    Step::Park(w) => {
                        st.parked.push_front(Parked::Write(w));
                        break;
                    }
                    Step::Fail(w, e) => r.now.push((w.done, Err(e))),
                },
                Parked::Meta(op) => match self.run_meta(st, op) {
                    MetaEnd::Now(d, res) => r.now.push((d, res)),
                    MetaEnd::Durable(d) => r.durable.push(d),
                    MetaEnd::Park(op) => {
                        st.parked.push_front(Parked::Meta(op));
                        break;
                    }
                },
            }
        }
        r.still = !st.parked.is_empty();
        r.redo = take_ready(st);
        r
    }

    /// Hands on what [`Shared::restart_locked`] started, without the lock.
    fn dispatch(&self, r: Restarted) -> bool {
        for a in r.ready {
            self.send(Work::Write(a));
        }
        for (d, res) in r.now {
            d.finish(res);
        }
        for d in r.durable {
            self.to_committer(Waiter::Done(d));
        }
        for w in r.redo {
            self.send(Work::Redo(w));
        }
        r.still
    }

    /// The journal is gone (or the engine closes): parked work can never run. Deferred writes
    /// are failed with it, and the blocks of parked conversions unmarked, so nothing waits for
    /// an initialisation that will never finish.
    fn fail_parked(&self) {
        let (parked, deferred) = {
            let mut st = lock(&self.state);
            let parked = std::mem::take(&mut st.parked);
            for p in &parked {
                if let Parked::Meta(MetaOp::Convert { runs, .. }) = p {
                    unmark(&mut st, runs);
                }
            }
            (parked, std::mem::take(&mut st.deferred))
        };
        let e = || EngineError::Io(io::Error::other("the journal was aborted after an error"));
        for p in parked {
            p.fail(e());
        }
        for w in deferred {
            w.done.finish(Err(e()));
        }
    }

    /// A conversion or zeroing, under the mapping lock. Either may split an extent and need a
    /// tree block; when none is free but frees wait for a commit, it parks (the space rule).
    fn run_meta(&self, st: &mut Locked, op: MetaOp) -> MetaEnd {
        self.meta_seq.fetch_add(1, Ordering::AcqRel);
        let no_space = |r: &Result<(), EngineError>, st: &Locked| {
            matches!(r, Err(EngineError::NoSpace)) && st.image.space_pending()
        };
        match op {
            MetaOp::Convert { runs, fua, done } => {
                let mut r = Ok(());
                for &(l, n, p) in &runs {
                    // Runs converted before a failure stay converted: converting is idempotent,
                    // so the retry redoes only what is left.
                    match st.image.convert_exact(l, n, p) {
                        Ok(c) => {
                            self.stats.converted_blocks.fetch_add(c, Ordering::Relaxed);
                        }
                        Err(e) => {
                            r = Err(to_engine(e));
                            break;
                        }
                    }
                }
                if no_space(&r, st) {
                    self.stats.space_waits.fetch_add(1, Ordering::Relaxed);
                    return MetaEnd::Park(MetaOp::Convert { runs, fua, done });
                }
                unmark(st, &runs);
                match r {
                    Ok(()) if fua => MetaEnd::Durable(done),
                    r => MetaEnd::Now(done, r),
                }
            }
            MetaOp::Zero {
                ranges,
                discard,
                fua,
                done,
            } => {
                // Punching or zeroing again what was done before a failure is a no-op.
                let r = self
                    .writable()
                    .and_then(|_| self.zero_ranges(st, &ranges, discard));
                if no_space(&r, st) {
                    self.stats.space_waits.fetch_add(1, Ordering::Relaxed);
                    return MetaEnd::Park(MetaOp::Zero {
                        ranges,
                        discard,
                        fua,
                        done,
                    });
                }
                match r {
                    Ok(()) if fua => MetaEnd::Durable(done),
                    r => MetaEnd::Now(done, r),
                }
            }
        }
    }

    fn commit_failed(&self, st: &mut Locked, e: ImageError) -> String {
        log::error!("journal commit failed: {e}");
        self.abort(st, &io::Error::other(e.to_string()), 0);
        e.to_string()
    }

    /// Aborts the journal after a failed data write (data_err=abort).
    fn abort(&self, st: &mut Locked, e: &io::Error, pblk: u64) {
        // Allocating writes throttled for a commit must see the abort.
        self.committed.notify_all();
        if !self.aborted.swap(true, Ordering::AcqRel) {
            log::error!("data write to block {pblk} failed ({e}): aborting the journal; writes will fail from now on");
        }
        if !st.image.is_read_only() {
            if let Err(e2) = st.image.abort(
                e.raw_os_error().unwrap_or(libc::EIO),
                "extblk_write_data",
                pblk,
            ) {
                log::error!("cannot record the abort in the image: {e2}");
            }
        }
    }

    fn writable(&self) -> Result<(), EngineError> {
        if self.info.read_only {
            return Err(EngineError::ReadOnly);
        }
        if self.aborted.load(Ordering::Acquire) {
            return Err(EngineError::Io(io::Error::other(
                "the journal was aborted after a data write error",
            )));
        }
        Ok(())
    }

    /// The first half of an allocating write: under the mapping lock, allocate every hole of
    /// the request (and of its allocation unit) as unwritten extents and mark the blocks in
    /// progress. Returns the allocation, holding a fence guard, ready for its data I/O; or
    /// `None` when the request was deferred (it touches blocks another write is initialising),
    /// parked until a commit, or already failed. Never waits for a commit (see fence.rs).
    fn begin_alloc(self: &Arc<Self>, w: PendingWrite) -> Option<Allocated> {
        if let Err(e) = self.writable() {
            w.done.finish(Err(e));
            return None;
        }
        let mut st = lock(&self.state);
        if broken!(ThrottleHoldsFence) {
            // Deliberately wrong (tests only): the old throttle, waiting for a commit on this
            // thread while guards of its own unsubmitted I/O hold the committer up.
            while st.image.log_nearly_full() && !self.aborted.load(Ordering::Acquire) {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                self.to_committer(Waiter::Nudge);
                st = self.committed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        // Writes already waiting for a commit go first: a later write must not take the space
        // (or the log room) they wait for. This is what bounds a write's wait (architecture.md,
        // "The space rule").
        let step = if st.parked.is_empty() || w.ahead {
            self.alloc_locked(&mut st, w)
        } else {
            Step::Park(w)
        };
        match step {
            Step::Go(a) => Some(a),
            Step::Later => None,
            Step::Park(w) => {
                if w.ahead {
                    st.parked.push_front(Parked::Write(w));
                } else {
                    st.parked.push_back(Parked::Write(w));
                }
                drop(st);
                self.to_committer(Waiter::Nudge);
                None
            }
            Step::Fail(w, e) => {
                drop(st);
                w.done.finish(Err(e));
                None
            }
        }
    }

    /// The allocation itself, under the mapping lock.
    fn alloc_locked(&self, st: &mut Locked, w: PendingWrite) -> Step {
        if let Err(e) = self.writable() {
            return Step::Fail(w, e);
        }
        // The running transaction has reached half the log: it must not grow until a commit
        // has made room (jbd2's start_this_handle), or it could outgrow the log and abort.
        if st.image.log_nearly_full() {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            return Step::Park(w);
        }
        let (b0, b1) = blocks_of(w.offset, w.bufs.len() as u64);
        if (b0..b1).any(|b| st.in_progress.contains_key(&b)) {
            self.stats.deferred_writes.fetch_add(1, Ordering::Relaxed);
            st.deferred.push(w);
            return Step::Later;
        }
        // Entered under the lock, with the allocation: a discard of these blocks that follows
        // cannot let them be reused before this write's data has landed.
        let guard = self.fence.enter();
        // The holes of the whole allocation unit around the request, if there is room for them.
        let unit = self.alloc_unit;
        let (c0, c1) = (b0 / unit * unit, b1.div_ceil(unit) * unit);
        let c1 = c1.min(st.image.disk_blocks()).max(b1);
        let mut alloc = st.image.allocate(c0, c1 - c0);
        if matches!(alloc, Err(ImageError::NoSpace)) && (c0, c1) != (b0, b1) {
            alloc = st.image.allocate(b0, b1 - b0);
        }
        let new = match alloc {
            Ok(new) => new,
            Err(ImageError::NoSpace) if st.image.space_pending() => {
                // Blocks freed by the running or committing transaction become free once it
                // commits: wait for that, however many commits it takes.
                self.stats.space_waits.fetch_add(1, Ordering::Relaxed);
                return Step::Park(w);
            }
            Err(ImageError::NoSpace) => {
                self.stats.enospc.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "no free block for a write at byte {} although nothing is waiting to be freed",
                    w.offset
                );
                return Step::Fail(w, EngineError::NoSpace);
            }
            Err(e) => return Step::Fail(w, to_engine(e)),
        };
        self.stats.journal_handles.fetch_add(1, Ordering::Relaxed);
        self.stats.allocating_writes.fetch_add(1, Ordering::Relaxed);
        if broken!(ConvertBeforeWrite) {
            // Deliberately wrong (tests only): written, and committed, before the data exists.
            let _ = st.image.convert(b0, b1 - b0);
            let _ = st.image.commit();
        }
        let runs: Vec<Extent> = st.image.tree().range(b0 as u32, b1 as u32);
        let mut to_convert = Vec::new();
        for e in runs.iter().filter(|e| e.unwritten) {
            to_convert.push((u64::from(e.lblk), u64::from(e.len), e.pblk));
        }
        // Blocks of the unit outside the request that this write allocated: zeroes go there in
        // the same host write, and they are converted with the request's blocks. Other writes
        // touching them wait (in progress) until then, and then find them written.
        let mut fill = Vec::new();
        for e in &new {
            for (lo, hi) in [(c0, b0), (b1, c1)] {
                let (s, t) = (u64::from(e.lblk).max(lo), e.end().min(hi));
                if s < t {
                    let x = Extent {
                        lblk: s as u32,
                        len: (t - s) as u32,
                        pblk: e.pblk + (s - u64::from(e.lblk)),
                        unwritten: true,
                    };
                    to_convert.push((s, t - s, x.pblk));
                    fill.push(x);
                }
            }
        }
        mark(st, &to_convert);
        self.meta_seq.fetch_add(1, Ordering::AcqRel);
        let filled: u64 = fill.iter().map(|e| u64::from(e.len)).sum();
        self.stats
            .zero_filled_blocks
            .fetch_add(filled, Ordering::Relaxed);
        Step::Go(Allocated {
            w,
            runs,
            fill,
            to_convert,
            guard,
        })
    }

    /// The second half, once the data is on disk (or failed): hand the conversion to the worker,
    /// or undo and report.
    fn end_alloc(self: &Arc<Self>, a: AllocatedDone, result: Result<(), (io::Error, u64)>) {
        drop(a.guard);
        match result {
            Ok(()) => self.send(Work::Meta(MetaOp::Convert {
                runs: a.to_convert,
                fua: a.fua,
                done: a.done,
            })),
            Err((e, at)) => {
                let pblk = at / BS;
                let mut st = lock(&self.state);
                unmark(&mut st, &a.to_convert);
                let enospc = e.raw_os_error() == Some(libc::ENOSPC);
                if enospc {
                    // The host filesystem under a sparse image is full: fail this request only.
                    self.stats.enospc.fetch_add(1, Ordering::Relaxed);
                    log::warn!("no space in the host filesystem for block {pblk}: {e}");
                } else {
                    self.abort(&mut st, &e, pblk);
                }
                let redo = take_ready(&mut st);
                drop(st);
                a.done.finish(Err(if enospc {
                    EngineError::NoSpace
                } else {
                    EngineError::Io(e)
                }));
                for p in redo {
                    self.write_slow(p);
                }
            }
        }
    }

    /// The allocating write with positioned I/O (backings without an io_uring, deferred writes).
    fn write_slow(self: &Arc<Self>, w: PendingWrite) {
        if let Some(a) = self.begin_alloc(w) {
            self.write_allocated(a);
        }
    }

    /// The data I/O of an allocated write, as positioned I/O on this thread, then its end.
    fn write_allocated(self: &Arc<Self>, a: Allocated) {
        let mut result = Ok(());
        for op in alloc_ops(&a) {
            if let Err(e) = self.io.writev_at(&op.iovs, op.offset, op.dsync) {
                result = Err((e, op.offset));
                break;
            }
        }
        let (rest, _bufs) = a.into_done();
        self.end_alloc(rest, result);
    }

    fn zero_ranges(
        &self,
        st: &mut Locked,
        ranges: &[ZeroRange],
        discard: bool,
    ) -> Result<(), EngineError> {
        for r in ranges {
            let (s, t) = (r.range.offset.0, r.range.offset.0 + r.range.len.0);
            let (fs, ft) = (s.div_ceil(BS), t / BS);
            if fs < ft {
                if discard || r.unmap {
                    let freed = st.image.punch(fs, ft - fs).map_err(to_engine)?;
                    if !freed.is_empty() {
                        st.frees_pending = true;
                        st.punch_after_commit.extend(freed);
                    }
                } else {
                    st.image.zero(fs, ft - fs).map_err(to_engine)?;
                }
                self.unmap_seq.fetch_add(1, Ordering::AcqRel);
            }
            if discard {
                continue; // partial blocks of a discard: advisory, nothing to do
            }
            // Partial blocks of WRITE_ZEROES must read as zero: overwrite their written parts.
            let mut parts = Vec::new();
            if fs > ft {
                parts.push((s, t));
            } else {
                if s < fs * BS {
                    parts.push((s, fs * BS));
                }
                if t > ft * BS && ft * BS >= s {
                    parts.push((ft * BS, t));
                }
            }
            for (a, b) in parts {
                if let Lookup::Mapped(e) = st.image.lookup((a / BS) as u32) {
                    if !e.unwritten {
                        let at = e.pblk * BS + a % BS;
                        self.io
                            .write_at(&ZERO_PAGE.0[..(b - a) as usize], at)
                            .map_err(EngineError::Io)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
    (offset / BS, (offset + len).div_ceil(BS))
}

/// Metadata work of the worker that may need a new tree block.
enum MetaOp {
    /// Data of an allocating write is on disk: convert `(lblk, len, pblk)` runs, then complete.
    Convert {
        runs: Vec<(u64, u64, u64)>,
        fua: bool,
        done: Done,
    },
    /// DISCARD, or WRITE_ZEROES with or without unmap.
    Zero {
        ranges: Vec<ZeroRange>,
        discard: bool,
        fua: bool,
        done: Done,
    },
}

/// How a [`MetaOp`] ended.
enum MetaEnd {
    /// Complete now with this result.
    Now(Done, Result<(), EngineError>),
    /// Complete once the next commit is durable (FUA).
    Durable(Done),
    /// No free block, but blocks wait for a commit to be freed: retry after it.
    Park(MetaOp),
}

/// Work waiting in `Locked::parked` for a commit.
enum Parked {
    Write(PendingWrite),
    Meta(MetaOp),
}

impl Parked {
    fn fail(self, e: EngineError) {
        match self {
            Parked::Write(w) => w.done.finish(Err(e)),
            Parked::Meta(MetaOp::Convert { done, .. } | MetaOp::Zero { done, .. }) => {
                done.finish(Err(e))
            }
        }
    }
}

/// What [`Shared::alloc_locked`] decided for an allocating write.
enum Step {
    /// Allocated: write the data.
    Go(Allocated),
    /// Deferred behind a write initialising some of its blocks; redone after that one.
    Later,
    /// Must wait for a commit: queue it in `Locked::parked`.
    Park(PendingWrite),
    /// Fails with this error.
    Fail(PendingWrite, EngineError),
}

/// An allocating write between allocation and data I/O.
struct Allocated {
    w: PendingWrite,
    runs: Vec<Extent>,
    /// New blocks around the request, to fill with zeroes.
    fill: Vec<Extent>,
    to_convert: Vec<(u64, u64, u64)>,
    /// Keeps the blocks from reuse until the data I/O has ended.
    guard: FenceGuard,
}

impl Allocated {
    /// Splits off what the end of the write needs; the buffers must outlive its data I/O.
    fn into_done(self) -> (AllocatedDone, GuestBuffers) {
        let Allocated {
            w,
            to_convert,
            guard,
            ..
        } = self;
        (
            AllocatedDone {
                to_convert,
                fua: w.fua,
                done: w.done,
                guard,
            },
            w.bufs,
        )
    }
}

/// What remains of an allocating write once its data I/O is under way.
struct AllocatedDone {
    to_convert: Vec<(u64, u64, u64)>,
    fua: bool,
    done: Done,
    guard: FenceGuard,
}

/// A zero block aligned for any direct I/O, for padding partial new blocks.
#[repr(C, align(4096))]
struct ZeroPage([u8; 4096]);
static ZERO_PAGE: ZeroPage = ZeroPage([0; 4096]);

/// Zeroes for filling a whole allocation unit in one write (never written to, so the kernel
/// backs it with its shared zero page until read).
#[repr(C, align(4096))]
struct ZeroUnit([u8; (MAX_ALLOC_UNIT * BS) as usize]);
static ZERO_UNIT: ZeroUnit = ZeroUnit([0; (MAX_ALLOC_UNIT * BS) as usize]);

/// The data writes of an allocating request, with the zero fill of its unit: a piece that
/// starts where another ends on disk joins it, so a request and its fill are one host write
/// (one allocation in a sparse backing).
fn alloc_ops(a: &Allocated) -> Vec<uring::Op> {
    let mut ops = run_ops(&a.runs, &a.w);
    if a.fill.is_empty() {
        return ops;
    }
    for e in &a.fill {
        let mut left = u64::from(e.len) * BS;
        let mut at = e.pblk * BS;
        while left > 0 {
            let n = left.min(MAX_ALLOC_UNIT * BS);
            ops.push(uring::Op {
                iovs: vec![libc::iovec {
                    iov_base: ZERO_UNIT.0.as_ptr() as *mut _,
                    iov_len: n as usize,
                }],
                offset: at,
                write: true,
                dsync: false,
            });
            at += n;
            left -= n;
        }
    }
    ops.sort_by_key(|op| op.offset);
    let mut out: Vec<uring::Op> = Vec::with_capacity(ops.len());
    for op in ops {
        if let Some(last) = out.last_mut() {
            let last_end = last.offset + last.iovs.iter().map(|v| v.iov_len as u64).sum::<u64>();
            if last_end == op.offset
                && last.dsync == op.dsync
                && last.iovs.len() + op.iovs.len() <= iov::MAX_IOVS
            {
                last.iovs.extend(op.iovs);
                continue;
            }
        }
        out.push(op);
    }
    out
}

/// The data writes of a request over its mapped runs. Unwritten (new) blocks get zero padding
/// around a partial write, so the rest of the block reads as zero once converted; written
/// blocks take just the guest's bytes (durable at once with FUA).
fn run_ops(runs: &[Extent], w: &PendingWrite) -> Vec<uring::Op> {
    let (start, end) = (w.offset, w.offset + w.bufs.len() as u64);
    let mut ops = Vec::with_capacity(runs.len());
    for e in runs {
        let (rs, re) = (u64::from(e.lblk) * BS, e.end() * BS);
        let (s, t) = (start.max(rs), end.min(re));
        if s >= t {
            continue;
        }
        let mut iovs = iov::slice(w.bufs.iovecs(), (s - start) as usize, (t - s) as usize);
        let mut at = e.pblk * BS + (s - rs);
        if e.unwritten {
            let head = s % BS;
            let tail = (BS - t % BS) % BS;
            if head > 0 {
                iovs.insert(
                    0,
                    libc::iovec {
                        iov_base: ZERO_PAGE.0.as_ptr() as *mut _,
                        iov_len: head as usize,
                    },
                );
                at -= head;
            }
            if tail > 0 {
                iovs.push(libc::iovec {
                    iov_base: ZERO_PAGE.0.as_ptr() as *mut _,
                    iov_len: tail as usize,
                });
            }
        }
        ops.push(uring::Op {
            iovs,
            offset: at,
            write: true,
            dsync: w.fua && !e.unwritten,
        });
    }
    ops
}

/// Marks the blocks of `(lblk, len, pblk)` runs as being initialised by one more write.
fn mark(st: &mut Locked, runs: &[(u64, u64, u64)]) {
    for &(l, n, _) in runs {
        for b in l..l + n {
            *st.in_progress.entry(b).or_insert(0) += 1;
        }
    }
}

fn unmark(st: &mut Locked, runs: &[(u64, u64, u64)]) {
    for &(l, n, _) in runs {
        for b in l..l + n {
            if let Some(c) = st.in_progress.get_mut(&b) {
                *c -= 1;
                if *c == 0 {
                    st.in_progress.remove(&b);
                }
            }
        }
    }
}

/// Deferred writes whose blocks are no longer being initialised.
fn take_ready(st: &mut Locked) -> Vec<PendingWrite> {
    let mut ready = Vec::new();
    let mut keep = Vec::new();
    for w in st.deferred.drain(..) {
        let (b0, b1) = blocks_of(w.offset, w.bufs.len() as u64);
        if (b0..b1).any(|b| st.in_progress.contains_key(&b)) {
            keep.push(w);
        } else {
            ready.push(w);
        }
    }
    st.deferred = keep;
    ready
}

fn fail_work(w: Work, why: &str) {
    let e = || EngineError::Io(io::Error::other(why.to_string()));
    match w {
        Work::Meta(MetaOp::Convert { done, .. } | MetaOp::Zero { done, .. })
        | Work::Flush { done } => done.finish(Err(e())),
        Work::Redo(w) => w.done.finish(Err(e())),
        Work::Sync { reply } => {
            let _ = reply.send(Err(why.to_string()));
        }
        Work::Complete { done, result } => done.finish(result),
        Work::Write(a) => {
            let (rest, _bufs) = a.into_done();
            rest.done.finish(Err(e()));
        }
    }
}

fn answer(w: Waiter, r: Result<(), String>) {
    match w {
        Waiter::Done(d) => d.finish(r.map_err(|e| EngineError::Io(io::Error::other(e)))),
        Waiter::Sync(reply) => {
            let _ = reply.send(r);
        }
        Waiter::Nudge => {}
    }
}

/// The completion worker: conversions, flushes, discards and zeroing, in arrival order. What
/// must be durable before it completes goes to the committer after the batch, so the commit
/// that serves it includes every conversion before it.
fn worker(s: Arc<Shared>, rx: Receiver<Work>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut st = lock(&s.state);
        let mut done_now: Vec<(Done, Result<(), EngineError>)> = Vec::new();
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut writes: Vec<Allocated> = Vec::new();
        let mut redo_now: Vec<PendingWrite> = Vec::new();
        for w in batch {
            match w {
                Work::Meta(op) => {
                    if let MetaOp::Zero { .. } = op {
                        s.stats.discards.fetch_add(1, Ordering::Relaxed);
                        s.stats.journal_handles.fetch_add(1, Ordering::Relaxed);
                    }
                    match s.run_meta(&mut st, op) {
                        MetaEnd::Now(d, r) => done_now.push((d, r)),
                        MetaEnd::Durable(d) => waiters.push(Waiter::Done(d)),
                        MetaEnd::Park(op) => {
                            st.parked.push_back(Parked::Meta(op));
                            waiters.push(Waiter::Nudge);
                        }
                    }
                }
                Work::Flush { done } => waiters.push(Waiter::Done(done)),
                Work::Redo(w) => redo_now.push(w),
                Work::Sync { reply } => waiters.push(Waiter::Sync(reply)),
                Work::Complete { done, result } => done_now.push((done, result)),
                Work::Write(a) => writes.push(a),
            }
        }
        if waiters.is_empty() && st.image.should_commit() {
            waiters.push(Waiter::Nudge);
        }
        let redo = take_ready(&mut st);
        drop(st);
        // One batch for the run (Completion::batch): each queue is notified once.
        let batch = done_now.first().map(|(d, _)| d.batch());
        for (d, r) in done_now {
            d.finish(r);
        }
        drop(batch);
        for w in waiters {
            s.to_committer(w);
        }
        for w in redo {
            s.write_slow(w);
        }
        for a in writes {
            s.write_allocated(a);
        }
        for w in redo_now {
            s.write_slow(w);
        }
    }
}

/// The committer: one commit for everything waiting, on demand, every `interval`, and when the
/// log fills up.
fn committer(s: Arc<Shared>, rx: Receiver<Waiter>, interval: Duration) {
    let mut last_commit = Instant::now();
    // Writes are still parked after the last commit: commit again at once.
    let mut again = false;
    loop {
        let timeout = interval
            .saturating_sub(last_commit.elapsed())
            .max(Duration::from_millis(1));
        let first = if again {
            rx.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            rx.recv_timeout(timeout)
        };
        let mut waiters = match first {
            Ok(w) => vec![w],
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let durable = waiters
            .iter()
            .any(|w| matches!(w, Waiter::Done(_) | Waiter::Sync(_)));
        let r = s.commit(durable);
        last_commit = Instant::now();
        again = matches!(r, Ok(true));
        let r = r.map(|_| ());
        {
            let _batch = waiters.iter().find_map(|w| match w {
                Waiter::Done(d) => Some(d.batch()),
                _ => None,
            });
            for w in waiters {
                answer(w, r.clone());
            }
        }
    }
}

/// A queue thread's side: its cache of written extents and its io_uring.
pub struct ImageQueue<C> {
    shared: Arc<Shared>,
    cache: Vec<Extent>,
    cache_seq: u64,
    ring: Option<Ring<Flight<C>>>,
}

/// A request whose data I/O is on the ring.
enum Flight<C> {
    Read {
        done: C,
        _bufs: GuestBuffers,
        guard: FenceGuard,
    },
    Overwrite {
        done: C,
        _bufs: GuestBuffers,
        guard: FenceGuard,
        fua: bool,
    },
    Alloc {
        rest: AllocatedDone,
        _bufs: GuestBuffers,
    },
}

/// Where a request's bytes go: the written runs (as operations) and the ranges that read as zero.
struct Plan {
    ops: Vec<uring::Op>,
    zero: Vec<(u64, u64)>,
}

impl<C: Completion> ImageQueue<C> {
    /// The written extent covering `lblk` from the cache, or from the tree under the lock.
    fn written_at(&mut self, lblk: u64) -> Result<Extent, Lookup> {
        let seq = self.shared.unmap_seq.load(Ordering::Acquire);
        if seq != self.cache_seq {
            self.cache.clear();
            self.cache_seq = seq;
        }
        if let Some(e) = self
            .cache
            .iter()
            .find(|e| u64::from(e.lblk) <= lblk && lblk < e.end())
            .filter(|_| self.shared.hot_path != HotPath::LockedLookup)
        {
            return Ok(*e);
        }
        let found = lock(&self.shared.state).image.lookup(lblk as u32);
        match found {
            Lookup::Mapped(e) if !e.unwritten => {
                if self.cache.len() >= 64 {
                    self.cache.remove(0);
                }
                self.cache.push(e);
                Ok(e)
            }
            other => Err(other),
        }
    }

    /// Maps a request. For a write, `None` if some block is not written (the allocating path).
    fn plan(&mut self, offset: u64, bufs: &GuestBuffers, write: bool, fua: bool) -> Option<Plan> {
        let end = offset + bufs.len() as u64;
        let mut plan = Plan {
            ops: Vec::new(),
            zero: Vec::new(),
        };
        let mut pos = offset;
        while pos < end {
            let lblk = pos / BS;
            let (run_end, pblk) = match self.written_at(lblk) {
                Ok(e) => (e.end() * BS, Some(e.pblk + (lblk - u64::from(e.lblk)))),
                Err(_) if write => return None,
                Err(Lookup::Mapped(e)) => (e.end() * BS, None),
                Err(Lookup::Hole { len }) => ((lblk + len) * BS, None),
            };
            let n = run_end.min(end) - pos;
            match pblk {
                Some(p) => plan.ops.push(uring::Op {
                    iovs: iov::slice(bufs.iovecs(), (pos - offset) as usize, n as usize),
                    offset: p * BS + pos % BS,
                    write,
                    dsync: fua,
                }),
                None => plan.zero.push((pos - offset, n)),
            }
            pos += n;
        }
        Some(plan)
    }

    /// Plans a read or an overwrite and enters the fence with a mapping still valid: if a
    /// discard unmapped written blocks between the lookup and the fence, look up again.
    fn plan_fenced(
        &mut self,
        offset: u64,
        bufs: &GuestBuffers,
        write: bool,
        fua: bool,
    ) -> Option<(Plan, FenceGuard)> {
        loop {
            let seq = self.shared.unmap_seq.load(Ordering::Acquire);
            let plan = self.plan(offset, bufs, write, fua)?;
            let guard = self.shared.fence.enter();
            if self.shared.unmap_seq.load(Ordering::Acquire) == seq {
                return Some((plan, guard));
            }
        }
    }

    fn finish(&mut self, f: Flight<C>, r: Result<(), (io::Error, u64)>) {
        let sh = self.shared.clone();
        match f {
            Flight::Read { done, guard, .. } => {
                drop(guard);
                if r.is_ok() {
                    sh.stats.fast_reads.fetch_add(1, Ordering::Relaxed);
                }
                sh.complete_fast(done, r.map_err(|(e, _)| EngineError::Io(e)));
            }
            Flight::Overwrite {
                done, guard, fua, ..
            } => {
                drop(guard);
                if let Err((e, at)) = &r {
                    if e.raw_os_error() != Some(libc::ENOSPC) {
                        let mut st = lock(&sh.state);
                        sh.abort(&mut st, e, at / BS);
                    }
                } else {
                    sh.stats.fast_overwrites.fetch_add(1, Ordering::Relaxed);
                    if fua
                        && sh.meta_seq.load(Ordering::Acquire)
                            != sh.durable_seq.load(Ordering::Acquire)
                    {
                        // The data is durable, its mapping perhaps not yet: complete after the
                        // next commit.
                        sh.stats.fua_commits.fetch_add(1, Ordering::Relaxed);
                        sh.to_committer(Waiter::Done(Box::new(done)));
                        return;
                    }
                }
                sh.complete_fast(done, r.map_err(|(e, _)| EngineError::Io(e)));
            }
            Flight::Alloc { rest, .. } => sh.end_alloc(rest, r),
        }
    }

    fn start(&mut self, ops: Vec<uring::Op>, f: Flight<C>) {
        let mut finished = Vec::new();
        // With O_DIRECT, only aligned requests may go to the ring; the rest use the page cache.
        let direct_ok = !self.shared.io.direct_io()
            || ops
                .iter()
                .all(|op| iov::aligned(&op.iovs, op.offset, DIRECT_ALIGN));
        match self.ring.as_mut().filter(|_| direct_ok) {
            Some(ring) => ring.start(ops, f, &mut finished),
            None => {
                // Positioned I/O through the backing's trait (recording, fault injection).
                let mut r = Ok(());
                for op in &ops {
                    let res = if op.write {
                        self.shared.io.writev_at(&op.iovs, op.offset, op.dsync)
                    } else {
                        self.shared.io.readv_at(&op.iovs, op.offset)
                    };
                    if let Err(e) = res {
                        r = Err((e, op.offset));
                        break;
                    }
                }
                finished.push((f, r));
            }
        }
        for (f, r) in finished {
            self.finish(f, r);
        }
    }
}

impl<C: Completion> EngineQueue<C> for ImageQueue<C> {
    fn submit(&mut self, op: EngineOp, done: C) {
        let sh = self.shared.clone();
        match op {
            EngineOp::Read { offset, bufs } => {
                let Some((plan, guard)) = self.plan_fenced(offset.0, &bufs, false, false) else {
                    return done.complete(Err(EngineError::Unsupported(
                        "unreachable: reads always plan",
                    )));
                };
                for (o, n) in &plan.zero {
                    iov::zero(&iov::slice(bufs.iovecs(), *o as usize, *n as usize));
                }
                self.start(
                    plan.ops,
                    Flight::Read {
                        done,
                        _bufs: bufs,
                        guard,
                    },
                );
            }
            EngineOp::Write { offset, bufs, fua } => {
                if let Err(e) = sh.writable() {
                    return done.complete(Err(e));
                }
                match self.plan_fenced(offset.0, &bufs, true, fua) {
                    Some((plan, guard)) => self.start(
                        plan.ops,
                        Flight::Overwrite {
                            done,
                            _bufs: bufs,
                            guard,
                            fua,
                        },
                    ),
                    None => {
                        let w = PendingWrite {
                            offset: offset.0,
                            bufs,
                            fua,
                            done: Box::new(done),
                            ahead: false,
                        };
                        let Some(a) = sh.begin_alloc(w) else { return };
                        let ops = alloc_ops(&a);
                        let (rest, bufs) = a.into_done();
                        self.start(ops, Flight::Alloc { rest, _bufs: bufs });
                    }
                }
            }
            EngineOp::Flush => sh.send(Work::Flush {
                done: Box::new(done),
            }),
            EngineOp::Discard { ranges, fua } => sh.send(Work::Meta(MetaOp::Zero {
                ranges,
                discard: true,
                fua,
                done: Box::new(done),
            })),
            EngineOp::WriteZeroes { ranges, fua } => sh.send(Work::Meta(MetaOp::Zero {
                ranges,
                discard: false,
                fua,
                done: Box::new(done),
            })),
        }
    }

    fn submit_batch(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            if let Err(e) = ring.submit() {
                log::error!("io_uring submit failed: {e}");
            }
        }
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.ring.as_ref().map(Ring::event_fd)
    }

    fn process_completions(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for (f, r) in ring.reap() {
            self.finish(f, r);
        }
    }
}

impl BlockEngine for ImageEngine {
    type Queue<C: Completion> = ImageQueue<C>;

    fn info(&self) -> EngineInfo {
        self.shared.info.clone()
    }

    fn open_queue<C: Completion>(&self, _index: usize) -> Result<ImageQueue<C>, EngineError> {
        let ring = match self.shared.io.raw_fd() {
            // A recording backing observes its ring (the crash tests); others return None.
            Some(fd) => Some(Ring::observed(fd, self.shared.io.ring_observer())?),
            None => None,
        };
        Ok(ImageQueue {
            shared: self.shared.clone(),
            cache: Vec::new(),
            cache_seq: 0,
            ring,
        })
    }

    fn flush(&self) -> Result<(), EngineError> {
        if self.shared.info.read_only {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        self.shared.send(Work::Sync { reply: tx });
        rx.recv()
            .map_err(|_| EngineError::Io(io::Error::other("the completion worker is gone")))?
            .map_err(|e| EngineError::Io(io::Error::other(e)))
    }

    fn close(&self) -> Result<(), EngineError> {
        ImageEngine::close(self)
    }

    fn stats(&self) -> String {
        self.shared.stats.summary()
    }
}
