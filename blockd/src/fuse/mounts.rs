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
use super::namespace::CallerNs;
use super::{lock, Catalog, CatalogFs, FUSE_THREADS, KERNEL_READ_AHEAD_KB, MIN_CACHE};
use crate::claims::{Claim, Claims, Want};
use crate::cloud::{Cloud, CloudError};
use crate::outcome::Outcome;

/// Why a mount request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// The mount point cannot be used.
    #[error("cannot mount at {dir}: {reason}; create the directory first (mkdir -p {dir})")]
    NoDirectory {
        /// Mount point.
        dir: String,
        /// What the file system said.
        reason: String,
    },
    /// The mount point is a file.
    #[error("cannot mount at {dir}: not a directory; give an empty directory")]
    NotADirectory {
        /// Mount point.
        dir: String,
    },
    /// The directory holds files: a mount would hide them.
    #[error("cannot mount at {dir}: the directory is not empty (a mount would hide what is in it); give an empty directory")]
    NotEmpty {
        /// Mount point.
        dir: String,
    },
    /// The directory is the daemon's own, or holds or lies inside it: a
    /// mount there would hide the daemon's sockets and state from it.
    #[error("cannot mount at {dir}: it would hide blockd's own {what}; give an empty directory elsewhere, e.g. /mnt/snapshots")]
    DaemonPath {
        /// Mount point.
        dir: String,
        /// What it would hide (`state directory /var/lib/blockd`).
        what: String,
    },
    /// This daemon already mounts a catalog there.
    #[error("{dir} is already a blockd catalog mount: use it, or `blockctl umount {dir}` first")]
    AlreadyMounted {
        /// Mount point.
        dir: String,
    },
    /// A catalog mount of an earlier daemon is still there.
    #[error("{dir} is already a blockd catalog mount (left by an earlier blockd?): `blockctl umount {dir}` first")]
    StaleMount {
        /// Mount point.
        dir: String,
    },
    /// The cache cannot hold one chunk.
    #[error("cache size {size} is too small: give at least 1M (e.g. --cache-size 2G)")]
    CacheTooSmall {
        /// Size asked for.
        size: u64,
    },
    /// Nothing of this daemon is mounted there.
    #[error("{dir} is not a blockd catalog mount of this daemon (see `blockctl mount` listings with GET /v1/mounts)")]
    NotMounted {
        /// Directory given.
        dir: String,
    },
    /// Something still uses the mount.
    #[error("{dir} is busy: unmount what is mounted from it (e.g. the loop mount of a disk.img) and leave the directory, then retry")]
    Busy {
        /// Mount point.
        dir: String,
    },
    /// The caller is in a mount namespace the daemon cannot enter.
    #[error("{0}")]
    OtherNamespace(String),
    /// The location could not be opened.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// Mounting, unmounting or preparing the cache failed.
    #[error("{what} {dir} failed: {reason}")]
    Failed {
        /// What was being done.
        what: &'static str,
        /// Mount point (or cache directory).
        dir: String,
        /// Why.
        reason: String,
    },
}

impl MountError {
    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::CacheTooSmall { .. } | Self::NoDirectory { .. } | Self::NotADirectory { .. } => {
                Outcome::Invalid
            }
            Self::NotEmpty { .. } | Self::DaemonPath { .. } | Self::OtherNamespace(_) => {
                Outcome::Refused
            }
            Self::NotMounted { .. } => Outcome::NotFound,
            Self::AlreadyMounted { .. } | Self::StaleMount { .. } | Self::Busy { .. } => {
                Outcome::Conflict
            }
            Self::Cloud(c) => c.outcome(),
            Self::Failed { .. } => Outcome::Failed,
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
    /// The caller's mount namespace, when the mount was made there.
    ns: Option<CallerNs>,
}

