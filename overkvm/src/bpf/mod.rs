//! Loading and attaching the kernel programs.
//!
//! The hook family is chosen from what the running kernel has (its BTF names every tracepoint),
//! the structure offsets the programs need are resolved from the same BTF and passed as a global,
//! and every precondition that can fail gets a message that says what to do.

pub mod btf;
pub mod layout;
pub mod tracefs;

use std::fmt;

use anyhow::{Context as _, anyhow, bail};
use aya::{Ebpf, EbpfLoader, programs::BtfTracePoint};
use overkvm_common::{IoCounters, IoKey, IoStats, KeySlot, capacity, maps, programs};

use self::{btf::Btf, layout::HookSupport};

/// The eBPF object built by build.rs (empty when built with AYA_BUILD_SKIP=1).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overkvm"));

/// Which tracepoints count and time requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookMode {
    /// `block_io_start` / `block_io_done` (Linux 6.5+): one hook at each end of a request.
    IoStartDone,
    /// `block_getrq` / `block_rq_issue` / `block_rq_complete`, for kernels before 6.5.
    RequestFallback,
}

impl crate::choice::Choice for HookMode {
    const VALUES: &'static [HookMode] = &[HookMode::IoStartDone, HookMode::RequestFallback];

    fn name(self) -> &'static str {
        HookMode::name(self)
    }

    fn help(self) -> &'static str {
        match self {
            HookMode::IoStartDone => {
                "`block_io_start` / `block_io_done` (Linux 6.5+): one hook at each end of a request"
            }
            HookMode::RequestFallback => {
                "`block_getrq` / `block_rq_issue` / `block_rq_complete`, for kernels before 6.5"
            }
        }
    }
}

impl HookMode {
    pub fn name(self) -> &'static str {
        match self {
            HookMode::IoStartDone => "io-start-done",
            HookMode::RequestFallback => "request-fallback",
        }
    }

    /// (program name, tracepoint) pairs of this mode.
    fn hooks(self) -> &'static [(&'static str, &'static str)] {
        match self {
            HookMode::IoStartDone => &[
                (programs::IO_START, "block_io_start"),
                (programs::IO_DONE, "block_io_done"),
                (programs::BIO_BACKMERGE, "block_bio_backmerge"),
                (programs::BIO_FRONTMERGE, "block_bio_frontmerge"),
                (programs::FLUSH_ISSUE, "block_rq_issue"),
                (programs::RQ_REQUEUE, "block_rq_requeue"),
            ],
            HookMode::RequestFallback => &[
                (programs::RQ_GETRQ, "block_getrq"),
                (programs::RQ_ISSUE, "block_rq_issue"),
                (programs::RQ_COMPLETE, "block_rq_complete"),
                (programs::RQ_REQUEUE, "block_rq_requeue"),
            ],
        }
    }

    /// The best mode the kernel supports, if any.
    pub fn pick(support: &HookSupport) -> Option<HookMode> {
        if support.io_start_done {
            Some(HookMode::IoStartDone)
        } else if support.rq_fallback {
            Some(HookMode::RequestFallback)
        } else {
            None
        }
    }
}

impl fmt::Display for HookMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Force a hook family instead of the best available one.
    pub mode: Option<HookMode>,
    /// Count bios on bio-based and stacked devices (zram, md, dm). The hook is attached once
    /// such a device with a size exists (at load, or later through `refresh_bio_hook`): on a
    /// host of blk-mq disks only it would cost a call per I/O for nothing.
    pub bio: bool,
    /// Count bios on blk-mq devices too (by default only on bio-based ones, where they are the
    /// only count; on blk-mq devices the request hooks count the same I/O).
    pub all_bios: bool,
    /// Record each request's latency (default). Off, only counts, bytes and device flushes are
    /// kept, for about half the cost per I/O (see `KernelLayout::latency`).
    pub latency: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            mode: None,
            bio: true,
            all_bios: false,
            latency: true,
        }
    }
}

/// Memory the per-CPU counting maps may take at most, each: their entries hold one value per
/// possible CPU, so hosts with many CPUs get fewer entries (see `scaled_capacity`).
pub const MAP_MEMORY_BUDGET: u64 = 64 << 20;

