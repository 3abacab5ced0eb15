//! How fast allocation units fill up, learnt from a sample of them: what an allocating write
//! does with the rest of its unit where the backing holds holes.
//!
//! Two ways to treat the unwritten rest of a unit whose host blocks are holes (a sparse image
//! file), measured in `docs/performance.md` (sessions 12 and 13):
//! - **convert it as it is**: nothing written, the unit is one written extent at once, and each
//!   later write into it allocates in the host filesystem (an O_DIRECT write into a hole goes
//!   through io_uring's worker threads and the host's journal). Best where units get few
//!   writes: scattered first writes over a large disk.
//! - **zero-fill it**: one host allocation for the whole rest (60 KiB of zeroes at the default
//!   unit), after which the unit's writes are overwrites of allocated host blocks, served on
//!   the queue thread. Best where units fill up: a dense fill.
//!
//! Which pays depends on how many writes a unit gets soon, which the past of other units
//! predicts. Every [`PROBE_EVERY`]th unit is a probe: its first write leaves the rest
//! unwritten, its second zero-fills or converts it. Whether a probe's second write came within
//! [`FILL_WINDOW`] of its first is its observation; the share of recent probes that filled up
//! decides for every other unit's first write: zero-fill, or convert the holes.
//!
//! An observation is taken when its window has passed, whether or not the second write came:
//! counting a quick second write at once and a missing one only later would see the quick ones
//! first and take a sparse start for a dense one. That leaves the first half second without a
//! verdict, too late for a dense fill, which first-writes most of its units within the first
//! few tenths of a second. Until [`WARMUP`] probes have been observed, the verdict comes from
//! counts instead of times: probes written a second time against probes written at all. With
//! writes at random over `U` units, after `n` of them that ratio is about `n / 2U`: it passes
//! [`EARLY_FILLING`] (1/8) after a quarter as many writes as there are units, 4,000 writes
//! (0.06 s) on a 1 GiB span at 64 KiB, 33,000 (0.7 s, after the first windows have passed) on
//! 8 GiB. (Timing the probes at a shorter window does not tell these two apart: the first
//! writes, all allocating, run slower than the later ones, so early gaps are long everywhere.)
//! The counts only ever say "zero-fill": until the window's verdict says units are not filling
//! up (and before [`EARLY_PROBES`] probes have been written), a first write leaves the rest
//! unwritten as a probe's does, and its second write decides. Converting a unit that then
//! fills up would cost a host allocation at each of its later writes; leaving it costs one
//! allocating write more.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A unit whose second write comes within this time of its first one is filling up. A dense
/// random fill of a 1 GiB span at 64 KiB units and 80k writes a second gives each unit a
/// write every 0.2 s on average; scattered writes over 8 GiB at 50k a second, one every 2.6 s.
pub(super) const FILL_WINDOW: Duration = Duration::from_millis(500);

/// Units `0, PROBE_EVERY, 2 * PROBE_EVERY, …` are the probes.
pub(super) const PROBE_EVERY: u64 = 8;

/// Probes waiting for their window at once, at most (at 8 probes per 64 writes and a 0.5 s
/// window, a million writes a second): past that the oldest is observed early.
const PENDING_MAX: usize = 1 << 16;

/// Probes findable by unit (a direct-mapped index into the pending ones). With more probes
/// pending than slots (over 32,768 probes a second: 260,000 allocating writes a second over
/// more than 8 GiB at 64 KiB units), a newer probe takes an older one's slot and the older one
/// is observed as not filling up: a bias towards converting, never towards writing zeroes.
const SLOTS: usize = 16384;

/// Shares are kept in 1/1024ths; after the warm-up each observation moves the share by 1/64
/// of the difference (a memory of about 64 probes: ±6 % of noise, against the margins of
/// [`FILLING`]).
const ONE: u32 = 1024;
const SHIFT: u32 = 6;

/// The share of probes written again within the window above which units are filling up
/// (2/5). Writes at random at `r` a second per unit give `1 - e^(-r/2)`: 2/5 at about one a
/// second. The start of an 8 GiB scattered fill (80k writes a second, 131,072 units) gives
/// about 0.26, a dense 1 GiB fill about 0.5 to 0.7.
const FILLING: u32 = 410;

/// Probes observed before the share decides; until then it is the plain mean of those
/// observed.
pub(super) const WARMUP: u32 = 64;

/// Before the warm-up: probes first-written before their counts decide.
pub(super) const EARLY_PROBES: u32 = 64;

/// Before the warm-up: units are filling up once more than this share of the probes written
/// have been written a second time (1/8).
const EARLY_FILLING: (u32, u32) = (1, 8);

/// A probe waiting for its window to pass.
#[derive(Clone, Copy)]
struct Pending {
    first: Instant,
    second: Option<Instant>,
}

/// A share of observations: a mean while warming up, then a moving average.
#[derive(Default)]
struct Share {
    /// In 1/1024ths.
    value: u32,
    /// Observations, counted up to [`WARMUP`].
    seen: u32,
}

