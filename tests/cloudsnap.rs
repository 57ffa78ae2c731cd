//! Cloud snapshots against the embedded `local` location and other local
//! directories: round trips (full, incremental, group, second host),
//! stop, kill -9 and resume, corruption, a flaky store, credentials.

mod common;

use std::path::Path;
use std::process::Command;

use common::cloud::*;
use common::*;
use serde_json::Value;

#[test]
fn full_and_incremental_round_trip_bit_exact() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "64M");
    let img = image(tmp.path(), "a.img", 64 * MB, 40 * MB, 1);
    load(&d, "vol1", &img);
    let first_copy = tmp.path().join("first.img");
    std::fs::copy(&img, &first_copy).unwrap();

    let t1 = backup(&d, &["vol1"]);
    assert_eq!(t1["full"], true, "the first backup reads everything: {t1}");

    // 64 scattered 4 KiB writes: an incremental reads and uploads about that.
    scatter(&d, "vol1", &img, 64, 7);
    let t2 = backup(&d, &["vol1"]);
    assert_eq!(t2["full"], false, "{t2}");
    let changed = 64 * 4096;
    let read = t2["bytes_total"].as_u64().unwrap();
    assert!(
        read <= changed,
        "incremental read {read} bytes for {changed} changed"
    );
    let up = t2["bytes_transferred"].as_u64().unwrap();
    assert!(
        up <= changed * 3 / 2 + 64 * 1024,
        "incremental uploaded {up} bytes for {changed} changed"
    );

    // A forced full read re-reads everything but stores almost nothing new.
    let t3 = backup(&d, &["vol1", "--full"]);
    assert_eq!(t3["full"], true);
    // Only the 64 KiB windows holding a changed extent are stored anew.
    let rewritten = 64 * 65536;
    assert!(
        t3["bytes_reused"].as_u64().unwrap() >= 40 * MB as u64 - rewritten,
        "{t3}"
    );
    assert!(
        t3["bytes_transferred"].as_u64().unwrap() < rewritten + MB as u64,
        "{t3}"
    );

    let snaps = list(&d, &["--src", "vol1"]);
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    assert_eq!(snaps[1]["parent"], snaps[0]["id"]);

    // Latest by volume name, and each point in time by id.
    let r = restore(&d, "vol1", "latest", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "latest");
    let r = restore(&d, snaps[1]["id"].as_str().unwrap(), "second", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "second");
    let r = restore(&d, snaps[0]["id"].as_str().unwrap(), "first", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &first_copy, "first");
    // The restored volume has the snapshot's geometry and is sparse.
    let v = json(&d.ok(&["-j", "volume", "inspect", "first"]));
    assert_eq!(v["size"], 64 * MB);
    assert!(v["allocated"].as_u64().unwrap() < 48 * MB as u64, "{v}");

    // Any snapshot can go on its own: the others stay restorable.
    d.ok(&[
        "cloudsnap",
        "delete",
        "--snap",
        snaps[1]["id"].as_str().unwrap(),
    ]);
    assert_eq!(list(&d, &["--src", "vol1"]).len(), 2);
    let r = restore(&d, snaps[2]["id"].as_str().unwrap(), "third", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "third");
    let c = json(&d.ok(&[
        "-j",
        "cloudsnap",
        "catalog",
        snaps[2]["id"].as_str().unwrap(),
        "--verify",
    ]));
    assert_eq!(c["verified"]["bytes"], c["data_bytes"], "{c}");
    assert!(
        c["verified"]["bytes"].as_u64().unwrap() >= 40 * MB as u64 - changed,
        "{c}"
    );
    // After an incremental of 4 KiB writes into 64 KiB chunks, the verify
    // reports the snapshot's data, not the larger chunks it checked.
    scatter(&d, "vol1", &img, 8, 11);
    let t = backup(&d, &["vol1"]);
    assert_eq!(t["full"], false, "{t}");
    let c = json(&d.ok(&["-j", "cloudsnap", "catalog", "vol1", "--verify"]));
    assert_eq!(c["verified"]["bytes"], c["data_bytes"], "{c}");
    assert!(
        c["verified"]["chunk_bytes"].as_u64() > c["data_bytes"].as_u64(),
        "{c}"
    );
    let text = d.ok(&["cloudsnap", "catalog", "vol1", "--verify"]);
    let data = c["data_bytes"].as_u64().unwrap();
    assert!(
        text.contains(&format!("({data} bytes) of data in")),
        "{text}"
    );

    // A full read skips holes: a never-written volume reads nothing.
    d.create("empty", "1G");
    let t = backup(&d, &["empty"]);
    let s = list(&d, &["--src", "empty"]);
    assert_eq!(s[0]["bytes_read"], 0, "{t}");
    let r = restore(&d, "empty", "empty-back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    let v = json(&d.ok(&["-j", "volume", "inspect", "empty-back"]));
    assert_eq!(v["size"], 1u64 << 30);
    // An existing volume name is refused; history shows the finished tasks.
    let out = d.blockctl(&["cloudsnap", "restore", "--snap", "vol1", "--volume", "vol1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let h = json(&d.ok(&["-j", "cloudsnap", "history"]));
    assert!(h.as_array().unwrap().len() >= 7, "{h}");
    // The last to end first.
    let ends: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["finished"].as_str().unwrap())
        .collect();
    assert!(ends.windows(2).all(|w| w[0] >= w[1]), "{ends:?}");
}

/// Growing a volume costs its next backup nothing: the backup before the
/// resize is still its parent, so the next one is an incremental of what
/// changed, and a full read references every chunk it already has.
#[test]
fn a_grown_volume_backs_up_only_its_changes() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("grow", "16M");
    let img = image(tmp.path(), "g.img", 16 * MB, 12 * MB, 21);
    load(&d, "grow", &img);
    let t = backup(&d, &["grow"]);
    assert_eq!(t["full"], true, "{t}");

    // The volume and its reference image grow alike.
    let grow = |mb: usize| {
        d.ok(&["volume", "resize", "grow", "--size", &format!("{mb}M")]);
        std::fs::File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len((mb * MB) as u64)
            .unwrap();
    };
    grow(32);
    // 64 KiB in the grown range, 4 KiB in the old one.
    write_both(&d, "grow", &img, "write -P 0x6b 20M 64k");
    write_both(&d, "grow", &img, "write -P 0x2c 4M 4k");
    let t = backup(&d, &["grow"]);
    assert_eq!(t["full"], false, "after a resize: {t}");
    let changed = 64 * 1024 + 4096;
    assert!(t["bytes_total"].as_u64().unwrap() <= changed, "{t}");
    assert!(
        t["bytes_transferred"].as_u64().unwrap() <= changed * 3 / 2 + 64 * 1024,
        "{t}"
    );
    let r = restore(&d, "grow", "grown-back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "grown-back");
    let v = json(&d.ok(&["-j", "volume", "inspect", "grown-back"]));
    assert_eq!(v["size"], 32 * MB);

    // Grown again, then read whole: the data it had is referenced.
    grow(48);
    let t = backup(&d, &["grow", "--full"]);
    assert_eq!(t["full"], true, "{t}");
    assert!(
        t["bytes_reused"].as_u64().unwrap() >= 12 * MB as u64,
        "a full read after a resize stores its unchanged chunks again: {t}"
    );
    assert!(t["bytes_transferred"].as_u64().unwrap() < MB as u64, "{t}");
    let r = restore(&d, "grow", "grown-full", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "grown-full");
    let snaps = list(&d, &["--src", "grow"]);
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    let r = restore(&d, snaps[0]["id"].as_str().unwrap(), "before-grow", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    let v = json(&d.ok(&["-j", "volume", "inspect", "before-grow"]));
    assert_eq!(v["size"], 16 * MB, "the first snapshot keeps its size");
}

#[test]
fn group_backup_freezes_members_together_and_each_restores() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    for (i, v) in ["db", "log"].iter().enumerate() {
        d.ok(&[
            "volume", "create", v, "--size", "16M", "--label", "app=shop",
        ]);
        let img = image(tmp.path(), v, 16 * MB, 8 * MB, 10 + i as u64);
        load(&d, v, &img);
        images.push(img);
    }
    d.create("other", "4M");
    let tasks = backup_group(&d, &["--label", "app=shop"]);
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    let group = tasks[0]["group"].as_str().unwrap().to_string();
    assert!(tasks
        .iter()
        .all(|t| t["group"] == group.as_str() && t["state"] == "Done"));
    let name = |t: &Value| {
        t["snapshot"]
            .as_str()
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(
        name(&tasks[0]),
        name(&tasks[1]),
        "one freeze point, one name"
    );
    assert!(d.dir.path().join("objects/groups").join(&group).exists());
    let snaps = list(&d, &[]);
    assert_eq!(snaps.len(), 2);
    for (i, v) in ["db", "log"].iter().enumerate() {
        let s = snaps.iter().find(|s| s["volume"] == *v).unwrap();
        assert_eq!(s["group"], group.as_str());
        let r = restore(&d, s["id"].as_str().unwrap(), &format!("{v}-r"), &[]);
        assert_eq!(r["state"], "Done", "{r}");
        assert_same(&d, &images[i], &format!("{v}-r"));
    }
    // The group's id where one snapshot is meant: refused, naming the
    // members to give instead.
    for args in [
        vec![
            "cloudsnap",
            "restore",
            "--snap",
            &group,
            "--volume",
            "whole",
        ],
        vec!["cloudsnap", "catalog", &group],
        vec!["cloudsnap", "catalog", "--snap", &group],
    ] {
        let out = d.blockctl(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is a group backup"), "{args:?}: {err}");
        for s in &snaps {
            assert!(err.contains(s["id"].as_str().unwrap()), "{args:?}: {err}");
        }
    }
    // status --name GROUP shows the members.
    let st = json(&d.ok(&["-j", "cloudsnap", "status", "--name", &group]));
    assert_eq!(st.as_array().unwrap().len(), 2);
    // Every member committed: the group is complete, also when listed
    // with one volume (the other member is looked up by itself).
    assert!(
        snaps.iter().all(|s| s["group_state"] == "complete"),
        "{snaps:?}"
    );
    let one = list(&d, &["--src", "log"]);
    assert_eq!(one.len(), 1, "{one:?}");
    assert_eq!(one[0]["group_state"], "complete", "{one:?}");
    let text = d.ok(&["cloudsnap", "list"]);
    assert!(
        text.contains(&group) && !text.contains("(incomplete)") && !text.contains("(running)"),
        "{text}"
    );
    // A member deleted since (by hand, or by retention): the one left is
    // no longer the whole group, listed with a volume or not, and in its
    // catalog.
    let db = snaps.iter().find(|s| s["volume"] == "db").unwrap();
    d.ok(&["cloudsnap", "delete", "--snap", db["id"].as_str().unwrap()]);
    for filter in [&[][..], &["--src", "log"][..]] {
        let left = list(&d, filter);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0]["group_state"], "partial", "{left:?}");
    }
    let log = snaps.iter().find(|s| s["volume"] == "log").unwrap();
    let cat = json(&d.ok(&["-j", "cloudsnap", "catalog", log["id"].as_str().unwrap()]));
    assert_eq!(cat["snap"]["group_state"], "partial", "{cat}");
    assert!(
        d.ok(&["cloudsnap", "list"])
            .contains(&format!("{group} (partial)")),
        "the listing does not say so"
    );
}

/// A group backup whose member was stopped committed the other members
/// but is not one point of the whole group: `cloudsnap list` and
/// `catalog` say so, while a member still runs and after, on the host
/// running it and on another host sharing the bucket.
#[test]
fn a_group_with_a_stopped_member_is_listed_as_incomplete() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let other = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("bucket").display().to_string();
    for h in [&d, &other] {
        h.ok(&[
            "credentials",
            "create",
            "shared",
            "--provider",
            "local",
            "--path",
            &bucket,
        ]);
    }
    // How the other host lists the group, once it says `want` (it
    // follows the running host's marks, written every 2 s).
    let seen_elsewhere = |want: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let snaps = list(&other, &["--cred-id", "shared"]);
            if snaps.len() == 1 && snaps[0]["group_state"] == want {
                let id = snaps[0]["id"].as_str().unwrap().to_string();
                let cat =
                    json(&other.ok(&["-j", "cloudsnap", "catalog", &id, "--cred-id", "shared"]));
                assert_eq!(cat["snap"]["group_state"], want, "{cat}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the other host never listed the group as {want}: {snaps:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    d.create("small", "4M");
    let small_img = image(tmp.path(), "small", 4 * MB, 4 * MB, 40);
    load(&d, "small", &small_img);
    d.create("big", "384M");
    load(&d, "big", &image(tmp.path(), "big", 384 * MB, 384 * MB, 41));
    let started = json(&d.ok(&[
        "-j",
        "cloudsnap",
        "backup-group",
        "--volume-ids",
        "small,big",
        "--cred-id",
        "shared",
    ]));
    let group = started["group"].as_str().unwrap().to_string();
    let task = |v: &str| {
        started["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["volume"] == v)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (small, big) = (task("small"), task("big"));
    assert_eq!(wait_done(&d, &small)["state"], "Done");
    // The small member is in the bucket; the big one still runs.
    let snaps = list(&d, &[]);
    assert_eq!(
        status(&d, &big)["state"],
        "Active",
        "the big member ended too soon"
    );
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["group"], group.as_str());
    assert_eq!(snaps[0]["group_state"], "running", "{snaps:?}");
    assert!(d
        .ok(&["cloudsnap", "list"])
        .contains(&format!("{group} (running)")));
    seen_elsewhere("running");
    assert_eq!(
        status(&d, &big)["state"],
        "Active",
        "the big member ended too soon"
    );
    let stopped = json(&d.ok(&["-j", "cloudsnap", "stop", &big]));
    assert_eq!(stopped["state"], "Stopped", "{stopped}");
    // Stopped: the member that is there restores on its own, and the
    // listing no longer passes it off as the whole group.
    let snaps = list(&d, &[]);
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["group_state"], "incomplete", "{snaps:?}");
    let id = snaps[0]["id"].as_str().unwrap().to_string();
    assert!(d
        .ok(&["cloudsnap", "list"])
        .contains(&format!("{group} (incomplete)")));
    let cat = json(&d.ok(&["-j", "cloudsnap", "catalog", &id]));
    assert_eq!(cat["snap"]["group_state"], "incomplete", "{cat}");
    let text = d.ok(&["cloudsnap", "catalog", &id]);
    assert!(text.contains(&format!("{group} (incomplete)")), "{text}");
    // The mark is gone at once, not left to lapse.
    seen_elsewhere("incomplete");
    let marks = tmp.path().join("bucket/locks/groups");
    assert!(files_under(&marks).is_empty(), "{:?}", files_under(&marks));
    let r = restore(&d, &id, "small-r", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &small_img, "small-r");
}

/// A group object the location refuses when the last member finishes is
/// kept in the state database and written once the location takes it,
/// after a restart too; until then the group is listed as running, not
/// as complete or incomplete.
#[test]
fn a_group_object_the_location_refused_is_written_later() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut imgs = Vec::new();
    for (i, v) in ["ga", "gb"].iter().enumerate() {
        d.create(v, "4M");
        let img = image(tmp.path(), v, 4 * MB, 4 * MB, 60 + i as u64);
        load(&d, v, &img);
        imgs.push(img);
    }
    // The repository exists; its `groups` directory cannot be made.
    backup(&d, &["ga"]);
    let groups = d.dir.path().join("objects/groups");
    assert!(!groups.exists());
    std::fs::write(&groups, b"in the way").unwrap();
    let tasks = backup_group(&d, &["--volume-ids", "ga,gb"]);
    let tasks = tasks.as_array().unwrap();
    assert!(tasks.iter().all(|t| t["state"] == "Done"), "{tasks:?}");
    let group = tasks[0]["group"].as_str().unwrap().to_string();
    let of_group = |d: &Blockd| {
        list(d, &[])
            .into_iter()
            .filter(|s| s["group"] == group.as_str())
            .collect::<Vec<_>>()
    };
    let snaps = of_group(&d);
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert!(
        snaps.iter().all(|s| s["group_state"] == "running"),
        "{snaps:?}"
    );
    assert!(d.log().contains("writing the group object failed"));
    // Still waiting after a restart, then written once the way is clear.
    assert!(d.terminate().success());
    d.spawn();
    assert!(of_group(&d).iter().all(|s| s["group_state"] == "running"));
    std::fs::remove_file(&groups).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let snaps = of_group(&d);
        if snaps.iter().all(|s| s["group_state"] == "complete") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not written within 60 s: {snaps:?}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(files_under(&groups).len(), 1);
    // Written once, and then forgotten: not written again at the next try.
    std::thread::sleep(std::time::Duration::from_secs(11));
    assert_eq!(d.log().matches("group backup recorded").count(), 1);
    let text = d.ok(&["cloudsnap", "list"]);
    assert!(
        text.contains(&group) && !text.contains(&format!("{group} (")),
        "{text}"
    );
    for (v, img) in ["ga", "gb"].iter().zip(&imgs) {
        let id = of_group(&d)
            .into_iter()
            .find(|s| s["volume"] == *v)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let r = restore(&d, &id, &format!("{v}-r"), &[]);
        assert_eq!(r["state"], "Done", "{r}");
        assert_same(&d, img, &format!("{v}-r"));
    }
}

#[test]
fn second_host_restores_from_an_encrypted_bucket() {
    if !need() {
        return;
    }
    let a = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("bucket");
    let bucket_s = bucket.display().to_string();
    let create = |d: &Blockd, pass: &str| {
        d.blockctl(&[
            "credentials",
            "create",
            "vault",
            "--provider",
            "local",
            "--path",
            &bucket_s,
            "--encryption-passphrase",
            pass,
        ])
    };
    assert!(create(&a, "correct horse").status.success());
    a.create("vol1", "16M");
    // A recognisable plaintext that must not appear in the bucket.
    let img = tmp.path().join("a.img");
    let mut bytes = b"PLAINTEXT-MARKER-0123456789".repeat(100_000);
    bytes.resize(16 * MB, 0);
    std::fs::write(&img, &bytes).unwrap();
    load(&a, "vol1", &img);
    let t = backup(&a, &["vol1", "--cred-id", "vault", "--label", "env=prod"]);
    let snap = t["snapshot"].as_str().unwrap().to_string();
    for f in files_under(&bucket) {
        let b = std::fs::read(&f).unwrap();
        assert!(
            !b.windows(16).any(|w| w == b"PLAINTEXT-MARKER"),
            "plaintext found in {}",
            f.display()
        );
    }
    // Secrets never printed.
    let l = a.ok(&["-j", "credentials", "list"]);
    assert!(!l.contains("correct horse"), "{l}");
    assert!(json(&l)
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["encryption"] == true));

    // A second host: empty state dir, same location.
    let b = Blockd::start();
    let out = create(&b, "wrong horse");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong encryption passphrase"), "{err}");
    let out = b.blockctl(&[
        "credentials",
        "create",
        "vault",
        "--provider",
        "local",
        "--path",
        &bucket_s,
    ]);
    assert!(
        !out.status.success(),
        "no passphrase for an encrypted repository must fail"
    );
    assert!(create(&b, "correct horse").status.success());
    // Disaster recovery as the README has it: `local` exists too, and no
    // --cred-id is needed to list the bucket and restore from it.
    let snaps = list(&b, &["--label", "env=prod"]);
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["id"], snap.as_str());
    assert_eq!(snaps[0]["location"], "vault");
    assert_eq!(
        list(&b, &["--cred-id", "vault", "--label", "env=dev"]).len(),
        0
    );
    let r = restore(&b, &snap, "dr", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&b, &img, "dr");
    // The restored volume's next backup is an incremental on that snapshot.
    let t = backup(&b, &["dr", "--cred-id", "vault"]);
    assert_eq!(t["full"], false, "{t}");
    assert_eq!(t["bytes_total"], 0);
}

