//! Local snapshots: frozen images that stay exact under overwrites, group
//! consistency under load, crash survival, exec hooks, and an ext4 freeze.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MB: usize = 1 << 20;

fn snap_uri(d: &Blockd, export: &str) -> String {
    d.uri(export)
}

fn inspect(d: &Blockd, snap: &str) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["-j", "snapshot", "inspect", snap])).unwrap()
}

/// Copies an export into a file.
fn export_to_file(uri: &str, path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
    run(Command::new("nbdcopy").arg(uri).arg(path));
}

#[test]
fn frozen_image_stays_exact_and_cow_goes_with_the_snapshot() {
    if !require_tools(&["qemu-io", "qemu-img", "nbdsh", "nbdcopy"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "32M");
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("orig.img");
    let data = random_bytes(32 * MB, 11);
    std::fs::write(&original, &data).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&original)
        .arg(d.uri("vol1")));

    let out = d.ok(&["snapshot", "create", "vol1", "--name", "s1"]);
    assert!(out.contains("Snapshot vol1@s1 created"), "{out}");
    let frozen = tmp.path().join("frozen.img");
    export_to_file(&snap_uri(&d, "vol1@s1"), &frozen);
    assert!(
        read_file(&frozen) == data,
        "snapshot export differs from the data at freeze time"
    );

    // Overwrite the whole volume, trim and zero parts of it.
    qemu_io(
        &d.uri("vol1"),
        &["write -P 0x99 0 32M", "discard 0 1M", "write -z 2M 1M"],
    );
    let after = tmp.path().join("after.img");
    export_to_file(&snap_uri(&d, "vol1@s1"), &after);
    assert!(
        read_file(&after) == data,
        "frozen image changed after the volume was overwritten"
    );
    assert_eq!(
        inspect(&d, "vol1@s1")["cow_bytes"],
        32 * MB,
        "every extent should be preserved once"
    );
    qemu_io(&d.uri("vol1"), &["read -P 0 0 1M", "read -P 0x99 1M 1M"]);

    // Writes to the snapshot export are refused with EPERM.
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.is_read_only()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 4096, 0)
    raise SystemExit("write to a snapshot succeeded")
except nbd.Error as e:
    assert e.errno == "EPERM", e
try:
    h.trim(4096, 0)
    raise SystemExit("trim on a snapshot succeeded")
except nbd.Error as e:
    assert e.errno == "EPERM", e
print("ok")
"#;
    assert!(nbdsh(script, &[&snap_uri(&d, "vol1@s1")]).contains("ok"));

    // Delete: the COW data is gone from disk, the export too.
    let cow_dir = d.dir.path().join("snapshots/vol1/s1");
    assert!(cow_dir.join("cow.data").exists());
    d.ok(&["snapshot", "delete", "vol1@s1"]);
    assert!(!cow_dir.exists(), "COW data left on disk after delete");
    let out = d.blockctl(&["snapshot", "inspect", "vol1@s1"]);
    assert!(!out.status.success());
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 512"])
        .arg(snap_uri(&d, "vol1@s1"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "deleted snapshot still exported");

    // The COW area is kept for the volume's next snapshot, which takes it
    // over: what it held (the first frozen image) is never read as part
    // of the new one.
    let vol_dir = d.dir.path().join("snapshots/vol1");
    let spare = vol_dir.join(".cow.spare");
    let len = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).ok();
    assert_eq!(len(&spare), Some(32 * MB as u64), "COW area not kept");
    // `volume inspect` shows it (what it takes on disk).
    let kept = |d: &Blockd| {
        serde_json::from_str::<serde_json::Value>(&d.ok(&["-j", "volume", "inspect", "vol1"]))
            .unwrap()["kept_cow_bytes"]
            .as_u64()
    };
    assert!(kept(&d).unwrap() > 0, "the kept area is not shown");
    assert!(d
        .ok(&["volume", "inspect", "vol1"])
        .contains("Kept COW area"));
    d.ok(&["snapshot", "create", "vol1", "--name", "s2"]);
    assert_eq!(kept(&d), Some(0), "shown after the next snapshot took it");
    assert!(
        !spare.exists(),
        "the next snapshot did not take the kept area"
    );
    assert_eq!(len(&vol_dir.join("s2/cow.data")), Some(32 * MB as u64));
    let mut image2 = vec![0x99u8; 32 * MB];
    image2[..MB].fill(0);
    image2[2 * MB..3 * MB].fill(0);
    qemu_io(
        &d.uri("vol1"),
        &["write -P 0x42 4M 3M", "write -P 0x43 20M 64k"],
    );
    let frozen2 = tmp.path().join("frozen2.img");
    export_to_file(&snap_uri(&d, "vol1@s2"), &frozen2);
    assert!(
        read_file(&frozen2) == image2,
        "second frozen image differs from the volume at its freeze"
    );
    assert_eq!(inspect(&d, "vol1@s2")["cow_bytes"], 3 * MB + 64 * 1024);
    // Only a regular file is taken: a link planted in its place is not
    // followed, and the snapshot gets a new area of its own.
    d.ok(&["snapshot", "delete", "vol1@s2"]);
    assert!(spare.exists());
    let kept = vol_dir.join("kept.area");
    std::fs::rename(&spare, &kept).unwrap();
    let target = tmp.path().join("elsewhere");
    std::fs::write(&target, b"not blockd's").unwrap();
    std::os::unix::fs::symlink(&target, &spare).unwrap();
    d.ok(&["snapshot", "create", "vol1", "--name", "s3"]);
    qemu_io(&d.uri("vol1"), &["write -P 0x44 0 1M"]);
    assert_eq!(std::fs::read(&target).unwrap(), b"not blockd's");
    assert!(!vol_dir.join("s3/cow.data").is_symlink());
    assert_eq!(inspect(&d, "vol1@s3")["cow_bytes"], MB);
    d.ok(&["snapshot", "delete", "vol1@s3"]);
    std::fs::remove_file(&spare).unwrap();
    std::fs::rename(&kept, &spare).unwrap();
    // Deleting the volume frees the area with the rest.
    d.ok(&["volume", "delete", "vol1"]);
    assert!(
        !vol_dir.exists(),
        "snapshot files left after the volume's delete"
    );
}

