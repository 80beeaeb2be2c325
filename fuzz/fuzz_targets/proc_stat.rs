//! `/proc/PID/stat` and `/proc/PID/comm`: written by the kernel, but comm is chosen by whoever
//! runs the process (spaces, parentheses, newlines, escapes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::host::proc::{parse_comm, parse_stat};
use overkvm_fuzz::assert_sanitized;

fuzz_target!(|data: &[u8]| {
    assert_sanitized(&parse_comm(data));
    let Ok(s) = parse_stat(data) else {
        return;
    };
    assert_sanitized(&s.comm);
    // comm runs from the first '(' to the last ')': a line rendered from the parsed fields
    // parses back to the same fields, whatever comm holds.
    let line = format!(
        "{} ({}) {} {} 0 0 0 0 {} 0 0 0 0 0 0 0 0 0 0 0 0 {} 0\n",
        s.pid, s.comm, s.state, s.ppid, s.flags, s.start_time
    );
    assert_eq!(parse_stat(line.as_bytes()), Ok(s));
});
