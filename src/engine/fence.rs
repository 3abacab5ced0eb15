//! The I/O fence, and the rules of who may wait for whom in the image engine.
//!
//! # The fence
//!
//! An epoch fence between data I/O that runs without the mapping lock and the reuse of freed
//! blocks. A read or overwrite takes a [`FenceGuard`] after it looks up its mapping (and checks
//! the mapping is still valid) and drops it when its I/O has ended; an allocating write takes its
//! guard under the mapping lock, with its allocation. Before blocks freed by a discard become
//! allocatable (the end of the commit that frees them), the committer waits
//! ([`IoFence::wait_prior`]) for every guard taken before that commit froze its transaction. So no
//! I/O can land on, or read from, a block that has been handed to another logical block.
//!
//! # Who waits for whom
//!
//! The engine's threads: one per virtqueue, the completion worker, the committer. Its waits:
//!
//! | wait | who | holding | ends because |
//! | --- | --- | --- | --- |
//! | the mapping lock (`Mutex<Locked>`) | any thread | fence guards, possibly | no holder of the lock waits for anything but the backing's synchronous I/O (checkpoint, partial-block zeroing); commits write their log with the lock released |
//! | the restart log's mutex (`Shared::restart`, before the mapping lock in the lock order) | the worker (each batch), the committer (after a commit, and to write restarted work's records) | nothing but, for the worker, its batch's requests, not yet completed | a holder takes only the mapping lock (above) and makes one `write` to a tmpfs file (a rename after a commit); it never waits for a commit or for the other holder |
//! | `IoFence::wait_prior` | the committer only | nothing (not the lock) | every guard belongs to an I/O that is submitted at the end of its queue thread's batch (or is positioned I/O on the worker), completes in the kernel, and is dropped when reaped; none of those threads waits for the committer, so none is stuck behind this wait |
//! | a commit (the log has no room, or free space exists only once pending frees commit) | **nobody** | — | an allocating write that cannot start *parks*: it is queued in `Locked::parked` and the thread goes on. The committer, right after each commit, under the lock, restarts the parked writes in order and hands their data I/O to the worker. So no thread ever waits for the committer, and in particular none while holding fence guards that only it can release |
//! | the committer's queue (`recv_timeout`) | the committer | nothing | a waiter, or the commit interval |
//! | the worker's queue (`recv`) | the worker | nothing | work, or the engine closing |
//! | `flush()` (a shutdown sync) | the main thread | nothing | the committer answers after its next commit |
//!
//! The rule that made the disk stop (issue 12): a queue thread used to wait on a condvar for a
//! commit (the log throttle) while fence guards of reads and overwrites earlier in its batch sat
//! unsubmitted in its ring; the committer waited in `wait_prior` for exactly those. Parking makes
//! that cycle impossible by construction: no function that waits for a commit exists on the
//! queue, worker or committer threads. `protocol_model.rs` model-checks the protocol of queue
//! batches, the throttle and the committer's fence wait over this fence (and finds the old
//! throttle's deadlock); the space waits and the worker's parking follow the same rule.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
pub struct IoFence {
    epoch: AtomicU64,
    counts: [AtomicUsize; 2],
}

/// Held by an I/O while it is in flight; dropping it leaves the fence. Owned (it keeps the
/// fence alive), so it can travel with a request through an io_uring or another thread.
#[must_use = "dropping the guard leaves the fence at once"]
pub struct FenceGuard {
    fence: Arc<IoFence>,
    parity: usize,
}

impl std::fmt::Debug for FenceGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceGuard")
            .field("parity", &self.parity)
            .finish()
    }
}

impl IoFence {
    /// Enters the fence: every later [`IoFence::wait_prior`] waits until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> FenceGuard {
        loop {
            // SeqCst on the four accesses that meet the waiter's: count-then-epoch here and
            // epoch-then-count there is the store-buffering pattern, which acquire/release
            // alone would let both sides miss.
            let e = self.epoch.load(Ordering::SeqCst);
            let parity = (e & 1) as usize;
            self.counts[parity].fetch_add(1, Ordering::SeqCst);
            // The epoch moved between the load and the count: the waiter may already be
            // counting the other side; enter again on the new parity.
            if self.epoch.load(Ordering::SeqCst) == e {
                return FenceGuard {
                    fence: self.clone(),
                    parity,
                };
            }
            self.counts[parity].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Waits for every guard taken before this call. One waiter at a time (the committer).
    /// Ends because guards are only held across I/O that no thread delays behind a commit (the
    /// module comment's table).
    pub fn wait_prior(&self) {
        self.wait_prior_with(|| std::thread::sleep(Duration::from_micros(50)));
    }

    /// [`IoFence::wait_prior`], calling `pause` between looks (the model check passes its
    /// scheduler's yield here).
    pub fn wait_prior_with(&self, mut pause: impl FnMut()) {
        let e = self.epoch.fetch_add(1, Ordering::SeqCst);
        let old = (e & 1) as usize;
        while self.counts[old].load(Ordering::SeqCst) != 0 {
            pause();
        }
    }

    /// Guards currently held (both epochs): for tests and the liveness counters.
    pub fn held(&self) -> usize {
        self.counts[0].load(Ordering::Acquire) + self.counts[1].load(Ordering::Acquire)
    }
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        self.fence.counts[self.parity].fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_prior_io_only() {
        let f = Arc::new(IoFence::default());
        let t = f.enter();
        let f2 = f.clone();
        let h = std::thread::spawn(move || {
            f2.wait_prior();
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !h.is_finished(),
            "must wait for the I/O that entered before"
        );
        // Entered after the flip (the waiter has started by now: it is sleeping in its loop).
        let later = f.enter();
        assert_eq!(f.held(), 2);
        drop(t);
        h.join().unwrap();
        // The later guard is still held, and a new waiter would wait for it.
        assert_eq!(f.held(), 1);
        drop(later);
        assert_eq!(f.held(), 0);
        f.wait_prior();
    }
}
