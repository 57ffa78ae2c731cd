//! Repacking by `blockctl repo gc`: a pack kept alive by a few records of
//! a live snapshot is copied down to those records and the rest reclaimed;
//! small packs (one per small incremental) are merged; every reader
//! (restore, lazy restore, the catalog mount, `repo check`)
//! finds the moved records through the relocations, over two generations
//! of repacking; a damaged relocation is named and stops collection;
//! `--max-unused unlimited` and `--dry-run` copy nothing; until the
//! repacked pack is collected, `repo check` judges both copies of the
//! moved records.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::cloud::*;
use common::*;
use serde_json::Value;

fn gc(d: &Blockd, args: &[&str]) -> Value {
    let mut a = vec!["-j", "repo", "gc", "--grace", "1s"];
    a.extend_from_slice(args);
    json(&d.ok(&a))
}

/// Collects, waits out the grace period, collects again: what the first
/// run repacked is deleted by the second. Returns both reports.
fn gc_twice(d: &Blockd) -> (Value, Value) {
    let first = gc(d, &[]);
    std::thread::sleep(Duration::from_millis(1200));
    (first, gc(d, &[]))
}

fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

fn check_clean(d: &Blockd) {
    let r = json(&d.ok(&["-j", "repo", "check", "--read-data"]));
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
}

/// `base` with `len` bytes at `off` replaced by seeded random bytes.
fn rewrite(base: &Path, to: &Path, off: usize, len: usize, seed: u64) -> PathBuf {
    let mut b = std::fs::read(base).unwrap();
    b[off..off + len].copy_from_slice(&random_bytes(len, seed));
    std::fs::write(to, b).unwrap();
    to.to_path_buf()
}

/// Volume `v` (16 MiB) backed up twice, the first backup deleted: s1
/// held 12 MiB of seeded data in one pack, and s2 rewrote the first 11
/// MiB, so that pack is 11/12 dead, kept only for s2's last MiB. Returns
/// s2 and its image.
fn on_a_mostly_dead_pack(d: &Blockd, tmp: &Path, seed: u64) -> (String, PathBuf) {
    d.create("v", "16M");
    let img1 = image(tmp, "1.img", 16 * MB, 12 * MB, seed);
    load(d, "v", &img1);
    let s1 = snap(&backup(d, &["v"]));
    let img2 = rewrite(&img1, &tmp.join("2.img"), 0, 11 * MB, seed + 2);
    load(d, "v", &img2);
    let s2 = snap(&backup(d, &["v"]));
    d.ok(&["cloudsnap", "delete", "--snap", &s1]);
    (s2, img2)
}

/// The pack a live relocation moved records into.
fn moved_to(objects: &Path) -> PathBuf {
    files_under(&objects.join("relocs"))
        .iter()
        .map(|r| {
            let to = r.file_name().unwrap().to_string_lossy().into_owned();
            objects.join("packs").join(&to[..2]).join(&to)
        })
        .find(|p| p.exists())
        .expect("a relocation's pack")
}

