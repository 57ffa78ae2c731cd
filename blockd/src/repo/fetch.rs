//! Reading chunks back: ranged GETs planned over pack records, and the
//! index blocks the readers walk. Shared by full restores, lazy restores
//! and the catalog mount.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::format::{ChunkLoc, Entry, Manifest};
use super::{pack_key, Repo, RepoError};

/// Gap between records of one pack still worth reading through in one GET.
pub const MAX_GAP: u64 = 64 << 10;
/// Largest GET of coalesced records, for readers without a reason to
/// choose another.
pub const MAX_GET: u64 = 8 << 20;

/// One ranged GET: adjacent records of one pack.
#[derive(Debug, Clone)]
pub struct Fetch {
    /// The pack.
    pub pack: [u8; 16],
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The records it covers, in pack order.
    pub chunks: Vec<ChunkLoc>,
}

impl Fetch {
    /// The object key of the pack.
    pub fn key(&self) -> String {
        pack_key(&self.pack)
    }

    /// Runs the GET. A pack that is gone, repacked by garbage collection,
    /// is read from where its relocations say its records are now, laid
    /// out as the pack had them ([`super::reloc::read_moved`]).
    ///
    /// # Errors
    /// As [`super::Objects::get_range`]; a record that is nowhere.
    pub async fn get(&self, repo: &Repo) -> Result<bytes::Bytes, RepoError> {
        if !repo.relocs.is_gone(&self.pack) {
            match self.get_here(repo).await {
                Err(RepoError::Missing { .. }) => {}
                r => return r,
            }
        }
        super::reloc::read_moved(repo, self).await
    }

    /// The GET on this very pack.
    ///
    /// # Errors
    /// As [`super::Objects::get_range`].
    pub(crate) async fn get_here(&self, repo: &Repo) -> Result<bytes::Bytes, RepoError> {
        let key = self.key();
        let bytes = repo.objects().get_range(&key, self.start..self.end).await?;
        repo.objects().drop_cached(&key, Some(self.start..self.end));
        Ok(bytes)
    }

    /// The sealed record of `c` within the bytes this GET returned.
    ///
    /// # Errors
    /// The store returned fewer bytes than asked for.
    pub fn record<'a>(
        &self,
        repo: &Repo,
        c: &ChunkLoc,
        bytes: &'a [u8],
    ) -> Result<&'a [u8], RepoError> {
        let s =
            usize::try_from(u64::from(c.offset).saturating_sub(self.start)).unwrap_or(usize::MAX);
        bytes
            .get(s..s.saturating_add(c.stored_len as usize))
            .ok_or_else(|| RepoError::Corrupt {
                location: repo.location().to_string(),
                object: self.key(),
                reason: format!(
                    "{} bytes returned for range {}..{}: a short read",
                    bytes.len(),
                    self.start,
                    self.end
                ),
            })
    }
}

/// Coalesces chunks into GETs: records of one pack at most [`MAX_GAP`]
/// apart share a GET of at most `max_get` bytes; each record is read once.
pub fn plan(chunks: impl IntoIterator<Item = ChunkLoc>, max_get: u64) -> Vec<Fetch> {
    let mut by_pack: BTreeMap<[u8; 16], BTreeMap<u32, ChunkLoc>> = BTreeMap::new();
    for c in chunks {
        by_pack.entry(c.pack).or_default().insert(c.offset, c);
    }
    let mut out = Vec::new();
    for (pack, chunks) in by_pack {
        let mut cur: Option<Fetch> = None;
        for c in chunks.into_values() {
            let s = u64::from(c.offset);
            let t = s + u64::from(c.stored_len);
            match &mut cur {
                Some(f) if s >= f.end && s - f.end <= MAX_GAP && t - f.start <= max_get => {
                    f.end = t;
                    f.chunks.push(c);
                }
                _ => {
                    out.extend(cur.take());
                    cur = Some(Fetch {
                        pack,
                        start: s,
                        end: t,
                        chunks: vec![c],
                    });
                }
            }
        }
        out.extend(cur);
    }
    out
}

/// Memory held by a block's entries.
fn entries_bytes(e: &[Entry]) -> usize {
    std::mem::size_of_val(e)
}

