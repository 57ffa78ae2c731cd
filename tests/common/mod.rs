//! Test harness: starts a real `blockd` in a temp state dir and runs real
//! peers against it.
//!
//! A test that needs a tool this machine lacks prints `SKIPPED: <why>` and
//! returns, unless `BLOCKD_TEST_REQUIRE_ALL=1` (set by `tests/run` in CI),
//! where a missing tool fails the test.

#![allow(dead_code)]

pub mod certs;
pub mod cloud;
pub mod disk;
pub mod objstores;
pub mod vm;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --release --workspace`, as tests/run does)",
        path.display()
    );
    path
}

/// True when every peer must be present (CI).
pub fn require_all() -> bool {
    std::env::var("BLOCKD_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Skips (or, in CI, fails) when `cond` is false.
pub fn skip_unless(cond: bool, why: &str) -> bool {
    if cond {
        return true;
    }
    if require_all() {
        panic!("required for this test but unavailable: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

/// True when `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Skips unless every tool is present.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    skip_unless(
        missing.is_empty(),
        &format!(
            "missing tools: {} (tests/run installs them)",
            missing.join(" ")
        ),
    )
}

/// True when running as root (loop devices, mounts).
pub fn is_root() -> bool {
    // SAFETY-free check: /proc/self/status names the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A running blockd.
pub struct Blockd {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub engine: Option<String>,
    pub extra_args: Vec<String>,
    /// Extra environment for the daemon (e.g. `BLOCKD_FAULT_INJECT`).
    pub env: Vec<(String, String)>,
    /// A command blockd runs under (e.g. `unshare -m`), which must exec it.
    pub wrapper: Vec<String>,
}

impl Blockd {
    /// Starts blockd with the default engine.
    pub fn start() -> Self {
        Self::start_with(None, &[])
    }

    /// Starts blockd with an engine (`threads`, `uring`) and extra args.
    pub fn start_with(engine: Option<&str>, args: &[&str]) -> Self {
        Self::launch(engine, args, &[])
    }

    /// Starts blockd with extra environment variables.
    pub fn start_env(env: &[(&str, &str)]) -> Self {
        Self::launch(None, &[], env)
    }

    /// Starts blockd under `wrapper` (a command that execs its arguments,
    /// such as `unshare --mount --propagation slave`).
    pub fn start_wrapped(wrapper: &[&str]) -> Self {
        let base =
            std::env::var_os("BLOCKD_TEST_TMP").map_or_else(std::env::temp_dir, PathBuf::from);
        let mut d = Self::new_in(&base, None, &[], &[]);
        d.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        d.spawn();
        d
    }

    /// Starts blockd with its state dir under `base` (a file system of the
    /// test's own, say a small tmpfs).
    pub fn start_in(base: &Path) -> Self {
        Self::launch_in(base, None, &[], &[])
    }

    fn launch(engine: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let base =
            std::env::var_os("BLOCKD_TEST_TMP").map_or_else(std::env::temp_dir, PathBuf::from);
        Self::launch_in(&base, engine, args, env)
    }

    fn launch_in(base: &Path, engine: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut d = Self::new_in(base, engine, args, env);
        d.spawn();
        d
    }

    fn new_in(base: &Path, engine: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("blockd-test-")
            .tempdir_in(base)
            .expect("temp dir");
        Self {
            child: None,
            dir,
            engine: engine.map(str::to_string),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: Vec::new(),
        }
    }

    /// (Re)starts the process on the same state dir.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(bin("blockd")),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("blockd"));
                c
            }
        };
        cmd.arg("--state-dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .env("BLOCKD_LOG", "info,blockd=debug")
            // Never the host's /etc/blockd/blockd.toml.
            .env("BLOCKD_CONFIG", "/dev/null")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        match &self.engine {
            Some(e) => cmd.env("BLOCKD_IO_ENGINE", e),
            None => cmd.env_remove("BLOCKD_IO_ENGINE"),
        };
        let readies = self.log().matches("blockd ready").count();
        let child = cmd.spawn().expect("start blockd");
        self.child = Some(child);
        self.wait_ready(readies);
    }

    /// Waits for this start's "blockd ready" line (the log is appended to
    /// across restarts) and for the sockets.
    fn wait_ready(&mut self, readies_before: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(self.api_socket()).is_ok()
                && self.nbd_socket().exists()
                && self.log().matches("blockd ready").count() > readies_before
            {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("blockd exited early ({status}):\n{}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("blockd did not become ready:\n{}", self.log());
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("blockd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The value of `--FLAG` among the extra arguments.
    fn arg(&self, flag: &str) -> Option<PathBuf> {
        let i = self.extra_args.iter().position(|a| a == flag)?;
        self.extra_args.get(i + 1).map(PathBuf::from)
    }

    pub fn api_socket(&self) -> PathBuf {
        self.arg("--api-socket")
            .unwrap_or_else(|| self.dir.path().join("api.sock"))
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.arg("--nbd-socket")
            .unwrap_or_else(|| self.dir.path().join("nbd.sock"))
    }

    /// `nbd+unix:///EXPORT?socket=...`
    pub fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.nbd_socket().display()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs blockctl against this daemon.
    pub fn blockctl(&self, args: &[&str]) -> Output {
        Command::new(bin("blockctl"))
            .arg("--socket")
            .arg(self.api_socket())
            .args(args)
            .output()
            .expect("run blockctl")
    }

    /// Runs blockctl and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.blockctl(args);
        assert!(
            out.status.success(),
            "blockctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs blockctl and asserts it fails with `needle` in its error
    /// output; returns that output.
    pub fn fails(&self, args: &[&str], needle: &str) -> String {
        let out = self.blockctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "blockctl {args:?} should fail");
        assert!(
            stderr.contains(needle),
            "blockctl {args:?}: expected {needle:?} in stderr, got: {stderr}"
        );
        stderr
    }

    /// Creates a volume.
    pub fn create(&self, name: &str, size: &str) {
        self.ok(&["volume", "create", name, "--size", size]);
    }

    /// kill -9 and wait.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        self.wait_exit()
    }

    /// Waits for the process to exit by itself (30 s at most).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        wait_timeout(&mut c, Duration::from_secs(30)).unwrap_or_else(|| {
            let _ = c.kill();
            panic!("blockd did not exit within 30 s:\n{}", self.log())
        })
    }
}

