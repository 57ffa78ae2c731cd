//! The repository: what blockd keeps in object storage, and how it is read
//! and written. The byte layout is documented in `FORMAT.md` beside this
//! file; [`format`] encodes it, [`crypto`] seals it.
//!
//! A [`Repo`] is one location opened with its keys; its [`Objects`] is the
//! plain object access underneath: object_store's `PrefixStore` (the
//! location's prefix) over a [`retry::RetryStore`] (transient provider
//! errors retried, on top of the HTTP client's own retries) over the
//! provider's store. Every error names the object it is about.

pub mod check;
pub mod crypto;
pub mod damage;
pub mod direct;
pub mod faulty;
pub mod fetch;
pub mod format;
pub mod gc;
pub mod index;
pub mod mapped;
pub mod name;
pub mod refs;
pub mod reloc;
pub mod repack;
pub mod retry;

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use crate::outcome::Outcome;
use crypto::{Keys, Tampered};
use format::{ChunkLoc, Config, Entry, Group, KeyWrap, Malformed, Manifest};
use object_store::prefix::PrefixStore;
use retry::RetryStore;

/// Default largest chunk: one dirty run becomes chunks of up to this size.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;
/// Default target pack size.
pub const DEFAULT_PACK_SIZE: u64 = 16 << 20;
/// Default volume bytes per index block.
pub const DEFAULT_INDEX_SPAN: u64 = 64 << 20;

/// Why a repository operation failed. Every variant names the object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// The provider refused or failed (after retries).
    #[error("location {location}: {op} {object}: {source}")]
    Store {
        /// Location name.
        location: String,
        /// Operation.
        op: &'static str,
        /// Object key.
        object: String,
        /// The provider's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A needed object does not exist.
    #[error("location {location}: object {object} is missing")]
    Missing {
        /// Location name.
        location: String,
        /// Object key.
        object: String,
    },
    /// An object failed its integrity check or is malformed.
    #[error("location {location}: object {object} is corrupt: {reason}")]
    Corrupt {
        /// Location name.
        location: String,
        /// Object key.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// Encrypted repository, no or wrong passphrase, or the reverse.
    #[error("location {location}: {message}")]
    Key {
        /// Location name.
        location: String,
        /// What to do.
        message: String,
    },
    /// A value does not fit the format (nothing was written).
    #[error(transparent)]
    Overflow(#[from] format::Overflow),
    /// No memory for a transfer buffer (a pack being built).
    #[error("no memory for a transfer buffer: {0}")]
    Memory(#[source] std::io::Error),
    /// Something already exists (a manifest written twice).
    #[error("location {location}: object {object} already exists")]
    Exists {
        /// Location name.
        location: String,
        /// Object key.
        object: String,
    },
    /// The repository is not there (no config object): an unmounted
    /// directory, a wrong bucket or prefix, a bucket emptied since.
    #[error(
        "location {location}: the repository is gone (no config object): check that the bucket, \
         prefix or directory is the one the backups were written to, and that it is mounted; \
         blockd never re-initialises an existing location (the embedded `local` location starts \
         afresh once its directory, `objects` in the state dir, is removed)"
    )]
    Gone {
        /// Location name.
        location: String,
    },
    /// A write or delete through read-only credentials.
    #[error(
        "location {location} is read-only (created with --read-only): {op} of {object} refused; \
         back up, delete or collect through credentials whose keys can write"
    )]
    ReadOnly {
        /// Location name.
        location: String,
        /// "put" or "delete".
        op: &'static str,
        /// Object key.
        object: String,
    },
}

impl RepoError {
    /// What the error means to the caller: a missing or wrong passphrase,
    /// a location gone or read-only, refuse the request as things stand;
    /// everything else is the store's.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Key { .. } | Self::Gone { .. } | Self::ReadOnly { .. } => Outcome::Refused,
            Self::Overflow(_) | Self::Memory(_) => Outcome::Failed,
            _ => Outcome::Upstream,
        }
    }

    /// True when the provider failed in a way that may go away by itself
    /// (no answer, or a failure of its own) after every request-level
    /// retry; see [`retry::retryable`].
    pub fn transient(&self) -> bool {
        matches!(self, Self::Store { source, .. } if retry::retryable(source))
    }

    /// The object the error is about (`config` for key errors; empty for
    /// a value that never reached an object).
    pub fn object(&self) -> &str {
        match self {
            Self::Store { object, .. }
            | Self::Missing { object, .. }
            | Self::Corrupt { object, .. }
            | Self::Exists { object, .. }
            | Self::ReadOnly { object, .. } => object,
            Self::Key { .. } | Self::Gone { .. } => "config",
            Self::Overflow(_) | Self::Memory(_) => "",
        }
    }
}

/// The error for a location whose repository is not there (no config
/// object): an unmounted directory, a wrong bucket or prefix.
fn gone(location: &str) -> RepoError {
    RepoError::Gone {
        location: location.to_string(),
    }
}

/// An opened repository.
#[derive(Debug)]
pub struct Repo {
    objects: Objects,
    /// The repository's config object.
    pub config: Config,
    /// Its keys.
    pub keys: Keys,
    /// Packs found gone, and where their records went.
    relocs: reloc::Cache,
    /// Counts the snapshot and group objects this process has written or
    /// deleted here (see [`Repo::changes`]).
    changes: std::sync::atomic::AtomicU64,
}

/// Plain object access under a location's prefix, with retries and
/// errors that name the object. Knows nothing of keys or formats.
#[derive(Debug)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    location: String,
    storage_class: Option<String>,
    /// For a location in a local directory: the directory of this prefix,
    /// whose files bulk transfers drop from the page cache (see
    /// [`Objects::drop_cached`]).
    local_root: Option<std::path::PathBuf>,
    /// Credentials that may only read: every put and delete is refused
    /// here, below every caller, so nothing reaches the store.
    read_only: bool,
}

/// Hex of a pack id.
pub fn pack_hex(id: &[u8; 16]) -> String {
    hex::encode(id)
}

/// A new random pack id.
pub fn new_pack_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    crypto::fill_random(&mut id);
    id
}

fn fan(kind: &str, hex: &str) -> String {
    format!("{kind}/{}/{hex}", &hex[..2])
}

/// A pack id.
pub type PackId = [u8; 16];

/// The hex id of a key `<kind>/<aa>/<id>` with an id of `len` hex digits
/// whose first two are `<aa>`.
fn parse_fanned<'a>(key: &'a str, kind: &str, len: usize) -> Option<&'a str> {
    let rest = key.strip_prefix(kind)?.strip_prefix('/')?;
    let (aa, id) = rest.split_once('/')?;
    (id.len() == len && id.starts_with(aa) && aa.len() == 2).then_some(id)
}

/// Object key of a pack.
pub(crate) fn pack_key(id: &[u8; 16]) -> String {
    fan("packs", &pack_hex(id))
}

/// The pack id of `key`, if it is a pack's key as blockd writes it.
pub(crate) fn parse_pack_key(key: &str) -> Option<PackId> {
    let h = parse_fanned(key, "packs", 32)?;
    let mut id = [0u8; 16];
    hex::decode_to_slice(h, &mut id).ok()?;
    (key == pack_key(&id)).then_some(id)
}

/// Object key of an index block.
pub(crate) fn index_key(id_hex: &str) -> String {
    fan("index", id_hex)
}

/// Object key of a manifest.
pub(crate) fn manifest_key(volume: &str, name: &str) -> String {
    format!("snapshots/{volume}/{name}")
}

/// Object key of a group.
pub(crate) fn group_key(group: &str) -> String {
    format!("groups/{group}")
}

