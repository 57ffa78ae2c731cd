//! Types of the blockd control API, shared by the daemon and `blockctl`.
//!
//! This crate holds no engine code: `blockctl` links it, never the daemon.
//! Everything here is plain data plus the validation rules both sides apply
//! (volume names become NBD export names and file names, so both sides must
//! agree on what is allowed).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The version prefix of every API path.
pub const API_PREFIX: &str = "/v1";

/// Default extent size: the granularity of change tracking and of the
/// block size advertised to NBD clients.
pub const DEFAULT_EXTENT_SIZE: u64 = 4096;

/// A volume as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Name, also the NBD export name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Extent size in bytes (power of two, 512 B ..= 1 MiB).
    pub extent_size: u64,
    /// Free-form labels used to select volumes.
    pub labels: BTreeMap<String, String>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Bytes the data file occupies on disk (sparse files use less than `size`).
    pub allocated: u64,
    /// NBD connections currently open to this volume.
    pub connections: u64,
    /// Bytes in extents changed since the last backup (the whole volume
    /// when change tracking was lost).
    #[serde(default)]
    pub dirty_bytes: u64,
    /// `true` while change tracking is trustworthy; `false` after an
    /// unclean shutdown until the next full backup.
    #[serde(default)]
    pub tracking_known: bool,
    /// `true` when the change map on disk is settled: the volume has been
    /// idle for a few seconds, its data is synced, and a crash now keeps
    /// its tracking. `false` while it is being written.
    #[serde(default)]
    pub tracking_settled: bool,
    /// Bytes on disk of the copy-on-write area a deleted snapshot left
    /// for the volume's next snapshot (freed by `volume delete`).
    #[serde(default)]
    pub kept_cow_bytes: u64,
    /// The kernel device this volume is attached as (`/dev/nbdN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<String>,
    /// Whether the kernel reports that device connected (NBD_CMD_STATUS;
    /// `volume inspect` only). `false` while it waits for blockd to come
    /// back with new sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_connected: Option<bool>,
    /// Why the volume is not exported over NBD, when it is not: a restore
    /// is filling it, or one that could not go on left it incomplete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unexported: Option<String>,
    /// While a lazy restore fills the volume (served meanwhile): the bytes
    /// of the snapshot in place so far; reads elsewhere fetch first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_present_bytes: Option<u64>,
}

