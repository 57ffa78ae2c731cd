//! Change tracking: the dirty map seen over NBD (`blockd:dirty` and
//! `qemu:dirty-bitmap:blockd`) and through the API, across clean and
//! unclean restarts.

mod common;

use std::process::Command;

use common::*;

const MB: u64 = 1 << 20;

/// Dirty runs `(offset, length)` that nbdinfo reports for `context`.
fn dirty_runs(uri: &str, context: &str) -> Vec<(u64, u64)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg("--json")
        .arg(uri));
    let runs: Vec<serde_json::Value> = serde_json::from_str(&out).expect("nbdinfo json");
    runs.iter()
        .filter(|r| r["type"].as_u64().unwrap() & 1 == 1)
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect()
}

fn inspect(d: &Blockd, name: &str) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["-j", "volume", "inspect", name])).unwrap()
}

#[test]
fn dirty_map_shows_exactly_the_written_extents() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("vol1", "16M");
    let uri = d.uri("vol1");
    assert!(
        dirty_runs(&uri, "qemu:dirty-bitmap:blockd").is_empty(),
        "new volume has dirty extents"
    );
    qemu_io(
        &uri,
        &[
            "write -P 1 8k 4k",         // extent 2
            "write -P 2 1048676 10000", // unaligned: extents 256..=258
            "discard 4M 64k",           // extents 1024..=1039
            "write -z 8M 4k",           // extent 2048 (zeroed in place)
            "write -z -u 12M 8k",       // extents 3072..=3073 (punched)
        ],
    );
    let want = vec![
        (8192, 4096),
        (256 * 4096, 3 * 4096),
        (4 * MB, 64 * 1024),
        (8 * MB, 4096),
        (12 * MB, 8192),
    ];
    assert_eq!(dirty_runs(&uri, "qemu:dirty-bitmap:blockd"), want);
    assert_eq!(dirty_runs(&uri, "blockd:dirty"), want);
    let v = inspect(&d, "vol1");
    assert_eq!(v["tracking_known"], true);
    assert_eq!(v["dirty_bytes"], (1 + 3 + 16 + 1 + 2) * 4096);
    assert!(d
        .ok(&["volume", "inspect", "vol1"])
        .contains("Changed:      92.0 KiB since the last backup"));

    // A clean restart keeps the map exactly.
    assert!(d.terminate().success());
    d.spawn();
    assert_eq!(dirty_runs(&uri, "qemu:dirty-bitmap:blockd"), want);
    assert_eq!(inspect(&d, "vol1")["tracking_known"], true);

    // Reads change nothing.
    qemu_io(&uri, &["read 0 16M"]);
    assert_eq!(dirty_runs(&uri, "blockd:dirty"), want);
}

#[test]
fn unclean_shutdown_makes_the_map_unknown() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("vol1", "8M");
    let uri = d.uri("vol1");
    qemu_io(&uri, &["write -P 1 0 4k"]);
    d.kill9();
    // A write after the kill is impossible, but writes made after the last
    // persisted copy would be missing: the map must not be trusted.
    d.spawn();
    assert!(
        d.log()
            .contains("change tracking lost after unclean shutdown"),
        "{}",
        d.log()
    );
    let v = inspect(&d, "vol1");
    assert_eq!(v["tracking_known"], false);
    assert_eq!(v["dirty_bytes"], 8 * MB);
    assert!(d
        .ok(&["volume", "inspect", "vol1"])
        .contains("unknown (change tracking lost"));
    assert_eq!(
        dirty_runs(&uri, "qemu:dirty-bitmap:blockd"),
        vec![(0, 8 * MB)]
    );
    // Still unknown after a clean restart: only a full backup resets it.
    assert!(d.terminate().success());
    d.spawn();
    assert_eq!(inspect(&d, "vol1")["tracking_known"], false);
}

/// Waits until `volume inspect` says the volume's map is settled.
fn settled(d: &Blockd, name: &str) -> bool {
    (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        inspect(d, name)["tracking_settled"] == true
    })
}

