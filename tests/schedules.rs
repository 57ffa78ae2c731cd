//! Backup schedules (`cloudsnap schedules`), their retention, and
//! `cloudsnap backup --expire`, with short periodic schedules.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::cloud::*;
use common::*;
use serde_json::Value;

fn schedules(d: &Blockd) -> Vec<Value> {
    json(&d.ok(&["-j", "cloudsnap", "schedules", "list"]))
        .as_array()
        .unwrap()
        .clone()
}

fn create(d: &Blockd, args: &[&str]) -> String {
    let mut a = vec!["-j", "cloudsnap", "schedules", "create"];
    a.extend_from_slice(args);
    json(&d.ok(&a))["id"].as_str().unwrap().to_string()
}

/// Cloud snapshots of `vol` made by schedule `id`.
fn made_by(d: &Blockd, vol: &str, id: &str) -> Vec<Value> {
    list(d, &["--src", vol])
        .into_iter()
        .filter(|s| s["schedule"] == id)
        .collect()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_periodic_schedule_backs_up_and_keeps_the_newest_max() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "16M");
    let img = image(tmp.path(), "v.img", 16 * MB, 4 * MB, 1);
    load(&d, "v", &img);
    // A manual backup: never touched by the schedule's retention.
    let manual = backup(&d, &["v"])["snapshot"].as_str().unwrap().to_string();
    let id = create(&d, &["v", "--periodic", "1s", "--max", "2"]);
    let s = &schedules(&d)[0];
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["rules"][0], "periodic 1s");
    assert_eq!(s["max"], 2);

    // Runs happen, retention keeps the newest 2 of the schedule.
    let mut deleted = 0;
    wait_for("five runs and retention", 60, || {
        let s = &schedules(&d)[0];
        deleted = s["deleted"].as_u64().unwrap();
        deleted >= 3 && s["running"] == false
    });
    let mine = made_by(&d, "v", &id);
    assert_eq!(mine.len(), 2, "{mine:?}");
    let all = list(&d, &["--src", "v"]);
    assert!(
        all.iter().any(|s| s["id"] == manual.as_str()),
        "retention deleted a snapshot it did not make"
    );
    // Every manifest records its schedule and host.
    for s in &mine {
        assert!(s["host"].as_str().is_some_and(|h| !h.is_empty()), "{s}");
    }
    let s = &schedules(&d)[0];
    assert!(s["last_error"].is_null(), "{s}");
    assert!(
        s["last_run"].is_string() && s["next_run"].is_string(),
        "{s}"
    );

    // Deleted: no more runs; its snapshots stay.
    d.ok(&["cloudsnap", "sched", "delete", "--uuid", &id]);
    assert!(schedules(&d).is_empty());
    std::thread::sleep(Duration::from_millis(1500));
    let n = made_by(&d, "v", &id).len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(made_by(&d, "v", &id).len(), n, "a deleted schedule ran");
    assert!(n >= 2);
    // The newest snapshot restores bit-exact.
    let r = restore(&d, "v", "back", &[]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");

    // Bad input: a wrong command line exits 2, whether blockctl or the
    // daemon finds it; what depends on things as they stand, 1.
    for (args, want, status) in [
        (vec!["v"], "give when", 2),
        (vec!["--periodic", "5"], "give what to back up", 2),
        (
            vec!["--volume-ids", "v,,w", "--periodic", "5"],
            "an empty name",
            2,
        ),
        (vec!["v", "--daily", "24:00"], "hh:mm", 2),
        // 09:05 or 09:50?
        (vec!["v", "--daily", "9:5"], "hh:mm", 2),
        (vec!["v", "--daily", "+9:05"], "hh:mm", 2),
        (vec!["v", "--weekly", "funday@10:00"], "weekday@hh:mm", 2),
        (vec!["v", "--monthly", "32@10:00"], "day@hh:mm", 2),
        (vec!["v", "--periodic", "0"], "at least 1s", 2),
        (vec!["v", "--periodic", "5", "--max", "0"], "--max", 2),
        (vec!["nope", "--periodic", "5"], "not found", 1),
    ] {
        let mut a = vec!["cloudsnap", "schedules", "create"];
        a.extend_from_slice(&args);
        let out = d.blockctl(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = d.blockctl(&["cloudsnap", "schedules", "delete", "--uuid", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no schedule"));
    // Times are kept in one spelling, whatever form they were given in.
    let id = create(
        &d,
        &[
            "v",
            "--daily",
            "9:05",
            "--weekly",
            "sun@7:30",
            "--monthly",
            "1@0:00",
        ],
    );
    let s = schedules(&d)
        .into_iter()
        .find(|s| s["id"] == id.as_str())
        .unwrap();
    assert_eq!(
        (
            &s["spec"]["daily"],
            &s["spec"]["weekly"],
            &s["spec"]["monthly"]
        ),
        (
            &serde_json::json!(["09:05"]),
            &serde_json::json!(["sunday@07:30"]),
            &serde_json::json!(["1@00:00"])
        ),
        "{s}"
    );
}

#[test]
fn missed_runs_collapse_into_one_and_runs_never_overlap() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "16M");
    let img = image(tmp.path(), "v.img", 16 * MB, 4 * MB, 2);
    load(&d, "v", &img);
    let id = create(&d, &["v", "--periodic", "4s", "--max", "100"]);
    wait_for("a first run", 30, || made_by(&d, "v", &id).len() == 1);
    let before = made_by(&d, "v", &id).len();
    // Down for three slots.
    assert!(d.terminate().success());
    std::thread::sleep(Duration::from_secs(13));
    d.spawn();
    // One run at start for everything missed, not three.
    wait_for("the catch-up run", 10, || {
        made_by(&d, "v", &id).len() > before
    });
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(made_by(&d, "v", &id).len(), before + 1);
    assert!(d.log().matches("scheduled backup starting").count() >= 2);

    // A slow backup (a 256 MiB random volume) with a 1 s period: the
    // schedule waits for its run to end instead of starting another (which
    // the coordinator would refuse as "already being backed up").
    d.ok(&["cloudsnap", "sched", "delete", "--uuid", &id]);
    d.create("big", "256M");
    let img = image(tmp.path(), "big.img", 256 * MB, 256 * MB, 3);
    load(&d, "big", &img);
    let id = create(&d, &["big", "--periodic", "1s", "--full", "--max", "100"]);
    wait_for("three slow runs", 120, || {
        made_by(&d, "big", &id).len() >= 3
    });
    let s = schedules(&d)
        .into_iter()
        .find(|s| s["id"] == id.as_str())
        .unwrap();
    assert!(s["last_error"].is_null(), "a run overlapped: {s}");
    let log = d.log();
    assert!(!log.contains("is being backed up by"), "runs overlapped");
}

#[test]
fn a_failing_run_is_shown_and_retried_at_the_next_slot() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    d.create("v", "8M");
    let id = create(&d, &["v", "--periodic", "1s", "--pre-exec", "exit 3"]);
    let mut first = String::new();
    wait_for("a failed run", 30, || {
        let s = &schedules(&d)[0];
        first = s["last_run"].as_str().unwrap_or("").to_string();
        s["last_error"].is_string()
    });
    let s = &schedules(&d)[0];
    let e = s["last_error"].as_str().unwrap();
    assert!(e.contains("pre-exec"), "{e}");
    let text = d.ok(&["cloudsnap", "schedules", "list"]);
    assert!(text.contains("failed:") && text.contains(&id), "{text}");
    // Tried again.
    wait_for("a second attempt", 30, || {
        schedules(&d)[0]["last_run"].as_str().unwrap_or("") != first
    });
    assert!(list(&d, &[]).is_empty());
}

#[test]
fn retention_skips_a_snapshot_a_restore_reads_and_expiry_deletes_on_time() {
    if !need() {
        return;
    }
    // A 1 KiB/s background fill: the lazy restore below stays active.
    let mut d = Blockd::start_with(None, &["--hydrate-limit", "1K"]);
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "16M");
    let img = image(tmp.path(), "v.img", 16 * MB, 8 * MB, 4);
    load(&d, "v", &img);
    let id = create(&d, &["v", "--periodic", "3s", "--max", "1"]);
    wait_for("a run", 30, || !made_by(&d, "v", &id).is_empty());
    let held = made_by(&d, "v", &id)[0]["id"].as_str().unwrap().to_string();
    let out = d.blockctl(&[
        "-j",
        "cloudsnap",
        "restore",
        "--snap",
        &held,
        "--volume",
        "lazy",
        "--lazy",
    ]);
    if !out.status.success() {
        // Retention won the race for that snapshot: take the newest now.
        panic!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let task = json(&String::from_utf8_lossy(&out.stdout))["tasks"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Several runs later the restore's source is still there, skipped.
    wait_for("three more runs", 60, || {
        schedules(&d)[0]["deleted"].as_u64().unwrap() >= 2
    });
    assert!(
        list(&d, &[]).iter().any(|s| s["id"] == held.as_str()),
        "retention deleted the snapshot a lazy restore reads"
    );
    assert!(d.log().contains("retention skipped a snapshot in use"));
    // Once the restore is stopped, the next run deletes it.
    d.ok(&["cloudsnap", "stop", &task]);
    wait_for("the held snapshot to go", 30, || {
        !list(&d, &[]).iter().any(|s| s["id"] == held.as_str())
    });
    d.ok(&["cloudsnap", "sched", "delete", "--uuid", &id]);

    // --expire: gone on its date, not before.
    let t = backup(&d, &["v", "--expire", "3s"]);
    let snap = t["snapshot"].as_str().unwrap().to_string();
    let l = list(&d, &[]);
    let s = l.iter().find(|s| s["id"] == snap.as_str()).unwrap();
    assert!(s["expires"].is_string(), "{s}");
    assert!(l.iter().any(|s| s["id"] == snap.as_str()));
    wait_for("the expiry", 20, || {
        !list(&d, &[]).iter().any(|s| s["id"] == snap.as_str())
    });
    // Due while its location's directory is away (a disk not mounted, a
    // restart meanwhile): kept due, and deleted once the directory is
    // back.
    let dir = tmp.path().join("away");
    local_location(&d, "away", &dir);
    let asked = Instant::now();
    let t = backup(&d, &["v", "--cred-id", "away", "--expire", "12s"]);
    let snap = t["snapshot"].as_str().unwrap().to_string();
    let moved = tmp.path().join("away.moved");
    std::fs::rename(&dir, &moved).unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the backup took too long for this test"
    );
    assert!(d.terminate().success());
    d.spawn();
    std::thread::sleep(Duration::from_secs(14).saturating_sub(asked.elapsed()));
    assert!(
        moved.join(format!("snapshots/{snap}")).exists(),
        "no manifest at {}",
        moved.display()
    );
    // The wait is said, not kept silent.
    wait_for("the log to say the expiry waits", 10, || {
        d.log().contains("expired snapshot not deleted yet")
    });
    std::fs::rename(&moved, &dir).unwrap();
    wait_for("the expiry once the directory is back", 20, || {
        !list(&d, &["--cred-id", "away"])
            .iter()
            .any(|s| s["id"] == snap.as_str())
    });
    for (arg, want) in [
        ("yesterday", "--expire"),
        ("2020-01-01", "not in the future"),
    ] {
        let out = d.blockctl(&["cloudsnap", "backup", "v", "--expire", arg]);
        assert!(!out.status.success());
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(want), "{e}");
    }
}

