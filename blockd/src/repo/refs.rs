//! What the snapshots of a repository reach: index blocks, packs and the
//! records inside them. One walk, used by `repo check` and by garbage
//! collection.
//!
//! References are then resolved through relocations (`super::reloc`):
//! a record of a repacked pack counts as a reference to its new place.
//!
//! Memory grows with snapshots, index blocks and packs, not with chunks:
//! the records a pack must keep are a roaring bitmap of their offsets
//! (about 2 bytes per record), and the index blocks that reach a pack a
//! roaring bitmap of index-block numbers. Entries are looked at once, as
//! each index block arrives, and dropped.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use roaring::RoaringBitmap;

use super::format::Manifest;
use super::reloc::Winners;
use super::{name, PackId, Repo, RepoError};

/// Index blocks and manifests fetched at once.
const FETCHES: usize = 16;

/// An index block the snapshots reference.
#[derive(Debug, Clone)]
pub struct IndexRef {
    /// Its number in [`Refs::index_ids`].
    pub num: u32,
    /// The volume range it maps.
    pub block: u64,
    /// Snapshots (numbers in [`Refs::snapshots`]) that reference it.
    pub snapshots: RoaringBitmap,
}

/// What the snapshots need of one pack.
#[derive(Debug, Clone, Default)]
pub struct PackRef {
    /// Offsets of the records referenced.
    pub records: RoaringBitmap,
    /// Index blocks (numbers) that reference it.
    pub index: RoaringBitmap,
    /// Stored bytes of the records referenced.
    pub bytes: u64,
}

/// A damaged object met on the walk, and the snapshots that need it.
#[derive(Debug, Clone)]
pub struct Found {
    /// Object key.
    pub object: String,
    /// What is wrong.
    pub reason: String,
    /// Snapshots (numbers) that need it.
    pub snapshots: RoaringBitmap,
}

/// Everything the snapshots of a repository reference.
#[derive(Debug, Default)]
pub struct Refs {
    /// Snapshot ids (`VOLUME/NAME`), numbered by position.
    pub snapshots: Vec<String>,
    /// Index blocks by id.
    pub index: HashMap<String, IndexRef>,
    /// Index block ids by number.
    pub index_ids: Vec<String>,
    /// Index maps (version 2 manifests' block lists) by id: objects under
    /// `index/` too, read with their manifests.
    pub maps: HashSet<String>,
    /// Packs by id.
    pub packs: HashMap<PackId, PackRef>,
    /// Damage met while walking (manifests, index blocks, relocations).
    pub problems: Vec<Found>,
    /// Relocation objects in use (keys).
    pub relocs: HashSet<String>,
    /// Packs holding relocated records: the packs index entries name
    /// whose records they hold.
    pub sources: HashMap<PackId, Vec<PackId>>,
    /// Packs that relocation objects start from.
    pub relocated: HashSet<PackId>,
    /// What the resolving moved away from packs index entries name: per
    /// such pack, the offsets (in it) of its records referenced and
    /// relocated, the index blocks naming it, and their stored bytes. Not
    /// in [`Refs::packs`]: collection may reclaim such a pack, but until
    /// it does, readers read the records there (a relocation serves a
    /// pack that is gone), so `repo check` judges it too.
    pub moved_out: HashMap<PackId, PackRef>,
}

impl Refs {
    /// True when the object `index/<aa>/<id>` is in use: an index block or
    /// an index map some manifest names.
    pub fn references_index(&self, id: &str) -> bool {
        self.index.contains_key(id) || self.maps.contains(id)
    }

    /// Records referenced, over every pack.
    pub fn records(&self) -> u64 {
        self.packs.values().map(|p| p.records.len()).sum()
    }

    /// The snapshots reaching any of the index blocks `index`.
    pub fn snapshots_of(&self, index: &RoaringBitmap) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        for n in index {
            if let Some(r) = self
                .index_ids
                .get(n as usize)
                .and_then(|id| self.index.get(id))
            {
                out |= &r.snapshots;
            }
        }
        out
    }
}

/// `n` as a number of the walk: snapshots and index blocks are numbered
/// with u32 (roaring bitmaps); the walk refuses to go past that rather
/// than alias two of them.
fn num(what: &'static str, n: usize) -> Result<u32, RepoError> {
    super::format::u32_field(what, n as u64)
        .ok()
        .filter(|n| *n < u32::MAX)
        .ok_or(RepoError::Overflow(super::format::Overflow {
            what,
            value: n as u64,
            bits: 32,
        }))
}

