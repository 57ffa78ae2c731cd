//! NBD connections: handshake, then transmission with concurrent requests.
//!
//! One reader loop per connection parses requests and spawns one task per
//! request, so requests complete out of order; a writer task sends each
//! reply as one buffer and coalesces replies that are ready together into a
//! single `writev`. What cannot block for long is served by the reader
//! loop itself: page-cache hits, small writes, a lone FLUSH, and large
//! writes on a plain socket, whose payload goes from the socket into the
//! volume file through a pipe as it arrives ([`super::splice`]).
//!
//! A large write is applied a step at a time as its payload arrives: a
//! client that disconnects mid-payload may leave the steps that arrived
//! written, as a disk may leave part of a write it never acknowledged.
//!
//! What one client can make the daemon hold is bounded: a byte budget
//! per connection counts queued requests until their replies are queued,
//! and replies queued beyond [`BACKLOG_MAX`] (a client that does not read
//! them) stop the reading of its requests until they go out. What all
//! clients hold together is bounded too: each request's bytes also count
//! against [`super::Memory`] until its reply has been written. A connection
//! must finish its handshake within [`HANDSHAKE_TIMEOUT`], and the
//! listeners take at most `--nbd-max-connections` (see [`super`]).
//!
//! Hostile or broken input ends only its own connection: a bad magic or an
//! oversized payload is a hard disconnect; any other bad request gets an
//! error reply and the connection goes on.
//!
//! Shutdown: the daemon's token makes every new request answer ESHUTDOWN
//! while requests already running finish; after the grace period the reader
//! stops and the connection closes once its last reply is written.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::buffers::BufPool;
use super::negotiate::{
    self, ExportInfo, Exports, Negotiation, Next, Tls, Transmission, CONTEXT_BASE_ALLOCATION,
    CONTEXT_BLOCKD_DIRTY, CONTEXT_QEMU_DIRTY,
};
use super::proto::{self, Command, Errno, Extent, ReplyStyle, Request};
use super::splice::{self, Pipe};
use super::tls::TlsServer;
use crate::snapshot::store::{Reader, SnapshotStore};
use crate::snapshot::Snapshots;
use crate::volume::engine::{write_step, WRITE_STEP};
use crate::volume::store::Store;
use crate::volume::{ConnectionGuard, Volume, ZeroError};

/// What every connection shares.
#[derive(Debug, Clone)]
pub struct NbdContext {
    /// The volumes.
    pub store: Arc<Store>,
    /// Held snapshots, exported read-only as `VOLUME@SNAPSHOT`.
    pub snapshots: Arc<Snapshots>,
    /// Cancelled when the daemon begins to shut down.
    pub shutdown: CancellationToken,
    /// How long after shutdown begins connections keep answering ESHUTDOWN.
    pub grace: Duration,
    /// Client connection slots ([`super::MAX_CONNECTIONS`]).
    pub connections: Arc<Semaphore>,
    /// What client connections hold together ([`super::Memory`]).
    pub memory: Arc<super::Memory>,
}

/// Bytes of request payload and read data one connection may have in flight.
const CONNECTION_BUDGET: usize = 128 << 20;
/// Budget unit (permits are counted in KiB).
const BUDGET_UNIT: usize = 1024;
/// Permits of a connection's budget.
const BUDGET_PERMITS: usize = CONNECTION_BUDGET / BUDGET_UNIT;
/// Largest WRITE served inline from a buffer (see [`Conn::try_inline`]).
/// Larger writes are spliced on a plain socket ([`Conn::write_streamed`]);
/// on TLS they run in their own task, so copying one into the page cache
/// overlaps reading the next from the socket (1 MiB sequential writes at
/// QD8: 0.97x -> 1.3x nbdkit, benches/nbd-peers.sh).
const INLINE_WRITE_MAX: usize = 128 << 10;
/// Largest READ tried inline from the page cache. Larger reads run in
/// their own task, so their copy proceeds on the other worker while this
/// one parses the next request (1 MiB sequential reads: 2.3 -> 3.4 GiB/s).
const INLINE_READ_MAX: u64 = 128 << 10;
/// Most small writes gathered into one batch while a frozen image is held
/// (see [`Conn::write_batch`]). Small on purpose: a batch stops the reading
/// of requests until its copies are made, and the client's queue drains
/// meanwhile; with no batching at all each copy costs two more writes.
/// Measured with 4k random writes at QD32 after a freeze
/// (kernel-notes/README.md, "Copy-on-write").
const BATCH_MAX: usize = 4;
/// How long a connection that has ended waits for its running requests'
/// replies before it closes without them.
const REPLIES_AFTER_CLOSE: Duration = Duration::from_secs(10);
/// Most block-status runs in one reply.
const MAX_STATUS_RUNS: usize = 4096;
/// Option payloads up to this size are drained and refused; larger ones
/// end the connection.
const MAX_DRAIN: u32 = 16 << 20;

/// What an export name resolves to.
enum Source {
    Volume(Arc<Volume>),
    /// With the count of an open connection, for one that transmits.
    Snapshot(Arc<Volume>, Arc<SnapshotStore>, Option<Reader>),
}

impl NbdContext {
    fn resolve(&self, name: &str) -> Option<Source> {
        let (vol, snap) = split_export(name);
        self.source(self.store.get(vol)?, snap, false)
    }

    /// [`Self::resolve`] for a connection about to transmit: the volume
    /// (and the snapshot read) is counted busy in the same step that finds
    /// it (see [`crate::volume::store::Store::connect`] and
    /// [`crate::snapshot::Snapshots::open_reader`]), so a racing delete either
    /// wins before it or is refused.
    fn open(&self, name: &str) -> Option<(Source, ConnectionGuard)> {
        let (vol, snap) = split_export(name);
        let guard = self.store.connect(vol)?;
        let source = self.source(guard.volume().clone(), snap, true)?;
        Some((source, guard))
    }

    /// The export of volume `v`, or of its snapshot `snap`; `count`: as
    /// an open connection to the snapshot.
    fn source(&self, v: Arc<Volume>, snap: Option<&str>, count: bool) -> Option<Source> {
        match snap {
            None => v.unexported().is_none().then_some(Source::Volume(v)),
            Some(snap) => {
                let (s, reader) = if count {
                    let r = self.snapshots.open_reader(v.name(), snap)?;
                    (r.snapshot().clone(), Some(r))
                } else {
                    (self.snapshots.get(v.name(), snap)?, None)
                };
                // A damaged frozen image is never read as if it were good.
                if s.damaged().is_some() {
                    return None;
                }
                Some(Source::Snapshot(v, s, reader))
            }
        }
    }
}

