//! The latency controller: finds the total IOPS at which a device meets a latency target and
//! holds its guests to it (see [`LatencyController`]). Pure, like the budget controller it
//! hands its window to (`policy::step_iops` joins the two).

/// Knobs of the latency controller (defaults in `Default`). Counts are in ticks (the sampling
/// interval: 1 s by default).
///
/// The ones an operator has a reason to change are set in the config's `[latency]` section
/// (`config::LatencyPolicy`, mapped by `throttle::latency_knobs`): `engage_ticks`,
/// `release_ticks`, `release_below`, `min_completions`, `setpoint`, `floor` (as `floor_iops`),
/// `min_fraction` and `drain_ticks`. The others are the search's internal tuning (how it
/// brackets, probes and smooths the knee), fixed here: they have no meaning to an operator
/// apart from the algorithm, and the tests of the controller hold them together.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyKnobs {
    /// Ticks the device's latency must stay above target before it engages. `[latency]`.
    pub engage_ticks: u32,
    /// Ticks of "well under target and not held back" (or idle) before it lets go. `[latency]`.
    pub release_ticks: u32,
    /// "Well under": below this fraction of the target. `[latency]`.
    pub release_below: f64,
    /// A tick with fewer completions than this says nothing about latency (held). `[latency]`.
    pub min_completions: u64,
    /// A rate counts as meeting the target when its latency is at most this fraction of it:
    /// the probes above the knee then land near the target rather than far over it. `[latency]`.
    pub setpoint: f64,
    /// Per tick, the lowest rate known to miss the target is forgotten upwards by this much
    /// (times the speed-up), so the controller probes again (the device may have become
    /// faster, or the miss was noise).
    pub forget: f64,
    /// When the bracket [meets, misses] is narrower than this (relative), hold at "meets";
    /// after a miss, the known-good rate is put twice this far under it (a miss's delivered
    /// rate can carry a burst, and the backlog drains only under the capacity).
    pub close: f64,
    /// Largest step of the ramp (relative, per confirmed rate) while nothing above the
    /// known-good rate is known to miss. The ramp starts at `close` and doubles per step.
    pub ramp: f64,
    /// Delivered ≥ this × window: the window, not demand, is what limits the guests.
    pub binding: f64,
    /// The window never goes below this many IOPS in total. `[latency] floor_iops`.
    pub floor: f64,
    /// A miss with nothing known to meet the target cuts the rate by `T/L`, but never below
    /// this fraction (a rate-limited device's latency jumps far over the target just past
    /// its limit: `T/L` would halve the rate for a 1% overshoot).
    pub max_cut: f64,
    /// Ticks not judged after a cut: a device's queue (a rate limiter's backlog) drains only
    /// at the difference between its capacity and the new rate, so the first ticks after a
    /// cut still miss at a rate that meets the target. Measured in the 6.1 guest on a disk
    /// QEMU limits: 1-1.5 s. `[latency]`: another device's queue drains at another pace.
    pub drain_ticks: u32,
    /// Bounds of the forgetting's speed-up: doubled by a probe that met the target above the
    /// last miss, halved by a probe that missed.
    pub max_speedup: f64,
    pub min_speedup: f64,
    /// The window never goes below this fraction of the rate the device delivered when the
    /// controller engaged: a target missed even at a small share of that rate is not missed
    /// because of the rate (a slow host, a failing disk), and starving the guests would not
    /// meet it. `[latency]`.
    pub min_fraction: f64,
    /// A miss after a cut is not taken for the rate's fault when the window is at least
    /// `1.5·close` under the rate delivered at the last miss that moved it and the latency is
    /// still at least this fraction of that miss's: latency that does not follow the rate is the host's or
    /// the device's own (a loaded host, a hiccup), and cutting further would only starve the
    /// guests. The window holds instead.
    pub unmoved: f64,
    /// Ticks at a window before it is judged, and the majority that decides: a window
    /// meets (or misses) the target when most of its last `smooth_ticks` ticks, and at least
    /// this many, did. One tick alone moves nothing.
    pub confirm_ticks: u32,
    /// The ticks a judgement of a probe looks back on (at one window).
    pub smooth_ticks: usize,
    /// The ticks a judgement of any other window looks back on: at a rate known to meet the
    /// target, slow ticks scattered by a loaded host (two of three now and then, at one tick
    /// in ten) must not read as a miss, while a real one (every tick over) is seen as soon.
    pub hold_smooth_ticks: usize,
    /// A miss at the known-good rate within this many ticks of the last one is taken at its
    /// word (the device got slower), not stepped back from as possible noise.
    pub suspect_memory: u32,
    /// Ticks a probe near the highest rate seen saturated must meet the target before it is
    /// learned: a rate limiter's bucket lets a rate a few percent over its capacity through
    /// for seconds (QEMU's: a tenth of a second of I/O), so a probe met for a tick or two may
    /// still be over the capacity.
    pub trust_ticks: u32,
}

impl Default for LatencyKnobs {
    fn default() -> Self {
        LatencyKnobs {
            engage_ticks: 2,
            release_ticks: 10,
            release_below: 0.5,
            min_completions: 32,
            setpoint: 0.9,
            forget: 0.005,
            close: 0.04,
            ramp: 0.25,
            binding: 0.85,
            floor: 20.0,
            max_cut: 0.8,
            drain_ticks: 3,
            max_speedup: 16.0,
            min_speedup: 0.25,
            min_fraction: 0.25,
            unmoved: 0.8,
            confirm_ticks: 2,
            smooth_ticks: 3,
            hold_smooth_ticks: 5,
            suspect_memory: 20,
            trust_ticks: 8,
        }
    }
}

/// What one interval showed on a device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencySample {
    /// The device's latency at the configured percentile (all I/O on it, VMs or not), µs.
    pub latency_us: Option<f64>,
    /// Completions the percentile was computed from.
    pub completions: u64,
    /// Total IOPS delivered on the device in the interval.
    pub iops: f64,
}

/// One judged tick at the current window.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Tick {
    latency_us: f64,
    iops: f64,
}

/// How the current window did over its recent ticks (see `LatencyController::judge`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Judgement {
    /// Most ticks were over the target.
    missed: bool,
    /// Most ticks were at or under `setpoint` of the target.
    met: bool,
    /// The median latency of the ticks, µs.
    judged: f64,
    /// What the device delivered while missing (all ticks when it did not miss).
    delivered: f64,
    /// A miss after a cut that lowered the delivered rate but not the latency: the host's or
    /// the device's own, not the rate's.
    unmoved: bool,
    /// The lowest rate among the ticks: what a met window is learned as.
    slowest_rate: f64,
}

