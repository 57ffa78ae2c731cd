//! What blockd asks of the kernel for itself, so that it keeps serving
//! under memory pressure when its clients are on the same host (see
//! kernel-notes/nbd.md): the kernel may write back dirty pages of a
//! `/dev/nbdX` through blockd, so blockd must never wait for reclaim
//! that needs those very pages.
//!
//! Applied once, in `main`, before the runtime starts any thread: every
//! thread (tokio workers, the blocking pool, io_uring's kernel workers)
//! inherits the I/O-flusher flags from the thread that creates it.

/// What was applied, and what could not be (with why).
#[derive(Debug, Clone)]
pub struct Protections {
    /// `PR_SET_IO_FLUSHER`: allocations never recurse into I/O reclaim,
    /// and writeback throttling looks at this device only.
    pub io_flusher: Result<(), String>,
    /// `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: no page of the
    /// daemon is swapped out (a fault would wait for swap-in I/O).
    pub memory_locked: Result<(), String>,
    /// `oom_score_adj` -1000: the OOM killer picks another process.
    pub oom_protected: Result<(), String>,
}

impl Default for Protections {
    /// None applied.
    fn default() -> Self {
        let no = || Err("not applied".to_string());
        Self {
            io_flusher: no(),
            memory_locked: no(),
            oom_protected: no(),
        }
    }
}

impl Protections {
    /// Applies them; `lock_memory` false leaves memory unlocked. Each
    /// failure (typically: not root, no CAP_SYS_RESOURCE or CAP_IPC_LOCK,
    /// a low RLIMIT_MEMLOCK) is kept, and the daemon runs without it.
    pub fn apply(lock_memory: bool) -> Self {
        let io_flusher =
            rustix::process::configure_io_flusher_behavior(true).map_err(|e| e.to_string());
        // ONFAULT: pages are locked as they are first touched, not when
        // mapped, so thread stacks and allocator arenas do not become
        // resident at their full reserved size.
        let memory_locked = if lock_memory {
            lock_all().map_err(|e| e.to_string())
        } else {
            Err("turned off (--no-mlock)".into())
        };
        let oom_protected =
            std::fs::write("/proc/self/oom_score_adj", "-1000").map_err(|e| e.to_string());
        bound_heap();
        LOCKED.store(memory_locked.is_ok(), std::sync::atomic::Ordering::SeqCst);
        Self {
            io_flusher,
            memory_locked,
            oom_protected,
        }
    }

    /// Logs what holds and what does not.
    pub fn log(&self) {
        for (what, r) in [
            ("PR_SET_IO_FLUSHER", &self.io_flusher),
            ("mlockall", &self.memory_locked),
            ("oom_score_adj -1000", &self.oom_protected),
        ] {
            match r {
                Ok(()) => tracing::info!(protection = what, "memory-pressure protection on"),
                Err(why) => tracing::warn!(
                    protection = what,
                    why,
                    "memory-pressure protection off: a client of /dev/nbdX on this host may deadlock blockd under memory pressure (it needs root with CAP_SYS_RESOURCE and CAP_IPC_LOCK, which containers often drop; see kernel-notes/nbd.md)"
                ),
            }
        }
    }

    /// The protections on, by name (for `GET /v1/info`).
    pub fn names(&self) -> Vec<String> {
        [
            ("io_flusher", &self.io_flusher),
            ("mlockall", &self.memory_locked),
            ("oom_score_adj", &self.oom_protected),
        ]
        .into_iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(n, _)| n.to_string())
        .collect()
    }
}

/// Descriptors a daemon needs beyond its connections and its volumes:
/// snapshot files, the state database, object-store and FUSE connections.
const DESCRIPTORS_BESIDES: u64 = 1024;

/// Raises the soft limit on open descriptors to the hard one (a shell's
/// soft limit is often 1024, far below what the connections blockd allows
/// take: three descriptors per NBD connection); returns the limit now.
/// Without it, accepts fail with EMFILE once the limit is reached, on
/// every listener at once.
pub fn raise_descriptor_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX).min(1 << 20);
    if soft >= hard {
        return soft;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => {
            tracing::info!(from = soft, to = hard, "open-descriptor limit raised");
            hard
        }
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-descriptor limit");
            soft
        }
    }
}

/// Warns when `limit` is below what `volumes` open volumes and the
/// connections `nbd_max_connections` and the HTTP listeners' bounds allow
/// may take, saying what to change.
pub fn check_descriptors(limit: u64, nbd_max_connections: usize, volumes: usize) {
    let need = 3 * nbd_max_connections as u64
        + (crate::api::serve::API_MAX_CONNECTIONS
            + crate::api::serve::REFUSED_MAX_CONNECTIONS
            + crate::api::serve::METRICS_MAX_CONNECTIONS) as u64
        + volumes as u64
        + DESCRIPTORS_BESIDES;
    if limit < need {
        tracing::warn!(
            limit,
            need,
            volumes,
            "the open-descriptor limit is below what the connections blockd allows and its volumes may take (3 per NBD connection of --nbd-max-connections, 1 per API or metrics connection, 1 per volume, about 1024 for other files): past it every listener fails to accept; raise it (systemd: LimitNOFILE=, a shell: ulimit -Hn) or lower --nbd-max-connections"
        );
    }
}

