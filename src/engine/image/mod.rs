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
//!
//! The rooms, each with its invariants in its module comment:
//!
//! | module | concept | runs on |
//! | --- | --- | --- |
//! | `queue` | a queue's fast path: mapping cache, plan, ring flights | the virtqueue thread |
//! | `alloc_write` | the allocating write: allocate under the lock, data I/O, hand-off to convert | the virtqueue thread (the committer for parked writes, the worker for redone ones) |
//! | `layout` | iovecs of a write over its runs, zero padding and zero fill | any |
//! | `range_lock` | blocks being initialised and the writes deferred behind them | under the mapping lock |
//! | `unit_pace` | how fast allocation units fill: zero the rest of a unit, or convert its holes | under the mapping lock |
//! | `worker` | conversions, FLUSH, DISCARD, WRITE_ZEROES in arrival order | the completion worker |
//! | `commit` | the commit service: commit, punch after commit, parked work, abort | the committer |
//! | `restart` | the restart log: changes recorded, written before completion, dropped after commit, applied at open | the worker and the committer (open: the opening thread) |
//! | `stats` | counters | any |
//!
//! One lock, `Shared::state` (the mapping lock), guards the image and everything else mutable
//! here. It is held for in-memory work only, never across a data I/O, a commit's log write or a
//! wait: every holder returns in bounded time, so every `lock` ends. The restart log's mutex
//! comes before it in the lock order and is held for one tmpfs write (`restart.rs`). The waits
//! that span threads are listed in `fence.rs` with why each ends.

mod alloc_write;
mod commit;
mod layout;
mod queue;
mod range_lock;
mod restart;
mod stats;
mod unit_pace;
mod worker;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::fence::IoFence;
use super::{Batch, BlockEngine, Completion, EngineError, EngineInfo, Stopped};
use crate::ext4::BLOCK_SIZE_U64;
use crate::image::{Image, ImageError, OpenOptions};
use crate::io::BlockIo;
use crate::units::Bytes;
use commit::{Parked, Waiter};
use range_lock::RangeLock;
use worker::Work;

pub use queue::ImageQueue;
pub use restart::{apply_and_remove, pending_at, Applied, Handled, RestartLogAt};
pub use stats::{EngineCounters, EngineStats};

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
#[derive(Clone, Debug)]
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
    /// Where the changes acknowledged but not yet committed are kept for a restart after a
    /// kill (`restart.rs`); off by default here, on by default in `serve`.
    pub restart_log: RestartLogAt,
    /// Called first on each thread the engine starts (the worker, the committer). `serve`'s
    /// sandbox passes the function that drops the calling thread's capabilities: Linux keeps
    /// capabilities per thread, and these threads start before the sandbox drops the main
    /// thread's (they need none).
    pub thread_start: Option<fn()>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            read_only: false,
            commit_interval: Duration::from_secs(5),
            hot_path: HotPath::Fast,
            alloc_unit: DEFAULT_ALLOC_UNIT,
            restart_log: RestartLogAt::Off,
            thread_start: None,
        }
    }
}

/// Commits `close` tries for parked work before answering it with an error: parked work needs
/// at most two once first in line (the space rule), so this is generous.
const PARKED_CLOSE_COMMITS: usize = 8;

/// The default allocation unit, in blocks (64 KiB: qcow2's default cluster size).
pub const DEFAULT_ALLOC_UNIT: u64 = 16;
/// The largest allocation unit, in blocks (1 MiB: one zero-fill write).
pub const MAX_ALLOC_UNIT: u64 = 256;

