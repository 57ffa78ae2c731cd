//! A small Linux VM for what this host's kernel cannot show: the nbd
//! module. tests/run fetches Debian's cloud kernel (whose nbd.ko is a
//! module) into a cache; each run packs an initramfs from the freshly
//! built blockd and blockctl, busybox, e2fsprogs and nbd-client with the
//! shared libraries they load, boots it with qemu (TCG by default: nested
//! KVM here fails to start or hangs in firmware; `BLOCKD_TEST_VM_ACCEL=kvm`
//! picks it where it works), runs one scenario script from tests/vm/ and
//! powers off. The VM has no network device: nothing leaves it.
//!
//! The script reports `VMTEST OK <step>` per check, `VMTEST FAIL` on the
//! first failure and `VMTEST PASS` at its end; [`run_scenario`] returns
//! the console output for the test to assert on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{bin, have, skip_unless, wait_timeout};

/// Where tests/run unpacks the kernel: `vmlinuz`, and `modules/N-NAME.ko`
/// in load order (virtio for the state disk, then nbd).
pub fn kernel_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("BLOCKD_TEST_KERNEL_DIR") {
        return Some(PathBuf::from(d));
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache.join("blockd-tests"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("linux-"))
                && p.join("vmlinuz").exists()
                && p.join("modules/7-nbd.ko").exists()
        })
        .collect();
    found.sort();
    found.pop()
}

/// Tools the VM is built from and run with.
const HOST_TOOLS: &[&str] = &["qemu-system-x86_64", "busybox", "cpio", "strip", "ldd"];
/// Programs copied into the VM, with their libraries.
const GUEST_PROGRAMS: &[&str] = &["mkfs.ext4", "e2fsck", "nbd-client"];

/// Boots the VM, runs `tests/vm/<script>` in it and returns the console
/// output; `None` (SKIPPED) when the kernel or a tool is missing.
pub fn run_scenario(script: &str, timeout: Duration) -> Option<String> {
    let kernel = kernel_dir();
    let missing: Vec<&str> = HOST_TOOLS
        .iter()
        .chain(GUEST_PROGRAMS)
        .copied()
        .filter(|t| !have(t))
        .collect();
    if !skip_unless(
        kernel.is_some() && missing.is_empty(),
        &format!(
            "the nbd test VM needs a kernel with nbd.ko (tests/run fetches it; found: {kernel:?}) \
             and {} (missing: {})",
            HOST_TOOLS
                .iter()
                .chain(GUEST_PROGRAMS)
                .copied()
                .collect::<Vec<_>>()
                .join(" "),
            missing.join(" ")
        ),
    ) {
        return None;
    }
    let kernel = kernel.expect("checked");
    let work = tempfile::tempdir().expect("temp dir");
    let root = work.path().join("root");
    let initrd = work.path().join("initrd.cpio");
    pack(&root, &initrd, &kernel, script);
    // The state dir's disk: ext4 on a virtio disk, made in the VM (a
    // tmpfs state dir would turn every volume byte into memory).
    let disk = work.path().join("state.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(4 << 30))
        .expect("state disk");
    let console = work.path().join("console.txt");
    let accel = std::env::var("BLOCKD_TEST_VM_ACCEL").unwrap_or_else(|_| "tcg,thread=multi".into());
    let cpu = if accel.starts_with("kvm") {
        "host"
    } else {
        "max"
    };
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", &accel, "-cpu", cpu, "-smp", "2", "-m", "1536"])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .arg("-kernel")
        .arg(kernel.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Inherited: a pipe nobody reads could fill and stall qemu.
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    let status = wait_timeout(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!(
        "VM ran {:.1}s; its console:\n{out}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.is_some(),
        "the VM did not power off within {timeout:?}"
    );
    Some(out)
}

/// The `VMTEST OK` steps of a console output, in order.
pub fn passed_steps(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VMTEST OK "))
        .map(str::to_string)
        .collect()
}

/// Fills `root` and packs it into the newc archive `initrd`.
fn pack(root: &Path, initrd: &Path, kernel: &Path, script: &str) {
    for d in [
        "bin",
        "sbin",
        "usr/local/bin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc",
        "mnt",
        "state",
        "modules",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("initramfs dir");
    }
    let busybox = which("busybox");
    copy(&busybox, &root.join("bin/busybox"));
    let mut binaries = vec![busybox];
    for b in ["blockd", "blockctl"] {
        // Without debug info: a quarter of the size to pack and load.
        let to = root.join("usr/local/bin").join(b);
        let out = Command::new("strip")
            .arg("-o")
            .arg(&to)
            .arg(bin(b))
            .output()
            .expect("strip");
        assert!(out.status.success(), "strip {b}: {out:?}");
        binaries.push(to);
    }
    for p in GUEST_PROGRAMS {
        let from = which(p);
        let to = root.join("sbin").join(p);
        copy(&from, &to);
        binaries.push(to);
    }
    for b in &binaries {
        for lib in libraries(b) {
            let to = root.join(lib.strip_prefix("/").expect("absolute"));
            if !to.exists() {
                std::fs::create_dir_all(to.parent().expect("parent")).expect("lib dir");
                copy(&lib, &to);
            }
        }
    }
    for m in std::fs::read_dir(kernel.join("modules")).expect("kernel modules") {
        let m = m.expect("module").path();
        copy(&m, &root.join("modules").join(m.file_name().expect("name")));
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vm")
        .join(script);
    copy(&scenario, &root.join("scenario.sh"));
    std::fs::write(root.join("init"), INIT).expect("init");
    make_executable(&root.join("init"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio --quiet -o -H newc > '{}'",
            root.display(),
            initrd.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success(), "cpio failed");
}

/// The VM's pid 1: mounts, loads nbd, runs the scenario, powers off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
export PATH=/usr/local/bin:/sbin:/bin HOME=/root
for m in /modules/*.ko; do
  insmod "$m" || echo "VMTEST FAIL insmod: $m did not load"
done
mkfs.ext4 -q -F /dev/vda && mount -t ext4 /dev/vda /state ||
  echo "VMTEST FAIL state-disk: no ext4 state dir on /dev/vda"
echo "VMTEST kernel $(uname -r)"
sh /scenario.sh
echo "VMTEST EXIT $?"
poweroff -f
"#;

fn which(tool: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The shared libraries `binary` loads (its interpreter included).
fn libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}

fn make_executable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// How long the scenario may run before the VM is killed.
pub const BOOT_AND_RUN: Duration = Duration::from_secs(600);
