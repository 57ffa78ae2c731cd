//! Real block devices and file systems over blockd exports: nbdfuse
//! exposes an export as a file, losetup makes it a block device (this
//! kernel has no nbd module), mount mounts it. Each guard undoes its step
//! on drop, also when an assertion fails mid-test.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{sh, wait_timeout};

/// An nbdfuse mount exposing one export as `<dir>/disk`.
pub struct FuseDisk {
    child: Child,
    dir: std::path::PathBuf,
}

impl FuseDisk {
    pub fn mount(uri: &str, dir: &Path) -> Self {
        Self::mount_with(uri, dir, &[])
    }

    pub fn mount_with(uri: &str, dir: &Path, flags: &[&str]) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .args(flags)
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

    pub fn disk(&self) -> String {
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
pub struct Loop(pub String);

impl Loop {
    pub fn attach(file: &str) -> Self {
        let dev = sh(&format!("losetup -f --show {file}")).trim().to_string();
        Self(dev)
    }

    pub fn attach_ro(file: &str) -> Self {
        let dev = sh(&format!("losetup -r -f --show {file}"))
            .trim()
            .to_string();
        Self(dev)
    }
}

/// Mounts a tmpfs of `size` (as `mount -o size=` takes it, say `48m`) at
/// `parent/small`, so a test can fill a file system up; unmounted when
/// the guard drops.
pub fn small_tmpfs(parent: &Path, size: &str) -> (std::path::PathBuf, Mounted) {
    let dir = parent.join("small");
    std::fs::create_dir_all(&dir).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size={size} tmpfs {}",
        dir.display()
    ));
    let guard = Mounted(dir.display().to_string());
    (dir, guard)
}

/// Fills the file system holding `file` with zeros, as `file`.
pub fn fill_up(file: &Path) {
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", file.display()))
        .stderr(std::process::Stdio::null())
        .status();
}

/// Unmounts on drop (also when an assertion fails mid-test).
pub struct Mounted(pub String);

impl Mounted {
    pub fn mount(dev: &str, dir: &str, opts: &str) -> Self {
        sh(&format!("mount -o {opts} {dev} {dir}"));
        Self(dir.to_string())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .args(["-u", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}
