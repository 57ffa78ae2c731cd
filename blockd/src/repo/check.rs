//! `repo check`: is every snapshot restorable?
//!
//! 1. The config object is read again and must equal the one opened.
//! 2. Every manifest, and every index block a manifest references, is
//!    fetched and opened ([`refs::walk`]).
//! 3. Every referenced pack must be listed, and its trailer (one ranged
//!    GET of the pack's tail) must open and list every record the index
//!    blocks point at. A record of a repacked pack is looked for where its
//!    relocation says it is now (the walk resolves them; a damaged
//!    relocation is named like a damaged index block), and, while the
//!    repacked pack is still listed (collection deletes it a grace period
//!    later), in that pack too: restores read it there until it goes, so
//!    damage in either copy is found and traced to the snapshots using the
//!    record. Damage only in the relocation's copy is named as needed once
//!    the repacked pack is collected. A pack gone since
//!    the walk is not damage when the snapshots that need it were deleted
//!    meanwhile, or when a relocation written meanwhile covers every
//!    record wanted of it (a repack ran under the check).
//! 4. With `--read-data`, the packs of the subset are read whole (repacked
//!    packs still listed among them): every record's seal and chunk hash
//!    is checked, as a restore would.
//!
//! Damage is named by object, and mapped back to the snapshots that need
//! it: a damaged pack record is traced to the index blocks that use that
//! very record, so a snapshot that only uses the pack's good records is
//! not reported. The check takes no lock and changes no data; backups
//! may run meanwhile (a pack they are still writing is not referenced
//! yet).
//!
//! What it finds damaged (packs and index blocks) it records in the
//! repository ([`super::damage`]), so that new backups stop reusing it; a
//! record goes when a check finds its object whole, or no snapshot uses
//! the object any more. Damage found only by reading records stays
//! recorded, and reported, until a check reads that pack again; every
//! check traces the recorded offsets to their users again, so a snapshot
//! written since that took one (a backup that ran during the check that
//! found it) is named and recorded too. Checks may run at once, on one
//! host or several: none overwrites or deletes a record another wrote
//! meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use blockd_api::{CheckReport, DamagedSnapshot, DataRead, Problem, Subset};
use futures::StreamExt;
use roaring::RoaringBitmap;

use super::damage::{Record, Recorded};
use super::refs::{self, Found, Refs};
use super::{PackId, Repo, RepoError};

/// Why a recorded offset is reported by a check that did not read its
/// pack.
const EARLIER: &str = "found damaged earlier (by `repo check --read-data`, or by `repo gc` repacking it), not read by this check (one that reads this pack clears it if it is whole)";

/// Pack trailers read at once.
const READS: usize = 8;
/// Packs read whole at once (`--read-data`): memory is about twice the
/// pack size per read in flight.
const FULL_READS: usize = 3;

/// What one pack held against what the index blocks want of it.
struct PackVerdict {
    id: PackId,
    /// Offsets wanted and missing or damaged, with the reason; `None` as
    /// the key means the whole pack.
    bad: Vec<(Option<u32>, String)>,
    /// Records opened (read-data only).
    records: u64,
    /// Bytes fetched whole (read-data only).
    bytes: u64,
    read: bool,
    /// Some bad record was found by opening it (`--read-data` only sees
    /// such damage).
    opened: bool,
    /// The pack is not there: not listed, or gone by its read.
    absent: bool,
}

