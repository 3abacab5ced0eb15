//! vhost-user inflight I/O tracking for split rings (QEMU's docs/interop/vhost-user.rst,
//! "Inflight I/O tracking"): a shared memory region, kept by the frontend across a backend
//! crash, that records which descriptor heads the backend took off the avail ring and has not
//! yet published as used. A restarted backend resubmits exactly those, oldest first.
//!
//! Layout, per queue, `ALIGN_UP(16 * queue_size + 16, 64)` bytes: a 16-byte header
//! (`features` u64 @0, always 0; `version` u16 @8, 0 = fresh; `desc_num` u16 @10;
//! `last_batch_head` u16 @12; `used_idx` u16 @14), then one 16-byte entry per descriptor
//! (`inflight` u8 @0, `next` u16 @6 (packed rings only, unused here), `counter` u64 @8).
//!
//! Rules, all under the queue's vring lock (the one lock every used-ring write takes):
//! - at pop of head `h`: `counter[h] = next counter`, then `inflight[h] = 1`;
//! - at publication of `h`'s used entry: `last_batch_head = h`; used element and used index
//!   written; then `inflight[h] = 0` and `used_idx = used->idx` (fenced in that order), so a
//!   crash between the two leaves `used_idx != used->idx` and the restart clears
//!   `last_batch_head` itself;
//! - at restart: a fresh region (version 0) becomes version 1 with `used_idx` taken from the
//!   ring (SPDK issue 3766: a never-written `used_idx` of 0 must not look like a mismatch) and
//!   nothing is resubmitted; otherwise the still-marked heads are resubmitted by counter.
//!
//! The region is the frontend's memory: it may hold anything. Every value read from it is
//! bounded before use (heads below the queue size, `desc_num` equal to it), and the mapping
//! is sized from the checked file size, never from what the frontend claims alone.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};

use thiserror::Error;

/// Bytes of one queue's region.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (16 * u64::from(queue_size) + 16).div_ceil(64) * 64
}

const HEADER: usize = 16;
const ENTRY: usize = 16;
const VERSION: u16 = 1;

#[derive(Debug, Error)]
pub enum InflightError {
    #[error("inflight region for {0} queue(s) of {1} descriptors: outside the device's limits")]
    Geometry(u16, u16),
    #[error("inflight region of {size} bytes where {want} are needed")]
    Size { size: u64, want: u64 },
    #[error("inflight fd holds {have} bytes, the region needs {need}")]
    FdTooShort { have: u64, need: u64 },
    #[error("inflight fd is not sealed against shrinking: it could be cut under the mapping")]
    NotSealed,
    #[error("inflight region offset {0} is not page aligned")]
    Offset(u64),
    #[error("inflight region: {0}")]
    Io(#[from] io::Error),
}

/// A mapped inflight region: `num_queues` queue regions of `queue_size` entries.
pub struct InflightRegion {
    base: *mut u8,
    len: usize,
    file: File,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is shared memory owned by this value; every access goes through
// volatile reads and writes of plain integers at checked offsets, and the rules in the module
// comment (one vring lock per queue) keep two threads from writing one queue's region at once.
unsafe impl Send for InflightRegion {}
// SAFETY: as above; shared references only read or write through raw pointers under the
// queue's vring lock.
unsafe impl Sync for InflightRegion {}

impl InflightRegion {
    /// A new zeroed region in a sealed memfd (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<InflightRegion, InflightError> {
        let size = u64::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: the name is a NUL-terminated string; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"extblk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        // SAFETY: plain fcntl on a descriptor we own.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error().into());
        }
        InflightRegion::map(file, size, 0, num_queues, queue_size)
    }

