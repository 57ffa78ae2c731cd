//! The chunk cache of one catalog mount: sealed chunk records on local
//! disk, least recently used evicted first once their bytes exceed the
//! configured size.
//!
//! A record is stored exactly as fetched from its pack (compressed, and
//! encrypted in an encrypted repository) under `<dir>/<aa>/<chunk id hex>`,
//! and opened and checked against its id on every hit, as if it had just
//! come from the store: a cache file damaged on local disk is detected,
//! dropped and fetched again, never returned as data, and an encrypted
//! repository's plaintext never lands on disk. Chunk ids are keyed hashes
//! of the content, so a record is valid for its id whichever pack it came
//! from. The index of entries lives in memory only; the directory is
//! emptied when the mount starts and removed when it ends.
//!
//! Misses are fetched with ranged GETs, adjacent records of one pack
//! coalesced into one GET (at most [`MAX_GET`] bytes, gaps up to
//! [`crate::repo::fetch::MAX_GAP`] read through), at most [`GETS`] in flight per mount. A chunk
//! already being fetched is never fetched twice: later readers wait for the
//! GET in flight and open the record from its bytes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;

use crate::repo::fetch::{plan, Fetch};
use crate::repo::format::ChunkLoc;
use crate::repo::{Repo, RepoError};

/// Ranged GETs in flight per mount.
pub const GETS: usize = 4;
/// Largest coalesced GET.
pub const MAX_GET: u64 = 4 << 20;

/// A chunk id.
type Id = [u8; 32];

/// Records of one ranged GET, shared by every reader waiting for it.
#[derive(Debug)]
pub struct Fetched {
    /// The pack's bytes from `start`.
    bytes: Bytes,
    start: u64,
    /// Where each chunk's record is.
    chunks: HashMap<Id, ChunkLoc>,
}

impl Fetched {
    fn record(&self, id: &Id) -> Option<(ChunkLoc, &[u8])> {
        let loc = self.chunks.get(id)?;
        let s = usize::try_from(u64::from(loc.offset).checked_sub(self.start)?).ok()?;
        let t = s.checked_add(loc.stored_len as usize)?;
        Some((*loc, self.bytes.get(s..t)?))
    }
}

/// A GET in flight.
type Fetching = Shared<BoxFuture<'static, Result<Arc<Fetched>, Arc<RepoError>>>>;

/// Cache counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Chunks served from a cache file.
    pub hits: AtomicU64,
    /// Chunks that had to be fetched.
    pub misses: AtomicU64,
    /// Cache files that failed their check and were dropped.
    pub rejected: AtomicU64,
    /// Ranged GETs issued.
    pub gets: AtomicU64,
    /// Bytes fetched.
    pub fetched: AtomicU64,
}

/// Recency order and sizes of the cached records.
#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<Id, (u64, u64)>,
    order: BTreeMap<u64, Id>,
    bytes: u64,
    tick: u64,
}

impl Lru {
    /// Marks `id` used; false when it is not cached.
    fn touch(&mut self, id: &Id) -> bool {
        self.tick += 1;
        let tick = self.tick;
        match self.entries.get_mut(id) {
            Some((_, t)) => {
                self.order.remove(t);
                *t = tick;
                self.order.insert(tick, *id);
                true
            }
            None => false,
        }
    }

    /// Adds `id` as most recent; returns what must go to stay within
    /// `capacity`.
    fn insert(&mut self, id: Id, len: u64, capacity: u64) -> Vec<Id> {
        self.remove(&id);
        self.tick += 1;
        self.entries.insert(id, (len, self.tick));
        self.order.insert(self.tick, id);
        self.bytes += len;
        let mut evicted = Vec::new();
        while self.bytes > capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((l, _)) = self.entries.remove(&old) {
                self.bytes -= l;
            }
            evicted.push(old);
        }
        evicted
    }

    fn remove(&mut self, id: &Id) {
        if let Some((len, tick)) = self.entries.remove(id) {
            self.order.remove(&tick);
            self.bytes -= len;
        }
    }
}

