//! The TOML configuration: device budgets, per-VM rules and policy knobs, validated as a whole
//! before anything is applied. Errors name the line and say what is wrong.
//!
//! The smallest useful file:
//! ```toml
//! [[device]]
//! device = "loop0"
//! iops = 3000
//! ```

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// A duration written as seconds (`1`, `0.5`) or with a unit (`"1s"`, `"500ms"`, `"2m"`).
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    let raw = Option::<Raw>::deserialize(d)?;
    let dur = match raw {
        None => return Ok(None),
        Some(Raw::Secs(s)) if s.is_finite() && s > 0.0 && s <= 86_400.0 => {
            Duration::from_secs_f64(s)
        }
        Some(Raw::Secs(s)) => {
            return Err(serde::de::Error::custom(format!(
                "{s} s is not a duration between 0 and 86400 s"
            )));
        }
        Some(Raw::Text(t)) => humantime::parse_duration(t.trim())
            .map_err(|e| serde::de::Error::custom(format!("{t:?} is not a duration: {e}")))?,
    };
    if dur.is_zero() {
        return Err(serde::de::Error::custom("a duration must be positive"));
    }
    Ok(Some(dur))
}

/// Control-loop knobs. Every one has a default that works without configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Control loop period (default 1 s).
    #[serde(default, deserialize_with = "de_duration")]
    pub interval: Option<Duration>,
    /// Ticks a device must be over `engage_above` × budget before limits are set (default 2).
    pub engage_ticks: Option<u32>,
    /// Fraction of the budget above which a device counts as over (default 1.0).
    pub engage_above: Option<f64>,
    /// Fraction of the budget below which demand counts as low (default 0.7).
    pub release_below: Option<f64>,
    /// Ticks of low demand before every limit on a device is removed (default 10).
    pub release_ticks: Option<u32>,
    /// No guest is limited below this many IOPS per direction (default 20).
    pub floor_iops: Option<u64>,
    /// Relative change below which a limit is not rewritten (default 0.04): each write restarts
    /// the kernel's throttle slice.
    pub deadband: Option<f64>,
    /// Largest relative increase of a limit per tick while relaxing (default 0.25).
    pub relax_step: Option<f64>,
    /// Move a VM's qemu (all threads) into its own cgroup under `overkvm/` when it shares one.
    pub manage_cgroups: Option<bool>,
    /// How long a VM's cgroup counts as shared after another process's last I/O in it
    /// (default 10 min): a cron job's short bursts keep it shared between runs
    /// (`throttle::sharing`).
    #[serde(default, deserialize_with = "de_duration")]
    pub shared_hold: Option<Duration>,
    /// Where the record of written limits is kept (default /run/overkvm/throttle.json).
    pub state_file: Option<String>,
    /// What holds a VM to its limit: its block cgroup, QEMU's own disk throttling
    /// (`block_set_io_throttle`, through libvirt for its domains), or `auto` (default): QEMU
    /// where a cgroup cannot act (see `throttle::qemu_actuator::choose`).
    pub actuator: Option<ActuatorMode>,
}

/// `[latency]`: the latency controller's knobs an operator tunes (the controller engages on a
/// device with a `latency_target`). Each defaults, when unset, to the value in
/// `throttle::latency::LatencyKnobs::default()`; the controller's other knobs are internal
/// tuning and stay fixed. Counts are in ticks (`[policy] interval`). Checked on the way in
/// (`RawLatencyPolicy`), so every value here is within its range.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(try_from = "RawLatencyPolicy")]
pub struct LatencyPolicy {
    /// Ticks a device's latency must stay over its target before the controller engages
    /// (default 2).
    pub engage_ticks: Option<u32>,
    /// Ticks of latency well under the target (see `release_below`) with the guests not held
    /// back, or of an idle device, before the controller lets go (default 10).
    pub release_ticks: Option<u32>,
    /// "Well under the target": below this fraction of it (default 0.5).
    pub release_below: Option<f64>,
    /// A tick with fewer completions than this on the device says nothing about its latency
    /// and is not judged (default 32).
    pub min_completions: Option<u64>,
    /// A rate meets the target when its latency is at most this fraction of the target
    /// (default 0.9): the controller aims a little under the target, not at it.
    pub setpoint: Option<f64>,
    /// The controller never holds a device's guests, together, below this many IOPS
    /// (default 20).
    pub floor_iops: Option<u64>,
    /// Nor below this fraction of the rate the device delivered when the controller engaged
    /// (default 0.25): a target missed even at a small share of that rate is missed for
    /// another reason (a slow host, a failing disk), and starving the guests would not meet it.
    pub min_fraction: Option<f64>,
    /// Ticks not judged after a cut, while the device's queue (a rate limiter's backlog)
    /// drains (default 3); 0 judges the next tick.
    pub drain_ticks: Option<u32>,
}

