//! When a schedule runs, pxctl's rules in UTC: `--periodic N` (minutes,
//! or a duration such as `30s` or `2h`), `--daily hh:mm`, `--weekly
//! weekday@hh:mm`, `--monthly day@hh:mm`. Pure: the scheduler hands in
//! the times.
//!
//! A schedule is due at the earliest of its rules' next slots after its
//! last run (or its creation). Slots are computed from the last run, not
//! from the previous slot, so runs missed while the daemon was down
//! collapse into one run at start. A monthly day past the end of a month
//! (the 31st in April) runs on that month's last day.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// One rule of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    /// Every `secs` seconds after the last run.
    Periodic {
        /// Interval.
        secs: u64,
    },
    /// Every day at `hour:minute`.
    Daily {
        /// Hour, 0–23.
        hour: u32,
        /// Minute, 0–59.
        minute: u32,
    },
    /// Every week on `weekday` (0 = Monday) at `hour:minute`.
    Weekly {
        /// Day of the week, 0 = Monday.
        weekday: u32,
        /// Hour.
        hour: u32,
        /// Minute.
        minute: u32,
    },
    /// Every month on `day` (1–31) at `hour:minute`.
    Monthly {
        /// Day of the month.
        day: u32,
        /// Hour.
        hour: u32,
        /// Minute.
        minute: u32,
    },
}

const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

fn hhmm(s: &str, flag: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{flag} {s:?}: give the time as hh:mm in UTC, e.g. 21:00");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    // One or two digits of hour, two of minute: `9:5` could mean 09:05
    // or 09:50, and is refused.
    let digits = |x: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&x.len()) && x.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 1..=2) || !digits(m, 2..=2) {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok((h, m))
}

/// The longest `--periodic` interval: a year.
const MAX_PERIOD_SECS: u64 = 365 * 24 * 3600;

impl Rule {
    /// `--periodic`: minutes, or a duration with a unit (`30s`, `2h`), at
    /// most a year.
    ///
    /// # Errors
    /// Not a positive interval.
    pub fn periodic(s: &str) -> Result<Self, String> {
        let secs = match s.parse::<u64>() {
            Ok(m) => m.saturating_mul(60),
            Err(_) => humantime::parse_duration(s)
                .map_err(|_| {
                    format!("--periodic {s:?}: give minutes (e.g. 60) or a duration (e.g. 30s, 2h)")
                })?
                .as_secs(),
        };
        if secs == 0 {
            return Err(format!(
                "--periodic {s:?}: the interval must be at least 1s"
            ));
        }
        if secs > MAX_PERIOD_SECS {
            return Err(format!(
                "--periodic {s:?}: the interval must be at most a year (525600 minutes); for rarer runs use --monthly"
            ));
        }
        Ok(Self::Periodic { secs })
    }

    /// `--daily hh:mm`.
    ///
    /// # Errors
    /// A malformed time.
    pub fn daily(s: &str) -> Result<Self, String> {
        let (hour, minute) = hhmm(s, "--daily")?;
        Ok(Self::Daily { hour, minute })
    }

    /// `--weekly weekday@hh:mm` (`sunday@10:00`, `sun@10:00`).
    ///
    /// # Errors
    /// A malformed day or time.
    pub fn weekly(s: &str) -> Result<Self, String> {
        let bad = || format!("--weekly {s:?}: give weekday@hh:mm in UTC, e.g. sunday@10:00");
        let (d, t) = s.split_once('@').ok_or_else(bad)?;
        let d = d.to_ascii_lowercase();
        let weekday = WEEKDAYS
            .iter()
            .position(|w| d.len() >= 3 && w.starts_with(&d))
            .ok_or_else(bad)?;
        let (hour, minute) = hhmm(t, "--weekly")?;
        Ok(Self::Weekly {
            weekday: u32::try_from(weekday).unwrap_or(0),
            hour,
            minute,
        })
    }

    /// `--monthly day@hh:mm` (day 1–31).
    ///
    /// # Errors
    /// A malformed day or time.
    pub fn monthly(s: &str) -> Result<Self, String> {
        let bad =
            || format!("--monthly {s:?}: give day@hh:mm in UTC with day 1 to 31, e.g. 15@01:00");
        let (d, t) = s.split_once('@').ok_or_else(bad)?;
        let day: u32 = d.parse().map_err(|_| bad())?;
        if !(1..=31).contains(&day) {
            return Err(bad());
        }
        let (hour, minute) = hhmm(t, "--monthly")?;
        Ok(Self::Monthly { day, hour, minute })
    }

    /// The rule as its flag's value is written (`09:05`, `sunday@09:05`,
    /// `15@01:00`; a periodic rule in minutes or seconds), which is how a
    /// schedule stores and shows it whatever form it was given in.
    pub fn arg(&self) -> String {
        match *self {
            Self::Periodic { secs } if secs % 60 == 0 => (secs / 60).to_string(),
            Self::Periodic { secs } => format!("{secs}s"),
            Self::Daily { hour, minute } => format!("{hour:02}:{minute:02}"),
            Self::Weekly {
                weekday,
                hour,
                minute,
            } => format!(
                "{}@{hour:02}:{minute:02}",
                WEEKDAYS.get(weekday as usize).unwrap_or(&"?")
            ),
            Self::Monthly { day, hour, minute } => format!("{day}@{hour:02}:{minute:02}"),
        }
    }

