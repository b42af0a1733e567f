//! Reply topics named by clients. Each one the responder answers on costs a subject in
//! the registry, a topic handle in the producer and, on a broker that creates topics on
//! demand, a topic; one that does not exist holds its response until the producer gives
//! up on it. So topics new to the responder are let in at a bounded rate, only the most
//! recently used are kept, and one that refused a response must be let in again.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The window of [`ReplyTopics::per_minute`].
const MINUTE: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct ReplyTopics {
    per_minute: usize,
    capacity: usize,
    /// Each kept topic and when it was last answered on.
    used: HashMap<String, Instant>,
    /// When each topic let in during the last minute was let in.
    admitted: VecDeque<Instant>,
}

impl ReplyTopics {
    pub fn new(per_minute: usize, capacity: usize) -> Self {
        Self {
            per_minute,
            capacity: capacity.max(1),
            used: HashMap::new(),
            admitted: VecDeque::new(),
        }
    }

    /// Whether a response may go to `topic` now. A kept topic always may; a new one while
    /// fewer than `per_minute` new ones were let in over the last minute, then it is kept,
    /// in place of the least recently used when `capacity` are.
    pub fn admit(&mut self, topic: &str, now: Instant) -> Result<(), String> {
        if let Some(last) = self.used.get_mut(topic) {
            *last = now;
            return Ok(());
        }
        while self
            .admitted
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= MINUTE)
        {
            self.admitted.pop_front();
        }
        if self.admitted.len() >= self.per_minute {
            return Err(format!(
                "more than {} reply topics new to the responder in the last minute (new_reply_topics_per_minute); reuse one, or retry later",
                self.per_minute
            ));
        }
        if self.used.len() >= self.capacity {
            // A scan, but only on a rate-limited admission.
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(topic, _)| topic.clone());
            if let Some(oldest) = oldest {
                self.used.remove(&oldest);
            }
        }
        self.admitted.push_back(now);
        self.used.insert(topic.to_string(), now);
        Ok(())
    }

    /// `topic` refused a response (it does not exist, or will not take it): the next
    /// request naming it counts as new.
    pub fn forget(&mut self, topic: &str) {
        self.used.remove(topic);
    }

    pub fn kept(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_topics_are_let_in_at_the_rate_and_kept_ones_always() {
        let t0 = Instant::now();
        let mut r = ReplyTopics::new(3, 100);
        for t in ["a", "b", "c"] {
            assert_eq!(r.admit(t, t0), Ok(()));
        }
        let e = r.admit("d", t0).unwrap_err();
        assert!(e.contains("more than 3"), "{e}");
        // Known topics are not limited.
        for _ in 0..1000 {
            assert_eq!(r.admit("a", t0 + Duration::from_secs(1)), Ok(()));
        }
        // A refused topic was not kept: still refused until the window moves on.
        assert!(r.admit("d", t0 + Duration::from_secs(59)).is_err());
        assert_eq!(r.admit("d", t0 + MINUTE), Ok(()));
        assert!(r.admit("e", t0 + MINUTE).is_ok());
        assert!(r.admit("f", t0 + MINUTE).is_ok());
        assert!(r.admit("g", t0 + MINUTE).is_err());
    }

    #[test]
    fn at_most_capacity_are_kept_the_least_recently_used_leaving() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = ReplyTopics::new(100, 3);
        r.admit("a", at(0)).unwrap();
        r.admit("b", at(1)).unwrap();
        r.admit("c", at(2)).unwrap();
        r.admit("a", at(3)).unwrap();
        r.admit("d", at(4)).unwrap();
        assert_eq!(r.kept(), 3);
        assert!(!r.used.contains_key("b"), "b was used least recently");
        assert!(r.used.contains_key("a") && r.used.contains_key("d"));
    }

    #[test]
    fn a_topic_that_refused_a_response_must_be_let_in_again() {
        let t0 = Instant::now();
        let mut r = ReplyTopics::new(1, 10);
        r.admit("nowhere", t0).unwrap();
        r.forget("nowhere");
        assert_eq!(r.kept(), 0);
        assert!(
            r.admit("nowhere", t0).is_err(),
            "it spends a new topic's place"
        );
        assert_eq!(r.admit("nowhere", t0 + MINUTE), Ok(()));
    }
}
