//! The throttling decision, as pure functions over plain data: measured demand per guest,
//! a device budget, weights and reservations in; per-guest limits out. No kernel, no files.
//!
//! Allocation is weighted max-min fair share (water filling) after reservations: guests that
//! want less than their share keep what they want and are not limited; only guests above their
//! share are capped; nobody is capped below the floor. The controller around it adds what keeps
//! a feedback loop on `io.max` stable: engage only after the budget has been exceeded for a few
//! ticks, tighten at once but relax by a bounded step, do not rewrite within a deadband (each
//! write restarts the kernel's throttle slice), and remove every limit after load stayed low.

use std::collections::BTreeMap;

/// One guest's claim on a budget channel (IOPS or bytes/s, total or one direction).
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    /// Estimated demand in units per second.
    pub demand: f64,
    pub weight: f64,
    /// Units per second given before anyone's share.
    pub reservation: f64,
}

/// Weighted max-min fair allocation of `capacity` over `claims`, reservations first.
///
/// Each claim gets `min(demand, reservation)` first (scaled down proportionally if the
/// reservations alone exceed the capacity); the rest is water-filled by weight: a level λ is
/// raised until Σ min(demand_i, r_i + w_i·λ) = capacity. Claims whose demand is met get exactly
/// their demand. Returns one allocation per claim, in order.
pub fn allocate(capacity: f64, claims: &[Claim]) -> Vec<f64> {
    let n = claims.len();
    let capacity = capacity.max(0.0);
    let demand: Vec<f64> = claims.iter().map(|c| c.demand.max(0.0)).collect();
    let reserve: Vec<f64> = claims
        .iter()
        .zip(&demand)
        .map(|(c, d)| c.reservation.max(0.0).min(*d))
        .collect();
    let reserved: f64 = reserve.iter().sum();
    if reserved >= capacity {
        let scale = if reserved > 0.0 {
            capacity / reserved
        } else {
            0.0
        };
        return reserve.iter().map(|r| r * scale).collect();
    }
    let mut alloc = reserve.clone();
    let mut left = capacity - reserved;
    let mut active: Vec<usize> = (0..n)
        .filter(|&i| demand[i] > alloc[i] && claims[i].weight > 0.0)
        .collect();
    // Each round either satisfies at least one claim or spends all that is left.
    while left > 1e-9 && !active.is_empty() {
        let wsum: f64 = active.iter().map(|&i| claims[i].weight).sum();
        let level = left / wsum;
        let mut satisfied = Vec::new();
        for &i in &active {
            let want = demand[i] - alloc[i];
            if want <= claims[i].weight * level {
                satisfied.push(i);
            }
        }
        if satisfied.is_empty() {
            for &i in &active {
                alloc[i] += claims[i].weight * level;
            }
            left = 0.0;
        } else {
            for &i in &satisfied {
                left -= demand[i] - alloc[i];
                alloc[i] = demand[i];
            }
            active.retain(|i| !satisfied.contains(i));
        }
    }
    alloc
}

/// Jain's fairness index of allocations (1 = perfectly equal).
pub fn jain_index(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let s: f64 = xs.iter().sum();
    let s2: f64 = xs.iter().map(|x| x * x).sum();
    if n == 0.0 || s2 == 0.0 {
        1.0
    } else {
        s * s / (n * s2)
    }
}

/// Knobs of the controller (defaults in `Default`).
#[derive(Clone, Debug, PartialEq)]
pub struct Knobs {
    pub engage_ticks: u32,
    pub engage_above: f64,
    pub release_below: f64,
    pub release_ticks: u32,
    pub floor: f64,
    pub deadband: f64,
    pub relax_step: f64,
    /// A capped guest running at ≥ this fraction of its cap is taken to want more.
    pub saturated: f64,
    /// How far above its cap a saturated guest's demand is assumed to be (probing up).
    pub probe: f64,
    /// Learn how much of its limit a capped guest really gets. Off while the device itself
    /// is the bottleneck (it would read the device's limit as the kernel's inefficiency).
    pub learn_efficiency: bool,
    /// Keep a quiet guest's cap instead of relaxing or dropping it. Under a latency window a
    /// dropped cap lets a guest that wakes up burst to the whole device, far past the target.
    pub hold_quiet_caps: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            engage_ticks: 2,
            engage_above: 1.0,
            release_below: 0.7,
            release_ticks: 10,
            floor: 20.0,
            deadband: 0.04,
            relax_step: 0.25,
            saturated: 0.9,
            probe: 1.5,
            learn_efficiency: true,
            hold_quiet_caps: false,
        }
    }
}