    /// The first slot of this rule strictly after `last` (for a periodic
    /// rule: `last` plus the interval).
    pub fn next_after(&self, last: DateTime<Utc>) -> DateTime<Utc> {
        match *self {
            Self::Periodic { secs } => {
                last + Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX / 2))
            }
            Self::Daily { hour, minute } => {
                let mut d = last.date_naive();
                loop {
                    let t = at(d, hour, minute);
                    if t > last {
                        return t;
                    }
                    d = d.succ_opt().unwrap_or(d);
                }
            }
            Self::Weekly {
                weekday,
                hour,
                minute,
            } => {
                let mut d = last.date_naive();
                loop {
                    if d.weekday().num_days_from_monday() == weekday {
                        let t = at(d, hour, minute);
                        if t > last {
                            return t;
                        }
                    }
                    d = d.succ_opt().unwrap_or(d);
                }
            }
            Self::Monthly { day, hour, minute } => {
                let (mut y, mut m) = (last.year(), last.month());
                loop {
                    let t = at(month_day(y, m, day), hour, minute);
                    if t > last {
                        return t;
                    }
                    (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                }
            }
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Periodic { secs } if secs % 60 == 0 => write!(f, "periodic {}m", secs / 60),
            Self::Periodic { secs } => write!(f, "periodic {secs}s"),
            Self::Daily { hour, minute } => write!(f, "daily @{hour:02}:{minute:02}"),
            Self::Weekly {
                weekday,
                hour,
                minute,
            } => write!(
                f,
                "weekly {}@{hour:02}:{minute:02}",
                WEEKDAYS.get(weekday as usize).unwrap_or(&"?")
            ),
            Self::Monthly { day, hour, minute } => {
                write!(f, "monthly {day}@{hour:02}:{minute:02}")
            }
        }
    }
}

fn at(d: NaiveDate, hour: u32, minute: u32) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_hms_opt(hour, minute, 0).unwrap_or_default())
}

/// Day `day` of month `m` of year `y`, or the month's last day.
fn month_day(y: i32, m: u32, day: u32) -> NaiveDate {
    (1..=day)
        .rev()
        .find_map(|d| NaiveDate::from_ymd_opt(y, m, d))
        .unwrap_or_default()
}

/// When a schedule with `rules` is next due after its last run `last`.
pub fn next_due(rules: &[Rule], last: DateTime<Utc>) -> Option<DateTime<Utc>> {
    rules.iter().map(|r| r.next_after(last)).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn rules_parse_and_refuse() {
        assert_eq!(Rule::periodic("60"), Ok(Rule::Periodic { secs: 3600 }));
        assert_eq!(Rule::periodic("30s"), Ok(Rule::Periodic { secs: 30 }));
        assert_eq!(
            Rule::daily("21:05"),
            Ok(Rule::Daily {
                hour: 21,
                minute: 5
            })
        );
        assert_eq!(
            Rule::weekly("Sun@10:00"),
            Ok(Rule::Weekly {
                weekday: 6,
                hour: 10,
                minute: 0
            })
        );
        assert_eq!(
            Rule::monthly("31@00:30"),
            Ok(Rule::Monthly {
                day: 31,
                hour: 0,
                minute: 30
            })
        );
        for bad in ["0", "x", "0s", "99999999999", "525601", "400days"] {
            assert!(Rule::periodic(bad).is_err(), "{bad}");
        }
        for bad in ["24:00", "12:60", "1200", "a:b"] {
            assert!(Rule::daily(bad).is_err(), "{bad}");
        }
        for bad in ["sundae@10:00", "su@10:00", "sunday", "sunday@25:00"] {
            assert!(Rule::weekly(bad).is_err(), "{bad}");
        }
        for bad in ["0@10:00", "32@10:00", "x@10:00", "15"] {
            assert!(Rule::monthly(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn next_slots() {
        let daily = Rule::daily("21:00").unwrap();
        assert_eq!(
            daily.next_after(t("2026-11-22T20:59:59Z")),
            t("2026-11-22T21:00:00Z")
        );
        assert_eq!(
            daily.next_after(t("2026-11-22T21:00:00Z")),
            t("2026-11-23T21:00:00Z")
        );
        // 2026-11-22 is a Sunday.
        let weekly = Rule::weekly("monday@08:00").unwrap();
        assert_eq!(
            weekly.next_after(t("2026-11-22T09:00:00Z")),
            t("2026-11-23T08:00:00Z")
        );
        assert_eq!(
            weekly.next_after(t("2026-11-23T08:00:00Z")),
            t("2026-11-30T08:00:00Z")
        );
        let monthly = Rule::monthly("31@01:00").unwrap();
        assert_eq!(
            monthly.next_after(t("2026-11-22T00:00:00Z")),
            t("2026-11-30T01:00:00Z")
        );
        assert_eq!(
            monthly.next_after(t("2026-11-30T01:00:00Z")),
            t("2026-12-31T01:00:00Z")
        );
        assert_eq!(
            monthly.next_after(t("2027-01-31T02:00:00Z")),
            t("2027-02-28T01:00:00Z")
        );
        let p = Rule::periodic("15").unwrap();
        assert_eq!(
            p.next_after(t("2026-11-22T10:00:00Z")),
            t("2026-11-22T10:15:00Z")
        );
        // The earliest rule wins; missed slots collapse: after a run at
        // 23:00 on the 22nd, a daily 21:00 is next due on the 23rd, not on
        // every day missed before.
        let rules = [daily, weekly];
        assert_eq!(
            next_due(&rules, t("2026-11-22T23:00:00Z")),
            Some(t("2026-11-23T08:00:00Z"))
        );
        assert_eq!(next_due(&[], t("2026-11-22T23:00:00Z")), None);
        assert_eq!(daily.to_string(), "daily @21:00");
        assert_eq!(weekly.to_string(), "weekly monday@08:00");
        assert_eq!(Rule::periodic("90s").unwrap().to_string(), "periodic 90s");
    }
}
