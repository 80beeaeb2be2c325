//! The order of the rows, one rule for every front-end: the interactive view, batch text and
//! JSON lines all rank processes by the same column, VMs and other processes together, so a
//! backup job hammering the disk is as visible as a VM doing it.

use std::cmp::Ordering;

use super::{
    columns::{Column, compare_keys},
    rows::{self, RowGroup, TopRow},
};
use crate::report::Report;

/// The sort column and whether the user flipped its natural direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SortOrder {
    pub column: Column,
    pub reversed: bool,
}

impl SortOrder {
    /// Busiest first: total operations per second, highest first (the question `top` answers
    /// is "who is eating the disk?").
    pub const DEFAULT: SortOrder = SortOrder {
        column: Column::TotalIops,
        reversed: false,
    };

    pub fn descending(self) -> bool {
        self.column.descending_first() != self.reversed
    }
}

impl Default for SortOrder {
    fn default() -> SortOrder {
        SortOrder::DEFAULT
    }
}

/// The sort column, then host (fleet view), name, PID and devices so that equal keys keep a
/// stable order.
pub fn row_order(a: &TopRow, b: &TopRow, sort: SortOrder) -> Ordering {
    compare_keys(
        &sort.column.sort_key(a),
        &sort.column.sort_key(b),
        sort.descending(),
    )
    .then_with(|| a.host.cmp(&b.host))
    .then_with(|| a.label.cmp(&b.label))
    .then_with(|| a.pid.cmp(&b.pid))
    .then_with(|| a.devices.cmp(&b.devices))
}

/// Sorts processes by their merged row, and each process's devices by the same rule.
pub fn sort_groups(groups: &mut [RowGroup], sort: SortOrder) {
    groups.sort_by(|a, b| row_order(&a.merged, &b.merged, sort));
    for g in groups {
        g.per_device.sort_by(|a, b| row_order(a, b, sort));
    }
}

/// Puts the report's process rows in the view's order: processes ranked by their rows merged
/// over devices, each process's devices next to each other, ranked the same way. Batch text
/// and JSON then list rows exactly as the interactive view would with every row expanded.
pub fn order_processes(report: &mut Report, sort: SortOrder) {
    let mut groups = rows::groups(report, None);
    sort_groups(&mut groups, sort);
    let order: Vec<usize> = groups
        .iter()
        .flat_map(|g| g.per_device.iter().flat_map(|d| d.sources.iter().copied()))
        .collect();
    let mut taken: Vec<Option<crate::report::ProcessRow>> = std::mem::take(&mut report.processes)
        .into_iter()
        .map(Some)
        .collect();
    report.processes = order
        .into_iter()
        .filter_map(|i| taken.get_mut(i).and_then(Option::take))
        .collect();
    // Every row belongs to exactly one group; keep any left over rather than lose it.
    report.processes.extend(taken.into_iter().flatten());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::testdata::{process, report_with, sample_report, vm_process};

    fn order(r: &Report) -> Vec<(String, String)> {
        r.processes
            .iter()
            .map(|p| {
                let who = p.vm.as_ref().map_or(p.comm.clone(), |v| v.name.clone());
                (who, p.device.clone())
            })
            .collect()
    }

    #[test]
    fn busiest_first_whether_vm_or_not() {
        let mut r = report_with(vec![
            vm_process("quiet-a", 1, "vda", 5, 0),
            vm_process("quiet-b", 2, "vda", 0, 5),
            process("backup", 3, "vda", 3000, 0),
            vm_process("hog", 4, "vda", 1000, 1000),
        ]);
        order_processes(&mut r, SortOrder::DEFAULT);
        let who: Vec<String> = order(&r).into_iter().map(|(w, _)| w).collect();
        assert_eq!(who, ["backup", "hog", "quiet-a", "quiet-b"]);
        let reversed = SortOrder {
            reversed: true,
            ..SortOrder::DEFAULT
        };
        order_processes(&mut r, reversed);
        let who: Vec<String> = order(&r).into_iter().map(|(w, _)| w).collect();
        assert_eq!(who, ["quiet-a", "quiet-b", "hog", "backup"]);
    }

    #[test]
    fn a_process_keeps_its_devices_together_ranked_by_its_total() {
        // web01: 2100 ops over two devices, more than fio's 2000 on one; its busier device
        // first.
        let mut r = report_with(vec![
            vm_process("web01", 10, "vda", 100, 0),
            process("fio", 20, "vda", 2000, 0),
            vm_process("web01", 10, "vdb", 2000, 0),
        ]);
        order_processes(&mut r, SortOrder::DEFAULT);
        assert_eq!(
            order(&r),
            [
                ("web01".to_string(), "vdb".to_string()),
                ("web01".into(), "vda".into()),
                ("fio".into(), "vda".into())
            ]
        );
        let by_name = SortOrder {
            column: Column::Name,
            reversed: false,
        };
        order_processes(&mut r, by_name);
        // "fio" < "vm:web01"; within web01 the devices by name (the label ties).
        assert_eq!(
            order(&r),
            [
                ("fio".to_string(), "vda".to_string()),
                ("web01".into(), "vda".into()),
                ("web01".into(), "vdb".into())
            ]
        );
    }

    #[test]
    fn ordering_keeps_every_row() {
        let mut r = sample_report();
        let before = r.processes.len();
        for column in Column::ALL {
            for reversed in [false, true] {
                order_processes(&mut r, SortOrder { column, reversed });
                assert_eq!(r.processes.len(), before, "{column:?}");
            }
        }
    }
}
