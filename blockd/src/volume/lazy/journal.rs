//! The present map's journal: units marked present since the map was
//! last written, kept where a crash of blockd alone cannot lose them.
//!
//! The map (`<volume>.present`) is written only after an fdatasync of the
//! data file, every two seconds, at a FLUSH, and at shutdown. Without more,
//! a `kill -9` loses the marks made since: a unit a client claimed and
//! wrote whole (acknowledged, not yet flushed) was missing again after the
//! restart, and the hydrator filled it with the snapshot's bytes over the
//! write the page cache still held. A volume that is not lazily restored
//! loses nothing acknowledged to a crash of blockd alone; neither should
//! one that is.
//!
//! Each mark is therefore appended (a 4-byte `pwrite`, no sync) to one of
//! two journal files, `<volume>.present.log0` and `.log1`, before what it
//! stands for can be acknowledged: a claim before its write is issued, a
//! fill after its data is written. A page-cache write survives the process,
//! so at the next start in the same boot (the header holds the kernel's
//! boot id) the journal's units are added to the map, the data file is
//! synced and the map written. In another boot (the host went down) the
//! page cache is gone and the journal is not trusted: the map alone
//! counts, as written after a sync, and unflushed writes may be lost, as
//! NBD allows.
//!
//! Two files, so that the journal stays small without losing a mark: a
//! checkpoint of the map switches the appends to the other file, and the
//! file switched away from is emptied once a map taken at or after that
//! checkpoint is written (every mark in it is then in the map). Marks and
//! the switch happen under the map's lock, so no mark lands in a file
//! after the checkpoint that retired it.
//!
//! Bytes (little-endian): a 96-byte header, then one u32 unit number per
//! mark.
//! ```text
//! 0   8  magic "BLKDPLOG"   (never change)
//! 8   4  version = 1
//! 12  4  length of the boot id (at most 64)
//! 16  8  unit size in bytes
//! 24  8  volume size in bytes
//! 32 64  boot id, zero-padded
//! 96  …  u32 unit numbers
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use crate::magic::{PRESENT_LOG_MAGIC as MAGIC, PRESENT_LOG_VERSION as VERSION};

/// Header length; the first mark is at this offset.
const HEADER: usize = 96;
/// [`HEADER`] as a file offset.
const FIRST: u64 = HEADER as u64;
/// Longest boot id kept (a kernel's is 36 characters).
const BOOT_MAX: usize = 64;

/// The journal files of the present map at `map`.
pub fn paths(map: &Path) -> [PathBuf; 2] {
    [0, 1].map(|i| {
        let mut p = map.to_path_buf();
        p.as_mut_os_string().push(format!(".log{i}"));
        p
    })
}

/// The two journal files, appended to under the map's lock.
pub struct Journal {
    files: [File; 2],
    /// Where the next mark goes in each file.
    len: [u64; 2],
    /// The file marks are appended to.
    active: usize,
    /// For the file not active: the generation of the checkpoint that
    /// switched away from it, until a map that covers it is written.
    retired_at: [Option<u64>; 2],
    /// False once a write failed: marks are then not journaled (a crash
    /// of blockd may cost unflushed writes, as without a journal).
    ok: bool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("len", &self.len)
            .field("active", &self.active)
            .field("ok", &self.ok)
            .finish_non_exhaustive()
    }
}

/// This boot's id, if the kernel tells it: without it a journal of
/// another boot (the host went down, its page cache with it) could not be
/// told from this one's, so there is no journal.
fn boot() -> Option<&'static str> {
    Some(crate::durable::boot_id()).filter(|b| *b != "unknown" && !b.is_empty())
}

