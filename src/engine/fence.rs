//! An epoch fence between data I/O that runs without the mapping lock and the reuse of freed
//! blocks. A read or overwrite enters the fence before it looks up its mapping and leaves after
//! its I/O; before blocks freed by a discard become allocatable, the worker waits for every I/O
//! that entered before the discard. So no I/O can land on (or read from) a block that has been
//! handed to another logical block.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Default)]
pub struct IoFence {
    epoch: AtomicU64,
    counts: [AtomicUsize; 2],
}

/// Held by an I/O while it is in flight.
pub struct FenceToken<'a> {
    fence: &'a IoFence,
    parity: usize,
}

impl IoFence {
    pub fn enter(&self) -> FenceToken<'_> {
        FenceToken {
            fence: self,
            parity: self.enter_raw(),
        }
    }

    /// Enters without a borrow, for I/O that completes later on an io_uring; the caller must
    /// call [`IoFence::exit`] with the returned parity exactly once.
    pub fn enter_raw(&self) -> usize {
        loop {
            let e = self.epoch.load(Ordering::Acquire);
            let parity = (e & 1) as usize;
            self.counts[parity].fetch_add(1, Ordering::AcqRel);
            if self.epoch.load(Ordering::Acquire) == e {
                return parity;
            }
            self.counts[parity].fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub fn exit(&self, parity: usize) {
        self.counts[parity].fetch_sub(1, Ordering::AcqRel);
    }

    /// Waits for every I/O that entered before this call. One waiter at a time (the worker).
    pub fn wait_prior(&self) {
        let e = self.epoch.fetch_add(1, Ordering::AcqRel);
        let old = (e & 1) as usize;
        while self.counts[old].load(Ordering::Acquire) != 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

impl Drop for FenceToken<'_> {
    fn drop(&mut self) {
        self.fence.counts[self.parity].fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        let later = f.enter(); // entered after the flip: not waited for
        drop(t);
        h.join().unwrap();
        drop(later);
    }
}
