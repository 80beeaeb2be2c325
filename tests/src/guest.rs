//! Real guests under qemu/TCG for the integration tests.
//!
//! A guest is Debian's 6.1 cloud kernel (fetched once with apt and cached, see [`guest_kernel`])
//! booted with a small initramfs: busybox-static, the virtio modules, an `/init` (template in
//! `tests/guest/init.sh`) that mounts /proc, /sys, /dev and tracefs, loads the modules, waits for
//! /dev/vda, optionally sets up cgroup v2, runs the test's shell script and powers off. The script's
//! exit status comes back through the serial console as `OVERKVM-GUEST-EXIT <status>`.
//!
//! The initramfs is two concatenated `newc` cpio archives (the kernel unpacks them in order): a
//! base with busybox and the modules, cached by content hash next to the kernel, and a small
//! per-boot part with `/init`, the script and [`GuestSpec::files`], written into the caller's
//! work directory. Both are written here in Rust; no `cpio` binary is needed.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// The meta-package whose Depends names the current cloud kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Modules that make a virtio disk appear, in load order (see NOTES.md).
const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];
const INIT_TEMPLATE: &str = include_str!("../guest/init.sh");
/// Bump when the layout of the base initramfs changes.
const BASE_FORMAT: &str = "overkvm-guest-base-v1";
const KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1";
const EXIT_MARKER: &str = "OVERKVM-GUEST-EXIT ";
/// Written by /init right before the script starts.
pub const START_MARKER: &str = "OVERKVM-GUEST-START";

// ---------------------------------------------------------------------------------------------
// Kernel

/// Debian's 6.1 cloud kernel, unpacked in the cache.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    /// `uname -r` of the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the unpacked package.
    pub modules: PathBuf,
}

/// The cache directory: `$OVERKVM_CACHE`, else `<workspace>/target/overkvm-cache/guest`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("OVERKVM_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests crate lives inside the workspace")
            .join("target/overkvm-cache/guest"),
    }
}

/// Debian's 6.1 cloud kernel, fetched once and cached.
///
/// The version is the current Depends of `linux-image-cloud-amd64` (apt-cache, no network);
/// `linux-image-<ver>-cloud-amd64-unsigned` is fetched with `apt-get download` and unpacked with
/// `dpkg -x` into `<cache>/kernel/<ver>`. One progress line goes to stderr when downloading; later
/// calls reuse the cache silently. If apt cannot resolve the version but a kernel is cached, the
/// newest cached one is used (works offline).
pub fn guest_kernel() -> Result<GuestKernel> {
    static RESOLVED: Mutex<Option<GuestKernel>> = Mutex::new(None);
    let mut resolved = RESOLVED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(kernel) = resolved.as_ref() {
        return Ok(kernel.clone());
    }
    let kernel = fetch_kernel()?;
    *resolved = Some(kernel.clone());
    Ok(kernel)
}

fn fetch_kernel() -> Result<GuestKernel> {
    let root = cache_dir().join("kernel");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let version = match resolve_kernel_version_cached(&root) {
        Ok(version) => version,
        Err(err) => match newest_cached_kernel(&root) {
            Some(version) => version,
            None => return Err(err),
        },
    };
    let dir = root.join(&version);
    if let Some(kernel) = complete_kernel(&dir, &version) {
        return Ok(kernel);
    }

    // Serialize downloads across processes (test binaries may run side by side).
    let _lock = FileLock::exclusive(&root.join(".lock"))?;
    if let Some(kernel) = complete_kernel(&dir, &version) {
        return Ok(kernel);
    }
    let package = format!("linux-image-{version}-unsigned");
    eprintln!(
        "guest: downloading Debian kernel {package} (one time) into {}",
        dir.display()
    );
    let tmp = root.join(format!(".tmp-{}-{}", std::process::id(), unique()));
    let _cleanup = RemoveOnDrop(tmp.clone());
    fs::create_dir_all(&tmp)?;
    run(Command::new("apt-get")
        .arg("download")
        .arg(&package)
        .current_dir(&tmp))
    .with_context(|| format!("apt-get download {package}"))?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            anyhow!(
                "apt-get download {package} left no .deb in {}",
                tmp.display()
            )
        })?;
    let tree = tmp.join("tree");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&tree))
        .with_context(|| format!("dpkg -x {}", deb.display()))?;
    let _ = fs::remove_dir_all(tree.join("usr/share/doc"));
    if !tree
        .join("boot")
        .join(format!("vmlinuz-{version}"))
        .is_file()
        || !tree.join("lib/modules").join(&version).is_dir()
    {
        bail!(
            "{} holds no boot/vmlinuz-{version} or lib/modules/{version}",
            deb.display()
        );
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing stale {}", dir.display()))?;
    }
    fs::rename(&tree, &dir)?;
    fs::write(
        dir.join(".complete"),
        deb.file_name().unwrap().to_string_lossy().as_bytes(),
    )?;
    complete_kernel(&dir, &version)
        .ok_or_else(|| anyhow!("kernel in {} incomplete after unpacking", dir.display()))
}

