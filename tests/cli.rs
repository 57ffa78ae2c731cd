//! blockctl: the volume verbs, their JSON and table output, and their errors.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cloud::json;
use common::*;

#[test]
fn volume_verbs_and_output() {
    let d = Blockd::start();
    let out = d.ok(&[
        "volume",
        "create",
        "db1",
        "--size",
        "10G",
        "--label",
        "tier=gold",
        "--label",
        "app=pg",
    ]);
    assert_eq!(out.trim(), "Volume db1 created (10.0 GiB).");
    d.ok(&[
        "volume",
        "create",
        "scratch",
        "--size",
        "512M",
        "--extent-size",
        "64K",
    ]);
    // A size that does not round to its unit is answered exactly.
    let out = d.ok(&["volume", "create", "odd", "--size", "1M"]);
    assert_eq!(out.trim(), "Volume odd created (1.0 MiB).");
    let out = d.ok(&["volume", "resize", "odd", "--size", "1025M"]);
    assert_eq!(out.trim(), "Volume odd is now 1.0 GiB, 1074790400 bytes.");
    d.ok(&["volume", "delete", "odd"]);
    // Labels a table row or a selector could not hold are refused, by
    // blockctl and by the daemon alike.
    let long = format!("{}=x", "k".repeat(129));
    usage_error(
        &["volume", "create", "x", "--size", "-1G"],
        "a size is not negative",
    );
    for bad in [long.as_str(), "a,b=c", "note=two\nlines"] {
        usage_error(
            &["volume", "create", "l", "--size", "1M", "--label", bad],
            "label",
        );
    }
    let body = format!(
        r#"{{"name":"l","size":1048576,"labels":{{"{}":"x"}}}}"#,
        "k".repeat(129)
    );
    let out = api_post(&d, "/v1/volumes", &body);
    assert!(
        out.starts_with("HTTP/1.1 400") && out.contains("at most 128 characters"),
        "{out}"
    );
    // A directory given as the socket is named as such.
    let out = Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(d.dir.path())
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("that is a directory"),
        "{out:?}"
    );

    let v: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "inspect", "db1"])).unwrap();
    assert_eq!(v["name"], "db1");
    assert_eq!(v["size"], 10u64 << 30);
    assert_eq!(v["extent_size"], 4096);
    assert_eq!(v["labels"]["tier"], "gold");
    assert_eq!(v["connections"], 0);
    assert!(v["created"].as_str().unwrap().ends_with('Z'));

    let table = d.ok(&["volume", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("db1 ")
            && lines[1].contains("10.0 GiB")
            && lines[1].contains("app=pg,tier=gold"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("scratch") && lines[2].contains("64.0 KiB"),
        "{table}"
    );

    // Label selection.
    let sel: serde_json::Value =
        serde_json::from_str(&d.ok(&["volume", "list", "--label", "tier=gold", "--json"])).unwrap();
    assert_eq!(sel.as_array().unwrap().len(), 1);
    assert_eq!(sel[0]["name"], "db1");
    let none: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "list", "--label", "tier=bronze"])).unwrap();
    assert!(none.as_array().unwrap().is_empty());

    // Grow, then refuse to shrink.
    let r: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "volume", "resize", "scratch", "--size", "1G"]))
            .unwrap();
    assert_eq!(r["size"], 1u64 << 30);
    let e = d.fails(
        &["volume", "resize", "scratch", "--size", "256M"],
        "shrinking",
    );
    assert!(e.contains("create a new volume of the smaller size"), "{e}");

    d.ok(&["volume", "delete", "scratch"]);
    d.fails(&["volume", "inspect", "scratch"], "not found");
}

