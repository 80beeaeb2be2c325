//! The `/metrics` endpoint: axum over a listener that bounds what a client can hold.
//!
//! A scrape clones the text rendered at the last tick and writes it; nothing on this path
//! waits for the sampler, and no lock is held while a response is written. Slow or hostile
//! clients are bounded at the connection level (tower middleware is not a dependency):
//!
//! - at most `max_connections` at once; a connection over the cap is answered `503` and closed
//!   at once (counted), so a flood neither queues behind the clients already served nor holds
//!   file descriptors;
//! - a request must arrive whole within `request_timeout` of its first byte (a new connection:
//!   of its opening) and fit in `max_request_bytes`;
//! - a response must be read within `response_timeout` of its first byte, so a client reading
//!   one byte a second cannot hold a slot for a large exposition;
//! - a connection that makes no progress for `idle_timeout` is closed (keep-alive between
//!   scrapes).
//!
//! With `--web.config.file` ([`super::webconfig`]) the same listener speaks TLS (the handshake
//! runs inside the connection's stream, under the same deadlines, so a slow handshake holds
//! up nobody else) and every request passes [`Gate`]: basic authentication, then the
//! configured response headers. Failed attempts (a wrong password, a failed handshake) are
//! limited per client address ([`super::auth::FailureLimiter`]), logged and counted.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::{ConnectInfo, Request, State},
    http::{
        HeaderMap, HeaderValue, StatusCode,
        header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, VARY, WWW_AUTHENTICATE},
    },
    middleware::Next,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

use super::{
    Exporter,
    auth::{Credentials, FAILURE_REFILL, FailureLimiter, FailureVerdict},
    webconfig::WebConfigWatcher,
};

/// Content type of the OpenMetrics exposition (what Prometheus asks for).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic text format (curl, browsers, promtool).
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of Prometheus's protobuf format, which Prometheus asks for first when native
/// histograms are on (`--enable-feature=native-histograms`).
pub const PROTOBUF: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// What a connection over the cap gets before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: text/plain; charset=utf-8\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 34\r\n\
\r\n\
too many connections to /metrics\r\n";

/// Bounds on what clients may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// From the first byte of a request (or the opening of a connection) to the end of the
    /// request.
    pub request_timeout: Duration,
    /// From the first byte of a response to its last.
    pub response_timeout: Duration,
    /// Without a byte read or written (keep-alive between scrapes, or a client not reading).
    pub idle_timeout: Duration,
    /// Header and body of one request.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Prometheus needs one per server; 256 with a few KiB each stays far below the
            // default 1024 open files even with every slot taken.
            max_connections: 256,
            request_timeout: Duration::from_secs(10),
            // A 1000-VM exposition (about 1 MiB) at 35 KiB/s.
            response_timeout: Duration::from_secs(30),
            // Longer than the usual scrape intervals, so Prometheus keeps its connection.
            idle_timeout: Duration::from_secs(120),
            max_request_bytes: 16 << 10,
        }
    }
}

/// What the endpoint counts about its clients, for the exporter's self-metrics.
#[derive(Debug, Default)]
pub struct HttpStats {
    open: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    oversized: AtomicU64,
    /// A web config is in force (the authentication series are exported).
    secured: AtomicBool,
    no_credentials: AtomicU64,
    bad_credentials: AtomicU64,
    tls_handshake: AtomicU64,
    rate_limited: AtomicU64,
    pub(super) reloads_ok: AtomicU64,
    pub(super) reloads_failed: AtomicU64,
}

/// A reading of [`HttpStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpCounts {
    /// Connections open now.
    pub open: u64,
    /// Connections refused at the cap since start.
    pub refused: u64,
    /// Connections closed for being too slow with a request or a response.
    pub timed_out: u64,
    /// Connections closed for a request over the size limit.
    pub oversized: u64,
    /// A web config is in force.
    pub secured: bool,
    /// Requests without credentials (answered 401).
    pub no_credentials: u64,
    /// Requests with a wrong user name or password (401).
    pub bad_credentials: u64,
    /// TLS handshakes that failed (an unknown client certificate, a client speaking HTTP).
    pub tls_handshake: u64,
    /// Requests (429) and connections (closed) refused after too many failures.
    pub rate_limited: u64,
    /// Web config reloads.
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

