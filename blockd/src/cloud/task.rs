//! The task machinery: a task's persisted record (what it does, so it can
//! resume after a restart), the registry of running tasks, their live
//! counters, checkpoints of the record, and the status and stop verbs.
//! Backup and restore own their flows and use this to register, save and
//! finish.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockd_api::{Hook, Task, TaskKind, TaskState};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::claims::{Claim, Want};
use crate::state::Withheld;

use super::{now, Cloud, CloudError};
use crate::repo::{name, RepoError};

/// Live counters of a task.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes to process.
    pub total: AtomicU64,
    /// Bytes processed.
    pub done: AtomicU64,
    /// Bytes uploaded or fetched.
    pub transferred: AtomicU64,
    /// Plain bytes referenced instead of stored.
    pub reused: AtomicU64,
    /// Plain bytes of new chunks stored.
    pub new: AtomicU64,
    /// Bytes read from the volume.
    pub read: AtomicU64,
    /// Bytes counted done without work in this run: what a resumed task's
    /// earlier runs did, and the holes and units a lazy restore finds in
    /// place when its fill starts. The ETA's rate leaves them out.
    pub free: AtomicU64,
}

impl Progress {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What a task does, kept with its record so it can resume.
// One per task, held with its record: the size of the larger variant costs
// nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(super) enum Plan {
    Backup {
        /// Parent snapshot name (same volume, same location).
        parent: Option<String>,
        /// Chain length of this snapshot.
        chain: u32,
        labels: BTreeMap<String, String>,
        created: String,
        pause_us: u64,
        pre_exec: Option<Hook>,
        post_exec: Option<Hook>,
        /// Its registration in the bucket (garbage collection waits for
        /// it; past its deadline the backup may not commit).
        #[serde(default)]
        session: Option<crate::repo::gc::Session>,
        /// The schedule that started it.
        #[serde(default)]
        schedule: Option<String>,
        /// When the snapshot is to be deleted (RFC 3339).
        #[serde(default)]
        expires: Option<String>,
        /// The identity of the repository it writes into: a repository
        /// made anew at the same place (a different disk mounted there)
        /// holds none of what its checkpoints name.
        #[serde(default)]
        repository: Option<String>,
    },
    Restore {
        src_volume: String,
        src_name: String,
        /// Served while it fills (see `hydrate`).
        #[serde(default)]
        lazy: bool,
        /// Bytes per present-map unit of a lazy restore.
        #[serde(default)]
        unit: u64,
    },
}

/// The persisted record of a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) task: Task,
    pub(super) plan: Plan,
    /// Counters at the last save (read, new).
    #[serde(default)]
    pub(super) read: u64,
    #[serde(default)]
    pub(super) new: u64,
}

pub(super) struct Running {
    pub(super) record: Mutex<Record>,
    pub(super) progress: Arc<Progress>,
    /// Cancelled by `cloudsnap stop` or by shutdown (a child of the
    /// daemon's shutdown token); `stopped` tells the two apart.
    pub(super) stop: CancellationToken,
    pub(super) stopped: std::sync::atomic::AtomicBool,
    pub(super) started: Instant,
    /// Elapsed seconds before this run (earlier runs of a resumed task).
    pub(super) before: f64,
    /// What the ETA is worked out from.
    pub(super) rate: Mutex<Rate>,
    /// A backup's damage avoided (`damage::Avoid::seen`), once its
    /// manifest is written: kept with the volume's backup base.
    pub(super) damage_seen: Mutex<Option<String>>,
}

/// How long a window of progress the ETA's rate is taken over.
const RATE_WINDOW: f64 = 10.0;

/// The rate a task's ETA is worked out from: bytes done over the last
/// [`RATE_WINDOW`] seconds, sampled whenever the task is looked at (its
/// checkpoints and counters do so every few seconds). The average since
/// the start, used until the window spans a second, misleads once part of
/// the work cost nothing: a lazy restore counts holes and chunks already
/// in place as done at once, and a resumed task what earlier runs did.
#[derive(Debug, Default)]
pub(super) struct Rate {
    /// (seconds since this run started, bytes done)
    samples: std::collections::VecDeque<(f64, u64)>,
}

impl Rate {
    /// Seconds to do `left` more bytes at the windowed rate of `worked`,
    /// the bytes this run has worked on (`None`: no window yet, or no
    /// progress in it).
    fn eta(&mut self, now: f64, worked: u64, left: u64) -> Option<f64> {
        if self.samples.back().is_none_or(|(t, _)| now - t >= 0.25) {
            self.samples.push_back((now, worked));
        }
        while self.samples.len() > 2 && now - self.samples[1].0 >= RATE_WINDOW {
            self.samples.pop_front();
        }
        let (t0, d0) = *self.samples.front()?;
        let dt = now - t0;
        if dt < 1.0 {
            return None;
        }
        let rate = worked.saturating_sub(d0) as f64 / dt;
        (rate > 0.0).then(|| left as f64 / rate)
    }
}

