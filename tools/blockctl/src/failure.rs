//! How a command fails, and the exit status that says so.
//!
//! blockctl exits 0 when the command did what it was asked, 1 when it
//! failed (the daemon refused or could not do it, or is not running), and
//! 2 when the command line itself is wrong (clap's own usage errors, and
//! the few that only a look at several arguments together finds).

/// A command's failure.
#[derive(Debug)]
pub enum Failure {
    /// The command line is wrong: exit status 2.
    Usage(String),
    /// The command failed: exit status 1.
    Failed(String),
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
            Self::Interrupted(_) => 130,
        }
    }

    /// What went wrong and what to do, for a person.
    pub fn message(&self) -> &str {
        match self {
            Self::Usage(m) | Self::Failed(m) | Self::Interrupted(m) => m,
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
