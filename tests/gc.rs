//! `blockctl repo gc`: space comes back after the grace period and not
//! before, nothing live is ever deleted, a backup running (or killed) on
//! another host holds its objects, so does a restore on another host of a
//! snapshot deleted under it, a backup past its deadline cannot commit.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cloud::*;
use common::*;
use serde_json::Value;

fn gc(d: &Blockd, args: &[&str]) -> Value {
    let mut a = vec!["-j", "repo", "gc"];
    a.extend_from_slice(args);
    json(&d.ok(&a))
}

/// Deletes `snap` from the "shared" location, then collects twice, 1.5 s
/// apart, so that the second collection may sweep what the first marked
/// (grace 1 s). Returns the second collection's report.
fn delete_and_collect(a: &Blockd, snap: &str) -> Value {
    a.ok(&["cloudsnap", "delete", "--snap", snap, "--cred-id", "shared"]);
    gc(a, &["--cred-id", "shared", "--grace", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    gc(a, &["--cred-id", "shared", "--grace", "1s"])
}

fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

fn listing(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    files_under(dir)
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("/locks/"))
        .map(|p| {
            let n = std::fs::metadata(&p).unwrap().len();
            (p, n)
        })
        .collect()
}

fn check_clean(d: &Blockd, args: &[&str]) {
    let mut a = vec!["-j", "repo", "check", "--read-data"];
    a.extend_from_slice(args);
    let r = json(&d.ok(&a));
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
}

#[test]
fn gc_reclaims_after_the_grace_period_and_keeps_every_live_snapshot() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    d.create("v", "32M");
    // s1: 16 MiB of data; s2: the same range rewritten whole (s1's chunks
    // are then used by s1 alone); s3: an incremental on s2.
    let img1 = image(tmp.path(), "1.img", 32 * MB, 16 * MB, 1);
    load(&d, "v", &img1);
    let s1 = backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string();
    let img2 = image(tmp.path(), "2.img", 32 * MB, 16 * MB, 2);
    load(&d, "v", &img2);
    let s2 = backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string();
    scatter(&d, "v", &img2, 32, 9);
    let s3 = backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string();
    let before = bytes_under(&objects.join("packs"));

    // Plain mark and sweep here (repacking has tests/repack.rs).
    // Nothing unreferenced yet: nothing marked.
    let r = gc(&d, &["--grace", "2s", "--max-unused", "unlimited"]);
    assert_eq!(r["marked_packs"], 0, "{r}");
    assert_eq!(r["deleted_packs"], 0, "{r}");

    d.ok(&["cloudsnap", "delete", "--snap", &s1]);
    // --dry-run reports and changes nothing.
    let files = listing(&objects);
    let r = gc(
        &d,
        &["--dry-run", "--grace", "2s", "--max-unused", "unlimited"],
    );
    assert!(r["marked_packs"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["dry_run"], true);
    assert_eq!(listing(&objects), files, "--dry-run changed the bucket");
    assert!(files_under(&objects.join("locks/marks")).is_empty());

    // First run marks; a run within the grace period deletes nothing.
    let r = gc(&d, &["--grace", "2s", "--max-unused", "unlimited"]);
    let marked = r["marked_bytes"].as_u64().unwrap();
    assert!(marked >= 16 * MB as u64, "s1's data is condemned: {r}");
    assert_eq!(r["deleted_bytes"], 0, "{r}");
    let r = gc(&d, &["--grace", "2s", "--max-unused", "unlimited"]);
    assert_eq!(
        r["deleted_bytes"], 0,
        "deleted within the grace period: {r}"
    );
    assert_eq!(r["pending_marks"], 1, "{r}");
    assert_eq!(r["marked_packs"], 0, "condemned twice: {r}");
    assert_eq!(bytes_under(&objects.join("packs")), before);

    // After it: deleted, space back, everything left restores bit-exact.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let r = gc(&d, &["--grace", "2s", "--max-unused", "unlimited"]);
    assert!(
        r["deleted_bytes"].as_u64().unwrap() >= 16 * MB as u64,
        "{r}"
    );
    assert_eq!(r["swept_marks"], 1, "{r}");
    let after = bytes_under(&objects.join("packs"));
    // A group backup's mark its host stopped rewriting an hour ago goes
    // with the next run; a fresh one stays.
    let groups = objects.join("locks/groups/g1");
    std::fs::create_dir_all(&groups).unwrap();
    for host in ["dead", "alive"] {
        std::fs::write(groups.join(host), b"mark").unwrap();
    }
    std::fs::File::options()
        .write(true)
        .open(groups.join("dead"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();
    gc(&d, &["--grace", "2s", "--max-unused", "unlimited"]);
    assert!(
        !groups.join("dead").exists(),
        "a dead host's group mark was kept"
    );
    assert!(
        groups.join("alive").exists(),
        "a running group's mark was deleted"
    );
    std::fs::remove_file(groups.join("alive")).unwrap();
    assert!(
        after + 16 * MB as u64 <= before,
        "packs hold {after} bytes after GC, {before} before"
    );
    assert!(files_under(&objects.join("locks/marks")).is_empty());
    check_clean(&d, &[]);
    let r = restore(&d, &s2, "r2", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    let r = restore(&d, &s3, "r3", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img2, "r3");
    // The next backup after GC is still an incremental and restores.
    scatter(&d, "v", &img2, 8, 10);
    let t = backup(&d, &["v"]);
    assert_eq!(t["full"], false, "{t}");
    let r = restore(&d, "v", "r4", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img2, "r4");

    // A mark made with a long grace is swept by a later run with a short
    // one: the shorter grace applies.
    load(&d, "v", &img1);
    let s5 = backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string();
    load(&d, "v", &img2);
    backup(&d, &["v"]);
    d.ok(&["cloudsnap", "delete", "--snap", &s5]);
    let r = gc(&d, &["--grace", "1h", "--max-unused", "unlimited"]);
    assert!(r["marked_bytes"].as_u64().unwrap() >= 16 * MB as u64, "{r}");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let r = gc(&d, &["--grace", "1s", "--max-unused", "unlimited"]);
    assert_eq!(r["swept_marks"], 1, "a 1s run kept a 1h mark: {r}");
    assert!(
        r["deleted_bytes"].as_u64().unwrap() >= 16 * MB as u64,
        "{r}"
    );
    check_clean(&d, &[]);
    let r = restore(&d, "v", "r5", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img2, "r5");
}

/// Two hosts on one bucket (a shared directory): host A's backup is
/// killed mid-way; host B collects. A's session holds B's sweep until A
/// has resumed and committed; then B's sweep keeps A's packs, and B
/// restores A's snapshot bit-exact. A stopped backup's packs are
/// reclaimed after the grace period, not before.
#[test]
fn a_killed_backup_on_another_host_holds_the_sweep_and_its_leftovers_go_after_the_grace() {
    if !need() {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let mut a = Blockd::start();
    let b = Blockd::start();
    share(&path, &[&a, &b]);
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 * MB;
    a.create("big", "256M");
    let img = image(tmp.path(), "big.img", size, size, 5);
    load(&a, "big", &img);

    let id = backup_underway(&a, &["big", "--cred-id", "shared"], 40);
    a.kill9();
    let packs = Path::new(&path).join("packs");
    let orphaned = bytes_under(&packs);
    assert!(orphaned >= 32 * MB as u64);

    // B marks A's packs (unreferenced: A has not committed) ...
    let r = gc(&b, &["--cred-id", "shared", "--grace", "1s"]);
    assert!(r["marked_bytes"].as_u64().unwrap() >= 32 * MB as u64, "{r}");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // ... but may not sweep: A's backup started before the mark and may
    // still commit.
    let r = gc(&b, &["--cred-id", "shared", "--grace", "1s"]);
    assert_eq!(r["held_marks"], 1, "{r}");
    assert_eq!(r["holding"][0], id.as_str(), "{r}");
    assert_eq!(r["deleted_bytes"], 0, "{r}");
    assert!(bytes_under(&packs) >= orphaned);

    // A restarts, resumes and commits; B's sweep now keeps what A uses.
    a.spawn();
    let t = wait_done(&a, &id);
    assert_eq!(t["state"], "Done", "{t}");
    let snap = t["snapshot"].as_str().unwrap().to_string();
    let r = gc(&b, &["--cred-id", "shared", "--grace", "1s"]);
    assert_eq!(r["swept_marks"], 1, "{r}");
    // What the resumed backup uses was condemned, and is kept; what the
    // killed run wrote and the resumed one replaced (an index block) may
    // go. The check and the restore below prove nothing live went.
    assert!(r["kept"].as_u64().unwrap() >= 2, "{r}");
    check_clean(&b, &["--cred-id", "shared"]);
    let r = restore(&b, &snap, "copy", &["--cred-id", "shared"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&b, &img, "copy");

    // Host C's backup is killed and C never comes back: once its session
    // is past its deadline (3 s here) and the mark past the grace period,
    // its packs are reclaimed; not before.
    let mut c = Blockd::start_env(&[("BLOCKD_BACKUP_DEADLINE", "3s")]);
    share(&path, &[&c]);
    c.create("lost", "128M");
    let img_c = image(tmp.path(), "lost.img", 128 * MB, 128 * MB, 12);
    load(&c, "lost", &img_c);
    backup_underway(&c, &["lost", "--cred-id", "shared"], 24);
    c.kill9();
    let with_leftovers = bytes_under(&packs);
    let r = gc(&b, &["--cred-id", "shared", "--grace", "2s"]);
    assert!(r["marked_bytes"].as_u64().unwrap() >= 24 * MB as u64, "{r}");
    let r = gc(&b, &["--cred-id", "shared", "--grace", "2s"]);
    assert_eq!(r["deleted_bytes"], 0, "before the grace period: {r}");
    assert_eq!(bytes_under(&packs), with_leftovers);
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let r = gc(&b, &["--cred-id", "shared", "--grace", "2s"]);
    assert!(
        r["deleted_bytes"].as_u64().unwrap() >= 24 * MB as u64,
        "{r}"
    );
    assert!(bytes_under(&packs) + 24 * (MB as u64) <= with_leftovers);
    check_clean(&b, &["--cred-id", "shared"]);
    let r = restore(&b, &snap, "copy2", &["--cred-id", "shared"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&b, &img, "copy2");
}

/// A backup that ended while its session could not be removed (the store
/// was unreachable then) leaves the session in the bucket, where it would
/// hold every sweep back until its deadline (20 h by default); so does a
/// daemon killed while a backup's pre-exec ran, before its task existed.
/// This host's next collection removes every session of this host whose
/// task is not running, and leaves the session of a backup whose hooks
/// are running at that moment, which then completes.
#[test]
fn a_session_this_host_no_longer_uses_goes_at_the_next_collection() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "256M");
    let img = image(tmp.path(), "v.img", 256 * MB, 256 * MB, 7);
    load(&d, "v", &img);
    let id = backup_underway(&d, &["v"], 40);
    let sessions = d.dir.path().join("objects/locks/sessions");
    let session = std::fs::read(sessions.join(&id)).unwrap();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");
    assert!(
        !sessions.join(&id).exists(),
        "the backup closed its session"
    );
    // As if that close had failed; and a copy under another name, which
    // does not open (a session is sealed under its name): nobody's
    // known, it is left to its deadline.
    std::fs::write(sessions.join(&id), &session).unwrap();
    std::fs::write(sessions.join("unknown-task"), &session).unwrap();
    let r = gc(&d, &["--grace", "1s"]);
    assert!(!sessions.join(&id).exists(), "left in place: {r}");
    assert!(sessions.join("unknown-task").exists());
    std::fs::remove_file(sessions.join("unknown-task")).unwrap();
    assert!(
        d.log()
            .contains("removing the session of a backup of this host that is not running"),
        "{}",
        d.log()
    );

    // A backup whose pre-exec runs during a collection: its session stays,
    // and it commits.
    // The pre-exec marks that it runs: the session is written by then.
    let mark = tmp.path().join("pre-exec-runs");
    let hooked = |d: &Blockd| {
        let _ = std::fs::remove_file(&mark);
        std::process::Command::new(bin("blockctl"))
            .arg("--socket")
            .arg(d.api_socket())
            .args(["cloudsnap", "backup", "v", "--pre-exec"])
            .arg(format!("touch {}; sleep 4", mark.display()))
            .spawn()
            .unwrap()
    };
    let started = |sessions: &Path, ended: &[std::path::PathBuf]| {
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !mark.exists() {
            assert!(
                std::time::Instant::now() < end,
                "the pre-exec did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // (A task that just ended may not have closed its own yet.)
        let open: Vec<_> = std::fs::read_dir(sessions)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.to_string_lossy().contains('#') && !ended.contains(p))
            .collect();
        assert_eq!(open.len(), 1, "{open:?}");
        open[0].clone()
    };
    let mut cli = hooked(&d);
    let open = started(&sessions, &[]);
    gc(&d, &["--grace", "1s"]);
    assert!(
        open.exists(),
        "the session of a starting backup was removed"
    );
    // Meanwhile the task a refused request names says it is starting, and
    // the advice to stop it can be followed: the stop waits for the start
    // (the pre-exec), then stops the backup.
    let task = open.file_name().unwrap().to_str().unwrap().to_string();
    let busy = d.fails(&["cloudsnap", "backup", "v"], &task);
    assert!(
        busy.contains("being backed up") && busy.contains("cloudsnap stop"),
        "{busy}"
    );
    d.fails(
        &["cloudsnap", "status", "--name", &task],
        "is still starting",
    );
    d.ok(&["cloudsnap", "stop", &task]);
    assert!(cli.wait().unwrap().success());
    let t = wait_done(&d, &task);
    assert_eq!(t["state"], "Stopped", "{t}");

    // Killed while the pre-exec runs: the session is left, and the next
    // collection after the restart removes it.
    let first = open;
    let mut cli = hooked(&d);
    let open = started(&sessions, std::slice::from_ref(&first));
    d.kill9();
    let _ = cli.wait();
    d.spawn();
    assert!(open.exists());
    gc(&d, &["--grace", "1s"]);
    assert!(
        !open.exists(),
        "the leftover session is still there: {}",
        d.log()
    );
    assert!(!first.exists());
    assert!(std::fs::read_dir(&sessions).unwrap().next().is_none());
}

/// Host A backs up and deletes; host B restores A's snapshots. B's
/// lease (3 s here, its backup deadline) is renewed while it restores.
#[test]
fn a_restore_on_another_host_holds_the_sweep_of_a_snapshot_deleted_under_it() {
    if !need() {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let a = Blockd::start();
    let mut b = Blockd::start_env(&[
        ("BLOCKD_BACKUP_DEADLINE", "3s"),
        ("BLOCKD_HYDRATE_LIMIT", "2M"),
    ]);
    share(&path, &[&a, &b]);
    let shared = ["--cred-id", "shared"];
    let tmp = tempfile::tempdir().unwrap();
    let data = 24 * MB;
    a.create("src", "32M");
    let img = image(tmp.path(), "src.img", 32 * MB, data, 21);
    load(&a, "src", &img);
    let snap = backup(&a, &["src", "--cred-id", "shared"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let packs = Path::new(&path).join("packs");
    let readers = Path::new(&path).join("locks/readers");

    // Refused restores leave no lease behind; a --snap that is neither a
    // snapshot id nor a volume name never means "the newest of any".
    for (from, into, why) in [
        (snap.as_str(), "bad name", "may contain only"),
        (snap.as_str(), "a/b", "may contain only"),
        // (An empty one is refused by blockctl itself.)
        ("", "e1", "--snap is empty"),
        ("/", "e1", "neither a cloud snapshot id"),
        ("src/", "e1", "neither a cloud snapshot id"),
    ] {
        for lazy in [false, true] {
            let mut args = vec![
                "cloudsnap",
                "restore",
                "--snap",
                from,
                "--volume",
                into,
                "--cred-id",
                "shared",
            ];
            if lazy {
                args.push("--lazy");
            }
            let out = b.blockctl(&args);
            let e = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && e.contains(why), "{args:?}: {e}");
        }
    }
    let vols = json(&b.ok(&["-j", "volume", "list"]));
    assert!(vols.as_array().unwrap().is_empty(), "{vols}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        files_under(&readers).is_empty(),
        "a refused restore left a lease"
    );

    // B serves the snapshot at once and fills it at 2 MB/s (some 12 s).
    let id = lazy_restore_with(&b, &snap, "copy", &shared);
    let t = wait_until(&b, &id, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) >= 2 * MB as u64
    });
    assert_eq!(t["state"], "Active", "finished too soon: {t}");
    assert_eq!(files_under(&readers).len(), 1, "no lease in the bucket");

    // A, which knows nothing of B's restore, deletes the snapshot and
    // condemns its objects ...
    a.ok(&[
        "cloudsnap",
        "delete",
        "--snap",
        &snap,
        "--cred-id",
        "shared",
    ]);
    let r = gc(&a, &["--cred-id", "shared", "--grace", "1s"]);
    assert!(r["marked_bytes"].as_u64().unwrap() >= data as u64, "{r}");
    // B crashes and comes back (well within its lease): its restore
    // resumes from the manifest it kept when it started, the bucket's
    // being gone.
    b.kill9();
    b.spawn();
    // Damage met meanwhile (a failure other than a missing object) does
    // not make B give up: the bucket's manifest is gone by design now,
    // and B keeps its lease while it waits for the packs to be mended.
    // (In place, their times kept: a pack written again since it was
    // condemned is one a backup brought back, and is kept.)
    let rewrite = |p: &Path, bytes: &[u8]| {
        let when = std::fs::metadata(p).unwrap().modified().unwrap();
        std::fs::write(p, bytes).unwrap();
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(when).unwrap();
    };
    let sound: Vec<_> = files_under(&packs)
        .into_iter()
        .map(|p| {
            let good = std::fs::read(&p).unwrap();
            let mut bad = good.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0xff;
            rewrite(&p, &bad);
            (p, good)
        })
        .collect();
    // A pass over the volume ends with the damage still there: retried,
    // not "gone from the bucket".
    let t = wait_until(&b, &id, |t| {
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("retrying in") || e.contains("gone"))
    });
    assert_eq!(t["state"], "Active", "{t}");
    let e = t["error"].as_str().unwrap();
    assert!(e.contains("corrupt") && !e.contains("gone"), "{e}");
    let before = bytes_under(&packs);
    // ... but may not delete them while B reads them, even past B's
    // lease length: B renews it.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(3500));
        let r = gc(&a, &["--cred-id", "shared", "--grace", "1s"]);
        assert_eq!(r["held_marks"], 1, "{r}");
        assert_eq!(r["deleted_bytes"], 0, "{r}");
        assert!(
            r["holding"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h == id.as_str()),
            "{r}"
        );
    }
    assert_eq!(bytes_under(&packs), before);
    for (p, good) in sound {
        rewrite(&p, &good);
    }
    let t = wait_done(&b, &id);
    assert_eq!(t["state"], "Done", "{t}");
    assert_same(&b, &img, "copy");
    assert!(
        files_under(&readers).is_empty(),
        "the lease outlived its restore"
    );
    // Now the space comes back.
    let r = gc(&a, &["--cred-id", "shared", "--grace", "1s"]);
    assert_eq!(r["swept_marks"], 1, "{r}");
    assert!(r["deleted_bytes"].as_u64().unwrap() >= data as u64, "{r}");

    // A host that dies while restoring holds sweeps back until its lease
    // lapses, not for ever. Restarted, its restore names what is gone and
    // takes no lease for ever (a lazy restore keeps serving the volume and
    // its writes for what it holds, until it is stopped).
    let img2 = image(tmp.path(), "src2.img", 32 * MB, data, 22);
    load(&a, "src", &img2);
    let snap2 = backup(&a, &["src", "--cred-id", "shared", "--full"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let id2 = lazy_restore_with(&b, &snap2, "copy2", &shared);
    let t = wait_until(&b, &id2, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) >= 2 * MB as u64
    });
    assert_eq!(t["state"], "Active", "finished too soon: {t}");
    b.kill9();
    let r = delete_and_collect(&a, &snap2);
    let lapsed = r["held_marks"] == 0;
    if !lapsed {
        assert_eq!(r["deleted_bytes"], 0, "{r}");
        std::thread::sleep(Duration::from_millis(3500));
    }
    let r = gc(&a, &["--cred-id", "shared", "--grace", "1s"]);
    assert_eq!(
        r["held_marks"], 0,
        "a dead host's lease held the sweep: {r}"
    );
    assert!(
        r["deleted_bytes"].as_u64().unwrap() >= (data / 2) as u64,
        "{r}"
    );
    b.spawn();
    let t = wait_until(&b, &id2, |t| {
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("gone from the bucket"))
    });
    assert_eq!(t["state"], "Active", "{t}");
    let e = t["error"].as_str().unwrap();
    let (vol, name) = snap2.split_once('/').unwrap();
    assert!(
        e.contains(&format!("snapshots/{vol}/{name} is missing")),
        "the missing object is not named: {e}"
    );
    assert!(
        e.contains("gone from the bucket") && e.contains("stop --force"),
        "{e}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !files_under(&readers).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "a restore that can read nothing more keeps its lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = json(&b.ok(&["-j", "cloudsnap", "stop", &id2, "--force"]));
    assert_eq!(t["state"], "Stopped", "{t}");
    assert!(
        files_under(&readers).is_empty(),
        "a stopped restore left its lease"
    );
}

/// A restore on host B and a delete of its snapshot on host A, fired at
/// once while A collects without pause: each restore is either refused
/// (the snapshot is gone) or completes bit-exact, never cut off midway.
#[test]
fn restores_racing_deletes_and_collections_on_another_host_lose_nothing() {
    if !need() {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let a = Blockd::start();
    let b = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "4M")]);
    share(&path, &[&a, &b]);
    let tmp = tempfile::tempdir().unwrap();
    a.create("src", "8M");
    let rounds = 6;
    let mut snaps = Vec::new();
    for i in 0..rounds {
        let img = image(tmp.path(), &format!("{i}.img"), 8 * MB, 8 * MB, 100 + i);
        load(&a, "src", &img);
        let t = backup(&a, &["src", "--cred-id", "shared", "--full"]);
        snaps.push((t["snapshot"].as_str().unwrap().to_string(), img));
    }
    /// Ends the collecting loop however the rounds end.
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let (mut restored, mut refused) = (0, 0);
    let stopped = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let stop = Stop(&stopped);
        let collecting = s.spawn(|| {
            let mut runs = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                gc(&a, &["--cred-id", "shared", "--grace", "1s"]);
                runs += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            runs
        });
        for (i, (snap, img)) in snaps.iter().enumerate() {
            let vol = format!("copy{i}");
            let go = std::sync::Barrier::new(2);
            let (restore, delete) = std::thread::scope(|r| {
                let restore = r.spawn(|| {
                    go.wait();
                    b.blockctl(&[
                        "-j",
                        "cloudsnap",
                        "restore",
                        "--snap",
                        snap,
                        "--volume",
                        &vol,
                        "--lazy",
                        "--cred-id",
                        "shared",
                    ])
                });
                let delete = r.spawn(|| {
                    go.wait();
                    // Now and then a little later, inside the restore.
                    std::thread::sleep(Duration::from_millis(150 * (i as u64 % 3)));
                    a.blockctl(&["cloudsnap", "delete", "--snap", snap, "--cred-id", "shared"])
                });
                (restore.join().unwrap(), delete.join().unwrap())
            });
            assert!(
                delete.status.success(),
                "{}",
                String::from_utf8_lossy(&delete.stderr)
            );
            if !restore.status.success() {
                let e = String::from_utf8_lossy(&restore.stderr);
                assert!(e.contains("no cloud snapshot"), "{e}");
                refused += 1;
                continue;
            }
            let id = json(&String::from_utf8_lossy(&restore.stdout))["tasks"][0]["id"]
                .as_str()
                .unwrap()
                .to_string();
            let t = wait_done(&b, &id);
            assert_eq!(t["state"], "Done", "round {i}: {t}");
            assert_same(&b, img, &vol);
            restored += 1;
        }
        drop(stop);
        assert!(collecting.join().unwrap() > 2);
    });
    eprintln!("{restored} restored, {refused} refused");
    assert!(
        restored > 0,
        "no restore got ahead of its delete ({refused} refused)"
    );
    // Everything was deleted: once the restores are done, it all goes.
    std::thread::sleep(Duration::from_millis(1100));
    gc(&a, &["--cred-id", "shared", "--grace", "1s"]);
    std::thread::sleep(Duration::from_millis(1100));
    gc(&a, &["--cred-id", "shared", "--grace", "1s"]);
    assert!(bytes_under(&Path::new(&path).join("packs")) == 0);
}