impl Running {
    /// The task's id.
    pub(super) fn id(&self) -> String {
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .task
            .id
            .clone()
    }

    pub(super) fn snapshot(&self) -> Record {
        let mut r = self
            .record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let p = &self.progress;
        r.task.bytes_total = Progress::get(&p.total);
        r.task.bytes_done = Progress::get(&p.done);
        r.task.bytes_transferred = Progress::get(&p.transferred);
        r.task.bytes_reused = Progress::get(&p.reused);
        r.read = Progress::get(&p.read);
        r.new = Progress::get(&p.new);
        let secs = self.before + self.started.elapsed().as_secs_f64();
        r.task.elapsed_secs = secs;
        // Rates are of the work this run did, so the bytes that cost
        // nothing neither speed the ETA up nor count as time.
        let worked = r.task.bytes_done.saturating_sub(Progress::get(&p.free));
        let left = r.task.bytes_total.saturating_sub(r.task.bytes_done);
        let run_secs = self.started.elapsed().as_secs_f64();
        let windowed = self
            .rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .eta(run_secs, worked, left);
        r.task.eta_secs = (r.task.state == TaskState::Active && worked > 0 && run_secs > 0.5)
            .then(|| windowed.unwrap_or_else(|| left as f64 / (worked as f64 / run_secs)));
        r
    }

    /// Says why the task is held up (`None`: it is not), in its `error`
    /// while it runs, as status shows it.
    pub(super) fn held_up(&self, why: Option<String>) {
        self.record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .task
            .error = why;
    }
}

/// First pause of a task whose location failed; doubled after each
/// attempt that fails too, up to [`OUTAGE_PAUSE_MAX`].
const OUTAGE_PAUSE: Duration = Duration::from_secs(2);
/// Longest pause between two attempts of a task whose location fails.
const OUTAGE_PAUSE_MAX: Duration = Duration::from_secs(60);
/// Attempts in a row that may fail without moving the checkpoint while
/// the location answers (a flaky provider: requests fail past their
/// own retries, the location does not), before the task fails.
const ANSWERED_ATTEMPTS: u32 = 4;
/// Pause before the next attempt while the location answers: the
/// failed request was already retried with backoff.
const ANSWERED_PAUSE: Duration = Duration::from_secs(1);

/// Shows a task as running until dropped; then its saved record (final,
/// once [`Cloud::finish`] has run) is what status shows. A task's body
/// declares it before its claims, so it drops after them.
pub(super) struct Shown(pub(super) Arc<Cloud>, pub(super) String);

impl Drop for Shown {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// The task a stored record describes. A record this blockd cannot read
/// (written by a later version, or damaged) is not resumed; rather than
/// vanish from `cloudsnap status`, it is shown failed, with as much as can
/// be made out of it and why. The record itself is kept as it is.
fn read_task(id: &str, rec: &str) -> Task {
    let e = match serde_json::from_str::<Record>(rec) {
        Ok(r) => return r.task,
        Err(e) => e,
    };
    let value: serde_json::Value = serde_json::from_str(rec).unwrap_or_default();
    let part = &value["task"];
    let mut t = match serde_json::from_value::<Task>(part.clone()) {
        // Only its plan is unreadable, and that is not needed any more.
        Ok(t) if t.state.is_final() => {
            return Task {
                id: id.to_string(),
                ..t
            }
        }
        Ok(t) => t,
        Err(_) => {
            let text = |k: &str| part[k].as_str().unwrap_or_default().to_string();
            Task {
                id: id.to_string(),
                kind: serde_json::from_value(part["kind"].clone()).unwrap_or(TaskKind::Backup),
                state: TaskState::Failed,
                volume: text("volume"),
                snapshot: text("snapshot"),
                location: text("location"),
                group: part["group"].as_str().map(str::to_string),
                full: part["full"].as_bool().unwrap_or_default(),
                lazy: part["lazy"].as_bool().unwrap_or_default(),
                created: text("created"),
                finished: None,
                bytes_total: 0,
                bytes_done: 0,
                bytes_transferred: 0,
                bytes_reused: 0,
                elapsed_secs: 0.0,
                eta_secs: None,
                error: None,
            }
        }
    };
    t.id = id.to_string();
    t.state = TaskState::Failed;
    t.eta_secs = None;
    t.error = Some(format!(
        "this blockd cannot read the task's record ({e}), so the task is not running and cannot resume here; the record is kept as it is, for the blockd version that wrote it"
    ));
    t
}

/// How often a running task's time and bytes moved are saved (see
/// [`Cloud::save_counters`]).
const COUNTERS_EVERY: Duration = Duration::from_secs(2);

/// Saves the time and bytes moved of `now` (a running task's counters) to
/// its record in `db`, if that is still active.
fn save_counters(db: &crate::state::StateDb, now: &Task) {
    let saved = db.edit_active_task(&now.id, |rec| {
        let mut r = serde_json::from_str::<Record>(rec).ok()?;
        if r.task.state.is_final() {
            return None;
        }
        r.task.elapsed_secs = r.task.elapsed_secs.max(now.elapsed_secs);
        r.task.bytes_transferred = r.task.bytes_transferred.max(now.bytes_transferred);
        r.task.eta_secs = None;
        encode_record(&r).ok()
    });
    if let Err(e) = saved {
        tracing::warn!(task = %now.id, error = %e, "saving a task's counters failed");
    }
}

/// A task record as stored; an encoding failure is an error, never an
/// empty record.
fn encode_record(r: &Record) -> Result<String, CloudError> {
    serde_json::to_string(r).map_err(|source| CloudError::Record {
        id: r.task.id.clone(),
        source,
    })
}

/// A running task's checkpoints, handed to its data path: the blocks
/// (and GETs) it has finished are recorded in the state database together
/// with the task record and its current counters, in one transaction, so
/// a resume after a crash starts from there and counts nothing twice.
#[derive(Clone)]
pub struct Checkpoint {
    run: Arc<Running>,
    db: Arc<crate::state::StateDb>,
}

impl Checkpoint {
    pub(super) fn new(run: Arc<Running>, db: Arc<crate::state::StateDb>) -> Self {
        Self { run, db }
    }