/// Reads every manifest (with its index maps) and every index block they
/// reference.
///
/// Damage (a missing or corrupt manifest or index block, a name blockd
/// never writes) is collected in [`Refs::problems`]; a provider failure
/// ends the walk with an error, since what it would have read is unknown.
///
/// # Errors
/// Provider errors; more than 2^32 − 1 snapshots or index blocks.
pub async fn walk(repo: &Repo) -> Result<Refs, RepoError> {
    let mut refs = Refs::default();
    let names = repo.list_snapshots(None).await?;
    let manifests = futures::stream::iter(names.into_iter().map(|(v, n)| async move {
        if !name::is_valid(&n) {
            let e = repo.foreign_manifest(&v, &n);
            return (v, n, Err(e));
        }
        let m = repo.get_manifest(&v, &n).await;
        (v, n, m)
    }))
    .buffered(FETCHES)
    .collect::<Vec<_>>()
    .await;
    for (v, n, m) in manifests {
        let s = num("snapshots in one walk", refs.snapshots.len())?;
        refs.snapshots.push(format!("{v}/{n}"));
        match m {
            Ok(m) => add_manifest(&mut refs, s, &m)?,
            Err(e) if is_damage(&e) => {
                refs.problems.push(found(&e, std::iter::once(s).collect()));
            }
            Err(e) => return Err(e),
        }
    }
    let blocks: Vec<(u32, u64, String)> = refs
        .index_ids
        .iter()
        .map(|id| {
            let r = &refs.index[id];
            (r.num, r.block, id.clone())
        })
        .collect();
    let mut read = futures::stream::iter(
        blocks
            .into_iter()
            .map(|(n, block, id)| async move { (n, repo.get_index(block, &id).await) }),
    )
    .buffer_unordered(FETCHES);
    while let Some((n, entries)) = read.next().await {
        match entries {
            Ok(entries) => {
                for e in entries {
                    let p = refs.packs.entry(e.chunk.pack).or_default();
                    if p.records.insert(e.chunk.offset) {
                        p.bytes += u64::from(e.chunk.stored_len);
                    }
                    p.index.insert(n);
                }
            }
            Err(e) if is_damage(&e) => {
                let id = &refs.index_ids[n as usize];
                let snaps = refs.index[id].snapshots.clone();
                refs.problems.push(found(&e, snaps));
            }
            Err(e) => return Err(e),
        }
    }
    drop(read);
    resolve(repo, &mut refs).await?;
    settle(repo, &mut refs).await?;
    Ok(refs)
}

/// Drops the damage that a concurrent delete explains: a manifest listed
/// and gone by its read, an index block or relocation that only deleted
/// snapshots needed (collected after them). What the remaining
/// snapshots need stays a problem.
async fn settle(repo: &Repo, refs: &mut Refs) -> Result<(), RepoError> {
    if refs.problems.is_empty() {
        return Ok(());
    }
    let needed = refs
        .problems
        .iter()
        .fold(RoaringBitmap::new(), |a, p| a | &p.snapshots);
    let gone = deleted(repo, refs, &needed).await?;
    refs.problems
        .retain(|p| p.snapshots.is_empty() || !p.snapshots.is_subset(&gone));
    Ok(())
}

