//! Lines from a QMP monitor (greeting, replies, errors, events), and the `query-blockstats`
//! reply the lifecycle code reads guest disk counters from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::qemu::qmp::{Message, QmpError, disk_ops, parse_message};
use overkvm::throttle::qemu_actuator::{blockstats_of, disks_from_query_block};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    match parse_message(&line) {
        Ok(Message::Return { value, .. }) => {
            for device in ["drive-virtio-disk0", "disk0", ""] {
                if let Some(ops) = disk_ops(&value, device) {
                    let _ = ops.total();
                }
            }
            // `query-block` and `query-blockstats` as the throttle's QEMU actuator reads them.
            for d in disks_from_query_block(&value) {
                let _ = d.throttle.qmp_arguments(&d.disk);
                let _ = blockstats_of(&value, &d.disk);
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
