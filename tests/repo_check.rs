//! `blockctl repo check`: a clean repository passes; a flipped byte, a
//! missing pack, a missing index block and a truncated manifest are each
//! found, named, and traced to exactly the snapshots that need them. What
//! a check finds damaged, new backups (incremental and full) store again
//! instead of reusing; the record goes with the damage.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::cloud::*;
use common::*;
use serde_json::Value;

/// Files under `objects/<kind>` that appeared between two listings.
fn new_files(before: &[PathBuf], after: &[PathBuf]) -> Vec<PathBuf> {
    after
        .iter()
        .filter(|p| !before.contains(p))
        .cloned()
        .collect()
}

struct Repo {
    objects: PathBuf,
}

impl Repo {
    fn packs(&self) -> Vec<PathBuf> {
        files_under(&self.objects.join("packs"))
    }
    fn index(&self) -> Vec<PathBuf> {
        files_under(&self.objects.join("index"))
    }
    fn key(&self, p: &Path) -> String {
        p.strip_prefix(&self.objects).unwrap().display().to_string()
    }
}

/// `repo check` with `args`: (exit success, report, stderr).
fn check(d: &Blockd, args: &[&str]) -> (bool, Value, String) {
    let mut a = vec!["-j", "repo", "check"];
    a.extend_from_slice(args);
    let out = d.blockctl(&a);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let report = json(&stdout);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn damaged(report: &Value) -> BTreeSet<String> {
    damaged_snapshots(report)
}

/// Volume `vol` of `size` bytes full of seeded data, backed up; the first
/// chunk of its pack damaged, and a check that reads data records it.
/// Returns the image, the snapshot and the damaged pack.
fn backed_up_then_damaged(
    d: &Blockd,
    repo: &Repo,
    tmp: &Path,
    vol: &str,
    size: usize,
    seed: u64,
) -> (PathBuf, String, PathBuf) {
    d.create(vol, &format!("{}M", size / MB));
    let img = image(tmp, &format!("{vol}.img"), size, size, seed);
    load(d, vol, &img);
    let snap = backup(d, &[vol])["snapshot"].as_str().unwrap().to_string();
    let pack = damage_first_chunk(repo, &repo.index());
    let (ok, r, _) = check(d, &["--read-data"]);
    assert!(!ok, "{r}");
    assert_eq!(recorded(&r), vec![repo.key(&pack)], "{r}");
    (img, snap, pack)
}

/// The objects a check left recorded as damaged.
fn recorded(report: &Value) -> Vec<String> {
    report["recorded"]
        .as_array()
        .unwrap_or_else(|| panic!("no record list: {report}"))
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect()
}

fn problem_objects(report: &Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["object"].as_str().unwrap().to_string())
        .collect()
}

/// A daemon, a scratch directory, and its default location's objects.
fn start() -> (Blockd, tempfile::TempDir, Repo) {
    let d = Blockd::start();
    let repo = Repo {
        objects: d.dir.path().join("objects"),
    };
    (d, tempfile::tempdir().unwrap(), repo)
}

