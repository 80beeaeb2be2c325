//! Command-line interface: clap's definitions, and their mapping onto the library's plain
//! option structs. It lives in the binary: nothing in the library knows clap or this module.

use std::{
    marker::PhantomData,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use clap::{
    Args, CommandFactory as _, Parser, Subcommand,
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
};
use overkvm::{
    bpf::{HookMode, LoadOptions},
    calibrate::CalibrateOptions,
    choice::Choice,
    export::latency::LatencyBuckets,
    lifecycle::{
        definition::DiskCache,
        list::ListOptions,
        ops::{CreateOptions, DestroyOptions, StartOptions, StopOptions},
        overcommit::OvercommitOptions,
        qemu::Accel,
    },
    serve::ServeOptions,
    top::{TopOptions, columns::Column, sort::SortOrder},
};

/// Parses a library [`Choice`] by name or alias, and lists its values (with their meaning) in
/// `--help` and in the error for an unknown name.
#[derive(Clone)]
struct ChoiceParser<T>(PhantomData<T>);

fn choice<T: Choice>() -> ChoiceParser<T> {
    ChoiceParser(PhantomData)
}

impl<T: Choice> ChoiceParser<T> {
    fn values() -> impl Iterator<Item = PossibleValue> {
        T::VALUES.iter().map(|v| {
            PossibleValue::new(v.name())
                .help(v.help())
                .aliases(v.aliases().iter().copied())
        })
    }
}

impl<T: Choice> TypedValueParser for ChoiceParser<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        // clap checks the name and words the error; the value is then found the same way.
        let name = PossibleValuesParser::new(Self::values()).parse_ref(cmd, arg, value)?;
        let ignore_case = arg.is_some_and(clap::Arg::is_ignore_case_set);
        overkvm::choice::parse(&name, ignore_case)
            .ok_or_else(|| clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(Self::values()))
    }
}

/// The binary's name: in help, man pages and completions.
const BIN_NAME: &str = "overkvm-io";

