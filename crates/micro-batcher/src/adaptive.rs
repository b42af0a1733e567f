//! A window that sizes itself for a latency target (`micro_batcher.target_latency_ms`).
//!
//! An event's event-to-batch latency is its age when it reaches the batcher (ingest and
//! one broker hop: the upstream part) plus the time its window stays open. So:
//!
//! - **delay** = target − a high estimate of the upstream part (mean + 4 deviations, as
//!   TCP estimates a round trip) − a trim learnt from closed batches that still missed
//!   the target, capped by `max_delay_ms`;
//! - **size** = the events one partition can expect within that delay at its measured
//!   arrival rate, capped by `max_events`: under load windows fill up to the cap, and a
//!   quiet partition closes as soon as it holds what its rate predicts;
//! - **idle close**: a window also closes once its partition has been silent for ten
//!   mean arrival gaps (under Poisson arrivals a gap that long comes once in 22,000),
//!   and at least [`SAMPLE`] twice over, so when traffic stops, waiting for the rest of
//!   the delay gains nothing.
//!
//! Events reach the batcher in bursts (one fetch, one poll), microseconds apart within
//! a burst. So the arrival rate is sampled over at least [`SAMPLE`] of time, not from
//! gaps inside a burst.
//!
//! Pure: times come in as arguments, so tests drive it with paused time.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Weight of a new observation in the running means.
const GAIN: f64 = 0.125;
/// Weight of a new observation in the mean deviation.
const DEVIATION_GAIN: f64 = 0.25;
/// How many mean arrival gaps of silence close a window early.
const IDLE_GAPS: f64 = 10.0;
/// The shortest span an arrival rate is measured over (several fetches).
pub const SAMPLE: Duration = Duration::from_millis(10);
/// Ages beyond this many targets are clamped: a hostile or broken `ingested_at` must
/// not drive the delay to zero for long (nor negative ages lengthen it).
const MAX_AGE_TARGETS: f64 = 10.0;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub target: Duration,
    pub max_delay: Duration,
    pub max_events: usize,
}

