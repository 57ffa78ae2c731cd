//! `blockd`: the daemon binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use blockd::config;
use blockd::config::{
    Cloud, Every, Fraction, FullEvery, Gc, Grace, Limit, Log, LogFilter, LogFormat, Metrics,
    MetricsAddr, Nbd, Period, Settings,
};
use blockd::daemon;
use blockd::volume::EngineKind;

/// Block-device backup gateway: serves volumes over NBD.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Settings come from the config file (/etc/blockd/blockd.toml, or --config), \
then the environment variables named above, then flags: each overrides the one before. \
blockd.toml.example in the source tree describes every key; --print-config shows the \
effective settings. Logging: --log-filter or BLOCKD_LOG take a tracing filter as RUST_LOG \
does (e.g. `info,blockd=debug`; default `info`)."
)]
struct Args {
    /// Config file [default: /etc/blockd/blockd.toml, when it exists]
    #[arg(long, env = "BLOCKD_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the effective settings (file, environment, flags, defaults;
    /// secrets redacted) as TOML and exit
    #[arg(long)]
    print_config: bool,
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
    /// --nbd-tls-verify-peer, offered on loopback when certificates are
    /// given [default: auto]
    #[arg(long, env = "BLOCKD_NBD_TLS", value_enum)]
    nbd_tls: Option<blockd::nbd::tls::TlsSetting>,
    /// Directory holding server-cert.pem and server-key.pem (and ca-cert.pem
    /// for --nbd-tls-verify-peer), the layout nbdkit and qemu use; reloaded
    /// when the files change
    #[arg(long, env = "BLOCKD_NBD_TLS_CERTIFICATES", value_name = "DIR")]
    nbd_tls_certificates: Option<PathBuf>,
    /// Admit only TLS clients whose certificate ca-cert.pem signed
    #[arg(long, env = "BLOCKD_NBD_TLS_VERIFY_PEER")]
    nbd_tls_verify_peer: bool,
    /// Most NBD client connections, Unix socket and TCP together (TCP ones
    /// still in their handshake: half of them at most); one more is closed
    /// at once [default: 1024]
    #[arg(long, env = "BLOCKD_NBD_MAX_CONNECTIONS", value_name = "N")]
    nbd_max_connections: Option<blockd::config::MaxConnections>,
    /// Most memory NBD connections hold together for requests and for
    /// replies their clients have not read; past it, connections read no
    /// new request until some is freed [default: 1G]
    #[arg(long, env = "BLOCKD_NBD_MAX_MEMORY", value_name = "SIZE")]
    nbd_max_memory: Option<blockd::config::MaxMemory>,
    /// I/O engine [default: auto]
    #[arg(long, env = "BLOCKD_IO_ENGINE", value_enum)]
    io_engine: Option<EngineKind>,
    /// Do not track changed extents (backups then read whole volumes); for
    /// measuring what tracking costs
    #[arg(long)]
    no_change_tracking: bool,
    /// How long connections keep answering ESHUTDOWN after SIGTERM before
    /// closing: seconds, or a duration such as 500ms [default: 2s]
    #[arg(long, value_name = "DURATION")]
    shutdown_grace: Option<Grace>,
    /// How soon after a client's FLUSH (which syncs the volume) the
    /// copy-on-write data of held snapshots is synced too, and how often
    /// it is checked; copies no FLUSH asked for are synced within 30s. A
    /// host crash before reports the snapshot damaged, never wrong. At
    /// least 1s [default: 1s]
    #[arg(long, env = "BLOCKD_SNAPSHOT_SYNC", value_name = "DURATION")]
    snapshot_sync: Option<Period>,
    /// Every Nth backup of a volume reads it whole (pxctl's rule: every 7th)
    /// [default: 7]
    #[arg(long, env = "BLOCKD_FULL_EVERY", value_name = "N")]
    full_every: Option<FullEvery>,
    /// Bytes per second for the background fetches of lazy restores, e.g.
    /// 50M, or `unlimited` (reads by clients are never held back)
    /// [default: unlimited]
    #[arg(long, env = "BLOCKD_HYDRATE_LIMIT", value_name = "SIZE")]
    hydrate_limit: Option<Limit>,
    /// Fail this fraction (0 to 1) of object-store requests on purpose, to prove
    /// backups and restores survive a flaky provider; for testing only
    #[arg(long, env = "BLOCKD_FAULT_INJECT", value_name = "RATE")]
    fault_inject: Option<Fraction>,
    /// Garbage collection deletes what it condemned only after this long,
    /// e.g. 24h (`blockctl repo gc`) [default: 24h]
    #[arg(long, env = "BLOCKD_GC_GRACE", value_name = "DURATION")]
    gc_grace: Option<Period>,
    /// Run `repo gc` on every location this often, e.g. 24h; `off` to
    /// collect only when asked [default: 24h]
    #[arg(long, env = "BLOCKD_GC_EVERY", value_name = "DURATION|off")]
    gc_every: Option<Every>,
    /// A backup that has run this long may no longer commit (garbage
    /// collection stops waiting for it), e.g. 20h [default: 20h]
    #[arg(long, env = "BLOCKD_BACKUP_DEADLINE", value_name = "DURATION")]
    backup_deadline: Option<Period>,
    /// A backup or restore whose location stops answering (or answers
    /// with errors) waits and tries again from its last checkpoint, with
    /// growing pauses, for this long before it fails, e.g. 30m
    /// [default: 30m]
    #[arg(long, env = "BLOCKD_OUTAGE_WAIT", value_name = "DURATION")]
    outage_wait: Option<Period>,
    /// Unused space garbage collection tolerates inside packs still in use
    /// before it copies their live records into new packs: a percentage
    /// (5%: at most 5% of those bytes dead) or `unlimited` (never repack)
    /// [default: 5%]
    #[arg(long, env = "BLOCKD_GC_MAX_UNUSED", value_name = "PERCENT|unlimited")]
    gc_max_unused: Option<blockd_api::MaxUnused>,
    /// What to log: a tracing filter as RUST_LOG takes it, e.g. info or
    /// warn,blockd=debug [default: info]
    #[arg(long, env = "BLOCKD_LOG", value_name = "FILTER")]
    log_filter: Option<LogFilter>,
    /// Log lines as text (no colour unless stderr is a terminal) or as
    /// one JSON object each [default: text]
    #[arg(long, env = "BLOCKD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Also serve Prometheus metrics over HTTP at ADDR:PORT, or at a port
    /// of 127.0.0.1 (they are always at /metrics on the API socket)
    /// [default: off]
    #[arg(long, env = "BLOCKD_METRICS_LISTEN", value_name = "ADDR:PORT|PORT")]
    metrics_listen: Option<MetricsAddr>,
    /// The token --metrics-listen requires (`Authorization: Bearer`); from
    /// the environment or the config file only, never a flag
    #[arg(skip = std::env::var("BLOCKD_METRICS_TOKEN").ok().filter(|t| !t.is_empty()).map(blockd_api::Secret::from))]
    metrics_token: Option<blockd_api::Secret>,
}

