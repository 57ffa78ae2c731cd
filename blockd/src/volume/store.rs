//! The local volume store: data files under `<state dir>/volumes/` and their
//! rows in the state database.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use blockd_api::{validate_extent_size, validate_name, CreateVolume, DEFAULT_EXTENT_SIZE};

use super::dirty_map::{DirtyMap, MapFileError, Recovery};
use super::{Engine, Volume, VolumeMeta};
use crate::outcome::Outcome;
use crate::state::{StateDb, StateError};

/// Store errors, each naming the volume.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such volume.
    #[error("volume {volume:?} not found: list volumes with `blockctl volume list`")]
    NotFound {
        /// Name asked for.
        volume: String,
    },
    /// Name taken.
    #[error("volume {volume:?} already exists: pick another name or delete it first")]
    Exists {
        /// Name asked for.
        volume: String,
    },
    /// Bad request.
    #[error("{message}")]
    Invalid {
        /// What is wrong and what to do.
        message: String,
    },
    /// The file system holding the volumes refuses a file this large.
    #[error(
        "the file system holding {dir} cannot store a file of {size} bytes \
         (ext4 stops at 16 TiB with 4 KiB blocks): put the state dir on XFS or btrfs, \
         or create a smaller volume"
    )]
    TooLarge {
        /// The volumes' directory.
        dir: String,
        /// Size asked for.
        size: u64,
    },
    /// Open connections prevent deletion.
    #[error("volume {volume:?} has {connections} open NBD connection(s): disconnect the clients or delete with --force")]
    Busy {
        /// Volume.
        volume: String,
        /// Open connections.
        connections: u64,
    },
    /// Resize would shrink.
    #[error("volume {volume:?} is {current} bytes; shrinking to {requested} would destroy data and is not supported (only growing is): create a new volume of the smaller size (`blockctl volume create`) and copy into it what it must hold")]
    Shrink {
        /// Volume.
        volume: String,
        /// Current size.
        current: u64,
        /// Requested size.
        requested: u64,
    },
    /// A restore fills the volume, or left it incomplete, or its data file
    /// is missing: it cannot change size.
    #[error("volume {volume} cannot be resized: {why}")]
    Withheld {
        /// Volume.
        volume: String,
        /// Why it is withheld.
        why: String,
    },
    /// Data file I/O failed.
    #[error("volume {volume:?}: {path}: {source}")]
    Io {
        /// Volume.
        volume: String,
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// State database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The dirty map file failed.
    #[error(transparent)]
    DirtyMap(#[from] MapFileError),
}

impl StoreError {
    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::NotFound { .. } => Outcome::NotFound,
            Self::Exists { .. } | Self::Busy { .. } | Self::Withheld { .. } => Outcome::Conflict,
            Self::Invalid { .. } | Self::Shrink { .. } => Outcome::Invalid,
            Self::TooLarge { .. } => Outcome::Refused,
            Self::Io { .. } | Self::State(_) | Self::DirtyMap(_) => Outcome::Failed,
        }
    }
}

/// The volume `name` of `volumes`, or the error that names it.
fn found(volumes: &BTreeMap<String, Arc<Volume>>, name: &str) -> Result<Arc<Volume>, StoreError> {
    volumes
        .get(name)
        .cloned()
        .ok_or_else(|| StoreError::NotFound {
            volume: name.into(),
        })
}

/// All volumes of this daemon.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    db: Arc<StateDb>,
    engine: Arc<Engine>,
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    tracking: bool,
}

/// Largest volume size accepted: 64 TiB, the largest EBS volume, at any
/// extent size (the dirty map and the COW index number extents in 64 bits).
/// What sets it: a lazy restore's present map counts 64 KiB units in 32
/// bits (256 TiB), a held snapshot preserves at most 2^32 extents, and the
/// benchmarks that show costs following data rather than size stop here.
/// The file system of the state dir may stop earlier (ext4: 16 TiB with
/// 4 KiB blocks); that is refused at create with the reason.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

