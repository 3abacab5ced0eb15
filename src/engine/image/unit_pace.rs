//! How fast allocation units fill up, learnt from a sample of them: what an allocating write
//! does with the rest of its unit where the backing holds holes.
//!
//! Two ways to treat the unwritten rest of a unit whose host blocks are holes (a sparse image
//! file), measured in `docs/performance.md` (session 12):
//! - **convert it as it is**: nothing written, the unit is one written extent at once, and each
//!   later write into it allocates in the host filesystem (an O_DIRECT write into a hole goes
//!   through io_uring's worker threads and the host's journal). Best where units get few
//!   writes: scattered first writes over a large disk.
//! - **leave it unwritten, then zero-fill it at the unit's second write**: one host allocation
//!   for the whole rest (60 KiB of zeroes at the default unit), after which the unit's writes
//!   are overwrites of allocated host blocks. Best where units fill up: a dense fill.
//!
//! Which pays depends on how many writes a unit gets soon, which the past of other units
//! predicts: every [`PROBE_EVERY`]th unit is a probe that always takes the second way, and the
//! time between a probe's first and second write says whether units are filling up (within
//! [`FILL_WINDOW`]) or not. The share of recent probes that filled up decides for every unit.
//! A workload that never writes a probe twice is a sparse one, the starting assumption.
//!
//! The probes are remembered in a direct-mapped table. A probe whose entry is taken by another
//! after the window has passed counts as one that did not fill up (it got no second write in
//! time); one taken within the window is not counted (either could still have happened).
//! Counting only second writes would see only the probes that are written again before their
//! entry goes, the quick ones. On a disk with fewer probes than entries (under 8 GiB at the
//! default unit) nothing is taken, so after a dense phase the share falls only with late
//! second writes; that is cheap, as leaving the rest unwritten costs nothing until a unit's
//! second write.

use std::time::{Duration, Instant};

/// A unit whose second write comes within this time of its first one is filling up. A dense
/// random fill of a 1 GiB span at 64 KiB units and 80k writes a second gives each unit a
/// write every 0.2 s on average; scattered writes over 8 GiB at 50k a second, one every 2.6 s.
pub(super) const FILL_WINDOW: Duration = Duration::from_millis(500);

/// Units `0, PROBE_EVERY, 2 * PROBE_EVERY, …` are the probes.
pub(super) const PROBE_EVERY: u64 = 8;

/// Probes remembered at once.
const SLOTS: usize = 16384;

/// The share is kept in 1/1024ths; each observation moves it by 1/16 of the difference.
const ONE: u32 = 1024;
const SHIFT: u32 = 4;

pub(super) struct UnitPace {
    /// Probe unit and when its first write was allocated.
    first: Box<[Option<(u64, Instant)>]>,
    /// Of recently observed probes, the share whose second write came within the window
    /// (moving average, in 1/1024ths).
    filling_share: u32,
}

impl Default for UnitPace {
    fn default() -> Self {
        UnitPace {
            first: vec![None; SLOTS].into_boxed_slice(),
            filling_share: 0,
        }
    }
}

/// What a unit's first write does with the rest of the unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FirstWrite {
    /// Leave it unwritten: the second write zero-fills or converts it.
    LeaveUnwritten,
    /// Convert whatever of it reads as zeroes (holes) now.
    ConvertHoles,
}

impl UnitPace {
    pub(super) fn is_probe(unit: u64) -> bool {
        unit % PROBE_EVERY == 0
    }

    /// Are units filling up, by the recent probes?
    pub(super) fn filling(&self) -> bool {
        self.filling_share > ONE / 2
    }

    /// Unit `unit` has its first write now: what to do with the rest of it.
    pub(super) fn first_write(&mut self, unit: u64, now: Instant) -> FirstWrite {
        if Self::is_probe(unit) {
            let slot = Self::slot(unit);
            if let Some((u, t)) = self.first[slot] {
                if u != unit && now.saturating_duration_since(t) >= FILL_WINDOW {
                    self.observe(false);
                }
            }
            self.first[slot] = Some((unit, now));
            FirstWrite::LeaveUnwritten
        } else if self.filling() {
            FirstWrite::LeaveUnwritten
        } else {
            FirstWrite::ConvertHoles
        }
    }

    /// Unit `unit`, written before, has another allocating write now: a probe's first one is
    /// observed. Returns whether the rest of the unit is to be zero-filled (units are filling
    /// up) rather than converted where it reads as zeroes.
    pub(super) fn later_write(&mut self, unit: u64, now: Instant) -> bool {
        let slot = &mut self.first[Self::slot(unit)];
        if let Some((u, t)) = *slot {
            if u == unit {
                *slot = None;
                self.observe(now.saturating_duration_since(t) < FILL_WINDOW);
            }
        }
        self.filling()
    }

    fn slot(unit: u64) -> usize {
        (unit / PROBE_EVERY) as usize % SLOTS
    }

    /// One more probe seen filling up or not.
    fn observe(&mut self, filled: bool) {
        let target = if filled { ONE } else { 0 };
        let s = i64::from(self.filling_share);
        self.filling_share = (s + ((i64::from(target) - s) >> SHIFT)) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_that_fill_up_fast_make_every_unit_wait_for_its_zero_fill() {
        let mut p = UnitPace::default();
        let t0 = Instant::now();
        // Sparse at first: units other than probes convert their holes at once.
        assert_eq!(p.first_write(1, t0), FirstWrite::ConvertHoles);
        assert_eq!(p.first_write(0, t0), FirstWrite::LeaveUnwritten);
        // Probes written again soon: after enough of them, units are filling up.
        let soon = t0 + Duration::from_millis(100);
        let mut n = 0;
        while !p.filling() {
            let u = PROBE_EVERY * (n + 1);
            p.first_write(u, t0);
            p.later_write(u, soon);
            n += 1;
            assert!(n < 100, "never filling");
        }
        assert!(n >= 8, "one observation does not decide ({n})");
        assert_eq!(p.first_write(3, t0), FirstWrite::LeaveUnwritten);
        assert!(p.later_write(3, soon), "zero-fill while filling up");
        // A probe is observed once; a unit that is not one changes nothing.
        let share = p.filling_share;
        p.later_write(3, soon + FILL_WINDOW * 10);
        assert_eq!(p.filling_share, share);
        // Probes written again late: back to sparse.
        let late = t0 + FILL_WINDOW * 4;
        let mut n = 0;
        while p.filling() {
            let u = PROBE_EVERY * (1000 + n);
            p.first_write(u, t0);
            p.later_write(u, late);
            n += 1;
            assert!(n < 100, "never sparse again");
        }
        assert_eq!(p.first_write(5, late), FirstWrite::ConvertHoles);
    }

    #[test]
    fn a_probe_whose_entry_goes_after_the_window_counts_as_sparse() {
        let mut p = UnitPace::default();
        let t0 = Instant::now();
        let mut n = 0;
        while !p.filling() {
            let u = PROBE_EVERY * n;
            p.first_write(u, t0);
            p.later_write(u, t0);
            n += 1;
        }
        // Probes sharing one slot, each first-written a window after the one before and never
        // written again: each one taken counts as not filling up.
        let same_slot = PROBE_EVERY * SLOTS as u64;
        let mut t = t0;
        let mut k = 1;
        while p.filling() {
            t += FILL_WINDOW;
            p.first_write(same_slot * k, t);
            k += 1;
            assert!(k < 100, "entries taken never counted");
        }
        // Taken within the window: not counted.
        let share = p.filling_share;
        p.first_write(same_slot * (k + 1), t);
        assert_eq!(p.filling_share, share);
    }
}
