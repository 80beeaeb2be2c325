//! The overkvm service under a real systemd: a Debian bookworm guest (root file system built
//! with mmdebstrap, cached; Debian's 6.1 cloud kernel under qemu TCG) boots with systemd as
//! PID 1, installs the package `cargo xtask package` builds with `apt install ./overkvm_*.deb`,
//! and drives the unit through systemctl (tests/guest/systemd_checks.sh, started by a oneshot
//! unit once the guest is up). Its reports on the serial console are checked here against
//! the guest kernel's own counters: /proc/diskstats, io.max, /proc/PID/status.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use overkvm_tests::{
    guest::{self, Guest, GuestSpec, TempDir},
    packages::build_packages,
    rootfs::{self, RegistryUnreachable},
    skip_reason, skipped,
};

const CHECKS: &str = include_str!("../guest/systemd_checks.sh");
const CHECKS_UNIT: &str = include_str!("../guest/overkvm-checks.service");
/// IOPS budget on the guest's vdb: far below what one greedy reader does there under TCG
/// (~8,000-10,000 4 KiB direct reads per second, NOTES.md), and high enough that 1 s ticks see
/// a few hundred I/Os.
const BUDGET: u64 = 400;
/// Boot, install, the checks (with a restart, a 5 s RestartSec and a purge) and power-off take
/// 2-4 minutes under TCG here; beyond this something hangs.
const GUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Runs the busybox stage: mounts the root, puts the payload and the checks unit in it; /init
/// then switches to systemd.
const PREPARE_ROOT: &str = r#"
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot || { echo "overkvm-prepare: mounting /dev/vda failed"; exit 1; }
mkdir -p /newroot/root/overkvm
cp -a /payload/. /newroot/root/overkvm/ || exit 1
cp /payload/overkvm-checks.service /newroot/etc/systemd/system/ || exit 1
ln -sf ../overkvm-checks.service \
    /newroot/etc/systemd/system/multi-user.target.wants/overkvm-checks.service
"#;

