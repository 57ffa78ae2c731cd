//! Names of cloud snapshots: the one place that makes, checks, splits and
//! reads them.
//!
//! A cloud snapshot is `VOLUME/NAME` (its manifest is
//! `snapshots/VOLUME/NAME`). NAME is the freeze time in UTC to the
//! millisecond, then eight hex digits of randomness:
//! `20261121T101500.123Z-3f4f0a67`. Names therefore sort by time, two
//! backups in the same millisecond still differ, and anything else found
//! under `snapshots/` is not one of blockd's (listed as such, never used).
//! Group ids are snapshot names too (the group's freeze point).

use std::time::SystemTime;

/// A new name for a snapshot frozen now.
pub fn new() -> String {
    let stamp = humantime::format_rfc3339_millis(SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let mut t = [0u8; 4];
    super::crypto::fill_random(&mut t);
    format!("{stamp}-{}", hex::encode(t))
}

/// True for names [`new`] makes.
pub fn is_valid(n: &str) -> bool {
    let b = n.as_bytes();
    b.len() == 29
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'.'
        && b[16..19].iter().all(u8::is_ascii_digit)
        && b[19] == b'Z'
        && b[20] == b'-'
        && b[21..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// The freeze time a name carries.
pub fn time(n: &str) -> Option<SystemTime> {
    if !n.is_ascii() {
        return None;
    }
    let b = n.get(..19)?;
    let s = format!(
        "{}-{}-{}T{}:{}:{}{}Z",
        &b[0..4],
        &b[4..6],
        &b[6..8],
        &b[9..11],
        &b[11..13],
        &b[13..15],
        &b[15..19]
    );
    humantime::parse_rfc3339(&s).ok()
}

/// Splits a snapshot id `VOLUME/NAME`.
pub fn split(id: &str) -> Option<(&str, &str)> {
    id.split_once('/')
        .filter(|(v, n)| !v.is_empty() && !n.is_empty() && !n.contains('/'))
}

/// The id `VOLUME/NAME`.
pub fn id(volume: &str, name: &str) -> String {
    format!("{volume}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_names_are_valid_sort_by_time_and_carry_it() {
        let a = new();
        assert!(is_valid(&a), "{a}");
        let t = time(&a).unwrap();
        let age = SystemTime::now().duration_since(t).unwrap();
        assert!(age.as_secs() < 5);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(new() > a);
        assert!(!is_valid("20261121T101500Z-3f4f0a67"));
        assert!(!is_valid("20261121T101500.123Z-3F4F0A67"));
        assert_eq!(time("é"), None);
        assert_eq!(split("v/n"), Some(("v", "n")));
        assert_eq!(split("v/n/x"), None);
        assert_eq!(split("/n"), None);
        assert_eq!(id("v", "n"), "v/n");
    }
}
