//! What to answer a request with, given what the cache holds. Pure.
//!
//! A cached prediction is fresh when its age (now - `scored_at`) is within the request's
//! `max_age_ms` (else the configured freshness), it was scored by the model version now
//! serving, and the entity's online features are no newer than the event it was scored
//! from ([`Cached::staleness`]); otherwise it is stale. Fresh: serve it. Stale or missing: score now from
//! the request's features or else the entity's online features. Neither features nor a
//! prediction: NOT_FOUND.

use std::collections::BTreeMap;

use lanes_common::records::PredictionRequest;

pub use lanes_common::cache::{Cached, Staleness};

#[derive(Debug, Clone)]
pub struct Policy {
    pub freshness_ms: i64,
    pub refresh_after_ms: i64,
    /// The version now serving; entries scored by another count as stale.
    pub model_version: Option<String>,
    /// The version served before, while its rollout grace lasts: its entries are judged
    /// as if it still served.
    pub previous_version: Option<String>,
}

impl Policy {
    /// Why `c` is stale for a reader allowing `max_age_ms`, entries of the previous
    /// version in their grace judged by age and features alone.
    fn staleness(&self, c: &Cached, max_age_ms: i64, now: i64) -> Option<Staleness> {
        match c.staleness(max_age_ms, self.model_version.as_deref(), now) {
            Some(Staleness::ModelVersion)
                if self.previous_version.is_some() && c.model_version == self.previous_version =>
            {
                c.staleness(max_age_ms, self.previous_version.as_deref(), now)
            }
            other => other,
        }
    }
}

/// Which version serves, which served before it, and since when: the previous version's
/// entries stay servable for `grace` after a switch.
#[derive(Debug)]
pub struct Rollout {
    serving: Option<String>,
    previous: Option<String>,
    since: tokio::time::Instant,
}

impl Rollout {
    pub fn new(now: tokio::time::Instant) -> Self {
        Self {
            serving: None,
            previous: None,
            since: now,
        }
    }

    /// Notes the version serving at `now`; returns the previous one while in its grace.
    pub fn observe(
        &mut self,
        serving: Option<String>,
        now: tokio::time::Instant,
        grace: std::time::Duration,
    ) -> Option<String> {
        if serving != self.serving {
            self.previous = std::mem::replace(&mut self.serving, serving);
            self.since = now;
        }
        if now.saturating_duration_since(self.since) < grace {
            self.previous.clone()
        } else {
            None
        }
    }
}

/// A stale cached prediction, kept to answer with if scoring cannot.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    pub score: f64,
    pub model_version: Option<String>,
    pub age_ms: i64,
    pub cause: Staleness,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Serve the cached prediction; `refresh` asks for a background re-score.
    Fresh {
        score: f64,
        model_version: Option<String>,
        age_ms: i64,
        refresh: bool,
    },
    /// Score now with these features (their event time), falling back to `stale`.
    /// `warm`: publish the score to the cache. Request features warm it only where the
    /// entry is missing, stale by the service's own freshness, or from another model
    /// version: a client's `max_age_ms` cannot make it replace a fresh entry.
    Score {
        features: BTreeMap<String, f64>,
        event_time: i64,
        from_request: bool,
        warm: bool,
        stale: Option<Stale>,
    },
    /// Stale, and nothing to score with: the stale entry is all there is.
    StaleOnly(Stale),
    NotFound,
}

/// Decides for `req` at `now` (epoch ms). `cached` is `None` when the entity has no
/// hash, or when the cache could not be read.
pub fn decide(
    req: &PredictionRequest,
    cached: Option<&Cached>,
    policy: &Policy,
    now: i64,
) -> Decision {
    let max_age = req.max_age_ms.unwrap_or(policy.freshness_ms);
    let mut fresh_for_service = false;
    let stale = match cached.and_then(|c| c.prediction().map(|p| (c, p))) {
        Some((c, (score, scored_at))) => {
            let age_ms = now.saturating_sub(scored_at).max(0);
            fresh_for_service = policy.staleness(c, policy.freshness_ms, now).is_none();
            let Some(cause) = policy.staleness(c, max_age, now) else {
                return Decision::Fresh {
                    score,
                    model_version: c.model_version.clone(),
                    age_ms,
                    refresh: age_ms > policy.refresh_after_ms,
                };
            };
            Some(Stale {
                score,
                model_version: c.model_version.clone(),
                age_ms,
                cause,
            })
        }
        None => None,
    };
    if let Some(features) = &req.features {
        return Decision::Score {
            features: features.clone(),
            event_time: request_event_time(cached, now),
            from_request: true,
            warm: !fresh_for_service,
            stale,
        };
    }
    if let Some(c) = cached
        && let Some(features) = &c.features
    {
        return Decision::Score {
            features: features.clone(),
            event_time: c.features_event_time.unwrap_or(now),
            from_request: false,
            warm: true,
            stale,
        };
    }
    match stale {
        Some(s) => Decision::StaleOnly(s),
        None => Decision::NotFound,
    }
}

