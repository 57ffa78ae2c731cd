//! The HTTP listeners: the control API on its Unix socket and
//! `--metrics-listen` over TCP, each a router served on hyper connections
//! with the bounds `axum::serve` does not set.
//!
//! Without them, a client that connects and sends half a request holds a
//! descriptor and a task for as long as it likes, and enough such clients
//! (20,000 here: the daemon's descriptor limit) leave every listener of
//! the daemon, the NBD sockets included, unable to accept. The metrics
//! address may face a network, and its bearer token is read only once the
//! request's head has arrived, so anyone who can reach it could do that.
//! Now:
//!
//! - a request's head must arrive within [`HEAD_TIMEOUT`] of the
//!   connection's start or of the previous answer (hyper's header read
//!   timeout, which also ends idle keep-alive connections);
//! - its body within [`BODY_TIMEOUT`] of its head ([`Deadline`]); a body
//!   that does not is refused, and the connection closed;
//! - a listener serves at most so many connections at once
//!   ([`API_MAX_CONNECTIONS`], [`METRICS_MAX_CONNECTIONS`]); one more is
//!   closed at once, with a warning at most every ten seconds.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access::Peer;

/// How long a request's head may take to arrive: from the connection's
/// start, or from the previous answer on a kept-alive connection. blockctl
/// and Prometheus send theirs at once.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request's body may take to arrive, from its head. Requests
/// are small JSON documents.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections the control API serves at once (blockctl holds one
/// per command).
pub const API_MAX_CONNECTIONS: usize = 1024;

/// Most connections `--metrics-listen` serves at once (a scraper holds
/// one).
pub const METRICS_MAX_CONNECTIONS: usize = 64;

/// One listener's bounds and its name in warnings.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// What the listener serves, as the log names it.
    pub what: &'static str,
    /// Most connections at once.
    pub max_connections: usize,
    /// See [`HEAD_TIMEOUT`].
    pub head_timeout: Duration,
    /// See [`BODY_TIMEOUT`].
    pub body_timeout: Duration,
}

impl Bounds {
    /// The control API's.
    pub fn api() -> Self {
        Self {
            what: "control API",
            max_connections: API_MAX_CONNECTIONS,
            head_timeout: HEAD_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
        }
    }

    /// `--metrics-listen`'s.
    pub fn metrics() -> Self {
        Self {
            what: "metrics listener",
            max_connections: METRICS_MAX_CONNECTIONS,
            ..Self::api()
        }
    }
}

/// Serves `router` on the control API's socket until `stop`, then waits
/// for the connections to finish. Requests carry the caller's
/// [`ConnectInfo<Peer>`](Peer).
pub async fn serve_unix(
    listener: UnixListener,
    router: Router,
    bounds: Bounds,
    stop: CancellationToken,
) {
    let mut server = Server::new(router, bounds, stop.clone());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let peer = Peer::of(&stream);
                server.spawn(stream, peer);
            }
            Err(e) => server.accept_failed(&e).await,
        }
    }
    server.finish().await;
}

/// Serves `router` on a TCP listener until `stop`, then waits for the
/// connections to finish. Requests carry [`ConnectInfo<SocketAddr>`].
pub async fn serve_tcp(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    stop: CancellationToken,
) {
    let mut server = Server::new(router, bounds, stop.clone());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                // Answers go out in one piece; Nagle would hold a split
                // one for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                server.spawn(stream, addr);
            }
            Err(e) => server.accept_failed(&e).await,
        }
    }
    server.finish().await;
}

/// What the two accept loops share.
struct Server {
    router: Router,
    bounds: Bounds,
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    stop: CancellationToken,
    last_full: Option<Instant>,
    last_accept_error: Option<Instant>,
}

impl Server {
    fn new(router: Router, bounds: Bounds, stop: CancellationToken) -> Self {
        Self {
            router,
            slots: Arc::new(Semaphore::new(bounds.max_connections)),
            bounds,
            connections: TaskTracker::new(),
            stop,
            last_full: None,
            last_accept_error: None,
        }
    }

    /// A connection slot, or `None` when all are taken (the connection is
    /// then dropped, which closes it).
    fn slot(&mut self) -> Option<OwnedSemaphorePermit> {
        let permit = self.slots.clone().try_acquire_owned().ok();
        if permit.is_none() && every_ten_seconds(&mut self.last_full) {
            tracing::warn!(
                limit = self.bounds.max_connections,
                "{} connection refused: it serves as many connections as it allows at once; a client holding connections open must let them go",
                self.bounds.what
            );
        }
        permit
    }

    fn spawn<S, C>(&mut self, stream: S, info: C)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: Clone + Send + Sync + 'static,
    {
        let Some(permit) = self.slot() else {
            return;
        };
        let router = self.router.clone();
        let body_timeout = self.bounds.body_timeout;
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo(info.clone()));
                let req = hyper::Request::from_parts(parts, Deadline::new(body, body_timeout));
                let mut router = router.clone();
                async move {
                    let answer: Result<_, Infallible> =
                        tower_service::Service::call(&mut router, req).await;
                    answer
                }
            });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.bounds.head_timeout);
        let stop = self.stop.clone();
        self.connections.spawn(async move {
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    // An answer under way is finished; an idle or
                    // half-sent connection is closed.
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(permit);
        });
    }

    /// After a failed `accept` (out of descriptors, most often): a warning
    /// at most every ten seconds, and a pause so the loop does not spin.
    async fn accept_failed(&mut self, e: &std::io::Error) {
        if every_ten_seconds(&mut self.last_accept_error) {
            tracing::warn!(error = %e, "accept on the {} failed", self.bounds.what);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    async fn finish(self) {
        self.connections.close();
        self.connections.wait().await;
    }
}

/// True at most once every ten seconds, for warnings a client could
/// otherwise repeat into a flood.
fn every_ten_seconds(last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
        return false;
    }
    *last = Some(Instant::now());
    true
}

/// A request body that must arrive whole within a time limit, counted
/// from the request's head. Past it, reading the body fails, so the
/// handler's extractor refuses the request and the connection is closed
/// with the rest of the body unread.
pub struct Deadline<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl<B> Deadline<B> {
    /// `inner`, which must arrive within `timeout` from now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {} s of its head",
                this.timeout.as_secs()
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
