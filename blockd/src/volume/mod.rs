//! Volumes: one sparse data file each, served through the I/O engine.
//!
//! A volume's bytes live in `<state dir>/volumes/<name>.img`, a sparse file
//! as long as the volume. Holes are real holes: TRIM and WRITE_ZEROES punch
//! them, and block status reads them back with SEEK_DATA/SEEK_HOLE, so
//! `qemu-img map` and `nbdinfo --map` see what is allocated.
//!
//! Durability rule: a write is in the page cache when acknowledged; FUA
//! writes use RWF_DSYNC and FLUSH is fdatasync on the data file. Because all
//! connections to a volume share the one file, a FLUSH on any connection makes
//! every acknowledged write durable (which is what CAN_MULTI_CONN promises).

pub mod behind;
pub mod cow;
pub mod dirty_map;
pub mod engine;
pub mod lazy;
pub mod store;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustix::fs::{FallocateFlags, SeekFrom};

use dirty_map::DirtyMap;
use lazy::{Lazy, Need};

use tokio_util::sync::CancellationToken;

pub use crate::state::VolumeMeta;
pub use cow::FrozenImage;
pub use engine::{Engine, EngineKind};

/// One allocation run from [`Volume::allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Length in bytes.
    pub length: u64,
    /// True when the run is a hole (reads as zeros).
    pub hole: bool,
}

/// Why a zeroing request failed.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    /// FAST_ZERO was asked and zeroing would need a slow write.
    #[error("fast zeroing is not supported by the file system")]
    NotFast,
    /// Any other I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A live volume.
#[derive(Debug)]
pub struct Volume {
    name: String,
    extent_size: u64,
    labels: std::sync::Mutex<BTreeMap<String, String>>,
    created: String,
    size: AtomicU64,
    file: Arc<File>,
    engine: Arc<Engine>,
    connections: AtomicU64,
    /// Extents changed since the last successful backup.
    pub dirty: DirtyMap,
    /// Every request holds this shared; a freeze takes it exclusively, which
    /// drains in-flight I/O and holds new I/O until the freeze is done.
    pub gate: tokio::sync::RwLock<()>,
    /// Frozen images that writes must preserve (the COW guard, see [`cow`]).
    held: std::sync::RwLock<Vec<Arc<dyn FrozenImage>>>,
    /// Cancelled when the volume is deleted with `--force`: its connections end.
    pub closing: CancellationToken,
    /// Why this volume is not exported, when it is not: a restore is
    /// filling it (a lazy one serves it once attached), or one that could
    /// not go on left it incomplete. Kept in the state database too (see
    /// [`store::Store::withhold`]).
    withheld: std::sync::Mutex<Option<crate::state::Withheld>>,
    /// A stopped lazy restore is about to delete this volume: new
    /// connections are refused (see [`store::Store::refuse_connections`]).
    pub(crate) refusing: std::sync::atomic::AtomicBool,
    /// A lazy restore is filling this volume while it is served.
    lazy: std::sync::RwLock<Option<Arc<Lazy>>>,
    lazy_on: std::sync::atomic::AtomicBool,
    /// The data file opened again with `O_DIRECT`, for bulk reads that
    /// should not go through the page cache (backups); `None` where the
    /// file system refuses it.
    direct: std::sync::OnceLock<Option<Arc<File>>>,
    /// Request counters and latencies (see [`crate::metrics`]).
    pub stats: crate::metrics::IoStats,
    /// Changes to the data file finished so far (writes, trims, zeroings),
    /// counted after each lands; starts at 1, so that the first flush
    /// after an open always syncs (the page cache may hold writes of a
    /// daemon killed before it synced them).
    written: AtomicU64,
    /// The value of `written` that the last successful sync covered.
    synced: AtomicU64,
    /// The FLUSH rhythm that decides on write-behind ([`behind`]).
    behind: behind::WriteBehind,
}

