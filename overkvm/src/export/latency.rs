//! How the kernel's log2 latency buckets become exported histogram buckets.
//!
//! Pure: a cumulative [`LatencyTotals`] in, buckets out. The kernel counts a latency of `ns`
//! in bucket `i` when `2^i <= ns < 2^(i+1)` (bucket 0 also holds 0). Every exported bound is a
//! power of two in ns, so each exported bucket is an exact sum of whole kernel buckets:
//! nothing is interpolated or guessed. The one rounding is at the edge itself: a bound
//! `le = 2^e ns` holds latencies `< 2^e` ns (the kernel's buckets are closed below), where
//! Prometheus reads `<=`; it differs for a latency of exactly `2^e` ns only.
//!
//! Sums and counts come from the kernel's exact sum and the bucket total, never from bounds.

use overkvm_common::LAT_BUCKETS;

use super::totals::LatencyTotals;

/// Which buckets the classic (text) histograms carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatencyBuckets {
    /// Four bounds (65.5 µs, 1.05 ms, 16.8 ms, 268 ms) plus `+Inf`: a VM doing reads and
    /// writes on one device stays within 20 series.
    #[default]
    Compact,
    /// Every kernel bucket from 1.024 µs to 34.4 s (26 bounds plus `+Inf`).
    Full,
}

impl crate::choice::Choice for LatencyBuckets {
    const VALUES: &'static [LatencyBuckets] = &[LatencyBuckets::Compact, LatencyBuckets::Full];

    fn name(self) -> &'static str {
        match self {
            LatencyBuckets::Compact => "compact",
            LatencyBuckets::Full => "full",
        }
    }

    fn help(self) -> &'static str {
        match self {
            LatencyBuckets::Compact => {
                "Four bounds (65.5 µs, 1.05 ms, 16.8 ms, 268 ms) plus `+Inf`: a VM doing reads and \
                 writes on one device stays within 20 series"
            }
            LatencyBuckets::Full => {
                "Every kernel bucket from 1.024 µs to 34.4 s (26 bounds plus `+Inf`)"
            }
        }
    }
}

/// Compact bounds, as exponents `e` of `2^e` ns. Four bounds are what the series budget
/// leaves: 20 series for a VM doing reads and writes on one device, less `vm_info`, two
/// operation and two byte counters, leave 15, so each direction's histogram gets
/// 4 bounds + `+Inf` + `_sum` + `_count` = 7. Spaced by 16x, they split what operators tell
/// apart on virtual disks:
/// - 2^16 ns = 65.5 µs: local NVMe/flash answering at device speed (4 KiB reads take 10-100 µs);
/// - 2^20 ns = 1.05 ms: SSDs under load and fast network block storage stay below a millisecond;
/// - 2^24 ns = 16.8 ms: network/distributed storage (Ceph RBD, iSCSI) and disk seeks (5-15 ms);
/// - 2^28 ns = 268 ms: queueing and congestion; above it (`+Inf`) are stalls and timeouts.
///
/// The exact `_sum` and `_count` still give the mean of every range.
pub const COMPACT_EDGES: [u32; 4] = [16, 20, 24, 28];

/// Full bounds: 2^10 ns (1.024 µs) to 2^35 ns (34.4 s), one per kernel bucket in between.
const FULL_EDGES: [u32; 26] = {
    let mut e = [0u32; 26];
    let mut i = 0;
    while i < 26 {
        e[i] = 10 + i as u32;
        i += 1;
    }
    e
};

impl LatencyBuckets {
    /// The exported bounds, as exponents of `2^e` ns, ascending.
    pub fn edges(self) -> &'static [u32] {
        match self {
            LatencyBuckets::Compact => &COMPACT_EDGES,
            LatencyBuckets::Full => &FULL_EDGES,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LatencyBuckets::Compact => "compact",
            LatencyBuckets::Full => "full",
        }
    }
}

