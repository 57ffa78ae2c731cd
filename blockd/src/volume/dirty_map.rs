//! Dirty map: which extents of a volume changed since the last successful
//! backup, as a 64-bit roaring bitmap of extent numbers (a
//! [`RoaringTreemap`]: one 32-bit bitmap per 2^32 extents, so a 64 TiB
//! volume at 4 KiB extents is tracked at the default extent size, and an
//! untouched range costs nothing).
//!
//! Every WRITE, TRIM and WRITE_ZEROES marks its extents before it is
//! acknowledged. The map can be *unknown*: after an unclean shutdown the
//! writes made since the last persisted copy are not in it, so it must not
//! be trusted; an unknown map reports every extent dirty.
//!
//! # On-disk format (`<state dir>/volumes/<name>.dirty`, version 2)
//! ```text
//! offset  size  field
//!      0     8  magic "BLKDDIRT"                 (never changes)
//!      8     4  version, u32 LE (2; 1 is still read)
//!     12     4  flags, u32 LE: bit 0 IN_USE, bit 1 UNKNOWN
//!     16     8  extent size in bytes, u64 LE
//!     24     8  payload length, u64 LE
//!     32     4  CRC-32 (IEEE) of the payload, u32 LE
//!     36     4  reserved, zero
//!     40     n  payload: version 2, the 64-bit portable roaring format
//!               (a u64 LE count of 32-bit bitmaps, then each as a u32 LE
//!               high half and a 32-bit portable bitmap); version 1, one
//!               32-bit portable bitmap
//! ```
//! Crash rule: the file is replaced by write-temp, fsync, rename, fsync-dir,
//! so it is always one whole version. A copy without IN_USE (*settled*) is
//! trusted at the next start; a copy with IN_USE (as QEMU marks its
//! persistent bitmaps "in use") says writes may have landed that the copy
//! lacks, so the map is unknown.
//!
//! # Settling: a crash keeps the tracking of idle volumes
//! Writing IN_USE once at start and clearing it only at a clean shutdown
//! would make every `kill -9`, OOM kill or power cut lose the tracking of
//! every volume, the idle ones too, and each one's next backup read it
//! whole. Instead the map works like a write-intent bitmap (md's, whose
//! bits are set on disk before the write they cover):
//! - A volume that has had no change for [`SETTLE_AFTER`] is *settled*:
//!   its data file is synced, then the map is written without IN_USE.
//! - The first change after that (a WRITE, TRIM or WRITE_ZEROES marking
//!   the map, or a change set merged back) first writes an IN_USE copy,
//!   durably, and only then goes on to the data. That copy is a bare
//!   header: an in-use copy's extents are never read.
//!
//! So a settled copy on disk always describes durable data with no write
//! after it, and a crash keeps the tracking of every volume that was idle
//! when it came. The cost is one small durable file write on the first
//! write after each idle spell, none on the writes that follow.
//!
//! Freezes take extents out of the map without arming it. Until the
//! snapshot holds the frozen set durably (its committed `changes.dirty`),
//! the map is not settled, nor written settled at shutdown; after that, a
//! settled copy that still lists them only makes the next backup read a
//! little more. A successful backup records its snapshot as the volume's
//! backup base before it lets the snapshot go, so a settled map without
//! those extents always has a base that holds them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use roaring::{RoaringBitmap, RoaringTreemap};

use crate::magic::{DIRTY_MAGIC as MAGIC, DIRTY_VERSION as VERSION};
/// Header length.
const HEADER_LEN: usize = 40;
/// The daemon was running when this copy was written.
const FLAG_IN_USE: u32 = 1 << 0;
/// Tracking was already lost when this copy was written.
const FLAG_UNKNOWN: u32 = 1 << 1;

/// A set of changed extents, or "unknown" (everything may have changed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChangeSet {
    /// Changed extent numbers.
    pub extents: RoaringTreemap,
    /// False when tracking was lost: treat every extent as changed.
    pub known: bool,
}

impl ChangeSet {
    /// An empty, trusted set.
    pub fn empty() -> Self {
        Self {
            extents: RoaringTreemap::new(),
            known: true,
        }
    }

    /// A set that covers everything because tracking was lost.
    pub fn unknown() -> Self {
        Self {
            extents: RoaringTreemap::new(),
            known: false,
        }
    }

