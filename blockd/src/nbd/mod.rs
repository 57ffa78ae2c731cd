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

use tokio::net::{TcpListener, UnixListener};
use tokio_util::task::TaskTracker;

pub use server::NbdContext;

/// Accepts Unix-socket clients until shutdown.
pub async fn serve_unix(listener: UnixListener, ctx: NbdContext, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                tune(&stream);
                let (r, w) = stream.into_split();
                tracker.spawn(server::serve(r, w, ctx.clone(), "unix".into()));
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
pub async fn serve_tcp(
    listener: TcpListener,
    ctx: NbdContext,
    tls: Option<std::sync::Arc<tls::TlsServer>>,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::warn!(error = %e, "cannot set TCP_NODELAY");
                }
                tune(&stream);
                tracker.spawn(server::serve_tcp(
                    stream,
                    ctx.clone(),
                    peer.to_string(),
                    tls.clone(),
                ));
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
