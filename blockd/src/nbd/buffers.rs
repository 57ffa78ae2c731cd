//! Reusable I/O buffers for one connection.
//!
//! Large READ replies and WRITE payloads would otherwise be fresh
//! allocations: glibc serves them with new anonymous pages, and the page
//! faults plus zeroing cost about a fifth of the CPU of a 1 MiB sequential
//! read (measured with perf). Buffers come back here once their reply has
//! been written or their payload stored, and are handed out again without
//! being cleared: every taker overwrites the whole length it asked for.

use std::sync::Mutex;

/// Buffers smaller than this are cheap to allocate and are not pooled.
const MIN_POOLED: usize = 64 << 10;
/// Most buffers kept.
const MAX_BUFFERS: usize = 16;
/// Most bytes kept.
const MAX_POOLED_BYTES: usize = 64 << 20;

/// A small free list of large buffers.
#[derive(Debug, Default)]
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// Buffers a connection starts with, and their size: page-cache
/// writeback through `/dev/nbdX` sends requests of up to 128 KiB in the
/// common case, which then take from these and allocate nothing (larger
/// ones, up to `/sys/block/nbdX/queue/max_sectors_kb`, are allocated once
/// and pooled).
const PREFILLED: usize = 8;
const PREFILLED_LEN: usize = 128 << 10;

impl BufPool {
    /// A pool holding [`PREFILLED`] buffers already written to, so their
    /// pages exist (and, under `mlockall`, are locked) before the first
    /// request: a write the kernel sends to free memory must not need new
    /// memory to be stored.
    pub fn prefilled() -> Self {
        let free = (0..PREFILLED)
            .map(|_| {
                let mut b = vec![0u8; PREFILLED_LEN];
                // Touch every page: calloc'd pages are only mapped.
                for page in b.chunks_mut(4096) {
                    page[0] = 1;
                }
                std::hint::black_box(&mut b);
                b
            })
            .collect();
        Self {
            free: Mutex::new(free),
        }
    }

    /// A buffer of exactly `len` bytes with unspecified contents: the caller
    /// must overwrite all of it before sending any of it.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut free = self
                .free
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(i) = free.iter().rposition(|b| b.capacity() >= len) {
                let mut b = free.swap_remove(i);
                drop(free);
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    b.resize(len, 0);
                }
                return b;
            }
        }
        vec![0u8; len]
    }

    /// Returns a buffer for reuse (dropped if the pool is full).
    pub fn give(&self, buf: Vec<u8>) {
        if buf.capacity() < MIN_POOLED {
            return;
        }
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held: usize = free.iter().map(Vec::capacity).sum();
        if free.len() < MAX_BUFFERS && held + buf.capacity() <= MAX_POOLED_BYTES {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_large_buffers_only() {
        let pool = BufPool::default();
        let mut a = pool.take(1 << 20);
        a[0] = 7;
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(512 << 10);
        assert_eq!(b.as_ptr(), ptr, "large buffer not reused");
        assert_eq!(b.len(), 512 << 10);
        pool.give(vec![0; 100]);
        assert!(pool.free.lock().unwrap().is_empty());
    }
}
