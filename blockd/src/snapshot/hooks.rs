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

/// [`run`], telling `started` the id of the hook's process group once it
/// has started (the id of its shell).
pub async fn run_noting(command: &str, timeout: Duration, started: impl FnOnce(u32)) -> HookRecord {
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
    if let Some(pid) = child.id() {
        started(pid);
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

/// Waits until no process of group `group` is left (a hook started by a
/// daemon that has since died), at most `timeout`; then kills what is
/// left of it, as a hook that overran its timeout is killed.
pub async fn outlive(group: u32, timeout: Duration) {
    let Some(pid) = i32::try_from(group)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let alive = || rustix::process::test_kill_process_group(pid).is_ok();
    let until = tokio::time::Instant::now() + timeout;
    while alive() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if alive() {
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
