//! The bytes of every repository object (see `FORMAT.md` beside this file).
//!
//! Pure encoding and decoding. Decoders take untrusted bytes: every count
//! and length is checked against the bytes actually present and against
//! fixed caps before anything is allocated.

use serde::{Deserialize, Serialize};

pub use crate::magic::{
    CHUNK_LZ4, CHUNK_RAW, GROUP_MAGIC, MANIFEST_MAGIC, MANIFEST_VERSION, MAP_KIND, PACK_MAGIC,
    REPO_VERSION as FORMAT_VERSION,
};
/// Index blocks one index map covers (a version 2 manifest's second
/// level): 256 GiB of volume at the default span, so a 64 TiB volume's
/// manifest names at most 256 maps, and a map is at most 160 KiB.
pub const MAP_BLOCKS: u64 = 4096;
/// Bytes per index map record: block number, index block id.
pub const MAP_REC_LEN: usize = 8 + 32;
/// Largest chunk a repository may use.
pub const MAX_CHUNK_SIZE: u64 = 1 << 20;
/// Largest index span.
pub const MAX_INDEX_SPAN: u64 = 1 << 30;
/// Largest metadata object (manifest, group, index block, pack trailer) read.
pub const MAX_META_OBJECT: u64 = 64 << 20;

/// `<prefix>/config`: plain JSON, written once with a conditional create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Always "blockd-repository".
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Largest chunk, bytes.
    pub chunk_size: u64,
    /// Target pack size, bytes.
    pub pack_size: u64,
    /// Volume bytes covered by one index block.
    pub index_span: u64,
    /// How the key material is kept.
    pub keys: KeyWrap,
}

/// Key material: wrapped by a passphrase, or in the clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum KeyWrap {
    /// No passphrase: material in hex, objects tagged but not encrypted.
    None {
        /// 64 bytes, hex.
        material: String,
    },
    /// Argon2id-derived key wrapping the material with AES-256-GCM-SIV.
    Argon2id {
        /// Memory cost, KiB.
        m_kib: u32,
        /// Passes.
        t: u32,
        /// Lanes.
        p: u32,
        /// 16 bytes, hex.
        salt: String,
        /// 12 bytes, hex.
        nonce: String,
        /// 80 bytes (64 + tag), hex.
        wrapped: String,
    },
}

/// Where one chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLoc {
    /// Chunk id (keyed BLAKE3 of its plain bytes).
    pub id: [u8; 32],
    /// Pack holding it.
    pub pack: [u8; 16],
    /// Byte offset of the sealed record in the pack.
    pub offset: u32,
    /// Length of the sealed record.
    pub stored_len: u32,
    /// Plain length of the chunk.
    pub plain_len: u32,
}

/// One mapped run of an index block: `len` volume bytes at `start` (within
/// the block) read from `chunk` starting at `chunk_off`. Bytes of the block
/// covered by no entry are zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Offset within the block.
    pub start: u32,
    /// Length.
    pub len: u32,
    /// Offset within the chunk's plain bytes.
    pub chunk_off: u32,
    /// The chunk.
    pub chunk: ChunkLoc,
}

impl Entry {
    /// End offset within the block.
    pub fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.len)
    }
}

/// Bytes per encoded entry.
pub const ENTRY_LEN: usize = 4 + 4 + 4 + 32 + 16 + 4 + 4 + 4;
/// Bytes per pack trailer record.
pub const TRAILER_REC_LEN: usize = 32 + 4 + 4 + 4;

/// Decoding failed: the object is not what it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