/// Arrival gaps of one partition.
#[derive(Debug, Clone, Copy)]
struct Arrivals {
    last: Instant,
    /// Start of the current sample and the events since.
    since: Instant,
    count: u32,
    /// Mean gap between events, seconds; `None` until a first sample is complete.
    gap: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Adaptive {
    limits: Limits,
    /// Mean and mean deviation of the upstream age, seconds.
    upstream: Option<(f64, f64)>,
    /// Seconds taken off the delay because closed batches missed the target.
    trim: f64,
    arrivals: HashMap<i32, Arrivals>,
}

impl Adaptive {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            upstream: None,
            trim: 0.0,
            arrivals: HashMap::new(),
        }
    }

    fn target(&self) -> f64 {
        self.limits.target.as_secs_f64()
    }

    /// An event of `partition` arrived at `now`, `age_ms` after it was ingested.
    pub fn arrived(&mut self, partition: i32, now: Instant, age_ms: i64) {
        let age = (age_ms as f64 / 1000.0).clamp(0.0, MAX_AGE_TARGETS * self.target());
        self.upstream = Some(match self.upstream {
            None => (age, age / 2.0),
            Some((mean, dev)) => (
                mean + GAIN * (age - mean),
                dev + DEVIATION_GAIN * ((age - mean).abs() - dev),
            ),
        });
        match self.arrivals.get_mut(&partition) {
            None => {
                self.arrivals.insert(
                    partition,
                    Arrivals {
                        last: now,
                        since: now,
                        count: 0,
                        gap: None,
                    },
                );
            }
            Some(a) => {
                a.last = now;
                a.count += 1;
                let span = now.saturating_duration_since(a.since);
                if span >= SAMPLE {
                    let gap = span.as_secs_f64() / f64::from(a.count);
                    a.gap = Some(a.gap.map_or(gap, |g| g + GAIN * (gap - g)));
                    a.since = now;
                    a.count = 0;
                }
            }
        }
    }

    /// A batch closed; its oldest event was `latency_ms` old at the close.
    pub fn closed(&mut self, latency_ms: i64) {
        let latency = (latency_ms.max(0) as f64) / 1000.0;
        let over = latency - self.target();
        if over > 0.0 {
            self.trim = (self.trim + over).min(self.target());
        } else {
            self.trim *= 1.0 - GAIN;
        }
    }

    /// How long a window may stay open now.
    pub fn delay(&self) -> Duration {
        let upstream = self.upstream.map_or(0.0, |(mean, dev)| mean + 4.0 * dev);
        let budget = self.target() - upstream - self.trim;
        Duration::from_secs_f64(budget.clamp(0.0, self.limits.max_delay.as_secs_f64()))
    }

    /// How many events a window of `partition` gathers at most now.
    pub fn size(&self, partition: i32) -> usize {
        let max = self.limits.max_events.max(1);
        match self.arrivals.get(&partition).and_then(|a| a.gap) {
            Some(gap) if gap > 0.0 => {
                let expected = (self.delay().as_secs_f64() / gap).ceil();
                (expected.max(1.0) as usize).min(max)
            }
            // Several events at the same instant: a burst, fill up.
            Some(_) => max,
            None => max,
        }
    }

    /// When a window of `partition` closes for want of traffic, if its rate is known.
    pub fn idle_deadline(&self, partition: i32) -> Option<Instant> {
        let a = self.arrivals.get(&partition)?;
        let gap = a.gap.filter(|g| *g > 0.0)?;
        Some(a.last + Duration::from_secs_f64(gap * IDLE_GAPS).max(2 * SAMPLE))
    }

    /// Forgets a partition this member no longer owns.
    pub fn forget(&mut self, partition: i32) {
        self.arrivals.remove(&partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(target_ms: u64) -> Limits {
        Limits {
            target: Duration::from_millis(target_ms),
            max_delay: Duration::from_millis(200),
            max_events: 512,
        }
    }

    /// Events of partition 0 every `gap`, each `age_ms` old on arrival, for `n` events.
    fn feed(a: &mut Adaptive, start: Instant, gap: Duration, age_ms: i64, n: u32) -> Instant {
        let mut now = start;
        for _ in 0..n {
            a.arrived(0, now, age_ms);
            now += gap;
        }
        now
    }

    #[tokio::test(start_paused = true)]
    async fn the_delay_is_what_the_target_leaves_after_upstream() {
        let mut a = Adaptive::new(limits(50));
        assert_eq!(a.delay(), Duration::from_millis(50), "nothing known yet");
        feed(&mut a, Instant::now(), Duration::from_millis(1), 20, 200);
        // Steady 20 ms upstream: no deviation left, so about 30 ms remain.
        let d = a.delay().as_secs_f64() * 1000.0;
        assert!((29.0..=31.0).contains(&d), "delay {d} ms");
        // Jittery upstream (10 or 30 ms) costs a margin of four deviations.
        let mut j = Adaptive::new(limits(50));
        let mut now = Instant::now();
        for i in 0..200 {
            j.arrived(0, now, if i % 2 == 0 { 10 } else { 30 });
            now += Duration::from_millis(1);
        }
        assert!(j.delay() < Duration::from_millis(5), "{:?}", j.delay());
        // An upstream beyond the target leaves no delay at all.
        let mut late = Adaptive::new(limits(50));
        feed(&mut late, Instant::now(), Duration::from_millis(1), 80, 50);
        assert_eq!(late.delay(), Duration::ZERO);
        // And the delay never passes max_delay.
        let mut wide = Adaptive::new(limits(10_000));
        feed(&mut wide, Instant::now(), Duration::from_millis(1), 0, 5);
        assert_eq!(wide.delay(), Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn windows_grow_with_the_rate_and_stay_small_when_traffic_is_thin() {
        // 10 ms upstream, 50 ms target: 40 ms of delay.
        let mut busy = Adaptive::new(limits(50));
        feed(
            &mut busy,
            Instant::now(),
            Duration::from_micros(20),
            10,
            2000,
        );
        assert_eq!(busy.size(0), 512, "50k events/s fill the cap");
        let mut moderate = Adaptive::new(limits(50));
        feed(
            &mut moderate,
            Instant::now(),
            Duration::from_millis(1),
            10,
            100,
        );
        let n = moderate.size(0);
        assert!((38..=42).contains(&n), "1k events/s over 40 ms: {n}");
        let mut thin = Adaptive::new(limits(50));
        feed(
            &mut thin,
            Instant::now(),
            Duration::from_millis(100),
            10,
            20,
        );
        assert_eq!(thin.size(0), 1, "one event per 100 ms: close at once");
        assert_eq!(thin.size(7), 512, "an unseen partition is not limited");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_partition_closes_after_ten_gaps() {
        let mut a = Adaptive::new(limits(50));
        let start = Instant::now();
        assert_eq!(a.idle_deadline(0), None);
        let end = feed(&mut a, start, Duration::from_millis(5), 5, 10);
        let last = end - Duration::from_millis(5);
        assert_eq!(a.idle_deadline(0), Some(last + Duration::from_millis(50)));
        // Faster traffic: never sooner than two samples.
        let mut fast = Adaptive::new(limits(50));
        let end = feed(&mut fast, start, Duration::from_millis(1), 5, 30);
        let last = end - Duration::from_millis(1);
        assert_eq!(fast.idle_deadline(0), Some(last + 2 * SAMPLE));
        a.forget(0);
        assert_eq!(a.idle_deadline(0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_that_miss_the_target_shorten_the_delay_until_they_do_not() {
        let mut a = Adaptive::new(limits(50));
        feed(&mut a, Instant::now(), Duration::from_millis(1), 10, 200);
        let open_loop = a.delay();
        // Something after arrival (a slow poll) adds 15 ms the estimate does not see.
        let taken = |a: &Adaptive| (open_loop.as_secs_f64() - a.delay().as_secs_f64()) * 1000.0;
        a.closed(65);
        assert!((taken(&a) - 15.0).abs() < 0.01, "{} ms", taken(&a));
        a.closed(65);
        assert!((taken(&a) - 30.0).abs() < 0.01, "{} ms", taken(&a));
        for _ in 0..100 {
            a.closed(40);
        }
        assert!(taken(&a) < 0.5, "trim left: {} ms", taken(&a));
        // A wild latency cannot trim more than the target itself.
        a.closed(i64::MAX);
        assert_eq!(a.delay(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_are_measured_as_their_average_rate() {
        // 20 events at once every 10 ms: 2,000/s, not the microseconds inside a burst.
        let mut a = Adaptive::new(limits(50));
        let start = Instant::now();
        for burst in 0..50u32 {
            let at = start + Duration::from_millis(10) * burst;
            for i in 0..20u32 {
                a.arrived(0, at + Duration::from_micros(u64::from(i)), 5);
            }
        }
        let n = a.size(0);
        assert!((80..=100).contains(&n), "45 ms at 2,000/s: {n}");
        let last = start + Duration::from_millis(490) + Duration::from_micros(19);
        let idle = a.idle_deadline(0).unwrap() - last;
        assert!(
            idle >= Duration::from_millis(10),
            "no close between bursts: {idle:?}"
        );
    }

    #[test]
    fn hostile_ages_are_clamped() {
        let now = Instant::now();
        let mut a = Adaptive::new(limits(50));
        a.arrived(0, now, -1_000_000);
        assert_eq!(
            a.delay(),
            Duration::from_millis(50),
            "a future ingest time is age 0"
        );
        let mut b = Adaptive::new(limits(50));
        b.arrived(0, now, i64::MAX);
        assert_eq!(b.delay(), Duration::ZERO);
        // One absurd age among normal ones wears off.
        for i in 1..200 {
            b.arrived(0, now + Duration::from_millis(i), 5);
        }
        assert!(b.delay() > Duration::from_millis(40), "{:?}", b.delay());
    }
}