/// Bytes in whole packs (a pack cut off by the kill is a staging file of
/// the local store, which garbage collection removes).
fn pack_bytes(dir: &Path) -> u64 {
    files_under(&dir.join("objects/packs"))
        .iter()
        .filter(|f| f.file_name().unwrap().to_string_lossy().len() == 32)
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

#[test]
fn kill9_mid_backup_and_mid_restore_resume_without_repeating_uploads() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let size = 384 * MB;
    d.create("big", "384M");
    let img = image(tmp.path(), "big.img", size, size, 5);
    load(&d, "big", &img);
    let started = json(&d.ok(&["-j", "cloudsnap", "backup", "big"]));
    let id = started["tasks"][0]["id"].as_str().unwrap().to_string();
    // Kill once some packs are uploaded, before the end.
    let t = wait_until(&d, &id, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) >= 20 * MB as u64
    });
    assert_eq!(
        t["state"], "Active",
        "finished before the kill: make the volume bigger"
    );
    d.kill9();
    d.spawn();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");
    assert!(d.log().contains("resuming task after restart"));
    // Random data does not compress: packs hold each chunk once, so their
    // total is the volume plus small per-chunk overhead; one pack (16 MiB)
    // uploaded twice would show.
    // The manifest's counts are not inflated by the redone part.
    let snaps = list(&d, &[]);
    assert_eq!(snaps[0]["bytes_read"], size, "{:?}", snaps[0]);
    assert_eq!(snaps[0]["bytes_new"], size, "{:?}", snaps[0]);
    let packs = pack_bytes(d.dir.path());
    assert!(
        packs >= size as u64 && packs < size as u64 + 4 * MB as u64,
        "packs hold {packs} bytes for {size}"
    );

    // Restore, killed mid-way, resumes and is bit-exact.
    let started = json(&d.ok(&[
        "-j",
        "cloudsnap",
        "restore",
        "--snap",
        "big",
        "--volume",
        "back",
    ]));
    let rid = started["tasks"][0]["id"].as_str().unwrap().to_string();
    let t = wait_until(&d, &rid, |t| {
        t["bytes_done"].as_u64().unwrap_or(0) >= 40 * MB as u64
    });
    assert_eq!(t["state"], "Active", "restore finished before the kill");
    // Not exported while it is being filled.
    let out = Command::new("nbdinfo").arg(d.uri("back")).output();
    if let Ok(out) = out {
        assert!(
            !out.status.success(),
            "a volume being restored must not be exported"
        );
    }
    d.kill9();
    d.spawn();
    let t = wait_done(&d, &rid);
    assert_eq!(t["state"], "Done", "{t}");
    assert_same(&d, &img, "back");
}