/// Checks the repository; see the module docs.
///
/// # Errors
/// Provider failures (a damaged object is a finding, not an error).
pub async fn check(
    repo: &Arc<Repo>,
    read_data: bool,
    subset: Option<Subset>,
) -> Result<CheckReport, RepoError> {
    let mut problems: Vec<Found> = Vec::new();
    if let Err(e) = repo.check_config().await {
        if !refs::is_damage(&e) {
            return Err(e);
        }
        problems.push(Found {
            object: e.object().to_string(),
            reason: reason_of(&e),
            snapshots: RoaringBitmap::new(),
        });
    }
    // The records first: every one read is judged by a walk that began
    // after it was written, and only those are replaced or deleted. A
    // record another check writes during this one is left alone.
    let old = repo.damage_records().await?;
    let mut refs = refs::walk(repo).await?;
    problems.extend(refs.problems.iter().cloned());
    let (listed, foreign_packs) = repo.list_packs().await?;
    let (blocks, foreign_index) = repo.list_index_blocks().await?;
    let (_, foreign_relocs) = repo.list_relocs().await?;
    for key in foreign_packs
        .iter()
        .chain(&foreign_index)
        .chain(&foreign_relocs)
    {
        problems.push(Found {
            object: key.clone(),
            reason: "not an object blockd writes (left alone)".into(),
            snapshots: RoaringBitmap::new(),
        });
    }
    let sizes: HashMap<PackId, u64> = listed.iter().map(|(id, l)| (*id, l.size)).collect();
    let unreferenced_packs = sizes
        .keys()
        .filter(|id| !refs.packs.contains_key(*id))
        .count();
    let unreferenced_index_blocks = blocks
        .iter()
        .filter(|(id, _)| !refs.references_index(id))
        .count();
    let referenced = (refs.packs.len(), refs.records());
    // A pack whose records a repack moved stays until collection deletes
    // it, a grace period later; meanwhile restores read the records there
    // (a relocation serves only a pack that is gone). So while it is
    // listed, the records index entries name in it are wanted of it too,
    // besides where the relocation put them: both copies are judged.
    let mut sources: HashSet<PackId> = HashSet::new();
    for (id, out) in &refs.moved_out {
        if sizes.contains_key(id) {
            let p = refs.packs.entry(*id).or_default();
            p.records |= &out.records;
            p.index |= &out.index;
            p.bytes += out.bytes;
            sources.insert(*id);
        }
    }

    let jobs: Vec<(PackId, Option<u64>, RoaringBitmap, bool)> = refs
        .packs
        .iter()
        .map(|(id, want)| {
            let full = read_data && subset.is_none_or(|s| s.contains(subset_key(id)));
            (*id, sizes.get(id).copied(), want.records.clone(), full)
        })
        .collect();
    let verdicts = futures::stream::iter(jobs.into_iter().map(|(id, size, want, full)| {
        let repo = repo.clone();
        async move { verdict(&repo, id, size, &want, full).await }
    }))
    .buffer_unordered(if read_data { FULL_READS } else { READS })
    .collect::<Vec<_>>()
    .await;
    let mut data = DataRead {
        subset: subset.map(|s| s.to_string()),
        packs: 0,
        records: 0,
        bytes: 0,
    };
    // Damaged records, by pack: traced to index blocks below.
    let mut damaged: HashMap<PackId, BTreeMap<u32, String>> = HashMap::new();
    let mut examined: HashMap<PackId, Examined> = HashMap::new();
    let mut records: Vec<Record> = Vec::new();
    let verdicts = verdicts.into_iter().collect::<Result<Vec<_>, _>>()?;
    // A pack gone since the walk whose every user was deleted meanwhile
    // is a delete and collection that ran under this check, not damage:
    // neither recorded nor reported.
    let needed = verdicts
        .iter()
        .filter(|v| v.bad.iter().any(|(o, _)| o.is_none()))
        .fold(RoaringBitmap::new(), |a, v| {
            a | refs.snapshots_of(&refs.packs[&v.id].index)
        });
    let gone = refs::deleted(repo, &refs, &needed).await?;
    // A pack gone since the walk whose every wanted record a relocation
    // written since then covers was repacked under this check (the walk
    // resolved the relocations before it): its records are where the
    // relocation says, and the next check looks at them there.
    let mut repacked: HashSet<PackId> = HashSet::new();
    for v in verdicts.iter().filter(|v| v.absent) {
        match repo.relocs_of(&v.id).await {
            Ok(relocs) => {
                let w = super::reloc::Winners::of(&relocs);
                let wanted = &refs.packs[&v.id].records;
                if !wanted.is_empty() && wanted.iter().all(|o| w.get(o).is_some()) {
                    repacked.insert(v.id);
                }
            }
            // A damaged relocation: the pack is reported as missing, and
            // the next walk names the relocation.
            Err(e) if refs::is_damage(&e) => {}
            Err(e) => return Err(e),
        }
    }
    for v in verdicts {
        examined.insert(
            v.id,
            Examined {
                read: v.read,
                whole: v.bad.is_empty(),
                entire: v.bad.iter().any(|(o, _)| o.is_none()),
                opened: v.opened,
            },
        );
        data.records += v.records;
        data.bytes += v.bytes;
        data.packs += u64::from(v.read);
        for (offset, reason) in v.bad {
            match offset {
                None => {
                    let snapshots = refs.snapshots_of(&refs.packs[&v.id].index);
                    if !snapshots.is_empty() && snapshots.is_subset(&gone) {
                        tracing::info!(pack = %Repo::pack_name(&v.id), "a pack only deleted snapshots used went during the check");
                        continue;
                    }
                    if repacked.contains(&v.id) {
                        tracing::info!(pack = %Repo::pack_name(&v.id), "a pack was repacked during the check");
                        continue;
                    }
                    records.push(record_of(&refs, &v.id, &refs.packs[&v.id].index, false));
                    problems.push(Found {
                        object: Repo::pack_name(&v.id),
                        reason,
                        snapshots,
                    });
                }
                Some(o) => {
                    damaged.entry(v.id).or_default().insert(o, reason);
                }
            }
        }
    }
    // Records an earlier check found damaged by opening them, in packs
    // this one did not read: traced again with the rest, so that a
    // snapshot written since that uses them (a backup that ran during
    // that check) is named and recorded too.
    let mut earlier: HashSet<PackId> = HashSet::new();
    for r in &old.records {
        let Some(id) = super::parse_pack_key(&r.object) else {
            continue;
        };
        if !r.data || r.offsets.is_empty() {
            continue;
        }
        match examined.get(&id) {
            Some(e) if !e.read && !e.entire => {
                let d = damaged.entry(id).or_default();
                for o in &r.offsets {
                    d.entry(*o).or_insert_with(|| EARLIER.to_string());
                }
                earlier.insert(id);
            }
            // Not referenced now, but the pack is still there: a backup
            // running now may yet commit a reference to its damage, so
            // the record stays (naming no index block) until the pack is
            // read whole or collected.
            None if sizes.contains_key(&id) => records.push(Record {
                object: r.object.clone(),
                data: true,
                index: Vec::new(),
                offsets: r.offsets.clone(),
            }),
            _ => {}
        }
    }
    for (found, pack, users, offsets) in trace(repo, &refs, &damaged, &sources).await? {
        let only_earlier = offsets.iter().all(|o| damaged[&pack][o] == EARLIER);
        let data = examined.get(&pack).is_some_and(|e| e.opened) || earlier.contains(&pack);
        let mut r = record_of(&refs, &pack, &users, data);
        r.offsets = offsets;
        records.push(r);
        // Recorded damage that nothing uses is kept (as above), not
        // reported: no snapshot needs it.
        if !(only_earlier && users.is_empty()) {
            problems.push(found);
        }
    }
    for p in &refs.problems {
        if let Some(id) = p
            .object
            .strip_prefix("index/")
            .and_then(|r| r.rsplit('/').next())
        {
            records.push(Record {
                object: p.object.clone(),
                data: false,
                index: vec![id.to_string()],
                offsets: Vec::new(),
            });
        }
    }
    let recorded = if repo.is_read_only() {
        // Nothing is written, and what the records hold that this check
        // did not see is reported all the same; so is a record that does
        // not open, which stops every backup until a check replaces it.
        let seen: HashSet<&str> = records.iter().map(|r| r.object.as_str()).collect();
        for r in &old.records {
            if !seen.contains(r.object.as_str()) {
                problems.extend(unlisted_finding(&refs, &examined, r));
            }
        }
        for e in &old.unreadable {
            let object = super::damage::object_of(e.object()).unwrap_or(e.object());
            let snapshots = super::parse_pack_key(object)
                .and_then(|id| refs.packs.get(&id))
                .map(|p| refs.snapshots_of(&p.index))
                .unwrap_or_default();
            problems.push(Found {
                object: e.object().to_string(),
                reason: format!(
                    "{}: backups refuse to start until a check with credentials that may write replaces it",
                    reason_of(e)
                ),
                snapshots,
            });
        }
        None
    } else {
        let (recorded, earlier) = keep_records(repo, &refs, &examined, records, old).await?;
        problems.extend(earlier);
        Some(recorded)
    };
    // The same for every other finding: the snapshots deleted under this
    // check are not named, and what only they needed is not reported.
    let needed = problems
        .iter()
        .fold(RoaringBitmap::new(), |a, p| a | &p.snapshots);
    let gone = refs::deleted(repo, &refs, &(&needed - &gone)).await? | gone;
    problems.retain_mut(|p| {
        if p.snapshots.is_empty() || p.snapshots.is_disjoint(&gone) {
            return true;
        }
        p.snapshots -= &gone;
        !p.snapshots.is_empty()
    });
    let mut report = report(
        repo,
        &refs,
        problems,
        referenced,
        (unreferenced_packs, unreferenced_index_blocks),
        read_data.then_some(data),
    );
    report.recorded = recorded;
    Ok(report)
}

