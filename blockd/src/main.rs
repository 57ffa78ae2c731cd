//! `blockd`: the daemon binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use blockd::daemon::{self, Config};
use blockd::volume::EngineKind;

/// Block-device backup gateway: serves volumes over NBD.
#[derive(Debug, Parser)]
#[command(version, about)]
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
    /// Also serve NBD on TCP at ADDR:PORT (off by default)
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_listen: Option<SocketAddr>,
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
        io_engine: args.io_engine,
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace),
        change_tracking: !args.no_change_tracking,
        state_dir,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockd")
        .build()?;
    runtime.block_on(daemon::run(config))
}
