//! Volumes past 2^32 extents: a 64 TiB volume at the default 4 KiB extent
//! size tracks changes, keeps a snapshot's frozen image through
//! copy-on-write past 16 TiB, and keeps its dirty map across a restart;
//! sizes over the maximum, and sizes the state dir's file system cannot
//! hold, are refused with the reason.
//!
//! ext4 files stop at 16 TiB, so the 64 TiB volume lives in a state dir on
//! tmpfs (`/dev/shm`), where a sparse file of any size costs nothing.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const TIB: u64 = 1 << 40;

/// qemu-io on a read-only export (a snapshot).
fn qemu_io_ro(uri: &str, cmds: &[&str]) {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-r", "-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

fn inspect(d: &Blockd, vol: &str) -> Value {
    serde_json::from_str(&d.ok(&["-j", "volume", "inspect", vol])).expect("inspect JSON")
}

#[test]
fn a_64_tib_volume_tracks_4_kib_extents_past_2_pow_32() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "/dev/shm (tmpfs) is needed for a 64 TiB sparse file"
    );
    let mut d = Blockd::start_in(shm);
    d.create("big", "64T");
    let v = inspect(&d, "big");
    assert_eq!(v["size"], 64 * TIB);
    assert_eq!(v["extent_size"], 4096);
    // Extent 40 TiB / 4 KiB = 10 * 2^30, far past 2^32.
    let at = 40 * TIB;
    let uri = d.uri("big");
    qemu_io(
        &uri,
        &[&format!("write -P 0x11 {at} 4k"), "write -P 0x33 0 4k"],
    );
    d.ok(&["snapshot", "create", "big", "--name", "s"]);
    let snap = serde_json::from_str::<Value>(&d.ok(&["-j", "snapshot", "inspect", "big@s"]))
        .expect("snapshot JSON");
    // Both writes are in the frozen change set: two extents.
    assert_eq!(snap["changed_bytes"], 2 * 4096, "{snap}");
    // Overwrite after the freeze: the frozen image keeps the old bytes.
    qemu_io(&uri, &[&format!("write -P 0x22 {at} 4k")]);
    qemu_io_ro(&d.uri("big@s"), &[&format!("read -P 0x11 {at} 4k")]);
    qemu_io(&uri, &[&format!("read -P 0x22 {at} 4k")]);
    let snap = serde_json::from_str::<Value>(&d.ok(&["-j", "snapshot", "inspect", "big@s"]))
        .expect("snapshot JSON");
    assert_eq!(snap["cow_bytes"], 4096, "{snap}");
    assert_eq!(inspect(&d, "big")["dirty_bytes"], 4096);
    // A clean restart reads the map back (format version 2) and trusts it,
    // and the held snapshot's COW index finds the extent past 2^32.
    assert!(d.terminate().success());
    d.spawn();
    let v = inspect(&d, "big");
    assert_eq!(v["tracking_known"], true, "{v}");
    assert_eq!(v["dirty_bytes"], 4096, "{v}");
    qemu_io_ro(
        &d.uri("big@s"),
        &[&format!("read -P 0x11 {at} 4k"), "read -P 0x33 0 4k"],
    );
    let map = std::fs::read(d.dir.path().join("volumes/big.dirty")).expect("dirty map");
    assert_eq!(&map[..8], b"BLKDDIRT");
    assert_eq!(u32::from_le_bytes(map[8..12].try_into().unwrap()), 2);
    // Over the maximum: refused, saying what the maximum is.
    d.fails(
        &["volume", "create", "huge", "--size", "65T"],
        "maximum of 64 TiB",
    );
    d.fails(
        &["volume", "resize", "big", "--size", "128T"],
        "maximum of 64 TiB",
    );
}

#[test]
fn a_size_the_file_system_cannot_hold_is_refused_with_the_reason() {
    let d = Blockd::start();
    let args = [
        "volume",
        "create",
        "v",
        "--size",
        "17T",
        "--extent-size",
        "64K",
    ];
    let fs = run(std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(d.dir.path()));
    if fs.trim() == "ext2/ext3" {
        // ext4 reports as ext2/ext3 to stat -f: files stop at 16 TiB.
        let err = d.fails(&args, "cannot store a file of");
        assert!(err.contains("XFS or btrfs"), "{err}");
        // Nothing is left behind.
        assert!(!d.dir.path().join("volumes/v.img").exists());
        assert!(!d.blockctl(&["volume", "inspect", "v"]).status.success());
    } else {
        eprintln!("state dir on {}: a 17 TiB file is allowed there", fs.trim());
        d.ok(&args);
    }
}
