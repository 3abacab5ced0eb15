//! The raw engine: the virtual disk is the backing file or block device byte for byte.
//!
//! Reads and writes go through the queue thread's io_uring; flushes, discards and write-zeroes
//! are single syscalls. It is the baseline the image engine is measured against and what users
//! of raw images expect.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::sysio;
use super::uring::{Finished, Op, Ring};
use super::{
    BlockEngine, Completion, EngineError, EngineInfo, EngineOp, EngineQueue, GuestBuffers,
    ZeroRange,
};
use crate::units::{Bytes, SECTOR_SIZE};

/// Why a backing could not be opened. Each names the path so the CLI can print one line.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("{0}: no such file or device")]
    Missing(PathBuf),
    #[error("{0}: cannot open: {1}")]
    Open(PathBuf, io::Error),
    #[error("{0}: not a regular file or block device")]
    NotFileOrDevice(PathBuf),
    /// Whoever holds it (a daemon, or a tool) is running now: nothing may touch the image. The
    /// words "already in use" are kept for scripts (and tests/daemon.rs) that match them.
    #[error("{0} is already in use by another process (locked)")]
    Locked(PathBuf),
    #[error("{0}: size {1} is smaller than one logical block ({2} bytes)")]
    TooSmall(PathBuf, u64, u32),
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
}

/// An opened, locked backing: a regular file or a block device.
pub struct Backing {
    pub file: File,
    pub path: PathBuf,
    pub is_block_device: bool,
    pub size: u64,
}

/// Alignment (bytes) that data I/O on the O_DIRECT descriptor keeps: offset, every buffer
/// address and length. 4 KiB suits every common device; anything else goes through the page
/// cache on the buffered descriptor (the kernel keeps the two coherent).
pub const DIRECT_ALIGN: usize = 4096;

