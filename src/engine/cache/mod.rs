//! The write-back cache (`serve --cache writeback`): a layer of its own between the device's
//! queues and the engine below (the image engine, or the raw one), with ext4's buffered
//! writeback as its model.
//!
//! Guest writes are copied into 4 KiB pages of the cache's own memory and completed on the
//! queue thread at once; reads are served from it where cached and from the engine below
//! elsewhere. A writeback thread (`writeback.rs`) writes dirty pages back in runs of
//! consecutive blocks, sorted, longest first, as one write each: the engine below then
//! allocates each run in one piece (delayed allocation: nothing is allocated while a page is
//! only dirty in the cache). FLUSH writes back everything dirty before it and then flushes the
//! engine below; concurrent flushes share one. DISCARD and WRITE_ZEROES drop the cached pages
//! of their range, after any writeback of those blocks in flight has ended, so a discarded
//! range never comes back.
//!
//! **Space.** A dirty page over a hole holds its reservation by the image's space rule
//! (`docs/architecture.md`): every block of the disk has its place in the data area from
//! `create` on, so the writeback's allocation cannot fail for space; it may only park until a
//! commit frees pending blocks, which the image engine does on its own.
//!
//! **Process crashes.** With a cache file (an extblk image with a restart log), the pages live
//! in a file under `/run` mapped shared: a killed daemon's dirty pages are still there, and
//! the next `serve` of the image writes them back before it serves (`recover`). Without one
//! (`--format raw`, `--restart-log none`), unflushed writes are lost with the process, which
//! `--help` and the README say.
//!
//! **Waits and why they end.** The state mutex is held for in-memory work only (lookups, a
//! 4 KiB copy per page); no I/O is submitted and no completion runs under it, so a completion
//! that the engine below runs inside `submit` cannot deadlock on it. A queue thread never
//! blocks: a write that finds no room (the dirty limit, or no slot clean enough to evict) and a
//! discard that must wait for a writeback are deferred on the queue and retried when the
//! writeback thread's completions wake it (its eventfd, inside the queue's completion fd), so
//! the queue keeps reaping the completions the engine below needs to make progress. The
//! writeback thread waits only in `epoll_wait` (its wake eventfd, its queue's completions, a
//! tick), and the engine below completes every request it accepted (its own liveness rule).
//! `BlockEngine::flush` blocks its caller (shutdown, `ctl flush`, quiesce) on a channel that
//! the writeback thread answers once the data is written back and flushed, or failed.

mod state;
pub mod store;
mod writeback;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::state::{FlushDone, FlushWaiter, State};
use self::store::{Binding, FileError, Leftover, Store, PAGE};
use super::{
    Batch, BlockEngine, Completion, EngineError, EngineInfo, EngineOp, EngineQueue, GuestBuffers,
    Stopped, ZeroRange,
};
use crate::units::Bytes;

/// The engine queue index the writeback thread opens below (the device's are 0..n).
const WRITEBACK_QUEUE: usize = 1 << 16;

/// How the cache is sized and paced (`serve --cache-size --dirty-ratio --dirty-expire`).
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// Bytes of cache memory (whole pages).
    pub size: u64,
    /// Percentage of the cache that may be dirty before writers are throttled (Linux's
    /// `vm.dirty_ratio`); writeback starts in the background at half of it.
    pub dirty_ratio: u8,
    /// Dirty pages older than this are written back even without pressure or a FLUSH.
    pub dirty_expire: Duration,
    /// The file that keeps dirty pages across a process crash, and what it belongs to.
    pub file: Option<(PathBuf, Binding)>,
    /// Run first on the writeback thread (the sandbox drops its capabilities there).
    pub thread_start: Option<fn()>,
}

