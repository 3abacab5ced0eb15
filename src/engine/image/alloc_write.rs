//! The allocating write, ext4's iomap writeback path: under the mapping lock, allocate every
//! hole of the request's allocation unit as unwritten extents and mark its blocks in progress
//! (`range_lock`); write the data outside the lock; then hand the conversion of exactly those
//! blocks to the worker.
//!
//! Invariants: the write holds a fence guard from its allocation until its data I/O has ended,
//! so blocks a later discard frees cannot be reused under it; it never waits for a commit — a
//! write that needs one (the log throttle, space only a commit frees) parks in
//! `Locked::parked` and its thread goes on (see `commit` and `fence.rs`); writes already
//! parked go first, which bounds every write's wait (architecture.md, "The space rule").

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::commit::{Parked, Waiter};
use super::layout::alloc_ops;
use super::range_lock::{blocks_of, Run};
use super::unit_pace::FirstWrite;
use super::worker::{MetaOp, Work};
use super::{lock, to_engine, Done, Locked, Shared, BS};
use crate::engine::fence::FenceGuard;
use crate::engine::{EngineError, GuestBuffers};
use crate::ext4::extent::Extent;
use crate::image::ImageError;

pub(super) struct PendingWrite {
    pub(super) offset: u64,
    pub(super) bufs: GuestBuffers,
    pub(super) fua: bool,
    /// Was at the head of the parked queue when it was deferred: it goes back to the head.
    pub(super) ahead: bool,
    pub(super) done: Done,
}

/// What [`Shared::alloc_locked`] decided for an allocating write.
pub(super) enum Step {
    /// Allocated: write the data.
    Go(Allocated),
    /// Deferred behind a write initialising some of its blocks; redone after that one.
    Later,
    /// Must wait for a commit: queue it in `Locked::parked`.
    Park(PendingWrite),
    /// Fails with this error.
    Fail(PendingWrite, EngineError),
}

/// An allocating write between allocation and data I/O.
pub(super) struct Allocated {
    pub(super) w: PendingWrite,
    pub(super) runs: Vec<Extent>,
    /// New blocks around the request, to fill with zeroes.
    pub(super) fill: Vec<Extent>,
    pub(super) to_convert: Vec<Run>,
    /// Keeps the blocks from reuse until the data I/O has ended.
    pub(super) guard: FenceGuard,
}

impl Allocated {
    /// Splits off what the end of the write needs; the buffers must outlive its data I/O.
    pub(super) fn into_done(self) -> (AllocatedDone, GuestBuffers) {
        let Allocated {
            w,
            to_convert,
            guard,
            ..
        } = self;
        (
            AllocatedDone {
                to_convert,
                fua: w.fua,
                done: w.done,
                guard,
            },
            w.bufs,
        )
    }
}

/// What remains of an allocating write once its data I/O is under way.
pub(super) struct AllocatedDone {
    pub(super) to_convert: Vec<Run>,
    pub(super) fua: bool,
    pub(super) done: Done,
    pub(super) guard: FenceGuard,
}

