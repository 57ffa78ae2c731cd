//! Garbage collection with two hosts on one Garage bucket (which ignores
//! conditional writes): host A backs up continuously, incrementals that
//! reference old chunks; host B deletes A's snapshots, often the very
//! parent A's running backup builds on, and collects with a 1 s grace
//! period, repacking every pack with a dead record and merging the small
//! ones, over and over, two collectors at once. At the end every
//! remaining snapshot of both hosts restores bit-exact and the repository
//! checks clean.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::cloud::*;
use common::objstores::Garage;
use common::*;
use serde_json::Value;

fn s3(d: &Blockd, g: &Garage) {
    let args = g.credentials_args("s3", &g.secret, Some("shared"));
    d.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn gc(d: &Blockd) -> Option<Value> {
    let out = d.blockctl(&[
        "-j",
        "repo",
        "gc",
        "--cred-id",
        "s3",
        "--grace",
        "1s",
        "--max-unused",
        "0%",
    ]);
    if out.status.success() {
        return Some(json(&String::from_utf8_lossy(&out.stdout)));
    }
    // Another collector holds the bucket: fine, it is doing the work.
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("another collector"), "repo gc failed: {e}");
    None
}

#[test]
fn two_hosts_back_up_delete_and_collect_on_one_bucket_and_lose_nothing() {
    if !need() {
        return;
    }
    let Some(g) = Garage::start() else { return };
    let a = Blockd::start();
    let b = Blockd::start();
    s3(&a, &g);
    s3(&b, &g);
    // Garage 2.5.0 overwrites on a second `If-None-Match: *` PUT: the
    // probe at create records that conditional writes are not honoured;
    // a local directory honours them.
    let locs = json(&a.ok(&["-j", "credentials", "list"]));
    let s3 = locs
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "s3")
        .unwrap();
    assert_eq!(s3["conditional_writes"], false, "{s3}");
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("r").display().to_string();
    a.ok(&[
        "credentials",
        "create",
        "dir",
        "--provider",
        "local",
        "--path",
        &path,
    ]);
    let locs = json(&a.ok(&["-j", "credentials", "list"]));
    let dir = locs
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "dir")
        .unwrap();
    assert_eq!(dir["conditional_writes"], true, "{dir}");
    a.ok(&["credentials", "delete", "dir"]);
    let tmp = tempfile::tempdir().unwrap();
    a.create("a", "32M");
    let img_a = image(tmp.path(), "a.img", 32 * MB, 24 * MB, 1);
    load(&a, "a", &img_a);
    b.create("b", "16M");
    let img_b = image(tmp.path(), "b.img", 16 * MB, 12 * MB, 2);
    load(&b, "b", &img_b);

    // What each snapshot must hold: a copy of the image at its backup.
    let mut expect: HashMap<String, PathBuf> = HashMap::new();
    let keep = |img: &PathBuf, snap: &str, expect: &mut HashMap<String, PathBuf>| {
        let copy = tmp.path().join(snap.replace('/', "_"));
        std::fs::copy(img, &copy).unwrap();
        expect.insert(snap.to_string(), copy);
    };
    let t = backup(&b, &["b", "--cred-id", "s3"]);
    keep(&img_b, t["snapshot"].as_str().unwrap(), &mut expect);
    // Two small incrementals of B: small packs that every collection
    // merges with A's (scattered 4 KiB writes leave no dead records, only
    // small packs), so records move while A's backups reference them.
    for i in 0..2 {
        scatter(&b, "b", &img_b, 16, 50 + 2 * i);
        let t = backup(&b, &["b", "--cred-id", "s3"]);
        keep(&img_b, t["snapshot"].as_str().unwrap(), &mut expect);
    }

    let done = AtomicBool::new(false);
    let mut collected = 0u64;
    let mut deleted_parents = 0;
    let mut repacked = 0u64;
    let mut repacked_a = 0u64;
    std::thread::scope(|s| {
        // Host B: delete A's snapshots (all but the newest, and every
        // third round the newest too: the parent of A's next or running
        // backup), collect.
        let deleter = s.spawn(|| {
            let mut round = 0;
            while !done.load(Ordering::Acquire) {
                round += 1;
                let snaps = list(&b, &["--cred-id", "s3", "--src", "a"]);
                let n = snaps.len();
                for (i, snap) in snaps.iter().enumerate() {
                    if i + 1 < n || round % 3 == 0 {
                        let id = snap["id"].as_str().unwrap();
                        let out =
                            b.blockctl(&["cloudsnap", "delete", "--cred-id", "s3", "--snap", id]);
                        if out.status.success() && i + 1 == n {
                            deleted_parents += 1;
                        }
                    }
                }
                if let Some(r) = gc(&b) {
                    collected += r["deleted_bytes"].as_u64().unwrap();
                    repacked += r["repacked_packs"].as_u64().unwrap();
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        // A second collector on host A, at the same time.
        let second = s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                if let Some(r) = gc(&a) {
                    repacked_a += r["repacked_packs"].as_u64().unwrap();
                }
                std::thread::sleep(Duration::from_millis(700));
            }
        });
        // Host A: incrementals, each a few scattered writes and a chunk.
        for i in 0..14 {
            scatter(&a, "a", &img_a, 24, 100 + i);
            // And one whole chunk: the parent's record goes dead, so its
            // pack is repacked (at 0% unused) once the parent is deleted.
            let cmd = format!("write -P {} {} 64k", i + 1, (i * 37 % 384) * 65536);
            write_both(&a, "a", &img_a, &cmd);
            let t = backup(&a, &["a", "--cred-id", "s3"]);
            keep(&img_a, t["snapshot"].as_str().unwrap(), &mut expect);
            std::thread::sleep(Duration::from_millis(150));
        }
        done.store(true, Ordering::Release);
        deleter.join().unwrap();
        second.join().unwrap();
    });
    // One last backup of A survives for sure.
    scatter(&a, "a", &img_a, 8, 999);
    let t = backup(&a, &["a", "--cred-id", "s3"]);
    keep(&img_a, t["snapshot"].as_str().unwrap(), &mut expect);
    // Sweep whatever is due, twice over the grace period.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(1200));
        if let Some(r) = gc(&b) {
            collected += r["deleted_bytes"].as_u64().unwrap();
        }
    }
    eprintln!(
        "collected {collected} bytes; repacked {repacked} + {repacked_a} packs; deleted {deleted_parents} newest snapshots; A's log: {} fenced parents, B's: {} held marks",
        a.log().matches("ran while garbage collection was marking").count(),
        b.log().matches("held=1").count()
    );
    assert!(collected > 0, "nothing was ever collected");
    assert!(
        repacked + repacked_a > 0,
        "no pack was ever repacked while backups ran"
    );
    assert!(
        deleted_parents > 0,
        "the test never deleted a running backup's parent"
    );

    let r = json(&b.ok(&["-j", "repo", "check", "--cred-id", "s3", "--read-data"]));
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    let left = list(&b, &["--cred-id", "s3"]);
    assert!(left.len() >= 2, "{left:?}");
    for (i, s) in left.iter().enumerate() {
        let id = s["id"].as_str().unwrap();
        let img = expect
            .get(id)
            .unwrap_or_else(|| panic!("unknown snapshot {id}"));
        let host = if id.starts_with("a/") { &a } else { &b };
        let vol = format!("r{i}");
        let r = restore(host, id, &vol, &["--cred-id", "s3"]);
        assert_eq!(r["state"], "Done", "{id}: {r}");
        assert_same(host, img, &vol);
    }
}
