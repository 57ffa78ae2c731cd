//! What index blocks say, as values: the overlay that makes a new block
//! from its parent's and the new entries of a backup. Pure: no I/O.
//! (Reading the entries of a volume range through the index-block cache
//! is [`super::fetch::IndexCache::overlapping`].)

use super::format::Entry;

/// The block's new map: the parent's entries with every replaced range cut
/// out, plus the new entries (holes are simply absent). One pass over both
/// sorted lists.
pub fn overlay(parent: &[Entry], ranges: &[(u64, u64)], new: Vec<Entry>) -> Vec<Entry> {
    let mut out = Vec::with_capacity(parent.len() + new.len());
    let mut r = 0;
    for e in parent {
        let (es, ee) = (u64::from(e.start), e.end());
        // Ranges wholly before this entry are done with.
        while r < ranges.len() && ranges[r].0 + ranges[r].1 <= es {
            r += 1;
        }
        let mut pos = es;
        let mut k = r;
        while k < ranges.len() && ranges[k].0 < ee {
            let (rs, re) = (ranges[k].0, ranges[k].0 + ranges[k].1);
            if rs > pos {
                out.push(cut(e, pos, rs));
            }
            pos = pos.max(re);
            k += 1;
        }
        if pos < ee {
            out.push(cut(e, pos, ee));
        }
    }
    out.extend(new);
    out.sort_by_key(|e| e.start);
    out
}

/// The part `[s, t)` of entry `e` (block-relative offsets). Offsets
/// inside a block are below the index span, which the config check keeps
/// at most `MAX_INDEX_SPAN` (1 GiB): the conversions cannot saturate.
fn cut(e: &Entry, s: u64, t: u64) -> Entry {
    Entry {
        start: u32::try_from(s).unwrap_or(u32::MAX),
        len: u32::try_from(t - s).unwrap_or(u32::MAX),
        chunk_off: e.chunk_off + u32::try_from(s - u64::from(e.start)).unwrap_or(0),
        chunk: e.chunk,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::format::ChunkLoc;

    fn e(start: u32, len: u32, id: u8) -> Entry {
        Entry {
            start,
            len,
            chunk_off: 0,
            chunk: ChunkLoc {
                id: [id; 32],
                pack: [0; 16],
                offset: 0,
                stored_len: len,
                plain_len: len,
            },
        }
    }

    #[test]
    fn overlay_cuts_parent_entries() {
        let parent = vec![e(0, 65536, 1)];
        let new = vec![e(4096, 4096, 2)];
        let got = overlay(&parent, &[(4096, 4096), (16384, 4096)], new);
        // [0,4K) of chunk 1, new [4K,8K), [8K,16K) of chunk 1, hole [16K,20K), rest of chunk 1.
        assert_eq!(got.len(), 4);
        assert_eq!((got[0].start, got[0].len, got[0].chunk_off), (0, 4096, 0));
        assert_eq!(got[1].chunk.id, [2; 32]);
        assert_eq!(
            (got[2].start, got[2].len, got[2].chunk_off),
            (8192, 8192, 8192)
        );
        assert_eq!(
            (got[3].start, got[3].len, got[3].chunk_off),
            (20480, 45056, 20480)
        );
    }
}
