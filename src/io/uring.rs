//! One io_uring per virtqueue thread: vectored reads and writes of many requests in flight at
//! once, completions signalled on an eventfd that sits in the queue thread's epoll set.
//!
//! A request may need several operations (one per mapped run); the ring tracks them under one
//! slot and hands the finished request back with its first error.
//!
//! No heap allocation per request once the ring has warmed up: a request's iovecs are copied
//! into its slot's own buffer, which slots keep from request to request (they are reused
//! through a free list, never dropped), and operations and iovec lists travel inline
//! ([`Ops`], [`Iovs`]) for the common shapes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};

use super::iov;
use super::RingObserver;

/// Per-operation values of one request, inline like [`Ops`].
type PerOp<V> = smallvec::SmallVec<[V; 2]>;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How a request's operations ended: the first error, with the file offset it happened at.
pub type OpResult = Result<(), (io::Error, u64)>;

/// Finished requests, with their tags.
pub type Finished<T> = Vec<(T, OpResult)>;

/// The iovecs of one operation: up to 2 inline (a request of one or two guest segments over
/// one run: a guest's page I/O), on the heap beyond. Kept small because requests, their plans
/// and their flights are moved by value along the hot path, and every move copies it (4 inline
/// cost ~50 instructions a 4 KiB overwrite more, `scripts/instructions.sh`).
pub type Iovs = smallvec::SmallVec<[libc::iovec; 2]>;

/// The operations of one request: up to 2 inline (one run, or a run and its unit's fill).
pub type Ops = smallvec::SmallVec<[Op; 2]>;

/// One piece of a request: buffers and a file offset.
pub struct Op {
    pub iovs: Iovs,
    pub offset: u64,
    pub write: bool,
    pub dsync: bool,
}

/// Splits operations with more iovecs than one vectored call takes (Linux's IOV_MAX: the kernel
/// answers EINVAL, which must not abort the journal) into consecutive operations at iovec
/// boundaries. A guest may send up to `seg_max` segments (queue size − 2, so up to 32,766), each
/// its own iovec or more.
pub fn split_long(ops: Ops) -> Ops {
    if ops.iter().all(|op| op.iovs.len() <= iov::MAX_IOVS) {
        return ops;
    }
    let mut out = Ops::with_capacity(ops.len() + 1);
    for op in ops {
        if op.iovs.len() <= iov::MAX_IOVS {
            out.push(op);
            continue;
        }
        let mut offset = op.offset;
        for chunk in op.iovs.chunks(iov::MAX_IOVS) {
            let len: u64 = chunk.iter().map(|v| v.iov_len as u64).sum();
            out.push(Op {
                iovs: Iovs::from_slice(chunk),
                offset,
                write: op.write,
                dsync: op.dsync,
            });
            offset += len;
        }
    }
    out
}

/// What the reaping needs of one submitted operation.
struct Sub {
    /// Bytes it must transfer (a short transfer is an error).
    want: usize,
    offset: u64,
    write: bool,
    dsync: bool,
    /// The observer's token for a write (0 without an observer).
    token: u64,
}

/// One request in flight. Slots are reused through the ring's free list and never dropped, so
/// their buffers keep their capacity: after the first requests, starting one allocates nothing.
struct Slot<T> {
    remaining: usize,
    error: Option<(io::Error, u64)>,
    /// The iovecs of all the request's operations, one after another. The submission entries
    /// point into this buffer: it is filled before the first entry is pushed and not touched
    /// again until the slot is free, and its heap address does not change when `slots` grows.
    iovs: Vec<libc::iovec>,
    subs: Vec<Sub>,
    /// `Some` while the slot is in use.
    tag: Option<T>,
}

impl<T> Slot<T> {
    fn empty() -> Slot<T> {
        Slot {
            remaining: 0,
            error: None,
            iovs: Vec::new(),
            subs: Vec::new(),
            tag: None,
        }
    }
}