impl Repo {
    /// Opens the repository at `prefix` in `store`; with `init`, creates
    /// its config if there is none (only when a location is created: an
    /// existing location whose config vanished, say an unmounted directory,
    /// is an error, never silently a new empty repository). The passphrase
    /// is checked before anything else is read.
    ///
    /// # Errors
    /// Provider errors; a missing or damaged config; a missing or wrong
    /// passphrase.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        location: &str,
        passphrase: Option<&str>,
        storage_class: Option<String>,
        init: bool,
    ) -> Result<Self, RepoError> {
        let objects = Objects::new(store, prefix, location, storage_class);
        let config = match objects.get_meta("config").await {
            Ok(bytes) => parse_config(&objects, &bytes)?,
            Err(RepoError::Missing { .. }) if !init => return Err(gone(location)),
            Err(RepoError::Missing { .. }) => {
                let (config, _) = new_config(passphrase);
                let body = serde_json::to_vec_pretty(&config)
                    .unwrap_or_else(|_| unreachable!("a config always serialises"));
                match objects.put("config", body.clone().into(), true).await {
                    // Read back: a store that ignores conditional writes
                    // lets two hosts initialising at once both write, and
                    // the last one's is the repository's.
                    Ok(_) => match objects.get_meta("config").await? {
                        b if b[..] == body[..] => {
                            tracing::info!(location, "repository initialised");
                            config
                        }
                        b => {
                            tracing::info!(location, "repository initialised by another host at the same moment: using its config");
                            parse_config(&objects, &b)?
                        }
                    },
                    // Another host initialised it first: use theirs.
                    Err(RepoError::Exists { .. }) => {
                        let bytes = objects.get_meta("config").await?;
                        parse_config(&objects, &bytes)?
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let keys = unlock(&objects, &config, passphrase)?;
        Ok(Self {
            objects,
            config,
            keys,
            relocs: reloc::Cache::default(),
            changes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// How many snapshot manifests and group objects this process has
    /// written or deleted through this repository so far. A reader that
    /// caches listings (the catalog mount) lists again when the count
    /// moved since its listing, so a backup this daemon made is in the
    /// listing the moment its task is done; changes made by other hosts
    /// show once the cached listing ages out.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The location's name.
    pub fn location(&self) -> &str {
        &self.objects.location
    }

    /// Object access underneath (for this module's readers and tests).
    pub(crate) fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Compresses and seals one chunk: `kind u8 | payload`, sealed with
    /// `"c" | chunk id` as associated data when the repository is
    /// encrypted, stored as is otherwise.
    pub fn seal_chunk(&self, id: &[u8; 32], plain: &[u8]) -> Vec<u8> {
        // Incompressible data (already compressed or encrypted, random) is
        // recognised from a 4 KiB sample and stored raw without paying for
        // compressing all of it.
        let sample = 4096;
        let worth = plain.len() <= 2 * sample
            || lz4_flex::block::compress(&plain[..sample]).len() < sample * 31 / 32;
        let compressed = if worth {
            lz4_flex::block::compress(plain)
        } else {
            Vec::new()
        };
        let mut payload = Vec::with_capacity(plain.len() + 1);
        if worth && compressed.len() < plain.len() {
            payload.push(format::CHUNK_LZ4);
            payload.extend_from_slice(&compressed);
        } else {
            payload.push(format::CHUNK_RAW);
            payload.extend_from_slice(plain);
        }
        if self.keys.encrypted() {
            self.keys.seal(&chunk_ad(id), &payload)
        } else {
            // Unencrypted: the chunk id (a keyed hash of the plain bytes,
            // checked after decompression) is the integrity check; a tag
            // would only hash the same bytes twice.
            payload
        }
    }

    /// Opens one sealed chunk record and checks it is the chunk `loc` names.
    ///
    /// # Errors
    /// Corruption, naming the pack and chunk.
    pub fn open_chunk(&self, loc: &ChunkLoc, sealed: &[u8]) -> Result<Vec<u8>, RepoError> {
        self.open_chunk_in(loc, sealed)
            .map(std::borrow::Cow::into_owned)
    }

    /// [`Repo::open_chunk`] without copying: an unencrypted raw chunk is
    /// checked and returned in place.
    ///
    /// # Errors
    /// Corruption, naming the pack and chunk.
    pub fn open_chunk_in<'a>(
        &self,
        loc: &ChunkLoc,
        sealed: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, RepoError> {
        use std::borrow::Cow;
        // A record of a repacked pack was read where its relocation put
        // it ([`fetch::Fetch::get`]): that is the object named.
        let what = |r: &str| {
            let chunk = hex::encode(&loc.id[..8]);
            match self.relocs.now_at(&loc.pack, loc.offset) {
                Some(t) => self.objects.corrupt(
                    &pack_key(&t.pack),
                    format!(
                        "chunk {chunk} at offset {} (moved there by a repack from {} at offset {}): {r}",
                        t.to,
                        pack_key(&loc.pack),
                        loc.offset
                    ),
                ),
                None => self.objects.corrupt(
                    &pack_key(&loc.pack),
                    format!("chunk {chunk} at offset {}: {r}", loc.offset),
                ),
            }
        };
        let payload: Cow<'a, [u8]> = if self.keys.encrypted() {
            Cow::Owned(
                self.keys
                    .open(&chunk_ad(&loc.id), sealed)
                    .map_err(|Tampered| what("integrity check failed"))?,
            )
        } else {
            Cow::Borrowed(sealed)
        };
        let plain_len = loc.plain_len as usize;
        let plain: Cow<'a, [u8]> = match (payload.first().copied(), payload) {
            (Some(format::CHUNK_RAW), Cow::Borrowed(p)) => Cow::Borrowed(&p[1..]),
            (Some(format::CHUNK_RAW), Cow::Owned(mut p)) => {
                p.remove(0);
                Cow::Owned(p)
            }
            (Some(format::CHUNK_LZ4), p) => Cow::Owned(
                lz4_flex::block::decompress(&p[1..], plain_len)
                    .map_err(|e| what(&format!("does not decompress: {e}")))?,
            ),
            _ => return Err(what("unknown payload kind")),
        };
        if plain.len() != plain_len || self.keys.chunk_id(&plain) != loc.id {
            return Err(what("content does not match its id"));
        }
        Ok(plain)
    }

    /// Encodes and seals an index block; returns its id in hex and the
    /// object's bytes (written under [`index_key`]).
    ///
    /// # Errors
    /// An index block too large for its format.
    pub fn seal_index(
        &self,
        block: u64,
        entries: &[Entry],
    ) -> Result<(String, Vec<u8>), RepoError> {
        let plain = format::encode_index(block, entries)?;
        let id = hex::encode(self.keys.object_id(crate::magic::INDEX_ID_DOMAIN, &plain));
        let sealed = self.keys.seal(&index_ad(&id), &plain);
        Ok((id, sealed))
    }

    /// Uploads a sealed index block under its id.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn put_index(&self, id: &str, sealed: Vec<u8>) -> Result<u64, RepoError> {
        self.objects.put(&index_key(id), sealed.into(), false).await
    }

    /// True when pack `id` exists (one HEAD).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn has_pack(&self, id: &[u8; 16]) -> Result<bool, RepoError> {
        Ok(self.objects.head(&pack_key(id)).await?.is_some())
    }

    /// Uploads a finished pack ([`PackBuilder::finish`]).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn put_pack(&self, id: &[u8; 16], bytes: Bytes) -> Result<u64, RepoError> {
        let key = pack_key(id);
        let n = self.objects.put(&key, bytes, false).await?;
        self.objects.drop_cached(&key, None);
        Ok(n)
    }

    /// A location in a local directory: `dir` is the directory its objects
    /// are in (under the prefix), whose packs bulk transfers keep out of
    /// the page cache.
    #[must_use]
    pub fn with_local_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.objects.local_root = Some(dir);
        self
    }

    /// Opened through credentials that may only read: every write and
    /// delete fails with [`RepoError::ReadOnly`] before it reaches the
    /// store, and restores take no lease ([`gc::Lease::take`]).
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.objects.read_only = true;
        self
    }

    /// True when opened through read-only credentials.
    pub fn is_read_only(&self) -> bool {
        self.objects.read_only
    }

    /// A whole pack, as stored.
    ///
    /// # Errors
    /// Missing pack, provider errors.
    pub async fn get_pack(&self, id: &[u8; 16]) -> Result<Bytes, RepoError> {
        let key = pack_key(id);
        let r = self
            .objects
            .store
            .get(&ObjPath::from(key.as_str()))
            .await
            .map_err(|e| self.objects.error("get", &key, e))?;
        r.bytes()
            .await
            .map_err(|e| self.objects.error("get", &key, e))
    }

    /// Deletes a pack (missing is fine).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn delete_pack(&self, id: &[u8; 16]) -> Result<(), RepoError> {
        self.objects.delete(&pack_key(id)).await
    }

    /// The error for damage found inside pack `id` by a reader.
    pub fn corrupt_pack(&self, id: &[u8; 16], reason: impl std::fmt::Display) -> RepoError {
        self.objects.corrupt(&pack_key(id), reason)
    }

    /// The error for an object under `snapshots/` whose name blockd never
    /// writes (listed as corrupt, never used).
    pub fn foreign_manifest(&self, volume: &str, name: &str) -> RepoError {
        self.objects.corrupt(
            &manifest_key(volume, name),
            "not a snapshot name blockd writes",
        )
    }

    /// The repository's identity: a hash of its config, whose key
    /// material is drawn at random when it is made. The same for every
    /// address it is reached at, and for every build: it is kept in the
    /// state database (locations, backup tasks), so a field added to
    /// [`Config`] must stay out of it (a known-answer test holds it).
    pub fn id(&self) -> String {
        let config = serde_json::to_vec(&self.config)
            .unwrap_or_else(|_| unreachable!("a config always serialises"));
        blake3::hash(&config).to_hex()[..32].to_string()
    }

    /// Fails when the repository is no longer there (its config object is
    /// missing: a directory unmounted since it was opened, a bucket
    /// emptied), so that it is not taken for an empty one. One HEAD.
    ///
    /// # Errors
    /// The repository is gone; provider errors.
    pub async fn present(&self) -> Result<(), RepoError> {
        match self.objects.head("config").await? {
            Some(_) => Ok(()),
            None => Err(gone(self.location())),
        }
    }

    /// `e`, or the repository is gone when `e` is a missing object and so
    /// is the config.
    async fn missing_or_gone(&self, e: RepoError) -> RepoError {
        if matches!(e, RepoError::Missing { .. }) {
            if let Err(g @ RepoError::Gone { .. }) = self.present().await {
                return g;
            }
        }
        e
    }

    /// Reads the config object again: it must still be the one opened.
    ///
    /// # Errors
    /// The repository is gone (no config); an unreadable or changed
    /// config, named.
    pub async fn check_config(&self) -> Result<(), RepoError> {
        let bytes = match self.objects.get_meta("config").await {
            // Without its config the repository is gone, not damaged: an
            // unmounted directory, a wrong or emptied bucket.
            Err(RepoError::Missing { .. }) => return Err(gone(self.location())),
            r => r?,
        };
        let c = parse_config(&self.objects, &bytes)?;
        if c != self.config {
            return Err(self.objects.corrupt(
                "config",
                "differs from the config this daemon opened (another host initialised the repository at the same moment on a store without conditional writes, or it was replaced): what was written since it was opened is sealed with keys the repository does not hold; the location is opened again at its next use",
            ));
        }
        Ok(())
    }

    /// Every pack object, with its id parsed from its key; keys under
    /// `packs/` that blockd never writes are returned apart.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn list_packs(&self) -> Result<(Vec<(PackId, Listed)>, Vec<String>), RepoError> {
        let mut packs = Vec::new();
        let mut foreign = Vec::new();
        for l in self.objects.list_meta("packs").await? {
            match parse_pack_key(&l.key) {
                Some(id) => packs.push((id, l)),
                None => foreign.push(l.key),
            }
        }
        Ok((packs, foreign))
    }

    /// Every index block object, with its id (hex); keys under `index/`
    /// that blockd never writes are returned apart.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn list_index_blocks(
        &self,
    ) -> Result<(Vec<(String, Listed)>, Vec<String>), RepoError> {
        let mut blocks = Vec::new();
        let mut foreign = Vec::new();
        for l in self.objects.list_meta("index").await? {
            match parse_fanned(&l.key, "index", 64) {
                Some(h)
                    if h.bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
                {
                    blocks.push((h.to_string(), l));
                }
                _ => foreign.push(l.key),
            }
        }
        Ok((blocks, foreign))
    }

    /// The key of pack `id`, for naming it in a report.
    pub fn pack_name(id: &PackId) -> String {
        pack_key(id)
    }

    /// The records of pack `id` (of `size` bytes), read from its trailer
    /// with a ranged GET of the pack's tail (two when the trailer is
    /// larger than 64 KiB).
    ///
    /// # Errors
    /// Missing pack; a footer or trailer that does not open, named.
    pub async fn pack_trailer(&self, id: &PackId, size: u64) -> Result<Vec<ChunkLoc>, RepoError> {
        const TAIL: u64 = 64 * 1024;
        let key = pack_key(id);
        if size < 12 {
            return Err(self
                .objects
                .corrupt(&key, "not a pack (shorter than its footer)"));
        }
        let from = size.saturating_sub(TAIL);
        let tail = self.objects.get_range(&key, from..size).await?;
        let n = tail.len();
        if &tail[n - 8..] != format::PACK_MAGIC {
            return Err(self.objects.corrupt(&key, "not a pack (bad footer)"));
        }
        let mut l = [0u8; 4];
        l.copy_from_slice(&tail[n - 12..n - 8]);
        let tl = u64::from(u32::from_le_bytes(l));
        if tl + 12 > size {
            return Err(self
                .objects
                .corrupt(&key, "pack trailer length exceeds the pack"));
        }
        let records_end = size - 12 - tl;
        let sealed = if records_end >= from {
            let at = usize::try_from(records_end - from).unwrap_or(usize::MAX);
            tail.slice(at..n - 12)
        } else {
            self.objects.get_range(&key, records_end..size - 12).await?
        };
        self.open_trailer(id, &sealed, records_end)
    }

    /// The records of a whole pack `bytes` (as fetched by [`Repo::get_pack`]).
    ///
    /// # Errors
    /// A footer or trailer that does not open, named.
    pub fn pack_records(&self, id: &PackId, bytes: &[u8]) -> Result<Vec<ChunkLoc>, RepoError> {
        let (records, trailer) = format::split_pack(bytes)
            .map_err(|Malformed(m)| self.objects.corrupt(&pack_key(id), m))?;
        self.open_trailer(id, trailer, records.len() as u64)
    }

    fn open_trailer(
        &self,
        id: &PackId,
        sealed: &[u8],
        records_end: u64,
    ) -> Result<Vec<ChunkLoc>, RepoError> {
        let key = pack_key(id);
        let plain = self.keys.open(&pack_ad(id), sealed).map_err(|Tampered| {
            self.objects
                .corrupt(&key, "pack trailer: integrity check failed")
        })?;
        format::decode_trailer(&plain, *id, records_end)
            .map_err(|Malformed(m)| self.objects.corrupt(&key, format!("pack trailer: {m}")))
    }

    /// Fetches the object `index/<aa>/<id>` (an index block or an index
    /// map, `what`), opens it and checks it against its id in `domain`;
    /// returns its key and plain bytes.
    async fn get_index_object(
        &self,
        id: &str,
        domain: &[u8],
        what: &str,
    ) -> Result<(String, Vec<u8>), RepoError> {
        let key = index_key(id);
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.objects.corrupt(&key, format_args!("bad {what} id")));
        }
        let sealed = self.objects.get_meta(&key).await?;
        let plain = self
            .keys
            .open(&index_ad(id), &sealed)
            .map_err(|Tampered| self.objects.corrupt(&key, "integrity check failed"))?;
        if hex::encode(self.keys.object_id(domain, &plain)) != id {
            return Err(self.objects.corrupt(&key, "content does not match its id"));
        }
        Ok((key, plain))
    }

    /// Reads and checks index block `block`.
    ///
    /// # Errors
    /// Missing or corrupt block, named.
    pub async fn get_index(&self, block: u64, id: &str) -> Result<Vec<Entry>, RepoError> {
        let (key, plain) = self
            .get_index_object(id, crate::magic::INDEX_ID_DOMAIN, "index block")
            .await?;
        format::decode_index(
            &plain,
            block,
            self.config.index_span,
            self.config.chunk_size,
        )
        .map_err(|Malformed(m)| self.objects.corrupt(&key, m))
    }

    /// Writes a manifest, only if that snapshot does not exist yet: the
    /// commit point of a backup. Its block list goes into index maps first
    /// (version 2): a map equal to `parent`'s in the same slot is named
    /// again, not uploaded (as an unchanged index block keeps its id), so
    /// what a backup writes follows what changed, not the volume's size.
    /// Returns the bytes uploaded.
    ///
    /// # Errors
    /// Provider errors; [`RepoError::Exists`].
    pub async fn put_manifest(
        &self,
        m: &Manifest,
        parent: Option<&Manifest>,
    ) -> Result<u64, RepoError> {
        let key = manifest_key(&m.volume, &m.name);
        let keep: HashSet<(u64, &str)> = parent
            .map(|p| p.map.iter().map(|(s, id)| (*s, id.as_str())).collect())
            .unwrap_or_default();
        let mut map = Vec::new();
        let mut uploads = Vec::new();
        for (slot, plain) in self.encode_maps(&key, &m.blocks)? {
            let id = hex::encode(self.keys.object_id(crate::magic::MAP_ID_DOMAIN, &plain));
            if !keep.contains(&(slot, id.as_str())) {
                uploads.push((index_key(&id), self.keys.seal(&index_ad(&id), &plain)));
            }
            map.push((slot, id));
        }
        let sent: Vec<u64> =
            futures::stream::iter(uploads.into_iter().map(|(k, sealed)| async move {
                self.objects.put(&k, sealed.into(), false).await
            }))
            .buffer_unordered(8)
            .try_collect()
            .await?;
        let v2 = Manifest {
            blocks: Vec::new(),
            map,
            ..m.clone()
        };
        let json = serde_json::to_vec(&v2).unwrap_or_else(|_| unreachable!("manifests serialise"));
        let body = format::envelope_v(
            format::MANIFEST_MAGIC,
            format::MANIFEST_VERSION,
            &self.keys.seal(key.as_bytes(), &json),
        );
        let put = self.objects.put(&key, body.into(), true).await?;
        self.changed();
        Ok(put + sent.iter().sum::<u64>())
    }

    /// The plain index maps of a block list, by slot.
    fn encode_maps(
        &self,
        key: &str,
        blocks: &[(u64, String)],
    ) -> Result<Vec<(u64, Vec<u8>)>, RepoError> {
        let corrupt = |why: String| self.objects.corrupt(key, why);
        let mut out = Vec::new();
        let mut at = 0;
        while at < blocks.len() {
            let slot = blocks[at].0 / format::MAP_BLOCKS;
            let n = blocks[at..]
                .iter()
                .take_while(|b| b.0 / format::MAP_BLOCKS == slot)
                .count();
            let list = blocks[at..at + n]
                .iter()
                .map(|(b, id)| {
                    let mut raw = [0u8; 32];
                    hex::decode_to_slice(id, &mut raw)
                        .map(|()| (*b, raw))
                        .map_err(|_| corrupt(format!("bad index block id {id:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let plain = format::encode_map(slot, &list).map_err(|Malformed(m)| corrupt(m))?;
            out.push((slot, plain));
            at += n;
        }
        Ok(out)
    }

    /// Reads and checks index map `slot` `id`: its block list.
    async fn get_map(&self, slot: u64, id: &str) -> Result<Vec<(u64, String)>, RepoError> {
        let (key, plain) = self
            .get_index_object(id, crate::magic::MAP_ID_DOMAIN, "index map")
            .await?;
        let list = format::decode_map(&plain, slot)
            .map_err(|Malformed(m)| self.objects.corrupt(&key, m))?;
        Ok(list
            .into_iter()
            .map(|(b, raw)| (b, hex::encode(raw)))
            .collect())
    }

    /// A damaged index map of manifest `key`, as [`RepoError::Corrupt`]
    /// naming the map and the manifest. A missing map too: the manifest
    /// exists, and callers take `Missing` from [`Repo::get_manifest`] to
    /// mean a deleted snapshot (garbage collection would then stop
    /// protecting the rest of it).
    fn map_damage(&self, key: &str, e: RepoError) -> RepoError {
        match e {
            RepoError::Missing { object, .. } => self
                .objects
                .corrupt(&object, format_args!("missing (an index map of {key})")),
            RepoError::Corrupt { object, reason, .. } => self
                .objects
                .corrupt(&object, format_args!("{reason} (an index map of {key})")),
            e => e,
        }
    }

    /// Reads a manifest (version 1, or 2 with its index maps, whose
    /// blocks fill [`Manifest::blocks`]).
    ///
    /// # Errors
    /// Missing or corrupt manifest, named; a missing or corrupt index map
    /// as [`RepoError::Corrupt`], named with its manifest.
    pub async fn get_manifest(&self, volume: &str, name: &str) -> Result<Manifest, RepoError> {
        let key = manifest_key(volume, name);
        let bytes = match self.objects.get_meta(&key).await {
            Ok(b) => b,
            Err(e) => return Err(self.missing_or_gone(e).await),
        };
        let (version, sealed) =
            format::open_envelope_v(format::MANIFEST_MAGIC, format::MANIFEST_VERSION, &bytes)
                .map_err(|Malformed(m)| self.objects.corrupt(&key, m))?;
        let json = self.keys.open(key.as_bytes(), sealed).map_err(|Tampered| {
            self.objects
                .corrupt(&key, "integrity check failed (wrong key, or altered)")
        })?;
        let mut m: Manifest =
            serde_json::from_slice(&json).map_err(|e| self.objects.corrupt(&key, e))?;
        if m.volume != volume || m.name != name {
            return Err(self
                .objects
                .corrupt(&key, "manifest names a different snapshot"));
        }
        let span = self.config.index_span;
        let blocks = m.size.div_ceil(span);
        match version {
            1 if !m.map.is_empty() => {
                return Err(self
                    .objects
                    .corrupt(&key, "a version 1 manifest with index maps"));
            }
            1 => {}
            _ => {
                if !m.blocks.is_empty()
                    || m.map.windows(2).any(|w| w[0].0 >= w[1].0)
                    || m.map
                        .last()
                        .is_some_and(|s| s.0 >= blocks.div_ceil(format::MAP_BLOCKS))
                {
                    return Err(self.objects.corrupt(&key, "index map list out of range"));
                }
                let lists: Vec<Vec<(u64, String)>> = futures::stream::iter(
                    m.map
                        .clone()
                        .into_iter()
                        .map(|(slot, id)| async move { self.get_map(slot, &id).await }),
                )
                .buffered(8)
                .try_collect()
                .await
                .map_err(|e| self.map_damage(&key, e))?;
                m.blocks = lists.into_iter().flatten().collect();
            }
        }
        if m.extent_size == 0
            || m.blocks.windows(2).any(|w| w[0].0 >= w[1].0)
            || m.blocks.last().is_some_and(|b| b.0 >= blocks)
        {
            return Err(self.objects.corrupt(&key, "index block list out of range"));
        }
        Ok(m)
    }

    /// True when snapshot `volume/name` has a manifest (one HEAD).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn has_manifest(&self, volume: &str, name: &str) -> Result<bool, RepoError> {
        if self
            .objects
            .head(&manifest_key(volume, name))
            .await?
            .is_some()
        {
            return Ok(true);
        }
        self.present().await?;
        Ok(false)
    }

    /// Deletes the manifest of snapshot `volume/name` (its chunks stay for
    /// the other snapshots that use them).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn delete_manifest(&self, volume: &str, name: &str) -> Result<(), RepoError> {
        let r = self.objects.delete(&manifest_key(volume, name)).await;
        self.changed();
        r
    }

    /// Names of the snapshots of `volume`, or of every volume, as
    /// `(volume, name)`, sorted.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn list_snapshots(
        &self,
        volume: Option<&str>,
    ) -> Result<Vec<(String, String)>, RepoError> {
        let dir = match volume {
            Some(v) => format!("snapshots/{v}"),
            None => "snapshots".into(),
        };
        let keys = self.objects.list(&dir).await?;
        // Nothing listed: an empty repository, or none any more.
        if keys.is_empty() {
            self.present().await?;
        }
        Ok(keys
            .into_iter()
            .filter_map(|k| {
                let mut parts = k.splitn(3, '/');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("snapshots"), Some(v), Some(n)) if !n.contains('/') => {
                        Some((v.to_string(), n.to_string()))
                    }
                    _ => None,
                }
            })
            .collect())
    }

    /// Writes a group object.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn put_group(&self, g: &Group) -> Result<u64, RepoError> {
        let key = group_key(&g.group);
        let json = serde_json::to_vec(g).unwrap_or_else(|_| unreachable!("groups serialise"));
        let body = format::envelope(format::GROUP_MAGIC, &self.keys.seal(key.as_bytes(), &json));
        let put = self.objects.put(&key, body.into(), false).await?;
        self.changed();
        Ok(put)
    }

    /// Reads a group object.
    ///
    /// # Errors
    /// Missing or corrupt group, named.
    pub async fn get_group(&self, group: &str) -> Result<Group, RepoError> {
        let key = group_key(group);
        let bytes = self.objects.get_meta(&key).await?;
        let sealed = format::open_envelope(format::GROUP_MAGIC, &bytes)
            .map_err(|Malformed(m)| self.objects.corrupt(&key, m))?;
        let json = self.keys.open(key.as_bytes(), sealed).map_err(|Tampered| {
            self.objects
                .corrupt(&key, "integrity check failed (wrong key, or altered)")
        })?;
        let g: Group = serde_json::from_slice(&json).map_err(|e| self.objects.corrupt(&key, e))?;
        if g.group != group {
            return Err(self
                .objects
                .corrupt(&key, "group object names another group"));
        }
        Ok(g)
    }

    /// Deletes group object `group` (see `cloud::catalog`: only once none
    /// of its members is left).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn delete_group(&self, group: &str) -> Result<(), RepoError> {
        self.objects.delete(&group_key(group)).await
    }

    /// Ids of the group objects, sorted.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn list_groups(&self) -> Result<Vec<String>, RepoError> {
        Ok(self
            .objects
            .list("groups")
            .await?
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix("groups/")
                    .filter(|g| !g.is_empty() && !g.contains('/'))
                    .map(str::to_string)
            })
            .collect())
    }
}

