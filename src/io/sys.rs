//! Thin, checked wrappers over the positioned and block-device syscalls: vectored I/O, fallocate,
//! the block-device ioctls and flock. The other layers' syscalls go through these.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// Drops the first `n` bytes of an iovec list, in place; returns the remaining slice start.
fn advance(iovs: &mut [libc::iovec], mut n: usize) -> usize {
    let mut i = 0;
    while i < iovs.len() && n >= iovs[i].iov_len {
        n -= iovs[i].iov_len;
        i += 1;
    }
    if i < iovs.len() && n > 0 {
        // SAFETY: n < iov_len, so the new base stays inside the same buffer.
        iovs[i].iov_base = unsafe { (iovs[i].iov_base as *mut u8).add(n) } as *mut libc::c_void;
        iovs[i].iov_len -= n;
    }
    i
}

/// `pwritev2` until every byte is written. `dsync` makes the data durable before returning.
pub fn pwritev_all(
    file: &File,
    iovs: &[libc::iovec],
    mut offset: u64,
    dsync: bool,
) -> io::Result<()> {
    let mut iovs = iovs.to_vec();
    let mut start = 0;
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    while start < iovs.len() {
        if iovs[start].iov_len == 0 {
            start += 1;
            continue;
        }
        let cnt = (iovs.len() - start).min(libc::UIO_MAXIOV as usize);
        // SAFETY: the iovecs describe live buffers (the caller's contract, see GuestBuffers);
        // the kernel only reads them.
        let n = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                iovs[start..].as_ptr(),
                cnt as libc::c_int,
                offset as libc::off_t,
                flags,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "backing accepted no bytes",
            ));
        }
        offset += n as u64;
        start += advance(&mut iovs[start..], n as usize);
    }
    Ok(())
}

/// `preadv` until every byte is read; reading past the end of the backing is an error.
pub fn preadv_all(file: &File, iovs: &[libc::iovec], mut offset: u64) -> io::Result<()> {
    let mut iovs = iovs.to_vec();
    let mut start = 0;
    while start < iovs.len() {
        if iovs[start].iov_len == 0 {
            start += 1;
            continue;
        }
        let cnt = (iovs.len() - start).min(libc::UIO_MAXIOV as usize);
        // SAFETY: the iovecs describe live, writable buffers owned by the request.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                iovs[start..].as_ptr(),
                cnt as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the backing ended before the disk's capacity (was it truncated?)",
            ));
        }
        offset += n as u64;
        start += advance(&mut iovs[start..], n as usize);
    }
    Ok(())
}

pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an owned fd with integer arguments.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn blk_range_ioctl(file: &File, req: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read a `u64[2]` that lives across the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req as _, range.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn blk_discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(file, BLKDISCARD, offset, len)
}

pub fn blk_zeroout(file: &File, offset: u64, len: u64) -> io::Result<()> {
    blk_range_ioctl(file, BLKZEROOUT, offset, len)
}

pub fn blk_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

pub fn blk_physical_block_size(file: &File) -> io::Result<u32> {
    let mut size: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int into `size`.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKPBSZGET as _,
            &mut size as *mut libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

pub fn fdatasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)`.
pub const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

/// `struct fiemap` without its extent array (`fm_extent_count` 0: the kernel only counts).
#[repr(C)]
#[derive(Default)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// Is `[offset, offset + len)` of `file` one hole: no extent of the file's filesystem maps
/// any of it, not even an unwritten or a delayed one (dirty page cache)? Asked with FIEMAP,
/// which counts extents under the filesystem's mapping lock only, not the inode lock that
/// `lseek(SEEK_DATA)` takes and that allocating O_DIRECT writes hold exclusively. Any
/// failure (a filesystem without FIEMAP, a seccomp refusal) answers no, which only costs the
/// caller a write of zeroes.
pub fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    let mut m = Fiemap {
        fm_start: offset,
        fm_length: len,
        ..Default::default()
    };
    // SAFETY: FS_IOC_FIEMAP reads and writes a `struct fiemap` with `fm_extent_count` 0 (no
    // extent array follows), which `m` is and which lives across the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut m as *mut Fiemap) };
    r == 0 && m.fm_mapped_extents == 0
}

/// Takes a non-blocking `flock` on the image: exclusive for writers, shared for readers.
/// Returns `Ok(false)` if someone else holds a conflicting lock.
pub fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: plain syscall on an owned fd.
    let r = unsafe { libc::flock(file.as_raw_fd(), op) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Waits until one of `fds` is readable (or hung up), retrying on EINTR; returns which are.
pub fn poll_readable<const N: usize>(fds: [std::os::fd::RawFd; N]) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `p` is a valid array of N pollfd for the duration of the call.
        let r = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(p.map(|x| x.revents != 0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits at most `timeout_ms` for `fd` to become readable (EINTR counts as not yet); returns
/// whether it is. For a loop that also watches something `poll` cannot (a channel).
pub fn poll_readable_for(fd: std::os::fd::RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r >= 0 {
        return Ok(p.revents != 0);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Where a file's data or hole starting at or after `offset` is: `lseek` with `SEEK_DATA` or
/// `SEEK_HOLE`. `Ok(None)` when there is none (ENXIO: `offset` is in the final hole, for
/// `SEEK_DATA`, or at the end); EINVAL from a filesystem that does not know is the caller's.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: plain syscall on an owned fd; it moves only that descriptor's file position,
    // which nothing here uses (all I/O is positioned).
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The start of the first data at or after `offset` (`SEEK_DATA`); `None`: only a hole follows.
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The start of the first hole at or after `offset` (`SEEK_HOLE`; the end of the file counts
/// as one).
pub fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_splits_inside_and_across_buffers() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iovs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        assert_eq!(advance(&mut iovs, 3), 0);
        assert_eq!(iovs[0].iov_len, 5);
        assert_eq!(advance(&mut iovs, 5), 1);
        assert_eq!(advance(&mut iovs[1..], 8), 1);
    }
}
