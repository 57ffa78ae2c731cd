//! Backup schedules (pxctl's `cloudsnap schedules`), their retention, and
//! the expiry of snapshots taken with `--expire`.
//!
//! - Schedules live in the state database. A tick every second starts
//!   each schedule that is due ([`times`]). A run's start time becomes the
//!   schedule's last run in the same step that saves the run's backup
//!   tasks (or, for a run that started none, when it ends with its
//!   error): runs missed while the daemon was down collapse into one run
//!   at start; a crash after a run's backups were saved does not repeat
//!   the run (the backups resume); and a run stopped or killed before
//!   (in its pre-exec, its freeze, or waiting for its volumes) did not
//!   run, so the next start runs it.
//! - A schedule never overlaps itself: a run lasts until its backups have
//!   ended (and its retention is done), and a schedule with a run in
//!   progress, or with a backup still active after a restart, is not
//!   started again. A refused or failed run is recorded
//!   (`schedules list` shows why) and the next slot tries again.
//! - After a run whose backups are all Done, retention deletes, per
//!   volume, the snapshots of this schedule written by this host that no
//!   keep rule keeps ([`retention`]). Deletes go through the coordinator:
//!   a snapshot a restore, lazy restore or mount is reading is skipped
//!   (and tried again after the next run).
//! - `--expire`: the host that took the snapshot deletes it at its time
//!   (recorded locally when the backup is Done; the manifest says so too).

pub mod retention;
pub mod times;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockd_api::{BackupGroupRequest, CreateSchedule, Schedule, TaskState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Cloud, CloudError};
use crate::repo::name;
use crate::state::Insert;
use retention::Keep;
use times::Rule;

/// Newest snapshots kept per volume when `--max` is not given (pxctl).
pub const DEFAULT_MAX: u32 = 7;

/// How long a run waits for volumes another task holds (a backup of the
/// same volume, due at the same moment or still running) before it fails:
/// long enough for a long full backup. Its own slots do not start
/// meanwhile (a schedule never overlaps itself); the next one due starts
/// once this run has ended. `schedules list` shows what it waits for; a
/// daemon stopped (or killed) during the wait runs it at its next start:
/// nothing of the run is recorded before its backups are.
const BUSY_WAIT: Duration = Duration::from_secs(6 * 3600);
/// Pause between two attempts of a run that waits for its volumes.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// The first pause before an expired snapshot whose delete failed is tried
/// again; it doubles up to [`EXPIRE_RETRY_MAX`].
const EXPIRE_RETRY: Duration = Duration::from_secs(5);

/// The longest pause between tries of an expired snapshot's delete.
const EXPIRE_RETRY_MAX: Duration = Duration::from_secs(600);

/// A schedule as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    spec: CreateSchedule,
    location: String,
    rules: Vec<Rule>,
    created: String,
    #[serde(default)]
    last_run: Option<String>,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    last_tasks: Vec<String>,
    #[serde(default)]
    deleted: u64,
}

/// A scheduled run as its schedule's record notes it, in the same step
/// that saves the run's backup tasks (see [`Cloud::save_started`]).
///
/// [`Cloud::save_started`]: super::Cloud::save_started
pub(super) struct RunNote<'a> {
    /// The schedule.
    pub(super) id: &'a str,
    /// When the run started: the schedule's last run from then on.
    at: &'a str,
}

impl RunNote<'_> {
    /// Schedule record `stored` with this run as its last one and `tasks`
    /// as its tasks; `None` if the record does not read.
    pub(super) fn note(&self, stored: &str, tasks: &[String]) -> Option<String> {
        let mut s: Stored = serde_json::from_str(stored).ok()?;
        s.last_run = Some(self.at.to_string());
        s.last_tasks = tasks.to_vec();
        // The previous run's error is not this one's.
        s.last_error = None;
        serde_json::to_string(&s).ok()
    }
}

impl Stored {
    fn keep(&self) -> Keep {
        Keep {
            last: self.spec.max.unwrap_or(DEFAULT_MAX),
            daily: self.spec.keep_daily,
            weekly: self.spec.keep_weekly,
            monthly: self.spec.keep_monthly,
        }
    }

    /// When it is next due.
    fn next(&self) -> Option<DateTime<Utc>> {
        let last = self.last_run.as_deref().unwrap_or(&self.created);
        times::next_due(&self.rules, parse_time(last)?)
    }
}

/// What two schedules to one location at one time both back up.
struct Clash {
    /// The volumes (or the label selection), as [`shared`] says them.
    what: String,
    /// The time.
    when: String,
}

