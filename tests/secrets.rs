//! Secrets never leak: after a full cycle (credentials, backup, restore,
//! lazy restore, catalog mount, failures) with a known S3 secret key and
//! encryption passphrase, neither appears in any log line, any blockctl
//! output (JSON or not, errors included), or any file of the state dir
//! but the credentials files; and a credentials file others may read is
//! refused with a message.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::cloud::*;
use common::objstores::Garage;
use common::*;

const PASSPHRASE: &str = "pass-7d41c9-correct-horse-battery";

/// Runs blockctl and keeps everything it printed.
fn run_kept(d: &Blockd, said: &mut Vec<String>, args: &[&str]) -> bool {
    let out = d.blockctl(args);
    // Labelled by the verb only: the arguments hold the secrets.
    said.push(format!(
        "blockctl {}:\n{}{}",
        args.iter().take(3).copied().collect::<Vec<_>>().join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ));
    out.status.success()
}

fn leaks(haystack: &[u8], secrets: &[&str]) -> Option<String> {
    secrets
        .iter()
        .find(|s| haystack.windows(s.len()).any(|w| w == s.as_bytes()))
        .map(|s| (*s).to_string())
}

#[test]
fn no_secret_in_logs_outputs_or_state() {
    if !need()
        || !skip_unless(
            is_root() && Path::new("/dev/fuse").exists(),
            "needs root and FUSE",
        )
    {
        return;
    }
    let Some(g) = Garage::start() else { return };
    let mut d = Blockd::start();
    let mut said = Vec::new();
    let tmp = tempfile::tempdir().unwrap();
    let secret = g.secret.clone();

    let mut args = g.credentials_args("s3", &secret, Some("sec"));
    args.extend(["--encryption-passphrase".into(), PASSPHRASE.into()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(run_kept(&d, &mut said, &a));
    // Failures that handle the secrets: a wrong passphrase on the same
    // repository, a wrong S3 key.
    let mut wrong = g.credentials_args("s3b", &secret, Some("sec"));
    wrong.extend([
        "--encryption-passphrase".into(),
        format!("{PASSPHRASE}-not"),
    ]);
    let a: Vec<&str> = wrong.iter().map(String::as_str).collect();
    assert!(!run_kept(&d, &mut said, &a));
    let bad = g.credentials_args("s3c", &format!("{secret}x"), Some("sec"));
    let a: Vec<&str> = bad.iter().map(String::as_str).collect();
    assert!(!run_kept(&d, &mut said, &a));
    for args in [
        &["credentials", "list"][..],
        &["-j", "credentials", "list"][..],
        &["credentials", "validate", "s3"][..],
        &["-j", "credentials", "validate", "s3"][..],
    ] {
        assert!(run_kept(&d, &mut said, args), "{args:?}");
    }

    d.create("v", "16M");
    let img = image(tmp.path(), "v.img", 16 * MB, 16 * MB, 9);
    load(&d, "v", &img);
    let t = backup(&d, &["v", "--cred-id", "s3"]);
    let snap = t["snapshot"].as_str().unwrap().to_string();
    for args in [
        &["-j", "cloudsnap", "list", "--cred-id", "s3"][..],
        &["cloudsnap", "list", "--cred-id", "s3"][..],
        &["-j", "cloudsnap", "status"][..],
        &["cloudsnap", "status"][..],
        &["-j", "repo", "check", "--cred-id", "s3", "--read-data"][..],
        &["-j", "repo", "gc", "--cred-id", "s3", "--dry-run"][..],
    ] {
        assert!(run_kept(&d, &mut said, args), "{args:?}");
    }
    let r = restore(&d, &snap, "full", &["--cred-id", "s3"]);
    assert_eq!(r["state"], "Done", "{r}");
    assert_same(&d, &img, "full");
    let id = lazy_restore_with(&d, &snap, "lazy", &["--cred-id", "s3"]);
    wait_done(&d, &id);
    assert_same(&d, &img, "lazy");
    // The catalog: mount, read the disk image, unmount.
    let dir = tmp.path().join("cat");
    std::fs::create_dir_all(&dir).unwrap();
    let dir_s = dir.display().to_string();
    assert!(run_kept(
        &d,
        &mut said,
        &["mount", &dir_s, "--cred-id", "s3"]
    ));
    let (vol, name) = snap.split_once('/').unwrap();
    let disk = dir.join(vol).join(name).join("disk.img");
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&img).unwrap());
    assert!(run_kept(&d, &mut said, &["umount", &dir_s]));
    assert!(d.terminate().success());

    let secrets = [secret.as_str(), PASSPHRASE];
    for s in &said {
        assert_eq!(leaks(s.as_bytes(), &secrets), None, "{s}");
    }
    let log = std::fs::read(d.log_path()).unwrap();
    if let Some(s) = leaks(&log, &secrets) {
        panic!("the daemon's log holds {s}");
    }
    let creds = d.dir.path().join("credentials");
    let mut files = 0;
    for f in files_under(d.dir.path()) {
        if f.starts_with(&creds) || f == d.log_path() {
            continue;
        }
        files += 1;
        let bytes = std::fs::read(&f).unwrap_or_default();
        if let Some(s) = leaks(&bytes, &secrets) {
            panic!("{} holds {s}", f.display());
        }
    }
    assert!(files > 3, "only {files} files looked at");
    // The credentials file does hold them (so the grep above can find
    // them), 0600.
    let cred = creds.join("s3.json");
    assert!(leaks(&std::fs::read(&cred).unwrap(), &[PASSPHRASE]).is_some());
    let mode = std::fs::metadata(&cred).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Loosened by hand: refused, saying what to do.
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.spawn();
    let out = d.blockctl(&["cloudsnap", "list", "--cred-id", "s3"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
    assert_eq!(leaks(e.as_bytes(), &secrets), None);
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.ok(&["cloudsnap", "list", "--cred-id", "s3"]);
}