/// The event time a score from a request's own features is written with: the later of
/// the entry's scored event and its online features, by the responder's clock at most,
/// or that clock where the cache holds nothing; never the client's. A warm then replaces
/// a stale entry on its newer scoring time, and a re-score from the online features
/// later, or any newer event, replaces the warm in turn: stamped `now`, a client's
/// made-up features would outrank every refresh until the entity's next event. Online
/// features newer than `now` (the entity moved on) keep it `now`, so the write's guard
/// refuses it.
fn request_event_time(cached: Option<&Cached>, now: i64) -> i64 {
    cached
        .and_then(|c| c.event_time.max(c.features_event_time))
        .map_or(now, |t| t.min(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn policy() -> Policy {
        Policy {
            freshness_ms: 60_000,
            refresh_after_ms: 30_000,
            model_version: Some("2".into()),
            previous_version: None,
        }
    }

    fn req(features: Option<&[(&str, f64)]>, max_age_ms: Option<i64>) -> PredictionRequest {
        PredictionRequest {
            request_id: "r".into(),
            entity_id: "e".into(),
            features: features.map(|f| f.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            max_age_ms,
            reply_topic: None,
            requested_at: NOW,
            stale_while_refresh: None,
        }
    }

    fn cached(age_ms: i64, version: &str, features: bool) -> Cached {
        Cached {
            score: Some(0.25),
            model_version: Some(version.into()),
            event_time: Some(NOW - age_ms - 5),
            scored_at: Some(NOW - age_ms),
            features: features.then(|| BTreeMap::from([("a".to_string(), 1.0)])),
            features_event_time: features.then_some(NOW - age_ms - 5),
        }
    }

    #[test]
    fn fresh_entries_are_served_and_old_fresh_ones_refreshed() {
        let d = decide(
            &req(None, None),
            Some(&cached(1_000, "2", true)),
            &policy(),
            NOW,
        );
        assert_eq!(
            d,
            Decision::Fresh {
                score: 0.25,
                model_version: Some("2".into()),
                age_ms: 1_000,
                refresh: false
            }
        );
        let d = decide(
            &req(None, None),
            Some(&cached(40_000, "2", true)),
            &policy(),
            NOW,
        );
        assert!(matches!(d, Decision::Fresh { refresh: true, .. }));
    }

    #[test]
    fn an_entry_scored_at_a_hostile_time_is_stale_not_fresh_forever() {
        for scored_at in [NOW + 3_600_000, i64::MAX, i64::MIN] {
            let c = Cached {
                scored_at: Some(scored_at),
                ..cached(0, "2", true)
            };
            match decide(&req(None, None), Some(&c), &policy(), NOW) {
                Decision::Score {
                    stale: Some(s),
                    from_request: false,
                    ..
                } => assert_eq!(s.cause, Staleness::Age, "scored_at {scored_at}"),
                other => panic!("scored_at {scored_at}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_request_can_ask_for_fresher() {
        let d = decide(
            &req(None, Some(500)),
            Some(&cached(1_000, "2", true)),
            &policy(),
            NOW,
        );
        match d {
            Decision::Score {
                from_request: false,
                event_time,
                stale: Some(s),
                ..
            } => {
                assert_eq!(
                    event_time,
                    NOW - 1_005,
                    "online features keep their own event time"
                );
                assert_eq!((s.age_ms, s.cause), (1_000, Staleness::Age));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_older_model_version_is_stale() {
        let d = decide(
            &req(None, None),
            Some(&cached(10, "1", true)),
            &policy(),
            NOW,
        );
        assert!(
            matches!(
                d,
                Decision::Score {
                    stale: Some(Stale {
                        cause: Staleness::ModelVersion,
                        ..
                    }),
                    ..
                }
            ),
            "{d:?}"
        );
    }

    #[test]
    fn entries_of_the_previous_version_are_fresh_during_its_grace_only() {
        let rolling = Policy {
            previous_version: Some("1".into()),
            ..policy()
        };
        let d = decide(
            &req(None, None),
            Some(&cached(10, "1", true)),
            &rolling,
            NOW,
        );
        assert!(
            matches!(&d, Decision::Fresh { model_version: Some(v), .. } if v == "1"),
            "answered with its own version: {d:?}"
        );
        // Grace covers the version, not age or newer features, nor older versions.
        for c in [
            cached(120_000, "1", true),
            Cached {
                features_event_time: Some(NOW - 2),
                ..cached(10, "1", true)
            },
            cached(10, "0", true),
        ] {
            let d = decide(&req(None, None), Some(&c), &rolling, NOW);
            assert!(
                matches!(d, Decision::Score { stale: Some(_), .. }),
                "{c:?}: {d:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_rollout_grace_starts_at_the_switch_and_ends() {
        let grace = std::time::Duration::from_secs(60);
        let t0 = tokio::time::Instant::now();
        let mut r = Rollout::new(t0);
        assert_eq!(
            r.observe(Some("1".into()), t0, grace),
            None,
            "first version: none before"
        );
        let switch = t0 + std::time::Duration::from_secs(600);
        assert_eq!(r.observe(Some("2".into()), switch, grace), Some("1".into()));
        let later = switch + std::time::Duration::from_secs(59);
        assert_eq!(r.observe(Some("2".into()), later, grace), Some("1".into()));
        let over = switch + grace;
        assert_eq!(r.observe(Some("2".into()), over, grace), None);
        assert_eq!(
            r.observe(Some("3".into()), over, grace),
            Some("2".into()),
            "the next switch grants the version it replaces"
        );
        assert_eq!(
            r.observe(Some("3".into()), over, std::time::Duration::ZERO),
            None
        );
    }

    #[test]
    fn online_features_newer_than_the_scored_event_make_a_young_entry_stale() {
        let moved_on = Cached {
            features_event_time: Some(NOW - 2),
            ..cached(10, "2", true)
        };
        match decide(&req(None, None), Some(&moved_on), &policy(), NOW) {
            Decision::Score {
                from_request: false,
                event_time,
                warm: true,
                stale: Some(s),
                ..
            } => {
                assert_eq!(event_time, NOW - 2, "scored as of the newer features");
                assert_eq!((s.cause, s.age_ms), (Staleness::Features, 10));
            }
            other => panic!("{other:?}"),
        }
        // Features at the scored event's own time leave it fresh.
        assert!(matches!(
            decide(
                &req(None, None),
                Some(&cached(10, "2", true)),
                &policy(),
                NOW
            ),
            Decision::Fresh { age_ms: 10, .. }
        ));
    }

    #[test]
    fn request_features_win_over_online_features() {
        let d = decide(&req(Some(&[("b", 2.0)]), None), None, &policy(), NOW);
        match d {
            Decision::Score {
                features,
                from_request: true,
                event_time,
                warm: true,
                stale: None,
            } => {
                assert_eq!(features["b"], 2.0);
                assert_eq!(event_time, NOW);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_to_go_on_is_not_found_and_stale_alone_is_served_stale() {
        assert_eq!(
            decide(&req(None, None), None, &policy(), NOW),
            Decision::NotFound
        );
        let only_features_missing = cached(120_000, "2", false);
        assert!(matches!(
            decide(
                &req(None, None),
                Some(&only_features_missing),
                &policy(),
                NOW
            ),
            Decision::StaleOnly(Stale {
                age_ms: 120_000,
                ..
            })
        ));
    }

    #[test]
    fn request_features_warm_only_what_the_service_finds_stale() {
        let f: &[(&str, f64)] = &[("a", 2.0)];
        // The client calls a fresh entry stale (max_age_ms 0): it is scored for them, but
        // the cache keeps its entry.
        let d = decide(
            &req(Some(f), Some(0)),
            Some(&cached(1_000, "2", false)),
            &policy(),
            NOW,
        );
        assert!(
            matches!(
                d,
                Decision::Score {
                    warm: false,
                    from_request: true,
                    ..
                }
            ),
            "{d:?}"
        );
        for c in [
            None,
            Some(cached(120_000, "2", false)),
            Some(cached(1_000, "1", false)),
        ] {
            let d = decide(&req(Some(f), Some(0)), c.as_ref(), &policy(), NOW);
            assert!(
                matches!(d, Decision::Score { warm: true, .. }),
                "{c:?}: {d:?}"
            );
        }
    }

    #[test]
    fn request_features_take_the_event_time_of_what_the_cache_holds() {
        let f: &[(&str, f64)] = &[("a", 2.0)];
        let time = |c: Option<&Cached>| match decide(&req(Some(f), None), c, &policy(), NOW) {
            Decision::Score {
                event_time,
                from_request: true,
                ..
            } => event_time,
            other => panic!("{other:?}"),
        };
        assert_eq!(time(None), NOW, "nothing cached: the responder's clock");
        let stale = cached(120_000, "2", true);
        assert_eq!(time(Some(&stale)), NOW - 120_005, "the scored event's");
        let newer_features = Cached {
            features_event_time: Some(NOW - 1_000),
            ..stale.clone()
        };
        assert_eq!(time(Some(&newer_features)), NOW - 1_000, "the features'");
        let moved_on = Cached {
            features_event_time: Some(NOW + 60_000),
            ..stale
        };
        assert_eq!(time(Some(&moved_on)), NOW, "never past the clock");
    }

    #[test]
    fn online_features_alone_are_scored_at_their_own_time() {
        let c = Cached {
            features: Some(BTreeMap::from([("a".to_string(), 1.5)])),
            features_event_time: Some(9),
            ..Cached::default()
        };
        let d = decide(&req(None, None), Some(&c), &policy(), NOW);
        assert!(
            matches!(
                d,
                Decision::Score {
                    stale: None,
                    from_request: false,
                    warm: true,
                    event_time: 9,
                    ..
                }
            ),
            "{d:?}"
        );
    }
}
