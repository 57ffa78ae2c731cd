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
pub mod hydrate;
pub mod locations;
pub mod restore;
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
use crate::volume::store::Store;
use locations::Locations;
use task::{Record, Running};

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
    /// The freeze of a backup was refused or failed.
    #[error(transparent)]
    Freeze(#[from] FreezeError),
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

    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Invalid(_) => Outcome::Invalid,
            Self::NotFound(_) => Outcome::NotFound,
            Self::Conflict(_) | Self::Busy(_) => Outcome::Conflict,
            Self::Repo(r) => r.outcome(),
            Self::Freeze(f) => f.outcome(),
            Self::State(_) | Self::Internal(_) | Self::Cancelled => Outcome::Failed,
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
}
