//! The daemon's settings: one tree, read from a TOML file, the
//! environment and the command line, each overriding the one before.
//!
//! The file is `/etc/blockd/blockd.toml` when it exists, or the one
//! `--config PATH` (or `BLOCKD_CONFIG`) names, which must exist. Its keys
//! are those of [`Settings`], with unknown keys refused; every key is
//! described in `blockd/blockd.toml.example`. Environment variables
//! (`BLOCKD_GC_GRACE`, ...) and flags (`--gc-grace`) are parsed by clap in
//! `main.rs` into a [`Settings`] of their own, which is laid over the
//! file's with [`Settings::over`]; [`Settings::with_defaults`] fills in
//! what none of them set. `blockd --print-config` prints the result, with
//! secrets replaced by [`REDACTED`].
//!
//! Merging works on the TOML form: an unset key is absent from it, so
//! one generic deep merge serves every key, and a new key needs no merge
//! code.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::nbd::tls::TlsSetting;
use crate::volume::EngineKind;

/// The file read when `--config` is not given (skipped when absent).
pub const DEFAULT_PATH: &str = "/etc/blockd/blockd.toml";

/// What `--print-config` shows instead of a secret.
pub const REDACTED: &str = "<redacted>";

/// Every setting. `None` is "not set here": a lower layer's value, or the
/// default, applies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// State directory [default: /var/lib/blockd for root, else
    /// $XDG_STATE_HOME/blockd].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Control API socket [default: STATE_DIR/api.sock].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// NBD Unix socket [default: STATE_DIR/nbd.sock].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_socket: Option<PathBuf>,
    /// Group allowed on the sockets (name or number) [default: `blockd`,
    /// when that group exists].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    /// Lock the daemon's memory (mlockall) [default: true].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlock: Option<bool>,
    /// I/O engine: auto, uring, threads [default: auto].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<EngineKind>,
    /// Track changed extents [default: true].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_tracking: Option<bool>,
    /// How long connections answer ESHUTDOWN after SIGTERM [default: 2s].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<Grace>,
    /// How soon after a FLUSH the copy-on-write data of held snapshots is
    /// synced; a host crash before reports the snapshot damaged
    /// [default: 1s].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_sync: Option<Period>,
    /// NBD over TCP.
    #[serde(default, skip_serializing_if = "Nbd::is_empty")]
    pub nbd: Nbd,
    /// Backups and restores.
    #[serde(default, skip_serializing_if = "Cloud::is_empty")]
    pub cloud: Cloud,
    /// Garbage collection of repositories.
    #[serde(default, skip_serializing_if = "Gc::is_empty")]
    pub gc: Gc,
    /// Logging.
    #[serde(default, skip_serializing_if = "Log::is_empty")]
    pub log: Log,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Metrics::is_empty")]
    pub metrics: Metrics,
}

/// `[metrics]`: Prometheus metrics (always at `/metrics` on the API
/// socket).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Also serve `/metrics` over HTTP at ADDR:PORT (a bare port means
    /// 127.0.0.1) [default: off].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<MetricsAddr>,
    /// A bearer token scrapers must send on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<blockd_api::Secret>,
}

/// `ADDR:PORT`, or a port alone for loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub SocketAddr);

