//! Fuzzes every repository decoder: what a bucket (anyone who can write
//! to it) hands blockd.
//!
//! Input layout: byte 0 chooses the decoder, the rest is the object.
//! ```text
//! 0  index block (format::decode_index), then re-encoded and decoded again
//! 1  pack trailer (format::decode_trailer): every record inside the pack
//! 2  present map of a lazy restore (volume::lazy::decode)
//! 3  relocation plaintext (reloc::decode): moves sorted, inside their packs
//! 4  manifest plaintext, sealed by the harness and read by Repo::get_manifest
//! 5  group plaintext, sealed by the harness and read by Repo::get_group
//! 6  a raw manifest object (not sealed by the harness): never accepted
//! 7  a whole pack (Repo::pack_records): a trailer that is not sealed
//!    with the repository's keys is never accepted
//! 8  config JSON (format::Config), as the repository opens it
//! 9  index map (format::decode_map), then re-encoded and decoded again
//! 10 manifest plaintext in a version 2 envelope (its index maps are
//!    looked for and, when the input names them, missing)
//! 11 damage record plaintext, sealed by the harness and read by
//!    Repo::avoid: accepted only when it names its own object
//! ```
//! Besides "never panics" (overflow checks on), each accepted object
//! satisfies what its readers rely on.
#![no_main]

use std::sync::{Arc, OnceLock};

use blockd::repo::{format, reloc, Repo};
use libfuzzer_sys::fuzz_target;
use object_store::memory::InMemory;
use object_store::{ObjectStoreExt, PutPayload};

struct World {
    rt: tokio::runtime::Runtime,
    store: Arc<InMemory>,
    repo: Repo,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(InMemory::new());
        let repo = rt
            .block_on(Repo::open(store.clone(), "", "fuzz", None, None, true))
            .unwrap();
        World { rt, store, repo }
    })
}

fuzz_target!(|data: &[u8]| run(data));

const SPAN: u64 = 1 << 26;
const CHUNK: u64 = 1 << 16;

fn run(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let w = world();
    match sel % 12 {
        0 => {
            if let Ok(entries) = format::decode_index(body, 3, SPAN, CHUNK) {
                let again = format::encode_index(3, &entries).expect("re-encodes");
                let back = format::decode_index(&again, 3, SPAN, CHUNK).expect("decodes again");
                assert_eq!(back, entries);
            }
        }
        1 => {
            let end = 1 << 20;
            if let Ok(locs) = format::decode_trailer(body, [7; 16], end) {
                for l in &locs {
                    assert!(
                        u64::from(l.offset) + u64::from(l.stored_len) <= end,
                        "{l:?}"
                    );
                }
            }
        }
        2 => {
            let (unit, size) = (1 << 16, 1 << 30);
            if let Ok(map) = blockd::volume::lazy::decode(body, unit, size) {
                assert!(map.max().is_none_or(|m| u64::from(m) < size / unit));
            }
        }
        3 => {
            let (from, to) = ([1; 16], [2; 16]);
            if let Ok(r) = reloc::decode(body, &from, &to) {
                assert_eq!((r.from, r.to), (from, to));
                assert!(r.moves.windows(2).all(|m| m[0].from < m[1].from));
            }
        }
        4 => {
            let key = "snapshots/v/20260101T000000.000Z-00000000";
            put_sealed(w, key, blockd::magic::MANIFEST_MAGIC, body);
            if let Ok(m) =
                w.rt.block_on(w.repo.get_manifest("v", "20260101T000000.000Z-00000000"))
            {
                assert_eq!(
                    (m.volume.as_str(), m.name.as_str()),
                    ("v", "20260101T000000.000Z-00000000")
                );
                assert!(m.blocks.windows(2).all(|b| b[0].0 < b[1].0));
            }
        }
        5 => {
            put_sealed(w, "groups/g1", blockd::magic::GROUP_MAGIC, body);
            let _ = w.rt.block_on(w.repo.get_group("g1"));
        }
        6 => {
            put(w, "snapshots/v/20260101T000000.000Z-00000001", body);
            let r =
                w.rt.block_on(w.repo.get_manifest("v", "20260101T000000.000Z-00000001"));
            assert!(
                r.is_err(),
                "an object the harness did not seal was accepted"
            );
        }
        7 => {
            assert!(
                w.repo.pack_records(&[9; 16], body).is_err(),
                "unsealed trailer accepted"
            );
        }
        9 => {
            if let Ok(list) = format::decode_map(body, 2) {
                assert!(list.iter().all(|b| b.0 / format::MAP_BLOCKS == 2));
                let again = format::encode_map(2, &list).expect("re-encodes");
                assert_eq!(format::decode_map(&again, 2).expect("decodes again"), list);
            }
        }
        10 => {
            let key = "snapshots/v/20260101T000000.000Z-00000002";
            let sealed = w.repo.keys.seal(key.as_bytes(), body);
            put(
                w,
                key,
                &format::envelope_v(blockd::magic::MANIFEST_MAGIC, 2, &sealed),
            );
            if let Ok(m) =
                w.rt.block_on(w.repo.get_manifest("v", "20260101T000000.000Z-00000002"))
            {
                assert!(m.map.is_empty() && m.blocks.is_empty(), "{m:?}");
            }
        }
        11 => {
            let object = "packs/ab/ab000000000000000000000000000000";
            put_sealed(
                w,
                &format!("damaged/{object}"),
                blockd::magic::DAMAGE_MAGIC,
                body,
            );
            if let Ok(avoid) = w.rt.block_on(w.repo.avoid()) {
                let records =
                    w.rt.block_on(w.repo.damage_records())
                        .expect("lists")
                        .records;
                assert!(records.iter().all(|r| r.object == object), "{records:?}");
                let named: usize = records.iter().map(|r| r.index.len()).sum();
                assert!(avoid.index.len() <= named);
            }
        }
        _ => {
            // A config as stored: opened (and its sizes checked) by Repo::open.
            if serde_json::from_slice::<format::Config>(body).is_ok() {
                put(w, "fuzzcfg/config", body);
                let _ = w.rt.block_on(Repo::open(
                    w.store.clone(),
                    "fuzzcfg",
                    "fuzz",
                    None,
                    None,
                    false,
                ));
            }
        }
    }
}

fn put(w: &World, key: &str, bytes: &[u8]) {
    w.rt.block_on(w.store.put(
        &object_store::path::Path::from(key),
        PutPayload::from(bytes.to_vec()),
    ))
    .unwrap();
}

fn put_sealed(w: &World, key: &str, magic: &[u8; 8], plain: &[u8]) {
    let sealed = w.repo.keys.seal(key.as_bytes(), plain);
    put(w, key, &format::envelope(magic, &sealed));
}
