//! `blockctl cloudsnap`: backups to object storage, their tasks, and
//! restores, named after `pxctl cloudsnap`.

use crate::failure::Failure;
use blockd_api::{
    human_size, BackupGroupRequest, BackupRequest, Catalog, CloudSnap, GroupState, Location,
    RestoreRequest, Started, Task, TaskKind, TaskState,
};
use clap::{ArgGroup, Args, Subcommand};

use crate::client::Client;
use crate::output::{self, field, line, Output};
use crate::wait::{human_secs, wait};
use crate::{distinct, duration_arg, encode, label_arg, label_map, labels_text, post_exec_ran};

/// `pxctl cloudsnap` verbs.
#[derive(Debug, Subcommand)]
pub enum CloudsnapCmd {
    /// Back up a volume to object storage: incremental when its change set is known
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap backup db1 --wait\n  blockctl cs backup db1 --cred-id s3 --full --expire 30days"
    )]
    Backup(BackupArgs),
    /// Back up several volumes from one consistent freeze point
    #[command(alias = "bg")]
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap backup-group --volume-ids db-data,db-log --wait\n  blockctl cs bg --label tier=gold --cred-id s3"
    )]
    BackupGroup(BackupGroupArgs),
    /// Report backups and restores: progress of active ones, outcome of those
    /// that ended in the last 24 hours
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap status\n  blockctl -j cloudsnap status --name 846a-d2c7-8473d084\n  blockctl cloudsnap status --name 846a-d2c7-8473d084 --wait   # until it ends\n  blockctl cloudsnap status --all   # also tasks that ended earlier"
    )]
    Status {
        /// Only this task (or the tasks of this group backup)
        #[arg(long, value_name = "ID")]
        name: Option<String>,
        /// Every task kept, also those that ended over 24 hours ago
        #[arg(long, conflicts_with = "name")]
        all: bool,
        /// Wait for the task(s) named to end, as `backup --wait` does, with
        /// the same outcome and exit status
        #[arg(long, requires = "name")]
        wait: bool,
    },
    /// Stop an active backup or restore, or every running task of a group backup
    #[command(group(ArgGroup::new("task").required(true).args(["id", "name"])))]
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap stop 846a-d2c7-8473d084\n  blockctl cloudsnap stop 20261124T020000.000Z-9f3c1a2e   # a group id: its running tasks"
    )]
    Stop {
        /// Task id or group id (see `blockctl cloudsnap status`)
        id: Option<String>,
        /// Task id or group id, as pxctl spells it
        #[arg(long, value_name = "ID")]
        name: Option<String>,
        /// Stop a lazy restore whose volume has NBD clients (they are
        /// disconnected, and the volume with what they wrote is deleted)
        #[arg(long)]
        force: bool,
    },
    /// Show finished backups and restores with their outcome, the last to
    /// end first
    #[command(after_help = "Example:\n  blockctl cloudsnap history")]
    History,
    /// List snapshots in object storage
    #[command(aliases = ["ls", "l"])]
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap list\n  blockctl cloudsnap list --src db1 --cred-id s3 --label env=prod"
    )]
    List {
        /// Only snapshots of this source volume
        #[arg(long, short = 's')]
        src: Option<String>,
        /// Credentials to list [default: every location's snapshots]
        #[arg(long, alias = "cr", value_name = "NAME")]
        cred_id: Option<String>,
        /// Only snapshots with this label (repeatable; all must match)
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// Show what a cloud snapshot holds, optionally checking every chunk
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap catalog db1 --verify\n  blockctl cloudsnap catalog db1/20261121T101500.123Z-3f4f0a67"
    )]
    Catalog {
        /// Cloud snapshot id, VOLUME/SNAPSHOT, or a volume name for its latest
        #[arg(required_unless_present = "snap_flag", conflicts_with = "snap_flag")]
        snap: Option<String>,
        /// The snapshot as a flag, as restore and delete take it
        #[arg(long = "snap", short = 's', id = "snap_flag", value_name = "SNAP")]
        snap_flag: Option<String>,
        /// Credentials the snapshot is stored with [default: the one
        /// location holding it]
        #[arg(long, alias = "cr", value_name = "NAME")]
        cred_id: Option<String>,
        /// Fetch and check every chunk the snapshot references
        #[arg(long)]
        verify: bool,
    },
    /// Delete a cloud snapshot from the object store; this is not reversible
    /// (other snapshots stay restorable; the space its chunks use comes back
    /// through garbage collection, `blockctl repo gc`)
    #[command(alias = "rm")]
    #[command(
        after_help = "Example:\n  blockctl cloudsnap delete --snap db1/20261121T101500.123Z-3f4f0a67"
    )]
    Delete {
        /// Cloud snapshot id, VOLUME/SNAPSHOT
        #[arg(long, short = 's', value_parser = cloud_snapshot_id)]
        snap: String,
        /// Credentials the snapshot is stored with [default: the one
        /// location holding it]
        #[arg(long, alias = "cr", value_name = "NAME")]
        cred_id: Option<String>,
    },
    /// Backup schedules: create, list, delete
    #[command(
        subcommand,
        alias = "sched",
        after_help = "Examples:\n  blockctl cloudsnap schedules create db1 --daily 21:00 --max 14\n  blockctl cloudsnap schedules list"
    )]
    Schedules(crate::schedules::SchedulesCmd),
    /// Restore a cloud snapshot into a new volume
    #[command(alias = "r")]
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap restore --snap db1 --volume db1-copy --wait\n  blockctl cloudsnap restore --snap db1/20261121T101500.123Z-3f4f0a67 --volume db1-now --lazy"
    )]
    Restore {
        /// Cloud snapshot id, VOLUME/SNAPSHOT, or a volume name for its latest
        #[arg(long, short = 's')]
        snap: String,
        /// Name of the new volume
        #[arg(long, short = 'v', value_parser = crate::name_arg("volume name"))]
        volume: String,
        /// Credentials the snapshot is stored with [default: the one
        /// location holding it]
        #[arg(long, alias = "cr", value_name = "NAME")]
        cred_id: Option<String>,
        /// Serve the new volume at once: data is fetched as it is read, and in the background until complete
        #[arg(long)]
        lazy: bool,
        /// Wait for the restore to end, with progress on a terminal (Ctrl-C stops waiting, not the restore)
        #[arg(long)]
        wait: bool,
    },
}

