//! The catalog mount: a read-only FUSE tree of one location's cloud
//! snapshots (`blockctl mount DIR`), where an admin opens
//! `DIR/<volume>/<snapshot>/disk.img` (say with `mount -o ro,loop`) to
//! fetch one file back without restoring the volume. [`tree`] gives the
//! layout.
//!
//! # Inside the daemon
//! The mount is served by blockd itself, not by a process of its own: the
//! daemon already holds the location's credentials and the repository's
//! unwrapped keys, so no secret ever reaches the CLI or a second process;
//! the mount outlives the `blockctl` that asked for it; and there is one
//! process to supervise (systemd, logs, shutdown). The cost: a daemon
//! crash leaves a stale mount ("Transport endpoint is not connected") that
//! `blockctl umount DIR` detaches. Mounts end when the daemon stops.
//!
//! fuser's session runs [`FUSE_THREADS`] threads reading `/dev/fuse` (each
//! with its own cloned fd); they never block on the store: every request
//! that may touch it is handed to a tokio task that replies when done, so
//! concurrent readers are served in parallel.
//!
//! # Reads and the cache
//! A read of `disk.img` maps its range to index blocks (loaded through a
//! small in-memory LRU keyed by the content-addressed block id, which
//! snapshots share), takes the entries that intersect it, gets each chunk
//! through the mount's [`cache::ChunkCache`] and copies the bytes; bytes no
//! entry covers are zeros. The cache keeps *sealed* records on local disk
//! (LRU by bytes, `--cache-size`, 2 GiB by default, emptied at mount) and
//! opens and checks each one on every hit: local corruption is caught and
//! the chunk fetched again, and an encrypted repository's plaintext never
//! lands on disk. Misses are ranged GETs with adjacent records coalesced,
//! at most four in flight per mount, and never two for one chunk.
//!
//! # Read-ahead
//! Each open `disk.img` handle watches its reads; while they stay
//! sequential it fetches the chunks of the next window in the background,
//! the window doubling from 1 MiB up to 16 MiB; a jump resets it. The file
//! is opened with `FOPEN_KEEP_CACHE` (a snapshot never changes), so warm
//! reads are page-cache hits, and the mount's kernel read-ahead is raised
//! to 1 MiB (see kernel-notes/fuse.md).
//!
//! # Freshness
//! Directory listings come from the bucket and are listed again when older
//! than one second, so new snapshots appear without remounting, and at
//! once when this daemon wrote or deleted a snapshot or group there (a
//! script that reads `latest` right after `cloudsnap backup --wait` gets
//! that backup);
//! directories and links carry a one-second TTL, `disk.img` and
//! `info.json` (immutable) a long one. Inode numbers are stable for the
//! life of the mount.
//!
//! # Errors
//! Anything the repository reports on a read (a missing or corrupt pack,
//! an unreachable store, a key that no longer opens an object) fails that
//! read alone with EIO and logs a warning naming the snapshot and the
//! object; the mount stays up and every other file stays readable. A
//! repository that cannot be opened at all (wrong passphrase) fails the
//! mount request itself with the repository's message. Writes of any kind
//! answer EROFS.

pub mod cache;
mod mounts;
pub mod namespace;
pub mod tree;

pub use mounts::{MountError, Mounts};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use crate::claims::{Claim, Claims, Want};
use crate::cloud::Cloud;
use crate::repo::fetch::IndexCache;
use crate::repo::format::{ChunkLoc, Manifest};
use crate::repo::gc::{Lease, LeaseTerms};
use crate::repo::name;
use crate::repo::{Repo, RepoError};
use cache::ChunkCache;
use tree::{Inodes, Kind, Listing, Node};

