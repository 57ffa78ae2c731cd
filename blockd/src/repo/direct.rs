//! Large ranged GETs of a local location read with `O_DIRECT`.
//!
//! A full restore, a repack and the hydrator read each pack range once, in
//! pieces of up to 8 MiB. Through the page cache every byte of them takes
//! a fresh cached page, is copied once more into the GET's buffer and is
//! then dropped again (`Objects::drop_cached`). A direct read lands in the
//! buffer at once: no page to allocate, fill and free, no copy
//! (kernel-notes/README.md, "Bulk transfers and the page cache").
//!
//! The wrapper sits under the retry and fault-injection layers, so they
//! see the same GETs as before. `object_store`'s own `get_opts` still
//! resolves the object: a missing file, a range past its end and every
//! precondition give its errors, and the metadata is its own. Only the
//! read of the bytes changes, and only for a bounded range of at least
//! [`DIRECT_MIN`]. A file system that refuses `O_DIRECT` (tmpfs before
//! Linux 6.6) is read through the cache, as before.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// Smallest range read directly. Smaller reads (an index block, a FUSE
/// read of one chunk) may find their pages cached, and a direct read's
/// rounding to whole 4 KiB blocks would weigh on them.
pub const DIRECT_MIN: u64 = 1 << 20;

/// `O_DIRECT`'s alignment on the file systems blockd runs on.
const ALIGN: usize = 4096;

/// A [`LocalFileSystem`] whose large ranged GETs bypass the page cache,
/// and which writes nothing once its repository's config is gone.
#[derive(Debug)]
pub struct DirectLocal {
    inner: Arc<LocalFileSystem>,
    /// The repository's config file, once it has been seen there.
    guard: Option<Guard>,
}

/// Writes stop when the config file seen before is no longer there: the
/// directory was unmounted (its mount point, empty, is in its place) or
/// moved. `LocalFileSystem` makes every missing parent directory of an
/// object it writes, so without this a backup running then would fill the
/// file system underneath with packs that vanish at the next mount, and a
/// checkpoint could name them. The guard is armed by the first read or
/// write of the config that succeeds (opening the repository reads it;
/// making one writes it). The config is looked for before each write and
/// again after it: a write that raced the unmount fails, so no checkpoint
/// names it. The error is transient: a task waits for the directory to be
/// back, as for any outage. Two `stat`s per write.
#[derive(Debug)]
struct Guard {
    /// The config file, where the store keeps object `key`.
    config: std::path::PathBuf,
    /// Its key in the store.
    key: Path,
    seen: std::sync::atomic::AtomicBool,
}

impl DirectLocal {
    /// Wraps `inner`.
    pub fn new(inner: LocalFileSystem) -> Self {
        Self {
            inner: Arc::new(inner),
            guard: None,
        }
    }

