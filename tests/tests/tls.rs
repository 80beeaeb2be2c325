//! The secured endpoint end to end: `overkvm-io serve --web.config.file` with TLS, client
//! certificates required and basic auth, scraped by a real Prometheus over `scheme: https`
//! while a qemu stand-in does a known number of direct I/Os. The numbers must arrive exactly;
//! a wrong password, a certificate from another CA and no certificate must leave their targets
//! down with the reason in Prometheus's `lastError`, and the failures must be counted and
//! rate-limited. A renewed certificate applies without a restart. Then `top --prometheus
//! https://...` reads a Prometheus that is itself behind TLS and basic auth (Prometheus's own
//! `--web.config.file`), with promtool's `--http.config.file` format.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use overkvm_tests::{
    devices::LoopDevice,
    prometheus::{self, Prometheus, free_port},
    serving::{TempDir, counted_vm, metrics_addr},
    skip_unless_kernel,
    standins::{Pace, StandIn},
    throttling::wait_until,
    workspace_bin,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value;

const PASSWORD: &str = "correct horse battery staple";

/// A CA that signs server and client certificates.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Ca { params, key, pem }
    }

    /// Writes `NAME.crt` and `NAME.key` for `sans` into `dir`.
    fn issue(&self, dir: &Path, name: &str, sans: &[&str]) {
        let params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
            .expect("signing");
        fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("writing a certificate");
        fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("writing a key");
    }
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(cmd: &mut Command, log: &Path) -> Daemon {
        let out = fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting a daemon");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log shows `line`; panics with the log if the process exits or 30 s pass.
    fn wait_for_log(&mut self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains(line) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("exited ({st}) before {line:?}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no {line:?} in:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
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

/// A scrape job of the secured exporter: `tls` and `auth` are YAML lines of `tls_config`
/// and `basic_auth` (indented by the caller's convention below).
fn job(name: &str, target: SocketAddr, tls: &[String], auth: Option<(&str, &str)>) -> String {
    let mut j = format!(
        "  - job_name: {name}\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    scheme: https\n\
         \x20   tls_config:\n"
    );
    for l in tls {
        j.push_str(&format!("      {l}\n"));
    }
    if let Some((u, p)) = auth {
        j.push_str(&format!(
            "    basic_auth:\n      username: {u}\n      password: '{p}'\n"
        ));
    }
    j.push_str(&format!(
        "    static_configs:\n      - targets: ['{target}']\n"
    ));
    j
}

fn scrape_config(jobs: &[String]) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{}",
        jobs.concat()
    )
}

/// `health` and `lastError` of every active target, by job.
fn targets(prom: &Prometheus) -> BTreeMap<String, (String, String)> {
    let v = prom.api("/api/v1/targets");
    v["data"]["activeTargets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        t["labels"]["job"].as_str().unwrap_or("").to_string(),
                        (
                            t["health"].as_str().unwrap_or("").to_string(),
                            t["lastError"].as_str().unwrap_or("").to_string(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn value(prom: &Prometheus, promql: &str) -> Option<f64> {
    prom.query(promql).first().map(|(_, v)| *v)
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth_and_strangers_are_refused() {
    skip_unless_kernel!();
    if let Some(reason) = prometheus::missing("prometheus") {
        overkvm_tests::skipped(module_path!(), &reason);
        return;
    }
    let dir = TempDir::new("tls");
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).expect("pki dir");
    let ca = Ca::new("overkvm test CA");
    fs::write(pki.join("ca.crt"), &ca.pem).expect("ca.crt");
    ca.issue(&pki, "server", &["localhost", "127.0.0.1"]);
    ca.issue(&pki, "prometheus", &["prometheus"]);
    let stranger = Ca::new("someone else's CA");
    stranger.issue(&pki, "stranger", &["prometheus"]);
    let hash = bcrypt::hash(PASSWORD, 10).expect("bcrypt");
    let web = pki.join("web.yml");
    fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
             basic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .expect("web.yml");

    let lo = LoopDevice::new(64).expect("loop device");
    let dev = lo.name();
    let mut serve = Daemon::spawn(
        Command::new(workspace_bin("overkvm-io"))
            .args(["serve", "--listen", "127.0.0.1:0", "-i", "0.5"])
            .arg("--web.config.file")
            .arg(&web)
            .env("RUST_LOG", "info"),
        &dir.join("serve.log"),
    );
    serve.wait_for_log("metrics on https://");
    let target = metrics_addr(&serve.log).expect("the daemon's address");

    let tag = format!("okvm-tls-{}", std::process::id());
    let counted = format!("{tag}-counted");
    let (reads, writes) = (400u64, 200u64);
    let mut counted_vm = counted_vm(&dir.0, &lo.path, &counted, reads, writes, 0, 16 << 20);

    let ca_file = pki.join("ca.crt");
    let client = |name: &str| {
        vec![
            format!("ca_file: {}", ca_file.display()),
            format!("cert_file: {}", pki.join(format!("{name}.crt")).display()),
            format!("key_file: {}", pki.join(format!("{name}.key")).display()),
        ]
    };
    let good = job(
        "good",
        target,
        &client("prometheus"),
        Some(("prometheus", PASSWORD)),
    );
    let prom_dir = dir.join("prom-good");
    fs::create_dir_all(&prom_dir).expect("dir");
    let prom = Prometheus::start(&prom_dir, &scrape_config(std::slice::from_ref(&good)));

    // Every I/O the stand-in issued, read back through Prometheus over TLS.
    let series = |op: &str| {
        format!(
            "overkvm_vm_io_operations_total{{job=\"good\",vm=\"{counted}\",device=\"{dev}\",op=\"{op}\"}}"
        )
    };
    let exact = wait_until(Duration::from_secs(60), || {
        value(&prom, &series("read")) == Some(reads as f64)
            && value(&prom, &series("write")) == Some(writes as f64)
    });
    assert!(
        exact,
        "Prometheus has {:?} reads and {:?} writes of {counted} (want {reads}, {writes}); \
         targets {:?}\n{}",
        value(&prom, &series("read")),
        value(&prom, &series("write")),
        targets(&prom),
        serve.log()
    );
    assert_eq!(targets(&prom)["good"].0, "up");
    let _ = counted_vm.kill();
    let _ = counted_vm.wait();

    // Strangers: a wrong password with a good certificate, the right password with another
    // CA's certificate or with none. All from 127.0.0.1, as is the good job: once their
    // failures use up the address's allowance, the good job is refused too, until they stop.
    let bad = [
        job(
            "wrong_password",
            target,
            &client("prometheus"),
            Some(("prometheus", "wrong")),
        ),
        job(
            "unknown_certificate",
            target,
            &client("stranger"),
            Some(("prometheus", PASSWORD)),
        ),
        job(
            "no_certificate",
            target,
            &[format!("ca_file: {}", ca_file.display())],
            Some(("prometheus", PASSWORD)),
        ),
    ];
    let bad_dir = dir.join("prom-bad");
    fs::create_dir_all(&bad_dir).expect("dir");
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    {
        let strangers = Prometheus::start(&bad_dir, &scrape_config(&bad));
        // Until their failures used up the address's allowance (Prometheus applies a new
        // scrape config within 5 s of starting, so how soon that is varies), and each job's
        // own error was seen at least once.
        const LIMITED: &str = "too many failures from 127.0.0.1";
        let deadline = Instant::now() + Duration::from_secs(40);
        while !(serve.log().contains(LIMITED) && seen.len() == bad.len()) {
            assert!(
                Instant::now() < deadline,
                "the strangers were not limited: {seen:#?}\n{}",
                serve.log()
            );
            for (job, (health, error)) in targets(&strangers) {
                assert_ne!(health, "up", "{job} was let in");
                if !error.is_empty() {
                    seen.entry(job).or_default().insert(error);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!("errors Prometheus saw: {seen:#?}");
    let saw = |job: &str, what: &str| {
        seen.get(job)
            .is_some_and(|e| e.iter().any(|e| e.contains(what)))
    };
    assert!(saw("wrong_password", "401"), "{seen:?}");
    for job in ["unknown_certificate", "no_certificate"] {
        assert!(
            seen.get(job).is_some_and(|e| !e.is_empty()),
            "{job}: no error recorded: {seen:?}"
        );
    }
    assert!(saw("unknown_certificate", "certificate"), "{seen:?}");

    // The strangers are gone: the good job gets back in (one attempt per 6 s comes back), and
    // the refusals it scrapes were counted by reason.
    let failures = |reason: &str| {
        value(
            &prom,
            &format!("overkvm_exporter_auth_failures_total{{job=\"good\",reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let back = wait_until(Duration::from_secs(30), || {
        targets(&prom)["good"].0 == "up" && failures("rate_limited") > 0.0
    });
    assert!(back, "good job: {:?}\n{}", targets(&prom), serve.log());
    eprintln!(
        "refusals: bad_credentials {} tls_handshake {} rate_limited {} no_credentials {}",
        failures("bad_credentials"),
        failures("tls_handshake"),
        failures("rate_limited"),
        failures("no_credentials")
    );
    assert!(failures("bad_credentials") >= 1.0);
    // The unknown certificate and the missing one.
    assert!(failures("tls_handshake") >= 2.0);
    let log = serve.log();
    assert!(log.contains("wrong user name or password (user \"prometheus\") from 127.0.0.1"));
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(log.contains("too many failures from 127.0.0.1"), "{log}");

    // A renewed certificate, put in place as certbot does (new files renamed over the old):
    // read again without a restart, and scrapes go on.
    ca.issue(&pki, "renewed", &["localhost", "127.0.0.1"]);
    fs::rename(pki.join("renewed.key"), pki.join("server.key")).expect("rename");
    fs::rename(pki.join("renewed.crt"), pki.join("server.crt")).expect("rename");
    let reloaded = wait_until(Duration::from_secs(20), || {
        value(
            &prom,
            "overkvm_exporter_web_config_reloads_total{job=\"good\",result=\"success\"}",
        ) == Some(1.0)
            && targets(&prom)["good"].0 == "up"
    });
    assert!(reloaded, "{:?}\n{}", targets(&prom), serve.log());
    assert!(serve.log().contains("re-read"));

    // top --prometheus https://: a Prometheus behind TLS and basic auth of its own, scraping
    // the daemon while a paced stand-in reads.
    let mut paced = StandIn::vm(
        &dir.0,
        &lo.path,
        &format!("{tag}-paced"),
        Pace {
            rate: Some(50.0),
            start: 32 << 20,
            len: 16 << 20,
            seed: 11,
        },
    );
    let secured_dir = dir.join("prom-secured");
    fs::create_dir_all(&secured_dir).expect("dir");
    let prom_web = secured_dir.join("web.yml");
    fs::write(
        &prom_web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  operator: '{hash}'\n",
            pki.join("server.crt").display(),
            pki.join("server.key").display()
        ),
    )
    .expect("web.yml");
    let prom_config = secured_dir.join("prometheus.yml");
    fs::write(&prom_config, scrape_config(&[good])).expect("prometheus.yml");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut secured = Daemon::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                secured_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg(format!("--web.config.file={}", prom_web.display())),
        &secured_dir.join("prometheus.log"),
    );
    secured.wait_for_log("Server is ready to receive web requests");
    let url = format!("https://{addr}");
    let client_config = |name: &str, text: String| {
        let p = secured_dir.join(name);
        fs::write(&p, text).expect("client config");
        p
    };
    fs::write(secured_dir.join("password"), format!("{PASSWORD}\n")).expect("password file");
    let good_client = client_config(
        "client.yml",
        format!(
            "basic_auth:\n  username: operator\n  password_file: password\n\
             tls_config:\n  ca_file: {}\n",
            ca_file.display()
        ),
    );
    let top = |config: &Path| {
        let out = Command::new(workspace_bin("overkvm-io"))
            .args(["top", "--prometheus", &url, "-b", "-n", "1", "--json"])
            .args(["--window", "5s"])
            .arg("--http.config.file")
            .arg(config)
            .output()
            .expect("running overkvm-io top --prometheus");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let paced_name = format!("{tag}-paced");
    let mut last = (false, String::new(), String::new());
    let shown = wait_until(Duration::from_secs(45), || {
        last = top(&good_client);
        let report: Value = serde_json::from_str(last.1.trim()).unwrap_or(Value::Null);
        report["vms"].as_array().is_some_and(|rows| {
            rows.iter().any(|r| {
                r["vm"] == paced_name.as_str()
                    && r["instance"] == target.to_string()
                    && r["iops"].as_f64().is_some_and(|v| v > 10.0)
            })
        })
    });
    assert!(
        shown,
        "top --prometheus {url} never showed {paced_name}: {last:?}\n{}",
        secured.log()
    );
    assert!(paced.running());
    eprintln!("top --prometheus {url}: {}", last.1.trim());

    // A wrong password, and a CA that did not sign Prometheus's certificate: clear failures.
    let wrong = client_config(
        "wrong.yml",
        format!(
            "basic_auth:\n  username: operator\n  password: wrong\ntls_config:\n  ca_file: {}\n",
            ca_file.display()
        ),
    );
    let (ok, _, err) = top(&wrong);
    assert!(!ok && err.contains("401"), "{err}");
    fs::write(secured_dir.join("stranger-ca.crt"), &stranger.pem).expect("ca");
    let untrusted = client_config(
        "untrusted.yml",
        "basic_auth:\n  username: operator\n  password_file: password\n\
         tls_config:\n  ca_file: stranger-ca.crt\n"
            .to_string(),
    );
    let (ok, _, err) = top(&untrusted);
    assert!(!ok && err.contains("certificate"), "{err}");
    eprintln!("untrusted CA: {}", err.trim());
}