#[derive(Debug, Error)]
pub enum CacheError {
    #[error("--cache-size must hold at least 16 pages of 4 KiB")]
    TooSmall,
    #[error("write-back cache memory: {0}")]
    Memory(#[source] std::io::Error),
    #[error("write-back cache file: {0}")]
    File(#[from] FileError),
    #[error("write-back cache: {0}")]
    Engine(#[from] EngineError),
    #[error("write-back cache: cannot start the writeback thread: {0}")]
    Thread(#[source] std::io::Error),
}

crate::counters::counters! {
    /// The write-back cache's counters.
    pub struct CacheStats => CacheCounters {
        /// 4 KiB blocks of guest writes copied into the cache.
        write_blocks,
        /// Pieces of writes sent below as they are (parts of a block not cached).
        write_passthrough,
        /// Writes deferred for room (the dirty limit reached): the throttle.
        writes_throttled,
        /// Blocks of reads served from the cache.
        read_hit_blocks,
        /// Reads (or their pieces) sent below.
        read_misses,
        /// Runs written back, and their blocks.
        writeback_runs,
        writeback_blocks,
        /// Flush requests, and the flushes of the engine below that served them.
        flushes,
        flushes_below,
        /// Discards and write-zeroes that waited for a writeback of their range.
        zeroes_waited,
        /// Pages cached and dirty at the last change (gauges).
        cached_pages,
        dirty_pages,
    }
}

/// The cache's and the engine below's counters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Counters<T> {
    pub cache: CacheCounters,
    #[serde(flatten)]
    pub below: T,
}

impl<T: std::fmt::Display> std::fmt::Display for Counters<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cache: {} | {}", self.cache, self.below)
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    store: Store,
    /// Wakes the writeback thread.
    wake: EventFd,
    stats: CacheStats,
    expire: Duration,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic under the lock ends the process (fatal.rs): a poisoned lock is never seen.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn wake_writeback(&self) {
        // An eventfd write fails only when the counter would overflow: it is readable then.
        let _ = self.wake.write(1);
    }

    /// Wakes every queue that deferred something (called after slots or blocks changed).
    fn wake_queues(waiting: Vec<Arc<EventFd>>) {
        for w in waiting {
            let _ = w.write(1);
        }
    }

    fn gauges(&self, st: &State) {
        self.stats
            .cached_pages
            .store(st.cached() as u64, Ordering::Relaxed);
        self.stats
            .dirty_pages
            .store(st.dirty as u64, Ordering::Relaxed);
    }

    /// Queues a flush of everything written so far; `done` runs on the writeback thread
    /// (or here, if the cache has failed).
    fn request_flush(&self, done: FlushDone) {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let mut st = lock(&self.state);
        if let Some(e) = &st.failed {
            let e = Stopped::WritebackFailed(e.clone());
            drop(st);
            done(Err(e.into()));
            return;
        }
        if st.stop {
            // The writeback thread is gone or going: nobody would answer.
            drop(st);
            done(Err(Stopped::Closed.into()));
            return;
        }
        let target = st.flush_target();
        st.flushes.push(FlushWaiter { target, done });
        drop(st);
        self.wake_writeback();
    }

    /// The discard or write-zeroes over `ranges` that doomed `slots` ended: what waited for
    /// it (sub-block writes, other discards, writebacks of those blocks) may go on.
    fn end_zero(&self, slots: &[u32], ranges: &[(u64, u64)], ok: bool) {
        let mut st = lock(&self.state);
        st.end_zeroing(ranges);
        for &s in slots {
            st.release_doomed(&self.store, s, ok);
        }
        self.gauges(&st);
        let waiting = std::mem::take(&mut st.waiting);
        drop(st);
        Self::wake_queues(waiting);
        self.wake_writeback();
    }
}

/// A request split into pieces: completes when the last piece does, with the first error.
pub(crate) struct Join<C> {
    left: AtomicUsize,
    err: Mutex<Option<EngineError>>,
    done: Mutex<Option<C>>,
}

impl<C: Completion> Join<C> {
    fn new(pieces: usize, done: C) -> Arc<Join<C>> {
        Arc::new(Join {
            left: AtomicUsize::new(pieces),
            err: Mutex::new(None),
            done: Mutex::new(Some(done)),
        })
    }

    fn piece_done(&self, r: Result<(), EngineError>) {
        if let Err(e) = r {
            self.err
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let err = self.err.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(c) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
                c.complete(err.map_or(Ok(()), Err));
            }
        }
    }
}

/// How a guest request finishes: at once, or as one piece of a [`Join`].
enum Finish<C> {
    Direct(C),
    Join(Arc<Join<C>>),
}

impl<C: Completion> Finish<C> {
    fn complete(self, r: Result<(), EngineError>) {
        match self {
            Finish::Direct(c) => c.complete(r),
            Finish::Join(j) => j.piece_done(r),
        }
    }
}

/// The completion of a request the cache sends below for a guest queue.
pub(crate) enum Inner<C> {
    /// The guest's request as it came.
    Whole(C),
    /// One piece of a split request.
    Piece(Arc<Join<C>>),
    /// A discard or write-zeroes: the cached versions it dropped are freed when it ends.
    Zero {
        shared: Arc<Shared>,
        doomed: Vec<u32>,
        /// Its block ranges, which hold back writebacks and sub-block writes until it ends.
        ranges: Vec<(u64, u64)>,
        done: C,
    },
}

impl<C: Completion> Completion for Inner<C> {
    fn complete(self, r: Result<(), EngineError>) {
        match self {
            Inner::Whole(c) => c.complete(r),
            Inner::Piece(j) => j.piece_done(r),
            Inner::Zero {
                shared,
                doomed,
                ranges,
                done,
            } => {
                shared.end_zero(&doomed, &ranges, r.is_ok());
                done.complete(r)
            }
        }
    }