/// How the check saw one referenced pack.
struct Examined {
    /// Read whole, every record opened.
    read: bool,
    /// Nothing wrong found.
    whole: bool,
    /// Damaged as a whole (missing, or its trailer does not open).
    entire: bool,
    /// Some record failed to open (damage only `--read-data` sees).
    opened: bool,
}

/// The damage record of `pack`, reached by the index blocks `users`
/// (numbers of the walk).
fn record_of(refs: &Refs, pack: &PackId, users: &RoaringBitmap, data: bool) -> Record {
    Record {
        object: Repo::pack_name(pack),
        data,
        index: users
            .iter()
            .filter_map(|n| refs.index_ids.get(n as usize).cloned())
            .collect(),
        offsets: Vec::new(),
    }
}

/// What record `r` still says that this check could not see, as a
/// finding: an index block is read whole by every check, and recorded
/// offsets are traced again, but a pack's record of an older build (no
/// offsets) stands while the pack is in use, not read again, and the
/// index blocks it names are still used.
fn unlisted_finding(
    refs: &Refs,
    examined: &HashMap<PackId, Examined>,
    r: &Record,
) -> Option<Found> {
    let stands = r.data
        && r.offsets.is_empty()
        && super::parse_pack_key(&r.object).is_some_and(|id| {
            refs.packs.contains_key(&id) && examined.get(&id).is_some_and(|e| !e.read && e.whole)
        })
        && r.index.iter().any(|id| refs.index.contains_key(id));
    stands.then(|| {
        let mut snapshots = RoaringBitmap::new();
        for id in &r.index {
            if let Some(ix) = refs.index.get(id) {
                snapshots |= &ix.snapshots;
            }
        }
        Found {
            object: r.object.clone(),
            reason: format!("records {EARLIER}"),
            snapshots,
        }
    })
}