/// The chunk cache of one mount.
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    repo: Arc<Repo>,
    lru: Mutex<Lru>,
    inflight: Mutex<HashMap<Id, (u64, Fetching)>>,
    serial: AtomicU64,
    /// Records that failed their check, by chunk and GET: that GET's
    /// copy is not to be cached.
    rejected: Mutex<std::collections::HashSet<(Id, u64)>>,
    gets: Arc<Semaphore>,
    /// True once the mount ended. A store holds it shared from its check
    /// to the end of its write, and [`ChunkCache::close`] holds it
    /// exclusively to set it and remove the directory: a write that
    /// passed the check before the close cannot land after the removal
    /// and leave a directory behind.
    closed: std::sync::RwLock<bool>,
    /// Counters.
    pub stats: Stats,
}

/// Name prefix of a cache directory that is being removed.
const DISCARDED: &str = ".discarded-";

/// Removes cache directory `dir` in the background: renamed out of the
/// way at once, its files deleted by a thread of their own. Deleting a
/// cache of gigabytes takes seconds (tens of them on a file system
/// mounted with `discard`), which an unmount, a new mount of the same
/// directory and above all the daemon's stop (systemd's stop timeout)
/// must not wait for. What a stop cuts short, [`discard_leftovers`]
/// removes at the next start.
///
/// # Errors
/// The rename failed (`NotFound`: there is no such directory).
pub fn discard(dir: &Path) -> std::io::Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    let mut tag = [0u8; 8];
    crate::repo::crypto::fill_random(&mut tag);
    let gone = parent.join(format!("{DISCARDED}{}", hex::encode(tag)));
    std::fs::rename(dir, &gone)?;
    remove_in_background(gone);
    Ok(())
}

/// Removes the cache directories under `root` that an earlier run was
/// removing when it stopped.
pub fn discard_leftovers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(DISCARDED) {
            remove_in_background(e.path());
        }
    }
}

