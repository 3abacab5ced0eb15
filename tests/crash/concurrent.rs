//! The concurrent crash exploration: the real engine, two queue threads with many requests in
//! flight on their io_uring, recorded; crash states rebuilt from the log of submissions,
//! completions and barriers. See the module comment of `crash.rs`.

use std::cell::UnsafeCell;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use extblk::engine::cache::{CacheEngine, CacheOptions};
use extblk::engine::image::{EngineOptions, ImageEngine};
use extblk::engine::{
    BlockEngine, Completion, EngineError, EngineOp, EngineQueue, GuestBuffers, ZeroRange,
};
use extblk::ext4::layout::Layout;
use extblk::ext4::BLOCKS_PER_GROUP;
use extblk::image::create::{create, CreateParams};
use extblk::image::{Image, OpenOptions};
use extblk::io::backing::Backing;
use extblk::io::record::{IoEvent, RecordingIo};
use extblk::io::{BlockIo, FileIo};
use extblk::rng::Rng;
use extblk::units::{ByteRange, Bytes};

use super::{decode, e2fsck_file_agrees, pieces, poison, stamp_word, Piece, Val};

const BS: u64 = 4096;
/// The virtual disk: 33 GiB, so the filesystem has 266 block groups. A transaction's log size
/// is counted as two blocks (bitmap, descriptor) per group it dirties, and the minimum journal
/// (1024 blocks) throttles a running transaction at half of it: only writes and discards spread
/// over more than ~254 groups between two commits reach the throttle. The image stays small: a
/// few MiB of metadata, and what the workload writes.
const DISK: u64 = 33 << 30;
const JOURNAL_BLOCKS: u64 = 1024;
/// Each slot is a window of blocks in its own block group (identity placement keeps a logical
/// block in the group of its number); the window is one allocation unit at the largest unit,
/// so a unit's zero fill never leaves it.
const WINDOW: u64 = 16;
const SLOT_AT: u64 = 64;
/// Slots both queues hammer (overlapping writes, so deferral; discards and rewrites, so
/// relocation); all slots are walked, one after the other, to dirty many groups.
const HOT: u64 = 3;
/// Requests each queue keeps in flight.
const DEPTH: usize = 16;
/// A queue with requests in flight that completes nothing for this long has stopped.
pub const STALL: Duration = Duration::from_secs(4);

/// How a concurrent run is shaped.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub seed: u64,
    /// Blocks (1, 4, 16: 4, 16, 64 KiB).
    pub alloc_unit: u64,
    pub requests_per_queue: usize,
    pub commit_interval: Duration,
    /// How long each barrier takes (a device's cache flush): commits then last long enough
    /// for the next transaction to reach the log throttle meanwhile.
    pub barrier_delay: Duration,
    /// Some writes, discards and write-zeroes are FUA (durable once acknowledged).
    pub fua: bool,
    /// Through the write-back cache, of this many pages (half may be dirty; 5 ms expiry).
    pub cache: Option<u64>,
}

fn slot_lblk(s: u64) -> u64 {
    s * BLOCKS_PER_GROUP + SLOT_AT
}

/// A 4 KiB page. Shared: a whole-block write of the log is one page, used as it is by every
/// crash state that holds it (and decoded once, see `judge`).
type Page = Arc<[u8]>;

/// Pages of an image by block number.
#[derive(Default)]
struct Pages(HashMap<u64, Page>);

/// A crash state: `over` on top of the durable `base`; a page no write reached reads as zeroes
/// in the metadata area and as poison (a device's previous tenant) in the data area.
struct StateIo {
    size: u64,
    poison_from: u64,
    base: Arc<Pages>,
    over: HashMap<u64, Page>,
}

/// Fills `out` with what block `b` holds when no write reached it.
fn default_into(b: u64, poison_from: u64, out: &mut [u8]) {
    if b >= poison_from {
        out.copy_from_slice(&poison(b));
    } else {
        out.fill(0);
    }
}

fn default_page(b: u64, poison_from: u64) -> Page {
    let mut p = vec![0u8; BS as usize];
    default_into(b, poison_from, &mut p);
    p.into()
}

impl StateIo {
    fn page(&self, b: u64) -> Option<&Page> {
        self.over.get(&b).or_else(|| self.base.0.get(&b))
    }
}

impl BlockIo for StateIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            ));
        }
        let mut o = 0;
        while o < buf.len() {
            let at = offset + o as u64;
            let (b, k) = (at / BS, (at % BS) as usize);
            let n = (BS as usize - k).min(buf.len() - o);
            match self.page(b) {
                Some(p) => buf[o..o + n].copy_from_slice(&p[k..k + n]),
                None if n == BS as usize => default_into(b, self.poison_from, &mut buf[o..o + n]),
                None => buf[o..o + n].copy_from_slice(&default_page(b, self.poison_from)[k..k + n]),
            }
            o += n;
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::other("a crash state is judged read-only"))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::other("a crash state is judged read-only"))
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// Sparse memory to run `create` on.
struct CreateIo {
    size: u64,
    pages: Mutex<HashMap<u64, Vec<u8>>>,
}

