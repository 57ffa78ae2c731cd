//! Copy-on-write: frozen images of a volume kept intact while it changes.
//!
//! This is the one owner of copy-on-write. A held snapshot (owned by the
//! `snapshot` module, which implements [`FrozenImage`]) is *armed* on its
//! volume at the freeze. From then on:
//! - the guard ([`Volume::guard`], called by every write, trim and zeroing
//!   before it is issued) copies each extent the write would change into
//!   every armed image that still reads it from the live volume;
//! - the frozen image is read with [`Volume::read_frozen`] (the snapshot
//!   export and the backup both use it): the live range first, then every
//!   extent preserved meanwhile replaced by its copy;
//! - [`Volume::frozen_data`] tells which ranges of the frozen image may
//!   hold data (a backup reads nothing else).
//!
//! Ordering rule, which makes reads exact without a lock against writers:
//! an extent is recorded as preserved (data first, then the record) before
//! the write that changes it is issued. A live read that saw new data
//! therefore finds the extent preserved when it checks afterwards, and two
//! writers racing on one extent both copy the same old bytes (the first
//! record wins; `preserve` is idempotent).

use std::io;
use std::sync::Arc;

use super::{dirty_map, Run, Volume};

/// Alignment of direct reads: buffer address, offset and length (the
/// largest logical block size of the devices blockd runs on).
pub const DIRECT_ALIGN: usize = 4096;

/// Makes `buf` hold `n` bytes starting at a [`DIRECT_ALIGN`]ed address:
/// returns the buffer and where the `n` bytes start. Reuses the
/// allocation when it is large enough.
pub fn aligned(mut buf: Vec<u8>, n: usize) -> (Vec<u8>, usize) {
    buf.clear();
    buf.reserve(n + DIRECT_ALIGN);
    // Capacity is enough: the resize below does not move the buffer.
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    buf.resize(start + n, 0);
    (buf, start)
}

/// What the guard needs of a frozen image. Extents are numbered in the
/// volume's extent size.
pub trait FrozenImage: Send + Sync + std::fmt::Debug {
    /// Size of the frozen image (the volume's size at the freeze).
    fn size(&self) -> u64;
    /// True when extent `e` has been preserved.
    fn preserved(&self, e: u64) -> bool;
    /// The preserved extents in `range`, in order (cost proportional to
    /// them, not to the range).
    fn preserved_in(&self, range: std::ops::Range<u64>) -> Vec<u64>;
    /// The first preserved extent at or after `from`.
    fn next_preserved(&self, from: u64) -> Option<u64>;
    /// Preserves `extents` (ascending, distinct) whose frozen contents lie
    /// back to back in `old`, one extent size each, skipping any already
    /// preserved or past the image's end; returns how many it preserved.
    /// Durable against a process crash on return. One call for many
    /// extents lets the image write them with one write each for data and
    /// index (see [`Volume::guard_many`]).
    ///
    /// # Errors
    /// I/O failures: the writes that needed them must fail.
    fn preserve_many(&self, extents: &[u64], old: &[u8]) -> io::Result<usize>;
    /// Reads preserved extent `e` at `within..within + buf.len()`;
    /// `Ok(false)` when it is not preserved.
    ///
    /// # Errors
    /// I/O failures.
    fn read_preserved(&self, e: u64, within: u64, buf: &mut [u8]) -> io::Result<bool>;
    /// Makes the preserved data durable: at intervals and at shutdown,
    /// not with the volume's FLUSH (see [`crate::snapshot::store`]).
    ///
    /// # Errors
    /// I/O failures.
    fn sync(&self) -> io::Result<()>;
    /// Called when a FLUSH or FUA write of the volume has made its
    /// writes durable: the copies they displaced are then due.
    fn volume_flushed(&self) {}
}

impl Volume {
    /// Arms the guard for a frozen image (called with the gate held).
    pub fn arm(&self, image: Arc<dyn FrozenImage>) {
        self.held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(image);
    }

