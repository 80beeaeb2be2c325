//! `qmpvm SOCKET OPS_PER_S [--hang] [-name guest=NAME -uuid UUID]`: a qemu stand-in for the
//! scale bench (copied as `qemu-system-x86_64`, so the identity layer reads `-name` and `-uuid`
//! as for a real VM) whose one disk is on network storage. It serves a QMP monitor on SOCKET,
//! one client at a time as QEMU does: the greeting, `qmp_capabilities`, `query-blockstats`
//! (one disk, `drive-virtio-disk0`, whose file child is an NBD protocol node; its reads and
//! writes grow at OPS_PER_S each since the start) and `query-named-block-nodes` (that node:
//! `nbd://127.0.0.1:10809/NAME`). With `--hang` it accepts connections and never answers (a
//! QEMU whose main loop is stuck). No guest runs and no I/O is done: a cost stand-in only,
//! never a source of truth for counts (the tests check counts against real QEMUs).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    process::ExitCode,
    time::Instant,
};

use serde_json::{Value, json};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(socket), Some(rate)) = (args.get(1), args.get(2).and_then(|r| r.parse::<f64>().ok()))
    else {
        eprintln!("usage: qmpvm SOCKET OPS_PER_S [--hang] [-name guest=NAME ...]");
        return ExitCode::from(2);
    };
    let hang = args.iter().any(|a| a == "--hang");
    let name = args
        .iter()
        .position(|a| a == "-name")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim_start_matches("guest=").to_string())
        .unwrap_or_else(|| "vm".into());
    let _ = std::fs::remove_file(socket);
    let listener = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("qmpvm: bind {socket}: {e}");
            return ExitCode::from(1);
        }
    };
    let t0 = Instant::now();
    let mut held = Vec::new();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if hang {
            held.push(conn);
            continue;
        }
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        let mut r = BufReader::new(conn);
        if writeln!(
            w,
            r#"{{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}}}}, "capabilities": []}}}}"#
        )
        .is_err()
        {
            continue;
        }
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                break;
            };
            line.clear();
            let ops = (t0.elapsed().as_secs_f64() * rate) as u64;
            let reply = match v["execute"].as_str().unwrap_or("") {
                "query-blockstats" => json!([{
                    "device": "drive-virtio-disk0",
                    "node-name": "#block100",
                    "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
                    "stats": {"rd_operations": ops, "wr_operations": ops, "flush_operations": ops / 8,
                              "rd_bytes": ops * 4096, "wr_bytes": ops * 4096,
                              "rd_total_time_ns": ops * 200_000, "wr_total_time_ns": ops * 400_000,
                              "flush_total_time_ns": ops / 8 * 100_000},
                    "parent": {"node-name": "#block001", "stats": {}}
                }]),
                "query-named-block-nodes" => json!([
                    {"node-name": "#block100", "drv": "raw", "file": format!("nbd://127.0.0.1:10809/{name}")},
                    {"node-name": "#block001", "drv": "nbd", "file": format!("nbd://127.0.0.1:10809/{name}")}
                ]),
                _ => json!({}),
            };
            if writeln!(w, "{}", json!({"return": reply, "id": v["id"]})).is_err() {
                break;
            }
        }
    }
    ExitCode::SUCCESS
}
