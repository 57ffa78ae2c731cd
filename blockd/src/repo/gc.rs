//! Garbage collection, safe while backups run on this host and on others
//! sharing the bucket. The argument is in FORMAT.md ("Garbage
//! collection"); the rules, as this code keeps them:
//!
//! - **Two phases.** A run *marks*: it writes `locks/marks/<id>`, the
//!   packs and index blocks no manifest references, with the *cut* (the
//!   store's time just before it listed the manifests). A later run
//!   *sweeps* a mark once the mark is older than the grace period (the
//!   shorter of the mark's and the sweeping run's) and no
//!   backup that started before the mark is still running: it deletes the
//!   objects that are still unreferenced and were not rewritten since the
//!   cut, then deletes the mark.
//! - **Writers register.** A backup writes `locks/sessions/<task>` before
//!   it chooses its parent, and deletes it after its manifest is written
//!   (or it ends). A session older than its deadline is dead: its backup
//!   refuses to commit, and it no longer holds sweeps back.
//! - **Writers never start from a manifest a pending mark may not have
//!   seen** (one written at or after the mark's cut): such a manifest may
//!   reference condemned objects, so the backup reads the whole volume and
//!   stores its own copies instead.
//! - **Times come from the store** (`LastModified` of objects it just
//!   wrote), never from a host clock.
//! - **Readers hold every sweep.** A restore (and each open `disk.img` of
//!   a catalog mount) writes `locks/readers/<task>`
//!   before it confirms its manifest exists, renews it while it runs and
//!   deletes it when it ends. While any lease is alive, no mark is swept
//!   (whenever the restore started: the manifest it reads may be deleted
//!   by another host after any mark). The leases are listed after the
//!   walk, so a restore that registered later read a manifest the walk saw.
//! - **One collector at a time** through `locks/gc` with a heartbeat; safety
//!   does not rest on it (two collectors at once only do work twice), so a
//!   store that ignores conditional writes loses nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use blockd_api::{GcReport, MaxUnused};

use super::{format, refs, repack, PackId, Repo, RepoError};
use crate::magic::{MARK_MAGIC, SESSION_MAGIC};

/// Key of the collector's run object.
const RUN_KEY: &str = "locks/gc";
/// A run object not refreshed for this long belongs to a dead collector.
pub const HEARTBEAT_LAPSE: Duration = Duration::from_secs(300);
/// How often a running collector refreshes its run object.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(60);
/// The deadline assumed for a session whose object does not open.
const UNREADABLE_DEADLINE: u64 = 7 * 24 * 3600;
/// Deletes in flight.
const DELETES: usize = 16;
/// Name prefix of a collector's own session (while it repacks).
const COLLECTOR_SESSION: &str = "gc-";

fn mark_key(id: &str) -> String {
    format!("locks/marks/{id}")
}

fn session_key(id: &str) -> String {
    format!("locks/sessions/{id}")
}

fn lease_key(id: &str) -> String {
    format!("locks/readers/{id}")
}

/// Longest lease of a reader: how long a host that died while restoring
/// can hold sweeps back.
pub const LEASE_MAX: Duration = Duration::from_secs(600);

fn group_mark_key(group: &str, host: &str) -> String {
    format!("locks/groups/{group}/{host}")
}

/// A group backup's mark (`locks/groups/<group>/<host>`) not rewritten for this
/// long is a dead host's: its group is no longer shown as running.
pub const GROUP_MARK_LAPSE: Duration = Duration::from_secs(120);

/// A group backup's mark not rewritten for this long (by the store's
/// clock) is removed by collection runs.
const GROUP_MARK_DEAD: Duration = Duration::from_secs(3600);

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A backup's registration in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Task id (the object's name).
    pub id: String,
    /// When the store wrote the session object (milliseconds since the
    /// epoch, the store's clock).
    pub started: u64,
    /// The backup may not commit after `started` plus this.
    pub deadline_secs: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionBody {
    task: String,
    host: String,
    deadline_secs: u64,
}

/// A restore's lease in the bucket (`locks/readers/<task>`): while it is
/// alive, no collector on any host sweeps a mark, so nothing the restore
/// reads is deleted under it even when another host deletes the snapshot.
/// Renewed in the background every third of its length; [`Lease::release`]
/// removes it, and so does a drop (in the background), so that no refusal
/// leaves one behind. [`Lease::keep`] leaves it to lapse instead (a
/// restore interrupted by a shutdown, to be resumed).
///
/// Through read-only credentials nothing can be written, so no lease is
/// taken: what such a restore reads is protected from collections on
/// other hosts only by the manifests that reference it, and a snapshot
/// deleted elsewhere while it is read can lose its packs under the
/// restore, which then fails naming the missing object.
#[derive(Debug)]
pub struct Lease {
    repo: Arc<Repo>,
    task: String,
    /// `None` when nothing was written (read-only credentials).
    renew: Option<tokio::task::JoinHandle<()>>,
    /// Removed or kept already: nothing left for the drop.
    settled: bool,
}

