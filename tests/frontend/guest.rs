//! The guest side of our own vhost-user frontend: guest memory in a memfd (what QEMU and
//! cloud-hypervisor share with a backend), split virtqueues laid out and driven by the test
//! itself (descriptor table, avail ring, used ring, virtio 1.2 §2.7), and virtio-blk requests
//! (§5.2.6: header, data, status). Nothing here talks vhost-user; `session.rs` does.
//!
//! The rings are written by hand, not with virtio-queue's driver mocks, so that a test can also
//! write what no well-behaved driver writes (loops, wild indirect tables, avail index jumps).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use vhost::VhostUserMemoryRegionInfo;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Written into every status byte before a request is posted: a device that answers overwrites
/// it, so a status still at this value was never written.
pub const STATUS_UNWRITTEN: u8 = 0xee;

pub const SECTOR: u64 = 512;

/// Where each queue's rings live in guest-physical memory: queue q at RINGS + q * RING_STRIDE,
/// descriptor table first, avail ring one page in, used ring two pages in (each fits in a page
/// for queues of up to 256 entries).
const RINGS: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
const MAX_RING_SIZE: u16 = 256;
/// Everything from here to the end of guest memory is handed out to request buffers.
const DATA_START: u64 = 0x4_0000;

/// One guest RAM region: guest-physical address, offset in the memfd, length.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub gpa: u64,
    pub offset: u64,
    pub len: u64,
}

/// One split virtqueue as the driver sees it.
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The driver's next avail index (what it last published).
    pub avail_idx: u16,
    /// The driver's consumer index into the used ring.
    pub last_used: u16,
    free: Vec<u16>,
    /// Descriptors of each chain in flight, by head, so they can be reused once it is used.
    chains: HashMap<u16, Vec<u16>>,
    pub kick: EventFd,
    pub call: EventFd,
    /// Guest notifications seen on `call`.
    pub calls: u64,
}

/// Guest RAM in one memfd, mapped shared into the test, and the queues laid out in it.
pub struct Guest {
    memfd: File,
    base: *mut u8,
    size: usize,
    pub regions: Vec<Region>,
    pub rings: Vec<Ring>,
    /// Allocation marks (offsets into the first and second region) for buffers.
    next_data: u64,
    next_high: u64,
}

/// A posted virtio-blk request.
#[derive(Clone, Debug)]
pub struct Req {
    pub q: usize,
    pub head: u16,
    pub sector: u64,
    pub status: u64,
    pub data: u64,
    pub len: usize,
    /// The device writes `len` data bytes (a READ).
    pub device_writes: bool,
}

/// What a request carries besides its header and status.
enum Payload<'a> {
    None,
    /// Device-readable data (a WRITE).
    Out(&'a [u8]),
    /// Device-writable room of this many bytes (a READ).
    In(usize),
}

/// One used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u16,
    pub len: u32,
}

/// A zeroed memfd of `size` bytes (sealing allowed, so a test may seal it as QEMU's are).
pub fn memfd(name: &str, size: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    f
}

