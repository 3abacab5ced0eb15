//! Per-queue request statistics for the control socket's `stats`: requests completed and their
//! latency, from the moment the queue thread took the chain off the ring to the moment its used
//! entry was published. Lock-free (relaxed atomics) like the counters: the cost on the hot path
//! is one clock read at dispatch, one at completion and two atomic adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Histogram buckets: bucket 0 holds latencies under 1 µs, bucket i (1 ≤ i < BUCKETS − 1)
/// those in [2^(i−1), 2^i) µs, the last one everything from 2^(BUCKETS−2) µs (about 67 s) up.
pub const BUCKETS: usize = 28;

/// A log2 latency histogram.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The bucket a latency of `us` microseconds falls in.
fn bucket(us: u64) -> usize {
    if us == 0 {
        0
    } else {
        ((64 - us.leading_zeros()) as usize).min(BUCKETS - 1)
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot { counts }
    }
}

/// A histogram read: `counts[i]` requests in bucket i (see [`BUCKETS`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
}

impl HistogramSnapshot {
    /// Upper bound, in µs, of bucket `i` (`None` for the last, open-ended one).
    pub fn upper_us(i: usize) -> Option<u64> {
        (i + 1 < BUCKETS).then(|| 1u64 << i)
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The latency, in µs, that `q` (0..=1) of the requests stay under, as a bucket bound: an
    /// upper estimate within a factor of two.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(Self::upper_us(i).unwrap_or(1u64 << (BUCKETS - 2)));
            }
        }
        None
    }

    /// The bucket-wise difference `self − earlier` (a later read minus an earlier one).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0)))
            .collect();
        HistogramSnapshot { counts }
    }
}

/// One queue's statistics.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests whose used entry was published.
    pub completed: AtomicU64,
    pub latency: LatencyHistogram,
}

impl QueueStats {
    pub fn record(&self, latency: Duration) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.latency.record(latency);
    }

    pub fn snapshot(&self, index: usize, inflight: usize) -> QueueStatsSnapshot {
        QueueStatsSnapshot {
            queue: index,
            completed: self.completed.load(Ordering::Relaxed),
            inflight: inflight as u64,
            latency_us: self.latency.snapshot(),
        }
    }
}

/// One queue's statistics as the control socket reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct QueueStatsSnapshot {
    pub queue: usize,
    pub completed: u64,
    pub inflight: u64,
    pub latency_us: HistogramSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_log2_buckets_and_quantiles_bound_them() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(2), 2);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(1000), 10);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        let h = LatencyHistogram::default();
        for us in [5u64, 6, 7, 100, 100_000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.total(), 5);
        assert_eq!(s.counts[3], 3); // 4..8 µs
        assert_eq!(s.quantile_us(0.5), Some(8));
        assert_eq!(s.quantile_us(0.8), Some(128));
        assert_eq!(s.quantile_us(1.0), Some(131_072));
        let later = {
            h.record(Duration::from_micros(6));
            h.snapshot()
        };
        assert_eq!(later.since(&s).total(), 1);
        assert_eq!(HistogramSnapshot::default().quantile_us(0.5), None);
    }
}