impl BlockIo for CreateIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let pages = self.pages.lock().unwrap();
        for (i, x) in buf.iter_mut().enumerate() {
            let at = offset + i as u64;
            *x = pages.get(&(at / BS)).map_or(0, |p| p[(at % BS) as usize]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut pages = self.pages.lock().unwrap();
        for (i, x) in buf.iter().enumerate() {
            let at = offset + i as u64;
            pages
                .entry(at / BS)
                .or_insert_with(|| vec![0u8; BS as usize])[(at % BS) as usize] = *x;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// A file whose barriers take `delay` (a device's cache flush), forwarding its descriptor so
/// the engine's rings run on it.
struct SlowBarriers {
    inner: FileIo,
    delay: Duration,
}

impl BlockIo for SlowBarriers {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.flush()
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.raw_fd()
    }
    fn direct_io(&self) -> bool {
        self.inner.direct_io()
    }
    fn writev_at(&self, iovs: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<()> {
        self.inner.writev_at(iovs, offset, dsync)
    }
    fn readv_at(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        self.inner.readv_at(iovs, offset)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    Zeroes,
}

/// One request of the workload, with when it was submitted and completed: `seq` orders the
/// harness's own submissions and completions (one atomic counter), `log` is the length of
/// the I/O log at that moment (every event of the request comes after its `log_s`, and every
/// event it waited for comes before its `log_c`).
struct Req {
    kind: Kind,
    /// Tracked sectors `first..first + n` (see `Slots::sector`), all in one window.
    first: usize,
    n: usize,
    /// What a write leaves (its version) or a discard or write-zeroes (zeroes).
    val: Val,
    fua: bool,
    seq_s: u64,
    log_s: usize,
    /// `u64::MAX` / `usize::MAX` until it completes.
    seq_c: u64,
    log_c: usize,
    error: Option<String>,
    /// A read's destination.
    buf: Option<Arc<ReadBuf>>,
}

impl Req {
    fn touches(&self, x: usize) -> bool {
        self.first <= x && x < self.first + self.n
    }
    fn ok(&self) -> bool {
        self.seq_c != u64::MAX && self.error.is_none()
    }
    fn describe(&self) -> String {
        let t = |v: u64| {
            if v == u64::MAX {
                "-".to_string()
            } else {
                v.to_string()
            }
        };
        format!(
            "{:?}{}{} seq {}..{} log {}..{}{}",
            self.kind,
            match self.val {
                Val::V(v) => format!(" v{v}"),
                Val::Zero => String::new(),
            },
            if self.fua { " fua" } else { "" },
            self.seq_s,
            t(self.seq_c),
            self.log_s,
            t(self.log_c as u64),
            self.error
                .as_ref()
                .map_or(String::new(), |e| format!(" failed: {e}"))
        )
    }
}

/// A read's destination: the engine writes it through raw pointers while the read is in
/// flight; the harness looks at it only once the read has completed.
struct ReadBuf(Box<[UnsafeCell<u8>]>);

// SAFETY: while the read is in flight only the engine touches the bytes (through the iovec);
// afterwards only the harness reads them, after the completion that hands them back (the
// requests' mutex orders the two).
unsafe impl Sync for ReadBuf {}

impl ReadBuf {
    fn new(len: usize) -> ReadBuf {
        ReadBuf((0..len).map(|_| UnsafeCell::new(0)).collect())
    }
    fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.0.as_ptr() as *mut libc::c_void,
            iov_len: self.0.len(),
        }
    }
    /// # Safety
    /// Only after the read completed.
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: UnsafeCell<u8> has u8's layout; the caller guarantees no writer remains.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len()) }
    }
}

/// The tracked blocks: `WINDOW` blocks at the start of each slot.
#[derive(Clone, Copy)]
struct Slots {
    count: u64,
}

impl Slots {
    fn blocks(&self) -> usize {
        (self.count * WINDOW) as usize
    }
    /// Tracked block index of a logical block.
    fn tracked(&self, lblk: u64) -> Option<usize> {
        let s = lblk / BLOCKS_PER_GROUP;
        let start = slot_lblk(s);
        (s < self.count && lblk >= start && lblk < start + WINDOW)
            .then(|| (s * WINDOW + lblk - start) as usize)
    }
    fn lblk(&self, tb: usize) -> u64 {
        slot_lblk(tb as u64 / WINDOW) + tb as u64 % WINDOW
    }
    /// Tracked sector `k` of logical block `lblk`.
    fn sector(&self, lblk: u64, k: usize) -> Option<usize> {
        self.tracked(lblk).map(|tb| tb * 8 + k)
    }
}

struct QueueSide {
    in_flight: AtomicUsize,
    completed: AtomicU64,
    wake: EventFd,
}

struct Ctx {
    rec: Arc<RecordingIo>,
    seq: AtomicU64,
    reqs: Mutex<Vec<Req>>,
    queues: Vec<QueueSide>,
    stop: AtomicBool,
}

struct Done {
    ctx: Arc<Ctx>,
    idx: usize,
    queue: usize,
}

impl Completion for Done {
    fn complete(self, r: Result<(), EngineError>) {
        let seq = self.ctx.seq.fetch_add(1, Ordering::SeqCst);
        let log = self.ctx.rec.len();
        {
            let mut reqs = self.ctx.reqs.lock().unwrap();
            let q = &mut reqs[self.idx];
            q.seq_c = seq;
            q.log_c = log;
            q.error = r.err().map(|e| e.to_string());
        }
        let side = &self.ctx.queues[self.queue];
        side.completed.fetch_add(1, Ordering::SeqCst);
        side.in_flight.fetch_sub(1, Ordering::SeqCst);
        let _ = side.wake.write(1);
    }
}

/// What the engine's counters and the log show happened in a run.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunCounts {
    pub requests: usize,
    pub throttled: u64,
    pub deferred_writes: u64,
    pub commits: u64,
    pub space_waits: u64,
    /// FUA overwrites that waited for a commit of a mapping change (`fua_commits`).
    pub fua_commits: u64,
    /// Writes still in flight when a barrier started (ordered only by a later one).
    pub straddling: usize,
    pub events: usize,
    /// Through the cache: writes that waited for room, discards and write-zeroes that waited
    /// for a writeback of their blocks, writebacks.
    pub cache_throttled: u64,
    pub cache_zeroes_waited: u64,
    pub cache_writebacks: u64,
}

/// A recorded concurrent run.
pub struct CRun {
    pub shape: Shape,
    base: Pages,
    size: u64,
    data_start: u64,
    slots: Slots,
    events: Vec<IoEvent>,
    reqs: Vec<Req>,
    pub counts: RunCounts,
}

/// Why a run could not be explored.
#[derive(Debug)]
pub enum RunError {
    /// The liveness watch: a queue with requests in flight completed nothing for `STALL`.
    Stalled(String),
    Failed(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Stalled(s) | RunError::Failed(s) => f.write_str(s),
        }
    }
}

fn shm_path(seed: u64) -> PathBuf {
    let dir = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!(
        "extblk-crash-concurrent-{}-{seed}.img",
        std::process::id()
    ))
}