/// Credentials a schedule backs up to are not deleted from under it, and
/// a schedule is never created for credentials being deleted: fired at
/// once, either the schedule exists and the credentials stay, or the
/// credentials are gone and the schedule was refused.
#[test]
fn credentials_a_schedule_uses_are_kept_until_the_schedule_goes() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("v", "8M");
    let path = tmp.path().join("nas").display().to_string();
    let make = |d: &Blockd| {
        d.ok(&[
            "credentials",
            "create",
            "nas",
            "--provider",
            "local",
            "--path",
            &path,
        ]);
    };
    make(&d);
    let id = create(&d, &["v", "--daily", "03:00", "--cred-id", "nas"]);
    let out = d.blockctl(&["credentials", "delete", "nas"]);
    assert!(!out.status.success(), "deleted credentials a schedule uses");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&id) && err.contains("schedules delete"),
        "the refusal must name the schedule and what to do: {err}"
    );
    assert!(d.ok(&["credentials", "list"]).contains("nas"));
    // A second schedule of the same volume to the same location at one of
    // the same times would back up the same data again right after the
    // first: refused as things stand (exit 1), naming it.
    let out = d.blockctl(&[
        "cloudsnap",
        "schedules",
        "create",
        "v",
        "--daily",
        "04:00",
        "--daily",
        "03:00",
        "--cred-id",
        "nas",
    ]);
    assert_eq!(out.status.code(), Some(1), "a clashing schedule: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&id) && err.contains("03:00") && err.contains("location nas"),
        "{err}"
    );
    assert_eq!(schedules(&d).len(), 1);
    // Other times, other volumes, or another location (a local copy
    // beside the offsite one) are fine.
    d.create("w", "8M");
    let other = create(&d, &["w", "--daily", "03:00", "--cred-id", "nas"]);
    d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &other]);
    let local = create(&d, &["v", "--daily", "03:00", "--cred-id", "local"]);
    d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &local]);
    // Volume sets that overlap without being equal clash as well: the
    // volumes both name would be backed up twice at that time. The
    // refusal names the other schedule and the shared volumes.
    d.create("x", "8M");
    let pair = create(
        &d,
        &[
            "--volume-ids",
            "v,w",
            "--daily",
            "05:00",
            "--cred-id",
            "nas",
        ],
    );
    for (args, shared, not) in [
        (vec!["v"], "\"v\"", "\"w\""),
        (vec!["--volume-ids", "x,w"], "\"w\"", "\"x\""),
        (vec!["--volume-ids", "w,v"], "\"v\", \"w\"", "\"x\""),
    ] {
        let mut a = vec!["cloudsnap", "schedules", "create"];
        a.extend_from_slice(&args);
        a.extend_from_slice(&["--daily", "05:00", "--cred-id", "nas"]);
        let out = d.blockctl(&a);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: an overlapping schedule: {out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&pair)
                && err.contains(shared)
                && !err.contains(not)
                && err.contains("05:00"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(schedules(&d).len(), 2);
    // Disjoint volumes at that time, or the same ones at another, are fine.
    let apart = create(&d, &["x", "--daily", "05:00", "--cred-id", "nas"]);
    let later = create(&d, &["v", "--daily", "06:00", "--cred-id", "nas"]);
    for sid in [&pair, &apart, &later] {
        d.ok(&["cloudsnap", "schedules", "delete", "--uuid", sid]);
    }
    // Two overlapping schedules asked for at once: one is made, the other
    // refused, every time (the check and the insert are one step).
    for round in 0..10 {
        let at = format!("07:{round:02}");
        let outs = at_once(2, |i| {
            let what = if i == 0 { "v,w" } else { "w,x" };
            d.blockctl(&[
                "-j",
                "cloudsnap",
                "schedules",
                "create",
                "--volume-ids",
                what,
                "--daily",
                &at,
                "--cred-id",
                "nas",
            ])
        });
        let made: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
        assert_eq!(made.len(), 1, "round {round}: {outs:?}");
        let refused = outs.iter().find(|o| !o.status.success()).unwrap();
        assert_eq!(refused.status.code(), Some(1), "round {round}: {refused:?}");
        assert_eq!(schedules(&d).len(), 2, "round {round}");
        let sid = json(&String::from_utf8_lossy(&made[0].stdout))["id"]
            .as_str()
            .unwrap()
            .to_string();
        d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &sid]);
    }
    d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &id]);
    d.ok(&["credentials", "delete", "nas"]);

    for round in 0..6 {
        make(&d);
        let (c, r) = std::thread::scope(|s| {
            let c = s.spawn(|| {
                d.blockctl(&[
                    "-j",
                    "cloudsnap",
                    "schedules",
                    "create",
                    "v",
                    "--daily",
                    "03:00",
                    "--cred-id",
                    "nas",
                ])
            });
            let r = s.spawn(|| d.blockctl(&["credentials", "delete", "nas"]));
            (c.join().unwrap(), r.join().unwrap())
        });
        let listed = d.ok(&["-j", "credentials", "list"]);
        let have_creds = json(&listed)
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "nas");
        let scheds = schedules(&d);
        assert!(
            c.status.success() != r.status.success(),
            "round {round}: exactly one must win: create {:?} {}, delete {:?} {}",
            c.status,
            String::from_utf8_lossy(&c.stderr),
            r.status,
            String::from_utf8_lossy(&r.stderr)
        );
        if c.status.success() {
            assert!(
                have_creds,
                "round {round}: a schedule on deleted credentials"
            );
            assert_eq!(scheds.len(), 1, "round {round}");
            let sid = json(&String::from_utf8_lossy(&c.stdout))["id"]
                .as_str()
                .unwrap()
                .to_string();
            d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &sid]);
            d.ok(&["credentials", "delete", "nas"]);
        } else {
            assert!(!have_creds, "round {round}: {listed}");
            assert!(scheds.is_empty(), "round {round}: {scheds:?}");
        }
    }
}