/// Options shared by `backup` and `backup-group`.
#[derive(Debug, Args)]
pub struct BackupOpts {
    /// Read the whole volume even when its change set is known
    #[arg(long, short = 'f')]
    full: bool,
    /// Credentials to back up with [default: the only ones, when just one exists]
    #[arg(long, alias = "cr", value_name = "NAME")]
    cred_id: Option<String>,
    /// Command run before I/O is held, e.g. 'fsfreeze -f /mnt/data'; failure aborts
    #[arg(long, value_name = "COMMAND")]
    pre_exec: Option<String>,
    /// Command run after I/O resumes, e.g. 'fsfreeze -u /mnt/data'; always runs
    #[arg(long, value_name = "COMMAND")]
    post_exec: Option<String>,
    /// Timeout for each exec hook, e.g. 30s or 2m
    #[arg(long, value_name = "DURATION", value_parser = duration_arg, default_value = "30s")]
    exec_timeout: f64,
    /// Wait for the backup to end, with progress on a terminal (Ctrl-C stops waiting, not the backup)
    #[arg(long)]
    wait: bool,
    /// Delete the snapshot at this time: 2026-12-01T00:00:00Z, 2026-12-01 or
    /// a duration from now (7days, 36h)
    #[arg(long, value_name = "DATE|DURATION")]
    expire: Option<String>,
}

/// Arguments of `cloudsnap backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Volume to back up
    volume: String,
    /// More volumes: refused, pointing at `backup-group`.
    #[arg(hide = true)]
    more: Vec<String>,
    /// Label recorded with the cloud snapshot, as key=value (repeatable);
    /// `cloudsnap list --label` selects by these
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label_arg)]
    labels: Vec<(String, String)>,
    #[command(flatten)]
    opts: BackupOpts,
}

