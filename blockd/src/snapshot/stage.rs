//! Copies staged in memory: a ring of extent-sized slots in a file on
//! tmpfs, mapped shared, that a snapshot's copies go into before they
//! reach `cow.data` (see [`super::store`], and kernel-notes/README.md,
//! "Copies staged in memory").
//!
//! A copy written into `cow.data` on the connection's thread costs that
//! thread a buffered write into a page the CPU has not touched lately;
//! with no such write at all, 4k random writes after a freeze ran some
//! 0.04-0.09 closer to their rate with no snapshot held. Written into the
//! ring instead, a copy is a `memcpy` into memory already allocated, and
//! a thread of the snapshot's own moves the ring's slots into `cow.data`
//! in large writes, on CPU time nobody else wants: the writes run in the
//! idle scheduling class. Nothing a request waits for is left to the
//! idle class, though: the thread holds the locks requests take only in
//! the batch class, and whoever must wait for its write raises it to the
//! batch class first (see `Area::drain` in [`super::store`] and
//! [`crate::host::set_class`]). 4k random writes in the 8 s after a
//! freeze ran at 0.918 of their rate with no snapshot held, against
//! 0.868 with the copies written on the connection's thread (three runs
//! of each, in turn).
//!
//! Rings go in `/dev/shm` when it is tmpfs, or where
//! `BLOCKD_COW_STAGE_DIR` says (empty: copies are not staged). Each costs
//! 16 MiB of memory while its snapshot is held, made once the snapshot
//! has taken 1 MiB of copies.
//!
//! The ring is a file on tmpfs, not heap memory, for one reason: a crash
//! of blockd (`kill -9`) must keep every copy, as the page cache keeps a
//! `pwrite`. Its pages belong to the file, not to the process, so the next
//! start finds the slots not yet moved and moves them before the snapshot
//! is read. A host crash loses the ring as it loses unsynced page-cache
//! copies, and the snapshot's `cow.unsynced` marker reports it damaged as
//! before.
//!
//! Layout of the file: a 4 KiB header, then [`RING_BYTES`] of slots; the
//! slot of copy `k` (its `cow.data` slot) is at `k mod slots`.
//! ```text
//! 0..8    magic "BLKDCOW1"
//! 8..24   token: random, also in the snapshot's `cow.staged`
//! 24..32  u64 LE: copies below this slot are in `cow.data`
//! 32      length of the boot id, then the boot id
//! ```

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of slots in a ring.
pub const RING_BYTES: u64 = 16 << 20;
const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"BLKDCOW1";
const DRAINED_AT: usize = 24;
/// `f_type` of tmpfs (`linux/magic.h`).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Set, the directory rings go in (empty: none), and every copy is
/// staged and stays in the ring until a sync or a full ring writes it
/// out: tests use it to crash a daemon with copies in its ring.
pub const TEST_ENV: &str = "BLOCKD_TEST_STAGE";

/// Where rings go instead of `/dev/shm` (empty: copies are not staged).
/// A directory on tmpfs keeps a ring in memory only; on another file
/// system the ring's pages are written back like any file's.
pub const DIR_ENV: &str = "BLOCKD_COW_STAGE_DIR";

/// Where rings go: [`DIR_ENV`], or `/dev/shm` when it is tmpfs.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os(TEST_ENV).or_else(|| std::env::var_os(DIR_ENV)) {
        return (!d.is_empty()).then(|| PathBuf::from(d));
    }
    let dir = Path::new("/dev/shm");
    let fs = rustix::fs::statfs(dir).ok()?;
    #[allow(clippy::unnecessary_cast)]
    (fs.f_type as i64 == TMPFS_MAGIC).then(|| dir.to_path_buf())
}

/// The ring file of the snapshot in directory `snapshot`, under `under`:
/// named by a hash of the snapshot's path, so the next start finds it.
pub fn path_for(under: &Path, snapshot: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(snapshot).unwrap_or_else(|_| snapshot.to_path_buf());
    let hash = blake3::hash(abs.as_os_str().as_encoded_bytes());
    under.join(format!("blockd-cow-{}", &hash.to_hex()[..24]))
}

/// One snapshot's ring, mapped.
#[derive(Debug)]
pub struct Ring {
    path: PathBuf,
    map: memmap2::MmapRaw,
    /// Capacity in slots.
    slots: u64,
    extent_size: usize,
}