    /// Records `blocks` with the task record. A SQLite commit: callers on
    /// a hot path run it on the blocking pool.
    ///
    /// # Errors
    /// State database errors; a record that does not encode.
    pub fn save(&self, blocks: &[(u64, Option<String>)]) -> Result<(), CloudError> {
        let record = self.run.snapshot();
        self.db
            .checkpoint_task(&record.task.id, blocks, &encode_record(&record)?)?;
        Ok(())
    }
}

/// A task starting now: Active, nothing done yet, a full pass, not lazy,
/// in no group (callers set what differs).
pub(super) fn new_task(
    id: String,
    kind: TaskKind,
    volume: &str,
    snapshot: &str,
    location: &str,
    total: u64,
) -> Task {
    Task {
        id,
        kind,
        state: TaskState::Active,
        volume: volume.to_string(),
        snapshot: snapshot.to_string(),
        location: location.to_string(),
        group: None,
        full: true,
        lazy: false,
        created: now(),
        finished: None,
        bytes_total: total,
        bytes_done: 0,
        bytes_transferred: 0,
        bytes_reused: 0,
        elapsed_secs: 0.0,
        eta_secs: None,
        error: None,
    }
}

pub(super) fn new_task_id() -> String {
    let mut b = [0u8; 8];
    crate::repo::crypto::fill_random(&mut b);
    let h = hex::encode(b);
    format!("{}-{}-{}", &h[..4], &h[4..8], &h[8..])
}

impl Cloud {
    /// The volume task `t` works on, still there.
    pub(super) fn volume_of(&self, t: &Task) -> Result<Arc<crate::volume::Volume>, CloudError> {
        self.volumes
            .get(&t.volume)
            .ok_or_else(|| CloudError::VolumeGone {
                volume: t.volume.clone(),
            })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn save(&self, r: &Record) -> Result<(), CloudError> {
        let json = encode_record(r)?;
        if r.task.state.is_final() {
            self.db.finish_task(&r.task.id, &json)?;
        } else {
            self.db.put_task(&r.task.id, &json, true, &r.task.created)?;
        }
        Ok(())
    }

    /// Saves the records of tasks starting now (active) in one step and,
    /// for a scheduled run, notes that run on its schedule's record in
    /// that same step (see [`StateDb::start_tasks`]): a crash leaves both
    /// or neither.
    ///
    /// [`StateDb::start_tasks`]: crate::state::StateDb::start_tasks
    pub(super) fn save_started(
        &self,
        records: &[&Record],
        run: Option<&super::schedule::RunNote<'_>>,
    ) -> Result<(), CloudError> {
        let json = records
            .iter()
            .map(|r| encode_record(r))
            .collect::<Result<Vec<_>, _>>()?;
        let rows: Vec<(&str, &str, &str)> = records
            .iter()
            .zip(&json)
            .map(|(r, j)| (r.task.id.as_str(), j.as_str(), r.task.created.as_str()))
            .collect();
        let ids: Vec<String> = records.iter().map(|r| r.task.id.clone()).collect();
        let edit = run.map(|n| move |stored: &str| n.note(stored, &ids));
        self.db.start_tasks(
            &rows,
            run.zip(edit.as_ref())
                .map(|(n, e)| (n.id, e as &dyn Fn(&str) -> Option<String>)),
        )?;
        Ok(())
    }

    /// Adds the time task `run` has run and the bytes it has moved to its
    /// saved record: a task interrupted by a shutdown (left Active, to
    /// resume at the next start), and every running task now and then
    /// ([`COUNTERS_EVERY`]), so that a crash loses neither. Its other
    /// counters go with its checkpoints, where it resumes, so nothing is
    /// counted twice. A saved count never goes down (a save that lost a
    /// race with a later one changes nothing), and a final record is left
    /// as it is.
    pub(super) fn save_counters(&self, run: &Running) {
        let now = run.snapshot().task;
        save_counters(&self.db, &now);
    }

    /// Runs a task's `attempt` and, while its location fails in a way that
    /// may go away ([`CloudError::outage`]), runs it again after growing
    /// pauses. Each attempt goes on from the task's last checkpoint (its
    /// counters are set back to that checkpoint first, so nothing is
    /// counted twice), as a resume after a restart does. The task fails
    /// once every attempt has failed for `outage_wait`, counted from the
    /// first failure since its checkpoint last moved: a long backup that
    /// meets two short outages hours apart rides out both. While it
    /// waits, the task shows why (its `error`, as for any task held up),
    /// keeps its claims and its local snapshot, and a stop or a shutdown
    /// ends the wait at once.
    ///
    /// When the location answers, the request failed rather than the
    /// location: a provider that fails many requests past their retries,
    /// or a full local disk (which fails as an unmounted one does). The
    /// task then goes on while its attempts move the checkpoint, and
    /// fails after [`ANSWERED_ATTEMPTS`] in a row that do not: a flaky
    /// provider is ridden out, a full disk fails the task in seconds.
    pub(super) async fn outlast<F, Fut>(
        &self,
        run: &Running,
        mut attempt: F,
    ) -> Result<(), CloudError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), CloudError>>,
    {
        let mut pause = OUTAGE_PAUSE;
        // Since when every attempt has failed, and the checkpoint then.
        let mut failing: Option<(Instant, u64)> = None;
        let mut attempts = 0u32;
        // Of those, the ones that failed while the location answered.
        let mut answered = 0u32;
        loop {
            let e = match attempt().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !e.outage() || run.stop.is_cancelled() {
                return Err(e);
            }
            let answers = !self.location_down(run).await;
            let at = self.rewind(run);
            let since = match failing {
                Some((since, mark)) if at <= mark => since,
                _ => {
                    pause = OUTAGE_PAUSE;
                    attempts = 0;
                    answered = 0;
                    Instant::now()
                }
            };
            failing = Some((since, at));
            attempts += 1;
            answered += u32::from(answers);
            let failed_for = since.elapsed();
            let id = run.id();
            if answers && answered >= ANSWERED_ATTEMPTS {
                tracing::warn!(task = %id, error = %e, attempts, "requests keep failing while the location answers; giving up");
                return Err(e);
            }
            if failed_for >= self.outage_wait {
                tracing::warn!(task = %id, error = %e, attempts, "location still failing; giving up");
                return Err(CloudError::Outage {
                    waited: humantime::format_duration(Duration::from_secs(failed_for.as_secs()))
                        .to_string(),
                    source: Box::new(e),
                });
            }
            let wait =
                if answers { ANSWERED_PAUSE } else { pause }.min(self.outage_wait - failed_for);
            if answers {
                tracing::warn!(task = %id, error = %e, attempts, "a request failed while the location answers; the task goes on from its last checkpoint");
                run.held_up(Some(format!(
                    "{e}; the location answers: attempt {attempts} failed, the next goes on from the last checkpoint (the task fails after {ANSWERED_ATTEMPTS} such failures in a row that move nothing)"
                )));
            } else {
                tracing::warn!(task = %id, error = %e, attempts, retry_in_secs = wait.as_secs_f64(), "location failing; the task goes on from its last checkpoint when it answers");
                run.held_up(Some(format!(
                    "{e}; waiting for the location: attempt {attempts} failed, the next in {}s goes on from the last checkpoint (the task fails after {} of failures)",
                    wait.as_secs().max(1),
                    crate::config::Period(self.outage_wait)
                )));
            }
            tokio::select! {
                () = run.stop.cancelled() => return Err(CloudError::Cancelled),
                () = tokio::time::sleep(wait) => {}
            }
            // Running again: not held up while the attempt goes on.
            run.held_up(None);
            if !answers {
                pause = (pause * 2).min(OUTAGE_PAUSE_MAX);
            }
        }
    }

