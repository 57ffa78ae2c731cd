//! The daemon's config file: precedence (file < environment < flags),
//! bad keys and values refused at start with the file and line, the
//! effective settings printed, and a running daemon following its file.

mod common;

use std::process::{Command, Output};

use common::*;

/// `blockd` with `args` and `env` (and nothing from the caller's BLOCKD_*).
fn blockd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin("blockd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("BLOCKD_") {
            c.env_remove(k);
        }
    }
    c.args(args).envs(env.iter().copied()).output().unwrap()
}

/// The value of `key` in section `section` ("" for the top) of printed TOML.
fn value(toml: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in toml.lines() {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = s.to_string();
        } else if current == section {
            if let Some((k, v)) = line.split_once(" = ") {
                if k == key {
                    return Some(v.trim_matches('"').to_string());
                }
            }
        }
    }
    None
}

#[test]
fn file_then_environment_then_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("blockd.toml");
    std::fs::write(
        &file,
        "state_dir = \"/srv/blockd\"\nio_engine = \"threads\"\n\n[gc]\ngrace = \"1h\"\nevery = \"2h\"\nmax_unused = \"10%\"\n\n[cloud]\nfull_every = 3\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = blockd(
        &["--config", f, "--print-config", "--gc-grace", "4h"],
        &[("BLOCKD_GC_EVERY", "3h"), ("BLOCKD_GC_GRACE", "5h")],
    );
    assert!(out.status.success(), "{out:?}");
    let p = String::from_utf8(out.stdout).unwrap();
    // A flag beats the environment and the file; the environment beats
    // the file; the file beats the defaults; the rest are defaults.
    assert_eq!(value(&p, "gc", "grace").as_deref(), Some("4h"), "{p}");
    assert_eq!(value(&p, "gc", "every").as_deref(), Some("3h"), "{p}");
    assert_eq!(value(&p, "gc", "max_unused").as_deref(), Some("10%"), "{p}");
    assert_eq!(
        value(&p, "cloud", "full_every").as_deref(),
        Some("3"),
        "{p}"
    );
    assert_eq!(
        value(&p, "", "io_engine").as_deref(),
        Some("threads"),
        "{p}"
    );
    assert_eq!(
        value(&p, "", "state_dir").as_deref(),
        Some("/srv/blockd"),
        "{p}"
    );
    assert_eq!(
        value(&p, "", "api_socket").as_deref(),
        Some("/srv/blockd/api.sock"),
        "socket paths follow the state dir: {p}"
    );
    assert_eq!(
        value(&p, "cloud", "backup_deadline").as_deref(),
        Some("20h"),
        "{p}"
    );
    assert_eq!(value(&p, "log", "format").as_deref(), Some("text"), "{p}");

    // The printed settings are themselves a valid config file.
    let again = tmp.path().join("again.toml");
    std::fs::write(&again, &p).unwrap();
    let out = blockd(
        &["--config", again.to_str().unwrap(), "--print-config"],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), p);

    // Secrets are never printed: the metrics token, from the file or the
    // environment.
    let secret = tmp.path().join("secret.toml");
    std::fs::write(
        &secret,
        "[metrics]\nlisten = \"9750\"\ntoken = \"file-secret-88\"\n",
    )
    .unwrap();
    let s = secret.to_str().unwrap();
    for env in [&[][..], &[("BLOCKD_METRICS_TOKEN", "env-secret-77")][..]] {
        let out = blockd(&["--config", s, "--print-config"], env);
        assert!(out.status.success(), "{out:?}");
        let p = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            value(&p, "metrics", "token").as_deref(),
            Some("<redacted>"),
            "{p}"
        );
        assert_eq!(
            value(&p, "metrics", "listen").as_deref(),
            Some("127.0.0.1:9750"),
            "{p}"
        );
        assert!(!p.contains("secret-"), "{p}");
    }

    // Without --config, /etc/blockd/blockd.toml is optional; a named file
    // must exist.
    let out = blockd(
        &["--config", "/nonexistent/blockd.toml", "--print-config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the config file /nonexistent/blockd.toml"),
        "{err}"
    );
}