#[test]
fn local_snapshot_changes_count_until_a_backup_takes_them() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    d.create("vol1", "16M");
    backup(&d, &["vol1"]);
    let uri = d.uri("vol1");
    let dirty =
        |d: &Blockd| json(&d.ok(&["-j", "volume", "inspect", "vol1"]))["dirty_bytes"].clone();
    qemu_io(&uri, &["write -P 1 1M 4k"]);
    d.ok(&["snapshot", "create", "vol1", "--name", "s1"]);
    // The freeze moved the change into the snapshot; it is still a change
    // since the last backup.
    assert_eq!(dirty(&d), 4096);
    qemu_io(&uri, &["write -P 2 2M 4k"]);
    assert_eq!(dirty(&d), 8192);
    let t = backup(&d, &["vol1"]);
    assert_eq!(t["full"], false, "{t}");
    assert_eq!(t["bytes_total"], 8192, "the backup reads both changes: {t}");
    assert_eq!(dirty(&d), 0);
    // The backup stored s1's change: deleting s1 does not bring it back.
    d.ok(&["snapshot", "delete", "vol1@s1"]);
    assert_eq!(dirty(&d), 0);
    let t = backup(&d, &["vol1"]);
    assert_eq!(t["bytes_total"], 0, "nothing changed since: {t}");
    // Kept across a restart: a snapshot taken before a backup, deleted
    // after the daemon restarted.
    qemu_io(&uri, &["write -P 3 3M 4k"]);
    d.ok(&["snapshot", "create", "vol1", "--name", "s2"]);
    backup(&d, &["vol1"]);
    assert!(d.terminate().success());
    d.spawn();
    d.ok(&["snapshot", "delete", "vol1@s2"]);
    assert_eq!(dirty(&d), 0);
    let r = restore(&d, "vol1", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    // qemu_io asserts every pattern.
    qemu_io(
        &d.uri("back"),
        &["read -P 1 1M 4k", "read -P 2 2M 4k", "read -P 3 3M 4k"],
    );
}

#[test]
fn local_snapshots_racing_backup_freezes_lose_no_change() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "16M");
    backup(&d, &["vol1"]);
    let uri = d.uri("vol1");
    let dirty =
        |d: &Blockd| json(&d.ok(&["-j", "volume", "inspect", "vol1"]))["dirty_bytes"].clone();
    // Each round writes one block, then fires a local snapshot and a
    // backup at the same moment. Whichever freezes first, the backup must
    // carry the block: taken from the live map, or handed on from the
    // snapshot that froze it a moment before.
    let rounds = 8;
    for r in 1..=rounds {
        qemu_io(&uri, &[&format!("write -P {r} {r}M 4k")]);
        let name = format!("s{r}");
        let go = std::sync::Barrier::new(2);
        let t = std::thread::scope(|s| {
            let snap = s.spawn(|| {
                go.wait();
                d.ok(&["snapshot", "create", "vol1", "--name", &name]);
            });
            go.wait();
            let t = backup(&d, &["vol1"]);
            snap.join().unwrap();
            t
        });
        // Every seventh backup is a full one (the default full_every),
        // reading every block written so far.
        let expect = if t["full"] == true { r * 4096 } else { 4096 };
        assert_eq!(
            t["bytes_total"], expect,
            "round {r}: the backup must read what was written since the last: {t}"
        );
        assert_eq!(dirty(&d), 0, "round {r}: nothing left unsaved");
        // Deleting the snapshot gives back no change the backup took.
        d.ok(&["snapshot", "delete", &format!("vol1@{name}")]);
        assert_eq!(dirty(&d), 0, "round {r}: deleting {name}");
    }
    let r = restore(&d, "vol1", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    let reads: Vec<String> = (1..=rounds)
        .map(|r| format!("read -P {r} {r}M 4k"))
        .collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io(&d.uri("back"), &reads);
}

