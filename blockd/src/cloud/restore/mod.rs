//! Restores: the whole flow of `cloudsnap restore`, full ([`fill`]) or
//! lazy (served at once, filled by [`super::hydrate`]), with their claims,
//! records, resume and clean-up.

pub mod fill;

use std::collections::BTreeMap;
use std::sync::Arc;

use blockd_api::{RestoreRequest, Started, Task, TaskKind, TaskState};

use crate::claims::{Claim, Want};
use crate::repo::gc::Lease;
use crate::state::Withheld;

use super::hydrate;
use super::task::{new_task, new_task_id, Checkpoint, Plan, Progress, Record, Running};
use super::{Cloud, CloudError};

/// Why the target of restore `task` is withheld while the restore runs
/// (a lazy restore serves it meanwhile: then this shows only where the
/// volume is snapshotted or backed up).
pub(super) fn filling(task: &str, snapshot: &str, lazy: bool) -> Withheld {
    let reason = if lazy {
        format!("it is being restored lazily from {snapshot} by task {task}; it is whole once `blockctl cloudsnap status` shows that task Done")
    } else {
        format!("it is being restored from {snapshot} by task {task}; it is exported once `blockctl cloudsnap status` shows that task Done")
    };
    Withheld {
        reason,
        task: Some(task.to_string()),
    }
}

/// What is said of volume `volume` (data file `data`) once its restore
/// cannot go on: it holds part of a snapshot, and a lazy restore's target
/// its clients' writes too, so it is neither served as if it were whole
/// nor deleted behind the user's back.
pub(super) fn incomplete(volume: &str, data: &std::path::Path) -> String {
    format!(
        "the volume is incomplete and stays unexported (its data file, with any writes it took, is {}): delete it with `blockctl volume delete {volume}` and restore again",
        data.display()
    )
}

/// A lazy restore's present map and source.
pub(super) struct Hydration {
    pub(super) lazy: Arc<crate::volume::lazy::Lazy>,
    pub(super) source: Arc<hydrate::RepoSource>,
}

