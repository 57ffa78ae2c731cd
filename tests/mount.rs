//! The catalog mount, through a real FUSE mount: `blockctl mount DIR`,
//! then what an admin does with it (`mount -o ro,loop` of a snapshot's
//! disk.img, copy a file out), groups, a new backup appearing without a
//! remount, damaged objects failing only the reads that need them, a
//! flaky store, an open image holding back another host's garbage
//! collection, an image deleted after it was listed, and the CLI's
//! refusals.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cloud::*;
use common::disk::{FuseDisk, Loop, Mounted};
use common::*;
use serde_json::Value;

/// Root, /dev/fuse and the tools every test here drives.
fn need_fuse(extra: &[&str]) -> bool {
    let mut tools = vec!["fusermount3", "qemu-img", "qemu-io", "sha256sum", "dd"];
    tools.extend_from_slice(extra);
    require_tools(&tools)
        && skip_unless(is_root(), "needs root for FUSE, loop devices and mount")
        && skip_unless(Path::new("/dev/fuse").exists(), "no /dev/fuse")
}

fn mounts_table() -> String {
    std::fs::read_to_string("/proc/self/mounts").unwrap_or_default()
}

fn is_mounted(dir: &Path) -> bool {
    let d = dir.display().to_string();
    mounts_table()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(d.as_str()))
}

/// A `blockctl mount` at a fresh directory; unmounted on drop (lazily, if
/// a failed test left it busy or stale).
struct Catalog<'a> {
    d: &'a Blockd,
    dir: PathBuf,
}

impl<'a> Catalog<'a> {
    fn mount(d: &'a Blockd, parent: &Path, args: &[&str]) -> (Self, String) {
        let dir = parent.join("cat");
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let mut a = vec!["mount", dir.to_str().unwrap()];
        a.extend_from_slice(args);
        let out = d.ok(&a);
        (Self { d, dir }, out)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Catalog<'_> {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = self.d.blockctl(&["umount", self.dir.to_str().unwrap()]);
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .status();
        }
    }
}

fn snap_name(task: &Value) -> String {
    let id = task["snapshot"].as_str().expect("snapshot id");
    id.split_once('/').expect("VOLUME/NAME").1.to_string()
}

