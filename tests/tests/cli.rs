//! The real `overkvm-io` binary: `check`, hostile process names in `top -b` output, and the
//! message a non-root user gets.

use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use overkvm_tests::{devices::LoopDevice, skip_unless_kernel, workspace_bin};
use serde_json::Value;

#[test]
fn check_reports_a_usable_host_as_json() {
    skip_unless_kernel!();
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["check", "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("check --json prints JSON");
    assert!(out.status.success(), "check failed: {v}");
    assert!(v["hook_mode"].is_string(), "{v}");
    assert!(
        v["load"]["attached"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    assert_eq!(v["load"]["ok"], true, "{v}");
    assert_eq!(v["load"]["tried"], true, "{v}");
    assert!(v["load"]["error"].is_null(), "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0));
}

#[test]
fn not_root_gets_a_clear_message_and_a_failure() {
    skip_unless_kernel!();
    let out = Command::new(workspace_bin("overkvm-io"))
        .args(["top", "-b", "-n", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root") && err.contains("sudo"),
        "stderr: {err}"
    );
}

/// A process named with an escape sequence and a newline must show up escaped in the text
/// table and as JSON-escaped data, never as raw control characters.
#[test]
fn hostile_process_names_are_escaped() {
    skip_unless_kernel!();
    let lo = LoopDevice::new(32).unwrap();
    let dir = std::env::temp_dir().join(format!("overkvm-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let evil_name = "ev\x1b[2Jil\nq\"x";
    let evil = dir.join(evil_name);
    let _ = std::fs::remove_file(&evil);
    std::fs::copy(workspace_bin("iogen"), &evil).unwrap();

    for json in [false, true] {
        let mut args = vec!["top", "-b", "-d", "1", "-n", "2"];
        if json {
            args.push("--json");
        }
        let top = Command::new(workspace_bin("overkvm-io"))
            .args(&args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(600));
        // The test I/O generator, run under the hostile name (its comm).
        let st = Command::new(&evil)
            .arg(&lo.path)
            .args(["50", "0", "4096", "0", &(8u64 << 20).to_string(), "7"])
            .status()
            .unwrap();
        assert!(st.success());
        let out = top.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains('\x1b'),
            "raw escape reached the output:\n{text}"
        );
        if json {
            let mut found = false;
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).expect("JSON line");
                for p in v["processes"].as_array().unwrap() {
                    if p["comm"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("ev\x1b[2Jil"))
                    {
                        found = true;
                    }
                }
            }
            assert!(found, "the hostile process is reported (as data):\n{text}");
        } else {
            assert!(
                text.contains("ev\\x1b[2Jil\\x0aq\"x"),
                "escaped name shown:\n{text}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Invalid configuration is refused at start, naming the line; an unknown device likewise.
/// Nothing is loaded or written.
#[test]
fn serve_refuses_bad_config_and_unknown_devices() {
    skip_unless_kernel!();
    let dir = std::env::temp_dir().join(format!("overkvm-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "[[device]]\ndevice = \"loop0\"\niops = \"lots\"\n",
            "line 3",
        ),
        (
            "[[device]]\ndevice = \"nosuchdisk\"\niops = 100\n",
            "no block device named",
        ),
        ("[policy]\nfloor_iops = 0\n", "floor_iops"),
    ];
    for (text, expect) in cases {
        let cfg = dir.join("bad.toml");
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(workspace_bin("overkvm-io"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {text:?}");
        assert!(
            err.contains(expect),
            "for {text:?} expected {expect:?} in: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
