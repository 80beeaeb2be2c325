//! Rates and percentiles: pure maths over counters and log2 histograms.

use std::time::Duration;

use overkvm_common::{LAT_BUCKETS, bucket_lower_ns, bucket_upper_ns};

use crate::sample::Histogram;

/// Events per second over an interval; 0 for an empty interval.
pub fn rate(count: u64, interval: Duration) -> f64 {
    let secs = interval.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        count as f64 / secs
    }
}

/// Mean latency in microseconds, exact (the kernel keeps the sum), or None without completions.
pub fn mean_us(h: &Histogram) -> Option<f64> {
    let n = h.count();
    (n > 0).then(|| h.sum_ns() as f64 / n as f64 / 1000.0)
}

/// The `q` quantile (0 < q <= 1) in microseconds, interpolated linearly inside its log2 bucket
/// (as Prometheus' `histogram_quantile` does), so it is within a factor of two of the truth.
/// In the open-ended last bucket (over 2^39 ns, ~9 minutes) it is that bucket's lower bound.
pub fn quantile_us(h: &Histogram, q: f64) -> Option<f64> {
    let total = h.count();
    if total == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0);
    let mut seen = 0u64;
    for (i, &count) in h.counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if (seen + count) as f64 >= rank {
            let i = i as u32;
            let lo = bucket_lower_ns(i) as f64;
            if i + 1 >= LAT_BUCKETS {
                return Some(lo / 1000.0);
            }
            let hi = bucket_upper_ns(i) as f64;
            let frac = (rank - seen as f64) / count as f64;
            return Some((lo + (hi - lo) * frac) / 1000.0);
        }
        seen += count;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(samples_ns: &[u64]) -> Histogram {
        let mut h = Histogram::default();
        for &s in samples_ns {
            h.record(s, 1);
        }
        h
    }

    #[test]
    fn rate_per_second() {
        assert_eq!(rate(500, Duration::from_millis(500)), 1000.0);
        assert_eq!(rate(5, Duration::ZERO), 0.0);
    }

    #[test]
    fn mean_is_exact() {
        let h = hist(&[1000, 3000, 5000]);
        assert_eq!(mean_us(&h), Some(3.0));
        assert_eq!(mean_us(&Histogram::default()), None);
    }

    #[test]
    fn quantile_lands_in_the_right_bucket() {
        // 99 fast I/Os around 100 us, one slow at 10 ms: p99 stays fast, p100 is slow.
        let mut samples = vec![100_000u64; 99];
        samples.push(10_000_000);
        let h = hist(&samples);
        let p99 = quantile_us(&h, 0.99).unwrap();
        assert!((65.0..=131.1).contains(&p99), "p99 {p99}");
        let p100 = quantile_us(&h, 1.0).unwrap();
        assert!((8388.0..=16777.3).contains(&p100), "max {p100}");
        assert!(quantile_us(&Histogram::default(), 0.5).is_none());
    }

    #[test]
    fn quantile_of_open_ended_bucket_is_its_lower_bound() {
        let mut h = Histogram::default();
        h.record(4_000_000_000_000, 2);
        assert_eq!(
            quantile_us(&h, 0.99),
            Some(bucket_lower_ns(LAT_BUCKETS - 1) as f64 / 1000.0)
        );
        assert_eq!(mean_us(&h), Some(4_000_000_000.0), "the mean stays exact");
    }
}
