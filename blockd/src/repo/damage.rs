//! Damage records (`damaged/<object key>`): what `repo check` found
//! damaged, kept in the repository so that new backups stop using it.
//!
//! A backup shares what its parent already stored: index blocks of ranges
//! that did not change, and chunks found unchanged at the same place.
//! After a check has found a damaged pack or index block, that sharing
//! would carry the damage into every new snapshot of the volume, `--full`
//! ones too, each reporting Done. So a check records, for each damaged
//! pack or index block, the index blocks that reach the damage; a backup
//! that starts afterwards neither keeps those nor takes chunks from them:
//! it reads their ranges from the volume again and stores fresh copies
//! (see `cloud::backup::stream`). A backup already running when the
//! check ends does not see the record; the next check, which traces the
//! recorded offsets to their users again, names and records what it
//! wrote if it used the damage.
//!
//! A record goes when a later check finds its object whole (a pack found
//! damaged by reading its records only when that check reads it whole
//! too), or no snapshot uses the object any more (a record of damaged
//! offsets stays while its pack exists: a backup running then may yet
//! commit a reference to them); garbage collection deletes the record
//! with the object. Records are few and small: one
//! listing per backup finds them.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::crypto::Tampered;
use super::format::{self, Malformed};
use super::{Repo, RepoError};
use crate::magic::DAMAGE_MAGIC;

/// Key prefix of damage records.
const DIR: &str = "damaged";

/// What a damaged object means for new backups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The damaged object's key (`packs/…` or `index/…`).
    pub object: String,
    /// Found only by opening records (`repo check --read-data`): only a
    /// check that reads the pack whole again can clear it.
    pub data: bool,
    /// Index block ids (hex) a backup must neither keep nor take chunks
    /// from: they are damaged, or reference damaged records. (Any other
    /// index block references no damaged record, so neither can a chunk
    /// found unchanged at its place.)
    pub index: Vec<String>,
    /// Offsets of the damaged records in a pack (empty for an index
    /// block, a pack damaged whole, and records of older builds). Every
    /// check traces them to their users again, so a backup that took one
    /// while the check that found it ran is named, and recorded, by the
    /// next check, even one that does not read data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<u32>,
}

/// What a backup avoids: the index blocks of every record.
#[derive(Debug, Default)]
pub struct Avoid {
    /// Index blocks a backup reads again from the volume.
    pub index: HashSet<String>,
}

/// Key of the record of `object`.
fn key(object: &str) -> String {
    format!("{DIR}/{object}")
}

impl Repo {
    /// Every damage record, with the keys of those that do not open
    /// (which the caller names or replaces).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn damage_records(&self) -> Result<(Vec<Record>, Vec<RepoError>), RepoError> {
        let mut records = Vec::new();
        let mut unreadable = Vec::new();
        for k in self.objects.list(DIR).await? {
            match self.get_damage(&k).await {
                Ok(r) => records.push(r),
                Err(RepoError::Missing { .. }) => {}
                Err(e) if super::refs::is_damage(&e) => unreadable.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok((records, unreadable))
    }

    async fn get_damage(&self, k: &str) -> Result<Record, RepoError> {
        let bytes = self.objects.get_meta(k).await?;
        let sealed = format::open_envelope(DAMAGE_MAGIC, &bytes)
            .map_err(|Malformed(m)| self.objects.corrupt(k, m))?;
        let json = self.keys.open(k.as_bytes(), sealed).map_err(|Tampered| {
            self.objects
                .corrupt(k, "integrity check failed (wrong key, or altered)")
        })?;
        let r: Record = serde_json::from_slice(&json).map_err(|e| self.objects.corrupt(k, e))?;
        if key(&r.object) != k {
            return Err(self.objects.corrupt(k, "names another object"));
        }
        Ok(r)
    }

    /// What a backup starting now avoids.
    ///
    /// # Errors
    /// Provider errors; a record that does not open, named, with what to
    /// do (a check writes it again): reading on without it could carry
    /// damage into the new snapshot.
    pub async fn avoid(&self) -> Result<Avoid, RepoError> {
        let (records, unreadable) = self.damage_records().await?;
        if let Some(RepoError::Corrupt {
            location,
            object,
            reason,
        }) = unreadable.into_iter().next()
        {
            return Err(RepoError::Corrupt {
                location,
                object,
                reason: format!(
                    "{reason}; this damage record says what new backups must not reuse: run `blockctl repo check`, which writes it again"
                ),
            });
        }
        Ok(Avoid {
            index: records.into_iter().flat_map(|r| r.index).collect(),
        })
    }

    /// Writes (or replaces) the record of `r.object`.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn put_damage(&self, r: &Record) -> Result<(), RepoError> {
        let k = key(&r.object);
        let json = serde_json::to_vec(r).unwrap_or_else(|_| unreachable!("records serialise"));
        let body = format::envelope(DAMAGE_MAGIC, &self.keys.seal(k.as_bytes(), &json));
        self.objects.put(&k, body.into(), false).await?;
        Ok(())
    }