impl Objects {
    /// Object access under `prefix` of `store`: a [`PrefixStore`] over a
    /// [`RetryStore`] over the provider's store.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        location: &str,
        storage_class: Option<String>,
    ) -> Self {
        let retrying: Arc<dyn ObjectStore> = Arc::new(RetryStore::new(store, location));
        let prefix = prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            retrying
        } else {
            Arc::new(PrefixStore::new(retrying, prefix))
        };
        Self {
            store,
            location: location.to_string(),
            storage_class,
            local_root: None,
            read_only: false,
        }
    }

    fn refuse_writes(&self, op: &'static str, key: &str) -> Result<(), RepoError> {
        if self.read_only {
            return Err(RepoError::ReadOnly {
                location: self.location.clone(),
                op,
                object: key.to_string(),
            });
        }
        Ok(())
    }

    /// Tells a pack's bytes from a local directory out of the page cache
    /// once they are durable or read: a backup or restore streams each
    /// byte once, so keeping them cached would only push the host's
    /// working set out, and a cache that grows through gigabytes of fresh
    /// pages costs far more than one that recycles a few (kernel-notes/README.md,
    /// "Bulk transfers and the page cache"). Best effort: a file that
    /// cannot be opened is left alone. No-op for object stores, and for
    /// ranges of [`direct::DIRECT_MIN`] or more, which the local store
    /// reads without leaving pages cached ([`direct::DirectLocal`]).
    pub fn drop_cached(&self, key: &str, range: Option<Range<u64>>) {
        let Some(root) = &self.local_root else {
            return;
        };
        if range
            .as_ref()
            .is_some_and(|r| r.end - r.start >= direct::DIRECT_MIN)
        {
            return;
        }
        let Ok(f) = std::fs::File::open(root.join(key)) else {
            return;
        };
        // Whole pages: the kernel drops only those wholly inside the range.
        let (at, len) = range.map_or((0, None), |r| {
            let from = r.start - r.start % 4096;
            let to = r.end.next_multiple_of(4096);
            (from, std::num::NonZeroU64::new(to - from))
        });
        let _ = rustix::fs::fadvise(&f, at, len, rustix::fs::Advice::DontNeed);
    }

    /// The location's name.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn corrupt(&self, object: &str, reason: impl std::fmt::Display) -> RepoError {
        RepoError::Corrupt {
            location: self.location.clone(),
            object: object.to_string(),
            reason: reason.to_string(),
        }
    }

    /// The repository error for a provider error on `key`.
    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> RepoError {
        match e {
            object_store::Error::NotFound { .. } => RepoError::Missing {
                location: self.location.clone(),
                object: key.to_string(),
            },
            object_store::Error::AlreadyExists { .. } => RepoError::Exists {
                location: self.location.clone(),
                object: key.to_string(),
            },
            source => RepoError::Store {
                location: self.location.clone(),
                op,
                object: key.to_string(),
                source: Box::new(source),
            },
        }
    }

    /// Writes an object; with `create`, only if it does not exist yet.
    ///
    /// # Errors
    /// Provider errors; [`RepoError::Exists`] for a conditional create.
    pub async fn put(&self, key: &str, body: Bytes, create: bool) -> Result<u64, RepoError> {
        self.refuse_writes("put", key)?;
        let path = ObjPath::from(key);
        let len = body.len() as u64;
        let mut attributes = Attributes::new();
        if let Some(class) = &self.storage_class {
            attributes.insert(Attribute::StorageClass, class.clone().into());
        }
        let opts = PutOptions {
            mode: if create {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            attributes,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(body.clone()), opts)
            .await
        {
            Ok(_) => Ok(len),
            // A store without conditional writes: check, then write. Two
            // hosts racing here is harmless for content-addressed objects;
            // for manifests the names carry a random tag.
            Err(object_store::Error::NotImplemented { .. }) if create => {
                if self.head(key).await?.is_some() {
                    return Err(RepoError::Exists {
                        location: self.location.clone(),
                        object: key.to_string(),
                    });
                }
                Box::pin(self.put(key, body, false)).await
            }
            Err(e) => Err(self.error("put", key, e)),
        }
    }

    /// Reads a whole metadata object, refusing absurd sizes before their
    /// body is read (one GET: an oversize object is not fetched again).
    ///
    /// # Errors
    /// Missing object, provider errors, an object over the size cap.
    pub async fn get_meta(&self, key: &str) -> Result<Bytes, RepoError> {
        let r = self
            .store
            .get(&ObjPath::from(key))
            .await
            .map_err(|e| self.error("get", key, e))?;
        // Checked after the (retried) request, so never fetched again.
        if r.meta.size > format::MAX_META_OBJECT {
            return Err(self.corrupt(
                key,
                format!(
                    "object is {} bytes, over the {} byte limit for metadata",
                    r.meta.size,
                    format::MAX_META_OBJECT
                ),
            ));
        }
        r.bytes().await.map_err(|e| self.error("get", key, e))
    }

    /// Reads `range` of an object.
    ///
    /// # Errors
    /// Missing object, provider errors, a short answer.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, RepoError> {
        let want = range.end - range.start;
        let b = self
            .store
            .get_range(&ObjPath::from(key), range.clone())
            .await
            .map_err(|e| self.error("get", key, e))?;
        if b.len() as u64 != want {
            return Err(self.corrupt(
                key,
                format!("asked for {want} bytes at {}, got {}", range.start, b.len()),
            ));
        }
        Ok(b)
    }

    /// An object's size and modification time (the store's clock), or
    /// `None` when it does not exist.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn head_meta(&self, key: &str) -> Result<Option<Listed>, RepoError> {
        match self.store.head(&ObjPath::from(key)).await {
            Ok(m) => Ok(Some(Listed {
                key: key.to_string(),
                size: m.size,
                modified: m.last_modified.into(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("head", key, e)),
        }
    }

    /// The size of an object, or `None` when it does not exist.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, RepoError> {
        match self.store.head(&ObjPath::from(key)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("head", key, e)),
        }
    }

    /// Deletes an object (missing is fine).
    ///
    /// # Errors
    /// Provider errors.
    pub async fn delete(&self, key: &str) -> Result<(), RepoError> {
        self.refuse_writes("delete", key)?;
        let path = ObjPath::from(key);
        let r = retry::run(&self.location, "delete", &path, || self.store.delete(&path)).await;
        match r {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    /// Keys (relative to the repository) under `dir`, sorted; the listing
    /// is retried whole.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, RepoError> {
        Ok(self
            .list_meta(dir)
            .await?
            .into_iter()
            .map(|l| l.key)
            .collect())
    }

    /// The objects under `dir` with their sizes and the store's
    /// modification times, sorted by key.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn list_meta(&self, dir: &str) -> Result<Vec<Listed>, RepoError> {
        let path = ObjPath::from(dir);
        let metas: Vec<object_store::ObjectMeta> =
            retry::run(&self.location, "list", &path, || {
                self.store.list(Some(&path)).try_collect()
            })
            .await
            .map_err(|e| self.error("list", dir, e))?;
        let mut out: Vec<Listed> = metas
            .into_iter()
            .map(|m| Listed {
                key: m.location.to_string(),
                size: m.size,
                modified: m.last_modified.into(),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// An object as listed by the store.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Key relative to the repository.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the store last wrote it (the store's clock, not this host's).
    pub modified: std::time::SystemTime,
}

/// Parses and checks a config object.
fn parse_config(o: &Objects, bytes: &[u8]) -> Result<Config, RepoError> {
    let c: Config = serde_json::from_slice(bytes).map_err(|e| o.corrupt("config", e))?;
    if c.format != crate::magic::REPO_FORMAT {
        return Err(o.corrupt("config", "not a blockd repository"));
    }
    if c.version > format::FORMAT_VERSION {
        return Err(o.corrupt(
            "config",
            format!(
                "format version {} is newer than this blockd ({}); upgrade blockd",
                c.version,
                format::FORMAT_VERSION
            ),
        ));
    }
    if c.chunk_size == 0
        || c.chunk_size > format::MAX_CHUNK_SIZE
        || c.index_span < c.chunk_size
        || c.index_span > format::MAX_INDEX_SPAN
        || !c.index_span.is_multiple_of(c.chunk_size)
        || c.pack_size == 0
        || c.pack_size > 1 << 30
    {
        return Err(o.corrupt("config", "chunk, pack or index sizes out of range"));
    }
    Ok(c)
}

/// Unlocks the key material of `c` with `passphrase`.
fn unlock(o: &Objects, c: &Config, passphrase: Option<&str>) -> Result<Keys, RepoError> {
    let key_err = |message: String| RepoError::Key {
        location: o.location.clone(),
        message,
    };
    match (&c.keys, passphrase) {
        (KeyWrap::None { material }, None) => {
            let m: [u8; 64] = hex::decode(material)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| o.corrupt("config", "key material is not 64 hex bytes"))?;
            Ok(Keys::new(&m, false))
        }
        (KeyWrap::None { .. }, Some(_)) => Err(key_err(
            "the repository is not encrypted, but an encryption passphrase was given: create the credentials without --encryption-passphrase, or use a new bucket or prefix for an encrypted repository".into(),
        )),
        (KeyWrap::Argon2id { .. }, None) => Err(key_err(
            "the repository is encrypted: give its passphrase with --encryption-passphrase".into(),
        )),
        (
            KeyWrap::Argon2id {
                m_kib,
                t,
                p,
                salt,
                nonce,
                wrapped,
            },
            Some(pass),
        ) => {
            let salt = hex::decode(salt).map_err(|e| o.corrupt("config", e))?;
            let nonce: [u8; 12] = hex::decode(nonce)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| o.corrupt("config", "bad key nonce"))?;
            let wrapped = hex::decode(wrapped).map_err(|e| o.corrupt("config", e))?;
            let kek = crypto::derive_kek(pass, &salt, *m_kib, *t, *p)
                .map_err(|e| o.corrupt("config", e))?;
            let m = crypto::unwrap(&kek, &wrapped, &nonce).ok_or_else(|| {
                key_err("wrong encryption passphrase: the repository's keys did not unlock (nothing was read or written)".into())
            })?;
            Ok(Keys::new(&m, true))
        }
    }
}

