//! Types of the cloud-snapshot API: locations (pxctl's "credentials"),
//! backup and restore tasks, and the snapshots kept in object storage.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Hook;

/// Name of the location that exists from first start: a directory under the
/// state dir (`<state dir>/objects`), unencrypted.
pub const LOCAL_LOCATION: &str = "local";

/// Object-store providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// A local directory.
    Local,
    /// Amazon S3 or an S3-compatible server.
    S3,
    /// Azure Blob Storage.
    Azure,
    /// Google Cloud Storage.
    Google,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::S3 => "s3",
            Self::Azure => "azure",
            Self::Google => "google",
        })
    }
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(Self::Local),
            "s3" => Ok(Self::S3),
            "azure" => Ok(Self::Azure),
            "google" | "gcs" | "gcp" => Ok(Self::Google),
            _ => Err(format!(
                "unknown provider {s:?}: use local, s3, azure or google"
            )),
        }
    }
}

/// Body of `POST /v1/locations` (`blockctl credentials create`); the flag
/// names follow `pxctl credentials create`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateLocation {
    /// Location name (the `--cred-id` of later commands).
    pub name: String,
    /// Provider.
    pub provider: Option<Provider>,
    /// Bucket (S3, Google) or container (Azure).
    #[serde(default)]
    pub bucket: Option<String>,
    /// Directory (local provider).
    #[serde(default)]
    pub path: Option<String>,
    /// Key prefix inside the bucket.
    #[serde(default)]
    pub prefix: Option<String>,
    /// S3 endpoint, `host:port` or a URL.
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[serde(default)]
    pub s3_region: Option<String>,
    /// S3 access key id.
    #[serde(default)]
    pub s3_access_key: Option<String>,
    /// S3 secret key (secret).
    #[serde(default)]
    pub s3_secret_key: Option<String>,
    /// Plain HTTP to the S3 endpoint.
    #[serde(default)]
    pub s3_disable_ssl: bool,
    /// Virtual-hosted-style requests instead of path style.
    #[serde(default)]
    pub disable_path_style: bool,
    /// S3 storage class for new objects, e.g. STANDARD_IA.
    #[serde(default)]
    pub s3_storage_class: Option<String>,
    /// Azure storage account.
    #[serde(default)]
    pub azure_account_name: Option<String>,
    /// Azure account key (secret).
    #[serde(default)]
    pub azure_account_key: Option<String>,
    /// Azure Blob endpoint URL (emulators, sovereign clouds).
    #[serde(default)]
    pub azure_endpoint: Option<String>,
    /// Google project id.
    #[serde(default)]
    pub google_project_id: Option<String>,
    /// Google service-account JSON key file (read at create; its contents are secret).
    #[serde(default)]
    pub google_json_key_file: Option<String>,
    /// Passphrase for encrypting everything stored (secret).
    #[serde(default)]
    pub encryption_passphrase: Option<String>,
}

/// A location as listed: non-secret fields only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Name.
    pub name: String,
    /// Provider.
    pub provider: Provider,
    /// Bucket or container.
    pub bucket: Option<String>,
    /// Directory (local).
    pub path: Option<String>,
    /// Key prefix.
    pub prefix: Option<String>,
    /// Endpoint (S3, Azure).
    pub endpoint: Option<String>,
    /// Region (S3).
    pub region: Option<String>,
    /// Access key id (S3) or account name (Azure) or project (Google).
    pub account: Option<String>,
    /// TLS to the endpoint.
    pub ssl: bool,
    /// Path-style S3 requests.
    pub path_style: bool,
    /// Storage class (S3).
    pub storage_class: Option<String>,
    /// Data is encrypted with a passphrase.
    pub encryption: bool,
    /// Creation time, RFC 3339.
    pub created: String,
}

/// Body of `POST /v1/cloudsnaps/backup`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Volume to back up.
    pub volume: String,
    /// Read the whole volume even when the change set is known.
    #[serde(default)]
    pub full: bool,
    /// Location; may be left out when only one exists.
    #[serde(default)]
    pub location: Option<String>,
    /// Labels recorded in the snapshot's manifest.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Command run before the freeze.
    #[serde(default)]
    pub pre_exec: Option<String>,
    /// Command run after the freeze.
    #[serde(default)]
    pub post_exec: Option<String>,
    /// Timeout for each hook, in seconds (default 30).
    #[serde(default)]
    pub exec_timeout_secs: Option<f64>,
}

/// Body of `POST /v1/cloudsnaps/backup-group`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupGroupRequest {
    /// Member volumes.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Or: every volume carrying all these labels.
    #[serde(default)]
    pub select: BTreeMap<String, String>,
    /// Read whole volumes.
    #[serde(default)]
    pub full: bool,
    /// Location.
    #[serde(default)]
    pub location: Option<String>,
    /// Labels recorded in each manifest.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Command run before the freeze.
    #[serde(default)]
    pub pre_exec: Option<String>,
    /// Command run after the freeze.
    #[serde(default)]
    pub post_exec: Option<String>,
    /// Timeout for each hook, in seconds (default 30).
    #[serde(default)]
    pub exec_timeout_secs: Option<f64>,
}

