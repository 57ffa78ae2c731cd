//! Instant restore: `cloudsnap restore --lazy` serves the new volume at
//! once; reads fetch what is missing, a background hydrator fetches the
//! rest, a present map survives kill -9, writes are kept and tracked, and
//! failed fetches answer EIO without ever returning wrong data.
//!
//! `BLOCKD_HYDRATE_LIMIT` slows the hydrator so that the volume is still
//! filling while the tests use it.

mod common;

use std::path::Path;
use std::process::Command;

use common::cloud::*;
use common::disk::{FuseDisk, Loop, Mounted};
use common::*;

/// Reads `len` bytes at `off` of an export with qemu-io; Err with its
/// output when the read fails.
fn read_at(uri: &str, off: u64, len: u64, out: &Path) -> Result<Vec<u8>, String> {
    let _ = std::fs::remove_file(out);
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\ntry:\n    b = h.pread({len}, {off})\n    open({:?}, 'wb').write(b)\nexcept nbd.Error as e:\n    print('ERR', e)\n",
        out.display()
    );
    let o = nbdsh_command().args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    if text.contains("ERR") || !out.exists() {
        return Err(format!("{text}{}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(std::fs::read(out).unwrap())
}

fn slice(img: &[u8], off: u64, len: u64) -> &[u8] {
    let at = usize::try_from(off).unwrap();
    &img[at..at + usize::try_from(len).unwrap()]
}

#[test]
fn lazy_restore_serves_ext4_at_once_and_survives_kill9() {
    if !need()
        || !require_tools(&["nbdfuse", "losetup", "mkfs.ext4", "fusermount3", "nbdcopy"])
        || !skip_unless(is_root(), "needs root for losetup and mount")
        || !skip_unless(Path::new("/dev/fuse").exists(), "no /dev/fuse")
    {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "2M")]);
    d.create("src", "128M");
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    let sums = t.path().join("sums").display().to_string();
    {
        let fuse = FuseDisk::mount(&d.uri("src"), &t.path().join("f1"));
        let lo = Loop::attach(&fuse.disk());
        sh(&format!("mkfs.ext4 -q -F {}", lo.0));
        let _m = Mounted::mount(&lo.0, &mnt_s, "rw");
        sh(&format!(
            "cd {mnt_s} && mkdir docs && head -c 40M /dev/urandom > big.bin && \
             for i in $(seq 1 40); do head -c $((i * 1000)) /dev/urandom > docs/f$i.txt; done && \
             sync && find . -type f -not -path './lost+found/*' -print0 | sort -z | xargs -0 sha256sum > {sums}"
        ));
    }
    let src_img = t.path().join("src.img");
    run(Command::new("nbdcopy").arg(d.uri("src")).arg(&src_img));
    backup(&d, &["src"]);

    // Usable the moment the command returns, long before it is complete.
    let id = lazy_restore(&d, "src", "r");
    let st = status(&d, &id);
    assert_eq!(st["state"], "Active", "{st}");
    assert_eq!(
        (&st["lazy"], &st["full"]),
        (&true.into(), &false.into()),
        "{st}"
    );
    assert!(st["bytes_done"].as_u64().unwrap() < 64 * MB as u64, "{st}");
    let uri = d.uri("r");
    run(Command::new("nbdinfo").arg(&uri));
    {
        // The admin mounts it read-only and reads the small files.
        let fuse = FuseDisk::mount_with(&uri, &t.path().join("f2"), &["-r"]);
        let lo = Loop::attach_ro(&fuse.disk());
        let _m = Mounted::mount(&lo.0, &mnt_s, "ro,noload");
        sh(&format!(
            "cd {mnt_s} && grep docs/ {sums} | sha256sum --quiet -c -"
        ));
    }
    // Long enough for its counters to have been saved (every 2 s).
    let st = wait_until(&d, &id, |t| {
        t["elapsed_secs"].as_f64().unwrap_or(0.0) >= 3.0
    });
    assert_eq!(st["state"], "Active", "hydrated before the kill: {st}");

    // kill -9 mid-hydration: the present map brings back what was there,
    // the task its time and bytes fetched so far.
    d.kill9();
    d.spawn();
    assert!(d.log().contains("resuming task after restart"));
    let resumed = status(&d, &id);
    assert!(
        resumed["elapsed_secs"].as_f64().unwrap() >= 1.0
            && resumed["bytes_transferred"].as_u64().unwrap() >= 2 * MB as u64,
        "counters reset by the kill: {st} then {resumed}"
    );
    // A whole-volume read racing the hydrator gets the snapshot's bytes.
    let copy = t.path().join("copy.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert!(
        read_file(&copy) == read_file(&src_img),
        "a read racing the hydrator returned wrong data"
    );
    let st = wait_done(&d, &id);
    assert_eq!(st["state"], "Done", "{st}");
    assert_eq!(st["bytes_done"], st["bytes_total"], "{st}");
    assert_same(&d, &src_img, "r");
    assert!(
        !d.dir.path().join("volumes/r.present").exists(),
        "the present map outlived the restore"
    );
    {
        let fuse = FuseDisk::mount_with(&uri, &t.path().join("f3"), &["-r"]);
        let lo = Loop::attach_ro(&fuse.disk());
        let _m = Mounted::mount(&lo.0, &mnt_s, "ro,noload");
        sh(&format!("cd {mnt_s} && sha256sum --quiet -c {sums}"));
    }
    // Now an ordinary volume whose backups chain with the snapshot it came
    // from. (The kill -9 lost change tracking, so this one reads the whole
    // volume, but uploads nothing the snapshot already holds.)
    let b = backup(&d, &["r"]);
    assert!(b["bytes_reused"].as_u64().unwrap() >= 40 * MB as u64, "{b}");
    assert!(b["bytes_transferred"].as_u64().unwrap() < MB as u64, "{b}");
}

