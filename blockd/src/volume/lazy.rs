//! Lazily restored volumes: the volume is served before its data has
//! arrived, and the parts not yet present are fetched on first touch.
//!
//! The volume is divided into *units* of the repository's chunk size
//! (64 KiB): chunks are cut at those boundaries, so one unit is filled by
//! the one chunk (or the few overlaid ones) that cover it, one ranged GET.
//! A roaring bitmap records the units present in the data file.
//!
//! Rules:
//! - A unit is filled at most once and never after it is present: every
//!   fill writes under the unit's stripe lock and only if the unit is
//!   still missing, then marks it present. Once present, a unit stays
//!   present, so the volume's own writes never race a fill that lands
//!   after them.
//! - Reads and partial writes fill the units they touch first
//!   (copy-on-read); a write, trim or zeroing that covers a whole unit
//!   *claims* it (marks it present, no fetch) before it is issued, and
//!   after the fills of the units it covers in part: a request whose fill
//!   fails is never issued and claims nothing. A write that fails once
//!   issued leaves what it covered undefined, as a disk's failed write
//!   does; the client was told it failed.
//! - Fills bypass the dirty map: they bring back the snapshot the volume
//!   is restored from. The volume's own writes are tracked as usual.
//! - The bitmap is persisted in `<volume>.present` (write-temp, fsync,
//!   rename, fsync dir) only *after* an fdatasync of the data file that
//!   follows every fill and claim it records: a unit recorded present is
//!   on disk. A FLUSH (and a FUA write that claimed a unit) persists it,
//!   so a flushed write to a claimed unit is never refilled after a crash.
//! - Every mark is also journaled ([`journal`]) before what it stands for
//!   can be acknowledged, in the page cache only: a crash of blockd alone
//!   (the host up) loses no mark, so no acknowledged write, flushed or
//!   not; after a host crash only the map counts, and unflushed writes
//!   and fills may be lost or fetched again, as NBD allows.
//!
//! `<volume>.present` bytes (little-endian):
//! ```text
//! 0   8  magic "BLKDPRES"   (never change)
//! 8   4  version = 1
//! 12  4  reserved (0)
//! 16  8  unit size in bytes
//! 24  8  volume size in bytes
//! 32  4  crc32 of the bitmap bytes
//! 36  4  length of the bitmap bytes
//! 40  …  roaring bitmap (portable serialisation)
//! ```

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use roaring::RoaringBitmap;

use crate::magic::{PRESENT_MAGIC as MAGIC, PRESENT_VERSION as VERSION};

pub mod journal;
use journal::Journal;
const HEADER: usize = 40;
/// Fill locks: units hash onto this many stripes.
const STRIPES: usize = 256;
/// Largest sequential read-ahead, in units.
const MAX_READAHEAD: u32 = 64;

/// Where a lazily restored volume's missing bytes come from.
#[async_trait::async_trait]
pub trait Source: Send + Sync {
    /// The snapshot's bytes of units `first..first + count`, as runs of
    /// `(volume offset, bytes)`; bytes no run covers are zeros. Every byte
    /// returned has been checked against its chunk id.
    ///
    /// # Errors
    /// A missing or corrupt object or an unreachable store; the message
    /// names the snapshot and the object.
    async fn fetch(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>>;

    /// [`Source::fetch`] for the hydrator: the same bytes, with the CPU
    /// work of opening them at background priority, so that a client's
    /// fetch (and the store, when it shares the host) is served first.
    ///
    /// # Errors
    /// As [`Source::fetch`].
    async fn fetch_background(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>> {
        self.fetch(first, count).await
    }
}

/// Who fills units, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// A client request: at once, at normal priority.
    Client,
    /// The hydrator, giving way to client requests that start fetching.
    Yielding,
    /// The hydrator, to the end (it has given way once already).
    Background,
}

/// What a request needs from the units it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The old contents (reads, and NBD CACHE).
    Read,
    /// The range is about to be overwritten: units it covers whole are
    /// claimed, partly covered ones filled.
    Overwrite,
}

/// What [`Lazy::prepare`] did to make a range ready.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Some unit was filled or claimed.
    pub changed: bool,
    /// Units claimed for an overwrite: journaled only once the overwrite
    /// is on the data file ([`Lazy::record_claims`]). A crash before then
    /// leaves them missing, so they read as the snapshot again (old data)
    /// rather than as the zeros of a hole.
    claimed: Vec<u32>,
}

impl Prepared {
    /// True when units were claimed and wait for [`Lazy::record_claims`].
    pub fn has_claims(&self) -> bool {
        !self.claimed.is_empty()
    }
}

