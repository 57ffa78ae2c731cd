//! Streaming a frozen image to a repository.
//!
//! The volume is walked one index block (a fixed range, 64 MiB by default)
//! at a time. An incremental reads only the dirty runs of its change set;
//! a block without changes keeps the parent's index block id without even
//! fetching it. Each run is read through the I/O engine in pieces of up to
//! 1 MiB, cut at chunk-size boundaries (so a run of dirty extents becomes
//! chunks of up to 64 KiB, and a scattered 4 KiB write a 4 KiB chunk),
//! hashed, zero-checked, compressed and sealed on the blocking pool (a few
//! pieces in flight), then packed in order. Finished packs upload in the
//! background with bounded concurrency; memory stays bounded by the pieces
//! and packs in flight, never by the volume or the repository.
//!
//! Resume: every few blocks the current pack is closed, uploads are
//! awaited, and the finished blocks are recorded in the state database
//! (a checkpoint). Every uploaded pack is recorded with its chunk list as
//! soon as it lands, so after a crash the chunks uploaded since the last
//! checkpoint are referenced again, never uploaded twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::CloudError;
use crate::repo::format::{self, ChunkLoc, Entry, Manifest};
use crate::repo::{PackBuilder, Repo, RepoError};
use crate::snapshot::store::SnapshotStore;
use crate::state::StateDb;
use crate::volume::dirty_map::ChangeSet;
use crate::volume::Volume;

/// Largest read from the volume.
const PIECE: u64 = 1 << 20;
/// Read buffers kept for reuse.
const POOL: usize = 2 * AHEAD + 2;
/// Parent index blocks fetched ahead.
const PREFETCH: usize = 8;
/// Most ranges read as one piece.
const BATCH_RANGES: usize = 256;
/// Pieces read and processed ahead of the packer.
const AHEAD: usize = 4;
/// Packs uploading at once.
const UPLOADS: usize = 3;
/// Checkpoint after this many blocks or this long.
const CHECKPOINT_BLOCKS: usize = 64;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(15);
/// Most chunk ids remembered for deduplication within one backup.
const DEDUP_CAP: usize = 1 << 20;

/// Live counters of a task.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes to process.
    pub total: AtomicU64,
    /// Bytes processed.
    pub done: AtomicU64,
    /// Bytes uploaded or fetched.
    pub transferred: AtomicU64,
    /// Plain bytes referenced instead of stored.
    pub reused: AtomicU64,
    /// Plain bytes of new chunks stored.
    pub new: AtomicU64,
    /// Bytes read from the volume.
    pub read: AtomicU64,
}

