//! Reads QEMU's counters of the VM disks that no host block device sees (see `backing`), off
//! the sampling thread.
//!
//! A small pool of worker threads ([`POOL_THREADS`]) serves every source, however many VMs
//! there are: each interval the pipeline hands the pool one job per source that is idle (its
//! previous job answered) and not resting after a failure. A source whose job is still out (a
//! hung or slow QEMU, a stuck libvirtd) is skipped, so a VM gets at most one request per
//! interval; every read has a timeout, so a hung source holds one worker for that long at
//! most and then rests for [`FAILURE_REST`]; and the interval never waits: the pipeline takes
//! whatever readings arrived since the last tick from a channel, without blocking. A reading
//! carries cumulative counters; the report turns two readings into the interval's counts
//! (`report::qemu_rows`), so a missed interval delays counts, never loses them.
//!
//! Which sources overkvm may use: its own VMs' QMP sockets (it started them), sockets the
//! operator named explicitly (`--qmp`), and libvirt's domains through libvirt itself (one
//! `virsh domstats --block` for all of them, see `libvirt`; never libvirt's monitor). A QMP
//! monitor serves one client at a time, so every poll is a short connection (greeting,
//! capabilities, one command) and the monitor is free again for overkvm's lifecycle commands
//! and for the throttle. The backing (which disks are networked, and their targets) is read
//! once per qemu process and again only when the set of protocol nodes changes (hotplug, a
//! block job): in steady state, one `query-blockstats`.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, Sender},
    },
    thread,
    time::{Duration, Instant},
};

use super::{
    backing::{self, BlockNode, DiskCounters, Mount},
    libvirt,
    qmp::Qmp,
};

/// Bound on each read and write of one poll: a monitor that does not answer within it is
/// given up for this interval.
const QMP_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the list of sources (overkvm's own running VMs, libvirt's presence) is read again.
const SOCKETS_REFRESH: Duration = Duration::from_secs(5);
/// Worker threads shared by all sources. A healthy poll takes about a millisecond of a
/// worker (a QMP round trip; libvirt's one virsh run for all domains a few tens), so a few
/// serve hundreds of VMs within an interval, and this many hung sources at once are needed
/// to hold back the others for one [`QMP_TIMEOUT`].
pub const POOL_THREADS: usize = 4;
/// How long a source that failed (no answer within its timeout, a closed socket) is left
/// alone: a hung QEMU must not take a worker for a whole timeout every interval.
pub const FAILURE_REST: Duration = Duration::from_secs(10);

/// One guest disk QEMU counts for overkvm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDiskReading {
    /// The disk as the VM's configuration names it (`drive-virtio-disk0`, `virtio-disk0`).
    pub disk: String,
    /// Where its data lives, credentials stripped (`nbd://127.0.0.1:10809/export`).
    pub target: String,
    pub counters: DiskCounters,
}

/// One poll of one VM's monitor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuReading {
    /// The qemu process behind the socket (the socket's peer).
    pub pid: u32,
    /// Only the disks whose I/O no host block device sees.
    pub disks: Vec<NetDiskReading>,
}

/// What a worker knows of its qemu between polls.
#[derive(Default)]
struct Known {
    pid: u32,
    /// The protocol nodes the backing was read for.
    nodes: HashSet<String>,
    /// Network disk → target.
    network: HashMap<String, String>,
}

