//! `blockctl`: the operator's command line for blockd.
//!
//! A thin client of the control API on `api.sock`; it never links the
//! engine. Every verb takes `-j/--json` for stable machine output; tables
//! otherwise. Errors print the daemon's message and exit non-zero.

mod client;
mod cloudsnap;
mod credentials;
mod failure;
mod mount;
mod output;
mod repo;
mod schedules;
mod wait;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use blockd_api::{human_size, CreateSnapshot, CreateVolume, ResizeVolume, Snapshot, Volume};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use client::Client;
use failure::Failure;
use output::{field, line, Output};

/// Control blockd: volumes, snapshots and cloud backups.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Control blockd: volumes, snapshots, cloud backups and restores",
    after_help = "Exit status: 0 done, 1 failed (the daemon refused or could not do it, or is not \
running), 2 the command line is wrong, 3 the outcome is unknown: a wait ended without learning the tasks' outcome (they may still end well: follow them with `cloudsnap status --name ID --wait`), or blockd went away before answering a request that changes something (it may have been carried out: look before asking again). With -j, stdout holds only the JSON answer and an error \
is one JSON object on stderr ({\"error\": ..., \"exit_status\": N}).\n\n\
Examples:\n  blockctl volume create db1 --size 10G\n  blockctl cs backup db1 --wait\n  \
blockctl -j cloudsnap list"
)]
struct Cli {
    /// blockd's control socket [env: BLOCKD_SOCKET] [default: STATE_DIR/api.sock of the
    /// default state dir]
    // The variable is read by `default_socket`, not by clap's `env`, which
    // would show a socket taken from it in the usage line of every usage
    // error.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Machine-readable JSON output
    #[arg(short, long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage volumes
    #[command(
        subcommand,
        after_help = "Examples:\n  blockctl volume create db1 --size 100G\n  blockctl volume list\n  blockctl volume resize db1 --size 200G"
    )]
    Volume(VolumeCmd),
    /// Local snapshots: consistent freeze points of volumes and groups
    #[command(
        subcommand,
        alias = "snap",
        after_help = "Examples:\n  blockctl snapshot create db1 --name before-upgrade\n  blockctl snapshot list db1\n  blockctl snapshot delete db1@before-upgrade"
    )]
    Snapshot(SnapshotCmd),
    /// Object-store credentials for cloud backups (a "location" in the API)
    #[command(
        subcommand,
        alias = "cred",
        after_help = "Examples:\n  blockctl credentials list\n  blockctl credentials create nas --provider local --path /srv/backups"
    )]
    Credentials(credentials::CredentialsCmd),
    /// Back up volumes to object storage and restore them
    #[command(
        subcommand,
        alias = "cs",
        after_help = "Examples:\n  blockctl cloudsnap backup db1 --wait\n  blockctl cloudsnap list --src db1\n  blockctl cloudsnap restore --snap db1 --volume db1-restored --wait"
    )]
    Cloudsnap(cloudsnap::CloudsnapCmd),
    /// Maintain a location's repository: check it, collect its garbage
    #[command(
        subcommand,
        after_help = "Examples:\n  blockctl repo check\n  blockctl repo gc --cred-id s3"
    )]
    Repo(repo::RepoCmd),
    /// Mount a location's cloud snapshots read-only at DIR (served by blockd)
    #[command(
        after_help = "Examples:\n  mkdir -p /mnt/snaps && blockctl mount /mnt/snaps\n  blockctl mount /mnt/snaps --cred-id s3 --cache-size 4G"
    )]
    Mount(mount::MountArgs),
    /// Unmount a catalog mount (also one left by a blockd that crashed)
    #[command(after_help = "Example:\n  blockctl umount /mnt/snaps")]
    Umount(mount::UmountArgs),
    /// Print a shell completion script
    #[command(
        after_help = "Examples:\n  blockctl completions bash > /etc/bash_completion.d/blockctl\n  blockctl completions zsh > /usr/local/share/zsh/site-functions/_blockctl\n  blockctl completions fish > ~/.config/fish/completions/blockctl.fish"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Write a man page for blockctl and each of its verbs into DIR
    #[command(
        after_help = "Example:\n  blockctl man /usr/local/share/man/man1 && man blockctl-cloudsnap-backup"
    )]
    Man {
        /// Directory to write blockctl.1, blockctl-volume.1, ... into
        dir: PathBuf,
    },
}