/// `[latency]` as written: integers as signed, so that a negative value is reported with its
/// key rather than as a type mismatch.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLatencyPolicy {
    engage_ticks: Option<i64>,
    release_ticks: Option<i64>,
    release_below: Option<f64>,
    min_completions: Option<i64>,
    setpoint: Option<f64>,
    floor_iops: Option<i64>,
    min_fraction: Option<f64>,
    drain_ticks: Option<i64>,
}

impl TryFrom<RawLatencyPolicy> for LatencyPolicy {
    type Error = String;

    fn try_from(r: RawLatencyPolicy) -> Result<Self, String> {
        /// A whole number in `min..=max`, or what is wrong with it.
        fn whole<T: TryFrom<i64>>(
            v: Option<i64>,
            name: &str,
            min: i64,
            max: i64,
        ) -> Result<Option<T>, String> {
            match v {
                None => Ok(None),
                Some(v) if (min..=max).contains(&v) => T::try_from(v).map(Some).map_err(|_| {
                    format!("[latency] {name} = {v} is out of range ({min} to {max})")
                }),
                Some(v) if v < min => Err(format!("[latency] {name} = {v} must be at least {min}")),
                Some(v) => Err(format!("[latency] {name} = {v} must be at most {max}")),
            }
        }
        /// A fraction in (0, 1], or what is wrong with it.
        fn fraction(v: Option<f64>, name: &str) -> Result<Option<f64>, String> {
            match v {
                Some(f) if !(f.is_finite() && f > 0.0 && f <= 1.0) => Err(format!(
                    "[latency] {name} = {f} must be a fraction above 0 and at most 1"
                )),
                v => Ok(v),
            }
        }
        let ticks = i64::from(u32::MAX);
        let p = LatencyPolicy {
            engage_ticks: whole(r.engage_ticks, "engage_ticks", 1, ticks)?,
            release_ticks: whole(r.release_ticks, "release_ticks", 1, ticks)?,
            release_below: fraction(r.release_below, "release_below")?,
            min_completions: whole(r.min_completions, "min_completions", 1, i64::MAX)?,
            setpoint: fraction(r.setpoint, "setpoint")?,
            floor_iops: whole(r.floor_iops, "floor_iops", 1, i64::MAX)?,
            min_fraction: fraction(r.min_fraction, "min_fraction")?,
            drain_ticks: whole(r.drain_ticks, "drain_ticks", 0, ticks)?,
        };
        if let (Some(r), Some(s)) = (p.release_below, p.setpoint)
            && r >= s
        {
            return Err(format!(
                "[latency] release_below ({r}) must be below setpoint ({s}): latency at the \
                 rate the controller holds must not already count as well under the target"
            ));
        }
        Ok(p)
    }
}

/// `[policy] actuator`.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActuatorMode {
    /// QEMU where the cgroup cannot hold the VM, else the cgroup.
    #[default]
    Auto,
    /// Always the cgroup (overkvm's behaviour before QEMU throttling).
    Cgroup,
    /// QEMU wherever overkvm can reach it (its own VMs, libvirt's domains), else the cgroup.
    Qemu,
}

/// One budget: of a local device (`[[device]]`: whole disks, by name, /dev path or
/// "MAJ:MIN") or of a storage target VMs reach over the network (`[[storage]]`: a Ceph pool,
/// an NFS export, an iSCSI target, an NBD server or export; see `storage_target`). The two
/// share every budget figure; each names its subject with its own key.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceBudgetSpec {
    /// `[[device]]`: the local device.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    /// `[[storage]]`: the storage target, as `top` shows disks' targets (`rbd:volumes`,
    /// `nbd://10.0.0.5:10809`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Total (read + write) IOPS budget.
    pub iops: Option<u64>,
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    /// Optional bandwidth budget (bytes per second), total or per direction.
    pub bps: Option<u64>,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    /// Latency target (`"10ms"`): the throttle engages when the device's latency at
    /// `latency_percentile` stays above it, and holds the VMs to the rate that meets it.
    #[serde(
        default,
        deserialize_with = "de_duration",
        serialize_with = "ser_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub latency_target: Option<Duration>,
    /// Percentile of the device's latency the target applies to (default 95).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_percentile: Option<f64>,
}