/// Associated data of a chunk record.
pub fn chunk_ad(id: &[u8; 32]) -> [u8; 33] {
    let mut ad = [0u8; 33];
    ad[0] = crate::magic::CHUNK_AD;
    ad[1..].copy_from_slice(id);
    ad
}

/// Associated data of an index block.
pub fn index_ad(id_hex: &str) -> Vec<u8> {
    format!("{}{id_hex}", crate::magic::INDEX_AD).into_bytes()
}

/// Associated data of a pack trailer.
pub fn pack_ad(pack: &[u8; 16]) -> Vec<u8> {
    format!("{}{}", crate::magic::PACK_AD, pack_hex(pack)).into_bytes()
}

/// A fresh config: default sizes and new key material, wrapped when a
/// passphrase is given. Returns the material too.
pub fn new_config(passphrase: Option<&str>) -> (Config, zeroize::Zeroizing<[u8; 64]>) {
    let mut material = zeroize::Zeroizing::new([0u8; 64]);
    crypto::fill_random(&mut *material);
    let keys = match passphrase {
        None => KeyWrap::None {
            material: hex::encode(*material),
        },
        Some(pass) => {
            let mut salt = [0u8; 16];
            let mut nonce = [0u8; 12];
            crypto::fill_random(&mut salt);
            crypto::fill_random(&mut nonce);
            let kek = crypto::derive_kek(
                pass,
                &salt,
                crypto::ARGON2_M_KIB,
                crypto::ARGON2_T,
                crypto::ARGON2_P,
            )
            .unwrap_or_else(|e| unreachable!("default Argon2 parameters are valid: {e}"));
            KeyWrap::Argon2id {
                m_kib: crypto::ARGON2_M_KIB,
                t: crypto::ARGON2_T,
                p: crypto::ARGON2_P,
                salt: hex::encode(salt),
                nonce: hex::encode(nonce),
                wrapped: hex::encode(crypto::wrap(&kek, &material, &nonce)),
            }
        }
    };
    (
        Config {
            format: crate::magic::REPO_FORMAT.into(),
            version: format::FORMAT_VERSION,
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            index_span: DEFAULT_INDEX_SPAN,
            keys,
        },
        material,
    )
}

