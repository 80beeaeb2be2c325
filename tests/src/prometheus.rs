//! A real Prometheus server for the tests (Debian package `prometheus`): started on a free
//! loopback port with a config the test writes, queried through its HTTP API, stopped and its
//! data removed on drop.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::serving::http_raw;

/// Why a test needing `tool` cannot run here, or None when it is on the PATH.
pub fn missing(tool: &str) -> Option<String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
    (!found).then(|| format!("{tool} is not installed (Debian package prometheus)"))
}

/// A free TCP port on loopback (bound and released: good enough for a test on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running Prometheus, killed (SIGTERM, then SIGKILL) on drop.
pub struct Prometheus {
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Prometheus {
    /// Writes `config` (prometheus.yml text) into `dir`, starts Prometheus on a free port with
    /// its data in `dir`, and waits until it is ready.
    pub fn start(dir: &Path, config: &str) -> Prometheus {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let config_file = dir.join("prometheus.yml");
        fs::write(&config_file, config).expect("writing prometheus.yml");
        let log = dir.join("prometheus.log");
        let out = fs::File::create(&log).expect("prometheus log");
        let err = out.try_clone().expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting prometheus");
        let mut p = Prometheus { addr, child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited ({st}):\n{}", p.log());
            }
            let ready =
                http_raw(addr, b"GET /-/ready HTTP/1.0\r\n\r\n").is_ok_and(|(s, _)| s == 200);
            if ready {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready after 30 s:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A GET of the API: the parsed JSON body (panics unless 200).
    pub fn api(&self, target: &str) -> Value {
        let request = format!("GET {target} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let (status, raw) = http_raw(self.addr, request.as_bytes()).expect("querying Prometheus");
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert_eq!(status, 200, "{target}: {body}");
        serde_json::from_str(body).unwrap_or(Value::Null)
    }

    /// An instant query: (labels, value) per series.
    pub fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let v = self.api(&format!("/api/v1/query?query={}", urlencode(promql)));
        v["data"]["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| {
                        let value = r["value"][1].as_str()?.parse().ok()?;
                        Some((r["metric"].clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