    /// True when extent `e` may have changed.
    pub fn contains(&self, e: u64) -> bool {
        !self.known || self.extents.contains(e)
    }

    /// The first changed extent at or after `from` (`from` itself when
    /// the set is unknown): a jump, not a walk.
    pub fn next_at(&self, from: u64) -> Option<u64> {
        if !self.known {
            return Some(from);
        }
        let mut iter = self.extents.iter();
        iter.advance_to(from);
        iter.next()
    }

    /// Adds every change of `other`.
    pub fn merge(&mut self, other: &ChangeSet) {
        self.known &= other.known;
        self.extents |= &other.extents;
    }

    /// Changed and unchanged runs over extents `first..end`, as
    /// `(extent count, changed)`; at most `max_runs` runs.
    pub fn runs(&self, first: u64, end: u64, max_runs: usize) -> Vec<(u64, bool)> {
        let mut runs = Vec::new();
        if first >= end {
            return runs;
        }
        if !self.known {
            runs.push((end - first, true));
            return runs;
        }
        let mut iter = self.extents.iter();
        iter.advance_to(first);
        let mut pos = first;
        let mut next = iter.next();
        while pos < end && runs.len() < max_runs {
            match next {
                Some(d) if d == pos => {
                    // A dirty run: extend while consecutive.
                    let mut stop = pos + 1;
                    next = iter.next();
                    while stop < end && next == Some(stop) {
                        stop += 1;
                        next = iter.next();
                    }
                    runs.push((stop - pos, true));
                    pos = stop;
                }
                Some(d) => {
                    let stop = d.min(end);
                    runs.push((stop - pos, false));
                    pos = stop;
                }
                None => {
                    runs.push((end - pos, false));
                    pos = end;
                }
            }
        }
        runs
    }
}

/// Extent numbers touched by `offset..offset + len` (len > 0).
pub fn extent_range(offset: u64, len: u64, extent_size: u64) -> std::ops::RangeInclusive<u64> {
    let first = offset / extent_size;
    let last = offset.saturating_add(len.max(1) - 1) / extent_size;
    first..=last
}

/// How long a volume goes without a change before its map is settled on
/// disk (see the module docs).
pub const SETTLE_AFTER: Duration = Duration::from_secs(5);

/// The live map of one volume.
#[derive(Debug)]
pub struct DirtyMap {
    extent_size: u64,
    inner: Mutex<Live>,
    /// The change count at the last look of [`Self::settle`], and since
    /// when it has stood still.
    seen: Mutex<(u64, Instant)>,
    /// Tracking switched off (`blockd --no-change-tracking`): nothing is
    /// marked and the map is unknown.
    disabled: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Live {
    set: ChangeSet,
    /// The file, or `None` for a map kept only in memory (or forgotten
    /// with its deleted volume). Under the same lock as the rest, so a
    /// settle that began before a delete never writes after it.
    path: Option<PathBuf>,
    /// The copy on disk carries IN_USE (or there is no file to keep):
    /// changes need not write it first.
    armed: bool,
    /// Counts changes to `set`; a settle that sees it move gives up.
    changes: u64,
    /// The last write of the file was a settled copy that succeeded.
    settled: bool,
    /// That settled copy holds more than the set: a freeze or a restore
    /// took changes out since. A crash keeping it loses nothing (those
    /// changes are counted again), and the next settle writes the set.
    stale: bool,
    /// Change sets taken by freezes whose snapshots are not durable yet
    /// ([`DirtyMap::take`] to [`DirtyMap::kept`]): no settled copy is
    /// written meanwhile, since it would lack them.
    frozen: u32,
}

/// Why a persisted map could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapFileError {
    /// Reading or writing the file failed.
    #[error("dirty map {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The bytes are not a valid map.
    #[error("dirty map {path} is corrupt: {reason}")]
    Corrupt {
        /// File.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// What was found on disk at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A clean copy: the map is trusted.
    Clean,
    /// The previous run stopped uncleanly: the map is unknown.
    Unclean,
    /// No file (a volume created before tracking existed): unknown.
    Missing,
    /// Unreadable file: unknown.
    Corrupt,
}

impl DirtyMap {
    /// A fresh, empty, trusted map kept only in memory.
    pub fn new(extent_size: u64) -> Self {
        Self::with(extent_size, None, ChangeSet::empty(), true)
    }