impl std::str::FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(port) = s.parse::<u16>() {
            return Ok(Self(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse().map(Self).map_err(|_| {
            format!("{s:?} is not an address: give ADDR:PORT (e.g. 127.0.0.1:9750) or a port")
        })
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `[nbd]`: NBD over TCP, and client connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nbd {
    /// Also serve NBD on TCP at ADDR:PORT [default: off].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// TLS on `listen`: auto, off, on, require [default: auto].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSetting>,
    /// Directory of server-cert.pem, server-key.pem (and ca-cert.pem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_certificates: Option<PathBuf>,
    /// Admit only clients whose certificate ca-cert.pem signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_verify_peer: Option<bool>,
    /// Most client connections, Unix socket and TCP together (TCP ones
    /// still in their handshake: half of them at most) [default: 1024].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<MaxConnections>,
    /// Most memory all client connections together may hold for requests
    /// and replies not yet written [default: 1G].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<MaxMemory>,
}

/// `[cloud]`: backups and restores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cloud {
    /// Every Nth backup of a volume reads it whole [default: 7].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_every: Option<FullEvery>,
    /// Bytes per second for lazy restores' background fetches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hydrate_limit: Option<Limit>,
    /// A backup running longer may not commit [default: 20h].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_deadline: Option<Period>,
    /// A backup or restore whose location keeps failing waits and tries
    /// again from its last checkpoint for this long before it fails
    /// [default: 30m].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outage_wait: Option<Period>,
    /// Fail this fraction of object-store requests on purpose (testing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_inject: Option<Fraction>,
}

/// `[gc]`: garbage collection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gc {
    /// Condemned objects are deleted only after this long [default: 24h].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace: Option<Period>,
    /// Collect every location this often, or `off` [default: 24h].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub every: Option<Every>,
    /// Dead space tolerated in packs in use: `5%` or `unlimited`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unused: Option<blockd_api::MaxUnused>,
}

/// `[log]`: logging.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// A tracing filter, as RUST_LOG takes it: `info`, `info,blockd=debug`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<LogFilter>,
    /// `text` (for people and journald) or `json` (one object a line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-11-23T10:00:00Z  INFO blockd: message key=value`, without
    /// colour unless stderr is a terminal.
    Text,
    /// One JSON object a line.
    Json,
}

/// `is_empty` of the sections: all unset (left out of the TOML form).
macro_rules! sections {
    ($($t:ty),*) => {$(
        impl $t {
            fn is_empty(&self) -> bool {
                *self == Self::default()
            }
        }
    )*};
}

sections!(Nbd, Cloud, Gc, Log, Metrics);