    /// Refuses writes once the repository's config, object `key`, has
    /// been seen and is gone.
    ///
    /// # Errors
    /// A key the store cannot map to a file.
    pub fn guarding(mut self, key: Path) -> Result<Self> {
        // The file as the store names it (it percent-encodes some
        // characters of a key's parts).
        let config = self.inner.path_to_filesystem(&key)?;
        self.guard = Some(Guard {
            config,
            key,
            seen: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(self)
    }

    /// Arms the guard when `location` is the config and `ok`.
    fn saw(&self, location: &Path, ok: bool) {
        if let Some(g) = self.guard.as_ref().filter(|g| ok && g.key == *location) {
            g.seen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Fails when the repository this store writes into is gone. The
    /// config is looked at on the blocking pool, as the store's own file
    /// operations are: a hung mount must not stall a runtime thread.
    async fn may_write(&self, location: &Path) -> Result<()> {
        let Some(g) = &self.guard else {
            return Ok(());
        };
        // Before the config is first seen (a repository being made),
        // writes go ahead; so they do when the config cannot be looked at
        // (a permission, an NFS error): only a config known to be gone
        // stops them.
        if !g.seen.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let config = g.config.clone();
        let gone = tokio::task::spawn_blocking(move || Self::gone(&config))
            .await
            .unwrap_or(false);
        if !gone {
            return Ok(());
        }
        Err(object_store::Error::Generic {
            store: "DirectLocal",
            source: format!(
                "not writing {location}: the repository's config {} is gone (the directory was unmounted or moved); nothing is written until it is back",
                g.config.display()
            )
            .into(),
        })
    }

    /// True when `config` is known not to be there.
    fn gone(config: &std::path::Path) -> bool {
        match std::fs::metadata(config) {
            Ok(m) => !m.is_file(),
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ),
        }
    }

    /// [`Self::may_write`] around `write`: before it, and after it when it
    /// succeeded. A write that raced the directory's going is taken back:
    /// the object is deleted with the directories under the repository's
    /// own that it left empty (never that one: it may be a mount point).
    async fn guarded<T>(
        &self,
        location: &Path,
        write: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        self.may_write(location).await?;
        let r = write.await?;
        if let Err(e) = self.may_write(location).await {
            let _ = object_store::ObjectStoreExt::delete(self.inner.as_ref(), location).await;
            let top = self
                .guard
                .as_ref()
                .and_then(|g| g.config.parent())
                .map(std::path::Path::to_path_buf);
            if let (Some(top), Ok(mut dir)) = (top, self.inner.path_to_filesystem(location)) {
                let _ = tokio::task::spawn_blocking(move || {
                    while dir.pop() && dir.starts_with(&top) && dir != top {
                        if std::fs::remove_dir(&dir).is_err() {
                            break;
                        }
                    }
                })
                .await;
            }
            return Err(e);
        }
        Ok(r)
    }
}

impl fmt::Display for DirectLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DirectLocal({})", self.inner)
    }
}

/// The size of a direct read's buffer when it is mapped afresh: the
/// largest GET of a restore ([`super::fetch::MAX_GET`]) with a 4 KiB block
/// on either side, so that every later GET can reuse it.
#[allow(clippy::cast_possible_truncation)] // 8 MiB
const MAPPED: usize = super::fetch::MAX_GET as usize + 2 * ALIGN;

/// Reads `range` of `file` into a buffer of its own and leaves none of
/// the file's pages cached: with `O_DIRECT`, set on the descriptor
/// `object_store` opened (no second open), or, where the file system
/// refuses it, through the cache with the range's pages dropped after.
fn read_uncached(file: &std::fs::File, range: &Range<u64>) -> std::io::Result<Bytes> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    let direct = match rustix::fs::fcntl_setfl(file, flags | rustix::fs::OFlags::DIRECT) {
        Ok(()) => read_direct(file, range),
        Err(rustix::io::Errno::INVAL) => Ok(None),
        Err(e) => Err(e.into()),
    };
    // The descriptor is the caller's again, as it was.
    rustix::fs::fcntl_setfl(file, flags)?;
    match direct? {
        Some(bytes) => Ok(bytes),
        None => read_cached(file, range),
    }
}

/// Reads `range` of `file` through the page cache, then drops the range's
/// pages again.
fn read_cached(file: &std::fs::File, range: &Range<u64>) -> std::io::Result<Bytes> {
    let len = usize::try_from(range.end - range.start)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut buf = super::mapped::Buffer::take(len, MAPPED)?;
    let got = read_full(file, &mut buf[..len], range.start)?;
    // Whole pages: the kernel drops only those wholly inside the range.
    let from = range.start - range.start % ALIGN as u64;
    let to = range.end.next_multiple_of(ALIGN as u64);
    let _ = rustix::fs::fadvise(
        file,
        from,
        std::num::NonZeroU64::new(to - from),
        rustix::fs::Advice::DontNeed,
    );
    if got < len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "{got} bytes at {}..{}: the file shrank while it was read",
                range.start, range.end
            ),
        ));
    }
    Ok(Bytes::from_owner(buf).slice(..len))
}