/// Entries of a per-CPU map of `value_size`-byte values within `MAP_MEMORY_BUDGET` on `cpus`
/// CPUs: at most `max`, at least 1024 (beyond the budget then, rather than too few keys to
/// follow a few hundred VMs).
pub fn scaled_capacity(max: u32, key_size: usize, value_size: usize, cpus: usize) -> u32 {
    // Kernel per-element overhead of a hash map (struct htab_elem and the per-CPU pointer).
    let per_entry = (value_size * cpus.max(1) + key_size + 64) as u64;
    (MAP_MEMORY_BUDGET / per_entry).clamp(1024, u64::from(max)) as u32
}

/// The loaded, attached programs and their maps. Dropping it detaches everything.
pub struct Programs {
    ebpf: Ebpf,
    pub mode: HookMode,
    /// Tracepoints attached, in order.
    pub attached: Vec<&'static str>,
    /// What the layout resolution had to say (missing optional fields).
    pub notes: Vec<String>,
    /// Possible CPUs: per-CPU maps hold this many values per entry.
    pub cpus: usize,
    /// Entries of `IO_STATS` and `BIO_STATS` as loaded.
    pub io_stats_capacity: u32,
    pub bio_stats_capacity: u32,
    /// The bio hook is wanted but not attached yet (no bio-based device so far).
    bio_pending: bool,
    /// The kernel has `block_split` (attached with the bio hook).
    split_hook: bool,
}

impl fmt::Debug for Programs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Programs")
            .field("mode", &self.mode)
            .field("attached", &self.attached)
            .finish()
    }
}

/// True when the object was built without the eBPF programs.
pub fn object_is_stub() -> bool {
    OBJECT.is_empty()
}

/// Checks what loading needs and explains what is missing.
pub fn preflight() -> anyhow::Result<()> {
    if object_is_stub() {
        bail!(
            "this overkvm-io was built without its eBPF programs (AYA_BUILD_SKIP): rebuild with \
             `cargo xtask run` or after `cargo xtask setup`"
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "loading eBPF programs needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_RESOURCE): \
             run it with sudo"
        );
    }
    if !std::path::Path::new(Btf::SYSFS_PATH).exists() {
        bail!(
            "this kernel has no BTF at {} (CONFIG_DEBUG_INFO_BTF): overkvm reads structure \
             offsets and tracepoint types from it",
            Btf::SYSFS_PATH
        );
    }
    Ok(())
}

/// The hook mode asked for (checked against the kernel) or the best one it has; refuses
/// `--no-latency` where the fallback hooks would be used.
fn choose_mode(opts: &LoadOptions, support: &HookSupport) -> anyhow::Result<HookMode> {
    let mode = match opts.mode {
        Some(m) => {
            let ok = match m {
                HookMode::IoStartDone => support.io_start_done,
                HookMode::RequestFallback => support.rq_fallback,
            };
            if !ok {
                bail!("this kernel has no tracepoints for hook mode {m}");
            }
            m
        }
        None => HookMode::pick(support).ok_or_else(|| {
            anyhow!(
                "this kernel has neither block_io_start/block_io_done nor \
                 block_getrq/block_rq_issue/block_rq_complete tracepoints"
            )
        })?,
    };
    if !opts.latency && mode == HookMode::RequestFallback {
        bail!(
            "--no-latency needs the block_io_start/block_io_done hooks (Linux 6.5+); the \
             fallback hooks of this kernel hand every request from its issue to its \
             completion anyway"
        );
    }
    Ok(mode)
}

/// Entries of the maps whose size depends on the host (its CPUs) and the options.
struct MapSizes {
    io_stats: u32,
    bio_stats: u32,
}

impl MapSizes {
    fn new(opts: &LoadOptions, cpus: usize) -> MapSizes {
        let io_stats = scaled_capacity(
            capacity::IO_STATS,
            size_of::<IoKey>() + size_of::<KeySlot>(),
            size_of::<IoStats>(),
            cpus,
        );
        let bio_stats = if opts.bio {
            scaled_capacity(
                capacity::BIO_STATS,
                size_of::<IoKey>(),
                size_of::<IoCounters>(),
                cpus,
            )
        } else {
            1
        };
        MapSizes {
            io_stats,
            bio_stats,
        }
    }

    /// Sizes the maps; those of a mode or feature not in use are shrunk to one entry: no
    /// memory for nothing.
    fn apply(&self, loader: &mut EbpfLoader, mode: HookMode, opts: &LoadOptions) {
        if mode != HookMode::RequestFallback {
            loader.map_max_entries(maps::BIO_INFLIGHT, 1);
        }
        if !opts.latency {
            loader.map_max_entries(maps::INFLIGHT, 1);
        }
        for map in [
            maps::IO_KEYS,
            maps::IO_STATS,
            maps::FREE_SLOTS,
            maps::SLOT_GENERATIONS,
        ] {
            loader.map_max_entries(map, self.io_stats);
        }
        loader.map_max_entries(maps::BIO_STATS, self.bio_stats);
    }
}

