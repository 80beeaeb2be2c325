//! `overkvm-io throttle reset|status`: the throttle without the daemon.

use std::path::Path;

use crate::{config::Config, text::sanitize};

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}

/// `overkvm-io throttle reset`: undoes what the state file of the daemon configured by
/// `config` records.
pub fn reset(config: Option<&Path>) -> anyhow::Result<()> {
    let msg = super::reset(&load_config(config)?)?;
    println!("{msg}");
    Ok(())
}

/// `overkvm-io throttle status`: budgets, use and limits, as text or one JSON object.
pub fn status(config: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let st = super::status(&load_config(config)?)?;
    if json {
        println!("{}", serde_json::to_string(&st)?);
        return Ok(());
    }
    match &st.daemon {
        None => println!("no running daemon has reported (no status file)"),
        Some(v) => {
            for b in &v.budgets {
                println!(
                    "{} {:<10} budget {:>8} IOPS  used {:>8.0} IOPS  {}",
                    if b.storage { "storage" } else { "device" },
                    sanitize(&b.device),
                    b.iops_budget
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-".into()),
                    b.iops_used,
                    if b.engaged { "ENGAGED" } else { "" }
                );
                if let Some(t) = b.latency_target_us {
                    let ms = |v: Option<f64>| {
                        v.map(|v| format!("{:.2} ms", v / 1000.0))
                            .unwrap_or_else(|| "-".into())
                    };
                    let iops = |v: Option<f64>| {
                        v.map(|v| format!("{v:.0} IOPS"))
                            .unwrap_or_else(|| "-".into())
                    };
                    println!(
                        "       {:<10} latency {} {} (target {})  capacity at target {}{}",
                        "",
                        b.latency_percentile
                            .map_or_else(|| "mean".to_string(), |p| format!("p{p}")),
                        ms(b.latency_us),
                        ms(Some(t)),
                        iops(b.capacity_iops),
                        b.latency_window_iops
                            .map(|w| format!("  holding VMs to {w:.0} IOPS"))
                            .unwrap_or_default()
                    );
                }
            }
            for l in &v.limits {
                let f = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "max".into());
                println!(
                    "limit  vm {:<20} {:<10} riops={} wiops={} rbps={} wbps={}  for {:.0}s  ({})",
                    sanitize(&l.vm),
                    l.device,
                    f(l.riops),
                    f(l.wiops),
                    f(l.rbps),
                    f(l.wbps),
                    l.since_s,
                    match &l.qemu_disks {
                        Some(d) => format!("in QEMU: {}", sanitize(&d.join(", "))),
                        None => sanitize(&l.cgroup),
                    }
                );
            }
            // QEMU's own limits, as their owner (operator, Nova, Proxmox) set them.
            for q in &v.qemu_limits {
                for d in &q.disks {
                    println!("qemu   vm {:<20} {}", sanitize(&q.vm), sanitize(&d.text()));
                }
            }
            // Network storage: counted by QEMU, in the storage budgets that cover it.
            for s in &v.storage {
                let budgets: Vec<&str> = v
                    .budgets
                    .iter()
                    .filter(|b| {
                        b.storage
                            && crate::storage_target::StorageTarget::parse(&b.device)
                                .is_ok_and(|t| t.covers(&s.target))
                    })
                    .map(|b| b.device.as_str())
                    .collect();
                println!(
                    "storage {:<40} R {:>8.0} IOPS  W {:>8.0} IOPS  VMs {}  (network, {})",
                    sanitize(&s.target),
                    s.read_iops,
                    s.write_iops,
                    sanitize(&s.vms.join(", ")),
                    if budgets.is_empty() {
                        "no budget".to_string()
                    } else {
                        format!("budget {}", sanitize(&budgets.join(", ")))
                    }
                );
            }
            for p in &v.problems {
                println!("problem: {}", sanitize(p));
            }
        }
    }
    if st.daemon.is_none() && !st.budgets.is_empty() {
        for b in &st.budgets {
            println!(
                "budget {} iops={:?} latency_target={:?}",
                sanitize(b.target.as_deref().unwrap_or(&b.device)),
                b.iops,
                b.latency_target
                    .map(|t| humantime::format_duration(t).to_string())
            );
        }
    }
    println!(
        "recorded limits (undone by `throttle reset`): {} cgroup, {} QEMU",
        st.recorded.limits.len(),
        st.recorded.qemu.len()
    );
    Ok(())
}