    fn batch(&self) -> Batch {
        match self {
            Inner::Whole(c) | Inner::Zero { done: c, .. } => c.batch(),
            Inner::Piece(_) => Batch::default(),
        }
    }
}

/// The write-back cache over engine `E`.
pub struct CacheEngine<E: BlockEngine> {
    below: E,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<E: BlockEngine> CacheEngine<E> {
    /// Starts the cache (and its writeback thread) over `below`.
    pub fn new(below: E, opts: CacheOptions) -> Result<CacheEngine<E>, CacheError> {
        let slots = opts.size / PAGE as u64;
        if slots < 16 {
            return Err(CacheError::TooSmall);
        }
        let slots = slots.min(u32::MAX as u64 / 2) as u32;
        let store = match &opts.file {
            Some((path, binding)) => {
                if !store::on_tmpfs(path) {
                    log::warn!(
                        "write-back cache file {}: not on tmpfs, so the host also writes its \
                         pages to that filesystem (put --restart-log on a tmpfs such as /run \
                         or /dev/shm)",
                        path.display()
                    );
                }
                Store::create_file(path, slots, *binding)?
            }
            None => Store::anonymous(slots).map_err(CacheError::Memory)?,
        };
        let dirty_limit = (slots as u64 * u64::from(opts.dirty_ratio.clamp(1, 100)) / 100) as usize;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(slots, dirty_limit)),
            store,
            wake: EventFd::new(EFD_NONBLOCK).map_err(CacheError::Memory)?,
            stats: CacheStats::default(),
            expire: opts.dirty_expire,
        });
        let queue = below.open_queue::<writeback::WbDone>(WRITEBACK_QUEUE)?;
        let s2 = shared.clone();
        let start = opts.thread_start;
        let (started_tx, started) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("extblk-writeback".into())
            .spawn(move || {
                if let Some(f) = start {
                    f();
                }
                drop(started_tx);
                writeback::run::<E>(s2, queue)
            })
            .map_err(CacheError::Thread)?;
        // The hook has run before new returns (the sandbox's next step may forbid it).
        let _ = started.recv();
        match shared.store.path() {
            Some(p) => log::info!(
                "write-back cache: {} MiB, dirty limit {} MiB, expiry {} ms, pages kept in {}",
                (slots as u64 * PAGE as u64) >> 20,
                (dirty_limit as u64 * PAGE as u64) >> 20,
                opts.dirty_expire.as_millis(),
                p.display()
            ),
            None => log::warn!(
                "write-back cache: {} MiB in the daemon's memory only: writes not yet flushed \
                 are lost if the daemon is killed",
                (slots as u64 * PAGE as u64) >> 20
            ),
        }
        Ok(CacheEngine {
            below,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The engine below.
    pub fn below(&self) -> &E {
        &self.below
    }

    pub fn stats(&self) -> CacheCounters {
        self.shared.stats.snapshot()
    }

    fn stop_thread(&self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake_writeback();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl<E: BlockEngine> Drop for CacheEngine<E> {
    fn drop(&mut self) {
        // Without a close (an error path): the thread ends; dirty pages stay in the file.
        self.stop_thread();
    }
}

impl<E: BlockEngine> BlockEngine for CacheEngine<E> {
    type Queue<C: Completion> = CacheQueue<E, C>;

    fn info(&self) -> EngineInfo {
        self.below.info()
    }

    fn open_queue<C: Completion>(&self, index: usize) -> Result<CacheQueue<E, C>, EngineError> {
        let below = self.below.open_queue::<Inner<C>>(index)?;
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = new_epoll()?;
        watch(&epoll, wake.as_raw_fd())?;
        if let Some(fd) = below.completion_fd() {
            watch(&epoll, fd)?;
        }
        Ok(CacheQueue {
            shared: self.shared.clone(),
            below,
            wake,
            epoll,
            deferred: std::collections::VecDeque::new(),
        })
    }

    fn flush(&self) -> Result<(), EngineError> {
        let (tx, rx) = mpsc::channel();
        self.shared.request_flush(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().map_err(|_| Stopped::Closed)?
    }

    fn close(&self) -> Result<(), EngineError> {
        let r = self.flush();
        self.stop_thread();
        let below = self.below.close();
        if r.is_ok() && below.is_ok() {
            // Everything is written back and durable below: the file holds nothing needed.
            self.shared.store.remove_file();
        }
        r.and(below)
    }

    fn resize(&self, new_size: u64) -> Result<crate::image::resize::ResizePlan, EngineError> {
        // Quiesced and flushed by the device: every page is clean.
        self.flush()?;
        let plan = self.below.resize(new_size)?;
        let capacity = self.below.info().capacity.0;
        lock(&self.shared.state).drop_clean_from(capacity / PAGE as u64);
        // The file names the disk's size: a kill after the resize must still find it valid.
        self.shared.store.set_capacity(capacity);
        Ok(plan)
    }

    type Counters = Counters<E::Counters>;

    fn counters(&self) -> Counters<E::Counters> {
        Counters {
            cache: self.shared.stats.snapshot(),
            below: self.below.counters(),
        }
    }
}

/// A write making its way into the cache (deferred for room, it resumes at `pos`).
struct PendingWrite<C> {
    offset: u64,
    bufs: GuestBuffers,
    /// Bytes of the request already in the cache (or sent below).
    pos: usize,
    fua: bool,
    finish: Finish<C>,
}

enum Deferred<C> {
    Write(PendingWrite<C>),
    Zero { op: EngineOp, done: C },
}

/// The cache side of one virtqueue.
pub struct CacheQueue<E: BlockEngine, C: Completion> {
    shared: Arc<Shared>,
    below: E::Queue<Inner<C>>,
    wake: Arc<EventFd>,
    /// Readable when `wake` or the queue below has something: the device's completion fd.
    epoll: OwnedFd,
    /// Requests waiting for room or for a writeback, in arrival order.
    deferred: std::collections::VecDeque<Deferred<C>>,
}

/// The blocks `[first, end)` a byte range touches.
fn blocks(offset: u64, len: u64) -> (u64, u64) {
    (offset / PAGE as u64, (offset + len).div_ceil(PAGE as u64))
}

impl<E: BlockEngine, C: Completion> CacheQueue<E, C> {
    fn read(&mut self, offset: u64, bufs: GuestBuffers, done: C) {
        let len = bufs.len() as u64;
        let st = lock(&self.shared.state);
        if !st.is_cached() || len == 0 {
            drop(st);
            self.shared
                .stats
                .read_misses
                .fetch_add(1, Ordering::Relaxed);
            return self.below.submit(
                EngineOp::Read {
                    offset: Bytes(offset),
                    bufs,
                },
                Inner::Whole(done),
            );
        }
        // Byte ranges of the request (relative to it) not cached.
        let mut holes: SmallVec<[(usize, usize); 4]> = SmallVec::new();
        let mut hits = 0u64;
        let (first, end) = blocks(offset, len);
        for b in first..end {
            let bstart = b * PAGE as u64;
            let s = offset.max(bstart);
            let e = (offset + len).min(bstart + PAGE as u64);
            let (rs, re) = ((s - offset) as usize, (e - offset) as usize);
            match st.readable(b) {
                Some(slot) => {
                    hits += 1;
                    let page = self.shared.store.page(slot);
                    let src = &page[(s - bstart) as usize..(e - bstart) as usize];
                    let dst = crate::io::iov::slice(bufs.iovecs(), rs, re - rs);
                    // The slices have the same length: scatter cannot fail.
                    let _ = crate::io::iov::scatter(&dst, src);
                }
                None => match holes.last_mut() {
                    Some((_, he)) if *he == rs => *he = re,
                    _ => holes.push((rs, re)),
                },
            }
        }
        drop(st);
        let stats = &self.shared.stats;
        if hits == 0 {
            stats.read_misses.fetch_add(1, Ordering::Relaxed);
            return self.below.submit(
                EngineOp::Read {
                    offset: Bytes(offset),
                    bufs,
                },
                Inner::Whole(done),
            );
        }
        stats.read_hit_blocks.fetch_add(hits, Ordering::Relaxed);
        if holes.is_empty() {
            return done.complete(Ok(()));
        }
        stats
            .read_misses
            .fetch_add(holes.len() as u64, Ordering::Relaxed);
        let join = Join::new(holes.len(), done);
        for (s, e) in holes {
            // SAFETY: the pieces are disjoint, and the cached parts were copied already.
            let piece = unsafe { bufs.slice(s, e - s) };
            self.below.submit(
                EngineOp::Read {
                    offset: Bytes(offset + s as u64),
                    bufs: piece,
                },
                Inner::Piece(join.clone()),
            );
        }
    }

    /// Copies what room allows of `w` into the cache. Returns it if it must wait for room
    /// (the queue is then registered to be woken).
    fn write(&mut self, mut w: PendingWrite<C>) -> Option<PendingWrite<C>> {
        let len = w.bufs.len() as u64;
        if len == 0 {
            w.finish.complete(Ok(()));
            return None;
        }
        let end = w.offset + len;
        let shared = self.shared.clone();
        let mut st = lock(&shared.state);
        if let Some(e) = &st.failed {
            let e = Stopped::WritebackFailed(e.clone());
            drop(st);
            w.finish.complete(Err(e.into()));
            return None;
        }
        // Partial blocks not cached are written below as they are (a read-modify-write here
        // would wait for a read on the queue thread): pieces of a join, with the cached part
        // as one more piece, completed last.
        let mut edges: SmallVec<[(usize, usize); 2]> = SmallVec::new();
        let now = Instant::now();
        let mut copied = 0u64;
        while (w.pos as u64) < len {
            let s = w.offset + w.pos as u64;
            let b = s / PAGE as u64;
            let bstart = b * PAGE as u64;
            let e = end.min(bstart + PAGE as u64);
            let partial = e - s < PAGE as u64;
            let old = st.index.get(&b).copied();
            if partial && old.is_none() && (st.doomed.contains_key(&b) || st.zeroing_covers(b)) {
                // A discard of the block is in flight: the edge would race it below, and the
                // version it dropped (still what reads return) would not show the edge.
                break;
            }
            if partial && old.is_none() {
                edges.push((w.pos, (e - s) as usize));
                w.pos = (e - w.offset) as usize;
                continue;
            }
            let (_, dirty_ok) = st.room(usize::from(st.adds_dirty(b)));
            let slot = if dirty_ok { st.take_slot() } else { None };
            let Some(slot) = slot else { break };
            let dst = shared.store.data(slot);
            // Eviction may have taken the block's own clean version: its data is in place.
            if let Some(o) = old.filter(|&o| partial && o != slot) {
                // SAFETY: `slot` is taken (no one else uses it); `o` is published and
                // immutable; both are PAGE bytes of the store.
                unsafe { std::ptr::copy_nonoverlapping(shared.store.data(o), dst, PAGE) };
            }
            let src = crate::io::iov::slice(w.bufs.iovecs(), w.pos, (e - s) as usize);
            // SAFETY: `slot` is ours until installed; the range lies inside its page.
            let page = unsafe {
                std::slice::from_raw_parts_mut(dst.add((s - bstart) as usize), (e - s) as usize)
            };
            // The slice and the page piece have the same length: gather cannot fail.
            let _ = crate::io::iov::gather(&src, page);
            st.install(&shared.store, slot, b, now);
            copied += 1;
            w.pos = (e - w.offset) as usize;
        }
        let wait = (w.pos as u64) < len;
        if wait && !st.waiting.iter().any(|q| Arc::ptr_eq(q, &self.wake)) {
            st.waiting.push(self.wake.clone());
        }
        // The writeback thread needs a wake-up only when it may be idle: with writebacks in
        // flight their completions wake it, and an eventfd write per request would cost a
        // system call each.
        let kick = wait || (st.dirty >= st.background && st.runs_in_flight == 0);
        shared.gauges(&st);
        drop(st);
        shared
            .stats
            .write_blocks
            .fetch_add(copied, Ordering::Relaxed);
        if kick {
            shared.wake_writeback();
        }
        if !edges.is_empty() {
            w.finish = match w.finish {
                Finish::Direct(done) => Finish::Join(Join::new(1, done)),
                j => j,
            };
        }
        for (s, n) in edges {
            shared
                .stats
                .write_passthrough
                .fetch_add(1, Ordering::Relaxed);
            let Finish::Join(j) = &w.finish else {
                unreachable!("edges make a join")
            };
            // The cached part's piece is still open: the join cannot end meanwhile.
            j.left.fetch_add(1, Ordering::AcqRel);
            // SAFETY: the edges are disjoint from each other and from the cached blocks.
            let piece = unsafe { w.bufs.slice(s, n) };
            self.below.submit(
                EngineOp::Write {
                    offset: Bytes(w.offset + s as u64),
                    bufs: piece,
                    fua: w.fua,
                },
                Inner::Piece(j.clone()),
            );
        }
        if wait {
            shared
                .stats
                .writes_throttled
                .fetch_add(1, Ordering::Relaxed);
            return Some(w);
        }
        if w.fua {
            let finish = w.finish;
            shared.request_flush(Box::new(move |r| finish.complete(r)));
        } else {
            w.finish.complete(Ok(()));
        }
        None
    }
}

/// A new epoll descriptor, owned.
fn new_epoll() -> std::io::Result<OwnedFd> {
    let ep = epoll::create(true)?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ep) })
}

/// Adds `fd` to `ep`, readable.
fn watch(ep: &OwnedFd, fd: RawFd) -> std::io::Result<()> {
    epoll::ctl(
        ep.as_raw_fd(),
        epoll::ControlOptions::EPOLL_CTL_ADD,
        fd,
        epoll::Event::new(epoll::Events::EPOLLIN, fd as u64),
    )
}

impl<E: BlockEngine, C: Completion> CacheQueue<E, C> {
    /// Sends a discard or write-zeroes below once no writeback of its blocks is in flight and
    /// no block it covers only in part is dirty here (those are written back first, as
    /// urgent), dropping the cached versions of its blocks. Returns it if it must wait.
    fn zero(&mut self, op: EngineOp, done: C) -> Option<(EngineOp, C)> {
        let ranges: &[ZeroRange] = match &op {
            EngineOp::Discard { ranges, .. } | EngineOp::WriteZeroes { ranges, .. } => ranges,
            _ => unreachable!("zero() takes discards and write-zeroes"),
        };
        let shared = self.shared.clone();
        let mut st = lock(&shared.state);
        if let Some(e) = &st.failed {
            let e = Stopped::WritebackFailed(e.clone());
            drop(st);
            done.complete(Err(e.into()));
            return None;
        }
        let mut ready = true;
        let mut urgent = false;
        let mut touched: Vec<(u64, bool)> = Vec::new();
        for r in ranges {
            let (off, len) = (r.range.offset.0, r.range.len.0);
            if len == 0 {
                continue;
            }
            let (first, end) = blocks(off, len);
            let head_partial = off % PAGE as u64 != 0;
            let tail_partial = (off + len) % PAGE as u64 != 0;
            let partial = |b: u64| (b == first && head_partial) || (b + 1 == end && tail_partial);
            let known = st.index.len() + st.writing.len() + st.doomed.len();
            let mut found: Vec<u64> = if (end - first) as usize <= known {
                (first..end)
                    .filter(|b| {
                        st.index.contains_key(b)
                            || st.writing.contains(b)
                            || st.doomed.contains_key(b)
                    })
                    .collect()
            } else {
                st.index
                    .keys()
                    .chain(st.writing.iter())
                    .chain(st.doomed.keys())
                    .copied()
                    .filter(|b| (first..end).contains(b))
                    .collect()
            };
            found.sort_unstable();
            found.dedup();
            touched.extend(found.into_iter().map(|b| (b, partial(b))));
        }
        for &(b, partial) in &touched {
            // A writeback in flight, or another discard still holding a version it dropped
            // (which comes back if that one fails): wait for them.
            if st.writing.contains(&b) || st.doomed.contains_key(&b) {
                ready = false;
            }
            let dirty = st.index.get(&b).is_some_and(|&s| st.meta[s as usize].dirty);
            if partial && dirty {
                ready = false;
                urgent = true;
                st.urgent.insert(b);
            }
        }
        if !ready {
            if !st.waiting.iter().any(|q| Arc::ptr_eq(q, &self.wake)) {
                st.waiting.push(self.wake.clone());
            }
            drop(st);
            shared.stats.zeroes_waited.fetch_add(1, Ordering::Relaxed);
            if urgent {
                shared.wake_writeback();
            }
            return Some((op, done));
        }
        let doomed: Vec<u32> = touched.iter().filter_map(|&(b, _)| st.doom(b)).collect();
        let zranges: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|r| r.range.len.0 > 0)
            .map(|r| blocks(r.range.offset.0, r.range.len.0))
            .collect();
        st.zeroing.extend(zranges.iter().copied());
        shared.gauges(&st);
        drop(st);
        self.below.submit(
            op,
            Inner::Zero {
                shared,
                doomed,
                ranges: zranges,
                done,
            },
        );
        None
    }

    fn defer(&mut self, d: Deferred<C>) {
        self.deferred.push_back(d);
    }
}

impl<E: BlockEngine, C: Completion> EngineQueue<C> for CacheQueue<E, C> {
    fn submit(&mut self, op: EngineOp, done: C) {
        match op {
            EngineOp::Read { offset, bufs } => self.read(offset.0, bufs, done),
            EngineOp::Write { offset, bufs, fua } => {
                let w = PendingWrite {
                    offset: offset.0,
                    bufs,
                    pos: 0,
                    fua,
                    finish: Finish::Direct(done),
                };
                if !self.deferred.is_empty() || w.bufs.is_empty() {
                    // Behind the deferred ones (whose front is registered for a wake-up), or
                    // empty (nothing to cache: answered in order with the rest).
                    if w.bufs.is_empty() && self.deferred.is_empty() {
                        return w.finish.complete(Ok(()));
                    }
                    self.defer(Deferred::Write(w));
                } else if let Some(w) = self.write(w) {
                    self.defer(Deferred::Write(w));
                }
            }
            EngineOp::Flush => self
                .shared
                .request_flush(Box::new(move |r| done.complete(r))),
            op @ (EngineOp::Discard { .. } | EngineOp::WriteZeroes { .. }) => {
                if !self.deferred.is_empty() {
                    self.defer(Deferred::Zero { op, done });
                } else if let Some((op, done)) = self.zero(op, done) {
                    self.defer(Deferred::Zero { op, done });
                }
            }
        }
    }

