//! Full restore: a snapshot's index blocks, one at a time, into a new
//! volume.
//!
//! For each block the chunks it references are grouped by pack and fetched
//! with ranged GETs (adjacent records coalesced, several GETs in flight);
//! every chunk is opened, decompressed and checked against its id before a
//! byte of it is written. Holes are never written: the new volume is
//! sparse. Each GET, once written, is flushed and recorded (task_blocks
//! key `block << 20 | (fetch + 1)`; a whole block is `block << 20`), so
//! after a crash only the GETs in flight at that moment are fetched again.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::backup::Progress;
use super::CloudError;
use crate::repo::format::{ChunkLoc, Entry, Manifest};
use crate::repo::{pack_key, Repo};
use crate::state::StateDb;
use crate::volume::Volume;

/// Ranged GETs in flight.
const FETCHES: usize = 6;
/// Largest coalesced GET.
const MAX_GET: u64 = 8 << 20;
/// Gap between records still worth fetching in one GET.
const MAX_GAP: u64 = 64 << 10;

/// What a restore needs.
pub struct Job {
    /// Task id.
    pub task: String,
    /// Source.
    pub repo: Arc<Repo>,
    /// The snapshot.
    pub manifest: Manifest,
    /// Target volume (new).
    pub volume: Arc<Volume>,
    /// State database.
    pub db: Arc<StateDb>,
    /// Counters.
    pub progress: Arc<Progress>,
    /// Stop or shutdown.
    pub cancel: CancellationToken,
    /// The task record with current counters.
    pub record: Box<dyn Fn() -> String + Send + Sync>,
}

/// One ranged GET: records of one pack.
struct Fetch {
    pack: [u8; 16],
    start: u64,
    end: u64,
    chunks: Vec<ChunkLoc>,
}

/// Coalesces the chunks of a block into GETs.
fn plan(entries: &[Entry]) -> Vec<Fetch> {
    let mut by_pack: BTreeMap<[u8; 16], BTreeMap<u32, ChunkLoc>> = BTreeMap::new();
    for e in entries {
        by_pack
            .entry(e.chunk.pack)
            .or_default()
            .insert(e.chunk.offset, e.chunk);
    }
    let mut out = Vec::new();
    for (pack, chunks) in by_pack {
        let mut cur: Option<Fetch> = None;
        for c in chunks.into_values() {
            let s = u64::from(c.offset);
            let t = s + u64::from(c.stored_len);
            match &mut cur {
                Some(f) if s >= f.end && s - f.end <= MAX_GAP && t - f.start <= MAX_GET => {
                    f.end = t;
                    f.chunks.push(c);
                }
                _ => {
                    if let Some(f) = cur.take() {
                        out.push(f);
                    }
                    cur = Some(Fetch {
                        pack,
                        start: s,
                        end: t,
                        chunks: vec![c],
                    });
                }
            }
        }
        out.extend(cur);
    }
    out
}

/// Fetches and checks every chunk `entries` reference (coalesced ranged
/// GETs, several in flight); returns chunks and plain bytes checked.
///
/// # Errors
/// The first missing or corrupt object.
pub async fn verify(repo: &Arc<Repo>, entries: &[Entry]) -> Result<(u64, u64), CloudError> {
    let results = futures::stream::iter(plan(entries))
        .map(|f| {
            let repo = repo.clone();
            async move {
                let bytes = repo.get_range(&pack_key(&f.pack), f.start..f.end).await?;
                tokio::task::spawn_blocking(move || {
                    let mut n = 0u64;
                    for c in &f.chunks {
                        let s = usize::try_from(u64::from(c.offset) - f.start).unwrap_or(0);
                        let t = s + c.stored_len as usize;
                        n += repo.open_chunk(c, &bytes[s..t])?.len() as u64;
                    }
                    Ok::<_, CloudError>((f.chunks.len() as u64, n))
                })
                .await
                .map_err(|e| CloudError::Internal(e.to_string()))?
            }
        })
        .buffer_unordered(FETCHES);
    futures::pin_mut!(results);
    let (mut chunks, mut bytes) = (0, 0);
    while let Some(r) = results.next().await {
        let (c, n) = r?;
        chunks += c;
        bytes += n;
    }
    Ok((chunks, bytes))
}

