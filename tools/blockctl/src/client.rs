//! HTTP/1.1 over the daemon's Unix socket.

use crate::failure::Failure;
use std::path::PathBuf;

use blockd_api::ApiError;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

/// A request blockd did not answer: why, and whether asking again may get
/// an answer (blockd not running or restarting, the connection cut) or
/// cannot (no permission on the socket, a socket that is not blockd's API).
#[derive(Debug)]
pub struct Unanswered {
    /// What went wrong and what to do.
    pub message: String,
    /// Asking again later may get an answer.
    pub transient: bool,
    /// A request that changes something was sent whole and the connection
    /// ended before its answer: it may have been carried out.
    pub maybe_done: bool,
}

impl Unanswered {
    fn now(message: String) -> Self {
        Self {
            message,
            transient: true,
            maybe_done: false,
        }
    }

    fn for_good(message: String) -> Self {
        Self {
            message,
            transient: false,
            maybe_done: false,
        }
    }
}

impl From<Unanswered> for Failure {
    /// A request that may have been carried out is exit status 3 (its
    /// outcome is unknown: look before asking again), any other 1.
    fn from(u: Unanswered) -> Self {
        if u.maybe_done {
            Self::Unknown(u.message)
        } else {
            Self::Failed(u.message)
        }
    }
}

/// A client of one daemon.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), Unanswered> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return Unanswered::for_good(format!(
                    "cannot reach blockd at {}: {e}: run blockctl as root or as a member of the group that owns the socket (blockd's --api-group, `blockd` by default)",
                    self.socket.display()
                ));
            }
            if self.socket.is_dir() {
                return Unanswered::for_good(format!(
                    "cannot reach blockd at {}: that is a directory: point --socket/BLOCKD_SOCKET at the api.sock in it",
                    self.socket.display()
                ));
            }
            Unanswered::now(format!(
                "cannot reach blockd at {}: {e}; is the daemon running? (start it with `blockd`, or point --socket/BLOCKD_SOCKET at its api.sock)",
                self.socket.display()
            ))
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Unanswered::now(format!("talking to blockd: {e}")))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "blockd");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Unanswered::for_good(format!("building request: {e}")))?;
        let resp = match sender.send_request(req).await {
            Ok(resp) => resp,
            Err(e) if speaks_nbd(&self.socket).await => {
                return Err(Unanswered::for_good(format!(
                    "{} is blockd's NBD socket, not its API socket ({e}): point --socket/BLOCKD_SOCKET at the api.sock beside it",
                    self.socket.display()
                )))
            }
            // The daemon may have done part of the request or all of it
            // before it went (a restore may have started): its outcome is
            // unknown (exit status 3); say where to look.
            Err(e) if method != "GET" => {
                return Err(Unanswered {
                    maybe_done: true,
                    ..Unanswered::now(format!(
                        "talking to blockd: {e}: the connection ended before blockd answered, so the request may have been carried out: once blockd is back, check with `blockctl volume list`, `blockctl snapshot list` and `blockctl cloudsnap status` before asking again"
                    ))
                })
            }
            Err(e) => return Err(Unanswered::now(format!(
                "talking to blockd: {e}: the connection ended before blockd answered; if blockd stopped, start it again"
            ))),
        };
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| Unanswered::now(format!("reading blockd's answer: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// The answer's error, if it is one. blockd answers 400 when the
    /// request's values are wrong or missing (a name, a flag's value, an
    /// argument left out): that is a wrong command line, as clap's usage
    /// errors are, and exits 2; every other refusal or failure exits 1.
    fn check(status: u16, bytes: &Bytes) -> Result<(), Failure> {
        if (200..300).contains(&status) {
            return Ok(());
        }
        let message = match serde_json::from_slice::<ApiError>(bytes) {
            Ok(e) => e.error,
            Err(_) => format!(
                "blockd answered HTTP {status}: {}",
                String::from_utf8_lossy(bytes)
            ),
        };
        Err(if status == 400 {
            Failure::Usage(message)
        } else {
            Failure::Failed(message)
        })
    }

    /// Calls an endpoint and decodes its JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Failure> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| format!("encoding request: {e}"))?;
        let (status, bytes) = self.send(method, path, body).await?;
        Self::check(status, &bytes)?;
        Ok(serde_json::from_slice(&bytes)
            .map_err(|e| format!("unexpected answer from blockd: {e}"))?)
    }

    /// [`Client::call`], with a refusal of blockd's kept apart from a
    /// failure to reach it: `Ok(Err((status, failure)))` is blockd's
    /// answer with HTTP `status`, for a caller that acts on what the
    /// status means rather than on the words of the message.
    ///
    /// # Errors
    /// No answer (blockd not reached, the connection cut), or an answer
    /// that does not decode (`transient: false`).
    pub async fn call_or_refusal<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
    ) -> Result<Result<T, (u16, Failure)>, Unanswered> {
        let (status, bytes) = self.send(method, path, None).await?;
        if let Err(refused) = Self::check(status, &bytes) {
            return Ok(Err((status, refused)));
        }
        Ok(Ok(serde_json::from_slice(&bytes).map_err(|e| {
            Unanswered::for_good(format!("unexpected answer from blockd: {e}"))
        })?))
    }

    /// [`Client::call`] of a request whose hooks may run for a while (a
    /// backup's or a snapshot's pre-exec), interruptible: blockd carries a
    /// request it has received through to its end whatever the client
    /// does, so Ctrl-C ends only the wait for its answer, and says so with
    /// `goes_on` (what still happens, and how to see it).
    ///
    /// # Errors
    /// As [`Client::call`]; [`Failure::Interrupted`] on Ctrl-C.
    pub async fn call_with_hooks<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        goes_on: &str,
    ) -> Result<T, Failure> {
        tokio::select! {
            // An answer that is there wins over a Ctrl-C at the same moment.
            biased;
            r = self.call("POST", path, Some(body)) => r,
            Ok(()) = tokio::signal::ctrl_c() => Err(Failure::Interrupted(format!(
                "interrupted before blockd answered; blockd carries a request it has received through to its end: {goes_on}"
            ))),
        }
    }

    /// Calls an endpoint that answers with no body.
    pub async fn call_empty(&self, method: &str, path: &str) -> Result<(), Failure> {
        let (status, bytes) = self.send(method, path, None).await?;
        Self::check(status, &bytes)
    }
}

/// True when the server at `socket` greets as an NBD server does (its
/// first bytes are `NBDMAGIC`): blockctl was pointed at blockd's NBD
/// socket, which sits beside the API socket.
async fn speaks_nbd(socket: &std::path::Path) -> bool {
    use tokio::io::AsyncReadExt;
    let probe = async {
        let mut s = UnixStream::connect(socket).await.ok()?;
        let mut magic = [0u8; 8];
        s.read_exact(&mut magic).await.ok()?;
        Some(&magic == b"NBDMAGIC")
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