/// Brings the repository's damage records up to date, and returns the
/// objects recorded afterwards with the damage that stays recorded without
/// this check seeing it (as findings).
///
/// - What this check found is written, merged with the record already
///   there unless this check read that pack whole: a check that does not
///   read data cannot see what an earlier one found by opening records,
///   so it adds to the record and never narrows it.
/// - A pack record that does not open is replaced by a conservative one
///   (every index block reaching the pack), unless this check read the
///   pack whole.
/// - A record whose object this check found whole, or that no snapshot
///   uses, is deleted; one of damage only opening records shows stays
///   until a check reads that pack whole.
///
/// Records are written before any is deleted, so a backup starting
/// meanwhile never sees fewer than before or after. Each goes under a
/// key of its own, and only keys in `old` are deleted: what a check
/// running beside this one wrote stays (see [`super::damage`]).
async fn keep_records(
    repo: &Repo,
    refs: &Refs,
    examined: &HashMap<PackId, Examined>,
    found: Vec<Record>,
    old: Recorded,
) -> Result<(Vec<String>, Vec<Found>), RepoError> {
    let read_whole = |object: &str| {
        super::parse_pack_key(object)
            .and_then(|id| examined.get(&id))
            .is_some_and(|e| e.read)
    };
    let referenced = |id: &String| refs.index.contains_key(id);
    let Recorded {
        records: old,
        keys: old_keys,
        unreadable,
    } = old;
    let old: HashMap<String, Record> = old.into_iter().map(|r| (r.object.clone(), r)).collect();
    let mut write: BTreeMap<String, Record> = BTreeMap::new();
    for r in found {
        let merged = write.entry(r.object.clone()).or_insert_with(|| {
            match old.get(&r.object).filter(|_| !read_whole(&r.object)) {
                Some(prev) => Record {
                    object: prev.object.clone(),
                    data: prev.data,
                    index: prev
                        .index
                        .iter()
                        .filter(|id| referenced(id))
                        .cloned()
                        .collect(),
                    offsets: prev.offsets.clone(),
                },
                None => Record {
                    object: r.object.clone(),
                    data: false,
                    index: Vec::new(),
                    offsets: Vec::new(),
                },
            }
        });
        merged.data |= r.data;
        for id in r.index {
            if !merged.index.contains(&id) {
                merged.index.push(id);
            }
        }
        // A record that holds data damage without its offsets (an older
        // build's, or one replacing a record that did not open) does not
        // take any: listed offsets would pass for the whole damage, and the
        // record would go once they are unused.
        let unlisted = old
            .get(&merged.object)
            .is_some_and(|p| p.data && p.offsets.is_empty() && !read_whole(&p.object));
        if !unlisted {
            let offsets: BTreeSet<u32> = merged.offsets.drain(..).chain(r.offsets).collect();
            merged.offsets = offsets.into_iter().collect();
        }
    }
    let mut earlier = Vec::new();
    // Keys this check read and now replaces or clears: deleted once every
    // write is done.
    let mut delete: Vec<String> = Vec::new();
    for e in unreadable {
        let key = e.object().to_string();
        let object = super::damage::object_of(&key).unwrap_or(&key).to_string();
        delete.push(key);
        // What the record held is unknown: unless this check read the pack
        // whole, what is written for it stands for all of its data.
        let pack = super::parse_pack_key(&object)
            .and_then(|id| refs.packs.get(&id))
            .filter(|_| !read_whole(&object));
        let whole = pack.map(|p| Record {
            object: object.clone(),
            data: true,
            index: p
                .index
                .iter()
                .filter_map(|n| refs.index_ids.get(n as usize).cloned())
                .collect(),
            offsets: Vec::new(),
        });
        if let Some(w) = write.get_mut(&object) {
            if let Some(whole) = whole {
                w.merge(whole);
            }
            continue;
        }
        match (pack, whole) {
            (Some(p), Some(whole)) => {
                tracing::warn!(error = %e, "a damage record does not open: replaced by one naming every index block that reaches its pack");
                earlier.push(Found {
                    object: object.clone(),
                    reason: "its damage record did not open and was replaced by one that avoids the whole pack; a check that reads this pack (`--read-data`) clears it if it is whole".into(),
                    snapshots: refs.snapshots_of(&p.index),
                });
                write.insert(object, whole);
            }
            _ => {
                tracing::warn!(error = %e, "deleting a damage record that does not open (this check covers its object)");
            }
        }
    }
    for r in old.values() {
        if write.contains_key(&r.object) {
            continue;
        }
        if let Some(f) = unlisted_finding(refs, examined, r) {
            earlier.push(f);
        } else {
            tracing::info!(object = %r.object, "the damage recorded for this object is gone");
            delete.extend(old_keys.get(&r.object).into_iter().flatten().cloned());
        }
    }
    for r in write.values() {
        repo.put_damage(r).await?;
        delete.extend(old_keys.get(&r.object).into_iter().flatten().cloned());
    }
    for key in &delete {
        repo.delete_damage(key).await?;
    }
    // What is recorded now, with what a check running beside this one
    // wrote meanwhile.
    let now: BTreeSet<String> = repo
        .damage_keys()
        .await?
        .into_iter()
        .map(|(_, object)| object)
        .collect();
    Ok((now.into_iter().collect(), earlier))
}