/// The catalog mounts of this daemon.
pub struct Mounts {
    cache_root: PathBuf,
    /// The daemon's own paths (state dir, socket directories): no mount
    /// may cover them, or sit inside them.
    own: Vec<(String, PathBuf)>,
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
    /// No mounts yet; caches go under `<state dir>/cache/mounts`. `own`
    /// names the daemon's paths a mount must not hide, with what they are
    /// (`("state directory", STATE_DIR)`, `("API socket", ...)`).
    pub fn new(state_dir: &Path, own: Vec<(String, PathBuf)>, claims: Arc<Claims>) -> Self {
        let own = own
            .into_iter()
            .map(|(what, p)| {
                let p = std::fs::canonicalize(&p).unwrap_or(p);
                (format!("{what} {}", p.display()), p)
            })
            .collect();
        let cache_root = state_dir.join("cache").join("mounts");
        super::cache::discard_leftovers(&cache_root);
        Self {
            own,
            cache_root,
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

    /// Mounts a location's catalog at `req.dir`, in the mount namespace of
    /// process `caller` (see [`super::namespace`]).
    ///
    /// # Errors
    /// A missing directory, one already mounted, an unknown location or
    /// one whose repository does not open, a failing mount.
    pub async fn mount(
        &self,
        req: MountRequest,
        cloud: &Cloud,
        caller: Option<i32>,
    ) -> Result<MountInfo, MountError> {
        let _one = self.changing.lock().await;
        let ns = CallerNs::of(caller).map_err(MountError::OtherNamespace)?;
        let no_dir = |e: std::io::Error| MountError::NoDirectory {
            dir: req.dir.clone(),
            reason: e.to_string(),
        };
        // In the caller's namespace the path is the caller's (blockctl
        // sends it resolved); it is checked through /proc/PID/root.
        let (dir, seen) = match &ns {
            None => {
                let dir = std::fs::canonicalize(&req.dir).map_err(no_dir)?;
                (dir.clone(), dir)
            }
            Some(ns) => {
                let dir = PathBuf::from(&req.dir);
                if !dir.is_absolute() {
                    return Err(no_dir(std::io::Error::other("not an absolute path")));
                }
                let seen = ns.view(&dir);
                std::fs::metadata(&seen).map_err(no_dir)?;
                (dir, seen)
            }
        };
        if !seen.is_dir() {
            return Err(MountError::NotADirectory {
                dir: dir.display().to_string(),
            });
        }
        let dir_s = dir.display().to_string();
        if lock(&self.active).contains_key(&dir_s) {
            return Err(MountError::AlreadyMounted { dir: dir_s });
        }
        // Where the caller sees the daemon's own paths too (the same
        // namespace, or one that shares them).
        if let Some((what, _)) = self
            .own
            .iter()
            .find(|(_, p)| p.starts_with(&dir) || dir.starts_with(p))
        {
            return Err(MountError::DaemonPath {
                dir: dir_s,
                what: what.clone(),
            });
        }
        let mounts = match &ns {
            None => std::fs::read_to_string("/proc/self/mounts").unwrap_or_default(),
            Some(ns) => ns.mounts_table(),
        };
        if blockd_api::mount::is_catalog_mount(&mounts, &dir_s) {
            return Err(MountError::StaleMount { dir: dir_s });
        }
        if std::fs::read_dir(&seen).map_err(no_dir)?.next().is_some() {
            return Err(MountError::NotEmpty { dir: dir_s });
        }
        let cache_size = req.cache_size.unwrap_or(DEFAULT_CACHE_SIZE);
        if cache_size < MIN_CACHE {
            return Err(MountError::CacheTooSmall { size: cache_size });
        }
        let locations = &cloud.locations;
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
            MountError::Failed {
                what: "preparing the chunk cache",
                dir: cache_dir.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        let catalog = Arc::new(Catalog::new(
            repo,
            location.clone(),
            cache,
            self.claims.clone(),
            dir_s.clone(),
            cloud.lease_terms(),
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
        let caller_ns = ns;
        let (session, ns) = tokio::task::spawn_blocking(move || match caller_ns {
            None => fuser::Session::new(fs, &at, &config)
                .and_then(fuser::Session::spawn)
                .map(|s| (s, None)),
            Some(ns) => {
                let options = fusermount_options(&config.mount_options);
                let fd = ns.mount_fuse(&at, &options)?;
                let acl = config.acl;
                let session = fuser::Session::from_fd(fs, fd, acl, config)
                    .and_then(fuser::Session::spawn)
                    .inspect_err(|_| {
                        let _ = ns.unmount(&at, true);
                    })?;
                Ok((session, Some(ns)))
            }
        })
        .await
        .map_err(|e| MountError::Failed {
            what: "mounting at",
            dir: dir_s.clone(),
            reason: e.to_string(),
        })?
        .map_err(|e| {
            catalog.cache.close();
            MountError::Failed {
                what: "mounting at",
                dir: dir_s.clone(),
                reason: e.to_string(),
            }
        })?;
        raise_read_ahead(&seen);
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
                ns,
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
        let key = if lock(&self.active).contains_key(dir) {
            dir.to_string()
        } else {
            std::fs::canonicalize(dir)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| dir.to_string())
        };
        let Some(active) = lock(&self.active).remove(&key) else {
            return Err(MountError::NotMounted { dir: dir.into() });
        };
        let at = PathBuf::from(&key);
        let (active, detached) = tokio::task::spawn_blocking(move || {
            let r = detach(active.ns.as_ref(), &at, false);
            (active, r)
        })
        .await
        .map_err(|e| MountError::Failed {
            what: "unmounting",
            dir: key.clone(),
            reason: e.to_string(),
        })?;
        if let Err(e) = detached {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            lock(&self.active).insert(key.clone(), active);
            return Err(if busy {
                MountError::Busy { dir: key }
            } else {
                MountError::Failed {
                    what: "unmounting",
                    dir: key,
                    reason: e.to_string(),
                }
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
            let (active, clean) = tokio::task::spawn_blocking(move || {
                let ns = active.ns.as_ref();
                let clean = match detach(ns, &at, false) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(dir = %at.display(), error = %e, "catalog mount busy at shutdown: detaching it lazily");
                        if let Err(e) = detach(ns, &at, true) {
                            tracing::warn!(dir = %at.display(), error = %e, "detaching the catalog mount failed");
                        }
                        false
                    }
                };
                (active, clean)
            })
            .await
            .expect("unmount task");
            if clean {
                finish(active, &key).await;
            } else {
                active.catalog.cache.close();
                active.catalog.close_streams();
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
    catalog.close_streams();
    tracing::info!(dir = %key, "catalog unmounted");
}

/// Unmounts `dir` (lazily: detached now, gone when unused), in the
/// caller's namespace when it was mounted there. Root unmounts directly;
/// anyone else goes through `fusermount3 -u`.
fn detach(ns: Option<&CallerNs>, dir: &Path, lazy: bool) -> std::io::Result<()> {
    if let Some(ns) = ns {
        return ns.unmount(dir, lazy);
    }
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

/// The mount options as fusermount3 takes them (`-o a,b,c`).
fn fusermount_options(options: &[MountOption]) -> String {
    options
        .iter()
        .map(|o| match o {
            MountOption::FSName(n) => format!("fsname={n}"),
            MountOption::RO => "ro".into(),
            MountOption::NoSuid => "nosuid".into(),
            MountOption::NoDev => "nodev".into(),
            MountOption::NoAtime => "noatime".into(),
            MountOption::DefaultPermissions => "default_permissions".into(),
            MountOption::CUSTOM(c) => c.clone(),
            other => format!("{other:?}").to_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(",")
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
