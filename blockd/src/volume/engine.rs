//! The I/O engine: io_uring where the kernel allows it, a thread pool of
//! pread/pwrite otherwise.
//!
//! io_uring runs on one dedicated thread that owns the ring. Callers send an
//! [`Op`] over a channel and await a oneshot; the ring thread wakes through an
//! eventfd that it keeps armed as a read in the ring, and only when it is
//! about to sleep (the `sleeping` flag), so a busy ring costs senders no
//! syscall. Buffers are owned `Vec`s moved into the op and handed back on
//! completion: the kernel never sees memory that could move or be freed.
//!
//! Container runtimes often block io_uring with seccomp, and
//! `kernel.io_uring_disabled` can switch it off; then [`Engine::new`] falls
//! back to `spawn_blocking` with positional reads and writes and logs that
//! once. `BLOCKD_IO_ENGINE=threads` forces the fallback (tests cover both).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use rustix::fs::FallocateFlags;
use tokio::sync::oneshot;

/// Which engine to use.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring if available, else threads.
    Auto,
    /// io_uring or fail.
    Uring,
    /// Thread pool with pread/pwrite.
    Threads,
}

/// The engine every volume's I/O goes through.
#[derive(Debug)]
pub enum Engine {
    /// A ring thread.
    Uring(Ring),
    /// `spawn_blocking` with positional I/O.
    Threads,
}

