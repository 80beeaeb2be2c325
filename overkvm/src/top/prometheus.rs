//! Instant queries against a Prometheus server's HTTP API (`/api/v1/query`), for the fleet
//! view. A plain blocking HTTP/1.0 GET over a TCP stream, or over rustls for `https://`: the
//! server answers without chunking and closes, so no HTTP library is needed. Credentials and
//! TLS settings come from an HTTP client config file ([`super::http_config`]). Parsing is pure
//! and tested without a server.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use anyhow::{Context as _, bail};

use super::http_config::{HttpClientConfig, LoadedClientConfig};

/// Where the Prometheus API is: host, port and an optional path prefix (`--web.route-prefix`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromUrl {
    /// https://
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// "" or "/prefix" (no trailing slash).
    pub prefix: String,
}

impl PromUrl {
    /// Parses `http[s]://HOST[:PORT][/PREFIX]` (port 9090 by default; a bare `HOST:PORT`
    /// too, as http).
    pub fn parse(s: &str) -> anyhow::Result<PromUrl> {
        let t = s.trim();
        let (tls, rest) = match t.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some((scheme, _)) => {
                bail!("{s:?}: only http:// and https:// are supported, not {scheme}://")
            }
            None => (false, t),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            bail!(
                "{s:?}: no user or password in the URL (they would show in `ps`): give them in \
                 an --http.config.file (basic_auth)"
            );
        }
        if authority.is_empty() {
            bail!("{s:?}: expected http[s]://HOST[:PORT][/PREFIX]");
        }
        let (host, port) = match authority.rsplit_once(':') {
            // An IPv6 literal without a port: [::1]
            Some((h, p)) if !p.contains(']') => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .with_context(|| format!("{s:?}: bad port {p:?}"))?,
            ),
            _ => (authority, 9090),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            bail!("{s:?}: no host");
        }
        if path.contains(['?', '#']) {
            bail!("{s:?}: give the server's base URL, without a query");
        }
        Ok(PromUrl {
            tls,
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

impl std::fmt::Display for PromUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.prefix)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.prefix)
        }
    }
}

/// One series of an instant vector: its labels and value (finite values only).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// A label's value, "" when the series does not have it.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Responses larger than this are refused (a fleet of 100,000 VM rows is ~30 MB of JSON).
const MAX_RESPONSE: u64 = 256 << 20;

/// A client for one Prometheus server.
#[derive(Clone, Debug)]
pub struct Client {
    pub url: PromUrl,
    pub timeout: Duration,
    /// Credentials and TLS settings (None: plain HTTP without credentials).
    config: Option<LoadedClientConfig>,
}

impl Client {
    /// A client without credentials (https:// URLs trust the system's CAs).
    pub fn new(url: PromUrl) -> Client {
        Client {
            url,
            timeout: Duration::from_secs(10),
            config: None,
        }
    }

    /// A client for `url` with the HTTP client config file, if any (`--http.config.file`).
    pub fn with_config(url: &str, config: Option<&std::path::Path>) -> anyhow::Result<Client> {
        let url = PromUrl::parse(url)?;
        let settings = config
            .map(HttpClientConfig::read)
            .transpose()?
            .unwrap_or_default();
        if !url.tls && settings.tls != Default::default() {
            bail!("{url}: the HTTP client config has tls_config, but the URL is not https://");
        }
        let loaded = settings.load(url.tls).with_context(|| match config {
            Some(p) => format!("loading what {} names", p.display()),
            None => "loading the system's CA certificates".into(),
        })?;
        Ok(Client {
            url,
            timeout: Duration::from_secs(10),
            config: Some(loaded),
        })
    }

