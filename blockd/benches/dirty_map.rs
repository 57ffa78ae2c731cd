//! What change tracking adds to one write: `DirtyMap::mark` for a 4 KiB
//! write (one extent) and a 1 MiB write (256 extents), on a map that is
//! already large, against a bare mutex lock/unlock for scale.
//!
//! Run: `cargo bench -p blockd --bench dirty_map`. A 4k write through NBD
//! costs ~10-20 us here; see benches/snapshot.sh for the end-to-end rows.

use std::hint::black_box;

use blockd::volume::dirty_map::DirtyMap;
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let map = DirtyMap::new(4096);
    // A map with 1M scattered dirty extents, like a busy volume's.
    for i in 0..1_000_000u64 {
        map.mark((i * 7919 % (1 << 28)) * 4096, 1).unwrap();
    }
    let mut x = 0u64;
    c.bench_function("mark 4 KiB (1 extent)", |b| {
        b.iter(|| {
            x = (x + 1_048_583) % (1 << 40);
            map.mark(black_box(x & !4095), 4096).unwrap();
        })
    });
    c.bench_function("mark 1 MiB (256 extents)", |b| {
        b.iter(|| {
            x = (x + 1_048_583) % (1 << 40);
            map.mark(black_box(x & !4095), 1 << 20).unwrap();
        })
    });
    let m = std::sync::Mutex::new(0u64);
    c.bench_function("uncontended mutex, for scale", |b| {
        b.iter(|| {
            *m.lock().unwrap() += 1;
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