impl Share {
    fn observe(&mut self, filled: bool) {
        let target = i64::from(if filled { ONE } else { 0 });
        let s = i64::from(self.value);
        self.value = if self.seen < WARMUP {
            self.seen += 1;
            (s + (target - s) / i64::from(self.seen)) as u32
        } else {
            (s + ((target - s) >> SHIFT)) as u32
        };
    }

    fn warm(&self) -> bool {
        self.seen >= WARMUP
    }
}

pub(super) struct UnitPace {
    /// Probes in the order of their first writes (so of their deadlines), the oldest first.
    pending: VecDeque<Pending>,
    /// Probes ever pushed to `pending`, and ever taken from its front: entry `i` of `pending`
    /// is probe number `popped + i`.
    pushed: u64,
    popped: u64,
    /// Probes first-written, and written a second time, counted until the warm-up is over.
    early_firsts: u32,
    early_seconds: u32,
    /// By slot: a probe's unit and number, to find it at its second write.
    slots: Box<[Option<(u64, u64)>]>,
    /// Observations at the window.
    share: Share,
}

impl Default for UnitPace {
    fn default() -> Self {
        UnitPace {
            pending: VecDeque::new(),
            pushed: 0,
            popped: 0,
            early_firsts: 0,
            early_seconds: 0,
            slots: vec![None; SLOTS].into_boxed_slice(),
            share: Share::default(),
        }
    }
}

/// What a unit's first write does with the rest of the unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FirstWrite {
    /// Leave it unwritten: the second write zero-fills or converts it (a probe, or no verdict
    /// yet).
    LeaveUnwritten,
    /// Convert whatever of it reads as zeroes (holes) now: units are not filling up.
    ConvertHoles,
    /// Write zeroes to all of it with the request: units are filling up.
    ZeroFill,
}

impl UnitPace {
    pub(super) fn is_probe(unit: u64) -> bool {
        unit % PROBE_EVERY == 0
    }

    /// Are units filling up, by the recent probes? `None`: no verdict yet.
    fn verdict(&self) -> Option<bool> {
        if self.share.warm() {
            Some(self.share.value > FILLING)
        } else if self.early_firsts >= EARLY_PROBES {
            let (num, den) = EARLY_FILLING;
            Some(self.early_seconds * den > self.early_firsts * num)
        } else {
            None
        }
    }

    #[cfg(test)]
    fn filling(&self) -> bool {
        self.verdict() == Some(true)
    }

    /// Unit `unit` has its first write now: what to do with the rest of it.
    pub(super) fn first_write(&mut self, unit: u64, now: Instant) -> FirstWrite {
        let before = self.verdict();
        let r = self.first_write_unlogged(unit, now);
        self.log_change(before);
        r
    }

    fn first_write_unlogged(&mut self, unit: u64, now: Instant) -> FirstWrite {
        self.observe_until(now);
        if Self::is_probe(unit) {
            if self.pending.len() == PENDING_MAX {
                self.observe_front();
            }
            self.slots[Self::slot(unit)] = Some((unit, self.pushed));
            self.pending.push_back(Pending {
                first: now,
                second: None,
            });
            self.pushed += 1;
            if !self.share.warm() {
                self.early_firsts += 1;
            }
            return FirstWrite::LeaveUnwritten;
        }
        match self.verdict() {
            Some(true) => FirstWrite::ZeroFill,
            // Only the window's verdict is sure enough to convert: a unit that turns out to
            // fill up would have every later write allocate in the host.
            Some(false) if self.share.warm() => FirstWrite::ConvertHoles,
            _ => FirstWrite::LeaveUnwritten,
        }
    }

    /// Unit `unit`, written before, has another allocating write now. Returns whether the rest
    /// of the unit is to be zero-filled (units are filling up) rather than converted where it
    /// reads as zeroes.
    pub(super) fn later_write(&mut self, unit: u64, now: Instant) -> bool {
        let before = self.verdict();
        if let Some((u, n)) = self.slots[Self::slot(unit)] {
            if u == unit && n >= self.popped {
                let p = &mut self.pending[(n - self.popped) as usize];
                if p.second.is_none() && !self.share.warm() {
                    self.early_seconds += 1;
                }
                p.second.get_or_insert(now);
            }
        }
        self.observe_until(now);
        self.log_change(before);
        self.verdict() == Some(true)
    }

    fn slot(unit: u64) -> usize {
        (unit / PROBE_EVERY) as usize % SLOTS
    }

    /// For `RUST_LOG=…unit_pace=debug`: the verdict, when it is not `before` any more.
    fn log_change(&self, before: Option<bool>) {
        let after = self.verdict();
        if after != before {
            log::debug!(
                "allocation units {} (probes written again within {:?}: {}/1024 of {} \
                 observed; before that: {} of {} probes written again)",
                match after {
                    Some(true) => "filling up: zero-fill at the first write",
                    _ => "not filling up: convert holes at the first write",
                },
                FILL_WINDOW,
                self.share.value,
                self.share.seen,
                self.early_seconds,
                self.early_firsts
            );
        }
    }

