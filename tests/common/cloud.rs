//! Helpers shared by the cloud-snapshot tests: load images into volumes,
//! back up and restore with `--wait`, compare with qemu-img.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

pub const MB: usize = 1 << 20;

pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// Writes `data` into volume `vol` (created with the data's size).
pub fn load(d: &Blockd, vol: &str, image: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(image)
        .arg(d.uri(vol)));
}

/// Scattered 4 KiB writes applied to both the volume and the reference image.
pub fn scatter(d: &Blockd, vol: &str, image: &Path, count: u64, seed: u64) {
    let size = std::fs::metadata(image).unwrap().len();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut cmds = Vec::new();
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (size / 4096)) * 4096;
        cmds.push(format!("write -P {} {off} 4k", (i % 250) + 1));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    for chunk in refs.chunks(200) {
        qemu_io(&d.uri(vol), chunk);
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]).arg(image);
        for cmd in chunk {
            c.args(["-c", cmd]);
        }
        run(&mut c);
    }
}

/// `cloudsnap backup --wait -j`: the finished task.
pub fn backup(d: &Blockd, args: &[&str]) -> Value {
    let mut a = vec!["-j", "cloudsnap", "backup"];
    a.extend_from_slice(args);
    a.push("--wait");
    let tasks = json(&d.ok(&a));
    let t = tasks.as_array().expect("task list")[0].clone();
    assert_eq!(t["state"], "Done", "{t}");
    t
}

/// `cloudsnap backup-group ARGS --wait -j`: the members' tasks.
pub fn backup_group(d: &Blockd, args: &[&str]) -> Value {
    let mut a = vec!["-j", "cloudsnap", "backup-group"];
    a.extend_from_slice(args);
    a.push("--wait");
    json(&d.ok(&a))
}

/// `cloudsnap restore --wait -j`: the finished task (which may have failed;
/// blockctl then exits non-zero).
pub fn restore(d: &Blockd, snap: &str, vol: &str, extra: &[&str]) -> Value {
    let mut a = vec![
        "-j",
        "cloudsnap",
        "restore",
        "--snap",
        snap,
        "--volume",
        vol,
        "--wait",
    ];
    a.extend_from_slice(extra);
    let out = d.blockctl(&a);
    let tasks = json(&String::from_utf8_lossy(&out.stdout));
    let t = tasks.as_array().expect("task list")[0].clone();
    assert_eq!(
        out.status.success(),
        t["state"] == "Done",
        "exit status must follow the outcome: {t}"
    );
    if !out.status.success() {
        // With -j, stderr is one JSON object, naming what went wrong.
        let err = String::from_utf8_lossy(&out.stderr);
        let e: Value = serde_json::from_str(err.trim())
            .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}): {err}"));
        let m = e["error"].as_str().unwrap_or_default();
        assert!(
            m.contains("did not complete") && m.contains(t["id"].as_str().unwrap()),
            "{err}"
        );
    }
    t
}

pub fn assert_same(d: &Blockd, image: &Path, vol: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(image)
        .arg(d.uri(vol))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "volume {vol} differs from {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn list(d: &Blockd, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["-j", "cloudsnap", "list"];
    a.extend_from_slice(args);
    json(&d.ok(&a)).as_array().unwrap().clone()
}

