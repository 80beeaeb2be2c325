//! What a VM is (its definition file) and where its files live (its state directory).
//!
//! Everything here is pure: names, sizes, UUIDs, the TOML definition and the path layout are
//! checked and built without touching the system, so they are tested without a host.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// Default directory holding one sub-directory per VM.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/overkvm/vms";
/// Environment variable overriding [`DEFAULT_STATE_DIR`] (`--state-dir` overrides both).
pub const STATE_DIR_ENV: &str = "OVERKVM_STATE_DIR";
/// Longest VM name: it becomes a directory, a cgroup (`vm-NAME`) and qemu's `-name`.
pub const NAME_MAX: usize = 64;
/// Name of the definition file in a VM's directory.
pub const DEFINITION_FILE: &str = "vm.toml";
/// `sockaddr_un.sun_path` holds 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// Guest memory bounds in MiB: qemu needs a few MiB for firmware; 16 TiB is beyond any host.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 16..=16 << 20;
/// vCPU bounds: 255 is the most the default `pc` machine takes without an x2APIC setup.
pub const VCPUS: std::ops::RangeInclusive<u32> = 1..=255;

/// Checks a VM name: 1 to 64 characters out of `[A-Za-z0-9_-]`, not starting with `-` (it
/// would read as an option). Dots and slashes are refused: the name becomes a path component.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() {
        bail!("the VM name is empty");
    }
    if name.len() > NAME_MAX {
        bail!(
            "the VM name is {} characters long; at most {NAME_MAX} are allowed",
            name.len()
        );
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        bail!(
            "the VM name {name:?} contains {bad:?}: use only letters, digits, '-' and '_' \
             (no dots, slashes or spaces)"
        );
    }
    if name.starts_with('-') {
        bail!("the VM name {name:?} starts with '-'");
    }
    Ok(())
}

/// Parses a disk size the way `qemu-img` writes them: bytes, or a number with a binary suffix
/// `K`, `M`, `G`, `T` (optionally followed by `B` or `iB`; case-insensitive), e.g. `20G`,
/// `512M`, `1.5G`. Returns bytes, rounded down to a 512-byte sector and at least one sector.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => bail!("{s:?} is not a size: use bytes or a suffix K, M, G or T (e.g. 20G)"),
    };
    let value: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .with_context(|| format!("{s:?} is not a size: use e.g. 20G or 512M"))?;
    let bytes = value * (1u64 << shift) as f64;
    // qemu-img refuses anything above 2^63 - 512; stay far below.
    if !(512.0..=(1u64 << 60) as f64).contains(&bytes) {
        bail!("size {s:?} is out of range (512 bytes to 1 EiB)");
    }
    Ok((bytes as u64) & !511)
}

/// Formats 16 random bytes as a version 4 (random) UUID, as qemu's `-uuid` takes it.
pub fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A new random UUID from the kernel's generator.
pub fn new_uuid() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    // SAFETY: the buffer is valid for 16 bytes; flags 0 blocks only before the pool is ready.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        return Err(std::io::Error::last_os_error()).context("getrandom for a VM UUID");
    }
    Ok(uuid_v4(b))
}

/// True for a UUID in the canonical 8-4-4-4-12 hex form.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// One VM: what `vm create` wrote and `vm start` boots. Stored as TOML in `vm.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    pub name: String,
    /// qemu `-uuid` (random, version 4): with the name, how overkvm recognises the guest.
    pub uuid: String,
    /// The shared base image (absolute path), read-only for every overlay on it.
    pub base: PathBuf,
    /// Format of the base as `qemu-img info` detected it (`-F` of the overlay).
    pub base_format: String,
    /// This VM's qcow2 overlay (absolute path, inside the VM's directory).
    pub overlay: PathBuf,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// Virtual size of the overlay in bytes when it differs from the base's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
    /// Direct kernel boot (`-kernel`), else the guest boots from its disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (`-append`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// Host cache mode of the disk (default `none`).
    #[serde(default, skip_serializing_if = "DiskCache::is_default")]
    pub cache: DiskCache,
}

/// How qemu opens the overlay: `none` (O_DIRECT: every guest I/O is qemu's own, charged to its
/// cgroup) or `writeback` (through the host page cache: the kernel's flusher threads write it
/// back, which cgroup v1 blkio cannot limit; overkvm's throttle then uses QEMU's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    #[default]
    None,
    Writeback,
}

impl crate::choice::Choice for DiskCache {
    const VALUES: &'static [DiskCache] = &[DiskCache::None, DiskCache::Writeback];

