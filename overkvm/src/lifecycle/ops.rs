//! `vm create`, `start`, `stop` and `destroy`: the thin layer over qemu-img, qemu, QMP, /proc
//! and cgroupfs. Every step that can fail leaves nothing half-made behind.

use std::{
    collections::HashSet,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::qemu::qmp::{Qmp, QmpError};

use super::{
    admit::{AdmitPolicy, DeviceMeter, waiting_line},
    cgroup::{self, VmCgroup},
    definition::{self, VmDefinition, VmPaths},
    qemu::{self, Accel, QEMU_SYSTEM},
    qemu_img,
    state::{self, RunRecord, VmState},
};

/// `vm create`: what to create (the command line fills it in).
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub name: String,
    /// Base image the overlay is on.
    pub base: PathBuf,
    pub memory: u64,
    pub vcpus: u32,
    /// Virtual disk size in bytes, at least the base's (`None`: the base's).
    pub disk_size: Option<u64>,
    /// Direct kernel boot.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    /// Host cache mode of the overlay.
    pub cache: super::definition::DiskCache,
    /// `None`: `$OVERKVM_STATE_DIR`, else the default.
    pub state_dir: Option<PathBuf>,
}

/// `vm start`: which VMs, how paced, how run.
#[derive(Clone, Debug)]
pub struct StartOptions {
    pub names: Vec<String>,
    /// One at a time, this long apart.
    pub stagger: Option<Duration>,
    /// Admission control: the next VM starts only when `device` has room under `budget`.
    pub admit: bool,
    pub device: Option<String>,
    pub budget: Option<u64>,
    /// Room one booting guest needs (`None`: a tenth of the budget).
    pub boot_iops: Option<u64>,
    pub admit_timeout: Duration,
    /// `None`: KVM when it really works here, else TCG.
    pub accel: Option<qemu::Accel>,
    pub no_cgroup: bool,
    /// How long each VM may take until its QMP answers.
    pub timeout: Duration,
    pub state_dir: Option<PathBuf>,
}

/// `vm stop`.
#[derive(Clone, Debug)]
pub struct StopOptions {
    pub names: Vec<String>,
    /// How long the guest may take after the ACPI button before qemu is told to quit.
    pub timeout: Duration,
    pub state_dir: Option<PathBuf>,
}

/// `vm destroy`.
#[derive(Clone, Debug)]
pub struct DestroyOptions {
    pub names: Vec<String>,
    pub state_dir: Option<PathBuf>,
}

/// Removes a directory tree on drop unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_dir_all(p);
        }
    }
}

/// rename(2) that fails instead of replacing an existing (empty) directory.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An existing, readable regular file (or block device), as an absolute path.
fn readable_file(what: &str, path: &Path) -> anyhow::Result<PathBuf> {
    let abs = fs::canonicalize(path)
        .with_context(|| format!("{what} {} does not exist", path.display()))?;
    let meta = fs::metadata(&abs).with_context(|| format!("{what} {}", abs.display()))?;
    use std::os::unix::fs::FileTypeExt as _;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        bail!("{what} {} is not a file", abs.display());
    }
    File::open(&abs).with_context(|| format!("{what} {} is not readable", abs.display()))?;
    Ok(abs)
}

