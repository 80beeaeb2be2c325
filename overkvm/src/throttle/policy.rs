//! One tick of a device's IOPS control, where the two controllers meet: the latency
//! controller (`latency`) sets a window while a target is missed, and the budget controller
//! (`budget`) divides the tighter of it and the fixed budget among the guests.

use std::collections::BTreeMap;

use super::{
    budget::{Budget, Decision, DeviceController, GuestUse, Knobs},
    latency::{LatencyController, LatencyKnobs, LatencySample},
};

/// The IOPS budget in force: the configured one, tightened by the latency controller's window
/// while it is engaged (with per-direction budgets, the window replaces them when it is below
/// their sum: the latency target is about the device, not one direction).
pub fn effective_budget(fixed: Option<Budget>, window: Option<f64>) -> Option<Budget> {
    match (fixed, window) {
        (f, None) => f,
        (None, Some(w)) => Some(Budget::Total(w)),
        (Some(Budget::Total(b)), Some(w)) => Some(Budget::Total(b.min(w))),
        (Some(Budget::PerDirection { read, write }), Some(w)) => {
            let sum = read.unwrap_or(f64::INFINITY) + write.unwrap_or(f64::INFINITY);
            if w < sum {
                Some(Budget::Total(w))
            } else {
                Some(Budget::PerDirection { read, write })
            }
        }
    }
}

/// One tick of a device's IOPS control: the latency controller (when the device has a
/// target) sets the window, and the budget controller divides the tighter of it and the fixed
/// budget by weighted max-min shares and reservations. When neither holds, every limit goes.
pub fn step_iops(
    ctl: &mut DeviceController,
    latency: Option<(&mut LatencyController, f64, &LatencySample)>,
    fixed: Option<Budget>,
    guests: &BTreeMap<String, GuestUse>,
    background: (f64, f64),
    k: &Knobs,
    lk: &LatencyKnobs,
) -> Decision {
    let (window, congested) = match latency {
        Some((lc, target_us, s)) => (lc.step(target_us, s, lk), lc.congested),
        None => (None, false),
    };
    match effective_budget(fixed, window) {
        Some(b) if window.is_some() => {
            // The latency controller already waited its engage ticks: divide at once. Its
            // window moves by a few percent near the knee, where a few percent more is a
            // large rise in latency: a deadband of the usual width would not pass them.
            //
            // While the device misses its target, a guest running below its cap is held back
            // by the device, not short of demand: it still wants at least its cap, so it is
            // not mistaken for a quiet guest whose cap can be relaxed or dropped.
            let k = Knobs {
                engage_ticks: 1,
                deadband: k.deadband.min(0.01),
                saturated: if congested { 0.5 } else { k.saturated },
                learn_efficiency: k.learn_efficiency && !congested,
                hold_quiet_caps: true,
                ..k.clone()
            };
            ctl.step(b, guests, background, &k)
        }
        Some(b) => ctl.step(b, guests, background, k),
        None if ctl.engaged || !ctl.limits.is_empty() => Decision {
            clear: ctl.release_all(),
            ..Decision::default()
        },
        None => Decision::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_budget_takes_the_tighter() {
        assert_eq!(effective_budget(None, None), None);
        assert_eq!(
            effective_budget(Some(Budget::Total(900.0)), Some(500.0)),
            Some(Budget::Total(500.0))
        );
        assert_eq!(
            effective_budget(Some(Budget::Total(400.0)), Some(500.0)),
            Some(Budget::Total(400.0))
        );
        assert_eq!(effective_budget(None, Some(5.0)), Some(Budget::Total(5.0)));
        let pd = Budget::PerDirection {
            read: Some(100.0),
            write: None,
        };
        assert_eq!(
            effective_budget(Some(pd), Some(50.0)),
            Some(Budget::Total(50.0))
        );
        let both = Budget::PerDirection {
            read: Some(100.0),
            write: Some(100.0),
        };
        assert_eq!(effective_budget(Some(both), Some(500.0)), Some(both));
    }
}
