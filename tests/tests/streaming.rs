//! The streaming lane end to end on the real stack: raw JSON in, predictions on Kafka
//! and in Redis out, dead letters with their class, and nothing lost across crashes,
//! rebalances and shutdowns.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use lanes_common::avro::AvroCodec;
use lanes_common::dlq::{self, ErrorClass};
use lanes_common::generator::{FEATURES, Generator, Sample};
use lanes_common::records::Prediction;
use lanes_common::service::ServiceDef;
use lanes_tests::*;
use rdkafka::Message;
use redis::AsyncCommands;

fn samples(seed: u64, n: usize, cards: usize) -> Vec<Sample> {
    Generator::new(seed, cards).take(n).collect()
}

/// Invalid raw events, each with the class it must be dead-lettered as.
fn invalid_events() -> Vec<(String, ErrorClass)> {
    let ok = r#""amount":1,"hour":2,"merchant_risk":0.1,"distance_km":3,"txn_count_1h":0,"avg_amount_30d":20,"amount_ratio":0.05,"card_age_days":100,"is_foreign":0"#;
    vec![
        ("{not json".to_string(), ErrorClass::InvalidJson),
        (
            format!(r#"{{"event_id":"bad-1","features":{{{ok},"is_online":1}}}}"#),
            ErrorClass::MissingField,
        ),
        (
            format!(r#"{{"event_id":"bad-2","entity_id":"card-x","features":{{{ok}}}}}"#),
            ErrorClass::MissingField,
        ),
        (
            format!(
                r#"{{"event_id":"bad-3","entity_id":"card-x","features":{{{ok},"is_online":1,"zip":9}}}}"#
            ),
            ErrorClass::UnknownFeature,
        ),
        (
            format!(
                r#"{{"event_id":"bad-4","entity_id":"card-x","features":{{{ok},"is_online":"yes"}}}}"#
            ),
            ErrorClass::NonNumeric,
        ),
        (
            format!(
                r#"{{"event_id":"bad-5","entity_id":"card-x","features":{{{ok},"is_online":NaN}}}}"#
            ),
            ErrorClass::NonFinite,
        ),
        (
            format!(
                r#"{{"event_id":"bad-6","entity_id":"card-x","event_time":"soon","features":{{{ok},"is_online":1}}}}"#
            ),
            ErrorClass::InvalidEventTime,
        ),
        (
            format!(
                r#"{{"event_id":"bad-7","entity_id":"{}","features":{{{ok},"is_online":1}}}}"#,
                "x".repeat(70_000)
            ),
            ErrorClass::TooLarge,
        ),
    ]
}

/// Reads predictions until `done` says enough, returning every one read.
async fn read_predictions(
    lane: &Lane,
    timeout: Duration,
    done: impl Fn(&HashMap<String, Vec<Prediction>>) -> bool,
) -> HashMap<String, Vec<Prediction>> {
    let consumer = consumer(&lane.settings, &[&lane.settings.topics.predictions]);
    let codec = AvroCodec::new(&lane.settings.registry).unwrap();
    let mut by_event: HashMap<String, Vec<Prediction>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&by_event) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = match tokio::time::timeout(left, consumer.recv()).await {
            Ok(m) => m.expect("consume"),
            Err(_) => panic!("timed out with predictions for {} events", by_event.len()),
        };
        let p = codec
            .decode::<Prediction>(m.payload().unwrap())
            .await
            .unwrap()
            .record;
        assert_eq!(m.key(), Some(p.entity_id.as_bytes()), "keyed by entity id");
        by_event.entry(p.event_id.clone()).or_default().push(p);
    }
    by_event
}

/// Reads `n` dead letters: (class, stage, value).
async fn read_dead_letters(lane: &Lane, n: usize) -> Vec<(ErrorClass, String, Vec<u8>)> {
    let consumer = consumer(&lane.settings, &[&lane.settings.topics.dlq]);
    consume_n(&consumer, n, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|m| {
            let h = rdkafka::message::Message::headers(&m).expect("dead letters carry headers");
            let class = dlq::header_str(h, dlq::HEADER_CLASS)
                .unwrap()
                .parse()
                .unwrap();
            let stage = dlq::header_str(h, dlq::HEADER_STAGE).unwrap().to_string();
            (class, stage, m.payload().unwrap_or_default().to_vec())
        })
        .collect()
}

