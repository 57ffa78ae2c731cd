//! Rules that one request checks and another can break, under requests
//! fired at the same instant: snapshot names, one backup per volume,
//! deleting a volume while a backup starts or NBD clients connect,
//! deleting credentials or a snapshot while a backup starts,
//! deleting a cloud snapshot that a lazy restore or an open `disk.img`
//! reads; what a failure at the freeze point leaves behind (nothing,
//! and no change forgotten); and a full location failing a backup at once.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::cloud::*;
use common::disk::{fill_up, small_tmpfs};
use common::*;
use serde_json::Value;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn snapshots_of(d: &Blockd, vol: &str) -> Vec<Value> {
    json(&d.ok(&["-j", "snapshot", "list", vol]))
        .as_array()
        .unwrap()
        .clone()
}

fn active_tasks(d: &Blockd) -> Vec<Value> {
    json(&d.ok(&["-j", "cloudsnap", "status"]))
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "Active")
        .cloned()
        .collect()
}

/// Files under the state dir whose names say they are leftovers.
fn leftovers(dir: &Path) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .map(|p| p.display().to_string())
        .filter(|p| p.ends_with(".tmp"))
        .collect()
}

#[test]
fn concurrent_snapshot_creates_of_one_name_keep_every_change() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = backed_up(&d, tmp.path(), "rz", 64 * MB, 64 * MB, 1);
    scatter(&d, "rz", &img, 300, 7);

    let outs = at_once(8, |_| {
        d.blockctl(&["snapshot", "create", "rz", "--name", "same"])
    });
    let won: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "exactly one create may succeed: {outs:?}");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let e = stderr(o);
        assert!(
            e.contains("already has a snapshot named same")
                || e.contains("snapshot rz@same is being taken by another request"),
            "{e}"
        );
    }
    assert_eq!(snapshots_of(&d, "rz").len(), 1);

    // Deleting the one snapshot gives its change set back to the volume:
    // the next incremental must carry every change made since the backup.
    d.ok(&["snapshot", "delete", "rz@same"]);
    let t = backup(&d, &["rz"]);
    assert_eq!(t["full"], false, "an incremental is expected: {t}");
    let snap = t["snapshot"].as_str().unwrap();
    restore(&d, snap, "rz2", &[]);
    assert_same(&d, &img, "rz2");
}

#[test]
fn two_backups_of_one_volume_at_once_run_one() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = backed_up(&d, tmp.path(), "v", 64 * MB, 64 * MB, 2);
    scatter(&d, "v", &img, 200, 3);
    let before = list(&d, &["--src", "v"]).len();

    let outs = at_once(2, |_| d.blockctl(&["-j", "cloudsnap", "backup", "v"]));
    let won: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "exactly one backup may start: {outs:?}");
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    let e = stderr(lost);
    assert!(
        e.contains("is being backed up by task") && e.contains("cloudsnap stop"),
        "{e}"
    );
    let started = json(&stdout(won[0]));
    let id = started["tasks"][0]["id"].as_str().unwrap();
    let t = wait_done(&d, id);
    assert_eq!(t["state"], "Done", "{t}");
    assert_eq!(
        list(&d, &["--src", "v"]).len(),
        before + 1,
        "one snapshot committed"
    );
    assert!(
        snapshots_of(&d, "v").is_empty(),
        "no local snapshot left behind"
    );
    restore(&d, t["snapshot"].as_str().unwrap(), "v2", &[]);
    assert_same(&d, &img, "v2");
}