fn duration_arg(s: &str) -> Result<f64, String> {
    let secs = match s.parse::<f64>() {
        Ok(secs) if secs >= 0.0 => secs,
        _ => humantime::parse_duration(s)
            .map(|d| d.as_secs_f64())
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}): use e.g. 30s, 2m or a number of seconds")
            })?,
    };
    if secs < blockd_api::MIN_EXEC_TIMEOUT_SECS {
        return Err(format!(
            "{s:?} is too short: an exec hook timeout must be at least {}s",
            blockd_api::MIN_EXEC_TIMEOUT_SECS
        ));
    }
    Ok(secs)
}

/// `VOLUME@SNAPSHOT`.
fn snapshot_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once('@') {
        Some((v, n)) if !v.is_empty() && !n.is_empty() => Ok((v.to_string(), n.to_string())),
        _ => Err(format!(
            "{s:?} is not VOLUME@SNAPSHOT (see `blockctl snapshot list`)"
        )),
    }
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Freeze one volume, or several at one consistent point (a group)
    #[command(
        after_help = "Examples:\n  blockctl snapshot create db1 --name before-upgrade\n  blockctl snapshot create db-data db-log --name nightly --pre-exec 'fsfreeze -f /mnt/db' --post-exec 'fsfreeze -u /mnt/db'"
    )]
    Create {
        /// Volumes to freeze together
        #[arg(required = true)]
        volumes: Vec<String>,
        /// Snapshot name [default: UTC time and a random tag]
        #[arg(long, value_parser = name_arg("snapshot name"))]
        name: Option<String>,
        /// Command run before I/O is held, e.g. 'fsfreeze -f /mnt/data'; failure aborts
        #[arg(long)]
        pre_exec: Option<String>,
        /// Command run after I/O resumes, e.g. 'fsfreeze -u /mnt/data'; always runs
        #[arg(long)]
        post_exec: Option<String>,
        /// Timeout for each exec hook, e.g. 30s or 2m
        #[arg(long, value_parser = duration_arg, default_value = "30s")]
        exec_timeout: f64,
    },
    /// List snapshots
    #[command(alias = "ls")]
    #[command(after_help = "Examples:\n  blockctl snapshot list\n  blockctl -j snapshot list db1")]
    List {
        /// Only this volume's snapshots
        volume: Option<String>,
    },
    /// Show one snapshot
    #[command(after_help = "Example:\n  blockctl snapshot inspect db1@before-upgrade")]
    Inspect {
        /// VOLUME@SNAPSHOT
        #[arg(value_parser = snapshot_ref)]
        snapshot: (String, String),
    },
    /// Delete a snapshot; its changes go back to the volume's change set
    /// (refused while clients read it over NBD, unless --force)
    #[command(alias = "rm")]
    #[command(
        after_help = "Examples:\n  blockctl snapshot delete db1@before-upgrade\n  blockctl snapshot delete db1@before-upgrade --force   # also ends its NBD clients"
    )]
    Delete {
        /// VOLUME@SNAPSHOT
        #[arg(value_parser = snapshot_ref)]
        snapshot: (String, String),
        /// End the NBD connections reading it
        #[arg(long)]
        force: bool,
    },
}

/// A size as [`human_size`] writes it, with the bytes too unless it is a
/// whole number of its unit (1025M is not "1.0 GiB"): for answers to a
/// size the user gave.
fn exact_size(bytes: u64) -> String {
    let human = human_size(bytes);
    match blockd_api::parse_size(&human.replace(".0 ", "").replace(' ', "")) {
        Ok(b) if b == bytes => human,
        _ => format!("{human}, {bytes} bytes"),
    }
}

fn size_arg(s: &str) -> Result<u64, String> {
    blockd_api::parse_size(s).map_err(|e| e.to_string())
}

