//! Real object-store servers on loopback, for the cloud-backup tests.
//!
//! Two servers, each started per test in its own temp dir and killed on
//! Drop. Both listen on 127.0.0.1 only, on ports picked by binding port 0 on
//! 127.0.0.1; neither is ever asked to contact anything but itself, so the
//! tests never touch the network beyond loopback.
//!
//! # Garage (S3-compatible) — [`Garage`]
//!
//! A single-node cluster: `replication_factor = 1`, one node with role
//! `dc1`/1G in layout version 1. Why single node: the tests need an S3
//! endpoint, not Garage's replication; one node starts in well under a
//! second and needs no quorum. The config (`garage.toml` in the temp dir):
//!
//! - `metadata_dir`, `data_dir`: inside the temp dir.
//! - `db_engine = "sqlite"`: compiled into every default Garage build (1.x
//!   and 2.x; `lmdb` is the other default one). Unlike LMDB it reserves no
//!   huge memory map and is indifferent to the filesystem under the temp
//!   dir; speed does not matter for tests. `disable_scrub = true` keeps the
//!   background scrub from doing I/O during a test.
//! - `rpc_bind_addr` / `rpc_public_addr = 127.0.0.1:P1`: the RPC port is
//!   used only by the `garage` CLI that sets the cluster up; setting the
//!   public address stops Garage from guessing one from the interfaces, and
//!   `bootstrap_peers` is empty, so it never dials out. `rpc_secret` is 32
//!   random bytes (hex), fresh per server.
//! - `[s3_api] api_bind_addr = 127.0.0.1:P2`, `s3_region = "garage"`, no
//!   `root_domain`: path-style requests only (`http://127.0.0.1:P2/bucket/key`).
//! - `[admin] api_bind_addr = 127.0.0.1:P3` with a random `admin_token`:
//!   `GET /health` (no token) answers 200 once the node serves requests; the
//!   harness waits for that after every (re)start.
//! - No `k2v_api`, no `s3_web`: nothing else listens.
//!
//! Setup after `garage -c garage.toml server` answers: `node id`,
//! `layout assign -z dc1 -c 1G <id>`, `layout apply --version 1`,
//! `key create blockd-test`, `bucket create blockd-test`,
//! `bucket allow --read --write --owner blockd-test --key blockd-test`.
//! The `GARAGE_*` variables the CLI and server read (RPC host/secret, admin
//! token, config file, logging) are removed from their environment so only
//! the config file counts.
//!
//! [`Garage::stop`] / [`Garage::restart`] kill the server (SIGKILL: the
//! endpoint vanishes, connections reset) and start it again on the same
//! ports and data; key, bucket and objects survive.
//!
//! # Azurite (Azure Blob emulator) — [`Azurite`]
//!
//! `azurite-blob --blobHost 127.0.0.1 --blobPort P --location DIR
//! --disableTelemetry --skipApiVersionCheck --disableProductStyleUrl --silent`:
//! the Blob service only (no queue/table ports), persisted in the temp dir.
//! `--disableTelemetry` is never omitted: without it Azurite sends usage
//! data to Application Insights over the internet. `--skipApiVersionCheck`
//! accepts whatever `x-ms-version` the client library sends;
//! `--disableProductStyleUrl` always takes the account from the first path
//! segment (`http://127.0.0.1:P/devstoreaccount1/...`). `AZURITE_ACCOUNTS`
//! and `AZURITE_DB` are removed from its environment, so the account is the
//! well-known `devstoreaccount1` with its documented key, stored in files.
//!
//! Azurite does not create containers by itself and object_store's Azure
//! client cannot create one, so [`Azurite::start`] creates the container
//! `blockd-test` with a `PUT ...?restype=container` signed with SharedKey
//! here ([`Azurite::request`] signs any request the same way).
//!
//! # Missing servers
//!
//! `Garage::start()` / `Azurite::start()` return `None` after printing
//! `SKIPPED: ...` when the binary is missing, and panic instead in CI
//! (`BLOCKD_TEST_REQUIRE_ALL=1`). `tests/run` installs both.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tempfile::TempDir;

use super::skip_unless;