/// Hands `dir` to the one thread that deletes discarded caches, one after
/// another (started with the first).
fn remove_in_background(dir: PathBuf) {
    // A sender is shared by reference: `mpsc::Sender` is `Sync`.
    static DELETER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<PathBuf>>> =
        std::sync::OnceLock::new();
    let deleter = DELETER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
        let spawned = std::thread::Builder::new()
            .name("cache-discard".into())
            .spawn(move || {
                for dir in rx {
                    if let Err(e) = std::fs::remove_dir_all(&dir) {
                        tracing::warn!(dir = %dir.display(), error = %e, "removing a catalog mount's old chunk cache failed; the next start tries again");
                    }
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no thread to remove catalog mounts' old chunk caches; the next start tries again");
                None
            }
        }
    });
    if let Some(tx) = deleter {
        let _ = tx.send(dir);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ChunkCache {
    /// A cache of `capacity` bytes in `dir`, emptied first.
    ///
    /// # Errors
    /// The directory cannot be emptied or created.
    pub fn new(dir: PathBuf, capacity: u64, repo: Arc<Repo>) -> std::io::Result<Arc<Self>> {
        match discard(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Arc::new(Self {
            dir,
            capacity,
            repo,
            lru: Mutex::new(Lru::default()),
            inflight: Mutex::new(HashMap::new()),
            serial: AtomicU64::new(0),
            rejected: Mutex::new(std::collections::HashSet::new()),
            gets: Arc::new(Semaphore::new(GETS)),
            closed: std::sync::RwLock::new(false),
            stats: Stats::default(),
        }))
    }

    /// Bytes of records cached now.
    pub fn bytes(&self) -> u64 {
        lock(&self.lru).bytes
    }

    /// Stops caching and removes the directory (the mount ended).
    pub fn close(&self) {
        let mut closed = self
            .closed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *closed = true;
        *lock(&self.lru) = Lru::default();
        let _ = discard(&self.dir);
    }

    fn path(dir: &Path, id: &Id) -> PathBuf {
        let h = hex::encode(id);
        dir.join(&h[..2]).join(h)
    }

    /// The plain bytes of every chunk in `locs`, by id: cache files checked
    /// on the way, misses fetched.
    ///
    /// # Errors
    /// The first missing or corrupt object, or a provider error.
    pub async fn chunks(
        self: &Arc<Self>,
        locs: &[ChunkLoc],
    ) -> Result<HashMap<Id, Vec<u8>>, Arc<RepoError>> {
        let mut unique: HashMap<Id, ChunkLoc> = HashMap::with_capacity(locs.len());
        for l in locs {
            unique.entry(l.id).or_insert(*l);
        }
        let (hits, mut missing): (Vec<ChunkLoc>, Vec<ChunkLoc>) = {
            let mut lru = lock(&self.lru);
            unique.into_values().partition(|l| lru.touch(&l.id))
        };
        let mut out = HashMap::with_capacity(locs.len());
        if !hits.is_empty() {
            let me = self.clone();
            let (opened, failed) = tokio::task::spawn_blocking(move || me.open_files(hits))
                .await
                .map_err(|e| Arc::new(join_error(&self.repo, e)))?;
            out.extend(opened);
            missing.extend(failed);
        }
        if missing.is_empty() {
            return Ok(out);
        }
        self.stats
            .misses
            .fetch_add(missing.len() as u64, Ordering::Relaxed);
        crate::metrics::STATS.cache(false, missing.len() as u64);
        for (serial, ids, fetching) in self.fetch(&missing) {
            let fetched = fetching.await?;
            let me = self.clone();
            let opened = tokio::task::spawn_blocking(move || {
                ids.iter()
                    .map(|id| {
                        let plain = fetched
                            .record(id)
                            .ok_or_else(|| {
                                me.repo_corrupt("a fetched record is out of range".into())
                            })
                            .and_then(|(loc, rec)| me.repo.open_chunk(&loc, rec));
                        match plain {
                            Ok(p) => Ok((*id, p)),
                            Err(e) => {
                                me.reject(id, serial);
                                Err(Arc::new(e))
                            }
                        }
                    })
                    .collect::<Result<Vec<_>, Arc<RepoError>>>()
            })
            .await
            .map_err(|e| Arc::new(join_error(&self.repo, e)))??;
            out.extend(opened);
        }
        Ok(out)
    }

    fn repo_corrupt(&self, reason: String) -> RepoError {
        RepoError::Corrupt {
            location: self.repo.location().to_string(),
            object: "chunk cache".into(),
            reason,
        }
    }

    /// A fetched record failed its check: later readers fetch it again
    /// rather than reuse these bytes, and it is not cached.
    fn reject(&self, id: &Id, serial: u64) {
        {
            let mut inflight = lock(&self.inflight);
            if inflight.get(id).is_some_and(|(s, _)| *s == serial) {
                inflight.remove(id);
            }
        }
        lock(&self.rejected).insert((*id, serial));
        lock(&self.lru).remove(id);
        let _ = std::fs::remove_file(Self::path(&self.dir, id));
    }

    /// Fetches the chunks of `locs` that are neither cached nor in flight,
    /// and waits for them (read-ahead: nothing is opened).
    ///
    /// # Errors
    /// As [`ChunkCache::chunks`].
    pub async fn prefetch(self: &Arc<Self>, locs: &[ChunkLoc]) -> Result<(), Arc<RepoError>> {
        let missing: Vec<ChunkLoc> = {
            let lru = lock(&self.lru);
            locs.iter()
                .filter(|l| !lru.entries.contains_key(&l.id))
                .copied()
                .collect()
        };
        for (_, _, f) in self.fetch(&missing) {
            f.await?;
        }
        Ok(())
    }

    /// Opens cache files; returns the opened chunks and the locations whose
    /// file was missing or failed its check (dropped, to be fetched).
    fn open_files(&self, hits: Vec<ChunkLoc>) -> (Vec<(Id, Vec<u8>)>, Vec<ChunkLoc>) {
        let mut opened = Vec::with_capacity(hits.len());
        let mut failed = Vec::new();
        for loc in hits {
            let path = Self::path(&self.dir, &loc.id);
            let checked = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|rec| self.repo.open_chunk(&loc, &rec).map_err(|e| e.to_string()));
            match checked {
                Ok(plain) => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::STATS.cache(true, 1);
                    opened.push((loc.id, plain));
                }
                Err(error) => {
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        cache = %path.display(),
                        %error,
                        "chunk cache file failed its check: dropped, fetching the chunk again"
                    );
                    lock(&self.lru).remove(&loc.id);
                    let _ = std::fs::remove_file(&path);
                    failed.push(loc);
                }
            }
        }
        (opened, failed)
    }

    /// The GETs that bring `locs`: ones already in flight, and new ones
    /// for the rest. Each comes with the ids the caller wants from it.
    fn fetch(self: &Arc<Self>, locs: &[ChunkLoc]) -> Vec<(u64, Vec<Id>, Fetching)> {
        let mut waits: HashMap<u64, (Vec<Id>, Fetching)> = HashMap::new();
        let mut todo = Vec::new();
        let mut inflight = lock(&self.inflight);
        for l in locs {
            match inflight.get(&l.id) {
                Some((serial, f)) => waits
                    .entry(*serial)
                    .or_insert_with(|| (Vec::new(), f.clone()))
                    .0
                    .push(l.id),
                None => todo.push(*l),
            }
        }
        todo.sort_by_key(|l| l.id);
        todo.dedup_by_key(|l| l.id);
        for fetch in plan(todo, MAX_GET) {
            let serial = self.serial.fetch_add(1, Ordering::Relaxed);
            let ids: Vec<Id> = fetch.chunks.iter().map(|c| c.id).collect();
            let f = self.clone().get(serial, fetch).boxed().shared();
            for id in &ids {
                inflight.insert(*id, (serial, f.clone()));
            }
            waits.insert(serial, (ids, f));
        }
        drop(inflight);
        waits
            .into_iter()
            .map(|(serial, (ids, f))| (serial, ids, f))
            .collect()
    }

    /// One ranged GET. Its records are then written to cache files in the
    /// background; until they are, readers find them in flight.
    async fn get(
        self: Arc<Self>,
        serial: u64,
        fetch: Fetch,
    ) -> Result<Arc<Fetched>, Arc<RepoError>> {
        let got = {
            let _permit = self.gets.clone().acquire_owned().await;
            self.stats.gets.fetch_add(1, Ordering::Relaxed);
            fetch.get(&self.repo).await
        };
        let Fetch { start, chunks, .. } = fetch;
        let ids: Vec<Id> = chunks.iter().map(|c| c.id).collect();
        match got {
            Ok(bytes) => {
                self.stats
                    .fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                let fetched = Arc::new(Fetched {
                    bytes,
                    start,
                    chunks: chunks.into_iter().map(|c| (c.id, c)).collect(),
                });
                let me = self.clone();
                let f = fetched.clone();
                tokio::task::spawn_blocking(move || me.store(&f, &ids, serial));
                Ok(fetched)
            }
            Err(e) => {
                self.done(&ids, serial);
                Err(Arc::new(e))
            }
        }
    }

    /// Writes the records of a GET to cache files, then lists them (a file
    /// is listed only once complete), then ends their in-flight entries.
    fn store(&self, f: &Fetched, ids: &[Id], serial: u64) {
        for id in ids {
            let Some((_, rec)) = f.record(id) else {
                continue;
            };
            if lock(&self.rejected).remove(&(*id, serial)) {
                continue;
            }
            let len = rec.len() as u64;
            let closed = self
                .closed
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *closed || len > self.capacity {
                continue;
            }
            let path = Self::path(&self.dir, id);
            let written = std::fs::write(&path, rec).or_else(|_| {
                if let Some(p) = path.parent() {
                    std::fs::create_dir_all(p)?;
                }
                std::fs::write(&path, rec)
            });
            if let Err(e) = written {
                tracing::debug!(cache = %path.display(), error = %e, "chunk not cached");
                continue;
            }
            let evicted = lock(&self.lru).insert(*id, len, self.capacity);
            for old in evicted {
                let _ = std::fs::remove_file(Self::path(&self.dir, &old));
            }
            // A reader may have rejected this very copy while it was being
            // written (after the check above): then it goes again. A
            // rejection after this point removes the file itself.
            if lock(&self.rejected).remove(&(*id, serial)) {
                lock(&self.lru).remove(id);
                let _ = std::fs::remove_file(&path);
            }
        }
        self.done(ids, serial);
    }

    /// Ends the in-flight entries of GET `serial` (a chunk rejected and
    /// fetched again since belongs to a newer GET).
    fn done(&self, ids: &[Id], serial: u64) {
        let mut inflight = lock(&self.inflight);
        for id in ids {
            if inflight.get(id).is_some_and(|(s, _)| *s == serial) {
                inflight.remove(id);
            }
        }
    }
}

