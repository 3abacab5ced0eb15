//! Slicing and filling guest iovecs: the pieces of one request that go to different places.

use std::io;

/// Most iovecs one vectored system call takes (Linux's IOV_MAX).
pub const MAX_IOVS: usize = 1024;

/// The iovecs covering bytes `[start, start + len)` of the buffer `iovs` describes.
pub fn slice(iovs: &[libc::iovec], start: usize, len: usize) -> super::uring::Iovs {
    let mut out = super::uring::Iovs::new();
    let mut pos = 0usize;
    let end = start + len;
    for v in iovs {
        let (a, b) = (pos, pos + v.iov_len);
        pos = b;
        if b <= start || a >= end {
            continue;
        }
        let s = start.max(a);
        let e = end.min(b);
        out.push(libc::iovec {
            // SAFETY: s - a < iov_len, so the pointer stays inside this buffer.
            iov_base: unsafe { (v.iov_base as *mut u8).add(s - a) }.cast(),
            iov_len: e - s,
        });
    }
    out
}

/// Can these buffers at this file offset go to an O_DIRECT descriptor (every address, length
/// and the offset aligned to `align`)?
pub fn aligned(iovs: &[libc::iovec], offset: u64, align: usize) -> bool {
    offset % align as u64 == 0
        && iovs
            .iter()
            .all(|v| v.iov_base as usize % align == 0 && v.iov_len % align == 0)
}

/// Fills the buffers with zeroes (reads of holes and unwritten blocks).
pub fn zero(iovs: &[libc::iovec]) {
    for v in iovs {
        // SAFETY: the iovecs describe live, writable guest buffers owned by the request.
        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
    }
}

/// Copies the buffers' bytes into `dst` (building a padded block).
pub fn gather(iovs: &[libc::iovec], dst: &mut [u8]) -> io::Result<()> {
    let mut o = 0;
    for v in iovs {
        if o + v.iov_len > dst.len() {
            return Err(io::Error::other("iovec larger than the destination"));
        }
        // SAFETY: the iovecs describe live guest buffers; `dst` has room (checked above).
        dst[o..o + v.iov_len].copy_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
        o += v.iov_len;
    }
    Ok(())
}

/// Copies `src` into the buffers, from their start (cached data into a guest's read buffers).
pub fn scatter(iovs: &[libc::iovec], src: &[u8]) -> io::Result<()> {
    let mut o = 0;
    for v in iovs {
        if o + v.iov_len > src.len() {
            return Err(io::Error::other("iovec larger than the source"));
        }
        // SAFETY: the iovecs describe live, writable guest buffers owned by the request; `src`
        // holds the bytes (checked above) and cannot overlap guest memory it was not read from.
        unsafe {
            std::ptr::copy_nonoverlapping(src[o..].as_ptr(), v.iov_base as *mut u8, v.iov_len)
        };
        o += v.iov_len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_across_buffers() {
        let mut a = [1u8; 10];
        let mut b = [2u8; 10];
        let iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 10,
            },
        ];
        let s = slice(&iovs, 8, 5);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].iov_len, s[1].iov_len), (2, 3));
        zero(&s);
        assert_eq!(a[7..], [1, 0, 0]);
        assert_eq!(b[..4], [0, 0, 0, 2]);
        let mut d = [9u8; 5];
        gather(&slice(&iovs, 7, 4), &mut d[..4]).unwrap();
        assert_eq!(d, [1, 0, 0, 0, 9]);
        scatter(&slice(&iovs, 9, 2), &[7, 8]).unwrap();
        assert_eq!((a[9], b[0]), (7, 8));
        assert!(scatter(&slice(&iovs, 9, 2), &[7]).is_err());
    }
}
