//! The commit service (jbd2's kjournald): commits the running transaction on demand, on the
//! commit interval and when the log fills; punches freed ranges in the backing once their
//! transaction is durable; restarts parked work after each commit; aborts the journal
//! (`data_err=abort`).
//!
//! Invariants: only the committer thread commits while the engine runs, so commits never
//! overlap. A commit freezes the transaction under the mapping lock and writes it with the
//! lock released. Before blocks the transaction frees can be reused it waits for the I/O fence
//! (in-flight I/O that saw them mapped); that wait ends because nobody holding a fence guard
//! waits for this thread (`fence.rs`). Parked work restarts under the same guard that made the
//! commit's frees allocatable, oldest first, so nothing newer takes them first. After a
//! commit, the restart log drops the records it made durable (`restart.rs`).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::alloc_write::{Allocated, PendingWrite, Step};
use super::worker::{MetaEnd, MetaOp, Work};
use super::{lock, Done, Locked, Shared, BS};
use crate::engine::{EngineError, Stopped};
use crate::image::ImageError;

/// What a restart of parked work started, to hand on without the lock.
#[derive(Default)]
pub(super) struct Restarted {
    ready: Vec<Allocated>,
    now: Vec<(Done, Result<(), EngineError>)>,
    durable: Vec<Done>,
    redo: Vec<PendingWrite>,
    still: bool,
}

/// What the committer completes after its next commit.
pub(super) enum Waiter {
    /// A FLUSH, or a FUA write or zeroing: complete once durable.
    Done(Done),
    /// `flush()` at shutdown.
    Sync(Sender<Result<(), Stopped>>),
    /// Nothing waits; the log is filling up, or writes are parked until the next commit.
    Nudge,
    /// `resize()`: grow the disk after this commit (the device is quiesced).
    Resize {
        size: u64,
        reply: Sender<Result<crate::image::resize::ResizePlan, EngineError>>,
    },
}

/// Work waiting in `Locked::parked` for a commit.
pub(super) enum Parked {
    Write(PendingWrite),
    Meta(MetaOp),
}

impl Parked {
    pub(super) fn fail(self, e: EngineError) {
        match self {
            Parked::Write(w) => w.done.finish(Err(e)),
            Parked::Meta(MetaOp::Convert { done, .. } | MetaOp::Zero { done, .. }) => {
                done.finish(Err(e))
            }
        }
    }
}

pub(super) fn answer(w: Waiter, r: Result<(), Stopped>) {
    match w {
        Waiter::Done(d) => d.finish(r.map_err(EngineError::from)),
        Waiter::Sync(reply) => {
            let _ = reply.send(r);
        }
        Waiter::Nudge => {}
        Waiter::Resize { reply, .. } => {
            let _ = reply.send(Err(r.err().unwrap_or(Stopped::Closed).into()));
        }
    }
}

/// The committer: one commit for everything waiting, on demand, every `interval`, and when the
/// log fills up.
pub(super) fn run(s: Arc<Shared>, rx: Receiver<Waiter>, interval: Duration) {
    let mut last_commit = Instant::now();
    // Writes are still parked after the last commit: commit again at once.
    let mut again = false;
    loop {
        let timeout = interval
            .saturating_sub(last_commit.elapsed())
            .max(Duration::from_millis(1));
        let first = if again {
            rx.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
            })
        } else {
            rx.recv_timeout(timeout)
        };
        let mut waiters = match first {
            Ok(w) => vec![w],
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let durable = waiters
            .iter()
            .any(|w| matches!(w, Waiter::Done(_) | Waiter::Sync(_) | Waiter::Resize { .. }));
        let r = s.commit(durable);
        last_commit = Instant::now();
        again = matches!(r, Ok(true));
        let r = r.map(|_| ());
        {
            let _batch = waiters.iter().find_map(|w| match w {
                Waiter::Done(d) => Some(d.batch()),
                _ => None,
            });
            for w in waiters {
                match (w, &r) {
                    (Waiter::Resize { size, reply }, Ok(())) => {
                        let _ = reply.send(s.resize(size));
                    }
                    (w, r) => answer(w, r.clone()),
                }
            }
        }
    }
}