    fn with(extent_size: u64, path: Option<PathBuf>, set: ChangeSet, armed: bool) -> Self {
        let path_is_some = path.is_some();
        Self {
            extent_size,
            inner: Mutex::new(Live {
                set,
                path,
                armed,
                changes: 0,
                settled: !armed && path_is_some,
                stale: false,
                frozen: 0,
            }),
            seen: Mutex::new((0, Instant::now())),
            disabled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_disabled(&self) -> bool {
        self.disabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes sure the copy on disk carries IN_USE before `live` changes
    /// (the caller holds the lock across this and the change). Where the
    /// in-use copy cannot be written, removing the file serves as well
    /// (a missing map is unknown at the next start).
    fn arm(&self, live: &mut Live) -> io::Result<()> {
        if live.armed {
            return Ok(());
        }
        live.settled = false;
        if let Some(path) = &live.path {
            let bytes = encode(&ChangeSet::empty(), self.extent_size, true);
            if let Err(e) = crate::durable::write_atomic(path, &bytes) {
                tracing::warn!(path = %path.display(), error = %e, "writing the in-use dirty map failed; removing it instead");
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(r) if r.kind() == io::ErrorKind::NotFound => {}
                    Err(_) => return Err(e),
                }
                if let Some(dir) = path.parent() {
                    crate::durable::sync_dir(dir).map_err(|_| e)?;
                }
            }
        }
        live.armed = true;
        Ok(())
    }

    /// Marks the extents of `offset..offset + len` changed. Call before
    /// the data changes.
    ///
    /// # Errors
    /// The first change after the map was settled writes it in use first;
    /// when that fails, the write must not go ahead.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.is_disabled() {
            return Ok(());
        }
        let r = extent_range(offset, len, self.extent_size);
        let mut live = self.lock();
        self.arm(&mut live)?;
        live.changes += 1;
        live.set.extents.insert_range(r);
        Ok(())
    }

    /// A copy of the current set.
    pub fn current(&self) -> ChangeSet {
        self.lock().set.clone()
    }

    /// Replaces the set with an empty trusted one and returns the old one:
    /// the frozen change set of a snapshot. Until [`Self::kept`] says the
    /// snapshot holds it durably (or [`Self::merge`] has put it back and
    /// `kept` has been called), the map is not settled on disk. With
    /// tracking off, the set stays unknown.
    pub fn take(&self) -> ChangeSet {
        let mut live = self.lock();
        live.changes += 1;
        live.frozen += 1;
        live.stale = true;
        let fresh = if self.is_disabled() {
            ChangeSet::unknown()
        } else {
            ChangeSet::empty()
        };
        std::mem::replace(&mut live.set, fresh)
    }

    /// A set [`Self::take`] returned is now durable elsewhere (the
    /// snapshot's committed `changes.dirty`) or merged back.
    pub fn kept(&self) {
        let mut live = self.lock();
        live.frozen = live.frozen.saturating_sub(1);
    }

    /// Empties the set without holding anything back: the volume now
    /// equals a snapshot a backup holds (the end of a full restore).
    pub fn reset(&self) {
        let mut live = self.lock();
        live.changes += 1;
        live.stale = true;
        if !self.is_disabled() {
            live.set = ChangeSet::empty();
        }
    }

    /// Adds a change set back (an abandoned snapshot's changes are never
    /// forgotten).
    ///
    /// # Errors
    /// The map could not be marked in use on disk first: the changes are
    /// in memory, but a crash could lose them, so the caller keeps its own
    /// durable copy.
    pub fn merge(&self, changes: &ChangeSet) -> io::Result<()> {
        let mut live = self.lock();
        let armed = self.arm(&mut live);
        live.changes += 1;
        live.set.merge(changes);
        armed
    }

    /// Marks the whole map unknown.
    pub fn lose(&self) {
        let mut live = self.lock();
        if let Err(e) = self.arm(&mut live) {
            tracing::error!(error = %e, "the dirty map could not be marked in use: a crash now may keep a map that is no longer known");
        }
        live.changes += 1;
        live.set = ChangeSet::unknown();
    }

    /// Stops tracking: the map becomes unknown and writes no longer mark it.
    pub fn disable(&self) {
        self.disabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.lose();
    }