/// `volume` or `volume@snapshot`.
fn split_export(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        None => (name, None),
        Some((vol, snap)) => (vol, Some(snap)),
    }
}

struct StoreExports<'a>(&'a NbdContext);

impl Exports for StoreExports<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match self.0.resolve(name)? {
            Source::Volume(v) => Some(export_info(&v)),
            Source::Snapshot(v, s, _) => Some(ExportInfo {
                name: name.to_string(),
                description: format!("blockd snapshot {name} (read-only)"),
                size: s.size(),
                read_only: true,
                preferred_block: u32::try_from(v.extent_size()).unwrap_or(4096),
            }),
        }
    }
    fn list(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .0
            .store
            .list()
            .iter()
            .filter(|v| v.unexported().is_none())
            .map(|v| (v.name().to_string(), description(v)))
            .collect();
        for s in self.0.snapshots.list(None) {
            if s.damaged().is_none() {
                out.push((s.id(), format!("blockd snapshot {} (read-only)", s.id())));
            }
        }
        out
    }
    fn refused(&self, name: &str) -> Option<String> {
        let Some((vol, snap)) = name.split_once('@') else {
            let why = self.0.store.get(name)?.unexported()?;
            return Some(format!("volume {name} is not exported: {why}"));
        };
        let why = self.0.snapshots.get(vol, snap)?.damaged()?;
        Some(format!("snapshot {name} is damaged: {why}"))
    }
}

fn description(v: &Volume) -> String {
    format!("blockd volume {}", v.name())
}

fn export_info(v: &Volume) -> ExportInfo {
    ExportInfo {
        name: v.name().to_string(),
        description: description(v),
        size: v.size(),
        read_only: false,
        preferred_block: u32::try_from(v.extent_size()).unwrap_or(4096),
    }
}

/// Serves one client connection until it ends (the Unix socket: no TLS).
pub async fn serve<R, W>(reader: R, mut writer: W, ctx: NbdContext, peer: String)
where
    R: AsyncRead + splice::Source + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("nbd", peer = %peer);
    async move {
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let deadline = shutdown_deadline(ctx.shutdown.clone(), ctx.grace);
        let haggled = tokio::select! {
            r = handshake(&mut reader, &mut writer, &ctx, Tls::Unavailable) => r,
            () = deadline => Err(HandshakeEnd::Closed),
            () = tokio::time::sleep(HANDSHAKE_TIMEOUT) => Err(HandshakeEnd::TimedOut),
        };
        enter(haggled, reader, writer, ctx).await;
    }
    .instrument(span)
    .await;
}

/// Serves one TCP connection, upgrading it to TLS when the client asks
/// (and insisting when `tls` requires it). `greeting` is held until the
/// handshake ends (see [`super::serve_tcp`]).
pub async fn serve_tcp(
    stream: tokio::net::TcpStream,
    ctx: NbdContext,
    peer: String,
    tls: Option<Arc<TlsServer>>,
    greeting: tokio::sync::OwnedSemaphorePermit,
) {
    let span = tracing::info_span!("nbd", peer = %peer);
    async move {
        let mode = tls.as_ref().map_or(Tls::Unavailable, |t| t.mode());
        let (r, mut w) = stream.into_split();
        let mut reader = BufReader::with_capacity(READ_BUFFER, r);
        let deadline = shutdown_deadline(ctx.shutdown.clone(), ctx.grace);
        tokio::pin!(deadline);
        // One limit for the whole handshake, TLS included.
        let limit = tokio::time::sleep(HANDSHAKE_TIMEOUT);
        tokio::pin!(limit);
        let haggled = tokio::select! {
            r = handshake(&mut reader, &mut w, &ctx, mode) => r,
            () = &mut deadline => Err(HandshakeEnd::Closed),
            () = &mut limit => Err(HandshakeEnd::TimedOut),
        };
        let (nego, tls) = match (haggled, tls) {
            (Ok(Haggled::StartTls(nego)), Some(tls)) => (nego, tls),
            (haggled, _) => {
                drop(greeting);
                return enter(haggled, reader, w, ctx).await;
            }
        };
        // The client waits for the ACK before its ClientHello: anything
        // already buffered is a protocol violation (and would otherwise be
        // read as plain text behind the TLS layer's back).
        if !reader.buffer().is_empty() {
            tracing::info!("client sent data between STARTTLS and the TLS handshake");
            return;
        }
        let Ok(stream) = reader.into_inner().reunite(w) else {
            return;
        };
        let accept = tls.acceptor().accept(stream);
        let stream = tokio::select! {
            r = accept => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(error = %e, "TLS handshake failed");
                    return;
                }
            },
            () = &mut limit => {
                tracing::info!(secs = HANDSHAKE_TIMEOUT.as_secs(), "TLS handshake timed out");
                return;
            }
            () = &mut deadline => return,
        };
        {
            let (_, session) = stream.get_ref();
            tracing::debug!(
                version = ?session.protocol_version(),
                suite = ?session.negotiated_cipher_suite().map(|s| s.suite()),
                client_certificate = session.peer_certificates().is_some(),
                "TLS established"
            );
        }
        let (r, mut w) = tokio::io::split(stream);
        let mut reader = BufReader::with_capacity(READ_BUFFER, r);
        let mut nego = nego.after_tls();
        let haggled = tokio::select! {
            r = haggle(&mut reader, &mut w, &ctx, &mut nego) => r,
            () = &mut deadline => Err(HandshakeEnd::Closed),
            () = &mut limit => Err(HandshakeEnd::TimedOut),
        };
        drop(greeting);
        enter(haggled, reader, w, ctx).await;
    }
    .instrument(span)
    .await;
}

/// Serves one socket of a kernel attachment: the kernel client skips
/// the handshake (it was given size and flags by netlink), so the
/// transmission phase starts at once, with simple replies.
///
/// `guard` was taken when the attachment was asked for, so the volume
/// counts as busy from then on.
pub async fn serve_attached(
    stream: tokio::net::UnixStream,
    ctx: NbdContext,
    guard: ConnectionGuard,
) {
    let volume = guard.volume().clone();
    let span = tracing::info_span!("nbd", peer = %format!("kernel:{}", volume.name()));
    async move {
        let export = export_info(&volume);
        let t = Transmission {
            flags: export.transmission_flags(false),
            style: proto::ReplyStyle::Simple,
            contexts: Vec::new(),
            export,
        };
        let (r, w) = stream.into_split();
        let reader = BufReader::with_capacity(READ_BUFFER, r);
        transmit(
            reader,
            w,
            t,
            Source::Volume(volume),
            guard,
            ctx,
            Counted::Alone,
        )
        .await;
    }
    .instrument(span)
    .await;
}

