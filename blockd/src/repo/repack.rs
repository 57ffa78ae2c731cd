//! Repacking: copying the live records of mostly-dead packs, and of small
//! packs, into new full packs, so that garbage collection reclaims the
//! rest. Part of a collection run (`super::gc`); the argument is FORMAT.md's
//! rule 7.
//!
//! - **What.** A pack in use whose dead bytes push the unused share past
//!   `--max-unused` (the most dead first, restic's rule), and every pack in
//!   use under a quarter of the pack size when there are at least two (an
//!   incremental of a few writes leaves a pack of its own).
//! - **How.** Each record is read, checked (seal and hash, as a restore
//!   would: damage is never copied) and appended unchanged to a new pack;
//!   records are sealed with their chunk id, not their place, so the bytes
//!   stay valid. After each new pack is stored, relocations are written
//!   from every pack the index entries name to it (`super::reloc`); then
//!   the old packs are condemned by the run's mark like any unreferenced
//!   pack, and deleted a grace period later if nothing needs them then.
//! - **Who may be hurt.** Nobody: until a relocation exists, the old pack
//!   is the only copy and is referenced; after, either copy serves. The
//!   collector registers a session like a backup (rule 2), so no sweep
//!   deletes a new pack whose relocations are not written yet.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use blockd_api::MaxUnused;
use futures::StreamExt;

use super::fetch::{plan, MAX_GET};
use super::format::{ChunkLoc, TRAILER_REC_LEN};
use super::gc::Session;
use super::refs::{self, Refs};
use super::reloc::{Move, Reloc};
use super::{PackBuilder, PackId, Repo, RepoError};

/// Source packs read ahead of the copying.
const READS: usize = 4;
/// Bytes of a pack that are neither records nor per-record trailer
/// entries: footer (12), trailer header (5), seal overhead (at most 28).
const PACK_FIXED: u64 = 12 + 5 + 28;

/// What a run repacks, and the unused space it found.
#[derive(Debug, Default)]
pub struct Choice {
    /// Packs to copy out of, in order.
    pub packs: Vec<PackId>,
    /// Live bytes to copy.
    pub bytes: u64,
    /// Bytes of records in use, over every pack in use.
    pub used: u64,
    /// Bytes of dead records (and their trailer entries) in packs in use.
    pub unused: u64,
}

/// Dead bytes of a pack of `size` bytes whose records in use are `r`.
fn dead(size: u64, r: &refs::PackRef) -> u64 {
    let kept = r.bytes + r.records.len() * TRAILER_REC_LEN as u64 + PACK_FIXED;
    size.saturating_sub(kept)
}

/// Chooses the packs to repack among those in use that exist (`sizes`).
pub fn choose(
    refs: &Refs,
    sizes: &HashMap<PackId, u64>,
    pack_size: u64,
    max_unused: MaxUnused,
) -> Choice {
    let mut live: Vec<(PackId, u64, u64, u64)> = refs
        .packs
        .iter()
        .filter_map(|(id, r)| sizes.get(id).map(|&s| (*id, s, r.bytes, dead(s, r))))
        .collect();
    let mut c = Choice {
        used: live.iter().map(|p| p.2).sum(),
        unused: live.iter().map(|p| p.3).sum(),
        ..Choice::default()
    };
    let Some(limit) = max_unused.limit(c.used) else {
        return c;
    };
    // Most dead (as a share of the pack) first; ties by id, so two
    // collectors choose alike.
    live.sort_by(|a, b| {
        let ra = u128::from(a.3) * u128::from(b.1);
        let rb = u128::from(b.3) * u128::from(a.1);
        rb.cmp(&ra).then(a.0.cmp(&b.0))
    });
    let mut left = c.unused;
    let mut chosen: HashSet<PackId> = HashSet::new();
    for &(id, _, bytes, d) in &live {
        if left <= limit || d == 0 {
            break;
        }
        left -= d;
        chosen.insert(id);
        c.packs.push(id);
        c.bytes += bytes;
    }
    let small: Vec<&(PackId, u64, u64, u64)> = live
        .iter()
        .filter(|p| p.1 < pack_size / 4 && !chosen.contains(&p.0))
        .collect();
    if small.len() >= 2 || (!small.is_empty() && !c.packs.is_empty()) {
        for &&(id, _, bytes, _) in &small {
            c.packs.push(id);
            c.bytes += bytes;
        }
    }
    c
}