impl Progress {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What a backup needs.
pub struct Job {
    /// Task id.
    pub task: String,
    /// Destination.
    pub repo: Arc<Repo>,
    /// Source volume.
    pub volume: Arc<Volume>,
    /// Its frozen image.
    pub snap: Arc<SnapshotStore>,
    /// Extents to read; ignored for a full read.
    pub changes: ChangeSet,
    /// Read everything.
    pub full: bool,
    /// Parent manifest: its unchanged index blocks are shared, and chunks
    /// found at the same place are referenced, not stored again.
    pub parent: Option<Manifest>,
    /// State database (checkpoints).
    pub db: Arc<StateDb>,
    /// Counters.
    pub progress: Arc<Progress>,
    /// Stop or shutdown.
    pub cancel: CancellationToken,
    /// Persists the task record with current counters (for checkpoints).
    pub record: Box<dyn Fn() -> Result<String, CloudError> + Send + Sync>,
}

/// One chunk-sized piece, after analysis.
enum Out {
    Hole,
    Ref(ChunkLoc, u32),
    New([u8; 32], Vec<u8>),
}

struct Analyzed {
    /// Offset within the block.
    start: u32,
    len: u32,
    out: Out,
}

/// A parent index block being fetched ahead.
type Prefetch = (
    u64,
    tokio::task::JoinHandle<Result<Vec<Entry>, crate::repo::RepoError>>,
);

type Dedup = Arc<Mutex<HashMap<[u8; 32], ChunkLoc>>>;

fn is_zero(b: &[u8]) -> bool {
    let (chunks, rest) = b.split_at(b.len() & !15);
    chunks
        .chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Runs a backup; returns the manifest's block list.
///
/// # Errors
/// Volume I/O, provider errors, cancellation.
pub async fn run(job: &Job) -> Result<Vec<(u64, String)>, CloudError> {
    let repo = &job.repo;
    let span = repo.config.index_span;
    let cs = repo.config.chunk_size;
    let size = job.snap.size();
    let es = job.snap.extent_size();
    let nblocks = size.div_ceil(span);

    // Resume state.
    let done_blocks: HashMap<u64, Option<String>> =
        job.db.task_blocks(&job.task)?.into_iter().collect();
    let dedup: Dedup = Arc::new(Mutex::new(HashMap::new()));
    // Chunks this task uploaded before a crash, after its last checkpoint:
    // referenced again (and counted as new, once), never uploaded twice.
    let mut resumed: HashMap<[u8; 32], ChunkLoc> = HashMap::new();
    for (pack, trailer) in job.db.task_packs(&job.task)? {
        let Ok(pack) = <[u8; 16]>::try_from(pack.as_slice()) else {
            continue;
        };
        // Recorded before its upload: use it only if it landed whole.
        if !repo.has_pack(&pack).await? {
            continue;
        }
        if let Ok(chunks) = format::decode_trailer(&trailer, pack, u64::MAX) {
            for c in chunks {
                resumed.insert(c.id, c);
            }
        }
    }
    if !done_blocks.is_empty() {
        tracing::info!(task = %job.task, blocks = done_blocks.len(), "resuming backup after its last checkpoint");
    }

    let mut blocks: Vec<(u64, String)> = Vec::new();
    let mut pending: Vec<(u64, Option<String>)> = Vec::new();
    let mut pack = PackBuilder::new(0);
    let mut uploads: JoinSet<Result<(), CloudError>> = JoinSet::new();
    let mut last_checkpoint = Instant::now();
    // Blocks read since the last checkpoint (untouched ones cost nothing).
    let mut worked = 0usize;
    // Read buffers, recycled.
    let pool: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));

    let parent_id_of = |b: u64| {
        job.parent.as_ref().and_then(|p| {
            p.blocks
                .binary_search_by_key(&b, |x| x.0)
                .ok()
                .map(|i| p.blocks[i].1.clone())
        })
    };
    let touched = |b: u64| {
        if job.full || !job.changes.known {
            return true;
        }
        let first = u32::try_from(b * span / es).unwrap_or(u32::MAX);
        let end = u32::try_from(((b + 1) * span).min(size).div_ceil(es)).unwrap_or(u32::MAX);
        job.changes.extents.range_cardinality(first..end) > 0
    };
    // Parent index blocks are fetched a few blocks ahead, so a store's
    // round trip is paid once per window, not once per block.
    let mut wanted = (0..nblocks)
        .filter(|b| !done_blocks.contains_key(b) && touched(*b))
        .filter_map(|b| parent_id_of(b).map(|id| (b, id)));
    let mut prefetch: std::collections::VecDeque<Prefetch> = std::collections::VecDeque::new();
    let mut fill = |prefetch: &mut std::collections::VecDeque<_>| {
        while prefetch.len() < PREFETCH {
            let Some((b, id)) = wanted.next() else { break };
            let repo = repo.clone();
            prefetch.push_back((b, tokio::spawn(async move { repo.get_index(b, &id).await })));
        }
    };

