//! Naming processes at their first I/O, while they still live, and again after they exec.
//!
//! The kernel programs tell userspace, through a ring buffer, the tgid of every new key (a
//! process's first I/O on a device, per op) and of every process that did I/O and then
//! completed an exec. A thread here wakes on each notice and resolves the process at once, so
//! that a qemu that does its I/O and exits between two sampling ticks (a VM crashing while it
//! boots) is still named in the interval's report. An exec notice first drops what was read of
//! the process before: a qemu that did I/O inside its own exec (on a cold page cache) was read
//! with an empty command line, and one that exec'd itself keeps its comm. The report builder
//! takes these identities, and the PIDs that exec'd, with each snapshot.

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsRawFd as _, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use overkvm_common::{NOTICE_EXEC, NOTICE_NEW_KEY, ProcessNotice};

use super::{ProcessIdentity, Resolver};

/// Identities held for the sampler at most; beyond it new ones are counted in `dropped`
/// (the process is still named at the next tick if it lives). The sampler drains them every
/// interval, so this bounds a fork storm's cost, not normal use.
const MAX_PENDING: usize = 16384;

/// What the sampler takes from the naming thread each interval.
#[derive(Debug, Default)]
pub struct Named {
    /// Identities resolved at a process's first I/O or right after its exec.
    pub idents: HashMap<u32, Arc<ProcessIdentity>>,
    /// Processes that exec'd since the last take: whatever was cached about them is stale.
    pub execed: HashSet<u32>,
}

/// The ring, the resolver reading what it names, and what they found since the last take.
/// One lock for all: whoever holds it drains the ring in the kernel's order.
struct Watcher {
    ring: RingBuf<MapData>,
    resolver: Resolver,
    pending: Named,
    /// Notices that could not be kept (pending sets full) since the last `take_dropped`.
    dropped: u64,
    drains: u32,
}

/// The watcher thread and what it found.
pub struct EarlyNames {
    watcher: Arc<Mutex<Watcher>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EarlyNames {
    /// Starts the thread reading `ring` (the programs' `NEW_TGIDS`).
    pub fn start(ring: RingBuf<MapData>) -> std::io::Result<EarlyNames> {
        let fd = ring.as_raw_fd();
        let watcher = Arc::new(Mutex::new(Watcher {
            ring,
            resolver: Resolver::new().with_cache_capacity(4096),
            pending: Named::default(),
            dropped: 0,
            drains: 0,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (watcher, stop) = (watcher.clone(), stop.clone());
            std::thread::Builder::new()
                .name("overkvm-names".into())
                .spawn(move || watch(fd, &watcher, &stop))?
        };
        Ok(EarlyNames {
            watcher,
            stop,
            thread: Some(thread),
        })
    }

    /// The identities resolved, and the processes that exec'd, since the last call.
    ///
    /// The ring is drained first, on the caller's thread: every notice the kernel wrote
    /// before this call is in the answer. The sampler calls it after reading the counting
    /// maps, so an exec that came before any I/O those maps counted is always seen with them,
    /// whatever the naming thread was doing.
    pub fn take(&self) -> Named {
        let mut w = lock(&self.watcher);
        w.drain();
        std::mem::take(&mut w.pending)
    }

    /// Notifications that could not be kept (pending set full) since the last call.
    pub fn take_dropped(&self) -> u64 {
        std::mem::take(&mut lock(&self.watcher).dropped)
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

fn lock(watcher: &Mutex<Watcher>) -> std::sync::MutexGuard<'_, Watcher> {
    match watcher.lock() {
        Ok(w) => w,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Wakes on each notice (`fd` is the ring's, which `watcher` keeps open) and drains the ring,
/// so a short-lived process is read while it lives.
fn watch(fd: RawFd, watcher: &Mutex<Watcher>, stop: &AtomicBool) {
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
        lock(watcher).drain();
    }
}

impl Watcher {
    /// Reads every notice in the ring and acts on each in the kernel's order: an exec notice
    /// drops what the resolver read before it, then the process is read (again).
    fn drain(&mut self) {
        let mut notices = Vec::new();
        while let Some(item) = self.ring.next() {
            notices.extend(parse_notice(&item));
        }
        for notice in notices {
            self.note(notice);
        }
        self.drains = self.drains.wrapping_add(1);
        if self.drains.is_multiple_of(64) {
            self.resolver.retain(crate::host::proc::alive);
        }
    }

    fn note(&mut self, notice: ProcessNotice) {
        let tgid = notice.tgid;
        let p = &mut self.pending;
        if notice.kind == NOTICE_EXEC {
            self.resolver.forget(tgid);
            if p.execed.len() < MAX_PENDING || p.execed.contains(&tgid) {
                p.execed.insert(tgid);
            } else {
                self.dropped += 1;
            }
        }
        let Some(ident) = self.resolver.resolve(tgid) else {
            return;
        };
        if p.idents.len() >= MAX_PENDING && !p.idents.contains_key(&tgid) {
            self.dropped += 1;
            return;
        }
        // Half a process (inside its exec) never replaces a whole one.
        if ident.complete || !p.idents.get(&tgid).is_some_and(|i| i.complete) {
            p.idents.insert(tgid, ident);
        }
    }
}

/// One ring buffer record, or None for a record this version does not know (a shorter one, an
/// unknown kind, tgid 0).
fn parse_notice(item: &[u8]) -> Option<ProcessNotice> {
    let field = |at: usize| -> Option<u32> {
        let raw = item.get(at..at + 4)?;
        Some(u32::from_ne_bytes(raw.try_into().ok()?))
    };
    let notice = ProcessNotice {
        tgid: field(0)?,
        kind: field(4)?,
    };
    (notice.tgid != 0 && matches!(notice.kind, NOTICE_NEW_KEY | NOTICE_EXEC)).then_some(notice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tgid: u32, kind: u32) -> Vec<u8> {
        [tgid.to_ne_bytes(), kind.to_ne_bytes()].concat()
    }

    #[test]
    fn notices_are_parsed_and_strange_ones_ignored() {
        assert_eq!(
            parse_notice(&record(42, NOTICE_EXEC)),
            Some(ProcessNotice {
                tgid: 42,
                kind: NOTICE_EXEC
            })
        );
        assert_eq!(
            parse_notice(&record(7, NOTICE_NEW_KEY)).map(|n| n.tgid),
            Some(7)
        );
        assert_eq!(parse_notice(&record(0, NOTICE_NEW_KEY)), None, "tgid 0");
        assert_eq!(parse_notice(&record(7, 99)), None, "unknown kind");
        assert_eq!(parse_notice(&42u32.to_ne_bytes()), None, "a bare tgid");
        assert_eq!(parse_notice(&[]), None);
    }
}
