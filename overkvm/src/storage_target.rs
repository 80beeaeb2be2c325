//! A storage target as a budget names it (`rbd:volumes`, `nfs://filer/export`,
//! `iscsi://10.0.0.1:3260/iqn.2010-01.com.example:store`, `nbd://10.0.0.5:10809/disk7`), and
//! which VM disks it covers: the ones whose target, as `qemu::backing` names it, lies inside.
//!
//! Pure: both sides are read into the same shape, a scheme, a server and a path of
//! components, and a budget covers a disk when scheme and server are the same and the
//! budget's path is a prefix of the disk's, component by component (`rbd:pool` covers
//! `rbd:pool/img` and `rbd:pool/ns/img`, never `rbd:pool2/img`). The config checks budgets
//! with [`StorageTarget::parse`]; the throttle asks [`StorageTarget::covers`] of each disk.

use std::fmt;

/// A parsed storage target: the budget side (strict) or a disk's (lenient, see
/// [`StorageTarget::covers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageTarget {
    /// `rbd`, `nfs`, `iscsi`, `nbd`, `nbd+unix`, `gluster`, ... (lower case).
    scheme: String,
    /// `host[:port]`, lower case, the protocol's default port written out; empty for rbd
    /// (its monitors are not part of the target) and unix sockets.
    server: String,
    /// What lies under the server, outermost first (pool, namespace, image, snapshot; export
    /// path components; IQN, LUN).
    path: Vec<String>,
    /// As written, for messages and status.
    text: String,
}

/// Schemes a budget may name: the ones `qemu::backing` produces for network disks.
const SCHEMES: &[&str] = &[
    "rbd",
    "nfs",
    "iscsi",
    "nbd",
    "nbd+unix",
    "gluster",
    "gluster+tcp",
    "ssh",
];

/// The port a protocol uses when a URL leaves it out: `nbd://h/e` and `nbd://h:10809/e` are
/// the same export.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "nbd" => Some(10809),
        "iscsi" => Some(3260),
        "gluster" | "gluster+tcp" => Some(24007),
        "ssh" => Some(22),
        _ => None,
    }
}