    for b in 0..nblocks {
        if job.cancel.is_cancelled() {
            return Err(CloudError::Cancelled);
        }
        let bstart = b * span;
        let blen = span.min(size - bstart);
        if let Some(id) = done_blocks.get(&b) {
            if let Some(id) = id {
                blocks.push((b, id.clone()));
            }
            continue;
        }
        let parent_id = parent_id_of(b);
        // Byte ranges (relative to the block) this backup replaces, and
        // those it reads: a full read replaces the whole block but reads
        // only what is not a hole in the frozen image.
        let ranges: Vec<(u64, u64)> = if job.full {
            vec![(0, blen)]
        } else {
            let first = u32::try_from(bstart / es).unwrap_or(u32::MAX);
            let end = u32::try_from((bstart + blen).div_ceil(es)).unwrap_or(u32::MAX);
            let mut pos = 0u64;
            let mut out = Vec::new();
            for (n, dirty) in job.changes.runs(first, end, usize::MAX) {
                let len = (u64::from(n) * es).min(blen - pos);
                if dirty {
                    out.push((pos, len));
                }
                pos += len;
            }
            out
        };
        if ranges.is_empty() {
            if let Some(id) = parent_id {
                blocks.push((b, id.clone()));
                pending.push((b, Some(id)));
            } else {
                pending.push((b, None));
            }
            continue;
        }
        fill(&mut prefetch);
        let parent_entries: Arc<Vec<Entry>> = Arc::new(match &parent_id {
            Some(_) => {
                let (pb, handle) = prefetch
                    .pop_front()
                    .ok_or_else(|| CloudError::Internal("index prefetch out of step".into()))?;
                if pb != b {
                    return Err(CloudError::Internal(format!(
                        "index prefetch out of step: got block {pb}, wanted {b}"
                    )));
                }
                handle
                    .await
                    .map_err(|e| CloudError::Internal(e.to_string()))??
            }
            None => Vec::new(),
        });
        fill(&mut prefetch);
        let reads = if job.full {
            job.volume
                .frozen_data(&*job.snap, bstart, blen)
                .map_err(|e| {
                    CloudError::Internal(format!("reading volume {}: {e}", job.volume.name()))
                })?
        } else {
            ranges.clone()
        };

        // Pieces: read ranges cut at PIECE (aligned to chunk boundaries),
        // and small ranges batched up to PIECE bytes, so a scattered
        // incremental costs one thread hop per batch, not per 4 KiB run.
        let mut pieces: Vec<Vec<(u64, u64)>> = Vec::new();
        let mut batch: Vec<(u64, u64)> = Vec::new();
        let mut batch_len = 0;
        for &(start, len) in &reads {
            let mut pos = start;
            while pos < start + len {
                let stop = ((pos / PIECE + 1) * PIECE).min(start + len);
                if batch_len + (stop - pos) > PIECE || batch.len() >= BATCH_RANGES {
                    pieces.push(std::mem::take(&mut batch));
                    batch_len = 0;
                }
                batch.push((pos, stop - pos));
                batch_len += stop - pos;
                pos = stop;
            }
        }
        if !batch.is_empty() {
            pieces.push(batch);
        }
        let analyzed = futures::stream::iter(pieces)
            .map(|piece| {
                let repo = repo.clone();
                let parent = parent_entries.clone();
                let dedup = dedup.clone();
                let volume = job.volume.clone();
                let snap = job.snap.clone();
                let progress = job.progress.clone();
                let pool = pool.clone();
                async move {
                    let reads = piece.iter().map(|&(pos, len)| {
                        let volume = volume.clone();
                        let snap = snap.clone();
                        let buf = pool
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .pop()
                            .unwrap_or_default();
                        async move {
                            let n = usize::try_from(len).unwrap_or(0);
                            let mut buf = buf;
                            buf.resize(n, 0);
                            volume
                                .read_frozen(&*snap, buf, 0, bstart + pos)
                                .await
                                .map_err(|e| {
                                    CloudError::Internal(format!(
                                        "reading volume {}: {e}",
                                        volume.name()
                                    ))
                                })
                        }
                    });
                    let data = futures::future::try_join_all(reads).await?;
                    Progress::add(&progress.read, piece.iter().map(|r| r.1).sum());
                    tokio::task::spawn_blocking(move || {
                        let out = piece
                            .iter()
                            .zip(&data)
                            .flat_map(|(&(pos, _), d)| analyze(&repo, d, pos, cs, &parent, &dedup))
                            .collect::<Vec<_>>();
                        let mut pool = pool
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        for d in data {
                            if pool.len() < POOL {
                                pool.push(d);
                            }
                        }
                        out
                    })
                    .await
                    .map_err(|e| CloudError::Internal(e.to_string()))
                }
            })
            .buffered(AHEAD);
        futures::pin_mut!(analyzed);
        let mut new_entries = Vec::new();
        while let Some(piece) = analyzed.next().await {
            if job.cancel.is_cancelled() {
                return Err(CloudError::Cancelled);
            }
            for a in piece? {
                Progress::add(&job.progress.done, u64::from(a.len));
                let (loc, off) = match a.out {
                    Out::Hole => continue,
                    Out::Ref(loc, off) => {
                        Progress::add(&job.progress.reused, u64::from(a.len));
                        (loc, off)
                    }
                    Out::New(id, sealed) => {
                        let known = dedup
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(&id)
                            .copied();
                        if let Some(loc) = resumed.remove(&id).filter(|_| known.is_none()) {
                            Progress::add(&job.progress.new, u64::from(a.len));
                            dedup
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .insert(id, loc);
                            (loc, 0)
                        } else if let Some(loc) = known {
                            Progress::add(&job.progress.reused, u64::from(a.len));
                            (loc, 0)
                        } else {
                            let loc = pack.push(id, &sealed, a.len).map_err(RepoError::from)?;
                            Progress::add(&job.progress.new, u64::from(a.len));
                            {
                                let mut d = dedup
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                                if d.len() < DEDUP_CAP {
                                    d.insert(id, loc);
                                }
                            }
                            if pack.len() as u64 >= repo.config.pack_size {
                                let full = std::mem::replace(&mut pack, PackBuilder::new(0));
                                upload(job, full, &mut uploads).await?;
                            }
                            (loc, 0)
                        }
                    }
                };
                new_entries.push(Entry {
                    start: a.start,
                    len: a.len,
                    chunk_off: off,
                    chunk: loc,
                });
            }
        }
        let entries = overlay(&parent_entries, &ranges, new_entries);
        let id = if entries.is_empty() {
            None
        } else if parent_id.is_some() && *parent_entries == entries {
            parent_id
        } else {
            let (id, sealed) = repo.seal_index(b, &entries)?;
            let repo = repo.clone();
            let progress = job.progress.clone();
            while uploads.len() >= UPLOADS * 4 {
                if let Some(r) = uploads.join_next().await {
                    r.map_err(|e| CloudError::Internal(e.to_string()))??;
                }
            }
            let key = id.clone();
            uploads.spawn(async move {
                let n = repo.put_index(&key, sealed).await?;
                Progress::add(&progress.transferred, n);
                Ok(())
            });
            Some(id)
        };
        if let Some(id) = &id {
            blocks.push((b, id.clone()));
        }
        pending.push((b, id));
        worked += 1;
        if worked >= CHECKPOINT_BLOCKS || last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            worked = 0;
            let full = std::mem::replace(&mut pack, PackBuilder::new(0));
            upload(job, full, &mut uploads).await?;
            drain(&mut uploads).await?;
            job.db
                .checkpoint_task(&job.task, &pending, &(job.record)()?)?;
            pending.clear();
            last_checkpoint = Instant::now();
        }
    }
    upload(job, pack, &mut uploads).await?;
    drain(&mut uploads).await?;
    if !pending.is_empty() {
        job.db
            .checkpoint_task(&job.task, &pending, &(job.record)()?)?;
    }
    Ok(blocks)
}