/// The pid of the process at the other end of a unix socket (`SO_PEERCRED`).
fn peer_pid(qmp: &Qmp) -> Option<u32> {
    let fd = qmp.as_raw_fd();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; `fd` is an open socket.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// The mount holding `file` as qemu `pid` sees it (its mount namespace and working directory).
pub(super) fn mount_in(pid: u32, mounts: &[Mount], file: &str) -> Option<Mount> {
    let abs = if file.starts_with('/') {
        PathBuf::from(file)
    } else {
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()?
            .join(file)
    };
    backing::mount_of(mounts, abs.to_str()?).cloned()
}

/// One poll: a short connection, `query-blockstats`, and `query-named-block-nodes` when the
/// qemu or its protocol nodes changed.
fn poll(socket: &Path, known: &mut Known) -> anyhow::Result<QemuReading> {
    let mut qmp = Qmp::connect(socket, QMP_TIMEOUT)?;
    let pid = peer_pid(&qmp).ok_or_else(|| anyhow::anyhow!("no peer pid on the socket"))?;
    let stats = backing::parse_blockstats(&qmp.execute("query-blockstats", None)?);
    let nodes: HashSet<String> = stats
        .iter()
        .filter_map(|e| e.protocol_node.clone())
        .collect();
    if pid != known.pid || nodes != known.nodes {
        let named: HashMap<String, BlockNode> =
            backing::parse_named_nodes(&qmp.execute("query-named-block-nodes", None)?);
        let mountinfo =
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        let mounts = backing::parse_mountinfo(&mountinfo);
        known.network = backing::network_disks(&stats, &named, |f| mount_in(pid, &mounts, f));
        known.pid = pid;
        known.nodes = nodes;
    }
    let disks = stats
        .into_iter()
        .filter_map(|e| {
            let target = known.network.get(&e.disk)?.clone();
            Some(NetDiskReading {
                disk: e.disk,
                target,
                counters: e.counters,
            })
        })
        .collect();
    Ok(QemuReading { pid, disks })
}

/// One reading of the network disks behind `socket`, now (for `vm list`).
pub fn read_once(socket: &Path) -> anyhow::Result<QemuReading> {
    poll(socket, &mut Known::default())
}

/// Where counters are read: one VM's QMP monitor, or libvirt (all its domains at once).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CounterSource {
    Qmp(PathBuf),
    /// libvirt's domains, from its status XML directory and `virsh domstats`.
    Libvirt(PathBuf),
}

/// What a source keeps between its polls (it travels with the job).
enum SourceState {
    Qmp(Known),
    Libvirt(libvirt::Known),
}

impl SourceState {
    fn new(source: &CounterSource) -> SourceState {
        match source {
            CounterSource::Qmp(_) => SourceState::Qmp(Known::default()),
            CounterSource::Libvirt(_) => SourceState::Libvirt(libvirt::Known::default()),
        }
    }
}

/// One poll of one source, handed to the pool.
struct Job {
    source: CounterSource,
    state: SourceState,
}

/// A job's answer, with the state handed back.
struct Done {
    source: CounterSource,
    state: SourceState,
    result: anyhow::Result<Vec<QemuReading>>,
}

fn run(job: Job) -> Done {
    let Job { source, mut state } = job;
    let result = match (&source, &mut state) {
        (CounterSource::Qmp(socket), SourceState::Qmp(known)) => {
            poll(socket, known).map(|r| vec![r])
        }
        (CounterSource::Libvirt(dir), SourceState::Libvirt(known)) => libvirt::poll(dir, known),
        _ => Err(anyhow::anyhow!("a source's state of another kind")),
    };
    Done {
        source,
        state,
        result,
    }
}

fn pool_worker(jobs: Arc<Mutex<Receiver<Job>>>, done: Sender<Done>) {
    loop {
        // The lock is held only while waiting for the next job, never during a poll.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if done.send(run(job)).is_err() {
            return;
        }
    }
}

/// Which QEMU counters overkvm reads of network disks.
#[derive(Clone, Debug, Default)]
pub struct QemuSources {
    /// QMP sockets the operator named (`--qmp`): overkvm may use them.
    pub explicit: Vec<PathBuf>,
    /// overkvm's own running VMs (their monitors are overkvm's).
    pub own_vms: bool,
    /// libvirt's domains, through libvirt.
    pub libvirt: bool,
}

/// The sources to read now (asked every [`SOCKETS_REFRESH`]): overkvm's own running VMs are
/// known to `lifecycle`, which builds this from [`QemuSources`].
pub type SourceList = Box<dyn Fn() -> Vec<CounterSource> + Send>;

/// A source between its jobs.
enum Slot {
    /// Ready for the next interval's job.
    Idle(SourceState),
    /// Its job is with the pool.
    Busy,
    /// Failed: left alone until then.
    Resting(SourceState, Instant),
}

/// The pool, each source's slot and the channel answers arrive on.
pub struct QemuCounters {
    sources: SourceList,
    slots: HashMap<CounterSource, Slot>,
    /// Sources whose last poll failed (their failure is logged once per streak).
    failing: HashSet<CounterSource>,
    jobs: Sender<Job>,
    jobs_rx: Arc<Mutex<Receiver<Job>>>,
    done: Receiver<Done>,
    done_tx: Sender<Done>,
    threads: usize,
    sources_read: Option<Instant>,
}