impl HttpStats {
    pub fn counts(&self) -> HttpCounts {
        HttpCounts {
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            oversized: self.oversized.load(Ordering::Relaxed),
            secured: self.secured.load(Ordering::Relaxed),
            no_credentials: self.no_credentials.load(Ordering::Relaxed),
            bad_credentials: self.bad_credentials.load(Ordering::Relaxed),
            tls_handshake: self.tls_handshake.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            reloads_ok: self.reloads_ok.load(Ordering::Relaxed),
            reloads_failed: self.reloads_failed.load(Ordering::Relaxed),
        }
    }
}

pub(super) async fn serve(
    exporter: Arc<Exporter>,
    listener: TcpListener,
    limits: Limits,
    web: Option<Arc<WebConfigWatcher>>,
) -> anyhow::Result<()> {
    let stats = exporter.http.clone();
    stats.secured.store(web.is_some(), Ordering::Relaxed);
    let gate = Arc::new(Gate {
        web,
        limiter: Mutex::new(FailureLimiter::default()),
        stats: stats.clone(),
    });
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(exporter)
        .layer(axum::middleware::from_fn_with_state(gate.clone(), guard));
    let listener = GuardedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        stats,
        gate,
    };
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .await
        .context("serving /metrics")
}

/// The client's address, for the handlers.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Who may connect and read: the web configuration in force and the failed-attempt limiter.
pub(super) struct Gate {
    web: Option<Arc<WebConfigWatcher>>,
    limiter: Mutex<FailureLimiter>,
    stats: Arc<HttpStats>,
}

impl Gate {
    fn allows(&self, ip: IpAddr) -> bool {
        super::lock(&self.limiter).allows(ip, Instant::now().into_std())
    }

    /// Records, logs (unless the client is already refused) and counts a failed attempt.
    fn failed(&self, ip: IpAddr, what: std::fmt::Arguments<'_>) {
        match super::lock(&self.limiter).failed(ip, Instant::now().into_std()) {
            FailureVerdict::Log => log::warn!("metrics endpoint: {what} from {ip}"),
            FailureVerdict::NowLimited => log::warn!(
                "metrics endpoint: {what} from {ip}; too many failures from {ip}: refused \
                 for now, one more attempt every {}s",
                FAILURE_REFILL.as_secs()
            ),
        }
    }

    fn limited(&self) {
        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
    }
}

/// Basic authentication when configured, then the configured response headers.
async fn guard(
    State(gate): State<Arc<Gate>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let Some(web) = gate.web.as_ref().map(|w| w.current(&gate.stats)) else {
        return next.run(request).await;
    };
    let mut response = match web.auth.clone() {
        None => next.run(request).await,
        Some(_) if !gate.allows(peer.ip()) => {
            gate.limited();
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed attempts: try again later\n",
            )
                .into_response();
            let wait = HeaderValue::from(FAILURE_REFILL.as_secs());
            r.headers_mut().insert(RETRY_AFTER, wait);
            r
        }
        Some(auth) => {
            let header = request
                .headers()
                .get(AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec());
            let user = header
                .as_deref()
                .and_then(super::auth::parse_basic)
                .map(|(u, _)| u);
            // bcrypt takes tens of milliseconds of CPU: off the connection's thread.
            let verdict = tokio::task::spawn_blocking(move || auth.check(header.as_deref()))
                .await
                .unwrap_or(Credentials::Invalid);
            match verdict {
                Credentials::Valid => next.run(request).await,
                Credentials::Missing => {
                    gate.stats.no_credentials.fetch_add(1, Ordering::Relaxed);
                    unauthorized()
                }
                Credentials::Invalid => {
                    gate.stats.bad_credentials.fetch_add(1, Ordering::Relaxed);
                    match user {
                        Some(u) => gate.failed(
                            peer.ip(),
                            format_args!("wrong user name or password (user {u:?})"),
                        ),
                        None => gate.failed(
                            peer.ip(),
                            format_args!("an Authorization header that is not Basic"),
                        ),
                    }
                    unauthorized()
                }
            }
        }
    };
    for (name, value) in &web.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(WWW_AUTHENTICATE, "Basic realm=\"overkvm\"")],
        "unauthorized\n",
    )
        .into_response()
}

