//! Daemon state in SQLite: `<state dir>/state.db`, WAL mode, synchronous=FULL.
//!
//! Crash rule: a volume exists when its row exists. The data file is created
//! (and fsynced) before the row is inserted and removed after the row is
//! deleted, so a crash leaves at worst an orphan file, which the next create
//! of that name reuses; never a row without a file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

/// Static facts about a volume, as kept in the state database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMeta {
    /// Name (also the NBD export name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Extent size in bytes.
    pub extent_size: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Why the volume is not served; `None` for a volume in use.
    pub withheld: Option<Withheld>,
}

/// Why a volume is not served: a restore is filling it, or one that could
/// not go on left it incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    /// What a user is told (`volume inspect`, an NBD client's error).
    pub reason: String,
    /// The restore task filling it; `None` once no task will (the volume
    /// stays withheld until it is deleted).
    pub task: Option<String>,
}

/// State database errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// SQLite failed.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// Database file.
        path: String,
        /// Cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer blockd.
    #[error("state database {path} has schema version {found}, newer than this blockd understands ({supported}); upgrade blockd")]
    Version {
        /// Database file.
        path: String,
        /// Version found.
        found: i64,
        /// Version supported.
        supported: i64,
    },
}

/// Schema version; bump with a migration, never edit a shipped one.
use crate::magic::SCHEMA_VERSION;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    name        TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    extent_size INTEGER NOT NULL,
    labels      TEXT NOT NULL,
    created     TEXT NOT NULL
);
-- Version 2: object-storage locations, backup and restore tasks.
CREATE TABLE IF NOT EXISTS locations (
    name     TEXT PRIMARY KEY,
    config   TEXT NOT NULL,
    created  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id       TEXT PRIMARY KEY,
    record   TEXT NOT NULL,
    active   INTEGER NOT NULL,
    created  TEXT NOT NULL
);
-- Index blocks a task has finished (a checkpoint): resume skips them.
CREATE TABLE IF NOT EXISTS task_blocks (
    task     TEXT NOT NULL,
    block    INTEGER NOT NULL,
    id       TEXT,
    PRIMARY KEY (task, block)
);
-- Packs a backup uploaded since its last checkpoint, with their chunks:
-- after a restart their chunks are referenced, not uploaded again.
CREATE TABLE IF NOT EXISTS task_packs (
    task     TEXT NOT NULL,
    pack     BLOB NOT NULL,
    trailer  BLOB NOT NULL,
    PRIMARY KEY (task, pack)
);
-- The last backup of each volume: the parent of its next incremental.
CREATE TABLE IF NOT EXISTS backup_base (
    volume   TEXT PRIMARY KEY,
    location TEXT NOT NULL,
    snapshot TEXT NOT NULL
);
-- Version 3: backup schedules, and snapshots this host deletes at a time.
CREATE TABLE IF NOT EXISTS schedules (
    id       TEXT PRIMARY KEY,
    record   TEXT NOT NULL,
    created  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS expiring (
    location TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    at       TEXT NOT NULL,
    PRIMARY KEY (location, snapshot)
);
-- Version 4: volumes not served, and why: a restore's volume from its
-- creation until the restore is done, or for good when the restore can
-- no longer finish. Kept here, not only in memory, so that no restart
-- serves a half-filled volume as if it were whole.
CREATE TABLE IF NOT EXISTS withheld (
    volume   TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    task     TEXT
);
-- Version 5: group objects to write. A group backup's object is recorded
-- here before it is written and dropped once it is, so one that a failing
-- location refused is written later, also after a restart.
CREATE TABLE IF NOT EXISTS pending_groups (
    location   TEXT NOT NULL,
    grp        TEXT NOT NULL,
    record     TEXT NOT NULL,
    repository TEXT,
    PRIMARY KEY (location, grp)
);
-- Version 6: the manifest a restore read when it started, so that it
-- resumes after a restart though another host deleted the snapshot
-- meanwhile (its lease keeps what the manifest references).
CREATE TABLE IF NOT EXISTS task_manifests (
    task     TEXT PRIMARY KEY,
    manifest TEXT NOT NULL
);
";

/// The open state database.
#[derive(Debug)]
pub struct StateDb {
    conn: Mutex<Connection>,
    path: String,
}

/// Every schedule as `(id, record)`, oldest first.
fn schedule_rows(c: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = c.prepare("SELECT id, record FROM schedules ORDER BY created, id")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Ids of the schedules whose record (JSON) satisfies `pred`.
fn schedules_where(
    c: &Connection,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> rusqlite::Result<Vec<String>> {
    Ok(schedule_rows(c)?
        .into_iter()
        .filter(|(_, record)| {
            serde_json::from_str::<serde_json::Value>(record)
                .ok()
                .is_some_and(|v| pred(&v))
        })
        .map(|(id, _)| id)
        .collect())
}

/// A group object still to be written ([`StateDb::pending_groups`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingGroup {
    /// Location name.
    pub location: String,
    /// Group id.
    pub group: String,
    /// The group object (JSON).
    pub record: String,
    /// Identity of the repository its members went into.
    pub repository: Option<String>,
}

/// A schedule's id, and what its record becomes given the stored one
/// (`None`: left as it is), for [`StateDb::start_tasks`].
pub type ScheduleEdit<'a> = (&'a str, &'a dyn Fn(&str) -> Option<String>);

/// What [`StateDb::insert_schedule`] did; `W` says why a schedule
/// clashes.
#[derive(Debug, PartialEq, Eq)]
pub enum Insert<W = String> {
    /// Added.
    Added,
    /// Not added: the location is gone.
    NoLocation,
    /// Not added: schedule `id` clashes with it, for `why`.
    Clash {
        /// The existing schedule.
        id: String,
        /// What the two share.
        why: W,
    },
}

impl StateDb {
    /// Opens (creating if needed) the database in `dir`.
    ///
    /// # Errors
    /// SQLite errors, or a schema newer than this build.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("state.db");
        let path_s = path.display().to_string();
        let err = |source| StateError::Sqlite {
            path: path_s.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(StateError::Version {
                path: path_s,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA).map_err(err)?;
        // Columns added since their tables first came: `pending_groups`
        // without its `repository`; version 7, what the base's backup
        // avoided (`damage::Avoid::seen`).
        for (table, column) in [
            ("pending_groups", "repository"),
            ("backup_base", "damage_seen"),
        ] {
            let has: bool = conn
                .query_row(
                    "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
                    [table, column],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(err)?
                > 0;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} TEXT"))
                    .map_err(err)?;
            }
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(err)?;
        // Manifests kept for restores that never got their task record (a
        // crash in between) or whose task ended without dropping them.
        conn.execute(
            "DELETE FROM task_manifests WHERE task NOT IN (SELECT id FROM tasks WHERE active = 1)",
            [],
        )
        .map_err(err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path_s,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StateError> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&conn).map_err(|source| StateError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Every volume row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn volumes(&self) -> Result<Vec<VolumeMeta>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, size, extent_size, labels, created, w.reason, w.task FROM volumes \
                 LEFT JOIN withheld w ON w.volume = name ORDER BY name",
            )?;
            let rows = stmt.query_map([], row_to_meta)?;
            rows.collect()
        })
    }

    /// One volume row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeMeta>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT name, size, extent_size, labels, created, w.reason, w.task FROM volumes \
                 LEFT JOIN withheld w ON w.volume = name WHERE name = ?1",
                [name],
                row_to_meta,
            )
            .optional()
        })
    }

    /// Inserts a new volume row, and its `withheld` reason in the same
    /// transaction: a volume created to be filled is never, even for a
    /// crash's length, a plain volume.
    ///
    /// # Errors
    /// SQLite errors, including a duplicate name.
    pub fn insert_volume(&self, v: &VolumeMeta) -> Result<(), StateError> {
        let labels = serde_json::to_string(&v.labels).unwrap_or_else(|_| "{}".into());
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO volumes (name, size, extent_size, labels, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![v.name, v.size as i64, v.extent_size as i64, labels, v.created],
            )?;
            if let Some(w) = &v.withheld {
                tx.execute(
                    "INSERT OR REPLACE INTO withheld (volume, reason, task) VALUES (?1, ?2, ?3)",
                    params![v.name, w.reason, w.task],
                )?;
            }
            tx.commit()
        })
    }

    /// Records why volume `name` is not served (`Some`), or that it is
    /// served again (`None`).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_withheld(&self, name: &str, w: Option<&Withheld>) -> Result<(), StateError> {
        self.with(|c| match w {
            Some(w) => c
                .execute(
                    "INSERT OR REPLACE INTO withheld (volume, reason, task) VALUES (?1, ?2, ?3)",
                    params![name, w.reason, w.task],
                )
                .map(drop),
            None => c
                .execute("DELETE FROM withheld WHERE volume = ?1", [name])
                .map(drop),
        })
    }

    /// Records a new size.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_size(&self, name: &str, size: u64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE volumes SET size = ?2 WHERE name = ?1",
                params![name, size as i64],
            )
            .map(drop)
        })
    }

    /// Replaces a volume's labels.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_labels(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), StateError> {
        let labels = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        self.with(|c| {
            c.execute(
                "UPDATE volumes SET labels = ?2 WHERE name = ?1",
                params![name, labels],
            )
            .map(drop)
        })
    }

    /// Deletes a volume row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delete_volume(&self, name: &str) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute("DELETE FROM backup_base WHERE volume = ?1", [name])?;
            tx.execute("DELETE FROM withheld WHERE volume = ?1", [name])?;
            tx.execute("DELETE FROM volumes WHERE name = ?1", [name])?;
            tx.commit()
        })
    }

    /// Checkpoints the WAL into the main file (clean shutdown).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn checkpoint(&self) -> Result<(), StateError> {
        self.with(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);"))
    }
}

