//! QEMU's own disk throttling (`block_set_io_throttle`, what Nova and Proxmox use) read back
//! the way `vm list` reads it for overkvm's own VMs: over the VM's QMP socket (`query-block`).
//! A real qemu under TCG with a raw virtio disk; the limits are set over QMP as a manager would.

use std::time::Duration;

use overkvm::qemu::limits::{DiskLimits, of_own_vm};
use overkvm_tests::guest::{self, Guest, GuestSpec, TempDir};
use serde_json::json;

#[test]
fn qemu_throttle_limits_are_read_over_qmp() {
    // No eBPF and no root needed: only qemu.
    if let Some(reason) = guest::missing_tools() {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let work = TempDir::new("qemu-limits").expect("work dir");
    let disk = work.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("disk image");
    let spec = GuestSpec {
        name: "qemu-limits".into(),
        disk: Some(disk),
        script: "sleep 60".into(),
        ..GuestSpec::default()
    };
    let g = Guest::boot(&spec, work.path()).expect("booting qemu");
    let sock = work.path().join("qmp.sock");

    // Nothing set: no disk is listed.
    let none = (0..50)
        .find_map(|_| {
            let r = of_own_vm(&sock);
            if r.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            r
        })
        .expect("QMP answers");
    assert_eq!(none, [], "no QEMU limit yet");

    g.qmp(
        "block_set_io_throttle",
        Some(
            json!({"device": "virtio0", "iops": 0, "iops_rd": 700, "iops_wr": 300,
                    "bps": 0, "bps_rd": 0, "bps_wr": 8_000_000}),
        ),
    )
    .expect("block_set_io_throttle");
    let set = of_own_vm(&sock).expect("QMP answers");
    eprintln!("{set:?}");
    assert_eq!(
        set,
        [DiskLimits {
            disk: "virtio0".into(),
            iops_rd: Some(700),
            iops_wr: Some(300),
            bps_wr: Some(8_000_000),
            ..DiskLimits::default()
        }]
    );
    assert_eq!(
        set[0].text(),
        "virtio0 iops_rd=700 iops_wr=300 bps_wr=8000000"
    );
    drop(g);
}