fn complete_kernel(dir: &Path, version: &str) -> Option<GuestKernel> {
    let kernel = GuestKernel {
        version: version.to_string(),
        vmlinuz: dir.join("boot").join(format!("vmlinuz-{version}")),
        modules: dir.join("lib/modules").join(version),
    };
    (dir.join(".complete").is_file() && kernel.vmlinuz.is_file() && kernel.modules.is_dir())
        .then_some(kernel)
}

fn newest_cached_kernel(root: &Path) -> Option<String> {
    fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let done = fs::metadata(e.path().join(".complete"))
                .ok()?
                .modified()
                .ok()?;
            complete_kernel(&e.path(), &name).map(|_| (done, name))
        })
        .max()
        .map(|(_, name)| name)
}

/// [`resolve_kernel_version`], remembered in `<cache>/kernel/resolved` until apt's package lists
/// change (apt-cache parses all lists on every call here, ~0.7 s: there is no pkgcache.bin).
fn resolve_kernel_version_cached(root: &Path) -> Result<String> {
    let memo = root.join("resolved");
    if let (Some(stamp), Ok(text)) = (apt_lists_stamp(), fs::read_to_string(&memo))
        && let Some((seen, version)) = text.trim().split_once(' ')
        && seen == stamp
        && !version.is_empty()
    {
        return Ok(version.to_string());
    }
    let version = resolve_kernel_version()?;
    // Taken after resolving, which may have run apt-get update.
    if let Some(stamp) = apt_lists_stamp() {
        let _ = write_atomically(&memo, format!("{stamp} {version}\n").as_bytes());
    }
    Ok(version)
}

/// The newest modification time in /var/lib/apt/lists.
fn apt_lists_stamp() -> Option<String> {
    let newest = fs::read_dir("/var/lib/apt/lists")
        .ok()?
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .filter_map(|t| t.duration_since(UNIX_EPOCH).ok())
        .max()?;
    Some(format!("lists-mtime-ns={}", newest.as_nanos()))
}