/// Hashes, zero-checks and seals the chunks of one piece read at `pos`
/// (relative to its block).
fn analyze(
    repo: &Repo,
    data: &[u8],
    pos: u64,
    cs: u64,
    parent: &[Entry],
    dedup: &Dedup,
) -> Vec<Analyzed> {
    let mut out = Vec::new();
    let end = pos + data.len() as u64;
    let mut at = pos;
    while at < end {
        let stop = ((at / cs + 1) * cs).min(end);
        let bytes =
            &data[usize::try_from(at - pos).unwrap_or(0)..usize::try_from(stop - pos).unwrap_or(0)];
        let start = u32::try_from(at).unwrap_or(u32::MAX);
        let len = u32::try_from(stop - at).unwrap_or(u32::MAX);
        let o = if is_zero(bytes) {
            Out::Hole
        } else {
            let id = repo.keys.chunk_id(bytes);
            let at_place = parent
                .binary_search_by_key(&start, |e| e.start)
                .ok()
                .map(|i| parent[i])
                .filter(|e| e.len == len && e.chunk_off == 0 && e.chunk.id == id);
            let known = at_place.map(|e| e.chunk).or_else(|| {
                dedup
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&id)
                    .copied()
            });
            match known {
                Some(loc) => Out::Ref(loc, 0),
                None => Out::New(id, repo.seal_chunk(&id, bytes)),
            }
        };
        out.push(Analyzed { start, len, out: o });
        at = stop;
    }
    out
}

