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

pub use server::NbdContext;

/// Most client connections by default (`--nbd-max-connections`; Unix
/// socket and TCP together, kernel attachments not counted). Each holds
/// about 1.3 MiB, locked in memory under `mlockall` (its read buffer and
/// the buffers it starts with, see [`buffers`]), and three descriptors:
/// without a limit, idle connections alone could take the daemon's memory
/// or descriptors, and with them every new client, the control API's
/// included.
pub const MAX_CONNECTIONS: usize = 1024;

/// A connection slot, or `None` (the connection is closed at once, with a
/// warning at most every ten seconds) when all are taken.
fn slot(
    connections: &Arc<Semaphore>,
    last_warned: &mut Option<std::time::Instant>,
) -> Option<OwnedSemaphorePermit> {
    let permit = connections.clone().try_acquire_owned().ok();
    if permit.is_none() && last_warned.is_none_or(|t| t.elapsed().as_secs() >= 10) {
        tracing::warn!(
            "NBD connection refused: the daemon has as many client connections as --nbd-max-connections allows; idle clients must disconnect first, or raise it"
        );
        *last_warned = Some(std::time::Instant::now());
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
    loop {
        let accepted = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let peer = Peer::of(&stream);
                if let Err(why) = access.check(&peer) {
                    // At most one line every ten seconds: a socket opened
                    // up by mistake must not flood the log.
                    if refused_warned
                        .is_none_or(|t: std::time::Instant| t.elapsed().as_secs() >= 10)
                    {
                        tracing::warn!(uid = ?peer.uid(), pid = ?peer.pid(), "NBD connection refused: {why}");
                        refused_warned = Some(std::time::Instant::now());
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
                tracing::warn!(error = %e, "accept on the NBD Unix socket failed");
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
    let mut handshakes_warned: Option<std::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(greeting) = handshakes.clone().try_acquire_owned() else {
                    if handshakes_warned.is_none_or(|t| t.elapsed().as_secs() >= 10) {
                        tracing::warn!(
                            "NBD TCP connection refused: half of --nbd-max-connections are TCP connections that have not finished their handshake (each is closed 30 s after it connected)"
                        );
                        handshakes_warned = Some(std::time::Instant::now());
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
                tracing::warn!(error = %e, "accept on the NBD TCP socket failed");
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
