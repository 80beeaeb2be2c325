//! Which VM cgroups also serve other workloads, remembered across intervals.
//!
//! A limit in a cgroup holds everyone charged to it, so a VM whose cgroup is shared is held
//! by QEMU instead (or moved, with `manage_cgroups`). One interval is a poor witness: a cron
//! job or a backup doing its I/O in short `dd` bursts is in some intervals and not in others,
//! and judged per interval the actuator would flip between QEMU and the cgroup with each
//! burst, writing a cgroup limit that holds the next burst too. So whoever was charged to a
//! cgroup is remembered for `hold` after their last I/O (`[policy] shared_hold`, 10 minutes
//! by default: a job run every 5 minutes keeps its cgroup shared), and only then is the
//! cgroup alone again. This module is pure: the service feeds it each report's rows and the
//! time.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::report::Report;

/// How long a cgroup stays shared after its other workload's last I/O, by default.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(600);

/// Distinct processes remembered per cgroup: the most recent are kept (VMs always). A cgroup
/// with more is shared whichever are forgotten.
const MEMBERS_PER_CGROUP: usize = 16;

/// Processes remembered per workload.
const PIDS_PER_MEMBER: usize = 8;

/// Who did I/O charged to a cgroup. Processes that are no VM are one workload per command
/// name: a cron job's `dd` is a new PID each run, and the same neighbour.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Member {
    Vm(String),
    Process(String),
}

#[derive(Clone, Debug)]
struct Seen {
    /// Its latest processes (up to `PIDS_PER_MEMBER`): a VM's own qemu seen once without its
    /// name (a half-read process) is never its own neighbour.
    pids: Vec<u32>,
    /// As an operator reads it: `VM b`, `dd (4242)`.
    label: String,
    at: Instant,
}

/// A cgroup of a VM whose sharing changed, for a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Another workload's I/O was charged to the VM's cgroup: (cgroup, who).
    Shared(String, Vec<String>),
    /// Nothing but the VM was charged to it for the whole hold time: (cgroup, the hold).
    Alone(String, Duration),
}

/// Per cgroup, who was charged I/O in it and when last (see the module's comment).
#[derive(Debug)]
pub struct SharingMemory {
    hold: Duration,
    cgroups: BTreeMap<String, BTreeMap<Member, Seen>>,
}

impl Default for SharingMemory {
    fn default() -> Self {
        SharingMemory::new(DEFAULT_HOLD)
    }
}

