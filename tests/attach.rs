//! `blockctl volume attach/detach`: a volume as a kernel `/dev/nbdN`
//! through the generic-netlink family "nbd". Where the kernel has no nbd
//! driver (as on these machines) attach must fail at once, say what to do,
//! and leave nothing behind; where it has one, the device must carry the
//! volume's data both ways and come back after a daemon restart. The
//! second half runs in a VM whose kernel has the module (tests/vm/
//! attach.sh, booted by tests/common/vm.rs), so it runs on every machine.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn kernel_has_nbd() -> bool {
    std::path::Path::new("/sys/module/nbd").exists()
}

#[test]
fn attach_works_or_fails_fast_without_the_nbd_driver_and_refuses_bad_input() {
    let d = Blockd::start();
    d.create("vol1", "16M");
    // Bad input, whatever the kernel: clear messages, non-zero exits.
    d.fails(
        &["volume", "attach", "vol1", "--connections", "0"],
        "--connections",
    );
    d.fails(&["volume", "attach", "vol1", "--timeout", "0"], "--timeout");
    d.fails(&["volume", "detach", "vol1"], "not attached");
    if kernel_has_nbd() {
        d.fails(
            &["volume", "attach", "vol1", "--device", "/dev/sda"],
            "not an NBD device",
        );
        d.fails(&["volume", "attach", "nope"], "no volume named");
        drop(d);
        attached_volume_carries_data_both_ways_and_survives_a_restart();
        return;
    }
    let started = Instant::now();
    let out = d.blockctl(&["volume", "attach", "vol1"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no nbd driver")
            && stderr.contains("modprobe nbd")
            && stderr.contains("nbdfuse"),
        "{stderr}"
    );
    // Fails fast: no waiting on a device that will never appear.
    assert!(took < Duration::from_secs(10), "attach took {took:?}");
    // Nothing left behind: no attachment recorded or shown, and the volume
    // is as free as before (it can be deleted).
    assert!(!d.dir.path().join("attachments.json").exists());
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "inspect", "vol1"])).unwrap();
    assert!(v.get("attached").is_none(), "{v}");
    assert_eq!(v["connections"], 0, "{v}");
    assert!(d
        .ok(&["volume", "list"])
        .lines()
        .nth(1)
        .unwrap()
        .ends_with('-'));
    d.ok(&["volume", "delete", "vol1"]);
}

/// Where the kernel has the nbd driver (`modprobe nbd`).
fn attached_volume_carries_data_both_ways_and_survives_a_restart() {
    if !require_tools(&["qemu-io", "dd"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("vol1", "64M");
    let a: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "attach", "vol1", "--connections", "2"]))
            .unwrap();
    let dev = a["device"].as_str().unwrap().to_string();
    sh(&format!(
        "dd if=/dev/zero bs=1M count=4 status=none | tr '\\0' '\\141' | \
         dd of={dev} bs=1M oflag=direct status=none"
    ));
    qemu_io(
        &d.uri("vol1"),
        &["read -P 0x61 0 4M", "write -P 0x62 8M 1M"],
    );
    let read = run(Command::new("dd").args([
        &format!("if={dev}"),
        "bs=1M",
        "skip=8",
        "count=1",
        "iflag=direct",
        "status=none",
    ]));
    assert!(read.bytes().all(|b| b == 0x62));
    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "inspect", "vol1"])).unwrap();
    assert_eq!(v["attached"], dev.as_str());
    d.fails(&["volume", "delete", "vol1"], "");
    // A restart gives the device new sockets.
    d.kill9();
    d.spawn();
    let read = run(Command::new("dd").args([
        &format!("if={dev}"),
        "bs=1M",
        "count=1",
        "iflag=direct",
        "status=none",
    ]));
    assert!(read.bytes().all(|b| b == 0x61));
    d.ok(&["volume", "detach", "vol1"]);
    d.ok(&["volume", "delete", "vol1"]);
}

/// The kernel side for real: in a VM with nbd.ko, attach over netlink,
/// raw I/O both ways, a second kernel client through nbd-client's
/// handshake, the busy rules, ext4 across a kill -9 of the daemon (the
/// device gets new sockets), refusal to detach a mounted device, a backup
/// of what the host wrote and its lazy restore mounted from a second
/// device, detach, the data still there at another device, attach racing
/// a forced delete, blockd stalled past the request timeout (the kernel
/// drops its sockets and blockd hands it new ones), no device for a volume
/// a restore left incomplete, and a file system on the device written back
/// through blockd while memory runs short.
#[test]
fn attach_in_a_vm_with_the_nbd_module() {
    let Some(out) = vm::run_scenario("attach.sh", vm::BOOT_AND_RUN) else {
        return;
    };
    assert!(
        !out.contains("VMTEST FAIL"),
        "a step failed in the VM (console above)"
    );
    let want = [
        "start",
        "attach",
        "sysfs",
        "list-inspect",
        "write",
        "read",
        "read-back",
        "nbd-client",
        "read-nbd-client",
        "same-bytes",
        "nbd-client-disconnect",
        "delete-refused",
        "resize-refused",
        "attach-twice",
        "attach-again-same",
        "mkfs",
        "mount",
        "fs-write",
        "detach-mounted-refused",
        "restart",
        "fs-survives",
        "status-after-restart",
        "umount",
        "fsck",
        "backup",
        "restore",
        "attach-restored",
        "mount-restored",
        "restored-files",
        "umount-restored",
        "detach-restored",
        "detach",
        "detached",
        "detach-twice",
        "mount-again",
        "data-kept",
        "detach-again",
        "delete",
        "race",
        "race-resize",
        "reattach-same-index",
        "race-mount",
        "stall",
        "attach-unexported",
        "pressure",
    ];
    assert_eq!(vm::passed_steps(&out), want, "steps passed in the VM");
    assert!(out.contains("VMTEST PASS"), "the scenario did not finish");
}