/// `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`.
fn lock_all() -> rustix::io::Result<()> {
    use rustix::mm::MlockAllFlags as F;
    rustix::mm::mlockall(F::CURRENT | F::FUTURE | F::ONFAULT)
}

/// Most malloc arenas (glibc makes up to 8 per core, and each keeps what
/// was freed in it): with memory locked, what an arena keeps stays
/// resident. Two bound the heap (kernel-notes/nbd.md, "A bounded heap").
const ARENAS: i32 = 2;

/// Bounds the allocator's heap (glibc); set before any thread starts.
fn bound_heap() {
    #[cfg(target_env = "gnu")]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets an allocator parameter; it is called from
    // `main` before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// [`release_memory`] on the blocking pool 10 s from now, unless one is
/// already due; called as NBD connections end, so that what a burst of
/// connections took (each about a megabyte, locked) goes back to the
/// kernel once they have gone, with one release for the whole burst.
pub fn release_memory_soon() {
    static DUE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if DUE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    rt.spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        DUE.store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = tokio::task::spawn_blocking(release_memory).await;
    });
}

/// Returns memory freed in the allocator to the kernel (glibc
/// `malloc_trim`); called when a backup, restore or collection ends.
///
/// Locked pages cannot be discarded (`madvise(MADV_DONTNEED)` refuses
/// them), so with memory locked the lock is dropped for the length of the
/// trim and taken again (`MCL_ONFAULT`: only pages in use are locked
/// again). Measured: a daemon that restored 1 GiB kept 74 MiB resident
/// with the lock held through the trim, 17 MiB with this.
pub fn release_memory() {
    #[cfg(target_env = "gnu")]
    {
        let locked = LOCKED.load(std::sync::atomic::Ordering::SeqCst);
        if locked {
            let _ = rustix::mm::munlockall();
        }
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim takes the allocator's own locks; it is safe
        // to call from any thread at any time.
        unsafe {
            libc::malloc_trim(0);
        }
        if locked {
            if let Err(e) = lock_all() {
                tracing::warn!(error = %e, "locking memory again after a trim failed");
            }
        }
    }
}

/// Memory was locked at start (see [`release_memory`]).
static LOCKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Niceness of the threads that do the CPU-heavy part of backups.
pub const BACKGROUND_NICE: i32 = 10;

/// Runs `f` on a thread of the background pool: blocking threads at nice
/// [`BACKGROUND_NICE`] that hash, compress and encrypt what backups read.
///
/// A backup of a busy volume competes for the CPU with the very I/O it
/// protects: on two cores, a group backup of a database's data and WAL
/// (0.5 s of hashing, compression and encryption at full speed) dropped
/// the database's transactions to half for that second. At nice 10 the
/// scheduler gives the backup the CPU the volumes' requests leave idle,
/// and about a tenth of a contended core besides, so it still ends under
/// load. The volumes' own blocking work (fsyncs, restores a user waits
/// for) stays on the runtime's default pool at normal priority.
///
/// The pool belongs to a runtime of its own that is never driven: only
/// its blocking threads run, and its handle's `spawn_blocking` wakes the
/// awaiting task on whichever runtime it runs on. Falls back to the
/// calling runtime's pool if that runtime cannot be built.
pub fn spawn_background<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    static POOL: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .thread_name("blockd-background")
            .on_thread_start(|| {
                // Raising one's own niceness needs no privilege; on Linux,
                // "process" 0 is the calling thread.
                let now = rustix::process::getpriority_process(None).unwrap_or(0);
                if let Err(e) =
                    rustix::process::setpriority_process(None, now.max(BACKGROUND_NICE))
                {
                    tracing::debug!(error = %e, "background thread keeps its priority");
                }
            })
            .build()
            .map_err(|e| tracing::warn!(error = %e, "no background pool: backups run at normal priority"))
            .ok()
    });
    match pool {
        Some(rt) => rt.spawn_blocking(f),
        None => tokio::task::spawn_blocking(f),
    }
}

#[cfg(test)]
mod background_tests {
    /// Work handed to the background pool runs niced, and its result
    /// comes back to a task of another runtime; the caller's own threads
    /// keep their priority.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_work_runs_niced_and_returns() {
        let mine = rustix::process::getpriority_process(None).unwrap();
        let (nice, sum) = super::spawn_background(|| {
            let nice = rustix::process::getpriority_process(None).unwrap();
            (nice, (1..=100u32).sum::<u32>())
        })
        .await
        .unwrap();
        assert_eq!(sum, 5050);
        assert!(
            nice >= super::BACKGROUND_NICE,
            "background thread at nice {nice}"
        );
        let after = tokio::task::spawn_blocking(|| rustix::process::getpriority_process(None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after, mine, "the runtime's own pool keeps its priority");
    }
}
