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
    pub s3_secret_key: Option<crate::Secret>,
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
    pub azure_account_key: Option<crate::Secret>,
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
    pub encryption_passphrase: Option<crate::Secret>,
    /// Keys that may only read (a host that restores and browses only):
    /// nothing is written with them, the repository must exist already,
    /// and backups, deletes and collections through them are refused.
    #[serde(default)]
    pub read_only: bool,
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
    /// Whether the store refuses a second create of one object (probed by
    /// `credentials create` and `validate`; unknown until then).
    #[serde(default)]
    pub conditional_writes: Option<bool>,
    /// Created with `--read-only`: restores, mounts and listings only.
    #[serde(default)]
    pub read_only: bool,
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
    /// Delete the snapshot at this time: RFC 3339, a date (midnight UTC)
    /// or a duration from now (`7d`, `36h`).
    #[serde(default)]
    pub expire: Option<String>,
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
    /// As in [`BackupRequest`].
    #[serde(default)]
    pub expire: Option<String>,
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
    /// A backup that read the whole volume (not an incremental), or a
    /// restore that fills the volume before it is served (not lazy).
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
    /// A backup's post-exec hook, when one ran: the backup goes on whatever
    /// it did (I/O had already resumed), but a failure is the caller's to
    /// report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_exec: Option<crate::Hook>,
}

/// Where the group backup a snapshot belongs to stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupState {
    /// Every member was committed (the group object is written): the
    /// members are one consistent point of all the group's volumes.
    Complete,
    /// A member is still being backed up by this daemon.
    Running,
    /// No group object and no member running here: a member failed or
    /// was stopped (or the group backup still runs on another host). The
    /// snapshots that are there restore one by one; they are not the
    /// whole group.
    Incomplete,
    /// Every member was committed, and some have been deleted since (by
    /// hand, or by retention, which skips a member a restore or a catalog
    /// mount is reading): the members left restore one by one; they are
    /// not the whole group.
    Partial,
}

impl GroupState {
    /// The word `cloudsnap list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Running => "running",
            Self::Incomplete => "incomplete",
            Self::Partial => "partial",
        }
    }
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
    /// Whether the group backup it belongs to completed (listings and
    /// catalogs only; absent outside a group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_state: Option<GroupState>,
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
    /// The host that wrote it.
    #[serde(default)]
    pub host: Option<String>,
    /// The schedule that made it.
    #[serde(default)]
    pub schedule: Option<String>,
    /// When it is deleted, if it expires.
    #[serde(default)]
    pub expires: Option<String>,
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
    /// Bytes of the volume whose chunks were checked (the snapshot's data,
    /// holes excluded).
    pub bytes: u64,
    /// Plain bytes of the chunks checked: more than `bytes` where a chunk
    /// is only partly used (an incremental overwrote part of it).
    #[serde(default)]
    pub chunk_bytes: u64,
}

/// Which packs `repo check --read-data` reads: `n/m` (the n-th of m
/// slices, 1-based) or a percentage. Chosen by pack id, so repeated runs
/// with n = 1..m read every pack exactly once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Subset {
    /// Slice `n` of `m` (1 ≤ n ≤ m).
    Slice {
        /// Which slice, from 1.
        n: u64,
        /// How many slices.
        m: u64,
    },
    /// This percentage of the packs (0 < p ≤ 100).
    Percent(f64),
}

impl Subset {
    /// Whether a pack whose id starts with the 8 bytes `key` (read as a
    /// big-endian number) is in the subset.
    pub fn contains(&self, key: u64) -> bool {
        match *self {
            Self::Slice { n, m } => key % m == n - 1,
            Self::Percent(p) => {
                // key / 2^64 < p / 100, without floating-point rounding at
                // 100%.
                p >= 100.0 || (key as f64) < p / 100.0 * 18_446_744_073_709_551_616.0
            }
        }
    }
}

impl std::str::FromStr for Subset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid subset {s:?}: give n/m (e.g. 1/5, the first of five slices) or a percentage (e.g. 10%)")
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad());
            }
            return Ok(Self::Percent(p));
        }
        let (n, m) = s.split_once('/').ok_or_else(bad)?;
        let n: u64 = n.trim().parse().map_err(|_| bad())?;
        let m: u64 = m.trim().parse().map_err(|_| bad())?;
        if n == 0 || m == 0 || n > m {
            return Err(bad());
        }
        Ok(Self::Slice { n, m })
    }
}