/// Classic buckets in seconds: `(le, count in this bucket only)`, the last one `+Inf`.
pub fn classic(h: &LatencyTotals, edges: &[u32]) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(edges.len() + 1);
    let mut from = 0usize;
    for &e in edges {
        // Kernel buckets below 2^e ns are 0..e (bucket i ends at 2^(i+1)).
        let to = (e as usize).min(LAT_BUCKETS as usize);
        let n = h.buckets[from.min(to)..to].iter().sum();
        out.push(((1u64 << e) as f64 / 1e9, n));
        from = to;
    }
    let rest = h.buckets[from.min(LAT_BUCKETS as usize)..].iter().sum();
    out.push((f64::INFINITY, rest));
    out
}

/// A native (exponential) histogram of the kernel's buckets, schema 0 (each bucket twice the
/// one below).
///
/// Native bucket `j` of schema 0 holds `(2^(j-1), 2^j]` seconds. The kernel's bounds are
/// powers of two in *nanoseconds*, and 10^-9 s is no power of two, so no schema lines up with
/// them exactly; kernel bucket `k` (`[2^k, 2^(k+1))` ns) is reported as native bucket
/// `k - 29`, `(2^(k-30), 2^(k-29)]` s = `(0.931 * 2^k, 1.863 * 2^k]` ns: the same buckets with
/// bounds 6.9% lower (10^9 / 2^30 = 0.931). Counts are never split between buckets. Kernel
/// bucket 0 (under 2 ns) is the zero bucket, of threshold 2^-29 s (1.86 ns).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Native {
    pub zero_threshold: f64,
    pub zero_count: u64,
    /// `(offset, length)` spans of the positive buckets, as the protobuf format has them.
    pub spans: Vec<(i32, u32)>,
    /// Each populated positive bucket's count minus the previous one's.
    pub deltas: Vec<i64>,
}

/// Schema of [`native`]: base 2.
pub const NATIVE_SCHEMA: i32 = 0;

/// Native index of kernel bucket `k`: `k - NATIVE_OFFSET`.
const NATIVE_OFFSET: i32 = 29;

pub fn native(h: &LatencyTotals) -> Native {
    let mut n = Native {
        zero_threshold: 2f64.powi(-NATIVE_OFFSET),
        zero_count: h.buckets[0],
        ..Native::default()
    };
    let mut prev: i64 = 0;
    // The index after the last bucket written, to know the gap before the next one.
    let mut next: Option<i32> = None;
    for (k, &c) in h.buckets.iter().enumerate().skip(1) {
        if c == 0 {
            continue;
        }
        let idx = k as i32 - NATIVE_OFFSET;
        match (next, n.spans.last_mut()) {
            (Some(at), Some(span)) if at == idx => span.1 += 1,
            (Some(at), _) => n.spans.push((idx - at, 1)),
            (None, _) => n.spans.push((idx, 1)),
        }
        let c = c as i64;
        n.deltas.push(c - prev);
        prev = c;
        next = Some(idx + 1);
    }
    n
}

#[cfg(test)]
mod tests {
    use overkvm_common::{bucket_lower_ns, bucket_upper_ns, lat_bucket};

    use super::*;

    fn totals(latencies_ns: &[u64]) -> LatencyTotals {
        let mut t = LatencyTotals::default();
        for &ns in latencies_ns {
            t.buckets[lat_bucket(ns) as usize] += 1;
            t.sum_ns += u128::from(ns);
        }
        t
    }