/// The blocks an [`IndexCache`] keeps, in the order of their last use
/// (a lookup and a move to the back in constant time, whatever the
/// capacity), and the bytes of their entries.
struct Held {
    blocks: hashlink::LruCache<String, Arc<Vec<Entry>>>,
    bytes: usize,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("blocks", &self.blocks.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// One index block's load, shared by its readers.
type Loading = tokio::sync::OnceCell<Arc<Vec<Entry>>>;

/// Recently used index blocks, by their content-addressed id (snapshots
/// share them); concurrent readers of a block fetch it once.
#[derive(Debug)]
pub struct IndexCache {
    capacity: usize,
    /// Bytes of entries kept at most (the last block loaded is kept
    /// whatever its size).
    max_bytes: usize,
    blocks: Mutex<Held>,
    /// Blocks being loaded, one load per block: a second reader of the
    /// same block waits for it, a reader of another block does not (a
    /// lazy restore's client read must not queue behind the hydrator's
    /// index GETs).
    loading: Mutex<HashMap<String, Arc<Loading>>>,
}

impl IndexCache {
    /// A cache of `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        Self::with_bytes(capacity, usize::MAX)
    }

    /// A cache of `capacity` blocks holding at most `max_bytes` of entries.
    pub fn with_bytes(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            max_bytes,
            // Unbounded: the cache evicts by bytes as well as by count.
            blocks: Mutex::new(Held {
                blocks: hashlink::LruCache::new_unbounded(),
                bytes: 0,
            }),
            loading: Mutex::new(HashMap::new()),
        }
    }

    /// Whether another block may be loaded without evicting one.
    pub fn has_room(&self) -> bool {
        let held = self.held();
        held.blocks.len() < self.capacity && held.bytes < self.max_bytes
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.blocks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, id: &str) -> Option<Arc<Vec<Entry>>> {
        self.held().blocks.get(id).cloned()
    }

    /// The entries of snapshot `m` overlapping volume bytes `lo..hi`, per
    /// index block: (the block's start in the volume, those entries, whole,
    /// in order). Blocks the manifest does not list are holes and absent.
    /// The one reader from a volume range to index entries: restores,
    /// lazy fetches and the catalog mount all use it.
    ///
    /// # Errors
    /// A missing or corrupt index block, named.
    pub async fn overlapping(
        &self,
        repo: &Repo,
        m: &Manifest,
        lo: u64,
        hi: u64,
    ) -> Result<Vec<(u64, Vec<Entry>)>, RepoError> {
        let span = repo.config.index_span;
        let hi = hi.min(m.size);
        let mut out = Vec::new();
        if lo >= hi {
            return Ok(out);
        }
        for b in lo / span..=(hi - 1) / span {
            let Ok(i) = m.blocks.binary_search_by_key(&b, |x| x.0) else {
                continue;
            };
            let entries = self.get(repo, b, &m.blocks[i].1).await?;
            let base = b * span;
            let (l, h) = (lo.max(base) - base, hi.min(base + span) - base);
            let first = entries.partition_point(|e| e.end() <= l);
            let used = entries[first..]
                .iter()
                .take_while(|e| u64::from(e.start) < h)
                .copied()
                .collect();
            out.push((base, used));
        }
        Ok(out)
    }