    /// True when the location of `run` does not answer now: a HEAD of its
    /// config object fails as an outage does, or finds it gone.
    async fn location_down(&self, run: &Running) -> bool {
        let location = run
            .record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .task
            .location
            .clone();
        match self.locations.repo(&location).await {
            Ok(repo) => repo
                .present()
                .await
                .is_err_and(|e| e.transient() || matches!(e, RepoError::Gone { .. })),
            Err(e) => e.outage(),
        }
    }

    /// Task `id`'s record as last saved, if it can be read.
    fn saved(&self, id: &str) -> Option<Record> {
        match self.db.task(id) {
            Ok(Some(rec)) => serde_json::from_str::<Record>(&rec).ok(),
            _ => None,
        }
    }

    /// Sets the counters of `run` back to its last checkpoint, where its
    /// next attempt goes on, and returns the bytes done there. The bytes
    /// it moved stay counted: they were moved.
    fn rewind(&self, run: &Running) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let p = &run.progress;
        if let Some(r) = self.saved(&run.id()) {
            p.done.store(r.task.bytes_done, Relaxed);
            p.reused.store(r.task.bytes_reused, Relaxed);
            p.read.store(r.read, Relaxed);
            p.new.store(r.new, Relaxed);
        }
        Progress::get(&p.done)
    }

