//! Batch output: one plain-text table per interval, like `top -b`.

use std::io::{self, Write};

use crate::{
    report::{DeviceRow, Report},
    stats,
    text::sanitize,
};

/// Cuts to at most `width` characters, marking the cut with '+'.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else if width == 0 {
        String::new()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('+');
        t
    }
}

fn mb(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / secs / 1e6
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into())
}

/// The shape of a table of device rows.
struct DeviceTable {
    title: &'static str,
    /// Width of the name column.
    name: usize,
    /// Whether it has a flushes column.
    flushes: bool,
}

/// Block devices of the host, counted by the kernel hooks.
const DEVICES: DeviceTable = DeviceTable {
    title: "DEVICE",
    name: 12,
    flushes: false,
};

/// Network storage QEMU counts (long target names; QEMU's flushes are the guest's own).
const STORAGE: DeviceTable = DeviceTable {
    title: "STORAGE",
    name: 40,
    flushes: true,
};

/// One table of device rows, in the given order.
fn device_table(
    out: &mut impl Write,
    t: &DeviceTable,
    rows: &[DeviceRow],
    secs: f64,
) -> io::Result<()> {
    let iv = std::time::Duration::from_secs_f64(secs.max(0.0));
    let w = t.name;
    let flush_head = if t.flushes {
        format!(" {:>9}", "F/s")
    } else {
        String::new()
    };
    writeln!(
        out,
        "{:<w$} {:>9} {:>9} {:>9}{flush_head} {:>8} {:>8}  COUNTS",
        t.title, "IO/s", "R/s", "W/s", "RMB/s", "WMB/s"
    )?;
    for d in rows {
        let flushes = if t.flushes {
            format!(" {:>9.0}", stats::rate(d.counts.flush_ops, iv))
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:<w$} {:>9.0} {:>9.0} {:>9.0}{flushes} {:>8.1} {:>8.1}  {}",
            fit(&sanitize(&d.device), w),
            stats::rate(d.counts.total_ops(), iv),
            stats::rate(d.counts.read_ops, iv),
            stats::rate(d.counts.write_ops, iv),
            mb(d.counts.read_bytes, secs),
            mb(d.counts.write_bytes, secs),
            d.source.name()
        )?;
    }
    Ok(())
}

/// Writes one interval as text, processes in the report's order (see `sort::order_processes`).
pub fn write_table(out: &mut impl Write, r: &Report) -> io::Result<()> {
    let secs = r.interval_s;
    let iv = std::time::Duration::from_secs_f64(secs.max(0.0));
    writeln!(
        out,
        "overkvm-io top - {}  interval {:.2}s  hooks {}  VMs {}  processes {}",
        r.timestamp,
        secs,
        r.mode,
        r.vm_count(),
        r.process_count()
    )?;
    if !r.health.events.is_empty() || r.health.read_errors > 0 {
        let parts: Vec<String> = r
            .health
            .events
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        writeln!(
            out,
            "kernel: {} read_errors={}",
            parts.join(" "),
            r.health.read_errors
        )?;
    }
    device_table(out, &DEVICES, &r.devices, secs)?;
    if !r.storage.is_empty() {
        writeln!(out)?;
        device_table(out, &STORAGE, &r.storage, secs)?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<20} {:>8} {:<10} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>8}  CGROUP",
        "VM/COMM", "PID", "DEVICE", "IO/s", "R/s", "W/s", "RMB/s", "WMB/s", "AVG(us)", "P99(us)"
    )?;
    for p in &r.processes {
        let who = match &p.vm {
            Some(vm) => format!("vm:{}", vm.name),
            None if p.exited => format!("({})", p.comm),
            None => p.comm.clone(),
        };
        writeln!(
            out,
            "{:<20} {:>8} {:<10} {:>8.0} {:>8.0} {:>8.0} {:>7.1} {:>7.1} {:>8} {:>8}  {}",
            fit(&sanitize(&who), 20),
            p.pid,
            fit(&sanitize(&p.device), 10),
            stats::rate(p.counts.total_ops(), iv),
            stats::rate(p.counts.read_ops, iv),
            stats::rate(p.counts.write_ops, iv),
            mb(p.counts.read_bytes, secs),
            mb(p.counts.write_bytes, secs),
            opt(p.lat_avg_us),
            opt(p.lat_p99_us),
            // A disk QEMU counts has no cgroup of its own on the host: where it lands instead.
            match &p.target {
                Some(t) => fit(&format!("qemu {}", sanitize(t)), 60),
                None => fit(&sanitize(&p.cgroup), 60),
            },
        )?;
    }
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_rows_in_the_given_order_with_their_total() {
        let mut r = crate::top::testdata::sample_report();
        super::super::sort::order_processes(&mut r, super::super::sort::SortOrder::DEFAULT);
        let mut out = Vec::new();
        write_table(&mut out, &r).expect("writing to memory");
        let text = String::from_utf8(out).expect("UTF-8");
        let head = text
            .lines()
            .position(|l| l.starts_with("VM/COMM"))
            .expect("process header");
        let rows: Vec<&str> = text.lines().skip(head + 1).take(5).collect();
        let first: Vec<&str> = rows
            .iter()
            .map(|l| l.split_whitespace().next().unwrap_or(""))
            .collect();
        assert_eq!(
            first,
            [
                "fio",
                "vm:db02",
                "vm:web01",
                "vm:web01",
                "ev\\x1b[2J\\x0ail"
            ],
            "{text}"
        );
        // IO/s right after the device: fio 9050, web01 on vda 2000.
        let cols = |i: usize| rows[i].split_whitespace().collect::<Vec<_>>();
        assert_eq!(cols(0)[3], "9050", "{text}");
        assert_eq!((cols(2)[2], cols(2)[3]), ("vda", "2000"), "{text}");
        assert!(text.contains("IO/s"), "{text}");
    }

    #[test]
    fn fit_marks_cuts() {
        assert_eq!(fit("abc", 5), "abc");
        assert_eq!(fit("abcdef", 4), "abc+");
        assert_eq!(fit("abcdef", 0), "");
    }
}