/// Finds the total IOPS at which a device meets a latency target: a bracketing search over
/// measured points, with forgetting and a ramp, run only while the target is missed.
///
/// The law, per tick while engaged:
/// - **Judge a window, not a tick** (`judge`). The ticks since the window last moved (the last
///   `smooth_ticks` for a probe, `hold_smooth_ticks` otherwise) decide by majority, and only
///   once there are `confirm_ticks` of them: the window *meets* the target when most had
///   `L ≤ setpoint·T` with the window binding, and *misses* it when most had `L > T`. A
///   single slow tick (a host hiccup, a burst absorbed by the device) moves nothing; after a
///   cut, `drain_ticks` ticks are not judged at all (the backlog of the rate before drains
///   first).
/// - **Bracket** (`engage`, `learn_miss`). `good` is the highest delivered rate known to meet the target, `bad` the
///   lowest known to miss it. A miss sets `bad` to the rate the device delivered while
///   missing (a saturated device delivers its capacity; the mean of the ticks over the
///   target, at least `max_cut` of the window) and lowers `good` to `2·close` under
///   it, never drops it: a miss just above the knee costs a few percent, not a restart from
///   below. With no `good` yet a miss cuts by `T/L` (to `max_cut` at most).
/// - **Move up only after a judgement** (`learn_meet`, `near_saturation`). When the window meets the target: with `bad`
///   known, go to the middle of `[good, bad]`, or hold `good` once the bracket is narrower
///   than `close` (twice that while holding: hysteresis); with no `bad`, ramp from `good` by
///   a step that starts at `close` and doubles per confirmed step up to `ramp` (slow start).
///   A probe within `3·close` of the highest rate seen saturated in this engagement is
///   learned only after it met the target for `trust_ticks`: a rate limiter's bucket hides
///   an overshoot of a few percent for seconds (seen in the 6.1 guest: 625 IOPS met for 1 s
///   on a 600 IOPS disk, then 8 ms).
/// - **Forget** (`forget`, and the stale-miss rule in `learn_meet`). While holding at `good`, `bad` grows by `forget × speed-up` per tick, so the
///   bracket reopens and the window probes its middle. A probe that meets the target clearly
///   above the rate that missed before (by `close`) shows that miss was stale (the device got
///   faster, or it was noise or a backlog):
///   `bad` is dropped and the ramp takes over; going clearly past it doubles the speed-up, a
///   probe that misses halves it (a rate limiter's step is found again and again: probes get
///   rarer there).
/// - **Misses that are not the rate's** (`suspect_miss`; `Judgement::unmoved` holds). A miss at the known-good rate the window kept up with
///   first steps back by `close`, closing the bracket just over it (noise, or a slower
///   device: a miss there too, or another soon, says which). A miss after a cut that lowered
///   the delivered rate but not the latency (`unmoved`) is the host's or the device's own:
///   the window holds instead of starving the guests, and never goes under `min_fraction` of
///   the rate at engaging. A cut that did not lower the delivered rate (still at a rate
///   limiter's capacity) is no cut: its miss is the rate's.
///
/// Why: the window always lies in a bracket of measured points and the bracket halves with
/// each judged probe, so it converges in log2(range/width) judgements whatever the slope of
/// the device's latency curve. A proportional law (PARDA's `w·T/L`) has a loop gain equal to
/// its gain times that slope, which is steep near saturation (queueing) or a step (a rate
/// limiter): it oscillates unless tuned per device. A bracket alone can close on a wrong
/// point (slow ticks far under the knee; seen in a guest: 266 IOPS learned on a 600 IOPS
/// disk, held for good): the majority judgement and the two rules above keep such points
/// from being learned, and the forgetting, the stale-miss rule and the ramp make any that is
/// learned temporary. At rest the only motion is a probe into the reopened bracket.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencyController {
    over_ticks: u32,
    low_ticks: u32,
    pub engaged: bool,
    /// Total IOPS the guests are held to while engaged.
    pub window: Option<f64>,
    good: Option<f64>,
    bad: Option<f64>,
    /// `bad` as last measured (before any forgetting).
    bad_measured: f64,
    /// The last rate seen to meet the target while holding guests back: what the device
    /// delivers at the target. Kept after release, as the last thing learned.
    pub capacity: Option<f64>,
    /// The last tick's latency at the percentile, µs.
    pub latency_us: Option<f64>,
    /// The last tick missed the target: the device, not the guests' demand, set their rates.
    pub congested: bool,
    /// Multiplier of the forgetting.
    speedup: f64,
    /// The ramp's next step (relative).
    step: f64,
    /// The ticks judged at the current window (newest last, at most `smooth_ticks`).
    recent: Vec<Tick>,
    /// Ticks still not judged after a cut.
    draining: u32,
    /// The window's lower bound for this engagement (`min_fraction` of the rate at engaging).
    min_window: f64,
    /// (mean rate delivered, judged latency) of the last miss that moved the window, since it
    /// last met the target (at engaging: the rate delivered unthrottled).
    last_miss: Option<(f64, f64)>,
    /// The miss a probe showed stale, while the ramp has not yet gone clearly past it.
    stale_from: Option<f64>,
    /// Ticks since the window last stepped back from the known-good rate after a miss there.
    since_suspect: u32,
    /// Ticks the current window met the target (judged or not). A miss at a window not yet
    /// met for `confirm_ticks` says that window is too high, not noise; a probe near
    /// `miss_high` is learned only once met for `trust_ticks`.
    met_ticks: u32,
    /// The highest rate the device delivered while missing the target in this engagement
    /// (at engaging: unthrottled). A rate limiter's capacity lies just under it.
    miss_high: Option<f64>,
}