/// Bucket (Garage) and container (Azurite) created by `start()`.
pub const TEST_BUCKET: &str = "blockd-test";

/// How long a server may take to start or restart.
const START_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Garage

/// A single-node Garage on 127.0.0.1 with one key allowed on one bucket.
pub struct Garage {
    /// S3 endpoint, `http://127.0.0.1:PORT` (path-style requests).
    pub endpoint: String,
    /// S3 region the server expects in signatures (`garage`).
    pub region: String,
    /// Access key id (`GK...`) of the key `blockd-test`.
    pub key_id: String,
    /// Secret access key of that key.
    pub secret: String,
    /// Bucket `blockd-test`; the key may read, write and own it.
    pub bucket: String,
    /// Admin API, `http://127.0.0.1:PORT` (`/health`, `/metrics`, `/v2/...`).
    pub admin_endpoint: String,
    /// Bearer token of the admin API.
    pub admin_token: String,
    /// `garage --version` of the binary in use, e.g.
    /// `cargo:2.5.0 [features: bundled-libs, k2v, lmdb, metrics, sqlite]`.
    pub version: String,
    bin: PathBuf,
    child: Option<Child>,
    dir: TempDir,
}

impl Garage {
    /// Starts and sets up a server; `None` (after `SKIPPED: ...`) when no
    /// `garage` binary is found and this is not CI.
    pub fn start() -> Option<Garage> {
        let bin = garage_bin();
        if !skip_unless(
            bin.is_some(),
            "garage not found on PATH nor in ~/.cargo/bin (tests/run installs it: cargo install --locked garage@2.5.0)",
        ) {
            return None;
        }
        let bin = bin?;
        let started = Instant::now();
        let dir = test_tempdir("blockd-garage-");
        let [rpc_port, s3_port, admin_port] = free_ports::<3>();
        let region = "garage".to_string();
        let admin_token = random_hex(32);
        let config = node_config(
            dir.path(),
            "single node",
            1,
            [rpc_port, s3_port, admin_port],
            &random_hex(32),
            &region,
            &admin_token,
        );
        std::fs::write(dir.path().join("garage.toml"), config).expect("write garage.toml");
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| {
                let v = String::from_utf8_lossy(&o.stdout);
                v.trim().trim_start_matches("garage ").to_string()
            })
            .unwrap_or_default();

