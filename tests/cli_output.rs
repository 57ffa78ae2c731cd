//! What blockctl prints for the main verbs, pinned with insta snapshots
//! (tests/snapshots/): tables, `Key: value` views, JSON and error text.
//! Volatile values (times, generated names, task ids, durations, paths)
//! are replaced by placeholders, and runs of blanks are shortened, since
//! column widths follow the values replaced. A change of wording, field
//! names or layout shows as a snapshot diff (`cargo insta review`).

mod common;

use common::*;

fn redact(d: &Blockd, text: &str) -> String {
    let state = d.dir.path().display().to_string();
    let mut s = text.replace(&state, "[STATE]");
    // The host id is made at the first start: the machine's name and a
    // random tag.
    if let Ok(host) = std::fs::read_to_string(d.dir.path().join("host-id")) {
        s = s.replace(host.trim(), "[HOST]");
    }
    for (re, to) in [
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "[TIME]"),
        (r"\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{8}", "[SNAP]"),
        (r"\b[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{8}\b", "[TASK]"),
        (r"\b\d+(\.\d+)? (ms|s)\b", "[DUR]"),
        (
            r#""(pause_us|elapsed_secs|eta_secs|started|finished)": [0-9.]+"#,
            "\"$1\": [N]",
        ),
        (
            r#""(bytes_uploaded|bytes_transferred)": \d+"#,
            "\"$1\": [N]",
        ),
        (
            r"\b\d+(\.\d+)? (B|KiB|MiB) +(uploaded|transferred)",
            "[SIZE] $3",
        ),
    ] {
        s = regex::Regex::new(re)
            .unwrap()
            .replace_all(&s, to)
            .into_owned();
    }
    if !s.starts_with(['{', '[']) {
        s = regex::Regex::new(r"  +")
            .unwrap()
            .replace_all(&s, "  ")
            .into_owned();
    }
    // What was uploaded or fetched includes the manifest, which names the
    // host: its size differs from machine to machine.
    for (re, to) in [
        (r"(-Done  \S+ \S+ \S+  )[0-9.]+ (B|KiB|MiB)", "${1}[SIZE]"),
        (r"(Uploaded: +)[0-9.]+ (B|KiB|MiB)", "${1}[SIZE]"),
        (r"[0-9.]+ (B|KiB|MiB) fetched", "[SIZE] fetched"),
    ] {
        s = regex::Regex::new(re)
            .unwrap()
            .replace_all(&s, to)
            .into_owned();
    }
    s
}

#[test]
fn main_verbs_print_what_operators_read() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let d = Blockd::start();
    let out = |args: &[&str]| redact(&d, &d.ok(args));
    let err = |args: &[&str]| redact(&d, &d.fails(args, ""));

    insta::assert_snapshot!(
        "volume_create",
        out(&[
            "volume",
            "create",
            "db1",
            "--size",
            "1G",
            "--label",
            "tier=gold"
        ])
    );
    d.create("logs", "64M");
    qemu_io(&d.uri("db1"), &["write -P 1 0 1M"]);
    insta::assert_snapshot!("volume_list", out(&["volume", "list"]));
    insta::assert_snapshot!("volume_inspect", out(&["volume", "inspect", "db1"]));
    insta::assert_snapshot!(
        "volume_inspect_json",
        out(&["-j", "volume", "inspect", "db1"])
    );

    insta::assert_snapshot!(
        "snapshot_create",
        out(&["snapshot", "create", "db1", "logs", "--name", "nightly"])
    );
    insta::assert_snapshot!("snapshot_list", out(&["snapshot", "list"]));
    insta::assert_snapshot!(
        "snapshot_inspect_json",
        out(&["-j", "snapshot", "inspect", "db1@nightly"])
    );
    d.ok(&["snapshot", "delete", "db1@nightly"]);
    d.ok(&["snapshot", "delete", "logs@nightly"]);

    insta::assert_snapshot!(
        "cloudsnap_backup",
        out(&["cloudsnap", "backup", "db1", "--wait"])
    );
    insta::assert_snapshot!("cloudsnap_list", out(&["cloudsnap", "list"]));
    insta::assert_snapshot!(
        "cloudsnap_catalog",
        out(&["cloudsnap", "catalog", "db1", "--verify"])
    );
    insta::assert_snapshot!(
        "cloudsnap_restore",
        out(&[
            "cloudsnap",
            "restore",
            "--snap",
            "db1",
            "--volume",
            "db1-copy",
            "--wait"
        ])
    );
    // Rows sorted: tasks that started in the same second come in either order.
    let status = out(&["cloudsnap", "status"]);
    let (header, rows) = status.split_once('\n').unwrap();
    let mut rows: Vec<&str> = rows.lines().collect();
    rows.sort_unstable();
    insta::assert_snapshot!("cloudsnap_status", format!("{header}\n{}", rows.join("\n")));
    insta::assert_snapshot!("credentials_list", out(&["credentials", "list"]));
    insta::assert_snapshot!("credentials_list_json", out(&["-j", "credentials", "list"]));

    insta::assert_snapshot!("error_unknown_volume", err(&["volume", "inspect", "ghost"]));
    insta::assert_snapshot!(
        "error_unknown_volume_json",
        err(&["-j", "volume", "inspect", "ghost"])
    );
    insta::assert_snapshot!(
        "error_bad_size",
        err(&["volume", "create", "v", "--size", "1GB"])
    );
    d.ok(&["snapshot", "create", "db1", "--name", "hold"]);
    insta::assert_snapshot!(
        "error_volume_with_snapshots",
        err(&["volume", "delete", "db1"])
    );
    d.ok(&["snapshot", "delete", "db1@hold"]);
    insta::assert_snapshot!(
        "error_ambiguous_label",
        err(&["volume", "create", "v", "--size", "1G", "--label", "a=1", "--label", "a=2"])
    );
}