/// The transmission flags a kernel attachment of `volume` is given.
pub fn attached_flags(volume: &Volume) -> u16 {
    export_info(volume).transmission_flags(false)
}

/// Read buffer of a connection.
const READ_BUFFER: usize = 256 << 10;
/// How long a client has from its connection to the start of
/// transmission, TLS handshake included: a connection that sends nothing,
/// or stops halfway, must not hold its socket and its buffers for ever
/// (qemu-nbd's `--handshake-limit` defaults to 10 s; this leaves room for
/// a slow TLS peer).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Enters transmission when the handshake chose an export.
async fn enter<R, W>(
    haggled: Result<Haggled, HandshakeEnd>,
    reader: BufReader<R>,
    writer: W,
    ctx: NbdContext,
) where
    R: AsyncRead + splice::Source + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    match haggled {
        Ok(Haggled::Transmit(t, source, guard)) => {
            transmit(reader, writer, t, source, guard, ctx, Counted::WithOthers).await;
        }
        // Only offered where the caller can upgrade.
        Ok(Haggled::StartTls(_)) | Err(HandshakeEnd::Closed) => {}
        Err(HandshakeEnd::Protocol(e)) => tracing::info!(error = %e, "handshake ended"),
        Err(HandshakeEnd::TimedOut) => tracing::info!(
            secs = HANDSHAKE_TIMEOUT.as_secs(),
            "handshake not finished in time: connection closed"
        ),
    }
}

async fn shutdown_deadline(token: CancellationToken, grace: Duration) {
    token.cancelled().await;
    tokio::time::sleep(grace).await;
}

enum HandshakeEnd {
    Closed,
    Protocol(String),
    /// Not finished within [`HANDSHAKE_TIMEOUT`].
    TimedOut,
}

impl From<std::io::Error> for HandshakeEnd {
    fn from(_: std::io::Error) -> Self {
        Self::Closed
    }
}

/// How option haggling ended, when it did not end the connection.
enum Haggled {
    /// The export, already opened (counted as a connection) before the
    /// client was told it may transmit.
    Transmit(Transmission, Source, ConnectionGuard),
    /// STARTTLS acknowledged; the negotiation so far.
    StartTls(Negotiation),
}

/// Greeting, client flags, then options.
async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    ctx: &NbdContext,
    tls: Tls,
) -> Result<Haggled, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&negotiate::greeting()).await?;
    writer.flush().await?;
    let flags = reader.read_u32().await?;
    let mut nego = Negotiation::new(flags)
        .map_err(|e| HandshakeEnd::Protocol(e.to_string()))?
        .with_tls(tls);
    haggle(reader, writer, ctx, &mut nego).await
}

/// Option haggling until an option ends it.
async fn haggle<R, W>(
    reader: &mut R,
    writer: &mut W,
    ctx: &NbdContext,
    nego: &mut Negotiation,
) -> Result<Haggled, HandshakeEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let magic = reader.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(HandshakeEnd::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = reader.read_u32().await?;
        let len = reader.read_u32().await?;
        if len > proto::MAX_OPTION_LEN {
            if len > MAX_DRAIN {
                return Err(HandshakeEnd::Protocol(format!(
                    "option {option} with {len} bytes of data"
                )));
            }
            tokio::io::copy(
                &mut (&mut *reader).take(u64::from(len)),
                &mut tokio::io::sink(),
            )
            .await?;
            let mut out = Vec::new();
            negotiate::option_error(
                &mut out,
                option,
                proto::REP_ERR_TOO_BIG,
                "option data too large",
            );
            writer.write_all(&out).await?;
            writer.flush().await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data).await?;
        let exports = StoreExports(ctx);
        let (mut out, mut next) = nego.option(option, &data, &exports, ctx.shutdown.is_cancelled());
        // The export is opened, and counted, before the reply that lets the
        // client transmit is sent: a delete (or a stopped lazy restore)
        // racing this connection either sees it and is refused, or wins
        // and this client is told no here, never cut off after a GO.
        let mut opened = None;
        if let Next::Transmit(t) = &next {
            match ctx.open(&t.export.name) {
                Some(o) => opened = Some(o),
                None => {
                    out.clear();
                    next = if option == proto::OPT_GO {
                        let why = exports.refused(&t.export.name).unwrap_or_else(|| {
                            format!(
                                "export {:?} is going away (being deleted, or its restore stopped): it takes no new connections",
                                t.export.name
                            )
                        });
                        negotiate::option_error(&mut out, option, proto::REP_ERR_POLICY, &why);
                        Next::Continue
                    } else {
                        // EXPORT_NAME has no error reply: close.
                        Next::Close
                    };
                }
            }
        }
        if !out.is_empty() {
            // After ABORT the client may already be gone: ignore write errors then.
            let r = writer.write_all(&out).await;
            let r = match r {
                Ok(()) => writer.flush().await,
                Err(e) => Err(e),
            };
            if r.is_err() && next != Next::Close {
                return Err(HandshakeEnd::Closed);
            }
        }
        match next {
            Next::Continue => {}
            Next::Close => return Err(HandshakeEnd::Closed),
            Next::Transmit(t) => {
                return match opened {
                    Some((source, guard)) => Ok(Haggled::Transmit(t, source, guard)),
                    None => Err(HandshakeEnd::Closed),
                };
            }
            Next::StartTls => return Ok(Haggled::StartTls(nego.clone())),
        }
    }
}

enum ReadPlan {
    /// The whole range is a hole: this reply says so.
    AllHole(Vec<u8>),
    /// Read the data; these `(start, len)` ranges are holes.
    Data(Vec<(u64, u64)>),
}

/// Per-connection facts every request task needs.
struct Conn {
    volume: Arc<Volume>,
    /// Set when this connection reads a snapshot's frozen image.
    snapshot: Option<Arc<SnapshotStore>>,
    style: ReplyStyle,
    contexts: Vec<u32>,
    replies: mpsc::UnboundedSender<Vec<u8>>,
    /// Bytes of replies sent to the writer and not yet on the socket.
    backlog: Arc<Backlog>,
    buffers: Arc<BufPool>,
    behind: Arc<Behind>,
}

