//! The HTTP client of the object-store locations: hyper (through
//! `hyper-util`'s pooled client and `hyper-rustls` with the platform's
//! certificate verifier) over TCP sockets that acknowledge what they
//! receive at once.
//!
//! Why not object_store's own reqwest client: a server that sends its
//! response headers and its body in separate writes without `TCP_NODELAY`
//! (Garage 2.5.0 does) holds the body's last partial segment until the
//! headers' segment is acknowledged (Nagle, Minshall's variant). A client
//! that has just sent its request on a kept-alive connection is in the
//! kernel's interactive ("pingpong") mode, which delays that ACK by the
//! 40 ms minimum of the delayed-ACK timer. So a 64 KiB GET on a connection
//! that had answered another request a moment before took 45 ms instead of
//! 2-3 ms: half of the first lazy reads of benches/lazy_restore.sh on
//! Garage. Linux has no lasting per-socket switch for this (`TCP_QUICKACK`
//! is reset by the stack as the connection goes on), so [`QuickAck`] sets
//! it again after every read that brought data: one `setsockopt` per read,
//! invisible next to the bytes moved. reqwest keeps its sockets to itself,
//! hence this client. kernel-notes/README.md, "Object-store connections",
//! has the measurements.
//!
//! It honours what [`super::locations`] sets: the connect timeout, the
//! request timeout (from the start of the request to the end of its body,
//! as reqwest counts it) and `allow_http`. The addresses a host name
//! resolves to are tried in a random order ([`ShuffleResolver`], as
//! object_store's client does), so the connections to a name with many
//! addresses (S3 endpoints have dozens) spread over them. A process with a proxy in its
//! environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`) keeps reqwest,
//! which honours it: see [`proxy_in_environment`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, COOKIE, LOCATION, PROXY_AUTHORIZATION, USER_AGENT};
use http::uri::Scheme;
use http::{Method, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpRequestBody,
    HttpResponse, HttpResponseBody, HttpService,
};
use object_store::{ClientConfigKey, ClientOptions};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Sent when a request names no user agent.
const AGENT: &str = concat!("blockd/", env!("CARGO_PKG_VERSION"));
/// Most redirects followed for one request (reqwest's default).
const MAX_REDIRECTS: usize = 10;
/// How long an idle pooled connection is kept (reqwest's default).
const POOL_IDLE: Duration = Duration::from_secs(90);
/// TCP keepalive idle time and probe interval (reqwest's).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Longest unacknowledged data may wait before the connection fails
/// (`TCP_USER_TIMEOUT`, reqwest's).
const USER_TIMEOUT: Duration = Duration::from_secs(30);

/// True when the environment names a proxy: the locations then use
/// object_store's reqwest client, which honours it.
#[must_use]
pub fn proxy_in_environment() -> bool {
    ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"].iter().any(|k| {
        [k.to_string(), k.to_lowercase()]
            .iter()
            .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
    })
}

/// Builds the client of one location (see the module docs).
#[derive(Debug, Clone)]
pub struct Connector {
    /// Longest a TCP connect may take.
    pub connect_timeout: Duration,
    /// Longest a request may take, body included.
    pub timeout: Duration,
}

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| v == "true");
        let mut tcp = TcpConnector::new_with_resolver(ShuffleResolver(GaiResolver::new()));
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(self.connect_timeout));
        // As reqwest does: a peer that vanishes without a reset (a node
        // losing power) is noticed in seconds, not at the request deadline.
        tcp.set_keepalive(Some(KEEPALIVE));
        tcp.set_keepalive_interval(Some(KEEPALIVE));
        tcp.set_keepalive_retries(Some(3));
        tcp.set_tcp_user_timeout(Some(USER_TIMEOUT));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| object_store::Error::Generic {
                store: "HTTP",
                source: Box::new(e),
            })?
            .https_or_http()
            // HTTP/1.1 only, as object_store's own client: one stream per
            // connection, so a slow transfer holds up no other request.
            .enable_http1()
            .wrap_connector(QuickAckConnector(tcp));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            // Idle connections are closed on time, not at their next use.
            .pool_timer(TokioTimer::new())
            .build(tls);
        Ok(HttpClient::new(Service {
            client,
            timeout: self.timeout,
            allow_http,
        }))
    }
}

type Pool = Client<hyper_rustls::HttpsConnector<QuickAckConnector>, HttpRequestBody>;

/// One location's client.
#[derive(Debug)]
struct Service {
    client: Pool,
    timeout: Duration,
    allow_http: bool,
}