#[test]
fn writes_to_a_lazily_restored_volume_are_kept_tracked_and_survive_kill9() {
    if !need() || !require_tools(&["nbdsh"]) {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "4M")]);
    let t = tempfile::tempdir().unwrap();
    let img = backed_up(&d, t.path(), "src", 64 * MB, 48 * MB, 11);

    // The same writes on the volume and on a copy of the image: scattered
    // 4 KiB writes merge into missing 64 KiB units; whole units are
    // claimed without a fetch; trims and zeroes too.
    let write_both = |d: &Blockd, vol: &str, want: &Path, seed: u64| {
        std::fs::copy(&img, want).unwrap();
        scatter(d, vol, want, 300, seed);
        let cmds = [
            "write -P 0x5a 40M 128k",
            "write -P 0x6b 31457280 65536",
            "write -P 0x7c 20971530 100",
            "discard 42M 64k",
            "write -z 43M 64k",
            "write -z 46141440 4096",
            "flush",
        ];
        qemu_io(&d.uri(vol), &cmds);
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]).arg(want);
        for cmd in &cmds[..6] {
            c.args(["-c", cmd]);
        }
        run(&mut c);
    };

    // Flushed writes survive a crash: the hydrator never refills them.
    let id = lazy_restore(&d, "src", "r");
    let want = t.path().join("want.img");
    write_both(&d, "r", &want, 3);
    let st = status(&d, &id);
    assert_eq!(st["state"], "Active", "{st}");
    d.kill9();
    d.spawn();
    let st = wait_done(&d, &id);
    assert_eq!(st["state"], "Done", "{st}");
    assert_same(&d, &want, "r");

    // So do writes never flushed, to units claimed whole or filled for
    // them, after a crash of blockd alone: the marks are journaled before
    // the writes are acknowledged, and the page cache holds both.
    let id = lazy_restore(&d, "src", "u");
    let want = t.path().join("want-u.img");
    std::fs::copy(&img, &want).unwrap();
    // Where the snapshot has data (its first 48 MiB), well ahead of the
    // hydrator.
    let writes = [
        (0x42, 40 * MB, 65536),
        (0x43, 41 * MB + 4096, 4096),
        (0x44, 44 * MB, MB),
    ];
    let mut script = format!("h.connect_uri({:?})\n", d.uri("u"));
    for (byte, at, len) in writes {
        script += &format!("h.pwrite(b'\\x{byte:02x}' * {len}, {at})\n");
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]).arg(&want);
        c.args(["-c", &format!("write -P {byte:#x} {at} {len}")]);
        run(&mut c);
    }
    // A fast zero over units still missing is refused as not fast,
    // leaving them the snapshot's.
    script += &format!(
        "try:\n    h.zero(65536, {})\n    raise SystemExit('fast zero done')\nexcept nbd.Error as e:\n    assert e.errno in ('ENOTSUP', 'EOPNOTSUPP'), e\n",
        format_args!("{}, nbd.CMD_FLAG_FAST_ZERO", 46 * MB)
    );
    script += "h.shutdown()\n";
    nbdsh(&script, &[]);
    d.kill9();
    d.spawn();
    let st = wait_done(&d, &id);
    assert_eq!(st["state"], "Done", "{st}");
    assert_same(&d, &want, "u");

    // A clean shutdown keeps unflushed writes to claimed units too.
    let id = lazy_restore(&d, "src", "q");
    nbdsh(
        &format!(
            "h.connect_uri({:?})\nh.pwrite(b'\\x42' * 65536, 47 * 1048576)\nh.shutdown()\n",
            d.uri("q")
        ),
        &[],
    );
    let before = status(&d, &id);
    d.terminate();
    d.spawn();
    // The restart keeps what the task had counted: its time and what it
    // fetched do not go back.
    let after = status(&d, &id);
    for k in ["bytes_transferred", "elapsed_secs"] {
        assert!(
            after[k].as_f64().unwrap() >= before[k].as_f64().unwrap(),
            "{k} went back over a restart: {before} then {after}"
        );
    }
    let st = wait_done(&d, &id);
    assert_eq!(st["state"], "Done", "{st}");
    let got = read_at(&d.uri("q"), 47 * MB as u64, 65536, &t.path().join("q.bin")).unwrap();
    assert!(
        got.iter().all(|&b| b == 0x42),
        "an acknowledged write was refilled"
    );

    // Without a crash the writes are tracked: the next backup is an
    // incremental that reads only them, and it restores to the same bytes.
    let id = lazy_restore(&d, "src", "w");
    let want = t.path().join("want2.img");
    write_both(&d, "w", &want, 4);
    let st = wait_done(&d, &id);
    assert_eq!(st["state"], "Done", "{st}");
    assert_same(&d, &want, "w");
    let b = backup(&d, &["w"]);
    assert_eq!(b["full"], false, "{b}");
    let read = b["bytes_total"].as_u64().unwrap();
    assert!(read <= 4 * MB as u64, "incremental read {read} bytes");
    let snap = b["snapshot"].as_str().unwrap().to_string();
    let r = restore(&d, &snap, "w2", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &want, "w2");

    // While a volume fills it is not snapshotted, backed up or resized.
    let id3 = lazy_restore(&d, "src", "r3");
    for args in [
        vec!["snapshot", "create", "r3"],
        vec!["cloudsnap", "backup", "r3"],
        vec!["volume", "resize", "r3", "--size", "128M"],
    ] {
        let out = d.blockctl(&args);
        assert!(!out.status.success(), "{args:?} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("restore") || err.contains(&id3),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn failed_fetches_answer_eio_only_for_that_request_and_are_retried() {
    if !need() || !require_tools(&["nbdsh"]) {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "64K")]);
    let t = tempfile::tempdir().unwrap();
    let img = backed_up(&d, t.path(), "src", 32 * MB, 32 * MB, 21);
    let bytes = read_file(&img);
    let out = t.path().join("read.bin");
    let id = lazy_restore(&d, "src", "r");
    let uri = d.uri("r");

    // NBD CACHE fetches ahead: that range stays readable with the store gone.
    nbdsh(
        &format!("h.connect_uri({uri:?})\nh.cache(1048576, 4194304)\n"),
        &[],
    );
    let packs = d.dir.path().join("objects/packs");
    let away = d.dir.path().join("objects/packs.away");
    std::fs::rename(&packs, &away).unwrap();
    let got = read_at(&uri, 4 * MB as u64, MB as u64, &out).expect("cached range");
    assert!(got == slice(&bytes, 4 * MB as u64, MB as u64));
    // An uncached range: EIO for that read only, the connection and other
    // reads go on, and the log names the missing object.
    let err = read_at(&uri, 28 * MB as u64, 4096, &out).expect_err("read of a missing pack");
    assert!(
        err.contains("Input/output error") || err.contains("EIO"),
        "{err}"
    );
    assert!(read_at(&uri, 4 * MB as u64, 4096, &out).is_ok());
    assert!(d.log().contains("packs/"), "the log must name the object");
    // The hydrator reports why it is stuck.
    let st = wait_until(&d, &id, |t| t["error"].is_string());
    assert_eq!(st["state"], "Active", "{st}");
    assert!(st["error"].as_str().unwrap().contains("packs/"), "{st}");
    // A missing object may come back: no talk of damage.
    assert!(
        !st["error"].as_str().unwrap().contains("does not mend"),
        "{st}"
    );
    // The table says so too, and promises no time of arrival.
    let table = d.ok(&["cloudsnap", "status", "--name", &id]);
    let held = format!("{id} is held up: ");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&held) && l.contains("packs/")),
        "{table}"
    );
    let row = table.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(row.trim_end().ends_with('-'), "an ETA while stuck: {table}");

    // The store comes back: later reads and the hydrator succeed.
    std::fs::rename(&away, &packs).unwrap();
    let got = read_at(&uri, 28 * MB as u64, MB as u64, &out).expect("retried read");
    assert!(got == slice(&bytes, 28 * MB as u64, MB as u64));

    // A corrupted record is never returned as data.
    let pack = files_under(&packs).into_iter().next().expect("a pack");
    let mut p = std::fs::read(&pack).unwrap();
    let mid = p.len() / 2;
    p[mid] ^= 0xff;
    std::fs::write(&pack, &p).unwrap();
    let id2 = lazy_restore(&d, "src", "bad");
    // Read through in order, 64 KiB at a time, as a salvage copy does
    // (read-ahead fetches past each read): only the read that needs the
    // damaged chunk fails, and every other read is exact.
    let scan = nbdsh(
        r#"
import sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
want = open(sys.argv[2], "rb").read()
failed = []
for off in range(0, len(want), 65536):
    try:
        got = h.pread(65536, off)
    except nbd.Error as e:
        assert e.errno == "EIO", e
        failed.append(off)
        continue
    assert got == want[off:off + 65536], "wrong data returned at %d" % off
print("failed", failed)
"#,
        &[&d.uri("bad"), img.to_str().unwrap()],
    );
    let failed = scan
        .lines()
        .find_map(|l| l.strip_prefix("failed "))
        .unwrap_or_else(|| panic!("{scan}"));
    assert_eq!(
        failed.matches(',').count(),
        0,
        "one damaged chunk, one 64 KiB read may fail: {failed}"
    );
    assert_ne!(failed, "[]", "a corrupted record must fail a read");
    assert!(d.log().contains("corrupt") || d.log().contains("Corrupt"));

    // Without the limit the hydrator meets the damage soon: it says that
    // trying again does not mend it, and what to do.
    d.kill9();
    d.env.clear();
    d.spawn();
    let st = wait_until(&d, &id2, |t| {
        t["error"].as_str().is_some_and(|e| e.contains("corrupt"))
    });
    assert_eq!(st["state"], "Active", "{st}");
    let e = st["error"].as_str().unwrap();
    assert!(
        e.contains("does not mend")
            && e.contains("repo check --read-data")
            && e.contains("stop --force"),
        "{e}"
    );

    // Mended (a pack put back): both finish and are bit-exact.
    p[mid] ^= 0xff;
    std::fs::write(&pack, &p).unwrap();
    for (id, vol) in [(&id, "r"), (&id2, "bad")] {
        let st = wait_done(&d, id);
        assert_eq!(st["state"], "Done", "{st}");
        assert_same(&d, &img, vol);
    }
}

