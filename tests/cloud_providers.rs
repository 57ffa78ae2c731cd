//! Cloud snapshots against real object-store servers on loopback: Garage
//! (S3, path style, plain HTTP, and behind a TLS front) and Azurite (Azure
//! Blob). Round trips, a second host, bad keys, certificates, one bucket
//! at two addresses, an endpoint that goes away mid-backup or
//! mid-restore, and a restore-only host with keys that may only read.

mod common;

use common::cloud::*;
use common::objstores::{Azurite, Garage, TlsFront};
use common::*;

fn create_s3(d: &Blockd, g: &Garage, name: &str, secret: &str) -> std::process::Output {
    let args = g.credentials_args(name, secret, Some("backups"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    d.blockctl(&refs)
}

#[test]
fn garage_round_trip_second_host_and_bad_keys() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let Some(g) = Garage::start() else { return };
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();

    // A wrong secret: the provider's own error, nothing stored.
    let out = create_s3(
        &d,
        &g,
        "s3",
        "0000000000000000000000000000000000000000000000000000000000000000",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("validation failed"), "{err}");
    assert!(!err.contains(&g.secret));
    let out = create_s3(&d, &g, "s3", &g.secret);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = d.ok(&["credentials", "list"]);
    assert!(l.contains("s3") && !l.contains(&g.secret), "{l}");

    d.create("vol1", "48M");
    let img = image(tmp.path(), "a.img", 48 * MB, 32 * MB, 31);
    load(&d, "vol1", &img);
    let t1 = backup(&d, &["vol1", "--cred-id", "s3"]);
    assert_eq!(t1["full"], true);
    scatter(&d, "vol1", &img, 100, 5);
    let t2 = backup(&d, &["vol1", "--cred-id", "s3"]);
    assert_eq!(t2["full"], false);
    assert!(
        t2["bytes_transferred"].as_u64().unwrap() < 2 * MB as u64,
        "{t2}"
    );
    let r = restore(&d, "vol1", "back", &["--cred-id", "s3"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
    d.ok(&[
        "cloudsnap",
        "catalog",
        "vol1",
        "--cred-id",
        "s3",
        "--verify",
    ]);

    // A second host with an empty state dir sees and restores the same.
    let b = Blockd::start();
    let out = create_s3(&b, &g, "s3", &g.secret);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snaps = list(&b, &["--cred-id", "s3"]);
    let mine = list(&d, &["--cred-id", "s3"]);
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[1]["id"], mine[1]["id"]);
    let r = restore(&b, "vol1", "dr", &["--cred-id", "s3"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&b, &img, "dr");
}

/// S3 over HTTPS: the daemon's HTTP client verifies the endpoint's
/// certificate against the platform's roots (here a test CA given through
/// `SSL_CERT_FILE`), backs up and restores through it, refuses an endpoint
/// whose certificate it cannot verify, and refuses plain HTTP unless told.
#[test]
fn garage_over_https_verifies_the_certificate() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let Some(g) = Garage::start() else { return };
    let front = TlsFront::start(g.endpoint.trim_start_matches("http://"));
    let creds = |endpoint: &str, secure: bool| -> Vec<String> {
        let mut a: Vec<String> = g
            .credentials_args("s3", &g.secret, None)
            .into_iter()
            .filter(|a| a != "--s3-disable-ssl")
            .collect();
        let at = a.iter().position(|a| a == "--s3-endpoint").unwrap();
        a[at + 1] = endpoint.to_string();
        if !secure {
            a.push("--s3-disable-ssl".into());
        }
        a
    };
    let create = |d: &Blockd, args: &[String]| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        d.blockctl(&refs)
    };

    // No trust in the front's CA: validation fails on the certificate.
    let stranger = Blockd::start();
    let out = create(&stranger, &creds(&front.endpoint, true));
    assert!(
        !out.status.success(),
        "an unverifiable certificate was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // Plain HTTP given as http:// without --s3-disable-ssl: refused, and
    // the message says what to do.
    let out = create(&stranger, &creds(&g.endpoint, true));
    assert!(!out.status.success(), "plain HTTP was used unasked");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plain HTTP is not allowed"), "{err}");
    assert!(!err.contains(&g.secret));

    let d = Blockd::start_env(&[("SSL_CERT_FILE", front.ca_file.to_str().unwrap())]);
    let out = create(&d, &creds(&front.endpoint, true));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "24M");
    let img = image(tmp.path(), "a.img", 24 * MB, 16 * MB, 61);
    load(&d, "vol1", &img);
    backup(&d, &["vol1", "--cred-id", "s3"]);
    scatter(&d, "vol1", &img, 40, 7);
    let t = backup(&d, &["vol1", "--cred-id", "s3"]);
    assert_eq!(t["full"], false);
    let r = restore(&d, "vol1", "back", &["--cred-id", "s3"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
    // A lazy restore reads through the same client.
    let id = lazy_restore_with(&d, "vol1", "lazy", &["--cred-id", "s3"]);
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");
    assert_same(&d, &img, "lazy");
}

/// True once task `t` says it waits for its location.
fn waiting(t: &serde_json::Value) -> bool {
    t["error"]
        .as_str()
        .is_some_and(|e| e.contains("waiting for the location"))
}

/// Garage, and a daemon with location `s3` in it and volume `vol1`
/// holding 256 MiB of random data (its image beside, in the temp dir).
fn garage_and_a_full_volume() -> Option<(Garage, Blockd, tempfile::TempDir, std::path::PathBuf)> {
    if !require_tools(&["qemu-img"]) {
        return None;
    }
    let g = Garage::start()?;
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    assert!(create_s3(&d, &g, "s3", &g.secret).status.success());
    d.create("vol1", "256M");
    let img = image(tmp.path(), "a.img", 256 * MB, 256 * MB, 41);
    load(&d, "vol1", &img);
    Some((g, d, tmp, img))
}

#[test]
fn garage_going_away_is_waited_out_and_the_tasks_go_on_from_their_checkpoints() {
    let Some((mut g, d, _tmp, img)) = garage_and_a_full_volume() else {
        return;
    };

    // The backup: the endpoint goes away once half is uploaded.
    let id = backup_underway(&d, &["vol1", "--cred-id", "s3"], 128);
    g.stop();
    let t = wait_until(&d, &id, waiting);
    assert_eq!(t["state"], "Active", "{t}");
    let e = t["error"].as_str().unwrap();
    assert!(e.contains("location s3") && e.contains("attempt 1"), "{e}");
    let before = t["bytes_transferred"].as_u64().unwrap();
    // Status says why it is held up.
    let text = d.ok(&["cloudsnap", "status", "--name", &id]);
    assert!(
        text.contains(&format!("{id} is held up")) && text.contains("waiting for the location"),
        "{text}"
    );
    // It keeps trying while the endpoint stays away.
    let t = wait_until(&d, &id, |t| {
        t["error"].as_str().is_some_and(|e| e.contains("attempt 2"))
    });
    assert_eq!(t["state"], "Active", "{t}");
    g.restart();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Done", "{t}");
    assert!(t["error"].is_null(), "{t}");
    // Gone on from where it was, not from the start: the packs that had
    // landed before the outage were not uploaded again.
    // Counted once: the work redone after the outage is not added twice.
    assert_eq!(t["bytes_done"], 256 * MB, "{t}");
    let total = t["bytes_transferred"].as_u64().unwrap();
    assert!(
        before >= 128 * MB as u64 && total < before + 200 * MB as u64,
        "uploaded {before} bytes before the outage and {total} in all: the backup started over"
    );
    assert!(
        d.log()
            .contains("the task goes on from its last checkpoint"),
        "the wait was not logged"
    );
    let v = json(&d.ok(&["-j", "volume", "inspect", "vol1"]));
    assert_eq!(v["dirty_bytes"], 0, "{v}");

    // A full restore: the endpoint goes away under it, and comes back.
    let out = d.ok(&[
        "-j",
        "cloudsnap",
        "restore",
        "--snap",
        t["snapshot"].as_str().unwrap(),
        "--volume",
        "back",
        "--cred-id",
        "s3",
    ]);
    let rid = json(&out)["tasks"][0]["id"].as_str().unwrap().to_string();
    let r = wait_until(&d, &rid, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) >= 32 * MB as u64
    });
    assert_eq!(r["state"], "Active", "finished too soon: {r}");
    g.stop();
    let r = wait_until(&d, &rid, waiting);
    assert_eq!(r["state"], "Active", "{r}");
    g.restart();
    let r = wait_done(&d, &rid);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

#[test]
fn a_location_failing_past_the_outage_wait_fails_the_backup_and_keeps_the_changes() {
    let Some((mut g, mut d, _tmp, img)) = garage_and_a_full_volume() else {
        return;
    };

    // A stop ends the wait at once.
    let id = backup_underway(&d, &["vol1", "--cred-id", "s3"], 1);
    g.stop();
    wait_until(&d, &id, waiting);
    let asked = std::time::Instant::now();
    d.ok(&["cloudsnap", "stop", &id]);
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Stopped", "{t}");
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "the stop waited for the next attempt"
    );

    // Failing for longer than the daemon waits: the backup fails and says
    // why, and no change is lost.
    assert!(d.terminate().success());
    d.env.push(("BLOCKD_OUTAGE_WAIT".into(), "3s".into()));
    d.spawn();
    g.restart();
    let id = backup_underway(&d, &["vol1", "--cred-id", "s3"], 1);
    g.stop();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Failed", "{t}");
    let e = t["error"].as_str().unwrap();
    assert!(
        e.contains("location s3")
            && e.contains("every attempt failed for")
            && e.contains("outage_wait")
            && e.contains("changes are kept"),
        "{e}"
    );
    assert!(d.log().contains("retrying"), "no retries before giving up");
    let v = json(&d.ok(&["-j", "volume", "inspect", "vol1"]));
    assert_eq!(v["dirty_bytes"], 256 * MB, "changes lost: {v}");
    assert!(list(&d, &["--cred-id", "local"]).is_empty());

    // Back again: the next backup completes and restores exactly.
    g.restart();
    backup(&d, &["vol1", "--cred-id", "s3"]);
    let r = restore(&d, "vol1", "back", &["--cred-id", "s3"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
}

#[test]
fn one_bucket_at_two_addresses_gets_one_name_even_when_names_race() {
    let Some(g) = Garage::start() else { return };
    let d = Blockd::start();
    let port = g.s3_addr().port();
    // The same bucket as `localhost` and as `127.0.0.1`, created at once:
    // one name wins, the other is told to use it.
    let spell = |i: usize| {
        let host = if i == 0 { "localhost" } else { "127.0.0.1" };
        let mut a = g.credentials_args(&format!("n{i}"), &g.secret, Some("shared"));
        let at = a.iter().position(|x| x == "--s3-endpoint").unwrap() + 1;
        a[at] = format!("{host}:{port}");
        a
    };
    let outs = at_once(2, |i| {
        let a = spell(i);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        d.blockctl(&refs)
    });
    let won: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
    assert_eq!(won.len(), 1, "{outs:?}");
    let lost = &outs[1 - won[0]];
    let e = String::from_utf8_lossy(&lost.stderr);
    assert!(
        e.contains("already name this repository") && e.contains(&format!("--cred-id n{}", won[0])),
        "{e}"
    );
    // Later, the other spelling again: refused the same way.
    let mut a = spell(1 - won[0]);
    a[2] = "again".into();
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = d.blockctl(&refs);
    assert!(!out.status.success(), "a second name was accepted");
    let listed = d.ok(&["credentials", "list"]);
    assert!(!listed.contains("again"), "{listed}");
    // Another prefix in the bucket is another repository.
    let args = g.credentials_args("other", &g.secret, Some("team2"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    d.ok(&refs);
}

/// A restore-only host (disaster recovery) holds keys that may only read
/// the bucket. `credentials create` without `--read-only` says so and
/// what to add; with it, restores (full and lazy), the catalog mount,
/// listings and checks work with keys the server refuses every write to,
/// and backups, deletes, schedules and collections through it are refused
/// up front, naming the reason, before anything is frozen or sent.
#[test]
fn a_restore_only_host_works_with_keys_that_may_only_read() {
    if !require_tools(&["qemu-img", "qemu-io", "fusermount3"])
        || !skip_unless(is_root(), "needs root for the FUSE catalog mount")
    {
        return;
    }
    let Some(g) = Garage::start() else { return };
    let a = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    assert!(create_s3(&a, &g, "s3", &g.secret).status.success());
    a.create("vol1", "32M");
    let img = image(tmp.path(), "a.img", 32 * MB, 24 * MB, 57);
    load(&a, "vol1", &img);
    let snap = backup(&a, &["vol1", "--cred-id", "s3"])["snapshot"]
        .as_str()
        .expect("snapshot id")
        .to_string();

    let (reader, reader_secret) = g.reader_key("dr-reader");
    let b = Blockd::start();
    let dr_args = |secret: &str, prefix: &str, read_only: bool| {
        let mut args = g.credentials_args("dr", secret, Some(prefix));
        let at = args.iter().position(|a| a == "--s3-access-key").unwrap() + 1;
        args[at] = reader.clone();
        if read_only {
            args.push("--read-only".into());
        }
        args
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        b.blockctl(&refs)
    };
    // Without --read-only: the write is refused, and the error says why
    // and what to add, without the secret.
    let out = run(dr_args(&reader_secret, "backups", false));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("can read the bucket but not write to it") && err.contains("--read-only"),
        "{err}"
    );
    assert!(!err.contains(&reader_secret), "{err}");
    // A wrong secret reads nothing either: no hint to --read-only there.
    let zeros = "0".repeat(reader_secret.len());
    let out = run(dr_args(&zeros, "backups", false));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("validation failed") && !err.contains("--read-only"),
        "{err}"
    );
    // Read-only keys cannot make a repository where there is none.
    let out = run(dr_args(&reader_secret, "elsewhere", true));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no repository here"),
        "{err}"
    );
    let out = run(dr_args(&reader_secret, "backups", true));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = json(&b.ok(&["-j", "credentials", "list"]));
    let dr = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "dr")
        .expect("dr listed");
    assert_eq!(dr["read_only"], true, "{dr}");
    assert!(b.ok(&["credentials", "list"]).contains("read-only"));
    b.ok(&["credentials", "validate", "dr"]);

    // What a restore-only host is for.
    let snaps = list(&b, &["--cred-id", "dr"]);
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["id"], snap.as_str());
    let r = restore(&b, &snap, "back", &["--cred-id", "dr"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&b, &img, "back");
    let id = lazy_restore_with(&b, &snap, "lazy", &["--cred-id", "dr"]);
    assert_eq!(wait_done(&b, &id)["state"], "Done");
    assert_same(&b, &img, "lazy");
    let check = json(&b.ok(&["-j", "repo", "check", "--cred-id", "dr", "--read-data"]));
    assert_eq!(
        check["problems"].as_array().map(Vec::len),
        Some(0),
        "{check}"
    );
    let cat = tmp.path().join("cat");
    std::fs::create_dir_all(&cat).unwrap();
    let cat_s = cat.to_str().unwrap();
    b.ok(&["mount", cat_s, "--cred-id", "dr"]);
    let disk = std::fs::read(cat.join("vol1/latest/disk.img"));
    b.ok(&["umount", cat_s]);
    assert!(disk.expect("disk.img read") == read_file(&img));

    // What it may not do, refused before anything is frozen or sent.
    for (cmd, says) in [
        (
            vec!["cloudsnap", "backup", "back", "--cred-id", "dr"],
            "cannot take backups",
        ),
        (
            vec!["cloudsnap", "delete", "--snap", &snap, "--cred-id", "dr"],
            "cannot delete cloud snapshots",
        ),
        (
            vec!["repo", "gc", "--cred-id", "dr"],
            "cannot collect garbage",
        ),
        (
            vec![
                "cloudsnap",
                "schedules",
                "create",
                "back",
                "--periodic",
                "60",
                "--cred-id",
                "dr",
            ],
            "cannot take scheduled backups",
        ),
    ] {
        let err = b.fails(&cmd, says);
        assert!(
            err.contains("read-only") && err.contains("--read-only"),
            "{cmd:?}: {err}"
        );
    }
    assert!(
        b.ok(&["snapshot", "list", "back"]).lines().count() <= 1,
        "a refused backup froze nothing"
    );
    // Nothing on this host even tried a write: no path met the refusal
    // below every caller (restores, mounts and checks wrote nothing).
    assert!(
        !b.log().contains("refused; back up, delete or collect"),
        "{}",
        b.log()
    );
    // The writing host's snapshot is untouched and still its only one.
    let mine = list(&a, &["--cred-id", "s3"]);
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["id"], snap.as_str());
}