/// Runs a restore.
///
/// # Errors
/// Missing or corrupt objects (named), provider errors, volume I/O,
/// cancellation.
pub async fn run(job: &Job) -> Result<(), CloudError> {
    let repo = &job.repo;
    let span = repo.config.index_span;
    let done: Arc<std::collections::HashSet<u64>> = Arc::new(
        job.db
            .task_blocks(&job.task)?
            .into_iter()
            .map(|(b, _)| b)
            .collect(),
    );
    let snap_id = format!("{}/{}", job.manifest.volume, job.manifest.name);
    let named = |e: CloudError| match e {
        CloudError::Repo(r) => CloudError::Internal(format!("snapshot {snap_id}: {r}")),
        e => e,
    };
    for (b, id) in &job.manifest.blocks {
        if job.cancel.is_cancelled() {
            return Err(CloudError::Cancelled);
        }
        if done.contains(&(b << 20)) {
            continue;
        }
        let entries = Arc::new(repo.get_index(*b, id).await.map_err(|e| named(e.into()))?);
        let base = b * span;
        let fetches = plan(&entries);
        let results = futures::stream::iter(fetches.into_iter().enumerate())
            .filter(|(i, _)| {
                let key = (b << 20) | (*i as u64 + 1);
                std::future::ready(!done.contains(&key))
            })
            .map(|(i, f)| {
                let key = (b << 20) | (i as u64 + 1);
                let db = job.db.clone();
                let task = job.task.clone();
                let record = &job.record;
                let repo = repo.clone();
                let entries = entries.clone();
                let volume = job.volume.clone();
                let progress = job.progress.clone();
                async move {
                    let bytes = repo.get_range(&pack_key(&f.pack), f.start..f.end).await?;
                    Progress::add_pub(&progress.transferred, bytes.len() as u64);
                    let repo2 = repo.clone();
                    // Open and check every chunk before writing any of it.
                    let opened = tokio::task::spawn_blocking(move || {
                        f.chunks
                            .iter()
                            .map(|c| {
                                let s = usize::try_from(u64::from(c.offset) - f.start).unwrap_or(0);
                                let t = s + c.stored_len as usize;
                                repo2.open_chunk(c, &bytes[s..t]).map(|p| (*c, p))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .await
                    .map_err(|e| CloudError::Internal(e.to_string()))??;
                    for (c, plain) in opened {
                        for e in entries
                            .iter()
                            .filter(|e| e.chunk.pack == c.pack && e.chunk.offset == c.offset)
                        {
                            let s = e.chunk_off as usize;
                            let data = plain[s..s + e.len as usize].to_vec();
                            volume
                                .write(base + u64::from(e.start), data, 0, false)
                                .await
                                .map_err(|err| {
                                    CloudError::Internal(format!(
                                        "writing volume {}: {err}",
                                        volume.name()
                                    ))
                                })?;
                            Progress::add_pub(&progress.done, u64::from(e.len));
                        }
                    }
                    volume.flush().await.map_err(|err| {
                        CloudError::Internal(format!("flushing volume {}: {err}", volume.name()))
                    })?;
                    db.checkpoint_task(&task, &[(key, None)], &record())?;
                    Ok::<(), CloudError>(())
                }
            })
            .buffer_unordered(FETCHES);
        futures::pin_mut!(results);
        while let Some(r) = results.next().await {
            r.map_err(named)?;
            if job.cancel.is_cancelled() {
                return Err(CloudError::Cancelled);
            }
        }
        job.volume.flush().await.map_err(|e| {
            CloudError::Internal(format!("flushing volume {}: {e}", job.volume.name()))
        })?;
        job.db
            .checkpoint_task(&job.task, &[(*b, None)], &(job.record)())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_coalesces_adjacent_records() {
        let c = |pack: u8, offset: u32, len: u32| Entry {
            start: offset,
            len,
            chunk_off: 0,
            chunk: ChunkLoc {
                id: [offset.to_le_bytes()[0]; 32],
                pack: [pack; 16],
                offset,
                stored_len: len,
                plain_len: len,
            },
        };
        let p = plan(&[
            c(1, 0, 100),
            c(1, 100, 100),
            c(2, 0, 50),
            c(1, 10_000_000, 10),
        ]);
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].start, p[0].end, p[0].chunks.len()), (0, 200, 2));
        assert_eq!(p[1].start, 10_000_000);
        assert_eq!(p[2].pack, [2; 16]);
    }
}
