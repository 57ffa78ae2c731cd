//! Streaming a frozen image to a repository.
//!
//! The volume is walked one index block (a fixed range, 64 MiB by default)
//! at a time, visiting only the blocks that can matter (see [`Candidates`]):
//! the cost follows the data and the change, not the volume size. An
//! incremental reads only the dirty runs of its change set;
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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cloud::task::{Checkpoint, Progress};
use crate::cloud::CloudError;
use crate::repo::damage::Avoid;
use crate::repo::format::{self, ChunkLoc, Entry, Manifest};
use crate::repo::{index, PackBuilder, Repo, RepoError};
use crate::snapshot::store::SnapshotStore;
use crate::state::StateDb;
use crate::volume::cow::aligned;
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
const AHEAD: usize = 8;
/// Packs uploading at once.
const UPLOADS: usize = 3;
/// Checkpoint after this many blocks or this long.
const CHECKPOINT_BLOCKS: usize = 64;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(15);
/// Most chunk ids remembered for deduplication within one backup.
const DEDUP_CAP: usize = 1 << 20;

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
    /// Records finished blocks with the task record.
    pub checkpoint: Checkpoint,
    /// Damage a check recorded: the parent's index blocks to read again
    /// instead of keeping them or taking chunks from them.
    pub avoid: Avoid,
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
    // The packs' buffers go back to the system when the backup ends.
    let _buffers = crate::repo::mapped::ReleaseOnDrop;
    let span = job.repo.config.index_span;
    let size = job.snap.size();
    // Blocks finished before a crash (resume), with their index ids.
    let done_blocks: BTreeMap<u64, Option<String>> =
        job.db.task_blocks(&job.task)?.into_iter().collect();
    if !done_blocks.is_empty() {
        tracing::info!(task = %job.task, blocks = done_blocks.len(), "resuming backup after its last checkpoint");
    }
    let mut w = Writer::open(job).await?;
    let mut ahead = IndexAhead::new(job, &done_blocks);
    for b in Candidates::new(job, &done_blocks) {
        let b = b?;
        if job.cancel.is_cancelled() {
            return Err(CloudError::Cancelled);
        }
        let parent_id = parent_id_of(job, b);
        // A block finished before a crash or a failed attempt is kept,
        // unless a check has since found its parent block damaged: it
        // may have kept that block or taken chunks from it.
        if let Some(id) = done_blocks
            .get(&b)
            .filter(|_| !redo(job, parent_id.as_deref()))
        {
            if let Some(id) = id {
                w.blocks.push((b, id.clone()));
            }
            continue;
        }
        let bstart = b * span;
        let blen = span.min(size - bstart);
        // A parent block a check found damaged, or using damaged records,
        // is read again whole from the frozen image, as by a full read.
        let again = redo(job, parent_id.as_deref());
        let ranges = if again {
            vec![(0, blen)]
        } else {
            replaced_ranges(job, bstart, blen)
        };
        if ranges.is_empty() {
            w.unchanged(b, parent_id);
            continue;
        }
        let parent_entries = Arc::new(if again {
            Vec::new()
        } else {
            ahead.next(b, parent_id.as_deref()).await?
        });
        // A full read replaces the whole block but reads only what is not
        // a hole in the frozen image.
        let reads = if job.full || again {
            job.volume
                .frozen_data(&*job.snap, bstart, blen)
                .map_err(|e| read_error(job, e))?
        } else {
            ranges.clone()
        };
        let new_entries = w.pack_block(bstart, &reads, &parent_entries).await?;
        let entries = index::overlay(&parent_entries, &ranges, new_entries);
        w.finish_block(b, entries, parent_id, &parent_entries)
            .await?;
    }
    w.finish().await
}

/// The index blocks a backup visits, ascending: those that may hold
/// something to read (a full read: data in the frozen image; an
/// incremental: changed extents), the parent's blocks an incremental keeps
/// or replaces, and the blocks a crashed run finished. Each step jumps to
/// the next such block (SEEK_DATA, the COW index, the change set's
/// bitmap, the sorted parent list), so a 64 TiB volume holding a few MiB
/// costs a few steps, not a million.
struct Candidates<'a> {
    job: &'a Job,
    done: &'a BTreeMap<u64, Option<String>>,
    /// The next block to consider.
    from: u64,
    nblocks: u64,
}

