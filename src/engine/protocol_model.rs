//! A model check (shuttle) of the protocol between queue threads, the log throttle, the I/O
//! fence and the committer (`fence.rs` has the rules). The fence is the engine's own
//! [`IoFence`]; the rest is the protocol reduced to what decides liveness:
//!
//! - a queue thread takes a batch of requests: reads and overwrites take a fence guard and sit in
//!   the batch unsubmitted; an allocating write needs room in the running transaction's log;
//!   at the end of the batch everything is submitted and reaped, dropping the guards;
//! - the committer, nudged, freezes the running transaction (its room is free again for the
//!   next), waits for every guard taken before (`wait_prior`), writes, and then lets waiting
//!   writes go on.
//!
//! With [`Throttle::Wait`] (the engine before issue 12) a write that finds the log full waits on
//! its queue thread for the commit; with [`Throttle::Park`] (today) it is parked and the thread
//! goes on; the committer restarts it after the commit. Shuttle explores interleavings; a
//! schedule where the committer spins in `wait_prior` without end is a liveness failure
//! (`MaxSteps::FailAfter`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use shuttle::sync::{mpsc, Arc, Condvar, Mutex};
use shuttle::thread;

use super::fence::IoFence;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Throttle {
    /// Wait for the commit on the queue thread (the old engine).
    Wait,
    /// Park the write; the committer restarts it (the engine now).
    Park,
}

/// Log room of a transaction, in allocating writes.
const ROOM: u32 = 2;
const QUEUES: usize = 2;
const BATCHES: usize = 2;
const PER_BATCH: usize = 3;

#[derive(Default)]
struct State {
    /// Allocating writes in the running transaction.
    running: u32,
    /// Parked allocating writes (their ids).
    parked: VecDeque<usize>,
}

enum Msg {
    Nudge,
    Stop,
}

struct Model {
    state: Mutex<State>,
    committed: Condvar,
    fence: std::sync::Arc<IoFence>,
    completed: AtomicUsize,
    to_committer: Mutex<mpsc::Sender<Msg>>,
}

impl Model {
    fn nudge(&self) {
        let _ = self.to_committer.lock().unwrap().send(Msg::Nudge);
    }

    fn queue(&self, q: usize, throttle: Throttle) {
        for b in 0..BATCHES {
            let mut batch = Vec::new();
            for r in 0..PER_BATCH {
                if (q + b + r) % 2 == 0 {
                    // A read or overwrite: its guard waits in the batch until submission.
                    batch.push(self.fence.enter());
                    continue;
                }
                let mut st = self.state.lock().unwrap();
                match throttle {
                    Throttle::Wait => {
                        while st.running >= ROOM {
                            self.nudge();
                            st = self.committed.wait(st).unwrap();
                        }
                        st.running += 1;
                        batch.push(self.fence.enter());
                    }
                    Throttle::Park => {
                        if st.running >= ROOM || !st.parked.is_empty() {
                            st.parked.push_back(q * 100 + b * 10 + r);
                            drop(st);
                            self.nudge();
                        } else {
                            st.running += 1;
                            batch.push(self.fence.enter());
                        }
                    }
                }
            }
            // Submit the batch; the I/O completes and is reaped on this thread.
            thread::yield_now();
            self.completed.fetch_add(batch.len(), Ordering::SeqCst);
            drop(batch);
        }
    }

    fn committer(&self, rx: mpsc::Receiver<Msg>) {
        while let Ok(Msg::Nudge) = rx.recv() {
            loop {
                // Freeze: the running transaction becomes the committing one.
                self.state.lock().unwrap().running = 0;
                self.fence.wait_prior_with(thread::yield_now);
                // Written; restart parked writes that fit in the new running transaction.
                let mut st = self.state.lock().unwrap();
                while st.running < ROOM {
                    let Some(_id) = st.parked.pop_front() else {
                        break;
                    };
                    st.running += 1;
                    // Its data I/O runs on the worker, which holds a guard until it ends.
                    drop(self.fence.enter());
                    self.completed.fetch_add(1, Ordering::SeqCst);
                }
                let again = !st.parked.is_empty();
                drop(st);
                self.committed.notify_all();
                if !again {
                    break;
                }
            }
        }
    }
}

fn run(throttle: Throttle) {
    let (tx, rx) = mpsc::channel();
    let m = Arc::new(Model {
        state: Mutex::new(State::default()),
        committed: Condvar::new(),
        fence: std::sync::Arc::new(IoFence::default()),
        completed: AtomicUsize::new(0),
        to_committer: Mutex::new(tx),
    });
    let mc = m.clone();
    let committer = thread::spawn(move || mc.committer(rx));
    let queues: Vec<_> = (0..QUEUES)
        .map(|q| {
            let mq = m.clone();
            thread::spawn(move || mq.queue(q, throttle))
        })
        .collect();
    for h in queues {
        h.join().unwrap();
    }
    let _ = m.to_committer.lock().unwrap().send(Msg::Stop);
    committer.join().unwrap();
    // Every request completed: none is left parked.
    assert_eq!(
        m.completed.load(Ordering::SeqCst),
        QUEUES * BATCHES * PER_BATCH
    );
}

fn check(throttle: Throttle, iterations: usize) {
    let mut config = shuttle::Config::new();
    config.max_steps = shuttle::MaxSteps::FailAfter(20_000);
    config.failure_persistence = shuttle::FailurePersistence::None;
    // A fixed seed: the same schedules every run.
    let scheduler = shuttle::scheduler::PctScheduler::new_from_seed(0x5EED, 3, iterations);
    shuttle::Runner::new(scheduler, config).run(move || run(throttle));
}

#[test]
fn parking_writes_never_stops_the_disk() {
    check(Throttle::Park, 3000);
}

#[test]
fn the_old_throttle_deadlocks_with_the_fence() {
    // Shuttle reports the failing schedule by panicking; it must find one.
    let found = std::panic::catch_unwind(|| check(Throttle::Wait, 3000));
    let Err(payload) = found else {
        panic!("the model check did not find the deadlock of the waiting throttle");
    };
    let why = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    // The committer spinning in wait_prior for ever, the queue thread blocked on the condvar.
    assert!(why.contains("exceeded max_steps"), "{why}");
}