/// Path components of a server-side path: empty ones (`//`, a trailing `/`) dropped.
fn components(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

impl StorageTarget {
    /// Reads a budget's target; the error says what is wrong and what a good one looks like.
    pub fn parse(text: &str) -> Result<StorageTarget, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("target is empty".into());
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "target {t:?} contains a space or a control character"
            ));
        }
        if t.contains(['?', '#']) {
            return Err(format!(
                "target {t:?} has a query or fragment: name only where the data is \
                 (options and credentials are not part of a target)"
            ));
        }
        let parsed = Self::read(t).ok_or_else(|| {
            format!(
                "target {t:?} is not a storage target: write rbd:POOL[/IMAGE], \
                 nfs://SERVER/EXPORT, iscsi://PORTAL/IQN[/LUN], nbd://HOST[:PORT][/EXPORT] \
                 (schemes: {})",
                SCHEMES.join(", ")
            )
        })?;
        if !SCHEMES.contains(&parsed.scheme.as_str()) {
            return Err(format!(
                "target {t:?}: unknown scheme {:?} (one of {})",
                parsed.scheme,
                SCHEMES.join(", ")
            ));
        }
        if t.contains('@') && parsed.scheme != "rbd" {
            return Err(format!(
                "target {t:?} has a user name or password: leave credentials out (overkvm \
                 strips them from disks' targets, so they would never match)"
            ));
        }
        let need = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(format!("target {t:?} needs {what}"))
            }
        };
        match parsed.scheme.as_str() {
            "rbd" => {
                need(
                    !parsed.path.is_empty(),
                    "a pool: rbd:POOL or rbd:POOL/IMAGE",
                )?;
                if t.contains(':') && t.matches(':').count() > 1 {
                    return Err(format!(
                        "target {t:?} has rbd options (`:id=`, `:conf=`...): name only the \
                         pool and image"
                    ));
                }
            }
            "nfs" => {
                need(!parsed.server.is_empty(), "a server: nfs://SERVER/EXPORT")?;
                need(
                    !parsed.path.is_empty(),
                    "an export path: nfs://SERVER/EXPORT",
                )?;
            }
            "iscsi" => {
                need(
                    !parsed.server.is_empty(),
                    "a portal: iscsi://HOST[:PORT]/IQN",
                )?;
                need(
                    !parsed.path.is_empty(),
                    "a target IQN: iscsi://HOST[:PORT]/IQN",
                )?;
                need(
                    parsed.path.len() <= 2,
                    "at most an IQN and a LUN after the portal",
                )?;
                if let Some(lun) = parsed.path.get(1) {
                    need(lun.parse::<u16>().is_ok(), "a numeric LUN after the IQN")?;
                }
            }
            "nbd+unix" => need(!parsed.path.is_empty(), "an export: nbd+unix:///EXPORT")?,
            _ => need(
                !parsed.server.is_empty(),
                "a server: SCHEME://HOST[:PORT]/...",
            )?,
        }
        Ok(parsed)
    }

    /// The shape of a target, None when it has none. Lenient: disks' targets come from
    /// `qemu::backing` and are read with the same rules as budgets' without the checks.
    fn read(t: &str) -> Option<StorageTarget> {
        let (scheme, server, path) = if let Some((scheme, rest)) = t.split_once("://") {
            let scheme = scheme.to_ascii_lowercase();
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            (
                scheme.clone(),
                Self::server(&scheme, authority)?,
                components(path),
            )
        } else {
            let (scheme, body) = t.split_once(':')?;
            if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_alphanumeric()) {
                return None;
            }
            let scheme = scheme.to_ascii_lowercase();
            // rbd:pool/ns/image@snap: the snapshot is one more level inside the image.
            let body = body.split(':').next().unwrap_or("");
            let mut path = components(body);
            if let Some(last) = path.pop() {
                match last.split_once('@') {
                    Some((image, snap)) => {
                        path.push(image.to_string());
                        path.push(format!("@{snap}"));
                    }
                    None => path.push(last),
                }
            }
            (scheme, String::new(), path)
        };
        Some(StorageTarget {
            scheme,
            server,
            path,
            text: t.to_string(),
        })
    }

    /// `host[:port]` with the scheme's default port written out, lower case (host names are
    /// not case-sensitive); None for a port that is not a number.
    fn server(scheme: &str, authority: &str) -> Option<String> {
        let a = authority.to_ascii_lowercase();
        if a.is_empty() {
            return Some(a);
        }
        // `[::1]:10809`: the port follows the bracket.
        let (host, port) = match a.rfind(':') {
            Some(i) if !a[i..].contains(']') => (&a[..i], Some(&a[i + 1..])),
            _ => (a.as_str(), None),
        };
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok()?),
            None => default_port(scheme),
        };
        Some(match port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        })
    }

    /// Whether a disk whose target `qemu::backing` named `disk_target` stores its data inside
    /// this target: the same scheme and server, and this path a prefix of the disk's.
    pub fn covers(&self, disk_target: &str) -> bool {
        let Some(d) = Self::read(disk_target.trim()) else {
            return false;
        };
        // gluster+tcp is gluster over its default transport.
        let family = |s: &str| s.strip_suffix("+tcp").unwrap_or(s).to_string();
        family(&d.scheme) == family(&self.scheme)
            && d.server == self.server
            && d.path.len() >= self.path.len()
            && d.path.iter().zip(&self.path).all(|(a, b)| a == b)
    }

    /// The target as the operator wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for StorageTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(budget: &str, disk: &str) -> bool {
        StorageTarget::parse(budget).unwrap().covers(disk)
    }

    #[test]
    fn a_ceph_pool_covers_every_image_in_it_and_nothing_else() {
        for disk in [
            "rbd:volumes/vm-1-disk-0",
            "rbd:volumes/ns1/img",
            "rbd:volumes/img@snap",
        ] {
            assert!(covers("rbd:volumes", disk), "{disk}");
        }
        for disk in ["rbd:volumes2/img", "rbd:images/volumes", "nbd://volumes/x"] {
            assert!(!covers("rbd:volumes", disk), "{disk}");
        }
        assert!(covers("rbd:volumes/ns1", "rbd:volumes/ns1/img"));
        assert!(!covers("rbd:volumes/ns1", "rbd:volumes/ns2/img"));
        // One image, and its snapshots.
        assert!(covers("rbd:volumes/img", "rbd:volumes/img"));
        assert!(covers("rbd:volumes/img", "rbd:volumes/img@snap"));
        assert!(!covers("rbd:volumes/img", "rbd:volumes/img2"));
    }

    #[test]
    fn an_nfs_export_covers_the_files_under_it() {
        let b = "nfs://filer1/export/vms";
        assert!(covers(b, "nfs://filer1/export/vms/a/disk.qcow2"));
        assert!(
            covers(b, "nfs://FILER1/export/vms/disk.qcow2"),
            "host names"
        );
        assert!(covers(
            "nfs://filer1/export/vms/",
            "nfs://filer1/export/vms/d"
        ));
        assert!(
            !covers(b, "nfs://filer1/export/vms2/disk.qcow2"),
            "components"
        );
        assert!(!covers(b, "nfs://filer2/export/vms/disk.qcow2"));
        assert!(
            !covers(b, "nfs://filer1/export/Vms/d"),
            "paths are case-sensitive"
        );
    }

    #[test]
    fn an_iscsi_target_covers_its_luns_on_its_portal() {
        let b = "iscsi://10.0.0.1/iqn.2010-01.com.example:store";
        assert!(covers(
            b,
            "iscsi://10.0.0.1:3260/iqn.2010-01.com.example:store/1"
        ));
        assert!(covers(
            b,
            "iscsi://10.0.0.1:3260/iqn.2010-01.com.example:store/7"
        ));
        assert!(!covers(
            b,
            "iscsi://10.0.0.1:3261/iqn.2010-01.com.example:store/1"
        ));
        assert!(!covers(
            b,
            "iscsi://10.0.0.1/iqn.2010-01.com.example:store2/1"
        ));
        let lun = "iscsi://10.0.0.1:3260/iqn.2010-01.com.example:store/1";
        assert!(covers(lun, lun));
        assert!(!covers(
            lun,
            "iscsi://10.0.0.1:3260/iqn.2010-01.com.example:store/2"
        ));
    }

    #[test]
    fn an_nbd_server_covers_its_exports_and_an_export_itself() {
        assert!(covers("nbd://127.0.0.1:10809", "nbd://127.0.0.1:10809/exp"));
        assert!(
            covers("nbd://127.0.0.1", "nbd://127.0.0.1:10809/exp"),
            "port"
        );
        assert!(covers(
            "nbd://127.0.0.1:10809/exp",
            "nbd://127.0.0.1:10809/exp"
        ));
        assert!(!covers(
            "nbd://127.0.0.1:10809/exp",
            "nbd://127.0.0.1:10809/exp2"
        ));
        assert!(!covers(
            "nbd://127.0.0.1:10809",
            "nbd://127.0.0.1:10810/exp"
        ));
        assert!(covers("nbd+unix:///exp", "nbd+unix:///exp"));
        assert!(covers("nbd://[::1]:10809", "nbd://[::1]:10809/e"));
        assert!(!covers("nbd://[::1]:10809", "nbd://[::2]:10809/e"));
        assert!(covers(
            "gluster://srv/vol",
            "gluster+tcp://srv:24007/vol/img"
        ));
    }

    #[test]
    fn a_targets_own_form_is_covered_by_itself() {
        // Every disk target backing.rs produces, as a budget, covers that disk.
        for t in [
            "rbd:p/i",
            "rbd:pool/ns/img@snap",
            "iscsi://127.0.0.1:13260/iqn.2026-12.org.overkvm:disk/1",
            "nbd://h:10809/e",
            "nfs://srv/export/disk.img",
            "gluster+tcp://srv:24007/vol/img",
            "ssh://host/img",
        ] {
            assert!(covers(t, t), "{t}");
        }
    }

    #[test]
    fn malformed_targets_are_refused_with_a_reason() {
        let err = |t: &str| StorageTarget::parse(t).unwrap_err();
        assert!(err("").contains("empty"));
        assert!(
            err("loop0").contains("not a storage target"),
            "a device name"
        );
        assert!(err("/dev/rbd0").contains("not a storage target"));
        assert!(err("ftp://h/x").contains("unknown scheme"));
        assert!(err("rbd:").contains("needs a pool"));
        assert!(err("rbd:pool/img:id=admin:key=x").contains("rbd options"));
        assert!(err("nfs://filer").contains("export path"));
        assert!(err("nfs:///export").contains("server"));
        assert!(err("iscsi://10.0.0.1").contains("IQN"));
        assert!(err("iscsi://10.0.0.1/iqn.x:t/one").contains("numeric LUN"));
        assert!(err("iscsi://10.0.0.1/iqn.x:t/1/2").contains("at most"));
        assert!(err("iscsi://u:p@10.0.0.1/iqn.x:t").contains("credentials"));
        assert!(err("nbd://h:port/e").contains("not a storage target"));
        assert!(err("nbd://h/e?tls=1").contains("query"));
        assert!(err("nbd://h/e x").contains("space"));
        assert!(err("nbd+unix://").contains("export"));
        assert_eq!(
            StorageTarget::parse(" rbd:volumes ").unwrap().as_str(),
            "rbd:volumes"
        );
    }

    #[test]
    fn unreadable_disk_targets_are_covered_by_nothing() {
        let b = StorageTarget::parse("nbd://h:10809").unwrap();
        for d in ["", "nbd", "nbd://h:x/e", "weird"] {
            assert!(!b.covers(d), "{d}");
        }
    }
}