/// Runs the workload on the real engine over a recorded file with io_uring queues. On a stall,
/// returns at once and leaves the stuck threads (and the engine) behind: nothing can end them.
pub fn workload(shape: Shape) -> Result<CRun, RunError> {
    let failed = |e: String| RunError::Failed(e);
    let layout = Layout::compute(DISK, JOURNAL_BLOCKS, None).map_err(|e| failed(e.to_string()))?;
    let size = layout.blocks_count * BS;
    let cio = CreateIo {
        size,
        pages: Mutex::new(HashMap::new()),
    };
    create(
        &cio,
        &layout,
        &CreateParams {
            label: "concurrent".into(),
            uuid: [shape.seed as u8 ^ 0x5A; 16],
            now: 1_700_000_000,
        },
    )
    .map_err(|e| failed(e.to_string()))?;
    let base = Pages(
        cio.pages
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|(b, p)| (b, p.into()))
            .collect(),
    );
    let slots = Slots {
        count: (0..)
            .take_while(|&s| slot_lblk(s) + WINDOW <= DISK / BS)
            .count() as u64,
    };
    // The real file: the image's metadata, and poison where the slots' data may go (identity
    // placement, and the spare blocks a relocated write takes nearby), so a read that returns
    // freed or never-written blocks sees someone else's bytes, as on a device.
    let path = shm_path(shape.seed);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).map_err(|e| failed(e.to_string()))?;
        f.set_len(size).map_err(|e| failed(e.to_string()))?;
        for (b, p) in &base.0 {
            f.write_all_at(p, b * BS)
                .map_err(|e| failed(e.to_string()))?;
        }
        for s in 0..slots.count {
            let p0 = layout.data_start + slot_lblk(s) - WINDOW;
            let bytes: Vec<u8> = (p0..p0 + 3 * WINDOW).flat_map(poison).collect();
            f.write_all_at(&bytes, p0 * BS)
                .map_err(|e| failed(e.to_string()))?;
        }
    }
    let backing = Backing::open(&path, false).map_err(|e| failed(e.to_string()))?;
    // Unlinked at once: the descriptors keep it while the engine runs, even a stuck one.
    let _ = std::fs::remove_file(&path);
    let file: Arc<dyn BlockIo> = Arc::new(SlowBarriers {
        inner: FileIo::new(backing),
        delay: shape.barrier_delay,
    });
    let rec = Arc::new(RecordingIo::new(file).with_ring());
    let engine = ImageEngine::open(
        rec.clone(),
        EngineOptions {
            commit_interval: shape.commit_interval,
            alloc_unit: shape.alloc_unit,
            ..Default::default()
        },
    )
    .map_err(|e| failed(format!("open: {e}")))?;
    let ctx = Arc::new(Ctx {
        rec: rec.clone(),
        seq: AtomicU64::new(1),
        reqs: Mutex::new(Vec::new()),
        queues: (0..2)
            .map(|_| QueueSide {
                in_flight: AtomicUsize::new(0),
                completed: AtomicU64::new(0),
                wake: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect(),
        stop: AtomicBool::new(false),
    });
    let version = Arc::new(AtomicU64::new(1));
    let cached = match shape.cache {
        Some(pages) => Some(Arc::new(
            CacheEngine::new(
                engine.clone(),
                CacheOptions {
                    size: pages * BS,
                    dirty_ratio: 50,
                    dirty_expire: Duration::from_millis(5),
                    file: None,
                    thread_start: None,
                },
            )
            .map_err(|e| failed(format!("cache: {e}")))?,
        )),
        None => None,
    };
    let threads = match &cached {
        Some(c) => spawn_queues(&ctx, c, shape, slots, &version),
        None => spawn_queues(&ctx, &Arc::new(engine.clone()), shape, slots, &version),
    };
    // The liveness watch: every queue with requests in flight must keep completing.
    let mut seen: Vec<(u64, Instant)> = vec![(0, Instant::now()); 2];
    while !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        for (q, side) in ctx.queues.iter().enumerate() {
            let done = side.completed.load(Ordering::SeqCst);
            let in_flight = side.in_flight.load(Ordering::SeqCst);
            if done != seen[q].0 || in_flight == 0 {
                seen[q] = (done, Instant::now());
            } else if seen[q].1.elapsed() >= STALL {
                ctx.stop.store(true, Ordering::SeqCst);
                return Err(RunError::Stalled(format!(
                    "queue {q} stopped completing: {in_flight} request(s) in flight, none \
                     completed for {:.1} s (engine: {})",
                    seen[q].1.elapsed().as_secs_f64(),
                    BlockEngine::counters(&engine)
                )));
            }
        }
    }
    for t in threads {
        t.join()
            .map_err(|_| failed("a queue thread panicked".into()))?
            .map_err(failed)?;
    }
    let st = engine.stats();
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut counts = RunCounts {
        throttled: g(&st.throttled),
        deferred_writes: g(&st.deferred_writes),
        commits: g(&st.commits),
        space_waits: g(&st.space_waits),
        fua_commits: g(&st.fua_commits),
        ..Default::default()
    };
    match &cached {
        Some(c) => {
            c.close().map_err(|e| failed(format!("close: {e}")))?;
            let cc = c.stats();
            counts.cache_throttled = cc.writes_throttled;
            counts.cache_zeroes_waited = cc.zeroes_waited;
            counts.cache_writebacks = cc.writeback_runs;
        }
        None => engine.close().map_err(|e| failed(format!("close: {e}")))?,
    }
    drop(cached);
    drop(engine);
    let reqs = std::mem::take(&mut *ctx.reqs.lock().unwrap());
    if let Some(r) = reqs.iter().find(|r| !r.ok()) {
        return Err(failed(format!("a request failed: {}", r.describe())));
    }
    let events = rec.events();
    counts.requests = reqs.len();
    counts.events = events.len();
    counts.straddling = pieces(&events).1;
    Ok(CRun {
        shape,
        base,
        size,
        data_start: layout.data_start,
        slots,
        events,
        reqs,
        counts,
    })
}

/// A request about to be submitted, and where it goes in the batch.
struct Planned {
    kind: Kind,
    lblk: u64,
    /// Sector in `lblk` and length, in sectors (a sweeping discard covers many windows and
    /// the untracked blocks between them).
    k: u64,
    n: u64,
    unmap: bool,
    fua: bool,
    /// Reads and overwrites go first in a batch, the allocating walk after them: the shape in
    /// which a queue holds fence guards of unsubmitted I/O when it reaches the log throttle.
    front: bool,
}

/// A sector range inside `slot`'s window: half of the time inside one block (sub-block), else
/// whole blocks.
fn range_in(rng: &mut Rng, slot: u64) -> (u64, u64, u64) {
    if rng.below(2) == 0 {
        let k = rng.below(8);
        let n = 1 + rng.below(8 - k);
        (slot_lblk(slot) + rng.below(WINDOW), k, n)
    } else {
        let blocks = 1 + rng.below(4);
        let b = rng.below(WINDOW - blocks + 1);
        (slot_lblk(slot) + b, 0, blocks * 8)
    }
}

/// The walk's next slot.
fn step(walk: &mut u64, slots: Slots) -> u64 {
    let s = *walk;
    *walk = (*walk + 1) % slots.count;
    s
}

/// Every this many requests a queue discards the whole disk (mkfs does): blocks are freed in
/// every group the walk has filled since, so the running transaction jumps past half the log
/// at once and the allocating writes after it meet the throttle.
const FULL_SWEEP_EVERY: usize = 1500;

/// The next request of a queue. `full_sweep`: discard every window and all between.
fn plan(rng: &mut Rng, walk: &mut u64, slots: Slots, fua: bool, full_sweep: bool) -> Planned {
    let fua = fua && rng.below(25) == 0;
    let p = |kind, (lblk, k, n): (u64, u64, u64), front| Planned {
        kind,
        lblk,
        k,
        n,
        unmap: false,
        fua,
        front,
    };
    if full_sweep {
        let blocks = slot_lblk(slots.count - 1) + WINDOW - slot_lblk(0);
        return p(Kind::Discard, (slot_lblk(0), 0, blocks * 8), false);
    }
    match rng.below(100) {
        0..=21 => {
            // Reads: of the hot slots, or of what the walk wrote lately.
            let slot = if rng.below(2) == 0 {
                rng.below(HOT)
            } else {
                (*walk + slots.count - 1 - rng.below(8)) % slots.count
            };
            let (lblk, _, _) = range_in(rng, slot);
            let n = 1 + rng.below(32.min((slot_lblk(slot) + WINDOW - lblk) * 8));
            Planned {
                fua: false,
                ..p(Kind::Read, (lblk, 0, n), true)
            }
        }
        22..=41 => {
            // Overlapping writes of both queues: partial writes into new blocks defer.
            let slot = rng.below(HOT);
            p(Kind::Write, range_in(rng, slot), true)
        }
        42..=79 | 84..=85 | 95..=97 => {
            // The walk: each write allocates in the next slot's group.
            let slot = step(walk, slots);
            p(Kind::Write, range_in(rng, slot), false)
        }
        80..=83 => {
            let slot = step(walk, slots);
            let (b, n) = if rng.below(2) == 0 {
                (0, WINDOW)
            } else {
                let n = 1 + rng.below(8);
                (rng.below(WINDOW - n + 1), n)
            };
            p(Kind::Discard, (slot_lblk(slot) + b, 0, n * 8), false)
        }
        86..=88 => {
            // Rewrites after discards in the hot slots relocate blocks: freed blocks of one
            // logical block can go to another.
            let n = 1 + rng.below(4);
            let b = rng.below(WINDOW - n + 1);
            p(
                Kind::Discard,
                (slot_lblk(rng.below(HOT)) + b, 0, n * 8),
                false,
            )
        }
        89..=94 => {
            let slot = if rng.below(2) == 0 {
                rng.below(HOT)
            } else {
                step(walk, slots)
            };
            Planned {
                unmap: rng.below(2) == 0,
                ..p(Kind::Zeroes, range_in(rng, slot), false)
            }
        }
        _ => Planned {
            fua: false,
            ..p(Kind::Flush, (0, 0, 0), false)
        },
    }
}

fn write_buffers(data: Vec<u8>) -> GuestBuffers {
    let keep = Arc::new(data);
    let iov = libc::iovec {
        iov_base: keep.as_ptr() as *mut libc::c_void,
        iov_len: keep.len(),
    };
    // SAFETY: the buffer lives in `keep`, held by the GuestBuffers; the engine only reads it.
    unsafe { GuestBuffers::new(vec![iov], keep) }
}

