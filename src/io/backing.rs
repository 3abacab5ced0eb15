//! A backing: the regular file or block device an image (or a raw disk) lives in, opened and
//! locked, with its kind and size. Opening it is where the image lock is taken, so nothing can
//! read or write a backing another process holds for writing.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::sys;

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
        if !sys::try_lock(&file, !read_only).map_err(|e| OpenError::Io(p.clone(), e))? {
            return Err(OpenError::Locked(p));
        }
        let size = if is_block_device {
            sys::blk_size(&file).map_err(|e| OpenError::Io(p.clone(), e))?
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

/// How a range of a backing is emptied. The one place that decides which syscall does it for a
/// file and for a device; each caller names what it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zeroing {
    /// Deallocate (a guest's DISCARD); the range need not read back as zeroes. A device gets
    /// BLKDISCARD, a file a hole (PUNCH_HOLE | KEEP_SIZE).
    Discard,
    /// Read back as zeroes, deallocated where the backing can (the image's punch of freed
    /// blocks). A device gets BLKZEROOUT, which guarantees zeroes (a discard may not) while the
    /// kernel unmaps where it can; a file a hole.
    Punch,
    /// Read back as zeroes, deallocating allowed (WRITE_ZEROES with unmap): a hole where
    /// fallocate can punch one (a file, or a device whose kernel can), otherwise as
    /// [`Zeroing::Zeroes`].
    PunchOrZeroes,
    /// Read back as zeroes (WRITE_ZEROES). A device gets BLKZEROOUT; a file ZERO_RANGE, or zero
    /// bytes written where its filesystem has no such fallocate mode.
    Zeroes,
}

impl Backing {
    /// Empties `[offset, offset + len)` the way `how` says.
    pub fn zero_range(&self, how: Zeroing, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&self.file, self.is_block_device, how, offset, len)
    }
}

fn zero_range(file: &File, is_dev: bool, how: Zeroing, off: u64, len: u64) -> io::Result<()> {
    const HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match how {
        Zeroing::Discard if is_dev => sys::blk_discard(file, off, len),
        Zeroing::Punch if is_dev => sys::blk_zeroout(file, off, len),
        Zeroing::Discard | Zeroing::Punch => sys::fallocate(file, HOLE, off, len),
        Zeroing::PunchOrZeroes => match sys::fallocate(file, HOLE, off, len) {
            Err(e) if unsupported(&e) => zero_range(file, is_dev, Zeroing::Zeroes, off, len),
            other => other,
        },
        Zeroing::Zeroes if is_dev => sys::blk_zeroout(file, off, len),
        Zeroing::Zeroes => match sys::fallocate(
            file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Err(e) if unsupported(&e) => write_zero_bytes(file, off, len),
            other => other,
        },
    }
}

/// The errors with which a file or device says it has no such fallocate mode or ioctl.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
    )
}

/// Zero bytes written per call by [`write_zero_bytes`]: 1 MiB bounds the buffer's memory while
/// keeping the number of system calls small.
const ZERO_CHUNK: usize = 1 << 20;

/// Last resort for filesystems without fallocate modes: write real zero bytes.
fn write_zero_bytes(file: &File, mut off: u64, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; ZERO_CHUNK];
    let end = off + len;
    while off < end {
        let n = ((end - off) as usize).min(ZERO_CHUNK);
        let iov = [libc::iovec {
            iov_base: zeroes.as_ptr() as *mut libc::c_void,
            iov_len: n,
        }];
        sys::pwritev_all(file, &iov, off, false)?;
        off += n as u64;
    }
    Ok(())
}