impl Cloud {
    /// Starts a full restore into a new volume.
    ///
    /// # Errors
    /// Unknown snapshot or location, an existing volume name.
    pub async fn restore(self: &Arc<Self>, req: RestoreRequest) -> Result<Started, CloudError> {
        // Before anything is looked up or written to the bucket.
        crate::volume::store::check_name(&req.volume)?;
        let location = self.locate(req.location.as_deref(), &req.snap).await?;
        let repo = self.locations.repo(&location).await?;
        if self.volumes.get(&req.volume).is_some() {
            return Err(CloudError::VolumeExists {
                volume: req.volume.clone(),
            });
        }
        let m = self.find(&repo, &req.snap).await?;
        let id = new_task_id();
        let snapshot = format!("{}/{}", m.volume, m.name);
        // Held until the task ends: the new volume's name, its job slot, the
        // location and the cloud snapshot being read (which therefore
        // cannot be deleted while the restore needs it).
        let claim = self.claims.acquire(Want::for_restore(
            &id,
            &req.volume,
            &location,
            &snapshot,
            req.lazy,
        ))?;
        // A delete that ended between `find` and the claim.
        self.locations.resolve(Some(&location))?;
        // The claim keeps this host from deleting the snapshot; the lease
        // keeps every host's collector from reclaiming what it references
        // should another host delete it. Taken before the manifest is
        // confirmed: a collector's walk that runs after this sees it. A
        // refusal from here on drops it, which removes it.
        //
        // A lazy restore reads the snapshot's index blocks meanwhile (for
        // at most PRELOAD_WAIT; its hydrator reads the rest first), so
        // that once it returns a client's first read waits for one GET,
        // of its data, and not for an index block first.
        let ready = hydrate::Ready::new(repo.clone(), m);
        let m = ready.manifest();
        let confirmed = async {
            let lease = Lease::take(&repo, &id, &self.host, self.lease_length()).await?;
            let found = repo.has_manifest(&m.volume, &m.name).await?;
            Ok::<_, CloudError>((lease, found))
        };
        let preload = async {
            if req.lazy {
                let _ = tokio::time::timeout(hydrate::PRELOAD_WAIT, ready.preload()).await;
            }
        };
        let (confirmed, ()) = tokio::join!(confirmed, preload);
        let (lease, found) = confirmed?;
        if !found {
            return Err(CloudError::SnapshotNotFound { snapshot, location });
        }
        // Withheld from its first moment, in the same step that creates
        // it: no client may connect to it (and write to it) before a lazy
        // restore serves it or before a full restore is done.
        let v = self.volumes.create_withheld(
            blockd_api::CreateVolume {
                name: req.volume.clone(),
                size: m.size,
                extent_size: Some(m.extent_size),
                labels: BTreeMap::new(),
            },
            Some(filling(&id, &snapshot, req.lazy)),
        )?;
        let task = Task {
            full: !req.lazy,
            lazy: req.lazy,
            ..new_task(
                id,
                TaskKind::Restore,
                &req.volume,
                &snapshot,
                &location,
                m.size,
            )
        };
        let record = Record {
            task: task.clone(),
            plan: Plan::Restore {
                src_volume: m.volume.clone(),
                src_name: m.name.clone(),
                lazy: req.lazy,
                unit: repo.config.chunk_size,
            },
            read: 0,
            new: 0,
        };
        // The manifest is kept before the task is: a resumed restore
        // finds it even when another host deleted the snapshot meanwhile.
        let kept = serde_json::to_string(m)
            .map_err(|e| CloudError::Defect {
                what: format!("encoding a manifest: {e}"),
            })
            .and_then(|json| Ok(self.db.put_task_manifest(&task.id, &json)?));
        if let Err(e) = kept {
            let _ = self.volumes.delete(&req.volume, true);
            return Err(e);
        }
        let hydration = if req.lazy {
            let started = async {
                // What an earlier volume of this name left must not count
                // for this one (its journal would mark units present).
                crate::volume::lazy::remove_present(&self.volumes.present_path(&req.volume))
                    .map_err(|e| {
                        CloudError::volume_io("removing an old present map of", &req.volume, e)
                    })?;
                let h = self.attach_lazy(&v, &record, Some(ready), true)?;
                // The map exists before the task does: a resumed lazy
                // restore without one is damage, never a fresh start.
                h.lazy
                    .persist(roaring::RoaringBitmap::new(), 0)
                    .await
                    .map_err(|e| {
                        CloudError::volume_io("writing the present map of", &req.volume, e)
                    })?;
                Ok::<_, CloudError>(h)
            };
            match started.await {
                Ok(h) => Some(h),
                Err(e) => {
                    v.end_lazy();
                    let _ = self.volumes.delete(&req.volume, true);
                    let _ = self.db.drop_task_manifest(&task.id);
                    return Err(e);
                }
            }
        } else {
            None
        };
        if let Err(e) = self.save(&record) {
            // Without a record nothing would finish or resume this restore:
            // the new volume goes.
            if hydration.is_some() {
                v.end_lazy();
            }
            let _ = self.volumes.delete(&req.volume, true);
            let _ = self.db.drop_task_manifest(&task.id);
            return Err(e);
        }
        tracing::info!(task = %task.id, snapshot = %task.snapshot, volume = %task.volume, lazy = req.lazy, "restore started");
        self.spawn_restore(record, hydration, claim, Some(lease));
        Ok(Started {
            group: None,
            tasks: vec![task],
            post_exec: None,
        })
    }

    /// How long a reader's lease in the bucket lasts unrenewed: the
    /// backup deadline, at most [`crate::repo::gc::LEASE_MAX`].
    fn lease_length(&self) -> std::time::Duration {
        self.backup_deadline.min(crate::repo::gc::LEASE_MAX)
    }

    /// The terms of this host's readers' leases, for the catalog mounts'
    /// open images, which read snapshots another host may delete just as
    /// restores do.
    pub fn lease_terms(&self) -> crate::repo::gc::LeaseTerms {
        crate::repo::gc::LeaseTerms {
            host: self.host.clone(),
            length: self.lease_length(),
        }
    }