async fn metrics(State(exporter): State<Arc<Exporter>>, headers: HeaderMap) -> Response {
    let page = exporter.published();
    let accept = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let (content_type, body) = match negotiate(accept) {
        Format::Protobuf => match exporter.protobuf(&page) {
            Some(body) => (PROTOBUF, body),
            None => (OPENMETRICS, exporter.openmetrics(&page)),
        },
        Format::OpenMetrics => (OPENMETRICS, exporter.openmetrics(&page)),
        Format::Text => (TEXT, exporter.text(&page)),
    };
    ([(CONTENT_TYPE, content_type), (VARY, "Accept")], body).into_response()
}

/// The formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Protobuf,
    OpenMetrics,
    Text,
}

/// The format for an Accept header: the listed one of highest quality among protobuf
/// (delimited `io.prometheus.client.MetricFamily` only) and OpenMetrics, protobuf on a tie;
/// the classic text format when neither is listed with a quality above 0.
fn negotiate<'a>(values: impl Iterator<Item = &'a str>) -> Format {
    let mut best: Option<(f64, Format)> = None;
    for range in values.flat_map(|v| v.split(',')) {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let mut q = 1.0;
        let (mut proto, mut delimited) = (false, false);
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim().to_ascii_lowercase().as_str() {
                "q" => q = v.parse::<f64>().unwrap_or(0.0),
                "proto" => proto = v == "io.prometheus.client.MetricFamily",
                "encoding" => delimited = v == "delimited",
                _ => {}
            }
        }
        let format = if media.eq_ignore_ascii_case("application/openmetrics-text") {
            Format::OpenMetrics
        } else if media.eq_ignore_ascii_case("application/vnd.google.protobuf")
            && proto
            && delimited
        {
            Format::Protobuf
        } else {
            continue;
        };
        let better = match best {
            None => true,
            Some((bq, bf)) => q > bq || (q == bq && format == Format::Protobuf && bf != format),
        };
        if q > 0.0 && better {
            best = Some((q, format));
        }
    }
    best.map_or(Format::Text, |(_, f)| f)
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: metrics are at /metrics\n",
    )
}

/// Accepts every connection; serves those that get one of `max_connections` slots and refuses
/// the others at once.
struct GuardedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    limits: Limits,
    stats: Arc<HttpStats>,
    gate: Arc<Gate>,
}

/// Answers a connection over the cap without waiting for anything: what already arrived of
/// its request is read (so closing does not reset the connection before the answer is read),
/// the 503 is written if the socket takes it, and the socket is closed.
fn refuse(stream: TcpStream) {
    let mut sink = [0u8; 2048];
    let _ = stream.try_read(&mut sink);
    let _ = stream.try_write(REFUSAL);
}

impl axum::serve::Listener for GuardedListener {
    type Io = EndpointStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (EndpointStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let tls = self
                            .gate
                            .web
                            .as_ref()
                            .and_then(|w| w.current(&self.stats).tls.clone());
                        if tls.is_some() && !self.gate.allows(addr.ip()) {
                            // Refused before any handshake work; closing says enough.
                            self.gate.limited();
                            continue;
                        }
                        let _ = stream.set_nodelay(true);
                        let s = GuardedStream::new(stream, slot, self.limits, self.stats.clone());
                        let conn = match tls {
                            None => Conn::Plain(s),
                            Some(config) => Conn::Handshake(Box::new(
                                tokio_rustls::TlsAcceptor::from(config).accept(s),
                            )),
                        };
                        let s = EndpointStream {
                            conn,
                            peer: addr.ip(),
                            gate: self.gate.clone(),
                        };
                        return (s, addr);
                    }
                    Err(_) => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                        refuse(stream);
                    }
                },
                Err(e) => {
                    // Out of file descriptors, or a connection reset before accept: wait a
                    // little rather than spin.
                    log::warn!("accepting a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A client connection as the HTTP server sees it: plain, or TLS (the handshake is driven by
/// the first read or write, so it runs in the connection's own task).
pub(super) struct EndpointStream {
    conn: Conn,
    peer: IpAddr,
    gate: Arc<Gate>,
}

enum Conn {
    Plain(GuardedStream),
    Handshake(Box<tokio_rustls::Accept<GuardedStream>>),
    Tls(Box<tokio_rustls::server::TlsStream<GuardedStream>>),
    /// The handshake failed (already reported to the server).
    Failed,
}

impl EndpointStream {
    /// Finishes the TLS handshake if one is under way.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Conn::Handshake(accept) = &mut self.conn {
            match Pin::new(accept.as_mut()).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(tls)) => self.conn = Conn::Tls(Box::new(tls)),
                Poll::Ready(Err(e)) => {
                    self.conn = Conn::Failed;
                    // rustls's own errors (an unknown certificate, not TLS at all) count as
                    // failed attempts; a client that just went away or was too slow does not.
                    if e.kind() == io::ErrorKind::InvalidData {
                        self.gate
                            .stats
                            .tls_handshake
                            .fetch_add(1, Ordering::Relaxed);
                        self.gate
                            .failed(self.peer, format_args!("TLS handshake failed ({e})"));
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn handshake_failed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
}

impl AsyncRead for EndpointStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_handshake(cx))?;
        match &mut this.conn {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Handshake(_) | Conn::Failed => Poll::Ready(Err(handshake_failed())),
        }
    }
}