#[test]
fn stop_abandons_the_snapshot_and_keeps_its_changes() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "384M");
    let empty = image(tmp.path(), "empty.img", 384 * MB, 0, 1);
    backup(&d, &["vol1"]);
    let img = image(tmp.path(), "a.img", 384 * MB, 384 * MB, 3);
    load(&d, "vol1", &img);
    // A local snapshot holds the changes when the backup freezes: the
    // backup takes them over, and stopping it gives them back.
    d.ok(&["snapshot", "create", "vol1", "--name", "local"]);
    let before = list(&d, &[]).len();
    let started = json(&d.ok(&["-j", "cloudsnap", "backup", "vol1"]));
    let id = started["tasks"][0]["id"].as_str().unwrap().to_string();
    // The backup's freeze point cannot be deleted from under it, nor its volume.
    let snap = started["tasks"][0]["snapshot"]
        .as_str()
        .unwrap()
        .replace('/', "@");
    let out = d.blockctl(&["snapshot", "delete", &snap]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cloudsnap stop"),
        "{err}"
    );
    let out = d.blockctl(&["volume", "delete", "vol1", "--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cloudsnap stop"),
        "{err}"
    );
    let t = json(&d.ok(&["-j", "cloudsnap", "stop", &id]));
    assert_eq!(t["state"], "Stopped", "{t}");
    assert_eq!(
        list(&d, &[]).len(),
        before,
        "a stopped backup must not commit a snapshot"
    );
    let held = json(&d.ok(&["-j", "snapshot", "list"]));
    assert_eq!(held.as_array().unwrap().len(), 1, "{held}");
    assert_eq!(held[0]["name"], "local", "{held}");
    let v = json(&d.ok(&["-j", "volume", "inspect", "vol1"]));
    assert_eq!(
        v["dirty_bytes"],
        384 * MB,
        "the changes go back to the change set: {v}"
    );
    // Deleting the local snapshot neither loses nor doubles them.
    d.ok(&["snapshot", "delete", "vol1@local"]);
    let v = json(&d.ok(&["-j", "volume", "inspect", "vol1"]));
    assert_eq!(v["dirty_bytes"], 384 * MB, "{v}");
    // Stopping it again is refused; the next backup covers the changes.
    assert!(!d.blockctl(&["cloudsnap", "stop", &id]).status.success());
    let t = backup(&d, &["vol1"]);
    assert_eq!(t["full"], false);
    assert_eq!(t["bytes_total"], 384 * MB);
    let r = restore(&d, "vol1", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
    drop(empty);
}

#[test]
fn stop_with_a_group_id_stops_every_member() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    for (i, v) in ["db", "log"].iter().enumerate() {
        d.create(v, "384M");
        let img = image(tmp.path(), v, 384 * MB, 384 * MB, 20 + i as u64);
        load(&d, v, &img);
    }
    let started = json(&d.ok(&["-j", "cloudsnap", "backup-group", "--volume-ids", "db,log"]));
    let group = started["group"].as_str().unwrap().to_string();
    let stopped = json(&d.ok(&["-j", "cloudsnap", "stop", &group]));
    let stopped = stopped.as_array().unwrap();
    assert_eq!(stopped.len(), 2, "{stopped:?}");
    for t in stopped {
        assert_eq!(t["group"], group.as_str(), "{t}");
        assert_eq!(t["state"], "Stopped", "{t}");
    }
    assert!(list(&d, &[]).is_empty(), "a stopped group commits nothing");
    assert!(!d.dir.path().join("objects/groups").join(&group).exists());
    for v in ["db", "log"] {
        let info = json(&d.ok(&["-j", "volume", "inspect", v]));
        assert_eq!(info["dirty_bytes"], 384 * MB, "changes kept: {info}");
    }
    // Once nothing of it runs, stopping it again says so, and so does
    // stopping one member: a failure (1), not a wrong command line.
    let out = d.blockctl(&["cloudsnap", "stop", &group]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("no running task"),
        "{err}"
    );
    let member = stopped[0]["id"].as_str().unwrap();
    let out = d.blockctl(&["cloudsnap", "stop", member]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && err.contains(&format!("task {member} already ended (Stopped)")),
        "{err}"
    );
    let out = d.blockctl(&["cloudsnap", "stop", "no-such-task"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no-such-task"),
        "{err}"
    );
}