/// A volume a schedule names is not deleted under it (the schedule would
/// fail at every run), `--force` or not; a schedule and a delete fired at
/// once never leave a schedule naming a volume that is gone.
#[test]
fn a_volume_a_schedule_names_is_kept_until_the_schedule_goes() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    d.create("v", "8M");
    let id = create(&d, &["v", "--daily", "03:00"]);
    for force in [false, true] {
        let mut args = vec!["volume", "delete", "v"];
        if force {
            args.push("--force");
        }
        let out = d.blockctl(&args);
        assert_eq!(out.status.code(), Some(1), "deleted a scheduled volume");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&id) && err.contains("schedules delete"),
            "the refusal must name the schedule and what to do: {err}"
        );
    }
    assert!(d.ok(&["volume", "list"]).contains('v'));
    d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &id]);
    d.ok(&["volume", "delete", "v"]);

    for round in 0..20 {
        let vol = format!("r{round}");
        d.create(&vol, "1M");
        let outs = at_once(2, |i| {
            if i == 0 {
                d.blockctl(&[
                    "-j",
                    "cloudsnap",
                    "schedules",
                    "create",
                    &vol,
                    "--daily",
                    "03:00",
                ])
            } else {
                d.blockctl(&["volume", "delete", &vol])
            }
        });
        let (made, deleted) = (outs[0].status.success(), outs[1].status.success());
        assert!(
            made != deleted,
            "round {round}: schedule create {made}, volume delete {deleted}: {outs:?}"
        );
        let exists = json(&d.ok(&["-j", "volume", "list"]))
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == vol.as_str());
        let named = schedules(&d).iter().any(|s| {
            s["spec"]["volumes"]
                .as_array()
                .is_some_and(|v| v.iter().any(|n| n == vol.as_str()))
        });
        assert_eq!(exists, made, "round {round}: {outs:?}");
        assert_eq!(named, made, "round {round}: {outs:?}");
        if made {
            let sid = json(&String::from_utf8_lossy(&outs[0].stdout))["id"]
                .as_str()
                .unwrap()
                .to_string();
            d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &sid]);
        }
    }
}