impl<'a> Candidates<'a> {
    fn new(job: &'a Job, done: &'a BTreeMap<u64, Option<String>>) -> Self {
        Self {
            job,
            done,
            from: 0,
            nblocks: job.snap.size().div_ceil(job.repo.config.index_span),
        }
    }

    fn next_block(&self) -> Result<Option<u64>, CloudError> {
        let (job, from) = (self.job, self.from);
        let span = job.repo.config.index_span;
        let es = job.snap.extent_size();
        let done = self.done.range(from..).next().map(|(b, _)| *b);
        let data = if job.full {
            job.volume
                .next_frozen_data(&*job.snap, from.saturating_mul(span))
                .map_err(|e| read_error(job, e))?
                .map(|at| at / span)
        } else {
            job.changes
                .next_at(from.saturating_mul(span) / es)
                .map(|e| e.saturating_mul(es) / span)
        };
        // A full read replaces every block: the parent's blocks without
        // data now simply end.
        let parent = if job.full {
            None
        } else {
            job.parent.as_ref().and_then(|p| {
                let i = p.blocks.partition_point(|x| x.0 < from);
                p.blocks.get(i).map(|x| x.0)
            })
        };
        Ok([done, data, parent]
            .into_iter()
            .flatten()
            .min()
            .filter(|&b| b < self.nblocks))
    }
}

impl Iterator for Candidates<'_> {
    type Item = Result<u64, CloudError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.next_block() {
            Ok(Some(b)) => {
                self.from = b + 1;
                Some(Ok(b))
            }
            Ok(None) => {
                self.from = self.nblocks;
                None
            }
            Err(e) => {
                self.from = self.nblocks;
                Some(Err(e))
            }
        }
    }
}

fn read_error(job: &Job, e: std::io::Error) -> CloudError {
    CloudError::volume_io("reading", job.volume.name(), e)
}

/// The parent's index block id for block `b`, if it has one.
fn parent_id_of(job: &Job, b: u64) -> Option<String> {
    job.parent.as_ref().and_then(|p| {
        p.blocks
            .binary_search_by_key(&b, |x| x.0)
            .ok()
            .map(|i| p.blocks[i].1.clone())
    })
}

/// True when the parent's index block `parent_id` must not be kept or
/// read: a check recorded it as damaged or using damaged records.
fn redo(job: &Job, parent_id: Option<&str>) -> bool {
    parent_id.is_some_and(|id| job.avoid.index.contains(id))
}

/// True when block `b` has anything to read.
fn touched(job: &Job, b: u64) -> bool {
    if job.full || !job.changes.known {
        return true;
    }
    let (span, es, size) = (
        job.repo.config.index_span,
        job.snap.extent_size(),
        job.snap.size(),
    );
    let first = b * span / es;
    let end = ((b + 1) * span).min(size).div_ceil(es);
    job.changes.extents.range_cardinality(first..end) > 0
}

/// Byte ranges (relative to the block at `bstart`, `blen` long) that this
/// backup replaces: the whole block for a full read, else its dirty runs.
fn replaced_ranges(job: &Job, bstart: u64, blen: u64) -> Vec<(u64, u64)> {
    if job.full {
        return vec![(0, blen)];
    }
    let es = job.snap.extent_size();
    let first = bstart / es;
    let end = (bstart + blen).div_ceil(es);
    let mut pos = 0u64;
    let mut out = Vec::new();
    for (n, dirty) in job.changes.runs(first, end, usize::MAX) {
        let len = n.saturating_mul(es).min(blen - pos);
        if dirty {
            out.push((pos, len));
        }
        pos += len;
    }
    out
}

