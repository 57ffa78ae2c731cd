//! Cloud snapshots against real object-store servers on loopback: Garage
//! (S3, path style, plain HTTP, and behind a TLS front) and Azurite (Azure
//! Blob). Round trips, a second host, bad keys, certificates, and an
//! endpoint that goes away mid-backup.

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

#[test]
fn garage_going_away_fails_the_backup_and_keeps_the_changes() {
    if !require_tools(&["qemu-img"]) {
        return;
    }
    let Some(mut g) = Garage::start() else { return };
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    assert!(create_s3(&d, &g, "s3", &g.secret).status.success());
    d.create("vol1", "256M");
    let img = image(tmp.path(), "a.img", 256 * MB, 256 * MB, 41);
    load(&d, "vol1", &img);
    let started = json(&d.ok(&["-j", "cloudsnap", "backup", "vol1", "--cred-id", "s3"]));
    let id = started["tasks"][0]["id"].as_str().unwrap().to_string();
    let t = wait_until(&d, &id, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(
        t["state"], "Active",
        "finished before the endpoint went away"
    );
    g.stop();
    let t = wait_done(&d, &id);
    assert_eq!(t["state"], "Failed", "{t}");
    let e = t["error"].as_str().unwrap();
    assert!(
        e.contains("location s3") && e.contains("changes are kept"),
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