/// Reads into `buf` at `at` until it is full or the file ends; returns
/// how many bytes it read.
fn read_full(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0usize;
    while got < buf.len() {
        match rustix::io::pread(file, &mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Reads `range` of `file`, opened with `O_DIRECT`, into a buffer aligned
/// for it. `Ok(None)`: the file system refused the direct read, or the
/// file is shorter than the range (the cached read then reports it).
fn read_direct(file: &std::fs::File, range: &Range<u64>) -> std::io::Result<Option<Bytes>> {
    let first = range.start - range.start % ALIGN as u64;
    let want = usize::try_from(range.end - first)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let span = want.next_multiple_of(ALIGN);
    let mut buf = super::mapped::Buffer::take(span, MAPPED)?;
    let mut got = 0usize;
    while got < want {
        match rustix::io::pread(file, &mut buf[got..span], first + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::INVAL) if got == 0 => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        // A short read not at the end of the file leaves the position
        // unaligned: read it all again through the cache.
        if got < want && !got.is_multiple_of(ALIGN) {
            return Ok(None);
        }
    }
    if got < want {
        return Ok(None);
    }
    let lead = usize::try_from(range.start - first).unwrap_or(0);
    Ok(Some(Bytes::from_owner(buf).slice(lead..want)))
}

#[async_trait]
impl ObjectStore for DirectLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let r = self
            .guarded(location, self.inner.put_opts(location, payload, opts))
            .await;
        self.saw(location, r.is_ok());
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.may_write(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let bounded = !options.head && options.range.is_some();
        let got = self.inner.get_opts(location, options).await;
        self.saw(location, got.is_ok());
        let got = got?;
        if !bounded || got.range.end - got.range.start < DIRECT_MIN {
            return Ok(got);
        }
        let GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        } = got;
        let GetResultPayload::File(file, path) = payload else {
            return Ok(GetResult {
                payload,
                meta,
                range,
                attributes,
                extensions,
            });
        };
        let r = range.clone();
        let (read, path) = tokio::task::spawn_blocking(move || (read_uncached(&file, &r), path))
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "DirectLocal",
                source: Box::new(e),
            })?;
        let bytes = read.map_err(|source| object_store::Error::Generic {
            store: "DirectLocal",
            source: format!("reading {}: {source}", path.display()).into(),
        })?;
        let payload =
            GetResultPayload::Stream(futures::stream::once(async move { Ok(bytes) }).boxed());
        Ok(GetResult {
            payload,
            meta,
            range,
            attributes,
            extensions,
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.guarded(to, self.inner.copy_opts(from, to, options))
            .await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.guarded(to, self.inner.rename_opts(from, to, options))
            .await
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    /// Writes go ahead before the config is first seen (a repository
    /// being made) and while it is there; once it has gone (an unmount, a
    /// move), none does, and nothing is made where the repository was.
    #[tokio::test]
    async fn nothing_is_written_once_the_config_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("repo");
        std::fs::create_dir(&dir).unwrap();
        let store = || {
            DirectLocal::new(LocalFileSystem::new_with_prefix(&dir).unwrap())
                .guarding(Path::from("config"))
                .unwrap()
        };
        async fn put(s: &DirectLocal, key: &str) -> Result<PutResult> {
            s.put(&Path::from(key), "x".into()).await
        }
        let making = store();
        put(&making, "probe").await.unwrap();
        put(&making, "config").await.unwrap();
        put(&making, "packs/ab/1").await.unwrap();
        let opened = store();
        opened.get(&Path::from("config")).await.unwrap();
        put(&opened, "packs/ab/2").await.unwrap();
        // Neither read nor wrote the config: not armed.
        let unarmed = store();
        // The directory goes; an empty one (a mount point) is in its place.
        std::fs::rename(&dir, tmp.path().join("away")).unwrap();
        std::fs::create_dir(&dir).unwrap();
        for s in [&making, &opened] {
            let e = put(s, "packs/cd/3").await.unwrap_err();
            assert!(super::super::retry::retryable(&e), "{e}");
            assert!(e.to_string().contains("is gone"), "{e}");
            let e = s
                .put_multipart(&Path::from("packs/cd/4"))
                .await
                .err()
                .unwrap();
            assert!(e.to_string().contains("is gone"), "{e}");
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        put(&unarmed, "packs/cd/5").await.unwrap();
        std::fs::remove_dir_all(dir.join("packs")).unwrap();
        // Back: writes go ahead again.
        std::fs::remove_dir(&dir).unwrap();
        std::fs::rename(tmp.path().join("away"), &dir).unwrap();
        put(&opened, "packs/cd/3").await.unwrap();
    }

    /// A key whose parts the store percent-encodes on disk (a prefix with
    /// accents or `#`) is looked for where the store keeps it: the guard
    /// never takes a healthy repository for a gone one.
    #[tokio::test]
    async fn the_config_is_found_under_an_encoded_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DirectLocal::new(LocalFileSystem::new_with_prefix(tmp.path()).unwrap())
            .guarding(Path::from("été #1/config"))
            .unwrap();
        store
            .put(&Path::from("été #1/config"), "c".into())
            .await
            .unwrap();
        store
            .put(&Path::from("été #1/packs/ab/1"), "x".into())
            .await
            .unwrap();
        store.get(&Path::from("été #1/config")).await.unwrap();
        store
            .put(&Path::from("été #1/packs/ab/2"), "x".into())
            .await
            .unwrap();
    }

    /// The same bytes and errors as the store it wraps, for ranges read
    /// directly (aligned or not, up to the file's unaligned end) and not.
    #[tokio::test]
    async fn ranges_read_as_the_plain_store_reads_them() {
        // On the disk, not tmpfs: the direct path is the one compared.
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let plain = LocalFileSystem::new_with_prefix(tmp.path()).unwrap();
        let direct = DirectLocal::new(LocalFileSystem::new_with_prefix(tmp.path()).unwrap());
        let len = 3 * DIRECT_MIN + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let key = Path::from("packs/ab/abcd");
        plain.put(&key, data.clone().into()).await.unwrap();
        let ranges = [
            0..DIRECT_MIN,
            1..DIRECT_MIN + 2,
            4095..2 * DIRECT_MIN + 4097,
            DIRECT_MIN..len,
            len - DIRECT_MIN - 1..len,
            0..len,
            100..200,
        ];
        for r in ranges {
            let got = direct.get_range(&key, r.clone()).await.unwrap();
            let want = &data[r.start as usize..r.end as usize];
            assert_eq!(got.len(), want.len(), "{r:?}");
            assert!(got == want, "{r:?}: different bytes");
        }
        // The whole object, and ranges past the end: clamped or refused
        // as the plain store does.
        assert_eq!(direct.get(&key).await.unwrap().bytes().await.unwrap(), data);
        for r in [
            len - 10..len + DIRECT_MIN,
            len - 2 * DIRECT_MIN..len + DIRECT_MIN,
            len + 1..len + DIRECT_MIN + 1,
        ] {
            let a = plain
                .get_range(&key, r.clone())
                .await
                .map_err(|e| e.to_string());
            let b = direct
                .get_range(&key, r.clone())
                .await
                .map_err(|e| e.to_string());
            assert_eq!(a, b, "{r:?}");
        }
        let gone = Path::from("packs/ab/gone");
        let e = direct.get_range(&gone, 0..DIRECT_MIN).await.unwrap_err();
        assert!(matches!(e, object_store::Error::NotFound { .. }), "{e}");
    }

    /// The direct read itself: the bytes of an unaligned range, and the
    /// file's cached pages are neither used nor added.
    #[test]
    fn read_direct_takes_no_page_cache() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = tmp.path().join("f");
        let data: Vec<u8> = (0..4 * DIRECT_MIN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        rustix::fs::fdatasync(&f).unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let r = 5000..3 * DIRECT_MIN + 17;
        let got = read_uncached(&f, &r).unwrap();
        assert!(got[..] == data[r.start as usize..r.end as usize]);
        // The descriptor is left as it was opened.
        let flags = rustix::fs::fcntl_getfl(&f).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::DIRECT));
        // fincore (util-linux): the file's resident bytes.
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(&path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(out.status.success(), "fincore: {out:?}");
        let res = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(res, "0", "pages of the file cached after a direct read");
        // The read for file systems that refuse O_DIRECT leaves none
        // either, and says when the file is shorter than the range.
        let got = read_cached(&f, &r).unwrap();
        assert!(got[..] == data[r.start as usize..r.end as usize]);
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES"])
            .arg(&path)
            .output()
            .unwrap();
        let res = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(res, "0", "pages of the file cached after a cached read");
        let e = read_cached(&f, &(3 * DIRECT_MIN..5 * DIRECT_MIN)).unwrap_err();
        assert!(e.to_string().contains("shrank"), "{e}");
    }
}