/// The present map and fill logic of one lazily restored volume.
pub struct Lazy {
    file: Arc<File>,
    path: PathBuf,
    unit: u64,
    size: u64,
    units: u32,
    present: Mutex<RoaringBitmap>,
    /// Marks since the map was last written (locked after `present`).
    journal: Mutex<Journal>,
    /// How many units `present` holds, changed under its lock: the
    /// hydrator asks after every batch, and a bitmap counts its members
    /// container by container, 16384 of them for a 64 TiB volume.
    present_len: AtomicU64,
    /// Units some request or the hydrator is fetching: others wait for
    /// them instead of fetching them again.
    fetching: Mutex<RoaringBitmap>,
    /// Woken whenever fetches end (installed or failed).
    fetched: tokio::sync::Notify,
    /// Bumped by every mark; compared with `persisted`.
    generation: AtomicU64,
    persisted: AtomicU64,
    stripes: Vec<Mutex<()>>,
    source: Arc<dyn Source>,
    /// (unit after the last on-demand fetch, read-ahead window in units).
    readahead: Mutex<(u32, u32)>,
    /// Serialises writes of the `.present` file.
    persist: Mutex<()>,
    /// Client requests fetching now: background fills wait for them.
    foreground: AtomicUsize,
    /// Woken when the last of them ends.
    foreground_done: tokio::sync::Notify,
    /// Woken when a client request starts fetching: background fetches
    /// in flight give way (see [`Lazy::fill_background`]).
    foreground_started: tokio::sync::Notify,
}

/// Counts a client request among [`Lazy::foreground`] while it lives.
struct Foreground<'a>(&'a Lazy);

impl<'a> Foreground<'a> {
    fn enter(l: &'a Lazy) -> Self {
        l.foreground.fetch_add(1, Ordering::AcqRel);
        l.foreground_started.notify_waiters();
        Self(l)
    }
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        if self.0.foreground.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.foreground_done.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy")
            .field("path", &self.path)
            .field("unit", &self.unit)
            .field("units", &self.units)
            .finish_non_exhaustive()
    }
}

/// Runs of units a fill has taken (see [`Lazy::take`]): `runs[next..]`
/// are still marked as being fetched, and are released when this is
/// dropped, however the fill ended.
struct Taken<'a> {
    lazy: &'a Lazy,
    runs: &'a [(u32, u32)],
    next: usize,
}

impl Taken<'_> {
    /// Releases the next run (it was installed).
    fn release_one(&mut self) {
        self.release(self.next..self.next + 1);
        self.next += 1;
    }

    fn release(&self, which: std::ops::Range<usize>) {
        let Some(runs) = self.runs.get(which) else {
            return;
        };
        if runs.is_empty() {
            return;
        }
        let mut fetching = lock(&self.lazy.fetching);
        for &(f, c) in runs {
            fetching.remove_range(f..f + c);
        }
        drop(fetching);
        self.lazy.fetched.notify_waiters();
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.release(self.next..self.runs.len());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn invalid(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("present map {}: {why}", path.display()),
    )
}