/// Which of the walk's snapshots `needed` are deleted now: their manifest
/// is missing. A check that finds an object gone after its walk asks this
/// of the snapshots that needed it, as [`settle`] does of the walk's own
/// findings: a snapshot deleted (and collected) under the check is not
/// damage.
pub(super) async fn deleted(
    repo: &Repo,
    refs: &Refs,
    needed: &RoaringBitmap,
) -> Result<RoaringBitmap, RepoError> {
    let named: Vec<(u32, String, String)> = needed
        .iter()
        .filter_map(|s| {
            let (v, n) = refs.snapshots.get(s as usize)?.rsplit_once('/')?;
            name::is_valid(n).then(|| (s, v.to_string(), n.to_string()))
        })
        .collect();
    let mut read = futures::stream::iter(
        named
            .into_iter()
            .map(|(s, v, n)| async move { (s, repo.get_manifest(&v, &n).await) }),
    )
    .buffer_unordered(FETCHES);
    let mut gone = RoaringBitmap::new();
    while let Some((s, m)) = read.next().await {
        match m {
            Err(RepoError::Missing { .. }) => {
                gone.insert(s);
            }
            Ok(_) | Err(RepoError::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(gone)
}

/// Moves the references to records of repacked packs to where the
/// records are now (the winning relocation of each offset); what no
/// relocation covers stays a reference to the pack itself. What moved
/// is noted in [`Refs::moved_out`] too.
async fn resolve(repo: &Repo, refs: &mut Refs) -> Result<(), RepoError> {
    let (listed, _) = repo.list_relocs().await?;
    refs.relocated = listed.into_iter().map(|(from, _)| from).collect();
    let named: Vec<PackId> = refs
        .packs
        .keys()
        .filter(|p| refs.relocated.contains(*p))
        .copied()
        .collect();
    let mut loaded = futures::stream::iter(
        named
            .into_iter()
            .map(|p| async move { (p, repo.relocs_of(&p).await) }),
    )
    .buffer_unordered(FETCHES);
    while let Some((p, relocs)) = loaded.next().await {
        let relocs = match relocs {
            Ok(r) => r,
            Err(e) if is_damage(&e) => {
                let snaps = refs.snapshots_of(&refs.packs[&p].index);
                refs.problems.push(found(&e, snaps));
                continue;
            }
            Err(e) => return Err(e),
        };
        let w = Winners::of(&relocs);
        let Some(named) = refs.packs.remove(&p) else {
            continue;
        };
        let mut stays = PackRef {
            index: named.index.clone(),
            bytes: named.bytes,
            ..PackRef::default()
        };
        let mut targets: HashSet<PackId> = HashSet::new();
        for off in &named.records {
            let Some(t) = w.get(off) else {
                stays.records.insert(off);
                continue;
            };
            let q = refs.packs.entry(t.pack).or_default();
            if q.records.insert(t.to) {
                q.bytes += u64::from(t.len);
            }
            stays.bytes = stays.bytes.saturating_sub(u64::from(t.len));
            if targets.insert(t.pack) {
                q.index |= &named.index;
                refs.sources.entry(t.pack).or_default().push(p);
            }
            if !refs.relocs.contains(w.key(t)) {
                refs.relocs.insert(w.key(t).to_string());
            }
        }
        let out = PackRef {
            records: &named.records - &stays.records,
            index: named.index,
            bytes: named.bytes.saturating_sub(stays.bytes),
        };
        if !out.records.is_empty() {
            refs.moved_out.insert(p, out);
        }
        if !stays.records.is_empty() {
            refs.packs.insert(p, stays);
        }
    }
    Ok(())
}

/// The winning relocations of the packs named in index entries whose
/// records are in `pack` now: `(named pack, its winners)`.
///
/// # Errors
/// Provider errors; a damaged relocation.
pub async fn moved_into(
    repo: &Repo,
    refs: &Refs,
    pack: &PackId,
) -> Result<Vec<(PackId, Winners)>, RepoError> {
    let mut out = Vec::new();
    for p in refs.sources.get(pack).into_iter().flatten() {
        out.push((*p, Winners::of(&repo.relocs_of(p).await?)));
    }
    Ok(out)
}

fn add_manifest(refs: &mut Refs, s: u32, m: &Manifest) -> Result<(), RepoError> {
    refs.maps.extend(m.map.iter().map(|(_, id)| id.clone()));
    for (block, id) in &m.blocks {
        if let Some(r) = refs.index.get_mut(id) {
            r.snapshots.insert(s);
            continue;
        }
        let n = num("index blocks in one walk", refs.index_ids.len())?;
        refs.index_ids.push(id.clone());
        refs.index.insert(
            id.clone(),
            IndexRef {
                num: n,
                block: *block,
                snapshots: std::iter::once(s).collect(),
            },
        );
    }
    Ok(())
}

/// Whether `e` says the object is damaged (missing, corrupt), as opposed
/// to the store failing to answer.
pub fn is_damage(e: &RepoError) -> bool {
    matches!(e, RepoError::Missing { .. } | RepoError::Corrupt { .. })
}

fn found(e: &RepoError, snapshots: RoaringBitmap) -> Found {
    let reason = match e {
        RepoError::Missing { .. } => "missing".to_string(),
        RepoError::Corrupt { reason, .. } => reason.clone(),
        e => e.to_string(),
    };
    Found {
        object: e.object().to_string(),
        reason,
        snapshots,
    }
}