/// An image: random data in the first `data` bytes, zeros after.
pub fn image(dir: &Path, name: &str, size: usize, data: usize, seed: u64) -> PathBuf {
    let p = dir.join(name);
    let mut bytes = random_bytes(data, seed);
    bytes.resize(size, 0);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn need() -> bool {
    require_tools(&["qemu-img", "qemu-io"])
}

pub fn status(d: &Blockd, id: &str) -> Value {
    let out = d.blockctl(&["-j", "cloudsnap", "status", "--name", id]);
    if !out.status.success() {
        return Value::Null;
    }
    json(&String::from_utf8_lossy(&out.stdout))[0].clone()
}

/// Polls task `id` until `reached` holds or the task has ended; returns
/// its last state.
pub fn wait_until(d: &Blockd, id: &str, reached: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = status(d, id);
        if !t.is_null() && (reached(&t) || t["state"] != "Active") {
            return t;
        }
        assert!(Instant::now() < deadline, "task {id} made no progress: {t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `cloudsnap restore --lazy`: the task id (the volume serves at once).
pub fn lazy_restore(d: &Blockd, snap: &str, vol: &str) -> String {
    lazy_restore_with(d, snap, vol, &[])
}

/// [`lazy_restore`] with more arguments (`--cred-id NAME`).
pub fn lazy_restore_with(d: &Blockd, snap: &str, vol: &str, extra: &[&str]) -> String {
    let mut a = vec![
        "-j",
        "cloudsnap",
        "restore",
        "--snap",
        snap,
        "--volume",
        vol,
        "--lazy",
    ];
    a.extend_from_slice(extra);
    let out = d.ok(&a);
    let t = &json(&out)["tasks"][0];
    assert_eq!(t["lazy"], true, "{t}");
    t["id"].as_str().expect("task id").to_string()
}

/// Waits for task `id` to end.
pub fn wait_done(d: &Blockd, id: &str) -> Value {
    wait_until(d, id, |_| false)
}

/// Creates volume `vol` of `size` bytes holding `data` seeded random bytes
/// (zeros after), backs it up in full and returns its image.
pub fn backed_up(
    d: &Blockd,
    dir: &Path,
    vol: &str,
    size: usize,
    data: usize,
    seed: u64,
) -> PathBuf {
    d.create(vol, &format!("{}M", size / MB));
    let img = image(dir, &format!("{vol}.img"), size, data, seed);
    load(d, vol, &img);
    backup(d, &[vol]);
    img
}

/// Starts `cloudsnap backup ARGS` and returns its task id once it has
/// uploaded `mb` MiB, still running.
pub fn backup_underway(d: &Blockd, args: &[&str], mb: usize) -> String {
    let mut a = vec!["-j", "cloudsnap", "backup"];
    a.extend_from_slice(args);
    let s = json(&d.ok(&a));
    let id = s["tasks"][0]["id"].as_str().unwrap().to_string();
    let t = wait_until(d, &id, |t| {
        t["bytes_transferred"].as_u64().unwrap_or(0) >= (mb * MB) as u64
    });
    assert_eq!(
        t["state"], "Active",
        "finished too soon: make it bigger: {t}"
    );
    id
}

/// Runs the qemu-io command `cmd` on volume `vol` and on `img`, the image
/// that mirrors what the volume must hold.
pub fn write_both(d: &Blockd, vol: &str, img: &Path, cmd: &str) {
    qemu_io(&d.uri(vol), &[cmd]);
    run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(img)
        .args(["-c", cmd]));
}

/// Starts `blockctl repo gc ARGS` and returns at once (to kill the daemon
/// under it); its stderr is piped.
pub fn gc_started(d: &Blockd, args: &[&str]) -> std::process::Child {
    Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(d.api_socket())
        .args(["repo", "gc"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Names the local directory `path` `shared` on each host.
pub fn share(path: &str, hosts: &[&Blockd]) {
    for d in hosts {
        local_location(d, "shared", path);
    }
}

/// Creates local location `name` in directory `path`.
pub fn local_location(d: &Blockd, name: &str, path: impl AsRef<std::ffi::OsStr>) {
    let path = path.as_ref().to_str().expect("a UTF-8 path");
    d.ok(&[
        "credentials",
        "create",
        name,
        "--provider",
        "local",
        "--path",
        path,
    ]);
}

/// The snapshots a `repo check -j` report names as damaged, sorted.
pub fn damaged_snapshots(report: &Value) -> std::collections::BTreeSet<String> {
    report["damaged"]
        .as_array()
        .unwrap_or_else(|| panic!("no damaged list: {report}"))
        .iter()
        .map(|d| d["snapshot"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `f` with the damage records of the local location at `objects`
/// out of sight, as for a backup that listed them before a check wrote
/// them; puts them back after.
pub fn without_damage_records<T>(objects: &Path, f: impl FnOnce() -> T) -> T {
    let dir = objects.join("damaged");
    let hidden = objects.join("damaged.hidden");
    std::fs::rename(&dir, &hidden).unwrap();
    let out = f();
    std::fs::rename(&hidden, &dir).unwrap();
    out
}
