//! Fuzzes loading a held snapshot from its files (what a crash, a full
//! disk or a hand edit leaves in the state directory): `meta.json`,
//! `changes.dirty`, `cow.index` and `cow.unsynced`.
//!
//! Input layout: four u16 LE lengths, then the four files in that order
//! (cow.data stays empty; missing bytes make shorter files).
#![no_main]

use blockd::snapshot::store::SnapshotStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let lens: Vec<usize> = data[..8]
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    let mut rest = &data[8..];
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in ["meta.json", "changes.dirty", "cow.index", "cow.unsynced"]
        .iter()
        .zip(lens)
    {
        let n = len.min(rest.len());
        std::fs::write(dir.path().join(name), &rest[..n]).unwrap();
        rest = &rest[n..];
    }
    std::fs::write(dir.path().join("cow.data"), b"").unwrap();
    if let Ok(Some(s)) = SnapshotStore::load(dir.path()) {
        // Whatever loaded reads back within its own bounds or fails.
        let mut buf = vec![0u8; 512];
        for e in 0..4 {
            let _ = s.read_preserved(e, 0, &mut buf);
        }
        let _ = s.cow_bytes();
    }
}
