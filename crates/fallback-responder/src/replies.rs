//! Reply topics named by clients. Each one answered on costs a registry subject, a topic
//! handle in the producer and, on a broker that creates topics when written to, a topic.
//! So the responder answers only on reply topics the broker lists ([`Listing`]): it never
//! makes one, and what it registers and keeps is bounded by the cluster's topics, not by
//! what clients send. Of those it keeps the [`ReplyTopics`] most recently used.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

/// Reply topics answered on lately, at most `capacity`.
#[derive(Debug)]
pub struct ReplyTopics {
    capacity: usize,
    /// Each kept topic and when it was last answered on.
    used: HashMap<String, Instant>,
}

impl ReplyTopics {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            used: HashMap::new(),
        }
    }

    /// Whether `topic` is kept; if so it counts as used `now`.
    pub fn touch(&mut self, topic: &str, now: Instant) -> bool {
        match self.used.get_mut(topic) {
            Some(last) => {
                *last = now;
                true
            }
            None => false,
        }
    }

    /// Keeps `topic`, in place of the least recently used when `capacity` are kept:
    /// that one is returned, to be forgotten wherever it is known.
    pub fn keep(&mut self, topic: &str, now: Instant) -> Option<String> {
        if self.touch(topic, now) {
            return None;
        }
        let evicted = if self.used.len() >= self.capacity {
            // A scan, but only when a topic new to the responder that exists is named.
            let oldest = self
                .used
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(topic, _)| topic.clone());
            oldest.inspect(|t| {
                self.used.remove(t);
            })
        } else {
            None
        };
        self.used.insert(topic.to_string(), now);
        evicted
    }

    /// `topic` refused a response (deleted, or will not take it): the next request naming
    /// it is checked again. Whether it was kept.
    pub fn forget(&mut self, topic: &str) -> bool {
        self.used.remove(topic).is_some()
    }

    pub fn kept(&self) -> usize {
        self.used.len()
    }
}

/// The broker's topics that may receive responses, listed again at most once per
/// `every`, however many requests name topics that are not there.
#[derive(Debug)]
pub struct Listing {
    every: Duration,
    /// When the last listing was asked for, and what it held.
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, HashSet<String>)>>,
}

impl Listing {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether `topic` exists, by a listing asked for after `asked` unless an earlier one
    /// holds it, so a topic made just before a request names it is found. `list` asks
    /// the broker; `None` when it could not, and then so is the answer.
    pub async fn has<F, Fut>(
        &self,
        topic: &str,
        asked: tokio::time::Instant,
        list: F,
    ) -> Option<bool>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<HashSet<String>>>,
    {
        // Held across the listing: requests that name missing topics together share one.
        let mut last = self.last.lock().await;
        if let Some((at, topics)) = &*last {
            if topics.contains(topic) {
                return Some(true);
            }
            if *at >= asked {
                return Some(false);
            }
            tokio::time::sleep_until(*at + self.every).await;
        }
        let at = tokio::time::Instant::now();
        let topics = list().await?;
        let has = topics.contains(topic);
        *last = Some((at, topics));
        Some(has)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn at_most_capacity_are_kept_the_least_recently_used_leaving() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut r = ReplyTopics::new(3);
        assert_eq!(r.keep("a", at(0)), None);
        assert_eq!(r.keep("b", at(1)), None);
        assert_eq!(r.keep("c", at(2)), None);
        assert!(r.touch("a", at(3)));
        assert_eq!(
            r.keep("d", at(4)),
            Some("b".into()),
            "b was used least recently"
        );
        assert_eq!(r.kept(), 3);
        assert!(!r.touch("b", at(5)));
        assert_eq!(r.keep("a", at(6)), None, "a kept topic takes no new place");
        assert!(r.forget("a"));
        assert!(!r.forget("a"));
        assert!(!r.touch("a", at(7)));
        assert_eq!(r.kept(), 2);
    }

    fn listed(names: &[&str]) -> Option<HashSet<String>> {
        Some(names.iter().map(|n| n.to_string()).collect())
    }

    #[tokio::test(start_paused = true)]
    async fn missing_topics_share_a_listing_at_most_once_a_second() {
        let listing = Listing::new(Duration::from_secs(1));
        let calls = AtomicUsize::new(0);
        let list = |names: &'static [&'static str]| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { listed(names) }
        };
        let t0 = tokio::time::Instant::now();
        assert_eq!(listing.has("a", t0, || list(&["a"])).await, Some(true));
        // Listed: no new listing, whatever time it is asked.
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = tokio::time::Instant::now();
        assert_eq!(listing.has("a", now, || list(&["a"])).await, Some(true));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Missing: a listing newer than the question, once a second at most.
        let asked = tokio::time::Instant::now();
        assert_eq!(listing.has("b", asked, || list(&["a"])).await, Some(false));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(listing.has("b", asked, || list(&["a"])).await, Some(false));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "asked before that listing");
        // Asked after it: the next listing, a second after the last.
        tokio::time::advance(Duration::from_millis(10)).await;
        let asked = tokio::time::Instant::now();
        assert_eq!(
            listing.has("b", asked, || list(&["a", "b"])).await,
            Some(true)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(asked.elapsed(), Duration::from_millis(990));
        // A broker that cannot be asked: no answer, and the last listing stays.
        tokio::time::advance(Duration::from_secs(1)).await;
        let asked = tokio::time::Instant::now();
        assert_eq!(listing.has("c", asked, || async { None }).await, None);
        assert_eq!(listing.has("b", asked, || list(&[])).await, Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_waiting_together_share_one_listing() {
        let listing = Arc::new(Listing::new(Duration::from_secs(1)));
        let calls = Arc::new(AtomicUsize::new(0));
        let t0 = tokio::time::Instant::now();
        listing.has("x", t0, || async { listed(&[]) }).await;
        tokio::time::advance(Duration::from_millis(10)).await;
        let asked = tokio::time::Instant::now();
        let mut waiting = Vec::new();
        for i in 0..50 {
            let (listing, calls) = (listing.clone(), calls.clone());
            waiting.push(tokio::spawn(async move {
                listing
                    .has(&format!("t{i}"), asked, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        listed(&["t7"])
                    })
                    .await
            }));
        }
        let mut found = 0;
        for w in waiting {
            found += usize::from(w.await.unwrap() == Some(true));
        }
        assert_eq!(found, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one listing for all fifty");
    }
}