impl DeviceBudgetSpec {
    /// The percentile (0-1) the latency target applies to.
    pub fn latency_quantile(&self) -> f64 {
        self.latency_percentile.unwrap_or(95.0) / 100.0
    }
}

/// A duration as text with its unit, the way it is written in the file.
fn ser_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// How a VM rule picks VMs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmRule {
    /// Match on the VM name.
    pub name: Option<String>,
    /// Match on the VM UUID.
    pub uuid: Option<String>,
    /// Match every VM of a manager: qemu, libvirt, nova, proxmox, kubevirt.
    pub manager: Option<String>,
    /// Share weight relative to others (default 1).
    pub weight: Option<f64>,
    /// IOPS guaranteed before anyone else's share (per device).
    pub reservation_iops: Option<u64>,
    /// Never limit this VM.
    #[serde(default)]
    pub exempt: bool,
}

/// What `/metrics` exports (`[export]`); `serve` flags override each key.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Latency histogram buckets: "compact" (default) or "full" (`--latency-buckets`).
    pub latency_buckets: Option<crate::export::latency::LatencyBuckets>,
    /// Most VMs exported; the least busy beyond it are left out and counted (`--max-vms`,
    /// default 2000).
    pub max_vms: Option<usize>,
}

/// `[policy]`'s values within their ranges, and consistent with each other.
fn check_policy(p: &Policy) -> anyhow::Result<()> {
    let check_frac = |v: Option<f64>, name: &str, lo: f64, hi: f64| -> anyhow::Result<()> {
        if let Some(v) = v
            && !(v.is_finite() && v >= lo && v <= hi)
        {
            anyhow::bail!("[policy] {name} = {v} is out of range ({lo} to {hi})");
        }
        Ok(())
    };
    check_frac(p.engage_above, "engage_above", 0.1, 10.0)?;
    check_frac(p.release_below, "release_below", 0.0, 1.0)?;
    check_frac(p.deadband, "deadband", 0.0, 0.9)?;
    check_frac(p.relax_step, "relax_step", 0.01, 10.0)?;
    if let (Some(e), Some(r)) = (p.engage_above, p.release_below)
        && r >= e
    {
        anyhow::bail!("[policy] release_below ({r}) must be below engage_above ({e})");
    }
    if p.engage_ticks == Some(0) || p.release_ticks == Some(0) {
        anyhow::bail!("[policy] engage_ticks and release_ticks must be at least 1");
    }
    if p.floor_iops == Some(0) {
        anyhow::bail!(
            "[policy] floor_iops must be at least 1 (a limit of 0 is refused by the kernel)"
        );
    }
    Ok(())
}

/// One `[[device]]` budget: what is wrong with it, if anything (`duplicate`: an earlier one
/// names the same device).
fn check_device(v: &DeviceBudgetSpec, duplicate: bool) -> Result<(), String> {
    if v.target.is_some() {
        return Err("a storage target's budget is a [[storage]] table, not a [[device]]".into());
    }
    if v.device.trim().is_empty() {
        return Err("device is empty".into());
    }
    if duplicate {
        return Err("the same device has two budgets".into());
    }
    check_figures(v)
}

/// One `[[storage]]` budget: what is wrong with it, if anything (`duplicate`: an earlier one
/// names the same target).
fn check_storage(v: &DeviceBudgetSpec, duplicate: bool) -> Result<(), String> {
    if !v.device.is_empty() {
        return Err("a [[storage]] budget names a target, not a device".into());
    }
    let Some(t) = &v.target else {
        return Err(
            "needs a target (rbd:POOL, nfs://SERVER/EXPORT, iscsi://PORTAL/IQN, \
                    nbd://HOST:PORT[/EXPORT])"
                .into(),
        );
    };
    crate::storage_target::StorageTarget::parse(t)?;
    if v.latency_percentile.is_some() {
        return Err(
            "latency_percentile does not apply to storage: QEMU counts a mean time \
                    per operation, not a distribution, so latency_target is held by the mean"
                .into(),
        );
    }
    if duplicate {
        return Err("the same target has two budgets".into());
    }
    check_figures(v)
}