/// A guest on a device during one tick.
#[derive(Clone, Debug, PartialEq)]
pub struct GuestUse {
    pub read: f64,
    pub write: f64,
    pub weight: f64,
    pub reservation: f64,
    pub exempt: bool,
}

/// Limits for one guest on one device, per direction, in units per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DirLimits {
    pub read: u64,
    pub write: u64,
}

/// What the controller wants done this tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// Limits to write (new or changed), by guest.
    pub set: BTreeMap<String, DirLimits>,
    /// Guests whose limit must be removed.
    pub clear: Vec<String>,
    pub engaged: bool,
}

/// Whether the budget is on the total or per direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Total(f64),
    PerDirection {
        read: Option<f64>,
        write: Option<f64>,
    },
}

/// Controller state for one device and one unit (IOPS or bytes/s).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceController {
    over_ticks: u32,
    low_ticks: u32,
    pub engaged: bool,
    /// Limits in force, by guest.
    pub limits: BTreeMap<String, DirLimits>,
    /// What fraction of a limit a saturated guest really gets (the kernel's throttle slices
    /// deliver a little less than the limit): learned, and compensated in the allocation.
    efficiency: Option<f64>,
    efficiency_sums: (f64, f64),
    /// Consecutive ticks each capped guest has used less than its share.
    under_ticks: BTreeMap<String, u32>,
}

/// Ticks a capped guest must stay under its share before its cap is relaxed or dropped: one
/// quiet tick (blk-throttle catching up after a burst) is not a drop in demand.
const RELAX_AFTER_TICKS: u32 = 3;

fn round_limit(v: f64, floor: f64) -> u64 {
    v.max(floor).max(1.0).round() as u64
}

/// Outside the deadband: worth a write.
fn differs(old: u64, new: u64, deadband: f64) -> bool {
    let (o, n) = (old as f64, new as f64);
    (n - o).abs() > deadband * o.max(1.0)
}

/// What becomes of one guest's cap in a step.
enum CapChange {
    Set(DirLimits),
    Drop,
}

/// Whether use is over the budget (engage) and well under it (release).
fn over_and_low(budget: Budget, (used_r, used_w): (f64, f64), k: &Knobs) -> (bool, bool) {
    match budget {
        Budget::Total(b) => {
            let u = used_r + used_w;
            (u > k.engage_above * b, u < k.release_below * b)
        }
        Budget::PerDirection { read, write } => {
            let o = read.is_some_and(|b| used_r > k.engage_above * b)
                || write.is_some_and(|b| used_w > k.engage_above * b);
            let l = read.is_none_or(|b| used_r < k.release_below * b)
                && write.is_none_or(|b| used_w < k.release_below * b);
            (o, l)
        }
    }
}

/// A capped guest's next cap toward `new`: tightened at once, relaxed by at most `relax_step`
/// per tick. With a total budget the bound is on the total, so the read/write split can
/// follow the guest's mix at once without loosening the cap.
fn next_limit(budget: Budget, cur: DirLimits, new: DirLimits, k: &Knobs) -> DirLimits {
    if matches!(budget, Budget::Total(_)) {
        let cur_t = cur.read.saturating_add(cur.write) as f64;
        let new_t = new.read.saturating_add(new.write) as f64;
        let max_t = cur_t * (1.0 + k.relax_step);
        if new_t <= max_t {
            return new;
        }
        let scale = max_t / new_t;
        return DirLimits {
            read: round_limit(new.read as f64 * scale, k.floor),
            write: round_limit(new.write as f64 * scale, k.floor),
        };
    }
    let step = |c: u64, n: u64| -> u64 {
        if n <= c {
            n
        } else {
            n.min(((c as f64) * (1.0 + k.relax_step)).ceil() as u64)
        }
    };
    DirLimits {
        read: step(cur.read, new.read),
        write: step(cur.write, new.write),
    }
}

