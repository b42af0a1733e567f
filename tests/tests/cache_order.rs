//! The cache's one ordering rule, checked against the real Lua script in Redis: any
//! order or replay of the same predictions, written one per call or many per call as the
//! cache-writer does, leaves each entity holding its newest by (event time, scored at).

use lanes_common::cache::{self, WRITE_IF_NEWER, Written};
use lanes_common::records::Prediction;
use lanes_tests::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// An event time the scripts take as any other (ms since the epoch).
const T0: i64 = 1_800_000_000_000;

/// Predictions of one entity with distinct (event time, scored at): small ranges, so
/// equal event times with different scoring times are common.
fn predictions() -> impl Strategy<Value = Vec<(i64, i64)>> {
    prop::collection::btree_set((0i64..6, 0i64..4), 1..12).prop_map(|s| s.into_iter().collect())
}

fn prediction(entity: &str, (event, scored): (i64, i64)) -> Prediction {
    let mut p = prediction_now(entity, (event * 10 + scored) as f64);
    p.event_id = format!("{entity}-{event}");
    p.event_time = 1_800_000_000_000 + event;
    p.scored_at = 1_800_000_100_000 + scored;
    // A re-score of the same event carries another model version, as a rollout would.
    p.model_version = scored.to_string();
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_order_or_replay_keeps_the_newest(
        times in predictions(),
        order in prop::collection::vec(any::<prop::sample::Index>(), 1..40),
        per_call in 1usize..6,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (newest, held) = rt.block_on(async {
            let s = settings();
            let entity = unique("order");
            let mut conn = redis(&s).get_multiplexed_async_connection().await.unwrap();
            let script = redis::Script::new(WRITE_IF_NEWER);
            // Every prediction at least once, then replays picked from `order`.
            let writes = (0..times.len()).chain(order.iter().map(|i| i.index(times.len())));
            let mut sequence: Vec<usize> = writes.collect();
            // Interleave: the picks decide where each first write lands.
            let len = sequence.len();
            for (k, i) in order.iter().enumerate() {
                sequence.swap(k % len, i.index(len));
            }
            for call in sequence.chunks(per_call) {
                let ps: Vec<Prediction> = call.iter().map(|&i| prediction(&entity, times[i])).collect();
                let reply: redis::Value = cache::write_predictions(
                    &script,
                    &s.cache_writer.key_prefix,
                    ps.iter().map(|p| (p, false)),
                    60,
                )
                .invoke(&mut conn)
                .await
                .unwrap();
                let replies = cache::replies(reply, ps.len()).unwrap();
                assert!(replies.iter().all(Result::is_ok), "{replies:?}");
            }
            let key = cache::key(&s.cache_writer.key_prefix, &entity);
            let h: std::collections::HashMap<String, String> =
                redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.unwrap();
            let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
            let newest = times.iter().copied().max().unwrap();
            let want = prediction(&entity, newest);
            let held = (
                h.get("event_time").cloned(),
                h.get("scored_at").cloned(),
                h.get("score").cloned(),
                h.get("event_id").cloned(),
            );
            (
                (
                    Some(want.event_time.to_string()),
                    Some(want.scored_at.to_string()),
                    Some(want.score.to_string()),
                    Some(want.event_id),
                ),
                held,
            )
        });
        prop_assert_eq!(held, newest);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// The cache-writer sends only each entity's newest event of a features call
    /// ([`cache::newest_per_entity`]); the real script, given every event of the call
    /// instead, leaves every entry the same, whatever the entry held before.
    #[test]
    fn features_left_out_for_a_newer_event_change_no_entry(
        events in prop::collection::vec((0usize..3, 0i64..5), 1..30),
        held in prop::collection::vec(prop::option::of(0i64..5), 3),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (all, newest) = rt.block_on(async {
            let s = settings();
            let prefix = &s.cache_writer.key_prefix;
            let mut conn = redis(&s).get_multiplexed_async_connection().await.unwrap();
            let script = redis::Script::new(cache::FEATURES_IF_NEWER);
            let mut entries = Vec::new();
            for sent in ["all", "newest"] {
                let entities: Vec<String> = (0..3).map(|e| unique(&format!("{sent}{e}"))).collect();
                for (entity, held) in entities.iter().zip(&held) {
                    if let Some(t) = held {
                        let _: () = redis::cmd("HSET")
                            .arg(cache::key(prefix, entity))
                            .arg("features_event_time")
                            .arg(T0 + t)
                            .arg("features")
                            .arg(r#"{"held":1.0}"#)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                    }
                }
                let items: Vec<(&str, BTreeMap<String, f64>, i64)> = events
                    .iter()
                    .enumerate()
                    .map(|(i, &(e, t))| {
                        let features = BTreeMap::from([("event".to_string(), i as f64)]);
                        (entities[e].as_str(), features, T0 + t)
                    })
                    .collect();
                let keep: Vec<bool> = match sent {
                    "all" => vec![true; items.len()],
                    _ => {
                        let keys: Vec<(&str, i64)> = items.iter().map(|(e, _, t)| (*e, *t)).collect();
                        let newest = cache::newest_per_entity(&keys);
                        (0..items.len()).map(|i| newest[i] == i).collect()
                    }
                };
                let call: Vec<_> = items.iter().zip(&keep).filter(|(_, k)| **k).map(|(i, _)| i).collect();
                let reply: redis::Value = cache::write_features(
                    &script,
                    prefix,
                    call.iter().map(|(e, f, t)| (*e, f, *t)),
                    0,
                )
                .invoke(&mut conn)
                .await
                .unwrap();
                let replies = cache::replies(reply, call.len()).unwrap();
                assert!(replies.iter().all(Result::is_ok), "{replies:?}");
                let mut held_now = Vec::new();
                for entity in &entities {
                    let key = cache::key(prefix, entity);
                    let h: HashMap<String, String> =
                        redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.unwrap();
                    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await.unwrap();
                    held_now.push(h);
                }
                entries.push(held_now);
            }
            (entries.remove(0), entries.remove(0))
        });
        prop_assert_eq!(all, newest);
    }
}

/// The contract's duplicate: the `event_id` and `model_version` the entry holds change
/// nothing, whatever the event time they come with; another model version of the same
/// event is a new prediction and follows the ordering rule.
#[tokio::test]
async fn the_cached_event_id_and_model_version_are_a_duplicate_at_any_time() {
    let s = settings();
    let entity = unique("dup");
    let mut conn = redis(&s).get_multiplexed_async_connection().await.unwrap();
    let script = redis::Script::new(WRITE_IF_NEWER);
    let prefix = &s.cache_writer.key_prefix;
    let key = cache::key(prefix, &entity);
    let first = prediction(&entity, (1, 0));
    let mut write = async |p: &Prediction| {
        let reply = cache::write_predictions(&script, prefix, [(p, false)], 60)
            .invoke(&mut conn)
            .await
            .unwrap();
        let reply = cache::replies(reply, 1).unwrap().remove(0).unwrap();
        let score: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("score")
            .query_async(&mut conn)
            .await
            .unwrap();
        (reply, score)
    };
    let held = Some(first.score.to_string());
    assert_eq!(write(&first).await, (Written::Written, held.clone()));
    let mut later = first.clone();
    later.event_time += 5;
    later.score = 0.75;
    assert_eq!(write(&later).await, (Written::Duplicate, held.clone()));
    let mut earlier = first.clone();
    earlier.event_time -= 5;
    earlier.score = 0.25;
    assert_eq!(write(&earlier).await, (Written::Duplicate, held));
    let mut rescored = later.clone();
    rescored.model_version = "9".into();
    assert_eq!(
        write(&rescored).await,
        (Written::Written, Some("0.75".to_string()))
    );
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A script Redis no longer holds (a restart, `SCRIPT FLUSH`) is loaded again by the
/// call itself, and every field of both calls lands where readers look for it. On a
/// Redis of its own: a flush is server-wide, and the test beside it uses the scripts.
#[tokio::test]
async fn a_flushed_script_is_loaded_again_by_the_call() {
    let s = settings();
    let entity = unique("noscript");
    let port = free_port();
    let _own = redis_server(port);
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let prefix = &s.cache_writer.key_prefix;
    let mut p = prediction(&entity, (3, 1));
    p.ingested_at = Some(1_800_000_000_001);
    let features = std::collections::BTreeMap::from([("amount".to_string(), 2.5)]);
    for round in 0..2 {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let script = redis::Script::new(WRITE_IF_NEWER);
        let reply = cache::write_predictions(&script, prefix, [(&p, false)], 60)
            .invoke(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(cache::replies(reply, 1).unwrap().len(), 1);
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let script = redis::Script::new(cache::FEATURES_IF_NEWER);
        let reply = cache::write_features(
            &script,
            prefix,
            [(entity.as_str(), &features, p.event_time)],
            60,
        )
        .invoke(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(cache::replies(reply, 1).unwrap().len(), 1);
    }
    let key = cache::key(prefix, &entity);
    let h: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let cached = cache::Cached::from_hash(&h).expect("a cached prediction");
    assert_eq!(cached.score, Some(p.score));
    assert_eq!(h.get("event_id"), Some(&p.event_id));
    assert_eq!(h.get("model_version"), Some(&p.model_version));
    assert_eq!(h.get("ingested_at"), Some(&"1800000000001".to_string()));
    assert_eq!(
        h.get("features").map(String::as_str),
        Some(r#"{"amount":2.5}"#)
    );
    assert_eq!(
        h.get("features_event_time"),
        Some(&p.event_time.to_string())
    );
}
