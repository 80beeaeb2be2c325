//! The table's columns: each knows its header, width, meaning, sort key and cell, so the header,
//! the sort and the rows cannot drift apart.

use std::cmp::Ordering;

use super::{
    batch::fit,
    rows::{RowKind, TopRow},
};

/// One column of the interactive table, in display order. `top --sort` takes these names
/// (kebab-case, or run together as spelled here, any case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Column {
    /// VM/COMM: vm:NAME for a VM, else the process's comm
    Name,
    /// PID: process id
    Pid,
    /// DEVICE: the device name
    Device,
    /// IO/s: all operations per second (the default, highest first)
    TotalIops,
    /// R/s: read operations per second
    ReadIops,
    /// W/s: write operations per second
    WriteIops,
    /// RMB/s: megabytes read per second
    ReadMbs,
    /// WMB/s: megabytes written per second
    WriteMbs,
    /// AVGµs: mean latency
    LatAvg,
    /// P99µs: 99th percentile latency
    LatP99,
    /// %IOPS: share of the devices' operations
    IopsShare,
    /// THROTTLE: the throttle's limits
    Throttle,
    /// HOST: the Prometheus instance (fleet view only)
    Host,
}

/// `--sort` names: the variant in kebab-case, or run together (`totaliops`), any case.
impl crate::choice::Choice for Column {
    /// The local view's columns, then the fleet view's HOST.
    const VALUES: &'static [Column] = &{
        let mut all = [Column::Host; Column::ALL.len() + 1];
        let mut i = 0;
        while i < Column::ALL.len() {
            all[i] = Column::ALL[i];
            i += 1;
        }
        all
    };

    fn name(self) -> &'static str {
        match self {
            Column::Name => "name",
            Column::Pid => "pid",
            Column::Device => "device",
            Column::TotalIops => "total-iops",
            Column::ReadIops => "read-iops",
            Column::WriteIops => "write-iops",
            Column::ReadMbs => "read-mbs",
            Column::WriteMbs => "write-mbs",
            Column::LatAvg => "lat-avg",
            Column::LatP99 => "lat-p99",
            Column::IopsShare => "iops-share",
            Column::Throttle => "throttle",
            Column::Host => "host",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Column::Name => "VM/COMM: vm:NAME for a VM, else the process's comm",
            Column::Pid => "PID: process id",
            Column::Device => "DEVICE: the device name",
            Column::TotalIops => "IO/s: all operations per second (the default, highest first)",
            Column::ReadIops => "R/s: read operations per second",
            Column::WriteIops => "W/s: write operations per second",
            Column::ReadMbs => "RMB/s: megabytes read per second",
            Column::WriteMbs => "WMB/s: megabytes written per second",
            Column::LatAvg => "AVGµs: mean latency",
            Column::LatP99 => "P99µs: 99th percentile latency",
            Column::IopsShare => "%IOPS: share of the devices' operations",
            Column::Throttle => "THROTTLE: the throttle's limits",
            Column::Host => "HOST: the Prometheus instance (fleet view only)",
        }
    }

    fn aliases(self) -> &'static [&'static str] {
        match self {
            Column::TotalIops => &["totaliops"],
            Column::ReadIops => &["readiops"],
            Column::WriteIops => &["writeiops"],
            Column::ReadMbs => &["readmbs"],
            Column::WriteMbs => &["writembs"],
            Column::LatAvg => &["latavg"],
            Column::LatP99 => &["latp99"],
            Column::IopsShare => &["iopsshare"],
            _ => &[],
        }
    }
}

/// What a column sorts by.
#[derive(Clone, Debug, PartialEq)]
pub enum SortKey<'a> {
    Text(&'a str),
    Number(f64),
    /// No value (no completions timed, an idle device): always sorts last.
    Missing,
}

/// The VM/COMM column is at least this wide and grows up to [`NAME_MAX`] on wide terminals.
pub const NAME_MIN: u16 = 12;
pub const NAME_MAX: u16 = 32;
/// Columns dropped first when the terminal is too narrow for all of them.
const DROP_ORDER: [Column; 8] = [
    Column::Throttle,
    Column::LatAvg,
    Column::Pid,
    Column::ReadMbs,
    Column::WriteMbs,
    Column::Device,
    Column::LatP99,
    Column::Host,
];

impl Column {
    pub const ALL: [Column; 12] = [
        Column::Name,
        Column::Pid,
        Column::Device,
        Column::TotalIops,
        Column::ReadIops,
        Column::WriteIops,
        Column::ReadMbs,
        Column::WriteMbs,
        Column::LatAvg,
        Column::LatP99,
        Column::IopsShare,
        Column::Throttle,
    ];