/// What schedules `a` and `b` would both back up, said for a message, or
/// `None` if they cannot overlap: the volumes both name, or for two label
/// schedules where every volume one selects is selected by the other (one
/// selector's labels include all of the other's), that narrower
/// selection. Label selectors neither of which includes the other, and a
/// label schedule beside one of named volumes, are not compared: which
/// volumes a label selects is only known at each run (a run that finds a
/// volume being backed up waits for that backup to end).
fn shared(a: &CreateSchedule, b: &CreateSchedule) -> Option<String> {
    let quoted = |vs: &[&String]| {
        vs.iter()
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (a.select.is_empty(), b.select.is_empty()) {
        (true, true) => {
            let mut both: Vec<&String> =
                a.volumes.iter().filter(|v| b.volumes.contains(v)).collect();
            both.sort();
            both.dedup();
            match both.len() {
                0 => None,
                1 => Some(format!("volume {}", quoted(&both))),
                _ => Some(format!("volumes {}", quoted(&both))),
            }
        }
        (false, false) => {
            let includes = |x: &BTreeMap<String, String>, y: &BTreeMap<String, String>| {
                y.iter().all(|(k, v)| x.get(k) == Some(v))
            };
            let narrower = if includes(&a.select, &b.select) {
                &a.select
            } else if includes(&b.select, &a.select) {
                &b.select
            } else {
                return None;
            };
            let labels: Vec<String> = narrower.iter().map(|(k, v)| format!("{k}={v}")).collect();
            Some(format!("the volumes labelled {}", labels.join(",")))
        }
        _ => None,
    }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    crate::repo::crypto::fill_random(&mut b);
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

impl Cloud {
    /// The schedules that name `volume` (see [`StateDb::schedules_naming`]).
    ///
    /// # Errors
    /// The state database failing.
    ///
    /// [`StateDb::schedules_naming`]: crate::state::StateDb::schedules_naming
    pub fn schedules_naming(&self, volume: &str) -> Result<Vec<String>, CloudError> {
        Ok(self.db.schedules_naming(volume)?)
    }

    /// Creates a schedule.
    ///
    /// # Errors
    /// No rule or volume, a malformed rule, an unknown volume or location.
    pub fn create_schedule(&self, mut spec: CreateSchedule) -> Result<Schedule, CloudError> {
        let bad = |why: String| CloudError::BadSchedule { why };
        if spec.volumes.is_empty() == spec.select.is_empty() {
            return Err(bad(
                "name the volumes (VOLUME or --volume-ids a,b) or labels (--label k=v), one of the two".into(),
            ));
        }
        // Held until the insert: a volume named here is not deleted in
        // between (see `Want::for_schedule_create`).
        let _claim = self
            .claims
            .acquire(crate::claims::Want::for_schedule_create(&spec.volumes))?;
        for v in &spec.volumes {
            if self.volumes.get(v).is_none() {
                return Err(CloudError::VolumeNotFound { volume: v.clone() });
            }
        }
        for (k, v) in &spec.select {
            blockd_api::validate_label(k, v).map_err(bad)?;
        }
        // Resolved again at each run; none now is most likely a typo.
        if !spec.select.is_empty() && self.volumes.carrying(&spec.select).is_empty() {
            return Err(CloudError::NoLabelMatch);
        }
        // Each rule is kept as its flag's value in one form (`09:05` for
        // `9:05`, `sunday@…` for `sun@…`), so that listings and scripts
        // see one spelling.
        let mut rules = Vec::new();
        if let Some(p) = &spec.periodic {
            rules.push(Rule::periodic(p).map_err(bad)?);
        }
        let mut parse = |given: &mut String, rule: fn(&str) -> Result<Rule, String>| {
            let r = rule(given).map_err(bad)?;
            *given = r.arg();
            rules.push(r);
            Ok::<(), CloudError>(())
        };
        for d in &mut spec.daily {
            parse(d, Rule::daily)?;
        }
        for w in &mut spec.weekly {
            parse(w, Rule::weekly)?;
        }
        for m in &mut spec.monthly {
            parse(m, Rule::monthly)?;
        }
        if rules.is_empty() {
            return Err(bad(
                "give when: --periodic MINUTES, --daily hh:mm, --weekly weekday@hh:mm or --monthly day@hh:mm".into(),
            ));
        }
        if spec.max == Some(0) {
            return Err(bad(
                "--max must be at least 1 (the newest snapshot is always kept)".into(),
            ));
        }
        let location = self.locations.resolve(spec.location.as_deref())?;
        self.locations
            .writable(&location, "take scheduled backups")?;
        let id = new_id();
        let stored = Stored {
            spec,
            location,
            rules,
            created: rfc3339(Utc::now()),
            last_run: None,
            last_error: None,
            last_tasks: Vec::new(),
            deleted: 0,
        };
        // Added in one step with two checks: the location still exists (a
        // concurrent `credentials delete` either sees this schedule and
        // refuses, or has deleted the location and this is refused), and
        // no schedule backing up any of the same volumes (see [`shared`])
        // to the same location shares one of its times (the second would
        // back up what the first just did). To another location it may: a
        // local copy and an offsite one at the same time, the second run
        // waiting for the first's backup of the volume to end.
        let clashes = |record: &str| {
            let other: Stored = serde_json::from_str(record).ok()?;
            if other.location != stored.location {
                return None;
            }
            let when = stored.rules.iter().find(|r| other.rules.contains(r))?;
            let what = shared(&stored.spec, &other.spec)?;
            Some(Clash {
                what,
                when: when.to_string(),
            })
        };
        match self.db.insert_schedule(
            &id,
            &encode(&id, &stored)?,
            &stored.created,
            &stored.location,
            clashes,
        )? {
            Insert::Added => {}
            Insert::NoLocation => {
                return Err(crate::cloud::LocationError::NotFound {
                    name: stored.location,
                }
                .into())
            }
            Insert::Clash { id, why } => {
                return Err(CloudError::ScheduleClash {
                    id,
                    what: why.what,
                    location: stored.location,
                    when: why.when,
                })
            }
        }
        tracing::info!(schedule = %id, rules = ?stored.rules, "schedule created");
        Ok(self.to_api(&id, &stored))
    }

    /// Every schedule.
    ///
    /// # Errors
    /// State database errors.
    pub fn schedules(&self) -> Result<Vec<Schedule>, CloudError> {
        Ok(self
            .stored_schedules()?
            .iter()
            .map(|(id, s)| self.to_api(id, s))
            .collect())
    }

    /// Deletes a schedule. A run in progress finishes its backups but
    /// deletes no snapshot once this returns (its retention checks that
    /// the schedule is there under the same lock as each delete).
    ///
    /// # Errors
    /// Unknown id.
    pub async fn delete_schedule(&self, id: &str) -> Result<(), CloudError> {
        let _retention = self.retention.lock().await;
        if !self.db.delete_schedule(id)? {
            return Err(CloudError::ScheduleNotFound { id: id.to_string() });
        }
        tracing::info!(schedule = %id, "schedule deleted");
        Ok(())
    }

    fn stored_schedules(&self) -> Result<Vec<(String, Stored)>, CloudError> {
        Ok(self
            .db
            .schedules()?
            .into_iter()
            .filter_map(|(id, r)| match serde_json::from_str::<Stored>(&r) {
                Ok(s) => Some((id, s)),
                Err(e) => {
                    tracing::error!(schedule = %id, error = %e, "unreadable schedule record");
                    None
                }
            })
            .collect())
    }

    fn to_api(&self, id: &str, s: &Stored) -> Schedule {
        Schedule {
            id: id.to_string(),
            spec: s.spec.clone(),
            location: s.location.clone(),
            rules: s.rules.iter().map(ToString::to_string).collect(),
            max: s.keep().last,
            created: s.created.clone(),
            last_run: s.last_run.clone(),
            next_run: s.next().map(rfc3339),
            running: self.schedule_busy(id),
            waiting: self.lock_sched().get(id).cloned().flatten(),
            last_error: s.last_error.clone(),
            last_tasks: s.last_tasks.clone(),
            deleted: s.deleted,
        }
    }

    /// A run of schedule `id` is in progress, or one of its backups is
    /// still active (resumed after a restart).
    fn schedule_busy(&self, id: &str) -> bool {
        if self.lock_sched().contains_key(id) {
            return true;
        }
        self.lock().values().any(|r| {
            matches!(&r.snapshot().plan, super::task::Plan::Backup { schedule: Some(s), .. } if s == id)
        })
    }

    fn lock_sched(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Option<String>>> {
        self.sched_running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The scheduler: every second, starts the schedules that are due and
    /// deletes the snapshots whose expiry has come. Stops at shutdown.
    pub(super) fn run_scheduler(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(async move {
            let mut retry = HashMap::new();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let Some(cloud) = me.upgrade() else { return };
                cloud.start_due();
                cloud.expire_due(&mut retry).await;
            }
        });
    }

    fn start_due(self: &Arc<Self>) {
        let Ok(all) = self.stored_schedules() else {
            return;
        };
        let now = Utc::now();
        for (id, mut s) in all {
            // A run started here and not recorded counts as this slot's run
            // until the next start of the daemon.
            let attempted = self
                .sched_attempted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&id)
                .cloned();
            if let Some(at) = attempted {
                let later = match (s.last_run.as_deref().and_then(parse_time), parse_time(&at)) {
                    (Some(stored), Some(tried)) => tried > stored,
                    (None, Some(_)) => true,
                    _ => false,
                };
                if later {
                    s.last_run = Some(at);
                }
            }
            if s.next().is_none_or(|n| n > now) || self.schedule_busy(&id) {
                continue;
            }
            // Not started again while this run lasts. Recorded as run (from
            // `now`, so missed slots collapse into this one) only with its
            // backup tasks, or at its end if it started none.
            self.lock_sched().insert(id.clone(), None);
            s.last_run = Some(rfc3339(now));
            self.sched_attempted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id.clone(), rfc3339(now));
            let me = self.clone();
            self.tracker.spawn(async move {
                me.run_schedule(&id, s).await;
                me.lock_sched().remove(&id);
            });
        }
    }

    /// One run of schedule `id`, started at `s.last_run`.
    async fn run_schedule(self: &Arc<Self>, id: &str, mut s: Stored) {
        tracing::info!(schedule = %id, "scheduled backup starting");
        let at = s.last_run.clone().unwrap_or_default();
        let note = RunNote { id, at: &at };
        let spec = &s.spec;
        let req = BackupGroupRequest {
            volumes: spec.volumes.clone(),
            select: spec.select.clone(),
            full: spec.full,
            location: Some(s.location.clone()),
            labels: BTreeMap::new(),
            pre_exec: spec.pre_exec.clone(),
            post_exec: spec.post_exec.clone(),
            exec_timeout_secs: None,
            expire: None,
        };
        let group = spec.volumes.len() > 1 || !spec.select.is_empty();
        let mut errors = Vec::new();
        let mut volumes = Vec::new();
        s.last_tasks.clear();
        // A volume held by another task (often another schedule's backup
        // due at the same moment) is waited for, then backed up: the run
        // is late, not lost.
        let waiting = Instant::now();
        let since = rfc3339(Utc::now());
        let started = loop {
            match self.start_backups(req.clone(), group, Some(&note)).await {
                Err(CloudError::Busy(b)) if waiting.elapsed() < BUSY_WAIT => {
                    if waiting.elapsed() < BUSY_RETRY {
                        tracing::info!(schedule = %id, busy = %b, "scheduled backup waits for the volume");
                    }
                    let what = format!("{} {} (waiting since {since})", b.resource, b.holder.doing);
                    if let Some(w) = self.lock_sched().get_mut(id) {
                        *w = Some(what);
                    }
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => {
                            // Nothing of this run was recorded: the next
                            // start runs it.
                            tracing::info!(schedule = %id, "shutting down while a scheduled backup waited for its volumes: it runs at the next start");
                            return;
                        }
                        () = tokio::time::sleep(BUSY_RETRY) => {}
                    }
                    // Deleted meanwhile: its run goes with it.
                    if !self
                        .stored_schedules()
                        .is_ok_and(|all| all.iter().any(|(i, _)| i == id))
                    {
                        tracing::info!(schedule = %id, "schedule deleted while its run waited; not run");
                        return;
                    }
                }
                r => break r,
            }
        };
        if let Some(w) = self.lock_sched().get_mut(id) {
            *w = None;
        }
        match started {
            Ok(started) => {
                for t in started.tasks {
                    s.last_tasks.push(t.id.clone());
                    let end = self.wait_task(&t.id).await;
                    match end {
                        Some(t) if t.state == TaskState::Done => volumes.push(t.volume),
                        Some(t) => errors.push(format!(
                            "backup of {} {}: {}",
                            t.volume,
                            t.state,
                            t.error.unwrap_or_default()
                        )),
                        None => return, // shutting down: resumed at the next start
                    }
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
        if errors.is_empty() {
            for v in &volumes {
                match self.retain(id, &s.location, v, s.keep()).await {
                    Ok(n) => s.deleted += n,
                    Err(e) => errors.push(format!("retention of {v}: {e}")),
                }
            }
        }
        s.last_error = (!errors.is_empty()).then(|| errors.join("; "));
        if let Some(e) = &s.last_error {
            tracing::warn!(schedule = %id, error = %e, "scheduled backup failed; tried again at the next slot");
        } else {
            tracing::info!(schedule = %id, volumes = ?volumes, "scheduled backup done");
        }
        // Only the fields a run owns are written back over the latest
        // record (its last run too: a run that started no backup is
        // recorded here, with its error, and tried again at the next slot).
        if let Some((_, mut latest)) = self
            .stored_schedules()
            .ok()
            .and_then(|all| all.into_iter().find(|(i, _)| i == id))
        {
            latest.last_run = s.last_run;
            latest.last_error = s.last_error;
            latest.last_tasks = s.last_tasks;
            latest.deleted = s.deleted;
            if let Err(e) = encode(id, &latest).and_then(|r| Ok(self.db.update_schedule(id, &r)?)) {
                tracing::error!(schedule = %id, error = %e, "cannot record how the scheduled backup ended");
            }
        }
    }

    /// Waits for task `id` to end; `None` at shutdown.
    async fn wait_task(&self, id: &str) -> Option<blockd_api::Task> {
        loop {
            if let Ok(t) = self.task(id) {
                if t.state.is_final() {
                    return Some(t);
                }
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Deletes the snapshots of `volume` that schedule `id` made on this
    /// host and `keep` does not keep; returns how many went.
    async fn retain(
        &self,
        id: &str,
        location: &str,
        volume: &str,
        keep: Keep,
    ) -> Result<u64, CloudError> {
        let repo = self.locations.repo(location).await?;
        let mut mine = Vec::new();
        for (v, n) in repo.list_snapshots(Some(volume)).await? {
            if !name::is_valid(&n) {
                continue;
            }
            let Ok(m) = repo.get_manifest(&v, &n).await else {
                continue;
            };
            if m.schedule.as_deref() != Some(id) || m.host.as_deref() != Some(self.host.as_str()) {
                continue;
            }
            if let Some(t) = parse_time(&m.created) {
                mine.push((n, t));
            }
        }
        let mut deleted = 0;
        for n in retention::to_delete(&mine, &keep) {
            let snap = name::id(volume, n);
            let _retention = self.retention.lock().await;
            if !self
                .stored_schedules()?
                .iter()
                .any(|(schedule, _)| schedule == id)
            {
                tracing::info!(schedule = %id, "schedule deleted during its run: its snapshots stay");
                break;
            }
            match self.delete(Some(location), &snap).await {
                Ok(()) => {
                    deleted += 1;
                    tracing::info!(schedule = %id, snapshot = %snap, "retention deleted");
                }
                Err(CloudError::Busy(b)) => {
                    tracing::info!(schedule = %id, snapshot = %snap, reason = %b, "retention skipped a snapshot in use; tried again after the next run");
                }
                Err(CloudError::SnapshotNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Deletes the snapshots whose `--expire` time has come. One whose
    /// delete failed is tried again after [`EXPIRE_RETRY`], the pause
    /// doubling up to [`EXPIRE_RETRY_MAX`] (`retry`: when each is due
    /// next, and the pause after that), so a location that is away is not
    /// asked every second.
    async fn expire_due(&self, retry: &mut HashMap<(String, String), (Instant, Duration)>) {
        let Ok(due) = self
            .db
            .expired(&humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string())
        else {
            return;
        };
        retry.retain(|k, _| due.contains(k));
        for (location, snap) in due {
            let key = (location.clone(), snap.clone());
            if retry.get(&key).is_some_and(|(at, _)| *at > Instant::now()) {
                continue;
            }
            let pause = retry.get(&key).map_or(EXPIRE_RETRY, |(_, p)| *p);
            retry.insert(
                key,
                (Instant::now() + pause, (pause * 2).min(EXPIRE_RETRY_MAX)),
            );
            match self.delete(Some(&location), &snap).await {
                Ok(()) => {
                    tracing::info!(snapshot = %snap, %location, "expired snapshot deleted");
                    let _ = self.db.drop_expiring(&location, &snap);
                }
                // Gone already, or its location deleted or made read-only
                // since. A location that fails (a directory not mounted, a
                // store not answering) is tried again.
                Err(CloudError::SnapshotNotFound { .. }) => {
                    let _ = self.db.drop_expiring(&location, &snap);
                }
                Err(CloudError::Location(e)) if e.refuses_writes_for_good() => {
                    let _ = self.db.drop_expiring(&location, &snap);
                }
                // In use (a restore or a mount reads it), or its location
                // failing: said once, then tried again with growing pauses.
                Err(e) if pause == EXPIRE_RETRY => {
                    tracing::info!(snapshot = %snap, %location, reason = %e, "expired snapshot not deleted yet; tried again later");
                }
                Err(e) => {
                    tracing::debug!(snapshot = %snap, error = %e, "expired snapshot not deleted yet");
                }
            }
        }
    }
}

fn encode(id: &str, s: &Stored) -> Result<String, CloudError> {
    serde_json::to_string(s).map_err(|source| CloudError::Record {
        id: id.to_string(),
        source,
    })
}