pub(crate) fn bad(msg: impl Into<String>) -> Malformed {
    Malformed(msg.into())
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.b.len() < n {
            return Err(bad("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Malformed> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, Malformed> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// A value too large for its field: the encoder refuses rather than
/// writing a wrong one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value} does not fit its {bits}-bit field")]
pub struct Overflow {
    /// Which field.
    pub what: &'static str,
    /// The value.
    pub value: u64,
    /// Field width.
    pub bits: u32,
}

/// `value` as a u32 field named `what`.
///
/// # Errors
/// [`Overflow`] when it does not fit.
pub fn u32_field(
    what: &'static str,
    value: impl TryInto<u32> + Copy + Into<u64>,
) -> Result<u32, Overflow> {
    value.try_into().map_err(|_| Overflow {
        what,
        value: value.into(),
        bits: 32,
    })
}

/// Index map plaintext: `kind u8 = 2 | slot u64 | count u32 | count ×
/// (block u64 | index block id [32])`, blocks ascending, every one in
/// `slot × MAP_BLOCKS .. (slot + 1) × MAP_BLOCKS`, at least one.
///
/// # Errors
/// A list that does not belong to `slot`, or is empty or unsorted.
pub fn encode_map(slot: u64, blocks: &[(u64, [u8; 32])]) -> Result<Vec<u8>, Malformed> {
    check_map(slot, blocks.iter().map(|b| b.0), blocks.len())?;
    let count = u32::try_from(blocks.len()).map_err(|_| bad("index map too long"))?;
    let mut out = Vec::with_capacity(13 + blocks.len() * MAP_REC_LEN);
    out.push(MAP_KIND);
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for (b, id) in blocks {
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(id);
    }
    Ok(out)
}

/// Decodes index map `slot`.
///
/// # Errors
/// Anything out of shape.
pub fn decode_map(bytes: &[u8], slot: u64) -> Result<Vec<(u64, [u8; 32])>, Malformed> {
    let mut r = Reader { b: bytes };
    if r.u8()? != MAP_KIND {
        return Err(bad("not an index map"));
    }
    let got = r.u64()?;
    if got != slot {
        return Err(bad(format!("index map is for slot {got}, expected {slot}")));
    }
    let count = r.u32()? as usize;
    if Some(r.b.len()) != count.checked_mul(MAP_REC_LEN) {
        return Err(bad(format!(
            "index map claims {count} blocks but holds {} bytes of them",
            r.b.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        out.push((r.u64()?, r.arr()?));
    }
    check_map(slot, out.iter().map(|b| b.0), count)?;
    Ok(out)
}

fn check_map(slot: u64, blocks: impl Iterator<Item = u64>, n: usize) -> Result<(), Malformed> {
    let lo = slot
        .checked_mul(MAP_BLOCKS)
        .ok_or_else(|| bad("index map slot out of range"))?;
    let hi = lo.saturating_add(MAP_BLOCKS);
    if n == 0 {
        return Err(bad("empty index map"));
    }
    let mut prev = None;
    for b in blocks {
        if b < lo || b >= hi || prev.is_some_and(|p| p >= b) {
            return Err(bad(format!(
                "index map {slot}: block {b} out of order or outside {lo}..{hi}"
            )));
        }
        prev = Some(b);
    }
    Ok(())
}

/// Index block plaintext: `version u8 = 1 | block u64 | count u32 |
/// count × entry`, entry = `start u32 | len u32 | chunk_off u32 | chunk id
/// [32] | pack id [16] | offset u32 | stored_len u32 | plain_len u32`, all
/// little-endian, sorted by `start`, non-overlapping.
///
/// # Errors
/// More entries than a u32 counts.
pub fn encode_index(block: u64, entries: &[Entry]) -> Result<Vec<u8>, Overflow> {
    let count = u32_field("index entry count", entries.len() as u64)?;
    let mut out = Vec::with_capacity(13 + entries.len() * ENTRY_LEN);
    out.push(1);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.start.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.chunk_off.to_le_bytes());
        out.extend_from_slice(&e.chunk.id);
        out.extend_from_slice(&e.chunk.pack);
        out.extend_from_slice(&e.chunk.offset.to_le_bytes());
        out.extend_from_slice(&e.chunk.stored_len.to_le_bytes());
        out.extend_from_slice(&e.chunk.plain_len.to_le_bytes());
    }
    Ok(out)
}

/// Decodes an index block, checking it is block `block` of a repository
/// with `span` and `chunk_size`.
///
/// # Errors
/// Anything out of shape.
pub fn decode_index(
    bytes: &[u8],
    block: u64,
    span: u64,
    chunk_size: u64,
) -> Result<Vec<Entry>, Malformed> {
    let mut r = Reader { b: bytes };
    if r.u8()? != 1 {
        return Err(bad("unknown index block version"));
    }
    let got = r.u64()?;
    if got != block {
        return Err(bad(format!(
            "index block is for block {got}, expected {block}"
        )));
    }
    let count = r.u32()? as usize;
    if r.b.len()
        != count
            .checked_mul(ENTRY_LEN)
            .ok_or_else(|| bad("entry count overflows"))?
    {
        return Err(bad(format!(
            "index block claims {count} entries but holds {} bytes of entries",
            r.b.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    let mut prev_end = 0u64;
    for _ in 0..count {
        let e = Entry {
            start: r.u32()?,
            len: r.u32()?,
            chunk_off: r.u32()?,
            chunk: ChunkLoc {
                id: r.arr()?,
                pack: r.arr()?,
                offset: r.u32()?,
                stored_len: r.u32()?,
                plain_len: r.u32()?,
            },
        };
        let plain = u64::from(e.chunk.plain_len);
        if e.len == 0
            || u64::from(e.start) < prev_end
            || e.end() > span
            || plain == 0
            || plain > chunk_size
            || u64::from(e.chunk_off) + u64::from(e.len) > plain
            || u64::from(e.chunk.stored_len) > plain + 64 + plain / 8
        {
            return Err(bad(format!(
                "index entry at {} (length {}) is out of range",
                e.start, e.len
            )));
        }
        prev_end = e.end();
        out.push(e);
    }
    Ok(out)
}

/// Pack trailer plaintext: `version u8 = 1 | count u32 | count × (chunk id
/// [32] | offset u32 | stored_len u32 | plain_len u32)`.
///
/// # Errors
/// More chunks than a u32 counts.
pub fn encode_trailer(chunks: &[ChunkLoc]) -> Result<Vec<u8>, Overflow> {
    let count = u32_field("pack chunk count", chunks.len() as u64)?;
    let mut out = Vec::with_capacity(5 + chunks.len() * TRAILER_REC_LEN);
    out.push(1);
    out.extend_from_slice(&count.to_le_bytes());
    for c in chunks {
        out.extend_from_slice(&c.id);
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.stored_len.to_le_bytes());
        out.extend_from_slice(&c.plain_len.to_le_bytes());
    }
    Ok(out)
}

/// Decodes a pack trailer of pack `pack` whose records end at `records_end`.
///
/// # Errors
/// Anything out of shape.
pub fn decode_trailer(
    bytes: &[u8],
    pack: [u8; 16],
    records_end: u64,
) -> Result<Vec<ChunkLoc>, Malformed> {
    let mut r = Reader { b: bytes };
    if r.u8()? != 1 {
        return Err(bad("unknown pack trailer version"));
    }
    let count = r.u32()? as usize;
    if r.b.len()
        != count
            .checked_mul(TRAILER_REC_LEN)
            .ok_or_else(|| bad("count overflows"))?
    {
        return Err(bad(format!(
            "pack trailer claims {count} chunks but holds {} bytes",
            r.b.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let c = ChunkLoc {
            id: r.arr()?,
            pack,
            offset: r.u32()?,
            stored_len: r.u32()?,
            plain_len: r.u32()?,
        };
        if u64::from(c.offset) + u64::from(c.stored_len) > records_end {
            return Err(bad("pack trailer points past the records"));
        }
        out.push(c);
    }
    Ok(out)
}

/// Splits a pack into its records and sealed trailer:
/// `records | sealed trailer | trailer length u32 | PACK_MAGIC`.
///
/// # Errors
/// A bad footer.
pub fn split_pack(pack: &[u8]) -> Result<(&[u8], &[u8]), Malformed> {
    if pack.len() < 12 || &pack[pack.len() - 8..] != PACK_MAGIC {
        return Err(bad("not a pack (bad footer)"));
    }
    let mut l = [0u8; 4];
    l.copy_from_slice(&pack[pack.len() - 12..pack.len() - 8]);
    let tl = u32::from_le_bytes(l) as usize;
    let body = &pack[..pack.len() - 12];
    if tl > body.len() {
        return Err(bad("pack trailer length exceeds the pack"));
    }
    Ok(body.split_at(body.len() - tl))
}

/// A snapshot's manifest (sealed JSON after [`MANIFEST_MAGIC`] and a
/// version byte): the commit point of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Volume the snapshot was taken of.
    pub volume: String,
    /// Snapshot name (`20261121T101500.123Z-3f4f0a67`).
    pub name: String,
    /// Freeze time, RFC 3339.
    pub created: String,
    /// Volume size.
    pub size: u64,
    /// Extent size.
    pub extent_size: u64,
    /// The whole volume was read.
    pub full: bool,
    /// Incrementals since the last full read (0 for a full one).
    pub chain: u32,
    /// Parent snapshot id (`VOLUME/SNAPSHOT`) an incremental was built on.
    pub parent: Option<String>,
    /// Group id.
    pub group: Option<String>,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Bytes read from the frozen image.
    pub bytes_read: u64,
    /// Plain bytes of chunks stored by this backup.
    pub bytes_new: u64,
    /// Plain bytes referenced from chunks stored before.
    pub bytes_reused: u64,
    /// Bytes uploaded (packs and index blocks).
    pub bytes_uploaded: u64,
    /// Microseconds I/O was held at the freeze.
    pub pause_us: u64,
    /// Pre-exec outcome.
    pub pre_exec: Option<blockd_api::Hook>,
    /// Post-exec outcome.
    pub post_exec: Option<blockd_api::Hook>,
    /// Non-empty index blocks: `[block number, id hex]`, ascending. In
    /// the JSON of a version 1 manifest only; a version 2 manifest names
    /// [`Manifest::map`] instead, and reading it fills this in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<(u64, String)>,
    /// Version 2: the index maps holding the block list, `[slot, id hex]`
    /// ascending, slot `s` covering blocks `s × MAP_BLOCKS ..`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map: Vec<(u64, String)>,
    /// The host that wrote it (`<state dir>/host-id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The schedule that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// When it is to be deleted (RFC 3339), if it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// When its backup registered in the bucket (milliseconds since the
    /// epoch, the store's clock; garbage collection's rule 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
}

/// A group object: the members frozen at one point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Group id.
    pub group: String,
    /// Freeze time.
    pub created: String,
    /// Member snapshot ids.
    pub members: Vec<String>,
}

/// Wraps a sealed payload with a magic and version 1.
pub fn envelope(magic: &[u8; 8], sealed: &[u8]) -> Vec<u8> {
    envelope_v(magic, 1, sealed)
}

/// Wraps a sealed payload with a magic and `version`.
pub fn envelope_v(magic: &[u8; 8], version: u8, sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + sealed.len());
    out.extend_from_slice(magic);
    out.push(version);
    out.extend_from_slice(sealed);
    out
}

/// Strips the envelope.
///
/// # Errors
/// Wrong magic or version.
pub fn open_envelope<'a>(magic: &[u8; 8], bytes: &'a [u8]) -> Result<&'a [u8], Malformed> {
    open_envelope_v(magic, 1, bytes).map(|(_, b)| b)
}

/// Strips the envelope of an object read in versions `1..=newest`;
/// returns the version.
///
/// # Errors
/// Wrong magic, version 0 or newer than `newest`.
pub fn open_envelope_v<'a>(
    magic: &[u8; 8],
    newest: u8,
    bytes: &'a [u8],
) -> Result<(u8, &'a [u8]), Malformed> {
    if bytes.len() < 9 || &bytes[..8] != magic {
        return Err(bad("wrong object type (bad magic)"));
    }
    match bytes[8] {
        0 => return Err(bad("unknown object format version 0")),
        v if v > newest => {
            return Err(bad(format!(
                "object format version {v} is newer than this blockd"
            )))
        }
        _ => {}
    }
    Ok((bytes[8], &bytes[9..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_maps_round_trip_and_refuse_what_is_out_of_shape() {
        let list = vec![(4096, [1u8; 32]), (4097, [2; 32]), (8191, [3; 32])];
        let plain = encode_map(1, &list).unwrap();
        assert_eq!(plain.len(), 13 + 3 * MAP_REC_LEN);
        assert_eq!(decode_map(&plain, 1).unwrap(), list);
        // Read as another slot, truncated, padded, or an index block.
        assert!(decode_map(&plain, 2).unwrap_err().0.contains("slot 1"));
        assert!(decode_map(&plain[..plain.len() - 1], 1).is_err());
        let mut long = plain.clone();
        long.push(0);
        assert!(decode_map(&long, 1).is_err());
        assert!(decode_map(&encode_index(1, &[]).unwrap(), 1).is_err());
        // Writers refuse lists that readers would.
        assert!(encode_map(1, &[]).is_err());
        assert!(encode_map(0, &list).is_err());
        assert!(encode_map(1, &[(4097, [0; 32]), (4096, [0; 32])]).is_err());
        assert!(encode_map(1, &[(4100, [0; 32]), (4100, [0; 32])]).is_err());
        // An unsorted list with a valid shape is refused on read.
        let mut swapped = plain.clone();
        swapped[13..21].copy_from_slice(&5000u64.to_le_bytes());
        assert!(decode_map(&swapped, 1).is_err());
        assert!(decode_map(&[], 1).is_err());
    }

    fn entry(start: u32, len: u32) -> Entry {
        Entry {
            start,
            len,
            chunk_off: 0,
            chunk: ChunkLoc {
                id: [start.to_le_bytes()[0]; 32],
                pack: [1; 16],
                offset: 0,
                stored_len: len + 1,
                plain_len: len,
            },
        }
    }

    #[test]
    fn index_roundtrip_and_checks() {
        let es = vec![entry(0, 4096), entry(8192, 65536)];
        let b = encode_index(3, &es).unwrap();
        assert_eq!(decode_index(&b, 3, 1 << 26, 65536).unwrap(), es);
        assert!(decode_index(&b, 4, 1 << 26, 65536).is_err());
        assert!(decode_index(&b[..b.len() - 1], 3, 1 << 26, 65536).is_err());
        // Overlapping entries.
        let b2 = encode_index(0, &[entry(0, 8192), entry(4096, 4096)]).unwrap();
        assert!(decode_index(&b2, 0, 1 << 26, 65536).is_err());
    }

    #[test]
    fn absurd_counts_are_rejected_without_allocating() {
        let mut b = vec![1u8];
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_index(&b, 0, 1 << 26, 65536).is_err());
        let mut t = vec![1u8];
        t.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_trailer(&t, [0; 16], 100).is_err());
        // A pack footer whose trailer length exceeds the pack.
        let mut p = vec![0u8; 4];
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        p.extend_from_slice(PACK_MAGIC);
        assert!(split_pack(&p).is_err());
    }

    #[test]
    fn trailer_roundtrip() {
        let cs = vec![entry(0, 100).chunk, entry(1, 200).chunk];
        let mut cs2 = cs.clone();
        cs2[1].offset = 101;
        let t = encode_trailer(&cs2).unwrap();
        assert_eq!(decode_trailer(&t, [1; 16], 1000).unwrap(), cs2);
        assert!(decode_trailer(&t, [1; 16], 200).is_err());
    }
}
