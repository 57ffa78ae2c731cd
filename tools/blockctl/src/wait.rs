//! `--wait`: follows backup and restore tasks until they end.
//!
//! Polls `GET /v1/tasks/ID` for every unfinished task. On a terminal a
//! progress bar per task shows what the daemon reports; otherwise nothing
//! is printed until the end, so scripts see only the outcome. A daemon
//! that stops answering is waited for up to a minute
//! (`$BLOCKCTL_WAIT_UNREACHABLE`): tasks resume when it starts again, so a
//! restart in between still ends in the task's outcome.

use crate::failure::Failure;
use std::io::IsTerminal;
use std::time::Duration;

use blockd_api::{human_size, Task, TaskKind, TaskState};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::client::Client;
use crate::encode;
use crate::output::{self, line, Output};

/// Time between two polls of a task.
/// Polling interval: short at first (most incrementals finish within a
/// second), then 250 ms.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL: Duration = Duration::from_millis(250);

/// Formats seconds for humans: `850 ms`, `12.3 s`, `3m29s`, `1h02m`.
pub fn human_secs(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    if secs < 1.0 {
        return format!("{:.0} ms", secs * 1000.0);
    }
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    let whole = Duration::try_from_secs_f64(secs + 0.5).map_or(u64::MAX, |d| d.as_secs());
    let (h, m, s) = (whole / 3600, whole / 60 % 60, whole % 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else {
        format!("{m}m{s:02}s")
    }
}

/// One progress bar per task, shown only when stderr is a terminal.
struct Bars {
    /// The bars' common drawing area.
    multi: MultiProgress,
    /// Bars in the order of the tasks.
    bars: Vec<ProgressBar>,
}

impl Bars {
    /// Bars for `tasks`, or `None` when stderr is not a terminal.
    fn new(tasks: &[Task]) -> Option<Self> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let style = ProgressStyle::with_template("{spinner} {prefix} [{bar:40}] {msg}")
            .ok()?
            .progress_chars("=> ");
        let multi = MultiProgress::new();
        let bars = tasks
            .iter()
            .map(|t| {
                let kind = match t.kind {
                    TaskKind::Backup => "backup",
                    TaskKind::Restore => "restore",
                };
                let bar = multi.add(
                    ProgressBar::new(1)
                        .with_style(style.clone())
                        .with_prefix(format!("{kind} {}", t.volume)),
                );
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            })
            .collect();
        let bars = Self { multi, bars };
        for (i, t) in tasks.iter().enumerate() {
            bars.show(i, t);
        }
        Some(bars)
    }

    /// Shows the latest report of task `i`.
    fn show(&self, i: usize, t: &Task) {
        let Some(bar) = self.bars.get(i) else {
            return;
        };
        // Before the daemon knows the total, an empty bar.
        bar.set_length(t.bytes_total.max(1));
        bar.set_position(t.bytes_done.min(t.bytes_total));
        let moved = match t.kind {
            TaskKind::Backup => "uploaded",
            TaskKind::Restore => "fetched",
        };
        // A task held up (its location failing, say) says why instead of
        // an ETA that no longer means anything.
        let eta = match (&t.error, t.eta_secs) {
            (Some(e), _) if t.state == TaskState::Active => {
                format!(", held up: {}", crate::cloudsnap::one_line(e))
            }
            (None, Some(s)) if t.state == TaskState::Active => format!(", ETA {}", human_secs(s)),
            _ => String::new(),
        };
        bar.set_message(format!(
            "{}/{}, {} {moved}{eta}",
            human_size(t.bytes_done),
            human_size(t.bytes_total),
            human_size(t.bytes_transferred),
        ));
        if t.state.is_final() {
            // Stays up, stopped, while other tasks go on; `clear` removes it.
            bar.finish_with_message(format!("{}, {}", t.state, human_size(t.bytes_done)));
        }
    }

    /// Says on every running task's bar that blockd has not answered for
    /// `away`.
    fn unreachable(&self, away: Duration) {
        for bar in self.bars.iter().filter(|b| !b.is_finished()) {
            bar.set_message(format!(
                "blockd not answering for {}: waiting for it to come back (Ctrl-C stops waiting)",
                human_secs(away.as_secs_f64())
            ));
        }
    }

    /// Removes every bar from the screen.
    fn clear(&self) {
        for bar in &self.bars {
            bar.finish_and_clear();
        }
        // Nothing useful to do if the terminal is gone.
        let _ = self.multi.clear();
    }
}

/// How long `--wait` goes on polling a daemon it cannot reach unless
/// `$BLOCKCTL_WAIT_UNREACHABLE` says otherwise: long enough for a restart
/// (systemd's, or an operator's after an upgrade), whose tasks resume
/// where they were, so a script learns how its task ended and not only
/// that its daemon went away.
const RIDE_OUT_RESTART: Duration = Duration::from_secs(60);