/// A recorded pack: `(pack id, plain trailer)`.
pub type PackRow = (Vec<u8>, Vec<u8>);

/// Object-storage locations and tasks.
impl StateDb {
    /// Every location row: `(name, config JSON, created)`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn locations(&self) -> Result<Vec<(String, String, String)>, StateError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT name, config, created FROM locations ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
    }

    /// Inserts a location row.
    ///
    /// # Errors
    /// SQLite errors, including a duplicate name.
    pub fn insert_location(
        &self,
        name: &str,
        config: &str,
        created: &str,
    ) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO locations (name, config, created) VALUES (?1, ?2, ?3)",
                params![name, config, created],
            )
            .map(drop)
        })
    }

    /// Replaces a location's settings.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn update_location(&self, name: &str, config: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE locations SET config = ?2 WHERE name = ?1",
                params![name, config],
            )
            .map(drop)
        })
    }

    /// Deletes a location row unless a schedule backs up to it, in one
    /// step with respect to [`StateDb::insert_schedule`] (both run under
    /// the connection's lock): `Ok(Ok(true))` deleted, `Ok(Ok(false))` no
    /// such row, `Ok(Err(ids))` kept for the schedules `ids`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delete_location(&self, name: &str) -> Result<Result<bool, Vec<String>>, StateError> {
        self.with(|c| {
            let users = schedules_where(c, |v| v["location"] == name)?;
            if !users.is_empty() {
                return Ok(Err(users));
            }
            c.execute("DELETE FROM locations WHERE name = ?1", [name])
                .map(|n| Ok(n > 0))
        })
    }

    /// The schedules that name `volume` (not those that select volumes by
    /// label, which are resolved at each run).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn schedules_naming(&self, volume: &str) -> Result<Vec<String>, StateError> {
        self.with(|c| {
            schedules_where(c, |v| {
                v["spec"]["volumes"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(|v| v == volume))
            })
        })
    }

    /// Adds a new schedule record (JSON) backing up to `location`, only
    /// if that location exists (see [`StateDb::delete_location`]) and no
    /// existing record `clashes` (given the record, it says why); the
    /// checks and the insert are one step.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn insert_schedule<W>(
        &self,
        id: &str,
        record: &str,
        created: &str,
        location: &str,
        clashes: impl Fn(&str) -> Option<W>,
    ) -> Result<Insert<W>, StateError> {
        self.with(|c| {
            let clash = schedule_rows(c)?
                .into_iter()
                .find_map(|(id, r)| clashes(&r).map(|why| (id, why)));
            if let Some((id, why)) = clash {
                return Ok(Insert::Clash { id, why });
            }
            c.execute(
                "INSERT INTO schedules (id, record, created)
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM locations WHERE name = ?4)",
                params![id, record, created, location],
            )
            .map(|n| {
                if n > 0 {
                    Insert::Added
                } else {
                    Insert::NoLocation
                }
            })
        })
    }

    /// Updates a schedule record only if it still exists; true if it did
    /// (a run ending after a delete does not bring it back).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn update_schedule(&self, id: &str, record: &str) -> Result<bool, StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE schedules SET record = ?2 WHERE id = ?1",
                params![id, record],
            )
            .map(|n| n > 0)
        })
    }

    /// Every schedule as `(id, record)`, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn schedules(&self) -> Result<Vec<(String, String)>, StateError> {
        self.with(schedule_rows)
    }

    /// Deletes a schedule; true if it existed.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delete_schedule(&self, id: &str) -> Result<bool, StateError> {
        self.with(|c| {
            c.execute("DELETE FROM schedules WHERE id = ?1", [id])
                .map(|n| n > 0)
        })
    }

    /// Records that `snapshot` of `location` is to be deleted at `at`
    /// (RFC 3339).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn add_expiring(&self, location: &str, snapshot: &str, at: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO expiring (location, snapshot, at) VALUES (?1, ?2, ?3)",
                params![location, snapshot, at],
            )
            .map(drop)
        })
    }

    /// Snapshots due at or before `now` (RFC 3339), as `(location, snapshot)`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn expired(&self, now: &str) -> Result<Vec<(String, String)>, StateError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT location, snapshot FROM expiring WHERE at <= ?1 ORDER BY at")?;
            let rows = st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Forgets an expiring snapshot (deleted, or gone).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn drop_expiring(&self, location: &str, snapshot: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM expiring WHERE location = ?1 AND snapshot = ?2",
                params![location, snapshot],
            )
            .map(drop)
        })
    }

    /// Records group object `record` (JSON) of `group` as still to be
    /// written to `location`, into the repository of identity
    /// `repository`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn add_pending_group(&self, p: &PendingGroup) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO pending_groups (location, grp, record, repository) VALUES (?1, ?2, ?3, ?4)",
                params![p.location, p.group, p.record, p.repository],
            )
            .map(drop)
        })
    }

    /// Group objects still to be written.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn pending_groups(&self) -> Result<Vec<PendingGroup>, StateError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT location, grp, record, repository FROM pending_groups ORDER BY grp",
            )?;
            let rows = st.query_map([], |r| {
                Ok(PendingGroup {
                    location: r.get(0)?,
                    group: r.get(1)?,
                    record: r.get(2)?,
                    repository: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Forgets a group object (written, or its location gone).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn drop_pending_group(&self, location: &str, group: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM pending_groups WHERE location = ?1 AND grp = ?2",
                params![location, group],
            )
            .map(drop)
        })
    }

    /// Writes a task record (JSON).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn put_task(
        &self,
        id: &str,
        record: &str,
        active: bool,
        created: &str,
    ) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tasks (id, record, active, created) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(id) DO UPDATE SET record = ?2, active = ?3",
                params![id, record, active, created],
            )
            .map(drop)
        })
    }

    /// Writes the records of tasks starting now, `(id, record, created)`,
    /// active, and with `schedule`, `(id, edit)`, rewrites that schedule's
    /// record as `edit` returns it (given the stored one; `None` leaves it
    /// as it is, as does a schedule deleted meanwhile): all in one
    /// transaction, so a scheduled run is recorded if and only if its
    /// tasks are.
    ///
    /// # Errors
    /// SQLite errors (then nothing is written).
    pub fn start_tasks(
        &self,
        tasks: &[(&str, &str, &str)],
        schedule: Option<ScheduleEdit<'_>>,
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            for (id, record, created) in tasks {
                tx.execute(
                    "INSERT INTO tasks (id, record, active, created) VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT(id) DO UPDATE SET record = ?2, active = 1",
                    params![id, record, created],
                )?;
            }
            if let Some((id, edit)) = schedule {
                let stored: Option<String> = tx
                    .query_row("SELECT record FROM schedules WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if let Some(record) = stored.as_deref().and_then(edit) {
                    tx.execute(
                        "UPDATE schedules SET record = ?2 WHERE id = ?1",
                        params![id, record],
                    )?;
                }
            }
            tx.commit()
        })
    }

    /// Task ids and records, newest first (in the order they were created
    /// within a second); only active ones with
    /// `active_only`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn tasks(
        &self,
        active_only: bool,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, record FROM tasks WHERE active >= ?1 ORDER BY created DESC, rowid DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![i64::from(active_only), limit], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect()
        })
    }

    /// Whether task `id` has a record that is still active (running, or
    /// resumed at the next start).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn task_active(&self, id: &str) -> Result<bool, StateError> {
        self.with(|c| {
            c.query_row("SELECT active FROM tasks WHERE id = ?1", [id], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|a| a.is_some_and(|a| a != 0))
        })
    }

    /// One task record.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn task(&self, id: &str) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row("SELECT record FROM tasks WHERE id = ?1", [id], |r| r.get(0))
                .optional()
        })
    }

    /// Rewrites the record of task `id` while it is active, with `edit`,
    /// in one step against every other write of the database: nothing (a
    /// checkpoint, the final record) lands between the read and the
    /// write. `edit` returning `None` leaves the record as it is. Returns
    /// whether it was rewritten.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn edit_active_task(
        &self,
        id: &str,
        edit: impl FnOnce(&str) -> Option<String>,
    ) -> Result<bool, StateError> {
        self.with(|c| {
            let record: Option<String> = c
                .query_row(
                    "SELECT record FROM tasks WHERE id = ?1 AND active = 1",
                    [id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(new) = record.as_deref().and_then(edit) else {
                return Ok(false);
            };
            c.execute(
                "UPDATE tasks SET record = ?2 WHERE id = ?1",
                params![id, new],
            )
            .map(|n| n == 1)
        })
    }

    /// A checkpoint: these blocks are finished and the packs recorded so
    /// far are referenced by them (their rows go).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn checkpoint_task(
        &self,
        task: &str,
        blocks: &[(u64, Option<String>)],
        record: &str,
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            for (b, id) in blocks {
                tx.execute(
                    "INSERT OR REPLACE INTO task_blocks (task, block, id) VALUES (?1, ?2, ?3)",
                    params![task, *b as i64, id],
                )?;
            }
            tx.execute("DELETE FROM task_packs WHERE task = ?1", [task])?;
            tx.execute(
                "UPDATE tasks SET record = ?2 WHERE id = ?1",
                params![task, record],
            )?;
            tx.commit()
        })
    }

    /// Finished blocks of a task.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn task_blocks(&self, task: &str) -> Result<Vec<(u64, Option<String>)>, StateError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT block, id FROM task_blocks WHERE task = ?1 ORDER BY block")?;
            let rows = stmt.query_map([task], |r| {
                Ok((r.get::<_, i64>(0)?.unsigned_abs(), r.get(1)?))
            })?;
            rows.collect()
        })
    }

    /// Records an uploaded pack of a running backup.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn add_task_pack(&self, task: &str, pack: &[u8], trailer: &[u8]) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO task_packs (task, pack, trailer) VALUES (?1, ?2, ?3)",
                params![task, pack, trailer],
            )
            .map(drop)
        })
    }

    /// Packs uploaded since a task's last checkpoint: `(pack id, trailer)`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn task_packs(&self, task: &str) -> Result<Vec<PackRow>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT pack, trailer FROM task_packs WHERE task = ?1")?;
            let rows = stmt.query_map([task], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// True when backup `task` recorded a finished block or an uploaded
    /// pack: an earlier attempt of it stored something.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn task_stored(&self, task: &str) -> Result<bool, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM task_blocks WHERE task = ?1) \
                 OR EXISTS (SELECT 1 FROM task_packs WHERE task = ?1)",
                [task],
                |r| r.get(0),
            )
        })
    }

    /// Keeps the manifest (JSON) restore `task` started from.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn put_task_manifest(&self, task: &str, manifest: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO task_manifests (task, manifest) VALUES (?1, ?2)",
                params![task, manifest],
            )
            .map(drop)
        })
    }

    /// Drops the manifest kept for restore `task` (one that did not start).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn drop_task_manifest(&self, task: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute("DELETE FROM task_manifests WHERE task = ?1", [task])
                .map(drop)
        })
    }

    /// The manifest (JSON) restore `task` started from, if kept.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn task_manifest(&self, task: &str) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT manifest FROM task_manifests WHERE task = ?1",
                [task],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Ends a task: its record, and its resume data dropped.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn finish_task(&self, task: &str, record: &str) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute("DELETE FROM task_blocks WHERE task = ?1", [task])?;
            tx.execute("DELETE FROM task_packs WHERE task = ?1", [task])?;
            tx.execute("DELETE FROM task_manifests WHERE task = ?1", [task])?;
            tx.execute(
                "UPDATE tasks SET record = ?2, active = 0 WHERE id = ?1",
                params![task, record],
            )?;
            tx.commit()
        })
    }

    /// The last backup of a volume: `(location, snapshot id)`.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn backup_base(&self, volume: &str) -> Result<Option<(String, String)>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT location, snapshot FROM backup_base WHERE volume = ?1",
                [volume],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    /// What the backup of a volume's base snapshot `snapshot` avoided
    /// (`damage::Avoid::seen`), when it is the base and that is known.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn base_damage_seen(
        &self,
        volume: &str,
        snapshot: &str,
    ) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT damage_seen FROM backup_base WHERE volume = ?1 AND snapshot = ?2",
                [volume, snapshot],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
        })
    }

    /// Records the last backup of a volume (`None` forgets it), with what
    /// its backup avoided when known (a restored snapshot's is not).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_backup_base(
        &self,
        volume: &str,
        base: Option<(&str, &str)>,
        damage_seen: Option<&str>,
    ) -> Result<(), StateError> {
        self.with(|c| match base {
            Some((loc, snap)) => c
                .execute(
                    "INSERT OR REPLACE INTO backup_base (volume, location, snapshot, damage_seen) VALUES (?1, ?2, ?3, ?4)",
                    params![volume, loc, snap, damage_seen],
                )
                .map(drop),
            None => c
                .execute("DELETE FROM backup_base WHERE volume = ?1", [volume])
                .map(drop),
        })
    }
}

