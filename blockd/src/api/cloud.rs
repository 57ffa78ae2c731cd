//! Routes of the cloud-snapshot API: locations, backups, tasks, catalog,
//! restore.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use blockd_api::{
    BackupGroupRequest, BackupRequest, Catalog, CheckReport, CheckRequest, CloudSnap,
    CreateLocation, CreateSchedule, GcReport, GcRequest, Location, RestoreRequest, Schedule,
    Started, Task,
};

use super::{body, forced, query_pairs, ApiResult, Failure};
use crate::daemon::Daemon;

/// The cloud routes.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/v1/locations", get(list_locations).post(create_location))
        .route(
            "/v1/locations/{name}",
            axum::routing::delete(delete_location),
        )
        .route("/v1/locations/{name}/validate", post(validate_location))
        .route("/v1/cloudsnaps", get(list_snaps).delete(delete_snap))
        .route("/v1/cloudsnaps/catalog", get(catalog))
        .route("/v1/cloudsnaps/backup", post(backup))
        .route("/v1/cloudsnaps/backup-group", post(backup_group))
        .route("/v1/cloudsnaps/restore", post(restore))
        .route("/v1/schedules", get(list_schedules).post(create_schedule))
        .route("/v1/schedules/{id}", axum::routing::delete(delete_schedule))
        .route("/v1/repo/check", post(check))
        .route("/v1/repo/gc", post(gc))
        .route("/v1/tasks", get(tasks))
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/tasks/{id}/stop", post(stop))
}

async fn list_locations(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<Location>> {
    Ok(Json(d.cloud.locations.list()?))
}

async fn create_location(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Location>), Failure> {
    let req: CreateLocation = body(&bytes)?;
    Ok((
        StatusCode::CREATED,
        Json(d.cloud.locations.create(req).await?),
    ))
}

async fn delete_location(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    d.cloud.locations.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn validate_location(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Location> {
    Ok(Json(d.cloud.locations.validate(&name).await?))
}

fn check_timeout(t: Option<f64>) -> Result<(), Failure> {
    blockd_api::exec_timeout(t)
        .map(drop)
        .map_err(Failure::bad_request)
}

async fn backup(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let req: BackupRequest = body(&bytes)?;
    check_timeout(req.exec_timeout_secs)?;
    Ok((StatusCode::ACCEPTED, Json(d.cloud.backup(req).await?)))
}

async fn backup_group(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let req: BackupGroupRequest = body(&bytes)?;
    check_timeout(req.exec_timeout_secs)?;
    Ok((StatusCode::ACCEPTED, Json(d.cloud.backup_group(req).await?)))
}

async fn restore(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Started>), Failure> {
    let req: RestoreRequest = body(&bytes)?;
    Ok((StatusCode::ACCEPTED, Json(d.cloud.restore(req).await?)))
}

async fn tasks(State(d): State<Arc<Daemon>>, RawQuery(q): RawQuery) -> ApiResult<Vec<Task>> {
    let q = query_pairs(q.as_deref());
    let name = q.iter().find(|(k, _)| k == "name").map(|(_, v)| v.as_str());
    let finished = q.iter().any(|(k, v)| k == "finished" && v == "true");
    Ok(Json(d.cloud.tasks(name, finished)?))
}

async fn task(State(d): State<Arc<Daemon>>, Path(id): Path<String>) -> ApiResult<Task> {
    Ok(Json(d.cloud.task(&id)?))
}

async fn stop(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Task> {
    let force = forced(q.as_deref());
    Ok(Json(d.cloud.stop(&id, force).await?))
}

async fn list_snaps(
    State(d): State<Arc<Daemon>>,
    RawQuery(q): RawQuery,
) -> ApiResult<Vec<CloudSnap>> {
    let q = query_pairs(q.as_deref());
    let mut labels = BTreeMap::new();
    let mut src = None;
    let mut location = None;
    for (k, v) in q {
        match k.as_str() {
            "label" => {
                let (lk, lv) = blockd_api::parse_label(&v).map_err(Failure::bad_request)?;
                labels.insert(lk, lv);
            }
            "src" => src = Some(v),
            "location" => location = Some(v),
            _ => {}
        }
    }
    Ok(Json(
        d.cloud
            .list(location.as_deref(), src.as_deref(), &labels)
            .await?,
    ))
}

fn snap_and_location(q: Option<&str>) -> Result<(String, Option<String>, bool), Failure> {
    let q = query_pairs(q);
    let snap = q
        .iter()
        .find(|(k, _)| k == "snap")
        .map(|(_, v)| v.clone())
        .ok_or_else(|| Failure::bad_request("--snap is required"))?;
    let location = q
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone());
    let verify = q.iter().any(|(k, v)| k == "verify" && v == "true");
    Ok((snap, location, verify))
}

async fn check(State(d): State<Arc<Daemon>>, bytes: Bytes) -> ApiResult<CheckReport> {
    let req: CheckRequest = body(&bytes)?;
    Ok(Json(d.cloud.check(req).await?))
}

async fn list_schedules(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<Schedule>> {
    Ok(Json(d.cloud.schedules()?))
}

async fn create_schedule(
    State(d): State<Arc<Daemon>>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Schedule>), Failure> {
    let req: CreateSchedule = body(&bytes)?;
    Ok((StatusCode::CREATED, Json(d.cloud.create_schedule(req)?)))
}

async fn delete_schedule(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    d.cloud.delete_schedule(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn gc(State(d): State<Arc<Daemon>>, bytes: Bytes) -> ApiResult<GcReport> {
    let req: GcRequest = body(&bytes)?;
    Ok(Json(d.cloud.gc(req).await?))
}

async fn catalog(State(d): State<Arc<Daemon>>, RawQuery(q): RawQuery) -> ApiResult<Catalog> {
    let (snap, location, verify) = snap_and_location(q.as_deref())?;
    Ok(Json(
        d.cloud.catalog(location.as_deref(), &snap, verify).await?,
    ))
}

async fn delete_snap(
    State(d): State<Arc<Daemon>>,
    RawQuery(q): RawQuery,
) -> Result<StatusCode, Failure> {
    let (snap, location, _) = snap_and_location(q.as_deref())?;
    d.cloud.delete(location.as_deref(), &snap).await?;
    Ok(StatusCode::NO_CONTENT)
}