/// Body of `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Name of the new volume.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Extent size in bytes; default 4 KiB.
    #[serde(default)]
    pub extent_size: Option<u64>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Body of `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    /// New size in bytes; must not be smaller than the current size.
    pub size: u64,
}

/// Body of `POST /v1/volumes/{name}/labels`: labels to set (added, or
/// given a new value) and keys to remove, in one step.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateLabels {
    /// Labels to add or change.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Keys to remove (a key that is not there is no error).
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Body of `POST /v1/volumes/{name}/attach`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// `/dev/nbdN` to use [default: the first free one].
    #[serde(default)]
    pub device: Option<String>,
    /// Socket connections between the kernel and blockd [default: 1].
    #[serde(default)]
    pub connections: Option<u32>,
    /// Seconds before the kernel times a request out [default: 30].
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// A volume attached as a kernel NBD device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Volume.
    pub volume: String,
    /// `/dev/nbdN`.
    pub device: String,
    /// N.
    pub index: u32,
    /// Socket connections.
    pub connections: u32,
    /// Request timeout, seconds.
    pub timeout: u64,
}

/// Body of `POST /v1/snapshots`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Member volumes; several make one group with one freeze point.
    pub volumes: Vec<String>,
    /// Snapshot name; generated (`20261121T101500Z-3f4f0a67`) when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Command run before the gates close (e.g. `fsfreeze -f /mnt/data`).
    #[serde(default)]
    pub pre_exec: Option<String>,
    /// Command run after the gates reopen (e.g. `fsfreeze -u /mnt/data`).
    #[serde(default)]
    pub post_exec: Option<String>,
    /// Timeout for each hook, in seconds (default 30).
    #[serde(default)]
    pub exec_timeout_secs: Option<f64>,
}

/// Timeout of an exec hook when a request gives none, in seconds.
pub const DEFAULT_EXEC_TIMEOUT_SECS: f64 = 30.0;
/// Longest exec hook timeout accepted, in seconds (a day).
pub const MAX_EXEC_TIMEOUT_SECS: f64 = 86_400.0;
/// Shortest exec hook timeout: a shorter one kills any hook before it
/// has started, so the snapshot would fail or not by chance.
pub const MIN_EXEC_TIMEOUT_SECS: f64 = 1.0;

/// The exec hook timeout a request asks for (the default when it gives
/// none).
///
/// # Errors
/// A value outside 0 ..= [`MAX_EXEC_TIMEOUT_SECS`], with what is allowed.
pub fn exec_timeout(secs: Option<f64>) -> Result<std::time::Duration, String> {
    let secs = secs.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS);
    if !(MIN_EXEC_TIMEOUT_SECS..=MAX_EXEC_TIMEOUT_SECS).contains(&secs) {
        return Err(format!(
            "exec timeout must be between {MIN_EXEC_TIMEOUT_SECS} and {MAX_EXEC_TIMEOUT_SECS} seconds"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// What an exec hook did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// Command line.
    pub command: String,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// Combined output (truncated).
    pub output: String,
}

impl Hook {
    /// True when the hook exited 0 in time.
    pub fn ok(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }

    /// How it ended, for a message: `exited with status 3`, `timed out`.
    pub fn ending(&self) -> String {
        if self.timed_out {
            "timed out".into()
        } else {
            match self.exit_code {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".into(),
            }
        }
    }

    /// One line for error messages: the command, how it ended, its output.
    pub fn describe(&self) -> String {
        let out = self.output.trim();
        if out.is_empty() {
            format!("`{}` {}", self.command, self.ending())
        } else {
            format!("`{}` {}: {out}", self.command, self.ending())
        }
    }
}

/// A local snapshot as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Volume.
    pub volume: String,
    /// Snapshot name.
    pub name: String,
    /// NBD export name of the frozen image: `VOLUME@SNAPSHOT`.
    pub export: String,
    /// Group id, for group snapshots.
    pub group: Option<String>,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Frozen image size.
    pub size: u64,
    /// Extent size.
    pub extent_size: u64,
    /// Microseconds I/O was held for the freeze.
    pub pause_us: u64,
    /// False when the change set is unknown (tracking was lost).
    pub changes_known: bool,
    /// Bytes in the change set.
    pub changed_bytes: u64,
    /// Bytes preserved by copy-on-write since the freeze.
    pub cow_bytes: u64,
    /// Pre-exec outcome.
    pub pre_exec: Option<Hook>,
    /// Post-exec outcome.
    pub post_exec: Option<Hook>,
    /// Why the frozen image cannot be trusted (the host went down with
    /// copy-on-write data not on disk); such a snapshot is neither
    /// exported nor backed up.
    #[serde(default)]
    pub damaged: Option<String>,
}

/// Daemon facts returned by `GET /v1/info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// blockd version.
    pub version: String,
    /// State directory.
    pub state_dir: String,
    /// NBD Unix socket path.
    pub nbd_socket: String,
    /// NBD TCP address, if listening on TCP.
    pub nbd_listen: Option<String>,
    /// TLS on the NBD TCP address: `off`, `offered`, `required`, with
    /// `+client-certificates` when clients must present one.
    #[serde(default)]
    pub nbd_tls: Option<String>,
    /// I/O engine in use: `io_uring` or `threads`.
    pub io_engine: String,
    /// Memory-pressure protections in force (`io_flusher`, `mlockall`,
    /// `oom_score_adj`); see kernel-notes/nbd.md.
    #[serde(default)]
    pub protections: Vec<String>,
}

/// Every error body the API returns, with a 4xx or 5xx status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do about it, for a human.
    pub error: String,
}

/// Why a volume name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty or longer than 64 bytes.
    #[error("volume name {name:?} must be 1 to 64 characters long")]
    Length {
        /// The refused name.
        name: String,
    },
    /// Starts with something other than a letter or digit (`-x` reads as
    /// an option, `.x` as a hidden or relative path).
    #[error("volume name {name:?} must start with an ASCII letter or digit (a-z, A-Z, 0-9)")]
    Start {
        /// The refused name.
        name: String,
    },
    /// Holds `..` (a relative path step in the files and object keys a
    /// name becomes).
    #[error("volume name {name:?} must not contain \"..\"")]
    DotDot {
        /// The refused name.
        name: String,
    },
    /// Contains a character outside `[A-Za-z0-9._-]`.
    #[error("volume name {name:?} may contain only ASCII letters, digits, '.', '_' and '-'")]
    Character {
        /// The refused name.
        name: String,
    },
}

