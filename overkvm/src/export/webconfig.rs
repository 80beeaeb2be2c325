//! `serve --web.config.file`: the web configuration format of Prometheus's exporter-toolkit
//! (node_exporter and most Go exporters), so one file and one habit serve every exporter on a
//! host: `tls_server_config` (certificate, key, minimum and maximum TLS version, client
//! certificates verified against `client_ca_file`), `http_server_config.headers` and
//! `basic_auth_users` with bcrypt hashes.
//!
//! Parsing is pure ([`WebConfig::parse`]); loading the files it names is [`WebConfig::load`];
//! [`WebConfigWatcher`] re-reads them when one changes (checked at most once a second, by
//! modification time, size and inode), so a renewed certificate applies without a restart.
//! A file that stops parsing keeps the last good configuration in force, logged and counted.
//!
//! What this endpoint cannot honour is refused by name at startup rather than ignored: TLS
//! 1.0 and 1.1 (rustls has neither), Go cipher suites and curves rustls does not implement,
//! the client-auth modes that accept a certificate without verifying it, `client_allowed_sans`
//! and the toolkit's request `rate_limit`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use axum::http::{HeaderName, HeaderValue};
use rustls::{
    RootCertStore, ServerConfig, SupportedProtocolVersion,
    crypto::{CryptoProvider, SupportedKxGroup},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;

use super::{auth::BasicAuth, http::HttpStats};

/// The file as written (exporter-toolkit's `web-configuration.md`); unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsServerFile>,
    http_server_config: Option<HttpServerFile>,
    #[serde(default)]
    basic_auth_users: Option<BTreeMap<String, String>>,
    /// The toolkit's request rate limiter: refused by name (see [`WebConfig::parse`]).
    rate_limit: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerFile {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    client_allowed_sans: Option<Vec<String>>,
    min_version: Option<String>,
    max_version: Option<String>,
    cipher_suites: Option<Vec<String>>,
    prefer_server_cipher_suites: Option<bool>,
    curve_preferences: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpServerFile {
    /// Accepted for files shared with Go exporters; this endpoint speaks HTTP/1.1 only.
    #[allow(dead_code)]
    http2: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
}

/// PEM text given inline or in a file (read at load time, relative to the config's directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pem {
    File(PathBuf),
    Inline(String),
}

impl Pem {
    fn from_pair(
        what: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
        base: &Path,
    ) -> anyhow::Result<Option<Pem>> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                bail!("tls_server_config: give {what} or {what}_file, not both")
            }
            (Some(text), None) => Ok(Some(Pem::Inline(text))),
            (None, Some(f)) if f.as_os_str().is_empty() => Ok(None),
            (None, Some(f)) => Ok(Some(Pem::File(base.join(f)))),
            (None, None) => Ok(None),
        }
    }

    fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Pem::Inline(text) => Ok(text.as_bytes().to_vec()),
            Pem::File(path) => {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            }
        }
    }

    fn describe(&self, what: &str) -> String {
        match self {
            Pem::File(path) => path.display().to_string(),
            Pem::Inline(_) => format!("the inline {what}"),
        }
    }
}

/// How clients prove who they are at the TLS layer (Go's `tls.ClientAuthType` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `NoClientCert`: no certificate asked for.
    None,
    /// `VerifyClientCertIfGiven`: a certificate is optional, but verified when sent.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`: a certificate signed by `client_ca_file` is required.
    RequireAndVerify,
}

impl ClientAuth {
    fn parse(s: &str) -> anyhow::Result<ClientAuth> {
        Ok(match s {
            "" | "NoClientCert" => ClientAuth::None,
            "VerifyClientCertIfGiven" => ClientAuth::VerifyIfGiven,
            "RequireAndVerifyClientCert" => ClientAuth::RequireAndVerify,
            "RequestClientCert" | "RequireAnyClientCert" => bail!(
                "tls_server_config.client_auth_type {s}: a certificate that is not verified \
                 proves nothing, so this endpoint does not offer it; use \
                 RequireAndVerifyClientCert (or VerifyClientCertIfGiven) with client_ca_file"
            ),
            other => bail!(
                "tls_server_config.client_auth_type {other:?}: expected NoClientCert, \
                 VerifyClientCertIfGiven or RequireAndVerifyClientCert"
            ),
        })
    }
}

