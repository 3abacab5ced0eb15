//! A queue thread's side of the image engine: reads and pure overwrites planned from the
//! queue's cache of written extents and run on its io_uring, completed on that thread;
//! allocating writes started here (`alloc_write`).
//!
//! Invariants: the cache holds only written extents and is dropped whenever `unmap_seq` moves
//! (a written mapping was removed or made unwritten). A read or overwrite enters the fence
//! with a plan still valid (`plan_fenced` looks up again if a discard raced it) and holds the
//! guard until its I/O has ended. A queue thread never waits for the committer or the worker:
//! the mapping lock is its only lock, taken for one lookup on a cache miss.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::alloc_write::{AllocatedDone, PendingWrite};
use super::commit::Waiter;
use super::layout::alloc_ops;
use super::worker::{MetaOp, Work};
use super::{lock, HotPath, Shared, BS};
use crate::engine::fence::FenceGuard;
use crate::engine::{Completion, EngineError, EngineOp, EngineQueue, GuestBuffers};
use crate::ext4::extent::Extent;
use crate::io::backing::DIRECT_ALIGN;
use crate::io::iov;
use crate::io::uring::{self, Ring};
use crate::mapping::tree::Lookup;

/// Written extents a queue remembers. A linear scan of 64 is cheaper than the mapping lock and
/// covers a guest's working set of hot ranges; an image filled in allocation units has few
/// large extents, so misses are rare either way.
const CACHE_EXTENTS: usize = 64;

/// A queue thread's side: its cache of written extents and its io_uring.
pub struct ImageQueue<C> {
    shared: Arc<Shared>,
    cache: Vec<Extent>,
    cache_seq: u64,
    ring: Option<Ring<Flight<C>>>,
    /// Finished requests being completed (kept for its capacity: no allocation per request).
    finished: uring::Finished<Flight<C>>,
}

/// A request whose data I/O is on the ring.
pub(super) enum Flight<C> {
    Read {
        done: C,
        _bufs: GuestBuffers,
        guard: FenceGuard,
    },
    Overwrite {
        done: C,
        _bufs: GuestBuffers,
        guard: FenceGuard,
        fua: bool,
    },
    Alloc {
        rest: AllocatedDone,
        _bufs: GuestBuffers,
    },
}

/// Where a request's bytes go: the written runs (as operations) and the ranges that read as zero.
pub(super) struct Plan {
    ops: uring::Ops,
    zero: smallvec::SmallVec<[(u64, u64); 2]>,
}

impl<C: Completion> ImageQueue<C> {
    pub(super) fn new(shared: Arc<Shared>) -> Result<ImageQueue<C>, EngineError> {
        let ring = match shared.io.raw_fd() {
            // A recording backing observes its ring (the crash tests); others return None.
            Some(fd) => Some(Ring::observed(fd, shared.io.ring_observer())?),
            None => None,
        };
        Ok(ImageQueue {
            shared,
            cache: Vec::new(),
            cache_seq: 0,
            ring,
            finished: Vec::new(),
        })
    }

    /// The written extent covering `lblk` from the cache, or from the tree under the lock.
    pub(super) fn written_at(&mut self, lblk: u64) -> Result<Extent, Lookup> {
        let seq = self.shared.unmap_seq.load(Ordering::Acquire);
        if seq != self.cache_seq {
            self.cache.clear();
            self.cache_seq = seq;
        }
        if let Some(e) = self
            .cache
            .iter()
            .find(|e| u64::from(e.lblk) <= lblk && lblk < e.end())
            .filter(|_| self.shared.hot_path != HotPath::LockedLookup)
        {
            return Ok(*e);
        }
        let found = lock(&self.shared.state).image.lookup(lblk as u32);
        match found {
            Lookup::Mapped(e) if !e.unwritten => {
                if self.cache.len() >= CACHE_EXTENTS {
                    self.cache.remove(0);
                }
                self.cache.push(e);
                Ok(e)
            }
            other => Err(other),
        }
    }

