//! The vhost-user-blk device: virtio-blk on top of `vhost-user-backend`.
//!
//! One thread per virtqueue pops descriptor chains, parses them ([`request`]) and submits them
//! to the engine queue that thread owns. Completions reach the used ring through
//! [`completion::VirtioCompletion`] from whichever thread finishes the request. This module
//! never touches a file: storage is the engine's business.

pub mod batch;
pub mod chain;
pub mod completion;
pub mod config;
pub mod inflight;
pub mod relay;
pub mod request;
pub mod stats;

#[cfg(test)]
mod tests;

use std::io;
use std::num::Wrapping;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_queue::QueueT;
use vm_memory::Bytes as _;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::engine::{BlockEngine, EngineError, EngineInfo, EngineOp, EngineQueue};
use crate::units::{Bytes, SECTOR_SIZE};
use completion::{
    publish_used, BatchScope, Counters, GuestMem, GuestMemAtomic, QueueShared, VirtioCompletion,
    Vring,
};
use config::{BlkConfig, WRITEBACK_OFFSET};
use inflight::{InflightError, InflightRegion};
use request::{Limits, Parsed, Request, Status, ID_BYTES};

/// Largest data segment a guest may send, advertised as size_max.
pub const SIZE_MAX: u32 = 1 << 20;
/// Discard and write-zeroes segments per request (Linux uses at most 256).
pub const MAX_DWZ_SEGMENTS: u32 = 256;

/// Longest GET_VRING_BASE (`stop_vring`) waits for the ring's requests in flight. The frontend
/// expects none after it, so the wait covers any request a healthy backing finishes (a commit
/// behind slow barriers included); it is bounded so that a stuck backing cannot hold the
/// vhost-user message thread forever.
const STOP_VRING_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a wait for requests in flight (drain, `stop_vring`) looks again: completions come
/// from other threads with no event to wait on here, and 1 ms is short beside a request's I/O.
const INFLIGHT_POLL: Duration = Duration::from_millis(1);

/// Why [`BlockDevice::drain_avail`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drained {
    /// No chain left on the ring.
    Empty,
    /// The ring's avail index is impossible: nothing can be taken until a reset.
    Broken,
    /// The device stopped taking requests (shutdown).
    Stopped,
}

/// Why a quiesce did not happen (the device runs on).
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("{0} request(s) still in flight after {1:?}; the device resumed")]
    Inflight(usize, Duration),
    #[error("flush failed: {0}; the device resumed")]
    Flush(EngineError),
}

/// Why an online resize did not happen (the disk keeps its size and the device runs on).
#[derive(Debug, thiserror::Error)]
pub enum DeviceResizeError {
    #[error("{0} bytes is not a multiple of the logical block size ({1})")]
    Unaligned(u64, u32),
    #[error(transparent)]
    Quiesce(#[from] QuiesceError),
    #[error("{0}")]
    Engine(#[from] EngineError),
}

/// What an online resize did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Resized {
    pub plan: crate::image::resize::ResizePlan,
    /// The capacity the device advertises now, in bytes.
    pub capacity: u64,
    /// The frontend was told (CONFIG_CHANGE_MSG on the backend channel); otherwise it sees the
    /// new size at its next connection or when it reads the config space again.
    pub frontend_notified: bool,
}

/// Device settings from the command line.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub logical_block_size: u32,
    /// GET_ID answer: up to 20 bytes, zero padded.
    pub serial: [u8; ID_BYTES],
}

