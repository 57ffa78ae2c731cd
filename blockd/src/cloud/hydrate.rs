//! Lazy restore: the new volume is served at once, its bytes come from the
//! snapshot as they are touched (see [`crate::volume::lazy`]) and a
//! background hydrator fetches the rest.
//!
//! - [`RepoSource`] answers the volume's fetches: the units' index block
//!   (kept in a small cache: blocks are content-addressed and fetched once),
//!   the entries that overlap the units, one ranged GET per run of
//!   adjacent records of a pack, every chunk checked against its id before
//!   its bytes are handed over. A 4 KiB read of a unit a full backup wrote
//!   is one GET of one ≤ 64 KiB record.
//! - `restore --lazy` reads the snapshot's index blocks (as many as fit in
//!   32 MiB: a full backup of 28 GiB) while it takes its lease, before it
//!   returns (for at most [`PRELOAD_WAIT`]; the hydrator reads the rest
//!   before its first batch): a client's first read then waits for the
//!   GET of its data alone. (Garage, 1 GiB snapshot, page cache dropped:
//!   the first read after a daemon start took 14-20 ms, its index block
//!   13 ms of it; 7-10 ms with the blocks read ahead. The command takes
//!   30-60 ms instead of 21-30.)
//! - The hydrator walks the volume in order, batches of missing units
//!   (1 MiB growing to 8 MiB, see [`Stride`]), a few in flight, opened and
//!   written at background priority ([`crate::host::spawn_background`]);
//!   units already present (read by a client, overwritten whole) are
//!   skipped, and the units outside the snapshot's index blocks are
//!   marked present before the first pass (they are holes), so the walk
//!   costs what the snapshot holds, not its size. A batch that fails is
//!   tried again on the next pass, with a growing pause; the task shows
//!   why meanwhile.
//! - Client reads go first. A batch waits while a client request is
//!   fetching, and a client request that starts fetching stops the
//!   batches' GETs in flight (they go again, to the end, once the client is
//!   served): an object store serves requests side by side, so a client's
//!   64 KiB GET behind 3 batches of 8 MiB waited for most of them (Garage,
//!   first 4 KiB read of a 1 GiB snapshot: 40-60 ms before, 6-17 ms after;
//!   benches/lazy_restore.sh). Index blocks load one per block, not one at
//!   a time, so the client's block does not wait for the hydrator's
//!   (16 GiB snapshot: 50-93 ms before, 5 ms after).
//! - Every two seconds the volume is flushed, which persists its present
//!   map: a restart fetches at most the last two seconds again.
//! - When every unit is present the volume is flushed, the task is
//!   recorded Done and only then is the present map removed: a crash in
//!   between cannot make a finished volume look empty.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::restore::fill::plan;
use super::task::Progress;
use super::{Cloud, CloudError};
use crate::repo::fetch::{Fetch, IndexCache};
use crate::repo::format::{Entry, Manifest};
use crate::repo::Repo;
use crate::volume::lazy::{Lazy, Source};
use crate::volume::Volume;

/// GETs in flight for one fetch.
const GETS: usize = 6;
/// Hydrator batches in flight.
const BATCHES: usize = 3;
/// Hydrator batch from a local directory. Small, so that a client's
/// fetch never queues behind more than a few MiB of background reads on
/// the disk (benches/lazy_restore.sh: first read ~6 ms at 1 MiB, ~25 ms at
/// 8 MiB, the same hydration time).
pub const BATCH_LOCAL: u64 = 1 << 20;
/// Hydrator batch from an object store, where each GET costs a round trip
/// and smaller batches cost throughput (Garage: 1 GiB hydrated in 4.3 s at
/// 8 MiB, 10 s at 1 MiB).
pub const BATCH_REMOTE: u64 = 8 << 20;
/// Index blocks kept in memory, by count and by the bytes of their
/// entries. A block covers 64 MiB of volume; a full backup's, one entry
/// per 64 KiB chunk, takes 72 KiB, so 32 MiB hold the index of 28 GiB of
/// such data, and 27 blocks of the most fragmented kind (one entry per
/// 4 KiB extent).
const INDEX_CACHE: usize = 1024;
const INDEX_CACHE_BYTES: usize = 32 << 20;
/// Longest `restore --lazy` waits for index blocks before it returns.
pub const PRELOAD_WAIT: Duration = Duration::from_millis(100);
/// Index GETs in flight while a lazy restore preloads.
const PRELOAD_GETS: usize = 8;
/// Longest a hydrator batch waits for client fetches to end.
const YIELD_MAX: Duration = Duration::from_millis(100);
/// How often hydration progress is made durable.
const PERSIST_EVERY: Duration = Duration::from_secs(2);