/// The TLS side of the configuration, validated; files are read by [`TlsSettings::server_config`].
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert: Pem,
    pub key: Pem,
    pub client_auth: ClientAuth,
    pub client_ca: Option<Pem>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
    /// TLS 1.2 suites in the operator's order (None: rustls's defaults). TLS 1.3 suites are
    /// not configurable, as in Go.
    pub cipher_suites: Option<Vec<rustls::CipherSuite>>,
    pub prefer_server_cipher_suites: bool,
    /// Key exchange groups in preference order (None: rustls's defaults).
    pub curves: Option<Vec<rustls::NamedGroup>>,
}

/// A validated web configuration.
#[derive(Clone, Debug, Default)]
pub struct WebConfig {
    /// None: plain HTTP.
    pub tls: Option<TlsSettings>,
    /// User name to bcrypt hash; empty: no basic authentication.
    pub users: BTreeMap<String, String>,
    /// Added to every response.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The response headers `http_server_config.headers` may set (the toolkit's list).
const ALLOWED_HEADERS: &[&str] = &[
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
];

fn tls_version(key: &str, s: &str) -> anyhow::Result<&'static SupportedProtocolVersion> {
    match s {
        "TLS12" => Ok(&rustls::version::TLS12),
        "TLS13" => Ok(&rustls::version::TLS13),
        "TLS10" | "TLS11" => bail!(
            "tls_server_config.{key} {s}: TLS 1.0 and 1.1 are not supported (rustls speaks TLS \
             1.2 and 1.3); use TLS12 or TLS13"
        ),
        other => bail!("tls_server_config.{key} {other:?}: expected TLS12 or TLS13"),
    }
}

/// The crypto this endpoint and the fleet view's client are built with: the source of the
/// suite and curve names.
///
/// ring, whose rustls provider is deprecated since 0.23.48 for lacking post-quantum key
/// exchange: it builds with a C compiler alone, where aws-lc-rs needs cmake and minutes more
/// of build, and the Prometheus servers that talk to this endpoint (Go before 1.24, as in
/// Debian 12) do not offer a post-quantum exchange anyway. X25519 and the NIST curves are
/// what they negotiate.
#[allow(deprecated)]
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A TLS 1.2 suite by its Go (IANA) name; Go's short aliases for the ChaCha20 suites too.
fn cipher_suite(name: &str) -> anyhow::Result<rustls::CipherSuite> {
    let tls12: Vec<rustls::CipherSuite> = provider()
        .cipher_suites
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS12)
        .map(|s| s.suite())
        .collect();
    let canonical = match name {
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => {
            format!("{name}_SHA256")
        }
        _ => name.to_string(),
    };
    if let Some(s) = tls12.iter().find(|s| format!("{s:?}") == canonical) {
        return Ok(*s);
    }
    let known: Vec<String> = tls12.iter().map(|s| format!("{s:?}")).collect();
    if name.starts_with("TLS_AES_") || name.starts_with("TLS_CHACHA20_") {
        bail!(
            "tls_server_config.cipher_suites {name}: TLS 1.3 suites are not configurable (as in \
             Go); list TLS 1.2 suites only: {}",
            known.join(", ")
        );
    }
    bail!(
        "tls_server_config.cipher_suites {name}: not supported here; the TLS 1.2 suites this \
         endpoint has are {}",
        known.join(", ")
    )
}

