//! Cloud snapshots: backups of frozen volumes to object storage, tasks that
//! track them (kept in the state database, resumed after a restart), the
//! catalog read from the bucket, and full restores.
//!
//! Rules the code keeps:
//! - The bucket is the source of truth: listing and restoring read only
//!   the repository, so an empty state dir pointed at the same location
//!   sees every snapshot.
//! - A backup's local snapshot is released (its change set *not* merged
//!   back) only after the manifest is written. A stopped or failed backup
//!   abandons it, merging the change set back: the next backup covers it.
//! - An incremental is built on the volume's last backup only when that
//!   backup went to the same location and is still listed there, the size
//!   and extent size are unchanged, and tracking is known; otherwise the
//!   whole volume is read (chunks already stored at the same place are
//!   still referenced, not uploaded). Every 7th backup reads everything.

pub mod backup;
pub mod hydrate;
pub mod locations;
pub mod restore;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockd_api::{
    BackupGroupRequest, BackupRequest, Catalog, CloudSnap, Hook, RestoreRequest, Started, Task,
    TaskKind, TaskState, Verified,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claims::{Busy, Claim, Claims, Want};
use crate::repo::format::{Group, Manifest};
use crate::repo::{Repo, RepoError};
use crate::snapshot::store::SnapshotStore;
use crate::snapshot::{CreateRequest, FreezeError, Snapshots};
use crate::state::{StateDb, StateError};
use crate::volume::dirty_map::ChangeSet;
use crate::volume::store::Store;
use backup::Progress;
use locations::Locations;

/// A full read every this many backups (pxctl: "every 7th backup is a full backup").
pub const DEFAULT_FULL_EVERY: u32 = 7;

/// Settings of the cloud layer, parsed once by the daemon (flags and
/// environment, see `blockd --help`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every this many backups of a volume read it whole.
    pub full_every: u32,
    /// Bytes per second for the background fetches of lazy restores.
    pub hydrate_limit: Option<u64>,
    /// Fraction of object-store requests failed on purpose (testing).
    pub fault_rate: Option<f64>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            full_every: DEFAULT_FULL_EVERY,
            hydrate_limit: None,
            fault_rate: None,
        }
    }
}

/// Why a cloud operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloudError {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Conflicts with existing state.
    #[error("{0}")]
    Conflict(String),
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Local state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Something it needs is in use by another request or task.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
    /// Stopped or shutting down.
    #[error("cancelled")]
    Cancelled,
}

impl CloudError {
    fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{what}: {e}"))
    }
}

impl From<FreezeError> for CloudError {
    fn from(e: FreezeError) -> Self {
        match e {
            FreezeError::Invalid(m) => Self::Invalid(m),
            FreezeError::NotFound(m) => Self::NotFound(m),
            FreezeError::Exists(m) => Self::Conflict(m),
            FreezeError::Busy(b) => Self::Busy(b),
            e @ FreezeError::Hook { .. } => Self::Invalid(e.to_string()),
            e => Self::Internal(e.to_string()),
        }
    }
}

/// What a task does, kept with its record so it can resume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Plan {
    Backup {
        /// Parent snapshot name (same volume, same location).
        parent: Option<String>,
        /// Chain length of this snapshot.
        chain: u32,
        labels: BTreeMap<String, String>,
        created: String,
        pause_us: u64,
        pre_exec: Option<Hook>,
        post_exec: Option<Hook>,
    },
    Restore {
        src_volume: String,
        src_name: String,
        /// Served while it fills (see `hydrate`).
        #[serde(default)]
        lazy: bool,
        /// Bytes per present-map unit of a lazy restore.
        #[serde(default)]
        unit: u64,
    },
}

/// The persisted record of a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    task: Task,
    plan: Plan,
    /// Counters at the last save (read, new).
    #[serde(default)]
    read: u64,
    #[serde(default)]
    new: u64,
}

/// A lazy restore's present map and source.
struct Hydration {
    lazy: Arc<crate::volume::lazy::Lazy>,
    source: Arc<hydrate::RepoSource>,
}

struct Running {
    record: Mutex<Record>,
    progress: Arc<Progress>,
    /// Cancelled by `cloudsnap stop` or by shutdown (a child of the
    /// daemon's shutdown token); `stopped` tells the two apart.
    stop: CancellationToken,
    stopped: std::sync::atomic::AtomicBool,
    started: Instant,
    /// Elapsed seconds before this run (earlier runs of a resumed task).
    before: f64,
}

impl Running {
    fn snapshot(&self) -> Record {
        let mut r = self
            .record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let p = &self.progress;
        r.task.bytes_total = Progress::get(&p.total);
        r.task.bytes_done = Progress::get(&p.done);
        r.task.bytes_transferred = Progress::get(&p.transferred);
        r.task.bytes_reused = Progress::get(&p.reused);
        r.read = Progress::get(&p.read);
        r.new = Progress::get(&p.new);
        let secs = self.before + self.started.elapsed().as_secs_f64();
        r.task.elapsed_secs = secs;
        r.task.eta_secs =
            (r.task.state == TaskState::Active && r.task.bytes_done > 0 && secs > 0.5).then(|| {
                let rate = r.task.bytes_done as f64 / secs;
                r.task.bytes_total.saturating_sub(r.task.bytes_done) as f64 / rate
            });
        r
    }
}

/// Cloud snapshots of this daemon.
pub struct Cloud {
    /// Locations.
    pub locations: Locations,
    volumes: Arc<Store>,
    snapshots: Arc<Snapshots>,
    claims: Arc<Claims>,
    db: Arc<StateDb>,
    running: Mutex<HashMap<String, Arc<Running>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Serialises backups reaching Done (group objects).
    finishing: tokio::sync::Mutex<()>,
    full_every: u32,
    /// `BLOCKD_HYDRATE_LIMIT`: bytes per second for background hydration.
    hydrate_limit: Option<u64>,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud").finish_non_exhaustive()
    }
}