/// Hands out every slot but 0 (an unset in-flight entry names slot 0).
fn fill_free_slots(ebpf: &mut Ebpf, capacity: u32) -> anyhow::Result<()> {
    let mut free: aya::maps::Queue<_, u32> = ebpf
        .map_mut(maps::FREE_SLOTS)
        .context("map FREE_SLOTS missing")?
        .try_into()
        .context("opening map FREE_SLOTS")?;
    for index in 1..capacity {
        free.push(index, 0).context("filling FREE_SLOTS")?;
    }
    Ok(())
}

/// Loads (verifies) the mode's programs and, with bio counting, the bio hooks, so a kernel
/// that rejects one fails at start rather than when a bio-based device appears.
fn verify_programs(
    ebpf: &mut Ebpf,
    mode: HookMode,
    opts: &LoadOptions,
    support: &HookSupport,
    btf: &aya::Btf,
) -> anyhow::Result<()> {
    let mut hooks: Vec<(&'static str, &'static str)> = mode.hooks().to_vec();
    if opts.bio {
        if !support.bio_queue {
            bail!("this kernel has no block_bio_queue tracepoint (use --no-bio)");
        }
        hooks.push((programs::BIO_QUEUE, "block_bio_queue"));
        if support.block_split {
            hooks.push((programs::BIO_SPLIT, "block_split"));
        }
    }
    for (prog_name, tracepoint) in &hooks {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(prog_name)
            .ok_or_else(|| anyhow!("program {prog_name} missing from the eBPF object"))?
            .try_into()?;
        prog.load(tracepoint, btf)
            .with_context(|| format!("verifying program {prog_name} for {tracepoint}"))?;
    }
    Ok(())
}

impl Programs {
    /// Loads and attaches the programs for this kernel.
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Programs> {
        preflight()?;
        raise_memlock_limit();
        let kernel_btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
        let support = layout::hooks_available(&kernel_btf);
        let mode = choose_mode(opts, &support)?;
        let mut report = layout::kernel_layout(&kernel_btf)?;
        report.layout.all_bios = u32::from(opts.all_bios);
        report.layout.latency = u32::from(opts.latency);

        let mut loader = EbpfLoader::new();
        loader.override_global(programs::LAYOUT_GLOBAL, &report.layout, true);
        let cpus = aya::util::nr_cpus()
            .map_err(|(path, e)| anyhow!("reading the number of possible CPUs from {path}: {e}"))?;
        let sizes = MapSizes::new(opts, cpus);
        sizes.apply(&mut loader, mode, opts);
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF object into the kernel")?;
        fill_free_slots(&mut ebpf, sizes.io_stats)?;

        let aya_btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF for aya")?;
        verify_programs(&mut ebpf, mode, opts, &support, &aya_btf)?;
        let mut programs = Programs {
            ebpf,
            mode,
            attached: Vec::new(),
            notes: report.notes,
            cpus,
            io_stats_capacity: sizes.io_stats,
            bio_stats_capacity: sizes.bio_stats,
            bio_pending: opts.bio,
            split_hook: support.block_split,
        };
        for (prog_name, tracepoint) in mode.hooks() {
            programs.attach(prog_name, tracepoint)?;
        }
        programs.attach_exec_hook(&aya_btf);
        if opts.bio && opts.all_bios {
            programs.attach_bio_hooks()?;
        } else {
            programs.refresh_bio_hook()?;
        }
        Ok(programs)
    }

    fn attach(&mut self, prog_name: &str, tracepoint: &'static str) -> anyhow::Result<()> {
        let prog: &mut BtfTracePoint = self
            .ebpf
            .program_mut(prog_name)
            .ok_or_else(|| anyhow!("program {prog_name} missing from the eBPF object"))?
            .try_into()?;
        prog.attach()
            .with_context(|| format!("attaching {prog_name} to tracepoint {tracepoint}"))?;
        self.attached.push(tracepoint);
        Ok(())
    }

