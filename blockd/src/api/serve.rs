//! The HTTP listeners: the control API on its Unix socket and
//! `--metrics-listen` over TCP, each a router served on hyper connections
//! with the bounds `axum::serve` does not set.
//!
//! Without them, a client that connects and sends half a request holds a
//! descriptor and a task for as long as it likes, and enough such clients
//! (as many as the daemon's descriptor limit: 65,536 under the shipped
//! systemd unit) leave every listener of the daemon, the NBD sockets
//! included, unable to accept. The metrics address may face a network,
//! and its bearer token is read only once the request's head has arrived,
//! so anyone who can reach it could do that. Now:
//!
//! - a request's head must arrive within [`HEAD_TIMEOUT`] of the
//!   connection's start or of the previous answer (hyper's header read
//!   timeout, which also ends idle keep-alive connections);
//! - its body within [`BODY_TIMEOUT`] of its head ([`Deadline`]); a body
//!   that does not is refused, and the connection closed;
//! - an answer the client stops reading for [`ANSWER_TIMEOUT`] ends the
//!   connection ([`Stall`]);
//! - a listener serves at most so many connections at once
//!   ([`API_MAX_CONNECTIONS`], [`METRICS_MAX_CONNECTIONS`]); one more is
//!   closed at once, with a warning at most every ten seconds. On the API
//!   socket, callers the API refuses anyway (a socket opened up by
//!   mistake) share a few slots of their own ([`REFUSED_MAX_CONNECTIONS`]),
//!   so they cannot take root's; on the metrics address one source
//!   address (an IPv6 /64) holds at most [`METRICS_PER_ADDRESS`], so one scraper-like
//!   client cannot take every slot (the token is not known before the
//!   head: a client without it is still answered 401, not refused at
//!   accept);
//! - at shutdown, the listener is closed first, so a new client is
//!   refused instead of waiting in the backlog; a request still being
//!   handled gets its answer, and other connections get [`SHUTDOWN_GRACE`]
//!   to finish what they send.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access::{Access, Peer};
use crate::quiet::every_ten_seconds;

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

/// Most connections of one source address on `--metrics-listen`.
pub const METRICS_PER_ADDRESS: usize = 8;

/// Most connections at once on the API socket from callers the API
/// refuses (they get its 403 and the reason, as before).
pub const REFUSED_MAX_CONNECTIONS: usize = 16;

/// How long a write of an answer may wait for the client to read. The
/// kernel wakes a waiting writer only once half of the socket's send
/// buffer (megabytes, autotuned) is free, so a slow but steady reader of
/// a large answer (`/metrics` of thousands of volumes) may leave a write
/// waiting many seconds.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long connections may take to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

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
/// [`ConnectInfo<Peer>`](Peer); callers `access` refuses take slots of
/// their own.
pub async fn serve_unix(
    listener: UnixListener,
    router: Router,
    bounds: Bounds,
    access: Arc<Access>,
    stop: CancellationToken,
) {
    let mut server = Server::new(router, bounds, stop.clone());
    let refused = Arc::new(Semaphore::new(REFUSED_MAX_CONNECTIONS));
    let mut refused_warned = None;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let peer = Peer::of(&stream);
                let slot = if access.check(&peer).is_ok() {
                    server.slot()
                } else {
                    refused_slot(&refused, &mut refused_warned)
                };
                if let Some(slot) = slot {
                    server.spawn(stream, peer, slot);
                }
            }
            Err(e) => server.accept_failed(&e).await,
        }
    }
    drop(listener);
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
    let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut last_per_address = None;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, addr)) => {
                let Some(from) = Counted::take(&per_address, source(addr.ip())) else {
                    if every_ten_seconds(&mut last_per_address) {
                        tracing::warn!(
                            from = %addr.ip(),
                            "{} connection refused: that address holds {METRICS_PER_ADDRESS} connections already",
                            server.bounds.what
                        );
                    }
                    continue;
                };
                let Some(slot) = server.slot() else {
                    continue;
                };
                // Answers go out in one piece; Nagle would hold a split
                // one for the peer's delayed ACK.
                let _ = stream.set_nodelay(true);
                server.spawn(stream, addr, (slot, from));
            }
            Err(e) => server.accept_failed(&e).await,
        }
    }
    drop(listener);
    server.finish().await;
}

/// A slot for a caller the API refuses, from their pool of their own.
fn refused_slot(
    refused: &Arc<Semaphore>,
    warned: &mut Option<Instant>,
) -> Option<OwnedSemaphorePermit> {
    let permit = refused.clone().try_acquire_owned().ok();
    if permit.is_none() && every_ten_seconds(warned) {
        tracing::warn!(
            "control API connection refused: callers the API refuses (not root, its user or group) hold the {REFUSED_MAX_CONNECTIONS} connections they may; is the socket open to everyone?"
        );
    }
    permit
}