#[test]
fn labels_change_in_one_step_and_stay_changed() {
    let mut d = Blockd::start();
    d.ok(&[
        "volume",
        "create",
        "db1",
        "--size",
        "1G",
        "--label",
        "tier=gold",
    ]);
    let out = d.ok(&[
        "volume",
        "update",
        "db1",
        "--label",
        "tier=silver",
        "--label",
        "env=prod",
    ]);
    assert_eq!(out.trim(), "Volume db1 labels: env=prod,tier=silver");
    let sel = json(&d.ok(&["-j", "volume", "list", "--label", "env=prod"]));
    assert_eq!(sel[0]["name"], "db1", "{sel}");
    // A group backup selects by the new labels.
    let g = json(&d.ok(&[
        "-j",
        "cloudsnap",
        "backup-group",
        "--label",
        "tier=silver",
        "--wait",
    ]));
    assert_eq!(g[0]["volume"], "db1", "{g}");
    let v = json(&d.ok(&["-j", "volume", "update", "db1", "--remove-label", "tier"]));
    assert_eq!(v["labels"], serde_json::json!({"env": "prod"}), "{v}");

    // Racing updates of one volume, each adding its own key, lose none.
    let socket = d.api_socket();
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new(bin("blockctl"))
                .env("BLOCKD_SOCKET", &socket)
                .args(["volume", "update", "db1", "--label", &format!("k{i}={i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v = json(&d.ok(&["-j", "volume", "inspect", "db1"]));
    for i in 0..8 {
        assert_eq!(v["labels"][format!("k{i}")], i.to_string(), "{v}");
    }

    // They are stored, not only held in memory.
    d.terminate();
    d.spawn();
    let v = json(&d.ok(&["-j", "volume", "inspect", "db1"]));
    assert_eq!(v["labels"]["env"], "prod", "{v}");
    assert_eq!(v["labels"]["k7"], "7", "{v}");
    assert!(v["labels"].get("tier").is_none(), "{v}");

    // Bad input.
    d.fails(&["volume", "update", "nope", "--label", "a=b"], "not found");
    let out = d.blockctl(&["volume", "update", "db1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "nothing to change is a usage error"
    );
    let out = d.blockctl(&[
        "volume",
        "update",
        "db1",
        "--label",
        "a=b",
        "--remove-label",
        "a",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("both set and removed"));
    // The socket named in the environment is used, and a usage error
    // does not show it as an option the user left out.
    let out = Command::new(bin("blockctl"))
        .env("BLOCKD_SOCKET", &socket)
        .args(["volume", "update"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Usage: blockctl volume update") && !err.contains("--socket"),
        "{err}"
    );
    // Other clients of the API get the same rules from the daemon, and
    // the labels stay as they were.
    let post = |body: &str| api_post(&d, "/v1/volumes/db1/labels", body);
    let before = json(&d.ok(&["-j", "volume", "inspect", "db1"]))["labels"].clone();
    let a = post(r#"{"set": {"": "x"}}"#);
    assert!(
        a.starts_with("HTTP/1.1 400") && a.contains("label key is empty"),
        "{a}"
    );
    let a = post(r#"{"remove": [""]}"#);
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    let a = post(r#"{"labels": {"a": "b"}}"#);
    assert!(
        a.starts_with("HTTP/1.1 400") && a.contains("unknown field"),
        "{a}"
    );
    let a = post("not json");
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    let after = json(&d.ok(&["-j", "volume", "inspect", "db1"]))["labels"].clone();
    assert_eq!(before, after);
}

#[test]
fn volume_errors() {
    let d = Blockd::start();
    d.create("vol1", "1G");
    d.fails(
        &["volume", "create", "vol1", "--size", "1G"],
        "already exists",
    );
    d.fails(
        &["volume", "create", "vol2", "--size", "10Q"],
        "invalid size \"10Q\"",
    );
    d.fails(
        &["volume", "create", "../x", "--size", "1G"],
        "must start with an ASCII letter or digit",
    );
    d.fails(
        &["volume", "create", "-", "--size", "1G"],
        "must start with an ASCII letter or digit",
    );
    d.fails(
        &["volume", "create", "x..y", "--size", "1G"],
        "must not contain \"..\"",
    );
    // Decimal units are ambiguous: refused with the binary spelling to use.
    d.fails(
        &["volume", "create", "vol2", "--size", "1GB"],
        "write 1G or 1GiB",
    );
    d.fails(
        &[
            "volume", "create", "vol2", "--size", "1G", "--label", "k=v", "--label", "k=w",
        ],
        "label \"k\" is given twice",
    );

    d.fails(
        &["volume", "create", "a/b", "--size", "1G"],
        "may contain only",
    );
    d.fails(
        &[
            "volume",
            "create",
            "vol3",
            "--size",
            "1G",
            "--extent-size",
            "3000",
        ],
        "power of two",
    );
    d.fails(
        &[
            "volume", "create", "vol3", "--size", "1G", "--label", "novalue",
        ],
        "key=value",
    );
    d.fails(&["volume", "delete", "ghost"], "not found");
    d.fails(&["volume", "resize", "ghost", "--size", "1G"], "not found");
    // The API itself answers bad JSON and unknown volumes with 4xx and a message.
    if require_tools(&["curl"]) {
        let call = |method: &str, path: &str, body: &str| {
            run(Command::new("curl")
                .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
                .arg(d.api_socket())
                .args(["-X", method, "-d", body, &format!("http://blockd{path}")]))
        };
        let text = call("POST", "/v1/volumes", "{not json");
        assert!(
            text.ends_with("\n400") && text.contains("invalid request body"),
            "{text}"
        );
        let text = call(
            "POST",
            "/v1/volumes",
            r#"{"name":"x","size":4096,"bogus":1}"#,
        );
        assert!(
            text.ends_with("\n400") && text.contains("unknown field"),
            "{text}"
        );
        let text = call("GET", "/v1/volumes/ghost", "");
        assert!(
            text.ends_with("\n404") && text.contains("not found"),
            "{text}"
        );
    }
    // No daemon: a clear message and a non-zero exit.
    let out = Command::new(bin("blockctl"))
        .args(["--socket", "/nonexistent/api.sock", "volume", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the daemon running?"));
}

#[test]
fn exit_codes_and_json_errors() {
    let d = Blockd::start();
    d.create("vol1", "16M");
    let code = |out: &std::process::Output| out.status.code().expect("exit status");
    // 2: the command line is wrong (blockctl refuses it itself).
    let out = d.blockctl(&["volume", "create", "v", "--size", "1GB"]);
    assert_eq!(code(&out), 2);
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    let out = d.blockctl(&["volume", "list", "--label", "a=1", "--label", "a=2"]);
    assert_eq!(code(&out), 2, "{out:?}");
    // 1: the daemon refused or failed.
    let out = d.blockctl(&["volume", "inspect", "ghost"]);
    assert_eq!(code(&out), 1);
    // 2 also for values only the daemon judges: the command fails again
    // however things stand. 1 for what depends on them.
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("f"), b"x").unwrap();
    let full = full.to_str().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    let nas = tmp.path().join("nas");
    let nas = nas.to_str().unwrap();
    for (args, status, needle) in [
        (
            &["volume", "create", "v", "--size", "0"][..],
            2,
            "at least one extent",
        ),
        (
            &["volume", "create", "v", "--size", "6K"][..],
            2,
            "multiple of the extent size 4096: give 4096 or 8192 bytes, or --extent-size 2048",
        ),
        // No extent size divides it: none is offered.
        (
            &["volume", "create", "v", "--size", "1000"][..],
            2,
            "multiple of the extent size 4096: give 4096 bytes\n",
        ),
        (
            &["volume", "create", "vol1", "--size", "16M"][..],
            1,
            "exists",
        ),
        (
            &["volume", "resize", "vol1", "--size", "8M"][..],
            2,
            "shrinking",
        ),
        (
            &[
                "cloudsnap",
                "schedules",
                "create",
                "vol1",
                "--periodic",
                "0",
            ][..],
            2,
            "at least 1s",
        ),
        (
            &[
                "cloudsnap",
                "schedules",
                "create",
                "vol1",
                "--periodic",
                "5",
                "--max",
                "0",
            ][..],
            2,
            "--max",
        ),
        (
            &[
                "cloudsnap",
                "schedules",
                "create",
                "vol1",
                "--daily",
                "24:00",
            ][..],
            2,
            "hh:mm",
        ),
        (
            &[
                "cloudsnap",
                "schedules",
                "create",
                "ghost",
                "--periodic",
                "5",
            ][..],
            1,
            "not found",
        ),
        (&["mount", empty, "--cache-size", "0"][..], 2, "cache"),
        (&["mount", full][..], 1, "not empty"),
        (
            &[
                "credentials",
                "create",
                "x",
                "--provider",
                "s3",
                "--bucket",
                "b",
            ][..],
            2,
            "--s3-access-key is required",
        ),
        (
            &[
                "credentials",
                "create",
                "x",
                "--provider",
                "local",
                "--path",
                nas,
                "--bucket",
                "b",
            ][..],
            2,
            "--bucket",
        ),
        (
            &["credentials", "create", "x", "--provider", "local"][..],
            2,
            "--path is required",
        ),
        (&["credentials", "delete", "local"][..], 2, "built in"),
        (
            &[
                "snapshot",
                "create",
                "vol1",
                "--name",
                "s",
                "--pre-exec",
                "exit 3",
            ][..],
            1,
            "exited with status 3",
        ),
        // An empty argument (a shell variable not set) is a usage error,
        // not a look for a thing named "".
        (&["volume", "delete", ""][..], 2, "<NAME> is empty"),
        (
            &["cloudsnap", "status", "--name", "", "--wait"][..],
            2,
            "--name is empty",
        ),
        (&["cloudsnap", "backup", ""][..], 2, "<VOLUME> is empty"),
        // An empty hook runs nothing: allowed.
        (
            &[
                "snapshot",
                "create",
                "vol1",
                "--name",
                "hookless",
                "--pre-exec",
                "",
            ][..],
            0,
            "",
        ),
    ] {
        let out = d.blockctl(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), status, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A resize cannot change the extent size: none is offered.
    let out = d.blockctl(&["volume", "resize", "vol1", "--size", "16390K"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), 2, "{err}");
    assert!(
        err.contains("multiple of the extent size 4096") && !err.contains("--extent-size"),
        "{err}"
    );
    let listed = json(&d.ok(&["-j", "volume", "list"]));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let creds = json(&d.ok(&["-j", "credentials", "list"]));
    assert_eq!(creds.as_array().unwrap().len(), 1, "{creds}");
    // Under -j, stdout holds only answers; an error is one JSON object on
    // stderr, usage errors included.
    for (args, status, needle) in [
        (
            &["-j", "volume", "create", "v", "--size", "1GB"][..],
            2,
            "write 1G or 1GiB",
        ),
        (
            &["volume", "create", "v", "--size", "1GB", "--json"][..],
            2,
            "1GB",
        ),
        (&["-j", "volume", "inspect", "ghost"][..], 1, "not found"),
        (&["-j", "volume", "inspect", ""][..], 2, "<NAME> is empty"),
        (
            &["-j", "snapshot", "delete", "vol1@none"][..],
            1,
            "not found",
        ),
    ] {
        let out = d.blockctl(args);
        assert_eq!(code(&out), status, "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        let err: serde_json::Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("{args:?}: stderr is not JSON ({e}): {out:?}"));
        assert_eq!(err["exit_status"], status, "{err}");
        assert!(err["error"].as_str().unwrap().contains(needle), "{err}");
    }
    // Pointed at the NBD socket by mistake: says so.
    let out = Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(d.nbd_socket())
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is blockd's NBD socket") && err.contains("api.sock"),
        "{err}"
    );
    // 0, and --help is not an error.
    assert_eq!(code(&d.blockctl(&["-j", "volume", "list"])), 0);
    let out = d.blockctl(&["-j", "volume", "--help"]);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));

    // The API answers JSON errors even where the HTTP layer refuses a
    // request itself: a method a route does not take, a body too large.
    if require_tools(&["curl"]) {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(d.api_socket())
            .args(["-X", "PUT", "http://blockd/v1/volumes"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap();
        assert_eq!(status, "405", "{text}");
        let v: serde_json::Value = serde_json::from_str(body).expect("405 body is JSON");
        assert!(
            v["error"].as_str().unwrap().contains("PUT is not allowed"),
            "{v}"
        );
        let big = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(big.path(), vec![b' '; 4 << 20]).unwrap();
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(d.api_socket())
            .args([
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data-binary",
            ])
            .arg(format!("@{}", big.path().display()))
            .arg("http://blockd/v1/volumes")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap();
        assert_eq!(status, "413", "{text}");
        let v: serde_json::Value = serde_json::from_str(body).expect("413 body is JSON");
        assert!(v["error"].as_str().unwrap().contains("too large"), "{v}");
    }
}

#[test]
fn delete_with_open_connection_needs_force() {
    if !require_tools(&["nbdsh"]) {
        return;
    }
    let d = Blockd::start();
    d.create("busy", "4M");
    // A client that holds its connection open and reports how it ended.
    let mut client = nbdsh_command()
        .args(["-u", &d.uri("busy"), "-c"])
        .arg(
            "import time\nfor _ in range(600):\n    time.sleep(0.05)\n    try:\n        h.pread(512, 0)\n    except Exception as e:\n        print('disconnected', e)\n        break\n",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&d.ok(&["-j", "volume", "inspect", "busy"])).unwrap();
        if v["connections"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "connection never showed up");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.fails(&["volume", "delete", "busy"], "open NBD connection");
    assert!(d.ok(&["volume", "list"]).contains("busy"));
    d.ok(&["volume", "delete", "busy", "--force"]);
    let status = wait_timeout(&mut client, Duration::from_secs(30))
        .expect("client still running after forced delete");
    let mut out = String::new();
    std::io::Read::read_to_string(client.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(
        out.contains("disconnected"),
        "client was not disconnected: {out} {status}"
    );
    assert!(
        !d.dir.path().join("volumes/busy.img").exists(),
        "data file left behind"
    );
    // A client that has just exited is not an open connection: a script
    // deleting right after its last client is never refused.
    for round in 0..10 {
        let name = format!("brief{round}");
        d.create(&name, "4M");
        qemu_io(
            &d.uri(&name),
            &["write -P 0x11 0 64k", "read -P 0x11 0 64k"],
        );
        d.ok(&["volume", "delete", &name]);
    }
}

/// A delete racing clients that connect over and over: each connection is
/// either refused at the handshake or served to its end; none is told it
/// may transmit and then cut off (the export is counted open before the
/// reply to NBD_OPT_GO is sent). The delete retries until it finds no
/// client connected, which puts it in the gaps where the next handshake
/// runs. Each client pauses a moment between connections, so that on a
/// loaded host the four still leave such gaps before they stop.
#[test]
fn a_delete_racing_new_connections_never_cuts_off_one_that_opened() {
    if !require_tools(&["nbdsh"]) {
        return;
    }
    let d = Blockd::start();
    let looper = |uri: &str| {
        let script = format!(
            "import time\n\
             opened = 0\n\
             end = time.monotonic() + 10\n\
             while time.monotonic() < end:\n    \
                 h = nbd.NBD()\n    \
                 try:\n        h.connect_uri({uri:?})\n    \
                 except nbd.Error:\n        print('refused after', opened, flush=True)\n        break\n    \
                 opened += 1\n    \
                 try:\n        h.pread(4096, 0)\n        h.shutdown()\n    \
                 except nbd.Error as e:\n        print('broken:', e, flush=True)\n        break\n    \
                 time.sleep(0.002)\n\
             else:\n    print('never refused', flush=True)\n"
        );
        let out = nbdsh_command()
            .args(["-c", &script])
            .output()
            .expect("nbdsh");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for round in 0..6 {
        let name = format!("race{round}");
        d.create(&name, "4M");
        let uri = d.uri(&name);
        let outs = at_once(5, |i| {
            if i < 4 {
                return looper(&uri);
            }
            std::thread::sleep(Duration::from_millis(300));
            let deadline = Instant::now() + Duration::from_secs(9);
            loop {
                let out = d.blockctl(&["volume", "delete", &name]);
                if out.status.success() {
                    return "deleted".to_string();
                }
                let e = String::from_utf8_lossy(&out.stderr).to_string();
                if !e.contains("open NBD connection") || Instant::now() > deadline {
                    return e;
                }
            }
        });
        assert_eq!(outs[4], "deleted", "round {round}: {outs:?}");
        for o in &outs[..4] {
            assert!(o.starts_with("refused after"), "round {round}: {outs:?}");
        }
    }
}

#[test]
fn bad_arguments_exit_nonzero() {
    let out = Command::new(bin("blockctl"))
        .args(["volume", "create", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
    let out = Command::new(bin("blockd"))
        .args(["--nbd-listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value"));
}

/// POSTs `body` to the daemon's API as another client would; returns the
/// whole answer, status line first.
fn api_post(d: &Blockd, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(d.api_socket()).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: blockd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// Runs blockctl with no daemon behind it: for argument errors, which clap
/// reports before any request is sent.
fn blockctl_no_daemon(args: &[&str]) -> std::process::Output {
    Command::new(bin("blockctl"))
        .args(["--socket", "/nonexistent/api.sock"])
        .args(args)
        .env_remove("BLOCKD_S3_SECRET_KEY")
        .env_remove("BLOCKD_AZURE_ACCOUNT_KEY")
        .env_remove("BLOCKD_ENCRYPTION_PASSPHRASE")
        .output()
        .unwrap()
}

/// Asserts that blockctl refused `args` as a usage error naming `needle`.
fn usage_error(args: &[&str], needle: &str) {
    let out = blockctl_no_daemon(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "blockctl {args:?}: a wrong command line exits 2: {stderr}"
    );
    assert!(
        stderr.contains(needle),
        "blockctl {args:?}: expected {needle:?} in stderr, got: {stderr}"
    );
    // A usage error, not a failed request.
    assert!(
        !stderr.contains("is the daemon running?"),
        "blockctl {args:?} got as far as the daemon: {stderr}"
    );
}

#[test]
fn cloud_bad_arguments_exit_nonzero() {
    usage_error(&["credentials", "create", "x"], "--provider");
    usage_error(
        &["cred", "create", "x", "--provider", "ftp"],
        "unknown provider",
    );
    usage_error(&["cloudsnap", "backup-group"], "--volume-ids");
    usage_error(&["cloudsnap", "backup-group", "--full"], "--label");
    usage_error(&["cs", "restore", "--snap", "a/b"], "--volume");
    // A new name the daemon would refuse is a wrong command line.
    for (args, needle) in [
        (
            vec!["volume", "create", "a/b", "--size", "1G"],
            "volume name \"a/b\" may contain only",
        ),
        (
            vec!["snapshot", "create", "v", "--name", "..x"],
            "snapshot name \"..x\" must start with",
        ),
        (
            vec!["cs", "restore", "--snap", "a/b", "--volume", "new vol"],
            "volume name \"new vol\" may contain only",
        ),
        (
            vec!["credentials", "create", "s 3", "--provider", "local"],
            "credentials name \"s 3\" may contain only",
        ),
        (
            vec!["volume", "create", "v", "--size", "1G", "--label", "k=a b"],
            "has a space",
        ),
    ] {
        usage_error(&args, needle);
    }
    usage_error(
        &["cloudsnap", "backup", "vol", "--label", "notapair"],
        "notapair",
    );
    usage_error(&["cloudsnap", "stop"], "<ID|--name <ID>>");
    usage_error(&["cloudsnap", "status", "--wait"], "--name");
    // A socket that can never answer is not waited for.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(dir.path())
        .args(["cloudsnap", "status", "--name", "t", "--wait"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("that is a directory") && !stderr.contains("outcome is unknown"),
        "{stderr}"
    );
    // How long a wait rides out a daemon not answering is checked before
    // anything is started.
    let out = Command::new(bin("blockctl"))
        .args(["--socket", "/nonexistent/api.sock"])
        .args(["cloudsnap", "backup", "vol", "--wait"])
        .env("BLOCKCTL_WAIT_UNREACHABLE", "soon")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("BLOCKCTL_WAIT_UNREACHABLE=\"soon\" is not a duration")
            && !stderr.contains("is the daemon running?"),
        "{stderr}"
    );
    usage_error(
        &["cloudsnap", "backup", "vol", "--exec-timeout", "soon"],
        "invalid duration",
    );
    usage_error(
        &["cloudsnap", "backup", "vol", "--exec-timeout", "0s"],
        "at least 1s",
    );
    usage_error(
        &["cloudsnap", "delete", "--snap", "app2"],
        "VOLUME/SNAPSHOT",
    );
    usage_error(
        &["snapshot", "create", "x", "x", "--name", "s"],
        "named twice",
    );
    usage_error(
        &["cloudsnap", "backup", "a", "b"],
        "backup-group --volume-ids a,b",
    );
    let commas = "separate the names with single commas";
    for (list, said) in [
        ("a,a", "named twice"),
        ("a,", commas),
        ("a,,b", commas),
        (",", commas),
    ] {
        usage_error(&["cloudsnap", "backup-group", "--volume-ids", list], said);
        usage_error(
            &[
                "cloudsnap",
                "schedules",
                "create",
                "--volume-ids",
                list,
                "--daily",
                "21:00",
            ],
            said,
        );
    }
    // A volume given both ways is refused, not one of them dropped.
    usage_error(
        &[
            "cloudsnap",
            "schedules",
            "create",
            "app",
            "--volume",
            "logs",
            "--daily",
            "01:00",
        ],
        "cannot be used with",
    );
}

/// Every command and command group ends its --help with examples.
#[test]
fn every_help_ends_with_examples() {
    fn help(path: &[String]) -> String {
        let out = Command::new(bin("blockctl"))
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{path:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
    /// The subcommands a help text lists (skipping `help`).
    fn subcommands(text: &str) -> Vec<String> {
        text.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .map(str::to_string)
            .collect()
    }
    let mut todo: Vec<Vec<String>> = subcommands(&help(&[]))
        .into_iter()
        .map(|c| vec![c])
        .collect();
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let text = help(&path);
        assert!(
            text.contains("\nExample"),
            "`blockctl {} --help` has no examples:\n{text}",
            path.join(" ")
        );
        seen += 1;
        for c in subcommands(&text) {
            let mut p = path.clone();
            p.push(c);
            todo.push(p);
        }
    }
    assert!(seen > 30, "only {seen} commands found");
}

#[test]
fn completions_and_man_pages_generate() {
    let blockctl = |args: &[&str]| Command::new(bin("blockctl")).args(args).output().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = blockctl(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["cloudsnap", "backup-group", "--cred-id", "volume"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = blockctl(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let dir = tempfile::tempdir().unwrap();
    let out = blockctl(&["-j", "man", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let written: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    for page in [
        "blockctl.1",
        "blockctl-volume-create.1",
        "blockctl-cloudsnap-backup.1",
        "blockctl-cloudsnap-schedules-create.1",
        "blockctl-repo-gc.1",
    ] {
        assert!(
            written.iter().any(|w| w == page),
            "{page} missing: {written:?}"
        );
    }
    for page in &written {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains("\n.TH "),
            "{page} is not a man page"
        );
        let name = page.trim_end_matches(".1");
        assert!(text.contains(name), "{page} does not name {name}");
    }
    // Every verb's page shows its example.
    let create = std::fs::read_to_string(dir.path().join("blockctl-volume-create.1")).unwrap();
    assert!(create.contains("volume create db1"), "{create}");
}

/// A volume whose data file was removed behind blockd's back takes only
/// itself out: the daemon starts, serves the others, lists that one as
/// unexported with why and what to do, refuses to serve, resize or back it
/// up, and deletes it.
#[test]
fn a_missing_data_file_takes_out_only_its_volume() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let mut d = Blockd::start();
    d.create("kept", "4M");
    d.create("lost", "4M");
    qemu_io(&d.uri("kept"), &["write -P 0x5e 0 64k"]);
    d.terminate();
    let data = d.dir.path().join("volumes/lost.img");
    std::fs::remove_file(&data).unwrap();
    d.spawn();
    qemu_io(&d.uri("kept"), &["read -P 0x5e 0 64k"]);
    let v = json(&d.ok(&["-j", "volume", "inspect", "lost"]));
    let why = v["unexported"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(
        why.contains(&data.display().to_string())
            && why.contains("missing")
            && why.contains("blockctl volume delete lost"),
        "{why}"
    );
    assert!(
        d.ok(&["volume", "list"])
            .lines()
            .any(|l| l.starts_with("lost ") && l.contains("unexported")),
        "{}",
        d.ok(&["volume", "list"])
    );
    // No count of changes for a volume that is not served (a restore
    // filling it shows the same): its writes are not a backup's to take.
    let text = d.ok(&["volume", "inspect", "lost"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("Changed:") && l.contains("not served: see Exported")),
        "{text}"
    );
    let told = nbd_opens(&d, "lost").expect_err("a volume without data was served");
    assert!(told.contains("volume lost is not exported"), "{told}");
    d.fails(
        &["volume", "resize", "lost", "--size", "8M"],
        "cannot be resized",
    );
    d.fails(
        &["snapshot", "create", "lost", "--name", "s"],
        "cannot be snapshotted",
    );
    assert!(!data.exists(), "nothing may stand in for the missing file");
    d.ok(&["volume", "delete", "lost"]);
    d.create("lost", "4M");
    qemu_io(&d.uri("lost"), &["read -P 0 0 64k"]);
}

/// A daemon that dies under a request that changes something: blockctl
/// exits 3 (outcome unknown) and says the request may have been carried
/// out, and where to look once the daemon is back.
#[test]
fn a_request_cut_short_by_the_daemon_dying_says_where_to_look() {
    /// Sends `args` to the daemon while it is stopped, kills it, and
    /// returns blockctl's status and stderr; the daemon is started again.
    fn cut_short(d: &mut Blockd, args: &[&str]) -> (std::process::ExitStatus, String) {
        signal(d.pid(), "STOP");
        let client = Command::new(bin("blockctl"))
            .env("BLOCKD_SOCKET", d.api_socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The request waits in the stopped daemon's socket; then it dies.
        std::thread::sleep(Duration::from_millis(300));
        d.kill9();
        let out = client.wait_with_output().unwrap();
        d.spawn();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    let mut d = Blockd::start();
    let (status, err) = cut_short(&mut d, &["volume", "create", "cut", "--size", "4M"]);
    assert_eq!(status.code(), Some(3), "{status:?}: {err}");
    assert!(
        err.contains("may have been carried out") && err.contains("blockctl volume list"),
        "{err}"
    );
    d.ok(&["volume", "list"]);

    // A request larger than the socket's buffer is still being written
    // when blockd dies: the write fails, and blockctl says so instead of
    // dying of SIGPIPE without a word (a `--wait` across a restart polls
    // into exactly this).
    let big = "k".repeat(120_000);
    let (status, err) = cut_short(
        &mut d,
        &[
            "credentials",
            "create",
            "big",
            "--provider",
            "s3",
            "--bucket",
            "b",
            "--s3-endpoint",
            "127.0.0.1:9",
            "--s3-region",
            "r",
            "--s3-access-key",
            &big,
            "--s3-secret-key",
            &big,
            "--prefix",
            &big,
        ],
    );
    assert_eq!(status.code(), Some(3), "{status:?}: {err}");
    assert!(err.contains("may have been carried out"), "{err}");
    let creds = json(&d.ok(&["-j", "credentials", "list"]));
    assert!(
        creds.as_array().unwrap().iter().all(|c| c["name"] != "big"),
        "{creds}"
    );
}

/// A reader of blockctl's output that goes away (`blockctl ... | head`)
/// ends it as it ends other tools: by SIGPIPE, with nothing on stderr.
#[test]
fn a_closed_stdout_ends_blockctl_by_sigpipe() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(bin("blockctl"))
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The script is larger than a pipe holds, so blockctl is still
    // writing when the reader goes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(13), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}
