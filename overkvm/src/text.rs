//! Untrusted text (process names, VM names, cgroup paths, qemu arguments) on its way to a
//! terminal or a log. Every front-end prints such names through here.

/// Makes untrusted text (process and VM names) safe for a terminal: control characters,
/// escape sequences and invalid characters are shown as `\xNN` / `\u{..}`, never emitted raw.
/// A backslash is doubled, so the result names one input only (two VMs whose names differ
/// never show the same).
pub fn sanitize(s: &str) -> String {
    escape(s, true)
}

/// [`sanitize`] with backslashes left as they are: control characters and disguising
/// characters shown as `\xNN` / `\u{..}`, everything else kept. For Prometheus label values,
/// where a name should read as its owner wrote it (`quoted\name`, systemd's
/// `machine-qemu\x2d1\x2dvm.scope`). Idempotent: its output has nothing left to escape. Two
/// inputs can give one output (a literal `\x1b` and an ESC), so a label that must be unique is
/// made unique after this (see `export::totals`).
pub fn escape_controls(s: &str) -> String {
    escape(s, false)
}

fn escape(s: &str, double_backslash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' if double_backslash => out.push_str("\\\\"),
            c if c.is_control() => {
                let v = c as u32;
                if v < 0x100 {
                    out.push_str(&format!("\\x{v:02x}"));
                } else {
                    out.push_str(&format!("\\u{{{v:x}}}"));
                }
            }
            // Bidi overrides and zero-width characters can disguise a name.
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                out.push_str(&format!("\\u{{{:x}}}", ch as u32));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_neutralises_escapes_and_controls() {
        assert_eq!(sanitize("qemu\x1b[2Jx"), "qemu\\x1b[2Jx");
        assert_eq!(sanitize("a\nb\rc\td"), "a\\x0ab\\x0dc\\x09d");
        assert_eq!(sanitize("\u{9b}31m"), "\\x9b31m");
        assert_eq!(sanitize("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert_eq!(sanitize("back\\slash"), "back\\\\slash");
        assert_eq!(sanitize("vm-ünïcode"), "vm-ünïcode");
        assert!(!sanitize("\x07\x08\x7f").chars().any(|c| c.is_control()));
    }

    #[test]
    fn escape_controls_keeps_backslashes_and_is_idempotent() {
        let p = r"/machine.slice/machine-qemu\x2d1\x2dvm.scope";
        assert_eq!(escape_controls(p), p);
        assert_eq!(escape_controls(r"quoted\name"), r"quoted\name");
        let shown = escape_controls("/a\x1b[2J\nb\u{202e}");
        assert_eq!(shown, r"/a\x1b[2J\x0ab\u{202e}");
        assert_eq!(escape_controls(&shown), shown);
    }
}