/// One name of `--volume-ids`: an empty one is a stray comma.
pub(crate) fn member_arg(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the list has an empty name (a comma at an end, or two in a row): separate the names with single commas, e.g. db-data,db-log".into());
    }
    Ok(s.to_string())
}

/// Arguments of `cloudsnap backup-group`: members by name or by label.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("members").required(true).args(["volume_ids", "select"])))]
pub struct BackupGroupArgs {
    /// Member volumes, comma separated
    #[arg(
        long,
        short = 'v',
        alias = "volume_ids",
        value_name = "VOLUME,...",
        value_delimiter = ',',
        value_parser = member_arg
    )]
    volume_ids: Vec<String>,
    /// Or: every volume with this volume label, as key=value (repeatable; all
    /// must match); also recorded with each cloud snapshot, so `cloudsnap
    /// list --label` finds them
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label_arg)]
    select: Vec<(String, String)>,
    #[command(flatten)]
    opts: BackupOpts,
}

/// `path?k=v&...` with form-encoded values; `path` alone without pairs.
fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return path.to_string();
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{path}?{query}")
}

/// Runs a `cloudsnap` verb.
pub async fn run(out: Output, client: &Client, cmd: &CloudsnapCmd) -> Result<(), Failure> {
    // A wait's settings are checked before anything is started.
    let waits = match cmd {
        CloudsnapCmd::Backup(a) => a.opts.wait,
        CloudsnapCmd::BackupGroup(a) => a.opts.wait,
        CloudsnapCmd::Restore { wait, .. } | CloudsnapCmd::Status { wait, .. } => *wait,
        _ => false,
    };
    if waits {
        crate::wait::ride_out()?;
    }
    match cmd {
        CloudsnapCmd::Backup(args) => backup(out, client, args).await,
        CloudsnapCmd::BackupGroup(args) => backup_group(out, client, args).await,
        CloudsnapCmd::Schedules(cmd) => crate::schedules::run(out, client, cmd).await,
        CloudsnapCmd::Status { name, all, wait: w } => {
            let path = match name {
                Some(n) => with_query("/v1/tasks", &[("name", n)]),
                None => "/v1/tasks".into(),
            };
            if let (true, Some(n)) = (*w, name) {
                let tasks = crate::wait::named(client, &path, n).await?;
                return wait(out, client, tasks).await;
            }
            let mut tasks: Vec<Task> = client.call::<(), _>("GET", &path, None).await?;
            let before = tasks.len();
            if name.is_none() && !all {
                let now = std::time::SystemTime::now();
                tasks.retain(|t| !ended_before(t, now, STATUS_RECENT));
            }
            let older = before - tasks.len();
            out.answer(tasks.as_slice(), |tasks| {
                print_status(tasks);
                if older > 0 {
                    crate::output::line(format_args!("({older} task(s) that ended over 24 hours ago not shown: `blockctl cloudsnap status --all`)"));
                }
            });
            Ok(())
        }
        CloudsnapCmd::Stop { id, name, force } => {
            let id = id
                .as_deref()
                .or(name.as_deref())
                .ok_or("give the task id to stop")?;
            // A group backup's id names its members' tasks: each one still
            // running is stopped.
            let path = with_query("/v1/tasks", &[("name", id)]);
            let tasks: Vec<Task> = match client.call_or_refusal("GET", &path).await? {
                Ok(tasks) => tasks,
                // 409: a backup still starting (its hooks, its freeze), not
                // listed yet; the daemon's stop waits for it to run.
                Err((409, _)) => Vec::new(),
                Err((_, refused)) => return Err(refused),
            };
            if tasks.is_empty() || tasks.iter().any(|t| t.id == *id) {
                let t = stop_task(client, id, *force).await?;
                // Ended on its own while the stop was on its way: nothing
                // was stopped, as when it had ended before the stop was
                // sent (the daemon's own answer then).
                if t.state != TaskState::Stopped {
                    return Err(Failure::Failed(already_ended(&t)));
                }
                out.answer(&t, print_stopped);
                return Ok(());
            }
            let stopped = stop_group(client, id, &tasks, *force).await?;
            out.answer(stopped.as_slice(), |tasks| {
                tasks.iter().for_each(print_stopped)
            });
            Ok(())
        }
        CloudsnapCmd::History => {
            let path = with_query("/v1/tasks", &[("finished", "true")]);
            let mut tasks: Vec<Task> = client.call::<(), _>("GET", &path, None).await?;
            // The last to end first (blockd lists them by when they
            // started). RFC 3339 times in UTC sort as text.
            tasks.sort_by(|a, b| b.finished.cmp(&a.finished));
            out.answer(tasks.as_slice(), print_history);
            Ok(())
        }
        CloudsnapCmd::List {
            src,
            cred_id,
            labels,
        } => {
            label_map(labels)?;
            let pairs: Vec<(&str, String)> = src
                .iter()
                .map(|s| ("src", s.clone()))
                .chain(cred_id.iter().map(|c| ("location", c.clone())))
                .chain(labels.iter().map(|(k, v)| ("label", format!("{k}={v}"))))
                .collect();
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if cred_id.is_some() {
                let path = with_query("/v1/cloudsnaps", &pairs);
                let snaps: Vec<CloudSnap> = client.call::<(), _>("GET", &path, None).await?;
                out.answer(snaps.as_slice(), print_cloudsnaps);
                return Ok(());
            }
            list_everywhere(client, out, &pairs).await
        }
        CloudsnapCmd::Catalog {
            snap,
            snap_flag,
            cred_id,
            verify,
        } => {
            // clap requires one of the two.
            let snap = snap.as_deref().or(snap_flag.as_deref()).unwrap_or_default();
            let mut pairs = vec![("snap", snap)];
            if let Some(c) = cred_id {
                pairs.push(("location", c));
            }
            if *verify {
                pairs.push(("verify", "true"));
            }
            let path = with_query("/v1/cloudsnaps/catalog", &pairs);
            let c: Catalog = client.call::<(), _>("GET", &path, None).await?;
            out.answer(&c, print_catalog);
            Ok(())
        }
        CloudsnapCmd::Delete { snap, cred_id } => {
            let mut pairs = vec![("snap", snap.as_str())];
            if let Some(c) = cred_id {
                pairs.push(("location", c));
            }
            client
                .call_empty("DELETE", &with_query("/v1/cloudsnaps", &pairs))
                .await?;
            out.answer(&serde_json::json!({ "deleted": snap }), |_| {
                line(format_args!("Cloudsnap {snap} deleted successfully"));
            });
            Ok(())
        }
        CloudsnapCmd::Restore {
            snap,
            volume,
            cred_id,
            lazy,
            wait: wait_flag,
        } => {
            let req = RestoreRequest {
                snap: snap.clone(),
                volume: volume.clone(),
                location: cred_id.clone(),
                lazy: *lazy,
            };
            let started: Started = client
                .call("POST", "/v1/cloudsnaps/restore", Some(&req))
                .await?;
            if !out.is_json() {
                let t = first(&started)?;
                line(format_args!(
                    "Cloudsnap restore started successfully with id: {}",
                    t.id
                ));
                line(format_args!(
                    "Restoring {} into volume {}",
                    t.snapshot, t.volume
                ));
                if t.lazy {
                    line(format_args!(
                        "Volume {} is usable now; its data is fetched as it is read and in the background (`blockctl cloudsnap status`)",
                        t.volume
                    ));
                }
            }
            finish(out, client, started, *wait_flag).await
        }
    }
}