/// See which VM does the disk I/O on a KVM host, per process, device and operation, from the
/// kernel's block layer (eBPF). Needs root.
#[derive(Debug, Parser)]
#[command(name = BIN_NAME, version, propagate_version = true)]
pub struct Cli {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Live view of who does I/O, busiest first: VMs and other processes ranked together by
    /// total operations per second (--sort picks another column). With --prometheus URL, the
    /// busiest VMs of every host that Prometheus scrapes (no root needed).
    ///
    /// In batch mode (-b, or when output is not a terminal) it prints one table per interval,
    /// like `top -b`; with --json one JSON object per interval per line, with exact op and byte
    /// counts for the interval (not rates).
    Top(TopArgs),
    /// Report what this host supports (BTF, tracepoints, hook mode, cgroups, permissions) and
    /// what will not work, and why. Exits non-zero when overkvm cannot run here.
    Check(CheckArgs),
    /// Run the daemon: Prometheus metrics on /metrics, and automatic IOPS throttling when the
    /// config file sets device budgets. Stops on SIGTERM/SIGINT, removing every limit it set.
    Serve(ServeArgs),
    /// Inspect or undo the throttle's limits without the daemon.
    #[command(subcommand)]
    Throttle(ThrottleCommand),
    /// Create, start, stop, list and destroy VMs on thin qcow2 overlays of a shared base
    /// image. Every VM overkvm starts uses direct I/O and its own block cgroup, so its I/O is
    /// attributed to it and a limit acts on it alone.
    #[command(subcommand)]
    Vm(VmCommand),
    /// The host's over-commit in one view: vCPUs vs host CPUs, guest RAM vs physical RAM
    /// (and what KSM saves), virtual disk size vs space allocated in overlays and bases, and
    /// device IOPS budgets vs what guests use (when the throttle daemon runs).
    Overcommit(OvercommitArgs),
    /// Measure a device: random 4 KiB read IOPS and latency at increasing queue depths and
    /// sequential read bandwidth (writes too only with --write, on a scratch device), then
    /// suggest a [[device]] block. Read-only by default; stops early when other processes'
    /// I/O on the device slows down.
    Calibrate(CalibrateArgs),
    /// Write the man pages and the bash, zsh and fish completions of this command line into
    /// a directory (`cargo xtask package` runs it, so a package's pages are its binary's own
    /// help).
    #[command(hide = true)]
    PackageFiles {
        /// Gets `man/` (one page per command) and `completions/`.
        out_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ThrottleCommand {
    /// Remove every limit, cgroup move and cgroup a (stopped or crashed) daemon left, as
    /// recorded in its state file. For ExecStopPost= of the systemd unit.
    Reset {
        /// The daemon's config (for a non-default state_file).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Show budgets, current use and every active limit (from the running daemon's status
    /// file and the state file).
    Status {
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Options of the kernel programs.
#[derive(Debug, Args, Clone)]
pub struct HookArgs {
    /// Force a hook family instead of the best the kernel has.
    #[arg(long, value_parser = choice::<HookMode>())]
    pub hooks: Option<HookMode>,
    /// Do not count bios (saves one program per bio; bio-based devices such as zram, md and
    /// dm are then not measured).
    #[arg(long)]
    pub no_bio: bool,
    /// Count bios on blk-mq devices too (`read_bios`/`write_bios`); by default only on
    /// bio-based devices, where they are the only count (saves ~150 ns per I/O).
    #[arg(long, conflicts_with = "no_bio")]
    pub all_bios: bool,
    /// Do not record latency: only ops, bytes and device flushes (about half the cost per
    /// I/O: a request's latency needs an entry handed from the CPU that submits it to the one
    /// that completes it). Latency columns, histograms and latency targets are then
    /// unavailable.
    #[arg(long)]
    pub no_latency: bool,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Batch mode: print tables (or JSON lines) instead of the interactive view.
    #[arg(short, long)]
    pub batch: bool,
    /// Seconds between updates.
    #[arg(short, long, default_value = "1", value_parser = parse_interval)]
    pub delay: Duration,
    /// Stop after this many updates (default: run until interrupted).
    #[arg(short = 'n', long)]
    pub iterations: Option<u64>,
    /// One JSON object per interval per line (batch mode).
    #[arg(long)]
    pub json: bool,
    /// Show only VMs (qemu processes).
    #[arg(long)]
    pub vms_only: bool,
    /// Sort rows by this column, in every mode (JSON rows too). Numbers sort highest first,
    /// names alphabetically; the default ranks the busiest processes first.
    #[arg(
        long,
        value_parser = choice::<Column>(),
        value_name = "COLUMN",
        ignore_case = true,
        default_value = "total-iops"
    )]
    pub sort: Column,
    /// Reverse the sort's natural direction.
    #[arg(short, long)]
    pub reverse: bool,
    /// Fleet view: the busiest VMs of every host this Prometheus scrapes (host = its
    /// `instance` label), from the metrics of each host's `overkvm-io serve`. Needs no root
    /// and loads nothing into the kernel. http[s]://HOST[:PORT][/PREFIX].
    #[arg(
        long,
        value_name = "URL",
        conflicts_with_all = ["vms_only", "hooks", "no_bio", "all_bios", "no_latency"]
    )]
    pub prometheus: Option<String>,
    /// Fleet view: credentials and TLS settings for reaching Prometheus, in the format of
    /// promtool's --http.config.file (basic_auth with username and password_file,
    /// authorization, tls_config with ca_file, cert_file, key_file, server_name). See README,
    /// "Endpoint security".
    #[arg(
        long = "http.config.file",
        alias = "prometheus-config",
        value_name = "FILE",
        requires = "prometheus"
    )]
    pub http_config: Option<PathBuf>,
    /// Fleet view: the window rates and mean latencies are taken over (PromQL range), e.g.
    /// 1m, 30s; at least two scrape intervals.
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = parse_duration, requires = "prometheus")]
    pub window: Duration,
    #[command(flatten)]
    pub qemu: QemuArgs,
    #[command(flatten)]
    pub hooks: HookArgs,
}

