//! Who may use blockd, and what it will not touch: the control API lets
//! in root and the API group only (socket mode and peer credentials), a
//! socket path is replaced only when it is stale, and repository files in
//! a local directory are private.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cloud::*;
use common::*;

/// A directory anyone may enter, with a copy of blockctl in it (the
/// build tree may not be reachable for `nobody`).
fn open_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = d.path().join("blockctl");
    std::fs::copy(bin("blockctl"), &ctl).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    (d, ctl)
}

/// `blockctl --socket SOCK ARGS` as `nobody`, with extra groups.
fn as_nobody(ctl: &Path, sock: &Path, groups: Option<&str>, args: &[&str]) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534"]);
    match groups {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    c.arg(ctl).arg("--socket").arg(sock).args(args);
    c.output().unwrap()
}

/// Runs blockd on a fresh state dir with `args`; it must exit non-zero:
/// its output.
fn refused_start(args: &[&str]) -> String {
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("blockd"))
        .arg("--state-dir")
        .arg(state.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("blockd {args:?} started where it must refuse");
    });
    assert!(!status.success(), "blockd {args:?} exited 0");
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_api_lets_in_root_and_the_api_group_only() {
    if !skip_unless(is_root() && have("setpriv"), "needs root and setpriv") {
        return;
    }
    let (dir, ctl) = open_dir();
    let sock = dir.path().join("api.sock");
    let sock_s = sock.display().to_string();
    let d = Blockd::start_with(None, &["--api-socket", &sock_s, "--api-group", "54321"]);
    d.create("v", "1M");
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.mode() & 0o777, 0o660, "api.sock mode");
    assert_eq!(m.gid(), 54321, "api.sock group");

    // nobody: the socket's mode keeps it out, and blockctl says what to do.
    let out = as_nobody(&ctl, &sock, None, &["volume", "list"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("Permission denied") && e.contains("--api-group"),
        "{e}"
    );
    // A member of the group gets in.
    let out = as_nobody(&ctl, &sock, Some("54321"), &["-j", "volume", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"v\""));
    // A socket opened to everyone by mistake: the peer's credentials still
    // keep nobody out, with every verb.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [
        &["volume", "list"][..],
        &["volume", "delete", "v"][..],
        &["cloudsnap", "list"][..],
    ] {
        let out = as_nobody(&ctl, &sock, None, args);
        assert!(!out.status.success(), "{args:?}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            e.contains("user 65534 may not use blockd") && e.contains("group 54321"),
            "{args:?}: {e}"
        );
    }
    d.ok(&["volume", "inspect", "v"]);
    // Through such a socket, callers the API refuses share 16 connections
    // of their own: holding 40 open, nobody keeps 16, and root is served
    // meanwhile.
    if Path::new("/usr/bin/python3").exists() {
        let script = format!(
            r#"
import socket, sys, time
held = []
for _ in range(40):
    s = socket.socket(socket.AF_UNIX)
    s.connect({sock:?})
    held.append(s)
for s in held:
    s.setblocking(False)
# Until those refused are seen closed (a connection not yet accepted
# looks open too), then once more after a pause.
def kept():
    n = 0
    for s in held:
        try:
            if s.recv(1) != b"":
                n += 1
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n
deadline = time.time() + 8
while kept() > 16 and time.time() < deadline:
    time.sleep(0.1)
time.sleep(0.5)
print(kept(), flush=True)
sys.stdin.read()
"#,
            sock = sock.display().to_string()
        );
        let mut holder = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "16", "connections nobody kept");
        d.ok(&["volume", "inspect", "v"]);
        drop(holder.stdin.take());
        holder.wait().unwrap();
    }
}