impl Lease {
    /// Takes the lease of restore `task` for `length` (at most
    /// [`LEASE_MAX`]; a dead host's lease holds sweeps back that long).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn take(
        repo: &Arc<Repo>,
        task: &str,
        host: &str,
        length: Duration,
    ) -> Result<Self, RepoError> {
        if repo.is_read_only() {
            tracing::info!(location = repo.location(), %task, "read-only credentials: reading without a lease (a collection elsewhere may remove a snapshot deleted meanwhile)");
            return Ok(Self {
                repo: repo.clone(),
                task: task.to_string(),
                renew: None,
                settled: true,
            });
        }
        let length = length.clamp(Duration::from_secs(1), LEASE_MAX);
        let key = lease_key(task);
        let sealed = Bytes::from(repo.seal_registration(&key, task, host, length.as_secs()));
        let put = {
            let repo = repo.clone();
            let key = key.clone();
            move || {
                let sealed = sealed.clone();
                let repo = repo.clone();
                let key = key.clone();
                async move { repo.objects.put(&key, sealed, false).await }
            }
        };
        put().await?;
        let every = length / 3;
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = put().await {
                    tracing::warn!(key = %key, error = %e, "renewing a restore's lease failed; garbage collection on other hosts may reclaim what it reads once the lease lapses");
                }
            }
        });
        Ok(Self {
            repo: repo.clone(),
            task: task.to_string(),
            renew: Some(renew),
            settled: false,
        })
    }

    /// Removes the lease: the restore no longer reads the bucket.
    pub async fn release(mut self) {
        let Some(renew) = self.renew.take() else {
            return;
        };
        renew.abort();
        self.settled = true;
        remove_lease(&self.repo, &self.task).await;
    }

    /// Stops renewing the lease and leaves it to lapse.
    pub fn keep(mut self) {
        self.settled = true;
    }
}

/// What a reader's lease says besides its id: the host taking it, and how
/// long it lasts unrenewed.
#[derive(Debug, Clone)]
pub struct LeaseTerms {
    /// This host's id.
    pub host: String,
    /// Length (at most [`LEASE_MAX`]).
    pub length: Duration,
}

impl LeaseTerms {
    /// Takes lease `id` on these terms (see [`Lease::take`]).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn take(&self, repo: &Arc<Repo>, id: &str) -> Result<Lease, RepoError> {
        Lease::take(repo, id, &self.host, self.length).await
    }
}

async fn remove_lease(repo: &Repo, task: &str) {
    if let Err(e) = repo.objects.delete(&lease_key(task)).await {
        tracing::warn!(%task, error = %e, "removing a restore's lease failed; it holds garbage collection back until it lapses");
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(renew) = &self.renew {
            renew.abort();
        }
        if self.settled {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (repo, task) = (self.repo.clone(), std::mem::take(&mut self.task));
            rt.spawn(async move { remove_lease(&repo, &task).await });
        }
    }
}

/// The cuts of the pending marks, as a backup reads them after it has
/// registered: which manifests it may build on.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    /// `(cut, written)` of each pending mark, milliseconds.
    marks: Vec<(u64, u64)>,
}

impl Fence {
    /// No mark is pending: every manifest is admitted.
    pub fn is_open(&self) -> bool {
        self.marks.is_empty()
    }

    /// Whether a backup may reference the objects of a manifest that the
    /// store wrote at `written`, whose backup registered at `started`
    /// (milliseconds, store clock; `None` when the manifest does not
    /// say). It may when, for every pending mark, the manifest was
    /// written before the mark's cut (so the mark's walk saw it and
    /// condemned nothing it references), or its backup registered after
    /// the mark was written (so that backup saw the mark, built only on
    /// manifests this rule admitted, and wrote everything else after the
    /// cut). A manifest whose backup ran across a mark may reference what
    /// the mark condemned: not admitted. Equal times count as unsafe.
    pub fn admits(&self, written: SystemTime, started: Option<u64>) -> bool {
        let written = millis(written);
        self.marks
            .iter()
            .all(|&(cut, mark)| written < cut || started.is_some_and(|s| s > mark))
    }
}

/// A condemned list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkBody {
    id: String,
    host: String,
    /// Store time just before the marking run listed the manifests,
    /// milliseconds since the epoch.
    cut_ms: u64,
    /// Minimum age of the mark before it is swept, seconds.
    grace_secs: u64,
    /// Condemned packs (hex ids).
    packs: Vec<String>,
    /// Condemned index blocks (hex ids).
    index: Vec<String>,
    /// Condemned relocations (keys).
    #[serde(default)]
    relocs: Vec<String>,
}

/// A mark as read: its body and when the store wrote it.
#[derive(Debug, Clone)]
struct Mark {
    body: MarkBody,
    written: SystemTime,
}

/// Why a collection did not run.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Another collector holds the bucket.
    #[error("location {location}: another collector ({holder}) is running on this bucket (its heartbeat is {age_secs} s old): wait for it, or retry after {lapse_secs} s without a heartbeat")]
    Running {
        /// Location.
        location: String,
        /// Who.
        holder: String,
        /// Age of its last heartbeat.
        age_secs: u64,
        /// When it counts as dead.
        lapse_secs: u64,
    },
    /// Damaged objects make the live set unknown.
    #[error("location {location}: {count} damaged object(s) (first: {first}); nothing was collected, since what the damaged objects reference is unknown: run `blockctl repo check` and delete the damaged snapshots first")]
    Damaged {
        /// Location.
        location: String,
        /// How many.
        count: usize,
        /// The first, named.
        first: String,
    },
}

