//! `top --prometheus https://... --http.config.file FILE`: how the fleet view reaches a
//! Prometheus behind TLS and authentication, in the format of Prometheus's own HTTP client
//! configuration (promtool's `--http.config.file`, a scrape job's `basic_auth`,
//! `authorization` and `tls_config`), so the file promtool uses works here unchanged.
//!
//! Parsing is pure ([`HttpClientConfig::parse`]); [`HttpClientConfig::load`] reads the files
//! it names. Settings this client cannot honour (proxies, OAuth 2, skipping certificate
//! verification) are refused by name rather than ignored.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    basic_auth: Option<BasicAuthFile>,
    authorization: Option<AuthorizationFile>,
    tls_config: Option<TlsFile>,
    /// Accepted for files shared with promtool: the fleet view follows no redirects and
    /// speaks HTTP/1.0, whatever they say.
    #[allow(dead_code)]
    follow_redirects: Option<bool>,
    #[allow(dead_code)]
    enable_http2: Option<bool>,
    // Refused by name (see `parse`).
    oauth2: Option<serde_yaml_ng::Value>,
    proxy_url: Option<serde_yaml_ng::Value>,
    no_proxy: Option<serde_yaml_ng::Value>,
    proxy_from_environment: Option<serde_yaml_ng::Value>,
    proxy_connect_header: Option<serde_yaml_ng::Value>,
    bearer_token: Option<serde_yaml_ng::Value>,
    bearer_token_file: Option<serde_yaml_ng::Value>,
    http_headers: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicAuthFile {
    username: Option<String>,
    username_file: Option<PathBuf>,
    password: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizationFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    credentials: Option<String>,
    credentials_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    ca: Option<String>,
    ca_file: Option<PathBuf>,
    cert: Option<String>,
    cert_file: Option<PathBuf>,
    key: Option<String>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
    insecure_skip_verify: Option<bool>,
    min_version: Option<String>,
    max_version: Option<String>,
}

/// A secret or PEM text given inline or in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Inline(String),
    File(PathBuf),
}

impl Source {
    fn pick(
        what: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
        base: &Path,
    ) -> anyhow::Result<Option<Source>> {
        match (inline, file) {
            (Some(_), Some(_)) => bail!("give {what} or {what}_file, not both"),
            (Some(s), None) => Ok(Some(Source::Inline(s))),
            (None, Some(f)) => Ok(Some(Source::File(base.join(f)))),
            (None, None) => Ok(None),
        }
    }

    fn read(&self) -> anyhow::Result<String> {
        match self {
            Source::Inline(s) => Ok(s.clone()),
            Source::File(p) => {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            }
        }
    }

    /// A secret read from a file loses its trailing newline, as in Prometheus.
    fn secret(&self) -> anyhow::Result<String> {
        let s = self.read()?;
        Ok(match self {
            Source::File(_) => s.trim_end_matches(['\n', '\r']).to_string(),
            Source::Inline(_) => s,
        })
    }
}

/// How the client authenticates with HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpAuth {
    Basic {
        username: Source,
        password: Option<Source>,
    },
    /// `Authorization: TYPE CREDENTIALS`.
    Header { kind: String, credentials: Source },
}

/// The TLS side: whom to trust, which certificate to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsClientSettings {
    /// None: the system's trusted CAs.
    pub ca: Option<Source>,
    /// Client certificate and key.
    pub identity: Option<(Source, Source)>,
    /// The name the server's certificate must carry, when not the URL's host.
    pub server_name: Option<String>,
    /// Only TLS 1.3 (min_version TLS13).
    pub tls13_only: bool,
}

/// A validated client configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpClientConfig {
    pub auth: Option<HttpAuth>,
    pub tls: TlsClientSettings,
}

/// What the client sends and how it connects, files read.
#[derive(Clone)]
pub struct LoadedClientConfig {
    /// The `Authorization` header value.
    pub authorization: Option<String>,
    /// None: for plain HTTP.
    pub tls: Option<Arc<ClientConfig>>,
    pub server_name: Option<String>,
}

