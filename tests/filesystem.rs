//! A real file system on a blockd volume: nbdfuse exposes the export as a
//! file, losetup makes it a block device (this kernel has no nbd module),
//! then mkfs.ext4, mount, write, unmount, reattach, e2fsck, verify.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;

/// An nbdfuse mount exposing one export as `<dir>/disk`.
struct FuseDisk {
    child: Child,
    dir: std::path::PathBuf,
}

impl FuseDisk {
    fn mount(uri: &str, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(uri)
            .spawn()
            .expect("nbdfuse");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            assert!(Instant::now() < deadline, "nbdfuse did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn disk(&self) -> String {
        self.dir.join("disk").display().to_string()
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loop device over a file; detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &str) -> Self {
        let dev = sh(&format!("losetup -f --show {file}")).trim().to_string();
        Self(dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

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