/// The task of a single-volume answer.
fn first(started: &Started) -> Result<&Task, String> {
    started
        .tasks
        .first()
        .ok_or_else(|| "blockd started no task".to_string())
}

/// After a start: waits if asked; JSON prints the answer (or, after
/// waiting, the final tasks).
async fn finish(
    out: Output,
    client: &Client,
    started: Started,
    wait_flag: bool,
) -> Result<(), Failure> {
    if wait_flag {
        wait(out, client, started.tasks).await
    } else {
        if out.is_json() {
            output::json(&started);
        }
        Ok(())
    }
}

/// What a backup interrupted before blockd answered still does.
const BACKUP_GOES_ON: &str = "the backup starts once its pre-exec hook (if any) succeeds; `blockctl cloudsnap status` shows its task then, and `blockctl cloudsnap stop TASK-ID` stops it";

/// `cloudsnap backup`.
async fn backup(out: Output, client: &Client, args: &BackupArgs) -> Result<(), Failure> {
    if !args.more.is_empty() {
        let all = std::iter::once(&args.volume)
            .chain(&args.more)
            .map(String::as_str)
            .collect::<Vec<_>>();
        return Err(Failure::Usage(format!(
            "cloudsnap backup takes one volume ({} given): back up several at one freeze point with `blockctl cloudsnap backup-group --volume-ids {}`, or run backup once for each",
            all.len(),
            all.join(",")
        )));
    }
    let o = &args.opts;
    let req = BackupRequest {
        volume: args.volume.clone(),
        full: o.full,
        location: o.cred_id.clone(),
        labels: label_map(&args.labels)?,
        pre_exec: o.pre_exec.clone(),
        post_exec: o.post_exec.clone(),
        exec_timeout_secs: Some(o.exec_timeout),
        expire: o.expire.clone(),
    };
    let started: Started = client
        .call_with_hooks("/v1/cloudsnaps/backup", &req, BACKUP_GOES_ON)
        .await?;
    if !out.is_json() {
        let t = first(&started)?;
        line(format_args!(
            "Cloudsnap backup started successfully with id: {}",
            t.id
        ));
        line(format_args!("Cloud snapshot: {}", t.snapshot));
    }
    let hook = started.post_exec.clone();
    finish(out, client, started, o.wait).await?;
    post_exec_ran(hook.as_ref())
}

