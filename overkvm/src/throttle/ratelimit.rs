//! Rate limiting of the throttle's log lines. Every decision is logged at the default level,
//! but a device whose load flaps around its budget makes a decision every tick: a token bucket
//! per subject (a VM on a device, a device) lets a burst through, then about one line per
//! `interval`, and the next line that gets through says how many were held back. Pure: time
//! is passed in.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// What to do with one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines of the same subject were held back since the last one.
    Log { suppressed: u64 },
    /// Hold it back (counted, reported with the next line that gets through).
    Suppress,
}

impl Verdict {
    /// The suffix a logged line carries when lines were held back before it.
    pub fn suffix(self) -> String {
        match self {
            Verdict::Log { suppressed: 0 } | Verdict::Suppress => String::new(),
            Verdict::Log { suppressed } => {
                format!(" ({suppressed} similar line(s) held back)")
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

/// Token buckets by subject.
#[derive(Debug)]
pub struct LogLimiter {
    burst: f64,
    interval: Duration,
    max_subjects: usize,
    buckets: HashMap<String, Bucket>,
}

impl Default for LogLimiter {
    /// Five lines at once, then one per 30 s per subject; at most 4096 subjects remembered.
    fn default() -> Self {
        LogLimiter::new(5, Duration::from_secs(30), 4096)
    }
}

impl LogLimiter {
    /// `burst` lines at once per subject, then one per `interval`. At most `max_subjects`
    /// buckets are kept (full ones are forgotten first), so months of VM churn stay bounded.
    pub fn new(burst: u32, interval: Duration, max_subjects: usize) -> LogLimiter {
        LogLimiter {
            burst: f64::from(burst.max(1)),
            interval: interval.max(Duration::from_millis(1)),
            max_subjects: max_subjects.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether a line about `subject` at `now` is logged.
    pub fn admit(&mut self, subject: &str, now: Instant) -> Verdict {
        if !self.buckets.contains_key(subject) && self.buckets.len() >= self.max_subjects {
            self.prune(now);
        }
        let (burst, interval) = (self.burst, self.interval.as_secs_f64());
        let b = self.buckets.entry(subject.to_string()).or_insert(Bucket {
            tokens: burst,
            last: now,
            suppressed: 0,
        });
        // A clock that went backwards (a caller's mistake) refills nothing.
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed / interval).min(burst);
        b.last = now.max(b.last);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Verdict::Log {
                suppressed: std::mem::take(&mut b.suppressed),
            }
        } else {
            b.suppressed = b.suppressed.saturating_add(1);
            Verdict::Suppress
        }
    }

    /// Number of subjects remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Forgets subjects whose bucket has refilled and holds nothing back (they would start
    /// afresh anyway); if none has, forgets all: an unbounded map is worse than a lost count.
    fn prune(&mut self, now: Instant) {
        let (burst, interval) = (self.burst, self.interval.as_secs_f64());
        self.buckets.retain(|_, b| {
            let tokens = b.tokens + now.saturating_duration_since(b.last).as_secs_f64() / interval;
            b.suppressed > 0 || tokens < burst
        });
        if self.buckets.len() >= self.max_subjects {
            self.buckets.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_burst_passes_then_one_line_per_interval_with_the_held_back_count() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(3, Duration::from_secs(10), 100);
        for i in 0..3 {
            assert_eq!(l.admit("vm", at(t0, i)), Verdict::Log { suppressed: 0 });
        }
        // A flapping subject deciding every second for 25 s: nothing until a token is back.
        let mut logged = 0;
        let mut last = Verdict::Suppress;
        for s in 1..=25 {
            let v = l.admit("vm", at(t0, s * 1000));
            if v != Verdict::Suppress {
                logged += 1;
                last = v;
            }
        }
        assert_eq!(logged, 2, "one line per 10 s after the burst");
        assert_eq!(last, Verdict::Log { suppressed: 9 });
        assert_eq!(last.suffix(), " (9 similar line(s) held back)");
        assert_eq!(Verdict::Log { suppressed: 0 }.suffix(), "");
    }

    #[test]
    fn subjects_are_independent() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(1, Duration::from_secs(60), 100);
        assert_eq!(l.admit("a", t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.admit("a", t0), Verdict::Suppress);
        assert_eq!(l.admit("b", t0), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn a_quiet_subject_gets_its_whole_burst_back_but_no_more() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(1), 100);
        assert!(matches!(l.admit("a", t0), Verdict::Log { .. }));
        assert!(matches!(l.admit("a", t0), Verdict::Log { .. }));
        assert_eq!(l.admit("a", t0), Verdict::Suppress);
        let later = at(t0, 3_600_000);
        assert_eq!(l.admit("a", later), Verdict::Log { suppressed: 1 });
        assert_eq!(l.admit("a", later), Verdict::Log { suppressed: 0 });
        assert_eq!(l.admit("a", later), Verdict::Suppress);
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut l = LogLimiter::new(1, Duration::from_secs(1), 100);
        assert!(matches!(l.admit("a", t0), Verdict::Log { .. }));
        assert_eq!(
            l.admit("a", t0 - Duration::from_secs(50)),
            Verdict::Suppress
        );
        assert_eq!(l.admit("a", t0), Verdict::Suppress);
    }

    #[test]
    fn the_number_of_subjects_stays_bounded() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(1, Duration::from_secs(1), 50);
        for i in 0..10_000u64 {
            let _ = l.admit(&format!("vm{i}"), at(t0, i));
            assert!(l.len() <= 50, "{}", l.len());
        }
        // A subject that is holding lines back survives pruning while others can go.
        let mut l = LogLimiter::new(1, Duration::from_secs(1), 3);
        let _ = l.admit("noisy", t0);
        assert_eq!(l.admit("noisy", t0), Verdict::Suppress);
        let _ = l.admit("q1", t0);
        let _ = l.admit("q2", t0);
        // q1 and q2 have refilled by then and are forgotten to make room.
        let _ = l.admit("q3", at(t0, 2000));
        assert_eq!(l.len(), 2);
        assert_eq!(
            l.admit("noisy", at(t0, 2000)),
            Verdict::Log { suppressed: 1 }
        );
    }
}
