//! `repo gc` of a location (the work is [`crate::repo::gc`]).

use std::sync::Arc;
use std::time::Duration;

use blockd_api::{GcReport, GcRequest};

use super::{lock_set, Cloud, CloudError};
use crate::claims::Want;
use crate::repo::gc;

/// This host's collection of one location; ends on drop.
struct Collecting<'a> {
    cloud: &'a Cloud,
    location: String,
}

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        self.cloud
            .gc_running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.location);
    }
}

impl Cloud {
    fn collecting(&self, location: &str) -> Result<Collecting<'_>, CloudError> {
        let mut running = self
            .gc_running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !running.insert(location.to_string()) {
            return Err(CloudError::Gc(gc::GcError::Running {
                location: location.to_string(),
                holder: format!("{} (this host)", self.host),
                age_secs: 0,
                lapse_secs: gc::HEARTBEAT_LAPSE.as_secs(),
            }));
        }
        Ok(Collecting {
            cloud: self,
            location: location.to_string(),
        })
    }

    /// Collects every location every `every` (first one `every` after
    /// start), until shutdown. Failures are logged and retried next time.
    pub(super) fn collect_every(self: &std::sync::Arc<Self>, every: Duration) {
        let me = std::sync::Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let Some(cloud) = me.upgrade() else { return };
                let names = match cloud.locations.list() {
                    // Read-only credentials cannot collect: nothing to do there.
                    Ok(l) => l
                        .into_iter()
                        .filter(|l| !l.read_only)
                        .map(|l| l.name)
                        .collect::<Vec<_>>(),
                    Err(e) => {
                        tracing::warn!(error = %e, "scheduled garbage collection: cannot list locations");
                        continue;
                    }
                };
                for name in names {
                    let req = GcRequest {
                        location: Some(name.clone()),
                        ..GcRequest::default()
                    };
                    let run = cloud.gc(req);
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        r = run => if let Err(e) = r {
                            tracing::warn!(location = %name, error = %e, "scheduled garbage collection failed; retried at the next run");
                        }
                    }
                }
            }
        });
    }

    /// Collects a location's garbage: sweeps marks that are due, marks
    /// what is unreferenced now.
    ///
    /// # Errors
    /// Unknown location; another collector running; a damaged repository;
    /// provider failures.
    pub async fn gc(&self, req: GcRequest) -> Result<GcReport, CloudError> {
        let location = self.locations.resolve(req.location.as_deref())?;
        self.locations.writable(
            &location,
            "collect garbage (a collection, a dry run too, records its run in the bucket)",
        )?;
        let _claim = self.claims.acquire(Want::for_location_use(
            &location,
            "are being garbage-collected (`blockctl repo gc`)",
            "wait for the collection to end",
        ))?;
        let repo = self.locations.repo(&location).await?;
        // Collection deletes and repacks with the keys opened.
        self.locations.check_keys(&location, &repo).await?;
        let grace = req.grace_secs.map_or(self.gc_grace, Duration::from_secs);
        // One collection per location on this host; a run object of this
        // host found in the bucket meanwhile is a crashed run's.
        let _local = self.collecting(&location)?;
        let opts = gc::Options {
            grace,
            dry_run: req.dry_run,
            host: self.host.clone(),
            own_run_is_dead: true,
            max_unused: req.max_unused.unwrap_or(self.gc_max_unused),
            deadline: self.backup_deadline,
            local_dir: self.locations.local_dir(&location)?,
            live: {
                let db = self.db.clone();
                let starting = self.starting_sessions.clone();
                gc::Live(Arc::new(move |id: &str| {
                    lock_set(&starting).contains(id) || db.task_active(id).unwrap_or(true)
                }))
            },
        };
        // A dry run is no run: counted neither way.
        let o = gc::collect(&repo, &opts).await.map_err(|e| {
            if !req.dry_run {
                crate::metrics::STATS.maintenance(&location, "gc", "failed");
            }
            CloudError::Gc(e)
        })?;
        if !req.dry_run {
            let outcome = if o.problems.is_empty() {
                "done"
            } else {
                "damaged"
            };
            crate::metrics::STATS.maintenance(&location, "gc", outcome);
            crate::metrics::STATS.gc_deleted(&location, o.deleted_bytes);
        }
        tracing::info!(
            %location,
            dry_run = req.dry_run,
            marked = o.marked_packs + o.marked_index_blocks,
            deleted = o.deleted_packs + o.deleted_index_blocks,
            deleted_bytes = o.deleted_bytes,
            held = o.held_marks,
            repacked = o.repacked_packs,
            unused_bytes = o.unused_bytes,
            skipped = o.skipped.len(),
            damaged = o.problems.len(),
            partial = o.deleted_partial,
            "garbage collected"
        );
        Ok(o)
    }
}