    /// Disarms the guard of an image being released or deleted.
    pub fn disarm<T: FrozenImage>(&self, image: &Arc<T>) {
        self.held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|s| !std::ptr::addr_eq(Arc::as_ptr(s), Arc::as_ptr(image)));
    }

    /// Tells every armed image that the volume's writes so far are
    /// durable (a FLUSH or FUA write).
    pub(super) fn tell_flushed(&self) {
        for s in self
            .held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            s.volume_flushed();
        }
    }

    pub(super) fn held_images(&self) -> Vec<Arc<dyn FrozenImage>> {
        self.held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The guard: before `offset..offset + len` changes, every armed image
    /// that still reads an affected extent from the live volume gets a copy
    /// of it.
    pub(super) fn guard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.guard_many(&[(offset, len)])
    }

    fn needed<'a>(
        &'a self,
        held: &'a [Arc<dyn FrozenImage>],
        ranges: &'a [(u64, u64)],
    ) -> impl Iterator<Item = u64> + 'a {
        let es = self.extent_size;
        ranges
            .iter()
            .filter(|(_, len)| *len > 0)
            .flat_map(move |&(offset, len)| dirty_map::extent_range(offset, len, es))
            .filter(move |&e| held.iter().any(|s| e * es < s.size() && !s.preserved(e)))
    }

    /// [`Self::guard`] for several ranges at once, as a batch of writes
    /// needs: the extents to copy are read into one buffer and each image
    /// stores them with one data write and one index write, not two writes
    /// per extent. With random 4 KiB writes after a freeze, where most
    /// writes need a copy, that halves what the copies cost
    /// (kernel-notes/README.md, "Copy-on-write").
    pub(super) fn guard_many(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let held = self
            .held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.is_empty() {
            return Ok(());
        }
        let mut extents: Vec<u64> = self.needed(&held, ranges).collect();
        if extents.is_empty() {
            return Ok(());
        }
        extents.sort_unstable();
        extents.dedup();
        // es is an extent size, at most a few MiB (validated at create).
        let es = usize::try_from(self.extent_size).map_err(io::Error::other)?;
        let mut old = vec![0u8; extents.len() * es];
        for (e, buf) in extents.iter().zip(old.chunks_exact_mut(es)) {
            self.read_live(buf, e * self.extent_size)?;
        }
        for s in held.iter() {
            // Each image keeps the ones it still needs.
            let copied = s.preserve_many(&extents, &old)?;
            self.stats.cow(copied as u64 * self.extent_size);
        }
        Ok(())
    }

    /// Reads live bytes synchronously; past the end of the file reads zeros.
    fn read_live(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Fills `buf[start..]` with the frozen image of `image` from `offset`,
    /// through the I/O engine: the live range is read first, then every
    /// extent the guard has preserved meanwhile is replaced by its copy
    /// (exact by the ordering rule above). Bytes past the image's size read
    /// as zeros. The first `start` bytes are left for a reply header, and
    /// `buf` is reused: a recycled buffer costs no allocation or zeroing.
    ///
    /// # Errors
    /// I/O errors.
    pub async fn read_frozen(
        &self,
        image: &dyn FrozenImage,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
    ) -> io::Result<Vec<u8>> {
        self.read_frozen_via(image, buf, start, offset, false).await
    }

    /// [`Volume::read_frozen`] for a bulk reader that reads each byte once
    /// (a backup): the live range is read with `O_DIRECT` when `buf[start..]`,
    /// `offset` and the length are aligned to [`DIRECT_ALIGN`] and the file
    /// system allows it, so the read neither fills the page cache nor
    /// evicts the working set of the volume's clients. The kernel writes
    /// back dirty cached pages of the range before a direct read, and the
    /// preserved extents are laid over afterwards as for a cached read, so
    /// the result is the same frozen image. Anything unaligned goes
    /// through the page cache, and so does a range whose every page is
    /// cached already (what a busy client wrote lately): read from memory,
    /// it puts no read and no forced writeback in the disk's queue ahead
    /// of the client's own flushes (kernel-notes/README.md, "Flush and
    /// FUA").
    ///
    /// # Errors
    /// I/O errors.
    pub async fn read_frozen_direct(
        &self,
        image: &dyn FrozenImage,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
    ) -> io::Result<Vec<u8>> {
        self.read_frozen_via(image, buf, start, offset, true).await
    }

    async fn read_frozen_via(
        &self,
        image: &dyn FrozenImage,
        mut buf: Vec<u8>,
        start: usize,
        offset: u64,
        direct: bool,
    ) -> io::Result<Vec<u8>> {
        let len = buf.len() - start;
        let live_len = usize::try_from(image.size().saturating_sub(offset))
            .unwrap_or(len)
            .min(len);
        buf.truncate(start + live_len);
        let align = DIRECT_ALIGN as u64;
        // Within the file's aligned part, so a direct read never meets an
        // unaligned end of file.
        let aligned = buf.as_ptr().wrapping_add(start).align_offset(DIRECT_ALIGN) == 0
            && offset.is_multiple_of(align)
            && live_len.is_multiple_of(DIRECT_ALIGN)
            && offset + live_len as u64 <= self.size() / align * align;
        let file = match direct && aligned && !self.all_cached(offset, live_len as u64) {
            true => self.direct_reader().unwrap_or_else(|| self.file.clone()),
            false => self.file.clone(),
        };
        let mut buf = self.engine.read_at(&file, buf, start, offset).await?;
        buf.resize(start + len, 0);
        let es = self.extent_size;
        let end = offset + live_len as u64;
        let mut pos = offset;
        while pos < end {
            let e = pos / es;
            let stop = ((pos / es + 1) * es).min(end);
            // Both below `len`, which is a usize.
            let at = start + usize::try_from(pos - offset).map_err(io::Error::other)?;
            let n = usize::try_from(stop - pos).map_err(io::Error::other)?;
            if image.preserved(e) {
                image.read_preserved(e, pos % es, &mut buf[at..at + n])?;
            }
            pos = stop;
        }
        Ok(buf)
    }

    /// The first byte at or after `from` that may hold data in the frozen
    /// image (a jump over holes, never a walk): the live file's next data
    /// or the next preserved extent, whichever comes first. The file is
    /// asked first, as in [`Volume::frozen_data`]: an extent trimmed
    /// meanwhile was preserved before its hole appeared.
    ///
    /// # Errors
    /// I/O errors of the allocation query.
    pub fn next_frozen_data(&self, image: &dyn FrozenImage, from: u64) -> io::Result<Option<u64>> {
        if from >= image.size() {
            return Ok(None);
        }
        let es = self.extent_size;
        let live = self.next_data(from)?;
        let preserved = image.next_preserved(from / es).map(|e| (e * es).max(from));
        Ok(match (preserved, live) {
            (Some(p), Some(l)) => Some(p.min(l)),
            (p, l) => p.or(l),
        }
        .filter(|&at| at < image.size()))
    }

    /// Byte ranges of `[offset, offset + len)` (relative to `offset`) that
    /// may hold data in the frozen image: the data runs of
    /// [`Self::frozen_allocation`].
    ///
    /// # Errors
    /// I/O errors of the allocation query.
    pub fn frozen_data(
        &self,
        image: &dyn FrozenImage,
        offset: u64,
        len: u64,
    ) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        for run in self.frozen_allocation(image, offset, len, usize::MAX)? {
            if !run.hole {
                out.push((pos, run.length));
            }
            pos += run.length;
        }
        Ok(out)
    }

    /// Allocation of the frozen image in `offset..offset + len`, as
    /// [`Volume::allocation`] reports the live volume's (at most `max_runs`
    /// runs, the last of which may end early, never late): the live file's
    /// data runs, plus every extent the guard preserved inside a live
    /// hole. A live hole with no preserved extent was a hole at the freeze
    /// (the guard preserves an extent before any write or trim changes it,
    /// and this checks after asking the file system), so it reads as
    /// zeros. Live data may have been a hole at the freeze (the extent was
    /// preserved first): reported as data, which is never wrong. Runs
    /// past the live file's end, which cannot be shorter, are data too.
    ///
    /// # Errors
    /// I/O errors of the allocation query.
    pub fn frozen_allocation(
        &self,
        image: &dyn FrozenImage,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> io::Result<Vec<Run>> {
        fn push(out: &mut Vec<Run>, hole: bool, length: u64) {
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += length,
                _ => out.push(Run { length, hole }),
            }
        }
        let es = self.extent_size;
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut pos = offset;
        // Live runs merge when a hole holds preserved extents, so the file
        // is asked again until the runs asked for are known.
        while pos < end && out.len() <= max_runs {
            let live = self.allocation(pos, end - pos, max_runs)?;
            if live.is_empty() {
                break;
            }
            for run in live {
                let stop = pos + run.length;
                if run.hole {
                    // Only the preserved extents inside the hole: a hole of
                    // a 64 TiB volume is not walked extent by extent.
                    let mut at = pos;
                    for e in image.preserved_in(pos / es..stop.div_ceil(es)) {
                        let start = (e * es).max(pos);
                        let stop = ((e + 1) * es).min(stop);
                        if start > at {
                            push(&mut out, true, start - at);
                        }
                        push(&mut out, false, stop - start);
                        at = stop;
                    }
                    if stop > at {
                        push(&mut out, true, stop - at);
                    }
                } else {
                    push(&mut out, false, run.length);
                }
                pos = stop;
            }
        }
        if pos < end && out.len() < max_runs {
            push(&mut out, false, end - pos);
        }
        out.truncate(max_runs);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;

    /// A frozen image kept in memory.
    #[derive(Debug)]
    struct Image {
        size: u64,
        kept: Mutex<BTreeMap<u64, Vec<u8>>>,
    }

    impl FrozenImage for Image {
        fn size(&self) -> u64 {
            self.size
        }
        fn preserved(&self, e: u64) -> bool {
            self.kept.lock().unwrap().contains_key(&e)
        }
        fn preserved_in(&self, range: std::ops::Range<u64>) -> Vec<u64> {
            self.kept
                .lock()
                .unwrap()
                .range(range)
                .map(|(e, _)| *e)
                .collect()
        }
        fn next_preserved(&self, from: u64) -> Option<u64> {
            self.kept
                .lock()
                .unwrap()
                .range(from..)
                .next()
                .map(|(e, _)| *e)
        }
        fn preserve_many(&self, extents: &[u64], old: &[u8]) -> io::Result<usize> {
            let es = old.len() / extents.len();
            let mut kept = self.kept.lock().unwrap();
            let before = kept.len();
            for (e, old) in extents.iter().zip(old.chunks_exact(es)) {
                if *e * (es as u64) < self.size {
                    kept.entry(*e).or_insert_with(|| old.to_vec());
                }
            }
            Ok(kept.len() - before)
        }
        fn read_preserved(&self, e: u64, within: u64, buf: &mut [u8]) -> io::Result<bool> {
            let kept = self.kept.lock().unwrap();
            let Some(d) = kept.get(&e) else {
                return Ok(false);
            };
            let at = usize::try_from(within).unwrap();
            buf.copy_from_slice(&d[at..at + buf.len()]);
            Ok(true)
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn aligned_buffers_start_aligned_and_are_reused() {
        let (buf, start) = aligned(Vec::new(), 10_000);
        assert_eq!(buf.len() - start, 10_000);
        assert_eq!(buf[start..].as_ptr().align_offset(DIRECT_ALIGN), 0);
        let ptr = buf.as_ptr();
        let (again, start) = aligned(buf, 8192);
        assert_eq!(again.as_ptr(), ptr, "a large enough buffer is reused");
        assert_eq!(again[start..].as_ptr().align_offset(DIRECT_ALIGN), 0);
        assert!(again[start..].iter().all(|&b| b == 0));
    }

    /// The frozen image's allocation: live data, and inside live holes
    /// only the extents preserved there; never more runs than asked for,
    /// and the last one never past the range.
    #[tokio::test]
    async fn frozen_allocation_maps_preserved_extents_in_holes() {
        let dir = tempfile::tempdir().unwrap();
        let es = 4096u64;
        let v = crate::volume::scratch(dir.path(), 64 * es, es);
        v.write(0, vec![1; 4 * 4096], 0, false).await.unwrap();
        let image = Arc::new(Image {
            size: 64 * es,
            kept: Mutex::new(BTreeMap::new()),
        });
        v.arm(image.clone());
        // Extents 10 and 20 written after the freeze (holes at it), extent
        // 2 trimmed: each is preserved first.
        v.write(10 * es, vec![2; 4096], 0, false).await.unwrap();
        v.write(20 * es + 100, vec![3; 10], 0, false).await.unwrap();
        v.trim(2 * es, es, false).await.unwrap();
        let runs = |off: u64, len: u64, max: usize| -> Vec<(u64, bool)> {
            v.frozen_allocation(&*image, off, len, max)
                .unwrap()
                .iter()
                .map(|r| (r.length / es, r.hole))
                .collect()
        };
        assert_eq!(
            runs(0, 64 * es, usize::MAX),
            [
                (4, false),
                (6, true),
                (1, false),
                (9, true),
                (1, false),
                (43, true)
            ],
        );
        assert_eq!(runs(0, 64 * es, 2), [(4, false), (6, true)]);
        assert_eq!(runs(8 * es, 4 * es, 8), [(2, true), (1, false), (1, true)]);
        assert_eq!(
            v.frozen_data(&*image, 8 * es, 16 * es).unwrap(),
            [(2 * es, es), (12 * es, es)]
        );
    }

    /// A direct read gives the frozen image exactly as a cached read does:
    /// data still dirty in the page cache at the freeze, extents
    /// overwritten since (read from their preserved copies), and an
    /// unaligned tail (read through the cache). A range whose every page
    /// is cached is read from the cache, anything else past it.
    #[tokio::test]
    async fn direct_reads_of_a_frozen_image_match_cached_ones() {
        // On the disk-backed temp dir: tmpfs may not do O_DIRECT.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let es = 4096u64;
        let size = 64 * es + 512;
        let v = crate::volume::scratch(dir.path(), size, es);
        // Which way each read went is seen in the page cache's state; a
        // kernel without cachestat(2) reads everything past the cache, and
        // only the contents are checked.
        let cache = |from: u64, n: u64| crate::volume::cachestat(&v.file, from * es, n * es);
        let seen = cache(0, 1).is_some();
        if !seen {
            eprintln!("no cachestat(2) in this kernel: which path a read took is not checked");
        }
        // Frozen contents: byte i is i % 251. Extents 32 on are on the
        // disk and out of the cache; 0-31 are in the cache, never synced.
        let frozen: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let half = usize::try_from(32 * es).unwrap();
        v.write(32 * es, frozen[half..].to_vec(), 0, false)
            .await
            .unwrap();
        v.file.sync_data().unwrap();
        let rest = std::num::NonZeroU64::new(size - 32 * es);
        rustix::fs::fadvise(&*v.file, 32 * es, rest, rustix::fs::Advice::DontNeed).unwrap();
        if seen {
            assert_eq!(cache(32, 33).map(|s| s.cache), Some(0), "dropped");
        }
        v.write(0, frozen[..half].to_vec(), 0, false).await.unwrap();
        let image = Arc::new(Image {
            size,
            kept: Mutex::new(BTreeMap::new()),
        });
        v.arm(image.clone());
        // After the freeze: extents 3 and 63 and the tail overwritten.
        for at in [3 * es + 100, 63 * es, 64 * es] {
            v.write(at, vec![0xee; 300], 0, false).await.unwrap();
        }
        assert!(image.preserved(3) && image.preserved(63) && image.preserved(64));
        // Extents 0-7, all cached and dirty: read from the cache, so
        // nothing is written back ahead of the read.
        let (buf, start) = aligned(Vec::new(), usize::try_from(8 * es).unwrap());
        let got = v.read_frozen_direct(&*image, buf, start, 0).await.unwrap();
        assert!(got[start..] == frozen[..8 * 4096], "cached range");
        if seen {
            assert_eq!(cache(0, 8).map(|s| s.dirty), Some(8), "read in the cache");
        }
        // The whole image, half of it out of the cache: read past the
        // cache, which first writes back what is dirty in the range.
        let whole = usize::try_from(64 * es).unwrap();
        let (buf, start) = aligned(Vec::new(), whole);
        let got = v.read_frozen_direct(&*image, buf, start, 0).await.unwrap();
        assert!(got[start..] == frozen[..whole], "aligned direct read");
        assert!(
            v.direct_reader().is_some(),
            "/var/tmp takes O_DIRECT: the direct path was the one compared"
        );
        if seen {
            assert_eq!(
                cache(0, 64).map(|s| s.dirty),
                Some(0),
                "read past the cache"
            );
        }
        // Unaligned offset, and the tail past the aligned end of the file.
        let (buf, start) = aligned(Vec::new(), 1000);
        let got = v
            .read_frozen_direct(&*image, buf, start, 64 * es - 488)
            .await
            .unwrap();
        let at = usize::try_from(64 * es - 488).unwrap();
        assert_eq!(&got[start..], &frozen[at..at + 1000]);
        // The same through the cache.
        let got = v.read_frozen(&*image, vec![0; whole], 0, 0).await.unwrap();
        assert!(got == frozen[..whole], "cached read");
    }
}