/// `vm create`.
pub fn create(args: &CreateOptions) -> anyhow::Result<()> {
    definition::validate_name(&args.name)?;
    let state_dir = super::state_dir(args.state_dir.as_deref())?;
    let paths = VmPaths::new(&state_dir, &args.name);
    paths.check_socket_len()?;
    if fs::symlink_metadata(&paths.dir).is_ok() {
        bail!(
            "a VM named {:?} already exists ({}): pick another name, or remove it with \
             `overkvm-io vm destroy {}`",
            args.name,
            paths.dir.display(),
            args.name
        );
    }
    qemu_img::find_tool(qemu_img::QEMU_IMG, "qemu-utils")?;
    let base = readable_file("base image", &args.base)?;
    let kernel = args
        .kernel
        .as_deref()
        .map(|k| readable_file("kernel", k))
        .transpose()?;
    let initrd = args
        .initrd
        .as_deref()
        .map(|i| readable_file("initrd", i))
        .transpose()?;
    let base_info = qemu_img::info(&base)?;
    if let Some(size) = args.disk_size
        && size < base_info.virtual_size
    {
        bail!(
            "--disk-size {} is smaller than the base image ({}): an overlay cannot shrink its base",
            super::human_bytes(size),
            super::human_bytes(base_info.virtual_size)
        );
    }
    let def = VmDefinition {
        name: args.name.clone(),
        uuid: definition::new_uuid()?,
        base: base.clone(),
        base_format: base_info.format.clone(),
        overlay: paths.overlay(),
        memory_mib: args.memory,
        vcpus: args.vcpus,
        disk_size: args.disk_size.filter(|s| *s != base_info.virtual_size),
        kernel,
        initrd,
        append: args.append.clone(),
        cache: args.cache,
    };
    def.validate()?;

    fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    // Everything is made in a hidden directory, then renamed into place in one step: a failure
    // at any point leaves no VM directory behind, and two concurrent creates of one name
    // cannot both succeed.
    let staging = state_dir.join(format!(".{}.creating-{}", args.name, std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let mut guard = RemoveOnDrop(Some(staging.clone()));
    qemu_img::create_overlay(
        &base,
        &base_info.format,
        &staging.join("disk.qcow2"),
        def.disk_size,
    )?;
    let text = def.to_toml()?;
    fs::write(staging.join(definition::DEFINITION_FILE), text)
        .with_context(|| format!("writing {}", paths.definition().display()))?;
    rename_noreplace(&staging, &paths.dir).map_err(|e| {
        if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) {
            anyhow::anyhow!("a VM named {:?} was created meanwhile", args.name)
        } else {
            anyhow::Error::new(e).context(format!("moving the VM into {}", paths.dir.display()))
        }
    })?;
    guard.disarm();
    println!(
        "created VM {} (uuid {}) in {}: overlay on {} ({}, {} virtual), {} MiB, {} vCPU(s)",
        def.name,
        def.uuid,
        paths.dir.display(),
        base.display(),
        base_info.format,
        super::human_bytes(def.disk_size.unwrap_or(base_info.virtual_size)),
        def.memory_mib,
        def.vcpus
    );
    Ok(())
}

/// The cgroup a run used: from its record, else where `vm start` would put it.
fn cgroup_of(def: &VmDefinition, record: Option<&RunRecord>) -> Option<VmCgroup> {
    if let Some(r) = record
        && let (Some(path), Some(root)) = (&r.cgroup, &r.cgroup_root)
    {
        let act = crate::host::cgroup::limits::Actuator::for_host().ok()?;
        return Some(VmCgroup {
            api: act.api,
            root: root.clone(),
            path: path.clone(),
        });
    }
    VmCgroup::for_vm(&def.name).ok()
}

/// Removes what a run leaves once its qemu is gone: pidfile, QMP socket, run record and
/// cgroup. Returns what could not be removed.
fn clean_after_run(def: &VmDefinition, paths: &VmPaths, record: Option<&RunRecord>) -> Vec<String> {
    let mut failed = Vec::new();
    for f in [paths.pidfile(), paths.qmp_socket(), paths.run_record()] {
        if let Err(e) = fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            failed.push(format!("{}: {e}", f.display()));
        }
    }
    if let Some(cg) = cgroup_of(def, record)
        && let Err(e) = cg.remove(Duration::from_secs(5))
    {
        failed.push(format!("{e:#}"));
    }
    failed
}

/// True once the process is gone (or a zombie, or the pid belongs to another process).
fn gone(pid: u32, start_time: Option<u64>) -> bool {
    match state::proc_view(pid, "") {
        None => true,
        Some(v) => v.zombie || start_time.is_some_and(|s| s != v.start_time),
    }
}

fn wait_gone(pid: u32, start_time: Option<u64>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if gone(pid, start_time) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
}

/// Last `n` lines of a log file, indented, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("\n    {}", crate::text::sanitize(l)))
        .collect()
}