    /// Runs restore `record`; `lease`: its lease, taken already (a resumed
    /// restore takes it again first).
    pub(super) fn spawn_restore(
        self: &Arc<Self>,
        record: Record,
        hydration: Option<Hydration>,
        claim: Claim,
        lease: Option<Lease>,
    ) {
        let progress = hydration.as_ref().map(|h| h.source.progress.clone());
        self.spawn_run(record, progress, claim, move |me, run| async move {
            let lazy = hydration.is_some();
            let lease = match lease {
                Some(l) => Some(l),
                None => me.retake_lease(&run).await,
            };
            let lease = Arc::new(std::sync::Mutex::new(lease));
            let outcome = match &hydration {
                Some(h) => me.run_hydrate(&run, h, lease.clone()).await,
                // Each attempt goes on from the GETs already recorded.
                None => me.outlast(&run, || me.run_restore(&run)).await,
            };
            let lease = lease
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let interrupted = matches!(outcome, Err(CloudError::Cancelled))
                && !run.stopped.load(std::sync::atomic::Ordering::Acquire);
            // Gone before the task shows as ended. An interrupted restore
            // is resumed at the next start: its lease stays (and lapses
            // if that start is long in coming).
            if let Some(l) = lease {
                if interrupted {
                    l.keep();
                } else {
                    l.release().await;
                }
            }
            let (id, volume, snapshot, location) = {
                let r = run.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (r.task.id.clone(), r.task.volume.clone(), r.task.snapshot.clone(), r.task.location.clone())
            };
            match outcome {
                Ok(()) if lazy => {
                    // The volume is the snapshot plus its own writes, which
                    // its dirty map holds: the next backup to the same
                    // location can be an incremental on the snapshot.
                    let _ = me.db.set_backup_base(&volume, Some((&location, &snapshot)), None);
                    // Released before Done is recorded: a crash in between
                    // resumes the restore, which finds every unit present.
                    if let Err(e) = me.volumes.release(&volume) {
                        tracing::warn!(%volume, error = %e, "recording the restored volume whole failed: the next start does");
                    }
                    // Done is recorded before the present map goes: a
                    // crash in between must not restart hydration on an
                    // empty map (it would overwrite the volume's writes).
                    let r = me.finish(&run, TaskState::Done, None);
                    if let Some(v) = me.volumes.get(&volume) {
                        if let Some(l) = v.lazy() {
                            v.end_lazy();
                            if let Err(e) = l.remove_file() {
                                tracing::warn!(%volume, error = %e, "removing the present map failed");
                            }
                        }
                    }
                    tracing::info!(task = %id, %volume, %snapshot, secs = r.task.elapsed_secs, fetched = r.task.bytes_transferred, "lazy restore done: the volume is complete");
                }
                Ok(()) => {
                    if let Some(v) = me.volumes.get(&volume) {
                        // The volume now equals the snapshot: its next backup
                        // to the same location can be an incremental on it.
                        v.dirty.reset();
                    }
                    let _ = me.db.set_backup_base(&volume, Some((&location, &snapshot)), None);
                    // Exported before Done is shown, and released before
                    // Done is recorded: a crash in between runs the restore
                    // again, withheld again from the start.
                    if let Err(e) = me.volumes.release(&volume) {
                        tracing::warn!(%volume, error = %e, "recording the restored volume whole failed: the next start does");
                    }
                    let r = me.finish(&run, TaskState::Done, None);
                    tracing::info!(task = %id, %volume, %snapshot, secs = r.task.elapsed_secs, fetched = r.task.bytes_transferred, "restore done");
                }
                Err(CloudError::Cancelled)
                    if !run.stopped.load(std::sync::atomic::Ordering::Acquire) =>
                {
                    me.save_counters(&run);
                    me.lock().remove(&id);
                }
                Err(e) => {
                    let stopped = matches!(e, CloudError::Cancelled);
                    // An incomplete volume must not be mistaken for the snapshot.
                    me.snapshots.delete_volume(&volume);
                    let _ = me.volumes.delete(&volume, true);
                    let err = if stopped {
                        format!("stopped by request; the incomplete volume {volume} was deleted")
                    } else {
                        format!("{e}; the incomplete volume {volume} was deleted")
                    };
                    tracing::warn!(task = %id, error = %err, "restore ended");
                    me.finish(&run, if stopped { TaskState::Stopped } else { TaskState::Failed }, Some(err));
                }
            }
        });
    }

    /// The manifest of snapshot `volume/name` that restore `task` reads:
    /// the bucket's, or, once the snapshot was deleted there (by another
    /// host, while this one was down), the copy kept when the restore
    /// started. The restore's lease keeps every object that copy
    /// references, unless it lapsed while blockd was down and a collection
    /// ran: a missing object then fails the restore by name.
    ///
    /// # Errors
    /// The bucket's error when no copy was kept (a restore started by an
    /// earlier build), or the kept copy does not decode.
    pub(super) async fn restore_manifest(
        &self,
        repo: &crate::repo::Repo,
        task: &str,
        volume: &str,
        name: &str,
    ) -> Result<crate::repo::format::Manifest, CloudError> {
        let missing = match repo.get_manifest(volume, name).await {
            Err(e @ crate::repo::RepoError::Missing { .. }) => e,
            r => return Ok(r?),
        };
        let Some(json) = self.db.task_manifest(task)? else {
            return Err(missing.into());
        };
        let m: crate::repo::format::Manifest =
            serde_json::from_str(&json).map_err(|e| CloudError::Defect {
                what: format!("the manifest kept for restore {task} does not decode: {e}"),
            })?;
        if m.volume != volume || m.name != name {
            return Err(CloudError::Defect {
                what: format!(
                    "the manifest kept for restore {task} is of {}/{}, not {volume}/{name}",
                    m.volume, m.name
                ),
            });
        }
        tracing::info!(%task, snapshot = %format!("{volume}/{name}"), "the snapshot was deleted from the bucket since this restore started: it goes on from the manifest kept then");
        Ok(m)
    }