/// The pack a relocation moved records out of, and the one it moved them
/// into.
fn moved_from_to(objects: &Path) -> (PathBuf, PathBuf) {
    let relocs = files_under(&objects.join("relocs"));
    assert_eq!(relocs.len(), 1, "one relocation: {relocs:?}");
    let pack = |id: &str| objects.join("packs").join(&id[..2]).join(id);
    let to = relocs[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let from = relocs[0]
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    (pack(&from), pack(&to))
}

fn snap(t: &Value) -> String {
    t["snapshot"].as_str().unwrap().to_string()
}

/// Every relocation names a pack that exists: nothing points at what GC
/// deleted (superseded relocations go with their targets).
fn relocations_point_at_packs(objects: &Path) -> usize {
    let relocs = files_under(&objects.join("relocs"));
    for r in &relocs {
        let to = r.file_name().unwrap().to_string_lossy().into_owned();
        let pack = objects.join("packs").join(&to[..2]).join(&to);
        assert!(pack.exists(), "{} points at a deleted pack", r.display());
    }
    relocs.len()
}

#[test]
fn a_mostly_dead_pack_is_repacked_and_every_reader_finds_the_moved_records() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    let packs = objects.join("packs");
    let (s2, img2) = on_a_mostly_dead_pack(&d, tmp.path(), 71);
    let before = bytes_under(&packs);

    // Nothing copied by a dry run, nor with `unlimited`.
    let files = files_under(&objects);
    let r = gc(&d, &["--dry-run"]);
    assert_eq!(r["repacked_packs"], 1, "{r}");
    assert!(r["unused_bytes"].as_u64().unwrap() >= 10 * MB as u64, "{r}");
    let r = gc(&d, &["--dry-run", "--max-unused", "unlimited"]);
    assert_eq!(r["repacked_packs"], 0, "{r}");
    assert_eq!(files_under(&objects), files, "--dry-run changed the bucket");

    // The live MiB is copied out; the old pack goes a grace period later.
    let (r, r2) = gc_twice(&d);
    assert_eq!(r["repacked_packs"], 1, "{r}");
    assert_eq!(r["written_packs"], 1, "{r}");
    let copied = r["repacked_bytes"].as_u64().unwrap();
    assert!(
        (MB as u64..2 * MB as u64).contains(&copied),
        "copied {copied}: {r}"
    );
    assert!(
        r2["deleted_bytes"].as_u64().unwrap() >= 11 * MB as u64,
        "{r2}"
    );
    let after = bytes_under(&packs);
    assert!(
        after + 10 * (MB as u64) <= before,
        "packs hold {after} bytes after repacking, {before} before"
    );
    assert!(relocations_point_at_packs(&objects) >= 1);
    check_clean(&d);
    let r = restore(&d, &s2, "full2", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img2, "full2");
    // A lazy restore reads the moved records on demand.
    let id = lazy_restore(&d, &s2, "lazy2");
    assert_same(&d, &img2, "lazy2");
    assert_eq!(wait_done(&d, &id)["state"], "Done");
    // A moved record damaged where it is now: a restore names the pack
    // that holds it, as `repo check` does, not the deleted pack the index
    // names.
    let moved_to = moved_to(&objects);
    let key = moved_to
        .strip_prefix(&objects)
        .unwrap()
        .display()
        .to_string();
    let good = std::fs::read(&moved_to).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    std::fs::write(&moved_to, &bad).unwrap();
    let r = restore(&d, &s2, "broken", &[]);
    assert_eq!(r["state"], "Failed", "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(
        e.contains(&format!("object {key} is corrupt")) && e.contains("moved there by a repack"),
        "{e}"
    );
    let out = d.blockctl(&["-j", "repo", "check", "--read-data"]);
    let c = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(c["problems"][0]["object"], key.as_str(), "{c}");
    std::fs::write(&moved_to, &good).unwrap();
    d.ok(&["-j", "repo", "check", "--read-data"]);

    // Second generation: s3 rewrites half of the moved MiB; with s2 gone
    // the new pack is half dead and small, and moves again. Index entries
    // still name s1's pack, long deleted.
    let img3 = rewrite(&img2, &tmp.path().join("3.img"), 11 * MB, MB / 2, 75);
    load(&d, "v", &img3);
    let s3 = snap(&backup(&d, &["v"]));
    d.ok(&["cloudsnap", "delete", "--snap", &s2]);
    let (r, _) = gc_twice(&d);
    assert!(r["repacked_packs"].as_u64().unwrap() >= 1, "{r}");
    // Superseded relocations are collected too.
    gc_twice(&d);
    relocations_point_at_packs(&objects);
    check_clean(&d);
    let r = restore(&d, &s3, "full3", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img3, "full3");
    // The next backup is an incremental on the repacked snapshot.
    let img4 = rewrite(&img3, &tmp.path().join("4.img"), 15 * MB, 4096, 77);
    load(&d, "v", &img4);
    let t = backup(&d, &["v"]);
    assert_eq!(t["full"], false, "{t}");
    let r = restore(&d, &snap(&t), "full4", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img4, "full4");

    // A damaged relocation is named, with the snapshots that need it, and
    // collection refuses (what it references is unknown).
    let reloc = files_under(&objects.join("relocs"))
        .into_iter()
        .find(|p| {
            let to = p.file_name().unwrap().to_string_lossy().into_owned();
            objects.join("packs").join(&to[..2]).join(&to).exists()
        })
        .expect("a relocation");
    let key = reloc.strip_prefix(&objects).unwrap().display().to_string();
    let good = std::fs::read(&reloc).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 3] ^= 0x10;
    std::fs::write(&reloc, &bad).unwrap();
    let out = d.blockctl(&["-j", "repo", "check"]);
    assert!(!out.status.success());
    let r = json(&String::from_utf8_lossy(&out.stdout));
    assert!(
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["object"] == key.as_str()),
        "{r}"
    );
    assert!(!r["damaged"].as_array().unwrap().is_empty(), "{r}");
    let out = d.blockctl(&["repo", "gc", "--grace", "1s"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("damaged") && e.contains(&key), "{e}");
    std::fs::write(&reloc, &good).unwrap();
    check_clean(&d);
}