/// The number a subset is chosen by: the pack id's first 8 bytes.
fn subset_key(id: &PackId) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id[..8]);
    u64::from_be_bytes(b)
}

/// Checks one referenced pack: listed, trailer opens, wanted records
/// present; with `full`, every record opens.
async fn verdict(
    repo: &Arc<Repo>,
    id: PackId,
    size: Option<u64>,
    want: &RoaringBitmap,
    full: bool,
) -> Result<PackVerdict, RepoError> {
    let mut v = PackVerdict {
        id,
        bad: Vec::new(),
        records: 0,
        bytes: 0,
        read: false,
        opened: false,
        absent: false,
    };
    let Some(size) = size else {
        v.bad.push((None, "missing".into()));
        v.absent = true;
        return Ok(v);
    };
    let records = if full {
        let bytes = match repo.get_pack(&id).await {
            Ok(b) => b,
            Err(e) if refs::is_damage(&e) => {
                v.bad.push((None, reason_of(&e)));
                v.absent = matches!(e, RepoError::Missing { .. });
                return Ok(v);
            }
            Err(e) => return Err(e),
        };
        v.read = true;
        v.bytes = bytes.len() as u64;
        match repo.pack_records(&id, &bytes) {
            Ok(records) => {
                // Opening is CPU work: off the async workers.
                let repo_keys = repo.clone();
                let checked = tokio::task::spawn_blocking(move || {
                    let mut bad = Vec::new();
                    for c in &records {
                        let from = c.offset as usize;
                        let to = from + c.stored_len as usize;
                        if let Err(e) = repo_keys.open_chunk(c, &bytes[from..to]) {
                            bad.push((c.offset, reason_of(&e)));
                        }
                    }
                    (records, bad)
                })
                .await;
                let Ok((records, bad)) = checked else {
                    v.bad
                        .push((None, "checking the pack's records failed".into()));
                    return Ok(v);
                };
                v.records = records.len() as u64;
                v.opened = !bad.is_empty();
                v.bad.extend(bad.into_iter().map(|(o, r)| (Some(o), r)));
                Ok(records)
            }
            Err(e) => Err(e),
        }
    } else {
        repo.pack_trailer(&id, size).await
    };
    let records = match records {
        Ok(r) => r,
        Err(e) if refs::is_damage(&e) => {
            v.bad.push((None, reason_of(&e)));
            v.absent = matches!(e, RepoError::Missing { .. });
            return Ok(v);
        }
        Err(e) => return Err(e),
    };
    let present: RoaringBitmap = records.iter().map(|c| c.offset).collect();
    for o in want - &present {
        v.bad.push((
            Some(o),
            "missing: the pack's trailer lists no record there".into(),
        ));
    }
    Ok(v)
}

fn reason_of(e: &RepoError) -> String {
    match e {
        RepoError::Missing { .. } => "missing".into(),
        RepoError::Corrupt { reason, .. } => reason.clone(),
        e => e.to_string(),
    }
}