/// How the guests of one `vm start` are paced.
enum Pace {
    /// One after another, each as soon as the previous one answers QMP.
    Sequential,
    /// Start i at t0 + i × interval (and never before i-1 answers QMP).
    Stagger(Duration),
    /// Next one when the device has room under its budget.
    Admit {
        meter: Box<DeviceMeter>,
        policy: AdmitPolicy,
        timeout: Duration,
    },
}

/// What one successful start gives.
struct Started {
    pid: u32,
    cgroup: Option<VmCgroup>,
    ready_after: Duration,
    status: String,
}

/// `vm start`.
pub fn start(args: &StartOptions) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    for n in &args.names {
        if !seen.insert(n) {
            bail!("VM {n:?} is named twice");
        }
    }
    let state_dir = super::state_dir(args.state_dir.as_deref())?;
    let mut vms = Vec::new();
    for n in &args.names {
        let (def, paths) = super::load(&state_dir, n)?;
        let found = state::inspect(&def, &paths);
        if found.state == VmState::Running {
            bail!(
                "VM {n} is already running (pid {}): nothing was started",
                found.pid.unwrap_or(0)
            );
        }
        paths.check_socket_len()?;
        for (what, p) in [
            ("overlay", Some(&def.overlay)),
            ("base image", Some(&def.base)),
            ("kernel", def.kernel.as_ref()),
            ("initrd", def.initrd.as_ref()),
        ] {
            if let Some(p) = p
                && let Err(e) = File::open(p)
            {
                bail!("VM {n}: {what} {} cannot be opened: {e}", p.display());
            }
        }
        vms.push((def, paths, found));
    }
    let qemu_bin = qemu_img::find_tool(QEMU_SYSTEM, "qemu-system-x86")?;
    let (accel, why) = qemu::choose_accel(args.accel, &qemu::probe_kvm());
    println!("accelerator: {why}");

    let mut pace = match (&args.stagger, args.admit) {
        (Some(d), _) => Pace::Stagger(*d),
        (None, true) => {
            let device = args.device.as_deref().context("--admit needs --device")?;
            let budget = args.budget.context("--admit needs --budget")?;
            let meter = DeviceMeter::new(device)?;
            Pace::Admit {
                meter: Box::new(meter),
                policy: AdmitPolicy::new(budget, args.boot_iops),
                timeout: args.admit_timeout,
            }
        }
        (None, false) => Pace::Sequential,
    };

    let t0 = Instant::now();
    let mut started: Vec<String> = Vec::new();
    for (i, (def, paths, found)) in vms.iter().enumerate() {
        let paced = match &mut pace {
            Pace::Sequential => Ok(()),
            Pace::Stagger(d) => {
                let slot = t0 + d.saturating_mul(i as u32);
                let now = Instant::now();
                if slot > now {
                    sleep(slot - now);
                }
                Ok(())
            }
            Pace::Admit {
                meter,
                policy,
                timeout,
            } => wait_for_room(meter, policy, *timeout),
        };
        let result = paced.and_then(|()| {
            if found.state == VmState::Crashed {
                println!("{}: cleaning up after a crashed run", def.name);
            }
            // Leftovers of a crashed or ended run (stale pidfile, socket, empty cgroup).
            let failed = clean_after_run(def, paths, found.record.as_ref());
            if !failed.is_empty() {
                bail!("cannot clean up the previous run: {}", failed.join("; "));
            }
            launch(def, paths, &qemu_bin, accel, args.no_cgroup, args.timeout)
        });
        match result {
            Ok(s) => {
                println!(
                    "started {}: pid {}, {}, QMP ready after {:.2}s (status {}), at +{:.1}s",
                    def.name,
                    s.pid,
                    s.cgroup
                        .as_ref()
                        .map_or("no cgroup".to_string(), |c| format!(
                            "cgroup {} ({})",
                            c.path,
                            match c.api {
                                crate::host::cgroup::IoController::V1 => "blkio",
                                crate::host::cgroup::IoController::V2 => "io",
                            }
                        )),
                    s.ready_after.as_secs_f64(),
                    s.status,
                    t0.elapsed().as_secs_f64()
                );
                started.push(def.name.clone());
            }
            Err(e) => {
                let note = if started.is_empty() {
                    String::new()
                } else {
                    format!(" ({} started before and keep running)", started.join(", "))
                };
                return Err(e.context(format!("starting VM {}{note}", def.name)));
            }
        }
    }
    Ok(())
}