impl Settings {
    /// Reads a settings file. `path` is `None` for the default path, which
    /// may be absent (then nothing is set); a path given must exist.
    ///
    /// # Errors
    /// An unreadable file, or one with a bad key or value: the message
    /// names the file, the line and what is allowed.
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        let (path, must_exist) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Self::default())
            }
            Err(e) => {
                return Err(format!(
                    "cannot read the config file {}: {e}",
                    path.display()
                ))
            }
        };
        Self::parse(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses settings from TOML text.
    ///
    /// # Errors
    /// A bad key or value, with the line and what is allowed.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// These settings laid over `lower`: what is set here wins, what is
    /// not comes from `lower`.
    #[must_use]
    pub fn over(self, lower: Self) -> Self {
        let mut merged = table(&lower);
        merge(&mut merged, table(&self));
        // Both sides came from valid settings: so does their union.
        merged
            .try_into()
            .unwrap_or_else(|e| unreachable!("merged settings do not parse: {e}"))
    }

    /// The built-in defaults of every setting that has one.
    pub fn defaults() -> Self {
        Self {
            state_dir: Some(crate::daemon::default_state_dir()),
            api_socket: None,
            nbd_socket: None,
            api_group: None,
            mlock: Some(true),
            io_engine: Some(EngineKind::Auto),
            change_tracking: Some(true),
            shutdown_grace: Some(Grace(Duration::from_secs(2))),
            snapshot_sync: Some(Period(crate::snapshot::store::SYNC_EVERY)),
            nbd: Nbd {
                listen: None,
                tls: Some(TlsSetting::Auto),
                tls_certificates: None,
                tls_verify_peer: Some(false),
                max_connections: Some(MaxConnections(crate::nbd::MAX_CONNECTIONS)),
                max_memory: Some(MaxMemory(crate::nbd::MAX_MEMORY)),
            },
            cloud: Cloud {
                full_every: Some(FullEvery(crate::cloud::DEFAULT_FULL_EVERY)),
                hydrate_limit: Some(Limit(None)),
                backup_deadline: Some(Period(Duration::from_secs(20 * 3600))),
                outage_wait: Some(Period(crate::cloud::DEFAULT_OUTAGE_WAIT)),
                fault_inject: None,
            },
            gc: Gc {
                grace: Some(Period(Duration::from_secs(24 * 3600))),
                every: Some(Every(Some(Duration::from_secs(24 * 3600)))),
                max_unused: Some(blockd_api::MaxUnused::default()),
            },
            log: Log {
                filter: Some(LogFilter("info".into())),
                format: Some(LogFormat::Text),
            },
            metrics: Metrics::default(),
        }
    }

    /// These settings with the defaults under them, and the socket paths
    /// that follow from the state directory.
    #[must_use]
    pub fn with_defaults(self) -> Self {
        let mut s = self.over(Self::defaults());
        let dir = s.state_dir.clone().unwrap_or_default();
        s.api_socket.get_or_insert_with(|| dir.join("api.sock"));
        s.nbd_socket.get_or_insert_with(|| dir.join("nbd.sock"));
        s
    }

    /// The effective settings as `--print-config` shows them: TOML, with
    /// secrets replaced by [`REDACTED`].
    pub fn print(&self) -> String {
        let mut shown = self.clone();
        if shown.metrics.token.is_some() {
            shown.metrics.token = Some(blockd_api::Secret::from(REDACTED.to_string()));
        }
        let mut text = String::from(
            "# blockd's effective settings: the config file, then the environment,\n\
             # then flags, over the defaults. Settings left unset are not shown.\n",
        );
        text.push_str(&toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# {e}\n")));
        text
    }

    /// The daemon's configuration: these settings over
    /// [`Settings::defaults`], which alone hold the default values.
    #[must_use]
    pub fn daemon_config(&self, protections: crate::host::Protections) -> crate::daemon::Config {
        let s = self.clone().with_defaults();
        crate::daemon::Config {
            api_socket: set(s.api_socket, "api_socket"),
            nbd_socket: set(s.nbd_socket, "nbd_socket"),
            nbd_listen: s.nbd.listen,
            nbd_tls: set(s.nbd.tls, "nbd.tls"),
            nbd_tls_certificates: s.nbd.tls_certificates,
            nbd_tls_verify_peer: set(s.nbd.tls_verify_peer, "nbd.tls_verify_peer"),
            nbd_max_connections: set(s.nbd.max_connections, "nbd.max_connections").0,
            nbd_max_memory: set(s.nbd.max_memory, "nbd.max_memory").0,
            io_engine: set(s.io_engine, "io_engine"),
            shutdown_grace: set(s.shutdown_grace, "shutdown_grace").0,
            snapshot_sync: set(s.snapshot_sync, "snapshot_sync").0,
            change_tracking: set(s.change_tracking, "change_tracking"),
            cloud: crate::cloud::Settings {
                full_every: set(s.cloud.full_every, "cloud.full_every").0,
                hydrate_limit: set(s.cloud.hydrate_limit, "cloud.hydrate_limit").0,
                fault_rate: s.cloud.fault_inject.map(|f| f.0).filter(|r| *r > 0.0),
                gc_grace: set(s.gc.grace, "gc.grace").0,
                backup_deadline: set(s.cloud.backup_deadline, "cloud.backup_deadline").0,
                outage_wait: set(s.cloud.outage_wait, "cloud.outage_wait").0,
                gc_every: set(s.gc.every, "gc.every").0,
                gc_max_unused: set(s.gc.max_unused, "gc.max_unused"),
            },
            api_group: s.api_group,
            protections,
            metrics_listen: s.metrics.listen.map(|a| a.0),
            metrics_token: s.metrics.token,
            state_dir: set(s.state_dir, "state_dir"),
        }
    }
}

/// A setting that [`Settings::defaults`] (and so `with_defaults`) always
/// fills.
pub fn set<T>(value: Option<T>, key: &str) -> T {
    value.unwrap_or_else(|| unreachable!("setting {key} has no default"))
}

fn table(s: &Settings) -> toml::Table {
    toml::Table::try_from(s).unwrap_or_else(|e| unreachable!("settings do not serialize: {e}"))
}

/// Lays `upper` over `lower`, tables key by key.
fn merge(lower: &mut toml::Table, upper: toml::Table) {
    for (k, v) in upper {
        match (lower.get_mut(&k), v) {
            (Some(toml::Value::Table(l)), toml::Value::Table(u)) => merge(l, u),
            (_, v) => {
                lower.insert(k, v);
            }
        }
    }
}

/// A period: `30s`, `20h`, `7days` (at least one second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(pub Duration);

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not a duration ({e}): use e.g. 30s, 20h or 7days"))?;
        if d < Duration::from_secs(1) {
            return Err(format!("{s:?} is too short: give at least 1s"));
        }
        Ok(Self(d))
    }
}

