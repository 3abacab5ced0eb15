//! The completion worker: conversions after allocating writes' data I/O, FLUSH, DISCARD and
//! WRITE_ZEROES, in arrival order, in batches under one take of the mapping lock.
//!
//! Invariants: a FLUSH reaches the committer only after every conversion queued before it has
//! joined the running transaction, so the commit that answers it covers them. The worker
//! never waits for a commit: a conversion or zeroing that finds no block for a tree split
//! while frees wait for a commit parks (`Locked::parked`), and the committer restarts it. Its
//! only blocking call is `recv` on its channel, which ends when the engine closes (the sender
//! is dropped in `ImageEngine::close`), besides the restart log's mutex, whose holders wait for
//! nothing but the mapping lock and one write (`restart.rs`). A batch's changes are in the
//! restart log before any of its requests completes.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use super::alloc_write::{Allocated, PendingWrite};
use super::commit::{Parked, Waiter};
use super::layout::ZERO_PAGE;
use super::range_lock::Run;
use super::{lock, to_engine, Done, Locked, Shared, BS};
use crate::engine::{EngineError, Stopped, ZeroRange};
use crate::mapping::tree::Lookup;
use crate::restart_log::format::Change;

/// Work items the worker takes under one take of the mapping lock. Bounded so that a queue
/// thread waiting for the lock (a cache miss, an allocating write) waits for at most this many
/// in-memory conversions, and completions of the batch are not held back for long.
const MAX_BATCH: usize = 512;

pub(super) enum Work {
    /// A conversion after an allocating write's data I/O, or a DISCARD / WRITE_ZEROES.
    Meta(MetaOp),
    Flush {
        done: Done,
    },
    /// A deferred write whose blocks are no longer being initialised: allocate it again.
    Redo(PendingWrite),
    /// Commit now and report (used by `flush()` at shutdown).
    Sync {
        reply: Sender<Result<(), Stopped>>,
    },
    /// Complete a read or overwrite that is already done (`HotPath::WorkerCompletion` only).
    Complete {
        done: Done,
        result: Result<(), EngineError>,
    },
    /// A parked allocating write, allocated by the committer after a commit: write its data
    /// (positioned I/O), then convert.
    Write(Allocated),
}

/// Metadata work of the worker that may need a new tree block.
pub(super) enum MetaOp {
    /// Data of an allocating write is on disk: convert `(lblk, len, pblk)` runs, then complete.
    Convert {
        runs: Vec<Run>,
        fua: bool,
        done: Done,
    },
    /// DISCARD, or WRITE_ZEROES with or without unmap.
    Zero {
        ranges: Vec<ZeroRange>,
        discard: bool,
        fua: bool,
        done: Done,
    },
}

/// How a [`MetaOp`] ended.
pub(super) enum MetaEnd {
    /// Complete now with this result.
    Now(Done, Result<(), EngineError>),
    /// Complete once the next commit is durable (FUA).
    Durable(Done),
    /// No free block, but blocks wait for a commit to be freed: retry after it.
    Park(MetaOp),
}

pub(super) fn fail_work(w: Work, why: Stopped) {
    let e = || EngineError::from(why.clone());
    match w {
        Work::Meta(MetaOp::Convert { done, .. } | MetaOp::Zero { done, .. })
        | Work::Flush { done } => done.finish(Err(e())),
        Work::Redo(w) => w.done.finish(Err(e())),
        Work::Sync { reply } => {
            let _ = reply.send(Err(why));
        }
        Work::Complete { done, result } => done.finish(result),
        Work::Write(a) => {
            let (rest, _bufs) = a.into_done();
            rest.done.finish(Err(e()));
        }
    }
}

/// The completion worker: conversions, flushes, discards and zeroing, in arrival order. What
/// must be durable before it completes goes to the committer after the batch, so the commit
/// that serves it includes every conversion before it.
pub(super) fn run(s: Arc<Shared>, rx: Receiver<Work>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // The restart log's mutex first (the lock order of restart.rs), held until this
        // batch's changes are written.
        let log = s.restart_guard();
        let mut st = lock(&s.state);
        let mut done_now: Vec<(Done, Result<(), EngineError>)> = Vec::new();
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut writes: Vec<Allocated> = Vec::new();
        let mut redo_now: Vec<PendingWrite> = Vec::new();
        for w in batch {
            match w {
                Work::Meta(op) => {
                    if let MetaOp::Zero { .. } = op {
                        s.stats.zeroing_ops.fetch_add(1, Ordering::Relaxed);
                        s.stats.journal_handles.fetch_add(1, Ordering::Relaxed);
                    }
                    match s.run_meta(&mut st, op) {
                        MetaEnd::Now(d, r) => done_now.push((d, r)),
                        MetaEnd::Durable(d) => waiters.push(Waiter::Done(d)),
                        MetaEnd::Park(op) => {
                            st.parked.push_back(Parked::Meta(op));
                            waiters.push(Waiter::Nudge);
                        }
                    }
                }
                Work::Flush { done } => waiters.push(Waiter::Done(done)),
                Work::Redo(w) => redo_now.push(w),
                Work::Sync { reply } => waiters.push(Waiter::Sync(reply)),
                Work::Complete { done, result } => done_now.push((done, result)),
                Work::Write(a) => writes.push(a),
            }
        }
        if waiters.is_empty() && st.image.should_commit() {
            waiters.push(Waiter::Nudge);
        }
        let redo = st.range.take_ready();
        let records = std::mem::take(&mut st.restart_pending);
        let made = s.log_made.load(Ordering::Acquire);
        drop(st);
        // The batch's changes reach the restart log (one write, outside the mapping lock)
        // before any of its requests completes.
        s.complete_logged(log, records, made, done_now);
        for w in waiters {
            s.to_committer(w);
        }
        for w in redo {
            s.write_slow(w);
        }
        for a in writes {
            s.write_allocated(a);
        }
        for w in redo_now {
            s.write_slow(w);
        }
    }
}