    pub(super) fn resume(self: &Arc<Self>, r: Record) {
        tracing::info!(task = %r.task.id, volume = %r.task.volume, "resuming task after restart");
        let id = r.task.id.clone();
        let t = &r.task;
        let want = match &r.plan {
            Plan::Backup { .. } => {
                let snap = name::split(&t.snapshot).map_or("", |(_, n)| n);
                Want::for_backup(&t.id, &t.volume, snap, &t.location)
            }
            Plan::Restore { lazy, .. } => {
                Want::for_restore(&t.id, &t.volume, &t.location, &t.snapshot, *lazy)
            }
        };
        let claim = match self.claims.acquire(want) {
            Ok(c) => c,
            Err(e) => return self.cannot_resume(r, &e.to_string()),
        };
        match r.plan.clone() {
            // Stopped after its base was recorded: committed, and its
            // snapshot's changes are in no map any more (the snapshot
            // may be released already). Only its last steps are left.
            Plan::Backup { .. }
                if self
                    .db
                    .backup_base(&r.task.volume)
                    .ok()
                    .flatten()
                    .is_some_and(|(l, s)| l == r.task.location && s == r.task.snapshot) =>
            {
                self.spawn_completion(r, claim);
            }
            Plan::Backup { .. } => {
                let snap_name = name::split(&r.task.snapshot)
                    .map(|(_, n)| n.to_string())
                    .unwrap_or_default();
                match self.snapshots.get(&r.task.volume, &snap_name) {
                    Some(s) if s.damaged().is_some() => {
                        if let Some(v) = self.volumes.get(&r.task.volume) {
                            v.dirty.lose();
                        }
                        let why = s.damaged().unwrap_or_default();
                        self.fail_record(r, &format!("not backed up: local snapshot {} is damaged: {why}; change tracking is reset so the next backup reads the whole volume", s.id()));
                    }
                    Some(s) => self.spawn_backup(r, s, claim, None, true),
                    None => {
                        if let Some(v) = self.volumes.get(&r.task.volume) {
                            v.dirty.lose();
                        }
                        self.fail_record(r, "the local snapshot of this backup is gone; change tracking is reset so the next backup reads the whole volume");
                    }
                }
            }
            Plan::Restore { lazy: true, .. } => match self.volumes.get(&r.task.volume) {
                // Which units hold the volume's own writes is unknown
                // without its present map: it must not be served.
                Some(v) => match self.attach_lazy(&v, &r, None, false) {
                    Ok(h) => self.spawn_restore(r, Some(h), claim, None),
                    Err(e) => self.cannot_resume(r, &e.to_string()),
                },
                None => self.fail_record(r, "the volume being restored into is gone"),
            },
            Plan::Restore { .. } => match self.volumes.get(&r.task.volume) {
                Some(_) => {
                    // Withheld since its creation; stored again for a
                    // volume created before that was stored.
                    let w = super::restore::filling(&r.task.id, &r.task.snapshot, false);
                    if let Err(e) = self.volumes.withhold(&r.task.volume, w) {
                        tracing::warn!(volume = %r.task.volume, error = %e, "recording the restore's volume as unexported failed");
                    }
                    self.spawn_restore(r, None, claim, None);
                }
                None => self.fail_record(r, "the volume being restored into is gone"),
            },
        }
        tracing::debug!(task = %id, "resumed");
    }

    /// Fails task `r`, which could not resume for `why`. A restore's
    /// volume holds part of a snapshot at most: it stays unexported, for
    /// good and across restarts, until it is deleted.
    fn cannot_resume(&self, r: Record, why: &str) {
        let volume = r.task.volume.clone();
        if !matches!(r.plan, Plan::Restore { .. }) || self.volumes.get(&volume).is_none() {
            return self.fail_record(r, why);
        }
        let reason = self.give_up(
            &volume,
            &format!("restore task {} could not resume: {why}", r.task.id),
        );
        self.fail_record(r, &reason);
    }

    /// Withholds `volume` for good: its restore cannot go on, for `why`.
    /// Returns the reason it is shown with.
    fn give_up(&self, volume: &str, why: &str) -> String {
        let data = self.volumes.data_path(volume);
        let reason = format!("{why}; {}", super::restore::incomplete(volume, &data));
        tracing::warn!(%volume, %reason, "volume not exported");
        let w = Withheld {
            reason: reason.clone(),
            task: None,
        };
        if let Err(e) = self.volumes.withhold(volume, w) {
            tracing::warn!(%volume, error = %e, "recording the volume as unexported failed");
        }
        reason
    }