    /// Each exported bucket holds exactly the latencies between its bounds, for latencies
    /// right at, just below and just above every bound.
    #[test]
    fn classic_buckets_count_exactly_what_lies_below_each_bound() {
        for mode in [LatencyBuckets::Compact, LatencyBuckets::Full] {
            let edges = mode.edges();
            let mut samples = vec![0, 1, 5, u64::MAX / 2];
            for &e in edges {
                let b = 1u64 << e;
                samples.extend([b - 1, b, b + 1]);
            }
            let h = totals(&samples);
            let buckets = classic(&h, edges);
            assert_eq!(buckets.len(), edges.len() + 1, "{mode:?}");
            assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), h.count());
            let mut lower = 0u64;
            for (i, (le, n)) in buckets.iter().enumerate() {
                let upper = edges.get(i).map_or(u64::MAX, |&e| 1u64 << e);
                let want = samples
                    .iter()
                    .filter(|&&s| s >= lower && (s < upper || upper == u64::MAX))
                    .count() as u64;
                assert_eq!(*n, want, "{mode:?} bucket {i} [{lower}, {upper}) ns");
                if upper != u64::MAX {
                    assert_eq!(*le, upper as f64 / 1e9);
                } else {
                    assert_eq!(*le, f64::INFINITY);
                }
                lower = upper;
            }
        }
    }

    #[test]
    fn bounds_are_kernel_bucket_edges() {
        for mode in [LatencyBuckets::Compact, LatencyBuckets::Full] {
            for &e in mode.edges() {
                // 2^e ns is where kernel bucket e starts and e-1 ends: no bucket is split.
                assert_eq!(bucket_lower_ns(e), 1u64 << e);
                assert_eq!(bucket_upper_ns(e - 1), 1u64 << e);
            }
            assert!(mode.edges().windows(2).all(|w| w[0] < w[1]));
        }
        assert_eq!(LatencyBuckets::Full.edges().len(), 26);
        assert_eq!(
            classic(&LatencyTotals::default(), LatencyBuckets::Compact.edges())
                .iter()
                .map(|b| b.0)
                .collect::<Vec<_>>(),
            [
                0.000065536,
                0.001048576,
                0.016777216,
                0.268435456,
                f64::INFINITY
            ]
        );
    }

    /// Decodes spans and deltas back into (native index, count).
    fn expand(n: &Native) -> Vec<(i32, u64)> {
        let mut out = Vec::new();
        let mut idx = 0;
        let mut count: i64 = 0;
        let mut d = n.deltas.iter();
        for (offset, len) in &n.spans {
            idx += offset;
            for _ in 0..*len {
                count += d.next().copied().unwrap_or(0);
                out.push((idx, count as u64));
                idx += 1;
            }
        }
        out
    }

    #[test]
    fn native_buckets_are_the_kernel_buckets_with_each_count_in_one_bucket() {
        // 3 µs (bucket 11), twice 1.5 ms (bucket 20), 100 ms (bucket 26), 0 ns (zero bucket).
        let h = totals(&[3_000, 1_500_000, 1_600_000, 100_000_000, 0]);
        let n = native(&h);
        assert_eq!(n.zero_count, 1);
        assert_eq!(expand(&n), [(11 - 29, 1), (20 - 29, 2), (26 - 29, 1)]);
        assert_eq!(n.spans, [(-18, 1), (8, 1), (5, 1)]);
        for (idx, _) in expand(&n) {
            // The kernel bucket k = idx + 29 is [2^k, 2^(k+1)) ns; the native bucket
            // (2^(idx-1), 2^idx] s is the same range scaled by 10^9/2^30.
            let k = (idx + 29) as u32;
            let hi = 2f64.powi(idx);
            let scale = 1e9 / 2f64.powi(30);
            assert!((hi * 1e9 / (bucket_upper_ns(k) as f64) - scale).abs() < 1e-12);
        }
        // Adjacent buckets share one span.
        let n = native(&totals(&[3_000, 5_000, 9_000]));
        assert_eq!(n.spans, [(-18, 3)]);
        assert_eq!(expand(&n), [(-18, 1), (-17, 1), (-16, 1)]);
        assert_eq!(n.deltas, [1, 0, 0]);
        assert_eq!(native(&LatencyTotals::default()).spans, []);
    }
}
