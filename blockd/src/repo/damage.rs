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
//! wrote if it used the damage. Until then, the backups after it find it
//! themselves: one whose parent's backup did not avoid every damaged
//! record known now reads the parent's index blocks ([`Repo::screen`],
//! [`Avoid::covered_by`]), so the damage does not pass from snapshot to
//! snapshot, each reporting Done, until the next check.
//!
//! A record goes when a later check finds its object whole (a pack found
//! damaged by reading its records only when that check reads it whole
//! too), or no snapshot uses the object any more (a record of damaged
//! offsets stays while its pack exists: a backup running then may yet
//! commit a reference to them); garbage collection deletes the record
//! with the object. Records are few and small: one
//! listing per backup finds them.
//!
//! Checks that run at once (two requests on one host, or hosts sharing a
//! bucket) never undo each other. Every record is written under a key of
//! its own, `damaged/<object key>.<tag>` (16 random hex digits), never
//! over another, and a check deletes only keys it read before its walk of
//! the snapshots began (so each is judged by a walk that saw everything
//! its writer saw). Readers merge every record of one object (`Record::merge`:
//! the union of what each avoids), so what another check recorded
//! meanwhile stays in force until a later check, which reads it, decides
//! on it. With one key per object, a check that read the record, traced
//! its damage and wrote the result could overwrite what another check had
//! written in between, and a backup would then reuse damage that check
//! found; a store's conditional writes could not close that for the local
//! directory, which has none for replacing. Records under the key of
//! earlier builds (`damaged/<object key>`) are read, merged and replaced
//! the same way.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::crypto::Tampered;
use futures::StreamExt;

use super::format::{self, Malformed, Manifest};
use super::{PackId, Repo, RepoError};
use crate::magic::DAMAGE_MAGIC;

/// Key prefix of damage records.
const DIR: &str = "damaged";
/// Index blocks [`Repo::screen`] reads at once.
const SCREENS: usize = 16;
/// Listings that [`Repo::damage_records`] makes at most while records it
/// listed are replaced under it.
const LISTINGS: usize = 4;

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

impl Record {
    /// Damage found by opening records whose offsets are not listed (an
    /// older build's record, or one replacing a record that did not
    /// open): it stands for the whole pack's data.
    fn unlisted(&self) -> bool {
        self.data && self.offsets.is_empty()
    }

    /// Takes in another record of the same object: the result avoids
    /// what either does.
    pub fn merge(&mut self, other: Record) {
        let unlisted = self.unlisted() || other.unlisted();
        self.data |= other.data;
        for id in other.index {
            if !self.index.contains(&id) {
                self.index.push(id);
            }
        }
        if unlisted {
            self.offsets.clear();
        } else {
            let all: BTreeSet<u32> = self.offsets.drain(..).chain(other.offsets).collect();
            self.offsets = all.into_iter().collect();
        }
    }
}

/// The damage records of a repository as read at one moment.
#[derive(Debug, Default)]
pub struct Recorded {
    /// One per object, every record of it merged.
    pub records: Vec<Record>,
    /// The keys read, by object.
    pub keys: HashMap<String, Vec<String>>,
    /// Records that do not open (each error names its key), which the
    /// caller names or replaces.
    pub unreadable: Vec<RepoError>,
}

/// What a backup avoids: the index blocks of every record, and the
/// damaged records of packs.
#[derive(Debug, Default)]
pub struct Avoid {
    /// Index blocks a backup reads again from the volume.
    pub index: HashSet<String>,
    /// Damaged records by pack (`None`: the whole pack), as the records
    /// name them.
    pub packs: BTreeMap<PackId, Option<BTreeSet<u32>>>,
}

/// What a backup avoided, as kept with the volume's backup base: pack
/// (hex) to its damaged offsets, `null` for a whole pack.
type Seen = BTreeMap<String, Option<BTreeSet<u32>>>;