impl fmt::Display for Subset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Slice { n, m } => write!(f, "{n}/{m}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Body of `POST /v1/repo/check`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// Location [default: the only one].
    #[serde(default)]
    pub location: Option<String>,
    /// Also read packs and check every record's seal and hash.
    #[serde(default)]
    pub read_data: bool,
    /// With `read_data`: only these packs (`n/m` or `x%`).
    #[serde(default)]
    pub subset: Option<String>,
}

/// A damaged object found by a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The object's key in the repository.
    pub object: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A snapshot that cannot be fully restored, and the objects why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedSnapshot {
    /// `VOLUME/SNAPSHOT`.
    pub snapshot: String,
    /// Damaged objects it needs.
    pub objects: Vec<String>,
}

/// What `--read-data` read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRead {
    /// The subset asked for, if any.
    pub subset: Option<String>,
    /// Packs read whole.
    pub packs: u64,
    /// Records opened and checked.
    pub records: u64,
    /// Bytes fetched.
    pub bytes: u64,
}

/// Answer of `POST /v1/repo/check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Location checked.
    pub location: String,
    /// Snapshots (manifests) found.
    pub snapshots: u64,
    /// Distinct index blocks the snapshots reference.
    pub index_blocks: u64,
    /// Packs the snapshots reference.
    pub packs: u64,
    /// Records (chunks) the snapshots reference.
    pub records: u64,
    /// Packs no snapshot references (reclaimed by `repo gc`). While a
    /// manifest, index map or index block is damaged, what it references
    /// is unknown and may be counted here (and `repo gc` refuses to run).
    pub unreferenced_packs: u64,
    /// Index blocks no snapshot references (as `unreferenced_packs`).
    pub unreferenced_index_blocks: u64,
    /// With `--read-data`: what was read.
    pub data: Option<DataRead>,
    /// Every damaged object.
    pub problems: Vec<Problem>,
    /// Every snapshot that needs a damaged object.
    pub damaged: Vec<DamagedSnapshot>,
    /// Damaged objects recorded in the repository after this check, which
    /// new backups do not reuse; `None` when the location's credentials
    /// may only read (nothing recorded).
    #[serde(default)]
    pub recorded: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::{MaxUnused, Subset};

    #[test]
    fn max_unused_parses_percentages_and_unlimited() {
        assert_eq!("5%".parse::<MaxUnused>(), Ok(MaxUnused::Percent(500)));
        assert_eq!("0.5%".parse::<MaxUnused>(), Ok(MaxUnused::Percent(50)));
        assert_eq!("unlimited".parse::<MaxUnused>(), Ok(MaxUnused::Unlimited));
        for bad in ["150%", "-1%", "5", "abc", "%"] {
            assert!(bad.parse::<MaxUnused>().is_err(), "{bad}");
        }
        assert_eq!(MaxUnused::Percent(50).to_string(), "0.50%");
        assert_eq!(MaxUnused::default().to_string(), "5%");
        // 5%: 5 dead bytes per 95 live.
        assert_eq!(MaxUnused::Percent(500).limit(950), Some(50));
        assert_eq!(MaxUnused::Percent(10_000).limit(1), Some(u64::MAX));
        assert_eq!(MaxUnused::Unlimited.limit(1), None);
        let json = serde_json::to_string(&MaxUnused::Percent(500)).unwrap();
        assert_eq!(json, "\"5%\"");
        assert!(serde_json::from_str::<MaxUnused>("\"200%\"").is_err());
    }

    #[test]
    fn subsets_parse_and_partition() {
        assert_eq!("2/5".parse(), Ok(Subset::Slice { n: 2, m: 5 }));
        assert_eq!("10%".parse(), Ok(Subset::Percent(10.0)));
        for bad in ["0/5", "6/5", "1/0", "x", "0%", "101%", "1/", "/2", "-1%"] {
            assert!(bad.parse::<Subset>().is_err(), "{bad}");
        }
        // Slices 1..m take every key exactly once.
        let keys: Vec<u64> = (0..1000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        for k in &keys {
            let hits = (1..=7)
                .filter(|n| Subset::Slice { n: *n, m: 7 }.contains(*k))
                .count();
            assert_eq!(hits, 1);
        }
        // A percentage takes about that share; 100% takes all.
        let ten = keys
            .iter()
            .filter(|k| Subset::Percent(10.0).contains(**k))
            .count();
        assert!((50..=150).contains(&ten), "{ten}");
        assert!(keys.iter().all(|k| Subset::Percent(100.0).contains(*k)));
        assert!(Subset::Percent(100.0).contains(u64::MAX));
    }
}

