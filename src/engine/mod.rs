//! The block-engine seam between the virtio device and the storage behind it.
//!
//! The device parses guest requests into [`EngineOp`]s and hands each one to the engine queue
//! owned by the virtqueue thread that took it, together with a [`Completion`]. The engine may
//! complete the request at once, later on the same thread (from [`EngineQueue::process_completions`]
//! when its completion fd fires), or from a thread of its own. Engines know nothing of virtio;
//! the device knows nothing of files.

pub mod fence;
pub mod image;
#[cfg(test)]
mod protocol_model;
pub mod raw;

use std::any::Any;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use thiserror::Error;

use crate::units::{ByteRange, Bytes};

/// Why an engine could not carry out a request.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("I/O error on the backing: {0}")]
    Io(#[from] io::Error),
    #[error("range {0:?} is outside the disk")]
    OutOfRange(ByteRange),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("operation not supported by this engine: {0}")]
    Unsupported(&'static str),
    #[error("no space left for the write")]
    NoSpace,
}

/// The device-side continuation of a request: called exactly once, from any thread.
pub trait Completion: Send + 'static {
    fn complete(self, result: Result<(), EngineError>);
}

/// A deferred wake-up and the key it is deduplicated by.
type Wakes = Vec<(usize, Box<dyn FnOnce()>)>;

thread_local! {
    /// Wake-ups deferred to the end of the current [`CompletionBatch`] on this thread, one per key.
    static DEFERRED_WAKES: std::cell::RefCell<Option<Wakes>> = const { std::cell::RefCell::new(None) };
}

/// While alive, completions made on this thread may defer their wake-up of the waiting side
/// ([`defer_wake`]) to the batch's end: an engine thread that completes many requests at once
/// notifies each queue once, as a queue thread does for its own batch.
pub struct CompletionBatch(());

impl CompletionBatch {
    pub fn enter() -> CompletionBatch {
        DEFERRED_WAKES.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(Vec::new());
            }
        });
        CompletionBatch(())
    }
}

impl Drop for CompletionBatch {
    fn drop(&mut self) {
        let wakes = DEFERRED_WAKES.with(|d| d.borrow_mut().take());
        for (_, wake) in wakes.unwrap_or_default() {
            wake();
        }
    }
}

/// Defers a wake-up to the end of this thread's [`CompletionBatch`], once per `key` (`make`
/// builds it only for the first). False when no batch is open: the caller wakes now.
pub fn defer_wake(key: usize, make: impl FnOnce() -> Box<dyn FnOnce()>) -> bool {
    DEFERRED_WAKES.with(|d| match d.borrow_mut().as_mut() {
        Some(list) => {
            if !list.iter().any(|(k, _)| *k == key) {
                list.push((key, make()));
            }
            true
        }
        None => false,
    })
}

/// Guest buffers of one request, as host iovecs.
///
/// The buffers belong to the request until it completes: the guest must not touch them and no
/// other request refers to them. `_keepalive` holds the guest-memory mapping they point into, so
/// a memory-table change cannot unmap them under an in-flight request.
pub struct GuestBuffers {
    iovecs: Vec<libc::iovec>,
    len: usize,
    _keepalive: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the iovecs point into guest memory kept mapped by `_keepalive` (itself Send + Sync);
// the request owns these buffers exclusively until completion, so moving them to another thread
// cannot create aliasing the single-threaded case would not have.
unsafe impl Send for GuestBuffers {}

impl GuestBuffers {
    /// # Safety
    /// Every iovec must point into memory that stays mapped and writable while `keepalive`
    /// lives, and that no one else accesses until the request completes.
    pub unsafe fn new(iovecs: Vec<libc::iovec>, keepalive: Arc<dyn Any + Send + Sync>) -> Self {
        let len = iovecs.iter().map(|v| v.iov_len).sum();
        GuestBuffers {
            iovecs,
            len,
            _keepalive: keepalive,
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroRange {
    pub range: ByteRange,
    /// WRITE_ZEROES only: the device may deallocate the range instead of writing zeroes.
    pub unmap: bool,
}

/// A request as the engine sees it: validated, in bytes, bounds already checked by the device.
pub enum EngineOp {
    Read {
        offset: Bytes,
        bufs: GuestBuffers,
    },
    Write {
        offset: Bytes,
        bufs: GuestBuffers,
        /// Write-through: the data must be durable before completion.
        fua: bool,
    },
    Flush,
    Discard {
        ranges: Vec<ZeroRange>,
        fua: bool,
    },
    WriteZeroes {
        ranges: Vec<ZeroRange>,
        fua: bool,
    },
}

/// What the device advertises, decided by the engine and the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    /// Virtual disk size, a multiple of the logical block size.
    pub capacity: Bytes,
    pub read_only: bool,
    /// Smallest unit a discard can deallocate (advertised as discard_sector_alignment).
    pub discard_granularity: u32,
    /// Physical block size of the backing (topology hint).
    pub physical_block_size: u32,
}

/// A storage engine shared by all virtqueues.
pub trait BlockEngine: Send + Sync + 'static {
    /// Per-virtqueue state, owned by that queue's thread.
    type Queue<C: Completion>: EngineQueue<C>;

    fn info(&self) -> EngineInfo;

    /// Opens the engine side of virtqueue `index`; called from that queue's thread.
    fn open_queue<C: Completion>(&self, index: usize) -> Result<Self::Queue<C>, EngineError>;

    /// Makes everything completed so far durable (used at shutdown, after the queues drained).
    fn flush(&self) -> Result<(), EngineError>;

    /// Flushes and releases the backing cleanly (an image is marked clean).
    fn close(&self) -> Result<(), EngineError> {
        self.flush()
    }

    /// Engine counters for the logs (SIGUSR1, exit).
    fn stats(&self) -> String {
        String::new()
    }
}

/// The engine side of one virtqueue.
pub trait EngineQueue<C: Completion>: Send {
    /// Starts `op`; `done` is called when it finishes, possibly before this returns.
    fn submit(&mut self, op: EngineOp, done: C);

    /// Called after a batch of `submit`s: hand queued I/O to the kernel at once.
    fn submit_batch(&mut self) {}

    /// An fd that becomes readable when completions wait for [`Self::process_completions`] on
    /// this queue's thread. `None` for engines that complete synchronously or from other threads.
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    /// Reaps completions that must run on this queue's thread.
    fn process_completions(&mut self) {}
}