impl Shared {
    pub(super) fn send(&self, w: Work) {
        let tx = lock(&self.worker).clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(w)) = tx.send(w) {
                    self.fail_work(w, Stopped::WorkerGone);
                }
            }
            None => self.fail_work(w, Stopped::Closed),
        }
    }

    /// Answers work that no worker will run. A conversion or allocated write that never
    /// finishes must still unmark its blocks, or writes deferred behind them would wait for ever.
    pub(super) fn fail_work(&self, w: Work, why: Stopped) {
        let runs = match &w {
            Work::Meta(MetaOp::Convert { runs, .. }) => Some(runs.clone()),
            Work::Write(a) => Some(a.to_convert.clone()),
            _ => None,
        };
        fail_work(w, why.clone());
        if let Some(runs) = runs {
            let mut st = lock(&self.state);
            st.range.unmark(&runs);
            let ready = st.range.take_ready();
            drop(st);
            for p in ready {
                p.done.finish(Err(EngineError::from(why.clone())));
            }
        }
    }

    /// A conversion or zeroing, under the mapping lock. Either may split an extent and need a
    /// tree block; when none is free but frees wait for a commit, it parks (the space rule).
    pub(super) fn run_meta(&self, st: &mut Locked, op: MetaOp) -> MetaEnd {
        self.meta_seq.fetch_add(1, Ordering::AcqRel);
        let no_space = |r: &Result<(), EngineError>, st: &Locked| {
            matches!(r, Err(EngineError::NoSpace)) && st.image.space_pending()
        };
        match op {
            MetaOp::Convert { runs, fua, done } => {
                let mut r = Ok(());
                for &(l, n, p) in &runs {
                    // Runs converted before a failure stay converted: converting is idempotent,
                    // so the retry redoes only what is left.
                    match st.image.convert_exact_runs(l, n, p) {
                        Ok(converted) => {
                            // Exactly what was converted goes to the restart log: a piece a
                            // discard removed meanwhile must not come back after a restart.
                            let mut c = 0;
                            for e in converted {
                                c += u64::from(e.len);
                                self.record_change(
                                    st,
                                    Change::Written {
                                        lblk: e.lblk,
                                        len: e.len,
                                        pblk: e.pblk,
                                    },
                                );
                            }
                            self.stats.converted_blocks.fetch_add(c, Ordering::Relaxed);
                        }
                        Err(e) => {
                            r = Err(to_engine(e));
                            break;
                        }
                    }
                }
                if no_space(&r, st) {
                    self.stats.space_waits.fetch_add(1, Ordering::Relaxed);
                    return MetaEnd::Park(MetaOp::Convert { runs, fua, done });
                }
                st.range.unmark(&runs);
                match r {
                    Ok(()) if fua => MetaEnd::Durable(done),
                    r => MetaEnd::Now(done, r),
                }
            }
            MetaOp::Zero {
                ranges,
                discard,
                fua,
                done,
            } => {
                // Punching or zeroing again what was done before a failure is a no-op.
                let r = self
                    .writable()
                    .and_then(|_| self.zero_ranges(st, &ranges, discard));
                if no_space(&r, st) {
                    self.stats.space_waits.fetch_add(1, Ordering::Relaxed);
                    return MetaEnd::Park(MetaOp::Zero {
                        ranges,
                        discard,
                        fua,
                        done,
                    });
                }
                match r {
                    Ok(()) if fua => MetaEnd::Durable(done),
                    r => MetaEnd::Now(done, r),
                }
            }
        }
    }

    pub(super) fn zero_ranges(
        &self,
        st: &mut Locked,
        ranges: &[ZeroRange],
        discard: bool,
    ) -> Result<(), EngineError> {
        for r in ranges {
            let (s, t) = (r.range.offset.0, r.range.offset.0 + r.range.len.0);
            let (fs, ft) = (s.div_ceil(BS), t / BS);
            if fs < ft {
                // Inside the disk, which is below 2^32 blocks (the punch or zero checked it).
                let (lblk, len) = (fs as u32, (ft - fs) as u32);
                if discard || r.unmap {
                    let freed = st.image.punch(fs, ft - fs).map_err(to_engine)?;
                    if !freed.is_empty() {
                        st.frees_pending = true;
                        st.punch_after_commit.extend(freed);
                    }
                    self.record_change(st, Change::Punch { lblk, len });
                } else {
                    st.image.zero(fs, ft - fs).map_err(to_engine)?;
                    self.record_change(st, Change::Zero { lblk, len });
                }
                self.unmap_seq.fetch_add(1, Ordering::AcqRel);
            }
            if discard {
                continue; // partial blocks of a discard: advisory, nothing to do
            }
            // Partial blocks of WRITE_ZEROES must read as zero: overwrite their written parts.
            let mut parts = Vec::new();
            if fs > ft {
                parts.push((s, t));
            } else {
                if s < fs * BS {
                    parts.push((s, fs * BS));
                }
                if t > ft * BS && ft * BS >= s {
                    parts.push((ft * BS, t));
                }
            }
            for (a, b) in parts {
                if let Lookup::Mapped(e) = st.image.lookup((a / BS) as u32) {
                    if !e.unwritten {
                        let at = e.pblk * BS + a % BS;
                        self.io
                            .write_at(&ZERO_PAGE.0[..(b - a) as usize], at)
                            .map_err(EngineError::Io)?;
                    }
                }
            }
        }
        Ok(())
    }
}
