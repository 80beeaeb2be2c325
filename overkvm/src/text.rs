//! Untrusted text (process names, VM names, cgroup paths, qemu arguments) on its way to a
//! terminal or a log. Every front-end prints such names through here.

/// Makes untrusted text (process and VM names) safe for a terminal: control characters,
/// escape sequences and invalid characters are shown as `\xNN` / `\u{..}`, never emitted raw.
/// A backslash is doubled, so the result names one input only (two VMs whose names differ
/// never show the same).
pub fn sanitize(s: &str) -> String {
    escape(s, true)
}

/// [`sanitize`] for a cgroup path: the same escapes for control characters, but a backslash
/// stays single, because systemd's own escapes (`machine-qemu\x2d1\x2dvm.scope`) are printable
/// already and an operator looks for the path as `/sys/fs/cgroup` spells it.
pub fn sanitize_path(s: &str) -> String {
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
    fn a_cgroup_path_keeps_systemds_escapes_and_loses_its_controls() {
        let p = r"/machine.slice/machine-qemu\x2d1\x2dvm.scope";
        assert_eq!(sanitize_path(p), p);
        assert_eq!(sanitize_path("/a\x1b[2J\nb"), r"/a\x1b[2J\x0ab");
    }
}