    /// Lets go of the file (its volume is deleted): nothing writes it again,
    /// not even a settle that began before.
    pub fn forget(&self) {
        self.lock().path = None;
    }

    /// Loads the map persisted at `path`. A settled copy stays as it is
    /// until the first change; any other is rewritten in use at once, so
    /// a crash of this run is detected by the next.
    ///
    /// # Errors
    /// Only when the in-use copy cannot be written.
    pub fn open(path: &Path, extent_size: u64) -> Result<(Self, Recovery), MapFileError> {
        let (set, recovery) = match std::fs::read(path) {
            Ok(bytes) => match decode(&bytes, extent_size) {
                Ok((set, flags)) if flags & FLAG_IN_USE == 0 => (set, Recovery::Clean),
                Ok(_) => (ChangeSet::unknown(), Recovery::Unclean),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "dirty map unreadable");
                    (ChangeSet::unknown(), Recovery::Corrupt)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                (ChangeSet::unknown(), Recovery::Missing)
            }
            Err(source) => {
                return Err(MapFileError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let map = Self::with(extent_size, Some(path.to_path_buf()), set, false);
        if recovery != Recovery::Clean {
            map.write_in_use(path)?;
        }
        Ok((map, recovery))
    }

    fn write_in_use(&self, path: &Path) -> Result<(), MapFileError> {
        let mut live = self.lock();
        self.arm(&mut live).map_err(|source| MapFileError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Creates the file of a brand-new volume (empty, trusted, in use).
    ///
    /// # Errors
    /// I/O failures.
    pub fn create(path: &Path, extent_size: u64) -> Result<Self, MapFileError> {
        let map = Self::with(
            extent_size,
            Some(path.to_path_buf()),
            ChangeSet::empty(),
            false,
        );
        map.write_in_use(path)?;
        Ok(map)
    }

    /// Settles the map when nothing has changed it for `idle`, counting
    /// from the first call that saw it as it is: `sync` makes the volume's
    /// data durable, then the map is written without IN_USE. True when it
    /// was written now. A change during the sync, or a freeze whose
    /// snapshot is not durable yet, makes it give up.
    ///
    /// # Errors
    /// The sync or the write failed (the copy on disk stays in use).
    pub fn settle(
        &self,
        idle: Duration,
        sync: impl FnOnce() -> io::Result<()>,
    ) -> Result<bool, MapFileError> {
        let (changes, path) = {
            let live = self.lock();
            match &live.path {
                Some(path) if (live.armed || live.stale) && live.frozen == 0 => {
                    (live.changes, path.clone())
                }
                _ => return Ok(false),
            }
        };
        {
            let now = Instant::now();
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.0 != changes {
                *seen = (changes, now);
            }
            if now.duration_since(seen.1) < idle {
                return Ok(false);
            }
        }
        sync().map_err(|source| MapFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut live = self.lock();
        if live.changes != changes || !(live.armed || live.stale) || live.frozen > 0 {
            return Ok(false);
        }
        self.write_settled(&mut live)
    }

    /// Writes the settled copy at a clean shutdown, once the caller has
    /// made the volume's data durable. A freeze still in progress leaves
    /// the map in use.
    ///
    /// # Errors
    /// I/O failures, naming the file.
    pub fn close(&self) -> Result<(), MapFileError> {
        let mut live = self.lock();
        if live.frozen > 0 {
            return Ok(());
        }
        self.write_settled(&mut live).map(|_| ())
    }

    /// Writes `live` settled; false when there is no file to write.
    fn write_settled(&self, live: &mut Live) -> Result<bool, MapFileError> {
        let Some(path) = &live.path else {
            return Ok(false);
        };
        let bytes = encode(&live.set, self.extent_size, false);
        // Disarmed before the write: if it fails after its rename, the
        // copy on disk may be the settled one, and the next change must
        // then write it in use again.
        live.armed = false;
        crate::durable::write_atomic(path, &bytes).map_err(|source| MapFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        live.settled = true;
        live.stale = false;
        Ok(true)
    }

    /// True when the copy on disk is settled (trusted after a crash).
    pub fn settled(&self) -> bool {
        self.lock().settled
    }
}

/// Encodes a change set in the file format.
pub fn encode(set: &ChangeSet, extent_size: u64, in_use: bool) -> Vec<u8> {
    let mut payload = Vec::with_capacity(set.extents.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = set.extents.serialize_into(&mut payload);
    let mut flags = 0;
    if in_use {
        flags |= FLAG_IN_USE;
    }
    if !set.known {
        flags |= FLAG_UNKNOWN;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&extent_size.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(&payload);
    out
}

/// Decodes the file format, checking magic, version, extent size, length
/// and checksum. Returns the set and the header flags.
///
/// # Errors
/// A reason naming what is wrong; never panics on any input.
pub fn decode(bytes: &[u8], extent_size: u64) -> Result<(ChangeSet, u32), String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("{} bytes is shorter than the header", bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let u64_at = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let version = u32_at(8);
    if version != VERSION && version != 1 {
        return Err(format!("unsupported version {version}"));
    }
    let flags = u32_at(12);
    if u64_at(16) != extent_size {
        return Err(format!(
            "extent size {} does not match the volume's {extent_size}",
            u64_at(16)
        ));
    }
    let payload = &bytes[HEADER_LEN..];
    if u64_at(24) != payload.len() as u64 {
        return Err("payload length mismatch (truncated file?)".into());
    }
    if crc32fast::hash(payload) != u32_at(32) {
        return Err("checksum mismatch".into());
    }
    let extents = if version == 1 {
        let v1 = RoaringBitmap::deserialize_from(payload).map_err(|e| format!("bitmap: {e}"))?;
        v1.iter().map(u64::from).collect()
    } else {
        RoaringTreemap::deserialize_from(payload).map_err(|e| format!("bitmap: {e}"))?
    };
    Ok((
        ChangeSet {
            extents,
            known: flags & FLAG_UNKNOWN == 0,
        },
        flags,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Mark(u64, u64),
        Take,
        Merge,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..1 << 22, 1u64..1 << 18).prop_map(|(o, l)| Op::Mark(o, l)),
            // Past 2^32 extents of 4 KiB (16 TiB), up to 64 TiB.
            2 => ((1u64 << 44)..(1 << 46), 1u64..1 << 18).prop_map(|(o, l)| Op::Mark(o, l)),
            1 => Just(Op::Take),
            1 => Just(Op::Merge),
        ]
    }

    proptest! {
        /// The map against a BTreeSet model, through marks, takes (freezes)
        /// and merges (abandoned snapshots), and through the file format.
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 1..60)) {
            let es = 4096u64;
            let map = DirtyMap::new(es);
            let mut model: BTreeSet<u64> = BTreeSet::new();
            let mut taken: Vec<(ChangeSet, BTreeSet<u64>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Mark(o, l) => {
                        map.mark(o, l).unwrap();
                        for e in (o / es)..=((o + l - 1) / es) {
                            model.insert(e);
                        }
                    }
                    Op::Take => taken.push((map.take(), std::mem::take(&mut model))),
                    Op::Merge => {
                        if let Some((set, m)) = taken.pop() {
                            map.merge(&set).unwrap();
                            model.extend(m);
                        }
                    }
                }
                let cur = map.current();
                prop_assert!(cur.extents.iter().eq(model.iter().copied()));
                // Runs cover the range exactly and agree with the model.
                let runs = cur.runs(0, 1100, usize::MAX);
                let mut e = 0u64;
                for (n, dirty) in runs {
                    for x in e..e + n {
                        prop_assert_eq!(model.contains(&x), dirty);
                    }
                    e += n;
                }
                prop_assert_eq!(e, 1100);
                let (back, flags) = decode(&encode(&cur, es, true), es).unwrap();
                prop_assert_eq!(flags & FLAG_IN_USE, FLAG_IN_USE);
                prop_assert_eq!(back, cur);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 4096);
        }
    }

    #[test]
    fn unclean_shutdown_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::create(&path, 4096).unwrap();
        map.mark(8192, 1).unwrap();
        map.close().unwrap();
        // Clean reopen: trusted.
        let (map, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Clean);
        assert!(map.current().known && map.current().extents.contains(2));
        // A write, and no clean close: the next open finds IN_USE.
        map.mark(0, 1).unwrap();
        drop(map);
        let (map, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Unclean);
        assert!(!map.current().known);
        assert!(map.current().contains(12345));
        // Unknown survives a clean shutdown until a backup resets it.
        map.close().unwrap();
        let (map, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Clean);
        assert!(!map.current().known);
        // A corrupt file is unknown, never trusted.
        std::fs::write(&path, b"BLKDDIRT garbage").unwrap();
        drop(map);
        let (_, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Corrupt);
    }

    fn on_disk(path: &Path) -> (ChangeSet, bool) {
        let (set, flags) = decode(&std::fs::read(path).unwrap(), 4096).unwrap();
        (set, flags & FLAG_IN_USE != 0)
    }

    /// A map settles only after standing still for the idle time, and only
    /// after the data sync; the first change after that writes IN_USE
    /// before it is made; every kind of change counts.
    #[test]
    fn an_idle_map_settles_and_the_next_change_arms_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::create(&path, 4096).unwrap();
        assert!(on_disk(&path).1, "a new volume's map starts in use");
        map.mark(4096, 4096).unwrap();
        let synced = std::cell::Cell::new(0);
        let sync = || {
            synced.set(synced.get() + 1);
            Ok(())
        };
        // Not idle long enough: nothing happens, not even a sync.
        assert!(!map.settle(Duration::from_secs(3600), sync).unwrap());
        assert_eq!(synced.get(), 0);
        assert!(on_disk(&path).1);
        // Idle (zero wait): synced, then written settled.
        assert!(map.settle(Duration::ZERO, sync).unwrap());
        assert_eq!(synced.get(), 1);
        let (set, in_use) = on_disk(&path);
        assert!(!in_use && map.settled());
        assert!(set.extents.contains(1) && set.extents.len() == 1);
        // Settled already: nothing to do.
        assert!(!map.settle(Duration::ZERO, sync).unwrap());
        assert_eq!(synced.get(), 1);
        // A crash now keeps the map.
        let (again, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Clean);
        assert_eq!(again.current(), map.current());
        drop(again);
        // Each change that adds to the map writes IN_USE first.
        let changes: [&dyn Fn(&DirtyMap); 3] = [
            &|m| m.mark(1 << 20, 1).unwrap(),
            &|m| m.merge(&fixture_set(false)).unwrap(),
            &DirtyMap::lose,
        ];
        for change in changes {
            assert!(map.settle(Duration::ZERO, sync).unwrap() || map.settled());
            assert!(!on_disk(&path).1);
            change(&map);
            assert!(on_disk(&path).1, "the change did not arm the map");
            assert!(!map.settled());
            let (_, rec) = DirtyMap::open(&path, 4096).unwrap();
            assert_eq!(rec, Recovery::Unclean);
        }
        // A change while the data syncs: the settle gives up.
        let racing = || {
            map.mark(0, 1).unwrap();
            Ok(())
        };
        assert!(!map.settle(Duration::ZERO, racing).unwrap());
        assert!(on_disk(&path).1);
        // A failed sync leaves the map in use.
        let failing = || Err(io::Error::other("disk gone"));
        assert!(map.settle(Duration::ZERO, failing).is_err());
        assert!(on_disk(&path).1);
        // A freeze's set is held back from settled copies until its
        // snapshot is durable: no settle, and a clean shutdown leaves the
        // map in use.
        assert!(map.settle(Duration::ZERO, sync).unwrap());
        map.mark(8 << 20, 1).unwrap();
        let frozen = map.take();
        assert!(frozen.extents.contains(2048));
        assert!(!map.settle(Duration::ZERO, sync).unwrap());
        map.close().unwrap();
        assert!(on_disk(&path).1, "settled while a freeze was pending");
        map.kept();
        assert!(map.settle(Duration::ZERO, sync).unwrap());
        assert!(!on_disk(&path).1);
        // A settle that began before its volume was deleted writes nothing
        // (a new volume of the same name may own the file by then).
        map.mark(0, 1).unwrap();
        let deleted = || {
            map.forget();
            std::fs::write(&path, b"the new volume's").unwrap();
            Ok(())
        };
        assert!(!map.settle(Duration::ZERO, deleted).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"the new volume's");
        map.mark(0, 1).unwrap();
        map.close().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"the new volume's");
    }

    /// A freeze of a settled map takes its changes out without writing the
    /// file: the settled copy, a superset, stays trusted (a crash counts
    /// those changes again, and loses none), and the next settle writes
    /// the set as it is now.
    #[test]
    fn a_settle_after_a_freeze_writes_the_set_without_what_it_took() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let map = DirtyMap::create(&path, 4096).unwrap();
        map.mark(0, 8 << 20).unwrap();
        assert!(map.settle(Duration::ZERO, || Ok(())).unwrap());
        let taken = map.take();
        assert_eq!(taken.extents.len(), 2048);
        assert!(!on_disk(&path).1, "a freeze writes nothing");
        assert_eq!(on_disk(&path).0.extents.len(), 2048);
        assert!(!map.settle(Duration::ZERO, || Ok(())).unwrap(), "frozen");
        map.kept();
        assert!(map.settle(Duration::ZERO, || Ok(())).unwrap());
        let (set, in_use) = on_disk(&path);
        assert!(!in_use && set.known && set.extents.is_empty());
        assert!(
            !map.settle(Duration::ZERO, || Ok(())).unwrap(),
            "written once"
        );
        // The end of a full restore likewise.
        map.mark(1 << 20, 4096).unwrap();
        assert!(map.settle(Duration::ZERO, || Ok(())).unwrap());
        map.reset();
        assert!(map.settle(Duration::ZERO, || Ok(())).unwrap());
        assert!(on_disk(&path).0.extents.is_empty());
    }