impl LatencyController {
    /// One tick: returns the total IOPS window to hold the device's guests to, or None when
    /// the controller is not engaged.
    pub fn step(&mut self, target_us: f64, s: &LatencySample, k: &LatencyKnobs) -> Option<f64> {
        let lat = s
            .latency_us
            .filter(|l| l.is_finite() && *l >= 0.0 && s.completions >= k.min_completions);
        self.latency_us = s.latency_us;
        let iops = if s.iops.is_finite() {
            s.iops.max(0.0)
        } else {
            0.0
        };
        let over = lat.is_some_and(|l| l > target_us);
        self.congested = over;
        if !self.engaged {
            self.over_ticks = if over { self.over_ticks + 1 } else { 0 };
            if self.over_ticks < k.engage_ticks {
                return None;
            }
            self.engage(iops, lat.unwrap_or(target_us), target_us, k);
            return self.window;
        }
        let w = self.window.unwrap_or(iops).max(k.floor);
        let binding = iops >= k.binding * w;
        if self.let_go(lat, binding, target_us, k) {
            return None;
        }
        self.since_suspect = self.since_suspect.saturating_add(1);
        let Some(l) = lat else {
            return self.window;
        };
        self.forget(w, k);
        if self.draining > 0 {
            self.draining -= 1;
            return self.window;
        }
        self.recent.push(Tick {
            latency_us: l,
            iops,
        });
        if l <= k.setpoint * target_us && binding {
            self.met_ticks = self.met_ticks.saturating_add(1);
        }
        let keep = k.smooth_ticks.max(k.hold_smooth_ticks).max(1);
        if self.recent.len() > keep {
            self.recent.remove(0);
        }
        // This window is above the rate known to meet the target: it is a probe.
        let probe = self.good.is_some_and(|g| w > g * (1.0 + 0.5 * k.close));
        let Some(j) = self.judge(w, binding, probe, target_us, k) else {
            return self.window;
        };
        if j.missed && j.unmoved {
            // Cut and no better: not the rate's fault. Hold, and judge again after a while.
            self.recent.clear();
            self.draining = k.drain_ticks;
        } else if j.missed
            && !probe
            && binding
            && self.good.is_some()
            && self.since_suspect > k.suspect_memory
            && self.met_ticks >= k.confirm_ticks
        {
            self.suspect_miss(w, &j, k);
        } else if j.missed {
            let now = Tick {
                latency_us: l,
                iops,
            };
            self.learn_miss(w, now, probe, &j, target_us, k);
        } else if j.met && binding && probe && self.near_saturation(w, k) {
            // A probe close to the highest rate seen saturated: a rate limiter's bucket hides
            // an overshoot of a few percent for seconds, so it must meet the target for
            // `trust_ticks` before it is learned. Far from it, the majority of a few ticks is
            // enough.
        } else if j.met && binding {
            self.learn_meet(&j, k);
        }
        self.window
    }

    /// Engages: the window starts under the rate that just missed the target (at a capacity
    /// learned before, when it is below that rate; else cut by `T/L`).
    fn engage(&mut self, iops: f64, l: f64, target_us: f64, k: &LatencyKnobs) {
        self.engaged = true;
        self.low_ticks = 0;
        self.speedup = 1.0;
        self.step = k.close;
        self.min_window = (k.min_fraction * iops).max(k.floor);
        self.bad = Some(iops.max(k.floor));
        self.bad_measured = iops.max(k.floor);
        self.miss_high = Some(iops.max(k.floor));
        self.last_miss = Some((iops, l));
        self.since_suspect = u32::MAX;
        // A capacity learned in an earlier engagement is a good first guess if it is below
        // what just missed the target.
        self.good = self.capacity.filter(|c| *c < iops * (1.0 - k.close));
        let w = match self.good {
            Some(g) => g,
            None => iops * (target_us / l).clamp(k.max_cut, 0.95),
        };
        self.cut_to(w, k);
    }

    /// After `release_ticks` well under the target and not held back (or idle), lets go:
    /// everything but the capacity learned is forgotten. True when it did.
    fn let_go(
        &mut self,
        lat: Option<f64>,
        binding: bool,
        target_us: f64,
        k: &LatencyKnobs,
    ) -> bool {
        let low = match lat {
            None => true,
            Some(l) => l < k.release_below * target_us && !binding,
        };
        self.low_ticks = if low { self.low_ticks + 1 } else { 0 };
        if self.low_ticks < k.release_ticks {
            return false;
        }
        *self = LatencyController {
            capacity: self.capacity,
            latency_us: self.latency_us,
            ..LatencyController::default()
        };
        true
    }

    /// The forgetting: while holding at the known-good rate, the lowest rate known to miss
    /// grows a little each tick, so the bracket reopens. Not during a search: there the
    /// bracket's upper end is fresh, and forgetting it would send the next probe past a miss
    /// just measured.
    fn forget(&mut self, w: f64, k: &LatencyKnobs) {
        let holding = self.good.is_some_and(|g| w <= g * (1.0 + 0.5 * k.close));
        if let Some(b) = self.bad.as_mut().filter(|_| holding || self.good.is_none()) {
            let speed = self.speedup.clamp(k.min_speedup, k.max_speedup);
            *b *= 1.0 + k.forget * speed;
        }
    }

    /// The judgement of the current window from its recent ticks (a probe's last
    /// `smooth_ticks`, any other's last `hold_smooth_ticks`), by majority; None until it has
    /// `confirm_ticks` of them.
    fn judge(
        &self,
        w: f64,
        binding: bool,
        probe: bool,
        target_us: f64,
        k: &LatencyKnobs,
    ) -> Option<Judgement> {
        let span = if probe {
            k.smooth_ticks
        } else {
            k.hold_smooth_ticks
        };
        let recent = &self.recent[self.recent.len().saturating_sub(span.max(1))..];
        let n = recent.len();
        if n < k.confirm_ticks.max(1) as usize {
            return None;
        }
        let overs = recent.iter().filter(|t| t.latency_us > target_us).count();
        let meets = recent
            .iter()
            .filter(|t| t.latency_us <= k.setpoint * target_us)
            .count();
        let mut sorted: Vec<f64> = recent.iter().map(|t| t.latency_us).collect();
        sorted.sort_by(f64::total_cmp);
        let judged = sorted[n / 2];
        let missed = 2 * overs > n;
        // What the device delivered while missing: the mean over the window's ticks over the
        // target. Not over all its ticks: a probe's first tick can carry a burst a rate
        // limiter's bucket let through (seen in the 6.1 guest: 633 on a 600 IOPS disk, then
        // 600 with 8 ms), and a saturated device delivers its capacity.
        let delivered = {
            let over: Vec<f64> = recent
                .iter()
                .filter(|t| !missed || t.latency_us > target_us)
                .map(|t| t.iops)
                .collect();
            over.iter().sum::<f64>() / over.len().max(1) as f64
        };
        // The rate delivered now against the rate at the last miss: a cut that did not lower
        // what the device delivers (a window cut from a probe far over a rate limiter's
        // capacity to just over it) is no cut, and its miss is the rate's.
        let unmoved = binding
            && self.last_miss.is_some_and(|(u0, l0)| {
                w.min(delivered) <= u0 * (1.0 - 1.5 * k.close) && judged >= k.unmoved * l0
            });
        Some(Judgement {
            missed,
            met: 2 * meets > n,
            judged,
            delivered,
            unmoved,
            slowest_rate: recent.iter().map(|t| t.iops).fold(f64::INFINITY, f64::min),
        })
    }