/// The figures of a budget, device or storage: what is wrong with them, if anything.
fn check_figures(v: &DeviceBudgetSpec) -> Result<(), String> {
    let has_iops = v.iops.is_some() || v.read_iops.is_some() || v.write_iops.is_some();
    let has_bps = v.bps.is_some() || v.read_bps.is_some() || v.write_bps.is_some();
    if !has_iops && !has_bps && v.latency_target.is_none() {
        return Err("needs a budget: iops (or read_iops/write_iops), bps or latency_target".into());
    }
    if let Some(t) = v.latency_target
        && !(Duration::from_micros(50)..=Duration::from_secs(10)).contains(&t)
    {
        return Err(format!(
            "latency_target {} is out of range (50us to 10s)",
            humantime::format_duration(t)
        ));
    }
    if let Some(p) = v.latency_percentile {
        if v.latency_target.is_none() {
            return Err("latency_percentile needs a latency_target to apply to".into());
        }
        if !(p.is_finite() && (50.0..=99.9).contains(&p)) {
            return Err(format!(
                "latency_percentile {p} is out of range (50 to 99.9)"
            ));
        }
    }
    if v.iops.is_some() && (v.read_iops.is_some() || v.write_iops.is_some()) {
        return Err("give either iops (total) or read_iops/write_iops, not both".into());
    }
    if v.bps.is_some() && (v.read_bps.is_some() || v.write_bps.is_some()) {
        return Err("give either bps (total) or read_bps/write_bps, not both".into());
    }
    for (name, val) in [
        ("iops", v.iops),
        ("read_iops", v.read_iops),
        ("write_iops", v.write_iops),
        ("bps", v.bps),
        ("read_bps", v.read_bps),
        ("write_bps", v.write_bps),
    ] {
        if val == Some(0) {
            return Err(format!("{name} must be positive"));
        }
    }
    Ok(())
}

