//! Backups: the whole flow of `cloudsnap backup` and `backup-group`.
//! Claims, the freeze, the task records, then per member the stream of
//! its change set to the bucket ([`stream`]), the manifest written last
//! (the commit point), the local snapshot released, and a group's object.

pub mod stream;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use blockd_api::{BackupGroupRequest, BackupRequest, Started, Task, TaskKind, TaskState};

use crate::claims::{Claim, Want};
use crate::repo::damage::Avoid;
use crate::repo::format::{Group, Manifest};
use crate::repo::gc::Fence;
use crate::repo::{name, Repo, RepoError};
use crate::snapshot::store::SnapshotStore;
use crate::snapshot::{CreateRequest, FreezeError};
use crate::state::PendingGroup;
use crate::volume::dirty_map::ChangeSet;

use super::schedule::RunNote;
use super::task::{new_task, new_task_id, Checkpoint, Plan, Progress, Record, Running};
use super::{lock_set, Cloud, CloudError};

/// `--expire`: RFC 3339, a date (midnight UTC) or a duration from `now`,
/// as the RFC 3339 time it means. It must lie in the future.
fn expiry(s: &str, now: SystemTime) -> Result<String, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .or_else(|_| humantime::parse_rfc3339_weak(&format!("{s}T00:00:00Z")))
        .or_else(|_| humantime::parse_duration(s).map(|d| now + d))
        .map_err(|_| {
            format!("--expire {s:?}: give a time (2026-12-01T00:00:00Z), a date (2026-12-01) or a duration from now (7days, 36h)")
        })?;
    if t <= now {
        return Err(format!("--expire {s:?} is not in the future: give a later time, or a duration from now (7days, 36h)"));
    }
    Ok(humantime::format_rfc3339_seconds(t).to_string())
}

/// Whether a backup may build on manifest `m` ([`Fence::admits`]).
async fn admitted(repo: &Repo, m: &Manifest, fence: &Fence) -> Result<bool, CloudError> {
    if fence.is_open() {
        return Ok(true);
    }
    Ok(repo
        .manifest_written(&m.volume, &m.name)
        .await?
        .is_some_and(|w| fence.admits(w, m.started_ms)))
}

/// Backup sessions opened by a request that has not handed them to its
/// tasks yet: closed if the request fails. Until then they are in the
/// daemon's set of starting sessions, which collection on this host
/// leaves alone (any other session of this host without an active task
/// is a leftover, and it removes that).
struct OpenSessions {
    repo: Arc<Repo>,
    starting: Arc<Mutex<HashSet<String>>>,
    opened: Vec<crate::repo::gc::Session>,
}

impl OpenSessions {
    fn new(repo: Arc<Repo>, starting: Arc<Mutex<HashSet<String>>>) -> Self {
        Self {
            repo,
            starting,
            opened: Vec::new(),
        }
    }

    /// Registers backup `task` (in the starting set first, so that no
    /// collection finds the session without it).
    async fn open(&mut self, task: &str, host: &str, deadline: Duration) -> Result<(), CloudError> {
        lock_set(&self.starting).insert(task.to_string());
        match self.repo.open_session(task, host, deadline).await {
            Ok(s) => {
                self.opened.push(s);
                Ok(())
            }
            Err(e) => {
                lock_set(&self.starting).remove(task);
                Err(e.into())
            }
        }
    }

    fn get(&self, task: &str) -> Option<crate::repo::gc::Session> {
        self.opened.iter().find(|s| s.id == task).cloned()
    }

    /// The tasks are saved: each closes its own session from here on.
    fn hand_over(&mut self) {
        let mut starting = lock_set(&self.starting);
        for s in self.opened.drain(..) {
            starting.remove(&s.id);
        }
    }
}

impl Drop for OpenSessions {
    fn drop(&mut self) {
        {
            let mut starting = lock_set(&self.starting);
            for s in &self.opened {
                starting.remove(&s.id);
            }
        }
        for s in self.opened.drain(..) {
            let repo = self.repo.clone();
            tokio::spawn(async move {
                if let Err(e) = repo.close_session(&s.id).await {
                    tracing::warn!(task = %s.id, error = %e, "closing an unused backup session failed; it expires at its deadline");
                }
            });
        }
    }
}

impl Cloud {
    /// Starts a backup of one volume.
    ///
    /// # Errors
    /// Unknown volume or location, a backup already running, a failing hook.
    pub async fn backup(self: &Arc<Self>, req: BackupRequest) -> Result<Started, CloudError> {
        let g = BackupGroupRequest {
            volumes: vec![req.volume],
            select: BTreeMap::new(),
            full: req.full,
            location: req.location,
            labels: req.labels,
            pre_exec: req.pre_exec,
            post_exec: req.post_exec,
            exec_timeout_secs: req.exec_timeout_secs,
            expire: req.expire,
        };
        self.start_backups(g, false, None).await
    }