/// Checks a volume name: `[A-Za-z0-9._-]`, 1 to 64 characters, starting
/// with a letter or digit, no `..`.
///
/// Names become NBD export names and file names under the state directory,
/// so anything that could traverse paths or confuse URIs is refused.
///
/// # Errors
/// Returns the rule the name breaks.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 64 {
        return Err(NameError::Length { name: name.into() });
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(NameError::Start { name: name.into() });
    }
    if name.contains("..") {
        return Err(NameError::DotDot { name: name.into() });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(NameError::Character { name: name.into() });
    }
    Ok(())
}

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {why}")]
pub struct SizeError {
    /// The refused text.
    pub input: String,
    /// What is wrong and what to write instead.
    pub why: String,
}

/// Parses a size: an integer with an optional binary suffix, `K`, `M`,
/// `G`, `T` or `P` (also spelled `KiB` .. `PiB`; any case), powers of 1024.
///
/// Decimal spellings (`KB`, `MB`, `GB`, `TB`, `PB`) are refused rather
/// than read as binary: `1GB` is 10^9 bytes to some readers and 2^30 to
/// others, and a volume size must not depend on which.
///
/// # Errors
/// Returns [`SizeError`] for anything else, or on overflow.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    const USE: &str =
        "use a whole number with an optional K, M, G, T or P suffix (powers of 1024), e.g. 10G";
    let err = |why: String| SizeError {
        input: input.into(),
        why,
    };
    let s = input.trim();
    if s.starts_with('-') {
        return Err(err(format!("a size is not negative: {USE}")));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    if digits.is_empty() {
        return Err(err(USE.into()));
    }
    let n: u64 = digits.parse().map_err(|_| err(USE.into()))?;
    let upper = suffix.to_ascii_uppercase();
    let shift = match upper.as_str() {
        "" | "B" => 0,
        "K" | "KIB" => 10,
        "M" | "MIB" => 20,
        "G" | "GIB" => 30,
        "T" | "TIB" => 40,
        "P" | "PIB" => 50,
        "KB" | "MB" | "GB" | "TB" | "PB" => {
            let binary = &upper[..1];
            return Err(err(format!(
                "sizes are powers of 1024: write {digits}{binary} or {digits}{binary}iB ({digits}{suffix} is ambiguous)"
            )));
        }
        _ => return Err(err(USE.into())),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("too large: sizes stop at 16383P".into()))
}

/// Formats a byte count for humans: `1.5 GiB`, `4.0 KiB`, `512 B`.
pub fn human_size(bytes: u64) -> String {
    HumanSize(bytes).to_string()
}

struct HumanSize(u64);

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// Longest label key, in characters (a Kubernetes-style key with a DNS
/// prefix fits: `app.kubernetes.io/name`).
pub const MAX_LABEL_KEY: usize = 128;
/// Longest label value, in characters.
pub const MAX_LABEL_VALUE: usize = 256;

/// Parses a `k=v` label.
///
/// # Errors
/// Returns a message when there is no `=`, or the label is not valid
/// ([`validate_label`]).
pub fn parse_label(input: &str) -> Result<(String, String), String> {
    match input.split_once('=') {
        Some((k, v)) if !k.is_empty() => {
            validate_label(k, v)?;
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "invalid label {:?}: write labels as key=value, e.g. --label tier=gold",
            clipped(input)
        )),
    }
}

/// `s` as an error message shows it: at most 64 characters, then `...`.
fn clipped(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// Checks a label: a key of 1 to [`MAX_LABEL_KEY`] characters, a value of
/// at most [`MAX_LABEL_VALUE`] (empty is allowed, as in Kubernetes),
/// neither with control characters or white space (labels are printed on
/// one line, in one cell of a table row) nor with `,` (labels are listed,
/// and selectors written, `key=value,key=value`), and no `=` in the key.
///
/// # Errors
/// Returns a message saying what is allowed.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a label key is empty: write labels as key=value, e.g. tier=gold".into());
    }
    if key.chars().count() > MAX_LABEL_KEY || value.chars().count() > MAX_LABEL_VALUE {
        return Err(format!(
            "label {key:.32}...: keys are at most {MAX_LABEL_KEY} characters and values at most {MAX_LABEL_VALUE}"
        ));
    }
    if key.contains(['=', ',']) {
        return Err(format!(
            "label key {:?} has '=' or ',': write labels as key=value, e.g. tier=gold",
            clipped(key)
        ));
    }
    if key.chars().chain(value.chars()).any(char::is_control) {
        return Err(format!(
            "label {:?}={:?} has a control character (a newline, a tab): labels are printed on one line",
            clipped(key),
            clipped(value)
        ));
    }
    if key.chars().chain(value.chars()).any(char::is_whitespace) || value.contains(',') {
        return Err(format!(
            "label {:?}={:?} has a space or ',': a label is one word on each side of '=' (several labels are separated by ','), e.g. tier=gold or team=web-shop",
            clipped(key),
            clipped(value)
        ));
    }
    Ok(())
}

