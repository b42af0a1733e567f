//! The request/response lane over Kafka against the real stack: every path of the
//! fallback-responder, degradation, coalescing, interop of its responses, and priority
//! events reaching the cache without waiting for their window.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use lanes_common::avro::AvroCodec;
use lanes_common::generator::{FEATURES, Generator};
use lanes_common::kafka::{delivered, enqueue};
use lanes_common::model::Model;
use lanes_common::records::{
    Lane as LaneKind, Prediction, PredictionRequest, PredictionResponse, ResponseSource,
    ResponseStatus, now_millis,
};
use lanes_tests::*;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use redis::AsyncCommands;

fn features(seed: u64) -> BTreeMap<String, f64> {
    Generator::new(seed, 10).next_sample().feature_map()
}

/// What the model says for `f`, computed here with the same model files.
fn expected_score(f: &BTreeMap<String, f64>) -> f64 {
    let model = Model::load(&root().join("models/fraud/1")).unwrap();
    let row: Vec<f32> = FEATURES.iter().map(|n| f[*n] as f32).collect();
    model.score(&row, 1).unwrap()[0]
}

struct Client {
    lane: Lane,
    codec: AvroCodec,
    producer: lanes_common::producer::Producer,
    responses: TestConsumer,
}

impl Client {
    async fn new(lane: &Lane) -> Self {
        let responses = consumer(&lane.settings, &[&lane.settings.topics.responses]);
        Self {
            lane: lane.clone(),
            codec: AvroCodec::new(&lane.settings.registry).unwrap(),
            producer: producer(&lane.settings),
            responses,
        }
    }

    fn request(
        entity: &str,
        features: Option<BTreeMap<String, f64>>,
        max_age_ms: Option<i64>,
    ) -> PredictionRequest {
        PredictionRequest {
            request_id: unique("req"),
            entity_id: entity.into(),
            features,
            max_age_ms,
            reply_topic: None,
            requested_at: now_millis(),
            stale_while_refresh: None,
        }
    }

    /// Sends every request in one burst, with a correlation header each.
    async fn send(&self, reqs: &[PredictionRequest]) {
        let topic = &self.lane.settings.topics.requests;
        let mut pending = Vec::new();
        for r in reqs {
            let bytes = self.codec.encode(topic, r).await.unwrap();
            let headers = OwnedHeaders::new().insert(Header {
                key: "correlation-id",
                value: Some(r.request_id.as_bytes()),
            });
            let record = FutureRecord::to(topic)
                .key(r.entity_id.as_str())
                .payload(&bytes)
                .headers(headers);
            pending.push(enqueue(&self.producer, record).await.unwrap());
        }
        for d in pending {
            delivered(d).await.unwrap();
        }
    }

    /// Responses for `reqs`, checking key and copied headers.
    async fn ask(&self, reqs: &[PredictionRequest]) -> HashMap<String, PredictionResponse> {
        self.send(reqs).await;
        let wanted: HashSet<&str> = reqs.iter().map(|r| r.request_id.as_str()).collect();
        let mut got = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while got.len() < wanted.len() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = tokio::time::timeout(left, self.responses.recv())
                .await
                .expect("responses in time")
                .unwrap();
            let r = self
                .codec
                .decode::<PredictionResponse>(m.payload().unwrap())
                .await
                .unwrap()
                .record;
            if !wanted.contains(r.request_id.as_str()) {
                continue;
            }
            assert_eq!(
                m.key(),
                Some(r.request_id.as_bytes()),
                "keyed by request id"
            );
            let h = m.headers().expect("headers copied");
            let correlation = h
                .iter()
                .find(|h| h.key == "correlation-id")
                .and_then(|h| h.value);
            assert_eq!(correlation, Some(r.request_id.as_bytes()));
            got.insert(r.request_id.clone(), r);
        }
        got
    }

    async fn one(&self, req: PredictionRequest) -> PredictionResponse {
        let id = req.request_id.clone();
        self.ask(&[req]).await.remove(&id).unwrap()
    }

    /// Writes an entity's hash as the cache-writer would.
    async fn seed(&self, entity: &str, fields: &[(&str, String)]) {
        let mut r = redis(&self.lane.settings)
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let key = format!("{}{entity}", self.lane.settings.cache_writer.key_prefix);
        let _: () = r.hset_multiple(&key, fields).await.unwrap();
    }
}

fn prediction_fields(score: f64, version: &str, age_ms: i64) -> Vec<(&'static str, String)> {
    let now = now_millis();
    vec![
        ("score", score.to_string()),
        ("model_name", "fraud".into()),
        ("model_version", version.into()),
        ("event_time", (now - age_ms - 10).to_string()),
        ("scored_at", (now - age_ms).to_string()),
        ("lane", "STREAM".into()),
    ]
}

fn feature_fields(f: &BTreeMap<String, f64>, event_time: i64) -> Vec<(&'static str, String)> {
    vec![
        ("features", serde_json::to_string(f).unwrap()),
        ("features_event_time", event_time.to_string()),
    ]
}