    /// Starts a group backup: every member frozen at one point.
    ///
    /// # Errors
    /// As [`Cloud::backup`]; no members.
    pub async fn backup_group(
        self: &Arc<Self>,
        req: BackupGroupRequest,
    ) -> Result<Started, CloudError> {
        self.start_backups(req, true, None).await
    }

    /// The volumes a backup request names: explicit, or chosen by labels;
    /// each at most once.
    fn members(&self, req: &BackupGroupRequest) -> Result<Vec<String>, CloudError> {
        let mut names = req.volumes.clone();
        if !req.select.is_empty() {
            if !names.is_empty() {
                return Err(CloudError::VolumesAndLabels);
            }
            names = self.volumes.carrying(&req.select);
            if names.is_empty() {
                return Err(CloudError::NoLabelMatch);
            }
        }
        if names.is_empty() {
            return Err(CloudError::NoVolumes);
        }
        let mut sorted = names.clone();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(FreezeError::NamedTwice {
                volume: w[0].clone(),
            }
            .into());
        }
        Ok(names)
    }

    /// Starts the backups `req` asks for (one group with `group` or
    /// several volumes). For a scheduled run, `run` names the schedule,
    /// and the run is noted on the schedule's record in the same step
    /// that saves the backup tasks.
    pub(super) async fn start_backups(
        self: &Arc<Self>,
        req: BackupGroupRequest,
        group: bool,
        run: Option<&RunNote<'_>>,
    ) -> Result<Started, CloudError> {
        let schedule = run.map(|r| r.id);
        let names = self.members(&req)?;
        let expires = req
            .expire
            .as_deref()
            .map(|e| expiry(e, SystemTime::now()))
            .transpose()
            .map_err(|why| CloudError::BadExpire { why })?;
        // An unknown volume is the first thing to say (before, say, which
        // location to choose); checked again under the claims below.
        if let Some(n) = names.iter().find(|n| self.volumes.get(n).is_none()) {
            return Err(CloudError::VolumeNotFound { volume: n.clone() });
        }
        let location = self.locations.resolve(req.location.as_deref())?;
        self.locations.writable(&location, "take backups")?;
        let created_name = name::new();
        // Claims first: each member's volume, its one job slot, the new
        // snapshot's name and the location are held from here until the
        // task ends, so no request can delete or reuse them meanwhile and a
        // second backup of a member is refused.
        let mut members = Vec::with_capacity(names.len());
        for n in &names {
            let id = new_task_id();
            let claim = self
                .claims
                .acquire(Want::for_backup(&id, n, &created_name, &location))?;
            members.push((n, id, claim));
        }
        // Deleted before the claims were taken? (After, it cannot be.)
        self.locations.resolve(Some(&location))?;
        let repo = self.locations.repo(&location).await?;
        let mut volumes = Vec::with_capacity(members.len());
        for (n, id, claim) in members {
            let v = self
                .volumes
                .get(n)
                .ok_or_else(|| CloudError::VolumeNotFound { volume: n.clone() })?;
            if let Some(why) = v.filling() {
                return Err(CloudError::Restoring {
                    volume: n.clone(),
                    why,
                });
            }
            volumes.push((v, id, claim));
        }
        // The repository must still be where the location says before
        // anything is written: a local location's directory unmounted
        // since it was opened would otherwise take this backup's packs on
        // the file system underneath, to vanish at the next mount.
        self.locations.check_keys(&location, &repo).await?;
        // Registered in the bucket before the parent is chosen: a
        // collector that marks after this waits for these backups.
        let mut sessions = OpenSessions::new(repo.clone(), self.starting_sessions.clone());
        for (_, id, _) in &volumes {
            sessions.open(id, &self.host, self.backup_deadline).await?;
        }
        let fence = repo.gc_fence().await?;
        let mut plans = Vec::with_capacity(volumes.len());
        for (v, id, claim) in volumes {
            let (parent, base) = self.parent_of(&repo, &location, &v, &fence).await?;
            let session = sessions.get(&id);
            plans.push((v, parent, base, id, claim, session));
        }
        let metas = self
            .snapshots
            .create_claimed(CreateRequest {
                volumes: names.clone(),
                name: Some(created_name.clone()),
                pre_exec: req.pre_exec.clone(),
                post_exec: req.post_exec.clone(),
                exec_timeout: blockd_api::exec_timeout(req.exec_timeout_secs)
                    .map_err(|why| CloudError::ExecTimeout { why })?,
                absorb: true,
            })
            .await?;
        let group_id = (group || names.len() > 1).then(|| created_name.clone());
        let labels: BTreeMap<String, String> = req
            .select
            .iter()
            .chain(&req.labels)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut started = Vec::with_capacity(plans.len());
        let mut failed = None;
        for (v, parent, base, id, claim, session) in plans {
            let snap = self.snapshots.get(v.name(), &created_name);
            let meta = metas.iter().find(|m| m.volume == v.name());
            let (Some(snap), Some(meta)) = (snap, meta) else {
                failed = Some(CloudError::SnapshotVanished {
                    volume: v.name().to_string(),
                });
                break;
            };
            let chain = parent.as_ref().map_or(0, |p| p.chain + 1);
            let incremental = base && !req.full && meta.changes_known && chain < self.full_every;
            let full = !incremental;
            // What the backup expects to read: a full read skips holes, so
            // the volume's allocated bytes, not its size (a 64 TiB volume
            // holding 6 MiB does not show 64 TiB to go).
            let total = if full {
                v.allocated().min(meta.size)
            } else {
                self.changes_for(&snap).extents.len() * meta.extent_size
            };
            let task = Task {
                group: group_id.clone(),
                full,
                ..new_task(
                    id,
                    TaskKind::Backup,
                    v.name(),
                    &name::id(v.name(), &created_name),
                    &location,
                    total,
                )
            };
            let record = Record {
                task,
                plan: Plan::Backup {
                    parent: parent.as_ref().map(|p| name::id(&p.volume, &p.name)),
                    chain: if full { 0 } else { chain },
                    // Volume labels that selected a group are recorded too,
                    // so `cloudsnap list --label` finds the group's members.
                    labels: labels.clone(),
                    created: meta.created.clone(),
                    pause_us: meta.pause_us,
                    pre_exec: meta.pre_exec.clone(),
                    post_exec: meta.post_exec.clone(),
                    session,
                    schedule: schedule.map(str::to_string),
                    expires: expires.clone(),
                    repository: Some(repo.id()),
                },
                read: 0,
                new: 0,
            };
            started.push((record, snap, claim, parent));
        }
        // Every member's record in one step (with a scheduled run, noted on
        // its schedule in that step too): a crash leaves the whole run
        // recorded, to resume, or nothing of it.
        if failed.is_none() {
            let records: Vec<&Record> = started.iter().map(|(r, _, _, _)| r).collect();
            failed = self.save_started(&records, run).err();
        }
        if let Some(e) = failed {
            // Nothing runs and nothing of it was recorded: every member's
            // snapshot is abandoned (its change set merged back, so the
            // next backup covers it).
            for n in &names {
                let _ = self.snapshots.discard(n, &created_name);
            }
            tracing::warn!(snapshot = %created_name, error = %e, "backup could not start; its changes are kept for the next backup");
            return Err(e);
        }
        let mut tasks = Vec::with_capacity(started.len());
        for (record, snap, claim, parent) in started {
            tracing::info!(task = %record.task.id, snapshot = %record.task.snapshot, %location, full = record.task.full, "backup started");
            tasks.push(record.task.clone());
            self.spawn_backup(record, snap, claim, parent, false);
        }
        // Each running task closes its own session from here on. Out of
        // the starting set only once running: a task is always one or the
        // other, which `cloudsnap stop` relies on.
        sessions.hand_over();
        if group_id.is_some() {
            // Marked in the bucket now, not at the next look.
            self.group_marks.notify_one();
        }
        Ok(Started {
            group: group_id,
            tasks,
            post_exec: metas.first().and_then(|m| m.post_exec.clone()),
        })
    }

    /// The parent of a backup of `v` to `location`, and whether it is the
    /// base of an incremental: the volume's last backup there, still listed.
    /// A full read uses a parent too: chunks unchanged at the same place are
    /// referenced, not uploaded again.
    ///
    /// A parent of the volume's size before it grew serves as well (volumes
    /// only grow): its blocks cover the old range, the grown range held
    /// zeros at the resize, and every write since, there as anywhere, is in
    /// the change set. So a resize costs the next backup nothing.
    pub(super) async fn parent_of(
        &self,
        repo: &Repo,
        location: &str,
        v: &crate::volume::Volume,
        fence: &Fence,
    ) -> Result<(Option<Manifest>, bool), CloudError> {
        let parent = match self.db.backup_base(v.name())? {
            Some((loc, snap)) if loc == location => match name::split(&snap) {
                Some((pv, pn)) => match repo.get_manifest(pv, pn).await {
                    Ok(m) if fits(&m, v) => Some(m),
                    Ok(_) | Err(RepoError::Missing { .. }) => None,
                    // Its manifest or an index map is damaged: nothing of
                    // it can be referenced, and its change set counts from
                    // a snapshot nobody can read. The whole volume is read
                    // instead, so the damage never stops the backups that
                    // replace it (a store that fails is still an error).
                    Err(e @ RepoError::Corrupt { .. }) => {
                        tracing::warn!(volume = v.name(), parent = %snap, error = %e, "the volume's last backup at this location does not read: this backup reads the whole volume instead; `blockctl repo check` lists what is damaged");
                        None
                    }
                    Err(e) => return Err(e.into()),
                },
                None => None,
            },
            _ => None,
        };
        let parent = match parent {
            Some(m) if !admitted(repo, &m, fence).await? => {
                tracing::info!(volume = v.name(), parent = %name::id(&m.volume, &m.name), "the parent's backup ran while garbage collection was marking: reading the whole volume and storing its own copies");
                return Ok((None, false));
            }
            p => p,
        };
        // Without one (first backup here, or the last backup went to
        // another location and took the change set with it), the whole
        // volume is read, but chunks unchanged since this volume's latest
        // snapshot in this location are still referenced.
        Ok(match parent {
            Some(p) => (Some(p), true),
            None => match self.latest_same_shape(repo, v).await {
                Some(m) if admitted(repo, &m, fence).await? => (Some(m), false),
                _ => (None, false),
            },
        })
    }

    /// The latest readable snapshot of `v`'s name in `repo` that [`fits`]
    /// it (a full read references its unchanged chunks).
    pub(super) async fn latest_same_shape(
        &self,
        repo: &Repo,
        v: &crate::volume::Volume,
    ) -> Option<Manifest> {
        let names = repo.list_snapshots(Some(v.name())).await.ok()?;
        for (vol, name) in names.iter().rev().filter(|(_, n)| name::is_valid(n)) {
            if let Ok(m) = repo.get_manifest(vol, name).await {
                if fits(&m, v) {
                    return Some(m);
                }
            }
        }
        None
    }

    /// The change set a backup of `snap` must read: its own (which holds
    /// those of the local snapshots taken before it, handed on at its
    /// freeze), plus those of any other held snapshot not handed on (a
    /// backup frozen by an older blockd, which did not hand them on).
    pub(super) fn changes_for(&self, snap: &SnapshotStore) -> ChangeSet {
        let m = snap.meta();
        let mut c = snap.changes().clone();
        for other in self.snapshots.list(Some(&m.volume)) {
            if other.meta().name != m.name && !other.meta().handed_on {
                c.merge(other.changes());
            }
        }
        c
    }

    /// Runs backup task `record` from its frozen `snap`. `parent` is the
    /// parent's manifest when the caller has it (a fresh start); a resumed
    /// task fetches it again. A `resumed` task first looks for the
    /// manifest it may have committed before the restart.
    pub(super) fn spawn_backup(
        self: &Arc<Self>,
        record: Record,
        snap: Arc<SnapshotStore>,
        claim: Claim,
        parent: Option<Manifest>,
        resumed: bool,
    ) {
        self.spawn_run(record, None, claim, move |me, run| async move {
            // A location that fails for a while (an outage, a restarted
            // gateway) is waited out; each attempt goes on from the last
            // checkpoint.
            let mut parent = parent;
            let outcome = me
                .outlast(&run, || me.run_backup(&run, &snap, parent.take(), resumed))
                .await;
            let (volume, name, id, location) = {
                let r = run.record.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (v, n) = name::split(&r.task.snapshot).unwrap_or_default();
                (v.to_string(), n.to_string(), r.task.id.clone(), r.task.location.clone())
            };
            // Ended (not merely interrupted by a shutdown, after which it
            // resumes): its registration in the bucket goes.
            let interrupted = matches!(outcome, Err(CloudError::Cancelled))
                && !run.stopped.load(std::sync::atomic::Ordering::Acquire);
            if !interrupted {
                if let Ok(repo) = me.locations.repo(&location).await {
                    if let Err(e) = repo.close_session(&id).await {
                        tracing::warn!(task = %id, error = %e, "closing the backup session failed; it expires at its deadline");
                    }
                }
            }
            match outcome {
                Ok(()) => me.complete_backup(&run).await,
                Err(CloudError::Cancelled)
                    if !run.stopped.load(std::sync::atomic::Ordering::Acquire) =>
                {
                    // Left active: it resumes at the next start from its
                    // last checkpoint, whose record (and counters) stay as
                    // saved then, so redone work is not counted twice;
                    // only its running time and uploaded bytes are added.
                    me.save_counters(&run);
                    me.lock().remove(&id);
                }
                Err(e) => {
                    let stopped = matches!(e, CloudError::Cancelled);
                    let _ = me.snapshots.discard(&volume, &name);
                    let (state, err) = if stopped {
                        (TaskState::Stopped, Some("stopped by request; its changes go to the next backup".to_string()))
                    } else {
                        (TaskState::Failed, Some(format!("{e}; the volume's changes are kept for the next backup")))
                    };
                    tracing::warn!(task = %id, state = %state, error = ?err, "backup ended");
                    me.finish(&run, state, err);
                }
            }
        });
    }

    /// Finishes resumed backup task `record`, whose base was recorded
    /// before a restart cut it short (its local snapshot may be gone
    /// already): the steps after the base are taken again.
    pub(super) fn spawn_completion(self: &Arc<Self>, record: Record, claim: Claim) {
        let session = match &record.plan {
            Plan::Backup { session, .. } => session.clone(),
            Plan::Restore { .. } => None,
        };
        let location = record.task.location.clone();
        self.spawn_run(record, None, claim, move |me, run| async move {
            // Its counters, from the manifest, once the location answers
            // (an outage is waited out, as for any resumed task: the
            // group object is written to it next).
            let read = me
                .outlast(&run, || async {
                    let repo = me.locations.repo(&location).await?;
                    me.committed_before(&run, &repo, session.as_ref())
                        .await
                        .map(drop)
                })
                .await;
            match read {
                Err(CloudError::Cancelled)
                    if !run.stopped.load(std::sync::atomic::Ordering::Acquire) =>
                {
                    // Shutting down: completed at the next start.
                    me.save_counters(&run);
                    me.lock().remove(&run.id());
                    return;
                }
                Err(e) => tracing::warn!(task = %run.id(), error = %e, "reading the backup's manifest failed; its counters stay as last saved"),
                Ok(()) => {}
            }
            me.complete_backup(&run).await;
        });
    }

    /// Ends backup `run`, whose manifest is committed: the snapshot
    /// becomes the volume's backup base, the local snapshot goes, the
    /// group object is written by the group's last member, and the task
    /// is Done. Each step may have run before a crash (a resumed task
    /// whose manifest or base was already written comes here again):
    /// every one is safe to repeat.
    pub(super) async fn complete_backup(self: &Arc<Self>, run: &Arc<Running>) {
        let (volume, name, id, location, snapshot, group) = {
            let r = run
                .record
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (v, n) = name::split(&r.task.snapshot).unwrap_or_default();
            (
                v.to_string(),
                n.to_string(),
                r.task.id.clone(),
                r.task.location.clone(),
                r.task.snapshot.clone(),
                r.task.group.clone(),
            )
        };
        // What the backup avoided, unless the manifest was written before
        // a restart (then unknown: the next backup reads the blocks it
        // would keep, if a check has found damage).
        let seen = run
            .damage_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        // The base first: once the snapshot goes, nothing but the base
        // says where its changes are (the map may already be settled
        // without them).
        match self
            .db
            .set_backup_base(&volume, Some((&location, &snapshot)), seen.as_deref())
        {
            Ok(()) => {
                if self.snapshots.get(&volume, &name).is_some() {
                    if let Err(e) = self.snapshots.release(&volume, &name) {
                        tracing::warn!(error = %e, "releasing the backup's snapshot failed");
                    }
                }
            }
            Err(e) => {
                // Its changes go back into the map instead: the next
                // backup takes them again.
                tracing::error!(%volume, error = %e, "recording the backup base failed; the snapshot's changes go to the next backup");
                if let Err(e) = self.snapshots.discard(&volume, &name) {
                    tracing::warn!(error = %e, "releasing the backup's snapshot failed");
                }
            }
        }
        // The last member of a group writes the group object before it
        // reports Done; members finish one at a time here, so exactly one
        // of them sees the others Done.
        let _finishing = self.finishing.lock().await;
        if let Some(g) = &group {
            self.maybe_write_group(g, &location, &id).await;
        }
        // The expiry before Done: a Done task is not resumed.
        if let Plan::Backup {
            expires: Some(at), ..
        } = &run.snapshot().plan
        {
            if let Err(e) = self.db.add_expiring(&location, &snapshot, at) {
                tracing::error!(%snapshot, error = %e, "recording the expiry failed; delete the snapshot by hand");
            }
        }
        let r = self.finish(run, TaskState::Done, None);
        tracing::info!(task = %id, snapshot = %r.task.snapshot, read = r.read, new = r.new, uploaded = r.task.bytes_transferred, secs = r.task.elapsed_secs, "backup done");
    }

    pub(super) async fn run_backup(
        &self,
        run: &Arc<Running>,
        snap: &Arc<SnapshotStore>,
        parent: Option<Manifest>,
        resumed: bool,
    ) -> Result<(), CloudError> {
        let rec = run.snapshot();
        let Plan::Backup {
            parent: parent_id,
            chain,
            labels,
            created,
            pause_us,
            pre_exec,
            post_exec,
            session,
            schedule,
            expires,
            repository,
        } = rec.plan.clone()
        else {
            return Err(CloudError::WrongPlan {
                id: rec.task.id.clone(),
                expected: "backup",
            });
        };
        let repo = self.locations.repo(&rec.task.location).await?;
        // Every attempt (a resume, a retry after the location was gone)
        // goes on in the repository it started in, or not at all.
        if repository.as_ref().is_some_and(|id| *id != repo.id()) {
            return Err(CloudError::PastDeadline {
                task: rec.task.id.clone(),
                why: format!(
                    "the repository at location {} is not the one it started in (a repository made anew at the same place): what it wrote is not there",
                    rec.task.location
                ),
            });
        }
        if resumed && self.committed_before(run, &repo, session.as_ref()).await? {
            return Ok(());
        }
        let volume = self.volume_of(&rec.task)?;
        let parent = match (parent, parent_id.as_deref().and_then(name::split)) {
            (Some(m), _) => Some(m),
            (None, Some((v, n))) => Some(repo.get_manifest(v, n).await?),
            (None, None) => None,
        };
        let cancel = run.stop.clone();
        let job = stream::Job {
            task: rec.task.id.clone(),
            repo: repo.clone(),
            volume,
            snap: snap.clone(),
            changes: self.changes_for(snap),
            full: rec.task.full,
            parent: parent.clone(),
            db: self.db.clone(),
            progress: run.progress.clone(),
            cancel,
            checkpoint: Checkpoint::new(run.clone(), self.db.clone()),
            avoid: tokio::select! {
                a = self.avoid(&repo, &rec.task.volume, parent.as_ref()) => a?,
                () = run.stop.cancelled() => return Err(CloudError::Cancelled),
            },
        };
        if !job.avoid.index.is_empty() {
            tracing::info!(task = %rec.task.id, index_blocks = job.avoid.index.len(), "a check found damage: the index blocks that reach it are read from the volume again");
        }
        // What an earlier attempt stored (blocks finished, packs uploaded)
        // was made under the damage records of its own start, not these:
        // then what this snapshot avoids is left unknown.
        let fresh = !self.db.task_stored(&job.task)?;
        let blocks = stream::run(&job).await;
        let blocks = blocks?;
        *run.damage_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh.then(|| job.avoid.seen());
        let r = run.snapshot();
        let (v, n) = name::split(&r.task.snapshot).unwrap_or_default();
        let meta = snap.meta();
        let mut manifest = Manifest {
            volume: v.to_string(),
            name: n.to_string(),
            created,
            size: meta.size,
            extent_size: meta.extent_size,
            full: r.task.full,
            chain,
            parent: if r.task.full { None } else { parent_id },
            group: r.task.group.clone(),
            labels,
            bytes_read: r.read,
            bytes_new: r.new,
            bytes_reused: r.task.bytes_reused,
            bytes_uploaded: r.task.bytes_transferred,
            pause_us,
            pre_exec,
            post_exec,
            blocks: blocks.into_iter().collect(),
            map: Vec::new(),
            host: Some(self.host.clone()),
            schedule,
            expires,
            started_ms: session.as_ref().map(|s| s.started),
        };
        // The manifest and its index maps count as uploaded too
        // (approximately: 40 bytes per block).
        manifest.bytes_uploaded += 256 + 40 * manifest.blocks.len() as u64;
        // Garbage collection stops waiting for a backup past its deadline:
        // such a backup must not commit.
        if let Some(s) = &session {
            if let Err(why) = repo.session_valid(s).await? {
                return Err(CloudError::PastDeadline {
                    task: rec.task.id.clone(),
                    why,
                });
            }
        }
        // The keys this backup sealed its packs with must be the
        // repository's, or it would leave a snapshot nobody can read.
        self.locations.check_keys(&rec.task.location, &repo).await?;
        match repo.put_manifest(&manifest, parent.as_ref()).await {
            Ok(n) => Progress::add(&run.progress.transferred, n),
            // Written by this task before a crash: done.
            Err(RepoError::Exists { .. })
                if repo
                    .get_manifest(v, n)
                    .await
                    .is_ok_and(|m| m.blocks == manifest.blocks) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// What a backup of `volume` with `parent` avoids: every index block a
    /// damage record names and, when a check has found damaged records in
    /// packs that the parent's own backup did not avoid, every block of
    /// the parent that uses them (its blocks are read to find out).
    async fn avoid(
        &self,
        repo: &Repo,
        volume: &str,
        parent: Option<&Manifest>,
    ) -> Result<Avoid, CloudError> {
        // Without a parent nothing is kept or taken: what a backup stores
        // is its own.
        let Some(p) = parent else {
            return Ok(Avoid::default());
        };
        let mut avoid = repo.avoid().await?;
        let parent = name::id(&p.volume, &p.name);
        let seen = self.db.base_damage_seen(volume, &parent)?;
        if !avoid.covered_by(seen.as_deref()) {
            let n = repo.screen(&mut avoid, p).await?;
            tracing::info!(%volume, %parent, using_damage = n, "a check found damaged records the parent's backup did not avoid: its index blocks were read, and those using them are read from the volume again");
        }
        Ok(avoid)
    }

    /// True when the manifest of resumed backup `run` is in the bucket,
    /// written by this very task (its session started when the manifest
    /// says) before a restart cut it short: the backup is committed, and
    /// its counters are taken from the manifest. Nothing is read again;
    /// the session may be closed already, which would fail a second run.
    async fn committed_before(
        &self,
        run: &Running,
        repo: &crate::repo::Repo,
        session: Option<&crate::repo::gc::Session>,
    ) -> Result<bool, CloudError> {
        let Some(s) = session else {
            return Ok(false);
        };
        let snapshot = run.snapshot().task.snapshot;
        let Some((v, n)) = name::split(&snapshot) else {
            return Ok(false);
        };
        let m = match repo.get_manifest(v, n).await {
            Ok(m) => m,
            Err(RepoError::Missing { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if m.started_ms != Some(s.started) {
            // Someone else's snapshot of the same name: the commit
            // reports it.
            return Ok(false);
        }
        use std::sync::atomic::Ordering::Relaxed;
        let p = &run.progress;
        p.done.store(p.total.load(Relaxed), Relaxed);
        p.read.store(m.bytes_read, Relaxed);
        p.new.store(m.bytes_new, Relaxed);
        p.reused.store(m.bytes_reused, Relaxed);
        p.transferred.fetch_max(m.bytes_uploaded, Relaxed);
        tracing::info!(task = %run.id(), %snapshot, "the backup was committed before the restart");
        Ok(true)
    }

    /// Writes the group object if every member but `finishing` (which is
    /// about to be Done) is Done. It is recorded in the state database
    /// first: if the location refuses it now, [`Cloud::write_groups_later`]
    /// writes it, after a restart too.
    pub(super) async fn maybe_write_group(&self, group: &str, location: &str, finishing: &str) {
        let records = match self.db.tasks(false, 10_000) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(group, error = %e, "reading the group's members failed: its group object is not written, and the group is listed as incomplete");
                return;
            }
        };
        let members: Vec<Record> = records
            .iter()
            .filter_map(|(_, r)| serde_json::from_str::<Record>(r).ok())
            .filter(|r| r.task.group.as_deref() == Some(group) && r.task.kind == TaskKind::Backup)
            .collect();
        if members
            .iter()
            .any(|r| r.task.id != finishing && r.task.state != TaskState::Done)
        {
            return;
        }
        let g = Group {
            group: group.to_string(),
            created: members
                .iter()
                .map(|r| r.task.created.clone())
                .min()
                .unwrap_or_default(),
            members: members.iter().map(|r| r.task.snapshot.clone()).collect(),
        };
        let json = serde_json::to_string(&g).unwrap_or_else(|_| unreachable!("groups serialise"));
        let repository = members.iter().find_map(|r| match &r.plan {
            Plan::Backup { repository, .. } => repository.clone(),
            Plan::Restore { .. } => None,
        });
        let pending = PendingGroup {
            location: location.to_string(),
            group: group.to_string(),
            record: json,
            repository,
        };
        if let Err(e) = self.db.add_pending_group(&pending) {
            tracing::error!(group, error = %e, "recording the group object to write failed: if the location refuses it now, the group is listed as incomplete");
        }
        self.write_group(&pending, &g, false).await;
    }

    /// Writes group object `g` (recorded as `p`), and forgets it once
    /// written, or once it can never be: its location deleted, made
    /// read-only or holding another repository, or (`later`) every member
    /// deleted meanwhile. Returns false when it is to be tried again.
    async fn write_group(&self, p: &PendingGroup, g: &Group, later: bool) -> bool {
        let group = g.group.as_str();
        let location = p.location.as_str();
        let outcome = async {
            let repo = self.locations.repo(location).await?;
            if p.repository.as_deref().is_some_and(|id| id != repo.id()) {
                return Ok(Some("the location now holds another repository"));
            }
            // The members have just written through these keys; a retry
            // may come after they were replaced by keys that only read.
            if later {
                self.locations.check_keys(location, &repo).await?;
                if !any_member_left(&repo, g).await? {
                    return Ok(Some("every member was deleted meanwhile"));
                }
            }
            repo.put_group(g).await?;
            Ok::<_, CloudError>(None)
        }
        .await;
        match outcome {
            Ok(None) => {
                tracing::info!(group, members = g.members.len(), "group backup recorded");
            }
            Ok(Some(why)) => {
                tracing::warn!(group, location, "the group object is not written: {why}");
            }
            Err(e)
                if matches!(&e, CloudError::Location(l) if l.refuses_writes_for_good())
                    || matches!(e, CloudError::Repo(RepoError::ReadOnly { .. })) =>
            {
                tracing::warn!(group, location, "the location of this group backup is gone or read-only: its group object is not written");
            }
            Err(e) => {
                tracing::warn!(group, error = %e, "writing the group object failed; it is tried again later (the group is listed as running meanwhile)");
                return false;
            }
        }
        if let Err(e) = self.db.drop_pending_group(location, group) {
            tracing::warn!(group, error = %e, "forgetting a written group object failed; it is written again later");
        }
        true
    }

    /// Tries again, until shutdown, the group objects a location refused:
    /// each after [`GROUP_RETRY`], doubling up to [`GROUP_RETRY_MAX`].
    pub(super) fn write_groups_later(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            // Per group: when it is due next, and the pause after that.
            let mut due: HashMap<String, (Instant, Duration)> = HashMap::new();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(GROUP_RETRY) => {}
                }
                let Some(cloud) = me.upgrade() else { return };
                let pending = match cloud.db.pending_groups() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the group objects to write failed");
                        continue;
                    }
                };
                due.retain(|g, _| pending.iter().any(|p| &p.group == g));
                for p in pending {
                    let now = Instant::now();
                    let (at, pause) = *due.entry(p.group.clone()).or_insert((now, GROUP_RETRY));
                    if at > now {
                        continue;
                    }
                    let done = match serde_json::from_str::<Group>(&p.record) {
                        Ok(g) if g.group == p.group => cloud.write_group(&p, &g, true).await,
                        _ => {
                            tracing::error!(group = %p.group, "a recorded group object does not read: dropped; the group is listed as incomplete");
                            if let Err(e) = cloud.db.drop_pending_group(&p.location, &p.group) {
                                tracing::warn!(group = %p.group, error = %e, "forgetting it failed");
                            }
                            true
                        }
                    };
                    if !done {
                        due.insert(p.group, (Instant::now() + pause, (pause * 2).min(GROUP_RETRY_MAX)));
                    }
                }
            }
        });
    }

    /// Keeps a mark in the bucket of every group backup running here
    /// (`locks/groups/<group>`), so that other hosts list it as running
    /// rather than incomplete: written within [`GROUP_MARK_LOOK`] of its
    /// start, again every [`GROUP_MARK_EVERY`], and removed once the group
    /// is no longer running here, which is after its group object is
    /// written (or known never to be). A mark left by a crash or a stop
    /// lapses ([`crate::repo::gc::GROUP_MARK_LAPSE`]) unless the resumed
    /// group writes it again.
    pub(super) fn mark_running_groups(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        let kick = self.group_marks.clone();
        self.tracker.spawn(async move {
            // (location, group) -> when its mark was last written.
            let mut marked: HashMap<(String, String), Instant> = HashMap::new();
            loop {
                // Shutdown first: the tasks it interrupts leave the running
                // set, and their groups' marks must stay for them to resume.
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(GROUP_MARK_LOOK) => {}
                    () = kick.notified() => {}
                }
                if shutdown.is_cancelled() {
                    return;
                }
                let Some(cloud) = me.upgrade() else { return };
                let running = cloud.running_group_locations();
                for (location, group) in &running {
                    let key = (location.clone(), group.clone());
                    if marked.get(&key).is_some_and(|at| at.elapsed() < GROUP_MARK_EVERY) {
                        continue;
                    }
                    let written = match cloud.locations.repo(location).await {
                        Ok(repo) => repo.mark_group_running(group, &cloud.host).await.map_err(CloudError::from),
                        Err(e) => Err(e),
                    };
                    match written {
                        Ok(()) => {
                            marked.insert(key, Instant::now());
                        }
                        Err(e) => tracing::debug!(group, location, error = %e, "marking a group backup as running failed: other hosts list it as incomplete until it completes"),
                    }
                }
                let ended: Vec<(String, String)> = marked
                    .keys()
                    .filter(|k| !running.contains(*k))
                    .cloned()
                    .collect();
                for key in ended {
                    let (location, group) = &key;
                    let removed = match cloud.locations.repo(location).await {
                        Ok(repo) => repo.unmark_group_running(group, &cloud.host).await.map_err(CloudError::from),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = removed {
                        tracing::debug!(group, location, error = %e, "removing a group backup's running mark failed: it lapses");
                    }
                    marked.remove(&key);
                }
            }
        });
    }

    /// Group backups whose group object is still to be written, each with
    /// its location.
    pub(super) fn pending_group_locations(&self) -> HashSet<(String, String)> {
        match self.db.pending_groups() {
            Ok(p) => p.into_iter().map(|p| (p.location, p.group)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the group objects to write failed: such groups are listed as incomplete");
                HashSet::new()
            }
        }
    }
}

/// Whether any member of `g` is still in the repository.
async fn any_member_left(repo: &Repo, g: &Group) -> Result<bool, CloudError> {
    for m in &g.members {
        let Some((v, n)) = name::split(m) else {
            continue;
        };
        match repo.get_manifest(v, n).await {
            Ok(_) => return Ok(true),
            Err(RepoError::Missing { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// How soon a group object that a location refused is tried again.
const GROUP_RETRY: Duration = Duration::from_secs(10);
/// How often the group backups running here are looked at, to mark the
/// new ones in the bucket and unmark the ended ones.
const GROUP_MARK_LOOK: Duration = Duration::from_secs(2);
/// How often a running group backup's mark is written again: well within
/// [`crate::repo::gc::GROUP_MARK_LAPSE`].
const GROUP_MARK_EVERY: Duration = Duration::from_secs(40);
/// The longest pause between two tries of one group object.
const GROUP_RETRY_MAX: Duration = Duration::from_secs(600);

/// True when snapshot `m` can be the parent of a backup of `v`: the same
/// extent size, and the volume's size or the size it had before growing.
fn fits(m: &Manifest, v: &crate::volume::Volume) -> bool {
    m.extent_size == v.extent_size() && m.size <= v.size()
}
