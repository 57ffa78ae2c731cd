//! qemu-io and qemu-img against blockd over `nbd+unix://`, on both I/O
//! engines (io_uring and the pread/pwrite thread pool).

mod common;

use std::process::Command;

use common::*;

fn io_patterns(engine: &str) {
    if !require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let d = Blockd::start_with(Some(engine), &[]);
    assert!(
        d.log().contains(&format!(
            "io_engine=\"{}\"",
            if engine == "threads" {
                "threads"
            } else {
                "io_uring"
            }
        )),
        "blockd did not use the {engine} engine:\n{}",
        d.log()
    );
    d.create("vol1", "64M");
    let uri = d.uri("vol1");
    qemu_io(
        &uri,
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 1M 4k",
            "write -P 0x11 3000 100",
            "read -P 0xa5 0 3000",
            "read -P 0x11 3000 100",
            "read -P 0xa5 3100 1045476",
            "read -P 0x5a 1M 4k",
            "flush",
        ],
    );
    // A second connection sees the first one's data.
    qemu_io(&uri, &["read -P 0x5a 1M 4k", "read -P 0 2M 1M"]);
    // discard and write -z read back as zeros.
    qemu_io(
        &uri,
        &[
            "discard 0 64k",
            "read -P 0 0 64k",
            "read -P 0xa5 64k 64k",
            "write -z 128k 64k",
            "read -P 0 128k 64k",
            "write -z -u 256k 64k",
            "read -P 0 256k 64k",
            "read -P 0xa5 320k 4k",
        ],
    );
    // Asynchronous writes in flight together, then read back.
    qemu_io(
        &uri,
        &[
            "aio_write -P 0x21 4M 256k",
            "aio_write -P 0x22 5M 256k",
            "aio_write -P 0x23 6M 256k",
            "aio_write -f -P 0x24 7M 256k",
            "aio_flush",
            "read -P 0x21 4M 256k",
            "read -P 0x22 5M 256k",
            "read -P 0x23 6M 256k",
            "read -P 0x24 7M 256k",
        ],
    );
    // FUA writes.
    qemu_io(&uri, &["write -f -P 0x31 8M 64k", "read -P 0x31 8M 64k"]);
    // Writes too large for the inline path go through the engine; with the
    // page cache dropped, reads miss it and go through the engine too.
    qemu_io(&uri, &["write -P 0x71 16M 8M", "flush"]);
    if is_root() {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    }
    qemu_io(
        &uri,
        &[
            "read -P 0x71 16M 8M",
            "read -P 0x31 8M 64k",
            "read -P 0xa5 320k 4k",
        ],
    );
}

#[test]
fn qemu_io_patterns_uring() {
    io_patterns("uring");
}

#[test]
fn qemu_io_patterns_threads() {
    io_patterns("threads");
}

#[test]
fn qemu_img_convert_compare_and_map() {
    if !require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let d = Blockd::start();
    d.create("vol1", "32M");
    let uri = d.uri("vol1");
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src.img");
    let back = tmp.path().join("back.img");
    // Random data with a zero region in the middle.
    let mut data = random_bytes(32 << 20, 7);
    data[8 << 20..12 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();

    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&back));
    assert!(
        read_file(&back) == data,
        "image converted out of blockd differs from the one put in"
    );

    // After TRIM the trimmed range is a hole in qemu-img map.
    qemu_io(&uri, &["discard 16M 4M"]);
    let map = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&uri));
    let entries: Vec<serde_json::Value> = serde_json::from_str(&map).expect("qemu-img map json");
    let covering = |off: u64| {
        entries
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                let l = e["length"].as_u64().unwrap();
                s <= off && off < s + l
            })
            .unwrap_or_else(|| panic!("no map entry covers {off}: {map}"))
            .clone()
    };
    let trimmed = covering(17 << 20);
    assert_eq!(trimmed["data"], false, "trimmed range still data: {map}");
    assert_eq!(trimmed["zero"], true, "trimmed range not zero: {map}");
    let written = covering(1 << 20);
    assert_eq!(written["data"], true, "written range not data: {map}");
    // The zero region qemu-img wrote sparsely is a hole too.
    assert_eq!(covering(9 << 20)["zero"], true, "{map}");
}

#[test]
fn tcp_only_when_asked() {
    if !require_tools(&["qemu-io", "curl"]) {
        return;
    }
    // Find a free loopback port, then hand it to blockd.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = Blockd::start_with(None, &["--nbd-listen", &addr]);
    d.create("vol1", "8M");
    qemu_io(
        &format!("nbd://{addr}/vol1"),
        &["write -P 0x61 0 1M", "read -P 0x61 0 1M"],
    );
    qemu_io(&d.uri("vol1"), &["read -P 0x61 0 1M"]);
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(d.api_socket())
        .arg("http://blockd/v1/info")))
    .unwrap();
    assert_eq!(info["nbd_listen"], addr.as_str());

    // Without --nbd-listen nothing listens on TCP.
    drop(d);
    let d = Blockd::start();
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "TCP listener without --nbd-listen"
    );
    assert!(d.log().contains("tcp=None"));
}
