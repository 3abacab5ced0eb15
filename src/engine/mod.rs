//! The block-engine seam between the virtio device and the storage behind it.
//!
//! The device parses guest requests into [`EngineOp`]s and hands each one to the engine queue
//! owned by the virtqueue thread that took it, together with a [`Completion`]. The engine may
//! complete the request at once, later on the same thread (from [`EngineQueue::process_completions`]
//! when its completion fd fires), or from a thread of its own. Engines know nothing of virtio;
//! the device knows nothing of files.

pub mod cache;
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
    /// The image's metadata could not be changed (corrupt structures, a failed commit).
    #[error("image: {0}")]
    Image(#[source] crate::image::ImageError),
    #[error(transparent)]
    Stopped(#[from] Stopped),
    #[error(transparent)]
    Resize(#[from] crate::image::resize::ResizeError),
}

/// Why an engine can no longer serve requests that change the disk, or answer a waiter.
/// Cloned to every waiter of one failed commit.
#[derive(Debug, Clone, Error)]
pub enum Stopped {
    /// The journal was aborted (`data_err=abort`, or a failed commit): writes fail from now on.
    #[error("the journal was aborted after an error")]
    Aborted,
    /// The commit that was to make this durable failed (and aborted the journal).
    #[error("journal commit failed: {0}")]
    CommitFailed(Arc<crate::image::ImageError>),
    #[error("the completion worker is gone")]
    WorkerGone,
    #[error("the committer is gone")]
    CommitterGone,
    #[error("the engine is closed")]
    Closed,
    /// The write-back cache could not write its dirty data to the engine below: the data is
    /// kept, but nothing more is accepted (as `data_err=abort` makes ext4 do).
    #[error("writing back the cache failed: {0}")]
    WritebackFailed(Arc<EngineError>),
}

/// The device-side continuation of a request: called exactly once, from any thread.
pub trait Completion: Send + 'static {
    fn complete(self, result: Result<(), EngineError>);

    /// Opens a batch of completions on this thread, ended when the returned guard drops. An
    /// engine thread that completes many requests at once (the image engine's worker and
    /// committer) holds one around them, so that the device can notify each queue once per
    /// batch, as a queue thread does for its own. Called on any one completion of the run, it
    /// covers every completion of this type on this thread.
    ///
    /// A hook rather than a batch type of this seam: what batching means (here, deferring the
    /// guest's notification) is the device's concept, and the engine must not import the
    /// device. Default: no batching.
    fn batch(&self) -> Batch {
        Batch::default()
    }
}

/// A batch opened by [`Completion::batch`]: it ends, and whatever it deferred happens, when this
/// drops.
#[derive(Default)]
pub struct Batch {
    _guard: Option<Box<dyn Any>>,
}

impl Batch {
    /// A batch that ends when `guard` drops.
    pub fn new(guard: impl Any) -> Batch {
        Batch {
            _guard: Some(Box::new(guard)),
        }
    }
}

/// Guest buffers of one request, as host iovecs.
///
/// The buffers belong to the request until it completes: the guest must not touch them and no
/// other request refers to them. `_keepalive` holds the guest-memory mapping they point into, so
/// a memory-table change cannot unmap them under an in-flight request.
pub struct GuestBuffers {
    /// Inline for up to 2 segments: no heap allocation for a common request.
    iovecs: crate::io::uring::Iovs,
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
    pub unsafe fn new(
        iovecs: impl Into<crate::io::uring::Iovs>,
        keepalive: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        let iovecs = iovecs.into();
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

    /// Bytes `[start, start + len)` of these buffers as buffers of their own, keeping the same
    /// mapping alive: a request split into pieces that go to different places (the write-back
    /// cache serves some blocks of a read itself and reads the rest from the engine below).
    ///
    /// # Safety
    /// The pieces alias `self`: while a piece is in use, no other piece or `self` may be used
    /// for the same bytes.
    pub unsafe fn slice(&self, start: usize, len: usize) -> GuestBuffers {
        debug_assert!(start + len <= self.len);
        GuestBuffers {
            iovecs: crate::io::iov::slice(&self.iovecs, start, len),
            len,
            _keepalive: self._keepalive.clone(),
        }
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

    /// Grows the disk to `new_size` bytes while it is served (`ctl resize`). The device calls
    /// it quiesced — nothing in flight, everything completed durable — and then advertises
    /// [`BlockEngine::info`]'s new capacity.
    fn resize(&self, new_size: u64) -> Result<crate::image::resize::ResizePlan, EngineError> {
        let _ = new_size;
        Err(EngineError::Unsupported(
            "resize (only an extblk image grows while served)",
        ))
    }

    /// The engine's counters: formatted for the logs (SIGUSR1, exit), serialised for tools.
    type Counters: serde::Serialize + std::fmt::Display;

    fn counters(&self) -> Self::Counters;
}

/// The counters of an engine that keeps none (the raw engine: the device's counters say it
/// all). Formats as nothing, serialises as `null`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct NoCounters;

impl std::fmt::Display for NoCounters {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Ok(())
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