/// Writes answered inline whose writeback is to start once their replies
/// are on the socket (write-behind: see [`crate::volume::behind`]). The
/// writer task starts it: then the client already has its answer and is
/// on its way to the FLUSH that this writeback shortens.
struct Behind {
    volume: Arc<Volume>,
    ranges: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Behind {
    fn push(&self, offset: u64, len: u64) {
        self.ranges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((offset, len));
    }

    /// Starts the writeback of every range pushed so far.
    fn start(&self) {
        let ranges = std::mem::take(
            &mut *self
                .ranges
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if !ranges.is_empty() {
            self.volume.start_writeback(&ranges);
        }
    }
}

async fn transmit<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    t: Transmission,
    source: Source,
    _guard: ConnectionGuard,
    ctx: NbdContext,
    counted: Counted,
) where
    R: AsyncRead + splice::Source + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Held until the connection ends: it counts as open meanwhile.
    let (volume, snapshot, _reader) = match source {
        Source::Volume(v) => (v, None, None),
        Source::Snapshot(v, s, reader) => (v, Some(s), reader),
    };
    let snapshot_closing = snapshot
        .as_ref()
        .map_or_else(CancellationToken::new, |s| s.closing.clone());
    let extended = t.style == ReplyStyle::Extended;
    let limits = proto::ExportLimits {
        size: t.export.size,
        read_only: t.export.read_only,
        structured: t.style != ReplyStyle::Simple,
        has_meta_context: !t.contexts.is_empty(),
        extended,
    };
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let dead = CancellationToken::new();
    let buffers = Arc::new(BufPool::prefilled(match counted {
        Counted::WithOthers => Some(ctx.memory.clone()),
        Counted::Alone => None,
    }));
    let behind = Arc::new(Behind {
        volume: volume.clone(),
        ranges: std::sync::Mutex::new(Vec::new()),
    });
    let backlog = Arc::new(Backlog::default());
    let writer_task = tokio::spawn(write_replies(
        writer,
        rx,
        dead.clone(),
        buffers.clone(),
        behind.clone(),
        backlog.clone(),
    ));
    let conn = Arc::new(Conn {
        volume: volume.clone(),
        snapshot,
        style: t.style,
        contexts: t.contexts,
        replies: tx,
        backlog: backlog.clone(),
        buffers,
        behind,
    });
    let budget = Arc::new(Semaphore::new(BUDGET_PERMITS));
    let deadline = shutdown_deadline(ctx.shutdown.clone(), ctx.grace);
    tokio::pin!(deadline);
    let mut header = vec![0u8; proto::request_len(extended)];
    let opened = std::time::Instant::now();
    let mut requests = 0u64;
    tracing::info!(export = %t.export.name, style = ?t.style, "NBD connection opened");
    // Small writes gathered while a frozen image is held; they go down
    // together once no further request is waiting in the buffer.
    let mut batch: Vec<InFlight> = Vec::new();
    // Large writes go through this pipe (see [`splice`]), made before the
    // first request: the kernel's writeback through an attachment must
    // not need a new pipe, and its memory, to be served (kernel-notes/
    // nbd.md). None on a transport that cannot splice or a read-only
    // export.
    let mut pipe = if reader.get_ref().socket().is_some() && !t.export.read_only {
        payload_pipe()
    } else {
        None
    };
    // Set after a spliced write: the next header is read on its own, not
    // with as much of the next payload as the read buffer takes (that
    // part would be copied out of the socket instead of spliced).
    let mut header_alone = false;
    loop {
        if !batch.is_empty() && (batch.len() >= BATCH_MAX || reader.buffer().len() < header.len()) {
            conn.write_batch(std::mem::take(&mut batch));
        }
        // A client that does not read its replies is not read from either
        // until they go out: what it can make this connection hold is
        // bounded (the budget below counts a request only until its reply
        // is queued).
        if backlog.over() {
            tokio::select! {
                biased;
                () = ended(&dead, &volume.closing, &snapshot_closing, deadline.as_mut()) => break,
                () = backlog.drained() => {}
            }
        }
        let alone_now = header_alone && reader.buffer().is_empty();
        let read = tokio::select! {
            biased;
            () = ended(&dead, &volume.closing, &snapshot_closing, deadline.as_mut()) => break,
            r = read_header(&mut reader, &mut header, alone_now) => r,
        };
        header_alone = false;
        if read.is_err() {
            break;
        }
        let req = match proto::parse_request(&header, extended) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(error = %e, "malformed request: closing the connection");
                break;
            }
        };
        let payload_len = req.payload_len(extended);
        if payload_len > u64::from(proto::MAX_PAYLOAD) {
            tracing::info!(
                length = payload_len,
                "payload beyond 32 MiB: closing the connection"
            );
            break;
        }
        if req.command == Command::Disc {
            break;
        }
        requests += 1;
        let started = std::time::Instant::now();
        // Budget: count the payload (or, for reads, the data to send back).
        let cost = match req.command {
            Command::Read => req.length.min(u64::from(proto::MAX_PAYLOAD)),
            // No payload, but a reply of up to MAX_STATUS_RUNS runs per
            // context (16 bytes each in the extended form, plus headers).
            Command::BlockStatus => (conn.contexts.len() * (MAX_STATUS_RUNS * 16 + 64)) as u64,
            _ => payload_len,
        };
        let permits = u32::try_from(cost / BUDGET_UNIT as u64 + 1).unwrap_or(u32::MAX);
        let Ok(own) = budget.clone().acquire_many_owned(permits).await else {
            break;
        };
        // At shutdown a request is only answered ESHUTDOWN: no READ's data.
        let shared = match counted {
            Counted::Alone => None,
            Counted::WithOthers if ctx.shutdown.is_cancelled() => None,
            Counted::WithOthers => match ctx.memory.try_take(permits) {
                Some(p) => Some(p),
                None => {
                    // Writes gathered here hold memory too, and go down
                    // only when this loop goes on: they must not wait
                    // behind it (with every connection doing the same,
                    // nothing would ever be freed).
                    if !batch.is_empty() {
                        conn.write_batch(std::mem::take(&mut batch));
                    }
                    // Other clients hold the memory, and this one may give
                    // up meanwhile: a connection whose client has gone
                    // must not keep its slot while it waits (see
                    // [`client_gone`]).
                    let taken = tokio::select! {
                        biased;
                        () = ended(&dead, &volume.closing, &snapshot_closing, deadline.as_mut()) => break,
                        () = client_gone(&reader, &req) => break,
                        p = ctx.memory.take(permits) => p,
                    };
                    let Ok(p) = taken else {
                        break;
                    };
                    Some(p)
                }
            },
        };
        let permit = Charge {
            own,
            shared,
            backlog: backlog.clone(),
        };
        let mut payload = Vec::new();
        if payload_len > 0 {
            // At most MAX_PAYLOAD, checked above.
            let len = usize::try_from(payload_len).unwrap_or(0);
            let splice_it = pipe.is_some()
                && len > INLINE_WRITE_MAX
                && !ctx.shutdown.is_cancelled()
                && conn.spliceable(&req, &limits);
            if let Some(p) = pipe.as_mut().filter(|_| splice_it) {
                if !batch.is_empty() {
                    conn.write_batch(std::mem::take(&mut batch));
                }
                let streamed = tokio::select! {
                    biased;
                    () = ended(&dead, &volume.closing, &snapshot_closing, deadline.as_mut()) => break,
                    r = conn.write_streamed(&mut reader, p, &req) => r,
                };
                if streamed.is_err() {
                    break;
                }
                let (op, bytes) = metered(&req);
                volume.stats.request(op, bytes, started.elapsed());
                drop(permit);
                header_alone = true;
                continue;
            }
            payload = conn.buffers.take(len);
            // A client that stops mid-payload must not keep the connection
            // (and with it a forced delete or the shutdown) waiting.
            let read = tokio::select! {
                biased;
                () = ended(&dead, &volume.closing, &snapshot_closing, deadline.as_mut()) => break,
                r = reader.read_exact(&mut payload) => r,
            };
            if read.is_err() {
                break;
            }
        }
        if ctx.shutdown.is_cancelled() {
            conn.error(&req, Errno::Shutdown, "server is shutting down");
            continue;
        }
        if let Err(errno) = proto::check_request(&req, &limits) {
            conn.error(&req, errno, "invalid request");
            continue;
        }
        if extended && req.command != Command::Write && payload_len > 0 {
            conn.error(&req, Errno::Inval, "this command takes no payload");
            continue;
        }
        let request = InFlight {
            req,
            payload,
            permit,
            started,
        };
        if conn.batchable(&request) {
            batch.push(request);
            continue;
        }
        if !batch.is_empty() {
            conn.write_batch(std::mem::take(&mut batch));
        }
        // Page-cache hits and small buffered writes finish right here, with
        // no task and no thread hop; everything else runs concurrently.
        // Only this request holds budget: nothing else of this connection
        // is in flight, so serving it inline holds nothing up.
        let alone = budget.available_permits() + request.permit.own.num_permits() == BUDGET_PERMITS;
        let InFlight {
            req,
            payload,
            permit,
            started,
        } = request;
        match conn.try_inline(&req, payload, alone) {
            None => {
                let (op, bytes) = metered(&req);
                volume.stats.request(op, bytes, started.elapsed());
            }
            Some(payload) => conn.spawn_handle(InFlight {
                req,
                payload,
                permit,
                started,
            }),
        }
    }
    if !batch.is_empty() {
        conn.write_batch(batch);
    }
    // Running requests hold their own sender; the writer ends after the
    // last. A request that never ends (a fetch from a store that stopped
    // answering) must not keep the socket, and with it a deleted volume's
    // file or the daemon's shutdown, forever: its reply is dropped instead.
    drop(conn);
    let mut writer_task = writer_task;
    if tokio::time::timeout(REPLIES_AFTER_CLOSE, &mut writer_task)
        .await
        .is_err()
    {
        tracing::warn!(
            export = %t.export.name,
            secs = REPLIES_AFTER_CLOSE.as_secs(),
            "requests still running after the connection ended: closing it without their replies"
        );
        writer_task.abort();
    }
    tracing::info!(
        export = %t.export.name,
        requests,
        secs = opened.elapsed().as_secs_f64(),
        "NBD connection closed"
    );
}