        let mut g = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region,
            key_id: String::new(),
            secret: String::new(),
            bucket: TEST_BUCKET.to_string(),
            admin_endpoint: format!("http://127.0.0.1:{admin_port}"),
            admin_token,
            version,
            bin,
            child: None,
            dir,
        };
        g.spawn();
        // The RPC side answers (the CLI talks to the server over RPC).
        g.wait_rpc();
        let node = g.garage(&["node", "id", "-q"]);
        let node_id = node
            .split_whitespace()
            .next()
            .and_then(|s| s.split('@').next())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| panic!("cannot parse `garage node id` output: {node:?}"))
            .to_string();
        g.garage(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id]);
        g.garage(&["layout", "apply", "--version", "1"]);
        g.wait_healthy();
        (g.key_id, g.secret) = g.key_and_bucket();
        eprintln!(
            "garage {} ready at {} in {:.1?}",
            g.version,
            g.endpoint,
            started.elapsed()
        );
        Some(g)
    }

    /// A cluster of three nodes on 127.0.0.1 with replication factor 3,
    /// one key allowed on one bucket (every node serves S3); `None` (after
    /// `SKIPPED: ...`) when no `garage` binary is found and this is not CI.
    pub fn cluster3() -> Option<Vec<Garage>> {
        let bin = garage_bin();
        if !skip_unless(
            bin.is_some(),
            "garage not found on PATH nor in ~/.cargo/bin (tests/run installs it: cargo install --locked garage@2.5.0)",
        ) {
            return None;
        }
        let bin = bin?;
        let started = Instant::now();
        let ports = free_ports::<9>();
        let rpc_secret = random_hex(32);
        let admin_token = random_hex(32);
        let region = "garage".to_string();
        let mut nodes: Vec<Garage> = (0..3)
            .map(|i| {
                let [rpc_port, s3_port, admin_port] =
                    [ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]];
                let dir = test_tempdir(&format!("blockd-garage{i}-"));
                let config = node_config(
                    dir.path(),
                    &format!("cluster node {i}"),
                    3,
                    [rpc_port, s3_port, admin_port],
                    &rpc_secret,
                    &region,
                    &admin_token,
                );
                std::fs::write(dir.path().join("garage.toml"), config).expect("write garage.toml");
                Garage {
                    endpoint: format!("http://127.0.0.1:{s3_port}"),
                    region: region.clone(),
                    key_id: String::new(),
                    secret: String::new(),
                    bucket: TEST_BUCKET.to_string(),
                    admin_endpoint: format!("http://127.0.0.1:{admin_port}"),
                    admin_token: admin_token.clone(),
                    version: String::new(),
                    bin: bin.clone(),
                    child: None,
                    dir,
                }
            })
            .collect();
        for n in &mut nodes {
            n.spawn();
            n.wait_rpc();
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| n.garage(&["node", "id", "-q"]).trim().to_string())
            .collect();
        for full in &ids[1..] {
            nodes[0].garage(&["node", "connect", full]);
        }
        for full in &ids {
            let id = full.split('@').next().unwrap_or(full);
            nodes[0].garage(&["layout", "assign", "-z", "dc1", "-c", "1G", id]);
        }
        nodes[0].garage(&["layout", "apply", "--version", "1"]);
        for n in &mut nodes {
            n.wait_healthy();
        }
        let (key_id, secret) = nodes[0].key_and_bucket();
        for n in &mut nodes {
            n.key_id = key_id.clone();
            n.secret = secret.clone();
        }
        eprintln!(
            "garage cluster of 3 ready at {} in {:.1?}",
            nodes[0].endpoint,
            started.elapsed()
        );
        Some(nodes)
    }

    /// Temp dir holding `garage.toml`, `meta/`, `data/` and `garage.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("garage.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `blockctl credentials create NAME --provider s3 ...` arguments for
    /// this server's bucket, with `secret` as the secret key.
    pub fn credentials_args(&self, name: &str, secret: &str, prefix: Option<&str>) -> Vec<String> {
        let endpoint = self.endpoint.trim_start_matches("http://");
        let mut a: Vec<String> = [
            "credentials",
            "create",
            name,
            "--provider",
            "s3",
            "--s3-endpoint",
            endpoint,
            "--s3-disable-ssl",
            "--s3-region",
            &self.region,
            "--s3-access-key",
            &self.key_id,
            "--s3-secret-key",
            secret,
            "--bucket",
            &self.bucket,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(p) = prefix {
            a.extend(["--prefix".to_string(), p.to_string()]);
        }
        a
    }

    /// `host:port` of the S3 API.
    pub fn s3_addr(&self) -> SocketAddr {
        addr_of(&self.endpoint)
    }

    /// `garage -c garage.toml ARGS...`, with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        clean_garage_env(&mut c);
        c.arg("-c").arg(self.config_path()).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs a `garage` CLI command, asserting success; returns stdout.
    pub fn garage(&self, args: &[&str]) -> String {
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run garage {args:?}: {e}"));
        assert!(
            out.status.success(),
            "garage {args:?} failed ({}):\nstdout: {}\nstderr: {}\n--- server log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the server (SIGKILL) and waits for it: the endpoint goes away,
    /// open connections are reset. No-op when already stopped.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same ports, config and data, and
    /// waits until it serves requests.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_healthy();
    }

    /// Starts a stopped cluster node again and has `peer` connect to it
    /// (a node restarted alone does not find the others), then waits until
    /// it serves requests.
    pub fn rejoin(&mut self, peer: &Garage) {
        self.stop();
        self.spawn();
        self.wait_rpc();
        let id = self.garage(&["node", "id", "-q"]).trim().to_string();
        peer.garage(&["node", "connect", &id]);
        self.wait_healthy();
    }

    /// Waits until the CLI reaches the server over RPC.
    fn wait_rpc(&mut self) {
        self.wait_until("`garage status` succeeds", |g| {
            g.command(&["status"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// Creates the key `blockd-test` and the bucket it may read, write and
    /// own; returns the key id and secret.
    fn key_and_bucket(&self) -> (String, String) {
        let (key_id, secret) = self.new_key(TEST_BUCKET);
        self.garage(&["bucket", "create", TEST_BUCKET]);
        self.garage(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            TEST_BUCKET,
            "--key",
            TEST_BUCKET,
        ]);
        (key_id, secret)
    }

    /// Creates key `name`; returns its id and secret.
    fn new_key(&self, name: &str) -> (String, String) {
        let created = self.garage(&["key", "create", name]);
        let key_id = table_value(&created, "Key ID")
            .unwrap_or_else(|| panic!("no Key ID in `garage key create` output:\n{created}"));
        let secret = match table_value(&created, "Secret key") {
            Some(s) if !s.starts_with('(') => s,
            // Some versions redact it unless asked.
            _ => {
                let info = self.garage(&["key", "info", "--show-secret", &key_id]);
                table_value(&info, "Secret key")
                    .filter(|s| !s.starts_with('('))
                    .unwrap_or_else(|| panic!("no Secret key in `garage key info`:\n{info}"))
            }
        };
        (key_id, secret)
    }

    /// Creates key `name`, allowed only to read the test bucket; returns
    /// its id and secret.
    pub fn reader_key(&self, name: &str) -> (String, String) {
        let key = self.new_key(name);
        self.garage(&["bucket", "allow", "--read", TEST_BUCKET, "--key", name]);
        key
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("garage log file");
        let mut c = self.command(&["server"]);
        c.env("RUST_LOG", "garage=info,warn")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(c.spawn().expect("start garage server"));
    }

    /// Waits until the admin API's `/health` answers 200 (layout applied,
    /// all partitions available) and the S3 port accepts connections.
    fn wait_healthy(&mut self) {
        let admin = addr_of(&self.admin_endpoint);
        let s3 = self.s3_addr();
        self.wait_until("/health answers 200", |_| {
            http_request(admin, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200)
                && TcpStream::connect_timeout(&s3, Duration::from_secs(1)).is_ok()
        });
    }

    fn wait_until(&mut self, what: &str, mut ok: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ok(self) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("garage exited early ({status}):\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "garage: timed out waiting until {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- garage log ---\n{}", self.log());
        }
    }
}

/// `garage.toml` of a loopback node with its data under `dir`.
fn node_config(
    dir: &Path,
    what: &str,
    replication: u32,
    [rpc_port, s3_port, admin_port]: [u16; 3],
    rpc_secret: &str,
    region: &str,
    admin_token: &str,
) -> String {
    format!(
        r#"# blockd test server: {what}, loopback only (tests/common/objstores.rs)
metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
disable_scrub = true
replication_factor = {replication}

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"
bootstrap_peers = []

[s3_api]
api_bind_addr = "127.0.0.1:{s3_port}"
s3_region = "{region}"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "{admin_token}"
"#,
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
    )
}

/// The `garage` binary: `$BLOCKD_TEST_GARAGE`, else on PATH, else in
/// `$CARGO_HOME/bin` or `~/.cargo/bin` (where `cargo install` puts it).
pub fn garage_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BLOCKD_TEST_GARAGE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("garage"))
        .find(|p| is_executable(p))
    {
        return Some(p);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(cargo_home.join("bin").join("garage")).filter(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Only the config file configures the test server and its CLI.
fn clean_garage_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("GARAGE_") {
            c.env_remove(k);
        }
    }
}

/// The value after `name:` in Garage's `name:<tab or spaces>value` tables.
fn table_value(out: &str, name: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let (k, v) = l.trim().split_once(':')?;
        (k.trim() == name)
            .then(|| v.trim().to_string())
            .filter(|v| !v.is_empty())
    })
}

// ---------------------------------------------------------------------------
// Azurite

/// Azurite's well-known development account.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Its well-known key (documented; not a secret).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// `x-ms-version` of the harness's own requests.
const AZURE_API_VERSION: &str = "2021-12-02";

/// An Azurite Blob service on 127.0.0.1 with one container.
pub struct Azurite {
    /// `http://127.0.0.1:PORT/devstoreaccount1` (path-style account URL).
    pub endpoint: String,
    /// `devstoreaccount1`.
    pub account: String,
    /// The account key (base64), Azurite's well-known dev key.
    pub key: String,
    /// Container `blockd-test`, created by `start()`.
    pub container: String,
    /// The blob port.
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl Azurite {
    /// Starts Azurite and creates the container; `None` (after
    /// `SKIPPED: ...`) when `azurite-blob` is missing and this is not CI.
    pub fn start() -> Option<Azurite> {
        if !skip_unless(
            super::have("azurite-blob"),
            "azurite-blob not found on PATH (tests/run installs it: npm install -g azurite@3.37.0)",
        ) {
            return None;
        }
        let started = Instant::now();
        let dir = test_tempdir("blockd-azurite-");
        let [port] = free_ports::<1>();
        let mut a = Azurite {
            endpoint: format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
            account: AZURITE_ACCOUNT.to_string(),
            key: AZURITE_KEY.to_string(),
            container: TEST_BUCKET.to_string(),
            port,
            child: None,
            dir,
        };
        a.spawn();
        a.wait_ready();
        let r = a.request(
            "PUT",
            &format!("/{TEST_BUCKET}?restype=container"),
            &[],
            b"",
        );
        assert!(
            r.status == 201 || r.status == 409,
            "azurite: creating container {TEST_BUCKET} answered {}: {}\n{}",
            r.status,
            r.text(),
            a.log()
        );
        eprintln!(
            "azurite ready at {} in {:.1?}",
            a.endpoint,
            started.elapsed()
        );
        Some(a)
    }

    /// Temp dir holding Azurite's data (`--location`) and `azurite.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("azurite.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Connection string for Azure SDKs and tools.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={};AccountKey={};BlobEndpoint={};",
            self.account, self.key, self.endpoint
        )
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills Azurite (SIGKILL); no-op when already stopped.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts Azurite again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    /// Sends a request signed with SharedKey. `path_and_query` is relative
    /// to the account: `""` (account), `"/CONTAINER?restype=container"`,
    /// `"/CONTAINER/BLOB"`. `headers` may add `Content-Type`, `x-ms-*`
    /// (e.g. `x-ms-blob-type: BlockBlob`) and the like; the harness adds
    /// `x-ms-date`, `x-ms-version`, `Content-Length` and `Authorization`.
    /// Query values must not need percent-encoding.
    pub fn request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        self.try_request(method, path_and_query, headers, body)
            .unwrap_or_else(|e| panic!("azurite {method} {path_and_query}: {e}\n{}", self.log()))
    }

    /// [`Self::request`], with transport errors returned instead of
    /// panicking (a server still starting may accept and then reset).
    fn try_request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let (rel_path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let path = format!("/{}{}", self.account, rel_path);
        let date = http_date(SystemTime::now());
        let length = body.len().to_string();
        let mut all: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.push(("x-ms-date".into(), date));
        all.push(("x-ms-version".into(), AZURE_API_VERSION.into()));
        let header = |name: &str| {
            all.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map_or("", |(_, v)| v.as_str())
        };
        // https://learn.microsoft.com/rest/api/storageservices/authorize-with-shared-key
        let mut to_sign = format!(
            "{method}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            header("Content-Encoding"),
            header("Content-Language"),
            if body.is_empty() { "" } else { length.as_str() },
            header("Content-MD5"),
            header("Content-Type"),
            header("Date"),
            header("If-Modified-Since"),
            header("If-Match"),
            header("If-None-Match"),
            header("If-Unmodified-Since"),
            header("Range"),
        );
        let mut ms: Vec<(String, &str)> = all
            .iter()
            .filter(|(k, _)| k.to_ascii_lowercase().starts_with("x-ms-"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
            .collect();
        ms.sort();
        for (k, v) in ms {
            to_sign.push_str(&format!("{k}:{v}\n"));
        }
        // Path-style: the account appears twice, "/account" + "/account/...".
        to_sign.push_str(&format!("/{}{}", self.account, path));
        let mut params: Vec<(String, &str)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_ascii_lowercase(), v)
            })
            .collect();
        params.sort();
        for (k, v) in params {
            to_sign.push_str(&format!("\n{k}:{v}"));
        }
        let key = base64::engine::general_purpose::STANDARD
            .decode(&self.key)
            .expect("account key is base64");
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("hmac key");
        mac.update(to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        all.push((
            "Authorization".into(),
            format!("SharedKey {}:{sig}", self.account),
        ));
        let target = if query.is_empty() {
            path
        } else {
            format!("{path}?{query}")
        };
        let refs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        http_request(self.addr(), method, &target, &refs, body)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("azurite log file");
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("azurite data dir");
        let mut c = Command::new("azurite-blob");
        c.args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(self.port.to_string())
            .arg("--location")
            .arg(&data)
            // Never without: Azurite otherwise phones home (App Insights).
            .arg("--disableTelemetry")
            .args([
                "--skipApiVersionCheck",
                "--disableProductStyleUrl",
                "--silent",
            ])
            .env_remove("AZURITE_ACCOUNTS")
            .env_remove("AZURITE_DB")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(c.spawn().expect("start azurite-blob"));
    }

    /// Waits until a signed "list containers" answers 200 (server up, key
    /// accepted).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Azurite listens before it serves: a first request may be
            // refused or reset. Transport errors retry until the deadline.
            match self.try_request("GET", "?comp=list", &[], b"") {
                Ok(r) => {
                    assert!(
                        r.status == 200,
                        "azurite: list containers answered {}: {}\n{}",
                        r.status,
                        r.text(),
                        self.log()
                    );
                    return;
                }
                Err(e) if Instant::now() >= deadline => panic!(
                    "azurite did not answer within {START_TIMEOUT:?} (last error: {e}):\n{}",
                    self.log()
                ),
                Err(_) => {}
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("azurite exited early ({status}):\n{}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- azurite log ---\n{}", self.log());
        }
    }
}

// ---------------------------------------------------------------------------
// Shared helpers

/// `n` distinct free ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr").port())
}

