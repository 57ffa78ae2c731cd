//! libnbd's tools against blockd: nbdinfo (features, map, list) and nbdcopy.

mod common;

use std::process::Command;

use common::*;

#[test]
fn nbdinfo_shows_advertised_features() {
    if !require_tools(&["nbdinfo"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "16M");
    let out = run(Command::new("nbdinfo").arg("--json").arg(d.uri("vol1")));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["TLS"], false);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "vol1");
    assert_eq!(e["export-size"], 16 << 20);
    for (k, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_fast_zero", true),
        ("can_df", true),
        ("can_multi_conn", true),
        ("can_cache", true),
        ("is_rotational", false),
    ] {
        assert_eq!(e[k], want, "{k} in {out}");
    }
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{out}");
    assert_eq!(e["description"], "blockd volume vol1");
}

#[test]
fn nbdinfo_map_follows_writes_and_trims() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "16M");
    let uri = d.uri("vol1");
    qemu_io(
        &uri,
        &[
            "write -P 1 1M 1M",
            "write -P 2 4M 2M",
            "discard 4M 1M",
            "write -z -u 5M 512k",
        ],
    );
    let out = run(Command::new("nbdinfo").arg("--map").arg("--json").arg(&uri));
    let runs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("map json");
    let got: Vec<(u64, u64, bool)> = runs
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["type"].as_u64().unwrap() & 1 == 1,
            )
        })
        .collect();
    let m = 1u64 << 20;
    let want = vec![
        (0, m, true),
        (m, m, false),
        (2 * m, 3 * m + m / 2, true),
        (5 * m + m / 2, m / 2, false),
        (6 * m, 10 * m, true),
    ];
    assert_eq!(got, want, "nbdinfo --map: {out}");

    // A discard inside a data run that was just read and mapped: block
    // status of the discarded range and a read of it say hole (one
    // OFFSET_HOLE chunk), and the rest of the run stays data.
    let out = nbdsh(
        r#"
import sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.pread(4096, 1 << 20) == b"\x01" * 4096
def status(off, n):
    got = []
    h.block_status(n, off, lambda ctx, o, es, err: got.extend(es) or 0)
    return got
assert status(1 << 20, 1 << 20)[1] & 1 == 0, "1M..2M is data"
h.trim(65536, 1088 * 1024)
print("discarded", status(1088 * 1024, 65536)[1] & 1)
print("after", status(1152 * 1024, 65536)[1] & 1)
chunks = []
def chunk(sub, off, kind, err):
    chunks.append(kind)
    return 0
buf = h.pread_structured(65536, 1088 * 1024, chunk)
assert buf == bytes(65536)
print("read", chunks)
"#,
        &[&uri],
    );
    assert!(
        out.contains("discarded 1"),
        "the discarded range is not a hole: {out}"
    );
    assert!(
        out.contains("after 0"),
        "data after the discarded range: {out}"
    );
    assert!(
        out.contains(&format!("read [{}]", 2)),
        "a read of the discarded range is not one hole chunk: {out}"
    );
}

#[test]
fn nbdinfo_list_shows_every_volume() {
    if !require_tools(&["nbdinfo"]) {
        return;
    }
    let d = Blockd::start();
    for n in ["alpha", "beta", "gamma.db"] {
        d.create(n, "1M");
    }
    let uri = format!("nbd+unix:///?socket={}", d.nbd_socket().display());
    let out = run(Command::new("nbdinfo").args(["--list", "--json"]).arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&out).expect("list json");
    let mut names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["alpha", "beta", "gamma.db"]);
}

#[test]
fn nbdcopy_four_connections_round_trip() {
    if !require_tools(&["nbdcopy"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "256M");
    let tmp = tempfile::tempdir_in(d.dir.path()).unwrap();
    let src = tmp.path().join("src.img");
    let back = tmp.path().join("back.img");
    let data = random_bytes(256 << 20, 42);
    std::fs::write(&src, &data).unwrap();
    let uri = d.uri("vol1");
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&src)
        .arg(&uri));
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&uri)
        .arg(&back));
    let got = read_file(&back);
    assert_eq!(got.len(), data.len());
    assert!(
        got == data,
        "256 MiB round trip through nbdcopy is not bit-exact"
    );
}

/// Write-behind, seen from the volume's file: after a FLUSH (a client
/// committing), a small WRITE's pages leave the dirty state shortly after
/// it is answered, so the next FLUSH waits only for the disk's cache
/// flush; a WRITE with no FLUSH before it stays in the page cache as any
/// buffered write (cachestat(2) counts the dirty pages of the file).
#[test]
fn writes_between_flushes_start_their_writeback_early() {
    if !require_tools(&["nbdsh"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "16M");
    let file = d.dir.path().join("volumes/vol1.img");
    let out = nbdsh(
        r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[2], os.O_RDONLY)
def dirty(off):
    rng = (ctypes.c_uint64 * 2)(off, 4096)
    st = (ctypes.c_uint64 * 5)()
    if libc.syscall(451, fd, rng, st, 0) != 0:
        print("SKIPPED: no cachestat(2) in this kernel")
        sys.exit(0)
    return st[1]
def settles(off):
    # The writeback starts once the reply is on the socket: give it a moment.
    for _ in range(200):
        if dirty(off) == 0:
            return 0
        time.sleep(0.005)
    return dirty(off)
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\x01" * 4096, 0)
print("unflushed", settles(0))
h.flush()
h.pwrite(b"\x02" * 4096, 1 << 20)
print("after flush", settles(1 << 20))
h.flush()
for i in range(32):
    h.pwrite(b"\x03" * (64 << 10), (4 << 20) + i * (64 << 10))
print("bulk head", settles(4 << 20))
print("bulk tail", dirty((6 << 20) - 4096))
"#,
        &[&d.uri("vol1"), file.to_str().unwrap()],
    );
    if out.contains("SKIPPED") {
        eprintln!("{out}");
        assert!(
            std::env::var_os("BLOCKD_TEST_REQUIRE_ALL").is_none(),
            "{out}"
        );
        return;
    }
    assert!(
        out.contains("unflushed 1"),
        "a write with no FLUSH before it left the page cache: {out}"
    );
    assert!(
        out.contains("after flush 0"),
        "a write after a FLUSH did not start its writeback: {out}"
    );
    assert!(
        out.contains("bulk head 0") && out.contains("bulk tail 1"),
        "write-behind of the first MiB after a FLUSH, and not of the \
         writes past that budget: {out}"
    );
}