/// One `[[vm]]` rule: what is wrong with it, if anything.
fn check_vm_rule(v: &VmRule) -> Result<(), String> {
    let sel = [v.name.is_some(), v.uuid.is_some(), v.manager.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if sel != 1 {
        return Err("needs exactly one of name, uuid or manager".into());
    }
    if let Some(m) = &v.manager
        && !matches!(
            m.as_str(),
            "qemu" | "libvirt" | "nova" | "proxmox" | "kubevirt"
        )
    {
        return Err(format!(
            "manager {m:?} is not one of qemu, libvirt, nova, proxmox, kubevirt"
        ));
    }
    if let Some(w) = v.weight
        && !(w.is_finite() && w > 0.0 && w <= 1000.0)
    {
        return Err(format!("weight {w} must be between 0 and 1000"));
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    latency: LatencyPolicy,
    #[serde(default)]
    export: ExportConfig,
    #[serde(default)]
    device: Vec<Spanned<DeviceBudgetSpec>>,
    #[serde(default)]
    storage: Vec<Spanned<DeviceBudgetSpec>>,
    #[serde(default)]
    vm: Vec<Spanned<VmRule>>,
}

/// A validated configuration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub policy: Policy,
    pub latency: LatencyPolicy,
    pub export: ExportConfig,
    pub devices: Vec<DeviceBudgetSpec>,
    /// `[[storage]]` budgets, each with its `target` set.
    pub storage: Vec<DeviceBudgetSpec>,
    pub vms: Vec<VmRule>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    /// Parses and validates config text; the error names the line and the reason.
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            match line {
                Some(l) => anyhow::anyhow!("line {l}: {}", e.message()),
                None => anyhow::anyhow!("{}", e.message()),
            }
        })?;
        check_policy(&raw.policy)?;
        if raw.export.max_vms == Some(0) {
            anyhow::bail!("[export] max_vms must be at least 1");
        }
        let mut devices: Vec<DeviceBudgetSpec> = Vec::new();
        for d in &raw.device {
            let line = line_of(text, d.span().start);
            let v = d.get_ref();
            let same = devices.iter().any(|o| o.device.trim() == v.device.trim());
            check_device(v, same)
                .map_err(|msg| anyhow::anyhow!("line {line}: [[device]] {:?}: {msg}", v.device))?;
            devices.push(v.clone());
        }
        let mut storage: Vec<DeviceBudgetSpec> = Vec::new();
        for d in &raw.storage {
            let line = line_of(text, d.span().start);
            let v = d.get_ref();
            let same = storage.iter().any(|o| o.target == v.target);
            check_storage(v, same).map_err(|msg| {
                anyhow::anyhow!(
                    "line {line}: [[storage]] {:?}: {msg}",
                    v.target.as_deref().unwrap_or("")
                )
            })?;
            storage.push(DeviceBudgetSpec {
                target: v.target.as_ref().map(|t| t.trim().to_string()),
                ..v.clone()
            });
        }
        let mut vms = Vec::new();
        for r in &raw.vm {
            let line = line_of(text, r.span().start);
            check_vm_rule(r.get_ref())
                .map_err(|msg| anyhow::anyhow!("line {line}: [[vm]] {msg}"))?;
            vms.push(r.get_ref().clone());
        }
        Ok(Config {
            policy: raw.policy,
            latency: raw.latency,
            export: raw.export,
            devices,
            storage,
            vms,
        })
    }

    /// Whether any budget is configured (the throttle runs only then).
    pub fn has_budgets(&self) -> bool {
        !self.devices.is_empty() || !self.storage.is_empty()
    }

    /// The rule that applies to a VM: name and uuid rules before manager rules.
    pub fn rule_for(&self, name: &str, uuid: Option<&str>, manager: &str) -> Option<&VmRule> {
        self.vms
            .iter()
            .find(|r| r.name.as_deref() == Some(name))
            .or_else(|| {
                uuid.and_then(|u| {
                    self.vms
                        .iter()
                        .find(|r| r.uuid.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(u)))
                })
            })
            .or_else(|| {
                self.vms
                    .iter()
                    .find(|r| r.manager.as_deref() == Some(manager))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../examples/overkvm.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.vms.len(), 3);
    }

    /// The packages' /etc/overkvm/overkvm.toml: valid, and it sets nothing (no budget, so the
    /// service only exports metrics until an operator adds one); the budget it shows in its
    /// comments (the lines indented under `#`) is valid once uncommented.
    #[test]
    fn packaged_config_sets_no_budget_and_its_example_is_valid() {
        let text = include_str!("../../packaging/overkvm.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
        let example: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("#   "))
            .map(|l| format!("{l}\n"))
            .collect();
        let c = Config::parse(&example).unwrap();
        assert_eq!(c.devices.len(), 1, "{example}");
        assert_eq!(c.devices[0].iops, Some(30000));
    }

    #[test]
    fn minimal_file_works() {
        let c = Config::parse("[[device]]\ndevice = \"loop0\"\niops = 3000\n").unwrap();
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.devices[0].iops, Some(3000));
        assert_eq!(c.policy, Policy::default());
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
[policy]
interval = "500ms"
engage_ticks = 3
engage_above = 1.0
release_below = 0.6
floor_iops = 30
deadband = 0.05

[[device]]
device = "7:0"
read_iops = 2000
write_iops = 1000
write_bps = 100000000

[[vm]]
name = "db1"
weight = 3
reservation_iops = 200