/// An opened repository and the snapshot being restored, with the index
/// blocks read so far.
pub struct Ready {
    repo: Arc<Repo>,
    manifest: Manifest,
    index: IndexCache,
}

impl Ready {
    /// Wraps an opened snapshot.
    pub fn new(repo: Arc<Repo>, manifest: Manifest) -> Self {
        Self {
            repo,
            manifest,
            index: IndexCache::with_bytes(INDEX_CACHE, INDEX_CACHE_BYTES),
        }
    }

    /// The snapshot.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Reads the snapshot's index blocks in order, [`PRELOAD_GETS`] at a
    /// time, until the cache is full: a restore does this before it
    /// returns (for at most [`PRELOAD_WAIT`]) and its hydrator before its
    /// first batch, so that a client's read costs one GET, of its data.
    /// Blocks already held are not read again. A block that cannot be
    /// read is left to the read that needs it (which names the failure).
    pub async fn preload(&self) {
        let mut loads = futures::stream::FuturesUnordered::new();
        let mut blocks = self.manifest.blocks.iter();
        let mut failed = false;
        loop {
            while !failed && loads.len() < PRELOAD_GETS && self.index.has_room() {
                let Some((b, id)) = blocks.next() else { break };
                loads.push(self.index.get(&self.repo, *b, id));
            }
            match loads.next().await {
                None => break,
                // The store may be down: no more are started.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "index blocks not preloaded");
                    failed = true;
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

/// Fetches a snapshot's units from its repository.
pub struct RepoSource {
    cloud: Weak<Cloud>,
    /// The restore task reading it.
    task: String,
    location: String,
    src_volume: String,
    src_name: String,
    ready: tokio::sync::OnceCell<Ready>,
    /// Bytes fetched from the store.
    pub progress: Arc<Progress>,
}

impl RepoSource {
    /// A source for restore `task` of snapshot `src_volume/src_name` in
    /// `location`; `ready`
    /// when the caller has already opened it (otherwise it is opened on
    /// first use, and again after a failure).
    pub fn new(
        cloud: Weak<Cloud>,
        task: String,
        location: String,
        src_volume: String,
        src_name: String,
        ready: Option<Ready>,
        progress: Arc<Progress>,
    ) -> Self {
        Self {
            cloud,
            task,
            location,
            src_volume,
            src_name,
            ready: tokio::sync::OnceCell::new_with(ready),
            progress,
        }
    }

    fn snap_id(&self) -> String {
        format!("{}/{}", self.src_volume, self.src_name)
    }

    /// A failed fetch as the volume's requests see it: `InvalidData` when
    /// what the bucket holds is damaged (trying again does not mend it),
    /// `NotFound` when an object is missing, `Other` for the rest.
    fn fetch_error(&self, e: &CloudError) -> io::Error {
        let kind = match e {
            CloudError::Repo(crate::repo::RepoError::Corrupt { .. }) => io::ErrorKind::InvalidData,
            CloudError::Repo(crate::repo::RepoError::Missing { .. }) => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, format!("snapshot {}: {e}", self.snap_id()))
    }

    async fn ready(&self) -> Result<&Ready, CloudError> {
        self.ready
            .get_or_try_init(|| async {
                let cloud = self.cloud.upgrade().ok_or(CloudError::Cancelled)?;
                let repo = cloud.locations.repo(&self.location).await?;
                let manifest = cloud
                    .restore_manifest(&repo, &self.task, &self.src_volume, &self.src_name)
                    .await?;
                Ok(Ready::new(repo, manifest))
            })
            .await
    }

    /// The entries overlapping units `first..first + count`, per index
    /// block: (block start in the volume, entries).
    async fn overlapping(
        &self,
        r: &Ready,
        first: u32,
        count: u32,
    ) -> Result<Vec<(u64, Vec<Entry>)>, CloudError> {
        let unit = r.repo.config.chunk_size;
        let lo = u64::from(first) * unit;
        let hi = (u64::from(first) + u64::from(count)).saturating_mul(unit);
        Ok(r.index.overlapping(&r.repo, &r.manifest, lo, hi).await?)
    }

    /// Bytes of data (not holes) in units `first..first + count`.
    ///
    /// # Errors
    /// The repository or an index block cannot be read.
    pub async fn data_bytes(&self, first: u32, count: u32) -> Result<u64, CloudError> {
        let r = self.ready().await?;
        Ok(self
            .overlapping(r, first, count)
            .await?
            .iter()
            .flat_map(|(_, es)| es.iter().map(|e| u64::from(e.len)))
            .sum())
    }

    /// The runs of units `first..first + count`; `background`: opened at
    /// background priority.
    async fn fetch_units(
        &self,
        first: u32,
        count: u32,
        background: bool,
    ) -> Result<Vec<(u64, Bytes)>, CloudError> {
        let t0 = std::time::Instant::now();
        let r = self.ready().await?;
        let t_ready = t0.elapsed();
        let blocks = self.overlapping(r, first, count).await?;
        let t_index = t0.elapsed();
        let mut out = Vec::new();
        for (base, used) in blocks {
            let used = Arc::new(used);
            let results = futures::stream::iter(plan(&used))
                .map(|f| {
                    let repo = r.repo.clone();
                    let used = used.clone();
                    let progress = self.progress.clone();
                    async move {
                        let g0 = std::time::Instant::now();
                        let bytes = f.get(&repo).await?;
                        tracing::debug!(
                            start = f.start,
                            bytes = bytes.len(),
                            ms = g0.elapsed().as_secs_f64() * 1e3,
                            "lazy GET"
                        );
                        Progress::add(&progress.transferred, bytes.len() as u64);
                        crate::metrics::STATS.hydrated(bytes.len() as u64);
                        let open = move || runs(&repo, &f, &bytes, &used, base);
                        if background {
                            crate::host::spawn_background(open).await
                        } else {
                            tokio::task::spawn_blocking(open).await
                        }
                        .map_err(CloudError::from)?
                    }
                })
                .buffer_unordered(GETS);
            futures::pin_mut!(results);
            while let Some(r) = results.next().await {
                out.extend(r?);
            }
        }
        tracing::debug!(
            first,
            count,
            ready_ms = t_ready.as_secs_f64() * 1e3,
            index_ms = t_index.as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            "lazy fetch"
        );
        Ok(out)
    }
}

/// Opens every record of GET `f` (each checked against its id) and cuts
/// out what the entries of the block at `base` take from it, as
/// `(volume offset, bytes)` runs sharing the chunks' buffers.
fn runs(
    repo: &Repo,
    f: &Fetch,
    bytes: &[u8],
    entries: &[Entry],
    base: u64,
) -> Result<Vec<(u64, Bytes)>, CloudError> {
    let mut runs = Vec::new();
    for c in &f.chunks {
        let plain = Bytes::from(repo.open_chunk(c, f.record(repo, c, bytes)?)?);
        let uses = entries
            .iter()
            .filter(|e| e.chunk.pack == f.pack && e.chunk.offset == c.offset);
        for e in uses {
            let from = e.chunk_off as usize;
            let to = from + e.len as usize;
            if to > plain.len() {
                return Err(repo
                    .corrupt_pack(
                        &f.pack,
                        format_args!(
                            "index entry at {} reaches past its chunk ({to} > {} bytes)",
                            base + u64::from(e.start),
                            plain.len()
                        ),
                    )
                    .into());
            }
            runs.push((base + u64::from(e.start), plain.slice(from..to)));
        }
    }
    Ok(runs)
}

#[async_trait::async_trait]
impl Source for RepoSource {
    async fn fetch(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>> {
        self.fetch_units(first, count, false)
            .await
            .map_err(|e| self.fetch_error(&e))
    }

    async fn fetch_background(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>> {
        self.fetch_units(first, count, true)
            .await
            .map_err(|e| self.fetch_error(&e))
    }
}

/// Said of a hydrator's fetch that met damaged data: trying again is all
/// it can do (a pack put back mends it), and what a user can do.
const DAMAGED: &str = "; damaged data in the bucket does not mend by itself, and reads of what it holds fail meanwhile: `blockctl repo check --read-data` names the snapshots it reaches; copy what you need from the volume and end this restore with `blockctl cloudsnap stop --force` (which deletes the volume), then restore another snapshot";

/// What a hydrator needs.
pub struct Job {
    /// The volume being filled.
    pub volume: Arc<Volume>,
    /// Its present map.
    pub lazy: Arc<Lazy>,
    /// Where its bytes come from.
    pub source: Arc<RepoSource>,
    /// Counters (`done` = bytes present).
    pub progress: Arc<Progress>,
    /// Stop or shutdown.
    pub cancel: CancellationToken,
    /// Shows why a pass failed (None once a pass succeeds).
    pub report: Box<dyn Fn(Option<String>) + Send + Sync>,
    /// Bytes per second the hydrator may fetch (reads are never limited).
    pub limit: Option<u64>,
    /// Largest batch ([`BATCH_LOCAL`] or [`BATCH_REMOTE`]).
    pub batch_bytes: u64,
    /// The restore's lease in the bucket: released once the snapshot is
    /// found gone, since it then protects nothing this restore can read.
    pub lease: Arc<std::sync::Mutex<Option<crate::repo::gc::Lease>>>,
}

/// Paces the hydrator's fetches to a byte rate.
struct Pace {
    rate: u64,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Pace {
    /// Waits until `n` more bytes fit the rate.
    async fn charge(&self, n: u64) {
        let at = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(n as f64 / self.rate as f64);
            start
        };
        tokio::time::sleep_until(at).await;
    }
}

/// The hydrator's batch, in units, and how many fetch at once. It starts
/// at the smallest, one at a time, and doubles (one more at a time, up to
/// [`BATCHES`]) with each batch that ends without a client fetch starting
/// meanwhile, up to the largest; a batch that gives way to a client
/// brings it back to the smallest, one at a time. The store then holds
/// little background work whenever clients are reading (a restored volume is mounted, its journal
/// replayed, right after the restore returns), and hydration reaches full
/// speed within a few batches when they are not. Garage, 1 GiB snapshot,
/// 40 random 4 KiB reads 20 ms apart right after `restore --lazy`, the
/// hydrator at full speed: p90 7.5-10 ms and max 10-15 ms, against p90
/// 14-27 ms and max 18-38 ms with batches always of 8 MiB (the medians
/// 5-7 ms either way); hydration with no reader took as long.
struct Stride {
    /// Doublings since the last back-off.
    level: AtomicU32,
    min: u32,
    max: u32,
    /// Batches fetching now.
    active: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

impl Stride {
    /// From `min` units, up to `max`.
    fn new(min: u32, max: u32) -> Self {
        let min = min.clamp(1, max.max(1));
        Self {
            level: AtomicU32::new(0),
            min,
            max: max.max(min),
            active: std::sync::atomic::AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// The batch now, in units.
    fn get(&self) -> u32 {
        let level = self.level.load(Ordering::Relaxed).min(31);
        self.min.saturating_mul(1 << level).min(self.max)
    }

    /// Batches that may fetch at once now: one after a back-off, one
    /// more per doubling, up to [`BATCHES`].
    fn allowed(&self) -> usize {
        (self.level.load(Ordering::Relaxed) as usize + 1).min(BATCHES)
    }

    fn grow(&self) {
        let _ = self
            .level
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some((l + 1).min(16))
            });
        self.freed.notify_waiters();
    }

    fn back_off(&self) {
        self.level.store(0, Ordering::Relaxed);
    }

    /// Waits for a batch's turn to fetch; the turn ends when the guard
    /// is dropped.
    async fn turn(&self) -> Turn<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let allowed = self.allowed();
            if self
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                    (a < allowed).then_some(a + 1)
                })
                .is_ok()
            {
                return Turn(self);
            }
            freed.await;
        }
    }
}

/// A batch's turn to fetch (see [`Stride::turn`]).
struct Turn<'a>(&'a Stride);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// The missing runs of each window of up to a stride of units, region by
/// region, each looked up only when the hydrator comes to it (units a
/// client fetched meanwhile are skipped).
struct Windows {
    lazy: Arc<Lazy>,
    regions: std::vec::IntoIter<(u32, u32)>,
    /// The next unit to look from, and the current region's end.
    at: Option<(u32, u32)>,
    stride: Arc<Stride>,
}

impl Iterator for Windows {
    type Item = Vec<(u32, u32)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (pos, end) = match self.at {
                Some(at) => at,
                None => self.regions.next()?,
            };
            let Some(from) = self.lazy.next_missing(pos, end) else {
                self.at = None;
                continue;
            };
            let to = from.saturating_add(self.stride.get()).min(end);
            self.at = (to < end).then_some((to, end));
            return Some(self.lazy.missing(from, to));
        }
    }
}