#[async_trait::async_trait]
impl HttpService for Service {
    async fn call(&self, mut req: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.check_scheme(req.uri())?;
        req.headers_mut()
            .entry(USER_AGENT)
            .or_insert(HeaderValue::from_static(AGENT));
        let deadline = Instant::now() + self.timeout;
        let mut redirects = 0;
        loop {
            // A GET or HEAD that is redirected goes again to the new
            // place, as reqwest did (gateways that send reads to a CDN).
            let again = matches!(*req.method(), Method::GET | Method::HEAD).then(|| {
                (
                    req.method().clone(),
                    req.uri().clone(),
                    req.headers().clone(),
                )
            });
            let res = match tokio::time::timeout_at(deadline, self.client.request(req)).await {
                Ok(r) => r.map_err(|e| failed(&e))?,
                Err(_) => return Err(timed_out(self.timeout)),
            };
            let next = again.and_then(|(method, uri, headers)| {
                redirected(&res, &uri).map(|to| (method, uri, headers, to))
            });
            match next {
                Some((method, from, mut headers, to)) if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    self.check_scheme(&to)?;
                    if to.authority() != from.authority() || to.scheme() != from.scheme() {
                        // Credentials stay with the host they were meant for.
                        for h in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION] {
                            headers.remove(h);
                        }
                    }
                    let mut r = http::Request::new(HttpRequestBody::empty());
                    *r.method_mut() = method;
                    *r.uri_mut() = to;
                    *r.headers_mut() = headers;
                    req = r;
                }
                _ => {
                    let (parts, body) = res.into_parts();
                    let body = Deadline {
                        body,
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                        timeout: self.timeout,
                    };
                    return Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)));
                }
            }
        }
    }
}

impl Service {
    fn check_scheme(&self, uri: &Uri) -> Result<(), HttpError> {
        if self.allow_http || uri.scheme() == Some(&Scheme::HTTPS) {
            return Ok(());
        }
        Err(HttpError::new(
            HttpErrorKind::Unknown,
            io::Error::other(format!(
                "{}: plain HTTP is not allowed for this location (give the endpoint as https://, or allow HTTP, e.g. --s3-disable-ssl)",
                without_query(uri)
            )),
        ))
    }
}

/// Where a redirect answer to a request for `from` points, resolved
/// against `from` when relative; `None` for any other answer.
fn redirected<B>(res: &http::Response<B>, from: &Uri) -> Option<Uri> {
    if !matches!(res.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let to: Uri = res.headers().get(LOCATION)?.to_str().ok()?.parse().ok()?;
    if to.scheme().is_some() {
        return Some(to);
    }
    let mut parts = to.into_parts();
    parts.scheme = from.scheme().cloned();
    parts.authority = from.authority().cloned();
    Uri::from_parts(parts).ok()
}

/// The URI without its query (which may hold a signature).
fn without_query(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    )
}

fn timed_out(after: Duration) -> HttpError {
    HttpError::new(
        HttpErrorKind::Timeout,
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no complete answer within {}",
                humantime::format_duration(after)
            ),
        ),
    )
}

/// `e` as object_store's error, its message naming every cause (hyper's
/// own says only "client error (Connect)" where rustls says which
/// certificate it refused and why).
fn failed(e: &(dyn std::error::Error + 'static)) -> HttpError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    HttpError::new(classify(e), io::Error::other(text))
}

/// What object_store's retries should make of an error: connection
/// failures and cut-off exchanges are retried, as reqwest's are.
fn classify(e: &(dyn std::error::Error + 'static)) -> HttpErrorKind {
    if e.downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(hyper_util::client::legacy::Error::is_connect)
    {
        return HttpErrorKind::Connect;
    }
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_closed() || h.is_incomplete_message() || h.is_body_write_aborted() {
                return HttpErrorKind::Request;
            }
            if h.is_timeout() {
                return HttpErrorKind::Timeout;
            }
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::TimedOut => return HttpErrorKind::Timeout,
                io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => return HttpErrorKind::Interrupted,
                _ => {}
            }
        }
        source = e.source();
    }
    HttpErrorKind::Unknown
}

/// A response body that fails once the request's deadline has passed.
struct Deadline {
    body: hyper::body::Incoming,
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
}

impl Body for Deadline {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(timed_out(self.timeout))));
        }
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(|e| failed(&e))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// hyper-util's TCP connector, resolving with [`ShuffleResolver`].
type TcpConnector = hyper_util::client::legacy::connect::HttpConnector<ShuffleResolver>;