/// `6.1.0-56-cloud-amd64` from `apt-cache depends linux-image-cloud-amd64`; runs `apt-get update`
/// once (as root) when apt knows no such package yet.
fn resolve_kernel_version() -> Result<String> {
    let parse = || -> Result<String> {
        let out = run(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))?;
        out.lines()
            .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
            .map(|dep| dep.trim().trim_matches(|c| c == '<' || c == '>'))
            .find_map(|dep| dep.strip_prefix("linux-image-"))
            .filter(|v| v.ends_with("-cloud-amd64"))
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow!(
                    "no linux-image-*-cloud-amd64 in the Depends of {KERNEL_METAPACKAGE}:\n{out}"
                )
            })
    };
    match parse() {
        Ok(version) => Ok(version),
        Err(first) if is_root() => {
            eprintln!(
                "guest: apt does not know {KERNEL_METAPACKAGE} ({first:#}); running apt-get update"
            );
            run(Command::new("apt-get").arg("update")).context("apt-get update")?;
            parse()
        }
        Err(err) => Err(err.context(format!(
            "run `apt-get update` as root to let apt find {KERNEL_METAPACKAGE}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Guest description and initramfs

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// qemu `-name guest=NAME,debug-threads=on` (no commas).
    pub name: String,
    /// qemu `-uuid`.
    pub uuid: String,
    /// A disk attached as virtio (`/dev/vda` in the guest) with `cache=none,aio=native`:
    /// qcow2, or raw when the file name ends in `.img` or `.raw`.
    pub disk: Option<PathBuf>,
    /// Instead of `disk`: a whole qemu `-drive` value for `/dev/vda` (a network disk such as
    /// `file=nbd://127.0.0.1:PORT/export,format=raw,if=virtio`).
    pub disk_drive: Option<String>,
    /// More `-drive` values, after vda's (`/dev/vdb`, ...).
    pub extra_drives: Vec<String>,
    /// Shell (busybox sh) run by /init once everything is set up; its exit status is the
    /// guest's [`GuestOutcome::status`].
    pub script: String,
    pub memory_mb: u32,
    /// Host file -> absolute guest path, copied into the initramfs (mode kept). Use
    /// [`binary_with_libs`] for a dynamically linked binary.
    pub files: Vec<(PathBuf, String)>,
    /// Mount cgroup2 at /sys/fs/cgroup and enable `+io +memory` in its subtree_control.
    pub cgroup2: bool,
    /// Boot a real system: once the script has mounted a root file system at `/newroot` and
    /// exited 0, /init moves /proc, /sys and /dev there and execs `switch_root /newroot
    /// /sbin/init` (systemd becomes PID 1). That system must print the
    /// `OVERKVM-GUEST-EXIT <status>` line itself and power off.
    pub switch_root: bool,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            name: "overkvm-guest".to_string(),
            uuid: random_uuid(),
            disk: None,
            disk_drive: None,
            extra_drives: Vec::new(),
            script: "true".to_string(),
            memory_mb: 256,
            files: Vec::new(),
            cgroup2: false,
            switch_root: false,
        }
    }
}

/// `binary` at `guest_path`, plus every shared library `ldd` lists for it (and the dynamic
/// loader), each at its host path, ready for [`GuestSpec::files`].
pub fn binary_with_libs(binary: &Path, guest_path: &str) -> Result<Vec<(PathBuf, String)>> {
    let mut files = vec![(binary.to_path_buf(), guest_path.to_string())];
    let out = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd fails on static binaries with "not a dynamic executable": nothing more to copy.
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(files);
        }
        bail!("ldd {} failed: {}", binary.display(), all.trim());
    }
    for line in text.lines() {
        let line = line.trim();
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd {}: {} not found", binary.display(), name.trim());
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        // linux-vdso.so.1 and friends have no file.
        if path.starts_with('/') && !files.iter().any(|(_, g)| g == path) {
            files.push((PathBuf::from(path), path.to_string()));
        }
    }
    Ok(files)
}

/// Base initramfs (cached) and what /init needs to know about it.
struct Base {
    path: PathBuf,
    /// Guest paths of the modules to insmod, in order.
    modules: Vec<String>,
    /// Modules neither built in nor shipped.
    absent: Vec<String>,
}

