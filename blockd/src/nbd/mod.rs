//! NBD: the wire codec ([`proto`]), option negotiation ([`negotiate`]) and
//! the connection server ([`server`]), plus the listeners.
//!
//! The Unix socket is always served; TCP only when `--nbd-listen` asks for
//! it. Every TCP socket gets TCP_NODELAY: replies are written in one piece,
//! and a reply split by Nagle waits on the peer's delayed ACK (~40-90 ms).

pub mod buffers;
pub mod negotiate;
pub mod proto;
pub mod server;
pub mod splice;
pub mod tls;

use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::api::access::{Access, Peer};
use crate::quiet::every_ten_seconds;

pub use server::NbdContext;

/// Most client connections by default (`--nbd-max-connections`; Unix
/// socket and TCP together, kernel attachments not counted). Each holds
/// about 1.3 MiB, locked in memory under `mlockall` (its read buffer and
/// the buffers it starts with, see [`buffers`]), and three descriptors:
/// without a limit, idle connections alone could take the daemon's memory
/// or descriptors, and with them every new client, the control API's
/// included.
pub const MAX_CONNECTIONS: usize = 1024;

/// What client connections may hold together by default
/// (`--nbd-max-memory`): see [`Memory`].
pub const MAX_MEMORY: u64 = 1 << 30;
/// The least `--nbd-max-memory`: a request of the largest payload and
/// its reply must always fit, with room for others beside it.
pub const MIN_MEMORY: u64 = 64 << 20;