/// State behind the mapping lock.
struct Locked {
    image: Image,
    /// Blocks being initialised and the writes deferred behind them.
    range: RangeLock,
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
    /// Changes made but not yet in the restart log, in the order made (`restart.rs`).
    restart_pending: Vec<crate::restart_log::format::Record>,
    /// When recent allocation units had their first write (what the rest of a unit gets).
    pace: unit_pace::UnitPace,
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
    /// `info` as opened, but for the capacity, which a resize changes: see `capacity`.
    info: EngineInfo,
    /// The disk's size in bytes, rounded down to sectors (`resize` grows it).
    capacity: AtomicU64,
    aborted: AtomicBool,
    stats: EngineStats,
    worker: Mutex<Option<Sender<Work>>>,
    committer: Mutex<Option<Sender<Waiter>>>,
    hot_path: HotPath,
    alloc_unit: u64,
    /// The restart log's writer; first in the lock order, before `state` (`restart.rs`).
    restart: Option<Mutex<restart::Writer>>,
    /// Restart-log records made (bumped under the mapping lock) and known written to the log
    /// (after the append that took them): while they differ, a mapping change some request
    /// may rely on is not in the log yet, and a fast overwrite completes through the worker,
    /// which appends first (see `queue.rs`).
    log_made: AtomicU64,
    log_written: AtomicU64,
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
            restart_log,
            thread_start,
        } = opts;
        let alloc_unit = alloc_unit.clamp(1, MAX_ALLOC_UNIT).next_power_of_two();
        let (image, restart) = if read_only {
            (Image::open(io.clone(), OpenOptions { read_only })?, None)
        } else {
            // The last session's restart log is checked against the session count, so it is
            // handled (applied, committed) before this session begins.
            let mut image = Image::open_keeping_session(io.clone())?;
            let restart = restart::open(&mut image, &restart_log)?;
            (image, restart)
        };
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
        let disk_bytes = image.disk_size() - image.disk_size() % crate::units::SECTOR_SIZE;
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
                range: RangeLock::default(),
                parked: VecDeque::new(),
                punch_after_commit: Vec::new(),
                frees_pending: false,
                restart_pending: Vec::new(),
                pace: unit_pace::UnitPace::default(),
            }),
            io,
            capacity: AtomicU64::new(disk_bytes),
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
            restart: restart.map(Mutex::new),
            log_made: AtomicU64::new(0),
            log_written: AtomicU64::new(0),
        });
        // The hook has run on both threads before open returns: the caller's next steps (the
        // sandbox's seccomp filter) may forbid what it does.
        let (started_tx, started) = mpsc::channel::<()>();
        let started_w = started_tx.clone();
        let s2 = shared.clone();
        let w = std::thread::Builder::new()
            .name("extblk-worker".into())
            .spawn(move || {
                if let Some(f) = thread_start {
                    f();
                }
                drop(started_w);
                worker::run(s2, rx)
            })
            .map_err(ImageError::Io)?;
        let s2 = shared.clone();
        let c = std::thread::Builder::new()
            .name("extblk-commit".into())
            .spawn(move || {
                if let Some(f) = thread_start {
                    f();
                }
                drop(started_tx);
                commit::run(s2, crx, commit_interval)
            })
            .map_err(ImageError::Io)?;
        // Both senders dropped (after the hook, or by a thread that ended): nothing to wait for.
        let _ = started.recv();
        Ok(ImageEngine {
            shared,
            threads: Arc::new(Mutex::new(vec![w, c])),
        })
    }

    pub fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    /// The image's filesystem UUID and session count (`s_mnt_count`, which this open bumped
    /// if read-write): what a file beside the image that belongs to one daemon session (the
    /// write-back cache's) is bound to.
    pub fn session(&self) -> ([u8; 16], u16) {
        let st = lock(&self.shared.state);
        let sb = st.image.superblock();
        (sb.uuid, sb.mnt_count)
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
        st.image.close_in_place().map_err(to_engine)?;
        drop(st);
        self.shared.remove_log();
        Ok(())
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
        other => EngineError::Image(other),
    }
}

impl BlockEngine for ImageEngine {
    type Queue<C: Completion> = ImageQueue<C>;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            capacity: Bytes(self.shared.capacity.load(Ordering::Acquire)),
            ..self.shared.info.clone()
        }
    }

    fn resize(&self, new_size: u64) -> Result<crate::image::resize::ResizePlan, EngineError> {
        self.shared.writable()?;
        // The committer does it, between two of its commits: only it commits (commit.rs).
        let (tx, rx) = mpsc::channel();
        self.shared.to_committer(Waiter::Resize {
            size: new_size,
            reply: tx,
        });
        // Ends: the committer answers every waiter after its next commit (at once, since the
        // device is quiesced), and a committer that stops drops the channel, so recv fails;
        // `to_committer` answers itself when there is no committer.
        rx.recv().map_err(|_| Stopped::CommitterGone)?
    }

    fn open_queue<C: Completion>(&self, _index: usize) -> Result<ImageQueue<C>, EngineError> {
        ImageQueue::new(self.shared.clone())
    }

    fn flush(&self) -> Result<(), EngineError> {
        if self.shared.info.read_only {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        self.shared.send(Work::Sync { reply: tx });
        rx.recv()
            .map_err(|_| Stopped::WorkerGone)?
            .map_err(EngineError::from)
    }

    fn close(&self) -> Result<(), EngineError> {
        ImageEngine::close(self)
    }

    type Counters = EngineCounters;

    fn counters(&self) -> EngineCounters {
        self.shared.stats.snapshot()
    }
}

impl Shared {
    fn writable(&self) -> Result<(), EngineError> {
        if self.info.read_only {
            return Err(EngineError::ReadOnly);
        }
        if self.aborted.load(Ordering::Acquire) {
            return Err(Stopped::Aborted.into());
        }
        Ok(())
    }
}