/// A snapshot export maps its holes (`base:allocation`), so `nbdcopy`
/// and `qemu-img convert` skip what the frozen image never held, and a
/// range trimmed or written on the live volume since the freeze is data
/// of the image, as it holds. A read of length 0 gets an empty success on
/// a snapshot as on a volume, and the connection goes on.
#[test]
fn snapshot_exports_map_their_holes_and_answer_empty_reads() {
    if !require_tools(&["qemu-io", "nbdsh", "nbdcopy"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "8M");
    qemu_io(
        &d.uri("vol1"),
        &["write -P 0x11 0 1M", "write -P 0x22 4M 1M"],
    );
    d.ok(&["snapshot", "create", "vol1", "--name", "s1"]);
    // After the freeze: a trimmed data range (now a hole of the live
    // file), a hole written over, and part of a data range overwritten.
    qemu_io(
        &d.uri("vol1"),
        &[
            "discard 0 1M",
            "write -P 0x33 6M 1M",
            "write -P 0x44 4M 64k",
        ],
    );
    let map = r#"
import sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
got = []
h.block_status(h.get_size(), 0, lambda ctx, o, es, err: got.extend(es) or 0)
runs = []
for n, flags in zip(got[0::2], got[1::2]):
    kind = "hole" if flags & 1 else "data"
    if runs and runs[-1][1] == kind:
        runs[-1][0] += n
    else:
        runs.append([n, kind])
print(" ".join("%d:%s" % (n >> 20, k) for n, k in runs))
h.set_strict_mode(0)
assert h.pread(0, 4096) == b"", "empty read"
print("then", h.pread(4096, 4 << 20)[:1].hex())
"#;
    let out = nbdsh(map, &[&snap_uri(&d, "vol1@s1")]);
    assert!(
        out.contains("1:data 3:hole 1:data 1:hole 1:data 1:hole"),
        "frozen image map: {out}"
    );
    assert!(out.contains("then 22"), "after an empty read: {out}");
    let out = nbdsh(map, &[&d.uri("vol1")]);
    assert!(out.contains("then 44"), "after an empty read: {out}");

    // nbdcopy trusts the map: the copy is the image at the freeze.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("frozen.img");
    export_to_file(&snap_uri(&d, "vol1@s1"), &copy);
    let mut want = vec![0u8; 8 * MB];
    want[..MB].fill(0x11);
    want[4 * MB..5 * MB].fill(0x22);
    assert!(read_file(&copy) == want, "nbdcopy of the snapshot differs");
}

/// Many small writes in flight at once, each to its own extent (the
/// protocol leaves the order of overlapping in-flight writes open), some
/// unaligned and shorter than an extent. Reads the volume first and
/// leaves what it must hold afterwards in the file `argv[5]`.
const SCATTER: &str = r#"
import nbd, random, sys
uri, seed, first, last, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
h = nbd.NBD(); h.connect_uri(uri)
size = h.get_size()
image = bytearray(h.pread(size, 0))
order = list(range(size // 4096))
random.Random(7).shuffle(order)
rng = random.Random(seed)
writes = []
for e in order[first:last]:
    off = e * 4096
    n = 4096
    if rng.random() < 0.25:
        skip = rng.randrange(1, 7) * 512
        off, n = off + skip, 4096 - skip - rng.randrange(0, 2) * 512
    data = rng.randbytes(n)
    image[off:off + n] = data
    writes.append((nbd.Buffer.from_bytearray(bytearray(data)), off))
# Everything prepared first, so the requests go out back to back.
pending = []
for buf, off in writes:
    pending.append((buf, h.aio_pwrite(buf, off)))
    while h.aio_in_flight() >= 64:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
for _, cookie in pending:
    h.aio_command_completed(cookie)
open(out, "wb").write(image)
print(len(pending))
"#;

#[test]
fn frozen_images_stay_exact_under_many_small_writes_in_flight() {
    if !require_tools(&["nbdsh", "nbdcopy"]) {
        return;
    }
    // With a snapshot held, small writes are gathered and their copies
    // made together; two snapshots that need different extents copied
    // take the path where each image keeps only its own.
    let d = Blockd::start();
    d.create("vol1", "16M");
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.img");
    std::fs::write(&a, random_bytes(16 * MB, 5)).unwrap();
    run(Command::new("nbdcopy").arg(&a).arg(d.uri("vol1")));
    d.ok(&["snapshot", "create", "vol1", "--name", "s1"]);
    let b = tmp.path().join("b.img");
    let uri = d.uri("vol1");
    let path = |p: &std::path::Path| p.display().to_string();
    nbdsh(SCATTER, &[&uri, "1", "0", "2048", &path(&b)]);
    d.ok(&["snapshot", "create", "vol1", "--name", "s2"]);
    let c = tmp.path().join("c.img");
    nbdsh(SCATTER, &[&uri, "2", "1024", "4096", &path(&c)]);
    for (export, want) in [("vol1@s1", &a), ("vol1@s2", &b), ("vol1", &c)] {
        let got = tmp.path().join("got.img");
        export_to_file(&snap_uri(&d, export), &got);
        assert!(
            read_file(&got) == read_file(want),
            "{export} differs from what it must hold"
        );
    }
    // s1 kept every extent once; s2 the 3072 written after it.
    assert_eq!(inspect(&d, "vol1@s1")["cow_bytes"], 16 * MB);
    assert_eq!(inspect(&d, "vol1@s2")["cow_bytes"], 3072 * 4096);
}

/// Writes a fresh 4 KiB block and FLUSHes, over and over on two
/// connections, until the stop file appears; any failed request ends it
/// with the error. Prints the number of flushes.
const FLUSHER: &str = r#"
import nbd, os, random, sys, threading
uri, stop = sys.argv[1], sys.argv[2]
failed = []
counts = []
def run(seed):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    n = 0
    while not os.path.exists(stop) and not failed:
        try:
            h.pwrite(rng.randbytes(4096), rng.randrange(size // 4096) * 4096)
            h.flush()
        except nbd.Error as e:
            failed.append("write or flush %d: %s" % (n, e))
            return
        n += 1
    counts.append(n)
ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
for t in ts: t.start()
for t in ts: t.join()
if failed:
    raise SystemExit(failed[0])
print(sum(counts))
"#;

/// A FLUSH syncs the copy-on-write files of the snapshots it finds held;
/// one deleted (or released by a backup) at that moment has its files
/// removed under it. The client's FLUSH must not fail for that (it did,
/// with EIO, and PostgreSQL stopped with a PANIC): the snapshot needs
/// nothing durable any more. The writes between the flushes make copies
/// while the snapshots come and go.
#[test]
fn flushes_racing_snapshot_deletes_never_fail() {
    if !require_tools(&["nbdsh"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "64M");
    let tmp = tempfile::tempdir().unwrap();
    let stop = tmp.path().join("stop");
    let script = tmp.path().join("flusher.py");
    std::fs::write(&script, FLUSHER).unwrap();
    let mut writer = nbdsh_command()
        .arg("-c")
        .arg(format!(
            "import sys; sys.argv = ['flusher.py', {:?}, {:?}]; exec(open({:?}).read())",
            d.uri("vol1"),
            stop.display().to_string(),
            script.display().to_string()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for round in 0..150 {
        let name = format!("s{round}");
        d.ok(&["snapshot", "create", "vol1", "--name", &name]);
        std::thread::sleep(Duration::from_millis(5));
        d.ok(&["snapshot", "delete", &format!("vol1@{name}")]);
        if let Ok(Some(_)) = writer.try_wait() {
            break;
        }
    }
    // A backup releases its snapshot the same way when it ends.
    for _ in 0..10 {
        if let Ok(Some(_)) = writer.try_wait() {
            break;
        }
        common::cloud::backup(&d, &["vol1", "--cred-id", "local"]);
    }
    std::fs::write(&stop, b"").unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "a WRITE or FLUSH failed while snapshots came and went: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
            .lines()
            .filter(|l| l.contains("I/O error"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let flushes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(flushes > 0, "no flush ran");
}

const WRITER: &str = r#"
import nbd, os, struct, sys, time
a, b, stop = sys.argv[1], sys.argv[2], sys.argv[3]
ha = nbd.NBD(); ha.connect_uri(a)
hb = nbd.NBD(); hb.connect_uri(b)
n = 0
while not os.path.exists(stop):
    n += 1
    rec = struct.pack("<Q", n)
    ha.pwrite(rec, n * 8)   # A first, acknowledged,
    hb.pwrite(rec, n * 8)   # then B.
print(n)
"#;

const CHECK: &str = r#"
import nbd, struct, sys
sock, names = sys.argv[1], sys.argv[2:]
def last(export):
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///%s?socket=%s" % (export, sock))
    data = h.pread(h.get_size(), 0)
    n = 0
    # Records are appended in order: the last is the highest index set.
    for i in range(1, len(data) // 8):
        v = struct.unpack_from("<Q", data, i * 8)[0]
        if v == 0:
            break
        if v != i:
            raise SystemExit("%s: record %d holds %d" % (export, i, v))
        n = v
    h.shutdown()
    return n
for s in names:
    la, lb = last("a@" + s), last("b@" + s)
    if not (lb <= la <= lb + 1):
        raise SystemExit("snapshot %s is not consistent: A=%d B=%d" % (s, la, lb))
    print(s, la, lb)
"#;

#[test]
fn group_snapshots_are_consistent_under_load() {
    if !require_tools(&["nbdsh"]) {
        return;
    }
    let d = Blockd::start();
    d.create("a", "8M");
    d.create("b", "8M");
    let tmp = tempfile::tempdir().unwrap();
    let writer_py = tmp.path().join("writer.py");
    std::fs::write(&writer_py, WRITER).unwrap();
    let stop = tmp.path().join("stop");
    let writer = nbdsh_command()
        .arg("-c")
        .arg(format!(
            "import sys; sys.argv = ['w', {:?}, {:?}, {:?}]; exec(open({:?}).read())",
            d.uri("a"),
            d.uri("b"),
            stop.display().to_string(),
            writer_py.display().to_string()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut names = Vec::new();
    for i in 0..60 {
        let name = format!("g{i:03}");
        d.ok(&["snapshot", "create", "a", "b", "--name", &name]);
        names.push(name);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(&stop, "").unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success());
    let written: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let mut args = vec![d.nbd_socket().display().to_string()];
    args.extend(names.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = nbdsh(CHECK, &args);
    // The freezes happened under load: the frozen sequences move forward.
    let lasts: Vec<u64> = report
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(lasts.len(), 60);
    assert!(
        lasts.windows(2).all(|w| w[0] <= w[1]),
        "frozen points not monotonic: {report}"
    );
    assert!(
        lasts[59] > lasts[0],
        "no writes landed between freezes: {report}"
    );
    assert!(written >= lasts[59]);
    let group: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "snapshot", "list", "a"])).unwrap();
    assert_eq!(group.as_array().unwrap().len(), 60);
    assert_eq!(group[0]["group"], "g000");
}

/// Writes 1 MiB at a time at queue depth 1, write `n` to slot `n % 8`
/// and every 8-byte record of it holding `n`, until the stop file
/// appears; after each acknowledgement the file `acked` names the last.
const LARGE_WRITER: &str = r#"
import nbd, os, struct, sys
uri, stop, acked = sys.argv[1], sys.argv[2], sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)
n = 0
while not os.path.exists(stop):
    n += 1
    h.pwrite(struct.pack("<Q", n) * 131072, (n % 8) << 20)
    with open(acked + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(acked + ".tmp", acked)
print(n)
"#;

/// Checks snapshots `NAME:A:B` of volume v, taken when the last
/// acknowledged write was at least A before and at most B after: each slot
/// holds its last write acknowledged by A, or writes to it that came
/// later but not after B + 1 (the one in flight), and at most two of them.
const LARGE_CHECK: &str = r#"
import array, nbd, sys
sock, snaps = sys.argv[1], sys.argv[2:]
for spec in snaps:
    name, a, b = spec.split(":")
    a, b = int(a), int(b)
    h = nbd.NBD()
    h.connect_uri("nbd+unix:///v@%s?socket=%s" % (name, sock))
    for k in range(8):
        seen = set(array.array("Q", h.pread(1 << 20, k << 20)))
        acked = [n for n in range(1, a + 1) if n % 8 == k]
        floor = acked[-1] if acked else 0
        for v in seen:
            if v == 0 and floor == 0:
                continue
            if v % 8 != k or not floor <= v <= b + 1:
                raise SystemExit("%s slot %d holds write %d (acknowledged by then: %d, last possible: %d)" % (name, k, v, floor, b + 1))
        if len(seen) > 2:
            raise SystemExit("%s slot %d mixes writes %s" % (name, k, sorted(seen)))
    h.shutdown()
    print(name, a, b)
"#;

/// Large writes go from the socket into the volume a step at a time as
/// they arrive, each step under the gate a freeze takes. Frozen images
/// taken while 1 MiB writes stream hold every write acknowledged before
/// the freeze, nothing written after it, and of the write in flight only
/// its old or new bytes.
#[test]
fn frozen_images_taken_while_large_writes_stream_hold_every_acknowledged_write() {
    if !require_tools(&["nbdsh"]) {
        return;
    }
    let d = Blockd::start();
    d.create("v", "8M");
    let tmp = tempfile::tempdir().unwrap();
    let writer_py = tmp.path().join("writer.py");
    std::fs::write(&writer_py, LARGE_WRITER).unwrap();
    let stop = tmp.path().join("stop");
    let acked = tmp.path().join("acked");
    let writer = nbdsh_command()
        .arg("-c")
        .arg(format!(
            "import sys; sys.argv = ['w', {:?}, {:?}, {:?}]; exec(open({:?}).read())",
            d.uri("v"),
            stop.display().to_string(),
            acked.display().to_string(),
            writer_py.display().to_string()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let last = || -> u64 {
        std::fs::read_to_string(&acked)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while last() < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never got going"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut specs = Vec::new();
    for i in 0..20 {
        let name = format!("s{i:02}");
        let a = last();
        d.ok(&["snapshot", "create", "v", "--name", &name]);
        let b = last();
        specs.push(format!("{name}:{a}:{b}"));
        std::thread::sleep(Duration::from_millis(15));
    }
    std::fs::write(&stop, "").unwrap();
    let out = writer.wait_with_output().unwrap();
    assert!(out.status.success(), "the writer failed");
    let written: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let first: u64 = specs[0].rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        written > first + 8,
        "too few writes after the first freeze: {written}"
    );
    let mut args = vec![d.nbd_socket().display().to_string()];
    args.extend(specs.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = nbdsh(LARGE_CHECK, &args);
    assert_eq!(report.lines().count(), 20, "{report}");
}

#[test]
fn held_snapshot_survives_kill_9() {
    if !require_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("vol1", "16M");
    let tmp = tempfile::tempdir().unwrap();
    qemu_io(&d.uri("vol1"), &["write -P 0x11 0 16M"]);
    d.ok(&["snapshot", "create", "vol1", "--name", "keep"]);
    let frozen = tmp.path().join("frozen.img");
    export_to_file(&snap_uri(&d, "vol1@keep"), &frozen);
    let want = read_file(&frozen);
    assert!(want.iter().all(|&b| b == 0x11));
    // Overwrites after the freeze, partly FUA, then a crash.
    qemu_io(
        &d.uri("vol1"),
        &[
            "write -P 0x22 0 4M",
            "write -f -P 0x23 8M 64k",
            "discard 12M 1M",
        ],
    );
    d.kill9();
    d.spawn();
    let after = tmp.path().join("after.img");
    export_to_file(&snap_uri(&d, "vol1@keep"), &after);
    assert!(
        read_file(&after) == want,
        "frozen image changed across kill -9"
    );
    qemu_io(
        &d.uri("vol1"),
        &[
            "read -P 0x22 0 4M",
            "read -P 0x23 8M 64k",
            "read -P 0 12M 1M",
        ],
    );
    // The active map covers every write since the freeze (tracking was
    // lost in the crash, so it covers everything).
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "inspect", "vol1"])).unwrap();
    assert_eq!(v["tracking_known"], false);
    // And the snapshot keeps being protected after restart.
    qemu_io(&d.uri("vol1"), &["write -P 0x33 14M 2M"]);
    export_to_file(&snap_uri(&d, "vol1@keep"), &after);
    assert!(
        read_file(&after) == want,
        "frozen image changed after restart"
    );
}

/// A delete renames the snapshot's directory out of the way before it
/// empties it, so a crash midway leaves nothing that looks like a
/// snapshot: the next start sweeps the rest and starts. (Emptied in
/// place, a half-deleted snapshot stopped the next start, or came back.)
#[test]
fn a_crash_midway_through_a_delete_leaves_no_half_snapshot() {
    if !require_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("vol1", "8M");
    qemu_io(&d.uri("vol1"), &["write -P 0x11 0 8M"]);
    for n in ["a", "b", "c"] {
        d.ok(&["snapshot", "create", "vol1", "--name", n]);
    }
    qemu_io(&d.uri("vol1"), &["write -P 0x22 0 1M"]);
    let dir = d.dir.path().join("snapshots/vol1");
    let entries = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    d.ok(&["snapshot", "delete", "vol1@a"]);
    assert_eq!(
        entries(&dir),
        [".cow.spare", "b", "c"],
        "a delete leaves nothing behind but the COW area it hands on"
    );
    // The crash: "b" was renamed and partly emptied when blockd died.
    d.kill9();
    let removed = dir.join(".removed.b.4242.0");
    std::fs::rename(dir.join("b"), &removed).unwrap();
    std::fs::remove_file(removed.join("cow.index")).unwrap();
    std::fs::remove_file(removed.join("changes.dirty")).unwrap();
    assert!(removed.join("meta.json").exists());
    d.spawn();
    let l: serde_json::Value = serde_json::from_str(&d.ok(&["-j", "snapshot", "list"])).unwrap();
    let listed: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["export"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["vol1@c"], "{l}");
    assert_eq!(
        entries(&dir),
        [".cow.spare", "c"],
        "what was left of b is swept"
    );
    // The name is free again, and the snapshot still held is intact.
    d.ok(&["snapshot", "create", "vol1", "--name", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let frozen = tmp.path().join("c.img");
    export_to_file(&snap_uri(&d, "vol1@c"), &frozen);
    assert!(read_file(&frozen).iter().all(|&b| b == 0x11));
    // Deletes of one snapshot racing creates of its name: one delete
    // wins, and every create that succeeds leaves a whole snapshot.
    let outs = at_once(8, |i| match i % 2 {
        0 => d.blockctl(&["snapshot", "delete", "vol1@b"]),
        _ => d.blockctl(&["snapshot", "create", "vol1", "--name", "b"]),
    });
    let won = |k: usize| {
        outs.iter()
            .enumerate()
            .filter(|(i, o)| i % 2 == k && o.status.success())
            .count()
    };
    let (deleted, created) = (won(0), won(1));
    assert!((1..=4).contains(&deleted), "{outs:?}");
    assert!(
        created <= deleted,
        "a create can only follow a delete: {outs:?}"
    );
    let held = usize::from(dir.join("b").exists());
    assert_eq!(held, 1 + created - deleted, "{outs:?}");
    assert!(
        entries(&dir)
            .iter()
            .all(|n| n == "b" || n == "c" || n == ".cow.spare"),
        "nothing half-deleted is left: {:?}",
        entries(&dir)
    );
    d.kill9();
    d.spawn();
    let l: serde_json::Value = serde_json::from_str(&d.ok(&["-j", "snapshot", "list"])).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 1 + held, "{l}");
}

#[test]
fn exec_hooks_success_failure_timeout() {
    let d = Blockd::start();
    d.create("vol1", "4M");
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("post-ran");
    let m = marker.display().to_string();

    // Success: outputs recorded with the snapshot.
    d.ok(&[
        "snapshot",
        "create",
        "vol1",
        "--name",
        "ok",
        "--pre-exec",
        "echo frozen-now",
        "--post-exec",
        &format!("echo thawed; touch {m}"),
    ]);
    let s = inspect(&d, "vol1@ok");
    assert_eq!(s["pre_exec"]["exit_code"], 0);
    assert!(s["pre_exec"]["output"]
        .as_str()
        .unwrap()
        .contains("frozen-now"));
    assert!(s["post_exec"]["output"]
        .as_str()
        .unwrap()
        .contains("thawed"));
    assert!(marker.exists());
    std::fs::remove_file(&marker).unwrap();

    // A failing post-exec: the snapshot is kept (I/O had resumed), and
    // the command fails, saying how the hook ended.
    let out = d.blockctl(&[
        "snapshot",
        "create",
        "vol1",
        "--name",
        "post-failed",
        "--post-exec",
        "echo still-frozen >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exited with status 3")
            && err.contains("still-frozen")
            && err.contains("snapshot was taken and is kept"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("vol1@post-failed created"));
    d.ok(&["snapshot", "delete", "vol1@post-failed"]);

    // Failure: aborted, nothing created, post-exec still ran.
    let out = d.blockctl(&[
        "snapshot",
        "create",
        "vol1",
        "--name",
        "bad",
        "--pre-exec",
        "echo cannot-freeze >&2; exit 4",
        "--post-exec",
        &format!("touch {m}"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exited with status 4") && err.contains("cannot-freeze"),
        "{err}"
    );
    assert!(
        marker.exists(),
        "post-exec must run after a failed pre-exec"
    );
    assert!(!d
        .blockctl(&["snapshot", "inspect", "vol1@bad"])
        .status
        .success());
    std::fs::remove_file(&marker).unwrap();

    // Timeout: killed, aborted, post-exec still ran.
    let t = std::time::Instant::now();
    let out = d.blockctl(&[
        "snapshot",
        "create",
        "vol1",
        "--name",
        "slow",
        "--pre-exec",
        "sleep 30",
        "--post-exec",
        &format!("touch {m}"),
        "--exec-timeout",
        "1s",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(marker.exists());
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["-j", "snapshot", "list"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "only the successful snapshot exists"
    );

    // A volume with snapshots is not deleted by accident.
    let out = d.blockctl(&["volume", "delete", "vol1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has 1 snapshot(s)"));
    assert!(d.ok(&["snapshot", "list", "vol1"]).contains("vol1@ok"));

    // Bad input: unknown volume, duplicate name, bad name, bad reference.
    for (args, needle) in [
        (vec!["snapshot", "create", "ghost"], "not found"),
        (
            vec!["snapshot", "create", "vol1", "--name", "ok"],
            "already has a snapshot",
        ),
        (
            vec!["snapshot", "create", "vol1", "--name", "a/b"],
            "may contain only",
        ),
        (vec!["snapshot", "inspect", "vol1"], "VOLUME@SNAPSHOT"),
        (
            vec!["snapshot", "create", "vol1", "--exec-timeout", "soon"],
            "invalid duration",
        ),
        (
            vec!["snapshot", "create", "vol1", "--exec-timeout", "0s"],
            "at least 1s",
        ),
    ] {
        let out = d.blockctl(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    d.ok(&["volume", "delete", "vol1", "--force"]);
    assert!(
        !d.dir.path().join("snapshots/vol1").exists(),
        "snapshots of a deleted volume left on disk"
    );
}

/// One write without a flush: its COW copy stays in the page cache only
/// (libnbd's shutdown sends no FLUSH).
const UNSYNCED_WRITE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(bytes([0x22]) * 65536, 0)
h.shutdown()
"#;

/// The post-exec undoes what the pre-exec did (`fsfreeze -f`), so it runs
/// even when the freeze between them is cut short: by a client that goes
/// away (the snapshot or backup is still taken), or by blockd dying (it
/// runs at the next start, once, and no snapshot is left).
#[test]
fn post_exec_runs_when_the_client_leaves_or_blockd_dies_between_the_hooks() {
    let mut d = Blockd::start();
    d.create("vol1", "4M");
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("pre");
    let post = tmp.path().join("post");
    let wait_for = |p: &std::path::Path| {
        (0..300).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            p.exists()
        })
    };
    let hooked = |d: &Blockd, args: &[&str], pause: &str| {
        Command::new(bin("blockctl"))
            .arg("--socket")
            .arg(d.api_socket())
            .args(args)
            .arg("--pre-exec")
            .arg(format!(
                "touch {p}; sleep {pause}; touch {p}.done",
                p = pre.display()
            ))
            .arg("--post-exec")
            // Whether it ran after the pre-exec had ended.
            .arg(format!(
                "if [ -e {p}.done ]; then echo after; else echo before; fi >{q}.tmp; mv {q}.tmp {q}",
                p = pre.display(),
                q = post.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let create = |d: &Blockd, name: &str, pause: &str| {
        hooked(d, &["snapshot", "create", "vol1", "--name", name], pause)
    };
    let reset = || {
        for f in [pre.clone(), post.clone(), tmp.path().join("pre.done")] {
            let _ = std::fs::remove_file(f);
        }
    };

    // The client is killed while the pre-exec runs: the post-exec still
    // runs, after the pre-exec.
    let client_leaves = |mut client: std::process::Child| {
        assert!(wait_for(&pre), "pre-exec did not start");
        client.kill().unwrap();
        client.wait().unwrap();
        assert!(
            wait_for(&post),
            "post-exec did not run after the client left"
        );
        assert_eq!(std::fs::read_to_string(&post).unwrap(), "after\n");
    };
    client_leaves(create(&d, "left", "1"));
    d.ok(&["snapshot", "inspect", "vol1@left"]);

    // The same for a backup's freeze: the backup goes on too.
    reset();
    client_leaves(hooked(&d, &["cloudsnap", "backup", "vol1"], "1"));
    let backed_up = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        let list = d.ok(&["-j", "cloudsnap", "list", "--src", "vol1"]);
        serde_json::from_str::<serde_json::Value>(&list).unwrap()[0]["volume"] == "vol1"
    });
    assert!(backed_up, "the backup did not go on after its client left");

    // blockd is killed while the pre-exec runs; it starts again before
    // the pre-exec has ended.
    reset();
    let mut client = create(&d, "cut", "3");
    assert!(wait_for(&pre), "pre-exec did not start");
    d.kill9();
    assert!(!client.wait().unwrap().success());
    assert!(!post.exists(), "post-exec ran though blockd was killed");
    d.spawn();
    assert!(
        wait_for(&post),
        "the owed post-exec did not run at start:\n{}",
        d.log()
    );
    assert_eq!(
        std::fs::read_to_string(&post).unwrap(),
        "after\n",
        "the owed post-exec ran before the pre-exec had ended"
    );
    // The warning is logged once the hook has exited, which may be a
    // moment after it wrote its file.
    assert!(
        (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            d.log().contains("the post-exec ran now")
        }),
        "no warning says why the post-exec ran:\n{}",
        d.log()
    );
    assert!(!d
        .blockctl(&["snapshot", "inspect", "vol1@cut"])
        .status
        .success());
    // Once: its record is gone, and the next start owes nothing.
    let owed = d.dir.path().join("snapshots/.post-exec.owed");
    assert!(
        (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            !owed.exists()
        }),
        "the owed post-exec is still recorded"
    );
    std::fs::remove_file(&post).unwrap();
    assert!(d.terminate().success());
    d.spawn();
    d.ok(&["snapshot", "list"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!post.exists(), "the post-exec ran a second time");

    // blockd is stopped (SIGTERM) while a pre-exec longer than the API's
    // drain runs: it finishes the pair (the snapshot included) before it
    // exits, so nothing stays frozen until the next start.
    reset();
    let mut client = create(&d, "stopped", "6");
    assert!(wait_for(&pre), "pre-exec did not start");
    assert!(d.terminate().success(), "{}", d.log());
    assert_eq!(
        std::fs::read_to_string(&post).unwrap_or_default(),
        "after\n",
        "the post-exec did not run before blockd exited:\n{}",
        d.log()
    );
    assert!(client.wait().unwrap().success());
    assert!(d
        .log()
        .contains("waiting for the hooks of a snapshot being taken before stopping"));
    d.spawn();
    d.ok(&["snapshot", "inspect", "vol1@stopped"]);
}

#[test]
fn a_host_crash_with_unsynced_cow_data_marks_the_snapshot_damaged() {
    if !require_tools(&["qemu-io", "nbdsh", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    // w: overwritten after its snapshot, and flushed. The FLUSH syncs the
    // volume; the daemon syncs the copies at its next interval (1s), and
    // the marker goes.
    d.create("w", "8M");
    qemu_io(&d.uri("w"), &["write -P 0x11 0 8M"]);
    d.ok(&["snapshot", "create", "w", "--name", "s"]);
    qemu_io(&d.uri("w"), &["write -P 0x22 0 64k", "flush"]);
    let snaps = d.dir.path().join("snapshots");
    let t0 = std::time::Instant::now();
    while snaps.join("w/s/cow.unsynced").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the marker of synced copies is still there"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // From here copies stay unsynced for an hour, so that the crash below
    // meets them: v overwritten and flushed, as w (the marker stays). Retried failures slow
    // the backup that is underway at the crash (at 0.2, five failures in
    // a row, which end a request, come once in 3,000 requests).
    assert!(d.terminate().success());
    d.env.push(("BLOCKD_SNAPSHOT_SYNC".into(), "1h".into()));
    d.env.push(("BLOCKD_FAULT_INJECT".into(), "0.2".into()));
    d.spawn();
    d.create("v", "8M");
    qemu_io(&d.uri("v"), &["write -P 0x11 0 8M"]);
    d.ok(&["snapshot", "create", "v", "--name", "s"]);
    qemu_io(&d.uri("v"), &["write -P 0x22 0 64k", "flush"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(snaps.join("v/s/cow.unsynced").exists());
    // b: a backup reading its frozen image when the host goes down.
    d.create("b", "256M");
    let img = common::cloud::image(tmp.path(), "b.img", 256 << 20, 256 << 20, 3);
    common::cloud::load(&d, "b", &img);
    let task = common::cloud::backup_underway(&d, &["b"], 1);
    nbdsh(UNSYNCED_WRITE, &[&d.uri("b")]);
    let t = common::cloud::status(&d, &task);
    assert_eq!(t["state"], "Active", "backup ended before the crash: {t}");

    // The host goes down: blockd starts again in another boot.
    d.kill9();
    d.env.clear();
    d.env
        .push(("BLOCKD_TEST_BOOT_ID".into(), "another-boot".into()));
    d.spawn();
    let damaged = |d: &Blockd, id: &str| -> serde_json::Value {
        let l: serde_json::Value =
            serde_json::from_str(&d.ok(&["-j", "snapshot", "list"])).unwrap();
        l.as_array()
            .unwrap()
            .iter()
            .find(|s| s["export"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {l}"))["damaged"]
            .clone()
    };
    let why = damaged(&d, "v@s");
    assert!(
        why.as_str().is_some_and(|w| w.contains("host went down")),
        "{why}"
    );
    assert!(damaged(&d, "w@s").is_null());
    assert!(d.ok(&["snapshot", "list"]).contains("DAMAGED"));
    // Never exported...
    let out = Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .arg(d.uri("v@s"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("v@s is damaged"), "{e}");
    // ... while the flushed one still reads its frozen contents.
    let frozen = tmp.path().join("w.img");
    export_to_file(&snap_uri(&d, "w@s"), &frozen);
    assert!(read_file(&frozen).iter().all(|&b| b == 0x11));
    // Never backed up: the resumed backup fails and says why; the next
    // one reads the whole volume.
    let t = common::cloud::wait_until(&d, &task, |_| false);
    assert_eq!(t["state"], "Failed", "{t}");
    assert!(t["error"].as_str().unwrap().contains("is damaged"), "{t}");
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "inspect", "b"])).unwrap();
    assert_eq!(v["tracking_known"], false, "{v}");
    // The damage is remembered across restarts, and the snapshot can go.
    assert!(d.terminate().success());
    d.spawn();
    assert!(damaged(&d, "v@s").is_string());
    d.ok(&["snapshot", "delete", "v@s"]);
    let _ = tmp;
}

/// A clean stop syncs the copies its interval has not reached yet and
/// leaves no marker behind, so a planned reboot does not report the
/// snapshot damaged.
#[test]
fn a_clean_stop_syncs_the_copies_so_a_reboot_finds_the_snapshot_good() {
    if !require_tools(&["qemu-io", "nbdcopy"]) {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_SNAPSHOT_SYNC", "1h")]);
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "8M");
    qemu_io(&d.uri("v"), &["write -P 0x11 0 8M"]);
    d.ok(&["snapshot", "create", "v", "--name", "s"]);
    qemu_io(&d.uri("v"), &["write -P 0x22 0 64k", "flush"]);
    let marker = d.dir.path().join("snapshots/v/s/cow.unsynced");
    assert!(marker.exists(), "no marker for copies not synced");
    assert!(d.terminate().success());
    assert!(!marker.exists(), "a clean stop left the marker");
    d.env
        .push(("BLOCKD_TEST_BOOT_ID".into(), "after-a-reboot".into()));
    d.spawn();
    let l: serde_json::Value = serde_json::from_str(&d.ok(&["-j", "snapshot", "list"])).unwrap();
    assert!(l[0]["damaged"].is_null(), "{l}");
    let frozen = tmp.path().join("v.img");
    export_to_file(&snap_uri(&d, "v@s"), &frozen);
    assert!(read_file(&frozen).iter().all(|&b| b == 0x11));
}

/// A snapshot read over NBD is deleted only with --force, as a volume with
/// clients is: without it the delete is refused and the client reads on;
/// deletes racing new connections never end one that opened.
#[test]
fn a_snapshot_with_clients_is_deleted_only_with_force() {
    if !require_tools(&["qemu-io", "nbdsh"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "16M");
    qemu_io(&d.uri("vol1"), &["write -P 0x33 0 1M"]);
    d.ok(&["snapshot", "create", "vol1", "--name", "s"]);
    let mut held = HeldReader::start(&snap_uri(&d, "vol1@s"), 2.0);
    assert!(held.opened());
    let out = d.blockctl(&["snapshot", "delete", "vol1@s"]);
    assert!(!out.status.success(), "deleted under its client");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("1 open NBD connection") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(held.outcome(), "ok");
    // Once the client is gone, a plain delete goes through.
    d.ok(&["snapshot", "delete", "vol1@s"]);

    // --force ends the connection.
    d.ok(&["snapshot", "create", "vol1", "--name", "f"]);
    let mut held = HeldReader::start(&snap_uri(&d, "vol1@f"), 3.0);
    assert!(held.opened());
    d.ok(&["snapshot", "delete", "vol1@f", "--force"]);
    let said = held.outcome();
    assert!(said.starts_with("broken"), "{said}");

    // Racing: four clients connect while two deletes run. A delete that
    // wins comes first; no client that opened is cut off.
    for round in 0..3 {
        let name = format!("r{round}");
        d.ok(&["snapshot", "create", "vol1", "--name", &name]);
        let uri = snap_uri(&d, &format!("vol1@{name}"));
        let outs = at_once(6, |i| {
            if i < 4 {
                HeldReader::start(&uri, 0.5).outcome()
            } else {
                let out = d.blockctl(&["snapshot", "delete", &format!("vol1@{name}")]);
                succeeded_or_stderr(&out, "deleted")
            }
        });
        for o in &outs[..4] {
            assert!(o == "ok" || o == "refused", "round {round}: {outs:?}");
        }
        let deleted = outs[4..].iter().filter(|o| *o == "deleted").count();
        assert!(deleted <= 1, "{outs:?}");
        for o in &outs[4..] {
            assert!(
                o == "deleted"
                    || o.contains("open NBD connection")
                    || o.contains("not found")
                    || o.contains("being deleted"),
                "{outs:?}"
            );
        }
        if deleted == 0 {
            d.ok(&["snapshot", "delete", &format!("vol1@{name}")]);
        }
    }
}
