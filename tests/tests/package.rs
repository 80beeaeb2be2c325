//! The packages `cargo xtask package` builds: what the .deb and the RPM hold (dpkg-deb, rpm),
//! their conffiles and maintainer scripts, the shipped unit checked by `systemd-analyze verify`
//! against the shipped binary, and a real `dpkg -i` / upgrade / `dpkg --purge` on this host
//! (no systemd as PID 1 here, so nothing is started by the package; the test refuses to run
//! where an overkvm is installed already, and purges what it installed whatever happens).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use overkvm_tests::{
    packages::{Packages, build_packages},
    serving::TempDir,
    skip_unless_kernel,
    throttling::{Daemon, V1Scenario, any_limit, greedy_vm, wait_until},
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The packages of revision 1 and 2, each built once per run of this file (its tests run one
/// after another in one process).
fn packages(revision: u32) -> &'static Packages {
    static BUILT: [OnceLock<Packages>; 2] = [OnceLock::new(), OnceLock::new()];
    let slot = match revision {
        1 => &BUILT[0],
        2 => &BUILT[1],
        _ => panic!("revision {revision}: only 1 and 2 are built"),
    };
    slot.get_or_init(|| build_packages("package", revision))
}

fn output(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The binary's command paths (`[]`, `["serve"]`, `["vm", "create"]`, ...) from its own
/// `--help`, which is what the man pages are made from: one page per command.
fn commands(bin: &Path, path: &[String]) -> Vec<Vec<String>> {
    let help = output(Command::new(bin).args(path).arg("--help"));
    let mut out = vec![path.to_vec()];
    let subs: Vec<String> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    for s in subs {
        let mut p = path.to_vec();
        p.push(s);
        out.extend(commands(bin, &p));
    }
    out
}

fn man_pages(bin: &Path) -> Vec<String> {
    commands(bin, &[])
        .into_iter()
        .map(|p| {
            let mut name = String::from("overkvm-io");
            for part in p {
                name.push('-');
                name.push_str(&part);
            }
            format!("usr/share/man/man1/{name}.1.gz")
        })
        .collect()
}

/// The files (not directories) both packages ship, whatever the format; `zsh` is where each
/// format's zsh looks for vendor completions.
fn common_files(bin: &Path, zsh: &str) -> BTreeSet<String> {
    let mut files: BTreeSet<String> = [
        "usr/bin/overkvm-io",
        "usr/lib/systemd/system/overkvm.service",
        "etc/overkvm/overkvm.toml",
        "etc/default/overkvm",
        "usr/share/overkvm/prometheus/overkvm.yml",
        "usr/share/overkvm/prometheus/overkvm-rules.yml",
        "usr/share/overkvm/prometheus/overkvm-alerts.yml",
        "usr/share/overkvm/grafana/overkvm.json",
        "usr/share/bash-completion/completions/overkvm-io",
        "usr/share/fish/vendor_completions.d/overkvm-io.fish",
        "usr/share/doc/overkvm/README.md",
        "usr/share/doc/overkvm/examples/overkvm.toml",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    files.insert(format!("{zsh}/_overkvm-io"));
    files.extend(man_pages(bin));
    files
}

/// Files shipped unchanged from the source tree: (path in the package, path in the tree).
const FROM_TREE: &[(&str, &str)] = &[
    (
        "usr/lib/systemd/system/overkvm.service",
        "packaging/overkvm.service",
    ),
    ("etc/overkvm/overkvm.toml", "packaging/overkvm.toml"),
    ("etc/default/overkvm", "packaging/default/overkvm"),
    (
        "usr/share/overkvm/prometheus/overkvm.yml",
        "packaging/prometheus/overkvm.yml",
    ),
    (
        "usr/share/overkvm/prometheus/overkvm-rules.yml",
        "packaging/prometheus/overkvm-rules.yml",
    ),
    (
        "usr/share/overkvm/prometheus/overkvm-alerts.yml",
        "packaging/prometheus/overkvm-alerts.yml",
    ),
    (
        "usr/share/overkvm/grafana/overkvm.json",
        "packaging/grafana/overkvm.json",
    ),
    (
        "usr/share/doc/overkvm/examples/overkvm.toml",
        "examples/overkvm.toml",
    ),
];

/// A .deb unpacked (dpkg-deb -x and -e) into a temporary directory.
struct Unpacked {
    dir: TempDir,
}

impl Unpacked {
    fn new(deb: &Path) -> Unpacked {
        let dir = TempDir::new("deb");
        output(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(dir.join("root")),
        );
        output(
            Command::new("dpkg-deb")
                .arg("-e")
                .arg(deb)
                .arg(dir.join("control")),
        );
        Unpacked { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn control(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join("control").join(name))
            .unwrap_or_else(|e| panic!("control member {name}: {e}"))
    }
}

#[test]
fn deb_holds_the_listed_files_conffiles_and_maintainer_scripts() {
    if !have("dpkg-deb") {
        overkvm_tests::skipped(module_path!(), "no dpkg-deb");
        return;
    }
    let pkgs = packages(1);
    let deb = Unpacked::new(&pkgs.deb);
    let bin = deb.root().join("usr/bin/overkvm-io");

    // `dpkg-deb -c`: every file, and nothing else (directories aside).
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(&pkgs.deb));
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        let path = line
            .split_whitespace()
            .nth(5)
            .unwrap_or_else(|| panic!("dpkg-deb -c line {line:?}"));
        let path = path.trim_start_matches("./").to_string();
        match line.chars().next() {
            Some('d') => {}
            Some('-') => {
                files.insert(path);
            }
            _ => panic!("unexpected entry (not a file or directory): {line}"),
        }
        if path_is(line, "usr/bin/overkvm-io") {
            assert!(
                line.starts_with("-rwxr-xr-x root/root") || line.starts_with("-rwxr-xr-x 0/0"),
                "{line}"
            );
        }
    }
    let mut want = common_files(&bin, "usr/share/zsh/vendor-completions");
    want.insert("usr/share/doc/overkvm/copyright".into());
    assert_eq!(files, want, "dpkg-deb -c:\n{listing}");
    for (in_pkg, in_tree) in FROM_TREE {
        assert_eq!(
            fs::read(deb.root().join(in_pkg)).unwrap(),
            fs::read(workspace().join(in_tree)).unwrap(),
            "{in_pkg} differs from {in_tree}"
        );
    }

    // `dpkg-deb -I`: control, conffiles, the maintainer scripts with debhelper's systemd
    // fragments in place of #DEBHELPER#.
    let info = output(Command::new("dpkg-deb").arg("-I").arg(&pkgs.deb));
    for member in ["control", "conffiles", "postinst", "prerm", "postrm"] {
        assert!(
            info.contains(&format!(" {member} ")) || info.contains(&format!(" {member}\n")),
            "{member} missing:\n{info}"
        );
    }
    let control = deb.control("control");
    assert!(control.contains("Package: overkvm\n"), "{control}");
    assert!(control.contains("Version: 0.1.0-1\n"), "{control}");
    assert!(control.contains("Depends: libc6"), "{control}");
    assert_eq!(
        deb.control("conffiles"),
        "/etc/overkvm/overkvm.toml\n/etc/default/overkvm\n"
    );
    let postinst = deb.control("postinst");
    let prerm = deb.control("prerm");
    let postrm = deb.control("postrm");
    for (script, text) in [
        ("postinst", &postinst),
        ("prerm", &prerm),
        ("postrm", &postrm),
    ] {
        assert!(
            !text.contains("#DEBHELPER#"),
            "{script} kept #DEBHELPER#:\n{text}"
        );
        let n = output(
            Command::new("sh")
                .arg("-n")
                .arg(deb.dir.join("control").join(script)),
        );
        assert!(n.is_empty(), "sh -n {script}: {n}");
    }
    // Enabled and started on install (restarted on upgrade), as dh_installsystemd does.
    assert!(
        postinst.contains("deb-systemd-helper enable overkvm.service"),
        "{postinst}"
    );
    assert!(postinst.contains("_dh_action=start"), "{postinst}");
    assert!(
        postinst.contains("deb-systemd-invoke $_dh_action overkvm.service"),
        "{postinst}"
    );
    // Stopped on removal, then whatever a daemon left undone, before the binary goes.
    let stop = prerm
        .find("deb-systemd-invoke stop overkvm.service")
        .expect(&prerm);
    let reset = prerm
        .find("/usr/bin/overkvm-io throttle reset")
        .expect(&prerm);
    assert!(stop < reset, "prerm resets before stopping:\n{prerm}");
    // Purge forgets the unit and removes the state.
    assert!(
        postrm.contains("deb-systemd-helper purge overkvm.service"),
        "{postrm}"
    );
    assert!(postrm.contains("rm -rf /var/lib/overkvm"), "{postrm}");
    assert!(postrm.contains("rm -rf /run/overkvm"), "{postrm}");

    // The unit runs the packaged binary with the packaged config.
    let unit =
        fs::read_to_string(deb.root().join("usr/lib/systemd/system/overkvm.service")).unwrap();
    assert!(!unit.contains("/usr/local"), "{unit}");
    for line in [
        "ExecStart=/usr/bin/overkvm-io serve --config ${OVERKVM_CONFIG} $OVERKVM_ARGS",
        "ExecStopPost=-/usr/bin/overkvm-io throttle reset --config ${OVERKVM_CONFIG}",
        "Environment=OVERKVM_CONFIG=/etc/overkvm/overkvm.toml",
        "EnvironmentFile=-/etc/default/overkvm",
        "StateDirectory=overkvm",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line:?}");
    }
    // The packaged binary reads its packaged config (metrics only: no budget).
    let status = output(
        Command::new(&bin)
            .args(["throttle", "status", "--json", "--config"])
            .arg(deb.root().join("etc/overkvm/overkvm.toml")),
    );
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["budgets"], serde_json::json!([]), "{status}");
}