    /// With tracking off, a freeze never yields a known set: every backup
    /// reads the whole volume.
    #[test]
    fn a_disabled_map_stays_unknown_across_freezes() {
        let map = DirtyMap::new(4096);
        map.disable();
        map.mark(0, 4096).unwrap();
        assert!(!map.take().known);
        map.kept();
        assert!(!map.take().known, "the second freeze saw a known set");
        map.reset();
        assert!(!map.current().known);
    }

    /// extents {0, 5, 6} and, in version 2, 2^32 + 7 (past 16 TiB at 4 KiB).
    fn fixture_set(v2: bool) -> ChangeSet {
        let mut set = ChangeSet::empty();
        set.extents.insert(0);
        set.extents.insert_range(5..=6);
        if v2 {
            set.extents.insert((1 << 32) + 7);
        }
        set
    }

    #[test]
    fn known_answer_v1_is_still_read() {
        // Committed bytes of format version 1: extents {0, 5, 6}, in use.
        let fixture = include_bytes!("../../../tests/fixtures/dirty-map-v1.bin");
        assert_eq!(u32::from_le_bytes(fixture[8..12].try_into().unwrap()), 1);
        let (back, flags) = decode(fixture, 4096).unwrap();
        assert_eq!(back, fixture_set(false));
        assert_eq!(flags, FLAG_IN_USE);
    }