/// What a repacking did.
#[derive(Debug, Default)]
pub struct Repacked {
    /// Packs whose every record in use now lives elsewhere (to condemn).
    pub sources: Vec<PackId>,
    /// New packs written.
    pub written: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Packs left alone, and why.
    pub skipped: Vec<String>,
    /// Of those, the packs found damaged (missing, or a record that does
    /// not open), with the error.
    pub damaged: Vec<(PackId, RepoError)>,
}

/// Where a record of a source pack is named: `(pack named by index
/// entries, its offset there, the generation to write)`.
type Origin = (PackId, u32, u32);

/// The new pack being filled, and the moves that point into it.
struct Out {
    pack: PackBuilder,
    moves: Vec<(PackId, u32, Move)>,
}

/// Copies the live records of `packs` into new packs and writes the
/// relocations; see the module docs. A pack that cannot be read, or
/// holds a damaged record, is left as it is and reported.
///
/// # Errors
/// Provider errors writing the new packs or relocations (what was written
/// is harmless: unreferenced new packs are collected later).
pub async fn repack(
    repo: &Arc<Repo>,
    refs: &Refs,
    packs: &[PackId],
    sizes: &HashMap<PackId, u64>,
    session: &Session,
) -> Result<Repacked, RepoError> {
    let cap = usize::try_from(repo.config.pack_size).unwrap_or(usize::MAX);
    let mut done = Repacked::default();
    // Pack buffers and direct reads' buffers go back to the system at
    // the end.
    let _buffers = super::mapped::ReleaseOnDrop;
    let mut out = Out {
        pack: PackBuilder::for_config(&repo.config)?,
        moves: Vec::new(),
    };
    // Sources whose records are all in `out` or earlier packs.
    let mut pushed: Vec<PackId> = Vec::new();
    // Sources are read a few at a time, ahead of the copying.
    let mut reads = futures::stream::iter(packs.iter().copied().map(|id| async move {
        let r = read_source(repo, refs, &id, sizes).await;
        (id, r)
    }))
    .buffered(READS);
    while let Some((id, read)) = reads.next().await {
        let name = Repo::pack_name(&id);
        let records = match read {
            Ok(r) => r,
            Err(e) if refs::is_damage(&e) => {
                tracing::warn!(pack = %name, error = %e, "not repacked");
                done.skipped.push(format!("{name}: {e}"));
                done.damaged.push((id, e));
                continue;
            }
            Err(e) => return Err(e),
        };
        for (c, sealed, origins) in records {
            if !out.pack.is_empty() && out.pack.len() + sealed.len() > cap {
                if let Err(why) = flush(repo, &mut out, session, &mut done).await? {
                    done.skipped.push(why);
                    return Ok(done);
                }
                done.sources.append(&mut pushed);
            }
            let at = out.pack.push(c.id, &sealed, c.plain_len)?;
            done.bytes += sealed.len() as u64;
            for (p, from, gen) in origins {
                let m = Move {
                    from,
                    to: at.offset,
                    len: at.stored_len,
                };
                out.moves.push((p, gen, m));
            }
        }
        pushed.push(id);
    }
    if !out.pack.is_empty() {
        if let Err(why) = flush(repo, &mut out, session, &mut done).await? {
            done.skipped.push(why);
            return Ok(done);
        }
    }
    done.sources.append(&mut pushed);
    Ok(done)
}

