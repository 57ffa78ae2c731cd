//! The registry of catalog mounts: mounting a location's catalog at a
//! directory (with its claim on the location), listing, unmounting (busy
//! mounts refused), and detaching everything at shutdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockd_api::mount::{MountInfo, MountRequest, DEFAULT_CACHE_SIZE, FUSE_NAME};
use fuser::{BackgroundSession, MountOption, SessionACL};
use tokio::runtime::Handle;

use super::cache::ChunkCache;
use super::{lock, Catalog, CatalogFs, FUSE_THREADS, KERNEL_READ_AHEAD_KB, MIN_CACHE};
use crate::claims::{Claim, Claims, Want};
use crate::cloud::locations::Locations;
use crate::cloud::CloudError;
use crate::outcome::Outcome;

/// Why a mount request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// Nothing mounted there.
    #[error("{0}")]
    NotFound(String),
    /// Already mounted, or busy.
    #[error("{0}")]
    Conflict(String),
    /// The location could not be opened.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The mount itself failed.
    #[error("{0}")]
    Internal(String),
}

impl MountError {
    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Invalid(_) => Outcome::Invalid,
            Self::NotFound(_) => Outcome::NotFound,
            Self::Conflict(_) => Outcome::Conflict,
            Self::Cloud(c) => c.outcome(),
            Self::Internal(_) => Outcome::Failed,
        }
    }
}

/// One active mount.
struct Active {
    info: MountInfo,
    /// Holds the location: its credentials cannot be deleted while mounted.
    _claim: Claim,
    session: BackgroundSession,
    catalog: Arc<Catalog>,
}

/// The catalog mounts of this daemon.
pub struct Mounts {
    cache_root: PathBuf,
    claims: Arc<Claims>,
    active: Mutex<BTreeMap<String, Active>>,
    /// Serialises mounting and unmounting.
    changing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounts")
            .field("cache_root", &self.cache_root)
            .finish_non_exhaustive()
    }
}

