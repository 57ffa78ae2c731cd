//! A real file system on a blockd volume: nbdfuse exposes the export as a
//! file, losetup makes it a block device (this kernel has no nbd module),
//! then mkfs.ext4, mount, write, unmount, reattach, e2fsck, verify.

mod common;

use std::path::Path;

use common::disk::{FuseDisk, Loop, Mounted};
use common::*;

#[test]
fn ext4_on_a_volume_through_nbdfuse_and_loop() {
    if !require_tools(&["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3"])
        || !skip_unless(is_root(), "needs root for losetup and mount")
        || !skip_unless(Path::new("/dev/fuse").exists(), "no /dev/fuse")
    {
        return;
    }
    let d = Blockd::start();
    d.create("fsvol", "256M");
    let uri = d.uri("fsvol");
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    let sums = t.path().join("sums").display().to_string();

    {
        let fuse = FuseDisk::mount(&uri, &t.path().join("fuse1"));
        let lo = Loop::attach(&fuse.disk());
        sh(&format!("mkfs.ext4 -q -F {}", lo.0));
        sh(&format!("mount {} {mnt_s}", lo.0));
        let written = std::panic::catch_unwind(|| {
            sh(&format!(
                "cd {mnt_s} && mkdir -p docs && \
                 head -c 24M /dev/urandom > big.bin && \
                 for i in $(seq 1 50); do echo \"file $i $(date +%N)\" > docs/f$i.txt; done && \
                 sync && find . -type f -not -path './lost+found/*' -print0 | sort -z | xargs -0 sha256sum > {sums}"
            ))
        });
        sh(&format!("umount {mnt_s}"));
        written.expect("writing files");
    }
    // Reattach through a new nbdfuse and loop device: fsck clean, files intact.
    {
        let fuse = FuseDisk::mount(&uri, &t.path().join("fuse2"));
        let lo = Loop::attach(&fuse.disk());
        sh(&format!("e2fsck -fn {}", lo.0));
        sh(&format!("mount {} {mnt_s}", lo.0));
        let checked =
            std::panic::catch_unwind(|| sh(&format!("cd {mnt_s} && sha256sum --quiet -c {sums}")));
        sh(&format!("umount {mnt_s}"));
        checked.expect("files differ after reattach");
        let n = std::fs::read_to_string(&sums).unwrap().lines().count();
        assert_eq!(n, 51, "expected 51 files in the checksum list");
    }
}

#[test]
fn fsfreeze_snapshot_of_ext4_shows_exactly_the_files_before_the_freeze() {
    if !require_tools(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "fusermount3",
        "fsfreeze",
    ]) || !skip_unless(is_root(), "needs root for losetup, mount and fsfreeze")
        || !skip_unless(Path::new("/dev/fuse").exists(), "no /dev/fuse")
    {
        return;
    }
    let d = Blockd::start();
    d.create("fsvol", "256M");
    let t = tempfile::tempdir().unwrap();
    let live = t.path().join("live");
    let frozen = t.path().join("frozen");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&frozen).unwrap();
    let (live_s, frozen_s) = (live.display().to_string(), frozen.display().to_string());
    let before = t.path().join("before.sums").display().to_string();

    let fuse = FuseDisk::mount(&d.uri("fsvol"), &t.path().join("fuse-live"));
    let lo = Loop::attach(&fuse.disk());
    sh(&format!("mkfs.ext4 -q -F {}", lo.0));
    let m = Mounted::mount(&lo.0, &live_s, "rw");
    sh(&format!(
        "cd {live_s} && mkdir before && head -c 8M /dev/urandom > before/big.bin && \
         for i in $(seq 1 20); do echo \"before $i\" > before/f$i.txt; done && \
         find before -type f | sort | xargs sha256sum > {before}"
    ));
    // No sync: the freeze hook must flush the file system itself.
    let out = d.ok(&[
        "snapshot",
        "create",
        "fsvol",
        "--name",
        "app",
        "--pre-exec",
        &format!("fsfreeze -f {live_s}"),
        "--post-exec",
        &format!("fsfreeze -u {live_s}"),
    ]);
    assert!(out.contains("fsvol@app created"), "{out}");
    // Writes after the freeze must not appear in the snapshot.
    sh(&format!(
        "cd {live_s} && mkdir after && echo later > after/x.txt && rm before/f1.txt && sync"
    ));
    let snap = inspect_json(&d, "fsvol@app");
    assert_eq!(snap["pre_exec"]["exit_code"], 0, "{snap}");
    assert_eq!(snap["post_exec"]["exit_code"], 0, "{snap}");

    // Mount the frozen image read-only through a second nbdfuse + loop.
    let fuse2 = FuseDisk::mount_with(&d.uri("fsvol@app"), &t.path().join("fuse-snap"), &["-r"]);
    let lo2 = Loop::attach_ro(&fuse2.disk());
    sh(&format!("e2fsck -fn {}", lo2.0));
    let m2 = Mounted::mount(&lo2.0, &frozen_s, "ro");
    sh(&format!("cd {frozen_s} && sha256sum --quiet -c {before}"));
    let listing = sh(&format!(
        "cd {frozen_s} && find . -not -path './lost+found*' | sort"
    ));
    assert!(
        !listing.contains("after"),
        "a file written after the freeze is in the snapshot:\n{listing}"
    );
    assert!(
        listing.contains("./before/f1.txt"),
        "a file deleted after the freeze is missing:\n{listing}"
    );
    drop(m2);
    drop(lo2);
    drop(fuse2);
    drop(m);
    drop(lo);
    drop(fuse);
}

fn inspect_json(d: &Blockd, snap: &str) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["-j", "snapshot", "inspect", snap])).unwrap()
}