    #[test]
    fn known_answer_v2() {
        // Committed bytes of format version 2: extents {0, 5, 6, 2^32 + 7}.
        let set = fixture_set(true);
        let bytes = encode(&set, 4096, true);
        let fixture = include_bytes!("../../../tests/fixtures/dirty-map-v2.bin");
        assert_eq!(&bytes[..], &fixture[..], "format version 2 bytes changed");
        let (back, flags) = decode(fixture, 4096).unwrap();
        assert_eq!(back, set);
        assert_eq!(flags, FLAG_IN_USE);
    }

    #[test]
    fn a_64_tib_volume_is_tracked_at_4_kib() {
        let map = DirtyMap::new(4096);
        let last = (64u64 << 40) - 4096;
        map.mark(last, 4096).unwrap();
        map.mark(17 << 40, 8192).unwrap();
        let cur = map.current();
        assert!(cur.contains(last / 4096));
        assert_eq!(cur.extents.len(), 3);
        let runs = cur.runs((17 << 40) / 4096 - 1, (17 << 40) / 4096 + 3, usize::MAX);
        assert_eq!(runs, vec![(1, false), (2, true), (1, false)]);
        let (back, _) = decode(&encode(&cur, 4096, false), 4096).unwrap();
        assert_eq!(back, cur);
        // Jumps to the next change, across the 2^32 boundary.
        assert_eq!(cur.next_at(0), Some((17 << 40) / 4096));
        assert_eq!(
            cur.next_at((17 << 40) / 4096 + 1),
            Some((17 << 40) / 4096 + 1)
        );
        assert_eq!(cur.next_at((17 << 40) / 4096 + 2), Some(last / 4096));
        assert_eq!(cur.next_at(last / 4096 + 1), None);
        assert_eq!(ChangeSet::unknown().next_at(5), Some(5));
    }
}
