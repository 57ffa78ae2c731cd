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
mod catalog;
mod check;
mod gc;
pub mod http;
pub mod hydrate;
pub mod locations;
pub mod restore;
pub mod schedule;
mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claims::{Busy, Claims};
use crate::outcome::Outcome;
use crate::repo::RepoError;
use crate::snapshot::{FreezeError, Snapshots};
use crate::state::{StateDb, StateError};
use crate::volume::store::{Store, StoreError};
use locations::{LocationError, Locations};
use task::{Record, Running};

/// A full read every this many backups (pxctl: "every 7th backup is a full backup").
pub const DEFAULT_FULL_EVERY: u32 = 7;

/// How long a backup or restore waits out a location that keeps failing
/// before it fails (`cloud.outage_wait`): long enough for a provider's
/// incident or a restarted gateway, short enough that a backup held up
/// does not hold its local snapshot (and its copy-on-write cost) for hours.
pub const DEFAULT_OUTAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

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
    /// Minimum age of a garbage-collection mark before it is swept.
    pub gc_grace: std::time::Duration,
    /// A backup running longer may not commit.
    pub backup_deadline: std::time::Duration,
    /// How long a task waits out a location that keeps failing.
    pub outage_wait: std::time::Duration,
    /// Background garbage collection of every location this often.
    pub gc_every: Option<std::time::Duration>,
    /// Unused space garbage collection tolerates in packs in use.
    pub gc_max_unused: blockd_api::MaxUnused,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            full_every: DEFAULT_FULL_EVERY,
            hydrate_limit: None,
            fault_rate: None,
            gc_grace: std::time::Duration::from_secs(24 * 3600),
            backup_deadline: std::time::Duration::from_secs(20 * 3600),
            outage_wait: DEFAULT_OUTAGE_WAIT,
            gc_every: Some(std::time::Duration::from_secs(24 * 3600)),
            gc_max_unused: blockd_api::MaxUnused::default(),
        }
    }
}