/// Body of `POST /v1/cloudsnaps/restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Cloud snapshot id (`VOLUME/SNAPSHOT`), or a volume name for its latest.
    pub snap: String,
    /// Name of the new volume.
    pub volume: String,
    /// Location; may be left out when only one exists.
    #[serde(default)]
    pub location: Option<String>,
    /// Serve the new volume at once and fetch its data as it is touched
    /// (and in the background) instead of before it is exported.
    #[serde(default)]
    pub lazy: bool,
}

/// What a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Volume to object storage.
    Backup,
    /// Object storage to a new volume.
    Restore,
}

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Running (or waiting to resume after a restart).
    Active,
    /// Finished successfully.
    Done,
    /// Gave up; see `error`.
    Failed,
    /// Stopped by `cloudsnap stop`.
    Stopped,
}

impl TaskState {
    /// Finished, one way or another.
    pub fn is_final(self) -> bool {
        self != Self::Active
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "Active",
            Self::Done => "Done",
            Self::Failed => "Failed",
            Self::Stopped => "Stopped",
        })
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Active" => Ok(Self::Active),
            "Done" => Ok(Self::Done),
            "Failed" => Ok(Self::Failed),
            "Stopped" => Ok(Self::Stopped),
            _ => Err(format!("unknown task state {s:?}")),
        }
    }
}

/// A backup or restore task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Task id.
    pub id: String,
    /// Backup or restore.
    pub kind: TaskKind,
    /// State.
    pub state: TaskState,
    /// Volume backed up or restored into.
    pub volume: String,
    /// Cloud snapshot id, `VOLUME/SNAPSHOT`.
    pub snapshot: String,
    /// Location.
    pub location: String,
    /// Group id of a group backup.
    pub group: Option<String>,
    /// Full read of the volume (backup).
    pub full: bool,
    /// A lazy restore: the volume is served while it fills.
    #[serde(default)]
    pub lazy: bool,
    /// Start time, RFC 3339.
    pub created: String,
    /// End time, RFC 3339.
    pub finished: Option<String>,
    /// Bytes to process: to read (backup) or to restore.
    pub bytes_total: u64,
    /// Bytes processed so far.
    pub bytes_done: u64,
    /// Bytes uploaded (backup) or fetched (restore), after compression.
    pub bytes_transferred: u64,
    /// Bytes found already stored and referenced instead (backup).
    pub bytes_reused: u64,
    /// Seconds since start (until the end when finished).
    pub elapsed_secs: f64,
    /// Estimated seconds left.
    pub eta_secs: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Answer of a backup request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    /// Group id (group backups).
    pub group: Option<String>,
    /// One task per volume.
    pub tasks: Vec<Task>,
}

/// A snapshot in object storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudSnap {
    /// `VOLUME/SNAPSHOT`.
    pub id: String,
    /// Source volume.
    pub volume: String,
    /// Location it was read from.
    pub location: String,
    /// Freeze time, RFC 3339.
    pub created: String,
    /// Volume size.
    pub size: u64,
    /// Extent size.
    pub extent_size: u64,
    /// The whole volume was read.
    pub full: bool,
    /// Parent snapshot (incrementals).
    pub parent: Option<String>,
    /// Group id.
    pub group: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Bytes read from the volume.
    pub bytes_read: u64,
    /// Bytes of new chunks stored (before compression).
    pub bytes_new: u64,
    /// Bytes referenced from chunks already stored.
    pub bytes_reused: u64,
    /// Bytes uploaded (compressed, sealed, with metadata).
    pub bytes_uploaded: u64,
    /// `Done`, or why the object under this name cannot be used (a damaged
    /// manifest, or an object blockd did not write): such entries are
    /// listed so they can be inspected or deleted, never restored.
    #[serde(default = "done")]
    pub status: String,
}

fn done() -> String {
    "Done".into()
}

/// Answer of `GET /v1/cloudsnaps/catalog`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// The snapshot.
    pub snap: CloudSnap,
    /// Largest chunk.
    pub chunk_size: u64,
    /// Volume bytes covered by one index block.
    pub index_span: u64,
    /// Index blocks (non-empty ranges).
    pub index_blocks: u64,
    /// Bytes holding data (not holes).
    pub data_bytes: u64,
    /// Microseconds I/O was held for the freeze.
    pub pause_us: u64,
    /// Pre-exec outcome.
    pub pre_exec: Option<Hook>,
    /// Post-exec outcome.
    pub post_exec: Option<Hook>,
    /// Result of `--verify`: every chunk fetched and checked.
    pub verified: Option<Verified>,
}

/// What a verification checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// Chunks checked.
    pub chunks: u64,
    /// Plain bytes checked.
    pub bytes: u64,
}
