//! Rows for VM disks that QEMU counts (`source: "qemu"`): the disks no host block device sees
//! (`qemu::backing`). They sit in the same VM rows as eBPF-counted devices; `device` is the
//! disk as the VM's configuration names it and `target` the storage it lands on.
//!
//! Pure: turns cumulative readings into interval counts against the previous reading of the
//! same qemu process and disk. The first reading of a disk is its baseline (like the kernel
//! maps, counting starts when overkvm starts); a qemu process that went away takes its
//! baselines with it.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{CountSource, DeviceRow, OpCounts, ProcessRow, Seen, VmRef, round2};
use crate::qemu::{backing::DiskCounters, counters::QemuReading};

/// Last cumulative counters per (qemu pid, disk).
#[derive(Default)]
pub struct QemuBaselines {
    last: HashMap<(u32, String), DiskCounters>,
}

impl QemuBaselines {
    /// Per storage target, the sum of `rows` on it (see [`storage_rows`]).
    pub fn storage_of(rows: &[ProcessRow]) -> Vec<DeviceRow> {
        storage_rows(rows)
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// The rows of the disks that did I/O since their previous reading. `seen` names a qemu
    /// process (as the eBPF rows are named); `alive` drops baselines of processes gone.
    pub fn rows(
        &mut self,
        readings: &[QemuReading],
        mut seen: impl FnMut(u32) -> Seen,
        alive: impl Fn(u32) -> bool,
    ) -> Vec<ProcessRow> {
        let mut out = Vec::new();
        let mut fresh: HashSet<(u32, String)> = HashSet::new();
        for r in readings {
            for d in &r.disks {
                let key = (r.pid, d.disk.clone());
                fresh.insert(key.clone());
                let Some(prev) = self.last.insert(key, d.counters) else {
                    continue;
                };
                let c = d.counters.since(&prev);
                if c.ops() == 0 {
                    continue;
                }
                out.push(row(r.pid, &d.disk, &d.target, &c, seen(r.pid)));
            }
        }
        // A disk a reading of its qemu no longer lists (unplugged) loses its baseline too.
        let polled: HashSet<u32> = readings.iter().map(|r| r.pid).collect();
        self.last
            .retain(|k, _| alive(k.0) && (!polled.contains(&k.0) || fresh.contains(k)));
        out
    }
}

/// Per storage target, the sum of the rows on it, busiest first.
pub fn storage_rows(rows: &[ProcessRow]) -> Vec<DeviceRow> {
    let mut by_target: BTreeMap<&str, OpCounts> = BTreeMap::new();
    for r in rows {
        if let Some(t) = &r.target {
            by_target.entry(t).or_default().merge(&r.counts);
        }
    }
    let mut out: Vec<DeviceRow> = by_target
        .into_iter()
        .map(|(t, counts)| DeviceRow {
            device: t.to_string(),
            major: 0,
            minor: 0,
            disk: t.to_string(),
            source: CountSource::Qemu,
            counts,
        })
        .collect();
    out.sort_by_key(|d| std::cmp::Reverse(d.counts.total_ops()));
    out
}

fn row(pid: u32, disk: &str, target: &str, c: &DiskCounters, seen: Seen) -> ProcessRow {
    let Seen { ident, alive } = seen;
    ProcessRow {
        pid,
        start_time: ident.as_ref().map(|p| p.start_time),
        comm: ident
            .as_ref()
            .map_or_else(|| "qemu".to_string(), |p| p.comm.clone()),
        vm: ident.as_ref().and_then(|p| p.vm.as_ref().map(VmRef::from)),
        cgroup: ident.as_ref().map(|p| p.cgroup.clone()).unwrap_or_default(),
        // No host block device, so no blkcg charges this I/O.
        io_cgroup: None,
        device: disk.to_string(),
        major: 0,
        minor: 0,
        source: CountSource::Qemu,
        counts: OpCounts {
            read_ops: c.rd_operations,
            write_ops: c.wr_operations,
            discard_ops: c.unmap_operations,
            flush_ops: c.flush_operations,
            other_ops: 0,
            read_bytes: c.rd_bytes,
            write_bytes: c.wr_bytes,
            discard_bytes: c.unmap_bytes,
        },
        read_bios: 0,
        write_bios: 0,
        // QEMU keeps the total time per operation type, not a distribution: a mean, no p99.
        lat_avg_us: c.lat_avg_us().map(round2),
        lat_p99_us: None,
        completions: c.ops(),
        exited: !alive,
        kernel_thread: false,
        kernel_submitted_ops: 0,
        latency: Box::default(),
        target: Some(target.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{qemu::counters::NetDiskReading, testdata};

    fn reading(pid: u32, disk: &str, rd: u64, wr: u64, fl: u64) -> QemuReading {
        QemuReading {
            pid,
            disks: vec![NetDiskReading {
                disk: disk.into(),
                target: "nbd://127.0.0.1:10809/exp".into(),
                counters: DiskCounters {
                    rd_operations: rd,
                    wr_operations: wr,
                    flush_operations: fl,
                    rd_bytes: rd * 4096,
                    wr_bytes: wr * 4096,
                    rd_total_time_ns: rd * 100_000,
                    wr_total_time_ns: wr * 300_000,
                    ..Default::default()
                },
            }],
        }
    }

    fn vm(pid: u32) -> Seen {
        Seen {
            ident: Some(Arc::new(testdata::qemu_identity(
                pid,
                7,
                "/",
                Some("web01"),
                true,
            ))),
            alive: true,
        }
    }

    #[test]
    fn interval_counts_are_differences_of_readings() {
        let mut b = QemuBaselines::default();
        assert!(
            b.rows(&[reading(9, "drive-virtio-disk0", 100, 50, 2)], vm, |_| {
                true
            })
            .is_empty(),
            "the first reading is the baseline"
        );
        let rows = b.rows(&[reading(9, "drive-virtio-disk0", 130, 60, 3)], vm, |_| {
            true
        });
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.source, CountSource::Qemu);
        assert_eq!(r.vm.as_ref().unwrap().name, "web01");
        assert_eq!(r.device, "drive-virtio-disk0");
        assert_eq!(r.target.as_deref(), Some("nbd://127.0.0.1:10809/exp"));
        let c = r.counts;
        assert_eq!((c.read_ops, c.write_ops, c.flush_ops), (30, 10, 1));
        assert_eq!((c.read_bytes, c.write_bytes), (30 * 4096, 10 * 4096));
        // (30 × 100 µs + 10 × 300 µs) / 41 ops.
        assert_eq!(r.lat_avg_us, Some(round2(6000.0 / 41.0)));
        // An idle interval and a missed one give no row; the counts come with the next reading.
        let storage = storage_rows(&rows);
        assert_eq!(storage.len(), 1);
        assert_eq!(storage[0].device, "nbd://127.0.0.1:10809/exp");
        assert_eq!(storage[0].counts.total_ops(), 41);
        assert!(b.rows(&[], vm, |_| true).is_empty());
        assert!(
            b.rows(&[reading(9, "drive-virtio-disk0", 130, 60, 3)], vm, |_| {
                true
            })
            .is_empty()
        );
    }

    #[test]
    fn a_new_qemu_starts_from_its_own_baseline() {
        let mut b = QemuBaselines::default();
        b.rows(&[reading(9, "d", 100, 0, 0)], vm, |_| true);
        // qemu 9 exits, qemu 10 runs the VM again: no difference across the two processes.
        assert!(
            b.rows(&[reading(10, "d", 5, 0, 0)], vm, |p| p == 10)
                .is_empty()
        );
        let rows = b.rows(&[reading(10, "d", 8, 0, 0)], vm, |p| p == 10);
        assert_eq!(rows[0].counts.read_ops, 3);
        assert_eq!(rows[0].pid, 10);
    }
}
