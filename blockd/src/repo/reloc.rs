//! Relocations: where the records of a repacked pack live now.
//!
//! Index entries name a record by its pack and offset, so a restore is one
//! ranged GET per run of records with no lookup in between. Repacking
//! (garbage collection copying the live records of a mostly-dead pack, or
//! of several small ones, into a new pack) therefore cannot change the
//! entries: index blocks are content-addressed and shared, and manifests
//! belong to the host that wrote them. Instead it writes, per pack that
//! index entries name, a relocation object mapping that pack's offsets to
//! the records' new places (FORMAT.md, "Relocations"):
//!
//! - written after the new pack and never rewritten;
//! - keyed by the pack the entries name, so a reader that finds a pack gone
//!   lists `relocs/<aa>/<pack>/` and reads on from there;
//! - always from the pack the entries name (never from a repacked pack):
//!   repacking a pack that holds relocated records writes new relocations
//!   from the original packs with a higher generation, so there are no
//!   chains to follow;
//! - per offset, the relocation with the highest generation (then the
//!   highest target id) wins, for readers and garbage collection alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::fetch::{plan, Fetch, MAX_GET};
use super::format::{bad, ChunkLoc, Malformed};
use super::{format, pack_hex, pack_key, PackId, Repo, RepoError};
use crate::magic::RELOC_MAGIC;

/// Bytes per encoded move.
const MOVE_LEN: usize = 12;
/// Source packs whose relocations a reader keeps.
const CACHED: usize = 4096;

/// One record moved: from `from` in the source pack to `to` in the target
/// pack, `len` bytes, unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Offset in the source pack.
    pub from: u32,
    /// Offset in the target pack.
    pub to: u32,
    /// Length of the sealed record.
    pub len: u32,
}

/// A relocation object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloc {
    /// The pack index entries name.
    pub from: PackId,
    /// The pack its records are in now.
    pub to: PackId,
    /// Higher generations win over lower ones for the same offset.
    pub gen: u32,
    /// Ascending by `from`.
    pub moves: Vec<Move>,
}

/// Object key of the relocation of `from`'s records into `to`.
pub(crate) fn reloc_key(from: &PackId, to: &PackId) -> String {
    let f = pack_hex(from);
    format!("relocs/{}/{f}/{}", &f[..2], pack_hex(to))
}

fn parse_id(h: &str) -> Option<PackId> {
    let mut id = [0u8; 16];
    (h.len() == 32)
        .then(|| hex::decode_to_slice(h, &mut id).ok())
        .flatten()
        .map(|()| id)
}

/// `(from, to)` of a relocation key blockd writes.
pub(crate) fn parse_reloc_key(key: &str) -> Option<(PackId, PackId)> {
    let mut parts = key.strip_prefix("relocs/")?.split('/');
    let (aa, f, t) = (parts.next()?, parts.next()?, parts.next()?);
    let (from, to) = (parse_id(f)?, parse_id(t)?);
    (parts.next().is_none() && f.starts_with(aa) && aa.len() == 2 && key == reloc_key(&from, &to))
        .then_some((from, to))
}