impl Store {
    /// Opens the store in `state_dir`, loading every volume.
    ///
    /// # Errors
    /// When the database or a data file cannot be opened.
    pub fn open(state_dir: &Path, engine: Arc<Engine>, tracking: bool) -> Result<Self, StoreError> {
        let dir = state_dir.join("volumes");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            volume: String::new(),
            path: dir.display().to_string(),
            source,
        })?;
        let db = Arc::new(StateDb::open(state_dir)?);
        let mut volumes = BTreeMap::new();
        for mut meta in db.volumes()? {
            let path = dir.join(format!("{}.img", meta.name));
            let file = match open_data(&path) {
                Ok(f) => f,
                // One volume's missing file takes only that volume out:
                // the rest are served, and this one is listed with why.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let reason = format!(
                        "its data file {} is missing (removed outside blockd): put it back and restart blockd, or delete the volume (`blockctl volume delete {}`)",
                        path.display(),
                        meta.name
                    );
                    tracing::error!(volume = %meta.name, %reason, "volume not exported");
                    meta.withheld = Some(crate::state::Withheld { reason, task: None });
                    placeholder().map_err(|source| StoreError::Io {
                        volume: meta.name.clone(),
                        path: path.display().to_string(),
                        source,
                    })?
                }
                Err(source) => {
                    return Err(StoreError::Io {
                        volume: meta.name.clone(),
                        path: path.display().to_string(),
                        source,
                    })
                }
            };
            let (dirty, recovery) =
                DirtyMap::open(&dirty_path(&dir, &meta.name), meta.extent_size)?;
            match recovery {
                Recovery::Clean => {}
                Recovery::Unclean => tracing::warn!(
                    volume = %meta.name,
                    "change tracking lost after unclean shutdown: the next backup reads the whole volume"
                ),
                Recovery::Missing | Recovery::Corrupt => tracing::warn!(
                    volume = %meta.name,
                    ?recovery,
                    "no usable dirty map: the next backup reads the whole volume"
                ),
            }
            if !tracking {
                dirty.disable();
            }
            let name = meta.name.clone();
            volumes.insert(
                name,
                Arc::new(Volume::new(meta, file, dirty, engine.clone())),
            );
        }
        tracing::info!(volumes = volumes.len(), "volume store opened");
        Ok(Self {
            dir,
            db,
            engine,
            volumes: RwLock::new(volumes),
            tracking,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Volume>>> {
        self.volumes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Volume>>> {
        self.volumes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Volume `name`'s data file.
    pub fn data_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    /// The state database.
    pub fn db(&self) -> &Arc<StateDb> {
        &self.db
    }

    /// One volume.
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.read().get(name).cloned()
    }

    /// Registers an open connection to `name`, under the same lock that
    /// [`Self::delete`] holds while it checks for connections: a volume
    /// is either deleted first (and `None` comes back) or counted busy
    /// first (and the delete is refused), never both.
    pub fn connect(&self, name: &str) -> Option<super::ConnectionGuard> {
        self.read()
            .get(name)
            .filter(|v| !v.refusing.load(std::sync::atomic::Ordering::SeqCst))
            .map(Volume::connect)
    }

    /// Refuses new connections to `name` from now on, unless it has open
    /// ones and not `force`: then returns how many. One step under the
    /// lock [`Self::connect`] counts under, so no client connects between
    /// the check and the refusal. [`Self::accept_connections`] undoes it.
    ///
    /// # Errors
    /// The open connections, without `force`.
    pub fn refuse_connections(&self, name: &str, force: bool) -> Result<(), u64> {
        let volumes = self.write();
        if let Some(v) = volumes.get(name) {
            let open = v.connections();
            if open > 0 && !force {
                return Err(open);
            }
            v.refusing.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// Accepts connections to `name` again.
    pub fn accept_connections(&self, name: &str) {
        if let Some(v) = self.read().get(name) {
            v.refusing.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Every volume, in name order.
    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.read().values().cloned().collect()
    }

    /// Creates a volume.
    ///
    /// # Errors
    /// Invalid name, size or extent size; duplicate name; I/O.
    pub fn create(&self, req: CreateVolume) -> Result<Arc<Volume>, StoreError> {
        self.create_withheld(req, None)
    }

    /// [`Self::create`] for a volume that is not exported from its first
    /// moment, for `withheld` (a restore's target): the reason is stored
    /// with the volume's row, in one transaction.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn create_withheld(
        &self,
        req: CreateVolume,
        withheld: Option<crate::state::Withheld>,
    ) -> Result<Arc<Volume>, StoreError> {
        check_name(&req.name)?;
        check_labels(&req.labels)?;
        let extent_size = req.extent_size.unwrap_or(DEFAULT_EXTENT_SIZE);
        validate_extent_size(extent_size).map_err(|message| StoreError::Invalid { message })?;
        check_size(req.size, extent_size, true)?;
        let mut volumes = self.write();
        if volumes.contains_key(&req.name) {
            return Err(StoreError::Exists { volume: req.name });
        }
        let path = self.data_path(&req.name);
        let io_err = |source| StoreError::Io {
            volume: req.name.clone(),
            path: path.display().to_string(),
            source,
        };
        // No row means any file of this name is an orphan of a crashed
        // create or delete: start it afresh. Whatever fails below, the
        // files made so far go again: a failed create leaves nothing.
        let dirty_file = dirty_path(&self.dir, &req.name);
        let made = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io_err)?;
            file.set_len(req.size)
                .map_err(|e| too_large(&self.dir, req.size, e).unwrap_or_else(io_err))?;
            file.sync_all().map_err(io_err)?;
            crate::durable::sync_dir(&self.dir).map_err(io_err)?;
            let dirty = DirtyMap::create(&dirty_file, extent_size)?;
            Ok::<_, StoreError>((file, dirty))
        })();
        let meta = VolumeMeta {
            name: req.name.clone(),
            size: req.size,
            extent_size,
            labels: req.labels,
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            withheld,
        };
        let made = made.and_then(|fd| {
            self.db.insert_volume(&meta)?;
            Ok(fd)
        });
        let (file, dirty) = match made {
            Ok(fd) => fd,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&dirty_file);
                let _ = crate::durable::sync_dir(&self.dir);
                return Err(e);
            }
        };
        if !self.tracking {
            dirty.disable();
        }
        let volume = Arc::new(Volume::new(meta, file, dirty, self.engine.clone()));
        volumes.insert(req.name, volume.clone());
        tracing::info!(volume = %volume.name(), size = volume.size(), "volume created");
        Ok(volume)
    }

    /// Deletes a volume; with `force`, open connections are closed first.
    ///
    /// # Errors
    /// Unknown volume; open connections without `force`; I/O.
    pub fn delete(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let mut volumes = self.write();
        let volume = found(&volumes, name)?;
        let connections = volume.connections();
        if connections > 0 && !force {
            return Err(StoreError::Busy {
                volume: name.into(),
                connections,
            });
        }
        volume.closing.cancel();
        self.db.delete_volume(name)?;
        volumes.remove(name);
        let path = self.data_path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    volume: name.into(),
                    path: path.display().to_string(),
                    source,
                })
            }
        }
        volume.dirty.forget();
        let _ = std::fs::remove_file(dirty_path(&self.dir, name));
        let _ = crate::volume::lazy::remove_present_unsynced(&self.present_path(name));
        // One sync for every name removed above.
        let _ = crate::durable::sync_dir(&self.dir);
        tracing::info!(volume = %name, force, "volume deleted");
        Ok(())
    }

    /// Stops exporting volume `name`, for the reason in `w`, also across
    /// restarts. Withheld in memory even when storing it fails (the error
    /// says so). Connections already open are the caller's to deal with.
    ///
    /// # Errors
    /// Unknown volume; the state database.
    pub fn withhold(&self, name: &str, w: crate::state::Withheld) -> Result<(), StoreError> {
        self.set_withheld(name, Some(w))
    }

    /// Exports volume `name` again: its restore is done. Cleared in the
    /// state database first; when that fails the volume is exported all
    /// the same, and the next start clears it (the restore's task is then
    /// Done: see `Cloud::open`).
    ///
    /// # Errors
    /// Unknown volume; the state database.
    pub fn release(&self, name: &str) -> Result<(), StoreError> {
        self.set_withheld(name, None)
    }

    /// [`Self::withhold`] or [`Self::release`]: the live volume changes
    /// whether or not the state database took it.
    fn set_withheld(
        &self,
        name: &str,
        w: Option<crate::state::Withheld>,
    ) -> Result<(), StoreError> {
        let volumes = self.read();
        let volume = found(&volumes, name)?;
        let stored = self.db.set_withheld(name, w.as_ref());
        volume.set_withheld(w);
        Ok(stored?)
    }

    /// Grows a volume.
    ///
    /// # Errors
    /// Unknown volume; a smaller size; I/O.
    pub fn resize(&self, name: &str, size: u64) -> Result<Arc<Volume>, StoreError> {
        let volumes = self.write();
        let volume = found(&volumes, name)?;
        if let Some(w) = volume.withheld_state() {
            return Err(StoreError::Withheld {
                volume: name.into(),
                why: w.reason,
            });
        }
        let current = volume.size();
        if size < current {
            return Err(StoreError::Shrink {
                volume: name.into(),
                current,
                requested: size,
            });
        }
        check_size(size, volume.extent_size(), false)?;
        volume.grow(size).map_err(|source| {
            too_large(&self.dir, size, source).unwrap_or_else(|source| StoreError::Io {
                volume: name.into(),
                path: self.data_path(name).display().to_string(),
                source,
            })
        })?;
        self.db.set_size(name, size)?;
        tracing::info!(volume = %name, size, "volume resized");
        Ok(volume)
    }

    /// Sets and removes labels of a volume in one step: the row and the
    /// live volume change together, under the lock every create, delete
    /// and resize takes, so two updates never lose one another's labels.
    ///
    /// # Errors
    /// Unknown volume; an empty key; state database errors.
    pub fn update_labels(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Arc<Volume>, StoreError> {
        let volumes = self.write();
        let volume = found(&volumes, name)?;
        check_labels(&set)?;
        if remove.iter().any(String::is_empty) {
            return Err(StoreError::Invalid {
                message: "a label key to remove is empty: name the key, e.g. --remove-label env"
                    .into(),
            });
        }
        let mut labels = volume.meta().labels;
        for k in remove {
            labels.remove(k);
        }
        labels.extend(set);
        self.db.set_labels(name, &labels)?;
        volume.set_labels(labels);
        tracing::info!(volume = %name, "volume labels changed");
        Ok(volume)
    }

    /// The names of the volumes that carry every label of `select`.
    pub fn carrying(&self, select: &BTreeMap<String, String>) -> Vec<String> {
        self.list()
            .iter()
            .filter(|v| {
                let labels = v.meta().labels;
                select.iter().all(|(k, val)| labels.get(k) == Some(val))
            })
            .map(|v| v.name().to_string())
            .collect()
    }

    /// Where a lazily restored volume keeps its present map.
    pub fn present_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.present"))
    }

    /// Settles the dirty map of every volume that has been idle for
    /// `idle` (see [`super::dirty_map`]): its data is synced, and the map
    /// is written as it would be at a clean shutdown, so a crash keeps its
    /// tracking. Called every second or so.
    pub fn settle(&self, idle: Duration) {
        for v in self.list() {
            match v.dirty.settle(idle, || v.sync_data()) {
                Ok(true) => tracing::debug!(volume = %v.name(), "dirty map settled"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(volume = %v.name(), error = %e, "settling the dirty map failed; it stays in use");
                }
            }
        }
    }

    /// Makes everything durable and marks the dirty maps clean (clean
    /// shutdown: only then are they trusted at the next start).
    pub fn sync_all(&self) {
        for v in self.list() {
            // The map is only trusted if the data it describes is on disk.
            if let Err(e) = v.sync_all() {
                tracing::error!(volume = %v.name(), error = %e, "fsync at shutdown failed; its dirty map stays in use");
                continue;
            }
            if let Err(e) = v.dirty.close() {
                tracing::error!(volume = %v.name(), error = %e, "persisting the dirty map failed");
            }
        }
        if let Err(e) = self.db.checkpoint() {
            tracing::warn!(error = %e, "state database checkpoint failed");
        }
    }
}