/// A label schedule backs up, in one group, the volumes that carry its
/// labels at each run; one whose labels no volume carries is refused.
#[test]
fn a_label_schedule_takes_the_volumes_carrying_its_labels_at_each_run() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    for (v, tier) in [("a", "gold"), ("b", "gold"), ("c", "bronze")] {
        let label = format!("tier={tier}");
        d.ok(&["volume", "create", v, "--size", "4M", "--label", &label]);
    }
    for (label, want) in [
        ("tier=silver", "no volume carries all the given labels"),
        ("tier=gold plated", "has a space"),
        ("tier=gold,silver", "has a space or ','"),
    ] {
        let out = d.blockctl(&[
            "cloudsnap",
            "schedules",
            "create",
            "--label",
            label,
            "--periodic",
            "1s",
        ]);
        assert!(!out.status.success(), "{label}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{label}: {err}");
    }
    assert!(schedules(&d).is_empty());
    let id = create(&d, &["--label", "tier=gold", "--periodic", "1s"]);
    wait_for("a run", 60, || {
        !made_by(&d, "a", &id).is_empty() && !made_by(&d, "b", &id).is_empty()
    });
    let (a, b) = (&made_by(&d, "a", &id)[0], &made_by(&d, "b", &id)[0]);
    assert!(
        a["group"].is_string() && a["group"] == b["group"],
        "{a} {b}"
    );
    assert!(made_by(&d, "c", &id).is_empty());
    // Labelled later: taken by the next runs.
    d.ok(&["volume", "update", "c", "--label", "tier=gold"]);
    wait_for("a run with c", 60, || !made_by(&d, "c", &id).is_empty());
    d.ok(&["cloudsnap", "schedules", "delete", "--uuid", &id]);
}