/// `cloudsnap backup-group`.
async fn backup_group(out: Output, client: &Client, args: &BackupGroupArgs) -> Result<(), Failure> {
    let o = &args.opts;
    distinct(&args.volume_ids)?;
    let req = BackupGroupRequest {
        volumes: args.volume_ids.clone(),
        select: label_map(&args.select)?,
        full: o.full,
        location: o.cred_id.clone(),
        labels: Default::default(),
        pre_exec: o.pre_exec.clone(),
        post_exec: o.post_exec.clone(),
        exec_timeout_secs: Some(o.exec_timeout),
        expire: o.expire.clone(),
    };
    let started: Started = client
        .call_with_hooks("/v1/cloudsnaps/backup-group", &req, BACKUP_GOES_ON)
        .await?;
    if !out.is_json() {
        line(format_args!(
            "Group Cloudsnap backup started successfully with groupID: {}",
            started.group.as_deref().unwrap_or("-")
        ));
        for t in &started.tasks {
            line(format_args!("  task {}: {}", t.id, t.snapshot));
        }
    }
    let hook = started.post_exec.clone();
    finish(out, client, started, o.wait).await?;
    post_exec_ran(hook.as_ref())
}

/// pxctl's state column: `Backup-Active`, `Restore-Done`, ...
fn state_text(t: &Task) -> String {
    let kind = match t.kind {
        TaskKind::Backup => "Backup",
        TaskKind::Restore => "Restore",
    };
    format!("{kind}-{}", t.state)
}

/// What `cloudsnap stop` did to task `t`: stopped it, or found it ended
/// (a restore that finished meanwhile keeps its volume).
fn print_stopped(t: &Task) {
    if t.state == TaskState::Stopped {
        line(format_args!("Cloudsnap task {} stopped", t.id));
    } else {
        line(format_args!("{}", already_ended(t)));
    }
}

/// A task that ended before a stop reached it, in the daemon's words for
/// one that had ended before the stop was sent.
fn already_ended(t: &Task) -> String {
    format!("task {} already ended ({})", t.id, t.state)
}