    /// Index block `block` with id `id`.
    ///
    /// # Errors
    /// As [`Repo::get_index`].
    pub async fn get(
        &self,
        repo: &Repo,
        block: u64,
        id: &str,
    ) -> Result<Arc<Vec<Entry>>, RepoError> {
        if let Some(e) = self.cached(id) {
            return Ok(e);
        }
        let cell = self
            .loading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(id.to_string())
            .or_default()
            .clone();
        let loaded: Result<_, RepoError> = cell
            .get_or_try_init(|| async {
                if let Some(e) = self.cached(id) {
                    return Ok(e);
                }
                let entries = Arc::new(repo.get_index(block, id).await?);
                let mut held = self.held();
                held.bytes += entries_bytes(&entries);
                if let Some(replaced) = held.blocks.insert(id.to_string(), entries.clone()) {
                    held.bytes -= entries_bytes(&replaced);
                }
                while held.blocks.len() > 1
                    && (held.blocks.len() > self.capacity || held.bytes > self.max_bytes)
                {
                    let Some((_, evicted)) = held.blocks.remove_lru() else {
                        break;
                    };
                    held.bytes -= entries_bytes(&evicted);
                }
                Ok(entries)
            })
            .await;
        // Loaded (now cached) or failed (the next reader tries again).
        self.loading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
        let entries = loaded?.clone();
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory repository holding index blocks 0, 1 and 2 (one entry
    /// each, told apart by their length), and its store.
    async fn three_blocks() -> (
        Repo,
        Arc<dyn object_store::ObjectStore>,
        Vec<(u64, String, Vec<Entry>)>,
    ) {
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let repo = Repo::open(store.clone(), "", "mem", None, None, true)
            .await
            .unwrap();
        let mut blocks = Vec::new();
        for b in 0..3u8 {
            let len = 4096 * (u32::from(b) + 1);
            let entries = vec![Entry {
                start: 0,
                len,
                chunk_off: 0,
                chunk: ChunkLoc {
                    id: [b; 32],
                    pack: [7; 16],
                    offset: 0,
                    stored_len: 100,
                    plain_len: len,
                },
            }];
            let (id, sealed) = repo.seal_index(u64::from(b), &entries).unwrap();
            repo.put_index(&id, sealed).await.unwrap();
            blocks.push((u64::from(b), id, entries));
        }
        (repo, store, blocks)
    }

    /// The cache keeps the blocks used last: a block read again stays, the
    /// one left longest unused goes, and what it keeps is answered without
    /// the store.
    #[tokio::test]
    async fn the_index_cache_evicts_the_block_used_longest_ago() {
        let (repo, store, blocks) = three_blocks().await;
        let cache = IndexCache::new(2);
        let get = |i: usize| cache.get(&repo, blocks[i].0, &blocks[i].1);
        assert_eq!(*get(0).await.unwrap(), blocks[0].2);
        assert_eq!(*get(1).await.unwrap(), blocks[1].2);
        assert!(!cache.has_room());
        // Block 0 used again: block 1 is now the one used longest ago.
        assert_eq!(*get(0).await.unwrap(), blocks[0].2);
        assert_eq!(*get(2).await.unwrap(), blocks[2].2);
        for (_, id, _) in &blocks {
            let key = object_store::path::Path::from(super::super::index_key(id));
            object_store::ObjectStoreExt::delete(store.as_ref(), &key)
                .await
                .unwrap();
        }
        assert_eq!(*get(0).await.unwrap(), blocks[0].2, "block 0 was kept");
        assert_eq!(*get(2).await.unwrap(), blocks[2].2, "block 2 was kept");
        let e = get(1).await.expect_err("block 1 was evicted");
        assert!(e.to_string().contains(&blocks[1].1), "{e}");
    }

    /// A byte bound evicts too, down to the last block loaded.
    #[tokio::test]
    async fn the_index_cache_keeps_to_its_bytes() {
        let (repo, store, blocks) = three_blocks().await;
        let one = entries_bytes(&blocks[0].2);
        let cache = IndexCache::with_bytes(100, one);
        for (b, id, entries) in &blocks {
            assert_eq!(*cache.get(&repo, *b, id).await.unwrap(), *entries);
        }
        assert!(!cache.has_room());
        for (_, id, _) in &blocks {
            let key = object_store::path::Path::from(super::super::index_key(id));
            object_store::ObjectStoreExt::delete(store.as_ref(), &key)
                .await
                .unwrap();
        }
        assert!(cache.get(&repo, 2, &blocks[2].1).await.is_ok());
        assert!(cache.get(&repo, 1, &blocks[1].1).await.is_err());
        assert!(cache.get(&repo, 0, &blocks[0].1).await.is_err());
    }

    #[test]
    fn plan_coalesces_adjacent_records() {
        let c = |pack: u8, offset: u32, len: u32| ChunkLoc {
            id: [offset.to_le_bytes()[0]; 32],
            pack: [pack; 16],
            offset,
            stored_len: len,
            plain_len: len,
        };
        let p = plan(
            [
                c(1, 0, 100),
                c(1, 100, 100),
                c(2, 0, 50),
                c(1, 10_000_000, 10),
                c(1, 100, 100),
            ],
            8 << 20,
        );
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].start, p[0].end, p[0].chunks.len()), (0, 200, 2));
        assert_eq!(p[1].start, 10_000_000);
        assert_eq!(p[2].pack, [2; 16]);
        // A smaller GET limit splits the run.
        assert_eq!(plan([c(1, 0, 100), c(1, 100, 100)], 150).len(), 2);
    }
}