/// Body of `POST /v1/repo/gc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Location [default: the only one].
    #[serde(default)]
    pub location: Option<String>,
    /// Report what would be marked and deleted; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Grace period of the marks this run writes, seconds [default: the
    /// daemon's `--gc-grace`].
    #[serde(default)]
    pub grace_secs: Option<u64>,
    /// Unused space tolerated inside packs still in use before they are
    /// repacked [default: the daemon's `--gc-max-unused`].
    #[serde(default)]
    pub max_unused: Option<MaxUnused>,
}

/// How much unused space `repo gc` tolerates inside packs that are still
/// in use (records of deleted snapshots next to live ones) before it
/// copies their live records into new packs: restic's `--max-unused`.
/// A percentage of the live bytes' share, `x%` with `x / (100 - x)` of
/// the live bytes allowed dead (`5%`: at most 5% of the bytes of packs in
/// use are dead), or `unlimited`: never copy data (no repacking, and no
/// merging of small packs either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MaxUnused {
    /// Never repack.
    Unlimited,
    /// Hundredths of a percent, 0 ..= 10,000.
    Percent(u16),
}

impl Default for MaxUnused {
    fn default() -> Self {
        Self::Percent(500)
    }
}

impl MaxUnused {
    /// The dead bytes tolerated beside `used` live bytes (`None`:
    /// unlimited). At 100% nothing is repacked for being mostly dead, but
    /// small packs are still merged.
    pub fn limit(self, used: u64) -> Option<u64> {
        match self {
            Self::Unlimited => None,
            Self::Percent(p) if p >= 10_000 => Some(u64::MAX),
            Self::Percent(p) => {
                let p = u128::from(p);
                let l = u128::from(used) * p / (10_000 - p);
                Some(u64::try_from(l).unwrap_or(u64::MAX))
            }
        }
    }
}

impl std::str::FromStr for MaxUnused {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid unused-space limit {s:?}: give a percentage from 0% to 100% (e.g. 5%), or `unlimited` to never repack")
        };
        if s.trim() == "unlimited" {
            return Ok(Self::Unlimited);
        }
        let p: f64 = s
            .trim()
            .strip_suffix('%')
            .ok_or_else(bad)?
            .trim()
            .parse()
            .map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&p) {
            return Err(bad());
        }
        // In range by the check above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let hundredths = (p * 100.0).round() as u16;
        Ok(Self::Percent(hundredths))
    }
}

impl TryFrom<String> for MaxUnused {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MaxUnused> for String {
    fn from(m: MaxUnused) -> Self {
        m.to_string()
    }
}

impl fmt::Display for MaxUnused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unlimited => f.write_str("unlimited"),
            Self::Percent(p) if p % 100 == 0 => write!(f, "{}%", p / 100),
            Self::Percent(p) => write!(f, "{}.{:02}%", p / 100, p % 100),
        }
    }
}