    /// Deletes the record of `object` (the key of a damaged object, or of
    /// an unreadable record itself).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn delete_damage(&self, object: &str) -> Result<(), RepoError> {
        let k = if object.starts_with(&format!("{DIR}/")) {
            object.to_string()
        } else {
            key(object)
        };
        self.objects.delete(&k).await
    }

    /// Keys of the objects that have a record, however it reads.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn damaged_objects(&self) -> Result<Vec<String>, RepoError> {
        Ok(self
            .objects
            .list(DIR)
            .await?
            .into_iter()
            .filter_map(|k| k.strip_prefix(&format!("{DIR}/")).map(str::to_string))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use object_store::ObjectStore;

    use super::*;

    async fn repo() -> Repo {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        Repo::open(store, "", "mem", None, None, true)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn records_round_trip_and_a_moved_or_altered_one_is_named() {
        let repo = repo().await;
        assert!(repo.avoid().await.unwrap().index.is_empty());
        let a = Record {
            object: "packs/ab/ab00".into(),
            data: true,
            index: vec!["11".into(), "22".into()],
            offsets: vec![0, 4096],
        };
        let b = Record {
            object: "index/cd/cd00".into(),
            data: false,
            index: vec!["cd00".into()],
            offsets: Vec::new(),
        };
        repo.put_damage(&a).await.unwrap();
        repo.put_damage(&b).await.unwrap();
        // A record of an older build, without offsets, reads as none.
        let old: Record =
            serde_json::from_str(r#"{"object":"packs/ab/ab00","data":true,"index":["11"]}"#)
                .unwrap();
        assert!(old.offsets.is_empty());
        let (mut got, bad) = repo.damage_records().await.unwrap();
        got.sort_by(|x, y| x.object.cmp(&y.object));
        assert!(bad.is_empty());
        assert_eq!(got, vec![b.clone(), a.clone()]);
        let avoid = repo.avoid().await.unwrap();
        assert_eq!(
            avoid.index,
            HashSet::from(["11".into(), "22".into(), "cd00".into()])
        );
        assert_eq!(
            repo.damaged_objects().await.unwrap(),
            vec!["index/cd/cd00".to_string(), "packs/ab/ab00".to_string()]
        );

        // A record copied under another object's key does not open; a
        // backup is told which record and what to run.
        let o = repo.objects();
        let body = o.get_meta("damaged/packs/ab/ab00").await.unwrap();
        o.put("damaged/packs/ef/ef00", body, false).await.unwrap();
        let e = repo.avoid().await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("damaged/packs/ef/ef00") && msg.contains("blockctl repo check"),
            "{msg}"
        );
        o.put("damaged/packs/ef/ef00", Bytes::from_static(b"junk"), false)
            .await
            .unwrap();
        let (_, bad) = repo.damage_records().await.unwrap();
        assert_eq!(bad.len(), 1);
        repo.delete_damage(bad[0].object()).await.unwrap();
        repo.delete_damage("packs/ab/ab00").await.unwrap();
        assert_eq!(
            repo.avoid().await.unwrap().index,
            HashSet::from(["cd00".into()])
        );
    }
}
