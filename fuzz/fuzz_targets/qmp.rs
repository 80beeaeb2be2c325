//! Lines from a QMP monitor (greeting, replies, errors, events), and the `query-blockstats` and
//! `query-block` replies as `qemu::backing` and `qemu::limits` parse them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::qemu::{
    backing::{counters_of, parse_blockstats},
    limits::{DiskRef, disks_from_query_block},
    qmp::{Message, QmpError, parse_message},
};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    match parse_message(&line) {
        Ok(Message::Return { value, .. }) => {
            for device in ["drive-virtio-disk0", "disk0", ""] {
                if let Some(c) = counters_of(&value, &DiskRef::Device(device.into())) {
                    let _ = c.ops();
                }
            }
            for e in parse_blockstats(&value) {
                let _ = e.counters.lat_avg_us();
            }
            // `query-block` and `query-blockstats` as the throttle's QEMU actuator reads them.
            for d in disks_from_query_block(&value) {
                let _ = d.throttle.qmp_arguments(&d.disk);
                let _ = counters_of(&value, &d.disk);
            }
        }
        Ok(_) => {}
        Err(e) => {
            // Protocol errors quote at most 200 characters of what qemu sent.
            if let QmpError::Protocol(m) = &e {
                assert!(m.chars().count() < 300, "{} chars", m.chars().count());
            }
            let _ = e.to_string();
        }
    }
});
