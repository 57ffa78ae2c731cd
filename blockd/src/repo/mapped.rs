//! Large transfer buffers in anonymous mappings, kept for reuse while a
//! bulk job runs and given back to the system when it ends.
//!
//! A backup fills packs of 16 MiB and a restore reads ranges of up to
//! 8 MiB. From the heap, buffers of that size stayed in the allocator's
//! arenas after the job: tens of MiB of RSS in a daemon that had gone
//! idle (kernel-notes/README.md, "Backups and restores"). An anonymous
//! mapping goes back to the system when it is unmapped. A fresh mapping
//! costs a fault and a cleared page per 4 KiB, so a few buffers are kept
//! from one use to the next ([`POOL_MAX`]) until the job calls
//! [`release_buffers`] (through [`ReleaseOnDrop`]); huge pages make the
//! faults fewer.
//!
//! Mappings are page-aligned, as `O_DIRECT` reads want (`super::direct`).

use bytes::Bytes;

/// Buffers kept for reuse: a restore's GETs in flight, or a backup's pack
/// uploads in flight and the pack filling, with some slack.
const POOL_MAX: usize = 6;

/// Idle buffers, until [`release_buffers`].
static POOL: std::sync::Mutex<Vec<memmap2::MmapMut>> = std::sync::Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<memmap2::MmapMut>> {
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unmaps the idle buffers; a bulk job calls it when it ends, so that its
/// memory goes back to the system with it. Buffers still in use go back to
/// the pool when dropped, for the next job or the next release.
pub fn release_buffers() {
    pool().clear();
}

/// Calls [`release_buffers`] when dropped: held by a bulk job for as long
/// as it runs, whichever way it ends.
pub struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_buffers();
    }
}

/// A buffer in an anonymous mapping, page-aligned; back to the pool when
/// dropped.
pub struct Buffer(Option<memmap2::MmapMut>);

impl Buffer {
    /// A buffer of at least `len` bytes (and at least `min`, the size a
    /// caller maps so that its buffers are reused by its next calls): the
    /// smallest idle one that is large enough, or a new mapping.
    ///
    /// # Errors
    /// The mapping failed (out of address space or memory).
    pub fn take(len: usize, min: usize) -> std::io::Result<Self> {
        {
            let mut pool = pool();
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, m)| m.len() >= len)
                .min_by_key(|(_, m)| m.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(Self(Some(pool.swap_remove(i))));
            }
        }
        let m = memmap2::MmapMut::map_anon(len.max(min).max(1))?;
        let _ = m.advise(memmap2::Advice::HugePage);
        Ok(Self(Some(m)))
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            let mut pool = pool();
            if pool.len() < POOL_MAX {
                pool.push(m);
            }
        }
    }
}

/// A growing byte string in a [`Buffer`]: what a pack is built in.
#[derive(Default)]
pub struct Bytestring {
    buf: Option<Buffer>,
    len: usize,
}

impl std::fmt::Debug for Bytestring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bytestring")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl Bytestring {
    /// Room for `capacity` bytes; nothing is mapped for 0.
    ///
    /// # Errors
    /// The mapping failed.
    pub fn with_capacity(capacity: usize) -> std::io::Result<Self> {
        let buf = if capacity == 0 {
            None
        } else {
            Some(Buffer::take(capacity, capacity)?)
        };
        Ok(Self { buf, len: 0 })
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn capacity(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    /// Appends `bytes`, moving to a mapping twice as large when they do
    /// not fit (a pack sized by its config never does).
    ///
    /// # Errors
    /// The mapping failed; nothing is appended.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let end = self.len + bytes.len();
        if end > self.capacity() {
            let mut bigger = Buffer::take(end.max(2 * self.capacity()), 1 << 20)?;
            if let Some(old) = &self.buf {
                bigger[..self.len].copy_from_slice(&old[..self.len]);
            }
            self.buf = Some(bigger);
        }
        if let Some(b) = &mut self.buf {
            b[self.len..end].copy_from_slice(bytes);
        }
        self.len = end;
        Ok(())
    }

    /// The bytes, owning the mapping: it goes back to the pool when the
    /// last clone of them is dropped.
    pub fn into_bytes(self) -> Bytes {
        let Self { buf, len } = self;
        buf.map_or_else(Bytes::new, |b| Bytes::from_owner(b).slice(..len))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn a_bytestring_holds_what_was_appended_across_growth() {
        let mut s = Bytestring::with_capacity(0).unwrap();
        assert!(s.is_empty());
        let mut want = Vec::new();
        for i in 0..40u32 {
            let piece: Vec<u8> = (0..100_000u32).map(|j| (i * 31 + j) as u8).collect();
            s.extend_from_slice(&piece).unwrap();
            want.extend_from_slice(&piece);
        }
        assert_eq!(s.len(), want.len());
        let b = s.into_bytes();
        assert!(b == want[..], "bytes differ after growth");
        assert!(Bytestring::default().into_bytes().is_empty());
    }

    #[test]
    fn taken_buffers_are_page_aligned_and_large_enough() {
        for len in [1usize, 4096, 5000, 3 << 20] {
            let b = Buffer::take(len, 0).unwrap();
            assert!(b.len() >= len);
            assert_eq!(b.as_ptr() as usize % 4096, 0);
        }
    }
}
