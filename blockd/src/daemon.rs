//! The daemon: state directory, sockets, signal handling and shutdown.
//!
//! Shutdown order (SIGTERM or SIGINT): stop accepting; connections answer
//! new requests with ESHUTDOWN while running ones finish; after the grace
//! period they close; then every data file is fsynced, the state database
//! checkpointed, the sockets removed, and the process exits 0.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use blockd_api::DaemonInfo;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::claims::Claims;
use crate::cloud::Cloud;
use crate::fuse::Mounts;
use crate::nbd::tls::TlsServer;
use crate::nbd::{self, NbdContext};
use crate::snapshot::Snapshots;
use crate::volume::store::Store;
use crate::volume::{Engine, EngineKind};

/// How often idle volumes' dirty maps are looked at for settling.
const SETTLE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Resolved daemon settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory.
    pub state_dir: PathBuf,
    /// Control API socket.
    pub api_socket: PathBuf,
    /// NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// Optional NBD TCP address.
    pub nbd_listen: Option<SocketAddr>,
    /// TLS on the TCP address (see [`crate::nbd::tls`]).
    pub nbd_tls: crate::nbd::tls::TlsSetting,
    /// Directory of `server-cert.pem`, `server-key.pem`, `ca-cert.pem`.
    pub nbd_tls_certificates: Option<PathBuf>,
    /// Require client certificates signed by `ca-cert.pem`.
    pub nbd_tls_verify_peer: bool,
    /// Most NBD client connections.
    pub nbd_max_connections: usize,
    /// Most bytes NBD connections hold together for requests and replies.
    pub nbd_max_memory: u64,
    /// I/O engine choice.
    pub io_engine: EngineKind,
    /// How long connections answer ESHUTDOWN before closing.
    pub shutdown_grace: Duration,
    /// Track dirty extents (off only to measure what tracking costs).
    pub change_tracking: bool,
    /// How often held snapshots' copy-on-write data is synced.
    pub snapshot_sync: Duration,
    /// Backups, restores and locations.
    pub cloud: crate::cloud::Settings,
    /// Group whose members may use the control API (name or number);
    /// `None`: `blockd` if that group exists.
    pub api_group: Option<String>,
    /// Memory-pressure protections, as applied before any thread started
    /// (see [`crate::host`]); logged once the daemon has started, so that a
    /// start that fails says why and nothing else.
    pub protections: crate::host::Protections,
    /// Serve `/metrics` over HTTP here too (it is always on the API).
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token `--metrics-listen` requires, if any.
    pub metrics_token: Option<blockd_api::Secret>,
}

/// The default state directory: `/var/lib/blockd` for root, else
/// `$XDG_STATE_HOME/blockd` (or `~/.local/state/blockd`).
pub fn default_state_dir() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/blockd");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("blockd");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/state/blockd")
}

/// What the running daemon shares with its API handlers.
#[derive(Debug)]
pub struct Daemon {
    /// The volumes.
    pub store: Arc<Store>,
    /// Local snapshots.
    pub snapshots: Arc<Snapshots>,
    /// Cloud snapshots, locations and tasks.
    pub cloud: Arc<Cloud>,
    /// Catalog mounts (`blockctl mount`).
    pub mounts: Arc<Mounts>,
    /// Who uses what (see [`crate::claims`]).
    pub claims: Arc<Claims>,
    /// Kernel attachments (`blockctl volume attach`).
    pub attachments: Arc<crate::attach::Attachments>,
    /// What NBD connections share (kernel attachments are served with it).
    pub nbd: NbdContext,
    config: Config,
    engine: &'static str,
    nbd_tls: Option<String>,
}

impl Daemon {
    /// Facts for `GET /v1/info`.
    pub fn info(&self) -> DaemonInfo {
        DaemonInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            state_dir: self.config.state_dir.display().to_string(),
            nbd_socket: self.config.nbd_socket.display().to_string(),
            nbd_listen: self.config.nbd_listen.map(|a| a.to_string()),
            nbd_tls: self.nbd_tls.clone(),
            io_engine: self.engine.into(),
            protections: self.config.protections.names(),
        }
    }
}