impl DeviceController {
    /// One control step. `background` is use by processes that cannot be limited (non-VM);
    /// it is subtracted from the budget before the guests share it.
    pub fn step(
        &mut self,
        budget: Budget,
        guests: &BTreeMap<String, GuestUse>,
        background: (f64, f64),
        k: &Knobs,
    ) -> Decision {
        let used = (
            guests.values().map(|g| g.read).sum::<f64>() + background.0,
            guests.values().map(|g| g.write).sum::<f64>() + background.1,
        );
        let (over, low) = over_and_low(budget, used, k);
        self.over_ticks = if over { self.over_ticks + 1 } else { 0 };
        self.low_ticks = if low { self.low_ticks + 1 } else { 0 };

        let mut decision = Decision::default();
        if !self.engaged {
            if self.over_ticks < k.engage_ticks {
                return decision;
            }
            self.engaged = true;
        } else if self.low_ticks >= k.release_ticks {
            self.engaged = false;
            decision.clear = std::mem::take(&mut self.limits).into_keys().collect();
            self.under_ticks.clear();
            return decision;
        }
        decision.engaged = true;
        if k.learn_efficiency {
            self.learn_efficiency(guests);
        }

        let targets = self.targets(budget, guests, background, k);
        // Guests gone from the device lose their limits. Under a latency window a guest
        // absent for a tick may only have been held back (a low limit, a throttle slice): its
        // limit stays until the window is released (a stopped VM's cgroup goes with it).
        if !k.hold_quiet_caps {
            let gone: Vec<String> = self
                .limits
                .keys()
                .filter(|g| !guests.contains_key(*g))
                .cloned()
                .collect();
            for g in gone {
                self.limits.remove(&g);
                decision.clear.push(g);
            }
        }
        for (name, want) in targets {
            let change = match (self.limits.get(&name).copied(), want) {
                (None, None) => continue,
                (Some(cur), None) => self.under_its_share(&name, cur, &guests[&name], k),
                (None, Some(new)) => {
                    self.under_ticks.remove(&name);
                    Some(CapChange::Set(new))
                }
                (Some(cur), Some(new)) => {
                    self.under_ticks.remove(&name);
                    let next = next_limit(budget, cur, new, k);
                    (differs(cur.read, next.read, k.deadband)
                        || differs(cur.write, next.write, k.deadband))
                    .then_some(CapChange::Set(next))
                }
            };
            match change {
                Some(CapChange::Drop) => {
                    self.limits.remove(&name);
                    decision.clear.push(name);
                }
                Some(CapChange::Set(l)) => {
                    self.limits.insert(name.clone(), l);
                    decision.set.insert(name, l);
                }
                None => {}
            }
        }
        decision
    }

    /// A capped guest now under its share. After a few such ticks: far above its use, its
    /// cap goes; otherwise it grows by the relax step (cut fast, relax slowly). None: no
    /// change yet.
    fn under_its_share(
        &mut self,
        name: &str,
        cur: DirLimits,
        g: &GuestUse,
        k: &Knobs,
    ) -> Option<CapChange> {
        let under = self.under_ticks.entry(name.to_string()).or_insert(0);
        *under += 1;
        if *under < RELAX_AFTER_TICKS || k.hold_quiet_caps {
            return None;
        }
        let used = g.read + g.write;
        if (cur.read.saturating_add(cur.write)) as f64 >= 2.0 * used.max(k.floor) {
            return Some(CapChange::Drop);
        }
        let grow = |c: u64| ((c as f64) * (1.0 + k.relax_step)).ceil() as u64;
        Some(CapChange::Set(DirLimits {
            read: grow(cur.read),
            write: grow(cur.write),
        }))
    }

    /// Forgets one guest (another VM took its name): its limit goes, and what was learned of
    /// it. True when it had a limit.
    pub fn forget(&mut self, guest: &str) -> bool {
        self.under_ticks.remove(guest);
        self.limits.remove(guest).is_some()
    }

    /// Drops every limit at once (the latency controller let go and no fixed budget is left):
    /// returns the guests whose limits must be removed.
    pub fn release_all(&mut self) -> Vec<String> {
        self.engaged = false;
        self.over_ticks = 0;
        self.low_ticks = 0;
        self.under_ticks.clear();
        std::mem::take(&mut self.limits).into_keys().collect()
    }