/// Where overkvm reads QEMU's own counters of VM disks that no host block device sees
/// (network storage: rbd, iscsi, nbd, gluster, nfs, a file on an NFS mount).
#[derive(Debug, Args)]
pub struct QemuArgs {
    /// A VM's QMP socket overkvm may use to read its network disks' counters and, in `serve`
    /// with budgets, to set its QEMU limits (repeatable). overkvm's own VMs are reached
    /// without it; never name a monitor libvirt or Proxmox owns.
    #[arg(long = "qmp", value_name = "SOCKET")]
    pub qmp: Vec<PathBuf>,
    /// Do not read QEMU's counters of overkvm's own VMs.
    #[arg(long)]
    pub no_qemu_counters: bool,
    /// Do not read libvirt domains' network disk counters through libvirt (`virsh domstats
    /// --block`, run only while some running domain has a disk no host block device sees).
    #[arg(long)]
    pub no_libvirt_counters: bool,
}

impl QemuArgs {
    pub fn sources(&self) -> overkvm::qemu::counters::QemuSources {
        overkvm::qemu::counters::QemuSources {
            explicit: self.qmp.clone(),
            own_vms: !self.no_qemu_counters,
            libvirt: !self.no_libvirt_counters,
        }
    }
}

impl HookArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            mode: self.hooks,
            bio: !self.no_bio,
            all_bios: self.all_bios,
            latency: !self.no_latency,
        }
    }
}

impl TopArgs {
    /// The order rows start in.
    pub fn sort_order(&self) -> SortOrder {
        SortOrder {
            column: self.sort,
            reversed: self.reverse,
        }
    }

