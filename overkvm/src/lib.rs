//! overkvm: per-VM block I/O accounting and control for KVM hosts.
//!
//! The binary `overkvm-io` is a thin front-end over this library; integration tests drive the
//! same code.

pub mod bpf;
pub mod identity;