pub struct Ring<T> {
    ring: IoUring,
    efd: EventFd,
    fd: RawFd,
    slots: Vec<Slot<T>>,
    /// Indices of slots not in use.
    free: Vec<usize>,
    /// Completion entries being processed (kept for its capacity).
    cqes: Vec<(u64, i32)>,
    unsubmitted: usize,
    /// Operations pushed and not yet reaped: kept within the completion queue, so completions
    /// never overflow into the kernel's backlog (which posts no eventfd wake-up when drained).
    ops_in_flight: usize,
    /// Told of every write when it is pushed and when it is reaped (the crash tests' recording
    /// layer); `None` in production, which costs one check per operation.
    observer: Option<Arc<dyn RingObserver>>,
}

// SAFETY: the raw iovec pointers in `slots` point into buffers that the request owns until its
// completion (the caller keeps them alive with the tag: the engine's guest buffers); the ring is
// used by one thread at a time (the queue's mutex).
unsafe impl<T: Send> Send for Ring<T> {}

/// Submission queue entries per ring: a batch of a default-sized virtqueue (256 requests) fits
/// at one operation each; more are handed to the kernel as the queue fills.
const ENTRIES: u32 = 256;
/// The completion queue's size (the kernel makes it twice the submission queue's).
const CQ_ENTRIES: usize = 2 * ENTRIES as usize;
/// Failed rounds of making room in the submission queue before the ring is taken for unusable
/// and the rest of the request fails. A working ring makes room within a round or two (each
/// waits for a completion); the bound only keeps a broken ring from spinning the queue thread.
const MAX_SUBMIT_TRIES: usize = 100;

/// The submission opcodes a ring may carry: the engine submits vectored reads and writes only
/// (see [`Ring::entry`]). Whatever else a compromised process could push (opening files,
/// sockets, sending: operations io_uring runs without a system call seccomp could see) fails
/// with EACCES.
pub const ALLOWED_OPS: [(u8, &str); 2] = [
    (opcode::Readv::CODE, "IORING_OP_READV"),
    (opcode::Writev::CODE, "IORING_OP_WRITEV"),
];

/// A ring created disabled, its eventfd registered, then restricted to [`ALLOWED_OPS`] with no
/// submission flag and no `io_uring_register` operation at all (the eventfd, its only one, is
/// registered before the restrictions, which bind only once the ring is enabled), then enabled.
/// Restrictions can be set only once and only while the ring is disabled, so nobody can widen
/// them later. Done for every ring, sandboxed or not: it costs three system calls at setup.
fn restricted_ring(efd: RawFd) -> io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(ENTRIES)?;
    let submitter = ring.submitter();
    submitter.register_eventfd(efd)?;
    let mut restrictions: Vec<Restriction> = ALLOWED_OPS
        .iter()
        .map(|&(op, _)| Restriction::sqe_op(op))
        .collect();
    restrictions.push(Restriction::sqe_flags_allowed(0));
    submitter.register_restrictions(&mut restrictions)?;
    submitter.register_enable_rings()?;
    Ok(ring)
}

/// Says once per process that rings are unrestricted (every queue of every connection would
/// repeat it).
fn log_unrestricted(e: &io::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        log::warn!(
            "io_uring restrictions not available ({e}): rings run unrestricted (Linux 5.10 or \
             later restricts them to reads and writes)"
        )
    });
}

impl<T> Ring<T> {
    pub fn new(fd: RawFd) -> io::Result<Ring<T>> {
        Ring::observed(fd, None)
    }

    /// A ring whose writes are reported to `observer` (see [`RingObserver`]).
    pub fn observed(fd: RawFd, observer: Option<Arc<dyn RingObserver>>) -> io::Result<Ring<T>> {
        let efd = EventFd::new(EFD_NONBLOCK)?;
        let ring = match restricted_ring(efd.as_raw_fd()) {
            Ok(ring) => ring,
            Err(e) => {
                // Kernels before 5.10 know neither the disabled start nor restrictions: the
                // ring still works, only unrestricted (seccomp cannot see inside it either way).
                log_unrestricted(&e);
                let ring = IoUring::new(ENTRIES)?;
                ring.submitter().register_eventfd(efd.as_raw_fd())?;
                ring
            }
        };
        Ok(Ring {
            ring,
            efd,
            fd,
            slots: Vec::new(),
            free: Vec::new(),
            cqes: Vec::new(),
            unsubmitted: 0,
            ops_in_flight: 0,
            observer,
        })
    }