/// A key exchange group by its Go `tls.CurveID` name.
fn curve(name: &str) -> anyhow::Result<rustls::NamedGroup> {
    let group = match name {
        "X25519" => rustls::NamedGroup::X25519,
        "CurveP256" => rustls::NamedGroup::secp256r1,
        "CurveP384" => rustls::NamedGroup::secp384r1,
        "CurveP521" => rustls::NamedGroup::secp521r1,
        other => bail!(
            "tls_server_config.curve_preferences {other:?}: expected X25519, CurveP256 or \
             CurveP384"
        ),
    };
    if !provider().kx_groups.iter().any(|g| g.name() == group) {
        bail!(
            "tls_server_config.curve_preferences {name}: not supported here; use X25519, \
             CurveP256 or CurveP384"
        );
    }
    Ok(group)
}

impl WebConfig {
    /// Parses and validates the text of a web configuration file; relative file names are
    /// taken from `base` (the file's directory, as the toolkit does). Reads no other file.
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<WebConfig> {
        // An empty file (or one of comments only) is a valid, empty configuration.
        let file: WebConfigFile = if text.trim().is_empty()
            || text
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            WebConfigFile::default()
        } else {
            serde_yaml_ng::from_str(text)?
        };
        if file.rate_limit.is_some() {
            bail!(
                "rate_limit is not supported: the endpoint already caps connections and \
                 rate-limits failed authentication per client; remove the key"
            );
        }
        let tls = file
            .tls_server_config
            .map(|t| TlsSettings::from_file(t, base))
            .transpose()?
            .flatten();
        let mut users = BTreeMap::new();
        for (user, hash) in file.basic_auth_users.unwrap_or_default() {
            if user.contains(':') {
                bail!("basic_auth_users: the user name {user:?} contains ':'");
            }
            hash.parse::<bcrypt::HashParts>().map_err(|e| {
                anyhow::anyhow!(
                    "basic_auth_users.{user}: not a bcrypt hash ({e}); make one with \
                     `htpasswd -nBC 10 \"\" | tr -d ':\\n'`"
                )
            })?;
            users.insert(user, hash);
        }
        let mut headers = Vec::new();
        let server = file.http_server_config.unwrap_or_default();
        for (name, value) in server.headers.unwrap_or_default() {
            let Some(allowed) = ALLOWED_HEADERS
                .iter()
                .find(|h| h.eq_ignore_ascii_case(&name))
            else {
                bail!(
                    "http_server_config.headers: {name:?} cannot be set; allowed: {}",
                    ALLOWED_HEADERS.join(", ")
                );
            };
            if value.is_empty() {
                continue;
            }
            let ok = match *allowed {
                "X-Frame-Options" => ["deny", "sameorigin"]
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case(&value)),
                "X-Content-Type-Options" => value.eq_ignore_ascii_case("nosniff"),
                _ => true,
            };
            let header_value = HeaderValue::from_str(&value).ok().filter(|_| ok);
            let Some(header_value) = header_value else {
                bail!("http_server_config.headers.{allowed}: invalid value {value:?}");
            };
            headers.push((HeaderName::from_static(lower(allowed)), header_value));
        }
        Ok(WebConfig {
            tls,
            users,
            headers,
        })
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> anyhow::Result<WebConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the web config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        WebConfig::parse(&text, base).with_context(|| format!("in {}", path.display()))
    }

    /// The files this configuration reads besides itself (what a reload watches).
    pub fn files(&self) -> Vec<PathBuf> {
        let Some(t) = &self.tls else {
            return Vec::new();
        };
        [Some(&t.cert), Some(&t.key), t.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|p| match p {
                Pem::File(f) => Some(f.clone()),
                Pem::Inline(_) => None,
            })
            .collect()
    }

    /// Reads the certificate, key and CA files and builds what serves connections.
    pub fn load(&self) -> anyhow::Result<LoadedWebConfig> {
        Ok(LoadedWebConfig {
            tls: self
                .tls
                .as_ref()
                .map(TlsSettings::server_config)
                .transpose()?,
            auth: (!self.users.is_empty()).then(|| Arc::new(BasicAuth::new(self.users.clone()))),
            headers: self.headers.clone(),
        })
    }
}

