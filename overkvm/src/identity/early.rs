//! Naming processes at their first I/O, while they still live.
//!
//! The kernel programs tell userspace, through a ring buffer, the tgid of every new key (a
//! process's first I/O on a device, per op). A thread here wakes on each notification and
//! resolves the process at once, so that a qemu that does its I/O and exits between two
//! sampling ticks (a VM crashing while it boots) is still named in the interval's report. The
//! report builder takes these identities with each snapshot.

use std::{
    collections::HashMap,
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};

use super::{ProcessIdentity, Resolver};

/// Identities held for the sampler at most; beyond it new ones are counted in `dropped`
/// (the process is still named at the next tick if it lives). The sampler drains them every
/// interval, so this bounds a fork storm's cost, not normal use.
const MAX_PENDING: usize = 16384;

/// Identities resolved since the last `take`, and how many could not be kept.
#[derive(Default)]
struct Pending {
    idents: HashMap<u32, Arc<ProcessIdentity>>,
}

/// The watcher thread and what it found.
pub struct EarlyNames {
    pending: Arc<Mutex<Pending>>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EarlyNames {
    /// Starts the thread reading `ring` (the programs' `NEW_TGIDS`).
    pub fn start(ring: RingBuf<MapData>) -> std::io::Result<EarlyNames> {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let thread = {
            let (pending, stop, dropped) = (pending.clone(), stop.clone(), dropped.clone());
            std::thread::Builder::new()
                .name("overkvm-names".into())
                .spawn(move || watch(ring, &pending, &stop, &dropped))?
        };
        Ok(EarlyNames {
            pending,
            stop,
            dropped,
            thread: Some(thread),
        })
    }

    /// The identities resolved since the last call.
    pub fn take(&self) -> HashMap<u32, Arc<ProcessIdentity>> {
        match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut p.idents),
            Err(poisoned) => std::mem::take(&mut poisoned.into_inner().idents),
        }
    }

    /// Notifications that could not be kept (pending set full) since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

impl Drop for EarlyNames {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(
    mut ring: RingBuf<MapData>,
    pending: &Mutex<Pending>,
    stop: &AtomicBool,
    dropped: &AtomicU64,
) {
    let mut resolver = Resolver::new().with_cache_capacity(4096);
    let fd = ring.as_raw_fd();
    // Tgids already named whose process has not changed: one resolve per process, however
    // many keys it creates. Cleared with the resolver's cache now and then.
    let mut rounds = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the timeout bounds how long a stop request waits.
        let n = unsafe { libc::poll(&mut pfd, 1, 200) };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let mut tgids = Vec::new();
        while let Some(item) = ring.next() {
            if let Ok(raw) = <[u8; 4]>::try_from(&item[..item.len().min(4)]) {
                tgids.push(u32::from_ne_bytes(raw));
            }
        }
        for tgid in tgids {
            if tgid == 0 {
                continue;
            }
            let Some(ident) = resolver.resolve(tgid) else {
                continue;
            };
            let mut p = match pending.lock() {
                Ok(p) => p,
                Err(poisoned) => poisoned.into_inner(),
            };
            if p.idents.len() >= MAX_PENDING && !p.idents.contains_key(&tgid) {
                dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            p.idents.insert(tgid, ident);
        }
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(64) {
            resolver.retain(crate::host::proc::alive);
        }
    }
}
