//! BTF blobs (`/sys/kernel/btf/vmlinux`, or a file given on the command line): lengths and
//! offsets come from the blob and must be checked, never trusted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::bpf::btf::Btf;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let _ = btf.type_count();
    let _ = btf.has_type("request");
    let _ = btf.field_offset("request", "cmd_flags");
    let _ = btf.field_offset("request", "q.queue_flags");
    let _ = btf.enum_value("REQ_OP_WRITE");
});
