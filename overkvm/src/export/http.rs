//! The `/metrics` endpoint: axum over a listener that bounds what a client can hold.
//!
//! A scrape clones the text rendered at the last tick and writes it; nothing on this path
//! waits for the sampler. Slow or hostile clients are bounded at the connection level (tower
//! middleware is not a dependency): at most `max_connections` at once, a request must arrive
//! whole within `request_timeout` and fit in `max_request_bytes`, and a connection that makes
//! no progress for `idle_timeout` is closed.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::State,
    http::{
        HeaderMap, StatusCode,
        header::{ACCEPT, CONTENT_TYPE, VARY},
    },
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

use super::Exporter;

/// Content type of the OpenMetrics exposition (what Prometheus asks for).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic text format (curl, browsers, promtool).
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bounds on what clients may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// From the first byte of a request to the first byte of its response.
    pub request_timeout: Duration,
    /// Without a byte read or written (keep-alive between scrapes, or a client not reading).
    pub idle_timeout: Duration,
    /// Header and body of one request.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            request_timeout: Duration::from_secs(10),
            // Longer than the usual scrape intervals, so Prometheus keeps its connection.
            idle_timeout: Duration::from_secs(120),
            max_request_bytes: 16 << 10,
        }
    }
}

pub(super) async fn serve(
    exporter: Arc<Exporter>,
    listener: TcpListener,
    limits: Limits,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(exporter);
    let listener = GuardedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
    };
    axum::serve(listener, app).await.context("serving /metrics")
}

async fn metrics(State(exporter): State<Arc<Exporter>>, headers: HeaderMap) -> Response {
    let page = exporter.published();
    let accept = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let (content_type, body) = if accepts_openmetrics(accept) {
        (OPENMETRICS, page.openmetrics.clone())
    } else {
        (TEXT, page.text())
    };
    ([(CONTENT_TYPE, content_type), (VARY, "Accept")], body).into_response()
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: metrics are at /metrics\n",
    )
}

/// Whether an Accept header lists OpenMetrics text with a non-zero quality.
fn accepts_openmetrics<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    values.flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        media.eq_ignore_ascii_case("application/openmetrics-text")
            && !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

/// Accepts connections only while fewer than `max_connections` are open; the others wait in
/// the kernel's backlog.
struct GuardedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    limits: Limits,
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedStream, SocketAddr) {
        // The semaphore is never closed, so this only fails in theory; then run unbounded.
        let slot = self.slots.clone().acquire_owned().await.ok();
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (GuardedStream::new(stream, slot, self.limits), addr);
                }
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

/// A client connection with deadlines. hyper only reads when it waits for a request and only
/// writes responses, so "bytes read since the last write" is the request being received.
struct GuardedStream {
    inner: TcpStream,
    limits: Limits,
    /// Fires at the idle deadline, or the request deadline while a request is arriving.
    deadline: Pin<Box<Sleep>>,
    /// Bytes of the request being received; None between requests.
    request: Option<(usize, Instant)>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl GuardedStream {
    fn new(inner: TcpStream, slot: Option<OwnedSemaphorePermit>, limits: Limits) -> Self {
        GuardedStream {
            inner,
            limits,
            deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            request: None,
            _slot: slot,
        }
    }

    fn rearm(&mut self) {
        let mut at = Instant::now() + self.limits.idle_timeout;
        if let Some((_, request_deadline)) = self.request {
            at = at.min(request_deadline);
        }
        self.deadline.as_mut().reset(at);
    }

    fn on_read(&mut self, n: usize) -> io::Result<()> {
        let timeout = self.limits.request_timeout;
        let request = self
            .request
            .get_or_insert_with(|| (0, Instant::now() + timeout));
        request.0 += n;
        if request.0 > self.limits.max_request_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "request larger than {} bytes",
                    self.limits.max_request_bytes
                ),
            ));
        }
        self.rearm();
        Ok(())
    }

    fn on_write(&mut self) {
        self.request = None;
        self.rearm();
    }

    /// The inner operation is pending: fail it if the deadline has passed.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "metrics client too slow",
            ))),
            Poll::Pending => Poll::Pending,
        }
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
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.on_write();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.on_write();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
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
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(exporter(), listener, limits));
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
        let addr = start(short()).await;
        let (idle, oversized) = tokio::task::spawn_blocking(move || {
            let mut idle = StdStream::connect(addr).expect("connect");
            let idle = wait_closed(&mut idle);
            let mut big = StdStream::connect(addr).expect("connect");
            let mut req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
            for i in 0..400 {
                req.extend_from_slice(format!("X-Filler-{i}: aaaaaaaaaaaaaaaa\r\n").as_bytes());
            }
            req.extend_from_slice(b"\r\n");
            let _ = big.write_all(&req);
            (idle, wait_closed(&mut big))
        })
        .await
        .expect("client thread");
        assert!(idle.0.is_empty());
        assert!(
            idle.1 >= Duration::from_millis(800) && idle.1 < Duration::from_secs(3),
            "idle connection closed after {:?}",
            idle.1
        );
        assert!(
            !oversized.0.starts_with(b"HTTP/1.1 200"),
            "served an oversized request"
        );
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

    #[test]
    fn accept_header_parsing() {
        let ok = |s: &str| accepts_openmetrics(std::iter::once(s));
        assert!(ok("application/openmetrics-text; version=1.0.0"));
        assert!(ok("text/plain;q=0.5, Application/OpenMetrics-Text;q=0.2"));
        assert!(!ok("application/openmetrics-text;q=0"));
        assert!(!ok("text/plain"));
        assert!(!ok("*/*"));
    }
}