/// The lower-case spelling of one of [`ALLOWED_HEADERS`] (what `HeaderName` stores).
fn lower(name: &'static str) -> &'static str {
    match name {
        "Content-Security-Policy" => "content-security-policy",
        "X-Frame-Options" => "x-frame-options",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "strict-transport-security",
    }
}

impl TlsSettings {
    /// None when the section is empty (plain HTTP, as in the toolkit); a section with any
    /// setting but no certificate is an error rather than a silent plain-HTTP endpoint.
    fn from_file(t: TlsServerFile, base: &Path) -> anyhow::Result<Option<TlsSettings>> {
        let cert = Pem::from_pair("cert", t.cert, t.cert_file, base)?;
        let key = Pem::from_pair("key", t.key, t.key_file, base)?;
        let client_ca = Pem::from_pair("client_ca", t.client_ca, t.client_ca_file, base)?;
        let only_keys = t.client_auth_type.is_none()
            && t.client_allowed_sans.is_none()
            && t.min_version.is_none()
            && t.max_version.is_none()
            && t.cipher_suites.is_none()
            && t.prefer_server_cipher_suites.is_none()
            && t.curve_preferences.is_none();
        let (cert, key) = match (cert, key) {
            (Some(c), Some(k)) => (c, k),
            (None, None) if client_ca.is_none() && only_keys => return Ok(None),
            (None, _) => bail!("tls_server_config: missing cert_file (or cert)"),
            (_, None) => bail!("tls_server_config: missing key_file (or key)"),
        };
        let client_auth = ClientAuth::parse(t.client_auth_type.as_deref().unwrap_or(""))?;
        match (client_auth, &client_ca) {
            (ClientAuth::None, Some(_)) => bail!(
                "tls_server_config: client_ca_file is set but client_auth_type is NoClientCert; \
                 set client_auth_type: RequireAndVerifyClientCert to check client certificates"
            ),
            (ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify, None) => bail!(
                "tls_server_config: client_auth_type {} needs client_ca_file (or client_ca)",
                t.client_auth_type.as_deref().unwrap_or("")
            ),
            _ => {}
        }
        if t.client_allowed_sans.is_some_and(|s| !s.is_empty()) {
            bail!(
                "tls_server_config.client_allowed_sans is not supported: issue the allowed \
                 clients' certificates from a CA of their own and name it in client_ca_file"
            );
        }
        let min = tls_version("min_version", t.min_version.as_deref().unwrap_or("TLS12"))?;
        let max = tls_version("max_version", t.max_version.as_deref().unwrap_or("TLS13"))?;
        let versions: Vec<&'static SupportedProtocolVersion> = rustls::ALL_VERSIONS
            .iter()
            .copied()
            .filter(|v| {
                let rank = |v: &SupportedProtocolVersion| u16::from(v.version);
                rank(v) >= rank(min) && rank(v) <= rank(max)
            })
            .collect();
        if versions.is_empty() {
            bail!("tls_server_config: min_version is above max_version");
        }
        let cipher_suites = t
            .cipher_suites
            .filter(|l| !l.is_empty())
            .map(|l| l.iter().map(|n| cipher_suite(n)).collect())
            .transpose()?;
        let curves = t
            .curve_preferences
            .filter(|l| !l.is_empty())
            .map(|l| l.iter().map(|n| curve(n)).collect())
            .transpose()?;
        Ok(Some(TlsSettings {
            cert,
            key,
            client_auth,
            client_ca,
            versions,
            cipher_suites,
            // The toolkit's default.
            prefer_server_cipher_suites: t.prefer_server_cipher_suites.unwrap_or(true),
            curves,
        }))
    }

    /// The provider restricted to the configured suites and curves, in the configured order.
    fn provider(&self) -> CryptoProvider {
        let mut p = provider();
        if let Some(wanted) = &self.cipher_suites {
            let all = std::mem::take(&mut p.cipher_suites);
            let tls13 = all
                .iter()
                .filter(|s| s.version() == &rustls::version::TLS13);
            let tls12 = wanted
                .iter()
                .filter_map(|w| all.iter().find(|s| s.suite() == *w));
            p.cipher_suites = tls13.chain(tls12).copied().collect();
        }
        if let Some(wanted) = &self.curves {
            let all: Vec<&'static dyn SupportedKxGroup> = std::mem::take(&mut p.kx_groups);
            p.kx_groups = wanted
                .iter()
                .filter_map(|w| all.iter().find(|g| g.name() == *w).copied())
                .collect();
        }
        p
    }

    /// Reads the certificate chain, key and client CA and builds the rustls configuration.
    pub fn server_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(self.provider());
        let certs = read_certs(&self.cert, "cert")?;
        let key_pem = self.key.bytes()?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| anyhow::anyhow!("{}: no private key ({e})", self.key.describe("key")))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&self.versions)
            .context("TLS versions")?;
        let builder = match (&self.client_auth, &self.client_ca) {
            (ClientAuth::None, _) | (_, None) => builder.with_no_client_auth(),
            (mode, Some(ca)) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs(ca, "client_ca")? {
                    roots.add(c).with_context(|| {
                        format!("{}: not a usable CA certificate", ca.describe("client_ca"))
                    })?;
                }
                let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let v = if *mode == ClientAuth::VerifyIfGiven {
                    v.allow_unauthenticated()
                } else {
                    v
                };
                builder.with_client_cert_verifier(
                    v.build().context("the client certificate verifier")?,
                )
            }
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "the key {} does not go with the certificate {}",
                self.key.describe("key"),
                self.cert.describe("cert")
            )
        })?;
        config.ignore_client_order = self.prefer_server_cipher_suites;
        // HTTP/1.1 only: the endpoint has no HTTP/2 (http_server_config.http2 is accepted for
        // files shared with Go exporters and has no effect).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn read_certs(pem: &Pem, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let bytes = pem.bytes()?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", pem.describe(what)))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate in it", pem.describe(what));
    }
    Ok(certs)
}

