//! The unit files in systemd/: `systemd-analyze verify` accepts each (with
//! ExecStart= pointing at the binaries just built), the daemon's unit
//! keeps the hardening and the capabilities it documents, and the
//! commands the units run are ones blockd and blockctl accept.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// The units, with the install paths rewritten to the built binaries.
fn installed_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(units_dir()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/blockd", bin("blockd").to_str().unwrap())
            .replace("/usr/local/bin/blockctl", bin("blockctl").to_str().unwrap());
        std::fs::write(dir.path().join(path.file_name().unwrap()), text).unwrap();
    }
    dir
}

/// `KEY=VALUE` lines of a unit, in order.
fn settings(unit: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(units_dir().join(unit)).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn value(unit: &str, key: &str) -> String {
    settings(unit)
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{unit} has no {key}="))
        .1
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    if !require_tools(&["systemd-analyze"]) {
        return;
    }
    let dir = installed_copy();
    // A template is verified through an instance of it.
    for unit in [
        "blockd.service",
        "blockd-mount@local.service",
        "blockd-attach@app.service",
    ] {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join(unit))
            .output()
            .expect("run systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            out.status
        );
    }
    // Every unit in the directory was covered.
    let mut names: Vec<String> = std::fs::read_dir(units_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "blockd-attach@.service",
            "blockd-mount@.service",
            "blockd.service"
        ]
    );
}

#[test]
fn the_daemon_unit_is_notify_hardened_and_holds_only_the_capabilities_it_uses() {
    let unit = "blockd.service";
    assert_eq!(value(unit, "Type"), "notify");
    assert_eq!(value(unit, "Restart"), "on-failure");
    for (key, want) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        // PrivateTmp= would order blockd after local-fs.target.
        ("TemporaryFileSystem", "/tmp:mode=1777 /var/tmp:mode=1777"),
        ("NoNewPrivileges", "yes"),
        ("LimitMEMLOCK", "infinity"),
        ("OOMScoreAdjust", "-1000"),
        ("StateDirectory", "blockd"),
    ] {
        assert_eq!(value(unit, key), want, "{key}");
    }
    let mut caps: Vec<String> = value(unit, "CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    caps.sort();
    assert_eq!(
        caps,
        [
            "CAP_CHOWN",
            "CAP_IPC_LOCK",
            "CAP_SYS_ADMIN",
            "CAP_SYS_CHROOT",
            "CAP_SYS_RESOURCE"
        ]
    );
    // The watchdog blockd pings must be one it can meet.
    let watchdog: u64 = value(unit, "WatchdogSec").parse().unwrap();
    assert!(watchdog >= 10);
}

/// The attach unit runs before local-fs-pre.target, so the daemon must
/// too, without the default dependencies that would order it after.
#[test]
fn attach_at_boot_is_ordered_before_local_file_systems() {
    for unit in ["blockd.service", "blockd-attach@.service"] {
        assert_eq!(value(unit, "DefaultDependencies"), "no", "{unit}");
        assert!(
            value(unit, "Before").contains("local-fs-pre.target"),
            "{unit}"
        );
    }
    assert!(value("blockd-attach@.service", "After").contains("blockd.service"));
    assert_eq!(
        value("blockd-attach@.service", "Requires"),
        "blockd.service"
    );
}

#[test]
fn the_commands_the_units_run_are_accepted() {
    // blockd's command line: it parses (--help after the unit's arguments
    // stops before anything starts).
    let exec = value("blockd.service", "ExecStart");
    let mut args = exec.split_whitespace().skip(1).collect::<Vec<_>>();
    args.push("--help");
    let out = Command::new(bin("blockd")).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "blockd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // blockctl's: the arguments parse, and the only complaint is that no
    // daemon answers at the socket given.
    let mnt = tempfile::tempdir().unwrap();
    for (unit, key) in [
        ("blockd-mount@.service", "ExecStart"),
        ("blockd-mount@.service", "ExecStop"),
        ("blockd-attach@.service", "ExecStart"),
        ("blockd-attach@.service", "ExecStop"),
    ] {
        let line = value(unit, key)
            .replace("/mnt/blockd/%i", mnt.path().to_str().unwrap())
            .replace("%i", "local");
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let out = Command::new(bin("blockctl"))
            .args(["--socket", "/nonexistent/api.sock"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("cannot reach blockd"),
            "blockctl {args:?}: {stderr}"
        );
    }
}