#[test]
fn bad_keys_and_values_stop_the_start_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for (text, line, needles) in [
        (
            "io_engine = \"threads\"\n[gc]\ngrase = \"1h\"\n",
            3,
            &[
                "unknown field `grase`",
                "expected one of `grace`, `every`, `max_unused`",
            ][..],
        ),
        (
            "[nbd]\nlisten = \"localhost\"\n",
            2,
            &["invalid socket address"][..],
        ),
        (
            "[gc]\nevery = \"weekly\"\n",
            2,
            &["use e.g. 30s", "or `off`"][..],
        ),
        (
            "io_engine = \"fast\"\n",
            1,
            &["expected one of `auto`, `uring`, `threads`"][..],
        ),
        (
            "[log]\nformat = \"xml\"\n",
            2,
            &["expected `text` or `json`"][..],
        ),
        (
            "[cloud]\nhydrate_limit = \"1GB\"\n",
            2,
            &["write 1G or 1GiB"][..],
        ),
        (
            "snapshot_sync = \"200ms\"\n",
            1,
            &["too short: give at least 1s"][..],
        ),
        (
            "[nbd]\nmax_memory = \"16M\"\n",
            2,
            &["too small", "at least 64M"][..],
        ),
    ] {
        let file = tmp.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let f = file.to_str().unwrap();
        let out = blockd(
            &["--config", f, "--state-dir", state.to_str().unwrap()],
            &[],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(&format!("config file {f}")), "{err}");
        assert!(err.contains(&format!("line {line}")), "{text}: {err}");
        for n in needles {
            assert!(err.contains(n), "{text}: expected {n:?} in {err}");
        }
        assert!(!state.exists(), "a refused start created its state dir");
    }
    // The same rules hold for a flag.
    let out = blockd(
        &[
            "--snapshot-sync",
            "soon",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--snapshot-sync") && err.contains("is not a duration"),
        "{err}"
    );
    assert!(!state.exists(), "a refused start created its state dir");
    // A state dir that is a file is named as such, and left alone.
    let file = tmp.path().join("disk.img");
    std::fs::write(&file, b"data").unwrap();
    let out = blockd(&["--state-dir", file.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is not a directory"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[test]
fn a_running_daemon_follows_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("blockd.toml");
    std::fs::write(
        &file,
        "[log]\nformat = \"json\"\n\n[cloud]\nfull_every = 2\n",
    )
    .unwrap();
    let d = Blockd::start_with(
        None,
        &["--config", file.to_str().unwrap(), "--log-filter", "info"],
    );
    d.create("v", "4M");
    // One line when a connection opens and one when it closes, none per
    // I/O: 200 writes and reads through one qemu-io connection.
    let before = d.log().lines().count();
    if require_tools(&["qemu-io"]) {
        let cmds: Vec<String> = (0..100)
            .flat_map(|i| {
                [
                    format!("write -P 7 {}k 4k", i * 4),
                    format!("read {}k 4k", i * 4),
                ]
            })
            .collect();
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&d.uri("v"), &refs);
        // The server writes its closing line once it has seen the client
        // go, which may be after qemu-io has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !d.log().contains("NBD connection closed") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let log = d.log();
        let new: Vec<serde_json::Value> = log
            .lines()
            .skip(before)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let said = |m: &str| new.iter().filter(|v| v["fields"]["message"] == m).count();
        assert_eq!(said("NBD connection opened"), 1, "{log}");
        assert_eq!(said("NBD connection closed"), 1, "{log}");
        let closed = new
            .iter()
            .find(|v| v["fields"]["message"] == "NBD connection closed")
            .unwrap();
        assert!(
            closed["fields"]["requests"].as_u64().unwrap() >= 200,
            "{closed}"
        );
        assert!(new.len() <= 4, "lines per I/O: {log}");
    }
    // JSON log lines, one object each.
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    // full_every = 2: the second backup of a volume reads it whole again.
    let backup = |d: &Blockd| -> serde_json::Value {
        let t: serde_json::Value =
            serde_json::from_str(&d.ok(&["-j", "cloudsnap", "backup", "v", "--wait"])).unwrap();
        t[0].clone()
    };
    assert_eq!(backup(&d)["full"], true);
    assert_eq!(backup(&d)["full"], false);
    assert_eq!(backup(&d)["full"], true);
}