/// The current time, RFC 3339 UTC to the second.
pub(crate) fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A new cloud snapshot name: the freeze time to the millisecond and a
/// random tag (`20261121T101500.123Z-3f4f0a67`), so names sort by time.
fn new_snapshot_name() -> String {
    let stamp = humantime::format_rfc3339_millis(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let mut t = [0u8; 4];
    crate::repo::crypto::fill_random(&mut t);
    format!("{stamp}-{}", hex::encode(t))
}

/// A task record as stored; an encoding failure is an error, never an
/// empty record.
fn encode_record(r: &Record) -> Result<String, CloudError> {
    serde_json::to_string(r).map_err(|e| CloudError::internal("encoding a task record", e))
}

fn new_task_id() -> String {
    let mut b = [0u8; 8];
    crate::repo::crypto::fill_random(&mut b);
    let h = hex::encode(b);
    format!("{}-{}-{}", &h[..4], &h[4..8], &h[8..])
}

/// True for names blockd gives snapshots: `YYYYMMDDTHHMMSS.mmmZ-xxxxxxxx`.
/// Anything else under `snapshots/` is not one of ours.
pub fn is_snapshot_name(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() == 29
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'.'
        && b[16..19].iter().all(u8::is_ascii_digit)
        && b[19] == b'Z'
        && b[20] == b'-'
        && b[21..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// Splits `VOLUME/SNAPSHOT`.
fn split_snap(s: &str) -> Option<(&str, &str)> {
    s.split_once('/')
        .filter(|(v, n)| !v.is_empty() && !n.is_empty() && !n.contains('/'))
}

impl Cloud {
    /// Opens the cloud layer and resumes tasks that were running.
    ///
    /// # Errors
    /// State database errors.
    pub fn open(
        state_dir: &std::path::Path,
        volumes: Arc<Store>,
        snapshots: Arc<Snapshots>,
        claims: Arc<Claims>,
        settings: &Settings,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Arc<Self>, CloudError> {
        let db = volumes.db().clone();
        let locations =
            Locations::open(state_dir, db.clone(), claims.clone(), settings.fault_rate)?;
        let me = Arc::new(Self {
            locations,
            volumes,
            snapshots,
            claims,
            db,
            running: Mutex::new(HashMap::new()),
            shutdown,
            tracker,
            finishing: tokio::sync::Mutex::new(()),
            full_every: settings.full_every.max(1),
            hydrate_limit: settings.hydrate_limit.filter(|n| *n > 0),
        });
        for rec in me.db.tasks(true, u32::MAX)? {
            match serde_json::from_str::<Record>(&rec) {
                Ok(r) => me.resume(r),
                Err(e) => tracing::error!(error = %e, "unreadable task record"),
            }
        }
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, r: &Record) -> Result<(), CloudError> {
        let json = encode_record(r)?;
        if r.task.state.is_final() {
            self.db.finish_task(&r.task.id, &json)?;
        } else {
            self.db.put_task(&r.task.id, &json, true, &r.task.created)?;
        }
        Ok(())
    }

    fn resume(self: &Arc<Self>, r: Record) {
        tracing::info!(task = %r.task.id, volume = %r.task.volume, "resuming task after restart");
        let id = r.task.id.clone();
        let t = &r.task;
        let want = match &r.plan {
            Plan::Backup { .. } => {
                let name = split_snap(&t.snapshot).map_or("", |(_, n)| n);
                Want::for_backup(&t.id, &t.volume, name, &t.location)
            }
            Plan::Restore { lazy, .. } => {
                Want::for_restore(&t.id, &t.volume, &t.location, &t.snapshot, *lazy)
            }
        };
        let claim = match self.claims.acquire(want) {
            Ok(c) => c,
            Err(e) => return self.fail_record(r, &e.to_string()),
        };
        match r.plan.clone() {
            Plan::Backup { .. } => {
                let snap_name = split_snap(&r.task.snapshot)
                    .map(|(_, n)| n.to_string())
                    .unwrap_or_default();
                match self.snapshots.get(&r.task.volume, &snap_name) {
                    Some(s) => self.spawn_backup(r, s, claim),
                    None => {
                        if let Some(v) = self.volumes.get(&r.task.volume) {
                            v.dirty.lose();
                        }
                        self.fail_record(r, "the local snapshot of this backup is gone; change tracking is reset so the next backup reads the whole volume");
                    }
                }
            }
            Plan::Restore { lazy: true, .. } => match self.volumes.get(&r.task.volume) {
                Some(v) => match self.attach_lazy(&v, &r, None, false) {
                    Ok(h) => self.spawn_restore(r, Some(h), claim),
                    Err(e) => {
                        // Which units hold the volume's own writes is
                        // unknown: it must not be served.
                        v.restoring
                            .store(true, std::sync::atomic::Ordering::Release);
                        self.fail_record(r, &format!("{e}; volume {} is not exported: restore it again into a new volume", v.name()));
                    }
                },
                None => self.fail_record(r, "the volume being restored into is gone"),
            },
            Plan::Restore { .. } => match self.volumes.get(&r.task.volume) {
                Some(v) => {
                    v.restoring
                        .store(true, std::sync::atomic::Ordering::Release);
                    self.spawn_restore(r, None, claim);
                }
                None => self.fail_record(r, "the volume being restored into is gone"),
            },
        }
        tracing::debug!(task = %id, "resumed");
    }

    fn fail_record(&self, mut r: Record, why: &str) {
        r.task.state = TaskState::Failed;
        r.task.error = Some(why.to_string());
        r.task.finished = Some(now());
        r.task.eta_secs = None;
        tracing::warn!(task = %r.task.id, error = why, "task failed");
        let _ = self.save(&r);
    }

    fn register(&self, r: Record, progress: Option<Arc<Progress>>) -> Arc<Running> {
        let progress = progress.unwrap_or_default();
        use std::sync::atomic::Ordering::Relaxed;
        progress.total.store(r.task.bytes_total, Relaxed);
        progress.done.store(r.task.bytes_done, Relaxed);
        progress
            .transferred
            .store(r.task.bytes_transferred, Relaxed);
        progress.reused.store(r.task.bytes_reused, Relaxed);
        progress.read.store(r.read, Relaxed);
        progress.new.store(r.new, Relaxed);
        let running = Arc::new(Running {
            before: r.task.elapsed_secs,
            record: Mutex::new(r.clone()),
            progress,
            stop: self.shutdown.child_token(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
        });
        self.lock().insert(r.task.id.clone(), running.clone());
        running
    }

    /// Ends a running task with `state`.
    fn finish(&self, run: &Running, state: TaskState, error: Option<String>) -> Record {
        {
            let mut r = run
                .record
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            r.task.state = state;
            r.task.error = error;
            r.task.finished = Some(now());
        }
        let mut r = run.snapshot();
        r.task.eta_secs = None;
        if let Err(e) = self.save(&r) {
            tracing::error!(task = %r.task.id, error = %e, "saving task record failed");
        }
        self.lock().remove(&r.task.id);
        r
    }

    // ---- backup ----------------------------------------------------------

    /// Starts a backup of one volume.
    ///
    /// # Errors
    /// Unknown volume or location, a backup already running, a failing hook.
    pub async fn backup(self: &Arc<Self>, req: BackupRequest) -> Result<Started, CloudError> {
        let g = BackupGroupRequest {
            volumes: vec![req.volume],
            select: BTreeMap::new(),
            full: req.full,
            location: req.location,
            labels: req.labels,
            pre_exec: req.pre_exec,
            post_exec: req.post_exec,
            exec_timeout_secs: req.exec_timeout_secs,
        };
        self.start_backups(g, false).await
    }

    /// Starts a group backup: every member frozen at one point.
    ///
    /// # Errors
    /// As [`Cloud::backup`]; no members.
    pub async fn backup_group(
        self: &Arc<Self>,
        req: BackupGroupRequest,
    ) -> Result<Started, CloudError> {
        self.start_backups(req, true).await
    }

    async fn start_backups(
        self: &Arc<Self>,
        req: BackupGroupRequest,
        group: bool,
    ) -> Result<Started, CloudError> {
        let mut names = req.volumes.clone();
        if !req.select.is_empty() {
            if !names.is_empty() {
                return Err(CloudError::Invalid(
                    "give --volume-ids or --label, not both".into(),
                ));
            }
            names = self
                .volumes
                .list()
                .iter()
                .filter(|v| {
                    let labels = v.meta().labels;
                    req.select.iter().all(|(k, val)| labels.get(k) == Some(val))
                })
                .map(|v| v.name().to_string())
                .collect();
            if names.is_empty() {
                return Err(CloudError::NotFound(
                    "no volume carries all the given labels".into(),
                ));
            }
        }
        if names.is_empty() {
            return Err(CloudError::Invalid(
                "name at least one volume (--volume-ids) or labels (--label)".into(),
            ));
        }
        let location = self.locations.resolve(req.location.as_deref())?;
        let created_name = new_snapshot_name();
        // Claims first: each member's volume, its one job slot, the new
        // snapshot's name and the location are held from here until the
        // task ends, so no request can delete or reuse them meanwhile and a
        // second backup of a member is refused.
        let mut members = Vec::with_capacity(names.len());
        for n in &names {
            let id = new_task_id();
            let claim = self
                .claims
                .acquire(Want::for_backup(&id, n, &created_name, &location))?;
            members.push((n, id, claim));
        }
        // Deleted before the claims were taken? (After, it cannot be.)
        self.locations.resolve(Some(&location))?;
        let repo = self.locations.repo(&location).await?;
        let mut plans = Vec::with_capacity(members.len());
        for (n, id, claim) in members {
            let v = self.volumes.get(n).ok_or_else(|| {
                CloudError::NotFound(format!(
                    "volume {n:?} not found: list volumes with `blockctl volume list`"
                ))
            })?;
            if v.restoring.load(std::sync::atomic::Ordering::Acquire) || v.is_lazy() {
                return Err(CloudError::Conflict(format!(
                    "volume {n} is being restored"
                )));
            }
            let (parent, base) = self.parent_of(&repo, &location, &v).await?;
            plans.push((v, parent, base, id, claim));
        }
        let metas = self
            .snapshots
            .create_claimed(CreateRequest {
                volumes: names.clone(),
                name: Some(created_name.clone()),
                pre_exec: req.pre_exec.clone(),
                post_exec: req.post_exec.clone(),
                exec_timeout: blockd_api::exec_timeout(req.exec_timeout_secs)
                    .map_err(CloudError::Invalid)?,
            })
            .await?;
        let group_id = (group || names.len() > 1).then(|| created_name.clone());
        let labels: BTreeMap<String, String> = req
            .select
            .iter()
            .chain(&req.labels)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut started = Vec::with_capacity(plans.len());
        let mut failed = None;
        for (v, parent, base, id, claim) in plans {
            let snap = self.snapshots.get(v.name(), &created_name);
            let meta = metas.iter().find(|m| m.volume == v.name());
            let (Some(snap), Some(meta)) = (snap, meta) else {
                failed = Some(CloudError::Internal(format!(
                    "the new snapshot of {} vanished",
                    v.name()
                )));
                break;
            };
            let chain = parent.as_ref().map_or(0, |p| p.chain + 1);
            let incremental = base && !req.full && meta.changes_known && chain < self.full_every;
            let full = !incremental;
            let total = if full {
                meta.size
            } else {
                self.changes_for(&snap).extents.len() * meta.extent_size
            };
            let task = Task {
                id,
                kind: TaskKind::Backup,
                state: TaskState::Active,
                volume: v.name().to_string(),
                snapshot: format!("{}/{created_name}", v.name()),
                location: location.clone(),
                group: group_id.clone(),
                full,
                lazy: false,
                created: now(),
                finished: None,
                bytes_total: total,
                bytes_done: 0,
                bytes_transferred: 0,
                bytes_reused: 0,
                elapsed_secs: 0.0,
                eta_secs: None,
                error: None,
            };
            let record = Record {
                task,
                plan: Plan::Backup {
                    parent: parent.map(|p| format!("{}/{}", p.volume, p.name)),
                    chain: if full { 0 } else { chain },
                    // Volume labels that selected a group are recorded too,
                    // so `cloudsnap list --label` finds the group's members.
                    labels: labels.clone(),
                    created: meta.created.clone(),
                    pause_us: meta.pause_us,
                    pre_exec: meta.pre_exec.clone().map(Into::into),
                    post_exec: meta.post_exec.clone().map(Into::into),
                },
                read: 0,
                new: 0,
            };
            if let Err(e) = self.save(&record) {
                failed = Some(e);
                break;
            }
            started.push((record, snap, claim));
        }
        if let Some(e) = failed {
            // Nothing runs: every member's snapshot is abandoned (its change
            // set merged back, so the next backup covers it) and the
            // records already written end Failed.
            for n in &names {
                let _ = self.snapshots.discard(n, &created_name);
            }
            for (r, _, _) in started {
                self.fail_record(r, &format!("the backup could not start: {e}"));
            }
            tracing::warn!(snapshot = %created_name, error = %e, "backup could not start; its changes are kept for the next backup");
            return Err(e);
        }
        let mut tasks = Vec::with_capacity(started.len());
        for (record, snap, claim) in started {
            tracing::info!(task = %record.task.id, snapshot = %record.task.snapshot, %location, full = record.task.full, "backup started");
            tasks.push(record.task.clone());
            self.spawn_backup(record, snap, claim);
        }
        Ok(Started {
            group: group_id,
            tasks,
        })
    }

    /// The parent of a backup of `v` to `location`, and whether it is the
    /// base of an incremental: the volume's last backup there, still listed.
    /// A full read uses a parent too: chunks unchanged at the same place are
    /// referenced, not uploaded again.
    async fn parent_of(
        &self,
        repo: &Repo,
        location: &str,
        v: &crate::volume::Volume,
    ) -> Result<(Option<Manifest>, bool), CloudError> {
        let parent = match self.db.backup_base(v.name())? {
            Some((loc, snap)) if loc == location => match split_snap(&snap) {
                Some((pv, pn)) => match repo.get_manifest(pv, pn).await {
                    Ok(m) if m.size == v.size() && m.extent_size == v.extent_size() => Some(m),
                    Ok(_) | Err(RepoError::Missing { .. }) => None,
                    Err(e) => return Err(e.into()),
                },
                None => None,
            },
            _ => None,
        };
        // Without one (first backup here, or the last backup went to
        // another location and took the change set with it), the whole
        // volume is read, but chunks unchanged since this volume's latest
        // snapshot in this location are still referenced.
        Ok(match parent {
            Some(p) => (Some(p), true),
            None => (self.latest_same_shape(repo, v).await, false),
        })
    }

    /// The latest readable snapshot of `v`'s name in `repo` with its size
    /// and extent size (a full read references its unchanged chunks).
    async fn latest_same_shape(&self, repo: &Repo, v: &crate::volume::Volume) -> Option<Manifest> {
        let names = repo.list_snapshots(Some(v.name())).await.ok()?;
        for (vol, name) in names.iter().rev().filter(|(_, n)| is_snapshot_name(n)) {
            if let Ok(m) = repo.get_manifest(vol, name).await {
                if m.size == v.size() && m.extent_size == v.extent_size() {
                    return Some(m);
                }
            }
        }
        None
    }

    /// The change set a backup of `snap` must read: its own, plus those of
    /// any other held snapshot of the volume (a local snapshot taken since
    /// the last backup took those changes from the volume's map).
    fn changes_for(&self, snap: &SnapshotStore) -> ChangeSet {
        let m = snap.meta();
        let mut c = snap.changes().clone();
        for other in self.snapshots.list(Some(&m.volume)) {
            if other.meta().name != m.name {
                c.merge(other.changes());
            }
        }
        c
    }

    fn spawn_backup(self: &Arc<Self>, record: Record, snap: Arc<SnapshotStore>, claim: Claim) {
        let run = self.register(record, None);
        let me = self.clone();
        self.tracker.spawn(async move {
            // Held until the task has ended, whatever way it ends.
            let _claim = claim;
            let outcome = me.run_backup(&run, &snap).await;
            let (volume, name, id) = {
                let r = run.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (v, n) = split_snap(&r.task.snapshot).unwrap_or_default();
                (v.to_string(), n.to_string(), r.task.id.clone())
            };
            match outcome {
                Ok(()) => {
                    if let Err(e) = me.snapshots.release(&volume, &name) {
                        tracing::warn!(error = %e, "releasing the backup's snapshot failed");
                    }
                    // The last member of a group writes the group object
                    // before it reports Done; members finish one at a time
                    // here, so exactly one of them sees the others Done.
                    let (group, location) = {
                        let r = run.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        (r.task.group.clone(), r.task.location.clone())
                    };
                    let _finishing = me.finishing.lock().await;
                    if let Some(g) = &group {
                        me.maybe_write_group(g, &location, &id).await;
                    }
                    let r = me.finish(&run, TaskState::Done, None);
                    let _ = me.db.set_backup_base(&volume, Some((&r.task.location, &r.task.snapshot)));
                    tracing::info!(task = %id, snapshot = %r.task.snapshot, read = r.read, new = r.new, uploaded = r.task.bytes_transferred, secs = r.task.elapsed_secs, "backup done");
                }
                Err(CloudError::Cancelled)
                    if !run.stopped.load(std::sync::atomic::Ordering::Acquire) =>
                {
                    // Left active: it resumes at the next start from its
                    // last checkpoint, whose record (and counters) stay as
                    // saved then, so redone work is not counted twice.
                    me.lock().remove(&id);
                }
                Err(e) => {
                    let stopped = matches!(e, CloudError::Cancelled);
                    let _ = me.snapshots.discard(&volume, &name);
                    let (state, err) = if stopped {
                        (TaskState::Stopped, Some("stopped by request; its changes go to the next backup".to_string()))
                    } else {
                        (TaskState::Failed, Some(format!("{e}; the volume's changes are kept for the next backup")))
                    };
                    tracing::warn!(task = %id, state = %state, error = ?err, "backup ended");
                    me.finish(&run, state, err);
                }
            }
        });
    }

    async fn run_backup(
        &self,
        run: &Arc<Running>,
        snap: &Arc<SnapshotStore>,
    ) -> Result<(), CloudError> {
        let rec = run.snapshot();
        let (parent_id, chain, labels, created, pause_us, pre_exec, post_exec) = match &rec.plan {
            Plan::Backup {
                parent,
                chain,
                labels,
                created,
                pause_us,
                pre_exec,
                post_exec,
            } => (
                parent.clone(),
                *chain,
                labels.clone(),
                created.clone(),
                *pause_us,
                pre_exec.clone(),
                post_exec.clone(),
            ),
            Plan::Restore { .. } => return Err(CloudError::Internal("not a backup".into())),
        };
        let repo = self.locations.repo(&rec.task.location).await?;
        let volume = self
            .volumes
            .get(&rec.task.volume)
            .ok_or_else(|| CloudError::NotFound(format!("volume {} is gone", rec.task.volume)))?;
        let parent = match parent_id.as_deref().and_then(split_snap) {
            Some((v, n)) => Some(repo.get_manifest(v, n).await?),
            None => None,
        };
        let cancel = run.stop.clone();
        let run2 = run.clone();
        let job = backup::Job {
            task: rec.task.id.clone(),
            repo: repo.clone(),
            volume,
            snap: snap.clone(),
            changes: self.changes_for(snap),
            full: rec.task.full,
            parent: parent.clone(),
            db: self.db.clone(),
            progress: run.progress.clone(),
            cancel,
            record: Box::new(move || encode_record(&run2.snapshot())),
        };
        let blocks = backup::run(&job).await;
        let blocks = blocks?;
        let r = run.snapshot();
        let (v, n) = split_snap(&r.task.snapshot).unwrap_or_default();
        let meta = snap.meta();
        let mut manifest = Manifest {
            volume: v.to_string(),
            name: n.to_string(),
            created,
            size: meta.size,
            extent_size: meta.extent_size,
            full: r.task.full,
            chain,
            parent: if r.task.full { None } else { parent_id },
            group: r.task.group.clone(),
            labels,
            bytes_read: r.read,
            bytes_new: r.new,
            bytes_reused: r.task.bytes_reused,
            bytes_uploaded: r.task.bytes_transferred,
            pause_us,
            pre_exec,
            post_exec,
            blocks: blocks.into_iter().collect(),
        };
        // The manifest's own size counts as uploaded too (approximately).
        manifest.bytes_uploaded += 256 + 80 * manifest.blocks.len() as u64;
        match repo.put_manifest(&manifest).await {
            Ok(n) => Progress::add(&run.progress.transferred, n),
            // Written by this task before a crash: done.
            Err(RepoError::Exists { .. })
                if repo
                    .get_manifest(v, n)
                    .await
                    .is_ok_and(|m| m.blocks == manifest.blocks) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Writes the group object if every member but `finishing` (which is
    /// about to be Done) is Done.
    async fn maybe_write_group(&self, group: &str, location: &str, finishing: &str) {
        let Ok(records) = self.db.tasks(false, 10_000) else {
            return;
        };
        let members: Vec<Record> = records
            .iter()
            .filter_map(|r| serde_json::from_str::<Record>(r).ok())
            .filter(|r| r.task.group.as_deref() == Some(group) && r.task.kind == TaskKind::Backup)
            .collect();
        if members
            .iter()
            .any(|r| r.task.id != finishing && r.task.state != TaskState::Done)
        {
            return;
        }
        let Ok(repo) = self.locations.repo(location).await else {
            return;
        };
        let g = Group {
            group: group.to_string(),
            created: members
                .iter()
                .map(|r| r.task.created.clone())
                .min()
                .unwrap_or_default(),
            members: members.iter().map(|r| r.task.snapshot.clone()).collect(),
        };
        match repo.put_group(&g).await {
            Ok(_) => tracing::info!(group, members = g.members.len(), "group backup recorded"),
            Err(e) => tracing::error!(group, error = %e, "writing the group object failed"),
        }
    }

    // ---- tasks -----------------------------------------------------------

    /// Tasks, newest first: all, those matching a task or group id, or the
    /// finished ones.
    ///
    /// # Errors
    /// State database errors.
    pub fn tasks(&self, name: Option<&str>, finished: bool) -> Result<Vec<Task>, CloudError> {
        let live: HashMap<String, Task> = self
            .lock()
            .iter()
            .map(|(id, r)| (id.clone(), r.snapshot().task))
            .collect();
        let mut out = Vec::new();
        for rec in self.db.tasks(false, 1000)? {
            let Ok(r) = serde_json::from_str::<Record>(&rec) else {
                continue;
            };
            let t = live.get(&r.task.id).cloned().unwrap_or(r.task);
            if let Some(n) = name {
                if t.id != n && t.group.as_deref() != Some(n) {
                    continue;
                }
            }
            if finished && !t.state.is_final() {
                continue;
            }
            out.push(t);
        }
        if let Some(n) = name.filter(|_| out.is_empty()) {
            return Err(CloudError::NotFound(format!(
                "no task or group {n:?}: list them with `blockctl cloudsnap status`"
            )));
        }
        Ok(out)
    }

    /// One task.
    ///
    /// # Errors
    /// Unknown id.
    pub fn task(&self, id: &str) -> Result<Task, CloudError> {
        if let Some(r) = self.lock().get(id) {
            return Ok(r.snapshot().task);
        }
        let rec = self.db.task(id)?.ok_or_else(|| {
            CloudError::NotFound(format!(
                "no task {id:?}: list them with `blockctl cloudsnap status`"
            ))
        })?;
        serde_json::from_str::<Record>(&rec)
            .map(|r| r.task)
            .map_err(|e| CloudError::internal("task record", e))
    }

    /// Stops a running task and waits for it to end.
    ///
    /// # Errors
    /// Unknown or finished task.
    pub async fn stop(&self, id: &str) -> Result<Task, CloudError> {
        let run = self.lock().get(id).cloned();
        let Some(run) = run else {
            let t = self.task(id)?;
            return Err(CloudError::Conflict(format!(
                "task {id} already ended ({})",
                t.state
            )));
        };
        run.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        run.stop.cancel();
        for _ in 0..600 {
            if !self.lock().contains_key(id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.task(id)
    }

    // ---- catalog ---------------------------------------------------------

    pub(crate) fn to_cloudsnap(m: &Manifest, location: &str) -> CloudSnap {
        CloudSnap {
            id: format!("{}/{}", m.volume, m.name),
            volume: m.volume.clone(),
            location: location.to_string(),
            created: m.created.clone(),
            size: m.size,
            extent_size: m.extent_size,
            full: m.full,
            parent: m.parent.clone(),
            group: m.group.clone(),
            labels: m.labels.clone(),
            bytes_read: m.bytes_read,
            bytes_new: m.bytes_new,
            bytes_reused: m.bytes_reused,
            bytes_uploaded: m.bytes_uploaded,
            status: "Done".into(),
        }
    }

    /// Snapshots in a location's bucket.
    ///
    /// # Errors
    /// Unknown location, provider errors, a corrupt manifest (named).
    pub async fn list(
        &self,
        location: Option<&str>,
        src: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<CloudSnap>, CloudError> {
        let location = self.locations.resolve(location)?;
        let repo = self.locations.repo(&location).await?;
        let names = repo.list_snapshots(src).await?;
        let manifests: Vec<((String, String), Result<Manifest, RepoError>)> =
            futures::StreamExt::collect(futures::StreamExt::buffered(
                futures::stream::iter(names.into_iter().map(|(v, n)| {
                    let repo = repo.clone();
                    async move {
                        let r = if is_snapshot_name(&n) {
                            repo.get_manifest(&v, &n).await
                        } else {
                            Err(repo.foreign_manifest(&v, &n))
                        };
                        ((v, n), r)
                    }
                })),
                8,
            ))
            .await;
        let mut out = Vec::new();
        for ((v, n), m) in manifests {
            match m {
                Ok(m) => {
                    if labels.iter().all(|(k, val)| m.labels.get(k) == Some(val)) {
                        out.push(Self::to_cloudsnap(&m, &location));
                    }
                }
                // Damaged or foreign objects are listed by name (so they can
                // be seen and deleted), never used.
                Err(RepoError::Corrupt { reason, object, .. }) if labels.is_empty() => {
                    tracing::warn!(%location, %object, %reason, "unusable object under snapshots/");
                    out.push(CloudSnap {
                        id: format!("{v}/{n}"),
                        volume: v,
                        location: location.clone(),
                        created: String::new(),
                        size: 0,
                        extent_size: 0,
                        full: false,
                        parent: None,
                        group: None,
                        labels: BTreeMap::new(),
                        bytes_read: 0,
                        bytes_new: 0,
                        bytes_reused: 0,
                        bytes_uploaded: 0,
                        status: format!("Corrupt: {reason}"),
                    });
                }
                Err(RepoError::Corrupt { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Names start with the freeze time in milliseconds: id order is time order.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Resolves `--snap`: a snapshot id, or a volume name for its latest.
    async fn find(&self, repo: &Repo, snap: &str) -> Result<Manifest, CloudError> {
        let (v, n) = match split_snap(snap) {
            Some((v, n)) => (v.to_string(), n.to_string()),
            None => {
                let names = repo.list_snapshots(Some(snap)).await?;
                let Some(last) = names
                    .into_iter()
                    .filter(|(_, n)| is_snapshot_name(n))
                    .max_by(|a, b| a.1.cmp(&b.1))
                else {
                    return Err(CloudError::NotFound(format!(
                        "no cloud snapshot {snap:?} in location {}: give VOLUME/SNAPSHOT or a volume name (see `blockctl cloudsnap list`)",
                        repo.location()
                    )));
                };
                last
            }
        };
        match repo.get_manifest(&v, &n).await {
            Err(RepoError::Missing { .. }) => Err(CloudError::NotFound(format!(
                "no cloud snapshot {v}/{n} in location {}: see `blockctl cloudsnap list`",
                repo.location()
            ))),
            r => Ok(r?),
        }
    }

    /// A snapshot's manifest; with `verify`, every chunk is fetched and
    /// checked.
    ///
    /// # Errors
    /// Unknown snapshot; a missing or corrupt object, named with the snapshot.
    pub async fn catalog(
        &self,
        location: Option<&str>,
        snap: &str,
        verify: bool,
    ) -> Result<Catalog, CloudError> {
        let location = self.locations.resolve(location)?;
        let repo = self.locations.repo(&location).await?;
        let m = self.find(&repo, snap).await?;
        let id = format!("{}/{}", m.volume, m.name);
        let named = |e: RepoError| CloudError::Internal(format!("snapshot {id}: {e}"));
        let mut data_bytes = 0u64;
        let mut chunks = 0u64;
        let mut bytes = 0u64;
        for (b, ix) in &m.blocks {
            let entries = repo.get_index(*b, ix).await.map_err(named)?;
            data_bytes += entries.iter().map(|e| u64::from(e.len)).sum::<u64>();
            if verify {
                let (c, n) = restore::verify(&repo, &entries)
                    .await
                    .map_err(|e| match e {
                        CloudError::Repo(r) => named(r),
                        e => e,
                    })?;
                chunks += c;
                bytes += n;
            }
        }
        Ok(Catalog {
            snap: Self::to_cloudsnap(&m, &location),
            chunk_size: repo.config.chunk_size,
            index_span: repo.config.index_span,
            index_blocks: m.blocks.len() as u64,
            data_bytes,
            pause_us: m.pause_us,
            pre_exec: m.pre_exec.clone(),
            post_exec: m.post_exec.clone(),
            verified: verify.then_some(Verified { chunks, bytes }),
        })
    }

    /// Deletes a snapshot's manifest; other snapshots stay restorable
    /// (their index blocks are complete maps; chunks are reclaimed by GC).
    ///
    /// # Errors
    /// Unknown snapshot, provider errors.
    pub async fn delete(&self, location: Option<&str>, snap: &str) -> Result<(), CloudError> {
        let location = self.locations.resolve(location)?;
        let repo = self.locations.repo(&location).await?;
        let (v, n) = split_snap(snap).ok_or_else(|| {
            CloudError::Invalid(format!(
                "--snap {snap:?} must be VOLUME/SNAPSHOT (see `blockctl cloudsnap list`)"
            ))
        })?;
        let _claim = self
            .claims
            .acquire(Want::for_cloudsnap_delete(&location, &format!("{v}/{n}")))?;
        if !repo.has_manifest(v, n).await? {
            return Err(CloudError::NotFound(format!(
                "no cloud snapshot {snap} in location {location}"
            )));
        }
        repo.delete_manifest(v, n).await?;
        tracing::info!(snapshot = snap, %location, "cloud snapshot deleted");
        Ok(())
    }

    // ---- restore ---------------------------------------------------------

    /// Starts a full restore into a new volume.
    ///
    /// # Errors
    /// Unknown snapshot or location, an existing volume name.
    pub async fn restore(self: &Arc<Self>, req: RestoreRequest) -> Result<Started, CloudError> {
        let location = self.locations.resolve(req.location.as_deref())?;
        let repo = self.locations.repo(&location).await?;
        if self.volumes.get(&req.volume).is_some() {
            return Err(CloudError::Conflict(format!(
                "volume {} already exists: restore into a new name (a restore never overwrites a volume)",
                req.volume
            )));
        }
        let m = self.find(&repo, &req.snap).await?;
        let id = new_task_id();
        let snapshot = format!("{}/{}", m.volume, m.name);
        // Held until the task ends: the new volume's name, its job slot, the
        // location and the cloud snapshot being read (which therefore
        // cannot be deleted while the restore needs it).
        let claim = self.claims.acquire(Want::for_restore(
            &id,
            &req.volume,
            &location,
            &snapshot,
            req.lazy,
        ))?;
        // A delete that ended between `find` and the claim.
        self.locations.resolve(Some(&location))?;
        if !repo.has_manifest(&m.volume, &m.name).await? {
            return Err(CloudError::NotFound(format!(
                "cloud snapshot {snapshot} was just deleted from location {location}"
            )));
        }
        let v = self
            .volumes
            .create(blockd_api::CreateVolume {
                name: req.volume.clone(),
                size: m.size,
                extent_size: Some(m.extent_size),
                labels: BTreeMap::new(),
            })
            .map_err(|e| match e {
                crate::volume::store::StoreError::Exists { .. } => {
                    CloudError::Conflict(e.to_string())
                }
                crate::volume::store::StoreError::Invalid { .. } => {
                    CloudError::Invalid(e.to_string())
                }
                e => CloudError::Internal(e.to_string()),
            })?;
        if !req.lazy {
            v.restoring
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let task = Task {
            id,
            kind: TaskKind::Restore,
            state: TaskState::Active,
            volume: req.volume.clone(),
            snapshot,
            location: location.clone(),
            group: None,
            full: true,
            lazy: req.lazy,
            created: now(),
            finished: None,
            bytes_total: m.size,
            bytes_done: 0,
            bytes_transferred: 0,
            bytes_reused: 0,
            elapsed_secs: 0.0,
            eta_secs: None,
            error: None,
        };
        let record = Record {
            task: task.clone(),
            plan: Plan::Restore {
                src_volume: m.volume.clone(),
                src_name: m.name.clone(),
                lazy: req.lazy,
                unit: repo.config.chunk_size,
            },
            read: 0,
            new: 0,
        };
        let hydration = if req.lazy {
            let started = async {
                let _ =
                    crate::volume::lazy::remove_present(&self.volumes.present_path(&req.volume));
                let h = self.attach_lazy(
                    &v,
                    &record,
                    Some(hydrate::Ready::new(repo.clone(), m)),
                    true,
                )?;
                // The map exists before the task does: a resumed lazy
                // restore without one is damage, never a fresh start.
                h.lazy
                    .persist(roaring::RoaringBitmap::new(), 0)
                    .await
                    .map_err(|e| CloudError::internal("writing the present map", e))?;
                Ok::<_, CloudError>(h)
            };
            match started.await {
                Ok(h) => Some(h),
                Err(e) => {
                    v.end_lazy();
                    let _ = self.volumes.delete(&req.volume, true);
                    return Err(e);
                }
            }
        } else {
            None
        };
        if let Err(e) = self.save(&record) {
            // Without a record nothing would finish or resume this restore:
            // the new volume goes.
            if hydration.is_some() {
                v.end_lazy();
            }
            let _ = self.volumes.delete(&req.volume, true);
            return Err(e);
        }
        tracing::info!(task = %task.id, snapshot = %task.snapshot, volume = %task.volume, lazy = req.lazy, "restore started");
        self.spawn_restore(record, hydration, claim);
        Ok(Started {
            group: None,
            tasks: vec![task],
        })
    }

    fn spawn_restore(self: &Arc<Self>, record: Record, hydration: Option<Hydration>, claim: Claim) {
        let run = self.register(
            record,
            hydration.as_ref().map(|h| h.source.progress.clone()),
        );
        let me = self.clone();
        self.tracker.spawn(async move {
            // Held until the task has ended, whatever way it ends.
            let _claim = claim;
            let lazy = hydration.is_some();
            let outcome = match &hydration {
                Some(h) => me.run_hydrate(&run, h).await,
                None => me.run_restore(&run).await,
            };
            let (id, volume, snapshot, location) = {
                let r = run.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (r.task.id.clone(), r.task.volume.clone(), r.task.snapshot.clone(), r.task.location.clone())
            };
            match outcome {
                Ok(()) if lazy => {
                    // The volume is the snapshot plus its own writes, which
                    // its dirty map holds: the next backup to the same
                    // location can be an incremental on the snapshot.
                    let _ = me.db.set_backup_base(&volume, Some((&location, &snapshot)));
                    // Done is recorded before the present map goes: a
                    // crash in between must not restart hydration on an
                    // empty map (it would overwrite the volume's writes).
                    let r = me.finish(&run, TaskState::Done, None);
                    if let Some(v) = me.volumes.get(&volume) {
                        if let Some(l) = v.lazy() {
                            v.end_lazy();
                            if let Err(e) = l.remove_file() {
                                tracing::warn!(%volume, error = %e, "removing the present map failed");
                            }
                        }
                    }
                    tracing::info!(task = %id, %volume, %snapshot, secs = r.task.elapsed_secs, fetched = r.task.bytes_transferred, "lazy restore done: the volume is complete");
                }
                Ok(()) => {
                    if let Some(v) = me.volumes.get(&volume) {
                        // The volume now equals the snapshot: its next backup
                        // to the same location can be an incremental on it.
                        let _ = v.dirty.take();
                        v.restoring.store(false, std::sync::atomic::Ordering::Release);
                    }
                    let _ = me.db.set_backup_base(&volume, Some((&location, &snapshot)));
                    let r = me.finish(&run, TaskState::Done, None);
                    tracing::info!(task = %id, %volume, %snapshot, secs = r.task.elapsed_secs, fetched = r.task.bytes_transferred, "restore done");
                }
                Err(CloudError::Cancelled)
                    if !run.stopped.load(std::sync::atomic::Ordering::Acquire) =>
                {
                    me.lock().remove(&id);
                }
                Err(e) => {
                    let stopped = matches!(e, CloudError::Cancelled);
                    // An incomplete volume must not be mistaken for the snapshot.
                    me.snapshots.delete_volume(&volume);
                    let _ = me.volumes.delete(&volume, true);
                    let err = if stopped {
                        format!("stopped by request; the incomplete volume {volume} was deleted")
                    } else {
                        format!("{e}; the incomplete volume {volume} was deleted")
                    };
                    tracing::warn!(task = %id, error = %err, "restore ended");
                    me.finish(&run, if stopped { TaskState::Stopped } else { TaskState::Failed }, Some(err));
                }
            }
        });
    }

    /// Serves `v` lazily for the restore `r`: its present map (new when
    /// `fresh`, else it must exist) and the source of its missing units.
    fn attach_lazy(
        self: &Arc<Self>,
        v: &crate::volume::Volume,
        r: &Record,
        ready: Option<hydrate::Ready>,
        fresh: bool,
    ) -> Result<Hydration, CloudError> {
        let Plan::Restore {
            src_volume,
            src_name,
            unit,
            ..
        } = &r.plan
        else {
            return Err(CloudError::Internal("not a restore".into()));
        };
        let path = self.volumes.present_path(v.name());
        if !fresh && !path.exists() {
            return Err(CloudError::Internal(format!(
                "the present map {} of lazily restored volume {} is missing",
                path.display(),
                v.name()
            )));
        }
        let progress = Arc::new(Progress::default());
        progress
            .total
            .store(r.task.bytes_total, std::sync::atomic::Ordering::Relaxed);
        progress.transferred.store(
            r.task.bytes_transferred,
            std::sync::atomic::Ordering::Relaxed,
        );
        let source = Arc::new(hydrate::RepoSource::new(
            Arc::downgrade(self),
            r.task.location.clone(),
            src_volume.clone(),
            src_name.clone(),
            ready,
            progress,
        ));
        let lazy = v
            .make_lazy(path, *unit, source.clone())
            .map_err(|e| CloudError::internal(&format!("volume {}", v.name()), e))?;
        Ok(Hydration { lazy, source })
    }

    async fn run_hydrate(&self, run: &Arc<Running>, h: &Hydration) -> Result<(), CloudError> {
        let rec = run.snapshot();
        let volume = self
            .volumes
            .get(&rec.task.volume)
            .ok_or_else(|| CloudError::NotFound(format!("volume {} is gone", rec.task.volume)))?;
        let run2 = run.clone();
        let job = hydrate::Job {
            volume,
            lazy: h.lazy.clone(),
            source: h.source.clone(),
            progress: run.progress.clone(),
            cancel: run.stop.clone(),
            report: Box::new(move |why| {
                run2.record
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .task
                    .error = why;
            }),
            limit: self.hydrate_limit,
        };
        hydrate::run(&job).await
    }

    async fn run_restore(&self, run: &Arc<Running>) -> Result<(), CloudError> {
        let rec = run.snapshot();
        let Plan::Restore {
            src_volume,
            src_name,
            ..
        } = &rec.plan
        else {
            return Err(CloudError::Internal("not a restore".into()));
        };
        let repo = self.locations.repo(&rec.task.location).await?;
        let manifest = repo
            .get_manifest(src_volume, src_name)
            .await
            .map_err(|e| CloudError::Internal(format!("snapshot {src_volume}/{src_name}: {e}")))?;
        let volume = self
            .volumes
            .get(&rec.task.volume)
            .ok_or_else(|| CloudError::NotFound(format!("volume {} is gone", rec.task.volume)))?;
        let cancel = run.stop.clone();
        let run2 = run.clone();
        let job = restore::Job {
            task: rec.task.id.clone(),
            repo,
            manifest,
            volume,
            db: self.db.clone(),
            progress: run.progress.clone(),
            cancel,
            record: Box::new(move || encode_record(&run2.snapshot())),
        };
        let r = restore::run(&job).await;
        r?;
        run.progress
            .done
            .store(rec.task.bytes_total, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