impl fmt::Display for Period {
    /// In the largest of hours, minutes and seconds that is exact (`24h`,
    /// `90m`), as people write them in a config file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() != 0 || d.is_zero() {
            return humantime::format_duration(d).fmt(f);
        }
        let s = d.as_secs();
        match (s % 3600, s % 60) {
            (0, _) => write!(f, "{}h", s / 3600),
            (_, 0) => write!(f, "{}m", s / 60),
            _ => write!(f, "{s}s"),
        }
    }
}

/// The shutdown grace: seconds (as `--shutdown-grace` always took), or a
/// duration; 0 to 1h, in the config file as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace(pub Duration);

impl std::str::FromStr for Grace {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let d = match s.parse::<f64>() {
            Ok(secs) if (0.0..=3600.0).contains(&secs) => Duration::from_secs_f64(secs),
            Ok(_) => return Err("must be between 0 and 3600 seconds".into()),
            Err(_) => humantime::parse_duration(s)
                .map_err(|e| format!("{s:?} is not a duration ({e}): use e.g. 2s or 500ms"))?,
        };
        if d > Duration::from_secs(3600) {
            return Err(format!("{s:?} is too long: give at most 1h"));
        }
        Ok(Self(d))
    }
}

impl fmt::Display for Grace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            d if d.subsec_nanos() != 0 || d.is_zero() => humantime::format_duration(d).fmt(f),
            d => Period(d).fmt(f),
        }
    }
}

/// A period, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every(pub Option<Duration>);

impl std::str::FromStr for Every {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self(None));
        }
        s.parse::<Period>()
            .map(|p| Self(Some(p.0)))
            .map_err(|e| format!("{e}, or `off`"))
    }
}

impl fmt::Display for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => Period(d).fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// A byte rate or size limit (`50M`), or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<u64>);

impl std::str::FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "unlimited" {
            return Ok(Self(None));
        }
        match blockd_api::parse_size(s) {
            Ok(0) => Err(format!("{s:?} must be more than 0, or `unlimited`")),
            Ok(n) => Ok(Self(Some(n))),
            Err(e) => Err(format!("{e}, or `unlimited`")),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => n.fmt(f),
            None => f.write_str("unlimited"),
        }
    }
}

/// A fraction from 0 to 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fraction(pub f64);

impl std::str::FromStr for Fraction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(Self(r)),
            _ => Err(format!("{s:?} is not a fraction between 0 and 1")),
        }
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Most NBD client connections: 1 to 65536.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxConnections(pub usize);

impl std::str::FromStr for MaxConnections {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<usize>() {
            Ok(n) if (1..=65536).contains(&n) => Ok(Self(n)),
            _ => Err(format!(
                "{s:?} is not a number of connections from 1 to 65536 (each takes about 1.3 MiB and three descriptors)"
            )),
        }
    }
}

