//! The throttle service's side of QEMU as an actuator: which VMs QEMU holds, measuring
//! host-cached VMs by QEMU's own counters, writing and putting back QEMU limits with every
//! change on record first. The choice and the maths are pure, in `qemu_actuator`.

use std::{collections::BTreeMap, time::Instant};

use super::{
    Applied, ThrottleService, VmUse,
    qemu_actuator::{self, ActuatorFacts, Choice, Control, QemuLimitRecord, QemuSide, VmFacts},
};
use crate::{
    config::ActuatorMode,
    devices::DeviceInfo,
    host::{
        cgroup::{IoController, limits::Limits},
        proc::block_cgroup,
    },
    qemu::limits::{DiskRef, QemuDisk},
};

/// Where a QEMU-held limit is: the VM's qemu process (pid and start time) and its disks.
#[derive(Clone, PartialEq)]
pub(super) struct AppliedQemu {
    pub(super) pid: u32,
    pub(super) start_time: u64,
    pub(super) disks: Vec<DiskRef>,
}

/// The qemu a QEMU-held limit of a VM on a device goes to.
struct QemuTarget<'a> {
    vm: &'a str,
    info: &'a DeviceInfo,
    pid: u32,
    start_time: u64,
    control: &'a Control,
}

impl QemuTarget<'_> {
    /// A record of one of this qemu's disks.
    fn owns(&self, r: &QemuLimitRecord, d: &DiskRef) -> bool {
        r.pid == self.pid && r.start_time == self.start_time && r.disk == *d
    }
}

impl ThrottleService {
    /// On a v1 host a VM whose disk on device `dev` goes through the host page cache has its
    /// writes done by the flusher, charged to the root cgroup and to no VM: its use is taken
    /// from QEMU's counters of its guest's requests (overkvm's own VMs: one QMP exchange each
    /// per tick; libvirt domains: one `virsh domstats --block` for all per tick), and the
    /// kernel threads' writes on the device, up to that much, are not counted again as load
    /// of non-VM processes.
    pub(super) fn count_host_cached(
        &mut self,
        dev: u32,
        vms: &mut BTreeMap<String, VmUse>,
        bg_iops: &mut (f64, f64),
        bg_bps: &mut (f64, f64),
        flusher: (f64, f64),
    ) {
        if self.act.as_ref().map(|a| a.api()) != Some(IoController::V1) {
            return;
        }
        let (mut fl_iops, mut fl_bps) = flusher;
        let cached = self.qemu.host_cached_on(dev);
        // libvirt domains: one `virsh domstats --block` for all of them.
        let domains: Vec<String> = cached
            .iter()
            .filter_map(|(_, pid)| match &self.qemu.cached(*pid)?.control {
                Some(Control::Libvirt { domain }) => Some(domain.clone()),
                _ => None,
            })
            .collect();
        let libvirt = QemuSide::libvirt_stats(&domains);
        for (name, pid) in cached {
            let Some(f) = self.qemu.cached(pid) else {
                continue;
            };
            let Some(control) = f.control.clone() else {
                continue;
            };
            let disks: Vec<DiskRef> = f
                .disks_on(dev)
                .iter()
                .filter(|d| d.host_cache)
                .map(|d| d.disk.clone())
                .collect();
            let (uuid, manager) = (f.uuid.clone(), f.manager);
            let Some(r) = self.qemu.guest_rates(pid, &control, &disks, &libvirt) else {
                continue;
            };
            let u = vms.entry(name).or_default();
            let extra = ((r[1] - u.iops.1).max(0.0), (r[3] - u.bps.1).max(0.0));
            u.iops = (u.iops.0.max(r[0]), u.iops.1.max(r[1]));
            u.bps = (u.bps.0.max(r[2]), u.bps.1.max(r[3]));
            u.pid = pid;
            u.uuid = uuid;
            u.manager = manager.name().to_string();
            if u.cgroup.is_none() {
                u.cgroup = block_cgroup(pid, IoController::V1);
            }
            let take = extra.0.min(fl_iops);
            fl_iops -= take;
            bg_iops.1 = (bg_iops.1 - take).max(0.0);
            let take = extra.1.min(fl_bps);
            fl_bps -= take;
            bg_bps.1 = (bg_bps.1 - take).max(0.0);
        }
    }