impl Shared {
    /// The first half of an allocating write: under the mapping lock, allocate every hole of
    /// the request (and of its allocation unit) as unwritten extents and mark the blocks in
    /// progress. Returns the allocation, holding a fence guard, ready for its data I/O; or
    /// `None` when the request was deferred (it touches blocks another write is initialising),
    /// parked until a commit, or already failed. Never waits for a commit (see fence.rs).
    pub(super) fn begin_alloc(self: &Arc<Self>, w: PendingWrite) -> Option<Allocated> {
        if let Err(e) = self.writable() {
            w.done.finish(Err(e));
            return None;
        }
        let mut st = lock(&self.state);
        if broken!(ThrottleHoldsFence) {
            // Deliberately wrong (tests only): the old throttle, waiting for a commit on this
            // thread while guards of its own unsubmitted I/O hold the committer up.
            while st.image.log_nearly_full() && !self.aborted.load(Ordering::Acquire) {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                self.to_committer(Waiter::Nudge);
                st = self.committed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        // Writes already waiting for a commit go first: a later write must not take the space
        // (or the log room) they wait for. This is what bounds a write's wait (architecture.md,
        // "The space rule").
        let step = if st.parked.is_empty() || w.ahead {
            self.alloc_locked(&mut st, w)
        } else {
            Step::Park(w)
        };
        match step {
            Step::Go(a) => Some(a),
            Step::Later => None,
            Step::Park(w) => {
                if w.ahead {
                    st.parked.push_front(Parked::Write(w));
                } else {
                    st.parked.push_back(Parked::Write(w));
                }
                drop(st);
                self.to_committer(Waiter::Nudge);
                None
            }
            Step::Fail(w, e) => {
                drop(st);
                w.done.finish(Err(e));
                None
            }
        }
    }

    /// The allocation itself, under the mapping lock.
    pub(super) fn alloc_locked(&self, st: &mut Locked, w: PendingWrite) -> Step {
        if let Err(e) = self.writable() {
            return Step::Fail(w, e);
        }
        // The running transaction has reached half the log: it must not grow until a commit
        // has made room (jbd2's start_this_handle), or it could outgrow the log and abort.
        if st.image.log_nearly_full() {
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            return Step::Park(w);
        }
        let (b0, b1) = blocks_of(w.offset, w.bufs.len() as u64);
        if st.range.busy(b0, b1) {
            self.stats.deferred_writes.fetch_add(1, Ordering::Relaxed);
            st.range.defer(w);
            return Step::Later;
        }
        // Entered under the lock, with the allocation: a discard of these blocks that follows
        // cannot let them be reused before this write's data has landed.
        let guard = self.fence.enter();
        // The holes of the whole allocation unit around the request, if there is room for them.
        let unit = self.alloc_unit;
        let (c0, c1) = (b0 / unit * unit, b1.div_ceil(unit) * unit);
        let c1 = c1.min(st.image.disk_blocks()).max(b1);
        let mut alloc = st.image.allocate(c0, c1 - c0);
        if matches!(alloc, Err(ImageError::NoSpace)) && (c0, c1) != (b0, b1) {
            alloc = st.image.allocate(b0, b1 - b0);
        }
        let new = match alloc {
            Ok(new) => new,
            Err(ImageError::NoSpace) if st.image.space_pending() => {
                // Blocks freed by the running or committing transaction become free once it
                // commits: wait for that, however many commits it takes.
                self.stats.space_waits.fetch_add(1, Ordering::Relaxed);
                return Step::Park(w);
            }
            Err(ImageError::NoSpace) => {
                self.stats.enospc.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "no free block for a write at byte {} although nothing is waiting to be freed",
                    w.offset
                );
                return Step::Fail(w, EngineError::NoSpace);
            }
            Err(e) => return Step::Fail(w, to_engine(e)),
        };
        self.stats.journal_handles.fetch_add(1, Ordering::Relaxed);
        self.stats.allocating_writes.fetch_add(1, Ordering::Relaxed);
        if broken!(ConvertBeforeWrite) {
            // Deliberately wrong (tests only): written, and committed, before the data exists.
            let _ = st.image.convert(b0, b1 - b0);
            let _ = st.image.commit();
        }
        let runs: Vec<Extent> = st.image.tree().range(b0 as u32, b1 as u32);
        let mut to_convert = Vec::new();
        for e in runs.iter().filter(|e| e.unwritten) {
            to_convert.push((u64::from(e.lblk), u64::from(e.len), e.pblk));
        }
        // The rest of the unit: its unwritten blocks outside the request (but those another
        // write is filling: left to it). Where the backing reads them as zeroes already
        // (holes of a sparse image file: never written, or punched when freed), they can be
        // converted with the request's blocks without writing anything; or zero-filled, one
        // host allocation for all of them, by the unit's first write (or, a probe unit of
        // `unit_pace`, its second). `unit_pace` decides, by how fast units fill up. Blocks
        // whose old bytes are still there (freed without a punch) are left unwritten by a
        // first write (it costs its own bytes only) and zero-filled in the same host write by
        // a later one, unless units are filling up: then the first write zero-fills them too.
        // A block found zero stays zero until written: a free block is never written, and a
        // freed one is punched before it is free again (`commit`).
        let unit_was_holes = new.iter().map(|e| u64::from(e.len)).sum::<u64>() == c1 - c0;
        let unit_runs = st.image.tree().range(c0 as u32, c1 as u32);
        let rest = unit_fill(&unit_runs, [(c0, b0), (b1, c1)], |b| {
            st.range.busy(b, b + 1)
        });
        let now = std::time::Instant::now();
        let holes = |rest: Vec<Extent>| -> (Vec<Extent>, Vec<Extent>) {
            rest.into_iter().partition(|e| {
                // Deliberately wrong (tests only): stale bytes taken for zeroes.
                broken!(ZeroWithoutHole) || self.io.reads_zero(e.pblk * BS, u64::from(e.len) * BS)
            })
        };
        let (fill, zero) = if unit_was_holes {
            match st.pace.first_write(c0 / unit, now) {
                FirstWrite::ZeroFill => (rest, Vec::new()),
                first => {
                    let (zero, left) = match first {
                        FirstWrite::ConvertHoles => holes(rest),
                        _ => (Vec::new(), rest),
                    };
                    let left: u64 = left.iter().map(|e| u64::from(e.len)).sum();
                    self.stats
                        .unit_blocks_left_unwritten
                        .fetch_add(left, Ordering::Relaxed);
                    (Vec::new(), zero)
                }
            }
        } else if st.pace.later_write(c0 / unit, now) {
            (rest, Vec::new())
        } else {
            let (zero, fill) = holes(rest);
            (fill, zero)
        };
        to_convert.extend(
            fill.iter()
                .chain(&zero)
                .map(|x| (u64::from(x.lblk), u64::from(x.len), x.pblk)),
        );
        st.range.mark(&to_convert);
        self.meta_seq.fetch_add(1, Ordering::AcqRel);
        let filled: u64 = fill.iter().map(|e| u64::from(e.len)).sum();
        self.stats
            .zero_filled_blocks
            .fetch_add(filled, Ordering::Relaxed);
        let found_zero: u64 = zero.iter().map(|e| u64::from(e.len)).sum();
        self.stats
            .unit_blocks_found_zero
            .fetch_add(found_zero, Ordering::Relaxed);
        Step::Go(Allocated {
            w,
            runs,
            fill,
            to_convert,
            guard,
        })
    }

    /// The second half, once the data is on disk (or failed): hand the conversion to the worker,
    /// or undo and report.
    pub(super) fn end_alloc(
        self: &Arc<Self>,
        a: AllocatedDone,
        result: Result<(), (io::Error, u64)>,
    ) {
        drop(a.guard);
        match result {
            Ok(()) => self.send(Work::Meta(MetaOp::Convert {
                runs: a.to_convert,
                fua: a.fua,
                done: a.done,
            })),
            Err((e, at)) => {
                let pblk = at / BS;
                let mut st = lock(&self.state);
                st.range.unmark(&a.to_convert);
                let enospc = e.raw_os_error() == Some(libc::ENOSPC);
                if enospc {
                    // The host filesystem under a sparse image is full: fail this request only.
                    self.stats.enospc.fetch_add(1, Ordering::Relaxed);
                    log::warn!("no space in the host filesystem for block {pblk}: {e}");
                } else {
                    self.abort(&mut st, &e, pblk);
                }
                let redo = st.range.take_ready();
                drop(st);
                a.done.finish(Err(if enospc {
                    EngineError::NoSpace
                } else {
                    EngineError::Io(e)
                }));
                for p in redo {
                    self.write_slow(p);
                }
            }
        }
    }

    /// The allocating write with positioned I/O (backings without an io_uring, deferred writes).
    pub(super) fn write_slow(self: &Arc<Self>, w: PendingWrite) {
        if let Some(a) = self.begin_alloc(w) {
            self.write_allocated(a);
        }
    }

    /// The data I/O of an allocated write, as positioned I/O on this thread, then its end.
    pub(super) fn write_allocated(self: &Arc<Self>, a: Allocated) {
        let mut result = Ok(());
        for op in alloc_ops(&a) {
            if let Err(e) = self.io.writev_at(&op.iovs, op.offset, op.dsync) {
                result = Err((e, op.offset));
                break;
            }
        }
        let (rest, _bufs) = a.into_done();
        self.end_alloc(rest, result);
    }
}

/// The unwritten blocks of `runs` inside `outside` — the parts of the allocation unit around
/// the request — that `busy` does not claim: what the write fills with zeroes and converts.
fn unit_fill(runs: &[Extent], outside: [(u64, u64); 2], busy: impl Fn(u64) -> bool) -> Vec<Extent> {
    let mut fill: Vec<Extent> = Vec::new();
    for e in runs.iter().filter(|e| e.unwritten) {
        for (lo, hi) in outside {
            for b in u64::from(e.lblk).max(lo)..e.end().min(hi) {
                if busy(b) {
                    continue;
                }
                let pblk = e.pblk + (b - u64::from(e.lblk));
                match fill.last_mut() {
                    Some(l) if l.end() == b && l.pblk + u64::from(l.len) == pblk => l.len += 1,
                    _ => fill.push(Extent {
                        lblk: b as u32,
                        len: 1,
                        pblk,
                        unwritten: true,
                    }),
                }
            }
        }
    }
    fill
}