/// The environment variable that sets how long `--wait` waits for a daemon
/// that stopped answering.
const RIDE_OUT_ENV: &str = "BLOCKCTL_WAIT_UNREACHABLE";

/// How long to wait for a daemon that stopped answering.
pub fn ride_out() -> Result<Duration, Failure> {
    let Some(v) = std::env::var_os(RIDE_OUT_ENV).filter(|v| !v.is_empty()) else {
        return Ok(RIDE_OUT_RESTART);
    };
    let v = v.to_string_lossy();
    v.parse::<u64>()
        .map(Duration::from_secs)
        .or_else(|_| humantime::parse_duration(&v))
        .map_err(|e| {
            Failure::Usage(format!(
                "{RIDE_OUT_ENV}={v:?} is not a duration ({e}): give e.g. 60s, 5m or a number of seconds"
            ))
        })
}

/// Time between two attempts to reach a daemon that is not answering.
const POLL_UNREACHABLE: Duration = Duration::from_secs(1);

/// What one look at a task by a wait found.
pub(crate) enum Asked<T> {
    /// blockd's answer.
    Answer(T),
    /// blockd is not answering, or answers that it cannot say now (a
    /// 5xx), since this long: look again.
    Away(Duration),
    /// blockd says the task is still starting (its hooks, its freeze,
    /// which their own timeouts bound): look again.
    Starting,
    /// blockd refused for good (the task is not there), or the answer
    /// cannot be had by asking again (no permission on the socket).
    Refused(Failure),
    /// blockd has been away for the whole ride-out: why, last.
    Gone(String),
}

/// Asks blockd for `path` once, on behalf of a wait that rides out
/// `ride_out` of blockd not answering, counted from `away` (set here
/// when it stops answering, cleared when it answers).
pub(crate) async fn ask<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: &str,
    ride_out: Duration,
    away: &mut Option<std::time::Instant>,
) -> Asked<T> {
    let why = match client.call_or_refusal::<T>("GET", path).await {
        Ok(Ok(v)) => {
            *away = None;
            return Asked::Answer(v);
        }
        Ok(Err((409, _))) => {
            *away = None;
            return Asked::Starting;
        }
        Ok(Err((status, refused))) if status >= 500 => refused.message().to_string(),
        Ok(Err((_, refused))) => return Asked::Refused(refused),
        Err(u) if u.transient => u.message,
        Err(u) => return Asked::Refused(u.into()),
    };
    let since = *away.get_or_insert_with(std::time::Instant::now);
    if since.elapsed() >= ride_out {
        return Asked::Gone(format!(
            "{why} (no answer with the task for {})",
            human_secs(since.elapsed().as_secs_f64())
        ));
    }
    Asked::Away(since.elapsed())
}

/// The tasks `status --name NAME --wait` follows, asked for as a wait
/// asks (a blockd restarting is waited for).
///
/// # Errors
/// blockd's refusal (no such task or group), or blockd away for the whole
/// ride-out.
pub async fn named(client: &Client, path: &str, name: &str) -> Result<Vec<Task>, Failure> {
    let ride_out = ride_out()?;
    let mut away = None;
    let mut said = false;
    loop {
        match ask::<Vec<Task>>(client, path, ride_out, &mut away).await {
            Asked::Answer(tasks) => return Ok(tasks),
            Asked::Away(_) | Asked::Starting => {
                if !said && std::io::stderr().is_terminal() {
                    eprintln!("waiting for blockd to answer with {name} (Ctrl-C stops waiting)");
                    said = true;
                }
                tokio::time::sleep(POLL_UNREACHABLE).await;
            }
            Asked::Refused(f) => return Err(f),
            Asked::Gone(e) => return Err(lost(&e, name)),
        }
    }
}