/// Measures the device until a boot fits under the budget, printing progress lines.
fn wait_for_room(
    meter: &mut DeviceMeter,
    policy: &AdmitPolicy,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let iops = meter.measure(Duration::from_secs(1))?;
        if policy.admits(iops) {
            println!(
                "admitted: {} at {:.0}/{:.0} IOPS",
                meter.disk.name, iops, policy.budget_iops
            );
            return Ok(());
        }
        println!("{}", waiting_line(&meter.disk.name, iops, policy));
        if Instant::now() >= deadline {
            bail!(
                "{} stayed above {:.0} IOPS for {:.0}s (--admit-timeout)",
                meter.disk.name,
                policy.budget_iops - policy.boot_iops,
                timeout.as_secs_f64()
            );
        }
    }
}

/// Undoes a start that failed half-way: kills the qemu if one runs, removes its files and
/// cgroup.
struct LaunchGuard<'a> {
    def: &'a VmDefinition,
    paths: &'a VmPaths,
    cgroup: Option<VmCgroup>,
    armed: bool,
}

impl Drop for LaunchGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(pid) = state::read_pidfile(&self.paths.pidfile())
            && state::proc_view(pid, &self.def.uuid).is_some_and(|v| v.is_this_vm && !v.zombie)
        {
            // SAFETY: plain kill(2) of the qemu this start launched (checked by its UUID).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            wait_gone(pid, None, Duration::from_secs(5));
        }
        for f in [
            self.paths.pidfile(),
            self.paths.qmp_socket(),
            self.paths.run_record(),
        ] {
            let _ = fs::remove_file(f);
        }
        if let Some(cg) = &self.cgroup {
            let _ = cg.remove(Duration::from_secs(5));
        }
    }
}

/// Starts one VM and waits until QMP answers `query-status`.
fn launch(
    def: &VmDefinition,
    paths: &VmPaths,
    qemu_bin: &Path,
    accel: Accel,
    no_cgroup: bool,
    timeout: Duration,
) -> anyhow::Result<Started> {
    let t = Instant::now();
    let deadline = t + timeout;
    let cgroup = if no_cgroup {
        None
    } else {
        let cg = VmCgroup::for_vm(&def.name)
            .context("a VM gets its own block cgroup (--no-cgroup runs it without one)")?;
        cg.create()?;
        Some(cg)
    };
    let mut guard = LaunchGuard {
        def,
        paths,
        cgroup: cgroup.clone(),
        armed: true,
    };
    daemonize(
        def,
        paths,
        qemu_bin,
        accel,
        cgroup.as_ref(),
        (deadline, timeout),
    )?;
    let (pid, start_time) = record_started(def, paths, accel, cgroup.as_ref())?;
    let status = wait_for_qmp(paths, pid, start_time, (deadline, timeout))?;
    guard.armed = false;
    Ok(Started {
        pid,
        cgroup,
        ready_after: t.elapsed(),
        status,
    })
}

/// Runs qemu with `-daemonize` (in the VM's cgroup from its first instruction): the process
/// started exits once the daemon has initialised (its pidfile written) or failed; its status
/// and qemu.log say which.
fn daemonize(
    def: &VmDefinition,
    paths: &VmPaths,
    qemu_bin: &Path,
    accel: Accel,
    cgroup: Option<&VmCgroup>,
    (deadline, timeout): (Instant, Duration),
) -> anyhow::Result<()> {
    let log = File::create(paths.qemu_log())
        .with_context(|| format!("creating {}", paths.qemu_log().display()))?;
    let mut cmd = Command::new(qemu_bin);
    cmd.args(qemu::qemu_argv(def, paths, accel))
        .current_dir(&paths.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(cg) = cgroup {
        cgroup::join_before_exec(&mut cmd, &cg.dir().join("cgroup.procs"))?;
    }
    let mut parent = cmd
        .spawn()
        .with_context(|| format!("running {}", qemu_bin.display()))?;
    let status = loop {
        if let Some(st) = parent.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = parent.kill();
            let _ = parent.wait();
            bail!(
                "qemu did not finish starting within {:.0}s; qemu said:{}",
                timeout.as_secs_f64(),
                tail(&paths.qemu_log(), 20)
            );
        }
        sleep(Duration::from_millis(10));
    };
    if !status.success() {
        bail!(
            "qemu could not start the VM ({status}); qemu said:{}",
            tail(&paths.qemu_log(), 20)
        );
    }
    Ok(())
}

