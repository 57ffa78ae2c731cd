//! The daemon as a host service: memory-pressure protections on every
//! thread (and not passed to hooks), and the service manager notified
//! (systemd's `Type=notify` protocol on `$NOTIFY_SOCKET`).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

/// PF_MEMALLOC_NOIO, set by PR_SET_IO_FLUSHER (include/linux/sched.h).
const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
/// include/uapi/linux/capability.h
const CAP_SYS_RESOURCE: u32 = 24;

fn thread_flags(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let comm = head.split_once('(').unwrap().1.to_string();
        let flags: u64 = rest.split_whitespace().nth(6).unwrap().parse().unwrap();
        out.push((comm, flags));
    }
    out
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn memory_pressure_protections_hold_on_every_thread_and_not_in_hooks() {
    if !skip_unless(
        is_root(),
        "needs root (PR_SET_IO_FLUSHER, mlockall, oom_score_adj)",
    ) {
        return;
    }
    let d = Blockd::start();
    d.create("v", "8M");
    // Busy enough to have started workers and blocking threads.
    qemu_io(&d.uri("v"), &["write -P 0x11 0 8M", "flush"]);
    let pid = d.pid();
    let locked: u64 = status_field(pid, "VmLck:")
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    assert!(locked > 0, "no memory locked");
    assert!(d
        .log()
        .contains("memory-pressure protection on protection=\"mlockall\""));
    // PR_SET_IO_FLUSHER and a negative oom_score_adj need
    // CAP_SYS_RESOURCE, which a container may withhold even from root:
    // then the daemon must say so and run on.
    let caps = u64::from_str_radix(&status_field(std::process::id(), "CapEff:"), 16).unwrap();
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    if caps & (1 << CAP_SYS_RESOURCE) != 0 {
        let threads = thread_flags(pid);
        assert!(threads.len() > 2, "{threads:?}");
        for (comm, flags) in &threads {
            assert_ne!(
                flags & PF_MEMALLOC_NOIO,
                0,
                "thread {comm} is not an I/O flusher"
            );
        }
        assert_eq!(adj.trim(), "-1000");
    } else {
        eprintln!("no CAP_SYS_RESOURCE here: checking that blockd reports the two protections off");
        for p in ["PR_SET_IO_FLUSHER", "oom_score_adj -1000"] {
            assert!(
                d.log()
                    .lines()
                    .any(|l| l.contains("memory-pressure protection off")
                        && l.contains(&format!("protection=\"{p}\""))
                        && (l.contains("not permitted") || l.contains("Permission denied"))),
                "{p}: {}",
                d.log()
            );
        }
        assert_ne!(adj.trim(), "-1000");
    }
    // A hook gets an ordinary process: OOM score and umask of its own.
    d.ok(&[
        "snapshot",
        "create",
        "v",
        "--name",
        "s",
        "--pre-exec",
        "cat /proc/self/oom_score_adj; umask",
    ]);
    let s: serde_json::Value =
        serde_json::from_str(&d.ok(&["-j", "snapshot", "inspect", "v@s"])).unwrap();
    let said = s["pre_exec"]["output"].as_str().unwrap().to_string();
    assert_eq!(
        said.split_whitespace().collect::<Vec<_>>(),
        ["0", "0022"],
        "{s}"
    );
    // Without --no-mlock only.
    drop(d);
    let d = Blockd::start_with(None, &["--no-mlock"]);
    let locked = status_field(d.pid(), "VmLck:");
    assert_eq!(locked, "0 kB");
}

fn received(sock: &UnixDatagram, want: &str) -> String {
    let mut all = String::new();
    let mut buf = [0u8; 4096];
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            if all.contains(want) {
                return all;
            }
        }
    }
    panic!("no {want:?} from blockd; got {all:?}");
}

#[test]
fn the_service_manager_hears_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let p = path.display().to_string();
    let mut d = Blockd::start_env(&[("NOTIFY_SOCKET", &p), ("WATCHDOG_USEC", "400000")]);
    let got = received(&sock, "READY=1");
    assert!(got.contains("STATUS=serving 0 volume(s)"), "{got}");
    received(&sock, "WATCHDOG=1");
    assert!(d.terminate().success());
    let got = received(&sock, "STOPPING=1");
    assert!(got.contains("STATUS=draining"), "{got}");
}

/// A log that cannot be written (stderr on a full file system, here
/// /dev/full) costs its lines, nothing else: the daemon starts, serves
/// requests and data, and stops cleanly.
#[test]
fn a_log_that_cannot_be_written_loses_only_its_lines() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let mut child = std::process::Command::new(bin("blockd"))
        .arg("--state-dir")
        .arg(state.path())
        .env("BLOCKD_CONFIG", "/dev/null")
        .env("BLOCKD_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(full())
        .stderr(full())
        .spawn()
        .unwrap();
    let api = state.path().join("api.sock");
    let nbd = state.path().join("nbd.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(api.exists() && nbd.exists()) {
        assert!(child.try_wait().unwrap().is_none(), "blockd exited");
        assert!(std::time::Instant::now() < deadline, "blockd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(bin("blockctl"))
            .arg("--socket")
            .arg(&api)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&["volume", "create", "v", "--size", "16M"]);
    let uri = format!("nbd+unix:///v?socket={}", nbd.display());
    qemu_io(&uri, &["write -P 7 0 1M"]);
    qemu_io(&uri, &["read -P 7 0 1M"]);
    ctl(&["snapshot", "create", "v", "--name", "s"]);
    ctl(&["volume", "list"]);
    assert!(child.try_wait().unwrap().is_none(), "blockd exited");
    signal(child.id(), "TERM");
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("blockd did not stop");
    assert!(status.success(), "{status}");
}

/// Open files of `pid`: (soft, hard).
fn open_files(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let mut n = line.split_whitespace().skip(3);
    (n.next().unwrap().into(), n.next().unwrap().into())
}

/// A soft limit on open descriptors below the hard one (a shell's 1024)
/// is raised to it, and a hard one below what the connections blockd
/// allows may take is named in a warning that says what to change.
#[test]
fn a_low_descriptor_limit_is_raised_or_named() {
    if !require_tools(&["prlimit"]) {
        return;
    }
    let low = Blockd::start_wrapped(&["prlimit", "--nofile=1024:4096", "--"]);
    assert_eq!(open_files(low.pid()), ("4096".into(), "4096".into()));
    let log = low.log();
    assert!(
        log.contains("open-descriptor limit raised")
            && log.contains("raise it (systemd: LimitNOFILE=")
            && log.contains("lower --nbd-max-connections"),
        "{log}"
    );
    low.ok(&["volume", "list"]);
    // Room for 1024 NBD connections and the rest: raised, no warning.
    let enough = Blockd::start_wrapped(&["prlimit", "--nofile=1024:8192", "--"]);
    assert_eq!(open_files(enough.pid()), ("8192".into(), "8192".into()));
    let log = enough.log();
    assert!(
        log.contains("open-descriptor limit raised")
            && !log.contains("lower --nbd-max-connections"),
        "{log}"
    );
}