/// Options of one collection.
#[derive(Debug, Clone)]
pub struct Options {
    /// Minimum age of a mark before its objects are deleted.
    pub grace: Duration,
    /// Report only; change nothing.
    pub dry_run: bool,
    /// Who is collecting (in the run object and marks).
    pub host: String,
    /// No collection of this host runs on the bucket: a fresh run object
    /// of this host is left by a crash and may be taken over.
    pub own_run_is_dead: bool,
    /// Unused space tolerated in packs in use before they are repacked.
    pub max_unused: MaxUnused,
    /// Deadline of the collector's own session while it repacks (as a
    /// backup's).
    pub deadline: Duration,
    /// For a local directory location, the directory its objects are
    /// in: unfinished writes left there by killed writers are removed.
    pub local_dir: Option<std::path::PathBuf>,
    /// Whether a backup session of this host is still in use (its task
    /// is running or will resume, or its request is still starting it),
    /// asked after the sessions are listed. Any other session of this
    /// host is left by a close that failed (the store was unreachable when
    /// the backup ended) or by a daemon stopped or killed while the
    /// backup's hooks ran, before its task existed; it would hold every
    /// sweep back until its deadline, so it is removed.
    pub live: Live,
}

/// See [`Options::live`].
#[derive(Clone)]
pub struct Live(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live(..)")
    }
}