/// What serves connections, built from one [`WebConfig`].
#[derive(Clone, Default)]
pub struct LoadedWebConfig {
    /// None: plain HTTP.
    pub tls: Option<Arc<ServerConfig>>,
    /// None: no basic authentication.
    pub auth: Option<Arc<BasicAuth>>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// How often the watched files are looked at, at most: a few `stat` calls a second at worst,
/// whatever the scrape or connection rate.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Identity of a file's content as far as `stat` tells: modification time, size, inode (a
/// renamed-over file has a new inode even when time and size match). None: unreadable.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

struct Watched {
    current: Arc<LoadedWebConfig>,
    stamps: Vec<(PathBuf, Stamp)>,
    checked: Instant,
}

/// A web configuration file kept current: re-read when it or a file it names changes.
pub struct WebConfigWatcher {
    path: PathBuf,
    watched: Mutex<Watched>,
    /// Whether TLS is on: fixed at start (the listener's shape does not change under it).
    tls: bool,
}

impl WebConfigWatcher {
    /// Reads and loads the file; every error here stops the daemon at startup.
    pub fn new(path: &Path) -> anyhow::Result<WebConfigWatcher> {
        let config = WebConfig::read(path)?;
        let loaded = config
            .load()
            .with_context(|| format!("loading what {} names", path.display()))?;
        let stamps = Self::stamps(path, &config);
        Ok(WebConfigWatcher {
            path: path.to_path_buf(),
            tls: loaded.tls.is_some(),
            watched: Mutex::new(Watched {
                current: Arc::new(loaded),
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    fn stamps(path: &Path, config: &WebConfig) -> Vec<(PathBuf, Stamp)> {
        std::iter::once(path.to_path_buf())
            .chain(config.files())
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect()
    }

    /// Whether the endpoint serves TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The configuration in force, re-read first if a watched file changed (looked at no more
    /// than once per [`CHECK_INTERVAL`]).
    /// Reloads are counted in `stats`.
    pub fn current(&self, stats: &HttpStats) -> Arc<LoadedWebConfig> {
        let mut w = super::lock(&self.watched);
        if w.checked.elapsed() < CHECK_INTERVAL {
            return w.current.clone();
        }
        w.checked = Instant::now();
        if w.stamps.iter().all(|(p, s)| stamp(p) == *s) {
            return w.current.clone();
        }
        // Whatever the outcome, these are the stamps seen: a broken file is reported once,
        // and read again on its next change.
        // Stamps before loading: a file replaced while it is read is read again next time.
        let reloaded = WebConfig::read(&self.path).and_then(|c| {
            let stamps = Self::stamps(&self.path, &c);
            Ok((c.load()?, stamps))
        });
        match reloaded {
            Ok((loaded, stamps)) if loaded.tls.is_some() == self.tls => {
                w.current = Arc::new(loaded);
                w.stamps = stamps;
                stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                log::info!("web config {} re-read", self.path.display());
            }
            Ok((_, stamps)) => {
                w.stamps = stamps;
                stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "web config {}: turning TLS {} needs a restart; keeping the configuration \
                     in force",
                    self.path.display(),
                    if self.tls { "off" } else { "on" }
                );
            }
            Err(e) => {
                for (p, s) in &mut w.stamps {
                    *s = stamp(p);
                }
                stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "web config {}: {e:#}; keeping the configuration in force",
                    self.path.display()
                );
            }
        }
        w.current.clone()
    }
}

/// Certificates for tests: a CA, and server and client certificates it signs.
#[cfg(test)]
pub(crate) mod testpki {
    use std::path::Path;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    pub struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pub pem: String,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().expect("key");
            let pem = params.self_signed(&key).expect("CA").pem();
            Ca { params, key, pem }
        }

        /// A certificate for `names` (DNS names or IP addresses): (cert PEM, key PEM).
        pub fn issue(&self, names: &[&str]) -> (String, String) {
            let params =
                CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .expect("params");
            let key = KeyPair::generate().expect("key");
            let issuer = Issuer::from_params(&self.params, &self.key);
            let cert = params.signed_by(&key, &issuer).expect("signing");
            (cert.pem(), key.serialize_pem())
        }
    }

    /// Writes `server.crt`, `server.key` (for localhost and 127.0.0.1) and `ca.crt` into dir.
    pub fn write_server(dir: &Path, ca: &Ca) {
        let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.join("server.crt"), cert).expect("write");
        std::fs::write(dir.join("server.key"), key).expect("write");
        std::fs::write(dir.join("ca.crt"), &ca.pem).expect("write");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<WebConfig> {
        WebConfig::parse(text, Path::new("/etc/overkvm"))
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).expect_err(text))
    }

