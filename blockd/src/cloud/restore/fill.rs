//! Full restore: a snapshot's index blocks, one at a time, into a new
//! volume.
//!
//! For each block the chunks it references are grouped by pack and fetched
//! with ranged GETs (adjacent records coalesced, several GETs in flight);
//! every chunk is opened, decompressed and checked against its id before a
//! byte of it is written. Holes are never written: the new volume is
//! sparse. The GETs of a block, once all written, are recorded in one
//! commit (task_blocks keys `block << 20 | (fetch + 1)`, tagged with the
//! kernel's boot id), and so are the GETs written when an attempt fails
//! or stops, so the next attempt goes on after them; each block, once
//! flushed, is recorded as durable (`block << 20`, untagged). After a
//! process crash only the GETs of the block in progress are fetched
//! again (the page cache kept the rest);
//! after a host crash, the GETs of blocks not yet flushed are fetched
//! again too. One commit per block, not per GET: each commit is an fsync
//! of the state database's log, and a GET that waited for its own held
//! one of the few fetch slots idle meanwhile.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::cloud::task::{Checkpoint, Progress};
use crate::cloud::CloudError;
use crate::repo::fetch::{self, Fetch, MAX_GET};
use crate::repo::format::{Entry, Manifest};
use crate::repo::Repo;
use crate::state::StateDb;
use crate::volume::Volume;

/// Ranged GETs in flight, each at most 8 MiB plus its chunks decompressed:
/// three keep a remote store's latency covered; six cost ~70 MiB more
/// at peak and bought no speed (kernel-notes/nbd.md, "A bounded heap").
const FETCHES: usize = 3;

/// What a restore needs.
pub struct Job {
    /// Task id.
    pub task: String,
    /// Source.
    pub repo: Arc<Repo>,
    /// The snapshot.
    pub manifest: Manifest,
    /// Target volume (new).
    pub volume: Arc<Volume>,
    /// State database.
    pub db: Arc<StateDb>,
    /// Counters.
    pub progress: Arc<Progress>,
    /// Stop or shutdown.
    pub cancel: CancellationToken,
    /// Records finished GETs and blocks with the task record.
    pub checkpoint: Checkpoint,
}

/// Coalesces the chunks of a block into GETs.
pub(crate) fn plan(entries: &[Entry]) -> Vec<Fetch> {
    fetch::plan(entries.iter().map(|e| e.chunk), MAX_GET)
}

/// Fetches and checks every chunk `entries` reference (coalesced ranged
/// GETs, several in flight); returns chunks and plain bytes checked.
///
/// # Errors
/// The first missing or corrupt object.
pub async fn verify(repo: &Arc<Repo>, entries: &[Entry]) -> Result<(u64, u64), CloudError> {
    let results = futures::stream::iter(plan(entries))
        .map(|f| {
            let repo = repo.clone();
            async move {
                let bytes = f.get(&repo).await?;
                tokio::task::spawn_blocking(move || {
                    let mut n = 0u64;
                    for c in &f.chunks {
                        n += repo.open_chunk(c, f.record(&repo, c, &bytes)?)?.len() as u64;
                    }
                    Ok::<_, CloudError>((f.chunks.len() as u64, n))
                })
                .await
                .map_err(CloudError::from)?
            }
        })
        .buffer_unordered(FETCHES);
    futures::pin_mut!(results);
    let (mut chunks, mut bytes) = (0, 0);
    while let Some(r) = results.next().await {
        let (c, n) = r?;
        chunks += c;
        bytes += n;
    }
    Ok((chunks, bytes))
}

