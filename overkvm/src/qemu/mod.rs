//! QEMU as overkvm talks to it: the QMP client (`qmp`, for the monitors overkvm owns) and the
//! disk limits QEMU itself enforces (`limits`, read through whoever owns the monitor). Used by
//! VM lifecycle, the throttle's QEMU actuator, the status file, the exporter and `top`.
//! `backing` decides which disks no host block device sees and names their storage;
//! `counters` reads QEMU's counters of those disks off the sampling thread, over QMP or, for
//! libvirt's domains, through libvirt (`libvirt`).

pub mod backing;
pub mod counters;
pub mod libvirt;
pub mod limits;
pub mod qmp;