impl Drop for Blockd {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- blockd log ---\n{}", self.log());
        }
    }
}

/// Runs `f(0..n)` on `n` threads released at the same instant; returns
/// their results in order. For requests that must race.
pub fn at_once<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let barrier = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (b, f) = (&barrier, &f);
                s.spawn(move || {
                    b.wait();
                    f(i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("racer panicked"))
            .collect()
    })
}

/// Sends a signal by name with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Waits for a child with a timeout.
pub fn wait_timeout(c: &mut Child, t: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a shell snippet, asserting success; returns stdout.
pub fn sh(script: &str) -> String {
    run(Command::new("bash").args(["-euo", "pipefail", "-c", script]))
}

/// Runs qemu-io commands against a URI, asserting success and that no
/// command reported a pattern mismatch or failure.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run(&mut c);
    for bad in ["Pattern verification failed", "failed:", "error"] {
        assert!(!out.contains(bad), "qemu-io reported {bad:?}:\n{out}");
    }
    out
}

/// Whether NBD export `vol` can be opened: `Err` with what the client was
/// told when it cannot (libnbd logs the server's message in debug mode).
pub fn nbd_opens(d: &Blockd, vol: &str) -> Result<(), String> {
    let out = Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .arg(d.uri(vol))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs an nbdsh (python3-libnbd) script; asserts success and returns stdout.
pub fn nbdsh(script: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("script.py");
    std::fs::write(&path, script).expect("write script");
    let mut c = nbdsh_command();
    c.arg("-c").arg(format!(
        "import sys; sys.argv = {:?}; exec(compile(open({:?}).read(), 'script.py', 'exec'))",
        std::iter::once("script.py")
            .chain(args.iter().copied())
            .collect::<Vec<_>>(),
        path.display().to_string()
    ));
    run(&mut c)
}

/// `nbdsh` with the system Python first on PATH: the libnbd bindings are a
/// Debian package (python3-libnbd), invisible to a pyenv or venv python3.
pub fn nbdsh_command() -> Command {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut c = Command::new("nbdsh");
    c.env("PATH", format!("/usr/bin:{path}"));
    c
}

/// Deterministic pseudo-random bytes (xorshift), for data that must not compress.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads a whole file.
pub fn read_file(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    std::fs::File::open(p)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    v
}

/// An nbdsh client reading one export over one connection that it holds
/// open for a while: how a test asks "was this client cut off?".
pub struct HeldReader {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    refused: bool,
}

impl HeldReader {
    /// Connects to `uri`, reads, waits `secs` seconds, reads again.
    pub fn start(uri: &str, secs: f64) -> Self {
        let script = format!(
            "import sys, time\n\
             h = nbd.NBD()\n\
             try:\n    h.connect_uri({uri:?})\n\
             except nbd.Error:\n    print('refused', flush=True)\n    sys.exit(0)\n\
             print('open', flush=True)\n\
             try:\n    h.pread(4096, 0)\n    time.sleep({secs})\n    h.pread(4096, 4096)\n    print('ok')\n\
             except nbd.Error as e:\n    print('broken:', e)\n"
        );
        let mut child = nbdsh_command()
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("nbdsh");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            out,
            refused: false,
        }
    }

    /// Waits until the connection is open (true) or was refused (false).
    pub fn opened(&mut self) -> bool {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).expect("nbdsh output");
        self.refused = line.trim() != "open";
        !self.refused
    }

    /// How it ended: "refused" (the connection could not open), "ok"
    /// (every read succeeded) or "broken: ..." (a read failed).
    pub fn outcome(mut self) -> String {
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).expect("nbdsh output");
        let _ = self.child.wait();
        if self.refused {
            return "refused".into();
        }
        rest.lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty() && *l != "open")
            .unwrap_or("")
            .to_string()
    }
}

/// `said` when a blockctl run succeeded, else its stderr: one word per
/// outcome for the requests a race fires together.
pub fn succeeded_or_stderr(out: &Output, said: &str) -> String {
    if out.status.success() {
        said.to_string()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}