impl Mounts {
    /// No mounts yet; caches go under `<state dir>/cache/mounts`.
    pub fn new(state_dir: &Path, claims: Arc<Claims>) -> Self {
        Self {
            cache_root: state_dir.join("cache").join("mounts"),
            claims,
            active: Mutex::new(BTreeMap::new()),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// The mounts, by directory.
    pub fn list(&self) -> Vec<MountInfo> {
        lock(&self.active)
            .values()
            .map(|a| a.info.clone())
            .collect()
    }

    /// Mounts a location's catalog at `req.dir`.
    ///
    /// # Errors
    /// A missing directory, one already mounted, an unknown location or
    /// one whose repository does not open, a failing mount.
    pub async fn mount(
        &self,
        req: MountRequest,
        locations: &Locations,
    ) -> Result<MountInfo, MountError> {
        let _one = self.changing.lock().await;
        let dir = std::fs::canonicalize(&req.dir).map_err(|e| {
            MountError::Invalid(format!(
                "cannot mount at {}: {e}; create the directory first (mkdir -p {})",
                req.dir, req.dir
            ))
        })?;
        if !dir.is_dir() {
            return Err(MountError::Invalid(format!(
                "cannot mount at {}: not a directory; give an empty directory",
                dir.display()
            )));
        }
        let dir_s = dir.display().to_string();
        if lock(&self.active).contains_key(&dir_s) {
            return Err(MountError::Conflict(format!(
                "{dir_s} is already a blockd catalog mount: use it, or `blockctl umount {dir_s}` first"
            )));
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if blockd_api::mount::is_catalog_mount(&mounts, &dir_s) {
            return Err(MountError::Conflict(format!(
                "{dir_s} is already a blockd catalog mount (left by an earlier blockd?): `blockctl umount {dir_s}` first"
            )));
        }
        let cache_size = req.cache_size.unwrap_or(DEFAULT_CACHE_SIZE);
        if cache_size < MIN_CACHE {
            return Err(MountError::Invalid(format!(
                "cache size {cache_size} is too small: give at least 1M (e.g. --cache-size 2G)"
            )));
        }
        let location = locations.resolve(req.location.as_deref())?;
        let claim = self
            .claims
            .acquire(Want::for_mount(&location, &dir_s))
            .map_err(CloudError::from)?;
        let repo = locations.repo(&location).await?;
        // An unreachable store fails the request rather than the first `ls`.
        repo.list_snapshots(None).await.map_err(CloudError::from)?;
        let cache_dir = self
            .cache_root
            .join(&hex::encode(blake3::hash(dir_s.as_bytes()).as_bytes())[..16]);
        let cache = ChunkCache::new(cache_dir.clone(), cache_size, repo.clone()).map_err(|e| {
            MountError::Internal(format!(
                "cannot prepare the chunk cache {}: {e}",
                cache_dir.display()
            ))
        })?;
        let catalog = Arc::new(Catalog::new(
            repo,
            location.clone(),
            cache,
            self.claims.clone(),
            dir_s.clone(),
        ));

        let mut options = vec![
            MountOption::FSName(format!("{FUSE_NAME}:{location}")),
            // A kernel option (not only a fusermount one), so the type
            // column reads fuse.blockd on direct mounts too.
            MountOption::CUSTOM(format!("subtype={FUSE_NAME}")),
            MountOption::RO,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoAtime,
            MountOption::DefaultPermissions,
        ];
        if req.allow_other {
            options.push(MountOption::CUSTOM("allow_other".into()));
        }
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.acl = if req.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        let fs = CatalogFs {
            catalog: catalog.clone(),
            rt: Handle::current(),
        };
        let at = dir.clone();
        let session = tokio::task::spawn_blocking(move || {
            fuser::Session::new(fs, &at, &config).and_then(fuser::Session::spawn)
        })
        .await
        .map_err(|e| MountError::Internal(e.to_string()))?
        .map_err(|e| {
            catalog.cache.close();
            MountError::Internal(format!("mounting at {dir_s} failed: {e}"))
        })?;
        raise_read_ahead(&dir);
        let info = MountInfo {
            dir: dir_s.clone(),
            location: location.clone(),
            cache_size,
            allow_other: req.allow_other,
        };
        tracing::info!(dir = %dir_s, %location, cache_size, allow_other = req.allow_other, "catalog mounted");
        lock(&self.active).insert(
            dir_s,
            Active {
                info: info.clone(),
                _claim: claim,
                session,
                catalog,
            },
        );
        Ok(info)
    }

    /// Unmounts `dir`; refused while something (a loop device, a shell)
    /// still uses it.
    ///
    /// # Errors
    /// Not a mount of this daemon; busy.
    pub async fn unmount(&self, dir: &str) -> Result<(), MountError> {
        let _one = self.changing.lock().await;
        let key = std::fs::canonicalize(dir)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| dir.to_string());
        let Some(active) = lock(&self.active).remove(&key) else {
            return Err(MountError::NotFound(format!(
                "{dir} is not a blockd catalog mount of this daemon (see `blockctl mount` listings with GET /v1/mounts)"
            )));
        };
        let at = PathBuf::from(&key);
        let detached = tokio::task::spawn_blocking(move || detach(&at, false))
            .await
            .map_err(|e| MountError::Internal(e.to_string()))?;
        if let Err(e) = detached {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            lock(&self.active).insert(key.clone(), active);
            return Err(if busy {
                MountError::Conflict(format!(
                    "{key} is busy: unmount what is mounted from it (e.g. the loop mount of a disk.img) and leave the directory, then retry"
                ))
            } else {
                MountError::Internal(format!("unmounting {key} failed: {e}"))
            });
        }
        finish(active, &key).await;
        Ok(())
    }

    /// Unmounts everything (daemon shutdown); a busy mount is detached
    /// lazily, so its users see "Transport endpoint is not connected".
    pub async fn unmount_all(&self) {
        let _one = self.changing.lock().await;
        let all: Vec<(String, Active)> = std::mem::take(&mut *lock(&self.active))
            .into_iter()
            .collect();
        for (key, active) in all {
            let at = PathBuf::from(&key);
            let clean = tokio::task::spawn_blocking(move || match detach(&at, false) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(dir = %at.display(), error = %e, "catalog mount busy at shutdown: detaching it lazily");
                    if let Err(e) = detach(&at, true) {
                        tracing::warn!(dir = %at.display(), error = %e, "detaching the catalog mount failed");
                    }
                    false
                }
            })
            .await
            .unwrap_or(false);
            if clean {
                finish(active, &key).await;
            } else {
                active.catalog.cache.close();
                // Its threads serve the detached mount's last users until
                // the process exits; dropping the session would try to
                // unmount the path again.
                std::mem::forget(active.session);
                tracing::info!(dir = %key, "catalog detached");
            }
        }
    }
}

/// After the kernel let go: ends the session, drops the cache.
async fn finish(active: Active, key: &str) {
    let Active {
        session, catalog, ..
    } = active;
    // The session's own unmount finds nothing left to unmount (its error is
    // expected); its threads have seen the connection end.
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || session.umount_and_join()),
    )
    .await;
    if ended.is_err() {
        tracing::warn!(
            dir = key,
            "the FUSE session of an unmounted catalog did not end"
        );
    }
    catalog.cache.close();
    tracing::info!(dir = %key, "catalog unmounted");
}

/// Unmounts `dir` (lazily: detached now, gone when unused). Root unmounts
/// directly; anyone else goes through `fusermount3 -u`.
fn detach(dir: &Path, lazy: bool) -> std::io::Result<()> {
    let flags = if lazy {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    match rustix::mount::unmount(dir, flags) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => {
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let out = cmd.arg(dir).output()?;
            if out.status.success() {
                Ok(())
            } else {
                Err(std::io::Error::other(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Raises the kernel read-ahead of the mount at `dir` (its backing device
/// info is named after the anonymous device number): the default 128 KiB
/// turns a sequential read into many small FUSE requests. Best effort.
fn raise_read_ahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return;
    };
    let dev = meta.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, KERNEL_READ_AHEAD_KB.to_string()) {
        tracing::debug!(path, error = %e, "kernel read-ahead left at its default");
    }
}
