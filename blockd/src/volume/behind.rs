//! Write-behind: while a client commits (small writes, each followed soon
//! by a FLUSH), the writeback of each write starts as soon as it has been
//! answered, so the FLUSH that follows finds the data already on its way
//! to the disk and waits only for the disk's cache flush.
//!
//! An `fdatasync` of a few KiB written through the page cache costs two
//! device round trips in a row: writing the pages, then flushing the
//! disk's write cache (measured on the test host: 85 µs in all, about
//! 40 µs of them the data write). The client, meanwhile, spends longer
//! than that between the WRITE's reply and its FLUSH (PostgreSQL over ext4
//! over loop and nbdfuse: the reply climbs back through the block layer,
//! and the FLUSH comes down the same way). `sync_file_range(WRITE)`
//! issued in that gap overlaps the data write with the client's own path
//! (kernel-notes/README.md, "Flush and FUA").
//!
//! Started writeback is not free: it turns page-cache writes into device
//! writes at once, with no merging of later writes to the same pages. So
//! it runs only while FLUSHes are frequent, and only for a bounded amount
//! of data per FLUSH: a bulk writer that flushes now and then starts the
//! writeback of at most [`BUDGET`] bytes after each FLUSH, and one that
//! never flushes, none.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long after a FLUSH the volume counts as committing.
pub const WINDOW: Duration = Duration::from_millis(20);
/// Bytes whose writeback may be started between two FLUSHes.
pub const BUDGET: u64 = 1 << 20;

/// A volume's FLUSH rhythm: when the last one finished, and what has been
/// written since.
#[derive(Debug)]
pub struct WriteBehind {
    base: Instant,
    /// Nanoseconds from `base` to the end of the last FLUSH, plus one (0:
    /// no FLUSH yet).
    last_flush: AtomicU64,
    /// Bytes handed to [`Self::wants`] since the last FLUSH.
    since_flush: AtomicU64,
}

impl Default for WriteBehind {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_flush: AtomicU64::new(0),
            since_flush: AtomicU64::new(0),
        }
    }
}

impl WriteBehind {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Records a FLUSH (whether or not it had anything to sync).
    pub fn flushed(&self) {
        self.since_flush.store(0, Ordering::Relaxed);
        self.last_flush.store(self.now(), Ordering::Relaxed);
    }

    /// True when the writeback of a write of `len` bytes that just landed
    /// should start now: a FLUSH finished less than [`WINDOW`] ago, and
    /// this write stays within [`BUDGET`] since then.
    pub fn wants(&self, len: u64) -> bool {
        let last = self.last_flush.load(Ordering::Relaxed);
        let window = u64::try_from(WINDOW.as_nanos()).unwrap_or(u64::MAX);
        if last == 0 || self.now().saturating_sub(last) > window {
            return false;
        }
        self.since_flush.fetch_add(len, Ordering::Relaxed) + len <= BUDGET
    }
}

/// Starts the writeback of `ranges` of `file` and returns without waiting
/// for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: pages already under
/// writeback are left alone). A hint: a failure is logged and otherwise
/// ignored, since the FLUSH that follows syncs the file whatever happened
/// here.
pub fn start(file: &File, ranges: &[(u64, u64)]) {
    for &(offset, len) in ranges {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            continue;
        };
        // SAFETY: sync_file_range reads no memory of ours; the descriptor
        // stays open for the call (borrowed from `file`).
        #[allow(unsafe_code)]
        let r =
            unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!(offset, len, error = %e, "starting writeback failed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_only_after_a_recent_flush_and_within_the_budget() {
        let b = WriteBehind::default();
        assert!(!b.wants(4096), "no FLUSH yet: a bulk writer");
        b.flushed();
        assert!(b.wants(4096));
        assert!(b.wants(BUDGET - 4096), "exactly the budget");
        assert!(!b.wants(1), "over the budget since the FLUSH");
        b.flushed();
        assert!(b.wants(8192), "a FLUSH renews the budget");
        let Some(base) = Instant::now().checked_sub(WINDOW * 2) else {
            return;
        };
        let old = WriteBehind {
            base,
            last_flush: AtomicU64::new(1),
            since_flush: AtomicU64::new(0),
        };
        assert!(!old.wants(4096), "a FLUSH older than the window");
    }
}