fn base_initramfs(kernel: &GuestKernel) -> Result<Base> {
    let busybox_path = find_static_busybox()
        .ok_or_else(|| anyhow!("no static busybox (apt-get install busybox-static)"))?;
    let busybox =
        fs::read(&busybox_path).with_context(|| format!("reading {}", busybox_path.display()))?;
    let applets = run(Command::new(&busybox_path).arg("--list-full"))?;
    let builtin = fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let order = fs::read_to_string(kernel.modules.join("modules.order"))
        .with_context(|| format!("reading {}/modules.order", kernel.modules.display()))?;
    let module_dir = format!("lib/modules/{}", kernel.version);

    let mut hash = Fnv::new();
    hash.write(BASE_FORMAT.as_bytes());
    hash.write(kernel.version.as_bytes());
    hash.write(&busybox);
    hash.write(applets.as_bytes());
    let (mut modules, mut absent, mut module_files) = (Vec::new(), Vec::new(), Vec::new());
    for &name in VIRTIO_MODULES {
        let is_named = |line: &&str| {
            let file = line.trim().rsplit('/').next().unwrap_or("");
            let stem = file.split(".ko").next().unwrap_or("");
            file.contains(".ko") && stem.replace('-', "_") == name
        };
        if builtin.lines().any(|l| is_named(&l)) {
            continue;
        }
        let Some(rel) = order.lines().find(is_named) else {
            absent.push(name.to_string());
            continue;
        };
        // modules.order may say "kernel/..." or "./kernel/...".
        let host = kernel.modules.join(rel.trim().trim_start_matches("./"));
        let compressed = ["xz", "zst", "gz"]
            .iter()
            .any(|ext| Path::new(&format!("{}.{ext}", host.display())).is_file());
        if !host.is_file() && compressed {
            bail!(
                "{} is compressed; this initramfs only packs plain .ko files",
                host.display()
            );
        }
        let bytes =
            fs::read(&host).with_context(|| format!("reading module {}", host.display()))?;
        hash.write(name.as_bytes());
        hash.write(&bytes);
        modules.push(format!("/{module_dir}/{name}.ko"));
        module_files.push((format!("{module_dir}/{name}.ko"), bytes));
    }

    let dir = cache_dir().join("initramfs");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!(
        "base-{}-{:016x}.cpio",
        kernel.version,
        hash.finish()
    ));
    if !path.is_file() {
        eprintln!(
            "guest: building initramfs base (busybox {} applets, {} modules) at {}",
            applets.lines().count(),
            module_files.len(),
            path.display()
        );
        let mut cpio = Cpio::new();
        let mut dirs: BTreeSet<String> = [
            "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run",
            "root", "etc", "mnt", "var", "lib", "lib64", "overkvm",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        add_ancestors(&mut dirs, &format!("{module_dir}/x"));
        for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
            add_ancestors(&mut dirs, applet);
        }
        for d in &dirs {
            cpio.dir(d, if d == "tmp" { 0o1777 } else { 0o755 });
        }
        cpio.char_dev("dev/console", 0o600, 5, 1);
        cpio.char_dev("dev/null", 0o666, 1, 3);
        cpio.file("bin/busybox", 0o755, &busybox);
        for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if applet != "bin/busybox" {
                cpio.symlink(applet, "/bin/busybox");
            }
        }
        for (name, bytes) in &module_files {
            cpio.file(name, 0o644, bytes);
        }
        write_atomically(&path, &cpio.finish())?;
    }
    Ok(Base {
        path,
        modules,
        absent,
    })
}

/// Writes the initramfs [`Guest::boot`] would boot `spec` with (the cached base plus /init,
/// the script and the spec's files) to `path`, for guests started by other means, such as
/// `overkvm-io vm start`. `spec.disk` only decides whether /init waits for /dev/vda; the
/// script should not return if the guest must keep running (/init powers off after it).
/// Returns the kernel to boot it with.
pub fn write_initramfs(spec: &GuestSpec, path: &Path) -> Result<GuestKernel> {
    let kernel = guest_kernel()?;
    let base = base_initramfs(&kernel)?;
    let mut initrd =
        fs::read(&base.path).with_context(|| format!("reading {}", base.path.display()))?;
    initrd.extend_from_slice(&overlay_initramfs(spec, &base)?);
    fs::write(path, &initrd).with_context(|| format!("writing {}", path.display()))?;
    Ok(kernel)
}

/// The kernel command line [`Guest::boot`] uses (serial console, quiet, reboot on panic).
pub fn kernel_args() -> &'static str {
    KERNEL_ARGS
}