impl Repo {
    /// The store's current time: the modification time of an object it
    /// has just written (then deleted).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn store_now(&self) -> Result<SystemTime, RepoError> {
        let mut tag = [0u8; 8];
        super::crypto::fill_random(&mut tag);
        let key = format!("locks/clock/{}", hex::encode(tag));
        self.objects
            .put(&key, Bytes::from_static(b"blockd clock probe"), false)
            .await?;
        let meta = self.objects.head_meta(&key).await?;
        let _ = self.objects.delete(&key).await;
        meta.map(|m| m.modified).ok_or_else(|| {
            self.objects
                .corrupt(&key, "vanished right after it was written")
        })
    }

    /// Marks group backup `group` as running on `host`
    /// (`locks/groups/<group>/<host>`), for listings on
    /// other hosts: written when the group starts and again well within
    /// [`GROUP_MARK_LAPSE`] while it runs, removed once it has ended (its
    /// group object written first). Only listings read it; checks never
    /// do, collection only removes marks not rewritten for an hour, and
    /// hosts of versions without it never list `locks/groups/`.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn mark_group_running(&self, group: &str, host: &str) -> Result<(), RepoError> {
        let key = group_mark_key(group, host);
        let sealed = self.seal_registration(&key, group, host, GROUP_MARK_LAPSE.as_secs());
        self.objects.put(&key, sealed.into(), false).await.map(drop)
    }

    /// Removes the mark of group backup `group` (see
    /// [`Repo::mark_group_running`]).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn unmark_group_running(&self, group: &str, host: &str) -> Result<(), RepoError> {
        self.objects.delete(&group_mark_key(group, host)).await
    }

    /// The group backups a host other than `host` (this one, which knows
    /// its own) marked as running less than [`GROUP_MARK_LAPSE`] ago, by
    /// this host's clock against the store's write times (one listing, no
    /// object read).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn groups_marked_running(&self, host: &str) -> Result<HashSet<String>, RepoError> {
        let now = SystemTime::now();
        Ok(self
            .objects
            .list_meta("locks/groups")
            .await?
            .into_iter()
            .filter(|l| now.duration_since(l.modified).unwrap_or(Duration::ZERO) < GROUP_MARK_LAPSE)
            .filter_map(|l| {
                let (group, of) = l.key.strip_prefix("locks/groups/")?.split_once('/')?;
                (!group.is_empty() && of != host && !of.contains('/')).then(|| group.to_string())
            })
            .collect())
    }

    /// Registers backup `task` as a writer with a deadline.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn open_session(
        &self,
        task: &str,
        host: &str,
        deadline: Duration,
    ) -> Result<Session, RepoError> {
        let key = session_key(task);
        let sealed = self.seal_registration(&key, task, host, deadline.as_secs());
        self.objects.put(&key, sealed.into(), false).await?;
        let meta = self.objects.head_meta(&key).await?.ok_or_else(|| {
            self.objects
                .corrupt(&key, "vanished right after it was written")
        })?;
        Ok(Session {
            id: task.to_string(),
            started: millis(meta.modified),
            deadline_secs: deadline.as_secs(),
        })
    }

    /// The sealed object of a backup's session or a restore's lease at
    /// `key`.
    fn seal_registration(&self, key: &str, task: &str, host: &str, secs: u64) -> Vec<u8> {
        let body = SessionBody {
            task: task.to_string(),
            host: host.to_string(),
            deadline_secs: secs,
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| unreachable!("sessions serialise"));
        format::envelope(SESSION_MAGIC, &self.keys.seal(key.as_bytes(), &json))
    }

    /// Whether `s` is still registered and within its deadline: the
    /// backup may commit.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn session_valid(&self, s: &Session) -> Result<Result<(), String>, RepoError> {
        let Some(meta) = self.objects.head_meta(&session_key(&s.id)).await? else {
            return Ok(Err(format!(
                "its registration {} is gone from the bucket",
                session_key(&s.id)
            )));
        };
        if millis(meta.modified) != s.started {
            return Ok(Err("its registration was rewritten by someone else".into()));
        }
        let now = millis(self.store_now().await?);
        let age = now.saturating_sub(s.started) / 1000;
        if age >= s.deadline_secs {
            return Ok(Err(format!(
                "it has run {age} s, past its {} s deadline (garbage collection may already have reclaimed what it wrote)",
                s.deadline_secs
            )));
        }
        Ok(Ok(()))
    }

    /// Removes a backup's registration (missing is fine).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn close_session(&self, task: &str) -> Result<(), RepoError> {
        self.objects.delete(&session_key(task)).await
    }

    /// The cuts of the marks not swept yet (see [`Fence::admits`]).
    ///
    /// # Errors
    /// Provider errors; a damaged mark.
    pub async fn gc_fence(&self) -> Result<Fence, RepoError> {
        // Every backup reads this: the cut is taken from the mark's name
        // (`<cut_ms>-<random>`, see `collect`), so a listing is enough; a
        // mark named otherwise is read.
        let mut marks = Vec::new();
        for l in self.objects.list_meta("locks/marks").await? {
            let named = l
                .key
                .strip_prefix("locks/marks/")
                .and_then(|id| id.split('-').next())
                .and_then(|c| c.parse::<u64>().ok());
            let cut = match named {
                Some(c) => c,
                None => match self.mark(&l).await? {
                    Some(m) => m.body.cut_ms,
                    None => continue,
                },
            };
            marks.push((cut, millis(l.modified)));
        }
        Ok(Fence { marks })
    }

    /// When the store wrote snapshot `volume/name`'s manifest.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn manifest_written(
        &self,
        volume: &str,
        name: &str,
    ) -> Result<Option<SystemTime>, RepoError> {
        Ok(self
            .objects
            .head_meta(&super::manifest_key(volume, name))
            .await?
            .map(|l| l.modified))
    }

    async fn marks(&self) -> Result<Vec<(String, Mark)>, RepoError> {
        let mut out = Vec::new();
        for l in self.objects.list_meta("locks/marks").await? {
            let Some(id) = l.key.strip_prefix("locks/marks/") else {
                continue;
            };
            if let Some(m) = self.mark(&l).await? {
                out.push((id.to_string(), m));
            }
        }
        Ok(out)
    }

    /// Reads the listed mark `l`; `None` when another collector swept it
    /// meanwhile.
    async fn mark(&self, l: &super::Listed) -> Result<Option<Mark>, RepoError> {
        let bytes = match self.objects.get_meta(&l.key).await {
            Ok(b) => b,
            Err(RepoError::Missing { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let sealed = format::open_envelope(MARK_MAGIC, &bytes)
            .map_err(|format::Malformed(m)| self.objects.corrupt(&l.key, m))?;
        let json = self.keys.open(l.key.as_bytes(), sealed).map_err(|_| {
            self.objects
                .corrupt(&l.key, "integrity check failed (wrong key, or altered)")
        })?;
        let body: MarkBody =
            serde_json::from_slice(&json).map_err(|e| self.objects.corrupt(&l.key, e))?;
        Ok(Some(Mark {
            body,
            written: l.modified,
        }))
    }

    async fn put_mark(&self, m: &MarkBody) -> Result<SystemTime, RepoError> {
        let key = mark_key(&m.id);
        let json = serde_json::to_vec(m).unwrap_or_else(|_| unreachable!("marks serialise"));
        let sealed = format::envelope(MARK_MAGIC, &self.keys.seal(key.as_bytes(), &json));
        self.objects.put(&key, sealed.into(), true).await?;
        Ok(self
            .objects
            .head_meta(&key)
            .await?
            .map_or(SystemTime::UNIX_EPOCH, |l| l.modified))
    }

    /// The registrations under `locks/<kind>/`: (id, when the store last
    /// wrote it, its body; `None` when it does not open).
    async fn registrations(
        &self,
        kind: &str,
    ) -> Result<Vec<(String, SystemTime, Option<SessionBody>)>, RepoError> {
        let mut out = Vec::new();
        let prefix = format!("locks/{kind}/");
        for l in self.objects.list_meta(&format!("locks/{kind}")).await? {
            let Some(id) = l.key.strip_prefix(&prefix) else {
                continue;
            };
            let body = match self.objects.get_meta(&l.key).await {
                Ok(bytes) => format::open_envelope(SESSION_MAGIC, &bytes)
                    .ok()
                    .and_then(|s| self.keys.open(l.key.as_bytes(), s).ok())
                    .and_then(|j| serde_json::from_slice::<SessionBody>(&j).ok()),
                Err(RepoError::Missing { .. }) => continue,
                Err(e) => return Err(e),
            };
            out.push((id.to_string(), l.modified, body));
        }
        Ok(out)
    }

    /// Sessions: (task id, written, deadline), expired ones included.
    /// With `dead_host`, that host's collector sessions (`gc-*`) are
    /// removed instead: its collection is known not to run, so they are a
    /// crashed run's, and would hold every sweep until their deadline. So
    /// are the sessions of `host`'s backups that `live` says are not in
    /// use.
    async fn sessions(
        &self,
        dead_host: Option<&str>,
        host: &str,
        live: &Live,
    ) -> Result<Vec<(String, SystemTime, Option<u64>)>, RepoError> {
        let mut out = Vec::new();
        for (id, written, body) in self.registrations("sessions").await? {
            let of = body.as_ref().map(|b| b.host.as_str());
            let collector = id.starts_with(COLLECTOR_SESSION);
            let dead_run = collector && of == dead_host && of.is_some();
            if dead_run || (of == Some(host) && !collector && !(live.0)(&id)) {
                if !dead_run {
                    tracing::info!(task = %id, "removing the session of a backup of this host that is not running");
                }
                self.objects.delete(&session_key(&id)).await?;
                continue;
            }
            out.push((id, written, body.map(|b| b.deadline_secs)));
        }
        Ok(out)
    }
}

impl Repo {
    /// Restores' leases: (task id, last renewed, length in seconds).
    async fn leases(&self) -> Result<Vec<(String, SystemTime, u64)>, RepoError> {
        Ok(self
            .registrations("readers")
            .await?
            .into_iter()
            .map(|(id, renewed, body)| {
                // One that does not open counts for the longest lease.
                let length = body.map_or(LEASE_MAX.as_secs(), |b| {
                    b.deadline_secs.min(LEASE_MAX.as_secs())
                });
                (id, renewed, length)
            })
            .collect())
    }
}

/// The collector's hold on the bucket: refreshed in the background,
/// removed at the end. Only saves duplicate work; safety does not rest on
/// it.
struct RunHold {
    repo: Arc<Repo>,
    run: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl RunHold {
    async fn take(
        repo: &Arc<Repo>,
        host: &str,
        own_run_is_dead: bool,
    ) -> Result<(Self, SystemTime), GcError> {
        let mut tag = [0u8; 8];
        super::crypto::fill_random(&mut tag);
        let run = format!("{host} run {}", hex::encode(tag));
        if let Some(meta) = repo.objects.head_meta(RUN_KEY).await? {
            let now = repo.store_now().await?;
            let age = now.duration_since(meta.modified).unwrap_or_default();
            let holder = match repo.objects.get_meta(RUN_KEY).await {
                Ok(b) => Some(String::from_utf8_lossy(&b).into_owned()),
                // Ended between the two requests: nobody holds the bucket.
                Err(RepoError::Missing { .. }) => None,
                Err(e) => Some(format!("unreadable run object {RUN_KEY}: {e}")),
            };
            let ours = holder
                .as_deref()
                .is_some_and(|h| h.split(" run ").next() == Some(host));
            if let Some(holder) =
                holder.filter(|_| age < HEARTBEAT_LAPSE && !(ours && own_run_is_dead))
            {
                return Err(GcError::Running {
                    location: repo.location().to_string(),
                    holder,
                    age_secs: age.as_secs(),
                    lapse_secs: HEARTBEAT_LAPSE.as_secs(),
                });
            }
        }
        let body = Bytes::from(run.clone().into_bytes());
        repo.objects.put(RUN_KEY, body.clone(), false).await?;
        let now = repo
            .objects
            .head_meta(RUN_KEY)
            .await?
            .map(|m| m.modified)
            .ok_or_else(|| {
                repo.objects
                    .corrupt(RUN_KEY, "vanished right after it was written")
            })?;
        let r = repo.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT_EVERY).await;
                if let Err(e) = r.objects.put(RUN_KEY, body.clone(), false).await {
                    tracing::warn!(error = %e, "garbage collection heartbeat failed");
                }
            }
        });
        Ok((
            Self {
                repo: repo.clone(),
                run,
                heartbeat,
            },
            now,
        ))
    }

    async fn release(self) {
        self.heartbeat.abort();
        // Only our own run object is removed.
        if let Ok(b) = self.repo.objects.get_meta(RUN_KEY).await {
            if b.as_ref() == self.run.as_bytes() {
                let _ = self.repo.objects.delete(RUN_KEY).await;
            }
        }
    }
}

