//! What an error means to whoever asked. Every module's error says which
//! of these it is ([`Outcome`]); the control API turns them into HTTP
//! statuses in one place (`api::Failure`), the NBD server turns I/O errors
//! into NBD errnos in one place (`nbd::server::errno_of`), and the object
//! store layer decides alone what is worth retrying (`repo::retry`).
//!
//! This module imports nothing of the daemon: every layer may use it.

/// The kind of failure, as the caller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request is wrong (a name, a size, a flag's value, a missing or
    /// conflicting argument): fix it and retry. blockctl exits 2 for
    /// these, as for its own usage errors.
    Invalid,
    /// The request is well formed, but something it depends on refuses
    /// it as things stand: a hook failed, a directory cannot be used, a
    /// key does not open the repository, a location is read-only or gone,
    /// the kernel will not take a device. Fix that, then retry.
    Refused,
    /// Something it names does not exist.
    NotFound,
    /// It conflicts with what exists or runs now: wait, stop or delete
    /// that first.
    Conflict,
    /// An object store failed or holds damaged data.
    Upstream,
    /// blockd itself failed (local I/O, the state database).
    Failed,
}