/// Resolves when a connection must end whatever it is waiting for: its
/// reply writer died, its volume (or the snapshot it reads) is closing,
/// or the shutdown's grace ran out.
async fn ended(
    dead: &CancellationToken,
    closing: &CancellationToken,
    snapshot_closing: &CancellationToken,
    deadline: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) {
    tokio::select! {
        biased;
        () = dead.cancelled() => {}
        () = closing.cancelled() => {}
        () = snapshot_closing.cancelled() => {}
        () = deadline => {}
    }
}

/// Resolves (checked every second) once a connection waiting to serve
/// `req` may end without it: its client has closed the connection both
/// ways, nothing it sent is left unread, and `req` changes nothing (a
/// READ, BLOCK_STATUS, CACHE or FLUSH, whose only effect is a reply that
/// can no longer arrive). Everything a client sent that writes is served,
/// even after it has gone, and a client that only closed its sending side
/// (libnbd after NBD_CMD_DISC) still gets its replies. Never on a
/// transport that is not a plain socket.
async fn client_gone<R: AsyncRead + splice::Source>(reader: &BufReader<R>, req: &Request) {
    let harmless = matches!(
        req.command,
        Command::Read | Command::BlockStatus | Command::Cache | Command::Flush
    );
    let Some(socket) = reader.get_ref().socket().filter(|_| harmless) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if reader.buffer().is_empty() && socket.gone() {
            return;
        }
    }
}

/// A pipe for large writes' payloads, or `None` (they then go through
/// buffers) when the kernel gives none of at least [`WRITE_STEP`].
fn payload_pipe() -> Option<Pipe> {
    match Pipe::new() {
        Ok(p) if p.capacity() >= WRITE_STEP => Some(p),
        Ok(p) => {
            tracing::debug!(
                capacity = p.capacity(),
                "payload pipe too small: large writes go through buffers"
            );
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "no pipe for large writes: they go through buffers");
            None
        }
    }
}

/// Reads a request header, from the read buffer or (`alone`, when the
/// buffer is empty) straight from the transport, so that no byte past the
/// header is read.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    header: &mut [u8],
    alone: bool,
) -> std::io::Result<usize> {
    if alone {
        reader.get_mut().read_exact(header).await
    } else {
        reader.read_exact(header).await
    }
}

/// A request read from the socket and not yet answered, with the budget
/// it holds.
struct InFlight {
    req: Request,
    payload: Vec<u8>,
    permit: Charge,
    started: std::time::Instant,
}

/// Whether a connection's requests count against [`super::Memory`].
#[derive(Debug, Clone, Copy)]
enum Counted {
    /// Clients on the sockets.
    WithOthers,
    /// Kernel attachments (see [`super::Memory`]).
    Alone,
}

/// The budget one request holds: its connection's, given back once its
/// reply is queued (when it is dropped), and the daemon-wide share, given
/// back once that reply has been written to the socket.
struct Charge {
    own: OwnedSemaphorePermit,
    shared: Option<OwnedSemaphorePermit>,
    backlog: Arc<Backlog>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            self.backlog.release_when_written(shared);
        }
    }
}

/// The metrics class of a request and the bytes it moves.
fn metered(req: &Request) -> (crate::metrics::Op, u64) {
    use crate::metrics::Op;
    match req.command {
        Command::Read => (Op::Read, req.length),
        Command::Write => (Op::Write, req.length),
        Command::Flush => (Op::Flush, 0),
        _ => (Op::Other, 0),
    }
}