    /// Observes every probe whose window has passed by `now`.
    fn observe_until(&mut self, now: Instant) {
        while self
            .pending
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.first) >= FILL_WINDOW)
        {
            self.observe_front();
        }
    }

    /// Takes the oldest pending probe and observes it (before its window has passed only if
    /// `pending` overflowed).
    fn observe_front(&mut self) {
        let Some(p) = self.pending.pop_front() else {
            return;
        };
        self.popped += 1;
        self.share.observe(
            p.second
                .is_some_and(|s| s.saturating_duration_since(p.first) < FILL_WINDOW),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probes `0..n` first-written at `t`, each written again `gap` later (never, if `None`).
    fn probes(p: &mut UnitPace, from: u64, n: u64, t: Instant, gap: Option<Duration>) {
        for k in from..from + n {
            assert_eq!(
                p.first_write(k * PROBE_EVERY, t),
                FirstWrite::LeaveUnwritten
            );
        }
        if let Some(g) = gap {
            for k in from..from + n {
                p.later_write(k * PROBE_EVERY, t + g);
            }
        }
    }

    #[test]
    fn no_verdict_leaves_units_unwritten_and_early_counts_decide_a_dense_start() {
        let mut p = UnitPace::default();
        let t0 = Instant::now();
        assert_eq!(p.first_write(1, t0), FirstWrite::LeaveUnwritten);
        assert!(
            !p.later_write(1, t0),
            "no verdict: convert, write no zeroes"
        );
        probes(&mut p, 0, u64::from(EARLY_PROBES), t0, None);
        // Counted, not filling up; but only the window's verdict converts.
        assert_eq!(p.verdict(), Some(false));
        assert_eq!(p.first_write(3, t0), FirstWrite::LeaveUnwritten);
        // More than an eighth of them written again: filling up, long before any window.
        let soon = t0 + Duration::from_millis(10);
        for k in 0..=u64::from(EARLY_PROBES) / 8 {
            p.later_write(k * PROBE_EVERY, soon);
        }
        assert_eq!(p.first_write(5, soon), FirstWrite::ZeroFill);
        assert!(!p.share.warm(), "decided before the window");
    }

    #[test]
    fn second_writes_after_the_window_do_not_count_as_filling_up() {
        let mut p = UnitPace::default();
        let t0 = Instant::now();
        probes(&mut p, 0, 100, t0, None);
        for k in [0, 40, 80] {
            p.later_write(k * PROBE_EVERY, t0 + FILL_WINDOW / 10);
        }
        assert_eq!(p.verdict(), Some(false));
        assert_eq!(
            p.first_write(5, t0 + FILL_WINDOW / 10),
            FirstWrite::LeaveUnwritten
        );
        // Most probes written again, but late: observed at their window as not filling up.
        for k in 1..60 {
            p.later_write(k * PROBE_EVERY, t0 + FILL_WINDOW * 2);
        }
        assert!(p.share.warm());
        assert_eq!(
            p.first_write(7, t0 + FILL_WINDOW * 2),
            FirstWrite::ConvertHoles
        );
    }

    #[test]
    fn the_share_follows_the_workload_after_the_warm_up() {
        let mut p = UnitPace::default();
        let mut t = Instant::now();
        let mut from = 0;
        // Dense: every probe written again soon.
        while !p.filling() || !p.share.warm() {
            probes(&mut p, from, 4, t, Some(Duration::from_millis(10)));
            from += 4;
            t += FILL_WINDOW;
            assert!(from < 400, "never filling");
        }
        assert_eq!(p.first_write(3, t), FirstWrite::ZeroFill);
        assert!(p.later_write(3, t), "zero-fill while filling up");
        // Then sparse: no probe written again; the moving average comes down.
        let mut n = 0;
        while p.filling() {
            probes(&mut p, from, 1, t, None);
            from += 1;
            t += FILL_WINDOW;
            n += 1;
            assert!(n < 100, "never sparse again");
        }
        assert!(n >= 8, "one observation does not decide ({n})");
        assert_eq!(p.first_write(5, t + FILL_WINDOW), FirstWrite::ConvertHoles);
    }

    #[test]
    fn a_probe_written_again_late_counts_as_sparse_and_the_queue_is_bounded() {
        let mut p = UnitPace::default();
        let t0 = Instant::now();
        probes(&mut p, 0, u64::from(WARMUP), t0, Some(FILL_WINDOW * 2));
        assert_eq!(p.verdict(), Some(false));
        assert!(p.pending.is_empty());
        // More probes than the queue holds, all at once: the oldest are observed early.
        probes(&mut p, 100, PENDING_MAX as u64 + 10, t0, None);
        assert_eq!(p.pending.len(), PENDING_MAX);
        assert_eq!(p.popped, u64::from(WARMUP) + 10);
    }
}