/// A name for something new (`what`: a volume, snapshot or credentials):
/// refused here, exit 2, where the daemon would refuse it anyway.
pub(crate) fn name_arg(
    what: &'static str,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        blockd_api::validate_name(s)
            .map(|()| s.to_string())
            .map_err(|e| e.to_string().replacen("volume name", what, 1))
    }
}

fn label_arg(s: &str) -> Result<(String, String), String> {
    blockd_api::parse_label(s)
}

/// The labels of repeated `--label KEY=VALUE` flags as a map; a key given
/// twice is refused (a second value would silently replace the first, and
/// in a selector it would match nothing).
fn label_map(labels: &[(String, String)]) -> Result<BTreeMap<String, String>, Failure> {
    let mut map = BTreeMap::new();
    for (k, v) in labels {
        if let Some(first) = map.insert(k.clone(), v.clone()) {
            return Err(Failure::Usage(format!(
                "label {k:?} is given twice ({k}={first} and {k}={v}): give each key once"
            )));
        }
    }
    Ok(map)
}

/// Refuses a volume named twice in one command (the daemon would too, but
/// a wrong command line exits 2, not 1), and an empty name in a list
/// (`--volume-ids a,,b`).
fn distinct(volumes: &[String]) -> Result<(), Failure> {
    if volumes.iter().any(String::is_empty) {
        return Err(Failure::Usage(
            "an empty volume name (an empty argument, or two commas in a row in a list): give each name, separated by single commas in a list, as in --volume-ids db,log".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in volumes {
        if !seen.insert(v.as_str()) {
            return Err(Failure::Usage(format!(
                "volume {v:?} is named twice: name each volume once"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a volume (a sparse file served over NBD as export NAME)
    #[command(
        after_help = "Examples:\n  blockctl volume create db1 --size 10G --label tier=gold\n  blockctl volume create big --size 8T --extent-size 64K\n(ext4 stores files of up to 16 TiB; XFS and btrfs reach the 64 TiB maximum)"
    )]
    Create {
        /// Volume name: letters, digits, '.', '_', '-'; 1-64 characters
        #[arg(value_parser = name_arg("volume name"))]
        name: String,
        /// Size, e.g. 10G (K, M, G, T, P are powers of 1024)
        #[arg(long, value_parser = size_arg, allow_hyphen_values = true)]
        size: u64,
        /// Label as key=value (repeatable)
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
        /// Extent size for change tracking, a power of two from 512 to 1M
        #[arg(long, value_parser = size_arg, allow_hyphen_values = true)]
        extent_size: Option<u64>,
    },
    /// List volumes
    #[command(alias = "ls")]
    #[command(
        after_help = "Examples:\n  blockctl volume list --label tier=gold\n  blockctl -j volume list"
    )]
    List {
        /// Only volumes with this label (repeatable; all must match)
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// Show one volume
    #[command(after_help = "Example:\n  blockctl volume inspect db1")]
    Inspect {
        /// Volume name
        name: String,
    },
    /// Delete a volume and its data (refused while it has clients or snapshots, unless --force)
    #[command(alias = "rm")]
    #[command(
        after_help = "Examples:\n  blockctl volume delete db1\n  blockctl volume delete db1 --force   # also its snapshots and clients"
    )]
    Delete {
        /// Volume name
        name: String,
        /// Delete even while NBD clients are connected (they are disconnected)
        /// and with its snapshots (deleted too)
        #[arg(long)]
        force: bool,
    },
    /// Add, change or remove a volume's labels (what `--label` selectors
    /// of group backups and schedules match)
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["labels", "remove"])))]
    #[command(
        after_help = "Examples:\n  blockctl volume update db1 --label tier=gold --label env=prod\n  blockctl volume update db1 --remove-label env"
    )]
    Update {
        /// Volume name
        name: String,
        /// Label to add or change, as key=value (repeatable)
        #[arg(long = "label", value_parser = label_arg)]
        labels: Vec<(String, String)>,
        /// Key of a label to remove (repeatable)
        #[arg(long = "remove-label", value_name = "KEY", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        remove: Vec<String>,
    },
    /// Grow a volume (shrinking is refused)
    #[command(after_help = "Example:\n  blockctl volume resize db1 --size 20G")]
    Resize {
        /// Volume name
        name: String,
        /// New size, e.g. 20G
        #[arg(long, value_parser = size_arg, allow_hyphen_values = true)]
        size: u64,
    },
    /// Attach a volume as a kernel block device /dev/nbdN (needs the nbd
    /// kernel module); re-attached when blockd restarts
    #[command(
        after_help = "Examples:\n  blockctl volume attach db1\n  blockctl volume attach db1 --device /dev/nbd3 --connections 4 --timeout 60"
    )]
    Attach {
        /// Volume name
        name: String,
        /// The device to use, e.g. /dev/nbd3 [default: the first free one]
        #[arg(long)]
        device: Option<String>,
        /// Socket connections between the kernel and blockd (1-16)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
        connections: u32,
        /// Seconds before the kernel fails a request blockd has not answered
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
    },
    /// Detach a volume's kernel block device
    #[command(
        after_help = "Examples:\n  blockctl volume detach db1\n  umount /srv/db1 && blockctl volume detach db1\n  blockctl volume detach db1 --force"
    )]
    Detach {
        /// Volume name
        name: String,
        /// Detach even while the device is mounted or held open: I/O still
        /// in flight on it fails, and what the page cache has not written
        /// back is lost
        #[arg(long)]
        force: bool,
    },
}

