//! Control API: HTTP/JSON on the Unix socket `api.sock` (mode 0600).
//!
//! `blockctl` uses nothing else. Every error is a JSON body
//! `{"error": "..."}` with a 4xx status for the caller's mistakes (bad
//! JSON, unknown volume, conflicts) and 5xx for the daemon's own failures.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use blockd_api::{ApiError, CreateSnapshot, CreateVolume, DaemonInfo, ResizeVolume, UpdateLabels};
use serde::de::DeserializeOwned;

pub mod access;
mod cloud;
mod mount;
pub mod serve;

use crate::claims::Busy;
use crate::coordinator::VolumeOpError;
use crate::daemon::Daemon;
use crate::outcome::Outcome;
use crate::snapshot::store::SnapshotStore;
use crate::snapshot::{CreateRequest, FreezeError};
use crate::volume::store::StoreError;
use crate::volume::Volume;

/// An error answer.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl Failure {
    /// The answer to an error: the one mapping from what an error means
    /// ([`Outcome`]) to an HTTP status. The daemon's own failures are
    /// logged; the caller's mistakes are only answered.
    fn of(outcome: Outcome, message: String) -> Self {
        let status = match outcome {
            Outcome::Invalid => StatusCode::BAD_REQUEST,
            Outcome::Refused => StatusCode::UNPROCESSABLE_ENTITY,
            Outcome::NotFound => StatusCode::NOT_FOUND,
            Outcome::Conflict => StatusCode::CONFLICT,
            Outcome::Upstream => StatusCode::BAD_GATEWAY,
            Outcome::Failed => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %message, "API request failed");
        }
        Self { status, message }
    }
}

/// `From<E> for Failure` for each module's error, through its `outcome()`.
macro_rules! failures {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                Self::of(e.outcome(), e.to_string())
            }
        }
    )*};
}

failures!(
    StoreError,
    FreezeError,
    VolumeOpError,
    crate::cloud::CloudError,
    crate::fuse::MountError,
    crate::attach::AttachError,
);

impl From<Busy> for Failure {
    fn from(e: Busy) -> Self {
        Self::of(Outcome::Conflict, e.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, Failure>;

/// Parses a JSON body, answering 400 with serde's message on failure.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(bytes)
        .map_err(|e| Failure::bad_request(format!("invalid request body: {e}")))
}

/// The router.
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/metrics", get(metrics))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(inspect_volume).delete(delete_volume),
        )
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/labels", post(update_labels))
        .route(
            "/v1/volumes/{name}/attach",
            post(attach_volume).delete(detach_volume),
        )
        .route("/v1/snapshots", get(list_snapshots).post(create_snapshot))
        .route(
            "/v1/snapshots/{volume}/{name}",
            get(inspect_snapshot).delete(delete_snapshot),
        )
        .merge(cloud::routes())
        .merge(mount::routes())
        .fallback(|| async {
            Failure {
                status: StatusCode::NOT_FOUND,
                message: "no such API endpoint: is blockctl newer than blockd?".into(),
            }
        })
        .with_state(daemon)
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(to_the_end))
}

/// Carries every request that changes something through to its end in a
/// task of its own. The server drops a request's future when its client
/// goes away (Ctrl-C of blockctl), which would stop it at whatever await
/// it had reached: between a snapshot's pre-exec and its post-exec (the
/// file system left frozen), or a backup's freeze and the start of its
/// tasks. Reads are dropped as before: they change nothing.
async fn to_the_end(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => Failure::of(Outcome::Failed, format!("{method} {path}: {e}")).into_response(),
    }
}

/// Keeps the promise that every error is JSON: answers that axum itself
/// makes (405 for a method a route does not take, 413 for a body over
/// the limit, a rejected extractor) come as text, and are rewritten here.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let allow = resp.headers().get(axum::http::header::ALLOW).cloned();
    let text = axum::body::to_bytes(resp.into_body(), 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => format!(
            "{method} is not allowed on {path}{}: is blockctl newer than blockd?",
            allow
                .as_ref()
                .and_then(|a| a.to_str().ok())
                .map(|a| format!(" (it takes {a})"))
                .unwrap_or_default()
        ),
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body to {path} is too large ({text}): requests are small JSON documents"
        ),
        _ if text.is_empty() => format!("{method} {path}: {status}"),
        _ => format!("{method} {path}: {text}"),
    };
    let mut resp = Failure { status, message }.into_response();
    if let Some(a) = allow {
        resp.headers_mut().insert(axum::http::header::ALLOW, a);
    }
    resp
}

