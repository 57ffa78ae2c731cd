//! Metrics in the Prometheus text format, served at `/metrics` on the
//! control API and, with `--metrics-listen ADDR:PORT`, over HTTP.
//!
//! Counters are plain atomics where they are counted, so the I/O path pays
//! an atomic add per request and no lock: per volume in [`IoStats`] (held
//! by each [`crate::volume::Volume`]), process-wide in [`STATS`] for
//! events of the cloud side (object-store requests, tasks, freezes, the
//! catalog's chunk cache, garbage collection and checks). A scrape walks
//! the daemon's state through one `prometheus_client` collector
//! ([`Collector`]) and encodes what is there: gauges (sizes, dirty bytes,
//! connections, tasks in progress) are read at that moment.
//!
//! Labels name volumes, locations, operations and outcomes: each bounded
//! by what the operator created or by a fixed list, never by requests,
//! tasks or snapshots. A deleted volume's series end with it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::daemon::Daemon;

/// Upper bounds, in seconds, of the request latency buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    1.0,
];

/// Upper bounds, in seconds, of the freeze pause buckets.
const PAUSE_BUCKETS: [f64; 10] = [
    10e-6, 50e-6, 100e-6, 500e-6, 1e-3, 5e-3, 10e-3, 50e-3, 100e-3, 1.0,
];

/// A histogram of durations with fixed buckets, lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (not cumulative; summed at
    /// encoding), and one more for those above the last.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (sum in seconds, count, buckets with +Inf last): each bucket's own
    /// count, as `prometheus_client` takes them (it sums them up).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            total += n;
            buckets.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, total, buckets)
    }
}

/// NBD request classes with their own counters and latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS.
    Other,
}

const OPS: [(Op, &str); 4] = [
    (Op::Read, "read"),
    (Op::Write, "write"),
    (Op::Flush, "flush"),
    (Op::Other, "other"),
];

/// One class of requests of one volume.
#[derive(Debug)]
struct OpStats {
    requests: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
}

/// A volume's I/O counters.
#[derive(Debug)]
pub struct IoStats {
    ops: [OpStats; 4],
    errors: AtomicU64,
    /// Bytes copied aside for held snapshots before being overwritten.
    cow_bytes: AtomicU64,
}

impl Default for IoStats {
    fn default() -> Self {
        Self {
            ops: std::array::from_fn(|_| OpStats {
                requests: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                latency: Histogram::new(&LATENCY_BUCKETS),
            }),
            errors: AtomicU64::new(0),
            cow_bytes: AtomicU64::new(0),
        }
    }
}

impl IoStats {
    /// Counts a finished request of `bytes` that took `took`.
    pub fn request(&self, op: Op, bytes: u64, took: Duration) {
        let s = &self.ops[op as usize];
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        s.latency.observe(took);
    }