    const HASH: &str = "$2y$10$X0h1gDsPszWURQaxFh.zoubFi6DXncSjhoQNJgRrnGs7EsimhC7zG";

    #[test]
    fn a_full_file_parses() {
        let c = parse(&format!(
            "# node_exporter's file, as is\n\
             tls_server_config:\n  cert_file: server.crt\n  key_file: /abs/server.key\n\
             \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
             \x20 min_version: TLS13\n  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n\
             \x20 curve_preferences: [X25519, CurveP256]\n  prefer_server_cipher_suites: false\n\
             http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n\
             \x20   Strict-Transport-Security: max-age=31536000\n    X-XSS-Protection: ''\n\
             basic_auth_users:\n  prometheus: '{HASH}'\n"
        ))
        .unwrap();
        let t = c.tls.as_ref().unwrap();
        assert_eq!(t.cert, Pem::File("/etc/overkvm/server.crt".into()));
        assert_eq!(t.key, Pem::File("/abs/server.key".into()));
        assert_eq!(t.client_ca, Some(Pem::File("/etc/overkvm/ca.crt".into())));
        assert_eq!(t.client_auth, ClientAuth::RequireAndVerify);
        assert_eq!(t.versions, vec![&rustls::version::TLS13]);
        assert_eq!(
            t.cipher_suites,
            Some(vec![
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            ])
        );
        assert_eq!(
            t.curves,
            Some(vec![
                rustls::NamedGroup::X25519,
                rustls::NamedGroup::secp256r1
            ])
        );
        assert!(!t.prefer_server_cipher_suites);
        assert_eq!(c.users.get("prometheus").map(String::as_str), Some(HASH));
        let headers: Vec<_> = c
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            headers,
            [
                ("strict-transport-security", "max-age=31536000"),
                ("x-frame-options", "deny")
            ]
        );
        assert_eq!(
            c.files(),
            [
                PathBuf::from("/etc/overkvm/server.crt"),
                "/abs/server.key".into(),
                "/etc/overkvm/ca.crt".into()
            ]
        );
    }

    #[test]
    fn small_files_parse() {
        let empty = parse("").unwrap();
        assert!(empty.tls.is_none() && empty.users.is_empty());
        assert!(parse("# nothing yet\n").unwrap().tls.is_none());
        let auth_only = parse(&format!("basic_auth_users:\n  alice: {HASH}\n")).unwrap();
        assert!(auth_only.tls.is_none());
        assert_eq!(auth_only.users.len(), 1);
        let tls = parse("tls_server_config:\n  cert_file: a\n  key_file: b\n").unwrap();
        let t = tls.tls.unwrap();
        assert_eq!(t.client_auth, ClientAuth::None);
        assert_eq!(
            t.versions,
            vec![&rustls::version::TLS13, &rustls::version::TLS12]
        );
        assert!(t.prefer_server_cipher_suites);
        // An empty section is no TLS, as in the toolkit.
        assert!(parse("tls_server_config: {}\n").unwrap().tls.is_none());
        let inline = parse("tls_server_config:\n  cert: |\n    x\n  key: y\n").unwrap();
        assert_eq!(inline.tls.unwrap().cert, Pem::Inline("x\n".into()));
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            (
                "tls_server_config:\n  certfile: a\n",
                "unknown field `certfile`",
            ),
            (
                "basic_auth_user:\n  a: b\n",
                "unknown field `basic_auth_user`",
            ),
            (
                "http_server_config:\n  header: {}\n",
                "unknown field `header`",
            ),
            ("tls_server_config:\n  cert_file: a\n", "missing key_file"),
            ("tls_server_config:\n  key_file: a\n", "missing cert_file"),
            (
                "tls_server_config:\n  min_version: TLS13\n",
                "missing cert_file",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  cert: b\n  key_file: c\n",
                "give cert or cert_file, not both",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Require\n",
                "expected NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n  client_ca_file: c\n",
                "not verified",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
                "needs client_ca_file",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
                "client_auth_type is NoClientCert",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS11\n",
                "TLS 1.0 and 1.1 are not supported",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS13\n  max_version: TLS12\n",
                "min_version is above max_version",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_RSA_WITH_AES_128_CBC_SHA]\n",
                "TLS_RSA_WITH_AES_128_CBC_SHA: not supported here",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
                "TLS 1.3 suites are not configurable",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  curve_preferences: [CurveP521]\n",
                "CurveP521: not supported here",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: [x]\n",
                "client_allowed_sans is not supported",
            ),
            (
                "basic_auth_users:\n  alice: secret\n",
                "alice: not a bcrypt hash",
            ),
            (
                "http_server_config:\n  headers:\n    Server: x\n",
                "\"Server\" cannot be set",
            ),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                "X-Frame-Options: invalid value",
            ),
            (
                "rate_limit:\n  interval: 1s\n  burst: 5\n",
                "rate_limit is not supported",
            ),
            ("tls_server_config: [\n", "expected struct"),
        ] {
            let e = err(text);
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn files_are_loaded_and_bad_ones_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let ca = testpki::Ca::new("test CA");
        testpki::write_server(dir.path(), &ca);
        let write = |text: &str| {
            let p = dir.path().join("web.yml");
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = write(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n",
        );
        let loaded = WebConfig::read(&good).unwrap().load().unwrap();
        assert!(loaded.tls.is_some() && loaded.auth.is_none());
        // The key of another certificate.
        let (_, other_key) = ca.issue(&["other"]);
        std::fs::write(dir.path().join("other.key"), other_key).unwrap();
        let cases = [
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n",
                "missing.crt",
            ),
            (
                "tls_server_config:\n  cert_file: server.key\n  key_file: server.key\n",
                "no PEM certificate",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.crt\n",
                "no private key",
            ),
            (
                "tls_server_config:\n  cert_file: server.crt\n  key_file: other.key\n",
                "does not go with the certificate",
            ),
        ];
        for (text, says) in cases {
            let p = write(text);
            let e = WebConfig::read(&p)
                .and_then(|c| c.load().map(|_| ()))
                .expect_err(text);
            let e = format!("{e:#}");
            assert!(e.contains(says), "{text}: {e}");
        }
        assert!(
            format!(
                "{:#}",
                WebConfig::read(&dir.path().join("nope.yml")).err().unwrap()
            )
            .contains("nope.yml")
        );
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let ca = testpki::Ca::new("test CA");
        testpki::write_server(dir.path(), &ca);
        let path = dir.path().join("web.yml");
        let tls = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n";
        std::fs::write(&path, tls).unwrap();
        let w = WebConfigWatcher::new(&path).unwrap();
        let stats = HttpStats::default();
        let first = w.current(&stats);
        assert!(w.tls());
        let age = |w: &WebConfigWatcher| {
            super::super::lock(&w.watched).checked -= CHECK_INTERVAL;
        };
        // Unchanged: the same configuration, nothing read.
        age(&w);
        assert!(Arc::ptr_eq(&first, &w.current(&stats)));
        // A renewed certificate (a new file renamed over the old one).
        let (cert, key) = ca.issue(&["localhost"]);
        std::fs::write(dir.path().join("new.crt"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        std::fs::rename(dir.path().join("new.crt"), dir.path().join("server.crt")).unwrap();
        // Not before the check interval.
        assert!(Arc::ptr_eq(&first, &w.current(&stats)));
        age(&w);
        let second = w.current(&stats);
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(stats.counts().reloads_ok, 1);
        // A broken file: the previous configuration stays, the failure is counted once.
        std::fs::write(&path, format!("{tls}  bogus: 1\n")).unwrap();
        age(&w);
        assert!(Arc::ptr_eq(&second, &w.current(&stats)));
        age(&w);
        assert!(Arc::ptr_eq(&second, &w.current(&stats)));
        assert_eq!(stats.counts().reloads_failed, 1);
        // Turning TLS off needs a restart.
        std::fs::write(&path, format!("basic_auth_users:\n  a: '{HASH}'\n")).unwrap();
        age(&w);
        assert!(Arc::ptr_eq(&second, &w.current(&stats)));
        assert_eq!(stats.counts().reloads_failed, 2);
        // Fixed: read again.
        std::fs::write(&path, format!("{tls}basic_auth_users:\n  a: '{HASH}'\n")).unwrap();
        age(&w);
        assert!(w.current(&stats).auth.is_some());
        assert_eq!(stats.counts().reloads_ok, 2);
    }
}