/// Memory that the client connections hold together.
///
/// Each connection is bounded on its own (a byte budget for requests in
/// flight, a backlog of unread replies, a pool of free buffers; see
/// [`server`]), but a bound per connection times `--nbd-max-connections`
/// is some 300 GiB: a few hundred clients that send large READs and never
/// read the replies would make the daemon, and every volume it serves,
/// run out of memory. So the bytes of every request, from the moment its
/// header is read until its reply has been written to the socket, are
/// also counted here, and a connection reads no new request while the
/// total would pass the limit. Clients that hold memory this way and
/// never read then hold up the others until they disconnect (a denial of
/// service, where without the bound the daemon, and every volume it
/// serves, would run out of memory); a warning names the limit. A
/// connection waiting here only to answer a client that has closed it is
/// closed (`server::client_gone`), so clients that give up do not keep
/// connection slots; what a client sent that writes is always served.
/// BLOCK_STATUS counts the largest reply it may have, since it carries
/// no payload.
///
/// Kernel attachments (`blockctl volume attach`) are not counted: the
/// kernel's writeback through `/dev/nbdX` may be what frees memory, and
/// must not wait for clients that hold it (kernel-notes/nbd.md). Their
/// number is what the administrator attached. A kernel client that
/// connects through the socket itself (`nbd-client`) is counted like any
/// other.
///
/// Free buffers that connections keep for reuse count against a quarter
/// of the limit, so that connections used in turn cannot each keep their
/// pool's worth.
#[derive(Debug)]
pub struct Memory {
    /// KiB of requests in flight and replies not yet written.
    permits: Arc<Semaphore>,
    /// All of `permits`.
    limit: usize,
    /// Bytes in the connections' pools of free buffers.
    pooled: std::sync::atomic::AtomicUsize,
    pool_max: usize,
    warned: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Unit of [`Memory`]'s permits.
pub const MEMORY_UNIT: usize = 1024;

impl Memory {
    /// A limit of `bytes` (at least [`MIN_MEMORY`] is expected).
    pub fn new(bytes: u64) -> Self {
        let permits = usize::try_from(bytes / MEMORY_UNIT as u64)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(permits)),
            limit: permits,
            pooled: std::sync::atomic::AtomicUsize::new(0),
            pool_max: usize::try_from(bytes / 4).unwrap_or(usize::MAX),
            warned: std::sync::Mutex::new(None),
        }
    }

    /// `units` of the limit, if they are free now.
    pub fn try_take(&self, units: u32) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_many_owned(units).ok()
    }

    /// `units` of the limit, waiting while other connections hold it.
    ///
    /// # Errors
    /// Never, in practice: the semaphore is not closed.
    pub async fn take(
        &self,
        units: u32,
    ) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
        if let Some(p) = self.try_take(units) {
            return Ok(p);
        }
        if every_ten_seconds(
            &mut self
                .warned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            tracing::warn!(
                "NBD connections hold as much memory as --nbd-max-memory allows (requests in flight and replies their clients have not read): new requests wait until some is freed"
            );
        }
        self.permits.clone().acquire_many_owned(units).await
    }

    /// Whether a pool may keep `bytes` more; counts them if so.
    pub fn pool(&self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        let before = self.pooled.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.pool_max {
            self.pooled.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// `bytes` a pool no longer keeps.
    pub fn unpool(&self, bytes: usize) {
        self.pooled
            .fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        (self.limit.saturating_sub(self.permits.available_permits()) * MEMORY_UNIT) as u64
    }

    /// Bytes that may be held.
    pub fn limit(&self) -> u64 {
        (self.limit * MEMORY_UNIT) as u64
    }
}

/// A connection slot, or `None` (the connection is closed at once, with a
/// warning at most every ten seconds) when all are taken.
fn slot(
    connections: &Arc<Semaphore>,
    last_warned: &mut Option<std::time::Instant>,
) -> Option<OwnedSemaphorePermit> {
    let permit = connections.clone().try_acquire_owned().ok();
    if permit.is_none() && every_ten_seconds(last_warned) {
        tracing::warn!(
            "NBD connection refused: the daemon has as many client connections as --nbd-max-connections allows; idle clients must disconnect first, or raise it"
        );
    }
    permit
}

/// Accepts Unix-socket clients until shutdown: those `access` lets in (the
/// socket's mode is the first gate, as for the control API; a socket opened
/// up by mistake still lets no one else in).
pub async fn serve_unix(
    listener: UnixListener,
    ctx: NbdContext,
    tracker: TaskTracker,
    access: Arc<Access>,
) {
    let mut last_warned = None;
    let mut refused_warned = None;
    let mut accept_warned = None;
    loop {
        let accepted = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let peer = Peer::of(&stream);
                if let Err(why) = access.check(&peer) {
                    // A socket opened up by mistake must not flood the log.
                    if every_ten_seconds(&mut refused_warned) {
                        tracing::warn!(uid = ?peer.uid(), pid = ?peer.pid(), "NBD connection refused: {why}");
                    }
                    continue;
                }
                let Some(permit) = slot(&ctx.connections, &mut last_warned) else {
                    continue;
                };
                tune(&stream);
                let (r, w) = stream.into_split();
                let name = match peer.uid() {
                    Some(uid) => format!("unix:uid={uid}"),
                    None => "unix".into(),
                };
                let serve = server::serve(r, w, ctx.clone(), name);
                tracker.spawn(async move {
                    serve.await;
                    drop(permit);
                    crate::host::release_memory_soon();
                });
            }
            Err(e) => {
                if every_ten_seconds(&mut accept_warned) {
                    tracing::warn!(error = %e, "accept on the NBD Unix socket failed");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Accepts TCP clients until shutdown; `tls` holds the certificates when
/// TLS is offered or required.
///
/// TCP connections still in their handshake may hold at most half of the
/// connection slots (`max_connections`): anyone who can reach the port
/// can open connections and say nothing for the handshake's 30 s, again
/// and again, and without this bound they could take every slot from the
/// Unix socket's clients too. One more is closed at once.
pub async fn serve_tcp(
    listener: TcpListener,
    ctx: NbdContext,
    tls: Option<std::sync::Arc<tls::TlsServer>>,
    tracker: TaskTracker,
    max_connections: usize,
) {
    let handshakes = Arc::new(Semaphore::new((max_connections / 2).max(1)));
    let mut last_warned = None;
    let mut handshakes_warned = None;
    let mut accept_warned = None;
    loop {
        let accepted = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(greeting) = handshakes.clone().try_acquire_owned() else {
                    if every_ten_seconds(&mut handshakes_warned) {
                        tracing::warn!(
                            "NBD TCP connection refused: half of --nbd-max-connections are TCP connections that have not finished their handshake (each is closed 30 s after it connected)"
                        );
                    }
                    continue;
                };
                let Some(permit) = slot(&ctx.connections, &mut last_warned) else {
                    continue;
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::warn!(error = %e, "cannot set TCP_NODELAY");
                }
                tune(&stream);
                let serve =
                    server::serve_tcp(stream, ctx.clone(), peer.to_string(), tls.clone(), greeting);
                tracker.spawn(async move {
                    serve.await;
                    drop(permit);
                    crate::host::release_memory_soon();
                });
            }
            Err(e) => {
                if every_ten_seconds(&mut accept_warned) {
                    tracing::warn!(error = %e, "accept on the NBD TCP socket failed");
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Send buffer asked for on every NBD socket (the kernel caps it at
/// `net.core.wmem_max`).
const SEND_BUFFER: usize = 4 << 20;

/// A 1 MiB READ reply then fits the socket in one write: with the default
/// ~200 KiB buffer the writer blocks several times per reply, each a
/// context switch on both sides.
fn tune(socket: &impl std::os::fd::AsFd) {
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(socket, SEND_BUFFER) {
        tracing::debug!(error = %e, "cannot enlarge the socket send buffer");
    }
}