/// Asks blockd to stop task `id`; the task as it ended.
async fn stop_task(client: &Client, id: &str, force: bool) -> Result<Task, Failure> {
    let path = format!("/v1/tasks/{}/stop?force={force}", encode(id));
    client.call::<(), _>("POST", &path, None).await
}

/// Stops every running member of group `group` (`tasks`: its members, as
/// the daemon listed them) and returns them as they ended. A member that
/// ended on its own meanwhile is returned as it ended; a group none of
/// whose members this stopped is an error, as a task that already ended
/// is.
async fn stop_group(
    client: &Client,
    group: &str,
    tasks: &[Task],
    force: bool,
) -> Result<Vec<Task>, Failure> {
    let nothing_to_stop = |tasks: &[&Task]| {
        let states: Vec<String> = tasks
            .iter()
            .map(|t| format!("{} {}", t.id, t.state))
            .collect();
        Failure::Failed(format!(
            "group {group} has no running task ({}): nothing to stop",
            states.join(", ")
        ))
    };
    let running: Vec<&Task> = tasks.iter().filter(|t| !t.state.is_final()).collect();
    if running.is_empty() {
        return Err(nothing_to_stop(&tasks.iter().collect::<Vec<_>>()));
    }
    let mut out = Vec::with_capacity(running.len());
    for t in running {
        match stop_task(client, &t.id, force).await {
            Ok(t) => out.push(t),
            Err(e) => {
                // Ended on its own between the listing and the stop.
                let path = with_query("/v1/tasks", &[("name", t.id.as_str())]);
                let now: Vec<Task> = client.call::<(), _>("GET", &path, None).await?;
                match now.into_iter().find(|n| n.id == t.id) {
                    Some(n) if n.state.is_final() => out.push(n),
                    _ => {
                        return Err(Failure::Failed(format!(
                            "stopping task {} of group {group}: {}",
                            t.id,
                            e.message()
                        )))
                    }
                }
            }
        }
    }
    if out.iter().all(|t| t.state != TaskState::Stopped) {
        return Err(nothing_to_stop(&out.iter().collect::<Vec<_>>()));
    }
    Ok(out)
}

/// Prints the `status` table.
/// How far back `cloudsnap status` shows tasks that have ended.
const STATUS_RECENT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// True when `t` has ended, more than `ago` before `now`.
fn ended_before(t: &Task, now: std::time::SystemTime, ago: std::time::Duration) -> bool {
    t.state.is_final()
        && t.finished
            .as_deref()
            .and_then(|f| humantime::parse_rfc3339_weak(f).ok())
            .and_then(|f| now.duration_since(f).ok())
            .is_some_and(|d| d > ago)
}

fn print_status(tasks: &[Task]) {
    let header = [
        "NAME",
        "SOURCEVOLUME",
        "SNAPSHOT",
        "STATE",
        "BYTES-DONE/TOTAL",
        "TRANSFERRED",
        "REUSED",
        "ELAPSED",
        "ETA",
    ];
    let rows: Vec<[String; 9]> = tasks
        .iter()
        .map(|t| {
            [
                t.id.clone(),
                t.volume.clone(),
                t.snapshot.clone(),
                state_text(t),
                format!("{}/{}", human_size(t.bytes_done), human_size(t.bytes_total)),
                human_size(t.bytes_transferred),
                human_size(t.bytes_reused),
                human_secs(t.elapsed_secs),
                match t.eta_secs {
                    Some(s) if !t.state.is_final() && t.error.is_none() => human_secs(s),
                    _ => "-".into(),
                },
            ]
        })
        .collect();
    output::table(&header, &rows);
    // A task still running with an error is held up (retrying, or a
    // lazy restore's fill stuck on a damaged object): say why under the
    // table, as `-j` does in its `error` field.
    for t in tasks.iter().filter(|t| !t.state.is_final()) {
        if let Some(e) = &t.error {
            line(format_args!("{} is held up: {}", t.id, one_line(e)));
        }
    }
}

