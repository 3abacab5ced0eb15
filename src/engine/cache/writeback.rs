//! The writeback thread: writes dirty pages back below in runs, answers flushes.
//!
//! It wakes on its eventfd (a write that crossed the background limit or found no room, a
//! flush, an urgent block, a completion), on its queue's completions, and on a tick for
//! expiry. Each round it reaps, then under the state lock chooses what to write — everything
//! dirty when a flush waits for it, a writer waits for room, the background limit is crossed
//! or the cache is closing; otherwise the urgent and the expired pages — in runs of
//! consecutive blocks, longest first, at most `MAX_RUNS` in flight; then, with the lock
//! released, submits them as one write each. A flush is sent below once no dirty version it
//! covers is left; the flushes waiting then share it.

use std::any::Any;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::state::{FlushDone, MAX_RUN};
use super::store::PAGE;
use super::{lock, new_epoll, watch, Shared};
use crate::engine::{
    BlockEngine, Completion, EngineError, EngineOp, EngineQueue, GuestBuffers, Stopped,
};
use crate::units::Bytes;

/// Writebacks in flight at most: enough to keep the queue below busy.
const MAX_RUNS: usize = 64;

/// The completion of what the writeback thread sends below.
pub(crate) enum WbDone {
    Run {
        shared: Arc<Shared>,
        slots: Vec<u32>,
    },
    Flush {
        shared: Arc<Shared>,
        waiters: Vec<FlushDone>,
    },
}

impl Completion for WbDone {
    fn complete(self, r: Result<(), EngineError>) {
        match self {
            WbDone::Run { shared, slots } => {
                let ok = r.is_ok();
                let mut st = lock(&shared.state);
                for s in slots {
                    st.end_writeback(&shared.store, s, ok);
                }
                st.runs_in_flight -= 1;
                if let Err(e) = r {
                    log::error!("write-back cache: a writeback failed: {e}; the cache accepts no more writes");
                    st.failed.get_or_insert(Arc::new(e));
                }
                shared.gauges(&st);
                let waiting = std::mem::take(&mut st.waiting);
                drop(st);
                Shared::wake_queues(waiting);
                shared.wake_writeback();
            }
            WbDone::Flush { shared, waiters } => {
                let mut st = lock(&shared.state);
                st.flush_in_flight = false;
                let res = match r {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        let e = Arc::new(e);
                        st.failed.get_or_insert(e.clone());
                        Err(e)
                    }
                };
                drop(st);
                shared.wake_writeback();
                for w in waiters {
                    w(res.clone().map_err(|e| Stopped::WritebackFailed(e).into()));
                }
            }
        }
    }
}

pub(super) fn run<E: BlockEngine>(shared: Arc<Shared>, mut q: E::Queue<WbDone>) {
    let ep = match new_epoll().and_then(|ep| {
        watch(&ep, shared.wake.as_raw_fd())?;
        if let Some(fd) = q.completion_fd() {
            watch(&ep, fd)?;
        }
        Ok(ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            // Without its epoll set the thread polls on the tick alone.
            log::error!("write-back cache: epoll: {e}; polling");
            return run_loop::<E>(&shared, &mut q, None);
        }
    };
    run_loop::<E>(&shared, &mut q, Some(ep))
}

fn run_loop<E: BlockEngine>(
    shared: &Arc<Shared>,
    q: &mut E::Queue<WbDone>,
    ep: Option<std::os::fd::OwnedFd>,
) {
    let tick = (shared.expire / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 4];
    loop {
        match &ep {
            // Ends: a wake-up, a completion, or the tick.
            Some(ep) => {
                let _ = epoll::wait(ep.as_raw_fd(), tick.as_millis() as i32, &mut events);
            }
            None => std::thread::sleep(tick.min(Duration::from_millis(1))),
        }
        let _ = shared.wake.read();
        q.process_completions();
        let now = Instant::now();
        let mut st = lock(&shared.state);
        let mut failed_flushes = Vec::new();
        let mut runs = Vec::new();
        let mut flush = None;
        if let Some(e) = st.failed.clone() {
            failed_flushes = std::mem::take(&mut st.flushes)
                .into_iter()
                .map(|f| (f.done, e.clone()))
                .collect();
        } else {
            let oldest = st.oldest_dirty();
            // The flushes waiting for dirty versions: those up to the newest of their targets
            // go first, oldest first.
            let flush_upto = st
                .flushes
                .iter()
                .map(|f| f.target)
                .filter(|&t| t >= oldest && !broken!(FlushBeforeWriteback))
                .max();
            let all = st.stop || !st.waiting.is_empty() || st.dirty >= st.background;
            let cutoff = now.checked_sub(shared.expire).unwrap_or(now);
            let room = MAX_RUNS.saturating_sub(st.runs_in_flight);
            runs = st.plan(flush_upto, all, cutoff, room);
            st.runs_in_flight += runs.len();
            if !st.flush_in_flight {
                let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut st.flushes)
                    .into_iter()
                    .partition(|f| f.target < oldest || broken!(FlushBeforeWriteback));
                st.flushes = rest;
                if !ready.is_empty() {
                    st.flush_in_flight = true;
                    flush = Some(ready);
                }
            }
        }
        let exit = st.stop
            && runs.is_empty()
            && st.runs_in_flight == 0
            && !st.flush_in_flight
            && st.flushes.is_empty();
        shared.gauges(&st);
        drop(st);
        for (done, e) in failed_flushes {
            done(Err(Stopped::WritebackFailed(e).into()));
        }
        for run in runs {
            shared.stats.writeback_runs.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .writeback_blocks
                .fetch_add(run.slots.len() as u64, Ordering::Relaxed);
            debug_assert!(run.slots.len() <= MAX_RUN);
            let mut iovs = crate::io::uring::Iovs::new();
            for &s in &run.slots {
                let p = shared.store.data(s);
                match iovs.last_mut() {
                    // SAFETY: pointer arithmetic inside the store's mapping, compared only.
                    Some(last) if unsafe { (last.iov_base as *mut u8).add(last.iov_len) } == p => {
                        last.iov_len += PAGE
                    }
                    _ => iovs.push(libc::iovec {
                        iov_base: p.cast(),
                        iov_len: PAGE,
                    }),
                }
            }
            let keep: Arc<dyn Any + Send + Sync> = shared.clone();
            // SAFETY: the slots are busy: published, immutable and not freed until this write
            // completes; the store lives while `keep` does; the engine only reads them.
            let bufs = unsafe { GuestBuffers::new(iovs, keep) };
            q.submit(
                EngineOp::Write {
                    offset: Bytes(run.first * PAGE as u64),
                    bufs,
                    fua: false,
                },
                WbDone::Run {
                    shared: shared.clone(),
                    slots: run.slots,
                },
            );
        }
        if let Some(ready) = flush {
            shared.stats.flushes_below.fetch_add(1, Ordering::Relaxed);
            q.submit(
                EngineOp::Flush,
                WbDone::Flush {
                    shared: shared.clone(),
                    waiters: ready.into_iter().map(|f| f.done).collect(),
                },
            );
        }
        q.submit_batch();
        if exit {
            break;
        }
    }
}