struct Inner<E: BlockEngine> {
    engine: E,
    info: EngineInfo,
    opts: DeviceOptions,
    /// As advertised, but for the capacity, which `resize` changes: see `capacity`.
    limits: Limits,
    /// The disk's size in bytes (config space, and the range requests are checked against).
    capacity: AtomicU64,
    /// The current connection's backend channel (SET_BACKEND_REQ_FD, through the relay).
    backend_channel: Mutex<Option<std::os::unix::net::UnixStream>>,
    writeback: AtomicBool,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    accepting: AtomicBool,
    /// Quiesced by the control socket: nothing is taken off the rings until `resume`.
    paused: AtomicBool,
    /// Each queue's kick eventfd on the current connection (from SET_VRING_KICK, through the
    /// relay): `resume` kicks them, since the guest's kicks while paused were consumed.
    kicks: Mutex<Vec<Option<std::fs::File>>>,
    mem: RwLock<Option<GuestMemAtomic>>,
    /// Bumped after every memory-table change: a queue thread holding an older snapshot
    /// reloads it before taking the next chain (the frontend may publish a request using a new
    /// region as soon as the change is acknowledged, even while that thread is mid-batch).
    mem_generation: AtomicU64,
    queues: Vec<Mutex<E::Queue<VirtioCompletion>>>,
    shared: Vec<Arc<QueueShared>>,
    counters: Arc<Counters>,
    /// The current connection's inflight region (SET_INFLIGHT_FD), if the frontend keeps one.
    inflight: RwLock<Option<Arc<InflightRegion>>>,
}

/// The vhost-user-blk backend. Clones share one device.
pub struct BlockDevice<E: BlockEngine> {
    inner: Arc<Inner<E>>,
}

impl<E: BlockEngine> Clone for BlockDevice<E> {
    fn clone(&self) -> Self {
        BlockDevice {
            inner: self.inner.clone(),
        }
    }
}

/// Rounds `x` down to a multiple of `m` (m > 0).
fn round_down(x: u32, m: u32) -> u32 {
    x - x % m
}

impl<E: BlockEngine> BlockDevice<E> {
    pub fn new(engine: E, opts: DeviceOptions) -> Result<Self, EngineError> {
        let info = engine.info();
        let counters = Arc::new(Counters::default());
        let gran_sectors = (info.discard_granularity / SECTOR_SIZE as u32).max(1);
        let lbs_sectors = opts.logical_block_size / SECTOR_SIZE as u32;
        let max_dwz_sectors = round_down(u32::MAX, gran_sectors.max(lbs_sectors));
        let limits = Limits {
            capacity: info.capacity,
            logical_block_size: opts.logical_block_size,
            seg_max: u32::from(opts.queue_size).saturating_sub(2).max(1),
            size_max: SIZE_MAX,
            max_discard_sectors: max_dwz_sectors,
            max_discard_seg: MAX_DWZ_SEGMENTS,
            max_write_zeroes_sectors: max_dwz_sectors,
            max_write_zeroes_seg: MAX_DWZ_SEGMENTS,
            read_only: info.read_only,
        };
        let num_queues = opts.num_queues;
        let mut queues = Vec::new();
        let mut shared = Vec::new();
        for i in 0..usize::from(opts.num_queues) {
            queues.push(Mutex::new(engine.open_queue(i)?));
            shared.push(Arc::new(QueueShared::new(i, counters.clone())));
        }
        Ok(BlockDevice {
            inner: Arc::new(Inner {
                engine,
                info,
                opts,
                backend_channel: Mutex::new(None),
                capacity: AtomicU64::new(limits.capacity.0),
                limits,
                writeback: AtomicBool::new(true),
                event_idx: AtomicBool::new(false),
                acked_features: AtomicU64::new(0),
                accepting: AtomicBool::new(true),
                paused: AtomicBool::new(false),
                kicks: Mutex::new((0..num_queues).map(|_| None).collect()),
                mem: RwLock::new(None),
                mem_generation: AtomicU64::new(0),
                queues,
                shared,
                counters,
                inflight: RwLock::new(None),
            }),
        })
    }

    pub fn engine(&self) -> &E {
        &self.inner.engine
    }

