//! Loading and attaching the kernel programs.

pub mod btf;
pub mod layout;
pub mod tracefs;
