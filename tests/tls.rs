//! TLS for NBD over TCP, driven by the peers that speak it: libnbd's
//! `nbdinfo` (`nbds://` with `tls-certificates=`), qemu's `qemu-io` and
//! `qemu-img` with `--object tls-creds-x509`, and a raw client for the exact
//! reply codes. Certificates are generated per test.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::certs::Ca;
use common::*;

fn write(path: &Path, text: &str, mode: u32) {
    // Write then rename: a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The server's directory: server-cert.pem, server-key.pem and, when
/// given, ca-cert.pem (the CA of the client certificates).
fn server_dir(dir: &Path, signer: &Ca, client_ca: Option<&Ca>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = signer.issue("blockd server", true);
    write(&dir.join("server-cert.pem"), &cert, 0o644);
    write(&dir.join("server-key.pem"), &key, 0o600);
    if let Some(ca) = client_ca {
        write(&dir.join("ca-cert.pem"), &ca.pem, 0o644);
    }
    dir.to_path_buf()
}

/// A client's directory, the layout libnbd and qemu share: ca-cert.pem
/// (whom it trusts) and, when given, client-cert.pem and client-key.pem.
fn client_dir(dir: &Path, trusts: &Ca, identity: Option<(&Ca, &str)>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write(&dir.join("ca-cert.pem"), &trusts.pem, 0o644);
    if let Some((signer, name)) = identity {
        let (cert, key) = signer.issue(name, false);
        write(&dir.join("client-cert.pem"), &cert, 0o644);
        write(&dir.join("client-key.pem"), &key, 0o600);
    }
    dir.to_path_buf()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nbdinfo(uri: &str) -> Output {
    Command::new("nbdinfo")
        .args(["--json", uri])
        .output()
        .expect("run nbdinfo")
}

fn tls_uri(port: u16, export: &str, certs: &Path) -> String {
    format!(
        "nbds://localhost:{port}/{export}?tls-certificates={}",
        certs.display()
    )
}

/// qemu-io over TLS with the credentials in `certs`.
fn qemu_io_tls(port: u16, export: &str, certs: &Path, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ))
        .arg("--image-opts");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={port},\
         export={export},tls-creds=tls0"
    ));
    c.output().expect("run qemu-io")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_refused(o: &Output, what: &str) {
    let out = text(o);
    let io_failed = out.contains("failed") || out.contains("error") || out.contains("Error");
    assert!(
        !o.status.success() || io_failed,
        "{what}: expected a refusal, got success:\n{out}"
    );
}

fn daemon_info(d: &Blockd) -> serde_json::Value {
    let body = run(Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(d.api_socket())
        .arg("http://blockd/v1/info"));
    serde_json::from_str(&body).expect("info json")
}

/// A plain-text client that sends one option with no data (after the
/// greeting and the client flags: fixed newstyle, no zeroes) and reads the
/// first reply: the stream, the reply type and its message.
fn plain_option(port: u16, option: u32) -> (TcpStream, u32, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&option.to_be_bytes()).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let mut head = [0u8; 20];
    s.read_exact(&mut head).unwrap();
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).unwrap();
    (s, kind, String::from_utf8_lossy(&msg).into_owned())
}

/// The reply to NBD_OPT_LIST from a plain-text client: (type, message).
fn plain_list_reply(port: u16) -> (u32, String) {
    let (_, kind, msg) = plain_option(port, 3);
    (kind, msg)
}

const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

