//! Helpers shared by the fuzz targets.

/// Separates the parts of one fuzz input that feeds several files (ASCII record separator,
/// twice: it does not occur in the files these targets model).
pub const SEPARATOR: &[u8] = b"\x1e\x1e";

/// Splits `data` at every [`SEPARATOR`].
pub fn parts(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&rest[..i]);
        rest = &rest[i + SEPARATOR.len()..];
    }
    out.push(rest);
    out
}

/// Lossy UTF-8, as overkvm reads text files.
pub fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Names from untrusted input reach the terminal only through `text::sanitize`, which
/// promises no control characters (escape sequences, newlines) and no bidi or zero-width
/// characters in its output.
pub fn assert_sanitized(name: &str) {
    let s = overkvm::text::sanitize(name);
    assert!(
        !s.chars().any(|c| c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')),
        "sanitize({name:?}) = {s:?}"
    );
}