/// Replies queued for a connection's writer and not yet written.
#[derive(Debug)]
struct Backlog {
    bytes: std::sync::atomic::AtomicUsize,
    written: tokio::sync::Notify,
    /// Bytes ever queued, and ever written: replies go out in the order
    /// they were queued, so a reply queued when `queued` was N has been
    /// written once `sent` reaches N.
    queued: std::sync::atomic::AtomicU64,
    sent: std::sync::atomic::AtomicU64,
    /// Daemon-wide memory of requests answered, each held until `sent`
    /// reaches its mark; `None` once the writer has gone (nothing more is
    /// written, and what is queued is dropped).
    releases: std::sync::Mutex<Option<std::collections::VecDeque<(u64, OwnedSemaphorePermit)>>>,
}

impl Default for Backlog {
    fn default() -> Self {
        Self {
            bytes: std::sync::atomic::AtomicUsize::new(0),
            written: tokio::sync::Notify::new(),
            queued: std::sync::atomic::AtomicU64::new(0),
            sent: std::sync::atomic::AtomicU64::new(0),
            releases: std::sync::Mutex::new(Some(std::collections::VecDeque::new())),
        }
    }
}

/// Gives back a connection's held memory when its reply writer ends, by
/// any path (its socket failed, the connection ended, or it was aborted):
/// requests still running then hold nothing for replies that will never
/// be written.
struct WriterGone(Arc<Backlog>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        let released = self
            .0
            .releases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(released);
    }
}

/// Replies a connection may have queued before it stops reading requests.
const BACKLOG_MAX: usize = 64 << 20;

