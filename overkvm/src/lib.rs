//! overkvm: per-VM block I/O accounting and control for KVM hosts.
//!
//! The binary `overkvm-io` is a thin front-end over this library; integration tests drive the
//! same code. Data flows one way: `bpf` loads the kernel programs, `sample` turns their maps into
//! snapshots and deltas, `report` joins deltas with `identity`, `devices` and `host`,
//! `pipeline` makes one `Tick` of it per interval, and its consumers (`top`, the exporter in
//! `export`, the `throttle`) all read that one tick.

pub mod bpf;
pub mod calibrate;
pub mod check;
pub mod choice;
pub mod config;
pub mod devices;
pub mod export;
pub mod host;
pub mod identity;
#[cfg(test)]
mod layers;
pub mod lifecycle;
pub mod parity;
pub mod pipeline;
pub mod qemu;
pub mod report;
#[cfg(test)]
mod robustness;
pub mod sample;
pub mod serve;
pub mod stats;
pub mod status_file;
pub mod storage_target;
#[cfg(test)]
mod testdata;
pub mod text;
pub mod throttle;
pub mod tick;
pub mod top;
