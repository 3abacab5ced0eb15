//! Completing a request: status byte, used-ring entry, guest notification, from any thread.
//!
//! The virtqueue thread completes many requests per wake-up and notifies the guest once at the
//! end (see [`BatchScope`]); completions from any other thread (an engine's worker) notify at once,
//! or at the end of that thread's [`CompletionBatch`](super::batch::CompletionBatch).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Error as QueueError, QueueT};
use vm_memory::{Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::batch::{defer_wake, CompletionBatch};
use super::inflight::InflightRegion;
use super::request::Status;
use crate::engine::{Batch, Completion, EngineError};

pub type GuestMem = GuestMemoryMmap<()>;
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
pub type Vring = VringRwLock<GuestMemAtomic>;

crate::counters::counters! {
    /// Request counters, logged at exit and on SIGUSR1.
    pub struct Counters => DeviceCounters {
        reads,
        writes,
        flushes,
        discards,
        write_zeroes,
        get_id,
        /// Requests completed with an I/O error status.
        errors,
        /// Requests completed with UNSUPP (unknown types, bad requests).
        unsupported,
        bytes_read,
        bytes_written,
        /// Completions made on the request's own queue thread (notification batched).
        completed_on_queue_thread,
        /// Completions made on another thread (the engine's worker or committer).
        completed_elsewhere,
    }
}

/// State of one virtqueue shared between its thread and whoever completes its requests.
pub struct QueueShared {
    pub index: usize,
    pub inflight: AtomicUsize,
    pending_signal: AtomicBool,
    pub counters: Arc<Counters>,
    /// The queue has been started on the current connection (its used index taken from the
    /// ring, its inflight heads resubmitted): cleared when a connection begins.
    pub started: AtomicBool,
    /// The inflight counter the next popped head takes (the region's order of pops).
    pub next_counter: AtomicU64,
    /// The queue is stopped until the frontend resets it: the guest broke the ring (an
    /// impossible avail index) or the inflight region cannot track it. Logged once.
    pub broken: AtomicBool,
    /// Which run of the ring requests belong to: a new one each time the ring stops
    /// (GET_VRING_BASE), a region arrives or a connection begins. A request completing after
    /// its run ended must not touch the ring: the frontend may have moved or reset it, or the
    /// restarted queue resubmitted the request. The mutex makes "still this run?" and the
    /// used-ring write one step against a new run beginning; held for one used-ring write.
    epoch: Mutex<u64>,
    /// Requests completed and their latency (the control socket's `stats`).
    pub stats: super::stats::QueueStats,
}

impl QueueShared {
    pub fn new(index: usize, counters: Arc<Counters>) -> Self {
        QueueShared {
            index,
            inflight: AtomicUsize::new(0),
            pending_signal: AtomicBool::new(false),
            counters,
            started: AtomicBool::new(false),
            next_counter: AtomicU64::new(1),
            broken: AtomicBool::new(false),
            epoch: Mutex::new(0),
            stats: super::stats::QueueStats::default(),
        }
    }

    /// The ring's current run, for a request taken off it now.
    pub fn epoch(&self) -> u64 {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ring's run ended (stopped, a new region, a new connection): completions of its
    /// requests from here on are dropped, and the next processing starts the queue afresh.
    pub fn restart(&self) {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.broken.store(false, Ordering::Relaxed);
        self.started.store(false, Ordering::Release);
    }

    /// Asks for a guest notification at the end of the current batch.
    pub fn request_signal(&self) {
        self.pending_signal.store(true, Ordering::Release);
    }

    fn key(self: &Arc<Self>) -> usize {
        Arc::as_ptr(self) as usize
    }
}

thread_local! {
    /// The queue whose thread this is while it processes a batch (0 = none).
    static BATCHING: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as processing `queue`'s batch: completions for that queue defer the
/// guest notification to [`BatchScope::finish`].
pub struct BatchScope<'a> {
    queue: &'a Arc<QueueShared>,
    vring: &'a Vring,
}

impl<'a> BatchScope<'a> {
    pub fn enter(queue: &'a Arc<QueueShared>, vring: &'a Vring) -> Self {
        BATCHING.with(|b| b.set(queue.key()));
        BatchScope { queue, vring }
    }
}

impl Drop for BatchScope<'_> {
    fn drop(&mut self) {
        BATCHING.with(|b| b.set(0));
        if self.queue.pending_signal.swap(false, Ordering::AcqRel) {
            signal(self.vring);
        }
    }
}

fn signal(vring: &Vring) {
    // With EVENT_IDX the guest may not want this notification; without it, it always does.
    if vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            log::warn!("cannot notify the guest: {e}");
        }
    }
}

