//! QEMU as overkvm talks to it: the QMP client (`qmp`, for the monitors overkvm owns) and the
//! disk limits QEMU itself enforces (`limits`, read through whoever owns the monitor). Used by
//! VM lifecycle, the throttle's QEMU actuator, the status file, the exporter and `top`.

pub mod limits;
pub mod qmp;