/// The TLS side of `--nbd-listen`: the certificates (loaded now, so a
/// bad file stops the start with its name) and how `blockctl info` shows it.
fn nbd_tls(config: &Config) -> anyhow::Result<(Option<Arc<TlsServer>>, Option<String>)> {
    use crate::nbd::negotiate::Tls;
    let Some(addr) = config.nbd_listen else {
        return Ok((None, None));
    };
    let mode = crate::nbd::tls::resolve(
        addr,
        config.nbd_tls,
        config.nbd_tls_certificates.is_some(),
        config.nbd_tls_verify_peer,
    )
    .map_err(anyhow::Error::msg)?;
    let mut shown = match mode {
        Tls::Unavailable | Tls::Active => "off",
        Tls::Offered => "offered",
        Tls::Required => "required",
    }
    .to_string();
    let server = match (&config.nbd_tls_certificates, mode) {
        (Some(dir), Tls::Offered | Tls::Required) => {
            let server =
                TlsServer::load(dir, config.nbd_tls_verify_peer, mode).with_context(|| {
                    format!("loading the NBD TLS certificates in {}", dir.display())
                })?;
            if server.verify_peer() {
                shown.push_str("+client-certificates");
            }
            Some(Arc::new(server))
        }
        _ => {
            tracing::warn!(
                %addr,
                "NBD on TCP without TLS: anyone who can reach this address (on loopback, every \
                 local user) can read and write every volume; see --nbd-tls-certificates"
            );
            None
        }
    };
    Ok((server, Some(shown)))
}

/// A socket path this daemon owns while it runs: `PATH.lock` is held
/// (flock) for the daemon's life, so a second daemon, whatever its state
/// directory, cannot take the path over.
struct BoundSocket {
    path: PathBuf,
    ino: u64,
    _lock: std::fs::File,
}

impl BoundSocket {
    /// Removes the socket, if it is still the one bound.
    fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a Unix socket at `path` (named by `flag` in messages). Only a
/// stale socket is replaced: one no blockd holds and nothing answers on.
/// Anything else there (a regular file, a directory, a live socket) is
/// refused, untouched.
fn bind_unix(
    path: &Path,
    flag: &str,
    mode: u32,
    group: Option<u32>,
) -> anyhow::Result<(UnixListener, BoundSocket)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {} (the lock of {flag})", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another blockd serves {} (it holds {}): stop it, or pass another {flag}",
            path.display(),
            lock_path.display()
        )
    })?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "{} is a socket another program answers on: stop it, or pass another {flag}",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket: blockd only replaces a stale socket; move it away, or pass another {flag}",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, None, Some(g))
            .with_context(|| format!("chgrp {g} {}", path.display()))?;
    }
    let ino = std::fs::symlink_metadata(path)
        .with_context(|| format!("checking {}", path.display()))?
        .ino();
    Ok((
        listener,
        BoundSocket {
            path: path.to_path_buf(),
            ino,
            _lock: lock,
        },
    ))
}

/// The control API's group: `name` (a group name or number) when given,
/// which must exist; else `blockd` when that group exists.
fn api_group(name: Option<&str>) -> anyhow::Result<(Option<u32>, String)> {
    let wanted = name.unwrap_or("blockd");
    if let Ok(gid) = wanted.parse::<u32>() {
        return Ok((Some(gid), wanted.to_string()));
    }
    match nix::unistd::Group::from_name(wanted) {
        Ok(Some(g)) => Ok((Some(g.gid.as_raw()), wanted.to_string())),
        Ok(None) if name.is_none() => Ok((None, wanted.to_string())),
        Ok(None) => anyhow::bail!(
            "--api-group {wanted}: no such group; create it (groupadd {wanted}) or name another"
        ),
        Err(e) => Err(e).with_context(|| format!("looking up group {wanted}")),
    }
}