/// Writes `blockctl.1` and one page per verb (`blockctl-volume-create.1`)
/// into `dir`.
fn man_pages(out: Output, dir: &std::path::Path) -> Result<(), Failure> {
    fn write(
        cmd: &clap::Command,
        name: &str,
        dir: &std::path::Path,
        written: &mut Vec<String>,
    ) -> Result<(), Failure> {
        let cmd = cmd.clone().name(name.to_string());
        let file = format!("{name}.1");
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .render(&mut page)
            .map_err(|e| format!("rendering {file}: {e}"))?;
        std::fs::write(dir.join(&file), page)
            .map_err(|e| format!("writing {}: {e}", dir.join(&file).display()))?;
        written.push(file);
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            write(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    let mut written = Vec::new();
    write(&cmd, "blockctl", dir, &mut written)?;
    out.answer(&written, |w| {
        line(format_args!(
            "{} man pages written to {}",
            w.len(),
            dir.display()
        ));
    });
    Ok(())
}

/// Fails the command when a post-exec hook failed: the snapshot was taken
/// (I/O had resumed before the hook ran), but what the hook was to undo,
/// such as a frozen file system, may still be in place.
fn post_exec_ran(hook: Option<&blockd_api::Hook>) -> Result<(), Failure> {
    match hook {
        Some(h) if !h.ok() => {
            let output = h.output.trim();
            let output = if output.is_empty() {
                " (no output)".to_string()
            } else {
                format!(": {output}")
            };
            Err(format!(
                "post-exec `{}` {}{output}; the snapshot was taken and is kept, but check by hand that what the hook was to undo is undone (e.g. a file system frozen by pre-exec: `fsfreeze -u MOUNTPOINT`)",
                h.command,
                h.ending()
            ).into())
        }
        _ => Ok(()),
    }
}

/// The socket when `--socket` is not given: `$BLOCKD_SOCKET`, else
/// `api.sock` in blockd's own default state dir: `$BLOCKD_STATE_DIR`, else
/// `/var/lib/blockd` for root, else `$XDG_STATE_HOME/blockd` (or
/// `~/.local/state/blockd`).
fn default_socket() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|x| !x.is_empty());
    if let Some(x) = env("BLOCKD_SOCKET") {
        return PathBuf::from(x);
    }
    let dir = if let Some(x) = env("BLOCKD_STATE_DIR") {
        PathBuf::from(x)
    } else if is_root() {
        PathBuf::from("/var/lib/blockd")
    } else if let Some(x) = env("XDG_STATE_HOME") {
        PathBuf::from(x).join("blockd")
    } else {
        PathBuf::from(env("HOME").unwrap_or_else(|| ".".into())).join(".local/state/blockd")
    };
    dir.join("api.sock")
}

