//! The hit ratio over a sliding window: the share of lookups answered from a fresh
//! cache entry in the last `width` seconds, kept as one bucket per second. Pure: the
//! caller passes the time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

pub struct HitWindow {
    width_s: u64,
    origin: Instant,
    /// Seconds since `origin` that saw lookups, oldest first: (second, fresh, all).
    buckets: VecDeque<(u64, u64, u64)>,
}

impl HitWindow {
    pub fn new(width: Duration, origin: Instant) -> Self {
        Self {
            width_s: width.as_secs().max(1),
            origin,
            buckets: VecDeque::new(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    fn expire(&mut self, second: u64) {
        while let Some(&(s, _, _)) = self.buckets.front()
            && s + self.width_s <= second
        {
            self.buckets.pop_front();
        }
    }

    /// Counts one lookup at `now`.
    pub fn record(&mut self, now: Instant, fresh: bool) {
        let second = self.second(now);
        self.expire(second);
        match self.buckets.back_mut() {
            Some((s, f, n)) if *s == second => {
                *f += u64::from(fresh);
                *n += 1;
            }
            _ => self.buckets.push_back((second, u64::from(fresh), 1)),
        }
    }

    /// Fresh lookups over all lookups in the window ending at `now`; `None` when it saw
    /// none (no traffic is no evidence of a bad ratio).
    pub fn ratio(&mut self, now: Instant) -> Option<f64> {
        self.expire(self.second(now));
        let (fresh, all) = self
            .buckets
            .iter()
            .fold((0, 0), |(f, n), &(_, bf, bn)| (f + bf, n + bn));
        (all > 0).then(|| fresh as f64 / all as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_covers_the_last_width_seconds_only() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = HitWindow::new(Duration::from_secs(10), t0);
        assert_eq!(w.ratio(t0), None, "no lookups yet");
        for i in 0..9 {
            w.record(at(i * 100), true);
        }
        w.record(at(950), false);
        assert_eq!(w.ratio(at(999)), Some(0.9));
        // Five seconds later the misses come: both seconds are in the window.
        for i in 0..10 {
            w.record(at(5_000 + i * 10), false);
        }
        assert_eq!(w.ratio(at(9_999)), Some(9.0 / 20.0));
        // At 10 s the first second has left the window; at 15 s all of it has.
        assert_eq!(w.ratio(at(10_000)), Some(0.0));
        assert_eq!(w.ratio(at(15_000)), None);
        w.record(at(15_001), true);
        assert_eq!(w.ratio(at(15_002)), Some(1.0));
        assert!(w.buckets.len() <= 10, "one bucket per second at most");
    }
}