impl Backing {
    /// A second descriptor on the same file with O_DIRECT, for data I/O (`--cache none`).
    /// `None` (with a warning) where the filesystem refuses direct I/O, e.g. tmpfs.
    pub fn open_direct(&self, read_only: bool) -> Option<File> {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT)
            .open(&self.path)
        {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!(
                    "{}: no direct I/O ({e}); using the page cache",
                    self.path.display()
                );
                None
            }
        }
    }

    /// Opens `path` read-write (or read-only) and takes the image lock: exclusive for a writer,
    /// shared for a reader, so two writers, or a writer and a reader, never share one image.
    pub fn open(path: &Path, read_only: bool) -> Result<Backing, OpenError> {
        let p = path.to_path_buf();
        // Checked before open(2): opening a FIFO would block, a directory fails obscurely.
        match std::fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpenError::Missing(p)),
            Ok(m) if !m.file_type().is_file() && !m.file_type().is_block_device() => {
                return Err(OpenError::NotFileOrDevice(p))
            }
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => OpenError::Missing(p.clone()),
                _ => OpenError::Open(p.clone(), e),
            })?;
        Backing::lock(file, path, read_only)
    }

    /// Takes the image lock on a descriptor the caller opened (without O_TRUNC or any write
    /// yet), so a tool that rewrites a file holds the lock before it changes a byte.
    pub fn lock(file: File, path: &Path, read_only: bool) -> Result<Backing, OpenError> {
        let p = path.to_path_buf();
        let meta = file.metadata().map_err(|e| OpenError::Io(p.clone(), e))?;
        let ft = meta.file_type();
        let is_block_device = ft.is_block_device();
        if !ft.is_file() && !is_block_device {
            return Err(OpenError::NotFileOrDevice(p));
        }
        if !sysio::try_lock(&file, !read_only).map_err(|e| OpenError::Io(p.clone(), e))? {
            return Err(OpenError::Locked(p));
        }
        let size = if is_block_device {
            sysio::blk_size(&file).map_err(|e| OpenError::Io(p.clone(), e))?
        } else {
            meta.len()
        };
        Ok(Backing {
            file,
            path: p,
            is_block_device,
            size,
        })
    }

    /// Sets a regular file's length (a writer's backing, locked): `create --force` empties the
    /// old file and sizes it for the new image only once it holds the lock.
    pub fn set_len(&mut self, len: u64) -> Result<(), OpenError> {
        self.file
            .set_len(len)
            .map_err(|e| OpenError::Io(self.path.clone(), e))?;
        self.size = len;
        Ok(())
    }
}

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
            sysio::blk_physical_block_size(&backing.file).unwrap_or(logical_block_size)
        } else {
            4096
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
        if self.inner.backing.is_block_device {
            sysio::blk_discard(self.file(), off, len)
        } else {
            sysio::fallocate(
                self.file(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        }
    }

    fn write_zeroes(&self, r: &ZeroRange) -> io::Result<()> {
        let (off, len) = (r.range.offset.0, r.range.len.0);
        let file = self.file();
        if r.unmap {
            // A hole (or a device's punched range) reads as zeroes, which is what was asked.
            match sysio::fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if !unsupported(&e) => return Err(e),
                Err(_) => {}
            }
        }
        if self.inner.backing.is_block_device {
            return sysio::blk_zeroout(file, off, len);
        }
        match sysio::fallocate(
            file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Err(e) if unsupported(&e) => write_zero_bytes(file, off, len),
            other => other,
        }
    }

    fn execute(&self, op: &EngineOp) -> Result<(), EngineError> {
        let info = &self.inner.info;
        let is_write = !matches!(op, EngineOp::Read { .. } | EngineOp::Flush);
        if is_write && info.read_only {
            return Err(EngineError::ReadOnly);
        }
        match op {
            EngineOp::Read { offset, bufs } => {
                sysio::preadv_all(self.file(), bufs.iovecs(), offset.0)?;
            }
            EngineOp::Write { offset, bufs, fua } => {
                sysio::pwritev_all(self.file(), bufs.iovecs(), offset.0, *fua)?;
            }
            EngineOp::Flush => sysio::fdatasync(self.file())?,
            EngineOp::Discard { ranges, fua } => {
                for r in ranges {
                    self.discard(r)?;
                }
                if *fua {
                    sysio::fdatasync(self.file())?;
                }
            }
            EngineOp::WriteZeroes { ranges, fua } => {
                for r in ranges {
                    self.write_zeroes(r)?;
                }
                if *fua {
                    sysio::fdatasync(self.file())?;
                }
            }
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
    )
}

/// Last resort for filesystems without fallocate modes: write real zero bytes.
fn write_zero_bytes(file: &File, mut off: u64, len: u64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeroes = vec![0u8; CHUNK];
    let end = off + len;
    while off < end {
        let n = ((end - off) as usize).min(CHUNK);
        let iov = [libc::iovec {
            iov_base: zeroes.as_ptr() as *mut libc::c_void,
            iov_len: n,
        }];
        sysio::pwritev_all(file, &iov, off, false)?;
        off += n as u64;
    }
    Ok(())
}

/// The raw engine's per-queue state: its io_uring for reads and writes. Flushes, discards and
/// write-zeroes are single syscalls done in place.
pub struct RawQueue<C> {
    engine: RawEngine,
    ring: Ring<RawFlight<C>>,
}

struct RawFlight<C> {
    done: C,
    _bufs: GuestBuffers,
}

impl<C: Completion> RawQueue<C> {
    fn finish(&self, finished: Finished<RawFlight<C>>) {
        for (f, r) in finished {
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
            && !super::iov::aligned(bufs.iovecs(), offset.0, DIRECT_ALIGN)
        {
            // Not aligned for O_DIRECT: through the page cache, at once.
            let file = &self.engine.inner.backing.file;
            let r = if write {
                sysio::pwritev_all(file, bufs.iovecs(), offset.0, fua)
            } else {
                sysio::preadv_all(file, bufs.iovecs(), offset.0)
            };
            drop(bufs);
            return done.complete(r.map_err(EngineError::Io));
        }
        let op = Op {
            iovs: bufs.iovecs().to_vec(),
            offset: offset.0,
            write,
            dsync: fua,
        };
        let mut finished = Vec::new();
        self.ring
            .start(vec![op], RawFlight { done, _bufs: bufs }, &mut finished);
        self.finish(finished);
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
        let finished = self.ring.reap();
        self.finish(finished);
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
        })
    }

    fn flush(&self) -> Result<(), EngineError> {
        if self.inner.info.read_only {
            return Ok(());
        }
        Ok(sysio::fdatasync(self.file())?)
    }
}
