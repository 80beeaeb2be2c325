//! A VM's definition file (`vm.toml` in its state directory), plus the sizes and names the
//! `vm create` command line gives: refused with a reason, or valid and stable when rewritten.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overkvm::lifecycle::definition::{NAME_MAX, VmDefinition, parse_size, validate_name};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(bytes) = parse_size(&text) {
        assert!(
            (512..=1 << 60).contains(&bytes) && bytes % 512 == 0,
            "{bytes}"
        );
    }
    if validate_name(&text).is_ok() {
        assert!(!text.is_empty() && text.len() <= NAME_MAX && !text.starts_with('-'));
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
    let Ok(def) = VmDefinition::parse(&text) else {
        return;
    };
    def.validate()
        .expect("parse returned an invalid definition");
    // What `vm create` writes, `vm start` reads back unchanged.
    let written = def.to_toml().expect("a parsed definition encodes");
    assert_eq!(
        VmDefinition::parse(&written).expect("rewritten definition"),
        def
    );
});
