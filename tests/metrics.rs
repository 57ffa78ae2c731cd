//! Prometheus metrics: `/metrics` on the API socket and on
//! `--metrics-listen` (behind its bearer token) parse as the Prometheus
//! text format, and their counters move when I/O, backups, restores, lazy
//! restores and catalog mounts happen. The Grafana dashboard in tools/
//! uses only metrics that exist.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::cloud::*;
use common::*;

/// The body of `GET /metrics` over a stream.
fn get(mut s: impl Read + Write, auth: Option<&str>) -> (u16, String) {
    let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: blockd\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP answer");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Samples by `name{label="value",...}` (labels sorted).
fn scrape(text: &str) -> BTreeMap<String, f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let s = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let mut out = BTreeMap::new();
    for sample in s.samples {
        let mut labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        labels.sort();
        let v = match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(h) => {
                out.insert(
                    format!("{}_count{{{}}}", sample.metric, labels.join(",")),
                    h.iter().map(|b| b.count).fold(0.0, f64::max),
                );
                continue;
            }
            prometheus_parse::Value::Summary(_) => continue,
        };
        out.insert(format!("{}{{{}}}", sample.metric, labels.join(",")), v);
    }
    out
}

fn metrics(d: &Blockd) -> BTreeMap<String, f64> {
    let (status, body) = get(UnixStream::connect(d.api_socket()).unwrap(), None);
    assert_eq!(status, 200, "{body}");
    scrape(&body)
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no {key} in {m:#?}"))
}

#[test]
fn counters_move_with_io_backups_restores_and_mounts() {
    if !need() {
        return;
    }
    let [port] = common::objstores::free_ports::<1>();
    let d = Blockd::start_env(&[
        ("BLOCKD_METRICS_LISTEN", &port.to_string()),
        ("BLOCKD_METRICS_TOKEN", "scrape-token-42"),
    ]);
    d.create("vol1", "64M");
    let before = metrics(&d);
    assert_eq!(
        value(&before, "blockd_volume_size_bytes{volume=\"vol1\"}"),
        64.0 * 1048576.0
    );
    assert_eq!(
        value(
            &before,
            "blockd_nbd_requests_total{op=\"write\",volume=\"vol1\"}"
        ),
        0.0
    );

    qemu_io(&d.uri("vol1"), &["write -P 5 0 1M", "read 0 1M", "flush"]);
    let m = metrics(&d);
    assert!(
        value(
            &m,
            "blockd_nbd_requests_total{op=\"write\",volume=\"vol1\"}"
        ) >= 1.0
    );
    assert_eq!(
        value(&m, "blockd_nbd_bytes_total{op=\"write\",volume=\"vol1\"}"),
        1048576.0
    );
    assert_eq!(
        value(&m, "blockd_nbd_bytes_total{op=\"read\",volume=\"vol1\"}"),
        1048576.0
    );
    assert!(
        value(
            &m,
            "blockd_nbd_requests_total{op=\"flush\",volume=\"vol1\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &m,
            "blockd_nbd_request_seconds_count{op=\"write\",volume=\"vol1\"}"
        ) >= 1.0
    );
    assert_eq!(
        value(&m, "blockd_volume_dirty_bytes{volume=\"vol1\"}"),
        1048576.0
    );
    assert_eq!(
        value(&m, "blockd_volume_tracking_settled{volume=\"vol1\"}"),
        0.0,
        "just written: the map is in use"
    );

    // A snapshot, and a write that copies a frozen extent aside.
    d.ok(&["snapshot", "create", "vol1", "--name", "s"]);
    qemu_io(&d.uri("vol1"), &["write -P 6 0 4k"]);
    let m = metrics(&d);
    assert!(value(&m, "blockd_freeze_pause_seconds_count{}") >= 1.0);
    assert_eq!(value(&m, "blockd_cow_bytes_total{volume=\"vol1\"}"), 4096.0);
    assert_eq!(value(&m, "blockd_snapshots{volume=\"vol1\"}"), 1.0);
    d.ok(&["snapshot", "delete", "vol1@s"]);

    // A backup, a restore and a lazy restore.
    backup(&d, &["vol1"]);
    let r = restore(&d, "vol1", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    d.ok(&[
        "cloudsnap",
        "restore",
        "--snap",
        "vol1",
        "--volume",
        "lazy",
        "--lazy",
    ]);
    qemu_io(&d.uri("lazy"), &["read -P 5 8k 4k"]);
    let m = metrics(&d);
    assert_eq!(
        value(
            &m,
            "blockd_tasks_ended_total{kind=\"backup\",outcome=\"done\"}"
        ),
        1.0
    );
    assert!(
        value(
            &m,
            "blockd_tasks_ended_total{kind=\"restore\",outcome=\"done\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &m,
            "blockd_object_store_requests_total{location=\"local\",op=\"put\"}"
        ) >= 1.0
    );
    assert!(
        value(
            &m,
            "blockd_object_store_bytes_total{location=\"local\",op=\"put\"}"
        ) > 0.0
    );
    assert!(
        value(
            &m,
            "blockd_object_store_requests_total{location=\"local\",op=\"get\"}"
        ) >= 1.0
    );
    assert_eq!(
        value(
            &m,
            "blockd_object_store_errors_total{location=\"local\",op=\"put\"}"
        ),
        0.0
    );
    assert!(value(&m, "blockd_hydrated_bytes_total{}") > 0.0);
    assert_eq!(
        value(&m, "blockd_volume_size_bytes{volume=\"back\"}"),
        64.0 * 1048576.0
    );

    // Garbage collection and a check are counted by outcome.
    d.ok(&["repo", "check"]);
    d.ok(&["repo", "gc"]);
    let m = metrics(&d);
    assert_eq!(
        value(
            &m,
            "blockd_maintenance_runs_total{kind=\"check\",location=\"local\",outcome=\"clean\"}"
        ),
        1.0
    );
    let gc_done = "blockd_maintenance_runs_total{kind=\"gc\",location=\"local\",outcome=\"done\"}";
    let done = value(&m, gc_done);
    assert!(done >= 1.0);
    // A dry run is no run: not counted.
    d.ok(&["repo", "gc", "--dry-run"]);
    assert_eq!(value(&metrics(&d), gc_done), done, "a dry run was counted");

    // A catalog mount, and a read through it.
    if is_root() && Path::new("/dev/fuse").exists() && have("fusermount3") {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cat");
        std::fs::create_dir(&dir).unwrap();
        d.ok(&["mount", dir.to_str().unwrap()]);
        let m = metrics(&d);
        assert_eq!(value(&m, "blockd_catalog_mounts{}"), 1.0);
        let mut f = std::fs::File::open(dir.join("vol1/latest/disk.img")).unwrap();
        let mut buf = vec![0u8; 4096];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(buf, vec![6u8; 4096]);
        drop(f);
        let m = metrics(&d);
        let reads = value(&m, "blockd_chunk_cache_requests_total{result=\"hit\"}")
            + value(&m, "blockd_chunk_cache_requests_total{result=\"miss\"}");
        assert!(reads >= 1.0, "{m:#?}");
        d.ok(&["umount", dir.to_str().unwrap()]);
    } else {
        assert!(!require_all(), "catalog mounts need root and /dev/fuse");
        eprintln!("SKIPPED (part): catalog mount metrics need root and /dev/fuse");
    }

    // Over TCP: only with the token, and the same text.
    let tcp = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(get(tcp(), None).0, 401);
    assert_eq!(get(tcp(), Some("wrong")).0, 401);
    let (status, body) = get(tcp(), Some("scrape-token-42"));
    assert_eq!(status, 200);
    let m = scrape(&body);
    assert!(m.contains_key("blockd_nbd_requests_total{op=\"write\",volume=\"vol1\"}"));
    // No label comes from a request, a task or a snapshot.
    for key in m.keys() {
        for bad in ["task", "snapshot", "offset", "cookie"] {
            assert!(
                !key.contains(&format!("{bad}=")),
                "unbounded label in {key}"
            );
        }
    }
    assert!(!d.log().contains("scrape-token-42"), "the token was logged");
}

/// Every metric a panel of tools/grafana/blockd.json queries exists in a
/// scrape of a daemon that has done some work.
#[test]
fn the_dashboard_queries_metrics_that_exist() {
    let d = Blockd::start();
    d.create("v", "4M");
    if have("qemu-io") {
        qemu_io(&d.uri("v"), &["write 0 64k", "read 0 64k", "flush"]);
        d.ok(&["cloudsnap", "backup", "v", "--wait"]);
    }
    let (status, body) = get(UnixStream::connect(d.api_socket()).unwrap(), None);
    assert_eq!(status, 200);
    // Family names as the text declares them (# TYPE), plus the sample
    // names histograms and counters expand to.
    let mut names = std::collections::BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            names.insert(name.to_string());
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {}
            }
        }
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/grafana/blockd.json"),
        )
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    if k == "expr" {
                        out.push(v.as_str().unwrap().to_string());
                    } else {
                        walk(v, out);
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(exprs.len() >= 8, "a dashboard with {} queries", exprs.len());
    for e in &exprs {
        let used: Vec<&str> = e
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("blockd_"))
            .collect();
        assert!(!used.is_empty(), "query names no blockd metric: {e}");
        for name in used {
            assert!(
                names.contains(name),
                "{name} (in {e}) is not a metric blockd serves"
            );
        }
    }
}

