//! Untrusted text (process names, VM names, cgroup paths, qemu arguments) on its way to a
//! terminal or a log. Every front-end prints such names through here.

/// Makes untrusted text (process and VM names) safe for a terminal: control characters,
/// escape sequences and invalid characters are shown as `\xNN` / `\u{..}`, never emitted raw.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
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
}