fn sha256(path: &Path) -> String {
    sh(&format!("sha256sum < '{}'", path.display()))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn link(p: &Path) -> String {
    std::fs::read_link(p)
        .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
        .display()
        .to_string()
}

#[test]
fn admin_mounts_the_catalog_and_copies_one_file_out_of_an_ext4_snapshot() {
    if !need_fuse(&["nbdfuse", "losetup", "mkfs.ext4", "mount", "umount"]) {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "64M");

    // An ext4 file system on the volume, holding the file to get back.
    let original = tmp.path().join("report.bin");
    std::fs::write(&original, random_bytes(3 * MB + 12345, 42)).unwrap();
    {
        let fuse = FuseDisk::mount(&d.uri("vol1"), &tmp.path().join("nbd"));
        let nl = Loop::attach(&fuse.disk());
        sh(&format!("mkfs.ext4 -q -F {}", nl.0));
        let fs_dir = tmp.path().join("fs");
        std::fs::create_dir_all(&fs_dir).unwrap();
        let fs = Mounted::mount(&nl.0, fs_dir.to_str().unwrap(), "rw");
        sh(&format!(
            "mkdir -p {0}/docs && cp {1} {0}/docs/report.bin && \
             for i in $(seq 1 20); do echo \"note $i\" > {0}/docs/n$i.txt; done && sync",
            fs.0,
            original.display()
        ));
    }
    let first = snap_name(&backup(&d, &["vol1"]));

    // blockctl mount DIR
    let (cat, out) = Catalog::mount(&d, tmp.path(), &[]);
    assert!(
        out.contains(&format!("mounted location local at {}", cat.dir.display())),
        "{out}"
    );
    let row = mounts_table()
        .lines()
        .find(|l| l.split(' ').nth(1) == cat.dir.to_str())
        .expect("listed in /proc/self/mounts")
        .to_string();
    assert!(
        row.starts_with("blockd:local ") && row.contains(" fuse.blockd ro,"),
        "{row}"
    );
    assert_eq!(names(&cat.dir), ["groups", "vol1"]);
    assert_eq!(names(&cat.path("vol1")), [first.as_str(), "latest"]);
    assert_eq!(link(&cat.path("vol1/latest")), first);
    assert_eq!(
        names(&cat.path(&format!("vol1/{first}"))),
        ["disk.img", "info.json"]
    );
    let disk = cat.path(&format!("vol1/{first}/disk.img"));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 * MB as u64);
    // info.json is the snapshot as `cloudsnap list -j` shows it.
    let info =
        json(&std::fs::read_to_string(cat.path(&format!("vol1/{first}/info.json"))).unwrap());
    let listed = list(&d, &["--src", "vol1"]);
    assert_eq!(info, listed[0], "info.json differs from cloudsnap list");
    assert_eq!(info["id"], format!("vol1/{first}"));
    // Read-only: nothing can be created or changed.
    let e = std::fs::write(cat.path("vol1/new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // mount -o ro,loop DIR/vol1/<snap>/disk.img /mnt/x; copy one file out.
    let x = tmp.path().join("x");
    let copied = tmp.path().join("copied.bin");
    {
        std::fs::create_dir_all(&x).unwrap();
        let img = Mounted::mount(disk.to_str().unwrap(), x.to_str().unwrap(), "ro,loop");
        std::fs::copy(x.join("docs/report.bin"), &copied).unwrap();
        // Busy: refused, and still mounted.
        let out = d.blockctl(&["umount", cat.dir.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("busy"), "{err}");
        assert!(is_mounted(&cat.dir));
        assert_eq!(
            std::fs::read_to_string(x.join("docs/n7.txt")).unwrap(),
            "note 7\n"
        );
        drop(img);
    }
    assert!(!is_mounted(&x));
    assert_eq!(
        read_file(&copied),
        read_file(&original),
        "the file copied out of the snapshot differs from the original"
    );

    // A new backup shows up without a remount, and latest follows it the
    // moment the backup is done, even while something keeps reading the
    // mount (so the catalog's listing is always fresh from before it).
    qemu_io(&d.uri("vol1"), &["write -P 7 60M 1M"]);
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (watching, latest) = (watching.clone(), cat.path("vol1/latest"));
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = std::fs::read_link(&latest);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let second = snap_name(&backup(&d, &["vol1"]));
    assert_eq!(
        link(&cat.path("vol1/latest")),
        second,
        "latest still points at the previous backup right after `backup --wait`"
    );
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    watcher.join().unwrap();
    assert_eq!(
        names(&cat.path("vol1")),
        [first.as_str(), second.as_str(), "latest"]
    );
    let new_disk = cat.path("vol1/latest/disk.img");
    let mut changed = vec![0u8; MB];
    {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&new_disk).unwrap();
        f.seek(std::io::SeekFrom::Start(60 * MB as u64)).unwrap();
        f.read_exact(&mut changed).unwrap();
    }
    assert!(changed.iter().all(|b| *b == 7), "the new snapshot's bytes");

    // Unmount: through the daemon, which then forgets it.
    let out = d.ok(&["umount", cat.dir.to_str().unwrap()]);
    assert!(out.contains("unmounted"), "{out}");
    assert!(!is_mounted(&cat.dir));
    let out = d.blockctl(&["umount", cat.dir.to_str().unwrap()]);
    assert!(!out.status.success(), "a second umount must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a blockd catalog mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn group_backups_appear_under_groups_with_their_members() {
    if !need_fuse(&[]) {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    for (i, v) in ["db", "log"].iter().enumerate() {
        d.ok(&["volume", "create", v, "--size", "8M", "--label", "app=shop"]);
        let img = image(tmp.path(), v, 8 * MB, 6 * MB, 30 + i as u64);
        load(&d, v, &img);
        images.push(img);
    }
    let tasks = backup_group(&d, &["--label", "app=shop"]);
    let group = tasks[0]["group"].as_str().unwrap().to_string();
    let name = snap_name(&tasks[0]);

    let (cat, _) = Catalog::mount(&d, tmp.path(), &[]);
    assert_eq!(names(&cat.dir), ["db", "groups", "log"]);
    assert_eq!(names(&cat.path("groups")), [group.as_str()]);
    let g = cat.path(&format!("groups/{group}"));
    assert_eq!(names(&g), ["db", "info.json", "log"]);
    for (i, v) in ["db", "log"].iter().enumerate() {
        assert_eq!(link(&g.join(v)), format!("../../{v}/{name}"));
        // Through the member link, the member's image.
        assert_eq!(
            sha256(&g.join(v).join("disk.img")),
            sha256(&images[i]),
            "{v} through the group"
        );
    }
    let info = json(&std::fs::read_to_string(g.join("info.json")).unwrap());
    assert_eq!(info["group"], group.as_str());
    let mut members: Vec<String> = info["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    members.sort();
    assert_eq!(members, [format!("db/{name}"), format!("log/{name}")]);
    let snap_info = json(&std::fs::read_to_string(cat.path("db/latest/info.json")).unwrap());
    assert_eq!(snap_info["group"], group.as_str());
    drop(cat);

    // The group object goes with its last member (retention deletes the
    // same way), also when the last two are deleted at once.
    let groups = || files_under(&d.dir.path().join("objects/groups")).len();
    assert_eq!(groups(), 1);
    d.ok(&["cloudsnap", "delete", "--snap", &format!("db/{name}")]);
    assert_eq!(groups(), 1, "a group with a member left was deleted");
    // The member left is shown; the deleted one is no dangling link.
    let (cat, _) = Catalog::mount(&d, tmp.path(), &[]);
    let g = cat.path(&format!("groups/{group}"));
    assert_eq!(names(&g), ["info.json", "log"]);
    assert_eq!(link(&g.join("log")), format!("../../log/{name}"));
    drop(cat);
    d.ok(&["cloudsnap", "delete", "--snap", &format!("log/{name}")]);
    assert_eq!(groups(), 0, "a group of deleted snapshots stayed");
    for round in 0..3 {
        let tasks = backup_group(&d, &["--label", "app=shop"]);
        let name = snap_name(&tasks[0]);
        assert_eq!(groups(), 1);
        let outs = at_once(2, |i| {
            let v = ["db", "log"][i];
            d.blockctl(&["cloudsnap", "delete", "--snap", &format!("{v}/{name}")])
        });
        assert!(outs.iter().all(|o| o.status.success()), "{outs:?}");
        assert_eq!(
            groups(),
            0,
            "round {round}: a group of deleted snapshots stayed"
        );
    }
}

#[test]
fn a_damaged_pack_fails_only_its_snapshots_reads_and_the_mount_stays_up() {
    if !need_fuse(&[]) {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let objects = d.dir.path().join("objects");
    let packs = || files_under(&objects.join("packs"));
    d.create("vol1", "8M");
    let img1 = image(tmp.path(), "a.img", 8 * MB, 8 * MB, 51);
    load(&d, "vol1", &img1);
    let snap1 = snap_name(&backup(&d, &["vol1"]));
    let pack1 = packs();
    assert_eq!(pack1.len(), 1, "{pack1:?}");
    let pack1 = pack1[0].clone();
    let pack1_key = pack1.strip_prefix(&objects).unwrap().display().to_string();
    let img2 = backed_up(&d, tmp.path(), "vol2", 8 * MB, 8 * MB, 52);
    let original = std::fs::read(&pack1).unwrap();

    let (cat, _) = Catalog::mount(&d, tmp.path(), &[]);
    let disk1 = cat.path(&format!("vol1/{snap1}/disk.img"));
    let disk2 = cat.path("vol2/latest/disk.img");
    let expect_eio = |what: &str, object: &str, reason: &str| {
        let before = d.log().matches("catalog read failed").count();
        let e = std::fs::read(&disk1).expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
        let log = d.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("catalog read failed"))
            .skip(before)
            .collect();
        assert!(
            lines.iter().any(|l| l.contains(&format!("vol1/{snap1}"))
                && l.contains(object)
                && l.contains(reason)),
            "{what}: no log line naming the snapshot and {object}:\n{}",
            lines.join("\n")
        );
        // Another snapshot stays readable, the mount stays up.
        assert_eq!(read_file(&disk2), read_file(&img2), "{what}: vol2");
        assert!(is_mounted(&cat.dir), "{what}: the mount went away");
        assert_eq!(names(&cat.dir), ["groups", "vol1", "vol2"]);
    };

    // A flipped byte in the middle of the pack: that chunk fails its check.
    let mut bad = original.clone();
    bad[original.len() / 2] ^= 0x40;
    std::fs::write(&pack1, &bad).unwrap();
    expect_eio("corrupt pack", &pack1_key, "corrupt");
    // The pack gone: the chunks not cached yet are missing.
    std::fs::remove_file(&pack1).unwrap();
    expect_eio("missing pack", &pack1_key, "missing");
    // Repaired: the same file reads back exactly, without a remount.
    std::fs::write(&pack1, &original).unwrap();
    assert_eq!(read_file(&disk1), read_file(&img1), "after repair");
}

#[test]
fn a_store_failing_five_percent_of_requests_still_reads_bit_exact() {
    if !need_fuse(&[]) {
        return;
    }
    let d = Blockd::start_env(&[("BLOCKD_FAULT_INJECT", "0.05")]);
    let tmp = tempfile::tempdir().unwrap();
    let img = backed_up(&d, tmp.path(), "vol1", 64 * MB, 48 * MB, 61);
    let want = sha256(&img);
    // A small cache, so every pass fetches most chunks again.
    let (cat, _) = Catalog::mount(&d, tmp.path(), &["--cache-size", "4M"]);
    let disk = cat.path("vol1/latest/disk.img");
    let faults_before = d.log().matches("injected fault").count();
    let mut faults = 0;
    for pass in 1..=20 {
        // O_DIRECT: past the page cache, to the daemon every time.
        let got = sh(&format!(
            "dd if='{}' bs=1M iflag=direct status=none | sha256sum",
            disk.display()
        ));
        assert_eq!(
            got.split_whitespace().next(),
            Some(want.as_str()),
            "pass {pass} read different bytes"
        );
        faults = d.log().matches("injected fault").count() - faults_before;
        if faults >= 5 {
            break;
        }
    }
    assert!(
        faults >= 5,
        "only {faults} faults were injected while reading"
    );
    eprintln!("{faults} faults injected under the mount, every read exact");
}

/// Runs blockctl, expecting a failure whose message contains `expect`.
/// An open `disk.img` holds garbage collection back on every host that
/// shares the location, as a restore does: another host deletes the
/// snapshot and collects, and the open image still reads back whole, past
/// its lease's length (it is renewed). A mount with nothing open holds
/// nothing back, and once the image is closed the space comes back.
#[test]
fn an_open_image_holds_the_sweep_of_a_snapshot_another_host_deletes() {
    if !need_fuse(&[]) {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let a = Blockd::start();
    let b = Blockd::start_env(&[("BLOCKD_BACKUP_DEADLINE", "3s")]);
    share(&path, &[&a, &b]);
    let tmp = tempfile::tempdir().unwrap();
    let data = 24 * MB;
    a.create("src", "32M");
    let img = image(tmp.path(), "src.img", 32 * MB, data, 31);
    load(&a, "src", &img);
    let task = backup(&a, &["src", "--cred-id", "shared"]);
    let snap = task["snapshot"].as_str().unwrap().to_string();
    let readers = Path::new(&path).join("locks/readers");
    let gc = || json(&a.ok(&["-j", "repo", "gc", "--cred-id", "shared", "--grace", "1s"]));

    let (cat, _) = Catalog::mount(&b, tmp.path(), &["--cred-id", "shared"]);
    let disk = cat.path(&format!("src/{}/disk.img", snap_name(&task)));
    assert!(disk.exists(), "{}", disk.display());
    assert!(
        files_under(&readers).is_empty(),
        "a mount alone took a lease"
    );
    let open = std::fs::File::open(&disk).unwrap();
    assert_eq!(
        files_under(&readers).len(),
        1,
        "no lease for the open image"
    );

    a.ok(&[
        "cloudsnap",
        "delete",
        "--snap",
        &snap,
        "--cred-id",
        "shared",
    ]);
    let r = gc();
    assert!(r["marked_bytes"].as_u64().unwrap() >= data as u64, "{r}");
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(3500));
        let r = gc();
        assert_eq!(r["held_marks"], 1, "{r}");
        assert_eq!(r["deleted_bytes"], 0, "{r}");
        assert!(
            r["holding"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h.as_str().unwrap().starts_with("catalog-")),
            "{r}"
        );
    }
    // Nothing of it was read before: every byte comes from the packs.
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut &open, &mut got).unwrap();
    assert!(
        got == std::fs::read(&img).unwrap(),
        "the open image read back wrong"
    );

    drop(open);
    no_leases_left(&readers, "the lease outlived its open image");
    let r = gc();
    assert_eq!(r["swept_marks"], 1, "{r}");
    assert!(r["deleted_bytes"].as_u64().unwrap() >= data as u64, "{r}");
}

/// Another host deletes a snapshot after this mount listed it: opening its
/// image (the kernel still holds the name) fails as not found, no bytes
/// of anything else are returned, and the reader's lease the open took
/// before it looked is gone again. The other snapshot still opens and
/// reads back exact.
#[test]
fn an_image_deleted_after_listing_opens_as_not_found_and_holds_nothing() {
    if !need_fuse(&[]) {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let a = Blockd::start();
    let b = Blockd::start();
    share(&path, &[&a, &b]);
    let tmp = tempfile::tempdir().unwrap();
    a.create("src", "8M");
    let img = image(tmp.path(), "src.img", 8 * MB, 6 * MB, 7);
    load(&a, "src", &img);
    let kept = backup(&a, &["src", "--cred-id", "shared"]);
    let kept_img = tmp.path().join("kept.img");
    std::fs::copy(&img, &kept_img).unwrap();
    scatter(&a, "src", &img, 8, 5);
    let gone = backup(&a, &["src", "--cred-id", "shared"]);
    let readers = Path::new(&path).join("locks/readers");

    let (cat, _) = Catalog::mount(&b, tmp.path(), &["--cred-id", "shared"]);
    let kept_disk = cat.path(&format!("src/{}/disk.img", snap_name(&kept)));
    let gone_disk = cat.path(&format!("src/{}/disk.img", snap_name(&gone)));
    assert!(gone_disk.exists(), "{}", gone_disk.display());
    a.ok(&[
        "cloudsnap",
        "delete",
        "--snap",
        gone["snapshot"].as_str().unwrap(),
        "--cred-id",
        "shared",
    ]);

    let err = std::fs::File::open(&gone_disk).expect_err("opened a deleted snapshot's image");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    no_leases_left(&readers, "a refused open left a reader's lease");
    assert!(
        std::fs::read(&kept_disk).unwrap() == std::fs::read(&kept_img).unwrap(),
        "the remaining snapshot read back wrong"
    );
}

/// A store that refuses the reader's lease (here the local directory
/// where leases go is a file) still serves the open image bit-exact; the
/// missing lease is reported in the daemon's log instead of failing the
/// open.
#[test]
fn an_open_image_whose_lease_the_store_refuses_still_reads_exact() {
    if !need_fuse(&[]) {
        return;
    }
    let bucket = tempfile::tempdir().unwrap();
    let path = bucket.path().join("repo").display().to_string();
    let d = Blockd::start();
    share(&path, &[&d]);
    let tmp = tempfile::tempdir().unwrap();
    d.create("src", "8M");
    let img = image(tmp.path(), "src.img", 8 * MB, 6 * MB, 11);
    load(&d, "src", &img);
    let task = backup(&d, &["src", "--cred-id", "shared"]);
    let locks = Path::new(&path).join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    let _ = std::fs::remove_dir_all(locks.join("readers"));
    std::fs::write(locks.join("readers"), b"not a directory").unwrap();

    let (cat, _) = Catalog::mount(&d, tmp.path(), &["--cred-id", "shared"]);
    let disk = cat.path(&format!("src/{}/disk.img", snap_name(&task)));
    assert!(
        std::fs::read(&disk).unwrap() == std::fs::read(&img).unwrap(),
        "the image read back wrong"
    );
    assert!(
        d.log().contains("no reader lease for this open image"),
        "the missing lease went unreported:\n{}",
        d.log()
    );
}

/// Waits up to 10 s for `readers` (a location's `locks/readers`) to hold
/// no lease: a lease is removed by a task of the daemon, not at once.
fn no_leases_left(readers: &Path, why: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !files_under(readers).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{why}: {:?}",
            files_under(readers)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fails(d: &Blockd, args: &[&str], expect: &str) {
    let out = d.blockctl(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(err.contains(expect), "{args:?}: {err}");
}

#[test]
fn mount_refuses_bad_input_and_umount_cleans_a_stale_mount() {
    if !need_fuse(&[]) {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    fails(&d, &["mount", missing.to_str().unwrap()], "does not exist");
    fails(&d, &["mount", missing.to_str().unwrap()], "mkdir -p");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    fails(&d, &["mount", file.to_str().unwrap()], "not a directory");
    let dir = tmp.path().join("cat");
    std::fs::create_dir(&dir).unwrap();
    let dir_s = dir.canonicalize().unwrap().display().to_string();
    fails(
        &d,
        &["mount", &dir_s, "--cred-id", "nope"],
        "no location (credentials) named \"nope\"",
    );
    fails(
        &d,
        &["mount", &dir_s, "--cache-size", "10Q"],
        "invalid size",
    );
    fails(&d, &["mount", &dir_s, "--cache-size", "1K"], "too small");
    fails(&d, &["umount", &dir_s], "not a blockd catalog mount");
    // A directory that is not there is not told to be mounted.
    let gone = tmp.path().join("nonexistent");
    let e = d.fails(&["umount", gone.to_str().unwrap()], "not a directory");
    assert!(!e.contains("blockctl mount /"), "{e}");
    // A mount would hide what is there: a directory with files, the
    // daemon's own state (and sockets), a directory holding it or one
    // inside it.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    fails(&d, &["mount", full.to_str().unwrap()], "not empty");
    let state = d.dir.path().canonicalize().unwrap();
    let inside = state.join("empty-inside");
    std::fs::create_dir(&inside).unwrap();
    for p in [&state, &state.parent().unwrap().to_path_buf(), &inside] {
        let p = p.to_str().unwrap();
        let out = d.blockctl(&["mount", p]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{p}: {err}");
        assert!(err.contains("would hide blockd's own"), "{p}: {err}");
        assert!(!is_mounted(Path::new(p)), "{p}");
    }
    std::fs::remove_dir(&inside).unwrap();
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");
    d.ok(&["volume", "list"]);
    assert!(!is_mounted(&dir));

    // An empty location mounts too; -j gives the mount.
    let m = json(&d.ok(&["-j", "mount", &dir_s, "--cache-size", "64M"]));
    assert_eq!(m["dir"], dir_s.as_str());
    assert_eq!(m["location"], "local");
    assert_eq!(m["cache_size"], 64 << 20);
    assert_eq!(m["allow_other"], false);
    let cat = Catalog {
        d: &d,
        dir: PathBuf::from(&dir_s),
    };
    assert_eq!(names(&cat.dir), ["groups"]);
    fails(&d, &["mount", &dir_s], "already a blockd catalog mount");
    drop(cat);
    assert!(!is_mounted(&dir));

    // A daemon that stops unmounts its mounts.
    d.ok(&["mount", &dir_s]);
    assert!(d.terminate().success());
    assert!(!is_mounted(&dir), "a mount outlived its daemon's shutdown");
    d.spawn();

    // The daemon dies with a mount up: the mount is stale until
    // `blockctl umount` detaches it (and says so).
    d.ok(&["mount", &dir_s]);
    d.kill9();
    let e = std::fs::read_dir(&dir_s).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    d.spawn();
    let e = d.fails(&["mount", &dir_s], "umount");
    assert!(
        e.contains("already a blockd catalog mount (or a stale one"),
        "{e}"
    );
    let out = d.ok(&["umount", &dir_s]);
    assert!(out.contains("stale"), "{out}");
    assert!(!is_mounted(&dir));
    assert_eq!(names(&dir), Vec::<String>::new());
}

#[test]
fn an_encrypted_location_caches_no_plaintext_and_a_wrong_passphrase_refuses_the_mount() {
    if !need_fuse(&[]) {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("bucket");
    d.ok(&[
        "credentials",
        "create",
        "vault",
        "--provider",
        "local",
        "--path",
        bucket.to_str().unwrap(),
        "--encryption-passphrase",
        "correct horse",
    ]);
    d.create("vol1", "8M");
    // A recognisable plaintext that must land on local disk nowhere.
    let img = tmp.path().join("a.img");
    let mut bytes = b"PLAINTEXT-MARKER-0123456789".repeat(100_000);
    bytes.resize(8 * MB, 0);
    std::fs::write(&img, &bytes).unwrap();
    load(&d, "vol1", &img);
    backup(&d, &["vol1", "--cred-id", "vault"]);
    {
        let (cat, out) = Catalog::mount(&d, tmp.path(), &["--cred-id", "vault"]);
        assert!(out.contains("mounted location vault"), "{out}");
        assert_eq!(read_file(&cat.path("vol1/latest/disk.img")), bytes);
        let cached = files_under(&d.dir.path().join("cache/mounts"));
        assert!(!cached.is_empty(), "nothing was cached");
        for f in cached {
            let b = std::fs::read(&f).unwrap();
            assert!(
                !b.windows(16).any(|w| w == b"PLAINTEXT-MARKER"),
                "plaintext in the chunk cache: {}",
                f.display()
            );
        }
        // Mounted credentials are not deleted from under the mount.
        let out = d.blockctl(&["credentials", "delete", "vault"]);
        assert!(!out.status.success(), "deleting mounted credentials");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("mounted at") && err.contains("blockctl umount"),
            "{err}"
        );
    }
    // The daemon's copy of the passphrase no longer opens the repository:
    // the mount is refused with the repository's message.
    d.terminate();
    let secrets = d.dir.path().join("credentials/vault.json");
    let mut s = json(&std::fs::read_to_string(&secrets).unwrap());
    s["passphrase"] = "wrong horse".into();
    std::fs::write(&secrets, s.to_string()).unwrap();
    d.spawn();
    let dir = tmp.path().join("cat");
    fails(
        &d,
        &["mount", dir.to_str().unwrap(), "--cred-id", "vault"],
        "wrong encryption passphrase",
    );
    assert!(!is_mounted(&dir));
}

/// A mount's chunk cache goes with it, deleted in the background (a cache
/// of gigabytes takes seconds to delete, which an unmount and above all
/// the daemon's stop must not wait for); one a stop cut short goes at the
/// next start.
#[test]
fn a_mounts_cache_goes_in_the_background_and_leftovers_at_the_next_start() {
    if !need_fuse(&[]) {
        return;
    }
    let mut d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    d.create("vol1", "8M");
    let img = image(tmp.path(), "a.img", 8 * MB, 8 * MB, 53);
    load(&d, "vol1", &img);
    backup(&d, &["vol1"]);
    let root = d.dir.path().join("cache/mounts");
    let gone_within = |what: &str, secs: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while !files_under(&root).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {:?}",
                files_under(&root)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    {
        let (cat, _) = Catalog::mount(&d, tmp.path(), &[]);
        assert_eq!(
            read_file(&cat.path("vol1/latest/disk.img")),
            read_file(&img)
        );
        assert!(!files_under(&root).is_empty(), "nothing was cached");
    }
    gone_within("the unmounted catalog's cache", 10);
    d.terminate();
    let left = root.join(".discarded-0123456789abcdef/ab");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join("chunk"), b"left by a stop").unwrap();
    d.spawn();
    gone_within("a cache a stop left", 10);
}

/// blockd in a mount namespace of its own, as systemd's ProtectSystem=,
/// ProtectHome= and PrivateTmp= put it (a slave copy of the host's): the
/// catalog still appears where the admin who asked for it lives, and is
/// unmounted there, by `blockctl umount` and by the daemon's shutdown.
#[test]
fn a_daemon_in_its_own_mount_namespace_mounts_where_the_caller_is() {
    if !need_fuse(&["unshare", "curl"]) {
        return;
    }
    let mut d = Blockd::start_wrapped(&["unshare", "--mount", "--propagation", "slave", "--"]);
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let its = std::fs::read_link(format!("/proc/{}/ns/mnt", d.pid())).unwrap();
    assert_ne!(ours, its, "blockd is not in a mount namespace of its own");
    let tmp = tempfile::tempdir().unwrap();
    d.create("app", "8M");
    let img = image(tmp.path(), "app", 8 * MB, 6 * MB, 52);
    load(&d, "app", &img);
    backup(&d, &["app"]);

    {
        let (cat, _) = Catalog::mount(&d, tmp.path(), &[]);
        assert!(
            is_mounted(&cat.dir),
            "the catalog is not visible in the caller's mount namespace"
        );
        assert_eq!(sha256(&cat.path("app/latest/disk.img")), sha256(&img));
        let listed = json(&run(Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(d.api_socket())
            .arg("http://blockd/v1/mounts")));
        assert_eq!(listed[0]["dir"], cat.dir.to_str().unwrap(), "{listed}");
        d.ok(&["umount", cat.dir.to_str().unwrap()]);
        assert!(!is_mounted(&cat.dir), "umount left the mount in place");
    }

    // Shutdown unmounts it in the caller's namespace too.
    std::fs::create_dir_all(tmp.path().join("again")).unwrap();
    let dir = tmp.path().join("again").canonicalize().unwrap();
    d.ok(&["mount", dir.to_str().unwrap()]);
    assert!(is_mounted(&dir));
    assert!(d.terminate().success(), "{}", d.log());
    assert!(!is_mounted(&dir), "shutdown left the mount behind");
}
