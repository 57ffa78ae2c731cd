//! Every magic number, version and domain-separation string blockd writes
//! into a file or an object. Bytes already written depend on these values:
//! **never change one**. A new layout gets a new version (and readers of
//! the old one stay), never a new meaning for an old value. Known-answer
//! vectors (`tests/fixtures/repo-v1/`) fail if a repository value moves.
//!
//! The NBD protocol's own magics belong to the protocol, not to blockd:
//! they stay with its codec in `nbd/proto.rs`.

// ---- repository objects (repo/, FORMAT.md) ----

/// `config.format`: what a blockd repository's config says it is.
pub const REPO_FORMAT: &str = "blockd-repository";
/// Repository format version this build writes and reads.
pub const REPO_VERSION: u32 = 1;
/// Pack footer.
pub const PACK_MAGIC: &[u8; 8] = b"BLKDPACK";
/// Manifest envelope.
pub const MANIFEST_MAGIC: &[u8; 8] = b"BLKDSNAP";
/// Group object envelope.
pub const GROUP_MAGIC: &[u8; 8] = b"BLKDGRUP";
/// Garbage-collection mark (`locks/marks/<id>`): a condemned list.
pub const MARK_MAGIC: &[u8; 8] = b"BLKDMARK";
/// Backup session (`locks/sessions/<task>`): a writer's registration; also
/// a restore's lease (`locks/readers/<task>`), which has the same body.
pub const SESSION_MAGIC: &[u8; 8] = b"BLKDSESS";
/// Relocation (`relocs/<aa>/<from>/<to>`): where a repacked pack's records are.
pub const RELOC_MAGIC: &[u8; 8] = b"BLKDRELO";
/// Damage record (`damaged/<object key>.<tag>`): what new backups must not reuse.
pub const DAMAGE_MAGIC: &[u8; 8] = b"BLKDDAMG";
/// Chunk payload kind: stored as is.
pub const CHUNK_RAW: u8 = 0;
/// Chunk payload kind: an lz4 block.
pub const CHUNK_LZ4: u8 = 1;
/// Associated data of a chunk record: this byte, then the chunk id.
pub const CHUNK_AD: u8 = b'c';
/// Associated data of an index block: this, then its id in hex.
pub const INDEX_AD: &str = "index/";
/// Associated data of a pack trailer: this, then the pack id in hex.
pub const PACK_AD: &str = "pack/";
/// Domain of index block ids (keyed BLAKE3 of the plain block).
pub const INDEX_ID_DOMAIN: &[u8] = b"index";
/// Domain of index map ids (keyed BLAKE3 of the plain map).
pub const MAP_ID_DOMAIN: &[u8] = b"index map";
/// First byte of an index map's plain bytes (an index block's is its
/// version, 1).
pub const MAP_KIND: u8 = 2;
/// Manifest envelope version this build writes: 2, the block list in index
/// maps. Version 1 (the list inline) is still read.
pub const MANIFEST_VERSION: u8 = 2;
/// BLAKE3 key-derivation context of the integrity tag key.
pub const TAG_KEY_CONTEXT: &str = "blockd 2026 object tag";

// ---- local files (state dir) ----

/// Dirty map file (`volumes/<name>.dirty`, `changes.dirty`).
pub const DIRTY_MAGIC: &[u8; 8] = b"BLKDDIRT";
/// Dirty map file version (2: 64-bit extent numbers; 1 is still read).
pub const DIRTY_VERSION: u32 = 2;
/// Present map of a lazy restore (`volumes/<name>.present`).
pub const PRESENT_MAGIC: &[u8; 8] = b"BLKDPRES";
/// Present map version.
pub const PRESENT_VERSION: u32 = 1;
/// Journal of a present map (`volumes/<name>.present.log0`, `.log1`).
pub const PRESENT_LOG_MAGIC: &[u8; 8] = b"BLKDPLOG";
/// Present map journal version.
pub const PRESENT_LOG_VERSION: u32 = 1;
/// State database schema version (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 7;