/// A task shown ended has let go of its volume: a backup started the
/// moment the previous one (or a restore) reports Done is never refused
/// as "being backed up", and a restored volume can be backed up, resized
/// and deleted at once.
#[test]
fn a_task_seen_done_has_released_its_volume() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = backed_up(&d, tmp.path(), "v", 16 * MB, 16 * MB, 5);
    for round in 0..25 {
        scatter(&d, "v", &img, 4, round);
        let t = backup(&d, &["v"]);
        assert_eq!(t["state"], "Done", "round {round}: {t}");
    }
    let snap = list(&d, &["--src", "v"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    for round in 0..5 {
        let name = format!("r{round}");
        let r = restore(&d, &snap, &name, &[]);
        assert_eq!(r["state"], "Done", "{r}");
        backup(&d, &[&name]);
        d.ok(&["volume", "resize", &name, "--size", "32M"]);
        d.ok(&["volume", "delete", &name]);
    }
}

#[test]
fn volume_delete_racing_a_backup_start() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let mut outcomes = Vec::new();
    for round in 0..4 {
        let vol = format!("d{round}");
        d.create(&vol, "16M");
        qemu_io(&d.uri(&vol), &["write -P 0x5a 0 8M"]);
        let outs = at_once(2, |i| {
            if i == 0 {
                d.blockctl(&["-j", "cloudsnap", "backup", &vol])
            } else {
                d.blockctl(&["volume", "delete", &vol, "--force"])
            }
        });
        let (b, del) = (&outs[0], &outs[1]);
        match (b.status.success(), del.status.success()) {
            (true, false) => {
                assert!(stderr(del).contains("cloudsnap stop"), "{}", stderr(del));
                let id = json(&stdout(b))["tasks"][0]["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert_eq!(wait_done(&d, &id)["state"], "Done");
                assert!(d.blockctl(&["volume", "inspect", &vol]).status.success());
                d.ok(&["volume", "delete", &vol, "--force"]);
            }
            (false, true) => {
                let e = stderr(b);
                assert!(
                    e.contains("not found") || e.contains("is being deleted"),
                    "{e}"
                );
            }
            other => panic!(
                "exactly one of the two must win, got {other:?}: {} / {}",
                stderr(b),
                stderr(del)
            ),
        }
        outcomes.push(b.status.success());
        // Whoever won, no task runs on a deleted volume and nothing leaks.
        assert!(active_tasks(&d).is_empty(), "{:?}", active_tasks(&d));
        assert!(!d.blockctl(&["volume", "inspect", &vol]).status.success());
        assert!(!d.dir.path().join("snapshots").join(&vol).exists());
        assert!(!d.dir.path().join(format!("volumes/{vol}.img")).exists());
    }
    eprintln!("backup won {outcomes:?}");
}

#[test]
fn volume_delete_racing_nbd_connects_never_deletes_a_connected_volume() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let mut won = (0, 0);
    for round in 0..16u64 {
        let vol = format!("c{round}");
        d.create(&vol, "4M");
        // The client reports "connected" once the handshake is done, holds
        // the connection (longer than a delete waits for connections to
        // end), then writes and flushes.
        let script = format!(
            "h.connect_uri({:?})\nprint('connected', flush=True)\nimport time\ntime.sleep(1.5)\nh.pwrite(b'\\x5a' * 4096, 0)\nh.flush()\nprint('written', flush=True)\n",
            d.uri(&vol)
        );
        let outs = at_once(2, |i| {
            if i == 0 {
                nbdsh_command()
                    .args(["-c", &script])
                    .output()
                    .expect("nbdsh")
            } else {
                // Staggered across rounds so that the delete lands before,
                // during and after the client's handshake.
                std::thread::sleep(Duration::from_millis(8 * round));
                d.blockctl(&["volume", "delete", &vol])
            }
        });
        let (client, del) = (&outs[0], &outs[1]);
        let connected = stdout(client).contains("connected");
        if del.status.success() {
            // The delete won: the client never got a connection that
            // could write to the deleted volume.
            assert!(
                !stdout(client).contains("written"),
                "a write was acknowledged on a deleted volume: {}",
                stdout(client)
            );
            won.1 += 1;
        } else {
            assert!(
                stderr(del).contains("open NBD connection"),
                "{}",
                stderr(del)
            );
            assert!(connected, "{}", stderr(client));
            assert!(client.status.success(), "{}", stderr(client));
            // The write landed on the volume that stayed.
            qemu_io(&d.uri(&vol), &["read -P 0x5a 0 4k"]);
            d.ok(&["volume", "delete", &vol]);
            won.0 += 1;
        }
        assert!(!d.dir.path().join(format!("volumes/{vol}.img")).exists());
    }
    eprintln!("client won {}, delete won {}", won.0, won.1);
    assert!(
        won.0 > 0 && won.1 > 0,
        "the race was not exercised: {won:?}"
    );
}

