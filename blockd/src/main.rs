//! `blockd`: the daemon binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use blockd::daemon::{self, Config};
use blockd::volume::EngineKind;

/// Block-device backup gateway: serves volumes over NBD.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Every setting is read once at start, from its flag or else its environment \
variable. Logging: BLOCKD_LOG (a tracing filter, e.g. `info,blockd=debug`; default `info`)."
)]
struct Args {
    /// State directory [default: /var/lib/blockd for root, else $XDG_STATE_HOME/blockd]
    #[arg(long, env = "BLOCKD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Control API socket [default: STATE_DIR/api.sock]
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// NBD Unix socket [default: STATE_DIR/nbd.sock]
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Group whose members may use the control API and the NBD socket
    /// (a name or number) [default: blockd, when that group exists]
    #[arg(long, env = "BLOCKD_API_GROUP", value_name = "GROUP")]
    api_group: Option<String>,
    /// Do not lock the daemon's memory (mlockall); see kernel-notes/nbd.md
    #[arg(long, env = "BLOCKD_NO_MLOCK")]
    no_mlock: bool,
    /// Also serve NBD on TCP at ADDR:PORT (off by default). TLS is required
    /// there unless ADDR is loopback; see --nbd-tls
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_listen: Option<SocketAddr>,
    /// TLS on --nbd-listen: auto = required off loopback and with
    /// --nbd-tls-verify-peer, offered on loopback when certificates are given
    #[arg(long, env = "BLOCKD_NBD_TLS", value_enum, default_value = "auto")]
    nbd_tls: blockd::nbd::tls::TlsSetting,
    /// Directory holding server-cert.pem and server-key.pem (and ca-cert.pem
    /// for --nbd-tls-verify-peer), the layout nbdkit and qemu use; reloaded
    /// when the files change
    #[arg(long, env = "BLOCKD_NBD_TLS_CERTIFICATES", value_name = "DIR")]
    nbd_tls_certificates: Option<PathBuf>,
    /// Admit only TLS clients whose certificate ca-cert.pem signed
    #[arg(long, env = "BLOCKD_NBD_TLS_VERIFY_PEER")]
    nbd_tls_verify_peer: bool,
    /// I/O engine
    #[arg(long, env = "BLOCKD_IO_ENGINE", value_enum, default_value = "auto")]
    io_engine: EngineKind,
    /// Do not track changed extents (backups then read whole volumes); for
    /// measuring what tracking costs
    #[arg(long)]
    no_change_tracking: bool,
    /// Seconds connections keep answering ESHUTDOWN after SIGTERM before closing
    #[arg(long, default_value = "2")]
    shutdown_grace: f64,
    /// Every Nth backup of a volume reads it whole (pxctl's rule: every 7th)
    #[arg(long, env = "BLOCKD_FULL_EVERY", default_value_t = blockd::cloud::DEFAULT_FULL_EVERY,
          value_parser = clap::value_parser!(u32).range(1..))]
    full_every: u32,
    /// Bytes per second for the background fetches of lazy restores, e.g. 50M
    /// (reads by clients are never held back) [default: unlimited]
    #[arg(long, env = "BLOCKD_HYDRATE_LIMIT", value_name = "SIZE", value_parser = size_arg)]
    hydrate_limit: Option<u64>,
    /// Fail this fraction (0 to 1) of object-store requests on purpose, to prove
    /// backups and restores survive a flaky provider; for testing only
    #[arg(long, env = "BLOCKD_FAULT_INJECT", value_name = "RATE", value_parser = rate_arg)]
    fault_inject: Option<f64>,
    /// Garbage collection deletes what it condemned only after this long,
    /// e.g. 24h (`blockctl repo gc`)
    #[arg(long, env = "BLOCKD_GC_GRACE", value_name = "DURATION", default_value = "24h",
          value_parser = duration_arg)]
    gc_grace: Duration,
    /// Run `repo gc` on every location this often, e.g. 24h; `off` to
    /// collect only when asked
    #[arg(long, env = "BLOCKD_GC_EVERY", value_name = "DURATION|off", default_value = "24h",
          value_parser = every_arg)]
    gc_every: Every,
    /// A backup that has run this long may no longer commit (garbage
    /// collection stops waiting for it), e.g. 20h
    #[arg(long, env = "BLOCKD_BACKUP_DEADLINE", value_name = "DURATION", default_value = "20h",
          value_parser = duration_arg)]
    backup_deadline: Duration,
    /// Unused space garbage collection tolerates inside packs still in use
    /// before it copies their live records into new packs: a percentage
    /// (5%: at most 5% of those bytes dead) or `unlimited` (never repack)
    #[arg(
        long,
        env = "BLOCKD_GC_MAX_UNUSED",
        value_name = "PERCENT|unlimited",
        default_value = "5%"
    )]
    gc_max_unused: blockd_api::MaxUnused,
}

/// A period, or `off`.
#[derive(Debug, Clone, Copy)]
struct Every(Option<Duration>);

fn every_arg(s: &str) -> Result<Every, String> {
    if s == "off" {
        return Ok(Every(None));
    }
    duration_arg(s).map(|d| Every(Some(d)))
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}): use e.g. 30s, 20h or 7days"))?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn size_arg(s: &str) -> Result<u64, String> {
    match blockd_api::parse_size(s) {
        Ok(0) => Err("must be more than 0".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn rate_arg(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLOCKD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    // Everything blockd creates (volumes, snapshots, the state database,
    // repository objects in a local directory) is its own: 0600 files in
    // 0700 directories. Sockets are then opened up explicitly.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Before any thread exists: every thread inherits the flags.
    let protections = blockd::host::Protections::apply(!args.no_mlock);
    protections.log();
    if !(0.0..=3600.0).contains(&args.shutdown_grace) {
        anyhow::bail!("--shutdown-grace must be between 0 and 3600 seconds");
    }
    let state_dir = args.state_dir.unwrap_or_else(daemon::default_state_dir);
    let config = Config {
        api_socket: args
            .api_socket
            .unwrap_or_else(|| state_dir.join("api.sock")),
        nbd_socket: args
            .nbd_socket
            .unwrap_or_else(|| state_dir.join("nbd.sock")),
        nbd_listen: args.nbd_listen,
        nbd_tls: args.nbd_tls,
        nbd_tls_certificates: args.nbd_tls_certificates,
        nbd_tls_verify_peer: args.nbd_tls_verify_peer,
        io_engine: args.io_engine,
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace),
        change_tracking: !args.no_change_tracking,
        cloud: blockd::cloud::Settings {
            full_every: args.full_every,
            hydrate_limit: args.hydrate_limit,
            fault_rate: args.fault_inject,
            gc_grace: args.gc_grace,
            backup_deadline: args.backup_deadline,
            gc_every: args.gc_every.0,
            gc_max_unused: args.gc_max_unused,
        },
        api_group: args.api_group,
        protections: protections.names(),
        state_dir,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockd")
        .build()?;
    runtime.block_on(daemon::run(config))
}