/// The holes a lazy restore finds in place at once are not taken for
/// speed: its ETA is the data left at the rate the fill fetches.
#[test]
fn a_lazy_restores_eta_is_the_data_left_at_the_fill_rate() {
    if !need() {
        return;
    }
    // 32 MiB of data in a 256 MiB volume, filled at 4 MiB/s: some 8 s.
    let d = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "4M")]);
    let t = tempfile::tempdir().unwrap();
    backed_up(&d, t.path(), "src", 256 * MB, 32 * MB, 6);
    let id = lazy_restore(&d, "src", "r");
    // The first estimate once 8 MiB were fetched: some 6 s left. Taking
    // the 224 MiB of holes for speed gives under 1.
    let s = wait_until(&d, &id, |s| {
        s["bytes_transferred"].as_u64().unwrap_or(0) >= 8 * MB as u64 && s["eta_secs"].is_number()
    });
    assert_eq!(s["state"], "Active", "{s}");
    let eta = s["eta_secs"].as_f64().unwrap();
    assert!(
        eta >= 2.0,
        "ETA {eta} s with {} of 32 MiB fetched",
        s["bytes_transferred"]
    );
}

#[test]
fn a_4k_read_fetches_one_chunk_of_at_most_64k() {
    if !need() || !require_tools(&["nbdsh"]) {
        return;
    }
    // One byte per second: after its first unit the hydrator waits for
    // hours, so what the read fetches is all that moves.
    let d = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "1")]);
    let t = tempfile::tempdir().unwrap();
    let img = backed_up(&d, t.path(), "src", 64 * MB, 64 * MB, 5);
    let id = lazy_restore(&d, "src", "r");
    let settled = |d: &Blockd| {
        let mut last = u64::MAX;
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let n = status(d, &id)["bytes_transferred"].as_u64().unwrap();
            if n == last {
                return n;
            }
            last = n;
        }
    };
    let before = settled(&d);
    // `volume inspect` shows how much of the snapshot is in place.
    let present = |d: &Blockd| {
        json(&d.ok(&["-j", "volume", "inspect", "r"]))["lazy_present_bytes"]
            .as_u64()
            .expect("a lazily restored volume shows what is in place")
    };
    let present_before = present(&d);
    assert!(present_before < 64 * MB as u64, "{present_before}");
    let text = d.ok(&["volume", "inspect", "r"]);
    assert!(
        text.contains("lazily:") && text.contains("in place"),
        "{text}"
    );
    let got = read_at(
        &d.uri("r"),
        40 * MB as u64 + 8192,
        4096,
        &t.path().join("b"),
    )
    .unwrap();
    assert!(got == slice(&read_file(&img), 40 * MB as u64 + 8192, 4096));
    let fetched = settled(&d) - before;
    assert!(present(&d) > present_before, "the read's chunk is in place");
    // One sealed record: 64 KiB of incompressible data plus its framing.
    assert!(
        fetched > 60 * 1024 && fetched <= 64 * 1024 + 256,
        "a 4 KiB read fetched {fetched} bytes"
    );
    stop_refused_while_clients_use_the_volume(&d, &id, "r", "src");
}