/// A pack the repacking finds damaged is not copied, nor let pass: the
/// collection names it with the snapshots that need it, exits 1, and
/// records the damage as `repo check` does, so the next backup reads the
/// ranges that used it from the volume again instead of building on it.
#[test]
fn a_damaged_pack_met_by_a_repack_is_named_recorded_and_not_built_on() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    d.create("v", "16M");
    // s1's one pack, 11/12 dead once s1 is deleted: s2 needs its last MiB.
    let img1 = image(tmp.path(), "1.img", 16 * MB, 12 * MB, 81);
    load(&d, "v", &img1);
    let s1 = snap(&backup(&d, &["v"]));
    let pack = files_under(&objects.join("packs"));
    assert_eq!(pack.len(), 1, "one pack: {pack:?}");
    let pack = pack[0].clone();
    let key = pack.strip_prefix(&objects).unwrap().display().to_string();
    let img2 = rewrite(&img1, &tmp.path().join("2.img"), 0, 11 * MB, 83);
    load(&d, "v", &img2);
    let s2 = snap(&backup(&d, &["v"]));
    d.ok(&["cloudsnap", "delete", "--snap", &s1]);
    // A byte flipped in the records s2 still needs.
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() / 24 * 23;
    bytes[at] ^= 0x20;
    std::fs::write(&pack, &bytes).unwrap();

    let out = d.blockctl(&["-j", "repo", "gc", "--grace", "1s", "--max-unused", "0%"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let r = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(r["problems"][0]["object"], key.as_str(), "{r}");
    assert_eq!(r["damaged"][0]["snapshot"], s2.as_str(), "{r}");
    assert_eq!(r["repacked_packs"], 0, "{r}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(&key) && e.contains("recorded") && e.contains("repo check --read-data"),
        "{e}"
    );
    // Text: the damaged pack, the snapshot, and what to do.
    let out = d.blockctl(&["repo", "gc", "--grace", "1s", "--max-unused", "0%"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("snapshot {s2} needs damaged {key}")),
        "{text}"
    );

    // Recorded: a check that does not read data reports it too.
    let out = d.blockctl(&["-j", "repo", "check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let c = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(c["problems"][0]["object"], key.as_str(), "{c}");
    // And the next backup does not build on it: it reads again what used
    // the damaged pack, not only the 4 KiB written.
    let img3 = rewrite(&img2, &tmp.path().join("3.img"), 0, 4096, 85);
    load(&d, "v", &img3);
    let t = backup(&d, &["v"]);
    assert!(
        t["bytes_total"].as_u64().unwrap() >= MB as u64,
        "the backup reused the damaged pack: {t}"
    );
    let s3 = snap(&t);
    let out = d.blockctl(&["-j", "repo", "check", "--read-data"]);
    let c = json(&String::from_utf8_lossy(&out.stdout));
    let needing: Vec<&str> = c["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(needing, [s2.as_str()], "{c}");
    let r = restore(&d, &s3, "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img3, "back");
}

#[test]
fn small_packs_are_merged_and_every_snapshot_still_restores() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    let packs = objects.join("packs");
    d.create("v", "8M");
    let img = image(tmp.path(), "v.img", 8 * MB, 0, 1);
    // Sixteen backups of one 4 KiB write each: a pack apiece.
    let mut kept: Vec<(String, PathBuf)> = Vec::new();
    for i in 0..16u64 {
        let cmd = format!("write -P {} {} 4k", i + 1, i * 65536 + 8192);
        write_both(&d, "v", &img, &cmd);
        let s = snap(&backup(&d, &["v"]));
        if i % 5 == 0 || i == 15 {
            let copy = tmp.path().join(format!("{i}.img"));
            std::fs::copy(&img, &copy).unwrap();
            kept.push((s, copy));
        }
    }
    let before = files_under(&packs).len();
    assert!(before >= 16, "{before} packs");

    let (r, r2) = gc_twice(&d);
    assert!(r["repacked_packs"].as_u64().unwrap() >= 16, "{r}");
    assert_eq!(r["written_packs"], 1, "{r}");
    assert!(r2["deleted_packs"].as_u64().unwrap() >= 16, "{r2}");
    let after = files_under(&packs).len();
    assert!(after <= 2, "{after} packs left of {before}");
    check_clean(&d);
    for (i, (s, img)) in kept.iter().enumerate() {
        let vol = format!("r{i}");
        let r = restore(&d, s, &vol, &[]);
        assert_eq!(r["state"], "Done", "{r}");
        assert_same(&d, img, &vol);
    }
    // A merged repository needs no more merging.
    let r = gc(&d, &[]);
    assert_eq!(r["repacked_packs"], 0, "{r}");

    // The catalog mount reads the moved records too.
    if require_tools(&["fusermount3"])
        && skip_unless(is_root(), "the catalog mount needs root")
        && skip_unless(Path::new("/dev/fuse").exists(), "no /dev/fuse")
    {
        let dir = tmp.path().join("cat");
        std::fs::create_dir_all(&dir).unwrap();
        d.ok(&["mount", dir.to_str().unwrap()]);
        let (s, img) = &kept[1];
        let name = s.split_once('/').unwrap().1;
        let read = std::fs::read(dir.join(format!("v/{name}/disk.img")));
        d.ok(&["umount", dir.to_str().unwrap()]);
        assert_eq!(read.unwrap(), std::fs::read(img).unwrap());
    }
}

/// kill -9 while a collection repacks (slowed by a flaky store), restart,
/// collect again: the crashed run's session does not hold the sweeps, the
/// small packs are merged and reclaimed, every snapshot restores.
#[test]
fn kill9_while_repacking_then_gc_again_loses_nothing() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    d.create("v", "8M");
    let img = image(tmp.path(), "v.img", 8 * MB, 0, 1);
    let mut kept: Vec<(String, PathBuf)> = Vec::new();
    for i in 0..24u64 {
        let cmd = format!("write -P {} {} 4k", i + 1, i * 65536);
        write_both(&d, "v", &img, &cmd);
        let s = snap(&backup(&d, &["v"]));
        if i % 8 == 7 {
            let copy = tmp.path().join(format!("{i}.img"));
            std::fs::copy(&img, &copy).unwrap();
            kept.push((s, copy));
        }
    }
    let before = files_under(&objects.join("packs")).len();
    assert!(before >= 24, "{before} packs");

    assert!(d.terminate().success());
    d.env.push(("BLOCKD_FAULT_INJECT".into(), "0.15".into()));
    d.spawn();
    // Killed as soon as the collector has registered to repack. A
    // collection the flaky store failed before that (a request that failed
    // every one of its attempts, about one in 13,000) is started again.
    let sessions = objects.join("locks/sessions");
    let mut run = gc_started(&d, &["--grace", "1s"]);
    for _ in 0..3 {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while files_under(&sessions).is_empty()
            && std::time::Instant::now() < end
            && run.try_wait().unwrap().is_none()
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !files_under(&sessions).is_empty() || run.try_wait().unwrap().is_none() {
            break;
        }
        let failed = run.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(err.contains("fault-injection"), "{err}");
        run = gc_started(&d, &["--grace", "1s"]);
    }
    d.kill9();
    let out = run.wait_with_output().unwrap();
    let left = files_under(&sessions);
    assert!(
        left.iter()
            .any(|p| p.file_name().unwrap().to_string_lossy().starts_with("gc-")),
        "not killed while repacking: {left:?}; repo gc said: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );

    d.env.clear();
    d.spawn();
    let (r, r2) = gc_twice(&d);
    // Its session (and any write it left unfinished) is gone.
    let stays = files_under(&sessions);
    assert!(stays.is_empty(), "a crashed run's session stays: {stays:?}");
    let partial: Vec<_> = files_under(&objects)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains('#'))
        .collect();
    assert!(partial.is_empty(), "unfinished writes stay: {partial:?}");
    assert_eq!(r2["held_marks"], 0, "{r} {r2}");
    assert!(r2["deleted_packs"].as_u64().unwrap() >= 24, "{r} {r2}");
    // Whatever the crashed run wrote (a pack, relocations) is either in
    // use or reclaimed by the next runs.
    gc_twice(&d);
    let after = files_under(&objects.join("packs")).len();
    assert!(after <= 3, "{after} packs left of {before}");
    relocations_point_at_packs(&objects);
    check_clean(&d);
    for (i, (s, img)) in kept.iter().enumerate() {
        let vol = format!("r{i}");
        let r = restore(&d, s, &vol, &[]);
        assert_eq!(r["state"], "Done", "{r}");
        assert_same(&d, img, &vol);
    }
}

/// Damage found in a pack that a repack wrote, reached by index entries
/// that still name the pack the records were moved from: a backup that
/// raced the check took a damaged record into an index block of its own,
/// and the backup after it, reading that block, follows the relocation
/// to the damage and stores the range anew.
#[test]
fn a_moved_record_found_damaged_is_not_taken_on_by_later_backups() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    let (s2, img) = on_a_mostly_dead_pack(&d, tmp.path(), 81);
    let (r, _) = gc_twice(&d);
    assert_eq!(r["repacked_packs"], 1, "{r}");
    // The first record moved, damaged where it is now.
    let moved_to = moved_to(&objects);
    let mut bad = std::fs::read(&moved_to).unwrap();
    bad[100] ^= 0x01;
    std::fs::write(&moved_to, &bad).unwrap();
    let damaged = || {
        let out = d.blockctl(&["-j", "repo", "check", "--read-data"]);
        damaged_snapshots(&json(&String::from_utf8_lossy(&out.stdout)))
    };
    assert_eq!(damaged(), [s2.clone()].into());

    // s3 runs as if it had listed the records before the check wrote
    // them, and takes the moved record, unchanged at its place.
    let s3 = without_damage_records(&objects, || {
        write_both(&d, "v", &img, "write -P 0x61 14M 4k");
        snap(&backup(&d, &["v"]))
    });
    write_both(&d, "v", &img, "write -P 0x62 15M 4k");
    let s4 = snap(&backup(&d, &["v"]));
    assert_eq!(damaged(), [s2, s3].into());
    let r = restore(&d, &s4, "r4", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "r4");

    // A relocation that does not open is no reason to stop backing up:
    // r4's base is a restored snapshot, so its next backup reads the
    // blocks it would keep, and the records of a pack whose relocations
    // do not open count as damaged.
    for reloc in files_under(&objects.join("relocs")) {
        let mut b = std::fs::read(&reloc).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0x01;
        std::fs::write(&reloc, &b).unwrap();
    }
    write_both(&d, "r4", &img, "write -P 0x63 3M 4k");
    let s5 = snap(&backup(&d, &["r4"]));
    assert!(
        d.log().contains("a relocation does not open"),
        "{}",
        d.log()
    );
    let r = restore(&d, &s5, "r5", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "r5");
}

/// Until the grace period ends, the records a repack moved are in two
/// packs: the one index entries name, which restores read while it
/// exists, and the one its relocation points at. `repo check` judges
/// both: damage in the first is named with the snapshot whose restore it
/// breaks, and recorded; damage only in the second is named as needed
/// once the first is collected, while restores still read the first.
#[test]
fn both_copies_of_moved_records_are_checked_until_the_old_pack_goes() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    let (s2, img2) = on_a_mostly_dead_pack(&d, tmp.path(), 91);
    let r = json(&d.ok(&["-j", "repo", "gc", "--grace", "1h"]));
    assert_eq!(r["repacked_packs"], 1, "{r}");
    let (from, to) = moved_from_to(&objects);
    assert!(from.exists() && to.exists(), "{from:?} {to:?}");
    let key = |p: &Path| p.strip_prefix(&objects).unwrap().display().to_string();
    let (from_key, to_key) = (key(&from), key(&to));
    check_clean(&d);
    let check = || {
        let out = d.blockctl(&["-j", "repo", "check", "--read-data"]);
        let c = json(&String::from_utf8_lossy(&out.stdout));
        assert!(!out.status.success(), "{c}");
        let objects: Vec<String> = c["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["object"].as_str().unwrap().to_string())
            .collect();
        (c, objects)
    };

    // A moved record damaged in the pack the index names: a restore reads
    // it there and fails, and the check names that pack.
    let good = std::fs::read(&from).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 24 * 23;
    bad[at] ^= 0x20;
    std::fs::write(&from, &bad).unwrap();
    let r = restore(&d, &s2, "r1", &[]);
    assert_eq!(r["state"], "Failed", "{r}");
    assert!(r["error"].as_str().unwrap().contains(&from_key), "{r}");
    let (c, named) = check();
    assert_eq!(named, [from_key.as_str()], "{c}");
    assert_eq!(damaged_snapshots(&c), [s2.clone()].into(), "{c}");
    let recorded: Vec<&str> = c["recorded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert_eq!(recorded, [from_key.as_str()], "{c}");
    std::fs::write(&from, &good).unwrap();
    check_clean(&d);

    // Damaged only where the relocation points: restores still read the
    // pack the index names, and the check says so.
    let good = std::fs::read(&to).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    std::fs::write(&to, &bad).unwrap();
    let r = restore(&d, &s2, "r2", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img2, "r2");
    let (c, named) = check();
    assert_eq!(named, [to_key.as_str()], "{c}");
    let reason = c["problems"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("(restores read {from_key} until it is collected)")),
        "{c}"
    );
    assert_eq!(damaged_snapshots(&c), [s2.clone()].into(), "{c}");
    std::fs::write(&to, &good).unwrap();
    check_clean(&d);
}