    pub fn options(&self) -> TopOptions {
        TopOptions {
            batch: self.batch,
            delay: self.delay,
            iterations: self.iterations,
            json: self.json,
            vms_only: self.vms_only,
            sort: self.sort_order(),
            prometheus: self.prometheus.clone(),
            http_config: self.http_config.clone(),
            window: self.window,
            load: self.hooks.options(),
            qemu: self.qemu.sources(),
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address of the metrics endpoint (loopback by default: before exposing it, secure it
    /// with --web.config.file or put a proxy or firewall rule in front). The last one given
    /// wins, so $OVERKVM_ARGS can move the packaged unit's.
    #[arg(long, default_value = overkvm::serve::DEFAULT_LISTEN, overrides_with = "listen")]
    pub listen: std::net::SocketAddr,
    /// Secure the metrics endpoint with a web configuration file in the format of
    /// Prometheus's exporter-toolkit (as node_exporter's --web.config.file):
    /// tls_server_config (cert_file, key_file, client_auth_type, client_ca_file, min_version),
    /// basic_auth_users (bcrypt hashes) and http_server_config.headers. Checked at startup;
    /// re-read when it or a file it names changes, so renewed certificates apply without a
    /// restart. See README, "Endpoint security".
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config: Option<PathBuf>,
    /// TOML config: device budgets, VM rules, policy knobs (see README, "Throttling").
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Sampling and control interval in seconds (default 1, or [policy] interval).
    #[arg(short = 'i', long, value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// Decide and report limits, but write nothing to cgroups.
    #[arg(long)]
    pub dry_run: bool,
    /// Also export non-VM processes (by comm), at most --per-process-cap of them.
    #[arg(long)]
    pub per_process: bool,
    #[arg(long, default_value = "100")]
    pub per_process_cap: usize,
    /// How long the series of a VM that exited stay exported, in seconds.
    #[arg(long, default_value = "300", value_parser = parse_interval)]
    pub grace: Duration,
    /// Latency histogram buckets: compact (4 bounds, 65.5 µs to 268 ms, for fleets) or full
    /// (every log2 bucket, 1 µs to 34 s) [default: [export] latency_buckets, else compact].
    #[arg(long, value_parser = choice::<LatencyBuckets>(), value_name = "BUCKETS")]
    pub latency_buckets: Option<LatencyBuckets>,
    /// Most VMs exported; beyond it the least busy are left out of /metrics and counted in
    /// overkvm_exporter_vms_dropped [default: [export] max_vms, else 2000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_vms: Option<u64>,
    /// Turn on the kernel's BPF run-time statistics while serving, for
    /// overkvm_bpf_program_run_seconds_total. They make every BPF program on the host pay two
    /// clock reads per run, so they are off by default (the metric then stays 0 unless
    /// kernel.bpf_stats_enabled is already on).
    #[arg(long)]
    pub bpf_stats: bool,
    #[command(flatten)]
    pub qemu: QemuArgs,
    #[command(flatten)]
    pub hooks: HookArgs,
}

impl ServeArgs {
    pub fn options(&self) -> ServeOptions {
        ServeOptions {
            listen: self.listen,
            config: self.config.clone(),
            web_config: self.web_config.clone(),
            interval: self.interval,
            dry_run: self.dry_run,
            per_process: self.per_process,
            per_process_cap: self.per_process_cap,
            grace: self.grace,
            latency_buckets: self.latency_buckets,
            max_vms: self.max_vms,
            bpf_stats: self.bpf_stats,
            load: self.hooks.options(),
            qemu: self.qemu.sources(),
        }
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the findings as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Instead of the host checks: run the programs for SECONDS and compare overkvm's device
    /// totals with /proc/diskstats, per disk and op class (reads, writes, discards, flushes and
    /// their sectors). Exits non-zero when a difference remains once in-flight I/O completed.
    #[arg(long, value_name = "SECONDS")]
    pub parity: Option<u64>,
}

/// Where VMs live.
#[derive(Debug, Args, Clone, Default)]
pub struct StateDirArgs {
    /// Directory with one sub-directory per VM (definition, overlay, pidfile, QMP socket,
    /// serial log) [default: $OVERKVM_STATE_DIR, else /var/lib/overkvm/vms].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM: a qcow2 overlay on a base image (`qemu-img create -f qcow2 -b BASE -F
    /// FMT`, the base's format detected) and a definition file (vm.toml) with a new UUID.
    ///
    /// The name (1-64 characters of A-Z a-z 0-9 - _) becomes qemu's -name, the directory and
    /// the cgroup overkvm/vm-NAME. Nothing is left behind when any step fails.
    Create(VmCreateArgs),
    /// Start VMs with qemu (daemonized), each in its own block cgroup, with direct I/O on its
    /// overlay, a QMP socket, a pidfile and a serial log. Returns when each VM's QMP answers.
    ///
    /// With several VMs, --stagger starts them one at a time at that interval, --admit starts
    /// the next one only when the device's measured IOPS leave room under --budget (a boot
    /// storm of many guests needs thousands of IOPS). Uses KVM only when it really works on
    /// this host (not on PVM hosts), else TCG; --accel overrides.
    Start(VmStartArgs),
    /// Stop VMs: ACPI power button over QMP, `quit` after --timeout, SIGKILL as the last
    /// resort; then removes the pidfile, QMP socket and cgroup.
    Stop(VmStopArgs),
    /// List every VM on the host, whoever manages it (overkvm, libvirt, Nova, Proxmox,
    /// KubeVirt, plain qemu): manager, state (running, stopped, crashed), pid, uptime, UUID,
    /// current IOPS (from the VM's cgroup counters over one second; no root needed) and the
    /// throttle's active limits.
    List(VmListArgs),
    /// Remove VMs: their directory and overlay (the base image stays). Refuses a running VM.
    Destroy(VmDestroyArgs),
}

#[derive(Debug, Args)]
pub struct VmCreateArgs {
    /// VM name: 1-64 characters of A-Z a-z 0-9 - _ (no dots, slashes or spaces).
    pub name: String,
    /// Base image (raw, qcow2, ...), shared read-only by every overlay on it. Keep it
    /// unchanged while overlays use it.
    #[arg(long, value_name = "IMAGE")]
    pub base: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MiB", default_value = "512")]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value = "1")]
    pub vcpus: u32,
    /// Virtual disk size (e.g. 20G), at least the base's [default: the base's size].
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_size)]
    pub disk_size: Option<u64>,
    /// Boot this kernel directly instead of from the disk.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel (e.g. "console=ttyS0 root=/dev/vda").
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    pub append: Option<String>,
    /// Host cache of the disk: none (O_DIRECT, every I/O charged to the VM's cgroup) or
    /// writeback (host page cache; on cgroup v1 the throttle holds such a VM through QEMU).
    #[arg(long, value_parser = choice::<DiskCache>(), default_value = "none")]
    pub cache: DiskCache,
    #[command(flatten)]
    pub state: StateDirArgs,
}

#[derive(Debug, Args)]
pub struct VmStartArgs {
    /// VMs to start, in this order.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// Start the VMs one at a time, this long apart (e.g. 1s, 500ms, 2m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, conflicts_with = "admit")]
    pub stagger: Option<Duration>,
    /// Start the next VM only when --device measures at most --budget minus --boot-iops IOPS
    /// (over one-second windows, with overkvm's kernel programs: needs root).
    #[arg(long, requires_all = ["device", "budget"])]
    pub admit: bool,
    /// Device whose IOPS --admit watches (loop0, /dev/nvme0n1 or 8:0; a whole disk).
    #[arg(long, value_name = "DEV", requires = "admit")]
    pub device: Option<String>,
    /// IOPS the device may carry (reads + writes).
    #[arg(long, value_name = "IOPS", requires = "admit", value_parser = clap::value_parser!(u64).range(1..))]
    pub budget: Option<u64>,
    /// IOPS room one booting guest needs [default: a tenth of --budget].
    #[arg(long, value_name = "IOPS", requires = "admit")]
    pub boot_iops: Option<u64>,
    /// Give up when the device has no room for this long.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub admit_timeout: Duration,
    /// Accelerator [default: kvm if it really works here, else tcg].
    #[arg(long, value_parser = choice::<Accel>())]
    pub accel: Option<Accel>,
    /// Run the VMs without their own cgroup (e.g. without root). Their I/O is still attributed
    /// per process, but cgroup limits cannot target them alone.
    #[arg(long)]
    pub no_cgroup: bool,
    /// How long each VM may take until its QMP answers.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub state: StateDirArgs,
}

#[derive(Debug, Args)]
pub struct VmStopArgs {
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// How long the guest may take to power off after the ACPI button before qemu is told to
    /// quit (guests without ACPI handling, e.g. busybox, ignore the button).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub state: StateDirArgs,
}

#[derive(Debug, Args)]
pub struct VmListArgs {
    /// One JSON array of VMs.
    #[arg(long)]
    pub json: bool,
    /// Do not measure IOPS (otherwise `list` takes one second when VMs run).
    #[arg(long)]
    pub no_iops: bool,
    /// The throttle daemon's config, to find its status file (active limits).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub state: StateDirArgs,
}

#[derive(Debug, Args)]
pub struct VmDestroyArgs {
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    #[command(flatten)]
    pub state: StateDirArgs,
}

#[derive(Debug, Args)]
pub struct OvercommitArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Config with [[device]] IOPS budgets (and the daemon's status file location).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub state: StateDirArgs,
}

impl VmCreateArgs {
    pub fn options(&self) -> CreateOptions {
        CreateOptions {
            name: self.name.clone(),
            base: self.base.clone(),
            memory: self.memory,
            vcpus: self.vcpus,
            disk_size: self.disk_size,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
            cache: self.cache,
            state_dir: self.state.state_dir.clone(),
        }
    }
}

impl VmStartArgs {
    pub fn options(&self) -> StartOptions {
        StartOptions {
            names: self.names.clone(),
            stagger: self.stagger,
            admit: self.admit,
            device: self.device.clone(),
            budget: self.budget,
            boot_iops: self.boot_iops,
            admit_timeout: self.admit_timeout,
            accel: self.accel,
            no_cgroup: self.no_cgroup,
            timeout: self.timeout,
            state_dir: self.state.state_dir.clone(),
        }
    }
}

impl VmStopArgs {
    pub fn options(&self) -> StopOptions {
        StopOptions {
            names: self.names.clone(),
            timeout: self.timeout,
            state_dir: self.state.state_dir.clone(),
        }
    }
}

impl VmListArgs {
    pub fn options(&self) -> ListOptions {
        ListOptions {
            json: self.json,
            no_iops: self.no_iops,
            config: self.config.clone(),
            state_dir: self.state.state_dir.clone(),
        }
    }
}

impl VmDestroyArgs {
    pub fn options(&self) -> DestroyOptions {
        DestroyOptions {
            names: self.names.clone(),
            state_dir: self.state.state_dir.clone(),
        }
    }
}

impl OvercommitArgs {
    pub fn options(&self) -> OvercommitOptions {
        OvercommitOptions {
            json: self.json,
            config: self.config.clone(),
            state_dir: self.state.state_dir.clone(),
        }
    }
}

/// Parses a duration: seconds ("1", "0.5") or with a unit ("1s", "500ms", "2m"), positive
/// and at most a day.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = match t.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=86_400.0).contains(&v) => Duration::from_secs_f64(v),
        Ok(_) => return Err(format!("{s:?} is out of range (0 to 86400 s)")),
        Err(_) => humantime::parse_duration(t)
            .map_err(|e| format!("{s:?} is not a duration (e.g. 1s, 500ms, 2m): {e}"))?,
    };
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(format!(
            "{s:?} is out of range (more than 0, at most a day)"
        ));
    }
    Ok(d)
}