    /// Runs an instant query; the series of the resulting vector (NaN and infinite values,
    /// such as a mean over no operations, are left out).
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let target = format!(
            "{}/api/v1/query?query={}",
            self.url.prefix,
            urlencode(promql)
        );
        let body = self
            .get(&target)
            .with_context(|| format!("querying {} for {promql}", self.url))?;
        parse_vector(&body).with_context(|| format!("the answer of {} to {promql}", self.url))
    }

    fn get(&self, target: &str) -> anyhow::Result<String> {
        let addr = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.url.host))?
            .next()
            .with_context(|| format!("{} has no address", self.url.host))?;
        let s = TcpStream::connect_timeout(&addr, self.timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(self.timeout))?;
        s.set_write_timeout(Some(self.timeout))?;
        let host = if self.url.host.contains(':') {
            format!("[{}]", self.url.host)
        } else {
            self.url.host.clone()
        };
        let authorization = self
            .config
            .as_ref()
            .and_then(|c| c.authorization.as_ref())
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {target} HTTP/1.0\r\nHost: {host}:{}\r\nAccept: application/json\r\n\
             User-Agent: overkvm-io/{}\r\n{authorization}\r\n",
            self.url.port,
            env!("CARGO_PKG_VERSION")
        );
        let raw = if self.url.tls {
            self.exchange_tls(s, request.as_bytes())?
        } else {
            exchange(s, request.as_bytes())?
        };
        if raw.len() as u64 > MAX_RESPONSE {
            bail!("the answer is larger than {} MiB", MAX_RESPONSE >> 20);
        }
        let (status, body) = split_response(&raw)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if status != 200 {
            // The API explains a bad query in its JSON error; show that rather than the code.
            let why = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| body.chars().take(200).collect());
            bail!("HTTP {status}: {why}");
        }
        Ok(body)
    }
}

impl Client {
    /// The request over TLS; the whole answer.
    fn exchange_tls(&self, tcp: TcpStream, request: &[u8]) -> anyhow::Result<Vec<u8>> {
        let loaded;
        let config = match &self.config {
            Some(c) if c.tls.is_some() => c,
            _ => {
                loaded = HttpClientConfig::default().load(true)?;
                &loaded
            }
        };
        let tls_config = config.tls.clone().context("no TLS configuration")?;
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| self.url.host.clone());
        let server_name = rustls::pki_types::ServerName::try_from(name.clone())
            .with_context(|| format!("{name:?} is not a valid server name"))?;
        let conn =
            rustls::ClientConnection::new(tls_config, server_name).context("starting TLS")?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(request)
            .context("the TLS handshake or sending the request")?;
        let mut raw = Vec::new();
        match tls.take(MAX_RESPONSE + 1).read_to_end(&mut raw) {
            Ok(_) => {}
            // A server that closes without a TLS close_notify: what arrived is checked by the
            // HTTP and JSON parsers (a cut answer does not parse).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e).context("reading the answer"),
        }
        Ok(raw)
    }
}

/// The request over plain TCP; the whole answer.
fn exchange(mut s: TcpStream, request: &[u8]) -> anyhow::Result<Vec<u8>> {
    s.write_all(request).context("sending the request")?;
    let mut raw = Vec::new();
    s.take(MAX_RESPONSE + 1)
        .read_to_end(&mut raw)
        .context("reading the answer")?;
    Ok(raw)
}

/// The status code and body of a raw HTTP/1.x response (de-chunked when chunked).
pub fn split_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no complete HTTP header in the answer")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("not an HTTP answer: {:?}", head.lines().next()))?;
    let body = &raw[end + 4..];
    let chunked = head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    Ok((
        status,
        if chunked {
            dechunk(body)?
        } else {
            body.to_vec()
        },
    ))
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).context("truncated chunk")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).context("truncated chunk")?;
    }
}

