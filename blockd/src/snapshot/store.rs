//! One held snapshot of one volume: its change set, and the copy-on-write
//! side data that keeps its frozen image intact while the volume changes.
//!
//! Files under `<state dir>/snapshots/<volume>/<snapshot>/`:
//! ```text
//! changes.dirty  the change set frozen at the snapshot (dirty-map format)
//! cow.data       preserved extents; slot k is at byte k * extent_size;
//!                past the last slot, zeros written ahead of the copies
//!                (see `Area`) or a spare area's old contents, never read
//! cow.index      16-byte records, appended as extents are preserved:
//!                  extent bits 0-31 u32 LE | slot u32 LE | CRC-32 u32 LE |
//!                  extent bits 32-63 u32 LE. The CRC covers bytes 0-7, and
//!                  bytes 12-15 too when they are not zero, so a record of
//!                  an extent below 2^32 is the same as before 64-bit
//!                  extent numbers (when these bytes were reserved, zero).
//!                The first record that fails its CRC ends the list: a
//!                torn tail, or the zeros past the last record of a file
//!                allocated ahead of its records (see `Records`).
//! meta.json      the snapshot record; written last at creation: the
//!                commit point (a directory without it is discarded)
//! cow.unsynced   present (durably, holding the kernel's boot id) while
//!                COW data may not be on disk
//! ```
//! A deleted snapshot's directory is renamed to `.removed.<name>.<pid>.<n>`
//! before it is emptied; one found at start is swept (see
//! [`SnapshotStore::remove`]).
//!
//! `<state dir>/snapshots/<volume>/.cow.spare` is the `cow.data` of a
//! removed snapshot, kept for the volume's next snapshot, which takes it
//! as its own `cow.data` (see [`SnapshotStore::prepare`]): copies then
//! overwrite blocks the file system has already allocated, in pages the
//! page cache may still hold, instead of growing a new file into fresh
//! memory (kernel-notes/README.md, "Copy-on-write"). Its old contents are
//! never read: a slot is read only through a `cow.index` record, and a
//! record is written after its slot's data. A volume keeps at most one
//! (no larger than the frozen image it served), and it goes with the
//! volume's other snapshot files when the volume is deleted.
//!
//! Crash rule (process crash, `kill -9`): before a write overwrites an
//! extent the frozen image still needs, the old contents are written to
//! `cow.data` and then the record to `cow.index`; only then does the write
//! proceed. The page cache keeps those writes across a crash of blockd, so
//! after restart every overwritten extent is found in the index.
//!
//! A host crash loses the page cache, and writeback may have stored an
//! overwrite without the copy it displaced: the frozen image would then
//! read data written after the freeze. So a copy made while there is no
//! `cow.unsynced` first creates it durably; the daemon syncs the copies at
//! an interval (`snapshot_sync`, 1 s by default) once a FLUSH or FUA write
//! has reached the volume, or once the oldest is [`COPIES_KEPT`] old
//! ([`SnapshotStore::sync_due`]), and at a clean shutdown; a sync that
//! leaves no copy unsynced removes the marker. Found at start with
//! another boot id, it means the host went down with copies not on disk:
//! the snapshot is marked damaged (persisted in `meta.json`), listed as
//! such, and refused for export and backup, never read as if it were
//! good. Found with this boot id, only blockd stopped: the page cache
//! still holds every copy.
//!
//! A client's FLUSH syncs the volume, not the copies: the marker already
//! keeps a snapshot whose copies a crash lost from being read, so
//! syncing them with each FLUSH would only move the moment the marker
//! goes, and it put a journal commit of the COW files (they grow) on
//! every commit of a database while a snapshot was held: PostgreSQL ran
//! at 0.76-0.85x its speed through a held snapshot, 0.92-0.96x with the
//! copies synced at intervals (kernel-notes, "Snapshots: the freeze, COW
//! ordering").

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::volume::dirty_map::{self, ChangeSet};
use crate::volume::FrozenImage;

const RECORD_LEN: usize = 16;
/// Present while COW data may not be on disk (see the module docs).
const UNSYNCED: &str = "cow.unsynced";
/// How often the daemon syncs the copies of held snapshots when the
/// `snapshot_sync` setting does not say.
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long copies stay unsynced at most when no FLUSH asks for them:
/// the kernel's default `dirty_expire_centisecs`, after which it writes
/// back the overwrites that displaced them anyway.
pub const COPIES_KEPT: std::time::Duration = std::time::Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One `cow.index` record (see the module docs).
fn encode_record(extent: u64, slot: u32) -> [u8; RECORD_LEN] {
    let mut rec = [0u8; RECORD_LEN];
    // Low and high halves of the extent number.
    let e = extent.to_le_bytes();
    rec[..4].copy_from_slice(&e[..4]);
    rec[4..8].copy_from_slice(&slot.to_le_bytes());
    rec[12..16].copy_from_slice(&e[4..]);
    let crc = record_crc(&rec);
    rec[8..12].copy_from_slice(&crc.to_le_bytes());
    rec
}

/// (extent, slot) of a record, or `None` when its CRC does not match.
fn decode_record(rec: &[u8]) -> Option<(u64, u32)> {
    let u32_at = |at: usize| u32::from_le_bytes([rec[at], rec[at + 1], rec[at + 2], rec[at + 3]]);
    if rec.len() != RECORD_LEN || u32_at(8) != record_crc(rec) {
        return None;
    }
    Some((
        u64::from(u32_at(12)) << 32 | u64::from(u32_at(0)),
        u32_at(4),
    ))
}

fn record_crc(rec: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[..8]);
    if rec[12..16] != [0; 4] {
        h.update(&rec[12..16]);
    }
    h.finalize()
}

/// The persisted record of a snapshot (`meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// Volume name.
    pub volume: String,
    /// Snapshot name (unique per volume).
    pub name: String,
    /// Group id shared by the members of one group snapshot.
    pub group: Option<String>,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Volume size at the freeze.
    pub size: u64,
    /// Extent size of the volume.
    pub extent_size: u64,
    /// How long I/O was held for the freeze, in microseconds.
    pub pause_us: u64,
    /// False when the change set is unknown (tracking was lost).
    pub changes_known: bool,
    /// Extents in the change set.
    pub changed_extents: u64,
    /// Output of the pre-exec hook, if any.
    pub pre_exec: Option<HookRecord>,
    /// Output of the post-exec hook, if any.
    pub post_exec: Option<HookRecord>,
    /// Why the frozen image cannot be trusted (a host crash with
    /// copy-on-write data not on disk); `None` when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
    /// The change set was handed on to a later backup's freeze, which holds
    /// a copy of it: deleting this snapshot merges nothing back (the
    /// backup stored those changes, or merged them back itself when it
    /// failed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_on: bool,
}

/// What an exec hook did, as the snapshot's metadata keeps it and the API
/// reports it (one type, so the stored form and the answer cannot drift).
pub type HookRecord = blockd_api::Hook;