#[test]
fn credentials_delete_racing_a_backup_start() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "16M");
    qemu_io(&d.uri("v"), &["write -P 0x33 0 4M"]);
    for round in 0..4 {
        let loc = format!("loc{round}");
        let path = tmp.path().join(&loc);
        d.ok(&[
            "credentials",
            "create",
            &loc,
            "--provider",
            "local",
            "--path",
            path.to_str().unwrap(),
        ]);
        let outs = at_once(2, |i| {
            if i == 0 {
                d.blockctl(&["-j", "cloudsnap", "backup", "v", "--cred-id", &loc])
            } else {
                d.blockctl(&["credentials", "delete", &loc])
            }
        });
        let (b, del) = (&outs[0], &outs[1]);
        let listed = d.ok(&["credentials", "list"]).contains(&loc);
        match (b.status.success(), del.status.success()) {
            (true, false) => {
                assert!(stderr(del).contains("cloudsnap stop"), "{}", stderr(del));
                let id = json(&stdout(b))["tasks"][0]["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert_eq!(wait_done(&d, &id)["state"], "Done");
                assert!(listed, "credentials in use were deleted");
            }
            (false, true) => {
                let e = stderr(b);
                assert!(
                    e.contains("no location (credentials) named")
                        || e.contains("are being deleted"),
                    "{e}"
                );
                assert!(!listed);
            }
            other => panic!(
                "exactly one of the two must win, got {other:?}: {} / {}",
                stderr(b),
                stderr(del)
            ),
        }
        assert!(active_tasks(&d).is_empty());
        assert!(
            snapshots_of(&d, "v").is_empty(),
            "no local snapshot left behind"
        );
    }
}