    /// After the resumes of a start: a volume withheld for a restore
    /// that is not running now is settled. Its restore was Done (the
    /// release was not stored): it is exported. Otherwise the restore
    /// cannot go on (its record is missing or unreadable, or it ended
    /// while that was not stored): it stays withheld for good.
    pub(super) fn settle_withheld(&self) {
        for v in self.volumes.list() {
            let Some(task) = v.withheld_state().and_then(|w| w.task) else {
                continue;
            };
            if self.lock().contains_key(&task) {
                continue;
            }
            let record = self.db.task(&task).ok().flatten();
            let state = record
                .as_deref()
                .and_then(|rec| serde_json::from_str::<Record>(rec).ok())
                .map(|r| r.task.state);
            let volume = v.name();
            let why = match (record, state) {
                (Some(_), Some(TaskState::Done)) => {
                    tracing::info!(%volume, %task, "restore was done: volume exported");
                    if let Err(e) = self.volumes.release(volume) {
                        tracing::warn!(%volume, error = %e, "recording the volume exported failed");
                    }
                    continue;
                }
                (None, _) => format!("restore task {task} has no record"),
                (Some(_), None) => format!("restore task {task} has an unreadable record"),
                (Some(_), Some(s)) => format!("restore task {task} ended {s:?}"),
            };
            self.give_up(volume, &why);
        }
    }

    pub(super) fn fail_record(&self, mut r: Record, why: &str) {
        r.task.state = TaskState::Failed;
        r.task.error = Some(why.to_string());
        r.task.finished = Some(now());
        r.task.eta_secs = None;
        tracing::warn!(task = %r.task.id, error = why, "task failed");
        let _ = self.save(&r);
    }

    /// Registers task `record` (with `progress`, counters shared with
    /// something else, if any) and runs `body` for it on the task
    /// tracker, holding `claim` until it has ended.
    pub(super) fn spawn_run<F, Fut>(
        self: &Arc<Self>,
        record: Record,
        progress: Option<Arc<Progress>>,
        claim: Claim,
        body: F,
    ) where
        F: FnOnce(Arc<Self>, Arc<Running>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let run = self.register(record, progress);
        let shown = Shown(self.clone(), run.snapshot().task.id);
        let me = self.clone();
        self.tracker.spawn(async move {
            // Dropped in reverse order: the claim goes before the task is
            // shown ended, so whoever saw it ended may take the volume.
            let _shown = shown;
            // Held until the task has ended, whatever way it ends.
            let _claim = claim;
            // The time it runs and the bytes it moves are saved now and
            // then: its checkpoints may be far apart (a backup's come
            // every 64 index blocks or 15 s, a lazy restore has none), and
            // a crash would otherwise show a resumed task's time and bytes
            // as counted from the restart.
            let db = me.db.clone();
            let counters = {
                let run = run.clone();
                async move {
                    loop {
                        tokio::time::sleep(COUNTERS_EVERY).await;
                        let (db, now) = (db.clone(), run.snapshot().task);
                        let _ = tokio::task::spawn_blocking(move || save_counters(&db, &now)).await;
                    }
                }
            };
            tokio::select! {
                () = body(me, run) => {}
                () = counters => {}
            }
        });
    }