    pub fn event_fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    /// Tells the observer of a write about to be submitted; its token (0 without an observer,
    /// or for a read).
    fn observe_submitted(&self, op: &Op) -> u64 {
        let Some(obs) = &self.observer else {
            return 0;
        };
        if !op.write {
            return 0;
        }
        let bufs: Vec<&[u8]> = op
            .iovs
            .iter()
            .filter(|v| v.iov_len > 0)
            // SAFETY: the iovecs describe live buffers the request owns (see `start`).
            .map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
            .collect();
        obs.write_submitted(op.offset, &bufs)
    }

    /// The submission entry of operation `sub` of slot `idx`, whose iovecs are
    /// `iovs[first..first + n]` of that slot.
    fn entry(&self, idx: usize, sub: usize, first: usize, n: usize) -> io_uring::squeue::Entry {
        let slot = &self.slots[idx];
        let s = &slot.subs[sub];
        let ptr = slot.iovs[first..first + n].as_ptr();
        let ud = ((idx as u64) << 32) | sub as u64;
        if s.write {
            let flags = if s.dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Writev::new(types::Fd(self.fd), ptr, n as u32)
                .offset(s.offset)
                .rw_flags(flags)
                .build()
                .user_data(ud)
        } else {
            opcode::Readv::new(types::Fd(self.fd), ptr, n as u32)
                .offset(s.offset)
                .build()
                .user_data(ud)
        }
    }