impl Avoid {
    /// What this backup avoids, to keep with the snapshot it writes
    /// ([`Self::covered_by`] reads it back).
    pub fn seen(&self) -> String {
        let seen: Seen = self
            .packs
            .iter()
            .map(|(p, d)| (super::pack_hex(p), d.clone()))
            .collect();
        serde_json::to_string(&seen).unwrap_or_else(|_| unreachable!("maps serialise"))
    }

    /// True when a snapshot written by a backup that avoided `seen` (as
    /// [`Self::seen`] gave it; `None` when unknown) references none of the
    /// damaged records known now: its index blocks may be kept and taken
    /// from without reading them first.
    ///
    /// A record names the index blocks that used the damage when its
    /// check walked the snapshots. A backup that ran while the check did,
    /// or that started before the record was written, may have kept or
    /// copied a damaged reference into index blocks of its own, which no
    /// record names; so may every backup after it that keeps them. Such a
    /// snapshot is known whole only when its own backup avoided every
    /// damaged record known now: it kept its parent's blocks only once
    /// they were covered too, or read ([`Repo::screen`]).
    pub fn covered_by(&self, seen: Option<&str>) -> bool {
        if self.packs.is_empty() {
            return true;
        }
        let Some(seen) = seen.and_then(|s| serde_json::from_str::<Seen>(s).ok()) else {
            return false;
        };
        self.packs
            .iter()
            .all(|(p, now)| match (now, seen.get(&super::pack_hex(p))) {
                (_, None) | (None, Some(Some(_))) => false,
                (_, Some(None)) => true,
                (Some(now), Some(Some(then))) => now.is_subset(then),
            })
    }
}

/// A fresh key for a record of `object`.
fn new_key(object: &str) -> String {
    let mut tag = [0u8; 8];
    super::crypto::fill_random(&mut tag);
    format!("{DIR}/{object}.{}", hex::encode(tag))
}

/// The object a record key is about: `damaged/<object>.<tag>`, or
/// `damaged/<object>` as earlier builds wrote it.
pub fn object_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(DIR)?.strip_prefix('/')?;
    Some(match rest.rsplit_once('.') {
        Some((object, tag)) if tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()) => {
            object
        }
        _ => rest,
    })
}

impl Repo {
    /// Every damage record, merged by object, with the keys read and
    /// those that do not open.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn damage_records(&self) -> Result<Recorded, RepoError> {
        let mut out = Recorded::default();
        let mut by_object: HashMap<String, Record> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::new();
        // A check deletes a record only after writing what replaces it,
        // so a record gone between the listing and its read is found
        // again, replaced, by listing again.
        for attempt in 0..LISTINGS {
            let mut gone = false;
            for k in self.objects.list(DIR).await? {
                if !seen.insert(k.clone()) {
                    continue;
                }
                match self.get_damage(&k).await {
                    Ok(r) => {
                        out.keys.entry(r.object.clone()).or_default().push(k);
                        match by_object.get_mut(&r.object) {
                            Some(m) => m.merge(r),
                            None => {
                                by_object.insert(r.object.clone(), r);
                            }
                        }
                    }
                    Err(RepoError::Missing { .. }) => gone = true,
                    Err(e) if super::refs::is_damage(&e) => out.unreadable.push(e),
                    Err(e) => return Err(e),
                }
            }
            if !gone {
                break;
            }
            if attempt + 1 == LISTINGS {
                tracing::warn!(location = %self.location(), "damage records kept changing while they were read; some may be missing from this reading");
            }
        }
        out.records = by_object.into_values().collect();
        Ok(out)
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
        if object_of(k) != Some(r.object.as_str()) {
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
        let recorded = self.damage_records().await?;
        if let Some(RepoError::Corrupt {
            location,
            object,
            reason,
        }) = recorded.unreadable.into_iter().next()
        {
            return Err(RepoError::Corrupt {
                location,
                object,
                reason: format!(
                    "{reason}; this damage record says what new backups must not reuse: run `blockctl repo check`, which writes it again"
                ),
            });
        }
        let mut avoid = Avoid::default();
        for r in recorded.records {
            if let Some(pack) = super::parse_pack_key(&r.object) {
                // No offsets: damaged as a whole (missing, unreadable, or
                // a record that does not list them).
                let offsets = (!r.offsets.is_empty()).then(|| r.offsets.iter().copied().collect());
                avoid.packs.insert(pack, offsets);
            }
            avoid.index.extend(r.index);
        }
        Ok(avoid)
    }