/// One collection: sweep the marks that are due, then mark what is
/// unreferenced now. See the module docs.
///
/// # Errors
/// Provider failures; another collector running; a damaged repository.
pub async fn collect(repo: &Arc<Repo>, opts: &Options) -> Result<GcReport, GcError> {
    let (hold, now) = RunHold::take(repo, &opts.host, opts.own_run_is_dead).await?;
    let r = collect_held(repo, opts, now).await;
    hold.release().await;
    r
}

async fn collect_held(
    repo: &Arc<Repo>,
    opts: &Options,
    now: SystemTime,
) -> Result<GcReport, GcError> {
    let mut out = GcReport {
        location: repo.location().to_string(),
        dry_run: opts.dry_run,
        grace_secs: opts.grace.as_secs(),
        ..GcReport::default()
    };
    // Order matters: sessions, then marks, then manifests (the walk). A
    // backup whose session is gone by the listing wrote its manifest
    // before, so the walk sees it.
    let sessions = repo
        .sessions(
            opts.own_run_is_dead.then_some(opts.host.as_str()),
            &opts.host,
            &opts.live,
        )
        .await?;
    let marks = repo.marks().await?;
    let walk = refs::walk(repo).await?;
    if let Some(first) = walk.problems.first() {
        return Err(GcError::Damaged {
            location: repo.location().to_string(),
            count: walk.problems.len(),
            first: format!("{}: {}", first.object, first.reason),
        });
    }
    let (packs, _) = repo.list_packs().await?;
    let (blocks, _) = repo.list_index_blocks().await?;
    let (relocs, _) = repo.list_relocs().await?;
    let relocs: HashMap<String, super::Listed> = relocs
        .into_iter()
        .map(|(_, l)| (l.key.clone(), l))
        .collect();
    let sizes: HashMap<PackId, u64> = packs.iter().map(|(id, l)| (*id, l.size)).collect();
    let packs: HashMap<String, super::Listed> = packs
        .into_iter()
        .map(|(id, l)| (hex::encode(id), l))
        .collect();
    let blocks: HashMap<String, super::Listed> = blocks.into_iter().collect();
    // Listed after the walk: a restore that registers later confirms its
    // manifest after the walk saw it, so nothing it reads is unreferenced.
    let leases = repo.leases().await?;
    let readers: Vec<&String> = leases
        .iter()
        .filter(|(_, renewed, length)| *renewed + Duration::from_secs(*length) > now)
        .map(|(t, _, _)| t)
        .collect();
    let live_pack = |h: &str| -> bool {
        let mut id: PackId = [0; 16];
        hex::decode_to_slice(h, &mut id).is_ok() && walk.packs.contains_key(&id)
    };

    // Sweep.
    let mut pending: HashSet<String> = HashSet::new();
    let mut doomed: Vec<(String, u64)> = Vec::new();
    let mut swept = Vec::new();
    for (id, m) in &marks {
        // The shorter of the mark's grace and this run's decides, so
        // `repo gc --grace 1h` sweeps a mark a 24h run made an hour ago
        // (the writers' sessions, not the grace, keep backups safe).
        let grace = Duration::from_secs(m.body.grace_secs).min(opts.grace);
        let due = m.written + grace <= now;
        // Backups that started before the mark and may still commit, and
        // every running restore.
        let holders: Vec<&String> = sessions
            .iter()
            .filter(|(_, started, deadline)| {
                *started < m.written
                    && *started + Duration::from_secs(deadline.unwrap_or(UNREADABLE_DEADLINE)) > now
            })
            .map(|(t, _, _)| t)
            .chain(readers.iter().copied())
            .collect();
        if !due || !holders.is_empty() {
            if due {
                out.held_marks += 1;
                out.holding.extend(holders.into_iter().cloned());
            } else {
                out.pending_marks += 1;
            }
            pending.extend(m.body.packs.iter().cloned());
            pending.extend(m.body.index.iter().cloned());
            pending.extend(m.body.relocs.iter().cloned());
            continue;
        }
        let cut = from_millis(m.body.cut_ms);
        for h in &m.body.packs {
            match packs.get(h) {
                Some(l) if !live_pack(h) && l.modified < cut => {
                    doomed.push((l.key.clone(), l.size));
                    out.deleted_packs += 1;
                    out.deleted_bytes += l.size;
                }
                Some(_) => out.kept += 1,
                None => {}
            }
        }
        for h in &m.body.index {
            match blocks.get(h) {
                Some(l) if !walk.references_index(h) && l.modified < cut => {
                    doomed.push((l.key.clone(), l.size));
                    out.deleted_index_blocks += 1;
                    out.deleted_bytes += l.size;
                }
                Some(_) => out.kept += 1,
                None => {}
            }
        }
        for k in &m.body.relocs {
            match relocs.get(k) {
                Some(l) if !walk.relocs.contains(k) && l.modified < cut => {
                    doomed.push((l.key.clone(), l.size));
                    out.deleted_relocations += 1;
                    out.deleted_bytes += l.size;
                }
                Some(_) => out.kept += 1,
                None => {}
            }
        }
        swept.push(id.clone());
    }
    out.swept_marks = swept.len() as u64;
    out.holding.sort();
    out.holding.dedup();

    // Mark: unreferenced, older than this run, not condemned already.
    let mut mark = MarkBody {
        id: String::new(),
        host: opts.host.clone(),
        cut_ms: millis(now),
        grace_secs: opts.grace.as_secs(),
        packs: Vec::new(),
        index: Vec::new(),
        relocs: Vec::new(),
    };
    let doomed_keys: HashSet<&str> = doomed.iter().map(|(k, _)| k.as_str()).collect();
    for (h, l) in &packs {
        if !live_pack(h)
            && l.modified < now
            && !pending.contains(h)
            && !doomed_keys.contains(l.key.as_str())
        {
            mark.packs.push(h.clone());
            out.marked_packs += 1;
            out.marked_bytes += l.size;
        }
    }
    for (h, l) in &blocks {
        if !walk.references_index(h)
            && l.modified < now
            && !pending.contains(h)
            && !doomed_keys.contains(l.key.as_str())
        {
            mark.index.push(h.clone());
            out.marked_index_blocks += 1;
            out.marked_bytes += l.size;
        }
    }
    for (k, l) in &relocs {
        if !walk.relocs.contains(k)
            && l.modified < now
            && !pending.contains(k)
            && !doomed_keys.contains(k.as_str())
        {
            mark.relocs.push(k.clone());
            out.marked_relocations += 1;
            out.marked_bytes += l.size;
        }
    }
    let choice = repack::choose(&walk, &sizes, repo.config.pack_size, opts.max_unused);
    out.max_unused = opts.max_unused.to_string();
    out.used_bytes = choice.used;
    out.unused_bytes = choice.unused;
    if opts.dry_run {
        out.repacked_packs = choice.packs.len() as u64;
        out.repacked_bytes = choice.bytes;
        partial_writes(opts, now, &sessions, false, &mut out).await;
        return Ok(out);
    }
    if !choice.packs.is_empty() {
        // Registered like a backup: no sweep deletes a new pack before its
        // relocations are written (rule 2).
        let mut tag = [0u8; 8];
        super::crypto::fill_random(&mut tag);
        let task = format!("{COLLECTOR_SESSION}{}", hex::encode(tag));
        let session = repo.open_session(&task, &opts.host, opts.deadline).await?;
        let r = repack::repack(repo, &walk, &choice.packs, &sizes, &session).await;
        let _ = repo.close_session(&task).await;
        let r = r?;
        for id in &r.sources {
            let h = hex::encode(id);
            if let Some(l) = packs.get(&h) {
                mark.packs.push(h);
                out.marked_packs += 1;
                out.marked_bytes += l.size;
            }
        }
        out.repacked_packs = r.sources.len() as u64;
        out.repacked_bytes = r.bytes;
        out.written_packs = r.written;
        out.skipped = r.skipped;
        record_damage(repo, &walk, &r.damaged, &mut out).await?;
    }
    mark.packs.sort();
    mark.index.sort();
    mark.relocs.sort();
    let mut failed = None;
    let keys: Vec<String> = doomed.iter().map(|(k, _)| k.clone()).collect();
    let mut deletes = futures::stream::iter(keys.into_iter().map(|k| {
        let repo = repo.clone();
        async move {
            let r = repo.objects.delete(&k).await;
            (k, r)
        }
    }))
    .buffer_unordered(DELETES);
    while let Some((k, r)) = deletes.next().await {
        if let Err(e) = r {
            tracing::warn!(object = %k, error = %e, "garbage collection could not delete");
            failed = Some(e);
        }
    }
    drop(deletes);
    if let Some(e) = failed {
        // The marks stay: the next run sweeps what is left.
        return Err(e.into());
    }
    // The damage records of deleted objects go with them.
    if !doomed.is_empty() {
        for (key, object) in repo.damage_keys().await? {
            if doomed_keys.contains(object.as_str()) {
                repo.delete_damage(&key).await?;
            }
        }
    }
    for id in &swept {
        repo.objects.delete(&mark_key(id)).await?;
    }
    if !mark.packs.is_empty() || !mark.index.is_empty() || !mark.relocs.is_empty() {
        let mut tag = [0u8; 8];
        super::crypto::fill_random(&mut tag);
        mark.id = format!("{}-{}", mark.cut_ms, hex::encode(tag));
        repo.put_mark(&mark).await?;
    }
    partial_writes(opts, now, &sessions, true, &mut out).await;
    // Registrations of backups long past their deadline, and leases of
    // restores long lapsed, are dead weight.
    for (t, started, deadline) in &sessions {
        if deadline.is_some_and(|d| *started + Duration::from_secs(d) + HEARTBEAT_LAPSE < now) {
            let _ = repo.close_session(t).await;
        }
    }
    for (t, renewed, length) in &leases {
        if *renewed + Duration::from_secs(*length) + HEARTBEAT_LAPSE < now {
            let _ = repo.objects.delete(&lease_key(t)).await;
        }
    }
    // So are marks of group backups not rewritten for long (their host
    // died, or could not remove them): listings stopped showing their
    // groups as running after GROUP_MARK_LAPSE.
    if let Ok(marks) = repo.objects.list_meta("locks/groups").await {
        for l in marks {
            if l.modified + GROUP_MARK_DEAD < now {
                let _ = repo.objects.delete(&l.key).await;
            }
        }
    }
    Ok(out)
}

