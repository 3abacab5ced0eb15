//! The host I/O layer, the bottom of the stack: everything that touches the backing file or
//! device. The backing itself, opened and locked ([`backing`]); the checked syscall wrappers
//! ([`sys`]); slicing and filling iovec lists ([`iov`]); the per-queue io_uring ([`uring`]); and
//! [`BlockIo`], positioned reads and writes, barriers and deallocation, behind a trait so tests
//! can record every write and barrier (crash states, [`record`]) or inject faults ([`fault`]).
//! Nothing here knows of engines, images or virtio.

use std::fs::File;
use std::io;
use std::path::Path;

use backing::{Backing, OpenError, Zeroing};

/// Positioned I/O on the image. Offsets and lengths are in bytes.
pub trait BlockIo: Send + Sync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// A barrier: everything written before it is durable when it returns.
    fn flush(&self) -> io::Result<()>;
    /// Makes a range read as zeroes, deallocating it where the backing can.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Size of the backing in bytes.
    fn size(&self) -> u64;
    /// Does `[offset, offset + len)` read as zeroes without anything written there: a hole
    /// of a sparse file, which stays zeroes until written? Lets an allocating write convert
    /// the rest of its allocation unit without writing zeroes over it. `false` whenever the
    /// backing cannot tell (the default): a false "no" costs bandwidth, a false "yes" data.
    fn reads_zero(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// Makes the backing at least `len` bytes long (`resize`): a file is extended (the new
    /// part reads as zeroes), a device must already be that large. Never shrinks.
    fn grow(&self, len: u64) -> io::Result<()> {
        if len <= self.size() {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this backing cannot grow",
        ))
    }

    /// The file descriptor behind this backing, for engines that submit data I/O to an
    /// io_uring themselves. Layers that must see every I/O return `None` (fault injection),
    /// which keeps engines on the positioned-I/O path through them, or a descriptor together
    /// with a [`RingObserver`] (recording).
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Who must be told of the writes an engine's io_uring does on [`BlockIo::raw_fd`], which
    /// bypass this trait's methods. `None` (every production backing) leaves the ring
    /// unobserved.
    fn ring_observer(&self) -> Option<std::sync::Arc<dyn RingObserver>> {
        None
    }

    /// Is `raw_fd` opened with O_DIRECT (data I/O on it must be aligned, see
    /// [`backing::DIRECT_ALIGN`])?
    fn direct_io(&self) -> bool {
        false
    }

    /// Writes guest buffers at `offset`; `dsync` makes them durable before returning.
    /// The default gathers into one buffer; backings with vectored I/O override it.
    fn writev_at(&self, iovs: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<()> {
        let mut buf = Vec::with_capacity(iovs.iter().map(|v| v.iov_len).sum());
        for v in iovs {
            // SAFETY: callers pass iovecs describing live buffers (the engine's guest buffers).
            buf.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
            });
        }
        self.write_at(&buf, offset)?;
        if dsync {
            self.flush()?;
        }
        Ok(())
    }

    /// Reads into guest buffers from `offset`.
    fn readv_at(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        let mut buf = vec![0u8; iovs.iter().map(|v| v.iov_len).sum()];
        self.read_at(&mut buf, offset)?;
        let mut o = 0;
        for v in iovs {
            // SAFETY: callers pass iovecs describing live, writable buffers owned by the request.
            unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) }
                .copy_from_slice(&buf[o..o + v.iov_len]);
            o += v.iov_len;
        }
        Ok(())
    }
}

/// Sees the writes an io_uring does on a backing's raw descriptor, so a recording layer logs
/// them although they never pass through its [`BlockIo`] methods (the crash tests' view of the
/// real, concurrent engine). Called on the ring's thread.
pub trait RingObserver: Send + Sync {
    /// A write is about to be pushed to the ring, before the kernel can start it: `bufs` are
    /// its bytes, in order, from `offset`. Returns a token for [`RingObserver::write_completed`].
    fn write_submitted(&self, offset: u64, bufs: &[&[u8]]) -> u64;
    /// The write `token` was reaped from the completion queue: `ok` when it transferred every
    /// byte without error, `durable` when it was an `RWF_DSYNC` write (on stable storage now).
    fn write_completed(&self, token: u64, ok: bool, durable: bool);
}

pub mod backing;
pub mod fault;
pub mod iov;
pub mod mem;
pub mod record;
pub mod sys;
pub mod uring;

/// A regular file or a block device.
pub struct FileIo {
    backing: Backing,
    /// The backing's size, which `grow` changes while queues read it.
    size: std::sync::atomic::AtomicU64,
    /// O_DIRECT descriptor for data I/O (`--cache none`), if the filesystem allows it.
    direct: Option<File>,
}

impl FileIo {
    /// Opens `path` and takes the image lock ([`Backing::open`]): how the tools (`info`, `map`,
    /// `check`, `check --repair`, `create --scatter`) and `create` on a device reach an image.
    /// The daemon opens the [`Backing`] itself, as it may serve it raw, and adds an O_DIRECT
    /// descriptor ([`FileIo::with_direct`]).
    pub fn open(path: &Path, read_only: bool) -> Result<FileIo, OpenError> {
        Ok(FileIo::new(Backing::open(path, read_only)?))
    }

    pub fn new(backing: Backing) -> FileIo {
        FileIo {
            size: std::sync::atomic::AtomicU64::new(backing.size),
            backing,
            direct: None,
        }
    }

    /// Data I/O submitted to an io_uring goes to `direct` (opened with O_DIRECT).
    pub fn with_direct(backing: Backing, direct: Option<File>) -> FileIo {
        let mut f = FileIo::new(backing);
        f.direct = direct;
        f
    }

    pub fn file(&self) -> &File {
        &self.backing.file
    }
}

fn iov(buf: &[u8]) -> [libc::iovec; 1] {
    [libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }]
}

impl BlockIo for FileIo {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        sys::preadv_all(self.file(), &iov(buf), offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        sys::pwritev_all(self.file(), &iov(buf), offset, false)
    }

    fn flush(&self) -> io::Result<()> {
        sys::fdatasync(self.file())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.backing.zero_range(Zeroing::Punch, offset, len)
    }

    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    fn reads_zero(&self, offset: u64, len: u64) -> bool {
        // A device has no holes (lseek reports all of it as data); a file's hole is what its
        // filesystem reports as one, page cache included (dirty pages are data).
        !self.backing.is_block_device && len > 0 && sys::is_hole(self.file(), offset, len)
    }

    fn grow(&self, len: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if len <= self.size() {
            return Ok(());
        }
        if self.backing.is_block_device {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: the device holds {} bytes, {len} are needed",
                    self.backing.path.display(),
                    self.size()
                ),
            ));
        }
        self.file().set_len(len)?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    fn writev_at(&self, iovs: &[libc::iovec], offset: u64, dsync: bool) -> io::Result<()> {
        sys::pwritev_all(self.file(), iovs, offset, dsync)
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(
            self.direct.as_ref().unwrap_or(self.file()),
        ))
    }

    fn direct_io(&self) -> bool {
        self.direct.is_some()
    }

    fn readv_at(&self, iovs: &[libc::iovec], offset: u64) -> io::Result<()> {
        sys::preadv_all(self.file(), iovs, offset)
    }
}