/// The series of an instant-vector answer (`{"status":"success","data":{"resultType":
/// "vector","result":[{"metric":{..},"value":[ts,"1.5"]}]}}`); non-finite values left out.
pub fn parse_vector(body: &str) -> anyhow::Result<Vec<Sample>> {
    let v: serde_json::Value = serde_json::from_str(body).context("not JSON")?;
    if v["status"] != "success" {
        bail!(
            "status {}: {}",
            v["status"],
            v["error"].as_str().unwrap_or("no error text")
        );
    }
    let data = &v["data"];
    match data["resultType"].as_str() {
        Some("vector") => {}
        Some(other) => bail!("expected an instant vector, got a {other}"),
        None => bail!("no resultType in the answer"),
    }
    let result = data["result"].as_array().context("no result array")?;
    let mut out = Vec::with_capacity(result.len());
    for series in result {
        let value = series["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .context("a series without a value")?;
        if !value.is_finite() {
            continue;
        }
        let labels = series["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Sample { labels, value });
    }
    Ok(out)
}

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b));
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = PromUrl::parse("http://127.0.0.1:9091").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 9091, "")
        );
        let u = PromUrl::parse("prom.example.net/prometheus/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("prom.example.net", 9090, "/prometheus")
        );
        assert_eq!(u.to_string(), "http://prom.example.net:9090/prometheus");
        let u = PromUrl::parse("http://[::1]:9090").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9090));
        assert_eq!(u.to_string(), "http://[::1]:9090");
        assert_eq!(PromUrl::parse("http://[::1]").unwrap().port, 9090);
        let u = PromUrl::parse("https://prom.example.net/p").unwrap();
        assert!(u.tls);
        assert_eq!(u.to_string(), "https://prom.example.net:9090/p");
        for bad in [
            "ftp://x",
            "http://",
            "http://:9090",
            "http://x:0",
            "http://x:99999",
            "http://x:port",
            "http://u:p@x:9090",
            "http://x:9090/api?q=1",
            "",
        ] {
            assert!(PromUrl::parse(bad).is_err(), "{bad}");
        }
        let e = PromUrl::parse("ftp://x").unwrap_err().to_string();
        assert!(e.contains("only http:// and https://"), "{e}");
        let e = PromUrl::parse("https://u:p@x").unwrap_err().to_string();
        assert!(e.contains("--http.config.file"), "{e}");
    }

    #[test]
    fn vectors() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"instance":"h1:9746","vm":"web01"},"value":[1700000000.5,"12.5"]},
            {"metric":{"instance":"h2:9746"},"value":[1700000000.5,"NaN"]},
            {"metric":{},"value":[1700000000.5,"+Inf"]},
            {"metric":{"vm":"db"},"value":[1700000000.5,"0"]}]}}"#;
        let v = parse_vector(body).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].label("vm"), "web01");
        assert_eq!(v[0].label("device"), "");
        assert_eq!(v[0].value, 12.5);
        assert_eq!(v[1].value, 0.0);
        let err =
            parse_vector(r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#)
                .unwrap_err();
        assert!(err.to_string().contains("parse error"), "{err}");
        assert!(
            parse_vector(r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#)
                .is_err()
        );
        for bad in ["", "{", "[]", r#"{"status":"success"}"#] {
            assert!(parse_vector(bad).is_err(), "{bad}");
        }
        let no_value =
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}"#;
        assert!(parse_vector(no_value).is_err());
    }

    #[test]
    fn responses_plain_and_chunked() {
        let (status, body) =
            split_response(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{}").unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"{}"[..]));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n";
        let (_, body) = split_response(raw).unwrap();
        assert_eq!(body, b"{\"a\":1}");
        let (status, _) = split_response(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        assert_eq!(status, 400);
        for bad in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort",
        ] {
            assert!(split_response(bad).is_err(), "{bad:?}");
        }
    }

    // Prometheus's answers (and whatever answers in its place) are not under our control:
    // any bytes must give a value or an error, never a panic.
    proptest::proptest! {
        #[test]
        fn hostile_answers_never_panic(raw in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::any::<u8>(),
                proptest::strategy::Just(b'\r'),
                proptest::strategy::Just(b'\n'),
                proptest::strategy::Just(b'0'),
                proptest::strategy::Just(b';'),
            ],
            0..256,
        )) {
            let mut response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            response.extend_from_slice(&raw);
            let _ = split_response(&response);
            let _ = split_response(&raw);
            let _ = parse_vector(&String::from_utf8_lossy(&raw));
            let _ = PromUrl::parse(&String::from_utf8_lossy(&raw));
        }

        #[test]
        fn any_vector_shape_parses_or_fails_cleanly(
            value in "[-+0-9.eEaINnf]{0,12}",
            label in "\\PC{0,16}",
        ) {
            let body = serde_json::json!({
                "status": "success",
                "data": {"resultType": "vector", "result": [
                    {"metric": {"vm": label}, "value": [1.0, value]}
                ]}
            });
            if let Ok(v) = parse_vector(&body.to_string()) {
                proptest::prop_assert!(v.iter().all(|s| s.value.is_finite()));
            }
        }
    }

    #[test]
    fn encoding() {
        assert_eq!(
            urlencode("sum by (vm) (rate(x{a=\"b\"}[1m]))"),
            "sum%20by%20%28vm%29%20%28rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%29"
        );
    }
}