/// Parses a disk size (20G, 512M, bytes).
pub fn parse_disk_size(s: &str) -> Result<u64, String> {
    overkvm::lifecycle::definition::parse_size(s).map_err(|e| e.to_string())
}

/// Parses an interval in seconds ("1", "0.5"): positive and at most a day.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.05..=86_400.0).contains(&v) {
        return Err(format!("interval {s} s out of range (0.05 to 86400)"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// [`Cli`] without its hidden subcommands, for clap_complete, which (unlike `--help` and
/// clap_mangen) would offer them.
fn visible_command() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new(BIN_NAME)
        .propagate_version(full.is_propagate_version_set())
        .subcommand_required(full.is_subcommand_required_set())
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    // Where the derive's `version` takes it from (clap's strings here are 'static).
    if full.get_version().is_some() {
        cmd = cmd.version(env!("CARGO_PKG_VERSION"));
    }
    cmd
}

/// The completion script for a shell, and the file name that shell's completion directory
/// wants.
fn completion(shell: clap_complete::Shell) -> (String, String) {
    use clap_complete::Generator as _;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut visible_command(), BIN_NAME, &mut script);
    let mut script = String::from_utf8_lossy(&script).into_owned();
    if shell == clap_complete::Shell::Bash {
        // clap_complete 4.6.12 spells the case arms of a hyphenated binary's subcommands
        // `overkvm__subcmd__io__subcmd__serve)` while its loop computes
        // `overkvm__io__subcmd__serve`: no option after a subcommand would ever complete
        // (clap-rs/clap#6421). The arms are spelled as the loop does.
        script = script.replace(
            &BIN_NAME.replace('-', "__subcmd__"),
            &BIN_NAME.replace('-', "__"),
        );
    }
    (shell.file_name(BIN_NAME), script)
}