fn row_to_meta(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeMeta> {
    let labels: String = r.get(3)?;
    Ok(VolumeMeta {
        name: r.get(0)?,
        size: r.get::<_, i64>(1)?.unsigned_abs(),
        extent_size: r.get::<_, i64>(2)?.unsigned_abs(),
        labels: serde_json::from_str::<BTreeMap<String, String>>(&labels).unwrap_or_default(),
        created: r.get(4)?,
        withheld: match r.get::<_, Option<String>>(5)? {
            Some(reason) => Some(Withheld {
                reason,
                task: r.get(6)?,
            }),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database whose `pending_groups` came without its `repository`
    /// column (an earlier build of schema 5) gains it on open, keeping its
    /// rows; opening it again changes nothing.
    #[test]
    fn pending_groups_gain_their_repository_column_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("state.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE pending_groups (
                    location TEXT NOT NULL,
                    grp      TEXT NOT NULL,
                    record   TEXT NOT NULL,
                    PRIMARY KEY (location, grp)
                );
                INSERT INTO pending_groups VALUES ('local', 'g1', '{}');
                PRAGMA user_version = 5;",
            )
            .unwrap();
        }
        for _ in 0..2 {
            let db = StateDb::open(dir.path()).unwrap();
            let old = PendingGroup {
                location: "local".into(),
                group: "g1".into(),
                record: "{}".into(),
                repository: None,
            };
            assert_eq!(db.pending_groups().unwrap(), vec![old.clone()]);
            let new = PendingGroup {
                group: "g2".into(),
                repository: Some("r".into()),
                ..old.clone()
            };
            db.add_pending_group(&new).unwrap();
            assert_eq!(db.pending_groups().unwrap(), vec![old, new]);
            db.drop_pending_group("local", "g2").unwrap();
        }
    }

    /// A schema 6 database's backup bases gain what their backups avoided
    /// (unknown for the rows already there), which follows the base.
    #[test]
    fn backup_bases_gain_what_their_backups_avoided() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join("state.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE backup_base (
                    volume   TEXT PRIMARY KEY,
                    location TEXT NOT NULL,
                    snapshot TEXT NOT NULL
                );
                INSERT INTO backup_base VALUES ('v', 'local', 'v/s1');
                PRAGMA user_version = 6;",
            )
            .unwrap();
        }
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(
            db.backup_base("v").unwrap(),
            Some(("local".into(), "v/s1".into()))
        );
        assert_eq!(db.base_damage_seen("v", "v/s1").unwrap(), None);
        db.set_backup_base("v", Some(("local", "v/s2")), Some("{}"))
            .unwrap();
        assert_eq!(
            db.base_damage_seen("v", "v/s2").unwrap().as_deref(),
            Some("{}")
        );
        assert_eq!(db.base_damage_seen("v", "v/s1").unwrap(), None);
        db.set_backup_base("v", Some(("local", "v/s3")), None)
            .unwrap();
        assert_eq!(db.base_damage_seen("v", "v/s3").unwrap(), None);
        drop(db);
        assert_eq!(
            StateDb::open(dir.path()).unwrap().backup_base("v").unwrap(),
            Some(("local".into(), "v/s3".into()))
        );
    }

    /// A backup has stored something once it uploaded a pack or finished
    /// a block, until it ends.
    #[test]
    fn a_task_has_stored_once_it_records_a_pack_or_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        db.put_task("t1", "{}", true, "2026-01-01T00:00:00Z")
            .unwrap();
        assert!(!db.task_stored("t1").unwrap());
        db.add_task_pack("t1", &[1; 16], b"trailer").unwrap();
        assert!(db.task_stored("t1").unwrap());
        db.checkpoint_task("t1", &[(0, Some("ab".into()))], "{}")
            .unwrap();
        assert!(db.task_packs("t1").unwrap().is_empty());
        assert!(db.task_stored("t1").unwrap());
        assert!(!db.task_stored("t2").unwrap());
        db.finish_task("t1", "{}").unwrap();
        assert!(!db.task_stored("t1").unwrap());
    }

    /// A kept manifest goes with its task's end, and one whose task
    /// never got a record goes at the next open.
    #[test]
    fn kept_manifests_go_with_their_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        db.put_task("t1", "{}", true, "2026-01-01T00:00:00Z")
            .unwrap();
        db.put_task_manifest("t1", "m1").unwrap();
        db.put_task_manifest("orphan", "m2").unwrap();
        assert_eq!(db.task_manifest("t1").unwrap().as_deref(), Some("m1"));
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.task_manifest("t1").unwrap().as_deref(), Some("m1"));
        assert_eq!(db.task_manifest("orphan").unwrap(), None);
        db.finish_task("t1", "{}").unwrap();
        assert_eq!(db.task_manifest("t1").unwrap(), None);
    }

    #[test]
    fn volumes_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let v = VolumeMeta {
            name: "vol1".into(),
            size: 1 << 30,
            extent_size: 4096,
            labels: [("tier".to_string(), "gold".to_string())].into(),
            created: "2026-11-21T10:15:00Z".into(),
            withheld: None,
        };
        db.insert_volume(&v).unwrap();
        assert!(db.insert_volume(&v).is_err());
        db.set_size("vol1", 2 << 30).unwrap();
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        let got = db.volume("vol1").unwrap().unwrap();
        assert_eq!(got.size, 2 << 30);
        assert_eq!(got.labels, v.labels);
        assert_eq!(got.withheld, None);
        db.delete_volume("vol1").unwrap();
        assert!(db.volumes().unwrap().is_empty());
    }

    #[test]
    fn withheld_volumes_stay_withheld_until_released_or_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let v = VolumeMeta {
            name: "r".into(),
            size: 1 << 20,
            extent_size: 4096,
            labels: BTreeMap::new(),
            created: "2026-11-21T10:15:00Z".into(),
            withheld: Some(Withheld {
                reason: "being restored".into(),
                task: Some("t1".into()),
            }),
        };
        db.insert_volume(&v).unwrap();
        // A failed insert (duplicate name) changes no reason.
        let other = VolumeMeta {
            withheld: None,
            ..v.clone()
        };
        assert!(db.insert_volume(&other).is_err());
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.volume("r").unwrap().unwrap().withheld, v.withheld);
        let failed = Withheld {
            reason: "restore failed".into(),
            task: None,
        };
        db.set_withheld("r", Some(&failed)).unwrap();
        assert_eq!(db.volumes().unwrap()[0].withheld.as_ref(), Some(&failed));
        db.set_withheld("r", None).unwrap();
        assert_eq!(db.volume("r").unwrap().unwrap().withheld, None);
        // A new volume of the same name starts with no old reason.
        db.set_withheld("r", Some(&failed)).unwrap();
        db.delete_volume("r").unwrap();
        db.insert_volume(&VolumeMeta {
            withheld: None,
            ..v
        })
        .unwrap();
        assert_eq!(db.volume("r").unwrap().unwrap().withheld, None);
    }
}