/// The daemon's pid and start time, checked alive and in its cgroup, recorded in the VM's run
/// record.
fn record_started(
    def: &VmDefinition,
    paths: &VmPaths,
    accel: Accel,
    cgroup: Option<&VmCgroup>,
) -> anyhow::Result<(u32, u64)> {
    let pid = state::read_pidfile(&paths.pidfile()).with_context(|| {
        format!(
            "qemu started but wrote no pidfile {}; qemu said:{}",
            paths.pidfile().display(),
            tail(&paths.qemu_log(), 20)
        )
    })?;
    let view = state::proc_view(pid, &def.uuid)
        .filter(|v| !v.zombie)
        .with_context(|| {
            format!(
                "qemu (pid {pid}) exited right after starting; console:{}",
                tail(&paths.serial_log(), 20)
            )
        })?;
    let record = RunRecord {
        pid,
        start_time: view.start_time,
        started_at: crate::report::rfc3339(SystemTime::now()),
        accel: accel.name().to_string(),
        cgroup: cgroup.map(|c| c.path.clone()),
        cgroup_root: cgroup.map(|c| c.root.clone()),
    };
    state::write_record(&paths.run_record(), &record)?;
    if let Some(cg) = cgroup
        && !cg.pids().contains(&pid)
    {
        bail!(
            "qemu (pid {pid}) is not in its cgroup {}: its I/O would be charged elsewhere",
            cg.path
        );
    }
    Ok((pid, view.start_time))
}