/// Whether the server closed `s` (end of stream or an error) within its
/// read timeout; what it sent before is skipped.
fn closed(s: &mut impl Read) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A TCP connection to `port` on 127.0.0.1 from address `from` (any of
/// 127.0.0.0/8).
fn connect_from(from: &str, port: u16) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt
        .block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(format!("{from}:0").parse().unwrap())?;
            s.connect(([127, 0, 0, 1], port).into()).await
        })
        .unwrap()
        .into_std()
        .unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

/// Clients that connect and then say nothing, half a request, or half a
/// body, over the metrics address or the API socket, are closed within
/// seconds, and a listener holds no more connections than its bound (on
/// the metrics address, no more than 8 from one address): the daemon's
/// descriptors, and with them the NBD sockets and the API, stay open to
/// everyone else, and such clients do not hold up a shutdown.
#[test]
fn slow_http_clients_are_closed_and_bounded() {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let [port] = common::objstores::free_ports::<1>();
    let mut d = Blockd::start_env(&[
        ("BLOCKD_METRICS_LISTEN", &port.to_string()),
        ("BLOCKD_METRICS_TOKEN", "scrape-token-42"),
    ]);
    d.create("vol1", "4M");
    let start = Instant::now();
    let half_head = b"GET /metrics HTTP/1.1\r\nHost: blockd\r\n";
    // The metrics listener's 64 connections, 8 from each of 8 addresses,
    // all sending half a head.
    let mut held: Vec<TcpStream> = (2..10)
        .flat_map(|a| (0..8).map(move |_| a))
        .map(|a| {
            let mut s = connect_from(&format!("127.0.0.{a}"), port);
            s.write_all(half_head).unwrap();
            s
        })
        .collect();
    // More are closed at once: from a new address (all 64 taken), and a
    // ninth from one address.
    for from in ["127.0.0.10", "127.0.0.11", "127.0.0.2"] {
        let mut s = connect_from(from, port);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(half_head);
        assert!(
            closed(&mut s),
            "one more metrics connection from {from} was kept"
        );
    }
    let log = d.log();
    assert!(
        log.contains("metrics listener connection refused: it serves as many connections")
            && log.contains("that address holds 8 connections already"),
        "{log}"
    );
    // On the API socket: half a head, a head and half its body, and a
    // kept-alive connection gone quiet after one answer.
    let mut api_head = UnixStream::connect(d.api_socket()).unwrap();
    api_head.write_all(half_head).unwrap();
    let mut api_body = UnixStream::connect(d.api_socket()).unwrap();
    api_body
        .write_all(
            b"POST /v1/volumes HTTP/1.1\r\nHost: blockd\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":",
        )
        .unwrap();
    let mut api_idle = UnixStream::connect(d.api_socket()).unwrap();
    api_idle
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: blockd\r\n\r\n")
        .unwrap();

    // Meanwhile everyone else is served.
    d.ok(&["volume", "list"]);
    if have("qemu-io") {
        qemu_io(&d.uri("vol1"), &["write -P 7 0 64k", "read -P 7 0 64k"]);
    }

    // Each slow client is closed at the 10 s limits, not before 8 s.
    held[0].timeout(Duration::from_secs(25));
    assert!(
        held[0].closed(),
        "a slow metrics client kept its connection"
    );
    let first = start.elapsed();
    assert!(
        first >= Duration::from_secs(8) && first < Duration::from_secs(25),
        "the first half-sent head was closed after {first:?}"
    );
    for s in held.iter_mut().map(|s| s as &mut dyn ReadTimeout).chain([
        &mut api_head as &mut dyn ReadTimeout,
        &mut api_body,
        &mut api_idle,
    ]) {
        s.timeout(Duration::from_secs(25));
        assert!(s.closed(), "a slow client kept its connection");
    }
    assert!(start.elapsed() < Duration::from_secs(25));
    // And the metrics address serves a scraper again.
    let (status, body) = get(
        TcpStream::connect(("127.0.0.1", port)).unwrap(),
        Some("scrape-token-42"),
    );
    assert_eq!(status, 200, "{body}");
    // A request without the token is answered 401 and its connection
    // closed: it holds no slot past its answer.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: blockd\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 401");
    assert!(closed(&mut s), "a refused scraper kept its connection");

    // Half-sent requests do not hold up a shutdown.
    let mut slow = connect_from("127.0.0.2", port);
    slow.write_all(half_head).unwrap();
    let mut api_slow = UnixStream::connect(d.api_socket()).unwrap();
    api_slow.write_all(half_head).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let stopping = Instant::now();
    assert!(d.terminate().success());
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "blockd took {:?} to stop beside two half-sent requests",
        stopping.elapsed()
    );
    held.clear();
}

/// A stream whose read timeout can be set, and whether it was closed.
trait ReadTimeout {
    fn timeout(&mut self, t: std::time::Duration);
    fn closed(&mut self) -> bool;
}

impl ReadTimeout for std::net::TcpStream {
    fn timeout(&mut self, t: std::time::Duration) {
        self.set_read_timeout(Some(t)).unwrap();
    }
    fn closed(&mut self) -> bool {
        closed(self)
    }
}

impl ReadTimeout for UnixStream {
    fn timeout(&mut self, t: std::time::Duration) {
        self.set_read_timeout(Some(t)).unwrap();
    }
    fn closed(&mut self) -> bool {
        closed(self)
    }
}