[[vm]]
manager = "proxmox"
exempt = true
"#,
        )
        .unwrap();
        assert_eq!(c.policy.interval, Some(Duration::from_millis(500)));
        assert_eq!(c.vms.len(), 2);
        assert_eq!(c.rule_for("db1", None, "qemu").unwrap().weight, Some(3.0));
        assert!(c.rule_for("x", None, "proxmox").unwrap().exempt);
        assert!(c.rule_for("x", None, "nova").is_none());
    }

    #[test]
    fn export_section_parses_and_is_checked() {
        use crate::export::latency::LatencyBuckets;
        let c = Config::parse(
            "[export]
latency_buckets = \"full\"
max_vms = 500
",
        )
        .unwrap();
        assert_eq!(c.export.latency_buckets, Some(LatencyBuckets::Full));
        assert_eq!(c.export.max_vms, Some(500));
        assert!(c.devices.is_empty());
        assert_eq!(Config::parse("").unwrap().export, ExportConfig::default());
        let e = err("[export]
latency_buckets = \"fine\"
");
        assert!(e.contains("line 2") && e.contains("fine"), "{e}");
        let e = err("[export]
max_vms = 0
");
        assert!(e.contains("max_vms"), "{e}");
        let e = err("[export]
max_vm = 10
");
        assert!(e.contains("max_vm"), "{e}");
    }

    fn err(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let e = err("[[device]]\ndevice = \"loop0\"\niops = \"many\"\n");
        assert!(e.contains("line 3"), "{e}");
        let e = err("\n\n[[device]]\ndevice = \"loop0\"\n");
        assert!(e.contains("line 3") && e.contains("needs a budget"), "{e}");
        let e = err("[[device]]\ndevice = \"loop0\"\niops = 0\n");
        assert!(e.contains("positive"), "{e}");
        let e = err("[[device]]\ndevice = \"loop0\"\niops = 10\nread_iops = 5\n");
        assert!(e.contains("not both"), "{e}");
        let e = err("[[device]]\ndevice = \"loop0\"\niops = 10\nbogus = 1\n");
        assert!(e.contains("line 4") && e.contains("bogus"), "{e}");
        let e = err("[[device]]\ndevice = \"a\"\niops = 1\n[[device]]\ndevice = \"a\"\niops = 2\n");
        assert!(e.contains("line 4") && e.contains("two budgets"), "{e}");
        let e = err("[[vm]]\nname = \"a\"\nuuid = \"b\"\n");
        assert!(e.contains("exactly one"), "{e}");
        let e = err("[[vm]]\nmanager = \"vmware\"\n");
        assert!(e.contains("vmware"), "{e}");
        let e = err("[policy]\nactuator = \"kernel\"\n");
        assert!(e.contains("unknown variant"), "{e}");
        assert_eq!(
            Config::parse("[policy]\nactuator = \"qemu\"\n")
                .unwrap()
                .policy
                .actuator,
            Some(ActuatorMode::Qemu)
        );
        let e = err("[policy]\ninterval = \"soon\"\n");
        assert!(e.contains("line 2") && e.contains("not a duration"), "{e}");
        let e = err("[policy]\nrelease_below = 0.9\nengage_above = 0.8\n");
        assert!(e.contains("must be below"), "{e}");
        let e = err("[[device]\n");
        assert!(e.contains("line 1"), "{e}");
        let e = err("[[device]]\ndevice = \"loop0\"\niops = -5\n");
        assert!(e.contains("line 3"), "{e}");
        let e = err("[[device]]\ndevice = \"loop0\"\nlatency_target = \"1h\"\n");
        assert!(e.contains("out of range"), "{e}");
        let e = err("[[device]]\ndevice = \"loop0\"\niops = 5\nlatency_percentile = 99\n");
        assert!(e.contains("needs a latency_target"), "{e}");
        let e = err(
            "[[device]]\ndevice = \"loop0\"\nlatency_target = \"5ms\"\nlatency_percentile = 100\n",
        );
        assert!(e.contains("50 to 99.9"), "{e}");
        let e = err("[[device]]\ndevice = \"loop0\"\nlatency_target = \"fast\"\n");
        assert!(e.contains("line 3") && e.contains("not a duration"), "{e}");
    }

    #[test]
    fn storage_budgets_name_a_target_and_are_checked() {
        let c = Config::parse(
            "[[storage]]\ntarget = \"rbd:volumes\"\niops = 20000\nwrite_bps = 400000000\n\
             [[storage]]\ntarget = \" nbd://10.0.0.5:10809 \"\nlatency_target = \"20ms\"\n",
        )
        .unwrap();
        assert!(c.devices.is_empty() && c.has_budgets());
        assert_eq!(c.storage.len(), 2);
        assert_eq!(c.storage[0].target.as_deref(), Some("rbd:volumes"));
        assert_eq!(c.storage[0].iops, Some(20000));
        assert_eq!(c.storage[1].target.as_deref(), Some("nbd://10.0.0.5:10809"));
        let json = serde_json::to_value(&c.storage[0]).unwrap();
        assert_eq!(json["target"], "rbd:volumes");
        assert!(json.get("device").is_none(), "{json}");
        assert!(!Config::default().has_budgets());

        let e = err("[[storage]]\niops = 5\n");
        assert!(e.contains("line 1") && e.contains("needs a target"), "{e}");
        let e = err("[[storage]]\ntarget = \"iscsi://10.0.0.1\"\niops = 5\n");
        assert!(e.contains("line 1") && e.contains("IQN"), "{e}");
        let e = err("[[storage]]\ntarget = \"loop0\"\niops = 5\n");
        assert!(e.contains("not a storage target"), "{e}");
        let e = err("[[storage]]\ntarget = \"rbd:p\"\n");
        assert!(e.contains("needs a budget"), "{e}");
        let e = err("[[storage]]\ndevice = \"vda\"\niops = 5\n");
        assert!(e.contains("not a device"), "{e}");
        let e = err("[[device]]\ntarget = \"rbd:p\"\niops = 5\n");
        assert!(e.contains("[[storage]] table"), "{e}");
        let e = err(
            "[[storage]]\ntarget = \"rbd:p\"\nlatency_target = \"5ms\"\nlatency_percentile = 99\n",
        );
        assert!(e.contains("mean"), "{e}");
        let e = err(
            "[[storage]]\ntarget = \"rbd:p\"\niops = 1\n[[storage]]\ntarget = \"rbd:p\"\niops = 2\n",
        );
        assert!(e.contains("line 4") && e.contains("two budgets"), "{e}");
    }

    #[test]
    fn latency_section_parses() {
        assert_eq!(Config::parse("").unwrap().latency, LatencyPolicy::default());
        let c = Config::parse(
            "[latency]\nengage_ticks = 3\nrelease_ticks = 20\nrelease_below = 0.4\n\
             min_completions = 8\nsetpoint = 0.95\nfloor_iops = 50\nmin_fraction = 0.1\n\
             drain_ticks = 0\n",
        )
        .unwrap();
        assert_eq!(
            c.latency,
            LatencyPolicy {
                engage_ticks: Some(3),
                release_ticks: Some(20),
                release_below: Some(0.4),
                min_completions: Some(8),
                setpoint: Some(0.95),
                floor_iops: Some(50),
                min_fraction: Some(0.1),
                drain_ticks: Some(0),
            }
        );
        // A fraction may be 1, and written as an integer.
        let c = Config::parse("[latency]\nmin_fraction = 1\n").unwrap();
        assert_eq!(c.latency.min_fraction, Some(1.0));
    }

    #[test]
    fn latency_section_errors_name_the_key() {
        for (text, want) in [
            ("engage_ticks = 0", "engage_ticks = 0 must be at least 1"),
            ("engage_ticks = -2", "engage_ticks = -2 must be at least 1"),
            ("release_ticks = 0", "release_ticks = 0 must be at least 1"),
            (
                "release_ticks = 5000000000",
                "release_ticks = 5000000000 must be at most",
            ),
            ("drain_ticks = -1", "drain_ticks = -1 must be at least 0"),
            (
                "min_completions = 0",
                "min_completions = 0 must be at least 1",
            ),
            ("floor_iops = 0", "floor_iops = 0 must be at least 1"),
            ("floor_iops = -20", "floor_iops = -20 must be at least 1"),
            ("setpoint = 0", "setpoint = 0 must be a fraction"),
            ("setpoint = 1.5", "setpoint = 1.5 must be a fraction"),
            (
                "release_below = -0.5",
                "release_below = -0.5 must be a fraction",
            ),
            ("min_fraction = 0", "min_fraction = 0 must be a fraction"),
            (
                "min_fraction = nan",
                "min_fraction = NaN must be a fraction",
            ),
            (
                "setpoint = 0.5\nrelease_below = 0.6",
                "release_below (0.6) must be below setpoint (0.5)",
            ),
        ] {
            let e = err(&format!("[latency]\n{text}\n"));
            assert!(e.contains(&format!("[latency] {want}")), "{text}: {e}");
            assert!(e.contains("line "), "{text}: {e}");
        }
        let e = err("[latency]\nforget = 0.01\n");
        assert!(e.contains("line 2") && e.contains("forget"), "{e}");
        let e = err("[latency]\nengage_ticks = 1.5\n");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn latency_target_alone_or_with_iops() {
        let c = Config::parse("[[device]]\ndevice = \"vdb\"\nlatency_target = \"10ms\"\n").unwrap();
        let d = &c.devices[0];
        assert_eq!(d.latency_target, Some(Duration::from_millis(10)));
        assert_eq!(d.latency_quantile(), 0.95);
        assert_eq!(d.iops, None);
        let c = Config::parse(
            "[[device]]\ndevice = \"vdb\"\niops = 900\nlatency_target = 0.002\nlatency_percentile = 99\n",
        )
        .unwrap();
        let d = &c.devices[0];
        assert_eq!(d.latency_target, Some(Duration::from_millis(2)));
        assert_eq!(d.latency_quantile(), 0.99);
        assert_eq!(d.iops, Some(900));
        let json = serde_json::to_value(d).unwrap();
        assert_eq!(json["latency_target"], "2ms");
    }
}