/// Builds one pack in memory: sealed chunk records appended, then the
/// sealed trailer and footer. The bytes live in an anonymous mapping
/// ([`mapped::Bytestring`]), reused from pack to pack while the job runs
/// and unmapped after it, so a finished backup leaves no pack buffers in
/// the allocator's arenas.
#[derive(Debug)]
pub struct PackBuilder {
    /// Pack id.
    pub id: [u8; 16],
    buf: mapped::Bytestring,
    chunks: Vec<ChunkLoc>,
}

impl PackBuilder {
    /// An empty pack with a new id, its buffer sized once for a full pack
    /// of `config`: the last record that takes it past `pack_size` (at
    /// most a chunk and its seal) and the trailer (well under 1/32 of the
    /// pack even for 4 KiB chunks) fit without the buffer growing, so
    /// filling a pack never copies it again or doubles its memory.
    ///
    /// # Errors
    /// The buffer could not be mapped.
    pub fn for_config(config: &Config) -> Result<Self, RepoError> {
        let cap = config
            .pack_size
            .saturating_add(config.pack_size / 32)
            .saturating_add(config.chunk_size)
            .saturating_add(4096);
        Self::new(usize::try_from(cap).unwrap_or(0))
    }

    /// An empty pack with a new id.
    ///
    /// # Errors
    /// The buffer could not be mapped.
    pub fn new(capacity: usize) -> Result<Self, RepoError> {
        Ok(Self {
            id: new_pack_id(),
            buf: mapped::Bytestring::with_capacity(capacity).map_err(RepoError::Memory)?,
            chunks: Vec::new(),
        })
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// No chunks yet.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Appends a sealed chunk record; returns where it is.
    ///
    /// # Errors
    /// A pack past 4 GiB, or a record over 4 GiB: nothing is appended.
    /// No memory to grow the buffer.
    pub fn push(
        &mut self,
        id: [u8; 32],
        sealed: &[u8],
        plain_len: u32,
    ) -> Result<ChunkLoc, RepoError> {
        let loc = ChunkLoc {
            id,
            pack: self.id,
            offset: format::u32_field("pack offset", self.buf.len() as u64)?,
            stored_len: format::u32_field("record length", sealed.len() as u64)?,
            plain_len,
        };
        self.buf
            .extend_from_slice(sealed)
            .map_err(RepoError::Memory)?;
        self.chunks.push(loc);
        Ok(loc)
    }

    /// Seals the trailer and returns the pack bytes and its chunks.
    ///
    /// # Errors
    /// A trailer too large for its format; no memory to grow the buffer.
    pub fn finish(mut self, keys: &Keys) -> Result<(Bytes, Vec<ChunkLoc>), RepoError> {
        let trailer = format::encode_trailer(&self.chunks)?;
        let mut tail = Vec::with_capacity(trailer.len() + keys.overhead() + 8);
        keys.seal_into(&pack_ad(&self.id), &trailer, &mut tail);
        let tl = format::u32_field("trailer length", tail.len() as u64)?;
        tail.extend_from_slice(&tl.to_le_bytes());
        tail.extend_from_slice(format::PACK_MAGIC);
        self.buf
            .extend_from_slice(&tail)
            .map_err(RepoError::Memory)?;
        Ok((self.buf.into_bytes(), self.chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::format::*;
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/repo-v1");

    fn material() -> [u8; 64] {
        let mut m = [0u8; 64];
        for (i, b) in m.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap_or(0);
        }
        m
    }

    fn sample() -> Vec<u8> {
        (0..4096u32)
            .map(|i| b"blockd known answer "[(i % 20) as usize])
            .collect()
    }

    async fn repo(encrypted: bool) -> Repo {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let mut r = Repo::open(store, "", "kat", None, None, true)
            .await
            .unwrap();
        r.keys = Keys::new(&material(), encrypted);
        r
    }

    #[tokio::test]
    async fn corrupt_and_oversize_objects_are_fetched_once() {
        let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let counted = Arc::new(faulty::FaultyStore::new(mem.clone(), 0.0));
        let repo = Repo::open(counted.clone(), "p", "mem", None, None, true)
            .await
            .unwrap();
        let o = repo.objects();
        o.put(
            &manifest_key("v", "s"),
            Bytes::from_static(b"not a manifest"),
            false,
        )
        .await
        .unwrap();
        let before = counted.gets();
        let e = repo.get_manifest("v", "s").await.unwrap_err();
        assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("snapshots/v/s"), "{e}");
        assert_eq!(
            counted.gets() - before,
            1,
            "a corrupt object is fetched once"
        );

        let big = vec![0u8; usize::try_from(format::MAX_META_OBJECT).unwrap() + 1];
        o.put("groups/big", big.into(), false).await.unwrap();
        let before = counted.gets();
        let e = repo.get_group("big").await.unwrap_err();
        assert!(
            matches!(&e, RepoError::Corrupt { reason, .. } if reason.contains("over the")),
            "{e}"
        );
        assert_eq!(
            counted.gets() - before,
            1,
            "an oversize object is fetched once"
        );

        // A provider failing every request is tried ATTEMPTS times, then
        // named in the error.
        let failing = Arc::new(faulty::FaultyStore::new(mem, 1.0));
        let o = Objects::new(failing.clone(), "p", "mem", None);
        let e = o.get_meta("config").await.unwrap_err();
        assert!(matches!(e, RepoError::Store { .. }), "{e}");
        assert!(e.to_string().contains("config"), "{e}");
        assert_eq!(failing.gets(), u64::from(retry::ATTEMPTS));
    }

    pub(super) const KAT_SNAPSHOT: &str = "20261121T101500.123Z-3f4f0a67";
    pub(super) const KAT_V2: &str = "20261123T101500.123Z-3f4f0a68";

    /// The known-answer manifest: blocks 0 and 5 (both with index block
    /// `ix`) of a 1 GiB volume.
    pub(super) fn kat_manifest(ix: &str) -> Manifest {
        Manifest {
            volume: "kat".into(),
            name: KAT_SNAPSHOT.into(),
            created: "2026-11-21T10:15:00.123Z".into(),
            size: 1 << 30,
            extent_size: 4096,
            full: true,
            chain: 0,
            parent: None,
            group: None,
            labels: [("app".to_string(), "db".to_string())].into(),
            bytes_read: 8192,
            bytes_new: 4096,
            bytes_reused: 4096,
            bytes_uploaded: 9000,
            pause_us: 120,
            pre_exec: None,
            post_exec: None,
            blocks: vec![(0, ix.to_string()), (5, ix.to_string())],
            map: Vec::new(),
            host: Some("h".into()),
            schedule: None,
            expires: None,
            started_ms: Some(1_763_720_100_000),
        }
    }

    /// A version 1 manifest's bytes, as blockd wrote them before the
    /// two-level map.
    fn manifest_v1_bytes(repo: &Repo, ix_id: &str) -> Vec<u8> {
        let key = manifest_key("kat", KAT_SNAPSHOT);
        let json = serde_json::to_vec(&kat_manifest(ix_id)).unwrap();
        let mut out = format::MANIFEST_MAGIC.to_vec();
        out.push(1);
        out.extend_from_slice(&repo.keys.seal(key.as_bytes(), &json));
        out
    }

    #[tokio::test]
    async fn manifests_keep_unchanged_index_maps_of_their_parent() {
        let r = repo(true).await;
        let id = |n: u64| hex::encode(r.keys.object_id(b"test", &n.to_le_bytes()));
        // 64 TiB at 64 MiB blocks: 2^20 blocks, 256 map slots; data in
        // three of them.
        let blocks: Vec<(u64, String)> = [3, 4095, 4096, 700_000, (1 << 20) - 1]
            .into_iter()
            .map(|b| (b, id(b)))
            .collect();
        let first = Manifest {
            size: 64 << 40,
            blocks: blocks.clone(),
            ..kat_manifest("")
        };
        r.put_manifest(&first, None).await.unwrap();
        let first = r.get_manifest("kat", KAT_SNAPSHOT).await.unwrap();
        assert_eq!(first.blocks, blocks);
        let slots: Vec<u64> = first.map.iter().map(|m| m.0).collect();
        assert_eq!(slots, [0, 1, 170, 255]);
        assert_eq!(r.list_index_blocks().await.unwrap().0.len(), 4);
        // One block changes: one new map, the other three named again.
        let mut changed = blocks.clone();
        changed[3].1 = id(1);
        let second = Manifest {
            name: KAT_V2.into(),
            blocks: changed.clone(),
            ..first.clone()
        };
        r.put_manifest(&second, Some(&first)).await.unwrap();
        let second = r.get_manifest("kat", KAT_V2).await.unwrap();
        assert_eq!(second.blocks, changed);
        assert_eq!(r.list_index_blocks().await.unwrap().0.len(), 5);
        let same: Vec<bool> = first
            .map
            .iter()
            .zip(&second.map)
            .map(|(a, b)| a == b)
            .collect();
        assert_eq!(same, [true, true, false, true]);
        // A missing map is named; the snapshot is not read without it.
        r.objects()
            .delete(&index_key(&second.map[2].1))
            .await
            .unwrap();
        // It is damage, not a deleted snapshot.
        let e = r.get_manifest("kat", KAT_V2).await.unwrap_err();
        assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains(&second.map[2].1) && e.contains(KAT_V2) && e.contains("missing"),
            "{e}"
        );
    }

    /// Compares `bytes` with a committed fixture (written when
    /// `BLOCKD_WRITE_FIXTURES=1`).
    fn check(name: &str, bytes: &[u8]) -> Vec<u8> {
        let path = std::path::Path::new(FIXTURES).join(name);
        if std::env::var_os("BLOCKD_WRITE_FIXTURES").is_some() && !path.exists() {
            std::fs::create_dir_all(FIXTURES).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
    }

    #[tokio::test]
    async fn known_answer_vectors() {
        let plain_repo = repo(false).await;
        let data = sample();
        let id = plain_repo.keys.chunk_id(&data);
        assert_eq!(
            hex::encode(id),
            String::from_utf8(check("chunk-id.hex", hex::encode(id).as_bytes())).unwrap(),
            "keyed BLAKE3 chunk id changed"
        );
        // Unencrypted sealing is deterministic: bytes must match exactly.
        let rec = plain_repo.seal_chunk(&id, &data);
        assert_eq!(
            rec,
            check("chunk-plain.bin", &rec),
            "chunk record bytes changed"
        );
        let loc = ChunkLoc {
            id,
            pack: [0xab; 16],
            offset: 0,
            stored_len: u32::try_from(rec.len()).unwrap(),
            plain_len: 4096,
        };
        assert_eq!(plain_repo.open_chunk(&loc, &rec).unwrap(), data);

        // Encrypted records use random nonces: the committed one must open.
        let enc_repo = repo(true).await;
        let fresh = enc_repo.seal_chunk(&id, &data);
        let committed = check("chunk-encrypted.bin", &fresh);
        let loc_e = ChunkLoc {
            stored_len: u32::try_from(committed.len()).unwrap(),
            ..loc
        };
        assert_eq!(enc_repo.open_chunk(&loc_e, &committed).unwrap(), data);
        assert!(plain_repo.open_chunk(&loc_e, &committed).is_err());

        // An index block.
        let entries = vec![
            Entry {
                start: 0,
                len: 4096,
                chunk_off: 0,
                chunk: loc,
            },
            Entry {
                start: 65536,
                len: 1024,
                chunk_off: 2048,
                chunk: loc,
            },
        ];
        let ix = encode_index(2, &entries).unwrap();
        assert_eq!(
            ix,
            check("index-plain.bin", &ix),
            "index block bytes changed"
        );
        let ix_id = hex::encode(
            plain_repo
                .keys
                .object_id(crate::magic::INDEX_ID_DOMAIN, &ix),
        );
        let sealed = plain_repo.keys.seal(&index_ad(&ix_id), &ix);
        assert_eq!(sealed, check("index-sealed.bin", &sealed));
        assert_eq!(
            decode_index(&ix, 2, DEFAULT_INDEX_SPAN, DEFAULT_CHUNK_SIZE).unwrap(),
            entries
        );

        // A pack of two chunks with a fixed id.
        let mut pb = PackBuilder::new(0).unwrap();
        pb.id = [0x5a; 16];
        pb.push(id, &rec, 4096).unwrap();
        pb.push(id, &rec, 4096).unwrap();
        let (pack, chunks) = pb.finish(&plain_repo.keys).unwrap();
        assert_eq!(pack, check("pack-plain.bin", &pack), "pack bytes changed");
        let (records, trailer) = split_pack(&pack).unwrap();
        let t = plain_repo
            .keys
            .open(&pack_ad(&[0x5a; 16]), trailer)
            .unwrap();
        assert_eq!(
            decode_trailer(&t, [0x5a; 16], records.len() as u64).unwrap(),
            chunks
        );

        // Manifests: version 1 (the block list inline) is still read.
        let store = plain_repo.objects();
        let v1 = check("manifest-v1.bin", &manifest_v1_bytes(&plain_repo, &ix_id));
        store
            .put(&manifest_key("kat", KAT_SNAPSHOT), v1.into(), false)
            .await
            .unwrap();
        assert_eq!(
            plain_repo.get_manifest("kat", KAT_SNAPSHOT).await.unwrap(),
            kat_manifest(&ix_id)
        );

        // Version 2: the block list in an index map (blocks 0 and 5 share
        // slot 0), then the manifest naming it.
        let m = kat_manifest(&ix_id);
        plain_repo
            .put_manifest(
                &Manifest {
                    name: KAT_V2.into(),
                    ..m.clone()
                },
                None,
            )
            .await
            .unwrap();
        let v2 = store
            .get_meta(&manifest_key("kat", KAT_V2))
            .await
            .unwrap()
            .to_vec();
        let v2 = check("manifest-v2.bin", &v2);
        assert_eq!(v2[8], 2, "manifest version");
        let maps = plain_repo.encode_maps("kat", &m.blocks).unwrap();
        assert_eq!(maps.len(), 1);
        let map_plain = check("map-plain.bin", &maps[0].1);
        assert_eq!(map_plain, maps[0].1, "index map bytes changed");
        let map_id = hex::encode(
            plain_repo
                .keys
                .object_id(crate::magic::MAP_ID_DOMAIN, &map_plain),
        );
        let map_sealed = store.get_meta(&index_key(&map_id)).await.unwrap().to_vec();
        assert_eq!(map_sealed, check("map-sealed.bin", &map_sealed));
        // The committed bytes read back as the same manifest.
        let kat2 = repo(false).await;
        kat2.objects()
            .put(&index_key(&map_id), map_sealed.into(), false)
            .await
            .unwrap();
        kat2.objects()
            .put(&manifest_key("kat", KAT_V2), v2.into(), false)
            .await
            .unwrap();
        let back = kat2.get_manifest("kat", KAT_V2).await.unwrap();
        assert_eq!(back.map, vec![(0, map_id)]);
        assert_eq!(
            Manifest {
                map: Vec::new(),
                ..back
            },
            Manifest {
                name: KAT_V2.into(),
                ..m
            }
        );

        // Damage records of one pack under both key forms: the object's
        // own key (earlier builds) and a key of its own per record; read
        // back, they merge.
        let pack_obj = Repo::pack_name(&[0x5a; 16]);
        let legacy = damage::Record {
            object: pack_obj.clone(),
            data: true,
            index: vec![ix_id.clone()],
            offsets: vec![0],
        };
        let tagged = damage::Record {
            offsets: vec![u32::try_from(rec.len()).unwrap()],
            index: vec!["ee".repeat(32)],
            ..legacy.clone()
        };
        let legacy_key = format!("damaged/{pack_obj}");
        let tagged_key = format!("damaged/{pack_obj}.0123456789abcdef");
        let mut committed = Vec::new();
        for (key, r, name) in [
            (&legacy_key, &legacy, "damage-object-key.bin"),
            (&tagged_key, &tagged, "damage-own-key.bin"),
        ] {
            plain_repo.put_damage_at(key, r).await.unwrap();
            let bytes = store.get_meta(key).await.unwrap().to_vec();
            assert_eq!(bytes, check(name, &bytes), "damage record bytes changed");
            committed.push((key.clone(), bytes));
        }
        let kat3 = repo(false).await;
        for (key, bytes) in committed {
            kat3.objects().put(&key, bytes.into(), false).await.unwrap();
        }
        let read = kat3.damage_records().await.unwrap();
        assert!(read.unreadable.is_empty());
        let mut both = legacy.clone();
        both.merge(tagged);
        assert_eq!(read.records, vec![both]);
        assert_eq!(
            read.records[0].offsets,
            vec![0, u32::try_from(rec.len()).unwrap()]
        );

        // Config wrapped with a known passphrase (small Argon2 cost for speed).
        let kek = crypto::derive_kek("blockd known answer", &[1u8; 16], 256, 1, 1).unwrap();
        let wrapped = crypto::wrap(&kek, &material(), &[2u8; 12]);
        assert_eq!(
            wrapped,
            check("keys-wrapped.bin", &wrapped),
            "key wrapping changed"
        );
        assert_eq!(
            crypto::unwrap(&kek, &wrapped, &[2u8; 12]).as_deref(),
            Some(&material())
        );
    }

    /// A repository's identity is kept in the state database (each
    /// location's, to tell a repository made anew at the same address, and
    /// each backup task's, so that a resume goes on only where it began):
    /// the same config object must give the same identity in every build.
    /// A field added to [`Config`] must stay out of the identity.
    #[tokio::test]
    async fn a_config_object_always_gives_the_same_repository_id() {
        let made = Config {
            keys: KeyWrap::None {
                material: hex::encode(material()),
            },
            ..new_config(None).0
        };
        let fresh = serde_json::to_vec_pretty(&made).unwrap();
        let committed = check("config.json", &fresh);
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        store
            .put(&ObjPath::from("config"), committed.into())
            .await
            .unwrap();
        let r = Repo::open(store, "", "kat", None, None, false)
            .await
            .unwrap();
        let id = r.id();
        assert_eq!(
            id,
            String::from_utf8(check("repository-id.hex", id.as_bytes())).unwrap(),
            "the repository id of an unchanged config changed"
        );
    }

    #[tokio::test]
    async fn wrong_passphrase_and_encrypted_roundtrip() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let r = Repo::open(store.clone(), "p", "t", Some("one"), None, true)
            .await
            .unwrap();
        assert!(r.keys.encrypted());
        let e = Repo::open(store.clone(), "p", "t", Some("two"), None, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("wrong encryption passphrase"), "{e}");
        let e = Repo::open(store.clone(), "p", "t", None, None, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("--encryption-passphrase"), "{e}");
        // A manifest round trip, and a flipped byte named on read.
        let m = Manifest {
            volume: "v".into(),
            name: "n".into(),
            created: "c".into(),
            size: 1 << 20,
            extent_size: 4096,
            full: true,
            chain: 0,
            parent: None,
            group: None,
            labels: Default::default(),
            bytes_read: 0,
            bytes_new: 0,
            bytes_reused: 0,
            bytes_uploaded: 0,
            pause_us: 0,
            pre_exec: None,
            post_exec: None,
            blocks: vec![],
            map: Vec::new(),
            host: None,
            schedule: None,
            expires: None,
            started_ms: None,
        };
        r.put_manifest(&m, None).await.unwrap();
        assert!(matches!(
            r.put_manifest(&m, None).await,
            Err(RepoError::Exists { .. })
        ));
        assert_eq!(r.get_manifest("v", "n").await.unwrap(), m);
        let path = ObjPath::from("p/snapshots/v/n");
        let mut b = store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let last = b.len() - 1;
        b[last] ^= 1;
        store.put(&path, b.into()).await.unwrap();
        let e = r.get_manifest("v", "n").await.unwrap_err().to_string();
        assert!(e.contains("snapshots/v/n") && e.contains("corrupt"), "{e}");
    }
}