/// Answer of `POST /v1/repo/gc`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// Location collected.
    pub location: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Grace period of the mark written by this run, seconds.
    pub grace_secs: u64,
    /// Packs condemned by this run (deleted by a run at least the grace
    /// period later, if still unreferenced).
    pub marked_packs: u64,
    /// Index blocks condemned by this run.
    pub marked_index_blocks: u64,
    /// Bytes condemned by this run.
    pub marked_bytes: u64,
    /// Packs deleted.
    pub deleted_packs: u64,
    /// Index blocks deleted.
    pub deleted_index_blocks: u64,
    /// Bytes deleted.
    pub deleted_bytes: u64,
    /// Condemned objects found in use again (or rewritten), kept.
    pub kept: u64,
    /// Earlier marks swept.
    pub swept_marks: u64,
    /// Earlier marks still in their grace period.
    pub pending_marks: u64,
    /// Earlier marks past their grace period but waiting for backups that
    /// started before them, or for restores running on any host.
    pub held_marks: u64,
    /// Those backups and restores (task ids).
    pub holding: Vec<String>,
    /// The unused-space limit this run applied.
    #[serde(default)]
    pub max_unused: String,
    /// Bytes of records no snapshot uses, inside packs still in use
    /// (before this run repacked any).
    #[serde(default)]
    pub unused_bytes: u64,
    /// Bytes of records in use, over every pack in use.
    #[serde(default)]
    pub used_bytes: u64,
    /// Packs whose live records this run copied into new packs (mostly
    /// dead ones, and small ones merged); condemned by this run's mark.
    #[serde(default)]
    pub repacked_packs: u64,
    /// Live bytes copied.
    #[serde(default)]
    pub repacked_bytes: u64,
    /// New packs written by the repacking.
    #[serde(default)]
    pub written_packs: u64,
    /// Relocation objects condemned by this run.
    #[serde(default)]
    pub marked_relocations: u64,
    /// Relocation objects deleted.
    #[serde(default)]
    pub deleted_relocations: u64,
    /// Packs left as they are, with why (a damaged record is never copied).
    #[serde(default)]
    pub skipped: Vec<String>,
    /// Unfinished writes found in a local directory location (files a
    /// writer killed mid-write left beside its objects), deleted once
    /// older than the grace period; their bytes count in `deleted_bytes`.
    #[serde(default)]
    pub deleted_partial: u64,
    /// Damaged packs the repacking found (missing, or a record that does
    /// not open), recorded in the repository as `repo check` records them:
    /// new backups do not reuse them.
    #[serde(default)]
    pub problems: Vec<Problem>,
    /// The snapshots that need them.
    #[serde(default)]
    pub damaged: Vec<DamagedSnapshot>,
}

/// Body of `POST /v1/schedules`: pxctl's `cloudsnap schedules create`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    /// Volumes (several: one group backup, one freeze point).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Or: every volume carrying all these labels at run time.
    #[serde(default)]
    pub select: BTreeMap<String, String>,
    /// `--periodic`: minutes, or a duration (`30s`, `2h`).
    #[serde(default)]
    pub periodic: Option<String>,
    /// `--daily hh:mm` (UTC).
    #[serde(default)]
    pub daily: Vec<String>,
    /// `--weekly weekday@hh:mm` (UTC).
    #[serde(default)]
    pub weekly: Vec<String>,
    /// `--monthly day@hh:mm` (UTC).
    #[serde(default)]
    pub monthly: Vec<String>,
    /// Newest snapshots kept per volume [default 7].
    #[serde(default)]
    pub max: Option<u32>,
    /// Also keep the newest of each of the last N days with a snapshot.
    #[serde(default)]
    pub keep_daily: u32,
    /// ... of each of the last N ISO weeks.
    #[serde(default)]
    pub keep_weekly: u32,
    /// ... of each of the last N months.
    #[serde(default)]
    pub keep_monthly: u32,
    /// Every run reads whole volumes.
    #[serde(default)]
    pub full: bool,
    /// Location [default: the only one].
    #[serde(default)]
    pub location: Option<String>,
    /// Command run before each freeze.
    #[serde(default)]
    pub pre_exec: Option<String>,
    /// Command run after each freeze.
    #[serde(default)]
    pub post_exec: Option<String>,
}

/// A schedule, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Id (`schedules delete --uuid`).
    pub id: String,
    /// What was asked.
    pub spec: CreateSchedule,
    /// The location it backs up to.
    pub location: String,
    /// Its rules, as text (`daily @21:00`).
    pub rules: Vec<String>,
    /// Newest snapshots kept per volume.
    pub max: u32,
    /// Created (RFC 3339).
    pub created: String,
    /// Start of the last run.
    pub last_run: Option<String>,
    /// Next run.
    pub next_run: Option<String>,
    /// A run is going on.
    pub running: bool,
    /// The run that is due waits for volumes another task holds: which,
    /// held by what, and since when (it backs them up once they are free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Why the last run failed (retried at the next slot).
    pub last_error: Option<String>,
    /// Tasks of the last run.
    pub last_tasks: Vec<String>,
    /// Snapshots deleted by its retention, in all.
    pub deleted: u64,
}
