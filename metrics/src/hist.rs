//! A lock-free latency histogram with fixed power-of-two buckets (1 µs … ~34 s): recording is
//! three relaxed atomic adds, and the same buckets serve the Prometheus histogram and the
//! p50/p99 that `offload status` prints.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Number of finite buckets: upper bounds 2^0 … 2^25 µs.
const N: usize = 26;

/// The finite bucket upper bounds in seconds (1 µs, 2 µs, 4 µs, … ~33.6 s); one more bucket
/// (+Inf) catches the rest.
pub const BUCKETS_SECONDS: [f64; N] = {
    let mut b = [0.0; N];
    let mut i = 0;
    while i < N {
        b[i] = (1u64 << i) as f64 * 1e-6;
        i += 1;
    }
    b
};

/// Latency histogram (see the module docs).
#[derive(Debug)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; N + 1],
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        // Bucket i holds (2^(i-1), 2^i] µs; bucket 0 holds [0, 1] µs.
        let us = ns.div_ceil(1000);
        let i = if us <= 1 {
            0
        } else {
            (64 - (us - 1).leading_zeros()) as usize
        };
        self.buckets[i.min(N)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The counts at this moment.
    pub fn snapshot(&self) -> HistSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistSnapshot {
            count: counts.iter().sum(),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            max_seconds: self.max_ns.load(Ordering::Relaxed) as f64 / 1e9,
            counts,
        }
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistSnapshot {
    /// Observations.
    pub count: u64,
    /// Sum of all observations (seconds).
    pub sum_seconds: f64,
    /// Largest observation (seconds).
    pub max_seconds: f64,
    /// Per-bucket counts, bucket i ≤ [`BUCKETS_SECONDS`]`[i]`, the last one +Inf.
    pub counts: Vec<u64>,
}

impl HistSnapshot {
    /// Per-bucket `(upper bound, count)` pairs, not cumulative, the last bound `f64::MAX` for
    /// +Inf: what `prometheus-client`'s histogram encoder takes (it accumulates them).
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        BUCKETS_SECONDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.counts.iter().copied())
            .collect()
    }

    /// The `q` quantile (0..=1) in seconds, linearly interpolated within its bucket and never
    /// above the largest observation; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).max(1.0);
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { BUCKETS_SECONDS[i - 1] };
                let hi = BUCKETS_SECONDS.get(i).copied().unwrap_or(self.max_seconds);
                let frac = (rank - below as f64) / c as f64;
                return Some((lo + frac * (hi - lo)).min(self.max_seconds));
            }
            below += c;
        }
        Some(self.max_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.observe(Duration::from_micros(100)); // (64, 128] µs: bucket 7
        }
        h.observe(Duration::from_millis(10)); // (8192, 16384] µs: bucket 14
        h.observe(Duration::from_millis(10));
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.counts[7], 98);
        assert_eq!(s.counts[14], 2);
        let p50 = s.quantile(0.5).unwrap();
        assert!((64e-6..=128e-6).contains(&p50), "{p50}");
        let p99 = s.quantile(0.99).unwrap();
        assert!((8.192e-3..=10e-3).contains(&p99), "{p99}");
        assert_eq!(s.buckets().iter().map(|c| c.1).sum::<u64>(), 100);
        assert_eq!(s.buckets().len(), N + 1);
        h.observe(Duration::from_secs(100)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.counts[N], 1);
        assert_eq!(s.quantile(1.0), Some(100.0));
        assert!(HistSnapshot::default().quantile(0.5).is_none());
        // 0 and exactly 1 µs land in the first bucket, 1.001 µs in the second.
        let h = Histogram::default();
        h.observe(Duration::ZERO);
        h.observe(Duration::from_micros(1));
        h.observe(Duration::from_nanos(1001));
        let s = h.snapshot();
        assert_eq!((s.counts[0], s.counts[1]), (2, 1));
    }
}
