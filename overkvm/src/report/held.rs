//! Rows of processes caught inside their exec, held back until the process can be named.
//!
//! A process can do block I/O inside its own exec (page faults on the new binary and its loader
//! on a cold page cache): at that moment /proc shows the new comm and exe but an empty command
//! line, so a qemu's `-name` cannot be read (see `identity::ProcessIdentity::complete`). Naming
//! such a row `qemu-PID`, or not as a VM at all, would put the VM's first I/O under a name no
//! one knows. Instead the row waits: once the exec completes (the kernel's exec notice, at most
//! an interval later) the process is read whole, and its held I/O joins its first named
//! interval. A row is never held for more than [`MAX_HELD`] intervals: a process whose command
//! line stays empty that long is shown as it is, and counted.

use super::{ProcessRow, Seen, VmRef, absorb};

/// Intervals a row waits at most for its process to be readable.
pub const MAX_HELD: u8 = 4;

/// Health event counting rows released unnamed after `MAX_HELD` intervals.
pub const EXPIRED_EVENT: &str = "exec_naming_expired";

/// The rows held, with the intervals each has waited.
#[derive(Default)]
pub struct HeldRows {
    rows: Vec<(ProcessRow, u8)>,
}

impl HeldRows {
    /// Takes the rows of half-read processes (`half_read(pid)`) out of an interval's rows.
    pub fn hold(&mut self, rows: &mut Vec<ProcessRow>, half_read: impl Fn(u32) -> bool) {
        let (held, kept): (Vec<_>, Vec<_>) = std::mem::take(rows)
            .into_iter()
            .partition(|r| !r.kernel_thread && half_read(r.pid));
        *rows = kept;
        self.rows.extend(held.into_iter().map(|r| (r, 0)));
    }

    /// Puts the held rows whose process can be named now back into an interval's rows, named
    /// as `seen(pid)` says (joining the process's row on the same device and cgroup, if any).
    /// A process gone in the meantime is named as last seen. Returns how many rows waited
    /// [`MAX_HELD`] intervals and go back unnamed.
    pub fn release(
        &mut self,
        rows: &mut Vec<ProcessRow>,
        mut seen: impl FnMut(u32) -> Seen,
    ) -> u64 {
        let mut expired = 0;
        for (mut row, waited) in std::mem::take(&mut self.rows) {
            let now = seen(row.pid);
            let whole = now.ident.as_ref().is_some_and(|p| p.complete);
            if !whole && now.alive && waited + 1 < MAX_HELD {
                self.rows.push((row, waited + 1));
                continue;
            }
            if whole || !now.alive {
                name(&mut row, &now);
            }
            if !whole {
                expired += u64::from(now.alive);
            }
            let same = rows.iter_mut().find(|r| {
                r.pid == row.pid
                    && (r.major, r.minor) == (row.major, row.minor)
                    && r.io_cgroup == row.io_cgroup
                    && r.vm == row.vm
            });
            match same {
                Some(r) => absorb(r, &row),
                None => rows.push(row),
            }
        }
        expired
    }
}

/// Gives a held row the identity its process has now.
fn name(row: &mut ProcessRow, seen: &Seen) {
    row.exited = !seen.alive;
    let Some(p) = &seen.ident else {
        return;
    };
    row.comm.clone_from(&p.comm);
    row.cgroup.clone_from(&p.cgroup);
    row.start_time = Some(p.start_time);
    row.vm = p.vm.as_ref().map(|v| VmRef {
        name: v.name.clone(),
        uuid: v.uuid.clone(),
        manager: v.manager,
        namespace: v.namespace.clone(),
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{identity::Manager, testdata};

    /// What the resolver says of pid 50: inside its exec (half) or whole, named `web01`.
    fn seen(complete: bool, alive: bool) -> Seen {
        Seen {
            ident: Some(Arc::new(testdata::qemu_identity(
                50,
                9,
                "/machine/web01",
                complete.then_some("web01"),
                complete,
            ))),
            alive,
        }
    }

    fn half_read_row() -> ProcessRow {
        testdata::process("qemu-system-x86", 50, "loop0", 7, 0)
    }

    #[test]
    fn a_row_read_inside_an_exec_joins_the_first_named_interval() {
        let mut held = HeldRows::default();
        let mut first = vec![half_read_row(), testdata::process("fio", 60, "loop0", 1, 0)];
        held.hold(&mut first, |pid| pid == 50);
        assert_eq!(
            first.len(),
            1,
            "only fio is reported in the exec's interval"
        );

        let mut named = testdata::vm_process("web01", 50, "loop0", 20, 0);
        named.vm.as_mut().unwrap().manager = Manager::Qemu;
        let mut second = vec![named];
        assert_eq!(held.release(&mut second, |_| seen(true, true)), 0);
        assert_eq!(second.len(), 1, "merged into the process's named row");
        assert_eq!(second[0].counts.read_ops, 27);
        assert_eq!(second[0].vm.as_ref().unwrap().name, "web01");
        assert!(held.rows.is_empty());
    }

    #[test]
    fn a_row_waits_while_its_process_is_half_read_then_goes_back_unnamed_and_counted() {
        let mut held = HeldRows::default();
        held.hold(&mut vec![half_read_row()], |_| true);
        for interval in 1..MAX_HELD {
            let mut rows = Vec::new();
            assert_eq!(held.release(&mut rows, |_| seen(false, true)), 0);
            assert!(rows.is_empty(), "still waiting after {interval}");
        }
        let mut rows = Vec::new();
        assert_eq!(held.release(&mut rows, |_| seen(false, true)), 1);
        assert_eq!((rows.len(), rows[0].vm.as_ref()), (1, None));
        assert_eq!(rows[0].counts.read_ops, 7, "nothing lost");
    }

    #[test]
    fn a_process_gone_while_held_is_named_as_last_seen() {
        let mut held = HeldRows::default();
        held.hold(&mut vec![half_read_row()], |_| true);
        let mut rows = Vec::new();
        assert_eq!(held.release(&mut rows, |_| seen(true, false)), 0);
        assert_eq!(rows[0].vm.as_ref().unwrap().name, "web01");
        assert!(rows[0].exited);
    }

    #[test]
    fn kernel_threads_are_never_held() {
        let mut held = HeldRows::default();
        let mut k = half_read_row();
        k.kernel_thread = true;
        let mut rows = vec![k];
        held.hold(&mut rows, |_| true);
        assert_eq!(rows.len(), 1);
    }
}