/// The per-boot archive: /init, the script and the spec's files.
fn overlay_initramfs(spec: &GuestSpec, base: &Base) -> Result<Vec<u8>> {
    let flag = |b: bool| if b { "1" } else { "0" };
    let init = INIT_TEMPLATE
        .replace("@@MODULES@@", &base.modules.join(" "))
        .replace("@@ABSENT_MODULES@@", &base.absent.join(" "))
        .replace(
            "@@DISK@@",
            flag(spec.disk.is_some() || spec.disk_drive.is_some()),
        )
        .replace("@@CGROUP2@@", flag(spec.cgroup2))
        .replace("@@SWITCH_ROOT@@", flag(spec.switch_root));
    let mut cpio = Cpio::new();
    cpio.file("init", 0o755, init.as_bytes());
    cpio.dir("overkvm", 0o755);
    cpio.file("overkvm/script.sh", 0o755, spec.script.as_bytes());
    let mut dirs = BTreeSet::new();
    for (_, guest) in &spec.files {
        if !guest.starts_with('/') || guest.ends_with('/') || guest.split('/').any(|c| c == "..") {
            bail!("guest path {guest:?} must be an absolute file path");
        }
        add_ancestors(&mut dirs, guest.trim_start_matches('/'));
    }
    for d in &dirs {
        cpio.dir(d, 0o755);
    }
    for (host, guest) in &spec.files {
        let bytes = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        cpio.file(guest.trim_start_matches('/'), mode, &bytes);
    }
    Ok(cpio.finish())
}

fn add_ancestors(dirs: &mut BTreeSet<String>, path: &str) {
    let mut prefix = String::new();
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    for part in parts.iter().take(parts.len().saturating_sub(1)) {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        dirs.insert(prefix.clone());
    }
}

/// A `newc` cpio archive (what the kernel unpacks as initramfs). A BTreeSet of directories sorts
/// parents before children, which is all the order the kernel needs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Cpio {
            out: Vec::new(),
            ino: 1000,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so the archive only depends on its content
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, 0o040000 | perm, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120000 | 0o777, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

// ---------------------------------------------------------------------------------------------
// Running guests

/// The end of a guest run.
#[derive(Clone, Debug)]
pub struct GuestOutcome {
    /// Exit status of [`GuestSpec::script`].
    pub status: i32,
    /// Everything the guest wrote on its serial console.
    pub console: String,
}

/// A running (or finished) qemu. Dropping it ends qemu.
pub struct Guest {
    name: String,
    child: Child,
    pid: u32,
    exit: Option<ExitStatus>,
    console_path: PathBuf,
    qemu_log: PathBuf,
    qmp_path: PathBuf,
}

