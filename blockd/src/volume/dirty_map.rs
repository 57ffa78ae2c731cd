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
//! so it is always one whole version. While the daemon runs, the file on
//! disk carries IN_USE (as QEMU marks its persistent bitmaps "in use"); a
//! clean shutdown rewrites it without. Finding IN_USE at start therefore
//! means the previous run did not stop cleanly, and the map is unknown.

use std::io;
use std::path::Path;
use std::sync::Mutex;

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

/// The live map of one volume.
#[derive(Debug)]
pub struct DirtyMap {
    extent_size: u64,
    inner: Mutex<ChangeSet>,
    /// Tracking switched off (`blockd --no-change-tracking`): nothing is
    /// marked and the map is unknown.
    disabled: std::sync::atomic::AtomicBool,
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
    /// A fresh, empty, trusted map.
    pub fn new(extent_size: u64) -> Self {
        Self {
            extent_size,
            inner: Mutex::new(ChangeSet::empty()),
            disabled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChangeSet> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the extents of `offset..offset + len` changed.
    pub fn mark(&self, offset: u64, len: u64) {
        if self.disabled.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let r = extent_range(offset, len, self.extent_size);
        self.lock().extents.insert_range(r);
    }

    /// A copy of the current set.
    pub fn current(&self) -> ChangeSet {
        self.lock().clone()
    }

    /// Replaces the set with an empty trusted one and returns the old one
    /// (the frozen change set of a snapshot).
    pub fn take(&self) -> ChangeSet {
        std::mem::replace(&mut *self.lock(), ChangeSet::empty())
    }

    /// Adds a change set back (an abandoned snapshot's changes are never
    /// forgotten).
    pub fn merge(&self, changes: &ChangeSet) {
        self.lock().merge(changes);
    }

    /// Marks the whole map unknown.
    pub fn lose(&self) {
        *self.lock() = ChangeSet::unknown();
    }

    /// Stops tracking: the map becomes unknown and writes no longer mark it.
    pub fn disable(&self) {
        self.disabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.lose();
    }

    /// Loads the map persisted at `path`, then immediately rewrites it with
    /// IN_USE so a crash of this run is detected by the next.
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
        let map = Self {
            extent_size,
            inner: Mutex::new(set),
            disabled: std::sync::atomic::AtomicBool::new(false),
        };
        map.persist(path, true)?;
        Ok((map, recovery))
    }

    /// Writes the map to `path` atomically; `in_use` while the daemon runs.
    ///
    /// # Errors
    /// I/O failures, naming the file.
    pub fn persist(&self, path: &Path, in_use: bool) -> Result<(), MapFileError> {
        let bytes = encode(&self.current(), self.extent_size, in_use);
        crate::durable::write_atomic(path, &bytes).map_err(|source| MapFileError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Creates the file of a brand-new volume (empty, trusted, in use).
    ///
    /// # Errors
    /// I/O failures.
    pub fn create(path: &Path, extent_size: u64) -> Result<Self, MapFileError> {
        let map = Self::new(extent_size);
        map.persist(path, true)?;
        Ok(map)
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
                        map.mark(o, l);
                        for e in (o / es)..=((o + l - 1) / es) {
                            model.insert(e);
                        }
                    }
                    Op::Take => taken.push((map.take(), std::mem::take(&mut model))),
                    Op::Merge => {
                        if let Some((set, m)) = taken.pop() {
                            map.merge(&set);
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
        map.mark(8192, 1);
        map.persist(&path, false).unwrap();
        // Clean reopen: trusted, and now in use on disk.
        let (map, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Clean);
        assert!(map.current().known && map.current().extents.contains(2));
        // No clean persist: the next open finds IN_USE.
        drop(map);
        let (map, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Unclean);
        assert!(!map.current().known);
        assert!(map.current().contains(12345));
        // Unknown survives a clean shutdown until a backup resets it.
        map.persist(&path, false).unwrap();
        let (map, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Clean);
        assert!(!map.current().known);
        // A corrupt file is unknown, never trusted.
        std::fs::write(&path, b"BLKDDIRT garbage").unwrap();
        drop(map);
        let (_, rec) = DirtyMap::open(&path, 4096).unwrap();
        assert_eq!(rec, Recovery::Corrupt);
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
        map.mark(last, 4096);
        map.mark(17 << 40, 8192);
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
