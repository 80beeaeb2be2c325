//! Reads QEMU's counters of the VM disks that no host block device sees (see `backing`), off
//! the sampling thread.
//!
//! One worker thread per QMP socket. Each interval the pipeline pokes every worker; a worker
//! still busy with the previous poke (a hung or slow QEMU) misses this one, so a VM gets at
//! most one request per interval and the interval never waits for QEMU: the pipeline takes
//! whatever readings arrived since the last tick from a channel, without blocking. A reading
//! carries cumulative counters; the report turns two readings into the interval's counts
//! (`report::qemu_rows`), so a missed poke delays counts, never loses them.
//!
//! Which monitors overkvm may use: its own VMs' sockets (it started them) and sockets the
//! operator named explicitly (`--qmp`). A monitor serves one client at a time, so every poll
//! is a short connection (greeting, capabilities, one command) and the monitor is free again
//! for overkvm's lifecycle commands and for the throttle. The backing (which disks are
//! networked, and their targets) is read once per qemu process and again only when the set
//! of protocol nodes changes (hotplug, a block job): in steady state, one `query-blockstats`.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError},
    thread,
    time::{Duration, Instant},
};

use super::{
    backing::{self, BlockNode, DiskCounters, Mount},
    qmp::Qmp,
};

/// Bound on each read and write of one poll: a monitor that does not answer within it is
/// given up for this interval.
const QMP_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the list of overkvm's own running VMs is read again.
const SOCKETS_REFRESH: Duration = Duration::from_secs(5);

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
fn mount_in(pid: u32, mounts: &[Mount], file: &str) -> Option<Mount> {
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

fn worker(socket: PathBuf, pokes: Receiver<()>, out: Sender<QemuReading>) {
    let mut known = Known::default();
    let mut failing = false;
    while pokes.recv().is_ok() {
        match poll(&socket, &mut known) {
            Ok(r) => {
                failing = false;
                if out.send(r).is_err() {
                    return;
                }
            }
            // Logged once per failure streak: a stopped VM's socket fails every interval.
            Err(e) if !failing => {
                failing = true;
                log::debug!("QEMU counters from {}: {e:#}", socket.display());
            }
            Err(_) => {}
        }
    }
}

/// Which QEMU monitors overkvm reads network disks' counters from.
#[derive(Clone, Debug, Default)]
pub struct QemuSources {
    /// QMP sockets the operator named (`--qmp`): overkvm may use them.
    pub explicit: Vec<PathBuf>,
    /// overkvm's own running VMs (their monitors are overkvm's).
    pub own_vms: bool,
}

/// The QMP sockets to read now (asked every [`SOCKETS_REFRESH`]): overkvm's own running VMs
/// are known to `lifecycle`, which builds this from [`QemuSources`].
pub type SocketList = Box<dyn Fn() -> Vec<PathBuf> + Send>;

/// The workers, one per socket, and the channel their readings arrive on.
pub struct QemuCounters {
    sockets: SocketList,
    workers: HashMap<PathBuf, SyncSender<()>>,
    readings: Receiver<QemuReading>,
    sender: Sender<QemuReading>,
    sockets_read: Option<Instant>,
}

impl QemuCounters {
    /// Polls the monitors `sockets` names.
    pub fn new(sockets: SocketList) -> QemuCounters {
        let (sender, readings) = mpsc::channel();
        QemuCounters {
            sockets,
            workers: HashMap::new(),
            readings,
            sender,
            sockets_read: None,
        }
    }

    /// Readings that arrived since the last call (never waits), then pokes every worker for
    /// the next interval.
    pub fn tick(&mut self) -> Vec<QemuReading> {
        let got: Vec<QemuReading> = self.readings.try_iter().collect();
        if self
            .sockets_read
            .is_none_or(|t| t.elapsed() >= SOCKETS_REFRESH)
        {
            self.sockets_read = Some(Instant::now());
            let mut want = (self.sockets)();
            want.sort();
            want.dedup();
            // Dropping a worker's poke sender ends its thread after its current poll.
            self.workers.retain(|s, _| want.contains(s));
            for s in want {
                if !self.workers.contains_key(&s) {
                    let (poke, pokes) = mpsc::sync_channel(1);
                    let out = self.sender.clone();
                    let socket = s.clone();
                    let spawned = thread::Builder::new()
                        .name("overkvm-qemu".into())
                        .spawn(move || worker(socket, pokes, out));
                    match spawned {
                        Ok(_) => {
                            self.workers.insert(s, poke);
                        }
                        Err(e) => log::warn!("starting a QEMU counter thread: {e}"),
                    }
                }
            }
        }
        for poke in self.workers.values() {
            // Full: the worker has not taken the last poke yet (its QEMU is slow): skip.
            match poke.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        os::unix::net::UnixListener,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use serde_json::{Value, json};

    use super::*;

    fn only(socket: PathBuf) -> SocketList {
        Box::new(move || vec![socket.clone()])
    }

    /// A monitor that accepts and never says a word: every tick still returns at once.
    #[test]
    fn a_hung_monitor_never_stalls_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("hung.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = Arc::clone(&held);
        thread::spawn(move || {
            for s in listener.incoming().flatten() {
                h.lock().unwrap().push(s);
            }
        });
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
        // Pokes while the worker waits on the hung monitor are dropped, not queued up.
        assert!(
            held.lock().unwrap().len() <= 2,
            "{}",
            held.lock().unwrap().len()
        );
    }

    /// A monitor with one NBD disk: readings arrive on later ticks, one request per poke, and
    /// the backing is asked once.
    #[test]
    fn readings_of_a_network_disk_arrive_on_later_ticks() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
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
                    writeln!(w, "{}", json!({"return": reply, "id": v["id"]})).unwrap();
                }
            }
        });
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