/// Waits (at most half a second) for `open` connections to end, before a
/// delete or stop without `--force` decides on them. A client that has
/// just disconnected is counted until the server has finished with its
/// connection: a few milliseconds, more on a loaded host, and a script
/// that deletes right after its last client exits must not be refused
/// for that. The decision itself stays one step with the count (see
/// [`store::Store::delete`] and [`store::Store::refuse_connections`]).
pub async fn settle(open: impl Fn() -> u64) {
    for _ in 0..50 {
        if open() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Counts one open connection for as long as it lives.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Volume>);

impl ConnectionGuard {
    /// The volume this connection holds.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.0
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Volume {
    /// Wraps an open data file.
    pub fn new(meta: VolumeMeta, file: File, dirty: DirtyMap, engine: Arc<Engine>) -> Self {
        Self {
            size: AtomicU64::new(meta.size),
            name: meta.name,
            extent_size: meta.extent_size,
            labels: std::sync::Mutex::new(meta.labels),
            created: meta.created,
            withheld: std::sync::Mutex::new(meta.withheld),
            file: Arc::new(file),
            engine,
            connections: AtomicU64::new(0),
            dirty,
            gate: tokio::sync::RwLock::new(()),
            held: std::sync::RwLock::new(Vec::new()),
            closing: CancellationToken::new(),
            refusing: std::sync::atomic::AtomicBool::new(false),
            lazy: std::sync::RwLock::new(None),
            lazy_on: std::sync::atomic::AtomicBool::new(false),
            direct: std::sync::OnceLock::new(),
            stats: crate::metrics::IoStats::default(),
            written: AtomicU64::new(1),
            synced: AtomicU64::new(0),
            behind: behind::WriteBehind::default(),
        }
    }

    /// Counts a change to the data file as finished: called after it
    /// lands (or fails), never before, so a sync that covers the count
    /// covers the change.
    fn wrote(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    /// The count of changes a flush must make durable, or `None` when the
    /// last successful sync already covered every finished change: then
    /// a FLUSH has nothing to do. PostgreSQL over ext4 sends many FLUSHes
    /// with no write between them (kernel-notes/README.md, "Flush and
    /// FUA"); qemu skips them the same way.
    fn sync_due(&self) -> Option<u64> {
        let target = self.written.load(Ordering::Acquire);
        (self.synced.load(Ordering::Acquire) < target).then_some(target)
    }

    /// Records that a sync begun when `target` changes had finished has
    /// succeeded.
    fn synced_up_to(&self, target: u64) {
        self.synced.fetch_max(target, Ordering::AcqRel);
    }

    /// True when every page of `[offset, offset + len)` of the data file
    /// is in the page cache, by `cachestat(2)` (which reads nothing and
    /// starts no read-ahead). False where the kernel lacks it.
    pub(crate) fn all_cached(&self, offset: u64, len: u64) -> bool {
        let page = rustix::param::page_size() as u64;
        cachestat(&self.file, offset, len).is_some_and(|s| s.cache >= len.div_ceil(page))
    }

    /// The data file opened for reading with `O_DIRECT` (once, on first
    /// use), or `None` where the file system does not do direct I/O
    /// (tmpfs before Linux 6.6, some FUSE file systems). Opened through
    /// `/proc/self/fd`, so it is the same file even if it was renamed.
    pub(crate) fn direct_reader(&self) -> Option<Arc<File>> {
        self.direct
            .get_or_init(|| {
                use std::os::fd::AsRawFd;
                use std::os::unix::fs::OpenOptionsExt;
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                match std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                    .open(path)
                {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) => {
                        tracing::debug!(volume = %self.name, error = %e, "no direct I/O on this volume's file system: bulk reads go through the page cache");
                        None
                    }
                }
            })
            .clone()
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }

    /// Extent size in bytes.
    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    fn labels(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.labels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the labels (the caller has stored them).
    pub(crate) fn set_labels(&self, labels: BTreeMap<String, String>) {
        *self.labels() = labels;
    }

    /// Metadata snapshot.
    pub fn meta(&self) -> VolumeMeta {
        VolumeMeta {
            name: self.name.clone(),
            size: self.size(),
            extent_size: self.extent_size,
            labels: self.labels().clone(),
            created: self.created.clone(),
            withheld: self.withheld_state(),
        }
    }

    /// Why this volume is withheld, whether or not a lazy restore serves it
    /// meanwhile.
    pub fn withheld_state(&self) -> Option<crate::state::Withheld> {
        self.withheld
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sets or clears (`None`) why this volume is withheld; the caller has
    /// stored it.
    pub(crate) fn set_withheld(&self, w: Option<crate::state::Withheld>) {
        *self
            .withheld
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = w;
    }

    /// Why the volume is not exported now, or `None` when it is: a volume
    /// a lazy restore is filling is served while the restore is attached.
    pub fn unexported(&self) -> Option<String> {
        if self.is_lazy() {
            return None;
        }
        self.withheld_state().map(|w| w.reason)
    }

    /// Why this volume is no source for snapshots or backups, if it is
    /// not: a restore fills it, or one left it incomplete.
    pub fn filling(&self) -> Option<String> {
        match self.withheld_state() {
            Some(w) => Some(w.reason),
            None => self
                .is_lazy()
                .then(|| "a lazy restore is still filling it".to_string()),
        }
    }

    /// Open NBD connections.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Registers an open connection.
    pub fn connect(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(self.clone())
    }

    /// The lazy restore filling this volume, if one is.
    pub fn lazy(&self) -> Option<Arc<Lazy>> {
        if !self.lazy_on.load(Ordering::Acquire) {
            return None;
        }
        self.lazy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// True while a lazy restore fills this volume (the inline fast paths
    /// are then off).
    pub fn is_lazy(&self) -> bool {
        self.lazy_on.load(Ordering::Acquire)
    }

    /// Starts serving this volume lazily from `source`, with the present
    /// map at `path` (see [`lazy`]).
    ///
    /// # Errors
    /// A damaged present map.
    pub fn make_lazy(
        &self,
        path: std::path::PathBuf,
        unit: u64,
        source: Arc<dyn lazy::Source>,
    ) -> io::Result<Arc<Lazy>> {
        let l = Arc::new(Lazy::open(
            self.file.clone(),
            path,
            unit,
            self.size(),
            source,
        )?);
        *self
            .lazy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(l.clone());
        self.lazy_on.store(true, Ordering::Release);
        Ok(l)
    }

    /// Ends lazy serving: every unit is present.
    pub fn end_lazy(&self) {
        // The fills were never counted: the next flush syncs.
        self.wrote();
        self.lazy_on.store(false, Ordering::Release);
        *self
            .lazy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Makes `offset..offset + len` ready for `need` on a lazily restored
    /// volume (see [`Lazy::prepare`]).
    async fn prepare(&self, offset: u64, len: u64, need: Need) -> io::Result<lazy::Prepared> {
        match self.lazy() {
            Some(l) => l.prepare(offset, len, need).await.inspect_err(|e| {
                tracing::warn!(volume = %self.name, offset, len, error = %e, "lazy fetch failed");
            }),
            None => Ok(lazy::Prepared::default()),
        }
    }

    /// Records the units `p` claimed, their overwrite done.
    fn claims_written(&self, p: &lazy::Prepared) {
        if !p.has_claims() {
            return;
        }
        if let Some(l) = self.lazy() {
            l.record_claims(p);
        }
    }

    /// Bytes allocated on disk.
    pub fn allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Fills `buf[header..]` from `offset` (the first `header` bytes are room
    /// for the reply header, so the data is never copied again).
    pub async fn read(&self, buf: Vec<u8>, header: usize, offset: u64) -> io::Result<Vec<u8>> {
        self.prepare(offset, (buf.len() - header) as u64, Need::Read)
            .await?;
        match self.read_cached(buf, header, offset) {
            Ok(buf) => Ok(buf),
            Err((buf, done)) => {
                self.engine
                    .read_at(&self.file, buf, header + done, offset + done as u64)
                    .await
            }
        }
    }

    /// Reads from the page cache without blocking (`RWF_NOWAIT`), the fast
    /// path for hot data: no thread hop at all. On a cache miss returns the
    /// buffer and how many bytes were read, for the engine to finish.
    pub fn read_cached(
        &self,
        mut buf: Vec<u8>,
        start: usize,
        offset: u64,
    ) -> Result<Vec<u8>, (Vec<u8>, usize)> {
        let mut done = 0;
        while start + done < buf.len() {
            let slice = &mut [io::IoSliceMut::new(&mut buf[start + done..])];
            match rustix::io::preadv2(
                &*self.file,
                slice,
                offset + done as u64,
                rustix::io::ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => {
                    buf[start + done..].fill(0);
                    return Ok(buf);
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return Err((buf, done)),
            }
        }
        Ok(buf)
    }

    /// Writes a small, non-FUA write straight into the page cache from the
    /// calling thread. Most file systems (ext4 among them) have no
    /// non-blocking buffered write, so io_uring would hand such a write to a
    /// kernel worker thread; the copy costs less than those two thread hops.
    /// May block briefly under dirty-page throttling, like any writer.
    pub fn write_cached(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.dirty.mark(offset, data.len() as u64)?;
        self.guard(offset, data.len() as u64)?;
        let r = self.write_steps(offset, data);
        self.wrote();
        r
    }

    /// [`Self::write_cached`] for a payload waiting in a pipe (see
    /// `nbd::splice`): its `len` bytes move from `pipe` into the data file
    /// with `splice`, and the copy into the page cache is the only one. On
    /// an error the pipe may still hold part of the payload.
    pub fn write_cached_from_pipe(
        &self,
        offset: u64,
        len: usize,
        pipe: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        self.dirty.mark(offset, len as u64)?;
        self.guard(offset, len as u64)?;
        let r = self.splice_steps(offset, len, pipe);
        self.wrote();
        r
    }

    fn splice_steps(
        &self,
        offset: u64,
        len: usize,
        pipe: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        use rustix::io::Errno;
        use rustix::pipe::SpliceFlags;
        let mut pos = 0;
        while pos < len {
            let mut at = offset + pos as u64;
            // In steps, as `write_steps` writes.
            let step = engine::write_step(at, len - pos);
            match rustix::pipe::splice(
                pipe,
                None,
                &*self.file,
                Some(&mut at),
                step,
                SpliceFlags::MOVE,
            ) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => pos += n,
                Err(Errno::INTR) => {}
                // A file system that takes no splice: the rest through a
                // buffer.
                Err(Errno::INVAL) => {
                    let mut rest = vec![0u8; len - pos];
                    let mut got = 0;
                    while got < rest.len() {
                        match rustix::io::read(pipe, &mut rest[got..]) {
                            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                            Ok(n) => got += n,
                            Err(Errno::INTR) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    return self.write_steps(offset + pos as u64, &rest);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// True when a write could need copies for a held frozen image: then
    /// small writes are worth gathering for [`Self::write_many_cached`].
    pub fn holds_frozen_images(&self) -> bool {
        !self
            .held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    /// [`Self::write_cached`] for several writes, whose copy-on-write
    /// copies are made together (see [`Self::guard_many`]) before any of
    /// them lands. `done` gets each write's result (by its index in
    /// `writes`) as soon as that write is in the page cache, so its reply
    /// need not wait for the rest; when the copies fail, every write fails
    /// with that error.
    pub fn write_many_cached(
        &self,
        writes: &[(u64, &[u8])],
        mut done: impl FnMut(usize, io::Result<()>),
    ) {
        let ranges: Vec<(u64, u64)> = writes.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
        let marked = ranges
            .iter()
            .try_for_each(|&(offset, len)| self.dirty.mark(offset, len));
        if let Err(e) = marked.and_then(|()| self.guard_many(&ranges)) {
            for i in 0..writes.len() {
                done(i, Err(io::Error::new(e.kind(), e.to_string())));
            }
            return;
        }
        for (i, (offset, data)) in writes.iter().enumerate() {
            let r = self.write_steps(*offset, data);
            // Before the reply: a FLUSH that follows it must sync this write.
            self.wrote();
            done(i, r);
        }
    }

    fn write_steps(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // In steps, as the engine writes (see `engine::write_step`).
        let mut pos = 0;
        while pos < data.len() {
            let at = offset + pos as u64;
            let end = pos + engine::write_step(at, data.len() - pos);
            self.file.write_all_at(&data[pos..end], at)?;
            pos = end;
        }
        Ok(())
    }

    /// Writes `parts`, back to back, at `offset` with one `pwritev` (as
    /// many as partial writes need) from the calling thread: no copy into
    /// one buffer. For restores, which fill a new volume from verified
    /// chunks.
    pub fn write_parts_cached(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        self.dirty.mark(offset, total as u64)?;
        self.guard(offset, total as u64)?;
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        let mut at = offset;
        let r = loop {
            if bufs.is_empty() {
                break Ok(());
            }
            match rustix::io::pwritev(&*self.file, bufs, at) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    at += n as u64;
                    io::IoSlice::advance_slices(&mut bufs, n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.wrote();
        r
    }

    /// Writes `buf[start..]` at `offset`; `fua` makes it durable first.
    /// Hands the buffer back for reuse.
    pub async fn write(
        &self,
        offset: u64,
        buf: Vec<u8>,
        start: usize,
        fua: bool,
    ) -> io::Result<Vec<u8>> {
        let len = (buf.len() - start) as u64;
        // Marked before any unit is claimed: a failure here leaves none
        // claimed and not written.
        self.dirty.mark(offset, len)?;
        let prepared = self.prepare(offset, len, Need::Overwrite).await?;
        self.guard(offset, len)?;
        let written = self
            .engine
            .write_at(&self.file, buf, start, offset, fua)
            .await;
        self.wrote();
        let buf = written?;
        self.claims_written(&prepared);
        if fua {
            self.tell_flushed();
        }
        if fua && prepared.changed {
            // ... nor the record that its units are present.
            self.flush().await?;
        }
        Ok(buf)
    }

    /// Makes every acknowledged write durable. The copies held snapshots
    /// made are not synced here: the daemon syncs them within its
    /// interval once a FLUSH has asked for durability, a marker standing
    /// for them meanwhile (see [`crate::snapshot::store`]).
    pub async fn flush(&self) -> io::Result<()> {
        let lazy = self.lazy();
        // A lazy restore's fills are not counted: its flushes always sync.
        let target = self.written.load(Ordering::Acquire);
        if lazy.is_none() && self.sync_due().is_none() {
            self.flushed();
            return Ok(());
        }
        // The map is taken before the sync: every unit it records present
        // was written before the sync began.
        let map = lazy.as_ref().map(|l| l.checkpoint());
        self.engine.sync(&self.file).await?;
        if let (Some(l), Some((map, generation))) = (lazy, map) {
            l.persist(map, generation).await?;
        } else {
            self.synced_up_to(target);
            self.flushed();
        }
        Ok(())
    }

    /// [`Self::flush`] on the calling thread, for a caller that may block
    /// for the length of an fdatasync. `None` while a lazy restore runs
    /// (its present map is persisted on the async path).
    pub fn flush_blocking(&self) -> Option<io::Result<()>> {
        if self.is_lazy() {
            return None;
        }
        let Some(target) = self.sync_due() else {
            self.flushed();
            return Some(Ok(()));
        };
        let r = self.file.sync_data();
        if r.is_ok() {
            self.synced_up_to(target);
            self.flushed();
        }
        Some(r)
    }

    /// After a FLUSH: write-behind's rhythm, and the held images, whose
    /// copies are then due.
    fn flushed(&self) {
        self.behind.flushed();
        self.tell_flushed();
    }

    /// True when the writeback of a small write of `len` bytes that just
    /// landed should start as soon as it is answered: the volume is
    /// committing ([`behind`]). Never for a lazily restored volume.
    pub fn write_behind(&self, len: u64) -> bool {
        !self.is_lazy() && self.behind.wants(len)
    }

    /// Starts the writeback of `ranges` of the data file without waiting
    /// for it (see [`behind`]).
    pub fn start_writeback(&self, ranges: &[(u64, u64)]) {
        behind::start(&self.file, ranges);
    }

    /// Discards a range: it becomes a hole and reads as zeros.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.dirty.mark(offset, len)?;
        let prepared = self.prepare(offset, len, Need::Overwrite).await?;
        self.guard(offset, len)?;
        let mode = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let punched = self.engine.fallocate(&self.file, mode, offset, len).await;
        self.wrote();
        match punched {
            Ok(()) => {}
            // TRIM is advisory: a file system without hole punching keeps
            // the data (a claimed unit's hole: after a TRIM a client may
            // assume nothing of the range).
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.claims_written(&prepared);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.claims_written(&prepared);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Zeroes a range: punches a hole, or with `no_hole` zeroes in place
    /// keeping the blocks allocated. With `fast`, fails with
    /// [`ZeroError::NotFast`] rather than writing zeros by hand.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), ZeroError> {
        if len == 0 {
            return Ok(());
        }
        // A lazily restored range not all present cannot be zeroed fast:
        // its missing units would have to be claimed, and a FAST_ZERO that
        // fails must leave the contents as they were (the snapshot's).
        if fast && self.lazy().is_some_and(|l| !l.all_present(offset, len)) {
            return Err(ZeroError::NotFast);
        }
        // FAST_ZERO may fail without touching data; marking first is still
        // safe (a spurious dirty extent only costs a re-read).
        self.dirty.mark(offset, len)?;
        let prepared = self.prepare(offset, len, Need::Overwrite).await?;
        self.guard(offset, len)?;
        let mode = if no_hole {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        };
        let zeroed = self.engine.fallocate(&self.file, mode, offset, len).await;
        self.wrote();
        match zeroed {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                if fast {
                    return Err(ZeroError::NotFast);
                }
                let r = self.write_zero_buffers(offset, len).await;
                self.wrote();
                r?;
            }
            Err(e) => return Err(e.into()),
        }
        self.claims_written(&prepared);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const STEP: u64 = 1 << 20;
        let end = offset + len;
        while offset < end {
            let n = STEP.min(end - offset);
            // n <= 1 MiB.
            self.write(offset, vec![0; usize::try_from(n).unwrap_or(0)], 0, false)
                .await
                .map(drop)?;
            offset += n;
        }
        Ok(())
    }

    /// Hints the kernel to read a range ahead (NBD CACHE); on a lazily
    /// restored volume, fetches what is missing first.
    pub async fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.prepare(offset, len, Need::Read).await?;
        let len = std::num::NonZeroU64::new(len);
        rustix::fs::fadvise(&*self.file, offset, len, rustix::fs::Advice::WillNeed)?;
        Ok(())
    }

    /// Drops clean cached pages of a range that a bulk writer (a full
    /// restore) has made durable and will not read again: the page cache
    /// then recycles a few pages instead of growing through the whole
    /// volume (kernel-notes/README.md, "Bulk transfers and the page cache").
    /// Best effort; dirty pages are left.
    pub fn drop_cached(&self, offset: u64, len: u64) {
        let len = std::num::NonZeroU64::new(len);
        let _ = rustix::fs::fadvise(&*self.file, offset, len, rustix::fs::Advice::DontNeed);
    }

    /// The first byte at or after `from` that may hold data (SEEK_DATA;
    /// `from` itself on a lazy volume, whose holes may be units not
    /// fetched yet); `None` past the last data.
    pub fn next_data(&self, from: u64) -> io::Result<Option<u64>> {
        if from >= self.size() {
            return Ok(None);
        }
        if self.is_lazy() {
            return Ok(Some(from));
        }
        match rustix::fs::seek(&*self.file, SeekFrom::Data(from)) {
            Ok(d) => Ok(Some(d)),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Allocation of `offset..offset + len` as alternating data and hole
    /// runs (at most `max_runs`; the last run may end early, never late).
    pub fn allocation(&self, offset: u64, len: u64, max_runs: usize) -> io::Result<Vec<Run>> {
        let end = offset.saturating_add(len).min(self.size());
        if self.is_lazy() {
            // Holes in the data file may be units not fetched yet: all data.
            return Ok(vec![Run {
                length: end.saturating_sub(offset),
                hole: false,
            }]);
        }
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max_runs {
            let data = match rustix::fs::seek(&*self.file, SeekFrom::Data(pos)) {
                Ok(d) => d,
                // No data at or after `pos`: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let stop = data.min(end);
                runs.push(Run {
                    length: stop - pos,
                    hole: true,
                });
                pos = stop;
                continue;
            }
            let hole = match rustix::fs::seek(&*self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                Err(rustix::io::Errno::NXIO) => end,
                Err(e) => return Err(e.into()),
            };
            let stop = hole.max(pos + 1).min(end);
            runs.push(Run {
                length: stop - pos,
                hole: false,
            });
            pos = stop;
        }
        Ok(runs)
    }

    /// Grows the data file; shrinking is refused by the caller.
    pub fn grow(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)?;
        self.file.sync_all()?;
        self.size.store(size, Ordering::SeqCst);
        Ok(())
    }

    /// fdatasync of the data file, covering every change finished before
    /// it (a FLUSH after it with nothing new has nothing to do). Settling
    /// the dirty map uses it.
    pub fn sync_data(&self) -> io::Result<()> {
        let target = self.written.load(Ordering::Acquire);
        self.file.sync_data()?;
        self.synced_up_to(target);
        Ok(())
    }

    /// fsync of data and metadata (and the present map of a lazy
    /// restore: a clean shutdown keeps every acknowledged write), used at
    /// shutdown; the COW data of held snapshots first, so that their
    /// markers go and a reboot finds them good.
    pub fn sync_all(&self) -> io::Result<()> {
        for s in self.held_images() {
            s.sync()?;
        }
        let lazy = self.lazy();
        let map = lazy.as_ref().map(|l| l.checkpoint());
        self.file.sync_all()?;
        if let (Some(l), Some((map, generation))) = (lazy, map) {
            l.persist_blocking(&map, generation)?;
        }
        Ok(())
    }
}

/// What `cachestat(2)` counts of a file range, in pages.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct CacheStat {
    /// Pages in the page cache.
    pub cache: u64,
    /// Of those, dirty ones not yet handed to writeback.
    pub dirty: u64,
    /// Pages under writeback.
    pub writeback: u64,
    /// Pages evicted from the cache.
    pub evicted: u64,
    /// Of those, evicted recently.
    pub recently_evicted: u64,
}

/// The page-cache state of `[offset, offset + len)` of `file`, from
/// `cachestat(2)` (Linux 6.5; syscall 451 on every architecture); `None`
/// where the kernel lacks it.
pub(crate) fn cachestat(file: &File, offset: u64, len: u64) -> Option<CacheStat> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    let range = Range { off: offset, len };
    let mut stat = CacheStat::default();
    // SAFETY: both pointers are to live values of the layouts the kernel
    // reads and writes (include/uapi/linux/mman.h); the descriptor is
    // borrowed from `file` for the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(451, file.as_raw_fd(), &raw const range, &raw mut stat, 0u32) };
    (r == 0).then_some(stat)
}

/// A volume on a file of `size` bytes in `dir`, on the thread-pool
/// engine, for unit tests.
#[cfg(test)]
pub(crate) fn scratch(dir: &std::path::Path, size: u64, extent_size: u64) -> Volume {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("v"))
        .unwrap();
    file.set_len(size).unwrap();
    let meta = VolumeMeta {
        name: "v".into(),
        size,
        extent_size,
        labels: BTreeMap::new(),
        created: String::new(),
        withheld: None,
    };
    let dirty = DirtyMap::create(&dir.join("v.dirty"), extent_size).unwrap();
    let engine = Arc::new(engine::Engine::new(engine::EngineKind::Threads).unwrap());
    Volume::new(meta, file, dirty, engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every change to the data file makes the next flush sync; a flush
    /// with no change since the last sync has nothing to do; a volume
    /// just opened always syncs first.
    #[tokio::test]
    async fn a_flush_syncs_exactly_when_something_changed() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let es = 4096u64;
        let v = scratch(dir.path(), 64 * es, es);
        assert!(v.sync_due().is_some(), "a volume just opened syncs first");
        v.flush().await.unwrap();
        assert!(v.sync_due().is_none());
        assert!(matches!(v.flush_blocking(), Some(Ok(()))));

        const CHANGES: [&str; 7] = [
            "write_cached",
            "write_many_cached",
            "write_parts_cached",
            "write",
            "trim",
            "write_zeroes",
            "write_zeroes (hole)",
        ];
        async fn change(v: &Volume, what: &str, es: u64) {
            match what {
                "write_cached" => v.write_cached(0, &[1; 4096]).unwrap(),
                "write_many_cached" => {
                    v.write_many_cached(&[(es, &[2; 512][..])], |_, r| r.unwrap());
                }
                "write_parts_cached" => v
                    .write_parts_cached(2 * es, &[&[3; 100], &[4; 100]])
                    .unwrap(),
                "write" => drop(v.write(3 * es, vec![5; 4096], 0, false).await.unwrap()),
                "trim" => v.trim(0, es, false).await.unwrap(),
                "write_zeroes" => v.write_zeroes(es, es, true, false, false).await.unwrap(),
                _ => v.write_zeroes(es, es, false, false, false).await.unwrap(),
            }
        }
        for what in CHANGES {
            change(&v, what, es).await;
            assert!(v.sync_due().is_some(), "{what}: the next flush must sync");
            v.flush().await.unwrap();
            assert!(v.sync_due().is_none(), "{what}: synced");
            change(&v, what, es).await;
            assert!(
                v.sync_due().is_some(),
                "{what}: the next blocking flush must sync"
            );
            assert!(matches!(v.flush_blocking(), Some(Ok(()))));
            assert!(
                v.sync_due().is_none(),
                "{what}: synced on the calling thread"
            );
        }
    }
    /// Pages of `file` in `[offset, offset + len)` that are dirty in the
    /// page cache (not yet handed to writeback); `None` where the kernel
    /// lacks `cachestat(2)`.
    pub(crate) fn dirty_pages(file: &File, offset: u64, len: u64) -> Option<u64> {
        cachestat(file, offset, len).map(|s| s.dirty)
    }

    /// Write-behind: after a FLUSH, a small write's writeback starts at
    /// once (its pages leave the dirty state); with no FLUSH before, or
    /// past the budget, the write stays in the page cache as any other.
    #[tokio::test]
    async fn writeback_starts_early_only_while_the_volume_commits() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let es = 4096u64;
        let v = scratch(dir.path(), 1024 * es, es);
        v.write_cached(0, &[1; 4096]).unwrap();
        let Some(dirty) = dirty_pages(&v.file, 0, es) else {
            eprintln!("SKIPPED: no cachestat(2) in this kernel");
            return;
        };
        assert_eq!(dirty, 1, "a buffered write leaves its page dirty");
        assert!(!v.write_behind(es), "no FLUSH yet: no write-behind");

        v.flush().await.unwrap();
        v.write_cached(es, &[2; 4096]).unwrap();
        assert!(v.write_behind(es), "just after a FLUSH");
        v.start_writeback(&[(es, es)]);
        assert_eq!(dirty_pages(&v.file, es, es), Some(0), "writeback started");

        assert!(
            !v.write_behind(behind::BUDGET),
            "over the budget since the FLUSH"
        );
        v.write_cached(2 * es, &[3; 4096]).unwrap();
        assert_eq!(dirty_pages(&v.file, 2 * es, es), Some(1));
    }
}
