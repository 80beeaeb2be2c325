//! KubeVirt's layout on the host, with a stand-in: a qemu-like process doing direct reads, with
//! the command line KubeVirt's libvirt gives qemu (`-name guest=<namespace>_<vmi>`) and placed,
//! as a virt-launcher's compute container is, in a pod cgroup under the kubelet's root
//! (`/kubepods/burstable/pod<uid>/<container>`, v1 blkio here; the v2 line of this hybrid host
//! keeps the test's own cgroup, so the identity must read the pod from the blkio line).
//! The daemon, with its default log level, must name it (`manager="kubevirt"`, the namespace
//! as a label), limit it in the pod's own cgroup (KubeVirt has no disk throttling of its own),
//! log each decision, and remove the limit on SIGTERM.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use overkvm_tests::{
    serving::{metrics_addr, scrape},
    skip_unless_kernel,
    throttling::{greedy_vm, remove_cgroup, v1_limits, wait_until, write_config},
};

/// The pod cgroup of the test, removed (with every level it created) on drop.
struct PodCgroup {
    created: Vec<PathBuf>,
    container: PathBuf,
    kids: Vec<Child>,
}

impl PodCgroup {
    /// `blkio/kubepods/burstable/pod<uid>/<container>`; None when a kubelet's `kubepods`
    /// already exists (a real node: not ours to touch).
    fn new(blkio: &Path) -> Option<PodCgroup> {
        let kubepods = blkio.join("kubepods");
        if kubepods.exists() {
            return None;
        }
        let pid = std::process::id();
        let levels = [
            "kubepods".to_string(),
            "burstable".to_string(),
            format!("pod0f6c2d7e-1b2a-4c3d-9e8f-{pid:012x}"),
            format!("{pid:064x}"),
        ];
        let mut created = Vec::new();
        let mut dir = blkio.to_path_buf();
        for l in levels {
            dir = dir.join(l);
            fs::create_dir(&dir).expect("creating the pod cgroup");
            created.push(dir.clone());
        }
        Some(PodCgroup {
            container: dir,
            created,
            kids: Vec::new(),
        })
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for k in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        for d in self.created.iter().rev() {
            remove_cgroup(d);
        }
    }
}

/// The daemon, stopped with SIGTERM on drop unless `stop` already did.
struct DaemonAtDefaultLevel(Option<Child>);

impl DaemonAtDefaultLevel {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        // SAFETY: a signal to our own child, not yet reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }
}

impl Drop for DaemonAtDefaultLevel {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn kubevirt_vm_is_named_by_namespace_and_limited_in_its_pod_cgroup() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    // Before the pod: dropped after it, once its VM is killed.
    let lo = overkvm_tests::devices::LoopDevice::new(256).expect("loop device");
    let Some(mut pod) = PodCgroup::new(&blkio) else {
        overkvm_tests::skipped(
            module_path!(),
            format!(
                "{} exists (a kubelet runs here): the test does not create pods under it",
                blkio.join("kubepods").display()
            ),
        );
        return;
    };
    let (major, minor) = (lo.dev() >> 20, lo.dev() & 0xfffff);
    let tmp = overkvm_tests::serving::TempDir::new("kubevirt");
    let config = tmp.join("overkvm.toml");
    write_config(
        &config,
        &tmp.join("state/throttle.json"),
        "release_ticks = 4\n",
        &lo.name(),
        1000,
        "",
    );
    let log = tmp.join("daemon.log");
    let mut daemon = DaemonAtDefaultLevel(Some(
        Command::new(overkvm_tests::workspace_bin("overkvm-io"))
            .args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5", "--config"])
            .arg(&config)
            // The default level: what an operator sees without -v.
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    ));
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(20), || metrics_addr(&log).is_some()),
        "daemon not serving:\n{}",
        log_text()
    );
    let addr = metrics_addr(&log).unwrap();

    let vm = greedy_vm(tmp.0.as_path(), &lo.path, "prod_web-01", &pod.container, 0);
    let vm_pid = vm.id();
    pod.kids.push(vm);

    let limited = wait_until(Duration::from_secs(15), || {
        v1_limits(&pod.container, major, minor)[0].is_some()
    });
    assert!(
        limited,
        "no limit in the pod's cgroup {}:\n{}",
        pod.container.display(),
        log_text()
    );
    let body = scrape(addr).unwrap_or_default();
    let info = body
        .lines()
        .find(|l| l.starts_with("overkvm_vm_info{") && l.contains(&format!("pid=\"{vm_pid}\"")))
        .unwrap_or_else(|| panic!("no vm_info for pid {vm_pid}:\n{body}"));
    eprintln!("{info}");
    for want in [
        "vm=\"prod/web-01\"",
        "manager=\"kubevirt\"",
        "namespace=\"prod\"",
        "uuid=\"00000000-0000-4000-8000-000000000000\"",
    ] {
        assert!(info.contains(want), "{want} missing: {info}");
    }
    // `vm list` shows it next to overkvm's own VMs (none here), measured in its pod cgroup.
    // (The status file the list reads limits from is written at the end of the tick that
    // wrote the limit.)
    wait_until(Duration::from_secs(5), || {
        fs::read_to_string(tmp.join("state/status.json")).is_ok_and(|t| t.contains("prod/web-01"))
    });
    let out = Command::new(overkvm_tests::workspace_bin("overkvm-io"))
        .args(["vm", "list", "--json", "--state-dir"])
        .arg(tmp.join("vms"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vm list: {out:?}");
    let rows: serde_json::Value = serde_json::from_str(text.trim()).expect("vm list --json");
    let row = rows
        .as_array()
        .and_then(|r| r.iter().find(|r| r["pid"] == vm_pid))
        .unwrap_or_else(|| panic!("pid {vm_pid} not in vm list:\n{text}"));
    eprintln!("vm list: {row}");
    assert_eq!(row["name"], "prod/web-01");
    assert_eq!(row["manager"], "kubevirt");
    assert_eq!(row["namespace"], "prod");
    assert_eq!(row["state"], "running");
    assert!(
        row["iops"]["total"].as_f64().is_some_and(|t| t > 0.0),
        "its IOPS come from the pod cgroup's counters: {row}"
    );
    assert!(
        row["limits"][0]["riops"].as_u64().is_some(),
        "the daemon's limit is shown: {row}\nstatus: {}",
        fs::read_to_string(tmp.join("state/status.json")).unwrap_or_default()
    );

    // Decisions are in the log at the default level, with the VM's host name.
    let text = log_text();
    eprintln!("daemon log (default level):\n{text}");
    let dev = lo.name();
    for want in [
        format!("{dev}: over budget (budget 1000 IOPS"),
        format!("VM prod/web-01 on {dev}: limited to riops="),
    ] {
        assert!(text.contains(&want), "{want:?} not logged:\n{text}");
    }

    let st = daemon.stop();
    assert!(
        st.is_some_and(|s| s.success()),
        "daemon exit {st:?}:\n{}",
        log_text()
    );
    assert_eq!(
        v1_limits(&pod.container, major, minor),
        [None; 4],
        "SIGTERM left a limit in the pod's cgroup"
    );
    assert!(log_text().contains("throttle stopped: limits removed"));
}