#[test]
fn snapshot_delete_racing_a_backup_loses_no_change() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = backed_up(&d, tmp.path(), "v", 64 * MB, 64 * MB, 5);
    for round in 0..3u64 {
        // Changes held by a local snapshot, then more on the volume: a
        // backup must carry both, whether or not the snapshot is deleted
        // while it starts.
        scatter(&d, "v", &img, 100, 10 + round);
        d.ok(&["snapshot", "create", "v", "--name", "u"]);
        scatter(&d, "v", &img, 100, 20 + round);
        let outs = at_once(2, |i| {
            if i == 0 {
                d.blockctl(&["-j", "cloudsnap", "backup", "v"])
            } else {
                d.blockctl(&["snapshot", "delete", "v@u"])
            }
        });
        let (b, del) = (&outs[0], &outs[1]);
        if !del.status.success() {
            assert!(stderr(del).contains("cloudsnap stop"), "{}", stderr(del));
        }
        let id = if b.status.success() {
            json(&stdout(b))["tasks"][0]["id"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            // The delete held the volume: the backup is refused, not run
            // on a half-deleted change set. Once it is done, back up again.
            assert!(stderr(b).contains("being deleted"), "{}", stderr(b));
            json(&d.ok(&["-j", "cloudsnap", "backup", "v"]))["tasks"][0]["id"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let t = wait_done(&d, &id);
        assert_eq!(t["state"], "Done", "{t}");
        if !del.status.success() {
            d.ok(&["snapshot", "delete", "v@u"]);
        }
        let target = format!("r{round}");
        restore(&d, t["snapshot"].as_str().unwrap(), &target, &[]);
        assert_same(&d, &img, &target);
        d.ok(&["volume", "delete", &target]);
    }
}

#[test]
fn a_cloud_snapshot_a_lazy_restore_reads_cannot_be_deleted() {
    if !need() {
        return;
    }
    // Hydration held back: the restore is still reading when we delete.
    let d = Blockd::start_env(&[("BLOCKD_HYDRATE_LIMIT", "1M")]);
    let tmp = tempfile::tempdir().unwrap();
    backed_up(&d, tmp.path(), "src", 64 * MB, 64 * MB, 6);
    let snap = list(&d, &["--src", "src"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let started = json(&d.ok(&[
        "-j",
        "cloudsnap",
        "restore",
        "--snap",
        &snap,
        "--volume",
        "lz",
        "--lazy",
    ]));
    let id = started["tasks"][0]["id"].as_str().unwrap().to_string();
    let outs = at_once(3, |_| d.blockctl(&["cloudsnap", "delete", "--snap", &snap]));
    for o in &outs {
        let e = stderr(o);
        assert!(!o.status.success(), "deleted under a lazy restore");
        assert!(
            e.contains(&format!("is being read by lazy restore task {id}"))
                && e.contains("cloudsnap stop"),
            "{e}"
        );
    }
    assert_eq!(list(&d, &["--src", "src"]).len(), 1);
    assert_eq!(status(&d, &id)["state"], "Active");
    // Once the restore has ended, the snapshot can go.
    d.ok(&["cloudsnap", "stop", &id]);
    d.ok(&["cloudsnap", "delete", "--snap", &snap]);
    assert!(list(&d, &["--src", "src"]).is_empty());
}

#[test]
fn a_cloud_snapshot_open_through_the_mount_cannot_be_deleted() {
    if !(need()
        && require_tools(&["fusermount3"])
        && skip_unless(is_root(), "needs root for FUSE")
        && skip_unless(Path::new("/dev/fuse").exists(), "no /dev/fuse"))
    {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    backed_up(&d, tmp.path(), "m", 16 * MB, 16 * MB, 8);
    let snap = list(&d, &["--src", "m"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tmp.path().join("cat");
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    d.ok(&["mount", dir.to_str().unwrap()]);
    let img = dir.join(&snap).join("disk.img");
    {
        let open = std::fs::File::open(&img).expect("open disk.img");
        let out = d.blockctl(&["cloudsnap", "delete", "--snap", &snap]);
        let e = stderr(&out);
        assert!(!out.status.success(), "deleted while open");
        assert!(
            e.contains(&format!(
                "is open through the catalog mount at {}",
                dir.display()
            )),
            "{e}"
        );
        // The credentials are held by the mount itself.
        let out = d.blockctl(&["credentials", "delete", "local"]);
        assert!(!out.status.success());
        drop(open);
    }
    // The kernel releases the file a moment after close.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = d.blockctl(&["cloudsnap", "delete", "--snap", &snap]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", stderr(&out));
        std::thread::sleep(Duration::from_millis(50));
    }
    d.ok(&["umount", dir.to_str().unwrap()]);
}

#[test]
fn a_backup_failing_at_its_freeze_point_leaves_nothing_and_forgets_nothing() {
    if !(need()
        && require_tools(&["mount", "umount", "dd"])
        && skip_unless(is_root(), "needs root to mount a small tmpfs"))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (small, _fs) = small_tmpfs(tmp.path(), "48m");
    let mut d = Blockd::start_in(&small);
    let state = d.dir.path().to_path_buf();
    // Objects go outside the small file system.
    let bucket = tmp.path().join("bucket");
    d.ok(&[
        "credentials",
        "create",
        "off",
        "--provider",
        "local",
        "--path",
        bucket.to_str().unwrap(),
    ]);
    d.create("v", "16M");
    let img = image(tmp.path(), "v.img", 16 * MB, 4 * MB, 11);
    load(&d, "v", &img);
    backup(&d, &["v", "--cred-id", "off"]);
    scatter(&d, "v", &img, 200, 12);

    // The state dir's file system fills up.
    let filler = small.join("filler");
    fill_up(&filler);
    let out = d.blockctl(&["cloudsnap", "backup", "v", "--cred-id", "off"]);
    assert!(
        !out.status.success(),
        "a backup started on a full disk: {}",
        stdout(&out)
    );
    let out = d.blockctl(&["volume", "create", "w", "--size", "16M"]);
    assert!(!out.status.success(), "a volume was created on a full disk");

    // Nothing is left behind: no local snapshot, no task, no stray files.
    assert!(
        snapshots_of(&d, "v").is_empty(),
        "{:?}",
        snapshots_of(&d, "v")
    );
    assert!(active_tasks(&d).is_empty());
    assert!(leftovers(&state).is_empty(), "{:?}", leftovers(&state));
    let vols: Vec<String> = files_under(&state.join("volumes"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(!vols.iter().any(|f| f.starts_with("w.")), "{vols:?}");
    assert!(
        files_under(&state.join("snapshots")).is_empty(),
        "{:?}",
        files_under(&state.join("snapshots"))
    );

    // Space again: the next backup carries every change, incrementally.
    std::fs::remove_file(&filler).unwrap();
    let t = backup(&d, &["v", "--cred-id", "off"]);
    assert_eq!(t["full"], false, "{t}");
    restore(
        &d,
        t["snapshot"].as_str().unwrap(),
        "v2",
        &["--cred-id", "off"],
    );
    assert_same(&d, &img, "v2");
    d.terminate();
}

#[test]
fn a_location_that_answers_but_is_full_fails_the_backup_at_once() {
    if !(need()
        && require_tools(&["mount", "umount"])
        && skip_unless(is_root(), "needs root to mount a small tmpfs"))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The location's file system holds less than the volume.
    let (small, _fs) = small_tmpfs(tmp.path(), "16m");
    let d = Blockd::start();
    d.ok(&[
        "credentials",
        "create",
        "tiny",
        "--provider",
        "local",
        "--path",
        small.join("bucket").to_str().unwrap(),
    ]);
    d.create("v", "64M");
    let img = image(tmp.path(), "v.img", 64 * MB, 64 * MB, 21);
    load(&d, "v", &img);
    let started = Instant::now();
    let s = json(&d.ok(&["-j", "cloudsnap", "backup", "v", "--cred-id", "tiny"]));
    let id = s["tasks"][0]["id"].as_str().unwrap().to_string();
    let t = wait_done(&d, &id);
    // Failed, not waiting for the location: it answers, so a full disk
    // is no outage that may pass.
    assert_eq!(t["state"], "Failed", "{t}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the backup waited {:?} before it failed",
        started.elapsed()
    );
    let e = t["error"].as_str().unwrap();
    assert!(
        e.contains("location tiny")
            && e.contains("changes are kept")
            && !e.contains("every attempt failed"),
        "{e}"
    );
    let v = json(&d.ok(&["-j", "volume", "inspect", "v"]));
    assert_eq!(v["dirty_bytes"], 64 * MB, "changes lost: {v}");
}

#[test]
fn a_credentials_create_waiting_on_a_silent_endpoint_holds_up_no_backup() {
    if !need() {
        return;
    }
    // An endpoint that takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = silent.local_addr().unwrap().to_string();
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "8M");
    let img = image(tmp.path(), "v.img", 8 * MB, 8 * MB, 71);
    load(&d, "v", &img);
    let mut create = std::process::Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(d.api_socket())
        .args([
            "credentials",
            "create",
            "silent",
            "--provider",
            "s3",
            "--s3-endpoint",
            &endpoint,
            "--s3-disable-ssl",
            "--s3-region",
            "garage",
            "--s3-access-key",
            "k",
            "--s3-secret-key",
            "s",
            "--bucket",
            "b",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let asked = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    assert!(create.try_wait().unwrap().is_none(), "the create ended");
    // Meanwhile backups, restores and listings of other locations go on.
    let started = Instant::now();
    let t = backup(&d, &["v", "--cred-id", "local"]);
    restore(&d, t["snapshot"].as_str().unwrap(), "back", &[]);
    assert_same(&d, &img, "back");
    assert_eq!(list(&d, &["--cred-id", "local"]).len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "held up {:?} behind the create",
        started.elapsed()
    );
    assert!(create.try_wait().unwrap().is_none(), "the create ended");
    // The create itself gives up once the store has not answered its
    // first request for 30 s, saying what to check, and creates nothing.
    let status = wait_timeout(&mut create, Duration::from_secs(90));
    let waited = asked.elapsed();
    if status.is_none() {
        let _ = create.kill();
    }
    let out = create.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some_and(|s| !s.success()) && err.contains("no answer from the store"),
        "after {waited:?}: {status:?} {err}"
    );
    assert!(waited < Duration::from_secs(60), "gave up after {waited:?}");
    assert!(!d.ok(&["credentials", "list"]).contains("silent"));
}

#[test]
fn locations_inside_the_state_dir_are_refused() {
    let d = Blockd::start();
    let state = d.dir.path().canonicalize().unwrap();
    for p in [
        state.clone(),
        state.join("volumes"),
        state.join("objects/sub"),
        state.join("new-dir"),
    ] {
        let out = d.blockctl(&[
            "credentials",
            "create",
            "inside",
            "--provider",
            "local",
            "--path",
            p.to_str().unwrap(),
        ]);
        let e = stderr(&out);
        assert!(!out.status.success(), "{} accepted", p.display());
        assert!(e.contains("inside blockd's state directory"), "{e}");
    }
    assert!(!d.ok(&["credentials", "list"]).contains("inside"));
}

#[test]
fn concurrent_credentials_creates_of_one_name_keep_one() {
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let outs = at_once(4, |i| {
        let p = tmp.path().join(format!("b{i}"));
        d.blockctl(&[
            "credentials",
            "create",
            "same",
            "--provider",
            "local",
            "--path",
            p.to_str().unwrap(),
        ])
    });
    assert_eq!(
        outs.iter().filter(|o| o.status.success()).count(),
        1,
        "{outs:?}"
    );
    // The survivor still works: its secrets file was not removed by a loser.
    d.ok(&["credentials", "validate", "same"]);
}

#[test]
fn one_repository_gets_one_name_even_when_names_race() {
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let create = |name: &str, path: &std::path::Path, prefix: Option<&str>| {
        let mut a = vec![
            "credentials",
            "create",
            name,
            "--provider",
            "local",
            "--path",
            path.to_str().unwrap(),
        ];
        if let Some(p) = prefix {
            a.extend(["--prefix", p]);
        }
        d.blockctl(&a)
    };
    let bucket = tmp.path().join("bucket");
    // Four names for one new directory at once: one wins, the others are
    // told which name to use.
    let outs = at_once(4, |i| create(&format!("n{i}"), &bucket, None));
    let won: Vec<usize> = (0..4).filter(|&i| outs[i].status.success()).collect();
    assert_eq!(won.len(), 1, "{outs:?}");
    let winner = format!("n{}", won[0]);
    for o in outs.iter().filter(|o| !o.status.success()) {
        let e = stderr(o);
        assert!(
            e.contains("already name this repository") || e.contains("are being created"),
            "{e}"
        );
    }
    // Another spelling of the same directory (a symbolic link, a trailing
    // slash) is the same repository.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&bucket, &link).unwrap();
    for path in [link.clone(), tmp.path().join("bucket/")] {
        let out = create("again", &path, None);
        assert!(!out.status.success(), "{} accepted", path.display());
        let e = stderr(&out);
        assert!(
            e.contains("already name this repository")
                && e.contains(&format!("--cred-id {winner}")),
            "{e}"
        );
        assert_eq!(out.status.code(), Some(1));
    }
    // Another prefix in the same directory is another repository.
    assert!(create("other", &bucket, Some("team2")).status.success());
    let listed = d.ok(&["credentials", "list"]);
    assert!(!listed.contains("again"), "{listed}");
}

#[test]
fn concurrent_volume_creates_of_one_name_keep_one_and_losers_say_it_is_taken() {
    let d = Blockd::start();
    for round in 0..3 {
        let name = format!("same{round}");
        let outs = at_once(4, |_| {
            d.blockctl(&["volume", "create", &name, "--size", "16M"])
        });
        assert_eq!(
            outs.iter().filter(|o| o.status.success()).count(),
            1,
            "{outs:?}"
        );
        for o in outs.iter().filter(|o| !o.status.success()) {
            let e = stderr(o);
            assert!(
                e.contains("already exists") || e.contains("the name is taken"),
                "a loser must learn the name is taken, not to retry: {e}"
            );
        }
    }
}

#[test]
fn a_group_naming_a_volume_twice_is_refused_before_anything_is_claimed() {
    use std::io::{Read, Write};
    let d = Blockd::start();
    d.create("a", "16M");
    // blockctl refuses it as a wrong command line...
    let out = d.blockctl(&["cloudsnap", "backup-group", "--volume-ids", "a,a"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("named twice"), "{}", stderr(&out));
    // ...and the daemon does too, for any other client of its API.
    let body = r#"{"volumes": ["a", "a"]}"#;
    let mut s = std::os::unix::net::UnixStream::connect(d.api_socket()).unwrap();
    write!(
        s,
        "POST /v1/cloudsnaps/backup-group HTTP/1.1\r\nHost: blockd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("a volume is named twice"), "{answer}");
    // Nothing was left claimed: a backup of the volume runs at once.
    let out = d.ok(&["-j", "cloudsnap", "backup", "a", "--wait"]);
    assert_eq!(json(&out)[0]["state"], "Done", "{out}");
}