/// The system resolver (`getaddrinfo` on a blocking thread), its
/// addresses in a random order: each connection to a name with several
/// addresses starts at a random one of them. (hyper-util's connector then
/// tries them in that order, IPv6 and IPv4 interleaved as RFC 8305 asks.)
#[derive(Debug, Clone)]
struct ShuffleResolver(GaiResolver);

impl tower_service::Service<Name> for ShuffleResolver {
    type Response = std::vec::IntoIter<std::net::SocketAddr>;
    type Error = io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolving = self.0.call(name);
        Box::pin(async move {
            let mut addrs: Vec<std::net::SocketAddr> = resolving.await?.collect();
            shuffle(&mut addrs);
            Ok(addrs.into_iter())
        })
    }
}

/// Fisher-Yates with the system's random numbers (a shuffle that cannot
/// get them leaves the order as the resolver gave it).
fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let Ok(r) = getrandom::u64() else {
            return;
        };
        // i + 1 is at most the slice's length, a usize.
        let j = usize::try_from(r % (i as u64 + 1)).unwrap_or(0);
        items.swap(i, j);
    }
}

/// hyper-util's TCP connector, its streams wrapped in [`QuickAck`].
#[derive(Debug, Clone)]
struct QuickAckConnector(TcpConnector);

impl tower_service::Service<Uri> for QuickAckConnector {
    type Response = Stream;
    type Error = <TcpConnector as tower_service::Service<Uri>>::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move {
            Ok(Stream(TokioIo::new(QuickAck(
                connecting.await?.into_inner(),
            ))))
        })
    }
}

/// A TCP stream that sets `TCP_QUICKACK` after each read that brought
/// data, so the kernel acknowledges at once instead of delaying the ACK
/// (see the module docs).
#[derive(Debug)]
pub struct QuickAck(TcpStream);

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Best effort: a socket that refuses it only acknowledges
            // later.
            let _ = rustix::net::sockopt::set_tcp_quickack(&self.0, true);
        }
        r
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// [`QuickAck`] as hyper's connectors hand streams over.
#[derive(Debug)]
pub struct Stream(TokioIo<QuickAck>);

