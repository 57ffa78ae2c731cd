//! Writes a large repository through blockd's own repository module, for
//! the lifecycle benchmark (`benches/lifecycle.sh`): VOLUMES volumes with
//! SNAPS snapshots each, every snapshot an incremental that adds CHUNKS
//! new chunks of CHUNK_BYTES random bytes in one pack of its own (as small
//! scattered writes leave them), its index block a complete map of the
//! volume as real backups write it, and a manifest. The objects are real
//! format objects: `repo check --read-data` opens every one.
//!
//! Usage: repo_gen DIR [VOLUMES SNAPS CHUNKS CHUNK_BYTES]
//! (default 1000 10 100 512: 10,000 snapshots, 1,000,000 chunks, 488 MiB)
//! DIR becomes an unencrypted repository (a location's directory, e.g. a
//! state dir's `objects`).

use std::sync::Arc;

use blockd::repo::format::{Entry, Manifest};
use blockd::repo::{name, PackBuilder, Repo};
use futures::StreamExt;
use object_store::local::LocalFileSystem;

fn arg(args: &[String], i: usize, default: u64) -> u64 {
    args.get(i).map_or(default, |a| {
        a.parse()
            .unwrap_or_else(|_| panic!("argument {i} ({a:?}) is not a number"))
    })
}

/// xorshift64: fast, seeded, and different for every (volume, snapshot).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

async fn volume(repo: Arc<Repo>, v: u64, snaps: u64, chunks: u64, bytes: usize) {
    let volume = format!("vol{v:05}");
    let mut entries: Vec<Entry> = Vec::new();
    let mut plain = vec![0u8; bytes];
    for s in 0..snaps {
        let mut pack = PackBuilder::new(0).expect("pack buffer");
        for c in 0..chunks {
            fill(&mut plain, (v << 40) ^ (s << 20) ^ c);
            let id = repo.keys.chunk_id(&plain);
            let sealed = repo.seal_chunk(&id, &plain);
            let loc = pack
                .push(id, &sealed, u32::try_from(bytes).expect("chunk size"))
                .expect("pack");
            // Chunk slot k of the volume sits at k × 64 KiB, inside block 0.
            let slot = s * chunks + c;
            entries.push(Entry {
                start: u32::try_from(slot * 65536).expect("within one index block"),
                len: loc.plain_len,
                chunk_off: 0,
                chunk: loc,
            });
        }
        let id = pack.id;
        let (body, _) = pack.finish(&repo.keys).expect("pack trailer");
        repo.put_pack(&id, body).await.expect("put pack");
        let (ix, sealed) = repo.seal_index(0, &entries).expect("index block");
        repo.put_index(&ix, sealed).await.expect("put index");
        let m = Manifest {
            volume: volume.clone(),
            name: name::new(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            size: 64 << 20,
            extent_size: 4096,
            full: s == 0,
            chain: u32::try_from(s).unwrap_or(u32::MAX),
            parent: None,
            group: None,
            labels: Default::default(),
            bytes_read: chunks * bytes as u64,
            bytes_new: chunks * bytes as u64,
            bytes_reused: 0,
            bytes_uploaded: 0,
            pause_us: 0,
            pre_exec: None,
            post_exec: None,
            blocks: vec![(0, ix)],
            map: Vec::new(),
            host: Some("repo-gen".into()),
            schedule: None,
            expires: None,
            started_ms: None,
        };
        repo.put_manifest(&m, None).await.expect("put manifest");
        // Names carry the time in milliseconds: keep them distinct.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .expect("usage: repo_gen DIR [VOLUMES SNAPS CHUNKS CHUNK_BYTES]");
    let (vols, snaps, chunks, bytes) = (
        arg(&args, 2, 1000),
        arg(&args, 3, 10),
        arg(&args, 4, 100),
        arg(&args, 5, 512),
    );
    assert!(
        snaps * chunks <= 1024,
        "at most 1024 chunk slots per volume (one index block)"
    );
    std::fs::create_dir_all(dir).expect("create DIR");
    let store = Arc::new(LocalFileSystem::new_with_prefix(dir).expect("store"));
    let repo = Arc::new(
        Repo::open(store, "", "local", None, None, true)
            .await
            .expect("open repository"),
    );
    let started = std::time::Instant::now();
    futures::stream::iter(0..vols)
        .map(|v| {
            let repo = repo.clone();
            tokio::spawn(volume(
                repo,
                v,
                snaps,
                chunks,
                usize::try_from(bytes).expect("bytes"),
            ))
        })
        .buffer_unordered(8)
        .for_each(|r| async { r.expect("volume task") })
        .await;
    println!(
        "wrote {} snapshots, {} chunks in {:.1} s",
        vols * snaps,
        vols * snaps * chunks,
        started.elapsed().as_secs_f64()
    );
}