    fn name(self) -> &'static str {
        match self {
            DiskCache::None => "none",
            DiskCache::Writeback => "writeback",
        }
    }

    fn help(self) -> &'static str {
        match self {
            DiskCache::None => "O_DIRECT: every guest I/O is qemu's own, charged to its cgroup",
            DiskCache::Writeback => {
                "the host page cache: the kernel's flusher writes it back (cgroup v1 cannot \
                 limit that; the throttle then uses QEMU's own)"
            }
        }
    }
}

impl DiskCache {
    pub fn is_default(&self) -> bool {
        *self == DiskCache::None
    }

    /// The `-drive` options of this mode.
    pub fn drive_options(&self) -> &'static str {
        match self {
            DiskCache::None => "cache=none,aio=native",
            DiskCache::Writeback => "cache=writeback,aio=threads",
        }
    }
}

impl VmDefinition {
    /// Checks the fields that came from a user or a file.
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_name(&self.name)?;
        if !is_uuid(&self.uuid) {
            bail!("uuid {:?} is not a UUID", self.uuid);
        }
        if !MEMORY_MIB.contains(&self.memory_mib) {
            bail!(
                "memory {} MiB is out of range ({} to {} MiB)",
                self.memory_mib,
                MEMORY_MIB.start(),
                MEMORY_MIB.end()
            );
        }
        if !VCPUS.contains(&self.vcpus) {
            bail!(
                "{} vCPUs is out of range ({} to {})",
                self.vcpus,
                VCPUS.start(),
                VCPUS.end()
            );
        }
        if self.base_format.is_empty()
            || !self
                .base_format
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            bail!(
                "base format {:?} is not a qemu format name",
                self.base_format
            );
        }
        for (what, p) in [
            ("base", Some(&self.base)),
            ("overlay", Some(&self.overlay)),
            ("kernel", self.kernel.as_ref()),
            ("initrd", self.initrd.as_ref()),
        ] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                bail!("{what} path {} is not absolute", p.display());
            }
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            bail!("an initrd or kernel command line needs a kernel (--kernel)");
        }
        Ok(())
    }

    /// Parses and validates a definition file's text; errors name the line.
    pub fn parse(text: &str) -> anyhow::Result<VmDefinition> {
        let def: VmDefinition = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => anyhow::anyhow!("line {l}: {}", e.message()),
                None => anyhow::anyhow!("{}", e.message()),
            }
        })?;
        def.validate()?;
        Ok(def)
    }

    /// The file's text.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        let body = toml::to_string(self).context("encoding the VM definition")?;
        Ok(format!(
            "# overkvm VM definition, written by `overkvm-io vm create`.\n{body}"
        ))
    }
}

/// The state directory: `--state-dir`, else `$OVERKVM_STATE_DIR`, else the default.
pub fn state_dir(flag: Option<&Path>, env: Option<OsString>) -> PathBuf {
    match (flag, env) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
        _ => PathBuf::from(DEFAULT_STATE_DIR),
    }
}

