//! When a scheduled batch job runs: `--every 1h` (a duration: the first run at once,
//! then one per interval, measured start to start) or a cron expression (`0 2 * * *`,
//! five fields, or six with seconds first; in UTC).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone)]
pub enum Schedule {
    Every(Duration),
    Cron(Box<cron::Schedule>),
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(d) = humantime::parse_duration(s) {
            if d.is_zero() {
                return Err("--every must be longer than zero".into());
            }
            return Ok(Self::Every(d));
        }
        // The cron crate wants seconds first; classic five-field cron has none.
        let fields = s.split_whitespace().count();
        let expr = if fields == 5 {
            format!("0 {s}")
        } else {
            s.to_string()
        };
        cron::Schedule::from_str(&expr)
            .map(|c| Self::Cron(Box::new(c)))
            .map_err(|e| {
                format!("--every {s:?} is neither a duration (30m, 1h) nor a cron expression (\"0 2 * * *\"): {e}")
            })
    }
}

impl Schedule {
    /// When the run after one that started at `last` (or the first, when `None`) starts.
    pub fn next(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Every(d) => match last {
                None => Some(now),
                // A run longer than the interval is followed at once, never overlapped.
                Some(last) => Some((last + chrono::Duration::from_std(*d).ok()?).max(now)),
            },
            Self::Cron(c) => c.after(&now).next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn durations_run_at_once_then_each_interval() {
        let s: Schedule = "1h".parse().unwrap();
        let now = at("2026-11-29T10:15:00Z");
        assert_eq!(s.next(None, now), Some(now));
        assert_eq!(s.next(Some(now), now), Some(at("2026-11-29T11:15:00Z")));
        // A run that overran its interval is followed at once.
        assert_eq!(
            s.next(Some(now), at("2026-11-29T12:00:00Z")),
            Some(at("2026-11-29T12:00:00Z"))
        );
    }

    #[test]
    fn cron_expressions_with_five_or_six_fields() {
        let now = at("2026-11-29T10:15:00Z");
        let five: Schedule = "0 2 * * *".parse().unwrap();
        assert_eq!(five.next(None, now), Some(at("2026-11-30T02:00:00Z")));
        let six: Schedule = "30 */10 * * * *".parse().unwrap();
        assert_eq!(six.next(Some(now), now), Some(at("2026-11-29T10:20:30Z")));
    }

    #[test]
    fn nonsense_and_zero_are_refused() {
        let err = "every day".parse::<Schedule>().unwrap_err();
        assert!(err.contains("neither a duration"), "{err}");
        assert!("0s".parse::<Schedule>().is_err());
    }
}