    /// Counts a request answered with an error.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts bytes preserved by copy-on-write.
    pub fn cow(&self, bytes: u64) {
        self.cow_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Process-wide counters of the cloud side.
#[derive(Debug)]
pub struct Stats {
    freeze_pause: Histogram,
    /// (location, operation) → counts.
    store: Mutex<BTreeMap<(String, &'static str), StoreCounts>>,
    /// (kind, outcome) → tasks ended.
    tasks: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// (location, kind: gc|check, outcome) → runs.
    maintenance: Mutex<BTreeMap<(String, &'static str, &'static str), u64>>,
    /// Bytes garbage collection deleted, per location.
    gc_deleted: Mutex<BTreeMap<String, u64>>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    hydrated_bytes: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct StoreCounts {
    requests: u64,
    retries: u64,
    errors: u64,
    bytes: u64,
}

/// The process's counters.
pub static STATS: LazyLock<Stats> = LazyLock::new(|| Stats {
    freeze_pause: Histogram::new(&PAUSE_BUCKETS),
    store: Mutex::default(),
    tasks: Mutex::default(),
    maintenance: Mutex::default(),
    gc_deleted: Mutex::default(),
    cache_hits: AtomicU64::new(0),
    cache_misses: AtomicU64::new(0),
    hydrated_bytes: AtomicU64::new(0),
});

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Stats {
    /// How long a freeze held I/O.
    pub fn freeze(&self, pause: Duration) {
        self.freeze_pause.observe(pause);
    }

    /// One object-store request of `location` ended after `attempts`
    /// attempts, `ok` or not, moving `bytes` (body bytes up or down).
    pub fn store_request(&self, location: &str, op: &'static str, attempts: u32, ok: bool) {
        let mut m = lock(&self.store);
        let c = m.entry((location.to_string(), op)).or_default();
        c.requests += 1;
        c.retries += u64::from(attempts.saturating_sub(1));
        c.errors += u64::from(!ok);
    }

    /// Body bytes an object-store `op` (`put`, `get`) moved.
    pub fn store_bytes(&self, location: &str, op: &'static str, bytes: u64) {
        lock(&self.store)
            .entry((location.to_string(), op))
            .or_default()
            .bytes += bytes;
    }

    /// A backup or restore ended: `kind` backup|restore, `outcome`
    /// done|failed|stopped.
    pub fn task_ended(&self, kind: &'static str, outcome: &'static str) {
        *lock(&self.tasks).entry((kind, outcome)).or_default() += 1;
    }

    /// A gc or check run of `location` ended with `outcome` (for gc:
    /// done|damaged|failed, dry runs not counted; for check:
    /// clean|damaged|failed).
    pub fn maintenance(&self, location: &str, kind: &'static str, outcome: &'static str) {
        *lock(&self.maintenance)
            .entry((location.to_string(), kind, outcome))
            .or_default() += 1;
    }

    /// Garbage collection of `location` deleted `bytes`.
    pub fn gc_deleted(&self, location: &str, bytes: u64) {
        *lock(&self.gc_deleted)
            .entry(location.to_string())
            .or_default() += bytes;
    }

    /// `n` chunks a catalog read found in the chunk cache, or did not.
    pub fn cache(&self, hit: bool, n: u64) {
        let c = if hit {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// A lazy restore fetched `bytes` into its volume.
    pub fn hydrated(&self, bytes: u64) {
        self.hydrated_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The collector a scrape runs: the daemon's state and the counters.
#[derive(Debug)]
pub struct Collector {
    daemon: std::sync::Weak<Daemon>,
}

impl Collector {
    /// A collector of `daemon`'s metrics.
    pub fn new(daemon: &Arc<Daemon>) -> Self {
        Self {
            daemon: Arc::downgrade(daemon),
        }
    }

    /// The metrics as Prometheus text.
    pub fn render(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Encodes one family: `samples` of (labels, value).
fn family<L, V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: Into<f64> + Copy,
{
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v.into()).encode(f)?,
            _ => ConstGauge::new(v.into()).encode(f)?,
        }
    }
    Ok(())
}

/// Encodes one sample without labels (`name 1`, not `name{} 1`).
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(v).encode(m),
    }
}

/// Encodes one histogram without labels.
fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &Histogram,
) -> Result<(), std::fmt::Error> {
    let (sum, count, buckets) = h.snapshot();
    enc.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<Vec<(String, String)>>(sum, count, &buckets, None)
}

/// Encodes a family of histograms.
fn histograms<L: prometheus_client::encoding::EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, (f64, u64, Vec<(f64, u64)>))>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, (sum, count, buckets)) in samples {
        m.encode_family(&labels)?
            .encode_histogram::<Vec<(String, String)>>(sum, count, &buckets, None)?;
    }
    Ok(())
}

type L1 = [(&'static str, String); 1];
type L2 = [(&'static str, String); 2];
type L3 = [(&'static str, String); 3];

fn l1(a: &'static str, x: &str) -> L1 {
    [(a, x.to_string())]
}

fn l2(a: &'static str, x: &str, b: &'static str, y: &str) -> L2 {
    [(a, x.to_string()), (b, y.to_string())]
}

#[allow(clippy::cast_precision_loss)]
fn f(v: u64) -> f64 {
    v as f64
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let Some(d) = self.daemon.upgrade() else {
            return Ok(());
        };
        let volumes = d.store.list();
        let v = &volumes;
        family(
            &mut enc,
            "blockd_volume_size_bytes",
            "Volume size",
            Gauge,
            v.iter().map(|v| (l1("volume", v.name()), f(v.size()))),
        )?;
        family(
            &mut enc,
            "blockd_volume_allocated_bytes",
            "Bytes the volume's file occupies",
            Gauge,
            v.iter().map(|v| (l1("volume", v.name()), f(v.allocated()))),
        )?;
        family(
            &mut enc,
            "blockd_volume_dirty_bytes",
            "Bytes in extents changed since the last backup, in the volume's map",
            Gauge,
            v.iter().map(|v| {
                let c = v.dirty.current();
                let bytes = if c.known {
                    c.extents.len() * v.extent_size()
                } else {
                    v.size()
                };
                (l1("volume", v.name()), f(bytes))
            }),
        )?;
        family(
            &mut enc,
            "blockd_volume_tracking_settled",
            "1 when the volume's change map is settled on disk (a crash now keeps it), 0 while it is written",
            Gauge,
            v.iter()
                .map(|v| (l1("volume", v.name()), f(u64::from(v.dirty.settled())))),
        )?;
        family(
            &mut enc,
            "blockd_nbd_connections",
            "Open NBD connections",
            Gauge,
            v.iter()
                .map(|v| (l1("volume", v.name()), f(v.connections()))),
        )?;
        family(
            &mut enc,
            "blockd_nbd_requests",
            "NBD requests answered",
            Counter,
            v.iter().flat_map(|v| {
                OPS.iter().map(move |(op, n)| {
                    (
                        l2("volume", v.name(), "op", n),
                        f(v.stats.ops[*op as usize].requests.load(Ordering::Relaxed)),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "blockd_nbd_bytes",
            "Bytes read and written over NBD",
            Counter,
            v.iter().flat_map(|v| {
                [(Op::Read, "read"), (Op::Write, "write")]
                    .into_iter()
                    .map(move |(op, n)| {
                        (
                            l2("volume", v.name(), "op", n),
                            f(v.stats.ops[op as usize].bytes.load(Ordering::Relaxed)),
                        )
                    })
            }),
        )?;
        histograms(
            &mut enc,
            "blockd_nbd_request_seconds",
            "Time from an NBD request's arrival to its reply",
            v.iter().flat_map(|v| {
                OPS.iter().map(move |(op, n)| {
                    (
                        l2("volume", v.name(), "op", n),
                        v.stats.ops[*op as usize].latency.snapshot(),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "blockd_nbd_errors",
            "NBD requests answered with an error",
            Counter,
            v.iter().map(|v| {
                (
                    l1("volume", v.name()),
                    f(v.stats.errors.load(Ordering::Relaxed)),
                )
            }),
        )?;
        let memory = &d.nbd.memory;
        single(
            &mut enc,
            "blockd_nbd_memory_bytes",
            "Bytes NBD client connections hold, or have set aside for a request that waits, for requests in flight and replies not yet written (kernel attachments made by blockctl volume attach not counted)",
            Gauge,
            f(memory.held()),
        )?;
        single(
            &mut enc,
            "blockd_nbd_memory_limit_bytes",
            "What NBD client connections may hold together (--nbd-max-memory)",
            Gauge,
            f(memory.limit()),
        )?;
        family(
            &mut enc,
            "blockd_cow_bytes",
            "Bytes copied aside for held snapshots before being overwritten",
            Counter,
            v.iter().map(|v| {
                (
                    l1("volume", v.name()),
                    f(v.stats.cow_bytes.load(Ordering::Relaxed)),
                )
            }),
        )?;

        let snaps = d.snapshots.list(None);
        let mut per_volume: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for s in &snaps {
            let e = per_volume.entry(s.meta().volume).or_default();
            e.0 += 1;
            e.1 += s.cow_bytes();
        }
        family(
            &mut enc,
            "blockd_snapshots",
            "Local snapshots held",
            Gauge,
            per_volume
                .iter()
                .map(|(v, (n, _))| (l1("volume", v), f(*n))),
        )?;
        family(
            &mut enc,
            "blockd_snapshot_cow_held_bytes",
            "Copy-on-write data held by local snapshots",
            Gauge,
            per_volume
                .iter()
                .map(|(v, (_, b))| (l1("volume", v), f(*b))),
        )?;
        histogram(
            &mut enc,
            "blockd_freeze_pause_seconds",
            "How long a freeze held I/O",
            &STATS.freeze_pause,
        )?;

        let tasks = d.cloud.running();
        let mut active: BTreeMap<(&'static str, bool), (u64, u64, u64)> = BTreeMap::new();
        for kind in ["backup", "restore"] {
            for lazy in [false, true] {
                if kind == "restore" || !lazy {
                    active.insert((kind, lazy), (0, 0, 0));
                }
            }
        }
        for t in &tasks {
            let kind = match t.kind {
                blockd_api::TaskKind::Backup => "backup",
                blockd_api::TaskKind::Restore => "restore",
            };
            let e = active.entry((kind, t.lazy)).or_default();
            e.0 += 1;
            e.1 += t.bytes_done;
            e.2 += t.bytes_total;
        }
        let kind_labels = |(k, lazy): &(&'static str, bool)| {
            l2("kind", k, "lazy", if *lazy { "true" } else { "false" })
        };
        family(
            &mut enc,
            "blockd_tasks_active",
            "Backups and restores running",
            Gauge,
            active.iter().map(|(k, v)| (kind_labels(k), f(v.0))),
        )?;
        family(
            &mut enc,
            "blockd_tasks_done_bytes",
            "Bytes done by the running tasks",
            Gauge,
            active.iter().map(|(k, v)| (kind_labels(k), f(v.1))),
        )?;
        family(
            &mut enc,
            "blockd_tasks_total_bytes",
            "Bytes the running tasks have to do in all",
            Gauge,
            active.iter().map(|(k, v)| (kind_labels(k), f(v.2))),
        )?;
        let ended = lock(&STATS.tasks).clone();
        family(
            &mut enc,
            "blockd_tasks_ended",
            "Backups and restores ended, by outcome",
            Counter,
            ended
                .iter()
                .map(|((k, o), n)| (l2("kind", k, "outcome", o), f(*n))),
        )?;

        let store = lock(&STATS.store).clone();
        family(
            &mut enc,
            "blockd_object_store_requests",
            "Object-store requests, each counted once however often it was retried",
            Counter,
            store
                .iter()
                .map(|((l, op), c)| (l2("location", l, "op", op), f(c.requests))),
        )?;
        family(
            &mut enc,
            "blockd_object_store_retries",
            "Object-store request attempts that were retries",
            Counter,
            store
                .iter()
                .map(|((l, op), c)| (l2("location", l, "op", op), f(c.retries))),
        )?;
        family(
            &mut enc,
            "blockd_object_store_errors",
            "Object-store requests that failed for good",
            Counter,
            store
                .iter()
                .map(|((l, op), c)| (l2("location", l, "op", op), f(c.errors))),
        )?;
        family(
            &mut enc,
            "blockd_object_store_bytes",
            "Body bytes uploaded (put) and fetched (get)",
            Counter,
            store
                .iter()
                .filter(|((_, op), _)| matches!(*op, "put" | "get"))
                .map(|((l, op), c)| (l2("location", l, "op", op), f(c.bytes))),
        )?;

        single(
            &mut enc,
            "blockd_catalog_mounts",
            "Catalog mounts served",
            Gauge,
            f(d.mounts.list().len() as u64),
        )?;
        family(
            &mut enc,
            "blockd_chunk_cache_requests",
            "Catalog chunk reads, by whether the chunk cache had them",
            Counter,
            [
                (
                    l1("result", "hit"),
                    f(STATS.cache_hits.load(Ordering::Relaxed)),
                ),
                (
                    l1("result", "miss"),
                    f(STATS.cache_misses.load(Ordering::Relaxed)),
                ),
            ],
        )?;
        single(
            &mut enc,
            "blockd_hydrated_bytes",
            "Bytes lazy restores fetched from object storage",
            Counter,
            f(STATS.hydrated_bytes.load(Ordering::Relaxed)),
        )?;
        let runs: Vec<(L3, f64)> = lock(&STATS.maintenance)
            .iter()
            .map(|((l, k, o), n)| {
                (
                    [
                        ("location", l.clone()),
                        ("kind", (*k).to_string()),
                        ("outcome", (*o).to_string()),
                    ],
                    f(*n),
                )
            })
            .collect();
        family(
            &mut enc,
            "blockd_maintenance_runs",
            "Garbage collection and check runs, by outcome",
            Counter,
            runs,
        )?;
        let deleted = lock(&STATS.gc_deleted).clone();
        family(
            &mut enc,
            "blockd_gc_deleted_bytes",
            "Bytes garbage collection deleted",
            Counter,
            deleted.iter().map(|(l, b)| (l1("location", l), f(*b))),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_per_bucket_with_inf_last() {
        let h = Histogram::new(&LATENCY_BUCKETS);
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(60));
        h.observe(Duration::from_secs(3));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 3.00007).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (25e-6, 1));
        assert_eq!(buckets[1], (50e-6, 0));
        assert_eq!(buckets[2], (100e-6, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 1));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 3);
        // Encoded cumulatively, as Prometheus reads buckets.
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Fixed(h)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("x_bucket{le=\"0.0001\"} 2\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("x_count 3\n"), "{text}");
    }

    #[derive(Debug)]
    struct Fixed(Histogram);

    impl prometheus_client::collector::Collector for Fixed {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            histogram(&mut enc, "x", "test", &self.0)
        }
    }
}