    pub(super) fn register(&self, r: Record, progress: Option<Arc<Progress>>) -> Arc<Running> {
        let progress = progress.unwrap_or_default();
        use std::sync::atomic::Ordering::Relaxed;
        progress.total.store(r.task.bytes_total, Relaxed);
        progress.done.store(r.task.bytes_done, Relaxed);
        progress.free.store(r.task.bytes_done, Relaxed);
        progress
            .transferred
            .store(r.task.bytes_transferred, Relaxed);
        progress.reused.store(r.task.bytes_reused, Relaxed);
        progress.read.store(r.read, Relaxed);
        progress.new.store(r.new, Relaxed);
        let running = Arc::new(Running {
            before: r.task.elapsed_secs,
            record: Mutex::new(r.clone()),
            progress,
            stop: self.shutdown.child_token(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
            rate: Mutex::default(),
            damage_seen: Mutex::default(),
        });
        if super::lock_set(&self.stop_on_start).remove(&r.task.id) {
            running
                .stopped
                .store(true, std::sync::atomic::Ordering::Release);
            running.stop.cancel();
        }
        self.lock().insert(r.task.id.clone(), running.clone());
        running
    }

    /// Ends a running task with `state`: its final record is saved, and
    /// shown once the task's [`Shown`] guard drops (after the claims and
    /// whatever else the task held are released). So a client that saw
    /// the task Done can at once start what it blocked: a second backup of
    /// the volume, a delete, a resize.
    pub(super) fn finish(&self, run: &Running, state: TaskState, error: Option<String>) -> Record {
        let mut r = run.snapshot();
        r.task.state = state;
        r.task.error = error;
        r.task.finished = Some(now());
        r.task.eta_secs = None;
        crate::metrics::STATS.task_ended(
            match r.task.kind {
                TaskKind::Backup => "backup",
                TaskKind::Restore => "restore",
            },
            match state {
                TaskState::Done => "done",
                TaskState::Stopped => "stopped",
                _ => "failed",
            },
        );
        // A finished task did all there was: the total started as an
        // estimate (a full backup's allocated bytes), it ends as the count.
        if state == TaskState::Done {
            r.task.bytes_total = r.task.bytes_done;
        }
        if let Err(e) = self.save(&r) {
            tracing::error!(task = %r.task.id, error = %e, "saving task record failed");
        }

        // A backup or restore leaves freed buffers in the allocator's
        // arenas: hand them back, so the daemon returns to its idle size.
        // A moment later: the task's last buffers are dropped after this.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let _ = tokio::task::spawn_blocking(crate::host::release_memory).await;
        });
        r
    }

    /// The tasks running now (no database read: for metrics).
    pub fn running(&self) -> Vec<Task> {
        self.lock()
            .values()
            .map(|r| r.snapshot().task)
            .filter(|t| !t.state.is_final())
            .collect()
    }

    /// Tasks, newest first: all, those matching a task or group id, or the
    /// finished ones.
    ///
    /// # Errors
    /// State database errors.
    pub fn tasks(&self, name: Option<&str>, finished: bool) -> Result<Vec<Task>, CloudError> {
        let live: HashMap<String, Task> = self
            .lock()
            .iter()
            .map(|(id, r)| (id.clone(), r.snapshot().task))
            .collect();
        let mut out = Vec::new();
        for (id, rec) in self.db.tasks(false, 1000)? {
            let t = match live.get(&id) {
                Some(t) => t.clone(),
                None => read_task(&id, &rec),
            };
            if let Some(n) = name {
                if t.id != n && t.group.as_deref() != Some(n) {
                    continue;
                }
            }
            if finished && !t.state.is_final() {
                continue;
            }
            out.push(t);
        }
        if let Some(n) = name.filter(|_| out.is_empty()) {
            if super::lock_set(&self.starting_sessions).contains(n) {
                return Err(CloudError::TaskStarting { id: n.to_string() });
            }
            return Err(CloudError::NoTaskOrGroup { id: n.to_string() });
        }
        Ok(out)
    }

    /// One task.
    ///
    /// # Errors
    /// Unknown id.
    pub fn task(&self, id: &str) -> Result<Task, CloudError> {
        if let Some(r) = self.lock().get(id) {
            return Ok(r.snapshot().task);
        }
        let rec = self.db.task(id)?.ok_or_else(|| {
            if super::lock_set(&self.starting_sessions).contains(id) {
                CloudError::TaskStarting { id: id.to_string() }
            } else {
                CloudError::TaskNotFound { id: id.to_string() }
            }
        })?;
        Ok(read_task(id, &rec))
    }

    /// Stops a running task (one still starting once it has started) and
    /// waits for it to end. A stopped restore
    /// deletes its incomplete volume; a lazily restored one may have
    /// clients, so without `force` the stop is refused while they are
    /// connected, as a volume delete is (with it, they are disconnected).
    ///
    /// # Errors
    /// Unknown or finished task; a lazy restore's volume in use.
    pub async fn stop(&self, id: &str, force: bool) -> Result<Task, CloudError> {
        // A backup still starting (its hooks and its freeze under way; the
        // request that starts it returns once it runs) is stopped once it
        // runs: "stop it" is advice that can always be followed. Its start
        // is bounded by the hooks' timeouts.
        let mut run = self.lock().get(id).cloned();
        if run.is_none() && super::lock_set(&self.starting_sessions).contains(id) {
            // Stopped as it is registered (see `register`), so that it
            // does nothing before the stop takes hold.
            super::lock_set(&self.stop_on_start).insert(id.to_string());
            while run.is_none() && super::lock_set(&self.starting_sessions).contains(id) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                run = self.lock().get(id).cloned();
            }
            // Still there: its start failed, or it was registered before
            // the mark. Gone: `register` took it, and the task was stopped
            // there; it may have ended already.
            if !super::lock_set(&self.stop_on_start).remove(id) && run.is_none() {
                for _ in 0..600 {
                    if !self.lock().contains_key(id) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return self.task(id);
            }
        }
        let run = run.or_else(|| self.lock().get(id).cloned());
        let Some(run) = run else {
            let t = self.task(id)?;
            return Err(CloudError::TaskEnded {
                id: id.to_string(),
                state: t.state,
            });
        };
        let task = run.snapshot().task;
        let lazy = task.kind == TaskKind::Restore && task.lazy;
        if lazy {
            if !force {
                crate::volume::settle(|| {
                    self.volumes
                        .get(&task.volume)
                        .map_or(0, |v| v.connections())
                })
                .await;
            }
            self.volumes
                .refuse_connections(&task.volume, force)
                .map_err(|connections| CloudError::InUse {
                    volume: task.volume.clone(),
                    connections,
                })?;
        }
        run.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        run.stop.cancel();
        for _ in 0..600 {
            if !self.lock().contains_key(id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = self.task(id)?;
        if lazy && t.state == TaskState::Done {
            // It completed before the stop reached it: the volume stays.
            self.volumes.accept_connections(&task.volume);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState) -> Task {
        Task {
            id: "t1".into(),
            kind: TaskKind::Restore,
            state,
            volume: "vol".into(),
            snapshot: "src/s1".into(),
            location: "default".into(),
            group: None,
            full: false,
            lazy: true,
            created: "2026-01-01T00:00:00Z".into(),
            finished: None,
            bytes_total: 10,
            bytes_done: 5,
            bytes_transferred: 5,
            bytes_reused: 0,
            elapsed_secs: 1.0,
            eta_secs: Some(1.0),
            error: None,
        }
    }

    /// The ETA follows the rate of the last seconds of work: a lazy
    /// restore that found half its volume in place (holes) at once is not
    /// shown as nearly done, whether or not it was looked at before.
    #[test]
    fn the_eta_follows_the_recent_rate_of_work() {
        let gib = 1u64 << 30;
        let mib = 1u64 << 20;
        let p = Arc::new(Progress::default());
        let mut rec = task(TaskState::Active);
        rec.bytes_done = 0;
        rec.bytes_total = 4 * gib;
        rec.elapsed_secs = 0.0;
        let run = Running {
            before: 0.0,
            record: Mutex::new(Record {
                task: rec,
                plan: Plan::Restore {
                    src_volume: "src".into(),
                    src_name: "s1".into(),
                    lazy: true,
                    unit: 1 << 20,
                },
                read: 0,
                new: 0,
            }),
            progress: p.clone(),
            stop: CancellationToken::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now() - Duration::from_secs(3),
            rate: Mutex::default(),
            damage_seen: Mutex::default(),
        };
        p.total.store(4 * gib, Ordering::Relaxed);
        // Looked at before the fill found its holes.
        assert_eq!(run.snapshot().task.eta_secs, None);
        // 1 GiB of holes in place at once, then 5 MiB fetched in 3 s.
        p.free.store(gib, Ordering::Relaxed);
        p.done.store(gib + 5 * mib, Ordering::Relaxed);
        let eta = run.snapshot().task.eta_secs.unwrap();
        // 3 GiB - 5 MiB left at 5 MiB in 3 s: about 1840 s.
        assert!(
            (eta - (3 * gib - 5 * mib) as f64 / (5 * mib) as f64 * 3.0).abs() < 60.0,
            "{eta}"
        );

        let mut r = Rate::default();
        // Then 100 MiB/s of work.
        assert_eq!(r.eta(0.5, 0, 2 * gib), None);
        let mut eta = None;
        for i in 1..=30u32 {
            let t = 0.5 + f64::from(i) * 0.5;
            let worked = 100 * mib * u64::from(i) / 2;
            eta = r.eta(t, worked, 2 * gib - worked);
        }
        // At 15.5 s: 1500 MiB worked, 548 MiB left at 100 MiB/s.
        let eta = eta.unwrap();
        assert!((eta - 5.48).abs() < 0.1, "{eta}");
        // Nothing done in the window: no estimate.
        let mut r = Rate::default();
        r.eta(0.0, 5, 10);
        assert_eq!(r.eta(2.0, 5, 10), None);
    }

    /// A record of a later version (a plan this blockd does not know) or a
    /// damaged one is listed, failed, with what can be read of it; a
    /// finished task needs no plan and is listed as it ended.
    #[test]
    fn unreadable_records_are_listed_failed_with_what_can_be_read() {
        let later = |t: Task| {
            serde_json::json!({ "task": t, "plan": { "FromALaterVersion": {} } }).to_string()
        };
        let active = read_task("t1", &later(task(TaskState::Active)));
        assert_eq!(active.state, TaskState::Failed);
        assert_eq!(
            (active.volume.as_str(), active.kind),
            ("vol", TaskKind::Restore)
        );
        assert_eq!(active.eta_secs, None);
        assert!(active
            .error
            .as_deref()
            .unwrap()
            .contains("cannot read the task's record"));

        let done = read_task("t1", &later(task(TaskState::Done)));
        assert_eq!(done, task(TaskState::Done));

        for damaged in [
            "{",
            "[]",
            r#"{"task": {"volume": "vol", "kind": "Backup"}}"#,
        ] {
            let t = read_task("t9", damaged);
            assert_eq!(
                (t.id.as_str(), t.state),
                ("t9", TaskState::Failed),
                "{damaged}"
            );
            assert!(t.error.is_some(), "{damaged}");
        }
        let partial = read_task("t9", r#"{"task": {"volume": "vol", "kind": "Backup"}}"#);
        assert_eq!(
            (partial.volume.as_str(), partial.kind),
            ("vol", TaskKind::Backup)
        );
    }
}