impl Engine {
    /// Starts the engine of the given kind.
    ///
    /// # Errors
    /// Only for [`EngineKind::Uring`] when io_uring cannot be set up.
    pub fn new(kind: EngineKind) -> io::Result<Self> {
        match kind {
            EngineKind::Threads => Ok(Self::Threads),
            EngineKind::Uring => Ring::start().map(Self::Uring),
            EngineKind::Auto => match Ring::start() {
                Ok(ring) => Ok(Self::Uring(ring)),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "io_uring unavailable (seccomp or kernel.io_uring_disabled?): using the pread/pwrite thread pool"
                    );
                    Ok(Self::Threads)
                }
            },
        }
    }

    /// `io_uring` or `threads`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Uring(_) => "io_uring",
            Self::Threads => "threads",
        }
    }

    /// Fills `buf[start..]` from `file` at `offset`. Bytes past the end of
    /// the file read as zeros.
    pub async fn read_at(
        &self,
        file: &Arc<File>,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
    ) -> io::Result<Vec<u8>> {
        match self {
            Self::Uring(ring) => ring.run(OpCode::Read, file, buf, start, offset).await,
            Self::Threads => {
                let file = file.clone();
                blocking(move || {
                    let mut buf = buf;
                    let mut pos = start;
                    while pos < buf.len() {
                        match file.read_at(&mut buf[pos..], offset + (pos - start) as u64) {
                            Ok(0) => {
                                buf[pos..].fill(0);
                                break;
                            }
                            Ok(n) => pos += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(buf)
                })
                .await
            }
        }
    }

    /// Writes `buf[start..]` to `file` at `offset`; with `dsync` the data is
    /// durable when this returns (RWF_DSYNC, i.e. FUA).
    pub async fn write_at(
        &self,
        file: &Arc<File>,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
        dsync: bool,
    ) -> io::Result<Vec<u8>> {
        match self {
            Self::Uring(ring) => {
                ring.run(OpCode::Write { dsync }, file, buf, start, offset)
                    .await
            }
            Self::Threads => {
                let file = file.clone();
                blocking(move || {
                    let flags = if dsync {
                        rustix::io::ReadWriteFlags::DSYNC
                    } else {
                        rustix::io::ReadWriteFlags::empty()
                    };
                    let mut pos = start;
                    while pos < buf.len() {
                        let off = offset + (pos - start) as u64;
                        // Buffered: in steps (see [`write_step`]); a DSYNC
                        // write in one call, one sync.
                        let end = if dsync {
                            buf.len()
                        } else {
                            pos + write_step(off, buf.len() - pos)
                        };
                        match rustix::io::pwritev2(
                            &*file,
                            &[io::IoSlice::new(&buf[pos..end])],
                            off,
                            flags,
                        ) {
                            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                            Ok(n) => pos += n,
                            Err(rustix::io::Errno::INTR) => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(buf)
                })
                .await
            }
        }
    }

    /// fdatasync: every write acknowledged before this call is durable after.
    pub async fn sync(&self, file: &Arc<File>) -> io::Result<()> {
        // Not through the ring: IORING_OP_FSYNC cannot complete inline, so
        // the kernel hands it to an io-wq worker, and that worker's wake-up
        // plus the ring thread's made every FLUSH ~100 µs slower than a
        // pool thread calling fdatasync (kernel-notes/nbd.md, "FLUSH").
        let file = file.clone();
        blocking(move || file.sync_data()).await
    }

    /// fallocate(2) with `mode` over `offset..offset + len`.
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: FallocateFlags,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        match self {
            Self::Uring(ring) => ring
                .run(OpCode::Fallocate { mode, len }, file, Vec::new(), 0, offset)
                .await
                .map(drop),
            Self::Threads => {
                let file = file.clone();
                blocking(move || Ok(rustix::fs::fallocate(&*file, mode, offset, len)?)).await
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

#[derive(Debug, Clone, Copy)]
enum OpCode {
    Read,
    Write { dsync: bool },
    Fallocate { mode: FallocateFlags, len: u64 },
}

/// One request to the ring thread.
struct Op {
    code: OpCode,
    file: Arc<File>,
    buf: Vec<u8>,
    /// Progress through `buf` (short reads and writes are resubmitted).
    pos: usize,
    start: usize,
    offset: u64,
    done: oneshot::Sender<io::Result<Vec<u8>>>,
}

/// Handle to the ring thread.
#[derive(Debug)]
pub struct Ring {
    tx: mpsc::Sender<Op>,
    wake: Arc<Wake>,
}

#[derive(Debug)]
struct Wake {
    eventfd: std::os::fd::OwnedFd,
    sleeping: AtomicBool,
}

impl Wake {
    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            // A failed write only delays the ring until its next completion.
            let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
        }
    }
}

const RING_ENTRIES: u32 = 256;
const EVENTFD_TAG: u64 = u64::MAX;

impl Ring {
    fn start() -> io::Result<Self> {
        let ring = io_uring::IoUring::new(RING_ENTRIES)?;
        // Probe that the ring really works: some seccomp profiles allow setup
        // but refuse io_uring_enter.
        ring.submit()?;
        let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let wake = Arc::new(Wake {
            eventfd,
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let thread_wake = wake.clone();
        std::thread::Builder::new()
            .name("blockd-uring".into())
            .spawn(move || ring_thread(ring, rx, &thread_wake))?;
        Ok(Self { tx, wake })
    }

    async fn run(
        &self,
        code: OpCode,
        file: &Arc<File>,
        buf: Vec<u8>,
        start: usize,
        offset: u64,
    ) -> io::Result<Vec<u8>> {
        let (done, rx) = oneshot::channel();
        let op = Op {
            code,
            file: file.clone(),
            pos: start,
            start,
            buf,
            offset,
            done,
        };
        self.tx
            .send(op)
            .map_err(|_| io::Error::other("io_uring thread has stopped"))?;
        self.wake.wake();
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("io_uring thread has stopped")))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Dropping `tx` disconnects the channel; wake the thread to notice.
        self.wake.sleeping.store(true, Ordering::SeqCst);
        self.wake.wake();
    }
}

fn ring_thread(mut ring: io_uring::IoUring, rx: mpsc::Receiver<Op>, wake: &Wake) {
    use io_uring::{opcode, types};

    // Declared before the loop state so it outlives every SQE that points at it.
    let mut efd_buf = [0u8; 8];
    let mut slots: Vec<Option<Op>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut in_flight = 0usize;
    let mut disconnected = false;

    let efd = types::Fd(wake.eventfd.as_raw_fd());
    let arm = |ring: &mut io_uring::IoUring, buf: &mut [u8; 8]| {
        let sqe = opcode::Read::new(efd, buf.as_mut_ptr(), 8)
            .build()
            .user_data(EVENTFD_TAG);
        push(ring, &sqe);
    };
    arm(&mut ring, &mut efd_buf);

    loop {
        // Take every queued op.
        loop {
            match rx.try_recv() {
                Ok(op) => {
                    let idx = free.pop().unwrap_or_else(|| {
                        slots.push(None);
                        slots.len() - 1
                    });
                    let op = slots[idx].insert(op);
                    submit_op(&mut ring, op, idx as u64);
                    in_flight += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if disconnected && in_flight == 0 {
            return;
        }
        wake.sleeping.store(true, Ordering::SeqCst);
        // An op sent between the drain above and the flag would be missed by
        // the sender's check: look once more before sleeping.
        if let Ok(op) = rx.try_recv() {
            wake.sleeping.store(false, Ordering::SeqCst);
            let idx = free.pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            });
            let op = slots[idx].insert(op);
            submit_op(&mut ring, op, idx as u64);
            in_flight += 1;
            continue;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "io_uring_enter failed");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        wake.sleeping.store(false, Ordering::SeqCst);
        let completions: Vec<(u64, i32)> = ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (tag, res) in completions {
            if tag == EVENTFD_TAG {
                arm(&mut ring, &mut efd_buf);
                continue;
            }
            let idx = usize::try_from(tag).unwrap_or(usize::MAX);
            let Some(op) = slots.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            let finished = match complete_step(op, res) {
                Step::Again => {
                    submit_op(&mut ring, op, tag);
                    None
                }
                Step::Done(r) => Some(r),
            };
            if let Some(result) = finished {
                if let Some(op) = slots[idx].take() {
                    let _ = op.done.send(result.map(|()| op.buf));
                }
                free.push(idx);
                in_flight -= 1;
            }
        }
    }
}

enum Step {
    Again,
    Done(io::Result<()>),
}

fn complete_step(op: &mut Op, res: i32) -> Step {
    if res < 0 {
        let errno = -res;
        if errno == libc::EINTR || errno == libc::EAGAIN {
            return Step::Again;
        }
        return Step::Done(Err(io::Error::from_raw_os_error(errno)));
    }
    let n = res.unsigned_abs() as usize;
    match op.code {
        OpCode::Read => {
            if n == 0 {
                // End of file: the rest reads as zeros.
                op.buf[op.pos..].fill(0);
                return Step::Done(Ok(()));
            }
            op.pos += n;
        }
        OpCode::Write { .. } => {
            if n == 0 {
                return Step::Done(Err(io::ErrorKind::WriteZero.into()));
            }
            op.pos += n;
        }
        OpCode::Fallocate { .. } => return Step::Done(Ok(())),
    }
    if op.pos < op.buf.len() {
        Step::Again
    } else {
        Step::Done(Ok(()))
    }
}

fn submit_op(ring: &mut io_uring::IoUring, op: &mut Op, tag: u64) {
    use io_uring::{opcode, types};
    let fd = types::Fd(op.file.as_raw_fd());
    let offset = op.offset + (op.pos - op.start) as u64;
    let remaining = &mut op.buf[op.pos..];
    // Payloads are at most 32 MiB (MAX_PAYLOAD), so lengths fit in u32.
    let len = u32::try_from(remaining.len()).unwrap_or(u32::MAX);
    let sqe = match op.code {
        OpCode::Read => opcode::Read::new(fd, remaining.as_mut_ptr(), len)
            .offset(offset)
            .build(),
        // A buffered write goes in steps (the completion of one submits
        // the next); see [`write_step`].
        OpCode::Write { dsync: false } => {
            let step = write_step(offset, remaining.len());
            let step = u32::try_from(step).unwrap_or(u32::MAX);
            opcode::Write::new(fd, remaining.as_ptr(), step)
                .offset(offset)
                .build()
        }
        OpCode::Write { dsync: true } => opcode::Write::new(fd, remaining.as_ptr(), len)
            .offset(offset)
            .rw_flags(libc::RWF_DSYNC)
            .build(),
        OpCode::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
            .offset(op.offset)
            .mode(mode.bits() as i32)
            .build(),
    };
    push(ring, &sqe.user_data(tag));
}

/// Largest piece of one buffered write to a volume file, and its
/// alignment: the page cache then holds what blockd writes in folios of
/// at most 256 KiB.
///
/// ext4 (Linux 6.16 and later) caches a file in large folios, as large as
/// the write that created them (or the read-ahead window). Every later
/// buffered write into a folio walks all of its buffer heads
/// (`ext4_block_write_begin`), so a 4 KiB write into a region written 1 MiB
/// at a time costs 256 times the walk it costs in a 4 KiB folio. Measured
/// on a 1 GiB volume, fio 4k random writes at QD32: 33-42k IOPS after a
/// 1 MiB sequential fill, with `ext4_block_write_begin` at 73% of blockd's
/// CPU; 88k with 256 KiB steps, 108k with 128 KiB, 125k with 64 KiB. Small
/// folios cost random 4 KiB reads instead (64 KiB steps: 12% fewer read
/// IOPS, the same with 128 KiB; 256 KiB none measurable), so 256 KiB it is
/// (kernel-notes/README.md, "Large folios and small writes").
pub const WRITE_STEP: usize = 256 << 10;

/// How much of `remaining` bytes at `offset` to write in one call: up to
/// the next [`WRITE_STEP`] boundary.
pub fn write_step(offset: u64, remaining: usize) -> usize {
    let to_boundary = WRITE_STEP - usize::try_from(offset % WRITE_STEP as u64).unwrap_or(0);
    remaining.min(to_boundary)
}

fn push(ring: &mut io_uring::IoUring, sqe: &io_uring::squeue::Entry) {
    loop {
        // SAFETY: every SQE built here points into memory that outlives its
        // completion: op buffers are owned by the op in `slots` until its CQE
        // is reaped, the eventfd buffer lives for the whole ring thread, and
        // the fds are kept open by the op's `Arc<File>` / the `Wake` struct.
        #[allow(unsafe_code)]
        let pushed = unsafe { ring.submission().push(sqe) };
        if pushed.is_ok() {
            return;
        }
        // Queue full: hand what is there to the kernel and retry.
        if let Err(e) = ring.submit() {
            tracing::error!(error = %e, "io_uring submit failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty file in a new temp dir (kept while the dir lives).
    fn temp_file() -> (tempfile::TempDir, Arc<std::fs::File>) {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        (dir, Arc::new(file))
    }

    #[test]
    fn buffered_writes_step_at_write_step_boundaries() {
        assert_eq!(write_step(0, 1 << 20), WRITE_STEP);
        assert_eq!(write_step(4096, 1 << 20), WRITE_STEP - 4096);
        assert_eq!(write_step(4096, 100), 100);
        assert_eq!(write_step(WRITE_STEP as u64 - 1, 10), 1);
        assert_eq!(write_step(3 * WRITE_STEP as u64, 5000), 5000);
    }

    /// A write of several steps, at an unaligned offset and after a
    /// reply-header gap, lands whole (both engines).
    async fn stepped_write(kind: EngineKind) {
        let engine = Engine::new(kind).unwrap();
        let (_dir, file) = temp_file();
        let len = 300 << 10;
        let mut buf = vec![0u8; 16 + len];
        for (i, b) in buf[16..].iter_mut().enumerate() {
            *b = u8::try_from(i % 253).unwrap();
        }
        let at = 4096 + 100;
        engine
            .write_at(&file, buf.clone(), 16, at, false)
            .await
            .unwrap();
        let back = engine.read_at(&file, vec![0; len], 0, at).await.unwrap();
        assert!(back == buf[16..], "a stepped write reads back whole");
    }

    #[tokio::test]
    async fn stepped_writes_land_whole() {
        stepped_write(EngineKind::Threads).await;
        if let Ok(Engine::Uring(_)) = Engine::new(EngineKind::Auto) {
            stepped_write(EngineKind::Uring).await;
        }
    }

    async fn roundtrip(kind: EngineKind) {
        let engine = Engine::new(kind).unwrap();
        let (_dir, file) = temp_file();
        file.set_len(1 << 20).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        engine
            .write_at(&file, data.clone(), 0, 4096, false)
            .await
            .unwrap();
        engine
            .write_at(&file, vec![7; 512], 0, 8192, true)
            .await
            .unwrap();
        engine.sync(&file).await.unwrap();
        let buf = engine
            .read_at(&file, vec![0; 16 + 65536], 16, 4096)
            .await
            .unwrap();
        let mut want = data.clone();
        want[4096..4608].fill(7);
        assert_eq!(&buf[16..], &want[..]);
        engine
            .fallocate(
                &file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                4096,
                4096,
            )
            .await
            .unwrap();
        let buf = engine.read_at(&file, vec![1; 4096], 0, 4096).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Past the end reads zeros.
        let buf = engine
            .read_at(&file, vec![1; 8192], 0, (1 << 20) - 4096)
            .await
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn uring_roundtrip() {
        if io_uring::IoUring::new(8).is_err() {
            eprintln!("SKIPPED: io_uring unavailable on this kernel");
            return;
        }
        roundtrip(EngineKind::Uring).await;
    }

    #[tokio::test]
    async fn threads_roundtrip() {
        roundtrip(EngineKind::Threads).await;
    }
}
