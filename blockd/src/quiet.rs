//! Warnings that a client could otherwise repeat into a flood.
//!
//! A refused connection, a full listener or a failing `accept` can happen
//! thousands of times a second when a client loops; each such warning is
//! written at most once every ten seconds, and the ones in between are
//! dropped (the first of a burst says what to do).

use std::time::{Duration, Instant};

/// The least time between two warnings of one kind.
pub const WARNING_EVERY: Duration = Duration::from_secs(10);

/// True at most once every [`WARNING_EVERY`] for one `last`, which holds
/// when it was last true.
pub fn every_ten_seconds(last: &mut Option<Instant>) -> bool {
    if last.is_some_and(|t| t.elapsed() < WARNING_EVERY) {
        return false;
    }
    *last = Some(Instant::now());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_once_then_quiet_until_the_period_has_passed() {
        let mut last = None;
        assert!(every_ten_seconds(&mut last));
        assert!(!every_ten_seconds(&mut last));
        last = Some(Instant::now() - WARNING_EVERY - Duration::from_millis(1));
        assert!(every_ten_seconds(&mut last));
        assert!(!every_ten_seconds(&mut last));
    }
}