fn join_error(repo: &Repo, e: tokio::task::JoinError) -> RepoError {
    RepoError::Corrupt {
        location: repo.location().to_string(),
        object: "chunk cache".into(),
        reason: format!("opening chunks failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::PackBuilder;
    use object_store::ObjectStore;

    /// A repository with one pack of `n` distinct 16 KiB chunks.
    async fn repo_with_chunks(n: usize) -> (Arc<Repo>, Vec<ChunkLoc>, Vec<Vec<u8>>) {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let repo = Arc::new(
            Repo::open(store, "", "test", None, None, true)
                .await
                .unwrap(),
        );
        let mut pb = PackBuilder::new(0).unwrap();
        let mut locs = Vec::new();
        let mut plains = Vec::new();
        for i in 0..n {
            // Incompressible content so stored length = plain length + 1.
            let mut x = (i as u64 + 1) * 0x9E37_79B9_7F4A_7C15;
            let plain: Vec<u8> = (0..16384)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            let id = repo.keys.chunk_id(&plain);
            let sealed = repo.seal_chunk(&id, &plain);
            locs.push(pb.push(id, &sealed, 16384).unwrap());
            plains.push(plain);
        }
        let pack = pb.id;
        let (bytes, _) = pb.finish(&repo.keys).unwrap();
        repo.put_pack(&pack, bytes).await.unwrap();
        (repo, locs, plains)
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for sub in std::fs::read_dir(dir).unwrap().flatten() {
            for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
        out
    }

    /// Waits for the background writes of finished GETs.
    async fn settle(c: &ChunkCache) {
        for _ in 0..200 {
            if lock(&c.inflight).is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("cache writes did not finish");
    }

    /// A mount that ends while the chunks it just read are being written
    /// to the cache leaves no cache directory behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_close_during_cache_writes_leaves_no_directory() {
        let (repo, locs, _) = repo_with_chunks(8).await;
        let tmp = tempfile::tempdir().unwrap();
        for round in 0..50 {
            let dir = tmp.path().join(format!("c{round}"));
            let c = ChunkCache::new(dir.clone(), 1 << 20, repo.clone()).unwrap();
            c.chunks(&locs).await.unwrap();
            c.close();
            settle(&c).await;
            assert!(!dir.exists(), "round {round}: {} left", dir.display());
        }
        // And the discarded directories are deleted, by then or soon.
        gone(tmp.path()).await;
    }

    /// Waits until `parent` holds nothing (the discarded caches deleted).
    async fn gone(parent: &Path) {
        for _ in 0..2000 {
            if std::fs::read_dir(parent).unwrap().next().is_none() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("discarded caches left in {}", parent.display());
    }

    #[tokio::test]
    async fn evicts_least_recently_used_by_bytes() {
        let (repo, locs, plains) = repo_with_chunks(8).await;
        let tmp = tempfile::tempdir().unwrap();
        let rec = u64::from(locs[0].stored_len);
        // Room for three records.
        let c = ChunkCache::new(tmp.path().join("c"), 3 * rec + rec / 2, repo).unwrap();
        for i in 0..3 {
            let got = c.chunks(&locs[i..=i]).await.unwrap();
            assert_eq!(got[&locs[i].id], plains[i]);
            settle(&c).await;
        }
        assert_eq!(c.bytes(), 3 * rec);
        // Chunk 0 used again: chunk 1 is now the oldest and goes first.
        c.chunks(&locs[0..1]).await.unwrap();
        assert_eq!(c.stats.hits.load(Ordering::Relaxed), 1);
        c.chunks(&locs[3..4]).await.unwrap();
        settle(&c).await;
        assert_eq!(c.bytes(), 3 * rec, "the cache stays within its size");
        assert_eq!(files(&tmp.path().join("c")).len(), 3);
        assert!(!ChunkCache::path(&tmp.path().join("c"), &locs[1].id).exists());
        assert!(ChunkCache::path(&tmp.path().join("c"), &locs[0].id).exists());
        let gets = c.stats.gets.load(Ordering::Relaxed);
        c.chunks(&locs[0..1]).await.unwrap();
        assert_eq!(c.stats.gets.load(Ordering::Relaxed), gets, "a hit");
        c.chunks(&locs[1..2]).await.unwrap();
        assert_eq!(c.stats.gets.load(Ordering::Relaxed), gets + 1, "evicted");
        // Adjacent records of one pack come in one GET.
        let gets = c.stats.gets.load(Ordering::Relaxed);
        let got = c.chunks(&locs[4..8]).await.unwrap();
        assert_eq!(c.stats.gets.load(Ordering::Relaxed), gets + 1);
        for i in 4..8 {
            assert_eq!(got[&locs[i].id], plains[i]);
        }
        c.close();
        assert!(!tmp.path().join("c").exists());
        gone(tmp.path()).await;
    }

    #[tokio::test]
    async fn a_corrupted_cache_file_is_rejected_and_fetched_again() {
        let (repo, locs, plains) = repo_with_chunks(2).await;
        let tmp = tempfile::tempdir().unwrap();
        let c = ChunkCache::new(tmp.path().join("c"), 1 << 20, repo).unwrap();
        c.chunks(&locs).await.unwrap();
        settle(&c).await;
        let path = ChunkCache::path(&tmp.path().join("c"), &locs[1].id);
        let mut rec = std::fs::read(&path).unwrap();
        rec[100] ^= 1;
        std::fs::write(&path, &rec).unwrap();
        let gets = c.stats.gets.load(Ordering::Relaxed);
        let got = c.chunks(&locs).await.unwrap();
        assert_eq!(got[&locs[0].id], plains[0]);
        assert_eq!(got[&locs[1].id], plains[1], "never the damaged bytes");
        assert_eq!(c.stats.rejected.load(Ordering::Relaxed), 1);
        assert_eq!(c.stats.gets.load(Ordering::Relaxed), gets + 1);
        settle(&c).await;
        // The refetched record replaced the damaged file.
        assert_ne!(std::fs::read(&path).unwrap(), rec);
        c.chunks(&locs[1..]).await.unwrap();
        assert_eq!(c.stats.gets.load(Ordering::Relaxed), gets + 1);
    }

    #[tokio::test]
    async fn a_corrupt_fetched_record_is_neither_reused_nor_cached() {
        let (repo, locs, plains) = repo_with_chunks(2).await;
        let pack = locs[0].pack;
        let key = crate::repo::pack_key(&pack);
        let good = repo.get_pack(&pack).await.unwrap().to_vec();
        let mut bad = good.clone();
        bad[usize::try_from(locs[1].offset).unwrap() + 100] ^= 1;
        repo.put_pack(&pack, bad.into()).await.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let c = ChunkCache::new(tmp.path().join("c"), 1 << 20, repo.clone()).unwrap();
        let e = c.chunks(&locs).await.unwrap_err().to_string();
        assert!(e.contains(&key) && e.contains("corrupt"), "{e}");
        // Repaired at once, before the GET's records are even written out:
        // the bad bytes are fetched again, not reused.
        repo.put_pack(&pack, good.into()).await.unwrap();
        let got = c.chunks(&locs).await.unwrap();
        assert_eq!(got[&locs[1].id], plains[1]);
        settle(&c).await;
        let got = c.chunks(&locs).await.unwrap();
        assert_eq!(got[&locs[1].id], plains[1]);
        assert_eq!(c.stats.rejected.load(Ordering::Relaxed), 0, "never cached");
    }

    #[tokio::test]
    async fn concurrent_readers_share_one_get() {
        let (repo, locs, _) = repo_with_chunks(4).await;
        let tmp = tempfile::tempdir().unwrap();
        let c = ChunkCache::new(tmp.path().join("c"), 1 << 20, repo).unwrap();
        let (a, b) = tokio::join!(c.chunks(&locs), c.chunks(&locs[1..3]));
        assert_eq!(a.unwrap().len(), 4);
        assert_eq!(b.unwrap().len(), 2);
        assert_eq!(c.stats.gets.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_missing_pack_is_an_error_naming_it() {
        let (repo, locs, _) = repo_with_chunks(1).await;
        repo.delete_pack(&locs[0].pack).await.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let c = ChunkCache::new(tmp.path().join("c"), 1 << 20, repo).unwrap();
        let e = c.chunks(&locs).await.unwrap_err().to_string();
        assert!(e.contains(&crate::repo::pack_key(&locs[0].pack)), "{e}");
        assert!(lock(&c.inflight).is_empty());
    }
}
