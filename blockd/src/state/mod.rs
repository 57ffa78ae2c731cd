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

use crate::volume::VolumeMeta;

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
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    name        TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    extent_size INTEGER NOT NULL,
    labels      TEXT NOT NULL,
    created     TEXT NOT NULL
);
";

/// The open state database.
#[derive(Debug)]
pub struct StateDb {
    conn: Mutex<Connection>,
    path: String,
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
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
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
                "SELECT name, size, extent_size, labels, created FROM volumes ORDER BY name",
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
                "SELECT name, size, extent_size, labels, created FROM volumes WHERE name = ?1",
                [name],
                row_to_meta,
            )
            .optional()
        })
    }

    /// Inserts a new volume row.
    ///
    /// # Errors
    /// SQLite errors, including a duplicate name.
    pub fn insert_volume(&self, v: &VolumeMeta) -> Result<(), StateError> {
        let labels = serde_json::to_string(&v.labels).unwrap_or_else(|_| "{}".into());
        self.with(|c| {
            c.execute(
                "INSERT INTO volumes (name, size, extent_size, labels, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![v.name, v.size as i64, v.extent_size as i64, labels, v.created],
            )
            .map(drop)
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

    /// Deletes a volume row.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delete_volume(&self, name: &str) -> Result<(), StateError> {
        self.with(|c| {
            c.execute("DELETE FROM volumes WHERE name = ?1", [name])
                .map(drop)
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

fn row_to_meta(r: &rusqlite::Row<'_>) -> rusqlite::Result<VolumeMeta> {
    let labels: String = r.get(3)?;
    Ok(VolumeMeta {
        name: r.get(0)?,
        size: r.get::<_, i64>(1)?.unsigned_abs(),
        extent_size: r.get::<_, i64>(2)?.unsigned_abs(),
        labels: serde_json::from_str::<BTreeMap<String, String>>(&labels).unwrap_or_default(),
        created: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        db.insert_volume(&v).unwrap();
        assert!(db.insert_volume(&v).is_err());
        db.set_size("vol1", 2 << 30).unwrap();
        drop(db);
        let db = StateDb::open(dir.path()).unwrap();
        let got = db.volume("vol1").unwrap().unwrap();
        assert_eq!(got.size, 2 << 30);
        assert_eq!(got.labels, v.labels);
        db.delete_volume("vol1").unwrap();
        assert!(db.volumes().unwrap().is_empty());
    }
}