/// A temp dir under `$BLOCKD_TEST_TMP` (or the system temp dir).
fn test_tempdir(prefix: &str) -> TempDir {
    let base = std::env::var_os("BLOCKD_TEST_TMP").map_or_else(std::env::temp_dir, PathBuf::from);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .expect("temp dir")
}

/// `bytes` random bytes from the kernel, hex-encoded.
fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// `127.0.0.1:PORT` of an `http://127.0.0.1:PORT[/...]` URL.
fn addr_of(url: &str) -> SocketAddr {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport
        .parse()
        .unwrap_or_else(|e| panic!("not an http://IP:PORT url: {url}: {e}"))
}

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`);
/// adds `Host` and `Content-Length`. Loopback servers only: no TLS, no
/// redirects.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`), as `x-ms-date` wants.
pub fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days >= 0.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let idx = |n: u64| usize::try_from(n).expect("small");
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[idx(days % 7)],
        MONTHS[idx(month - 1)],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A TLS front for a plain-HTTP server on loopback: terminates TLS with a
/// certificate for 127.0.0.1 signed by a CA of its own (in `ca_file`) and
/// passes each connection's bytes to `backend` and back. For testing the
/// object-store client over HTTPS against Garage, which serves plain HTTP.
pub struct TlsFront {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The CA that signed the front's certificate, PEM.
    pub ca_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: TempDir,
}

impl TlsFront {
    /// Starts a front for `backend` (`127.0.0.1:PORT`).
    pub fn start(backend: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = tempfile::tempdir().unwrap();
        let ca = super::certs::Ca::new("blockd test object store CA");
        let (cert, key) = ca.issue("object store", true);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("https://{}", listener.local_addr().unwrap());
        let backend = backend.to_string();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let conn = tokio::select! {
                        _ = &mut stopped => return,
                        c = listener.accept() => c,
                    };
                    let Ok((tcp, _)) = conn else { continue };
                    let acceptor = acceptor.clone();
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        // A client that refuses the certificate ends here.
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    });
                }
            });
        });
        Self {
            endpoint,
            ca_file,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