impl Backlog {
    fn queued(&self, n: usize) {
        self.bytes.fetch_add(n, std::sync::atomic::Ordering::AcqRel);
        self.queued
            .fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel);
    }

    fn sent(&self, n: usize) {
        let sent = self
            .sent
            .fetch_add(n as u64, std::sync::atomic::Ordering::AcqRel)
            + n as u64;
        if let Some(releases) = self
            .releases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            Self::release_written(releases, sent);
        }
        // Only a reader that found the backlog over the limit waits, and
        // it is woken by the write that brings it down from there: the
        // common case takes no lock.
        let before = self.bytes.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
        if before > BACKLOG_MAX {
            self.written.notify_waiters();
        }
    }

    /// Holds `permit` until every reply queued so far has been written
    /// (the reply of the request it counted among them).
    fn release_when_written(&self, permit: OwnedSemaphorePermit) {
        let mut guard = self
            .releases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(releases) = guard.as_mut() else {
            // The writer has gone: nothing is held for it.
            drop(guard);
            drop(permit);
            return;
        };
        // Read under the lock, so that marks only grow along the queue.
        let mark = self.queued.load(std::sync::atomic::Ordering::Acquire);
        releases.push_back((mark, permit));
        // Under the lock: a write that counted itself before it took the
        // lock is seen here; one after finds the entry.
        let sent = self.sent.load(std::sync::atomic::Ordering::Acquire);
        Self::release_written(releases, sent);
    }

    /// Drops the permits whose replies are among the `sent` bytes.
    fn release_written(
        releases: &mut std::collections::VecDeque<(u64, OwnedSemaphorePermit)>,
        sent: u64,
    ) {
        while releases.front().is_some_and(|(mark, _)| *mark <= sent) {
            releases.pop_front();
        }
    }

    fn over(&self) -> bool {
        self.bytes.load(std::sync::atomic::Ordering::Acquire) > BACKLOG_MAX
    }

    /// Resolves once the backlog is down to [`BACKLOG_MAX`].
    async fn drained(&self) {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if !self.over() {
                return;
            }
            written.await;
        }
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    dead: CancellationToken,
    buffers: Arc<BufPool>,
    behind: Arc<Behind>,
    backlog: Arc<Backlog>,
) {
    let _gone = WriterGone(backlog.clone());
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        if write_all_vectored(&mut writer, &batch).await.is_err() {
            dead.cancel();
            return;
        }
        backlog.sent(batch.iter().map(Vec::len).sum());
        for b in batch.drain(..) {
            buffers.give(b);
        }
        behind.start();
    }
    let _ = writer.shutdown().await;
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &[Vec<u8>],
) -> std::io::Result<()> {
    if let [one] = bufs {
        return w.write_all(one).await;
    }
    let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

impl Conn {
    fn send(&self, reply: Vec<u8>) {
        self.backlog.queued(reply.len());
        // The writer is gone only when the connection is closing anyway.
        let _ = self.replies.send(reply);
    }

    fn error(&self, req: &Request, errno: Errno, message: &str) {
        self.volume.stats.error();
        let mut out = Vec::new();
        proto::error_reply(&mut out, self.style, req.cookie, req.offset, errno, message);
        self.send(out);
    }

    fn ok(&self, req: &Request) {
        let mut out = Vec::with_capacity(32);
        proto::ok_reply(&mut out, self.style, req.cookie, req.offset);
        self.send(out);
    }

    fn io_result(&self, req: &Request, r: std::io::Result<()>) {
        match r {
            Ok(()) => self.ok(req),
            Err(e) => {
                tracing::warn!(volume = %self.volume.name(), command = %req.command, offset = req.offset, error = %e, "I/O error");
                self.error(req, errno_of(&e), &e.to_string());
            }
        }
    }

    /// Serves `req` on the caller's thread when that cannot block for long:
    /// a READ fully in the page cache, or a small non-FUA WRITE. Returns the
    /// payload back when the request must go to [`Conn::handle`].
    /// `alone`: no other request of this connection is in flight.
    /// Serves `r` in its own task.
    fn spawn_handle(self: &Arc<Self>, r: InFlight) {
        let conn = self.clone();
        tokio::spawn(async move {
            let (op, bytes) = metered(&r.req);
            conn.handle(r.req, r.payload).await;
            conn.volume.stats.request(op, bytes, r.started.elapsed());
            drop(r.permit);
        });
    }

    /// A small non-FUA write to a volume that holds a frozen image: worth
    /// gathering, since its copy-on-write copy is cheaper made with others.
    fn batchable(&self, r: &InFlight) -> bool {
        r.req.command == Command::Write
            && r.req.flags & proto::CMD_FLAG_FUA == 0
            && r.payload.len() <= INLINE_WRITE_MAX
            && self.snapshot.is_none()
            && !self.volume.is_lazy()
            && self.volume.holds_frozen_images()
    }

    /// Serves gathered writes from the caller's thread: the copies of the
    /// extents they overwrite are made together, with one data write and
    /// one index write per frozen image instead of two per extent
    /// (kernel-notes/README.md, "Copy-on-write"). The NBD protocol lets a
    /// server complete a client's in-flight requests in any order; each is
    /// answered once it is done.
    fn write_batch(self: &Arc<Self>, batch: Vec<InFlight>) {
        // A freeze holds the gate: then each write waits in its own task.
        let Ok(gate) = self.volume.gate.try_read() else {
            for r in batch {
                self.spawn_handle(r);
            }
            return;
        };
        let writes: Vec<(u64, &[u8])> = batch
            .iter()
            .map(|r| (r.req.offset, r.payload.as_slice()))
            .collect();
        self.volume.write_many_cached(&writes, |i, result| {
            let r = &batch[i];
            self.io_result(&r.req, result);
            let (op, bytes) = metered(&r.req);
            self.volume.stats.request(op, bytes, r.started.elapsed());
        });
        drop(gate);
        drop(writes);
        for r in batch {
            self.buffers.give(r.payload);
        }
    }

    /// Whether a WRITE's payload may go through the pipe: a valid
    /// non-FUA write to a volume that serves it from its own file.
    fn spliceable(&self, req: &Request, limits: &proto::ExportLimits) -> bool {
        req.command == Command::Write
            && req.flags & proto::CMD_FLAG_FUA == 0
            && self.snapshot.is_none()
            && !self.volume.is_lazy()
            && proto::check_request(req, limits).is_ok()
    }

    /// Receives a WRITE's payload through `pipe` and writes it as it
    /// arrives, from the caller's thread, then answers it. Each step of
    /// at most [`WRITE_STEP`] bytes is written as a write of its own, under
    /// the gate, once the pipe holds it: the gate is never held while the
    /// client is still sending, and a freeze that comes in between splits
    /// the write as a disk may split any write it has not acknowledged.
    /// An error means the connection failed mid-payload.
    async fn write_streamed<R>(
        &self,
        reader: &mut BufReader<R>,
        pipe: &mut Pipe,
        req: &Request,
    ) -> std::io::Result<()>
    where
        R: AsyncRead + splice::Source + Unpin,
    {
        let len = usize::try_from(req.length).unwrap_or(0);
        pipe.start(len);
        let mut at = 0;
        let mut result = Ok(());
        while at < len {
            let offset = req.offset + at as u64;
            let want = write_step(offset, len - at);
            let n = pipe.fill(reader, want).await?;
            if n == 0 {
                // The payload's count is off: go no further with it.
                return Err(std::io::Error::other("payload pipe ran dry mid-write"));
            }
            let r = {
                let _gate = match self.volume.gate.try_read() {
                    Ok(g) => g,
                    Err(_) => self.volume.gate.read().await,
                };
                self.volume.write_cached_from_pipe(offset, n, pipe.output())
            };
            if let Err(e) = r {
                result = Err(e);
                pipe.skip(reader).await?;
                break;
            }
            pipe.took(n);
            at += n;
        }
        if result.is_ok() && self.volume.write_behind(len as u64) {
            self.behind.push(req.offset, len as u64);
        }
        self.io_result(req, result);
        Ok(())
    }

    fn try_inline(&self, req: &Request, payload: Vec<u8>, alone: bool) -> Option<Vec<u8>> {
        if self.snapshot.is_some() || self.volume.is_lazy() {
            return Some(payload);
        }
        // A freeze holds the gate: then the request waits in its own task.
        let Ok(_gate) = self.volume.gate.try_read() else {
            return Some(payload);
        };
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        match req.command {
            Command::Write if !fua && payload.len() <= INLINE_WRITE_MAX => {
                let r = self.volume.write_cached(req.offset, &payload);
                let len = payload.len() as u64;
                if r.is_ok() && self.volume.write_behind(len) {
                    self.behind.push(req.offset, len);
                }
                self.io_result(req, r);
                self.buffers.give(payload);
                None
            }
            Command::Read if req.length > 0 && req.length <= INLINE_READ_MAX => {
                let holes = match self.read_holes(req) {
                    ReadPlan::AllHole(reply) => {
                        self.send(reply);
                        return None;
                    }
                    ReadPlan::Data(holes) => holes,
                };
                let hdr = proto::read_reply_header_len(self.style);
                let len = usize::try_from(req.length).unwrap_or(0);
                let buf = self.buffers.take(hdr + len);
                match self.volume.read_cached(buf, hdr, req.offset) {
                    Ok(buf) => {
                        let df = req.flags & proto::CMD_FLAG_DF != 0;
                        self.send(proto::finish_read_reply(
                            buf, self.style, req.cookie, req.offset, &holes, df,
                        ));
                        None
                    }
                    Err((buf, _)) => {
                        self.buffers.give(buf);
                        Some(payload)
                    }
                }
            }
            // A lone FLUSH (a commit at queue depth 1) syncs right here: a
            // hop to another thread and back costs as much as the sync
            // itself (kernel-notes/nbd.md, "FLUSH"). The client waits for
            // this reply before it sends more, and the runtime's other
            // workers take over this one's queued tasks meanwhile.
            Command::Flush if alone => match self.volume.flush_blocking() {
                Some(r) => {
                    self.io_result(req, r);
                    None
                }
                None => Some(payload),
            },
            _ => Some(payload),
        }
    }

    async fn handle(&self, req: Request, payload: Vec<u8>) {
        // A read of nothing is answered with no data, for a volume and a
        // snapshot alike: a data chunk of length 0 is not a valid reply.
        if req.command == Command::Read && req.length == 0 {
            return self.empty_read(&req);
        }
        if let Some(s) = &self.snapshot {
            return self.handle_snapshot(s, req).await;
        }
        let _gate = self.volume.gate.read().await;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let v = &self.volume;
        match req.command {
            Command::Read => self.read(&req).await,
            Command::Write => match v.write(req.offset, payload, 0, fua).await {
                Ok(buf) => {
                    self.buffers.give(buf);
                    self.ok(&req);
                }
                Err(e) => self.io_result(&req, Err(e)),
            },
            Command::Flush => {
                let r = v.flush().await;
                self.io_result(&req, r);
            }
            Command::Trim => {
                let r = v.trim(req.offset, req.length, fua).await;
                self.io_result(&req, r);
            }
            Command::WriteZeroes => {
                let no_hole = req.flags & proto::CMD_FLAG_NO_HOLE != 0;
                let fast = req.flags & proto::CMD_FLAG_FAST_ZERO != 0;
                match v
                    .write_zeroes(req.offset, req.length, no_hole, fast, fua)
                    .await
                {
                    Ok(()) => self.ok(&req),
                    Err(ZeroError::NotFast) => {
                        self.error(&req, Errno::NotSup, "fast zeroing not supported")
                    }
                    Err(ZeroError::Io(e)) => self.io_result(&req, Err(e)),
                }
            }
            Command::Cache => {
                let r = v.cache(req.offset, req.length).await;
                self.io_result(&req, r);
            }
            Command::BlockStatus => self.block_status(&req),
            Command::Disc | Command::Unknown(_) => {
                self.error(&req, Errno::Inval, "unknown command")
            }
        }
    }

    /// The reply to a read of length 0: success and no data.
    fn empty_read(&self, req: &Request) {
        let mut out = Vec::new();
        match self.style {
            ReplyStyle::Simple => proto::simple_reply(&mut out, req.cookie, 0),
            style => proto::chunk_header(
                &mut out,
                style,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                req.cookie,
                req.offset,
                0,
            ),
        }
        self.send(out);
    }

    async fn read(&self, req: &Request) {
        let v = &self.volume;
        // check_request bounds length by MAX_PAYLOAD.
        let len = usize::try_from(req.length).unwrap_or(0);
        let df = req.flags & proto::CMD_FLAG_DF != 0;
        let holes = match self.read_holes(req) {
            ReadPlan::AllHole(reply) => return self.send(reply),
            ReadPlan::Data(holes) => holes,
        };
        let hdr = proto::read_reply_header_len(self.style);
        match v.read(self.buffers.take(hdr + len), hdr, req.offset).await {
            Ok(buf) => {
                let reply =
                    proto::finish_read_reply(buf, self.style, req.cookie, req.offset, &holes, df);
                self.send(reply);
            }
            Err(e) => self.io_result(req, Err(e)),
        }
    }

    /// Where the range to read has holes: a range that is all hole is
    /// answered with one OFFSET_HOLE chunk and nothing is read.
    fn read_holes(&self, req: &Request) -> ReadPlan {
        let mut holes = Vec::new();
        if self.style == ReplyStyle::Simple {
            return ReadPlan::Data(holes);
        }
        match self.volume.allocation(req.offset, req.length, 64) {
            Ok(runs) => {
                let mut pos = 0u64;
                for r in &runs {
                    if r.hole {
                        holes.push((pos, r.length));
                    }
                    pos += r.length;
                }
                if holes == [(0, req.length)] {
                    let mut out = Vec::new();
                    proto::hole_reply(&mut out, self.style, req.cookie, req.offset, req.length);
                    return ReadPlan::AllHole(out);
                }
                // Tiny holes are not worth a chunk each.
                holes.retain(|&(_, l)| l >= 4096);
            }
            Err(e) => tracing::debug!(error = %e, "allocation query failed; sending data"),
        }
        ReadPlan::Data(holes)
    }

    /// Requests on a snapshot export: reads of the frozen image; writes
    /// never get here (the export is read-only: EPERM).
    async fn handle_snapshot(&self, s: &SnapshotStore, req: Request) {
        match req.command {
            Command::Read => {
                let hdr = proto::read_reply_header_len(self.style);
                let len = usize::try_from(req.length).unwrap_or(0);
                let buf = self.buffers.take(hdr + len);
                match self.volume.read_frozen(s, buf, hdr, req.offset).await {
                    Ok(buf) => self.send(proto::finish_read_reply(
                        buf,
                        self.style,
                        req.cookie,
                        req.offset,
                        &[],
                        true,
                    )),
                    Err(e) => {
                        tracing::warn!(snapshot = %s.id(), offset = req.offset, error = %e, "snapshot read failed");
                        self.io_result(&req, Err(e));
                    }
                }
            }
            Command::Flush | Command::Cache => self.ok(&req),
            Command::BlockStatus => self.block_status(&req),
            _ => self.error(&req, Errno::Perm, "snapshot exports are read-only"),
        }
    }

    /// Changed and unchanged byte runs of the request range, from the
    /// volume's dirty map, or for a snapshot export from its change set
    /// (bit 0 = changed).
    fn dirty_extents(&self, req: &Request, max_runs: usize) -> Vec<Extent> {
        let es = self.volume.extent_size();
        let end = req.offset + req.length;
        let first = req.offset / es;
        let last = end.div_ceil(es);
        let mut pos = req.offset;
        let changes = match &self.snapshot {
            Some(s) => s.changes().clone(),
            None => self.volume.dirty.current(),
        };
        changes
            .runs(first, last, max_runs)
            .into_iter()
            .map_while(|(n, dirty)| {
                // Runs are in extents; the first may start mid-extent and the
                // last is clamped to the request.
                if pos >= end {
                    return None;
                }
                let stop = (pos / es + n).saturating_mul(es).min(end);
                let e = Extent {
                    length: stop - pos,
                    flags: u32::from(dirty),
                };
                pos = stop;
                Some(e)
            })
            .collect()
    }

    fn block_status(&self, req: &Request) {
        let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let max_runs = if req_one { 1 } else { MAX_STATUS_RUNS };
        // Runs never extend past the request, whose length fits the 32-bit
        // descriptors of structured replies (compact requests are 32-bit).
        let mut out = Vec::new();
        let last = self.contexts.len().saturating_sub(1);
        for (i, &ctx) in self.contexts.iter().enumerate() {
            let extents: Vec<Extent> = match ctx {
                CONTEXT_BASE_ALLOCATION => {
                    let runs = match &self.snapshot {
                        Some(s) => self
                            .volume
                            .frozen_allocation(&**s, req.offset, req.length, max_runs),
                        None => self.volume.allocation(req.offset, req.length, max_runs),
                    };
                    match runs {
                        Ok(runs) => runs
                            .iter()
                            .map(|r| Extent {
                                length: r.length,
                                flags: if r.hole {
                                    proto::STATE_HOLE | proto::STATE_ZERO
                                } else {
                                    0
                                },
                            })
                            .collect(),
                        Err(e) => return self.io_result(req, Err(e)),
                    }
                }
                CONTEXT_BLOCKD_DIRTY | CONTEXT_QEMU_DIRTY => self.dirty_extents(req, max_runs),
                _ => continue,
            };
            let extents = if req_one {
                &extents[..extents.len().min(1)]
            } else {
                &extents[..]
            };
            proto::block_status_chunk(
                &mut out,
                self.style,
                req.cookie,
                req.offset,
                ctx,
                extents,
                i == last,
            );
        }
        self.send(out);
    }
}

/// Maps an I/O error to the NBD error the client sees. The one place that
/// decides this.
pub fn errno_of(e: &std::io::Error) -> Errno {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Errno::NoSpc,
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => Errno::Perm,
        Some(libc::ENOMEM) => Errno::NoMem,
        Some(libc::EINVAL) => Errno::Inval,
        Some(libc::EOPNOTSUPP) => Errno::NotSup,
        _ => Errno::Io,
    }
}