#[test]
fn a_backup_past_its_deadline_does_not_commit() {
    if !need() {
        return;
    }
    let mut d = Blockd::start_env(&[("BLOCKD_BACKUP_DEADLINE", "2s")]);
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 * MB;
    d.create("big", "256M");
    let img = image(tmp.path(), "big.img", size, size, 6);
    load(&d, "big", &img);
    // Followed with --wait: a waiter rides out the daemon's death and
    // restart and ends with the task's outcome; one told to wait for the
    // daemon only 1 s says the outcome is unknown and how to follow it.
    let waiter = |patience: &str| {
        std::process::Command::new(bin("blockctl"))
            .arg("--socket")
            .arg(d.api_socket())
            .args(["cloudsnap", "backup", "big", "--wait"])
            .env("BLOCKCTL_WAIT_UNREACHABLE", patience)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let patient = waiter("");
    let id = loop {
        let tasks = json(&d.ok(&["-j", "cloudsnap", "status"]));
        let active = tasks.as_array().unwrap().iter().find_map(|t| {
            (t["volume"] == "big" && t["state"] == "Active").then(|| t["id"].clone())
        });
        if let Some(id) = active {
            break id.as_str().unwrap().to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // A second waiter, on the same task (a backup of a volume already
    // backing up is refused, so it follows with status).
    let impatient = std::process::Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(d.api_socket())
        .args(["cloudsnap", "status", "--name", &id, "--wait"])
        .env("BLOCKCTL_WAIT_UNREACHABLE", "1s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = wait_until(&d, &id, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) >= 24 * MB as u64
    });
    assert_eq!(t["state"], "Active", "finished too soon: {t}");
    d.kill9();
    let out = impatient.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Not a failure (1): the task may yet end well, so a script must
    // follow it rather than start it again.
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&id)
            && err.contains("no answer with the task for")
            && err.contains("resumes when blockd starts again"),
        "{err}"
    );
    std::thread::sleep(std::time::Duration::from_millis(2500));
    d.spawn();
    let out = patient.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&id) && err.contains("deadline"), "{err}");
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Failed", "{t}");
    let e = t["error"].as_str().unwrap();
    assert!(
        e.contains("deadline") && e.contains("start a new backup"),
        "{e}"
    );
    assert!(
        list(&d, &[]).is_empty(),
        "a backup past its deadline committed"
    );
    // Its local snapshot was abandoned (changes merged back), and its
    // session is gone from the bucket.
    let snaps = d.ok(&["-j", "snapshot", "list"]);
    assert!(json(&snaps).as_array().unwrap().is_empty(), "{snaps}");
    assert!(files_under(&d.dir.path().join("objects/locks/sessions")).is_empty());
}