/// Read ranges cut at PIECE (aligned to chunk boundaries), and small
/// ranges batched up to PIECE bytes, so a scattered incremental costs one
/// thread hop per batch, not per 4 KiB run.
fn pieces(reads: &[(u64, u64)]) -> Vec<Vec<(u64, u64)>> {
    let mut pieces: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut batch: Vec<(u64, u64)> = Vec::new();
    let mut batch_len = 0;
    for &(start, len) in reads {
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
    pieces
}

/// Parent index blocks fetched a few blocks ahead, so a store's round trip
/// is paid once per window, not once per block.
struct IndexAhead<'a> {
    repo: Arc<Repo>,
    wanted: Box<dyn Iterator<Item = (u64, String)> + Send + 'a>,
    fetching: VecDeque<Prefetch>,
}

impl<'a> IndexAhead<'a> {
    fn new(job: &'a Job, done: &'a BTreeMap<u64, Option<String>>) -> Self {
        let wanted = Candidates::new(job, done)
            .map_while(Result::ok)
            .filter(move |b| !done.contains_key(b) && touched(job, *b))
            .filter_map(move |b| parent_id_of(job, b).map(|id| (b, id)))
            .filter(move |(_, id)| !redo(job, Some(id)));
        Self {
            repo: job.repo.clone(),
            wanted: Box::new(wanted),
            fetching: VecDeque::new(),
        }
    }

    fn fill(&mut self) {
        while self.fetching.len() < PREFETCH {
            let Some((b, id)) = self.wanted.next() else {
                break;
            };
            let repo = self.repo.clone();
            self.fetching
                .push_back((b, tokio::spawn(async move { repo.get_index(b, &id).await })));
        }
    }

    /// The parent's entries of block `b`, whose parent index block is
    /// `parent_id` (none when it has none). Fetched ahead when the
    /// prefetch saw `b` coming; fetched now when it did not: data written
    /// into a hole after the freeze makes a block a candidate only once
    /// it is there, so the walk may meet a block the prefetch passed over.
    async fn next(&mut self, b: u64, parent_id: Option<&str>) -> Result<Vec<Entry>, CloudError> {
        self.fill();
        let Some(id) = parent_id else {
            return Ok(Vec::new());
        };
        // Blocks the walk no longer visits are never ahead of it (the
        // candidates only grow); drop any that are.
        while self.fetching.front().is_some_and(|(pb, _)| *pb < b) {
            if let Some((_, handle)) = self.fetching.pop_front() {
                handle.abort();
            }
        }
        let entries = if self.fetching.front().is_some_and(|(pb, _)| *pb == b) {
            let (_, handle) = self
                .fetching
                .pop_front()
                .ok_or_else(|| CloudError::Defect {
                    what: format!("index prefetch lost block {b}"),
                })?;
            handle.await.map_err(CloudError::from)??
        } else {
            self.repo.get_index(b, id).await?
        };
        self.fill();
        Ok(entries)
    }
}

/// Packs, uploads and checkpoints of one backup.
struct Writer<'a> {
    job: &'a Job,
    /// The manifest's block list so far.
    blocks: Vec<(u64, String)>,
    /// Blocks finished since the last checkpoint.
    pending: Vec<(u64, Option<String>)>,
    pack: PackBuilder,
    uploads: JoinSet<Result<(), CloudError>>,
    /// Chunks this task uploaded before a crash, after its last
    /// checkpoint: referenced again (and counted as new, once), never
    /// uploaded twice.
    resumed: HashMap<[u8; 32], ChunkLoc>,
    dedup: Dedup,
    /// Read buffers, recycled.
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Blocks read since the last checkpoint (untouched ones cost nothing).
    worked: usize,
    last_checkpoint: Instant,
}