fn responder_lane(what: &str) -> Lane {
    let mut lane = Lane::new(what);
    lane.settings.fallback_responder.freshness_ms = 60_000;
    lane.settings.fallback_responder.refresh_after_ms = 30_000;
    lane.settings.fallback_responder.realtime_deadline_ms = 5_000;
    lane
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_path_answers_as_documented() {
    let lane = responder_lane("responder");
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let predictions = consumer(&lane.settings, &[&lane.settings.topics.predictions]);

    // Fresh hit: served from the cache with its age, one Redis round trip, no scoring.
    c.seed("fresh", &prediction_fields(0.125, "1", 2_000)).await;
    let r = c.one(Client::request("fresh", None, None)).await;
    assert_eq!(
        (r.status, r.source, r.score),
        (ResponseStatus::Ok, ResponseSource::Cache, Some(0.125))
    );
    assert_eq!(r.model_version.as_deref(), Some("1"));
    let age = r.cache_age_ms.unwrap();
    assert!((2_000..10_000).contains(&age), "age {age}");
    assert_eq!(
        running.metric("lanes_fallback_responder_scorings_total", &[]),
        0.0
    );

    // Stale (older than freshness) with online features: scored now, published REALTIME.
    let f1 = features(1);
    c.seed("stale", &prediction_fields(0.5, "1", 120_000)).await;
    c.seed("stale", &feature_fields(&f1, 777)).await;
    let r = c.one(Client::request("stale", None, None)).await;
    assert_eq!(
        (r.status, r.source),
        (ResponseStatus::Ok, ResponseSource::Realtime)
    );
    assert!((r.score.unwrap() - expected_score(&f1)).abs() < 1e-9);
    let m = consume_n(&predictions, 1, Duration::from_secs(30))
        .await
        .remove(0);
    let p = c
        .codec
        .decode::<Prediction>(m.payload().unwrap())
        .await
        .unwrap()
        .record;
    assert_eq!(
        (p.entity_id.as_str(), p.lane, p.event_time),
        ("stale", LaneKind::Realtime, 777)
    );
    assert_eq!(p.score, r.score.unwrap());

    // The request may ask for fresher than the default.
    let r = c.one(Client::request("fresh", None, Some(100))).await;
    assert_eq!(
        r.source,
        ResponseSource::StaleCache,
        "stale, no features to score: the stale entry"
    );
    assert!(r.cache_age_ms.unwrap() > 100);

    // An entry from another model version is stale.
    c.seed("old-model", &prediction_fields(0.9, "0", 10)).await;
    c.seed("old-model", &feature_fields(&f1, 5)).await;
    let r = c.one(Client::request("old-model", None, None)).await;
    assert_eq!(
        (r.source, r.model_version.as_deref()),
        (ResponseSource::Realtime, Some("1"))
    );

    // Online features newer than the event the entry was scored from: the entity moved
    // on since, so the young entry is stale and is scored again from those features.
    let f4 = features(4);
    c.seed("moved-on", &prediction_fields(0.3, "1", 1_000))
        .await;
    let moved_at = now_millis();
    c.seed("moved-on", &feature_fields(&f4, moved_at)).await;
    let r = c.one(Client::request("moved-on", None, None)).await;
    assert_eq!(
        (r.status, r.source),
        (ResponseStatus::Ok, ResponseSource::Realtime)
    );
    assert!((r.score.unwrap() - expected_score(&f4)).abs() < 1e-9);
    let p = next_prediction(&c, &predictions, "moved-on")
        .await
        .remove(0);
    assert_eq!(
        (p.event_time, p.lane),
        (moved_at, LaneKind::Realtime),
        "cached as of the newer features"
    );

    // Miss with features in the request.
    let f2 = features(2);
    let r = c
        .one(Client::request("nobody", Some(f2.clone()), None))
        .await;
    assert_eq!(
        (r.status, r.source),
        (ResponseStatus::Ok, ResponseSource::Realtime)
    );
    assert!((r.score.unwrap() - expected_score(&f2)).abs() < 1e-9);

    // Miss with only online features, one of them kept from before the model dropped
    // it: the model takes the features it names.
    let f3 = features(3);
    let mut kept = f3.clone();
    kept.insert("retired_feature".into(), 7.0);
    c.seed("features-only", &feature_fields(&kept, 42)).await;
    let r = c.one(Client::request("features-only", None, None)).await;
    assert_eq!(r.source, ResponseSource::Realtime);
    assert!((r.score.unwrap() - expected_score(&f3)).abs() < 1e-9);

    // Nothing known: NOT_FOUND.
    let r = c.one(Client::request("unknown-entity", None, None)).await;
    assert_eq!(
        (r.status, r.source, r.score),
        (ResponseStatus::NotFound, ResponseSource::None, None)
    );

    // Bad features in the request: an ERROR with the reason, not silence.
    let mut bad = f2.clone();
    bad.remove("amount");
    let r = c.one(Client::request("nobody", Some(bad), None)).await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert!(r.error.unwrap().contains("amount"));

    let outcome = |o| running.metric("lanes_fallback_responder_outcomes_total", &[("outcome", o)]);
    assert_eq!(outcome("fresh_hit"), 1.0);
    assert_eq!(outcome("stale_hit"), 4.0);
    assert_eq!(outcome("miss"), 4.0);
    assert_eq!(outcome("realtime"), 6.0);
    assert_eq!(outcome("not_found"), 1.0);
    assert_eq!(outcome("stale_served"), 1.0);
    assert_eq!(
        running.metric("lanes_fallback_responder_cache_age_seconds", &[]),
        5.0
    );
    let lookups = |r| {
        running.metric(
            "lanes_fallback_responder_cache_lookups_total",
            &[("result", r)],
        )
    };
    assert_eq!(
        [
            "fresh",
            "miss",
            "stale_age",
            "stale_version",
            "stale_features",
            "unavailable"
        ]
        .map(lookups),
        [1.0, 4.0, 2.0, 1.0, 1.0, 0.0]
    );
    let ratio = running.metric("lanes_fallback_responder_hit_ratio", &[]);
    assert!(
        (ratio - 1.0 / 9.0).abs() < 1e-9,
        "1 fresh answer in 9 lookups: {ratio}"
    );

    // Stale-while-refresh is off here, but a request may ask for it: the stale entry at
    // once, and a refresh behind it.
    let mut swr = Client::request("stale", None, None);
    swr.stale_while_refresh = Some(true);
    let r = c.one(swr).await;
    assert_eq!(
        (r.status, r.source, r.score),
        (ResponseStatus::Ok, ResponseSource::StaleCache, Some(0.5))
    );
    assert!(r.cache_age_ms.unwrap() >= 120_000);
    assert_eq!(
        running.metric(
            "lanes_fallback_responder_refreshes_total",
            &[("trigger", "stale")]
        ),
        1.0
    );
    assert_eq!(
        running.metric(
            "lanes_fallback_responder_responses_total",
            &[("source", "CACHE")]
        ),
        1.0
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_is_answered_by_real_time_scoring() {
    let port = free_port();
    let mut lane = responder_lane("redis-gone");
    lane.settings.redis.url = format!("redis://127.0.0.1:{port}");
    lane.settings.fallback_responder.breaker_open_ms = 300;
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let f = features(4);
    let reqs: Vec<PredictionRequest> = (0..4)
        .map(|_| Client::request("card-9", Some(f.clone()), None))
        .collect();
    for r in c.ask(&reqs).await.values() {
        assert_eq!(
            (r.status, r.source),
            (ResponseStatus::Ok, ResponseSource::Realtime)
        );
        assert!((r.score.unwrap() - expected_score(&f)).abs() < 1e-9);
    }
    let r = c.one(Client::request("card-9", None, None)).await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert!(r.error.unwrap().contains("cache unavailable"));
    assert!(running.metric("lanes_fallback_responder_redis_errors_total", &[]) >= 3.0);
    assert_eq!(
        running.metric("lanes_fallback_responder_cache_breaker_state", &[]),
        1.0,
        "circuit open"
    );

    // Redis comes back: after the open period the breaker's trial reconnects.
    let _redis = redis_server(port);
    c.seed("card-9", &prediction_fields(0.375, "1", 1_000))
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = c.one(Client::request("card-9", None, None)).await;
    assert_eq!((r.source, r.score), (ResponseSource::Cache, Some(0.375)));
    assert_eq!(
        running.metric("lanes_fallback_responder_cache_breaker_state", &[]),
        0.0,
        "closed again"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missed_deadline_serves_stale_or_errors_per_policy() {
    // A zero deadline is one no scoring can meet (cache-only).
    let mut lane = responder_lane("deadline");
    lane.settings.fallback_responder.realtime_deadline_ms = 0;
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let f = features(5);
    c.seed("has-stale", &prediction_fields(0.75, "1", 600_000))
        .await;
    c.seed("has-stale", &feature_fields(&f, 1)).await;
    c.seed("no-stale", &feature_fields(&f, 1)).await;
    let r = c.one(Client::request("has-stale", None, None)).await;
    assert_eq!(
        (r.status, r.source, r.score),
        (ResponseStatus::Ok, ResponseSource::StaleCache, Some(0.75))
    );
    assert!(r.cache_age_ms.unwrap() >= 600_000);
    let r = c.one(Client::request("no-stale", None, None)).await;
    assert_eq!(
        (r.status, r.source),
        (ResponseStatus::Error, ResponseSource::None)
    );
    assert!(r.error.unwrap().contains("deadline"));
    assert_eq!(
        running.metric("lanes_fallback_responder_deadline_misses_total", &[]),
        2.0
    );
    running.stop().await;

    lane.settings.fallback_responder.on_deadline = lanes_common::config::OnDeadline::Error;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let r = c.one(Client::request("has-stale", None, None)).await;
    assert_eq!(
        r.status,
        ResponseStatus::Error,
        "policy error: no stale answers"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_model_misses_are_errors_with_the_reason() {
    let mut lane = responder_lane("no-model");
    lane.settings.model.dir = root().join("models/does-not-exist");
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    c.seed("cached", &prediction_fields(0.2, "1", 1_000)).await;
    let r = c.one(Client::request("cached", None, None)).await;
    assert_eq!(r.source, ResponseSource::Cache, "fresh hits need no model");
    let r = c
        .one(Client::request("other", Some(features(6)), None))
        .await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert!(r.error.unwrap().contains("model unavailable"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_for_one_entity_share_one_scoring() {
    let lane = responder_lane("coalesce");
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let f = features(7);
    c.seed("hot", &feature_fields(&f, 99)).await;
    // Warm the codec and the consumer group first.
    c.one(Client::request("warm-up", None, None)).await;
    let reqs: Vec<PredictionRequest> = (0..50)
        .map(|_| Client::request("hot", None, None))
        .collect();
    let got = c.ask(&reqs).await;
    let scores: HashSet<u64> = got.values().map(|r| r.score.unwrap().to_bits()).collect();
    assert_eq!(scores.len(), 1);
    assert!(got.values().all(|r| r.source == ResponseSource::Realtime));
    // Requests that arrive while a scoring for the entity runs join it. The burst may
    // reach the responder in a few fetches, each of which can start at most one scoring;
    // without coalescing every request would score.
    let scorings = running.metric("lanes_fallback_responder_scorings_total", &[]);
    assert!(
        (1.0..=5.0).contains(&scorings),
        "50 concurrent misses took {scorings} scorings"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confluent_python_decodes_responses() {
    let lane = responder_lane("resp-interop");
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    c.seed("py", &prediction_fields(0.625, "1", 1_000)).await;
    let req = Client::request("py", None, None);
    let ours = c.one(req).await;
    let (bootstrap, registry, topic) = (
        lane.settings.kafka.bootstrap_servers.clone(),
        lane.settings.registry.url.clone(),
        lane.settings.topics.responses.clone(),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(root().join("tests/interop/confluent_avro.py"))
            .args(["consume", &bootstrap, &registry, &topic])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs, serde_json::to_value(&ours).unwrap());
    assert_eq!(theirs["source"], "CACHE");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn significant_events_reach_the_cache_without_waiting_for_their_window() {
    let mut lane = Lane::new("priority");
    lane.settings.micro_batcher.max_delay_ms = 120_000;
    lane.settings.micro_batcher.max_events = 100_000;
    lane.create_topics().await;
    let running = lane.start(&streaming_services());
    running.ready().await;
    let mut samples: Vec<_> = Generator::new(8, 1).take(3).collect();
    samples[2].kind = "chargeback".into();
    let lines: Vec<String> = samples.iter().map(|s| s.raw_json()).collect();
    lane.publish_raw(&producer(&lane.settings), &lines).await;
    let key = format!(
        "{}{}",
        lane.settings.cache_writer.key_prefix, samples[2].entity_id
    );
    let conn = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let cached: HashMap<String, String> = wait_for(
        "the chargeback's prediction",
        Duration::from_secs(20),
        || {
            let (mut conn, key, id) = (conn.clone(), key.clone(), samples[2].event_id.clone());
            async move {
                let h: HashMap<String, String> = conn.hgetall(&key).await.ok()?;
                (h.get("event_id") == Some(&id)).then_some(h)
            }
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "well before the 120 s window"
    );
    assert_eq!(cached["lane"], "STREAM");
    // The online features arrived beside it.
    assert!(cached.contains_key("features"), "{cached:?}");
    assert_eq!(
        running.metric(
            "lanes_micro_batcher_windows_closed_total",
            &[("reason", "PRIORITY")]
        ),
        1.0
    );
    running.stop().await;
}

/// A responder lane whose sampler and sweep run several times a second.
fn sweeping_lane(what: &str) -> Lane {
    let mut lane = responder_lane(what);
    let cfg = &mut lane.settings.fallback_responder;
    cfg.freshness_ms = 60_000;
    cfg.refresh_after_ms = 30_000;
    cfg.sample_interval_ms = 200;
    cfg.sweep_interval_ms = 300;
    cfg.sweep_max_per_second = 50;
    lane
}

/// Waits for the sweep's first refresh.
async fn sweep_refreshed(running: &Running, what: &str) {
    wait_for(what, Duration::from_secs(20), || async {
        (running.metric(
            "lanes_fallback_responder_refreshes_total",
            &[("trigger", "sweep")],
        ) >= 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn staleness_is_sampled_and_old_entries_are_refreshed() {
    let lane = sweeping_lane("refresh");
    lane.create_topics().await;
    let c = Client::new(&lane).await;
    let f = features(9);
    // Three fresh entries, one past the freshness bound, one from another model version;
    // "aging" is fresh but past refresh_after, and has features to re-score from.
    for e in ["f1", "f2", "f3"] {
        c.seed(e, &prediction_fields(0.1, "1", 1_000)).await;
    }
    c.seed("too-old", &prediction_fields(0.1, "1", 90_000))
        .await;
    c.seed("other-model", &prediction_fields(0.1, "0", 1_000))
        .await;
    c.seed("aging", &prediction_fields(0.1, "1", 45_000)).await;
    c.seed("aging", &feature_fields(&f, 1234)).await;

    let predictions = consumer(&lane.settings, &[&lane.settings.topics.predictions]);
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    // 2 of 6 sampled entries are stale.
    wait_for("the staleness sample", Duration::from_secs(20), || async {
        let share = running.metric("lanes_fallback_responder_stale_share", &[]);
        ((share - 2.0 / 6.0).abs() < 1e-9).then_some(())
    })
    .await;
    assert_eq!(
        running.metric("lanes_fallback_responder_stale_sampled_entries", &[]),
        6.0
    );

    // The sweep re-scores "aging" from its online features (the only one it can).
    sweep_refreshed(&running, "a sweep refresh").await;
    let m = consume_n(&predictions, 1, Duration::from_secs(30))
        .await
        .remove(0);
    let p = c
        .codec
        .decode::<Prediction>(m.payload().unwrap())
        .await
        .unwrap()
        .record;
    assert_eq!(
        (p.entity_id.as_str(), p.event_time, p.lane),
        ("aging", 1234, LaneKind::Realtime)
    );
    assert!((p.score - expected_score(&f)).abs() < 1e-9);

    // Reading an aging entry serves it and refreshes it in the background.
    let r = c.one(Client::request("aging", None, None)).await;
    assert_eq!((r.source, r.score), (ResponseSource::Cache, Some(0.1)));
    assert_eq!(
        running.metric(
            "lanes_fallback_responder_refreshes_total",
            &[("trigger", "read")]
        ),
        1.0
    );
    running.stop().await;
}

/// A score from a request's own (here made-up) features warms a stale entry, but does
/// not outrank the entity's online features: once it is stale in turn, the re-score
/// from them replaces it. Stamped with the responder's clock, it outranked every
/// refresh until the entity's next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_score_from_request_features_gives_way_to_the_online_features() {
    let mut lane = responder_lane("gives-way");
    lane.settings.fallback_responder.freshness_ms = 3_000;
    lane.settings.fallback_responder.refresh_after_ms = 2_000;
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def(), lanes_cache_writer::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let (online, made_up) = (features(21), features(22));
    let (online_score, made_up_score) = (expected_score(&online), expected_score(&made_up));
    assert!((online_score - made_up_score).abs() > 1e-6);
    c.seed("card", &prediction_fields(0.5, "1", 120_000)).await;
    c.seed("card", &feature_fields(&online, now_millis() - 100_000))
        .await;
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("{}card", lane.settings.cache_writer.key_prefix);
    let cached_score = |r: &redis::aio::MultiplexedConnection| {
        let (mut r, key) = (r.clone(), key.clone());
        async move {
            let s: Option<String> = r.hget(&key, "score").await.unwrap();
            s.and_then(|s| s.parse::<f64>().ok())
        }
    };

    let answer = c
        .one(Client::request("card", Some(made_up.clone()), None))
        .await;
    assert_eq!(answer.source, ResponseSource::Realtime);
    wait_for("the warm written", Duration::from_secs(30), || async {
        cached_score(&r)
            .await
            .filter(|s| (s - made_up_score).abs() < 1e-9)
    })
    .await;
    // Fresh, it answers for the entity.
    let answer = c.one(Client::request("card", None, None)).await;
    assert_eq!(answer.source, ResponseSource::Cache);

    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let answer = c.one(Client::request("card", None, None)).await;
    assert_eq!(answer.source, ResponseSource::Realtime, "{answer:?}");
    assert!((answer.score.unwrap() - online_score).abs() < 1e-9);
    wait_for(
        "the online features' score written over the warm",
        Duration::from_secs(30),
        || async {
            cached_score(&r)
                .await
                .filter(|s| (s - online_score).abs() < 1e-9)
        },
    )
    .await;
    let _: () = r.del(&key).await.unwrap();
    running.stop().await;
}

/// Keys under the cache's prefix that another Redis client wrote, not hashes or not
/// UTF-8: requests for one of them do not open the breaker for every other entity, and
/// the sweep and the sampler read past them. A per-key error counted as the cache
/// failing, and one such key failed its whole SCAN page for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_keys_under_the_prefix_neither_open_the_breaker_nor_stop_the_sweep() {
    let mut lane = sweeping_lane("odd-keys");
    lane.settings.fallback_responder.breaker_failures = 3;
    lane.create_topics().await;
    let c = Client::new(&lane).await;
    let prefix = lane.settings.cache_writer.key_prefix.clone();
    let mut r = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = r.set(format!("{prefix}a-string"), "x").await.unwrap();
    let mut binary_name = prefix.clone().into_bytes();
    binary_name.extend_from_slice(&[0xff, 0xfe]);
    let _: () = r.hset(&binary_name, "score", "0.5").await.unwrap();
    let _: () = r
        .hset(
            format!("{prefix}binary-value"),
            "score",
            &[0xffu8, 0xfe][..],
        )
        .await
        .unwrap();
    c.seed("fresh", &prediction_fields(0.125, "1", 1_000)).await;
    let f = features(5);
    c.seed("aging", &prediction_fields(0.1, "1", 45_000)).await;
    c.seed("aging", &feature_fields(&f, 1234)).await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;

    sweep_refreshed(&running, "a sweep refresh past the odd keys").await;
    // Sampled: "fresh" and "aging"; the odd keys read as no entry.
    wait_for("a staleness sample", Duration::from_secs(20), || async {
        (running.metric("lanes_fallback_responder_stale_sampled_entries", &[]) >= 2.0).then_some(())
    })
    .await;
    let odd: Vec<PredictionRequest> = (0..6)
        .map(|_| Client::request("a-string", None, None))
        .collect();
    for r in c.ask(&odd).await.into_values() {
        assert_eq!(r.status, ResponseStatus::Error, "{r:?}");
    }
    let r = c.one(Client::request("fresh", None, None)).await;
    assert_eq!(
        (r.status, r.source, r.score),
        (ResponseStatus::Ok, ResponseSource::Cache, Some(0.125)),
        "{r:?}"
    );
    running.stop().await;
}

/// Predictions read until one for `entity` arrives; it comes first in the result.
async fn next_prediction(c: &Client, predictions: &TestConsumer, entity: &str) -> Vec<Prediction> {
    let mut seen = Vec::new();
    loop {
        let m = consume_n(predictions, 1, Duration::from_secs(30))
            .await
            .remove(0);
        let p = c
            .codec
            .decode::<Prediction>(payload(&m))
            .await
            .unwrap()
            .record;
        if p.entity_id == entity {
            seen.insert(0, p);
            return seen;
        }
        seen.push(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_get_errors_and_the_responder_stays_up() {
    let lane = responder_lane("hostile-requests");
    lane.create_topics().await;
    let locked = format!("{}.responses.locked", lane.id);
    occupy_subject(&lane.settings, &format!("{locked}-value")).await;
    create_topics(&lane.settings, &[&locked]).await;
    let running = lane.start(&[lanes_fallback_responder::def(), lanes_cache_writer::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let predictions = consumer(&lane.settings, &[&lane.settings.topics.predictions]);
    let f = features(21);
    let now = now_millis();

    // Reply topics: empty, off the allow-list, or refusing the response (its subject
    // holds another schema): each an ERROR on the default topic.
    for (reply, says) in [
        ("".to_string(), "not allowed"),
        (lane.settings.topics.dlq.clone(), "not allowed"),
        (lane.settings.topics.predictions.clone(), "not allowed"),
        (locked.clone(), "refused"),
    ] {
        let mut req = Client::request("reply", Some(f.clone()), None);
        req.reply_topic = Some(reply.clone());
        let r = c.one(req).await;
        assert_eq!(r.status, ResponseStatus::Error, "{reply:?}");
        assert!(
            r.error.as_deref().unwrap().contains(says),
            "{reply:?}: {r:?}"
        );
    }

    // Client clocks: far ahead, seconds instead of milliseconds, and too old to answer.
    for (requested_at, says) in [
        (now + 3_600_000, "ahead"),
        (now / 1000, "before 2000"),
        (now * 1000, "ahead"),
        (now - 120_000, "expired"),
    ] {
        let mut req = Client::request("clock", Some(f.clone()), None);
        req.requested_at = requested_at;
        let r = c.one(req).await;
        assert_eq!(r.status, ResponseStatus::Error, "{requested_at}");
        assert!(
            r.error.as_deref().unwrap().contains(says),
            "{requested_at}: {r:?}"
        );
    }
    // No entity: nothing to read, and nothing to warm.
    let r = c.one(Client::request("", Some(f.clone()), None)).await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert_eq!(r.error.as_deref(), Some("entity_id is empty"), "{r:?}");
    // Ids longer than the cache takes: an entity id is its key, and a request id names
    // the prediction the request's features warm.
    let long = "l".repeat(513);
    let r = c.one(Client::request(&long, Some(f.clone()), None)).await;
    assert_eq!(
        (r.status, r.error.as_deref()),
        (
            ResponseStatus::Error,
            Some("entity_id is 513 bytes, over 512")
        ),
        "{r:?}"
    );
    let mut req = Client::request("long-request", Some(f.clone()), None);
    req.request_id = long;
    let r = c.one(req).await;
    assert_eq!(
        (r.status, r.error.as_deref()),
        (
            ResponseStatus::Error,
            Some("request_id is 513 bytes, over 512")
        ),
        "{r:?}"
    );
    // At the limits, both are answered.
    let mut req = Client::request(&"l".repeat(512), Some(f.clone()), None);
    req.request_id = "r".repeat(512);
    let r = c.one(req).await;
    assert_eq!(
        (r.status, r.source),
        (ResponseStatus::Ok, ResponseSource::Realtime),
        "{r:?}"
    );
    // A value finite as f64 but not as the model's f32.
    let mut huge = f.clone();
    huge.insert("amount".into(), 1e39);
    let r = c.one(Client::request("huge", Some(huge), None)).await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert!(
        r.error.unwrap().contains("32-bit"),
        "the reason names the range"
    );
    // A feature the model lacks, then also one of the model's left out: the missing one
    // is named first.
    let mut extra = f.clone();
    extra.insert("zz-not-a-feature".into(), 1.0);
    let r = c
        .one(Client::request("extra", Some(extra.clone()), None))
        .await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains(r#"unknown feature "zz-not-a-feature""#),
        "{r:?}"
    );
    // Fifty thousand names: refused before the entry is read or the map copied.
    let flood: BTreeMap<String, f64> = (0..50_000).map(|i| (format!("n{i:05}"), 1.0)).collect();
    let r = c.one(Client::request("flood", Some(flood), None)).await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert_eq!(
        r.error.as_deref(),
        Some(r#"unknown feature "n00000""#),
        "{r:?}"
    );
    extra.remove("amount");
    let r = c.one(Client::request("missing", Some(extra), None)).await;
    assert_eq!(r.status, ResponseStatus::Error);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains(r#"feature "amount" is missing"#),
        "{r:?}"
    );

    // Stale, with cached features the model cannot take (one left out): the entry is
    // served as it is, not an ERROR for the cache's contents.
    c.seed("partial", &prediction_fields(0.375, "1", 200_000))
        .await;
    let mut partial = f.clone();
    partial.remove("amount");
    c.seed("partial", &feature_fields(&partial, now_millis()))
        .await;
    let r = c.one(Client::request("partial", None, None)).await;
    assert_eq!(
        (r.status, r.source, r.score),
        (ResponseStatus::Ok, ResponseSource::StaleCache, Some(0.375)),
        "{r:?}"
    );
    // Request features warm the cache with the responder's clock as event time, never
    // the client's requested_at.
    let mut req = Client::request("warm", Some(f.clone()), None);
    req.requested_at = now - 20_000;
    let before = now_millis();
    let r = c.one(req).await;
    assert_eq!(r.source, ResponseSource::Realtime);
    let p = next_prediction(&c, &predictions, "warm").await.remove(0);
    assert!(
        p.event_time >= before,
        "event time {} is not the client's",
        p.event_time
    );

    // A fresh entry stays: the client's max_age_ms 0 gets a real-time answer, but the
    // cache is not warmed over the entry.
    c.seed("fresh", &prediction_fields(0.125, "1", 1_000)).await;
    let r = c
        .one(Client::request("fresh", Some(f.clone()), Some(0)))
        .await;
    assert_eq!(r.source, ResponseSource::Realtime);
    // An entry whose online features are newer than now (the entity moved on) is not
    // replaced by a score from a request's features.
    c.seed("moved-on", &prediction_fields(0.25, "1", 200_000))
        .await;
    c.seed("moved-on", &feature_fields(&f, now_millis() + 60_000))
        .await;
    let r = c
        .one(Client::request("moved-on", Some(f.clone()), None))
        .await;
    assert_eq!(r.source, ResponseSource::Realtime);
    let seen = next_prediction(&c, &predictions, "moved-on").await;
    assert!(
        seen.iter().all(|p| p.entity_id != "fresh"),
        "a fresh entry is not warmed over"
    );
    running
        .wait_metric(
            "lanes_cache_writer_writes_total",
            &[("result", "stale")],
            1.0,
        )
        .await;
    let mut redis = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = |e: &str| format!("{}{e}", lane.settings.cache_writer.key_prefix);
    let score: String = redis.hget(key("moved-on"), "score").await.unwrap();
    assert_eq!(score, "0.25", "the entry with newer features is kept");
    let score: String = redis.hget(key("fresh"), "score").await.unwrap();
    assert_eq!(score, "0.125");

    // Still answering.
    let r = c.one(Client::request("after", Some(f.clone()), None)).await;
    assert_eq!(
        (r.status, r.source),
        (ResponseStatus::Ok, ResponseSource::Realtime)
    );
    let refused = |reason| {
        running.metric(
            "lanes_fallback_responder_refused_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(refused("reply_topic"), 4.0);
    assert_eq!(refused("entity_id"), 2.0);
    assert_eq!(refused("request_id"), 1.0);
    assert_eq!(refused("requested_at"), 3.0);
    assert_eq!(refused("expired"), 1.0);
    assert_eq!(
        refused("features"),
        1.0,
        "the flood, not the one extra name"
    );
    running.stop().await;
}

/// A model with the fraud model's inputs and outputs that takes tens of milliseconds a
/// row: 60 chained 2048x2048 matrix products (one shared zero weight, so scores are 0).
/// A responder lane serving [`slow_model`] from a folder that lives as long as the
/// returned guard.
fn slow_lane(what: &str, layers: usize) -> (tempfile::TempDir, Lane) {
    let dir = tempfile::tempdir().unwrap();
    let version = dir.path().join("1");
    std::fs::create_dir(&version).unwrap();
    slow_model(&version, layers);
    let mut lane = responder_lane(what);
    lane.settings.model.dir = version;
    (dir, lane)
}

/// A model with the fraud model's features whose every run does `layers` 2048x2048
/// matrix products.
fn slow_model(dir: &std::path::Path, layers: usize) {
    let script = r#"
import sys, numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
path = sys.argv[1]
x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 10])
inits = [
    numpy_helper.from_array(np.zeros((10, 2048), dtype=np.float32), "w_in"),
    numpy_helper.from_array(np.zeros((2048, 2048), dtype=np.float32), "w"),
    numpy_helper.from_array(np.zeros((2048, 2), dtype=np.float32), "w_out"),
]
nodes = [helper.make_node("MatMul", ["input", "w_in"], ["h0"])]
layers = int(sys.argv[2])
for i in range(layers):
    nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["probabilities"]))
out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])
m = helper.make_model(helper.make_graph(nodes, "slow", [x], [out], inits),
                      opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
onnx.save(m, path)
"#;
    let out = std::process::Command::new(python())
        .args([
            "-c",
            script,
            dir.join("model.onnx").to_str().unwrap(),
            &layers.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(
        root().join("models/fraud/1/model.toml"),
        dir.join("model.toml"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scorings_past_their_deadline_count_against_the_in_flight_limit() {
    let (_model, mut lane) = slow_lane("background-bound", 60);
    lane.settings.fallback_responder.max_in_flight = 3;
    // Every scoring outlives its request: it goes on in the background, warming the cache.
    lane.settings.fallback_responder.realtime_deadline_ms = 1;
    lane.create_topics().await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let reqs: Vec<PredictionRequest> = (0..24)
        .map(|i| Client::request(&format!("busy-{i}"), Some(features(100 + i)), None))
        .collect();
    let peak = std::sync::atomic::AtomicU64::new(0);
    let watch = async {
        loop {
            let now = running.metric("lanes_fallback_responder_background_tasks", &[]) as u64;
            peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let answers = tokio::select! {
        answers = c.ask(&reqs) => answers,
        _ = watch => unreachable!(),
    };
    assert_eq!(answers.len(), reqs.len(), "every request is answered");
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak >= 1, "scorings ran in the background");
    assert!(
        peak <= 3,
        "background work stays within max_in_flight: peak {peak}"
    );
    running.stop().await;
}

/// Sends `batch` requests for `entities` (cycled from `from`), waiting for their
/// delivery but not their answers.
async fn send_for(c: &Client, entities: &[String], from: usize, batch: usize) {
    let reqs: Vec<PredictionRequest> = (from..from + batch)
        .map(|i| Client::request(&entities[i % entities.len()], None, None))
        .collect();
    c.send(&reqs).await;
}

/// A real Prometheus scraping a running responder (its own process) with the deployed
/// rule: LanesCacheHitRatioLow stays quiet while requests hit, fires once misses drive
/// the hit ratio under the configured floor, and clears when hits return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_fires_the_hit_ratio_alert_on_misses_and_clears_it() {
    use lanes_tests::prom::{self, Prometheus};
    const ALERT: &str = "LanesCacheHitRatioLow";
    let mut lane = responder_lane("hit-ratio");
    lane.settings.fallback_responder.hit_ratio_window_s = 3;
    lane.settings.fallback_responder.hit_ratio_floor = 0.8;
    lane.create_topics().await;
    let c = Client::new(&lane).await;
    let hits: Vec<String> = (0..10).map(|i| format!("hit-{i}")).collect();
    for e in &hits {
        c.seed(e, &prediction_fields(0.2, "1", 1_000)).await;
    }
    let misses: Vec<String> = (0..10).map(|i| format!("never-cached-{i}")).collect();
    let _responder = lane.spawn("lanes-fallback-responder", &[]);
    let port = lane.settings.admin.ports.fallback_responder;
    wait_for("the responder ready", Duration::from_secs(60), || async {
        answers_ok(&format!("http://127.0.0.1:{port}/readyz"))
            .await
            .then_some(())
    })
    .await;
    let rules = prom::rules_with_for(
        &root().join("deploy/prometheus/alerts.yml"),
        &[(ALERT, "3s")],
    );
    let prom = Prometheus::start(&[format!("127.0.0.1:{port}")], &rules).await;

    // Hits only: the scraped ratio reaches 1 and the alert never leaves inactive.
    let mut sent = 0;
    let healthy_until = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut scraped = None;
    while tokio::time::Instant::now() < healthy_until {
        send_for(&c, &hits, sent, 5).await;
        sent += 5;
        assert_eq!(
            prom.alert_state(ALERT).await,
            None,
            "quiet while requests hit"
        );
        scraped = prom
            .query("lanes_fallback_responder_hit_ratio")
            .await
            .or(scraped);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        scraped,
        Some(1.0),
        "Prometheus scraped the responder's hit ratio"
    );
    assert_eq!(
        prom.query("lanes_fallback_responder_hit_ratio_floor").await,
        Some(0.8)
    );

    // Misses: the ratio falls under the floor and, held for the rule's `for`, fires.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut states = Vec::new();
    loop {
        send_for(&c, &misses, sent, 5).await;
        sent += 5;
        let state = prom.alert_state(ALERT).await;
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        if state.as_deref() == Some("firing") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ALERT} did not fire under misses: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        states.contains(&Some("pending".into())),
        "pending for its `for` before firing: {states:?}"
    );
    let ratio = prom
        .query("lanes_fallback_responder_hit_ratio")
        .await
        .unwrap();
    assert!(ratio < 0.8, "{ratio}");

    // Hits again: the ratio recovers and the alert clears.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        send_for(&c, &hits, sent, 5).await;
        sent += 5;
        if prom.alert_state(ALERT).await.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ALERT} did not clear once requests hit again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ratio = prom
        .query("lanes_fallback_responder_hit_ratio")
        .await
        .unwrap();
    assert!(ratio >= 0.8, "{ratio}");
}

/// Stale-while-refresh by config: a stale entry is answered at once (STALE_CACHE with its
/// age), before any scoring ends, and one background scoring shared by every request for
/// the entity refreshes it. A request can turn the policy off for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_refresh_answers_at_once_and_refreshes_once_per_entity() {
    // About a second a run, far longer than answering from the cache takes.
    let (_model, mut lane) = slow_lane("swr", 2400);
    lane.settings.fallback_responder.stale_while_refresh = true;
    lane.settings.fallback_responder.max_in_flight = 16;
    lane.settings.fallback_responder.realtime_deadline_ms = 10_000;
    lane.create_topics().await;
    let c = Client::new(&lane).await;
    let f = features(21);
    c.seed("swr", &prediction_fields(0.4, "1", 120_000)).await;
    c.seed("swr", &feature_fields(&f, 1234)).await;
    let predictions = consumer(&lane.settings, &[&lane.settings.topics.predictions]);
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;

    let reqs: Vec<PredictionRequest> = (0..5).map(|_| Client::request("swr", None, None)).collect();
    let answers = c.ask(&reqs).await;
    for r in answers.values() {
        assert_eq!(
            (r.status, r.source, r.score),
            (ResponseStatus::Ok, ResponseSource::StaleCache, Some(0.4)),
            "{r:?}"
        );
        assert!(r.cache_age_ms.unwrap() >= 120_000, "{r:?}");
    }
    // One scoring refreshes the entry from its online features, for all five.
    let p = next_prediction(&c, &predictions, "swr").await.remove(0);
    assert_eq!((p.event_time, p.lane), (1234, LaneKind::Realtime));
    running
        .wait_metric("lanes_fallback_responder_scoring_seconds", &[], 1.0)
        .await;
    // The refresh is stamped as its model run ends; an answer that waited for the run
    // would be stamped after it. These were stamped well before it ended (and the
    // run is long enough for that to tell), however slow the broker was to carry them.
    let run_ms =
        (running.metric("lanes_fallback_responder_scoring_seconds_sum", &[]) * 1000.0) as i64;
    assert!(
        run_ms >= 300,
        "the model run took {run_ms} ms; too fast to tell"
    );
    for r in answers.values() {
        assert!(
            r.responded_at + 100 <= p.scored_at,
            "answered at {} while the refresh ended at {} after a {run_ms} ms run",
            r.responded_at,
            p.scored_at
        );
    }
    assert_eq!(
        running.metric("lanes_fallback_responder_scorings_total", &[]),
        1.0,
        "coalesced"
    );
    assert_eq!(
        running.metric(
            "lanes_fallback_responder_refreshes_total",
            &[("trigger", "stale")]
        ),
        5.0
    );

    // The request's own choice wins: this one waits for a real-time score.
    let mut wait = Client::request("swr", None, None);
    wait.stale_while_refresh = Some(false);
    let r = c.one(wait).await;
    assert_eq!(
        (r.status, r.source),
        (ResponseStatus::Ok, ResponseSource::Realtime)
    );
    assert_eq!(
        running.metric("lanes_fallback_responder_scorings_total", &[]),
        2.0
    );
    running.stop().await;
}

/// Reply topics are the client's to name. One Kafka would not take is refused by name;
/// one the broker does not list is answered ERROR without registering a subject or
/// making a topic, however many a client names, fifty at a time sharing a listing; one
/// made just before the request is found; one that refused a response is not tried
/// again for a while; and a registry that will not take a reply subject holds its
/// request for a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reply_topics_a_client_names_cannot_grow_or_stall_the_responder() {
    let mut lane = responder_lane("reply-topics");
    let registry = lanes_tests::proxy::SlowProxy::start(
        lane.settings.registry.url.trim_start_matches("http://"),
    )
    .await;
    lane.settings.registry.url = format!("http://{}", registry.addr);
    lane.settings.registry.timeout_ms = 300;
    lane.create_topics().await;
    let reply = |name: &str| format!("{}.responses.{name}", lane.id);
    let (mine, late, locked, slow) = (reply("mine"), reply("late"), reply("locked"), reply("slow"));
    create_topics(&lane.settings, &[&mine, &locked, &slow]).await;
    occupy_subject(&lane.settings, &format!("{locked}-value")).await;
    let running = lane.start(&[lanes_fallback_responder::def()]);
    running.ready().await;
    let c = Client::new(&lane).await;
    let to = |topic: &str| {
        let mut r = Client::request("someone", None, None);
        r.reply_topic = Some(topic.to_string());
        r
    };
    // Answered on `topic`, as NOT_FOUND (no entity).
    let answered_on = |topic: String| {
        let c = &c;
        async move {
            let on = consumer(&c.lane.settings, &[&topic]);
            let req = to(&topic);
            c.send(std::slice::from_ref(&req)).await;
            // From the topic's start: an earlier answer there comes first.
            loop {
                let m = consume_n(&on, 1, Duration::from_secs(30)).await;
                let r = c
                    .codec
                    .decode::<PredictionResponse>(payload(&m[0]))
                    .await
                    .unwrap()
                    .record;
                if r.request_id == req.request_id {
                    assert_eq!(r.status, ResponseStatus::NotFound, "{topic}");
                    break;
                }
            }
        }
    };
    let error = |r: PredictionResponse| {
        assert_eq!(r.status, ResponseStatus::Error, "{r:?}");
        r.error.unwrap()
    };
    let within = |started: std::time::Instant, secs: u64| {
        let took = started.elapsed();
        assert!(took < Duration::from_secs(secs), "{took:?}");
    };

    // A name the prefix allows but Kafka would not take: refused by name (before this
    // check its subject was registered, "/.." and all).
    let e = error(c.one(to(&reply(&format!("x/../{}.victim", lane.id)))).await);
    assert!(
        e.contains("not a valid topic name") && e.contains("'/'"),
        "{e}"
    );

    answered_on(mine.clone()).await;

    // Not on the broker: refused within a listing (no produce held for librdkafka's 30 s
    // wait for the topic to appear); fifty fresh ones share listings.
    let started = std::time::Instant::now();
    let e = error(c.one(to(&reply("nowhere"))).await);
    assert!(e.contains("does not exist"), "{e}");
    within(started, 10);
    let started = std::time::Instant::now();
    let fresh: Vec<_> = (0..50).map(|i| to(&reply(&format!("t{i}")))).collect();
    for r in c.ask(&fresh).await.into_values() {
        let e = error(r);
        assert!(e.contains("does not exist"), "{e}");
    }
    within(started, 10);

    // A response too large for the broker (its request's id is 400 KB, carried in its
    // key, value and correlation header): that request is dead-lettered, and the topic
    // stays open to others.
    let dlq = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    let mut huge = to(&mine);
    huge.request_id = "r".repeat(400_000);
    c.send(std::slice::from_ref(&huge)).await;
    let letter = &consume_n(&dlq, 1, Duration::from_secs(30)).await[0];
    let class =
        lanes_common::dlq::header_str(letter.headers().unwrap(), lanes_common::dlq::HEADER_CLASS);
    assert_eq!(class, Some("TOO_LARGE"));
    answered_on(mine.clone()).await;

    // Made just before the request: found (a listing newer than the question); and a
    // topic already listed is answered on again.
    create_topics(&lane.settings, &[&late]).await;
    answered_on(late.clone()).await;
    answered_on(mine.clone()).await;

    // On the broker but refusing (its subject holds another schema): ERROR, and the next
    // request naming it is answered without trying it again.
    let e = error(c.one(to(&locked)).await);
    assert!(e.contains("refused the response"), "{e}");
    let e = error(c.one(to(&locked)).await);
    assert!(e.contains("refused a response within the last 60s"), "{e}");

    // A registry that will not take the reply subject (here too slow to answer): the
    // request is answered on the default topic after a bounded wait (10 s), not held.
    registry.set_delay(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let e = error(c.one(to(&slow)).await);
    assert!(e.contains("did not take subject"), "{e}");
    within(started, 20);
    registry.set_delay(Duration::ZERO);

    // Nothing of the missing topics was registered or made.
    let all: Vec<String> = http()
        .get(format!("{}/subjects", lane.settings.registry.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut replies: Vec<_> = all.iter().filter(|s| s.starts_with(&reply(""))).collect();
    replies.sort();
    let subject = |t: &str| format!("{t}-value");
    assert_eq!(
        replies,
        [
            &subject(&late),
            &subject(&locked),
            &subject(&mine),
            &subject(&slow)
        ],
        "only topics on the broker (slow's registration was taken, its answer too late)"
    );
    let broker: Vec<String> = {
        use rdkafka::consumer::Consumer;
        metadata_probe(&lane.settings)
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap()
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|t| t.starts_with(&reply("")))
            .collect()
    };
    assert_eq!(broker.len(), 4, "{broker:?}");
    assert_eq!(
        running.metric(
            "lanes_fallback_responder_refused_total",
            &[("reason", "reply_topic")]
        ),
        55.0,
        "the walk, nowhere, fifty fresh ones, locked twice and slow"
    );
    // Stopping waits for every response: none is left held.
    running.stop().await;
}