/// The NBD socket keeps the same company as the API: root and the API
/// group, a socket opened to everyone by mistake included.
#[test]
fn the_nbd_socket_lets_in_root_and_the_api_group_only() {
    if !skip_unless(
        is_root() && have("setpriv") && have("qemu-io"),
        "needs root, setpriv and qemu-io",
    ) {
        return;
    }
    let (dir, _) = open_dir();
    let sock = dir.path().join("nbd.sock");
    let sock_s = sock.display().to_string();
    let d = Blockd::start_with(None, &["--nbd-socket", &sock_s, "--api-group", "54321"]);
    d.create("v", "1M");
    let uri = format!("nbd+unix:///v?socket={sock_s}");
    let write_as = |groups: Option<&str>, byte: u8| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534"]);
        match groups {
            Some(g) => c.arg(format!("--groups={g}")),
            None => c.arg("--clear-groups"),
        };
        c.args(["qemu-io", "-f", "raw", "-c"])
            .arg(format!("write -P {byte} 0 4k"))
            .arg(&uri)
            .output()
            .unwrap()
    };
    let out = write_as(Some("54321"), 0x11);
    assert!(
        out.status.success(),
        "a member of the group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = write_as(None, 0x22);
    assert!(
        !out.status.success(),
        "nobody wrote through an open NBD socket"
    );
    assert!(
        d.log()
            .contains("NBD connection refused: user 65534 may not use blockd"),
        "{}",
        d.log()
    );
    // Nothing of nobody's write landed.
    qemu_io(&d.uri("v"), &["read -P 0x11 0 4k"]);
}

#[test]
fn a_socket_path_is_replaced_only_when_stale() {
    let (dir, _) = open_dir();
    // A regular file is never unlinked.
    let file = dir.path().join("precious");
    std::fs::write(&file, b"keep me").unwrap();
    let f = file.display().to_string();
    for flag in ["--api-socket", "--nbd-socket"] {
        let out = refused_start(&[flag, &f]);
        assert!(out.contains("exists and is not a socket"), "{flag}: {out}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
    // A live daemon's sockets are not taken over by a second daemon with
    // another state dir, nor removed when that one exits.
    let mut a = Blockd::start();
    a.create("v", "1M");
    for (flag, path) in [
        ("--api-socket", a.api_socket()),
        ("--nbd-socket", a.nbd_socket()),
    ] {
        let p = path.display().to_string();
        let out = refused_start(&[flag, &p]);
        assert!(out.contains("another blockd serves"), "{flag}: {out}");
        assert!(path.exists(), "{flag} removed by the refused daemon");
    }
    a.ok(&["volume", "inspect", "v"]);
    run(Command::new("nbdinfo").arg("--size").arg(a.uri("v")));
    // A socket something else answers on is not taken either.
    let other = dir.path().join("other.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
    let out = refused_start(&["--api-socket", &other.display().to_string()]);
    assert!(out.contains("another program answers"), "{out}");
    // A stale socket (its daemon killed) is replaced.
    a.kill9();
    assert!(a.api_socket().exists());
    let started = Instant::now();
    a.spawn();
    assert!(started.elapsed() < Duration::from_secs(20));
    a.ok(&["volume", "inspect", "v"]);
}

#[test]
fn local_repository_files_are_private() {
    if !skip_unless(is_root() && have("setpriv"), "needs root and setpriv") {
        return;
    }
    let d = Blockd::start();
    let (dir, _) = open_dir();
    let repo = dir.path().join("repo");
    d.ok(&[
        "credentials",
        "create",
        "dir",
        "--provider",
        "local",
        "--path",
        &repo.display().to_string(),
    ]);
    d.create("v", "4M");
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "v.img", 4 * MB, 4 * MB, 5);
    load(&d, "v", &img);
    backup(&d, &["v", "--cred-id", "dir"]);
    let files = files_under(&repo);
    assert!(files
        .iter()
        .any(|p| p.to_string_lossy().contains("/packs/")));
    let mut dirs = vec![repo.clone()];
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", f.display());
        let mut p = f.parent();
        while let Some(q) = p.filter(|q| q.starts_with(&repo)) {
            dirs.push(q.to_path_buf());
            p = q.parent();
        }
    }
    for d in dirs {
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", d.display());
    }
    // And nobody can read one.
    let pack = files
        .iter()
        .find(|p| p.to_string_lossy().contains("/packs/"))
        .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(pack)
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody read {}", pack.display());
    // The state dir too: volume data.
    for f in files_under(d.dir.path()) {
        if f.extension().is_some_and(|e| e == "sock" || e == "log") {
            continue;
        }
        let mode = std::fs::metadata(&f).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", f.display());
    }
}