/// A crash keeps the tracking of a volume that had gone idle (its map was
/// settled on disk), and loses only that of a volume written since: the
/// first write after the settle marks the map in use before it lands.
#[test]
fn a_crash_keeps_the_tracking_of_idle_volumes() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("idle", "8M");
    d.create("busy", "8M");
    qemu_io(&d.uri("idle"), &["write -P 1 0 4k", "write -P 2 1M 8k"]);
    qemu_io(&d.uri("busy"), &["write -P 1 0 4k"]);
    assert!(settled(&d, "idle"), "the idle volume's map never settled");
    assert!(settled(&d, "busy"));
    assert!(d
        .ok(&["volume", "inspect", "idle"])
        .contains("Tracking:     settled on disk"));
    // A write after the settle: in use again, at once.
    qemu_io(&d.uri("busy"), &["write -P 2 2M 4k"]);
    assert_eq!(inspect(&d, "busy")["tracking_settled"], false);
    d.kill9();
    d.spawn();
    let want = vec![(0, 4096), (MB, 8192)];
    assert_eq!(dirty_runs(&d.uri("idle"), "qemu:dirty-bitmap:blockd"), want);
    let v = inspect(&d, "idle");
    assert_eq!(v["tracking_known"], true, "{v}");
    assert_eq!(v["dirty_bytes"], 12 * 1024, "{v}");
    let v = inspect(&d, "busy");
    assert_eq!(v["tracking_known"], false, "{v}");
    assert!(d
        .log()
        .contains("change tracking lost after unclean shutdown"));
    // The kept map goes on tracking: a write after the restart adds to
    // it, and a crash right after loses it (it was not settled yet).
    qemu_io(&d.uri("idle"), &["write -P 3 4M 4k"]);
    let mut more = want.clone();
    more.push((4 * MB, 4096));
    assert_eq!(dirty_runs(&d.uri("idle"), "blockd:dirty"), more);
    d.kill9();
    d.spawn();
    assert_eq!(inspect(&d, "idle")["tracking_known"], false);
    qemu_io(&d.uri("idle"), &["read -P 3 4M 4k", "read -P 2 1M 8k"]);
    // A backup takes the changes out of a settled map; once idle, the map
    // settles again without them, so a crash brings none of them back
    // (the next backup would read them again).
    qemu_io(&d.uri("idle"), &["write -P 4 5M 4k"]);
    assert!(settled(&d, "idle"));
    d.ok(&["cloudsnap", "backup", "idle", "--wait"]);
    assert_eq!(inspect(&d, "idle")["dirty_bytes"], 0);
    // Settles are checked every second after 5 s idle: well past that.
    std::thread::sleep(std::time::Duration::from_secs(12));
    d.kill9();
    d.spawn();
    let v = inspect(&d, "idle");
    assert_eq!(v["tracking_known"], true, "{v}");
    assert_eq!(
        v["dirty_bytes"], 0,
        "a crash brought back changes already backed up: {v}"
    );
}

/// A freeze takes the changes out of the map before its snapshot is
/// durable: while the snapshot is being made (here, while its post-exec
/// runs), the map is not settled, so a crash then forgets no change.
#[test]
fn a_crash_before_a_snapshot_is_durable_forgets_no_change() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "8M");
    qemu_io(&d.uri("vol1"), &["write -P 1 1M 4k"]);
    let running = tmp.path().join("post-exec-runs");
    let mut client = Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(d.api_socket())
        .args(["snapshot", "create", "vol1", "--name", "s"])
        .args(["--exec-timeout", "120s", "--post-exec"])
        .arg(format!("touch {}; sleep 60", running.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            running.exists()
        }),
        "the post-exec did not start"
    );
    // Idle for longer than a settle waits.
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert_eq!(inspect(&d, "vol1")["tracking_settled"], false);
    d.kill9();
    let _ = client.wait();
    d.spawn();
    // The snapshot never became durable: its change is still counted.
    let v = inspect(&d, "vol1");
    assert!(v["dirty_bytes"].as_u64().unwrap() >= 4096, "{v}");
}

#[test]
fn dirty_contexts_are_listed() {
    if !require_tools(&["nbdinfo"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "1M");
    let out = run(Command::new("nbdinfo").arg("--json").arg(d.uri("vol1")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let contexts: Vec<&str> = v["exports"][0]["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for c in [
        "base:allocation",
        "blockd:dirty",
        "qemu:dirty-bitmap:blockd",
    ] {
        assert!(contexts.contains(&c), "{c} missing from {contexts:?}");
    }
}
