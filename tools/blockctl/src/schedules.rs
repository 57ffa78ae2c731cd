//! `blockctl cloudsnap schedules` (alias `sched`): pxctl's backup
//! schedules, plus calendar retention.

use crate::failure::Failure;
use blockd_api::{CreateSchedule, Schedule};
use clap::{Args, Subcommand};

use crate::client::Client;
use crate::output::{line, table, Output};
use crate::{encode, label_arg, label_map};

/// `cloudsnap schedules` verbs.
#[derive(Debug, Subcommand)]
pub enum SchedulesCmd {
    /// Create a schedule: backups at the given times (UTC), keeping the
    /// newest --max per volume
    #[command(alias = "c")]
    #[command(
        after_help = "Examples:\n  blockctl cloudsnap schedules create db1 --daily 21:00 --max 15\n  blockctl cs sched create --label tier=gold --periodic 60 --keep-daily 7 --keep-monthly 12"
    )]
    Create(Box<CreateArgs>),
    /// List schedules with their last and next run
    #[command(aliases = ["ls", "l"])]
    #[command(after_help = "Example:\n  blockctl cloudsnap schedules list")]
    List,
    /// Delete a schedule (its snapshots stay)
    #[command(alias = "rm")]
    #[command(
        after_help = "Example:\n  blockctl cloudsnap schedules delete --uuid 0b6f3c1e-5a2d-4c8e-9f1a-7d3b2e6c4a10\n(the full id, as `cloudsnap schedules list` shows it)"
    )]
    Delete {
        /// Schedule id (see `schedules list`)
        #[arg(long, value_name = "ID")]
        uuid: String,
    },
}

/// Arguments of `schedules create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Volume to back up
    #[arg(conflicts_with_all = ["volume_flag", "volume_ids", "labels"])]
    volume: Option<String>,
    /// Volume, as pxctl spells it
    #[arg(long = "volume", short = 'v', value_name = "VOLUME", conflicts_with_all = ["volume_ids", "labels"])]
    volume_flag: Option<String>,
    /// Several volumes, backed up as a group (one freeze point)
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "A,B",
        value_parser = crate::cloudsnap::member_arg,
        conflicts_with = "labels"
    )]
    volume_ids: Vec<String>,
    /// Every volume carrying these labels when the schedule runs (a group)
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = label_arg)]
    labels: Vec<(String, String)>,
    /// Every N minutes (or a duration: 30s, 2h)
    #[arg(long, short = 'p', value_name = "MINUTES")]
    periodic: Option<String>,
    /// Every day at hh:mm UTC (repeatable)
    #[arg(long, short = 'd', value_name = "hh:mm")]
    daily: Vec<String>,
    /// Every week at weekday@hh:mm UTC (repeatable)
    #[arg(long, short = 'w', value_name = "weekday@hh:mm")]
    weekly: Vec<String>,
    /// Every month at day@hh:mm UTC (repeatable)
    #[arg(long, short = 'm', value_name = "day@hh:mm")]
    monthly: Vec<String>,
    /// Newest cloud snapshots kept per volume
    #[arg(long, short = 'x', default_value_t = 7)]
    max: u32,
    /// Also keep the newest snapshot of each of the last N days that have one
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_daily: u32,
    /// ... of each of the last N weeks
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_weekly: u32,
    /// ... of each of the last N months
    #[arg(long, default_value_t = 0, value_name = "N")]
    keep_monthly: u32,
    /// Every scheduled backup reads whole volumes
    #[arg(long, short = 'f')]
    full: bool,
    /// Credentials to back up with [default: the only ones, when just one exists]
    #[arg(long, alias = "cr", value_name = "NAME")]
    cred_id: Option<String>,
    /// Command run before each freeze
    #[arg(long, value_name = "COMMAND")]
    pre_exec: Option<String>,
    /// Command run after each freeze
    #[arg(long, value_name = "COMMAND")]
    post_exec: Option<String>,
}

