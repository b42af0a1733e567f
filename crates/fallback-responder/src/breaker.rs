//! A circuit breaker for the cache: after `threshold` consecutive failures the cache is
//! skipped for `open_for`, then one trial call decides whether it closes again. Pure;
//! time is passed in.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    opened_at: Option<Instant>,
    trial_running: bool,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            failures: 0,
            opened_at: None,
            trial_running: false,
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match self.opened_at {
            None => State::Closed,
            Some(at) if now < at + self.open_for => State::Open,
            Some(_) => State::HalfOpen,
        }
    }

    /// Whether a call may go to the cache now. Half-open lets one trial through.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen if self.trial_running => false,
            State::HalfOpen => {
                self.trial_running = true;
                true
            }
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
        self.trial_running = false;
    }

    /// Records a failure; returns true when this failure opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures += 1;
        let was_open = self.opened_at.is_some();
        if self.trial_running || self.failures >= self.threshold {
            self.opened_at = Some(now);
            self.trial_running = false;
        }
        !was_open && self.opened_at.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_recovers_through_a_trial() {
        let mut b = Breaker::new(3, Duration::from_secs(2));
        let now = Instant::now;
        assert!(b.allow(now()));
        assert!(!b.failure(now()));
        b.success();
        assert!(!b.failure(now()));
        assert!(!b.failure(now()));
        assert!(b.failure(now()), "third consecutive failure opens");
        assert_eq!(b.state(now()), State::Open);
        assert!(!b.allow(now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(b.state(now()), State::HalfOpen);
        assert!(b.allow(now()), "one trial");
        assert!(!b.allow(now()), "only one");
        b.failure(now());
        assert_eq!(b.state(now()), State::Open, "a failed trial reopens");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(b.allow(now()));
        b.success();
        assert_eq!(b.state(now()), State::Closed);
        assert!(b.allow(now()) && b.allow(now()));
    }
}