fn path_is(line: &str, path: &str) -> bool {
    line.split_whitespace()
        .nth(5)
        .is_some_and(|p| p.trim_start_matches("./") == path)
}

#[test]
fn packaged_unit_passes_systemd_analyze_verify_and_man_pages_render() {
    for tool in ["dpkg-deb", "systemd-analyze", "man"] {
        if !have(tool) {
            overkvm_tests::skipped(module_path!(), format!("no {tool}"));
            return;
        }
    }
    let pkgs = packages(1);
    let deb = Unpacked::new(&pkgs.deb);
    let root = deb.root();
    // The unit's dependencies (sysinit.target, ...) come from this host's systemd, next to
    // the package's files: verify then checks the unit against the packaged binary.
    let units = root.join("usr/lib/systemd/system");
    for e in fs::read_dir("/usr/lib/systemd/system").unwrap().flatten() {
        let to = units.join(e.file_name());
        if !to.exists() && e.file_type().is_ok_and(|t| t.is_file()) {
            fs::copy(e.path(), to).unwrap();
        }
    }
    fs::create_dir_all(root.join("tmp")).unwrap();
    let verify = |root: &Path| {
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--root"])
            .arg(root)
            .arg(root.join("usr/lib/systemd/system/overkvm.service"))
            .output()
            .unwrap()
    };
    let out = verify(&root);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    // The check has teeth: without the binary the same unit fails.
    let bin = root.join("usr/bin/overkvm-io");
    let aside = deb.dir.join("overkvm-io");
    fs::rename(&bin, &aside).unwrap();
    let out = verify(&root);
    assert!(
        !out.status.success(),
        "verify passed with no /usr/bin/overkvm-io"
    );
    fs::rename(&aside, &bin).unwrap();

    // Documentation=man:overkvm-io-serve(1) is in the package, and every page renders without
    // a warning.
    let pages = man_pages(&bin);
    assert!(pages.iter().any(|p| p.ends_with("/overkvm-io-serve.1.gz")));
    for page in pages {
        let out = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(root.join(&page))
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && warnings.trim().is_empty(),
            "{page}: {warnings}"
        );
        assert!(text.contains("overkvm-io"), "{page} renders as:\n{text}");
    }
}