/// Why a cloud operation failed.
///
/// Variants say what happened and name what it happened to; the HTTP
/// status follows from [`CloudError::outcome`], nowhere else.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CloudError {
    /// A location (credentials) was refused or failed.
    #[error(transparent)]
    Location(#[from] LocationError),
    /// Listing every location stopped at one that failed.
    #[error("{source}; the other locations can be listed one at a time with --cred-id NAME (`blockctl credentials list` names them)")]
    ListingAll {
        /// Why the location failed.
        source: Box<CloudError>,
    },
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Local state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Something it needs is in use by another request or task.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The freeze of a backup was refused or failed.
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    /// Creating the volume of a restore failed.
    #[error(transparent)]
    Volume(#[from] StoreError),
    /// Both explicit volumes and a label selector were given.
    #[error("give --volume-ids or --label, not both")]
    VolumesAndLabels,
    /// Neither volumes nor labels were given.
    #[error("name at least one volume (--volume-ids) or labels (--label)")]
    NoVolumes,
    /// No volume carries every given label.
    #[error("no volume carries all the given labels: `blockctl volume list` shows each volume's labels, `blockctl volume update NAME --label KEY=VALUE` sets one")]
    NoLabelMatch,
    /// A schedule is malformed.
    #[error("{why}")]
    BadSchedule {
        /// What is wrong.
        why: String,
    },
    /// Another schedule backs up some of the same volumes to the same
    /// location at one of the same times.
    #[error("schedule {id} already backs up {what} to location {location} at {when} (the second would back up the same data again right after the first): choose other times, other volumes or another location (`--cred-id`), or delete it first with `blockctl cloudsnap schedules delete --uuid {id}`")]
    ScheduleClash {
        /// The schedule there.
        id: String,
        /// What both back up (`volume "vb"`, `volumes "vb", "vc"`, or a
        /// label selection).
        what: String,
        /// The location both name.
        location: String,
        /// The time both have.
        when: String,
    },
    /// An unknown schedule.
    #[error("no schedule {id:?}: list them with `blockctl cloudsnap schedules list`")]
    ScheduleNotFound {
        /// Id given.
        id: String,
    },
    /// `--expire` is malformed or in the past.
    #[error("{why}")]
    BadExpire {
        /// What is wrong with it.
        why: String,
    },
    /// `--subset` is malformed or given without `--read-data`.
    #[error("{why}")]
    BadSubset {
        /// What is wrong with it.
        why: String,
    },
    /// The exec timeout is out of range.
    #[error("{why}")]
    ExecTimeout {
        /// What is wrong with it.
        why: String,
    },
    /// An unknown volume.
    #[error("volume {volume:?} not found: list volumes with `blockctl volume list`")]
    VolumeNotFound {
        /// Volume.
        volume: String,
    },
    /// The volume of a task was deleted under it.
    #[error("volume {volume} is gone")]
    VolumeGone {
        /// Volume.
        volume: String,
    },
    /// A restore is filling the volume, or left it incomplete: it has no
    /// consistent content.
    #[error("volume {volume} cannot be backed up: {why}")]
    Restoring {
        /// Volume.
        volume: String,
        /// The volume's state.
        why: String,
    },
    /// A restore never overwrites a volume.
    #[error("volume {volume} already exists: restore into a new name (a restore never overwrites a volume)")]
    VolumeExists {
        /// Volume.
        volume: String,
    },
    /// `--snap` named a volume without cloud snapshots.
    #[error("no cloud snapshot {snap:?} in location {location}: give an id VOLUME/SNAPSHOT as `blockctl cloudsnap list` shows it (a restore or catalog also takes a volume name, for its newest)")]
    NoSnapshotOf {
        /// What was given.
        snap: String,
        /// Location.
        location: String,
    },
    /// `--snap` named a group backup, which is several snapshots.
    #[error("{group:?} is a group backup, not one snapshot: give one of its members as `--snap` ({members}), one restore each")]
    GroupNotSnapshot {
        /// What was given.
        group: String,
        /// Its members' ids, comma-separated.
        members: String,
    },
    /// `--snap` gave a volume name whose newest snapshot another host
    /// took, while this host backs up a volume of that name there too.
    #[error("--snap {snap}: the newest snapshot of a volume named {snap} in location {location}, {newest}, was taken on host {host}, but this host backs up its own volume {snap} too (its last backup: {ours}): give the snapshot id to say which (`blockctl cloudsnap list --src {snap}` shows each one's host)")]
    NameOnTwoHosts {
        /// The volume name given.
        snap: String,
        /// The newest snapshot of that name.
        newest: String,
        /// The host that took it.
        host: String,
        /// Location.
        location: String,
        /// This host's last backup of its volume of that name, and where.
        ours: String,
    },
    /// `--snap` without `--cred-id` is in no location.
    #[error("no cloud snapshot {snap:?} in any location ({locations}): give an id VOLUME/SNAPSHOT as `blockctl cloudsnap list` shows it (a restore or catalog also takes a volume name, for its newest)")]
    NoSnapshotAnywhere {
        /// What was given.
        snap: String,
        /// Every location, comma-separated.
        locations: String,
    },
    /// `--snap` without `--cred-id` is in several locations.
    #[error(
        "cloud snapshot {snap:?} is in several locations ({locations}): choose one with --cred-id"
    )]
    SnapshotInSeveral {
        /// What was given.
        snap: String,
        /// The locations holding it, comma-separated.
        locations: String,
    },
    /// An unknown cloud snapshot.
    #[error("no cloud snapshot {snapshot} in location {location}: see `blockctl cloudsnap list`")]
    SnapshotNotFound {
        /// `VOLUME/SNAPSHOT`.
        snapshot: String,
        /// Location.
        location: String,
    },
    /// `--snap` is not `VOLUME/SNAPSHOT` where one is required.
    #[error("--snap {snap:?} must be VOLUME/SNAPSHOT (see `blockctl cloudsnap list`)")]
    BadSnapshotId {
        /// What was given.
        snap: String,
    },
    /// `--snap` is neither `VOLUME/SNAPSHOT` nor a volume name.
    #[error("--snap {snap:?} is neither a cloud snapshot id VOLUME/SNAPSHOT nor a volume name (for its newest snapshot): see `blockctl cloudsnap list`")]
    BadSnapshotRef {
        /// What was given.
        snap: String,
    },
    /// An object of a cloud snapshot is missing or corrupt.
    #[error("snapshot {snapshot}: {source}")]
    Damaged {
        /// `VOLUME/SNAPSHOT`.
        snapshot: String,
        /// What the repository found.
        #[source]
        source: RepoError,
    },
    /// The location kept failing for longer than the task waits.
    #[error("{source} (every attempt failed for {waited}; a task waits this long, `cloud.outage_wait`, before it fails)")]
    Outage {
        /// How long the task waited, as people write it.
        waited: String,
        /// The last attempt's error.
        source: Box<CloudError>,
    },
    /// The new local snapshot of a backup member disappeared.
    #[error("the new snapshot of {volume} vanished")]
    SnapshotVanished {
        /// Volume.
        volume: String,
    },
    /// The lazy restore's record of fetched units is gone.
    #[error("the present map {path} of lazily restored volume {volume} is missing")]
    PresentMapMissing {
        /// Volume.
        volume: String,
        /// Expected file.
        path: String,
    },
    /// Reading or writing a volume failed.
    #[error("{op} volume {volume}: {source}")]
    VolumeIo {
        /// What was being done ("reading", "writing", ...).
        op: &'static str,
        /// Volume.
        volume: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An unknown task id.
    #[error("no task {id:?}: list them with `blockctl cloudsnap status`")]
    TaskNotFound {
        /// Task id.
        id: String,
    },
    /// A backup whose request is still taking its snapshot (hooks and
    /// freeze): its task is saved once that is done.
    #[error("task {id:?} is still starting: its snapshot is being taken (pre-exec, freeze, post-exec); once that is done it shows in `blockctl cloudsnap status` (`blockctl cloudsnap stop {id}` waits for that, then stops it)")]
    TaskStarting {
        /// Task id.
        id: String,
    },
    /// Neither a task nor a group has this id.
    #[error("no task or group {id:?}: list them with `blockctl cloudsnap status`")]
    NoTaskOrGroup {
        /// What was given.
        id: String,
    },
    /// Stopping a lazy restore would delete a volume clients use.
    #[error("volume {volume} is being restored lazily and has {connections} open NBD connection(s); stopping the restore deletes the volume and what was written to it: disconnect the clients or stop with --force")]
    InUse {
        /// Volume.
        volume: String,
        /// Open connections.
        connections: u64,
    },
    /// The task is not running any more.
    #[error("task {id} already ended ({state})")]
    TaskEnded {
        /// Task id.
        id: String,
        /// Its final state.
        state: blockd_api::TaskState,
    },
    /// A task record of the other kind was handed to a runner.
    #[error("task {id} is not a {expected}")]
    WrongPlan {
        /// Task id.
        id: String,
        /// "backup" or "restore".
        expected: &'static str,
    },
    /// A task record cannot be encoded or decoded.
    #[error("task {id}: record: {source}")]
    Record {
        /// Task id.
        id: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A worker of the task panicked or was aborted.
    #[error("a worker of the task failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    /// The host id file cannot be read or written.
    #[error("<state dir>/host-id: {source}")]
    HostId {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The backup may no longer commit.
    #[error("backup task {task} may not commit: {why}; start a new backup")]
    PastDeadline {
        /// Task id.
        task: String,
        /// Why.
        why: String,
    },
    /// Garbage collection did not run.
    #[error(transparent)]
    Gc(crate::repo::gc::GcError),
    /// An internal sequence broke (a defect of blockd, reported, not hidden).
    #[error("internal error: {what}")]
    Defect {
        /// What broke.
        what: String,
    },
    /// Stopped or shutting down.
    #[error("cancelled")]
    Cancelled,
}

impl CloudError {
    /// Reading or writing `volume` failed.
    pub(crate) fn volume_io(op: &'static str, volume: &str, source: std::io::Error) -> Self {
        Self::VolumeIo {
            op,
            volume: volume.to_string(),
            source,
        }
    }

    /// True when the location failed in a way that may go away by itself
    /// (it did not answer, or answered with a failure of its own) after
    /// every request-level retry, or its repository is not there (see
    /// below). What the location answered about an object of a repository
    /// that is there (missing, corrupt, refused) is final.
    pub fn outage(&self) -> bool {
        match self {
            // A repository that is gone may be back: a local directory
            // unmounted, or not mounted yet when blockd resumed its tasks
            // at boot. Nothing is written meanwhile (`repo::direct`), and
            // a repository made anew in its place fails the task's
            // session check before it commits.
            Self::Repo(RepoError::Gone { .. })
            | Self::Location(LocationError::DirectoryGone { .. }) => true,
            Self::Repo(r) | Self::Damaged { source: r, .. } => r.transient(),
            _ => false,
        }
    }

    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Location(l) => l.outcome(),
            Self::ListingAll { source } | Self::Outage { source, .. } => source.outcome(),
            Self::Repo(r) => r.outcome(),
            Self::Freeze(f) => f.outcome(),
            Self::Volume(v) => v.outcome(),
            Self::VolumesAndLabels
            | Self::SnapshotInSeveral { .. }
            | Self::NoVolumes
            | Self::ExecTimeout { .. }
            | Self::BadSubset { .. }
            | Self::BadExpire { .. }
            | Self::BadSchedule { .. }
            | Self::BadSnapshotId { .. }
            | Self::BadSnapshotRef { .. }
            | Self::GroupNotSnapshot { .. }
            | Self::NameOnTwoHosts { .. } => Outcome::Invalid,
            Self::NoLabelMatch
            | Self::VolumeNotFound { .. }
            | Self::VolumeGone { .. }
            | Self::NoSnapshotOf { .. }
            | Self::NoSnapshotAnywhere { .. }
            | Self::SnapshotNotFound { .. }
            | Self::TaskNotFound { .. }
            | Self::NoTaskOrGroup { .. }
            | Self::ScheduleNotFound { .. } => Outcome::NotFound,
            Self::Busy(_)
            | Self::Restoring { .. }
            | Self::VolumeExists { .. }
            | Self::InUse { .. }
            | Self::TaskStarting { .. }
            | Self::TaskEnded { .. }
            | Self::ScheduleClash { .. } => Outcome::Conflict,
            Self::State(_)
            | Self::Damaged { .. }
            | Self::SnapshotVanished { .. }
            | Self::PresentMapMissing { .. }
            | Self::VolumeIo { .. }
            | Self::WrongPlan { .. }
            | Self::Record { .. }
            | Self::Worker(_)
            | Self::Defect { .. }
            | Self::HostId { .. }
            | Self::PastDeadline { .. }
            | Self::Cancelled => Outcome::Failed,
            Self::Gc(g) => match g {
                crate::repo::gc::GcError::Repo(r) => r.outcome(),
                crate::repo::gc::GcError::Running { .. } => Outcome::Conflict,
                crate::repo::gc::GcError::Damaged { .. } => Outcome::Failed,
            },
        }
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
    /// Garbage-collection grace period.
    gc_grace: std::time::Duration,
    /// Backup deadline.
    backup_deadline: std::time::Duration,
    /// How long a task waits out a location that keeps failing.
    outage_wait: std::time::Duration,
    /// Default unused-space limit of garbage collection.
    gc_max_unused: blockd_api::MaxUnused,
    /// This host's id (`<state dir>/host-id`).
    host: String,
    /// Schedules with a run in progress, each with what its run waits
    /// for while another task holds its volumes.
    sched_running: Mutex<std::collections::HashMap<String, Option<String>>>,
    /// When each schedule last started a run in this process: a run is
    /// recorded in the state database only with its backups (or at its
    /// end), so one that could not be recorded (the database refusing
    /// writes) is not started again before its next slot.
    sched_attempted: Mutex<std::collections::HashMap<String, String>>,
    /// Backup sessions opened by requests that have not saved their
    /// tasks yet (their hooks may be running): collection leaves them.
    starting_sessions: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Wakes the marking of running group backups in the bucket (a group
    /// has started).
    group_marks: Arc<tokio::sync::Notify>,
    /// Starting tasks a `cloudsnap stop` waits for: each is stopped as it
    /// is registered, before it has done anything.
    stop_on_start: Mutex<std::collections::HashSet<String>>,
    /// Locations this host is collecting.
    gc_running: Mutex<std::collections::HashSet<String>>,
    /// Held by retention for each snapshot it deletes, with its check that
    /// the schedule is still there, and by `schedules delete`: once that
    /// returns, the schedule's run deletes nothing more.
    retention: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud").finish_non_exhaustive()
    }
}

/// This host's id: made at first start and kept in `<state dir>/host-id`,
/// it names the host in the bucket (backup sessions, collector runs).
fn host_id(state_dir: &std::path::Path) -> Result<String, CloudError> {
    let path = state_dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CloudError::HostId { source: e }),
    }
    let mut tag = [0u8; 8];
    crate::repo::crypto::fill_random(&mut tag);
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let id = format!("{name}-{}", hex::encode(tag));
    crate::durable::write_atomic(&path, format!("{id}\n").as_bytes())
        .map_err(|e| CloudError::HostId { source: e })?;
    Ok(id)
}