impl hyper::rt::Read for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        self.0.inner().0.connected()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Every address stays, and each comes first in some order: over 400
    /// shuffles of 8, one never coming first has odds below 10^-22.
    #[test]
    fn shuffled_addresses_keep_every_address_and_vary_the_first() {
        let addrs: Vec<std::net::SocketAddr> = (1..=8u8)
            .map(|i| std::net::SocketAddr::from(([127, 0, 0, i], 443)))
            .collect();
        let mut first = std::collections::BTreeSet::new();
        for _ in 0..400 {
            let mut v = addrs.clone();
            shuffle(&mut v);
            first.insert(v[0]);
            v.sort();
            assert_eq!(v, addrs);
        }
        assert_eq!(first.len(), addrs.len(), "{first:?}");
    }

    /// The resolver answers from the system's (here `/etc/hosts`).
    #[tokio::test]
    async fn the_shuffling_resolver_resolves_through_the_system() {
        use std::str::FromStr;
        let mut r = ShuffleResolver(GaiResolver::new());
        let got: Vec<std::net::SocketAddr> =
            tower_service::Service::call(&mut r, Name::from_str("localhost").unwrap())
                .await
                .unwrap()
                .collect();
        assert!(got.iter().any(|a| a.ip().is_loopback()), "{got:?}");
    }

    /// A reader put in the kernel's interactive mode (delayed ACKs)
    /// leaves it when a [`QuickAck`] read brings data; a plain read stays
    /// in it (the control).
    #[tokio::test]
    async fn reads_switch_delayed_acks_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for wrapped in [false, true] {
            let client = TcpStream::connect(addr).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            rustix::net::sockopt::set_tcp_quickack(&client, false).unwrap();
            assert!(!rustix::net::sockopt::tcp_quickack(&client).unwrap());
            let sent = std::time::Instant::now();
            server.write_all(b"answer").await.unwrap();
            let mut buf = [0u8; 6];
            let quick = if wrapped {
                let mut s = QuickAck(client);
                s.read_exact(&mut buf).await.unwrap();
                rustix::net::sockopt::tcp_quickack(&s.0).unwrap()
            } else {
                let mut s = client;
                s.read_exact(&mut buf).await.unwrap();
                rustix::net::sockopt::tcp_quickack(&s).unwrap()
            };
            assert_eq!(&buf, b"answer");
            if wrapped {
                assert!(quick, "a QuickAck read leaves delayed ACKs off");
            } else if sent.elapsed() < Duration::from_millis(30) {
                // The control; past 40 ms the kernel's delayed-ACK timer
                // fires and ends interactive mode by itself.
                assert!(!quick, "a plain read leaves the socket in interactive mode");
            }
        }
    }

    /// The client over a server that writes its headers and its body
    /// apart (as Garage does): many GETs on one kept-alive connection,
    /// each body whole, the user agent sent; plain HTTP refused unless
    /// allowed.
    #[tokio::test]
    async fn gets_on_kept_alive_connections_and_the_http_rule() {
        let (addr, accepted) = serve(
            |head| {
                if head.contains("user-agent: blockd/") {
                    ("200 OK", String::new(), vec![7u8; 65537])
                } else {
                    ("400 Bad Request", String::new(), Vec::new())
                }
            },
            true,
        )
        .await;
        let client = plain_http_client();
        let url = format!("http://{addr}/bucket/object");
        for _ in 0..20 {
            let req = http::Request::get(&url)
                .body(HttpRequestBody::empty())
                .unwrap();
            let res = client.execute(req).await.unwrap();
            assert_eq!(res.status(), 200, "the user agent is sent");
            let body = res.into_body().bytes().await.unwrap();
            assert_eq!(body.len(), 65537);
            assert!(body.iter().all(|&b| b == 7));
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one kept-alive connection"
        );

        let strict = test_connector().connect(&ClientOptions::new()).unwrap();
        let req = http::Request::get(&url)
            .body(HttpRequestBody::empty())
            .unwrap();
        let e = strict.execute(req).await.unwrap_err();
        assert!(e.to_string().contains("plain HTTP is not allowed"), "{e}");
    }

    fn test_connector() -> Connector {
        Connector {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }

    /// A client of this module that may speak plain HTTP (the test servers).
    fn plain_http_client() -> HttpClient {
        test_connector()
            .connect(&ClientOptions::new().with_allow_http(true))
            .unwrap()
    }

    /// A tiny HTTP/1.1 server: each request head goes to `answer`, which
    /// gives the status line, extra headers and body.
    /// With `split`, the head leaves alone before the body, as from a
    /// server streaming its body from disk (Garage). Returns the address
    /// and the count of connections accepted.
    async fn serve(
        answer: fn(&str) -> (&'static str, String, Vec<u8>),
        split: bool,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        while let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&req[..end]).to_lowercase();
                            req.drain(..end + 4);
                            let (status, headers, body) = answer(&head);
                            let head = format!(
                                "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\n\r\n",
                                body.len()
                            );
                            s.write_all(head.as_bytes()).await.unwrap();
                            if split {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            s.write_all(&body).await.unwrap();
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// GETs follow redirects, relative or to another host; credentials do
    /// not go to another host.
    #[tokio::test]
    async fn redirects_are_followed_without_credentials_across_hosts() {
        let (other, _) = serve(
            |head| {
                if head.contains("authorization:") {
                    ("400 Bad Request", String::new(), b"leaked".to_vec())
                } else {
                    ("200 OK", String::new(), b"from the other host".to_vec())
                }
            },
            false,
        )
        .await;
        static OTHER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        OTHER.set(format!("http://{other}/there")).unwrap();
        let (first, _) = serve(
            |head| {
                if head.starts_with("get /moved ") {
                    (
                        "307 Temporary Redirect",
                        "location: /here\r\n".into(),
                        Vec::new(),
                    )
                } else if head.starts_with("get /here ") {
                    ("200 OK", String::new(), b"here".to_vec())
                } else if head.starts_with("get /away ") {
                    let to = OTHER.get().unwrap();
                    ("302 Found", format!("location: {to}\r\n"), Vec::new())
                } else {
                    ("404 Not Found", String::new(), Vec::new())
                }
            },
            false,
        )
        .await;
        let client = plain_http_client();
        let get = |path: &str| {
            http::Request::get(format!("http://{first}{path}"))
                .header(AUTHORIZATION, "AWS4-HMAC-SHA256 secret")
                .body(HttpRequestBody::empty())
                .unwrap()
        };
        let res = client.execute(get("/moved")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(&res.into_body().bytes().await.unwrap()[..], b"here");
        let res = client.execute(get("/away")).await.unwrap();
        assert_eq!(
            &res.into_body().bytes().await.unwrap()[..],
            b"from the other host"
        );
    }

    #[test]
    fn errors_are_classified_for_retries() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(classify(&reset), HttpErrorKind::Interrupted);
        let late = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(classify(&late), HttpErrorKind::Timeout);
        assert_eq!(classify(&io::Error::other("x")), HttpErrorKind::Unknown);
    }
}