/// Publishes `head`'s used entry: every used-ring write of the device goes through here. Under
/// the vring lock, so the inflight region's `last_batch_head`, the used ring and the region's
/// `used_idx` change together for one head at a time, whichever thread completes it; and under
/// the queue's epoch, so a request of a run that has ended (`epoch` is not the current one)
/// writes nothing: returns `Ok(false)` then. Its inflight entry stays marked, so a frontend
/// that restarts the ring on the same region gets it resubmitted.
pub fn publish_used(
    vring: &Vring,
    region: Option<&InflightRegion>,
    queue: &QueueShared,
    epoch: u64,
    head: u16,
    len: u32,
) -> Result<bool, QueueError> {
    let current = queue.epoch.lock().unwrap_or_else(|e| e.into_inner());
    if *current != epoch {
        return Ok(false);
    }
    let mut st = vring.get_mut();
    let qr = region.and_then(|r| r.queue(queue.index));
    if let Some(qr) = &qr {
        qr.begin_publish(head);
    }
    st.add_used(head, len)?;
    if let Some(qr) = &qr {
        qr.end_publish(head, st.get_queue().next_used());
    }
    Ok(true)
}

/// The device's continuation for one request.
pub struct VirtioCompletion {
    pub vring: Vring,
    pub head: u16,
    pub status: GuestAddress,
    /// Bytes written into guest buffers on success, excluding the status byte.
    pub written: u32,
    pub mem: Arc<GuestMem>,
    pub queue: Arc<QueueShared>,
    /// The connection's inflight region, if the frontend gave one.
    pub inflight: Option<Arc<InflightRegion>>,
    /// The ring's run the request was taken in ([`QueueShared::epoch`]).
    pub epoch: u64,
    /// When the queue thread took the chain off the ring (the latency histogram's start).
    pub started: std::time::Instant,
    /// A test build's held request (`EXTBLK_HOLD_FROM`): carried out, never published.
    #[cfg(feature = "testing")]
    pub held: bool,
}

impl VirtioCompletion {
    /// Completes with an explicit status (used for requests the device answers itself).
    pub fn complete_status(self, status: Status) {
        let len = if status == Status::Ok {
            self.written + 1
        } else {
            1
        };
        if let Err(e) = self.mem.write_obj(status as u8, self.status) {
            log::warn!("cannot write the status byte: {e}");
        }
        #[cfg(feature = "testing")]
        if self.held {
            // Never published: the test kills the daemon with it in flight, and the restarted
            // daemon must resubmit it from the inflight region. Not counted in flight either,
            // so that nothing waits for it.
            log::info!(
                "queue {}: holding request {} (EXTBLK_HOLD_FROM)",
                self.queue.index,
                self.head
            );
            self.queue.inflight.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let region = self.inflight.as_deref();
        match publish_used(&self.vring, region, &self.queue, self.epoch, self.head, len) {
            Ok(true) => self.queue.stats.record(self.started.elapsed()),
            Ok(false) => {
                log::warn!(
                    "queue {}: request {} completed after its ring was stopped: not published",
                    self.queue.index,
                    self.head
                );
                self.queue.inflight.fetch_sub(1, Ordering::AcqRel);
                return;
            }
            Err(e) => log::warn!("cannot add used entry {}: {e}", self.head),
        }
        let on_queue_thread = BATCHING.with(|b| b.get()) == self.queue.key();
        let c = &self.queue.counters;
        if on_queue_thread {
            c.completed_on_queue_thread.fetch_add(1, Ordering::Relaxed);
            self.queue.pending_signal.store(true, Ordering::Release);
        } else {
            c.completed_elsewhere.fetch_add(1, Ordering::Relaxed);
            let deferred = defer_wake(self.queue.key(), || {
                let vring = self.vring.clone();
                Box::new(move || signal(&vring))
            });
            if !deferred {
                signal(&self.vring);
            }
        }
        self.queue.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Completion for VirtioCompletion {
    fn complete(self, result: Result<(), EngineError>) {
        let status = match result {
            Ok(()) => Status::Ok,
            Err(EngineError::Unsupported(_)) => {
                self.queue
                    .counters
                    .unsupported
                    .fetch_add(1, Ordering::Relaxed);
                Status::Unsupp
            }
            Err(_) => {
                self.queue.counters.errors.fetch_add(1, Ordering::Relaxed);
                Status::IoErr
            }
        };
        self.complete_status(status);
    }

    /// Notifications of this thread's completions wait for the batch's end: one per queue.
    fn batch(&self) -> Batch {
        Batch::new(CompletionBatch::enter())
    }
}

/// Loads the current guest memory as an owned, cheaply clonable mapping.
pub fn current_memory(atomic: &GuestMemAtomic) -> Arc<GuestMem> {
    atomic.memory().into_inner()
}
