//! Driving the `iogen` helper binary: processes that do an exact number of direct I/Os.

use std::{
    path::Path,
    process::{Child, Command},
};

/// What one generator process does.
#[derive(Clone, Debug)]
pub struct IoPlan {
    pub reads: u64,
    pub writes: u64,
    /// Block size in bytes (multiple of 4096 for O_DIRECT).
    pub block: u64,
    /// Region of the device (in bytes) this process may touch: [start, start + len).
    pub start: u64,
    pub len: u64,
    pub seed: u64,
}

/// Starts `iogen` on `target` with the plan. It uses O_DIRECT, one I/O at a time, on every other
/// block of its region only, so no two I/Os of any processes are ever adjacent and the block
/// layer cannot merge them: the request count equals the call count.
pub fn spawn(target: &Path, plan: &IoPlan) -> std::io::Result<Child> {
    Command::new(crate::workspace_bin("iogen"))
        .arg(target)
        .args([
            plan.reads.to_string(),
            plan.writes.to_string(),
            plan.block.to_string(),
            plan.start.to_string(),
            plan.len.to_string(),
            plan.seed.to_string(),
        ])
        .spawn()
}