/// The control API as served ([`serve::serve_unix`]): every request
/// passes [`access::guard`].
pub fn service(daemon: Arc<Daemon>, access: Arc<access::Access>) -> Router {
    router(daemon).layer(axum::middleware::from_fn_with_state(access, access::guard))
}

fn to_api(d: &Daemon, v: &Volume) -> blockd_api::Volume {
    let m = v.meta();
    // Changed since the last backup: the volume's map, plus the change
    // sets of its local snapshots that no backup has taken yet (a freeze
    // moves changes from the map into the snapshot).
    let mut changes = v.dirty.current();
    for s in d.snapshots.list(Some(&m.name)) {
        if !s.meta().handed_on {
            changes.merge(s.changes());
        }
    }
    let kept_cow_bytes = d.snapshots.kept_cow_bytes(&m.name);
    blockd_api::Volume {
        name: m.name,
        size: m.size,
        extent_size: m.extent_size,
        labels: m.labels,
        created: m.created,
        allocated: v.allocated(),
        connections: v.connections(),
        dirty_bytes: if changes.known {
            changes.extents.len() * m.extent_size
        } else {
            m.size
        },
        tracking_known: changes.known,
        tracking_settled: v.dirty.settled(),
        kept_cow_bytes,
        attached: None,
        kernel_connected: None,
        unexported: v.unexported(),
        lazy_present_bytes: v.lazy().map(|l| l.present_bytes().min(m.size)),
    }
}

/// `GET /metrics`: Prometheus text format (see [`crate::metrics`]).
async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    let text = crate::metrics::Collector::new(&d).render();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The HTTP service of `--metrics-listen`: `/metrics` only, behind a
/// bearer token when one is configured.
pub fn metrics_service(daemon: Arc<Daemon>, token: Option<blockd_api::Secret>) -> Router {
    let token = Arc::new(token);
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async {
            Failure {
                status: StatusCode::NOT_FOUND,
                message: "only /metrics is served here".into(),
            }
        })
        .with_state(daemon)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let token = token.clone();
                async move {
                    if let Some(t) = token.as_ref() {
                        let given = req
                            .headers()
                            .get(axum::http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "));
                        let ok = given.is_some_and(|g| {
                            constant_time_eq(g.as_bytes(), t.expose().as_bytes())
                        });
                        if !ok {
                            // And the connection closes: a client without
                            // the token holds no slot past its answer.
                            let mut r = Failure {
                                status: StatusCode::UNAUTHORIZED,
                                message: "a bearer token is required (the metrics token of blockd's config file)".into(),
                            }
                            .into_response();
                            r.headers_mut().insert(
                                axum::http::header::CONNECTION,
                                axum::http::HeaderValue::from_static("close"),
                            );
                            return r;
                        }
                    }
                    next.run(req).await
                }
            },
        ))
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn info(State(d): State<Arc<Daemon>>) -> Json<DaemonInfo> {
    Json(d.info())
}

/// `force=true` (or `force=1`) in a query string.
fn forced(q: Option<&str>) -> bool {
    query_pairs(q)
        .iter()
        .any(|(k, v)| k == "force" && (v == "true" || v == "1"))
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

async fn list_volumes(
    State(d): State<Arc<Daemon>>,
    RawQuery(q): RawQuery,
) -> ApiResult<Vec<blockd_api::Volume>> {
    let mut want = BTreeMap::new();
    for (k, v) in query_pairs(q.as_deref()) {
        if k == "label" {
            let (lk, lv) = blockd_api::parse_label(&v).map_err(Failure::bad_request)?;
            want.insert(lk, lv);
        }
    }
    let volumes = d
        .store
        .list()
        .iter()
        .map(|v| with_attachment(&d, to_api(&d, v)))
        .filter(|v| want.iter().all(|(k, val)| v.labels.get(k) == Some(val)))
        .collect();
    Ok(Json(volumes))
}

async fn create_volume(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<blockd_api::Volume>), Failure> {
    let req: CreateVolume = body(&bytes)?;
    let v = d.create_volume(req)?;
    Ok((StatusCode::CREATED, Json(to_api(&d, &v))))
}

async fn inspect_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<blockd_api::Volume> {
    let v = d
        .store
        .get(&name)
        .ok_or(StoreError::NotFound { volume: name })?;
    let mut v = with_attachment(&d, to_api(&d, &v));
    if v.attached.is_some() {
        v.kernel_connected = d.attachments.kernel_connected(&v.name).await;
    }
    Ok(Json(v))
}

fn with_attachment(d: &Daemon, mut v: blockd_api::Volume) -> blockd_api::Volume {
    v.attached = d.attachments.device_of(&v.name);
    v
}

async fn attach_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<blockd_api::Attachment>), Failure> {
    let req: blockd_api::AttachRequest = if bytes.is_empty() {
        blockd_api::AttachRequest::default()
    } else {
        body(&bytes)?
    };
    let a = d.attach_volume(&name, &req).await?;
    Ok((StatusCode::CREATED, Json(a)))
}

