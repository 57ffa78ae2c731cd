//! Locations (pxctl's "credentials"): where cloud snapshots are kept.
//!
//! Non-secret settings live in the state database; secrets (S3 secret key,
//! Azure account key, Google service-account key, encryption passphrase) in
//! `<state dir>/credentials/<name>.json`, mode 0600, written atomically.
//! They are never returned by the API, logged, or written to the bucket.
//! The location `local` (a directory, `<state dir>/objects`) is created at
//! first start, so backups work with no setup.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockd_api::{validate_name, CreateLocation, Location, Provider, Secret, LOCAL_LOCATION};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use serde::{Deserialize, Serialize};

use super::{now, CloudError};
use crate::claims::{Claims, Want};
use crate::outcome::Outcome;
use crate::repo::faulty::FaultyStore;
use crate::repo::{Repo, RepoError};
use crate::state::StateDb;

/// Why a location was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocationError {
    /// No location has this name.
    #[error(
        "no location (credentials) named {name:?}: list them with `blockctl credentials list`"
    )]
    NotFound {
        /// Name given.
        name: String,
    },
    /// Several locations exist and none was named.
    #[error("several locations exist ({names}): choose one with --cred-id")]
    Ambiguous {
        /// Every location, comma-separated.
        names: String,
    },
    /// Schedules back up to it.
    #[error(
        "credentials {name:?} are used by schedule(s) {schedules}: delete those first \
         (`blockctl cloudsnap schedules delete --uuid ID`)"
    )]
    Scheduled {
        /// Name given.
        name: String,
        /// The schedules' ids, comma-separated.
        schedules: String,
    },
    /// Other credentials already name the same repository.
    #[error(
        "credentials {other:?} already name this repository ({target}): use --cred-id {other}. \
         A second name for it would let one name delete or collect what the other is \
         restoring or mounting, unseen"
    )]
    SameTarget {
        /// The credentials that name it.
        other: String,
        /// Where it is.
        target: String,
    },
    /// Read-only credentials already name the repository, and these
    /// may write.
    #[error(
        "credentials {other:?} already name this repository ({target}), read-only: to reach \
         it with keys that can write, delete them first (`blockctl credentials delete {other}`), \
         then create these"
    )]
    SameTargetReadOnly {
        /// The credentials that name it.
        other: String,
        /// Where it is.
        target: String,
    },
    /// The name is taken.
    #[error("credentials {name:?} already exist: delete them first or choose another name")]
    Exists {
        /// Name given.
        name: String,
    },
    /// The name is not a valid name.
    #[error("{why}")]
    BadName {
        /// What is wrong with it.
        why: String,
    },
    /// `local` is built in.
    #[error("the embedded location `local` cannot be deleted: it is built in; name other credentials with --cred-id to back up elsewhere")]
    Embedded,
    /// A required flag is missing.
    #[error("{flag} is required for provider {provider}")]
    Missing {
        /// Flag.
        flag: &'static str,
        /// Provider chosen.
        provider: Provider,
    },
    /// Flags of another provider were given.
    #[error("{flags} do(es) not apply to provider {provider}")]
    Foreign {
        /// The flags, comma-separated.
        flags: String,
        /// Provider chosen.
        provider: Provider,
    },
    /// A flag's value is unusable.
    #[error("{flag} {why}")]
    BadFlag {
        /// Flag.
        flag: &'static str,
        /// What is wrong with its value.
        why: String,
    },
    /// The provider's client refused the settings.
    #[error("location {name}: {source}")]
    Config {
        /// Location.
        name: String,
        /// What the client said.
        #[source]
        source: object_store::Error,
    },
    /// The local directory cannot be created.
    #[error("location {name}: cannot create directory {dir}: {source}")]
    Directory {
        /// Location.
        name: String,
        /// Directory.
        dir: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The directory of an existing local location is not there: made
    /// again, an unmounted mount point's backups would fill the file
    /// system underneath and vanish when it is mounted again.
    #[error(
        "location {name}: directory {dir} is not there: if it is a mount point, mount it; if it \
         was moved, move it back (blockd makes a location's directory only when the location is \
         created)"
    )]
    DirectoryGone {
        /// Location.
        name: String,
        /// Directory.
        dir: String,
    },
    /// The write/read/delete round trip of a test object failed.
    #[error("location {name}: validation failed: {op} of a test object: {source}")]
    Probe {
        /// Location.
        name: String,
        /// "write", "read" or "delete".
        op: &'static str,
        /// What the provider said.
        #[source]
        source: object_store::Error,
    },
    /// The keys may read but not write, and `--read-only` was not given.
    #[error(
        "location {name}: these keys can read the bucket but not write to it ({source}): \
         for a host that only restores and browses, add --read-only"
    )]
    ReadOnlyKeys {
        /// Location.
        name: String,
        /// What the provider said to the write.
        #[source]
        source: object_store::Error,
    },
    /// Read-only credentials were asked to write.
    #[error(
        "credentials {name:?} are read-only (created with --read-only): they cannot {what}; \
         use credentials whose keys can write"
    )]
    ReadOnly {
        /// Location.
        name: String,
        /// What was asked, e.g. "take backups".
        what: &'static str,
    },
    /// `--read-only` credentials for a place that holds no repository.
    #[error(
        "location {name}: there is no repository here (no config object) and read-only \
         credentials cannot make one: check the bucket, prefix or directory, or create it \
         first with keys that can write"
    )]
    NoRepository {
        /// Location.
        name: String,
    },
    /// The store gave no answer at all to the first request.
    #[error(
        "location {name}: no answer from the store within {secs} s: check the endpoint \
         (--s3-endpoint, --azure-endpoint) and that the server is up and reachable from this host"
    )]
    NoAnswer {
        /// Location.
        name: String,
        /// How long it waited.
        secs: u64,
    },
    /// The test object read back differently.
    #[error("location {name}: validation failed: the test object read back differently")]
    ProbeMismatch {
        /// Location.
        name: String,
    },
    /// The secrets file cannot be read, written or decoded.
    #[error("credentials of {name}: {op} {path}: {source}")]
    Secrets {
        /// Location.
        name: String,
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Settings cannot be encoded.
    #[error("location {name}: encoding its settings: {source}")]
    Encode {
        /// Location.
        name: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

impl LocationError {
    /// True when the location will never take a write through these
    /// credentials: it was deleted, or it is read-only (by `--read-only`,
    /// or keys that may only read). Work waiting to write there (an
    /// expiry, a group object) is dropped rather than tried again; any
    /// other error (a directory not mounted, a store not answering) may
    /// pass.
    pub fn refuses_writes_for_good(&self) -> bool {
        matches!(
            self,
            Self::NotFound { .. } | Self::ReadOnly { .. } | Self::ReadOnlyKeys { .. }
        )
    }

    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::NotFound { .. } => Outcome::NotFound,
            Self::Exists { .. }
            | Self::Scheduled { .. }
            | Self::SameTarget { .. }
            | Self::SameTargetReadOnly { .. } => Outcome::Conflict,
            Self::Ambiguous { .. }
            | Self::BadName { .. }
            | Self::Embedded
            | Self::Missing { .. }
            | Self::Foreign { .. }
            | Self::BadFlag { .. }
            | Self::Config { .. } => Outcome::Invalid,
            Self::Directory { .. }
            | Self::DirectoryGone { .. }
            | Self::Probe { .. }
            | Self::ReadOnlyKeys { .. }
            | Self::ReadOnly { .. }
            | Self::NoRepository { .. }
            | Self::NoAnswer { .. }
            | Self::ProbeMismatch { .. } => Outcome::Refused,
            Self::Secrets { .. } | Self::Encode { .. } => Outcome::Failed,
        }
    }
}