fn header(unit: u64, size: u64) -> Vec<u8> {
    let boot = boot().unwrap_or_default().as_bytes();
    let boot = &boot[..boot.len().min(BOOT_MAX)];
    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    // At most BOOT_MAX.
    h.extend_from_slice(&u32::try_from(boot.len()).unwrap_or(0).to_le_bytes());
    h.extend_from_slice(&unit.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(boot);
    h.resize(HEADER, 0);
    h
}

/// The units a journal file written in this boot, for this unit and
/// volume size, holds (below `units`); nothing from another boot or
/// another volume's shape, or from a file that is not a journal. Read a
/// piece at a time: a journal may hold a mark for each of a large
/// volume's units.
fn read_file(f: &File, unit: u64, size: u64, units: u32) -> io::Result<RoaringBitmap> {
    const PIECE: usize = 1 << 20;
    let mut head = [0u8; HEADER];
    let mut out = RoaringBitmap::new();
    let got = f.read_at(&mut head, 0)?;
    if got < HEADER || head[..] != header(unit, size)[..] {
        return Ok(out);
    }
    let mut buf = vec![0u8; PIECE];
    let mut at = FIRST;
    loop {
        let n = f.read_at(&mut buf, at)?;
        // Whole marks only: a torn last one is not read.
        let whole = n - n % 4;
        if whole == 0 {
            return Ok(out);
        }
        for m in buf[..whole].chunks_exact(4) {
            let u = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            if u < units {
                out.insert(u);
            }
        }
        at += whole as u64;
    }
}

impl Journal {
    /// What the journal files beside the map at `map` hold from this boot
    /// (see [`read_file`]). The caller makes these units durable in the map
    /// (after a sync of the data file) before [`Journal::start`] empties
    /// the files.
    ///
    /// # Errors
    /// I/O reading a file that is there.
    pub fn recover(map: &Path, unit: u64, size: u64, units: u32) -> io::Result<RoaringBitmap> {
        let mut found = RoaringBitmap::new();
        if boot().is_none() {
            return Ok(found);
        }
        for p in &paths(map) {
            match File::open(p) {
                Ok(f) => found |= read_file(&f, unit, size, units)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(found)
    }

    /// The journal files beside the map at `map`, started empty.
    ///
    /// # Errors
    /// I/O creating or emptying the files.
    pub fn start(map: &Path, unit: u64, size: u64) -> io::Result<Self> {
        let h = header(unit, size);
        let open = |p: &PathBuf| -> io::Result<File> {
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)?;
            f.write_all_at(&h, 0)?;
            Ok(f)
        };
        let paths = paths(map);
        let ok = boot().is_some();
        if !ok {
            tracing::warn!(map = %map.display(), "the kernel's boot id cannot be read: the present map is not journaled, and a crash of blockd may lose writes to this lazily restored volume that were not flushed");
        }
        Ok(Self {
            files: [open(&paths[0])?, open(&paths[1])?],
            len: [FIRST; 2],
            active: 0,
            retired_at: [None; 2],
            ok,
        })
    }

    /// Appends unit `u` to the active file. A failure turns the journal
    /// off, said once.
    pub fn append(&mut self, u: u32, volume: &Path) {
        if !self.ok {
            return;
        }
        let a = self.active;
        match self.files[a].write_all_at(&u.to_le_bytes(), self.len[a]) {
            Ok(()) => self.len[a] += 4,
            Err(e) => {
                self.ok = false;
                tracing::warn!(map = %volume.display(), error = %e, "journaling the present map failed: until the restore ends, a crash of blockd may lose writes not yet flushed");
            }
        }
    }

    /// A checkpoint of the map at `generation`: appends go to the other
    /// file from now on.
    pub fn switch(&mut self, generation: u64) {
        let old = self.active;
        self.active = 1 - old;
        self.retired_at[old] = Some(generation);
        self.retired_at[self.active] = None;
    }

    /// A map at `persisted` (or later) is written: the file retired at or
    /// before it holds nothing the map lacks, and is emptied.
    pub fn written(&mut self, persisted: u64) {
        for i in 0..2 {
            if i == self.active || self.retired_at[i].is_none_or(|g| g > persisted) {
                continue;
            }
            if self.files[i].set_len(FIRST).is_ok() {
                self.len[i] = FIRST;
                self.retired_at[i] = None;
            }
        }
    }
}

/// Removes the journal files beside the map at `map`.
///
/// # Errors
/// I/O other than a missing file.
pub fn remove(map: &Path) -> io::Result<()> {
    for p in paths(map) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(j: &Path) -> Vec<u32> {
        Journal::recover(j, 4096, 1 << 20, 256)
            .unwrap()
            .iter()
            .collect()
    }

    #[test]
    fn a_file_emptied_only_once_a_map_covers_it() {
        let d = tempfile::tempdir().unwrap();
        let map = d.path().join("v.present");
        let mut j = Journal::start(&map, 4096, 1 << 20).unwrap();
        j.append(1, &map);
        j.append(2, &map);
        j.switch(2);
        j.append(3, &map);
        // A map older than the switch covers neither file.
        j.written(1);
        assert_eq!(units(&map), vec![1, 2, 3]);
        j.written(2);
        assert_eq!(units(&map), vec![3]);
        // Back to the first file; the second, retired at 3, waits for a
        // map at 3 or later.
        j.switch(3);
        j.append(4, &map);
        j.written(2);
        assert_eq!(units(&map), vec![3, 4]);
        j.written(3);
        assert_eq!(units(&map), vec![4]);
        // Started afresh: nothing.
        drop(j);
        Journal::start(&map, 4096, 1 << 20).unwrap();
        assert!(units(&map).is_empty());
    }

    fn read(bytes: &[u8], unit: u64, size: u64, units: u32) -> RoaringBitmap {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j");
        std::fs::write(&p, bytes).unwrap();
        read_file(&File::open(&p).unwrap(), unit, size, units).unwrap()
    }

    #[test]
    fn only_this_boots_journal_of_this_shape_counts() {
        let mut bytes = header(4096, 1 << 20);
        for u in [5u32, 7, 9999] {
            bytes.extend_from_slice(&u.to_le_bytes());
        }
        // A torn last mark is not read.
        bytes.extend_from_slice(&[1, 2]);
        let got: Vec<u32> = read(&bytes, 4096, 1 << 20, 256).iter().collect();
        assert_eq!(got, vec![5, 7], "a unit past the end is not taken");
        // Another shape.
        assert!(read(&bytes, 8192, 1 << 20, 128).is_empty());
        assert!(read(&bytes, 4096, 2 << 20, 512).is_empty());
        // Another boot: the page cache that held the writes is gone.
        let mut other = bytes.clone();
        other[32] ^= 1;
        assert!(read(&other, 4096, 1 << 20, 256).is_empty());
        // Not a journal.
        let mut foreign = bytes;
        foreign[0] = b'X';
        assert!(read(&foreign, 4096, 1 << 20, 256).is_empty());
        assert!(read(b"short", 4096, 1 << 20, 256).is_empty());
    }
}