/// Runs a `schedules` command.
pub async fn run(out: Output, client: &Client, cmd: &SchedulesCmd) -> Result<(), Failure> {
    match cmd {
        SchedulesCmd::Create(a) => {
            let volume = a.volume.clone().or(a.volume_flag.clone());
            let volumes: Vec<String> = volume.into_iter().chain(a.volume_ids.clone()).collect();
            crate::distinct(&volumes)?;
            // What the daemon would refuse too, but a wrong command line
            // exits 2.
            if volumes.is_empty() && a.labels.is_empty() {
                return Err(Failure::Usage(
                    "give what to back up: a volume, --volume-ids A,B or --label KEY=VALUE".into(),
                ));
            }
            if a.periodic.is_none()
                && a.daily.is_empty()
                && a.weekly.is_empty()
                && a.monthly.is_empty()
            {
                return Err(Failure::Usage(
                    "give when: --periodic MINUTES, --daily hh:mm, --weekly weekday@hh:mm or --monthly day@hh:mm".into(),
                ));
            }
            let req = CreateSchedule {
                volumes,
                select: label_map(&a.labels)?,
                periodic: a.periodic.clone(),
                daily: a.daily.clone(),
                weekly: a.weekly.clone(),
                monthly: a.monthly.clone(),
                max: Some(a.max),
                keep_daily: a.keep_daily,
                keep_weekly: a.keep_weekly,
                keep_monthly: a.keep_monthly,
                full: a.full,
                location: a.cred_id.clone(),
                pre_exec: a.pre_exec.clone(),
                post_exec: a.post_exec.clone(),
            };
            let s: Schedule = client.call("POST", "/v1/schedules", Some(&req)).await?;
            out.answer(&s, |s| {
                line(format_args!(
                    "Cloudsnap schedule created successfully: {} ({}), next run {}",
                    s.id,
                    s.rules.join(", "),
                    s.next_run.as_deref().unwrap_or("-")
                ));
            });
            Ok(())
        }
        SchedulesCmd::List => {
            let all: Vec<Schedule> = client.call::<(), _>("GET", "/v1/schedules", None).await?;
            out.answer(all.as_slice(), |all| {
                let rows: Vec<[String; 9]> = all
                    .iter()
                    .map(|s| {
                        [
                            s.id.clone(),
                            target(s),
                            s.location.clone(),
                            s.max.to_string(),
                            s.spec.full.to_string(),
                            s.rules.join(", "),
                            s.last_run.clone().unwrap_or_else(|| "-".into()),
                            s.next_run.clone().unwrap_or_else(|| "-".into()),
                            match (&s.last_error, s.running) {
                                (_, true) => match &s.waiting {
                                    Some(w) => format!("waiting: {w}"),
                                    None => "running".into(),
                                },
                                (Some(e), _) => format!("failed: {e}"),
                                (None, _) if s.last_run.is_some() => "ok".into(),
                                (None, _) => "-".into(),
                            },
                        ]
                    })
                    .collect();
                table(
                    &[
                        "UUID",
                        "VOLUMEID",
                        "CREDENTIALS",
                        "MAX-BACKUPS",
                        "FULL",
                        "SCHEDULE(UTC)",
                        "LAST-RUN",
                        "NEXT-RUN",
                        "STATUS",
                    ],
                    &rows,
                );
            });
            Ok(())
        }
        SchedulesCmd::Delete { uuid } => {
            client
                .call_empty("DELETE", &format!("/v1/schedules/{}", encode(uuid)))
                .await?;
            out.answer(&serde_json::json!({ "deleted": uuid }), |_| {
                line("Cloudsnap schedule deleted successfully");
            });
            Ok(())
        }
    }
}

fn target(s: &Schedule) -> String {
    if s.spec.select.is_empty() {
        s.spec.volumes.join(",")
    } else {
        s.spec
            .select
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}