    /// The exec notice (see overkvm-ebpf's `process.rs`). Without it a process that execs after
    /// its first I/O keeps the name read before the exec when its comm does not change; that
    /// is a degradation, not a reason to refuse to count, so a failure is a note.
    fn attach_exec_hook(&mut self, btf: &aya::Btf) {
        let tracepoint = "sched_process_exec";
        let attached = (|| -> anyhow::Result<()> {
            let prog: &mut BtfTracePoint = self
                .ebpf
                .program_mut(programs::PROC_EXEC)
                .ok_or_else(|| anyhow!("program {} missing", programs::PROC_EXEC))?
                .try_into()?;
            prog.load(tracepoint, btf)?;
            self.attach(programs::PROC_EXEC, tracepoint)
        })();
        if let Err(e) = attached {
            self.notes.push(format!(
                "no exec notice ({tracepoint}: {e:#}): a process that execs after its first \
                 I/O without changing its comm keeps the name it had before"
            ));
        }
    }

    /// Attaches the bio hook once a bio-based device with a size exists (see
    /// `LoadOptions::bio`); call it every interval. Returns the devices that made it attach.
    /// Bios such a device carried before this call (at most one interval) are not counted.
    pub fn refresh_bio_hook(&mut self) -> anyhow::Result<Option<Vec<String>>> {
        if !self.bio_pending {
            return Ok(None);
        }
        let disks = crate::devices::bio_based_disks(std::path::Path::new("/sys"));
        if disks.is_empty() {
            return Ok(None);
        }
        self.attach_bio_hooks()?;
        Ok(Some(disks))
    }

    /// The bio counting hooks: every bio, and the remainders of split bios (which the kernel's
    /// per-cgroup counters count once more).
    fn attach_bio_hooks(&mut self) -> anyhow::Result<()> {
        self.attach(programs::BIO_QUEUE, "block_bio_queue")?;
        if self.split_hook {
            self.attach(programs::BIO_SPLIT, "block_split")?;
        }
        self.bio_pending = false;
        Ok(())
    }

    /// The bio hook's state: "attached", "on-demand" (verified, attached once a bio-based
    /// device appears) or "off" (`--no-bio`).
    pub fn bio_hook(&self) -> &'static str {
        if self.attached.contains(&"block_bio_queue") {
            "attached"
        } else if self.bio_pending {
            "on-demand"
        } else {
            "off"
        }
    }

    /// The loaded object, for reading maps.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// Mutable access, for deleting harvested map entries.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Kernel run statistics of each attached program. Run count and time are zero unless
    /// `kernel.bpf_stats_enabled` is on (see `enable_run_stats`); recursion misses are always
    /// counted.
    pub fn run_stats(&self) -> Vec<RunStats> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                let fd = prog.fd().ok()?;
                Some(RunStats {
                    name: name.to_string(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    recursion_misses: recursion_misses(std::os::fd::AsFd::as_fd(fd))
                        .inspect_err(|e| log::debug!("{name}: no recursion misses: {e}"))
                        .ok(),
                })
            })
            .collect()
    }
}

/// Turns on the kernel's per-program run-time statistics while the returned fd lives.
/// What the kernel counts of one program's runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped because the program was already running on that CPU (a
    /// tracepoint fired again from an interrupt while the program ran in a task): each is an
    /// event the program never saw, an I/O not counted. None: the kernel did not tell (before
    /// 5.12 it reads 0).
    pub recursion_misses: Option<u64>,
}

/// `bpf_prog_info.recursion_misses` of the program behind `fd` (aya 0.14 has no accessor).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: all-zero is a valid bpf_prog_info (plain integers and pointers as u64).
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    // The `info` member of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: `attr` points at `info`, which outlives the call and is `info_len` bytes long;
    // the kernel writes at most that many.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<InfoAttr>() as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.recursion_misses)
}

pub fn enable_run_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time statistics")
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large maps load there.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall on a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_shrinks_with_cpus_within_bounds() {
        let full = |cpus| scaled_capacity(16384, 24, 200, cpus);
        assert_eq!(full(2), 16384, "a small host gets the whole map");
        let on_64 = full(64);
        assert!(on_64 < 16384 && on_64 > 4096, "{on_64}");
        let per_entry = (200 * 64 + 24 + 64) as u64;
        assert!(u64::from(on_64) * per_entry <= MAP_MEMORY_BUDGET);
        assert!(full(128) < on_64);
        assert_eq!(full(100_000), 1024, "never below the floor");
        // Small values on many CPUs: the most entries that fit the budget.
        let bio = scaled_capacity(16384, 24, 32, 256);
        let per_entry = (32 * 256 + 24 + 64) as u64;
        assert!(u64::from(bio) * per_entry <= MAP_MEMORY_BUDGET);
        assert!(u64::from(bio + 1) * per_entry > MAP_MEMORY_BUDGET);
    }
}
