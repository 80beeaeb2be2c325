//! QEMU as overkvm talks to it: the QMP client (`qmp`, for the monitors overkvm owns), a VM's
//! disks and the limits QEMU itself enforces on them (`limits`: `query-block`, the one limits
//! type and the QMP and virsh arguments that set it, read and written through whoever owns the
//! monitor) and libvirt's client side (`libvirt`: virsh, status XML, `domstats`). Used by VM
//! lifecycle, the throttle's QEMU actuator, the status file, the exporter and `top`.
//! `backing` parses `query-blockstats`, decides which disks no host block device sees and names
//! their storage; `counters` reads QEMU's counters of those disks off the sampling thread, over
//! QMP or, for libvirt's domains, through libvirt.

pub mod backing;
pub mod counters;
pub mod libvirt;
pub mod limits;
pub mod qmp;