#[test]
fn rpm_holds_the_listed_files_config_noreplace_and_scriptlets_and_installs_into_a_root() {
    if !have("rpm") || !have("dpkg-deb") {
        overkvm_tests::skipped(module_path!(), "no rpm (or no dpkg-deb)");
        return;
    }
    let pkgs = packages(1);
    // The binary's --help names the commands, hence the man pages: take it from the .deb of
    // the same build (rpm2cpio may be absent).
    let deb = Unpacked::new(&pkgs.deb);
    let bin = deb.root().join("usr/bin/overkvm-io");
    let q = |args: &[&str]| output(Command::new("rpm").arg("-qp").args(args).arg(&pkgs.rpm));

    let files: BTreeSet<String> = q(&["-l"])
        .lines()
        .map(|l| l.trim_start_matches('/').to_string())
        .collect();
    assert_eq!(files, common_files(&bin, "usr/share/zsh/site-functions"));
    // %config(noreplace): an edited file is kept on upgrade (the new one lands as .rpmnew).
    let flags = q(&["--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"]);
    for conf in ["/etc/overkvm/overkvm.toml", "/etc/default/overkvm"] {
        let line = flags
            .lines()
            .find(|l| l.split_whitespace().next() == Some(conf))
            .unwrap_or_else(|| panic!("{conf} not in:\n{flags}"));
        let f = line.split_whitespace().nth(1).unwrap_or("");
        assert!(
            f.contains('c') && f.contains('n'),
            "{conf}: flags {f:?}, not config(noreplace)"
        );
    }
    let modes = q(&["--qf", "[%{FILENAMES} %{FILEMODES:perms}\n]"]);
    assert!(
        modes.lines().any(|l| l == "/usr/bin/overkvm-io -rwxr-xr-x"),
        "{modes}"
    );
    let scripts = q(&["--scripts"]);
    for want in [
        "systemctl --no-reload preset overkvm.service",
        "systemctl --no-reload disable --now overkvm.service",
        "/usr/bin/overkvm-io throttle reset",
        "systemctl try-restart overkvm.service",
        "rm -rf /var/lib/overkvm",
    ] {
        assert!(
            scripts.contains(want),
            "RPM scriptlets lack {want:?}:\n{scripts}"
        );
    }
    let info = q(&["-i"]);
    assert!(
        info.contains("Version     : 0.1.0") && info.contains("Release     : 1"),
        "{info}"
    );

    // rpm itself into an empty root (dependencies and scriptlets aside: there is no system
    // there): install, edit the config, upgrade (kept), erase (kept as .rpmsave).
    let v2 = packages(2);
    let root = TempDir::new("rpm-root");
    let rpm = |args: &[&str], pkg: Option<&Path>| {
        let mut c = Command::new("rpm");
        c.arg("--root").arg(&root.0).args(args);
        if let Some(p) = pkg {
            c.arg(p);
        }
        output(&mut c)
    };
    rpm(&["--initdb"], None);
    rpm(&["-i", "--nodeps", "--noscripts"], Some(&pkgs.rpm));
    let conf = root.join("etc/overkvm/overkvm.toml");
    assert_eq!(
        fs::read(&conf).unwrap(),
        fs::read(workspace().join("packaging/overkvm.toml")).unwrap()
    );
    let edited = format!("{}\n# edited\n", fs::read_to_string(&conf).unwrap());
    fs::write(&conf, &edited).unwrap();
    rpm(&["-U", "--nodeps", "--noscripts"], Some(&v2.rpm));
    assert_eq!(
        rpm(&["-q", "overkvm"], None).trim(),
        "overkvm-0.1.0-2.x86_64"
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    assert!(root.join("usr/bin/overkvm-io").is_file());
    rpm(&["-e", "--noscripts", "overkvm"], None);
    assert!(!root.join("usr/bin/overkvm-io").exists());
    assert_eq!(
        fs::read_to_string(root.join("etc/overkvm/overkvm.toml.rpmsave")).unwrap(),
        edited
    );
}

/// Purges the package on drop if this test installed it (a failed assertion included).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if dpkg_status().contains("installed") {
            let _ = Command::new("dpkg").args(["--purge", "overkvm"]).status();
        }
    }
}