    /// Maps a request. For a write, `None` if some block is not written (the allocating path).
    pub(super) fn plan(
        &mut self,
        offset: u64,
        bufs: &GuestBuffers,
        write: bool,
        fua: bool,
    ) -> Option<Plan> {
        let end = offset + bufs.len() as u64;
        let mut plan = Plan {
            ops: uring::Ops::new(),
            zero: smallvec::SmallVec::new(),
        };
        let mut pos = offset;
        while pos < end {
            let lblk = pos / BS;
            let (run_end, pblk) = match self.written_at(lblk) {
                Ok(e) => (e.end() * BS, Some(e.pblk + (lblk - u64::from(e.lblk)))),
                Err(_) if write => return None,
                Err(Lookup::Mapped(e)) => (e.end() * BS, None),
                Err(Lookup::Hole { len }) => ((lblk + len) * BS, None),
            };
            let n = run_end.min(end) - pos;
            match pblk {
                Some(p) => plan.ops.push(uring::Op {
                    iovs: iov::slice(bufs.iovecs(), (pos - offset) as usize, n as usize),
                    offset: p * BS + pos % BS,
                    write,
                    dsync: fua,
                }),
                None => plan.zero.push((pos - offset, n)),
            }
            pos += n;
        }
        Some(plan)
    }

    /// Plans a read or an overwrite and enters the fence with a mapping still valid: if a
    /// discard unmapped written blocks between the lookup and the fence, look up again.
    pub(super) fn plan_fenced(
        &mut self,
        offset: u64,
        bufs: &GuestBuffers,
        write: bool,
        fua: bool,
    ) -> Option<(Plan, FenceGuard)> {
        loop {
            let seq = self.shared.unmap_seq.load(Ordering::Acquire);
            let plan = self.plan(offset, bufs, write, fua)?;
            let guard = self.shared.fence.enter();
            if self.shared.unmap_seq.load(Ordering::Acquire) == seq {
                return Some((plan, guard));
            }
        }
    }

    pub(super) fn finish(&mut self, f: Flight<C>, r: Result<(), (io::Error, u64)>) {
        let sh = self.shared.clone();
        match f {
            Flight::Read { done, guard, .. } => {
                drop(guard);
                if r.is_ok() {
                    sh.stats.fast_reads.fetch_add(1, Ordering::Relaxed);
                }
                sh.complete_fast(done, r.map_err(|(e, _)| EngineError::Io(e)));
            }
            Flight::Overwrite {
                done, guard, fua, ..
            } => {
                drop(guard);
                if let Err((e, at)) = &r {
                    if e.raw_os_error() != Some(libc::ENOSPC) {
                        let mut st = lock(&sh.state);
                        sh.abort(&mut st, e, at / BS);
                    }
                } else {
                    sh.stats.fast_overwrites.fetch_add(1, Ordering::Relaxed);
                    if fua
                        && !broken!(FuaBeforeCommit)
                        && sh.meta_seq.load(Ordering::Acquire)
                            != sh.durable_seq.load(Ordering::Acquire)
                    {
                        // The data is durable, its mapping perhaps not yet: complete after the
                        // next commit.
                        sh.stats.fua_commits.fetch_add(1, Ordering::Relaxed);
                        sh.to_committer(Waiter::Done(Box::new(done)));
                        return;
                    }
                    if sh.restart.is_some()
                        && sh.log_written.load(Ordering::Acquire)
                            < sh.log_made.load(Ordering::Acquire)
                    {
                        // The overwrite may rely on a conversion whose record is not in the
                        // restart log yet (the worker appends it after releasing the mapping
                        // lock): the worker completes it, after appending.
                        sh.send(Work::Complete {
                            done: Box::new(done),
                            result: Ok(()),
                        });
                        return;
                    }
                }
                sh.complete_fast(done, r.map_err(|(e, _)| EngineError::Io(e)));
            }
            Flight::Alloc { rest, .. } => sh.end_alloc(rest, r),
        }
    }