/// The preserved extents of a snapshot: a roaring bitmap of them, which
/// answers the guard's membership test (once per written extent after a
/// freeze) from one or two cache lines and lists the preserved extents of
/// a range in order without visiting the rest; and a hash map from each to
/// its slot in `cow.data`, needed only to read a preserved extent back.
/// The map was a B-tree, ordered for the range queries the bitmap now
/// answers: its insert, five or six nodes deep, was 3% of the CPU of the
/// writes that take copies (kernel-notes/README.md, "Copy-on-write").
///
/// It also keeps the state of the area's preparation (see [`Area`]): the
/// one lock orders slot allocation against it.
#[derive(Debug, Default)]
struct CowIndex {
    slots: rustc_hash::FxHashMap<u64, u32>,
    members: roaring::RoaringTreemap,
    /// `cow.data` below this offset is written (zeros, or copies, or a
    /// spare's old contents): copies into it take no fresh pages or blocks.
    prepared: u64,
    /// The range the preparer is writing zeros into now: a copy whose
    /// slots fall in it waits (see [`Area::prepare`]).
    zeroing: Option<std::ops::Range<u64>>,
    /// A preparer thread is running (or about to).
    preparing: bool,
    /// Where the copies ended when a preparation was last declined for
    /// want of free space: the space is looked at again 16 MiB later.
    declined_at: Option<u64>,
    /// Where the records go: `cow.index` mapped in windows.
    records: Records,
}

impl From<rustc_hash::FxHashMap<u64, u32>> for CowIndex {
    fn from(slots: rustc_hash::FxHashMap<u64, u32>) -> Self {
        let members = slots.keys().copied().collect();
        Self {
            slots,
            members,
            ..Self::default()
        }
    }
}

/// How far ahead of the copies `cow.data` is prepared at most.
const PREPARE_AHEAD: u64 = 32 << 20;
/// ... and at least (see [`prepare_ahead_of`]).
const PREPARE_FIRST: u64 = 1 << 20;
/// After a preparation was declined for want of space, how many more
/// bytes of copies before free space is looked at again.
const PREPARE_RECHECK: u64 = 16 << 20;
/// No area is prepared on a file system with less free space than this:
/// there the zeros could take room that the volume's own writes and the
/// copies need.
const PREPARE_MIN_FREE: u64 = 1 << 30;
/// How far past `used` bytes of copies the area is prepared: as far as
/// the copies have come, between [`PREPARE_FIRST`] and [`PREPARE_AHEAD`].
/// A snapshot that takes a few copies costs a few zeros, and one that
/// takes many soon has the whole lead.
fn prepare_ahead_of(used: u64) -> u64 {
    used.clamp(PREPARE_FIRST, PREPARE_AHEAD)
}

/// The size of each write of zeros: small, like the copies' own writes,
/// so the area's page-cache folios stay small (see kernel-notes,
/// "Large folios and small writes").
const PREPARE_STEP: usize = 16 << 10;

/// The index and what a thread preparing `cow.data` shares with the
/// copies.
///
/// A new `cow.data` grows into fresh page-cache pages and fresh blocks,
/// and the connection thread that makes the copies paid for both: a
/// volume's first snapshot, with no spare area to reuse, ran 4k random
/// writes slowest of all (kernel-notes/README.md, "Copy-on-write"). So a
/// thread of its own writes zeros ahead of the copies, up to
/// [`prepare_ahead_of`] past the last slot (1 to 32 MiB) and never past
/// the frozen image's size. The copies then overwrite cached pages, as in
/// a spare area. It is started by a copy that comes within half that
/// lead of the prepared end: a snapshot that takes no copies writes
/// nothing, and the copies wake it once per half lead (16 MiB once
/// they have come 32 MiB), not once per batch. On a file system with
/// less than [`PREPARE_MIN_FREE`] free, nothing is prepared: the copies
/// grow the file as they go.
///
/// The zeros never land on a copy: under the index lock the preparer
/// claims a range that starts at or past the end of the allocated slots
/// (`zeroing`), and a copy whose slots would fall in a claimed range
/// waits for it (`zeroed`). Slot contents are read only through index
/// records, so the zeros past the last slot are never read.
#[derive(Debug)]
struct Area {
    index: Mutex<CowIndex>,
    /// Notified when a claimed range is written and when the preparer stops.
    zeroed: std::sync::Condvar,
}