    /// Starts the operations of one request; `tag` comes back in `done` (from this call or a
    /// later [`Ring::reap_into`]) when they all finished, with the first error. The buffers `ops`
    /// describe must stay alive, and untouched by anyone else, until then: the caller keeps them
    /// in `tag`.
    pub fn start(&mut self, ops: Ops, tag: T, done: &mut Finished<T>) {
        let ops = split_long(ops);
        if ops.is_empty() {
            done.push((tag, Ok(())));
            return;
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::empty());
                self.slots.len() - 1
            }
        };
        let n = ops.len();
        // Before any entry is pushed: the ring may hand entries to the kernel below (a full
        // submission queue), and the observer must have logged a write before it can start.
        let tokens: PerOp<u64> = ops.iter().map(|op| self.observe_submitted(op)).collect();
        {
            let slot = &mut self.slots[idx];
            slot.remaining = n;
            slot.error = None;
            slot.tag = Some(tag);
            slot.iovs.clear();
            slot.subs.clear();
            for (op, token) in ops.iter().zip(tokens) {
                slot.iovs.extend_from_slice(&op.iovs);
                slot.subs.push(Sub {
                    want: op.iovs.iter().map(|v| v.iov_len).sum(),
                    offset: op.offset,
                    write: op.write,
                    dsync: op.dsync,
                    token,
                });
            }
        }
        let mut first = 0;
        for (pushed, op) in ops.iter().enumerate() {
            let entry = self.entry(idx, pushed, first, op.iovs.len());
            first += op.iovs.len();
            let mut tries = 0;
            loop {
                let room = self.ops_in_flight < CQ_ENTRIES;
                // SAFETY: the iovecs live in the slot's buffer, untouched until this entry's
                // completion is reaped, and point into buffers the request keeps alive in its
                // tag until then.
                if room && unsafe { self.ring.submission().push(&entry) }.is_ok() {
                    self.unsubmitted += 1;
                    self.ops_in_flight += 1;
                    break;
                }
                // Submission queue full, or as many operations in flight as the completion
                // queue holds: hand them to the kernel; if that fails, wait for one completion
                // to make room.
                self.unsubmitted = 0;
                let r = match self.ring.submit() {
                    Ok(0) | Err(_) => self.ring.submit_and_wait(1),
                    ok => ok,
                };
                self.reap_cqes(done);
                tries += 1;
                if let Err(e) = r {
                    if tries > MAX_SUBMIT_TRIES {
                        // The ring is unusable: fail what was not submitted.
                        log::error!("io_uring submission failed: {e}");
                        let slot = &mut self.slots[idx];
                        slot.remaining -= n - pushed;
                        slot.error.get_or_insert((e, 0));
                        if slot.remaining == 0 {
                            self.release(idx, done);
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Frees slot `idx`, whose operations have all ended, and hands its request back.
    fn release(&mut self, idx: usize, done: &mut Finished<T>) {
        let slot = &mut self.slots[idx];
        if let Some(tag) = slot.tag.take() {
            done.push((tag, slot.error.take().map_or(Ok(()), Err)));
            self.free.push(idx);
        }
    }

    /// Hands queued operations to the kernel (once per batch of requests).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Collects finished requests into `done` (which the caller keeps, for its capacity).
    pub fn reap_into(&mut self, done: &mut Finished<T>) {
        let _ = self.efd.read();
        self.reap_cqes(done);
    }

    fn reap_cqes(&mut self, done: &mut Finished<T>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        if self.ring.submission().cq_overflow() {
            // Defensive: entering the kernel flushes a backlog into the completion queue.
            let _ = self.ring.submit();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        }
        self.ops_in_flight -= cqes.len().min(self.ops_in_flight);
        for &(ud, res) in &cqes {
            let idx = (ud >> 32) as usize;
            let sub = (ud & 0xFFFF_FFFF) as usize;
            let Some(slot) = self.slots.get_mut(idx).filter(|s| s.tag.is_some()) else {
                continue;
            };
            let Some(op) = slot.subs.get(sub) else {
                continue;
            };
            let want = op.want;
            let err = if res < 0 {
                Some(io::Error::from_raw_os_error(-res))
            } else if res as usize != want {
                // Regular files and block devices do not return short transfers except past
                // their end: treat it as the I/O error it is.
                Some(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {want} bytes"),
                ))
            } else {
                None
            };
            if let (Some(obs), true) = (&self.observer, op.write) {
                obs.write_completed(op.token, err.is_none(), op.dsync);
            }
            if let Some(e) = err {
                if slot.error.is_none() {
                    slot.error = Some((e, op.offset));
                }
            }
            slot.remaining -= 1;
            if slot.remaining == 0 {
                self.release(idx, done);
            }
        }
        self.cqes = cqes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The restriction is what keeps a compromised daemon from opening files through the ring
    /// (seccomp sees no io_uring operation): an opcode outside [`ALLOWED_OPS`] must fail, and
    /// so must a register operation after the ring is enabled.
    #[test]
    fn a_restricted_ring_refuses_other_opcodes_and_registrations() {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut ring = restricted_ring(efd.as_raw_fd()).unwrap();
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(7);
        // SAFETY: the path is a static C string, alive for as long as the operation.
        unsafe { ring.submission().push(&open) }.unwrap();
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        assert_eq!(cqe.user_data(), 7);
        assert_eq!(cqe.result(), -libc::EACCES, "OPENAT went through the ring");
        let e = ring
            .submitter()
            .register_eventfd(efd.as_raw_fd())
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        // The allowed operations still work.
        let path = std::env::temp_dir().join(format!("extblk-ring-rst-{}", std::process::id()));
        std::fs::write(&path, b"abcd").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut r: Ring<u32> = Ring::new(file.as_raw_fd()).unwrap();
        let mut buf = [0u8; 4];
        let mut done = Vec::new();
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        r.start(
            smallvec::smallvec![Op {
                iovs: smallvec::smallvec![iov],
                offset: 0,
                write: false,
                dsync: false,
            }],
            1,
            &mut done,
        );
        r.submit().unwrap();
        while done.is_empty() {
            r.ring.submit_and_wait(1).unwrap();
            r.reap_into(&mut done);
        }
        assert!(done[0].1.is_ok());
        assert_eq!(&buf, b"abcd");
    }

    /// Logs what the ring reports: `(token, offset, bytes)` at submission, `token` when reaped.
    #[derive(Default)]
    struct Log {
        submitted: Mutex<Vec<(u64, u64, Vec<u8>)>>,
        completed: Mutex<Vec<(u64, bool, bool)>>,
    }

    impl RingObserver for Log {
        fn write_submitted(&self, offset: u64, bufs: &[&[u8]]) -> u64 {
            let mut s = self.submitted.lock().unwrap();
            let token = 100 + s.len() as u64;
            s.push((token, offset, bufs.concat()));
            token
        }
        fn write_completed(&self, token: u64, ok: bool, durable: bool) {
            self.completed.lock().unwrap().push((token, ok, durable));
        }
    }

    #[test]
    fn an_observed_ring_reports_each_write_at_push_and_at_reap() {
        let path = std::env::temp_dir().join(format!("extblk-ring-obs-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let log = Arc::new(Log::default());
        let mut ring: Ring<u32> = Ring::observed(file.as_raw_fd(), Some(log.clone())).unwrap();
        let (mut a, mut b) = (vec![1u8; 512], vec![2u8; 1024]);
        let mut back = vec![0u8; 1536];
        let iov = |v: &mut Vec<u8>| libc::iovec {
            iov_base: v.as_mut_ptr().cast(),
            iov_len: v.len(),
        };
        let mut done = Vec::new();
        ring.start(
            smallvec::smallvec![Op {
                iovs: smallvec::smallvec![iov(&mut a), iov(&mut b)],
                offset: 4096,
                write: true,
                dsync: true,
            }],
            7,
            &mut done,
        );
        // Logged when pushed, before the kernel saw it; nothing completed yet.
        assert_eq!(log.submitted.lock().unwrap().len(), 1);
        assert!(log.completed.lock().unwrap().is_empty());
        ring.submit().unwrap();
        while done.is_empty() {
            ring.reap_into(&mut done);
        }
        assert!(matches!(done[0], (7, Ok(()))));
        // Reads are not reported.
        ring.start(
            smallvec::smallvec![Op {
                iovs: smallvec::smallvec![iov(&mut back)],
                offset: 4096,
                write: false,
                dsync: false,
            }],
            8,
            &mut done,
        );
        ring.submit().unwrap();
        while done.len() < 2 {
            ring.reap_into(&mut done);
        }
        let mut want = vec![1u8; 512];
        want.extend([2u8; 1024]);
        assert_eq!(back, want);
        assert_eq!(*log.submitted.lock().unwrap(), [(100, 4096, want)]);
        assert_eq!(*log.completed.lock().unwrap(), [(100, true, true)]);
    }

    #[test]
    fn long_operations_split_at_iov_max() {
        let mut page = vec![0u8; 4096];
        let iovs: Vec<libc::iovec> = (0..2500)
            .map(|_| libc::iovec {
                iov_base: page.as_mut_ptr().cast(),
                iov_len: 4096,
            })
            .collect();
        let ops = split_long(smallvec::smallvec![Op {
            iovs: Iovs::from_vec(iovs),
            offset: 8192,
            write: true,
            dsync: true,
        }]);
        let lens: Vec<usize> = ops.iter().map(|o| o.iovs.len()).collect();
        assert_eq!(
            lens,
            [iov::MAX_IOVS, iov::MAX_IOVS, 2500 - 2 * iov::MAX_IOVS]
        );
        let offsets: Vec<u64> = ops.iter().map(|o| o.offset).collect();
        let step = (iov::MAX_IOVS * 4096) as u64;
        assert_eq!(offsets, [8192, 8192 + step, 8192 + 2 * step]);
        assert!(ops.iter().all(|o| o.write && o.dsync));
    }
}