#[test]
fn a_forced_stop_ends_a_reading_client_and_leaves_shutdown_free() {
    if !need() || !require_tools(&["nbdcopy"]) {
        return;
    }
    // Full speed: the hydrator's batches are in flight when the stop comes,
    // and the client's reads wait for units those batches took.
    let mut d = Blockd::start();
    let t = tempfile::tempdir().unwrap();
    let _img = backed_up(&d, t.path(), "src", 512 * MB, 512 * MB, 7);
    let mut stopped = 0;
    for round in 0..8u64 {
        let vol = format!("s{round}");
        let id = lazy_restore(&d, "src", &vol);
        let mut copy = Command::new("nbdcopy")
            .args([d.uri(&vol).as_str(), "-"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + 50 * round));
        let out = succeeded_or_stderr(
            &d.blockctl(&["cloudsnap", "stop", &id, "--force"]),
            "stopped",
        );
        if out == "stopped" {
            stopped += 1;
        } else {
            assert!(out.contains("already ended"), "round {round}: {out}");
        }
        if wait_timeout(&mut copy, std::time::Duration::from_secs(8)).is_none() {
            let _ = copy.kill();
            panic!(
                "round {round}: the reader still hangs 8 s after the stop\n{}",
                d.log()
            );
        }
    }
    assert!(stopped > 0, "no round stopped a running restore");
    let log = d.log();
    assert_eq!(
        log.matches("NBD connection opened").count(),
        log.matches("NBD connection closed").count(),
        "every connection a stop cut off has ended:\n{log}"
    );
    // A shutdown stops a restore a client is reading in the same way, and
    // still ends (`terminate` panics after 30 s).
    lazy_restore(&d, "src", "last");
    let mut copy = Command::new("nbdcopy")
        .args([d.uri("last").as_str(), "-"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(d.terminate().success());
    assert!(wait_timeout(&mut copy, std::time::Duration::from_secs(8)).is_some());
}

/// Stopping a lazy restore deletes its volume: with clients connected it
/// is refused unless --force, as a volume delete is, and a stop racing
/// new connections never cuts off one that opened.
fn stop_refused_while_clients_use_the_volume(d: &Blockd, id: &str, vol: &str, src: &str) {
    let mut c = HeldReader::start(&d.uri(vol), 2.0);
    assert!(c.opened());
    let out = d.blockctl(&["cloudsnap", "stop", id]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("1 open NBD connection") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(c.outcome(), "ok");
    assert_eq!(status(d, id)["state"], "Active");
    // --force disconnects it, and the volume goes with the task.
    let mut c = HeldReader::start(&d.uri(vol), 3.0);
    assert!(c.opened());
    let t = json(&d.ok(&["-j", "cloudsnap", "stop", id, "--force"]));
    assert_eq!(t["state"], "Stopped", "{t}");
    let s = c.outcome();
    assert!(s.starts_with("broken"), "{s}");
    assert!(!d.blockctl(&["volume", "inspect", vol]).status.success());
    // Racing: clients connect while the restore is stopped.
    for round in 0..3 {
        let vol = format!("race{round}");
        let id = lazy_restore(d, src, &vol);
        let outs = at_once(4, |i| {
            if i < 3 {
                HeldReader::start(&d.uri(&vol), 0.5).outcome()
            } else {
                succeeded_or_stderr(&d.blockctl(&["cloudsnap", "stop", &id]), "stopped")
            }
        });
        for o in &outs[..3] {
            assert!(o == "ok" || o == "refused", "round {round}: {outs:?}");
        }
        if outs[3] == "stopped" {
            assert!(!d.blockctl(&["volume", "inspect", &vol]).status.success());
        } else {
            assert!(outs[3].contains("open NBD connection"), "{outs:?}");
            d.ok(&["cloudsnap", "stop", &id]);
        }
    }
}

/// The volume's `unexported` reason (`volume inspect`), `None` when it is
/// exported.
fn unexported(d: &Blockd, vol: &str) -> Option<String> {
    let v = json(&d.ok(&["-j", "volume", "inspect", vol]));
    v["unexported"].as_str().map(str::to_string)
}

#[test]
fn a_restore_that_cannot_go_on_leaves_its_volume_unexported_across_restarts() {
    if !need() || !require_tools(&["nbdsh", "nbdinfo", "python3"]) {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "2M")]);
    let t = tempfile::tempdir().unwrap();
    let img = backed_up(&d, t.path(), "src", 64 * MB, 48 * MB, 21);

    // Two lazy restores, one with a client's write in it, both cut short.
    let lost_map = lazy_restore(&d, "src", "nomap");
    let lost_record = lazy_restore(&d, "src", "norecord");
    qemu_io(&d.uri("nomap"), &["write -P 0x3c 1M 64k", "flush"]);
    for id in [&lost_map, &lost_record] {
        assert_eq!(status(&d, id)["state"], "Active");
    }
    d.kill9();
    // Damage a start cannot repair: a present map gone, a task record
    // unreadable (its plan of a kind this blockd does not know, as a later
    // version might write).
    std::fs::remove_file(d.dir.path().join("volumes/nomap.present")).unwrap();
    run(Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sqlite3, sys\n\
         c = sqlite3.connect(sys.argv[1])\n\
         (rec,) = c.execute('SELECT record FROM tasks WHERE id = ?', (sys.argv[2],)).fetchone()\n\
         rec = json.loads(rec)\n\
         rec['plan'] = {'FromALaterVersion': {}}\n\
         c.execute('UPDATE tasks SET record = ? WHERE id = ?', (json.dumps(rec), sys.argv[2]))\n\
         c.commit()\n",
        )
        .arg(d.dir.path().join("state.db"))
        .arg(&lost_record));

    for round in 0..3 {
        match round {
            0 => d.spawn(),
            1 => {
                d.terminate();
                d.spawn();
            }
            _ => {
                d.kill9();
                d.spawn();
            }
        }
        // Neither is served: the one holds part of the snapshot, the other
        // that and a client's write in units nothing records.
        for (vol, why) in [
            ("nomap", "could not resume"),
            ("norecord", "unreadable record"),
        ] {
            let told = nbd_opens(&d, vol).expect_err(&format!(
                "round {round}: incomplete volume {vol} was exported"
            ));
            assert!(
                told.contains(&format!("volume {vol} is not exported")),
                "{told}"
            );
            let reason = unexported(&d, vol)
                .unwrap_or_else(|| panic!("round {round}: volume inspect shows {vol} exported"));
            assert!(reason.contains(why), "{reason}");
            assert!(
                reason.contains(&format!("blockctl volume delete {vol}")),
                "{reason}"
            );
            // No backup or snapshot passes it off as a volume's content.
            d.fails(&["cloudsnap", "backup", vol], "cannot be backed up");
            d.fails(
                &["snapshot", "create", vol, "--name", "s"],
                "cannot be snapshotted",
            );
            let table = d.ok(&["volume", "list"]);
            assert!(
                table
                    .lines()
                    .any(|l| l.starts_with(vol) && l.contains("unexported")),
                "{table}"
            );
        }
        let failed = status(&d, &lost_map);
        assert_eq!(failed["state"], "Failed", "{failed}");
        assert!(
            failed["error"]
                .as_str()
                .unwrap()
                .contains("stays unexported"),
            "{failed}"
        );
        // The task whose record cannot be read is still listed, as failed,
        // with what could be read of it and why it is not running.
        let unread = status(&d, &lost_record);
        assert_eq!(unread["state"], "Failed", "{unread}");
        assert_eq!(unread["volume"], "norecord", "{unread}");
        assert!(
            unread["error"]
                .as_str()
                .unwrap()
                .contains("cannot read the task's record"),
            "{unread}"
        );
        let listed = json(&d.ok(&["-j", "cloudsnap", "status"]));
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["id"] == lost_record.as_str() && t["state"] == "Failed"),
            "{listed}"
        );
    }
    // The client's write is still in the data file, for whoever wants it.
    let data = read_file(&d.dir.path().join("volumes/nomap.img"));
    assert!(data[MB..MB + 65536].iter().all(|&b| b == 0x3c));

    // Deleting them frees the names; a new restore under one is served,
    // whole, with nothing left of the old state.
    d.ok(&["volume", "delete", "nomap"]);
    d.ok(&["volume", "delete", "norecord"]);
    let id = lazy_restore(&d, "src", "nomap");
    nbd_opens(&d, "nomap").unwrap();
    assert_eq!(unexported(&d, "nomap"), None);
    assert_eq!(wait_done(&d, &id)["state"], "Done");
    d.terminate();
    d.spawn();
    nbd_opens(&d, "nomap").unwrap();
    assert_same(&d, &img, "nomap");
}