#[test]
fn azurite_round_trip() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let Some(az) = Azurite::start() else { return };
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let out = d.blockctl(&[
        "credentials",
        "create",
        "az",
        "--provider",
        "azure",
        "--azure-account-name",
        &az.account,
        "--azure-account-key",
        "d3Jvbmcga2V5",
        "--azure-endpoint",
        &az.endpoint,
        "--bucket",
        &az.container,
    ]);
    assert!(
        !out.status.success(),
        "a wrong account key must fail validation"
    );
    d.ok(&[
        "credentials",
        "create",
        "az",
        "--provider",
        "azure",
        "--azure-account-name",
        &az.account,
        "--azure-account-key",
        &az.key,
        "--azure-endpoint",
        &az.endpoint,
        "--bucket",
        &az.container,
        "--encryption-passphrase",
        "azure pass",
    ]);
    d.create("vol1", "24M");
    let img = image(tmp.path(), "a.img", 24 * MB, 16 * MB, 51);
    load(&d, "vol1", &img);
    backup(&d, &["vol1", "--cred-id", "az"]);
    scatter(&d, "vol1", &img, 50, 9);
    let t = backup(&d, &["vol1", "--cred-id", "az"]);
    assert_eq!(t["full"], false);
    let r = restore(&d, "vol1", "back", &["--cred-id", "az"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "back");
    assert_eq!(list(&d, &["--cred-id", "az"]).len(), 2);
}