/// Tells the service manager (systemd's `Type=notify`, through
/// `$NOTIFY_SOCKET`; nothing without it).
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// Start-up failures: state directory, lock, database, sockets.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything is created: a refused --nbd-listen leaves no trace.
    let (tcp_tls, nbd_tls) = nbd_tls(&config)?;
    // Before volumes and listeners open theirs.
    let descriptors = crate::host::raise_descriptor_limit();
    let dir = &config.state_dir;
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "state dir {} exists and is not a directory: pass --state-dir a directory (it is created if missing)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod state dir {}", dir.display()))?;
    let lock_path = dir.join("blockd.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another blockd is already using state dir {}: stop it or pass a different --state-dir",
            dir.display()
        )
    })?;

    let engine = Arc::new(Engine::new(config.io_engine).context("starting the I/O engine")?);
    let engine_name = engine.name();
    let store = Arc::new(
        Store::open(dir, engine, config.change_tracking).context("opening the volume store")?,
    );
    crate::host::check_descriptors(descriptors, config.nbd_max_connections, store.list().len());
    if !config.change_tracking {
        tracing::warn!("change tracking is off: every backup will read whole volumes");
    }
    let claims = Claims::new();
    let snapshots =
        Arc::new(Snapshots::open(dir, store.clone(), claims.clone()).context("loading snapshots")?);

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // A freeze interrupted between its hooks owes the host its post-exec
    // (an `fsfreeze -u`): run it first thing.
    let s = snapshots.clone();
    let held = snapshots.hold_freezes().await;
    tracker.spawn(async move { s.run_owed_post_exec(held).await });
    // Opened (and unfinished tasks resumed) before the sockets exist: a
    // client that can connect finds the daemon ready.
    let cloud = Cloud::open(
        dir,
        store.clone(),
        snapshots.clone(),
        claims.clone(),
        &config.cloud,
        shutdown.clone(),
        tracker.clone(),
    )
    .context("opening locations and tasks")?;
    let (group, group_name) = api_group(config.api_group.as_deref())?;
    let access = crate::api::access::Access {
        owner: rustix::process::geteuid().as_raw(),
        group,
        group_name,
    };
    let (api_listener, api_bound) = bind_unix(&config.api_socket, "--api-socket", 0o660, group)?;
    let (nbd_listener, nbd_bound) = bind_unix(&config.nbd_socket, "--nbd-socket", 0o660, group)?;
    let metrics_listener = bind_tcp(config.metrics_listen, "the metrics address").await?;
    let tcp_listener = bind_tcp(config.nbd_listen, "NBD TCP address").await?;

    let ctx = NbdContext {
        store: store.clone(),
        snapshots: snapshots.clone(),
        shutdown: shutdown.clone(),
        grace: config.shutdown_grace,
        connections: Arc::new(tokio::sync::Semaphore::new(config.nbd_max_connections)),
        memory: Arc::new(nbd::Memory::new(config.nbd_max_memory)),
    };
    let access = Arc::new(access);
    tracker.spawn(nbd::serve_unix(
        nbd_listener,
        ctx.clone(),
        tracker.clone(),
        access.clone(),
    ));
    // Attachments recorded by the previous run: their devices get sockets
    // again before the daemon says it is ready.
    let attachments = Arc::new(crate::attach::Attachments::new(dir));
    attachments.restore(&ctx).await;
    if let Some(l) = tcp_listener {
        tracker.spawn(nbd::serve_tcp(
            l,
            ctx.clone(),
            tcp_tls,
            tracker.clone(),
            config.nbd_max_connections,
        ));
    }

    let daemon = Arc::new(Daemon {
        store: store.clone(),
        snapshots,
        cloud,
        mounts: Arc::new(Mounts::new(dir, own_paths(dir, &config), claims.clone())),
        claims,
        attachments,
        nbd: ctx.clone(),
        config: config.clone(),
        engine: engine_name,
        nbd_tls,
    });
    let mounts = daemon.mounts.clone();
    if let Some(l) = metrics_listener {
        let app = crate::api::metrics_service(daemon.clone(), config.metrics_token.clone());
        let stop = shutdown.clone();
        tracker.spawn(async move {
            crate::api::serve::serve_tcp(l, app, crate::api::serve::Bounds::metrics(), stop).await;
        });
    }
    let snaps = daemon.snapshots.clone();
    let freezes = daemon.snapshots.clone();
    let api_task = tokio::spawn(crate::api::serve::serve_unix(
        api_listener,
        crate::api::service(daemon, access.clone()),
        crate::api::serve::Bounds::api(),
        access,
        shutdown.clone(),
    ));

    // Dirty maps of idle volumes settled on disk, so that a crash keeps
    // their tracking (see `volume::dirty_map`).
    let s = store.clone();
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(SETTLE_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {
                    let s = s.clone();
                    let idle = crate::volume::dirty_map::SETTLE_AFTER;
                    let _ = tokio::task::spawn_blocking(move || s.settle(idle)).await;
                }
            }
        }
    });

    // Copy-on-write data of held snapshots, synced at intervals rather
    // than with each FLUSH (see `snapshot::store`).
    let stop = shutdown.clone();
    let every = config.snapshot_sync;
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {
                    let snaps = snaps.clone();
                    let _ = tokio::task::spawn_blocking(move || snaps.sync()).await;
                }
            }
        }
    });

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    config.protections.log();
    tracing::info!(
        state_dir = %dir.display(),
        api = %config.api_socket.display(),
        nbd = %config.nbd_socket.display(),
        tcp = ?config.nbd_listen,
        metrics = ?config.metrics_listen,
        io_engine = engine_name,
        "blockd ready"
    );
    let status = format!(
        "serving {} volume(s) on {}",
        store.list().len(),
        config.nbd_socket.display()
    );
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    // WatchdogSec=: pinged from the runtime, so a wedged runtime is
    // restarted.
    if let Some(every) = sd_notify::watchdog_enabled() {
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => notify(&[sd_notify::NotifyState::Watchdog]),
                }
            }
        });
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining connections, syncing volumes"),
    ]);
    // Catalog mounts first, while their reads can still be answered.
    mounts.unmount_all().await;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    // A snapshot a request is taking finishes its pre-exec, freeze and
    // post-exec before the daemon goes, so an application frozen by the
    // pre-exec (`fsfreeze -f`) is thawed now, not at the next start; no
    // later one starts (the scheduler's runs were waited for above). Each
    // hook is bounded by its exec timeout, and systemd's stop timeout
    // bounds the whole (the owed post-exec then runs at the next start).
    let _no_more_freezes =
        match tokio::time::timeout(Duration::from_millis(100), freezes.hold_freezes()).await {
            Ok(held) => held,
            Err(_) => {
                tracing::info!("waiting for the hooks of a snapshot being taken before stopping");
                freezes.hold_freezes().await
            }
        };
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.sync_all()).await?;
    api_bound.remove();
    nbd_bound.remove();
    tracing::info!("blockd stopped cleanly");
    drop(lock);
    Ok(())
}

/// The paths a catalog mount must not hide: the state directory and the
/// directories holding the sockets.
fn own_paths(state_dir: &Path, config: &Config) -> Vec<(String, PathBuf)> {
    let mut own = vec![("state directory".to_string(), state_dir.to_path_buf())];
    for (what, socket) in [
        ("API socket", &config.api_socket),
        ("NBD socket", &config.nbd_socket),
    ] {
        own.push((what.to_string(), socket.clone()));
    }
    own
}

/// Binds `addr` when one is configured.
async fn bind_tcp(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {what} {addr}"))?,
        )),
        None => Ok(None),
    }
}
