//! Durability across kill -9, SIGTERM drain with ESHUTDOWN, and restarts.

mod common;

use common::*;

#[test]
fn fua_and_flushed_writes_survive_kill_9() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("vol1", "16M");
    d.ok(&[
        "volume", "create", "vol2", "--size", "8M", "--label", "app=db",
    ]);
    let uri = d.uri("vol1");
    // FUA writes, and plain writes followed by a FLUSH, on separate connections.
    qemu_io(&uri, &["write -f -P 0x41 0 1M", "write -f -P 0x42 3M 4k"]);
    qemu_io(&uri, &["write -P 0x43 5M 2M", "flush"]);
    // A FLUSH on a second connection covers writes made on the first.
    qemu_io(&d.uri("vol2"), &["write -P 0x44 0 64k"]);
    qemu_io(&d.uri("vol2"), &["flush"]);
    d.kill9();
    assert!(d.child.is_none());
    d.spawn();
    let list = d.ok(&["-j", "volume", "list"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vol1", "vol2"], "volumes lost across kill -9");
    assert_eq!(v[1]["labels"]["app"], "db");
    qemu_io(
        &uri,
        &[
            "read -P 0x41 0 1M",
            "read -P 0x42 3M 4k",
            "read -P 0x43 5M 2M",
            "read -P 0 1M 2M",
        ],
    );
    qemu_io(&d.uri("vol2"), &["read -P 0x44 0 64k"]);
}

const DRAIN: &str = r#"
import errno, json, nbd, os, signal, sys, time
uri, pid = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
# Acknowledged before the signal: must be on disk after restart.
h.pwrite(b"\x51" * 65536, 0)
h.flush()
# Several large writes in flight while SIGTERM arrives.
cookies = []
for i in range(8):
    cookies.append((i, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([0x60 + i]) * (1 << 20)), (1 + i) << 20)))
# Let the requests reach the server before the signal.
deadline = time.time() + 0.05
while time.time() < deadline:
    h.poll(0)
os.kill(pid, signal.SIGTERM)
done = {}
while len(done) < len(cookies):
    for i, c in cookies:
        if i in done:
            continue
        try:
            if h.aio_command_completed(c):
                done[i] = "ok"
        except nbd.Error as e:
            done[i] = e.errno
    if len(done) < len(cookies):
        h.poll(1000)
# A request made after shutdown began gets ESHUTDOWN.
time.sleep(0.3)
try:
    h.pwrite(b"\x99" * 4096, 12 << 20)
    late = "ok"
except nbd.Error as e:
    late = e.errno
print(json.dumps({"writes": done, "late": late}))
"#;

#[test]
fn sigterm_drains_answers_eshutdown_and_exits_zero() {
    if !require_tools(&["nbdsh", "qemu-io"]) {
        return;
    }
    let mut d = Blockd::start_with(None, &["--shutdown-grace", "3"]);
    d.create("vol1", "16M");
    let out = nbdsh(DRAIN, &[&d.uri("vol1"), &d.pid().to_string()]);
    let v: serde_json::Value =
        serde_json::from_str(out.trim().lines().last().unwrap()).expect(&out);
    assert_eq!(
        v["late"], "ESHUTDOWN",
        "a request after SIGTERM must get ESHUTDOWN: {out}"
    );
    let mut acknowledged = Vec::new();
    for (i, r) in v["writes"].as_object().unwrap() {
        match r {
            serde_json::Value::String(s) if s == "ok" => {
                acknowledged.push(i.parse::<u64>().unwrap())
            }
            other => assert_eq!(
                other, "ESHUTDOWN",
                "an in-flight write failed with something other than ESHUTDOWN: {out}"
            ),
        }
    }
    let status = d.wait_exit();
    assert!(
        status.success(),
        "blockd must exit 0 after SIGTERM, got {status}:\n{}",
        d.log()
    );
    assert!(d.log().contains("blockd stopped cleanly"), "{}", d.log());
    assert!(!d.api_socket().exists(), "api.sock left behind");
    d.spawn();
    let uri = d.uri("vol1");
    qemu_io(&uri, &["read -P 0x51 0 64k", "read -P 0 12M 4k"]);
    for i in acknowledged {
        qemu_io(&uri, &[&format!("read -P {} {}M 1M", 0x60 + i, 1 + i)]);
    }
}

#[test]
fn restart_after_clean_stop_keeps_volumes() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("keep", "4M");
    qemu_io(&d.uri("keep"), &["write -P 0x12 0 4M"]);
    let status = d.terminate();
    assert!(status.success(), "exit status {status}");
    d.spawn();
    qemu_io(&d.uri("keep"), &["read -P 0x12 0 4M"]);
    // A second daemon on the same state dir is refused.
    let out = std::process::Command::new(bin("blockd"))
        .arg("--state-dir")
        .arg(d.dir.path())
        .arg("--api-socket")
        .arg(d.dir.path().join("other.sock"))
        .arg("--nbd-socket")
        .arg(d.dir.path().join("other-nbd.sock"))
        .arg("--no-mlock")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another blockd is already using state dir"),
        "{err}"
    );
    // It says why it did not start, and nothing about a start it never
    // made (the protections are reported once the daemon is up).
    assert!(!err.contains("memory-pressure protection"), "{err}");
}