    /// The fleet view's columns: HOST where the local view has PID, and no p99 (Prometheus
    /// keeps the histogram's exact sum and count per row, not a percentile).
    pub const FLEET: [Column; 11] = [
        Column::Name,
        Column::Host,
        Column::Device,
        Column::TotalIops,
        Column::ReadIops,
        Column::WriteIops,
        Column::ReadMbs,
        Column::WriteMbs,
        Column::LatAvg,
        Column::IopsShare,
        Column::Throttle,
    ];

    pub fn header(self) -> &'static str {
        match self {
            Column::Name => "VM/COMM",
            Column::Pid => "PID",
            Column::Device => "DEVICE",
            Column::TotalIops => "IO/s",
            Column::ReadIops => "R/s",
            Column::WriteIops => "W/s",
            Column::ReadMbs => "RMB/s",
            Column::WriteMbs => "WMB/s",
            Column::LatAvg => "AVGµs",
            Column::LatP99 => "P99µs",
            Column::IopsShare => "%IOPS",
            Column::Throttle => "THROTTLE",
            Column::Host => "HOST",
        }
    }

    /// What the column means, for the help screen.
    pub fn meaning(self) -> &'static str {
        match self {
            Column::Name => "vm:NAME for a VM, else the process's comm; (comm) once exited",
            Column::Pid => "process id (host PID namespace)",
            Column::Device => "the device, or how many when the row merges several",
            Column::TotalIops => "all operations per second: reads, writes, discards, flushes",
            Column::ReadIops => "read operations per second",
            Column::WriteIops => "write operations per second",
            Column::ReadMbs => "megabytes (10^6 bytes) read per second",
            Column::WriteMbs => "megabytes (10^6 bytes) written per second",
            Column::LatAvg => "mean latency, submission to completion, in µs",
            Column::LatP99 => "99th percentile latency in µs (within its log2 bucket)",
            Column::IopsShare => "the row's share of all operations on its devices",
            Column::Throttle => "the throttle's limits (@q: held by QEMU); q: QEMU's own limits",
            Column::Host => "the host (Prometheus instance) of the VM",
        }
    }

    /// Columns wide enough for their widest usual value; the name column is sized apart.
    pub fn width(self) -> u16 {
        match self {
            Column::Name => NAME_MIN,
            Column::Pid => 7,
            Column::Device => 9,
            Column::TotalIops | Column::ReadIops | Column::WriteIops => 6,
            Column::ReadMbs | Column::WriteMbs => 5,
            Column::LatAvg | Column::LatP99 => 6,
            Column::IopsShare => 5,
            Column::Throttle => 14,
            Column::Host => 16,
        }
    }

    pub fn right_aligned(self) -> bool {
        !matches!(
            self,
            Column::Name | Column::Device | Column::Throttle | Column::Host
        )
    }

    /// Numbers sort biggest first when first chosen, names alphabetically.
    pub fn descending_first(self) -> bool {
        !matches!(
            self,
            Column::Name | Column::Pid | Column::Device | Column::Throttle | Column::Host
        )
    }

    pub fn sort_key(self, row: &TopRow) -> SortKey<'_> {
        let num = |v: Option<f64>| v.map_or(SortKey::Missing, SortKey::Number);
        match self {
            Column::Name => SortKey::Text(&row.label),
            Column::Pid => SortKey::Number(f64::from(row.pid)),
            Column::Device => row
                .devices
                .first()
                .map_or(SortKey::Missing, |d| SortKey::Text(d)),
            Column::TotalIops => SortKey::Number(row.total_iops()),
            Column::ReadIops => SortKey::Number(row.read_iops()),
            Column::WriteIops => SortKey::Number(row.write_iops()),
            Column::ReadMbs => SortKey::Number(row.read_mbs()),
            Column::WriteMbs => SortKey::Number(row.write_mbs()),
            Column::LatAvg => num(row.lat_avg_us),
            Column::LatP99 => num(row.lat_p99_us),
            Column::IopsShare => num(row.iops_share()),
            Column::Throttle if row.throttle.is_empty() => SortKey::Missing,
            Column::Throttle => SortKey::Text(&row.throttle),
            // The local view has one host: name, PID and device decide.
            Column::Host if row.host.is_empty() => SortKey::Missing,
            Column::Host => SortKey::Text(&row.host),
        }
    }

    /// The cell's text, at most `width` characters.
    pub fn text(self, row: &TopRow, width: u16) -> String {
        let device_row = matches!(row.kind, RowKind::Device { .. });
        let s = match self {
            Column::Name => match row.kind {
                RowKind::Device { last: false } => " ├─".into(),
                RowKind::Device { last: true } => " └─".into(),
                RowKind::Merged { .. } => row.label.clone(),
            },
            Column::Pid if device_row => String::new(),
            Column::Pid => row.pid.to_string(),
            Column::Device => match (row.devices.as_slice(), row.kind) {
                ([one], _) => one.clone(),
                (many, RowKind::Merged { expanded: true }) => format!("▾{} devs", many.len()),
                (many, _) => format!("▸{} devs", many.len()),
            },
            Column::TotalIops => fmt_rate(row.total_iops()),
            Column::ReadIops => fmt_rate(row.read_iops()),
            Column::WriteIops => fmt_rate(row.write_iops()),
            Column::ReadMbs => fmt_mbs(row.read_mbs()),
            Column::WriteMbs => fmt_mbs(row.write_mbs()),
            Column::LatAvg => fmt_us(row.lat_avg_us),
            Column::LatP99 => fmt_us(row.lat_p99_us),
            Column::IopsShare => row
                .iops_share()
                .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            Column::Throttle => row.throttle.clone(),
            Column::Host if device_row => String::new(),
            Column::Host => row.host.clone(),
        };
        fit(&s, usize::from(width))
    }

    /// The column after this one among `set` (wrapping; the first when not in it).
    pub fn next_in(self, set: &[Column]) -> Column {
        let Some(i) = set.iter().position(|c| *c == self) else {
            return set.first().copied().unwrap_or(self);
        };
        set[(i + 1) % set.len()]
    }

    /// The column before this one among `set` (wrapping; the first when not in it).
    pub fn prev_in(self, set: &[Column]) -> Column {
        let Some(i) = set.iter().position(|c| *c == self) else {
            return set.first().copied().unwrap_or(self);
        };
        set[(i + set.len() - 1) % set.len()]
    }
}