/// Effective uid 0, read from /proc (no unsafe call needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Arguments that may be given empty: `--prefix ''` is no prefix, and an
/// empty hook (`--pre-exec ''`) runs nothing.
const MAY_BE_EMPTY: [&str; 3] = ["prefix", "pre_exec", "post_exec"];

/// The first argument given empty on the command line (`''`, or a shell
/// variable that was not set), as `--flag` or `<NAME>`: a usage error,
/// where the daemon would otherwise look for a thing named "" and answer
/// that it is not there. [`MAY_BE_EMPTY`] are let through.
fn empty_argument(cmd: &clap::Command, m: &clap::ArgMatches) -> Option<String> {
    for id in m.ids() {
        let id = id.as_str();
        if MAY_BE_EMPTY.contains(&id)
            || m.value_source(id) != Some(clap::parser::ValueSource::CommandLine)
        {
            continue;
        }
        let Ok(Some(mut values)) = m.try_get_raw(id) else {
            continue;
        };
        if values.any(std::ffi::OsStr::is_empty) {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id);
            return Some(match arg.and_then(clap::Arg::get_long) {
                Some(long) => format!("--{long}"),
                None => format!("<{}>", id.to_uppercase()),
            });
        }
    }
    let (name, sub) = m.subcommand()?;
    empty_argument(cmd.find_subcommand(name)?, sub)
}

fn main() -> ExitCode {
    let mut cmd = Cli::command();
    let parsed = cmd.try_get_matches_from_mut(std::env::args_os()).and_then(|m| {
        if let Some(arg) = empty_argument(&cmd, &m) {
            return Err(cmd.error(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "{arg} is empty ('' or a shell variable that is not set): give it a value, or leave it out where it is optional"
                ),
            ));
        }
        Cli::from_arg_matches(&m)
    });
    let cli = match parsed {
        Ok(cli) => cli,
        // --help and --version are "errors" to clap that print on stdout.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) if json_asked() => {
            // The first paragraph: the error, without the usage lines.
            let text = e.render().to_string();
            let first = text.split("\n\n").next().unwrap_or_default().trim();
            let message = first.strip_prefix("error: ").unwrap_or(first);
            return fail(true, &Failure::Usage(message.to_string()));
        }
        Err(e) => e.exit(),
    };
    let socket = cli.socket.clone().unwrap_or_else(default_socket);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(cli.json, &format!("cannot start: {e}").into()),
    };
    let client = Client::new(socket);
    match runtime.block_on(run(&cli, &client)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(cli.json, &e),
    }
}

/// `-j`/`--json` is on the command line (before a `--`), for usage errors
/// found before the arguments could be parsed.
fn json_asked() -> bool {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json" || (a.starts_with('-') && !a.starts_with("--") && a.contains('j')))
}

/// Reports `e` on stderr, as `error: ...` or, under `-j`, as one JSON
/// object (`{"error": "...", "exit_status": N}`; stdout keeps only
/// answers), and returns its exit status.
fn fail(json: bool, e: &Failure) -> ExitCode {
    if json {
        output::error_json(e.message(), e.exit_status());
    } else {
        eprintln!("error: {}", e.message());
    }
    ExitCode::from(e.exit_status())
}

async fn run(cli: &Cli, client: &Client) -> Result<(), Failure> {
    let out = Output::new(cli.json);
    match &cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "blockctl",
                &mut script,
            );
            output::raw(&script);
            Ok(())
        }
        Command::Man { dir } => man_pages(out, dir),
        Command::Volume(cmd) => volume(out, client, cmd).await,
        Command::Snapshot(cmd) => snapshot(out, client, cmd).await,
        Command::Credentials(cmd) => credentials::run(out, client, cmd).await,
        Command::Cloudsnap(cmd) => cloudsnap::run(out, client, cmd).await,
        Command::Repo(cmd) => repo::run(out, client, cmd).await,
        Command::Mount(args) => mount::mount(out, client, args).await,
        Command::Umount(args) => mount::umount(out, client, args).await,
    }
}