/// `overkvm-io package-files DIR`: man pages (`man/overkvm-io.1`, `man/overkvm-io-serve.1`, ...)
/// and completions (`completions/overkvm-io.bash`, `_overkvm-io`, `overkvm-io.fish`), all
/// rendered from [`Cli`], the one definition of the command line.
pub fn write_package_files(out_dir: &Path) -> anyhow::Result<()> {
    let man = out_dir.join("man");
    let completions = out_dir.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages into {}", man.display()))?;
    for shell in SHELLS {
        let (name, script) = completion(shell);
        let path = completions.join(name);
        std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The shells the packages ship completions for.
const SHELLS: [clap_complete::Shell; 3] = [
    clap_complete::Shell::Bash,
    clap_complete::Shell::Zsh,
    clap_complete::Shell::Fish,
];

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        visible_command().debug_assert();
    }

    /// The completions offer every command an operator can see, and not `package-files`.
    #[test]
    fn completions_leave_out_hidden_commands() {
        let visible: Vec<String> = Cli::command()
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_string())
            .collect();
        assert!(visible.contains(&"serve".to_string()));
        assert_eq!(
            visible_command()
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect::<Vec<_>>(),
            visible
        );
        for shell in SHELLS {
            let (_, script) = completion(shell);
            assert!(!script.contains("package-files"), "{shell}");
            for name in &visible {
                assert!(script.contains(name.as_str()), "{shell}: {name}");
            }
        }
    }

    /// What bash offers for a command line (the script sourced in a real bash).
    fn bash_completes(words: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("overkvm-io.bash");
        std::fs::write(&file, completion(clap_complete::Shell::Bash).1).unwrap();
        let cword = words.len() - 1;
        let program = format!(
            "source {file}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
             _overkvm__io overkvm-io '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file = file.display(),
            words = words.join(" "),
            cur = words[cword],
            prev = words[cword - 1],
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &program])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn bash_completes_commands_and_their_options() {
        assert_eq!(bash_completes(&["overkvm-io", "se"]), ["serve"]);
        assert_eq!(
            bash_completes(&["overkvm-io", "serve", "--li"]),
            ["--listen"]
        );
        assert_eq!(
            bash_completes(&["overkvm-io", "throttle", "reset", "--con"]),
            ["--config"]
        );
        assert!(bash_completes(&["overkvm-io", "pack"]).is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["0", "0s", "-1", "x", "2d", "nan", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vm_commands_parse() {
        let c = Cli::try_parse_from(["overkvm-io", "vm", "start", "a", "b", "--stagger", "1s"])
            .unwrap();
        match c.command {
            Command::Vm(VmCommand::Start(a)) => {
                assert_eq!(a.names, ["a", "b"]);
                assert_eq!(a.stagger, Some(Duration::from_secs(1)));
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            &[
                "overkvm-io",
                "vm",
                "start",
                "a",
                "--stagger",
                "1s",
                "--admit",
                "--device",
                "x",
                "--budget",
                "1",
            ][..],
            &["overkvm-io", "vm", "start", "a", "--admit"],
            &["overkvm-io", "vm", "start", "a", "--device", "loop0"],
            &["overkvm-io", "vm", "start"],
            &["overkvm-io", "vm", "create", "a"],
            &[
                "overkvm-io",
                "vm",
                "create",
                "a",
                "--base",
                "b",
                "--initrd",
                "i",
            ],
            &[
                "overkvm-io",
                "vm",
                "create",
                "a",
                "--base",
                "b",
                "--disk-size",
                "10X",
            ],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn top_sort_takes_column_names_in_any_case() {
        let sort_of = |args: &[&str]| {
            let mut all = vec!["overkvm-io", "top"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Top(t)) => Ok(t.sort_order()),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(sort_of(&[]), Ok(SortOrder::DEFAULT));
        for (arg, column) in [
            ("name", Column::Name),
            ("NAME", Column::Name),
            ("total-iops", Column::TotalIops),
            ("TotalIops", Column::TotalIops),
            ("write-mbs", Column::WriteMbs),
            ("lat-p99", Column::LatP99),
            ("IopsShare", Column::IopsShare),
        ] {
            assert_eq!(
                sort_of(&["--sort", arg, "-r"]),
                Ok(SortOrder {
                    column,
                    reversed: true
                }),
                "{arg}"
            );
        }
        // Every column can be named, and its name is what --help lists.
        for &column in Column::VALUES {
            let name = column.name().to_string();
            assert_eq!(
                sort_of(&["--sort", &name]).map(|s| s.column),
                Ok(column),
                "{name}"
            );
        }
        // The fleet view's flags: --window only with --prometheus.
        assert!(sort_of(&["--window", "30s"]).is_err());
        // Local-only options make no sense there: said at once rather than ignored.
        for local in [
            &["--vms-only"][..],
            &["--hooks", "request-fallback"],
            &["--no-bio"],
        ] {
            let mut args = vec!["--prometheus", "http://p:9090"];
            args.extend_from_slice(local);
            assert!(sort_of(&args).is_err(), "{local:?}");
        }
        assert!(
            sort_of(&[
                "--prometheus",
                "http://p:9090",
                "--window",
                "30s",
                "--sort",
                "host"
            ])
            .is_ok()
        );
        let err = sort_of(&["--sort", "R/s"]).unwrap_err();
        assert!(
            err.contains("possible values") && err.contains("total-iops"),
            "{err}"
        );
        let help = Cli::try_parse_from(["overkvm-io", "top", "--help"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            help.contains("--sort <COLUMN>") && help.contains("read-iops"),
            "{help}"
        );
    }

    #[test]
    fn serve_security_flags() {
        let serve = |args: &[&str]| match Cli::try_parse_from(
            ["overkvm-io", "serve"].iter().chain(args).copied(),
        )
        .map(|c| c.command)
        {
            Ok(Command::Serve(s)) => Ok(s.options()),
            Ok(_) => Err("not serve".to_string()),
            Err(e) => Err(e.to_string()),
        };
        let o = serve(&[
            "--listen",
            "127.0.0.1:9746",
            "--web.config.file",
            "/etc/overkvm/web.yml",
            "--listen",
            "[::]:9746",
        ])
        .unwrap();
        assert_eq!(o.listen, "[::]:9746".parse().unwrap());
        assert_eq!(o.web_config, Some(PathBuf::from("/etc/overkvm/web.yml")));
        let top = |args: &[&str]| {
            Cli::try_parse_from(["overkvm-io", "top"].iter().chain(args).copied())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(
            top(&["--http.config.file", "c.yml"]).is_err(),
            "needs --prometheus"
        );
        assert!(top(&["--prometheus", "https://p", "--http.config.file", "c.yml"]).is_ok());
        assert!(top(&["--prometheus", "https://p", "--prometheus-config", "c.yml"]).is_ok());
        let help = top(&["--help"]).unwrap_err();
        assert!(help.contains("--http.config.file <FILE>"), "{help}");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("1").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_interval("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "nan", "inf", "x", "1e9", ""] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}

/// Options of `overkvm-io calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The device: name (`nvme0n1`), /dev path or MAJ:MIN.
    pub device: String,
    /// Also measure writes. DESTROYS the data on the device: only for a scratch device, and
    /// refused when it (or a partition of it) is mounted, used as swap or held by another
    /// driver (dm, md).
    #[arg(long)]
    pub write: bool,
    /// Queue depths of the random-I/O steps.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,64")]
    pub depths: Vec<u32>,
    /// Seconds per step.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl CalibrateArgs {
    pub fn options(&self) -> CalibrateOptions {
        CalibrateOptions {
            device: self.device.clone(),
            write: self.write,
            depths: self.depths.clone(),
            seconds: self.seconds,
            json: self.json,
        }
    }
}