fn encode(name: &str, s: &Settings) -> Result<String, LocationError> {
    serde_json::to_string(s).map_err(|source| LocationError::Encode {
        name: name.to_string(),
        source,
    })
}

/// How long `credentials create` and `validate` wait for the store's
/// first answer: an endpoint that takes connections and never answers
/// would otherwise hold the request for the HTTP client's full timeout and
/// retries (some two minutes). Once it has answered, later requests have
/// the client's own limits.
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(30);

/// `fut`, or [`LocationError::NoAnswer`] once [`FIRST_ANSWER_WAIT`] passed.
async fn first_answer<T>(
    name: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, LocationError> {
    tokio::time::timeout(FIRST_ANSWER_WAIT, fut)
        .await
        .map_err(|_| LocationError::NoAnswer {
            name: name.to_string(),
            secs: FIRST_ANSWER_WAIT.as_secs(),
        })
}

/// Non-secret settings, kept in the state database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    provider: Option<Provider>,
    bucket: Option<String>,
    path: Option<String>,
    prefix: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    access_key: Option<String>,
    disable_ssl: bool,
    disable_path_style: bool,
    storage_class: Option<String>,
    account: Option<String>,
    project: Option<String>,
    encryption: bool,
    /// Whether the store refuses a second create of one object (probed at
    /// create and validate); `None` before the first probe.
    #[serde(default)]
    conditional: Option<bool>,
    /// The repository's identity ([`Repo::id`]), recorded when it was
    /// created or first opened: one repository reached at two addresses
    /// (`localhost` and `127.0.0.1`, a bind mount) is still one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repository: Option<String>,
    /// Keys that may only read: nothing is written with them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    read_only: bool,
}

/// Secrets, kept in a 0600 file.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Secrets {
    s3_secret_key: Option<Secret>,
    azure_account_key: Option<Secret>,
    google_key: Option<Secret>,
    passphrase: Option<Secret>,
}

/// The locations of this daemon, with opened repositories cached.
#[derive(Debug)]
pub struct Locations {
    db: Arc<StateDb>,
    claims: Arc<Claims>,
    /// The daemon's state directory: no location may be inside it.
    state_dir: PathBuf,
    secrets_dir: PathBuf,
    objects_dir: PathBuf,
    /// Fault injection rate for every store (testing resilience).
    fault_rate: Option<f64>,
    open: tokio::sync::Mutex<HashMap<String, Arc<Repo>>>,
    /// Held by a create from before it opens (or makes) its repository
    /// until its row exists: two names cannot both make one repository.
    /// Apart from `open`, so a create waiting on a slow endpoint holds up
    /// no backup.
    creating: tokio::sync::Mutex<()>,
}

/// True when `path` is `dir` or inside it, following the symbolic links of
/// the part of `path` that exists (`dir` is canonical).
fn within(path: &Path, dir: &Path) -> bool {
    let mut existing = path;
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(existing).is_err() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
            break;
        };
        rest.push(name);
        existing = parent;
    }
    let mut full = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_path_buf());
    full.extend(rest.iter().rev());
    full.starts_with(dir) || path.starts_with(dir)
}