impl Shared {
    /// Grows the image on the committer thread, right after a commit: the device is quiesced,
    /// so nothing is in flight and nothing waits, and no other commit can run meanwhile.
    fn resize(&self, size: u64) -> Result<crate::image::resize::ResizePlan, EngineError> {
        use crate::image::resize::ResizeError;
        self.writable()?;
        let mut st = lock(&self.state);
        let old = st.image.disk_size();
        if size < old {
            return Err(ResizeError::OnlineShrink { old, new: size }.into());
        }
        if !st.parked.is_empty() || !st.restart_pending.is_empty() {
            return Err(ResizeError::Unsupported(
                "requests are still waiting for a commit (quiesce first)".into(),
            )
            .into());
        }
        let r = st.image.resize(size, false);
        if st.image.is_aborted() {
            self.aborted.store(true, Ordering::Release);
        }
        let plan = r?;
        let bytes = plan.new_size - plan.new_size % crate::units::SECTOR_SIZE;
        self.capacity.store(bytes, Ordering::Release);
        // The image was reopened: no queue's cached mapping may outlive it.
        self.unmap_seq.fetch_add(1, Ordering::AcqRel);
        log::info!(
            "resized: disk {} -> {} bytes, filesystem {} -> {} groups",
            plan.old_size,
            plan.new_size,
            plan.old_groups,
            plan.new_groups
        );
        Ok(plan)
    }

