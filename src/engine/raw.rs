//! The raw engine: the virtual disk is the backing file or block device byte for byte.
//!
//! Reads and writes go through the queue thread's io_uring; flushes, discards and write-zeroes
//! are single syscalls. It is the baseline the image engine is measured against and what users
//! of raw images expect.

use std::fs::File;
use std::io;
use std::sync::Arc;

use super::{
    BlockEngine, Completion, EngineError, EngineInfo, EngineOp, EngineQueue, GuestBuffers,
    ZeroRange,
};
use crate::io::backing::{Backing, OpenError, Zeroing, DIRECT_ALIGN};
use crate::io::iov;
use crate::io::sys;
use crate::io::uring::{Finished, Op, Ring};
use crate::units::{Bytes, SECTOR_SIZE};

/// Physical block size advertised for a regular file, which has none of its own: 4 KiB, the
/// page size and the block size of the host filesystems, so a guest aligns its I/O to it.
const FILE_PHYSICAL_BLOCK_SIZE: u32 = 4096;

struct Inner {
    backing: Backing,
    /// O_DIRECT descriptor for aligned reads and writes (`--cache none`).
    direct: Option<File>,
    info: EngineInfo,
}

/// The raw engine. Cheap to clone; all queues share one fd (positioned I/O needs no cursor).
#[derive(Clone)]
pub struct RawEngine {
    inner: Arc<Inner>,
}

impl RawEngine {
    /// `direct`: an O_DIRECT descriptor on the same backing for aligned reads and writes.
    pub fn new(
        backing: Backing,
        read_only: bool,
        logical_block_size: u32,
        direct: Option<File>,
    ) -> Result<Self, OpenError> {
        let capacity = backing.size - backing.size % u64::from(logical_block_size);
        if capacity == 0 {
            return Err(OpenError::TooSmall(
                backing.path.clone(),
                backing.size,
                logical_block_size,
            ));
        }
        let physical_block_size = if backing.is_block_device {
            sys::blk_physical_block_size(&backing.file).unwrap_or(logical_block_size)
        } else {
            FILE_PHYSICAL_BLOCK_SIZE
        }
        .max(logical_block_size);
        let info = EngineInfo {
            capacity: Bytes(capacity),
            read_only,
            discard_granularity: logical_block_size.max(SECTOR_SIZE as u32),
            physical_block_size,
        };
        Ok(RawEngine {
            inner: Arc::new(Inner {
                backing,
                direct,
                info,
            }),
        })
    }

    fn file(&self) -> &File {
        &self.inner.backing.file
    }

    fn discard(&self, r: &ZeroRange) -> io::Result<()> {
        let (off, len) = (r.range.offset.0, r.range.len.0);
        self.inner.backing.zero_range(Zeroing::Discard, off, len)
    }

    fn write_zeroes(&self, r: &ZeroRange) -> io::Result<()> {
        let (off, len) = (r.range.offset.0, r.range.len.0);
        // With unmap a hole (or a device's punched range) reads as zeroes, which is what was asked.
        let how = if r.unmap {
            Zeroing::PunchOrZeroes
        } else {
            Zeroing::Zeroes
        };
        self.inner.backing.zero_range(how, off, len)
    }

    fn execute(&self, op: &EngineOp) -> Result<(), EngineError> {
        let info = &self.inner.info;
        let is_write = !matches!(op, EngineOp::Read { .. } | EngineOp::Flush);
        if is_write && info.read_only {
            return Err(EngineError::ReadOnly);
        }
        match op {
            EngineOp::Read { offset, bufs } => {
                sys::preadv_all(self.file(), bufs.iovecs(), offset.0)?;
            }
            EngineOp::Write { offset, bufs, fua } => {
                sys::pwritev_all(self.file(), bufs.iovecs(), offset.0, *fua)?;
            }
            EngineOp::Flush => sys::fdatasync(self.file())?,
            EngineOp::Discard { ranges, fua } => {
                for r in ranges {
                    self.discard(r)?;
                }
                if *fua {
                    sys::fdatasync(self.file())?;
                }
            }
            EngineOp::WriteZeroes { ranges, fua } => {
                for r in ranges {
                    self.write_zeroes(r)?;
                }
                if *fua {
                    sys::fdatasync(self.file())?;
                }
            }
        }
        Ok(())
    }
}

