//! Guest notifications batched on threads other than the queue's own.
//!
//! An engine thread (the image engine's completion worker, its committer) may complete many
//! requests of several queues at once. Inside a [`CompletionBatch`] each completion defers its
//! queue's notification ([`defer_wake`]) and the batch sends one per queue when it ends. The
//! engine opens the batch through the seam's [`Completion::batch`](crate::engine::Completion)
//! hook: it knows nothing of virtio. The queue thread's own batch is
//! [`BatchScope`](super::completion::BatchScope).

/// A deferred wake-up and the key it is deduplicated by.
type Wakes = Vec<(usize, Box<dyn FnOnce()>)>;

thread_local! {
    /// Wake-ups deferred to the end of the current [`CompletionBatch`] on this thread, one per key.
    static DEFERRED_WAKES: std::cell::RefCell<Option<Wakes>> = const { std::cell::RefCell::new(None) };
}

/// While alive, completions made on this thread may defer their wake-up of the waiting side
/// ([`defer_wake`]) to the batch's end: an engine thread that completes many requests at once
/// notifies each queue once, as a queue thread does for its own batch. Engines open it through
/// [`Completion::batch`](crate::engine::Completion::batch).
pub struct CompletionBatch(());

impl CompletionBatch {
    pub fn enter() -> CompletionBatch {
        DEFERRED_WAKES.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(Vec::new());
            }
        });
        CompletionBatch(())
    }
}

impl Drop for CompletionBatch {
    fn drop(&mut self) {
        let wakes = DEFERRED_WAKES.with(|d| d.borrow_mut().take());
        for (_, wake) in wakes.unwrap_or_default() {
            wake();
        }
    }
}

/// Defers a wake-up to the end of this thread's [`CompletionBatch`], once per `key` (`make`
/// builds it only for the first). False when no batch is open: the caller wakes now.
pub fn defer_wake(key: usize, make: impl FnOnce() -> Box<dyn FnOnce()>) -> bool {
    DEFERRED_WAKES.with(|d| match d.borrow_mut().as_mut() {
        Some(list) => {
            if !list.iter().any(|(k, _)| *k == key) {
                list.push((key, make()));
            }
            true
        }
        None => false,
    })
}