    /// A miss at the rate known to meet the target, seen to meet it at this window and kept
    /// up with: noise (a few slow ticks on a loaded host) or a device that got slower. Steps
    /// back by `close` knowing nothing new yet; a miss there too, with the latency down by the
    /// step (see `Judgement::unmoved`), or another one soon, says the device got slower.
    fn suspect_miss(&mut self, w: f64, j: &Judgement, k: &LatencyKnobs) {
        self.last_miss = Some((j.delivered, j.judged));
        self.since_suspect = 0;
        // Not learned as a miss, but no ramp above it either until it is met again for a
        // while: the bracket closes just over it, and the forgetting reopens it.
        let cap = w * (1.0 + k.close);
        self.bad = Some(self.bad.map_or(cap, |b| b.min(cap)));
        let g = self.good.unwrap_or(w);
        self.cut_to(g * (1.0 - k.close), k);
    }

    /// A miss taken for the rate's: learned as the lowest rate known to miss, and the window
    /// cut under it (by `T/L` from this tick, `now`, when no rate is known to meet the target).
    fn learn_miss(
        &mut self,
        w: f64,
        now: Tick,
        probe: bool,
        j: &Judgement,
        target_us: f64,
        k: &LatencyKnobs,
    ) {
        self.last_miss = Some((j.delivered, j.judged));
        // The rate the device delivered while missing: a saturated device delivers its
        // capacity, whatever the window above it. The mean of the window's ticks: one can
        // carry a burst a rate limiter's bucket let through, the next pay it back. Never
        // under `max_cut` of the window from one miss: a host that stalls delivers little
        // and slowly too (seen under TCG: a 1 s stall learned 195 at a 595 window); a
        // device that really got that much slower shows it again at the next window.
        let b = j.delivered.max(k.max_cut * w).max(k.floor);
        self.bad = Some(self.bad.map_or(b, |x| x.min(b)));
        self.bad_measured = b;
        self.miss_high = Some(self.miss_high.map_or(b, |m| m.max(b)));
        if probe {
            self.speedup = (0.5 * self.speedup).max(k.min_speedup);
        }
        self.stale_from = None;
        self.step = k.close;
        // The known-good rate stays, put just under the miss if the miss is at or below
        // it (the device got slower, or that rate was judged on a burst the device
        // absorbed): never dropped, so one miss never restarts the search from below.
        self.good = self.good.map(|g| g.min(b / (1.0 + 2.0 * k.close)));
        if self.good.is_some() {
            self.capacity = self.good;
        }
        let next = match self.good {
            Some(g) => g,
            None => now.iops * (target_us / now.latency_us).clamp(k.max_cut, 0.95),
        };
        self.cut_to(next.min(w * (1.0 - 0.5 * k.close)), k);
    }

    /// A probe within `3·close` of the highest rate seen saturated, not yet met for
    /// `trust_ticks`.
    fn near_saturation(&self, w: f64, k: &LatencyKnobs) -> bool {
        self.miss_high
            .is_some_and(|m| w > m * (1.0 - 3.0 * k.close) && w < m * (1.0 + 3.0 * k.close))
            && self.met_ticks < k.trust_ticks
    }

    /// The window met the target: its rate is learned as known-good, and the window moves up
    /// (to the middle of the bracket, or by the ramp when nothing above is known to miss).
    fn learn_meet(&mut self, j: &Judgement, k: &LatencyKnobs) {
        self.last_miss = None;
        let rate = j.slowest_rate;
        let g = self.good.map_or(rate, |g| g.max(rate));
        self.good = Some(g);
        // A rate that missed before now meets the target: that miss is stale.
        if self.bad.is_some() && rate >= self.bad_measured * (1.0 + k.close) {
            self.bad = None;
            self.stale_from = Some(self.bad_measured);
        }
        // Clearly above the stale miss (not just a burst the device absorbed around
        // it): the device is faster than that miss said, forget sooner next time.
        if self
            .stale_from
            .is_some_and(|b| rate >= b * (1.0 + 2.0 * k.close))
        {
            self.stale_from = None;
            self.speedup = (2.0 * self.speedup).min(k.max_speedup);
        }
        // Hysteresis: a bracket held at `good` reopens only at twice the width it closed
        // at, so the forgetting leaves a held window in place for a while.
        let holding = self.window.is_some_and(|w| w <= g * (1.0 + 0.5 * k.close));
        let width = if holding { 2.0 * k.close } else { k.close };
        let next = match self.bad {
            Some(b) if b / g - 1.0 <= width => g,
            Some(b) => 0.5 * (g + b),
            None => {
                let up = g * (1.0 + self.step);
                self.step = (2.0 * self.step).min(k.ramp);
                up
            }
        };
        // The capacity is the known-good rate once the search has closed in on it (a rate
        // met while recovering from a cut is below it), or the first one known.
        if self.capacity.is_none() || self.bad.is_some_and(|b| b / g - 1.0 < 2.0 * k.close) {
            self.capacity = Some(g);
        }
        self.move_to(next, k);
    }

    /// Sets the window to `w` (bounded below); the ticks judged so far were at another one.
    fn move_to(&mut self, w: f64, k: &LatencyKnobs) {
        let w = w.max(self.min_window).max(k.floor);
        if self.window != Some(w) {
            self.recent.clear();
            self.met_ticks = 0;
        }
        self.window = Some(w);
    }

    /// [`Self::move_to`] for a cut: the next ticks drain the backlog of the rate before.
    fn cut_to(&mut self, w: f64, k: &LatencyKnobs) {
        self.move_to(w, k);
        self.recent.clear();
        self.draining = k.drain_ticks;
    }
}