/// Orders two keys; `Missing` goes last whichever the direction.
pub fn compare_keys(a: &SortKey, b: &SortKey, descending: bool) -> Ordering {
    let natural = match (a, b) {
        (SortKey::Missing, SortKey::Missing) => return Ordering::Equal,
        (SortKey::Missing, _) => return Ordering::Greater,
        (_, SortKey::Missing) => return Ordering::Less,
        (SortKey::Number(x), SortKey::Number(y)) => x.total_cmp(y),
        (SortKey::Text(x), SortKey::Text(y)) => x.cmp(y),
        // One column never mixes kinds; keep the order total anyway.
        (SortKey::Number(_), SortKey::Text(_)) => Ordering::Less,
        (SortKey::Text(_), SortKey::Number(_)) => Ordering::Greater,
    };
    if descending {
        natural.reverse()
    } else {
        natural
    }
}

/// The columns of `set` that fit in `width` terminal cells (one cell between columns), with
/// their widths: the least useful are dropped first, and the name takes what is left up to
/// [`NAME_MAX`].
pub fn fit_columns(width: u16, set: &[Column]) -> Vec<(Column, u16)> {
    let mut shown: Vec<Column> = set.to_vec();
    let need = |cols: &[Column]| -> u16 {
        let gaps = cols.len().saturating_sub(1) as u16;
        cols.iter().map(|c| c.width()).sum::<u16>() + gaps
    };
    for drop in DROP_ORDER {
        if need(&shown) <= width {
            break;
        }
        shown.retain(|c| *c != drop);
    }
    let spare = width.saturating_sub(need(&shown));
    shown
        .into_iter()
        .map(|c| {
            let w = if c == Column::Name {
                (NAME_MIN + spare).min(NAME_MAX)
            } else {
                c.width()
            };
            (c, w)
        })
        .collect()
}

/// Operations per second: whole numbers up to 999999, then millions, within 6 cells.
pub fn fmt_rate(v: f64) -> String {
    if v < 999_999.5 {
        format!("{v:.0}")
    } else {
        format!("{:.1}M", v / 1e6)
    }
}