#[test]
fn repo_check_finds_and_names_damage() {
    if !need() {
        return;
    }
    let (d, tmp, repo) = start();

    // Volume a: a full backup, then an incremental; volume b: a full.
    d.create("a", "16M");
    let img_a = image(tmp.path(), "a.img", 16 * MB, 12 * MB, 1);
    load(&d, "a", &img_a);
    let (p0, i0) = (repo.packs(), repo.index());
    let a1 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    let (p1, i1) = (repo.packs(), repo.index());
    let a1_packs = new_files(&p0, &p1);
    scatter(&d, "a", &img_a, 16, 3);
    let a2 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    let (p2, i2) = (repo.packs(), repo.index());
    let a2_index = new_files(&i1, &i2);
    d.create("b", "8M");
    let img_b = image(tmp.path(), "b.img", 8 * MB, 8 * MB, 2);
    load(&d, "b", &img_b);
    let b1 = backup(&d, &["b"])["snapshot"].as_str().unwrap().to_string();
    let b_packs = new_files(&p2, &repo.packs());
    assert!(!a1_packs.is_empty() && !a2_index.is_empty() && !b_packs.is_empty());
    assert!(!i0.iter().any(|p| a2_index.contains(p)));

    // Clean: exit 0, everything counted, nothing damaged.
    let (ok, r, err) = check(&d, &[]);
    assert!(ok, "{err} {r}");
    assert_eq!(r["snapshots"], 3, "{r}");
    assert_eq!(
        r["packs"].as_u64().unwrap(),
        repo.packs().len() as u64,
        "{r}"
    );
    assert!(r["records"].as_u64().unwrap() > 100, "{r}");
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["data"].is_null(), "{r}");
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(ok, "{err}");
    let all = r["data"]["packs"].as_u64().unwrap();
    assert_eq!(all, repo.packs().len() as u64, "{r}");
    assert_eq!(r["data"]["records"], r["records"], "{r}");
    // Slices 1/3..3/3 read every pack exactly once between them.
    let mut sum = 0;
    for n in 1..=3 {
        let (ok, r, err) = check(&d, &["--read-data", "--subset", &format!("{n}/3")]);
        assert!(ok, "{err}");
        sum += r["data"]["packs"].as_u64().unwrap();
    }
    assert_eq!(sum, all);
    let text = d.ok(&["repo", "check"]);
    assert!(text.contains("no errors were found"), "{text}");

    // A flipped byte inside a record of a's full backup: the structural
    // check cannot see it, --read-data does, and names a's snapshots only.
    let pack = &a1_packs[0];
    let original = std::fs::read(pack).unwrap();
    let mut bad = original.clone();
    bad[1000] ^= 0x01;
    std::fs::write(pack, &bad).unwrap();
    let (ok, _, _) = check(&d, &[]);
    assert!(
        ok,
        "a flipped record byte is only visible when reading data"
    );
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(!ok, "{r}");
    assert!(err.contains("damaged object"), "{err}");
    assert_eq!(problem_objects(&r), vec![repo.key(pack)], "{r}");
    let dmg = damaged(&r);
    assert!(dmg.contains(&a1), "{r}");
    assert!(!dmg.contains(&b1), "{r}");
    let text =
        String::from_utf8_lossy(&d.blockctl(&["repo", "check", "--read-data"]).stdout).to_string();
    assert!(
        text.contains(&repo.key(pack)) && text.contains(&a1),
        "{text}"
    );
    std::fs::write(pack, &original).unwrap();
    // Recorded: a check that does not read data still reports it, until
    // one that reads the pack finds it whole and drops the record.
    assert_eq!(recorded(&r), vec![repo.key(pack)], "{r}");
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok, "{r}");
    assert_eq!(problem_objects(&r), vec![repo.key(pack)], "{r}");
    assert!(
        r["problems"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("found damaged earlier (by `repo check --read-data`"),
        "{r}"
    );
    assert!(damaged(&r).contains(&a1), "{r}");
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(ok, "{err} {r}");
    assert!(recorded(&r).is_empty(), "{r}");

    // A missing pack of b: found without reading data; only b is damaged.
    let bp = &b_packs[0];
    let keep = std::fs::read(bp).unwrap();
    std::fs::remove_file(bp).unwrap();
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok);
    assert_eq!(problem_objects(&r), vec![repo.key(bp)], "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([b1.clone()]), "{r}");
    assert!(r["problems"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("missing"));
    std::fs::write(bp, &keep).unwrap();

    // A missing index block of a's incremental: a2 is damaged, a1 is not.
    let ix = &a2_index[0];
    let keep = std::fs::read(ix).unwrap();
    std::fs::remove_file(ix).unwrap();
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok);
    assert_eq!(problem_objects(&r), vec![repo.key(ix)], "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([a2.clone()]), "{r}");
    std::fs::write(ix, &keep).unwrap();

    // A truncated manifest of b.
    let manifest = repo.objects.join("snapshots").join(&b1);
    let keep = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &keep[..keep.len() / 2]).unwrap();
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok);
    assert_eq!(problem_objects(&r), vec![format!("snapshots/{b1}")], "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([b1.clone()]), "{r}");
    std::fs::write(&manifest, &keep).unwrap();

    // Repaired: clean again, reading everything.
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(ok, "{err} {r}");

    // A deleted snapshot leaves unreferenced objects, reported as such
    // (garbage, not damage).
    d.ok(&["cloudsnap", "delete", "--snap", &b1]);
    let (ok, r, _) = check(&d, &[]);
    assert!(ok, "{r}");
    assert!(r["unreferenced_packs"].as_u64().unwrap() >= 1, "{r}");

    // Bad arguments.
    let out = d.blockctl(&["repo", "check", "--subset", "1/2"]);
    assert!(!out.status.success());
    let out = d.blockctl(&["repo", "check", "--read-data", "--subset", "3/2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("n/m"));
    let out = d.blockctl(&["repo", "check", "--cred-id", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no location (credentials) named"));
}

/// The pack file and record offset of the first chunk of index block
/// `block`, read from the files `index` in the clear (the test location
/// has no passphrase: `1 | block u64 | count u32 | entries | tag`, an
/// entry `start len chunk_off (u32) | id (32) | pack (16) | offset
/// stored_len plain_len (u32)`).
fn first_chunk(repo: &Repo, index: &[PathBuf], block: u64) -> (PathBuf, usize) {
    for p in index {
        let b = std::fs::read(p).unwrap();
        if b.len() < 13 + 72 || b[0] != 1 || b[1..9] != block.to_le_bytes() {
            continue;
        }
        let e = &b[13..13 + 72];
        if e[..4] != [0; 4] {
            continue;
        }
        let pack = hex_of(&e[44..60]);
        let offset = u32::from_le_bytes(e[60..64].try_into().unwrap()) as usize;
        return (
            repo.objects.join("packs").join(&pack[..2]).join(&pack),
            offset,
        );
    }
    panic!("no index block {block} starting at 0");
}

/// Flips a byte inside the record of the chunk at offset 0 of index
/// block 0 (among `index`); returns its pack.
fn damage_first_chunk(repo: &Repo, index: &[PathBuf]) -> PathBuf {
    let (pack, offset) = first_chunk(repo, index, 0);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[offset + 100] ^= 0x01;
    std::fs::write(&pack, &bytes).unwrap();
    pack
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The files under `objects/damaged` (damage records).
fn records(repo: &Repo) -> Vec<PathBuf> {
    files_under(&repo.objects.join("damaged"))
}

/// The objects the damage records are about (a record's key is
/// `damaged/<object key>.<tag>`), sorted, once each.
fn record_objects(repo: &Repo) -> Vec<String> {
    let objects: BTreeSet<String> = records(repo)
        .iter()
        .map(|p| {
            let key = repo.key(p);
            let key = key.strip_prefix("damaged/").unwrap();
            let (object, tag) = key.rsplit_once('.').unwrap();
            assert_eq!(tag.len(), 16, "{key}");
            object.to_string()
        })
        .collect();
    objects.into_iter().collect()
}

#[test]
fn backups_after_a_check_found_damage_store_it_again() {
    if !need() {
        return;
    }
    let (d, tmp, repo) = start();
    // a: two index blocks (64 MiB each) of data; b: one.
    d.create("a", "80M");
    let img_a = image(tmp.path(), "a.img", 80 * MB, 80 * MB, 7);
    load(&d, "a", &img_a);
    let a1 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    let a1_index = repo.index();
    d.create("b", "16M");
    let img_b = image(tmp.path(), "b.img", 16 * MB, 16 * MB, 8);
    load(&d, "b", &img_b);
    let b1 = backup(&d, &["b"])["snapshot"].as_str().unwrap().to_string();
    let b1_index = new_files(&a1_index, &repo.index());
    let i = repo.index();
    d.create("c", "16M");
    let img_c = image(tmp.path(), "c.img", 16 * MB, 16 * MB, 9);
    load(&d, "c", &img_c);
    let c1 = backup(&d, &["c"])["snapshot"].as_str().unwrap().to_string();
    let c1_index = new_files(&i, &repo.index());

    // A flipped byte in the record of each one's first chunk.
    let mut packs = Vec::new();
    for index in [&a1_index, &b1_index, &c1_index] {
        packs.push(damage_first_chunk(&repo, index));
    }
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(!ok, "{r}");
    let all1 = BTreeSet::from([a1.clone(), b1.clone(), c1.clone()]);
    assert_eq!(damaged(&r), all1, "{r}");
    let mut keys: Vec<String> = packs.iter().map(|p| repo.key(p)).collect();
    keys.sort();
    assert_eq!(recorded(&r), keys, "{r}");
    assert!(err.contains("new backups read what used it"), "{err}");
    assert_eq!(records(&repo).len(), 3);
    assert_eq!(record_objects(&repo), keys);
    // Checks at once, one reading data and one not: neither undoes what
    // the other records, and both report every damaged snapshot.
    for _ in 0..3 {
        let both = std::thread::scope(|s| {
            let a = s.spawn(|| check(&d, &["--read-data"]));
            let b = s.spawn(|| check(&d, &[]));
            [a.join().unwrap(), b.join().unwrap()]
        });
        for (ok, r, _) in &both {
            assert!(!ok, "{r}");
            assert_eq!(damaged(r), all1, "{r}");
            assert_eq!(recorded(r), keys, "{r}");
        }
        assert_eq!(record_objects(&repo), keys);
    }
    // A check that does not read data cannot see that damage: it keeps
    // the records, and reports them (one record per object again).
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok, "{r}");
    assert_eq!(recorded(&r), keys, "{r}");
    assert_eq!(damaged(&r), all1, "{r}");
    assert_eq!(records(&repo).len(), 3);

    // An incremental of a that changes only its second block: the first,
    // unchanged, is read from the volume again instead of kept. A full
    // backup of b stores the damaged chunk again instead of referencing
    // it where it found it unchanged.
    write_both(&d, "a", &img_a, "write -P 0x5a 70M 4k");
    let i1 = repo.index();
    let a2 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    let a2_index = new_files(&i1, &repo.index());
    let b2 = backup(&d, &["b", "--full"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // An incremental of c that changes its damaged block elsewhere than
    // the damaged chunk: the whole block is read again.
    write_both(&d, "c", &img_c, "write -P 0x77 8M 4k");
    let c2 = backup(&d, &["c"])["snapshot"].as_str().unwrap().to_string();
    let (ok, r, _) = check(&d, &["--read-data"]);
    assert!(!ok, "{r}");
    assert_eq!(damaged(&r), all1, "{r}");
    for (snap, vol, img) in [
        (&a2, "ra2", &img_a),
        (&b2, "rb2", &img_b),
        (&c2, "rc2", &img_c),
    ] {
        assert_eq!(restore(&d, snap, vol, &[])["state"], "Done");
        assert_same(&d, img, vol);
    }

    // A missing index block (a2's of the second block): the next
    // incremental, with nothing changed there, writes it again.
    let second = a2_index
        .iter()
        .find(|p| {
            let b = std::fs::read(p).unwrap();
            b.len() > 9 && b[0] == 1 && b[1..9] == 1u64.to_le_bytes()
        })
        .expect("a2 wrote an index block for the second block");
    std::fs::remove_file(second).unwrap();
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok, "{r}");
    assert!(recorded(&r).contains(&repo.key(second)), "{r}");
    assert!(damaged(&r).contains(&a2), "{r}");
    write_both(&d, "a", &img_a, "write -P 0x33 1M 4k");
    let a3 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    let (ok, r, _) = check(&d, &["--read-data"]);
    assert!(!ok, "{r}");
    assert_eq!(
        damaged(&r),
        BTreeSet::from([a1.clone(), a2.clone(), b1.clone(), c1.clone()]),
        "{r}"
    );
    assert_eq!(restore(&d, &a3, "ra3", &[])["state"], "Done");
    assert_same(&d, &img_a, "ra3");

    // Once no snapshot uses the damage, collection deletes the damaged
    // packs and their records go with them; a check drops the record of
    // the index block, which nothing uses any more.
    for s in [&a1, &a2, &b1, &c1] {
        d.ok(&["cloudsnap", "delete", "--snap", s]);
    }
    d.ok(&["repo", "gc", "--grace", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    d.ok(&["repo", "gc", "--grace", "1s"]);
    assert!(
        packs.iter().all(|p| !p.exists()),
        "the damaged packs were collected"
    );
    assert_eq!(record_objects(&repo), vec![repo.key(second)]);
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(ok, "{err} {r}");
    assert!(recorded(&r).is_empty(), "{r}");
    assert!(records(&repo).is_empty());
}

/// A backup that started before a check recorded damage (so it lists no
/// record) and took a damaged chunk into a new snapshot: the next check,
/// one that does not read data, traces the recorded offsets again, names
/// that snapshot, and keeps the record after the snapshots it first named
/// are gone, so the backup after it stores that range anew.
#[test]
fn a_backup_that_raced_the_check_is_named_by_the_next_check() {
    if !need() {
        return;
    }
    let (d, tmp, repo) = start();
    let (img, a1, pack) = backed_up_then_damaged(&d, &repo, tmp.path(), "a", 16 * MB, 11);

    // The backup runs as if it had listed the records before the check
    // wrote them: it changes the damaged block elsewhere and takes the
    // damaged chunk, unchanged at its place, from its parent.
    let a2 = without_damage_records(&repo.objects, || {
        write_both(&d, "a", &img, "write -P 0x77 8M 4k");
        backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string()
    });

    // The snapshot the first check traced goes; the one written meanwhile
    // is named, from the record alone.
    d.ok(&["cloudsnap", "delete", "--snap", &a1]);
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok, "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([a2.clone()]), "{r}");
    assert_eq!(recorded(&r), vec![repo.key(&pack)], "{r}");
    assert!(
        r["problems"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("found damaged earlier (by `repo check --read-data`"),
        "{r}"
    );

    // So the next backup, here a group backup with another volume, reads
    // that block again instead of reusing it.
    write_both(&d, "a", &img, "write -P 0x78 9M 4k");
    d.create("b", "4M");
    let tasks = backup_group(&d, &["--volume-ids", "a,b"]);
    let a3 = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["volume"] == "a")
        .unwrap_or_else(|| panic!("no task of a: {tasks}"));
    assert_eq!(a3["state"], "Done", "{a3}");
    let a3 = a3["snapshot"].as_str().unwrap().to_string();
    let (ok, r, _) = check(&d, &["--read-data"]);
    assert!(!ok, "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([a2.clone()]), "{r}");
    assert_eq!(restore(&d, &a3, "ra3", &[])["state"], "Done");
    assert_same(&d, &img, "ra3");

    // Once nothing uses the damaged record, a check passes but keeps the
    // record while the pack is there (a backup running meanwhile may yet
    // commit a reference to it); collection deletes both.
    d.ok(&["cloudsnap", "delete", "--snap", &a2]);
    let (ok, r, err) = check(&d, &[]);
    assert!(ok, "{err} {r}");
    assert_eq!(recorded(&r), vec![repo.key(&pack)], "{r}");
    d.ok(&["repo", "gc", "--grace", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    d.ok(&["repo", "gc", "--grace", "1s"]);
    assert!(!pack.exists(), "the damaged pack was collected");
    let (ok, r, err) = check(&d, &[]);
    assert!(ok, "{err} {r}");
    assert!(recorded(&r).is_empty(), "{r}");
    assert!(records(&repo).is_empty());
}

/// Backups after one that raced the check, before any check names it:
/// the first of them reads its parent's index blocks (that backup did not
/// avoid the record) and stores the ranges that use the damage anew, the
/// unchanged ones too; the ones after it keep its blocks without reading
/// them. Without this, every backup until the next check carries the
/// damage on, each reporting Done.
#[test]
fn backups_after_one_that_raced_the_check_do_not_take_its_damage() {
    if !need() {
        return;
    }
    let (d, tmp, repo) = start();
    // Two index blocks (64 MiB each) of data.
    let (img, a1, _) = backed_up_then_damaged(&d, &repo, tmp.path(), "a", 80 * MB, 12);

    // a2 runs as if it had listed the records before the check wrote
    // them: its new first block takes the damaged chunk from a1.
    let a2 = without_damage_records(&repo.objects, || {
        write_both(&d, "a", &img, "write -P 0x77 8M 4k");
        backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string()
    });

    // a3 changes only the second block: a2's first, which no record
    // names, is read and found to use the damage, so it is stored anew.
    let screened = "the parent's backup did not avoid";
    write_both(&d, "a", &img, "write -P 0x78 70M 4k");
    let a3 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    assert_eq!(d.log().matches(screened).count(), 1, "{}", d.log());
    // a4 keeps a3's first block: a3's backup avoided the damage.
    write_both(&d, "a", &img, "write -P 0x79 71M 4k");
    let a4 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    assert_eq!(d.log().matches(screened).count(), 1, "{}", d.log());

    let (ok, r, _) = check(&d, &["--read-data"]);
    assert!(!ok, "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([a1, a2]), "{r}");
    for (snap, vol) in [(&a3, "ra3"), (&a4, "ra4")] {
        assert_eq!(restore(&d, snap, vol, &[])["state"], "Done", "{snap}");
    }
    assert_same(&d, &img, "ra4");

    // A restored snapshot is a base whose backup is unknown here: the
    // next backup reads its blocks too (and finds them whole).
    d.ok(&["volume", "delete", "a"]);
    assert_eq!(restore(&d, &a4, "a", &[])["state"], "Done");
    write_both(&d, "a", &img, "write -P 0x7a 72M 4k");
    let a5 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    assert_eq!(d.log().matches(screened).count(), 2, "{}", d.log());
    assert_eq!(restore(&d, &a5, "ra5", &[])["state"], "Done");
    assert_same(&d, &img, "ra5");
}
