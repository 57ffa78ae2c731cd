//! Exec hooks: application consistency around a freeze.
//!
//! `pre-exec` runs before the gates close (e.g. `fsfreeze -f /mnt/data`),
//! `post-exec` after they reopen (`fsfreeze -u /mnt/data`). Each runs under
//! `sh -c` with a timeout; on timeout the whole process group is killed.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::store::HookRecord;

/// Most output kept per hook.
const MAX_OUTPUT: usize = 64 << 10;

/// What a hook's shell does first: it does not inherit what blockd set
/// for itself (OOM protection, a private umask).
const PRELUDE: &str =
    "echo 0 >/proc/self/oom_score_adj 2>/dev/null; umask 022; blockd_hook=$1; shift; eval \"$blockd_hook\"";

/// Runs `command` with `sh -c`, killing it (and its process group) after
/// `timeout`.
pub async fn run(command: &str, timeout: Duration) -> HookRecord {
    run_noting(command, timeout, |_| {}).await
}

/// [`run`], telling `started` about the hook's shell once it has started
/// (its process id is its process group's).
pub async fn run_noting(
    command: &str,
    timeout: Duration,
    started: impl FnOnce(Started),
) -> HookRecord {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(PRELUDE)
        .arg("blockd-hook")
        .arg(command)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return HookRecord {
                command: command.into(),
                exit_code: None,
                timed_out: false,
                output: format!("cannot start: {e}"),
            }
        }
    };
    if let Some(s) = child.id().and_then(Started::of) {
        started(s);
    }
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let collect = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let a = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let b = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(a, b);
        out.extend_from_slice(&err);
        out
    };
    let waited = tokio::time::timeout(timeout, async {
        let output = collect.await;
        (child.wait().await, output)
    })
    .await;
    match waited {
        Ok((status, output)) => HookRecord {
            command: command.into(),
            exit_code: status.ok().and_then(|s| s.code()),
            timed_out: false,
            output: truncate(output),
        },
        Err(_) => {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                // Kill the whole group: `sh -c` may have children.
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
            }
            let _ = child.kill().await;
            HookRecord {
                command: command.into(),
                exit_code: None,
                timed_out: true,
                output: format!("killed after {} s", timeout.as_secs_f64()),
            }
        }
    }
}

/// A hook's shell as started: its process id (also its process group's)
/// and when it started, so that a later look never takes another process
/// that was given the same id for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Started {
    /// Process id.
    pub pid: u32,
    /// Start time, in clock ticks after boot (`/proc/PID/stat`, field 22).
    pub ticks: u64,
}

impl Started {
    /// Process `pid` as it runs now, if it does (a zombie has ended).
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command, which may hold spaces and parentheses:
        // the state (field 3) first.
        let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
        if matches!(rest.next()?, "Z" | "X" | "x") {
            return None;
        }
        let ticks = rest.nth(18)?.parse().ok()?;
        Some(Self { pid, ticks })
    }

    fn alive(self) -> bool {
        Self::of(self.pid) == Some(self)
    }
}

/// Waits until the hook `started` (by a daemon that has since died, in
/// this boot) has ended, at most `timeout`; then kills its process group,
/// as a hook that overran its timeout is killed.
pub async fn outlive(started: Started, timeout: Duration) {
    let until = tokio::time::Instant::now() + timeout;
    while started.alive() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = i32::try_from(started.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid.filter(|_| started.alive()) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

fn truncate(mut output: Vec<u8>) -> String {
    output.truncate(MAX_OUTPUT);
    String::from_utf8_lossy(&output).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hook left by a daemon that died is waited for while it runs, and
    /// only while it is that process: not a process given its id later.
    #[tokio::test]
    async fn outlive_waits_for_that_process_only() {
        use std::os::unix::process::CommandExt;
        assert_eq!(
            Started::of(std::process::id()).unwrap().pid,
            std::process::id()
        );
        let mut child = std::process::Command::new("sleep")
            .arg("0.5")
            .process_group(0)
            .spawn()
            .unwrap();
        let started = Started::of(child.id()).unwrap();
        // Reaped as init reaps the orphan of a daemon that died.
        let reaper = std::thread::spawn(move || child.wait());
        let other = Started {
            ticks: started.ticks + 1,
            ..started
        };
        let t = std::time::Instant::now();
        outlive(other, Duration::from_secs(5)).await;
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "waited for another process"
        );
        outlive(started, Duration::from_secs(5)).await;
        assert!(t.elapsed() >= Duration::from_millis(400), "did not wait");
        assert!(t.elapsed() < Duration::from_secs(4), "waited past its end");
        assert!(reaper.join().unwrap().unwrap().success(), "it was killed");
    }

    #[tokio::test]
    async fn success_failure_timeout() {
        let r = run("echo hello; echo oops >&2", Duration::from_secs(5)).await;
        assert!(r.ok());
        assert!(r.output.contains("hello") && r.output.contains("oops"));
        let r = run("exit 3", Duration::from_secs(5)).await;
        assert!(!r.ok());
        assert_eq!(r.exit_code, Some(3));
        let t = std::time::Instant::now();
        let r = run("sleep 30", Duration::from_millis(200)).await;
        assert!(r.timed_out && !r.ok());
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