    /// The disks of the VM run by `pid` (its `facts`) that budget `i` is about: those on the
    /// device, or those on the storage target.
    fn budget_disks<'a>(&self, i: usize, pid: u32, f: &'a VmFacts) -> Vec<&'a QemuDisk> {
        let m = &self.devices[i];
        match &m.storage {
            Some(s) => s.disks_of(pid, f),
            None => f.disks_on(m.info.dev),
        }
    }

    /// Whether QEMU holds `vm` on device `i` (and why), from the pure [`qemu_actuator::choose`].
    pub(super) fn qemu_choice(
        &mut self,
        i: usize,
        vm: &str,
        usage: Option<&VmUse>,
    ) -> Option<&'static str> {
        let dev = self.devices[i].info.dev;
        let applied = self.applied.get(&(vm.to_string(), dev));
        let pid = usage
            .map(|u| u.pid)
            .filter(|p| *p != 0)
            .or_else(|| applied.and_then(|a| a.qemu.as_ref()).map(|q| q.pid))?;
        if let Some(s) = &self.devices[i].storage {
            let reachable = self
                .qemu
                .cached(pid)
                .is_some_and(|f| f.control.is_some() && !self.budget_disks(i, pid, f).is_empty());
            if reachable {
                return Some(super::storage::WHY_QEMU);
            }
            let target = s.target.to_string();
            self.problem(
                &format!("noqemu-{vm}"),
                format!(
                    "VM {vm} on {target}: overkvm cannot set its QEMU limits (only its own VMs \
                     and VMs whose QMP socket it was given with --qmp, over QMP, and libvirt \
                     domains through virsh), and no cgroup limit holds network storage: it is \
                     not limited"
                ),
            );
            return None;
        }
        let f = self.qemu.cached(pid)?;
        let disks = self.budget_disks(i, pid, f);
        let cgroup = usage
            .and_then(|u| u.cgroup.clone())
            .or_else(|| applied.map(|a| a.cgroup.clone()));
        let reachable = f.control.is_some() && !disks.is_empty();
        let facts = ActuatorFacts {
            mode: self.mode,
            cgroup_v1: self
                .act
                .as_ref()
                .is_some_and(|a| a.api() == IoController::V1),
            host_cache: disks.iter().any(|d| d.host_cache),
            shared_cgroup: cgroup
                .as_deref()
                .is_some_and(|c| c == "/" || !self.sharing.shared_with(c, vm, pid).is_empty()),
            manage_cgroups: self.manage_cgroups,
            qemu_reachable: reachable,
        };
        match qemu_actuator::choose(&facts) {
            Choice::Qemu(why) => Some(why),
            Choice::Cgroup => {
                if self.mode == ActuatorMode::Qemu && !reachable {
                    let name = self.devices[i].info.name.clone();
                    self.problem(
                        &format!("noqemu-{vm}"),
                        format!(
                            "VM {vm}: actuator = \"qemu\", but overkvm cannot set its QEMU limits \
                             on {name} (only its own VMs over QMP and libvirt domains through \
                             virsh, with a disk image on the device): its cgroup is used"
                        ),
                    );
                }
                None
            }
        }
    }

    /// Holds `vm` on device `i` to `want` with QEMU's own throttling of its disks there.
    pub(super) fn enforce_qemu(
        &mut self,
        i: usize,
        vm: &str,
        usage: Option<&VmUse>,
        want: Limits,
        why: &str,
    ) {
        let info = self.devices[i].info.clone();
        let key = (vm.to_string(), info.dev);
        let pid = usage
            .map(|u| u.pid)
            .or_else(|| self.applied.get(&key)?.qemu.as_ref().map(|q| q.pid))
            .unwrap_or(0);
        let Some(f) = self.qemu.cached(pid).cloned() else {
            return;
        };
        let Some(control) = f.control.clone() else {
            return;
        };
        let disks: Vec<DiskRef> = self
            .budget_disks(i, pid, &f)
            .iter()
            .map(|d| d.disk.clone())
            .collect();
        let held = AppliedQemu {
            pid,
            start_time: f.start_time,
            disks: disks.clone(),
        };
        if let Some(a) = self.applied.get(&key) {
            let same_place = a.qemu.as_ref() == Some(&held);
            if same_place && a.limits == want {
                return;
            }
            if !same_place {
                self.let_go_elsewhere(&key, &info, why);
            }
        }
        let target = QemuTarget {
            vm,
            info: &info,
            pid,
            start_time: f.start_time,
            control: &control,
        };
        let mut written = Vec::new();
        if !self.dry_run {
            if !self.record_originals(&target, &disks) {
                return;
            }
            let Some(w) = self.write_disk_limits(&target, &disks, &want) else {
                return;
            };
            written = w;
            let name = info.name.clone();
            self.resolved(&format!("qemu-{vm}"), || {
                format!("VM {vm} on {name}: QEMU limits written again")
            });
        }
        self.decisions_total += 1;
        let (what, used) = self.limit_change(&key, &want, usage);
        self.decided(
            &format!("{vm}@{}", info.name),
            format!(
                "VM {vm} on {}: {what} in QEMU through {} ({}; {why}){used}",
                info.name,
                control.describe(),
                if written.is_empty() {
                    disks
                        .iter()
                        .map(|d| d.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                } else {
                    written.join(", ")
                }
            ),
        );
        let since = self
            .applied
            .get(&key)
            .map(|a| a.since)
            .unwrap_or_else(Instant::now);
        let cgroup = usage.and_then(|u| u.cgroup.clone()).unwrap_or_default();
        self.applied.insert(
            key,
            Applied {
                cgroup,
                pid,
                limits: want,
                since,
                qemu: Some(held),
            },
        );
    }

    /// A VM held elsewhere before (its cgroup, or a former qemu of a restarted VM) that QEMU
    /// holds now: the limit there goes.
    fn let_go_elsewhere(&mut self, key: &(String, u32), info: &DeviceInfo, why: &str) {
        let vm = key.0.as_str();
        match self.applied.remove(key).map(|a| (a.cgroup, a.qemu)) {
            Some((_, Some(q))) => {
                self.release_qemu(vm, info, &q);
            }
            Some((cg, None)) => {
                self.clear_cgroup_limit(vm, info, &cg);
                self.decided(
                    &format!("actuator {vm}@{}", info.name),
                    format!(
                        "VM {vm} on {}: its cgroup {cg} lets go of it, QEMU takes over ({why})",
                        info.name
                    ),
                );
            }
            None => {}
        }
    }

    /// The disks' own settings (an operator's, Nova's) are read before overkvm first writes
    /// them and kept on record from then on: they are what goes back. False when they could
    /// not be read or recorded (then nothing is written).
    fn record_originals(&mut self, t: &QemuTarget, disks: &[DiskRef]) -> bool {
        let missing: Vec<DiskRef> = disks
            .iter()
            .filter(|d| !self.state.qemu.iter().any(|r| t.owns(r, d)))
            .cloned()
            .collect();
        if missing.is_empty() {
            return true;
        }
        let now = match self.qemu.read_disks(t.control) {
            Ok(d) => d,
            Err(e) => {
                self.qemu_failed(t.vm, &t.info.name, t.pid, t.start_time, t.control, e);
                return false;
            }
        };
        let mut added = Vec::new();
        for d in missing {
            let Some(cur) = now.iter().find(|q| q.disk == d) else {
                continue;
            };
            let rec = QemuLimitRecord {
                vm: t.vm.to_string(),
                pid: t.pid,
                start_time: t.start_time,
                control: t.control.clone(),
                disk: d.clone(),
                major: t.info.major,
                minor: t.info.minor,
                original: cur.throttle.clone(),
                written: None,
            };
            if self.state.note_qemu(rec) {
                added.push(d);
            }
        }
        // A limit is written only once what it replaces is on record.
        if !added.is_empty() && !self.save_state() {
            self.state
                .qemu
                .retain(|r| !added.iter().any(|d| t.owns(r, d)));
            return false;
        }
        true
    }

    /// Writes `want`, split over the VM's disks on the device, into QEMU on top of each disk's
    /// own settings; returns what was written per disk, or None when a write failed.
    fn write_disk_limits(
        &mut self,
        t: &QemuTarget,
        disks: &[DiskRef],
        want: &Limits,
    ) -> Option<Vec<String>> {
        let per_disk = qemu_actuator::split(want, disks.len());
        let mut written = Vec::new();
        for d in disks {
            let Some(i) = self.state.qemu.iter().position(|r| t.owns(r, d)) else {
                continue;
            };
            // What someone else changed since overkvm last wrote the disk is theirs: it
            // becomes part of the disk's own settings, under overkvm's limit now and put
            // back on release.
            if let Some(last) = self.state.qemu[i].written.clone()
                && let Some(now) = self.qemu.disk_now(t.control, d)
            {
                let r = &mut self.state.qemu[i];
                let (own, changed) = qemu_actuator::adopt(&r.original, Some(&last), &now);
                if !changed.is_empty() {
                    log::info!(
                        "VM {} disk {} on {}: {} set by someone else while overkvm held it: \
                         kept as the disk's own setting",
                        t.vm,
                        d.name(),
                        t.info.name,
                        qemu_actuator::adopted_text(&own, &changed)
                    );
                    r.original = own;
                }
            }
            let limit = qemu_actuator::engage(&self.state.qemu[i].original, &per_disk);
            if let Err(e) = self.qemu.write(t.control, d, &limit) {
                self.qemu_failed(t.vm, &t.info.name, t.pid, t.start_time, t.control, e);
                return None;
            }
            self.state.qemu[i].written =
                qemu_actuator::written_as(&limit, self.qemu.disk_now(t.control, d));
            written.push(format!(
                "{} {}",
                d.name(),
                limit.shown("").text().trim_start()
            ));
        }
        if !written.is_empty() {
            self.save_state();
        }
        Some(written)
    }

    /// A QEMU read or write failed: the VM is gone (its limits went with it) or it is a
    /// problem, logged once.
    fn qemu_failed(
        &mut self,
        vm: &str,
        dev: &str,
        pid: u32,
        start_time: u64,
        control: &Control,
        e: anyhow::Error,
    ) {
        if !qemu_actuator::is_running(pid, start_time) {
            self.qemu_vanished(vm, pid, start_time);
        } else {
            self.problem(
                &format!("qemu-{vm}"),
                format!(
                    "limiting VM {vm} on {dev} through {}: {e:#}",
                    control.describe()
                ),
            );
        }
    }

    /// A VM's qemu exited while QEMU held it: nothing to put back; its records go.
    fn qemu_vanished(&mut self, vm: &str, pid: u32, start_time: u64) {
        if self.warned.insert(format!("gone-qemu-{pid}-{start_time}")) {
            log::info!(
                "VM {vm}: its qemu (pid {pid}) is gone while QEMU held its limit: the limit went \
                 with it"
            );
        }
        self.qemu.look_for_restarts();
        let before = self.state.qemu.len();
        self.state
            .qemu
            .retain(|r| !(r.pid == pid && r.start_time == start_time));
        if self.state.qemu.len() != before {
            self.save_state();
        }
        self.applied
            .retain(|_, a| a.qemu.as_ref().is_none_or(|q| q.pid != pid));
    }

    /// Puts back the settings QEMU-held disks of `vm` on a device had before overkvm; says
    /// what became of them.
    pub(super) fn release_qemu(
        &mut self,
        vm: &str,
        info: &DeviceInfo,
        q: &AppliedQemu,
    ) -> &'static str {
        if self.dry_run {
            return "their own settings put back";
        }
        if !qemu_actuator::is_running(q.pid, q.start_time) {
            self.qemu_vanished(vm, q.pid, q.start_time);
            return "its qemu is gone, and its limits with it";
        }
        let recs: Vec<QemuLimitRecord> = self
            .state
            .qemu
            .iter()
            .filter(|r| {
                r.pid == q.pid
                    && r.start_time == q.start_time
                    && (r.major, r.minor) == (info.major, info.minor)
            })
            .cloned()
            .collect();
        let mut done = Vec::new();
        for r in recs {
            let back = self.qemu.own_settings(&r);
            match self.qemu.put_back(&r.control, &r.disk, &back) {
                Ok(()) => done.push(r),
                Err(e) => {
                    if !qemu_actuator::is_running(q.pid, q.start_time) {
                        self.qemu_vanished(vm, q.pid, q.start_time);
                        return "its qemu is gone, and its limits with it";
                    }
                    // Kept on record: shutdown and `throttle reset` try again.
                    self.problem(
                        &format!("qemu-{vm}"),
                        format!(
                            "putting back the QEMU settings of VM {vm} disk {} on {}: {e:#}",
                            r.disk.name(),
                            info.name
                        ),
                    );
                }
            }
        }
        let all = self
            .state
            .qemu
            .iter()
            .filter(|r| {
                r.pid == q.pid
                    && r.start_time == q.start_time
                    && (r.major, r.minor) == (info.major, info.minor)
            })
            .count()
            == done.len();
        self.state.qemu.retain(|r| !done.contains(r));
        self.save_state();
        if all {
            "their own settings put back"
        } else {
            "putting their own settings back failed: kept on record for stop and reset"
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use overkvm_common::make_dev;

    use super::*;
    use crate::throttle::{ThrottleState, tests::bare_service};

    #[test]
    fn a_qemu_held_vm_that_vanished_is_logged_once_and_its_records_dropped() {
        let dir = std::env::temp_dir().join(format!("overkvm-thr-qgone-{}", std::process::id()));
        let mut svc = bare_service(dir.join("throttle.json"));
        // A pid that cannot exist (above pid_max): its qemu is gone.
        let record = |disk: &str| QemuLimitRecord {
            vm: "gone".into(),
            pid: u32::MAX - 1,
            start_time: 7,
            control: Control::Libvirt {
                domain: "gone".into(),
            },
            disk: DiskRef::Device(disk.into()),
            major: 7,
            minor: 0,
            original: crate::qemu::limits::QemuThrottle::default(),
            written: None,
        };
        assert!(svc.state.note_qemu(record("vda")));
        assert!(
            !svc.state.note_qemu(record("vda")),
            "the first original stays"
        );
        assert!(svc.state.note_qemu(record("vdb")));
        let info = DeviceInfo {
            dev: make_dev(7, 0),
            name: "loop0".into(),
            major: 7,
            minor: 0,
            disk: "loop0".into(),
            disk_dev: make_dev(7, 0),
            request_based: true,
            present: true,
        };
        let held = AppliedQemu {
            pid: u32::MAX - 1,
            start_time: 7,
            disks: vec![DiskRef::Device("vda".into())],
        };
        svc.release_qemu("gone", &info, &held);
        svc.release_qemu("gone", &info, &held);
        assert!(
            svc.state.qemu.is_empty(),
            "nothing to put back: {:?}",
            svc.state
        );
        assert_eq!(svc.warned.len(), 1, "logged once: {:?}", svc.warned);
        assert!(svc.view().problems.is_empty());
        assert!(ThrottleState::load(&svc.state_path).unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