/// Maps `len` bytes of `file` at `offset`, shared, read-write.
pub fn map_shared(file: &File, offset: u64, len: usize) -> *mut u8 {
    // SAFETY: a fresh shared mapping of a file we hold; the result is checked and the caller
    // unmaps it with `unmap`.
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
    assert!(
        p != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    p.cast()
}

pub fn unmap(p: *mut u8, len: usize) {
    // SAFETY: `p` was returned by `map_shared` for `len` bytes and is not used afterwards.
    unsafe { libc::munmap(p.cast(), len) };
}

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

impl Guest {
    /// Guest RAM of the given (gpa, len) regions, laid out one after the other in one memfd, and
    /// `queues` rings of `size` entries each. QEMU splits RAM below and above 4 GiB the same way.
    pub fn new(layout: &[(u64, u64)], queues: usize, size: u16) -> Guest {
        assert!(size.is_power_of_two() && size <= MAX_RING_SIZE);
        let mut regions = Vec::new();
        let mut offset = 0;
        for &(gpa, len) in layout {
            regions.push(Region { gpa, offset, len });
            offset += len;
        }
        let total = offset as usize;
        let memfd = memfd("extblk-test-guest", offset);
        let base = map_shared(&memfd, 0, total);
        assert!(
            regions[0].gpa == 0 && regions[0].len >= DATA_START + (1 << 20),
            "the first region holds the rings and some buffers"
        );
        let rings = (0..queues)
            .map(|q| {
                let desc = RINGS + q as u64 * RING_STRIDE;
                Ring {
                    size,
                    desc,
                    avail: desc + 0x1000,
                    used: desc + 0x2000,
                    avail_idx: 0,
                    last_used: 0,
                    free: (0..size).rev().collect(),
                    chains: HashMap::new(),
                    kick: eventfd(),
                    call: eventfd(),
                    calls: 0,
                }
            })
            .collect();
        assert!(RINGS + queues as u64 * RING_STRIDE <= DATA_START);
        Guest {
            memfd,
            base,
            size: total,
            regions,
            rings,
            next_data: DATA_START,
            next_high: 0,
        }
    }

    /// Offset into the memfd of `len` bytes at `gpa`; panics unless one region holds them all.
    fn file_offset(&self, gpa: u64, len: u64) -> u64 {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.len)
            .map(|r| r.offset + (gpa - r.gpa))
            .unwrap_or_else(|| panic!("test bug: {gpa:#x}+{len} is not guest RAM"))
    }

    fn host(&self, gpa: u64, len: u64) -> *mut u8 {
        let off = self.file_offset(gpa, len);
        // SAFETY: `file_offset` checked that off + len lies inside the mapping of `size` bytes.
        unsafe { self.base.add(off as usize) }
    }

    /// The frontend's (our) virtual address of `gpa`: what SET_VRING_ADDR carries.
    pub fn va(&self, gpa: u64) -> u64 {
        self.host(gpa, 1) as u64
    }

    /// An address in our process that belongs to no guest region (for hostile SET_VRING_ADDR).
    pub fn va_outside(&self) -> u64 {
        self.base as u64 + self.size as u64 + (64 << 20)
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        let p = self.host(gpa, bytes.len() as u64);
        // SAFETY: `host` checked the range; the device does not touch buffers it has not been
        // given, and the test hands a buffer over only after writing it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.host(gpa, len as u64);
        let mut v = vec![0u8; len];
        // SAFETY: `host` checked the range; the test reads a buffer only after the device gave
        // it back (used index loaded with Acquire), or bytes the device never writes.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn read_u8(&self, gpa: u64) -> u8 {
        self.read(gpa, 1)[0]
    }

    fn atomic_u16(&self, gpa: u64) -> &AtomicU16 {
        assert_eq!(gpa % 2, 0);
        let p = self.host(gpa, 2);
        // SAFETY: two aligned bytes inside the mapping, which lives as long as `self`; the
        // device accesses ring indices atomically too.
        unsafe { &*(p as *const AtomicU16) }
    }

    /// Memory regions as SET_MEM_TABLE / ADD_MEM_REG describe them.
    pub fn vhost_regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: self.va(r.gpa),
                mmap_offset: r.offset,
                mmap_handle: self.memfd.as_raw_fd(),
            })
            .collect()
    }

    /// `len` bytes of guest RAM for buffers, 16-byte aligned, never reused; from the second
    /// region when `high` (requests then span both regions, as a guest's above-4G pages do).
    pub fn alloc(&mut self, len: u64, high: bool) -> u64 {
        let (region, next) = if high && self.regions.len() > 1 {
            (self.regions[1], &mut self.next_high)
        } else {
            (self.regions[0], &mut self.next_data)
        };
        let gpa = region.gpa + ((*next + 15) & !15);
        assert!(
            gpa + len <= region.gpa + region.len,
            "test bug: guest RAM for buffers exhausted"
        );
        *next = gpa + len - region.gpa;
        gpa
    }

    // ---- raw ring access: what a driver (or a hostile one) writes ----

    /// Writes descriptor `i` of queue `q`.
    pub fn set_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let ring = &self.rings[q];
        self.write_desc_at(ring.desc + u64::from(i) * 16, addr, len, flags, next);
    }

    /// Writes a descriptor anywhere in guest memory (an indirect table's entry).
    pub fn write_desc_at(&self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(gpa, &d);
    }

    /// Puts `head` in the next avail slot and publishes it (release: descriptors first).
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let (avail, size, idx) = {
            let r = &self.rings[q];
            (r.avail, r.size, r.avail_idx)
        };
        self.write_u16(avail + 4 + 2 * u64::from(idx % size), head);
        self.set_avail_idx(q, idx.wrapping_add(1));
    }

    /// Publishes `idx` as the avail index, whatever was written before it.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.rings[q].avail_idx = idx;
        let avail = self.rings[q].avail;
        self.atomic_u16(avail + 2).store(idx, Ordering::Release);
    }

    /// The avail index as guest memory holds it (what cloud-hypervisor sends as the base).
    pub fn avail_idx_in_memory(&self, q: usize) -> u16 {
        self.atomic_u16(self.rings[q].avail + 2)
            .load(Ordering::Acquire)
    }

    /// The device's used index.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.atomic_u16(self.rings[q].used + 2)
            .load(Ordering::Acquire)
    }

    /// Used element `i` (a ring position, taken modulo the size).
    pub fn used_elem(&self, q: usize, i: u16) -> Used {
        let r = &self.rings[q];
        let b = self.read(r.used + 4 + 8 * u64::from(i % r.size), 8);
        Used {
            id: u32::from_le_bytes(b[0..4].try_into().unwrap()) as u16,
            len: u32::from_le_bytes(b[4..8].try_into().unwrap()),
        }
    }

    /// Asks the device for a notification at the next used entry (EVENT_IDX's `used_event`,
    /// as Linux's `virtqueue_enable_cb` does); harmless without EVENT_IDX.
    fn want_notification(&self, q: usize) {
        let r = &self.rings[q];
        self.write_u16(r.avail + 4 + 2 * u64::from(r.size), r.last_used);
    }

    pub fn kick(&self, q: usize) {
        self.want_notification(q);
        fence(Ordering::SeqCst);
        self.rings[q].kick.write(1).unwrap();
    }

    // ---- requests ----

    fn take_desc(&mut self, q: usize) -> u16 {
        self.rings[q]
            .free
            .pop()
            .expect("test bug: ring has no free descriptor")
    }

    /// Builds a request chain (header, data unless `payload` is empty, status) without
    /// publishing it.
    fn build(&mut self, q: usize, kind: u32, sector: u64, payload: Payload, high: bool) -> Req {
        let hdr = self.alloc(16, false);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(hdr, &h);
        let status = self.alloc(1, false);
        self.write(status, &[STATUS_UNWRITTEN]);
        let (len, device_writes) = match payload {
            Payload::None => (0, false),
            Payload::Out(bytes) => (bytes.len(), false),
            Payload::In(len) => (len, true),
        };
        let buf = if len > 0 {
            self.alloc(len as u64, high)
        } else {
            0
        };
        if let Payload::Out(bytes) = payload {
            self.write(buf, bytes);
        }
        let d_hdr = self.take_desc(q);
        let d_status = self.take_desc(q);
        let mut chain = vec![d_hdr];
        if len > 0 {
            let d_data = self.take_desc(q);
            self.set_desc(q, d_hdr, hdr, 16, VIRTQ_DESC_F_NEXT, d_data);
            let write = if device_writes { VIRTQ_DESC_F_WRITE } else { 0 };
            self.set_desc(
                q,
                d_data,
                buf,
                len as u32,
                VIRTQ_DESC_F_NEXT | write,
                d_status,
            );
            chain.push(d_data);
        } else {
            self.set_desc(q, d_hdr, hdr, 16, VIRTQ_DESC_F_NEXT, d_status);
        }
        self.set_desc(q, d_status, status, 1, VIRTQ_DESC_F_WRITE, 0);
        chain.push(d_status);
        self.rings[q].chains.insert(d_hdr, chain);
        Req {
            q,
            head: d_hdr,
            sector,
            status,
            data: buf,
            len,
            device_writes,
        }
    }

    /// Posts a WRITE of `data` at `sector` (not kicked).
    pub fn post_write(&mut self, q: usize, sector: u64, data: &[u8]) -> Req {
        let high = sector % 2 == 1;
        let r = self.build(q, VIRTIO_BLK_T_OUT, sector, Payload::Out(data), high);
        self.push_avail(q, r.head);
        r
    }

    /// Posts a READ of `len` bytes at `sector` (not kicked).
    pub fn post_read(&mut self, q: usize, sector: u64, len: usize) -> Req {
        let high = sector % 2 == 0;
        let r = self.build(q, VIRTIO_BLK_T_IN, sector, Payload::In(len), high);
        self.push_avail(q, r.head);
        r
    }

    /// Builds a WRITE chain without putting it in the avail ring (a request the driver had
    /// prepared, for tests that mark it by hand).
    pub fn prepare_write(&mut self, q: usize, sector: u64, data: &[u8]) -> Req {
        self.build(q, VIRTIO_BLK_T_OUT, sector, Payload::Out(data), false)
    }

    /// Posts a FLUSH (not kicked).
    pub fn post_flush(&mut self, q: usize) -> Req {
        let r = self.build(q, VIRTIO_BLK_T_FLUSH, 0, Payload::None, false);
        self.push_avail(q, r.head);
        r
    }

    /// Registers a hand-made chain so that its descriptors are not handed out meanwhile.
    pub fn reserve_desc(&mut self, q: usize, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.take_desc(q)).collect()
    }

    pub fn status(&self, r: &Req) -> u8 {
        self.read_u8(r.status)
    }

    /// Takes every used element published since the last call, frees their chains.
    pub fn take_used(&mut self, q: usize) -> Vec<Used> {
        let end = self.used_idx(q);
        let mut out = Vec::new();
        while self.rings[q].last_used != end {
            let e = self.used_elem(q, self.rings[q].last_used);
            let r = &mut self.rings[q];
            r.last_used = r.last_used.wrapping_add(1);
            if let Some(descs) = r.chains.remove(&e.id) {
                r.free.extend(descs);
            }
            out.push(e);
        }
        out
    }

    /// Waits until `n` more used elements arrived on `q` (polling the used index, woken early by
    /// the call eventfd); panics after `timeout` with what arrived and `what` was awaited.
    pub fn wait_used(&mut self, q: usize, n: usize, timeout: Duration, what: &str) -> Vec<Used> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.take_used(q));
            if got.len() >= n {
                return got;
            }
            self.want_notification(q);
            if Instant::now() > deadline {
                panic!(
                    "timeout after {timeout:?} waiting for {what}: {} of {n} used entries on queue {q} (used idx {}, avail idx {}): {got:?}",
                    got.len(),
                    self.used_idx(q),
                    self.rings[q].avail_idx
                );
            }
            self.wait_call(q, Duration::from_millis(5));
        }
    }

    /// Waits up to `wait` for the call eventfd; counts a notification if it fired.
    pub fn wait_call(&mut self, q: usize, wait: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.rings[q].call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
        if n > 0 && self.rings[q].call.read().is_ok() {
            self.rings[q].calls += 1;
        }
    }

    /// Makes sure nothing more is used on `q` during `quiet`: returns what arrived (a test
    /// asserts it is empty, or what it expects).
    pub fn settle(&mut self, q: usize, quiet: Duration) -> Vec<Used> {
        let deadline = Instant::now() + quiet;
        let mut got = Vec::new();
        while Instant::now() < deadline {
            got.extend(self.take_used(q));
            self.wait_call(q, Duration::from_millis(5));
        }
        got.extend(self.take_used(q));
        got
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        unmap(self.base, self.size);
    }
}

/// A deterministic byte pattern for (seed, len): every write carries its own.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