#[test]
fn packaged_unit_under_systemd_installs_throttles_stops_restarts_and_purges() {
    let t_start = Instant::now();
    if let Some(reason) = skip_reason() {
        skipped(module_path!(), reason);
        return;
    }
    if let Some(why) = guest::missing_tools().or_else(rootfs::missing_tools) {
        skipped(module_path!(), why);
        return;
    }
    let root = match rootfs::debian_root() {
        Ok(image) => image,
        Err(e) if e.downcast_ref::<RegistryUnreachable>().is_some() => {
            skipped(module_path!(), format!("{e:#}"));
            return;
        }
        Err(e) => panic!("building the Debian root: {e:#}"),
    };
    let t_root = t_start.elapsed();
    let packages = build_packages("systemd-unit", 1);
    let t_package = t_start.elapsed();

    let dir = TempDir::new("systemd").expect("a work dir");
    let disk = dir.path().join("root.qcow2");
    rootfs::overlay(&root, &disk).expect("an overlay of the Debian root");
    let data = dir.path().join("data.img");
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(256 << 20))
        .expect("creating the data disk");

    let deb_name = file_name(&packages.deb);
    let payload = dir.path().join("payload");
    std::fs::create_dir(&payload).unwrap();
    let checks = CHECKS
        .replace("@@BUDGET@@", &BUDGET.to_string())
        .replace("@@DEB@@", &deb_name);
    write(&payload.join("checks.sh"), &checks);
    write(&payload.join("overkvm-checks.service"), CHECKS_UNIT);
    let files = vec![
        (packages.deb.clone(), format!("/payload/{deb_name}")),
        (payload.join("checks.sh"), "/payload/checks.sh".into()),
        (
            payload.join("overkvm-checks.service"),
            "/payload/overkvm-checks.service".into(),
        ),
        // iogen named as qemu: a VM to the daemon (iogen ignores -name and -uuid).
        (
            PathBuf::from(env!("CARGO_BIN_EXE_iogen")),
            "/payload/qemu-system-x86_64".into(),
        ),
    ];
    let spec = GuestSpec {
        name: "overkvm-systemd".into(),
        disk: Some(disk),
        extra_drives: vec![format!(
            "file={},if=virtio,cache=none,aio=native,format=raw",
            data.display()
        )],
        script: PREPARE_ROOT.into(),
        memory_mb: 1024,
        files,
        switch_root: true,
        ..GuestSpec::default()
    };
    let mut vm = Guest::boot(&spec, dir.path()).expect("booting the guest");
    let outcome = vm.wait(GUEST_TIMEOUT);
    let t_guest = t_start.elapsed();
    let outcome = outcome.unwrap_or_else(|e| panic!("{e:#}\nfull console:\n{}", vm.console()));
    let console = outcome.console;
    let r = results(&console);
    let sections = sections(&console);
    eprintln!(
        "timings: root image {t_root:.1?}, package {:.1?}, guest {:.1?} (total {t_guest:.1?})",
        t_package - t_root,
        t_guest - t_package
    );
    // What the guest measured, and of systemd-analyze's table what the unit does not
    // restrict (the lines it marks ✗) with the overall score.
    eprintln!("guest results: {r:?}");
    if let Some(security) = sections.get("security") {
        let summary: Vec<&str> = security
            .lines()
            .filter(|l| l.starts_with('✗') || l.contains("Overall exposure level"))
            .map(str::trim_end)
            .collect();
        eprintln!(
            "systemd-analyze security overkvm, in the guest:\n{}",
            summary.join("\n")
        );
    }
    let context = || {
        format!(
            "results {r:#?}\njournal of overkvm.service:\n{}\nconsole:\n{console}",
            sections.get("journal").map_or("(none)", String::as_str)
        )
    };
    assert_eq!(
        outcome.status,
        0,
        "the guest's checks failed: {}\n{}",
        console
            .lines()
            .filter(|l| l.starts_with("OKVM-FAIL"))
            .collect::<Vec<_>>()
            .join("\n"),
        context()
    );
    let get = |k: &str| -> &str {
        r.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("the guest reported no {k}\n{}", context()))
    };
    let num = |k: &str| -> f64 {
        get(k)
            .parse()
            .unwrap_or_else(|_| panic!("{k}={} is not a number\n{}", get(k), context()))
    };

    // Installed, enabled and started by the package, running under the unit's hardening.
    assert_eq!(get("active"), "active", "{}", context());
    assert_eq!(get("enabled"), "enabled", "{}", context());
    assert_eq!(get("state_dir"), "yes", "{}", context());
    assert_eq!(
        get("no_new_privs"),
        "1",
        "NoNewPrivileges= not applied\n{}",
        context()
    );
    assert_eq!(
        get("seccomp"),
        "2",
        "SystemCallFilter= not applied\n{}",
        context()
    );
    let cap_bnd = u64::from_str_radix(get("cap_bnd"), 16).expect("CapBnd is hex");
    // CAP_DAC_OVERRIDE 1, CAP_SYS_RESOURCE 24, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
    let want_caps = [1u32, 21, 24, 38, 39].iter().fold(0u64, |m, c| m | 1 << c);
    assert_eq!(
        cap_bnd,
        want_caps,
        "CapabilityBoundingSet= as the kernel holds it: {cap_bnd:#x}\n{}",
        context()
    );

    // /metrics counts the guest's own I/O exactly as the guest kernel does.
    let (metric, disk) = (num("metric_reads"), num("diskstats_reads"));
    assert!(
        disk >= 3000.0,
        "dd's 3000 reads: diskstats {disk}\n{}",
        context()
    );
    assert_eq!(
        metric,
        disk,
        "/metrics vs /proc/diskstats for vdb reads\n{}",
        context()
    );
    let unthrottled = 3000.0 / num("dd_seconds");

    // The budget set through the config and a restart holds the greedy VM.
    let limit = num("limit_riops");
    let rate = num("throttled_reads") / num("throttled_seconds");
    eprintln!(
        "unthrottled dd {unthrottled:.0} reads/s; budget {BUDGET}: io.max riops={limit}, \
         the VM's reads {rate:.0}/s; reload: {}; limit after {} s",
        get("reload"),
        get("engaged_after")
    );
    assert!(
        unthrottled > 3.0 * BUDGET as f64,
        "the disk must do far more than the budget unthrottled ({unthrottled:.0}/s)\n{}",
        context()
    );
    assert!(
        limit >= 20.0 && limit <= BUDGET as f64 * 1.05,
        "io.max riops={limit} for a budget of {BUDGET}\n{}",
        context()
    );
    assert!(
        rate <= BUDGET as f64 * 1.1 && rate >= BUDGET as f64 * 0.5,
        "the VM read {rate:.0}/s under riops={limit}, budget {BUDGET}\n{}",
        context()
    );
    // The VM's own series counts what its cgroup's io.stat does (read just after: the VM
    // goes on reading in between, at most a tick or two at the limit).
    let (vm_metric, vm_rios) = (num("vm_metric_reads"), num("vm_cgroup_rios"));
    assert!(
        vm_metric > 0.0 && vm_metric <= vm_rios && vm_rios - vm_metric <= 3.0 * BUDGET as f64,
        "/metrics has {vm_metric} reads of VM greedy, its cgroup's io.stat {vm_rios}\n{}",
        context()
    );

    // Stop, kill -9, purge.
    assert_eq!(
        num("limits_after_stop"),
        0.0,
        "limits left by systemctl stop\n{}",
        context()
    );
    assert_eq!(get("state_after_stop"), "clear", "{}", context());
    assert_ne!(get("killed_pid"), get("new_pid"), "{}", context());
    assert_eq!(
        num("restarts"),
        1.0,
        "Restart= after kill -9\n{}",
        context()
    );
    assert_eq!(
        get("limits_gone_before_restart"),
        "yes",
        "ExecStopPost did not remove the limits of the killed daemon\n{}",
        context()
    );
    assert_eq!(get("relimited"), "yes", "{}", context());
    assert_eq!(
        num("limits_after_purge"),
        0.0,
        "limits left by apt purge\n{}",
        context()
    );
    assert_eq!(
        get("files_left"),
        "none",
        "apt purge left files\n{}",
        context()
    );
    assert_eq!(get("load_state"), "not-found", "{}", context());
    assert!(
        matches!(get("dpkg_status"), "" | "pn"),
        "dpkg still knows overkvm after purge: {}\n{}",
        get("dpkg_status"),
        context()
    );
    assert_eq!(get("greedy_running"), "active", "{}", context());
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

fn write(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
}

/// Every `key=value` of the console's `OKVM-R` lines (a later value wins).
fn results(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("OKVM-R "))
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The console's `OKVM-BEGIN name` ... `OKVM-END name` sections.
fn sections(console: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in console.lines() {
        if let Some(name) = line.strip_prefix("OKVM-BEGIN ") {
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some(name) = line.strip_prefix("OKVM-END ") {
            if let Some((n, text)) = current.take()
                && n == name.trim()
            {
                out.insert(n, text);
            }
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    out
}
