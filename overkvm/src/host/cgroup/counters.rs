//! The per-cgroup I/O counters the kernel keeps: v1 `blkio.throttle.io_serviced`, v2
//! `io.stat`. Both count bios, the unit io.max and blkio.throttle limit.

use std::collections::BTreeMap;

/// Cumulative operations per disk (major, minor).
pub type DeviceOps = BTreeMap<(u32, u32), IoOps>;

/// Read and write operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoOps {
    pub read: u64,
    pub write: u64,
}

/// Parses v1 `blkio.throttle.io_serviced`: `MAJ:MIN Read N` ... lines and a `Total` line.
pub fn parse_v1_serviced(text: &str) -> DeviceOps {
    let mut out = DeviceOps::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(dev), Some(kind), Some(n), None) = (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let (Some(dev), Ok(n)) = (maj_min(dev), n.parse::<u64>()) else {
            continue;
        };
        let e = out.entry(dev).or_default();
        match kind {
            "Read" => e.read = n,
            "Write" => e.write = n,
            _ => {}
        }
    }
    out
}

/// Parses v2 `io.stat`: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=..`.
pub fn parse_v2_stat(text: &str) -> DeviceOps {
    let mut out = DeviceOps::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(dev) = f.next().and_then(maj_min) else {
            continue;
        };
        let mut ops = IoOps::default();
        for kv in f {
            match kv.split_once('=') {
                Some(("rios", v)) => ops.read = v.parse().unwrap_or(0),
                Some(("wios", v)) => ops.write = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        out.insert(dev, ops);
    }
    out
}

fn maj_min(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_serviced() {
        let text = "7:0 Read 120\n7:0 Write 80\n7:0 Sync 200\n7:0 Async 0\n7:0 Discard 0\n7:0 Total 200\n\
                    8:16 Read 5\n8:16 Write 0\nTotal 205\ngarbage line here x\n7:x Read 1\n";
        let m = parse_v1_serviced(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[&(7, 0)],
            IoOps {
                read: 120,
                write: 80
            }
        );
        assert_eq!(m[&(8, 16)], IoOps { read: 5, write: 0 });
        assert!(parse_v1_serviced("").is_empty());
    }

    #[test]
    fn v2_stat() {
        let text = "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n7:0 rios=x wios=3\n\nbad\n";
        let m = parse_v2_stat(text);
        assert_eq!(m[&(254, 0)], IoOps { read: 1, write: 2 });
        assert_eq!(m[&(7, 0)], IoOps { read: 0, write: 3 });
        assert_eq!(m.len(), 2);
    }
}