/// The snapshot of `job` is gone (`e`): its lease, if any, is released.
async fn release_gone(job: &Job, e: &CloudError) {
    let lease = job
        .lease
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(lease) = lease {
        tracing::warn!(volume = %job.volume.name(), error = %e, "the snapshot of a lazy restore is gone: its lease is released, and the units not restored yet never will be");
        lease.release().await;
    }
}

/// Fetches every missing unit; returns once all are present and durable.
///
/// # Errors
/// Cancellation, or a flush of the volume failing.
pub async fn run(job: &Job) -> Result<(), CloudError> {
    let _buffers = crate::repo::mapped::ReleaseOnDrop;
    let l = &job.lazy;
    // Paced batches are small, so the pace is smooth.
    let batch_bytes = job.limit.map_or(job.batch_bytes, |r| {
        (r / 4).clamp(l.unit(), job.batch_bytes)
    });
    let units = |bytes: u64| u32::try_from((bytes / l.unit()).max(1)).unwrap_or(u32::MAX);
    let stride = Arc::new(Stride::new(units(BATCH_LOCAL), units(batch_bytes)));
    let pace = job.limit.map(|rate| Pace {
        rate: rate.max(1),
        next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
    });
    let pace = &pace;
    let set_done = || {
        job.progress
            .done
            .store(l.present_bytes(), std::sync::atomic::Ordering::Relaxed);
    };
    // What is in place as the fill starts (what an earlier run fetched),
    // and the holes marked present below, cost this run nothing: its ETA
    // leaves them out. Counted before `done` grows by them, so no look in
    // between sees them as work.
    let free = |bytes: u64| {
        Progress::add(&job.progress.free, bytes);
    };
    // (A resumed task counts its saved `done` free already: the larger.)
    job.progress
        .free
        .fetch_max(l.present_bytes(), std::sync::atomic::Ordering::Relaxed);
    set_done();
    let persister = {
        let volume = job.volume.clone();
        let cancel = job.cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(PERSIST_EVERY) => {}
                }
                if let Err(e) = volume.flush().await {
                    tracing::warn!(volume = %volume.name(), error = %e, "persisting hydration progress failed");
                }
            }
        })
    };
    let _stop_persister = AbortOnDrop(persister);
    let mut pause = Duration::from_secs(1);
    // Passes in a row that failed nothing and left units missing.
    let mut unfinished = 0u32;
    loop {
        // What the snapshot holds nothing in is present from the start
        // (before the first pass, or on a later one if the store could not
        // be reached): passes visit only its index blocks' units.
        let mut gone = None;
        // The units a pass visits: the snapshot's index blocks, or the
        // whole volume while the manifest cannot be read.
        let mut regions = vec![(0, l.units())];
        match job.source.ready().await {
            Ok(r) => {
                tokio::select! {
                    () = job.cancel.cancelled() => return Err(CloudError::Cancelled),
                    () = r.preload() => {}
                }
                let span = r.repo.config.index_span;
                let before = l.present_bytes();
                regions = l.present_outside(
                    r.manifest
                        .blocks
                        .iter()
                        .map(|(b, _)| b.saturating_mul(span)..(b + 1).saturating_mul(span)),
                );
                free(l.present_bytes().saturating_sub(before));
            }
            // The manifest is gone and no copy was kept (a restore started
            // by an earlier build; deleted on another host while it was
            // interrupted): nothing more can be fetched. The volume stays
            // served for what it holds.
            Err(e @ CloudError::Repo(crate::repo::RepoError::Missing { .. })) => {
                release_gone(job, &e).await;
                gone = Some(e);
            }
            Err(_) => {}
        }
        // Batches of up to a stride of units from each missing unit of a
        // region on, jumping over what is present.
        let batches = futures::stream::iter(
            Windows {
                lazy: l.clone(),
                regions: regions.into_iter(),
                at: None,
                stride: stride.clone(),
            }
            .flatten(),
        );
        let results = batches
            .map(|(f, c)| {
                let lazy = l.clone();
                let stride = &stride;
                async move {
                    lazy.background_turn(YIELD_MAX).await;
                    // The snapshot's index (cached) says what the batch
                    // holds: a batch of holes is marked present without a
                    // fetch, and a paced one is paced by its data alone.
                    let data = job.source.data_bytes(f, c).await.ok();
                    if data == Some(0) {
                        let before = lazy.present_bytes();
                        lazy.holes(f, c);
                        free(lazy.present_bytes().saturating_sub(before));
                        return Ok::<u64, std::io::Error>(0);
                    }
                    if let Some(p) = pace {
                        p.charge(data.unwrap_or(0)).await;
                    }
                    // A client read that starts fetching stops the batch's
                    // GETs once; the batch goes again when clients are
                    // served (or YIELD_MAX has passed), to the end.
                    let mut yielding = true;
                    loop {
                        let turn = stride.turn().await;
                        let filled = lazy.fill_background(f, c, yielding).await?;
                        drop(turn);
                        if let Some(n) = filled {
                            if yielding {
                                stride.grow();
                            }
                            return Ok(n);
                        }
                        stride.back_off();
                        lazy.background_turn(YIELD_MAX).await;
                        yielding = false;
                    }
                }
            })
            .buffer_unordered(BATCHES);
        futures::pin_mut!(results);
        // (failures this pass, the last, whether one was damage)
        let mut failed: Option<(u64, String, bool)> = None;
        // Whether a fetch this pass found an object missing.
        let mut missing = false;
        loop {
            tokio::select! {
                () = job.cancel.cancelled() => return Err(CloudError::Cancelled),
                r = results.next() => match r {
                    None => break,
                    Some(Ok(_)) => set_done(),
                    Some(Err(e)) => {
                        // Logged once per pass; the task shows it at once.
                        let n = failed.as_ref().map_or(1, |f| f.0 + 1);
                        if n == 1 {
                            tracing::warn!(volume = %job.volume.name(), error = %e, "hydration fetch failed; retried on the next pass");
                        }
                        missing |= e.kind() == std::io::ErrorKind::NotFound;
                        let damaged = e.kind() == std::io::ErrorKind::InvalidData
                            || failed.as_ref().is_some_and(|f| f.2);
                        let advice = if damaged { DAMAGED } else { "" };
                        (job.report)(Some(format!("{n} fetch(es) failed this pass, to be retried: {e}{advice}")));
                        failed = Some((n, e.to_string(), damaged));
                    }
                }
            }
        }
        set_done();
        if l.complete() {
            break;
        }
        // Fetches finding objects missing: if the manifest is gone too
        // (deleted on another host, then collected while no lease held
        // it), nothing more will come. Only then: a restore that goes on
        // from the manifest it kept finds the bucket's gone by design, and
        // its lease keeps what it reads, so any other failure (a store's
        // 503, damage) is retried with the lease held. One HEAD per such
        // pass.
        if gone.is_none() && missing {
            if let Ok(r) = job.source.ready().await {
                let (v, n) = (&job.source.src_volume, &job.source.src_name);
                if let Ok(false) = r.repo.has_manifest(v, n).await {
                    let e = CloudError::Repo(crate::repo::RepoError::Missing {
                        location: r.repo.location().to_string(),
                        object: crate::repo::manifest_key(v, n),
                    });
                    release_gone(job, &e).await;
                    gone = Some(e);
                }
            }
        }
        let why = match (gone, failed) {
            // What is in place is said: after a crash that lost the
            // fetches not yet flushed it may be nothing.
            (Some(e), _) if l.present_bytes() == 0 => format!(
                "{e}: the snapshot is gone from the bucket, and none of it was restored before: nothing can be read from this volume; end this restore with `blockctl cloudsnap stop --force` (which deletes the volume)"
            ),
            (Some(e), _) => format!(
                "{e}: the snapshot is gone from the bucket, so what is not restored yet never will be and reads of it fail; {} of {} are in place (`blockctl volume inspect {}`): copy what you need from the volume, then end this restore with `blockctl cloudsnap stop --force` (which deletes the volume)",
                blockd_api::human_size(l.present_bytes()),
                blockd_api::human_size(job.volume.size()),
                job.volume.name()
            ),
            (None, Some((n, e, damaged))) => format!(
                "{n} fetch(es) failed, retrying in {}s: {e}{}",
                pause.as_secs(),
                if damaged { DAMAGED } else { "" }
            ),
            // Nothing failed: the units left are those a client's read
            // was fetching when the pass met them. Soon done, and not
            // trouble to report; only if that goes on is it said.
            (None, None) if unfinished < 10 => {
                unfinished += 1;
                (job.report)(None);
                tokio::select! {
                    () = job.cancel.cancelled() => return Err(CloudError::Cancelled),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            }
            (None, None) => "units still missing, retrying".into(),
        };
        unfinished = 0;
        (job.report)(Some(why));
        tokio::select! {
            () = job.cancel.cancelled() => return Err(CloudError::Cancelled),
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(60));
    }
    // Complete only once durable: the caller then drops the present map.
    while let Err(e) = job.volume.flush().await {
        (job.report)(Some(format!(
            "flushing volume {}: {e}; retrying",
            job.volume.name()
        )));
        tokio::select! {
            () = job.cancel.cancelled() => return Err(CloudError::Cancelled),
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    (job.report)(None);
    Ok(())
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::Stride;

    /// Batches double up to the largest while no client comes, fall back
    /// to the smallest when one does, and never leave the bounds.
    #[test]
    fn stride_grows_to_its_largest_and_backs_off() {
        let s = Stride::new(16, 128);
        let mut seen = vec![(s.get(), s.allowed())];
        for _ in 0..4 {
            s.grow();
            seen.push((s.get(), s.allowed()));
        }
        assert_eq!(seen, [(16, 1), (32, 2), (64, 3), (128, 3), (128, 3)]);
        s.back_off();
        assert_eq!((s.get(), s.allowed()), (16, 1));
        // A local location: one size.
        let local = Stride::new(16, 16);
        local.grow();
        assert_eq!(local.get(), 16);
        // A paced restore whose batches are below the smallest.
        let paced = Stride::new(16, 4);
        assert_eq!(paced.get(), 4);
        paced.grow();
        assert_eq!(paced.get(), 4);
    }

    /// After a back-off one batch fetches at a time; a second waits for
    /// the first's turn to end, or for the stride to grow.
    #[tokio::test]
    async fn turns_follow_the_stride() {
        use std::time::Duration;
        let s = Stride::new(16, 128);
        let first = s.turn().await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), s.turn()).await;
        assert!(waiting.is_err(), "a second turn while only one is allowed");
        drop(first);
        let a = tokio::time::timeout(Duration::from_secs(5), s.turn())
            .await
            .expect("the turn freed");
        s.grow();
        let b = tokio::time::timeout(Duration::from_secs(5), s.turn())
            .await
            .expect("a second turn once grown");
        let third = tokio::time::timeout(Duration::from_millis(50), s.turn()).await;
        assert!(third.is_err(), "two allowed at the first doubling");
        drop((a, b));
    }
}