impl QemuCounters {
    /// Polls the sources `sources` lists.
    pub fn new(sources: SourceList) -> QemuCounters {
        let (jobs, jobs_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        QemuCounters {
            sources,
            slots: HashMap::new(),
            failing: HashSet::new(),
            jobs,
            jobs_rx: Arc::new(Mutex::new(jobs_rx)),
            done,
            done_tx,
            threads: 0,
            sources_read: None,
        }
    }

    /// Worker threads started so far (at most [`POOL_THREADS`]).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Readings that arrived since the last call (never waits), then hands the pool one job
    /// per idle source for the next interval.
    pub fn tick(&mut self) -> Vec<QemuReading> {
        let now = Instant::now();
        let mut got = Vec::new();
        for d in self.done.try_iter() {
            // A source dropped from the list while its job was out: its answer is dropped too.
            let Some(slot) = self.slots.get_mut(&d.source) else {
                continue;
            };
            match d.result {
                Ok(r) => {
                    self.failing.remove(&d.source);
                    got.extend(r);
                    *slot = Slot::Idle(d.state);
                }
                Err(e) => {
                    // Logged once per failure streak: a stopped VM's socket fails every time.
                    if self.failing.insert(d.source.clone()) {
                        log::debug!("QEMU counters from {:?}: {e:#}", d.source);
                    }
                    *slot = Slot::Resting(d.state, now + FAILURE_REST);
                }
            }
        }
        if self
            .sources_read
            .is_none_or(|t| t.elapsed() >= SOCKETS_REFRESH)
        {
            self.sources_read = Some(now);
            let want: HashSet<CounterSource> = (self.sources)().into_iter().collect();
            self.slots.retain(|s, _| want.contains(s));
            self.failing.retain(|s| want.contains(s));
            for s in want {
                let state = SourceState::new(&s);
                self.slots.entry(s).or_insert(Slot::Idle(state));
            }
            self.grow_pool();
        }
        for (source, slot) in &mut self.slots {
            let ready = match slot {
                Slot::Idle(_) => true,
                Slot::Resting(_, until) => *until <= now,
                Slot::Busy => false,
            };
            if !ready {
                continue;
            }
            let state = match std::mem::replace(slot, Slot::Busy) {
                Slot::Idle(st) | Slot::Resting(st, _) => st,
                Slot::Busy => unreachable!("checked above"),
            };
            if self
                .jobs
                .send(Job {
                    source: source.clone(),
                    state,
                })
                .is_err()
            {
                // Every worker is gone (none could start): nothing will answer.
                *slot = Slot::Resting(SourceState::new(source), now + FAILURE_REST);
            }
        }
        got
    }

    /// Starts workers up to [`POOL_THREADS`], no more than there are sources.
    fn grow_pool(&mut self) {
        while self.threads < POOL_THREADS.min(self.slots.len()) {
            let jobs = Arc::clone(&self.jobs_rx);
            let done = self.done_tx.clone();
            match thread::Builder::new()
                .name("overkvm-qemu".into())
                .spawn(move || pool_worker(jobs, done))
            {
                Ok(_) => self.threads += 1,
                Err(e) => {
                    log::warn!("starting a QEMU counter thread: {e}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        os::unix::net::UnixListener,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use serde_json::{Value, json};

    use super::*;

    fn only(socket: PathBuf) -> SourceList {
        Box::new(move || vec![CounterSource::Qmp(socket.clone())])
    }

    /// A monitor that accepts connections and never says a word; the connections it got.
    fn hung_monitor(sock: &Path) -> Arc<Mutex<Vec<std::os::unix::net::UnixStream>>> {
        let listener = UnixListener::bind(sock).unwrap();
        let held = Arc::new(Mutex::new(Vec::new()));
        let h = Arc::clone(&held);
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                h.lock().unwrap().push(s);
            }
        });
        held
    }

    /// A monitor with one NBD disk whose read count grows by 10 per `query-blockstats`; counts
    /// the `query-blockstats` and `query-named-block-nodes` it answered.
    fn nbd_monitor(sock: &Path) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = UnixListener::bind(sock).unwrap();
        let (stats, nodes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s2, n2) = (Arc::clone(&stats), Arc::clone(&nodes));
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let v: Value = serde_json::from_str(&line).unwrap();
                    line.clear();
                    let reply = match v["execute"].as_str().unwrap() {
                        "query-blockstats" => {
                            let n = s2.fetch_add(1, Ordering::SeqCst) as u64;
                            json!([{"device": "nbd0", "node-name": "top",
                                    "stats": {"rd_operations": 10 * n, "flush_operations": n},
                                    "parent": {"node-name": "proto", "stats": {}}}])
                        }
                        "query-named-block-nodes" => {
                            n2.fetch_add(1, Ordering::SeqCst);
                            json!([{"node-name": "proto", "drv": "nbd",
                                    "file": "nbd://10.0.0.9:10809/vm7"}])
                        }
                        _ => json!({}),
                    };
                    if writeln!(w, "{}", json!({"return": reply, "id": v["id"]})).is_err() {
                        break;
                    }
                }
            }
        });
        (stats, nodes)
    }

    /// A monitor that accepts and never says a word: every tick still returns at once.
    #[test]
    fn a_hung_monitor_never_stalls_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("hung.sock");
        let held = hung_monitor(&sock);
        let mut c = QemuCounters::new(only(sock));
        for _ in 0..5 {
            let t = Instant::now();
            assert!(c.tick().is_empty());
            assert!(
                t.elapsed() < Duration::from_millis(100),
                "{:?}",
                t.elapsed()
            );
            thread::sleep(Duration::from_millis(50));
        }
        // Ticks while the pool waits on the hung monitor send it nothing more.
        assert!(
            held.lock().unwrap().len() <= 1,
            "{}",
            held.lock().unwrap().len()
        );
    }

    /// Many VMs share a few threads; monitors that never answer (more of them than threads)
    /// hold no tick and keep the healthy ones from being read only until their timeout, and
    /// are then left alone while they rest.
    #[test]
    fn many_sources_share_a_small_pool_and_hung_ones_rest() {
        const GOOD: usize = 40;
        const HUNG: usize = POOL_THREADS + 2;
        let dir = tempfile::tempdir().unwrap();
        let mut sources = Vec::new();
        let mut good = Vec::new();
        let mut hung = Vec::new();
        for i in 0..GOOD {
            let sock = dir.path().join(format!("good{i}.sock"));
            good.push(nbd_monitor(&sock).0);
            sources.push(CounterSource::Qmp(sock));
        }
        for i in 0..HUNG {
            let sock = dir.path().join(format!("hung{i}.sock"));
            hung.push(hung_monitor(&sock));
            sources.push(CounterSource::Qmp(sock));
        }
        let list = sources.clone();
        let mut c = QemuCounters::new(Box::new(move || list.clone()));
        let start = Instant::now();
        let mut per_pid_disks = 0;
        let mut ticks = 0;
        // Two timeouts for the hung ones to fail (each worker may take two in turn), then a
        // second of healthy ticks.
        while start.elapsed() < QMP_TIMEOUT * 2 + Duration::from_secs(1) {
            let t = Instant::now();
            per_pid_disks += c.tick().iter().map(|r| r.disks.len()).sum::<usize>();
            assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
            ticks += 1;
            thread::sleep(Duration::from_millis(100));
        }
        assert!(c.threads() <= POOL_THREADS, "{} threads", c.threads());
        // Each healthy monitor answered most ticks after the hung ones failed: at least 5.
        for (i, g) in good.iter().enumerate() {
            let n = g.load(Ordering::SeqCst);
            assert!(n >= 5, "good monitor {i} read {n} times in {ticks} ticks");
            assert!(n <= ticks, "at most one request per tick: {n} > {ticks}");
        }
        assert!(per_pid_disks >= GOOD * 5, "{per_pid_disks}");
        for h in &hung {
            assert_eq!(h.lock().unwrap().len(), 1, "a failed source rests");
        }
    }

    /// A monitor with one NBD disk: readings arrive on later ticks, one request per tick, and
    /// the backing is asked once.
    #[test]
    fn readings_of_a_network_disk_arrive_on_later_ticks() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let (stats, nodes) = nbd_monitor(&sock);
        let mut c = QemuCounters::new(only(sock));
        let mut got = Vec::new();
        for _ in 0..6 {
            got.extend(c.tick());
            thread::sleep(Duration::from_millis(150));
        }
        got.extend(c.tick());
        assert!(got.len() >= 3, "{got:?}");
        assert_eq!(got[0].pid, std::process::id(), "the socket's peer");
        assert_eq!(got[0].disks[0].disk, "nbd0");
        assert_eq!(got[0].disks[0].target, "nbd://10.0.0.9:10809/vm7");
        assert!(
            stats.load(Ordering::SeqCst) <= 7,
            "one request per tick at most"
        );
        assert_eq!(nodes.load(Ordering::SeqCst), 1, "the backing is read once");
        let rd: Vec<u64> = got
            .iter()
            .map(|r| r.disks[0].counters.rd_operations)
            .collect();
        assert!(rd.windows(2).all(|w| w[0] < w[1]), "{rd:?}");
    }
}