/// Reads and checks the records of source `id` that are in use, with
/// where index entries name them.
async fn read_source(
    repo: &Arc<Repo>,
    refs: &Refs,
    id: &PackId,
    sizes: &HashMap<PackId, u64>,
) -> Result<Vec<(ChunkLoc, Vec<u8>, Vec<Origin>)>, RepoError> {
    let want = &refs.packs[id].records;
    let size = sizes.get(id).copied().unwrap_or(0);
    let trailer = repo.pack_trailer(id, size).await?;
    // Where each record is named: through relocations into this pack, or
    // (for a pack index entries name) right here.
    let mut origins: HashMap<u32, Vec<Origin>> = HashMap::new();
    if refs.sources.contains_key(id) {
        for (p, w) in refs::moved_into(repo, refs, id).await? {
            for t in w.targets().iter().filter(|t| t.pack == *id) {
                origins
                    .entry(t.to)
                    .or_default()
                    .push((p, t.from, w.gen + 1));
            }
        }
    } else {
        let gen = if refs.relocated.contains(id) {
            super::reloc::Winners::of(&repo.relocs_of(id).await?).gen + 1
        } else {
            1
        };
        for o in want {
            origins.entry(o).or_default().push((*id, o, gen));
        }
    }
    let live: Vec<ChunkLoc> = trailer
        .into_iter()
        .filter(|c| want.contains(c.offset) && origins.contains_key(&c.offset))
        .collect();
    let present: roaring::RoaringBitmap = live.iter().map(|c| c.offset).collect();
    if let Some(o) = want
        .iter()
        .find(|o| !present.contains(*o) && origins.contains_key(o))
    {
        return Err(repo.corrupt_pack(id, format!("no record at offset {o}, which the index uses")));
    }
    let mut out = Vec::with_capacity(live.len());
    for f in plan(live, MAX_GET) {
        let bytes = f.get_here(repo).await?;
        let r = repo.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let mut recs = Vec::with_capacity(f.chunks.len());
            for c in &f.chunks {
                let sealed = f.record(&r, c, &bytes)?;
                r.open_chunk_in(c, sealed)?;
                recs.push((*c, sealed.to_vec()));
            }
            Ok::<_, RepoError>(recs)
        })
        .await
        .map_err(|e| repo.corrupt_pack(id, format!("checking its records failed: {e}")))??;
        for (c, sealed) in checked {
            let o = origins.remove(&c.offset).unwrap_or_default();
            out.push((c, sealed, o));
        }
    }
    Ok(out)
}

/// Stores the new pack, then its relocations. `Ok(Err(why))` when the
/// collector's session is past its deadline: nothing more may be written.
async fn flush(
    repo: &Arc<Repo>,
    out: &mut Out,
    session: &Session,
    done: &mut Repacked,
) -> Result<Result<(), String>, RepoError> {
    let full = std::mem::replace(&mut out.pack, PackBuilder::new(0)?);
    let to = full.id;
    let (bytes, _) = full.finish(&repo.keys)?;
    repo.put_pack(&to, bytes).await?;
    done.written += 1;
    if let Err(why) = repo.session_valid(session).await? {
        return Ok(Err(format!(
            "repacking stopped before writing the relocations of {}: {why}",
            Repo::pack_name(&to)
        )));
    }
    let mut by_pack: HashMap<(PackId, u32), Vec<Move>> = HashMap::new();
    for (p, gen, m) in out.moves.drain(..) {
        by_pack.entry((p, gen)).or_default().push(m);
    }
    for ((from, gen), mut moves) in by_pack {
        moves.sort_by_key(|m| m.from);
        moves.dedup_by_key(|m| m.from);
        repo.put_reloc(&Reloc {
            from,
            to,
            gen,
            moves,
        })
        .await?;
    }
    out.pack = PackBuilder::for_config(&repo.config)?;
    Ok(Ok(()))
}