async fn detach_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, Failure> {
    let force = forced(q.as_deref());
    d.attachments.detach(&name, force).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, Failure> {
    let force = forced(q.as_deref());
    if !force {
        crate::volume::settle(|| d.store.get(&name).map_or(0, |v| v.connections())).await;
    }
    d.delete_volume(&name, force)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn update_labels(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<blockd_api::Volume> {
    let req: UpdateLabels = body(&bytes)?;
    let v = d.store.update_labels(&name, req.set, &req.remove)?;
    Ok(Json(with_attachment(&d, to_api(&d, &v))))
}

async fn resize_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult<blockd_api::Volume> {
    let req: ResizeVolume = body(&bytes)?;
    let v = d.resize_volume(&name, req.size)?;
    Ok(Json(to_api(&d, &v)))
}

fn snapshot_to_api(s: &SnapshotStore) -> blockd_api::Snapshot {
    let m = s.meta();
    blockd_api::Snapshot {
        export: format!("{}@{}", m.volume, m.name),
        changed_bytes: if m.changes_known {
            m.changed_extents * m.extent_size
        } else {
            m.size
        },
        cow_bytes: s.cow_bytes(),
        volume: m.volume,
        name: m.name,
        group: m.group,
        created: m.created,
        size: m.size,
        extent_size: m.extent_size,
        pause_us: m.pause_us,
        changes_known: m.changes_known,
        pre_exec: m.pre_exec,
        post_exec: m.post_exec,
        damaged: m.damaged,
    }
}

async fn create_snapshot(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Vec<blockd_api::Snapshot>>), Failure> {
    let req: CreateSnapshot = body(&bytes)?;
    let exec_timeout =
        blockd_api::exec_timeout(req.exec_timeout_secs).map_err(Failure::bad_request)?;
    let metas = d
        .snapshots
        .create(CreateRequest {
            volumes: req.volumes,
            name: req.name,
            pre_exec: req.pre_exec,
            post_exec: req.post_exec,
            exec_timeout,
            absorb: false,
        })
        .await?;
    let out = metas
        .iter()
        .filter_map(|m| d.snapshots.get(&m.volume, &m.name))
        .map(|s| snapshot_to_api(&s))
        .collect();
    Ok((StatusCode::CREATED, Json(out)))
}

async fn list_snapshots(
    State(d): State<Arc<Daemon>>,
    RawQuery(q): RawQuery,
) -> ApiResult<Vec<blockd_api::Snapshot>> {
    let volume = query_pairs(q.as_deref())
        .into_iter()
        .find(|(k, _)| k == "volume")
        .map(|(_, v)| v);
    if let Some(v) = &volume {
        if d.store.get(v).is_none() {
            return Err(StoreError::NotFound { volume: v.clone() }.into());
        }
    }
    Ok(Json(
        d.snapshots
            .list(volume.as_deref())
            .iter()
            .map(|s| snapshot_to_api(s))
            .collect(),
    ))
}

async fn inspect_snapshot(
    State(d): State<Arc<Daemon>>,
    Path((volume, name)): Path<(String, String)>,
) -> ApiResult<blockd_api::Snapshot> {
    let s = d
        .snapshots
        .get(&volume, &name)
        .ok_or_else(|| FreezeError::not_found(&volume, &name))?;
    Ok(Json(snapshot_to_api(&s)))
}

async fn delete_snapshot(
    State(d): State<Arc<Daemon>>,
    Path((volume, name)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, Failure> {
    let force = forced(q.as_deref());
    if !force {
        crate::volume::settle(|| d.snapshots.get(&volume, &name).map_or(0, |s| s.readers())).await;
    }
    d.snapshots.delete(&volume, &name, force)?;
    Ok(StatusCode::NO_CONTENT)
}