impl Lazy {
    /// Opens (or starts, when `path` does not exist) the present map of a
    /// volume of `size` bytes filled in units of `unit` bytes.
    ///
    /// # Errors
    /// An unreadable or damaged map (the volume must then not be served:
    /// which of its units hold the volume's own writes is unknown), a
    /// unit size that does not fit.
    pub fn open(
        file: Arc<File>,
        path: PathBuf,
        unit: u64,
        size: u64,
        source: Arc<dyn Source>,
    ) -> io::Result<Self> {
        if unit == 0 || !unit.is_power_of_two() {
            return Err(invalid(&path, "unit size must be a power of two"));
        }
        let units = u32::try_from(size.div_ceil(unit))
            .map_err(|_| invalid(&path, "volume too large for its unit size"))?;
        let mut present = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes, unit, size).map_err(|why| invalid(&path, &why))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => RoaringBitmap::new(),
            Err(e) => return Err(e),
        };
        // Marks a crash of blockd left only in the journal (this boot's
        // page cache holds what they stand for): made durable in the map
        // before the journal starts afresh.
        let found = Journal::recover(&path, unit, size, units)?;
        if !found.is_subset(&present) {
            let added = found.difference_len(&present);
            present |= found;
            file.sync_data()?;
            crate::durable::write_atomic(&path, &encode(&present, unit, size))?;
            tracing::info!(map = %path.display(), units = added, "present map: marks kept by its journal across a crash of blockd");
        }
        let journal = Journal::start(&path, unit, size)?;
        Ok(Self {
            journal: Mutex::new(journal),
            file,
            path,
            unit,
            size,
            units,
            present_len: AtomicU64::new(present.len()),
            present: Mutex::new(present),
            fetching: Mutex::new(RoaringBitmap::new()),
            fetched: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            source,
            readahead: Mutex::new((u32::MAX, 0)),
            persist: Mutex::new(()),
            foreground: AtomicUsize::new(0),
            foreground_done: tokio::sync::Notify::new(),
            foreground_started: tokio::sync::Notify::new(),
        })
    }

    /// Unit size in bytes.
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// Number of units.
    pub fn units(&self) -> u32 {
        self.units
    }

    /// Bytes present.
    pub fn present_bytes(&self) -> u64 {
        let n = self.present_len.load(Ordering::Acquire);
        n.saturating_mul(self.unit).min(self.size)
    }

    /// True once every unit is present.
    pub fn complete(&self) -> bool {
        self.present_len.load(Ordering::Acquire) >= u64::from(self.units)
    }

    /// True when unit `u` is present.
    pub fn is_present(&self, u: u32) -> bool {
        lock(&self.present).contains(u)
    }

    /// Runs `(first, count)` of missing units in `from..to` (cost
    /// proportional to the units present in it, at most `to - from`).
    pub fn missing(&self, from: u32, to: u32) -> Vec<(u32, u32)> {
        let to = to.min(self.units);
        if from >= to {
            return Vec::new();
        }
        let p = lock(&self.present);
        let mut out = Vec::new();
        let mut it = p.iter();
        it.advance_to(from);
        let mut u = from;
        for x in it {
            if x >= to {
                break;
            }
            if x > u {
                out.push((u, x - u));
            }
            u = x + 1;
        }
        if u < to {
            out.push((u, to - u));
        }
        out
    }

    /// The first missing unit in `from..to`: a step per 2^16 units
    /// present (one bitmap container) that it crosses. The hydrator asks
    /// within the snapshot's index blocks, not across the whole volume:
    /// a 64 TiB volume of 64 KiB units is 16384 containers to cross.
    pub fn next_missing(&self, from: u32, to: u32) -> Option<u32> {
        let p = lock(&self.present);
        let to = to.min(self.units);
        let mut u = from;
        while u < to {
            let end = ((u64::from(u >> 16) + 1) << 16).min(u64::from(to));
            let end = u32::try_from(end).unwrap_or(u32::MAX);
            if p.range_cardinality(u..end) == u64::from(end - u) {
                u = end;
                continue;
            }
            let mut it = p.iter();
            it.advance_to(u);
            for x in it {
                if x != u {
                    break;
                }
                u += 1;
            }
            return (u < to).then_some(u);
        }
        None
    }

    /// Marks present every unit outside `ranges` (byte ranges, in any
    /// order): the snapshot holds nothing there, so the sparse data file's
    /// zeros are its contents, and neither the hydrator nor a read fetches
    /// them. Idempotent. Restoring a 64 TiB volume holding a few MiB then
    /// costs a few containers of runs, not 2^30 units visited. Returns
    /// `ranges` in units, `(first, end)`: what the hydrator visits.
    pub fn present_outside(
        &self,
        ranges: impl IntoIterator<Item = std::ops::Range<u64>>,
    ) -> Vec<(u32, u32)> {
        let mut outside = RoaringBitmap::new();
        outside.insert_range(0..self.units);
        let units: Vec<(u32, u32)> = ranges
            .into_iter()
            .map(|r| {
                let a = u32::try_from(r.start / self.unit).unwrap_or(u32::MAX);
                let b = u32::try_from(r.end.div_ceil(self.unit)).unwrap_or(u32::MAX);
                (a, b)
            })
            .collect();
        for &(a, b) in &units {
            outside.remove_range(a..b);
        }
        self.mark_present(outside);
        units
    }

    /// [`Self::present_outside`]'s marking of `outside`.
    fn mark_present(&self, mut outside: RoaringBitmap) {
        // Built outside the lock: a client read waits for none of it. A
        // map still empty (the first pass, nothing read yet) is replaced
        // whole; merging it would visit every container under the lock.
        if outside.is_empty() {
            return;
        }
        outside.optimize();
        let len = outside.len();
        // Not journaled: the hydrator marks these again at every start,
        // and a fetch of a unit the snapshot holds nothing in writes
        // nothing.
        let mut p = lock(&self.present);
        if p.is_empty() {
            *p = outside;
            self.present_len.store(len, Ordering::Release);
        } else {
            if outside.is_subset(&p) {
                return;
            }
            *p |= outside;
            p.optimize();
            self.present_len.store(p.len(), Ordering::Release);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn stripe(&self, u: u32) -> MutexGuard<'_, ()> {
        lock(&self.stripes[u as usize % STRIPES])
    }

    /// Marks unit `u` present, and journals it with `journal` (its
    /// contents are on the data file). Returns whether it was missing.
    /// The generation moves under the map's lock, with the map: two
    /// checkpoints of one generation hold the same units.
    fn mark(&self, u: u32, journal: bool) -> bool {
        let mut p = lock(&self.present);
        let added = p.insert(u);
        if added {
            self.present_len.fetch_add(1, Ordering::AcqRel);
            self.generation.fetch_add(1, Ordering::AcqRel);
            if journal {
                lock(&self.journal).append(u, &self.path);
            }
        }
        added
    }

    /// Marks units `first..first + count` present without fetching: the
    /// snapshot holds nothing there (the caller checked its index), so
    /// the sparse file's zeros are their contents.
    pub fn holes(&self, first: u32, count: u32) {
        for u in first..first + count.min(self.units.saturating_sub(first)) {
            let _s = self.stripe(u);
            self.mark(u, true);
        }
    }

    /// Journals the units `p` claimed, once the overwrite they were
    /// claimed for is on the data file (before it is acknowledged).
    pub fn record_claims(&self, p: &Prepared) {
        if p.claimed.is_empty() {
            return;
        }
        // Under the map's lock, as every journal write: a checkpoint's
        // switch of files orders it.
        let _p = lock(&self.present);
        let mut j = lock(&self.journal);
        for &u in &p.claimed {
            j.append(u, &self.path);
        }
    }

    /// True when every unit of `offset..offset + len` is present.
    pub fn all_present(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return true;
        }
        let first = u32::try_from(offset / self.unit).unwrap_or(u32::MAX);
        let last = u32::try_from(end.div_ceil(self.unit)).unwrap_or(u32::MAX);
        self.missing(first, last).is_empty()
    }

    /// Writes the fetched `runs` into units `first..first + count` that
    /// are still missing and marks them present. Blocking (pwrite).
    ///
    /// # Errors
    /// Write errors (the unit then stays missing).
    pub fn install(&self, first: u32, count: u32, runs: &[(u64, Bytes)]) -> io::Result<u64> {
        use std::os::unix::fs::FileExt;
        let mut written = 0u64;
        for u in first..first + count {
            let lo = u64::from(u) * self.unit;
            let hi = (lo + self.unit).min(self.size);
            let _s = self.stripe(u);
            if self.is_present(u) {
                continue;
            }
            for (at, bytes) in runs {
                let end = at + bytes.len() as u64;
                if end <= lo || *at >= hi {
                    continue;
                }
                let s = lo.max(*at);
                let t = hi.min(end);
                let from = usize::try_from(s - at).unwrap_or(0);
                let to = usize::try_from(t - at).unwrap_or(0);
                self.file.write_all_at(&bytes[from..to], s)?;
                written += t - s;
            }
            self.mark(u, true);
        }
        Ok(written)
    }

    /// Makes `offset..offset + len` safe for `need`: fetches and installs
    /// the missing units it must have (with read-ahead on sequential
    /// reads), claims the ones an overwrite covers whole. The caller
    /// passes what it returns to [`Lazy::record_claims`] once the
    /// overwrite is on the data file.
    ///
    /// # Errors
    /// A failed fetch (the request fails; the units stay missing and a
    /// later request tries again), or a failed write.
    pub async fn prepare(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        need: Need,
    ) -> io::Result<Prepared> {
        if len == 0 {
            return Ok(Prepared::default());
        }
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Prepared::default());
        }
        let first = u32::try_from(offset / self.unit).unwrap_or(u32::MAX);
        let last = u32::try_from(end.div_ceil(self.unit)).unwrap_or(u32::MAX);
        let missing = self.missing(first, last);
        if missing.is_empty() {
            return Ok(Prepared::default());
        }
        let mut fetch: Vec<(u32, u32)> = Vec::new();
        let mut claims: Vec<u32> = Vec::new();
        match need {
            Need::Read => {
                let mut runs = missing;
                let mut ra = lock(&self.readahead);
                // A miss right where the last one ended is a sequential
                // reader: fetch ahead, doubling the window up to 4 MiB.
                ra.1 = if ra.0 == runs[0].0 {
                    (ra.1 * 2).clamp(4, MAX_READAHEAD)
                } else {
                    0
                };
                let (lf, lc) = runs[runs.len() - 1];
                let mut next = lf + lc;
                if ra.1 > 0 && next == last {
                    if let Some(&(af, ac)) = self.missing(next, next.saturating_add(ra.1)).first() {
                        if af == next {
                            if let Some(r) = runs.last_mut() {
                                r.1 += ac;
                            }
                            next += ac;
                        }
                    }
                }
                ra.0 = next;
                fetch = runs;
            }
            Need::Overwrite => {
                for (f, c) in missing {
                    for u in f..f + c {
                        let lo = u64::from(u) * self.unit;
                        let hi = (lo + self.unit).min(self.size);
                        if offset <= lo && hi <= end {
                            claims.push(u);
                        } else {
                            match fetch.last_mut() {
                                Some((pf, pc)) if *pf + *pc == u => *pc += 1,
                                _ => fetch.push((u, 1)),
                            }
                        }
                    }
                }
            }
        }
        let _fg = Foreground::enter(self);
        let t0 = std::time::Instant::now();
        for (f, c) in fetch {
            if let Err(e) = self.fill(f, c).await {
                // The run may reach past the request (read-ahead), and what
                // failed may be there, a damaged chunk the request does not
                // need: fetch the request's own units alone before failing
                // it. A sequential copy then fails only the reads that need
                // the damage.
                let own = f.saturating_add(c).min(last).saturating_sub(f);
                if own == 0 || own == c {
                    return Err(e);
                }
                tracing::debug!(first = f, count = c, error = %e, "read-ahead failed: fetching the request's units alone");
                self.fill(f, own).await?;
            }
        }
        // Claimed only once every fill the request needs has landed: a
        // request that fails before its write is issued (a store that
        // cannot be reached) leaves the units it would have overwritten
        // missing, so they still read as the snapshot, not as zeros.
        let mut claimed = Vec::new();
        for u in claims {
            let _s = self.stripe(u);
            if self.mark(u, false) {
                claimed.push(u);
            }
        }
        tracing::debug!(
            offset,
            len,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "lazy client fill"
        );
        Ok(Prepared {
            changed: true,
            claimed,
        })
    }

    /// Waits (at most `limit`) while client requests are fetching: the
    /// hydrator calls this before each fetch, so a client's read goes to
    /// the store and the disk ahead of background batches, not behind
    /// them. Bounded so that a client reading without pause still lets
    /// hydration move.
    pub async fn background_turn(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let done = self.foreground_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.foreground.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return;
            }
        }
    }

    /// Fetches and installs the missing units of `first..first + count`
    /// that no one else is fetching, then waits for the ones others are
    /// fetching (and fetches those whose fetch failed or gave way). Returns
    /// the bytes written. For client requests.
    ///
    /// # Errors
    /// A failed fetch or write.
    pub async fn fill(self: &Arc<Self>, first: u32, count: u32) -> io::Result<u64> {
        let end = first.saturating_add(count).min(self.units);
        let mut written = 0;
        loop {
            let notified = self.fetched.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (mine, others) = self.take(first, end);
            written += self.fill_runs(&mine, Fill::Client).await?.0;
            if !others {
                return Ok(written);
            }
            notified.await;
        }
    }

    /// The hydrator's fill: fetches and installs the missing units of
    /// `first..first + count` that no one else is fetching. With
    /// `yielding`, gives way when a client request starts fetching: the
    /// GETs in flight are dropped (so the store serves the client's alone,
    /// not behind megabytes of background reads), the units not installed
    /// are released, and `Ok(None)` tells the caller to try again after
    /// [`Lazy::background_turn`] (without `yielding`, so that a client
    /// reading without pause still lets hydration move).
    ///
    /// # Errors
    /// A failed fetch or write.
    pub async fn fill_background(
        self: &Arc<Self>,
        first: u32,
        count: u32,
        yielding: bool,
    ) -> io::Result<Option<u64>> {
        let end = first.saturating_add(count).min(self.units);
        let (mine, _) = self.take(first, end);
        let how = if yielding {
            Fill::Yielding
        } else {
            Fill::Background
        };
        let (written, finished) = self.fill_runs(&mine, how).await?;
        Ok(finished.then_some(written))
    }

    /// Fetches and installs `runs`, which the caller has taken (see
    /// [`Lazy::take`]), releasing each as it ends. The hydrator's runs are
    /// opened and written at background priority, and with
    /// [`Fill::Yielding`] they stop when a client request starts fetching.
    /// Returns the bytes written and whether every run was installed.
    async fn fill_runs(
        self: &Arc<Self>,
        runs: &[(u32, u32)],
        how: Fill,
    ) -> io::Result<(u64, bool)> {
        // Whatever ends this call, a run it took is released: also when the
        // future is dropped between two awaits (a stopped restore, a
        // shutdown), so a client read waiting for it is woken and never
        // waits for a fetch that no one will finish.
        let mut taken = Taken {
            lazy: self,
            runs,
            next: 0,
        };
        let mut written = 0;
        while let Some(&(f, c)) = runs.get(taken.next) {
            let fetch = async {
                let me = self.clone();
                if how == Fill::Client {
                    let runs = self.source.fetch(f, c).await?;
                    tokio::task::spawn_blocking(move || me.install(f, c, &runs)).await
                } else {
                    let runs = self.source.fetch_background(f, c).await?;
                    crate::host::spawn_background(move || me.install(f, c, &runs)).await
                }
                .map_err(io::Error::other)?
            };
            let r = if how == Fill::Yielding {
                let started = self.foreground_started.notified();
                tokio::pin!(started);
                started.as_mut().enable();
                if self.foreground.load(Ordering::Acquire) > 0 {
                    None
                } else {
                    tokio::select! {
                        r = fetch => Some(r),
                        () = started => None,
                    }
                }
            } else {
                Some(fetch.await)
            };
            match r {
                Some(Ok(n)) => {
                    taken.release_one();
                    written += n;
                }
                // Dropping `taken` releases this run and the ones not started.
                Some(Err(e)) => return Err(e),
                None => {
                    tracing::debug!(first = f, count = c, "hydrator batch gave way");
                    return Ok((written, false));
                }
            }
        }
        Ok((written, true))
    }

    /// Marks the missing units of `first..end` that no one is fetching as
    /// fetched by the caller; returns them as runs, and whether others are
    /// fetching missing units of the range.
    fn take(&self, first: u32, end: u32) -> (Vec<(u32, u32)>, bool) {
        let p = lock(&self.present);
        let mut f = lock(&self.fetching);
        let mut mine: Vec<(u32, u32)> = Vec::new();
        let mut others = false;
        for u in first..end {
            if p.contains(u) {
                continue;
            }
            if f.contains(u) {
                others = true;
                continue;
            }
            f.insert(u);
            match mine.last_mut() {
                Some((a, c)) if *a + *c == u => *c += 1,
                _ => mine.push((u, 1)),
            }
        }
        (mine, others)
    }

    /// A copy of the map and its generation, taken before the fdatasync
    /// that must precede [`Lazy::persist`].
    pub fn checkpoint(&self) -> (RoaringBitmap, u64) {
        let mut p = lock(&self.present);
        // Full containers become single runs (fills insert unit by unit).
        p.optimize();
        let generation = self.generation.load(Ordering::Acquire);
        lock(&self.journal).switch(generation);
        (p.clone(), generation)
    }

    /// Writes a map taken with [`Lazy::checkpoint`] before a sync of the
    /// data file (write-temp, fsync, rename, fsync dir). Skipped when
    /// nothing changed since the last write.
    ///
    /// # Errors
    /// I/O.
    pub async fn persist(self: &Arc<Self>, map: RoaringBitmap, generation: u64) -> io::Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.persist_blocking(&map, generation))
            .await
            .map_err(io::Error::other)?
    }

    /// [`Lazy::persist`] on the calling thread (shutdown).
    ///
    /// # Errors
    /// I/O.
    pub fn persist_blocking(&self, map: &RoaringBitmap, generation: u64) -> io::Result<()> {
        let _one = lock(&self.persist);
        if generation == 0 || generation > self.persisted.load(Ordering::Acquire) {
            crate::durable::write_atomic(&self.path, &encode(map, self.unit, self.size))?;
            self.persisted.fetch_max(generation, Ordering::AcqRel);
        }
        // The map written holds every mark up to `persisted`.
        let persisted = self.persisted.load(Ordering::Acquire);
        lock(&self.journal).written(persisted);
        Ok(())
    }

    /// Removes the `.present` file once the volume is complete.
    ///
    /// # Errors
    /// I/O other than a missing file.
    pub fn remove_file(&self) -> io::Result<()> {
        remove_present(&self.path)
    }
}