/// Threads reading `/dev/fuse`.
pub const FUSE_THREADS: usize = 2;
/// Listings older than this are listed again.
const REFRESH: Duration = Duration::from_secs(1);
/// Attribute and entry TTL of directories and links (they change).
const SHORT_TTL: Duration = Duration::from_secs(1);
/// Attribute and entry TTL of files (immutable).
const LONG_TTL: Duration = Duration::from_secs(3600);
/// Index blocks kept in memory per mount.
const INDEX_BLOCKS: usize = 32;
/// First read-ahead window.
const READ_AHEAD_MIN: u64 = 1 << 20;
/// Largest read-ahead window.
const READ_AHEAD_MAX: u64 = 16 << 20;
/// How far a read may land from the previous one and still count as
/// sequential (the kernel sends concurrent reads slightly out of order).
const SEQUENTIAL_SLACK: u64 = 2 << 20;
/// Kernel read-ahead of the mount, KiB.
const KERNEL_READ_AHEAD_KB: u32 = 1024;
/// Smallest cache: room for one largest chunk.
const MIN_CACHE: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A snapshot's manifest and what is derived from it.
struct Snap {
    manifest: Manifest,
    info: Vec<u8>,
}

/// A group object and its `info.json`.
struct GroupObj {
    members: Vec<(String, String)>,
    info: Vec<u8>,
}

/// Read-ahead state of one open `disk.img`.
#[derive(Debug, Default)]
struct Stream {
    /// Holds the snapshot open: it cannot be deleted until the file is closed.
    _claim: Option<Claim>,
    /// Holds garbage collection back on every host sharing the location
    /// while the file is open, as a restore's lease does (`None` when the
    /// credentials may not write it).
    _lease: Option<Lease>,
    /// End of the furthest read so far.
    next: u64,
    /// Current window; 0 until reads are sequential.
    window: u64,
    /// Fetched (or being fetched) up to here.
    ahead: u64,
}

/// One piece of a read: `len` bytes at `at` in the reply from `from` in a
/// chunk's plain bytes.
#[derive(Debug, Clone, Copy)]
struct Piece {
    at: u64,
    chunk: ChunkLoc,
    from: u64,
    len: u64,
}

/// The state of one mount, shared by the fuser threads and the tasks that
/// answer them.
pub struct Catalog {
    repo: Arc<Repo>,
    location: String,
    claims: Arc<Claims>,
    /// Where it is mounted (named to whoever finds a snapshot open).
    dir: String,
    /// This host's readers' leases, one per open `disk.img`.
    lease_terms: LeaseTerms,
    cache: Arc<ChunkCache>,
    inodes: Mutex<Inodes>,
    listing: tokio::sync::Mutex<Option<Arc<Listing>>>,
    snaps: Mutex<HashMap<(String, String), Arc<Snap>>>,
    groups: Mutex<HashMap<String, Arc<GroupObj>>>,
    index: IndexCache,
    streams: Mutex<HashMap<u64, Stream>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    mounted: SystemTime,
}

