//! Smoke tests of the object-store harness (tests/common/objstores.rs):
//! Garage and Azurite start on 127.0.0.1, their bucket/container exists,
//! the credentials the harness hands out work, and Garage survives
//! `stop()`/`restart()` with its data.

mod common;

use common::objstores::{http_request, Azurite, Garage, TEST_BUCKET};
use common::{require_tools, run};
use std::process::Command;

/// `curl ARGS... -w %{http_code}` -> the status code ("000": no connection).
fn curl_code(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(args)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn garage_serves_the_test_bucket() {
    if !require_tools(&["curl"]) {
        return;
    }
    let Some(mut g) = Garage::start() else {
        return;
    };
    assert!(
        g.endpoint.starts_with("http://127.0.0.1:"),
        "{}",
        g.endpoint
    );
    assert!(g.key_id.starts_with("GK"), "key id {:?}", g.key_id);
    assert_eq!(g.secret.len(), 64, "secret {:?}", g.secret);
    assert_eq!(g.bucket, TEST_BUCKET);

    // Anonymous access is refused.
    let url = format!("{}/{}", g.endpoint, g.bucket);
    assert_eq!(curl_code(&[&url]), "403", "anonymous GET {url}");

    // The CLI sees the bucket and the key's permissions on it.
    let info = g.garage(&["bucket", "info", TEST_BUCKET]);
    assert!(
        info.contains(&g.key_id),
        "key not allowed on the bucket:\n{info}"
    );

    // The key works: a SigV4-signed PUT and GET round-trip (curl signs).
    let sigv4 = format!("aws:amz:{}:s3", g.region);
    let user = format!("{}:{}", g.key_id, g.secret);
    let object = format!("{url}/smoke.txt");
    let file = g.dir().join("smoke.txt");
    std::fs::write(&file, "hello garage\n").expect("write");
    let signed = |extra: &[&str]| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--fail-with-body", "--max-time", "10"])
            .args(["--aws-sigv4", &sigv4, "--user", &user])
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(extra);
        c
    };
    run(&mut signed(&[
        "-T",
        file.to_str().expect("utf8 path"),
        &object,
    ]));
    assert_eq!(run(&mut signed(&[&object])), "hello garage\n");

    // The endpoint goes away, then comes back on the same port with the data.
    g.stop();
    assert!(!g.is_running());
    assert_eq!(curl_code(&[&url]), "000", "stopped server still answers");
    g.restart();
    assert!(g.is_running());
    assert_eq!(run(&mut signed(&[&object])), "hello garage\n");
}

#[test]
fn azurite_serves_the_test_container() {
    let Some(mut a) = Azurite::start() else {
        return;
    };
    assert_eq!(
        a.endpoint,
        format!("http://127.0.0.1:{}/devstoreaccount1", a.port)
    );
    assert_eq!(a.container, TEST_BUCKET);

    // The container exists (signed Get Container Properties).
    let r = a.request(
        "GET",
        &format!("/{}?restype=container", a.container),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Unsigned requests are refused.
    let r = http_request(
        a.addr(),
        "GET",
        &format!(
            "/devstoreaccount1/{}?restype=container&comp=list",
            a.container
        ),
        &[],
        b"",
    )
    .expect("anonymous request");
    assert_ne!(r.status, 200, "anonymous list allowed: {}", r.text());

    // Signatures are checked: another key is refused.
    let good = std::mem::replace(&mut a.key, "aW52YWxpZCBrZXk=".to_string());
    let r = a.request(
        "GET",
        &format!("/{}?restype=container", a.container),
        &[],
        b"",
    );
    a.key = good;
    assert_eq!(r.status, 403, "wrong key accepted: {}", r.text());

    // A blob round-trips (signing with a body).
    let blob = format!("/{}/smoke.txt", a.container);
    let r = a.request(
        "PUT",
        &blob,
        &[
            ("x-ms-blob-type", "BlockBlob"),
            ("Content-Type", "text/plain"),
        ],
        b"hello azurite\n",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = a.request("GET", &blob, &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"hello azurite\n");

    // And the container lists it.
    let r = a.request(
        "GET",
        &format!("/{}?restype=container&comp=list", a.container),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("<Name>smoke.txt</Name>"), "{}", r.text());
}