/// Two schedules of one volume: one whose backups hold the volume for a
/// few seconds (a slow pre-exec), one due every second. A run that finds
/// the volume held by the other's backup waits for it and then backs up,
/// rather than failing.
#[test]
fn a_run_due_while_another_backup_holds_its_volume_waits_for_it() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    d.create("v", "8M");
    let slow = create(
        &d,
        &[
            "v",
            "--periodic",
            "4s",
            "--pre-exec",
            "sleep 3",
            "--max",
            "100",
        ],
    );
    let quick = create(&d, &["v", "--periodic", "1s", "--max", "100"]);
    let end = Instant::now() + Duration::from_secs(90);
    while (made_by(&d, "v", &slow).len() < 2 || made_by(&d, "v", &quick).len() < 3)
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    for s in schedules(&d) {
        assert_eq!(s["last_error"], Value::Null, "{s}");
    }
    assert!(made_by(&d, "v", &slow).len() >= 2, "{}", d.log());
    assert!(made_by(&d, "v", &quick).len() >= 3, "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("scheduled backup waits for the volume"),
        "the runs never met: {log}"
    );
    assert!(!log.contains("scheduled backup failed"), "{log}");
}

/// The stored record of schedule `id` (read while the daemon is stopped).
fn stored(d: &Blockd, id: &str) -> Value {
    let db = rusqlite::Connection::open(d.dir.path().join("state.db")).unwrap();
    let record: String = db
        .query_row("SELECT record FROM schedules WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap();
    json(&record)
}

/// A run due while a backup holds its volume: `schedules list` says what
/// it waits for (JSON and text), and a daemon stopped during that wait
/// gives the slot back, so the next start runs it instead of counting it
/// as run.
#[test]
fn a_waiting_run_is_shown_and_a_shutdown_does_not_drop_it() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    d.create("v", "8M");
    // A schedule whose backups hold v while their pre-exec runs.
    let slow = create(
        &d,
        &[
            "v",
            "--periodic",
            "4s",
            "--pre-exec",
            "sleep 12",
            "--max",
            "100",
        ],
    );
    let find = |d: &Blockd, id: &str| schedules(d).into_iter().find(|s| s["id"] == id).unwrap();
    wait_for("the slow run", 30, || find(&d, &slow)["running"] == true);
    let quick = create(&d, &["v", "--periodic", "1s", "--max", "100"]);
    let mut shown = Value::Null;
    wait_for("the run to wait", 30, || {
        shown = find(&d, &quick);
        shown["waiting"].is_string()
    });
    let waiting = shown["waiting"].as_str().unwrap();
    assert!(
        waiting.contains("volume \"v\" is being backed up by task")
            && waiting.contains("waiting since"),
        "{shown}"
    );
    assert_eq!(shown["running"], true, "{shown}");
    let text = d.ok(&["cloudsnap", "schedules", "list"]);
    assert!(text.contains("waiting: "), "{text}");
    assert!(made_by(&d, "v", &quick).is_empty());

    assert!(d.terminate().success(), "{}", d.log());
    assert!(
        stored(&d, &quick)["last_run"].is_null(),
        "the slot was not given back: {}",
        d.log()
    );
    assert!(d.log().contains("it runs at the next start"), "{}", d.log());
    d.spawn();
    wait_for("the run given back", 60, || {
        !made_by(&d, "v", &quick).is_empty()
    });
    assert!(find(&d, &quick)["last_error"].is_null());
}