    pub fn options(&self) -> &DeviceOptions {
        &self.inner.opts
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The config space as it reads now.
    pub fn config(&self) -> BlkConfig {
        let i = &self.inner;
        let lbs = i.opts.logical_block_size;
        let pbs = i.info.physical_block_size.max(lbs);
        BlkConfig {
            capacity_sectors: self.capacity().to_sectors().0,
            size_max: i.limits.size_max,
            seg_max: i.limits.seg_max,
            blk_size: lbs,
            physical_block_exp: (pbs / lbs).trailing_zeros() as u8,
            min_io_size: 1,
            opt_io_size: 0,
            writeback: i.writeback.load(Ordering::Acquire),
            num_queues: i.opts.num_queues,
            max_discard_sectors: i.limits.max_discard_sectors,
            max_discard_seg: i.limits.max_discard_seg,
            discard_sector_alignment: (i.info.discard_granularity / SECTOR_SIZE as u32).max(1),
            max_write_zeroes_sectors: i.limits.max_write_zeroes_sectors,
            max_write_zeroes_seg: i.limits.max_write_zeroes_seg,
            write_zeroes_may_unmap: true,
        }
    }

    pub fn is_writeback(&self) -> bool {
        self.inner.writeback.load(Ordering::Acquire)
    }

    /// Requests submitted and not yet completed, over all queues.
    pub fn inflight(&self) -> usize {
        self.inner
            .shared
            .iter()
            .map(|q| q.inflight.load(Ordering::Acquire))
            .sum()
    }

    /// Stops taking new requests off the rings (shutdown); in-flight ones still complete.
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::Release);
    }

    /// Whether queue threads take requests off the rings now: not after shutdown began, not
    /// while quiesced.
    fn taking(&self) -> bool {
        self.inner.accepting.load(Ordering::Acquire) && !self.inner.paused.load(Ordering::Acquire)
    }

    /// Quiesces the device for a consistent copy of its backing: stops taking requests off the
    /// rings (the guest's requests wait there, the guest sees a slow disk, not an error), waits
    /// up to `timeout` for those in flight, then makes everything completed durable. If the
    /// requests in flight do not finish in time, or the flush fails, the device resumes and the
    /// error says so: a quiesce never leaves the guest stopped without a consistent image.
    pub fn quiesce(&self, timeout: Duration) -> Result<(), QuiesceError> {
        self.inner.paused.store(true, Ordering::Release);
        if !self.drain(timeout) {
            let n = self.inflight();
            self.resume();
            return Err(QuiesceError::Inflight(n, timeout));
        }
        if let Err(e) = self.inner.engine.flush() {
            self.resume();
            return Err(QuiesceError::Flush(e));
        }
        Ok(())
    }

    /// Takes requests again after [`quiesce`](Self::quiesce), and looks at every ring at once
    /// (a kick of its own on each queue's eventfd) for the requests that waited.
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::Release);
        for k in lock(&self.inner.kicks).iter().flatten() {
            let mut k = k;
            if let Err(e) = std::io::Write::write_all(&mut k, &1u64.to_ne_bytes()) {
                log::warn!("resume: cannot kick a queue: {e}");
            }
        }
    }

    /// The disk's size now.
    pub fn capacity(&self) -> Bytes {
        Bytes(self.inner.capacity.load(Ordering::Acquire))
    }

    /// The limits requests are held to, with the capacity as it is now.
    fn limits(&self) -> Limits {
        Limits {
            capacity: self.capacity(),
            ..self.inner.limits.clone()
        }
    }

    /// Grows the disk to `new_size` bytes while it is served: quiesces (the guest's requests
    /// wait on the rings, at most `timeout` for those in flight), has the engine grow the
    /// image, advertises the new capacity, resumes (unless the device was quiesced already)
    /// and tells the frontend with CONFIG_CHANGE_MSG where it gave a backend channel.
    pub fn resize(&self, new_size: u64, timeout: Duration) -> Result<Resized, DeviceResizeError> {
        let lbs = self.inner.opts.logical_block_size;
        if new_size == 0 || new_size % u64::from(lbs) != 0 {
            return Err(DeviceResizeError::Unaligned(new_size, lbs));
        }
        let was_paused = self.is_paused();
        self.quiesce(timeout)?;
        let r = self.inner.engine.resize(new_size);
        if r.is_ok() {
            let cap = self.inner.engine.info().capacity;
            self.inner.capacity.store(cap.0, Ordering::Release);
        }
        if !was_paused {
            self.resume();
        }
        let plan = r?;
        let frontend_notified = self.notify_config_change();
        Ok(Resized {
            plan,
            capacity: self.capacity().0,
            frontend_notified,
        })
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend channel: a bare header
    /// (request 2, version 1, no payload, no reply asked). Returns whether it was sent.
    fn notify_config_change(&self) -> bool {
        const CONFIG_CHANGE_MSG: u32 = 2;
        const VERSION: u32 = 0x1;
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
        hdr[4..8].copy_from_slice(&VERSION.to_le_bytes());
        let ch = lock(&self.inner.backend_channel);
        let Some(mut sock) = ch.as_ref() else {
            log::info!("resize: the frontend has no backend channel; it sees the new size when it reads the config again");
            return false;
        };
        match std::io::Write::write_all(&mut sock, &hdr) {
            Ok(()) => {
                log::info!("resize: told the frontend (CONFIG_CHANGE_MSG)");
                true
            }
            Err(e) => {
                log::warn!("resize: cannot tell the frontend: {e}");
                false
            }
        }
    }

    pub fn is_paused(&self) -> bool {
        self.inner.paused.load(Ordering::Acquire)
    }

    /// Every queue's request count, requests in flight and latency histogram.
    pub fn queue_stats(&self) -> Vec<stats::QueueStatsSnapshot> {
        self.inner
            .shared
            .iter()
            .map(|q| {
                q.stats
                    .snapshot(q.index, q.inflight.load(Ordering::Acquire))
            })
            .collect()
    }

    /// Waits until nothing is in flight, or `timeout` passes. Returns whether it drained.
    /// Reaps engine completions itself: the queue threads of a frontend that disconnected are
    /// gone, and their io_uring completions would otherwise never be collected.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.inflight() > 0 {
            if Instant::now() > deadline {
                return false;
            }
            for q in &self.inner.queues {
                lock(q).process_completions();
            }
            std::thread::sleep(INFLIGHT_POLL);
        }
        true
    }

    /// Engine completion fds to watch, as (queue index, fd).
    pub fn completion_fds(&self) -> Vec<(usize, RawFd)> {
        self.inner
            .queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| lock(q).completion_fd().map(|fd| (i, fd)))
            .collect()
    }

    /// The epoll token of queue thread `index`'s engine completion fd.
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.inner.opts.num_queues) + 1
    }

    /// A frontend connects: every queue starts afresh on it (its used index read from the
    /// ring, inflight heads resubmitted if the frontend brings a region), and the previous
    /// connection's region is dropped.
    pub fn connection_started(&self) {
        *self
            .inner
            .inflight
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
        for q in &self.inner.shared {
            q.restart();
        }
    }

    fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        self.inner
            .inflight
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn check_inflight_geometry(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(), InflightError> {
        let o = &self.inner.opts;
        if num_queues == 0
            || num_queues > o.num_queues
            || queue_size == 0
            || queue_size > o.queue_size
        {
            return Err(InflightError::Geometry(num_queues, queue_size));
        }
        Ok(())
    }

    /// The current guest memory and the generation it belongs to.
    fn memory(&self) -> Option<(u64, Arc<GuestMem>)> {
        let generation = self.inner.mem_generation.load(Ordering::Acquire);
        let mem = self
            .inner
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(completion::current_memory)?;
        Some((generation, mem))
    }

    fn process_vring(&self, q: usize, vring: &Vring) {
        let Some(mut mem) = self.memory() else {
            return;
        };
        let shared = &self.inner.shared[q];
        let _batch = BatchScope::enter(shared, vring);
        if !shared.started.swap(true, Ordering::AcqRel) {
            self.start_queue(q, vring, &mem.1);
        }
        if shared.broken.load(Ordering::Relaxed) {
            // Stopped until the frontend resets the queue: nothing is taken off the ring.
            return;
        }
        if self.inner.event_idx.load(Ordering::Acquire) {
            loop {
                if let Err(e) = vring.disable_notification() {
                    log::warn!("queue {q}: cannot disable notifications: {e}");
                }
                if self.drain_avail(q, vring, &mut mem) == Drained::Broken {
                    // More "available" entries than the ring holds: nothing can be taken, and
                    // enable_notification would report work for ever. The queue waits for the
                    // frontend to reset it (a new connection).
                    break;
                }
                match vring.enable_notification() {
                    Ok(true) if self.taking() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        log::warn!("queue {q}: cannot enable notifications: {e}");
                        break;
                    }
                }
            }
        } else {
            self.drain_avail(q, vring, &mut mem);
        }
    }

    /// Takes and dispatches every available chain; says why it stopped.
    fn drain_avail(&self, q: usize, vring: &Vring, snapshot: &mut (u64, Arc<GuestMem>)) -> Drained {
        // Fixed for the connection once its queues run (SET_INFLIGHT_FD comes before).
        let region = self.inflight_region();
        let mut end = Drained::Stopped;
        while self.taking() {
            if self.inner.mem_generation.load(Ordering::Acquire) != snapshot.0 {
                match self.memory() {
                    Some(m) => *snapshot = m,
                    None => break,
                }
            }
            let mem = &snapshot.1;
            let chain = {
                let mut st = vring.get_mut();
                let queue = st.get_queue_mut();
                let chain = queue.pop_descriptor_chain(&**mem);
                if chain.is_none() {
                    end = match queue.avail_idx(&**mem, Ordering::Acquire) {
                        Ok(a) if (a - Wrapping(queue.next_avail())).0 > queue.size() => {
                            if !self.inner.shared[q].broken.swap(true, Ordering::Relaxed) {
                                log::error!(
                                    "queue {q}: the guest's avail index {} is more than a ring \
                                     ahead of {}: the queue stops until it is reset",
                                    a.0,
                                    queue.next_avail()
                                );
                            }
                            Drained::Broken
                        }
                        _ => Drained::Empty,
                    };
                }
                // Marked under the same lock as the pop: a head is either still on the avail
                // ring or recorded as in flight.
                if let (Some(c), Some(qr)) = (&chain, region.as_deref().and_then(|r| r.queue(q))) {
                    let n = self.inner.shared[q]
                        .next_counter
                        .fetch_add(1, Ordering::Relaxed);
                    qr.mark(c.head_index(), n);
                }
                chain
            };
            let Some(chain) = chain else { break };
            let parsed = request::parse(chain, mem, &self.limits());
            self.dispatch(q, vring, mem, parsed, region.clone());
        }
        // One io_uring_enter for the whole batch.
        lock(&self.inner.queues[q]).submit_batch();
        end
    }

    /// Waits until no request of the queue's previous run is in flight. Only a stop that timed
    /// out (`stop_vring`, a disconnect's drain) leaves any; their completions are dropped
    /// (the run ended), but their I/O is still going on, and the requests the region says
    /// were in flight must not run again beside it. Ends because the engine completes every
    /// request it accepted (its liveness rule) and this loop reaps the completions itself.
    fn wait_previous_run(&self, q: usize) {
        let shared = &self.inner.shared[q];
        let start = Instant::now();
        let mut next_log = start + Duration::from_secs(10);
        while shared.inflight.load(Ordering::Acquire) > 0 {
            lock(&self.inner.queues[q]).process_completions();
            std::thread::sleep(INFLIGHT_POLL);
            if Instant::now() > next_log {
                log::warn!(
                    "queue {q}: waiting {} s for {} request(s) of the ring's previous run",
                    start.elapsed().as_secs(),
                    shared.inflight.load(Ordering::Acquire)
                );
                next_log += Duration::from_secs(10);
            }
        }
    }

    /// The first processing of queue `q` after it was (re)started: the ring's used index as
    /// the guest memory holds it (read again here, where the inflight rules need it, under the
    /// vring lock), and the requests the inflight region says were in flight,
    /// resubmitted oldest first before anything new is taken (the avail position moves past
    /// them: used index + their number).
    fn start_queue(&self, q: usize, vring: &Vring, mem: &Arc<GuestMem>) {
        self.wait_previous_run(q);
        let region = self.inflight_region();
        let (heads, desc_table, size) = {
            let mut st = vring.get_mut();
            let queue = st.get_queue_mut();
            let used = match queue.used_idx(&**mem, Ordering::Acquire) {
                Ok(u) => u.0,
                Err(e) => {
                    log::warn!("queue {q}: cannot read the used index: {e}");
                    return;
                }
            };
            queue.set_next_used(used);
            let Some(qr) = region.as_deref().and_then(|r| r.queue(q)) else {
                return;
            };
            let size = queue.size();
            let tracked = region.as_deref().map_or(0, InflightRegion::queue_size);
            if size > tracked {
                // Heads past the region's entries could not be marked: a crash would lose
                // them without a trace. Refused rather than served half-tracked.
                log::error!(
                    "queue {q}: the ring has {size} descriptors, the inflight region tracks \
                     {tracked}: the queue stops until the frontend resets it"
                );
                self.inner.shared[q].broken.store(true, Ordering::Relaxed);
                return;
            }
            let restore = qr.restore(size, used);
            self.inner.shared[q]
                .next_counter
                .store(restore.next_counter, Ordering::Relaxed);
            let n = restore.heads.len() as u16;
            queue.set_next_avail(used.wrapping_add(n));
            (restore.heads, queue.desc_table(), size)
        };
        if !heads.is_empty() {
            log::info!(
                "queue {q}: resubmitting {} request(s) in flight at the last disconnect",
                heads.len()
            );
        }
        for head in heads {
            let parsed = match chain::walk(&**mem, vm_memory::GuestAddress(desc_table), size, head)
            {
                Some(descs) => request::parse_descs(head, descs, mem, &self.limits()),
                None => Parsed {
                    head,
                    status: None,
                    request: Err(request::RequestError::NoStatus),
                },
            };
            self.dispatch(q, vring, mem, parsed, region.clone());
        }
    }

    fn dispatch(
        &self,
        q: usize,
        vring: &Vring,
        mem: &Arc<GuestMem>,
        parsed: Parsed,
        region: Option<Arc<InflightRegion>>,
    ) {
        let shared = &self.inner.shared[q];
        let c = &self.inner.counters;
        let Some(status) = parsed.status else {
            // Nowhere to put a status: give the buffers back with nothing written.
            log::warn!(
                "queue {q}: dropping request {}: no status byte",
                parsed.head
            );
            c.errors.fetch_add(1, Ordering::Relaxed);
            let epoch = shared.epoch();
            if let Err(e) = publish_used(vring, region.as_deref(), shared, epoch, parsed.head, 0) {
                log::warn!("queue {q}: cannot add used entry: {e}");
            }
            shared.request_signal();
            return;
        };
        shared.inflight.fetch_add(1, Ordering::AcqRel);
        let mut done = VirtioCompletion {
            vring: vring.clone(),
            head: parsed.head,
            status,
            written: 0,
            mem: mem.clone(),
            queue: shared.clone(),
            inflight: region,
            epoch: shared.epoch(),
            started: Instant::now(),
            #[cfg(feature = "testing")]
            held: false,
        };
        let req = match parsed.request {
            Ok(req) => req,
            Err(e) => {
                log::debug!("queue {q}: bad request {}: {e}", parsed.head);
                let st = e.status();
                let counter = if st == Status::Unsupp {
                    &c.unsupported
                } else {
                    &c.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
                done.complete_status(st);
                return;
            }
        };
        done.written = req.written_len();
        let fua = !self.is_writeback();
        let op = match req {
            Request::Read { offset, bufs } => {
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.bytes_read.fetch_add(bufs.len() as u64, Ordering::Relaxed);
                EngineOp::Read { offset, bufs }
            }
            Request::Write { offset, bufs } => {
                #[cfg(feature = "testing")]
                {
                    done.held = crate::testing::holds_write(offset.0);
                }
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.bytes_written
                    .fetch_add(bufs.len() as u64, Ordering::Relaxed);
                EngineOp::Write { offset, bufs, fua }
            }
            Request::Flush => {
                c.flushes.fetch_add(1, Ordering::Relaxed);
                EngineOp::Flush
            }
            Request::Discard { ranges } => {
                c.discards.fetch_add(1, Ordering::Relaxed);
                EngineOp::Discard { ranges, fua }
            }
            Request::WriteZeroes { ranges } => {
                c.write_zeroes.fetch_add(1, Ordering::Relaxed);
                EngineOp::WriteZeroes { ranges, fua }
            }
            Request::GetId { buf } => {
                c.get_id.fetch_add(1, Ordering::Relaxed);
                let st = self.write_id(mem, &buf);
                done.complete_status(st);
                return;
            }
        };
        lock(&self.inner.queues[q]).submit(op, done);
    }

    fn write_id(&self, mem: &GuestMem, buf: &[request::GuestRange]) -> Status {
        let mut id: &[u8] = &self.inner.opts.serial;
        for r in buf {
            if id.is_empty() {
                break;
            }
            let n = (r.len as usize).min(id.len());
            if mem.write_slice(&id[..n], r.addr).is_err() {
                return Status::IoErr;
            }
            id = &id[n..];
        }
        Status::Ok
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<E: BlockEngine> VhostUserBackend for BlockDevice<E> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.opts.queue_size)
    }

    fn features(&self) -> u64 {
        config::device_features(self.inner.info.read_only)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Release);
        // Without FLUSH the driver cannot order writes, so every write must be durable.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        self.inner.writeback.store(flush, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let all = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            // libblkio needs it; QEMU uses it for memory hotplug.
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // GET/SET_INFLIGHT_FD never reach vhost-user-backend (which refuses them): the
            // relay in front of it answers them (`relay.rs`).
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // The backend channel: CONFIG_CHANGE_MSG after an online resize (`resize`).
            | VhostUserProtocolFeatures::BACKEND_REQ;
        #[cfg(feature = "testing")]
        if crate::testing::no_inflight() {
            // The guest test's control run: a frontend that reconnects without the region.
            return all - VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        all
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` is writable; the frontend writes exactly that byte.
        let end = offset as usize + buf.len();
        if (offset as usize..end).contains(&(WRITEBACK_OFFSET as usize)) {
            let wce = buf[WRITEBACK_OFFSET as usize - offset as usize] != 0;
            log::info!(
                "guest switched the cache to {}",
                if wce { "write-back" } else { "write-through" }
            );
            self.inner.writeback.store(wce, Ordering::Release);
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        *self.inner.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.inner.mem_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.opts.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend expects no request of this ring to be in flight after it.
        let Some(q) = self.inner.shared.get(queue_index as usize) else {
            return Ok(());
        };
        let deadline = Instant::now() + STOP_VRING_TIMEOUT;
        while q.inflight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(INFLIGHT_POLL);
        }
        let left = q.inflight.load(Ordering::Acquire);
        if left > 0 {
            log::warn!(
                "queue {queue_index}: {left} request(s) still in flight {} s after the ring \
                 was stopped: their completions will not be published",
                STOP_VRING_TIMEOUT.as_secs()
            );
        }
        // Stopped: when the frontend starts it again, it starts afresh (used index, region),
        // once the requests left from this run are done.
        q.restart();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread: the thread's only vring is event 0 and its index is the thread's.
        let q = thread_id;
        if q >= self.inner.shared.len() {
            return Ok(());
        }
        if device_event == 0 {
            if let Some(vring) = vrings.first() {
                self.process_vring(q, vring);
            }
        } else if u64::from(device_event) == self.completion_event_id() {
            if let Some(vring) = vrings.first() {
                let _batch = BatchScope::enter(&self.inner.shared[q], vring);
                lock(&self.inner.queues[q]).process_completions();
            }
        }
        // Errors caused by a guest never stop the queue thread: they were answered in-band.
        Ok(())
    }
}

impl<E: BlockEngine> relay::RelayHandler for BlockDevice<E> {
    fn get_inflight_fd(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        self.check_inflight_geometry(num_queues, queue_size)?;
        InflightRegion::create(num_queues, queue_size)
    }

    fn set_inflight_fd(&self, region: InflightRegion) -> Result<(), InflightError> {
        self.check_inflight_geometry(region.num_queues(), region.queue_size())?;
        for q in 0..usize::from(region.num_queues()) {
            if let Some(qr) = region.queue(q) {
                qr.set_desc_num(region.queue_size());
            }
        }
        *self
            .inner
            .inflight
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(region));
        // A region may come again on the same connection (the device restarted after a guest
        // reboot): the queues start on it afresh.
        for q in &self.inner.shared {
            q.restart();
        }
        Ok(())
    }

    fn vring_kick(&self, queue: usize, kick: std::fs::File) {
        if let Some(slot) = lock(&self.inner.kicks).get_mut(queue) {
            *slot = Some(kick);
        }
    }

    fn backend_channel(&self, channel: std::os::unix::net::UnixStream) {
        // A frontend that stops reading must not hold `resize` (and the control thread).
        if let Err(e) = channel.set_write_timeout(Some(Duration::from_secs(5))) {
            log::warn!("backend channel: cannot set a write timeout: {e}");
        }
        *lock(&self.inner.backend_channel) = Some(channel);
    }
}