/// An error message on one line (a table cell, or a line under a table).
pub(crate) fn one_line(e: &str) -> String {
    e.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Prints the `history` table.
fn print_history(tasks: &[Task]) {
    let header = [
        "NAME",
        "SOURCEVOLUME",
        "SNAPSHOT",
        "STATE",
        "COMPLETED",
        "ELAPSED",
        "BYTES",
        "TRANSFERRED",
        "ERROR",
    ];
    let rows: Vec<[String; 9]> = tasks
        .iter()
        .map(|t| {
            [
                t.id.clone(),
                t.volume.clone(),
                t.snapshot.clone(),
                state_text(t),
                t.finished.clone().unwrap_or_else(|| "-".into()),
                human_secs(t.elapsed_secs),
                human_size(t.bytes_done),
                human_size(t.bytes_transferred),
                t.error.as_deref().map_or_else(|| "-".into(), one_line),
            ]
        })
        .collect();
    output::table(&header, &rows);
}

/// Full or incremental.
fn kind_text(s: &CloudSnap) -> &'static str {
    // An object under snapshots/ that is not a snapshot (listed so that
    // it can be seen and deleted): no type.
    if s.status.starts_with("Corrupt") {
        "-"
    } else if s.full {
        "Full"
    } else {
        "Incr"
    }
}

/// `cloudsnap list` without `--cred-id`: every location's snapshots. One
/// location that cannot be listed (its bucket gone, its provider down)
/// hides none of the others: they are printed, and the command then fails
/// naming the locations it could not list.
async fn list_everywhere(
    client: &Client,
    out: Output,
    pairs: &[(&str, &str)],
) -> Result<(), Failure> {
    let locations: Vec<Location> = client.call::<(), _>("GET", "/v1/locations", None).await?;
    let mut snaps: Vec<CloudSnap> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    for l in &locations {
        let mut with = pairs.to_vec();
        with.push(("location", l.name.as_str()));
        let path = with_query("/v1/cloudsnaps", &with);
        match client.call::<(), Vec<CloudSnap>>("GET", &path, None).await {
            Ok(s) => snaps.extend(s),
            Err(e) => failed.push((l.name.clone(), e.message().to_string())),
        }
    }
    if failed.len() == locations.len() && !failed.is_empty() {
        if let [(_, e)] = failed.as_slice() {
            return Err(Failure::Failed(e.clone()));
        }
        let each: Vec<String> = failed.iter().map(|(l, e)| format!("{l}: {e}")).collect();
        return Err(Failure::Failed(format!(
            "no location could be listed: {}",
            each.join("; ")
        )));
    }
    // Names start with the freeze time: id order is time order.
    snaps.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.location.cmp(&b.location)));
    out.answer(snaps.as_slice(), print_cloudsnaps);
    if failed.is_empty() {
        return Ok(());
    }
    // The daemon's errors mostly name the location already.
    let each: Vec<String> = failed
        .iter()
        .map(|(l, e)| {
            if e.starts_with(&format!("location {l}")) {
                e.clone()
            } else {
                format!("location {l}: {e}")
            }
        })
        .collect();
    Err(Failure::Failed(format!(
        "{}; the snapshots of the other locations are listed{}",
        each.join("; "),
        if out.is_json() {
            " on stdout"
        } else {
            " above"
        }
    )))
}

/// Prints the `list` table.
fn print_cloudsnaps(snaps: &[CloudSnap]) {
    let header = [
        "SOURCEVOLUME",
        "CLOUD-SNAP-ID",
        "CREDENTIALS",
        "HOST",
        "CREATED",
        "TYPE",
        "SIZE",
        "NEW",
        "REUSED",
        "GROUP",
        "EXPIRES",
        "STATUS",
    ];
    let rows: Vec<[String; 12]> = snaps
        .iter()
        .map(|s| {
            [
                s.volume.clone(),
                s.id.clone(),
                s.location.clone(),
                s.host.clone().unwrap_or_else(|| "-".into()),
                s.created.clone(),
                kind_text(s).into(),
                human_size(s.size),
                human_size(s.bytes_new),
                human_size(s.bytes_reused),
                group_text(s),
                s.expires.clone().unwrap_or_else(|| "-".into()),
                s.status.clone(),
            ]
        })
        .collect();
    output::table(&header, &rows);
}