impl Area {
    /// The area of a `cow.data` whose present length counts as prepared
    /// (a new file's 0, a spare's or a loaded snapshot's whole length).
    fn new(index: CowIndex, data: &File) -> std::sync::Arc<Self> {
        let prepared = data.metadata().map_or(0, |m| m.len());
        std::sync::Arc::new(Self {
            index: Mutex::new(CowIndex { prepared, ..index }),
            zeroed: std::sync::Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CowIndex> {
        lock(&self.index)
    }

    /// The index once `busy` no longer holds of it, waiting on `zeroed`.
    fn wait_until<'a>(
        &self,
        ix: std::sync::MutexGuard<'a, CowIndex>,
        busy: impl FnMut(&mut CowIndex) -> bool,
    ) -> std::sync::MutexGuard<'a, CowIndex> {
        self.zeroed
            .wait_while(ix, busy)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until no preparer runs.
    fn settle(&self) {
        drop(self.wait_until(self.lock(), |ix| ix.preparing));
    }

    /// The preparer: writes zeros from the end of the prepared area (or
    /// of the slots, if further) to [`prepare_ahead_of`] past the slots, one
    /// [`PREPARE_STEP`] at a time, until `end` or until `closing`. A
    /// write that fails only ends the preparation: copies then grow the
    /// file as before.
    fn prepare(
        &self,
        data: &File,
        extent_size: u64,
        end: u64,
        closing: &tokio_util::sync::CancellationToken,
    ) {
        static ZEROS: [u8; PREPARE_STEP] = [0; PREPARE_STEP];
        loop {
            let claimed = {
                let mut ix = self.lock();
                let used = ix.len() as u64 * extent_size;
                let from = ix.prepared.max(used);
                let to = (used + prepare_ahead_of(used))
                    .min(end)
                    .min(from + PREPARE_STEP as u64);
                if closing.is_cancelled() || from >= to {
                    // Stopped in the step that saw nothing to do: a copy
                    // after it finds no preparer and starts one.
                    ix.preparing = false;
                    None
                } else {
                    ix.zeroing = Some(from..to);
                    Some(from..to)
                }
            };
            let Some(range) = claimed else { break };
            // At most PREPARE_STEP bytes.
            let len = usize::try_from(range.end - range.start).unwrap_or(0);
            let written = data.write_all_at(&ZEROS[..len], range.start);
            let mut ix = self.lock();
            ix.zeroing = None;
            if written.is_ok() {
                ix.prepared = ix.prepared.max(range.end);
            } else {
                ix.preparing = false;
            }
            drop(ix);
            if written.is_err() {
                break;
            }
            self.zeroed.notify_all();
        }
        self.zeroed.notify_all();
    }
}

impl CowIndex {
    fn contains(&self, e: u64) -> bool {
        self.members.contains(e)
    }

    fn insert(&mut self, e: u64, slot: u32) {
        self.slots.insert(e, slot);
        self.members.insert(e);
    }

    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// The first window of `cow.index` mapped by [`Records`]: 65,536
/// records.
const RECORDS_FIRST: u64 = 1 << 20;
/// The largest window (16 Mi records): a snapshot that copies all 2^32
/// slots it may have maps 256 windows.
const RECORDS_MAX: u64 = 256 << 20;

/// The writer of `cow.index`: the records go into windows of the file
/// mapped shared, by `memcpy`.
///
/// A `pwrite` of each batch's records was a system call, a file
/// timestamp update and a walk of the write path for 32 bytes, on the
/// thread that reads the next request: 4k random writes after a freeze
/// ran about 0.05 slower (held / none) with it than with no record
/// written at all (kernel-notes/README.md, "Copy-on-write"). Written
/// through a mapping, a record costs a copy into memory; the kernel
/// takes a fault only when a page is first written after its
/// writeback, once per 256 records at most.
///
/// What the records promise is unchanged: a store into a shared mapping
/// is in the page cache at once, so a crash of blockd keeps it, after the
/// data `pwrite` that came before it; a sync of the file (`fdatasync`)
/// writes back pages dirtied through the mapping as it does any other.
///
/// Each window is allocated with `fallocate` before it is mapped: a page
/// of the mapping never needs a block when it is written, so a full file
/// system fails the copy that needed a window, with an I/O error, and
/// never raises `SIGBUS` in the daemon. The file is thus longer than its
/// records, by zeros, which end the list when it is loaded as a torn
/// tail does. Where the file system cannot allocate or map (no
/// `fallocate`, no shared mappings), records go down with `pwrite` as
/// before.
#[derive(Debug, Default)]
struct Records {
    /// Mapped windows, ascending and back to back: (file offset, map).
    windows: Vec<(u64, memmap2::MmapMut)>,
    /// Allocating or mapping failed once: `pwrite` from then on.
    unmapped: bool,
}

impl Records {
    /// Stores `recs` at byte `at` of `file`.
    fn write(&mut self, file: &File, recs: &[u8], mut at: u64) -> io::Result<()> {
        let mut rest = recs;
        while !rest.is_empty() {
            let Some(window) = self.window(file, at) else {
                return file.write_all_at(rest, at);
            };
            let (start, map) = window;
            // Within the window (found for `at`), so it fits a usize.
            let off = usize::try_from(at - *start).map_err(io::Error::other)?;
            let n = rest.len().min(map.len() - off);
            map[off..off + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            at += n as u64;
        }
        Ok(())
    }

    /// The window holding byte `at`, mapping a new one after the last
    /// when `at` is past it; `None` when the records are to go down with
    /// `pwrite` instead.
    fn window(&mut self, file: &File, at: u64) -> Option<&mut (u64, memmap2::MmapMut)> {
        if self.unmapped {
            return None;
        }
        let end = self
            .windows
            .last()
            .map_or(0, |(start, map)| start + map.len() as u64);
        if at >= end {
            // Records are appended: only a loaded snapshot starts past 0.
            let start = if self.windows.is_empty() { at } else { end };
            let len = start.clamp(RECORDS_FIRST, RECORDS_MAX);
            match Self::map(file, start, len) {
                Ok(map) => self.windows.push((start, map)),
                Err(e) => {
                    tracing::debug!(error = %e, "cow.index cannot be mapped: records are written with pwrite");
                    self.unmapped = true;
                    return None;
                }
            }
        }
        self.windows
            .iter_mut()
            .rev()
            .find(|(start, map)| *start <= at && at < start + map.len() as u64)
    }

    fn map(file: &File, start: u64, len: u64) -> io::Result<memmap2::MmapMut> {
        rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), start, len)?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        // SAFETY: the file is this snapshot's own `cow.index`, opened by
        // this process in the snapshot's directory under the state
        // directory, which only the daemon writes; nothing truncates it
        // while the snapshot is loaded (a removed snapshot's directory is
        // renamed and emptied, which unlinks the file and leaves the
        // inode to the mapping), and the range was just allocated, so no
        // access to the mapping can fault for want of a block or of file
        // length.
        #[allow(unsafe_code)]
        unsafe {
            memmap2::MmapOptions::new()
                .offset(start)
                .len(len)
                .map_mut(file)
        }
    }
}

/// Snapshot store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// File I/O failed.
    #[error("snapshot {snapshot}: {path}: {source}")]
    Io {
        /// `volume@snapshot`.
        snapshot: String,
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Persisted data is unusable.
    #[error("snapshot {snapshot} is corrupt: {reason}")]
    Corrupt {
        /// `volume@snapshot`.
        snapshot: String,
        /// What is wrong.
        reason: String,
    },
}

/// A held snapshot.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    /// Frozen image size and extent size: fixed, read on every guarded write.
    size: u64,
    extent_size: u64,
    meta: Mutex<SnapshotMeta>,
    changes: ChangeSet,
    data: File,
    index_file: File,
    /// Which extents are preserved and where; the lock also orders slot
    /// allocation. Shared with the thread that prepares `cow.data`.
    area: std::sync::Arc<Area>,
    /// Since when COW data is written that no sync has covered (`None`:
    /// every copy is on disk); changed with the index lock held.
    unsynced: Mutex<Option<std::time::Instant>>,
    /// The volume saw a FLUSH or FUA write since the last sync.
    flushed: AtomicBool,
    /// `cow.unsynced` exists (changed with the index lock held).
    marked: AtomicBool,
    /// Held through a sync and the marker's removal after it: a removal
    /// never sees `unsynced` cleared by a sync whose fsyncs are still under
    /// way, and a snapshot being removed waits for it.
    syncing: Mutex<()>,
    /// Cancelled when the snapshot is deleted: its export connections end.
    pub closing: tokio_util::sync::CancellationToken,
    /// Open export connections (see [`crate::snapshot::Snapshots::open_reader`]).
    readers: std::sync::atomic::AtomicU64,
}

/// One open export connection to a snapshot: counted while it lives, so
/// `snapshot delete` without `--force` refuses to end it.
#[derive(Debug)]
pub struct Reader(std::sync::Arc<SnapshotStore>);

impl Reader {
    /// The snapshot read.
    pub fn snapshot(&self) -> &std::sync::Arc<SnapshotStore> {
        &self.0
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::SeqCst);
    }
}

