//! How a command fails, and the exit status that says so.
//!
//! blockctl exits 0 when the command did what it was asked, 2 when the
//! command line itself is wrong, 3 when it could not learn the outcome,
//! and 1 when it failed otherwise.
//!
//! - 2: a wrong command line, found by clap (usage errors), by blockctl
//!   (what only a look at several arguments together finds), or by the
//!   daemon, which answers HTTP 400 when a request's values are wrong or
//!   missing (a schedule's time, a size of 0, a flag of another provider,
//!   `--cred-id` where several locations exist): a command to correct,
//!   not to run again as it is.
//! - 1: the daemon refused it as things stand (something named is not
//!   there, is busy, a hook failed, a key does not open the repository),
//!   could not do it, or is not running.
//! - 3: the outcome is unknown. `--wait` (or `status --wait`) gave up on a
//!   daemon that stopped answering: the tasks may still end well once it
//!   starts again, so a script must follow them, not start them again. Or
//!   a request that changes something lost its connection before the
//!   answer: it may have been carried out, so a script must look before
//!   asking again.

/// A command's failure.
#[derive(Debug)]
pub enum Failure {
    /// The command line is wrong: exit status 2.
    Usage(String),
    /// The command failed: exit status 1.
    Failed(String),
    /// The outcome is unknown: a wait stopped without learning how its
    /// tasks ended (blockd away for the whole ride-out; the tasks resume
    /// when blockd starts again), or a request that changes something lost
    /// its connection before the answer: exit status 3.
    Unknown(String),
    /// Interrupted (Ctrl-C) while waiting: exit status 130, as a shell
    /// reports a command ended by SIGINT.
    Interrupted(String),
}

impl Failure {
    /// The process exit status.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Failed(_) => 1,
            Self::Unknown(_) => 3,
            Self::Interrupted(_) => 130,
        }
    }

    /// What went wrong and what to do, for a person.
    pub fn message(&self) -> &str {
        match self {
            Self::Usage(m) | Self::Failed(m) | Self::Unknown(m) | Self::Interrupted(m) => m,
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::Failed(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Self::Failed(message.to_string())
    }
}
