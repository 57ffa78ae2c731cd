//! `repo check`: is every snapshot restorable?
//!
//! 1. The config object is read again and must equal the one opened.
//! 2. Every manifest, and every index block a manifest references, is
//!    fetched and opened ([`refs::walk`]).
//! 3. Every referenced pack must be listed, and its trailer (one ranged
//!    GET of the pack's tail) must open and list every record the index
//!    blocks point at. A record of a repacked pack is looked for where its
//!    relocation says it is now (the walk resolves them; a damaged
//!    relocation is named like a damaged index block).
//! 4. With `--read-data`, the packs of the subset are read whole: every
//!    record's seal and chunk hash is checked, as a restore would.
//!
//! Damage is named by object, and mapped back to the snapshots that need
//! it: a damaged pack record is traced to the index blocks that use that
//! very record, so a snapshot that only uses the pack's good records is
//! not reported. The check takes no lock and changes nothing; backups may
//! run meanwhile (a pack they are still writing is not referenced yet).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use blockd_api::{CheckReport, DamagedSnapshot, DataRead, Problem, Subset};
use futures::StreamExt;
use roaring::RoaringBitmap;

use super::refs::{self, Found, Refs};
use super::{PackId, Repo, RepoError};

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
    let refs = refs::walk(repo).await?;
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
    for v in verdicts {
        let v = v?;
        data.records += v.records;
        data.bytes += v.bytes;
        data.packs += u64::from(v.read);
        for (offset, reason) in v.bad {
            match offset {
                None => problems.push(Found {
                    object: Repo::pack_name(&v.id),
                    reason,
                    snapshots: refs.snapshots_of(&refs.packs[&v.id].index),
                }),
                Some(o) => {
                    damaged.entry(v.id).or_default().insert(o, reason);
                }
            }
        }
    }
    problems.extend(trace(repo, &refs, &damaged).await?);
    Ok(report(
        repo,
        &refs,
        problems,
        (unreferenced_packs, unreferenced_index_blocks),
        read_data.then_some(data),
    ))
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
    };
    let Some(size) = size else {
        v.bad.push((None, "missing".into()));
        return Ok(v);
    };
    let records = if full {
        let bytes = match repo.get_pack(&id).await {
            Ok(b) => b,
            Err(e) if refs::is_damage(&e) => {
                v.bad.push((None, reason_of(&e)));
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
            return Ok(v);
        }
        Err(e) => return Err(e),
    };
    let present: RoaringBitmap = records.iter().map(|c| c.offset).collect();
    for o in want - &present {
        v.bad.push((Some(o), format!("no record at offset {o}")));
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
/// reach each damaged pack are read again and their entries matched.
async fn trace(
    repo: &Repo,
    refs: &Refs,
    damaged: &HashMap<PackId, BTreeMap<u32, String>>,
) -> Result<Vec<Found>, RepoError> {
    let mut index = RoaringBitmap::new();
    for id in damaged.keys() {
        index |= &refs.packs[id].index;
    }
    // Records of repacked packs that moved into a damaged pack: (pack
    // named by the index, its offset) -> (damaged pack, offset there).
    let mut moved: HashMap<(PackId, u32), (PackId, u32)> = HashMap::new();
    for (id, offsets) in damaged {
        for (named, w) in refs::moved_into(repo, refs, id).await? {
            for t in w.targets() {
                if t.pack == *id && offsets.contains_key(&t.to) {
                    moved.insert((named, t.from), (t.pack, t.to));
                }
            }
        }
    }
    // (pack, offset) -> index blocks using it
    let mut users: BTreeMap<(PackId, u32), RoaringBitmap> = BTreeMap::new();
    for n in &index {
        let id = &refs.index_ids[n as usize];
        let entries = repo.get_index(refs.index[id].block, id).await?;
        for e in entries {
            let at = moved
                .get(&(e.chunk.pack, e.chunk.offset))
                .copied()
                .unwrap_or((e.chunk.pack, e.chunk.offset));
            if damaged.get(&at.0).is_some_and(|d| d.contains_key(&at.1)) {
                users.entry(at).or_default().insert(n);
            }
        }
    }
    let mut out = Vec::new();
    for (pack, offsets) in damaged {
        // One finding per pack: its damaged records, the snapshots using them.
        let mut snapshots = RoaringBitmap::new();
        let mut reasons = BTreeSet::new();
        for (o, r) in offsets {
            if let Some(ix) = users.get(&(*pack, *o)) {
                snapshots |= refs.snapshots_of(ix);
            }
            reasons.insert(format!("record at offset {o}: {r}"));
        }
        let mut reason: Vec<String> = reasons.into_iter().take(5).collect();
        if offsets.len() > 5 {
            reason.push(format!("and {} more damaged records", offsets.len() - 5));
        }
        out.push(Found {
            object: Repo::pack_name(pack),
            reason: reason.join("; "),
            snapshots,
        });
    }
    Ok(out)
}

fn report(
    repo: &Repo,
    refs: &Refs,
    mut problems: Vec<Found>,
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
        packs: refs.packs.len() as u64,
        records: refs.records(),
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
    }
}
