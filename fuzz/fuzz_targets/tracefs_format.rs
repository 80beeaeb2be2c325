//! tracefs `events/<system>/<event>/format` files, parsed as untrusted text: an error, never a
//! panic, and errors quote at most 80 characters of the offending line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::bpf::tracefs::{FormatError, parse_format};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_format(&text) {
        Ok(f) => {
            assert!(!f.name.is_empty());
            for field in &f.fields {
                let first = field.name.chars().next().expect("empty field name");
                assert!(!first.is_ascii_digit());
                assert!(
                    field
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                );
                assert!(!field.c_type.is_empty());
            }
            if let Some(first) = f.fields.first() {
                assert_eq!(f.field(&first.name), Some(first));
            }
        }
        Err(e) => {
            if let FormatError::BadId { text, .. } | FormatError::BadField { text, .. } = &e {
                assert!(text.chars().count() <= 81, "quote too long: {}", text.len());
            }
            let _ = e.to_string();
        }
    }
});