/// Polls `tasks` until every one is final; returns their last state.
/// `group`: the group backup they are all members of, named when the
/// wait cannot learn how they ended.
async fn poll(
    client: &Client,
    mut tasks: Vec<Task>,
    bars: Option<&Bars>,
    ride_out: Duration,
    group: Option<&str>,
) -> Result<Vec<Task>, Failure> {
    let started = std::time::Instant::now();
    // Per task, since when blockd has not answered with it.
    let mut away: Vec<Option<std::time::Instant>> = vec![None; tasks.len()];
    loop {
        if tasks.iter().all(|t| t.state.is_final()) {
            return Ok(tasks);
        }
        let interval = if away.iter().any(Option::is_some) {
            POLL_UNREACHABLE
        } else if started.elapsed() < Duration::from_secs(2) {
            POLL_FIRST
        } else {
            POLL
        };
        tokio::time::sleep(interval).await;
        for (i, t) in tasks.iter_mut().enumerate() {
            if t.state.is_final() {
                continue;
            }
            let path = format!("/v1/tasks/{}", encode(&t.id));
            let name = group.unwrap_or(&t.id);
            match ask::<Task>(client, &path, ride_out, &mut away[i]).await {
                Asked::Answer(now) => {
                    *t = now;
                    if let Some(bars) = bars {
                        bars.show(i, t);
                    }
                }
                Asked::Starting => {}
                Asked::Away(since) => {
                    if let Some(bars) = bars {
                        bars.unreachable(since);
                    }
                }
                // blockd answered, and not with the task (gone from a
                // state directory put back from elsewhere, say).
                // A refusal for good (no such task any more, no
                // permission): a failure, not an outcome to follow.
                Asked::Refused(f) => {
                    return Err(Failure::Failed(format!(
                        "{}\nstopped waiting for {name}",
                        f.message()
                    )))
                }
                Asked::Gone(e) => return Err(lost(&e, name)),
            }
        }
    }
}

/// The error of a wait that could not learn how `name` (a task or a group
/// backup) ended (blockd stopped and did not come back; tasks resume when
/// it starts again): exit status 3, not a failure of the task.
fn lost(e: &str, name: &str) -> Failure {
    Failure::Unknown(format!(
        "{e}\nstopped waiting for {name}, whose outcome is unknown: a task blockd was \
         running resumes when blockd starts again; follow it with \
         `blockctl cloudsnap status --name {name} --wait`"
    ))
}

/// The closing line of a task that ended.
fn outcome(t: &Task) -> String {
    match (t.state, t.kind) {
        (TaskState::Done, TaskKind::Backup) => format!(
            "{} Done: {}, {} read, {} uploaded, {} reused in {:.1} s",
            t.id,
            t.snapshot,
            human_size(t.bytes_done),
            human_size(t.bytes_transferred),
            human_size(t.bytes_reused),
            t.elapsed_secs,
        ),
        (TaskState::Done, TaskKind::Restore) => format!(
            "{} Done: {} restored into {}, {} written, {} fetched in {:.1} s",
            t.id,
            t.snapshot,
            t.volume,
            human_size(t.bytes_done),
            human_size(t.bytes_transferred),
            t.elapsed_secs,
        ),
        (state, _) => format!(
            "{} {state}: {}: {}",
            t.id,
            t.snapshot,
            t.error.as_deref().unwrap_or(match state {
                TaskState::Stopped => "stopped",
                _ => "no reason given",
            }),
        ),
    }
}

/// Waits for `tasks` to end and reports how each ended: a line per task
/// (JSON: the final tasks), with failures on stderr.
///
/// # Errors
/// When the daemon cannot be asked, or when any task ended Failed or
/// Stopped (so the exit code is non-zero).
pub async fn wait(out: Output, client: &Client, tasks: Vec<Task>) -> Result<(), Failure> {
    let ride_out = ride_out()?;
    let bars = Bars::new(&tasks);
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    // The group backup every task belongs to, if they are its members
    // (not a single task asked for by its id).
    let group = tasks
        .first()
        .and_then(|t| t.group.clone())
        .filter(|g| tasks.len() > 1 && tasks.iter().all(|t| t.group.as_ref() == Some(g)));
    // Ctrl-C ends the wait, not the tasks: the daemon runs them.
    let result = tokio::select! {
        r = poll(client, tasks, bars.as_ref(), ride_out, group.as_deref()) => Some(r),
        Ok(()) = tokio::signal::ctrl_c() => None,
    };
    if let Some(bars) = &bars {
        bars.clear();
    }
    let Some(result) = result else {
        let first = group
            .as_deref()
            .or(ids.first().map(String::as_str))
            .unwrap_or("ID");
        return Err(Failure::Interrupted(format!(
            "stopped waiting; the daemon goes on with task(s) {}: follow with `blockctl cloudsnap status --name {first} --wait`, stop with `blockctl cloudsnap stop {first}`",
            ids.join(", ")
        )));
    };
    let tasks = result?;
    if out.is_json() {
        output::json(&tasks);
    }
    let mut bad = Vec::new();
    for t in &tasks {
        if t.state == TaskState::Done {
            if !out.is_json() {
                line(outcome(t));
            }
        } else if out.is_json() {
            // stderr holds one JSON object: the outcomes go into it.
            bad.push(outcome(t));
        } else {
            eprintln!("{}", outcome(t));
            bad.push(String::new());
        }
    }
    if !bad.is_empty() {
        let mut m = format!(
            "{} of {} cloudsnap task(s) did not complete",
            bad.len(),
            tasks.len()
        );
        if out.is_json() {
            m = format!("{m}: {}", bad.join("; "));
        }
        return Err(m.into());
    }
    Ok(())
}