/// Megabytes per second with one decimal below 1000 (within 5 cells below 100 GB/s).
pub fn fmt_mbs(v: f64) -> String {
    if v < 999.95 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Microseconds, whole; seconds once past 1 s (within 6 cells); `-` when nothing was timed.
pub fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 999_999.5 => format!("{v:.0}"),
        Some(v) => format!("{:.1}s", v / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::{
        rows::groups,
        testdata::{report_with, vm_process},
    };

    #[test]
    fn every_column_has_a_distinct_header_that_fits() {
        for c in Column::ALL {
            assert!(
                c.header().chars().count() as u16 <= c.width().max(NAME_MIN),
                "{c:?}"
            );
            assert!((1..=66).contains(&c.meaning().chars().count()), "{c:?}");
            assert_eq!(c.next_in(&Column::ALL).prev_in(&Column::ALL), c);
        }
        let mut headers: Vec<_> = Column::ALL.iter().map(|c| c.header()).collect();
        headers.dedup();
        assert_eq!(headers.len(), Column::ALL.len());
    }

    #[test]
    fn columns_fit_the_terminal() {
        let total = |cols: &[(Column, u16)]| {
            cols.iter().map(|(_, w)| w).sum::<u16>() + cols.len() as u16 - 1
        };
        for width in [40, 60, 80, 100, 120, 160, 250] {
            let cols = fit_columns(width, &Column::ALL);
            assert!(total(&cols) <= width, "{width}: {cols:?}");
            assert_eq!(cols[0].0, Column::Name);
            assert!(cols.iter().any(|(c, _)| *c == Column::IopsShare));
            assert!(cols.iter().any(|(c, _)| *c == Column::TotalIops));
        }
        let at80: Vec<Column> = fit_columns(80, &Column::ALL)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        // The total IOPS column costs the mean latency at 80 columns (the p99 stays).
        assert_eq!(at80.len(), Column::ALL.len() - 2, "{at80:?}");
        assert!(!at80.contains(&Column::Throttle) && !at80.contains(&Column::LatAvg));
        assert!(at80.contains(&Column::TotalIops) && at80.contains(&Column::LatP99));
        assert_eq!(fit_columns(160, &Column::ALL).len(), Column::ALL.len());
        assert_eq!(fit_columns(160, &Column::ALL)[0].1, NAME_MAX);
        // At 80 columns a VM name of 13 characters still fits.
        assert!(fit_columns(80, &Column::ALL)[0].1 >= 16);
        // The fleet view keeps its host column at 80, and has everything at 120.
        let fleet80: Vec<Column> = fit_columns(80, &Column::FLEET)
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        assert!(fleet80.contains(&Column::Host) && fleet80.contains(&Column::TotalIops));
        assert_eq!(fit_columns(120, &Column::FLEET).len(), Column::FLEET.len());
        assert_eq!(Column::Pid.next_in(&Column::FLEET), Column::Name);
        assert_eq!(Column::Name.prev_in(&Column::FLEET), Column::Throttle);
    }

    #[test]
    fn numbers_stay_narrow() {
        assert_eq!(fmt_rate(1234.4), "1234");
        assert_eq!(fmt_rate(2_345_678.0), "2.3M");
        assert_eq!(fmt_mbs(4.91), "4.9");
        assert_eq!(fmt_mbs(3500.2), "3500");
        assert_eq!(fmt_us(None), "-");
        assert_eq!(fmt_us(Some(92.4)), "92");
        assert_eq!(fmt_us(Some(2_500_000.0)), "2.5s");
    }

    #[test]
    fn cells_and_keys_come_from_the_row() {
        let r = report_with(vec![
            vm_process("web01", 10, "vda", 1500, 500),
            vm_process("web01", 10, "vdb", 0, 2000),
        ]);
        let g = &groups(&r, None)[0];
        let row = &g.merged;
        let cell = |c: Column| c.text(row, c.width().max(NAME_MIN));
        assert_eq!(cell(Column::Name), "vm:web01");
        assert_eq!(cell(Column::Device), "▸2 devs");
        assert_eq!(cell(Column::ReadIops), "1500");
        assert_eq!(cell(Column::WriteIops), "2500");
        assert_eq!(cell(Column::TotalIops), "4000");
        assert_eq!(Column::TotalIops.sort_key(row), SortKey::Number(4000.0));
        assert_eq!(cell(Column::WriteMbs), "10.2");
        assert_eq!(cell(Column::IopsShare), "100.0");
        assert_eq!(cell(Column::Throttle), "");
        assert_eq!(Column::WriteIops.sort_key(row), SortKey::Number(2500.0));
        assert_eq!(Column::Throttle.sort_key(row), SortKey::Missing);
        assert_eq!(Column::Device.text(&g.per_device[1], 9), "vdb");
        assert_eq!(Column::Name.text(&g.per_device[1], 12), " └─");
        assert_eq!(Column::Pid.text(&g.per_device[1], 7), "");
    }

    #[test]
    fn missing_values_sort_last_both_ways() {
        let (one, two, none) = (SortKey::Number(1.0), SortKey::Number(2.0), SortKey::Missing);
        for desc in [false, true] {
            assert_eq!(compare_keys(&none, &one, desc), Ordering::Greater);
            assert_eq!(compare_keys(&two, &none, desc), Ordering::Less);
        }
        assert_eq!(compare_keys(&one, &two, false), Ordering::Less);
        assert_eq!(compare_keys(&one, &two, true), Ordering::Greater);
    }
}