/// Runs a restore.
///
/// # Errors
/// Missing or corrupt objects (named), provider errors, volume I/O,
/// cancellation.
pub async fn run(job: &Job) -> Result<(), CloudError> {
    let _buffers = crate::repo::mapped::ReleaseOnDrop;
    let repo = &job.repo;
    let span = repo.config.index_span;
    // Finished GETs and blocks. A GET recorded in an earlier boot, whose
    // block was not flushed since, may have been lost with the page cache:
    // it is fetched again.
    let boot = boot_tag();
    let done: Arc<std::collections::HashSet<u64>> = Arc::new(
        job.db
            .task_blocks(&job.task)?
            .into_iter()
            .filter(|(_, tag)| tag.as_deref().is_none_or(|t| t == boot))
            .map(|(b, _)| b)
            .collect(),
    );
    let snap_id = format!("{}/{}", job.manifest.volume, job.manifest.name);
    let named = |e: CloudError| match e {
        CloudError::Repo(source) => CloudError::Damaged {
            snapshot: snap_id.clone(),
            source,
        },
        e => e,
    };
    let write_lock = Arc::new(std::sync::Mutex::new(()));
    // One stream of GETs across the blocks: the next block's index is read
    // and its GETs start while the last GETs of the block before are still
    // under way, so the pipeline never drains at a block's end. Each GET
    // carries its block's count of GETs still to finish; the one that
    // brings it to zero finishes the block. A block whose GETs were all
    // done before (but not flushed) yields one empty item.
    let todo: Vec<(u64, String)> = job
        .manifest
        .blocks
        .iter()
        .filter(|(b, _)| !done.contains(&block_key(*b)))
        .map(|(b, id)| (*b, id.clone()))
        .collect();
    let blocks = futures::stream::iter(todo)
        .then(move |(b, id)| index_items(repo.clone(), done.clone(), b, id))
        .flat_map(futures::stream::iter);
    let results = blocks
        .map(|item| {
            let repo = repo.clone();
            let volume = job.volume.clone();
            let progress = job.progress.clone();
            let write_lock = write_lock.clone();
            async move {
                let item = item?;
                let b = item.block;
                let Some((i, f)) = item.get else {
                    return Ok((None, Some(block_key(b))));
                };
                let base = b * span;
                let bytes = f.get(&repo).await?;
                Progress::add(&progress.transferred, bytes.len() as u64);
                // Open and check every chunk before writing any of it,
                // then write runs of adjacent entries in one go, on the
                // blocking pool (no thread hop per chunk).
                let entries = item.entries;
                let written = tokio::task::spawn_blocking(move || {
                    write_fetch(&repo, &volume, &entries, &f, &bytes, base, &write_lock)
                })
                .await
                .map_err(CloudError::from)??;
                Progress::add(&progress.done, written);
                let last = item.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1;
                Ok::<_, CloudError>((Some(get_key(b, i)), last.then_some(block_key(b))))
            }
        })
        .buffer_unordered(FETCHES);
    futures::pin_mut!(results);
    let mut finished: Vec<u64> = Vec::new();
    let mut flushing: Option<Flushing> = None;
    let mut written = Vec::new();
    while let Some(r) = results.next().await {
        let (get, block) = match r.map_err(named) {
            Ok(done) => done,
            Err(e) => {
                // The GETs written so far are recorded: the next attempt
                // (a flaky provider, an outage) or a resume goes on after
                // them, and the attempt counts as progress.
                save_written(job, &mut written).await?;
                return Err(e);
            }
        };
        if let Some(key) = get {
            written.push((key, Some(boot.clone())));
        }
        if job.cancel.is_cancelled() {
            save_written(job, &mut written).await?;
            return Err(CloudError::Cancelled);
        }
        let Some(block) = block else {
            continue;
        };
        // Recorded without an fsync of the volume: after a process crash
        // the page cache still holds the data. The boot id tells a resume
        // whether that is still true (see above). The record (a SQLite
        // commit) is made on the blocking pool, never on a runtime thread.
        save_written(job, &mut written).await?;
        // A block is durable once flushed: its record then survives host
        // crashes. The flush runs in the background while the next blocks
        // are fetched; one at a time, covering every block finished before
        // it started.
        finished.push(block);
        if flushing
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished)
        {
            if let Some(h) = flushing.take() {
                let covered = h.await.map_err(CloudError::from)??;
                job.checkpoint.save(&covered)?;
            }
            flushing = Some(start_flush(
                &job.volume,
                std::mem::take(&mut finished),
                span,
            ));
        }
    }
    if let Some(h) = flushing.take() {
        let covered = h.await.map_err(CloudError::from)??;
        job.checkpoint.save(&covered)?;
    }
    if !finished.is_empty() {
        let covered = start_flush(&job.volume, finished, span)
            .await
            .map_err(CloudError::from)??;
        job.checkpoint.save(&covered)?;
    }
    Ok(())
}

/// Records the GETs in `written` (none left there afterwards), on the
/// blocking pool: a SQLite commit.
async fn save_written(
    job: &Job,
    written: &mut Vec<(u64, Option<String>)>,
) -> Result<(), CloudError> {
    if written.is_empty() {
        return Ok(());
    }
    let checkpoint = job.checkpoint.clone();
    let saved = std::mem::take(written);
    tokio::task::spawn_blocking(move || checkpoint.save(&saved))
        .await
        .map_err(CloudError::from)?
}