#[test]
fn the_background_collection_reclaims_without_being_asked() {
    if !need() {
        return;
    }
    let d = Blockd::start_with(None, &["--gc-every", "1s", "--gc-grace", "1s"]);
    let tmp = tempfile::tempdir().unwrap();
    let packs = d.dir.path().join("objects/packs");
    d.create("v", "16M");
    let img = image(tmp.path(), "1.img", 16 * MB, 8 * MB, 21);
    load(&d, "v", &img);
    let s1 = backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string();
    let img = image(tmp.path(), "2.img", 16 * MB, 8 * MB, 22);
    load(&d, "v", &img);
    backup(&d, &["v"]);
    let before = bytes_under(&packs);
    d.ok(&["cloudsnap", "delete", "--snap", &s1]);
    // Marked by one scheduled run, deleted by a later one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while bytes_under(&packs) + 8 * (MB as u64) > before {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing reclaimed: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(d.log().contains("garbage collected"));
    let r = restore(&d, "v", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

/// Rule 4: a backup does not build on a snapshot whose backup ran across a
/// pending mark (the mark may have condemned what it references); it reads
/// the whole volume instead, once. The next one is incremental again.
#[test]
fn a_backup_does_not_build_on_a_snapshot_that_ran_across_a_mark() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("big", "256M");
    let img = image(tmp.path(), "big.img", 256 * MB, 256 * MB, 31);
    load(&d, "big", &img);
    // Without a pending mark, the second backup is incremental.
    backup(&d, &["big"]);
    scatter(&d, "big", &img, 8, 1);
    let t = backup(&d, &["big"]);
    assert_eq!(t["full"], false, "{t}");

    // A backup that a marking run overlaps (a long grace keeps the mark
    // pending).
    let img = image(tmp.path(), "big2.img", 256 * MB, 256 * MB, 32);
    load(&d, "big", &img);
    let id = backup_underway(&d, &["big"], 20);
    // The mark condemns the running backup's packs (not committed yet).
    let r = gc(&d, &["--grace", "1h"]);
    assert!(r["marked_packs"].as_u64().unwrap() >= 1, "{r}");
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");
    // Its child reads everything rather than reference what the mark may
    // have condemned ...
    qemu_io(&d.uri("big"), &["write -P 0x44 0 4k"]);
    let t = backup(&d, &["big"]);
    assert_eq!(
        t["full"], true,
        "built on a snapshot that ran across a mark: {t}"
    );
    assert!(d.log().contains("ran while garbage collection was marking"));
    // ... and its own child is incremental again.
    qemu_io(&d.uri("big"), &["write -P 0x55 0 4k"]);
    let t = backup(&d, &["big"]);
    assert_eq!(t["full"], false, "{t}");
    let r = restore(&d, "big", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    qemu_io(&d.uri("big"), &["write -P 0x55 0 4k"]);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(d.uri("big"))
        .arg(d.uri("back"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// kill -9 in the middle of a collection (slowed by a flaky store), then
/// restart and collect again: the crashed run's hold is taken over by the
/// same host, the sweep completes, nothing live is lost.
#[test]
fn kill9_during_gc_then_gc_again_loses_nothing() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let packs = d.dir.path().join("objects/packs");
    d.create("v", "64M");
    let mut snaps = Vec::new();
    let mut img = tmp.path().join("none");
    for i in 0..6 {
        img = image(
            tmp.path(),
            &format!("{i}.img"),
            64 * MB,
            40 * MB,
            40 + 2 * i,
        );
        load(&d, "v", &img);
        snaps.push(backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string());
    }
    for s in &snaps[..5] {
        d.ok(&["cloudsnap", "delete", "--snap", s]);
    }
    let r = gc(&d, &["--grace", "1s"]);
    assert!(r["marked_packs"].as_u64().unwrap() >= 10, "{r}");
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let before = bytes_under(&packs);

    // The sweep, slowed by retried failures, killed part-way.
    assert!(d.terminate().success());
    d.env.push(("BLOCKD_FAULT_INJECT".into(), "0.4".into()));
    d.spawn();
    let mut run = gc_started(&d, &["--grace", "1s"]);
    // Killed as soon as the first pack is gone.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while bytes_under(&packs) == before && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    d.kill9();
    let _ = run.wait();
    let midway = bytes_under(&packs);
    assert!(midway <= before);

    // Restart, collect again: the crashed run's hold does not block this
    // host; everything condemned goes, everything live stays.
    d.env.clear();
    d.spawn();
    let r = gc(&d, &["--grace", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let r2 = gc(&d, &["--grace", "1s"]);
    let after = bytes_under(&packs);
    eprintln!("pack bytes: {before} before, {midway} after the kill, {after} at the end");
    assert!(
        after + 150 * (MB as u64) <= before,
        "{before} -> {midway} -> {after}: {r} {r2}"
    );
    check_clean(&d, &[]);
    let r = restore(&d, &snaps[5], "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

/// Bad arguments are refused with a message; collections fired at once on
/// one host run one at a time (the others are told another collector
/// runs) and lose nothing.
#[test]
fn gc_refuses_bad_input_and_concurrent_runs_lose_nothing() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    for (args, want) in [
        (vec!["repo", "gc", "--grace", "0s"], "at least 1s"),
        (vec!["repo", "gc", "--grace", "soon"], "invalid duration"),
        (
            vec!["repo", "gc", "--cred-id", "nope"],
            "no location (credentials) named",
        ),
        (
            vec!["repo", "gc", "--max-unused", "150%"],
            "invalid unused-space limit",
        ),
        (
            vec!["repo", "gc", "--max-unused", "lots"],
            "or `unlimited` to never repack",
        ),
    ] {
        let out = d.blockctl(&args);
        assert!(!out.status.success(), "{args:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
    }
    d.create("v", "32M");
    let mut keep = Vec::new();
    for i in 0..4 {
        let img = image(
            tmp.path(),
            &format!("{i}.img"),
            32 * MB,
            16 * MB,
            60 + 2 * i,
        );
        load(&d, "v", &img);
        keep.push((
            backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string(),
            img,
        ));
    }
    let (first, _) = keep.remove(0);
    d.ok(&["cloudsnap", "delete", "--snap", &first]);
    for _ in 0..2 {
        let outs = at_once(4, |_| d.blockctl(&["repo", "gc", "--grace", "1s"]));
        assert!(outs.iter().any(|o| o.status.success()));
        for o in &outs {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success() || e.contains("another collector"), "{e}");
        }
        std::thread::sleep(std::time::Duration::from_millis(1200));
    }
    gc(&d, &["--grace", "1s"]);
    check_clean(&d, &[]);
    for (i, (snap, img)) in keep.iter().enumerate() {
        let vol = format!("r{i}");
        let r = restore(&d, snap, &vol, &[]);
        assert_eq!(r["state"], "Done", "{r}");
        assert_same(&d, img, &vol);
    }
}

#[test]
fn gc_and_check_racing_deletes_see_no_damage() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "8M");
    let img = image(tmp.path(), "v.img", 8 * MB, 0, 1);
    let mut snaps = Vec::new();
    for i in 0..24u64 {
        let cmd = format!("write -P {} {} 64k", i + 1, i * 65536);
        write_both(&d, "v", &img, &cmd);
        snaps.push(backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string());
    }
    let newest = snaps.pop().unwrap();
    // Deletes one at a time while collections (1 s grace: blocks of the
    // deleted go during later walks), checks and listings run back to
    // back: a snapshot deleted under a walk is gone, not damage.
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut runs = 0;
    std::thread::scope(|s| {
        let walker = s.spawn(|| {
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                for args in [
                    &["-j", "repo", "gc", "--grace", "1s"][..],
                    &["-j", "repo", "check"][..],
                    &["-j", "cloudsnap", "list"][..],
                    &["-j", "repo", "check", "--read-data"][..],
                ] {
                    let out = d.blockctl(args);
                    let so = String::from_utf8_lossy(&out.stdout);
                    let e = String::from_utf8_lossy(&out.stderr);
                    assert!(out.status.success(), "{args:?} racing deletes: {e}");
                    if args[2] == "check" {
                        let r = json(&so);
                        assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
                    }
                    n += 1;
                }
            }
            n
        });
        for s in &snaps {
            d.ok(&["cloudsnap", "delete", "--snap", s]);
            std::thread::sleep(Duration::from_millis(60));
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        runs = walker.join().unwrap();
    });
    assert!(runs >= 4, "only {runs} walks ran alongside the deletes");
    std::thread::sleep(Duration::from_millis(1200));
    gc(&d, &["--grace", "1s"]);
    check_clean(&d, &[]);
    let r = restore(&d, &newest, "r", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "r");
}

/// A restore-only host (read-only credentials) takes no lease. When the
/// writing host deletes the snapshot and collects it while a lazy
/// restore of it runs here, the restore's fetches fail on missing packs,
/// and the task then says the snapshot is gone and what to do, instead
/// of retrying for ever.
#[test]
fn a_lazy_restore_through_read_only_credentials_says_when_its_snapshot_is_gone() {
    if !need() {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let a = Blockd::start();
    let b = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "2M")]);
    a.ok(&[
        "credentials",
        "create",
        "shared",
        "--provider",
        "local",
        "--path",
        &path,
    ]);
    b.ok(&[
        "credentials",
        "create",
        "dr",
        "--provider",
        "local",
        "--path",
        &path,
        "--read-only",
    ]);
    let tmp = tempfile::tempdir().unwrap();
    a.create("src", "32M");
    let img = image(tmp.path(), "src.img", 32 * MB, 24 * MB, 23);
    load(&a, "src", &img);
    let snap = backup(&a, &["src", "--cred-id", "shared"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let id = lazy_restore_with(&b, &snap, "copy", &["--cred-id", "dr"]);
    let t = wait_until(&b, &id, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) >= 2 * MB as u64
    });
    assert_eq!(t["state"], "Active", "finished too soon: {t}");
    assert!(
        files_under(&Path::new(&path).join("locks/readers")).is_empty(),
        "a lease written through read-only credentials"
    );
    let r = delete_and_collect(&a, &snap);
    assert!(r["deleted_bytes"].as_u64().unwrap() > 0, "{r}");
    let t = wait_until(&b, &id, |t| {
        t["error"]
            .as_str()
            .is_some_and(|e| e.contains("gone from the bucket"))
    });
    assert_eq!(t["state"], "Active", "{t}");
    let e = t["error"].as_str().unwrap();
    let (vol, name) = snap.split_once('/').unwrap();
    assert!(
        e.contains(&format!("snapshots/{vol}/{name} is missing")) && e.contains("stop --force"),
        "{e}"
    );
    // It says how much of the volume is there to copy, as `volume
    // inspect` does.
    let v = json(&b.ok(&["-j", "volume", "inspect", "copy"]));
    assert!(v["lazy_present_bytes"].as_u64().unwrap() > 0, "{v}");
    let text = b.ok(&["volume", "inspect", "copy"]);
    let amount = text
        .split("lazily: ")
        .nth(1)
        .and_then(|s| s.split(" in place").next())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(e.contains(&format!("{amount} are in place")), "{e}\n{text}");
}

/// A write a killed writer left unfinished in a local directory location
/// (`NAME#N` beside its object): a dry run counts it as a run would and
/// leaves it, the run then deletes it.
#[test]
fn a_dry_run_counts_the_unfinished_writes_a_run_deletes() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "4M");
    backup(&d, &["vol1"]);
    let dir = d.dir.path().join("objects/packs/ab");
    std::fs::create_dir_all(&dir).unwrap();
    let partial = dir.join("abcdef#7");
    std::fs::write(&partial, vec![0u8; 1000]).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&partial)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let r = gc(&d, &["--grace", "1s", "--dry-run"]);
    assert_eq!(r["deleted_partial"], 1, "{r}");
    assert!(r["deleted_bytes"].as_u64().unwrap() >= 1000, "{r}");
    assert!(partial.exists(), "a dry run deleted it");
    let r = gc(&d, &["--grace", "1s"]);
    assert_eq!(r["deleted_partial"], 1, "{r}");
    assert!(!partial.exists());
}