impl Guest {
    /// Builds the initramfs and starts `qemu-system-x86_64 -accel tcg` in `workdir` (owned by the
    /// caller; qmp.sock, qemu.pid, console.log, qemu.log and initrd.cpio go there). Returns as soon
    /// as qemu has started (its pidfile is written), without waiting for the guest to boot.
    pub fn boot(spec: &GuestSpec, workdir: &Path) -> Result<Guest> {
        if spec.name.contains(',') || spec.name.is_empty() {
            bail!(
                "guest name {:?} must be non-empty and free of commas",
                spec.name
            );
        }
        let workdir =
            fs::canonicalize(workdir).with_context(|| format!("work dir {}", workdir.display()))?;
        let qmp_path = workdir.join("qmp.sock");
        if qmp_path.as_os_str().len() >= 100 {
            bail!(
                "{} is too long for a unix socket; use a shorter work dir",
                qmp_path.display()
            );
        }
        let kernel = guest_kernel()?;
        let base = base_initramfs(&kernel)?;
        let mut initrd =
            fs::read(&base.path).with_context(|| format!("reading {}", base.path.display()))?;
        initrd.extend_from_slice(&overlay_initramfs(spec, &base)?);
        let initrd_path = workdir.join("initrd.cpio");
        fs::write(&initrd_path, &initrd)?;

        let console_path = workdir.join("console.log");
        let pid_path = workdir.join("qemu.pid");
        let qemu_log = workdir.join("qemu.log");
        for stale in [&qmp_path, &pid_path, &console_path] {
            let _ = fs::remove_file(stale);
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            &spec.memory_mb.to_string(),
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd_path)
        .args(["-append", KERNEL_ARGS])
        .args(["-name", &format!("guest={},debug-threads=on", spec.name)])
        .args(["-uuid", &spec.uuid])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", qemu_opt(&qmp_path)),
        ])
        .args(["-pidfile", &pid_path.to_string_lossy()])
        .args(["-serial", &format!("file:{}", qemu_opt(&console_path))])
        .args(["-monitor", "none", "-nic", "none"]);
        if let Some(disk) = &spec.disk {
            let disk =
                fs::canonicalize(disk).with_context(|| format!("disk {}", disk.display()))?;
            let raw = disk.extension().is_some_and(|e| e == "img" || e == "raw");
            cmd.args([
                "-drive",
                &format!(
                    "file={},if=virtio,cache=none,aio=native,format={}",
                    qemu_opt(&disk),
                    if raw { "raw" } else { "qcow2" }
                ),
            ]);
        }
        if let Some(drive) = &spec.disk_drive {
            cmd.args(["-drive", drive]);
        }
        for drive in &spec.extra_drives {
            cmd.args(["-drive", drive]);
        }
        let log = File::create(&qemu_log)?;
        cmd.current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let pid = child.id();
        let mut guest = Guest {
            name: spec.name.clone(),
            child,
            pid,
            exit: None,
            console_path,
            qemu_log,
            qmp_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if fs::read_to_string(&pid_path).is_ok_and(|s| !s.trim().is_empty()) {
                return Ok(guest);
            }
            if let Some(status) = guest.child.try_wait()? {
                guest.exit = Some(status);
                bail!(
                    "qemu exited at start ({status}): {}",
                    guest.qemu_log_text().trim()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "qemu wrote no pidfile within 30 s: {}",
                    guest.qemu_log_text().trim()
                );
            }
            sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// One QMP command on a new connection: greeting, `qmp_capabilities`, `execute`. Returns the
    /// `return` value (async events are skipped) or an error carrying QMP's `desc`.
    pub fn qmp(&self, execute: &str, arguments: Option<Value>) -> Result<Value> {
        self.qmp_with(
            execute,
            arguments,
            Duration::from_secs(10),
            Duration::from_secs(30),
        )
    }

    fn qmp_with(
        &self,
        execute: &str,
        arguments: Option<Value>,
        connect: Duration,
        io: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + connect;
        let stream = loop {
            match UnixStream::connect(&self.qmp_path) {
                Ok(s) => break s,
                // qemu creates the socket a moment after the pidfile.
                Err(_) if Instant::now() < deadline && !self.exited() => {
                    sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("connecting to QMP at {}", self.qmp_path.display())
                    });
                }
            }
        };
        stream.set_read_timeout(Some(io))?;
        stream.set_write_timeout(Some(io))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut read = || -> Result<Value> {
            let mut line = String::new();
            if reader.read_line(&mut line).context("reading from QMP")? == 0 {
                bail!("QMP connection closed");
            }
            serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))
        };
        let greeting = read()?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting {greeting}");
        }
        let mut call = |command: Value| -> Result<Value> {
            writer.write_all(format!("{command}\n").as_bytes())?;
            loop {
                let reply = read()?;
                if let Some(ret) = reply.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = reply.get("error") {
                    let desc = err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("(no desc)");
                    let class = err.get("class").and_then(Value::as_str).unwrap_or("Error");
                    bail!("QMP {command}: {class}: {desc}");
                }
                // {"event": ...}: skip.
            }
        };
        call(json!({"execute": "qmp_capabilities"}))?;
        let mut command = json!({"execute": execute});
        if let Some(arguments) = arguments {
            command["arguments"] = arguments;
        }
        call(command)
    }

    /// qemu has exited (reaped, or a zombie waiting for [`Guest::wait`]); works through `&self`.
    fn exited(&self) -> bool {
        self.exit.is_some()
            || fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .map(|stat| {
                    // "pid (comm) S ...": the state follows the last ')'.
                    stat.rsplit_once(')')
                        .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(true)
    }

    /// True while qemu runs.
    pub fn running(&mut self) -> bool {
        self.reap().is_none()
    }

    fn reap(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits until the console shows `needle` (e.g. a line the script echoes once it reached some
    /// point). Fails if qemu exits or the time runs out first, with the console's tail.
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.reap() {
                // The text may have landed just before qemu exited.
                if self.console().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "guest {} ended ({status}) before printing {needle:?}; console tail:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "guest {} did not print {needle:?} within {timeout:?}; console tail:\n{}",
                    self.name,
                    self.tail()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits until qemu exits (the guest powers off after the script). On timeout qemu is killed
    /// and the error shows the console's tail.
    pub fn wait(&mut self, timeout: Duration) -> Result<GuestOutcome> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.reap() {
                break status;
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "guest {} still running after {timeout:?}, killed; console tail:\n{}",
                    self.name,
                    self.tail()
                );
            }
            sleep(Duration::from_millis(10));
        };
        let console = self.console();
        let marker = console
            .lines()
            .filter_map(|l| l.split_once(EXIT_MARKER).map(|(_, rest)| rest.trim()))
            .next_back();
        match marker.map(str::parse::<i32>) {
            Some(Ok(code)) => Ok(GuestOutcome {
                status: code,
                console,
            }),
            _ => bail!(
                "guest {} ended (qemu {status}) without a valid {:?} line; qemu said: {}\nconsole tail:\n{}",
                self.name,
                EXIT_MARKER.trim(),
                self.qemu_log_text().trim(),
                self.tail()
            ),
        }
    }

    /// The serial console so far (carriage returns removed).
    pub fn console(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&self.console_path) {
            let _ = f.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    fn tail(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn qemu_log_text(&self) -> String {
        fs::read_to_string(&self.qemu_log).unwrap_or_default()
    }

    fn kill(&mut self) {
        if self.reap().is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.reap().is_some() {
            return;
        }
        // Ask politely, then SIGKILL.
        if self
            .qmp_with(
                "quit",
                None,
                Duration::from_millis(500),
                Duration::from_secs(1),
            )
            .is_ok()
        {
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.reap().is_none() && Instant::now() < deadline {
                sleep(Duration::from_millis(10));
            }
        }
        self.kill();
    }
}

/// Why guests cannot run here (a test should skip with this reason), or None.
pub fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    if find_in_path("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86_64 (apt-get install qemu-system-x86 qemu-utils)");
    }
    if find_static_busybox().is_none() {
        missing.push("a static busybox (apt-get install busybox-static)");
    }
    let have_kernel = newest_cached_kernel(&cache_dir().join("kernel")).is_some();
    if !have_kernel
        && ["apt-cache", "apt-get", "dpkg"]
            .iter()
            .any(|t| find_in_path(t).is_none())
    {
        missing.push("a cached guest kernel, or apt-get and dpkg to fetch one");
    }
    (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")))
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// A temporary directory removed (with its content) on drop, for guest work dirs and disks.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("overkvm-{tag}-"))
            .tempdir()
            .context("creating a temp dir")?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// An exclusive flock held until drop.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn exclusive(path: &Path) -> Result<FileLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("flock {}", path.display()));
        }
        Ok(FileLock { _file: file })
    }
}

pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}-{}", std::process::id(), unique()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// A qemu option value: commas doubled.
fn qemu_opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

pub(crate) fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// `$OVERKVM_BUSYBOX`, /bin/busybox (busybox-static's path) or busybox in PATH, if statically linked.
fn find_static_busybox() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("OVERKVM_BUSYBOX")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(["/bin/busybox", "/usr/bin/busybox"].map(PathBuf::from));
    candidates.extend(find_in_path("busybox"));
    candidates.into_iter().find(|p| is_static_elf(p))
}

/// A 64-bit little-endian ELF executable without a PT_INTERP header.
fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:08x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn random_uuid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("00000000-0000-4000-8000-{:012x}", std::process::id()))
}

/// FNV-1a, 64 bit: a content hash for cache file names.
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub(crate) fn finish(&self) -> u64 {
        self.0
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut cpio = Cpio::new();
        cpio.file("a", 0o644, b"xyz");
        let out = cpio.finish();
        assert_eq!(&out[..6], b"070701");
        assert_eq!(out.len() % 4, 0);
        // header 110 + "a\0" -> 112, data 3 -> padded 4, then the trailer.
        assert_eq!(&out[112..115], b"xyz");
        assert_eq!(&out[116..122], b"070701");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn ancestors() {
        let mut dirs = BTreeSet::new();
        add_ancestors(&mut dirs, "usr/lib/x86_64-linux-gnu/libc.so.6");
        let v: Vec<_> = dirs.into_iter().collect();
        assert_eq!(v, ["usr", "usr/lib", "usr/lib/x86_64-linux-gnu"]);
    }

    /// Boots a real guest that does 200 direct 4 KiB writes and reads on a qcow2 disk, queries
    /// QMP while it runs, and checks the exit status and qemu's block stats.
    #[test]
    fn guest_direct_io_on_qcow2() -> Result<()> {
        if !is_root() {
            eprintln!("skipping guest_direct_io_on_qcow2: not root");
            return Ok(());
        }
        if let Some(why) = missing_tools() {
            eprintln!("skipping guest_direct_io_on_qcow2: {why}");
            return Ok(());
        }
        if find_in_path("qemu-img").is_none() {
            eprintln!(
                "skipping guest_direct_io_on_qcow2: no qemu-img (apt-get install qemu-utils)"
            );
            return Ok(());
        }
        let t0 = Instant::now();
        let kernel = guest_kernel()?;
        eprintln!(
            "guest kernel {} at {} ({:?})",
            kernel.version,
            kernel.vmlinuz.display(),
            t0.elapsed()
        );

        let dir = TempDir::new("guest-test")?;
        let disk = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("64M"))?;
        let spec = GuestSpec {
            name: "overkvm-guest-test".into(),
            disk: Some(disk),
            script: "dd if=/dev/zero of=/dev/vda bs=4096 count=200 oflag=direct && \
                     dd if=/dev/vda of=/dev/null bs=4096 count=200 iflag=direct\n\
                     rc=$?\n\
                     echo overkvm-test: io done rc=$rc\n\
                     sleep 2\n\
                     exit $rc\n"
                .into(),
            ..GuestSpec::default()
        };
        let t_boot = Instant::now();
        let mut guest = Guest::boot(&spec, dir.path())?;
        let t_started = t_boot.elapsed();
        let status = guest.qmp("query-status", None)?;
        assert_eq!(status["status"], "running", "{status}");
        assert!(Path::new(&format!("/proc/{}", guest.pid())).exists());

        guest.wait_for_console(START_MARKER, Duration::from_secs(60))?;
        let t_script = t_boot.elapsed();
        guest.wait_for_console("overkvm-test: io done", Duration::from_secs(60))?;
        let t_io = t_boot.elapsed();
        let stats = guest.qmp("query-blockstats", None)?;
        let outcome = guest.wait(Duration::from_secs(60))?;
        let t_exit = t_boot.elapsed();
        eprintln!("--- guest console ---\n{}--- end ---", outcome.console);
        eprintln!(
            "guest timings: qemu started {t_started:?}, script started {t_script:?}, io done {t_io:?}, \
             exited {t_exit:?} (script sleeps 2 s)"
        );
        assert_eq!(
            outcome.status, 0,
            "guest script failed:\n{}",
            outcome.console
        );
        assert!(outcome.console.contains("rc=0"));

        let devices = stats
            .as_array()
            .context("query-blockstats returns an array")?;
        let (wr, rd) = devices
            .iter()
            .map(|d| {
                (
                    d["stats"]["wr_operations"].as_u64().unwrap_or(0),
                    d["stats"]["rd_operations"].as_u64().unwrap_or(0),
                )
            })
            .max()
            .context("no block device in query-blockstats")?;
        eprintln!("blockstats: wr_operations {wr}, rd_operations {rd}");
        assert!(wr >= 200, "wr_operations {wr} < 200: {stats}");
        assert!(rd >= 200, "rd_operations {rd} < 200: {stats}");

        // A second boot spec with the same base reuses the cached kernel and initramfs silently.
        assert!(guest_kernel()?.vmlinuz == kernel.vmlinuz);
        Ok(())
    }
}