async fn snapshot(out: Output, client: &Client, cmd: &SnapshotCmd) -> Result<(), Failure> {
    match cmd {
        SnapshotCmd::Create {
            volumes,
            name,
            pre_exec,
            post_exec,
            exec_timeout,
        } => {
            distinct(volumes)?;
            let req = CreateSnapshot {
                volumes: volumes.clone(),
                name: name.clone(),
                pre_exec: pre_exec.clone(),
                post_exec: post_exec.clone(),
                exec_timeout_secs: Some(*exec_timeout),
            };
            let snaps: Vec<Snapshot> = client
                .call_with_hooks(
                    "/v1/snapshots",
                    &req,
                    "the snapshot is taken once its pre-exec hook (if any) succeeds, and its post-exec hook runs either way; `blockctl snapshot list` shows it then",
                )
                .await?;
            out.answer(&snaps, |snaps| {
                for s in snaps {
                    line(format_args!(
                        "Snapshot {} created (I/O held {:.3} ms).",
                        s.export,
                        s.pause_us as f64 / 1000.0
                    ));
                }
            });
            post_exec_ran(snaps.first().and_then(|s| s.post_exec.as_ref()))?;
        }
        SnapshotCmd::List { volume } => {
            let path = match volume {
                Some(v) => format!("/v1/snapshots?volume={}", encode(v)),
                None => "/v1/snapshots".into(),
            };
            let snaps: Vec<Snapshot> = client.call::<(), _>("GET", &path, None).await?;
            out.answer(snaps.as_slice(), print_snapshots);
        }
        SnapshotCmd::Inspect { snapshot: (v, n) } => {
            let path = format!("/v1/snapshots/{}/{}", encode(v), encode(n));
            let s: Snapshot = client.call::<(), _>("GET", &path, None).await?;
            out.answer(&s, print_snapshot);
        }
        SnapshotCmd::Delete {
            snapshot: (v, n),
            force,
        } => {
            let path = format!("/v1/snapshots/{}/{}?force={force}", encode(v), encode(n));
            client.call_empty("DELETE", &path).await?;
            out.answer(
                &serde_json::json!({ "deleted": format!("{v}@{n}") }),
                |_| {
                    line(format_args!("Snapshot {v}@{n} deleted."));
                },
            );
        }
    }
    Ok(())
}

/// Prints the `snapshot list` table.
fn print_snapshots(snaps: &[Snapshot]) {
    let header = [
        "SNAPSHOT", "GROUP", "CREATED", "SIZE", "CHANGED", "COW", "PAUSE", "STATE",
    ];
    let rows: Vec<[String; 8]> = snaps
        .iter()
        .map(|s| {
            [
                s.export.clone(),
                s.group.clone().unwrap_or_else(|| "-".into()),
                s.created.clone(),
                human_size(s.size),
                if s.changes_known {
                    human_size(s.changed_bytes)
                } else {
                    "unknown".into()
                },
                human_size(s.cow_bytes),
                format!("{:.3} ms", s.pause_us as f64 / 1000.0),
                if s.damaged.is_some() {
                    "DAMAGED (see inspect)".into()
                } else {
                    "ok".into()
                },
            ]
        })
        .collect();
    output::table(&header, &rows);
}

/// Prints `snapshot inspect`.
fn print_snapshot(s: &Snapshot) {
    field("Snapshot", &s.export);
    field("Volume", &s.volume);
    field("Group", s.group.as_deref().unwrap_or("-"));
    field("Created", &s.created);
    field(
        "Size",
        format_args!("{} ({} bytes)", human_size(s.size), s.size),
    );
    if s.changes_known {
        field(
            "Changed",
            format_args!(
                "{} (since the previous snapshot or backup)",
                human_size(s.changed_bytes)
            ),
        );
    } else {
        field(
            "Changed",
            "unknown (change tracking was lost: a backup reads the whole volume)",
        );
    }
    field("COW data", human_size(s.cow_bytes));
    if let Some(why) = &s.damaged {
        field("DAMAGED", why);
    }
    output::freeze(s.pause_us, s.pre_exec.as_ref(), s.post_exec.as_ref());
}

