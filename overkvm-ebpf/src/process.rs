//! Process lifecycle: an exec replaces a process's command line (and often its comm) but keeps
//! its PID and start time, which is all userspace can check a cached identity against. A
//! process can even do block I/O inside its own exec (page faults on the new binary and its
//! loader on a cold page cache), when its comm is already the new one and its command line is
//! still empty. So the end of every exec of a process that did I/O is told to userspace, which
//! then reads the process again: the name never depends on when /proc was read.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use overkvm_common::NOTICE_EXEC;

use crate::maps::{IO_TGIDS, notify};

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: runs
/// in the exec'ing task once the new image is in place (its argv on the new stack), before it
/// returns to user mode. An exec by a non-leader thread makes it the leader, so the tgid is
/// the process's either way.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn proc_exec(_ctx: BtfTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // Only processes that did I/O: a build host execs thousands of times a second.
    if unsafe { IO_TGIDS.get(&tgid) }.is_some() {
        notify(tgid, NOTICE_EXEC);
    }
    0
}