/// The current time, RFC 3339 UTC to the second.
pub(crate) fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
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
        let host = host_id(state_dir)?;
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
            gc_grace: settings.gc_grace,
            backup_deadline: settings.backup_deadline,
            outage_wait: settings.outage_wait,
            gc_max_unused: settings.gc_max_unused,
            host,
            sched_running: Mutex::new(std::collections::HashMap::new()),
            sched_attempted: Mutex::new(std::collections::HashMap::new()),
            starting_sessions: Arc::default(),
            group_marks: Arc::default(),
            stop_on_start: Mutex::default(),
            gc_running: Mutex::new(std::collections::HashSet::new()),
            retention: tokio::sync::Mutex::new(()),
        });
        for (id, rec) in me.db.tasks(true, u32::MAX)? {
            match serde_json::from_str::<Record>(&rec) {
                Ok(r) => me.resume(r),
                Err(e) => tracing::error!(
                    task = %id,
                    error = %e,
                    "task record unreadable: not resumed (kept as it is; `blockctl cloudsnap status` lists it as failed)"
                ),
            }
        }
        me.settle_withheld();
        if let Some(every) = settings.gc_every {
            me.collect_every(every);
        }
        me.run_scheduler();
        me.write_groups_later();
        me.mark_running_groups();
        Ok(me)
    }
}

/// Locks a set shared with a closure, a poisoned lock included.
pub(crate) fn lock_set(
    s: &Mutex<std::collections::HashSet<String>>,
) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