    /// Updates the delivered/limit ratio from guests running at their limits.
    fn learn_efficiency(&mut self, guests: &BTreeMap<String, GuestUse>) {
        let (mut got, mut lim) = (0.0, 0.0);
        for (name, g) in guests {
            let Some(l) = self.limits.get(name) else {
                continue;
            };
            for (used, cap) in [(g.read, l.read), (g.write, l.write)] {
                if cap != u64::MAX && used >= 0.5 * cap as f64 && cap > 0 {
                    got += used;
                    lim += cap as f64;
                }
            }
        }
        if lim > 0.0 {
            // Decayed sums, clamped only when used: clamping each tick's noisy ratio at 1.0
            // before averaging would bias the estimate low and the limits high.
            let (g0, l0) = self.efficiency_sums;
            self.efficiency_sums = (0.8 * g0 + got, 0.8 * l0 + lim);
            let (g, l) = self.efficiency_sums;
            self.efficiency = Some(g / l);
        }
    }

    fn capacity(&self, raw: f64) -> f64 {
        raw / self.efficiency.unwrap_or(1.0).clamp(0.85, 1.0)
    }

    /// Per-guest limits the allocation calls for (None: under its share, no cap needed).
    fn targets(
        &self,
        budget: Budget,
        guests: &BTreeMap<String, GuestUse>,
        background: (f64, f64),
        k: &Knobs,
    ) -> BTreeMap<String, Option<DirLimits>> {
        let names: Vec<&String> = guests.keys().collect();
        // A capped guest at (nearly) its cap wants more than we see: probe upwards.
        let demand_of = |dir_use: f64, dir_cap: Option<u64>| -> f64 {
            match dir_cap {
                Some(c) if dir_use >= k.saturated * c as f64 => dir_use.max(c as f64) * k.probe,
                _ => dir_use,
            }
            .max(0.0)
        };
        let claims_for = |dir: Option<bool>| -> Vec<Claim> {
            names
                .iter()
                .map(|n| {
                    let g = &guests[*n];
                    let cap = self.limits.get(*n);
                    let d = match dir {
                        None => {
                            demand_of(g.read, cap.map(|c| c.read))
                                + demand_of(g.write, cap.map(|c| c.write))
                        }
                        Some(true) => demand_of(g.read, cap.map(|c| c.read)),
                        Some(false) => demand_of(g.write, cap.map(|c| c.write)),
                    };
                    Claim {
                        demand: d,
                        weight: g.weight.max(1e-6),
                        reservation: g.reservation,
                    }
                })
                .collect()
        };
        // Exempt guests use what they use; the others share what is left.
        let exempt_use = |dir: Option<bool>| -> f64 {
            guests
                .values()
                .filter(|g| g.exempt)
                .map(|g| match dir {
                    None => g.read + g.write,
                    Some(true) => g.read,
                    Some(false) => g.write,
                })
                .sum()
        };
        let mut out: BTreeMap<String, Option<DirLimits>> = BTreeMap::new();
        match budget {
            Budget::Total(b) => {
                let cap =
                    self.capacity((b - background.0 - background.1 - exempt_use(None)).max(0.0));
                let claims = claims_for(None);
                let alloc = allocate(cap, &claims);
                for (i, n) in names.iter().enumerate() {
                    let g = &guests[*n];
                    if g.exempt || alloc[i] >= claims[i].demand - 1e-6 {
                        out.insert((*n).clone(), None);
                        continue;
                    }
                    // Split the total between directions by the guest's own mix.
                    let tot = (g.read + g.write).max(1e-9);
                    let rs = (g.read / tot).clamp(0.01, 0.99);
                    out.insert(
                        (*n).clone(),
                        Some(DirLimits {
                            read: round_limit(alloc[i] * rs, k.floor),
                            write: round_limit(alloc[i] * (1.0 - rs), k.floor),
                        }),
                    );
                }
            }
            Budget::PerDirection { read, write } => {
                let per_dir = |b: Option<f64>, is_read: bool, bg: f64| -> Vec<Option<u64>> {
                    let Some(b) = b else {
                        return vec![None; names.len()];
                    };
                    let cap = self.capacity((b - bg - exempt_use(Some(is_read))).max(0.0));
                    let claims = claims_for(Some(is_read));
                    let alloc = allocate(cap, &claims);
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            (!guests[*n].exempt && alloc[i] < claims[i].demand - 1e-6)
                                .then(|| round_limit(alloc[i], k.floor))
                        })
                        .collect()
                };
                let r = per_dir(read, true, background.0);
                let w = per_dir(write, false, background.1);
                for (i, n) in names.iter().enumerate() {
                    let lim = match (r[i], w[i]) {
                        (None, None) => None,
                        // io.max has no "unlimited in one direction but keep the other" issue:
                        // the unlimited side is written as max by the actuator (u64::MAX).
                        (a, b) => Some(DirLimits {
                            read: a.unwrap_or(u64::MAX),
                            write: b.unwrap_or(u64::MAX),
                        }),
                    };
                    out.insert((*n).clone(), lim);
                }
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn claim(d: f64, w: f64, r: f64) -> Claim {
        Claim {
            demand: d,
            weight: w,
            reservation: r,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn water_filling_matches_the_textbook_example() {
        // Keshav: demands 2, 2.6, 4, 5 with capacity 10 -> 2, 2.6, 2.7, 2.7.
        let c: Vec<Claim> = [2.0, 2.6, 4.0, 5.0]
            .iter()
            .map(|d| claim(*d, 1.0, 0.0))
            .collect();
        let a = allocate(10.0, &c);
        for (x, y) in a.iter().zip([2.0, 2.6, 2.7, 2.7]) {
            assert!(close(*x, y), "{a:?}");
        }
    }

    #[test]
    fn weights_and_reservations() {
        // Weights 2:1:1, all greedy: 50/25/25.
        let c = vec![
            claim(1e9, 2.0, 0.0),
            claim(1e9, 1.0, 0.0),
            claim(1e9, 1.0, 0.0),
        ];
        let a = allocate(1000.0, &c);
        assert!(
            close(a[0], 500.0) && close(a[1], 250.0) && close(a[2], 250.0),
            "{a:?}"
        );
        // A reservation is honoured first, the rest shared.
        let c = vec![claim(1e9, 1.0, 600.0), claim(1e9, 1.0, 0.0)];
        let a = allocate(1000.0, &c);
        assert!(close(a[0], 800.0) && close(a[1], 200.0), "{a:?}");
        // Reservations over capacity are scaled down, never exceed it.
        let c = vec![claim(1e9, 1.0, 800.0), claim(1e9, 1.0, 800.0)];
        let a = allocate(1000.0, &c);
        assert!(close(a.iter().sum::<f64>(), 1000.0));
        // Under capacity: everyone gets their demand.
        let c = vec![claim(10.0, 1.0, 0.0), claim(20.0, 5.0, 0.0)];
        assert_eq!(allocate(100.0, &c), vec![10.0, 20.0]);
        assert!(allocate(0.0, &c).iter().all(|x| *x == 0.0));
        assert!(allocate(100.0, &[]).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn allocation_never_exceeds_capacity_or_demand(
            // (demand, weight, reservation) of one to six claims.
            claims in proptest::collection::vec(
                (0.0..10_000.0f64, 1.0..6.0f64, 0.0..1_000.0f64),
                1..7,
            ),
            cap in 0.0..10_000.0f64,
        ) {
            let claims: Vec<Claim> = claims.into_iter().map(|(d, w, r)| claim(d, w, r)).collect();
            let a = allocate(cap, &claims);
            let total: f64 = a.iter().sum();
            proptest::prop_assert!(total <= cap + 1e-6, "{} > {}", total, cap);
            for (x, c) in a.iter().zip(&claims) {
                proptest::prop_assert!(*x <= c.demand + 1e-6 && *x >= -1e-9);
            }
            let demand: f64 = claims.iter().map(|c| c.demand).sum();
            proptest::prop_assert!(
                total >= demand.min(cap) - 1e-6,
                "work-conserving: {} vs {}",
                total,
                demand.min(cap)
            );
        }
    }

    #[test]
    fn jain() {
        assert!(close(jain_index(&[1.0, 1.0, 1.0]), 1.0));
        assert!(close(jain_index(&[1.0, 0.0]), 0.5));
    }

    pub(crate) fn greedy(r: f64, w: f64) -> GuestUse {
        GuestUse {
            read: r,
            write: w,
            weight: 1.0,
            reservation: 0.0,
            exempt: false,
        }
    }

    fn guests(list: &[(&str, GuestUse)]) -> BTreeMap<String, GuestUse> {
        list.iter()
            .map(|(n, g)| (n.to_string(), g.clone()))
            .collect()
    }

    #[test]
    fn engages_only_after_engage_ticks_and_caps_the_hog() {
        let k = Knobs::default();
        let mut c = DeviceController::default();
        let g = guests(&[("hog", greedy(2500.0, 0.0)), ("quiet", greedy(100.0, 0.0))]);
        let d1 = c.step(Budget::Total(1000.0), &g, (0.0, 0.0), &k);
        assert!(
            !d1.engaged && d1.set.is_empty(),
            "one tick over is not enough"
        );
        let d2 = c.step(Budget::Total(1000.0), &g, (0.0, 0.0), &k);
        assert!(d2.engaged);
        // Only the hog is capped; the quiet guest is under its share.
        assert_eq!(d2.set.keys().collect::<Vec<_>>(), vec!["hog"]);
        let lim = d2.set["hog"];
        // A read-only guest: reads get the share, writes only the floor.
        assert!(lim.read <= 900, "{lim:?}");
        assert_eq!(lim.write, k.floor as u64);
    }

    #[test]
    fn converges_to_equal_shares_and_holds_without_rewrites() {
        let k = Knobs::default();
        let mut c = DeviceController::default();
        let budget = 900.0;
        // Three greedy guests; their observed rate is min(demand, cap).
        let demand = 5000.0;
        let mut caps: BTreeMap<String, u64> = BTreeMap::new();
        let mut writes = Vec::new();
        for tick in 0..30 {
            let g: BTreeMap<String, GuestUse> = ["a", "b", "c"]
                .iter()
                .map(|n| {
                    let r = caps.get(*n).map_or(demand, |c| (*c as f64).min(demand));
                    (n.to_string(), greedy(r, 0.0))
                })
                .collect();
            let d = c.step(Budget::Total(budget), &g, (0.0, 0.0), &k);
            writes.push(d.set.len());
            // Read-only guests: what they can do is their read limit.
            for (n, l) in d.set {
                caps.insert(n, l.read);
            }
            if tick > 20 {
                let total: u64 = caps.values().sum();
                assert!((total as f64) <= budget * 1.05, "tick {tick}: {caps:?}");
                let shares: Vec<f64> = caps.values().map(|v| *v as f64).collect();
                assert!(jain_index(&shares) > 0.99, "{caps:?}");
            }
        }
        // After settling, the deadband stops rewrites... unless probing moves them.
        let late: usize = writes[20..].iter().sum();
        assert!(late <= 10, "too many rewrites when settled: {writes:?}");
    }

    #[test]
    fn weighted_guest_gets_its_share() {
        let k = Knobs::default();
        let mut c = DeviceController::default();
        let mut caps: BTreeMap<String, u64> = BTreeMap::new();
        for _ in 0..30 {
            let g: BTreeMap<String, GuestUse> = [("a", 2.0), ("b", 1.0), ("c", 1.0)]
                .iter()
                .map(|(n, w)| {
                    let r = caps.get(*n).map_or(5000.0, |c| *c as f64);
                    (
                        n.to_string(),
                        GuestUse {
                            weight: *w,
                            ..greedy(r, 0.0)
                        },
                    )
                })
                .collect();
            let d = c.step(Budget::Total(1000.0), &g, (0.0, 0.0), &k);
            for (n, l) in d.set {
                caps.insert(n, l.read);
            }
        }
        let a = caps["a"] as f64;
        let b = caps["b"] as f64;
        assert!((a / b - 2.0).abs() < 0.3, "{caps:?}");
    }

    #[test]
    fn releases_after_low_load_and_never_below_floor() {
        let k = Knobs {
            floor: 50.0,
            ..Knobs::default()
        };
        let mut c = DeviceController::default();
        let many: BTreeMap<String, GuestUse> = (0..40)
            .map(|i| (format!("g{i}"), greedy(500.0, 0.0)))
            .collect();
        let mut d = Decision::default();
        for _ in 0..3 {
            d = c.step(Budget::Total(1000.0), &many, (0.0, 0.0), &k);
        }
        assert!(d.engaged);
        assert!(
            c.limits.values().all(|l| l.read >= 50 && l.write >= 50),
            "floor held"
        );
        // Load stops: after release_ticks low ticks every limit is cleared.
        let idle: BTreeMap<String, GuestUse> = (0..40)
            .map(|i| (format!("g{i}"), greedy(1.0, 0.0)))
            .collect();
        let mut cleared = Vec::new();
        for _ in 0..k.release_ticks {
            let d = c.step(Budget::Total(1000.0), &idle, (0.0, 0.0), &k);
            cleared.extend(d.clear);
        }
        assert!(!c.engaged);
        assert_eq!(cleared.len(), 40);
        assert!(c.limits.is_empty());
    }

    #[test]
    fn exempt_guests_and_background_reduce_what_others_share() {
        let k = Knobs::default();
        let mut c = DeviceController::default();
        let g = guests(&[
            (
                "vip",
                GuestUse {
                    exempt: true,
                    ..greedy(400.0, 0.0)
                },
            ),
            ("x", greedy(2000.0, 0.0)),
        ]);
        c.step(Budget::Total(1000.0), &g, (100.0, 0.0), &k);
        let d = c.step(Budget::Total(1000.0), &g, (100.0, 0.0), &k);
        assert!(!d.set.contains_key("vip"));
        let x = d.set["x"];
        assert!(x.read + x.write <= 520, "{x:?}");
    }

    #[test]
    fn per_direction_budget_caps_only_that_direction() {
        let k = Knobs::default();
        let mut c = DeviceController::default();
        let g = guests(&[("w", greedy(10.0, 3000.0)), ("r", greedy(500.0, 0.0))]);
        let b = Budget::PerDirection {
            read: None,
            write: Some(1000.0),
        };
        c.step(b, &g, (0.0, 0.0), &k);
        let d = c.step(b, &g, (0.0, 0.0), &k);
        let w = d.set["w"];
        assert_eq!(w.read, u64::MAX);
        assert!(w.write <= 1000);
        assert!(!d.set.contains_key("r"));
    }

    #[test]
    fn one_quiet_tick_does_not_drop_a_cap() {
        let k = Knobs::default();
        let mut c = DeviceController::default();
        let busy = guests(&[("a", greedy(3000.0, 0.0)), ("b", greedy(3000.0, 0.0))]);
        c.step(Budget::Total(1000.0), &busy, (0.0, 0.0), &k);
        c.step(Budget::Total(1000.0), &busy, (0.0, 0.0), &k);
        let capped = c.limits.clone();
        // One tick where "a" did nothing (the throttle released a burst late): keep its cap.
        let quiet = guests(&[("a", greedy(0.0, 0.0)), ("b", greedy(500.0, 0.0))]);
        let d = c.step(Budget::Total(1000.0), &quiet, (0.0, 0.0), &k);
        assert!(
            !d.clear.contains(&"a".to_string()) && !d.set.contains_key("a"),
            "{d:?}"
        );
        assert_eq!(c.limits.get("a"), capped.get("a"));
        // Several quiet ticks: now it is relaxed or dropped.
        for _ in 0..RELAX_AFTER_TICKS {
            c.step(Budget::Total(1000.0), &quiet, (0.0, 0.0), &k);
        }
        assert_ne!(c.limits.get("a"), capped.get("a"));
    }

    #[test]
    fn vanished_guest_loses_its_limit() {
        let k = Knobs::default();
        let mut c = DeviceController::default();
        let g = guests(&[("a", greedy(3000.0, 0.0)), ("b", greedy(3000.0, 0.0))]);
        c.step(Budget::Total(1000.0), &g, (0.0, 0.0), &k);
        c.step(Budget::Total(1000.0), &g, (0.0, 0.0), &k);
        let only_a = guests(&[("a", greedy(3000.0, 0.0))]);
        let d = c.step(Budget::Total(1000.0), &only_a, (0.0, 0.0), &k);
        assert_eq!(d.clear, vec!["b".to_string()]);
    }
}