    pub(super) fn to_committer(&self, w: Waiter) {
        let tx = lock(&self.committer).clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(w)) = tx.send(w) {
                    answer(w, Err(Stopped::CommitterGone));
                }
            }
            None => answer(w, Err(Stopped::Closed)),
        }
    }

    /// Commits the running transaction; see the module comment. Only the committer thread
    /// calls this while the engine runs, so commits never overlap. `durable`: a waiter needs
    /// the data durable even when there is no metadata to journal. Afterwards, under the same
    /// lock that makes the commit's frees allocatable, the parked allocating writes start again
    /// in arrival order; returns whether some are still parked after a commit that wrote
    /// something (the caller commits again at once).
    pub(super) fn commit(&self, durable: bool) -> Result<bool, Stopped> {
        if self.info.read_only {
            return Ok(false);
        }
        if self.aborted.load(Ordering::Acquire) {
            self.fail_parked();
            return Err(Stopped::Aborted);
        }
        let frozen;
        let frozen_tid;
        let (prepared, punches, frees) = {
            let mut st = lock(&self.state);
            frozen = self.meta_seq.load(Ordering::Acquire);
            frozen_tid = st.image.running_tid();
            match st.image.commit_prepare() {
                Ok(p) => (
                    p,
                    std::mem::take(&mut st.punch_after_commit),
                    std::mem::take(&mut st.frees_pending),
                ),
                Err(e) => {
                    let e = self.commit_failed(&mut st, e);
                    drop(st);
                    self.committed.notify_all();
                    self.fail_parked();
                    return Err(e);
                }
            }
        };
        if prepared.is_none() && !durable {
            // Nothing was committed, so nothing new became free: what stays parked waits for
            // the next nudge or the interval rather than a busy loop of empty commits.
            self.restart_parked();
            return Ok(false);
        }
        if frees {
            // No I/O that saw the old mapping may still touch the blocks about to be reused.
            // Ends: see fence.rs (nobody holding a guard waits for this thread).
            self.fence.wait_prior();
        }
        let written = match &prepared {
            Some(w) => w.write(&*self.io),
            // Nothing to journal: FLUSH still needs the data durable.
            None => self.io.flush(),
        };
        #[cfg(feature = "testing")]
        if let Some(d) = crate::testing::commit_delay() {
            std::thread::sleep(d);
        }
        if written.is_ok() {
            for (p, l) in punches {
                if let Err(e) = self.io.punch(p * BS, l * BS) {
                    log::warn!("cannot deallocate blocks {p}+{l} in the backing: {e}");
                }
            }
        }
        let mut st = lock(&self.state);
        let wrote = prepared.is_some();
        let r = match prepared {
            Some(_) => st.image.commit_finish(written),
            None => written.map_err(ImageError::Io),
        };
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let r = r.map_err(|e| self.commit_failed(&mut st, e));
        if r.is_ok() {
            // Every mapping change made before the freeze is durable now (in this transaction or
            // an earlier one).
            self.durable_seq.fetch_max(frozen, Ordering::AcqRel);
        }
        // Parked work first, under this same guard: nothing else takes the freed blocks first.
        let restarted = r.is_ok().then(|| self.restart_locked(&mut st));
        drop(st);
        self.committed.notify_all();
        if let (Ok(()), true, Some(t)) = (&r, wrote, frozen_tid) {
            // Transaction `t` and those before it are durable: their restart-log records go.
            self.log_committed(t.wrapping_add(1));
        }
        match (r, restarted) {
            (Ok(()), Some(restarted)) => Ok(self.dispatch(restarted)),
            (Ok(()), None) => Ok(false),
            (Err(e), _) => {
                self.fail_parked();
                Err(e)
            }
        }
    }

    /// Restarts parked work, oldest first, until one must park again: allocating writes are
    /// allocated here (their data I/O goes to the worker), conversions and zeroings run here.
    /// Returns whether work is still parked.
    pub(super) fn restart_parked(&self) -> bool {
        let mut st = lock(&self.state);
        let r = self.restart_locked(&mut st);
        drop(st);
        self.dispatch(r)
    }

    /// The part of [`Shared::restart_parked`] under the lock. The committer calls it with the
    /// same guard under which the commit's frees became allocatable, so the oldest waiter has
    /// first pick of them.
    pub(super) fn restart_locked(&self, st: &mut Locked) -> Restarted {
        let mut r = Restarted::default();
        while let Some(p) = st.parked.pop_front() {
            match p {
                Parked::Write(w) => match self.alloc_locked(st, w) {
                    Step::Go(a) => r.ready.push(a),
                    Step::Later => {
                        // Deferred behind a write initialising its blocks: it keeps its place
                        // at the head once redone (begin_alloc sees `ahead`).
                        if let Some(w) = st.range.last_deferred_mut() {
                            w.ahead = true;
                        }
                    }
                    Step::Park(w) => {
                        st.parked.push_front(Parked::Write(w));
                        break;
                    }
                    Step::Fail(w, e) => r.now.push((w.done, Err(e))),
                },
                Parked::Meta(op) => match self.run_meta(st, op) {
                    MetaEnd::Now(d, res) => r.now.push((d, res)),
                    MetaEnd::Durable(d) => r.durable.push(d),
                    MetaEnd::Park(op) => {
                        st.parked.push_front(Parked::Meta(op));
                        break;
                    }
                },
            }
        }
        r.still = !st.parked.is_empty();
        r.redo = st.range.take_ready();
        r
    }

    /// Hands on what [`Shared::restart_locked`] started, without the lock.
    pub(super) fn dispatch(&self, r: Restarted) -> bool {
        for a in r.ready {
            self.send(Work::Write(a));
        }
        // Restarted conversions and zeroings complete once their changes are in the restart log.
        self.complete_after_log(r.now);
        for d in r.durable {
            self.to_committer(Waiter::Done(d));
        }
        for w in r.redo {
            self.send(Work::Redo(w));
        }
        r.still
    }

    /// The journal is gone (or the engine closes): parked work can never run. Deferred writes
    /// are failed with it, and the blocks of parked conversions unmarked, so nothing waits for
    /// an initialisation that will never finish.
    pub(super) fn fail_parked(&self) {
        let (parked, deferred) = {
            let mut st = lock(&self.state);
            let parked = std::mem::take(&mut st.parked);
            for p in &parked {
                if let Parked::Meta(MetaOp::Convert { runs, .. }) = p {
                    st.range.unmark(runs);
                }
            }
            (parked, st.range.take_deferred())
        };
        let e = || EngineError::from(Stopped::Aborted);
        for p in parked {
            p.fail(e());
        }
        for w in deferred {
            w.done.finish(Err(e()));
        }
    }

    pub(super) fn commit_failed(&self, st: &mut Locked, e: ImageError) -> Stopped {
        log::error!("journal commit failed: {e}");
        self.abort(st, &io::Error::other(e.to_string()), 0);
        Stopped::CommitFailed(Arc::new(e))
    }

    /// Aborts the journal after a failed data write (data_err=abort).
    pub(super) fn abort(&self, st: &mut Locked, e: &io::Error, pblk: u64) {
        // Allocating writes throttled for a commit must see the abort.
        self.committed.notify_all();
        if !self.aborted.swap(true, Ordering::AcqRel) {
            log::error!("data write to block {pblk} failed ({e}): aborting the journal; writes will fail from now on");
        }
        if !st.image.is_read_only() {
            if let Err(e2) = st.image.abort(
                e.raw_os_error().unwrap_or(libc::EIO),
                "extblk_write_data",
                pblk,
            ) {
                log::error!("cannot record the abort in the image: {e2}");
            }
        }
    }
}