    fn submit_batch(&mut self) {
        self.below.submit_batch();
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_completions(&mut self) {
        let _ = self.wake.read();
        self.below.process_completions();
        while let Some(d) = self.deferred.pop_front() {
            let back = match d {
                Deferred::Write(w) => self.write(w).map(Deferred::Write),
                Deferred::Zero { op, done } => self
                    .zero(op, done)
                    .map(|(op, done)| Deferred::Zero { op, done }),
            };
            if let Some(b) = back {
                self.deferred.push_front(b);
                break;
            }
        }
        self.below.submit_batch();
    }
}

/// What became of the cache file a previous daemon left.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovered {
    /// No file, or nothing dirty in it.
    Nothing,
    /// Its dirty pages were written back and flushed, and the file removed.
    Applied { pages: usize },
    /// Not applied, and why; the file was renamed to `<name>.stale`.
    Ignored(String),
}

/// Writes back the dirty pages a killed daemon left at `path`, if the file belongs to
/// `expect` (the image, the session before this one, this boot, this size), and flushes.
/// Runs before the device serves: nothing reads the disk meanwhile.
pub fn recover<E: BlockEngine>(
    engine: &E,
    path: &Path,
    expect: Binding,
) -> Result<Recovered, CacheError> {
    let set_aside = |why: String| {
        let stale = path.with_extension("wbcache.stale");
        if let Err(e) = std::fs::rename(path, &stale) {
            log::warn!("write-back cache: cannot rename {}: {e}", path.display());
        }
        Ok(Recovered::Ignored(why))
    };
    let left = match Leftover::read(path) {
        Ok(None) => return Ok(Recovered::Nothing),
        Ok(Some(l)) => Arc::new(l),
        Err(e) => return set_aside(e.to_string()),
    };
    let b = left.header.binding;
    let why = if b.uuid != expect.uuid {
        Some("it belongs to another image (another filesystem UUID)".to_string())
    } else if b.boot_id != expect.boot_id {
        Some("it was written before the host last booted".to_string())
    } else if b.session != expect.session {
        Some(format!(
            "it was written in session {} of the image, the last was {}: the image has been              opened read-write since",
            b.session, expect.session
        ))
    } else if b.capacity != expect.capacity {
        Some(format!(
            "it was written for a {}-byte disk, the disk is {} bytes",
            b.capacity, expect.capacity
        ))
    } else {
        None
    };
    if let Some(why) = why {
        return set_aside(why);
    }
    let pages = left.pages.len();
    if pages > 0 {
        write_pages(engine, &left)?;
        engine.flush()?;
    }
    if let Err(e) = std::fs::remove_file(path) {
        log::warn!("write-back cache: cannot remove {}: {e}", path.display());
    }
    Ok(if pages > 0 {
        Recovered::Applied { pages }
    } else {
        Recovered::Nothing
    })
}

/// Progress of recovery's writes.
struct Progress {
    left: AtomicUsize,
    err: Mutex<Option<EngineError>>,
}

struct RecoveryDone(Arc<Progress>);

impl Completion for RecoveryDone {
    fn complete(self, r: Result<(), EngineError>) {
        if let Err(e) = r {
            self.0
                .err
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
        self.0.left.fetch_sub(1, Ordering::AcqRel);
    }
}

fn write_pages<E: BlockEngine>(engine: &E, left: &Arc<Leftover>) -> Result<(), EngineError> {
    const IN_FLIGHT: usize = 32;
    let mut q = engine.open_queue::<RecoveryDone>(WRITEBACK_QUEUE)?;
    let progress = Arc::new(Progress {
        left: AtomicUsize::new(0),
        err: Mutex::new(None),
    });
    let wait_below = |q: &mut E::Queue<RecoveryDone>, n: usize| {
        q.submit_batch();
        // Ends: the engine completes every request it accepted.
        while progress.left.load(Ordering::Acquire) > n {
            q.process_completions();
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    let mut i = 0;
    while i < left.pages.len() {
        let first = left.pages[i].0;
        let mut iovs = crate::io::uring::Iovs::new();
        let mut n = 0;
        while i < left.pages.len() && left.pages[i].0 == first + n && (n as usize) < state::MAX_RUN
        {
            let page = left.page(left.pages[i].1);
            iovs.push(libc::iovec {
                iov_base: page.as_ptr() as *mut libc::c_void,
                iov_len: PAGE,
            });
            n += 1;
            i += 1;
        }
        // SAFETY: the iovecs point into the leftover's mapping, which the keepalive holds;
        // the engine only reads them (a write).
        let bufs = unsafe { GuestBuffers::new(iovs, left.clone()) };
        progress.left.fetch_add(1, Ordering::AcqRel);
        q.submit(
            EngineOp::Write {
                offset: Bytes(first * PAGE as u64),
                bufs,
                fua: false,
            },
            RecoveryDone(progress.clone()),
        );
        wait_below(&mut q, IN_FLIGHT);
    }
    wait_below(&mut q, 0);
    let err = progress
        .err
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    err.map_or(Ok(()), Err)
}