/// The two queue threads over `engine`.
fn spawn_queues<E: BlockEngine>(
    ctx: &Arc<Ctx>,
    engine: &Arc<E>,
    shape: Shape,
    slots: Slots,
    version: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<Result<(), String>>> {
    (0..2usize)
        .map(|q| {
            let (ctx, engine, version) = (ctx.clone(), engine.clone(), version.clone());
            std::thread::Builder::new()
                .name(format!("crash-queue-{q}"))
                .spawn(move || queue_thread(&ctx, &*engine, q, shape, slots, &version))
                .unwrap()
        })
        .collect()
}

fn queue_thread<E: BlockEngine>(
    ctx: &Arc<Ctx>,
    engine: &E,
    q: usize,
    shape: Shape,
    slots: Slots,
    version: &AtomicU64,
) -> Result<(), String> {
    let mut queue = engine
        .open_queue::<Done>(q)
        .map_err(|e| format!("open_queue: {e}"))?;
    let ring = queue
        .completion_fd()
        .ok_or("the engine gave the queue no io_uring")?;
    let side = &ctx.queues[q];
    let mut rng = Rng::new(shape.seed.wrapping_mul(0x9E37_79B9) ^ (q as u64 + 1));
    let mut walk = q as u64 * slots.count / 2;
    let mut issued = 0;
    let mut failure: Option<String> = None;
    // Once told to stop (another queue stalled), drain for a while: the ring must not be
    // dropped with reads in flight into buffers it frees.
    let mut stopping: Option<Instant> = None;
    loop {
        let in_flight = side.in_flight.load(Ordering::SeqCst);
        if ctx.stop.load(Ordering::SeqCst) {
            let since = *stopping.get_or_insert_with(Instant::now);
            if in_flight == 0 || since.elapsed() > Duration::from_secs(1) {
                return Ok(());
            }
        }
        let done_issuing =
            issued >= shape.requests_per_queue || failure.is_some() || stopping.is_some();
        if done_issuing && in_flight == 0 {
            return failure.map_or(Ok(()), Err);
        }
        // Top up in batches of at least four, so batches mix reads, overwrites and allocation.
        let room = DEPTH - in_flight;
        if !done_issuing && (room >= 4 || in_flight == 0) {
            let n = room.min(shape.requests_per_queue - issued);
            let mut batch: Vec<Planned> = (issued..issued + n)
                .map(|i| {
                    // The queues sweep half a period apart.
                    let full =
                        (i + q * FULL_SWEEP_EVERY / 2) % FULL_SWEEP_EVERY == FULL_SWEEP_EVERY - 1;
                    plan(&mut rng, &mut walk, slots, shape.fua, full)
                })
                .collect();
            batch.sort_by_key(|p| !p.front);
            for p in batch {
                if let Err(e) = submit(ctx, &mut queue, q, slots, version, p) {
                    failure = Some(e);
                    break;
                }
                issued += 1;
            }
            queue.submit_batch();
        }
        let mut fds = [
            libc::pollfd {
                fd: ring,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&side.wake),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two initialised pollfds, for the length passed.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
        queue.process_completions();
        let _ = side.wake.read();
    }
}

fn submit(
    ctx: &Arc<Ctx>,
    queue: &mut impl EngineQueue<Done>,
    q: usize,
    slots: Slots,
    version: &AtomicU64,
    p: Planned,
) -> Result<(), String> {
    // The tracked sectors the request covers: from its first to its last sector, which lie in
    // windows (contiguous in tracked numbering even when a sweep spans windows).
    let (first, n) = match p.kind {
        Kind::Flush => (0, 0),
        _ => {
            let end = p.lblk * 8 + p.k + p.n - 1;
            let first = slots.sector(p.lblk, p.k as usize);
            let last = slots.sector(end / 8, (end % 8) as usize);
            match (first, last) {
                (Some(f), Some(l)) => (f, l + 1 - f),
                _ => return Err("planned outside the windows".into()),
            }
        }
    };
    let offset = Bytes(p.lblk * BS + p.k * 512);
    let len = Bytes(p.n * 512);
    let mut val = Val::Zero;
    let mut buf = None;
    let op = match p.kind {
        Kind::Read => {
            let b = Arc::new(ReadBuf::new(len.0 as usize));
            let iov = b.iovec();
            buf = Some(b.clone());
            // SAFETY: the buffer lives in the Arc the GuestBuffers hold; the engine is its only
            // user until the read completes.
            let bufs = unsafe { GuestBuffers::new(vec![iov], b) };
            EngineOp::Read { offset, bufs }
        }
        Kind::Write => {
            let v = version.fetch_add(1, Ordering::SeqCst);
            if v >= 1 << 16 {
                return Err("too many writes for a 16-bit version".into());
            }
            val = Val::V(v);
            let data: Vec<u8> = (first..first + n)
                .flat_map(|x| {
                    let (lblk, k) = (slots.lblk(x / 8), (x % 8) as u64);
                    (0..64).flat_map(move |j| stamp_word(lblk, v, k * 64 + j).to_le_bytes())
                })
                .collect();
            EngineOp::Write {
                offset,
                bufs: write_buffers(data),
                fua: p.fua,
            }
        }
        Kind::Flush => EngineOp::Flush,
        Kind::Discard | Kind::Zeroes => {
            let ranges = vec![ZeroRange {
                range: ByteRange { offset, len },
                unmap: p.unmap,
            }];
            if p.kind == Kind::Discard {
                EngineOp::Discard { ranges, fua: p.fua }
            } else {
                EngineOp::WriteZeroes { ranges, fua: p.fua }
            }
        }
    };
    let idx = {
        let log_s = ctx.rec.len();
        let seq_s = ctx.seq.fetch_add(1, Ordering::SeqCst);
        let mut reqs = ctx.reqs.lock().unwrap();
        reqs.push(Req {
            kind: p.kind,
            first,
            n,
            val,
            fua: p.fua,
            seq_s,
            log_s,
            seq_c: u64::MAX,
            log_c: usize::MAX,
            error: None,
            buf,
        });
        reqs.len() - 1
    };
    ctx.queues[q].in_flight.fetch_add(1, Ordering::SeqCst);
    queue.submit(
        op,
        Done {
            ctx: ctx.clone(),
            idx,
            queue: q,
        },
    );
    Ok(())
}

/// Every read returned, per sector, a value some write that overlapped the read in time left,
/// or the value of the last write completed before the read started (zeroes for none): never
/// older data, another block's data, or poison. A sector that a write was changing while it was
/// read may mix the two (the page cache copies without sector atomicity, and virtio promises
/// none): then each of its words must belong to an allowed value. Returns the sectors checked.
pub fn check_reads(run: &CRun) -> Result<usize, String> {
    let m = Index::new(run);
    let mut checked = 0;
    for (ri, r) in run.reqs.iter().enumerate() {
        let Some(buf) = &r.buf else { continue };
        // SAFETY: the run is over: every read completed, and nothing writes the buffer now.
        let bytes = unsafe { buf.bytes() };
        for i in 0..r.n {
            let x = r.first + i;
            let (lblk, k) = (run.slots.lblk(x / 8), x % 8);
            let fail = |why: String| {
                format!(
                    "read #{ri} ({}) of block {lblk} sector {k}: {why}; requests on that sector: {}",
                    r.describe(),
                    m.history(run, x, r.log_c, &[])
                )
            };
            // The newest submission among writes completed before the read was submitted:
            // anything completed before that is overwritten.
            let floor = m.touch[x]
                .iter()
                .map(|&y| &run.reqs[y])
                .filter(|y| y.ok() && y.seq_c < r.seq_s)
                .map(|y| y.seq_s)
                .max()
                .unwrap_or(0);
            let live = |c: &Req| c.seq_s < r.seq_c && c.seq_c >= floor;
            let allowed = |v: Val| match v {
                Val::V(ver) => m
                    .writer(ver)
                    .is_some_and(|c| run.reqs[c].touches(x) && live(&run.reqs[c])),
                Val::Zero => {
                    floor == 0
                        || m.touch[x]
                            .iter()
                            .map(|&z| &run.reqs[z])
                            .any(|z| z.val == Val::Zero && live(z))
                }
            };
            let sector = &bytes[i * 512..(i + 1) * 512];
            match decode(lblk, k, sector) {
                Ok(v) if allowed(v) => {}
                Ok(v) => return Err(fail(format!("holds {v:?}"))),
                Err(e) => {
                    let racing = m.touch[x]
                        .iter()
                        .map(|&y| &run.reqs[y])
                        .any(|y| y.seq_s < r.seq_c && y.seq_c > r.seq_s && y.kind != Kind::Discard);
                    if !racing {
                        return Err(fail(e));
                    }
                    for (j, w) in sector.chunks_exact(8).enumerate() {
                        let w = u64::from_le_bytes(w.try_into().unwrap());
                        let v = if w == 0 {
                            Val::Zero
                        } else {
                            let ver = (w >> 8) & 0xFFFF;
                            if w != stamp_word(lblk, ver, (k * 64 + j) as u64) {
                                return Err(fail(format!("word {j} ({w:#x}): {e}")));
                            }
                            Val::V(ver)
                        };
                        if !allowed(v) {
                            return Err(fail(format!("word {j} holds {v:?} (mixed sector)")));
                        }
                    }
                }
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// The requests by sector and by version.
struct Index {
    /// Per tracked sector, the writes, discards and write-zeroes touching it, in submission
    /// order.
    touch: Vec<Vec<usize>>,
    /// The write of each version (`usize::MAX`: none).
    by_version: Vec<usize>,
}

impl Index {
    fn new(run: &CRun) -> Index {
        let mut touch = vec![Vec::new(); run.slots.blocks() * 8];
        let mut by_version = Vec::new();
        for (i, r) in run.reqs.iter().enumerate() {
            if matches!(r.kind, Kind::Write | Kind::Discard | Kind::Zeroes) {
                for t in &mut touch[r.first..r.first + r.n] {
                    t.push(i);
                }
            }
            if let Val::V(v) = r.val {
                let v = v as usize;
                if by_version.len() <= v {
                    by_version.resize(v + 1, usize::MAX);
                }
                by_version[v] = i;
            }
        }
        Index { touch, by_version }
    }

    fn writer(&self, version: u64) -> Option<usize> {
        self.by_version
            .get(version as usize)
            .copied()
            .filter(|&i| i != usize::MAX)
    }

    /// The requests on sector `x` submitted by log position `until` (the last few).
    fn history(&self, run: &CRun, x: usize, until: usize, durable: &[bool]) -> String {
        let t: Vec<usize> = self.touch[x]
            .iter()
            .copied()
            .filter(|&i| run.reqs[i].log_s <= until)
            .collect();
        t[t.len().saturating_sub(10)..]
            .iter()
            .map(|&i| {
                let d = if durable.get(i).copied().unwrap_or(false) {
                    " (durable)"
                } else {
                    ""
                };
                format!("#{i} {}{d}", run.reqs[i].describe())
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// What each tracked sector may hold after a crash at a cut, moving forward cut by cut.
///
/// Request R is durable at cut k if it completed before a FLUSH was submitted that completed
/// by k (its `log_c` ≤ k), or is a FUA request completed by k. A value of X (a write's version,
/// or zeroes of a discard or write-zeroes, or the initial zeroes) is allowed in a sector unless
/// a durable request on that sector was submitted after X completed (it overwrote X for good);
/// X must have been submitted by the cut. So a value acknowledged before a completed FLUSH is
/// there, and anything in flight or completed since may be.
struct Model {
    /// Per tracked sector, the latest submission among requests durable there (0: none).
    floor: Vec<u64>,
    /// Per tracked sector, the latest completion among discards and write-zeroes on it
    /// submitted by the cut (0: none; `u64::MAX`: one never completed).
    zero_done: Vec<u64>,
    durable: Vec<bool>,
    /// Completed flushes by completion (`log_c`, `seq_s`), and the requests by completion.
    flushes: Vec<(usize, u64)>,
    next_flush: usize,
    by_seq_c: Vec<usize>,
    next_seq: usize,
    threshold: u64,
    fua_by_log: Vec<usize>,
    next_fua: usize,
    zeroing_by_log: Vec<usize>,
    next_zeroing: usize,
}

impl Model {
    fn new(run: &CRun) -> Model {
        let data = |r: &Req| r.ok() && r.kind != Kind::Read && r.kind != Kind::Flush;
        let mut flushes: Vec<(usize, u64)> = run
            .reqs
            .iter()
            .filter(|r| r.kind == Kind::Flush && r.ok())
            .map(|r| (r.log_c, r.seq_s))
            .collect();
        flushes.sort_unstable();
        let sorted = |keep: &dyn Fn(&Req) -> bool, key: &dyn Fn(&Req) -> u64| {
            let mut v: Vec<usize> = (0..run.reqs.len())
                .filter(|&i| keep(&run.reqs[i]))
                .collect();
            v.sort_by_key(|&i| key(&run.reqs[i]));
            v
        };
        Model {
            floor: vec![0; run.slots.blocks() * 8],
            zero_done: vec![0; run.slots.blocks() * 8],
            durable: vec![false; run.reqs.len()],
            flushes,
            next_flush: 0,
            by_seq_c: sorted(&|r| data(r), &|r| r.seq_c),
            next_seq: 0,
            threshold: 0,
            fua_by_log: sorted(&|r| data(r) && r.fua, &|r| r.log_c as u64),
            next_fua: 0,
            zeroing_by_log: sorted(&|r| matches!(r.kind, Kind::Discard | Kind::Zeroes), &|r| {
                r.log_s as u64
            }),
            next_zeroing: 0,
        }
    }

    fn make_durable(&mut self, run: &CRun, i: usize) {
        if std::mem::replace(&mut self.durable[i], true) {
            return;
        }
        let r = &run.reqs[i];
        for f in &mut self.floor[r.first..r.first + r.n] {
            *f = (*f).max(r.seq_s);
        }
    }

    fn advance(&mut self, run: &CRun, cut: usize) {
        while let Some(&(log_c, seq_s)) = self.flushes.get(self.next_flush) {
            if log_c > cut {
                break;
            }
            self.threshold = self.threshold.max(seq_s);
            self.next_flush += 1;
        }
        while let Some(&i) = self.by_seq_c.get(self.next_seq) {
            if run.reqs[i].seq_c >= self.threshold {
                break;
            }
            self.make_durable(run, i);
            self.next_seq += 1;
        }
        while let Some(&i) = self.fua_by_log.get(self.next_fua) {
            if run.reqs[i].log_c > cut {
                break;
            }
            self.make_durable(run, i);
            self.next_fua += 1;
        }
        while let Some(&i) = self.zeroing_by_log.get(self.next_zeroing) {
            let r = &run.reqs[i];
            if r.log_s > cut {
                break;
            }
            for z in &mut self.zero_done[r.first..r.first + r.n] {
                *z = (*z).max(r.seq_c);
            }
            self.next_zeroing += 1;
        }
    }

    fn allows(&self, run: &CRun, ix: &Index, x: usize, v: Val, cut: usize) -> bool {
        let floor = self.floor[x];
        match v {
            Val::V(ver) => ix.writer(ver).is_some_and(|c| {
                let c = &run.reqs[c];
                c.touches(x) && c.log_s <= cut && c.seq_c >= floor
            }),
            // The initial zeroes until something is durable; else a discard or write-zeroes
            // that completed after (or not before) the durable floor.
            Val::Zero => floor == 0 || self.zero_done[x] >= floor,
        }
    }
}

/// Totals over explored runs.
#[derive(Debug, Default)]
pub struct ExploreStats {
    pub states: usize,
    pub cuts: usize,
    pub e2fsck: usize,
    /// The most writes a crash state could hold or lose, unordered, at one cut.
    pub max_unordered: usize,
    /// Time spent opening (replaying), checking and judging the data of states.
    pub open: Duration,
    pub check: Duration,
    pub data: Duration,
}

/// Explores about `target` crash states of `run`: cuts at the start and end of barriers and
/// after completions (sampled), each as the full prefix, two random subsets of the unordered
/// writes in random orders, and the prefix with one unordered 4 KiB write torn at 512 bytes.
/// Every state is opened (replay), checked and judged against the model; every
/// `e2fsck_every`-th is judged by e2fsprogs too. The cuts are split among up to
/// `EXTBLK_CRASH_THREADS` threads (default: 2, or the cores there are), each walking its share
/// forward; the first violation (of the earliest share) is returned.
pub fn explore(
    run: &CRun,
    target: usize,
    e2fsck_every: usize,
    dir: &Path,
    stats: &mut ExploreStats,
) -> Result<(), String> {
    let mut rng = Rng::new(run.shape.seed ^ 0xC0FF_EE00);
    let (pieces, _) = pieces(&run.events);
    // Each write's bytes once, shared by every state that holds them.
    let data: HashMap<usize, Page> = pieces
        .iter()
        .filter_map(|p| match &run.events[p.at] {
            IoEvent::Write { data, .. } => Some((p.at, Page::from(&data[..]))),
            _ => None,
        })
        .collect();
    let ix = Index::new(run);
    let cuts: Vec<usize> = pick_cuts(run, target, &mut rng).into_iter().collect();
    // Pieces in the order they become durable (and in log order among those of one barrier).
    let mut by_durable: Vec<usize> = (0..pieces.len())
        .filter(|&i| pieces[i].durable_from != usize::MAX)
        .collect();
    by_durable.sort_by_key(|&i| (pieces[i].durable_from, pieces[i].at));
    let threads = std::env::var("EXTBLK_CRASH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(2)))
        .max(1);
    let stop = AtomicBool::new(false);
    let share = Share {
        run,
        pieces: &pieces,
        data: &data,
        ix: &ix,
        by_durable: &by_durable,
        e2fsck_every,
        dir,
        stop: &stop,
    };
    let parts: Vec<(ExploreStats, Result<(), String>)> = std::thread::scope(|s| {
        let share = &share;
        let handles: Vec<_> = cuts
            .chunks(cuts.len().div_ceil(threads).max(1))
            .enumerate()
            .map(|(t, part)| s.spawn(move || share.explore(t, part)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        ExploreStats::default(),
                        Err("an explorer thread panicked".into()),
                    )
                })
            })
            .collect()
    });
    let mut first_error = None;
    for (st, r) in parts {
        stats.states += st.states;
        stats.cuts += st.cuts;
        stats.e2fsck += st.e2fsck;
        stats.max_unordered = stats.max_unordered.max(st.max_unordered);
        stats.open += st.open;
        stats.check += st.check;
        stats.data += st.data;
        if let (Err(e), None) = (r, &first_error) {
            first_error = Some(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// A write or punch of a crash state, with the write's bytes as a shared page when it has one.
type Applied<'a> = (&'a Piece, &'a IoEvent, Option<&'a Page>);

/// What the explorer threads share, read-only.
struct Share<'a> {
    run: &'a CRun,
    pieces: &'a [Piece],
    data: &'a HashMap<usize, Page>,
    ix: &'a Index,
    by_durable: &'a [usize],
    e2fsck_every: usize,
    dir: &'a Path,
    /// Set by the first thread that finds a violation: the others stop.
    stop: &'a AtomicBool,
}

impl<'p> Share<'p> {
    /// Explores `cuts` (ascending) with its own durable image and model, built forward from
    /// the start of the log.
    fn explore(&self, t: usize, cuts: &[usize]) -> (ExploreStats, Result<(), String>) {
        let mut stats = ExploreStats::default();
        let r = self.explore_into(t, cuts, &mut stats);
        if r.is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
        (stats, r)
    }

    fn explore_into(
        &self,
        t: usize,
        cuts: &[usize],
        stats: &mut ExploreStats,
    ) -> Result<(), String> {
        let Share {
            run,
            pieces,
            data,
            ix,
            by_durable,
            e2fsck_every,
            dir,
            ..
        } = *self;
        let mut rng = Rng::new(run.shape.seed ^ 0xC0FF_EE00 ^ ((t as u64 + 1) << 40));
        let mut model = Model::new(run);
        // The durable image twice: on a block device a discard leaves the old bytes (so a bug
        // that exposes freed blocks shows stale data), in a sparse file a punched range reads
        // as zeroes (so a punch of blocks already reused destroys data). Cuts alternate.
        let mut bases = [(); 2].map(|_| Arc::new(Pages(run.base.0.clone())));
        let mut base_writers: [Writers; 2] = Default::default();
        let mut next_durable = 0;
        let mut next_piece = 0;
        let mut unordered: BTreeSet<usize> = BTreeSet::new();
        let mut cache = Cache::default();
        for &cut in cuts {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            while pieces.get(next_piece).is_some_and(|p| p.at < cut) {
                unordered.insert(next_piece);
                next_piece += 1;
            }
            while let Some(&i) = by_durable.get(next_durable) {
                if pieces[i].durable_from > cut {
                    break;
                }
                let at = pieces[i].at;
                for (zeroes, (base, writers)) in bases.iter_mut().zip(&mut base_writers).enumerate()
                {
                    let pages = Arc::get_mut(base).ok_or("a crash state outlived its judgement")?;
                    apply_to(
                        &mut pages.0,
                        |b| default_page(b, run.data_start),
                        writers,
                        None,
                        &pieces[i],
                        &run.events[at],
                        data.get(&at),
                        zeroes == 1,
                    );
                }
                unordered.remove(&i);
                next_durable += 1;
            }
            let punch_zeroes = cut % 2 == 1;
            let base = &bases[usize::from(punch_zeroes)];
            let under = &base_writers[usize::from(punch_zeroes)];
            model.advance(run, cut);
            stats.cuts += 1;
            stats.max_unordered = stats.max_unordered.max(unordered.len());
            let un: Vec<&Piece> = unordered.iter().map(|&i| &pieces[i]).collect();
            let ev = |p: &Piece| &run.events[p.at];
            // One unordered 4 KiB write torn: only some of its sectors reached the disk.
            let whole: Vec<&Piece> = un
                .iter()
                .copied()
                .filter(
                    |p| matches!(ev(p), IoEvent::Write { data, .. } if data.len() == BS as usize),
                )
                .collect();
            let mut torn = Vec::new();
            let torn_piece = whole
                .get(rng.below(whole.len().max(1) as u64) as usize)
                .copied();
            let torn_at = torn_piece.map(|p| p.at);

            if let Some(IoEvent::Write { offset, data, .. }) = torn_at.map(|at| &run.events[at]) {
                for s in (0..data.len()).step_by(512) {
                    if rng.below(2) == 0 {
                        torn.push(IoEvent::Write {
                            offset: offset + s as u64,
                            data: data[s..s + 512].to_vec(),
                            id: u64::MAX,
                        });
                    }
                }
            }
            let mut variants: Vec<(String, Vec<Applied>)> = Vec::new();
            let with_data = |p: &'p Piece| -> Applied<'p> { (p, ev(p), data.get(&p.at)) };
            variants.push(("prefix".into(), un.iter().map(|p| with_data(p)).collect()));
            if un.len() > 1 {
                for k in 0..2 {
                    // A random subset of the unordered writes, in a random order.
                    let mut sub: Vec<Applied> = un
                        .iter()
                        .filter(|_| rng.below(2) == 0)
                        .map(|p| with_data(p))
                        .collect();
                    for i in (1..sub.len()).rev() {
                        sub.swap(i, rng.below(i as u64 + 1) as usize);
                    }
                    variants.push((format!("subset {k}"), sub));
                }
            }
            if let Some(tp) = torn_piece {
                let t = tp.at;
                let mut all: Vec<Applied> = un
                    .iter()
                    .filter(|p| Some(p.at) != torn_at)
                    .map(|p| with_data(p))
                    .collect();
                all.extend(torn.iter().map(|e| (tp, e, None)));
                let IoEvent::Write { offset, data, .. } = &run.events[t] else {
                    unreachable!("only writes are torn")
                };
                // Name jbd2 blocks (big-endian magic, then the block type) in a report.
                let kind = match (
                    &data[..4],
                    u32::from_be_bytes([data[4], data[5], data[6], data[7]]),
                ) {
                    ([0xC0, 0x3B, 0x39, 0x98], 1) => " (journal descriptor)",
                    ([0xC0, 0x3B, 0x39, 0x98], 2) => " (journal commit block)",
                    ([0xC0, 0x3B, 0x39, 0x98], 4) => " (journal superblock)",
                    ([0xC0, 0x3B, 0x39, 0x98], 5) => " (journal revoke block)",
                    _ => "",
                };
                variants.push((format!("block {} torn{kind}", offset / BS), all));
            }
            for (what, events) in variants {
                let mut over: HashMap<u64, Page> = HashMap::new();
                let mut writers = Writers::new();
                for (piece, e, shared) in events {
                    let fallback = |b: u64| {
                        base.0
                            .get(&b)
                            .cloned()
                            .unwrap_or_else(|| default_page(b, run.data_start))
                    };
                    apply_to(
                        &mut over,
                        fallback,
                        &mut writers,
                        Some(under),
                        piece,
                        e,
                        shared,
                        punch_zeroes,
                    );
                }
                let io = Arc::new(StateIo {
                    size: run.size,
                    poison_from: run.data_start,
                    base: base.clone(),
                    over,
                });
                stats.states += 1;
                let at = |e: String| {
                    format!(
                        "seed {} unit {}: cut {cut}/{} ({what}, {} unordered): {e}",
                        run.shape.seed,
                        run.shape.alloc_unit,
                        run.events.len(),
                        un.len()
                    )
                };
                let runs = judge(&io, run, ix, &model, cut, &mut cache, stats).map_err(|e| {
                    // The block the violation names, unless the variable names one.
                    if let Ok(v) = std::env::var("EXTBLK_CRASH_TRACE") {
                        let named = e.split_once("block ").and_then(|(_, r)| {
                            r.split(' ').next()?.trim_end_matches(',').parse().ok()
                        });
                        if let Some(l) = v.parse().ok().or(named) {
                            trace(run, &io, l, cut);
                        }
                    }
                    at(e)
                })?;
                if e2fsck_every > 0 && stats.states % e2fsck_every == 0 {
                    let p = dir.join(format!("concurrent-{t}-{}.img", stats.states));
                    export(&io, &p).map_err(|e| at(e.to_string()))?;
                    e2fsck_file_agrees(&p, runs).map_err(at)?;
                    stats.e2fsck += 1;
                }
            }
        }
        Ok(())
    }
}

/// For debugging a violation (`EXTBLK_CRASH_TRACE=<logical block>`): the block's mapping in
/// the crash state, and the log's writes near its identity placement and barriers up to the cut.
fn trace(run: &CRun, io: &Arc<StateIo>, lblk: u64, cut: usize) {
    // The block's identity placement, and where the crash state maps it.
    let mut at = vec![run.data_start + lblk];
    if let Ok(img) = Image::open(io.clone(), OpenOptions { read_only: true }) {
        let near: Vec<_> = img
            .runs()
            .into_iter()
            .filter(|r| r.lblk <= lblk + WINDOW && r.lblk + r.len + WINDOW > lblk)
            .collect();
        println!("mapping near {lblk}: {near:?}");
        at.extend(near.iter().filter_map(|r| {
            (r.lblk <= lblk && lblk < r.lblk + r.len).then_some(r.pblk? + (lblk - r.lblk))
        }));
    }
    let near = |b: u64| {
        at.iter()
            .any(|&p| p.saturating_sub(WINDOW) <= b && b < p + WINDOW)
    };
    let mut ids = std::collections::HashSet::new();
    for (i, e) in run.events.iter().enumerate().take(cut + 1) {
        match e {
            IoEvent::Write { offset, data, id } if near(offset / BS) => {
                ids.insert(*id);
                let w = u64::from_le_bytes(data[..8].try_into().unwrap());
                println!(
                    "{i}: write #{id} block {} +{} len {} first word {w:#x}",
                    offset / BS,
                    offset % BS,
                    data.len()
                );
            }
            IoEvent::Complete { id, durable } if ids.contains(id) => {
                println!(
                    "{i}: complete #{id}{}",
                    if *durable { " (dsync)" } else { "" }
                );
            }
            IoEvent::Punch { offset, len } => println!(
                "{i}: punch blocks {}..{}{}",
                offset / BS,
                (offset + len).div_ceil(BS),
                if at
                    .iter()
                    .any(|&p| (offset / BS..(offset + len).div_ceil(BS)).contains(&p))
                {
                    " (covers the block)"
                } else {
                    ""
                }
            ),
            IoEvent::FlushStart | IoEvent::FlushEnd => println!("{i}: {e:?}"),
            _ => {}
        }
    }
}

/// The cuts to explore, ascending: around barriers (before the start, before and after the
/// end) and after completions, about `target / 3.5` of them (a cut gives up to four states),
/// barrier cuts first; and the end of the log.
fn pick_cuts(run: &CRun, target: usize, rng: &mut Rng) -> BTreeSet<usize> {
    let mut barrier = Vec::new();
    let mut completion = Vec::new();
    for (i, e) in run.events.iter().enumerate() {
        match e {
            IoEvent::FlushStart => barrier.push(i),
            IoEvent::FlushEnd => barrier.extend([i, i + 1]),
            IoEvent::Complete { .. } => completion.push(i + 1),
            _ => {}
        }
    }
    let want = (target as f64 / 3.5) as usize;
    let mut cuts = BTreeSet::from([run.events.len()]);
    let mut take = |from: &[usize], n: usize, cuts: &mut BTreeSet<usize>| {
        let goal = (cuts.len() + n).min(cuts.len() + from.len());
        while cuts.len() < goal {
            cuts.insert(from[rng.below(from.len() as u64) as usize]);
        }
    };
    if barrier.len() >= want {
        take(&barrier, want, &mut cuts);
    } else {
        cuts.extend(barrier.iter().copied());
        let more = want.saturating_sub(cuts.len());
        take(&completion, more, &mut cuts);
    }
    cuts
}

/// The greatest `Piece::at` applied to each 512-byte sector of a block so far.
type Writers = HashMap<u64, [usize; 8]>;

/// Applies `piece`'s event, a write (its bytes shared as `shared` when it is a whole page) or
/// a punch, to `pages`; a page not there yet starts as `fallback(block)`. Sectors a piece
/// submitted after this one completed has already written keep their bytes: that piece is
/// ordered after it (`Piece::done`), whatever order the two became durable in. `writers`
/// tracks that, on top of `under` (the durable image's, under an overlay).
#[allow(clippy::too_many_arguments)]
fn apply_to(
    pages: &mut HashMap<u64, Page>,
    fallback: impl Fn(u64) -> Page,
    writers: &mut Writers,
    under: Option<&Writers>,
    piece: &Piece,
    e: &IoEvent,
    shared: Option<&Page>,
    punch_zeroes: bool,
) {
    // Per block: the byte range it changes and, for a write, its bytes there.
    let (first, end, data) = match e {
        IoEvent::Write { offset, data, .. } => (*offset, offset + data.len() as u64, Some(data)),
        IoEvent::Punch { offset, len } if punch_zeroes => (*offset, offset + len, None),
        _ => return,
    };
    for b in first / BS..end.div_ceil(BS) {
        let (s, t) = (first.max(b * BS), end.min((b + 1) * BS));
        let w = writers
            .entry(b)
            .or_insert_with(|| under.and_then(|u| u.get(&b)).copied().unwrap_or([0; 8]));
        let sectors = (s - b * BS) / 512..(t - b * BS).div_ceil(512);
        let mut mine = [false; 8];
        for k in sectors.map(|k| k as usize) {
            mine[k] = piece.done >= w[k];
            if mine[k] {
                w[k] = w[k].max(piece.at);
            }
        }
        let whole = s == b * BS && t == (b + 1) * BS;
        match shared.filter(|_| whole && mine.iter().all(|&m| m)) {
            Some(p) => {
                pages.insert(b, p.clone());
            }
            None if mine.iter().any(|&m| m) => {
                let page = pages.entry(b).or_insert_with(|| fallback(b));
                // Shared (a write's bytes, or the durable page under an overlay): copy first.
                let p = match Arc::get_mut(page) {
                    Some(p) => p,
                    None => {
                        *page = page.to_vec().into();
                        Arc::get_mut(page).expect("a fresh copy is not shared")
                    }
                };
                for (k, _) in mine.iter().enumerate().filter(|(_, &m)| m) {
                    let (x, y) = (
                        (b * BS + k as u64 * 512).max(s),
                        (b * BS + (k as u64 + 1) * 512).min(t),
                    );
                    let dst = &mut p[(x - b * BS) as usize..(y - b * BS) as usize];
                    match data {
                        Some(d) => {
                            dst.copy_from_slice(&d[(x - first) as usize..(y - first) as usize])
                        }
                        None => dst.fill(0),
                    }
                }
            }
            None => {}
        }
    }
}

/// Writes a crash state to a sparse file (unwritten pages as holes) for e2fsprogs.
fn export(io: &StateIo, p: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p)?;
    f.set_len(io.size)?;
    for (b, page) in io.base.0.iter() {
        if !io.over.contains_key(b) {
            f.write_all_at(page, b * BS)?;
        }
    }
    for (b, page) in &io.over {
        f.write_all_at(page, b * BS)?;
    }
    Ok(())
}

/// Decoded pages, by the page's address and the logical block it was read as. An entry holds
/// its page, so the page can neither change in place (`Arc::get_mut` fails) nor be freed and
/// its address reused while it is cached.
#[derive(Default)]
struct Cache(HashMap<(usize, u64), (Page, [Val; 8])>);

impl Cache {
    fn get(&mut self, lblk: u64, page: &Page) -> Result<[Val; 8], (usize, String)> {
        let key = (page.as_ptr() as usize, lblk);
        if let Some((_, v)) = self.0.get(&key) {
            return Ok(*v);
        }
        let mut out = [Val::Zero; 8];
        for (k, v) in out.iter_mut().enumerate() {
            *v = decode(lblk, k, &page[k * 512..(k + 1) * 512]).map_err(|e| (k, e))?;
        }
        if self.0.len() > 200_000 {
            self.0.clear();
        }
        self.0.insert(key, (page.clone(), out));
        Ok(out)
    }
}

/// One crash state: opens (replays) and checks the image, then judges every tracked block, and
/// every mapped block outside the windows (zeroes only). Returns our mapping, for e2fsck.
fn judge(
    io: &Arc<StateIo>,
    run: &CRun,
    ix: &Index,
    model: &Model,
    cut: usize,
    cache: &mut Cache,
    stats: &mut ExploreStats,
) -> Result<Vec<extblk::image::Run>, String> {
    let t = Instant::now();
    let img = Image::open(io.clone(), OpenOptions { read_only: true })
        .map_err(|e| format!("open: {e}"))?;
    stats.open += t.elapsed();
    let t = Instant::now();
    let report = extblk::check::check(&img, "crash".into());
    stats.check += t.elapsed();
    if !report.problems.is_empty() {
        return Err(format!("check: {:?}", report.problems));
    }
    let t = Instant::now();
    let mut mapped = vec![false; run.slots.blocks()];
    let why = |lblk: u64, k: usize, what: String| {
        let x = run.slots.sector(lblk, k).unwrap_or(0);
        format!(
            "block {lblk} sector {k} {what}; durable floor seq {}; requests on it: {}",
            model.floor[x],
            ix.history(run, x, cut, &model.durable)
        )
    };
    for e in img.tree().iter().filter(|e| !e.unwritten) {
        for i in 0..u64::from(e.len) {
            let (lblk, pblk) = (u64::from(e.lblk) + i, e.pblk + i);
            let Some(tb) = run.slots.tracked(lblk) else {
                let zero = io.page(pblk).is_some_and(|p| p.iter().all(|&b| b == 0));
                if !zero {
                    return Err(format!(
                        "block {lblk}, never written, is mapped to block {pblk} holding data"
                    ));
                }
                continue;
            };
            mapped[tb] = true;
            let vals = match io.page(pblk) {
                Some(p) => cache.get(lblk, p),
                None => Err((
                    0,
                    decode(lblk, 0, &poison(pblk)[..512])
                        .err()
                        .unwrap_or_default(),
                )),
            }
            .map_err(|(k, e)| why(lblk, k, e))?;
            for (k, &v) in vals.iter().enumerate() {
                if !model.allows(run, ix, tb * 8 + k, v, cut) {
                    return Err(why(lblk, k, format!("holds {v:?}")));
                }
            }
        }
    }
    for (tb, _) in mapped.iter().enumerate().filter(|(_, m)| !**m) {
        for k in 0..8 {
            if !model.allows(run, ix, tb * 8 + k, Val::Zero, cut) {
                let lblk = run.slots.lblk(tb);
                return Err(why(lblk, k, "reads as zeroes (not mapped written)".into()));
            }
        }
    }
    stats.data += t.elapsed();
    Ok(img.runs())
}