#[test]
fn corrupt_or_missing_objects_are_named_and_never_restored() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "8M");
    let img = image(tmp.path(), "a.img", 8 * MB, 8 * MB, 9);
    load(&d, "vol1", &img);
    let t = backup(&d, &["vol1"]);
    let snap = t["snapshot"].as_str().unwrap().to_string();
    let objects = d.dir.path().join("objects");
    let pack = files_under(&objects.join("packs"))[0].clone();
    // Objects under index/: index blocks (the repository is unencrypted,
    // so the first byte is the plain kind: 1) and the manifest's index map
    // (2).
    let kind = |p: &Path| std::fs::read(p).unwrap()[0];
    let index_objects = files_under(&objects.join("index"));
    let index = index_objects.iter().find(|p| kind(p) == 1).unwrap().clone();
    let map = index_objects.iter().find(|p| kind(p) == 2).unwrap().clone();
    let pack_key = pack.strip_prefix(&objects).unwrap().display().to_string();
    let index_key = index.strip_prefix(&objects).unwrap().display().to_string();
    let original = std::fs::read(&pack).unwrap();

    let expect_failure = |what: &str, object: &str, n: usize| {
        let out = d.blockctl(&["cloudsnap", "catalog", &snap, "--verify"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: verify passed");
        assert!(err.contains(&snap) && err.contains(object), "{what}: {err}");
        let vol = format!("r{n}");
        let r = restore(&d, &snap, &vol, &[]);
        assert_eq!(r["state"], "Failed", "{what}: {r}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(object), "{what}: {e}");
        let vols = d.ok(&["volume", "list"]);
        assert!(
            !vols.contains(&vol),
            "{what}: an incomplete volume was left: {vols}"
        );
    };

    // A flipped byte in the middle of a pack.
    let mut bad = original.clone();
    bad[original.len() / 2] ^= 0x40;
    std::fs::write(&pack, &bad).unwrap();
    expect_failure("flipped byte", &pack_key, 1);
    // A deleted pack.
    std::fs::remove_file(&pack).unwrap();
    expect_failure("deleted pack", &pack_key, 2);
    // A pack cut short.
    std::fs::write(&pack, &original[..original.len() / 3]).unwrap();
    expect_failure("truncated pack", &pack_key, 5);
    std::fs::write(&pack, &original).unwrap();
    // A truncated index block.
    let ix = std::fs::read(&index).unwrap();
    std::fs::write(&index, &ix[..ix.len() / 2]).unwrap();
    expect_failure("truncated index", &index_key, 3);
    // An absurdly large object where an index block should be.
    let f = std::fs::File::create(&index).unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    expect_failure("absurd index", &index_key, 4);
    std::fs::write(&index, &ix).unwrap();
    // A damaged or missing index map: the snapshot cannot be read at all,
    // so a restore is refused before it starts, naming the map.
    let map_key = map.strip_prefix(&objects).unwrap().display().to_string();
    let original_map = std::fs::read(&map).unwrap();
    for (n, (damage, said)) in [("truncated", "corrupt"), ("missing", "missing")]
        .iter()
        .enumerate()
    {
        if *damage == "truncated" {
            std::fs::write(&map, &original_map[..original_map.len() / 2]).unwrap();
        } else {
            std::fs::remove_file(&map).unwrap();
        }
        let err = d.fails(&["cloudsnap", "catalog", &snap], &map_key);
        assert!(err.contains(&snap), "{damage} map: {err}");
        let vol = format!("m{n}");
        let err = d.fails(
            &["cloudsnap", "restore", "--snap", &snap, "--volume", &vol],
            &map_key,
        );
        assert!(err.contains(said), "{damage} map: {err}");
        assert!(!d.ok(&["volume", "list"]).contains(&vol));
        // The volume's backups go on: the damaged snapshot was the base of
        // its next incremental, which reads the whole volume instead.
        if *damage == "truncated" {
            let t = backup(&d, &["vol1"]);
            assert_eq!(t["full"], true, "{t}");
            let r = restore(&d, t["snapshot"].as_str().unwrap(), "after", &[]);
            assert_eq!(r["state"], "Done", "{r}");
            assert_same(&d, &img, "after");
            d.ok(&["volume", "delete", "after"]);
        }
    }
    std::fs::write(&map, &original_map).unwrap();
    // Foreign objects under snapshots/ are listed as such, never used.
    std::fs::write(objects.join("snapshots/vol1/garbage"), b"not a manifest").unwrap();
    let l = list(&d, &[]);
    let g = l
        .iter()
        .find(|s| s["id"] == "vol1/garbage")
        .expect("listed");
    assert!(g["status"].as_str().unwrap().starts_with("Corrupt"), "{g}");
    // Its row gives it no type (it is no snapshot, full or incremental).
    let table = d.ok(&["cloudsnap", "list"]);
    let row = table
        .lines()
        .find(|r| r.contains("vol1/garbage"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        !row.contains(" Incr ") && !row.contains(" Full "),
        "{table}"
    );
    assert!(l
        .iter()
        .any(|s| s["id"] == snap.as_str() && s["status"] == "Done"));
    d.ok(&["cloudsnap", "delete", "--snap", "vol1/garbage"]);
    // Repaired: everything verifies and restores.
    d.ok(&["cloudsnap", "catalog", &snap, "--verify"]);
    let r = restore(&d, &snap, "ok", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "ok");
}

#[test]
fn a_backup_never_commits_under_keys_the_repository_does_not_hold() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    for (name, dir) in [("a", &a), ("b", &b), ("c", &c)] {
        local_location(&d, name, dir);
    }
    // As when two hosts initialise one repository at the same moment on a
    // store without conditional writes: the config `a` was opened with is
    // not the one the repository ends up with. Found before anything is
    // written.
    std::fs::copy(b.join("config"), a.join("config")).unwrap();
    d.create("v", "8M");
    let img = image(tmp.path(), "v.img", 8 * MB, 8 * MB, 61);
    load(&d, "v", &img);
    let e = d.fails(
        &["cloudsnap", "backup", "v", "--cred-id", "a"],
        "differs from the config this daemon opened",
    );
    assert!(e.contains("object config"), "{e}");
    assert!(list(&d, &["--cred-id", "a"]).is_empty());
    // Replaced while the backup runs (here in its pre-exec, after the
    // request's own check): it never commits.
    let pre = format!(
        "cp {} {}",
        c.join("config").display(),
        a.join("config").display()
    );
    let s = json(&d.ok(&[
        "-j",
        "cloudsnap",
        "backup",
        "v",
        "--cred-id",
        "a",
        "--pre-exec",
        &pre,
    ]));
    let t = wait_done(&d, s["tasks"][0]["id"].as_str().unwrap());
    assert_eq!(t["state"], "Failed", "committed under the wrong keys: {t}");
    let e = t["error"].as_str().unwrap();
    assert!(
        e.contains("object config") && e.contains("differs from the config this daemon opened"),
        "{e}"
    );
    assert!(list(&d, &["--cred-id", "a"]).is_empty());
    let v = json(&d.ok(&["-j", "volume", "inspect", "v"]));
    assert_eq!(v["dirty_bytes"], 8 * MB, "changes lost: {v}");
    // Its next use opens the repository again, with the keys it holds.
    let t = backup(&d, &["v", "--cred-id", "a"]);
    let r = restore(
        &d,
        t["snapshot"].as_str().unwrap(),
        "back",
        &["--cred-id", "a"],
    );
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

#[test]
fn flaky_store_still_backs_up_and_restores_exactly() {
    if !need() {
        return;
    }
    let d = Blockd::start_env(&[("BLOCKD_FAULT_INJECT", "0.05")]);
    let tmp = tempfile::tempdir().unwrap();
    let img = backed_up(&d, tmp.path(), "vol1", 64 * MB, 48 * MB, 21);
    scatter(&d, "vol1", &img, 200, 3);
    backup(&d, &["vol1"]);
    let r = restore(&d, "vol1", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
    // Verification (dozens of requests each) keeps passing until faults
    // were certainly injected.
    let mut faults = 0;
    for _ in 0..100 {
        d.ok(&["cloudsnap", "catalog", "vol1", "--verify"]);
        faults = d.log().matches("injected fault").count();
        if faults >= 5 {
            break;
        }
    }
    assert!(faults >= 5, "only {faults} faults were injected");
    eprintln!("{faults} faults injected and survived");
}

/// A provider failing half of its requests: some fail past their own
/// retries while the location answers. The tasks go on from their
/// checkpoints instead of failing: every backup and the restore end Done,
/// and the restore is exact. Starting a task makes requests of its own,
/// whose failure the caller sees (and repeats here, as a script would).
#[test]
fn a_store_failing_half_its_requests_still_finishes_its_tasks() {
    if !need() {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_FAULT_INJECT", "0.5")]);
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "64M");
    let img = image(tmp.path(), "vol1.img", 64 * MB, 48 * MB, 23);
    load(&d, "vol1", &img);
    let start = |args: &[&str]| -> String {
        let mut a = vec!["-j", "cloudsnap"];
        a.extend_from_slice(args);
        for _ in 0..50 {
            let out = d.blockctl(&a);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                let s = json(&String::from_utf8_lossy(&out.stdout));
                return s["tasks"][0]["id"].as_str().unwrap().to_string();
            }
            assert!(stderr.contains("injected fault"), "{args:?}: {stderr}");
        }
        panic!("{args:?} never started");
    };
    let mut rounds = 0;
    // A request fails past its retries about once in 30 (0.5^5): it
    // happens within a few rounds.
    for round in 0..40 {
        if round > 0 {
            scatter(&d, "vol1", &img, 100, round);
        }
        let t = wait_done(&d, &start(&["backup", "vol1"]));
        assert_eq!(t["state"], "Done", "round {round}: {t}");
        rounds += 1;
        if rounds >= 3
            && d.log()
                .contains("a request failed while the location answers")
        {
            break;
        }
    }
    assert!(
        d.log()
            .contains("a request failed while the location answers"),
        "no request failed past its retries in {rounds} backups"
    );
    // Restores under the same faults: each attempt records the GETs it
    // wrote, so the next goes on after them and they finish, exact.
    for n in 0..3 {
        let vol = format!("under{n}");
        let t = wait_done(&d, &start(&["restore", "--snap", "vol1", "--volume", &vol]));
        assert_eq!(t["state"], "Done", "restore {n}: {t}");
        assert_same(&d, &img, &vol);
    }
    // And from a store that no longer fails.
    assert!(d.terminate().success());
    d.env.clear();
    d.spawn();
    let r = restore(&d, "vol1", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

/// `dir` holds nothing: absent, or an empty directory.
fn empty_or_absent(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        let written: Vec<_> = entries.collect();
        assert!(
            written.is_empty(),
            "written into {}: {written:?}",
            dir.display()
        );
    }
}

/// A backup of a 512 MiB volume `big` of random data (from `seed`) under
/// way to local location `disk`: its directory, where a test may move it
/// (`away`), the volume's image and the task id.
struct Underway {
    disk: std::path::PathBuf,
    away: std::path::PathBuf,
    img: std::path::PathBuf,
    id: String,
}

fn backup_underway(d: &Blockd, tmp: &std::path::Path, seed: u64) -> Underway {
    let disk = tmp.join("disk");
    local_location(d, "disk", &disk);
    d.create("big", "512M");
    let img = image(tmp, "big.img", 512 * MB, 512 * MB, seed);
    load(d, "big", &img);
    let started = json(&d.ok(&["-j", "cloudsnap", "backup", "big", "--cred-id", "disk"]));
    let id = started["tasks"][0]["id"].as_str().unwrap().to_string();
    let t = wait_until(d, &id, |t| t["bytes_transferred"].as_u64() > Some(0));
    assert_eq!(t["state"], "Active", "the backup ended too soon: {t}");
    Underway {
        disk,
        away: tmp.join("away"),
        img,
        id,
    }
}

/// A local location's directory that goes while a backup writes to it (an
/// unmount, a move) gets nothing written in its place: the backup waits
/// for it, showing why, and completes once it is back.
#[test]
fn a_backup_waits_for_its_directory_and_writes_nothing_where_it_was() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let Underway {
        disk,
        away,
        img,
        id,
    } = backup_underway(&d, tmp.path(), 61);
    std::fs::rename(&disk, &away).unwrap();
    let t = wait_until(&d, &id, |t| {
        t["error"].as_str().is_some_and(|e| e.contains("is gone"))
    });
    assert_eq!(t["state"], "Active", "{t}");
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("waiting for the location"),
        "{t}"
    );
    // A write under way at the move may have made the directory itself
    // again, and then taken back what it wrote (an unmount leaves the
    // mount point anyway): nothing is in it.
    empty_or_absent(&disk);
    let _ = std::fs::remove_dir(&disk);
    // Restarted meanwhile (a boot before the disk is mounted): the backup
    // resumes and waits again, saying where the directory should be.
    d.terminate();
    d.spawn();
    let t = wait_until(&d, &id, |t| {
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not there"))
    });
    assert_eq!(t["state"], "Active", "{t}");
    assert!(!disk.exists(), "the resumed backup made {}", disk.display());
    // An empty mount point in its place takes nothing either.
    std::fs::create_dir(&disk).unwrap();
    let t = wait_until(&d, &id, |t| {
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("repository is gone"))
    });
    assert_eq!(t["state"], "Active", "{t}");
    empty_or_absent(&disk);
    // Back: the backup goes on from its last checkpoint and completes.
    std::fs::remove_dir(&disk).unwrap();
    std::fs::rename(&away, &disk).unwrap();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");
    let snap = t["snapshot"].as_str().unwrap().to_string();
    let r = restore(&d, &snap, "back", &["--cred-id", "disk"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
    d.ok(&[
        "cloudsnap",
        "catalog",
        &snap,
        "--verify",
        "--cred-id",
        "disk",
    ]);

    // The embedded location likewise: an empty directory where its
    // repository was is a repository gone, not a new one; once the
    // directory is removed, it starts afresh.
    d.create("small", "4M");
    backup(&d, &["small", "--cred-id", "local"]);
    let objects = d.dir.path().join("objects");
    std::fs::rename(&objects, tmp.path().join("objects-away")).unwrap();
    std::fs::create_dir(&objects).unwrap();
    let small = ["cloudsnap", "backup", "small", "--cred-id", "local"];
    d.fails(&small, "repository is gone");
    d.fails(&small, "repository is gone");
    let written: Vec<_> = std::fs::read_dir(&objects).unwrap().collect();
    assert!(
        written.is_empty(),
        "written into the mount point: {written:?}"
    );
    std::fs::remove_dir(&objects).unwrap();
    let t = backup(&d, &["small", "--cred-id", "local"]);
    assert_eq!(t["state"], "Done", "{t}");
    assert_eq!(list(&d, &["--cred-id", "local"]).len(), 1);
}

/// A backup cut short by a crash (kill -9) and resumed shows, when done,
/// the time it has run and the bytes it has moved since it started, not
/// since the restart: its checkpoints may be far apart, and the counters
/// are saved between them.
#[test]
fn a_backup_resumed_after_a_crash_counts_its_time_and_bytes_from_its_start() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let size = 512 * MB;
    let Underway {
        disk,
        away,
        img,
        id,
    } = backup_underway(&d, tmp.path(), 67);
    // Held up part way (its directory gone), well before a checkpoint,
    // and for long enough that its time counts for most of the total.
    std::fs::rename(&disk, &away).unwrap();
    let held = wait_until(&d, &id, |t| {
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("waiting for the location"))
    });
    assert_eq!(held["state"], "Active", "{held}");
    let from = held["elapsed_secs"].as_f64().unwrap();
    let t = wait_until(&d, &id, |t| {
        t["elapsed_secs"].as_f64().unwrap_or(0.0) >= from + 12.0
    });
    assert_eq!(t["state"], "Active", "{t}");
    let ran = t["elapsed_secs"].as_f64().unwrap();
    d.kill9();
    // (A write under way at the move may have made the directory again.)
    let _ = std::fs::remove_dir(&disk);
    std::fs::rename(&away, &disk).unwrap();
    d.spawn();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");
    assert!(d.log().contains("resuming task after restart"));
    // Every byte of the volume went up once, across both runs (random
    // data does not compress): the packs that landed before the crash are
    // counted, though the resumed run did not send them again.
    let moved = t["bytes_transferred"].as_u64().unwrap();
    assert!(
        moved >= size as u64,
        "{moved} bytes moved for {size}: the bytes moved before the crash are lost: {t}"
    );
    assert!(
        moved < size as u64 + 8 * MB as u64,
        "{moved} bytes moved for {size}: counted twice: {t}"
    );
    // The time before the crash counts, all but the last few seconds
    // (the counters are saved every 2 s).
    let elapsed = t["elapsed_secs"].as_f64().unwrap();
    assert!(
        elapsed >= ran - 5.0,
        "{elapsed} s shown, {ran} s had run before the crash: {t}"
    );
    let snap = t["snapshot"].as_str().unwrap().to_string();
    let r = restore(&d, &snap, "back", &["--cred-id", "disk"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

/// A backup resumed after a restart goes on only in the repository it
/// started in: a different one mounted at the same place holds none of
/// what its checkpoints name, and the backup fails saying so.
#[test]
fn a_resumed_backup_never_goes_on_in_another_repository() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let (disk, other) = (tmp.path().join("disk"), tmp.path().join("other"));
    for (name, dir) in [("disk", &disk), ("other", &other)] {
        local_location(&d, name, dir);
    }
    d.create("big", "512M");
    load(
        &d,
        "big",
        &image(tmp.path(), "big.img", 512 * MB, 512 * MB, 62),
    );
    let started = json(&d.ok(&["-j", "cloudsnap", "backup", "big", "--cred-id", "disk"]));
    let id = started["tasks"][0]["id"].as_str().unwrap().to_string();
    let t = wait_until(&d, &id, |t| t["bytes_transferred"].as_u64() > Some(0));
    assert_eq!(t["state"], "Active", "the backup ended too soon: {t}");
    d.terminate();
    // Another repository where the first one was.
    std::fs::rename(&disk, tmp.path().join("first")).unwrap();
    std::fs::rename(&other, &disk).unwrap();
    d.spawn();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Failed", "{t}");
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("is not the one it started in"),
        "{t}"
    );
    assert!(list(&d, &["--cred-id", "disk"]).is_empty());
    let v = json(&d.ok(&["-j", "volume", "inspect", "big"]));
    assert_eq!(v["dirty_bytes"], 512 * MB, "changes lost: {v}");
}

#[test]
fn credentials_rules_and_errors() {
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    // The embedded location exists and is the default.
    let l = json(&d.ok(&["-j", "credentials", "list"]));
    assert_eq!(l[0]["name"], "local");
    assert!(!d
        .blockctl(&["credentials", "delete", "local"])
        .status
        .success());
    // A wrong S3 endpoint: the provider's error, exit non-zero.
    let out = d.blockctl(&[
        "credentials",
        "create",
        "bad",
        "--provider",
        "s3",
        "--s3-endpoint",
        "127.0.0.1:9",
        "--s3-disable-ssl",
        "--bucket",
        "b",
        "--s3-access-key",
        "k",
        "--s3-secret-key",
        "SECRET-XYZ",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("validation failed") && err.contains("127.0.0.1:9"),
        "{err}"
    );
    assert!(!err.contains("SECRET-XYZ"), "secret printed: {err}");
    assert!(!d.log().contains("SECRET-XYZ"), "secret logged");
    // https:// with --s3-disable-ssl contradicts itself: refused, saying
    // which to change.
    d.fails(
        &[
            "credentials",
            "create",
            "mixed",
            "--provider",
            "s3",
            "--s3-endpoint",
            "https://127.0.0.1:9",
            "--s3-disable-ssl",
            "--bucket",
            "b",
            "--s3-access-key",
            "k",
            "--s3-secret-key",
            "s",
        ],
        "the endpoint https://127.0.0.1:9 is https://: give the endpoint as http://HOST:PORT",
    );
    // Missing flags are named.
    let out = d.blockctl(&[
        "credentials",
        "create",
        "x",
        "--provider",
        "s3",
        "--bucket",
        "b",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--s3-access-key"));
    // A second location makes --cred-id necessary.
    let dir = tmp.path().join("second").display().to_string();
    local_location(&d, "second", &dir);
    d.ok(&["credentials", "validate", "second"]);
    d.create("v", "1M");
    let out = d.blockctl(&["cloudsnap", "backup", "v"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cred-id"));
    backup(&d, &["v", "--cred-id", "second"]);
    assert_eq!(list(&d, &["--cred-id", "second"]).len(), 1);
    assert_eq!(list(&d, &["--cred-id", "local"]).len(), 0);
    // Alternating locations: each backup to `second` references what is
    // already there, although the one to `local` took the change set.
    let v = image(tmp.path(), "v.img", MB, MB, 71);
    load(&d, "v", &v);
    backup(&d, &["v", "--cred-id", "second"]);
    backup(&d, &["v", "--cred-id", "local"]);
    let t = backup(&d, &["v", "--cred-id", "second"]);
    assert_eq!(t["full"], true, "{t}");
    assert_eq!(t["bytes_reused"], MB, "{t}");
    // A location whose repository vanished (an unmounted directory) is an
    // error, never silently a new empty repository, and nothing is written
    // where it was: an unmounted mount point's backups would fill the file
    // system underneath and vanish at the next mount.
    let moved = tmp.path().join("moved");
    let second = tmp.path().join("second");
    std::fs::rename(&second, &moved).unwrap();
    let backup_second = ["cloudsnap", "backup", "v", "--cred-id", "second"];
    // Opened before it went: refused before anything is written.
    d.fails(&backup_second, "repository is gone");
    assert!(!second.exists(), "a backup made {}", second.display());
    // An empty mount point in its place: the same, and it stays empty.
    std::fs::create_dir(&second).unwrap();
    d.fails(&backup_second, "repository is gone");
    d.fails(&["credentials", "validate", "second"], "repository is gone");
    let written: Vec<_> = std::fs::read_dir(&second).unwrap().collect();
    assert!(
        written.is_empty(),
        "written into the mount point: {written:?}"
    );
    // No directory at all: named, and not made again.
    std::fs::remove_dir(&second).unwrap();
    d.fails(
        &["credentials", "validate", "second"],
        "is not there: if it is a mount point, mount it",
    );
    d.fails(&backup_second, "is not there");
    assert!(!second.exists(), "validate made {}", second.display());
    std::fs::rename(&moved, &second).unwrap();
    d.ok(&["credentials", "validate", "second"]);
    assert_eq!(list(&d, &["--cred-id", "second"]).len(), 3);
    // Reading needs no --cred-id: list shows every location's snapshots,
    // and a snapshot found in one location only is restored from there.
    let all = list(&d, &[]);
    assert_eq!(all.len(), 4, "{all:?}");
    assert_eq!(all.iter().filter(|s| s["location"] == "local").count(), 1);
    let in_second = all.iter().find(|s| s["location"] == "second").unwrap();
    let id = in_second["id"].as_str().unwrap();
    let r = restore(&d, id, "from-second", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    d.ok(&["cloudsnap", "catalog", id]);
    // A volume name whose snapshots are in both is ambiguous.
    let out = d.blockctl(&["cloudsnap", "restore", "--snap", "v", "--volume", "n"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("several locations (local, second)"),
        "{err}"
    );
    d.ok(&["volume", "delete", "from-second"]);
    // A backup of a volume that does not exist says so first, not which
    // location to choose.
    let out = d.blockctl(&["cloudsnap", "backup", "ghost"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ghost") && !err.contains("several locations"),
        "{err}"
    );
    // Flags of another provider are refused.
    let out = d.blockctl(&[
        "credentials",
        "create",
        "x",
        "--provider",
        "local",
        "--path",
        &dir,
        "--bucket",
        "b",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bucket"));
    // An unknown task name is an error.
    assert!(!d
        .blockctl(&["cloudsnap", "status", "--name", "nosuch"])
        .status
        .success());
    d.ok(&["credentials", "delete", "second"]);
    let out = d.blockctl(&["cloudsnap", "list", "--cred-id", "second"]);
    assert!(!out.status.success());
    // Unknown snapshots and volumes.
    let out = d.blockctl(&["cloudsnap", "restore", "--snap", "nope/x", "--volume", "n"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cloud snapshot"));
    let out = d.blockctl(&["cloudsnap", "backup", "missing"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn every_nth_backup_and_lost_tracking_read_everything() {
    if !need() {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_FULL_EVERY", "3")]);
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "8M");
    let img = image(tmp.path(), "a.img", 8 * MB, 4 * MB, 61);
    load(&d, "vol1", &img);
    let mut kinds = Vec::new();
    for i in 0..5 {
        scatter(&d, "vol1", &img, 4, 100 + i);
        kinds.push(backup(&d, &["vol1"])["full"].as_bool().unwrap());
    }
    // pxctl's rule with N = 3: full, then two incrementals, then full again.
    assert_eq!(kinds, [true, false, false, true, false]);
    // An unclean stop just after a write loses the change map: the next
    // backup reads everything.
    scatter(&d, "vol1", &img, 4, 200);
    d.kill9();
    d.spawn();
    let t = backup(&d, &["vol1"]);
    assert_eq!(t["full"], true, "{t}");
    // ...and still uploads little: unchanged chunks are referenced.
    assert!(t["bytes_transferred"].as_u64().unwrap() < MB as u64, "{t}");
    let r = restore(&d, "vol1", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

/// Sets finished backup task `id` back to active in the state database
/// of a stopped daemon: the state a crash leaves after the task's commit
/// and before it reported Done.
fn reactivate(d: &Blockd, id: &str) {
    let db = rusqlite::Connection::open(d.dir.path().join("state.db")).unwrap();
    let record: String = db
        .query_row("SELECT record FROM tasks WHERE id = ?1", [id], |r| r.get(0))
        .unwrap();
    let mut r = json(&record);
    assert_eq!(r["task"]["state"], "Done", "{r}");
    r["task"]["state"] = "Active".into();
    r["task"]["finished"] = Value::Null;
    db.execute(
        "UPDATE tasks SET record = ?2, active = 1 WHERE id = ?1",
        [id, &r.to_string()],
    )
    .unwrap();
}

/// A restart cuts a group backup short after each member committed: one
/// member after its base was recorded and its snapshot released, the
/// other after its manifest was written and its bucket session closed,
/// before its base. Both resume as Done without reading anything again,
/// the group object is written, and both volumes keep their change
/// tracking. (A finished backup's record is set back to active, and the
/// second member's local snapshot taken again under its name, to make
/// those states.)
#[test]
fn a_backup_cut_short_after_its_commit_resumes_as_done() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    for v in ["db", "log"] {
        d.ok(&["volume", "create", v, "--size", "8M", "--label", "app=shop"]);
        qemu_io(&d.uri(v), &["write -P 7 0 1M"]);
    }
    let tasks = backup_group(&d, &["--label", "app=shop"]);
    let tasks = tasks.as_array().unwrap();
    let group = tasks[0]["group"].as_str().unwrap().to_string();
    let task = |v: &str| {
        tasks
            .iter()
            .find(|t| t["volume"] == v)
            .unwrap_or_else(|| panic!("no task for {v}: {tasks:?}"))
            .clone()
    };
    let (db_task, log_task) = (task("db"), task("log"));
    let log_snap = log_task["snapshot"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(1)
        .unwrap();
    d.ok(&["snapshot", "create", "log", "--name", log_snap]);
    assert!(d.terminate().success());
    reactivate(&d, db_task["id"].as_str().unwrap());
    reactivate(&d, log_task["id"].as_str().unwrap());
    rusqlite::Connection::open(d.dir.path().join("state.db"))
        .unwrap()
        .execute("DELETE FROM backup_base WHERE volume = 'log'", [])
        .unwrap();
    let group_object = d.dir.path().join("objects/groups").join(&group);
    std::fs::remove_file(&group_object).unwrap();

    d.spawn();
    for t in [&db_task, &log_task] {
        let done = wait_done(&d, t["id"].as_str().unwrap());
        assert_eq!(done["state"], "Done", "{done}");
        assert_eq!(done["error"], Value::Null, "{done}");
        // Counted as the first run counted it (the manifest's own bytes
        // are estimated there), nothing uploaded again.
        let (now, then) = (
            done["bytes_transferred"].as_u64().unwrap(),
            t["bytes_transferred"].as_u64().unwrap(),
        );
        assert!(now >= then && now < then + 4096, "{done} after {t}");
        assert_eq!(done["bytes_total"], t["bytes_total"], "{done}");
    }
    assert!(d
        .log()
        .contains("the backup was committed before the restart"));
    assert!(
        group_object.exists(),
        "the group object is written on resume"
    );
    let left = json(&d.ok(&["-j", "snapshot", "list"]));
    assert_eq!(left.as_array().unwrap().len(), 0, "snapshots left: {left}");
    // The next backups build on these: they read only the new write.
    for v in ["db", "log"] {
        let i = json(&d.ok(&["-j", "volume", "inspect", v]));
        assert_eq!(i["tracking_known"], true, "{i}");
        qemu_io(&d.uri(v), &["write -P 8 2M 4k"]);
        let t = backup(&d, &[v]);
        assert_eq!(t["full"], false, "{t}");
        assert_eq!(t["bytes_total"], 4096, "{t}");
    }
}

/// `cloudsnap list` over every location: one that cannot be listed hides
/// none of the others. Their snapshots are shown (text and JSON), and the
/// command fails naming the one it could not list.
#[test]
fn listing_every_location_shows_the_others_and_names_the_one_that_fails() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    backed_up(&d, tmp.path(), "vol1", 4 * MB, 4 * MB, 3);
    let bucket = tmp.path().join("bucket");
    local_location(&d, "gone", &bucket);
    // The location's directory is replaced by a file: it cannot list.
    std::fs::remove_dir_all(&bucket).unwrap();
    std::fs::write(&bucket, b"not a directory").unwrap();
    let out = d.blockctl(&["cloudsnap", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("location gone") && err.contains("listed above"),
        "{err}"
    );
    assert!(listed.contains("vol1"), "{listed}");
    let out = d.blockctl(&["-j", "cloudsnap", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let snaps = json(&String::from_utf8_lossy(&out.stdout));
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["volume"], "vol1");
    assert_eq!(snaps[0]["location"], "local");
    let err = json(&String::from_utf8_lossy(&out.stderr));
    assert!(
        err["error"].as_str().unwrap().contains("location gone"),
        "{err}"
    );
    // Only the failing location asked for: its error alone.
    let out = d.blockctl(&["cloudsnap", "list", "--cred-id", "gone"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

/// A read-only bind mount of a directory, removed on drop.
struct ReadOnlyView(std::path::PathBuf);

impl ReadOnlyView {
    fn of(dir: &Path, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        sh(&format!(
            "mount --bind '{0}' '{1}' && mount -o remount,bind,ro '{1}'",
            dir.display(),
            at.display()
        ));
        Self(at.to_path_buf())
    }

    fn unmount(&self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

impl Drop for ReadOnlyView {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Read-only credentials on a directory a host may not write (a
/// read-only mount of the backups): a create without `--read-only` says
/// to add it; with it, nothing is made where there is no repository, a
/// second name that could write is told to delete the read-only one
/// first, scheduled collection leaves it alone, and once the mount goes
/// the repository is reported gone instead of empty.
#[test]
fn read_only_credentials_on_a_read_only_directory() {
    if !skip_unless(is_root(), "needs root for a read-only bind mount") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("bucket");
    let a = Blockd::start();
    local_location(&a, "src", &bucket);
    a.create("vol1", "16M");
    let img = image(tmp.path(), "a.img", 16 * MB, 8 * MB, 83);
    load(&a, "vol1", &img);
    backup(&a, &["vol1", "--cred-id", "src"]);
    let ro = ReadOnlyView::of(&bucket, &tmp.path().join("ro"));
    let ro_s = ro.0.to_str().unwrap().to_string();

    let b = Blockd::start_with(None, &["--gc-every", "1s"]);
    let create = |name: &str, path: &str, read_only: bool| {
        let mut args = vec![
            "credentials",
            "create",
            name,
            "--provider",
            "local",
            "--path",
            path,
        ];
        if read_only {
            args.push("--read-only");
        }
        b.blockctl(&args)
    };
    let err = |out: std::process::Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(create("dr", &ro_s, false));
    assert!(
        e.contains("can read the bucket but not write") && e.contains("--read-only"),
        "{e}"
    );
    let nowhere = tmp.path().join("nowhere");
    let e = err(create("dr", nowhere.to_str().unwrap(), true));
    assert!(e.contains("no repository here"), "{e}");
    assert!(
        !nowhere.exists(),
        "a read-only create made {}",
        nowhere.display()
    );
    assert!(create("dr", &ro_s, true).status.success());
    // A name that could write is told what to do about the read-only one.
    let e = err(create("drw", bucket.to_str().unwrap(), false));
    assert!(e.contains("credentials delete dr"), "{e}");

    let snaps = list(&b, &["--cred-id", "dr"]);
    assert_eq!(snaps.len(), 1);
    let snap = snaps[0]["id"].as_str().unwrap().to_string();
    let r = restore(&b, &snap, "back", &["--cred-id", "dr"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&b, &img, "back");
    // A damage record that does not open stops every backup; a check
    // through the read-only name, which cannot replace it, names it.
    let junk = bucket.join("damaged/packs/00/0011.0123456789abcdef");
    std::fs::create_dir_all(junk.parent().unwrap()).unwrap();
    std::fs::write(&junk, b"junk").unwrap();
    let out = b.blockctl(&["-j", "repo", "check", "--cred-id", "dr"]);
    assert!(!out.status.success());
    let r = json(&String::from_utf8_lossy(&out.stdout));
    assert!(
        r["problems"].as_array().unwrap().iter().any(|p| p["object"]
            == "damaged/packs/00/0011.0123456789abcdef"
            && p["reason"]
                .as_str()
                .unwrap()
                .contains("backups refuse to start")),
        "{r}"
    );
    assert!(junk.exists());
    std::fs::remove_file(&junk).unwrap();
    // Collection every second: never tried through the read-only name.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        !b.log().contains("scheduled garbage collection failed"),
        "{}",
        b.log()
    );

    // The directory goes: gone, not empty.
    ro.unmount();
    for cmd in [
        vec!["cloudsnap", "list", "--cred-id", "dr"],
        vec!["cloudsnap", "list"],
        vec![
            "cloudsnap",
            "restore",
            "--snap",
            &snap,
            "--volume",
            "again",
            "--cred-id",
            "dr",
        ],
        vec!["repo", "check", "--cred-id", "dr"],
    ] {
        b.fails(&cmd, "the repository is gone");
    }
    let cat = tmp.path().join("cat");
    std::fs::create_dir_all(&cat).unwrap();
    b.fails(
        &["mount", cat.to_str().unwrap(), "--cred-id", "dr"],
        "the repository is gone",
    );
}

/// Ctrl-C on `--wait` ends the wait, not the backup: blockctl says which
/// task goes on and how to follow or stop it, exits 130, and the backup
/// finishes.
#[test]
fn ctrl_c_on_wait_leaves_the_task_running_and_says_so() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("big", "1G");
    let img = image(tmp.path(), "big.img", 1024 * MB, 768 * MB, 41);
    load(&d, "big", &img);
    let child = std::process::Command::new(bin("blockctl"))
        .args(["--socket"])
        .arg(d.api_socket())
        .args(["cloudsnap", "backup", "big", "--wait"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the backup is under way.
    let id = loop {
        let tasks = json(&d.ok(&["-j", "cloudsnap", "status"]));
        if let Some(t) = tasks.as_array().unwrap().iter().find(|t| {
            t["volume"] == "big" && t["bytes_transferred"].as_u64().unwrap_or(0) >= 16 * MB as u64
        }) {
            assert_eq!(
                t["state"], "Active",
                "finished too soon: make it bigger: {t}"
            );
            break t["id"].as_str().unwrap().to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("stopped waiting; the daemon goes on with task(s)")
            && err.contains(&id)
            && err.contains(&format!("blockctl cloudsnap stop {id}")),
        "{err}"
    );
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");

    // Ctrl-C while blockd runs the pre-exec hook, before it answered:
    // blockctl says the backup still starts and how to see it, and it does.
    let ran = tmp.path().join("pre-exec-ran");
    let pre = format!("touch {}; sleep 8", ran.display());
    let child = std::process::Command::new(bin("blockctl"))
        .args(["--socket"])
        .arg(d.api_socket())
        .args(["cloudsnap", "backup", "big", "--pre-exec", &pre])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ran.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pre-exec never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted before blockd answered")
            && err.contains("the backup starts once its pre-exec hook")
            && err.contains("blockctl cloudsnap status"),
        "{err}"
    );
    let started = std::time::Instant::now();
    let id = loop {
        let tasks = json(&d.ok(&["-j", "cloudsnap", "status"]));
        if let Some(t) = tasks
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["volume"] == "big" && t["id"] != id.as_str())
        {
            break t["id"].as_str().unwrap().to_string();
        }
        assert!(started.elapsed().as_secs() < 30, "the backup never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(wait_done(&d, &id)["state"], "Done");
}

/// Hosts sharing a bucket may each have a volume of one name. A bare
/// volume name as `--snap` is refused on a host that backs up a volume of
/// that name itself when another host took the newest snapshot of it; a
/// host with no such volume (a disaster recovery) takes the newest.
#[test]
fn a_volume_name_two_hosts_back_up_is_not_resolved_to_the_other_hosts() {
    if !need() {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let (a, b, c) = (Blockd::start(), Blockd::start(), Blockd::start());
    share(&path, &[&a, &b, &c]);
    let tmp = tempfile::tempdir().unwrap();
    let mut snaps = Vec::new();
    for (d, seed) in [(&a, 31), (&b, 32)] {
        d.create("dup", "4M");
        let img = image(tmp.path(), &format!("{seed}.img"), 4 * MB, 4 * MB, seed);
        load(d, "dup", &img);
        let t = backup(d, &["dup", "--cred-id", "shared"]);
        snaps.push((t["snapshot"].as_str().unwrap().to_string(), img));
    }
    let (ours, newest) = (&snaps[0], &snaps[1]);
    // On a, b's snapshot is the newest of the name: refused, both named.
    for verb in [
        vec!["cloudsnap", "restore", "--snap", "dup", "--volume", "x"],
        vec!["cloudsnap", "catalog", "--snap", "dup"],
    ] {
        let out = a.blockctl(&verb);
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{verb:?}: {e}");
        assert!(
            e.contains(&newest.0) && e.contains(&ours.0) && e.contains("give the snapshot id"),
            "{e}"
        );
    }
    // The listing the message points to shows each one's host.
    let table = a.ok(&["cloudsnap", "list", "--src", "dup"]);
    for (d, (id, _)) in [(&a, ours), (&b, newest)] {
        let host = std::fs::read_to_string(d.dir.path().join("host-id")).unwrap();
        let row = table.lines().find(|r| r.contains(id.as_str()));
        assert!(
            row.is_some_and(|r| r.split_whitespace().any(|c| c == host.trim())),
            "{table}"
        );
    }
    // The id says which.
    let r = restore(&a, &ours.0, "mine", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&a, &ours.1, "mine");
    // On b, its own is the newest; on c, which has no dup, the newest.
    for d in [&b, &c] {
        let r = restore(d, "dup", "latest", &[]);
        assert_eq!(r["state"], "Done", "{r}");
        assert_same(d, &newest.1, "latest");
    }
    // c takes b's dup over (a disaster recovery): its volume dup, restored
    // from b's snapshot, is not a volume of its own yet ...
    let r = restore(&c, "dup", "dup", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    c.ok(&["cloudsnap", "catalog", "--snap", "dup"]);
    // ... until c backs it up: then b's next backup is the other host's.
    backup(&c, &["dup", "--cred-id", "shared"]);
    backup(&b, &["dup", "--cred-id", "shared"]);
    let out = c.blockctl(&["cloudsnap", "catalog", "--snap", "dup"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("this host backs up its own volume dup"), "{e}");
}
