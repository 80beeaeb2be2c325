//! The throttle config file (TOML): refused with a line and a reason, or accepted only when
//! every value is in the range `Config::parse` promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::config::Config;

fn within(v: Option<f64>, lo: f64, hi: f64) -> bool {
    v.is_none_or(|v| v.is_finite() && v >= lo && v <= hi)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let c = match Config::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            let _ = format!("{e:#}");
            return;
        }
    };
    let p = &c.policy;
    assert!(within(p.engage_above, 0.1, 10.0));
    assert!(within(p.release_below, 0.0, 1.0));
    assert!(within(p.deadband, 0.0, 0.9));
    assert!(within(p.relax_step, 0.01, 10.0));
    if let (Some(e), Some(r)) = (p.engage_above, p.release_below) {
        assert!(r < e);
    }
    assert!(p.interval.is_none_or(|d| !d.is_zero()));
    assert!(p.engage_ticks != Some(0) && p.release_ticks != Some(0) && p.floor_iops != Some(0));
    let l = &c.latency;
    assert!(within(l.release_below, f64::MIN_POSITIVE, 1.0));
    assert!(within(l.setpoint, f64::MIN_POSITIVE, 1.0));
    assert!(within(l.min_fraction, f64::MIN_POSITIVE, 1.0));
    if let (Some(r), Some(s)) = (l.release_below, l.setpoint) {
        assert!(r < s);
    }
    assert!(l.engage_ticks != Some(0) && l.release_ticks != Some(0));
    assert!(l.min_completions != Some(0) && l.floor_iops != Some(0));
    for (i, d) in c.devices.iter().enumerate() {
        assert!(!d.device.trim().is_empty());
        let budgets = [
            d.iops,
            d.read_iops,
            d.write_iops,
            d.bps,
            d.read_bps,
            d.write_bps,
        ];
        assert!(budgets.iter().any(Option::is_some));
        assert!(!budgets.contains(&Some(0)));
        assert!(!(d.iops.is_some() && (d.read_iops.is_some() || d.write_iops.is_some())));
        assert!(!(d.bps.is_some() && (d.read_bps.is_some() || d.write_bps.is_some())));
        assert!(
            c.devices[..i]
                .iter()
                .all(|o| o.device.trim() != d.device.trim())
        );
    }
    for v in &c.vms {
        let selectors = [v.name.is_some(), v.uuid.is_some(), v.manager.is_some()];
        assert_eq!(selectors.iter().filter(|s| **s).count(), 1);
        assert!(
            v.manager
                .as_deref()
                .is_none_or(|m| matches!(m, "qemu" | "libvirt" | "nova" | "proxmox"))
        );
        assert!(
            v.weight
                .is_none_or(|w| w.is_finite() && w > 0.0 && w <= 1000.0)
        );
        let name = v.name.as_deref().unwrap_or("");
        let _ = c.rule_for(
            name,
            v.uuid.as_deref(),
            v.manager.as_deref().unwrap_or("qemu"),
        );
    }
});