impl AsyncWrite for EndpointStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_handshake(cx))?;
        match &mut this.conn {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Handshake(_) | Conn::Failed => Poll::Ready(Err(handshake_failed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_handshake(cx))?;
        match &mut this.conn {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Handshake(_) | Conn::Failed => Poll::Ready(Err(handshake_failed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.conn {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
            Conn::Handshake(_) | Conn::Failed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_handshake(cx))?;
        match &mut this.conn {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Handshake(_) | Conn::Failed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.conn {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Handshake(_) | Conn::Failed => Poll::Ready(Ok(())),
        }
    }
}

/// The instant a connection waiting on its client gives up: no progress by `idle_at`, a request
/// on its way by its deadline, a response the client does not read by its deadline.
fn give_up_at(
    idle_at: Instant,
    request_by: Option<Instant>,
    response_by: Option<Instant>,
) -> Instant {
    [request_by, response_by]
        .into_iter()
        .flatten()
        .fold(idle_at, Instant::min)
}

/// A client connection with deadlines. hyper only reads when it waits for a request (or
/// checks for a close) and only writes responses, so "bytes read since the last write" is the
/// request being received and "bytes written since the last read" the response being sent.
struct GuardedStream {
    inner: TcpStream,
    limits: Limits,
    stats: Arc<HttpStats>,
    /// Armed at the deadline of whatever is pending.
    deadline: Pin<Box<Sleep>>,
    /// Closed unless a byte moves by then.
    idle_at: Instant,
    /// Bytes of the request being received and when it must be complete; None between
    /// requests.
    request: Option<(usize, Instant)>,
    /// When the response being sent must be written; None until its first byte.
    response_by: Option<Instant>,
    /// The last write could not go through: the client is not reading.
    write_blocked: bool,
    /// The connection was already counted as dropped.
    counted: bool,
    _slot: OwnedSemaphorePermit,
}

impl GuardedStream {
    fn new(
        inner: TcpStream,
        slot: OwnedSemaphorePermit,
        limits: Limits,
        stats: Arc<HttpStats>,
    ) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        // A new connection is a request on its way: it gets the request deadline, not the
        // keep-alive one, so a client that connects and says nothing is gone quickly.
        let request_by = now + limits.request_timeout;
        GuardedStream {
            inner,
            limits,
            stats,
            deadline: Box::pin(tokio::time::sleep_until(request_by)),
            idle_at: now + limits.idle_timeout,
            request: Some((0, request_by)),
            response_by: None,
            write_blocked: false,
            counted: false,
            _slot: slot,
        }
    }

    fn on_read(&mut self, n: usize) -> io::Result<()> {
        let now = Instant::now();
        let timeout = self.limits.request_timeout;
        let request = self.request.get_or_insert_with(|| (0, now + timeout));
        request.0 += n;
        self.response_by = None;
        self.idle_at = now + self.limits.idle_timeout;
        if request.0 > self.limits.max_request_bytes {
            self.count_drop(|s| &s.oversized);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "request larger than {} bytes",
                    self.limits.max_request_bytes
                ),
            ));
        }
        Ok(())
    }

    fn on_write(&mut self) {
        let now = Instant::now();
        self.request = None;
        self.response_by
            .get_or_insert(now + self.limits.response_timeout);
        self.idle_at = now + self.limits.idle_timeout;
    }

    /// Counts the connection as dropped for one reason (once, whatever happens next).
    fn count_drop(&mut self, counter: fn(&HttpStats) -> &AtomicU64) {
        if !self.counted {
            self.counted = true;
            counter(&self.stats).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bookkeeping after a write attempt: written bytes start the response deadline, and while
    /// a write is blocked on the client that deadline applies (see `pending`).
    fn after_write(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                self.write_blocked = false;
                if n > 0 {
                    self.on_write();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.write_blocked = true;
                self.pending(cx)
            }
        }
    }

    /// The inner operation is pending: fail it if the connection's deadline has passed, else
    /// wake the task at that deadline. One deadline for reads and writes alike: hyper polls
    /// both in one task (it reads to notice a close while it writes).
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let request_by = self.request.map(|(_, by)| by);
        let response_by = self.response_by.filter(|_| self.write_blocked);
        let at = give_up_at(self.idle_at, request_by, response_by);
        if self.deadline.deadline() != at {
            self.deadline.as_mut().reset(at);
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                // A quiet keep-alive connection timing out is normal; a client stuck in the
                // middle of a request or a response is counted.
                if request_by.is_some() || response_by.is_some() {
                    self.count_drop(|s| &s.timed_out);
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "metrics client too slow",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.on_read(n)?;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::TcpStream as StdStream,
        time::Instant as StdInstant,
    };

    use super::*;
    use crate::export::{
        ExportOptions,
        totals::tests::{FakeProcs, row, tick},
    };

    fn exporter() -> Arc<Exporter> {
        let e = Arc::new(Exporter::new(ExportOptions {
            per_process: false,
            per_process_cap: 10,
            grace: Duration::from_secs(60),
            latency_buckets: crate::export::latency::LatencyBuckets::Compact,
            max_vms: crate::export::DEFAULT_MAX_VMS,
        }));
        let procs = FakeProcs::default();
        procs.start(100, 1);
        let t = tick(
            std::time::Instant::now(),
            vec![row(100, Some("web"), "vda", 5, 2)],
        );
        e.update_with(&t, &procs);
        e
    }

    async fn start(limits: Limits) -> SocketAddr {
        start_with(exporter(), limits).await
    }

    async fn start_with(exporter: Arc<Exporter>, limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(exporter, listener, limits, None));
        addr
    }

    /// One request on a fresh connection (blocking client); the whole response as text.
    fn get_blocking(addr: SocketAddr, path: &str, accept: Option<&str>) -> String {
        let mut s = StdStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    }

    async fn get(addr: SocketAddr, path: &'static str, accept: Option<&'static str>) -> String {
        tokio::task::spawn_blocking(move || get_blocking(addr, path, accept))
            .await
            .expect("client thread")
    }

    fn short() -> Limits {
        Limits {
            max_connections: 64,
            request_timeout: Duration::from_millis(300),
            response_timeout: Duration::from_millis(600),
            idle_timeout: Duration::from_millis(900),
            max_request_bytes: 4096,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn content_is_negotiated() {
        let addr = start(short()).await;
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let om = get(addr, "/metrics", Some(prom)).await;
        assert!(om.starts_with("HTTP/1.1 200"), "{om}");
        assert!(om.contains(&format!("content-type: {OPENMETRICS}")), "{om}");
        assert!(
            om.contains(r#"overkvm_vm_io_operations_total{vm="web",device="vda",op="read"} 5"#)
        );
        assert!(om.ends_with("# EOF\n"));
        let text = get(addr, "/metrics", None).await;
        assert!(text.contains(&format!("content-type: {TEXT}")), "{text}");
        assert!(text.contains("# TYPE overkvm_vm_io_operations_total counter"));
        assert!(!text.contains("# EOF"));
        let refused = get(addr, "/metrics", Some("application/openmetrics-text;q=0")).await;
        assert!(refused.contains(&format!("content-type: {TEXT}")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_paths_are_404() {
        let addr = start(short()).await;
        assert!(get(addr, "/", None).await.starts_with("HTTP/1.1 404"));
        assert!(
            get(addr, "/metrics/x", None)
                .await
                .starts_with("HTTP/1.1 404")
        );
    }

    /// Reads until the server closes the connection; what it sent and how long that took.
    fn wait_closed(s: &mut StdStream) -> (Vec<u8>, Duration) {
        let started = StdInstant::now();
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (out, started.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_never_completes_is_dropped() {
        let addr = start(short()).await;
        let (sent, took) = tokio::task::spawn_blocking(move || {
            let mut s = StdStream::connect(addr).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .expect("write");
            // Trickle header lines: progress must not extend the request deadline.
            let mut w = s.try_clone().expect("clone");
            std::thread::spawn(move || {
                for _ in 0..100 {
                    std::thread::sleep(Duration::from_millis(50));
                    if w.write_all(b"X-A: b\r\n").is_err() {
                        break;
                    }
                }
            });
            wait_closed(&mut s)
        })
        .await
        .expect("client thread");
        assert!(sent.is_empty(), "answered an incomplete request");
        assert!(took < Duration::from_millis(900), "closed after {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_connection_is_closed_and_oversized_requests_refused() {
        let e = exporter();
        let addr = start_with(e.clone(), short()).await;
        let (silent, idle, oversized) = tokio::task::spawn_blocking(move || {
            // A client that connects and says nothing has the request deadline.
            let mut silent = StdStream::connect(addr).expect("connect");
            let silent = wait_closed(&mut silent);
            // One that scraped and keeps the connection has the idle one.
            let mut idle = StdStream::connect(addr).expect("connect");
            idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let idle = wait_closed(&mut idle);
            let mut big = StdStream::connect(addr).expect("connect");
            let mut req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
            for i in 0..400 {
                req.extend_from_slice(format!("X-Filler-{i}: aaaaaaaaaaaaaaaa\r\n").as_bytes());
            }
            req.extend_from_slice(b"\r\n");
            let _ = big.write_all(&req);
            (silent, idle, wait_closed(&mut big))
        })
        .await
        .expect("client thread");
        assert!(silent.0.is_empty());
        assert!(
            silent.1 >= Duration::from_millis(250) && silent.1 < Duration::from_millis(800),
            "silent connection closed after {:?}",
            silent.1
        );
        assert!(idle.0.starts_with(b"HTTP/1.1 200"));
        assert!(
            idle.1 >= Duration::from_millis(800) && idle.1 < Duration::from_secs(3),
            "idle connection closed after {:?}",
            idle.1
        );
        assert!(
            !oversized.0.starts_with(b"HTTP/1.1 200"),
            "served an oversized request"
        );
        let c = e.http.counts();
        assert_eq!((c.timed_out, c.oversized), (1, 1), "{c:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_over_the_cap_are_refused_at_once_and_counted() {
        let e = exporter();
        let addr = start_with(
            e.clone(),
            Limits {
                max_connections: 4,
                request_timeout: Duration::from_secs(30),
                ..short()
            },
        )
        .await;
        let (refusals, took) = tokio::task::spawn_blocking(move || {
            let mut held = Vec::new();
            for _ in 0..4 {
                let mut s = StdStream::connect(addr).expect("connect");
                s.write_all(b"GET /metrics HTTP/1.1\r\n").expect("write");
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(100));
            let started = StdInstant::now();
            let refusals: Vec<Vec<u8>> = (0..10)
                .map(|_| {
                    let mut s = StdStream::connect(addr).expect("connect");
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
                    wait_closed(&mut s).0
                })
                .collect();
            let took = started.elapsed();
            drop(held);
            (refusals, took)
        })
        .await
        .expect("client thread");
        for r in &refusals {
            let r = String::from_utf8_lossy(r);
            assert!(r.is_empty() || r.starts_with("HTTP/1.1 503"), "{r}");
        }
        assert!(refusals.iter().any(|r| r.starts_with(b"HTTP/1.1 503")));
        assert!(took < Duration::from_secs(2), "refusing took {took:?}");
        assert_eq!(e.http.counts().refused, 10);
        // The held connections are gone: the endpoint serves again.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            get(addr, "/metrics", None)
                .await
                .starts_with("HTTP/1.1 200")
        );
        // Every slot comes back once its connection is gone.
        for _ in 0..50 {
            if e.http.counts().open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(e.http.counts().open, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_does_not_read_its_response_is_dropped() {
        // An exposition far larger than what the socket buffers of both sides hold.
        let e = Arc::new(Exporter::new(ExportOptions {
            per_process: false,
            per_process_cap: 10,
            grace: Duration::from_secs(60),
            latency_buckets: crate::export::latency::LatencyBuckets::Full,
            max_vms: usize::MAX,
        }));
        let procs = FakeProcs::default();
        let mut rows = Vec::new();
        for i in 0..3000 {
            procs.start(1000 + i, 1);
            for dev in ["vda", "vdb"] {
                rows.push(row(1000 + i, Some(&format!("vm-{i:05}")), dev, 5, 2));
            }
        }
        e.update_with(&tick(std::time::Instant::now(), rows), &procs);
        let size = e.text(&e.published()).len();
        let addr = start_with(e.clone(), short()).await;
        let (got, took) = tokio::task::spawn_blocking(move || {
            let mut s = StdStream::connect(addr).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let started = StdInstant::now();
            std::thread::sleep(Duration::from_millis(1500));
            let (got, _) = wait_closed(&mut s);
            (got.len(), started.elapsed())
        })
        .await
        .expect("client thread");
        assert!(got < size, "read {got} of {size} bytes");
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert_eq!(e.http.counts().timed_out, 1);
    }

    #[test]
    fn the_nearest_deadline_applies() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(give_up_at(t + 9 * s, None, None), t + 9 * s);
        assert_eq!(give_up_at(t + 9 * s, Some(t + 2 * s), None), t + 2 * s);
        assert_eq!(give_up_at(t + 9 * s, None, Some(t + 3 * s)), t + 3 * s);
        assert_eq!(give_up_at(t + s, Some(t + 2 * s), Some(t + 3 * s)), t + s);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_clients_do_not_delay_scrapes() {
        let addr = start(Limits {
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            ..short()
        })
        .await;
        let elapsed = tokio::task::spawn_blocking(move || {
            let mut stalled = Vec::new();
            for _ in 0..32 {
                let mut s = StdStream::connect(addr).expect("connect");
                s.write_all(b"GET /metrics HTTP/1.1\r\n").expect("write");
                stalled.push(s);
            }
            let started = StdInstant::now();
            let scrapes: Vec<_> = (0..16)
                .map(|_| std::thread::spawn(move || get_blocking(addr, "/metrics", None)))
                .collect();
            for s in scrapes {
                let r = s.join().expect("scrape thread");
                assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            }
            started.elapsed()
        })
        .await
        .expect("client thread");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    /// One request over TLS, with an optional client certificate and Authorization header:
    /// the whole response, or the error of the handshake or the exchange.
    async fn tls_get(
        addr: SocketAddr,
        ca: &str,
        client: Option<&(String, String)>,
        authorization: Option<&str>,
    ) -> io::Result<String> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            crate::export::webconfig::provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let auth = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_client_certificates_and_basic_auth() {
        use crate::export::webconfig::{WebConfigWatcher, testpki};
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let ca = testpki::Ca::new("clients and server");
        testpki::write_server(dir.path(), &ca);
        let hash = bcrypt::hash("right", 4).unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(
            &path,
            format!(
                "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
                 \x20 client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n\
                 http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n\
                 basic_auth_users:\n  prometheus: '{hash}'\n"
            ),
        )
        .unwrap();
        let web = Arc::new(WebConfigWatcher::new(&path).unwrap());
        let e = exporter();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(e.clone(), listener, short(), Some(web)));
        let client = ca.issue(&["prometheus"]);
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        let ok = tls_get(
            addr,
            &ca.pem,
            Some(&client),
            Some(&basic("prometheus", "right")),
        )
        .await
        .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("x-content-type-options: nosniff"), "{ok}");
        assert!(
            ok.contains(r#"overkvm_vm_io_operations_total{vm="web",device="vda",op="read"} 5"#)
        );
        let wrong = tls_get(
            addr,
            &ca.pem,
            Some(&client),
            Some(&basic("prometheus", "wrong")),
        )
        .await
        .unwrap();
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        assert!(wrong.contains("x-content-type-options: nosniff"), "{wrong}");
        let none = tls_get(addr, &ca.pem, Some(&client), None).await.unwrap();
        assert!(none.starts_with("HTTP/1.1 401"), "{none}");
        assert!(none.contains("www-authenticate: Basic"), "{none}");
        // A certificate from another CA, and none at all: no handshake, so no HTTP.
        let stranger = testpki::Ca::new("someone else").issue(&["prometheus"]);
        let auth = basic("prometheus", "right");
        assert!(
            tls_get(addr, &ca.pem, Some(&stranger), Some(&auth))
                .await
                .is_err()
        );
        assert!(tls_get(addr, &ca.pem, None, Some(&auth)).await.is_err());
        // Plain HTTP on the TLS port.
        assert!(!get(addr, "/metrics", None).await.contains("HTTP/1.1 200"));
        let c = e.http.counts();
        assert!(c.secured);
        assert_eq!((c.bad_credentials, c.no_credentials), (1, 1), "{c:?}");
        // The client's handshake error reaches the server after the client's own check.
        for _ in 0..50 {
            if e.http.counts().tls_handshake >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(e.http.counts().tls_handshake, 3, "{:?}", e.http.counts());
        // 4 failures so far (the wrong password and three handshakes); 6 more and this
        // address is refused, even with good credentials.
        for _ in 0..6 {
            let r = tls_get(addr, &ca.pem, Some(&client), Some(&basic("x", "y"))).await;
            assert!(r.unwrap().starts_with("HTTP/1.1 401"));
        }
        let refused = tls_get(addr, &ca.pem, Some(&client), Some(&auth)).await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(e.http.counts().rate_limited, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn basic_auth_over_plain_http_answers_429_when_limited() {
        use base64::Engine as _;
        let hash = bcrypt::hash("right", 4).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, format!("basic_auth_users:\n  p: '{hash}'\n")).unwrap();
        let web = Arc::new(crate::export::webconfig::WebConfigWatcher::new(&path).unwrap());
        let e = exporter();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(e.clone(), listener, short(), Some(web)));
        let with = |p: &'static str| {
            let h = base64::engine::general_purpose::STANDARD.encode(format!("p:{p}"));
            tokio::task::spawn_blocking(move || {
                let mut s = StdStream::connect(addr).expect("connect");
                write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {h}\r\nConnection: close\r\n\r\n")
                    .expect("write");
                let mut out = String::new();
                s.read_to_string(&mut out).expect("read");
                out
            })
        };
        assert!(with("right").await.unwrap().starts_with("HTTP/1.1 200"));
        for _ in 0..10 {
            assert!(with("wrong").await.unwrap().starts_with("HTTP/1.1 401"));
        }
        let limited = with("right").await.unwrap();
        assert!(limited.starts_with("HTTP/1.1 429"), "{limited}");
        assert!(limited.contains("retry-after: 6"), "{limited}");
        let c = e.http.counts();
        assert_eq!((c.bad_credentials, c.rate_limited), (10, 1), "{c:?}");
    }

    #[test]
    fn accept_header_parsing() {
        let f = |s: &str| negotiate(std::iter::once(s));
        let ok = |s: &str| f(s) == Format::OpenMetrics;
        assert!(ok("application/openmetrics-text; version=1.0.0"));
        assert!(ok("text/plain;q=0.5, Application/OpenMetrics-Text;q=0.2"));
        assert!(!ok("application/openmetrics-text;q=0"));
        assert_eq!(f("text/plain"), Format::Text);
        assert_eq!(f("*/*"), Format::Text);
        // Prometheus 2.42 with --enable-feature=native-histograms, and without.
        assert_eq!(
            f(
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
               encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,\
               application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,\
               */*;q=0.1"
            ),
            Format::Protobuf
        );
        assert!(ok(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        // Protobuf of another message or framing is not ours; a higher quality wins.
        assert_eq!(
            f("application/vnd.google.protobuf;proto=openmetrics.MetricSet;encoding=delimited"),
            Format::Text
        );
        assert_eq!(
            f("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily"),
            Format::Text
        );
        assert!(ok(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
             encoding=delimited;q=0.5,application/openmetrics-text"
        ));
    }
}
