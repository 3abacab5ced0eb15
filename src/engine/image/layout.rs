//! Where an allocating write's bytes go: the guest's iovecs sliced over the request's runs,
//! zero padding of partial new blocks, and the zero fill of the rest of the allocation unit,
//! joined into as few host writes as the disk layout allows. Pure functions over static zero
//! buffers; no lock.

use super::alloc_write::{Allocated, PendingWrite};
use super::{BS, MAX_ALLOC_UNIT};
use crate::ext4::extent::Extent;
use crate::io::{iov, uring};

/// A zero block aligned for any direct I/O, for padding partial new blocks.
#[repr(C, align(4096))]
pub(super) struct ZeroPage(pub(super) [u8; 4096]);
pub(super) static ZERO_PAGE: ZeroPage = ZeroPage([0; 4096]);

/// Zeroes for filling a whole allocation unit in one write (never written to, so the kernel
/// backs it with its shared zero page until read).
#[repr(C, align(4096))]
pub(super) struct ZeroUnit([u8; (MAX_ALLOC_UNIT * BS) as usize]);
pub(super) static ZERO_UNIT: ZeroUnit = ZeroUnit([0; (MAX_ALLOC_UNIT * BS) as usize]);

/// The data writes of an allocating request, with the zero fill of its unit: a piece that
/// starts where another ends on disk joins it, so a request and its fill are one host write
/// (one allocation in a sparse backing).
pub(super) fn alloc_ops(a: &Allocated) -> uring::Ops {
    let mut ops = run_ops(&a.runs, &a.w);
    if a.fill.is_empty() {
        return ops;
    }
    for e in &a.fill {
        let mut left = u64::from(e.len) * BS;
        let mut at = e.pblk * BS;
        while left > 0 {
            let n = left.min(MAX_ALLOC_UNIT * BS);
            ops.push(uring::Op {
                iovs: smallvec::smallvec![libc::iovec {
                    iov_base: ZERO_UNIT.0.as_ptr() as *mut _,
                    iov_len: n as usize,
                }],
                offset: at,
                write: true,
                dsync: false,
            });
            at += n;
            left -= n;
        }
    }
    ops.sort_by_key(|op| op.offset);
    let mut out = uring::Ops::with_capacity(ops.len());
    for op in ops {
        if let Some(last) = out.last_mut() {
            let last_end = last.offset + last.iovs.iter().map(|v| v.iov_len as u64).sum::<u64>();
            if last_end == op.offset
                && last.dsync == op.dsync
                && last.iovs.len() + op.iovs.len() <= iov::MAX_IOVS
            {
                last.iovs.extend(op.iovs);
                continue;
            }
        }
        out.push(op);
    }
    out
}

/// The data writes of a request over its mapped runs. Unwritten (new) blocks get zero padding
/// around a partial write, so the rest of the block reads as zero once converted; written
/// blocks take just the guest's bytes (durable at once with FUA).
pub(super) fn run_ops(runs: &[Extent], w: &PendingWrite) -> uring::Ops {
    let (start, end) = (w.offset, w.offset + w.bufs.len() as u64);
    let mut ops = uring::Ops::with_capacity(runs.len());
    for e in runs {
        let (rs, re) = (u64::from(e.lblk) * BS, e.end() * BS);
        let (s, t) = (start.max(rs), end.min(re));
        if s >= t {
            continue;
        }
        let mut iovs = iov::slice(w.bufs.iovecs(), (s - start) as usize, (t - s) as usize);
        let mut at = e.pblk * BS + (s - rs);
        if e.unwritten {
            let head = s % BS;
            let tail = (BS - t % BS) % BS;
            if head > 0 {
                iovs.insert(
                    0,
                    libc::iovec {
                        iov_base: ZERO_PAGE.0.as_ptr() as *mut _,
                        iov_len: head as usize,
                    },
                );
                at -= head;
            }
            if tail > 0 {
                iovs.push(libc::iovec {
                    iov_base: ZERO_PAGE.0.as_ptr() as *mut _,
                    iov_len: tail as usize,
                });
            }
        }
        ops.push(uring::Op {
            iovs,
            offset: at,
            write: true,
            dsync: w.fua && !e.unwritten,
        });
    }
    ops
}