/// The raw engine's per-queue state: its io_uring for reads and writes. Flushes, discards and
/// write-zeroes are single syscalls done in place.
pub struct RawQueue<C> {
    engine: RawEngine,
    ring: Ring<RawFlight<C>>,
    /// Finished requests being completed (kept for its capacity: no allocation per request).
    finished: Finished<RawFlight<C>>,
}

struct RawFlight<C> {
    done: C,
    _bufs: GuestBuffers,
}

impl<C: Completion> RawQueue<C> {
    fn finish(&self, finished: &mut Finished<RawFlight<C>>) {
        for (f, r) in finished.drain(..) {
            if let Err((e, at)) = &r {
                log::warn!(
                    "I/O at byte {at} of {} failed: {e}",
                    self.engine.inner.backing.path.display()
                );
            }
            f.done.complete(r.map_err(|(e, _)| EngineError::Io(e)));
        }
    }
}

impl<C: Completion> EngineQueue<C> for RawQueue<C> {
    fn submit(&mut self, op: EngineOp, done: C) {
        let (offset, bufs, write, fua) = match op {
            EngineOp::Read { offset, bufs } => (offset, bufs, false, false),
            EngineOp::Write { offset, bufs, fua } => {
                if self.engine.inner.info.read_only {
                    return done.complete(Err(EngineError::ReadOnly));
                }
                (offset, bufs, true, fua)
            }
            other => {
                let result = self.engine.execute(&other);
                if let Err(e) = &result {
                    log::warn!(
                        "request failed on {}: {e}",
                        self.engine.inner.backing.path.display()
                    );
                }
                drop(other);
                return done.complete(result);
            }
        };
        if self.engine.inner.direct.is_some()
            && !iov::aligned(bufs.iovecs(), offset.0, DIRECT_ALIGN)
        {
            // Not aligned for O_DIRECT: through the page cache, at once.
            let file = &self.engine.inner.backing.file;
            let r = if write {
                sys::pwritev_all(file, bufs.iovecs(), offset.0, fua)
            } else {
                sys::preadv_all(file, bufs.iovecs(), offset.0)
            };
            drop(bufs);
            return done.complete(r.map_err(EngineError::Io));
        }
        let op = Op {
            iovs: crate::io::uring::Iovs::from_slice(bufs.iovecs()),
            offset: offset.0,
            write,
            dsync: fua,
        };
        let mut finished = std::mem::take(&mut self.finished);
        self.ring.start(
            smallvec::smallvec![op],
            RawFlight { done, _bufs: bufs },
            &mut finished,
        );
        self.finish(&mut finished);
        self.finished = finished;
    }

    fn submit_batch(&mut self) {
        if let Err(e) = self.ring.submit() {
            log::error!("io_uring submit failed: {e}");
        }
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.ring.event_fd())
    }

    fn process_completions(&mut self) {
        let mut finished = std::mem::take(&mut self.finished);
        self.ring.reap_into(&mut finished);
        self.finish(&mut finished);
        self.finished = finished;
    }
}

impl BlockEngine for RawEngine {
    type Queue<C: Completion> = RawQueue<C>;
    type Counters = super::NoCounters;

    fn counters(&self) -> super::NoCounters {
        super::NoCounters
    }

    fn info(&self) -> EngineInfo {
        self.inner.info.clone()
    }

    fn open_queue<C: Completion>(&self, _index: usize) -> Result<RawQueue<C>, EngineError> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(
            self.inner
                .direct
                .as_ref()
                .unwrap_or(&self.inner.backing.file),
        );
        Ok(RawQueue {
            engine: self.clone(),
            ring: Ring::new(fd)?,
            finished: Vec::new(),
        })
    }

    fn flush(&self) -> Result<(), EngineError> {
        if self.inner.info.read_only {
            return Ok(());
        }
        Ok(sys::fdatasync(self.file())?)
    }
}