/// Where one VM's files live: everything of a VM is inside its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    /// The directory of VM `name` in `state_dir` (the name must be valid).
    pub fn new(state_dir: &Path, name: &str) -> VmPaths {
        VmPaths {
            dir: state_dir.join(name),
        }
    }

    pub fn definition(&self) -> PathBuf {
        self.dir.join(DEFINITION_FILE)
    }

    /// The qcow2 overlay.
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// Written by qemu (`-pidfile`); qemu removes it when it exits normally.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }

    /// The guest's serial console.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// qemu's own messages while it starts (before it daemonizes).
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// What `vm start` recorded about the running qemu (see `state::RunRecord`).
    pub fn run_record(&self) -> PathBuf {
        self.dir.join("run.json")
    }

    /// Checks that the QMP socket path fits in a `sockaddr_un`.
    pub fn check_socket_len(&self) -> anyhow::Result<()> {
        let sock = self.qmp_socket();
        let len = sock.as_os_str().len();
        if len > SUN_PATH_MAX {
            bail!(
                "the QMP socket path {} is {len} bytes, more than a unix socket takes \
                 ({SUN_PATH_MAX}): use a shorter --state-dir or VM name",
                sock.display()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web01", "db_2", "A-b_C-9", &"x".repeat(64)] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("", "empty"),
            ("a.b", "'.'"),
            ("..", "'.'"),
            ("a/b", "'/'"),
            ("/etc", "'/'"),
            ("a b", "' '"),
            ("-x", "starts with '-'"),
            ("é", "'é'"),
            ("a\nb", "'\\n'"),
            ("a,b", "','"),
        ] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let e = validate_name(&"x".repeat(65)).unwrap_err().to_string();
        assert!(e.contains("65 characters"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1000").unwrap(), 512);
        assert_eq!(parse_size(" 64k ").unwrap(), 64 << 10);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        for bad in [
            "", "G", "10X", "-1G", "1e3", "0", "100", "nan", "2000000T", "1.2.3G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuids() {
        let u = uuid_v4([0xff; 16]);
        assert_eq!(u, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert!(is_uuid(&u));
        let z = uuid_v4([0; 16]);
        assert_eq!(z, "00000000-0000-4000-8000-000000000000");
        let a = new_uuid().unwrap();
        assert!(is_uuid(&a) && &a[14..15] == "4", "{a}");
        assert_ne!(a, new_uuid().unwrap());
        for bad in [
            "",
            "0fa82997",
            "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5",
            "0fa82997x3c4d-4e5f-8a9b-0c1d2e3f4a5b",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    fn sample() -> VmDefinition {
        VmDefinition {
            name: "web01".into(),
            uuid: "0fa82997-3c4d-4e5f-8a9b-0c1d2e3f4a5b".into(),
            base: "/srv/base.img".into(),
            base_format: "raw".into(),
            overlay: "/var/lib/overkvm/vms/web01/disk.qcow2".into(),
            memory_mib: 512,
            vcpus: 2,
            disk_size: None,
            kernel: Some("/boot/vmlinuz".into()),
            initrd: None,
            append: Some("console=ttyS0 \"quoted\" x=1".into()),
            cache: DiskCache::None,
        }
    }

    #[test]
    fn definition_round_trip() {
        let def = sample();
        let text = def.to_toml().unwrap();
        assert!(text.contains("name = \"web01\""), "{text}");
        assert!(!text.contains("initrd"), "None fields are left out: {text}");
        assert_eq!(VmDefinition::parse(&text).unwrap(), def);
        let mut sized = def.clone();
        sized.disk_size = Some(1 << 30);
        sized.kernel = None;
        sized.append = None;
        assert_eq!(
            VmDefinition::parse(&sized.to_toml().unwrap()).unwrap(),
            sized
        );
    }

    #[test]
    fn definition_errors_name_the_problem() {
        let text = sample().to_toml().unwrap();
        let cases = [
            (text.replace("vcpus = 2", "vcpus = 0"), "0 vCPUs"),
            (
                text.replace("memory_mib = 512", "memory_mib = 1"),
                "memory 1 MiB",
            ),
            (text.replace("name = \"web01\"", "name = \"../x\""), "'.'"),
            (text.replace("0fa82997-", "zz"), "not a UUID"),
            (text.replace("/srv/base.img", "base.img"), "not absolute"),
            (
                text.replace("base_format = \"raw\"", "base_format = \"Raw;\""),
                "format",
            ),
            (
                text.replace("vcpus = 2", "vcpus = 2\ncolour = 1"),
                "unknown field",
            ),
            (text.replace("vcpus = 2", "vcpus = \"two\""), "line"),
            (
                text.replace("kernel = \"/boot/vmlinuz\"\n", ""),
                "needs a kernel",
            ),
            ("garbage".to_string(), "line 1"),
            (String::new(), "missing field"),
        ];
        for (t, want) in cases {
            let e = format!("{:#}", VmDefinition::parse(&t).unwrap_err());
            assert!(e.contains(want), "want {want:?} in {e:?} for\n{t}");
        }
    }

    #[test]
    fn state_dir_precedence() {
        let flag = Path::new("/flag");
        assert_eq!(state_dir(Some(flag), Some("/env".into())), flag);
        assert_eq!(state_dir(None, Some("/env".into())), Path::new("/env"));
        assert_eq!(
            state_dir(None, Some("".into())),
            Path::new(DEFAULT_STATE_DIR)
        );
        assert_eq!(state_dir(None, None), Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn paths_and_socket_length() {
        let p = VmPaths::new(Path::new("/var/lib/overkvm/vms"), "a");
        assert_eq!(p.qmp_socket(), Path::new("/var/lib/overkvm/vms/a/qmp.sock"));
        assert_eq!(p.definition(), Path::new("/var/lib/overkvm/vms/a/vm.toml"));
        p.check_socket_len().unwrap();
        let long = VmPaths::new(Path::new(&format!("/{}", "d".repeat(90))), &"n".repeat(20));
        let e = long.check_socket_len().unwrap_err().to_string();
        assert!(e.contains("shorter --state-dir"), "{e}");
    }
}