impl Args {
    /// What the environment and flags set, as settings.
    fn settings(&self) -> Settings {
        Settings {
            state_dir: self.state_dir.clone(),
            api_socket: self.api_socket.clone(),
            nbd_socket: self.nbd_socket.clone(),
            api_group: self.api_group.clone(),
            mlock: self.no_mlock.then_some(false),
            io_engine: self.io_engine,
            change_tracking: self.no_change_tracking.then_some(false),
            shutdown_grace: self.shutdown_grace,
            snapshot_sync: self.snapshot_sync,
            nbd: Nbd {
                listen: self.nbd_listen,
                tls: self.nbd_tls,
                tls_certificates: self.nbd_tls_certificates.clone(),
                tls_verify_peer: self.nbd_tls_verify_peer.then_some(true),
                max_connections: self.nbd_max_connections,
                max_memory: self.nbd_max_memory,
            },
            cloud: Cloud {
                full_every: self.full_every,
                hydrate_limit: self.hydrate_limit,
                backup_deadline: self.backup_deadline,
                outage_wait: self.outage_wait,
                fault_inject: self.fault_inject,
            },
            gc: Gc {
                grace: self.gc_grace,
                every: self.gc_every,
                max_unused: self.gc_max_unused,
            },
            log: Log {
                filter: self.log_filter.clone(),
                format: self.log_format,
            },
            metrics: Metrics {
                listen: self.metrics_listen,
                token: self.metrics_token.clone(),
            },
        }
    }
}

/// Writes `line` to stderr; a stderr that cannot be written (a full file
/// system) does not turn the exit status into a panic's.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    let file = match Settings::load(args.config.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            say(format_args!("error: {e}"));
            return ExitCode::from(2);
        }
    };
    let settings = args.settings().over(file).with_defaults();
    if args.print_config {
        print!("{}", settings.print());
        return ExitCode::SUCCESS;
    }
    init_logging(&settings.log);
    match run(&settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format_args!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (journald under systemd), as text or JSON. A line that
/// cannot be written (stderr on a full file system) is dropped: reporting
/// that on stderr too would panic the thread that logged, a connection's
/// or a request's.
fn init_logging(log: &Log) {
    let filter = config::set(log.filter.as_ref(), "log.filter").0.as_str();
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match config::set(log.format, "log.format") {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn run(settings: &Settings) -> anyhow::Result<()> {
    // Everything blockd creates (volumes, snapshots, the state database,
    // repository objects in a local directory) is its own: 0600 files in
    // 0700 directories. Sockets are then opened up explicitly.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Before any thread exists: every thread inherits the flags.
    let protections = blockd::host::Protections::apply(config::set(settings.mlock, "mlock"));
    let config = settings.daemon_config(protections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockd")
        .build()?;
    runtime.block_on(daemon::run(config))
}