/// A snapshot's group, with where the group backup stands unless it is
/// complete: `ID (incomplete)`, `ID (running)`; `-` outside a group.
fn group_text(s: &CloudSnap) -> String {
    match (&s.group, s.group_state) {
        (None, _) => "-".into(),
        (Some(g), None | Some(GroupState::Complete)) => g.clone(),
        (Some(g), Some(state)) => format!("{g} ({})", state.as_str()),
    }
}

/// Prints a catalog as `Key: value` lines.
fn print_catalog(c: &Catalog) {
    let s = &c.snap;
    field("Cloud snap", &s.id);
    field("Volume", &s.volume);
    field("Credentials", &s.location);
    field("Host", s.host.as_deref().unwrap_or("-"));
    field("Created", &s.created);
    field(
        "Size",
        format_args!("{} ({} bytes)", human_size(s.size), s.size),
    );
    field("Extent size", human_size(s.extent_size));
    field("Type", if s.full { "full" } else { "incremental" });
    field("Parent", s.parent.as_deref().unwrap_or("-"));
    field("Group", group_text(s));
    field("Labels", labels_text(&s.labels));
    field(
        "Data",
        format_args!(
            "{} in {} index blocks of {}",
            human_size(c.data_bytes),
            c.index_blocks,
            human_size(c.index_span)
        ),
    );
    field(
        "Chunk size",
        format_args!("{} at most", human_size(c.chunk_size)),
    );
    field("Bytes read", human_size(s.bytes_read));
    field("Bytes new", human_size(s.bytes_new));
    field("Bytes reused", human_size(s.bytes_reused));
    field("Uploaded", human_size(s.bytes_uploaded));
    output::freeze(c.pause_us, c.pre_exec.as_ref(), c.post_exec.as_ref());
    if let Some(v) = &c.verified {
        field(
            "Verified",
            format_args!(
                "{} ({} bytes) of data in {} chunks, each read and checked",
                human_size(v.bytes),
                v.bytes,
                v.chunks,
            ),
        );
    }
}

/// A cloud snapshot id, `VOLUME/SNAPSHOT` (deletes name one snapshot, never
/// "the latest of a volume").
fn cloud_snapshot_id(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((v, n)) if !v.is_empty() && !n.is_empty() && !n.contains('/') => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not a cloud snapshot id VOLUME/SNAPSHOT (see `blockctl cloudsnap list`)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn task(state: &str, finished: Option<&str>) -> Task {
        serde_json::from_value(serde_json::json!({
            "id": "t", "kind": "backup", "state": state, "volume": "v",
            "snapshot": "v/s", "location": "local", "group": null, "full": true,
            "created": "2026-11-20T10:00:00Z", "finished": finished,
            "bytes_total": 0, "bytes_done": 0, "bytes_transferred": 0,
            "bytes_reused": 0, "elapsed_secs": 1.0, "eta_secs": null, "error": null
        }))
        .unwrap()
    }

    /// `cloudsnap status` leaves out only tasks that ended over a day ago.
    #[test]
    fn status_hides_only_tasks_that_ended_long_ago() {
        let now = humantime::parse_rfc3339("2026-11-28T12:00:00Z").unwrap();
        let day = Duration::from_secs(24 * 3600);
        let old = |t: &Task| ended_before(t, now, day);
        assert!(old(&task("Done", Some("2026-11-26T12:00:00Z"))));
        assert!(old(&task("Failed", Some("2026-11-27T11:59:00Z"))));
        assert!(!old(&task("Done", Some("2026-11-27T12:30:00Z"))));
        // Still going, or with no end time: always shown.
        assert!(!old(&task("Active", None)));
        assert!(!old(&task("Done", None)));
        assert!(!old(&task("Done", Some("not a time"))));
        assert!(!ended_before(
            &task("Done", Some("2026-11-28T12:00:00Z")),
            SystemTime::UNIX_EPOCH,
            day
        ));
    }
}