/// Reads block `b`'s index (object `id`) and plans its GETs: an item per
/// GET not `done`, or one empty item when none is left.
async fn index_items(
    repo: Arc<Repo>,
    done: Arc<std::collections::HashSet<u64>>,
    b: u64,
    id: String,
) -> Vec<Result<Item, CloudError>> {
    let entries = match repo.get_index(b, &id).await {
        Ok(e) => Arc::new(e),
        Err(e) => return vec![Err(CloudError::from(e))],
    };
    let todo: Vec<(usize, Fetch)> = plan(&entries)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !done.contains(&get_key(b, *i)))
        .collect();
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(todo.len()));
    if todo.is_empty() {
        return vec![Ok(Item {
            block: b,
            get: None,
            entries,
            left,
        })];
    }
    todo.into_iter()
        .map(|(i, f)| {
            Ok(Item {
                block: b,
                get: Some((i, f)),
                entries: entries.clone(),
                left: left.clone(),
            })
        })
        .collect()
}

/// The checkpoint key of index block `b`, finished and flushed.
fn block_key(b: u64) -> u64 {
    b << 20
}

/// The checkpoint key of GET `i` of index block `b`, written.
fn get_key(b: u64, i: usize) -> u64 {
    block_key(b) | (i as u64 + 1)
}

/// One GET of a restore, or a block with none left to do.
struct Item {
    block: u64,
    /// The GET's number in its block's plan, and the GET.
    get: Option<(usize, Fetch)>,
    entries: Arc<Vec<Entry>>,
    /// GETs of the block not yet finished.
    left: Arc<std::sync::atomic::AtomicUsize>,
}

/// A background flush; yields the block keys it made durable.
type Flushing = tokio::task::JoinHandle<Result<Vec<(u64, Option<String>)>, CloudError>>;

/// Flushes the volume in the background, then drops the flushed blocks'
/// pages (keys `block << 20` of `span` bytes each) from the page cache:
/// the new volume is not served before the restore ends, and nothing
/// reads them back.
fn start_flush(volume: &Arc<Volume>, blocks: Vec<u64>, span: u64) -> Flushing {
    let volume = volume.clone();
    tokio::spawn(async move {
        volume
            .flush()
            .await
            .map_err(|e| CloudError::volume_io("flushing", volume.name(), e))?;
        for k in &blocks {
            volume.drop_cached((k >> 20).saturating_mul(span), span);
        }
        Ok(blocks.into_iter().map(|k| (k, None)).collect())
    })
}

/// Opens every chunk of one GET (each checked before anything is written)
/// and writes the entries that use them, adjacent ones as one write.
/// Returns the bytes written.
fn write_fetch(
    repo: &Repo,
    volume: &Volume,
    entries: &[Entry],
    f: &Fetch,
    bytes: &[u8],
    base: u64,
    write_lock: &std::sync::Mutex<()>,
) -> Result<u64, CloudError> {
    let mut plain = std::collections::HashMap::with_capacity(f.chunks.len());
    for c in &f.chunks {
        plain.insert(c.offset, repo.open_chunk_in(c, f.record(repo, c, bytes)?)?);
    }
    let io = |e| CloudError::volume_io("writing", volume.name(), e);
    // Buffered writes to one file serialise on its inode lock anyway: one
    // writer at a time sleeps instead of spinning on it.
    let _one = write_lock
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut run: Vec<&[u8]> = Vec::new();
    let mut run_at = 0u64;
    let mut run_end = 0u64;
    let mut written = 0u64;
    for e in entries.iter().filter(|e| e.chunk.pack == f.pack) {
        let Some(p) = plain.get(&e.chunk.offset) else {
            continue;
        };
        let at = base + u64::from(e.start);
        if !run.is_empty() && (run_end != at || run.len() >= 512) {
            volume.write_parts_cached(run_at, &run).map_err(io)?;
            run.clear();
        }
        if run.is_empty() {
            run_at = at;
        }
        let s = e.chunk_off as usize;
        run.push(&p[s..s + e.len as usize]);
        run_end = at + u64::from(e.len);
        written += u64::from(e.len);
    }
    if !run.is_empty() {
        volume.write_parts_cached(run_at, &run).map_err(io)?;
    }
    Ok(written)
}

/// This boot of the kernel: restore records written without an fsync are
/// trusted only within the boot that wrote them.
fn boot_tag() -> String {
    format!("boot:{}", crate::durable::boot_id())
}