/// Removes a `.present` file (and its directory entry durably).
///
/// # Errors
/// I/O other than a missing file.
pub fn remove_present(path: &Path) -> io::Result<()> {
    if !remove_present_unsynced(path)? {
        return Ok(());
    }
    match path.parent() {
        Some(dir) => crate::durable::sync_dir(dir),
        None => Ok(()),
    }
}

/// Removes a `.present` file and its journals, leaving the directory's
/// sync to the caller; true when the map was there.
///
/// # Errors
/// I/O other than a missing file.
pub fn remove_present_unsynced(path: &Path) -> io::Result<bool> {
    journal::remove(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Encodes a present map.
pub fn encode(map: &RoaringBitmap, unit: u64, size: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(map.serialized_size());
    // Writing to a Vec cannot fail.
    let _ = map.serialize_into(&mut body);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&unit.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    // A bitmap of u32 unit numbers serialises to at most 512 MiB.
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes a present map, checking it belongs to a volume of `size`
/// bytes in units of `unit`.
///
/// # Errors
/// A description of what is wrong.
pub fn decode(bytes: &[u8], unit: u64, size: u64) -> Result<RoaringBitmap, String> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err("not a present map (bad magic or too short)".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    if u32_at(8) != VERSION {
        return Err(format!("unknown version {}", u32_at(8)));
    }
    if u64_at(16) != unit || u64_at(24) != size {
        return Err(format!(
            "made for unit {} and size {}, the volume has unit {unit} and size {size}",
            u64_at(16),
            u64_at(24)
        ));
    }
    let len = u32_at(36) as usize;
    let body = &bytes[HEADER..];
    if body.len() != len {
        return Err(format!(
            "bitmap length {len} but {} bytes follow",
            body.len()
        ));
    }
    if crc32fast::hash(body) != u32_at(32) {
        return Err("checksum mismatch".into());
    }
    let map = RoaringBitmap::deserialize_from(body).map_err(|e| format!("bitmap: {e}"))?;
    let units = size.div_ceil(unit);
    if map.max().is_some_and(|m| u64::from(m) >= units) {
        return Err("bitmap names units past the end of the volume".into());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pattern;

    #[async_trait::async_trait]
    impl Source for Pattern {
        async fn fetch(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>> {
            let lo = u64::from(first) * 4096;
            let bytes: Vec<u8> = (0..u64::from(count) * 4096)
                .map(|i| u8::try_from((lo + i) / 4096 % 128).unwrap() | 1)
                .collect();
            Ok(vec![(lo, Bytes::from(bytes))])
        }
    }

    fn setup(size: u64) -> (tempfile::TempDir, Arc<Lazy>) {
        setup_with(size, Arc::new(Pattern))
    }

    /// [`Pattern`], but units from 32 on take a minute: a background GET
    /// still under way.
    struct SlowTail;

    #[async_trait::async_trait]
    impl Source for SlowTail {
        async fn fetch(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>> {
            if first >= 32 {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
            Pattern.fetch(first, count).await
        }
    }

    fn setup_with(size: u64, source: Arc<dyn Source>) -> (tempfile::TempDir, Arc<Lazy>) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("v.img"))
            .unwrap();
        f.set_len(size).unwrap();
        let l = Lazy::open(
            Arc::new(f),
            dir.path().join("v.present"),
            4096,
            size,
            source,
        )
        .unwrap();
        (dir, Arc::new(l))
    }

    #[test]
    fn encode_decode_round_trip_and_checks() {
        let mut m = RoaringBitmap::new();
        m.insert_range(3..700);
        let b = encode(&m, 65536, 100 << 20);
        assert_eq!(decode(&b, 65536, 100 << 20).unwrap(), m);
        assert!(decode(&b, 4096, 100 << 20).is_err());
        let mut bad = b.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(decode(&bad, 65536, 100 << 20)
            .unwrap_err()
            .contains("checksum"));
        assert!(decode(&b[..20], 65536, 100 << 20).is_err());
        assert!(decode(&b, 65536, 1 << 20).is_err());
    }

    #[tokio::test]
    async fn reads_fill_and_overwrites_claim() {
        use std::os::unix::fs::FileExt;
        let (_d, l) = setup(64 * 4096);
        assert!(
            l.prepare(4096 * 2 + 10, 100, Need::Read)
                .await
                .unwrap()
                .changed
        );
        assert!(l.is_present(2) && !l.is_present(3));
        let mut b = [0u8; 1];
        l.file.read_exact_at(&mut b, 4096 * 2).unwrap();
        assert_eq!(b[0], 3);
        // Whole-unit overwrite: claimed, nothing written.
        assert!(
            l.prepare(4096 * 5, 4096, Need::Overwrite)
                .await
                .unwrap()
                .changed
        );
        assert!(l.is_present(5));
        l.file.read_exact_at(&mut b, 4096 * 5).unwrap();
        assert_eq!(b[0], 0);
        // A fill never lands on a present unit.
        l.install(5, 1, &Pattern.fetch(5, 1).await.unwrap())
            .unwrap();
        l.file.read_exact_at(&mut b, 4096 * 5).unwrap();
        assert_eq!(b[0], 0);
        // Partial overwrite: filled first.
        assert!(
            l.prepare(4096 * 7 + 1, 10, Need::Overwrite)
                .await
                .unwrap()
                .changed
        );
        l.file.read_exact_at(&mut b, 4096 * 7).unwrap();
        assert_eq!(b[0], 7);
        assert_eq!(l.missing(0, 9), vec![(0, 2), (3, 2), (6, 1), (8, 1)]);
    }

    /// [`Pattern`], but every fetch fails while `down` is set: a store
    /// that cannot be reached.
    struct Flaky {
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Source for Flaky {
        async fn fetch(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>> {
            if self.down.load(Ordering::SeqCst) {
                return Err(io::Error::other("store unreachable"));
            }
            Pattern.fetch(first, count).await
        }
    }

    #[tokio::test]
    async fn an_overwrite_that_fails_to_fill_claims_nothing() {
        use std::os::unix::fs::FileExt;
        let source = Arc::new(Flaky {
            down: std::sync::atomic::AtomicBool::new(true),
        });
        let (_d, l) = setup_with(16 * 4096, source.clone());
        // Units 2 and 3 covered whole, unit 4 in part: its fill fails, so
        // the write is never issued and units 2 and 3 keep the snapshot.
        let err = l
            .prepare(4096 * 2, 2 * 4096 + 100, Need::Overwrite)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("unreachable"), "{err}");
        assert_eq!(l.missing(0, 16), vec![(0, 16)]);
        source.down.store(false, Ordering::SeqCst);
        assert!(
            l.prepare(4096 * 2, 3 * 4096, Need::Read)
                .await
                .unwrap()
                .changed
        );
        let mut b = [0u8; 1];
        for u in 2..5u64 {
            l.file.read_exact_at(&mut b, 4096 * u).unwrap();
            assert_eq!(u64::from(b[0]), u | 1, "unit {u} holds the snapshot");
        }
    }

    /// [`Pattern`], but the first fetch never ends: a GET that hangs.
    struct HangFirst(std::sync::atomic::AtomicBool);

    #[async_trait::async_trait]
    impl Source for HangFirst {
        async fn fetch(&self, first: u32, count: u32) -> io::Result<Vec<(u64, Bytes)>> {
            if !self.0.swap(true, Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Pattern.fetch(first, count).await
        }
    }

    #[tokio::test]
    async fn a_dropped_fill_releases_its_units_and_wakes_waiters() {
        let source = Arc::new(HangFirst(std::sync::atomic::AtomicBool::new(false)));
        let (_d, l) = setup_with(64 * 4096, source);
        let background = {
            let l = l.clone();
            tokio::spawn(async move { l.fill_background(0, 16, false).await })
        };
        while lock(&l.fetching).is_empty() {
            tokio::task::yield_now().await;
        }
        let client = {
            let l = l.clone();
            tokio::spawn(async move { l.fill(2, 1).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!client.is_finished(), "waits for the background fetch");
        // A stopped restore drops its hydrator between two awaits.
        background.abort();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), client)
            .await
            .expect("the waiting read is woken")
            .unwrap()
            .unwrap();
        assert_eq!(n, 4096);
        assert!(l.is_present(2));
        assert!(
            lock(&l.fetching).is_empty(),
            "nothing left marked as fetching"
        );
    }

    #[tokio::test]
    async fn persisted_map_survives_reopen() {
        let (d, l) = setup(16 * 4096);
        l.prepare(0, 3 * 4096, Need::Read).await.unwrap();
        let (m, g) = l.checkpoint();
        l.persist(m, g).await.unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .open(d.path().join("v.img"))
            .unwrap();
        let l2 = Lazy::open(
            Arc::new(f),
            d.path().join("v.present"),
            4096,
            16 * 4096,
            Arc::new(Pattern),
        )
        .unwrap();
        assert_eq!(l2.missing(0, 16), vec![(3, 13)]);
        assert!(!l2.complete());
    }

    /// Marks made since the map was last written are kept by the journal
    /// across a crash of blockd (no map written, the Lazy dropped): the
    /// next open finds the units present and writes them into the map.
    #[tokio::test]
    async fn marks_since_the_last_map_survive_a_crash() {
        let (d, l) = setup(16 * 4096);
        l.prepare(0, 4096, Need::Read).await.unwrap();
        let (m, g) = l.checkpoint();
        l.persist(m, g).await.unwrap();
        // Filled, claimed whole and written: not in any map written.
        l.prepare(3 * 4096, 100, Need::Read).await.unwrap();
        let p = l
            .prepare(5 * 4096, 2 * 4096, Need::Overwrite)
            .await
            .unwrap();
        l.record_claims(&p);
        // A checkpoint whose map is never written keeps its marks too.
        let _ = l.checkpoint();
        let p = l.prepare(9 * 4096, 4096, Need::Overwrite).await.unwrap();
        l.record_claims(&p);
        // Claimed, its write never done (the crash came first): missing
        // again, so it reads as the snapshot, not as zeros.
        let unwritten = l.prepare(11 * 4096, 4096, Need::Overwrite).await.unwrap();
        assert!(l.is_present(11));
        drop(unwritten);
        drop(l);
        let open = || {
            let f = File::options()
                .read(true)
                .write(true)
                .open(d.path().join("v.img"))
                .unwrap();
            Lazy::open(
                Arc::new(f),
                d.path().join("v.present"),
                4096,
                16 * 4096,
                Arc::new(Pattern),
            )
            .unwrap()
        };
        let l2 = open();
        for u in [0, 3, 5, 6, 9] {
            assert!(l2.is_present(u), "unit {u} lost");
        }
        assert!(!l2.is_present(1) && !l2.is_present(10) && !l2.is_present(11));
        // Written into the map: a third open finds them without the
        // journal, which started afresh.
        drop(l2);
        for p in journal::paths(&d.path().join("v.present")) {
            std::fs::remove_file(p).unwrap();
        }
        let l3 = open();
        for u in [0, 3, 5, 6, 9] {
            assert!(l3.is_present(u), "unit {u} not in the map");
        }
    }

    #[tokio::test]
    async fn background_fills_wait_for_client_fetches() {
        use std::time::Duration;
        let (_d, l) = setup(64 * 4096);
        // Nothing in the foreground: no wait.
        tokio::time::timeout(
            Duration::from_secs(5),
            l.background_turn(Duration::from_secs(60)),
        )
        .await
        .expect("no client fetch: the hydrator goes on");
        // A client fetch in progress: the hydrator waits for its end...
        let fg = Foreground::enter(&l);
        let l2 = l.clone();
        let waiting =
            tokio::spawn(async move { l2.background_turn(Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(fg);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the client fetch ends")
            .unwrap();
        // ...but never longer than its limit.
        let _fg = Foreground::enter(&l);
        tokio::time::timeout(
            Duration::from_secs(5),
            l.background_turn(Duration::from_millis(20)),
        )
        .await
        .expect("bounded wait");
        // Holes are marked present without a fetch.
        l.holes(60, 10);
        assert_eq!(l.missing(58, 64), vec![(58, 2)]);
    }

    #[tokio::test]
    async fn background_fetches_give_way_to_a_client_fetch() {
        use std::time::Duration;
        let (_d, l) = setup_with(64 * 4096, Arc::new(SlowTail));
        let l2 = l.clone();
        let batch = tokio::spawn(async move { l2.fill_background(32, 16, true).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!batch.is_finished(), "the background fetch is under way");
        // A client read starts fetching: the batch stops and lets go of
        // its units, which a client may then fetch itself.
        assert!(l.prepare(0, 4096, Need::Read).await.unwrap().changed);
        let r = tokio::time::timeout(Duration::from_secs(5), batch)
            .await
            .expect("the batch gives way at once")
            .unwrap()
            .unwrap();
        assert_eq!(r, None);
        assert!(lock(&l.fetching).is_empty());
        assert_eq!(l.missing(32, 48), vec![(32, 16)]);
        // Without yielding (its second go), a client fetch does not stop it.
        let l2 = l.clone();
        let batch = tokio::spawn(async move { l2.fill_background(32, 16, false).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(l.prepare(4096, 4096, Need::Read).await.unwrap().changed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!batch.is_finished());
        assert_eq!(lock(&l.fetching).len(), 16);
        batch.abort();
    }

    #[test]
    fn holes_outside_the_snapshot_are_present_and_skipped() {
        // 2^20 units of 4 KiB (4 GiB); the snapshot holds two ranges.
        let (_d, l) = setup(4 << 30);
        l.present_outside([(1 << 30)..(1 << 30) + 3 * 4096, 4096..8192]);
        assert!(l.is_present(0) && !l.is_present(1) && l.is_present(2));
        assert_eq!(l.next_missing(0, u32::MAX), Some(1));
        assert_eq!(l.next_missing(2, u32::MAX), Some(1 << 18));
        assert_eq!(l.next_missing(2, 1 << 18), None);
        assert_eq!(l.next_missing(2, (1 << 18) + 1), Some(1 << 18));
        assert_eq!(l.next_missing((1 << 18) + 3, u32::MAX), None);
        assert_eq!(l.missing(0, 1 << 20), vec![(1, 1), (1 << 18, 3)]);
        assert_eq!(l.missing(1 << 18, (1 << 18) + 2), vec![(1 << 18, 2)]);
        assert!(!l.complete());
        // Idempotent, and a unit present since stays present.
        l.mark(1, true);
        l.present_outside([(1 << 30)..(1 << 30) + 3 * 4096, 4096..8192]);
        assert_eq!(l.missing(0, 1 << 20), vec![(1 << 18, 3)]);
        // Compact: full containers are runs, not 8 KiB bitmaps.
        let (m, _) = l.checkpoint();
        assert!(m.serialized_size() < 256, "{}", m.serialized_size());
        l.present_outside([]);
        assert!(l.complete());
        assert_eq!(l.next_missing(0, u32::MAX), None);
    }
}