/// Counts in `out` the unfinished writes of a local directory location
/// (`opts.local_dir`) that a run deletes, and deletes them if `remove`.
/// They go once older than the grace period, and than every writer that
/// may still run (a later writer's files are newer than the listing
/// `sessions` came from).
async fn partial_writes(
    opts: &Options,
    now: SystemTime,
    sessions: &[(String, SystemTime, Option<u64>)],
    remove: bool,
    out: &mut GcReport,
) {
    let Some(dir) = &opts.local_dir else {
        return;
    };
    let mut cut = now.checked_sub(opts.grace).unwrap_or(UNIX_EPOCH);
    for (_, started, deadline) in sessions {
        if *started + Duration::from_secs(deadline.unwrap_or(UNREADABLE_DEADLINE)) > now {
            cut = cut.min(*started);
        }
    }
    let dir = dir.clone();
    let (n, bytes) = tokio::task::spawn_blocking(move || unfinished_writes(&dir, cut, remove))
        .await
        .unwrap_or_default();
    out.deleted_partial = n;
    out.deleted_bytes += bytes;
}

/// Removes (or with `remove` false, only counts) the unfinished writes
/// under a local directory location last modified before `cut`: a local write goes to `NAME#N` beside its
/// object and is renamed into place when complete, so a writer killed
/// mid-write leaves that file, which no listing shows and nothing else
/// removes. No object name has a `#`. Returns (files, bytes); what cannot
/// be read or removed is logged and left for the next run.
fn unfinished_writes(dir: &std::path::Path, cut: SystemTime, remove: bool) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(e.path());
                continue;
            }
            if !meta.is_file()
                || !e.file_name().to_string_lossy().contains('#')
                || !meta.modified().is_ok_and(|m| m < cut)
            {
                continue;
            }
            if !remove {
                n += 1;
                bytes += meta.len();
                continue;
            }
            if let Err(error) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), %error, "cannot remove an unfinished write");
                continue;
            }
            n += 1;
            bytes += meta.len();
        }
    }
    (n, bytes)
}