/// The block's new map: the parent's entries with every replaced range cut
/// out, plus the new entries (holes are simply absent). One pass over both
/// sorted lists.
pub fn overlay(parent: &[Entry], ranges: &[(u64, u64)], new: Vec<Entry>) -> Vec<Entry> {
    let mut out = Vec::with_capacity(parent.len() + new.len());
    let mut r = 0;
    for e in parent {
        let (es, ee) = (u64::from(e.start), e.end());
        // Ranges wholly before this entry are done with.
        while r < ranges.len() && ranges[r].0 + ranges[r].1 <= es {
            r += 1;
        }
        let mut pos = es;
        let mut k = r;
        while k < ranges.len() && ranges[k].0 < ee {
            let (rs, re) = (ranges[k].0, ranges[k].0 + ranges[k].1);
            if rs > pos {
                out.push(cut(e, pos, rs));
            }
            pos = pos.max(re);
            k += 1;
        }
        if pos < ee {
            out.push(cut(e, pos, ee));
        }
    }
    out.extend(new);
    out.sort_by_key(|e| e.start);
    out
}

/// The part `[s, t)` of entry `e` (block-relative offsets).
fn cut(e: &Entry, s: u64, t: u64) -> Entry {
    Entry {
        start: u32::try_from(s).unwrap_or(u32::MAX),
        len: u32::try_from(t - s).unwrap_or(u32::MAX),
        chunk_off: e.chunk_off + u32::try_from(s - u64::from(e.start)).unwrap_or(0),
        chunk: e.chunk,
    }
}

async fn upload(
    job: &Job,
    pack: PackBuilder,
    uploads: &mut JoinSet<Result<(), CloudError>>,
) -> Result<(), CloudError> {
    if pack.is_empty() {
        return Ok(());
    }
    while uploads.len() >= UPLOADS {
        if let Some(r) = uploads.join_next().await {
            r.map_err(|e| CloudError::Internal(e.to_string()))??;
        }
    }
    let id = pack.id;
    let repo = job.repo.clone();
    let db = job.db.clone();
    let task = job.task.clone();
    let progress = job.progress.clone();
    let (bytes, chunks) = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || pack.finish(&repo.keys))
            .await
            .map_err(|e| CloudError::Internal(e.to_string()))?
            .map_err(RepoError::from)?
    };
    // Recorded before the upload: after a crash the pack is checked for,
    // so a pack that landed just before the crash is never sent again.
    let trailer = format::encode_trailer(&chunks).map_err(RepoError::from)?;
    db.add_task_pack(&task, &id, &trailer)?;
    uploads.spawn(async move {
        let n = repo.put_pack(&id, bytes).await?;
        Progress::add(&progress.transferred, n);
        Ok(())
    });
    Ok(())
}

async fn drain(uploads: &mut JoinSet<Result<(), CloudError>>) -> Result<(), CloudError> {
    while let Some(r) = uploads.join_next().await {
        r.map_err(|e| CloudError::Internal(e.to_string()))??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u32, len: u32, id: u8) -> Entry {
        Entry {
            start,
            len,
            chunk_off: 0,
            chunk: ChunkLoc {
                id: [id; 32],
                pack: [0; 16],
                offset: 0,
                stored_len: len,
                plain_len: len,
            },
        }
    }

    #[test]
    fn overlay_cuts_parent_entries() {
        let parent = vec![e(0, 65536, 1)];
        let new = vec![e(4096, 4096, 2)];
        let got = overlay(&parent, &[(4096, 4096), (16384, 4096)], new);
        // [0,4K) of chunk 1, new [4K,8K), [8K,16K) of chunk 1, hole [16K,20K), rest of chunk 1.
        assert_eq!(got.len(), 4);
        assert_eq!((got[0].start, got[0].len, got[0].chunk_off), (0, 4096, 0));
        assert_eq!(got[1].chunk.id, [2; 32]);
        assert_eq!(
            (got[2].start, got[2].len, got[2].chunk_off),
            (8192, 8192, 8192)
        );
        assert_eq!(
            (got[3].start, got[3].len, got[3].chunk_off),
            (20480, 45056, 20480)
        );
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut b = vec![0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        b[4096] = 0;
        b[17] = 3;
        assert!(!is_zero(&b));
    }
}
