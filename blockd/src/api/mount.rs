//! Routes of the catalog-mount API: `POST /v1/mounts` mounts a location's
//! catalog at a directory, `GET /v1/mounts` lists the mounts,
//! `DELETE /v1/mounts?dir=DIR` unmounts one.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use blockd_api::{MountInfo, MountRequest};

use super::access::Peer;
use super::{body, query_pairs, ApiResult, Failure};
use crate::daemon::Daemon;

/// The mount routes.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new().route("/v1/mounts", get(list).post(mount).delete(unmount))
}

async fn list(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<MountInfo>> {
    Ok(Json(d.mounts.list()))
}

async fn mount(
    State(d): State<Arc<Daemon>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<MountInfo>), Failure> {
    let req: MountRequest = body(&bytes)?;
    // Mounted in the caller's mount namespace (see fuse::namespace).
    let info = d.mounts.mount(req, &d.cloud, peer.pid()).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn unmount(
    State(d): State<Arc<Daemon>>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, Failure> {
    let dir = query_pairs(q.as_deref())
        .into_iter()
        .find(|(k, _)| k == "dir")
        .map(|(_, v)| v)
        .ok_or_else(|| Failure::bad_request("the mount directory (?dir=) is required"))?;
    d.mounts.unmount(&dir).await?;
    Ok(StatusCode::NO_CONTENT)
}