    /// Reads every index block of `parent` that `avoid` does not already
    /// avoid, and adds those that reference a damaged record (directly, or
    /// a record a repack moved into a damaged pack) or do not read; returns
    /// how many it added. For a parent not [`Avoid::covered_by`] what its
    /// own backup avoided.
    ///
    /// # Errors
    /// Provider errors; a damaged relocation.
    pub async fn screen(&self, avoid: &mut Avoid, parent: &Manifest) -> Result<usize, RepoError> {
        if avoid.packs.is_empty() {
            return Ok(0);
        }
        // The damaged records under the names index entries use: their
        // own, and those of packs whose records were moved into them.
        let mut named: HashMap<PackId, Option<HashSet<u32>>> = avoid
            .packs
            .iter()
            .map(|(p, d)| (*p, d.as_ref().map(|o| o.iter().copied().collect())))
            .collect();
        let (relocs, _) = self.list_relocs().await?;
        let sources: BTreeSet<PackId> = relocs
            .iter()
            .filter(|(_, l)| {
                super::reloc::parse_reloc_key(&l.key)
                    .is_some_and(|(_, to)| avoid.packs.contains_key(&to))
            })
            .map(|(from, _)| *from)
            .collect();
        for from in sources {
            // Relocations that do not open: where that pack's records are
            // is unknown, so none of them is taken.
            let w = match self.relocs_of(&from).await {
                Ok(r) => super::reloc::Winners::of(&r),
                Err(e) if super::refs::is_damage(&e) => {
                    tracing::warn!(pack = %super::pack_key(&from), error = %e, "a relocation does not open: the records of its pack are read from the volume again");
                    named.insert(from, None);
                    continue;
                }
                Err(e) => return Err(e),
            };
            for t in w.targets() {
                let damaged = match avoid.packs.get(&t.pack) {
                    None => false,
                    Some(None) => true,
                    Some(Some(o)) => o.contains(&t.to),
                };
                if damaged {
                    if let Some(o) = named.entry(from).or_insert_with(|| Some(HashSet::new())) {
                        o.insert(t.from);
                    }
                }
            }
        }
        let uses = |e: &super::format::Entry| {
            named
                .get(&e.chunk.pack)
                .is_some_and(|d| d.as_ref().is_none_or(|o| o.contains(&e.chunk.offset)))
        };
        let blocks: Vec<(u64, String)> = parent
            .blocks
            .iter()
            .filter(|(_, id)| !avoid.index.contains(id))
            .cloned()
            .collect();
        let mut reads = futures::stream::iter(blocks)
            .map(|(b, id)| async move {
                let got = self.get_index(b, &id).await;
                (id, got)
            })
            .buffer_unordered(SCREENS);
        let mut added = Vec::new();
        while let Some((id, got)) = reads.next().await {
            match got {
                Ok(entries) if entries.iter().any(&uses) => added.push(id),
                Ok(_) => {}
                // Kept, it would carry the damage on; read from the volume
                // again, it is replaced.
                Err(e) if super::refs::is_damage(&e) => added.push(id),
                Err(e) => return Err(e),
            }
        }
        let n = added.len();
        avoid.index.extend(added);
        Ok(n)
    }

