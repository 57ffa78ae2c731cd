//! Volume operations whose rules span modules: creating, deleting and
//! resizing a volume must agree with snapshots being taken, backups and
//! restores running, and open connections. Each takes its claim (see
//! [`crate::claims`]) before it checks anything, so the check and the
//! action are one step.

use std::sync::Arc;

use blockd_api::CreateVolume;

use crate::claims::{Busy, Want};
use crate::daemon::Daemon;
use crate::outcome::Outcome;
use crate::volume::store::StoreError;
use crate::volume::Volume;

/// Why a volume operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeOpError {
    /// A snapshot, backup, restore or another request uses the volume.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The volume is attached as a kernel device; `--force` does not
    /// change that: a file system may be mounted on it.
    #[error("volume {volume:?} is attached as {device}: unmount what uses it and run `blockctl volume detach {volume}` first")]
    Attached {
        /// Volume.
        volume: String,
        /// Its device.
        device: String,
    },
    /// The volume is attached, and a device attached through netlink
    /// cannot change size (RECONFIGURE carries none, and the kernel refuses
    /// the size ioctl on such devices).
    #[error("volume {volume:?} is attached as {device}, whose size the kernel cannot change: unmount it, `blockctl volume detach {volume}`, resize, and attach it again")]
    AttachedResize {
        /// Volume.
        volume: String,
        /// Its device.
        device: String,
    },
    /// The volume has snapshots and `--force` was not given.
    #[error("volume {volume:?} has {count} snapshot(s): delete them first (`blockctl snapshot list {volume}`) or delete with --force, which deletes them too")]
    HasSnapshots {
        /// Volume.
        volume: String,
        /// Its snapshots.
        count: usize,
    },
    /// Schedules name the volume; `--force` does not change that: the
    /// schedules would fail at every run.
    #[error("volume {volume:?} is backed up by schedule(s) {schedules}: delete them first (`blockctl cloudsnap schedules delete --uuid ID`; `blockctl cloudsnap schedules list` shows them)")]
    Scheduled {
        /// Volume.
        volume: String,
        /// The schedules' ids, comma-separated.
        schedules: String,
    },
    /// The state database failed.
    #[error("reading the schedules: {0}")]
    Schedules(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VolumeOpError {
    /// What the error means to the caller.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Busy(_)
            | Self::HasSnapshots { .. }
            | Self::Attached { .. }
            | Self::AttachedResize { .. }
            | Self::Scheduled { .. } => Outcome::Conflict,
            Self::Schedules(_) => Outcome::Failed,
            Self::Store(s) => s.outcome(),
        }
    }
}

impl Daemon {
    /// Creates a volume.
    ///
    /// # Errors
    /// The name is being restored into or deleted; what the store checks.
    pub fn create_volume(&self, req: CreateVolume) -> Result<Arc<Volume>, VolumeOpError> {
        let _claim = self.claims.acquire(Want::for_volume_create(&req.name))?;
        Ok(self.store.create(req)?)
    }

    /// Deletes a volume and, with `force`, its snapshots and connections.
    ///
    /// # Errors
    /// Unknown volume; a snapshot, backup or restore using it; snapshots or
    /// connections without `force`.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<(), VolumeOpError> {
        let _claim = self.claims.acquire(Want::for_volume_delete(name))?;
        let v = self.store.get(name).ok_or(StoreError::NotFound {
            volume: name.into(),
        })?;
        // An attach holds a shared claim until its device is recorded, so
        // under this exclusive one the record is final.
        if let Some(device) = self.attachments.device_of(name) {
            return Err(VolumeOpError::Attached {
                volume: name.into(),
                device,
            });
        }
        if v.connections() > 0 && !force {
            return Err(StoreError::Busy {
                volume: name.into(),
                connections: v.connections(),
            }
            .into());
        }
        // Schedules are created under a shared claim of their volumes, so
        // under this exclusive one the list is final.
        let schedules = self
            .cloud
            .schedules_naming(name)
            .map_err(|e| VolumeOpError::Schedules(e.to_string()))?;
        if !schedules.is_empty() {
            return Err(VolumeOpError::Scheduled {
                volume: name.into(),
                schedules: schedules.join(", "),
            });
        }
        let count = self.snapshots.list(Some(name)).len();
        if count > 0 && !force {
            return Err(VolumeOpError::HasSnapshots {
                volume: name.into(),
                count,
            });
        }
        self.snapshots.delete_volume(name);
        self.store.delete(name, force)?;
        Ok(())
    }

    /// Attaches a volume as a kernel NBD device.
    ///
    /// # Errors
    /// The volume is being deleted; what [`crate::attach::Attachments::attach`]
    /// refuses.
    pub async fn attach_volume(
        &self,
        name: &str,
        req: &blockd_api::AttachRequest,
    ) -> Result<blockd_api::Attachment, crate::attach::AttachError> {
        let _claim = self.claims.acquire(Want::for_attach(name))?;
        self.attachments.attach(&self.nbd, name, req).await
    }

    /// Grows a volume.
    ///
    /// # Errors
    /// Unknown volume; a snapshot, backup or restore using it; a smaller size.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<Arc<Volume>, VolumeOpError> {
        let _claim = self
            .claims
            .acquire(Want::for_volume_change(name, "is being resized"))?;
        if let Some(device) = self.attachments.device_of(name) {
            return Err(VolumeOpError::AttachedResize {
                volume: name.into(),
                device,
            });
        }
        Ok(self.store.resize(name, size)?)
    }
}