fn dirty_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.dirty"))
}

/// A volume size is a whole number of extents, at least one, at most
/// [`MAX_VOLUME_SIZE`]. `creating`: the extent size can still be chosen.
fn check_size(size: u64, extent_size: u64, creating: bool) -> Result<(), StoreError> {
    let message = if size == 0 {
        format!("a volume must hold at least one extent ({extent_size} bytes)")
    } else if size > MAX_VOLUME_SIZE {
        format!("volume size {size} is over the maximum of 64 TiB ({MAX_VOLUME_SIZE} bytes)")
    } else if !size.is_multiple_of(extent_size) {
        let below = size - size % extent_size;
        let above = below + extent_size;
        let sizes = if below == 0 {
            format!("{above}")
        } else {
            format!("{below} or {above}")
        };
        // The largest extent size that divides it, if there is one (512 B
        // at least): an extent size that does not cannot help.
        let fits = 1u64 << size.trailing_zeros();
        let smaller = if creating && fits >= 512 {
            format!(", or --extent-size {fits}")
        } else {
            String::new()
        };
        format!("volume size {size} must be a multiple of the extent size {extent_size}: give {sizes} bytes{smaller}")
    } else {
        return Ok(());
    };
    Err(StoreError::Invalid { message })
}

/// The file system's refusal of a file of `size` bytes (EFBIG), as an
/// error that says what to do; other errors come back as they are.
fn too_large(dir: &Path, size: u64, e: io::Error) -> Result<StoreError, io::Error> {
    if e.raw_os_error() != Some(libc::EFBIG) {
        return Err(e);
    }
    Ok(StoreError::TooLarge {
        dir: dir.display().to_string(),
        size,
    })
}

fn open_data(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// An empty anonymous file standing in for a data file that is missing:
/// the volume is withheld (never read or written as data), and nothing
/// is created in the state dir under its name.
fn placeholder() -> io::Result<File> {
    let fd = rustix::fs::memfd_create("blockd-missing-volume", rustix::fs::MemfdFlags::CLOEXEC)?;
    Ok(File::from(fd))
}

/// Refuses labels a user could not select or read back
/// ([`blockd_api::validate_label`]).
fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), StoreError> {
    for (k, v) in labels {
        blockd_api::validate_label(k, v).map_err(|message| StoreError::Invalid { message })?;
    }
    Ok(())
}

/// Refuses a name no volume may have, as [`Store::create`] does: for
/// callers that must refuse it before doing anything else.
///
/// # Errors
/// The name is invalid.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    validate_name(name).map_err(|e| StoreError::Invalid {
        message: e.to_string(),
    })
}
