//! Which snapshots a schedule keeps. Pure.
//!
//! A snapshot is kept if any rule keeps it: the newest `last` (`--max`,
//! at least 1, so a volume's newest snapshot is never deleted), and for
//! `daily`/`weekly`/`monthly` N, the newest snapshot of each of the N most
//! recent days (ISO weeks, months) that have one (restic's `--keep-daily`
//! rule). Everything else of that schedule and volume is deleted.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Utc};

/// The keep rules of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Keep {
    /// Newest N.
    pub last: u32,
    /// Newest of each of the last N days with a snapshot.
    pub daily: u32,
    /// Of each of the last N ISO weeks with a snapshot.
    pub weekly: u32,
    /// Of each of the last N months with a snapshot.
    pub monthly: u32,
}

/// The snapshots (name, freeze time) that `keep` does not keep.
pub fn to_delete<'a>(snaps: &'a [(String, DateTime<Utc>)], keep: &Keep) -> Vec<&'a str> {
    let mut order: Vec<&(String, DateTime<Utc>)> = snaps.iter().collect();
    // Newest first; the name (time, then a random tag) breaks ties.
    order.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut kept: BTreeSet<&str> = order
        .iter()
        .take(keep.last.max(1) as usize)
        .map(|s| s.0.as_str())
        .collect();
    let mut bucket = |n: u32, key: &dyn Fn(&DateTime<Utc>) -> (i32, u32)| {
        let mut seen = BTreeSet::new();
        for s in &order {
            if seen.len() >= n as usize {
                break;
            }
            if seen.insert(key(&s.1)) {
                kept.insert(s.0.as_str());
            }
        }
    };
    bucket(keep.daily, &|t| (t.year(), t.ordinal()));
    bucket(keep.weekly, &|t| {
        let w = t.iso_week();
        (w.year(), w.week())
    });
    bucket(keep.monthly, &|t| (t.year(), t.month()));
    order
        .iter()
        .filter(|s| !kept.contains(s.0.as_str()))
        .map(|s| s.0.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(times: &[&str]) -> Vec<(String, DateTime<Utc>)> {
        times
            .iter()
            .map(|s| {
                (
                    (*s).to_string(),
                    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc),
                )
            })
            .collect()
    }

    #[test]
    fn keeps_the_newest_and_the_calendar_buckets() {
        let s = snaps(&[
            "2026-11-01T10:00:00Z",
            "2026-11-20T09:00:00Z",
            "2026-11-20T21:00:00Z",
            "2026-11-21T21:00:00Z",
            "2026-11-22T09:00:00Z",
            "2026-11-22T21:00:00Z",
            "2026-10-15T10:00:00Z",
        ]);
        let del = |k: Keep| {
            let mut d: Vec<&str> = to_delete(&s, &k);
            d.sort_unstable();
            d
        };
        // Newest 2.
        assert_eq!(
            del(Keep {
                last: 2,
                ..Keep::default()
            }),
            vec![
                "2026-10-15T10:00:00Z",
                "2026-11-01T10:00:00Z",
                "2026-11-20T09:00:00Z",
                "2026-11-20T21:00:00Z",
                "2026-11-21T21:00:00Z",
            ]
        );
        // --max 0 still keeps the newest.
        assert_eq!(del(Keep::default()).len(), 6);
        // Newest 1 plus one per day for 3 days: the 22nd's 21:00, the
        // 21st's, the 20th's 21:00.
        assert_eq!(
            del(Keep {
                last: 1,
                daily: 3,
                ..Keep::default()
            }),
            vec![
                "2026-10-15T10:00:00Z",
                "2026-11-01T10:00:00Z",
                "2026-11-20T09:00:00Z",
                "2026-11-22T09:00:00Z",
            ]
        );
        // Monthly 2: November's newest and October's.
        assert_eq!(
            del(Keep {
                last: 1,
                monthly: 2,
                ..Keep::default()
            })
            .len(),
            5
        );
        let d = del(Keep {
            last: 1,
            monthly: 2,
            ..Keep::default()
        });
        assert!(!d.contains(&"2026-10-15T10:00:00Z"));
        // Weekly 2: ISO week 47 (16–22 Nov) newest, week 46's none (the
        // 1st is week 44): the two newest weeks with snapshots are 47 and 44.
        let d = del(Keep {
            last: 1,
            weekly: 2,
            ..Keep::default()
        });
        assert!(!d.contains(&"2026-11-01T10:00:00Z"), "{d:?}");
        assert!(d.contains(&"2026-10-15T10:00:00Z"), "{d:?}");
        assert!(to_delete(&[], &Keep::default()).is_empty());
    }
}