impl SharingMemory {
    pub fn new(hold: Duration) -> SharingMemory {
        SharingMemory {
            hold,
            cgroups: BTreeMap::new(),
        }
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Notes the interval's rows at `now`, forgets what is older than the hold, and says
    /// which VM cgroups became shared or alone. A process that exited in the interval counts:
    /// its I/O was charged to the cgroup (that is the short-lived neighbour). Kernel threads
    /// do not (writeback charged on someone's behalf is no neighbour), nor does the root
    /// cgroup (never limited: always treated as shared).
    pub fn observe(&mut self, report: &Report, now: Instant) -> Vec<Change> {
        let before: BTreeMap<String, bool> = self
            .cgroups
            .iter()
            .map(|(cg, m)| (cg.clone(), is_shared(m)))
            .collect();
        for r in &report.processes {
            let Some(cg) = r.io_cgroup.as_deref().filter(|c| *c != "/") else {
                continue;
            };
            if r.kernel_thread || r.counts.total_ops() == 0 {
                continue;
            }
            let (member, label) = match &r.vm {
                Some(v) => (Member::Vm(v.name.clone()), format!("VM {}", v.name)),
                None => (
                    Member::Process(r.comm.clone()),
                    format!("{} ({})", r.comm, r.pid),
                ),
            };
            let members = self.cgroups.entry(cg.to_string()).or_default();
            let seen = members.entry(member).or_insert_with(|| Seen {
                pids: Vec::new(),
                label: String::new(),
                at: now,
            });
            seen.pids.retain(|p| *p != r.pid);
            seen.pids.push(r.pid);
            if seen.pids.len() > PIDS_PER_MEMBER {
                seen.pids.remove(0);
            }
            seen.label = label;
            seen.at = now;
            if members.len() > MEMBERS_PER_CGROUP
                && let Some(oldest) = members
                    .iter()
                    .filter(|(m, _)| matches!(m, Member::Process(_)))
                    .min_by_key(|(_, s)| s.at)
                    .map(|(m, _)| m.clone())
            {
                members.remove(&oldest);
            }
        }
        let hold = self.hold;
        for members in self.cgroups.values_mut() {
            members.retain(|_, s| now.saturating_duration_since(s.at) < hold);
        }
        self.cgroups.retain(|_, m| !m.is_empty());
        let mut changes = Vec::new();
        for (cg, was) in &before {
            let now_shared = self.cgroups.get(cg).is_some_and(is_shared);
            if *was && !now_shared {
                changes.push(Change::Alone(cg.clone(), hold));
            }
        }
        for (cg, members) in &self.cgroups {
            if is_shared(members) && !before.get(cg).copied().unwrap_or(false) {
                let vm_pids = vm_pids(members);
                let who: Vec<String> = members
                    .iter()
                    .filter(|(m, s)| is_neighbour(m, s, &vm_pids))
                    .map(|(_, s)| s.label.clone())
                    .collect();
                let who = if who.is_empty() {
                    // Only VMs: every one of them is the others' neighbour.
                    members
                        .iter()
                        .filter(|(m, _)| matches!(m, Member::Vm(_)))
                        .map(|(_, s)| s.label.clone())
                        .collect()
                } else {
                    who
                };
                changes.push(Change::Shared(cg.clone(), who));
            }
        }
        changes
    }

    /// Who else (not VM `vm`, not its process `pid`) was charged I/O in `cgroup` within the
    /// hold time before the last [`observe`](Self::observe): a limit written there would
    /// hold them too.
    pub fn shared_with(&self, cgroup: &str, vm: &str, pid: u32) -> Vec<String> {
        let Some(members) = self.cgroups.get(cgroup) else {
            return Vec::new();
        };
        let mut vm_pids = vm_pids(members);
        vm_pids.push(pid);
        members
            .iter()
            .filter(|(m, s)| match m {
                Member::Vm(n) => n != vm,
                Member::Process(_) => is_neighbour(m, s, &vm_pids),
            })
            .map(|(_, s)| s.label.clone())
            .collect()
    }
}

/// A VM's cgroup with another workload in it: two VMs, or a VM and a process that is not
/// one of the VMs' own (named late).
fn is_shared(members: &BTreeMap<Member, Seen>) -> bool {
    let vms = members
        .keys()
        .filter(|m| matches!(m, Member::Vm(_)))
        .count();
    let pids = vm_pids(members);
    let others = members
        .iter()
        .filter(|(m, s)| is_neighbour(m, s, &pids))
        .count();
    vms > 0 && (vms > 1 || others > 0)
}

/// The processes of the VMs in a cgroup.
fn vm_pids(members: &BTreeMap<Member, Seen>) -> Vec<u32> {
    members
        .iter()
        .filter(|(m, _)| matches!(m, Member::Vm(_)))
        .flat_map(|(_, s)| s.pids.iter().copied())
        .collect()
}

/// A process that is not only one of the VMs' own.
fn is_neighbour(m: &Member, s: &Seen, vm_pids: &[u32]) -> bool {
    matches!(m, Member::Process(_)) && s.pids.iter().any(|p| !vm_pids.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{report::ProcessRow, testdata};

    fn vm(name: &str, pid: u32, cg: &str) -> ProcessRow {
        let mut r = testdata::vm_process(name, pid, "vda", 10, 0);
        r.io_cgroup = Some(cg.into());
        r
    }

    fn dd(pid: u32, cg: &str, exited: bool) -> ProcessRow {
        let mut r = testdata::process("dd", pid, "vda", 10, 0);
        r.io_cgroup = Some(cg.into());
        r.exited = exited;
        r
    }

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    /// A cron job's `dd` bursts, each a new PID that has exited when its interval is read,
    /// keep the VM's cgroup shared between bursts and for the hold time after the last one;
    /// the cgroup turns alone exactly once, and only then.
    #[test]
    fn a_short_lived_neighbour_is_remembered_for_the_hold_time() {
        let t0 = Instant::now();
        let mut m = SharingMemory::new(Duration::from_secs(60));
        let only_vm = testdata::report_with(vec![vm("a", 10, "/m/a")]);
        let burst = |pid| testdata::report_with(vec![vm("a", 10, "/m/a"), dd(pid, "/m/a", true)]);
        assert_eq!(m.observe(&only_vm, t0), []);
        assert!(m.shared_with("/m/a", "a", 10).is_empty());
        let c = m.observe(&burst(500), at(t0, 1));
        assert_eq!(c, [Change::Shared("/m/a".into(), vec!["dd (500)".into()])]);
        let mut changes = Vec::new();
        // Bursts every 20 s up to t0+101, then none: shared every second until t0+161.
        for s in 2..300 {
            let r = if s % 20 == 1 && s < 110 {
                burst(500 + s as u32)
            } else {
                only_vm.clone()
            };
            changes.extend(m.observe(&r, at(t0, s)));
            let shared = !m.shared_with("/m/a", "a", 10).is_empty();
            assert_eq!(shared, s < 161, "at {s} s");
        }
        assert_eq!(
            changes,
            [Change::Alone("/m/a".into(), Duration::from_secs(60))],
            "one flip back, no flapping in between"
        );
        // A long-lived neighbour is shared as long as it does I/O, and named by its PID.
        m.observe(
            &testdata::report_with(vec![vm("a", 10, "/m/a"), dd(900, "/m/a", false)]),
            at(t0, 400),
        );
        assert_eq!(m.shared_with("/m/a", "a", 10), ["dd (900)"]);
    }

    #[test]
    fn the_vm_itself_kernel_threads_and_the_root_are_no_neighbours() {
        let t0 = Instant::now();
        let mut m = SharingMemory::default();
        // The VM's own process once seen without its name (a half-read qemu), a helper of
        // the same VM, writeback charged to the cgroup, and a busy root cgroup.
        let mut unnamed = testdata::process("qemu-system-x86", 10, "vda", 5, 0);
        unnamed.io_cgroup = Some("/m/a".into());
        let mut kthread = dd(3, "/m/a", false);
        kthread.kernel_thread = true;
        kthread.comm = "kworker/u8:1".into();
        let mut idle = dd(7, "/m/a", false);
        idle.counts = Default::default();
        let r = testdata::report_with(vec![
            vm("a", 10, "/m/a"),
            vm("a", 11, "/m/a"),
            unnamed,
            kthread,
            idle,
            dd(20, "/", false),
            vm("a", 10, "/"),
        ]);
        assert_eq!(m.observe(&r, t0), [], "nobody else");
        assert!(m.shared_with("/m/a", "a", 10).is_empty());
        assert!(m.shared_with("/", "a", 10).is_empty(), "never recorded");
        // Another VM in the cgroup is a neighbour.
        let r = testdata::report_with(vec![vm("a", 10, "/m/a"), vm("b", 30, "/m/a")]);
        assert_eq!(
            m.observe(&r, at(t0, 1)),
            [Change::Shared(
                "/m/a".into(),
                vec!["VM a".into(), "VM b".into()]
            )]
        );
        assert_eq!(m.shared_with("/m/a", "a", 10), ["VM b"]);
        assert_eq!(m.shared_with("/m/a", "b", 30), ["VM a"]);
    }

    #[test]
    fn members_per_cgroup_are_bounded() {
        let t0 = Instant::now();
        let mut m = SharingMemory::default();
        for i in 0..100u32 {
            let mut p = dd(100 + i, "/m/a", true);
            p.comm = format!("job{i}");
            m.observe(
                &testdata::report_with(vec![vm("a", 10, "/m/a"), p]),
                at(t0, i as u64),
            );
        }
        assert!(m.cgroups["/m/a"].len() <= MEMBERS_PER_CGROUP);
        assert!(!m.shared_with("/m/a", "a", 10).is_empty());
    }
}