/// Waits until QMP answers `query-status` (the socket exists once qemu listens; the guest
/// may still be booting) and returns the status. `timeout` is what the deadline was set from.
fn wait_for_qmp(
    paths: &VmPaths,
    pid: u32,
    start_time: u64,
    (deadline, timeout): (Instant, Duration),
) -> anyhow::Result<String> {
    loop {
        let attempt =
            Qmp::connect(&paths.qmp_socket(), Duration::from_secs(2)).and_then(|mut q| q.status());
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => {
                if gone(pid, Some(start_time)) {
                    bail!(
                        "the VM's qemu (pid {pid}) exited during start; console:{}",
                        tail(&paths.serial_log(), 20)
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "QMP at {} did not answer within {:.0}s: {e}",
                        paths.qmp_socket().display(),
                        timeout.as_secs_f64()
                    );
                }
                sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One QMP command on a fresh connection; `Closed` counts as done for `quit`.
fn qmp_once(paths: &VmPaths, command: &str) -> Result<(), QmpError> {
    let mut q = Qmp::connect(&paths.qmp_socket(), Duration::from_secs(5))?;
    match q.execute(command, None) {
        Ok(_) => Ok(()),
        Err(QmpError::Closed) if command == "quit" => Ok(()),
        Err(e) => Err(e),
    }
}

/// `vm stop`.
pub fn stop(args: &StopOptions) -> anyhow::Result<()> {
    let state_dir = super::state_dir(args.state_dir.as_deref())?;
    let mut failures = Vec::new();
    for name in &args.names {
        if let Err(e) = stop_one(&state_dir, name, args.timeout) {
            eprintln!("overkvm-io: {name}: {e:#}");
            failures.push(name.clone());
        }
    }
    if !failures.is_empty() {
        bail!("could not stop {}", failures.join(", "));
    }
    Ok(())
}

fn stop_one(state_dir: &Path, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let (def, paths) = super::load(state_dir, name)?;
    let found = state::inspect(&def, &paths);
    let record = found.record.as_ref();
    let how = match (found.state, found.pid) {
        (VmState::Running, Some(pid)) => {
            // Only trust the recorded start time when the record is about this pid.
            let start = record.filter(|r| r.pid == pid).map(|r| r.start_time);
            let t = Instant::now();
            let how = if let Err(e) = qmp_once(&paths, "system_powerdown") {
                log::info!("{name}: system_powerdown: {e}");
                None
            } else if wait_gone(pid, start, timeout) {
                Some(format!(
                    "powered off after {:.1}s",
                    t.elapsed().as_secs_f64()
                ))
            } else {
                None
            };
            let how = how.or_else(|| {
                // Busybox and firmware-less guests ignore the ACPI button.
                match qmp_once(&paths, "quit") {
                    Ok(()) if wait_gone(pid, start, Duration::from_secs(10)) => Some(format!(
                        "no power-off within {:.0}s; quit over QMP",
                        timeout.as_secs_f64()
                    )),
                    Ok(()) => None,
                    Err(e) => {
                        log::info!("{name}: quit: {e}");
                        None
                    }
                }
            });
            match how {
                Some(h) => h,
                None => {
                    if !gone(pid, start) {
                        // SAFETY: kill(2) of the VM's qemu; `gone` just checked it is still
                        // the process we started (same start time).
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                    if !wait_gone(pid, start, Duration::from_secs(10)) {
                        bail!("qemu (pid {pid}) survived SIGKILL");
                    }
                    "did not quit; killed (SIGKILL)".to_string()
                }
            }
        }
        (VmState::Crashed, _) => "was not running (crashed: its qemu is gone)".to_string(),
        _ => "was not running".to_string(),
    };
    let failed = clean_after_run(&def, &paths, record);
    if !failed.is_empty() {
        bail!("{how}, but could not clean up: {}", failed.join("; "));
    }
    println!("stopped {name}: {how}");
    Ok(())
}

/// `vm destroy`.
pub fn destroy(args: &DestroyOptions) -> anyhow::Result<()> {
    let state_dir = super::state_dir(args.state_dir.as_deref())?;
    let mut failures = Vec::new();
    for name in &args.names {
        if let Err(e) = destroy_one(&state_dir, name) {
            eprintln!("overkvm-io: {name}: {e:#}");
            failures.push(name.clone());
        }
    }
    if !failures.is_empty() {
        bail!("could not destroy {}", failures.join(", "));
    }
    Ok(())
}

fn destroy_one(state_dir: &Path, name: &str) -> anyhow::Result<()> {
    let (def, paths) = super::load(state_dir, name)?;
    let found = state::inspect(&def, &paths);
    if found.state == VmState::Running {
        bail!(
            "VM {name} is running (pid {}): stop it first with `overkvm-io vm stop {name}`",
            found.pid.unwrap_or(0)
        );
    }
    let failed = clean_after_run(&def, &paths, found.record.as_ref());
    if !failed.is_empty() {
        bail!("could not clean up its last run: {}", failed.join("; "));
    }
    fs::remove_dir_all(&paths.dir).with_context(|| format!("removing {}", paths.dir.display()))?;
    println!("destroyed {name}: removed {}", paths.dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_refuses_to_replace() {
        let dir = std::env::temp_dir().join(format!("overkvm-ops-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("a")).unwrap();
        fs::create_dir_all(dir.join("b")).unwrap();
        let e = rename_noreplace(&dir.join("a"), &dir.join("b")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        rename_noreplace(&dir.join("a"), &dir.join("c")).unwrap();
        assert!(dir.join("c").is_dir() && !dir.join("a").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn remove_on_drop() {
        let dir = std::env::temp_dir().join(format!("overkvm-ops-rm-{}", std::process::id()));
        fs::create_dir_all(dir.join("x")).unwrap();
        drop(RemoveOnDrop(Some(dir.clone())));
        assert!(!dir.exists());
        fs::create_dir_all(&dir).unwrap();
        let mut g = RemoveOnDrop(Some(dir.clone()));
        g.disarm();
        drop(g);
        assert!(dir.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn readable_files() {
        let e = readable_file("base image", Path::new("/nonexistent/x.img"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("base image /nonexistent/x.img does not exist"),
            "{e}"
        );
        let e = readable_file("base image", Path::new("/tmp"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a file"), "{e}");
        assert!(readable_file("x", Path::new("/proc/self/exe")).is_ok());
    }
}