async fn volume(out: Output, client: &Client, cmd: &VolumeCmd) -> Result<(), Failure> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            labels,
            extent_size,
        } => {
            let req = CreateVolume {
                name: name.clone(),
                size: *size,
                extent_size: *extent_size,
                labels: label_map(labels)?,
            };
            let v: Volume = client.call("POST", "/v1/volumes", Some(&req)).await?;
            out.answer(&v, |v| {
                line(format_args!(
                    "Volume {} created ({}).",
                    v.name,
                    exact_size(v.size)
                ));
            });
        }
        VolumeCmd::List { labels } => {
            label_map(labels)?;
            let mut path = "/v1/volumes".to_string();
            let query: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("label={}", encode(&format!("{k}={v}"))))
                .collect();
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            let vs: Vec<Volume> = client.call::<(), _>("GET", &path, None).await?;
            out.answer(vs.as_slice(), print_volumes);
        }
        VolumeCmd::Inspect { name } => {
            let v: Volume = client
                .call::<(), _>("GET", &format!("/v1/volumes/{}", encode(name)), None)
                .await?;
            out.answer(&v, print_volume);
        }
        VolumeCmd::Delete { name, force } => {
            let path = format!("/v1/volumes/{}?force={force}", encode(name));
            client.call_empty("DELETE", &path).await?;
            out.answer(&serde_json::json!({ "deleted": name }), |_| {
                line(format_args!("Volume {name} deleted."));
            });
        }
        VolumeCmd::Attach {
            name,
            device,
            connections,
            timeout,
        } => {
            let req = blockd_api::AttachRequest {
                device: device.clone(),
                connections: Some(*connections),
                timeout: Some(*timeout),
            };
            let a: blockd_api::Attachment = client
                .call(
                    "POST",
                    &format!("/v1/volumes/{}/attach", encode(name)),
                    Some(&req),
                )
                .await?;
            out.answer(&a, |a| {
                line(format_args!(
                    "Volume {} attached as {}.",
                    a.volume, a.device
                ));
            });
        }
        VolumeCmd::Detach { name, force } => {
            let path = format!("/v1/volumes/{}/attach?force={force}", encode(name));
            client.call_empty("DELETE", &path).await?;
            out.answer(&serde_json::json!({ "detached": name }), |_| {
                line(format_args!("Volume {name} detached."));
            });
        }
        VolumeCmd::Update {
            name,
            labels,
            remove,
        } => {
            let set = label_map(labels)?;
            if let Some(k) = remove.iter().find(|k| set.contains_key(*k)) {
                return Err(Failure::Usage(format!(
                    "label {k:?} is both set and removed: give it once"
                )));
            }
            let req = blockd_api::UpdateLabels {
                set,
                remove: remove.clone(),
            };
            let v: Volume = client
                .call(
                    "POST",
                    &format!("/v1/volumes/{}/labels", encode(name)),
                    Some(&req),
                )
                .await?;
            out.answer(&v, |v| {
                line(format_args!(
                    "Volume {} labels: {}",
                    v.name,
                    labels_text(&v.labels)
                ));
            });
        }
        VolumeCmd::Resize { name, size } => {
            let req = ResizeVolume { size: *size };
            let v: Volume = client
                .call(
                    "POST",
                    &format!("/v1/volumes/{}/resize", encode(name)),
                    Some(&req),
                )
                .await?;
            out.answer(&v, |v| {
                line(format_args!(
                    "Volume {} is now {}.",
                    v.name,
                    exact_size(v.size)
                ));
            });
        }
    }
    Ok(())
}

/// Percent-encodes a path segment or query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Prints the `volume list` table.
fn print_volumes(vs: &[Volume]) {
    let header = [
        "NAME",
        "SIZE",
        "ALLOCATED",
        "EXTENT",
        "CONNS",
        "LABELS",
        "DEVICE",
    ];
    let rows: Vec<[String; 7]> = vs
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                human_size(v.size),
                human_size(v.allocated),
                human_size(v.extent_size),
                v.connections.to_string(),
                labels_text(&v.labels),
                match (&v.attached, &v.unexported) {
                    (Some(d), _) => d.clone(),
                    (None, Some(_)) => "unexported".into(),
                    (None, None) => "-".into(),
                },
            ]
        })
        .collect();
    output::table(&header, &rows);
}