/// Finds the snapshots that use damaged records: the index blocks that
/// reach each damaged pack are read again and their entries matched. An
/// entry naming a repacked pack uses both the record there and the one its
/// relocation points at: the first while that pack exists (`sources`, the
/// repacked packs still listed), the second once it is collected.
/// Returns, per damaged pack, its finding, the index blocks (numbers)
/// that use its damaged records, and the damaged offsets.
async fn trace(
    repo: &Repo,
    refs: &Refs,
    damaged: &HashMap<PackId, BTreeMap<u32, String>>,
    sources: &HashSet<PackId>,
) -> Result<Vec<(Found, PackId, RoaringBitmap, Vec<u32>)>, RepoError> {
    let mut index = RoaringBitmap::new();
    for id in damaged.keys() {
        index |= &refs.packs[id].index;
    }
    // Records of repacked packs that moved into a damaged pack: (pack
    // named by the index, its offset) -> (damaged pack, offset there).
    let mut moved: HashMap<(PackId, u32), (PackId, u32)> = HashMap::new();
    // Damaged records of a relocation's pack whose pack named by the
    // index is still there (restores read that one meanwhile): (damaged
    // pack, offset) -> those named packs.
    let mut still_read: HashMap<(PackId, u32), BTreeSet<PackId>> = HashMap::new();
    for (id, offsets) in damaged {
        for (named, w) in refs::moved_into(repo, refs, id).await? {
            for t in w.targets() {
                if t.pack == *id && offsets.contains_key(&t.to) {
                    moved.insert((named, t.from), (t.pack, t.to));
                    if sources.contains(&named) {
                        still_read.entry((t.pack, t.to)).or_default().insert(named);
                    }
                }
            }
        }
    }
    // (pack, offset) -> index blocks using it
    let mut users: BTreeMap<(PackId, u32), RoaringBitmap> = BTreeMap::new();
    for n in &index {
        let id = &refs.index_ids[n as usize];
        // One deleted (or damaged) since the walk has no users here: a
        // delete and collection may run beside the check, and a damaged
        // one is a finding of the walk already.
        let entries = match repo.get_index(refs.index[id].block, id).await {
            Ok(e) => e,
            Err(e) if refs::is_damage(&e) => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let named = (e.chunk.pack, e.chunk.offset);
            for at in std::iter::once(named).chain(moved.get(&named).copied()) {
                if damaged.get(&at.0).is_some_and(|d| d.contains_key(&at.1)) {
                    users.entry(at).or_default().insert(n);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (pack, offsets) in damaged {
        // One finding per pack: its damaged records, grouped by reason,
        // and the snapshots using them.
        let mut using = RoaringBitmap::new();
        let mut by_reason: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (o, r) in offsets {
            if let Some(ix) = users.get(&(*pack, *o)) {
                using |= ix;
            }
            // Needed once the pack the index names is collected; until
            // then restores read that one.
            let r = match still_read.get(&(*pack, *o)) {
                Some(named) => {
                    let named: Vec<String> = named.iter().map(Repo::pack_name).collect();
                    let it = if named.len() == 1 {
                        "it is"
                    } else {
                        "they are"
                    };
                    format!(
                        "{r} (restores read {} until {it} collected)",
                        named.join(", ")
                    )
                }
                None => r.clone(),
            };
            by_reason.entry(r).or_default().push(*o);
        }
        let reason: Vec<String> = by_reason
            .into_iter()
            .map(|(r, at)| format!("{}: {r}", offsets_text(&at)))
            .collect();
        out.push((
            Found {
                object: Repo::pack_name(pack),
                reason: reason.join("; "),
                snapshots: refs.snapshots_of(&using),
            },
            *pack,
            using,
            offsets.keys().copied().collect(),
        ));
    }
    Ok(out)
}

/// "record at offset 7", "records at offsets 7, 9 and 3 more".
fn offsets_text(at: &[u32]) -> String {
    const SHOWN: usize = 5;
    let list: Vec<String> = at.iter().take(SHOWN).map(u32::to_string).collect();
    match at.len() {
        1 => format!("record at offset {}", list[0]),
        n if n <= SHOWN => format!("records at offsets {}", list.join(", ")),
        n => format!(
            "records at offsets {} and {} more",
            list.join(", "),
            n - SHOWN
        ),
    }
}

/// `referenced` counts packs and records as collection sees them (a
/// repacked pack's moved records where they are now); the packs read for
/// `data` include repacked packs not collected yet.
fn report(
    repo: &Repo,
    refs: &Refs,
    mut problems: Vec<Found>,
    (packs, records): (usize, u64),
    (unreferenced_packs, unreferenced_index_blocks): (usize, usize),
    data: Option<DataRead>,
) -> CheckReport {
    problems.sort_by(|a, b| a.object.cmp(&b.object));
    let mut by_snapshot: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in &problems {
        for s in &p.snapshots {
            by_snapshot
                .entry(&refs.snapshots[s as usize])
                .or_default()
                .insert(&p.object);
        }
    }
    CheckReport {
        location: repo.location().to_string(),
        snapshots: refs.snapshots.len() as u64,
        index_blocks: refs.index.len() as u64,
        packs: packs as u64,
        records,
        unreferenced_packs: unreferenced_packs as u64,
        unreferenced_index_blocks: unreferenced_index_blocks as u64,
        data,
        damaged: by_snapshot
            .into_iter()
            .map(|(s, o)| DamagedSnapshot {
                snapshot: s.to_string(),
                objects: o.into_iter().map(str::to_string).collect(),
            })
            .collect(),
        problems: problems
            .into_iter()
            .map(|p| Problem {
                object: p.object,
                reason: p.reason,
            })
            .collect(),
        recorded: None,
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use bytes::Bytes;
    use futures::stream::{BoxStream, StreamExt};
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
    };

    use super::super::format::{Entry, Manifest};
    use super::super::reloc::{reloc_key, Move, Reloc};
    use super::super::tests::{kat_manifest, KAT_SNAPSHOT, KAT_V2};
    use super::super::{manifest_key, new_pack_id, PackBuilder, Repo};
    use super::check;

    /// A store that deletes `doomed` when the packs are first listed: what
    /// a delete and a collection running beside a check do after its walk
    /// and before it looks at the packs.
    #[derive(Debug)]
    struct DeletesUnderTheCheck {
        inner: Arc<dyn ObjectStore>,
        /// Copied `(from, to)` first: objects that appear then.
        arriving: Mutex<Vec<(Path, Path)>>,
        doomed: Mutex<Vec<Path>>,
    }

    impl std::fmt::Display for DeletesUnderTheCheck {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "DeletesUnderTheCheck({})", self.inner)
        }
    }

    #[async_trait]
    impl ObjectStore for DeletesUnderTheCheck {
        async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> Result<PutResult> {
            self.inner.put_opts(l, p, o).await
        }
        async fn put_multipart_opts(
            &self,
            l: &Path,
            o: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(l, o).await
        }
        async fn get_opts(&self, l: &Path, o: GetOptions) -> Result<GetResult> {
            self.inner.get_opts(l, o).await
        }
        async fn get_ranges(&self, l: &Path, r: &[Range<u64>]) -> Result<Vec<Bytes>> {
            self.inner.get_ranges(l, r).await
        }
        fn delete_stream(
            &self,
            l: BoxStream<'static, Result<Path>>,
        ) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(l)
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            let (arriving, doomed) = if prefix.is_some_and(|p| p.as_ref() == "packs") {
                (
                    std::mem::take(&mut *self.arriving.lock().unwrap()),
                    std::mem::take(&mut *self.doomed.lock().unwrap()),
                )
            } else {
                (Vec::new(), Vec::new())
            };
            let inner = self.inner.clone();
            let prefix = prefix.cloned();
            futures::stream::once(async move {
                for (from, to) in arriving {
                    inner.copy(&from, &to).await.unwrap();
                }
                for p in doomed {
                    inner.delete(&p).await.unwrap();
                }
                inner.list(prefix.as_ref())
            })
            .flatten()
            .boxed()
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> Result<()> {
            self.inner.copy_opts(from, to, o).await
        }
    }

    /// Snapshot `name` of volume `kat`: one 4 KiB chunk of `byte`, in a
    /// pack of its own, at the start of block 0. Returns the keys of its
    /// manifest, pack and index block.
    async fn snapshot(repo: &Repo, name: &str, byte: u8) -> [Path; 3] {
        let data = vec![byte; 4096];
        let id = repo.keys.chunk_id(&data);
        let sealed = repo.seal_chunk(&id, &data);
        let mut pb = PackBuilder::new(0).unwrap();
        pb.id = new_pack_id();
        let pack = pb.id;
        let loc = pb.push(id, &sealed, 4096).unwrap();
        let (bytes, _) = pb.finish(&repo.keys).unwrap();
        repo.put_pack(&pack, bytes).await.unwrap();
        let entries = [Entry {
            start: 0,
            len: 4096,
            chunk_off: 0,
            chunk: loc,
        }];
        let (ix, sealed) = repo.seal_index(0, &entries).unwrap();
        repo.put_index(&ix, sealed).await.unwrap();
        let m = Manifest {
            name: name.into(),
            blocks: vec![(0, ix.clone())],
            ..kat_manifest("")
        };
        repo.put_manifest(&m, None).await.unwrap();
        [
            Path::from(manifest_key("kat", name)),
            Path::from(Repo::pack_name(&pack)),
            Path::from(format!("index/{}/{ix}", &ix[..2])),
        ]
    }

    /// An empty repository in memory, behind a [`DeletesUnderTheCheck`].
    async fn raced_repo() -> (Arc<DeletesUnderTheCheck>, Arc<Repo>) {
        let store = Arc::new(DeletesUnderTheCheck {
            inner: Arc::new(object_store::memory::InMemory::new()),
            arriving: Mutex::new(Vec::new()),
            doomed: Mutex::new(Vec::new()),
        });
        let repo = Repo::open(store.clone(), "", "mem", None, None, true)
            .await
            .unwrap();
        (store, Arc::new(repo))
    }

    /// A snapshot deleted and collected between a check's walk and its
    /// look at the packs is not damage; a pack gone under a snapshot that
    /// is still there is, named with that snapshot. With and without
    /// `--read-data`.
    #[tokio::test]
    async fn a_snapshot_deleted_under_the_check_is_not_damage() {
        for read_data in [false, true] {
            let (store, repo) = raced_repo().await;
            let [manifest, pack, index] = snapshot(&repo, KAT_SNAPSHOT, 1).await;
            let [_, kept_pack, _] = snapshot(&repo, KAT_V2, 2).await;
            for key in [&manifest, &pack, &index, &kept_pack] {
                assert!(store.inner.head(key).await.is_ok(), "{key}");
            }

            *store.doomed.lock().unwrap() = vec![manifest, pack, index];
            let r = check(&repo, read_data, None).await.unwrap();
            assert!(store.doomed.lock().unwrap().is_empty(), "not raced");
            assert_eq!(r.snapshots, 2, "{r:?}");
            assert!(r.problems.is_empty(), "read_data {read_data}: {r:?}");
            assert!(r.damaged.is_empty(), "{r:?}");
            assert_eq!(r.recorded, Some(Vec::new()), "{r:?}");

            // The pack of a snapshot that stays, gone the same way: damage.
            *store.doomed.lock().unwrap() = vec![kept_pack.clone()];
            let r = check(&repo, read_data, None).await.unwrap();
            assert_eq!(r.snapshots, 1, "{r:?}");
            assert_eq!(r.problems.len(), 1, "{r:?}");
            assert_eq!(r.problems[0].object, kept_pack.as_ref(), "{r:?}");
            assert_eq!(r.damaged.len(), 1, "{r:?}");
            assert_eq!(r.damaged[0].snapshot, format!("kat/{KAT_V2}"), "{r:?}");
        }
    }

    /// A pack repacked between a check's walk and its look at the packs
    /// (its record copied into a new pack, a relocation written, the old
    /// pack deleted, as a collector does) is not damage; gone without a
    /// relocation, it is. With and without `--read-data`.
    #[tokio::test]
    async fn a_pack_repacked_under_the_check_is_not_damage() {
        for read_data in [false, true] {
            let (store, repo) = raced_repo().await;
            let [_, pack, _] = snapshot(&repo, KAT_SNAPSHOT, 1).await;
            let from = super::super::parse_pack_key(pack.as_ref()).unwrap();
            // The repack's new pack and relocation, written aside and put
            // in place only under the check.
            let data = vec![1u8; 4096];
            let id = repo.keys.chunk_id(&data);
            let sealed = repo.seal_chunk(&id, &data);
            let mut pb = PackBuilder::new(0).unwrap();
            pb.id = new_pack_id();
            let to = pb.id;
            let filler = vec![0u8; 512];
            pb.push(
                repo.keys.chunk_id(&filler),
                &repo.seal_chunk(&repo.keys.chunk_id(&filler), &filler),
                512,
            )
            .unwrap();
            let loc = pb.push(id, &sealed, 4096).unwrap();
            let (bytes, _) = pb.finish(&repo.keys).unwrap();
            repo.put_pack(&to, bytes).await.unwrap();
            let old = repo
                .pack_trailer(&from, store.inner.head(&pack).await.unwrap().size)
                .await
                .unwrap();
            repo.put_reloc(&Reloc {
                from,
                to,
                gen: 1,
                moves: vec![Move {
                    from: old[0].offset,
                    to: loc.offset,
                    len: loc.stored_len,
                }],
            })
            .await
            .unwrap();
            let mut arriving = Vec::new();
            for key in [Repo::pack_name(&to), reloc_key(&from, &to)] {
                let (real, aside) = (Path::from(key.clone()), Path::from(format!("aside/{key}")));
                store.inner.copy(&real, &aside).await.unwrap();
                store.inner.delete(&real).await.unwrap();
                arriving.push((aside, real));
            }

            *store.arriving.lock().unwrap() = arriving;
            *store.doomed.lock().unwrap() = vec![pack.clone()];
            let r = check(&repo, read_data, None).await.unwrap();
            assert!(store.doomed.lock().unwrap().is_empty(), "not raced");
            assert_eq!(r.snapshots, 1, "{r:?}");
            assert!(r.problems.is_empty(), "read_data {read_data}: {r:?}");
            assert!(r.damaged.is_empty(), "{r:?}");
            assert_eq!(r.recorded, Some(Vec::new()), "{r:?}");
            // The next check finds the record where the relocation says.
            let r = check(&repo, true, None).await.unwrap();
            assert!(r.problems.is_empty(), "{r:?}");
            assert_eq!(r.data.as_ref().unwrap().records, 2, "{r:?}");

            // The new pack gone the same way, with no relocation of it:
            // damage, traced to the snapshot.
            *store.doomed.lock().unwrap() = vec![Path::from(Repo::pack_name(&to))];
            let r = check(&repo, read_data, None).await.unwrap();
            assert_eq!(r.problems.len(), 1, "{r:?}");
            assert_eq!(r.problems[0].object, Repo::pack_name(&to), "{r:?}");
            assert_eq!(r.damaged.len(), 1, "{r:?}");
            assert_eq!(
                r.damaged[0].snapshot,
                format!("kat/{KAT_SNAPSHOT}"),
                "{r:?}"
            );
        }
    }
}