fn pretty(v: &impl serde::Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

impl Catalog {
    fn new(
        repo: Arc<Repo>,
        location: String,
        cache: Arc<ChunkCache>,
        claims: Arc<Claims>,
        dir: String,
        lease_terms: LeaseTerms,
    ) -> Self {
        Self {
            repo,
            location,
            claims,
            dir,
            lease_terms,
            cache,
            inodes: Mutex::new(Inodes::default()),
            listing: tokio::sync::Mutex::new(None),
            snaps: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            index: IndexCache::new(INDEX_BLOCKS),
            streams: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            mounted: SystemTime::now(),
        }
    }

    /// Forgets every open file (the mount is gone): their leases are
    /// removed. Called on the runtime, which removes them.
    fn close_streams(&self) {
        let streams = std::mem::take(&mut *lock(&self.streams));
        drop(streams);
    }

    fn node(&self, ino: INodeNo) -> Option<Node> {
        lock(&self.inodes).node(ino.0).cloned()
    }

    fn ino(&self, node: Node) -> u64 {
        lock(&self.inodes).ino(node)
    }

    /// Logs a failed repository access and answers EIO.
    fn eio(&self, what: &str, e: &RepoError) -> Errno {
        tracing::warn!(
            location = %self.location,
            snapshot = what,
            object = %e.object(),
            error = %e,
            "catalog read failed: EIO"
        );
        Errno::EIO
    }

    /// The listing, listed again when stale. A failed listing keeps the
    /// last one (retried a second later).
    async fn listing(&self) -> Result<Arc<Listing>, Errno> {
        let mut cur = self.listing.lock().await;
        // Read before listing: a change landing meanwhile lists again.
        let changes = self.repo.changes();
        if let Some(l) = cur
            .as_ref()
            .filter(|l| l.at.elapsed() < REFRESH && l.changes == changes)
        {
            return Ok(l.clone());
        }
        let listed = tokio::try_join!(self.repo.list_snapshots(None), self.repo.list_groups());
        match listed {
            Ok((snaps, groups)) => {
                let snaps = snaps
                    .into_iter()
                    .filter(|(_, n)| name::is_valid(n))
                    .collect();
                let mut l = Listing::new(snaps, groups);
                l.changes = changes;
                let l = Arc::new(l);
                *cur = Some(l.clone());
                Ok(l)
            }
            Err(e) => {
                let errno = self.eio("(listing)", &e);
                let old = cur.as_ref().ok_or(errno)?;
                let mut l = (**old).clone();
                l.at = std::time::Instant::now();
                let l = Arc::new(l);
                *cur = Some(l.clone());
                Ok(l)
            }
        }
    }

    async fn snap(&self, v: &str, n: &str) -> Result<Arc<Snap>, Errno> {
        let key = (v.to_string(), n.to_string());
        if let Some(s) = lock(&self.snaps).get(&key) {
            return Ok(s.clone());
        }
        let m = match self.repo.get_manifest(v, n).await {
            Ok(m) => m,
            Err(RepoError::Missing { .. }) => return Err(Errno::ENOENT),
            Err(e) => return Err(self.eio(&format!("{v}/{n}"), &e)),
        };
        let info = pretty(&Cloud::to_cloudsnap(&m, &self.location));
        let s = Arc::new(Snap { manifest: m, info });
        lock(&self.snaps).insert(key, s.clone());
        Ok(s)
    }

    /// The lease of open file `fh` of snapshot `v/n`, taken before its
    /// manifest is confirmed to exist, as a restore's (FORMAT.md, "Garbage
    /// collection", rule 8): from then on no host sweeps what it reads.
    /// A snapshot deleted meanwhile is gone (ENOENT), and the lease taken
    /// for it is removed again. A lease the store refuses (a bucket policy
    /// that forbids writes under `locks/`, a full disk) does not fail the
    /// open: the image is browsed with nothing held back, and a read of
    /// what a sweep deleted then fails, naming the object.
    async fn lease_for(&self, v: &str, n: &str, fh: u64) -> Result<Option<Lease>, Errno> {
        let dir = blake3::hash(self.dir.as_bytes()).to_hex();
        let id = format!("catalog-{}-{}-{fh}", self.lease_terms.host, &dir[..8]);
        let lease = match self.lease_terms.take(&self.repo, &id).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(location = %self.location, snapshot = %format!("{v}/{n}"), error = %e, "no reader lease for this open image: garbage collection on any host may delete what it reads (its reads then fail with EIO, naming the object)");
                None
            }
        };
        match self.repo.get_manifest(v, n).await {
            Ok(_) => Ok(lease),
            Err(RepoError::Missing { .. }) => Err(Errno::ENOENT),
            Err(e) => Err(self.eio(&format!("{v}/{n}"), &e)),
        }
    }

    async fn group(&self, g: &str) -> Result<Arc<GroupObj>, Errno> {
        if let Some(o) = lock(&self.groups).get(g) {
            return Ok(o.clone());
        }
        let obj = match self.repo.get_group(g).await {
            Ok(o) => o,
            Err(RepoError::Missing { .. }) => return Err(Errno::ENOENT),
            Err(e) => return Err(self.eio(&format!("group {g}"), &e)),
        };
        let members = obj
            .members
            .iter()
            .filter_map(|m| m.split_once('/'))
            .filter(|(v, n)| !v.is_empty() && name::is_valid(n))
            .map(|(v, n)| (v.to_string(), n.to_string()))
            .collect();
        let o = Arc::new(GroupObj {
            members,
            info: pretty(&obj),
        });
        lock(&self.groups).insert(g.to_string(), o.clone());
        Ok(o)
    }

    /// The names in a directory.
    async fn children(&self, dir: &Node) -> Result<Vec<(String, Node)>, Errno> {
        if let Node::Group(g) = dir {
            let o = self.group(g).await?;
            let l = self.listing().await?;
            // A member deleted since (the group object goes with the last
            // one) is left out rather than shown as a dangling link.
            let mut out: Vec<(String, Node)> = o
                .members
                .iter()
                .filter(|(v, n)| l.has(v, n))
                .map(|(v, _)| (v.clone(), Node::Member(g.clone(), v.clone())))
                .collect();
            out.push((tree::INFO.to_string(), Node::GroupInfo(g.clone())));
            return Ok(out);
        }
        let l = self.listing().await?;
        l.children(dir).ok_or(Errno::ENOENT)
    }

    /// Where a link points.
    async fn target(&self, node: &Node) -> Result<String, Errno> {
        match node {
            Node::Latest(v) => {
                let l = self.listing().await?;
                l.latest(v).map(str::to_string).ok_or(Errno::ENOENT)
            }
            Node::Member(g, v) => {
                let o = self.group(g).await?;
                let l = self.listing().await?;
                o.members
                    .iter()
                    .find(|(m, n)| m == v && l.has(m, n))
                    .map(|(v, n)| tree::member_target(v, n))
                    .ok_or(Errno::ENOENT)
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn make_attr(&self, ino: u64, kind: Kind, size: u64, mtime: SystemTime) -> FileAttr {
        let (kind, perm, nlink, blksize) = match kind {
            Kind::Dir => (FileType::Directory, 0o555, 2, 4096),
            Kind::File => (FileType::RegularFile, 0o444, 1, 1 << 20),
            Kind::Link => (FileType::Symlink, 0o777, 1, 4096),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize,
            flags: 0,
        }
    }

    /// Attributes and TTL of a node.
    async fn attr(&self, ino: u64, node: &Node) -> Result<(FileAttr, Duration), Errno> {
        let when = |name: &str| name::time(name).unwrap_or(self.mounted);
        Ok(match node {
            Node::Root | Node::Groups | Node::Volume(_) => {
                (self.make_attr(ino, Kind::Dir, 0, self.mounted), SHORT_TTL)
            }
            Node::Snapshot(_, n) | Node::Group(n) => {
                (self.make_attr(ino, Kind::Dir, 0, when(n)), SHORT_TTL)
            }
            Node::Latest(_) | Node::Member(..) => {
                let t = self.target(node).await?;
                let name = t.rsplit('/').next().unwrap_or_default().to_string();
                (
                    self.make_attr(ino, Kind::Link, t.len() as u64, when(&name)),
                    SHORT_TTL,
                )
            }
            Node::Disk(v, n) => {
                let s = self.snap(v, n).await?;
                (
                    self.make_attr(ino, Kind::File, s.manifest.size, when(n)),
                    LONG_TTL,
                )
            }
            Node::Info(v, n) => {
                let s = self.snap(v, n).await?;
                (
                    self.make_attr(ino, Kind::File, s.info.len() as u64, when(n)),
                    LONG_TTL,
                )
            }
            Node::GroupInfo(g) => {
                let o = self.group(g).await?;
                (
                    self.make_attr(ino, Kind::File, o.info.len() as u64, when(g)),
                    LONG_TTL,
                )
            }
        })
    }

    async fn lookup(&self, parent: &Node, name: &str) -> Result<(FileAttr, Duration), Errno> {
        let node = self
            .children(parent)
            .await?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, node)| node)
            .ok_or(Errno::ENOENT)?;
        let ino = self.ino(node.clone());
        self.attr(ino, &node).await
    }

    fn parent_ino(&self, node: &Node) -> u64 {
        match node {
            Node::Snapshot(v, _) => self.ino(Node::Volume(v.clone())),
            Node::Group(_) => self.ino(Node::Groups),
            _ => 1,
        }
    }

    /// The pieces of chunks that make up `offset..end` of a snapshot.
    async fn pieces(&self, m: &Manifest, offset: u64, end: u64) -> Result<Vec<Piece>, RepoError> {
        let mut out = Vec::new();
        for (base, entries) in self.index.overlapping(&self.repo, m, offset, end).await? {
            for e in entries {
                let s = (offset.max(base) - base).max(u64::from(e.start));
                let t = (end - base).min(e.end());
                out.push(Piece {
                    at: base + s - offset,
                    chunk: e.chunk,
                    from: u64::from(e.chunk_off) + s - u64::from(e.start),
                    len: t - s,
                });
            }
        }
        Ok(out)
    }

    /// Reads `size` bytes at `offset` of a snapshot's image.
    async fn read_disk(
        self: &Arc<Self>,
        fh: u64,
        v: &str,
        n: &str,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
        let s = self.snap(v, n).await?;
        let total = s.manifest.size;
        if offset >= total {
            return Ok(Vec::new());
        }
        let end = total.min(offset + u64::from(size));
        self.read_ahead(fh, &s, offset, end);
        let id = format!("{v}/{n}");
        let pieces = self
            .pieces(&s.manifest, offset, end)
            .await
            .map_err(|e| self.eio(&id, &e))?;
        let locs: Vec<ChunkLoc> = pieces.iter().map(|p| p.chunk).collect();
        let chunks = self
            .cache
            .chunks(&locs)
            .await
            .map_err(|e| self.eio(&id, &e))?;
        let mut buf = vec![0u8; usize::try_from(end - offset).map_err(|_| Errno::EINVAL)?];
        for p in &pieces {
            let src = chunks.get(&p.chunk.id).and_then(|c| {
                let s = usize::try_from(p.from).ok()?;
                c.get(s..s.checked_add(usize::try_from(p.len).ok()?)?)
            });
            let dst = usize::try_from(p.at).ok().and_then(|a| {
                let t = a.checked_add(usize::try_from(p.len).ok()?)?;
                buf.get_mut(a..t)
            });
            match (src, dst) {
                (Some(src), Some(dst)) => dst.copy_from_slice(src),
                _ => {
                    let e = self
                        .repo
                        .corrupt_pack(&p.chunk.pack, "an index entry reaches past its chunk");
                    return Err(self.eio(&id, &e));
                }
            }
        }
        Ok(buf)
    }

    /// Sequential reads on handle `fh` fetch the next window ahead.
    fn read_ahead(self: &Arc<Self>, fh: u64, s: &Arc<Snap>, offset: u64, end: u64) {
        let range = {
            let mut streams = lock(&self.streams);
            let Some(st) = streams.get_mut(&fh) else {
                return;
            };
            let sequential = offset <= st.next.saturating_add(SEQUENTIAL_SLACK)
                && offset.saturating_add(SEQUENTIAL_SLACK) >= st.next;
            if !sequential {
                st.next = end;
                st.window = 0;
                st.ahead = 0;
                return;
            }
            st.next = st.next.max(end);
            st.window = if st.window == 0 {
                READ_AHEAD_MIN
            } else {
                (st.window * 2).min(READ_AHEAD_MAX)
            };
            let target = s.manifest.size.min(end + st.window);
            let from = st.ahead.max(end);
            // Top up once half the window is used, not on every read.
            if st.ahead >= end + st.window / 2 || target <= from {
                return;
            }
            st.ahead = target;
            from..target
        };
        let me = self.clone();
        let s = s.clone();
        tokio::spawn(async move {
            let id = format!("{}/{}", s.manifest.volume, s.manifest.name);
            let fetched = match me.pieces(&s.manifest, range.start, range.end).await {
                Ok(p) => {
                    let locs: Vec<ChunkLoc> = p.iter().map(|p| p.chunk).collect();
                    me.cache.prefetch(&locs).await.map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = fetched {
                // The read that needs these bytes reports the failure.
                tracing::debug!(snapshot = %id, %error, "read-ahead failed");
            }
        });
    }

    /// Reads from an in-memory file.
    fn slice(bytes: &[u8], offset: u64, size: u32) -> &[u8] {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        &bytes[start..end]
    }

    async fn read(
        self: &Arc<Self>,
        node: &Node,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
        match node {
            Node::Disk(v, n) => self.read_disk(fh, v, n, offset, size).await,
            Node::Info(v, n) => {
                Ok(Self::slice(&self.snap(v, n).await?.info, offset, size).to_vec())
            }
            Node::GroupInfo(g) => {
                Ok(Self::slice(&self.group(g).await?.info, offset, size).to_vec())
            }
            n if n.kind() == Kind::Dir => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }
}

/// The fuser file system: finds the node, then answers from a tokio task.
struct CatalogFs {
    catalog: Arc<Catalog>,
    rt: Handle,
}

impl CatalogFs {
    /// Runs `f` on the runtime with the node `ino` names, or answers
    /// ENOENT through `fail`.
    fn with_node<R, F, Fut>(&self, ino: INodeNo, reply: R, fail: fn(R, Errno), f: F)
    where
        R: Send + 'static,
        F: FnOnce(Arc<Catalog>, Node, R) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match self.catalog.node(ino) {
            Some(node) => {
                self.rt.spawn(f(self.catalog.clone(), node, reply));
            }
            None => fail(reply, Errno::ENOENT),
        }
    }
}

impl Filesystem for CatalogFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // As much kernel read-ahead as the kernel offers.
        if let Err(max) = config.set_max_readahead(KERNEL_READ_AHEAD_KB * 1024) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().map(str::to_string) else {
            reply.error(Errno::ENOENT);
            return;
        };
        self.with_node(parent, reply, ReplyEntry::error, |c, p, reply| async move {
            match c.lookup(&p, &name).await {
                Ok((attr, ttl)) => reply.entry(&ttl, &attr, Generation(0)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.with_node(
            ino,
            reply,
            ReplyAttr::error,
            move |c, n, reply| async move {
                match c.attr(ino.0, &n).await {
                    Ok((attr, ttl)) => reply.attr(&ttl, &attr),
                    Err(e) => reply.error(e),
                }
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.with_node(ino, reply, ReplyData::error, |c, n, reply| async move {
            match c.target(&n).await {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(e),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        match self.catalog.node(ino) {
            Some(Node::Disk(v, n)) => {
                let c = &self.catalog;
                let want = Want::for_open_image(&c.location, &format!("{v}/{n}"), &c.dir);
                let claim = match c.claims.acquire(want) {
                    Ok(claim) => claim,
                    // Being deleted right now.
                    Err(_) => return reply.error(Errno::ENOENT),
                };
                let c = c.clone();
                self.rt.spawn(async move {
                    let fh = c.next_fh.fetch_add(1, Ordering::Relaxed);
                    match c.lease_for(&v, &n, fh).await {
                        Ok(lease) => {
                            let stream = Stream {
                                _claim: Some(claim),
                                _lease: lease,
                                ..Stream::default()
                            };
                            lock(&c.streams).insert(fh, stream);
                            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                        }
                        Err(e) => reply.error(e),
                    }
                });
            }
            Some(n) if n.kind() == Kind::File => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
            }
            Some(n) if n.kind() == Kind::Dir => reply.error(Errno::EISDIR),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.with_node(
            ino,
            reply,
            ReplyData::error,
            move |c, n, reply| async move {
                match c.read(&n, fh.0, offset, size).await {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(e),
                }
            },
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let stream = lock(&self.catalog.streams).remove(&fh.0);
        // Its lease is removed from the store by a task of the runtime.
        let _rt = self.rt.enter();
        drop(stream);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.with_node(
            ino,
            reply,
            ReplyDirectory::error,
            move |c, n, mut reply| async move {
                let children = match c.children(&n).await {
                    Ok(ch) => ch,
                    Err(e) => return reply.error(e),
                };
                let parent = c.parent_ino(&n);
                let mut all = vec![
                    (ino.0, FileType::Directory, ".".to_string()),
                    (parent, FileType::Directory, "..".to_string()),
                ];
                for (name, node) in children {
                    let kind = match node.kind() {
                        Kind::Dir => FileType::Directory,
                        Kind::File => FileType::RegularFile,
                        Kind::Link => FileType::Symlink,
                    };
                    all.push((c.ino(node), kind, name));
                }
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(skip) {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            },
        );
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        // The kernel then seeks itself (SEEK_DATA finds all data).
        reply.error(Errno::ENOSYS);
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_come_from_snapshot_names() {
        let t = name::time("20261121T101500.123Z-3f4f0a67").unwrap();
        assert_eq!(
            humantime::format_rfc3339_millis(t).to_string(),
            "2026-11-21T10:15:00.123Z"
        );
        assert!(name::time("garbage").is_none());
    }
}