impl fmt::Display for MaxConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Most memory NBD connections hold together: at least 64 MiB (one
/// request of the largest payload, 32 MiB, and its reply must fit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxMemory(pub u64);

impl std::str::FromStr for MaxMemory {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match blockd_api::parse_size(s) {
            Ok(n) if n >= crate::nbd::MIN_MEMORY => Ok(Self(n)),
            Ok(_) => Err(format!(
                "{s:?} is too small: NBD connections need at least 64M together (one request may carry 32 MiB)"
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl fmt::Display for MaxMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The largest suffix that writes it exactly, so that it reads back.
        for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{suffix}", self.0 >> shift);
            }
        }
        self.0.fmt(f)
    }
}

/// How often a volume's backup reads it whole: every Nth, N ≥ 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullEvery(pub u32);

impl std::str::FromStr for FullEvery {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(Self(n)),
            _ => Err(format!("{s:?} is not a whole number of backups from 1 up")),
        }
    }
}

impl fmt::Display for FullEvery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A tracing filter (`info`, `warn,blockd=debug`), checked when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(pub String);

impl std::str::FromStr for LogFilter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map(|_| Self(s.to_string()))
            .map_err(|e| {
                format!("{s:?} is not a log filter ({e}): use e.g. info, or warn,blockd=debug")
            })
    }
}