impl<'a> Writer<'a> {
    /// The writer of `job`, with what an earlier run of it left.
    async fn open(job: &'a Job) -> Result<Self, CloudError> {
        let mut resumed = HashMap::new();
        for (pack, trailer) in job.db.task_packs(&job.task)? {
            let Ok(pack) = <[u8; 16]>::try_from(pack.as_slice()) else {
                continue;
            };
            // Recorded before its upload: use it only if it landed whole.
            if !job.repo.has_pack(&pack).await? {
                continue;
            }
            if let Ok(chunks) = format::decode_trailer(&trailer, pack, u64::MAX) {
                for c in chunks {
                    resumed.insert(c.id, c);
                }
            }
        }
        Ok(Self {
            job,
            blocks: Vec::new(),
            pending: Vec::new(),
            pack: PackBuilder::for_config(&job.repo.config)?,
            uploads: JoinSet::new(),
            resumed,
            dedup: Arc::new(Mutex::new(HashMap::new())),
            pool: Arc::new(Mutex::new(Vec::new())),
            worked: 0,
            last_checkpoint: Instant::now(),
        })
    }

    /// Block `b` has no change: it keeps the parent's index block.
    fn unchanged(&mut self, b: u64, parent_id: Option<String>) {
        if let Some(id) = &parent_id {
            self.blocks.push((b, id.clone()));
        }
        self.pending.push((b, parent_id));
    }