/// A run cut off by `kill -9` before its backups were recorded (here,
/// while its pre-exec runs, before the freeze) did not run: it is not
/// recorded as run, and it runs at the next start as a missed run, not a
/// full period later.
#[test]
fn a_run_killed_before_its_backups_were_recorded_runs_at_the_next_start() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    d.create("vb", "8M");
    d.create("vc", "8M");
    let id = create(
        &d,
        &[
            "--volume-ids",
            "vb,vc",
            "--periodic",
            "20s",
            "--max",
            "4",
            "--pre-exec",
            "sleep 4",
        ],
    );
    wait_for("the first run to start", 40, || {
        d.log().contains("scheduled backup starting")
    });
    assert!(made_by(&d, "vb", &id).is_empty() && made_by(&d, "vc", &id).is_empty());
    d.kill9();
    let record = stored(&d, &id);
    assert!(
        record["last_run"].is_null() && record["last_tasks"].as_array().is_none_or(Vec::is_empty),
        "a run that saved no backup is recorded as run: {record}"
    );
    let restarted = Instant::now();
    d.spawn();
    // Its run at start is in its pre-exec: nothing is claimed as run yet.
    let s = schedules(&d)
        .into_iter()
        .find(|s| s["id"] == id.as_str())
        .unwrap();
    assert!(
        s["last_run"].is_null() || s["last_error"].is_string(),
        "the lost run is listed as a success: {s}"
    );
    // Not a full period later: at start (the pre-exec takes 4 s of it).
    wait_for("the lost run at start", 14, || {
        !made_by(&d, "vb", &id).is_empty() && !made_by(&d, "vc", &id).is_empty()
    });
    assert!(
        restarted.elapsed() < Duration::from_secs(15),
        "the lost run waited for the next slot"
    );
    let (b, c) = (&made_by(&d, "vb", &id)[0], &made_by(&d, "vc", &id)[0]);
    assert!(
        b["group"].is_string() && b["group"] == c["group"],
        "{b} {c}"
    );
    // Listed as run, with the tasks of the run that happened.
    let mut s = Value::Null;
    wait_for("the run to be listed as done", 20, || {
        s = schedules(&d)
            .into_iter()
            .find(|s| s["id"] == id.as_str())
            .unwrap();
        s["running"] == false
    });
    assert!(
        s["last_error"].is_null() && s["last_run"].is_string(),
        "{s}"
    );
    let tasks: Vec<&str> = s["last_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(tasks.len(), 2, "{s}");
    for t in tasks {
        let st = status(&d, t);
        assert_eq!(st["state"], "Done", "{st}");
    }
}