impl std::fmt::Debug for LoadedClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("LoadedClientConfig")
            .field("authorization", &self.authorization.as_ref().map(|_| "…"))
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl HttpClientConfig {
    /// Parses the text of an HTTP client configuration; relative file names are taken from
    /// `base` (the file's directory).
    pub fn parse(text: &str, base: &Path) -> anyhow::Result<HttpClientConfig> {
        let f: ClientFile = if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            ClientFile::default()
        } else {
            serde_yaml_ng::from_str(text)?
        };
        for (set, key) in [
            (f.oauth2.is_some(), "oauth2"),
            (f.proxy_url.is_some(), "proxy_url"),
            (f.no_proxy.is_some(), "no_proxy"),
            (f.proxy_from_environment.is_some(), "proxy_from_environment"),
            (f.proxy_connect_header.is_some(), "proxy_connect_header"),
            (f.http_headers.is_some(), "http_headers"),
        ] {
            if set {
                bail!("{key} is not supported by overkvm-io top; remove it");
            }
        }
        if f.bearer_token.is_some() || f.bearer_token_file.is_some() {
            bail!(
                "bearer_token is deprecated in Prometheus's format: write authorization: \
                 {{credentials: ...}} (or credentials_file) instead"
            );
        }
        let basic = f
            .basic_auth
            .map(|b| -> anyhow::Result<HttpAuth> {
                let username = Source::pick("username", b.username, b.username_file, base)
                    .context("basic_auth")?
                    .context("basic_auth: missing username")?;
                let password = Source::pick("password", b.password, b.password_file, base)
                    .context("basic_auth")?;
                Ok(HttpAuth::Basic { username, password })
            })
            .transpose()?;
        let header = f
            .authorization
            .map(|a| -> anyhow::Result<HttpAuth> {
                let kind = a.kind.unwrap_or_else(|| "Bearer".into());
                if kind.eq_ignore_ascii_case("basic") {
                    bail!("authorization: type Basic is not allowed; use basic_auth");
                }
                let credentials =
                    Source::pick("credentials", a.credentials, a.credentials_file, base)
                        .context("authorization")?
                        .context("authorization: missing credentials")?;
                Ok(HttpAuth::Header { kind, credentials })
            })
            .transpose()?;
        let auth = match (basic, header) {
            (Some(_), Some(_)) => bail!("give basic_auth or authorization, not both"),
            (b, h) => b.or(h),
        };
        let t = f.tls_config.unwrap_or_default();
        if t.insecure_skip_verify == Some(true) {
            bail!(
                "tls_config.insecure_skip_verify is not supported: give the CA that signed the \
                 server's certificate in tls_config.ca_file"
            );
        }
        let version = |key: &str, v: Option<String>| -> anyhow::Result<Option<bool>> {
            match v.as_deref() {
                None | Some("") => Ok(None),
                Some("TLS12") => Ok(Some(false)),
                Some("TLS13") => Ok(Some(true)),
                Some("TLS10" | "TLS11") => {
                    bail!("tls_config.{key}: TLS 1.0 and 1.1 are not supported; use TLS12 or TLS13")
                }
                Some(other) => bail!("tls_config.{key} {other:?}: expected TLS12 or TLS13"),
            }
        };
        let tls13_only = version("min_version", t.min_version)?.unwrap_or(false);
        if version("max_version", t.max_version)? == Some(false) && tls13_only {
            bail!("tls_config: min_version is above max_version");
        }
        let ca = Source::pick("ca", t.ca, t.ca_file, base).context("tls_config")?;
        let cert = Source::pick("cert", t.cert, t.cert_file, base).context("tls_config")?;
        let key = Source::pick("key", t.key, t.key_file, base).context("tls_config")?;
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => bail!("tls_config: cert_file without key_file"),
            (None, Some(_)) => bail!("tls_config: key_file without cert_file"),
        };
        Ok(HttpClientConfig {
            auth,
            tls: TlsClientSettings {
                ca,
                identity,
                server_name: t.server_name.filter(|s| !s.is_empty()),
                tls13_only,
            },
        })
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> anyhow::Result<HttpClientConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the HTTP client config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        HttpClientConfig::parse(&text, base).with_context(|| format!("in {}", path.display()))
    }

    /// Reads the secrets it names, and for `tls` the certificates and keys (and the system's
    /// CAs when it names none).
    pub fn load(&self, tls: bool) -> anyhow::Result<LoadedClientConfig> {
        let authorization = match &self.auth {
            None => None,
            Some(HttpAuth::Basic { username, password }) => {
                let user = username.secret()?;
                let password = password.as_ref().map(Source::secret).transpose()?;
                let pair = format!("{user}:{}", password.unwrap_or_default());
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
            Some(HttpAuth::Header { kind, credentials }) => {
                Some(format!("{kind} {}", credentials.secret()?))
            }
        };
        if authorization
            .as_ref()
            .is_some_and(|a| a.contains(['\r', '\n']))
        {
            bail!("the credentials contain a line break");
        }
        if !tls {
            return Ok(LoadedClientConfig {
                authorization,
                tls: None,
                server_name: None,
            });
        }
        let mut roots = RootCertStore::empty();
        match &self.tls.ca {
            Some(ca) => {
                let pem = ca.read()?;
                for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let c = c.map_err(|e| anyhow::anyhow!("tls_config CA: {e}"))?;
                    roots
                        .add(c)
                        .context("tls_config CA: not a usable certificate")?;
                }
                if roots.is_empty() {
                    bail!("tls_config CA: no PEM certificate in it");
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    log::warn!(
                        "no trusted CA certificates found on this system; give tls_config.ca_file"
                    );
                }
            }
        }
        let provider = Arc::new(crate::export::webconfig::provider());
        let versions: &[&'static rustls::SupportedProtocolVersion] = if self.tls.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .context("TLS versions")?
            .with_root_certificates(roots);
        let config = match &self.tls.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let certs = CertificateDer::pem_slice_iter(cert.read()?.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| anyhow::anyhow!("tls_config cert: {e}"))?;
                if certs.is_empty() {
                    bail!("tls_config cert: no PEM certificate in it");
                }
                let key = PrivateKeyDer::from_pem_slice(key.read()?.as_bytes())
                    .map_err(|e| anyhow::anyhow!("tls_config key: no private key ({e})"))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .context("tls_config: the key does not go with the certificate")?
            }
        };
        Ok(LoadedClientConfig {
            authorization,
            tls: Some(Arc::new(config)),
            server_name: self.tls.server_name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<HttpClientConfig> {
        HttpClientConfig::parse(text, Path::new("/etc/overkvm"))
    }

    #[test]
    fn promtool_files_parse() {
        let c = parse(
            "basic_auth:\n  username: prometheus\n  password_file: pw\n\
             tls_config:\n  ca_file: ca.crt\n  cert_file: /c.crt\n  key_file: c.key\n\
             \x20 server_name: prom.example.net\n  min_version: TLS13\n\
             follow_redirects: true\nenable_http2: true\n",
        )
        .unwrap();
        assert_eq!(
            c.auth,
            Some(HttpAuth::Basic {
                username: Source::Inline("prometheus".into()),
                password: Some(Source::File("/etc/overkvm/pw".into())),
            })
        );
        assert_eq!(c.tls.ca, Some(Source::File("/etc/overkvm/ca.crt".into())));
        assert_eq!(
            c.tls.identity,
            Some((
                Source::File("/c.crt".into()),
                Source::File("/etc/overkvm/c.key".into())
            ))
        );
        assert_eq!(c.tls.server_name.as_deref(), Some("prom.example.net"));
        assert!(c.tls.tls13_only);
        let bearer = parse("authorization:\n  credentials: abc\n").unwrap();
        assert_eq!(
            bearer.auth,
            Some(HttpAuth::Header {
                kind: "Bearer".into(),
                credentials: Source::Inline("abc".into())
            })
        );
        assert_eq!(parse("").unwrap(), HttpClientConfig::default());
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("basic_auth:\n  user: a\n", "unknown field `user`"),
            ("tls_config:\n  cafile: a\n", "unknown field `cafile`"),
            ("basic_auth:\n  password: a\n", "missing username"),
            (
                "basic_auth:\n  username: a\n  password: b\n  password_file: c\n",
                "give password or password_file, not both",
            ),
            (
                "basic_auth:\n  username: a\nauthorization:\n  credentials: b\n",
                "not both",
            ),
            (
                "authorization:\n  type: Basic\n  credentials: b\n",
                "use basic_auth",
            ),
            ("proxy_url: http://p:3128\n", "proxy_url is not supported"),
            ("oauth2:\n  client_id: x\n", "oauth2 is not supported"),
            ("bearer_token: x\n", "authorization"),
            ("tls_config:\n  insecure_skip_verify: true\n", "ca_file"),
            ("tls_config:\n  min_version: TLS10\n", "not supported"),
            ("tls_config:\n  cert_file: a\n", "without key_file"),
        ] {
            let e = format!("{:#}", parse(text).expect_err(text));
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    #[test]
    fn secrets_from_files_lose_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("ca.crt"), "not a certificate").unwrap();
        let c = HttpClientConfig::parse(
            "basic_auth:\n  username: prometheus\n  password_file: pw\n",
            dir.path(),
        )
        .unwrap();
        let l = c.load(false).unwrap();
        // base64("prometheus:s3cret")
        assert_eq!(
            l.authorization.as_deref(),
            Some("Basic cHJvbWV0aGV1czpzM2NyZXQ=")
        );
        assert!(!format!("{l:?}").contains("cHJv"));
        let bad_ca = HttpClientConfig::parse("tls_config:\n  ca_file: ca.crt\n", dir.path())
            .unwrap()
            .load(true)
            .unwrap_err();
        assert!(
            format!("{bad_ca:#}").contains("no PEM certificate"),
            "{bad_ca:#}"
        );
    }
}