    /// Reads `reads` of the block at `bstart` (pieces read and analysed a
    /// few ahead, on the blocking pool), packs the new chunks and returns
    /// the block's new entries.
    async fn pack_block(
        &mut self,
        bstart: u64,
        reads: &[(u64, u64)],
        parent: &Arc<Vec<Entry>>,
    ) -> Result<Vec<Entry>, CloudError> {
        let job = self.job;
        let cs = job.repo.config.chunk_size;
        let (dedup, pool) = (self.dedup.clone(), self.pool.clone());
        let analyzed = futures::stream::iter(pieces(reads))
            .map(|piece| {
                let repo = job.repo.clone();
                let parent = parent.clone();
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
                            let (buf, start) = aligned(buf, n);
                            let buf = volume
                                .read_frozen_direct(&*snap, buf, start, bstart + pos)
                                .await
                                .map_err(|e| CloudError::volume_io("reading", volume.name(), e))?;
                            Ok::<_, CloudError>((buf, start))
                        }
                    });
                    let data = futures::future::try_join_all(reads).await?;
                    Progress::add(&progress.read, piece.iter().map(|r| r.1).sum());
                    crate::host::spawn_background(move || {
                        let out = piece
                            .iter()
                            .zip(&data)
                            .flat_map(|(&(pos, _), (d, start))| {
                                analyze(&repo, &d[*start..], pos, cs, &parent, &dedup)
                            })
                            .collect::<Vec<_>>();
                        let mut pool = pool
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        for (d, _) in data {
                            if pool.len() < POOL {
                                pool.push(d);
                            }
                        }
                        out
                    })
                    .await
                    .map_err(CloudError::from)
                }
            })
            .buffered(AHEAD);
        futures::pin_mut!(analyzed);
        let mut entries = Vec::new();
        while let Some(piece) = analyzed.next().await {
            if job.cancel.is_cancelled() {
                return Err(CloudError::Cancelled);
            }
            for a in piece? {
                if let Some(e) = self.place(a).await? {
                    entries.push(e);
                }
            }
        }
        Ok(entries)
    }

    /// Where an analysed piece goes: nowhere (a hole), a chunk already
    /// stored, or a new chunk in the current pack (uploaded when full).
    async fn place(&mut self, a: Analyzed) -> Result<Option<Entry>, CloudError> {
        let progress = &self.job.progress;
        Progress::add(&progress.done, u64::from(a.len));
        let (loc, off) = match a.out {
            Out::Hole => return Ok(None),
            Out::Ref(loc, off) => {
                Progress::add(&progress.reused, u64::from(a.len));
                (loc, off)
            }
            Out::New(id, sealed) => {
                let known = lock(&self.dedup).get(&id).copied();
                if let Some(loc) = self.resumed.remove(&id).filter(|_| known.is_none()) {
                    Progress::add(&progress.new, u64::from(a.len));
                    lock(&self.dedup).insert(id, loc);
                    (loc, 0)
                } else if let Some(loc) = known {
                    Progress::add(&progress.reused, u64::from(a.len));
                    (loc, 0)
                } else {
                    let loc = self.pack.push(id, &sealed, a.len)?;
                    Progress::add(&progress.new, u64::from(a.len));
                    {
                        let mut d = lock(&self.dedup);
                        if d.len() < DEDUP_CAP {
                            d.insert(id, loc);
                        }
                    }
                    if self.pack.len() as u64 >= self.job.repo.config.pack_size {
                        self.upload_pack().await?;
                    }
                    (loc, 0)
                }
            }
        };
        Ok(Some(Entry {
            start: a.start,
            len: a.len,
            chunk_off: off,
            chunk: loc,
        }))
    }

    /// Block `b` is done with `entries`: it keeps the parent's index block
    /// when nothing changed in it, else a new one is uploaded. Checkpoints
    /// every few blocks.
    async fn finish_block(
        &mut self,
        b: u64,
        entries: Vec<Entry>,
        parent_id: Option<String>,
        parent: &[Entry],
    ) -> Result<(), CloudError> {
        let id = if entries.is_empty() {
            None
        } else if parent_id.is_some() && parent == entries.as_slice() {
            parent_id
        } else {
            let repo = &self.job.repo;
            let (id, sealed) = repo.seal_index(b, &entries)?;
            while self.uploads.len() >= UPLOADS * 4 {
                if let Some(r) = self.uploads.join_next().await {
                    r.map_err(CloudError::from)??;
                }
            }
            let (repo, progress, key) = (repo.clone(), self.job.progress.clone(), id.clone());
            self.uploads.spawn(async move {
                let n = repo.put_index(&key, sealed).await?;
                Progress::add(&progress.transferred, n);
                Ok(())
            });
            Some(id)
        };
        if let Some(id) = &id {
            self.blocks.push((b, id.clone()));
        }
        self.pending.push((b, id));
        self.worked += 1;
        if self.worked >= CHECKPOINT_BLOCKS || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Closes the current pack, waits for every upload, and records the
    /// blocks finished since the last checkpoint.
    async fn checkpoint(&mut self) -> Result<(), CloudError> {
        self.worked = 0;
        self.upload_pack().await?;
        drain(&mut self.uploads).await?;
        if !self.pending.is_empty() {
            let job = self.job;
            job.checkpoint.save(&self.pending)?;
            self.pending.clear();
        }
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    async fn upload_pack(&mut self) -> Result<(), CloudError> {
        if self.pack.is_empty() {
            return Ok(());
        }
        let next = PackBuilder::for_config(&self.job.repo.config)?;
        let full = std::mem::replace(&mut self.pack, next);
        upload(self.job, full, &mut self.uploads).await
    }

    /// The last checkpoint; returns the manifest's block list.
    async fn finish(mut self) -> Result<Vec<(u64, String)>, CloudError> {
        self.checkpoint().await?;
        Ok(self.blocks)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            r.map_err(CloudError::from)??;
        }
    }
    let id = pack.id;
    let repo = job.repo.clone();
    let db = job.db.clone();
    let task = job.task.clone();
    let progress = job.progress.clone();
    let (bytes, chunks) = {
        let repo = repo.clone();
        crate::host::spawn_background(move || pack.finish(&repo.keys))
            .await
            .map_err(CloudError::from)??
    };
    // Recorded before the upload: after a crash the pack is checked for,
    // so a pack that landed just before the crash is never sent again. The
    // record (a SQLite commit, an fsync of its log) is made by the upload
    // task on the blocking pool, so the packer goes on filling the next
    // pack meanwhile.
    let trailer = format::encode_trailer(&chunks).map_err(RepoError::from)?;
    uploads.spawn(async move {
        tokio::task::spawn_blocking(move || db.add_task_pack(&task, &id, &trailer))
            .await
            .map_err(CloudError::from)??;
        let n = repo.put_pack(&id, bytes).await?;
        Progress::add(&progress.transferred, n);
        Ok(())
    });
    Ok(())
}

async fn drain(uploads: &mut JoinSet<Result<(), CloudError>>) -> Result<(), CloudError> {
    while let Some(r) = uploads.join_next().await {
        r.map_err(CloudError::from)??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