/// Prints `volume inspect`.
fn print_volume(v: &Volume) {
    field("Name", &v.name);
    field(
        "Size",
        format_args!("{} ({} bytes)", human_size(v.size), v.size),
    );
    field("Allocated", human_size(v.allocated));
    if v.kept_cow_bytes > 0 {
        field(
            "Kept COW area",
            format_args!(
                "{} (left by a deleted snapshot for the next one; freed with the volume)",
                human_size(v.kept_cow_bytes)
            ),
        );
    }
    field("Extent size", human_size(v.extent_size));
    if let Some(why) = &v.unexported {
        field("Exported", format_args!("no: {why}"));
    }
    field("Connections", v.connections);
    match (&v.attached, v.kernel_connected) {
        (None, _) => field("Attached", "no (`blockctl volume attach`)"),
        (Some(d), Some(true)) => field("Attached", format_args!("{d} (connected)")),
        (Some(d), Some(false)) => field(
            "Attached",
            format_args!("{d} (not connected: the kernel waits for blockd's sockets)"),
        ),
        (Some(d), None) => field("Attached", d),
    }
    if let Some(present) = v.lazy_present_bytes {
        field(
            "Restoring",
            format_args!(
                "lazily: {} of {} in place ({:.0}%); reads of the rest fetch it first (`blockctl cloudsnap status` shows the task)",
                human_size(present),
                human_size(v.size),
                present as f64 * 100.0 / v.size.max(1) as f64
            ),
        );
    }
    if v.unexported.is_some() {
        // A restore is filling it (or left it incomplete): its writes are
        // the snapshot's, not changes a backup would take.
        field("Changed", "- (not served: see Exported)");
    } else if v.tracking_known {
        field(
            "Changed",
            format_args!("{} since the last backup", human_size(v.dirty_bytes)),
        );
        field(
            "Tracking",
            if v.tracking_settled {
                "settled on disk (idle: a crash now keeps it)"
            } else {
                "in use (written in the last seconds: a crash now loses it; it settles after 5 s idle)"
            },
        );
    } else {
        field("Changed", "unknown (change tracking lost after an unclean shutdown: the next backup reads the whole volume)");
    }
    field("Labels", labels_text(&v.labels));
    field("Created", &v.created);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Splits a command line as sh does for the quoting the examples use
    /// ('single quotes'), dropping a trailing `# comment`.
    fn words(line: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut word = String::new();
        let (mut quoted, mut any) = (false, false);
        for c in line.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    any = true;
                }
                '#' if !quoted && !any => break,
                c if c.is_whitespace() && !quoted => {
                    if any {
                        out.push(std::mem::take(&mut word));
                        any = false;
                    }
                }
                c => {
                    word.push(c);
                    any = true;
                }
            }
        }
        if any {
            out.push(word);
        }
        out
    }

    fn leaves(cmd: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        let subs: Vec<_> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        if subs.is_empty() {
            out.push((path.clone(), cmd.clone()));
        }
        for s in subs {
            leaves(s, format!("{path} {}", s.get_name()), out);
        }
    }

    /// Every verb's --help ends with examples, and every example is a
    /// command line blockctl accepts.
    #[test]
    fn every_verb_has_examples_that_parse() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut all = Vec::new();
        leaves(&cmd, "blockctl".into(), &mut all);
        assert!(all.len() >= 30, "{} verbs", all.len());
        for (path, leaf) in all {
            let help = leaf
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(help.starts_with("Example"), "{path} has no example");
            // The blockctl commands of each line, without redirections.
            let examples: Vec<&str> = help
                .lines()
                .flat_map(|l| l.split("&&"))
                .filter_map(|c| c.split(['>', '|']).next())
                .map(str::trim)
                .filter(|c| c.starts_with("blockctl "))
                .collect();
            assert!(!examples.is_empty(), "{path}: {help}");
            for e in examples {
                let argv = words(e);
                if let Err(err) = Cli::try_parse_from(&argv) {
                    panic!("{path}: example `{e}` does not parse: {err}");
                }
            }
        }
    }
}