/// The other side: a run killed after its backups were recorded is not
/// run again at the next start (that would back the volumes up twice in
/// one slot); its backups resume and end, and the next run comes at the
/// next slot.
#[test]
fn a_run_killed_after_its_backups_were_recorded_is_not_run_again_at_start() {
    if !need() {
        return;
    }
    let mut d = Blockd::start();
    d.create("vd", "8M");
    let id = create(&d, &["vd", "--periodic", "30s", "--max", "4"]);
    let mut record = Value::Null;
    wait_for("the first run's backup to be recorded", 45, || {
        record = stored(&d, &id);
        record["last_tasks"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    });
    d.kill9();
    let starts = d.log().matches("scheduled backup starting").count();
    d.spawn();
    std::thread::sleep(Duration::from_secs(6));
    let after = stored(&d, &id);
    assert_eq!(
        (&after["last_run"], &after["last_tasks"]),
        (&record["last_run"], &record["last_tasks"]),
        "the recorded run ran again at start"
    );
    assert_eq!(
        d.log().matches("scheduled backup starting").count(),
        starts,
        "a run started again at start:\n{}",
        d.log()
    );
    for t in record["last_tasks"].as_array().unwrap() {
        let t = t.as_str().unwrap();
        let mut st = Value::Null;
        wait_for("the recorded run's backup to end", 30, || {
            st = status(&d, t);
            st["state"] != "Active"
        });
        assert_eq!(st["state"], "Done", "{st}");
    }
    assert_eq!(made_by(&d, "vd", &id).len(), 1);
}
