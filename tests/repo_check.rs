//! `blockctl repo check`: a clean repository passes; a flipped byte, a
//! missing pack, a missing index block and a truncated manifest are each
//! found, named, and traced to exactly the snapshots that need them.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::cloud::*;
use common::*;
use serde_json::Value;

/// Files under `objects/<kind>` that appeared between two listings.
fn new_files(before: &[PathBuf], after: &[PathBuf]) -> Vec<PathBuf> {
    after
        .iter()
        .filter(|p| !before.contains(p))
        .cloned()
        .collect()
}

struct Repo {
    objects: PathBuf,
}

impl Repo {
    fn packs(&self) -> Vec<PathBuf> {
        files_under(&self.objects.join("packs"))
    }
    fn index(&self) -> Vec<PathBuf> {
        files_under(&self.objects.join("index"))
    }
    fn key(&self, p: &Path) -> String {
        p.strip_prefix(&self.objects).unwrap().display().to_string()
    }
}

/// `repo check` with `args`: (exit success, report, stderr).
fn check(d: &Blockd, args: &[&str]) -> (bool, Value, String) {
    let mut a = vec!["-j", "repo", "check"];
    a.extend_from_slice(args);
    let out = d.blockctl(&a);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let report = json(&stdout);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn damaged(report: &Value) -> BTreeSet<String> {
    report["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["snapshot"].as_str().unwrap().to_string())
        .collect()
}

fn problem_objects(report: &Value) -> Vec<String> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["object"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn repo_check_finds_and_names_damage() {
    if !need() {
        return;
    }
    let d = Blockd::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo {
        objects: d.dir.path().join("objects"),
    };

    // Volume a: a full backup, then an incremental; volume b: a full.
    d.create("a", "16M");
    let img_a = image(tmp.path(), "a.img", 16 * MB, 12 * MB, 1);
    load(&d, "a", &img_a);
    let (p0, i0) = (repo.packs(), repo.index());
    let a1 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    let (p1, i1) = (repo.packs(), repo.index());
    let a1_packs = new_files(&p0, &p1);
    scatter(&d, "a", &img_a, 16, 3);
    let a2 = backup(&d, &["a"])["snapshot"].as_str().unwrap().to_string();
    let (p2, i2) = (repo.packs(), repo.index());
    let a2_index = new_files(&i1, &i2);
    d.create("b", "8M");
    let img_b = image(tmp.path(), "b.img", 8 * MB, 8 * MB, 2);
    load(&d, "b", &img_b);
    let b1 = backup(&d, &["b"])["snapshot"].as_str().unwrap().to_string();
    let b_packs = new_files(&p2, &repo.packs());
    assert!(!a1_packs.is_empty() && !a2_index.is_empty() && !b_packs.is_empty());
    assert!(!i0.iter().any(|p| a2_index.contains(p)));

    // Clean: exit 0, everything counted, nothing damaged.
    let (ok, r, err) = check(&d, &[]);
    assert!(ok, "{err} {r}");
    assert_eq!(r["snapshots"], 3, "{r}");
    assert_eq!(
        r["packs"].as_u64().unwrap(),
        repo.packs().len() as u64,
        "{r}"
    );
    assert!(r["records"].as_u64().unwrap() > 100, "{r}");
    assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
    assert!(r["data"].is_null(), "{r}");
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(ok, "{err}");
    let all = r["data"]["packs"].as_u64().unwrap();
    assert_eq!(all, repo.packs().len() as u64, "{r}");
    assert_eq!(r["data"]["records"], r["records"], "{r}");
    // Slices 1/3..3/3 read every pack exactly once between them.
    let mut sum = 0;
    for n in 1..=3 {
        let (ok, r, err) = check(&d, &["--read-data", "--subset", &format!("{n}/3")]);
        assert!(ok, "{err}");
        sum += r["data"]["packs"].as_u64().unwrap();
    }
    assert_eq!(sum, all);
    let text = d.ok(&["repo", "check"]);
    assert!(text.contains("no errors were found"), "{text}");

    // A flipped byte inside a record of a's full backup: the structural
    // check cannot see it, --read-data does, and names a's snapshots only.
    let pack = &a1_packs[0];
    let original = std::fs::read(pack).unwrap();
    let mut bad = original.clone();
    bad[1000] ^= 0x01;
    std::fs::write(pack, &bad).unwrap();
    let (ok, _, _) = check(&d, &[]);
    assert!(
        ok,
        "a flipped record byte is only visible when reading data"
    );
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(!ok, "{r}");
    assert!(err.contains("damaged object"), "{err}");
    assert_eq!(problem_objects(&r), vec![repo.key(pack)], "{r}");
    let dmg = damaged(&r);
    assert!(dmg.contains(&a1), "{r}");
    assert!(!dmg.contains(&b1), "{r}");
    let text =
        String::from_utf8_lossy(&d.blockctl(&["repo", "check", "--read-data"]).stdout).to_string();
    assert!(
        text.contains(&repo.key(pack)) && text.contains(&a1),
        "{text}"
    );
    std::fs::write(pack, &original).unwrap();

    // A missing pack of b: found without reading data; only b is damaged.
    let bp = &b_packs[0];
    let keep = std::fs::read(bp).unwrap();
    std::fs::remove_file(bp).unwrap();
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok);
    assert_eq!(problem_objects(&r), vec![repo.key(bp)], "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([b1.clone()]), "{r}");
    assert!(r["problems"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("missing"));
    std::fs::write(bp, &keep).unwrap();

    // A missing index block of a's incremental: a2 is damaged, a1 is not.
    let ix = &a2_index[0];
    let keep = std::fs::read(ix).unwrap();
    std::fs::remove_file(ix).unwrap();
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok);
    assert_eq!(problem_objects(&r), vec![repo.key(ix)], "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([a2.clone()]), "{r}");
    std::fs::write(ix, &keep).unwrap();

    // A truncated manifest of b.
    let manifest = repo.objects.join("snapshots").join(&b1);
    let keep = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &keep[..keep.len() / 2]).unwrap();
    let (ok, r, _) = check(&d, &[]);
    assert!(!ok);
    assert_eq!(problem_objects(&r), vec![format!("snapshots/{b1}")], "{r}");
    assert_eq!(damaged(&r), BTreeSet::from([b1.clone()]), "{r}");
    std::fs::write(&manifest, &keep).unwrap();

    // Repaired: clean again, reading everything.
    let (ok, r, err) = check(&d, &["--read-data"]);
    assert!(ok, "{err} {r}");

    // A deleted snapshot leaves unreferenced objects, reported as such
    // (garbage, not damage).
    d.ok(&["cloudsnap", "delete", "--snap", &b1]);
    let (ok, r, _) = check(&d, &[]);
    assert!(ok, "{r}");
    assert!(r["unreferenced_packs"].as_u64().unwrap() >= 1, "{r}");

    // Bad arguments.
    let out = d.blockctl(&["repo", "check", "--subset", "1/2"]);
    assert!(!out.status.success());
    let out = d.blockctl(&["repo", "check", "--read-data", "--subset", "3/2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("n/m"));
    let out = d.blockctl(&["repo", "check", "--cred-id", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no location (credentials) named"));
}