impl fmt::Display for LogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Serde through `FromStr`/`Display` for the value types above: a file
/// takes the same text a flag does (numbers also as TOML numbers).
macro_rules! text_serde {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = Text::deserialize(d)?;
                text.0.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

text_serde!(
    Period,
    Grace,
    Every,
    Limit,
    LogFilter,
    MetricsAddr,
    MaxMemory
);

/// Serde of numbers: written as TOML numbers, read from numbers or text.
macro_rules! number_serde {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = Text::deserialize(d)?;
                text.0.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

number_serde!(Fraction, FullEvery, MaxConnections);

/// A string, or a TOML number or boolean read as its text.
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_every_setting_the_daemon_reads() {
        let c = Settings::default().daemon_config(crate::host::Protections::default());
        assert_eq!(c.shutdown_grace, Duration::from_secs(2));
        assert_eq!(c.snapshot_sync, Duration::from_secs(1));
        assert_eq!(c.cloud.gc_grace, Duration::from_secs(24 * 3600));
        assert_eq!(c.cloud.gc_every, Some(Duration::from_secs(24 * 3600)));
        assert_eq!(c.cloud.backup_deadline, Duration::from_secs(20 * 3600));
        assert_eq!(c.cloud.outage_wait, Duration::from_secs(30 * 60));
        assert_eq!(c.cloud.full_every, crate::cloud::DEFAULT_FULL_EVERY);
        assert!(c.change_tracking);
        assert_eq!(c.api_socket, c.state_dir.join("api.sock"));
    }

    #[test]
    fn a_file_sets_what_it_names_and_refuses_what_it_does_not_know() {
        assert_eq!(Period(Duration::from_secs(86400)).to_string(), "24h");
        assert_eq!(Period(Duration::from_secs(5400)).to_string(), "90m");
        assert_eq!(Period(Duration::from_millis(1500)).to_string(), "1s 500ms");
        let s = Settings::parse(
            "io_engine = \"threads\"\n[gc]\ngrace = \"1h\"\nevery = \"off\"\n[cloud]\nhydrate_limit = \"50M\"\nfull_every = 3\n",
        )
        .unwrap();
        assert_eq!(s.io_engine, Some(EngineKind::Threads));
        assert_eq!(s.gc.grace, Some(Period(Duration::from_secs(3600))));
        assert_eq!(s.gc.every, Some(Every(None)));
        assert_eq!(s.cloud.hydrate_limit, Some(Limit(Some(50 << 20))));
        assert_eq!(s.cloud.full_every, Some(FullEvery(3)));
        assert_eq!(s.nbd, Nbd::default());

        // The shutdown grace takes the flag's values and limits.
        let s = Settings::parse("shutdown_grace = \"500ms\"\n").unwrap();
        assert_eq!(s.shutdown_grace, Some(Grace(Duration::from_millis(500))));
        assert_eq!(s.shutdown_grace.unwrap().to_string(), "500ms");
        assert_eq!(Grace(Duration::from_secs(2)).to_string(), "2s");
        let e = Settings::parse("shutdown_grace = \"2h\"\n").unwrap_err();
        assert!(e.contains("at most 1h"), "{e}");

        let e = Settings::parse("state_dir = \"/x\"\nnbd_lisen = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("unknown field `nbd_lisen`"), "{e}");
        assert!(e.contains("state_dir"), "the allowed keys are listed: {e}");
        let e = Settings::parse("[gc]\n\ngrace = \"soon\"\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("use e.g. 30s"), "{e}");
        let e = Settings::parse("io_engine = \"fast\"\n").unwrap_err();
        assert!(e.contains("`auto`, `uring`, `threads`"), "{e}");
        let s = Settings::parse("[nbd]\nmax_memory = \"1536M\"\n").unwrap();
        assert_eq!(s.nbd.max_memory, Some(MaxMemory(1536 << 20)));
        assert_eq!(MaxMemory(1536 << 20).to_string(), "1536M");
        assert_eq!(MaxMemory(2 << 30).to_string(), "2G");
        let e = Settings::parse("[nbd]\nmax_memory = \"1GB\"\n").unwrap_err();
        assert!(e.contains("write 1G or 1GiB"), "{e}");
        let e = Settings::parse("[cloud]\nfull_every = 0\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("from 1 up"), "{e}");
    }

    #[test]
    fn upper_layers_win_key_by_key() {
        let file =
            Settings::parse("mlock = false\n[gc]\ngrace = \"1h\"\nevery = \"2h\"\n").unwrap();
        let flags = Settings {
            gc: Gc {
                grace: Some(Period(Duration::from_secs(60))),
                ..Gc::default()
            },
            ..Settings::default()
        };
        let s = flags.over(file).with_defaults();
        assert_eq!(s.gc.grace, Some(Period(Duration::from_secs(60))));
        assert_eq!(s.gc.every, Some(Every(Some(Duration::from_secs(7200)))));
        assert_eq!(s.mlock, Some(false));
        assert_eq!(s.change_tracking, Some(true));
        let dir = s.state_dir.clone().unwrap();
        assert_eq!(s.api_socket, Some(dir.join("api.sock")));
        // What is printed reads back as the same settings.
        let printed = s.print();
        assert_eq!(Settings::parse(&printed).unwrap(), s, "{printed}");
    }

    /// The annotated example documents every key: each commented-out
    /// `key = value` line, uncommented, parses, and every key the daemon
    /// knows is there.
    #[test]
    fn the_example_file_names_every_key() {
        let example = include_str!("../blockd.toml.example");
        assert_eq!(Settings::parse(example).unwrap(), Settings::default());
        let uncommented: String = example
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let all = Settings::parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let keys = |s: &Settings| -> Vec<String> {
            let mut out = Vec::new();
            for (k, v) in table(s) {
                match v {
                    toml::Value::Table(t) => out.extend(t.keys().map(|k2| format!("{k}.{k2}"))),
                    _ => out.push(k),
                }
            }
            out.sort();
            out
        };
        let mut every = keys(&Settings::defaults().with_defaults());
        every.extend(
            [
                "api_group",
                "nbd.listen",
                "nbd.tls_certificates",
                "cloud.fault_inject",
                "metrics.listen",
                "metrics.token",
            ]
            .map(String::from),
        );
        every.sort();
        assert_eq!(keys(&all), every, "the example and the settings differ");
    }
}