/// STARTTLS, then bytes that are not a TLS handshake: the server must end
/// only this connection.
fn starttls_then_garbage(port: u16) {
    let (mut s, kind, _) = plain_option(port, 5);
    assert_eq!(kind, 1, "STARTTLS not acknowledged");
    s.write_all(b"IHAVEOPT this is no ClientHello\r\n\r\n")
        .unwrap();
    // The server answers with a TLS alert or nothing, then closes.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

#[test]
fn tls_with_client_certificates_admits_only_the_right_clients() {
    if !require_tools(&["nbdinfo", "qemu-io", "qemu-img", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("blockd test CA");
    let other = Ca::new("some other CA");
    let srv = server_dir(&tmp.path().join("server"), &ca, Some(&ca));
    let good = client_dir(&tmp.path().join("good"), &ca, Some((&ca, "host-a")));
    let foreign_cert = client_dir(&tmp.path().join("foreign"), &ca, Some((&other, "intruder")));
    let no_cert = client_dir(&tmp.path().join("nocert"), &ca, None);
    let wrong_ca = client_dir(&tmp.path().join("wrongca"), &other, Some((&ca, "host-b")));

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Blockd::start_with(
        None,
        &[
            "--nbd-listen",
            &addr,
            "--nbd-tls-certificates",
            srv.to_str().unwrap(),
            "--nbd-tls-verify-peer",
        ],
    );
    d.create("vol1", "64M");
    // Client certificates make TLS required even on loopback.
    assert_eq!(
        daemon_info(&d)["nbd_tls"],
        "required+client-certificates",
        "{}",
        daemon_info(&d)
    );

    // qemu writes over TLS; qemu-img and nbdinfo see the export.
    let o = qemu_io_tls(
        port,
        "vol1",
        &good,
        &["write -P 0xa5 0 1M", "read -P 0xa5 0 1M"],
    );
    assert!(
        o.status.success() && !text(&o).contains("fail"),
        "qemu-io over TLS: {}",
        text(&o)
    );
    let info = run(Command::new("qemu-img")
        .arg("info")
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            good.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=localhost,server.port={port},\
             export=vol1,tls-creds=tls0"
        )));
    assert!(info.contains("67108864"), "{info}");
    let o = nbdinfo(&tls_uri(port, "vol1", &good));
    assert!(o.status.success(), "nbdinfo over TLS: {}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["exports"][0]["export-size"], 64 << 20, "{j}");
    // What qemu wrote over TLS is on the volume (read over the Unix socket).
    qemu_io(&d.uri("vol1"), &["read -P 0xa5 0 1M"]);

    // Plain text is refused: libnbd is told TLS is required, and the reply
    // code is exactly NBD_REP_ERR_TLS_REQD.
    let o = nbdinfo(&format!("nbd://localhost:{port}/vol1"));
    assert!(!o.status.success(), "plain nbdinfo admitted: {}", text(&o));
    let (kind, msg) = plain_list_reply(port);
    assert_eq!(kind, REP_ERR_TLS_REQD, "{msg}");
    assert!(msg.contains("requires TLS"), "{msg}");
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(format!("nbd://localhost:{port}/vol1"))
        .output()
        .unwrap();
    assert_refused(&o, "plain qemu-io");

    // A client certificate from another CA, or none, is refused by the
    // server; a client that trusts another CA refuses the server.
    for (dir, what) in [
        (&foreign_cert, "client certificate of another CA"),
        (&no_cert, "no client certificate"),
        (&wrong_ca, "client trusting another CA"),
    ] {
        let o = nbdinfo(&tls_uri(port, "vol1", dir));
        assert!(!o.status.success(), "{what} admitted: {}", text(&o));
        let o = qemu_io_tls(port, "vol1", dir, &["read 0 4k"]);
        assert_refused(&o, what);
    }
    assert!(
        d.log().contains("TLS handshake failed"),
        "refused handshakes are logged:\n{}",
        d.log()
    );

    // Refusals cost nothing else: the right client still gets in, the
    // data is intact, and the Unix socket serves as before.
    let o = qemu_io_tls(port, "vol1", &good, &["read -P 0xa5 0 1M"]);
    assert!(
        o.status.success() && !text(&o).contains("fail"),
        "{}",
        text(&o)
    );
    qemu_io(&d.uri("vol1"), &["read -P 0xa5 0 1M"]);
}

#[test]
fn renewed_certificates_are_used_without_a_restart() {
    if !require_tools(&["nbdinfo", "curl"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let srv = server_dir(&tmp.path().join("server"), &old_ca, None);
    let trusts_old = client_dir(&tmp.path().join("old"), &old_ca, None);
    let trusts_new = client_dir(&tmp.path().join("new"), &new_ca, None);

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Blockd::start_with(
        None,
        &[
            "--nbd-listen",
            &addr,
            "--nbd-tls",
            "require",
            "--nbd-tls-certificates",
            srv.to_str().unwrap(),
        ],
    );
    d.create("vol1", "8M");
    assert_eq!(daemon_info(&d)["nbd_tls"], "required");
    assert!(nbdinfo(&tls_uri(port, "vol1", &trusts_old))
        .status
        .success());
    assert!(!nbdinfo(&tls_uri(port, "vol1", &trusts_new))
        .status
        .success());
    // Without client certificates required, a client without one is fine.
    assert_eq!(plain_list_reply(port).0, REP_ERR_TLS_REQD);
    // A broken handshake ends its own connection only.
    starttls_then_garbage(port);
    assert!(nbdinfo(&tls_uri(port, "vol1", &trusts_old))
        .status
        .success());

    // Renewal: a certificate from the new CA replaces the old one.
    server_dir(&srv, &new_ca, None);
    let o = nbdinfo(&tls_uri(port, "vol1", &trusts_new));
    assert!(
        o.status.success(),
        "renewed certificate not used: {}",
        text(&o)
    );
    assert!(!nbdinfo(&tls_uri(port, "vol1", &trusts_old))
        .status
        .success());
    assert!(
        d.log().contains("NBD TLS certificates reloaded"),
        "{}",
        d.log()
    );

    // A broken renewal is reported and the working certificate stays.
    write(&srv.join("server-cert.pem"), "not a certificate\n", 0o644);
    let o = nbdinfo(&tls_uri(port, "vol1", &trusts_new));
    assert!(o.status.success(), "broken renewal broke TLS: {}", text(&o));
    assert!(d.log().contains("do not load"), "{}", d.log());
}

#[test]
fn unsafe_tls_settings_stop_the_start_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("blockd test CA");
    let srv = server_dir(&tmp.path().join("server"), &ca, None);
    let start = |args: &[&str]| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("state");
        let o = Command::new(bin("blockd"))
            .arg("--state-dir")
            .arg(&dir)
            .args(["--no-mlock"])
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "blockd {args:?} started");
        // Refused before anything is created.
        assert!(!dir.exists(), "blockd {args:?} made its state dir");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    // A non-loopback address without certificates: refused before anything
    // binds (TEST-NET-1, never contacted).
    let err = start(&["--nbd-listen", "192.0.2.1:10809"]);
    assert!(err.contains("not a loopback address"), "{err}");
    assert!(err.contains("--nbd-tls-certificates"), "{err}");
    let err = start(&["--nbd-listen", "127.0.0.1:0", "--nbd-tls", "require"]);
    assert!(err.contains("needs --nbd-tls-certificates"), "{err}");
    let dir = srv.to_str().unwrap();
    // Peer verification without ca-cert.pem names the missing file.
    let err = start(&[
        "--nbd-listen",
        "127.0.0.1:0",
        "--nbd-tls-certificates",
        dir,
        "--nbd-tls-verify-peer",
    ]);
    assert!(err.contains("ca-cert.pem"), "{err}");
    // A private key every user can read is refused.
    std::fs::set_permissions(
        srv.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = start(&["--nbd-listen", "127.0.0.1:0", "--nbd-tls-certificates", dir]);
    assert!(
        err.contains("server-key.pem") && err.contains("every user"),
        "{err}"
    );
}

/// On an address that is not loopback TLS is required with no flag asking
/// for it. The address lives on the loopback interface of a network
/// namespace this test creates, so no packet leaves it.
#[test]
fn tls_is_required_by_default_on_a_network_address() {
    if !require_tools(&["nbdinfo", "unshare", "nsenter", "ip"]) {
        return;
    }
    if !skip_unless(is_root(), "a network namespace needs root") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("blockd test CA");
    let srv = server_dir(&tmp.path().join("server"), &ca, None);
    let trusts = client_dir(&tmp.path().join("client"), &ca, None);
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let api = state.join("api.sock");
    let log = std::fs::File::create(tmp.path().join("blockd.log")).unwrap();
    let addr = "192.0.2.10";
    let mut child = Command::new("unshare")
        .args(["--net", "--", "bash", "-euc"])
        .arg(format!(
            "ip link set lo up; ip addr add {addr}/32 dev lo; exec \"$0\" \"$@\""
        ))
        .arg(bin("blockd"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--no-mlock", "--nbd-listen", &format!("{addr}:10809")])
        .arg("--nbd-tls-certificates")
        .arg(&srv)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&api).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "blockd exited ({st}): {}",
                std::fs::read_to_string(tmp.path().join("blockd.log")).unwrap()
            );
        }
        assert!(std::time::Instant::now() < deadline, "blockd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    run(Command::new(bin("blockctl"))
        .arg("--socket")
        .arg(&api)
        .args(["volume", "create", "vol1", "--size", "8M"]));
    let netns = format!("--net=/proc/{}/ns/net", child.id());
    let nbdinfo_in_ns = |uri: &str| {
        Command::new("nsenter")
            .args([netns.as_str(), "--", "nbdinfo", "--size", uri])
            .output()
            .unwrap()
    };
    let plain = nbdinfo_in_ns(&format!("nbd://{addr}:10809/vol1"));
    let tls = nbdinfo_in_ns(&format!(
        "nbds://{addr}:10809/vol1?tls-certificates={}",
        trusts.display()
    ));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !plain.status.success(),
        "plain text admitted: {}",
        text(&plain)
    );
    assert!(tls.status.success(), "TLS client refused: {}", text(&tls));
    assert_eq!(String::from_utf8_lossy(&tls.stdout).trim(), "8388608");
}