/// A full restore's volume is unexported from the moment it exists until
/// the restore is done, across a kill -9, and exported after.
#[test]
fn a_full_restore_is_unexported_until_done_even_across_kill9() {
    if !need() || !require_tools(&["nbdinfo"]) {
        return;
    }
    let mut d = Blockd::start();
    let t = tempfile::tempdir().unwrap();
    let img = backed_up(&d, t.path(), "src", 256 * MB, 256 * MB, 22);
    let started = json(&d.ok(&[
        "-j",
        "cloudsnap",
        "restore",
        "--snap",
        "src",
        "--volume",
        "full",
    ]));
    let id = started["tasks"][0]["id"].as_str().unwrap().to_string();
    // At once: no window in which a client could write to it.
    let told = nbd_opens(&d, "full").expect_err("a volume being restored was exported");
    assert!(told.contains("is being restored from"), "{told}");
    let t1 = wait_until(&d, &id, |t| {
        t["bytes_done"].as_u64().unwrap_or(0) >= 16 * MB as u64
    });
    assert_eq!(t1["state"], "Active", "restore finished before the kill");
    d.kill9();
    d.spawn();
    let told = nbd_opens(&d, "full").expect_err("a resumed restore's volume was exported");
    assert!(told.contains(&id), "{told}");
    assert_eq!(wait_done(&d, &id)["state"], "Done");
    assert_eq!(unexported(&d, "full"), None);
    nbd_opens(&d, "full").unwrap();
    d.kill9();
    d.spawn();
    assert_same(&d, &img, "full");
}