/// Records the packs a repacking found damaged, as `repo check` does
/// (see `repo::damage`), so that backups starting afterwards stop
/// building on them, and reports them with the snapshots that need them.
/// Which of a pack's records are damaged is not known here (the repacking
/// stops at the first): the record covers the whole pack, every index
/// block that reaches it, until a check that reads the pack whole
/// (`--read-data`) narrows or clears it. A missing pack is recorded as a
/// check without `--read-data` records one: found again, it is cleared.
async fn record_damage(
    repo: &Arc<Repo>,
    walk: &refs::Refs,
    damaged: &[(PackId, RepoError)],
    out: &mut GcReport,
) -> Result<(), RepoError> {
    for (id, e) in damaged {
        let object = Repo::pack_name(id);
        let Some(p) = walk.packs.get(id) else {
            continue;
        };
        let record = super::damage::Record {
            object: object.clone(),
            data: !matches!(e, RepoError::Missing { .. }),
            index: p
                .index
                .iter()
                .filter_map(|n| walk.index_ids.get(n as usize).cloned())
                .collect(),
            offsets: Vec::new(),
        };
        repo.put_damage(&record).await?;
        tracing::warn!(pack = %object, error = %e, "damage found while repacking: recorded");
        for s in &walk.snapshots_of(&p.index) {
            let Some(name) = walk.snapshots.get(s as usize) else {
                continue;
            };
            match out.damaged.iter_mut().find(|d| d.snapshot == *name) {
                Some(d) => d.objects.push(object.clone()),
                None => out.damaged.push(blockd_api::DamagedSnapshot {
                    snapshot: name.clone(),
                    objects: vec![object.clone()],
                }),
            }
        }
        out.problems.push(blockd_api::Problem {
            object,
            reason: match e {
                RepoError::Missing { .. } => "missing".to_string(),
                RepoError::Corrupt { reason, .. } => reason.clone(),
                e => e.to_string(),
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unfinished_writes_older_than_the_cut_go() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("packs/ab");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("abcd"), b"object").unwrap();
        std::fs::write(sub.join("abce#1"), b"partial").unwrap();
        std::fs::write(d.path().join("config#3"), b"p").unwrap();
        // Nothing is older than a cut in the past.
        assert_eq!(unfinished_writes(d.path(), UNIX_EPOCH, true), (0, 0));
        let later = SystemTime::now() + Duration::from_secs(5);
        // A dry run counts what a run removes, and removes nothing.
        assert_eq!(unfinished_writes(d.path(), later, false), (2, 8));
        assert!(sub.join("abce#1").exists());
        assert_eq!(unfinished_writes(d.path(), later, true), (2, 8));
        assert!(sub.join("abcd").exists());
        assert!(!sub.join("abce#1").exists());
    }

    fn at(ms: u64) -> SystemTime {
        from_millis(ms)
    }

    #[test]
    fn the_fence_admits_only_what_every_pending_mark_saw_or_that_saw_it() {
        // No pending mark: anything.
        assert!(Fence::default().admits(at(5), None));
        // A mark that listed manifests at 100 and was written at 150.
        let f = Fence {
            marks: vec![(100, 150)],
        };
        // Written before the cut: the walk saw it.
        assert!(f.admits(at(99), None));
        assert!(f.admits(at(99), Some(10)));
        // Its backup ran across the mark: not admitted.
        assert!(!f.admits(at(100), Some(90)));
        assert!(!f.admits(at(200), Some(120)));
        assert!(!f.admits(at(200), Some(150)), "equal times are unsafe");
        // Registered after the mark was written: it saw the mark.
        assert!(f.admits(at(200), Some(151)));
        // Older manifests do not say when their backup began.
        assert!(!f.admits(at(200), None));
        // Every pending mark must admit it.
        let f = Fence {
            marks: vec![(100, 150), (300, 350)],
        };
        assert!(f.admits(at(299), Some(151)));
        assert!(!f.admits(at(300), Some(151)));
        assert!(f.admits(at(400), Some(351)));
    }
}