fn dpkg_status() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "overkvm"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn dpkg(args: &[&str], deb: Option<&Path>) -> String {
    let mut c = Command::new("dpkg");
    c.args(args).stdin(Stdio::null());
    if let Some(d) = deb {
        c.arg(d);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dpkg {args:?} failed:\n{text}");
    text
}

/// What the package or its scripts create on a host, all gone after a purge.
const HOST_PATHS: &[&str] = &[
    "/usr/bin/overkvm-io",
    "/etc/overkvm",
    "/etc/default/overkvm",
    "/usr/lib/systemd/system/overkvm.service",
    "/etc/systemd/system/overkvm.service",
    "/etc/systemd/system/multi-user.target.wants/overkvm.service",
    "/var/lib/systemd/deb-systemd-helper-enabled/overkvm.service.dsh-also",
    "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/overkvm.service",
    "/var/lib/overkvm",
    "/run/overkvm",
];

fn exists(p: &str) -> bool {
    fs::symlink_metadata(p).is_ok()
}

#[test]
fn deb_installs_upgrades_keeping_the_edited_conffile_and_purges_leaving_no_limit() {
    skip_unless_kernel!();
    let blkio = overkvm_tests::v1_blkio_or_skip!();
    if !have("dpkg") {
        overkvm_tests::skipped(module_path!(), "no dpkg");
        return;
    }
    // With systemd as PID 1 the package would start the daemon on this host for real.
    if Path::new("/run/systemd/system").exists() {
        overkvm_tests::skipped(module_path!(), "systemd runs as PID 1: not installing here");
        return;
    }
    // Never touch an overkvm the machine has.
    if dpkg_status().contains("installed") || HOST_PATHS.iter().any(|p| exists(p)) {
        overkvm_tests::skipped(module_path!(), "an overkvm is installed here already");
        return;
    }
    let v1 = packages(1);
    let v2 = packages(2);

    let installed = Installed;
    dpkg(&["-i"], Some(&v1.deb));
    assert_eq!(dpkg_status(), "install ok installed");
    // Enabled the Debian way (deb-systemd-helper), though not started: no systemd runs here.
    let wants = "/etc/systemd/system/multi-user.target.wants/overkvm.service";
    // (/lib/systemd/system/... on a merged-/usr Debian: the same file.)
    assert!(fs::read_link(wants).is_ok(), "{wants} is not a link");
    assert_eq!(
        fs::canonicalize(wants).unwrap(),
        fs::canonicalize("/usr/lib/systemd/system/overkvm.service").unwrap()
    );

    // The operator sets a budget on a disk, then upgrades: the edit stays.
    let V1Scenario {
        lo,
        major,
        minor,
        mut cgs,
        dirs,
    } = V1Scenario::new(&blkio, 128, &["vmP"]);
    let conf = "/etc/overkvm/overkvm.toml";
    let edited = format!(
        "{}\n[[device]]\ndevice = \"{}\"\niops = 300\n",
        fs::read_to_string(conf).unwrap(),
        lo.name()
    );
    fs::write(conf, &edited).unwrap();
    let log = dpkg(&["-i"], Some(&v2.deb));
    assert_eq!(
        output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "overkvm"])),
        "0.1.0-2"
    );
    assert_eq!(
        fs::read_to_string(conf).unwrap(),
        edited,
        "upgrade log:\n{log}"
    );
    assert!(
        !exists("/etc/overkvm/overkvm.toml.dpkg-new")
            && !exists("/etc/overkvm/overkvm.toml.dpkg-old")
    );

    // The installed binary (its eBPF programs inside) limits a greedy VM, and is killed -9:
    // the limit stays, recorded in /run/overkvm.
    let tmp = TempDir::new("pkg-install");
    let dlog = tmp.join("daemon.log");
    let daemon = Daemon(
        Command::new("/usr/bin/overkvm-io")
            .args(["serve", "--listen", "127.0.0.1:0", "--config", conf])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&dlog).unwrap())
            .spawn()
            .unwrap(),
    );
    cgs.kids
        .push(greedy_vm(&tmp.0, &lo.path, "vmP", &dirs[0], 0));
    let limited = wait_until(Duration::from_secs(15), || any_limit(&dirs, major, minor));
    assert!(
        limited,
        "no limit within 15 s:\n{}",
        fs::read_to_string(&dlog).unwrap_or_default()
    );
    daemon.kill9();
    cgs.stop_all();
    assert!(
        any_limit(&dirs, major, minor),
        "the killed daemon's limit is gone already"
    );
    assert!(exists("/run/overkvm/throttle.json"));

    // Purge: prerm undoes the limit with the binary still there, postrm removes the state, dpkg
    // the conffiles, deb-systemd-helper the enablement.
    let log = dpkg(&["--purge", "overkvm"], None);
    eprintln!("dpkg --purge:\n{log}");
    assert!(
        !any_limit(&dirs, major, minor),
        "a limit survived the purge:\n{log}"
    );
    assert!(!dpkg_status().contains("installed"), "{}", dpkg_status());
    let left: Vec<&&str> = HOST_PATHS.iter().filter(|p| exists(p)).collect();
    assert!(left.is_empty(), "left after purge: {left:?}\n{log}");
    drop(installed);
    drop(cgs);
    drop(lo);
}