fn has_all(ids: &HashSet<String>) -> impl Fn(&HashMap<String, Vec<Prediction>>) -> bool + '_ {
    move |seen| ids.iter().all(|id| seen.contains_key(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_accounted_for_and_the_cache_holds_the_newest() {
    let lane = Lane::new("stream");
    lane.create_topics().await;
    let running = lane.start(&streaming_services());
    running.ready().await;

    let valid = samples(11, 1500, 200);
    let invalid = invalid_events();
    let producer = producer(&lane.settings);
    let mut lines: Vec<String> = valid.iter().map(Sample::raw_json).collect();
    lines.extend(invalid.iter().map(|(l, _)| l.clone()));
    lane.publish_raw(&producer, &lines).await;

    let ids: HashSet<String> = valid.iter().map(|s| s.event_id.clone()).collect();
    let predictions = read_predictions(&lane, Duration::from_secs(120), has_all(&ids)).await;
    let dead = read_dead_letters(&lane, invalid.len()).await;

    // Counts reconcile exactly: every valid event once, every invalid one dead-lettered.
    assert_eq!(
        predictions.len(),
        valid.len(),
        "no prediction for an unknown event"
    );
    assert!(
        predictions.values().all(|v| v.len() == 1),
        "no duplicates without a crash"
    );
    let mut expected: Vec<(ErrorClass, Vec<u8>)> = invalid
        .iter()
        .map(|(l, c)| (*c, l.as_bytes().to_vec()))
        .collect();
    let mut got: Vec<(ErrorClass, Vec<u8>)> =
        dead.iter().map(|(c, _, v)| (*c, v.clone())).collect();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "each invalid event with its class and original bytes"
    );
    assert!(dead.iter().all(|(_, stage, _)| stage == "ingest"));

    for s in &valid {
        let p = &predictions[&s.event_id][0];
        assert_eq!(p.entity_id, s.entity_id);
        assert_eq!(p.event_time, s.event_time);
        assert_eq!(
            (p.model_name.as_str(), p.model_version.as_str()),
            ("fraud", "1")
        );
        assert_eq!(p.lane, lanes_common::records::Lane::Stream);
        assert!((0.0..=1.0).contains(&p.score));
        assert_eq!(
            p.label.as_deref(),
            Some(if p.score >= 0.5 { "fraud" } else { "legit" })
        );
        assert!(p.batch_id.is_some() && p.ingested_at.is_some());
        assert!(p.scored_at >= p.ingested_at.unwrap());
    }

    // Redis holds, for each entity, the prediction of its newest event.
    let mut newest: BTreeMap<&str, &Sample> = BTreeMap::new();
    for s in &valid {
        let e = newest.entry(&s.entity_id).or_insert(s);
        if s.event_time > e.event_time {
            *e = s;
        }
    }
    let redis = redis(&lane.settings)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (entity, s) in &newest {
        let key = format!("{}{entity}", lane.settings.cache_writer.key_prefix);
        let cached: HashMap<String, String> =
            wait_for("cache entry", Duration::from_secs(30), || {
                let (mut redis, key) = (redis.clone(), key.clone());
                let want = s.event_time.to_string();
                async move {
                    let h: HashMap<String, String> = redis.hgetall(&key).await.ok()?;
                    (h.get("event_time") == Some(&want)).then_some(h)
                }
            })
            .await;
        assert_eq!(cached["event_id"], s.event_id);
        let p = &predictions[&s.event_id][0];
        assert_eq!(cached["score"].parse::<f64>().unwrap(), p.score);
        assert_eq!(cached["model_version"], "1");
        assert_eq!(cached["lane"], "STREAM");
        assert_eq!(cached["scored_at"], p.scored_at.to_string());
    }
    assert_eq!(cache_keys(&lane.settings).await.len(), newest.len());

    assert_eq!(
        running.metric("lanes_ingest_events_total", &[("outcome", "valid")]),
        valid.len() as f64
    );
    assert_eq!(
        running.metric("lanes_ingest_dead_letters_total", &[]),
        invalid.len() as f64
    );
    assert_eq!(
        running.metric("lanes_scorer_rows_scored_total", &[]),
        valid.len() as f64
    );
    assert!(running.metric("lanes_micro_batcher_batch_size_events", &[]) > 0.0);
    assert_eq!(
        running.metric(
            "lanes_micro_batcher_events_total",
            &[("outcome", "batched")]
        ),
        valid.len() as f64
    );
    // Every valid event's features reach Redis once: written, found older, or left
    // out for a newer event of its entity in the same call.
    let features = |result| {
        running.metric(
            "lanes_cache_writer_feature_writes_total",
            &[("result", result)],
        )
    };
    let handled = || features("written") + features("stale") + features("superseded");
    let want = valid.len() as f64;
    wait_for("feature writes", Duration::from_secs(30), || {
        let n = handled();
        async move { (n >= want).then_some(()) }
    })
    .await;
    assert_eq!(handled(), want);

    // Scores equal onnxruntime's Python API on the same features.
    let sample: Vec<&Sample> = valid.iter().step_by(15).collect();
    let rows: Vec<Vec<f32>> = sample
        .iter()
        .map(|s| s.features.iter().map(|v| *v as f32).collect())
        .collect();
    let request =
        serde_json::json!({"model": root().join("models/fraud/1/model.onnx"), "rows": rows});
    let python_scores: Vec<f64> = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(python())
            .arg(root().join("tests/interop/score_onnx.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(python_scores.len(), sample.len());
    for (s, py) in sample.iter().zip(python_scores) {
        let ours = predictions[&s.event_id][0].score;
        assert!(
            (ours - py).abs() <= 1e-5,
            "{}: lanes {ours} vs onnxruntime {py}",
            s.event_id
        );
    }
    assert_eq!(FEATURES.len(), 10);
    running.stop().await;
}

/// Publishes `samples` in slices with pauses, so a crash or a rebalance lands mid-stream.
async fn trickle(lane: &Lane, samples: &[Sample], slices: usize, pause: Duration) {
    let producer = producer(&lane.settings);
    for chunk in samples.chunks(samples.len().div_ceil(slices)) {
        let lines: Vec<String> = chunk.iter().map(Sample::raw_json).collect();
        lane.publish_raw(&producer, &lines).await;
        tokio::time::sleep(pause).await;
    }
}

/// Kills `binary` with SIGKILL mid-stream and restarts it; every event must still get a
/// prediction.
async fn survives_a_crash_of(binary: &str, in_process: Vec<ServiceDef>) {
    let lane = Lane::new(binary);
    lane.create_topics().await;
    let running = lane.start(&in_process);
    running.ready().await;
    let mut child = lane.spawn(binary, &[]);

    let valid = samples(21, 3000, 300);
    let ids: HashSet<String> = valid.iter().map(|s| s.event_id.clone()).collect();
    let (first, rest) = valid.split_at(1000);
    trickle(&lane, first, 4, Duration::from_millis(100)).await;
    // Some work is done when the crash comes.
    let some: HashSet<String> = first[..200].iter().map(|s| s.event_id.clone()).collect();
    read_predictions(&lane, Duration::from_secs(60), has_all(&some)).await;

    let publisher = {
        let (lane, rest) = (lane.clone(), rest.to_vec());
        tokio::spawn(async move { trickle(&lane, &rest, 10, Duration::from_millis(50)).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    signal(&child, "KILL");
    child.wait().unwrap();
    // Restart after the crashed member's session has expired, as a supervisor with a
    // restart delay would. (tansu, the embedded broker, can stall a group for minutes
    // when a member joins while a crashed one is still registered; Kafka does not.)
    tokio::time::sleep(Duration::from_millis(
        lane.settings.kafka.session_timeout_ms + 1_000,
    ))
    .await;
    let mut child = lane.spawn(binary, &[]);
    let port = if binary == "lanes-scorer" {
        lane.settings.admin.ports.scorer
    } else {
        lane.settings.admin.ports.micro_batcher
    };
    wait_for(
        "the restarted service to be ready",
        Duration::from_secs(60),
        || async move {
            let url = format!("http://127.0.0.1:{port}/readyz");
            http()
                .get(url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        },
    )
    .await;
    publisher.await.unwrap();

    // The crashed member may hold its partitions until the group gives up on it
    // (max.poll.interval.ms, 30 s): allow for that.
    let predictions = read_predictions(&lane, Duration::from_secs(180), has_all(&ids)).await;
    assert!(ids.iter().all(|id| predictions.contains_key(id)));
    assert_eq!(predictions.len(), ids.len());
    signal(&child, "TERM");
    assert!(
        child.wait().unwrap().success(),
        "{binary} stops cleanly after the restart"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_scorer_loses_nothing() {
    survives_a_crash_of(
        "lanes-scorer",
        vec![lanes_ingest::def(), lanes_micro_batcher::def()],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_micro_batcher_loses_nothing() {
    survives_a_crash_of(
        "lanes-micro-batcher",
        vec![lanes_ingest::def(), lanes_scorer::def()],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_micro_batcher_joining_and_leaving_loses_nothing() {
    let lane = Lane::new("rebalance");
    lane.create_topics().await;
    let running = lane.start(&[
        lanes_ingest::def(),
        lanes_micro_batcher::def(),
        lanes_scorer::def(),
    ]);
    running.ready().await;

    let valid = samples(31, 4000, 300);
    let ids: HashSet<String> = valid.iter().map(|s| s.event_id.clone()).collect();
    let publisher = {
        let (lane, valid) = (lane.clone(), valid.clone());
        tokio::spawn(async move { trickle(&lane, &valid, 80, Duration::from_millis(100)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = lane.start(&[lanes_micro_batcher::def()]);
    // The second member joins, takes partitions and batches from them mid-stream ...
    wait_for(
        "the second member to emit a batch",
        Duration::from_secs(30),
        || async {
            (second.metric("lanes_micro_batcher_batch_size_events", &[]) > 0.0).then_some(())
        },
    )
    .await;
    let joined_batches = second.metric("lanes_micro_batcher_batch_size_events", &[]);
    // ... then leaves while events keep coming.
    assert!(
        !publisher.is_finished(),
        "the stream is still flowing when the member leaves"
    );
    second.stop().await;
    publisher.await.unwrap();

    let predictions = read_predictions(&lane, Duration::from_secs(120), has_all(&ids)).await;
    assert_eq!(predictions.len(), ids.len());
    assert!(
        joined_batches > 0.0,
        "the second member took partitions and emitted batches"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lanes_up_stops_gracefully_under_load_and_loses_nothing() {
    let mut lane = Lane::new("up");
    lane.settings.shutdown.drain_timeout_ms = 5000;
    lane.create_topics().await;
    let mut up = lane.spawn("lanes", &["up"]);
    let valid = samples(41, 4000, 400);
    let ids: HashSet<String> = valid.iter().map(|s| s.event_id.clone()).collect();
    let publisher = {
        let (lane, valid) = (lane.clone(), valid.clone());
        tokio::spawn(async move { trickle(&lane, &valid, 20, Duration::from_millis(60)).await })
    };
    let some: HashSet<String> = valid[..100].iter().map(|s| s.event_id.clone()).collect();
    read_predictions(&lane, Duration::from_secs(60), has_all(&some)).await;

    let stopping = std::time::Instant::now();
    signal(&up, "TERM");
    let status = tokio::task::spawn_blocking(move || up.wait().unwrap())
        .await
        .unwrap();
    let took = stopping.elapsed();
    assert_eq!(status.code(), Some(0), "a signal is a clean stop");
    assert!(
        took < Duration::from_millis(5000),
        "stopped within the drain deadline: {took:?}"
    );
    publisher.await.unwrap();

    // What was in flight at the signal was either finished or left uncommitted.
    let mut up = lane.spawn("lanes", &["up"]);
    // tansu 0.6 has reported a partition's end one short of its last record until
    // another record arrived, hiding that record from consumers. A slow trickle of other
    // events keeps every partition moving, so only a real loss leaves an id unseen.
    let padding = {
        let lane = lane.clone();
        tokio::spawn(async move {
            let producer = producer(&lane.settings);
            for s in samples(42, 2000, 400) {
                lane.publish_raw(&producer, &[s.raw_json()]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let predictions = read_predictions(&lane, Duration::from_secs(120), has_all(&ids)).await;
    padding.abort();
    assert_eq!(
        predictions.keys().filter(|id| ids.contains(*id)).count(),
        ids.len()
    );
    signal(&up, "TERM");
    assert!(up.wait().unwrap().success());
}