/// The controller in closed loop with the budget controller over simulated devices: each
/// rule of the law above shows in what the guests get and the latency they see.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::throttle::{
        budget::{DeviceController, GuestUse, Knobs, jain_index, tests::greedy},
        policy::step_iops,
    };

    /// A device that saturates at `capacity` IOPS: below it, queueing latency (M/D/1 mean
    /// waiting, times 1.5 for the percentile) over a base service time; at or above it, what
    /// the closed-loop guests' total queue depth gives (Little: depth / capacity).
    struct SimDevice {
        capacity: f64,
        base_us: f64,
        depth: f64,
        seed: u64,
    }

    /// A simulated device for [`simulate`].
    trait Sim {
        /// What it saturates at (unthrottled greedy guests offer 5× this).
        fn capacity(&self) -> f64;
        /// Offered IOPS per guest in, (delivered per guest, latency µs) out.
        fn run(&mut self, offered: &[f64]) -> (Vec<f64>, f64);
    }

    /// xorshift: a deterministic factor in `1 ± amp/2`.
    fn noise(seed: &mut u64, amp: f64) -> f64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        1.0 + amp * ((*seed % 10_000) as f64 / 10_000.0 - 0.5)
    }

    impl SimDevice {
        fn noise(&mut self, amp: f64) -> f64 {
            noise(&mut self.seed, amp)
        }
    }

    impl Sim for SimDevice {
        fn capacity(&self) -> f64 {
            self.capacity
        }

        fn run(&mut self, offered: &[f64]) -> (Vec<f64>, f64) {
            let total: f64 = offered.iter().sum();
            let rho = (total / self.capacity).min(0.9999);
            let queueing = self.base_us * (1.0 + 1.5 * rho / (2.0 * (1.0 - rho)));
            let saturated = self.depth / self.capacity * 1e6;
            let lat = queueing.min(saturated).max(self.base_us) * self.noise(0.1);
            let scale = if total > self.capacity {
                self.capacity / total
            } else {
                1.0
            };
            let n = self.noise(0.04);
            (offered.iter().map(|o| o * scale * n).collect(), lat)
        }
    }

    /// A disk limited the way QEMU's `iops-total=` limits one (the guest test's device): a
    /// leaky bucket draining `capacity` I/Os per second that lets `capacity/10` through at
    /// once (QEMU's burst when none is set), ticks of `dt` seconds. While the bucket has room
    /// a read takes `base_us`; once it is full requests wait, and the guests' closed loops
    /// (total queue depth `depth`) see depth/capacity. A small overshoot fills the bucket
    /// only after a while (at +5%, 2 s): it looks like a rate that meets the target, then
    /// misses. The tick after a saturated one is slow too (the backlog drains: 1-1.5 s in the
    /// guest). `spike` ticks, and each tick with probability `p_spike`, see `spike_us`
    /// whatever the rate (a host hiccup under load).
    struct SimBucket {
        capacity: f64,
        base_us: f64,
        depth: f64,
        dt: f64,
        level: f64,
        was_full: bool,
        /// A level above this fraction of the bucket makes clumps wait.
        sticky: f64,
        tick: usize,
        spike: std::ops::Range<usize>,
        p_spike: f64,
        spike_us: f64,
        seed: u64,
    }

    impl SimBucket {
        fn new(capacity: f64, seed: u64) -> Self {
            SimBucket {
                capacity,
                base_us: 300.0,
                depth: 3.0,
                dt: 0.5,
                level: 0.0,
                was_full: false,
                sticky: 0.5,
                tick: 0,
                spike: 0..0,
                p_spike: 0.0,
                spike_us: 8000.0,
                seed,
            }
        }
    }

    impl Sim for SimBucket {
        fn capacity(&self) -> f64 {
            self.capacity
        }

        fn run(&mut self, offered: &[f64]) -> (Vec<f64>, f64) {
            let total: f64 = offered.iter().sum::<f64>() * noise(&mut self.seed, 0.04);
            let size = self.capacity / 10.0;
            let leak = self.capacity * self.dt;
            let passes = leak + (size - self.level);
            let want = total * self.dt;
            let (got, full) = if want <= passes {
                self.level = (self.level + want - leak).max(0.0);
                // Requests arrive in clumps (three guests, blk-throttle's slices): near the
                // top of the bucket a clump waits even when the rate is just under the leak.
                // Seen in the guest: at 598 IOPS after a probe had filled the bucket, 8 ms
                // for 20 s; the bucket drains only at the difference.
                (total, self.level > self.sticky * size)
            } else {
                self.level = size;
                // p95: full once more than 5% of the tick's requests waited.
                (passes / self.dt, (want - passes) / want > 0.05)
            };
            let mut lat = if full || self.was_full {
                self.depth / self.capacity * 1e6
            } else {
                self.base_us
            } * noise(&mut self.seed, 0.1);
            self.was_full = full;
            let roll = noise(&mut self.seed, 1.0) - 0.5;
            if self.spike.contains(&self.tick) || roll < self.p_spike {
                lat = lat.max(self.spike_us);
            }
            self.tick += 1;
            let scale = if total > 0.0 { got / total } else { 0.0 };
            (offered.iter().map(|o| o * scale).collect(), lat)
        }
    }

    struct SimRun {
        windows: Vec<Option<f64>>,
        latency: Vec<f64>,
        total: Vec<f64>,
        per_guest: Vec<Vec<f64>>,
        capacity: Option<f64>,
        engaged: Vec<bool>,
        limits_left: usize,
    }

    /// Greedy guests (weights given) on a simulated device under a latency target, the way
    /// the service joins the two controllers; `load_ticks` busy, then `idle_ticks` idle.
    fn simulate(
        dev: &mut impl Sim,
        weights: &[f64],
        target_us: f64,
        load_ticks: usize,
        idle_ticks: usize,
    ) -> SimRun {
        let k = Knobs::default();
        let lk = LatencyKnobs::default();
        let mut lc = LatencyController::default();
        let mut dc = DeviceController::default();
        let names: Vec<String> = (0..weights.len()).map(|i| format!("g{i}")).collect();
        // Under blk-throttle a guest gets a little less than its limit.
        let efficiency = 0.95;
        let mut run = SimRun {
            windows: vec![],
            latency: vec![],
            total: vec![],
            per_guest: vec![vec![]; weights.len()],
            capacity: None,
            engaged: vec![],
            limits_left: 0,
        };
        for tick in 0..load_ticks + idle_ticks {
            let busy = tick < load_ticks;
            let offered: Vec<f64> = names
                .iter()
                .map(|n| match (busy, dc.limits.get(n)) {
                    (false, _) => 0.0,
                    (true, Some(l)) => l.read as f64 * efficiency,
                    (true, None) => dev.capacity() * 5.0,
                })
                .collect();
            let (got, lat) = dev.run(&offered);
            let total: f64 = got.iter().sum();
            let sample = LatencySample {
                latency_us: busy.then_some(lat),
                completions: total as u64,
                iops: total,
            };
            let guests: BTreeMap<String, GuestUse> = names
                .iter()
                .zip(weights)
                .zip(&got)
                .map(|((n, w), r)| {
                    (
                        n.clone(),
                        GuestUse {
                            weight: *w,
                            ..greedy(*r, 0.0)
                        },
                    )
                })
                .collect();
            step_iops(
                &mut dc,
                Some((&mut lc, target_us, &sample)),
                None,
                &guests,
                (0.0, 0.0),
                &k,
                &lk,
            );
            if busy {
                run.latency.push(lat);
                run.total.push(total);
                for (i, g) in got.iter().enumerate() {
                    run.per_guest[i].push(*g);
                }
            }
            run.engaged.push(lc.engaged);
            run.windows.push(lc.window);
        }
        run.capacity = lc.capacity;
        run.limits_left = dc.limits.len();
        run
    }

    fn mean(xs: &[f64]) -> f64 {
        xs.iter().sum::<f64>() / xs.len().max(1) as f64
    }

    /// The knee of the simulated device: the rate whose latency is the target.
    fn knee(dev: &SimDevice, target_us: f64) -> f64 {
        // base·(1 + 1.5ρ/(2(1-ρ))) = T  =>  ρ = 2x / (1.5 + 2x), x = T/base - 1.
        let x = target_us / dev.base_us - 1.0;
        dev.capacity * (2.0 * x / (1.5 + 2.0 * x))
    }

    /// The median at or under the target, at most one tick in five over it by more than 10%.
    fn assert_held(latency: &[f64], target: f64) {
        let mut sorted = latency.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        let over = latency.iter().filter(|l| **l > target * 1.1).count();
        assert!(
            median <= target && over * 5 <= latency.len(),
            "median {median:.0} µs, {over} of {} ticks over: {latency:?}",
            latency.len()
        );
    }

    #[test]
    fn latency_target_converges_holds_and_releases() {
        let mut dev = SimDevice {
            capacity: 2000.0,
            base_us: 500.0,
            depth: 96.0,
            seed: 99,
        };
        let target = 10_000.0;
        let run = simulate(&mut dev, &[1.0, 1.0, 1.0], target, 60, 30);
        // Unthrottled the device sits at depth/capacity = 48 ms: over target, so it engages.
        assert!(run.engaged[2], "{:?}", run.engaged);
        // Settled within 10 ticks: from then on the latency is held at the target, apart from
        // the probes just above the knee (about one tick in five to eight).
        assert_held(&run.latency[10..], target);
        let knee = knee(&dev, target);
        let kept = mean(&run.total[10..]) / knee;
        assert!(
            kept >= 0.85,
            "kept {kept:.2} of the knee {knee:.0}: {:?}",
            run.total
        );
        // Fair among equals.
        let shares: Vec<f64> = run.per_guest.iter().map(|g| mean(&g[10..])).collect();
        assert!(jain_index(&shares) >= 0.95, "{shares:?}");
        // The learned capacity is the knee, within 15%.
        let cap = run.capacity.expect("a capacity was learned");
        assert!(
            (cap / knee - 1.0).abs() < 0.15,
            "capacity {cap:.0} vs knee {knee:.0}"
        );
        // Released within 30 ticks of the load stopping, with no limit left.
        assert!(!run.engaged.last().unwrap(), "{:?}", run.engaged);
        assert_eq!(run.limits_left, 0);
    }

    #[test]
    fn latency_target_respects_weights_and_a_step_shaped_device() {
        // A rate-limited device (QEMU iops-total): latency is flat below the limit and jumps
        // to depth/limit above it; base latency 200 µs.
        let mut dev = SimDevice {
            capacity: 1000.0,
            base_us: 200.0,
            depth: 64.0,
            seed: 7,
        };
        let target = 5_000.0;
        let run = simulate(&mut dev, &[2.0, 1.0, 1.0], target, 60, 0);
        let shares: Vec<f64> = run.per_guest.iter().map(|g| mean(&g[15..])).collect();
        assert!(
            (shares[0] / shares[1] - 2.0).abs() < 0.3 && (shares[0] / shares[2] - 2.0).abs() < 0.3,
            "weights 2:1:1: {shares:?}"
        );
        assert!(jain_index(&shares[1..]) >= 0.95, "{shares:?}");
        let kept = mean(&run.total[15..]) / knee(&dev, target);
        assert!(kept >= 0.85, "kept {kept:.2}: {:?}", run.total);
        assert_held(&run.latency[15..], target);
    }

    #[test]
    fn a_device_under_its_target_is_never_throttled() {
        let mut dev = SimDevice {
            capacity: 2000.0,
            base_us: 500.0,
            // Shallow queues: even saturated, latency is 8 ms.
            depth: 16.0,
            seed: 3,
        };
        let run = simulate(&mut dev, &[1.0, 1.0], 10_000.0, 30, 0);
        assert!(run.engaged.iter().all(|e| !e), "{:?}", run.latency);
        assert!(run.capacity.is_none());
    }

    #[test]
    fn latency_controller_follows_a_device_that_gets_faster_or_slower() {
        let lk = LatencyKnobs::default();
        let mut lc = LatencyController::default();
        let target = 10_000.0;
        // Step-shaped device: meets the target up to `cap`, misses above.
        let tick = |lc: &mut LatencyController, cap: f64, w: Option<f64>| {
            let offered = w.unwrap_or(1e6);
            let got = offered.min(cap);
            let lat = if offered > cap { 40_000.0 } else { 1_000.0 };
            lc.step(
                target,
                &LatencySample {
                    latency_us: Some(lat),
                    completions: got as u64,
                    iops: got,
                },
                &lk,
            )
        };
        let mut w = None;
        for _ in 0..40 {
            w = tick(&mut lc, 5000.0, w);
        }
        let w1 = w.unwrap();
        assert!((4500.0..=5200.0).contains(&w1), "{w1}");
        // Slower device: the window follows it down.
        for _ in 0..40 {
            w = tick(&mut lc, 2000.0, w);
        }
        let w2 = w.unwrap();
        assert!((1800.0..=2080.0).contains(&w2), "{w2}");
        // Faster again: the forgetting re-probes and finds it.
        for _ in 0..150 {
            w = tick(&mut lc, 4000.0, w);
        }
        let w3 = w.unwrap();
        assert!((3500.0..=4160.0).contains(&w3), "{w3}");
        // (Each within the probe margin: a probe runs up to 4% above the knee.)
        // Bad input does not crash or move it.
        let before = lc.clone();
        lc.step(
            target,
            &LatencySample {
                latency_us: Some(f64::NAN),
                completions: 100,
                iops: f64::INFINITY,
            },
            &lk,
        );
        assert_eq!(lc.window, before.window);
    }

    /// First tick from which every `span` ticks delivered at least `share` of `capacity` on
    /// average with a median latency at or under `target`.
    fn settled_at(run: &SimRun, span: usize, share: f64, target: f64) -> Option<usize> {
        let n = run.total.len().saturating_sub(span);
        let good = |t: usize| {
            let mut l = run.latency[t..t + span].to_vec();
            l.sort_by(f64::total_cmp);
            mean(&run.total[t..t + span]) >= share * 600.0 && l[span / 2] <= target
        };
        (0..n).find(|t| (*t..n).all(good))
    }

    /// Median latency and the share of ticks over the target.
    fn held(latency: &[f64], target: f64) -> (f64, f64) {
        let mut sorted = latency.to_vec();
        sorted.sort_by(f64::total_cmp);
        let over = latency.iter().filter(|l| **l > target).count();
        (
            sorted[sorted.len() / 2],
            over as f64 / latency.len().max(1) as f64,
        )
    }

    fn trace(run: &SimRun) -> String {
        run.windows
            .iter()
            .zip(&run.total)
            .zip(&run.latency)
            .enumerate()
            .map(|(i, ((w, t), l))| {
                format!(
                    "{i}: w={} got={t:.0} p95={:.1}ms",
                    w.map_or("-".into(), |w| format!("{w:.0}")),
                    l / 1000.0
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What a run on the 600 IOPS rate-limited device showed from `from` on.
    struct Held {
        seed: u64,
        settled: usize,
        kept: f64,
        median_us: f64,
        over: f64,
        capacity: f64,
        shares: Vec<f64>,
    }

    /// Runs the guest test's scenario (600 IOPS QEMU limit, weights 2:1:1, p95 2 ms, 0.5 s
    /// ticks) for seeds 1-8 with `setup` applied to the device; prints one line per seed.
    fn rate_limited_runs(
        setup: impl Fn(&mut SimBucket),
        from: usize,
        span: usize,
        share: f64,
    ) -> Vec<(Held, SimRun)> {
        (1..=8)
            .map(|seed| {
                let mut dev = SimBucket::new(600.0, seed);
                setup(&mut dev);
                let run = simulate(&mut dev, &[2.0, 1.0, 1.0], 2000.0, 160, 20);
                let (median_us, over) = held(&run.latency[from..], 2000.0);
                let h = Held {
                    seed,
                    settled: settled_at(&run, span, share, 2000.0).unwrap_or(usize::MAX),
                    kept: mean(&run.total[from..]) / 600.0,
                    median_us,
                    over,
                    capacity: run.capacity.unwrap_or(0.0),
                    shares: run.per_guest.iter().map(|g| mean(&g[from..])).collect(),
                };
                println!(
                    "seed {seed}: settled at tick {}, kept {:.3}, median p95 {:.0} µs, {:.2} of \
                     ticks over, capacity {:.0}, shares {:.0?}",
                    h.settled, h.kept, h.median_us, h.over, h.capacity, h.shares
                );
                (h, run)
            })
            .collect()
    }

    #[test]
    fn latency_controller_recovers_from_an_early_spike_on_a_rate_limited_device() {
        // The stuck case seen in the 6.1 guest (QEMU limit 600 IOPS, target p95 2 ms, 0.5 s
        // ticks): slow ticks at any rate right after engaging (a loaded host) drove the window
        // far down, a miss measured there closed the bracket at 266 IOPS, and it held there
        // (throughput 362). Here 3 s of 8 ms ticks whatever the rate, right after engaging.
        for (h, run) in rate_limited_runs(|d| d.spike = 3..9, 40, 20, 0.9) {
            let why = || format!("seed {}:\n{}", h.seed, trace(&run));
            // Back to at least 90% of the device within 15 s (30 ticks) of the spike's end.
            assert!(h.settled <= 9 + 30, "settled at {}: {}", h.settled, why());
            assert!(h.kept >= 0.9, "kept {:.2}: {}", h.kept, why());
            assert!(h.median_us <= 2000.0 && h.over <= 0.2, "{}", why());
            assert!((540.0..=630.0).contains(&h.capacity), "{}", why());
        }
    }

    #[test]
    fn latency_controller_recovers_from_a_wrong_miss_far_under_the_knee() {
        // Whatever put it there, a bracket closed far under the knee (a miss measured at 266
        // on a device whose knee is 600) is left: the forgetting reopens it, a probe at the
        // old miss meets the target, and the ramp climbs back.
        let lk = LatencyKnobs::default();
        let mut lc = LatencyController {
            engaged: true,
            window: Some(255.0),
            good: Some(255.0),
            bad: Some(266.0),
            bad_measured: 266.0,
            // Engaged when the device did its 600 unthrottled.
            miss_high: Some(600.0),
            speedup: 1.0,
            step: lk.close,
            min_window: 150.0,
            ..LatencyController::default()
        };
        let mut w = lc.window;
        let mut at = None;
        for tick in 0..60 {
            let offered = w.unwrap_or(1e6);
            let got = offered.min(600.0);
            let lat = if offered > 600.0 { 5000.0 } else { 300.0 };
            w = lc.step(
                2000.0,
                &LatencySample {
                    latency_us: Some(lat),
                    completions: got as u64,
                    iops: got,
                },
                &lk,
            );
            if at.is_none() && w.is_some_and(|w| w >= 540.0) {
                at = Some(tick);
            }
        }
        // The ramp is quick far under the rate seen saturated at engaging; within 12% of it
        // each step must meet the target for `trust_ticks` (a rate limiter's bucket).
        let at = at.expect("never back to 90% of the knee");
        assert!(at <= 40, "back at 90% only after {at} ticks");
        let w = w.unwrap_or(0.0);
        assert!((540.0..=650.0).contains(&w), "window {w:.0}");
    }

    #[test]
    fn a_probe_that_delivered_a_burst_does_not_hide_the_misses_after_it() {
        // Seen in the 6.1 guest: a probe at 634 IOPS delivered 633 in its first tick (QEMU's
        // bucket) and then missed; the window went to 609, still above the 600 the device
        // does, and the misses there (8 ms, delivering 600) must still cut it.
        let lk = LatencyKnobs::default();
        let mut lc = LatencyController {
            engaged: true,
            window: Some(634.0),
            good: Some(599.0),
            bad: Some(640.0),
            bad_measured: 640.0,
            speedup: 1.0,
            step: lk.close,
            min_window: 150.0,
            since_suspect: u32::MAX,
            ..LatencyController::default()
        };
        let mut first = true;
        let mut w = lc.window;
        let mut windows = vec![];
        for _ in 0..20 {
            let offered = w.unwrap_or(1e6);
            let (got, lat) = match (offered > 600.0, first) {
                (true, true) => (offered, 500.0),
                (true, false) => (600.0, 8000.0),
                (false, _) => (offered, 400.0),
            };
            first = false;
            w = lc.step(
                2000.0,
                &LatencySample {
                    latency_us: Some(lat),
                    completions: got as u64,
                    iops: got,
                },
                &lk,
            );
            windows.push(w.unwrap_or(0.0));
        }
        // Cut under the capacity at the first judgement (2 ticks over of 3), and held there
        // until the bracket reopens for a probe.
        assert!(
            windows[2..15].iter().all(|w| (540.0..=600.0).contains(w)),
            "{windows:.0?}"
        );
    }

    #[test]
    fn a_cut_to_just_under_a_full_rate_limiter_is_cut_again() {
        // Seen in the 6.1 guest (QEMU limit 600 IOPS, p95 target 3 ms, 0.5 s ticks): 600 met
        // the target; a probe at 625-633 met it for a second (the bucket's burst, 633
        // delivered), then missed; the window went to 598 and held there with 8 ms for 20 s,
        // the device delivering 598-601: the bucket drains only at the difference, and the
        // cut was taken for one that had not lowered the latency.
        let lk = LatencyKnobs::default();
        let mut lc = LatencyController {
            engaged: true,
            window: Some(633.0),
            good: Some(623.0),
            bad: None,
            bad_measured: 600.0,
            miss_high: Some(600.0),
            speedup: 1.0,
            step: lk.close,
            min_window: 150.0,
            since_suspect: u32::MAX,
            met_ticks: 2,
            ..LatencyController::default()
        };
        // The bucket: full after a tick over 600, and full until the rate is clearly under
        // it (590); while full, 8 ms at 600.
        let mut full = false;
        let mut first = true;
        let mut w = lc.window;
        let mut trace = vec![];
        for _ in 0..60 {
            let offered = w.unwrap_or(1e6);
            let (got, lat) = if first {
                (offered, 1100.0)
            } else {
                full = offered > 600.0 || (full && offered > 590.0);
                if full {
                    (offered.min(600.0), 8000.0)
                } else {
                    (offered, 400.0)
                }
            };
            first = false;
            w = lc.step(
                3000.0,
                &LatencySample {
                    latency_us: Some(lat),
                    completions: got as u64,
                    iops: got,
                },
                &lk,
            );
            trace.push((w.unwrap_or(0.0), lat));
        }
        // Out of the full bucket within 10 ticks, and from then on mostly under the target
        // at 85% of the device or more.
        let over = trace[10..].iter().filter(|(_, l)| *l > 3000.0).count();
        let low = trace[10..].iter().filter(|(w, _)| *w < 510.0).count();
        assert!(over * 5 <= trace.len() - 10 && low == 0, "{trace:.0?}");
    }

    #[test]
    fn latency_target_holds_on_a_rate_limited_device_on_a_noisy_host() {
        // One tick in ten is slow whatever the rate (TCG on a loaded host): no tick alone
        // moves the window, and a miss that was noise is forgotten.
        for (h, run) in rate_limited_runs(|d| d.p_spike = 0.1, 20, 20, 0.85) {
            let why = || format!("seed {}:\n{}", h.seed, trace(&run));
            // Settled within 10 s (20 ticks) of the load starting: from then on every 10 s
            // deliver at least 85% of the device with a median tick under the target.
            assert!(h.settled <= 20, "settled at {}: {}", h.settled, why());
            assert!(h.kept >= 0.9, "kept {:.2}: {}", h.kept, why());
            // A tenth of the ticks are slow whatever the window.
            assert!(h.median_us <= 2000.0 && h.over <= 0.3, "{}", why());
            let s = &h.shares;
            assert!(
                (s[0] / s[1] - 2.0).abs() < 0.3 && jain_index(&s[1..]) >= 0.95,
                "weights 2:1:1: {s:?}"
            );
            assert!(!run.engaged.last().unwrap_or(&true), "not released");
            assert_eq!(run.limits_left, 0);
        }
    }

    #[test]
    fn latency_target_holds_on_a_quiet_rate_limited_device() {
        for (h, run) in rate_limited_runs(|_| {}, 20, 20, 0.9) {
            let why = || format!("seed {}:\n{}", h.seed, trace(&run));
            assert!(h.settled <= 20, "settled at {}: {}", h.settled, why());
            assert!(h.kept >= 0.9, "kept {:.2}: {}", h.kept, why());
            assert!(h.median_us <= 2000.0 && h.over <= 0.15, "{}", why());
            assert!((540.0..=630.0).contains(&h.capacity), "{}", why());
        }
    }

    #[test]
    fn a_target_missed_at_any_rate_does_not_starve_the_guests() {
        let lk = LatencyKnobs::default();
        let mut lc = LatencyController::default();
        let mut w = None;
        for _ in 0..50 {
            let got = w.unwrap_or(1000.0_f64).min(1000.0);
            w = lc.step(
                2000.0,
                &LatencySample {
                    latency_us: Some(9000.0),
                    completions: got as u64,
                    iops: got,
                },
                &lk,
            );
        }
        // Engaging cut to 800; the latency did not follow, so it holds there.
        assert_eq!(w, Some(800.0), "held at the first cut");
    }

    #[test]
    fn a_latency_floor_over_the_target_stops_the_cuts() {
        // Seen in the 6.1 guest on a loaded host: the saturated disk's 8 ms fell to ~3 ms
        // once under its 600 IOPS, and stayed there at any rate (TCG starved of CPU). One cut
        // learns that latency follows the rate; the next, that it no longer does: the window
        // holds there instead of going down to its floor.
        let lk = LatencyKnobs::default();
        let mut lc = LatencyController::default();
        let mut w: Option<f64> = None;
        let mut windows = vec![];
        for _ in 0..60 {
            let offered = w.unwrap_or(1e6);
            let got = offered.min(600.0);
            let lat = if offered > 600.0 { 8000.0 } else { 3000.0 };
            w = lc.step(
                2000.0,
                &LatencySample {
                    latency_us: Some(lat),
                    completions: got as u64,
                    iops: got,
                },
                &lk,
            );
            windows.push(w.unwrap_or(0.0));
        }
        let last = windows[windows.len() - 1];
        assert!(
            (360.0..=480.0).contains(&last) && windows[20..].iter().all(|x| *x == last),
            "{windows:.0?}"
        );
    }
}