/// Checks an extent size: a power of two from 512 B to 1 MiB.
///
/// # Errors
/// Returns a message saying what is allowed.
pub fn validate_extent_size(extent_size: u64) -> Result<(), String> {
    if extent_size.is_power_of_two() && (512..=1 << 20).contains(&extent_size) {
        Ok(())
    } else {
        Err(format!(
            "extent size {extent_size} must be a power of two from 512 to 1M (e.g. 4K)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(parse_label("tier=gold"), Ok(("tier".into(), "gold".into())));
        assert_eq!(
            parse_label("app.kubernetes.io/name="),
            Ok(("app.kubernetes.io/name".into(), String::new()))
        );
        assert!(parse_label(&format!("{}=x", "k".repeat(MAX_LABEL_KEY))).is_ok());
        for bad in [
            format!("{}=x", "k".repeat(MAX_LABEL_KEY + 1)),
            format!("k={}", "v".repeat(MAX_LABEL_VALUE + 1)),
            "=x".into(),
            "x".into(),
            "a,b=c".into(),
            "k=a\tb".into(),
            "k\n=v".into(),
            "k=a b".into(),
            "k=a,b".into(),
            "a b=c".into(),
            "k= b".into(),
        ] {
            let e = parse_label(&bad).unwrap_err();
            assert!(e.len() < 300, "{bad:?} echoed whole: {e}");
        }
        // A long value is shown clipped.
        let e = parse_label(&"x".repeat(5000)).unwrap_err();
        assert!(
            e.contains(&format!("{}...", "x".repeat(64))) && e.len() < 200,
            "{e}"
        );
        let e = parse_label(&format!("k=a {}", "y".repeat(200))).unwrap_err();
        assert!(e.contains("separated by ','") && e.len() < 300, "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        let e = parse_size("1GB").unwrap_err();
        assert!(e.to_string().contains("write 1G or 1GiB"), "{e}");
        assert!(parse_size("4kb").is_err());
        assert!(parse_size("10Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        let e = parse_size("-1").unwrap_err();
        assert!(e.to_string().contains("not negative"), "{e}");
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("vol-1.data_2").is_ok());
        assert!(matches!(
            validate_name("../x"),
            Err(NameError::Start { .. })
        ));
        assert!(matches!(validate_name("-"), Err(NameError::Start { .. })));
        assert!(matches!(validate_name("_a"), Err(NameError::Start { .. })));
        assert!(matches!(
            validate_name("x..y"),
            Err(NameError::DotDot { .. })
        ));
        assert!(validate_name("20261121T101500.123Z-3f4f0a67").is_ok());
        assert!(matches!(
            validate_name("a/b"),
            Err(NameError::Character { .. })
        ));
        assert!(matches!(
            validate_name("a@b"),
            Err(NameError::Character { .. })
        ));
        assert!(matches!(validate_name(""), Err(NameError::Length { .. })));
        assert!(matches!(
            validate_name(&"x".repeat(65)),
            Err(NameError::Length { .. })
        ));
        assert!(validate_name(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn human() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(10 << 30), "10.0 GiB");
    }

    #[test]
    fn extent_sizes() {
        assert!(validate_extent_size(4096).is_ok());
        assert!(validate_extent_size(512).is_ok());
        assert!(validate_extent_size(3000).is_err());
        assert!(validate_extent_size(2 << 20).is_err());
    }
}

pub mod secret;
pub use secret::Secret;

pub mod cloud;
pub use cloud::{
    BackupGroupRequest, BackupRequest, Catalog, CheckReport, CheckRequest, CloudSnap,
    CreateLocation, CreateSchedule, DamagedSnapshot, DataRead, GcReport, GcRequest, GroupState,
    Location, MaxUnused, Problem, Provider, RestoreRequest, Schedule, Started, Subset, Task,
    TaskKind, TaskState, Verified, LOCAL_LOCATION,
};

pub mod mount;
pub use mount::{MountInfo, MountRequest};
