//! Backing I/O for images: positioned reads and writes, barriers and deallocation, behind a
//! trait so tests can record every write and barrier (crash states) or inject faults.

use std::fs::File;
use std::io;

use crate::engine::raw::Backing;
use crate::engine::sysio;

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
}

pub mod mem;
pub mod record;

/// A regular file or a block device.
pub struct FileIo {
    file: File,
    is_block_device: bool,
    size: u64,
}

impl FileIo {
    pub fn new(backing: Backing) -> FileIo {
        FileIo {
            size: backing.size,
            is_block_device: backing.is_block_device,
            file: backing.file,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
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
        sysio::preadv_all(&self.file, &iov(buf), offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        sysio::pwritev_all(&self.file, &iov(buf), offset, false)
    }

    fn flush(&self) -> io::Result<()> {
        sysio::fdatasync(&self.file)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.is_block_device {
            // BLKZEROOUT guarantees zeroes (a discard may not); the kernel unmaps where it can.
            return sysio::blk_zeroout(&self.file, offset, len);
        }
        sysio::fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn size(&self) -> u64 {
        self.size
    }
}