impl Ring {
    /// Creates (or replaces) the ring at `path` for extents of
    /// `extent_size`, its slots allocated: a full tmpfs fails here, never
    /// at a store into the mapping.
    ///
    /// # Errors
    /// I/O failures; an extent size too large for a ring of useful size.
    pub fn create(path: &Path, token: [u8; 16], extent_size: u64) -> io::Result<Self> {
        let es = usize::try_from(extent_size).map_err(io::Error::other)?;
        let slots = RING_BYTES / extent_size.max(1);
        if slots < 16 {
            return Err(io::Error::other("extents too large to stage"));
        }
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        let len = HEADER + slots * extent_size;
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len)?;
        let ring = Self::map(path, &file, slots, es)?;
        let mut head = Vec::with_capacity(64);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&token);
        // Nothing to write out until the ring is handed to the copies,
        // which sets the mark to the first slot it takes: a start after a
        // crash before then writes nothing of it over `cow.data`.
        head.extend_from_slice(&u64::MAX.to_le_bytes());
        let boot = crate::durable::boot_id().as_bytes();
        let boot = &boot[..boot.len().min(255)];
        head.push(u8::try_from(boot.len()).unwrap_or(0));
        head.extend_from_slice(boot);
        // SAFETY: the header lies within the mapping (HEADER bytes), and
        // nothing else uses the ring yet.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), ring.map.as_mut_ptr(), head.len());
        }
        Ok(ring)
    }

    /// The ring at `path` if it was made in this boot with `token` for
    /// extents of `extent_size`; `Ok(None)` when there is none, or it is
    /// another's.
    ///
    /// # Errors
    /// I/O failures other than its absence.
    pub fn open(path: &Path, token: [u8; 16], extent_size: u64) -> io::Result<Option<Self>> {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let es = usize::try_from(extent_size).map_err(io::Error::other)?;
        let slots = RING_BYTES / extent_size.max(1);
        if file.metadata()?.len() != HEADER + slots * extent_size {
            return Ok(None);
        }
        let ring = Self::map(path, &file, slots, es)?;
        let head = ring.bytes(0, HEADER);
        let boot = crate::durable::boot_id().as_bytes();
        let n = usize::from(head[32]);
        let ours = &head[..8] == MAGIC
            && head[8..24] == token
            && n == boot.len().min(255)
            && head[33..33 + n] == boot[..n];
        Ok(ours.then_some(ring))
    }

    fn map(path: &Path, file: &File, slots: u64, es: usize) -> io::Result<Self> {
        // The ring file is the daemon's own (mode 0600 on tmpfs, named
        // for one snapshot), allocated in full before it is mapped and
        // never truncated while mapped: a store into it cannot fault for
        // want of a page.
        let map = memmap2::MmapOptions::new().map_raw(file)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            slots,
            extent_size: es,
        })
    }

    /// Capacity in slots.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    fn drained_cell(&self) -> &AtomicU64 {
        // SAFETY: 8-byte aligned (the mapping is page aligned) and inside
        // the header; only ever accessed as this atomic.
        #[allow(unsafe_code)]
        unsafe {
            &*self.map.as_mut_ptr().add(DRAINED_AT).cast::<AtomicU64>()
        }
    }

    /// Copies below this slot are in `cow.data` (as recorded for a start
    /// after a crash).
    pub fn drained(&self) -> u64 {
        self.drained_cell().load(Ordering::Acquire)
    }

    /// Records that copies below `slot` are in `cow.data`.
    pub fn set_drained(&self, slot: u64) {
        self.drained_cell().store(slot, Ordering::Release);
    }

    fn offset(&self, slot: u64) -> u64 {
        HEADER + (slot % self.slots) * self.extent_size as u64
    }

    fn bytes(&self, at: u64, len: u64) -> &[u8] {
        // SAFETY: callers pass ranges inside the mapping; the ring's rule
        // (see [`Ring::put`]) keeps any range read here from being written
        // meanwhile.
        #[allow(unsafe_code, clippy::cast_possible_truncation)]
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(at as usize), len as usize)
        }
    }

    /// Stores copy `slot` (`data` is one extent).
    ///
    /// The rule that makes the shared mapping sound: the slots between
    /// the drained mark and the end of the allocated slots are written
    /// once, by the copy that allocated them, before anyone reads them;
    /// a position is written again only for a slot a whole ring later,
    /// which is allocated only once the drained mark has passed the
    /// earlier one, after which no one reads it from the ring. Callers
    /// allocate and store under the snapshot's index lock, and read a
    /// slot from the ring only while it is at or past the drained mark.
    pub fn put(&self, slot: u64, data: &[u8]) {
        debug_assert_eq!(data.len(), self.extent_size);
        let at = self.offset(slot);
        // SAFETY: `at + extent_size` is inside the mapping; see above for
        // why no one reads these bytes meanwhile.
        #[allow(unsafe_code, clippy::cast_possible_truncation)]
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(at as usize),
                self.extent_size,
            );
        }
    }

    /// Reads copy `slot` from `within` into `buf`.
    pub fn get(&self, slot: u64, within: u64, buf: &mut [u8]) {
        buf.copy_from_slice(self.bytes(self.offset(slot) + within, buf.len() as u64));
    }

    /// Writes copies `from..to` (at most a ring's worth) to `cow.data`.
    ///
    /// # Errors
    /// I/O failures of the writes.
    pub fn write_out(&self, data: &File, from: u64, to: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let es = self.extent_size as u64;
        let mut slot = from;
        while slot < to {
            // Up to the end of the ring, then from its start.
            let run = (to - slot).min(self.slots - slot % self.slots);
            data.write_all_at(self.bytes(self.offset(slot), run * es), slot * es)?;
            slot += run;
        }
        Ok(())
    }

    /// Removes the ring's file (the mapping stays valid until dropped).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
