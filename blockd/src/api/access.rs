//! Who may use the control API.
//!
//! The socket's mode (0660, owned by the daemon's user and the API group)
//! is the first gate; the peer's credentials (`SO_PEERCRED`, read when the
//! connection is accepted) are checked again on every request, so a
//! socket made world-writable by mistake, or one reached through a
//! passed descriptor, still lets in only root, the daemon's own user and
//! members of the API group (primary or supplementary, as the kernel
//! reports them for the peer process).
//!
//! Every verb needs the same right: read-only verbs show volume names,
//! labels, locations, buckets and snapshot lists, which already say more
//! about a host than an unprivileged user should learn, so no second,
//! read-only group is offered.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Failure;

/// The process at the other end of a control connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    uid: Option<u32>,
    gid: Option<u32>,
    pid: Option<i32>,
}

impl Peer {
    /// The calling process, when the kernel told.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// The calling user, when the kernel told.
    pub fn uid(&self) -> Option<u32> {
        self.uid
    }

    /// The process at the other end of `stream` (`SO_PEERCRED`).
    pub fn of(stream: &tokio::net::UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(c) => Self {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            Err(_) => Self {
                uid: None,
                gid: None,
                pid: None,
            },
        }
    }
}

/// Who is let in.
#[derive(Debug, Clone)]
pub struct Access {
    /// The daemon's own user.
    pub owner: u32,
    /// The API group, if there is one.
    pub group: Option<u32>,
    /// Its name, for messages.
    pub group_name: String,
}

impl Access {
    /// `Ok` when `peer` may use the API, else why not, for the caller.
    ///
    /// # Errors
    /// The refusal, saying what to do.
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        let Some(uid) = peer.uid else {
            return Err("blockd could not learn who is calling (SO_PEERCRED failed)".into());
        };
        if uid == 0 || uid == self.owner {
            return Ok(());
        }
        if let Some(g) = self.group {
            if peer.gid == Some(g) || peer.pid.is_some_and(|p| groups_of(p).contains(&g)) {
                return Ok(());
            }
        }
        Err(match self.group {
            Some(_) => format!(
                "user {uid} may not use blockd: run blockctl as root or as a member of group {}",
                self.group_name
            ),
            None => format!(
                "user {uid} may not use blockd: run blockctl as root (create group {} and restart blockd to let its members in)",
                self.group_name
            ),
        })
    }
}

/// Supplementary groups of process `pid` (from `/proc/PID/status`).
fn groups_of(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Middleware: refuses requests from peers [`Access::check`] refuses.
pub async fn guard(
    State(access): State<std::sync::Arc<Access>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: Request,
    next: Next,
) -> Response {
    match access.check(&peer) {
        Ok(()) => next.run(req).await,
        Err(message) => {
            tracing::warn!(uid = ?peer.uid, pid = ?peer.pid, "control API: caller refused");
            // And the connection closes: a refused caller holds no slot
            // past its answer.
            let mut r = Failure {
                status: StatusCode::FORBIDDEN,
                message,
            }
            .into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid: Some(uid),
            gid: Some(gid),
            pid: None,
        }
    }

    #[test]
    fn root_owner_and_group_members_only() {
        let a = Access {
            owner: 1000,
            group: Some(990),
            group_name: "blockd".into(),
        };
        assert!(a.check(&peer(0, 0)).is_ok());
        assert!(a.check(&peer(1000, 1000)).is_ok());
        assert!(a.check(&peer(65534, 990)).is_ok());
        let e = a.check(&peer(65534, 65534)).unwrap_err();
        assert!(e.contains("member of group blockd"), "{e}");
        let unknown = Peer {
            uid: None,
            gid: None,
            pid: None,
        };
        assert!(a.check(&unknown).is_err());
        let none = Access { group: None, ..a };
        assert!(none.check(&peer(65534, 990)).is_err());
    }
}