    /// The lease of a resumed restore, taken again before it reads (the
    /// one it held may have lapsed while the daemon was down). Without
    /// one it still runs: what it reads is verified, and a missing object
    /// fails it by name.
    async fn retake_lease(&self, run: &Arc<Running>) -> Option<Lease> {
        let task = run.snapshot().task;
        let taken = async {
            let repo = self.locations.repo(&task.location).await?;
            Ok::<_, CloudError>(
                Lease::take(&repo, &task.id, &self.host, self.lease_length()).await?,
            )
        };
        match taken.await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "a resumed restore could not take its lease in the bucket; garbage collection on other hosts will not wait for it");
                None
            }
        }
    }

    /// Serves `v` lazily for the restore `r`: its present map (new when
    /// `fresh`, else it must exist) and the source of its missing units.
    pub(super) fn attach_lazy(
        self: &Arc<Self>,
        v: &crate::volume::Volume,
        r: &Record,
        ready: Option<hydrate::Ready>,
        fresh: bool,
    ) -> Result<Hydration, CloudError> {
        let Plan::Restore {
            src_volume,
            src_name,
            unit,
            ..
        } = &r.plan
        else {
            return Err(CloudError::WrongPlan {
                id: r.task.id.clone(),
                expected: "restore",
            });
        };
        let path = self.volumes.present_path(v.name());
        if !fresh && !path.exists() {
            return Err(CloudError::PresentMapMissing {
                volume: v.name().to_string(),
                path: path.display().to_string(),
            });
        }
        let progress = Arc::new(Progress::default());
        progress
            .total
            .store(r.task.bytes_total, std::sync::atomic::Ordering::Relaxed);
        progress.transferred.store(
            r.task.bytes_transferred,
            std::sync::atomic::Ordering::Relaxed,
        );
        let source = Arc::new(hydrate::RepoSource::new(
            Arc::downgrade(self),
            r.task.id.clone(),
            r.task.location.clone(),
            src_volume.clone(),
            src_name.clone(),
            ready,
            progress,
        ));
        let lazy = v
            .make_lazy(path, *unit, source.clone())
            .map_err(|e| CloudError::volume_io("making lazy", v.name(), e))?;
        Ok(Hydration { lazy, source })
    }

    pub(super) async fn run_hydrate(
        &self,
        run: &Arc<Running>,
        h: &Hydration,
        lease: Arc<std::sync::Mutex<Option<Lease>>>,
    ) -> Result<(), CloudError> {
        let rec = run.snapshot();
        let volume = self.volume_of(&rec.task)?;
        let run2 = run.clone();
        let job = hydrate::Job {
            volume,
            lazy: h.lazy.clone(),
            source: h.source.clone(),
            progress: run.progress.clone(),
            cancel: run.stop.clone(),
            report: Box::new(move |why| {
                run2.record
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .task
                    .error = why;
            }),
            limit: self.hydrate_limit,
            batch_bytes: match self.locations.local_dir(&rec.task.location) {
                Ok(Some(_)) => hydrate::BATCH_LOCAL,
                _ => hydrate::BATCH_REMOTE,
            },
            lease,
        };
        hydrate::run(&job).await
    }

    pub(super) async fn run_restore(&self, run: &Arc<Running>) -> Result<(), CloudError> {
        let rec = run.snapshot();
        let Plan::Restore {
            src_volume,
            src_name,
            ..
        } = &rec.plan
        else {
            return Err(CloudError::WrongPlan {
                id: rec.task.id.clone(),
                expected: "restore",
            });
        };
        let repo = self.locations.repo(&rec.task.location).await?;
        let manifest = self
            .restore_manifest(&repo, &rec.task.id, src_volume, src_name)
            .await
            .map_err(|e| match e {
                CloudError::Repo(source) => CloudError::Damaged {
                    snapshot: format!("{src_volume}/{src_name}"),
                    source,
                },
                e => e,
            })?;
        let volume = self.volume_of(&rec.task)?;
        let cancel = run.stop.clone();
        let job = fill::Job {
            task: rec.task.id.clone(),
            repo,
            manifest,
            volume,
            db: self.db.clone(),
            progress: run.progress.clone(),
            cancel,
            checkpoint: Checkpoint::new(run.clone(), self.db.clone()),
        };
        let r = fill::run(&job).await;
        r?;
        run.progress
            .done
            .store(rec.task.bytes_total, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