    /// Maps a region the frontend sent (SET_INFLIGHT_FD), after checking that the file holds
    /// it and cannot shrink under the mapping (which would turn a later access into SIGBUS).
    pub fn from_frontend(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let want = u64::from(num_queues) * queue_region_size(queue_size);
        if mmap_size < want {
            return Err(InflightError::Size {
                size: mmap_size,
                want,
            });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        if mmap_offset % page != 0 {
            return Err(InflightError::Offset(mmap_offset));
        }
        // SAFETY: plain fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let have = file.metadata()?.len();
        let need = mmap_offset
            .checked_add(want)
            .ok_or(InflightError::FdTooShort {
                have,
                need: u64::MAX,
            })?;
        if have < need {
            return Err(InflightError::FdTooShort { have, need });
        }
        InflightRegion::map(file, want, mmap_offset, num_queues, queue_size)
    }

    fn map(
        file: File,
        len: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightRegion, InflightError> {
        let len =
            usize::try_from(len).map_err(|_| InflightError::Geometry(num_queues, queue_size))?;
        if len == 0 {
            return Err(InflightError::Geometry(num_queues, queue_size));
        }
        // SAFETY: a fresh shared mapping of `len` bytes of `file` at `offset`; the file holds
        // them (checked by the callers) and cannot shrink (sealed), so every byte stays backed.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        Ok(InflightRegion {
            base: p.cast(),
            len,
            file,
            num_queues,
            queue_size,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.len as u64
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `q`'s region, or `None` past the region's queues.
    pub fn queue(&self, q: usize) -> Option<QueueRegion<'_>> {
        (q < usize::from(self.num_queues)).then(|| QueueRegion {
            region: self,
            base: q * queue_region_size(self.queue_size) as usize,
        })
    }

    fn read_u8(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: `off` is inside the mapping (asserted); a byte has no alignment.
        unsafe { self.base.add(off).read_volatile() }
    }

    fn write_u8(&self, off: usize, v: u8) {
        assert!(off < self.len);
        // SAFETY: as in `read_u8`.
        unsafe { self.base.add(off).write_volatile(v) }
    }

    fn read_u16(&self, off: usize) -> u16 {
        assert!(off + 2 <= self.len && off % 2 == 0);
        // SAFETY: inside the mapping and aligned (asserted; the mapping is page aligned).
        u16::from_le(unsafe { self.base.add(off).cast::<u16>().read_volatile() })
    }

    fn write_u16(&self, off: usize, v: u16) {
        assert!(off + 2 <= self.len && off % 2 == 0);
        // SAFETY: as in `read_u16`.
        unsafe { self.base.add(off).cast::<u16>().write_volatile(v.to_le()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: inside the mapping and aligned (asserted).
        u64::from_le(unsafe { self.base.add(off).cast::<u64>().read_volatile() })
    }

    fn write_u64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len && off % 8 == 0);
        // SAFETY: as in `read_u64`.
        unsafe { self.base.add(off).cast::<u64>().write_volatile(v.to_le()) }
    }
}

impl Drop for InflightRegion {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this address and length and is not used
        // after this value is gone.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// One queue's part of the region. Callers hold that queue's vring lock.
pub struct QueueRegion<'a> {
    region: &'a InflightRegion,
    base: usize,
}

/// What a restarted queue must do, from its region.
#[derive(Debug, PartialEq, Eq)]
pub struct Restore {
    /// Heads still in flight, oldest first.
    pub heads: Vec<u16>,
    /// The counter the next popped head takes.
    pub next_counter: u64,
}

impl QueueRegion<'_> {
    fn entry(&self, head: u16) -> usize {
        self.base + HEADER + usize::from(head) * ENTRY
    }

    fn in_range(&self, head: u16) -> bool {
        head < self.region.queue_size
    }

    /// `head` was taken off the avail ring.
    pub fn mark(&self, head: u16, counter: u64) {
        if !self.in_range(head) {
            return;
        }
        let e = self.entry(head);
        self.region.write_u64(e + 8, counter);
        fence(Ordering::SeqCst);
        self.region.write_u8(e, 1);
    }

    /// Before publishing `head`'s used entry.
    pub fn begin_publish(&self, head: u16) {
        self.region.write_u16(self.base + 12, head);
        fence(Ordering::SeqCst);
    }

    /// After publishing `head`'s used entry; `used_idx` is the ring's used index now.
    pub fn end_publish(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if self.in_range(head) {
            self.region.write_u8(self.entry(head), 0);
        }
        fence(Ordering::SeqCst);
        self.region.write_u16(self.base + 14, used_idx);
    }

    /// At the first start of the queue on a connection: what to resubmit, given the ring's
    /// size and its used index as the guest memory holds it. Brings the region up to date
    /// (version, `desc_num`, a published-but-uncleared last head) as it goes.
    pub fn restore(&self, ring_size: u16, used_idx: u16) -> Restore {
        let r = self.region;
        let version = r.read_u16(self.base + 8);
        let desc_num = r.read_u16(self.base + 10);
        if version == 0 || desc_num != ring_size || ring_size > r.queue_size {
            if version != 0 {
                log::warn!(
                    "inflight region describes {desc_num} descriptors, the ring has {ring_size}: \
                     starting it afresh"
                );
            }
            self.reset(ring_size.min(r.queue_size), used_idx);
            return Restore {
                heads: Vec::new(),
                next_counter: 1,
            };
        }
        if r.read_u16(self.base + 14) != used_idx {
            // The last batch was published to the used ring, but the crash came before its
            // head was cleared here.
            let last = r.read_u16(self.base + 12);
            if self.in_range(last) {
                r.write_u8(self.entry(last), 0);
            }
            r.write_u16(self.base + 14, used_idx);
        }
        let mut heads: Vec<(u64, u16)> = (0..ring_size)
            .filter(|&h| r.read_u8(self.entry(h)) == 1)
            .map(|h| (r.read_u64(self.entry(h) + 8), h))
            .collect();
        heads.sort_unstable();
        let next_counter = heads.last().map_or(1, |&(c, _)| c.saturating_add(1));
        Restore {
            heads: heads.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }
    }

    fn reset(&self, ring_size: u16, used_idx: u16) {
        let r = self.region;
        for h in 0..r.queue_size {
            r.write_u8(self.entry(h), 0);
            r.write_u64(self.entry(h) + 8, 0);
        }
        r.write_u64(self.base, 0);
        r.write_u16(self.base + 10, ring_size);
        r.write_u16(self.base + 12, 0);
        r.write_u16(self.base + 14, used_idx);
        fence(Ordering::SeqCst);
        r.write_u16(self.base + 8, VERSION);
    }

    /// Sets `desc_num` (SET_INFLIGHT_FD: the frontend's queue size), leaving the rest.
    pub fn set_desc_num(&self, n: u16) {
        self.region.write_u16(self.base + 10, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sizes_follow_qemu() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        let r = InflightRegion::create(2, 128).unwrap();
        assert_eq!(r.size(), 2 * 2112);
        assert_eq!(r.file().metadata().unwrap().len(), 2 * 2112);
    }

    #[test]
    fn a_fresh_region_resubmits_nothing_and_takes_the_used_index() {
        let r = InflightRegion::create(1, 8).unwrap();
        let q = r.queue(0).unwrap();
        // A used index of 0 in a never-written header must not read as a mismatch.
        assert_eq!(q.restore(8, 5).heads, Vec::<u16>::new());
        assert_eq!(r.read_u16(8), VERSION);
        assert_eq!(r.read_u16(14), 5);
        assert!(r.queue(1).is_none());
    }

    #[test]
    fn marked_heads_come_back_oldest_first_and_a_published_last_head_is_cleared() {
        let r = InflightRegion::create(1, 8).unwrap();
        let q = r.queue(0).unwrap();
        q.restore(8, 0);
        q.mark(3, 10);
        q.mark(1, 11);
        q.mark(6, 12);
        q.mark(2, 13);
        // 1 published completely; 2's used entry published (used->idx is 2) but not cleared.
        q.begin_publish(1);
        q.end_publish(1, 1);
        q.begin_publish(2);
        let got = q.restore(8, 2);
        assert_eq!(got.heads, vec![3, 6]);
        assert_eq!(got.next_counter, 13);
        // Out-of-range heads are ignored, never written.
        q.mark(200, 1);
        assert_eq!(q.restore(8, 2).heads, vec![3, 6]);
    }

    #[test]
    fn a_region_for_another_ring_size_starts_afresh() {
        let r = InflightRegion::create(1, 16).unwrap();
        let q = r.queue(0).unwrap();
        q.restore(16, 0);
        q.mark(4, 1);
        assert_eq!(q.restore(8, 0).heads, Vec::<u16>::new());
    }

    #[test]
    fn frontend_regions_are_checked_before_mapping() {
        let r = InflightRegion::create(2, 128).unwrap();
        let f = || r.file().try_clone().unwrap();
        assert!(InflightRegion::from_frontend(f(), r.size(), 0, 2, 128).is_ok());
        // Sized for a larger queue than the file holds.
        assert!(matches!(
            InflightRegion::from_frontend(f(), 2 * queue_region_size(256), 0, 2, 256),
            Err(InflightError::FdTooShort { .. })
        ));
        assert!(matches!(
            InflightRegion::from_frontend(f(), 100, 0, 2, 128),
            Err(InflightError::Size { .. })
        ));
        assert!(matches!(
            InflightRegion::from_frontend(f(), r.size(), 4096, 2, 128),
            Err(InflightError::FdTooShort { .. })
        ));
        assert!(matches!(
            InflightRegion::from_frontend(f(), r.size(), 100, 2, 128),
            Err(InflightError::Offset(100))
        ));
        // An unsealed file could shrink under the mapping.
        let tmp = std::env::temp_dir().join(format!("extblk-inflight-{}", std::process::id()));
        let plain = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&tmp)
            .unwrap();
        plain.set_len(r.size()).unwrap();
        let _ = std::fs::remove_file(&tmp);
        assert!(matches!(
            InflightRegion::from_frontend(plain, r.size(), 0, 2, 128),
            Err(InflightError::NotSealed)
        ));
    }
}
