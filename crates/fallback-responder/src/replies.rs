//! Reply topics named by clients. Each one answered on costs a registry subject, a topic
//! handle in the producer and, on a broker that creates topics when written to, a topic.
//! So the responder answers only on reply topics the broker lists ([`Listing`]): it never
//! makes one, and what it registers and keeps is bounded by the cluster's topics, not by
//! what clients send.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What [`Listing::has`] found for a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Yes,
    No,
    /// It refused a response within [`REFUSED_FOR`]: not tried again yet.
    Refused,
    /// The broker could not be listed.
    Unknown,
}

/// How long a reply topic that refused a response is answered for without trying it
/// (each try may cost a registry call).
pub const REFUSED_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Known {
    /// When the last listing was asked for, whether it answered, and the topics of the
    /// last one that did.
    at: Option<Instant>,
    answered: bool,
    topics: HashSet<String>,
    /// Topics that refused a response, and when.
    refused: HashMap<String, Instant>,
}

impl Known {
    /// The answer for `topic` asked at `asked`, if what is known gives one.
    fn answer(&self, topic: &str, asked: Instant) -> Option<Listed> {
        if self
            .refused
            .get(topic)
            .is_some_and(|t| asked.saturating_duration_since(*t) < REFUSED_FOR)
        {
            return Some(Listed::Refused);
        }
        if self.topics.contains(topic) {
            return Some(Listed::Yes);
        }
        match self.at {
            Some(at) if at >= asked => Some(if self.answered {
                Listed::No
            } else {
                Listed::Unknown
            }),
            _ => None,
        }
    }
}

/// The broker's topics that may receive responses, listed again at most once per
/// `every` (failed listings included), however many requests name topics that are not
/// there.
#[derive(Debug)]
pub struct Listing {
    every: Duration,
    known: Mutex<Known>,
    /// Held while listing: requests waiting for a newer listing share one.
    listing: tokio::sync::Mutex<()>,
}

impl Listing {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            known: Mutex::default(),
            listing: tokio::sync::Mutex::new(()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `topic` exists: by the topics already listed, else by a listing asked for
    /// after `asked`, so a topic made just before a request names it is found. `list`
    /// asks the broker, `None` when it could not.
    pub async fn has<F, Fut>(&self, topic: &str, asked: Instant, list: F) -> Listed
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<HashSet<String>>>,
    {
        if let Some(answer) = self.known().answer(topic, asked) {
            return answer;
        }
        let _listing = self.listing.lock().await;
        // Another request may have listed while this one waited.
        let last = {
            let known = self.known();
            if let Some(answer) = known.answer(topic, asked) {
                return answer;
            }
            known.at
        };
        if let Some(last) = last {
            tokio::time::sleep_until(last + self.every).await;
        }
        let at = Instant::now();
        let listed = list().await;
        let mut known = self.known();
        known.at = Some(at);
        known.answered = listed.is_some();
        if let Some(mut topics) = listed {
            // A topic refused while this listing ran stays refused.
            for (topic, refused) in &known.refused {
                if *refused >= at {
                    topics.remove(topic);
                }
            }
            known.topics = topics;
        }
        known.answer(topic, asked).unwrap_or(Listed::Unknown)
    }

    /// `topic` refused a response (deleted, or will not take it): answered
    /// [`Listed::Refused`] for [`REFUSED_FOR`], then looked up again.
    pub fn refused(&self, topic: &str, now: Instant) {
        let mut known = self.known();
        known.topics.remove(topic);
        known
            .refused
            .retain(|_, t| now.saturating_duration_since(*t) < REFUSED_FOR);
        known.refused.insert(topic.to_string(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
        let t0 = Instant::now();
        assert_eq!(listing.has("a", t0, || list(&["a"])).await, Listed::Yes);
        // Listed: no new listing, whenever it is asked.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            listing.has("a", Instant::now(), || list(&[])).await,
            Listed::Yes
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Missing: a listing newer than the question.
        let asked = Instant::now();
        assert_eq!(listing.has("b", asked, || list(&["a"])).await, Listed::No);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(listing.has("b", asked, || list(&["a"])).await, Listed::No);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "asked before that listing");
        // Asked after it: the next listing, a second after the last.
        tokio::time::advance(Duration::from_millis(10)).await;
        let asked = Instant::now();
        assert_eq!(
            listing.has("b", asked, || list(&["a", "b"])).await,
            Listed::Yes
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(asked.elapsed(), Duration::from_millis(990));
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_cannot_be_listed_is_asked_once_a_second_and_lets_nothing_in() {
        let listing = Listing::new(Duration::from_secs(1));
        let calls = AtomicUsize::new(0);
        let failing = || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { None }
        };
        let asked = Instant::now();
        assert_eq!(listing.has("a", asked, failing).await, Listed::Unknown);
        assert_eq!(listing.has("b", asked, failing).await, Listed::Unknown);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one failed listing answers both"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        let asked = Instant::now();
        assert_eq!(listing.has("a", asked, failing).await, Listed::Unknown);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            asked.elapsed(),
            Duration::from_millis(990),
            "failures wait too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_topic_that_refused_is_not_tried_for_a_while_then_looked_up_again() {
        let listing = Listing::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(
            listing.has("a", t0, || async { listed(&["a"]) }).await,
            Listed::Yes
        );
        listing.refused("a", t0);
        tokio::time::advance(REFUSED_FOR - Duration::from_millis(1)).await;
        let never = || async { panic!("no listing while refused") };
        assert_eq!(
            listing.has("a", Instant::now(), never).await,
            Listed::Refused
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        // No longer taken from the old listing: looked up again.
        assert_eq!(
            listing
                .has("a", Instant::now(), || async { listed(&[]) })
                .await,
            Listed::No
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_listed_topic_is_answered_while_a_listing_runs_and_a_refusal_outlasts_it() {
        let listing = Arc::new(Listing::new(Duration::from_secs(1)));
        let t0 = Instant::now();
        listing.has("a", t0, || async { listed(&["a", "b"]) }).await;
        tokio::time::advance(Duration::from_secs(2)).await;
        let slow = {
            let listing = listing.clone();
            tokio::spawn(async move {
                listing
                    .has("c", Instant::now(), || async {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        listed(&["a", "b", "c"])
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        let started = Instant::now();
        let never = || async { panic!("a listed topic needs no listing") };
        assert_eq!(listing.has("a", Instant::now(), never).await, Listed::Yes);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait behind the listing"
        );
        // Refused while the listing runs: that listing does not bring it back.
        listing.refused("b", Instant::now());
        assert_eq!(slow.await.unwrap(), Listed::Yes);
        tokio::time::advance(REFUSED_FOR).await;
        assert_eq!(
            listing
                .has("b", Instant::now(), || async { listed(&[]) })
                .await,
            Listed::No
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_waiting_together_share_one_listing() {
        let listing = Arc::new(Listing::new(Duration::from_secs(1)));
        let calls = Arc::new(AtomicUsize::new(0));
        listing
            .has("x", Instant::now(), || async { listed(&[]) })
            .await;
        tokio::time::advance(Duration::from_millis(10)).await;
        let asked = Instant::now();
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
            found += usize::from(w.await.unwrap() == Listed::Yes);
        }
        assert_eq!(found, 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one listing for all fifty");
    }
}