    /// Writes a record of `r.object` under a key of its own, beside any
    /// other record of the object; returns the key.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn put_damage(&self, r: &Record) -> Result<String, RepoError> {
        let k = new_key(&r.object);
        self.put_damage_at(&k, r).await?;
        Ok(k)
    }

    /// Writes `r` at key `k` (known-answer vectors of both key forms).
    pub(super) async fn put_damage_at(&self, k: &str, r: &Record) -> Result<(), RepoError> {
        let json = serde_json::to_vec(r).unwrap_or_else(|_| unreachable!("records serialise"));
        let body = format::envelope(DAMAGE_MAGIC, &self.keys.seal(k.as_bytes(), &json));
        self.objects.put(k, body.into(), false).await?;
        Ok(())
    }

    /// Deletes the record at `key` (as listed or read).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn delete_damage(&self, key: &str) -> Result<(), RepoError> {
        self.objects.delete(key).await
    }

    /// Every record key with the object it is about, however it reads.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn damage_keys(&self) -> Result<Vec<(String, String)>, RepoError> {
        Ok(self
            .objects
            .list(DIR)
            .await?
            .into_iter()
            .filter_map(|k| object_of(&k).map(str::to_string).map(|o| (k, o)))
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

    /// A snapshot's blocks are trusted only when its backup avoided every
    /// damaged record known now: the same offsets or more, or the whole
    /// pack; never when what it avoided is unknown.
    #[test]
    fn covered_only_by_what_was_avoided_then() {
        let (p, q) = ([1u8; 16], [2u8; 16]);
        let at = |o: &[u32]| Some(o.iter().copied().collect::<BTreeSet<u32>>());
        let avoid = |packs: Vec<(PackId, Option<BTreeSet<u32>>)>| Avoid {
            index: HashSet::new(),
            packs: packs.into_iter().collect(),
        };
        let none = avoid(vec![]);
        assert!(none.covered_by(None));
        let then = avoid(vec![(p, at(&[7, 9])), (q, None)]).seen();
        for (now, covered) in [
            (avoid(vec![(p, at(&[7]))]), true),
            (avoid(vec![(p, at(&[7, 9])), (q, at(&[1]))]), true),
            (avoid(vec![(q, None)]), true),
            (avoid(vec![(p, at(&[8]))]), false),
            (avoid(vec![(p, None)]), false),
            (avoid(vec![([3u8; 16], at(&[0]))]), false),
        ] {
            assert_eq!(now.covered_by(Some(&then)), covered, "{now:?}");
            assert!(!now.covered_by(None), "{now:?}");
            assert!(!now.covered_by(Some("not json")), "{now:?}");
        }
        assert!(none.covered_by(Some(&then)));
    }

    fn sorted(mut v: Vec<Record>) -> Vec<Record> {
        v.sort_by(|x, y| x.object.cmp(&y.object));
        v
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
        let ka = repo.put_damage(&a).await.unwrap();
        let kb = repo.put_damage(&b).await.unwrap();
        assert_eq!(object_of(&ka), Some("packs/ab/ab00"));
        assert!(ka.starts_with("damaged/packs/ab/ab00."), "{ka}");
        // A record of an older build, without offsets, reads as none.
        let old: Record =
            serde_json::from_str(r#"{"object":"packs/ab/ab00","data":true,"index":["11"]}"#)
                .unwrap();
        assert!(old.offsets.is_empty());
        let got = repo.damage_records().await.unwrap();
        assert!(got.unreadable.is_empty());
        assert_eq!(sorted(got.records), vec![b.clone(), a.clone()]);
        assert_eq!(got.keys["packs/ab/ab00"], vec![ka.clone()]);
        let avoid = repo.avoid().await.unwrap();
        assert_eq!(
            avoid.index,
            HashSet::from(["11".into(), "22".into(), "cd00".into()])
        );
        let mut keys = repo.damage_keys().await.unwrap();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                (kb.clone(), "index/cd/cd00".to_string()),
                (ka.clone(), "packs/ab/ab00".to_string())
            ]
        );

        // A record copied under another object's key does not open; a
        // backup is told which record and what to run.
        let o = repo.objects();
        let body = o.get_meta(&ka).await.unwrap();
        o.put(
            "damaged/packs/ef/ef00.0123456789abcdef",
            body.clone(),
            false,
        )
        .await
        .unwrap();
        let e = repo.avoid().await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("damaged/packs/ef/ef00") && msg.contains("blockctl repo check"),
            "{msg}"
        );
        // So does one moved under another key of its own object.
        o.put("damaged/packs/ab/ab00.fedcba9876543210", body, false)
            .await
            .unwrap();
        let got = repo.damage_records().await.unwrap();
        assert_eq!(got.unreadable.len(), 2);
        for e in &got.unreadable {
            repo.delete_damage(e.object()).await.unwrap();
        }
        repo.delete_damage(&ka).await.unwrap();
        assert_eq!(
            repo.avoid().await.unwrap().index,
            HashSet::from(["cd00".into()])
        );
        o.put("damaged/packs/ef/ef00", Bytes::from_static(b"junk"), false)
            .await
            .unwrap();
        assert_eq!(repo.damage_records().await.unwrap().unreadable.len(), 1);
    }

    /// Two checks that read the records, then each write what they found
    /// and delete what they read, in any interleaving: neither undoes the
    /// other, and a backup avoids what either recorded.
    #[tokio::test]
    async fn checks_at_once_keep_what_each_recorded() {
        let repo = repo().await;
        let earlier = Record {
            object: "packs/ab/ab00".into(),
            data: true,
            index: vec!["11".into()],
            offsets: vec![0],
        };
        // As an earlier build wrote it, under the object's own key.
        repo.put_damage_at("damaged/packs/ab/ab00", &earlier)
            .await
            .unwrap();
        let read_a = repo.damage_records().await.unwrap();
        let read_b = repo.damage_records().await.unwrap();
        assert_eq!(read_a.records, vec![earlier.clone()]);
        // A reads the pack whole and finds a second bad record, used by
        // another index block; B traces the recorded offset again.
        let mut by_a = earlier.clone();
        by_a.merge(Record {
            object: earlier.object.clone(),
            data: true,
            index: vec!["22".into()],
            offsets: vec![4096],
        });
        let by_b = earlier.clone();
        // B writes after A: with one key per object it overwrote A's.
        repo.put_damage(&by_a).await.unwrap();
        repo.put_damage(&by_b).await.unwrap();
        for k in read_a.keys.values().flatten() {
            repo.delete_damage(k).await.unwrap();
        }
        for k in read_b.keys.values().flatten() {
            repo.delete_damage(k).await.unwrap();
        }
        let now = repo.damage_records().await.unwrap();
        assert_eq!(now.records.len(), 1);
        assert_eq!(now.keys["packs/ab/ab00"].len(), 2);
        let r = &now.records[0];
        assert!(r.data);
        assert_eq!(r.offsets, vec![0, 4096]);
        assert_eq!(
            repo.avoid().await.unwrap().index,
            HashSet::from(["11".into(), "22".into()])
        );

        // A record standing for the whole pack's data (no offsets) stays
        // that way when merged.
        let mut whole = Record {
            object: "packs/ab/ab00".into(),
            data: true,
            index: vec!["33".into()],
            offsets: Vec::new(),
        };
        whole.merge(r.clone());
        assert!(whole.data && whole.offsets.is_empty());
        assert_eq!(whole.index, vec!["33", "11", "22"]);
        // An index block's record next to data damage of a pack keeps
        // the listed offsets.
        let mut listed = r.clone();
        listed.merge(Record {
            object: r.object.clone(),
            data: false,
            index: vec!["44".into()],
            offsets: Vec::new(),
        });
        assert_eq!(listed.offsets, vec![0, 4096]);
    }

    #[test]
    fn keys_name_their_object() {
        assert_eq!(
            object_of("damaged/packs/ab/ab00.0123456789abcdef"),
            Some("packs/ab/ab00")
        );
        assert_eq!(object_of("damaged/packs/ab/ab00"), Some("packs/ab/ab00"));
        assert_eq!(object_of("damaged/index/cd/cd.x"), Some("index/cd/cd.x"));
        assert_eq!(object_of("packs/ab/ab00"), None);
        assert_eq!(object_of("damagedx/packs"), None);
        let k = new_key("index/cd/cd00");
        assert_eq!(object_of(&k), Some("index/cd/cd00"));
        assert_ne!(k, new_key("index/cd/cd00"));
    }
}
