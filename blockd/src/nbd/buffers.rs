//! Reusable I/O buffers for one connection.
//!
//! Large READ replies and WRITE payloads would otherwise be fresh
//! allocations: glibc serves them with new anonymous pages, and the page
//! faults plus zeroing cost about a fifth of the CPU of a 1 MiB sequential
//! read (measured with perf). Buffers come back here once their reply has
//! been written or their payload stored, and are handed out again without
//! being cleared: every taker overwrites the whole length it asked for.
//!
//! What a pool keeps beyond the buffers it starts with also counts against
//! the daemon-wide pool share of [`super::Memory`]: connections used in
//! turn must not each keep their pool's worth.

use std::sync::{Arc, Mutex, PoisonError};

use super::Memory;

/// Buffers smaller than this are cheap to allocate and are not pooled.
const MIN_POOLED: usize = 64 << 10;
/// Most buffers kept.
const MAX_BUFFERS: usize = 16;
/// Most bytes kept.
const MAX_POOLED_BYTES: usize = 64 << 20;

/// A small free list of large buffers.
#[derive(Debug, Default)]
pub struct BufPool {
    free: Mutex<Free>,
    /// The daemon-wide share; none in tests of the pool alone.
    memory: Option<Arc<Memory>>,
}

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    /// Bytes of `bufs` counted in `memory`: what they hold beyond
    /// [`UNCOUNTED`].
    counted: usize,
}

/// Bytes a pool keeps without counting them daemon-wide: what it starts
/// with.
const UNCOUNTED: usize = PREFILLED * PREFILLED_LEN;

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
    /// memory to be stored. What it keeps beyond them counts against
    /// `memory`'s pool share; with `None` (kernel attachments, outside
    /// the daemon-wide bound) only against the pool's own limits.
    pub fn prefilled(memory: Option<Arc<Memory>>) -> Self {
        let bufs = (0..PREFILLED)
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
            free: Mutex::new(Free { bufs, counted: 0 }),
            memory,
        }
    }

    /// Brings `free.counted` to what `free.bufs` hold beyond
    /// [`UNCOUNTED`]; false (nothing changed) when the daemon-wide share
    /// has no room for the growth.
    fn recount(&self, free: &mut Free) -> bool {
        let held: usize = free.bufs.iter().map(Vec::capacity).sum();
        let counted = held.saturating_sub(UNCOUNTED);
        if let Some(memory) = &self.memory {
            if counted > free.counted {
                if !memory.pool(counted - free.counted) {
                    return false;
                }
            } else {
                memory.unpool(free.counted - counted);
            }
        }
        free.counted = counted;
        true
    }

    /// A buffer of exactly `len` bytes with unspecified contents: the caller
    /// must overwrite all of it before sending any of it.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            // The smallest that fits, and none more than twice as large:
            // a buffer counts against the daemon's memory by the request
            // it serves, so a large one must not serve a small request.
            let fits = free
                .bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len && b.capacity() / 2 <= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = fits {
                let mut b = free.bufs.swap_remove(i);
                // Shrinking always succeeds.
                self.recount(&mut free);
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
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let held: usize = free.bufs.iter().map(Vec::capacity).sum();
        if free.bufs.len() < MAX_BUFFERS && held + buf.capacity() <= MAX_POOLED_BYTES {
            free.bufs.push(buf);
            if !self.recount(&mut free) {
                free.bufs.pop();
            }
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        let free = self.free.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(memory) = &self.memory {
            memory.unpool(free.counted);
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
        assert!(pool.free.lock().unwrap().bufs.is_empty());
    }

    #[test]
    fn pools_share_the_daemon_wide_allowance() {
        // 64 MiB: a quarter, 16 MiB, may be pooled beyond what each
        // pool starts with.
        let memory = Arc::new(Memory::new(64 << 20));
        let a = BufPool::prefilled(Some(memory.clone()));
        let b = BufPool::prefilled(Some(memory.clone()));
        let taken: Vec<Vec<u8>> = (0..PREFILLED).map(|_| a.take(PREFILLED_LEN)).collect();
        for t in taken {
            a.give(t);
        }
        assert_eq!(memory.pooled.load(std::sync::atomic::Ordering::Acquire), 0);
        // A keeps 12 MiB beyond its start; B may then keep only 4 more.
        for _ in 0..3 {
            a.give(vec![0; 4 << 20]);
        }
        b.give(vec![0; 4 << 20]);
        b.give(vec![0; 4 << 20]);
        let held = |p: &BufPool| p.free.lock().unwrap().bufs.len();
        assert_eq!(held(&a), PREFILLED + 3);
        assert_eq!(
            held(&b),
            PREFILLED + 1,
            "a pool kept more than the share allows"
        );
        assert_eq!(
            memory.pooled.load(std::sync::atomic::Ordering::Acquire),
            16 << 20
        );
        // A small request does not get a large buffer.
        let small = a.take(1 << 20);
        assert!(
            small.capacity() < 4 << 20,
            "1 MiB served from a 4 MiB buffer"
        );
        // Taking gives the share back, and so does a pool that goes.
        let big = a.take(4 << 20);
        assert_eq!(big.len(), 4 << 20);
        assert_eq!(
            memory.pooled.load(std::sync::atomic::Ordering::Acquire),
            12 << 20
        );
        drop(a);
        assert_eq!(
            memory.pooled.load(std::sync::atomic::Ordering::Acquire),
            4 << 20
        );
        drop(b);
        assert_eq!(memory.pooled.load(std::sync::atomic::Ordering::Acquire), 0);
    }
}