    pub(super) fn start(&mut self, ops: uring::Ops, f: Flight<C>) {
        // Taken, not borrowed: finishing a request may start another (a deferred write redone).
        let mut finished = std::mem::take(&mut self.finished);
        // With O_DIRECT, only aligned requests may go to the ring; the rest use the page cache.
        let direct_ok = !self.shared.io.direct_io()
            || ops
                .iter()
                .all(|op| iov::aligned(&op.iovs, op.offset, DIRECT_ALIGN));
        match self.ring.as_mut().filter(|_| direct_ok) {
            Some(ring) => ring.start(ops, f, &mut finished),
            None => {
                // Positioned I/O through the backing's trait (recording, fault injection).
                let mut r = Ok(());
                for op in &ops {
                    let res = if op.write {
                        self.shared.io.writev_at(&op.iovs, op.offset, op.dsync)
                    } else {
                        self.shared.io.readv_at(&op.iovs, op.offset)
                    };
                    if let Err(e) = res {
                        r = Err((e, op.offset));
                        break;
                    }
                }
                finished.push((f, r));
            }
        }
        for (f, r) in finished.drain(..) {
            self.finish(f, r);
        }
        self.finished = finished;
    }
}

impl<C: Completion> EngineQueue<C> for ImageQueue<C> {
    fn submit(&mut self, op: EngineOp, done: C) {
        let sh = self.shared.clone();
        match op {
            EngineOp::Read { offset, bufs } => {
                let Some((plan, guard)) = self.plan_fenced(offset.0, &bufs, false, false) else {
                    return done.complete(Err(EngineError::Unsupported(
                        "unreachable: reads always plan",
                    )));
                };
                for (o, n) in &plan.zero {
                    iov::zero(&iov::slice(bufs.iovecs(), *o as usize, *n as usize));
                }
                self.start(
                    plan.ops,
                    Flight::Read {
                        done,
                        _bufs: bufs,
                        guard,
                    },
                );
            }
            EngineOp::Write { offset, bufs, fua } => {
                if let Err(e) = sh.writable() {
                    return done.complete(Err(e));
                }
                match self.plan_fenced(offset.0, &bufs, true, fua) {
                    Some((plan, guard)) => self.start(
                        plan.ops,
                        Flight::Overwrite {
                            done,
                            _bufs: bufs,
                            guard,
                            fua,
                        },
                    ),
                    None => {
                        let w = PendingWrite {
                            offset: offset.0,
                            bufs,
                            fua,
                            done: Box::new(done),
                            ahead: false,
                        };
                        let Some(a) = sh.begin_alloc(w) else { return };
                        let ops = alloc_ops(&a);
                        let (rest, bufs) = a.into_done();
                        self.start(ops, Flight::Alloc { rest, _bufs: bufs });
                    }
                }
            }
            EngineOp::Flush => sh.send(Work::Flush {
                done: Box::new(done),
            }),
            EngineOp::Discard { ranges, fua } => sh.send(Work::Meta(MetaOp::Zero {
                ranges,
                discard: true,
                fua,
                done: Box::new(done),
            })),
            EngineOp::WriteZeroes { ranges, fua } => sh.send(Work::Meta(MetaOp::Zero {
                ranges,
                discard: false,
                fua,
                done: Box::new(done),
            })),
        }
    }

    fn submit_batch(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            if let Err(e) = ring.submit() {
                log::error!("io_uring submit failed: {e}");
            }
        }
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.ring.as_ref().map(Ring::event_fd)
    }

    fn process_completions(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut finished = std::mem::take(&mut self.finished);
        ring.reap_into(&mut finished);
        for (f, r) in finished.drain(..) {
            self.finish(f, r);
        }
        self.finished = finished;
    }
}

impl Shared {
    /// Completes a read or pure overwrite: here, on the queue thread, unless the seed's
    /// experiment sends it through the worker.
    pub(super) fn complete_fast<C: Completion>(&self, done: C, result: Result<(), EngineError>) {
        if self.hot_path == HotPath::WorkerCompletion {
            self.send(Work::Complete {
                done: Box::new(done),
                result,
            });
        } else {
            done.complete(result);
        }
    }
}
