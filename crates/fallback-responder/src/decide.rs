//! What to answer a request with, given what the cache holds. Pure.
//!
//! A cached prediction is fresh when its age (now - `scored_at`) is within the request's
//! `max_age_ms` (else the configured freshness) and it was scored by the model version
//! now serving; otherwise it is stale. Fresh: serve it. Stale or missing: score now from
//! the request's features or else the entity's online features. Neither features nor a
//! prediction: NOT_FOUND.

use std::collections::BTreeMap;

use lanes_common::records::PredictionRequest;

pub use lanes_common::cache::Cached;

#[derive(Debug, Clone)]
pub struct Policy {
    pub freshness_ms: i64,
    pub refresh_after_ms: i64,
    /// The version now serving; entries scored by another count as stale.
    pub model_version: Option<String>,
}

/// A stale cached prediction, kept to answer with if scoring cannot.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    pub score: f64,
    pub model_version: Option<String>,
    pub age_ms: i64,
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
            let age_ms = (now - scored_at).max(0);
            let same_model = match (&policy.model_version, &c.model_version) {
                (Some(now_serving), Some(scored_by)) => now_serving == scored_by,
                _ => true,
            };
            fresh_for_service = age_ms <= policy.freshness_ms && same_model;
            if age_ms <= max_age && same_model {
                return Decision::Fresh {
                    score,
                    model_version: c.model_version.clone(),
                    age_ms,
                    refresh: age_ms > policy.refresh_after_ms,
                };
            }
            Some(Stale {
                score,
                model_version: c.model_version.clone(),
                age_ms,
            })
        }
        None => None,
    };
    if let Some(features) = &req.features {
        return Decision::Score {
            features: features.clone(),
            event_time: now,
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn policy() -> Policy {
        Policy {
            freshness_ms: 60_000,
            refresh_after_ms: 30_000,
            model_version: Some("2".into()),
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
        }
    }

    fn cached(age_ms: i64, version: &str, features: bool) -> Cached {
        Cached {
            score: Some(0.25),
            model_version: Some(version.into()),
            event_time: Some(NOW - age_ms - 5),
            scored_at: Some(NOW - age_ms),
            features: features.then(|| BTreeMap::from([("a".to_string(), 1.0)])),
            features_event_time: features.then_some(NOW - 7),
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
                    NOW - 7,
                    "online features keep their own event time"
                );
                assert_eq!(s.age_ms, 1_000);
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
        assert!(matches!(d, Decision::Score { stale: Some(_), .. }), "{d:?}");
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
                    event_time: NOW,
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
