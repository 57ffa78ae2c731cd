//! The README's quick start, run exactly as written: every fenced shell
//! block marked `<!-- readme-test -->` runs under `bash -euo pipefail`
//! against a daemon with a temporary state directory (the only change to
//! the text is that directory in place of /var/lib/blockd), so the README
//! cannot drift from the product.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The marked blocks of `text`.
fn marked_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if l.trim() != "<!-- readme-test -->" {
            continue;
        }
        let fence = lines.next().unwrap_or_default();
        assert_eq!(fence, "```sh", "a marked block must open with ```sh");
        let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        blocks.push(block.join("\n"));
    }
    blocks
}

#[test]
fn the_quick_start_runs_as_written() {
    if !require_tools(&["qemu-io", "fusermount3", "cmp"])
        || !skip_unless(is_root(), "the quick start mounts the catalog (root)")
        || !skip_unless(Path::new("/dev/fuse").exists(), "no /dev/fuse")
    {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = marked_blocks(&readme);
    assert!(
        !blocks.is_empty(),
        "no block of README.md is marked <!-- readme-test -->"
    );
    let d = Blockd::start();
    let state = d.dir.path().display().to_string();
    for block in blocks {
        let script = format!(
            "set -euo pipefail\n{}\n",
            block.replace("/var/lib/blockd", &state)
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(root)
            .env("BLOCKD_STATE_DIR", &state)
            .env_remove("BLOCKD_SOCKET")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "README block failed ({}):\n{block}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- blockd\n{}",
            out.status,
            d.log()
        );
        assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    }
    // What the quick start says happened, happened.
    let snaps: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "cloudsnap", "list", "--src", "app"])).unwrap();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 3, "full, incremental, group: {snaps:?}");
    assert_eq!(snaps[0]["bytes_read"], 64 << 20, "{:?}", snaps[0]);
    assert_eq!(
        snaps[1]["bytes_read"], 4096,
        "the incremental reads 4 KiB: {:?}",
        snaps[1]
    );
    assert!(snaps[2]["group"].is_string(), "{:?}", snaps[2]);
    let sched: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "cloudsnap", "schedules", "list"])).unwrap();
    assert_eq!(sched.as_array().unwrap().len(), 1, "{sched}");
}