fn io_err(snapshot: &str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + use<> {
    let snapshot = snapshot.to_string();
    let path = path.display().to_string();
    move |source| SnapshotError::Io {
        snapshot,
        path,
        source,
    }
}

fn open_rw(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

impl SnapshotStore {
    /// `volume@name`.
    pub fn id(&self) -> String {
        let m = self.meta();
        format!("{}@{}", m.volume, m.name)
    }

    /// The record.
    pub fn meta(&self) -> SnapshotMeta {
        self.meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Open export connections.
    pub fn readers(&self) -> u64 {
        self.readers.load(Ordering::SeqCst)
    }

    /// Counts one more export connection until the [`Reader`] drops. Only
    /// [`crate::snapshot::Snapshots::open_reader`] calls this, under the lock a
    /// delete checks the count under.
    pub(super) fn read(self: &std::sync::Arc<Self>) -> Reader {
        self.readers.fetch_add(1, Ordering::SeqCst);
        Reader(self.clone())
    }

    /// The change set frozen with this snapshot.
    pub fn changes(&self) -> &ChangeSet {
        &self.changes
    }

    /// Prepares the directory and empty COW files (done before the freeze,
    /// so the I/O pause does not include file creation).
    ///
    /// # Errors
    /// I/O failures.
    pub fn prepare(dir: &Path, id: &str) -> Result<(File, File), SnapshotError> {
        std::fs::create_dir_all(dir).map_err(io_err(id, dir))?;
        let data_path = dir.join("cow.data");
        let index_path = dir.join("cow.index");
        if let Some(parent) = dir.parent() {
            // Taken by one snapshot only (a rename is atomic); none there,
            // or a `cow.data` already there, and a new file is used. Only
            // a regular file is taken: never a link to somewhere else.
            let spare = parent.join(SPARE);
            if std::fs::symlink_metadata(&spare).is_ok_and(|m| m.file_type().is_file()) {
                let _ = rename_noreplace(&spare, &data_path);
            }
        }
        let data = open_rw(&data_path, true).map_err(io_err(id, &data_path))?;
        let index = open_rw(&index_path, true).map_err(io_err(id, &index_path))?;
        Ok((data, index))
    }

    /// Builds the store for a snapshot just frozen (files from
    /// [`SnapshotStore::prepare`]); not yet committed.
    pub fn new(dir: PathBuf, meta: SnapshotMeta, changes: ChangeSet, files: (File, File)) -> Self {
        let area = Area::new(CowIndex::default(), &files.0);
        Self {
            dir,
            size: meta.size,
            extent_size: meta.extent_size,
            meta: Mutex::new(meta),
            changes,
            data: files.0,
            index_file: files.1,
            area,
            unsynced: Mutex::new(None),
            flushed: AtomicBool::new(false),
            marked: AtomicBool::new(false),
            syncing: Mutex::new(()),
            closing: tokio_util::sync::CancellationToken::new(),
            readers: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Writes the change set and then `meta.json`, the commit point.
    ///
    /// # Errors
    /// I/O failures; the snapshot must then be abandoned.
    pub fn commit(&self) -> Result<(), SnapshotError> {
        let id = self.id();
        let meta = self.meta();
        let changes_path = self.dir.join("changes.dirty");
        crate::durable::write_atomic(
            &changes_path,
            &dirty_map::encode(&self.changes, meta.extent_size, false),
        )
        .map_err(io_err(&id, &changes_path))?;
        self.write_meta()
    }

    /// Rewrites `meta.json` atomically.
    ///
    /// # Errors
    /// I/O failures.
    pub fn write_meta(&self) -> Result<(), SnapshotError> {
        let id = self.id();
        let meta_path = self.dir.join("meta.json");
        let json = serde_json::to_vec_pretty(&self.meta()).map_err(|e| SnapshotError::Corrupt {
            snapshot: id.clone(),
            reason: format!("meta.json cannot be encoded: {e}"),
        })?;
        crate::durable::write_atomic(&meta_path, &json).map_err(io_err(&id, &meta_path))
    }

    /// Updates the record (hook output after post-exec).
    pub fn update_meta(&self, f: impl FnOnce(&mut SnapshotMeta)) {
        f(&mut self
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    /// Loads a committed snapshot; `Ok(None)` for a directory that was never
    /// committed (the caller removes it).
    ///
    /// # Errors
    /// Unreadable or inconsistent files.
    pub fn load(dir: &Path) -> Result<Option<Self>, SnapshotError> {
        let id = dir.display().to_string();
        let meta_path = dir.join("meta.json");
        let meta: SnapshotMeta = match std::fs::read(&meta_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| SnapshotError::Corrupt {
                snapshot: id.clone(),
                reason: format!("meta.json: {e}"),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&id, &meta_path)(e)),
        };
        let id = format!("{}@{}", meta.volume, meta.name);
        let changes_path = dir.join("changes.dirty");
        let bytes = std::fs::read(&changes_path).map_err(io_err(&id, &changes_path))?;
        let (changes, _) = dirty_map::decode(&bytes, meta.extent_size).map_err(|reason| {
            SnapshotError::Corrupt {
                snapshot: id.clone(),
                reason: format!("changes.dirty: {reason}"),
            }
        })?;
        let data_path = dir.join("cow.data");
        let index_path = dir.join("cow.index");
        let data = open_rw(&data_path, false).map_err(io_err(&id, &data_path))?;
        let index_file = open_rw(&index_path, false).map_err(io_err(&id, &index_path))?;
        let raw = std::fs::read(&index_path).map_err(io_err(&id, &index_path))?;
        let mut index = rustc_hash::FxHashMap::default();
        for rec in raw.chunks_exact(RECORD_LEN) {
            let Some((extent, slot)) = decode_record(rec) else {
                // A torn tail (host crash mid-append): its write never
                // happened, since the index is written before the volume.
                break;
            };
            index.insert(extent, slot);
        }
        let area = Area::new(CowIndex::from(index), &data);
        let marker = dir.join(UNSYNCED);
        let marked = match std::fs::read_to_string(&marker) {
            Ok(boot) => Some(boot.trim().to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&id, &marker)(e)),
        };
        let s = Self {
            dir: dir.to_path_buf(),
            size: meta.size,
            extent_size: meta.extent_size,
            meta: Mutex::new(meta),
            changes,
            data,
            index_file,
            area,
            unsynced: Mutex::new(marked.is_some().then(std::time::Instant::now)),
            flushed: AtomicBool::new(marked.is_some()),
            marked: AtomicBool::new(marked.is_some()),
            syncing: Mutex::new(()),
            closing: tokio_util::sync::CancellationToken::new(),
            readers: std::sync::atomic::AtomicU64::new(0),
        };
        if let Some(boot) = marked.filter(|b| b != crate::durable::boot_id()) {
            tracing::error!(snapshot = %id, "the host went down with copy-on-write data of this snapshot not on disk: it is marked damaged");
            s.update_meta(|m| {
                m.damaged = Some(format!(
                    "the host went down (boot {boot}) before copy-on-write data of this snapshot \
                     reached the disk: its frozen image may read data written after it; \
                     delete it and take a new snapshot"
                ));
            });
            // Recorded before the marker goes: the damage outlives it.
            s.write_meta()?;
            std::fs::remove_file(&marker).map_err(io_err(&id, &marker))?;
            s.marked.store(false, Ordering::SeqCst);
            *lock(&s.unsynced) = None;
        }
        Ok(Some(s))
    }

    /// Why the frozen image cannot be trusted, if it cannot.
    pub fn damaged(&self) -> Option<String> {
        self.meta().damaged
    }

    /// Frozen image size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Extent size of the frozen image.
    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// True when extent `e` has been preserved.
    pub fn preserved(&self, e: u64) -> bool {
        self.lock_index().contains(e)
    }

    /// The preserved extents in `range`, in order: as many as were
    /// preserved, however long the range.
    pub fn preserved_in(&self, range: std::ops::Range<u64>) -> Vec<u64> {
        let index = self.lock_index();
        let mut it = index.members.iter();
        it.advance_to(range.start);
        it.take_while(|&e| e < range.end).collect()
    }

    fn lock_index(&self) -> std::sync::MutexGuard<'_, CowIndex> {
        self.area.lock()
    }

    /// Starts the thread that prepares `cow.data` ahead of the copies
    /// (see [`Area`]) when the copies, now ending at `used`, have come
    /// within half of [`prepare_ahead_of`] of the prepared end and none is
    /// running.
    /// Called with the index lock held.
    fn prepare_ahead(&self, ix: &mut CowIndex, used: u64) {
        // Never past the image's last extent: no copy goes there.
        let end = self.size.div_ceil(self.extent_size) * self.extent_size;
        if ix.preparing || ix.prepared >= end || ix.prepared >= used + prepare_ahead_of(used) / 2 {
            return;
        }
        if ix.declined_at.is_some_and(|at| used < at + PREPARE_RECHECK) {
            return;
        }
        let free = rustix::fs::fstatvfs(&self.data).map_or(0, |v| v.f_bavail * v.f_frsize);
        if free < PREPARE_MIN_FREE {
            ix.declined_at = Some(used);
            return;
        }
        ix.declined_at = None;
        let Ok(data) = self.data.try_clone() else {
            return;
        };
        let area = self.area.clone();
        let closing = self.closing.clone();
        let es = self.extent_size;
        ix.preparing = true;
        let started = std::thread::Builder::new()
            .name("cow-prepare".into())
            .spawn(move || area.prepare(&data, es, end, &closing));
        if started.is_err() {
            ix.preparing = false;
        }
    }

    /// Preserves `extents` (ascending, distinct) whose current (frozen)
    /// contents lie back to back in `old`, skipping any already preserved
    /// or past the frozen image's end; returns how many it preserved.
    /// They take consecutive slots, so the data goes down with one write
    /// and the index records with another. Data first, then the index
    /// records: a record never names data that is not there.
    ///
    /// # Errors
    /// I/O failures: the caller must fail the writes that needed these.
    pub fn preserve_many(&self, extents: &[u64], old: &[u8]) -> io::Result<usize> {
        let es = self.extent_size;
        let len = usize::try_from(es).map_err(io::Error::other)?;
        if old.len() != extents.len() * len {
            return Err(io::Error::other("copy-on-write data of the wrong length"));
        }
        let mut index = self.lock_index();
        // Zeros going down where the next slots are (see [`Area`]): the
        // copies wait and go over them, never under them. Waiting lets
        // the lock go, so everything below is read after it.
        let span = extents.len() as u64 * es;
        index = self.area.wait_until(index, |ix| {
            let at = ix.len() as u64 * es;
            ix.zeroing
                .as_ref()
                .is_some_and(|z| z.start < at + span && at < z.end)
        });
        let fresh: Vec<usize> = (0..extents.len())
            .filter(|&i| extents[i] * es < self.size && !index.contains(extents[i]))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let first = index.len();
        let slot =
            |i: usize| u32::try_from(first + i).map_err(|_| io::Error::other("COW index full"));
        slot(fresh.len() - 1)?;
        if !self.marked.load(Ordering::SeqCst) {
            crate::durable::write_atomic(
                &self.dir.join(UNSYNCED),
                crate::durable::boot_id().as_bytes(),
            )?;
            self.marked.store(true, Ordering::SeqCst);
        }
        let at = u64::from(slot(0)?) * es;
        let end = at + fresh.len() as u64 * es;
        if fresh.len() == extents.len() {
            self.data.write_all_at(old, at)?;
        } else {
            // Some were preserved before (by another writer meanwhile, or
            // for an image that had not yet been written to when another
            // held image needed them), or lie past this image's end.
            let mut part = Vec::with_capacity(fresh.len() * len);
            for &i in &fresh {
                part.extend_from_slice(&old[i * len..(i + 1) * len]);
            }
            self.data.write_all_at(&part, at)?;
        }
        let mut recs = Vec::with_capacity(fresh.len() * RECORD_LEN);
        for (n, &i) in fresh.iter().enumerate() {
            recs.extend_from_slice(&encode_record(extents[i], slot(n)?));
        }
        index.records.write(
            &self.index_file,
            &recs,
            u64::from(slot(0)?) * RECORD_LEN as u64,
        )?;
        for (n, &i) in fresh.iter().enumerate() {
            index.insert(extents[i], slot(n)?);
        }
        index.prepared = index.prepared.max(end);
        self.prepare_ahead(&mut index, end);
        lock(&self.unsynced).get_or_insert_with(std::time::Instant::now);
        Ok(fresh.len())
    }

    /// Reads preserved extent `e` at `within..within + buf.len()`;
    /// `Ok(false)` when it is not preserved.
    ///
    /// # Errors
    /// I/O failures.
    pub fn read_preserved(&self, e: u64, within: u64, buf: &mut [u8]) -> io::Result<bool> {
        let Some(slot) = self.lock_index().slots.get(&e).copied() else {
            return Ok(false);
        };
        let es = self.extent_size;
        self.data
            .read_exact_at(buf, u64::from(slot) * es + within)?;
        Ok(true)
    }

    /// Makes every copy made so far durable, then removes `cow.unsynced`
    /// if no copy came meanwhile. The daemon calls it at the
    /// `snapshot_sync` interval and at a clean shutdown; a snapshot with
    /// no marker has nothing to sync.
    ///
    /// A snapshot removed meanwhile (deleted, or released by its backup)
    /// needs nothing durable any more, and its directory may be gone under
    /// a sync that found it held a moment before: that is no error.
    /// (Copies cannot meet a removal: the guard holds the volume's list of
    /// images while it copies, and a removal takes the image off that list
    /// first.)
    ///
    /// # Errors
    /// I/O failures of a snapshot still held.
    pub fn sync(&self) -> io::Result<()> {
        if self.closing.is_cancelled() || !self.marked.load(Ordering::SeqCst) {
            return Ok(());
        }
        match self.sync_files() {
            Err(_) if self.closing.is_cancelled() => Ok(()),
            r => r,
        }
    }

    fn sync_files(&self) -> io::Result<()> {
        let removed = {
            let _one = lock(&self.syncing);
            let taken = {
                let _index = self.lock_index();
                lock(&self.unsynced).take()
            };
            if let Some(since) = taken {
                let r = self
                    .data
                    .sync_data()
                    .and_then(|()| self.index_file.sync_data());
                if r.is_err() {
                    let _index = self.lock_index();
                    let mut at = lock(&self.unsynced);
                    *at = Some(at.map_or(since, |t| t.min(since)));
                    return r;
                }
            }
            self.unmark()?
        };
        self.unmarked(removed)
    }

    /// What the daemon calls at each `snapshot_sync` interval: syncs the
    /// copies when a FLUSH or FUA write reached the volume since the last
    /// sync, or when the oldest unsynced copy is [`COPIES_KEPT`] old, and
    /// otherwise leaves them to the page cache. A client that flushes gets
    /// its overwrites on disk, and the copies they displaced follow within
    /// the interval; one that never flushes leaves its overwrites to the
    /// kernel's writeback, and syncing copies ahead of it would only add
    /// writes where it has none (4k random writes after a freeze ran at
    /// 0.81-0.82x of those with no snapshot with a sync every second,
    /// 0.84-0.87x without).
    ///
    /// # Errors
    /// As [`SnapshotStore::sync`].
    pub fn sync_due(&self) -> io::Result<()> {
        if !self.marked.load(Ordering::SeqCst) {
            return Ok(());
        }
        let flushed = self.flushed.swap(false, Ordering::SeqCst);
        let unsynced = *lock(&self.unsynced);
        if flushed || unsynced.is_none_or(|t| t.elapsed() >= COPIES_KEPT) {
            self.sync()
        } else {
            Ok(())
        }
    }

    /// Notes a FLUSH or FUA write on the volume (see [`Self::sync_due`]).
    pub fn volume_flushed(&self) {
        self.flushed.store(true, Ordering::Relaxed);
    }

    /// The marker's removal, with `syncing` held; true when it went (its
    /// directory is then to be synced, after `syncing` is released).
    fn unmark(&self) -> io::Result<bool> {
        // A removed snapshot's directory may hold a new snapshot of the
        // same name by now: [`SnapshotStore::remove`] cancels `closing`
        // and then waits for `syncing` before it renames the directory.
        if !self.marked.load(Ordering::SeqCst) || self.closing.is_cancelled() {
            return Ok(false);
        }
        // No copy since the last sync took `unsynced` (a copy holds the index lock
        // from its marker check until it sets `unsynced`), and that sync
        // has ended (`syncing`): everything is on disk.
        let index = self.lock_index();
        if lock(&self.unsynced).is_some() || !self.marked.load(Ordering::SeqCst) {
            return Ok(false);
        }
        match std::fs::remove_file(self.dir.join(UNSYNCED)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.marked.store(false, Ordering::SeqCst);
        drop(index);
        Ok(true)
    }

    /// After [`Self::unmark`]: lost, the removal only makes a later host
    /// crash report a snapshot damaged that is not.
    fn unmarked(&self, removed: bool) -> io::Result<()> {
        if removed {
            crate::durable::sync_dir(&self.dir)
        } else {
            Ok(())
        }
    }

    /// Bytes of preserved data.
    pub fn cow_bytes(&self) -> u64 {
        self.lock_index().len() as u64 * self.extent_size
    }

    /// Ends the snapshot's export connections and removes its files.
    /// `closing` is cancelled first: [`SnapshotStore::sync`] relies on it.
    ///
    /// One step as a restart sees it: the directory is first renamed to a
    /// name no snapshot can have (see [`is_removed`]), durably, and only
    /// then emptied. Emptied in place, a crash midway would leave a
    /// snapshot with some of its files gone, which the next start cannot
    /// load, or a deleted snapshot that comes back.
    ///
    /// # Errors
    /// I/O failures. After a failed rename the snapshot's files are all
    /// still there; after that, what is left is swept at the next start.
    pub fn remove(&self) -> io::Result<()> {
        use std::sync::atomic::AtomicU64;
        static REMOVALS: AtomicU64 = AtomicU64::new(0);
        self.closing.cancel();
        // The preparer stops at its next step; it must be gone before the
        // area can become the next snapshot's (see `keep_spare`).
        self.area.settle();
        // A sync under way ends before the directory moves, and any later
        // one sees `closing` (see `unmark`).
        let quiet = lock(&self.syncing);
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy();
        let trash = self.dir.with_file_name(format!(
            "{REMOVED_PREFIX}{name}.{}.{}",
            std::process::id(),
            REMOVALS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::rename(&self.dir, &trash)?;
        drop(quiet);
        let synced = self.dir.parent().map_or(Ok(()), crate::durable::sync_dir);
        if let Some(parent) = self.dir.parent() {
            self.keep_spare(&trash.join("cow.data"), &parent.join(SPARE));
        }
        std::fs::remove_dir_all(&trash)?;
        synced
    }
}

/// Start of the name a snapshot directory is renamed to when it is
/// removed (snapshot names start with a letter or digit).
const REMOVED_PREFIX: &str = ".removed.";

/// The `cow.data` kept for a volume's next snapshot (see the module docs).
pub(crate) const SPARE: &str = ".cow.spare";

/// `rename` that fails rather than replace `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(io::Error::from)
}

impl SnapshotStore {
    /// Keeps the `cow.data` of this removed snapshot (at `from`, inside its
    /// renamed directory) as the volume's spare, unless the volume has one
    /// or the area is empty.
    /// Copies not yet on disk are written back now, on a thread of their
    /// own, so the next snapshot's first sync does not find them dirty
    /// (the price of the reuse: unlinked, they would have been dropped
    /// unwritten). Failures only cost the reuse.
    fn keep_spare(&self, from: &Path, to: &Path) {
        // An empty area saves nothing.
        if self.data.metadata().is_ok_and(|m| m.len() == 0)
            || rename_noreplace(from, to).is_err()
            || lock(&self.unsynced).is_none()
        {
            return;
        }
        if let Ok(spare) = self.data.try_clone() {
            let _ = std::thread::Builder::new()
                .name("cow-spare-sync".into())
                .spawn(move || spare.sync_data());
        }
    }
}

/// True for the directory of a removed snapshot, renamed by
/// [`SnapshotStore::remove`] and not yet emptied (a crash in between).
pub fn is_removed(dir: &Path) -> bool {
    dir.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(REMOVED_PREFIX))
}

/// A store dropped stops its preparer and waits for it: zeros it was
/// about to write must not land on copies made through the same files
/// once the snapshot is loaded again in this process.
impl Drop for SnapshotStore {
    fn drop(&mut self) {
        self.closing.cancel();
        self.area.settle();
    }
}

impl FrozenImage for SnapshotStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn preserved(&self, e: u64) -> bool {
        SnapshotStore::preserved(self, e)
    }

    fn preserved_in(&self, range: std::ops::Range<u64>) -> Vec<u64> {
        SnapshotStore::preserved_in(self, range)
    }

    fn next_preserved(&self, from: u64) -> Option<u64> {
        let index = self.lock_index();
        let mut it = index.members.iter();
        it.advance_to(from);
        it.next()
    }

    fn preserve_many(&self, extents: &[u64], old: &[u8]) -> io::Result<usize> {
        SnapshotStore::preserve_many(self, extents, old)
    }

    fn read_preserved(&self, e: u64, within: u64, buf: &mut [u8]) -> io::Result<bool> {
        SnapshotStore::read_preserved(self, e, within, buf)
    }

    fn sync(&self) -> io::Result<()> {
        SnapshotStore::sync(self)
    }

    fn volume_flushed(&self) {
        SnapshotStore::volume_flushed(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> SnapshotStore {
        store_sized(dir, 1 << 20)
    }

    fn store_sized(dir: &Path, size: u64) -> SnapshotStore {
        let dir = dir.join("v").join("s");
        let files = SnapshotStore::prepare(&dir, "v@s").unwrap();
        let meta = SnapshotMeta {
            volume: "v".into(),
            name: "s".into(),
            group: None,
            created: "2026-01-01T00:00:00Z".into(),
            size,
            extent_size: 4096,
            pause_us: 0,
            changes_known: true,
            changed_extents: 0,
            pre_exec: None,
            post_exec: None,
            damaged: None,
            handed_on: false,
        };
        SnapshotStore::new(dir, meta, ChangeSet::empty(), files)
    }

    fn settle(s: &SnapshotStore) {
        s.area.settle();
    }

    /// The frozen contents of extent `e` in these tests: never zero.
    fn contents(e: u64) -> Vec<u8> {
        (0..4096u64)
            .map(|i| u8::try_from((e * 31 + i) % 251).unwrap() + 1)
            .collect()
    }

    /// The area is prepared ahead of the copies, to [`prepare_ahead_of`]
    /// past them and never past the image, and its zeros never land on a
    /// copy: every extent reads back as it was preserved, here and in the
    /// next snapshot that takes the area as its spare. A snapshot that
    /// takes no copies prepares nothing.
    #[test]
    fn the_area_is_prepared_ahead_of_the_copies_and_never_over_them() {
        let tmp = tempfile::tempdir().unwrap();
        let size: u64 = 48 << 20;
        let extents = size / 4096;
        for round in 0..2 {
            let s = store_sized(tmp.path(), size);
            let taken = s.data.metadata().unwrap().len();
            assert_eq!(taken, if round == 0 { 0 } else { size }, "round {round}");
            settle(&s);
            assert_eq!(s.data.metadata().unwrap().len(), taken, "no copy, no zeros");
            // Every extent once, scattered (7919 is prime to 12288), four
            // to a batch, while the preparer runs.
            let order: Vec<u64> = (0..extents).map(|i| i * 7919 % extents).collect();
            for (n, batch) in order.chunks(4).enumerate() {
                let mut batch = batch.to_vec();
                batch.sort_unstable();
                let old: Vec<u8> = batch.iter().flat_map(|&e| contents(e)).collect();
                assert_eq!(s.preserve_many(&batch, &old).unwrap(), batch.len());
                if round == 0 && n % 256 == 0 {
                    settle(&s);
                    let free = rustix::fs::fstatvfs(&s.data)
                        .map(|v| v.f_bavail * v.f_frsize)
                        .unwrap();
                    // The rule either way; see the next test for a full disk.
                    let used = (n as u64 + 1) * 4 * 4096;
                    let lead = if free >= PREPARE_MIN_FREE {
                        prepare_ahead_of(used)
                    } else {
                        0
                    };
                    let len = s.data.metadata().unwrap().len();
                    if n == 0 {
                        assert_eq!(len, used + lead, "prepared ahead of the first copies");
                    } else {
                        assert!(
                            ((used + lead / 2).min(size)..=(used + lead).min(size)).contains(&len),
                            "{len} bytes prepared for {used} of copies ({free} bytes free)"
                        );
                    }
                }
            }
            settle(&s);
            assert_eq!(
                s.data.metadata().unwrap().len(),
                size,
                "never past the image"
            );
            let mut buf = vec![0u8; 4096];
            for e in 0..extents {
                assert!(s.read_preserved(e, 0, &mut buf).unwrap());
                assert!(buf == contents(e), "round {round}: extent {e} changed");
            }
            s.remove().unwrap();
            assert!(!s.lock_index().preparing);
        }
    }

    /// On a file system with less than [`PREPARE_MIN_FREE`] free, the
    /// copies grow the area alone: no zeros take room ahead of them.
    #[test]
    fn no_area_is_prepared_on_a_nearly_full_file_system() {
        let tmp = tempfile::tempdir().unwrap();
        if let Err(e) = rustix::mount::mount(
            "tmpfs",
            tmp.path(),
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            c"size=64m",
        ) {
            assert!(
                std::env::var_os("BLOCKD_TEST_REQUIRE_ALL").is_none(),
                "cannot mount a small tmpfs: {e}"
            );
            eprintln!("SKIPPED: mounting a small tmpfs needs root ({e})");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
            }
        }
        let _unmount = Unmount(tmp.path());
        let s = store_sized(tmp.path(), 48 << 20);
        for n in 0..8u64 {
            let batch = [n * 4, n * 4 + 1, n * 4 + 2, n * 4 + 3];
            let old: Vec<u8> = batch.iter().flat_map(|&e| contents(e)).collect();
            assert_eq!(s.preserve_many(&batch, &old).unwrap(), 4);
        }
        settle(&s);
        assert_eq!(s.data.metadata().unwrap().len(), 32 * 4096);
    }

    /// A snapshot removed while its area is being prepared hands the area
    /// on only once the preparer has stopped: nothing writes into it after
    /// the removal (it would write into the next snapshot's copies).
    #[test]
    fn a_removal_waits_for_the_preparer() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        assert_eq!(s.preserve_many(&[0], &contents(0)).unwrap(), 1);
        settle(&s);
        // As a preparer between two steps.
        s.lock_index().preparing = true;
        std::thread::scope(|scope| {
            let removal = scope.spawn(|| s.remove());
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(!removal.is_finished(), "removed under a running preparer");
            assert!(
                s.closing.is_cancelled(),
                "the preparer was not told to stop"
            );
            assert!(!tmp.path().join("v").join(SPARE).exists());
            s.lock_index().preparing = false;
            s.area.zeroed.notify_all();
            removal.join().unwrap().unwrap();
        });
        assert!(tmp.path().join("v").join(SPARE).exists());
    }

    /// A copy whose slots fall in the range the preparer has claimed waits
    /// until that range is written, then goes over it.
    #[test]
    fn a_copy_waits_for_zeros_going_down_where_its_slot_is() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.lock_index().zeroing = Some(0..PREPARE_STEP as u64);
        std::thread::scope(|scope| {
            let copy = scope.spawn(|| s.preserve_many(&[3], &contents(3)));
            std::thread::sleep(std::time::Duration::from_millis(100));
            assert!(!copy.is_finished(), "the copy went ahead of the zeros");
            assert_eq!(s.data.metadata().unwrap().len(), 0);
            s.lock_index().zeroing = None;
            s.area.zeroed.notify_all();
            assert_eq!(copy.join().unwrap().unwrap(), 1);
        });
        let mut buf = vec![0u8; 4096];
        assert!(s.read_preserved(3, 0, &mut buf).unwrap());
        assert!(buf == contents(3));
    }

    /// A removed snapshot never removes the marker of a new snapshot of
    /// the same name in the same directory, whatever it was doing when
    /// it was removed.
    #[test]
    fn a_removed_snapshot_leaves_the_marker_of_its_successor() {
        let tmp = tempfile::tempdir().unwrap();
        let old = store(tmp.path());
        assert_eq!(old.preserve_many(&[0], &[1u8; 4096]).unwrap(), 1);
        old.remove().unwrap();
        let new = store(tmp.path());
        assert_eq!(new.preserve_many(&[0], &[2u8; 4096]).unwrap(), 1);
        let marker = tmp.path().join("v/s").join(UNSYNCED);
        assert!(marker.exists());
        // As a sync that passed its first check before the removal.
        assert!(!old.unmark().unwrap());
        old.sync().unwrap();
        assert!(
            marker.exists(),
            "the old snapshot removed the new one's marker"
        );
        new.sync().unwrap();
        assert!(!marker.exists());
    }

    /// The marker goes down durably before the first copy, and goes with
    /// the first sync that leaves every copy on disk; a copy after that
    /// sync's fsyncs began keeps it to the next.
    #[test]
    fn the_unsynced_marker_lives_from_a_copy_to_the_sync_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let marker = tmp.path().join("v/s").join(UNSYNCED);
        assert!(!marker.exists());
        s.sync().unwrap();
        assert_eq!(s.preserve_many(&[0], &[1u8; 4096]).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            crate::durable::boot_id()
        );
        assert_eq!(s.preserve_many(&[1], &[2u8; 4096]).unwrap(), 1);
        s.sync().unwrap();
        assert!(!marker.exists(), "a sync left the marker of synced copies");
        // A copy during a sync: its fsyncs began before it, so it keeps the
        // marker (held off here as the copy would land between the sync's
        // taking of `unsynced` and its check).
        assert_eq!(s.preserve_many(&[2], &[3u8; 4096]).unwrap(), 1);
        {
            let _one = lock(&s.syncing);
            assert!(lock(&s.unsynced).take().is_some());
            assert_eq!(s.preserve_many(&[3], &[4u8; 4096]).unwrap(), 1);
            assert!(!s.unmark().unwrap(), "removed with a copy not synced");
        }
        assert!(marker.exists());
        s.sync().unwrap();
        assert!(!marker.exists());
        // Every copy reads back.
        let mut buf = [0u8; 4096];
        for (e, b) in [(0, 1u8), (1, 2), (2, 3), (3, 4)] {
            assert!(s.read_preserved(e, 0, &mut buf).unwrap());
            assert!(buf.iter().all(|&x| x == b));
        }
    }

    /// The daemon's interval sync takes the copies only when a FLUSH asked
    /// for durability or the oldest is [`COPIES_KEPT`] old.
    #[test]
    fn copies_are_due_after_a_flush_or_once_old() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let marker = tmp.path().join("v/s").join(UNSYNCED);
        assert_eq!(s.preserve_many(&[0], &[1u8; 4096]).unwrap(), 1);
        s.sync_due().unwrap();
        assert!(marker.exists(), "synced with no FLUSH and young");
        s.volume_flushed();
        s.sync_due().unwrap();
        assert!(!marker.exists(), "not synced after a FLUSH");
        assert_eq!(s.preserve_many(&[1], &[2u8; 4096]).unwrap(), 1);
        s.sync_due().unwrap();
        assert!(marker.exists());
        *lock(&s.unsynced) = std::time::Instant::now().checked_sub(COPIES_KEPT);
        s.sync_due().unwrap();
        assert!(!marker.exists(), "an old copy not synced");
        // Nothing left to sync, the marker still there (a copy came during
        // the last sync, and that sync's successor took it): it goes.
        assert_eq!(s.preserve_many(&[2], &[3u8; 4096]).unwrap(), 1);
        {
            let _one = lock(&s.syncing);
            assert!(lock(&s.unsynced).take().is_some());
        }
        s.sync_due().unwrap();
        assert!(!marker.exists());
    }

    /// Records go down through mapped windows, back to back across a
    /// window's end, and read back from the file as written; the file is
    /// allocated ahead and reads as zeros past them. With no mapping the
    /// same bytes go down with `pwrite`.
    #[test]
    fn records_cross_windows_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        for unmapped in [false, true] {
            let path = tmp.path().join(format!("index.{unmapped}"));
            let file = open_rw(&path, true).unwrap();
            let mut records = Records {
                unmapped,
                ..Records::default()
            };
            // 70,000 records, 1,000 to a write: past the first window
            // (65,536), with one write across its end.
            let n = 70_000u64;
            let all: Vec<u8> = (0..n)
                .flat_map(|e| encode_record(e, u32::try_from(e).unwrap()))
                .collect();
            for (k, chunk) in all.chunks(1000 * RECORD_LEN).enumerate() {
                records
                    .write(&file, chunk, (k * 1000 * RECORD_LEN) as u64)
                    .unwrap();
            }
            assert_eq!(records.windows.len(), if unmapped { 0 } else { 2 });
            drop(records);
            let raw = std::fs::read(&path).unwrap();
            assert_eq!(&raw[..all.len()], &all[..], "unmapped: {unmapped}");
            if !unmapped {
                assert_eq!(raw.len() as u64, 2 * RECORDS_FIRST, "allocated ahead");
                assert!(raw[all.len()..].iter().all(|&b| b == 0));
            }
        }
    }

    /// Copies made through the mapped index survive the store's end with
    /// no sync (as a crash of blockd leaves them in the page cache), load
    /// again, and the loaded snapshot goes on appending after them.
    #[test]
    fn copies_load_again_and_go_on_after_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v/s");
        let s = store(tmp.path());
        s.commit().unwrap();
        assert_eq!(
            s.preserve_many(
                &[3, 7, 9],
                &[contents(3), contents(7), contents(9)].concat()
            )
            .unwrap(),
            3
        );
        drop(s);
        let index_len = std::fs::metadata(dir.join("cow.index")).unwrap().len();
        assert!(
            index_len > 3 * RECORD_LEN as u64,
            "records in a window allocated ahead"
        );
        let s = SnapshotStore::load(&dir).unwrap().unwrap();
        assert_eq!(s.preserved_in(0..256), vec![3, 7, 9]);
        assert_eq!(
            s.preserve_many(&[5, 7], &[contents(5), vec![0xee; 4096]].concat())
                .unwrap(),
            1
        );
        drop(s);
        let s = SnapshotStore::load(&dir).unwrap().unwrap();
        assert_eq!(s.preserved_in(0..256), vec![3, 5, 7, 9]);
        let mut buf = vec![0u8; 4096];
        for e in [3, 5, 7, 9] {
            assert!(s.read_preserved(e, 0, &mut buf).unwrap());
            assert!(buf == contents(e), "extent {e}");
        }
    }

    #[test]
    fn index_records_known_answers() {
        // A record written before 64-bit extent numbers (bytes 12-15
        // reserved, zero) reads the same, and is what is written today for
        // an extent below 2^32: extent 5 in slot 2.
        let mut old = [0u8; RECORD_LEN];
        old[..4].copy_from_slice(&5u32.to_le_bytes());
        old[4..8].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32fast::hash(&old[..8]);
        old[8..12].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_record(&old), Some((5, 2)));
        assert_eq!(encode_record(5, 2), old);
        // Past 2^32 (16 TiB at 4 KiB): the high half is stored and covered.
        let e = (3u64 << 32) + 9;
        let rec = encode_record(e, 7);
        assert_eq!(&rec[12..16], &3u32.to_le_bytes());
        assert_eq!(decode_record(&rec), Some((e, 7)));
        // Any flipped bit of a record is caught.
        for bit in 0..RECORD_LEN * 8 {
            let mut bad = rec;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(decode_record(&bad), None, "bit {bit}");
        }
        // A zero-filled tail ends the index.
        assert_eq!(decode_record(&[0u8; RECORD_LEN]), None);
    }
}