impl Locations {
    /// Loads locations, creating `local` on first start.
    ///
    /// # Errors
    /// Database or file-system errors.
    pub fn open(
        state_dir: &Path,
        db: Arc<StateDb>,
        claims: Arc<Claims>,
        fault_rate: Option<f64>,
    ) -> Result<Self, CloudError> {
        let secrets_dir = state_dir.join("credentials");
        std::fs::create_dir_all(&secrets_dir).map_err(|source| LocationError::Secrets {
            name: "*".into(),
            op: "creating",
            path: secrets_dir.display().to_string(),
            source,
        })?;
        let _ = std::fs::set_permissions(&secrets_dir, std::fs::Permissions::from_mode(0o700));
        let objects_dir = state_dir.join("objects");
        let fault_rate = fault_rate.filter(|r| *r > 0.0);
        if let Some(r) = fault_rate {
            tracing::warn!(
                rate = r,
                "BLOCKD_FAULT_INJECT: failing a fraction of object-store requests on purpose"
            );
        }
        let me = Self {
            db,
            claims,
            state_dir: std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf()),
            secrets_dir,
            objects_dir,
            fault_rate,
            open: tokio::sync::Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
        };
        if !me.rows()?.iter().any(|(n, _, _)| n == LOCAL_LOCATION) {
            let s = Settings {
                provider: Some(Provider::Local),
                ..Settings::default()
            };
            me.db
                .insert_location(LOCAL_LOCATION, &encode(LOCAL_LOCATION, &s)?, &now())?;
        }
        // Two names for one repository from before they were refused: say
        // so, since each name guards only what it is used for itself.
        let mut seen: HashMap<String, String> = HashMap::new();
        for (name, s, _) in me.rows()? {
            let target = me.target(&s);
            if let Some(first) = seen.get(&target) {
                tracing::warn!(location = %name, same_as = %first, %target, "two credentials name one repository: delete one (`blockctl credentials delete NAME`), or a delete or gc through one can remove what the other is restoring");
            } else {
                seen.insert(target, name);
            }
        }
        Ok(me)
    }

    fn rows(&self) -> Result<Vec<(String, Settings, String)>, CloudError> {
        Ok(self
            .db
            .locations()?
            .into_iter()
            .filter_map(|(n, c, t)| match serde_json::from_str(&c) {
                Ok(s) => Some((n, s, t)),
                Err(e) => {
                    tracing::error!(location = %n, error = %e, "unreadable location settings");
                    None
                }
            })
            .collect())
    }

    /// One location's row.
    fn row(&self, name: &str) -> Result<(String, Settings, String), CloudError> {
        self.rows()?
            .into_iter()
            .find(|(n, _, _)| n == name)
            .ok_or_else(|| {
                LocationError::NotFound {
                    name: name.to_string(),
                }
                .into()
            })
    }

    fn to_api(&self, name: &str, s: &Settings, created: &str) -> Location {
        let provider = s.provider.unwrap_or(Provider::Local);
        Location {
            name: name.to_string(),
            provider,
            bucket: s.bucket.clone(),
            path: match provider {
                Provider::Local => Some(
                    s.path
                        .clone()
                        .unwrap_or_else(|| self.objects_dir.display().to_string()),
                ),
                _ => None,
            },
            prefix: s.prefix.clone(),
            endpoint: s.endpoint.clone(),
            region: s.region.clone(),
            account: s
                .access_key
                .clone()
                .or(s.account.clone())
                .or(s.project.clone()),
            ssl: provider != Provider::Local && !s.disable_ssl,
            path_style: provider == Provider::S3 && !s.disable_path_style,
            storage_class: s.storage_class.clone(),
            encryption: s.encryption,
            conditional_writes: s.conditional,
            read_only: s.read_only,
            created: created.to_string(),
        }
    }

    /// The directory a local location's objects live in (under its
    /// prefix); `None` for a cloud provider.
    ///
    /// # Errors
    /// Unknown location; database errors.
    pub fn local_dir(&self, name: &str) -> Result<Option<PathBuf>, CloudError> {
        let (_, s, _) = self.row(name)?;
        Ok(self.objects_under_prefix(&s))
    }

    /// The directory of a local location (`--path`, else the state dir's
    /// `objects`), before its prefix.
    fn local_root(&self, s: &Settings) -> PathBuf {
        s.path
            .as_ref()
            .map_or_else(|| self.objects_dir.clone(), PathBuf::from)
    }

    /// [`Self::local_root`] under the location's prefix; `None` for a
    /// cloud provider.
    fn objects_under_prefix(&self, s: &Settings) -> Option<PathBuf> {
        if s.provider.unwrap_or(Provider::Local) != Provider::Local {
            return None;
        }
        let dir = self.local_root(s);
        Some(match s.prefix.as_deref().map(|p| p.trim_matches('/')) {
            Some(p) if !p.is_empty() => dir.join(p),
            _ => dir,
        })
    }

    /// Where a location's repository is, one string per repository: two
    /// locations with the same target are one repository under two names.
    /// A local directory is compared as the file system resolves it.
    fn target(&self, s: &Settings) -> String {
        let prefix = s.prefix.as_deref().unwrap_or("").trim_matches('/');
        // As the store is built: an S3 endpoint without a scheme is
        // `http://` or `https://` as --disable-ssl says.
        let endpoint = match s.provider {
            Some(Provider::S3) => s3_endpoint(s),
            _ => s.endpoint.clone(),
        }
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_ascii_lowercase();
        let bucket = s.bucket.as_deref().unwrap_or("");
        match s.provider.unwrap_or(Provider::Local) {
            Provider::Local => {
                let dir = self.objects_under_prefix(s).unwrap_or_default();
                let dir = std::fs::canonicalize(&dir)
                    .unwrap_or_else(|_| dir.components().collect::<PathBuf>());
                format!("local directory {}", dir.display())
            }
            Provider::S3 => {
                let region = s.region.as_deref().unwrap_or("");
                let at = if endpoint.is_empty() {
                    format!("AWS {region}")
                } else {
                    endpoint
                };
                format!("S3 bucket {bucket} prefix /{prefix} at {at}")
            }
            Provider::Azure => {
                let account = s.account.as_deref().unwrap_or("");
                format!("Azure container {bucket} prefix /{prefix} of {account} at {endpoint}")
            }
            Provider::Google => format!("GCS bucket {bucket} prefix /{prefix}"),
        }
    }

    /// Every location.
    ///
    /// # Errors
    /// Database errors.
    pub fn list(&self) -> Result<Vec<Location>, CloudError> {
        Ok(self
            .rows()?
            .iter()
            .map(|(n, s, t)| self.to_api(n, s, t))
            .collect())
    }

    /// Every location's name, in name order.
    ///
    /// # Errors
    /// The state database failed.
    pub fn names(&self) -> Result<Vec<String>, CloudError> {
        Ok(self.rows()?.into_iter().map(|(n, _, _)| n).collect())
    }

    /// Resolves an optional `--cred-id`: pxctl's rule, the only location
    /// when there is just one.
    ///
    /// # Errors
    /// Unknown name, or several locations and none named.
    pub fn resolve(&self, name: Option<&str>) -> Result<String, CloudError> {
        let rows = self.rows()?;
        match name {
            Some(n) => {
                if rows.iter().any(|(r, _, _)| r == n) {
                    Ok(n.to_string())
                } else {
                    Err(LocationError::NotFound {
                        name: n.to_string(),
                    }
                    .into())
                }
            }
            None if rows.len() == 1 => Ok(rows[0].0.clone()),
            None => Err(LocationError::Ambiguous {
                names: rows
                    .iter()
                    .map(|r| r.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into()),
        }
    }

    fn secrets_path(&self, name: &str) -> PathBuf {
        self.secrets_dir.join(format!("{name}.json"))
    }

    fn secrets_error(&self, name: &str, op: &'static str, source: std::io::Error) -> LocationError {
        LocationError::Secrets {
            name: name.to_string(),
            op,
            path: self.secrets_path(name).display().to_string(),
            source,
        }
    }

    fn read_secrets(&self, name: &str) -> Result<Secrets, LocationError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.secrets_path(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                return Err(self.secrets_error(
                    name,
                    "reading",
                    std::io::Error::other(format!(
                        "{} is mode {:o}: credentials must be readable by their owner only; \
                         run `chmod 600 {}` (and check who read it)",
                        path.display(),
                        m.permissions().mode() & 0o777,
                        path.display()
                    )),
                ));
            }
            _ => {}
        }
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&zeroize::Zeroizing::new(b))
                .map_err(|e| self.secrets_error(name, "decoding", e.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Secrets::default()),
            Err(e) => Err(self.secrets_error(name, "reading", e)),
        }
    }

    fn write_secrets(&self, name: &str, s: &Secrets) -> Result<(), LocationError> {
        let body = zeroize::Zeroizing::new(
            serde_json::to_vec(s).map_err(|e| self.secrets_error(name, "encoding", e.into()))?,
        );
        crate::durable::write_atomic_mode(&self.secrets_path(name), &body, 0o600)
            .map_err(|e| self.secrets_error(name, "writing", e))
    }

    /// Builds the object store of a location; with `init` (the location
    /// is being created), a local directory is made if need be.
    fn build_store(
        &self,
        name: &str,
        s: &Settings,
        secrets: &Secrets,
        init: bool,
    ) -> Result<Arc<dyn ObjectStore>, LocationError> {
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
        };
        let (connect_timeout, timeout) = (Duration::from_secs(5), Duration::from_secs(120));
        let client = ClientOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(timeout);
        // Our own client unless a proxy is configured (super::http).
        let http = (!super::http::proxy_in_environment()).then_some(super::http::Connector {
            connect_timeout,
            timeout,
        });
        let bucket = || {
            s.bucket.clone().ok_or_else(|| LocationError::Missing {
                flag: "--bucket",
                provider: s.provider.unwrap_or(Provider::Local),
            })
        };
        let cfg_err = |source| LocationError::Config {
            name: name.to_string(),
            source,
        };
        let store: Arc<dyn ObjectStore> = match s.provider.unwrap_or(Provider::Local) {
            Provider::Local => {
                let dir = self.local_root(s);
                if s.read_only {
                    // Nothing is made through read-only credentials.
                    if !dir.is_dir() {
                        return Err(LocationError::NoRepository {
                            name: name.to_string(),
                        });
                    }
                } else if !init {
                    if !dir.is_dir() {
                        return Err(LocationError::DirectoryGone {
                            name: name.to_string(),
                            dir: dir.display().to_string(),
                        });
                    }
                } else {
                    std::fs::create_dir_all(&dir).map_err(|source| LocationError::Directory {
                        name: name.to_string(),
                        dir: dir.display().to_string(),
                        source,
                    })?;
                }
                // A backup is done when its objects are durable: fsync files and
                // directories, as object stores do before acknowledging a PUT.
                // Large ranged GETs bypass the page cache (`repo::direct`).
                // Nothing is written once the repository's config is gone
                // (`repo::direct`, "Guard").
                let prefix = s.prefix.as_deref().unwrap_or("").trim_matches('/');
                let key = object_store::path::Path::from(
                    format!("{prefix}/config").trim_start_matches('/'),
                );
                Arc::new(
                    crate::repo::direct::DirectLocal::new(
                        LocalFileSystem::new_with_prefix(&dir)
                            .map_err(cfg_err)?
                            .with_fsync(true),
                    )
                    .guarding(key)
                    .map_err(cfg_err)?,
                )
            }
            Provider::S3 => {
                let endpoint = s3_endpoint(s);
                // If-None-Match only where the probe did not find it
                // ignored: otherwise a create is a HEAD then a PUT.
                let conditional = if s.conditional == Some(false) {
                    S3ConditionalPut::Disabled
                } else {
                    S3ConditionalPut::ETagMatch
                };
                let mut b = AmazonS3Builder::new()
                    .with_conditional_put(conditional)
                    .with_bucket_name(bucket()?)
                    .with_region(s.region.clone().unwrap_or_else(|| "us-east-1".into()))
                    .with_allow_http(s.disable_ssl)
                    .with_virtual_hosted_style_request(s.disable_path_style)
                    .with_retry(retry)
                    .with_client_options(client.with_allow_http(s.disable_ssl));
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(h) = http {
                    b = b.with_http_connector(h);
                }
                if let Some(k) = &s.access_key {
                    b = b.with_access_key_id(k);
                }
                if let Some(k) = &secrets.s3_secret_key {
                    b = b.with_secret_access_key(k.expose());
                }
                Arc::new(b.build().map_err(cfg_err)?)
            }
            Provider::Azure => {
                let mut b = MicrosoftAzureBuilder::new()
                    .with_container_name(bucket()?)
                    .with_retry(retry)
                    .with_client_options(client.with_allow_http(true));
                if let Some(h) = http {
                    b = b.with_http_connector(h);
                }
                if let Some(a) = &s.account {
                    b = b.with_account(a);
                }
                if let Some(k) = &secrets.azure_account_key {
                    b = b.with_access_key(k.expose());
                }
                if let Some(e) = &s.endpoint {
                    b = b
                        .with_endpoint(e.clone())
                        .with_allow_http(e.starts_with("http://"));
                }
                Arc::new(b.build().map_err(cfg_err)?)
            }
            Provider::Google => {
                let mut b = GoogleCloudStorageBuilder::new()
                    .with_bucket_name(bucket()?)
                    .with_retry(retry)
                    .with_client_options(client);
                if let Some(h) = http {
                    b = b.with_http_connector(h);
                }
                if let Some(k) = &secrets.google_key {
                    b = b.with_service_account_key(k.expose());
                }
                Arc::new(b.build().map_err(cfg_err)?)
            }
        };
        Ok(match self.fault_rate {
            Some(r) => Arc::new(FaultyStore::new(store, r)),
            None => store,
        })
    }

    /// Writes, reads back and deletes a small object: proves the endpoint,
    /// bucket and keys work, reporting the provider's own error if not.
    /// Then creates one object twice: true when the store refuses the
    /// second create (conditional writes honoured; Garage 2.5.0 answers
    /// 200 and overwrites).
    async fn probe(
        store: &Arc<dyn ObjectStore>,
        prefix: &str,
        name: &str,
    ) -> Result<bool, LocationError> {
        let mut tag = [0u8; 8];
        crate::repo::crypto::fill_random(&mut tag);
        let key = format!(
            "{}.blockd-probe-{}",
            if prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", prefix.trim_matches('/'))
            },
            hex::encode(tag)
        );
        let path = object_store::path::Path::from(key.as_str());
        let fail = |op, source| LocationError::Probe {
            name: name.to_string(),
            op,
            source,
        };
        let first = store.put(&path, bytes::Bytes::from_static(b"blockd probe").into());
        match first_answer(name, first).await? {
            Ok(_) => {}
            // Refused: keys that may read (the probe object is simply not
            // there) are read-only keys, which `--read-only` is for.
            Err(source) if write_refused(&source) => {
                return Err(match store.head(&path).await {
                    Err(object_store::Error::NotFound { .. }) => LocationError::ReadOnlyKeys {
                        name: name.to_string(),
                        source,
                    },
                    _ => fail("write", source),
                })
            }
            Err(e) => return Err(fail("write", e)),
        }
        let got = store
            .get(&path)
            .await
            .map_err(|e| fail("read", e))?
            .bytes()
            .await
            .map_err(|e| fail("read", e))?;
        if &got[..] != b"blockd probe" {
            return Err(LocationError::ProbeMismatch {
                name: name.to_string(),
            });
        }
        store.delete(&path).await.map_err(|e| fail("delete", e))?;
        let create = || object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..object_store::PutOptions::default()
        };
        let body = || object_store::PutPayload::from_static(b"blockd probe");
        let honoured = match store.put_opts(&path, body(), create()).await {
            Ok(_) => matches!(
                store.put_opts(&path, body(), create()).await,
                Err(object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. })
            ),
            Err(object_store::Error::NotImplemented { .. }) => false,
            Err(e) => return Err(fail("conditional write", e)),
        };
        store.delete(&path).await.map_err(|e| fail("delete", e))?;
        Ok(honoured)
    }

    /// Creates a location: validated by a round trip and by opening (or
    /// initialising) the repository with the given passphrase.
    ///
    /// # Errors
    /// Bad flags, a failing endpoint or key, a wrong passphrase, a taken name.
    pub async fn create(&self, req: CreateLocation) -> Result<Location, CloudError> {
        validate_name(&req.name).map_err(|e| LocationError::BadName {
            why: e.to_string().replace("volume name", "credentials name"),
        })?;
        let provider = req.provider.ok_or_else(|| LocationError::BadFlag {
            flag: "--provider",
            why: "is required: local, s3, azure or google".into(),
        })?;
        // Held until the row exists: two creates of one name cannot both
        // pass the check below (and overwrite each other's secrets).
        let _claim = self
            .claims
            .acquire(Want::for_location_change(&req.name, "are being created"))?;
        if self.rows()?.iter().any(|(n, _, _)| *n == req.name) {
            return Err(LocationError::Exists {
                name: req.name.clone(),
            }
            .into());
        }
        let needs = |v: Option<&str>, flag| {
            if v.is_none_or(str::is_empty) {
                Err(LocationError::Missing { flag, provider })
            } else {
                Ok(())
            }
        };
        // Flags of another provider are refused, not silently ignored: a
        // listing must show where the data really goes.
        let given: [(&str, bool, &[Provider]); 14] = [
            ("--path", req.path.is_some(), &[Provider::Local]),
            (
                "--bucket",
                req.bucket.is_some(),
                &[Provider::S3, Provider::Azure, Provider::Google],
            ),
            ("--s3-endpoint", req.s3_endpoint.is_some(), &[Provider::S3]),
            ("--s3-region", req.s3_region.is_some(), &[Provider::S3]),
            (
                "--s3-access-key",
                req.s3_access_key.is_some(),
                &[Provider::S3],
            ),
            (
                "--s3-secret-key",
                req.s3_secret_key.is_some(),
                &[Provider::S3],
            ),
            ("--s3-disable-ssl", req.s3_disable_ssl, &[Provider::S3]),
            (
                "--disable-path-style",
                req.disable_path_style,
                &[Provider::S3],
            ),
            (
                "--s3-storage-class",
                req.s3_storage_class.is_some(),
                &[Provider::S3],
            ),
            (
                "--azure-account-name",
                req.azure_account_name.is_some(),
                &[Provider::Azure],
            ),
            (
                "--azure-account-key",
                req.azure_account_key.is_some(),
                &[Provider::Azure],
            ),
            (
                "--azure-endpoint",
                req.azure_endpoint.is_some(),
                &[Provider::Azure],
            ),
            (
                "--google-project-id",
                req.google_project_id.is_some(),
                &[Provider::Google],
            ),
            (
                "--google-json-key-file",
                req.google_json_key_file.is_some(),
                &[Provider::Google],
            ),
        ];
        let foreign: Vec<&str> = given
            .iter()
            .filter(|(_, set, ok)| *set && !ok.contains(&provider))
            .map(|(f, _, _)| *f)
            .collect();
        if !foreign.is_empty() {
            return Err(LocationError::Foreign {
                flags: foreign.join(", "),
                provider,
            }
            .into());
        }
        let mut google_key = None;
        match provider {
            Provider::Local => needs(req.path.as_deref(), "--path")?,
            Provider::S3 => {
                needs(req.bucket.as_deref(), "--bucket")?;
                needs(req.s3_access_key.as_deref(), "--s3-access-key")?;
                needs(
                    req.s3_secret_key.as_ref().map(Secret::expose),
                    "--s3-secret-key",
                )?;
                if let Some(e) = req
                    .s3_endpoint
                    .as_deref()
                    .filter(|e| req.s3_disable_ssl && e.starts_with("https://"))
                {
                    return Err(LocationError::BadFlag {
                        flag: "--s3-disable-ssl",
                        why: format!("allows plain HTTP, but the endpoint {e} is https://: give the endpoint as http://HOST:PORT (or without a scheme), or drop --s3-disable-ssl"),
                    }
                    .into());
                }
            }
            Provider::Azure => {
                needs(req.bucket.as_deref(), "--bucket")?;
                needs(req.azure_account_name.as_deref(), "--azure-account-name")?;
                needs(
                    req.azure_account_key.as_ref().map(Secret::expose),
                    "--azure-account-key",
                )?;
            }
            Provider::Google => {
                needs(req.bucket.as_deref(), "--bucket")?;
                needs(
                    req.google_json_key_file.as_deref(),
                    "--google-json-key-file",
                )?;
                let f = req.google_json_key_file.as_deref().unwrap_or_default();
                let key = std::fs::read_to_string(f).map_err(|e| LocationError::BadFlag {
                    flag: "--google-json-key-file",
                    why: format!("{f}: {e} (the file is read by blockd)"),
                })?;
                serde_json::from_str::<serde_json::Value>(&key).map_err(|e| {
                    LocationError::BadFlag {
                        flag: "--google-json-key-file",
                        why: format!("{f} is not JSON: {e}"),
                    }
                })?;
                google_key = Some(Secret::from(key));
            }
        }
        if let Some(p) = &req.path {
            if !Path::new(p).is_absolute() {
                return Err(LocationError::BadFlag {
                    flag: "--path",
                    why: format!("{p:?} must be an absolute directory"),
                }
                .into());
            }
            if within(Path::new(p), &self.state_dir) {
                return Err(LocationError::BadFlag {
                    flag: "--path",
                    why: format!(
                        "{p} is inside blockd's state directory {}, where it would collide with the daemon's own files (the embedded location `local` keeps its objects there; use --cred-id local for it): choose a directory outside it",
                        self.state_dir.display()
                    ),
                }
                .into());
            }
        }
        if req
            .encryption_passphrase
            .as_ref()
            .is_some_and(|p| p.expose().is_empty())
        {
            return Err(LocationError::BadFlag {
                flag: "--encryption-passphrase",
                why: "must not be empty".into(),
            }
            .into());
        }
        let settings = Settings {
            provider: Some(provider),
            bucket: req.bucket.clone(),
            path: req.path.clone(),
            prefix: req
                .prefix
                .clone()
                .map(|p| p.trim_matches('/').to_string())
                .filter(|p| !p.is_empty()),
            endpoint: req.s3_endpoint.clone().or(req.azure_endpoint.clone()),
            region: req.s3_region.clone(),
            access_key: req.s3_access_key.clone(),
            disable_ssl: req.s3_disable_ssl,
            disable_path_style: req.disable_path_style,
            storage_class: req.s3_storage_class.clone(),
            account: req.azure_account_name.clone(),
            project: req.google_project_id.clone(),
            encryption: req.encryption_passphrase.is_some(),
            conditional: None,
            repository: None,
            read_only: req.read_only,
        };
        let secrets = Secrets {
            s3_secret_key: req.s3_secret_key.clone(),
            azure_account_key: req.azure_account_key.clone(),
            google_key,
            passphrase: req.encryption_passphrase.clone(),
        };
        // One name per repository, checked and inserted in one step: the
        // target's claim is held until the row exists.
        let target = self.target(&settings);
        let _target_claim = self.claims.acquire(Want::for_location_change(
            &format!("for the {target}"),
            "are being created",
        ))?;
        if let Some((other, s, _)) = self
            .rows()?
            .into_iter()
            .find(|(_, s, _)| self.target(s) == target)
        {
            return Err(same_target(other, &s, &settings, target).into());
        }
        // The same repository at another address is caught by what it is:
        // it is opened (or made), its identity compared and the row
        // inserted in one step with respect to every other create, so two
        // names cannot both make a new repository at one place.
        let _creating = self.creating.lock().await;
        let mut settings = settings;
        let repo = if settings.read_only {
            // Nothing is written with these keys: the open's read of the
            // config proves them, and the repository must be there already.
            let connect = self.connect(&req.name, &mut settings, &secrets, false, false);
            match first_answer(&req.name, connect).await? {
                Err(CloudError::Repo(RepoError::Gone { .. })) => {
                    return Err(LocationError::NoRepository {
                        name: req.name.clone(),
                    }
                    .into());
                }
                r => r?,
            }
        } else {
            self.connect(&req.name, &mut settings, &secrets, true, true)
                .await?
        };
        let id = repo.id();
        let same = {
            let open = self.open.lock().await;
            self.rows()?.into_iter().find(|(n, s, _)| {
                s.repository.as_deref() == Some(id.as_str())
                    || open.get(n).is_some_and(|r| r.id() == id)
            })
        };
        if let Some((other, s, _)) = same {
            let target = format!("{target}, the same repository as {}", self.target(&s));
            return Err(same_target(other, &s, &settings, target).into());
        }
        settings.repository = Some(id);
        self.write_secrets(&req.name, &secrets)?;
        let created = now();
        if let Err(e) = self
            .db
            .insert_location(&req.name, &encode(&req.name, &settings)?, &created)
        {
            let _ = std::fs::remove_file(self.secrets_path(&req.name));
            return Err(e.into());
        }
        self.open.lock().await.insert(req.name.clone(), repo);
        tracing::info!(location = %req.name, %provider, encrypted = settings.encryption, "credentials created");
        Ok(self.to_api(&req.name, &settings, &created))
    }

    /// Builds the store and opens the repository; with `probe`, first
    /// proves the store works with a round trip; with `init`, a missing
    /// repository is created.
    /// With `probe`, `s.conditional` is set to what the probe found.
    async fn connect(
        &self,
        name: &str,
        s: &mut Settings,
        secrets: &Secrets,
        init: bool,
        probe: bool,
    ) -> Result<Arc<Repo>, CloudError> {
        let prefix = s.prefix.clone().unwrap_or_default();
        if probe {
            s.conditional = None;
            let store = self.build_store(name, s, secrets, init)?;
            if !init {
                // An existing location's repository must be there before
                // the probe writes anything (an empty mount point).
                let config = object_store::path::Path::from(
                    format!("{}/config", prefix.trim_matches('/')).trim_start_matches('/'),
                );
                if let Err(object_store::Error::NotFound { .. }) =
                    first_answer(name, store.head(&config)).await?
                {
                    return Err(RepoError::Gone {
                        location: name.to_string(),
                    }
                    .into());
                }
            }
            let honoured = Self::probe(&store, &prefix, name).await?;
            s.conditional = Some(honoured);
            if !honoured {
                tracing::warn!(location = %name, "the store ignores conditional writes: creates are checked with a HEAD first (safety does not depend on them)");
            }
        }
        let store = self.build_store(name, s, secrets, init)?;
        let repo = Repo::open(
            store,
            &prefix,
            name,
            secrets.passphrase.as_ref().map(Secret::expose),
            s.storage_class.clone(),
            init,
        )
        .await?;
        let repo = match self.objects_under_prefix(s) {
            Some(dir) => repo.with_local_dir(dir),
            None => repo,
        };
        Ok(Arc::new(if s.read_only { repo.read_only() } else { repo }))
    }

    /// Deletes a location (its objects stay in the bucket).
    ///
    /// # Errors
    /// Unknown name; `local`.
    pub async fn delete(&self, name: &str) -> Result<(), CloudError> {
        if name == LOCAL_LOCATION {
            return Err(LocationError::Embedded.into());
        }
        // Tasks and mounts hold the location shared: deleting it waits for
        // none of them, it is refused while any runs.
        let _claim = self.claims.acquire(Want::for_location_delete(name))?;
        match self.db.delete_location(name)? {
            Ok(true) => {}
            Ok(false) => {
                return Err(LocationError::NotFound {
                    name: name.to_string(),
                }
                .into())
            }
            Err(schedules) => {
                return Err(LocationError::Scheduled {
                    name: name.to_string(),
                    schedules: schedules.join(", "),
                }
                .into())
            }
        }
        let _ = std::fs::remove_file(self.secrets_path(name));
        self.open.lock().await.remove(name);
        tracing::info!(location = %name, "credentials deleted");
        Ok(())
    }

    /// Re-validates a location from scratch (round trip and keys).
    ///
    /// # Errors
    /// What [`Locations::create`] checks.
    pub async fn validate(&self, name: &str) -> Result<Location, CloudError> {
        let (n, mut s, created) = self.row(name)?;
        let secrets = self.read_secrets(&n)?;
        let before = s.conditional;
        let probe = !s.read_only;
        // The probe waits for its first answer only so long; without one
        // (read-only keys), the open's first read does.
        let connect = self.connect(&n, &mut s, &secrets, false, probe);
        let repo = if probe {
            connect.await?
        } else {
            first_answer(&n, connect).await??
        };
        let mut open = self.open.lock().await;
        let id = Some(repo.id());
        if s.conditional != before || s.repository != id {
            s.repository = id;
            self.db.update_location(&n, &encode(&n, &s)?)?;
        }
        open.insert(n.clone(), repo);
        Ok(self.to_api(&n, &s, &created))
    }

    /// Refuses read-only credentials for `what` (e.g. "take backups"),
    /// before anything is claimed, frozen or read.
    ///
    /// # Errors
    /// Read-only credentials; an unknown location.
    pub fn writable(&self, name: &str, what: &'static str) -> Result<(), CloudError> {
        let (n, s, _) = self.row(name)?;
        if s.read_only {
            return Err(LocationError::ReadOnly { name: n, what }.into());
        }
        Ok(())
    }

    /// Checks, before what it writes with its keys is committed, that
    /// `repo` (location `name`, opened) still has the config it was
    /// opened with: a config replaced since (two hosts initialising one
    /// repository at once on a store without conditional writes) would
    /// leave objects nobody can read. A changed one is forgotten, so the
    /// next use opens the repository again. One GET.
    ///
    /// # Errors
    /// A changed, missing or unreadable config; provider errors.
    pub async fn check_keys(&self, name: &str, repo: &Repo) -> Result<(), CloudError> {
        if let Err(e) = repo.check_config().await {
            if !e.transient() {
                self.open.lock().await.remove(name);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// The opened repository of a location (opened on first use).
    ///
    /// # Errors
    /// Unknown location; provider or key errors.
    pub async fn repo(&self, name: &str) -> Result<Arc<Repo>, CloudError> {
        let mut open = self.open.lock().await;
        if let Some(r) = open.get(name) {
            return Ok(r.clone());
        }
        let (n, mut s, _) = self.row(name)?;
        let secrets = self.read_secrets(&n)?;
        // Only the embedded location may be initialised on first use: the
        // first time, or once its directory was removed (a way to start it
        // afresh). An empty directory where its repository was is gone,
        // not new: an unmounted mount point.
        let init = n == LOCAL_LOCATION && (s.repository.is_none() || !self.local_root(&s).exists());
        let repo = self.connect(&n, &mut s, &secrets, init, false).await?;
        // Its identity, for the check at create (a location created
        // before identities were recorded, or `local` before its first
        // use). A different one is a repository made anew at the same
        // address (a wiped bucket or directory initialised again).
        let id = repo.id();
        if s.repository.as_deref() != Some(id.as_str()) {
            if s.repository.is_some() {
                tracing::warn!(location = %n, "the repository at this location is not the one first recorded: it was made anew at the same address");
            }
            // Two locations made by an earlier blockd may name one
            // repository; that is found only now.
            if let Some((other, ..)) = self
                .rows()?
                .into_iter()
                .find(|(o, r, _)| *o != n && r.repository.as_deref() == Some(id.as_str()))
            {
                tracing::warn!(location = %n, other = %other, "these two locations name the same repository: what one is restoring or mounting is not guarded under the other; delete one (`blockctl credentials delete NAME`)");
            }
            s.repository = Some(id);
            if let Err(e) = encode(&n, &s)
                .map_err(CloudError::from)
                .and_then(|c| Ok(self.db.update_location(&n, &c)?))
            {
                tracing::warn!(location = %n, error = %e, "recording the repository's identity failed");
            }
        }
        open.insert(n, repo.clone());
        Ok(repo)
    }
}

/// The refusal of a second name (`new`) for the repository `other`
/// (`theirs`) names: use `other`, unless only it can write nothing.
fn same_target(other: String, theirs: &Settings, new: &Settings, target: String) -> LocationError {
    if theirs.read_only && !new.read_only {
        LocationError::SameTargetReadOnly { other, target }
    } else {
        LocationError::SameTarget { other, target }
    }
}

/// True when `e` refuses a write for want of permission: the provider's
/// 401 or 403, or a local directory that is read-only or not writable.
fn write_refused(e: &object_store::Error) -> bool {
    if matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// An S3 location's endpoint as a URL: one given without a scheme is
/// `http://` with `--disable-ssl`, else `https://`.
fn s3_endpoint(s: &Settings) -> Option<String> {
    s.endpoint.as_deref().map(|e| {
        if e.contains("://") {
            e.to_string()
        } else if s.disable_ssl {
            format!("http://{e}")
        } else {
            format!("https://{e}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locations() -> (tempfile::TempDir, Locations) {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(StateDb::open(dir.path()).unwrap());
        let l = Locations::open(dir.path(), db, crate::claims::Claims::new(), None).unwrap();
        (dir, l)
    }

    /// One S3 bucket spelled several ways is one repository: with or
    /// without the scheme the store would take, a trailing slash, in
    /// either case; another scheme or port is another endpoint.
    #[test]
    fn s3_endpoints_are_compared_as_the_store_takes_them() {
        let (_dir, l) = locations();
        let at = |endpoint: &str, disable_ssl: bool| {
            l.target(&Settings {
                provider: Some(Provider::S3),
                bucket: Some("b".into()),
                endpoint: Some(endpoint.into()),
                disable_ssl,
                ..Settings::default()
            })
        };
        let one = at("http://127.0.0.1:3900", true);
        for same in [
            at("127.0.0.1:3900/", true),
            at("HTTP://127.0.0.1:3900/", false),
            at("http://127.0.0.1:3900", false),
        ] {
            assert_eq!(same, one);
        }
        assert_ne!(
            at("127.0.0.1:3900", false),
            one,
            "https is another endpoint"
        );
        assert_ne!(at("http://127.0.0.1:3901", true), one);
    }

    #[test]
    fn google_config_path_builds_from_flags() {
        // No GCS server runs here: check that the flags become a store
        // (object_store's config path), and that a bad key file is refused.
        let (dir, l) = locations();
        // A throwaway key generated for this test only (never valid anywhere).
        let key = include_str!("../../../tests/fixtures/gcs-test-service-account.json").to_string();
        let s = Settings {
            provider: Some(Provider::Google),
            bucket: Some("b".into()),
            project: Some("blockd-test".into()),
            ..Settings::default()
        };
        let secrets = Secrets {
            google_key: Some(Secret::from(key)),
            ..Secrets::default()
        };
        let store = l.build_store("g", &s, &secrets, true).unwrap();
        assert!(store.to_string().contains("GoogleCloudStorage"), "{store}");
        let bad = Secrets {
            google_key: Some(Secret::from("{}".to_string())),
            ..Secrets::default()
        };
        assert!(l.build_store("g", &s, &bad, true).is_err());
        drop(dir);
    }

    #[tokio::test]
    async fn local_location_exists_and_resolves() {
        let (_dir, l) = locations();
        assert_eq!(l.resolve(None).unwrap(), "local");
        assert!(l.resolve(Some("nope")).is_err());
        let repo = l.repo("local").await.unwrap();
        assert!(!repo.keys.encrypted());
        assert!(l.delete("local").await.is_err());
    }

    /// Read-only credentials need a repository already there, write
    /// nothing through any path (the refusal is below every caller), and
    /// are refused for what writes before it starts.
    #[tokio::test]
    async fn read_only_credentials_write_nothing() {
        let (_dir, l) = locations();
        let bucket = tempfile::tempdir().unwrap();
        let mk = |name: &str, sub: &str, read_only: bool| CreateLocation {
            name: name.into(),
            provider: Some(Provider::Local),
            path: Some(bucket.path().join(sub).display().to_string()),
            read_only,
            ..CreateLocation::default()
        };
        let e = l.create(mk("ro", "empty", true)).await.unwrap_err();
        assert!(e.to_string().contains("no repository here"), "{e}");
        assert!(
            std::fs::read_dir(bucket.path().join("empty")).map_or(true, |mut d| d.next().is_none()),
            "nothing written where there was no repository"
        );
        l.create(mk("rw", "repo", false)).await.unwrap();
        l.delete("rw").await.unwrap();
        let loc = l.create(mk("ro", "repo", true)).await.unwrap();
        assert!(loc.read_only);
        let files = || files_in(&bucket.path().join("repo"));
        let before = files();
        let e = l.writable("ro", "take backups").unwrap_err().to_string();
        assert!(
            e.contains("cannot take backups") && e.contains("--read-only"),
            "{e}"
        );
        let repo = l.repo("ro").await.unwrap();
        assert!(repo.is_read_only());
        let e = repo
            .put_pack(&[7; 16], bytes::Bytes::from_static(b"x"))
            .await;
        assert!(
            matches!(e, Err(crate::repo::RepoError::ReadOnly { .. })),
            "{e:?}"
        );
        let lease = crate::repo::gc::Lease::take(&repo, "t1", "h", Duration::from_secs(60))
            .await
            .unwrap();
        lease.release().await;
        l.validate("ro").await.unwrap();
        assert_eq!(
            files(),
            before,
            "nothing written through read-only credentials"
        );
        // A second name for the repository is still refused: one that
        // could write is told to delete the read-only one first, another
        // read-only one to use it.
        let e = l.create(mk("rw2", "repo", false)).await.unwrap_err();
        assert!(e.to_string().contains("credentials delete ro"), "{e}");
        let e = l.create(mk("ro2", "repo", true)).await.unwrap_err();
        assert!(e.to_string().contains("--cred-id ro"), "{e}");
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn passphrase_checked_at_create() {
        let (dir, l) = locations();
        // Outside the state dir (a location inside it is refused).
        let bucket = tempfile::tempdir().unwrap();
        let path = bucket.path().join("enc").display().to_string();
        let mk = |name: &str, pass: Option<&str>| CreateLocation {
            name: name.into(),
            provider: Some(Provider::Local),
            path: Some(path.clone()),
            encryption_passphrase: pass.map(|p| Secret::from(p.to_string())),
            ..CreateLocation::default()
        };
        let loc = l.create(mk("enc", Some("secret one"))).await.unwrap();
        assert!(loc.encryption);
        // Secrets are not in the database and the file is 0600.
        let mode = std::fs::metadata(dir.path().join("credentials/enc.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let rows = l.db.locations().unwrap();
        assert!(!rows.iter().any(|r| r.1.contains("secret one")));
        assert!(l
            .resolve(None)
            .unwrap_err()
            .to_string()
            .contains("--cred-id"));
        // While it has a name, a second one is refused before anything else.
        let e = l.create(mk("enc2", Some("secret one"))).await.unwrap_err();
        assert!(e.to_string().contains("--cred-id enc"), "{e}");
        // Once the name is gone, the repository checks the passphrase.
        l.delete("enc").await.unwrap();
        let e = l
            .create(mk("enc2", Some("wrong")))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("wrong encryption passphrase"), "{e}");
        let e = l.create(mk("enc3", None)).await.unwrap_err().to_string();
        assert!(e.contains("encrypted"), "{e}");
        l.create(mk("enc4", Some("secret one"))).await.unwrap();
    }
}