/// The source a connection counts against: its IPv4 address, or the /64
/// of its IPv6 address (one host holds a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// One connection counted against its source address; the count goes down
/// when it is dropped.
struct Counted {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Counted {
    /// Counts a connection from `ip`, or `None` when that address holds
    /// [`METRICS_PER_ADDRESS`] already.
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut c = counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = c.entry(ip).or_insert(0);
        if *n >= METRICS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
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

    /// Serves one connection; `held` (its slot) goes when it ends.
    fn spawn<S, C, H>(&mut self, stream: S, info: C, held: H)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: Clone + Send + Sync + 'static,
        H: Send + 'static,
    {
        let router = self.router.clone();
        let body_timeout = self.bounds.body_timeout;
        // Requests of this connection being handled: at shutdown their
        // answers are waited for, however long they take (a snapshot's
        // hooks may take minutes, and the daemon waits for them anyway).
        let busy = Arc::new(AtomicUsize::new(0));
        let handling = busy.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (mut parts, body) = req.into_parts();
                parts.extensions.insert(ConnectInfo(info.clone()));
                let req = hyper::Request::from_parts(parts, Deadline::new(body, body_timeout));
                let mut router = router.clone();
                let handled = Busy::new(&handling);
                async move {
                    let answer: Result<_, Infallible> =
                        tower_service::Service::call(&mut router, req).await;
                    drop(handled);
                    answer
                }
            });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.bounds.head_timeout);
        let stop = self.stop.clone();
        self.connections.spawn(async move {
            let io = TokioIo::new(Stall::new(stream, ANSWER_TIMEOUT));
            let conn = http.serve_connection(io, service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop.cancelled() => {
                    // An idle connection is closed at once. One reading a
                    // head, or sending an answer already made, gets a
                    // little time; one whose request is still handled
                    // gets its answer.
                    conn.as_mut().graceful_shutdown();
                    let settled = async {
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                        while busy.load(Ordering::SeqCst) > 0 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! {
                        _ = conn => {}
                        () = settled => {}
                    }
                }
            }
            drop(held);
        });
    }

    /// After a failed `accept` (out of descriptors, most often): a warning
    /// at most every ten seconds, and a pause so the loop does not spin.
    /// A connection its client dropped before it was taken is no failure.
    async fn accept_failed(&mut self, e: &std::io::Error) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::Interrupted
        ) {
            return;
        }
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

/// A request being handled, counted while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request body that must arrive whole within a time limit, counted
/// from the request's head. Past it, reading the body fails, so the
/// handler's extractor refuses the request and the connection is closed
/// with the rest of the body unread.
pub struct Deadline<B> {
    inner: B,
    timeout: Duration,
    /// `None` for a body that is known to be empty.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B: Body> Deadline<B> {
    /// `inner`, which must arrive within `timeout` from now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        let sleep = (!inner.is_end_stream()).then(|| Box::pin(tokio::time::sleep(timeout)));
        Self {
            inner,
            timeout,
            sleep,
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
        if this
            .sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
        {
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

/// A connection whose writes fail once they have waited [`ANSWER_TIMEOUT`]
/// for the client to read: a client that asks and never reads would
/// otherwise hold its slot, and the daemon's shutdown, for good.
pub struct Stall<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write waits.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Stall<S> {
    /// `inner`, whose writes may wait at most `timeout`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            waiting: None,
        }
    }

    /// After a write step: `Pending` arms the timer (or fails once it has
    /// run out), anything else disarms it.
    fn judge<T>(
        &mut self,
        cx: &mut Context<'_>,
        p: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if p.is_ready() {
            self.waiting = None;
            return p;
        }
        let timeout = self.timeout;
        let sleep = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.waiting = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing of its answer for {} s",
                    timeout.as_secs()
                ),
            )));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stall<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stall<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.judge(cx, p)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.judge(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_flush(cx);
        this.judge(cx, p)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.judge(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_its_timeout() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut s = Stall::new(near, Duration::from_millis(200));
        let started = Instant::now();
        let e = s.write_all(&[7u8; 4096]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(s);
        let mut first = Vec::new();
        far.read_to_end(&mut first).await.unwrap();
        assert_eq!(first.len(), 64, "what fitted before the client stopped");
        // A reader that keeps up is never cut off, however long it all
        // takes.
        let (near, mut far2) = tokio::io::duplex(64);
        let mut s = Stall::new(near, Duration::from_millis(500));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut b = [0u8; 16];
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                match far2.read(&mut b).await.unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&b[..n]),
                }
            }
        });
        s.write_all(&[9u8; 4096]).await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
        assert_eq!(reader.await.unwrap(), vec![9u8; 4096]);
    }
}