/// Plain bytes: `version u8 = 1 | from [16] | to [16] | gen u32 | count u32
/// | count × (from u32 | to u32 | len u32)`.
fn encode(r: &Reloc) -> Result<Vec<u8>, format::Overflow> {
    let count = format::u32_field("records in one relocation", r.moves.len() as u64)?;
    let mut out = Vec::with_capacity(41 + r.moves.len() * MOVE_LEN);
    out.push(1);
    out.extend_from_slice(&r.from);
    out.extend_from_slice(&r.to);
    out.extend_from_slice(&r.gen.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    for m in &r.moves {
        out.extend_from_slice(&m.from.to_le_bytes());
        out.extend_from_slice(&m.to.to_le_bytes());
        out.extend_from_slice(&m.len.to_le_bytes());
    }
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Decodes and checks a relocation's plain bytes against its key.
pub fn decode(plain: &[u8], from: &PackId, to: &PackId) -> Result<Reloc, Malformed> {
    if plain.len() < 41 || plain[0] != 1 {
        return Err(bad("not a version 1 relocation"));
    }
    if plain[1..17] != from[..] || plain[17..33] != to[..] {
        return Err(bad("names other packs than its key"));
    }
    let gen = u32_at(plain, 33);
    let count = u32_at(plain, 37) as usize;
    if plain.len() != 41 + count.saturating_mul(MOVE_LEN) {
        return Err(bad("length does not match its record count"));
    }
    let mut moves = Vec::with_capacity(count);
    for i in 0..count {
        let at = 41 + i * MOVE_LEN;
        let m = Move {
            from: u32_at(plain, at),
            to: u32_at(plain, at + 4),
            len: u32_at(plain, at + 8),
        };
        if moves.last().is_some_and(|p: &Move| p.from >= m.from) {
            return Err(bad("moves out of order"));
        }
        moves.push(m);
    }
    Ok(Reloc {
        from: *from,
        to: *to,
        gen,
        moves,
    })
}

/// Where one record of a source pack is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Offset in the source pack.
    pub from: u32,
    /// The pack holding it.
    pub pack: PackId,
    /// Its offset there.
    pub to: u32,
    /// Length of the sealed record.
    pub len: u32,
    /// Which relocation says so (position in [`Winners::keys`]).
    pub reloc: u32,
}

/// The winning target of every relocated offset of one source pack.
#[derive(Debug, Clone, Default)]
pub struct Winners {
    /// Ascending by `from`.
    targets: Vec<Target>,
    /// Keys of the relocations read.
    pub keys: Vec<String>,
    /// Highest generation among them (0 when none).
    pub gen: u32,
}

impl Winners {
    /// Picks, per offset, the move of the highest generation (then of the
    /// highest target id): the rule readers and collectors share.
    pub fn of(relocs: &[(String, Reloc)]) -> Self {
        let mut best: HashMap<u32, (u32, PackId, Target)> = HashMap::new();
        let mut gen = 0;
        for (i, (_, r)) in relocs.iter().enumerate() {
            gen = gen.max(r.gen);
            for m in &r.moves {
                let t = Target {
                    from: m.from,
                    pack: r.to,
                    to: m.to,
                    len: m.len,
                    reloc: u32::try_from(i).unwrap_or(u32::MAX),
                };
                let e = best.entry(m.from).or_insert((r.gen, r.to, t));
                if (r.gen, r.to) > (e.0, e.1) {
                    *e = (r.gen, r.to, t);
                }
            }
        }
        let mut targets: Vec<Target> = best.into_values().map(|(_, _, t)| t).collect();
        targets.sort_by_key(|t| t.from);
        Self {
            targets,
            keys: relocs.iter().map(|(k, _)| k.clone()).collect(),
            gen,
        }
    }

    /// Where the record at `offset` is now, if it was moved.
    pub fn get(&self, offset: u32) -> Option<&Target> {
        self.targets
            .binary_search_by_key(&offset, |t| t.from)
            .ok()
            .map(|i| &self.targets[i])
    }

    /// Every winning target.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Nothing was relocated.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The key of the relocation `t` came from.
    pub fn key(&self, t: &Target) -> &str {
        &self.keys[t.reloc as usize]
    }
}

/// What readers learnt of packs that are gone: their winning targets.
#[derive(Debug, Default)]
pub struct Cache {
    gone: Mutex<HashMap<PackId, Arc<Winners>>>,
}

impl Cache {
    fn cached(&self, pack: &PackId) -> Option<Arc<Winners>> {
        self.gone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(pack)
            .cloned()
    }

    /// Whether `pack` is known to be gone (reads go straight to its
    /// relocations).
    pub fn is_gone(&self, pack: &PackId) -> bool {
        self.cached(pack).is_some()
    }

    /// Where the record at `offset` of `pack` was read from, when `pack`
    /// is known to be gone: for errors, which must name the object that
    /// holds the record.
    pub fn now_at(&self, pack: &PackId, offset: u32) -> Option<Target> {
        self.cached(pack)?.get(offset).copied()
    }

    async fn winners(
        &self,
        repo: &Repo,
        pack: &PackId,
        refresh: bool,
    ) -> Result<Arc<Winners>, RepoError> {
        if !refresh {
            if let Some(w) = self.cached(pack) {
                return Ok(w);
            }
        }
        let w = Arc::new(Winners::of(&repo.relocs_of(pack).await?));
        if w.is_empty() {
            // Missing, not moved: not remembered, so a pack put back (or
            // a provider's passing 404) reads again at once.
            return Ok(w);
        }
        let mut gone = self
            .gone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if gone.len() >= CACHED {
            gone.clear();
        }
        gone.insert(*pack, w.clone());
        Ok(w)
    }
}

impl Repo {
    /// Writes a relocation (after its target pack is stored).
    ///
    /// # Errors
    /// Provider errors; a relocation too large for its format.
    pub async fn put_reloc(&self, r: &Reloc) -> Result<u64, RepoError> {
        let key = reloc_key(&r.from, &r.to);
        let plain = encode(r)?;
        let sealed = format::envelope(RELOC_MAGIC, &self.keys.seal(key.as_bytes(), &plain));
        self.objects.put(&key, sealed.into(), false).await
    }

    async fn get_reloc(&self, key: &str, from: &PackId, to: &PackId) -> Result<Reloc, RepoError> {
        let bytes = self.objects.get_meta(key).await?;
        let sealed = format::open_envelope(RELOC_MAGIC, &bytes)
            .map_err(|Malformed(m)| self.objects.corrupt(key, m))?;
        let plain = self.keys.open(key.as_bytes(), sealed).map_err(|_| {
            self.objects
                .corrupt(key, "integrity check failed (wrong key, or altered)")
        })?;
        decode(&plain, from, to).map_err(|Malformed(m)| self.objects.corrupt(key, m))
    }

    /// Every relocation of pack `from`, with its key.
    ///
    /// # Errors
    /// Provider errors; a damaged relocation, named.
    pub async fn relocs_of(&self, from: &PackId) -> Result<Vec<(String, Reloc)>, RepoError> {
        let f = pack_hex(from);
        let mut out = Vec::new();
        for key in self
            .objects
            .list(&format!("relocs/{}/{f}", &f[..2]))
            .await?
        {
            let Some((kf, to)) = parse_reloc_key(&key) else {
                continue;
            };
            if &kf != from {
                continue;
            }
            match self.get_reloc(&key, from, &to).await {
                Ok(r) => out.push((key, r)),
                // Deleted since the listing: superseded and collected.
                Err(RepoError::Missing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Every relocation object: `(from, listing)`; keys under `relocs/`
    /// that blockd never writes are returned apart.
    ///
    /// # Errors
    /// Provider errors.
    pub async fn list_relocs(
        &self,
    ) -> Result<(Vec<(PackId, super::Listed)>, Vec<String>), RepoError> {
        let mut out = Vec::new();
        let mut foreign = Vec::new();
        for l in self.objects.list_meta("relocs").await? {
            match parse_reloc_key(&l.key) {
                Some((from, _)) => out.push((from, l)),
                None => foreign.push(l.key),
            }
        }
        Ok((out, foreign))
    }
}

/// Reads the records of `f` from where they were relocated, its pack
/// being gone: the bytes come back laid out as the pack had them (gaps
/// between records zeroed), so callers slice records as usual. Targets
/// found gone too are looked up once more (a newer relocation may have
/// superseded what was cached).
///
/// # Errors
/// The pack is gone and no relocation holds a record (`Missing`, naming
/// the pack); provider errors; a relocation that disagrees with the entry.
pub(crate) async fn read_moved(repo: &Repo, f: &Fetch) -> Result<Bytes, RepoError> {
    let missing = |why: String| {
        if why.is_empty() {
            RepoError::Missing {
                location: repo.location().to_string(),
                object: pack_key(&f.pack),
            }
        } else {
            repo.corrupt_pack(&f.pack, why)
        }
    };
    let mut refresh = false;
    loop {
        let w = repo.relocs.winners(repo, &f.pack, refresh).await?;
        if w.is_empty() {
            return Err(missing(String::new()));
        }
        // Where each record is now, and where it goes in the answer.
        let mut subs = Vec::with_capacity(f.chunks.len());
        let mut back: HashMap<(PackId, u32), u64> = HashMap::with_capacity(f.chunks.len());
        for c in &f.chunks {
            let Some(t) = w.get(c.offset) else {
                return Err(missing(format!(
                    "the pack is gone and no relocation holds its record at offset {}",
                    c.offset
                )));
            };
            if t.len != c.stored_len {
                return Err(missing(format!(
                    "relocation {} gives the record at offset {} a length of {}, the index {}",
                    w.key(t),
                    c.offset,
                    t.len,
                    c.stored_len
                )));
            }
            subs.push(ChunkLoc {
                pack: t.pack,
                offset: t.to,
                ..*c
            });
            back.insert((t.pack, t.to), u64::from(c.offset) - f.start);
        }
        let len = usize::try_from(f.end - f.start).unwrap_or(usize::MAX);
        let mut out = vec![0u8; len];
        let mut stale = false;
        for sub in plan(subs, MAX_GET) {
            let bytes = match sub.get_here(repo).await {
                Ok(b) => b,
                Err(RepoError::Missing { .. }) if !refresh => {
                    stale = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            for c in &sub.chunks {
                let rec = sub.record(repo, c, &bytes)?;
                let at = usize::try_from(back[&(c.pack, c.offset)]).unwrap_or(usize::MAX);
                out.get_mut(at..at + rec.len())
                    .ok_or_else(|| missing(format!("record at offset {at} past the range read")))?
                    .copy_from_slice(rec);
            }
        }
        if !stale {
            return Ok(out.into());
        }
        refresh = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(from: u8, to: u8, gen: u32, moves: &[(u32, u32, u32)]) -> (String, Reloc) {
        let r = Reloc {
            from: [from; 16],
            to: [to; 16],
            gen,
            moves: moves
                .iter()
                .map(|&(from, to, len)| Move { from, to, len })
                .collect(),
        };
        (reloc_key(&r.from, &r.to), r)
    }

    #[test]
    fn relocations_round_trip_and_check_their_key() {
        let (key, x) = r(1, 2, 3, &[(0, 10, 5), (5, 15, 7)]);
        assert_eq!(parse_reloc_key(&key), Some(([1; 16], [2; 16])));
        assert_eq!(parse_reloc_key("relocs/01/zz/00"), None);
        let plain = encode(&x).unwrap();
        assert_eq!(decode(&plain, &[1; 16], &[2; 16]).unwrap(), x);
        assert!(decode(&plain, &[1; 16], &[3; 16]).is_err());
        assert!(decode(&plain[..plain.len() - 1], &[1; 16], &[2; 16]).is_err());
        let (_, unordered) = r(1, 2, 3, &[(5, 0, 1), (0, 1, 1)]);
        assert!(decode(&encode(&unordered).unwrap(), &[1; 16], &[2; 16]).is_err());
    }

    #[test]
    fn the_highest_generation_wins_then_the_highest_target() {
        let w = Winners::of(&[
            r(1, 9, 1, &[(0, 0, 4), (4, 4, 4)]),
            r(1, 5, 2, &[(4, 100, 4)]),
            r(1, 7, 2, &[(4, 200, 4)]),
        ]);
        assert_eq!(w.gen, 2);
        assert_eq!(w.get(0).map(|t| (t.pack, t.to)), Some(([9; 16], 0)));
        assert_eq!(w.get(4).map(|t| (t.pack, t.to)), Some(([7; 16], 200)));
        assert!(w.get(8).is_none());
        assert_eq!(w.key(w.get(4).unwrap()), reloc_key(&[1; 16], &[7; 16]));
    }
}
